//! Detector parameters: manifest defaults overridden per deployment.

use crate::abi::Manifest;
use crate::time::parse_duration;
use std::collections::BTreeMap;

/// Resolved parameters: every manifest parameter has a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    values: BTreeMap<String, String>,
}

impl Params {
    /// Applies `overrides` to the manifest defaults; an override for a parameter the
    /// manifest does not declare is an error naming the known ones.
    pub fn resolve(manifest: &Manifest, overrides: &[(String, String)]) -> Result<Params, String> {
        let mut values: BTreeMap<String, String> =
            manifest.parameters.iter().map(|p| (p.name.clone(), p.default.clone())).collect();
        for (name, value) in overrides {
            match values.get_mut(name) {
                Some(slot) => *slot = value.clone(),
                None => {
                    let known: Vec<&str> = manifest.parameters.iter().map(|p| p.name.as_str()).collect();
                    return Err(format!(
                        "detector {} has no parameter '{name}' (known: {})",
                        manifest.name,
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(Params { values })
    }

    pub fn str(&self, name: &str) -> Result<&str, String> {
        self.values.get(name).map(String::as_str).ok_or_else(|| format!("parameter '{name}' is not declared"))
    }

    /// A duration parameter (`2d`, `30d`, `12h`, …) in ticks.
    pub fn duration(&self, name: &str) -> Result<i64, String> {
        let v = self.str(name)?;
        parse_duration(v).ok_or_else(|| format!("parameter '{name}': '{v}' is not a duration like 2d, 12h, 90m"))
    }

    pub fn i64(&self, name: &str) -> Result<i64, String> {
        let v = self.str(name)?;
        v.trim().parse().map_err(|_| format!("parameter '{name}': '{v}' is not an integer"))
    }
}

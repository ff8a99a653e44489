//! Small helpers for what the commands print.

use anyhow::{anyhow, Result};
use lookout_plugin_sdk::time::parse_timestamp;

/// Parses `--now` (RFC 3339 / ISO-8601 UTC) into ticks.
pub fn parse_now(s: &str) -> Result<i64> {
    parse_time("--now", s)
}

/// Parses a time given as `what` (a flag, a config key) into ticks; the error names it.
pub fn parse_time(what: &str, s: &str) -> Result<i64> {
    parse_timestamp(s).ok_or_else(|| anyhow!("{what} '{s}': expected an RFC 3339 UTC time like 2025-05-08T00:00:00Z"))
}

/// Retention when none is given: Defender keeps 30 days of advanced hunting, and a rule's
/// `ago(30d)` evaluated a little after its data arrived still needs all of it.
pub const DEFAULT_RETENTION: &str = "31d";

/// `--retention` for ingest, detect and run: rows are kept while their Timestamp is
/// within it of the clock (or `--now`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RetentionArg {
    /// Keep rows whose Timestamp is within this of now (e.g. 31d, 12h; `none` keeps
    /// everything); older rows are invisible to detectors and their space is reused
    /// [default: `retention` in the config file (run); ingest and detect: the retention
    /// the data directory was last used with; else 31d]
    #[arg(long, value_name = "DURATION")]
    pub retention: Option<String>,
}

/// Parses a retention (`31d`, `12h`, `none`/`off`/`0`) into ticks (`None`: keep forever).
pub fn parse_retention(s: &str) -> Result<Option<i64>> {
    parse_retention_from("--retention", s)
}

/// [`parse_retention`] of a value given as `what` (a flag, a config key): the error names it.
fn parse_retention_from(what: &str, s: &str) -> Result<Option<i64>> {
    match s.trim() {
        "none" | "off" | "0" => Ok(None),
        d => match lookout_plugin_sdk::time::parse_duration(d) {
            Some(t) if t > 0 => Ok(Some(t)),
            _ => Err(anyhow!("{what} '{s}': expected a duration like 31d, 12h or 90m, or `none` to keep everything")),
        },
    }
}

impl RetentionArg {
    /// The retention to apply: the flag, else the config file's, else the default.
    pub fn resolve(&self, from_config: Option<&str>) -> Result<Option<i64>> {
        match (&self.retention, from_config) {
            (Some(flag), _) => parse_retention(flag),
            (None, Some(key)) => parse_retention_from("retention in the config file", key),
            (None, None) => parse_retention(DEFAULT_RETENTION),
        }
    }

    /// The retention a one-shot command applies to `store`: the flag, else the one the
    /// data directory was last used with (a daemon's, say: the horizon never moves back,
    /// so the default applied here would remove for good the rows a longer retention
    /// keeps), else the default. Recorded for the next command.
    pub fn apply_to(&self, store: &mut lookout_core::store::Store) -> Result<Option<i64>> {
        let retention = match (&self.retention, store.recorded_retention()?) {
            (Some(flag), _) => parse_retention(flag)?,
            (None, Some(recorded)) => recorded,
            (None, None) => parse_retention(DEFAULT_RETENTION)?,
        };
        store.set_retention(retention);
        store.record_retention(retention)?;
        Ok(retention)
    }
}

/// Opens the store of a data directory that must already hold one: a command that only
/// reads (`status`, `findings`) given a mistyped `--data` would otherwise create an empty
/// store there and report it, empty, as if all were well.
pub fn open_existing(data: &std::path::Path) -> Result<lookout_core::store::Store> {
    if !data.join("db").exists() {
        return Err(anyhow!(
            "{} holds no Lookout data (no database in it): pass --data (or set LOOKOUT_DATA) to the data directory `lookout ingest` or `lookout run` use",
            data.display()
        ));
    }
    Ok(lookout_core::store::Store::open(data)?)
}

/// Prints rows as an aligned text table.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        line(r.clone());
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

//! Lookout detector `winrm-plugin-lateral-movement`: a port of FalconForce's FalconFriday
//! rule 0xFF-0582 "WinRM Plugin Lateral Movement" (MITRE ATT&CK T1021.006).
//!
//! ```kusto
//! let PotentialPlugins = DeviceImageLoadEvents
//!   | where ingestion_time() >= ago(timeframe)
//!   | where InitiatingProcessFileName =~ "wsmprovhost.exe"
//!   | where FolderPath !startswith @"C:\windows\assembly\nativeimages_"
//!   | invoke FileProfile(SHA1, 1000)
//!   | where ProfileAvailability !~ "Error"
//!   | where coalesce(GlobalPrevalence, default_global_prevalence) < 100
//!   | extend FolderPath=tolower(FolderPath);
//! let PotentialWrites = DeviceFileEvents
//!   | where Timestamp >= ago(lookback)
//!   | where ActionType in~ ("FileCreated", "FileRenamed", "FileModified")
//!   | where SHA1 in~ ((PotentialPlugins | project SHA1))
//!   | extend FolderPath=tolower(FolderPath);
//! PotentialPlugins | join kind=inner PotentialWrites on SHA1, DeviceId, FolderPath
//! ```
//!
//! Incrementally: a new load that passes the plugin filters probes stored writes by
//! (SHA1, DeviceId); a new write whose SHA1 is in the persisted set of candidate plugin
//! SHA1s probes stored loads; a new FileProfile row re-evaluates the stored loads of its
//! SHA1. Everything else costs one hash-set probe.
//!
//! What the host hands over (`Detector::inputs`): only loads by the initiating process
//! (`=~`, answered from the host's column index), and on a backfill only those loads —
//! every stored write and profile a backfill needs is reached by look-ups from them.
//! FileProfile depends on SHA1 alone, so loads are grouped by SHA1 and a prevalent file's
//! loads are never fetched.

/// The library's own allocator (a detector library has one of its own, whatever the host
/// uses): a pass decodes thousands of rows, each a few dozen small strings, and glibc's
/// malloc took a fifth of an attack-dense pass; mimalloc takes 13% less of the detector's
/// time there. (A crate that links this library as an rlib gets it as its allocator too.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod rule;

use lookout_plugin_sdk::{Detector, EvalRequest, IndexDecl, InputSpec, Manifest, Parameter, Params};

pub use rule::{RuleConfig, WinrmRule};

pub const NAME: &str = "winrm-plugin-lateral-movement";

/// The detector type exported by this library.
pub struct WinrmDetector {
    rule: WinrmRule,
}

impl Detector for WinrmDetector {
    fn manifest() -> Manifest {
        let p = Parameter::new;
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            title: "WinRM Plugin Lateral Movement".into(),
            description: "A low-prevalence DLL written to disk in the lookback window and then loaded \
                          into the WinRM plugin host (wsmprovhost.exe): a likely malicious WinRM plugin \
                          used for lateral movement. FalconFriday 0xFF-0582."
                .into(),
            severity: "high".into(),
            mitre: vec!["T1021.006".into()],
            inputs: vec![
                lookout_plugin_sdk::tables::IMAGE_LOADS.into(),
                lookout_plugin_sdk::tables::FILE_EVENTS.into(),
                lookout_plugin_sdk::tables::FILE_PROFILE.into(),
            ],
            parameters: vec![
                p(
                    "timeframe",
                    "2d",
                    "loads ingested within this window are considered (ingestion_time() >= ago(timeframe))",
                ),
                p("lookback", "30d", "writes with Timestamp within this window are considered"),
                p("prevalence_threshold", "100", "files with global prevalence below this are suspicious"),
                p("default_prevalence", "0", "prevalence assumed when FileProfile has none"),
                p("initiating_process", "wsmprovhost.exe", "process that loads the plugin (=~); * means any process"),
                p(
                    "excluded_prefix",
                    r"C:\windows\assembly\nativeimages_",
                    "load FolderPath prefix to ignore (!startswith)",
                ),
            ],
            // The loads are chosen by who loaded them (`InitiatingProcessFileName =~
            // "wsmprovhost.exe"`) and where from (`FolderPath !startswith ...`): the host
            // answers both from this index without reading the loads that cannot match.
            indexes: vec![IndexDecl {
                table: lookout_plugin_sdk::tables::IMAGE_LOADS.into(),
                columns: vec!["InitiatingProcessFileName".into()],
                covers: vec!["FolderPath".into()],
            }],
        }
    }

    fn init(params: &Params, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let config = RuleConfig {
            timeframe: params.duration("timeframe")?,
            lookback: params.duration("lookback")?,
            prevalence_threshold: params.i64("prevalence_threshold")?,
            default_prevalence: params.i64("default_prevalence")?,
            initiating_process: params.str("initiating_process")?.to_string(),
            excluded_prefix: params.str("excluded_prefix")?.to_string(),
        };
        Ok(WinrmDetector { rule: WinrmRule::new(config, state)? })
    }

    fn inputs(&self) -> Vec<InputSpec> {
        self.rule.inputs()
    }

    fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut lookout_plugin_sdk::Context<'_>) -> Result<(), String> {
        self.rule.evaluate(batch, ctx)
    }
}

lookout_plugin_sdk::export_detector!(WinrmDetector);

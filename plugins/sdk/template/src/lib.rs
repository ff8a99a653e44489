//! A Lookout detector to start from: PowerShell started with an encoded command.
//!
//! ```kusto
//! DeviceProcessEvents
//! | where FileName in~ ("powershell.exe", "pwsh.exe")
//! | where ProcessCommandLine has_any (encoded_flags)
//! ```
//!
//! It shows the parts every detector has: a manifest (what it is, which tables it reads,
//! its parameters), `init` (parameters and persisted state in), `inputs` (conditions the
//! host applies before a row reaches the detector), `evaluate` (the new rows of one pass
//! in, findings out), and `export_detector!`, which makes the library loadable.

use lookout_plugin_sdk::tables::PROCESS_EVENTS;
use lookout_plugin_sdk::{
    Condition, Context, Detector, EvalRequest, FindingOut, InputSpec, Manifest, Parameter, Params, Row,
};

pub const NAME: &str = "encoded-powershell";

pub struct EncodedPowershell {
    /// `ProcessCommandLine has flag`, one per flag that means "the script is base64 on
    /// the command line" (`has`: a whole term, ASCII case ignored).
    flags: Vec<Condition>,
}

impl EncodedPowershell {
    fn new(flags: &[&str]) -> Self {
        let flags =
            flags.iter().map(|f| Condition::Has { column: "ProcessCommandLine".into(), term: f.to_string() }).collect();
        EncodedPowershell { flags }
    }

    /// `has_any`: one of the flags is on the command line.
    fn fires(&self, row: &Row) -> bool {
        self.flags.iter().any(|c| c.matches_row(row))
    }
}

impl Detector for EncodedPowershell {
    fn manifest() -> Manifest {
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            title: "PowerShell with an encoded command".into(),
            description: "powershell.exe or pwsh.exe started with -EncodedCommand (or a short form): \
                          the script is hidden from command-line logging."
                .into(),
            severity: "medium".into(),
            mitre: vec!["T1059.001".into(), "T1027".into()],
            inputs: vec![PROCESS_EVENTS.into()],
            parameters: vec![Parameter::new(
                "flags",
                "-EncodedCommand,-enc,-ec,-e",
                "comma-separated command-line flags that carry an encoded script",
            )],
            indexes: Vec::new(),
        }
    }

    fn init(params: &Params, _state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let flags: Vec<&str> = params.str("flags")?.split(',').map(str::trim).filter(|f| !f.is_empty()).collect();
        if flags.is_empty() {
            return Err("parameter 'flags': give at least one flag".into());
        }
        Ok(EncodedPowershell::new(&flags))
    }

    /// Only PowerShell processes cross the boundary; the host checks this on its side.
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            table: PROCESS_EVENTS.into(),
            only_where: vec![Condition::In {
                column: "FileName".into(),
                any_of: vec!["powershell.exe".into(), "pwsh.exe".into()],
            }],
            on_backfill: true,
        }]
    }

    fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut Context<'_>) -> Result<(), String> {
        let keys = batch.rows.iter().map(|r| r.key.clone()).collect();
        for row in ctx.rows(keys)? {
            if self.fires(&row) {
                ctx.emit(FindingOut {
                    // The row's key is the finding's identity: the same row never fires twice.
                    inputs: vec![row.key.clone()],
                    device_id: row.str("DeviceId").to_string(),
                    device_name: row.str("DeviceName").to_string(),
                    row: row.columns.clone(),
                });
            }
        }
        Ok(())
    }
}

lookout_plugin_sdk::export_detector!(EncodedPowershell);

#[cfg(test)]
mod tests {
    use super::*;
    use lookout_plugin_sdk::Cell;

    fn process(cmd: &str) -> Row {
        Row {
            table: PROCESS_EVENTS.into(),
            key: vec![1],
            ingested_at: 0,
            columns: vec![("ProcessCommandLine".into(), Cell::Str(cmd.into()))],
        }
    }

    #[test]
    fn encoded_flags_fire_as_whole_terms() {
        let d = EncodedPowershell::new(&["-EncodedCommand", "-enc"]);
        assert!(d.fires(&process("powershell.exe -NoP -ENC SQBFAFgA")));
        assert!(d.fires(&process("pwsh -encodedcommand SQBFAFgA")));
        assert!(!d.fires(&process("powershell.exe -File encode.ps1")));
        assert!(!d.fires(&process("powershell.exe -encoding utf8")));
    }
}

//! Lookout detector `scm-remote-process`: a port of FalconForce's FalconFriday rule
//! 0xFF-0083 "Remote Process Invocation Via SCM" (MITRE ATT&CK T1021.002).
//!
//! An inbound connection accepted by `services.exe` followed, within ten seconds, by a
//! new child process of that same `services.exe` (a service start) is a remote process
//! invocation through the Service Control Manager. Children of rare, unsigned files and
//! LOLBINs are reported.
//!
//! ```kusto
//! let timeframe = 2*1h;
//! let lolbins = dynamic(["At.exe", "Atbroker.exe", ..., "Wsl.exe"]); // LOLBINS below
//! let networkEvents = materialize(DeviceNetworkEvents
//! | where ingestion_time() >= ago(timeframe)
//! | where InitiatingProcessFileName in~ ("services.exe")
//! | where ActionType =~ "InboundConnectionAccepted"
//! | project-rename TimestampNetworkAct=Timestamp);
//! let allServices = materialize ((
//! DeviceProcessEvents
//! | where ingestion_time() >= ago(timeframe)
//! | where ActionType =~ "ProcessCreated"
//! | where DeviceId in~ ((networkEvents | project DeviceId))
//! | where InitiatingProcessFileName =~ "services.exe"
//! | project TimestampChild=Timestamp, DeviceId, DeviceName, FileName, ProcessCommandLine, SHA1,
//! InitiatingProcessFileName, InitiatingProcessCommandLine, InitiatingProcessSHA1, InitiatingProcessId, TimestampServicesExe=InitiatingProcessCreationTime));
//! let serviceNetworkEvents = materialize(
//! (networkEvents
//!     | join kind=inner hint.strategy=shuffle allServices on DeviceId, InitiatingProcessId, InitiatingProcessFileName
//! )
//! | where datetime_diff("Second", TimestampChild, TimestampNetworkAct) between (0 .. 10)
//! | where datetime_diff("Second", TimestampNetworkAct, TimestampServicesExe) > 60);
//! let serviceNetworkEventsWithSHA1 = materialize(serviceNetworkEvents
//! | summarize count() by SHA1
//! | join kind=leftanti hint.strategy=broadcast DeviceFileCertificateInfo on SHA1
//! | where count_ < 100);
//! serviceNetworkEvents
//! | where SHA1 in ((serviceNetworkEventsWithSHA1 | project SHA1)) or FileName in~ (lolbins)
//! | where ProcessCommandLine !~ "msiexec.exe /V"
//! | extend Timestamp=TimestampNetworkAct
//! ```
//!
//! The query above is from FalconForce's FalconFriday repository (comments dropped, the
//! LOLBIN list elided; the full list is [`LOLBINS`]), under this licence:
//!
//! ```text
//! BSD 3-Clause License
//!
//! Copyright (c) 2020, FalconForce
//! All rights reserved.
//!
//! Redistribution and use in source and binary forms, with or without
//! modification, are permitted provided that the following conditions are met:
//!
//! 1. Redistributions of source code must retain the above copyright notice, this
//!    list of conditions and the following disclaimer.
//!
//! 2. Redistributions in binary form must reproduce the above copyright notice,
//!    this list of conditions and the following disclaimer in the documentation
//!    and/or other materials provided with the distribution.
//!
//! 3. Neither the name of the copyright holder nor the names of its
//!    contributors may be used to endorse or promote products derived from
//!    this software without specific prior written permission.
//!
//! THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
//! AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
//! IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
//! DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
//! FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
//! DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
//! SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
//! CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
//! OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
//! OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
//! ```
//!
//! # Semantics (docs/rules/SEMANTICS.md, and the choices where it is silent)
//!
//! | KQL | here |
//! |---|---|
//! | `ingestion_time() >= ago(timeframe)` | inclusive at 100 ns, on both sides of the join, at the pass's evaluation time |
//! | `InitiatingProcessFileName in~ ("services.exe")`, `ActionType =~ …` | ASCII case-insensitive; applied by the host (`only_where`) and again on every fetched row |
//! | `DeviceId in~ ((networkEvents \| project DeviceId))` | implied by the join (its DeviceId is exact and on the left), so not checked separately |
//! | `join kind=inner … on DeviceId, InitiatingProcessId, InitiatingProcessFileName` | every matching pair (no de-duplication), case-sensitive on all three: `Services.exe` does not join `services.exe`; a null or non-integer `InitiatingProcessId` matches nothing |
//! | `datetime_diff("Second", a, b)` | `floor(a to 1 s) − floor(b to 1 s)` (whole-second boundaries crossed): a child 0.8 s before the connection in the same second is 0 and passes |
//! | `between (0 .. 10)`, `> 60` | inclusive, on those counts; a null or unparsable `InitiatingProcessCreationTime` fails `> 60` |
//! | `summarize count() by SHA1` | pairs (not devices, not children) per child SHA1 as stored (case kept), over the pairs that passed both time conditions at this pass, whatever their command line (the msiexec filter comes after) |
//! | `join kind=leftanti DeviceFileCertificateInfo on SHA1` | any stored certificate row with exactly that SHA1 (no time filter; `""` matches `""`) removes it; a certificate that arrives later stops later emissions, never retracts one |
//! | `count_ < prevalence_threshold` | integers, strict |
//! | `SHA1 in (…) or FileName in~ (lolbins)` | `in` exact; `in~` ASCII case-insensitive: a LOLBIN child passes whatever its count or certificate |
//! | `ProcessCommandLine !~ "msiexec.exe /V"` | whole string, ASCII case-insensitive; such children still count for their SHA1 |
//! | result row | the network row's columns as stored, `Timestamp` renamed `TimestampNetworkAct`; then `TimestampChild, DeviceId, DeviceName, FileName, ProcessCommandLine, SHA1, InitiatingProcessFileName, InitiatingProcessCommandLine, InitiatingProcessSHA1, InitiatingProcessId, TimestampServicesExe` of the child (a missing column is `""` for strings, null otherwise), each whose name the left side already has suffixed `1` (`DeviceId1`, …; `2`, `3`, … if that is taken too, a choice: SEMANTICS names only `1`); then `Timestamp` = `TimestampNetworkAct` (replacing a `Timestamp` column if one is there) |
//! | **finding identity** | (DeviceId, the network row's `ReportId` as text, `TimestampChild` as an instant (two spellings of one time are one value, as KQL's datetime), child SHA1): two children with the same Timestamp and SHA1 under one connection are one finding, reported with the row of the pair whose (network key, child key) comes first |
//!
//! # Incrementally
//!
//! The host hands over only `services.exe` inbound connections and `services.exe`
//! children (`only_where`). Each becomes a small record (join keys, times, SHA1, FileName,
//! whether its command line is the msiexec one) kept until it leaves the
//! `ingestion_time()` window; rows that can never join (a null process id or, for a
//! child, a null `InitiatingProcessCreationTime`) are not kept. The join is kept as the
//! records come and go: records by join key and by the whole second of their Timestamp
//! (a new row meets only the rows within 10 s of it), the pairs that pass the time
//! conditions, and each child SHA1's pairs with when each leaves the window. Each pair is
//! decided once, on the pass that formed it: msiexec and certified pairs never fire, a
//! LOLBIN pair fires, any other fires if its SHA1 has fewer pairs than the threshold and
//! otherwise waits. Waiting pairs are decided again on the pass where their SHA1's count
//! falls below the threshold, which is the only way their answer can change. Every pair
//! is decided again after a change of parameters and on a backfill. Identities not
//! emitted before are emitted (and remembered until their pair leaves the window), with
//! their rows fetched by key.
//! Certificates are looked up per SHA1 when a pair needs them, on the child's device
//! first, once per process: DeviceFileCertificateInfo is an input whose new rows mark
//! their SHA1s certified (never handed over on a backfill), so an answer stays right
//! without asking again. A certificate row that retention later removes from the store
//! still counts until the process restarts (the anti-join has no time filter, so a
//! store kept for the rule's purpose keeps them: `--retention` longer than the
//! certificates' age).
//!
//! The clock: with no new rows a later pass sees fewer pairs, lower counts and no fewer
//! certificates, so a pair that does not fire now can fire later only when its SHA1's
//! count, now at or above the threshold, falls below it. The detector asks to be woken
//! (`wake_at`) when the first pair of such a SHA1 leaves the window (a SHA1 with no
//! certificate and a pair that is neither msiexec, nor a LOLBIN, nor emitted), and at no
//! other time. A change of parameters hands the detector every stored row again: after
//! raising `timeframe`, rows it had dropped are kept again, and every pair is decided
//! again under the new values.

/// The library's own allocator (a detector library has one of its own, whatever the host
/// uses): a pass decodes thousands of rows, each a few dozen small strings, and glibc's
/// malloc took a fifth of an attack-dense pass; mimalloc takes 13% less of the detector's
/// time there. (A crate that links this library as an rlib gets it as its allocator too.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod rule;

use lookout_plugin_sdk::tables::{FILE_CERTIFICATES, NETWORK_EVENTS, PROCESS_EVENTS};
use lookout_plugin_sdk::{Detector, EvalRequest, IndexDecl, InputSpec, Manifest, Parameter, Params};

pub use rule::{output_row, RuleConfig, ScmRule};

pub const NAME: &str = "scm-remote-process";

/// The rule's LOLBIN list, verbatim (the default of the `lolbins` parameter).
pub const LOLBINS: &[&str] = &[
    "At.exe",
    "Atbroker.exe",
    "Bash.exe",
    "Bitsadmin.exe",
    "CertReq.exe",
    "Certutil.exe",
    "Cmd.exe",
    "Cmdkey.exe",
    "Cmstp.exe",
    "Control.exe",
    "Csc.exe",
    "Cscript.exe",
    "Desktopimgdownldr.exe",
    "Dfsvc.exe",
    "Diantz.exe",
    "Diskshadow.exe",
    "Dnscmd.exe",
    "Esentutl.exe",
    "Eventvwr.exe",
    "Expand.exe",
    "Extexport.exe",
    "Extrac32.exe",
    "Findstr.exe",
    "Forfiles.exe",
    "Ftp.exe",
    "GfxDownloadWrapper.exe",
    "Gpscript.exe",
    "Hh.exe",
    "Ie4uinit.exe",
    "Ieexec.exe",
    "Ilasm.exe",
    "Infdefaultinstall.exe",
    "Installutil.exe",
    "Jsc.exe",
    "Makecab.exe",
    "Mavinject.exe",
    "Microsoft.Workflow.Compiler.exe",
    "Mmc.exe",
    "MpCmdRun.exe",
    "Msbuild.exe",
    "Msconfig.exe",
    "Msdt.exe",
    "Mshta.exe",
    "Msiexec.exe",
    "Netsh.exe",
    "Odbcconf.exe",
    "Pcalua.exe",
    "Pcwrun.exe",
    "Pktmon.exe",
    "Presentationhost.exe",
    "Print.exe",
    "Psr.exe",
    "Rasautou.exe",
    "Reg.exe",
    "Regasm.exe",
    "Regedit.exe",
    "Regini.exe",
    "Register-cimprovider.exe",
    "Regsvcs.exe",
    "Regsvr32.exe",
    "Replace.exe",
    "Rpcping.exe",
    "Rundll32.exe",
    "Runonce.exe",
    "Runscripthelper.exe",
    "Sc.exe",
    "Schtasks.exe",
    "Scriptrunner.exe",
    "SyncAppvPublishingServer.exe",
    "Ttdinject.exe",
    "Tttracer.exe",
    "vbc.exe",
    "Verclsid.exe",
    "Wab.exe",
    "Wmic.exe",
    "Wscript.exe",
    "Wsreset.exe",
    "Xwizard.exe",
    "AgentExecutor.exe",
    "Appvlp.exe",
    "Bginfo.exe",
    "Cdb.exe",
    "csi.exe",
    "Devtoolslauncher.exe",
    "dnx.exe",
    "Dotnet.exe",
    "Dxcap.exe",
    "Excel.exe",
    "Mftrace.exe",
    "Msdeploy.exe",
    "msxsl.exe",
    "ntdsutil.exe",
    "Powerpnt.exe",
    "rcsi.exe",
    "Sqldumper.exe",
    "Sqlps.exe",
    "SQLToolsPS.exe",
    "Squirrel.exe",
    "te.exe",
    "Tracker.exe",
    "Update.exe",
    "vsjitdebugger.exe",
    "Winword.exe",
    "Wsl.exe",
];

/// The detector type exported by this library.
pub struct ScmDetector {
    rule: ScmRule,
}

/// Splits the `lolbins` parameter: comma-separated file names, blanks around them ignored,
/// empty entries dropped.
pub fn parse_lolbins(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

impl Detector for ScmDetector {
    fn manifest() -> Manifest {
        let p = Parameter::new;
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            title: "Remote Process Invocation Via SCM".into(),
            description: "An inbound connection accepted by services.exe followed within 10 seconds by a new \
                          child process of that services.exe (a service started remotely through the Service \
                          Control Manager), for rare unsigned binaries and LOLBINs: likely lateral movement. \
                          FalconFriday 0xFF-0083."
                .into(),
            severity: "medium".into(),
            mitre: vec!["T1021.002".into(), "T1021.003".into(), "T1569.002".into(), "T1543.003".into()],
            inputs: vec![NETWORK_EVENTS.into(), PROCESS_EVENTS.into(), FILE_CERTIFICATES.into()],
            parameters: vec![
                p(
                    "timeframe",
                    "2h",
                    "connections and child processes ingested within this window are joined \
                     (ingestion_time() >= ago(timeframe))",
                ),
                p(
                    "prevalence_threshold",
                    "100",
                    "a child SHA1 with fewer joined (connection, child) pairs than this in the window, and no \
                     DeviceFileCertificateInfo row, is reported",
                ),
                p(
                    "lolbins",
                    &LOLBINS.join(","),
                    "comma-separated child file names (in~) reported whatever their count or certificate",
                ),
            ],
            // Both input filters start with an `in~` on InitiatingProcessFileName that the
            // host answers from these indexes, and test ActionType from the covered
            // values: a pass reads only services.exe's connections and children.
            indexes: [NETWORK_EVENTS, PROCESS_EVENTS]
                .into_iter()
                .map(|table| IndexDecl {
                    table: table.into(),
                    columns: vec!["InitiatingProcessFileName".into()],
                    covers: vec!["ActionType".into()],
                })
                .collect(),
        }
    }

    fn init(params: &Params, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let timeframe = params.duration("timeframe")?;
        if timeframe <= 0 {
            return Err("parameter 'timeframe' must be positive".to_string());
        }
        let config = RuleConfig {
            timeframe,
            prevalence_threshold: params.i64("prevalence_threshold")?,
            lolbins: parse_lolbins(params.str("lolbins")?),
        };
        Ok(ScmDetector { rule: ScmRule::new(config, state)? })
    }

    fn inputs(&self) -> Vec<InputSpec> {
        self.rule.inputs()
    }

    fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut lookout_plugin_sdk::Context<'_>) -> Result<(), String> {
        self.rule.evaluate(batch, ctx)
    }
}

lookout_plugin_sdk::export_detector!(ScmDetector);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_lolbin_list_round_trips_through_the_parameter() {
        let m = ScmDetector::manifest();
        let lolbins = m.parameters.iter().find(|p| p.name == "lolbins").map(|p| p.default.clone()).unwrap();
        let parsed = parse_lolbins(&lolbins);
        assert_eq!(parsed.len(), LOLBINS.len());
        assert_eq!(parsed, LOLBINS.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(parse_lolbins(" a.exe , ,B.EXE,"), vec!["a.exe".to_string(), "B.EXE".to_string()]);
        assert_eq!(m.name, "scm-remote-process");
        assert_eq!(m.version, "1.0.0");
    }

    #[test]
    fn init_checks_parameters() {
        let m = ScmDetector::manifest();
        let params = Params::resolve(&m, &[]).unwrap();
        assert!(ScmDetector::init(&params, &[]).is_ok());
        let bad = Params::resolve(&m, &[("timeframe".into(), "2x".into())]).unwrap();
        assert!(ScmDetector::init(&bad, &[]).is_err());
        let bad = Params::resolve(&m, &[("prevalence_threshold".into(), "many".into())]).unwrap();
        assert!(ScmDetector::init(&bad, &[]).is_err());
    }
}

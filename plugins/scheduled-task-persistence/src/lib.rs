//! Lookout detector `scheduled-task-persistence`: a port of FalconForce's FalconFriday
//! rule 0xFF-0082 "Persistence Via Scheduled Tasks" (MITRE ATT&CK T1053.005).
//!
//! The rule, as published:
//!
//! ```kusto
//! let timeframe = 2*1d;
//! let default_global_prevalence = 0;
//! // Time to look back for same scheduled binary.
//! let lookback= 7d;
//! let ScheduledBinaries = (
//!     DeviceProcessEvents
//!     | where Timestamp >= ago(lookback)
//!     | where ActionType =~ "ProcessCreated"
//!     | where InitiatingProcessCommandLine startswith "svchost.exe -k netsvcs -p" and InitiatingProcessCommandLine contains "Schedule" // First argument after -p is censored with ** so can't look for the actual command line
//! );
//! let NewScheduledBinaries=(
//!     ScheduledBinaries
//!     | where Timestamp >= ago(lookback)
//!     | summarize FirstSeen=min(Timestamp),LastSeen=max(Timestamp) by DeviceId, SHA1
//!     | where LastSeen >= ago(timeframe)
//!     | where FirstSeen >= ago(timeframe)
//! );
//! let NewScheduledBinaryExecution=(
//!     ScheduledBinaries
//!     | where ingestion_time() >= ago(timeframe)
//!     | lookup kind=inner NewScheduledBinaries on DeviceId, SHA1
//! );
//! NewScheduledBinaryExecution
//! | summarize MachineCount=dcount(DeviceId) by SHA1
//! // Find the max 1000 least used binaries.
//! | top 1000 by MachineCount asc
//! // FileProfile is case-sensitive and works on lower-case hashes.
//! | extend SHA1=tolower(SHA1)
//! | invoke FileProfile(SHA1,1000)
//! | where not(ProfileAvailability =~ "Error")
//! | where coalesce(GlobalPrevalence,default_global_prevalence) < 100
//! | join NewScheduledBinaryExecution on SHA1
//! | summarize arg_max(Timestamp, *), Devices=make_set(DeviceName), MachineCount=dcount(DeviceName) by SHA1 // Gives the last execution with all details per SHA1.
//! ```
//!
//! The query above is from FalconForce's FalconFriday repository, under this licence:
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
//! Parameters: `timeframe` (2d), `lookback` (7d), `prevalence_threshold` (100),
//! `default_prevalence` (0), `top` (1000), overridable with `--set
//! scheduled-task-persistence.NAME=VALUE` or `[detectors.scheduled-task-persistence]`.
//!
//! # Semantics (docs/rules/SEMANTICS.md, and the choices where it is silent)
//!
//! | KQL | here |
//! |---|---|
//! | a pass | the query's result over every stored row at the pass's time (`now()`); the findings are the union over passes, each identity once |
//! | `ActionType =~`, `startswith`, `contains` | ASCII case-insensitive, applied by the host (`only_where`) and re-checked |
//! | `Timestamp >= ago(lookback)`, `>= ago(timeframe)`, `ingestion_time() >= ago(timeframe)` | inclusive at 100 ns; `ingestion_time()` is when Lookout stored the row |
//! | `summarize … by DeviceId, SHA1`, `lookup kind=inner … on DeviceId, SHA1` | exact, case-sensitive values as stored; `""` is a value like any other |
//! | `dcount` | exact distinct counts of the values as stored |
//! | `top N by MachineCount asc` | ties by SHA1 in ordinal (code-point) order |
//! | `tolower(SHA1)` | Unicode lowercasing (Rust `to_lowercase`; SHA1s are hex, so ASCII in practice) |
//! | `invoke FileProfile(SHA1, 1000)` | the stored FileProfile row with exactly the lowercased SHA1 (newest wins); none: `ProfileAvailability` `""`, `GlobalPrevalence` null; its documented columns are added (`SHA256`, `MD5`, `FileSize`, `GlobalPrevalence`, … `ProfileAvailability`) and other columns of the feed row are not. With `top` above 1000 every SHA1 is still profiled (the cap is not modelled). |
//! | `not(ProfileAvailability =~ "Error")`, `coalesce(GlobalPrevalence, default) < threshold` | as in 0xFF-0582; a real prevalence compares as a real |
//! | `join … on SHA1` (innerunique) | the left SHA1 is lowercased, the right one is not: an execution whose SHA1 has an upper-case letter never joins. Left rows that lowercase to the same SHA1 are de-duplicated keeping the first in `top` order (smallest MachineCount, then smallest original SHA1): it only decides `MachineCount1` |
//! | `arg_max(Timestamp, *)` | the latest joined execution; ties: the larger ReportId (null smallest), then the larger row key |
//! | empty SHA1 | a group like any other; no profile, so it passes |
//! | result row | `SHA1` (lowercased), `Timestamp`, `MachineCount1` (the left side's `dcount(DeviceId)`: the explicit `MachineCount` aggregate keeps the name), the FileProfile columns, the execution's stored columns (those whose name the left side has get suffix `1`: `SHA11`, `SHA2561`, `MD51`, `FileSize1`), `FirstSeen`, `LastSeen`, `Devices` (sorted set of DeviceName, a JSON array), `MachineCount` (distinct DeviceName) |
//! | **finding identity** | (SHA1, DeviceId) for each device among a SHA1's joined executions; its row carries that device's latest joined execution (and its own FirstSeen/LastSeen), with the SHA1's `Devices` and `MachineCount` at that pass |
//!
//! Incrementally: every execution that passes the static filters is kept as a compact
//! record (state) until it leaves the lookback window, and an index keeps the query's
//! aggregates over them: which (DeviceId, SHA1) groups are new with an execution in the
//! timeframe, the devices of each SHA1, and the SHA1s ranked by device count for `top`.
//! A pass re-decides only the groups whose executions changed or whose window edge
//! passed (FirstSeen + timeframe, the latest ingestion + timeframe, each + 1 tick), walks
//! the `top` for devices not emitted yet, asks FileProfile (one call) only for their
//! SHA1s, and emits a finding per new (SHA1, DeviceId). Emitted identities are kept in
//! the state while their group stays in the result, so a restarted process does not
//! build their rows again. It asks to be woken at the next window edge or when an
//! execution leaves the lookback. FileProfile rows are an input (not on a backfill): a
//! new profile makes its SHA1 asked again. A SHA1 whose profile fails is remembered in the
//! state until then, so a restarted process does not ask for it again. Changed parameters take effect on the next
//! pass: every record is kept again with the expiry the new `lookback` gives it and every
//! group decided again; the host hands every stored row over again on that pass, so
//! executions a shorter old lookback left out are taken back (a record already kept is
//! kept once).

/// The library's own allocator (a detector library has one of its own, whatever the host
/// uses): a pass decodes thousands of rows, each a few dozen small strings, and glibc's
/// malloc took a fifth of an attack-dense pass; mimalloc takes 13% less of the detector's
/// time there. (A crate that links this library as an rlib gets it as its allocator too.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod rule;

use lookout_plugin_sdk::{Detector, EvalRequest, IndexDecl, InputSpec, Manifest, Parameter, Params};

pub use rule::{
    execution_of, output_row, profile_passes, static_filter, Execution, GroupKey, Hit, Index, RuleConfig,
    ScheduledTaskRule, PROFILE_COLUMNS,
};

pub const NAME: &str = "scheduled-task-persistence";

/// The detector type exported by this library.
pub struct ScheduledTaskDetector {
    rule: ScheduledTaskRule,
}

impl Detector for ScheduledTaskDetector {
    fn manifest() -> Manifest {
        let p = Parameter::new;
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            title: "Persistence Via Scheduled Tasks".into(),
            description: "A binary run by the Task Scheduler (parent svchost.exe -k netsvcs -p -s Schedule) that \
                          no device ran as a scheduled task before the timeframe within the lookback, and that \
                          is rare worldwide (FileProfile global prevalence): a likely new malicious scheduled \
                          task. FalconFriday 0xFF-0082."
                .into(),
            severity: "medium".into(),
            mitre: vec!["T1053.005".into()],
            inputs: vec![
                lookout_plugin_sdk::tables::PROCESS_EVENTS.into(),
                lookout_plugin_sdk::tables::FILE_PROFILE.into(),
            ],
            parameters: vec![
                p(
                    "timeframe",
                    "2d",
                    "a (device, binary) is new when first seen within this window; executions ingested \
                     within it are reported",
                ),
                p("lookback", "7d", "scheduled executions with Timestamp within this window are considered"),
                p("prevalence_threshold", "100", "binaries with global prevalence below this are suspicious"),
                p("default_prevalence", "0", "prevalence assumed when FileProfile has none"),
                p("top", "1000", "at most this many binaries, the least widespread (top N by MachineCount asc)"),
            ],
            // The input filter's `in~` on ActionType is answered from this index, and its
            // `startswith`/`contains` on the command line from the covered values: a
            // pass reads only the process rows that are scheduled-task executions.
            indexes: vec![IndexDecl {
                table: lookout_plugin_sdk::tables::PROCESS_EVENTS.into(),
                columns: vec!["ActionType".into()],
                covers: vec!["InitiatingProcessCommandLine".into()],
            }],
        }
    }

    fn init(params: &Params, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let top = params.i64("top")?;
        let top = usize::try_from(top).map_err(|_| format!("parameter 'top': {top} is negative"))?;
        let config = RuleConfig {
            timeframe: params.duration("timeframe")?,
            lookback: params.duration("lookback")?,
            prevalence_threshold: params.i64("prevalence_threshold")?,
            default_prevalence: params.i64("default_prevalence")?,
            top,
        };
        Ok(ScheduledTaskDetector { rule: ScheduledTaskRule::new(config, state)? })
    }

    fn inputs(&self) -> Vec<InputSpec> {
        self.rule.inputs()
    }

    fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut lookout_plugin_sdk::Context<'_>) -> Result<(), String> {
        self.rule.evaluate(batch, ctx)
    }
}

lookout_plugin_sdk::export_detector!(ScheduledTaskDetector);

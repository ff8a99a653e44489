//! Lookout detector `password-spraying`: a port of FalconForce's FalconFriday rule
//! 0xFF-0044 "Password spraying attack detected" (MITRE ATT&CK T1110.003): one source
//! failing to log on to one machine with many different accounts, a few tries each.
//!
//! The rule, verbatim (the parameters below replace its `let`s):
//!
//! ```kusto
//! let timeframe = 2*1d;
//! let domaincontrollers =(
//!   DeviceNetworkEvents
//!   | where ActionType == "InboundConnectionAccepted"
//!   | where InitiatingProcessFileName =~ "lsass.exe"
//!   | where LocalPort == 88
//!   | distinct DeviceName
//! );
//! let thresholdForUniqueFailedAccounts = 20;
//! let upperBoundOfFailedLogonsPerAccount = 3;
//! let ratioSuccessFailedLogons = 2;
//! IdentityLogonEvents
//! | where ingestion_time() >= ago(timeframe)
//! | summarize SuccessLogonCount = countif(ActionType =~ "LogonSuccess"), FailedLogonCount = countif(ActionType =~ "LogonFailed"),
//!     UniqueAccountFailedLogons=dcountif(AccountUpn, ActionType =~ "LogonFailed"), FailedAccounts=make_set_if(AccountUpn, ActionType =~ "LogonFailed"),
//!     SuccessAccounts=make_set_if(AccountUpn, ActionType =~ "LogonSuccess"), FirstFailed=minif(Timestamp, ActionType =~ "LogonFailed"),
//!     LastFailed=maxif(Timestamp, ActionType =~ "LogonFailed"), LastTimestamp=arg_max(Timestamp, tostring(ReportId)) by IPAddress, DeviceName // IPAddress is here the "remote IP", i.e., the source of the logon attempt.
//! | where UniqueAccountFailedLogons > thresholdForUniqueFailedAccounts and SuccessLogonCount*ratioSuccessFailedLogons < FailedLogonCount and UniqueAccountFailedLogons*upperBoundOfFailedLogonsPerAccount > FailedLogonCount //more than 3 tries per account is not a password spray anymore
//! | union (
//!     DeviceLogonEvents
//!     | where ingestion_time() >= ago(timeframe)
//!     | where LogonType != "Unlock" and ActionType in~ ("LogonSuccess", "LogonFailed")
//!     | where not(isempty( RemoteIP) and isempty( RemoteDeviceName))
//!     | extend LocalLogon=parse_json(AdditionalFields)
//!     | where RemoteIPType != "Loopback"
//!     | summarize SuccessLogonCount = countif(ActionType =~ "LogonSuccess"), FailedLogonCount = countif(ActionType =~ "LogonFailed"),
//!         UniqueAccountFailedLogons=dcountif(AccountName, ActionType =~ "LogonFailed"), FirstFailed=minif(Timestamp, ActionType =~ "LogonFailed"),
//!         LastFailed=maxif(Timestamp, ActionType =~ "LogonFailed"), LastTimestamp=arg_max(Timestamp, tostring(ReportId)) by RemoteIP, DeviceName, DeviceId // RemoteIP is here the source of the logon attempt.
//!     | project-rename IPAddress=RemoteIP
//!     | where UniqueAccountFailedLogons > thresholdForUniqueFailedAccounts and SuccessLogonCount*ratioSuccessFailedLogons < FailedLogonCount and UniqueAccountFailedLogons*upperBoundOfFailedLogonsPerAccount > FailedLogonCount //more than 3 tries per account is not a password spray anymore
//! )
//! | extend IsDC=(DeviceName in~ ((domaincontrollers | project DeviceName)))
//! | where IsDC == false
//! | extend Timestamp=LastFailed
//! | project-reorder Timestamp
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
//! # Semantics (docs/rules/SEMANTICS.md, and the choices where it is silent)
//!
//! | KQL | here |
//! |---|---|
//! | a pass | the query over every row stored when the pass starts, `now()` = the pass's evaluation time; a pass emits the result rows whose finding identity no earlier pass emitted |
//! | `domaincontrollers` | DeviceName of stored DeviceNetworkEvents with `ActionType == "InboundConnectionAccepted"` (case-sensitive), `InitiatingProcessFileName =~ "lsass.exe"`, `LocalPort == 88` (a long; null or missing fails); no time filter. Kept in the state (ASCII-lowercased); it only grows |
//! | `ingestion_time() >= ago(timeframe)` | inclusive at 100 ns, on Lookout's ingestion time |
//! | `LogonType != "Unlock"`, `RemoteIPType != "Loopback"` | case-sensitive; `""` (or a missing column) passes |
//! | `ActionType in~ (…)`, `countif(ActionType =~ …)` | ASCII case-insensitive |
//! | `not(isempty(RemoteIP) and isempty(RemoteDeviceName))` | as written; a missing or non-string column is empty |
//! | group | (RemoteIP, DeviceName, DeviceId), exact and case-sensitive; (IPAddress, DeviceName) on the identity branch |
//! | `dcountif(AccountName, …)` | exact distinct count of the values as stored (`Admin` and `admin` are two; `""` is a value) |
//! | `minif`/`maxif(Timestamp, …)` | over the group's failures; a Timestamp that is not a datetime is null and ignored |
//! | `arg_max(Timestamp, tostring(ReportId))` | `LastTimestamp` and `ReportId` (text) of the latest row of the group (any outcome the branch keeps). *Silent in SEMANTICS*: ties on Timestamp go to the larger ReportId, compared as integers when the text is one (every integer ranks above any ReportId that is not), else ordinally — a total order, so the pick never depends on arrival order |
//! | thresholds | `Unique > unique_failed_accounts and Success*success_ratio < Failed and Unique*failed_per_account > Failed`, exact integers (no overflow) |
//! | `DeviceName in~ (domaincontrollers)` | ASCII case-insensitive against the DC set at that pass; such groups never fire. A DC row arriving after a finding does not retract it |
//! | result row | `Timestamp` (= LastFailed), `IPAddress`, `DeviceName`, `DeviceId`, `SuccessLogonCount`, `FailedLogonCount`, `UniqueAccountFailedLogons`, `FirstFailed`, `LastFailed`, `LastTimestamp`, `ReportId`, `IsDC` (false); datetimes as `YYYY-MM-DDTHH:MM:SS.fffffffZ` |
//! | finding identity | (IPAddress, DeviceName, DeviceId, FirstFailed) |
//!
//! **The union with `IdentityLogonEvents`.** The branch runs only on rows of that table
//! (Defender for Identity); with none fed it contributes nothing. Its groups are kept
//! apart from the DeviceLogonEvents groups (as two `summarize`s are). Its result rows
//! have no DeviceId: the column reads `""` there (as the union's missing string column),
//! both in the row and in the finding identity. They also carry the branch's own
//! `FailedAccounts` and `SuccessAccounts` (`make_set_if`, as JSON arrays sorted
//! ordinally — KQL's set order is unspecified) after the fixed columns; DeviceLogonEvents
//! rows leave those two out rather than carry nulls. Every row of the table in the window
//! belongs to its group (the branch has no other filter): rows of another ActionType count
//! in no `countif` but can be its `arg_max`.
//!
//! **Incrementally.** Each kept logon row's part of its group (outcome, account,
//! Timestamp, ReportId text) lives in the state until it leaves the window, gathered by
//! group and ingestion time into panes (`Records`, expiry = ingested + timeframe): rows
//! ingested together leave together, so a pass writes one record per group it touched and
//! a restart reads one per group and batch. In memory each group keeps its aggregate
//! (counts, and each account and time with its number of rows, so rows can leave). New
//! rows are taken in on every call of a pass; on its last call the panes that left the
//! window go, every group that gained or lost a row is decided from its aggregate, and
//! the qualifying non-DC groups are emitted (re-emitting an identity is harmless; the host
//! keeps each once). The pass asks to be woken when the next pane leaves the window:
//! rows leaving can make a group qualify (its successes fall) or move its FirstFailed
//! (a new finding), with no new row. A group whose rows did not change has the result
//! it had at its last evaluation, already emitted then; the DC set only grows, so it can
//! only suppress. State kept one record per row (before panes) is taken into panes.

//! **Known limits.** A DC stays a DC in the state after the store's retention prunes
//! the network rows that made it one (the KQL would forget it). Changing the parameters
//! takes effect on the next pass: panes are kept again under a new `timeframe`, and
//! every group is re-evaluated under new thresholds; the host hands every stored row over
//! again on that pass, so rows a shorter old timeframe left out are taken back (a row
//! already kept is kept once).

/// The library's own allocator (a detector library has one of its own, whatever the host
/// uses): a pass decodes thousands of rows, each a few dozen small strings, and glibc's
/// malloc took a fifth of an attack-dense pass; mimalloc takes 13% less of the detector's
/// time there. (A crate that links this library as an rlib gets it as its allocator too.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod rule;

use lookout_plugin_sdk::tables::{IDENTITY_LOGONS, LOGON_EVENTS, NETWORK_EVENTS};
use lookout_plugin_sdk::{Detector, EvalRequest, IndexDecl, InputSpec, Manifest, Parameter, Params};

pub use rule::{
    result_row, summarize, Attempt, GroupAgg, GroupKey, Logon, Outcome, Pane, RuleConfig, SprayRule, Summary,
};

pub const NAME: &str = "password-spraying";

/// The detector type exported by this library.
pub struct SprayDetector {
    rule: SprayRule,
}

impl Detector for SprayDetector {
    fn manifest() -> Manifest {
        let p = Parameter::new;
        Manifest {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            title: "Password Spraying".into(),
            description: "One source failing to log on to one machine with many different accounts, a few tries \
                          each and few successes: a password spray. Domain controllers (lsass.exe accepting \
                          Kerberos on port 88) are left out. FalconFriday 0xFF-0044."
                .into(),
            severity: "medium".into(),
            mitre: vec!["T1110.003".into()],
            inputs: vec![LOGON_EVENTS.into(), NETWORK_EVENTS.into(), IDENTITY_LOGONS.into()],
            parameters: vec![
                p(
                    "timeframe",
                    "2d",
                    "logons ingested within this window are counted (ingestion_time() >= ago(timeframe))",
                ),
                p(
                    "unique_failed_accounts",
                    "20",
                    "a spray has more than this many distinct accounts with failed logons",
                ),
                p(
                    "failed_per_account",
                    "3",
                    "a spray has fewer than this many failed logons per account on average \
                     (UniqueAccountFailedLogons * this > FailedLogonCount)",
                ),
                p("success_ratio", "2", "a spray has SuccessLogonCount * this < FailedLogonCount"),
            ],
            // Both filters start with an `in~` the host answers from these indexes, so the
            // logons and network connections the rule ignores are never read.
            indexes: vec![
                IndexDecl {
                    table: LOGON_EVENTS.into(),
                    columns: vec!["ActionType".into()],
                    covers: vec!["LogonType".into(), "RemoteIPType".into()],
                },
                IndexDecl {
                    table: NETWORK_EVENTS.into(),
                    columns: vec!["InitiatingProcessFileName".into()],
                    covers: vec!["ActionType".into()],
                },
            ],
        }
    }

    fn init(params: &Params, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let config = RuleConfig {
            timeframe: params.duration("timeframe")?,
            unique_failed_accounts: params.i64("unique_failed_accounts")?,
            failed_per_account: params.i64("failed_per_account")?,
            success_ratio: params.i64("success_ratio")?,
        };
        Ok(SprayDetector { rule: SprayRule::new(config, state)? })
    }

    fn inputs(&self) -> Vec<InputSpec> {
        self.rule.inputs()
    }

    fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut lookout_plugin_sdk::Context<'_>) -> Result<(), String> {
        self.rule.evaluate(batch, ctx)
    }
}

lookout_plugin_sdk::export_detector!(SprayDetector);

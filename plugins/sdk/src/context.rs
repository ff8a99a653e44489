//! The plugin side of a pass: look-ups into the host, and the findings and state changes
//! the detector produces.

use crate::abi::{Condition, FindingOut, HostRequest, HostResponse, InputSpec, LookoutHostApi, StateOp, RC_OK};
use crate::cell::Row;
use crate::wire::RowSet;
use crate::CellRef;

/// Handed to [`crate::Detector::evaluate`].
pub struct Context<'a> {
    host: Option<&'a LookoutHostApi>,
    now: i64,
    pub(crate) findings: crate::wire::Findings,
    pub(crate) state: Vec<StateOp>,
    pub(crate) inputs: Option<Vec<InputSpec>>,
    pub(crate) wake_at: Option<i64>,
}

impl<'a> Context<'a> {
    /// Only the SDK's `export` module makes a context with a host table: the one the host
    /// passed to the `lookout_evaluate` call in progress (see `export::call_host`).
    pub(crate) fn new(host: Option<&'a LookoutHostApi>, now: i64) -> Self {
        Context {
            host,
            now,
            findings: crate::wire::Findings::default(),
            state: Vec::new(),
            inputs: None,
            wake_at: None,
        }
    }

    /// The evaluation time of this pass (ticks), the `now()` of `ago(x)`.
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Stored rows by key.
    pub fn rows(&mut self, keys: Vec<Vec<u8>>) -> Result<Vec<Row>, String> {
        match self.call(&HostRequest::GetRows(keys))? {
            HostResponse::Rows(rows) => Ok(rows),
            other => Err(format!("host answered GetRows with {other:?}")),
        }
    }

    /// Stored rows by key that meet every condition; filtered by the host, so rows that
    /// fail never cross the boundary.
    pub fn rows_where(&mut self, keys: Vec<Vec<u8>>, filter: &[Condition]) -> Result<Vec<Row>, String> {
        let req = HostRequest::GetRowsWhere { keys, filter: filter.to_vec() };
        match self.call(&req)? {
            HostResponse::Rows(rows) => Ok(rows),
            other => Err(format!("host answered GetRowsWhere with {other:?}")),
        }
    }

    /// As [`Context::rows_where`], each row with only the named columns (in stored order;
    /// a column the row lacks is left out, so [`Row::str`] reads it as `""`).
    pub fn columns_where(
        &mut self,
        keys: Vec<Vec<u8>>,
        filter: &[Condition],
        columns: &[&str],
    ) -> Result<Vec<Row>, String> {
        match self.call(&columns_request(keys, filter, columns))? {
            HostResponse::Rows(rows) => Ok(rows),
            other => Err(format!("host answered GetColumnsWhere with {other:?}")),
        }
    }

    /// [`Context::columns_where`] read in place: the answer is kept as its bytes and
    /// [`RowSet::rows`] reads each row as a [`crate::RowView`] whose names and strings
    /// borrow from it. For rows whose columns are looked at once and mostly not kept.
    pub fn columns_where_borrowed(
        &mut self,
        keys: Vec<Vec<u8>>,
        filter: &[Condition],
        columns: &[&str],
    ) -> Result<RowSet, String> {
        let bytes = self.call_with(&columns_request(keys, filter, columns), |bytes| Ok(bytes.to_vec()))?;
        RowSet::from_answer(bytes)
    }

    /// Stored rows of `table` with exactly this SHA1 (and DeviceId, if given).
    pub fn lookup(&mut self, table: &str, sha1: &str, device_id: Option<&str>) -> Result<Vec<Row>, String> {
        let req = HostRequest::Lookup {
            table: table.to_string(),
            sha1: sha1.to_string(),
            device_id: device_id.map(str::to_string),
        };
        match self.call(&req)? {
            HostResponse::Rows(rows) => Ok(rows),
            other => Err(format!("host answered Lookup with {other:?}")),
        }
    }

    /// Rows of `table` whose `key` columns equal the given values (ignoring ASCII case)
    /// and that meet every condition, from an index the detector declared in its
    /// manifest (`Manifest::indexes`) on exactly those columns, in that order.
    pub fn lookup_by(&mut self, table: &str, key: &[(&str, &str)], filter: &[Condition]) -> Result<Vec<Row>, String> {
        let req = HostRequest::LookupBy {
            table: table.to_string(),
            key: key.iter().map(|(c, v)| (c.to_string(), v.to_string())).collect(),
            filter: filter.to_vec(),
        };
        match self.call(&req)? {
            HostResponse::Rows(rows) => Ok(rows),
            other => Err(format!("host answered LookupBy with {other:?}")),
        }
    }

    /// [`Context::lookup_where`] for many (SHA1, DeviceId) at once, in one host call: one
    /// row set per look-up, in the same order.
    pub fn lookup_many(
        &mut self,
        table: &str,
        keys: Vec<(String, Option<String>)>,
        filter: &[Condition],
    ) -> Result<Vec<Vec<Row>>, String> {
        let n = keys.len();
        let req = HostRequest::LookupMany { table: table.to_string(), keys, filter: filter.to_vec() };
        match self.call(&req)? {
            HostResponse::RowSets(sets) if sets.len() == n => Ok(sets),
            other => Err(format!("host answered LookupMany of {n} look-ups with {other:?}")),
        }
    }

    /// [`Self::lookup`] keeping only rows that meet every condition; filtered by the host.
    pub fn lookup_where(
        &mut self,
        table: &str,
        sha1: &str,
        device_id: Option<&str>,
        filter: &[Condition],
    ) -> Result<Vec<Row>, String> {
        let req = HostRequest::LookupWhere {
            table: table.to_string(),
            sha1: sha1.to_string(),
            device_id: device_id.map(str::to_string),
            filter: filter.to_vec(),
        };
        match self.call(&req)? {
            HostResponse::Rows(rows) => Ok(rows),
            other => Err(format!("host answered LookupWhere with {other:?}")),
        }
    }

    /// The FileProfile feed row for exactly this SHA1 (Defender's `FileProfile()`).
    pub fn profile(&mut self, sha1: &str) -> Result<Option<Row>, String> {
        match self.call(&HostRequest::Profile(sha1.to_string()))? {
            HostResponse::Profile(p) => Ok(p),
            other => Err(format!("host answered Profile with {other:?}")),
        }
    }

    /// The FileProfile rows of several SHA1s (in the same order), in one call.
    pub fn profiles(&mut self, sha1s: Vec<String>) -> Result<Vec<Option<Row>>, String> {
        let n = sha1s.len();
        match self.call(&HostRequest::Profiles(sha1s))? {
            HostResponse::Profiles(p) if p.len() == n => Ok(p),
            other => Err(format!("host answered Profiles for {n} SHA1s with {other:?}")),
        }
    }

    pub fn emit(&mut self, finding: FindingOut) {
        let inputs: Vec<&[u8]> = finding.inputs.iter().map(Vec::as_slice).collect();
        let row = finding.row.iter().map(|(name, cell)| (name.as_str(), cell.into()));
        self.findings.push(&inputs, &finding.device_id, &finding.device_name, row);
    }

    /// [`Context::emit`] of a finding whose output row is borrowed from wherever its cells
    /// are (the rows it joins): written into the answer at once, nothing cloned.
    pub fn emit_borrowed<'c>(
        &mut self,
        inputs: &[&[u8]],
        device_id: &str,
        device_name: &str,
        row: impl IntoIterator<Item = (&'c str, CellRef<'c>)>,
    ) {
        self.findings.push(inputs, device_id, device_name, row);
    }

    pub fn state_put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.state.push(StateOp::Put(key, value));
    }

    pub fn state_delete(&mut self, key: Vec<u8>) {
        self.state.push(StateOp::Delete(key));
    }

    /// Replaces the detector's input specs from the next pass on (see
    /// [`crate::Detector::inputs`]); committed with this pass.
    pub fn set_inputs(&mut self, inputs: Vec<InputSpec>) {
        self.inputs = Some(inputs);
    }

    /// Asks for a pass at `at` (ticks) even if no row arrives by then: the time the clock
    /// alone next changes a result (a row leaving an `ago(x)` window). Several calls keep
    /// the earliest after this pass's time (one at or before it is ignored); a pass that
    /// makes none asks for nothing.
    pub fn wake_at(&mut self, at: i64) {
        // A time at or before this pass's changes nothing this pass has not seen.
        if at > self.now {
            self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
        }
    }

    fn call(&mut self, req: &HostRequest) -> Result<HostResponse, String> {
        self.call_with(req, |bytes| match crate::wire::decode_host_response(bytes)? {
            HostResponse::Error(e) => Err(e),
            ok => Ok(ok),
        })
    }

    /// Hands `req` to the host and `read`s its answer's bytes (a failed call is an error).
    fn call_with<R>(&mut self, req: &HostRequest, read: impl FnOnce(&[u8]) -> Result<R, String>) -> Result<R, String> {
        let host = self.host.ok_or("no host callback in this context")?;
        let input = crate::wire::encode_host_request(req)?;
        crate::export::call_host(host, &input, |rc, bytes| {
            if rc != RC_OK {
                return Err(format!("host call failed: {}", String::from_utf8_lossy(bytes)));
            }
            read(bytes)
        })
    }
}

/// The request of [`Context::columns_where`] and [`Context::columns_where_borrowed`].
fn columns_request(keys: Vec<Vec<u8>>, filter: &[Condition], columns: &[&str]) -> HostRequest {
    HostRequest::GetColumnsWhere {
        keys,
        filter: filter.to_vec(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
    }
}

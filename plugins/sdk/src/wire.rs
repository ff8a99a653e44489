//! bincode's standard layout written by hand, for the bytes the host builds without going
//! through serde: the cells of a stored row, and the rows of an answer to a plugin.
//!
//! Why by hand: the host reads rows out of the store as borrowed cells and hands them to
//! a plugin as a [`HostResponse`]. Building a [`Row`] for each (a `String` per column
//! name and value) only for serde to copy it into the payload and drop it again was a
//! fifth of a look-up's time in an attack-dense pass. The tests check every function
//! here against [`abi::encode`] of the same values, so a plugin decodes these bytes with
//! the same [`abi::decode`] as any payload.
//!
//! [`HostResponse`]: crate::abi::HostResponse
//! [`Row`]: crate::Row
//! [`abi::encode`]: crate::abi::encode
//! [`abi::decode`]: crate::abi::decode

use crate::abi::{
    EvalRequest, EvalResponseRef, FindingRef, HostRequest, HostResponse, RowRef, StateOpRef, PAYLOAD_VERSION,
};
use crate::{Cell, CellRef, Row, RowView};

/// bincode's varint (standard configuration) of `v`, and how many bytes of the array it
/// takes: one byte below 251, else a marker byte and the value little-endian in 2, 4 or 8
/// bytes.
pub fn varint(v: u64) -> ([u8; 9], usize) {
    let mut b = [0u8; 9];
    if v < 251 {
        b[0] = v as u8;
        (b, 1)
    } else if v <= u64::from(u16::MAX) {
        b[0] = 251;
        b[1..3].copy_from_slice(&(v as u16).to_le_bytes());
        (b, 3)
    } else if v <= u64::from(u32::MAX) {
        b[0] = 252;
        b[1..5].copy_from_slice(&(v as u32).to_le_bytes());
        (b, 5)
    } else {
        b[0] = 253;
        b[1..9].copy_from_slice(&v.to_le_bytes());
        (b, 9)
    }
}

pub fn put_varint(out: &mut Vec<u8>, v: u64) {
    // Nearly every length and most integers fit the one-byte form: no array, no copy.
    if v < 251 {
        out.push(v as u8);
        return;
    }
    let (b, n) = varint(v);
    out.extend_from_slice(&b[..n]);
}

/// bincode's zigzag mapping of a signed integer onto its varint.
pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// A string (or a `Vec<u8>`, which serde writes as a sequence of bytes): its length, then
/// its bytes.
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The first byte of an encoded cell: bincode's index of the [`crate::Cell`] variant.
pub mod cell_tag {
    pub const NULL: u8 = 0;
    pub const BOOL: u8 = 1;
    pub const INT: u8 = 2;
    pub const FLOAT: u8 = 3;
    pub const STR: u8 = 4;
    pub const JSON: u8 = 5;
}

/// One cell as bincode writes a [`crate::Cell`]: the variant index, then its value.
pub fn put_cell(out: &mut Vec<u8>, cell: CellRef<'_>) {
    match cell {
        CellRef::Null => out.push(cell_tag::NULL),
        CellRef::Bool(b) => out.extend_from_slice(&[cell_tag::BOOL, u8::from(b)]),
        CellRef::Int(i) => {
            out.push(cell_tag::INT);
            put_varint(out, zigzag(i));
        }
        CellRef::Float(f) => {
            out.push(cell_tag::FLOAT);
            out.extend_from_slice(&f.to_le_bytes());
        }
        CellRef::Str(s) => {
            out.push(cell_tag::STR);
            put_bytes(out, s.as_bytes());
        }
        CellRef::Json(s) => {
            out.push(cell_tag::JSON);
            put_bytes(out, s.as_bytes());
        }
    }
}

/// One [`crate::Row`] as bincode writes it, built from borrowed parts.
#[derive(Debug, Clone, PartialEq)]
pub struct RowBytes(Vec<u8>);

impl RowBytes {
    /// The row with these columns, in order.
    pub fn new<'c>(
        table: &str,
        key: &[u8],
        ingested_at: i64,
        columns: impl IntoIterator<Item = (&'c str, CellRef<'c>)>,
    ) -> RowBytes {
        // Written into a buffer kept between rows, then copied out at its size: a row
        // written straight into a new vector grew it several times over.
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|scratch| {
            let mut out = scratch.borrow_mut();
            out.clear();
            put_bytes(&mut out, table.as_bytes());
            put_bytes(&mut out, key);
            put_varint(&mut out, zigzag(ingested_at));
            // The column count goes in front of the columns once they are counted (a
            // shift of the row's bytes, not a second pass over its cells).
            let count_at = out.len();
            let mut count = 0u64;
            for (name, cell) in columns {
                put_bytes(&mut out, name.as_bytes());
                put_cell(&mut out, cell);
                count += 1;
            }
            let (bytes, len) = varint(count);
            let mut row = Vec::with_capacity(out.len() + len);
            row.extend_from_slice(&out[..count_at]);
            row.extend_from_slice(&bytes[..len]);
            row.extend_from_slice(&out[count_at..]);
            RowBytes(row)
        })
    }

    /// The row with these columns, in order, each cell given as [`put_cell`] writes it
    /// (a stored cell, copied as it is: the host's fetches hand a plugin its cells without
    /// decoding them, and the plugin checks a string as UTF-8 where it reads it). The row
    /// is written once, into a vector of its exact size.
    pub fn from_encoded<'c>(
        table: &str,
        key: &[u8],
        ingested_at: i64,
        columns: impl Iterator<Item = (&'c str, &'c [u8])> + Clone,
    ) -> RowBytes {
        let sized = |len: usize| varint(len as u64).1 + len;
        let (at, at_len) = varint(zigzag(ingested_at));
        let (mut count, mut size) = (0u64, sized(table.len()) + sized(key.len()) + at_len);
        for (name, cell) in columns.clone() {
            count += 1;
            size += sized(name.len()) + cell.len();
        }
        let (count_bytes, count_len) = varint(count);
        let mut row = Vec::with_capacity(size + count_len);
        put_bytes(&mut row, table.as_bytes());
        put_bytes(&mut row, key);
        row.extend_from_slice(&at[..at_len]);
        row.extend_from_slice(&count_bytes[..count_len]);
        for (name, cell) in columns {
            put_bytes(&mut row, name.as_bytes());
            row.extend_from_slice(cell);
        }
        RowBytes(row)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The variant indexes of [`crate::HostResponse`], in its declaration order (and
/// `Error`, 4, below).
const ROWS: u64 = 0;
/// [`crate::StateOp`]'s variants as serde numbers them (a byte each: below 251).
const STATE_PUT_VARIANT: u64 = 0;
const STATE_DELETE_VARIANT: u64 = 1;
const STATE_PUT: u8 = STATE_PUT_VARIANT as u8;
const STATE_DELETE: u8 = STATE_DELETE_VARIANT as u8;
const ROW_SETS: u64 = 1;
const PROFILE: u64 = 2;
const PROFILES: u64 = 3;

/// A payload's start: the version byte and the answer's variant, in a buffer of exactly
/// the payload's size (the host hands it over as a boxed slice, which a spare capacity
/// would make it copy).
fn answer(variant: u64, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + varint(variant).1 + body);
    out.push(PAYLOAD_VERSION);
    put_varint(&mut out, variant);
    out
}

/// The size of a sequence of rows: its count, then the rows.
fn rows_size(rows: &[RowBytes]) -> usize {
    varint(rows.len() as u64).1 + rows.iter().map(|r| r.0.len()).sum::<usize>()
}

fn put_rows(out: &mut Vec<u8>, rows: &[RowBytes]) {
    put_varint(out, rows.len() as u64);
    for row in rows {
        out.extend_from_slice(&row.0);
    }
}

/// The payload of `HostResponse::Rows(rows)`.
pub fn rows_answer(rows: &[RowBytes]) -> Vec<u8> {
    let mut out = answer(ROWS, rows_size(rows));
    put_rows(&mut out, rows);
    out
}

/// The payload of `HostResponse::RowSets(sets)`.
pub fn row_sets_answer(sets: &[Vec<RowBytes>]) -> Vec<u8> {
    let body = varint(sets.len() as u64).1 + sets.iter().map(|s| rows_size(s)).sum::<usize>();
    let mut out = answer(ROW_SETS, body);
    put_varint(&mut out, sets.len() as u64);
    for set in sets {
        put_rows(&mut out, set);
    }
    out
}

fn option_size(row: Option<&RowBytes>) -> usize {
    1 + row.map_or(0, |r| r.0.len())
}

fn put_option(out: &mut Vec<u8>, row: Option<&RowBytes>) {
    match row {
        None => out.push(0),
        Some(row) => {
            out.push(1);
            out.extend_from_slice(&row.0);
        }
    }
}

/// The payload of `HostResponse::Profile(row)`.
pub fn profile_answer(row: Option<&RowBytes>) -> Vec<u8> {
    let mut out = answer(PROFILE, option_size(row));
    put_option(&mut out, row);
    out
}

/// The payload of `HostResponse::Profiles(rows)`.
pub fn profiles_answer(rows: &[Option<RowBytes>]) -> Vec<u8> {
    let body = varint(rows.len() as u64).1 + rows.iter().map(|r| option_size(r.as_ref())).sum::<usize>();
    let mut out = answer(PROFILES, body);
    put_varint(&mut out, rows.len() as u64);
    for row in rows {
        put_option(&mut out, row.as_ref());
    }
    out
}

/// The findings of a pass, written as bincode writes a `Vec<FindingOut>`'s items as they
/// are emitted: a finding's output row (~100 columns) is written from wherever its cells
/// are, not cloned into a [`crate::FindingOut`] first.
///
/// The bytes start with room for the payload's version byte and the findings' count,
/// so that they become the payload where they are (a pass's findings are hundreds of
/// KiB: a copy of them is as much fresh memory).
#[derive(Debug, Clone)]
pub struct Findings {
    count: u64,
    bytes: Vec<u8>,
}

/// Room for the version byte and the widest varint.
const HEADER: usize = 10;

impl Default for Findings {
    fn default() -> Findings {
        Findings { count: 0, bytes: vec![0; HEADER] }
    }
}

impl Findings {
    /// One finding: the keys of its input rows, its device, its output row in column
    /// order.
    pub fn push<'c>(
        &mut self,
        inputs: &[&[u8]],
        device_id: &str,
        device_name: &str,
        row: impl IntoIterator<Item = (&'c str, CellRef<'c>)>,
    ) {
        let out = &mut self.bytes;
        put_varint(out, inputs.len() as u64);
        for input in inputs {
            put_bytes(out, input);
        }
        put_bytes(out, device_id.as_bytes());
        put_bytes(out, device_name.as_bytes());
        let count_at = out.len();
        let mut count = 0u64;
        for (name, cell) in row {
            put_bytes(out, name.as_bytes());
            put_cell(out, cell);
            count += 1;
        }
        let (bytes, len) = varint(count);
        out.splice(count_at..count_at, bytes[..len].iter().copied());
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The payload of an [`crate::EvalResponse`] with these findings: the bytes
/// [`crate::abi::encode`] writes for it, in the findings' own buffer.
pub fn eval_response(
    findings: Findings,
    state: &[crate::StateOp],
    inputs: &Option<Vec<crate::InputSpec>>,
    wake_at: Option<i64>,
) -> Result<Vec<u8>, String> {
    // The fields after `findings`, as serde writes a struct: one after the other. The
    // state (hundreds of changes a pass) by hand, the rest (small) through serde.
    let rest = (inputs, wake_at);
    let config = bincode::config::standard();
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(rest, &mut size, config).map_err(|e| format!("cannot encode payload: {e}"))?;
    let state_size: usize = state
        .iter()
        .map(|op| match op {
            crate::StateOp::Put(k, v) => 1 + 9 + k.len() + 9 + v.len(),
            crate::StateOp::Delete(k) => 1 + 9 + k.len(),
        })
        .sum();
    let Findings { count, bytes: mut out } = findings;
    let (count, count_len) = varint(count);
    let start = HEADER - 1 - count_len;
    out[start] = PAYLOAD_VERSION;
    out[start + 1..HEADER].copy_from_slice(&count[..count_len]);
    out.reserve_exact(9 + state_size + size.bytes_written);
    put_varint(&mut out, state.len() as u64);
    for op in state {
        match op {
            crate::StateOp::Put(k, v) => {
                out.push(STATE_PUT);
                put_bytes(&mut out, k);
                put_bytes(&mut out, v);
            }
            crate::StateOp::Delete(k) => {
                out.push(STATE_DELETE);
                put_bytes(&mut out, k);
            }
        }
    }
    bincode::serde::encode_into_std_write(rest, &mut out, config).map_err(|e| format!("cannot encode payload: {e}"))?;
    out.drain(..start);
    Ok(out)
}

/// A host's answer read back: what [`crate::abi::decode`] gives for a
/// [`crate::HostResponse`], read by hand. serde's visitors were half the time a plugin
/// spent decoding the rows it asked for; the strings it allocates are the rest.
pub fn decode_host_response(bytes: &[u8]) -> Result<HostResponse, String> {
    let mut r = Reader { bytes: crate::abi::payload_body(bytes)?, at: 0 };
    let answer = match r.varint()? {
        ROWS => HostResponse::Rows(r.rows()?),
        ROW_SETS => HostResponse::RowSets(r.seq(1, Reader::rows)?),
        PROFILE => HostResponse::Profile(r.option_row()?),
        PROFILES => HostResponse::Profiles(r.seq(1, Reader::option_row)?),
        ERROR => HostResponse::Error(r.string()?),
        v => return Err(format!("cannot decode payload: unknown answer variant {v}")),
    };
    if r.at != r.bytes.len() {
        return Err(format!("payload has {} trailing bytes", r.bytes.len() - r.at));
    }
    Ok(answer)
}

const ERROR: u64 = 4;

/// A host's rows answer kept as its bytes, its rows read in place as [`RowView`]s (see
/// [`crate::Context::columns_where_borrowed`]): the strings a [`Row`] allocates for every
/// column name and value were most of a plugin's time spent taking an answer in.
pub struct RowSet {
    bytes: Vec<u8>,
}

impl RowSet {
    /// The answer's bytes, as the host wrote them: rows, or an error (returned).
    pub(crate) fn from_answer(bytes: Vec<u8>) -> Result<RowSet, String> {
        let mut r = Reader { bytes: crate::abi::payload_body(&bytes)?, at: 0 };
        match r.varint()? {
            ROWS => Ok(RowSet { bytes }),
            ERROR => Err(r.string()?),
            v => Err(format!("host answered a row request with answer variant {v}")),
        }
    }

    /// The rows, in the order the host answered them.
    pub fn rows(&self) -> Result<Vec<RowView<'_>>, String> {
        let mut r = Reader { bytes: crate::abi::payload_body(&self.bytes)?, at: 0 };
        r.varint()?;
        // A row is at least its table's and key's lengths, its time and column count.
        let n = r.len(4)?;
        let mut rows: Vec<RowView<'_>> = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let row = r.row_view(rows.last())?;
            rows.push(row);
        }
        if r.at != r.bytes.len() {
            return Err(format!("payload has {} trailing bytes", r.bytes.len() - r.at));
        }
        Ok(rows)
    }
}

/// A plugin's answer to a pass read in place, as [`crate::abi::decode_borrowed`] reads an
/// [`EvalResponseRef`], its findings and state by hand (serde's visitors were most of the
/// time a host spent reading a hundred findings of ~100 columns), the input specs and
/// wake-up through serde.
pub fn decode_eval_response(bytes: &[u8]) -> Result<EvalResponseRef<'_>, String> {
    let mut r = Reader { bytes: crate::abi::payload_body(bytes)?, at: 0 };
    // A finding is at least its four lengths; a column, a name's length and a variant.
    let findings = r.seq(4, |r| {
        Ok(FindingRef {
            inputs: r.seq(1, Reader::slice)?,
            device_id: r.str()?,
            device_name: r.str()?,
            row: r.seq(2, |r| Ok((r.str()?, r.cell_ref()?)))?,
        })
    })?;
    let state = r.seq(2, |r| match r.varint()? {
        STATE_PUT_VARIANT => Ok(StateOpRef::Put(r.slice()?, r.slice()?)),
        STATE_DELETE_VARIANT => Ok(StateOpRef::Delete(r.slice()?)),
        v => Err(format!("cannot decode payload: unknown state operation {v}")),
    })?;
    let (inputs, wake_at) =
        crate::abi::decode_body_small::<(Option<Vec<crate::InputSpec>>, Option<i64>)>(&r.bytes[r.at..])?;
    Ok(EvalResponseRef { findings, state, inputs, wake_at })
}

/// A pass's request as [`crate::abi::encode`] writes it, by hand: serde writes each row
/// key a byte at a time, and sizes the payload in a first walk over it (a tenth of the
/// host's share of a pass over a few hundred rows).
pub fn encode_eval_request(req: &EvalRequest) -> Vec<u8> {
    let size: usize =
        req.rows.iter().map(|r| 4 * 9 + r.table.len() + r.sha1.len() + r.device_id.len() + r.key.len()).sum();
    let mut out = Vec::with_capacity(1 + 10 + 1 + 9 + size + 1);
    out.push(PAYLOAD_VERSION);
    put_varint(&mut out, zigzag(req.now));
    out.push(u8::from(req.backfill));
    put_varint(&mut out, req.rows.len() as u64);
    for r in &req.rows {
        put_bytes(&mut out, r.table.as_bytes());
        put_bytes(&mut out, r.sha1.as_bytes());
        put_bytes(&mut out, r.device_id.as_bytes());
        put_bytes(&mut out, &r.key);
    }
    out.push(u8::from(req.last));
    out
}

/// A pass's request read by hand: what [`crate::abi::decode`] gives for an
/// [`EvalRequest`], without serde's visitors, which were a twentieth of the instructions
/// of a pass over a few hundred rows.
pub fn decode_eval_request(bytes: &[u8]) -> Result<EvalRequest, String> {
    let mut r = Reader { bytes: crate::abi::payload_body(bytes)?, at: 0 };
    let now = r.i64()?;
    let backfill = r.bool()?;
    // A row reference is at least its four lengths.
    let rows = r.seq(4, |r| {
        Ok(RowRef { table: r.string()?, sha1: r.string()?, device_id: r.string()?, key: r.slice()?.to_vec() })
    })?;
    let last = r.bool()?;
    if r.at != r.bytes.len() {
        return Err(format!("payload has {} trailing bytes", r.bytes.len() - r.at));
    }
    Ok(EvalRequest { now, backfill, rows, last })
}

/// bincode's variant indexes of the [`HostRequest`]s that carry a list of row keys.
mod request_variant {
    pub const GET_ROWS: u64 = 0;
    pub const GET_ROWS_WHERE: u64 = 1;
    pub const GET_COLUMNS_WHERE: u64 = 2;
}

/// A host request as [`crate::abi::encode`] writes it, the row keys of a fetch written
/// by hand: serde writes a `Vec<u8>` a byte at a time, and a fetch of a few hundred rows
/// carries tens of kilobytes of keys (encoding and decoding them byte by byte was a
/// twentieth of a pass's instructions).
pub fn encode_host_request(req: &HostRequest) -> Result<Vec<u8>, String> {
    let (variant, keys) = match req {
        HostRequest::GetRows(keys) => (request_variant::GET_ROWS, keys),
        HostRequest::GetRowsWhere { keys, .. } => (request_variant::GET_ROWS_WHERE, keys),
        HostRequest::GetColumnsWhere { keys, .. } => (request_variant::GET_COLUMNS_WHERE, keys),
        other => return crate::abi::encode(other),
    };
    let size: usize = keys.iter().map(|k| 9 + k.len()).sum();
    let mut out = Vec::with_capacity(1 + 9 + size + 256);
    out.push(PAYLOAD_VERSION);
    put_varint(&mut out, variant);
    put_varint(&mut out, keys.len() as u64);
    for k in keys {
        put_bytes(&mut out, k);
    }
    match req {
        HostRequest::GetRowsWhere { filter, .. } => crate::abi::encode_body_into(filter, &mut out)?,
        HostRequest::GetColumnsWhere { filter, columns, .. } => {
            crate::abi::encode_body_into(&(filter, columns), &mut out)?
        }
        _ => {}
    }
    Ok(out)
}

/// A host request, read as [`crate::abi::decode`] reads it, the row keys of a fetch by
/// hand (see [`encode_host_request`]).
pub fn decode_host_request(bytes: &[u8]) -> Result<HostRequest, String> {
    let body = crate::abi::payload_body(bytes)?;
    let mut r = Reader { bytes: body, at: 0 };
    let variant = r.varint()?;
    if ![request_variant::GET_ROWS, request_variant::GET_ROWS_WHERE, request_variant::GET_COLUMNS_WHERE]
        .contains(&variant)
    {
        return crate::abi::decode_small(bytes);
    }
    let keys = r.seq(1, |r| Ok(r.slice()?.to_vec()))?;
    let rest = &body[r.at..];
    Ok(match variant {
        request_variant::GET_ROWS => {
            if !rest.is_empty() {
                return Err(format!("payload has {} trailing bytes", rest.len()));
            }
            HostRequest::GetRows(keys)
        }
        request_variant::GET_ROWS_WHERE => {
            HostRequest::GetRowsWhere { keys, filter: crate::abi::decode_body_small(rest)? }
        }
        _ => {
            let (filter, columns) = crate::abi::decode_body_small(rest)?;
            HostRequest::GetColumnsWhere { keys, filter, columns }
        }
    })
}

/// A cursor over bincode's standard layout.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let Some(end) = end else { return Err("cannot decode payload: it ends early".to_string()) };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn bool(&mut self) -> Result<bool, String> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("cannot decode payload: bool {b}")),
        }
    }

    fn i64(&mut self) -> Result<i64, String> {
        let z = self.varint()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    fn varint(&mut self) -> Result<u64, String> {
        let le = |b: &[u8]| b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x));
        Ok(match self.byte()? {
            b @ 0..=250 => u64::from(b),
            251 => le(self.take(2)?),
            252 => le(self.take(4)?),
            253 => le(self.take(8)?),
            b => return Err(format!("cannot decode payload: varint marker {b}")),
        })
    }

    /// A length of items of at least `min` bytes each: one that the rest of the payload
    /// cannot hold is refused before anything is allocated for it.
    fn len(&mut self, min: usize) -> Result<usize, String> {
        let n = self.varint()?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min) <= self.bytes.len() - self.at => Ok(n),
            _ => Err(format!("cannot decode payload: a length of {n} runs past its end")),
        }
    }

    /// A sequence of items of at least `min` bytes each.
    fn seq<T>(&mut self, min: usize, mut item: impl FnMut(&mut Self) -> Result<T, String>) -> Result<Vec<T>, String> {
        let n = self.len(min)?;
        // `n` is bounded by the bytes left over each item's least size, but an item can
        // take many times its least size in memory: reserve a bounded start, grow as read.
        let mut out = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }

    fn slice(&mut self) -> Result<&'a [u8], String> {
        let n = self.len(1)?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.slice()?).map_err(|e| format!("cannot decode payload: {e}"))
    }

    fn string(&mut self) -> Result<String, String> {
        Ok(self.str()?.to_string())
    }

    /// A cell, its strings borrowed.
    fn cell_ref(&mut self) -> Result<CellRef<'a>, String> {
        let v = self.varint()?;
        Ok(match u8::try_from(v).unwrap_or(u8::MAX) {
            cell_tag::NULL => CellRef::Null,
            cell_tag::BOOL => CellRef::Bool(match self.byte()? {
                0 => false,
                1 => true,
                b => return Err(format!("cannot decode payload: bool {b}")),
            }),
            cell_tag::INT => {
                let z = self.varint()?;
                CellRef::Int(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            cell_tag::FLOAT => {
                let b = self.take(8)?;
                CellRef::Float(f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            }
            cell_tag::STR => CellRef::Str(self.str()?),
            cell_tag::JSON => CellRef::Json(self.str()?),
            _ => return Err(format!("cannot decode payload: unknown cell variant {v}")),
        })
    }

    fn cell(&mut self) -> Result<Cell, String> {
        Ok(Cell::from(self.cell_ref()?))
    }

    /// A row, read in place. The rows of an answer mostly repeat one table and one column
    /// list: a table or column name with the bytes of the `previous` row's (at the same
    /// place) is that row's string, not checked as UTF-8 again (the names were a third of
    /// the strings a detector's fetches checked).
    fn row_view(&mut self, previous: Option<&RowView<'a>>) -> Result<RowView<'a>, String> {
        let table = self.str_like(previous.map(|p| p.table))?;
        let key = self.slice()?;
        let z = self.varint()?;
        let ingested_at = ((z >> 1) as i64) ^ -((z & 1) as i64);
        // A column is at least a name's length and a cell's variant.
        let n = self.len(2)?;
        let mut columns = Vec::with_capacity(n.min(4096));
        for i in 0..n {
            let name = self.str_like(previous.and_then(|p| p.columns.get(i)).map(|(name, _)| *name))?;
            columns.push((name, self.cell_ref()?));
        }
        Ok(RowView { table, key, ingested_at, columns })
    }

    /// The next string: `known` when its bytes are the same (a string already checked),
    /// else checked as UTF-8.
    fn str_like(&mut self, known: Option<&'a str>) -> Result<&'a str, String> {
        let bytes = self.slice()?;
        match known {
            Some(k) if k.as_bytes() == bytes => Ok(k),
            _ => std::str::from_utf8(bytes).map_err(|e| format!("cannot decode payload: {e}")),
        }
    }

    fn row(&mut self) -> Result<Row, String> {
        let table = self.string()?;
        let key = self.slice()?.to_vec();
        let z = self.varint()?;
        let ingested_at = ((z >> 1) as i64) ^ -((z & 1) as i64);
        // A column is at least a name's length and a cell's variant.
        let columns = self.seq(2, |r| Ok((r.string()?, r.cell()?)))?;
        Ok(Row { table, key, ingested_at, columns })
    }

    fn rows(&mut self) -> Result<Vec<Row>, String> {
        // A row is at least its table's and key's lengths, its time and column count.
        self.seq(4, Reader::row)
    }

    fn option_row(&mut self) -> Result<Option<Row>, String> {
        match self.byte()? {
            0 => Ok(None),
            1 => Ok(Some(self.row()?)),
            b => Err(format!("cannot decode payload: option tag {b}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{encode, HostResponse};
    use crate::{Cell, Row};

    fn row(n: usize, long: usize, ingested_at: i64) -> Row {
        let mut columns = vec![
            ("Null".to_string(), Cell::Null),
            ("Yes".to_string(), Cell::Bool(true)),
            ("No".to_string(), Cell::Bool(false)),
            ("Small".to_string(), Cell::Int(-3)),
            ("Wide".to_string(), Cell::Int(i64::MIN)),
            ("Mid".to_string(), Cell::Int(70_000)),
            ("Float".to_string(), Cell::Float(-1.5e300)),
            ("Str".to_string(), Cell::Str("x".repeat(long))),
            ("Json".to_string(), Cell::Json("{\"a\":[1,2]}".into())),
            ("é".repeat(long / 2), Cell::Str("ü".into())),
        ];
        columns.extend((0..n).map(|i| (format!("C{i}"), Cell::Int(i as i64 * 1000))));
        Row { table: "DeviceFileEvents".into(), key: vec![7u8; long % 300], ingested_at, columns }
    }

    fn bytes_of(row: &Row) -> RowBytes {
        RowBytes::new(&row.table, &row.key, row.ingested_at, row.columns.iter().map(|(n, c)| (n.as_str(), c.into())))
    }

    #[test]
    fn requests_written_and_read_by_hand_are_what_serde_writes_and_reads() {
        let row = |n: usize| RowRef {
            table: "DeviceLogonEvents".into(),
            sha1: "é".repeat(n % 3),
            device_id: format!("d{n}"),
            key: vec![n as u8; n % 300],
        };
        for (now, backfill, rows, last) in [
            (0, false, 0, true),
            (i64::MIN, true, 1, false),
            (i64::MAX, false, 300, true),
            (-638_000_000_000_000_000, true, 70, false),
        ] {
            let req = EvalRequest { now, backfill, rows: (0..rows).map(row).collect(), last };
            let bytes = encode(&req).unwrap();
            assert_eq!(encode_eval_request(&req), bytes, "written by hand as serde writes it");
            assert_eq!(decode_eval_request(&bytes).unwrap(), req);
            for cut in [1, bytes.len() / 2, bytes.len() - 1] {
                assert!(decode_eval_request(&bytes[..cut]).is_err(), "cut at {cut}");
                assert!(crate::abi::decode::<EvalRequest>(&bytes[..cut]).is_err());
            }
            let mut long = bytes.clone();
            long.push(0);
            assert!(decode_eval_request(&long).is_err(), "trailing bytes");
        }
        let mut bad_bool = encode(&EvalRequest { now: 1, backfill: false, rows: vec![], last: true }).unwrap();
        bad_bool[2] = 2;
        assert!(decode_eval_request(&bad_bool).is_err());
        assert!(crate::abi::decode::<EvalRequest>(&bad_bool).is_err());
    }

    /// A row written from its cells as stored (each as `put_cell` writes it) is the row
    /// written from the cells, for every kind of cell, long names and strings, many columns.
    #[test]
    fn a_row_from_encoded_cells_is_the_row_from_the_cells() {
        for (n, long, at) in [(0, 0, 0), (3, 250, -1), (300, 251, 1 << 40), (2, 70_000, i64::MIN)] {
            let row = row(n, long, at);
            let cells: Vec<(&str, Vec<u8>)> = row
                .columns
                .iter()
                .map(|(name, cell)| {
                    let mut encoded = Vec::new();
                    put_cell(&mut encoded, cell.into());
                    (name.as_str(), encoded)
                })
                .collect();
            let encoded = RowBytes::from_encoded(
                &row.table,
                &row.key,
                row.ingested_at,
                cells.iter().map(|(name, cell)| (*name, cell.as_slice())),
            );
            assert_eq!(encoded, bytes_of(&row), "{n} columns more, strings of {long}");
            assert_eq!(encoded.as_bytes().len(), encoded.0.capacity(), "written into a vector of its size");
        }
        let empty = RowBytes::from_encoded("T", b"", 5, std::iter::empty());
        assert_eq!(empty, RowBytes::new("T", b"", 5, std::iter::empty()));
    }

    #[test]
    fn a_row_set_reads_the_rows_an_answer_decodes_to() {
        let rows: Vec<Row> = [(0, 0, 0), (3, 250, -1), (300, 251, 1 << 40), (2, 70_000, i64::MIN)]
            .into_iter()
            .map(|(n, long, at)| row(n, long, at))
            .collect();
        let bytes: Vec<RowBytes> = rows.iter().map(bytes_of).collect();
        let set = RowSet::from_answer(rows_answer(&bytes)).unwrap();
        let views = set.rows().unwrap();
        assert_eq!(views.iter().map(RowView::to_row).collect::<Vec<_>>(), rows);
        assert_eq!(views[1].str("Str"), "x".repeat(250));
        assert_eq!((views[1].str("Small"), views[1].get("Small")), ("", Some(CellRef::Int(-3))));
        assert_eq!(views[1].get("Absent"), None);
        assert!(RowSet::from_answer(rows_answer(&[])).unwrap().rows().unwrap().is_empty());
        let error = encode(&HostResponse::Error("store error: é".into())).unwrap();
        assert_eq!(RowSet::from_answer(error).err(), Some("store error: é".to_string()));
        let profile = encode(&HostResponse::Profile(None)).unwrap();
        assert!(RowSet::from_answer(profile).is_err(), "not a rows answer");
        let mut long = rows_answer(&bytes);
        long.push(0);
        assert!(RowSet::from_answer(long).unwrap().rows().is_err(), "trailing bytes");
        let mut short = rows_answer(&bytes);
        short.pop();
        assert!(RowSet::from_answer(short).unwrap().rows().is_err(), "cut short");
        // Rows repeating the previous row's table and names (taken from it, not checked
        // again) read as the rows; a name that is not UTF-8 after a row of the same
        // length of name is still refused, and so is a table.
        let same: Vec<Row> = (0..3).map(|i| row(2, 10 + i, i as i64)).collect();
        let same_bytes: Vec<RowBytes> = same.iter().map(bytes_of).collect();
        let set = RowSet::from_answer(rows_answer(&same_bytes)).unwrap();
        assert_eq!(set.rows().unwrap().iter().map(RowView::to_row).collect::<Vec<_>>(), same);
        for bad in ["Yes", "DeviceFileEvents"] {
            let mut answer = rows_answer(&same_bytes);
            let last_row = answer.len() - same_bytes[2].as_bytes().len();
            let at = last_row + answer[last_row..].windows(bad.len()).position(|w| w == bad.as_bytes()).unwrap();
            answer[at] = 0xff;
            assert!(RowSet::from_answer(answer).unwrap().rows().is_err(), "{bad} not UTF-8 in the third row");
        }
    }

    #[test]
    fn answers_written_by_hand_are_the_bytes_serde_writes() {
        // Lengths and counts on each side of every varint width.
        let rows: Vec<Row> =
            [(0, 0, 0), (3, 250, -1), (300, 251, 1 << 40), (2, 70_000, i64::MAX), (0, 65_535, i64::MIN)]
                .into_iter()
                .map(|(n, long, at)| row(n, long, at))
                .collect();
        let bytes: Vec<RowBytes> = rows.iter().map(bytes_of).collect();
        let answer = rows_answer(&bytes);
        assert_eq!(answer, encode(&HostResponse::Rows(rows.clone())).unwrap());
        assert_eq!(answer.capacity(), answer.len(), "sized exactly");
        assert_eq!(rows_answer(&[]), encode(&HostResponse::Rows(Vec::new())).unwrap());
        let sets = vec![rows.clone(), Vec::new(), rows[1..3].to_vec()];
        let set_bytes: Vec<Vec<RowBytes>> = sets.iter().map(|s| s.iter().map(bytes_of).collect()).collect();
        assert_eq!(row_sets_answer(&set_bytes), encode(&HostResponse::RowSets(sets)).unwrap());
        let many: Vec<Vec<Row>> = (0..300).map(|i| if i % 2 == 0 { vec![row(0, 1, i)] } else { vec![] }).collect();
        let many_bytes: Vec<Vec<RowBytes>> = many.iter().map(|s| s.iter().map(bytes_of).collect()).collect();
        assert_eq!(row_sets_answer(&many_bytes), encode(&HostResponse::RowSets(many)).unwrap());
        assert_eq!(profile_answer(None), encode(&HostResponse::Profile(None)).unwrap());
        assert_eq!(profile_answer(Some(&bytes[1])), encode(&HostResponse::Profile(Some(rows[1].clone()))).unwrap());
        let profiles = vec![Some(rows[0].clone()), None, Some(rows[3].clone())];
        let profile_bytes: Vec<Option<RowBytes>> = profiles.iter().map(|p| p.as_ref().map(bytes_of)).collect();
        assert_eq!(profiles_answer(&profile_bytes), encode(&HostResponse::Profiles(profiles)).unwrap());
    }

    #[test]
    fn varints_take_the_widths_bincode_gives_them() {
        for (v, len) in [(0, 1), (250, 1), (251, 3), (65_535, 3), (65_536, 5), (u64::from(u32::MAX), 5), (1 << 32, 9)] {
            assert_eq!(varint(v).1, len, "{v}");
            let config = bincode::config::standard();
            assert_eq!(&varint(v).0[..len], bincode::serde::encode_to_vec(v, config).unwrap().as_slice(), "{v}");
        }
    }

    fn answers() -> Vec<HostResponse> {
        let rows: Vec<Row> =
            [(0, 0, 0), (3, 250, -1), (300, 251, 1 << 40), (2, 70_000, i64::MAX), (0, 65_535, i64::MIN)]
                .into_iter()
                .map(|(n, long, at)| row(n, long, at))
                .collect();
        vec![
            HostResponse::Rows(rows.clone()),
            HostResponse::Rows(Vec::new()),
            HostResponse::RowSets(vec![rows.clone(), Vec::new(), rows[1..3].to_vec()]),
            HostResponse::RowSets((0..300).map(|i| if i % 2 == 0 { vec![row(0, 1, i)] } else { vec![] }).collect()),
            HostResponse::Profile(None),
            HostResponse::Profile(Some(rows[1].clone())),
            HostResponse::Profiles(vec![Some(rows[0].clone()), None, Some(rows[3].clone())]),
            HostResponse::Error("store error: é".into()),
        ]
    }

    #[test]
    fn answers_read_by_hand_are_what_serde_reads() {
        for answer in answers() {
            let bytes = encode(&answer).unwrap();
            assert_eq!(decode_host_response(&bytes).unwrap(), answer);
            assert_eq!(crate::abi::decode::<HostResponse>(&bytes).unwrap(), answer);
        }
    }

    #[test]
    fn a_damaged_answer_is_refused_never_a_panic() {
        let bytes = encode(&HostResponse::Rows(vec![row(3, 260, -5), row(1, 2, 9)])).unwrap();
        // Cut anywhere: an error, as serde's decoder gives.
        for cut in 0..bytes.len() {
            assert!(decode_host_response(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_host_response(&longer).unwrap_err().contains("trailing"));
        let mut other_version = bytes.clone();
        other_version[0] ^= 0x40;
        assert!(decode_host_response(&other_version).unwrap_err().contains("version"));
        // Every single byte changed: whatever comes of it, no panic, and what serde
        // accepts, this accepts alike.
        for at in 1..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[at] ^= flip;
                let by_hand = decode_host_response(&b);
                let by_serde = crate::abi::decode::<HostResponse>(&b);
                assert_eq!(by_hand.is_ok(), by_serde.is_ok(), "byte {at} ^ {flip:#x}: {by_hand:?} / {by_serde:?}");
                if let (Ok(h), Ok(s)) = (&by_hand, &by_serde) {
                    assert_eq!(h, s, "byte {at} ^ {flip:#x}");
                }
            }
        }
        // A length no payload could hold allocates nothing.
        let huge = [PAYLOAD_VERSION, 0, 253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode_host_response(&huge).unwrap_err().contains("runs past its end"));
    }

    #[test]
    fn findings_written_as_emitted_are_the_bytes_serde_writes() {
        use crate::{EvalResponse, FindingOut, InputSpec, StateOp};
        let finding = |n: usize| FindingOut {
            inputs: (0..n % 3).map(|i| vec![i as u8; 40 + n]).collect(),
            device_id: format!("device-{n}"),
            device_name: "é".repeat(n % 5),
            row: row(n * 37, n * 13, n as i64).columns,
        };
        for n in [0usize, 1, 2, 260] {
            let out: Vec<FindingOut> = (0..n).map(finding).collect();
            let mut written = Findings::default();
            for f in &out {
                let inputs: Vec<&[u8]> = f.inputs.iter().map(Vec::as_slice).collect();
                written.push(&inputs, &f.device_id, &f.device_name, f.row.iter().map(|(n, c)| (n.as_str(), c.into())));
            }
            assert_eq!(written.len(), n);
            let state = vec![StateOp::Put(vec![1, 2], vec![3; 300]), StateOp::Delete(vec![9])];
            for (inputs, wake_at) in [
                (None, None),
                (Some(vec![InputSpec { table: "T".into(), only_where: Vec::new(), on_backfill: true }]), Some(-7)),
            ] {
                let resp =
                    EvalResponse { findings: out.clone(), state: state.clone(), inputs: inputs.clone(), wake_at };
                assert_eq!(
                    eval_response(written.clone(), &state, &inputs, wake_at).unwrap(),
                    encode(&resp).unwrap(),
                    "{n}"
                );
            }
        }
    }

    fn eval_responses() -> Vec<Vec<u8>> {
        use crate::{Condition, EvalResponse, FindingOut, InputSpec, StateOp};
        let finding = |n: usize| FindingOut {
            inputs: (0..n % 3).map(|i| vec![i as u8; 40 + n]).collect(),
            device_id: format!("device-{n}"),
            device_name: "é".repeat(n % 5),
            row: row(n * 37, n * 13, n as i64).columns,
        };
        let spec = InputSpec {
            table: "DeviceFileEvents".into(),
            only_where: vec![
                Condition::In { column: "SHA1".into(), any_of: vec!["a".into(), "b".into()] },
                Condition::NotStartsWith { column: "FolderPath".into(), prefix: "c:\\windows".into() },
            ],
            on_backfill: false,
        };
        [0usize, 1, 3, 260]
            .into_iter()
            .map(|n| {
                let resp =
                    EvalResponse {
                        findings: (0..n).map(finding).collect(),
                        state: (0..n % 4)
                            .map(|i| {
                                if i % 2 == 0 {
                                    StateOp::Put(vec![1; i], vec![2; 300])
                                } else {
                                    StateOp::Delete(vec![9])
                                }
                            })
                            .collect(),
                        inputs: (n % 2 == 1).then(|| vec![spec.clone()]),
                        wake_at: (n > 1).then_some(-(n as i64)),
                    };
                encode(&resp).unwrap()
            })
            .collect()
    }

    #[test]
    fn pass_answers_read_by_hand_are_what_serde_reads() {
        for bytes in eval_responses() {
            let by_hand = decode_eval_response(&bytes).unwrap();
            let by_serde: EvalResponseRef<'_> = crate::abi::decode_borrowed(&bytes).unwrap();
            assert_eq!(format!("{by_hand:?}"), format!("{by_serde:?}"));
        }
    }

    #[test]
    fn a_damaged_pass_answer_is_refused_never_a_panic() {
        let bytes = eval_responses().swap_remove(2);
        for cut in 0..bytes.len() {
            assert!(decode_eval_response(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_eval_response(&longer).unwrap_err().contains("trailing"));
        for at in 1..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[at] ^= flip;
                let by_hand = decode_eval_response(&b).map(|r| format!("{r:?}"));
                let by_serde = crate::abi::decode_borrowed::<EvalResponseRef<'_>>(&b).map(|r| format!("{r:?}"));
                assert_eq!(by_hand.is_ok(), by_serde.is_ok(), "byte {at} ^ {flip:#x}: {by_hand:?} / {by_serde:?}");
                if let (Ok(h), Ok(s)) = (by_hand, by_serde) {
                    assert_eq!(h, s, "byte {at} ^ {flip:#x}");
                }
            }
        }
    }

    /// A fetch's request written and read by hand is serde's, byte for byte, both ways;
    /// the other requests go through serde as they are.
    #[test]
    fn host_requests_are_written_and_read_as_serde_does() {
        use crate::{Cmp, Condition};
        let keys = |n: usize| -> Vec<Vec<u8>> { (0..n).map(|i| vec![i as u8; (i * 37) % 300]).collect() };
        let filter = vec![
            Condition::In { column: "ActionType".into(), any_of: vec!["a".into(), "B".into()] },
            Condition::Num { column: "LocalPort".into(), op: Cmp::Eq, value: 88 },
        ];
        let requests = [
            HostRequest::GetRows(keys(0)),
            HostRequest::GetRows(keys(300)),
            HostRequest::GetRowsWhere { keys: keys(3), filter: filter.clone() },
            HostRequest::GetRowsWhere { keys: keys(260), filter: Vec::new() },
            HostRequest::GetColumnsWhere { keys: keys(40), filter: filter.clone(), columns: vec!["SHA1".into()] },
            HostRequest::GetColumnsWhere { keys: Vec::new(), filter: Vec::new(), columns: Vec::new() },
            HostRequest::Lookup { table: "t".into(), sha1: "s".into(), device_id: None },
            HostRequest::Profiles(vec!["a".into(), "b".into()]),
        ];
        for req in &requests {
            let by_serde = encode(req).unwrap();
            assert_eq!(encode_host_request(req).unwrap(), by_serde, "{req:?}");
            assert_eq!(&decode_host_request(&by_serde).unwrap(), req);
            // Cut short or with a byte too many, it is refused as serde refuses it.
            for cut in [by_serde.len() - 1, 1] {
                assert!(decode_host_request(&by_serde[..cut]).is_err(), "{req:?} cut at {cut}");
            }
            let mut longer = by_serde.clone();
            longer.push(0);
            assert!(decode_host_request(&longer).is_err(), "{req:?} with a trailing byte");
        }
        // A count of keys the payload cannot hold is refused before anything is allocated.
        let mut huge = vec![PAYLOAD_VERSION, 0, 253];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_host_request(&huge).is_err());
    }
}

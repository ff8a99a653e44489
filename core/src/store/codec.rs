//! Encoding of stored row values: a schema id (the column names, stored once per
//! distinct column list), the ingestion time, and the cells. Column names are not
//! repeated per row, which keeps the database smaller than the JSON it came from.

use crate::error::StoreError;
type Result<T, E = StoreError> = std::result::Result<T, E>;
use lookout_plugin_sdk::wire::{self, put_bytes, put_cell, put_varint, zigzag};
use lookout_plugin_sdk::{Cell, CellRef};
#[cfg(test)]
use serde::Deserialize;

/// A stored row with owned cells (the tests' reference decoding; reads borrow, through
/// [`decode_view`]).
#[cfg(test)]
pub struct StoredRow {
    pub schema: u32,
    pub ingested_at: i64,
    pub cells: Vec<Cell>,
}

/// A stored value of owned cells (production encodes on the parser thread, through
/// [`EncodedCells`]), for tests.
#[cfg(test)]
fn encode(schema: u32, ingested_at: i64, cells: &[Cell]) -> Result<Vec<u8>> {
    let cells: Vec<CellRef<'_>> = cells.iter().map(CellRef::from).collect();
    Ok(EncodedCells::new(&ContentNames::new(&[]), &cells).value(schema, ingested_at))
}

/// A row's cells in their stored encoding, with the row's content hash: everything about
/// a stored value that does not depend on the store, so the parser thread prepares it and
/// the storing thread only puts the schema id and the ingestion time in front.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedCells {
    /// The row's content hash ([`ContentNames::hash`]).
    pub content: u64,
    /// The cells as bincode's standard configuration writes a `Vec` of the SDK's `Cell`.
    bytes: Vec<u8>,
    /// Where each cell starts in `bytes`: the storing thread reads the few cells an index
    /// keeps (see [`EncodedCells::cell`]) without walking every cell before them, which
    /// was over half of what filing a row's index postings cost it.
    starts: Vec<u32>,
}

impl EncodedCells {
    pub fn new(names: &ContentNames, cells: &[CellRef<'_>]) -> EncodedCells {
        // Room for every cell at its longest, so the buffer is never grown (which was
        // several reallocations a row).
        let room: usize =
            cells.iter().map(|c| 10 + if let CellRef::Str(s) | CellRef::Json(s) = c { s.len() } else { 0 }).sum();
        let mut bytes = Vec::with_capacity(10 + room);
        let mut starts = Vec::with_capacity(cells.len());
        put_varint(&mut bytes, cells.len() as u64);
        for cell in cells {
            // A row over 4 GiB is refused long before (the line length limit).
            starts.push(bytes.len() as u32);
            put_cell(&mut bytes, *cell);
        }
        EncodedCells::from_encoded(names, bytes, starts)
    }

    /// Cells already written in this encoding (the cell count, then each cell, cell `i`
    /// from `starts[i]` on), by a parser that wrote them straight from its text.
    pub fn from_encoded(names: &ContentNames, bytes: Vec<u8>, starts: Vec<u32>) -> EncodedCells {
        EncodedCells { content: names.hash(&bytes, &starts), bytes, starts }
    }

    /// Cell `i`, borrowed from the encoding (`Null` past the last cell).
    pub fn cell(&self, i: usize) -> Result<CellView<'_>> {
        let Some(&at) = self.starts.get(i) else { return Ok(CellView::Null) };
        let mut r = Reader { bytes: &self.bytes, at: at as usize };
        r.cell(true).map_err(|e| corrupt!("corrupt encoded cell {i}: {e}"))
    }

    /// The stored value: (schema, ingestion time, cells), as `StoredRowRef` encodes.
    pub fn value(&self, schema: u32, ingested_at: i64) -> Vec<u8> {
        let (header, len) = value_header(schema, ingested_at);
        [&header[..len], &self.bytes].concat()
    }

    /// The encoded cells: what follows [`value_header`] in a stored value.
    pub fn body(&self) -> &[u8] {
        &self.bytes
    }

    /// The cells, borrowed from the encoding. No size limit: these bytes were encoded in
    /// this process, not read from disk, and a row may be as big as its line was.
    pub fn view(&self) -> Result<Vec<CellView<'_>>> {
        let mut r = Reader { bytes: &self.bytes, at: 0 };
        r.cells().map_err(|e| corrupt!("corrupt encoded cells: {e}"))
    }

    /// The cells, owned.
    pub fn cells(&self) -> Result<Vec<Cell>> {
        Ok(self.view()?.iter().map(CellView::to_cell).collect())
    }
}

/// The start of a stored value, before its cells: the schema id and the ingestion time as
/// varints (at most 5 + 9 bytes), and how many bytes of the array they take.
pub fn value_header(schema: u32, ingested_at: i64) -> ([u8; 16], usize) {
    let mut header = Header([0u8; 16], 0);
    header.put_varint(u64::from(schema));
    header.put_varint(zigzag(ingested_at));
    (header.0, header.1)
}

/// Two varints written into a fixed array (they take at most 14 of its 16 bytes).
struct Header([u8; 16], usize);

impl Header {
    fn put_varint(&mut self, v: u64) {
        let (bytes, len) = wire::varint(v);
        self.0[self.1..self.1 + len].copy_from_slice(&bytes[..len]);
        self.1 += len;
    }
}

/// No stored row is bigger than this (lines are capped far below it); a corrupt length
/// prefix must not make the decoder allocate gigabytes.
pub const MAX_ROW_BYTES: usize = 256 << 20;

#[cfg(test)]
pub fn decode(bytes: &[u8]) -> Result<StoredRow> {
    let row = decode_view(bytes)?;
    Ok(StoredRow {
        schema: row.schema,
        ingested_at: row.ingested_at,
        cells: row.cells.iter().map(CellView::to_cell).collect(),
    })
}

/// One cell borrowed from the stored bytes: the variants (and so the encoding) of the
/// cell type rows are written as, with strings as slices, so a row can be checked
/// without allocating them.
#[derive(Clone, Copy)]
#[cfg_attr(test, derive(Deserialize, Debug, PartialEq))]
pub enum CellView<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Json(&'a str),
}

impl CellView<'_> {
    /// The SDK's borrowed cell, for checking conditions.
    pub fn as_ref(&self) -> lookout_plugin_sdk::CellRef<'_> {
        use lookout_plugin_sdk::CellRef;
        match *self {
            CellView::Null => CellRef::Null,
            CellView::Bool(b) => CellRef::Bool(b),
            CellView::Int(i) => CellRef::Int(i),
            CellView::Float(f) => CellRef::Float(f),
            CellView::Str(s) => CellRef::Str(s),
            CellView::Json(s) => CellRef::Json(s),
        }
    }

    /// The owned cell.
    pub fn to_cell(&self) -> Cell {
        Cell::from(self.as_ref())
    }

    /// As [`Cell::as_str`]: the string, or `""` for anything else.
    pub fn as_str(&self) -> &str {
        match self {
            CellView::Str(s) => s,
            _ => "",
        }
    }
}

#[cfg_attr(test, derive(Deserialize, Debug, PartialEq))]
pub struct StoredRowView<'a> {
    pub schema: u32,
    pub ingested_at: i64,
    #[cfg_attr(test, serde(borrow))]
    pub cells: Vec<CellView<'a>>,
}

/// Decodes a stored row without copying its strings.
pub fn decode_view(bytes: &[u8]) -> Result<StoredRowView<'_>> {
    decode_with(bytes, None)
}

/// Reads what [`put_varint`] and [`put_cell`] write, as bincode's standard configuration
/// reads it (the tests check both against each other), without serde's per-cell
/// machinery: every row a pass reads or a batch indexes is decoded here.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// As [`decode_view`], with only the cells `want` marks read: the others are skipped
/// (their bytes stepped over, their strings not checked as UTF-8) and left
/// [`CellView::Null`]. A fetch that needs 10 of a row's 80-odd cells pays for 10.
pub fn decode_picked<'a>(bytes: &'a [u8], want: &[bool]) -> Result<StoredRowView<'a>> {
    decode_with(bytes, Some(want))
}

/// A stored row with every cell (`want` `None`) or the marked ones.
fn decode_with<'a>(bytes: &'a [u8], want: Option<&[bool]>) -> Result<StoredRowView<'a>> {
    if bytes.len() > MAX_ROW_BYTES {
        return Err(corrupt!("corrupt stored row: {} bytes, over the {MAX_ROW_BYTES} a row can take", bytes.len()));
    }
    let mut r = Reader { bytes, at: 0 };
    let mut read = || -> std::result::Result<StoredRowView<'_>, String> {
        let schema = u32::try_from(r.varint()?).map_err(|_| "schema id out of range".to_string())?;
        let ingested_at = unzigzag(r.varint()?);
        Ok(StoredRowView { schema, ingested_at, cells: r.picked_cells(want)? })
    };
    read().map_err(|e| corrupt!("corrupt stored row: {e}"))
}

/// The schema id a stored row value starts with.
pub fn peek_schema(bytes: &[u8]) -> Result<u32> {
    let mut r = Reader { bytes, at: 0 };
    r.varint()
        .and_then(|v| u32::try_from(v).map_err(|_| "schema id out of range".to_string()))
        .map_err(|e| corrupt!("corrupt stored row: {e}"))
}

/// A column index entry's posting list (row key, values of the indexed and covered
/// columns, per row) as bincode's standard configuration writes a `Vec<(Vec<u8>,
/// Vec<String>)>`, written by hand: serde writes and reads a `Vec<u8>` a byte at a time,
/// and the row keys are most of an entry.
pub fn encode_postings<V: AsRef<str>>(postings: &[(Vec<u8>, PostingPlace, Vec<V>)]) -> Vec<u8> {
    let size: usize =
        postings.iter().map(|(k, _, vs)| 25 + k.len() + vs.iter().map(|v| 9 + v.as_ref().len()).sum::<usize>()).sum();
    let mut out = Vec::with_capacity(9 + size);
    put_varint(&mut out, postings.len() as u64);
    for (key, (seq, block, row), values) in postings {
        put_bytes(&mut out, key);
        put_varint(&mut out, *seq);
        put_varint(&mut out, u64::from(*block));
        put_varint(&mut out, u64::from(*row));
        put_varint(&mut out, values.len() as u64);
        for v in values {
            put_bytes(&mut out, v.as_ref().as_bytes());
        }
    }
    out
}

/// Where a posting's row is: its batch, block and row in the block (the row's key-index
/// entry, without the look-up: a pass reads the rows an index chose straight from there).
pub type PostingPlace = (u64, u16, u16);

/// A row in a posting list, read in place: its key, where it is, and its values.
pub type PostingRef<'a> = (&'a [u8], PostingPlace, Vec<&'a str>);

/// A posting list written by [`encode_postings`] (or by bincode's serde encoder), read
/// in place.
pub fn decode_postings(raw: &[u8]) -> Result<Vec<PostingRef<'_>>> {
    let mut r = Reader { bytes: raw, at: 0 };
    let mut read = || -> std::result::Result<Vec<PostingRef<'_>>, String> {
        // A posting is at least its key's length, its place and its values' length; a
        // value, its length.
        let n = r.count(5)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let key_len = r.count(1)?;
            let key = r.take(key_len)?;
            let seq = r.varint()?;
            let block = u16::try_from(r.varint()?).map_err(|_| "block number out of range".to_string())?;
            let row = u16::try_from(r.varint()?).map_err(|_| "row number out of range".to_string())?;
            let values = r.count(1)?;
            out.push((key, (seq, block, row), (0..values).map(|_| r.str()).collect::<std::result::Result<_, _>>()?));
        }
        if r.at != raw.len() {
            return Err(format!("{} trailing bytes", raw.len() - r.at));
        }
        Ok(out)
    };
    read().map_err(|e| corrupt!("corrupt index entry: {e}"))
}

impl<'a> Reader<'a> {
    /// A count of items of at least `min` bytes each, refused if the rest cannot hold them
    /// (so a damaged count allocates nothing).
    fn count(&mut self, min: usize) -> std::result::Result<usize, String> {
        let n = self.varint()?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min) <= self.bytes.len() - self.at => Ok(n),
            _ => Err(format!("a count of {n} runs past the end")),
        }
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("{n} bytes wanted at byte {} of {}", self.at, self.bytes.len()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn fixed<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        match self.byte()? {
            b @ 0..=250 => Ok(u64::from(b)),
            251 => Ok(u64::from(u16::from_le_bytes(self.fixed()?))),
            252 => Ok(u64::from(u32::from_le_bytes(self.fixed()?))),
            253 => Ok(u64::from_le_bytes(self.fixed()?)),
            b => Err(format!("varint marker {b} at byte {}", self.at - 1)),
        }
    }

    fn str(&mut self) -> std::result::Result<&'a str, String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "string length out of range".to_string())?;
        std::str::from_utf8(self.take(len)?).map_err(|e| format!("string not UTF-8: {e}"))
    }

    /// The next cell; a string not `keep`ing is skipped (read as `Null`).
    fn cell(&mut self, keep: bool) -> std::result::Result<CellView<'a>, String> {
        use lookout_plugin_sdk::wire::cell_tag::{BOOL, FLOAT, INT, JSON, NULL, STR};
        let v = self.varint()?;
        Ok(match (u8::try_from(v).unwrap_or(u8::MAX), keep) {
            (NULL, _) => CellView::Null,
            (BOOL, _) => match self.byte()? {
                0 => CellView::Bool(false),
                1 => CellView::Bool(true),
                b => return Err(format!("bool byte {b}")),
            },
            (INT, _) => CellView::Int(unzigzag(self.varint()?)),
            (FLOAT, _) => CellView::Float(f64::from_le_bytes(self.fixed()?)),
            (STR, true) => CellView::Str(self.str()?),
            (JSON, true) => CellView::Json(self.str()?),
            (STR | JSON, false) => {
                self.skip_str()?;
                CellView::Null
            }
            _ => return Err(format!("cell variant {v}")),
        })
    }

    fn cells(&mut self) -> std::result::Result<Vec<CellView<'a>>, String> {
        self.picked_cells(None)
    }

    fn skip_str(&mut self) -> std::result::Result<(), String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "string length out of range".to_string())?;
        self.take(len).map(|_| ())
    }

    /// The cells; with `want`, the strings it does not mark are skipped (read as `Null`).
    fn picked_cells(&mut self, want: Option<&[bool]>) -> std::result::Result<Vec<CellView<'a>>, String> {
        let n = usize::try_from(self.varint()?).map_err(|_| "cell count out of range".to_string())?;
        // Every cell takes at least a byte: a corrupt count cannot make this allocate more
        // than the value holds.
        let mut cells = Vec::with_capacity(n.min(self.bytes.len() - self.at));
        for i in 0..n {
            let keep = want.is_none_or(|w| w.get(i).copied().unwrap_or(false));
            if !keep && self.step_over_short() {
                cells.push(CellView::Null);
                continue;
            }
            cells.push(self.cell(keep)?);
        }
        Ok(cells)
    }

    /// Steps over the next cell if it is a null or a string shorter than 251 bytes (a
    /// one-byte tag, a one-byte length), checked as `cell` checks them; whether it did.
    /// Most cells a fetch skips are: a fetch of a few columns of forty-column rows spent
    /// most of its reading in `cell` for these.
    fn step_over_short(&mut self) -> bool {
        use lookout_plugin_sdk::wire::cell_tag::{JSON, NULL, STR};
        match self.bytes.get(self.at..) {
            Some([NULL, ..]) => {
                self.at += 1;
                true
            }
            Some(&[tag, len, ..]) if (tag == STR || tag == JSON) && len < 251 => {
                let end = self.at + 2 + usize::from(len);
                if end <= self.bytes.len() {
                    self.at = end;
                    true
                } else {
                    false
                }
            }
            _ => false,
        }
    }

    /// The cells of a fetch (see [`decode_fetch`]).
    fn fetched_cells(
        &mut self,
        test: &[bool],
        copy: &[bool],
        copied: &mut Vec<&'a [u8]>,
    ) -> std::result::Result<Vec<CellView<'a>>, String> {
        let n = usize::try_from(self.varint()?).map_err(|_| "cell count out of range".to_string())?;
        let mut cells = Vec::with_capacity(n.min(self.bytes.len() - self.at));
        for i in 0..n {
            let tested = test.get(i).copied().unwrap_or(false);
            let copied_here = copy.get(i).copied().unwrap_or(false);
            let start = self.at;
            if tested {
                cells.push(self.cell(true)?);
            } else {
                if copied_here || !self.step_over_short() {
                    // Its bytes checked for their layout, a string's not as UTF-8.
                    self.cell(false)?;
                }
                cells.push(CellView::Null);
            }
            if copied_here {
                copied.push(&self.bytes[start..self.at]);
            }
        }
        Ok(cells)
    }
}

/// A stored row as a fetch reads it: the cells `test` marks decoded (a condition reads
/// them), the others left [`CellView::Null`]; and the cells `copy` marks pushed to
/// `copied`, in order, as their encoded bytes (a cell as `put_cell` writes it, which is
/// how a plugin's answer carries it), their strings not checked as UTF-8 here: the plugin
/// checks what it reads. Returns the row's ingestion time and its cells.
pub fn decode_fetch<'a>(
    bytes: &'a [u8],
    test: &[bool],
    copy: &[bool],
    copied: &mut Vec<&'a [u8]>,
) -> Result<(i64, Vec<CellView<'a>>)> {
    if bytes.len() > MAX_ROW_BYTES {
        return Err(corrupt!("corrupt stored row: {} bytes, over the {MAX_ROW_BYTES} a row can take", bytes.len()));
    }
    let mut r = Reader { bytes, at: 0 };
    let mut read = || -> std::result::Result<(i64, Vec<CellView<'a>>), String> {
        r.varint()?;
        let ingested_at = unzigzag(r.varint()?);
        Ok((ingested_at, r.fetched_cells(test, copy, copied)?))
    };
    read().map_err(|e| corrupt!("corrupt stored row: {e}"))
}

/// One cell as `put_cell` writes it (a cell [`decode_fetch`] copied), decoded.
pub fn decode_cell(bytes: &[u8]) -> Result<CellView<'_>> {
    let mut r = Reader { bytes, at: 0 };
    let cell = r.cell(true).map_err(|e| corrupt!("corrupt stored cell: {e}"))?;
    if r.at != bytes.len() {
        return Err(corrupt!("corrupt stored cell: {} bytes after it", bytes.len() - r.at));
    }
    Ok(cell)
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Columns an export format adds around a row (Log Analytics' table name, workspace and
/// billing fields): the same event exported two ways is the same row.
const EXPORT_METADATA: &[&str] =
    &["Type", "TenantId", "SourceSystem", "TimeGenerated", "_ResourceId", "_BilledSize", "_IsBillable", "_ItemId"];

/// The content hash of a row, for tests.
#[cfg(test)]
fn content_hash(names: &[String], cells: &[CellRef<'_>]) -> u64 {
    EncodedCells::new(&ContentNames::new(names), cells).content
}

/// What a row's content hash takes from its column names, worked out once per column
/// list: which columns count (all but those of [`EXPORT_METADATA`]) and a digest of their
/// names in order. The hash is of a row's column names and cells, not its ingestion time
/// nor [`EXPORT_METADATA`]: two rows with the same key and the same content hash are the
/// same row sent twice. It is taken over the cells as encoded (each tagged, strings
/// length-prefixed: one encoding per value), seeded with the names' digest, so the cells
/// are not laid out a second time to be hashed — that was a fourteenth of the parser
/// thread. (xxh3: stable across builds and platforms, which a stored hash must be.)
#[derive(Debug, Clone, PartialEq)]
pub struct ContentNames {
    /// Whether each column counts.
    counted: Vec<bool>,
    /// Whether every column does (then the encoding is hashed as it is).
    all: bool,
    /// The counted columns' names, each length-prefixed, hashed.
    digest: u64,
}

impl ContentNames {
    pub fn new(names: &[String]) -> ContentNames {
        let counted: Vec<bool> = names.iter().map(|n| !EXPORT_METADATA.contains(&n.as_str())).collect();
        let mut named = Vec::new();
        for (name, _) in names.iter().zip(&counted).filter(|(_, c)| **c) {
            named.extend_from_slice(&(name.len() as u32).to_le_bytes());
            named.extend_from_slice(name.as_bytes());
        }
        ContentNames { all: counted.iter().all(|c| *c), counted, digest: xxhash_rust::xxh3::xxh3_64(&named) }
    }

    /// The content hash of a row with these columns, from its encoded cells (`bytes`, a
    /// count and then each cell, cell `i` from `starts[i]` on). A row with more cells than
    /// names counts the extra ones too.
    fn hash(&self, bytes: &[u8], starts: &[u32]) -> u64 {
        let Some(&first) = starts.first() else { return xxhash_rust::xxh3::xxh3_64_with_seed(&[], self.digest) };
        if self.all {
            return xxhash_rust::xxh3::xxh3_64_with_seed(&bytes[first as usize..], self.digest);
        }
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            for (i, &at) in starts.iter().enumerate() {
                if self.counted.get(i).is_some_and(|c| !*c) {
                    continue;
                }
                let end = starts.get(i + 1).map_or(bytes.len(), |e| *e as usize);
                buf.extend_from_slice(&bytes[at as usize..end]);
            }
            xxhash_rust::xxh3::xxh3_64_with_seed(&buf, self.digest)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    #[derive(Serialize)]
    struct StoredRowRef<'a> {
        schema: u32,
        ingested_at: i64,
        cells: CellsOut<'a>,
    }

    /// The stored format as serde types, which the hand-written encoder must match byte for
    /// byte: the store's own cell type, so its encoding (the variant order is the format)
    /// does not follow the plugin ABI's [`Cell`].
    #[derive(Serialize)]
    enum CellOut<'a> {
        Null,
        Bool(bool),
        Int(i64),
        Float(f64),
        Str(&'a str),
        Json(&'a str),
    }

    impl<'a> From<&'a Cell> for CellOut<'a> {
        fn from(c: &'a Cell) -> Self {
            match c {
                Cell::Null => CellOut::Null,
                Cell::Bool(b) => CellOut::Bool(*b),
                Cell::Int(i) => CellOut::Int(*i),
                Cell::Float(f) => CellOut::Float(*f),
                Cell::Str(s) => CellOut::Str(s),
                Cell::Json(s) => CellOut::Json(s),
            }
        }
    }

    /// A row's cells, written as [`CellOut`]s without collecting them first.
    struct CellsOut<'a>(&'a [Cell]);

    impl Serialize for CellsOut<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(CellOut::from))
        }
    }

    /// The hand-written reader reads what bincode's standard configuration reads, at every
    /// varint width, and refuses (never panics on) every truncation and bad tag.
    #[test]
    fn the_row_reader_reads_as_bincode_does() {
        let widths = [0usize, 1, 250, 251, 252, 65_535, 65_536];
        let mut rows: Vec<(u32, i64, Vec<Cell>)> = Vec::new();
        for (i, w) in widths.iter().enumerate() {
            rows.push((
                [0, 250, 251, 65_535, 65_536, u32::MAX, 7][i],
                [0, -1, 125, -126, 40_000, i64::MIN, i64::MAX][i],
                vec![
                    Cell::Str("x".repeat(*w)),
                    Cell::Json("[1]".into()),
                    Cell::Int([0, -1, 125, -126, 40_000, i64::MIN, i64::MAX][i]),
                    Cell::Float(-0.25),
                    Cell::Bool(i % 2 == 0),
                    Cell::Null,
                    Cell::Str("é".into()),
                ],
            ));
        }
        rows.push((1, 2, (0..300).map(|i| Cell::Int(i * 1000)).collect()));
        for (schema, at, cells) in &rows {
            let bytes = encode(*schema, *at, cells).unwrap();
            let want: StoredRowView<'_> =
                bincode::serde::borrow_decode_from_slice(&bytes, bincode::config::standard()).unwrap().0;
            assert_eq!(decode_view(&bytes).unwrap(), want);
            assert_eq!(decode(&bytes).unwrap().cells, *cells);
            let refs: Vec<CellRef<'_>> = cells.iter().map(CellRef::from).collect();
            let encoded = EncodedCells::new(&ContentNames::new(&[]), &refs);
            assert_eq!(encoded.view().unwrap(), want.cells);
            for cut in 0..bytes.len().min(400) {
                assert!(decode_view(&bytes[..cut]).is_err(), "cut at {cut} of {}", bytes.len());
                assert!(decode_picked(&bytes[..cut], &[]).is_err(), "picked, cut at {cut} of {}", bytes.len());
                let all = vec![true; cells.len()];
                assert!(decode_fetch(&bytes[..cut], &[], &all, &mut Vec::new()).is_err(), "fetched, cut at {cut}");
            }
            // Picking reads the marked cells as the whole reader does, and the others as
            // nulls; with every cell marked it is the whole reader.
            for pattern in
                [vec![true; cells.len()], vec![false; cells.len()], (0..cells.len()).map(|i| i % 3 == 1).collect()]
            {
                let picked = decode_picked(&bytes, &pattern).unwrap();
                assert_eq!((picked.schema, picked.ingested_at), (want.schema, want.ingested_at));
                let expect: Vec<CellView<'_>> = want
                    .cells
                    .iter()
                    .zip(&pattern)
                    .map(|(c, &keep)| match c {
                        CellView::Str(_) | CellView::Json(_) if !keep => CellView::Null,
                        other => *other,
                    })
                    .collect();
                assert_eq!(picked.cells, expect, "{pattern:?}");
                // A fetch tests the marked cells as picking reads them, and copies the
                // others marked (here every third from the first) as `put_cell` writes
                // each: read back, each is the cell.
                let copy: Vec<bool> = (0..cells.len()).map(|i| i % 3 == 0).collect();
                let mut copied = Vec::new();
                let (at, tested) = decode_fetch(&bytes, &pattern, &copy, &mut copied).unwrap();
                let expect_tested: Vec<CellView<'_>> =
                    want.cells.iter().zip(&pattern).map(|(c, &t)| if t { *c } else { CellView::Null }).collect();
                assert_eq!((at, tested), (want.ingested_at, expect_tested), "{pattern:?}");
                let copied_cells: Vec<CellView<'_>> = copied.iter().map(|c| decode_cell(c).unwrap()).collect();
                let expect_copied: Vec<CellView<'_>> = want.cells.iter().step_by(3).copied().collect();
                assert_eq!(copied_cells, expect_copied);
                for (c, cell) in copied.iter().zip(cells.iter().step_by(3)) {
                    let mut written = Vec::new();
                    put_cell(&mut written, cell.into());
                    assert_eq!(*c, written.as_slice(), "copied as written");
                }
                // In process, any one cell is read where it starts; past the last, null.
                for (i, c) in want.cells.iter().enumerate() {
                    assert_eq!(encoded.cell(i).unwrap(), *c, "in process, cell {i}");
                }
                assert_eq!(encoded.cell(want.cells.len()).unwrap(), CellView::Null);
            }
            assert_eq!(peek_schema(&bytes).unwrap(), *schema);
        }
        // A bad cell variant, a bool that is neither 0 nor 1, a varint marker past u64, a
        // string that is not UTF-8.
        for bad in [vec![1, 1, 1, 6], vec![1, 1, 1, 1, 2], vec![1, 1, 1, 2, 254], vec![1, 1, 1, 4, 1, 0xff]] {
            assert!(decode_view(&bad).is_err(), "{bad:?}");
            let skipped_string_unchecked = bad == [1, 1, 1, 4, 1, 0xff];
            assert_eq!(decode_picked(&bad, &[false]).is_err(), !skipped_string_unchecked, "{bad:?}, picking nothing");
            assert!(decode_picked(&bad, &[true]).is_err(), "{bad:?}, picked");
            // Copied, a string is not checked as UTF-8 (the plugin checks it as it reads it);
            // its layout is, and decoding it refuses it.
            let mut copied = Vec::new();
            assert_eq!(decode_fetch(&bad, &[], &[true], &mut copied).is_err(), !skipped_string_unchecked, "{bad:?}");
            assert!(decode_fetch(&bad, &[true], &[true], &mut Vec::new()).is_err(), "{bad:?}, tested");
            assert!(copied.iter().all(|c| decode_cell(c).is_err()), "{bad:?}, decoded");
            let viaserde: std::result::Result<(StoredRowView<'_>, usize), _> =
                bincode::serde::borrow_decode_from_slice(&bad, bincode::config::standard());
            assert!(viaserde.is_err(), "bincode refuses {bad:?} too");
        }
    }

    /// The stored layout of a row, byte for byte: bincode's standard configuration of
    /// (schema, ingestion time, cells), each cell a variant index then its value. A change
    /// here is a change of the store's format.
    #[test]
    fn a_stored_row_is_these_bytes_and_reads_back() {
        let cells = vec![
            Cell::Null,
            Cell::Bool(true),
            Cell::Int(-2),
            Cell::Float(0.5),
            Cell::Str("ab".into()),
            Cell::Json("[]".into()),
        ];
        let bytes = encode(3, 300, &cells).unwrap();
        let want: Vec<u8> = [
            vec![3, 251, 0x58, 0x02, 6],
            vec![0],
            vec![1, 1],
            vec![2, 3],
            [vec![3], 0.5f64.to_le_bytes().to_vec()].concat(),
            vec![4, 2, b'a', b'b'],
            vec![5, 2, b'[', b']'],
        ]
        .concat();
        assert_eq!(bytes, want);
        let back = decode(&bytes).unwrap();
        assert_eq!((back.schema, back.ingested_at, back.cells), (3, 300, cells));
        let view = decode_view(&bytes).unwrap();
        assert_eq!(view.cells.iter().map(CellView::to_cell).collect::<Vec<_>>(), decode(&bytes).unwrap().cells);
    }

    /// A row's content hash counts its column names (in order) and its cells, not the
    /// export metadata columns, and is the same in every build: a change here is a change
    /// of the store's format.
    #[test]
    fn content_hash_counts_names_and_cells_but_not_export_metadata() {
        let hash = |row: &[(&str, Cell)]| {
            let names: Vec<String> = row.iter().map(|(n, _)| n.to_string()).collect();
            let refs: Vec<CellRef<'_>> = row.iter().map(|(_, c)| CellRef::from(c)).collect();
            content_hash(&names, &refs)
        };
        let long = "x".repeat(5000);
        let row = vec![
            ("Timestamp", Cell::Str("2025-05-07T16:55:49Z".into())),
            ("N", Cell::Int(-7)),
            ("F", Cell::Float(1.5)),
            ("B", Cell::Bool(true)),
            ("J", Cell::Json("{\"a\":1}".into())),
            ("Null", Cell::Null),
            ("Long", Cell::Str(long.clone())),
        ];
        let base = hash(&row);
        assert_eq!(base, 0x4f77_96f6_231e_435b, "stored hashes must not change between builds");
        assert_eq!(hash(&[]), xxhash_rust::xxh3::xxh3_64_with_seed(&[], xxhash_rust::xxh3::xxh3_64(&[])));
        // Export metadata, wherever it is and whatever it holds, is not the row's content.
        let mut exported = row.clone();
        exported.insert(0, ("Type", Cell::Str("DeviceFileEvents".into())));
        exported.insert(3, ("TenantId", Cell::Str("t".into())));
        exported.push(("_ItemId", Cell::Int(9)));
        assert_eq!(hash(&exported), base);
        // Everything else is.
        let mut changed: Vec<Vec<(&str, Cell)>> = Vec::new();
        for i in 0..row.len() {
            let mut other = row.clone();
            other[i].1 = match &row[i].1 {
                Cell::Null => Cell::Str(String::new()),
                Cell::Str(s) => Cell::Json(s.clone()),
                Cell::Int(n) => Cell::Int(n + 1),
                Cell::Float(f) => Cell::Float(-f),
                Cell::Bool(b) => Cell::Bool(!b),
                Cell::Json(_) => Cell::Null,
            };
            changed.push(other);
            let mut renamed = row.clone();
            renamed[i].0 = "Other";
            changed.push(renamed);
        }
        let mut swapped = row.clone();
        swapped.swap(1, 2);
        changed.push(swapped);
        changed.push(row[..row.len() - 1].to_vec());
        for other in &changed {
            assert_ne!(hash(other), base, "{other:?}");
        }
        // A value moved across the boundary between two cells.
        let split = |a: &str, b: &str| hash(&[("A", Cell::Str(a.into())), ("B", Cell::Str(b.into()))]);
        assert_ne!(split("ab", ""), split("a", "b"));
    }

    /// The hand-written encoding is bincode's, for values on either side of every
    /// varint width.
    #[test]
    fn encoding_is_bincode_s_for_every_width() {
        let edges = [
            0i64,
            1,
            -1,
            125,
            126,
            -126,
            127,
            250,
            251,
            32767,
            32768,
            -32769,
            65535,
            1 << 31,
            -(1 << 31),
            1 << 40,
            i64::MAX,
            i64::MIN,
        ];
        let mut cells: Vec<Cell> = edges.iter().map(|i| Cell::Int(*i)).collect();
        for len in [0usize, 1, 250, 251, 252, 65535, 65536, 70000] {
            cells.push(Cell::Str("s".repeat(len)));
            cells.push(Cell::Json("j".repeat(len)));
        }
        cells.extend([
            Cell::Null,
            Cell::Bool(false),
            Cell::Bool(true),
            Cell::Float(-0.0),
            Cell::Float(f64::NAN),
            Cell::Float(1e300),
        ]);
        for (schema, at) in
            [(0u32, 0i64), (250, -1), (251, 638_822_976_000_000_000), (70_000, i64::MIN), (u32::MAX, i64::MAX)]
        {
            let want = bincode::serde::encode_to_vec(
                StoredRowRef { schema, ingested_at: at, cells: CellsOut(&cells) },
                bincode::config::standard(),
            )
            .unwrap();
            assert_eq!(encode(schema, at, &cells).unwrap(), want, "schema {schema}, time {at}");
        }
        let names: Vec<String> = (0..cells.len()).map(|i| format!("c{i}")).collect();
        let refs: Vec<CellRef<'_>> = cells.iter().map(CellRef::from).collect();
        let prepared = EncodedCells::new(&ContentNames::new(&names), &refs);
        assert_eq!(prepared.content, content_hash(&names, &refs));
        let back = prepared.cells().unwrap();
        assert_eq!(back.len(), cells.len());
        assert!(back
            .iter()
            .zip(&cells)
            .all(|(a, b)| a == b || matches!((a, b), (Cell::Float(x), Cell::Float(y)) if x.is_nan() && y.is_nan())));
    }

    #[test]
    fn round_trip() {
        let cells = vec![Cell::Str("a".into()), Cell::Int(-3), Cell::Null, Cell::Json("[1]".into())];
        let d = decode(&encode(7, 42, &cells).unwrap()).unwrap();
        assert_eq!((d.schema, d.ingested_at, &d.cells), (7, 42, &cells));
        let bytes = encode(7, 42, &cells).unwrap();
        let v = decode_view(&bytes).unwrap();
        let strs: Vec<&str> = v.cells.iter().map(CellView::as_str).collect();
        assert_eq!((v.schema, v.ingested_at, strs), (7, 42, vec!["a", "", "", ""]));
        assert!(matches!(v.cells[3], CellView::Json("[1]")) && matches!(v.cells[1], CellView::Int(-3)));
    }

    /// Found by the payload_decode fuzz target: a length prefix claiming ~3 GB made the
    /// decoder try to allocate it.
    #[test]
    fn huge_length_prefix_is_an_error_not_an_allocation() {
        // schema 4, time 20, 38 cells, the first a string of 0xb1fc0000 bytes.
        let bytes = [0x04, 0x28, 0x26, 0x04, 0xfc, 0x00, 0x00, 0xfc, 0xb1, 0xb1, 0xb1, 0xb1];
        assert!(decode(&bytes).is_err());
    }

    /// Posting lists written by hand are the bytes serde writes, and read back as serde
    /// reads them; a damaged one is refused.
    #[test]
    fn postings_by_hand_are_serdes() {
        type List = Vec<(Vec<u8>, PostingPlace, Vec<String>)>;
        let lists: Vec<List> = vec![
            Vec::new(),
            vec![(Vec::new(), (0, 0, 0), Vec::new())],
            vec![
                ((0..300).map(|i| i as u8).collect(), (7, 3, 511), vec!["wsmsvc.dll".into(), r"c:\windows\é".into()]),
                (b"k".to_vec(), (u64::MAX, u16::MAX, 300), vec![String::new(), "x".repeat(70_000)]),
            ],
        ];
        for list in lists {
            let bytes = encode_postings(&list);
            assert_eq!(bytes, bincode::serde::encode_to_vec(&list, bincode::config::standard()).unwrap());
            let by_serde: Vec<(Vec<u8>, PostingPlace, Vec<&str>)> =
                bincode::serde::borrow_decode_from_slice(&bytes, bincode::config::standard()).unwrap().0;
            let by_hand: Vec<(Vec<u8>, PostingPlace, Vec<&str>)> =
                decode_postings(&bytes).unwrap().into_iter().map(|(k, p, v)| (k.to_vec(), p, v)).collect();
            assert_eq!(by_hand, by_serde);
            for cut in 0..bytes.len().min(600) {
                assert!(decode_postings(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            assert!(decode_postings(&[bytes.as_slice(), &[0]].concat()).is_err(), "a trailing byte");
        }
        // A count no entry could hold allocates nothing.
        assert!(decode_postings(&[253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        // A value that is not UTF-8.
        assert!(decode_postings(&[1, 1, b'k', 0, 0, 0, 1, 1, 0xff]).is_err());
        assert!(decode_postings(&[1, 1, b'k', 0, 0, 0, 1, 1, b'v']).is_ok());
        // A block or row number past u16.
        assert!(decode_postings(&[1, 1, b'k', 0, 251, 0xff, 0xff, 0, 0]).is_ok());
        assert!(decode_postings(&[1, 1, b'k', 0, 252, 0, 0, 1, 0, 0, 0]).is_err());
    }
}

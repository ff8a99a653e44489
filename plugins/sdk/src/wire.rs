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

use crate::abi::PAYLOAD_VERSION;
use crate::CellRef;

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

/// One cell as bincode writes a [`crate::Cell`]: the variant index, then its value.
pub fn put_cell(out: &mut Vec<u8>, cell: CellRef<'_>) {
    match cell {
        CellRef::Null => out.push(0),
        CellRef::Bool(b) => out.extend_from_slice(&[1, u8::from(b)]),
        CellRef::Int(i) => {
            out.push(2);
            put_varint(out, zigzag(i));
        }
        CellRef::Float(f) => {
            out.push(3);
            out.extend_from_slice(&f.to_le_bytes());
        }
        CellRef::Str(s) => {
            out.push(4);
            put_bytes(out, s.as_bytes());
        }
        CellRef::Json(s) => {
            out.push(5);
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
        let mut out = Vec::with_capacity(64 + table.len() + key.len());
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
        out.splice(count_at..count_at, bytes[..len].iter().copied());
        RowBytes(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The variant indexes of [`crate::HostResponse`], in its declaration order.
const ROWS: u64 = 0;
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
}

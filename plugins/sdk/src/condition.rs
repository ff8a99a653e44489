//! Row conditions a detector hands the host (in an [`crate::InputSpec`] or a look-up) so
//! rows that cannot matter never cross the boundary. Each is one KQL `where` operator
//! with KQL's semantics, so a detector can state its rule's filters as written:
//!
//! | KQL | condition | case |
//! |---|---|---|
//! | `c == v`, `c != v` | [`Condition::Eq`], [`Condition::NotEq`] | exact |
//! | `c =~ v`, `c !~ v` | [`Condition::EqCi`], [`Condition::NotEqCi`] | ASCII case ignored |
//! | `c in (…)` | [`Condition::InCs`] | exact |
//! | `c in~ (…)` | [`Condition::In`] | ASCII case ignored |
//! | `c startswith p`, `c !startswith p` | [`Condition::StartsWith`], [`Condition::NotStartsWith`] | ASCII case ignored |
//! | `c contains s` | [`Condition::Contains`] | ASCII case ignored |
//! | `c has t` | [`Condition::Has`] | ASCII case ignored, whole terms |
//! | `c < n` … on a long | [`Condition::Num`] | — |
//! | `Timestamp >= ago(x)`, `ingestion_time() >= t` | [`Condition::Time`] | — |
//!
//! String operators read a missing column as `""` (KQL strings are never null) and a
//! long, bool or nested JSON value as its text. Numeric and time comparisons fail on null or a missing column, except `!=`,
//! which holds (SEMANTICS: null fails every comparison but `!=` against a value).

use crate::cell::{Cell, Cells};
use crate::time::parse_timestamp;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The pseudo-column of [`Condition::Time`] that stands for `ingestion_time()`.
pub const INGESTION_TIME: &str = "$ingestion_time";

/// A comparison operator of [`Condition::Num`] and [`Condition::Time`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Cmp {
    /// `a <op> b`.
    pub fn holds<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
        }
    }
}

/// A condition on one column of a row; see the module docs for the KQL each one is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Condition {
    /// `column in~ (any_of)`
    In { column: String, any_of: Vec<String> },
    /// `column !startswith prefix`
    NotStartsWith { column: String, prefix: String },
    /// `column == value`
    Eq { column: String, value: String },
    /// `column != value`
    NotEq { column: String, value: String },
    /// `column =~ value`
    EqCi { column: String, value: String },
    /// `column !~ value`
    NotEqCi { column: String, value: String },
    /// `column in (any_of)`, case-sensitive
    InCs { column: String, any_of: Vec<String> },
    /// `column startswith prefix`
    StartsWith { column: String, prefix: String },
    /// `column contains needle`
    Contains { column: String, needle: String },
    /// `column has term`: `term` occurs with no letter or digit right before or after it.
    Has { column: String, term: String },
    /// `column <op> value` on a long (an integer cell; a real compares as a real).
    Num { column: String, op: Cmp, value: i64 },
    /// `column <op> ticks` on a datetime column, or on the row's ingestion time when
    /// `column` is [`INGESTION_TIME`].
    Time { column: String, op: Cmp, ticks: i64 },
}

/// A column value as a condition sees it, borrowed (the host checks stored rows without
/// copying them). Its variants are [`Cell`]'s, in the same order, so it decodes from a
/// payload that carries `Cell`s without copying their strings.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub enum CellRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Json(&'a str),
}

impl<'a> From<&'a Cell> for CellRef<'a> {
    fn from(c: &'a Cell) -> Self {
        match c {
            Cell::Null => CellRef::Null,
            Cell::Bool(b) => CellRef::Bool(*b),
            Cell::Int(i) => CellRef::Int(*i),
            Cell::Float(f) => CellRef::Float(*f),
            Cell::Str(s) => CellRef::Str(s),
            Cell::Json(s) => CellRef::Json(s),
        }
    }
}

impl From<CellRef<'_>> for Cell {
    fn from(c: CellRef<'_>) -> Cell {
        match c {
            CellRef::Null => Cell::Null,
            CellRef::Bool(b) => Cell::Bool(b),
            CellRef::Int(i) => Cell::Int(i),
            CellRef::Float(f) => Cell::Float(f),
            CellRef::Str(s) => Cell::Str(s.to_string()),
            CellRef::Json(s) => Cell::Json(s.to_string()),
        }
    }
}

impl<'a> CellRef<'a> {
    /// The string, or `""` for anything that is not one.
    pub fn as_str(self) -> &'a str {
        match self {
            CellRef::Str(s) => s,
            _ => "",
        }
    }

    /// The value as a string operator reads it (KQL converts to string): a string as it
    /// is, a long as its digits, a bool as `true`/`false`, nested JSON as its text; `""`
    /// for null. An index keeps the same text, so a condition decided from an index
    /// entry and one decided from the row agree.
    pub fn text(self) -> Cow<'a, str> {
        match self {
            CellRef::Str(s) | CellRef::Json(s) => Cow::Borrowed(s),
            CellRef::Int(i) => Cow::Owned(i.to_string()),
            CellRef::Bool(b) => Cow::Borrowed(if b { "true" } else { "false" }),
            CellRef::Float(f) => Cow::Owned(f.to_string()),
            CellRef::Null => Cow::Borrowed(""),
        }
    }
}

impl Condition {
    /// The column the condition reads ([`INGESTION_TIME`] for ingestion time).
    pub fn column(&self) -> &str {
        match self {
            Condition::In { column, .. }
            | Condition::NotStartsWith { column, .. }
            | Condition::Eq { column, .. }
            | Condition::NotEq { column, .. }
            | Condition::EqCi { column, .. }
            | Condition::NotEqCi { column, .. }
            | Condition::InCs { column, .. }
            | Condition::StartsWith { column, .. }
            | Condition::Contains { column, .. }
            | Condition::Has { column, .. }
            | Condition::Num { column, .. }
            | Condition::Time { column, .. } => column,
        }
    }

    /// Whether the condition reads the column as a string (so a string copy of the
    /// value, as an index entry keeps, is enough to decide it).
    pub fn on_string(&self) -> bool {
        !matches!(self, Condition::Num { .. } | Condition::Time { .. })
    }

    /// Whether a string value meets the condition (a numeric or time condition on a
    /// string reads it as KQL would read the column: a datetime text is a time, anything
    /// else is not a number).
    pub fn matches(&self, value: &str) -> bool {
        self.matches_cell(Some(CellRef::Str(value)), 0)
    }

    /// Whether a row's cell (`None`: the column is missing) meets the condition;
    /// `ingested_at` is the row's ingestion time, for [`INGESTION_TIME`].
    pub fn matches_cell(&self, cell: Option<CellRef<'_>>, ingested_at: i64) -> bool {
        let text = cell.map_or(Cow::Borrowed(""), CellRef::text);
        let s = text.as_ref();
        match self {
            Condition::In { any_of, .. } => any_of.iter().any(|a| a.eq_ignore_ascii_case(s)),
            Condition::NotStartsWith { prefix, .. } => !starts_with_ci(s, prefix),
            Condition::Eq { value, .. } => s == value,
            Condition::NotEq { value, .. } => s != value,
            Condition::EqCi { value, .. } => s.eq_ignore_ascii_case(value),
            Condition::NotEqCi { value, .. } => !s.eq_ignore_ascii_case(value),
            Condition::InCs { any_of, .. } => any_of.iter().any(|a| a == s),
            Condition::StartsWith { prefix, .. } => starts_with_ci(s, prefix),
            Condition::Contains { needle, .. } => find_ci(s, needle, 0).is_some(),
            Condition::Has { term, .. } => has_term(s, term),
            // Longs compare exactly (as f64 two ids above 2^53 could compare equal).
            Condition::Num { op, value, .. } => match cell {
                Some(CellRef::Int(i)) => op.holds(i, *value),
                Some(CellRef::Float(f)) => op.holds(f, *value as f64),
                _ => *op == Cmp::Ne,
            },
            Condition::Time { column, op, ticks } => {
                let t = if column == INGESTION_TIME {
                    Some(ingested_at)
                } else {
                    match cell {
                        Some(CellRef::Str(s)) => parse_timestamp(s),
                        _ => None,
                    }
                };
                match t {
                    Some(t) => op.holds(t, *ticks),
                    None => *op == Cmp::Ne,
                }
            }
        }
    }

    /// Whether a row ([`crate::Row`] or [`crate::RowView`]) meets the condition.
    pub fn matches_row<R: Cells + ?Sized>(&self, row: &R) -> bool {
        self.matches_cell(row.cell(self.column()), row.ingested_at())
    }
}

/// Whether a row ([`crate::Row`] or [`crate::RowView`]) meets every condition.
pub fn all_match<R: Cells + ?Sized>(filter: &[Condition], row: &R) -> bool {
    filter.iter().all(|c| c.matches_row(row))
}

fn starts_with_ci(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// The first byte offset at or after `from` where `needle` occurs, ASCII case ignored.
fn find_ci(s: &str, needle: &str, from: usize) -> Option<usize> {
    let (h, n) = (s.as_bytes(), needle.as_bytes());
    if n.is_empty() {
        return Some(from.min(h.len()));
    }
    // The first byte compared on its own: most positions fail there, without a slice
    // comparison set up for each (`contains` on every command line of a tick).
    let (first, rest) = (n[0].to_ascii_lowercase(), &n[1..]);
    (from..=h.len().checked_sub(n.len())?)
        .find(|&i| h[i].to_ascii_lowercase() == first && h[i + 1..i + n.len()].eq_ignore_ascii_case(rest))
}

/// KQL `has`: the term occurs where it is not glued to letters or digits on either side
/// (a term that starts or ends with punctuation needs no boundary on that side).
fn has_term(s: &str, term: &str) -> bool {
    if term.is_empty() {
        return true;
    }
    let (h, t) = (s.as_bytes(), term.as_bytes());
    let word = |b: u8| b.is_ascii_alphanumeric() || b >= 0x80;
    let mut from = 0;
    while let Some(i) = find_ci(s, term, from) {
        let before_ok = !word(t[0]) || i == 0 || !word(h[i - 1]);
        let end = i + t.len();
        let after_ok = !word(t[t.len() - 1]) || end == h.len() || !word(h[end]);
        if before_ok && after_ok {
            return true;
        }
        from = i + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Row;

    fn c(cond: Condition, v: &str) -> bool {
        cond.matches(v)
    }

    /// `find_ci` finds what a search of the ASCII-lowercased strings finds, from every
    /// offset, with non-ASCII bytes (which only match themselves) on either side.
    #[test]
    fn find_ci_is_a_search_of_the_lowercased_strings() {
        let hays = ["", "a", "svchost.exe -k netsvcs -p -s Schedule", "SCHEDULEschedule", "éSchedulé", "xxSchEd"];
        let needles =
            ["", "s", "Schedule", "SCHEDULE", "schedulé", "é", "xsched", "svchost.exe -k netsvcs -p -s Schedule!"];
        for h in hays {
            for n in needles {
                for from in 0..=h.len() {
                    let (lh, ln) = (h.to_ascii_lowercase().into_bytes(), n.to_ascii_lowercase().into_bytes());
                    // Byte offsets, as `find_ci` gives them (`from` may be inside a character).
                    let want = (from..=lh.len()).find(|&i| lh[i..].starts_with(&ln));
                    assert_eq!(find_ci(h, n, from), want, "{h:?} {n:?} from {from}");
                }
            }
        }
    }

    #[test]
    fn string_operators_follow_kql() {
        let col = || "C".to_string();
        assert!(c(Condition::In { column: col(), any_of: vec!["WsmProvHost.exe".into()] }, "wsmprovhost.EXE"));
        assert!(!c(Condition::In { column: col(), any_of: vec!["WsmProvHost.exe".into()] }, "wsmprovhost.exe "));
        assert!(!c(Condition::InCs { column: col(), any_of: vec!["Services.exe".into()] }, "services.exe"));
        assert!(c(Condition::InCs { column: col(), any_of: vec!["".into()] }, ""), "\"\" == \"\"");
        let nsw = Condition::NotStartsWith { column: col(), prefix: r"C:\Windows\Assembly".into() };
        assert!(!c(nsw.clone(), r"c:\windows\assembly\x.dll"));
        assert!(c(nsw.clone(), r"c:\windows\assembl"));
        assert!(c(nsw, ""));
        let sw = Condition::StartsWith { column: col(), prefix: "svchost.exe -k netsvcs -p".into() };
        assert!(c(sw.clone(), "SVCHOST.EXE -k netsvcs -p -s Schedule"));
        assert!(!c(sw, " svchost.exe -k netsvcs -p"));
        assert!(c(Condition::Contains { column: col(), needle: "Schedule".into() }, "-s schedule"));
        assert!(!c(Condition::Contains { column: col(), needle: "Schedule".into() }, "-s Schedul"));
        assert!(c(Condition::Eq { column: col(), value: "LogonFailed".into() }, "LogonFailed"));
        assert!(!c(Condition::Eq { column: col(), value: "LogonFailed".into() }, "logonfailed"));
        assert!(c(Condition::NotEq { column: col(), value: "Unlock".into() }, "unlock"));
        assert!(c(Condition::EqCi { column: col(), value: "LogonFailed".into() }, "logonFAILED"));
        assert!(!c(Condition::NotEqCi { column: col(), value: "msiexec.exe /V".into() }, "MSIEXEC.EXE /v"));
        assert!(c(Condition::NotEqCi { column: col(), value: "msiexec.exe /V".into() }, "msiexec.exe /V /q"));
    }

    #[test]
    fn has_matches_whole_terms_only() {
        let has = |t: &str, v: &str| c(Condition::Has { column: "C".into(), term: t.into() }, v);
        assert!(has("schedule", "svchost.exe -s Schedule"));
        assert!(!has("sched", "svchost.exe -s Schedule"));
        assert!(has("svchost.exe", "C:\\Windows\\svchost.exe -k"));
        assert!(!has("svchost.exe", "xsvchost.exe"));
        assert!(has("-k", "svchost.exe -k netsvcs"), "punctuation needs no boundary");
        assert!(has("a", "b a"));
        assert!(!has("a", "ba ab"));
        assert!(has("", "anything"));
    }

    #[test]
    fn numbers_and_times_fail_on_null_except_not_equal() {
        let num = |op, v| Condition::Num { column: "LocalPort".into(), op, value: v };
        assert!(num(Cmp::Eq, 88).matches_cell(Some(CellRef::Int(88)), 0));
        assert!(!num(Cmp::Eq, 88).matches_cell(Some(CellRef::Str("88")), 0));
        assert!(!num(Cmp::Eq, 88).matches_cell(None, 0));
        assert!(!num(Cmp::Lt, 88).matches_cell(Some(CellRef::Null), 0));
        assert!(num(Cmp::Ne, 88).matches_cell(Some(CellRef::Null), 0));
        assert!(num(Cmp::Gt, 60).matches_cell(Some(CellRef::Float(60.5)), 0));
        let big = Condition::Num { column: "Id".into(), op: Cmp::Eq, value: (1 << 53) + 1 };
        assert!(!big.matches_cell(Some(CellRef::Int(1 << 53)), 0), "longs compare exactly");
        // String operators read a long as its digits, as the index keeps it.
        let port = Condition::In { column: "LocalPort".into(), any_of: vec!["88".into()] };
        assert!(port.matches_cell(Some(CellRef::Int(88)), 0));
        assert!(
            Condition::Has { column: "A".into(), term: "x".into() }.matches_cell(Some(CellRef::Json(r#"{"x":1}"#)), 0)
        );
        let t = parse_timestamp("2025-05-07T12:00:00Z").unwrap();
        let since = Condition::Time { column: "Timestamp".into(), op: Cmp::Ge, ticks: t };
        assert!(since.matches("2025-05-07T12:00:00Z"), "inclusive at 100 ns");
        assert!(!since.matches("2025-05-07T11:59:59.9999999Z"));
        assert!(!since.matches(""));
        let ingested = Condition::Time { column: INGESTION_TIME.into(), op: Cmp::Ge, ticks: t };
        assert!(ingested.matches_cell(None, t));
        assert!(!ingested.matches_cell(None, t - 1));
        let row =
            Row { table: "T".into(), key: vec![], ingested_at: t, columns: vec![("LocalPort".into(), Cell::Int(88))] };
        assert!(all_match(&[num(Cmp::Eq, 88), ingested], &row));
        assert!(!num(Cmp::Eq, 89).matches_row(&row));
    }
}

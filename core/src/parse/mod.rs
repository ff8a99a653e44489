//! From bytes to normalised rows: opening (gzip or plain), splitting into records (lines
//! or array elements), unwrapping envelopes, telling the table, normalising columns.

mod direct;
mod flat;
pub mod lines;
pub mod normalise;
pub mod open;
pub mod pipeline;
pub mod record;

/// Why a record was kept aside; the name is what the counters and `status` show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectKind {
    MalformedJson,
    InvalidUtf8,
    LineTooLong,
    NotAnObject,
    UnknownTable,
    NoTable,
    MissingColumn,
    WrongType,
    BadTimestamp,
}

impl RejectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::MalformedJson => "malformed_json",
            RejectKind::InvalidUtf8 => "invalid_utf8",
            RejectKind::LineTooLong => "line_too_long",
            RejectKind::NotAnObject => "not_an_object",
            RejectKind::UnknownTable => "unknown_table",
            RejectKind::NoTable => "no_table",
            RejectKind::MissingColumn => "missing_column",
            RejectKind::WrongType => "wrong_type",
            RejectKind::BadTimestamp => "bad_timestamp",
        }
    }
}

/// A record that could not be stored, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub kind: RejectKind,
    pub reason: String,
}

impl Reject {
    pub fn new(kind: RejectKind, reason: impl Into<String>) -> Self {
        Reject { kind, reason: reason.into() }
    }
}

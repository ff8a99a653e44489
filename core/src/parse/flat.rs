//! The common line, read without serde: one flat JSON object whose values are strings,
//! integers, bools and nulls — every advanced-hunting export row. serde_json's generic
//! machinery (a visitor call per token, a byte-at-a-time scan of each short string) was
//! about half of the parser thread's instructions; this reads such a line in one pass,
//! finding each string's end with `memchr2`.
//!
//! It gives exactly what [`super::record`]'s serde path gives, or nothing: anything it
//! does not read the same way — a nested value, a `properties` or `records` field (an
//! envelope), a `\u` escape, a number that is not an integer within u64 / i64 (or is
//! `-0`), a control character in a string, anything that is not JSON — makes it answer `None`, and the
//! serde path reads the line (and words the error, if there is one). A property test holds
//! the two paths to the same answer.

use super::record::{Columns, Raw};
use memchr::memchr2;
use std::borrow::Cow;

/// The columns of `text` when it is one flat object this scanner reads as serde_json
/// would; `None` otherwise (see the module's comment).
pub fn parse_flat(text: &str) -> Option<Columns<'_>> {
    let mut s = Scanner::new(text);
    s.spaces();
    s.expect(b'{')?;
    let mut columns = Vec::with_capacity(48);
    s.spaces();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            s.spaces();
            s.expect(b'"')?;
            let key = s.string()?;
            if key == "properties" || key == "records" {
                // What an envelope or an Event Hub batch is made of: the serde path keeps them.
                return None;
            }
            s.spaces();
            s.expect(b':')?;
            s.spaces();
            let value = s.value()?;
            columns.push((key, value));
            s.spaces();
            match s.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
    }
    s.spaces();
    s.at_end().then_some(columns)
}

/// The byte a JSON escape stands for; `None` for `\u` (surrogate pairs, lone
/// surrogates: the serde path) and for what is not an escape.
fn unescape(c: u8) -> Option<u8> {
    Some(match c {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => return None,
    })
}

/// A cursor over one line's JSON text, for [`parse_flat`] and [`super::direct`].
pub(super) struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    pub(super) i: usize,
    /// The text holds a control character: each string is checked for one.
    controls: bool,
}

impl<'a> Scanner<'a> {
    pub(super) fn new(text: &'a str) -> Scanner<'a> {
        // JSON forbids raw control characters in strings; a line without any (one pass
        // the compiler vectorises) needs no check of each string. Pretty-printed array
        // elements have newlines between their tokens, so each of their strings is checked.
        let controls = text.bytes().fold(false, |any, c| any | (c < 0x20));
        Scanner { text, b: text.as_bytes(), i: 0, controls }
    }

    /// Whether all of the text was read.
    pub(super) fn at_end(&self) -> bool {
        self.i == self.b.len()
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    pub(super) fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    pub(super) fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    pub(super) fn spaces(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }

    /// A string's contents, the opening quote already read: borrowed when it holds no
    /// escape. Every position cut at is an ASCII byte's, so always a char boundary.
    /// Reads `name` and its closing quote (the opening one already read), if they are
    /// what comes next. Exact for a name with no quote, backslash or control character,
    /// which a line can only write as it is.
    pub(super) fn plain_name(&mut self, name: &[u8]) -> bool {
        let end = self.i + name.len();
        let found = self.b.get(self.i..end) == Some(name) && self.b.get(end) == Some(&b'"');
        if found {
            self.i = end + 1;
        }
        found
    }

    /// A string's contents (the opening quote already read) appended to `out` as the
    /// store encodes a string (its length, then its bytes, unescaped straight into `out`
    /// in one pass): where its bytes start.
    pub(super) fn string_into(&mut self, out: &mut Vec<u8>) -> Option<usize> {
        let start = self.i;
        // Room for a one-byte length, filled in (or widened) once the length is known.
        let length_at = out.len();
        out.push(0);
        let at = out.len();
        let (mut from, mut special) = (start, start + memchr2(b'"', b'\\', self.b.get(start..)?)?);
        loop {
            out.extend_from_slice(self.b.get(from..special)?);
            if self.b[special] == b'"' {
                break;
            }
            out.push(unescape(*self.b.get(special + 1)?)?);
            from = special + 2;
            special = from + memchr2(b'"', b'\\', self.b.get(from..)?)?;
        }
        if self.controls && self.b.get(start..special)?.iter().any(|c| *c < 0x20) {
            return None;
        }
        self.i = special + 1;
        let len = out.len() - at;
        if len < 251 {
            out[length_at] = len as u8;
            return Some(at);
        }
        // A longer string: its length takes 3, 5 or 9 bytes (bincode's varint).
        let (varint, n) = lookout_plugin_sdk::wire::varint(len as u64);
        out.splice(length_at..at, varint[..n].iter().copied());
        Some(at + n - 1)
    }

    pub(super) fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.i;
        let mut at = start + memchr2(b'"', b'\\', self.b.get(start..)?)?;
        if self.controls && self.b.get(start..self.string_end(at)?)?.iter().any(|c| *c < 0x20) {
            return None;
        }
        if self.b[at] == b'"' {
            self.i = at + 1;
            return Some(Cow::Borrowed(self.text.get(start..at)?));
        }
        let mut out = String::with_capacity(at - start + 16);
        let mut from = start;
        loop {
            out.push_str(self.text.get(from..at)?);
            if self.b[at] == b'"' {
                self.i = at + 1;
                return Some(Cow::Owned(out));
            }
            out.push(char::from(unescape(*self.b.get(at + 1)?)?));
            from = at + 2;
            at = from + memchr2(b'"', b'\\', self.b.get(from..)?)?;
        }
    }

    /// Where the string whose first backslash is at `at` ends: its closing quote (escapes
    /// are stepped over in pairs).
    fn string_end(&self, mut at: usize) -> Option<usize> {
        while self.b[at] == b'\\' {
            let from = at + 2;
            at = from + memchr2(b'"', b'\\', self.b.get(from..)?)?;
        }
        Some(at)
    }

    fn value(&mut self) -> Option<Raw<'a>> {
        match self.next()? {
            b'"' => self.string().map(Raw::Str),
            b'n' => self.word(b"ull").map(|()| Raw::Null),
            b't' => self.word(b"rue").map(|()| Raw::Bool(true)),
            b'f' => self.word(b"alse").map(|()| Raw::Bool(false)),
            b'-' => {
                let digits = self.integer()?;
                // serde_json: `-0` is the float -0.0, and below i64::MIN a float.
                match digits {
                    0 => None,
                    d if d <= 1 << 63 => Some(Raw::Int((d as i64).wrapping_neg())),
                    _ => None,
                }
            }
            b'0'..=b'9' => {
                self.i -= 1;
                self.integer().map(Raw::from_u64)
            }
            _ => None,
        }
    }

    /// Reads `rest`, the rest of a literal whose first letter was read.
    pub(super) fn word(&mut self, rest: &[u8]) -> Option<()> {
        let end = self.i + rest.len();
        (self.b.get(self.i..end)? == rest).then(|| self.i = end)
    }

    /// The digits of an integer as serde_json reads them: no leading zero, within u64, and
    /// not followed by a fraction or an exponent (those are floats: the serde path).
    pub(super) fn integer(&mut self) -> Option<u64> {
        let first = self.next()?;
        let mut n = u64::from(first.checked_sub(b'0').filter(|d| *d <= 9)?);
        if n == 0 {
            if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return None;
            }
        } else {
            while let Some(c) = self.peek().filter(u8::is_ascii_digit) {
                n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
                self.i += 1;
            }
        }
        match self.peek() {
            Some(b'.' | b'e' | b'E') => None,
            _ => Some(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::record::{parse_document_with_serde, Document};
    use proptest::prelude::*;

    /// What the serde path makes of `text` as a flat row: its columns, when it is an
    /// object that is not an envelope.
    fn serde_columns(text: &str) -> Option<Columns<'_>> {
        match parse_document_with_serde(text.as_bytes()) {
            Ok(Document::Object(o)) => o.into_flat_columns(),
            _ => None,
        }
    }

    fn agree(text: &str) -> Result<(), TestCaseError> {
        if let Some(fast) = parse_flat(text) {
            let slow = serde_columns(text);
            prop_assert_eq!(Some(&fast), slow.as_ref(), "{}", text);
            for ((fk, fv), (sk, sv)) in fast.iter().zip(slow.iter().flatten()) {
                // Borrowed exactly where the serde path borrows (nothing copied that need not be).
                prop_assert_eq!(matches!(fk, Cow::Borrowed(_)), matches!(sk, Cow::Borrowed(_)));
                if let (Raw::Str(f), Raw::Str(s)) = (fv, sv) {
                    prop_assert_eq!(matches!(f, Cow::Borrowed(_)), matches!(s, Cow::Borrowed(_)));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn export_rows_are_read_here_the_same_as_by_serde() {
        let line = r#"{"Timestamp":"2025-05-04T09:10:59.9195773Z","FolderPath":"C:\\Users\\carol\\x.tmp","FileSize":6003021,"InitiatingProcessCommandLine":"\"OneDrive.exe\" -k","InitiatingProcessFileSize":null,"IsX":true,"Neg":-9223372036854775808,"Big":18446744073709551615,"Zero":0,"E":""}"#;
        let fast = parse_flat(line).expect("a flat export row is read here");
        assert_eq!(Some(&fast), serde_columns(line).as_ref());
        assert_eq!(fast[1].1, Raw::Str(Cow::Owned(r"C:\Users\carol\x.tmp".into())));
        assert_eq!(fast[6].1, Raw::Int(i64::MIN));
        assert_eq!(fast[7].1, Raw::UInt(u64::MAX));
        assert!(parse_flat(" { } ").is_some_and(|c| c.is_empty()));
    }

    /// The real Defender exports, as lines and pretty-printed as array elements.
    #[test]
    fn the_kqlbench_exports_are_read_here_as_serde_reads_them() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/kqlbench");
        let (mut forms, mut read_here) = (0, 0);
        for table in ["DeviceFileEvents", "DeviceLogonEvents", "DeviceNetworkEvents", "DeviceRegistryEvents"] {
            let text = std::fs::read_to_string(dir.join(format!("{table}.json"))).unwrap();
            let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            for row in rows {
                for form in [serde_json::to_string(&row).unwrap(), serde_json::to_string_pretty(&row).unwrap()] {
                    agree(&form).unwrap();
                    forms += 1;
                    read_here += usize::from(parse_flat(&form).is_some());
                }
            }
        }
        assert!(read_here * 10 >= forms * 9, "{read_here} of {forms} rows read here");
    }

    #[test]
    fn what_is_left_to_serde() {
        for text in [
            r#"{"properties":{"a":1},"category":"AdvancedHunting-X"}"#,
            r#"{"records":[]}"#,
            r#"{"a":{"b":1}}"#,
            r#"{"a":[1]}"#,
            r#"{"a":"\u0041"}"#,
            r#"{"a":1.5}"#,
            r#"{"a":1e3}"#,
            r#"{"a":-0}"#,
            r#"{"a":-9223372036854775809}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a":01}"#,
            "{\"a\":\"x\ty\"}",
            "{\"a\":\"x\ny\"}",
            r#"{"a":1,}"#,
            r#"{"a":1} x"#,
            r#"{"a":nul}"#,
            r#"{"a":"\q"}"#,
            r#"{"a""#,
            "[1]",
            "",
        ] {
            assert!(parse_flat(text).is_none(), "{text}");
        }
    }

    fn json_string() -> impl Strategy<Value = String> {
        // Plain text, the escapes JSON has (a few `\u`), quotes, and non-ASCII.
        prop::collection::vec(
            prop_oneof![
                "[a-zA-Z0-9 .:_-]{0,12}",
                Just(r"\\".to_string()),
                Just(r#"\""#.to_string()),
                Just(r"\/".to_string()),
                Just(r"\n".to_string()),
                Just(r"\t".to_string()),
                Just(r"\b\f\r".to_string()),
                Just(r"\u00e9".to_string()),
                Just("é€😀".to_string()),
                Just(r"\x".to_string()),
            ],
            0..5,
        )
        .prop_map(|parts| format!("\"{}\"", parts.concat()))
    }

    fn json_value() -> impl Strategy<Value = String> {
        prop_oneof![
            json_string(),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "-?[0-9]{1,22}(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,2})?",
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("-0".to_string()),
            Just("{\"x\":[1,{}]}".to_string()),
            Just("[]".to_string()),
        ]
    }

    fn json_object() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            4 => json_string(),
            1 => Just("\"properties\"".to_string()),
            1 => Just("\"records\"".to_string()),
        ];
        let space = prop_oneof![Just(""), Just(" "), Just("  "), Just("\t"), Just("\r\n")];
        prop::collection::vec((key, json_value(), space.clone(), space), 0..8).prop_map(|fields| {
            let body: Vec<String> =
                fields.into_iter().map(|(k, v, s1, s2)| format!("{s1}{k}{s2}:{s1}{v}{s2}")).collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever this scanner reads, serde_json reads the same; lines it declines are
        /// serde's.
        #[test]
        fn the_scanner_agrees_with_serde(text in json_object()) {
            agree(&text)?;
        }

        /// Lines cut short, or with a byte changed, are declined or read as serde reads them.
        #[test]
        fn damaged_lines_are_declined_or_read_as_serde_reads_them(
            text in json_object(),
            cut in any::<prop::sample::Index>(),
            byte in prop::sample::select(b"{}[]\",:\\ 0-9en".to_vec()),
        ) {
            let bytes = text.as_bytes();
            let at = cut.index(bytes.len().max(1));
            agree(text.get(..at).unwrap_or(&text))?;
            let mut changed = bytes.to_vec();
            if let Some(b) = changed.get_mut(at) {
                *b = byte;
            }
            if let Ok(changed) = std::str::from_utf8(&changed) {
                agree(changed)?;
            }
        }
    }
}

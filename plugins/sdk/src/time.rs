//! Timestamps and durations in 100 ns ticks since the Unix epoch (the resolution of
//! Defender's 7-digit fractional seconds).

/// Ticks per second.
pub const TICKS_PER_SEC: i64 = 10_000_000;

/// Parses an ISO-8601 UTC timestamp `YYYY-MM-DDTHH:MM:SS[.f{1,7}](Z|+00:00)` into ticks.
/// Returns `None` for anything else (other offsets, out-of-range fields, more than 7
/// fractional digits).
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let mut v = 0i64;
        for &c in b.get(r)? {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    };
    if b[4] != b'-' || b[7] != b'-' || (b[10] != b'T' && b[10] != b't' && b[10] != b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut frac = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 7 {
            return None;
        }
        frac = num(start..i)? * 10i64.pow((7 - digits) as u32);
    }
    match &b[i..] {
        b"Z" | b"z" | b"+00:00" => {}
        _ => return None,
    }
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60 * TICKS_PER_SEC + second * TICKS_PER_SEC + frac)
}

/// Formats ticks as `YYYY-MM-DDTHH:MM:SS.fffffffZ`.
pub fn format_timestamp(ticks: i64) -> String {
    let secs = ticks.div_euclid(TICKS_PER_SEC);
    let frac = ticks.rem_euclid(TICKS_PER_SEC);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:07}Z", sod / 3600, (sod / 60) % 60, sod % 60)
}

/// Parses a duration like `2d`, `30d`, `12h`, `90m`, `45s` (a KQL timespan literal) into
/// ticks.
pub fn parse_duration(s: &str) -> Option<i64> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = n.parse().ok()?;
    let mult = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return None,
    };
    n.checked_mul(mult)?.checked_mul(TICKS_PER_SEC)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_0_to_7_fraction_digits() {
        let base = parse_timestamp("2025-05-07T16:16:24Z").unwrap();
        assert_eq!(parse_timestamp("2025-05-07T16:16:24.5Z"), Some(base + 5_000_000));
        assert_eq!(parse_timestamp("2025-05-07T16:16:24.5594049Z"), Some(base + 5_594_049));
        assert_eq!(parse_timestamp("2025-05-07T16:16:24.123+00:00"), Some(base + 1_230_000));
        assert_eq!(parse_timestamp("2025-05-07T16:16:24.12345678Z"), None);
        assert_eq!(parse_timestamp("2025-05-07T16:16:24+01:00"), None);
        assert_eq!(parse_timestamp("2025-02-29T00:00:00Z"), None);
        assert_eq!(parse_timestamp("2024-02-29T00:00:00Z").map(|t| t > 0), Some(true));
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0));
    }

    #[test]
    fn format_round_trips() {
        for s in ["2025-05-07T16:16:24.5594049Z", "1969-12-31T23:59:59.9999999Z", "2400-02-29T01:02:03.0000000Z"] {
            assert_eq!(format_timestamp(parse_timestamp(s).unwrap()), s);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2d"), Some(2 * 86_400 * TICKS_PER_SEC));
        assert_eq!(parse_duration("30d"), Some(30 * 86_400 * TICKS_PER_SEC));
        assert_eq!(parse_duration("d"), None);
        assert_eq!(parse_duration("3w"), None);
    }
}

/// KQL `datetime_diff("Second", a, b)`: whole-second boundaries crossed from `b` to `a`
/// (`floor(a) − floor(b)` at one-second resolution), not elapsed time: 0.8 s apart within
/// one second is 0, 0.2 s apart across a second boundary is 1.
pub fn datetime_diff_seconds(a: i64, b: i64) -> i64 {
    a.div_euclid(TICKS_PER_SEC) - b.div_euclid(TICKS_PER_SEC)
}

#[cfg(test)]
mod datetime_diff_tests {
    use super::*;

    #[test]
    fn datetime_diff_counts_second_boundaries() {
        let t = |s: &str| parse_timestamp(s).unwrap();
        assert_eq!(datetime_diff_seconds(t("2025-05-07T12:00:00.9Z"), t("2025-05-07T12:00:00.1Z")), 0);
        assert_eq!(datetime_diff_seconds(t("2025-05-07T12:00:00.1Z"), t("2025-05-07T12:00:00.9Z")), 0);
        assert_eq!(datetime_diff_seconds(t("2025-05-07T12:00:01.1Z"), t("2025-05-07T12:00:00.9Z")), 1);
        assert_eq!(datetime_diff_seconds(t("2025-05-07T12:00:00Z"), t("2025-05-07T12:00:10.5Z")), -10);
        assert_eq!(datetime_diff_seconds(-1, 0), -1, "before the epoch floors down");
    }
}

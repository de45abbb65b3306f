//! Formatting of values for people: sizes, times, kinds, and client strings
//! made safe to print on a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::proto::cowsnap::admin::v1 as pb;

/// A size with a binary unit and one decimal (`1.5 MiB`), or whole bytes
/// below 1 KiB (`512 B`). Columns of these line up when right-aligned.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Round first so 1023.96 KiB is written 1.0 MiB, not 1024.0 KiB.
    while (value * 10.0).round() / 10.0 >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The name of a kind as containerd writes it (`active`, `view`,
/// `committed`).
pub fn kind_name(kind: i32) -> &'static str {
    match pb::Kind::try_from(kind) {
        Ok(pb::Kind::Active) => "active",
        Ok(pb::Kind::View) => "view",
        Ok(pb::Kind::Committed) => "committed",
        Ok(pb::Kind::Unspecified) | Err(_) => "unknown",
    }
}

/// Seconds since the Unix epoch of a wire timestamp.
fn secs(t: &prost_types::Timestamp) -> i64 {
    t.seconds
}

/// A timestamp in RFC 3339, UTC, with the fraction of a second when it has
/// one and trailing zeros dropped (`2024-05-01T10:00:00.5Z`), like Go's
/// `RFC3339Nano`: what containerd's tools print.
pub fn rfc3339(t: &prost_types::Timestamp) -> String {
    let mut out = rfc3339_seconds(t);
    if t.nanos > 0 && t.nanos < 1_000_000_000 {
        out.pop(); // the Z
        let frac = format!("{:09}", t.nanos);
        let _ = write!(out, ".{}Z", frac.trim_end_matches('0'));
    }
    out
}

/// A timestamp in RFC 3339, UTC, to the second.
pub fn rfc3339_seconds(t: &prost_types::Timestamp) -> String {
    let s = secs(t);
    let days = s.div_euclid(86_400);
    let rem = s.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's days-to-civil algorithm, exact for every i64 day in range).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// How long before `now` (seconds since the epoch) `t` was, compactly:
/// `12s ago`, `5m ago`, `3h ago`, `4d ago`; `now` for times not in the
/// past (a clock set back).
pub fn relative(t: &prost_types::Timestamp, now: i64) -> String {
    let ago = now.saturating_sub(secs(t));
    match ago {
        i64::MIN..=0 => "now".into(),
        1..=59 => format!("{ago}s ago"),
        60..=3599 => format!("{}m ago", ago / 60),
        3600..=86_399 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86_400),
    }
}

/// The current time in seconds since the epoch (0 if the clock is before
/// it, which only makes relative times read "now").
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `s` with control characters escaped (`\n`, `\x1b`, ...), so a key or a
/// label chosen by a client cannot move the cursor or rewrite the
/// terminal when printed. Borrowed when nothing needs escaping.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `s` as a quoted literal of containerd's filter language (Go's
/// `strconv.Quote` for the characters that matter): `"` and `\` escaped,
/// control characters as escapes.
pub fn filter_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{FilterSet, SnapshotFields};

    fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos }
    }

    #[test]
    fn sizes_use_binary_units_with_one_decimal() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(human_bytes(20 << 30), "20.0 GiB");
        assert_eq!(human_bytes((1 << 20) - 1), "1.0 MiB", "rounds up a unit");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn timestamps_print_as_rfc3339_utc() {
        assert_eq!(rfc3339(&ts(0, 0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(&ts(951_782_400, 0)), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339(&ts(1_714_557_600, 500_000_000)),
            "2024-05-01T10:00:00.5Z"
        );
        assert_eq!(
            rfc3339(&ts(1_714_557_600, 1)),
            "2024-05-01T10:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339_seconds(&ts(1_714_557_600, 1)),
            "2024-05-01T10:00:00Z"
        );
        assert_eq!(rfc3339(&ts(-1, 0)), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(&ts(4_102_444_800, 0)), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn relative_times_are_compact() {
        let now = 1_000_000;
        assert_eq!(relative(&ts(now, 0), now), "now");
        assert_eq!(relative(&ts(now + 50, 0), now), "now");
        assert_eq!(relative(&ts(now - 12, 0), now), "12s ago");
        assert_eq!(relative(&ts(now - 300, 0), now), "5m ago");
        assert_eq!(relative(&ts(now - 3 * 3600 - 5, 0), now), "3h ago");
        assert_eq!(relative(&ts(now - 4 * 86_400, 0), now), "4d ago");
    }

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert!(matches!(printable("plain/key:1"), Cow::Borrowed(_)));
        assert_eq!(printable("a\x1b[2Jb\n"), "a\\u{1b}[2Jb\\n");
        assert_eq!(printable("é"), "é");
    }

    #[test]
    fn quoted_filter_values_match_exactly_that_string() {
        for key in [
            "plain",
            "with \"quotes\" and \\",
            "new\nline\ttab",
            "ctl\x01\x1b",
            "sha256:abc,parent==x",
        ] {
            let filter = format!("parent=={}", filter_quote(key));
            let set = FilterSet::parse(&[filter.as_str()]).expect(&filter);
            let labels = Default::default();
            let fields = |parent| SnapshotFields {
                name: "child",
                parent,
                kind: "active",
                labels: &labels,
            };
            assert!(set.matches(&fields(key)), "{filter}");
            assert!(!set.matches(&fields("other")), "{filter}");
        }
    }
}

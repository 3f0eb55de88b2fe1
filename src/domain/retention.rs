//! Retention arithmetic (pure): when a submission expires, when a period's data key may be destroyed.
//!
//! A submission made at `t` expires `months` calendar months later (the day clamps to the month's
//! length: 31 January + 1 month is 28 or 29 February). A period's data key is destroyed once the last
//! instant of the period has expired, i.e. once every submission it could have sealed is gone.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

fn to_dt(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn to_ms(dt: OffsetDateTime) -> i64 {
    (dt.unix_timestamp_nanos() / 1_000_000) as i64
}

/// `ms` moved by `months` calendar months (negative goes back), day clamped to the month's length.
pub fn add_months(ms: i64, months: i32) -> i64 {
    let dt = to_dt(ms);
    let index = dt.year() * 12 + (u8::from(dt.month()) as i32 - 1) + months;
    let (year, month0) = (index.div_euclid(12), index.rem_euclid(12));
    let month = Month::try_from(month0 as u8 + 1).expect("1..=12");
    let day = dt.day().min(time::util::days_in_month(month, year));
    match Date::from_calendar_date(year, month, day) {
        Ok(date) => to_ms(PrimitiveDateTime::new(date, dt.time()).assume_utc()),
        Err(_) => ms,
    }
}

/// When a submission made at `submitted_at` expires under a retention of `months`.
pub fn expires_at(submitted_at: i64, months: u32) -> i64 {
    add_months(submitted_at, months as i32)
}

pub fn is_expired(submitted_at: i64, months: u32, as_of: i64) -> bool {
    expires_at(submitted_at, months) <= as_of
}

/// A submission made at or before this instant may have expired as of `as_of` (a safe upper bound
/// for an index scan; each candidate is then checked with [`is_expired`]).
pub fn scan_bound(as_of: i64, months: u32) -> i64 {
    // Clamping makes add_months lossy by at most 3 days at month ends.
    add_months(as_of, -(months as i32)) + 3 * 86_400_000
}

/// The first instant after a period `YYYY-MM`.
pub fn period_end(period: &str) -> Option<i64> {
    let (y, m) = period.split_once('-')?;
    let (year, month): (i32, u8) = (y.parse().ok()?, m.parse().ok()?);
    let start = Date::from_calendar_date(year, Month::try_from(month).ok()?, 1).ok()?;
    Some(add_months(to_ms(PrimitiveDateTime::new(start, Time::MIDNIGHT).assume_utc()), 1))
}

/// Whether every submission a period's key could have sealed has expired as of `as_of`.
pub fn period_expired(period: &str, months: u32, as_of: i64) -> bool {
    period_end(period).is_some_and(|end| is_expired(end - 1, months, as_of))
}

/// Parses `--as-of`: `YYYY-MM-DD` (the end of that day, UTC) or an RFC 3339 date-time.
pub fn parse_as_of(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(dt) = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339) {
        return Ok(to_ms(dt));
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    match Date::parse(text, format) {
        Ok(d) => Ok(to_ms(PrimitiveDateTime::new(d.next_day().unwrap_or(d), Time::MIDNIGHT).assume_utc()) - 1),
        Err(_) => Err(format!(
            "{text:?} is not a date: use YYYY-MM-DD (the end of that day, UTC) or RFC 3339, e.g. 2027-12-31 or 2027-12-31T12:00:00Z"
        )),
    }
}

/// Formats ms as RFC 3339 (UTC), for reports.
pub fn format_ms(ms: i64) -> String {
    to_dt(ms)
        .to_offset(UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> i64 {
        to_ms(OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap())
    }

    #[test]
    fn thirteen_months_later_clamps_to_month_end() {
        assert_eq!(expires_at(at("2025-01-15T10:00:00Z"), 13), at("2026-02-15T10:00:00Z"));
        assert_eq!(expires_at(at("2025-01-31T10:00:00Z"), 13), at("2026-02-28T10:00:00Z"));
        assert_eq!(add_months(at("2024-03-31T00:00:00Z"), -1), at("2024-02-29T00:00:00Z"));
        assert_eq!(add_months(at("2025-12-01T00:00:00Z"), 1), at("2026-01-01T00:00:00Z"));
    }

    #[test]
    fn a_period_expires_only_when_its_last_instant_has() {
        assert!(!period_expired("2025-01", 13, at("2026-02-28T23:59:59Z")));
        assert!(period_expired("2025-01", 13, at("2026-03-01T00:00:00Z")));
        assert!(period_expired("2025-01", 13, at("2027-01-01T00:00:00Z")));
        assert!(!period_expired("nonsense", 13, at("2030-01-01T00:00:00Z")));
        assert_eq!(period_end("2025-12"), Some(at("2026-01-01T00:00:00Z")));
    }

    #[test]
    fn as_of_dates_mean_the_end_of_the_day() {
        assert_eq!(parse_as_of("2027-12-31").unwrap(), at("2028-01-01T00:00:00Z") - 1);
        assert_eq!(parse_as_of("2027-12-31T12:00:00Z").unwrap(), at("2027-12-31T12:00:00Z"));
        assert!(parse_as_of("31/12/2027").unwrap_err().contains("YYYY-MM-DD"));
    }

    proptest! {
        /// Everything the index scan skips is really not expired.
        #[test]
        fn the_scan_bound_never_misses_an_expired_submission(t in 0i64..4_000_000_000_000, months in 1u32..121, delta in 0i64..40_000_000_000) {
            let as_of = expires_at(t, months) + delta;
            prop_assert!(is_expired(t, months, as_of));
            prop_assert!(t <= scan_bound(as_of, months));
        }
    }
}

//! Times as the apiserver may store them: only strings the operator can decode.
//!
//! Two parsers read every time field. The apiserver's CEL `timestamp()` (cel-go: Go's
//! `time.Parse(time.RFC3339, s)`, then a range check of 0001-01-01T00:00:00Z to
//! 9999-12-31T23:59:59.999999999Z) and the operator's `k8s_openapi` `Time`, which is jiff's
//! `Timestamp` parser (the Temporal grammar: also `t`/`z`, a space for `T`, basic format, `,` for the
//! fraction, at most 9 fractional digits, offsets up to ±25:59:59, a leap second read as :59, and
//! instants from -009999-01-02T01:59:59Z to 9999-12-30T22:00:00.999999999Z). The OpenAPI
//! `format: date-time` check is laxer than both (it lets through `9999-12-31T00:00:00Z`, ten
//! fractional digits, `+99:00`, and trailing text after a second `T`), so one such string in any
//! object used to stop the operator's watch of every object of its kind.
//!
//! The schema written here replaces `format: date-time` with CEL rules that accept RFC 3339 as both
//! parsers read it: `YYYY-MM-DDTHH:MM:SS`, an optional `.` and 1 to 9 digits, and `Z` or `±HH:MM`
//! (hours 00-23), a year from 0001, a day that exists, and an instant from 0001-01-01T00:00:00Z to
//! 9999-12-30T22:00:00Z (fractions of that last second included). That is everything both accept
//! except what only Go's lenient fallback parser lets through (a `,` before the fraction, a one-digit
//! hour, an offset of `+24:00`) and a year 0000 pushed into year 1 by its offset. Each rule guards
//! the next, so a malformed string gets one sentence and never a CEL evaluation error.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use schemars::Schema;
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::{Value, json};

/// RFC 3339 as both the apiserver's CEL `timestamp()` and jiff read it, year 0000 excluded. The
/// day of the month and the range are checked by the other rules of [`time_rules`].
pub const TIME_PATTERN: &str = "^(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]([.][0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$";

/// The longest string a time field may hold. A valid time has at most 35 characters; the slack lets
/// a slightly-too-long time get the format sentence rather than a bare length error.
pub const TIME_MAX_LEN: usize = 64;

/// The most conditions a status may hold (the operator writes one, `Ready`). Without a bound the
/// apiserver refuses the CRD: it prices the time rules on each condition for as many conditions as
/// fit in a request.
pub const MAX_CONDITIONS: u32 = 16;

/// The message for a string that is not RFC 3339 as both parsers read it.
pub const TIME_FORMAT_MESSAGE: &str = "must be an RFC 3339 time such as 2030-01-01T00:00:00Z or 2030-01-01T09:30:00.250+02:00: a year from 0001, an uppercase T, hours, minutes and seconds, at most 9 fractional digits, and Z or an offset from -23:59 to +23:59";
/// The message for a well-formed time on a day that does not exist.
pub const TIME_DATE_MESSAGE: &str =
    "must be a date that exists: that month has fewer days (February has 29 only in leap years)";
/// The message for a time outside what the operator can represent.
pub const TIME_RANGE_MESSAGE: &str =
    "must be between 0001-01-01T00:00:00Z and 9999-12-30T22:00:00Z";

/// The latest instant jiff represents, to the second (`jiff::Timestamp::MAX` is its last
/// nanosecond).
pub const TIME_MAX: &str = "9999-12-30T22:00:00Z";
/// The earliest instant CEL `timestamp()` accepts.
pub const TIME_MIN: &str = "0001-01-01T00:00:00Z";

/// The CEL rule that the string has the format of [`TIME_PATTERN`].
pub fn time_format_rule() -> String {
    format!("self.matches('{TIME_PATTERN}')")
}

/// CEL: the day of a string in the format of [`TIME_PATTERN`] exists in its month and year.
fn day_exists() -> &'static str {
    "int(self.substring(8, 10)) <= (self.substring(5, 7) == '02' \
     ? (((int(self.substring(0, 4)) % 4 == 0 && int(self.substring(0, 4)) % 100 != 0) \
     || int(self.substring(0, 4)) % 400 == 0) ? 29 : 28) \
     : (self.substring(5, 7) in ['04', '06', '09', '11'] ? 30 : 31))"
}

/// The CEL rule that the day exists; true for strings the format rule already refuses.
pub fn time_date_rule() -> String {
    format!("!{} || {}", time_format_rule(), day_exists())
}

/// The CEL rule that the instant is in range; true for strings an earlier rule already refuses.
///
/// CEL fails (an evaluation error, not a message) on any timestamp outside 0001-01-01T00:00:00Z to
/// 9999-12-31T23:59:59.999999999Z, be it from `timestamp()` or from arithmetic: `timestamp(self)`
/// fails for a time in year 0001 whose offset takes it into year 0. So the local date and time are
/// read as UTC (always in range for years 0001-9999) and compared with each bound moved by the
/// offset: `local - offset <= max` as `local <= max + offset` (never past 9999-12-31T21:59Z), and
/// `local - offset >= min` as `local >= min + offset`, only computed for a positive offset (for
/// any other it holds, and CEL's `||` does not fail when one side is true). The fraction is left
/// out: the bounds are whole seconds, and the maximum includes its whole last second.
pub fn time_range_rule() -> String {
    let local = "timestamp(self.substring(0, 19) + 'Z')";
    let offset = "(self.endsWith('Z') ? duration('0s') : duration(self.substring(size(self) - 6, size(self) - 3) + 'h' + self.substring(size(self) - 2) + 'm'))";
    format!(
        "!{} || !({}) || ({local} <= timestamp('{TIME_MAX}') + {offset} && ({offset} <= duration('0s') || {local} >= timestamp('{TIME_MIN}') + {offset}))",
        time_format_rule(),
        day_exists(),
    )
}

/// The three rules, each with its sentence.
pub fn time_rules() -> Value {
    json!([
        {"rule": time_format_rule(), "message": TIME_FORMAT_MESSAGE},
        {"rule": time_date_rule(), "message": TIME_DATE_MESSAGE},
        {"rule": time_range_rule(), "message": TIME_RANGE_MESSAGE},
    ])
}

/// A schemars transform: every `format: date-time` string in the schema (a field, or fields deep
/// inside, such as `conditions[].lastTransitionTime`) becomes a string checked by [`time_rules`].
/// The format is removed: with it, CEL would see a timestamp instead of the string, and the
/// apiserver's own date-time check would add a second, laxer message.
pub fn strict_times(schema: &mut Schema) {
    if let Some(object) = schema.as_object_mut() {
        strict_times_in(object);
    }
}

fn strict_times_in(object: &mut serde_json::Map<String, Value>) {
    if object.get("format").and_then(Value::as_str) == Some("date-time") {
        object.remove("format");
        object.insert("maxLength".into(), json!(TIME_MAX_LEN));
        object.insert("x-kubernetes-validations".into(), time_rules());
    }
    for value in object.values_mut() {
        match value {
            Value::Object(inner) => strict_times_in(inner),
            Value::Array(items) => items
                .iter_mut()
                .filter_map(Value::as_object_mut)
                .for_each(strict_times_in),
            _ => {}
        }
    }
}

/// The instant a `validUntil` that cannot be decoded stands for: long past, so that the delegation
/// counts as ended (fail closed) instead of the whole object, and with it the operator's watch of
/// every grant, failing to decode. Only objects stored before the CRDs had [`time_rules`] can hold
/// such a value; the grant then reports `Expired` until its `validUntil` is corrected.
pub const UNREADABLE_VALID_UNTIL: Timestamp = Timestamp::MIN;

/// `deserialize_with` for an optional end time that must never make its object undecodable: a
/// string jiff cannot read becomes [`UNREADABLE_VALID_UNTIL`].
pub fn fail_closed_time<'de, D>(deserializer: D) -> Result<Option<Time>, D::Error>
where
    D: Deserializer<'de>,
{
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    Ok(Some(Time(
        text.parse::<Timestamp>().unwrap_or(UNREADABLE_VALID_UNTIL),
    )))
}

/// Decodes a status leniently: a status that does not decode (a time written through the status
/// subresource that jiff cannot read, on an object stored before the CRDs had [`time_rules`])
/// yields `T::default()`, which reads as "no status", instead of failing the whole object, and the
/// operator's watch with it. The operator only takes a status as confirmation of what it did, and
/// writes a fresh one.
///
/// `S` is the status type with a derived, strict `Deserialize`; `T` the public one.
pub(crate) fn lenient_status<'de, D, S, T>(deserializer: D, kind: &str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    S: DeserializeOwned,
    T: From<S> + Default,
{
    let value = Value::deserialize(deserializer)?;
    Ok(S::deserialize(value).map(T::from).unwrap_or_else(|error| {
        tracing::warn!(
            kind,
            %error,
            "a {kind} status could not be decoded (written by someone other than the operator?); treating it as absent"
        );
        T::default()
    }))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff;

    use super::*;

    /// What jiff (the operator's decoder) makes of a string.
    fn jiff(s: &str) -> Option<Timestamp> {
        serde_json::from_value::<Time>(json!(s)).ok().map(|t| t.0)
    }

    /// The rules of [`time_rules`], evaluated in Rust: the pattern, the day, the range.
    fn rules_accept(s: &str) -> bool {
        let re = regex_lite::Regex::new(TIME_PATTERN).unwrap();
        if !re.is_match(s) {
            return false;
        }
        let num = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
        let (year, month, day) = (num(0, 4), num(5, 7), num(8, 10));
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        if day > days {
            return false;
        }
        // Seconds since 0001-01-01T00:00:00 of the local time, minus the offset.
        let civil = jiff::civil::date(year as i16, month as i8, day as i8).at(
            num(11, 13) as i8,
            num(14, 16) as i8,
            num(17, 19) as i8,
            0,
        );
        let epoch = jiff::civil::date(1970, 1, 1).at(0, 0, 0, 0);
        let local = civil.duration_since(epoch).as_secs();
        let offset = if s.ends_with('Z') {
            0
        } else {
            let sign = if s.as_bytes()[s.len() - 6] == b'-' {
                -1
            } else {
                1
            };
            sign * (num(s.len() - 5, s.len() - 3) * 3600 + num(s.len() - 2, s.len()) * 60)
        };
        let instant = local - offset;
        let min: Timestamp = TIME_MIN.parse().unwrap();
        let max: Timestamp = TIME_MAX.parse().unwrap();
        instant >= min.as_second() && instant <= max.as_second()
    }

    #[test]
    fn jiff_reads_what_the_issue_says_it_does() {
        // Accepted by the apiserver's `format: date-time` before these rules, refused by jiff.
        for s in [
            "9999-12-31T00:00:00Z",
            "2030-01-01T00:00:00.1234567890Z",
            "2030-01-01T00:00:00+99:00",
            "2030-01-01T00:00:00ZT00:00:00",
            "",
            "2030-02-30T00:00:00Z",
        ] {
            assert_eq!(jiff(s), None, "jiff read {s:?}");
            assert!(!rules_accept(s), "the rules accept {s:?}");
        }
        // Read by jiff but refused by CEL `timestamp()` (Go's RFC 3339): the rules refuse them too.
        for s in [
            "2030-01-01t00:00:00z",
            "2030-01-01 00:00:00Z",
            "20300101T000000Z",
            "2030-01-01T00:00Z",
            "2030-01-01T00:00:60Z",
            "2030-01-01T00:00:00+25:00",
            "2030-01-01T00:00:00+02",
            "2030-01-01T00:00:00Z[Europe/Paris]",
            "0000-01-01T00:00:00Z",
            "+002030-01-01T00:00:00Z",
            "2030-01-01",
        ] {
            assert!(!rules_accept(s), "the rules accept {s:?}");
        }
        assert!(jiff("2030-01-01t00:00:00z").is_some());
        assert!(jiff("0000-01-01T00:00:00Z").is_some());
    }

    #[test]
    fn everything_the_rules_accept_jiff_reads_as_the_same_instant() {
        let accepted = [
            ("2030-01-01T00:00:00Z", 1_893_456_000),
            ("2030-01-01T02:00:00+02:00", 1_893_456_000),
            ("2029-12-31T19:00:00-05:00", 1_893_456_000),
            ("2030-01-01T00:00:00.123Z", 1_893_456_000),
            ("2030-01-01T00:00:00.123456789Z", 1_893_456_000),
            ("2024-02-29T12:00:00Z", 1_709_208_000),
            ("2000-02-29T00:00:00Z", 951_782_400),
            ("0001-01-01T00:00:00Z", -62_135_596_800),
            ("0001-01-01T01:00:00+01:00", -62_135_596_800),
            ("9999-12-30T22:00:00.999999999Z", 253_402_207_200),
            ("9999-12-31T00:00:00+02:00", 253_402_207_200),
            ("9999-12-31T21:59:00+23:59", 253_402_207_200),
        ];
        for (s, second) in accepted {
            assert!(rules_accept(s), "the rules refuse {s:?}");
            assert_eq!(jiff(s).map(|t| t.as_second()), Some(second), "{s:?}");
        }
        let refused = [
            "2030-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2030-04-31T00:00:00Z",
            "9999-12-31T00:00:00Z",
            "9999-12-30T22:00:01Z",
            "9999-12-30T21:00:01-01:00",
            "0001-01-01T00:59:59+01:00",
            "2030-13-01T00:00:00Z",
            "2030-01-01T24:00:00Z",
            "2030-01-01T00:00:00.Z",
            "2030-01-01T00:00:00,5Z",
            "2030-01-01T00:00:00+24:00",
            " 2030-01-01T00:00:00Z",
            "2030-01-01T00:00:00Z ",
        ];
        for s in refused {
            assert!(!rules_accept(s), "the rules accept {s:?}");
        }
    }

    /// Every day of a leap and a common year, of a century that is not a leap year, and of the last
    /// years: the day rule agrees with jiff's calendar, and whatever the rules accept, jiff reads.
    #[test]
    fn the_rules_never_accept_what_jiff_cannot_read() {
        for year in ["0001", "1900", "2000", "2024", "2030", "9999"] {
            for month in 1..=12 {
                for day in 1..=31 {
                    for time in ["00:00:00Z", "23:59:59.999999999-23:59", "00:00:00+23:59"] {
                        let s = format!("{year}-{month:02}-{day:02}T{time}");
                        if rules_accept(&s) {
                            assert!(jiff(&s).is_some(), "accepted but unreadable: {s:?}");
                        }
                    }
                    let midday = format!("{year}-{month:02}-{day:02}T12:00:00Z");
                    let exists =
                        jiff::civil::Date::new(year.parse().unwrap(), month as i8, day as i8)
                            .is_ok();
                    // The last day of 9999 exists but is past the range at midday.
                    let in_range = !midday.starts_with("9999-12-31");
                    assert_eq!(rules_accept(&midday), exists && in_range, "{midday}");
                }
            }
        }
    }

    /// The edges of the range, each date with offsets pushing it either way: whatever the rules
    /// accept, jiff reads; whatever jiff reads in years 0001-9999 without pushing the instant
    /// before year 1, the rules accept.
    #[test]
    fn the_range_edges_agree_with_jiff() {
        for date in [
            "0001-01-01",
            "0001-01-02",
            "9999-12-29",
            "9999-12-30",
            "9999-12-31",
        ] {
            for time in [
                "00:00:00", "00:59:59", "01:00:00", "21:59:00", "22:00:00", "22:00:01",
            ] {
                for offset in ["Z", "+23:59", "-23:59", "+01:00", "-01:00", "+02:00"] {
                    let s = format!("{date}T{time}{offset}");
                    let read = jiff(&s);
                    let after_year_0 = read.is_some_and(|t| t >= TIME_MIN.parse().unwrap());
                    assert_eq!(rules_accept(&s), after_year_0, "{s}");
                }
            }
        }
    }

    #[test]
    fn the_transform_replaces_every_date_time_format() {
        let mut schema = Schema::try_from(json!({
            "type": "object",
            "properties": {
                "at": {"type": "string", "format": "date-time", "description": "d"},
                "list": {"type": "array", "items": {"type": "object", "properties": {
                    "lastTransitionTime": {"type": "string", "format": "date-time"}
                }}},
                "other": {"type": "string", "format": "byte"}
            }
        }))
        .unwrap();
        strict_times(&mut schema);
        let v = schema.as_value();
        for at in [
            &v["properties"]["at"],
            &v["properties"]["list"]["items"]["properties"]["lastTransitionTime"],
        ] {
            assert_eq!(at.get("format"), None);
            assert_eq!(at["maxLength"], TIME_MAX_LEN);
            assert_eq!(at["x-kubernetes-validations"], time_rules());
        }
        assert_eq!(v["properties"]["at"]["description"], "d");
        assert_eq!(v["properties"]["other"]["format"], "byte");
    }

    #[test]
    fn an_unreadable_valid_until_fails_closed() {
        #[derive(Deserialize)]
        struct Spec {
            #[serde(default, deserialize_with = "fail_closed_time")]
            until: Option<Time>,
        }
        let read = |v: Value| serde_json::from_value::<Spec>(v).unwrap().until;
        assert_eq!(read(json!({})), None);
        assert_eq!(read(json!({"until": null})), None);
        assert_eq!(
            read(json!({"until": "2030-01-01T00:00:00Z"})).map(|t| t.0.as_second()),
            Some(1_893_456_000)
        );
        for hostile in ["9999-12-31T00:00:00Z", "2030-01-01T00:00:00ZT00:00:00", ""] {
            assert_eq!(
                read(json!({ "until": hostile })).map(|t| t.0),
                Some(UNREADABLE_VALID_UNTIL),
                "{hostile:?}"
            );
        }
    }
}

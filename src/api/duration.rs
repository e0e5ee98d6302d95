//! Durations as users write them in YAML: `90s`, `10m`, `1h30m`.
//!
//! The string is kept exactly as written (GitOps tools must see no drift); it is only parsed in memory.
//! The accepted form is a subset of Go's `time.ParseDuration` so that the apiserver's CEL `duration()`
//! understands the same strings and can compare them (`renewBefore < tokenTTL`).
//!
//! CEL `duration()` fails with an evaluation error ("type conversion error from 'string' to
//! 'google.protobuf.Duration'") on a string Go cannot parse, and Go cannot parse a sum above
//! 2,562,047 hours (`i64` nanoseconds). Every rule that calls `duration()` is therefore guarded by
//! [`duration_guard`]: the pattern, and at most [`DURATION_MAX_LEN`] characters, a length at which
//! no sum of six-digit groups reaches that limit (the largest is `999999h999999h99999h`, 2,099,997
//! hours).

use std::{borrow::Cow, fmt, time};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The regular expression the apiserver checks: one or more `<digits><unit>` with unit `h`, `m` or `s`.
pub const DURATION_PATTERN: &str = "^([0-9]{1,6}(h|m|s))+$";
/// The longest duration string: short enough that Go's `time.ParseDuration`, behind CEL `duration()`,
/// never overflows on a string of [`DURATION_PATTERN`].
pub const DURATION_MAX_LEN: usize = 20;
/// What the apiserver says about a string that is not a duration.
pub const DURATION_MESSAGE: &str = "must be a duration like 90s, 10m or 1h30m: whole numbers of up to 6 digits, each followed by a unit h, m or s";
/// What the apiserver says about a zero duration.
pub const DURATION_ZERO_MESSAGE: &str = "must be greater than zero, like 90s, 10m or 1h30m";

/// A CEL expression that is true when `field` (a CEL expression of type string) is a duration CEL
/// `duration()` parses: rules that call `duration(field)` start with `!(guard) || ...`, so that they
/// hold, rather than fail to evaluate, on a malformed duration (the format rule reports it).
pub fn duration_guard(field: &str) -> String {
    format!("(size({field}) <= {DURATION_MAX_LEN} && {field}.matches('{DURATION_PATTERN}'))")
}

/// A positive duration written as `<number><unit>` groups, units `h`, `m`, `s` (for example `1h30m`).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(String);

/// Why a duration string was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("duration is empty")]
    Empty,
    #[error("duration {0:?} is longer than {DURATION_MAX_LEN} characters")]
    TooLong(String),
    #[error(
        "duration {0:?} must be groups of <number><unit> with unit h, m or s, like 10m or 1h30m"
    )]
    Malformed(String),
    #[error("duration {0:?} must be greater than zero")]
    Zero(String),
}

impl Duration {
    /// Wraps a string without checking it; [`Duration::parse`] checks.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The string as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The length of time this string denotes.
    pub fn parse(&self) -> Result<time::Duration, DurationError> {
        parse_duration(&self.0)
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Duration {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

/// Parses `1h30m`-style durations: one or more groups of up to six digits followed by `h`, `m` or `s`.
pub fn parse_duration(text: &str) -> Result<time::Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.len() > DURATION_MAX_LEN {
        return Err(DurationError::TooLong(text.to_owned()));
    }
    let malformed = || DurationError::Malformed(text.to_owned());
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit_seconds = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(malformed()),
        };
        if digits.is_empty() || digits.len() > 6 {
            return Err(malformed());
        }
        let n: u64 = digits.parse().map_err(|_| malformed())?;
        total = total.saturating_add(n.saturating_mul(unit_seconds));
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(malformed());
    }
    if total == 0 {
        return Err(DurationError::Zero(text.to_owned()));
    }
    Ok(time::Duration::from_secs(total))
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // No `pattern`: the apiserver would print the raw regex. The rules say it in a sentence, and
        // the second one only calls `duration()` on strings the first accepts.
        json_schema!({
            "type": "string",
            "maxLength": DURATION_MAX_LEN,
            "x-kubernetes-validations": [
                {
                    "rule": format!("self.matches('{DURATION_PATTERN}')"),
                    "message": DURATION_MESSAGE
                },
                {
                    "rule": format!("!{} || duration(self) > duration('0s')", duration_guard("self")),
                    "message": DURATION_ZERO_MESSAGE
                }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_combined_units() {
        assert_eq!(parse_duration("90s"), Ok(time::Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(time::Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(time::Duration::from_secs(5400)));
        assert_eq!(
            parse_duration("1h0m5s"),
            Ok(time::Duration::from_secs(3605))
        );
    }

    #[test]
    fn rejects_what_the_crd_pattern_rejects() {
        for bad in [
            "", "10", "m", "10x", "1.5h", "-5m", "10 m", "1d", "1234567s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero("0s".into())));
        assert!(matches!(
            parse_duration(&"1s".repeat(20)),
            Err(DurationError::TooLong(_))
        ));
    }

    #[test]
    fn keeps_the_text_as_written() {
        let d: Duration = serde_json::from_str("\"60m\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"60m\"");
        assert_eq!(d.parse(), Ok(time::Duration::from_secs(3600)));
    }

    /// Go's `time.ParseDuration` (behind CEL `duration()`) fails above `i64::MAX` nanoseconds: no
    /// string of the pattern and at most `DURATION_MAX_LEN` characters gets there.
    #[test]
    fn no_accepted_duration_overflows_go() {
        let go_max_secs = i64::MAX as u64 / 1_000_000_000;
        // The largest sum: as many full six-digit hour groups as fit, then the longest group left.
        let mut worst = String::new();
        while worst.len() + 7 <= DURATION_MAX_LEN {
            worst.push_str("999999h");
        }
        let rest = DURATION_MAX_LEN - worst.len();
        if rest >= 2 {
            worst.push_str(&"9".repeat(rest - 1));
            worst.push('h');
        }
        assert_eq!(worst, "999999h999999h99999h");
        let secs = parse_duration(&worst).unwrap().as_secs();
        assert!(secs < go_max_secs, "{worst} = {secs}s overflows Go");
        assert!(parse_duration(&format!("{worst}1s")).is_err());
    }

    /// The apiserver's regex and our parser must agree, or a grant could pass admission and then fail
    /// in the operator (or the reverse).
    #[test]
    fn pattern_and_parser_agree() {
        let re = regex_lite::Regex::new(DURATION_PATTERN).unwrap();
        for s in [
            "1s", "10m", "1h30m", "999999s", "1x", "1", "h", "1h1", "01m", "0s",
        ] {
            let by_pattern = re.is_match(s);
            let by_parser = !matches!(
                parse_duration(s),
                Err(DurationError::Malformed(_) | DurationError::Empty)
            );
            assert_eq!(by_pattern, by_parser, "disagreement on {s:?}");
        }
    }
}

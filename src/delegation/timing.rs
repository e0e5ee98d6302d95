//! When a token expires and when the operator replaces it.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::chain::add;

/// The times of one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenTimes {
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    /// When the operator mints the replacement: after `issued_at`, and before `expires_at` unless the
    /// token can only live a single second (a limit that close), when it is renewed as it expires.
    pub renewal_at: Timestamp,
}

/// The longest random advance of a renewal, so that grants created together do not all renew in the
/// same second.
pub const MAX_JITTER: Duration = Duration::from_secs(30);

/// The least share of its lifetime a token is used before it is renewed, whatever `renewBefore` says:
/// a `renewBefore` close to `tokenTTL` would otherwise mint (and revoke) a token every second.
pub const RENEWAL_FLOOR_DIVISOR: u32 = 4;

/// Plans a token minted at `now`.
///
/// - It expires after `ttl`, but never after `not_after` (validUntil, the parent token's expiry).
/// - It is renewed `renew_before` ahead of expiry, or after two thirds of its lifetime when that is
///   absent or longer than the (possibly shortened) lifetime itself — but never before a quarter of
///   its lifetime has passed (the renewal floor).
/// - `jitter` in `[0, 1)` moves the renewal earlier by up to a tenth of the lifetime (at most
///   [`MAX_JITTER`]); the caller draws it at random, tests pass fixed values.
pub fn plan_token(
    now: Timestamp,
    ttl: Duration,
    renew_before: Option<Duration>,
    not_after: Option<Timestamp>,
    jitter: f64,
) -> TokenTimes {
    let natural_expiry = add(now, ttl);
    let expires_at = not_after.map_or(natural_expiry, |cap| cap.min(natural_expiry));
    let lifetime = expires_at.duration_since(now).unsigned_abs();
    let lead = match renew_before {
        Some(before) if before < lifetime => before,
        _ => lifetime / 3,
    };
    let jitter = jitter.clamp(0.0, 1.0);
    let max_jitter = (lifetime / 10).min(MAX_JITTER);
    let floor = lifetime / RENEWAL_FLOOR_DIVISOR;
    let advance = (lead + max_jitter.mul_f64(jitter)).min(lifetime - floor);
    let renewal_at = expires_at - SignedDuration::try_from(advance).unwrap_or(SignedDuration::ZERO);
    // Whole seconds, as the apiserver stores times: what we compute is what we read back.
    let mut renewal_at = Timestamp::from_second(renewal_at.as_second()).unwrap_or(renewal_at);
    if renewal_at <= now {
        // A lifetime too short to split: renew half-way rather than immediately.
        renewal_at = add(
            now,
            (lifetime / 2).max(Duration::from_secs(1)).min(lifetime),
        );
    }
    TokenTimes {
        issued_at: now,
        expires_at,
        renewal_at,
    }
}

/// What the operator knows about the Secret holding the current token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretState {
    /// No Secret (deleted by hand, or never written).
    Missing,
    /// The Secret holds the token the status describes.
    Intact,
    /// Someone changed the Secret; its content can no longer be trusted.
    Changed,
}

/// Why a new token is minted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueCause {
    /// The grant holds no token yet.
    First,
    /// The renewal time has come.
    Renewal,
    /// The spec or the resolved chain changed, so the current token no longer says the right thing.
    GrantChanged,
    /// The current token would outlive a limit that has since tightened (validUntil, the parent's token).
    OutlivesLimit,
    /// The Secret was deleted.
    SecretMissing,
    /// The Secret was edited.
    SecretChanged,
    /// The key that signed the token was revoked.
    KeyRevoked,
}

/// The next step for a valid grant's token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenStep {
    /// The current token stands; look again at `recheck_at`.
    Keep {
        recheck_at: Timestamp,
    },
    Issue(IssueCause),
}

/// Decides whether a valid grant needs a new token.
///
/// `current` is the token the status describes as `(expires_at, renewal_at)`; `grant_unchanged` says
/// whether the status was computed for the current spec and chain. A renewal that cannot extend the
/// token (it already lasts until `not_after`) is skipped: the grant then expires, or follows its parent.
pub fn next_step(
    current: Option<(Timestamp, Timestamp)>,
    grant_unchanged: bool,
    secret: SecretState,
    not_after: Option<Timestamp>,
    now: Timestamp,
) -> TokenStep {
    let Some((expires_at, renewal_at)) = current else {
        return TokenStep::Issue(IssueCause::First);
    };
    if expires_at <= now {
        return TokenStep::Issue(IssueCause::Renewal);
    }
    if !grant_unchanged {
        return TokenStep::Issue(IssueCause::GrantChanged);
    }
    match secret {
        SecretState::Missing => return TokenStep::Issue(IssueCause::SecretMissing),
        SecretState::Changed => return TokenStep::Issue(IssueCause::SecretChanged),
        SecretState::Intact => {}
    }
    if not_after.is_some_and(|limit| expires_at > limit) {
        return TokenStep::Issue(IssueCause::OutlivesLimit);
    }
    if now < renewal_at {
        return TokenStep::Keep {
            recheck_at: renewal_at,
        };
    }
    if not_after.is_some_and(|limit| expires_at >= limit) {
        return TokenStep::Keep {
            recheck_at: expires_at,
        };
    }
    TokenStep::Issue(IssueCause::Renewal)
}

/// A renewal with less than this left of its token does not wait for a free renewal slot.
pub const URGENT_RENEWAL: Duration = Duration::from_secs(30);

/// Whether a routine renewal may wait its turn behind revocations: its token (`(expires_at,
/// renewal_at)`) still has more than [`URGENT_RENEWAL`] left.
pub fn renewal_may_wait(current: Option<(Timestamp, Timestamp)>, now: Timestamp) -> bool {
    current.is_some_and(|(expires_at, _)| until(now, expires_at) > URGENT_RENEWAL)
}

/// When a renewal waiting in line looks again if nothing woke it: after half a minute, or when its
/// token turns urgent (to move ahead in line); an urgent one, already at the head of the line, every
/// few seconds (thousands of them must not flood the queue that revocations share).
pub fn renewal_backstop(current: Option<(Timestamp, Timestamp)>, now: Timestamp) -> Duration {
    let until_urgent = current.map_or(Duration::ZERO, |(expires_at, _)| {
        until(now, expires_at).saturating_sub(URGENT_RENEWAL)
    });
    if until_urgent.is_zero() {
        return Duration::from_secs(5);
    }
    until_urgent
        .min(Duration::from_secs(30))
        .max(Duration::from_secs(1))
}

/// How long from `now` until `at`, zero when it is already past.
pub fn until(now: Timestamp, at: Timestamp) -> Duration {
    at.duration_since(now).try_into().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn only_a_renewal_with_time_left_may_wait() {
        let token = Some((ts(1000), ts(700)));
        assert!(renewal_may_wait(token, ts(700)), "300 s left");
        assert!(renewal_may_wait(token, ts(969)), "31 s left");
        assert!(!renewal_may_wait(token, ts(970)), "30 s left: urgent");
        assert!(!renewal_may_wait(token, ts(1200)), "already expired");
        assert!(!renewal_may_wait(None, ts(0)), "no token: not a renewal");
    }

    #[test]
    fn a_waiting_renewal_looks_again_when_it_turns_urgent_and_an_urgent_one_every_few_seconds() {
        let token = Some((ts(1000), ts(800)));
        assert_eq!(
            renewal_backstop(token, ts(700)),
            Duration::from_secs(30),
            "at most 30 s"
        );
        assert_eq!(
            renewal_backstop(token, ts(960)),
            Duration::from_secs(10),
            "urgent in 10 s"
        );
        assert_eq!(renewal_backstop(token, ts(969)), Duration::from_secs(1));
        assert_eq!(
            renewal_backstop(token, ts(970)),
            Duration::from_secs(5),
            "urgent already"
        );
        assert_eq!(
            renewal_backstop(token, ts(2000)),
            Duration::from_secs(5),
            "expired"
        );
        assert_eq!(renewal_backstop(None, ts(0)), Duration::from_secs(5));
    }

    #[test]
    fn renews_after_two_thirds_by_default() {
        let t = plan_token(ts(1000), Duration::from_secs(600), None, None, 0.0);
        assert_eq!(t.expires_at, ts(1600));
        assert_eq!(t.renewal_at, ts(1400));
    }

    #[test]
    fn renew_before_sets_the_lead() {
        let t = plan_token(
            ts(0),
            Duration::from_secs(600),
            Some(Duration::from_secs(180)),
            None,
            0.0,
        );
        assert_eq!(t.renewal_at, ts(420));
    }

    #[test]
    fn expiry_is_capped_and_renewal_follows_the_shorter_lifetime() {
        let t = plan_token(
            ts(0),
            Duration::from_secs(600),
            Some(Duration::from_secs(400)),
            Some(ts(300)),
            0.0,
        );
        assert_eq!(t.expires_at, ts(300));
        assert_eq!(
            t.renewal_at,
            ts(200),
            "renewBefore longer than the capped lifetime falls back to 2/3"
        );
    }

    #[test]
    fn jitter_moves_renewal_earlier_by_at_most_a_tenth() {
        let t = plan_token(ts(0), Duration::from_secs(60), None, None, 0.999);
        assert!(t.renewal_at < ts(40) && t.renewal_at >= ts(34), "{t:?}");
        let long = plan_token(ts(0), Duration::from_secs(3600), None, None, 0.999);
        assert!(
            long.renewal_at >= ts(2400 - 30),
            "jitter is capped at 30s: {long:?}"
        );
    }

    #[test]
    fn a_grant_without_token_gets_one() {
        assert_eq!(
            next_step(None, true, SecretState::Missing, None, ts(0)),
            TokenStep::Issue(IssueCause::First)
        );
    }

    #[test]
    fn a_token_is_kept_until_its_renewal_time() {
        let current = Some((ts(600), ts(400)));
        assert_eq!(
            next_step(current, true, SecretState::Intact, None, ts(100)),
            TokenStep::Keep {
                recheck_at: ts(400)
            }
        );
        assert_eq!(
            next_step(current, true, SecretState::Intact, None, ts(400)),
            TokenStep::Issue(IssueCause::Renewal)
        );
    }

    #[test]
    fn changes_and_tampering_force_a_new_token() {
        let current = Some((ts(600), ts(400)));
        assert_eq!(
            next_step(current, false, SecretState::Intact, None, ts(1)),
            TokenStep::Issue(IssueCause::GrantChanged)
        );
        assert_eq!(
            next_step(current, true, SecretState::Missing, None, ts(1)),
            TokenStep::Issue(IssueCause::SecretMissing)
        );
        assert_eq!(
            next_step(current, true, SecretState::Changed, None, ts(1)),
            TokenStep::Issue(IssueCause::SecretChanged)
        );
        assert_eq!(
            next_step(current, true, SecretState::Intact, Some(ts(500)), ts(1)),
            TokenStep::Issue(IssueCause::OutlivesLimit)
        );
    }

    #[test]
    fn a_renewal_that_cannot_extend_the_token_waits_for_expiry() {
        // The token already ends at validUntil: renewing would only mint ever shorter tokens.
        let current = Some((ts(600), ts(400)));
        assert_eq!(
            next_step(current, true, SecretState::Intact, Some(ts(600)), ts(450)),
            TokenStep::Keep {
                recheck_at: ts(600)
            }
        );
    }

    #[test]
    fn a_renew_before_close_to_the_ttl_cannot_renew_before_a_quarter_of_the_lifetime() {
        let t = plan_token(
            ts(0),
            Duration::from_secs(600),
            Some(Duration::from_secs(599)),
            None,
            0.999,
        );
        assert_eq!(t.renewal_at, ts(150), "{t:?}");
    }

    proptest! {
        #[test]
        fn renewal_is_always_inside_the_lifetime_and_expiry_never_past_the_caps(
            ttl in 1u64..100_000,
            renew_before in proptest::option::of(1u64..100_000),
            cap in proptest::option::of(1i64..200_000),
            jitter in 0.0f64..1.0,
        ) {
            let now = ts(1_000_000);
            let not_after = cap.map(|c| ts(1_000_000 + c));
            let t = plan_token(now, Duration::from_secs(ttl), renew_before.map(Duration::from_secs), not_after, jitter);
            prop_assert!(t.expires_at <= ts(1_000_000 + ttl as i64));
            if let Some(cap) = not_after { prop_assert!(t.expires_at <= cap); }
            prop_assert!(t.renewal_at > t.issued_at || t.expires_at == t.issued_at);
            prop_assert!(t.renewal_at < t.expires_at || t.expires_at.duration_since(t.issued_at).as_secs() <= 1);
            // The renewal floor: a token is used for at least a quarter of its (whole-second) lifetime.
            let lifetime = t.expires_at.duration_since(t.issued_at).as_secs();
            prop_assert!(t.renewal_at.duration_since(t.issued_at).as_secs() >= lifetime / 4);
        }
    }
}

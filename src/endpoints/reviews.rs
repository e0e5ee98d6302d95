//! The apiserver calls made on behalf of the endpoints' callers — a TokenReview for who sends a
//! Bearer token to `/introspect` or `/metrics`, a SubjectAccessReview for what it may do — kept from
//! turning a flood into apiserver load or into delay for the operator's own writes:
//!
//! - **per source**: a request whose answer is not cached costs its client address one token of a
//!   bucket (`--caller-rate`, `--caller-burst`); a caller the apiserver then accepts gets it back, so
//!   in effect only unauthenticated and unauthorised requests are counted. An empty bucket is a 429
//!   with `Retry-After`, before anything is asked;
//! - **cached answers**: keyed by a SHA-256 of the token (or of the review), never the token itself;
//!   refusals for `--review-negative-cache-ttl`, acceptances for `--review-cache-ttl`; bounded;
//! - **a budget of its own**: a separate `Client` (its own connection pool, so the Lease renewals
//!   and revocations of the operator's client never queue behind it), at most
//!   `--review-concurrency` calls in flight and `--review-rate` a second. A call that cannot get its
//!   turn within [`MAX_BUDGET_WAIT`] is not made: the caller gets 503 and tries again.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::SubjectAccessReview,
};
use kube::{Api, Client, api::PostParams};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::limits::{ExpiringCache, Rate, SourceLimiter, TokenBucket, source_of};
use crate::metrics::{Metrics, metrics};

/// The limits; see the module documentation and the `run` flags of the same names.
#[derive(Clone, Debug)]
pub struct ReviewSettings {
    /// Per client address: requests that need an apiserver review (refunded when it accepts).
    pub per_source: Rate,
    /// Reviews in flight at once.
    pub concurrency: usize,
    /// Reviews a second (burst: one second's worth).
    pub per_second: f64,
    /// How long an acceptance (authenticated, allowed) is reused.
    pub cache_ttl: Duration,
    /// How long a refusal (not authenticated, not allowed) is reused.
    pub negative_cache_ttl: Duration,
}

/// The longest a call waits for its turn in the budget; beyond it the caller gets 503. Short: a
/// waiting request holds one of the listener's connections.
pub const MAX_BUDGET_WAIT: Duration = Duration::from_secs(2);
/// Reviews take milliseconds; one that hangs must not hold a budget slot for long.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Client addresses with a bucket of their own (about 100 bytes each); more share one bucket.
const MAX_SOURCES: usize = 4096;
/// Cached answers per kind of review (an authentication keeps the caller's UserInfo, well under
/// 1 KiB; a few MiB at most).
const MAX_CACHED_ANSWERS: usize = 4096;

/// Why a caller was not answered.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// 429: its address is over its budget; try again after this long.
    RateLimited(Duration),
    /// 503: the apiserver could not be asked now.
    Unavailable,
}

/// One request's account with the per-source limiter: it pays once, for its first uncached call.
#[derive(Debug)]
pub struct Charge {
    source: IpAddr,
    paid: bool,
}

impl Charge {
    /// A request from `address` (`None`: unknown, charged to one shared source).
    pub fn new(address: Option<IpAddr>) -> Self {
        Self {
            source: address.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), source_of),
            paid: false,
        }
    }
}

pub struct Reviews {
    client: Client,
    settings: ReviewSettings,
    in_flight: Semaphore,
    budget: Mutex<TokenBucket>,
    sources: Mutex<SourceLimiter>,
    authentications: Mutex<ExpiringCache<[u8; 32], Option<UserInfo>>>,
    authorizations: Mutex<ExpiringCache<[u8; 32], bool>>,
}

impl Reviews {
    /// `client` should be one of its own (see the module documentation).
    pub fn new(client: Client, settings: ReviewSettings) -> Self {
        let now = Instant::now();
        Self {
            client,
            in_flight: Semaphore::new(settings.concurrency.max(1)),
            budget: Mutex::new(TokenBucket::full(budget_rate(&settings), now)),
            sources: Mutex::new(SourceLimiter::new(settings.per_source, MAX_SOURCES, now)),
            authentications: Mutex::new(ExpiringCache::new(MAX_CACHED_ANSWERS)),
            authorizations: Mutex::new(ExpiringCache::new(MAX_CACHED_ANSWERS)),
            settings,
        }
    }

    /// Who the bearer of `token` is, if the apiserver accepts it — for `audience` when given (and
    /// then only if the review confirms that audience: an authenticator that ignores audiences
    /// answers with none, which must not count), else for the apiserver's own.
    pub async fn authenticate(
        &self,
        charge: &mut Charge,
        audience: Option<&str>,
        token: &str,
    ) -> Result<Option<UserInfo>, Refusal> {
        let key = digest(&[
            b"TokenReview",
            audience.unwrap_or("").as_bytes(),
            token.as_bytes(),
        ]);
        if let Some(known) = cached(&self.authentications, &key) {
            count_cache_hit("TokenReview", known.is_some());
            return Ok(known);
        }
        self.pay(charge)?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: audience.map(|a| vec![a.to_owned()]),
            },
            ..Default::default()
        };
        let api = Api::<TokenReview>::all(self.client.clone());
        let reviewed = self
            .within_budget("TokenReview", api.create(&PostParams::default(), &review))
            .await?;
        let user = reviewed
            .status
            .filter(|s| s.authenticated == Some(true))
            .filter(|s| {
                audience.is_none_or(|wanted| {
                    s.audiences
                        .as_ref()
                        .is_some_and(|a| a.iter().any(|a| a == wanted))
                })
            })
            .and_then(|s| s.user);
        count_review("TokenReview", answer(user.is_some()));
        let ttl = match user.is_some() {
            true => within_validity(self.ttl(true), token, unix_now()),
            false => self.ttl(false),
        };
        remember(&self.authentications, key, user.clone(), ttl);
        Ok(user)
    }

    /// Whether the apiserver allows what `review` asks.
    pub async fn allowed(
        &self,
        charge: &mut Charge,
        review: SubjectAccessReview,
    ) -> Result<bool, Refusal> {
        let spec = serde_json::to_vec(&review.spec).unwrap_or_default();
        let key = digest(&[b"SubjectAccessReview", &spec]);
        if let Some(known) = cached(&self.authorizations, &key) {
            count_cache_hit("SubjectAccessReview", known);
            return Ok(known);
        }
        self.pay(charge)?;
        let api = Api::<SubjectAccessReview>::all(self.client.clone());
        let reviewed = self
            .within_budget(
                "SubjectAccessReview",
                api.create(&PostParams::default(), &review),
            )
            .await?;
        let allowed = reviewed.status.is_some_and(|s| s.allowed);
        count_review("SubjectAccessReview", answer(allowed));
        remember(&self.authorizations, key, allowed, self.ttl(allowed));
        Ok(allowed)
    }

    /// The caller turned out to be authenticated and authorised: its address gets its token back.
    pub fn accepted(&self, charge: &mut Charge) {
        if std::mem::take(&mut charge.paid)
            && let Ok(mut sources) = self.sources.lock()
        {
            sources.refund(charge.source, Instant::now());
        }
    }

    fn ttl(&self, accepted: bool) -> Duration {
        if accepted {
            self.settings.cache_ttl
        } else {
            self.settings.negative_cache_ttl
        }
    }

    /// Takes the request's token from its address's bucket, once.
    fn pay(&self, charge: &mut Charge) -> Result<(), Refusal> {
        if charge.paid {
            return Ok(());
        }
        let mut sources = self.sources.lock().map_err(|_| Refusal::Unavailable)?;
        sources
            .try_take(charge.source, Instant::now())
            .map_err(Refusal::RateLimited)?;
        charge.paid = true;
        Ok(())
    }

    /// Makes `call` once a slot and a token of the budget are free, unless that takes longer than
    /// [`MAX_BUDGET_WAIT`].
    async fn within_budget<T>(
        &self,
        review: &'static str,
        call: impl Future<Output = kube::Result<T>>,
    ) -> Result<T, Refusal> {
        let started = Instant::now();
        let deadline = started + MAX_BUDGET_WAIT;
        let mut waited = false;
        let _slot = match self.in_flight.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                waited = true;
                match tokio::time::timeout(MAX_BUDGET_WAIT, self.in_flight.acquire()).await {
                    Ok(Ok(slot)) => slot,
                    _ => return Err(gave_up()),
                }
            }
        };
        loop {
            let now = Instant::now();
            let turn = match self.budget.lock() {
                Ok(mut budget) => budget.try_take(budget_rate(&self.settings), now),
                Err(_) => return Err(Refusal::Unavailable),
            };
            match turn {
                Ok(()) => break,
                Err(wait) if now + wait <= deadline => {
                    waited = true;
                    tokio::time::sleep(wait).await;
                }
                Err(_) => return Err(gave_up()),
            }
        }
        if waited {
            count_budget_wait("waited");
        }
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                tracing::warn!(review, error = %e, "a review for an endpoint caller failed");
                count_review(review, "error");
                Err(Refusal::Unavailable)
            }
            Err(_) => {
                tracing::warn!(review, "a review for an endpoint caller timed out");
                count_review(review, "error");
                Err(Refusal::Unavailable)
            }
        }
    }
}

/// How long an acceptance of `token` may be reused: `ttl`, but never past the token's own `exp` (a
/// JWT's, read unverified: the apiserver has just accepted it, and the value can only shorten the
/// reuse). A token without `exp` (a legacy Secret-based ServiceAccount token never expires) gets `ttl`.
fn within_validity(ttl: Duration, token: &str, now_unix: i64) -> Duration {
    let exp =
        crate::verification::unverified_claims(token).and_then(|claims| claims["exp"].as_i64());
    match exp {
        None => ttl,
        Some(exp) => ttl.min(Duration::from_secs(
            u64::try_from(exp.saturating_sub(now_unix)).unwrap_or(0),
        )),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The budget's bucket: `--review-rate` a second, one second's worth at once.
fn budget_rate(settings: &ReviewSettings) -> Rate {
    let burst = settings.per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
    Rate::new(settings.per_second, burst)
}

fn gave_up() -> Refusal {
    count_budget_wait("gave_up");
    Refusal::Unavailable
}

/// A SHA-256 of the parts, each length-prefixed (so no two different part lists hash alike).
fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn cached<V: Clone>(cache: &Mutex<ExpiringCache<[u8; 32], V>>, key: &[u8; 32]) -> Option<V> {
    cache.lock().ok()?.get(key, Instant::now())
}

fn remember<V: Clone>(
    cache: &Mutex<ExpiringCache<[u8; 32], V>>,
    key: [u8; 32],
    value: V,
    ttl: Duration,
) {
    if let Ok(mut cache) = cache.lock() {
        cache.insert(key, value, ttl, Instant::now());
    }
}

fn answer(accepted: bool) -> &'static str {
    if accepted { "accepted" } else { "refused" }
}

fn count_review(review: &str, answer: &str) {
    Metrics::count_review(&metrics().caller_reviews, review, answer);
}

fn count_cache_hit(review: &str, accepted: bool) {
    Metrics::count_review(
        &metrics().caller_review_cache_hits,
        review,
        answer(accepted),
    );
}

fn count_budget_wait(outcome: &str) {
    metrics()
        .review_budget_waits
        .get_or_create(&crate::metrics::OutcomeLabels {
            outcome: outcome.to_owned(),
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_separate_their_parts() {
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
        assert_eq!(digest(&[b"a", b"b"]), digest(&[b"a", b"b"]));
    }

    #[test]
    fn the_budget_holds_one_seconds_worth() {
        let settings = ReviewSettings {
            per_source: Rate::new(1.0, 1),
            concurrency: 1,
            per_second: 20.0,
            cache_ttl: Duration::ZERO,
            negative_cache_ttl: Duration::ZERO,
        };
        assert_eq!(budget_rate(&settings), Rate::new(20.0, 20));
        let slow = ReviewSettings {
            per_second: 0.5,
            ..settings
        };
        assert_eq!(budget_rate(&slow).burst, 1.0);
    }

    /// An acceptance is reused for the cache's time, never past the token's `exp`, and not at all
    /// once it has passed.
    #[test]
    fn an_acceptance_is_not_reused_past_the_tokens_expiry() {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        let jwt = |claims: &str| format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims));
        let ttl = Duration::from_secs(10);
        assert_eq!(
            within_validity(ttl, &jwt(r#"{"exp":1004}"#), 1000),
            Duration::from_secs(4)
        );
        assert_eq!(within_validity(ttl, &jwt(r#"{"exp":2000}"#), 1000), ttl);
        assert_eq!(
            within_validity(ttl, &jwt(r#"{"exp":999}"#), 1000),
            Duration::ZERO
        );
        assert_eq!(within_validity(ttl, &jwt(r#"{"sub":"x"}"#), 1000), ttl);
        assert_eq!(within_validity(ttl, "not a jwt", 1000), ttl);
    }

    #[test]
    fn requests_from_unknown_addresses_share_one_source() {
        assert_eq!(Charge::new(None).source, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
}

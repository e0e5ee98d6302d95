//! Prometheus metrics, served at `/metrics` by [`crate::endpoints`].
//!
//! Counters are process-wide (like the default registry of other clients): the audit trail counts
//! what it records, the controllers time their reconciles. Per-grant gauges are not kept as series:
//! they are computed from the grants cache at scrape time (as cert-manager does for certificates), so
//! a deleted grant leaves nothing behind and a standby replica, which has no cache, reports none.

use std::sync::{Arc, OnceLock, RwLock, atomic::AtomicI64};

use crate::operator::caches::grant_cache::{GrantCache, GrantSummary};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of the token counters: the audit action's reason (`Issued`, `AgentSuspended`,
/// `DeniedScopeNotAllowed`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

/// A lane of the grants' fair queue (`revocation`, `routine`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    namespace: String,
    name: String,
    actor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadyLabels {
    namespace: String,
    name: String,
    actor: String,
    condition: String,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub issued: Family<ReasonLabels, Counter>,
    pub rotated: Family<ReasonLabels, Counter>,
    pub revoked: Family<ReasonLabels, Counter>,
    pub denied: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub reconcile_errors: Family<ControllerLabels, Counter>,
    /// The grants' fair queue, by lane: how long an admitted grant waited, and how many wait.
    pub grant_queue_wait: Family<LaneLabels, Histogram>,
    pub grant_queue_depth: Family<LaneLabels, Gauge<i64, AtomicI64>>,
    pub introspections: Family<ResultLabels, Counter>,
    /// RFC 8693 token exchanges, by result (`exchanged`, or the refusal's reason label).
    pub token_exchanges: Family<ResultLabels, Counter>,
    pub caller_reviews: Family<ReviewLabels, Counter>,
    pub caller_review_cache_hits: Family<ReviewLabels, Counter>,
    pub rate_limited: Family<PathLabels, Counter>,
    pub review_budget_waits: Family<OutcomeLabels, Counter>,
    pub leader: Gauge<i64, AtomicI64>,
    pub events_dropped: Counter,
    /// Status-list capacity (set by the leader at each allocation and maintenance).
    pub status_lists: Gauge<i64, AtomicI64>,
    pub status_list_entries_allocated: Gauge<i64, AtomicI64>,
    pub status_list_entries_limit: Gauge<i64, AtomicI64>,
    pub status_list_namespace_budget: Gauge<i64, AtomicI64>,
    pub status_list_namespace_entries: Family<NamespaceLabels, Gauge<i64, AtomicI64>>,
    grants: Arc<RwLock<Option<Arc<GrantCache>>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// An apiserver review made for an endpoint caller: `TokenReview` or `SubjectAccessReview`, and its
/// answer (`accepted`, `refused`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub review: String,
    pub answer: String,
}

/// An endpoint path (`/introspect`, `/metrics`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// The process's metrics, created on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("delegation");
        let issued = Family::<ReasonLabels, Counter>::default();
        let rotated = Family::<ReasonLabels, Counter>::default();
        let revoked = Family::<ReasonLabels, Counter>::default();
        let denied = Family::<ReasonLabels, Counter>::default();
        // 1 ms .. ~16 s: a reconcile is a few API round trips.
        let reconcile_duration = Family::<ControllerLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 15))) as fn() -> Histogram,
        );
        let reconcile_errors = Family::<ControllerLabels, Counter>::default();
        // 1 ms .. ~2 min: a revocation should wait milliseconds, a burst's last grant minutes.
        let grant_queue_wait = Family::<LaneLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 18))) as fn() -> Histogram,
        );
        let grant_queue_depth = Family::<LaneLabels, Gauge<i64, AtomicI64>>::default();
        let introspections = Family::<ResultLabels, Counter>::default();
        let token_exchanges = Family::<ResultLabels, Counter>::default();
        let caller_reviews = Family::<ReviewLabels, Counter>::default();
        let caller_review_cache_hits = Family::<ReviewLabels, Counter>::default();
        let rate_limited = Family::<PathLabels, Counter>::default();
        let review_budget_waits = Family::<OutcomeLabels, Counter>::default();
        let leader = Gauge::<i64, AtomicI64>::default();
        let events_dropped = Counter::default();
        let status_lists = Gauge::<i64, AtomicI64>::default();
        let status_list_entries_allocated = Gauge::<i64, AtomicI64>::default();
        let status_list_entries_limit = Gauge::<i64, AtomicI64>::default();
        let status_list_namespace_budget = Gauge::<i64, AtomicI64>::default();
        let status_list_namespace_entries =
            Family::<NamespaceLabels, Gauge<i64, AtomicI64>>::default();
        // Counter names get `_total` on encoding.
        registry.register(
            "tokens_issued",
            "Tokens minted for a grant's first issuance or after a change",
            issued.clone(),
        );
        registry.register(
            "tokens_rotated",
            "Tokens replaced before expiry",
            rotated.clone(),
        );
        registry.register(
            "tokens_revoked",
            "Revocations, by reason (deleted, suspended, agent suspended, expired, ...)",
            revoked.clone(),
        );
        registry.register("grants_denied", "Grants refused, by reason", denied.clone());
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconcile took",
            prometheus_client::registry::Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and were retried",
            reconcile_errors.clone(),
        );
        registry.register_with_unit(
            "grant_queue_wait",
            "How long a grant waited in the fair queue before its reconcile started, by lane (revocation: deletions and suspensions of grants holding a token; routine: the rest)",
            prometheus_client::registry::Unit::Seconds,
            grant_queue_wait.clone(),
        );
        registry.register(
            "grant_queue_depth",
            "Grants waiting in the fair queue for a reconcile slot, by lane",
            grant_queue_depth.clone(),
        );
        registry.register(
            "introspection_requests",
            "RFC 7662 introspection requests, by result (active, inactive, unauthenticated, bad_request, rate_limited, error)",
            introspections.clone(),
        );
        registry.register(
            "token_exchanges",
            "RFC 8693 token exchanges at <issuer>/token, by result (exchanged, or why it was refused: wider_scope, not_an_actor, subject_revoked, ...)",
            token_exchanges.clone(),
        );
        registry.register(
            "caller_reviews",
            "TokenReviews and SubjectAccessReviews sent to the apiserver for callers of /introspect and /metrics, by review and answer (accepted, refused, error)",
            caller_reviews.clone(),
        );
        registry.register(
            "caller_review_cache_hits",
            "Caller reviews answered from the cache instead of the apiserver, by review and answer",
            caller_review_cache_hits.clone(),
        );
        registry.register(
            "rate_limited_requests",
            "Requests answered 429: their client address was over its budget of requests needing an apiserver review",
            rate_limited.clone(),
        );
        registry.register(
            "review_budget_waits",
            "Caller reviews that waited for the review budget (--review-concurrency, --review-rate), by outcome: waited, or gave_up (answered 503)",
            review_budget_waits.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease (it alone writes), else 0",
            leader.clone(),
        );
        registry.register(
            "events_dropped",
            "Kubernetes Events dropped unwritten: their writer's queue was full, or Normal Events were over their rate",
            events_dropped.clone(),
        );
        registry.register(
            "status_lists",
            "Live Token Status Lists (each retires once all its tokens have expired)",
            status_lists.clone(),
        );
        registry.register(
            "status_list_entries_allocated",
            "Status-list entries handed out in live lists (never handed out again)",
            status_list_entries_allocated.clone(),
        );
        registry.register(
            "status_list_entries_limit",
            "Status-list entries the safety limit allows (--status-list-max-lists lists)",
            status_list_entries_limit.clone(),
        );
        registry.register(
            "status_list_namespace_budget",
            "Status-list entries one namespace may hold (--status-list-budget-per-namespace)",
            status_list_namespace_budget.clone(),
        );
        registry.register(
            "status_list_namespace_entries",
            "Status-list entries a namespace holds in lists that have not retired",
            status_list_namespace_entries.clone(),
        );
        let grants: Arc<RwLock<Option<Arc<GrantCache>>>> = Arc::default();
        registry.register_collector(Box::new(GrantCollector(grants.clone())));
        Self {
            registry,
            issued,
            rotated,
            revoked,
            denied,
            reconcile_duration,
            reconcile_errors,
            grant_queue_wait,
            grant_queue_depth,
            introspections,
            token_exchanges,
            caller_reviews,
            caller_review_cache_hits,
            rate_limited,
            review_budget_waits,
            leader,
            events_dropped,
            status_lists,
            status_list_entries_allocated,
            status_list_entries_limit,
            status_list_namespace_budget,
            status_list_namespace_entries,
            grants,
        }
    }

    /// Sets the status-list capacity gauges.
    pub fn report_status_lists(&self, usage: crate::status_list::Usage, budget: usize) {
        self.status_lists.set(gauge(usage.lists));
        self.status_list_entries_allocated
            .set(gauge(usage.allocated));
        self.status_list_entries_limit.set(gauge(usage.limit));
        self.status_list_namespace_budget.set(gauge(budget));
    }

    /// Sets what one namespace holds (after an allocation: only its own series changed).
    pub fn report_namespace_entries(&self, namespace: &str, held: usize) {
        let labels = NamespaceLabels {
            namespace: namespace.to_owned(),
        };
        self.status_list_namespace_entries
            .get_or_create(&labels)
            .set(gauge(held));
    }

    /// Replaces every namespace's series (after lists retired): one holding nothing has none.
    pub fn replace_namespace_entries<'a>(
        &self,
        by_namespace: impl Iterator<Item = (&'a str, usize)>,
    ) {
        self.status_list_namespace_entries.clear();
        for (namespace, held) in by_namespace {
            self.report_namespace_entries(namespace, held);
        }
    }

    /// The grants cache the per-grant gauges are read from (set by the leader; `None` on standby).
    pub fn watch_grants(&self, store: Option<Arc<GrantCache>>) {
        if let Ok(mut held) = self.grants.write() {
            *held = store;
        }
    }

    /// Counts one token event of `family` (`issued`, `rotated`, `revoked` or `denied`) for `reason`.
    /// The audit trail chooses the family: metrics know nothing of audit records.
    pub fn count(family: &Family<ReasonLabels, Counter>, reason: &str) {
        family
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one caller review (made, or answered from the cache) in `family`.
    pub fn count_review(family: &Family<ReviewLabels, Counter>, review: &str, answer: &str) {
        family
            .get_or_create(&ReviewLabels {
                review: review.to_owned(),
                answer: answer.to_owned(),
            })
            .inc();
    }

    /// Counts one request to `path` refused with 429.
    pub fn count_rate_limited(&self, path: &str) {
        self.rate_limited
            .get_or_create(&PathLabels {
                path: path.to_owned(),
            })
            .inc();
    }

    /// Times one reconcile of `controller` and counts it as an error when it failed.
    pub fn observe_reconcile(&self, controller: &str, seconds: f64, failed: bool) {
        let labels = ControllerLabels {
            controller: controller.to_owned(),
        };
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(seconds);
        if failed {
            self.reconcile_errors.get_or_create(&labels).inc();
        }
    }

    /// Records how long a grant waited in `lane` of the fair queue before it was admitted.
    pub fn observe_queue_wait(&self, lane: &'static str, seconds: f64) {
        self.grant_queue_wait
            .get_or_create(&LaneLabels { lane })
            .observe(seconds);
    }

    /// Sets how many grants wait in `lane` of the fair queue.
    pub fn report_queue_depth(&self, lane: &'static str, waiting: usize) {
        self.grant_queue_depth
            .get_or_create(&LaneLabels { lane })
            .set(gauge(waiting));
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Per-grant gauges, computed from the cache at each scrape.
#[derive(Debug)]
struct GrantCollector(Arc<RwLock<Option<Arc<GrantCache>>>>);

impl Collector for GrantCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(store) = self.0.read().ok().and_then(|s| s.clone()) else {
            return Ok(());
        };
        let grants = store.summaries();
        let mut expiry = encoder.encode_descriptor(
            "grant_token_expiration_timestamp_seconds",
            "When the grant's current token expires (Unix seconds); absent without a token",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for grant in &grants {
            let Some(expires_at) = grant.token_expires_at else {
                continue;
            };
            let gauge = ConstGauge::new(expires_at);
            gauge.encode(expiry.encode_family(&grant_labels(grant))?)?;
        }
        let mut ready = encoder.encode_descriptor(
            "grant_ready_status",
            "The grant's Ready condition: 1 for the current value (True, False or Unknown)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for grant in &grants {
            for value in ["True", "False", "Unknown"] {
                let base = grant_labels(grant);
                let labels = ReadyLabels {
                    namespace: base.namespace,
                    name: base.name,
                    actor: base.actor,
                    condition: value.to_owned(),
                };
                let gauge = ConstGauge::new(i64::from(grant.ready.as_str() == value));
                gauge.encode(ready.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn grant_labels(grant: &GrantSummary) -> GrantLabels {
    GrantLabels {
        namespace: grant.namespace.to_string(),
        name: grant.name.to_string(),
        actor: grant.actor.to_string(),
    }
}

/// Returns the reconcile's outcome after recording how long it took and whether it failed.
pub async fn timed<T, E>(
    controller: &'static str,
    reconcile: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = std::time::Instant::now();
    let outcome = reconcile.await;
    metrics().observe_reconcile(
        controller,
        started.elapsed().as_secs_f64(),
        outcome.is_err(),
    );
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text format: counters get `_total`, every family carries its help, and a counted reason
    /// shows as a label.
    #[test]
    fn counts_show_in_the_text_format() {
        let m = Metrics::new();
        Metrics::count(&m.revoked, "AgentSuspended");
        Metrics::count(&m.revoked, "AgentSuspended");
        m.observe_reconcile("grants", 0.004, true);
        m.leader.set(1);
        m.events_dropped.inc();
        m.observe_queue_wait("revocation", 0.003);
        m.report_queue_depth("routine", 9_000);
        let text = m.encode().unwrap();
        assert!(
            text.contains("delegation_tokens_revoked_total{reason=\"AgentSuspended\"} 2"),
            "{text}"
        );
        assert!(text.contains("delegation_reconcile_errors_total{controller=\"grants\"} 1"));
        assert!(
            text.contains("delegation_reconcile_duration_seconds_count{controller=\"grants\"} 1")
        );
        assert!(text.contains("delegation_leader 1"));
        assert!(
            text.contains("delegation_grant_queue_wait_seconds_count{lane=\"revocation\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("delegation_grant_queue_depth{lane=\"routine\"} 9000"),
            "{text}"
        );
        assert!(text.contains("delegation_events_dropped_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    /// Without a grants cache (a standby), no per-grant series at all.
    #[test]
    fn a_standby_reports_no_grant_series() {
        let m = Metrics::new();
        let text = m.encode().unwrap();
        assert!(!text.contains("grant_token_expiration"), "{text}");
    }
}

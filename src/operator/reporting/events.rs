//! Kubernetes Events (`events.k8s.io/v1`) on our objects, written off the reconcile path.
//!
//! [`Recorder::publish`] only queues: a reconcile never waits for an Event. One task drains the
//! queue and writes each Event. An Event that repeats one seen within [`SERIES_WINDOW`] (same type,
//! reason, action and object) is not created again: the existing one's `series` is patched, as
//! client-go's recorder does. What it remembers per series is a hash, a name and a count ([`Recent`]),
//! and forgetting old series never scans them all, so the work per Event does not grow with the
//! number of objects.
//!
//! Normal Events are also rate-limited ([`NORMAL_BURST`], then [`NORMAL_PER_SECOND`]): each is an
//! apiserver write, and a burst of thousands of grants issued at once would otherwise spend a large
//! share of the apiserver's work on Events nobody reads, slowing the issuance they describe. A
//! Normal Event over the limit is dropped and counted like one dropped from a full queue. Warnings
//! are never rate-limited: each says something needs a person.

use std::{
    collections::{HashMap, VecDeque, hash_map},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        events::v1::{Event, EventSeries},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{EventType, Reporter},
};
use tokio::sync::mpsc;

use crate::operator::error::is_not_found;

/// Events waiting for the writer. Publishing never waits, so when a burst outruns the writer (a
/// thousand grants issued at once) the excess is dropped and counted, as client-go's recorder drops
/// (its queue holds 1000): Events are a courtesy to `kubectl describe`, the status and the audit trail
/// are the record. Bounded so that a burst cannot grow memory: each waiting Event holds an object
/// reference and a short note, well under 1 KiB.
pub const QUEUE_CAPACITY: usize = 1024;

/// A repeat within this long after the last occurrence extends that Event's series (client-go's and
/// kube-rs's value); later, a new Event is created.
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// Where reconciles publish Events; cheap to clone. The writer task ends when every clone is gone.
#[derive(Clone)]
pub struct Recorder {
    queue: mpsc::Sender<Pending>,
}

/// One Event waiting to be written.
struct Pending {
    regarding: ObjectReference,
    type_: EventType,
    reason: String,
    action: String,
    note: String,
    observed: Timestamp,
}

impl Recorder {
    /// Starts the writer task (on the current tokio runtime) reporting as `reporter`.
    pub fn start(client: Client, reporter: Reporter) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE_CAPACITY);
        let writer = Writer {
            client,
            instance: reporter
                .instance
                .unwrap_or_else(|| reporter.controller.clone()),
            controller: reporter.controller,
            series: Recent::new(SERIES_WINDOW),
            normal: Bucket::full(NORMAL_BURST, NORMAL_PER_SECOND, Instant::now()),
        };
        tokio::spawn(writer.run(pending));
        Self { queue }
    }

    /// Queues an Event about `regarding` and returns at once (its note cut to what the apiserver
    /// takes, [`MAX_NOTE`]); when the queue is full the Event is
    /// dropped and counted in `delegation_events_dropped_total`.
    pub fn publish(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let pending = Pending {
            regarding,
            type_,
            reason: reason.to_owned(),
            action: action.to_owned(),
            note: fit_note(note),
            observed: Timestamp::now(),
        };
        if let Err(e) = self.queue.try_send(pending) {
            crate::metrics::metrics().events_dropped.inc();
            let (why, pending) = match e {
                mpsc::error::TrySendError::Full(p) => ("the queue is full", p),
                mpsc::error::TrySendError::Closed(p) => ("the writer has stopped", p),
            };
            // Debug only: a burst must not turn into as many log lines.
            tracing::debug!(
                object = pending.regarding.name.as_deref().unwrap_or_default(),
                reason = %pending.reason,
                "event dropped: {why}"
            );
        }
    }
}

/// What is remembered of an Event that may grow a series.
struct Series {
    name: String,
    count: i32,
}

/// How many Normal Events may be written back to back before [`NORMAL_PER_SECOND`] applies: a
/// few hundred grants applied at once still get one each.
pub const NORMAL_BURST: f64 = 200.0;

/// How many Normal Events per second are written once the burst is spent.
pub const NORMAL_PER_SECOND: f64 = 10.0;

/// A token bucket: `burst` tokens, refilled at `per_second` up to `burst`.
struct Bucket {
    burst: f64,
    per_second: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl Bucket {
    fn full(burst: f64, per_second: f64, now: Instant) -> Self {
        Self {
            burst,
            per_second,
            tokens: burst,
            refilled_at: now,
        }
    }

    /// Takes one token if there is one. `now` must never go back.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled_at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// The task that writes queued Events, one at a time, in order.
struct Writer {
    client: Client,
    controller: String,
    instance: String,
    series: Recent<Series>,
    /// The budget of Normal Events.
    normal: Bucket,
}

impl Writer {
    async fn run(mut self, mut pending: mpsc::Receiver<Pending>) {
        while let Some(event) = pending.recv().await {
            self.write(event).await;
        }
    }

    /// Patches the series of the Event this one repeats, or creates a new Event. A failure is
    /// logged once and not retried.
    async fn write(&mut self, event: Pending) {
        if matches!(event.type_, EventType::Normal) && !self.normal.take(Instant::now()) {
            crate::metrics::metrics().events_dropped.inc();
            tracing::debug!(
                object = event.regarding.name.as_deref().unwrap_or_default(),
                reason = %event.reason,
                "event dropped: over the rate of Normal Events"
            );
            return;
        }
        let key = series_key(&event);
        let namespace = event.regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let object = event.regarding.name.as_deref().unwrap_or_default();
        if let Some(seen) = self.series.get(key, Instant::now()) {
            let name = seen.value.name.clone();
            let count = seen.value.count.saturating_add(1);
            let patch = serde_json::json!({
                "series": EventSeries {
                    count,
                    last_observed_time: MicroTime(event.observed),
                }
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.series
                        .insert(key, Series { name, count }, Instant::now());
                    return;
                }
                // Gone (the apiserver's event TTL): start a new Event.
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    tracing::warn!(error = %e, object, reason = %event.reason, "could not update event");
                    return;
                }
            }
        }
        let new = self.new_event(&event);
        let name = new.metadata.name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), &new).await {
            Ok(_) => self
                .series
                .insert(key, Series { name, count: 1 }, Instant::now()),
            // Deleting a namespace deletes its grants, whose revocation Events then have nowhere to
            // go: a normal deletion, not worth a warning.
            Err(e) if namespace_terminating(&e) => {
                tracing::debug!(object, reason = %event.reason, "event dropped: its namespace is being deleted");
            }
            Err(e) => {
                tracing::warn!(error = %e, object, reason = %event.reason, "could not publish event");
            }
        }
    }

    /// The fields kube-rs's and client-go's recorders set; named `<object>.<hex nanoseconds>`.
    fn new_event(&self, event: &Pending) -> Event {
        let object = event.regarding.name.as_deref().unwrap_or(&self.controller);
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{object}.{:x}", event.observed.as_nanosecond())),
                namespace: event.regarding.namespace.clone(),
                ..Default::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: Some(event.note.clone()),
            type_: Some(type_name(event.type_).to_owned()),
            event_time: Some(MicroTime(event.observed)),
            regarding: Some(event.regarding.clone()),
            related: None,
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            series: None,
            deprecated_count: None,
            deprecated_first_timestamp: None,
            deprecated_last_timestamp: None,
            deprecated_source: None,
        }
    }
}

fn type_name(type_: EventType) -> &'static str {
    match type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

/// Whether the apiserver refused a create because the namespace is being deleted.
fn namespace_terminating(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 403 && status.message.contains("because it is being terminated"))
}

/// Which Events form one series: same type, reason and action about the same object.
fn series_key(event: &Pending) -> u64 {
    let r = &event.regarding;
    // A collision (about one in 2^64) would merely join two series.
    crate::operator::caches::context::key(&(
        type_name(event.type_),
        &event.reason,
        &event.action,
        (&r.uid, &r.namespace, &r.name, &r.kind, &r.api_version),
    ))
}

/// Values remembered for `ttl` after they were last set.
///
/// Forgetting never scans the map: a queue holds one item per entry, oldest first, and only its
/// expired front is looked at. An entry set again since it was queued is queued again behind the
/// others instead of being removed, so the queue never holds more items than the map has entries,
/// and each operation costs O(1) amortised whatever the number of entries. An entry older than `ttl`
/// is never returned, and its memory is freed at most `ttl` later.
pub struct Recent<V> {
    ttl: Duration,
    entries: HashMap<u64, Entry<V>>,
    queue: VecDeque<(Instant, u64)>,
}

pub struct Entry<V> {
    pub value: V,
    /// When it was last set.
    pub set_at: Instant,
}

impl<V> Recent<V> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: HashMap::new(),
            queue: VecDeque::new(),
        }
    }

    /// The entry of `key`, if it was set less than `ttl` before `now`.
    pub fn get(&mut self, key: u64, now: Instant) -> Option<&Entry<V>> {
        self.expire(now);
        let ttl = self.ttl;
        self.entries
            .get(&key)
            .filter(|e| now.saturating_duration_since(e.set_at) < ttl)
    }

    /// Sets `key` to `value`, as of `now`. Callers pass a `now` that never goes back.
    pub fn insert(&mut self, key: u64, value: V, now: Instant) {
        self.expire(now);
        let entry = Entry { value, set_at: now };
        match self.entries.entry(key) {
            hash_map::Entry::Occupied(mut held) => {
                held.insert(entry);
            }
            hash_map::Entry::Vacant(free) => {
                free.insert(entry);
                self.queue.push_back((now, key));
            }
        }
    }

    /// How many entries are held, expired ones not yet freed included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Frees the entries whose queue item is older than `ttl` and that were not set since; returns
    /// how many queue items it took off.
    fn expire(&mut self, now: Instant) -> usize {
        let mut popped = 0;
        while let Some(&(queued_at, key)) = self.queue.front() {
            if now.saturating_duration_since(queued_at) < self.ttl {
                break;
            }
            self.queue.pop_front();
            popped += 1;
            let live = self
                .entries
                .get(&key)
                .is_some_and(|e| now.saturating_duration_since(e.set_at) < self.ttl);
            if live {
                // Set again since it was queued: look again one `ttl` from now.
                self.queue.push_back((now, key));
            } else {
                self.entries.remove(&key);
            }
        }
        popped
    }
}

/// The longest note the apiserver accepts on an `events.k8s.io/v1` Event (bytes); a longer one is
/// refused, and the Event lost.
pub const MAX_NOTE: usize = 1024;

/// The note, cut at a character boundary to fit [`MAX_NOTE`] with an ellipsis (the whole message
/// stays in the grant's condition).
fn fit_note(note: String) -> String {
    if note.len() <= MAX_NOTE {
        return note;
    }
    let ellipsis = "…";
    let mut end = MAX_NOTE - ellipsis.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_note_is_cut_to_what_the_apiserver_takes_at_a_character_boundary() {
        assert_eq!(fit_note("short".into()), "short");
        let exact = "a".repeat(MAX_NOTE);
        assert_eq!(fit_note(exact.clone()), exact);
        for long in ["é".repeat(MAX_NOTE), "x".repeat(5 * MAX_NOTE)] {
            let cut = fit_note(long.clone());
            assert!(cut.len() <= MAX_NOTE, "{}", cut.len());
            assert!(cut.ends_with('…'));
            assert!(long.starts_with(cut.trim_end_matches('…')));
        }
    }

    const TTL: Duration = Duration::from_secs(60);

    fn later(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    fn refusal(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn only_a_namespace_being_deleted_is_recognised_as_such() {
        let terminating = "events.events.k8s.io \"g.1\" is forbidden: unable to create new content in namespace ns because it is being terminated";
        assert!(namespace_terminating(&refusal(403, terminating)));
        assert!(!namespace_terminating(&refusal(
            403,
            "events.events.k8s.io is forbidden: User \"x\" cannot create resource"
        )));
        assert!(!namespace_terminating(&refusal(409, terminating)));
    }

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut bucket = Bucket::full(3.0, 2.0, t0);
        let taken = (0..5).filter(|_| bucket.take(t0)).count();
        assert_eq!(taken, 3, "the burst, and no more at the same instant");
        assert!(
            !bucket.take(t0 + Duration::from_millis(400)),
            "0.8 tokens refilled"
        );
        assert!(
            bucket.take(t0 + Duration::from_millis(500)),
            "one token after half a second"
        );
        assert!(
            !bucket.take(t0 + Duration::from_millis(500)),
            "and only one"
        );
        let after_a_minute = t0 + Duration::from_secs(60);
        let taken = (0..10).filter(|_| bucket.take(after_a_minute)).count();
        assert_eq!(taken, 3, "refills up to the burst, never beyond");
    }

    #[test]
    fn a_key_set_within_the_ttl_is_found_and_others_are_not() {
        let t0 = Instant::now();
        let mut recent = Recent::new(TTL);
        recent.insert(1, "one", t0);
        let hit = recent.get(1, later(t0, 59)).map(|e| (e.value, e.set_at));
        assert_eq!(hit, Some(("one", t0)));
        assert!(recent.get(2, later(t0, 59)).is_none(), "never set");
    }

    #[test]
    fn an_entry_expires_ttl_after_it_was_set() {
        let t0 = Instant::now();
        let mut recent = Recent::new(TTL);
        recent.insert(1, (), t0);
        assert!(recent.get(1, later(t0, 60)).is_none(), "expired at the ttl");
        assert!(recent.is_empty(), "and freed");
    }

    #[test]
    fn setting_an_entry_again_keeps_it_a_ttl_from_then() {
        let t0 = Instant::now();
        let mut recent = Recent::new(TTL);
        recent.insert(1, 1, t0);
        recent.insert(1, 2, later(t0, 50));
        // Its queue item (from t0) comes up at 60 s: the entry stays, with the newer value.
        let kept = recent.get(1, later(t0, 70)).map(|e| e.value);
        assert_eq!(kept, Some(2));
        assert_eq!(recent.len(), 1);
        // Not returned once a ttl has passed since the last set, and freed within one more ttl.
        assert!(recent.get(1, later(t0, 110)).is_none());
        assert!(recent.get(1, later(t0, 130)).is_none());
        assert!(recent.is_empty());
    }

    #[test]
    fn an_entry_set_again_after_expiring_is_new() {
        let t0 = Instant::now();
        let mut recent = Recent::new(TTL);
        recent.insert(1, 1, t0);
        recent.insert(1, 2, later(t0, 61));
        assert_eq!(recent.get(1, later(t0, 62)).map(|e| e.value), Some(2));
        assert_eq!(recent.queue.len(), 1);
    }

    /// The queue holds one item per entry however often an entry is set, and each call looks only
    /// at expired items: the total work is bounded by the number of sets, never by the map's size.
    #[test]
    fn forgetting_is_amortised_and_never_scans_live_entries() {
        let t0 = Instant::now();
        let mut recent = Recent::new(TTL);
        let keys = 10_000u64;
        for key in 0..keys {
            recent.insert(key, (), t0);
        }
        // A hot key set over and over does not grow the queue; nothing is due, nothing is popped.
        let mut sets = keys;
        for i in 0..keys {
            recent.insert(0, (), t0 + Duration::from_millis(i));
            sets += 1;
            assert_eq!(recent.expire(later(t0, 30)), 0);
        }
        assert_eq!(recent.queue.len(), recent.len());
        // One call frees every cold key at once; the hot one is requeued.
        let popped = recent.expire(later(t0, 60));
        assert_eq!(popped as u64, keys);
        assert_eq!(recent.len(), 1);
        assert_eq!(recent.queue.len(), 1);
        // From then on, lookups of a live key pop nothing until its item is due again.
        let mut total = popped;
        for s in 61..120 {
            total += recent.expire(later(t0, s));
        }
        assert_eq!(total as u64, keys, "no item popped twice without a set");
        assert!(total as u64 <= sets);
        assert!(recent.get(0, later(t0, 120)).is_none());
        assert!(recent.is_empty());
    }

    #[test]
    fn events_about_one_object_share_a_series_only_with_the_same_reason_and_type() {
        let regarding = ObjectReference {
            api_version: Some("delegation.nhi.dev/v1alpha1".into()),
            kind: Some("DelegationGrant".into()),
            name: Some("g".into()),
            namespace: Some("ns".into()),
            uid: Some("u1".into()),
            ..Default::default()
        };
        let event = |type_, reason: &str, uid: &str| Pending {
            regarding: ObjectReference {
                uid: Some(uid.into()),
                ..regarding.clone()
            },
            type_,
            reason: reason.into(),
            action: reason.into(),
            note: "a note that may differ".into(),
            observed: Timestamp::now(),
        };
        let key = series_key(&event(EventType::Warning, "Denied", "u1"));
        let mut again = event(EventType::Warning, "Denied", "u1");
        again.note = "another note".into();
        assert_eq!(series_key(&again), key, "the note does not matter");
        assert_ne!(series_key(&event(EventType::Normal, "Denied", "u1")), key);
        assert_ne!(series_key(&event(EventType::Warning, "Issued", "u1")), key);
        assert_ne!(
            series_key(&event(EventType::Warning, "Denied", "u2")),
            key,
            "a re-created object with the same name"
        );
    }
}

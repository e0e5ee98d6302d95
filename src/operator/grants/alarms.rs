//! When each grant must be looked at again (its renewal, an authority re-check, a foreign Secret):
//! one compact alarm per grant, firing through the controller's wake-up stream.
//!
//! The controller's own requeue schedule keeps, per object, two copies of a full object reference
//! (name, namespace, uid, resourceVersion) plus timer bookkeeping: about 1.2 KiB for every Ready
//! grant. An alarm here is the grant's name in its namespace's set ordered by due time, and a
//! 16-byte entry that finds it again; the namespace is kept once. Setting an alarm replaces the
//! grant's earlier one: the last decision says when to look next.

use std::{
    collections::{BTreeSet, HashMap},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::runtime::reflector::ObjectRef;
use tokio::{sync::Notify, time::Instant};

use crate::api::DelegationGrant;

/// The alarms of every grant.
#[derive(Default)]
pub struct Alarms {
    state: Mutex<Schedule>,
    /// Signalled when an alarm became the earliest (the firing task sleeps until the earliest).
    earlier: Notify,
}

/// The alarms of one namespace's grants: by due time, and each grant's due time by a hash of its
/// name.
///
/// The hash is only a way back to the grant's alarm, never a grant's identity: an alarm leaves
/// `by_due` only when it fires or when the very same name is set or removed (an exact match of due
/// time and name). Two names whose hashes collide therefore never lose an alarm; at worst one fires
/// once more than it needs to (a spurious wake-up the reconcile shrugs off).
#[derive(Default)]
struct Pending {
    /// (due, name); the due time in nanoseconds since the schedule's epoch.
    by_due: BTreeSet<(u64, Box<str>)>,
    due_of: HashMap<u64, u64>,
}

impl Pending {
    fn first(&self) -> Option<u64> {
        self.by_due.first().map(|(due, _)| *due)
    }

    fn set(&mut self, hash: u64, name: &str, due: u64) {
        let mut name = Box::<str>::from(name);
        if let Some(old) = self.due_of.insert(hash, due) {
            // Its earlier alarm: the very same name at its old time (not a colliding name's).
            let earlier = (old, name);
            self.by_due.remove(&earlier);
            name = earlier.1;
        }
        self.by_due.insert((due, name));
    }

    fn remove(&mut self, hash: u64, name: &str) {
        if let Some(due) = self.due_of.get(&hash).copied()
            && self.by_due.remove(&(due, Box::from(name)))
        {
            self.due_of.remove(&hash);
        }
    }

    fn take_due(&mut self, now: u64, hash: impl Fn(&str) -> u64) -> Vec<Box<str>> {
        let mut fired = Vec::new();
        while self.first().is_some_and(|due| due <= now) {
            if let Some((due, name)) = self.by_due.pop_first() {
                let hash = hash(&name);
                if self.due_of.get(&hash) == Some(&due) {
                    self.due_of.remove(&hash);
                }
                fired.push(name);
            }
        }
        fired
    }
}

/// A grant whose alarm fired: (namespace, name).
type Fired = (Arc<str>, Box<str>);

/// Every namespace's alarms, and when each namespace's first one is due.
struct Schedule<K = RandomState> {
    namespaces: HashMap<Arc<str>, Pending>,
    /// (the due time of a namespace's first alarm, the namespace).
    earliest: BTreeSet<(u64, Arc<str>)>,
    epoch: Instant,
    /// Hashes the names (at random, in tests to collide).
    keys: K,
}

impl<K: Default> Default for Schedule<K> {
    fn default() -> Self {
        Self {
            namespaces: HashMap::new(),
            earliest: BTreeSet::new(),
            epoch: Instant::now(),
            keys: K::default(),
        }
    }
}

impl<K: BuildHasher> Schedule<K> {
    fn since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, due: u64) -> Instant {
        self.epoch + Duration::from_nanos(due)
    }

    /// Changes the alarms of `namespace` and keeps its place in `earliest` (and forgets a
    /// namespace left without alarms).
    fn change(&mut self, namespace: &str, change: impl FnOnce(&mut Pending, &K)) {
        let (namespace, pending) = match self.namespaces.get_key_value(namespace) {
            Some((shared, _)) => {
                let shared = shared.clone();
                let pending = self.namespaces.get_mut(&shared);
                (shared, pending)
            }
            None => {
                let shared: Arc<str> = Arc::from(namespace);
                let pending = Some(self.namespaces.entry(shared.clone()).or_default());
                (shared, pending)
            }
        };
        let Some(pending) = pending else {
            return;
        };
        let before = pending.first();
        change(pending, &self.keys);
        let after = pending.first();
        if after.is_none() {
            self.namespaces.remove(&namespace);
        }
        if before != after {
            if let Some(before) = before {
                self.earliest.remove(&(before, namespace.clone()));
            }
            if let Some(after) = after {
                self.earliest.insert((after, namespace));
            }
        }
    }

    /// Sets the alarm of grant `name` in `namespace` to `due`, replacing its earlier one. Returns
    /// whether it is now the earliest of all.
    fn set(&mut self, namespace: &str, name: &str, due: Instant) -> bool {
        let due = self.since_epoch(due);
        self.change(namespace, |pending, keys| {
            pending.set(keys.hash_one(name), name, due)
        });
        self.earliest
            .first()
            .is_some_and(|(first, _)| *first == due)
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        if self.namespaces.contains_key(namespace) {
            self.change(namespace, |pending, keys| {
                pending.remove(keys.hash_one(name), name)
            });
        }
    }

    /// Takes every alarm due at `now`, as (namespace, name); returns them and when the next one is
    /// due.
    fn take_due(&mut self, now: Instant) -> (Vec<Fired>, Option<Instant>) {
        let now = self.since_epoch(now);
        let mut fired = Vec::new();
        while let Some((due, namespace)) = self.earliest.first().cloned()
            && due <= now
        {
            let mut names = Vec::new();
            self.change(&namespace, |pending, keys| {
                names = pending.take_due(now, |name| keys.hash_one(name));
            });
            fired.extend(names.into_iter().map(|name| (namespace.clone(), name)));
        }
        let next = self.earliest.first().map(|(due, _)| self.instant(*due));
        (fired, next)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.namespaces.values().map(|p| p.due_of.len()).sum()
    }
}

impl Alarms {
    /// Looks at the grant again `after` from now (replacing its earlier alarm).
    pub fn set(&self, namespace: &str, name: &str, after: Duration) {
        let due = Instant::now() + after;
        let earliest = self
            .state
            .lock()
            .map(|mut s| s.set(namespace, name, due))
            .unwrap_or(false);
        if earliest {
            self.earlier.notify_one();
        }
    }

    /// Forgets the alarm of a grant that is going away.
    pub fn remove(&self, namespace: &str, name: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.remove(namespace, name);
        }
    }

    /// Fires alarms forever: each due grant is sent to `wake` (the grant controller's wake-ups).
    pub async fn run(
        &self,
        wake: futures::channel::mpsc::UnboundedSender<ObjectRef<DelegationGrant>>,
    ) {
        loop {
            let (fired, next) = match self.state.lock() {
                Ok(mut s) => s.take_due(Instant::now()),
                Err(_) => return,
            };
            for (namespace, name) in fired {
                let _ = wake.unbounded_send(ObjectRef::new(&name).within(&namespace));
            }
            match next {
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = self.earlier.notified() => {}
                    }
                }
                None => self.earlier.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test's `namespace/name` keys.
    fn split(key: &str) -> (&str, &str) {
        key.split_once('/').unwrap()
    }

    trait ByKey {
        fn set_key(&mut self, key: &str, due: Instant) -> bool;
        fn remove_key(&mut self, key: &str);
        fn fire(&mut self, now: Instant) -> (Vec<String>, Option<Instant>);
    }

    impl<K: BuildHasher> ByKey for Schedule<K> {
        fn set_key(&mut self, key: &str, due: Instant) -> bool {
            let (namespace, name) = split(key);
            self.set(namespace, name, due)
        }
        fn remove_key(&mut self, key: &str) {
            let (namespace, name) = split(key);
            self.remove(namespace, name)
        }
        fn fire(&mut self, now: Instant) -> (Vec<String>, Option<Instant>) {
            let (fired, next) = self.take_due(now);
            let fired = fired
                .iter()
                .map(|(ns, name)| format!("{ns}/{name}"))
                .collect();
            (fired, next)
        }
    }

    #[test]
    fn a_new_alarm_replaces_the_grants_earlier_one() {
        let mut s = Schedule::<RandomState>::default();
        let t = Instant::now();
        assert!(s.set_key("ns/a", t + Duration::from_secs(10)));
        assert!(
            s.set_key("ns/b", t + Duration::from_secs(5)),
            "b is the earliest"
        );
        assert!(
            !s.set_key("ns/a", t + Duration::from_secs(20)),
            "a moved later"
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s.namespaces["ns"].by_due.len(), 2, "a's old alarm is gone");
        let (fired, next) = s.fire(t + Duration::from_secs(10));
        assert_eq!(fired, vec!["ns/b"]);
        assert_eq!(next, Some(t + Duration::from_secs(20)));
    }

    #[test]
    fn due_alarms_fire_once_in_order_and_later_ones_wait() {
        let mut s = Schedule::<RandomState>::default();
        let t = Instant::now();
        s.set_key("ns/late", t + Duration::from_secs(30));
        s.set_key("ns/first", t + Duration::from_secs(1));
        s.set_key("ns/second", t + Duration::from_secs(2));
        let (fired, next) = s.fire(t + Duration::from_secs(2));
        assert_eq!(fired, ["ns/first", "ns/second"]);
        assert_eq!(next, Some(t + Duration::from_secs(30)));
        assert!(
            s.fire(t + Duration::from_secs(2)).0.is_empty(),
            "fired once"
        );
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_removed_alarm_never_fires() {
        let mut s = Schedule::<RandomState>::default();
        let t = Instant::now();
        s.set_key("ns/gone", t + Duration::from_secs(1));
        s.remove_key("ns/gone");
        assert_eq!(s.fire(t + Duration::from_secs(60)), (Vec::new(), None));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn alarms_of_several_namespaces_fire_in_order_and_an_idle_namespace_is_forgotten() {
        let mut s = Schedule::<RandomState>::default();
        let t = Instant::now();
        s.set_key("one/a", t + Duration::from_secs(3));
        assert!(s.set_key("two/a", t + Duration::from_secs(1)));
        s.set_key("one/b", t + Duration::from_secs(2));
        assert!(!s.set_key("two/b", t + Duration::from_secs(4)));
        s.set_key("one/a", t + Duration::from_secs(5));
        let (mut fired, next) = s.fire(t + Duration::from_secs(4));
        // All are due: they are sent on together, a namespace's in order.
        fired.sort();
        assert_eq!(fired, ["one/b", "two/a", "two/b"]);
        assert_eq!(next, Some(t + Duration::from_secs(5)));
        assert!(!s.namespaces.contains_key("two"), "no alarm left there");
        s.remove_key("one/a");
        assert!(s.namespaces.is_empty() && s.earliest.is_empty());
        assert_eq!(s.fire(t + Duration::from_secs(60)), (Vec::new(), None));
    }

    /// Every key hashes alike.
    #[derive(Default)]
    struct Colliding;

    impl BuildHasher for Colliding {
        type Hasher = ConstantHasher;
        fn build_hasher(&self) -> ConstantHasher {
            ConstantHasher
        }
    }

    struct ConstantHasher;

    impl std::hash::Hasher for ConstantHasher {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    /// Keys whose hashes collide never lose an alarm: each still fires at its time, and a removal
    /// or a new time of one never takes the other's.
    #[test]
    fn colliding_keys_keep_their_alarms() {
        let mut s = Schedule::<Colliding>::default();
        let t = Instant::now();
        s.set_key("ns/a", t + Duration::from_secs(10));
        s.set_key("ns/b", t + Duration::from_secs(20));
        s.remove_key("ns/a");
        s.set_key("ns/b", t + Duration::from_secs(30));
        s.remove_key("ns/c");
        let (fired, _) = s.fire(t + Duration::from_secs(10));
        assert_eq!(fired, vec!["ns/a"], "a fires: at worst once too often");
        let (fired, next) = s.fire(t + Duration::from_secs(25));
        assert!(
            fired.is_empty(),
            "b's earlier alarm was replaced: {fired:?}"
        );
        assert_eq!(next, Some(t + Duration::from_secs(30)));
        let (fired, next) = s.fire(t + Duration::from_secs(30));
        assert_eq!(fired, vec!["ns/b"]);
        assert_eq!((next, s.len()), (None, 0));
    }

    #[test]
    fn due_times_come_back_to_the_nanosecond() {
        let mut s = Schedule::<RandomState>::default();
        let due = s.epoch + Duration::new(86_400 * 365, 123_456_789);
        s.set_key("ns/a", due);
        assert_eq!(s.fire(due - Duration::from_nanos(1)).1, Some(due));
        assert_eq!(s.fire(due).0.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_firing_task_wakes_each_grant_when_due() {
        use futures::StreamExt;
        let alarms = std::sync::Arc::new(Alarms::default());
        let (wake, mut woken) = futures::channel::mpsc::unbounded();
        let runner = tokio::spawn({
            let alarms = alarms.clone();
            async move { alarms.run(wake).await }
        });
        alarms.set("team", "later", Duration::from_secs(60));
        alarms.set("team", "sooner", Duration::from_secs(5));
        let first = woken.next().await.unwrap();
        assert_eq!(
            (first.name.as_str(), first.namespace.as_deref()),
            ("sooner", Some("team"))
        );
        let second = woken.next().await.unwrap();
        assert_eq!(second.name, "later");
        assert_eq!(
            alarms.state.lock().unwrap().len(),
            0,
            "fired alarms are gone"
        );
        runner.abort();
    }
}

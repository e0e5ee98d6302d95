//! When each grant must be looked at again (its renewal, an authority re-check, a foreign Secret):
//! one compact alarm per grant, firing through the controller's wake-up stream.
//!
//! The controller's own requeue schedule keeps, per object, two copies of a full object reference
//! (name, namespace, uid, resourceVersion) plus timer bookkeeping: about 1.2 KiB for every Ready
//! grant. An alarm here is one `namespace/name` string in a set ordered by due time, and a 16-byte
//! entry that finds it again. Setting an alarm replaces the grant's earlier one: the last decision
//! says when to look next.

use std::{
    collections::{BTreeSet, HashMap},
    hash::{BuildHasher, RandomState},
    sync::Mutex,
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

/// Alarms by due time, and each grant's (`namespace/name`) due time by a hash of its key.
///
/// The hash is only a way back to the grant's alarm, never a grant's identity: an alarm leaves
/// `by_due` only when it fires or when the very same key is set or removed (an exact match of due
/// time and key). Two keys whose hashes collide therefore never lose an alarm; at worst one fires
/// once more than it needs to (a spurious wake-up the reconcile shrugs off).
struct Schedule<K = RandomState> {
    /// (due, key); the due time in nanoseconds since `epoch`.
    by_due: BTreeSet<(u64, Box<str>)>,
    due_of: HashMap<u64, u64>,
    epoch: Instant,
    /// Hashes the keys (at random, in tests to collide).
    keys: K,
}

impl<K: Default> Default for Schedule<K> {
    fn default() -> Self {
        Self {
            by_due: BTreeSet::new(),
            due_of: HashMap::new(),
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

    /// Sets the alarm of `key` to `due`, replacing its earlier one. Returns whether it is now the
    /// earliest of all.
    fn set(&mut self, key: &str, due: Instant) -> bool {
        let due = self.since_epoch(due);
        let hash = self.keys.hash_one(key);
        let mut key = Box::<str>::from(key);
        if let Some(old) = self.due_of.insert(hash, due) {
            // Its earlier alarm: the very same key at its old time (not a colliding key's).
            let earlier = (old, key);
            self.by_due.remove(&earlier);
            key = earlier.1;
        }
        self.by_due.insert((due, key));
        self.by_due.first().is_some_and(|(first, _)| *first == due)
    }

    fn remove(&mut self, key: &str) {
        let hash = self.keys.hash_one(key);
        if let Some(due) = self.due_of.get(&hash).copied()
            && self.by_due.remove(&(due, Box::from(key)))
        {
            self.due_of.remove(&hash);
        }
    }

    /// Takes every alarm due at `now`; returns them and when the next one is due.
    fn take_due(&mut self, now: Instant) -> (Vec<Box<str>>, Option<Instant>) {
        let now = self.since_epoch(now);
        let mut fired = Vec::new();
        while self.by_due.first().is_some_and(|(due, _)| *due <= now) {
            if let Some((due, key)) = self.by_due.pop_first() {
                let hash = self.keys.hash_one(&*key);
                if self.due_of.get(&hash) == Some(&due) {
                    self.due_of.remove(&hash);
                }
                fired.push(key);
            }
        }
        let next = self.by_due.first().map(|(due, _)| self.instant(*due));
        (fired, next)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.due_of.len()
    }
}

fn key_of(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Alarms {
    /// Looks at the grant again `after` from now (replacing its earlier alarm).
    pub fn set(&self, namespace: &str, name: &str, after: Duration) {
        let due = Instant::now() + after;
        let earliest = self
            .state
            .lock()
            .map(|mut s| s.set(&key_of(namespace, name), due))
            .unwrap_or(false);
        if earliest {
            self.earlier.notify_one();
        }
    }

    /// Forgets the alarm of a grant that is going away.
    pub fn remove(&self, namespace: &str, name: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.remove(&key_of(namespace, name));
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
            for key in fired {
                if let Some((namespace, name)) = key.split_once('/') {
                    let _ = wake.unbounded_send(ObjectRef::new(name).within(namespace));
                }
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
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_new_alarm_replaces_the_grants_earlier_one() {
        let mut s = Schedule::<RandomState>::default();
        let t = Instant::now();
        assert!(s.set("ns/a", t + Duration::from_secs(10)));
        assert!(
            s.set("ns/b", t + Duration::from_secs(5)),
            "b is the earliest"
        );
        assert!(!s.set("ns/a", t + Duration::from_secs(20)), "a moved later");
        assert_eq!(s.len(), 2);
        assert_eq!(s.by_due.len(), 2, "a's old alarm is gone");
        let (fired, next) = s.take_due(t + Duration::from_secs(10));
        assert_eq!(fired, vec![Box::<str>::from("ns/b")]);
        assert_eq!(next, Some(t + Duration::from_secs(20)));
    }

    #[test]
    fn due_alarms_fire_once_in_order_and_later_ones_wait() {
        let mut s = Schedule::<RandomState>::default();
        let t = Instant::now();
        s.set("ns/late", t + Duration::from_secs(30));
        s.set("ns/first", t + Duration::from_secs(1));
        s.set("ns/second", t + Duration::from_secs(2));
        let (fired, next) = s.take_due(t + Duration::from_secs(2));
        let fired: Vec<&str> = fired.iter().map(|k| &**k).collect();
        assert_eq!(fired, ["ns/first", "ns/second"]);
        assert_eq!(next, Some(t + Duration::from_secs(30)));
        assert!(
            s.take_due(t + Duration::from_secs(2)).0.is_empty(),
            "fired once"
        );
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_removed_alarm_never_fires() {
        let mut s = Schedule::<RandomState>::default();
        let t = Instant::now();
        s.set("ns/gone", t + Duration::from_secs(1));
        s.remove("ns/gone");
        assert_eq!(s.take_due(t + Duration::from_secs(60)), (Vec::new(), None));
        assert_eq!(s.len(), 0);
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
        s.set("ns/a", t + Duration::from_secs(10));
        s.set("ns/b", t + Duration::from_secs(20));
        s.remove("ns/a");
        s.set("ns/b", t + Duration::from_secs(30));
        s.remove("ns/c");
        let (fired, _) = s.take_due(t + Duration::from_secs(10));
        assert_eq!(
            fired,
            vec![Box::<str>::from("ns/a")],
            "a fires: at worst once too often"
        );
        let (fired, next) = s.take_due(t + Duration::from_secs(25));
        assert!(
            fired.is_empty(),
            "b's earlier alarm was replaced: {fired:?}"
        );
        assert_eq!(next, Some(t + Duration::from_secs(30)));
        let (fired, next) = s.take_due(t + Duration::from_secs(30));
        assert_eq!(fired, vec![Box::<str>::from("ns/b")]);
        assert_eq!((next, s.len()), (None, 0));
    }

    #[test]
    fn due_times_come_back_to_the_nanosecond() {
        let mut s = Schedule::<RandomState>::default();
        let due = s.epoch + Duration::new(86_400 * 365, 123_456_789);
        s.set("ns/a", due);
        assert_eq!(s.take_due(due - Duration::from_nanos(1)).1, Some(due));
        assert_eq!(s.take_due(due).0.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_firing_task_wakes_each_grant_when_due() {
        use futures::StreamExt;
        let alarms = Arc::new(Alarms::default());
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

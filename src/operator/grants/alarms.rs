//! When each grant must be looked at again (its renewal, an authority re-check, a foreign Secret):
//! one compact alarm per grant, firing through the controller's wake-up stream.
//!
//! The controller's own requeue schedule keeps, per object, two copies of a full object reference
//! (name, namespace, uid, resourceVersion) plus timer bookkeeping: about 1.2 KiB for every Ready
//! grant. An alarm here is one shared `namespace/name` string and two small map entries. Setting an
//! alarm replaces the grant's earlier one: the last decision says when to look next.

use std::{
    collections::{BTreeSet, HashMap},
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

/// Alarms by due time and by grant (`namespace/name`), sharing one string per grant.
#[derive(Default)]
struct Schedule {
    by_due: BTreeSet<(Instant, Arc<str>)>,
    due_of: HashMap<Arc<str>, Instant>,
}

impl Schedule {
    /// Sets the alarm of `key` to `due`, replacing its earlier one. Returns whether it is now the
    /// earliest of all.
    fn set(&mut self, key: &str, due: Instant) -> bool {
        let shared = match self.due_of.get_key_value(key) {
            Some((shared, old)) => {
                let shared = shared.clone();
                self.by_due.remove(&(*old, shared.clone()));
                shared
            }
            None => Arc::from(key),
        };
        self.due_of.insert(shared.clone(), due);
        self.by_due.insert((due, shared));
        self.by_due.first().is_some_and(|(first, _)| *first == due)
    }

    fn remove(&mut self, key: &str) {
        if let Some((shared, due)) = self.due_of.remove_entry(key) {
            self.by_due.remove(&(due, shared));
        }
    }

    /// Takes every alarm due at `now`; returns them and when the next one is due.
    fn take_due(&mut self, now: Instant) -> (Vec<Arc<str>>, Option<Instant>) {
        let mut fired = Vec::new();
        while let Some((due, _)) = self.by_due.first() {
            if *due > now {
                break;
            }
            if let Some((_, key)) = self.by_due.pop_first() {
                self.due_of.remove(&key);
                fired.push(key);
            }
        }
        (fired, self.by_due.first().map(|(due, _)| *due))
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
    use super::*;

    #[test]
    fn a_new_alarm_replaces_the_grants_earlier_one() {
        let mut s = Schedule::default();
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
        assert_eq!(fired, vec![Arc::<str>::from("ns/b")]);
        assert_eq!(next, Some(t + Duration::from_secs(20)));
    }

    #[test]
    fn due_alarms_fire_once_in_order_and_later_ones_wait() {
        let mut s = Schedule::default();
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
        let mut s = Schedule::default();
        let t = Instant::now();
        s.set("ns/gone", t + Duration::from_secs(1));
        s.remove("ns/gone");
        assert_eq!(s.take_due(t + Duration::from_secs(60)), (Vec::new(), None));
        assert_eq!(s.len(), 0);
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

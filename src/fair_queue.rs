//! Fair queues for reconciles: which grant is reconciled next, so that one namespace's burst cannot
//! delay another namespace's revocations. The pure policy, no I/O and no clock; the operator's
//! grant controller (`operator::grants::runner`) feeds it triggers and runs what it admits.
//!
//! - **Revocations first, in slots of their own.** An item queued as a [`Lane::Revocation`] (a
//!   grant being deleted or suspended) goes before every routine item (with 10,000 grants arriving
//!   in one namespace, turns alone gave another namespace's deletions half the slots, too few when
//!   they came faster than that half could serve), and does not wait for a routine item to end:
//!   up to `limit` revocations run whatever else runs, while a routine item starts only when fewer
//!   than `limit` run in all, and fewer than half of `limit` while a revocation runs or waits.
//!   Routine work thus makes room for revocations as it ends (at the chart's 8 slots, a deletion
//!   beside a burst of issuance waited p99 0.33 s for one of eight issuances to end), and leaves
//!   them a less busy apiserver (most of a revocation's time beside that burst went to apiserver
//!   writes and to the status-list write it shares with the issuances).
//! - **One queue per tenant (namespace) in each lane, served in turns.** Each admission takes the
//!   first item of the tenant whose turn it is in the lane, and that tenant goes to the back of the
//!   lane's turns. While a tenant has work waiting in a lane, no other tenant is admitted twice in
//!   that lane before it: one namespace's mass deletion does not hold back another's deletions, nor
//!   its burst of grants another's issuance. Within a tenant's lane, order is kept.
//! - **At most `limit` running** (0: no limit), beyond which only revocations start (at most
//!   `limit` of them), and an item never runs twice at once.
//! - **Deduplicated like kube's controller:** an item queued again is queued once (a revocation
//!   moves it to the revocation lane); an item triggered while it runs runs once more after it ends.
//! - **Bounded memory:** a waiting item is its key, twice (its place in line and the set that
//!   deduplicates), with a sequence number; a tenant's state goes once nothing of it waits (what is
//!   left in a line of items since moved or admitted is dropped when the tenant's turn comes there).

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    sync::Arc,
};

/// An item of the queue that belongs to a tenant (a grant to its namespace).
pub trait Tenanted {
    fn tenant(&self) -> &str;
}

/// Which line of its tenant an item waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Routine,
    /// Goes before every routine item.
    Revocation,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Routine, Lane::Revocation];

    /// Its name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Routine => "routine",
            Lane::Revocation => "revocation",
        }
    }

    fn index(self) -> usize {
        match self {
            Lane::Routine => 0,
            Lane::Revocation => 1,
        }
    }
}

/// An item the queue let run: the lane it waited in, and the stamp it was queued with there (the
/// caller's clock: the queue only keeps it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted<T, S> {
    pub item: T,
    pub lane: Lane,
    pub queued: S,
}

/// The queue: see the module documentation. `S` is what the caller stamps a request with (when it
/// was made, for the wait it measures); the first request of a waiting item keeps its stamp.
pub struct FairQueue<T, S = ()> {
    limit: usize,
    /// Tenants with revocations in line, in the order of their turns.
    revocation_turns: VecDeque<Arc<str>>,
    /// Tenants with routine items in line, in the order of their turns.
    routine_turns: VecDeque<Arc<str>>,
    lines: HashMap<Arc<str>, Lines<T>>,
    /// Every waiting item: its lane, the sequence number of its valid entry in that lane, and its
    /// stamp. An entry in a line that does not match is a leftover of an item since moved or
    /// admitted, and is skipped (removing it from the middle of a long line would cost a scan).
    waiting: HashMap<T, Waiting<S>>,
    /// How many items wait in each lane.
    waiting_in: [usize; 2],
    /// Running items: the lane each was admitted from, and the request made for it meanwhile (its
    /// lane and stamp), if one was.
    running: HashMap<T, Running<S>>,
    /// How many items admitted from each lane run.
    running_in: [usize; 2],
    serial: u64,
}

#[derive(Debug, Clone, Copy)]
struct Running<S> {
    lane: Lane,
    again: Option<(Lane, S)>,
}

#[derive(Debug, Clone, Copy)]
struct Waiting<S> {
    lane: Lane,
    serial: u64,
    queued: S,
}

struct Lines<T> {
    revocations: VecDeque<(T, u64)>,
    routine: VecDeque<(T, u64)>,
}

impl<T> Default for Lines<T> {
    fn default() -> Self {
        Self {
            revocations: VecDeque::new(),
            routine: VecDeque::new(),
        }
    }
}

impl<T> Lines<T> {
    fn is_empty(&self) -> bool {
        self.revocations.is_empty() && self.routine.is_empty()
    }
}

impl<T: Tenanted + Eq + Hash + Clone, S: Copy> FairQueue<T, S> {
    /// A queue admitting at most `limit` items at once, and up to `limit` revocations whatever
    /// else runs (0: no limit).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            revocation_turns: VecDeque::new(),
            routine_turns: VecDeque::new(),
            lines: HashMap::new(),
            waiting: HashMap::new(),
            waiting_in: [0; 2],
            running: HashMap::new(),
            running_in: [0; 2],
            serial: 0,
        }
    }

    /// Asks for `item` to be run, stamped `queued`. Queued once however often it is asked for (the
    /// first request's stamp is kept); a revocation moves a waiting routine item to the revocation
    /// lane (stamped anew: its wait there begins); a running item runs once more after it ends.
    pub fn push(&mut self, item: T, lane: Lane, queued: S) {
        if let Some(running) = self.running.get_mut(&item) {
            if running.again.is_none_or(|(asked, _)| asked < lane) {
                running.again = Some((lane, queued));
            }
            return;
        }
        match self.waiting.get(&item) {
            Some(w) if w.lane >= lane => return,
            Some(w) => self.waiting_in[w.lane.index()] -= 1,
            None => {}
        }
        self.serial += 1;
        let serial = self.serial;
        self.waiting.insert(
            item.clone(),
            Waiting {
                lane,
                serial,
                queued,
            },
        );
        self.waiting_in[lane.index()] += 1;
        let (tenant, lines) = match self.lines.get_key_value(item.tenant()) {
            Some((tenant, _)) => {
                let tenant = tenant.clone();
                let lines = self.lines.get_mut(&tenant).expect("just found");
                (tenant, lines)
            }
            None => {
                let tenant: Arc<str> = Arc::from(item.tenant());
                (tenant.clone(), self.lines.entry(tenant).or_default())
            }
        };
        let (line, turns) = match lane {
            Lane::Revocation => (&mut lines.revocations, &mut self.revocation_turns),
            Lane::Routine => (&mut lines.routine, &mut self.routine_turns),
        };
        // A tenant is in a lane's turns exactly while its line there holds entries.
        if line.is_empty() {
            turns.push_back(tenant);
        }
        line.push_back((item, serial));
    }

    /// The next item to run, if one may start: a revocation while fewer than the limit of
    /// revocations run, a routine item while fewer than the limit run in all. It counts as running
    /// until [`FairQueue::done`].
    pub fn admit(&mut self) -> Option<Admitted<T, S>> {
        let under = |running: usize, limit: usize| limit == 0 || running < limit;
        let revocation_slot = under(self.running_in[Lane::Revocation.index()], self.limit);
        let routine_slot = under(self.running.len(), self.routine_limit());
        let item = match (revocation_slot, routine_slot) {
            (true, true) => self
                .admit_from(Lane::Revocation)
                .or_else(|| self.admit_from(Lane::Routine))?,
            (true, false) => self.admit_from(Lane::Revocation)?,
            // Every revocation slot taken: the limit is reached in all as well.
            (false, _) => return None,
        };
        let waited = self.waiting.remove(&item).expect("admitted items wait");
        self.waiting_in[waited.lane.index()] -= 1;
        self.running_in[waited.lane.index()] += 1;
        self.running.insert(
            item.clone(),
            Running {
                lane: waited.lane,
                again: None,
            },
        );
        Some(Admitted {
            item,
            lane: waited.lane,
            queued: waited.queued,
        })
    }

    /// How many may run in all for a routine item to start: half the limit (rounded up) while a
    /// revocation runs or waits, so that the apiserver, and the status-list writes that issuances
    /// and revocations share, serve the revocations sooner.
    fn routine_limit(&self) -> usize {
        let revoking = self.running_in[Lane::Revocation.index()] > 0
            || self.waiting_in[Lane::Revocation.index()] > 0;
        if revoking {
            self.limit.div_ceil(2)
        } else {
            self.limit
        }
    }

    /// The first valid item of the tenant whose turn it is in `lane`, skipping tenants that hold
    /// only leftovers there; a tenant with nothing left in either lane is forgotten.
    fn admit_from(&mut self, lane: Lane) -> Option<T> {
        loop {
            let turns = match lane {
                Lane::Revocation => &mut self.revocation_turns,
                Lane::Routine => &mut self.routine_turns,
            };
            let tenant = turns.pop_front()?;
            let Some(lines) = self.lines.get_mut(&tenant) else {
                continue;
            };
            let line = match lane {
                Lane::Revocation => &mut lines.revocations,
                Lane::Routine => &mut lines.routine,
            };
            let next = Self::first_valid(line, lane, &self.waiting);
            if !line.is_empty() {
                turns.push_back(tenant.clone());
            }
            if lines.is_empty() {
                self.lines.remove(&tenant);
            }
            if next.is_some() {
                return next;
            }
        }
    }

    /// Pops leftovers off the front of `line` and returns its first valid item.
    fn first_valid(
        line: &mut VecDeque<(T, u64)>,
        lane: Lane,
        waiting: &HashMap<T, Waiting<S>>,
    ) -> Option<T> {
        while let Some((item, serial)) = line.pop_front() {
            if waiting
                .get(&item)
                .is_some_and(|w| w.lane == lane && w.serial == serial)
            {
                return Some(item);
            }
        }
        None
    }

    /// `item` has finished running; asked for meanwhile, it is queued again (at the back of its
    /// line, with the stamp of that request).
    pub fn done(&mut self, item: &T) {
        let Some(ran) = self.running.remove(item) else {
            return;
        };
        self.running_in[ran.lane.index()] -= 1;
        if let Some((lane, queued)) = ran.again {
            self.push(item.clone(), lane, queued);
        }
    }

    /// How many items wait (not counting those running).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// How many items wait in `lane`.
    pub fn waiting_in(&self, lane: Lane) -> usize {
        self.waiting_in[lane.index()]
    }

    /// How many items run.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// How many items admitted from `lane` run.
    pub fn running_in(&self, lane: Lane) -> usize {
        self.running_in[lane.index()]
    }

    /// How many tenants hold state (those with items in line).
    pub fn tenants(&self) -> usize {
        self.lines.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    /// `tenant/name`.
    #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
    struct Key(String);

    impl Tenanted for Key {
        fn tenant(&self) -> &str {
            self.0.split_once('/').map_or("", |(tenant, _)| tenant)
        }
    }

    fn key(tenant: &str, name: &str) -> Key {
        Key(format!("{tenant}/{name}"))
    }

    impl FairQueue<Key> {
        /// The next item admitted, without its lane and stamp.
        fn next(&mut self) -> Option<Key> {
            self.admit().map(|admitted| admitted.item)
        }
    }

    /// Runs everything to the end one at a time; the order of admission.
    fn drain(queue: &mut FairQueue<Key>) -> Vec<String> {
        let mut order = Vec::new();
        while let Some(item) = queue.next() {
            queue.done(&item);
            order.push(item.0);
        }
        order
    }

    #[test]
    fn a_burst_in_one_namespace_does_not_delay_another_namespaces_deletion() {
        let mut queue = FairQueue::new(1);
        for i in 0..10_000 {
            queue.push(key("burst", &format!("g{i}")), Lane::Routine, ());
        }
        let first = queue.next().unwrap();
        queue.push(key("quiet", "new"), Lane::Routine, ());
        queue.push(key("quiet", "deleted"), Lane::Revocation, ());
        queue.done(&first);
        // The deletion takes the first free slot; the quiet namespace's new grant waits one turn of
        // the burst.
        let deleted = queue.next().unwrap();
        assert_eq!(deleted, key("quiet", "deleted"));
        queue.done(&deleted);
        let second = queue.next().unwrap();
        assert_eq!(second.tenant(), "burst");
        queue.done(&second);
        assert_eq!(queue.next(), Some(key("quiet", "new")));
        assert_eq!(queue.waiting(), 9_998);
    }

    #[test]
    fn a_revocation_does_not_wait_for_routine_work_to_end_and_routine_work_makes_room() {
        let mut queue = FairQueue::new(2);
        for i in 0..10 {
            queue.push(key("burst", &format!("g{i}")), Lane::Routine, ());
        }
        let (g0, g1) = (queue.next().unwrap(), queue.next().unwrap());
        assert_eq!(queue.next(), None, "every slot taken by issuance");
        queue.push(key("quiet", "deleted"), Lane::Revocation, ());
        let deleted = queue.next().expect("a revocation starts at once");
        assert_eq!(deleted, key("quiet", "deleted"));
        assert_eq!(
            (
                queue.running_in(Lane::Routine),
                queue.running_in(Lane::Revocation)
            ),
            (2, 1)
        );
        // The routine item that ends gives its slot to the running revocation.
        queue.done(&g0);
        assert_eq!(queue.next(), None);
        queue.done(&deleted);
        assert_eq!(queue.next(), Some(key("burst", "g2")));
        // At most `limit` revocations at once, however many wait; no routine item meanwhile.
        for name in ["d1", "d2", "d3"] {
            queue.push(key("quiet", name), Lane::Revocation, ());
        }
        assert_eq!(queue.next(), Some(key("quiet", "d1")));
        assert_eq!(queue.next(), Some(key("quiet", "d2")));
        assert_eq!(queue.next(), None);
        assert_eq!(queue.running(), 4);
        queue.done(&g1);
        queue.done(&key("burst", "g2"));
        assert_eq!(
            queue.next(),
            None,
            "no routine item while a revocation waits"
        );
        queue.done(&key("quiet", "d1"));
        assert_eq!(queue.next(), Some(key("quiet", "d3")));
        assert_eq!(queue.next(), None, "two revocations run: the limit in all");
        queue.done(&key("quiet", "d2"));
        assert_eq!(
            queue.next(),
            None,
            "while a revocation runs, routine work takes at most half the slots"
        );
        queue.done(&key("quiet", "d3"));
        assert_eq!(queue.next(), Some(key("burst", "g3")));
        assert_eq!(queue.next(), Some(key("burst", "g4")));
    }

    #[test]
    fn tenants_take_turns_and_order_is_kept_within_each() {
        let mut queue = FairQueue::new(2);
        for name in ["a1", "a2", "a3"] {
            queue.push(key("a", name), Lane::Routine, ());
        }
        for name in ["b1", "b2"] {
            queue.push(key("b", name), Lane::Routine, ());
        }
        queue.push(key("c", "c1"), Lane::Routine, ());
        assert_eq!(
            drain(&mut queue),
            ["a/a1", "b/b1", "c/c1", "a/a2", "b/b2", "a/a3"]
        );
        assert_eq!(queue.tenants(), 0, "no state left for empty namespaces");
    }

    #[test]
    fn revocations_go_first_and_take_turns_among_namespaces() {
        let mut queue = FairQueue::new(1);
        queue.push(key("a", "new"), Lane::Routine, ());
        for name in ["a1", "a2", "a3"] {
            queue.push(key("a", name), Lane::Revocation, ());
        }
        queue.push(key("b", "b1"), Lane::Revocation, ());
        queue.push(key("c", "new"), Lane::Routine, ());
        assert_eq!(
            drain(&mut queue),
            ["a/a1", "b/b1", "a/a2", "a/a3", "a/new", "c/new"]
        );
    }

    #[test]
    fn revocations_go_before_their_namespaces_routine_work() {
        let mut queue = FairQueue::new(1);
        for name in ["r1", "r2", "r3"] {
            queue.push(key("a", name), Lane::Routine, ());
        }
        queue.push(key("a", "gone"), Lane::Revocation, ());
        // Already waiting as routine: a revocation moves it ahead, once.
        queue.push(key("a", "r3"), Lane::Revocation, ());
        queue.push(key("a", "r3"), Lane::Routine, ());
        assert_eq!(drain(&mut queue), ["a/gone", "a/r3", "a/r1", "a/r2"]);
    }

    #[test]
    fn an_item_runs_once_at_a_time_and_again_if_triggered_while_running() {
        let mut queue = FairQueue::new(4);
        queue.push(key("a", "x"), Lane::Routine, ());
        queue.push(key("a", "x"), Lane::Routine, ());
        assert_eq!(queue.waiting(), 1, "queued once");
        let x = queue.next().unwrap();
        queue.push(key("a", "x"), Lane::Routine, ());
        queue.push(key("a", "x"), Lane::Routine, ());
        assert_eq!(queue.next(), None, "not twice at once");
        queue.done(&x);
        assert_eq!(queue.next(), Some(key("a", "x")), "once more");
        queue.done(&x);
        assert_eq!(queue.next(), None, "and only once");
    }

    #[test]
    fn at_most_the_limit_run() {
        let mut queue = FairQueue::new(2);
        for i in 0..5 {
            queue.push(key(&format!("t{i}"), "x"), Lane::Routine, ());
        }
        let (a, b) = (queue.next().unwrap(), queue.next().unwrap());
        assert_eq!(queue.next(), None);
        assert_eq!((queue.running(), queue.waiting()), (2, 3));
        queue.done(&a);
        assert!(queue.next().is_some());
        assert_eq!(queue.next(), None);
        queue.done(&b);
        let mut unlimited = FairQueue::new(0);
        for i in 0..100 {
            unlimited.push(key("t", &i.to_string()), Lane::Routine, ());
        }
        assert_eq!(std::iter::from_fn(|| unlimited.next()).count(), 100);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8, u8, bool),
        Next,
        Done(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4u8, 0..12u8, prop::bool::weighted(0.2)).prop_map(|(t, n, r)| Op::Push(t, n, r)),
            3 => Just(Op::Next),
            2 => (0..8u8).prop_map(Op::Done),
        ]
    }

    proptest! {
        /// Under any interleaving of requests, admissions and completions: a routine item starts only
        /// while fewer than `limit` run in all (half of it, rounded up, while a revocation runs or
        /// waits), a revocation while fewer than `limit` revocations run, and whenever either may; never one twice; no routine item while a revocation waits; while a tenant waits in a lane, no
        /// other tenant is admitted twice in it; within a tenant's lane, admission follows the order
        /// of queueing; every request is served by a run that starts after it, which reports the
        /// lane it waited in and the stamp of the request that put it there; the count of each
        /// lane is right; and nothing is left once all is done.
        #[test]
        fn the_queue_is_fair_ordered_deduplicated_and_loses_nothing(
            limit in 0..4usize,
            ops in prop::collection::vec(op(), 1..200),
        ) {
            // Stamps are the step of the request.
            let mut queue: FairQueue<Key, usize> = FairQueue::new(limit);
            // Running items and the lane each was admitted from.
            let mut running: Vec<(Key, Lane)> = Vec::new();
            // Per waiting item: its lane, the step its current entry was queued at, and the stamp
            // it must be admitted with.
            let mut waiting: BTreeMap<Key, (Lane, usize, usize)> = BTreeMap::new();
            // Asked for while running: runs once more afterwards (the lane and stamp of the
            // request that decides its lane).
            let mut again: BTreeMap<Key, (Lane, usize)> = BTreeMap::new();
            // Per tenant waiting in a lane, the other tenants admitted in that lane since it last
            // was (or began to wait there).
            let mut passed: BTreeMap<(String, Lane), BTreeSet<String>> = BTreeMap::new();
            let push = |waiting: &mut BTreeMap<Key, (Lane, usize, usize)>, item: Key, lane: Lane,
                        step: usize, stamp: usize| {
                match waiting.get(&item) {
                    Some((queued, _, _)) if *queued >= lane => {}
                    _ => { waiting.insert(item, (lane, step, stamp)); }
                }
            };
            // A tenant that had nothing waiting in the lane begins a new wait there.
            let begin_wait = |waiting: &BTreeMap<Key, (Lane, usize, usize)>,
                              passed: &mut BTreeMap<(String, Lane), BTreeSet<String>>,
                              item: &Key, lane: Lane| {
                let tenant = item.tenant().to_owned();
                if !waiting.iter().any(|(o, (l, _, _))| o.tenant() == tenant && *l == lane) {
                    passed.insert((tenant, lane), BTreeSet::new());
                }
            };
            let admit = |queue: &mut FairQueue<Key, usize>, running: &mut Vec<(Key, Lane)>,
                         waiting: &mut BTreeMap<Key, (Lane, usize, usize)>,
                         passed: &mut BTreeMap<(String, Lane), BTreeSet<String>>| -> Result<(), TestCaseError> {
                let under = |n: usize| limit == 0 || n < limit;
                let revocations = running.iter().filter(|(_, l)| *l == Lane::Revocation).count();
                let revoking = revocations > 0 || waiting.values().any(|(l, _, _)| *l == Lane::Revocation);
                let routine_limit = if revoking { limit.div_ceil(2) } else { limit };
                let may_start = |lane: Lane| match lane {
                    Lane::Revocation => under(revocations),
                    Lane::Routine => routine_limit == 0 || running.len() < routine_limit,
                };
                let Some(admitted) = queue.admit() else {
                    for (other, (lane, _, _)) in waiting.iter() {
                        prop_assert!(!may_start(*lane),
                            "nothing admitted while {other:?} waits in {lane:?} and {} run ({revocations} revocations)",
                            running.len());
                    }
                    return Ok(());
                };
                let item = admitted.item;
                prop_assert!(!running.iter().any(|(r, _)| *r == item), "{item:?} twice at once");
                let (lane, step, stamp) = waiting.remove(&item).expect("admitted an item that was not waiting");
                prop_assert!(may_start(lane), "{item:?} admitted in {lane:?} over the limit: {} run ({revocations} revocations)",
                    running.len());
                prop_assert_eq!((admitted.lane, admitted.queued), (lane, stamp), "{:?}'s lane and stamp", item);
                let tenant = item.tenant().to_owned();
                for (other, (other_lane, other_step, _)) in waiting.iter() {
                    prop_assert!(*other_lane <= lane, "{item:?} before a revocation {other:?}");
                    if other.tenant() == tenant {
                        prop_assert!(*other_lane != lane || *other_step > step,
                            "{item:?} overtook {other:?} in its lane");
                    }
                }
                for ((waiter, waiter_lane), seen) in passed.iter_mut() {
                    let still = waiting.iter().any(|(o, (l, _, _))| o.tenant() == waiter && l == waiter_lane);
                    if *waiter != tenant && *waiter_lane == lane && still {
                        prop_assert!(seen.insert(tenant.clone()),
                            "{tenant} admitted twice in {lane:?} while {waiter} waited there");
                    }
                }
                // A new wait begins for what is left of the tenant's work in the lane.
                if waiting.iter().any(|(other, (l, _, _))| other.tenant() == tenant && *l == lane) {
                    passed.insert((tenant, lane), BTreeSet::new());
                } else {
                    passed.remove(&(tenant, lane));
                }
                running.push((item, lane));
                Ok(())
            };
            let in_lane = |waiting: &BTreeMap<Key, (Lane, usize, usize)>, lane: Lane| {
                waiting.values().filter(|(l, _, _)| *l == lane).count()
            };
            // When each entry was queued: order within a lane is checked against it.
            let mut tick = 0usize;
            for op in ops {
                tick += 1;
                let step = tick;
                match op {
                    Op::Push(t, n, revocation) => {
                        let item = key(&format!("t{t}"), &format!("n{n}"));
                        let lane = if revocation { Lane::Revocation } else { Lane::Routine };
                        queue.push(item.clone(), lane, step);
                        if running.iter().any(|(r, _)| *r == item) {
                            if again.get(&item).is_none_or(|(asked, _)| *asked < lane) {
                                again.insert(item, (lane, step));
                            }
                        } else {
                            begin_wait(&waiting, &mut passed, &item, lane);
                            push(&mut waiting, item, lane, step, step);
                        }
                    }
                    Op::Next => admit(&mut queue, &mut running, &mut waiting, &mut passed)?,
                    Op::Done(i) if !running.is_empty() => {
                        let (item, _) = running.remove(usize::from(i) % running.len());
                        queue.done(&item);
                        if let Some((lane, stamp)) = again.remove(&item) {
                            begin_wait(&waiting, &mut passed, &item, lane);
                            push(&mut waiting, item, lane, step, stamp);
                        }
                    }
                    Op::Done(_) => {}
                }
                prop_assert_eq!(queue.waiting(), waiting.len());
                for lane in Lane::ALL {
                    prop_assert_eq!(queue.waiting_in(lane), in_lane(&waiting, lane), "waiting in {:?}", lane);
                }
                prop_assert_eq!(queue.running(), running.len());
                for lane in Lane::ALL {
                    let model = running.iter().filter(|(_, l)| *l == lane).count();
                    prop_assert_eq!(queue.running_in(lane), model, "running from {:?}", lane);
                }
            }
            // Everything still waiting, or asked for while running, is run in the end.
            while !running.is_empty() || !waiting.is_empty() {
                tick += 1;
                admit(&mut queue, &mut running, &mut waiting, &mut passed)?;
                if let Some((item, _)) = running.pop() {
                    queue.done(&item);
                    if let Some((lane, stamp)) = again.remove(&item) {
                        push(&mut waiting, item, lane, tick, stamp);
                    }
                }
            }
            prop_assert!(again.is_empty());
            prop_assert_eq!(queue.admit(), None);
            prop_assert_eq!(queue.tenants(), 0, "no state kept for tenants with nothing waiting");
        }
    }
}

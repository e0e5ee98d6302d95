//! One shared copy of a value that many cached objects repeat.
//!
//! Namespaces, agents, audiences and key ids repeat across thousands of grants: the grants cache's
//! summaries and the dependency index keep one copy of each (`Interner<str>`).

use std::{collections::HashSet, hash::Hash, sync::Arc};

/// Below this many entries the interner never sweeps.
const MIN_SWEEP: usize = 64;

/// The shared copies, and when to next drop those no cached object uses any more.
pub struct Interner<T: ?Sized> {
    shared: HashSet<Arc<T>>,
    sweep_at: usize,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self {
            shared: HashSet::new(),
            sweep_at: MIN_SWEEP,
        }
    }
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    /// Points `value` at the shared copy of an equal value, or makes it the shared copy.
    ///
    /// Copies only the interner holds are dropped whenever the set has doubled since the last sweep,
    /// so the set stays within twice the number of distinct values in use, at amortised O(1) per call
    /// (a flood of distinct values costs what it would cost without sharing).
    pub fn share(&mut self, value: &mut Arc<T>) {
        if let Some(shared) = self.shared.get(value) {
            *value = shared.clone();
            return;
        }
        if self.shared.len() >= self.sweep_at {
            self.shared.retain(|v| Arc::strong_count(v) > 1);
            self.sweep_at = (self.shared.len() * 2).max(MIN_SWEEP);
        }
        self.shared.insert(value.clone());
    }

    /// How many distinct values are held.
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_end_up_as_one_allocation() {
        let mut interner = Interner::default();
        let mut a = Arc::new(String::from("system:serviceaccount:ci:deployer"));
        let mut b = Arc::new(String::from("system:serviceaccount:ci:deployer"));
        let mut c = Arc::new(String::from("alice@example.com"));
        interner.share(&mut a);
        interner.share(&mut b);
        interner.share(&mut c);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(*c, "alice@example.com");
        assert_eq!(interner.len(), 2);
    }

    #[test]
    fn values_no_one_holds_are_swept_and_the_set_stays_bounded() {
        let mut interner = Interner::default();
        let mut kept = Arc::new(String::from("kept"));
        interner.share(&mut kept);
        // A flood of distinct values that are dropped at once (deleted grants, one-off identities).
        for i in 0..10_000 {
            let mut transient = Arc::new(format!("user-{i}"));
            interner.share(&mut transient);
            assert!(interner.len() <= 2 * MIN_SWEEP + 1, "{}", interner.len());
        }
        // The value still in use survived every sweep and is still shared.
        let mut again = Arc::new(String::from("kept"));
        interner.share(&mut again);
        assert!(Arc::ptr_eq(&kept, &again));
    }

    #[test]
    fn values_in_use_are_never_swept() {
        let mut interner = Interner::default();
        let held: Vec<Arc<String>> = (0..1_000)
            .map(|i| {
                let mut v = Arc::new(format!("user-{i}"));
                interner.share(&mut v);
                v
            })
            .collect();
        assert_eq!(interner.len(), 1_000);
        for v in &held {
            let mut copy = Arc::new((**v).clone());
            interner.share(&mut copy);
            assert!(Arc::ptr_eq(v, &copy));
        }
    }
}

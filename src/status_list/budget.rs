//! What each namespace may hold of the status lists' capacity: pure, no I/O and no clock.
//!
//! An entry holds capacity from its allocation until its list retires (every token in the list
//! expired, grace included: at most the token's lifetime plus a bucket and the grace, about 25 h with
//! 24 h tokens), whether its token was minted, revoked, withdrawn or never used. So the budget counts
//! exactly that: the entries a namespace **holds** in lists that have not retired. A namespace at its
//! budget is refused further entries until its oldest ones retire, which frees them by itself; other
//! namespaces are not affected. Churn (create/delete, suspend/resume, deleting token Secrets) costs
//! the churning namespace its own budget and nobody else's.
//!
//! Counted in memory by the leader (the records of the operator's tokens are kept by grant uid, not
//! by namespace): after a restart or a change of leader the counts start at zero, erring towards
//! issuing, while the registry's own never-reuse guarantees are unaffected.

use std::collections::BTreeMap;

/// Entries a namespace may hold by default: 2 Mi, as many as the whole operator held before
/// capacity grew (64 lists of 32,768). 100,000 grants rotating 10-minute tokens hold ≈ 1.1 Mi.
pub const DEFAULT_ENTRIES_PER_NAMESPACE: usize = 1 << 21;

/// Entries held, by namespace and by when they retire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceBudget {
    limit: usize,
    held: BTreeMap<String, BTreeMap<i64, usize>>,
}

/// A namespace at its budget: what a refusal tells the person who can act on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverBudget {
    pub namespace: String,
    pub held: usize,
    pub limit: usize,
    /// When its oldest entries retire and the namespace may allocate again (Unix seconds).
    pub frees_at: Option<i64>,
}

impl OverBudget {
    /// The refusal's message, in words a person can act on.
    pub fn message(&self) -> String {
        let when = self
            .frees_at
            .and_then(|t| k8s_openapi::jiff::Timestamp::from_second(t).ok())
            .map(|t| format!(" (the next at {t})"))
            .unwrap_or_default();
        format!(
            "namespace {:?} holds {} status-list entries, its budget of {} (the operator's --status-list-budget-per-namespace); every token issued in the namespace takes one until its tokens have all expired, which frees them{when}, and this grant is tried again then. Stop re-creating, suspending and resuming grants or deleting their token Secrets in this namespace, or ask the operator's administrator to raise the budget",
            self.namespace, self.held, self.limit
        )
    }
}

impl NamespaceBudget {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            held: BTreeMap::new(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Entries `namespace` holds now.
    pub fn held(&self, namespace: &str) -> usize {
        self.held
            .get(namespace)
            .map_or(0, |by_retirement| by_retirement.values().sum())
    }

    /// Whether `namespace` may take one more entry.
    pub fn check(&self, namespace: &str) -> Result<(), OverBudget> {
        let held = self.held(namespace);
        if held < self.limit {
            return Ok(());
        }
        Err(OverBudget {
            namespace: namespace.to_owned(),
            held,
            limit: self.limit,
            frees_at: self
                .held
                .get(namespace)
                .and_then(|by_retirement| by_retirement.keys().next().copied()),
        })
    }

    /// Counts an entry `namespace` was handed, held until `retires_at`.
    pub fn charge(&mut self, namespace: &str, retires_at: i64) {
        *self
            .held
            .entry(namespace.to_owned())
            .or_default()
            .entry(retires_at)
            .or_default() += 1;
    }

    /// Gives back the entries of lists retired by `now`.
    pub fn release_retired(&mut self, now: i64) {
        for by_retirement in self.held.values_mut() {
            by_retirement.retain(|&retires_at, _| retires_at > now);
        }
        self.held
            .retain(|_, by_retirement| !by_retirement.is_empty());
    }

    /// Every namespace holding entries, with how many.
    pub fn usage(&self) -> impl Iterator<Item = (&str, usize)> {
        self.held
            .iter()
            .map(|(namespace, by_retirement)| (namespace.as_str(), by_retirement.values().sum()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_at_its_budget_is_refused_and_others_are_not() {
        let mut budget = NamespaceBudget::new(3);
        for retires_at in [200, 100, 100] {
            budget.check("churn").unwrap();
            budget.charge("churn", retires_at);
        }
        let over = budget.check("churn").unwrap_err();
        assert_eq!((over.held, over.limit, over.frees_at), (3, 3, Some(100)));
        assert!(
            over.message().contains("\"churn\" holds 3"),
            "{}",
            over.message()
        );
        assert_eq!(budget.check("quiet"), Ok(()));
        budget.charge("quiet", 100);
        assert_eq!(budget.held("quiet"), 1);
        assert_eq!(budget.held("churn"), 3, "quiet's entry is its own");
    }

    #[test]
    fn entries_free_up_when_their_lists_retire_not_before() {
        let mut budget = NamespaceBudget::new(2);
        budget.charge("ns", 100);
        budget.charge("ns", 200);
        budget.release_retired(99);
        assert!(budget.check("ns").is_err(), "nothing retired yet");
        budget.release_retired(100);
        assert_eq!(budget.held("ns"), 1);
        assert_eq!(budget.check("ns"), Ok(()));
        budget.release_retired(200);
        assert_eq!(
            budget.usage().count(),
            0,
            "a namespace holding nothing leaves nothing"
        );
    }

    #[test]
    fn a_zero_budget_refuses_everything() {
        let budget = NamespaceBudget::new(0);
        let over = budget.check("ns").unwrap_err();
        assert_eq!((over.held, over.frees_at), (0, None));
    }
}

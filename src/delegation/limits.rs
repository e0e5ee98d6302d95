//! The per-namespace grant limit (`--max-grants-per-namespace`): when a namespace holds more grants
//! than the limit, which of them may hold tokens.
//!
//! A namespace's grants are ranked by [`Seniority`]: by creationTimestamp, then — within one second,
//! the timestamp's resolution — those holding a token before those without, then by name. The first
//! `limit` are within the limit; every other is refused (`DeniedNamespaceGrantLimit`). A grant created
//! later ranks after every grant created in an earlier second, and after every grant holding a token
//! in its own second: a burst of new grants never displaces a grant that holds a token, so it revokes
//! nothing. Deleting a grant lets the first one beyond the limit in.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use super::{Reason, Refusal};

/// Where a grant ranks among its namespace's grants; the fields compare in this order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seniority {
    /// Its creationTimestamp in whole seconds (`i64::MAX` without one: last).
    pub created: i64,
    /// False for a grant holding a token, which ranks first within its second.
    pub waiting: bool,
    pub name: Arc<str>,
}

impl Seniority {
    pub fn new(created: Option<Timestamp>, holds_token: bool, name: Arc<str>) -> Self {
        Self {
            created: created.map_or(i64::MAX, |t| t.as_second()),
            waiting: !holds_token,
            name,
        }
    }
}

/// How a grant stands in its namespace, as the grant index counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceCount {
    /// Grants ranked before this one (counted up to the limit: no more are needed).
    pub ahead: usize,
    /// Grants in the namespace, this one included.
    pub total: usize,
}

/// Refuses a grant that ranks beyond the limit of its namespace (see the module doc).
pub fn within_namespace_limit(
    namespace: &str,
    limit: usize,
    count: NamespaceCount,
) -> Result<(), Refusal> {
    if count.ahead < limit {
        return Ok(());
    }
    Err(Refusal::new(
        Reason::DeniedNamespaceGrantLimit,
        format!(
            "namespace {namespace} has {} DelegationGrants and the operator issues tokens to the \
             oldest {limit} of them (--max-grants-per-namespace); this one is not among them: \
             delete grants that are no longer needed, and the oldest waiting grant gets a token as \
             each one goes",
            count.total
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64, holds_token: bool, name: &str) -> Seniority {
        Seniority::new(
            Some(Timestamp::from_second(second).unwrap()),
            holds_token,
            name.into(),
        )
    }

    #[test]
    fn grants_rank_by_creation_then_token_holders_then_name() {
        let mut ranked = [
            at(20, false, "a-newcomer"),
            at(10, false, "z"),
            at(10, true, "y"),
            at(5, false, "late-name"),
            Seniority::new(None, true, "no-timestamp".into()),
        ];
        ranked.sort();
        let names: Vec<&str> = ranked.iter().map(|s| &*s.name).collect();
        assert_eq!(names, ["late-name", "y", "z", "a-newcomer", "no-timestamp"]);
    }

    #[test]
    fn a_newcomer_in_the_same_second_never_ranks_before_a_token_holder() {
        // "a" sorts first by name, but "z" already holds a token.
        assert!(at(10, true, "z") < at(10, false, "a"));
    }

    #[test]
    fn the_first_limit_grants_pass_and_the_rest_are_refused_naming_limit_and_count() {
        let count = |ahead| NamespaceCount { ahead, total: 7 };
        assert_eq!(within_namespace_limit("team", 3, count(0)), Ok(()));
        assert_eq!(within_namespace_limit("team", 3, count(2)), Ok(()));
        let refusal = within_namespace_limit("team", 3, count(3)).unwrap_err();
        assert_eq!(refusal.reason, Reason::DeniedNamespaceGrantLimit);
        assert!(refusal.reason.is_denial());
        for part in [
            "namespace team",
            "7 DelegationGrants",
            "oldest 3",
            "--max-grants-per-namespace",
        ] {
            assert!(
                refusal.message.contains(part),
                "{part}: {}",
                refusal.message
            );
        }
    }
}

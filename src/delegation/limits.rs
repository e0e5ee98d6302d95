//! The grant limits: when a namespace holds more grants than the operator's
//! `--max-grants-per-namespace`, or more grants for one audience than its AudiencePolicies'
//! `maxGrantsPerNamespace`, which of them may hold tokens.
//!
//! A namespace's grants are ranked by [`Seniority`]: by creationTimestamp, then — within one second,
//! the timestamp's resolution — those holding a token before those without, then by name. The first
//! `limit` are within the limit; every other is refused (`DeniedNamespaceGrantLimit`, or
//! `DeniedAudienceGrantLimit` among the grants for one audience). A grant created
//! later ranks after every grant created in an earlier second, and after every grant holding a token
//! in its own second: a burst of new grants never displaces a grant that holds a token, so it revokes
//! nothing. Deleting a grant lets the first one beyond the limit in.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use super::{Reason, Refusal};
use crate::api::AudiencePolicy;

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
    within(limit, count, || {
        Refusal::new(
            Reason::DeniedNamespaceGrantLimit,
            format!(
                "namespace {namespace} has {} DelegationGrants and the operator issues tokens to the \
                 oldest {limit} of them (--max-grants-per-namespace); this one is not among them: \
                 delete grants that are no longer needed, and the oldest waiting grant gets a token \
                 as each one goes",
                count.total
            ),
        )
    })
}

/// `Ok` for a grant ranked within `limit`, else the refusal.
fn within(
    limit: usize,
    count: NamespaceCount,
    refusal: impl FnOnce() -> Refusal,
) -> Result<(), Refusal> {
    if count.ahead < limit {
        Ok(())
    } else {
        Err(refusal())
    }
}

/// The per-namespace grant limit of an audience in `namespace`: the largest `maxGrantsPerNamespace`
/// of its AudiencePolicies listing the namespace. Policies add up like RBAC rules, so one listing the
/// namespace without a limit lifts it (`None`), as does a namespace no policy lists (its grants are
/// refused as undeclared anyway). `policies` may hold other audiences' policies: they are ignored.
pub fn audience_limit(
    audience: &str,
    namespace: &str,
    policies: &[Arc<AudiencePolicy>],
) -> Option<usize> {
    let mut limits = policies
        .iter()
        .filter(|p| p.spec.audience == audience && p.spec.covers_namespace(namespace))
        .map(|p| p.spec.max_grants_per_namespace);
    let first = limits.next()??;
    limits
        .try_fold(first, |most, limit| Some(most.max(limit?)))
        .map(|most| usize::try_from(most).unwrap_or(usize::MAX))
}

/// Refuses a grant that ranks beyond the limit of its audience in its namespace (see the module doc).
pub fn within_audience_limit(
    namespace: &str,
    audience: &str,
    limit: usize,
    count: NamespaceCount,
) -> Result<(), Refusal> {
    within(limit, count, || {
        Refusal::new(
            Reason::DeniedAudienceGrantLimit,
            format!(
                "namespace {namespace} has {} DelegationGrants for audience {audience:?} and its \
                 AudiencePolicies allow tokens to the oldest {limit} of them (maxGrantsPerNamespace); \
                 this one is not among them: delete grants for the audience that are no longer \
                 needed, or ask the policy's owners to raise the limit",
                count.total
            ),
        )
    })
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

    fn policy(
        name: &str,
        audience: &str,
        namespaces: &[&str],
        limit: Option<u32>,
    ) -> Arc<AudiencePolicy> {
        let mut policy =
            crate::delegation::ceilings::tests::policy(name, audience, namespaces, &["read"]);
        policy.spec.max_grants_per_namespace = limit;
        Arc::new(policy)
    }

    const API: &str = "https://api.example.com";

    #[test]
    fn the_largest_limit_of_the_policies_listing_the_namespace_applies() {
        let policies = [
            policy("small", API, &["team"], Some(3)),
            policy("large", API, &["*"], Some(10)),
            policy("other-namespace", API, &["elsewhere"], None),
            policy(
                "other-audience",
                "https://other.example.com",
                &["team"],
                Some(1),
            ),
        ];
        assert_eq!(audience_limit(API, "team", &policies), Some(10));
        assert_eq!(audience_limit(API, "elsewhere", &policies), None);
        assert_eq!(audience_limit(API, "third", &policies), Some(10));
        assert_eq!(
            audience_limit("https://other.example.com", "team", &policies),
            Some(1)
        );
    }

    #[test]
    fn a_policy_without_a_limit_lifts_it_and_an_undeclared_audience_has_none() {
        let policies = [
            policy("limited", API, &["team"], Some(3)),
            policy("unlimited", API, &["team"], None),
        ];
        assert_eq!(audience_limit(API, "team", &policies), None);
        assert_eq!(
            audience_limit("https://undeclared.example", "team", &policies),
            None
        );
        assert_eq!(audience_limit(API, "team", &[]), None);
    }

    #[test]
    fn beyond_the_audience_limit_the_refusal_names_audience_limit_and_count() {
        let count = |ahead| NamespaceCount { ahead, total: 5 };
        assert_eq!(within_audience_limit("team", API, 2, count(1)), Ok(()));
        let refusal = within_audience_limit("team", API, 2, count(2)).unwrap_err();
        assert_eq!(refusal.reason, Reason::DeniedAudienceGrantLimit);
        assert!(refusal.reason.is_denial());
        for part in [
            "namespace team",
            "5 DelegationGrants",
            API,
            "oldest 2",
            "maxGrantsPerNamespace",
        ] {
            assert!(
                refusal.message.contains(part),
                "{part}: {}",
                refusal.message
            );
        }
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

//! Cluster-level ceilings per API: what the `AudiencePolicy` objects of a grant's audience allow
//! it. No I/O, no clock.
//!
//! The rules, fail closed:
//! 1. An audience that no policy declares for the grant's namespace gets no token
//!    (`DeniedAudienceUndeclared`).
//! 2. Each policy listing the namespace is a complete allowance on its own: it allows a grant whose
//!    scopes are all in `allowedScopes`, whose `authorizationDetails` are within
//!    `allowedAuthorizationDetails` (the chain's own [`covers`](super::chain::covers) rule; none at
//!    all when the policy declares none), whose `tokenTTL` is at most `maxTokenTTL`, and whose
//!    lifetime (`creationTimestamp + maxGrantLifetime`) has not ended.
//! 3. A grant no policy allows is refused, never narrowed: `DeniedGrantLifetimeEnded` when a policy
//!    would allow it but for its lifetime, `DeniedBeyondPolicy` otherwise, naming each policy and
//!    what of the grant it does not allow.
//! 4. Of the policies that allow a grant, the one that asks least applies: no approval before
//!    approval, then the latest lifetime end, then name order. Its approval requirement and lifetime
//!    end are the [`Ceiling`] the rest of the operator enforces.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use super::{
    Reason, Refusal,
    chain::{Uncovered, add, describe_detail, missing_from, uncovered_detail},
};
use crate::api::{AudiencePolicy, AuthorizationDetail, DelegationGrant, Duration};

/// What the applicable AudiencePolicy adds to a grant it allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ceiling {
    /// The name of the policy that allows the grant.
    pub policy: String,
    /// Whether that policy requires a person's approval for this grant.
    pub approval_required: bool,
    /// When the grant's lifetime under that policy ends; no token outlives it. `None`: no limit.
    pub ends_at: Option<Timestamp>,
    /// That policy's `maxTokenTTL`: a token exchange that asks no particular lifetime is shortened
    /// to it. (`None` only for a ceiling not read from a policy.)
    pub max_token_ttl: Option<std::time::Duration>,
}

/// What a token is asked for, as the AudiencePolicies judge it: a grant's spec, or a token exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CeilingQuestion<'a> {
    pub audience: &'a str,
    /// The namespace of the grant the token belongs to.
    pub namespace: &'a str,
    pub scopes: &'a [String],
    pub details: Option<&'a [AuthorizationDetail]>,
    /// The token lifetime asked (a grant's `tokenTTL`). `None`: no particular lifetime; the caller
    /// keeps within the applying policy's [`Ceiling::max_token_ttl`] itself.
    pub ttl: Option<&'a Duration>,
    /// When the grant was created, to count each policy's `maxGrantLifetime` from.
    pub created: Option<Timestamp>,
}

impl<'a> CeilingQuestion<'a> {
    /// The question a grant (in `namespace`) asks.
    pub fn of_grant(grant: &'a DelegationGrant, namespace: &'a str) -> Self {
        Self {
            audience: &grant.spec.audience,
            namespace,
            scopes: &grant.spec.scopes,
            details: grant.spec.authorization_details.as_deref(),
            ttl: Some(&grant.spec.token_ttl),
            created: grant.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }
}

/// Why one policy does not allow a grant.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Beyond {
    policy: String,
    /// What of the grant the policy does not allow, one phrase each (empty: only the lifetime).
    problems: Vec<String>,
    /// When the grant's lifetime under the policy ended, if it has.
    ended_at: Option<Timestamp>,
}

/// Checks `grant` (in `namespace`) against the AudiencePolicies; `policies` may hold policies of
/// other audiences, which are ignored.
pub fn ceiling(
    grant: &DelegationGrant,
    namespace: &str,
    policies: &[Arc<AudiencePolicy>],
    now: Timestamp,
) -> Result<Ceiling, Refusal> {
    ceiling_for(&CeilingQuestion::of_grant(grant, namespace), policies, now)
}

/// Checks what `question` asks against the AudiencePolicies; `policies` may hold policies of other
/// audiences, which are ignored.
pub fn ceiling_for(
    question: &CeilingQuestion,
    policies: &[Arc<AudiencePolicy>],
    now: Timestamp,
) -> Result<Ceiling, Refusal> {
    let (audience, namespace) = (question.audience, question.namespace);
    let mut declared: Vec<&AudiencePolicy> = policies
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| p.spec.audience == audience)
        .collect();
    declared.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let matching: Vec<&AudiencePolicy> = declared
        .iter()
        .copied()
        .filter(|p| p.spec.covers_namespace(namespace))
        .collect();
    if matching.is_empty() {
        return Err(undeclared(audience, namespace, &declared));
    }
    let mut allowed = Vec::new();
    let mut beyond = Vec::new();
    for policy in matching {
        match allows(policy, question, now) {
            Ok(ceiling) => allowed.push(ceiling),
            Err(b) => beyond.push(b),
        }
    }
    // No approval first; then the latest end (no end is the latest); then name order (stable sort).
    allowed.sort_by(|a, b| {
        a.approval_required
            .cmp(&b.approval_required)
            .then_with(|| match (a.ends_at, b.ends_at) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Less,
                (Some(_), None) => std::cmp::Ordering::Greater,
                (Some(x), Some(y)) => y.cmp(&x),
            })
            .then_with(|| a.policy.cmp(&b.policy))
    });
    if let Some(ceiling) = allowed.into_iter().next() {
        return Ok(ceiling);
    }
    Err(refusal(audience, namespace, &beyond))
}

/// How many policies a refusal names.
const NAMED: usize = 5;

fn undeclared(audience: &str, namespace: &str, declared: &[&AudiencePolicy]) -> Refusal {
    let message = if declared.is_empty() {
        format!(
            "no AudiencePolicy declares audience {audience:?}, and tokens are issued only for declared audiences; \
             the cluster's administrators (or the API's owners) must create an AudiencePolicy for it that lists namespace {namespace:?}"
        )
    } else {
        // A few names are enough to find them; a cluster may have hundreds.
        let names: Vec<&str> = declared
            .iter()
            .take(NAMED)
            .map(|p| p.metadata.name.as_deref().unwrap_or_default())
            .collect();
        let more = match declared.len().saturating_sub(NAMED) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        format!(
            "no AudiencePolicy for audience {audience:?} lists namespace {namespace:?} (AudiencePolicies {names:?}{more} declare it for other namespaces); \
             the cluster's administrators (or the API's owners) must add the namespace to one of them"
        )
    };
    Refusal::new(Reason::DeniedAudienceUndeclared, message)
}

fn refusal(audience: &str, namespace: &str, beyond: &[Beyond]) -> Refusal {
    // A policy that would allow all of the grant but for its age: the grant has ended, like validUntil.
    if let Some(ended) = beyond.iter().find(|b| b.problems.is_empty()) {
        let at = ended.ended_at.map(|t| t.to_string()).unwrap_or_default();
        return Refusal::new(
            Reason::DeniedGrantLifetimeEnded,
            format!(
                "the grant's lifetime under AudiencePolicy {:?} (creationTimestamp + maxGrantLifetime) ended at {at}; \
                 create a new grant to continue",
                ended.policy
            ),
        );
    }
    let each: Vec<String> = beyond
        .iter()
        .map(|b| {
            let mut problems = b.problems.clone();
            if let Some(at) = b.ended_at {
                problems.push(format!("its lifetime under the policy ended at {at}"));
            }
            format!("AudiencePolicy {:?}: {}", b.policy, problems.join("; "))
        })
        .collect();
    Refusal::new(
        Reason::DeniedBeyondPolicy,
        format!(
            "the grant asks more than any AudiencePolicy for audience {audience:?} allows namespace {namespace:?}: {}; \
             narrow the grant, or ask the policy's owners to allow it",
            each.join(" | ")
        ),
    )
}

/// Whether one policy (already known to list the namespace) allows all of the grant.
fn allows(
    policy: &AudiencePolicy,
    question: &CeilingQuestion,
    now: Timestamp,
) -> Result<Ceiling, Beyond> {
    let spec = &policy.spec;
    let name = policy.metadata.name.clone().unwrap_or_default();
    let mut problems = Vec::new();

    let scopes = missing_from(question.scopes, &spec.allowed_scopes);
    if !scopes.is_empty() {
        problems.push(format!(
            "scopes {scopes:?} are not in its allowedScopes {:?}",
            spec.allowed_scopes
        ));
    }

    let wanted = question.details.unwrap_or_default();
    match spec.allowed_authorization_details.as_deref().filter(|d| !d.is_empty()) {
        None if !wanted.is_empty() => problems.push(
            "the grant lists authorizationDetails, and the policy allows none (it has no allowedAuthorizationDetails)"
                .into(),
        ),
        None => {}
        Some(ceilings) => match uncovered_detail(wanted, ceilings) {
            None => {}
            Some(Uncovered::NoneListed) => problems.push(format!(
                "the grant lists no authorizationDetails, and the policy allows only tokens limited by them ({})",
                allowed_details(ceilings)
            )),
            Some(Uncovered::Detail(d)) => problems.push(format!(
                "authorization detail {} is not within its allowedAuthorizationDetails ({})",
                describe_detail(d),
                allowed_details(ceilings)
            )),
        },
    }

    let max_token_ttl = spec.max_token_ttl.parse();
    match (question.ttl.map(Duration::parse), &max_token_ttl) {
        (Some(Ok(ttl)), Ok(max)) if ttl <= *max => {}
        (None, Ok(_)) => {}
        (Some(Ok(_)), Ok(_)) => problems.push(format!(
            "tokenTTL {} exceeds its maxTokenTTL {}",
            question.ttl.map(Duration::as_str).unwrap_or_default(),
            spec.max_token_ttl
        )),
        (Some(Err(e)), _) => problems.push(format!("spec.tokenTTL: {e}")),
        (_, Err(e)) => problems.push(format!("its maxTokenTTL cannot be read: {e}")),
    }

    let mut ends_at = None;
    if let Some(lifetime) = &spec.max_grant_lifetime {
        match (lifetime.parse(), question.created) {
            (Ok(lifetime), Some(created)) => ends_at = Some(add(created, lifetime)),
            (Err(e), _) => problems.push(format!("its maxGrantLifetime cannot be read: {e}")),
            // Only an object that never went through the apiserver lacks one: fail closed.
            (Ok(_), None) => problems.push(
                "the grant has no creationTimestamp to count its maxGrantLifetime from".into(),
            ),
        }
    }
    let ended_at = ends_at.filter(|end| *end <= now);

    if problems.is_empty() && ended_at.is_none() {
        Ok(Ceiling {
            policy: name,
            approval_required: spec
                .require_approval
                .as_ref()
                .is_some_and(|r| match &r.scopes {
                    None => true,
                    Some(scopes) => question.scopes.iter().any(|s| scopes.contains(s)),
                }),
            ends_at,
            max_token_ttl: max_token_ttl.ok(),
        })
    } else {
        Err(Beyond {
            policy: name,
            problems,
            ended_at,
        })
    }
}

fn allowed_details(ceilings: &[crate::api::AuthorizationDetail]) -> String {
    let each: Vec<String> = ceilings.iter().map(describe_detail).collect();
    format!("it allows details {}", each.join(", "))
}

/// What an AgentIdentity (in `namespace`) allows beyond every AudiencePolicy: one phrase per audience
/// it lists that no policy declares for the namespace, per scope no policy of that audience allows,
/// and a `maxTokenTTL` longer than every such policy's. Grants asking for any of it are refused; the
/// agent says so in its status, so that its owner learns before a grant does.
pub fn agent_beyond(
    agent: &crate::api::AgentIdentity,
    namespace: &str,
    policies: &[Arc<AudiencePolicy>],
) -> Vec<String> {
    let agent_ttl = agent.spec.max_token_ttl.parse().ok();
    let mut beyond = Vec::new();
    for audience in &agent.spec.allowed_audiences {
        let matching: Vec<&AudiencePolicy> = policies
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| &p.spec.audience == audience && p.spec.covers_namespace(namespace))
            .collect();
        if matching.is_empty() {
            beyond.push(format!(
                "audience {audience:?} is declared by no AudiencePolicy for namespace {namespace:?}"
            ));
            continue;
        }
        let scopes: Vec<String> = agent
            .spec
            .allowed_scopes
            .iter()
            .filter(|s| !matching.iter().any(|p| p.spec.allowed_scopes.contains(s)))
            .cloned()
            .collect();
        if !scopes.is_empty() {
            beyond.push(format!(
                "scopes {scopes:?} are allowed by no AudiencePolicy of {audience:?}"
            ));
        }
        let longest = matching
            .iter()
            .filter_map(|p| p.spec.max_token_ttl.parse().ok())
            .max();
        if let (Some(agent_ttl), Some(longest)) = (agent_ttl, longest)
            && agent_ttl > longest
        {
            beyond.push(format!(
                "maxTokenTTL {} is longer than every AudiencePolicy of {audience:?} allows ({}s)",
                agent.spec.max_token_ttl,
                longest.as_secs()
            ));
        }
    }
    beyond
}

#[cfg(test)]
#[path = "ceilings_tests.rs"]
pub(crate) mod tests;

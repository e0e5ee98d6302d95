//! Chain resolution and attenuation.
//!
//! A grant either starts at a principal or hangs below a parent grant. Resolving it walks up to the
//! root (detecting cycles and dangling references), then validates every hop from the root down, so a
//! grant is only valid when its whole lineage is. Authority only ever narrows: a hop that asks for more
//! than it can have is refused, never silently cut down.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::ceilings::{self, Ceiling};
use super::delivery::{Delivery, delivery_of};
use super::record::TokenRecord;
use crate::api::{
    AgentIdentity, AudiencePolicy, AuthorizationDetail, ChainLink, DelegationGrant, Principal,
    agent_subject,
};

/// The longest chain the operator resolves (root grant plus eight hops, the highest `maxDepth`).
pub const MAX_CHAIN_LENGTH: usize = 9;

/// Read access to the grants and agents of one namespace, to the cluster's AudiencePolicies, and to
/// the operator's own record of the grants' tokens.
pub trait Lookup {
    fn grant(&self, name: &str) -> Option<Arc<DelegationGrant>>;
    fn agent(&self, name: &str) -> Option<Arc<AgentIdentity>>;
    /// What the operator itself minted and decided for `grant` (by its uid); `None` when this process
    /// has not looked at it yet.
    fn record(&self, grant: &DelegationGrant) -> Option<TokenRecord>;
    /// The AudiencePolicies declaring `audience` (for any namespace).
    fn audience_policies(&self, audience: &str) -> Vec<Arc<AudiencePolicy>>;
}

/// Operator-wide limits, set by flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Shortest tokenTTL accepted (protects the apiserver from rotation storms).
    pub min_token_ttl: Duration,
    /// Longest tokenTTL accepted, whatever an agent allows; it bounds how long retired keys stay published.
    pub max_token_ttl: Duration,
    /// How long any grant lives from its creation (`None`: until its `validUntil`, or for ever). A
    /// grant past it is refused as `Expired`, and no token outlives it.
    pub max_grant_lifetime: Option<Duration>,
    /// Whether a token endpoint serves deliveries to pods (`--pod-delivery`): without one, a grant
    /// with Pod delivery is refused rather than Ready with a token no pod could fetch.
    pub pod_delivery: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_token_ttl: Duration::from_secs(60),
            max_token_ttl: Duration::from_secs(24 * 3600),
            max_grant_lifetime: None,
            pod_delivery: true,
        }
    }
}

/// Why a grant holds no token. Each is the `reason` of its `Ready=False` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The grant's `suspended` is true.
    Suspended,
    /// The grant's `validUntil` has passed.
    Expired,
    /// The acting AgentIdentity does not exist.
    AgentMissing,
    /// The acting AgentIdentity is suspended.
    AgentSuspended,
    /// The parent grant is missing, invalid, or holds no valid token (yet).
    ParentNotReady,
    /// The parent holds a valid token but its spec changed and it has not been looked at yet: wait,
    /// rather than revoke on every edit of a parent.
    ParentUpdating,
    /// The parent grant does not exist.
    DeniedParentMissing,
    /// Following parentGrantRef comes back to a grant already in the chain.
    DeniedCycle,
    /// A scope is not in the actor's allowedScopes.
    DeniedScopeNotAllowed,
    /// A scope is not held by the parent grant.
    DeniedScopeExceedsParent,
    /// The audience is not in the actor's allowedAudiences.
    DeniedAudienceNotAllowed,
    /// The audience differs from the parent grant's.
    DeniedAudienceMismatch,
    /// The authorizationDetails are not covered by the parent grant's.
    DeniedDetailsExceedParent,
    /// No AudiencePolicy declares the audience for the grant's namespace (fail closed).
    DeniedAudienceUndeclared,
    /// Policies declare the audience for the namespace, but none allows all of the grant (scopes,
    /// authorizationDetails, tokenTTL).
    DeniedBeyondPolicy,
    /// The grant's lifetime under its AudiencePolicy (creationTimestamp + maxGrantLifetime) has ended.
    DeniedGrantLifetimeEnded,
    /// tokenTTL exceeds the actor's maxTokenTTL or the operator's ceiling.
    DeniedTTLTooLong,
    /// tokenTTL is below the operator's minimum.
    DeniedTTLTooShort,
    /// The parent's actor does not list this actor in delegation.allowedActors.
    DeniedActorNotAllowed,
    /// A maxDepth above this hop would be exceeded (or the chain is longer than the operator resolves).
    DeniedDepth,
    /// A field the apiserver should have rejected (kept as a safety net, fail closed).
    DeniedInvalidSpec,
    /// The authorizationDetails are larger than the token budget allows.
    DeniedDetailsTooLarge,
    /// The parent grant was deleted and re-created under the same name: a hop is bound to the parent
    /// it was first resolved under.
    DeniedParentReplaced,
    /// Nothing proves who created the grant (the admission policies were not installed then).
    DeniedRequesterMissing,
    /// The grant carries a requester, but it was created while the stamping policy was not in force,
    /// so its author may have typed it.
    DeniedRequesterUnverified,
    /// The requester may not speak for the principal, or may not extend the parent actor's chain.
    DeniedNotAuthorized,
    /// The ServiceAccount that asked for the grant was deleted, or re-created with another uid.
    DeniedRequesterGone,
    /// The namespace holds more grants than the operator's `--max-grants-per-namespace`, and this one
    /// is not among the oldest.
    DeniedNamespaceGrantLimit,
    /// The namespace holds more grants for the audience than its AudiencePolicies'
    /// `maxGrantsPerNamespace`, and this one is not among the oldest.
    DeniedAudienceGrantLimit,
    /// The grant's namespace holds all the status-list entries its budget allows (its tokens'
    /// entries free up as they expire; the grant is tried again then).
    DeniedStatusListBudget,
    /// Every status list the operator may keep (`--status-list-max-lists`) is in use: no token can
    /// be issued anywhere until entries free up. Not a judgement of the grant.
    StatusListsFull,
    /// The actor requires approval and no allowed approver has approved this generation yet.
    ApprovalPending,
    /// An allowed approver rejected this generation of the grant.
    ApprovalRejected,
    /// A Secret of the grant's name exists and was not created by the operator for this grant: the
    /// operator never takes one over.
    SecretConflict,
    /// The actor requires proof of possession and the grant asks for Secret delivery.
    DeniedProofNeedsPodDelivery,
    /// Pod delivery, and the actor names no ServiceAccount its pods would run as.
    DeniedPodDeliveryNeedsServiceAccount,
    /// Pod delivery, and no token endpoint serves deliveries (`--pod-delivery=false`).
    PodDeliveryNotServed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Suspended => "Suspended",
            Reason::Expired => "Expired",
            Reason::AgentMissing => "AgentMissing",
            Reason::AgentSuspended => "AgentSuspended",
            Reason::ParentNotReady => "ParentNotReady",
            Reason::ParentUpdating => "ParentUpdating",
            Reason::DeniedParentMissing => "DeniedParentMissing",
            Reason::DeniedCycle => "DeniedCycle",
            Reason::DeniedScopeNotAllowed => "DeniedScopeNotAllowed",
            Reason::DeniedScopeExceedsParent => "DeniedScopeExceedsParent",
            Reason::DeniedAudienceNotAllowed => "DeniedAudienceNotAllowed",
            Reason::DeniedAudienceMismatch => "DeniedAudienceMismatch",
            Reason::DeniedDetailsExceedParent => "DeniedDetailsExceedParent",
            Reason::DeniedAudienceUndeclared => "DeniedAudienceUndeclared",
            Reason::DeniedBeyondPolicy => "DeniedBeyondPolicy",
            Reason::DeniedGrantLifetimeEnded => "DeniedGrantLifetimeEnded",
            Reason::DeniedTTLTooLong => "DeniedTTLTooLong",
            Reason::DeniedTTLTooShort => "DeniedTTLTooShort",
            Reason::DeniedActorNotAllowed => "DeniedActorNotAllowed",
            Reason::DeniedDepth => "DeniedDepth",
            Reason::DeniedInvalidSpec => "DeniedInvalidSpec",
            Reason::DeniedDetailsTooLarge => "DeniedDetailsTooLarge",
            Reason::DeniedParentReplaced => "DeniedParentReplaced",
            Reason::DeniedRequesterMissing => "DeniedRequesterMissing",
            Reason::DeniedRequesterUnverified => "DeniedRequesterUnverified",
            Reason::DeniedNotAuthorized => "DeniedNotAuthorized",
            Reason::DeniedRequesterGone => "DeniedRequesterGone",
            Reason::DeniedNamespaceGrantLimit => "DeniedNamespaceGrantLimit",
            Reason::DeniedAudienceGrantLimit => "DeniedAudienceGrantLimit",
            Reason::DeniedStatusListBudget => "DeniedStatusListBudget",
            Reason::StatusListsFull => "StatusListsFull",
            Reason::ApprovalPending => "ApprovalPending",
            Reason::ApprovalRejected => "ApprovalRejected",
            Reason::SecretConflict => "SecretConflict",
            Reason::DeniedProofNeedsPodDelivery => "DeniedProofNeedsPodDelivery",
            Reason::DeniedPodDeliveryNeedsServiceAccount => "DeniedPodDeliveryNeedsServiceAccount",
            Reason::PodDeliveryNotServed => "PodDeliveryNotServed",
        }
    }

    /// Denials are policy violations in the grant itself, reported as Warning events.
    pub fn is_denial(self) -> bool {
        self.as_str().starts_with("Denied")
    }
}

/// A grant that may not hold a token, and why, in words a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// A valid grant, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    /// Root principal first, then one link per agent; the last is this grant's actor.
    pub chain: Vec<ChainLink>,
    /// The root principal: the token's `sub`.
    pub principal: Principal,
    /// Token subjects of the agents, root-most first; the last is the current actor.
    pub actors: Vec<String>,
    /// The scopes the token carries (the grant's own, which every check above has approved).
    pub effective_scopes: Vec<String>,
    pub audience: String,
    pub token_ttl: Duration,
    pub renew_before: Option<Duration>,
    /// No token may live past this: the earliest validUntil in the lineage, the parent token's
    /// expiry and the end of each hop's lifetime under its AudiencePolicy.
    pub not_after: Option<Timestamp>,
    /// Where the token goes ([`super::delivery`]).
    pub delivery: Delivery,
}

/// Resolves `grant` (in namespace `namespace`) against the other grants and agents of that namespace.
pub fn resolve(
    grant: &DelegationGrant,
    namespace: &str,
    lookup: &impl Lookup,
    policy: &Policy,
    now: Timestamp,
) -> Result<Resolution, Refusal> {
    if grant.spec.is_suspended() {
        return Err(Refusal::new(
            Reason::Suspended,
            "spec.suspended is true; set it to false to issue tokens again",
        ));
    }
    if let Some(end) = ends_at(grant, policy)
        && end.at <= now
    {
        return Err(Refusal::new(
            end.reason,
            format!("the delegation ended at {} ({})", end.at, end.why),
        ));
    }
    let lineage = lineage(grant, lookup)?;

    // Every ancestor must itself be valid; its refusal becomes ours as ParentNotReady.
    let mut lifetime_ends = Vec::new();
    for depth in 0..lineage.len() - 1 {
        let checked = check_hop(&lineage, depth, namespace, lookup, policy, now);
        if let Ok(ceiling) = &checked {
            lifetime_ends.extend(ceiling.ends_at);
        }
        if let Err(refusal) = checked {
            let ancestor = lineage[depth].metadata.name.as_deref().unwrap_or_default();
            return Err(Refusal::new(
                Reason::ParentNotReady,
                format!(
                    "ancestor grant {ancestor:?} is not valid: {}: {}",
                    refusal.reason.as_str(),
                    refusal.message
                ),
            ));
        }
    }
    let ceiling = check_hop(&lineage, lineage.len() - 1, namespace, lookup, policy, now)?;
    lifetime_ends.extend(ceiling.ends_at);

    let parent_expiry = match lineage.len() {
        1 => None,
        n => {
            let parent = &lineage[n - 2];
            Some(parent_token_expiry(parent, lookup.record(parent), now)?)
        }
    };
    // Whole seconds, as times are stored: a limit with a fraction would never compare equal to the
    // expiry read back, and the token would be renewed again and again until the limit.
    let not_after = lineage
        .iter()
        .filter_map(|g| ends_at(g, policy).map(|end| end.at))
        .chain(parent_expiry)
        .chain(lifetime_ends)
        .min()
        .map(|t| Timestamp::from_second(t.as_second()).unwrap_or(t));

    let root = &lineage[0];
    let principal = root.spec.principal.clone().ok_or_else(|| {
        Refusal::new(
            Reason::DeniedInvalidSpec,
            format!("root grant {:?} has no principal", root.metadata.name),
        )
    })?;
    let chain = links(&lineage, namespace, lookup);
    let actors = chain.iter().filter_map(|l| l.subject.clone()).collect();
    let token_ttl = parse_duration_field(&grant.spec.token_ttl, "spec.tokenTTL")?;
    let renew_before = grant
        .spec
        .renew_before
        .as_ref()
        .map(|d| parse_duration_field(d, "spec.renewBefore"))
        .transpose()?;
    let actor = lookup.agent(&grant.spec.actor_ref.name).ok_or_else(|| {
        Refusal::new(
            Reason::AgentMissing,
            format!(
                "AgentIdentity {:?} does not exist",
                grant.spec.actor_ref.name
            ),
        )
    })?;
    let delivery = delivery_of(grant, &actor, policy.pod_delivery)?;
    Ok(Resolution {
        chain,
        principal,
        actors,
        effective_scopes: grant.spec.scopes.clone(),
        audience: grant.spec.audience.clone(),
        token_ttl,
        renew_before,
        not_after,
        delivery,
    })
}

/// The chain links of a lineage (root grant first): the principal, when the root names one, then one
/// link per agent. An ancestor's approver is the one its token records (the operator's own record);
/// the last hop's is left for the decision to fill from the evidence it rests on.
fn links(
    lineage: &[Arc<DelegationGrant>],
    namespace: &str,
    lookup: &impl Lookup,
) -> Vec<ChainLink> {
    let principal = lineage
        .first()
        .and_then(|root| root.spec.principal.as_ref());
    let principal_link = principal.map(|p| ChainLink {
        kind: p.kind.as_str().into(),
        name: p.name.clone(),
        subject: None,
        grant: None,
        scopes: None,
        requested_by: None,
        approved_by: None,
    });
    let last = lineage.len().saturating_sub(1);
    let agent_links = lineage.iter().enumerate().map(|(i, g)| ChainLink {
        kind: "AgentIdentity".into(),
        name: g.spec.actor_ref.name.clone(),
        subject: Some(agent_subject(namespace, &g.spec.actor_ref.name)),
        grant: g.metadata.name.clone(),
        scopes: Some(g.spec.scopes.clone()),
        requested_by: g.spec.requester.as_ref().map(|r| r.username.clone()),
        approved_by: (i < last).then(|| approver_of(g, lookup)).flatten(),
    });
    principal_link.into_iter().chain(agent_links).collect()
}

/// The chain as written, followed as far as it goes (no rule checked): the evidence the audit trail
/// records for a grant that was refused before its chain could be resolved.
pub fn chain_as_written(
    grant: &DelegationGrant,
    namespace: &str,
    lookup: &impl Lookup,
) -> Vec<ChainLink> {
    let mut lineage = vec![Arc::new(grant.clone())];
    let mut seen = BTreeSet::from([grant.metadata.name.clone().unwrap_or_default()]);
    while let Some(parent_ref) = lineage.last().and_then(|g| g.spec.parent_grant_ref.clone()) {
        if lineage.len() >= MAX_CHAIN_LENGTH || !seen.insert(parent_ref.name.clone()) {
            break;
        }
        let Some(parent) = lookup.grant(&parent_ref.name) else {
            break;
        };
        lineage.push(parent);
    }
    lineage.reverse();
    links(&lineage, namespace, lookup)
}

/// The grants from the root down to `grant` (inclusive). Refuses cycles, dangling parents and chains
/// longer than [`MAX_CHAIN_LENGTH`]. Always terminates: every step visits a new name, and the walk is
/// bounded by the maximum length.
fn lineage(
    grant: &DelegationGrant,
    lookup: &impl Lookup,
) -> Result<Vec<Arc<DelegationGrant>>, Refusal> {
    let mut lineage = vec![Arc::new(grant.clone())];
    let mut seen = BTreeSet::from([grant.metadata.name.clone().unwrap_or_default()]);
    while let Some(parent_ref) = lineage.last().and_then(|g| g.spec.parent_grant_ref.clone()) {
        if !seen.insert(parent_ref.name.clone()) {
            return Err(Refusal::new(
                Reason::DeniedCycle,
                format!(
                    "following parentGrantRef leads back to grant {:?}: a chain cannot contain a cycle",
                    parent_ref.name
                ),
            ));
        }
        if lineage.len() >= MAX_CHAIN_LENGTH {
            return Err(Refusal::new(
                Reason::DeniedDepth,
                format!("the chain is longer than {MAX_CHAIN_LENGTH} grants"),
            ));
        }
        let child = lineage
            .last()
            .and_then(|g| g.metadata.name.clone())
            .unwrap_or_default();
        let Some(parent) = lookup.grant(&parent_ref.name) else {
            let pinned = lineage
                .last()
                .and_then(|g| g.status.as_ref())
                .is_some_and(|s| s.parent_grant_uid.is_some());
            return Err(if lineage.len() == 1 && !pinned {
                Refusal::new(
                    Reason::DeniedParentMissing,
                    format!(
                        "parent grant {:?} does not exist in this namespace",
                        parent_ref.name
                    ),
                )
            } else {
                Refusal::new(
                    Reason::ParentNotReady,
                    format!(
                        "grant {child:?} hangs below grant {:?}, which no longer exists",
                        parent_ref.name
                    ),
                )
            });
        };
        lineage.push(parent);
    }
    lineage.reverse();
    Ok(lineage)
}

/// Validates the hop at `index` of `lineage` (0 = root grant) against its actor, the cluster's
/// AudiencePolicies and its parent; returns what the applicable policy adds.
fn check_hop(
    lineage: &[Arc<DelegationGrant>],
    index: usize,
    namespace: &str,
    lookup: &impl Lookup,
    policy: &Policy,
    now: Timestamp,
) -> Result<Ceiling, Refusal> {
    let grant = &lineage[index];
    let name = grant.metadata.name.as_deref().unwrap_or_default();
    if index + 1 < lineage.len() {
        // Ancestors: suspension and expiry end their authority for everyone below.
        if grant.spec.is_suspended() {
            return Err(Refusal::new(
                Reason::Suspended,
                format!("grant {name:?} is suspended"),
            ));
        }
        if let Some(end) = ends_at(grant, policy)
            && end.at <= now
        {
            return Err(Refusal::new(
                end.reason,
                format!("grant {name:?} ended at {} ({})", end.at, end.why),
            ));
        }
    }
    if grant.spec.principal.is_some() == grant.spec.parent_grant_ref.is_some() {
        return Err(Refusal::new(
            Reason::DeniedInvalidSpec,
            "exactly one of spec.principal or spec.parentGrantRef must be set",
        ));
    }
    let actor_name = &grant.spec.actor_ref.name;
    let Some(actor) = lookup.agent(actor_name) else {
        return Err(Refusal::new(
            Reason::AgentMissing,
            format!("AgentIdentity {actor_name:?} does not exist in namespace {namespace:?}"),
        ));
    };
    if actor.spec.is_suspended() {
        return Err(Refusal::new(
            Reason::AgentSuspended,
            format!(
                "AgentIdentity {actor_name:?} is suspended; its tokens are revoked until it is resumed"
            ),
        ));
    }
    check_ttl(grant, &actor, policy)?;
    check_details_budget(grant)?;
    if let Some(principal) = &grant.spec.principal
        && let Some(problem) = super::authority::principal_name_problem(principal)
    {
        return Err(Refusal::new(Reason::DeniedInvalidSpec, problem));
    }

    let not_allowed = missing_from(&grant.spec.scopes, &actor.spec.allowed_scopes);
    if !not_allowed.is_empty() {
        return Err(Refusal::new(
            Reason::DeniedScopeNotAllowed,
            format!(
                "scopes {not_allowed:?} are not in AgentIdentity {actor_name:?} allowedScopes {:?}; remove them from the grant or allow them on the agent",
                actor.spec.allowed_scopes
            ),
        ));
    }
    if !actor.spec.allowed_audiences.contains(&grant.spec.audience) {
        return Err(Refusal::new(
            Reason::DeniedAudienceNotAllowed,
            format!(
                "audience {:?} is not in AgentIdentity {actor_name:?} allowedAudiences {:?}",
                grant.spec.audience, actor.spec.allowed_audiences
            ),
        ));
    }
    // The cluster's ceiling for the API, above whatever the namespace's agent allows.
    let ceiling = ceilings::ceiling(
        grant,
        namespace,
        &lookup.audience_policies(&grant.spec.audience),
        now,
    )?;
    if index == 0 {
        return Ok(ceiling);
    }

    let parent = &lineage[index - 1];
    let parent_name = parent.metadata.name.as_deref().unwrap_or_default();
    let pinned = grant
        .status
        .as_ref()
        .and_then(|s| s.parent_grant_uid.as_deref());
    if let Some(pinned) = pinned
        && parent.metadata.uid.as_deref() != Some(pinned)
    {
        return Err(Refusal::new(
            Reason::DeniedParentReplaced,
            format!(
                "parent grant {parent_name:?} was deleted and re-created since grant {name:?} was created under it (uid {pinned}); a hop never moves to a new parent: delete and re-create it"
            ),
        ));
    }
    let beyond_parent = missing_from(&grant.spec.scopes, &parent.spec.scopes);
    if !beyond_parent.is_empty() {
        return Err(Refusal::new(
            Reason::DeniedScopeExceedsParent,
            format!(
                "scopes {beyond_parent:?} are not held by parent grant {parent_name:?} (it holds {:?})",
                parent.spec.scopes
            ),
        ));
    }
    if grant.spec.audience != parent.spec.audience {
        return Err(Refusal::new(
            Reason::DeniedAudienceMismatch,
            format!(
                "audience {:?} differs from parent grant {parent_name:?} audience {:?}",
                grant.spec.audience, parent.spec.audience
            ),
        ));
    }
    if let Err(uncovered) = details_within(
        grant.spec.authorization_details.as_deref(),
        parent.spec.authorization_details.as_deref(),
    ) {
        return Err(Refusal::new(
            Reason::DeniedDetailsExceedParent,
            format!("{uncovered}, which parent grant {parent_name:?} does not cover"),
        ));
    }
    let parent_actor_name = &parent.spec.actor_ref.name;
    let parent_actor = lookup.agent(parent_actor_name);
    let may_act = parent_actor
        .as_ref()
        .and_then(|a| a.spec.delegation.as_ref())
        .and_then(|d| d.allowed_actors.as_ref())
        .is_some_and(|allowed| allowed.contains(actor_name));
    if !may_act {
        return Err(Refusal::new(
            Reason::DeniedActorNotAllowed,
            format!(
                "AgentIdentity {parent_actor_name:?} (actor of parent grant {parent_name:?}) does not list {actor_name:?} in spec.delegation.allowedActors"
            ),
        ));
    }
    // Every agent above this hop bounds how many hops may follow it.
    let actors: Vec<&str> = lineage[..=index]
        .iter()
        .map(|g| g.spec.actor_ref.name.as_str())
        .collect();
    if let Err(TooDeep {
        agent,
        max_depth,
        hops_below,
    }) = within_depths(&actors, |name| max_depth_of(lookup.agent(name).as_deref()))
    {
        return Err(Refusal::new(
            Reason::DeniedDepth,
            format!(
                "AgentIdentity {agent:?} allows {max_depth} further hop(s) below it (spec.delegation.maxDepth) but this grant would be {hops_below} below it"
            ),
        ));
    }
    Ok(ceiling)
}

/// An agent above the last of a chain whose `maxDepth` the chain exceeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TooDeep {
    /// The agent's name.
    pub agent: String,
    /// Its `spec.delegation.maxDepth`.
    pub max_depth: usize,
    /// How far below it the last agent of the chain would be.
    pub hops_below: usize,
}

/// Whether the last of `actors` (agent names, root-most first, the new one last) is within the
/// `maxDepth` of every agent above it: the first, root-most, agent it is too far below, if any. The
/// one depth rule for a hop of grants and a hop by token exchange.
pub(crate) fn within_depths(
    actors: &[&str],
    max_depth_of: impl Fn(&str) -> usize,
) -> Result<(), TooDeep> {
    let Some(last) = actors.len().checked_sub(1) else {
        return Ok(());
    };
    for (above, agent) in actors[..last].iter().enumerate() {
        let hops_below = last - above;
        let max_depth = max_depth_of(agent);
        if hops_below > max_depth {
            return Err(TooDeep {
                agent: (*agent).to_owned(),
                max_depth,
                hops_below,
            });
        }
    }
    Ok(())
}

/// How many hops an agent allows below it: its `spec.delegation.maxDepth`, 0 when it has no
/// delegation policy or does not exist.
pub(crate) fn max_depth_of(agent: Option<&AgentIdentity>) -> usize {
    agent
        .and_then(|a| a.spec.delegation.as_ref().map(|d| d.max_depth))
        .map_or(0, |d| usize::try_from(d).unwrap_or(0))
}

/// The most `authorizationDetails` may take in a token once encoded: tokens travel in HTTP headers,
/// which servers commonly cap at 8 KiB.
pub const MAX_DETAILS_BYTES: usize = 4096;

fn check_details_budget(grant: &DelegationGrant) -> Result<(), Refusal> {
    let Some(details) = &grant.spec.authorization_details else {
        return Ok(());
    };
    let size = serde_json::to_string(details).map_or(usize::MAX, |s| s.len());
    if size > MAX_DETAILS_BYTES {
        return Err(Refusal::new(
            Reason::DeniedDetailsTooLarge,
            format!(
                "authorizationDetails take {size} bytes in the token, more than the {MAX_DETAILS_BYTES} allowed; list fewer or shorter entries"
            ),
        ));
    }
    Ok(())
}

fn check_ttl(
    grant: &DelegationGrant,
    actor: &AgentIdentity,
    policy: &Policy,
) -> Result<(), Refusal> {
    let ttl = parse_duration_field(&grant.spec.token_ttl, "spec.tokenTTL")?;
    let actor_max = parse_duration_field(
        &actor.spec.max_token_ttl,
        "maxTokenTTL of the AgentIdentity",
    )?;
    if let Some(renew_before) = &grant.spec.renew_before
        && parse_duration_field(renew_before, "spec.renewBefore")? >= ttl
    {
        return Err(Refusal::new(
            Reason::DeniedInvalidSpec,
            "spec.renewBefore must be shorter than spec.tokenTTL",
        ));
    }
    if ttl > actor_max {
        return Err(Refusal::new(
            Reason::DeniedTTLTooLong,
            format!(
                "tokenTTL {} exceeds AgentIdentity {:?} maxTokenTTL {}",
                grant.spec.token_ttl, grant.spec.actor_ref.name, actor.spec.max_token_ttl
            ),
        ));
    }
    if ttl > policy.max_token_ttl {
        return Err(Refusal::new(
            Reason::DeniedTTLTooLong,
            format!(
                "tokenTTL {} exceeds the operator's ceiling of {}s",
                grant.spec.token_ttl,
                policy.max_token_ttl.as_secs()
            ),
        ));
    }
    if ttl < policy.min_token_ttl {
        return Err(Refusal::new(
            Reason::DeniedTTLTooShort,
            format!(
                "tokenTTL {} is below the operator's minimum of {}s",
                grant.spec.token_ttl,
                policy.min_token_ttl.as_secs()
            ),
        ));
    }
    Ok(())
}

/// When the parent's current token expires, if the operator holds a valid token for the parent's
/// current spec — by its own record, never by the parent's status (which anyone allowed to write
/// `delegationgrants/status` could make say Ready, approved, and valid for a year).
fn parent_token_expiry(
    parent: &DelegationGrant,
    record: Option<TokenRecord>,
    now: Timestamp,
) -> Result<Timestamp, Refusal> {
    let name = parent.metadata.name.as_deref().unwrap_or_default();
    let not_ready = || {
        Refusal::new(
            Reason::ParentNotReady,
            format!(
                "parent grant {name:?} does not hold a valid token yet; this grant is issued once it does"
            ),
        )
    };
    if parent.metadata.deletion_timestamp.is_some() {
        return Err(not_ready());
    }
    match record {
        // Not looked at by this process yet (it just started): wait for its reconcile, which wakes
        // this grant, rather than revoke a token that may well stand.
        None => Err(Refusal::new(
            Reason::ParentUpdating,
            format!("parent grant {name:?} has not been checked by the operator yet"),
        )),
        Some(TokenRecord::Refused) => Err(not_ready()),
        Some(TokenRecord::Holds(held)) if held.expires_at() <= now => Err(not_ready()),
        Some(TokenRecord::Holds(held)) if held.confirmed_for != parent.metadata.generation => {
            Err(Refusal::new(
                Reason::ParentUpdating,
                format!("parent grant {name:?} changed and is being reconciled"),
            ))
        }
        Some(TokenRecord::Holds(held)) => Ok(held.expires_at()),
    }
}

/// Fine-grained limits only narrow down a chain: when the parent lists authorizationDetails, every
/// detail of the child must fall within one of them. A parent without details does not restrict.
/// Returns what is not covered.
fn details_within(
    child: Option<&[AuthorizationDetail]>,
    parent: Option<&[AuthorizationDetail]>,
) -> Result<(), String> {
    let Some(parent) = parent.filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    match uncovered_detail(child.unwrap_or_default(), parent) {
        None => Ok(()),
        Some(Uncovered::NoneListed) => Err("this grant lists no authorizationDetails, so its token would carry no fine-grained limit".into()),
        Some(Uncovered::Detail(c)) => Err(format!(
            "authorization detail {} is not within the parent's",
            describe_detail(c)
        )),
    }
}

/// What of a grant's authorizationDetails is not within a non-empty list of ceilings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Uncovered<'a> {
    /// The grant lists none, so its token would carry no fine-grained limit at all.
    NoneListed,
    /// The first detail no ceiling covers.
    Detail(&'a AuthorizationDetail),
}

/// The first of `wanted` that no detail of `ceilings` [`covers`] (or that `wanted` is empty while
/// `ceilings` limits something): the one rule for a hop below its parent and for a grant below an
/// AudiencePolicy.
pub(crate) fn uncovered_detail<'a>(
    wanted: &'a [AuthorizationDetail],
    ceilings: &[AuthorizationDetail],
) -> Option<Uncovered<'a>> {
    if wanted.is_empty() {
        return (!ceilings.is_empty()).then_some(Uncovered::NoneListed);
    }
    wanted
        .iter()
        .find(|w| !ceilings.iter().any(|c| covers(c, w)))
        .map(Uncovered::Detail)
}

/// A detail as a person reads it in a message: `of type "ticket" for "1234"`.
pub(crate) fn describe_detail(detail: &AuthorizationDetail) -> String {
    let mut text = format!("of type {:?}", detail.type_);
    if let Some(identifier) = &detail.identifier {
        text.push_str(&format!(" for {identifier:?}"));
    }
    for (name, list) in [
        ("actions", &detail.actions),
        ("locations", &detail.locations),
        ("datatypes", &detail.datatypes),
        ("privileges", &detail.privileges),
    ] {
        if let Some(list) = list {
            text.push_str(&format!(" with {name} {list:?}"));
        }
    }
    text
}

/// Whether `outer` allows everything `inner` asks: same type, same identifier when `outer` names one
/// (naming one where the parent named none narrows to one resource), and each list exactly where
/// `outer` has it, within `outer`'s. A list the parent left out may not appear below it: what
/// `privileges: [admin]` means to a resource server is its own business, so it is never added on the way
/// down.
pub(crate) fn covers(outer: &AuthorizationDetail, inner: &AuthorizationDetail) -> bool {
    fn within(outer: &Option<Vec<String>>, inner: &Option<Vec<String>>) -> bool {
        match (outer, inner) {
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(o), Some(i)) => i.iter().all(|x| o.contains(x)),
        }
    }
    outer.type_ == inner.type_
        && (outer.identifier.is_none() || outer.identifier == inner.identifier)
        && within(&outer.actions, &inner.actions)
        && within(&outer.locations, &inner.locations)
        && within(&outer.datatypes, &inner.datatypes)
        && within(&outer.privileges, &inner.privileges)
}

/// Who approved an ancestor's hop, as the token the operator holds for it records.
fn approver_of(grant: &DelegationGrant, lookup: &impl Lookup) -> Option<String> {
    match lookup.record(grant)? {
        TokenRecord::Holds(held) => held.approved_by.as_deref().map(str::to_owned),
        TokenRecord::Refused => None,
    }
}

/// When a grant ends, and why: its `validUntil` (`Expired`: the grant's own choice), or its creation
/// plus the operator's longest grant lifetime (`DeniedGrantLifetimeEnded`, as under an AudiencePolicy's
/// `maxGrantLifetime`), whichever comes first.
struct End {
    at: Timestamp,
    reason: Reason,
    why: String,
}

fn ends_at(grant: &DelegationGrant, policy: &Policy) -> Option<End> {
    let until = valid_until(grant).map(|at| End {
        at,
        reason: Reason::Expired,
        why: "spec.validUntil".into(),
    });
    let lifetime = policy.max_grant_lifetime.and_then(|max| {
        let created = grant.metadata.creation_timestamp.as_ref()?.0;
        Some(End {
            at: add(created, max),
            reason: Reason::DeniedGrantLifetimeEnded,
            why: format!(
                "created at {created}, and grants live at most {}s (--max-grant-lifetime); re-create it to ask again",
                max.as_secs()
            ),
        })
    });
    [until, lifetime]
        .into_iter()
        .flatten()
        .min_by_key(|end| end.at)
}

fn valid_until(grant: &DelegationGrant) -> Option<Timestamp> {
    grant.spec.valid_until.as_ref().map(|t| t.0)
}

fn parse_duration_field(d: &crate::api::Duration, field: &str) -> Result<Duration, Refusal> {
    d.parse()
        .map_err(|e| Refusal::new(Reason::DeniedInvalidSpec, format!("{field}: {e}")))
}

/// The items of `wanted` that `held` lacks, in `wanted`'s order.
pub(crate) fn missing_from(wanted: &[String], held: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|s| !held.contains(s))
        .cloned()
        .collect()
}

/// Adds a std duration to a timestamp, saturating at the maximum representable time.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

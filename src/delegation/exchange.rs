//! RFC 8693 token exchange, decided: may the workload that presents a delegated token (the
//! *subject*) have a narrower one, for itself or for an agent its current actor may delegate to?
//! No I/O, no clock: the HTTP shell verifies the subject token and the caller's ServiceAccount
//! token, gathers what the cluster says into [`ExchangeFacts`], and mints what [`decide`] returns.
//!
//! The rules run in order and the first hit wins; each refusal carries an RFC error code, a stable
//! `reason` label and a description that names only the caller's own namespace and ServiceAccount,
//! the agents of the token's own chain and what was asked:
//! 1. The grant the token names still exists with the same uid (`grant_gone`).
//! 2. The token carries a status claim (`no_status`) and entries reserved for its lineage
//!    (`no_lineage`), its `act` is its `delegation_chain` (`act_mismatch`), and a token bound to a
//!    key (DPoP `cnf.jkt`) comes with a proof by that key (`proof_required`, `proof_key_mismatch`).
//!    The new token is bound to the proof's key when a proof came.
//! 3. Every agent of the chain exists and is not suspended (`agent_missing`, `agent_suspended`).
//! 4. The caller runs in the token's namespace (`other_namespace`).
//! 5. The caller runs the current actor (a *narrowing*: the actor stays) or exactly one agent the
//!    current actor lists in `delegation.allowedActors` (a *hop*: `act` nests one deeper)
//!    (`not_an_actor`, `ambiguous_actor`).
//!    A delivery (Pod delivery, the subject the grant's sealed token) is never a hop
//!    (`not_the_agent`), and an agent that requires proof of possession gets a token only with a
//!    DPoP proof (`proof_required`).
//! 6. A hop is to an agent that is not suspended, not already in the chain, within every `maxDepth`
//!    above it, and needs no approval (`agent_suspended`, `circular`, `too_deep`,
//!    `approval_required`); no token records more than [`MAX_DELEGATION_RECORDS`] hops
//!    (`too_many_exchanges`).
//! 7. Scopes are well formed and within the token's and the new actor's (`malformed_scope`,
//!    `wider_scope`).
//! 8. The audience is the token's and the new actor's (`other_audience`).
//! 9. The authorization details are within the token's, and small enough (`wider_details`,
//!    `details_too_large`).
//! 10. The AudiencePolicies of the audience allow it, as they would a grant (`audience_undeclared`,
//!     `grant_lifetime_ended`, `beyond_policy`, and `approval_required` for a hop).
//! 11. The lifetime is within the token's remaining life and every limit (`zero_lifetime`,
//!     `subject_expiring`, `too_long`).
//!
//! Authority only narrows: asking for more is refused, never silently cut down. The new token gets
//! its own status-list entry, one of the entries the operator reserved after the grant token's own
//! when it minted it (the token's `lineage` claim, [`LineageEntries`]): revoking or suspending the
//! grant token does the same to every entry of its lineage in the same publish, so every token
//! exchanged from it, at any depth, follows it with no record kept per exchange; and no exchange
//! outlives its subject.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;

use super::{
    Reason,
    ceilings::{Ceiling, CeilingQuestion, ceiling_for},
    chain::{
        MAX_CHAIN_LENGTH, MAX_DETAILS_BYTES, TooDeep, Uncovered, describe_detail, max_depth_of,
        missing_from, uncovered_detail, within_depths,
    },
    claims::{AccessTokenClaims, Actor, DelegationRecord, Party, Workload},
};
use crate::api::{AgentIdentity, AudiencePolicy, AuthorizationDetail, agent_subject};
use crate::status_list::{LineageEntries, TokenStatusRef};

/// The longest an exchanged token lives unless `--max-exchanged-token-ttl` says otherwise.
pub const DEFAULT_MAX_EXCHANGED_TTL: Duration = Duration::from_secs(15 * 60);

/// The most scopes an exchange may ask for (as many as a grant may).
pub const MAX_REQUESTED_SCOPES: usize = 64;

/// The longest scope an exchange may ask for (as long as a grant's may be).
pub const MAX_SCOPE_LEN: usize = 128;

/// The most hop records a token may carry: its grants' ([`MAX_CHAIN_LENGTH`]) and as many
/// exchanges again. Narrowings use no depth, so without it a token exchanged over and over would
/// grow past what an HTTP header holds.
pub const MAX_DELEGATION_RECORDS: usize = 2 * MAX_CHAIN_LENGTH;

/// The workload asking for the exchange, as its pod-bound ServiceAccount token proved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvenWorkload {
    pub namespace: String,
    /// The ServiceAccount's name (not its `system:serviceaccount:…` user name).
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// What the caller asks for; every field left out keeps the subject token's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExchangeRequest {
    /// `None`: the subject token's scopes.
    pub scopes: Option<Vec<String>>,
    /// `None`: the subject token's `aud` (`resource` and `audience` already merged by the shell).
    pub audience: Option<String>,
    /// `None`: the subject token's.
    pub authorization_details: Option<Vec<AuthorizationDetail>>,
    /// Seconds; `None`: the longest allowed.
    pub expires_in: Option<u64>,
}

/// The grant the subject token names, as the cluster has it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrantState {
    Live {
        uid: String,
        created: Option<Timestamp>,
    },
    /// It has a deletion timestamp.
    Deleting,
    Missing,
}

/// What the exchange process knows of the cluster.
pub trait Directory {
    fn agent(&self, namespace: &str, name: &str) -> Option<Arc<AgentIdentity>>;
    /// The AudiencePolicies declaring `audience` (for any namespace).
    fn audience_policies(&self, audience: &str) -> Vec<Arc<AudiencePolicy>>;
}

/// Operator-wide limits on exchanges, set by flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeLimits {
    /// `--max-exchanged-token-ttl`.
    pub max_ttl: Duration,
}

impl Default for ExchangeLimits {
    fn default() -> Self {
        Self {
            max_ttl: DEFAULT_MAX_EXCHANGED_TTL,
        }
    }
}

/// Everything one exchange is decided on, gathered once.
pub struct ExchangeFacts<'a, D: Directory> {
    /// Already verified by the shell: signature, `typ` at+jwt, `iss`, `exp`, status VALID.
    pub subject: &'a AccessTokenClaims,
    /// The grant the subject names (`subject.grant.namespace`/`name`).
    pub grant: GrantState,
    /// Proven by TokenReview, pod-bound.
    pub caller: &'a ProvenWorkload,
    pub request: &'a ExchangeRequest,
    pub directory: &'a D,
    pub limits: &'a ExchangeLimits,
    pub now: Timestamp,
    /// A fresh token id chosen by the shell.
    pub jti: String,
    /// The thumbprint of the key of the DPoP proof sent with the request, once the shell checked
    /// the proof (RFC 9449 §4.3, replay included); `None` without one.
    pub proof_key: Option<String>,
    /// A delivery (Pod delivery): the subject is the grant's own token, which the operator keeps
    /// sealed and the caller never held; only its agent's pods may have a token of it.
    pub delivery: bool,
}

/// The OAuth error codes an exchange is refused with (RFC 6749 §5.2, RFC 8693 §2.2.2, RFC 9396 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidGrant,
    InvalidTarget,
    InvalidScope,
    UnauthorizedClient,
    InvalidAuthorizationDetails,
    InvalidDpopProof,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::InvalidTarget => "invalid_target",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::UnauthorizedClient => "unauthorized_client",
            ErrorCode::InvalidAuthorizationDetails => "invalid_authorization_details",
            ErrorCode::InvalidDpopProof => "invalid_dpop_proof",
        }
    }
}

/// The stable `reason` labels of refusals, for metrics and the audit trail.
pub mod reason {
    pub const GRANT_GONE: &str = "grant_gone";
    pub const NO_STATUS: &str = "no_status";
    pub const NO_LINEAGE: &str = "no_lineage";
    pub const PROOF_REQUIRED: &str = "proof_required";
    pub const PROOF_KEY_MISMATCH: &str = "proof_key_mismatch";
    pub const ACT_MISMATCH: &str = "act_mismatch";
    pub const AGENT_MISSING: &str = "agent_missing";
    pub const AGENT_SUSPENDED: &str = "agent_suspended";
    pub const OTHER_NAMESPACE: &str = "other_namespace";
    pub const NOT_AN_ACTOR: &str = "not_an_actor";
    pub const NOT_THE_AGENT: &str = "not_the_agent";
    pub const AMBIGUOUS_ACTOR: &str = "ambiguous_actor";
    pub const CIRCULAR: &str = "circular";
    pub const TOO_DEEP: &str = "too_deep";
    pub const APPROVAL_REQUIRED: &str = "approval_required";
    pub const TOO_MANY_EXCHANGES: &str = "too_many_exchanges";
    pub const MALFORMED_SCOPE: &str = "malformed_scope";
    pub const WIDER_SCOPE: &str = "wider_scope";
    pub const OTHER_AUDIENCE: &str = "other_audience";
    pub const WIDER_DETAILS: &str = "wider_details";
    pub const DETAILS_TOO_LARGE: &str = "details_too_large";
    pub const AUDIENCE_UNDECLARED: &str = "audience_undeclared";
    pub const GRANT_LIFETIME_ENDED: &str = "grant_lifetime_ended";
    pub const BEYOND_POLICY: &str = "beyond_policy";
    pub const AGENT_INVALID: &str = "agent_invalid";
    pub const ZERO_LIFETIME: &str = "zero_lifetime";
    pub const SUBJECT_EXPIRING: &str = "subject_expiring";
    pub const TOO_LONG: &str = "too_long";
}

/// An exchange refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeRefusal {
    pub code: ErrorCode,
    /// A stable snake_case label ([`reason`]).
    pub reason: &'static str,
    /// What a person can do about it; never a token, a key, or another namespace's name.
    pub description: String,
}

impl ExchangeRefusal {
    fn new(code: ErrorCode, reason: &'static str, description: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            description: description.into(),
        }
    }
}

/// Who holds the new token.
struct NewActor {
    name: String,
    agent: Arc<AgentIdentity>,
    /// A hop (a new agent, `act` one deeper) rather than a narrowing (the current actor keeps it).
    hop: bool,
}

/// Decides one exchange: the claims of the new token, or why there is none.
pub fn decide<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
) -> Result<AccessTokenClaims, ExchangeRefusal> {
    let created = grant_is_live(facts)?;
    let status = own_status_entry(facts)?;
    let chain = actor_chain(facts.subject)?;
    let binding = binding(facts)?;
    let current = chain_agents_stand(facts, &chain)?;
    same_namespace(facts)?;
    let new_actor = new_actor(facts, &chain, current)?;
    delivered_to_the_agent(facts, &new_actor)?;
    proof_when_required(facts, &new_actor)?;
    let scopes = requested_scopes(facts);
    if new_actor.hop {
        hop_allowed(facts, &chain, &new_actor, &scopes)?;
    }
    records_left(facts)?;
    scopes_within(facts, &new_actor, &scopes)?;
    let audience = audience_within(facts, &new_actor)?;
    let details = details_within(facts)?;
    let ceiling = policies_allow(facts, &new_actor, &audience, &scopes, &details, created)?;
    let lifetime = lifetime(facts, &new_actor, &ceiling)?;
    let mut claims = claims(
        facts, &new_actor, audience, scopes, details, status, lifetime,
    );
    claims.cnf = binding;
    Ok(claims)
}

/// Rule 2, first half: the new token's own status-list entry, in the subject's lineage. The
/// subject's `lineage` must cover its own entry (it is the lineage's root or one of its entries),
/// so a token can only ever point into the lineage of the grant token it descends from.
fn own_status_entry<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
) -> Result<(TokenStatusRef, LineageEntries), ExchangeRefusal> {
    let subject = facts.subject;
    let status = subject
        .status
        .as_ref()
        .and_then(TokenStatusRef::from_status_claim)
        .ok_or_else(|| {
            ExchangeRefusal::new(
                ErrorCode::InvalidGrant,
                reason::NO_STATUS,
                "the token carries no status claim, so its revocation could not be followed to an exchanged token; only tokens with a status-list entry may be exchanged",
            )
        })?;
    let no_lineage = || {
        ExchangeRefusal::new(
            ErrorCode::InvalidGrant,
            reason::NO_LINEAGE,
            "the token has no status-list entries reserved for the tokens exchanged from it (it was minted before this operator version reserved them); the next token of its grant will have them (at its rotation; or re-create the grant)",
        )
    };
    let lineage = subject
        .lineage
        .filter(|l| l.admits(status.idx))
        .ok_or_else(no_lineage)?;
    let idx = lineage
        .entry_for(seed_of(&facts.jti))
        .ok_or_else(no_lineage)?;
    Ok((
        TokenStatusRef {
            idx,
            uri: status.uri,
        },
        lineage,
    ))
}

/// Rule 2, last: possession of a bound subject token's key. A subject bound to a key (`cnf.jkt`)
/// is exchanged only with a DPoP proof by that key, so a copied bound token is worth nothing; the
/// new token is bound to the proof's key, if a proof came, so a bound lineage stays bound.
fn binding<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
) -> Result<Option<crate::dpop::Confirmation>, ExchangeRefusal> {
    match (&facts.subject.cnf, &facts.proof_key) {
        (Some(_), None) => Err(ExchangeRefusal::new(
            ErrorCode::InvalidDpopProof,
            reason::PROOF_REQUIRED,
            "the subject_token is bound to a key (its cnf.jkt): send a DPoP proof signed by that key in the DPoP header, with ath the hash of the subject_token",
        )),
        (Some(bound), Some(key)) if bound.jkt != *key => Err(ExchangeRefusal::new(
            ErrorCode::InvalidDpopProof,
            reason::PROOF_KEY_MISMATCH,
            "the DPoP proof is signed by another key than the one the subject_token is bound to (its cnf.jkt); only the holder of that key can exchange it",
        )),
        (_, key) => Ok(key.clone().map(|jkt| crate::dpop::Confirmation { jkt })),
    }
}

/// A seed from a token id: the same on every replica and every start (SHA-256, not a std hasher).
fn seed_of(jti: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(jti.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Rule 1: the grant is the one the token was minted for. Returns when it was created.
fn grant_is_live<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
) -> Result<Option<Timestamp>, ExchangeRefusal> {
    match &facts.grant {
        GrantState::Live { uid, created } if *uid == facts.subject.grant.uid => Ok(*created),
        _ => Err(ExchangeRefusal::new(
            ErrorCode::InvalidGrant,
            reason::GRANT_GONE,
            "the DelegationGrant this token was issued for was deleted, is being deleted, or was re-created since; a grant's tokens end with it, so ask for a token of a current grant",
        )),
    }
}

/// Rule 2: the agent names of `act`, root-most first, once they are known to be the chain's.
fn actor_chain(subject: &AccessTokenClaims) -> Result<Vec<String>, ExchangeRefusal> {
    let mismatch = |what: &str| {
        ExchangeRefusal::new(
            ErrorCode::InvalidGrant,
            reason::ACT_MISMATCH,
            format!(
                "the token's act claim {what}; it is not a token this issuer minted as it stands"
            ),
        )
    };
    let mut subs = Vec::new();
    let mut next = Some(&subject.act);
    while let Some(actor) = next {
        if subs.len() == MAX_CHAIN_LENGTH {
            return Err(mismatch(&format!(
                "nests more than {MAX_CHAIN_LENGTH} actors"
            )));
        }
        subs.push(actor.sub.as_str());
        next = actor.act.as_deref();
    }
    subs.reverse();
    // A narrowing record hands the token on to the agent that already holds it: no new actor.
    let delegates: Vec<&str> = subject
        .delegation_chain
        .iter()
        .filter(|r| !is_narrowing(r))
        .map(|r| r.delegate.as_str())
        .collect();
    if subs != delegates {
        return Err(mismatch("does not name the actors of its delegation_chain"));
    }
    if subs.last().copied() != Some(subject.client_id.as_str()) {
        return Err(mismatch("does not end at its client_id"));
    }
    let prefix = agent_subject(&subject.grant.namespace, "");
    subs.iter()
        .map(|sub| {
            sub.strip_prefix(&prefix)
                .filter(|name| !name.is_empty() && !name.contains('/'))
                .map(str::to_owned)
                .ok_or_else(|| {
                    mismatch("names an actor that is not an agent of the grant's namespace")
                })
        })
        .collect()
}

/// Whether a record is a narrowing by token exchange: the agent holding the token handed it on to
/// itself. (A grant hop from an agent to itself records no workload and does add an actor.)
fn is_narrowing(record: &DelegationRecord) -> bool {
    record.workload.is_some()
        && record.delegator.kind == "AgentIdentity"
        && record.delegator.sub == record.delegate
}

/// Rule 3: every agent of the chain still stands. Returns the current actor's.
fn chain_agents_stand<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    chain: &[String],
) -> Result<Arc<AgentIdentity>, ExchangeRefusal> {
    let namespace = &facts.subject.grant.namespace;
    let mut current = None;
    for name in chain {
        let Some(agent) = facts.directory.agent(namespace, name) else {
            return Err(ExchangeRefusal::new(
                ErrorCode::InvalidGrant,
                reason::AGENT_MISSING,
                format!(
                    "AgentIdentity {name:?} of the token's delegation chain no longer exists; its tokens cannot be exchanged"
                ),
            ));
        };
        if agent.spec.is_suspended() {
            return Err(ExchangeRefusal::new(
                ErrorCode::InvalidGrant,
                reason::AGENT_SUSPENDED,
                format!(
                    "AgentIdentity {name:?} of the token's delegation chain is suspended; its tokens are revoked until it is resumed"
                ),
            ));
        }
        current = Some(agent);
    }
    // actor_chain never returns an empty chain (act always names one); fail closed all the same.
    current.ok_or_else(|| {
        ExchangeRefusal::new(
            ErrorCode::InvalidGrant,
            reason::ACT_MISMATCH,
            "the token names no actor",
        )
    })
}

/// Rule 4: only a workload of the token's own namespace may exchange it.
fn same_namespace<D: Directory>(facts: &ExchangeFacts<'_, D>) -> Result<(), ExchangeRefusal> {
    if facts.caller.namespace == facts.subject.grant.namespace {
        return Ok(());
    }
    // The token's namespace is another tenant's: not named.
    Err(ExchangeRefusal::new(
        ErrorCode::UnauthorizedClient,
        reason::OTHER_NAMESPACE,
        format!(
            "ServiceAccount {:?} of namespace {:?} may not exchange this token: it belongs to another namespace, and only workloads of the token's own namespace may exchange it",
            facts.caller.service_account, facts.caller.namespace
        ),
    ))
}

/// Rule 5: the caller runs the current actor (a narrowing) or exactly one agent it may delegate to
/// (a hop).
fn new_actor<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    chain: &[String],
    current: Arc<AgentIdentity>,
) -> Result<NewActor, ExchangeRefusal> {
    let namespace = &facts.subject.grant.namespace;
    let caller_sa = facts.caller.service_account.as_str();
    let current_name = chain.last().cloned().unwrap_or_default();
    let runs =
        |agent: &AgentIdentity| agent.spec.service_account_name.as_deref() == Some(caller_sa);
    if runs(&current) {
        return Ok(NewActor {
            name: current_name,
            agent: current,
            hop: false,
        });
    }
    let allowed: BTreeSet<&String> = current
        .spec
        .delegation
        .as_ref()
        .and_then(|d| d.allowed_actors.as_ref())
        .into_iter()
        .flatten()
        .collect();
    let mut candidates: Vec<(String, Arc<AgentIdentity>)> = allowed
        .into_iter()
        .filter_map(|name| {
            let agent = facts.directory.agent(namespace, name)?;
            runs(&agent).then(|| (name.clone(), agent))
        })
        .collect();
    match candidates.len() {
        0 => Err(ExchangeRefusal::new(
            ErrorCode::UnauthorizedClient,
            reason::NOT_AN_ACTOR,
            format!(
                "ServiceAccount {caller_sa:?} runs neither AgentIdentity {current_name:?} (the token's current actor) nor any agent {current_name:?} lists in spec.delegation.allowedActors; set the agent's spec.serviceAccountName to it, or allow its agent as an actor"
            ),
        )),
        1 => {
            let (name, agent) = candidates.remove(0);
            Ok(NewActor {
                name,
                agent,
                hop: true,
            })
        }
        _ => {
            let names: Vec<&str> = candidates.iter().map(|(n, _)| n.as_str()).collect();
            Err(ExchangeRefusal::new(
                ErrorCode::UnauthorizedClient,
                reason::AMBIGUOUS_ACTOR,
                format!(
                    "ServiceAccount {caller_sa:?} runs several of the agents {current_name:?} may delegate to ({names:?}), so which one would act is not clear; give each agent its own ServiceAccount"
                ),
            ))
        }
    }
}

/// Rule 5, for a delivery: the caller runs the grant's own agent. A delivery hands out a token the
/// caller never held, so it is never a hop: an agent the actor may delegate to gets its token by
/// exchanging one its own pods were delivered, which it must hold first.
fn delivered_to_the_agent<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    new_actor: &NewActor,
) -> Result<(), ExchangeRefusal> {
    if !facts.delivery || !new_actor.hop {
        return Ok(());
    }
    let current = facts.subject.act.sub.as_str();
    Err(ExchangeRefusal::new(
        ErrorCode::UnauthorizedClient,
        reason::NOT_THE_AGENT,
        format!(
            "only the pods of the grant's own agent ({current}) can fetch its token; ServiceAccount {:?} runs an agent it may delegate to, which must exchange a token the agent's pods hold",
            facts.caller.service_account
        ),
    ))
}

/// Rule 5, last: an agent whose spec says `requireProofOfPossession` gets only key-bound tokens, so
/// every token it is handed needs a DPoP proof.
fn proof_when_required<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    new_actor: &NewActor,
) -> Result<(), ExchangeRefusal> {
    // The grant token's own record of it counts too: an agent cache that lags its spec's change
    // must not hand out an unbound token from a lineage minted for bound ones.
    let required = new_actor.agent.spec.requires_proof_of_possession()
        || facts.subject.delivery.as_deref() == Some(crate::delegation::claims::DELIVERY_POD_DPOP);
    if facts.proof_key.is_some() || !required {
        return Ok(());
    }
    Err(ExchangeRefusal::new(
        ErrorCode::InvalidDpopProof,
        reason::PROOF_REQUIRED,
        format!(
            "AgentIdentity {:?} requires proof of possession: send a DPoP proof (RFC 9449) of the key its tokens are to be bound to, in the DPoP header",
            new_actor.name
        ),
    ))
}

/// The scopes asked for, each once, in the order asked (the subject's when none are).
fn requested_scopes<D: Directory>(facts: &ExchangeFacts<'_, D>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    match &facts.request.scopes {
        Some(asked) => asked
            .iter()
            .filter(|s| seen.insert(s.as_str()))
            .cloned()
            .collect(),
        None => subject_scopes(facts.subject),
    }
}

fn subject_scopes(subject: &AccessTokenClaims) -> Vec<String> {
    subject
        .scope
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Rule 6: a hop is one a DelegationGrant could make without a person's approval.
fn hop_allowed<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    chain: &[String],
    new_actor: &NewActor,
    scopes: &[String],
) -> Result<(), ExchangeRefusal> {
    let name = &new_actor.name;
    let unauthorized = |reason, description: String| {
        ExchangeRefusal::new(ErrorCode::UnauthorizedClient, reason, description)
    };
    if new_actor.agent.spec.is_suspended() {
        return Err(unauthorized(
            reason::AGENT_SUSPENDED,
            format!(
                "AgentIdentity {name:?} is suspended; it receives no tokens until it is resumed"
            ),
        ));
    }
    if chain.contains(name) {
        return Err(unauthorized(
            reason::CIRCULAR,
            format!(
                "AgentIdentity {name:?} already acts in this token's delegation chain ({chain:?}); authority is not handed back up a chain"
            ),
        ));
    }
    if chain.len() + 1 > MAX_CHAIN_LENGTH {
        return Err(unauthorized(
            reason::TOO_DEEP,
            format!(
                "the chain would be {} agents long, more than the {MAX_CHAIN_LENGTH} the operator allows",
                chain.len() + 1
            ),
        ));
    }
    let namespace = &facts.subject.grant.namespace;
    let actors: Vec<&str> = chain
        .iter()
        .map(String::as_str)
        .chain([name.as_str()])
        .collect();
    if let Err(TooDeep {
        agent,
        max_depth,
        hops_below,
    }) = within_depths(&actors, |agent| {
        max_depth_of(facts.directory.agent(namespace, agent).as_deref())
    }) {
        return Err(unauthorized(
            reason::TOO_DEEP,
            format!(
                "AgentIdentity {agent:?} allows {max_depth} further hop(s) below it (spec.delegation.maxDepth) but AgentIdentity {name:?} would be {hops_below} below it"
            ),
        ));
    }
    let needs_approval = new_actor
        .agent
        .spec
        .require_approval
        .as_ref()
        .is_some_and(|r| match &r.scopes {
            None => true,
            Some(listed) => scopes.iter().any(|s| listed.contains(s)),
        });
    if needs_approval {
        return Err(unauthorized(
            reason::APPROVAL_REQUIRED,
            format!(
                "AgentIdentity {name:?} requires a person's approval for scopes {scopes:?}, which a token exchange cannot wait for; create a DelegationGrant for this hop (actorRef {name:?}, below the token's grant) and have it approved instead"
            ),
        ));
    }
    Ok(())
}

/// Rule 6, for every exchange: the token's record of hops stays small enough to travel.
fn records_left<D: Directory>(facts: &ExchangeFacts<'_, D>) -> Result<(), ExchangeRefusal> {
    if facts.subject.delegation_chain.len() < MAX_DELEGATION_RECORDS {
        return Ok(());
    }
    Err(ExchangeRefusal::new(
        ErrorCode::UnauthorizedClient,
        reason::TOO_MANY_EXCHANGES,
        format!(
            "the token already records {} hops, the most a token may ({MAX_DELEGATION_RECORDS}); exchange a token from earlier in its lineage instead",
            facts.subject.delegation_chain.len()
        ),
    ))
}

/// An RFC 6749 §3.3 scope-token, no longer than a grant's scopes may be.
fn is_scope_token(scope: &str) -> bool {
    (1..=MAX_SCOPE_LEN).contains(&scope.len())
        && scope
            .bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
}

/// Rule 7: the scopes are well formed and within the token's and the new actor's.
fn scopes_within<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    new_actor: &NewActor,
    scopes: &[String],
) -> Result<(), ExchangeRefusal> {
    let malformed = |description: String| {
        ExchangeRefusal::new(
            ErrorCode::InvalidRequest,
            reason::MALFORMED_SCOPE,
            description,
        )
    };
    if scopes.is_empty() {
        return Err(malformed(
            "no scope was asked for; ask for at least one, or leave scope out to keep the token's"
                .into(),
        ));
    }
    if scopes.len() > MAX_REQUESTED_SCOPES {
        return Err(malformed(format!(
            "{} scopes were asked for, more than the {MAX_REQUESTED_SCOPES} a token may carry",
            scopes.len()
        )));
    }
    // Not echoed: it may be anything, a pasted token included.
    if let Some(position) = scopes.iter().position(|s| !is_scope_token(s)) {
        return Err(malformed(format!(
            "scope number {} is not an RFC 6749 scope-token (1 to {MAX_SCOPE_LEN} printable ASCII characters, no space, '\"' or '\\')",
            position + 1
        )));
    }
    let held = subject_scopes(facts.subject);
    let beyond_token = missing_from(scopes, &held);
    if !beyond_token.is_empty() {
        return Err(ExchangeRefusal::new(
            ErrorCode::InvalidScope,
            reason::WIDER_SCOPE,
            format!(
                "scopes {beyond_token:?} are not held by the token being exchanged (it holds {held:?}); an exchange only narrows"
            ),
        ));
    }
    let allowed = &new_actor.agent.spec.allowed_scopes;
    let beyond_agent = missing_from(scopes, allowed);
    if !beyond_agent.is_empty() {
        return Err(ExchangeRefusal::new(
            ErrorCode::InvalidScope,
            reason::WIDER_SCOPE,
            format!(
                "scopes {beyond_agent:?} are not in AgentIdentity {:?} allowedScopes {allowed:?}; ask for fewer",
                new_actor.name
            ),
        ));
    }
    Ok(())
}

/// Rule 8: one audience per token, the token's, which the new actor must be allowed.
fn audience_within<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    new_actor: &NewActor,
) -> Result<String, ExchangeRefusal> {
    let held = &facts.subject.aud;
    let audience = facts.request.audience.as_ref().unwrap_or(held);
    if audience != held {
        // What was asked is not echoed: it may be anything.
        return Err(ExchangeRefusal::new(
            ErrorCode::InvalidTarget,
            reason::OTHER_AUDIENCE,
            format!(
                "the audience asked for is not the token's ({held:?}); an exchanged token keeps its audience, so ask for that one or leave audience and resource out"
            ),
        ));
    }
    if !new_actor.agent.spec.allowed_audiences.contains(audience) {
        return Err(ExchangeRefusal::new(
            ErrorCode::InvalidTarget,
            reason::OTHER_AUDIENCE,
            format!(
                "audience {audience:?} is not in AgentIdentity {:?} allowedAudiences",
                new_actor.name
            ),
        ));
    }
    Ok(audience.clone())
}

/// Rule 9: the details narrow the token's (a token without any does not restrict), within the
/// budget of a token. Returns the new token's.
fn details_within<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
) -> Result<Option<Vec<AuthorizationDetail>>, ExchangeRefusal> {
    let held = facts.subject.authorization_details.as_deref();
    let Some(asked) = &facts.request.authorization_details else {
        return Ok(held.map(<[_]>::to_vec));
    };
    let size = serde_json::to_string(asked).map_or(usize::MAX, |s| s.len());
    if size > MAX_DETAILS_BYTES {
        return Err(ExchangeRefusal::new(
            ErrorCode::InvalidAuthorizationDetails,
            reason::DETAILS_TOO_LARGE,
            format!(
                "authorization_details take {size} bytes in the token, more than the {MAX_DETAILS_BYTES} allowed; list fewer or shorter entries"
            ),
        ));
    }
    if let Some(held) = held.filter(|h| !h.is_empty()) {
        let wider = |what: String| {
            ExchangeRefusal::new(
                ErrorCode::InvalidAuthorizationDetails,
                reason::WIDER_DETAILS,
                format!(
                    "{what}; ask for narrower details, as for hops, or leave authorization_details out to keep the token's"
                ),
            )
        };
        match uncovered_detail(asked, held) {
            None => {}
            Some(Uncovered::NoneListed) => {
                return Err(wider(
                    "no authorization_details were asked for, so the token would carry no fine-grained limit, while the token being exchanged is limited by them".into(),
                ));
            }
            Some(Uncovered::Detail(d)) => {
                return Err(wider(format!(
                    "authorization detail {} is not within the token's",
                    describe_detail(d)
                )));
            }
        }
    }
    Ok((!asked.is_empty()).then(|| asked.clone()))
}

/// Rule 10: the AudiencePolicies of the audience allow the new token as they would a grant.
fn policies_allow<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    new_actor: &NewActor,
    audience: &str,
    scopes: &[String],
    details: &Option<Vec<AuthorizationDetail>>,
    created: Option<Timestamp>,
) -> Result<Ceiling, ExchangeRefusal> {
    let namespace = &facts.subject.grant.namespace;
    let question = CeilingQuestion {
        audience,
        namespace,
        scopes,
        details: details.as_deref(),
        // No lifetime asked here: rule 11 keeps within the policy's maxTokenTTL.
        ttl: None,
        created,
    };
    let policies = facts.directory.audience_policies(audience);
    let ceiling = ceiling_for(&question, &policies, facts.now).map_err(|refusal| {
        match refusal.reason {
            // Its message would name the policies of other namespaces.
            Reason::DeniedAudienceUndeclared => ExchangeRefusal::new(
                ErrorCode::InvalidTarget,
                reason::AUDIENCE_UNDECLARED,
                format!(
                    "no AudiencePolicy declares audience {audience:?} for namespace {namespace:?}, and tokens are issued only for declared audiences; the cluster's administrators must declare it"
                ),
            ),
            Reason::DeniedGrantLifetimeEnded => ExchangeRefusal::new(
                ErrorCode::InvalidGrant,
                reason::GRANT_LIFETIME_ENDED,
                refusal.message,
            ),
            _ => ExchangeRefusal::new(
                ErrorCode::InvalidScope,
                reason::BEYOND_POLICY,
                format!(
                    "the token asked for is beyond its audience's AudiencePolicies: {}",
                    refusal.message
                ),
            ),
        }
    })?;
    if new_actor.hop && ceiling.approval_required {
        return Err(ExchangeRefusal::new(
            ErrorCode::UnauthorizedClient,
            reason::APPROVAL_REQUIRED,
            format!(
                "AudiencePolicy {:?} requires a person's approval for scopes {scopes:?}, which a token exchange cannot wait for; create a DelegationGrant for this hop (actorRef {:?}, below the token's grant) and have it approved instead",
                ceiling.policy, new_actor.name
            ),
        ));
    }
    Ok(ceiling)
}

/// Rule 11: how many seconds the new token lives. Never past the subject, so exchanging an
/// exchanged token never extends its life.
fn lifetime<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    new_actor: &NewActor,
    ceiling: &Ceiling,
) -> Result<i64, ExchangeRefusal> {
    fn seconds(d: Duration) -> i64 {
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
    }
    if facts.request.expires_in == Some(0) {
        return Err(ExchangeRefusal::new(
            ErrorCode::InvalidRequest,
            reason::ZERO_LIFETIME,
            "expires_in is 0; ask for at least one second, or leave it out for the longest allowed",
        ));
    }
    let agent_max = new_actor.agent.spec.max_token_ttl.parse().map_err(|e| {
        ExchangeRefusal::new(
            ErrorCode::UnauthorizedClient,
            reason::AGENT_INVALID,
            format!("AgentIdentity {:?} maxTokenTTL: {e}", new_actor.name),
        )
    })?;
    let now = facts.now.as_second();
    let longest = [
        Some(facts.subject.exp.saturating_sub(now)),
        Some(seconds(facts.limits.max_ttl)),
        Some(seconds(agent_max)),
        ceiling.max_token_ttl.map(seconds),
        ceiling
            .ends_at
            .map(|end| end.as_second().saturating_sub(now)),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(0);
    if longest < 1 {
        return Err(ExchangeRefusal::new(
            ErrorCode::InvalidGrant,
            reason::SUBJECT_EXPIRING,
            "the token expires (or its grant's lifetime ends) within the second; ask for a token of the grant again",
        ));
    }
    match facts.request.expires_in {
        None => Ok(longest),
        Some(asked) if asked <= longest.unsigned_abs() => {
            Ok(i64::try_from(asked).unwrap_or(longest))
        }
        Some(asked) => Err(ExchangeRefusal::new(
            ErrorCode::InvalidRequest,
            reason::TOO_LONG,
            format!(
                "expires_in {asked} is longer than the {longest} seconds this exchange allows (the least of the token's remaining life, the operator's limit on exchanged tokens, AgentIdentity {:?} maxTokenTTL and its AudiencePolicy's limits); ask for at most {longest}, or leave expires_in out",
                new_actor.name
            ),
        )),
    }
}

/// The new token: the subject's, narrowed, with one more hop recorded.
fn claims<D: Directory>(
    facts: &ExchangeFacts<'_, D>,
    new_actor: &NewActor,
    audience: String,
    scopes: Vec<String>,
    authorization_details: Option<Vec<AuthorizationDetail>>,
    (status, lineage): (TokenStatusRef, LineageEntries),
    lifetime: i64,
) -> AccessTokenClaims {
    let subject = facts.subject;
    let namespace = &subject.grant.namespace;
    let new_sub = agent_subject(namespace, &new_actor.name);
    let act = if new_actor.hop {
        Actor {
            sub: new_sub.clone(),
            act: Some(Box::new(subject.act.clone())),
        }
    } else {
        subject.act.clone()
    };
    let caller = facts.caller;
    let service_account = format!(
        "system:serviceaccount:{}:{}",
        caller.namespace, caller.service_account
    );
    let scope = scopes.join(" ");
    let mut delegation_chain = subject.delegation_chain.clone();
    delegation_chain.push(DelegationRecord {
        delegator: Party {
            kind: "AgentIdentity".into(),
            sub: subject.act.sub.clone(),
        },
        delegate: new_sub.clone(),
        grant: subject.grant.name.clone(),
        scope: scope.clone(),
        requested_by: Some(service_account.clone()),
        approved_by: None,
        workload: Some(Workload {
            service_account,
            pod: caller.pod_name.clone(),
            pod_uid: caller.pod_uid.clone(),
        }),
    });
    let now = facts.now.as_second();
    AccessTokenClaims {
        iss: subject.iss.clone(),
        sub: subject.sub.clone(),
        aud: audience,
        client_id: new_sub,
        scope,
        iat: now,
        nbf: now,
        exp: now.saturating_add(lifetime),
        jti: facts.jti.clone(),
        act,
        authorization_details,
        delegation_chain,
        grant: subject.grant.clone(),
        status: Some(status.status_claim()),
        lineage: Some(lineage),
        cnf: None,
        delivery: None,
    }
}

#[cfg(test)]
#[path = "exchange_tests.rs"]
mod tests;

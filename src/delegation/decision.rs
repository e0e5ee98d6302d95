//! The one decision about a grant's token: from everything its reconcile has read, what to do now —
//! refuse (and revoke), keep (and when to look again), or issue (and why). No I/O, no clock: the
//! shell (`operator::grants`) gathers the [`Facts`], calls [`decide`], and carries the [`Verdict`] out.
//!
//! The rules, in the order they apply:
//! 1. A grant whose chain does not resolve, or that is beyond its namespace's grant limit
//!    ([`super::limits`]), is refused with that reason (a parent that is only being updated makes it
//!    wait instead).
//! 2. A grant whose authority the apiserver did not confirm is refused with that reason.
//! 3. A Secret of the grant's name that is not ours is never taken over: refused (`SecretConflict`).
//! 4. Otherwise the current token is kept while it still says exactly what the grant allows now (same
//!    chain, scopes, audience, details and Secret in the status, and the same substance in the
//!    operator's own record of what it minted), its Secret is intact, its key is still published, it
//!    does not outlive a tightened limit and its renewal time has not come; else a token is issued,
//!    with the cause.
//! 5. A token is issued only on evidence the apiserver gave at this very moment (continuous
//!    evaluation): on older evidence the verdict is [`Verdict::Confirm`] — ask again, decide again.
//!
//! Every refusal revokes every token of the grant; an issuance revokes every token but the current
//! one, and the current one too when it no longer says the right thing or its Secret was deleted
//! ([`Revoke`]).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{
    Reason, Refusal, Resolution,
    authority::{Evidence, Unauthorized},
    chain::add,
    claims::{GrantReference, build_claims, claims_digest, substance},
    conditions::ready_condition,
    timing::{IssueCause, SecretState, TokenStep, TokenTimes, next_step},
};
use crate::api::{ApprovalStatus, DelegationGrant};

/// How soon a grant waiting for its parent's update looks again if nothing wakes it first.
pub const PARENT_UPDATING_RECHECK: Duration = Duration::from_secs(2);
/// How often a grant refused for a foreign Secret looks again (a foreign Secret sends no events).
pub const SECRET_CONFLICT_RECHECK: Duration = Duration::from_secs(60);
/// The earliest a kept token is looked at again.
pub const MIN_RECHECK: Duration = Duration::from_secs(1);

/// Who holds the Secret a grant's token goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretHolder {
    /// A Secret of that name exists and was not created by the operator for this grant.
    Foreign,
    /// The Secret is ours, or absent: what it holds.
    Ours(SecretState),
}

/// Everything a grant's reconcile has read, as the decision needs it.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The grant as the cache shows it (its spec, and its status: the current token's times and key).
    pub grant: &'a DelegationGrant,
    /// The operator's issuer (`iss`), part of what a token says.
    pub issuer: &'a str,
    /// The grant's chain, resolved against its namespace.
    pub resolved: &'a Result<Resolution, Refusal>,
    /// The apiserver's answer on the grant's authority; `None` when not asked (a chain that does not
    /// resolve is refused without asking).
    pub authority: Option<&'a Result<Evidence, Unauthorized>>,
    /// Who holds the grant's Secret and what it holds (with Pod delivery: the sealed token in its
    /// status, never foreign); `None` when not looked at (a refused grant).
    pub secret: Option<SecretHolder>,
    /// The substance ([`substance`]) of the token the operator itself minted (or read back and
    /// verified) for this grant uid; `None` when it remembers none. The status is not trusted for it.
    pub minted: Option<u64>,
    /// Whether the key that signed the status's current token is still published (true without one).
    pub key_published: bool,
    /// When the remembered authority check must be repeated, if one is remembered.
    pub authority_due: Option<Timestamp>,
    /// How often a grant refused as not authorised looks again (RBAC changes send no events).
    pub authority_recheck: Duration,
    pub now: Timestamp,
}

/// Which of the grant's tokens a verdict revokes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoke {
    /// Every token of the grant that may still be valid.
    Every,
    /// Every token but the current one, which stays valid as `previousToken` until it expires.
    AllButCurrent,
}

/// A grant that may not hold a token.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub refusal: Refusal,
    /// The approval state to show, when the refusal is about approval.
    pub approval: Option<ApprovalStatus>,
    /// Always [`Revoke::Every`]: a refused grant holds no valid token.
    pub revoke: Revoke,
    /// When to look again without an event; `None`: only a change of the grant, its agent or its
    /// parent brings the next look.
    pub look_again: Option<Duration>,
}

/// The current token stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    /// When to look again: its renewal (or expiry), or the authority re-check, whichever is first.
    pub look_again: Duration,
    /// The spec changed in ways the token survives: bring `observedGeneration` up to date.
    pub acknowledge_generation: bool,
}

/// A new token is to be minted.
#[derive(Clone, Debug, PartialEq)]
pub struct Issue {
    pub cause: IssueCause,
    /// What to mint: the resolved chain, its last link approved by the evidence's approver.
    pub resolution: Resolution,
    /// The evidence it rests on (written to the status).
    pub evidence: Evidence,
    /// What the new token makes of the old ones.
    pub revoke: Revoke,
    /// Whether this is the grant's first token (`Issued`) rather than a replacement (`Rotated`).
    pub first: bool,
}

/// What to do with a grant's token now.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Nothing yet: the grant's parent is being updated and its reconcile will wake this one; look
    /// again after the duration if nothing does.
    Wait(Duration),
    Refuse(Refused),
    Keep(Keep),
    /// A token is due but the evidence is older than now: ask the apiserver again and decide again
    /// (only then is it issued, or refused).
    Confirm(IssueCause),
    Issue(Box<Issue>),
}

/// Decides what to do with the grant's token (see the module's rules).
pub fn decide(facts: &Facts<'_>) -> Verdict {
    let resolution = match facts.resolved {
        Err(refusal) if refusal.reason == Reason::ParentUpdating => {
            return Verdict::Wait(PARENT_UPDATING_RECHECK);
        }
        Err(refusal) => return refuse(refusal.clone(), None, None),
        Ok(resolution) => resolution,
    };
    let evidence = match facts.authority {
        // Not asked: nothing proves the grant may hold a token (fail closed).
        None => {
            return refuse(
                Refusal::new(
                    Reason::DeniedNotAuthorized,
                    "the grant's authority has not been checked yet",
                ),
                None,
                Some(facts.authority_recheck),
            );
        }
        Some(Err(unauthorized)) => {
            let look_again = (unauthorized.refusal.reason == Reason::DeniedNotAuthorized)
                .then_some(facts.authority_recheck);
            return refuse(
                unauthorized.refusal.clone(),
                unauthorized.approval.clone(),
                look_again,
            );
        }
        Some(Ok(evidence)) => evidence,
    };
    // What a token would say now: the chain as resolved, its last hop approved by the evidence's
    // approver. The current token is compared with exactly this, and a new one minted from it.
    let resolution = &approved(resolution, evidence);
    let secret = match facts.secret {
        Some(SecretHolder::Foreign) => {
            let secret_name = facts.grant.spec.secret_name_or_default(&grant_name(facts));
            return Verdict::Refuse(secret_conflict(&secret_name));
        }
        Some(SecretHolder::Ours(state)) => state,
        // Not looked at: as good as missing (a token is written anew, never assumed present).
        None => SecretState::Missing,
    };
    let status = facts.grant.status.clone().unwrap_or_default();
    let current = status
        .token
        .as_ref()
        .map(|t| (t.expires_at.0, t.renewal_time.0));
    let unchanged =
        status_describes(facts, resolution) && token_grants_what_is_allowed(facts, resolution);
    let step = match next_step(
        current,
        unchanged,
        secret,
        Some(limit(resolution, facts.now)),
        facts.now,
    ) {
        // A token whose key was revoked no longer verifies: replace it at once.
        TokenStep::Keep { .. } if current.is_some() && !facts.key_published => {
            TokenStep::Issue(IssueCause::KeyRevoked)
        }
        step => step,
    };
    match step {
        TokenStep::Keep { recheck_at } => {
            let look_at = facts
                .authority_due
                .map_or(recheck_at, |due| due.min(recheck_at));
            Verdict::Keep(Keep {
                look_again: super::timing::until(facts.now, look_at).max(MIN_RECHECK),
                acknowledge_generation: acknowledges_generation(facts.grant),
            })
        }
        TokenStep::Issue(cause) if evidence.checked_at != facts.now => Verdict::Confirm(cause),
        TokenStep::Issue(cause) => Verdict::Issue(Box::new(Issue {
            cause,
            resolution: resolution.clone(),
            evidence: evidence.clone(),
            revoke: if supersedes_current(cause) {
                Revoke::Every
            } else {
                Revoke::AllButCurrent
            },
            first: matches!(cause, IssueCause::First | IssueCause::SecretMissing)
                && status.token.is_none(),
        })),
    }
}

/// The resolution with its last hop approved by the evidence's approver (if any).
fn approved(resolution: &Resolution, evidence: &Evidence) -> Resolution {
    let mut resolution = resolution.clone();
    if let Some(actor) = resolution.chain.last_mut() {
        actor.approved_by = evidence.approval.as_ref().and_then(|a| a.approver.clone());
    }
    resolution
}

fn refuse(
    refusal: Refusal,
    approval: Option<ApprovalStatus>,
    look_again: Option<Duration>,
) -> Verdict {
    Verdict::Refuse(Refused {
        refusal,
        approval,
        revoke: Revoke::Every,
        look_again,
    })
}

/// The refusal of a grant whose Secret name is held by a Secret that is not ours.
pub fn secret_conflict(secret_name: &str) -> Refused {
    Refused {
        refusal: Refusal::new(
            Reason::SecretConflict,
            format!(
                "Secret {secret_name:?} already exists and was not created by delegation-operator \
                 for this grant; delete it or set spec.secretName to a free name"
            ),
        ),
        approval: None,
        revoke: Revoke::Every,
        look_again: Some(SECRET_CONFLICT_RECHECK),
    }
}

fn grant_name(facts: &Facts<'_>) -> String {
    facts.grant.metadata.name.clone().unwrap_or_default()
}

/// No token may outlive the grant's limits as they are now: `validUntil`, the parent token's
/// expiry, and a `tokenTTL` from now (a shortened TTL counts too).
fn limit(resolution: &Resolution, now: Timestamp) -> Timestamp {
    let ttl_limit = add(now, resolution.token_ttl);
    resolution.not_after.map_or(ttl_limit, |l| l.min(ttl_limit))
}

/// Whether the current token must be revoked rather than kept as `previousToken`: it no longer says
/// the right thing (changed grant, tightened limit, tampered Secret, revoked key), or someone deleted
/// its Secret — which says the token leaked, so it must not stay valid until it expires.
pub fn supersedes_current(cause: IssueCause) -> bool {
    matches!(
        cause,
        IssueCause::GrantChanged
            | IssueCause::OutlivesLimit
            | IssueCause::SecretMissing
            | IssueCause::SecretChanged
            | IssueCause::KeyRevoked
    )
}

/// Whether the status (Ready, with its chain, scopes, Secret and claims digest) was written for what
/// the grant resolves to now: a grant switched between Secret and Pod delivery gets a new token. Timing fields are not compared: a shorter TTL or an earlier validUntil
/// is caught as a tightened limit, a longer one needs no new token.
fn status_describes(facts: &Facts<'_>, resolution: &Resolution) -> bool {
    let Some(status) = facts.grant.status.as_ref() else {
        return false;
    };
    // Secret delivery names its Secret; Pod delivery has none (its token is sealed in the status).
    let secret_name = (!resolution.delivery.is_pod())
        .then(|| facts.grant.spec.secret_name_or_default(&grant_name(facts)));
    let ready = ready_condition(status.conditions.as_deref()).is_some_and(|c| c.status == "True");
    let digest = status
        .token
        .as_ref()
        .and_then(|t| t.claims_digest.as_deref());
    ready
        && status.chain.as_ref() == Some(&resolution.chain)
        && status.effective_scopes.as_ref() == Some(&resolution.effective_scopes)
        && status.secret_name == secret_name
        && digest == Some(claims_digest(&facts.grant.spec).as_str())
}

/// Whether the token the operator minted for this grant (the substance it remembers) grants exactly
/// what the grant allows now. Nothing remembered counts as no: whoever may write the status could
/// make an old, broader token look current.
fn token_grants_what_is_allowed(facts: &Facts<'_>, resolution: &Resolution) -> bool {
    let Some(uid) = facts.grant.metadata.uid.clone() else {
        return false;
    };
    facts.minted.is_some() && facts.minted == expected_substance(facts, resolution, uid)
}

/// The substance of a token minted now for the grant, as resolved.
pub fn expected_substance(facts: &Facts<'_>, resolution: &Resolution, uid: String) -> Option<u64> {
    let now = facts.now;
    let times = TokenTimes {
        issued_at: now,
        expires_at: now,
        renewal_at: now,
    };
    let grant_ref = GrantReference {
        namespace: facts.grant.metadata.namespace.clone().unwrap_or_default(),
        name: grant_name(facts),
        uid,
    };
    let details = facts.grant.spec.authorization_details.clone();
    build_claims(
        facts.issuer,
        resolution,
        grant_ref,
        details,
        &times,
        String::new(),
    )
    .map(|claims| substance(&claims))
}

/// Whether a kept token's status must only catch up with a new generation.
fn acknowledges_generation(grant: &DelegationGrant) -> bool {
    grant.status.as_ref().is_some_and(|status| {
        status.observed_generation != grant.metadata.generation
            && ready_condition(status.conditions.as_deref()).is_some()
    })
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;

//! The DelegationGrant controller: gathers what a grant's reconcile reads, asks the one pure decision
//! ([`crate::delegation::decision::decide`]) what to do (once more after a fresh authority check when
//! it asks for one), and carries the verdict out — issue, rotate,
//! revoke, and write the chain back. Called by the controller runtime (`operator::run`).
//!
//! - this module: [`reconcile`] routes by the finalizer to [`apply`] (make the token match the
//!   grant) or [`revoke::cleanup`] (the grant is being deleted); [`apply`] is gather → decide → act.
//! - [`facts`]: what the decision reads that needs the apiserver (the Secret's state).
//! - [`ahead`]: a new grant's first token planned while its finalizer is added.
//! - [`issue`]: mint, write the Secret, record the status. [`revoke`]: revoke and delete.
//! - [`status`]: status writes, and what is said (Events, the audit line) about a grant.
//! - [`token_secret`]: the token Secrets and who owns them; [`authority`]: SubjectAccessReviews;
//!   [`renewals`]: renewals' share of the slots; [`alarms`]: when to look again; [`orphans`]: the
//!   sweep of token Secrets whose grant is gone; [`runner`]: the loop that runs reconciles, fairly
//!   between namespaces.

pub mod ahead;
pub mod alarms;
pub mod authority;
pub mod facts;
pub mod issue;
pub mod orphans;
pub mod renewals;
pub mod revoke;
pub mod runner;
pub mod status;
pub mod token_secret;

use std::{sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};

use self::{
    ahead::{Planned, add_finalizer_and_ask, ask_ahead, withdraw_unused},
    facts::token_holder,
    issue::issue,
    revoke::{cleanup, refuse},
    status::acknowledge_generation,
};
use crate::operator::{
    FINALIZER,
    caches::context::Context,
    error::{Error, Result},
    now,
};
use crate::{
    api::DelegationGrant,
    delegation::{
        Reason, Refusal, Resolution,
        authority::{Evidence, Unauthorized},
        conditions::ready_condition,
        decision::{Facts, Refused, Revoke, SecretHolder, Verdict, decide, expected_substance},
        resolve,
        timing::{IssueCause, SecretState, renewal_backstop, renewal_may_wait},
    },
    status_list::budget::OverBudget,
};

pub async fn reconcile(grant: Arc<DelegationGrant>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.caches_ready().await {
        return Err(Error::InvalidState("caches stopped".into()));
    }
    if ctx.is_stale(&grant) {
        // Our own status write is on its way through the watch; it will trigger us again.
        return Ok(ctx.look_again(&grant, Duration::from_secs(2)));
    }
    let namespace = grant
        .namespace()
        .ok_or_else(|| Error::InvalidState("grant without namespace".into()))?;
    let api: Api<DelegationGrant> = Api::namespaced(ctx.client.clone(), &namespace);
    let now = now();
    let ours = grant.finalizers().iter().any(|f| f == FINALIZER);
    match (grant.metadata.deletion_timestamp.is_some(), ours) {
        // Being deleted: revoke, then let the finalizer go.
        (true, true) => cleanup(&api, &grant, &ctx, now).await,
        // Being deleted, and nothing of ours holds it.
        (true, false) => Ok(Action::await_change()),
        // New, with the finalizer the admission policy put on it: ask ahead, as below.
        (false, true) if grant.status.is_none() => {
            let mut planned = ask_ahead(&grant, &ctx, now).await;
            let done = apply(&grant, &ctx, now, &mut planned).await;
            withdraw_unused(&grant, &ctx, planned).await;
            done
        }
        (false, true) => apply(&grant, &ctx, now, &mut None).await,
        // New, created without the admission policy: the finalizer first (before any token exists,
        // so that a deletion always revokes).
        (false, false) => {
            let (grant, mut planned) = add_finalizer_and_ask(&api, grant, &ctx, now).await?;
            let done = apply(&grant, &ctx, now, &mut planned).await;
            withdraw_unused(&grant, &ctx, planned).await;
            done
        }
    }
}

/// When to look at a grant again after its reconcile failed (`None`: not until it changes).
pub fn retry_after(grant: &DelegationGrant, error: &Error) -> Option<Duration> {
    if is_finalizer_of_a_deleted_grant(error) {
        // The grant is gone: its tokens were revoked before the finalizer was let go.
        tracing::debug!(grant = %grant.name_any(), "grant already deleted");
        return None;
    }
    if is_stale_status_write(error) {
        // Decided from a version the grant has left behind: decide again from the newer one.
        tracing::debug!(grant = %grant.name_any(), "the grant changed while its status was written; retrying");
        return Some(Duration::from_secs(1));
    }
    if is_stale_finalizer_write(error) {
        // Raced with our own finalizer write, seen through a cache that had not caught up: look again soon.
        tracing::debug!(grant = %grant.name_any(), "finalizer write raced with the cache; retrying");
        return Some(Duration::from_secs(1));
    }
    tracing::warn!(grant = %grant.name_any(), namespace = grant.namespace().unwrap_or_default(), error = %error, kind = error.metric_label(), "reconcile failed; retrying");
    Some(Duration::from_secs(5))
}

/// Removing the finalizer of a grant that is already gone (a normal race of concurrent deletes): 404.
fn is_finalizer_of_a_deleted_grant(error: &Error) -> bool {
    use kube::runtime::finalizer::Error as F;
    matches!(error, Error::Finalizer(inner)
        if matches!(inner.as_ref(), F::RemoveFinalizer(kube::Error::Api(s)) if s.code == 404))
}

/// A status write whose resourceVersion precondition failed (see [`write_status`]).
fn is_stale_status_write(error: &Error) -> bool {
    matches!(error, Error::StaleStatus)
}

/// The finalizer helper writes with a JSON-patch `test` against the cached finalizer list; a stale
/// cache makes that test fail (422) or conflict (409).
fn is_stale_finalizer_write(error: &Error) -> bool {
    use kube::runtime::finalizer::Error as F;
    match error {
        Error::Finalizer(inner) => match inner.as_ref() {
            F::AddFinalizer(kube::Error::Api(s)) | F::RemoveFinalizer(kube::Error::Api(s)) => {
                s.code == 409 || s.code == 422
            }
            _ => false,
        },
        _ => false,
    }
}

/// Brings the grant's token in line with what the grant allows now: gathers the facts, asks the
/// decision, and carries it out. A token due on evidence older than now is confirmed with the
/// apiserver first (continuous evaluation), and the decision asked again with the fresh answer.
async fn apply(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
    planned: &mut Option<Planned>,
) -> Result<Action> {
    let namespace = grant.namespace().unwrap_or_default();
    // Beyond a grant limit a grant is refused before anything is resolved or asked.
    let resolved = ctx.grant_limits(grant).and_then(|()| {
        resolve(
            grant,
            &namespace,
            &ctx.namespace_view(&namespace),
            &ctx.settings.policy,
            now,
        )
    });
    if let Ok(resolution) = &resolved {
        vouch_by_current_token(grant, ctx, &resolved, resolution, now).await?;
    }
    let mut authority = match &resolved {
        Ok(_) => Some(authority::evaluate(grant, ctx, now, false).await?),
        Err(_) => None,
    };
    let secret = match (&resolved, &authority) {
        (Ok(resolution), Some(Ok(_))) => Some(token_holder(grant, ctx, resolution.delivery).await?),
        _ => None,
    };
    let mut verdict = decide(&facts(
        grant,
        ctx,
        &resolved,
        authority.as_ref(),
        secret,
        now,
    ));
    // A renewal yields to revocations: it takes one of a few slots (an urgent one, with under 30 s
    // left, a few more), or waits in line to be woken (the alarm is a backstop).
    let _slot = if renewal_due(&verdict) {
        match take_renewal_slot(grant, ctx, now) {
            Some(slot) => Some(slot),
            None => return Ok(ctx.look_again(grant, renewal_backstop(current(grant), now))),
        }
    } else {
        None
    };
    if let Verdict::Confirm(_) = verdict {
        authority = Some(authority::evaluate(grant, ctx, now, true).await?);
        verdict = decide(&facts(
            grant,
            ctx,
            &resolved,
            authority.as_ref(),
            secret,
            now,
        ));
    }
    match verdict {
        Verdict::Wait(after) => Ok(ctx.look_again(grant, after)),
        Verdict::Refuse(refused) => {
            // Given back first: a refusal would otherwise revoke, and report, the planned entry.
            withdraw_unused(grant, ctx, planned.take()).await;
            refuse(grant, ctx, &refused, now).await
        }
        Verdict::Keep(keep) => {
            // Before the status says so: a hop below reads this record, not the status.
            ctx.confirm_token(grant);
            if keep.acknowledge_generation {
                acknowledge_generation(grant, ctx, now).await?;
            }
            Ok(ctx.look_again(grant, keep.look_again))
        }
        // Not reached: a confirmed verdict rests on evidence taken now. Fail closed: look again.
        Verdict::Confirm(_) => Ok(ctx.look_again(grant, Duration::from_secs(1))),
        Verdict::Issue(issuance) => {
            // The plan is taken only when it fits; otherwise it is given back first (the issuance
            // would otherwise revoke, and report, it as one of the grant's tokens).
            let fits = planned
                .as_ref()
                .is_some_and(|p| p.limits == ahead::limits_of(&issuance.resolution));
            if !fits {
                withdraw_unused(grant, ctx, planned.take()).await;
            }
            match issue(grant, ctx, &issuance, planned.take(), now).await {
                Err(Error::OverStatusListBudget(over)) => {
                    refuse(grant, ctx, &over_budget(&over, now), now).await
                }
                Err(full @ Error::StatusListsFull(_)) => {
                    refuse(grant, ctx, &lists_full(&full), now).await
                }
                done => done,
            }
        }
    }
}

/// How often a grant waiting for a free status-list entry under the safety limit looks again.
const LISTS_FULL_RETRY: Duration = Duration::from_secs(30);

/// The refusal of a grant when every status list the safety limit allows is in use: said on the
/// grant (no token can be issued without an entry: fail closed), and tried again every
/// [`LISTS_FULL_RETRY`] until lists retire.
fn lists_full(full: &Error) -> Refused {
    Refused {
        refusal: Refusal::new(Reason::StatusListsFull, full.to_string()),
        approval: None,
        revoke: Revoke::Every,
        look_again: Some(LISTS_FULL_RETRY),
    }
}

/// The refusal of a grant whose namespace is at its status-list budget: like any refusal it holds
/// no token, and it is looked at again when the namespace's oldest entries free up.
fn over_budget(over: &OverBudget, now: Timestamp) -> Refused {
    let frees_in = over
        .frees_at
        .map(|at| Duration::from_secs(u64::try_from(at - now.as_second()).unwrap_or(0)));
    Refused {
        refusal: Refusal::new(Reason::DeniedStatusListBudget, over.message()),
        approval: None,
        revoke: Revoke::Every,
        look_again: Some(
            frees_in
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1)),
        ),
    }
}

/// After a restart the operator remembers no proven stamps. A grant whose current token it minted
/// (signature verified, see [`facts::secret_state`]) for exactly what the grant says now was proven
/// when that token was minted: its stamp counts as proven, so that a restart revokes nothing. Only for
/// a grant the operator has not judged yet: one it has judged is followed by its own record.
async fn vouch_by_current_token(
    grant: &DelegationGrant,
    ctx: &Context,
    resolved: &std::result::Result<Resolution, Refusal>,
    resolution: &Resolution,
    now: Timestamp,
) -> Result<()> {
    let has_token = grant.status.as_ref().is_some_and(|s| s.token.is_some());
    let Some(uid) = grant.uid() else {
        return Ok(());
    };
    if !has_token || ctx.stamps.remembers(grant) {
        return Ok(());
    }
    let holder = token_holder(grant, ctx, resolution.delivery).await?;
    let facts = facts(grant, ctx, resolved, None, Some(holder), now);
    let current = holder == SecretHolder::Ours(SecretState::Intact)
        && facts.minted.is_some()
        && facts.minted == expected_substance(&facts, resolution, uid);
    if current {
        ctx.stamps.remember_proven(grant, now);
    }
    Ok(())
}

/// The facts of the decision, from what the reconcile gathered and what the caches remember.
fn facts<'a>(
    grant: &'a DelegationGrant,
    ctx: &'a Context,
    resolved: &'a std::result::Result<Resolution, Refusal>,
    authority: Option<&'a std::result::Result<Evidence, Unauthorized>>,
    secret: Option<SecretHolder>,
    now: Timestamp,
) -> Facts<'a> {
    let token = grant.status.as_ref().and_then(|s| s.token.as_ref());
    Facts {
        grant,
        issuer: &ctx.settings.issuer,
        resolved,
        authority,
        secret,
        minted: grant.uid().and_then(|uid| ctx.minted_substance(&uid)),
        key_published: token.is_none_or(|t| ctx.keys.is_published(&t.key_id)),
        authority_due: ctx
            .authority
            .due_at(grant, ctx.settings.authority_recheck_period),
        authority_recheck: ctx.settings.authority_recheck_period,
        now,
    }
}

/// Whether the verdict is a renewal, which must take a slot first.
fn renewal_due(verdict: &Verdict) -> bool {
    match verdict {
        Verdict::Confirm(cause) => *cause == IssueCause::Renewal,
        Verdict::Issue(issuance) => issuance.cause == IssueCause::Renewal,
        _ => false,
    }
}

/// A renewal slot, held until the reconcile ends, or `None` when the renewal waits in line.
fn take_renewal_slot<'a>(
    grant: &DelegationGrant,
    ctx: &'a Context,
    now: Timestamp,
) -> Option<renewals::Slot<'a>> {
    let urgent = !renewal_may_wait(current(grant), now);
    let namespace = grant.namespace().unwrap_or_default();
    ctx.renewals
        .take_or_queue(ObjectRef::new(&grant.name_any()).within(&namespace), urgent)
}

/// The current token's `(expires_at, renewal_at)`, as the status describes it.
fn current(grant: &DelegationGrant) -> Option<(Timestamp, Timestamp)> {
    let token = grant.status.as_ref()?.token.as_ref()?;
    Some((token.expires_at.0, token.renewal_time.0))
}

/// The Secret names a grant may have written: the current one and the one its status recorded.
pub fn secret_names(grant: &DelegationGrant) -> Vec<String> {
    let mut names = vec![grant.spec.secret_name_or_default(&grant.name_any())];
    if let Some(recorded) = grant.status.as_ref().and_then(|s| s.secret_name.clone())
        && !names.contains(&recorded)
    {
        names.push(recorded);
    }
    names
}

/// A random fraction in [0, 1) for renewal jitter.
fn jitter() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

/// Whether a grant currently holds a valid token (its Ready condition is True).
pub fn is_ready(grant: &DelegationGrant) -> bool {
    grant
        .status
        .as_ref()
        .and_then(|s| ready_condition(s.conditions.as_deref()))
        .is_some_and(|c| c.status == "True")
}

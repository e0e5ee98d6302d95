//! The DelegationGrant controller: issue, rotate and revoke tokens, and write the chain back.
//!
//! `reconcile` is thin: the finalizer routes to [`apply`] (make the token match the grant) or
//! [`cleanup`] (the grant is being deleted: revoke). Every decision is made by the pure core in
//! `crate::delegation`; this module only reads caches and writes what changed.

pub mod alarms;
pub mod authority;
pub mod orphans;
pub mod renewals;
pub mod token_secret;

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{PartialObjectMeta, PostParams},
    runtime::{controller::Action, events::EventType, reflector::ObjectRef},
};

use crate::operator::{
    FIELD_MANAGER, FINALIZER,
    caches::context::Context,
    error::{Error, Result},
    grants::authority::Evidence,
    grants::token_secret::{Ownership, Written},
    now,
    reporting::audit::{self, AuditAction, AuditRecord},
};
use crate::{
    api::{ApprovalStatus, DelegationGrant, DelegationGrantStatus, PreviousToken, TokenStatus},
    delegation::{
        Lookup, Reason, Refusal, Resolution,
        chain::chain_as_written,
        claims::{AccessTokenClaims, GrantReference, build_claims, claims_digest, substance},
        conditions::{ready_condition, set_ready},
        resolve,
        timing::{
            IssueCause, SecretState, TokenStep, TokenTimes, next_step, plan_token,
            renewal_backstop, renewal_may_wait, until,
        },
    },
    signing,
    status_list::TokenStatusRef,
};

/// Condition reasons of a Ready grant, and of a grant whose tokens were revoked on deletion or conflict.
const ISSUED: &str = "Issued";
const ROTATED: &str = "Rotated";
const REVOKED: &str = "Revoked";
const SECRET_CONFLICT: &str = "SecretConflict";
/// The revocation reason of a deleted grant's tokens, in its Event and the audit trail alike.
const DELETED: &str = "Deleted";

pub async fn reconcile(grant: Arc<DelegationGrant>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.caches_ready().await {
        return Err(Error::InvalidState("caches stopped".into()));
    }
    if ctx.is_stale(&grant) {
        // Our own status write is on its way through the watch; it will trigger us again.
        return Ok(Action::requeue(Duration::from_secs(2)));
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

/// Adds the finalizer (before any token exists, so that a deletion always revokes) and, at the same
/// time, asks ahead (see [`ask_ahead`]). Returns the grant as the apiserver now holds it, so the
/// issuance goes on in this very reconcile rather than after another trip through the watch.
async fn add_finalizer_and_ask(
    api: &Api<DelegationGrant>,
    grant: Arc<DelegationGrant>,
    ctx: &Context,
    now: Timestamp,
) -> Result<(Arc<DelegationGrant>, Option<Planned>)> {
    use kube::{
        api::{Patch, PatchParams},
        runtime::finalizer::Error as F,
    };
    let mut finalizers = grant.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    // At the version we saw: a concurrent writer makes the patch conflict instead of losing a finalizer.
    let patch = serde_json::json!({
        "metadata": { "finalizers": finalizers, "resourceVersion": grant.resource_version() }
    });
    let name = grant.name_any();
    let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
    let (patched, planned) = futures::join!(
        api.patch(&name, &params, &patch),
        ask_ahead(&grant, ctx, now)
    );
    match patched {
        Ok(patched) => Ok((Arc::new(patched), planned)),
        Err(e) => {
            withdraw_unused(&grant, ctx, planned).await;
            Err(Error::Finalizer(Box::new(F::AddFinalizer(e))))
        }
    }
}

/// What the first issuance of a new grant needs from the apiserver, asked at once and side by side:
/// the grant's authority (a SubjectAccessReview the issuance would otherwise wait for) and the first
/// token's status-list entry, recorded ahead (see [`Planned`]). Either may fail: the issuance then
/// does it itself.
async fn ask_ahead(grant: &DelegationGrant, ctx: &Context, now: Timestamp) -> Option<Planned> {
    let name = grant.name_any();
    let (asked, planned) = futures::join!(
        authority::evaluate(grant, ctx, now, true),
        plan_first_token(grant, ctx, now)
    );
    if let Err(e) = asked {
        tracing::debug!(grant = %name, error = %e, "authority check ahead of issuance failed");
    }
    planned.unwrap_or_else(|e| {
        tracing::debug!(grant = %name, error = %e, "status-list entry ahead of issuance failed");
        None
    })
}

/// Gives back the status-list entry of a planned token the issuance did not mint. Before a refusal
/// too: it would otherwise revoke, and report, the entry as one of the grant's tokens.
async fn withdraw_unused(grant: &DelegationGrant, ctx: &Context, planned: Option<Planned>) {
    if let (Some(planned), Some(uid)) = (planned, grant.uid()) {
        ctx.status_lists.withdraw(&uid, &planned.jti).await;
    }
}

/// The first token of a new grant, planned while its finalizer is added: its id, times and
/// status-list entry, recorded (written and published) like any issuance's, only earlier, so the
/// issuance does not wait for that write after the finalizer's. Nothing is signed until the
/// finalizer is in place and the authority confirmed; the entry of a plan the issuance does not use
/// (a refusal, a Secret conflict) is given back (see `withdraw_unused`).
struct Planned {
    jti: String,
    times: TokenTimes,
    /// What the times were planned from: the issuance uses the plan only if its resolution agrees.
    limits: TokenLimits,
    status_ref: TokenStatusRef,
}

/// A token's time limits as resolved from the grant and its chain.
type TokenLimits = (Duration, Option<Duration>, Option<Timestamp>);

fn limits_of(resolution: &Resolution) -> TokenLimits {
    (
        resolution.token_ttl,
        resolution.renew_before,
        resolution.not_after,
    )
}

/// Plans and records the first token of a grant that resolves now (see [`Planned`]); `None` when it
/// does not (the issuance will refuse it or wait).
async fn plan_first_token(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> Result<Option<Planned>> {
    let namespace = grant.namespace().unwrap_or_default();
    let view = ctx.namespace_view(&namespace);
    let Ok(resolution) = resolve(grant, &namespace, &view, &ctx.settings.policy, now) else {
        return Ok(None);
    };
    let Some(uid) = grant.uid() else {
        return Ok(None);
    };
    let limits = limits_of(&resolution);
    let times = plan_token(now, limits.0, limits.1, limits.2, jitter());
    let jti = uuid::Uuid::new_v4().to_string();
    let allocated = ctx
        .status_lists
        .allocate(
            &ctx.keys,
            &uid,
            &jti,
            now.as_second(),
            times.expires_at.as_second(),
        )
        .await;
    let status_ref = match allocated {
        Ok(status_ref) => status_ref,
        Err(e) => {
            // Recorded in memory but not written: given back like any unused plan.
            ctx.status_lists.withdraw(&uid, &jti).await;
            return Err(e);
        }
    };
    Ok(Some(Planned {
        jti,
        times,
        limits,
        status_ref,
    }))
}

pub fn error_policy(grant: Arc<DelegationGrant>, error: &Error, _ctx: Arc<Context>) -> Action {
    if is_finalizer_of_a_deleted_grant(error) {
        // The grant is gone: its tokens were revoked before the finalizer was let go.
        tracing::debug!(grant = %grant.name_any(), "grant already deleted");
        return Action::await_change();
    }
    if is_stale_status_write(error) {
        // Decided from a version the grant has left behind: decide again from the newer one.
        tracing::debug!(grant = %grant.name_any(), "the grant changed while its status was written; retrying");
        return Action::requeue(Duration::from_secs(1));
    }
    if is_stale_finalizer_write(error) {
        // Raced with our own finalizer write, seen through a cache that had not caught up: look again soon.
        tracing::debug!(grant = %grant.name_any(), "finalizer write raced with the cache; retrying");
        return Action::requeue(Duration::from_secs(1));
    }
    tracing::warn!(grant = %grant.name_any(), namespace = grant.namespace().unwrap_or_default(), error = %error, kind = error.metric_label(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
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

/// Brings the grant's token in line with what the grant allows now.
async fn apply(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
    planned: &mut Option<Planned>,
) -> Result<Action> {
    let namespace = grant.namespace().unwrap_or_default();
    let resolved = resolve(
        grant,
        &namespace,
        &ctx.namespace_view(&namespace),
        &ctx.settings.policy,
        now,
    );
    match resolved {
        // The parent's own reconcile is on its way and will trigger this grant again.
        Err(refusal) if refusal.reason == Reason::ParentUpdating => {
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Err(refusal) => {
            withdraw_unused(grant, ctx, planned.take()).await;
            refuse(grant, ctx, &refusal, None, now).await
        }
        Ok(mut resolution) => match authority::evaluate(grant, ctx, now, false).await? {
            Err(unauthorized) => {
                withdraw_unused(grant, ctx, planned.take()).await;
                refuse(
                    grant,
                    ctx,
                    &unauthorized.refusal,
                    unauthorized.approval,
                    now,
                )
                .await?;
                Ok(match unauthorized.refusal.reason {
                    // RBAC changes send no events: look again now and then.
                    Reason::DeniedNotAuthorized => {
                        ctx.look_again(grant, ctx.settings.authority_recheck_period)
                    }
                    _ => Action::await_change(),
                })
            }
            Ok(evidence) => {
                if let Some(actor) = resolution.chain.last_mut() {
                    actor.approved_by = evidence.approval.as_ref().and_then(|a| a.approver.clone());
                }
                issue_or_keep(grant, ctx, &resolution, &evidence, now, planned).await
            }
        },
    }
}

/// The grant is being deleted: revoke its tokens, say so, and let the finalizer go. The finalizer
/// is released only once the tokens are INVALID in the written, published status list; the Secret is
/// deleted at the same time (if that fails, the orphan sweep takes it when the grant is gone).
async fn cleanup(
    api: &Api<DelegationGrant>,
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> Result<Action> {
    if ctx.released_recently(grant) {
        // Done already: the cache has not caught up with our finalizer removal yet.
        return Ok(Action::await_change());
    }
    let revoked = revoke_recorded(grant, ctx, now).await?;
    let message = "the grant was deleted; its tokens are revoked";
    // Said as soon as it is true: a process dying later must not leave a revocation unaudited.
    // (A retry after a failed write below says it again; a repeated line is better than none.)
    if !revoked.is_empty() {
        report_revocation(grant, ctx, &revoked, DELETED, message);
    }
    // Children watch this status: they lose their tokens before this grant disappears. Without
    // children nobody reads it again (the grant is about to go), and the write is saved.
    let namespace = grant.namespace().unwrap_or_default();
    if !ctx.index.children(&namespace, &grant.name_any()).is_empty() {
        write_status(
            grant,
            ctx,
            refused_status(grant, None, REVOKED, message, now),
        )
        .await?;
    }
    let (deleted, released) =
        futures::join!(delete_secrets(grant, ctx), remove_finalizer(api, grant));
    released?;
    ctx.remember_released(grant);
    ctx.forget_grant(grant);
    ctx.authority.forget_grant(grant);
    if let Err(e) = deleted {
        tracing::warn!(grant = %grant.name_any(), namespace, error = %e, "could not delete the token Secret of a deleted grant; its token is revoked, and the orphan sweep deletes it");
    }
    Ok(Action::await_change())
}

/// Takes our finalizer off the grant: a JSON patch that tests the entry it removes, so that a list
/// changed meanwhile makes it fail (422) rather than remove another controller's finalizer.
async fn remove_finalizer(api: &Api<DelegationGrant>, grant: &DelegationGrant) -> Result<()> {
    use kube::{
        api::{Patch, PatchParams},
        runtime::finalizer::Error as F,
    };
    let Some(index) = grant.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        { "op": "test", "path": path, "value": FINALIZER },
        { "op": "remove", "path": path },
    ]))?;
    api.patch::<DelegationGrant>(
        &grant.name_any(),
        &PatchParams::default(),
        &Patch::Json(patch),
    )
    .await
    .map_err(|e| Error::Finalizer(Box::new(F::RemoveFinalizer(e))))?;
    Ok(())
}

/// The grant may not hold a token: revoke whatever it holds and explain why.
async fn refuse(
    grant: &DelegationGrant,
    ctx: &Context,
    refusal: &Refusal,
    approval: Option<ApprovalStatus>,
    now: Timestamp,
) -> Result<Action> {
    let reason = refusal.reason.as_str();
    let revoked = revoke_tokens(grant, ctx, now).await?;
    if !revoked.is_empty() {
        report_revocation(grant, ctx, &revoked, reason, &refusal.message);
    }
    let changed = write_status(
        grant,
        ctx,
        refused_status(grant, approval, reason, &refusal.message, now),
    )
    .await?;
    if changed && refusal.reason.is_denial() {
        ctx.event(
            grant,
            EventType::Warning,
            "Denied",
            format!("{reason}: {}", refusal.message),
        );
        audit::record(&audit_record(
            grant,
            ctx,
            AuditAction::Denied,
            reason,
            &refusal.message,
            None,
            Vec::new(),
            None,
        ));
    } else if changed && revoked.is_empty() {
        ctx.event(grant, EventType::Normal, reason, refusal.message.clone());
    }
    // Nothing is due: a change to the grant, its agent or its parent triggers the next look.
    Ok(Action::await_change())
}

/// The grant is valid: keep its token, or mint a new one when it is due, missing or outdated.
async fn issue_or_keep(
    grant: &DelegationGrant,
    ctx: &Context,
    resolution: &Resolution,
    evidence: &Evidence,
    now: Timestamp,
    planned: &mut Option<Planned>,
) -> Result<Action> {
    let namespace = grant.namespace().unwrap_or_default();
    let name = grant.name_any();
    let secret_name = grant.spec.secret_name_or_default(&name);
    let cached = ctx.cached_secret(&namespace, &secret_name);
    if token_secret::ownership(cached.as_ref(), grant) == Ownership::Foreign {
        withdraw_unused(grant, ctx, planned.take()).await;
        return secret_conflict(grant, ctx, &secret_name, now).await;
    }
    let status = grant.status.clone().unwrap_or_default();
    let current = status
        .token
        .as_ref()
        .map(|t| (t.expires_at.0, t.renewal_time.0));
    let secret = secret_state(
        ctx,
        grant,
        &secret_name,
        cached.as_ref(),
        status.token.as_ref(),
    )
    .await?;
    let unchanged = describes(&status, grant, resolution, &secret_name)
        && token_grants_what_is_allowed(grant, ctx, resolution, now);
    // A token may not outlive the grant's limits as they are now: a shortened tokenTTL counts too.
    let ttl_limit = crate::delegation::chain::add(now, resolution.token_ttl);
    let limit = resolution.not_after.map_or(ttl_limit, |l| l.min(ttl_limit));
    let step = match next_step(current, unchanged, secret, Some(limit), now) {
        // A token whose key was revoked no longer verifies: replace it at once.
        TokenStep::Keep { .. }
            if status
                .token
                .as_ref()
                .is_some_and(|t| !ctx.keys.is_published(&t.key_id)) =>
        {
            TokenStep::Issue(IssueCause::KeyRevoked)
        }
        step => step,
    };
    match step {
        TokenStep::Keep { recheck_at } => {
            acknowledge_generation(grant, ctx, now).await?;
            let authority_due = ctx
                .authority
                .due_at(grant, ctx.settings.authority_recheck_period)
                .unwrap_or(recheck_at);
            Ok(ctx.look_again(
                grant,
                until(now, recheck_at.min(authority_due)).max(Duration::from_secs(1)),
            ))
        }
        TokenStep::Issue(cause) => {
            // A renewal yields to revocations: it takes one of a few slots (an urgent one, with
            // under 30 s left, a few more), or waits in line to be woken (the alarm is a backstop).
            let _slot = match cause {
                IssueCause::Renewal => {
                    let urgent = !renewal_may_wait(current, now);
                    match ctx
                        .renewals
                        .take_or_queue(ObjectRef::new(&grant.name_any()).within(&namespace), urgent)
                    {
                        Some(slot) => Some(slot),
                        None => return Ok(ctx.look_again(grant, renewal_backstop(current, now))),
                    }
                }
                _ => None,
            };
            // Every issuance and rotation asks the apiserver again (continuous evaluation).
            let evidence = if evidence.checked_at == now {
                evidence.clone()
            } else {
                match authority::evaluate(grant, ctx, now, true).await? {
                    Ok(evidence) => evidence,
                    Err(unauthorized) => {
                        withdraw_unused(grant, ctx, planned.take()).await;
                        return refuse(
                            grant,
                            ctx,
                            &unauthorized.refusal,
                            unauthorized.approval,
                            now,
                        )
                        .await;
                    }
                }
            };
            let mut resolution = resolution.clone();
            if let Some(actor) = resolution.chain.last_mut() {
                actor.approved_by = evidence.approval.as_ref().and_then(|a| a.approver.clone());
            }
            // The plan is taken only when it fits; otherwise it is given back after the reconcile.
            let planned = match planned {
                Some(p) if p.limits == limits_of(&resolution) => planned.take(),
                _ => None,
            };
            let issuance = Issuance {
                cause,
                planned,
                now,
            };
            issue(grant, ctx, &resolution, &evidence, &secret_name, issuance).await
        }
    }
}

/// Whether the current token still says what the grant says now: same chain (principal, actors,
/// scopes at every hop), same audience and details, same Secret. Timing fields are not compared: a
/// shorter TTL or an earlier validUntil is caught as a tightened limit, a longer one needs no new token.
fn describes(
    status: &DelegationGrantStatus,
    grant: &DelegationGrant,
    resolution: &Resolution,
    secret_name: &str,
) -> bool {
    let ready = ready_condition(status.conditions.as_deref()).is_some_and(|c| c.status == "True");
    let digest = status
        .token
        .as_ref()
        .and_then(|t| t.claims_digest.as_deref());
    ready
        && status.chain.as_ref() == Some(&resolution.chain)
        && status.effective_scopes.as_ref() == Some(&resolution.effective_scopes)
        && status.secret_name.as_deref() == Some(secret_name)
        && digest == Some(claims_digest(&grant.spec).as_str())
}

/// Brings `observedGeneration` up to date when the spec changed in ways the current token survives.
async fn acknowledge_generation(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> Result<()> {
    let Some(status) = grant.status.as_ref() else {
        return Ok(());
    };
    if status.observed_generation == grant.metadata.generation {
        return Ok(());
    }
    let Some(ready) = ready_condition(status.conditions.as_deref()) else {
        return Ok(());
    };
    let mut updated = status.clone();
    updated.observed_generation = grant.metadata.generation;
    updated.conditions = Some(set_ready(
        status.conditions.as_deref(),
        ready.status == "True",
        &ready.reason,
        &ready.message,
        grant.metadata.generation,
        now,
    ));
    write_status(grant, ctx, updated).await?;
    Ok(())
}

/// Whether the Secret still holds the token the status describes. The metadata cache tells us when
/// it changed; only then is the Secret read (once) and its token verified.
async fn secret_state(
    ctx: &Context,
    grant: &DelegationGrant,
    secret_name: &str,
    cached: Option<&PartialObjectMeta<Secret>>,
    token: Option<&TokenStatus>,
) -> Result<SecretState> {
    let namespace = grant.namespace().unwrap_or_default();
    let cached_rv = cached.and_then(|s| s.metadata.resource_version.as_deref());
    if cached.is_some() && ctx.is_trusted_secret(&namespace, secret_name, cached_rv) {
        return Ok(SecretState::Intact);
    }
    let Some(token) = token else {
        return Ok(SecretState::Missing);
    };
    let uid = grant.uid().unwrap_or_default();
    if cached.is_none()
        && ctx
            .unseen_writes
            .wrote_unseen(&namespace, secret_name, &uid)
    {
        // The cache lags our own write; the watch will show it and wake the grant again.
        return Ok(SecretState::Intact);
    }
    // Not in the cache, or changed since we last looked: ask the apiserver (the cache may lag our write).
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(stored) = api.get_opt(secret_name).await? else {
        ctx.forget_secret(&namespace, secret_name);
        return Ok(SecretState::Missing);
    };
    let rv = stored.metadata.resource_version.clone().unwrap_or_default();
    let jwks = ctx.keys.jwks()?;
    // Every key counts: an edited `expires-at` misleads a client as much as an edited token.
    let verified = token_secret::stored_token(&stored, &token.expires_at)
        .and_then(|t| signing::verify(t, &jwks, &grant.spec.audience, 0).ok())
        .filter(|claims| claims["jti"].as_str() == Some(token.id.as_str()));
    let Some(claims) = verified else {
        return Ok(SecretState::Changed);
    };
    // What this token grants, from its verified claims: the operator's own knowledge from now on.
    if let (Some(uid), Ok(claims)) = (
        grant.uid(),
        serde_json::from_value::<AccessTokenClaims>(claims),
    ) {
        ctx.remember_minted(&uid, substance(&claims));
    }
    ctx.remember_trusted_secret(&namespace, secret_name, rv);
    Ok(SecretState::Intact)
}

/// Whether the token the operator wrote for this grant (the substance it remembers from minting it,
/// or from reading and verifying it) grants exactly what the grant allows now. The status is not
/// consulted: whoever may write it could make an old, broader token look current. Nothing
/// remembered counts as no.
fn token_grants_what_is_allowed(
    grant: &DelegationGrant,
    ctx: &Context,
    resolution: &Resolution,
    now: Timestamp,
) -> bool {
    let Some(uid) = grant.uid() else {
        return false;
    };
    let times = TokenTimes {
        issued_at: now,
        expires_at: now,
        renewal_at: now,
    };
    let grant_ref = GrantReference {
        namespace: grant.namespace().unwrap_or_default(),
        name: grant.name_any(),
        uid: uid.clone(),
    };
    let details = grant.spec.authorization_details.clone();
    let expected = build_claims(
        &ctx.settings.issuer,
        resolution,
        grant_ref,
        details,
        &times,
        String::new(),
    );
    expected.is_some_and(|claims| ctx.minted_substance(&uid) == Some(substance(&claims)))
}

/// Why a token is issued, the plan made for it ahead of time (a new grant's first), and when.
struct Issuance {
    cause: IssueCause,
    planned: Option<Planned>,
    now: Timestamp,
}

/// Mints a token, writes it to the Secret, then records it in the status.
async fn issue(
    grant: &DelegationGrant,
    ctx: &Context,
    resolution: &Resolution,
    evidence: &Evidence,
    secret_name: &str,
    issuance: Issuance,
) -> Result<Action> {
    let Issuance {
        cause,
        planned,
        now,
    } = issuance;
    let namespace = grant.namespace().unwrap_or_default();
    let old = grant.status.clone().unwrap_or_default();
    let supersedes = supersedes_current(cause);
    let planned_jti = planned.as_ref().map(|p| p.jti.as_str());
    let (revoked, revocation_reason) =
        revoke_replaced(grant, ctx, supersedes, planned_jti, now).await?;
    if !revoked.is_empty() {
        let why = if supersedes {
            "the token no longer matched the grant, a tightened limit, or its Secret"
        } else {
            "a newer rotation displaced it while it was still valid"
        };
        report_revocation(grant, ctx, &revoked, revocation_reason, why);
    }
    let minted = mint(grant, ctx, resolution, planned, now).await?;

    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let desired = token_secret::desired(
        grant,
        secret_name,
        &minted.token,
        &minted.jti,
        &Time(minted.times.expires_at),
    );
    let ours = ctx
        .cached_secret(&namespace, secret_name)
        .filter(|s| token_secret::ownership(Some(s), grant) == Ownership::Ours);
    let Some(rv) = write_token_secret(
        &api,
        desired,
        ours.and_then(|s| s.metadata.uid.clone()),
        grant,
    )
    .await?
    else {
        return secret_conflict(grant, ctx, secret_name, now).await;
    };
    // The token is out: its audit line is written at once, before anything else can fail or the
    // process die, so that no token that reached a Secret goes unaudited.
    let first =
        matches!(cause, IssueCause::First | IssueCause::SecretMissing) && old.token.is_none();
    let (reason, action) = if first {
        (ISSUED, AuditAction::Issued)
    } else {
        (ROTATED, AuditAction::Rotated)
    };
    let message = issue_message(
        resolution,
        cause,
        &minted.times.expires_at,
        &minted.times.renewal_at,
    );
    let mut record = audit_record(
        grant,
        ctx,
        action,
        reason,
        &message,
        Some(resolution),
        vec![minted.jti.as_str()],
        Some(minted.times.expires_at.to_string()),
    );
    record.status_list = Some(&minted.status_ref);
    audit::record(&record);
    ctx.remember_trusted_secret(&namespace, secret_name, rv);
    ctx.unseen_writes
        .wrote(&namespace, secret_name, &grant.uid().unwrap_or_default());
    ctx.remember_minted(&grant.uid().unwrap_or_default(), minted.substance);
    if let Some(previous_secret) = old.secret_name.as_deref().filter(|n| *n != secret_name) {
        // spec.secretName changed: the token moved; the old Secret is ours to remove.
        delete_our_secret(ctx, grant, previous_secret, true).await?;
    }

    let status = issued_status(
        grant,
        &old,
        evidence,
        resolution,
        &minted,
        secret_name,
        supersedes,
        reason,
        &message,
        now,
    );
    write_status(grant, ctx, status).await?;
    ctx.event(grant, EventType::Normal, reason, message.clone());
    Ok(ctx.look_again(
        grant,
        until(now, minted.times.renewal_at).max(Duration::from_secs(1)),
    ))
}

/// Whether the current token must be revoked rather than kept as `previousToken`: it no longer says
/// the right thing (changed grant, tightened limit, tampered Secret).
fn supersedes_current(cause: IssueCause) -> bool {
    matches!(
        cause,
        IssueCause::GrantChanged
            | IssueCause::OutlivesLimit
            | IssueCause::SecretChanged
            | IssueCause::KeyRevoked
    )
}

/// Revokes what a new token replaces. When it supersedes the current token, every token of the grant
/// ("Superseded"). On a plain renewal the current token stays valid as `previousToken`, and only an
/// older one it displaces while still valid (renewBefore above half the TTL) or a token the status
/// never recorded ("Displaced"): every token that can still be valid is in the status or revoked.
async fn revoke_replaced(
    grant: &DelegationGrant,
    ctx: &Context,
    supersedes: bool,
    planned: Option<&str>,
    now: Timestamp,
) -> Result<(Vec<String>, &'static str)> {
    let current = grant
        .status
        .as_ref()
        .and_then(|s| s.token.as_ref())
        .filter(|_| !supersedes)
        .map(|t| t.id.as_str());
    // The token about to be minted on a plan is not replaced by itself.
    let kept: Vec<&str> = current.into_iter().chain(planned).collect();
    let in_use = tokens_in_use(grant, ctx, now).await?;
    let replaced = in_use
        .tokens
        .into_iter()
        .filter(|(jti, _)| !kept.contains(&jti.as_str()))
        .collect();
    let reason = if supersedes {
        "Superseded"
    } else {
        "Displaced"
    };
    let verified: Vec<TokenStatusRef> = in_use
        .verified_refs
        .into_iter()
        .filter(|(jti, _)| !kept.contains(&jti.as_str()))
        .map(|(_, r)| r)
        .collect();
    revoke_statuses(grant, ctx, &kept, &verified, now).await?;
    Ok((ids(replaced), reason))
}

/// A freshly signed token.
struct Minted {
    jti: String,
    token: String,
    key_id: String,
    times: TokenTimes,
    /// What it grants ([`substance`]).
    substance: u64,
    /// Where its status lives.
    status_ref: TokenStatusRef,
}

/// Plans (unless `planned`), builds and signs a token for a resolved grant, with its status-list
/// reference (allocated, recorded and published before the token exists).
async fn mint(
    grant: &DelegationGrant,
    ctx: &Context,
    resolution: &Resolution,
    planned: Option<Planned>,
    now: Timestamp,
) -> Result<Minted> {
    let (jti, times, recorded) = match planned {
        Some(p) => (p.jti, p.times, Some(p.status_ref)),
        None => {
            let limits = limits_of(resolution);
            let times = plan_token(now, limits.0, limits.1, limits.2, jitter());
            (uuid::Uuid::new_v4().to_string(), times, None)
        }
    };
    let grant_ref = GrantReference {
        namespace: grant.namespace().unwrap_or_default(),
        name: grant.name_any(),
        uid: grant.uid().unwrap_or_default(),
    };
    let details = grant.spec.authorization_details.clone();
    let mut claims = build_claims(
        &ctx.settings.issuer,
        resolution,
        grant_ref,
        details,
        &times,
        jti.clone(),
    )
    .ok_or_else(|| Error::InvalidState("a resolved chain has at least one actor".into()))?;
    let status_ref = match recorded {
        Some(status_ref) => status_ref,
        None => {
            ctx.status_lists
                .allocate(
                    &ctx.keys,
                    &grant.uid().unwrap_or_default(),
                    &jti,
                    now.as_second(),
                    claims.exp,
                )
                .await?
        }
    };
    claims.status = Some(status_ref.status_claim());
    let signed = ctx.keys.sign(&claims)?;
    Ok(Minted {
        jti,
        token: signed.token,
        key_id: signed.key_id,
        times,
        substance: substance(&claims),
        status_ref,
    })
}

/// The status of a grant that now holds `minted`.
#[allow(clippy::too_many_arguments)]
fn issued_status(
    grant: &DelegationGrant,
    old: &DelegationGrantStatus,
    evidence: &Evidence,
    resolution: &Resolution,
    minted: &Minted,
    secret_name: &str,
    supersedes: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> DelegationGrantStatus {
    let previous_token = old
        .token
        .as_ref()
        .filter(|t| !supersedes && t.expires_at.0 > now)
        .map(|t| PreviousToken {
            id: t.id.clone(),
            expires_at: t.expires_at.clone(),
        });
    DelegationGrantStatus {
        conditions: Some(set_ready(
            old.conditions.as_deref(),
            true,
            reason,
            message,
            grant.metadata.generation,
            now,
        )),
        observed_generation: grant.metadata.generation,
        chain: Some(resolution.chain.clone()),
        effective_scopes: Some(resolution.effective_scopes.clone()),
        token: Some(TokenStatus {
            id: minted.jti.clone(),
            key_id: minted.key_id.clone(),
            issued_at: Time(minted.times.issued_at),
            expires_at: Time(minted.times.expires_at),
            renewal_time: Time(minted.times.renewal_at),
            claims_digest: Some(claims_digest(&grant.spec)),
        }),
        previous_token,
        secret_name: Some(secret_name.to_owned()),
        parent_grant_uid: old.parent_grant_uid.clone(),
        approval: evidence.approval.clone(),
    }
}

fn issue_message(
    resolution: &Resolution,
    cause: IssueCause,
    expires_at: &Timestamp,
    renewal_at: &Timestamp,
) -> String {
    let why = match cause {
        IssueCause::First => "issued",
        IssueCause::Renewal => "renewed",
        IssueCause::GrantChanged => "reissued because the grant or its chain changed",
        IssueCause::OutlivesLimit => "reissued because a limit above it tightened",
        IssueCause::SecretMissing => "reissued because its Secret was deleted",
        IssueCause::SecretChanged => "reissued because its Secret was altered",
        IssueCause::KeyRevoked => "reissued because the key that signed it was revoked",
    };
    let actor = resolution
        .actors
        .last()
        .map(String::as_str)
        .unwrap_or_default();
    format!(
        "token {why} for {actor} on behalf of {}; expires at {expires_at}, renews at {renewal_at}",
        resolution.principal.name
    )
}

/// Writes the token Secret without ever taking over a Secret someone else created: a Secret the cache
/// shows as ours is updated with its uid as a precondition, anything else is created. Returns the new
/// resourceVersion, or `None` when a foreign Secret holds the name.
async fn write_token_secret(
    api: &Api<Secret>,
    mut desired: Secret,
    cached_uid: Option<String>,
    grant: &DelegationGrant,
) -> Result<Option<String>> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    desired.metadata.uid = cached_uid;
    if let Written::Done(rv) = token_secret::write(api, &desired).await? {
        return Ok(Some(rv));
    }
    // Collided: with our own earlier write the cache has not seen yet, or our Secret was deleted
    // meanwhile (an update of a missing Secret also collides). Ask the apiserver which, and try once more.
    let meta = api.get_metadata_opt(&name).await?;
    match token_secret::ownership(meta.as_ref(), grant) {
        Ownership::Foreign => return Ok(None),
        Ownership::Ours => desired.metadata.uid = meta.and_then(|m| m.metadata.uid),
        Ownership::Absent => desired.metadata.uid = None,
    }
    match token_secret::write(api, &desired).await? {
        Written::Done(rv) => Ok(Some(rv)),
        // The Secret changed again under us: not a foreign Secret, just a race; try again shortly.
        Written::Conflict => Err(Error::InvalidState(format!(
            "Secret {name:?} changed while being written; retrying"
        ))),
    }
}

/// A Secret of the grant's name exists and is not ours: hands off, revoke what we issued, explain.
async fn secret_conflict(
    grant: &DelegationGrant,
    ctx: &Context,
    secret_name: &str,
    now: Timestamp,
) -> Result<Action> {
    let message = format!(
        "Secret {secret_name:?} already exists and was not created by delegation-operator for this grant; \
         delete it or set spec.secretName to a free name"
    );
    let revoked = revoke_tokens(grant, ctx, now).await?;
    if !revoked.is_empty() {
        report_revocation(grant, ctx, &revoked, SECRET_CONFLICT, &message);
    }
    let changed = write_status(
        grant,
        ctx,
        refused_status(grant, None, SECRET_CONFLICT, &message, now),
    )
    .await?;
    if changed {
        ctx.event(grant, EventType::Warning, SECRET_CONFLICT, message.clone());
        audit::record(&audit_record(
            grant,
            ctx,
            AuditAction::Denied,
            SECRET_CONFLICT,
            &message,
            None,
            Vec::new(),
            None,
        ));
    }
    // A foreign Secret sends us no events (the watch only sees ours): look again now and then.
    Ok(ctx.look_again(grant, Duration::from_secs(60)))
}

/// Revokes every token of the grant that may still be valid: sets them INVALID in the status lists,
/// then deletes the grant's Secret(s). Revoking comes first and must succeed (fail closed): otherwise
/// nothing is deleted, the status keeps the ids, and the reconcile is retried.
async fn revoke_tokens(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> Result<Vec<String>> {
    let revoked = revoke_recorded(grant, ctx, now).await?;
    delete_secrets(grant, ctx).await?;
    Ok(revoked)
}

/// Sets every token of the grant that may still be valid to INVALID in the status lists, written and
/// published. Returns their ids.
async fn revoke_recorded(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> Result<Vec<String>> {
    let in_use = tokens_in_use(grant, ctx, now).await?;
    let verified: Vec<TokenStatusRef> = in_use.verified_refs.into_iter().map(|(_, r)| r).collect();
    // Before any Secret is deleted: fail closed.
    revoke_statuses(grant, ctx, &[], &verified, now).await?;
    Ok(ids(in_use.tokens))
}

/// The ids of tokens given as `(id, exp)`.
fn ids(tokens: Vec<(String, Timestamp)>) -> Vec<String> {
    tokens.into_iter().map(|(jti, _)| jti).collect()
}

/// Deletes the grant's token Secret(s), those that are its own.
async fn delete_secrets(grant: &DelegationGrant, ctx: &Context) -> Result<()> {
    // When the status says a token was written, a Secret missing from the cache may just be one the
    // cache has not seen yet: ask the apiserver. Otherwise the cache is enough (no reads at rest).
    let wrote_one = grant
        .status
        .as_ref()
        .is_some_and(|s| s.token.is_some() || s.secret_name.is_some());
    for secret_name in secret_names(grant) {
        delete_our_secret(ctx, grant, &secret_name, wrote_one).await?;
    }
    Ok(())
}

/// The grant's tokens that may still be valid, as `(jti, exp)`: those the operator recorded minting
/// for this grant uid, and the token held by its Secret when the record does not name it (one minted
/// before the record existed). Nothing a tenant writes can add an entry of its choosing: the status
/// and the Secret's annotations are not read for it, and the Secret's token counts only when it
/// verifies against our keys and names this very grant.
async fn tokens_in_use(grant: &DelegationGrant, ctx: &Context, now: Timestamp) -> Result<InUse> {
    let latest = crate::delegation::chain::add(now, ctx.settings.policy.max_token_ttl);
    let plausible = |jti: &str, exp: Timestamp| {
        uuid::Uuid::try_parse(jti).is_ok() && exp > now && exp <= latest
    };
    let mut verified_refs = Vec::new();
    // What the operator recorded minting for this grant uid (its own state, operator namespace):
    // nothing a tenant writes into the status can add another grant's token here.
    let recorded = match grant.uid() {
        Some(uid) => ctx.status_lists.recorded(&uid, now.as_second()).await,
        None => Vec::new(),
    };
    let mut tokens: Vec<(String, Timestamp)> = recorded
        .into_iter()
        .filter_map(|(jti, exp)| Timestamp::from_second(exp).ok().map(|exp| (jti, exp)))
        .filter(|(jti, exp)| plausible(jti, *exp))
        .collect();
    let namespace = grant.namespace().unwrap_or_default();
    for secret_name in secret_names(grant) {
        let Some(secret) = ctx.cached_secret(&namespace, &secret_name) else {
            continue;
        };
        if token_secret::ownership(Some(&secret), grant) != Ownership::Ours {
            continue;
        }
        // The annotation only says whether the Secret may hold a token the record does not name.
        let named = |jti: &str| ctx.secret_token_ids.names(&namespace, &secret_name, jti);
        if tokens.iter().any(|(jti, _)| named(jti)) {
            continue;
        }
        if let Some((jti, exp, status_ref)) = signed_token_in(ctx, grant, &secret_name).await?
            && plausible(&jti, exp)
        {
            if let Some(status_ref) = status_ref {
                verified_refs.push((jti.clone(), status_ref));
            }
            tokens.push((jti, exp));
        }
    }
    tokens.sort();
    tokens.dedup_by(|a, b| a.0 == b.0);
    Ok(InUse {
        tokens,
        verified_refs,
    })
}

/// The tokens of a grant that may still be valid.
struct InUse {
    /// `(jti, exp)` of each.
    tokens: Vec<(String, Timestamp)>,
    /// Status-list references read from a token of this grant that verified against our keys, by
    /// jti. The others come from the operator's own record of what it minted for the grant.
    verified_refs: Vec<(String, TokenStatusRef)>,
}

/// Sets the status-list entries of the grant's tokens to INVALID, all but `keep`: the references
/// the operator recorded for this grant uid when it minted them, plus `verified` ones (from tokens
/// of this grant that verified). Persisted and published before any Secret is deleted (fail closed).
async fn revoke_statuses(
    grant: &DelegationGrant,
    ctx: &Context,
    keep: &[&str],
    verified: &[TokenStatusRef],
    now: Timestamp,
) -> Result<()> {
    let Some(uid) = grant.uid() else {
        return Ok(());
    };
    ctx.status_lists
        .revoke_grant(&ctx.keys, &uid, keep, verified, now.as_second())
        .await?;
    Ok(())
}

/// The id, expiry and status-list reference of the token in a grant's Secret, read from its
/// verified claims (so they are ours, for this grant uid), or `None`.
async fn signed_token_in(
    ctx: &Context,
    grant: &DelegationGrant,
    secret_name: &str,
) -> Result<Option<(String, Timestamp, Option<TokenStatusRef>)>> {
    let namespace = grant.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(secret) = api.get_opt(secret_name).await? else {
        return Ok(None);
    };
    // Whatever audience it was minted for: the spec's may have changed since.
    let Some(claims) = crate::operator::grants::orphans::our_token(ctx, &secret, 0)? else {
        return Ok(None);
    };
    if claims[crate::delegation::claims::GRANT_CLAIM]["uid"].as_str()
        != grant.metadata.uid.as_deref()
    {
        return Ok(None);
    }
    let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
    let exp = claims["exp"]
        .as_i64()
        .and_then(|e| Timestamp::from_second(e).ok());
    let status_ref = TokenStatusRef::from_status_claim(&claims["status"]);
    Ok(exp.map(|exp| (jti, exp, status_ref)))
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

/// Deletes a Secret if, and only if, it is this grant's. `confirm` asks the apiserver when the cache
/// does not show the Secret.
async fn delete_our_secret(
    ctx: &Context,
    grant: &DelegationGrant,
    secret_name: &str,
    confirm: bool,
) -> Result<()> {
    let namespace = grant.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let meta = match ctx.cached_secret(&namespace, secret_name) {
        Some(cached) => Some(cached),
        None if confirm => api.get_metadata_opt(secret_name).await?,
        None => None,
    };
    if token_secret::ownership(meta.as_ref(), grant) == Ownership::Ours {
        token_secret::delete(&api, secret_name, meta.and_then(|m| m.metadata.uid)).await?;
    }
    ctx.forget_secret(&namespace, secret_name);
    Ok(())
}

/// Says that tokens were revoked (an Event and an audit line). Called as soon as they are INVALID in
/// the written, published status list, before any other write, so that a process dying after a
/// revocation still leaves its audit line.
fn report_revocation(
    grant: &DelegationGrant,
    ctx: &Context,
    revoked: &[String],
    reason: &str,
    message: &str,
) {
    let note = format!(
        "revoked token(s) {} ({reason}): {message}",
        revoked.join(", ")
    );
    ctx.event(grant, EventType::Normal, REVOKED, note);
    audit::record(&audit_record(
        grant,
        ctx,
        AuditAction::Revoked,
        reason,
        message,
        None,
        revoked.iter().map(String::as_str).collect(),
        None,
    ));
}

/// The status of a grant that holds no token.
fn refused_status(
    grant: &DelegationGrant,
    approval: Option<ApprovalStatus>,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> DelegationGrantStatus {
    let previous = grant.status.as_ref().and_then(|s| s.conditions.as_deref());
    DelegationGrantStatus {
        conditions: Some(set_ready(
            previous,
            false,
            reason,
            message,
            grant.metadata.generation,
            now,
        )),
        observed_generation: grant.metadata.generation,
        parent_grant_uid: grant
            .status
            .as_ref()
            .and_then(|s| s.parent_grant_uid.clone()),
        approval,
        ..Default::default()
    }
}

/// Writes the status when it differs from what the cache shows. Returns whether it wrote.
///
/// A plain update of the status subresource, made from the cached grant with its resourceVersion as
/// a precondition: the decision was taken from that version, so if the grant changed meanwhile (or
/// another writer got there first) the write fails with a conflict and the grant is looked at again,
/// rather than describing a grant that no longer exists. The apiserver takes only `status` from the
/// body of a status update, so the cache's pruned metadata does not matter.
async fn write_status(
    grant: &DelegationGrant,
    ctx: &Context,
    mut status: DelegationGrantStatus,
) -> Result<bool> {
    if status.parent_grant_uid.is_none() {
        status.parent_grant_uid = parent_uid(grant, ctx);
    }
    if grant.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<DelegationGrant> =
        Api::namespaced(ctx.client.clone(), &grant.namespace().unwrap_or_default());
    let mut desired = grant.clone();
    desired.status = Some(status);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api
        .replace_status(&grant.name_any(), &params, &desired)
        .await
    {
        Ok(written) => {
            ctx.remember_status_write(grant, written.resource_version());
            Ok(true)
        }
        // Deleted meanwhile (finalizer already gone): nothing left to describe.
        Err(e) if crate::operator::error::is_not_found(&e) => Ok(false),
        Err(e) if crate::operator::error::is_conflict(&e) => Err(Error::StaleStatus),
        Err(e) => Err(e.into()),
    }
}

/// An audit record naming the principal, the requester and the chain: the resolved chain when there
/// is one, else the chain of the token being revoked, else the chain as written.
#[allow(clippy::too_many_arguments)]
fn audit_record<'a>(
    grant: &'a DelegationGrant,
    ctx: &Context,
    action: AuditAction,
    reason: &'a str,
    message: &'a str,
    resolution: Option<&'a Resolution>,
    token_ids: Vec<&'a str>,
    expires_at: Option<String>,
) -> AuditRecord<'a> {
    let namespace = grant.metadata.namespace.as_deref().unwrap_or_default();
    let chain = match resolution {
        Some(r) => r.chain.clone(),
        None => grant
            .status
            .as_ref()
            .and_then(|s| s.chain.clone())
            .unwrap_or_else(|| chain_as_written(grant, namespace, &ctx.namespace_view(namespace))),
    };
    let principal = chain
        .first()
        .filter(|l| l.kind != "AgentIdentity")
        .map(|l| l.name.clone());
    AuditRecord {
        time: now().to_string(),
        action,
        namespace,
        grant: grant.metadata.name.as_deref().unwrap_or_default(),
        reason,
        message,
        principal,
        requester: grant.spec.requester.as_ref().map(|r| r.username.as_str()),
        chain,
        scopes: resolution.map(|r| r.effective_scopes.as_slice()),
        audience: resolution.map(|r| r.audience.as_str()),
        token_ids,
        expires_at,
        status_list: None,
    }
}

/// The uid of a hop's parent as the cache shows it now: pinned into the status the first time the
/// grant's status is written, and never changed afterwards.
fn parent_uid(grant: &DelegationGrant, ctx: &Context) -> Option<String> {
    let parent = grant.spec.parent_grant_ref.as_ref()?;
    let namespace = grant.namespace()?;
    ctx.namespace_view(&namespace).grant(&parent.name)?.uid()
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

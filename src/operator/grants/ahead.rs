//! A new grant's first token, planned ahead: while its finalizer is added (or as soon as the
//! admission policy's finalizer is seen), the authority check is asked and, once it passed, the
//! first token's status-list entry recorded, so the issuance waits for neither. Called by the grant
//! controller's reconcile; an unused plan is always given back.

use std::{sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};

use super::{authority, jitter};
use crate::operator::{
    FINALIZER,
    caches::{context::Context, prune},
    error::{Error, Result},
};
use crate::{
    api::DelegationGrant,
    delegation::{
        Resolution, resolve,
        timing::{TokenTimes, plan_token},
    },
    status_list::TokenStatusRef,
};

/// Adds the finalizer (before any token exists, so that a deletion always revokes) and, at the same
/// time, asks ahead (see [`ask_ahead`]). Returns the grant as the apiserver now holds it, so the
/// issuance goes on in this very reconcile rather than after another trip through the watch.
pub(super) async fn add_finalizer_and_ask(
    api: &Api<DelegationGrant>,
    grant: Arc<DelegationGrant>,
    ctx: &Context,
    now: Timestamp,
) -> Result<(Arc<DelegationGrant>, Option<Planned>)> {
    use kube::{
        api::{Patch, PatchParams},
        runtime::finalizer::Error as F,
    };
    // A list the cache reduced is written from the live grant, or the others' finalizers would go.
    let grant = if prune::finalizers_pruned(&grant) {
        let live = api.get(&grant.name_any()).await;
        Arc::new(live.map_err(|e| Error::Finalizer(Box::new(F::AddFinalizer(e))))?)
    } else {
        grant
    };
    let mut finalizers = grant.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        finalizers.push(FINALIZER.to_owned());
    }
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

/// What the first issuance of a new grant needs from the apiserver, asked ahead: the grant's
/// authority (a SubjectAccessReview the issuance would otherwise wait for) and then, only if it
/// passed, the first token's status-list entry (see [`Planned`]). An entry is never spent on a grant
/// its authority refuses: entries are capacity that a namespace's budget counts until they expire.
/// Either may fail: the issuance then does it itself.
pub(super) async fn ask_ahead(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> Option<Planned> {
    // A grant beyond a grant limit is refused: nothing to ask, no status-list entry to take.
    ctx.grant_limits(grant).ok()?;
    let name = grant.name_any();
    match authority::evaluate(grant, ctx, now, true).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return None,
        Err(e) => {
            tracing::debug!(grant = %name, error = %e, "authority check ahead of issuance failed");
            return None;
        }
    }
    plan_first_token(grant, ctx, now).await.unwrap_or_else(|e| {
        tracing::debug!(grant = %name, error = %e, "status-list entry ahead of issuance failed");
        None
    })
}

/// Gives back the status-list entry of a planned token the issuance did not mint. Before a refusal
/// too: it would otherwise revoke, and report, the entry as one of the grant's tokens.
pub(super) async fn withdraw_unused(
    grant: &DelegationGrant,
    ctx: &Context,
    planned: Option<Planned>,
) {
    if let (Some(planned), Some(uid)) = (planned, grant.uid()) {
        ctx.status_lists
            .withdraw(
                &ctx.keys,
                &uid,
                &planned.jti,
                crate::operator::now().as_second(),
            )
            .await;
    }
}

/// The first token of a new grant, planned while its finalizer is added: its id, times and
/// status-list entry, recorded (written and published) like any issuance's, only earlier, so the
/// issuance does not wait for that write after the finalizer's. Nothing is signed until the
/// finalizer is in place and the authority confirmed; the entry of a plan the issuance does not use
/// (a refusal, a Secret conflict) is given back (see `withdraw_unused`).
pub(super) struct Planned {
    pub(super) jti: String,
    pub(super) times: TokenTimes,
    /// What the times were planned from: the issuance uses the plan only if its resolution agrees.
    pub(super) limits: TokenLimits,
    pub(super) status_ref: TokenStatusRef,
}

/// A token's time limits as resolved from the grant and its chain.
pub(super) type TokenLimits = (Duration, Option<Duration>, Option<Timestamp>);

pub(super) fn limits_of(resolution: &Resolution) -> TokenLimits {
    (
        resolution.token_ttl,
        resolution.renew_before,
        resolution.not_after,
    )
}

/// Plans and records the first token of a grant that resolves now (see [`Planned`]); `None` when it
/// does not (the issuance will refuse it or wait).
pub(super) async fn plan_first_token(
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
            &namespace,
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
            ctx.status_lists
                .withdraw(&ctx.keys, &uid, &jti, now.as_second())
                .await;
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

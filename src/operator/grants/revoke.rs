//! Revoking a grant's tokens: every token it may still hold — what the operator recorded minting
//! for the grant uid, and a verified token in its Secret the record does not name — is set INVALID in
//! the written, published status list before any Secret is deleted (fail closed). Called by the
//! grant controller on a refusal, an issuance that replaces tokens, and a deletion.

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, events::EventType},
};

use super::{
    secret_names,
    status::{REVOKED, Said, refused_status, write_status},
    token_secret::{self, Ownership},
};
use crate::operator::{
    FINALIZER,
    caches::{context::Context, prune},
    error::{Error, Result},
    reporting::audit::AuditAction,
};
use crate::{
    api::DelegationGrant,
    delegation::{
        Reason,
        decision::{Refused, Revoke},
    },
    status_list::TokenStatusRef,
};

/// The revocation reason of a deleted grant's tokens, in its Event and the audit trail alike.
const DELETED: &str = "Deleted";

/// The grant is being deleted: revoke its tokens, say so, and let the finalizer go. The finalizer
/// is released only once the tokens are INVALID in the written, published status list; the Secret is
/// deleted at the same time (if that fails, the orphan sweep takes it when the grant is gone).
pub(super) async fn cleanup(
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
pub(super) async fn remove_finalizer(
    api: &Api<DelegationGrant>,
    grant: &DelegationGrant,
) -> Result<()> {
    use kube::{
        api::{Patch, PatchParams},
        runtime::finalizer::Error as F,
    };
    // Where our finalizer stands in a list the cache reduced, only the live grant says.
    let live = if prune::finalizers_pruned(grant) {
        let live = api.get_opt(&grant.name_any()).await;
        match live.map_err(|e| Error::Finalizer(Box::new(F::RemoveFinalizer(e))))? {
            Some(live) => Some(live),
            None => return Ok(()),
        }
    } else {
        None
    };
    let grant = live.as_ref().unwrap_or(grant);
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
pub(super) async fn refuse(
    grant: &DelegationGrant,
    ctx: &Context,
    refused: &Refused,
    now: Timestamp,
) -> Result<Action> {
    let Refused {
        refusal,
        approval,
        revoke,
        look_again,
    } = refused;
    debug_assert_eq!(*revoke, Revoke::Every, "a refusal revokes every token");
    let reason = refusal.reason.as_str();
    // Recorded before anything is revoked: from now on no hop below may rest on this grant's token.
    ctx.remember_refused(grant);
    let revoked = revoke_tokens(grant, ctx, now).await?;
    if !revoked.is_empty() {
        report_revocation(grant, ctx, &revoked, reason, &refusal.message);
    }
    let status = refused_status(grant, approval.clone(), reason, &refusal.message, now);
    let changed = write_status(grant, ctx, status).await?;
    // Not judgements of the grant, but a person must act: said under their own reason.
    let trouble = matches!(
        refusal.reason,
        Reason::SecretConflict | Reason::StatusListsFull
    );
    if changed && (refusal.reason.is_denial() || trouble) {
        let (event_reason, note) = if trouble {
            (reason, refusal.message.clone())
        } else {
            ("Denied", format!("{reason}: {}", refusal.message))
        };
        ctx.event(grant, EventType::Warning, event_reason, note);
        Said::new(AuditAction::Denied, reason, &refusal.message).audit(grant, ctx);
    } else if changed && revoked.is_empty() {
        ctx.event(grant, EventType::Normal, reason, refusal.message.clone());
    }
    Ok(match look_again {
        Some(after) => ctx.look_again(grant, *after),
        // Nothing is due: a change to the grant, its agent or its parent triggers the next look.
        None => Action::await_change(),
    })
}

/// Revokes every token of the grant that may still be valid: sets them INVALID in the status lists,
/// then deletes the grant's Secret(s). Revoking comes first and must succeed (fail closed): otherwise
/// nothing is deleted, the status keeps the ids, and the reconcile is retried.
pub(super) async fn revoke_tokens(
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
pub(super) async fn revoke_recorded(
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
pub(super) fn ids(tokens: Vec<(String, Timestamp)>) -> Vec<String> {
    tokens.into_iter().map(|(jti, _)| jti).collect()
}

/// Deletes the grant's token Secret(s), those that are its own.
pub(super) async fn delete_secrets(grant: &DelegationGrant, ctx: &Context) -> Result<()> {
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
pub(super) async fn tokens_in_use(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> Result<InUse> {
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
pub(super) struct InUse {
    /// `(jti, exp)` of each.
    pub(super) tokens: Vec<(String, Timestamp)>,
    /// Status-list references read from a token of this grant that verified against our keys, by
    /// jti. The others come from the operator's own record of what it minted for the grant.
    pub(super) verified_refs: Vec<(String, TokenStatusRef)>,
}

/// Sets the status-list entries of the grant's tokens to INVALID, all but `keep`: the references
/// the operator recorded for this grant uid when it minted them, plus `verified` ones (from tokens
/// of this grant that verified). Persisted and published before any Secret is deleted (fail closed).
pub(super) async fn revoke_statuses(
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
pub(super) async fn signed_token_in(
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

/// Deletes a Secret if, and only if, it is this grant's. `confirm` asks the apiserver when the cache
/// does not show the Secret.
pub(super) async fn delete_our_secret(
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
pub(super) fn report_revocation(
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
    Said {
        token_ids: revoked.iter().map(String::as_str).collect(),
        ..Said::new(AuditAction::Revoked, reason, message)
    }
    .audit(grant, ctx);
}

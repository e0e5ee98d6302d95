//! Issuing a token: revoke what it replaces, mint it (with its status-list entry recorded and
//! published first), write it to the grant's Secret (never taking over someone else's) or, with Pod
//! delivery, seal it for the status, say so at once, and record it in the status. Called by the
//! grant controller on an `Issue` verdict.

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, events::EventType},
};

use super::{
    ahead::{Planned, limits_of, withdraw_unused},
    jitter,
    revoke::{delete_our_secret, ids, refuse, report_revocation, revoke_statuses, tokens_in_use},
    status::{ISSUED, ROTATED, Said, write_status},
    token_secret::{self, Ownership, Written},
};
use crate::operator::{
    caches::context::Context,
    error::{Error, Result},
    reporting::audit::AuditAction,
};
use crate::{
    api::{DelegationGrant, DelegationGrantStatus, PreviousToken, TokenStatus},
    delegation::{
        Resolution,
        authority::Evidence,
        claims::{GrantReference, build_claims, claims_digest, substance},
        conditions::set_ready,
        decision::{Issue, Revoke, secret_conflict},
        delivery::Delivery,
        record::{HeldToken, last_approver},
        timing::{IssueCause, TokenTimes, plan_token, until},
    },
    sealing::GrantId,
    status_list::TokenStatusRef,
};

/// Mints a token, writes it to the Secret, then records it in the status.
pub(super) async fn issue(
    grant: &DelegationGrant,
    ctx: &Context,
    issuance: &Issue,
    planned: Option<Planned>,
    now: Timestamp,
) -> Result<Action> {
    let Issue {
        cause,
        resolution,
        evidence,
        revoke,
        first,
    } = issuance;
    let (cause, first) = (*cause, *first);
    let secret_name = &grant.spec.secret_name_or_default(&grant.name_any());
    let namespace = grant.namespace().unwrap_or_default();
    let old = grant.status.clone().unwrap_or_default();
    let supersedes = *revoke == Revoke::Every;
    let planned_jti = planned.as_ref().map(|p| p.jti.clone());
    let replaced = revoke_replaced(grant, ctx, supersedes, planned_jti.as_deref(), now).await;
    let (revoked, revocation_reason) = match replaced {
        Ok(replaced) => replaced,
        Err(e) => {
            withdraw_unused(grant, ctx, planned).await;
            return Err(e);
        }
    };
    if !revoked.is_empty() {
        let why = if cause == IssueCause::SecretMissing && resolution.delivery.is_pod() {
            "its sealed copy was removed from the grant's status"
        } else if cause == IssueCause::SecretMissing {
            "its Secret was deleted, which is taken to mean the token leaked"
        } else if supersedes {
            "the token no longer matched the grant, a tightened limit, or its Secret"
        } else {
            "a newer rotation displaced it while it was still valid"
        };
        report_revocation(grant, ctx, &revoked, revocation_reason, why);
    }
    let minted = match mint(grant, ctx, resolution, planned, now).await {
        Ok(minted) => minted,
        Err(e) => {
            // A planned entry that was not signed is given back, never left VALID and unused.
            if let (Some(jti), Some(uid)) = (planned_jti, grant.uid()) {
                ctx.status_lists
                    .withdraw(&ctx.keys, &uid, &jti, now.as_second())
                    .await;
            }
            return Err(e);
        }
    };

    let delivered = match resolution.delivery {
        Delivery::Secret => match write_to_secret(grant, ctx, &minted, secret_name).await? {
            Some(rv) => Delivered::Secret { rv },
            None => return refuse(grant, ctx, &secret_conflict(secret_name), now).await,
        },
        Delivery::Pod { .. } => Delivered::Sealed(seal(grant, ctx, &minted)?),
    };
    // The token is out: its audit line is written at once, before anything else can fail or the
    // process die, so that no token that reached a Secret goes unaudited.
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
    Said {
        resolution: Some(resolution),
        token_ids: vec![minted.jti.as_str()],
        expires_at: Some(minted.times.expires_at.to_string()),
        status_list: Some(&minted.status_ref),
        ..Said::new(action, reason, &message)
    }
    .audit(grant, ctx);
    if let Delivered::Secret { rv } = &delivered {
        ctx.remember_trusted_secret(&namespace, secret_name, rv.clone());
        ctx.unseen_writes
            .wrote(&namespace, secret_name, &grant.uid().unwrap_or_default());
    }
    ctx.remember_token(
        grant,
        HeldToken {
            substance: minted.substance,
            expires_at: minted.times.expires_at.as_second(),
            approved_by: last_approver(&resolution.chain),
            confirmed_for: None,
        },
        true,
    );
    let kept_secret = matches!(delivered, Delivered::Secret { .. }).then_some(secret_name);
    if let Some(previous_secret) = old
        .secret_name
        .as_deref()
        .filter(|n| Some(*n) != kept_secret.map(String::as_str))
    {
        // spec.secretName changed, or the grant moved to Pod delivery: the old Secret is ours to
        // remove (its token was revoked: either change replaces the token).
        delete_our_secret(ctx, grant, previous_secret, true).await?;
    }

    let status = issued_status(
        grant,
        &old,
        evidence,
        resolution,
        &minted,
        &delivered,
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

/// Where a freshly minted token went.
pub(super) enum Delivered {
    /// To the grant's Secret, now at this resourceVersion.
    Secret { rv: String },
    /// Sealed, for the grant's status (Pod delivery).
    Sealed(String),
}

/// Writes the token to the grant's Secret; `None` when a Secret that is not ours holds the name.
async fn write_to_secret(
    grant: &DelegationGrant,
    ctx: &Context,
    minted: &Minted,
    secret_name: &str,
) -> Result<Option<String>> {
    let namespace = grant.namespace().unwrap_or_default();
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
    write_token_secret(
        &api,
        desired,
        ours.and_then(|s| s.metadata.uid.clone()),
        grant,
    )
    .await
}

/// Seals the token for the grant's status (Pod delivery), under the key that signed it.
fn seal(grant: &DelegationGrant, ctx: &Context, minted: &Minted) -> Result<String> {
    ctx.keys
        .seal(GrantId::of(grant), &minted.key_id, &minted.token)
}

/// Revokes what a new token replaces. When it supersedes the current token, every token of the grant
/// ("Superseded"). On a plain renewal the current token stays valid as `previousToken`, and only an
/// older one it displaces while still valid (renewBefore above half the TTL) or a token the status
/// never recorded ("Displaced"): every token that can still be valid is in the status or revoked.
pub(super) async fn revoke_replaced(
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
pub(super) struct Minted {
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
pub(super) async fn mint(
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
                    &grant.namespace().unwrap_or_default(),
                    &grant.uid().unwrap_or_default(),
                    &jti,
                    now.as_second(),
                    claims.exp,
                )
                .await?
        }
    };
    claims.status = Some(status_ref.status_claim());
    claims.lineage = ctx.status_lists.lineage_of(&status_ref).await;
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
pub(super) fn issued_status(
    grant: &DelegationGrant,
    old: &DelegationGrantStatus,
    evidence: &Evidence,
    resolution: &Resolution,
    minted: &Minted,
    delivered: &Delivered,
    secret_name: &str,
    supersedes: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> DelegationGrantStatus {
    let (secret_name, sealed_token) = match delivered {
        Delivered::Secret { .. } => (Some(secret_name.to_owned()), None),
        Delivered::Sealed(sealed) => (None, Some(sealed.clone())),
    };
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
        secret_name,
        sealed_token,
        parent_grant_uid: old.parent_grant_uid.clone(),
        approval: evidence.approval.clone(),
    }
}

pub(super) fn issue_message(
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
        IssueCause::SecretMissing if resolution.delivery.is_pod() => {
            "reissued because its sealed copy was removed from the status"
        }
        IssueCause::SecretChanged if resolution.delivery.is_pod() => {
            "reissued because its sealed copy in the status was altered"
        }
        IssueCause::SecretMissing => "reissued because its Secret was deleted",
        IssueCause::SecretChanged => "reissued because its Secret was altered",
        IssueCause::KeyRevoked => "reissued because the key that signed it was revoked",
    };
    let actor = resolution
        .actors
        .last()
        .map(String::as_str)
        .unwrap_or_default();
    let delivered = if resolution.delivery.is_pod() {
        "; no Secret: the agent's pods fetch tokens from the token endpoint"
    } else {
        ""
    };
    format!(
        "token {why} for {actor} on behalf of {}; expires at {expires_at}, renews at {renewal_at}{delivered}",
        resolution.principal.name
    )
}

/// Writes the token Secret without ever taking over a Secret someone else created: a Secret the cache
/// shows as ours is updated with its uid as a precondition, anything else is created. Returns the new
/// resourceVersion, or `None` when a foreign Secret holds the name.
pub(super) async fn write_token_secret(
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

//! The facts of a grant's decision that need more than the caches: who holds its Secret, and whether
//! the Secret still holds the token the status describes (read and verified only when the metadata
//! cache shows it changed); with Pod delivery, whether the token sealed in the status opens and is
//! the one the status describes. Called by the grant controller before it decides.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt, api::PartialObjectMeta};

use super::token_secret::{self, Ownership};
use crate::operator::{caches::context::Context, error::Result};
use crate::{
    api::{DelegationGrant, TokenStatus},
    delegation::{
        claims::{AccessTokenClaims, substance},
        decision::SecretHolder,
        delivery::Delivery,
        record::HeldToken,
        timing::SecretState,
    },
    sealing::GrantId,
    signing,
};

/// What holds the grant's current token: its Secret, or with Pod delivery its sealed copy.
pub async fn token_holder(
    grant: &DelegationGrant,
    ctx: &Context,
    delivery: Delivery,
) -> Result<SecretHolder> {
    if delivery.is_pod() {
        return Ok(SecretHolder::Ours(sealed_state(ctx, grant).await));
    }
    secret_holder(grant, ctx).await
}

/// Whether the status's sealed token opens for this grant (under a key still held), is exactly the
/// token the status describes (its id, expiry and signature), and is one the operator recorded
/// minting that is VALID in its status list. The status is anyone's to write: an older sealed token
/// of the same grant put back with its old status (revoked when it was replaced) is `Changed` too,
/// and the grant gets a new token.
async fn sealed_state(ctx: &Context, grant: &DelegationGrant) -> SecretState {
    let status = grant.status.as_ref();
    let (Some(token), Some(sealed)) = (
        status.and_then(|s| s.token.as_ref()),
        status.and_then(|s| s.sealed_token.as_deref()),
    ) else {
        return SecretState::Missing;
    };
    let Some(opened) = ctx.keys.open(GrantId::of(grant), sealed) else {
        return SecretState::Changed;
    };
    let uid = grant.uid().unwrap_or_default();
    let now = crate::operator::now().as_second();
    if !ctx.status_lists.is_current(&uid, &token.id, now).await {
        return SecretState::Changed;
    }
    let Ok(jwks) = ctx.keys.jwks() else {
        return SecretState::Changed;
    };
    let verified = signing::verify(&opened, &jwks, &grant.spec.audience, 0)
        .ok()
        .filter(|claims| {
            claims["jti"].as_str() == Some(token.id.as_str())
                && claims["exp"].as_i64() == Some(token.expires_at.0.as_second())
        });
    match verified {
        Some(claims) => {
            remember_verified(ctx, grant, claims);
            SecretState::Intact
        }
        None => SecretState::Changed,
    }
}

/// Who holds the grant's Secret and, when it is ours or absent, what it holds.
pub async fn secret_holder(grant: &DelegationGrant, ctx: &Context) -> Result<SecretHolder> {
    let namespace = grant.namespace().unwrap_or_default();
    let secret_name = grant.spec.secret_name_or_default(&grant.name_any());
    let cached = ctx.cached_secret(&namespace, &secret_name);
    if token_secret::ownership(cached.as_ref(), grant) == Ownership::Foreign {
        return Ok(SecretHolder::Foreign);
    }
    let token = grant.status.as_ref().and_then(|s| s.token.as_ref());
    let state = secret_state(ctx, grant, &secret_name, cached.as_ref(), token).await?;
    Ok(SecretHolder::Ours(state))
}

/// Whether the Secret still holds the token the status describes. The metadata cache tells us when
/// it changed; only then is the Secret read (once) and its token verified.
pub(super) async fn secret_state(
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
    remember_verified(ctx, grant, claims);
    ctx.remember_trusted_secret(&namespace, secret_name, rv);
    Ok(SecretState::Intact)
}

/// What a verified token of the grant grants, from its claims: the operator's own knowledge from now on.
fn remember_verified(ctx: &Context, grant: &DelegationGrant, claims: serde_json::Value) {
    if let Ok(claims) = serde_json::from_value::<AccessTokenClaims>(claims) {
        let held = HeldToken {
            substance: substance(&claims),
            expires_at: claims.exp,
            approved_by: claims
                .delegation_chain
                .last()
                .and_then(|hop| hop.approved_by.as_deref())
                .map(Into::into),
            confirmed_for: None,
        };
        ctx.remember_token(grant, held, false);
    }
}

//! The orphan sweep: a token Secret whose grant is gone (deleted while its finalizer was forced off,
//! or re-created under the same name) still holds a token that verifies. It is found from the
//! Secrets cache, proven ours by verifying the token it holds against our own keys, revoked, and
//! deleted.

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use futures::StreamExt;
use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{Api, runtime::reflector::ObjectRef};

use crate::operator::{
    caches::context::Context,
    error::Result,
    grants::token_secret::{self, TOKEN_KEY},
    now,
    reporting::audit::{self, AuditAction, AuditRecord},
};
use crate::{
    api::DelegationGrant, delegation::claims::GRANT_CLAIM, signing, status_list::TokenStatusRef,
};

/// Why an orphaned token is revoked, in the audit trail.
const ORPHANED: &str = "Orphaned";

/// What to look at.
pub enum Sweep {
    /// A token Secret, `(namespace, name)`: does its grant still exist?
    Secret(String, String),
    /// A grant that was deleted: did it go without its finalizer (so its tokens were not revoked)?
    Grant {
        namespace: String,
        name: String,
        uid: String,
    },
}

/// Sweeps everything sent on `items` once the caches are in. Runs on the leader only.
pub async fn run(ctx: Arc<Context>, items: futures::channel::mpsc::UnboundedReceiver<Sweep>) {
    if !ctx.caches_ready().await {
        return;
    }
    items
        .for_each(|item| {
            let ctx = ctx.clone();
            async move {
                let (what, swept) = match &item {
                    Sweep::Secret(namespace, name) => (name.clone(), sweep(&ctx, namespace, name).await),
                    Sweep::Grant { namespace, name, uid } => {
                        (name.clone(), sweep_grant(&ctx, namespace, name, uid).await)
                    }
                };
                if let Err(e) = swept {
                    tracing::warn!(object = what, error = %e, "orphan sweep failed; retried on the next change");
                }
            }
        })
        .await;
}

/// A grant gone without its finalizer having run (forced off): whatever the operator recorded
/// minting for its uid is revoked from that record alone — its Secret may have lost the label that
/// puts it in the cache, so the Secret cannot be relied on.
async fn sweep_grant(ctx: &Context, namespace: &str, name: &str, uid: &str) -> Result<()> {
    let live = ctx
        .grants
        .get(&ObjectRef::<DelegationGrant>::new(name).within(namespace));
    if live.is_some_and(|g| g.metadata.uid.as_deref() == Some(uid)) {
        return Ok(());
    }
    let now = now();
    let recorded = ctx.status_lists.recorded(uid, now.as_second()).await;
    if recorded.is_empty() {
        return Ok(());
    }
    ctx.status_lists
        .revoke_grant(&ctx.keys, uid, &[], &[], now.as_second())
        .await?;
    let ids: Vec<&str> = recorded.iter().map(|(jti, _)| jti.as_str()).collect();
    audit::record(&AuditRecord {
        time: now.to_string(),
        action: AuditAction::Revoked,
        namespace,
        grant: name,
        reason: ORPHANED,
        message: "the grant was deleted without its finalizer; the tokens minted for it are revoked",
        principal: None,
        requester: None,
        authors: None,
        chain: Vec::new(),
        scopes: None,
        audience: None,
        token_ids: ids,
        expires_at: None,
        status_list: None,
    });
    Ok(())
}

/// The grant a token Secret names as its controller, as `(name, uid)`.
fn owner(secret: &kube::api::PartialObjectMeta<Secret>) -> Option<(String, String)> {
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true) && r.kind == "DelegationGrant")
        .map(|r| (r.name.clone(), r.uid.clone()))
}

async fn sweep(ctx: &Context, namespace: &str, name: &str) -> Result<()> {
    let Some(cached) = ctx.cached_secret(namespace, name) else {
        return Ok(());
    };
    let Some((grant_name, grant_uid)) = owner(&cached) else {
        return Ok(());
    };
    let live = ctx
        .grants
        .get(&ObjectRef::<DelegationGrant>::new(&grant_name).within(namespace));
    if live.is_some_and(|g| g.metadata.uid.as_deref() == Some(grant_uid.as_str())) {
        return Ok(());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(secret) = api.get_opt(name).await? else {
        return Ok(());
    };
    let Some(claims) = our_token(ctx, &secret, u64::MAX)? else {
        // Not a token we can prove we minted: not ours to touch.
        tracing::debug!(
            namespace,
            secret = name,
            "labelled Secret without a token of ours"
        );
        return Ok(());
    };
    // The token must name this very Secret's grant — namespace, name and uid — or a tenant could
    // wrap another grant's (old) token in a look-alike Secret to revoke that grant's live tokens.
    let named = &claims["delegation.nhi.dev/grant"];
    if named["uid"] != grant_uid.as_str()
        || named["namespace"] != namespace
        || named["name"] != grant_name.as_str()
    {
        return Ok(());
    }
    let now = now();
    let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
    let exp = claims["exp"].as_i64().unwrap_or(i64::MAX);
    // Its status-list entry (from its verified claims) and whatever else the operator minted for
    // that grant uid and still holds on record — before the delete: fail closed.
    let verified: Vec<_> = TokenStatusRef::from_status_claim(&claims["status"])
        .filter(|_| exp > now.as_second())
        .into_iter()
        .collect();
    ctx.status_lists
        .revoke_grant(&ctx.keys, &grant_uid, &[], &verified, now.as_second())
        .await?;
    token_secret::delete(&api, name, secret.metadata.uid.clone()).await?;
    ctx.forget_secret(namespace, name);
    audit::record(&AuditRecord {
        time: now.to_string(),
        action: AuditAction::Revoked,
        namespace,
        grant: &grant_name,
        reason: ORPHANED,
        message: "the token's Secret outlived its grant; the token is revoked and the Secret deleted",
        principal: claims["sub"]
            .as_str()
            .map(crate::delegation::claims::principal_name),
        requester: None,
        authors: None,
        chain: Vec::new(),
        scopes: None,
        audience: claims["aud"].as_str(),
        token_ids: vec![jti.as_str()],
        expires_at: Timestamp::from_second(exp).ok().map(|t| t.to_string()),
        status_list: None,
    });
    Ok(())
}

/// The claims of the token in a Secret, if its signature verifies against our keys (within
/// `leeway_secs` of its expiry) and it names a grant: a token we minted, whatever anyone wrote around it.
pub fn our_token(
    ctx: &Context,
    secret: &Secret,
    leeway_secs: u64,
) -> Result<Option<serde_json::Value>> {
    let Some(token) = secret
        .data
        .as_ref()
        .and_then(|d| d.get(TOKEN_KEY))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
    else {
        return Ok(None);
    };
    // The audience is only known from the token itself; the signature is what proves it ours.
    let Some(audience) = unverified_audience(token) else {
        return Ok(None);
    };
    let jwks = ctx.keys.jwks()?;
    Ok(signing::verify(token, &jwks, &audience, leeway_secs)
        .ok()
        .filter(|claims| claims.get(GRANT_CLAIM).is_some()))
}

fn unverified_audience(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["aud"].as_str().map(str::to_owned)
}

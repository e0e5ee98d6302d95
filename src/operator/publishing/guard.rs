//! The guard over what verifiers trust: the JWKS, the status lists (their ConfigMap, state Secret
//! and record shards) and the keys Secret are watched (metadata only) and put back when someone
//! edits or deletes them; a key revocation asked for on the keys Secret is carried out here. Run by
//! the leader (`operator::run`).

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client,
    api::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};

use super::{keys, status_lists};
use crate::operator::{Context, MANAGED_BY, MANAGED_BY_LABEL, Result, error, now};

/// Watches what verifiers trust — the JWKS, the status lists (and their state Secret and record
/// shards), the keys Secret — and puts each back
/// when someone edits or deletes it. Metadata only; an event costs one read of that one object,
/// except when it shows a version the operator itself just wrote (of the status-list state, the keys
/// Secret or the JWKS): that is never "restored" over.
pub async fn guard_published_artifacts(ctx: Arc<Context>) {
    let namespace = ctx.settings.operator_namespace.clone();
    let configmaps: Api<PartialObjectMeta<ConfigMap>> =
        Api::namespaced(ctx.client.clone(), &namespace);
    let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(ctx.client.clone(), &namespace);
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    // Tagged with their kind: the status lists' ConfigMap and state Secret share a name.
    let changed = futures::stream::select(
        watcher(configmaps, ours.clone())
            .default_backoff()
            .flat_map(|e| futures::stream::iter(touched_names(e)))
            .map(|(name, seen)| (false, name, seen)),
        watcher(secrets, ours)
            .default_backoff()
            .flat_map(|e| futures::stream::iter(touched_names(e)))
            .map(|(name, seen)| (true, name, seen)),
    );
    changed
        .for_each(|(secret, name, seen)| {
            let ctx = ctx.clone();
            async move {
                let restored = match (secret, name.as_str()) {
                    (true, keys::KEYS_SECRET_NAME) => {
                        revoke_requested_keys(&ctx, seen.as_deref()).await
                    }
                    (false, keys::JWKS_CONFIGMAP_NAME) => {
                        let seen = seen.as_deref().map(|rv| (keys::KeysObject::Jwks, rv));
                        ctx.keys.restore(seen).await
                    }
                    (false, status_lists::CONFIGMAP_NAME) => {
                        ctx.status_lists.restore_published().await
                    }
                    (true, name)
                        if name == status_lists::SECRET_NAME
                            || name.starts_with(status_lists::SHARD_PREFIX) =>
                    {
                        ctx.status_lists.restore_state(name, seen.as_deref()).await
                    }
                    _ => Ok(()),
                };
                if let Err(e) = restored {
                    tracing::warn!(object = name, error = %e, "could not restore a published artifact; retried on its next change");
                }
            }
        })
        .await;
}

/// The ConfigMap of revoked token ids that versions before the Token Status Lists kept.
const LEGACY_REVOCATIONS_CONFIGMAP: &str = "delegation-operator-revocations";

/// Deletes the list of revoked token ids that older versions kept: it is no longer written, and a
/// verifier still reading it would accept every token revoked since. Without it such a verifier
/// finds nothing and fails, rather than trusting a stale list. Best effort: nothing of today's
/// revocation depends on it, so a failure is reported, not fatal.
pub async fn remove_legacy_revocation_list(client: &Client, namespace: &str) {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match configmaps
        .delete(LEGACY_REVOCATIONS_CONFIGMAP, &Default::default())
        .await
    {
        Ok(_) => tracing::info!(
            configmap = LEGACY_REVOCATIONS_CONFIGMAP,
            "deleted the list of revoked token ids older versions kept; revocation is in the Token Status Lists"
        ),
        Err(e) if error::is_not_found(&e) => {}
        Err(e) => tracing::warn!(
            configmap = LEGACY_REVOCATIONS_CONFIGMAP,
            error = %e,
            "could not delete the list of revoked token ids older versions kept; it is no longer updated, delete it by hand"
        ),
    }
}

/// Carries out `delegation-operator keys revoke` (an annotation on the keys Secret), wakes every grant
/// whose token a revoked key signed, and puts the Secret back to the keys held. `seen` is the
/// resourceVersion the watch showed (`None` for a deletion or a re-list).
async fn revoke_requested_keys(ctx: &Context, seen: Option<&str>) -> Result<()> {
    // Our own write coming back: it replaced the Secret whole, so it carries no request either.
    if seen.is_some_and(|rv| ctx.keys.wrote(keys::KeysObject::Secret, rv)) {
        return Ok(());
    }
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &ctx.settings.operator_namespace);
    let requested: Vec<String> = secrets
        .get_metadata_opt(keys::KEYS_SECRET_NAME)
        .await?
        .and_then(|s| s.metadata.annotations)
        .and_then(|a| a.get(keys::REVOKE_KEYS_ANNOTATION).cloned())
        .map(|v| {
            v.split(',')
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if !requested.is_empty() && !ctx.keys.revoke(&requested, now()).await?.is_empty() {
        // Status List Tokens the revoked key signed no longer verify: re-sign them at once.
        ctx.status_lists
            .maintain(&ctx.keys, now().as_second())
            .await?;
        for grant in ctx.grants.summaries() {
            if grant
                .token_key_id
                .as_deref()
                .is_some_and(|kid| !ctx.keys.is_published(kid))
            {
                let _ = ctx.wake_grant.unbounded_send(grant.object_ref());
            }
        }
    }
    ctx.keys
        .restore(seen.map(|rv| (keys::KeysObject::Secret, rv)))
        .await
}

/// The names a watch event concerns; the end of a (re-)list checks everything once.
fn touched_names<K: kube::Resource>(
    event: std::result::Result<watcher::Event<K>, watcher::Error>,
) -> Vec<(String, Option<String>)> {
    match event {
        Ok(watcher::Event::Apply(obj)) => {
            let meta = obj.meta();
            vec![(
                meta.name.clone().unwrap_or_default(),
                meta.resource_version.clone(),
            )]
        }
        Ok(watcher::Event::Delete(obj)) => {
            vec![(obj.meta().name.clone().unwrap_or_default(), None)]
        }
        Ok(watcher::Event::InitDone) => [
            keys::JWKS_CONFIGMAP_NAME,
            keys::KEYS_SECRET_NAME,
            status_lists::CONFIGMAP_NAME,
        ]
        .map(|name| (name.to_owned(), None))
        .to_vec(),
        _ => Vec::new(),
    }
}

//! What the verification endpoints serve, kept here from watches of the operator namespace: the JWKS,
//! derived from the signing keys Secret itself (not from the published ConfigMap, which anyone with
//! ConfigMap rights there could edit until the leader restores it), and the Status List Tokens the
//! leader publishes in a ConfigMap (signed: a forged list does not verify). Every replica — leader or
//! standby — serves the same documents; the leader alone writes them.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::Value;

use crate::operator::{
    publishing::keys::{KEYS_SECRET_NAME, jwks_of_secret},
    publishing::status_lists,
};

#[derive(Debug, Default)]
struct Documents {
    jwks: Option<Value>,
    /// Status List Tokens by ConfigMap key (`<serial>.jwt`).
    lists: BTreeMap<String, String>,
}

/// The latest published JWKS and Status List Tokens.
#[derive(Debug, Default)]
pub struct Published(RwLock<Documents>);

impl Published {
    /// The JWKS, once the leader has published one.
    pub fn jwks(&self) -> Option<Value> {
        self.0.read().ok().and_then(|d| d.jwks.clone())
    }

    /// The published Status List Tokens by ConfigMap key.
    pub fn lists(&self) -> BTreeMap<String, String> {
        self.0.read().map(|d| d.lists.clone()).unwrap_or_default()
    }

    /// The Status List Token published under `key`, if any.
    pub fn list(&self, key: &str) -> Option<String> {
        self.0.read().ok().and_then(|d| d.lists.get(key).cloned())
    }

    pub fn is_loaded(&self) -> bool {
        self.0.read().is_ok_and(|d| d.jwks.is_some())
    }

    fn apply_lists(&self, cm: &ConfigMap) {
        if cm.name_any() != status_lists::CONFIGMAP_NAME {
            return;
        }
        if let Ok(mut docs) = self.0.write() {
            docs.lists = cm.data.clone().unwrap_or_default();
        }
    }

    fn apply_keys(&self, secret: &Secret) {
        match jwks_of_secret(secret) {
            Ok(jwks) => {
                if let Ok(mut docs) = self.0.write() {
                    docs.jwks = Some(jwks);
                }
            }
            // A broken edit: keep serving the last good keys until the leader restores the Secret.
            Err(problem) => tracing::warn!(
                secret = KEYS_SECRET_NAME,
                %problem,
                "the signing keys Secret is unreadable; serving the previous JWKS"
            ),
        }
    }
}

/// Keeps `published` in step with the keys Secret and the status-list ConfigMap for as long as it runs.
pub async fn watch(client: Client, namespace: String, published: Arc<Published>) {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);
    let lists = watcher(
        configmaps,
        watcher::Config::default()
            .fields(&format!("metadata.name={}", status_lists::CONFIGMAP_NAME)),
    )
    .default_backoff()
    .applied_objects()
    .for_each(|cm| {
        match cm {
            Ok(cm) => published.apply_lists(&cm),
            Err(e) => {
                tracing::warn!(error = %e, "watch of the published status lists failed; retrying")
            }
        }
        futures::future::ready(())
    });
    let keys = watcher(
        secrets,
        watcher::Config::default().fields(&format!("metadata.name={KEYS_SECRET_NAME}")),
    )
    .default_backoff()
    .applied_objects()
    .for_each(|secret| {
        match secret {
            Ok(secret) => published.apply_keys(&secret),
            Err(e) => tracing::warn!(error = %e, "watch of the signing keys failed; retrying"),
        }
        futures::future::ready(())
    });
    futures::future::join(lists, keys).await;
}

//! What the verification endpoints serve: the JWKS and the Status List Tokens the leader publishes in
//! ConfigMaps in the operator namespace, kept here from a watch. Every replica — leader or standby —
//! serves the same published documents; the leader alone writes them (and puts them back when they
//! are edited by hand).

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::Value;

use crate::operator::{
    MANAGED_BY, MANAGED_BY_LABEL,
    keys::{JWKS_CONFIGMAP_NAME, JWKS_DATA_KEY},
    status_lists,
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

    fn apply(&self, cm: &ConfigMap) {
        let Ok(mut docs) = self.0.write() else {
            return;
        };
        let data = cm.data.clone().unwrap_or_default();
        match cm.name_any().as_str() {
            JWKS_CONFIGMAP_NAME => {
                match data
                    .get(JWKS_DATA_KEY)
                    .and_then(|j| serde_json::from_str::<Value>(j).ok())
                    .filter(|j| j.get("keys").is_some_and(Value::is_array))
                {
                    Some(jwks) => docs.jwks = Some(jwks),
                    // A broken edit: keep serving the last good set until the leader restores it.
                    None => tracing::warn!(
                        configmap = JWKS_CONFIGMAP_NAME,
                        "the published JWKS is unreadable; serving the previous one"
                    ),
                }
            }
            status_lists::CONFIGMAP_NAME => docs.lists = data,
            _ => {}
        }
    }
}

/// Keeps `published` in step with the ConfigMaps for as long as it runs.
pub async fn watch(client: Client, namespace: String, published: Arc<Published>) {
    let configmaps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    watcher(configmaps, ours)
        .default_backoff()
        .applied_objects()
        .for_each(|cm| {
            match cm {
                Ok(cm) => published.apply(&cm),
                Err(e) => tracing::warn!(error = %e, "watch of the published JWKS and status lists failed; retrying"),
            }
            futures::future::ready(())
        })
        .await;
}

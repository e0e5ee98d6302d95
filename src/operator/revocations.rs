//! The revocation list: every revoked token id, kept in a ConfigMap in the operator namespace until
//! the token would have expired anyway, so that verifiers can refuse tokens before their `exp`.

use k8s_openapi::{api::core::v1::ConfigMap, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{
    FIELD_MANAGER,
    error::{Error, Result},
};

pub const CONFIGMAP_NAME: &str = "delegation-operator-revocations";
pub const DATA_KEY: &str = "revocations.json";

/// One revoked token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub jti: String,
    /// Unix seconds: when the token expires; the entry is pruned after that.
    pub exp: i64,
    /// `<namespace>/<name>` of the grant.
    pub grant: String,
    pub reason: String,
    /// RFC 3339 time of the revocation.
    pub time: String,
}

/// The list, mirrored in memory and written through to its ConfigMap. One writer (the leader).
///
/// Writes are group-committed like the status lists': an addition is made in memory (never locked
/// across a request), then waits until a write that began after it succeeded. Concurrent
/// revocations share one write instead of queueing one rewrite of the whole ConfigMap each.
pub struct RevocationList {
    api: Api<ConfigMap>,
    inner: Mutex<Entries>,
    /// The version the last successful write carried; locked for the whole of a write.
    written: Mutex<u64>,
}

struct Entries {
    /// By token id: adding one is a map insert, whatever the size of the list.
    by_jti: BTreeMap<String, Revocation>,
    /// Bumped by every addition.
    version: u64,
    /// The JSON last written to the ConfigMap (what `restore` puts back).
    text: String,
}

impl Entries {
    /// Adds the live entries not listed yet (a token already listed, or already expired, is not
    /// added again). Returns the version that must be written for them to count.
    fn add(&mut self, new: Vec<Revocation>, now: i64) -> u64 {
        let before = self.by_jti.len();
        for r in new {
            if r.exp > now && !self.by_jti.contains_key(&r.jti) {
                self.by_jti.insert(r.jti.clone(), r);
            }
        }
        if self.by_jti.len() != before {
            self.version += 1;
        }
        self.version
    }

    /// Drops expired entries (the token is dead anyway) and returns the list as it is published.
    fn pruned_json(&mut self, now: i64) -> serde_json::Result<String> {
        self.by_jti.retain(|_, e| e.exp > now);
        serde_json::to_string(&self.by_jti.values().collect::<Vec<_>>())
    }
}

impl RevocationList {
    /// Loads the list from its ConfigMap (absent means empty).
    pub async fn load(client: Client, namespace: &str) -> Result<Self> {
        let api: Api<ConfigMap> = Api::namespaced(client, namespace);
        let existing = api.get_opt(CONFIGMAP_NAME).await?;
        let missing = existing.is_none();
        let entries = match existing {
            Some(cm) => parse(&cm).map_err(|e| {
                Error::InvalidState(format!(
                    "ConfigMap {namespace}/{CONFIGMAP_NAME} key {DATA_KEY} is unreadable ({e}); refusing to start rather than forget revocations"
                ))
            })?,
            None => Vec::new(),
        };
        let text = serde_json::to_string(&entries)?;
        let list = Self {
            api,
            inner: Mutex::new(Entries {
                by_jti: entries.into_iter().map(|e| (e.jti.clone(), e)).collect(),
                version: 0,
                text: text.clone(),
            }),
            written: Mutex::new(0),
        };
        if missing {
            // Published from the start, so verifiers can rely on it existing.
            list.write(&text).await?;
        }
        Ok(list)
    }

    /// Records revocations and returns once they are written (with the next group of them).
    /// Expired entries (the token is dead anyway) are pruned when the list is written.
    pub async fn add(&self, new: Vec<Revocation>, now: Timestamp) -> Result<()> {
        let version = self.inner.lock().await.add(new, now.as_second());
        let mut written = self.written.lock().await;
        if *written >= version {
            return Ok(());
        }
        let (text, version) = {
            let mut inner = self.inner.lock().await;
            (inner.pruned_json(now.as_second())?, inner.version)
        };
        if text != self.inner.lock().await.text {
            self.write(&text).await?;
            self.inner.lock().await.text = text;
        }
        *written = version;
        Ok(())
    }

    /// Puts the published list back to what this operator last wrote, when someone edited or
    /// deleted it (erasing a revocation would make a revoked token pass). Writes nothing when it is
    /// intact.
    pub async fn restore(&self) -> Result<()> {
        let _writing = self.written.lock().await;
        let text = self.inner.lock().await.text.clone();
        let published = self.api.get_opt(CONFIGMAP_NAME).await?;
        let intact = published.as_ref().is_some_and(|cm| {
            cm.data.as_ref().and_then(|d| d.get(DATA_KEY)) == Some(&text)
                && cm.data.as_ref().is_some_and(|d| d.len() == 1)
        });
        if !intact {
            tracing::warn!("the published revocation list was edited or deleted; restoring it");
            super::keys::overwrite(&self.api, published, desired(&text)).await?;
        }
        Ok(())
    }

    async fn write(&self, text: &str) -> Result<()> {
        let cm = desired(text);
        let mut value = serde_json::to_value(&cm)?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "ConfigMap".into();
        self.api
            .patch(
                CONFIGMAP_NAME,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await?;
        Ok(())
    }
}

/// The revocation ConfigMap holding exactly `text` (the JSON list of entries).
fn desired(text: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP_NAME.into()),
            labels: Some(super::managed_labels()),
            ..Default::default()
        },
        data: Some([(DATA_KEY.to_owned(), text.to_owned())].into()),
        ..Default::default()
    }
}

/// The entries of a revocation ConfigMap.
pub fn parse(cm: &ConfigMap) -> serde_json::Result<Vec<Revocation>> {
    match cm.data.as_ref().and_then(|d| d.get(DATA_KEY)) {
        Some(text) => serde_json::from_str(text),
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(jti: &str, exp: i64) -> Revocation {
        Revocation {
            jti: jti.into(),
            exp,
            grant: "ns/g".into(),
            reason: "Deleted".into(),
            time: "t".into(),
        }
    }

    fn entries(list: Vec<Revocation>) -> Entries {
        Entries {
            by_jti: list.into_iter().map(|e| (e.jti.clone(), e)).collect(),
            version: 0,
            text: String::new(),
        }
    }

    #[test]
    fn expired_entries_are_pruned_and_new_ones_added_once() {
        let mut list = entries(vec![entry("old", 999), entry("live", 2000)]);
        let version = list.add(
            vec![entry("live", 2000), entry("new", 1500), entry("dead", 1000)],
            1000,
        );
        assert_eq!(version, 1, "one addition, one version to write");
        let written: Vec<Revocation> =
            serde_json::from_str(&list.pruned_json(1000).unwrap()).unwrap();
        let ids: Vec<_> = written.iter().map(|e| e.jti.as_str()).collect();
        assert_eq!(ids, ["live", "new"]);
    }

    #[test]
    fn nothing_new_needs_no_write() {
        let mut list = entries(vec![entry("live", 2000)]);
        assert_eq!(list.add(vec![entry("live", 2000)], 1000), 0);
        assert_eq!(list.add(vec![entry("dead", 900)], 1000), 0);
    }
}

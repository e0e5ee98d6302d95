//! The revocation list: every revoked token id, kept in a ConfigMap in the operator namespace until
//! the token would have expired anyway, so that verifiers can refuse tokens before their `exp`.

use k8s_openapi::{api::core::v1::ConfigMap, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
};
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

/// The list, mirrored in memory and written through to its ConfigMap. One writer (this process), so a
/// mutex around read-modify-write is enough.
pub struct RevocationList {
    api: Api<ConfigMap>,
    entries: Mutex<Vec<Revocation>>,
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
        let list = Self {
            api,
            entries: Mutex::new(entries),
        };
        if missing {
            // Published from the start, so verifiers can rely on it existing.
            list.write(&[]).await?;
        }
        Ok(list)
    }

    /// Records revocations (before the token's Secret is deleted: fail closed) and prunes expired entries.
    pub async fn add(&self, new: Vec<Revocation>, now: Timestamp) -> Result<()> {
        let mut entries = self.entries.lock().await;
        let next = merged(&entries, new, now);
        if next != *entries {
            self.write(&next).await?;
            *entries = next;
        }
        Ok(())
    }

    /// Puts the published list back to what this operator recorded, when someone edited or deleted
    /// it (erasing a revocation would make a revoked token pass). Writes nothing when it is intact.
    pub async fn restore(&self) -> Result<()> {
        let entries = self.entries.lock().await;
        let published = self.api.get_opt(CONFIGMAP_NAME).await?;
        let intact = published.as_ref().is_some_and(|cm| {
            cm.data.as_ref().and_then(|d| d.get(DATA_KEY))
                == Some(&serde_json::to_string(&*entries).unwrap_or_default())
                && cm.data.as_ref().is_some_and(|d| d.len() == 1)
        });
        if !intact {
            tracing::warn!("the published revocation list was edited or deleted; restoring it");
            super::keys::overwrite(&self.api, published, desired(&entries)?).await?;
        }
        Ok(())
    }

    async fn write(&self, entries: &[Revocation]) -> Result<()> {
        let cm = desired(entries)?;
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

/// The revocation ConfigMap holding exactly `entries`.
fn desired(entries: &[Revocation]) -> Result<ConfigMap> {
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP_NAME.into()),
            labels: Some(super::managed_labels()),
            ..Default::default()
        },
        data: Some([(DATA_KEY.to_owned(), serde_json::to_string(entries)?)].into()),
        ..Default::default()
    })
}

/// The entries of a revocation ConfigMap.
pub fn parse(cm: &ConfigMap) -> serde_json::Result<Vec<Revocation>> {
    match cm.data.as_ref().and_then(|d| d.get(DATA_KEY)) {
        Some(text) => serde_json::from_str(text),
        None => Ok(Vec::new()),
    }
}

/// The list after adding `new`: expired entries (the token is dead anyway) are pruned, and a token
/// already listed, or already expired, is not added again.
pub fn merged(current: &[Revocation], new: Vec<Revocation>, now: Timestamp) -> Vec<Revocation> {
    let now = now.as_second();
    let mut next: Vec<Revocation> = current.iter().filter(|e| e.exp > now).cloned().collect();
    for r in new {
        if r.exp > now && !next.iter().any(|e| e.jti == r.jti) {
            next.push(r);
        }
    }
    next
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

    #[test]
    fn expired_entries_are_pruned_and_new_ones_added_once() {
        let now = Timestamp::from_second(1000).unwrap();
        let current = vec![entry("old", 999), entry("live", 2000)];
        let next = merged(
            &current,
            vec![entry("live", 2000), entry("new", 1500), entry("dead", 1000)],
            now,
        );
        let ids: Vec<_> = next.iter().map(|e| e.jti.as_str()).collect();
        assert_eq!(ids, ["live", "new"]);
    }

    #[test]
    fn nothing_new_leaves_the_list_as_it_is() {
        let now = Timestamp::from_second(1000).unwrap();
        let current = vec![entry("live", 2000)];
        assert_eq!(merged(&current, vec![entry("live", 2000)], now), current);
    }
}

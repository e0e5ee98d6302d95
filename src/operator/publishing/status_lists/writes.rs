//! The status lists' writes: the group-committed flush of the state and shard Secrets and the
//! published ConfigMap (each at the version last written, fenced before undoing someone else's),
//! the guard's restores, and signing and adopting Status List Tokens.

use std::{collections::BTreeMap, num::NonZeroU64};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::Value;

use crate::operator::{
    FIELD_MANAGER,
    error::{Error, Result},
    managed_labels,
    publishing::keys::{KeyStore, overwrite},
};
use crate::status_list::{STATUS_LIST_TYP, StatusList, status_list_claims};

use super::{records::*, *};

impl StatusLists {
    /// Puts the published lists back when someone edited or deleted them (an erased revocation would
    /// make a revoked token pass). Writes nothing when they are intact.
    pub async fn restore_published(&self) -> Result<()> {
        // No flush in flight: what is put back is what was last written, and nothing newer follows.
        let _flushing = self.flushed.lock().await;
        let inner = self.inner.lock().await;
        let current = self.configmaps.get_opt(CONFIGMAP_NAME).await?;
        let desired = published_data(&inner.published);
        if !holds(current.as_ref(), &desired) {
            tracing::warn!("the published status lists were edited or deleted; restoring them");
            overwrite(
                &self.configmaps,
                current,
                desired_configmap(desired),
                &self.fence,
            )
            .await?;
        }
        Ok(())
    }

    /// Puts the state Secret or a shard Secret (by name) back when someone edited or deleted it.
    /// `seen` is the resourceVersion the watch showed (`None` for a deletion): one of our own
    /// latest writes needs no read, and does not hold up the next flush.
    pub async fn restore_state(&self, name: &str, seen: Option<&str>) -> Result<()> {
        if seen.is_some_and(|rv| self.wrote_version(name, rv)) {
            return Ok(());
        }
        let _flushing = self.flushed.lock().await;
        // The watch can show our write before the flush that made it has noted its version: that
        // flush has finished now that we hold the lock.
        if seen.is_some_and(|rv| self.wrote_version(name, rv)) {
            return Ok(());
        }
        let desired = {
            let inner = self.inner.lock().await;
            if name == SECRET_NAME {
                if inner.written.is_empty() {
                    return Ok(());
                }
                desired_secret(&inner.written)
            } else {
                let Some(shard) = shard_number(name) else {
                    return Ok(());
                };
                if inner.shards_written[shard].is_empty() {
                    return Ok(());
                }
                shard_secret(shard, &inner.shards_written[shard])
            }
        };
        // Not under the records' lock: issuances and revocations go on meanwhile (what they change
        // waits for the next flush, which waits for this restore).
        let current = self.secrets.get_opt(name).await?;
        if current.as_ref().and_then(|s| s.data.as_ref()) != desired.data.as_ref() {
            tracing::warn!(
                secret = name,
                "a status-list state Secret was edited or deleted; restoring it"
            );
            let written = overwrite(&self.secrets, current, desired, &self.fence).await?;
            self.remember_version(name, written.metadata.resource_version);
        }
        Ok(())
    }

    pub(super) fn remember_version(&self, name: &str, version: Option<String>) {
        if let (Some(version), Ok(mut own)) = (version, self.own_versions.lock()) {
            let versions = own.entry(name.to_owned()).or_default();
            if versions.len() == OWN_VERSIONS_KEPT {
                versions.pop_front();
            }
            versions.push_back(version);
        }
    }

    /// The resourceVersion of our latest write of `name`.
    pub(super) fn last_version(&self, name: &str) -> Option<String> {
        self.own_versions
            .lock()
            .ok()?
            .get(name)
            .and_then(|v| v.back().cloned())
    }

    pub(super) fn wrote_version(&self, name: &str, version: &str) -> bool {
        self.own_versions.lock().is_ok_and(|own| {
            own.get(name)
                .is_some_and(|v| v.iter().any(|w| w == version))
        })
    }

    /// Waits until `version` is written: by a flush already under way or queued before this
    /// caller, or by one this caller runs for everything changed so far.
    pub(super) async fn commit(&self, keys: &KeyStore, now: i64, version: u64) -> Result<()> {
        let mut flushed = self.flushed.lock().await;
        if *flushed >= version {
            return Ok(());
        }
        *flushed = self.flush(keys, now, false).await?;
        Ok(())
    }

    /// Writes everything changed in memory (the caller holds `flushed`): the changed shards and the
    /// registry state (all at once), then the Status List Tokens that need signing, so that no
    /// published list names an index whose record could be lost. Returns the version written. With
    /// `check`, the ConfigMap is compared with what it should hold even when nothing changed. What
    /// fails stays marked for the next flush.
    pub(super) async fn flush(&self, keys: &KeyStore, now: i64, check: bool) -> Result<u64> {
        let plan = self.inner.lock().await.plan(self, keys, now)?;
        let shard_writes = plan.shards.iter().map(|(shard, text)| async move {
            self.write_secret(&shard_name(*shard), shard_secret(*shard, text))
                .await
        });
        let state_write = async {
            match &plan.state {
                Some(state) => self.write_secret(SECRET_NAME, desired_secret(state)).await,
                None => Ok(()),
            }
        };
        let (results, state_written) =
            futures::join!(futures::future::join_all(shard_writes), state_write);
        let mut failed = None;
        {
            let mut inner = self.inner.lock().await;
            for ((shard, text), result) in plan.shards.iter().zip(results) {
                match result {
                    Ok(()) => inner.shards_written[*shard] = text.clone(),
                    Err(e) => {
                        inner.dirty.insert(*shard);
                        failed.get_or_insert(e);
                    }
                }
            }
            match (state_written, &plan.state) {
                (Ok(()), Some(state)) => inner.written = state.clone(),
                (Ok(()), None) => {}
                (Err(e), _) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if plan.publish || check {
            let known = match check {
                true => None,
                false => self.inner.lock().await.configmap_rv.clone(),
            };
            let rv = self
                .write_published(published_data(&plan.published), known)
                .await?;
            self.inner.lock().await.configmap_rv = rv;
        }
        self.inner.lock().await.published = plan.published;
        Ok(plan.version)
    }

    /// Makes the ConfigMap hold `data`: replaces version `known` directly when given, else (or when
    /// that version is gone: edited or deleted meanwhile) reads it and writes only if it differs.
    /// Returns the ConfigMap's resourceVersion afterwards.
    pub(super) async fn write_published(
        &self,
        data: BTreeMap<String, String>,
        known: Option<String>,
    ) -> Result<Option<String>> {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        if let Some(rv) = known {
            let mut desired = desired_configmap(data.clone());
            desired.metadata.resource_version = Some(rv);
            match self
                .configmaps
                .replace(CONFIGMAP_NAME, &params, &desired)
                .await
            {
                Ok(written) => return Ok(written.metadata.resource_version),
                Err(e)
                    if crate::operator::error::is_conflict(&e)
                        || crate::operator::error::is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let current = self.configmaps.get_opt(CONFIGMAP_NAME).await?;
        if holds(current.as_ref(), &data) {
            return Ok(current.and_then(|c| c.metadata.resource_version));
        }
        let written = overwrite(
            &self.configmaps,
            current,
            desired_configmap(data),
            &self.fence,
        )
        .await?;
        Ok(written.metadata.resource_version)
    }

    /// Writes one of the state Secrets: replaced at the version we last wrote (cheaper for the
    /// apiserver than an apply, about 1 ms of a 10 KB shard write), or, when we know none or
    /// someone else wrote it since (the guard restores such edits anyway), applied with force.
    pub(super) async fn write_secret(&self, name: &str, secret: Secret) -> Result<()> {
        if let Some(version) = self.last_version(name) {
            let mut desired = secret.clone();
            desired.metadata.resource_version = Some(version);
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match self.secrets.replace(name, &params, &desired).await {
                Ok(written) => {
                    self.remember_version(name, written.metadata.resource_version);
                    return Ok(());
                }
                // Someone else wrote it since (or deleted it): undo that only while we lead.
                Err(e)
                    if crate::operator::error::is_conflict(&e)
                        || crate::operator::error::is_not_found(&e) =>
                {
                    self.fence.check().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.apply_secret(name, secret).await
    }

    pub(super) async fn apply_secret(&self, name: &str, secret: Secret) -> Result<()> {
        let mut value = serde_json::to_value(secret)?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "Secret".into();
        let written = self
            .secrets
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await?;
        self.remember_version(name, written.metadata.resource_version);
        Ok(())
    }

    pub(super) fn sign(
        &self,
        keys: &KeyStore,
        uri: &str,
        list: &StatusList,
        claim: Value,
        now: i64,
    ) -> Result<Published> {
        let exp = now + LIST_TOKEN_LIFETIME_SECS;
        let mut claims =
            status_list_claims(uri, list, now, Some(exp), NonZeroU64::new(LIST_TTL_SECS));
        claims["iss"] = self.issuer.clone().into();
        let signed = keys.sign_typed(&claims, STATUS_LIST_TYP)?;
        Ok(Published {
            uri: uri.to_owned(),
            token: signed.token,
            claim,
            exp,
            kid: signed.key_id,
        })
    }

    /// The Status List Tokens already published for live lists that verify against our keys: a
    /// restart re-signs nothing that is still good.
    pub(super) async fn adopt_published(
        &self,
        inner: &Inner,
        keys: &KeyStore,
    ) -> Result<BTreeMap<String, Published>> {
        let Some(cm) = self.configmaps.get_opt(CONFIGMAP_NAME).await? else {
            return Ok(BTreeMap::new());
        };
        let jwks = keys.jwks()?;
        let data = cm.data.unwrap_or_default();
        Ok(inner
            .registry
            .lists()
            .filter_map(|(uri, _)| {
                let key = data_key(uri);
                let token = data.get(&key)?;
                verify_list_token(token, &jwks, uri).map(|p| (key, p))
            })
            .collect())
    }
}

/// Whether the ConfigMap exists and holds exactly `data` (the apiserver drops an empty map).
pub(super) fn holds(current: Option<&ConfigMap>, data: &BTreeMap<String, String>) -> bool {
    current.is_some_and(|cm| match cm.data.as_ref() {
        Some(held) => held == data,
        None => data.is_empty(),
    })
}

pub(super) fn published_data(published: &BTreeMap<String, Published>) -> BTreeMap<String, String> {
    published
        .iter()
        .map(|(k, p)| (k.clone(), p.token.clone()))
        .collect()
}

pub(super) fn desired_configmap(data: BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP_NAME.into()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

pub(super) fn desired_secret(state: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.into()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some([(STATE_KEY.to_owned(), ByteString(state.as_bytes().to_vec()))].into()),
        ..Default::default()
    }
}

pub(super) fn shard_secret(shard: usize, tokens: &str) -> Secret {
    let mut labels = managed_labels();
    labels.insert(SHARD_LABEL.into(), shard.to_string());
    Secret {
        metadata: ObjectMeta {
            name: Some(shard_name(shard)),
            labels: Some(labels),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [(
                TOKENS_KEY.to_owned(),
                ByteString(tokens.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    }
}

/// Reads every shard Secret (one list call). A shard that exists but cannot be read stops the start.
pub(super) async fn load_shards(
    secrets: &Api<Secret>,
    namespace: &str,
) -> Result<(TokenRecords, Vec<String>)> {
    let mut tokens = TokenRecords::default();
    let mut written = vec![String::new(); SHARDS];
    let listed = secrets
        .list(&kube::api::ListParams::default().labels(SHARD_LABEL))
        .await?;
    for secret in listed {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let Some(shard) = shard_number(&name) else {
            continue;
        };
        let text = secret
            .data
            .as_ref()
            .and_then(|d| d.get(TOKENS_KEY))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .unwrap_or_default();
        let records = serde_json::from_str(&text).map_err(|e| {
            Error::InvalidState(format!(
                "Secret {namespace}/{name} key {TOKENS_KEY} is unreadable ({e}); refusing to start rather than forget which status-list entries belong to which grant"
            ))
        })?;
        tokens.replace_shard(shard, records);
        written[shard] = text;
    }
    Ok((tokens, written))
}

/// A published Status List Token for `uri`, if its signature verifies against `jwks` (the header
/// `alg` must be the JWK's), its `typ` is `statuslist+jwt` and its `sub` is `uri`.
pub(super) fn verify_list_token(token: &str, jwks: &Value, uri: &str) -> Option<Published> {
    let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
    let claims = crate::signing::verify_status_list(token, jwks, uri).ok()?;
    Some(Published {
        uri: uri.to_owned(),
        token: token.to_owned(),
        claim: claims.get("status_list")?.clone(),
        exp: claims["exp"].as_i64()?,
        kid,
    })
}

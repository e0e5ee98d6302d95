//! The operator's IETF Token Status Lists (draft-ietf-oauth-status-list): the shell around the pure
//! [`crate::status_list::Registry`].
//!
//! - **State**: Secret `delegation-operator-status-lists` in the operator namespace, key
//!   `state.json`: the registry's [`RegistryState`] (serial counter, live lists with their reserved
//!   marks and statuses) and the lists' `baseUri` (`<issuer>/statuslists/<uid of that Secret>`, fixed
//!   when the Secret is created and stored beside the state so that it never changes). Beside it,
//!   [`SHARDS`] Secrets `delegation-operator-status-lists-tokens-NN` (key `tokens.json`) hold, by
//!   grant uid, the tokens the operator minted that may still be valid, as `[jti, exp, list
//!   serial, idx]`. New records go to the shard that is *open*, and the open shard moves on at
//!   every flush: the issuances written together share one small shard write, never the whole
//!   record (a whole-record rewrite per token filled etcd's quota at a few thousand grants), and
//!   the shards fill evenly. One grant's records may span shards; a revocation takes them from
//!   every shard. The
//!   Secrets are created when missing; an unreadable one stops the start (an empty registry would
//!   forget revocations and restart serials).
//! - **Publication**: ConfigMap `delegation-operator-status-lists`, one key `<serial>.jwt` per live
//!   list (the last segment of its uri), each a Status List Token (`typ: statuslist+jwt`) signed
//!   with the active signing key, with `sub` = the list's uri, `iss`, `iat`, `exp` (a day) and `ttl`.
//!   A list is re-signed when its statuses change, when less than half a day of its token is left,
//!   and when the signing key changed; the ConfigMap is written only when a token changed, and put
//!   back when someone edits or deletes it.
//! - **Which index a revocation may touch**: only indices this operator handed out for that very
//!   grant uid, as recorded at issuance in the state above (operator namespace, never written by a
//!   tenant), or read from a token whose signature verifies against our keys and whose grant claim
//!   names that uid. Nothing a tenant writes (status, annotations, Secret contents) adds an index:
//!   tenant-written token ids can at most choose which of the grant's *own* tokens is kept.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    num::NonZeroU64,
    time::Duration,
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::operator::{
    FIELD_MANAGER,
    error::{Error, Result},
    managed_labels,
    publishing::fence::Fence,
    publishing::keys::{KeyStore, overwrite},
};
use crate::status_list::{
    Registry, RegistryConfig, RegistryError, RegistryState, STATUS_LIST_TYP, StatusList,
    TokenStatusRef, status_list_claims,
};

pub const SECRET_NAME: &str = "delegation-operator-status-lists";
pub const STATE_KEY: &str = "state.json";
/// The per-grant token records are spread over this many Secrets. Every new record costs a write
/// of the whole shard it goes to, so many small shards (≈ 3 KB each at 10,000 grants) keep that
/// write small; their number does not change how many writes there are (see [`Inner::plan`]).
pub const SHARDS: usize = 256;
/// The name prefix of the shard Secrets (`<prefix>NN`).
pub const SHARD_PREFIX: &str = "delegation-operator-status-lists-tokens-";
const TOKENS_KEY: &str = "tokens.json";
/// Label of a shard Secret: its number.
const SHARD_LABEL: &str = "delegation.nhi.dev/status-list-shard";
pub const CONFIGMAP_NAME: &str = "delegation-operator-status-lists";
/// How long a Status List Token is valid (its `exp`).
const LIST_TOKEN_LIFETIME_SECS: i64 = 86_400;
/// A Status List Token with less than this left is re-signed.
const RESIGN_WHEN_LEFT_SECS: i64 = 43_200;
/// How long a verifier may cache a Status List Token (`ttl`): the delay of a revocation for it.
const LIST_TTL_SECS: u64 = 60;
/// How often lists are pruned and checked for re-signing.
pub const MAINTENANCE_PERIOD: Duration = Duration::from_secs(30);
/// A Secret holds at most 1 MiB: refuse to grow the state beyond this (fail closed: no token).
const MAX_STATE_BYTES: usize = 1_000_000;

/// A token the operator minted and may have to revoke: `[jti, exp, list serial, idx]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Held(String, i64, String, usize);

/// What the state Secret holds.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Persisted {
    base_uri: String,
    registry: RegistryState,
    #[serde(default)]
    tokens: BTreeMap<String, Vec<Held>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PersistedRef<'a> {
    base_uri: &'a str,
    registry: &'a RegistryState,
}

/// Grant uid -> the tokens minted for it, one map per shard.
type Shards = Vec<BTreeMap<String, Vec<Held>>>;

/// The shard a record of the older single-Secret state moves to (SHA-256, not a std hasher: the
/// same on every start).
fn shard_of(grant_uid: &str) -> usize {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(grant_uid.as_bytes());
    usize::from(u16::from_be_bytes([digest[0], digest[1]])) % SHARDS
}

fn shard_name(shard: usize) -> String {
    format!("{SHARD_PREFIX}{shard:02}")
}

/// The shard a Secret of that name holds, if it is one of ours.
fn shard_number(name: &str) -> Option<usize> {
    let shard: usize = name.strip_prefix(SHARD_PREFIX)?.parse().ok()?;
    (shard < SHARDS && shard_name(shard) == name).then_some(shard)
}

/// A Status List Token as published.
#[derive(Clone, Debug)]
struct Published {
    uri: String,
    token: String,
    /// The `status_list` claim it carries.
    claim: Value,
    exp: i64,
    kid: String,
}

struct Inner {
    registry: Registry,
    /// Per shard: grant uid -> the tokens minted for it that may still be valid.
    tokens: Shards,
    /// The JSON last written to each shard Secret.
    shards_written: Vec<String>,
    /// Shards changed since they were written.
    dirty: BTreeSet<usize>,
    /// The shard new records go to; moves on at every flush.
    open: usize,
    /// ConfigMap data key -> the Status List Token published under it.
    published: BTreeMap<String, Published>,
    /// The ConfigMap's resourceVersion after our last write of it: the next write replaces that
    /// version without reading it first (someone else's edit makes it conflict, and then it is read).
    configmap_rv: Option<String>,
    /// The state JSON last written to the Secret.
    written: String,
    /// Counts the changes that must be written before anyone relies on them (an allocation, a
    /// revocation, a retired list). A change is durable once a flush that started after it succeeded.
    version: u64,
}

impl Inner {
    fn base(&self) -> String {
        self.registry
            .config()
            .base_uri
            .trim_end_matches('/')
            .to_owned()
    }

    fn state_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&PersistedRef {
            base_uri: &self.registry.config().base_uri,
            registry: self.registry.state(),
        })?)
    }

    /// Where a new record of `grant_uid` goes: the open shard.
    fn held_of(&mut self, grant_uid: &str) -> &mut Vec<Held> {
        let shard = self.open;
        self.dirty.insert(shard);
        self.tokens[shard].entry(grant_uid.to_owned()).or_default()
    }

    /// Every record of `grant_uid`, in whichever shards they are.
    fn held(&self, grant_uid: &str) -> impl Iterator<Item = &Held> {
        self.tokens
            .iter()
            .filter_map(move |shard| shard.get(grant_uid))
            .flatten()
    }

    /// Removes every record of `grant_uid` from every shard. Forgetting is not written on its own:
    /// it rides along with the next write of that shard (a record that outlives a restart is
    /// revoked again, which changes nothing), so a revocation writes only what verifiers read.
    fn take_held(&mut self, grant_uid: &str) -> Vec<Held> {
        let mut taken = Vec::new();
        for records in self.tokens.iter_mut() {
            if let Some(held) = records.remove(grant_uid) {
                taken.extend(held);
            }
        }
        taken
    }

    /// See [`StatusLists::withdraw`]. Returns whether an entry was set INVALID. The shard that held
    /// the record is written again with the next flush, so the record is gone after a restart too.
    fn withdraw(&mut self, grant_uid: &str, jti: &str) -> bool {
        let mut planned = None;
        for (shard, records) in self.tokens.iter_mut().enumerate() {
            let Some(held) = records.get_mut(grant_uid) else {
                continue;
            };
            if let Some(at) = held.iter().position(|h| h.0 == jti) {
                planned = Some(held.remove(at));
                if held.is_empty() {
                    records.remove(grant_uid);
                }
                self.dirty.insert(shard);
                break;
            }
        }
        let Some(planned) = planned else {
            return false;
        };
        self.version += 1;
        let status_ref = self.status_ref(&planned);
        matches!(self.registry.revoke(&status_ref), Ok(true))
    }

    fn status_ref(&self, held: &Held) -> TokenStatusRef {
        TokenStatusRef {
            idx: held.3,
            uri: format!("{}/{}", self.base(), held.2),
        }
    }

    /// What a flush must write now. Takes the dirty shards (a shard changed later is dirty again
    /// for the next flush); signs what needs signing (new or changed lists, tokens with less than
    /// half their life left, tokens of a key that no longer signs) and drops retired lists.
    fn plan(&mut self, lists: &StatusLists, keys: &KeyStore, now: i64) -> Result<Flush> {
        let mut shards = Vec::new();
        for &shard in &self.dirty {
            let text = serde_json::to_string(&self.tokens[shard])?;
            if text == self.shards_written[shard] {
                continue;
            }
            if text.len() > MAX_STATE_BYTES {
                return Err(Error::InvalidState(format!(
                    "status-list shard {shard} would take {} bytes, more than a Secret holds; refusing to issue",
                    text.len()
                )));
            }
            shards.push((shard, text));
        }
        let state = Some(self.state_json()?).filter(|text| *text != self.written);
        if let Some(text) = &state
            && text.len() > MAX_STATE_BYTES
        {
            return Err(Error::InvalidState(format!(
                "the status-list state would take {} bytes, more than a Secret holds; refusing to issue",
                text.len()
            )));
        }
        let active = keys.active_kid()?;
        let mut published = BTreeMap::new();
        let mut publish = false;
        for (uri, list) in self.registry.lists() {
            let key = data_key(uri);
            let claim = list.to_claim();
            let fresh = self.published.get(&key).filter(|p| {
                p.uri == uri
                    && p.claim == claim
                    && p.exp - now > RESIGN_WHEN_LEFT_SECS
                    && p.kid == active
            });
            let signed = match fresh {
                Some(p) => p.clone(),
                None => {
                    publish = true;
                    lists.sign(keys, uri, list, claim, now)?
                }
            };
            published.insert(key, signed);
        }
        publish |= self.published.keys().any(|k| !published.contains_key(k));
        // Planned shards are dirty no more; one whose write fails is marked again. The issuances of
        // the next flush go to the next shard.
        self.dirty.clear();
        self.open = (self.open + 1) % SHARDS;
        Ok(Flush {
            version: self.version,
            shards,
            state,
            published,
            publish,
        })
    }
}

/// The status lists, mirrored in memory and written through to their Secrets and ConfigMap. One
/// writer (the leader).
///
/// Writes are group-committed: a change is made in memory under `inner` (never held across a
/// request), then its caller waits on `flushed` until a flush that began after the change has
/// written it. The flush in flight holds `flushed`; everything changed meanwhile is written by the
/// next one, in one round, so concurrent issuances and revocations share their writes and the cost
/// of one does not grow with how many are in flight. Flushes never overlap, so a later write of an
/// object always carries a newer state than an earlier one.
pub struct StatusLists {
    secrets: Api<Secret>,
    configmaps: Api<ConfigMap>,
    issuer: String,
    inner: Mutex<Inner>,
    /// The version the last successful flush wrote; locked for the whole of a flush.
    flushed: Mutex<u64>,
    /// The resourceVersions our own latest writes gave each state Secret (by name): the watch
    /// showing one of them is our write coming back, which needs no look (see [`Self::restore_state`]).
    own_versions: std::sync::Mutex<BTreeMap<String, VecDeque<String>>>,
    /// Checked before a write that would undo someone else's (see [`Fence`]).
    fence: Fence,
}

/// How many of our latest writes of one state Secret are remembered: the watch may show an earlier
/// one after a later one returned.
const OWN_VERSIONS_KEPT: usize = 8;

/// What one flush writes: taken from memory at once, written without holding the memory lock.
struct Flush {
    version: u64,
    /// Shard number and its JSON, for shards that differ from what was last written.
    shards: Vec<(usize, String)>,
    /// The registry state JSON, when it differs from what was last written.
    state: Option<String>,
    /// The Status List Tokens to publish, and whether they differ from what is published.
    published: BTreeMap<String, Published>,
    publish: bool,
}

impl StatusLists {
    /// Loads the state from its Secret (creating it on the very first start), and brings the
    /// published lists up to date (re-using Status List Tokens that are still good).
    pub async fn load(
        client: Client,
        namespace: &str,
        issuer: &str,
        max_token_lifetime: Duration,
        keys: &KeyStore,
        now: i64,
        fence: Fence,
    ) -> Result<Self> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let configmaps: Api<ConfigMap> = Api::namespaced(client, namespace);
        let unreadable = |why: String| {
            Error::InvalidState(format!(
                "Secret {namespace}/{SECRET_NAME} key {STATE_KEY} is unreadable ({why}); refusing to start rather than forget status-list revocations or reuse list uris. Delete it to start over (lists get new uris)."
            ))
        };
        let (persisted, written) = match secrets.get_opt(SECRET_NAME).await? {
            Some(secret) => {
                let text = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(STATE_KEY))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .ok_or_else(|| unreadable("missing or not UTF-8".into()))?;
                let persisted: Persisted =
                    serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
                (persisted, text)
            }
            None => {
                let created = secrets
                    .create(
                        &PostParams {
                            field_manager: Some(FIELD_MANAGER.into()),
                            ..Default::default()
                        },
                        &Secret {
                            metadata: ObjectMeta {
                                name: Some(SECRET_NAME.into()),
                                labels: Some(managed_labels()),
                                ..Default::default()
                            },
                            type_: Some("Opaque".into()),
                            ..Default::default()
                        },
                    )
                    .await?;
                let uid = created.metadata.uid.ok_or_else(|| {
                    Error::InvalidState("the created status-list Secret has no uid".into())
                })?;
                let base_uri = format!("{}/statuslists/{uid}", issuer.trim_end_matches('/'));
                tracing::info!(%base_uri, "created the status-list state");
                let fresh = Persisted {
                    base_uri,
                    registry: RegistryState::default(),
                    tokens: BTreeMap::new(),
                };
                (fresh, String::new())
            }
        };
        let max_secs = i64::try_from(max_token_lifetime.as_secs())
            .unwrap_or(i64::MAX)
            .max(1);
        let config = RegistryConfig::new(persisted.base_uri, max_secs);
        let registry =
            Registry::restore(config, persisted.registry).map_err(|e| unreadable(e.to_string()))?;
        let (mut tokens, shards_written) = load_shards(&secrets, namespace).await?;
        // Records of an older single-Secret state move into their shards.
        let mut dirty = BTreeSet::new();
        for (uid, held) in persisted.tokens {
            let shard = shard_of(&uid);
            tokens[shard].entry(uid).or_default().extend(held);
            dirty.insert(shard);
        }
        let lists = Self {
            secrets,
            configmaps,
            issuer: issuer.to_owned(),
            inner: Mutex::new(Inner {
                registry,
                tokens,
                shards_written,
                dirty,
                open: 0,
                published: BTreeMap::new(),
                configmap_rv: None,
                written,
                version: 0,
            }),
            flushed: Mutex::new(0),
            own_versions: Default::default(),
            fence,
        };
        {
            let mut inner = lists.inner.lock().await;
            inner.published = lists.adopt_published(&inner, keys).await?;
        }
        {
            let mut flushed = lists.flushed.lock().await;
            *flushed = lists.flush(keys, now, true).await?;
        }
        Ok(lists)
    }

    /// Hands out the status reference of a token the operator is about to mint for `grant_uid`,
    /// recording it (and persisting the state) before the token exists, and publishing its list if
    /// it is new: a verifier must never see an index its list does not cover.
    pub async fn allocate(
        &self,
        keys: &KeyStore,
        grant_uid: &str,
        jti: &str,
        now: i64,
        exp: i64,
    ) -> Result<TokenStatusRef> {
        let (status_ref, version) = {
            let mut inner = self.inner.lock().await;
            let allocation = inner
                .registry
                .allocate(now, exp)
                .map_err(|e| Error::InvalidState(format!("no status-list index: {e}")))?;
            let status_ref = allocation.status_ref;
            let serial = status_ref
                .uri
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let held = inner.held_of(grant_uid);
            held.retain(|h| h.1 > now);
            held.push(Held(jti.to_owned(), exp, serial, status_ref.idx));
            inner.version += 1;
            (status_ref, inner.version)
        };
        // Written whether or not a new block was reserved (`persist_before_use`): the token's
        // entry must survive a restart so that it can be revoked while it lives.
        self.commit(keys, now, version).await?;
        Ok(status_ref)
    }

    /// The tokens the operator recorded minting for `grant_uid` that have not expired, as `(jti, exp)`:
    /// its own knowledge of what a revocation of that grant must cover.
    pub async fn recorded(&self, grant_uid: &str, now: i64) -> Vec<(String, i64)> {
        let inner = self.inner.lock().await;
        inner
            .held(grant_uid)
            .filter(|h| h.1 > now)
            .map(|h| (h.0.clone(), h.1))
            .collect()
    }

    /// Sets to INVALID every token of `grant_uid` the operator recorded except those in `keep`
    /// (jtis), plus `verified` references read from tokens of that grant that verified against our
    /// keys; then persists and republishes (call this before deleting any Secret: fail closed). The
    /// revoked tokens are forgotten (they stay INVALID in their lists). Returns how many entries
    /// changed.
    pub async fn revoke_grant(
        &self,
        keys: &KeyStore,
        grant_uid: &str,
        keep: &[&str],
        verified: &[TokenStatusRef],
        now: i64,
    ) -> Result<usize> {
        let (changed, version) = self.revoke_in_memory(grant_uid, keep, verified, now).await;
        // Also when nothing changed here: an earlier revocation whose write failed is written
        // first, so a retried revocation never passes it by.
        self.commit(keys, now, version).await?;
        Ok(changed)
    }

    /// Gives back the entry recorded for `jti`, a token planned for `grant_uid` and never minted: it
    /// is no longer the grant's, and INVALID from the next write on (nothing is written for it alone;
    /// no token carries it, and a restart before that write finds it as one of the grant's records,
    /// revoked with them).
    pub async fn withdraw(&self, grant_uid: &str, jti: &str) {
        self.inner.lock().await.withdraw(grant_uid, jti);
    }

    /// The in-memory part of [`revoke_grant`](Self::revoke_grant): how many entries changed, and
    /// the version that must be written before they count.
    async fn revoke_in_memory(
        &self,
        grant_uid: &str,
        keep: &[&str],
        verified: &[TokenStatusRef],
        now: i64,
    ) -> (usize, u64) {
        let mut inner = self.inner.lock().await;
        if verified.is_empty() && inner.held(grant_uid).next().is_none() {
            return (0, inner.version);
        }
        let held = inner.take_held(grant_uid);
        let (kept, dropped): (Vec<Held>, Vec<Held>) = held
            .into_iter()
            .partition(|h| keep.contains(&h.0.as_str()) && h.1 > now);
        if !kept.is_empty() {
            inner.held_of(grant_uid).extend(kept.iter().cloned());
        }
        let kept_refs: BTreeSet<TokenStatusRef> =
            kept.iter().map(|h| inner.status_ref(h)).collect();
        let mut refs: BTreeSet<TokenStatusRef> = dropped
            .iter()
            .filter(|h| h.1 > now)
            .map(|h| inner.status_ref(h))
            .collect();
        refs.extend(verified.iter().cloned());
        let mut changed = 0;
        for status_ref in refs.difference(&kept_refs) {
            match inner.registry.revoke(status_ref) {
                Ok(true) => changed += 1,
                Ok(false) => {}
                // The list was retired: every token in it has expired.
                Err(RegistryError::UnknownList) => {}
                Err(e) => {
                    tracing::warn!(uri = status_ref.uri, idx = status_ref.idx, error = %e, "a status reference could not be revoked")
                }
            }
        }
        // Forgetting tokens alone is not worth a write: it rides along with the next one.
        if changed > 0 {
            inner.version += 1;
        }
        (changed, inner.version)
    }

    /// Retires lists whose tokens have all expired, forgets expired tokens, and re-signs Status List
    /// Tokens that are due. Writes only what is due.
    pub async fn maintain(&self, keys: &KeyStore, now: i64) -> Result<()> {
        {
            let mut inner = self.inner.lock().await;
            let retired = inner.registry.prune(now);
            // Forgetting expired tokens alone is not worth a write: it rides along with the next one.
            for shard in inner.tokens.iter_mut() {
                for held in shard.values_mut() {
                    held.retain(|h| h.1 > now);
                }
                shard.retain(|_, held| !held.is_empty());
            }
            if !retired.is_empty() {
                tracing::info!(lists = ?retired, "retired status lists whose tokens have all expired");
                inner.version += 1;
            }
        }
        // Always flushed: a Status List Token may be due for re-signing with nothing changed.
        let mut flushed = self.flushed.lock().await;
        *flushed = self.flush(keys, now, false).await?;
        Ok(())
    }

    /// Runs [`maintain`](Self::maintain) forever.
    pub async fn run_maintenance(&self, keys: &KeyStore) {
        loop {
            tokio::time::sleep(MAINTENANCE_PERIOD).await;
            if let Err(e) = self
                .maintain(keys, crate::operator::now().as_second())
                .await
            {
                tracing::error!(error = %e, "status list maintenance failed; retrying");
            }
        }
    }

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

    fn remember_version(&self, name: &str, version: Option<String>) {
        if let (Some(version), Ok(mut own)) = (version, self.own_versions.lock()) {
            let versions = own.entry(name.to_owned()).or_default();
            if versions.len() == OWN_VERSIONS_KEPT {
                versions.pop_front();
            }
            versions.push_back(version);
        }
    }

    /// The resourceVersion of our latest write of `name`.
    fn last_version(&self, name: &str) -> Option<String> {
        self.own_versions
            .lock()
            .ok()?
            .get(name)
            .and_then(|v| v.back().cloned())
    }

    fn wrote_version(&self, name: &str, version: &str) -> bool {
        self.own_versions.lock().is_ok_and(|own| {
            own.get(name)
                .is_some_and(|v| v.iter().any(|w| w == version))
        })
    }

    /// Waits until `version` is written: by a flush already under way or queued before this
    /// caller, or by one this caller runs for everything changed so far.
    async fn commit(&self, keys: &KeyStore, now: i64, version: u64) -> Result<()> {
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
    async fn flush(&self, keys: &KeyStore, now: i64, check: bool) -> Result<u64> {
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
    async fn write_published(
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
    async fn write_secret(&self, name: &str, secret: Secret) -> Result<()> {
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

    async fn apply_secret(&self, name: &str, secret: Secret) -> Result<()> {
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

    fn sign(
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
    async fn adopt_published(
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

pub use crate::status_list::data_key;

/// Whether the ConfigMap exists and holds exactly `data` (the apiserver drops an empty map).
fn holds(current: Option<&ConfigMap>, data: &BTreeMap<String, String>) -> bool {
    current.is_some_and(|cm| match cm.data.as_ref() {
        Some(held) => held == data,
        None => data.is_empty(),
    })
}

fn published_data(published: &BTreeMap<String, Published>) -> BTreeMap<String, String> {
    published
        .iter()
        .map(|(k, p)| (k.clone(), p.token.clone()))
        .collect()
}

fn desired_configmap(data: BTreeMap<String, String>) -> ConfigMap {
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

fn desired_secret(state: &str) -> Secret {
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

fn shard_secret(shard: usize, tokens: &str) -> Secret {
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
async fn load_shards(secrets: &Api<Secret>, namespace: &str) -> Result<(Shards, Vec<String>)> {
    let mut tokens: Shards = vec![BTreeMap::new(); SHARDS];
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
        tokens[shard] = serde_json::from_str(&text).map_err(|e| {
            Error::InvalidState(format!(
                "Secret {namespace}/{name} key {TOKENS_KEY} is unreadable ({e}); refusing to start rather than forget which status-list entries belong to which grant"
            ))
        })?;
        written[shard] = text;
    }
    Ok((tokens, written))
}

/// A published Status List Token for `uri`, if its signature verifies against `jwks` (the header
/// `alg` must be the JWK's), its `typ` is `statuslist+jwt` and its `sub` is `uri`.
fn verify_list_token(token: &str, jwks: &Value, uri: &str) -> Option<Published> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status_list::Status;

    #[test]
    fn held_tokens_persist_compactly() {
        let held = Held(
            "0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1f".into(),
            1_800_000_600,
            "3".into(),
            17,
        );
        assert_eq!(
            serde_json::to_string(&held).unwrap(),
            r#"["0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1f",1800000600,"3",17]"#
        );
    }

    /// A restart reads back exactly what was written: the state is not rewritten for nothing.
    #[test]
    fn the_persisted_state_reads_back_byte_for_byte() {
        let config = RegistryConfig::new("https://i/statuslists/u", 86_400);
        let mut registry = Registry::new(config.clone()).unwrap();
        let a = registry.allocate(1_800_000_000, 1_800_000_600).unwrap();
        registry.revoke(&a.status_ref).unwrap();
        let mut tokens: Shards = vec![BTreeMap::new(); SHARDS];
        tokens[shard_of("uid-1")].insert(
            "uid-1".to_owned(),
            vec![Held("j".into(), 1_800_000_600, "0".into(), 0)],
        );
        let inner = Inner {
            registry,
            tokens,
            shards_written: vec![String::new(); SHARDS],
            dirty: BTreeSet::new(),
            open: 0,
            published: BTreeMap::new(),
            configmap_rv: None,
            written: String::new(),
            version: 0,
        };
        let text = inner.state_json().unwrap();
        let shard_text = serde_json::to_string(&inner.tokens[shard_of("uid-1")]).unwrap();
        let read: Persisted = serde_json::from_str(&text).unwrap();
        let mut read_tokens: Shards = vec![BTreeMap::new(); SHARDS];
        read_tokens[shard_of("uid-1")] = serde_json::from_str(&shard_text).unwrap();
        let restored = Inner {
            registry: Registry::restore(config, read.registry).unwrap(),
            tokens: read_tokens,
            shards_written: vec![String::new(); SHARDS],
            dirty: BTreeSet::new(),
            open: 0,
            published: BTreeMap::new(),
            configmap_rv: None,
            written: text.clone(),
            version: 0,
        };
        assert_eq!(restored.state_json().unwrap(), text);
        assert_eq!(
            restored.status_ref(&restored.tokens[shard_of("uid-1")]["uid-1"][0]),
            a.status_ref
        );
    }

    /// An empty registry and empty shards, new records going to shard `open`.
    fn empty_inner(open: usize) -> Inner {
        let config = RegistryConfig::new("https://i/statuslists/u", 86_400);
        Inner {
            registry: Registry::new(config).unwrap(),
            tokens: vec![BTreeMap::new(); SHARDS],
            shards_written: vec![String::new(); SHARDS],
            dirty: BTreeSet::new(),
            open,
            published: BTreeMap::new(),
            configmap_rv: None,
            written: String::new(),
            version: 0,
        }
    }

    /// Records go to the open shard; a grant whose tokens were written by different flushes has
    /// records in several shards, and a revocation finds and removes all of them.
    #[test]
    fn a_grants_records_are_found_and_taken_from_every_shard() {
        let mut inner = empty_inner(3);
        inner
            .held_of("uid-1")
            .push(Held("a".into(), 10, "0".into(), 0));
        inner
            .held_of("uid-2")
            .push(Held("x".into(), 10, "0".into(), 1));
        inner.dirty.clear();
        inner.open = 4;
        inner
            .held_of("uid-1")
            .push(Held("b".into(), 20, "0".into(), 2));
        assert_eq!(
            inner.dirty,
            BTreeSet::from([4]),
            "only the open shard is touched"
        );
        let ids: Vec<&str> = inner.held("uid-1").map(|h| h.0.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        inner.dirty.clear();
        let taken: Vec<String> = inner.take_held("uid-1").into_iter().map(|h| h.0).collect();
        assert_eq!(taken, ["a", "b"]);
        assert!(
            inner.dirty.is_empty(),
            "forgetting rides along with the next write"
        );
        assert!(inner.held("uid-1").next().is_none());
        assert_eq!(
            inner.held("uid-2").count(),
            1,
            "another grant's record stays"
        );
    }

    /// A planned token that was never minted gives its entry back: INVALID, no longer the grant's,
    /// and the grant's other records untouched.
    #[test]
    fn a_withdrawn_plan_is_invalid_and_no_longer_the_grants() {
        let mut inner = empty_inner(0);
        let record = |inner: &mut Inner, uid: &str, jti: &str| {
            let status_ref = inner.registry.allocate(100, 700).unwrap().status_ref;
            let serial = status_ref.uri.rsplit('/').next().unwrap().to_owned();
            inner
                .held_of(uid)
                .push(Held(jti.into(), 700, serial, status_ref.idx));
            status_ref
        };
        let current = record(&mut inner, "uid-1", "current");
        let planned = record(&mut inner, "uid-1", "planned");
        let other = record(&mut inner, "uid-2", "planned");
        let version = inner.version;
        inner.dirty.clear();

        assert!(inner.withdraw("uid-1", "planned"));
        assert_eq!(
            inner.dirty,
            BTreeSet::from([0]),
            "its shard is written again"
        );
        assert!(
            inner.version > version,
            "the change waits for the next write"
        );
        assert_eq!(inner.registry.status(&planned).unwrap(), Status::Invalid);
        assert_eq!(inner.registry.status(&current).unwrap(), Status::Valid);
        assert_eq!(inner.registry.status(&other).unwrap(), Status::Valid);
        let ids: Vec<&str> = inner.held("uid-1").map(|h| h.0.as_str()).collect();
        assert_eq!(ids, ["current"]);
        assert_eq!(
            inner.held("uid-2").count(),
            1,
            "another grant's same jti stays"
        );
        assert!(
            !inner.withdraw("uid-1", "planned"),
            "a second time changes nothing"
        );
    }

    #[test]
    fn grants_spread_over_the_shards_and_keep_theirs() {
        let mut counts = vec![0usize; SHARDS];
        for i in 0..(100 * SHARDS) {
            counts[shard_of(&format!("uid-{i}"))] += 1;
        }
        assert!(counts.iter().all(|c| (50..=150).contains(c)), "{counts:?}");
        assert_eq!(shard_of("fixed-uid"), shard_of("fixed-uid"));
        assert_eq!(shard_name(7), "delegation-operator-status-lists-tokens-07");
        assert_eq!(
            shard_number("delegation-operator-status-lists-tokens-07"),
            Some(7)
        );
        assert_eq!(
            shard_number("delegation-operator-status-lists-tokens-255"),
            Some(255)
        );
        for foreign in [
            "delegation-operator-status-lists-tokens-7",
            "delegation-operator-status-lists-tokens-256",
            "delegation-operator-status-lists-tokens-+1",
            "delegation-operator-status-lists",
        ] {
            assert_eq!(shard_number(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn the_data_key_is_the_last_segment_of_the_uri() {
        assert_eq!(data_key("https://i/statuslists/abc/12"), "12.jwt");
    }
}

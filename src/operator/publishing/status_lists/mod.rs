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
//!
//! - **Capacity** follows demand: lists open as tokens need them and retire once their tokens have
//!   all expired, up to a safety limit ([`Capacity::max_lists`]); what each namespace may hold is
//!   budgeted ([`crate::status_list::budget`]), so that one namespace's churn refuses only its own
//!   grants (reason `DeniedStatusListBudget`).
//!
//! Its parts: this module holds the public API (load, allocate, revoke, maintain); [`records`] what is
//! kept in memory and how it is planned into writes; [`writes`] the writes, the guard's restores and
//! the publication.

mod held;
mod records;
mod writes;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::Duration,
};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::Mutex;

use crate::operator::{
    FIELD_MANAGER,
    error::{Error, Result},
    managed_labels,
    publishing::fence::Fence,
    publishing::keys::KeyStore,
};
use crate::status_list::{
    DEFAULT_LIST_CAPACITY, DEFAULT_MAX_LISTS, LineageEntries, Registry, RegistryConfig,
    RegistryError, RegistryState, TokenStatusRef,
    budget::{DEFAULT_ENTRIES_PER_NAMESPACE, NamespaceBudget},
};

use held::Held;
pub use held::TokenRecords;
use records::{Inner, Persisted, Published, shard_of};
use writes::load_shards;

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

/// How large the lists are and how their capacity is shared (the operator's flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Tokens per new list (each with its own entry and its lineage's).
    pub list_size: usize,
    /// Safety limit on live lists (memory, and the one Secret and ConfigMap they are kept in).
    pub max_lists: usize,
    /// Tokens' entries one namespace may hold in lists that have not retired (a token's lineage
    /// entries come with it).
    pub budget_per_namespace: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            list_size: DEFAULT_LIST_CAPACITY,
            max_lists: DEFAULT_MAX_LISTS,
            budget_per_namespace: DEFAULT_ENTRIES_PER_NAMESPACE,
        }
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
    #[allow(clippy::too_many_arguments)]
    pub async fn load(
        client: Client,
        namespace: &str,
        issuer: &str,
        max_token_lifetime: Duration,
        capacity: Capacity,
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
        let config = RegistryConfig {
            list_capacity: capacity.list_size,
            max_lists: capacity.max_lists,
            ..RegistryConfig::new(persisted.base_uri, max_secs)
        };
        let registry =
            Registry::restore(config, persisted.registry).map_err(|e| unreadable(e.to_string()))?;
        let (mut tokens, shards_written) = load_shards(&secrets, namespace).await?;
        // Records of an older single-Secret state move into their shards.
        let mut dirty = BTreeSet::new();
        for (uid, held) in persisted.tokens {
            let shard = shard_of(&uid);
            tokens.edit(shard, &uid, |records| records.extend(held));
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
                budget: NamespaceBudget::new(capacity.budget_per_namespace),
            }),
            flushed: Mutex::new(0),
            own_versions: Default::default(),
            fence,
        };
        {
            let mut inner = lists.inner.lock().await;
            inner.published = lists.adopt_published(&inner, keys).await?;
            inner.report_usage();
        }
        {
            let mut flushed = lists.flushed.lock().await;
            *flushed = lists.flush(keys, now, true).await?;
        }
        Ok(lists)
    }

    /// Hands out the status reference of a token the operator is about to mint for `grant_uid` in
    /// `namespace`, recording it (and persisting the state) before the token exists, and publishing
    /// its list if it is new: a verifier must never see an index its list does not cover. A
    /// namespace at its budget gets [`Error::OverStatusListBudget`] and no entry.
    pub async fn allocate(
        &self,
        keys: &KeyStore,
        namespace: &str,
        grant_uid: &str,
        jti: &str,
        now: i64,
        exp: i64,
    ) -> Result<TokenStatusRef> {
        let (status_ref, version) = {
            let mut inner = self.inner.lock().await;
            let status_ref = inner.allocate_within_budget(namespace, now, exp)?;
            let serial = status_ref
                .uri
                .rsplit('/')
                .next()
                .and_then(|serial| serial.parse().ok())
                .ok_or_else(|| {
                    Error::InvalidState(format!("status list uri {} has no serial", status_ref.uri))
                })?;
            let held = Held::new(jti, exp, serial, status_ref.idx);
            inner.edit_open(grant_uid, |records| {
                records.retain(|h| h.exp() > now);
                records.push(held);
            });
            inner.version += 1;
            (status_ref, inner.version)
        };
        // Written whether or not a new block was reserved (`persist_before_use`): the token's
        // entry must survive a restart so that it can be revoked while it lives.
        self.commit(keys, now, version).await?;
        Ok(status_ref)
    }

    /// The entries reserved for the lineage of the token whose entry is `status_ref` (the tokens
    /// that will be exchanged from it), for its `lineage` claim; none in a list opened without them.
    pub async fn lineage_of(&self, status_ref: &TokenStatusRef) -> Option<LineageEntries> {
        self.inner.lock().await.registry.lineage_of(status_ref)
    }

    /// The tokens the operator recorded minting for `grant_uid` that have not expired, as `(jti, exp)`:
    /// its own knowledge of what a revocation of that grant must cover.
    pub async fn recorded(&self, grant_uid: &str, now: i64) -> Vec<(String, i64)> {
        let inner = self.inner.lock().await;
        inner
            .held(grant_uid)
            .filter(|h| h.exp() > now)
            .map(|h| (h.jti(), h.exp()))
            .collect()
    }

    /// Whether `jti` is a token the operator recorded minting for `grant_uid` that has not expired
    /// and is VALID in its list: a token it revoked is not current, even when its record outlived
    /// a restart (records are forgotten lazily; statuses are persisted at once).
    pub async fn is_current(&self, grant_uid: &str, jti: &str, now: i64) -> bool {
        let inner = self.inner.lock().await;
        inner
            .held(grant_uid)
            .filter(|h| h.exp() > now && h.is(jti))
            .any(|h| {
                let status_ref = inner.status_ref(h);
                matches!(
                    inner.registry.status(&status_ref),
                    Ok(crate::status_list::Status::Valid)
                )
            })
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
    /// is no longer the grant's, and INVALID. Written with the group commit under way (in a burst,
    /// with other grants' records), which this waits for: left for a later flush, it would be the
    /// one write of an operator otherwise at rest. No token carries the entry, so a failed write is
    /// only logged; the next flush carries it, and a restart before that finds it as one of the
    /// grant's records, revoked with them.
    pub async fn withdraw(&self, keys: &KeyStore, grant_uid: &str, jti: &str, now: i64) {
        let (before, after) = {
            let mut inner = self.inner.lock().await;
            let before = inner.version;
            inner.withdraw(grant_uid, jti);
            (before, inner.version)
        };
        if after == before {
            return;
        }
        if let Err(e) = self.commit(keys, now, after).await {
            tracing::warn!(error = %e, "could not write a withdrawn status-list entry yet; the next write carries it");
        }
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
            .partition(|h| keep.iter().any(|jti| h.is(jti)) && h.exp() > now);
        if !kept.is_empty() {
            inner.edit_open(grant_uid, |records| records.extend(kept.iter().cloned()));
        }
        let kept_refs: BTreeSet<TokenStatusRef> =
            kept.iter().map(|h| inner.status_ref(h)).collect();
        let mut refs: BTreeSet<TokenStatusRef> = dropped
            .iter()
            .filter(|h| h.exp() > now)
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
    /// Tokens that are due. Writes only what is due: bookkeeping that changes no status (expired or
    /// revoked records forgotten, records moved to the open shard) rides along with the next write,
    /// so that an operator at rest writes nothing.
    pub async fn maintain(&self, keys: &KeyStore, now: i64) -> Result<()> {
        let version = {
            let mut inner = self.inner.lock().await;
            let retired = inner.registry.prune(now);
            // Forgetting expired tokens alone is not worth a write: it rides along with the next one.
            inner.tokens.forget_expired(now);
            inner.budget.release_retired(now);
            if !retired.is_empty() {
                tracing::info!(lists = ?retired, "retired status lists whose tokens have all expired");
                inner.version += 1;
            }
            inner.report_usage();
            inner.version
        };
        let mut flushed = self.flushed.lock().await;
        // A change not yet written (a retired list, a failed flush), or a Status List Token due for
        // signing again with nothing changed.
        let active = keys.active_kid()?;
        if *flushed >= version && !self.inner.lock().await.publication_due(&active, now) {
            return Ok(());
        }
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
}

pub use crate::status_list::data_key;

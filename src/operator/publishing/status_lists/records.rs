//! The status lists' records in memory: which tokens the operator minted for each grant uid (in
//! shards), the published Status List Tokens, and how a change is planned into one flush.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::operator::{
    error::{Error, Result},
    publishing::keys::KeyStore,
};
use crate::status_list::{Registry, RegistryState, TokenStatusRef, budget::NamespaceBudget};

use super::held::{Held, TokenRecords};
use super::*;

/// What the state Secret holds.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Persisted {
    pub(super) base_uri: String,
    pub(super) registry: RegistryState,
    #[serde(default)]
    pub(super) tokens: BTreeMap<String, Vec<Held>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PersistedRef<'a> {
    pub(super) base_uri: &'a str,
    pub(super) registry: &'a RegistryState,
}

/// The shard a record of the older single-Secret state moves to (SHA-256, not a std hasher: the
/// same on every start).
pub(super) fn shard_of(grant_uid: &str) -> usize {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(grant_uid.as_bytes());
    usize::from(u16::from_be_bytes([digest[0], digest[1]])) % SHARDS
}

pub(super) fn shard_name(shard: usize) -> String {
    format!("{SHARD_PREFIX}{shard:02}")
}

/// The shard a Secret of that name holds, if it is one of ours.
pub(super) fn shard_number(name: &str) -> Option<usize> {
    let shard: usize = name.strip_prefix(SHARD_PREFIX)?.parse().ok()?;
    (shard < SHARDS && shard_name(shard) == name).then_some(shard)
}

/// A Status List Token as published.
#[derive(Clone, Debug)]
pub(super) struct Published {
    pub(super) uri: String,
    pub(super) token: String,
    /// The `status_list` claim it carries.
    pub(super) claim: Value,
    pub(super) exp: i64,
    pub(super) kid: String,
}

pub(super) struct Inner {
    pub(super) registry: Registry,
    /// Per shard: grant uid -> the tokens minted for it that may still be valid.
    pub(super) tokens: TokenRecords,
    /// The JSON last written to each shard Secret.
    pub(super) shards_written: Vec<String>,
    /// Shards changed since they were written.
    pub(super) dirty: BTreeSet<usize>,
    /// The shard new records go to; moves on at every flush.
    pub(super) open: usize,
    /// ConfigMap data key -> the Status List Token published under it.
    pub(super) published: BTreeMap<String, Published>,
    /// The ConfigMap's resourceVersion after our last write of it: the next write replaces that
    /// version without reading it first (someone else's edit makes it conflict, and then it is read).
    pub(super) configmap_rv: Option<String>,
    /// The state JSON last written to the Secret.
    pub(super) written: String,
    /// Counts the changes that must be written before anyone relies on them (an allocation, a
    /// revocation, a retired list). A change is durable once a flush that started after it succeeded.
    pub(super) version: u64,
    /// The entries each namespace holds, against its budget.
    pub(super) budget: NamespaceBudget,
}

impl Inner {
    pub(super) fn base(&self) -> String {
        self.registry
            .config()
            .base_uri
            .trim_end_matches('/')
            .to_owned()
    }

    pub(super) fn state_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&PersistedRef {
            base_uri: &self.registry.config().base_uri,
            registry: self.registry.state(),
        })?)
    }

    /// A fresh entry for a token of `namespace` expiring at `exp`, charged to the namespace's budget;
    /// none when the namespace is at its budget.
    pub(super) fn allocate_within_budget(
        &mut self,
        namespace: &str,
        now: i64,
        exp: i64,
    ) -> Result<TokenStatusRef> {
        self.budget
            .check(namespace)
            .map_err(Error::OverStatusListBudget)?;
        let allocation = self.registry.allocate(now, exp).map_err(|e| match e {
            RegistryError::Full(lists) => Error::StatusListsFull(lists),
            e => Error::InvalidState(format!("no status-list index: {e}")),
        })?;
        let status_ref = allocation.status_ref;
        let retires_at = self
            .registry
            .retires_at(&status_ref.uri)
            .ok_or_else(|| Error::InvalidState("the list just allocated in is missing".into()))?;
        self.budget.charge(namespace, retires_at);
        let metrics = crate::metrics::metrics();
        metrics.report_status_lists(self.registry.usage(), self.budget.limit());
        metrics.report_namespace_entries(namespace, self.budget.held(namespace));
        Ok(status_ref)
    }

    /// Sets every capacity gauge (see [`crate::metrics`]).
    pub(super) fn report_usage(&self) {
        let metrics = crate::metrics::metrics();
        metrics.report_status_lists(self.registry.usage(), self.budget.limit());
        metrics.replace_namespace_entries(self.budget.usage());
    }

    /// Changes the records of `grant_uid` in the open shard, where new records go.
    pub(super) fn edit_open(&mut self, grant_uid: &str, edit: impl FnOnce(&mut Vec<Held>)) {
        let shard = self.open;
        self.dirty.insert(shard);
        self.tokens.edit(shard, grant_uid, edit);
    }

    /// Every record of `grant_uid`, in whichever shards they are.
    pub(super) fn held(&self, grant_uid: &str) -> impl Iterator<Item = &Held> {
        self.tokens.held(grant_uid)
    }

    /// Removes every record of `grant_uid` from every shard. Forgetting is not written on its own:
    /// it rides along with the next write of that shard (a record that outlives a restart is
    /// revoked again, which changes nothing), so a revocation writes only what verifiers read.
    pub(super) fn take_held(&mut self, grant_uid: &str) -> Vec<Held> {
        self.tokens.take(grant_uid)
    }

    /// See [`StatusLists::withdraw`]. Returns whether an entry was set INVALID. The shard that held
    /// the record is written again with the next flush, so the record is gone after a restart too.
    pub(super) fn withdraw(&mut self, grant_uid: &str, jti: &str) -> bool {
        let Some((shard, planned)) = self.tokens.remove(grant_uid, jti) else {
            return false;
        };
        self.dirty.insert(shard);
        self.version += 1;
        let status_ref = self.status_ref(&planned);
        matches!(self.registry.revoke(&status_ref), Ok(true))
    }

    pub(super) fn status_ref(&self, held: &Held) -> TokenStatusRef {
        TokenStatusRef {
            idx: held.idx(),
            uri: format!("{}/{}", self.base(), held.serial()),
        }
    }

    /// The Status List Token published for list `uri` (under `key`), if it may stay: it carries
    /// `claim`, has more than half its life left, and the key that signs now signed it.
    fn still_good(
        &self,
        key: &str,
        uri: &str,
        claim: &Value,
        active: &str,
        now: i64,
    ) -> Option<&Published> {
        self.published.get(key).filter(|p| {
            p.uri == uri
                && p.claim == *claim
                && p.exp - now > RESIGN_WHEN_LEFT_SECS
                && p.kid == active
        })
    }

    /// Whether a flush would publish anything: a list opened, changed or retired, or a Status List
    /// Token due for signing again (half its life gone, or signed by a key that no longer signs).
    pub(super) fn publication_due(&self, active: &str, now: i64) -> bool {
        let mut live = 0;
        for (uri, list) in self.registry.lists() {
            live += 1;
            let key = data_key(uri);
            if self
                .still_good(&key, uri, &list.to_claim(), active, now)
                .is_none()
            {
                return true;
            }
        }
        self.published.len() != live
    }

    /// What a flush must write now. Takes the dirty shards (a shard changed later is dirty again
    /// for the next flush); signs what needs signing (new or changed lists, tokens with less than
    /// half their life left, tokens of a key that no longer signs) and drops retired lists.
    pub(super) fn plan(&mut self, lists: &StatusLists, keys: &KeyStore, now: i64) -> Result<Flush> {
        let mut shards = Vec::new();
        for &shard in &self.dirty {
            let text = serde_json::to_string(self.tokens.shard(shard))?;
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
            let signed = match self.still_good(&key, uri, &claim, &active, now) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status_list::{RegistryConfig, Status};

    #[test]
    pub(super) fn held_tokens_persist_compactly() {
        let held = Held::new("0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1f", 1_800_000_600, 3, 17);
        assert_eq!(
            serde_json::to_string(&held).unwrap(),
            r#"["0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1f",1800000600,"3",17]"#
        );
    }

    /// A restart reads back exactly what was written: the state is not rewritten for nothing.
    #[test]
    pub(super) fn the_persisted_state_reads_back_byte_for_byte() {
        let config = RegistryConfig::new("https://i/statuslists/u", 86_400);
        let mut registry = Registry::new(config.clone()).unwrap();
        let a = registry.allocate(1_800_000_000, 1_800_000_600).unwrap();
        registry.revoke(&a.status_ref).unwrap();
        let mut tokens = TokenRecords::default();
        tokens.record(shard_of("uid-1"), "uid-1", "j", 1_800_000_600, 0, 0);
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
            budget: NamespaceBudget::new(usize::MAX),
        };
        let text = inner.state_json().unwrap();
        let shard_text = serde_json::to_string(inner.tokens.shard(shard_of("uid-1"))).unwrap();
        let read: Persisted = serde_json::from_str(&text).unwrap();
        let mut read_tokens = TokenRecords::default();
        read_tokens.replace_shard(
            shard_of("uid-1"),
            serde_json::from_str(&shard_text).unwrap(),
        );
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
            budget: NamespaceBudget::new(usize::MAX),
        };
        assert_eq!(restored.state_json().unwrap(), text);
        assert_eq!(
            serde_json::to_string(restored.tokens.shard(shard_of("uid-1"))).unwrap(),
            shard_text
        );
        assert_eq!(
            restored.status_ref(restored.held("uid-1").next().unwrap()),
            a.status_ref
        );
    }

    /// An empty registry and empty shards, new records going to shard `open`.
    pub(super) fn empty_inner(open: usize) -> Inner {
        let config = RegistryConfig::new("https://i/statuslists/u", 86_400);
        Inner {
            registry: Registry::new(config).unwrap(),
            tokens: TokenRecords::default(),
            shards_written: vec![String::new(); SHARDS],
            dirty: BTreeSet::new(),
            open,
            published: BTreeMap::new(),
            configmap_rv: None,
            written: String::new(),
            version: 0,
            budget: NamespaceBudget::new(usize::MAX),
        }
    }

    /// Maintenance publishes only what is due: nothing while every list's token carries its
    /// statuses, has more than half its life left and was signed by the key that signs now; and
    /// bookkeeping that changes no status (records moved or forgotten) makes nothing due.
    #[test]
    pub(super) fn publication_is_due_only_for_a_change_of_status_age_or_key() {
        let mut inner = empty_inner(0);
        assert!(
            !inner.publication_due("k1", 100),
            "no list, nothing to publish"
        );
        let status_ref = inner.registry.allocate(100, 700).unwrap().status_ref;
        assert!(inner.publication_due("k1", 100), "a new list is published");
        let sign = |inner: &Inner, at: i64| {
            let (uri, list) = inner.registry.lists().next().unwrap();
            (
                data_key(uri),
                Published {
                    uri: uri.to_owned(),
                    token: "signed".into(),
                    claim: list.to_claim(),
                    exp: at + LIST_TOKEN_LIFETIME_SECS,
                    kid: "k1".into(),
                },
            )
        };
        let (key, published) = sign(&inner, 100);
        inner.published.insert(key.clone(), published);
        assert!(!inner.publication_due("k1", 100), "published and fresh");

        inner.edit_open("uid-1", |h| h.push(Held::new("a", 700, 0, status_ref.idx)));
        inner.tokens.forget_expired(800);
        assert!(
            !inner.publication_due("k1", 100),
            "records written or forgotten change no status"
        );
        assert!(inner.publication_due("k2", 100), "another key signs now");
        assert!(
            inner.publication_due("k1", 100 + LIST_TOKEN_LIFETIME_SECS - RESIGN_WHEN_LEFT_SECS),
            "half its life is gone"
        );
        inner.registry.revoke(&status_ref).unwrap();
        assert!(inner.publication_due("k1", 100), "a status changed");
        let (_, resigned) = sign(&inner, 100);
        inner.published.insert(key.clone(), resigned);
        assert!(!inner.publication_due("k1", 100));
        inner
            .published
            .insert("gone.jwt".into(), inner.published[&key].clone());
        assert!(
            inner.publication_due("k1", 100),
            "a list no longer live is still published"
        );
    }

    /// Records go to the open shard; a grant whose tokens were written by different flushes has
    /// records in several shards, and a revocation finds and removes all of them.
    #[test]
    pub(super) fn a_grants_records_are_found_and_taken_from_every_shard() {
        let mut inner = empty_inner(3);
        inner.edit_open("uid-1", |h| h.push(Held::new("a", 10, 0, 0)));
        inner.edit_open("uid-2", |h| h.push(Held::new("x", 10, 0, 1)));
        inner.dirty.clear();
        inner.open = 4;
        inner.edit_open("uid-1", |h| h.push(Held::new("b", 20, 0, 2)));
        assert_eq!(
            inner.dirty,
            BTreeSet::from([4]),
            "only the open shard is touched"
        );
        let ids: Vec<String> = inner.held("uid-1").map(Held::jti).collect();
        assert_eq!(ids, ["a", "b"]);
        inner.dirty.clear();
        let taken: Vec<String> = inner.take_held("uid-1").iter().map(Held::jti).collect();
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
    pub(super) fn a_withdrawn_plan_is_invalid_and_no_longer_the_grants() {
        let mut inner = empty_inner(0);
        let record = |inner: &mut Inner, uid: &str, jti: &str| {
            let status_ref = inner.registry.allocate(100, 700).unwrap().status_ref;
            let serial = status_ref.uri.rsplit('/').next().unwrap().parse().unwrap();
            inner.edit_open(uid, |h| h.push(Held::new(jti, 700, serial, status_ref.idx)));
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
            "the change is written by the next flush (the shell's withdraw runs one at once)"
        );
        assert_eq!(inner.registry.status(&planned).unwrap(), Status::Invalid);
        assert_eq!(inner.registry.status(&current).unwrap(), Status::Valid);
        assert_eq!(inner.registry.status(&other).unwrap(), Status::Valid);
        let ids: Vec<String> = inner.held("uid-1").map(Held::jti).collect();
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

    /// A namespace at its budget gets no entry (none is spent on it), while another namespace
    /// still does; the refused namespace's entries free up when their list retires.
    #[test]
    pub(super) fn a_namespace_over_its_budget_gets_no_entry_and_others_do() {
        let mut inner = empty_inner(0);
        inner.budget = NamespaceBudget::new(2);
        let first = inner.allocate_within_budget("churn", 100, 700).unwrap();
        inner.allocate_within_budget("churn", 100, 700).unwrap();
        let refused = inner.allocate_within_budget("churn", 100, 700);
        assert!(
            matches!(&refused, Err(Error::OverStatusListBudget(over)) if over.held == 2),
            "{refused:?}"
        );
        assert_eq!(inner.registry.usage().allocated, 2, "no entry spent on it");
        let other = inner.allocate_within_budget("quiet", 100, 700).unwrap();
        assert_eq!(
            other.idx,
            2 * (1 + crate::status_list::DEFAULT_LINEAGE_ENTRIES),
            "the next token's entry (each token has its lineage's after it), never a reused one"
        );
        let retires = inner.registry.retires_at(&first.uri).unwrap();
        inner.registry.prune(retires);
        inner.budget.release_retired(retires);
        assert!(
            inner
                .allocate_within_budget("churn", retires, retires + 600)
                .is_ok()
        );
    }

    #[test]
    pub(super) fn grants_spread_over_the_shards_and_keep_theirs() {
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
    pub(super) fn the_data_key_is_the_last_segment_of_the_uri() {
        assert_eq!(data_key("https://i/statuslists/abc/12"), "12.jwt");
    }
}

//! The grants cache: every watched grant, kept compressed.
//!
//! A grant as kube's reflector keeps it costs about 3 KiB of heap (the struct alone is 1 KiB, most of
//! it empty metadata fields), which puts 100,000 grants beyond the chart's memory limit. Here each
//! grant is kept as its JSON, LZ4-compressed against a dictionary its namespace shares: the grants of
//! one namespace repeat the same field names, audience, agent, principal, requester and condition
//! wording, so what remains per grant is mostly its own name, ids, digests and times.
//!
//! The JSON is what k8s-openapi writes: times to the second, as the apiserver writes its own. A
//! time a tenant wrote with a fraction of a second (a `validUntil`, a forged status) reads back
//! without the fraction, never later than written.
//!
//! Reading a grant decodes it (tens of microseconds, beside a reconcile's apiserver round trips).
//! Sweeps over every grant (metrics, wake-ups by audience or signing key) read a small
//! [`GrantSummary`] kept beside each grant instead, and never decode.
//!
//! A namespace's dictionary is the JSON of one of its grants. A grant that compresses poorly
//! against it (more than half its size remains) becomes the new dictionary; grants packed against
//! an older one keep theirs. A tenant whose grants share nothing thus costs about one JSON copy per
//! grant, less than the reflector did, and only in its own namespace.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use kube::{
    ResourceExt,
    runtime::{reflector::ObjectRef, watcher},
};

use super::interner::Interner;
use crate::api::DelegationGrant;

/// A grant's namespace and name.
type Key = (Arc<str>, Arc<str>);

/// What sweeps over every grant read, without decoding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantSummary {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub audience: Arc<str>,
    pub actor: Arc<str>,
    /// The key id (`kid`) that signed the grant's current token, as its status says.
    pub token_key_id: Option<Arc<str>>,
    /// When the grant's current token expires (Unix seconds), as its status says.
    pub token_expires_at: Option<i64>,
    /// The status of the grant's Ready condition: `True`, `False` or `Unknown` (none yet).
    pub ready: Ready,
}

impl GrantSummary {
    pub fn object_ref(&self) -> ObjectRef<DelegationGrant> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    True,
    False,
    Unknown,
}

impl Ready {
    pub fn as_str(self) -> &'static str {
        match self {
            Ready::True => "True",
            Ready::False => "False",
            Ready::Unknown => "Unknown",
        }
    }

    fn of(grant: &DelegationGrant) -> Self {
        let conditions = grant.status.as_ref().and_then(|s| s.conditions.as_deref());
        match crate::delegation::conditions::ready_condition(conditions).map(|c| c.status.as_str())
        {
            Some("True") => Ready::True,
            Some("False") => Ready::False,
            _ => Ready::Unknown,
        }
    }
}

/// One cached grant.
struct Entry {
    body: Body,
    audience: Arc<str>,
    actor: Arc<str>,
    token_key_id: Option<Arc<str>>,
    token_expires_at: Option<i64>,
    ready: Ready,
}

enum Body {
    /// The grant's JSON, LZ4-compressed against `dictionary` (its length prepended).
    Packed {
        bytes: Box<[u8]>,
        dictionary: Arc<[u8]>,
    },
    /// A grant whose JSON could not be written (never seen; kept whole rather than lost).
    Whole(Arc<DelegationGrant>),
}

#[derive(Default)]
struct State {
    grants: HashMap<Key, Entry>,
    /// A re-list in progress: what it has shown so far. Readers see the old list until it is done,
    /// as kube's reflector does.
    relist: Option<HashMap<Key, Entry>>,
    /// Each namespace's current dictionary.
    dictionaries: HashMap<Arc<str>, Arc<[u8]>>,
    /// Namespaces, names, audiences, agents and key ids, one copy each.
    strings: Interner<str>,
}

/// The grants cache. Filled by the grant watch ([`GrantCache::apply`]); read by reconciles.
#[derive(Default)]
pub struct GrantCache(RwLock<State>);

impl GrantCache {
    /// The grant as last seen by the watch, decoded.
    pub fn get(&self, grant: &ObjectRef<DelegationGrant>) -> Option<Arc<DelegationGrant>> {
        let namespace = grant.namespace.as_deref().unwrap_or_default();
        let key: Key = (Arc::from(namespace), Arc::from(grant.name.as_str()));
        let json = {
            let state = self.0.read().ok()?;
            match &state.grants.get(&key)?.body {
                Body::Whole(grant) => return Some(grant.clone()),
                Body::Packed { bytes, dictionary } => unpack(bytes, dictionary)?,
            }
        };
        match serde_json::from_slice(&json) {
            Ok(grant) => Some(Arc::new(grant)),
            Err(e) => {
                tracing::error!(grant = %grant, error = %e, "cached grant cannot be decoded");
                None
            }
        }
    }

    /// A summary of every cached grant.
    pub fn summaries(&self) -> Vec<GrantSummary> {
        let Ok(state) = self.0.read() else {
            return Vec::new();
        };
        state
            .grants
            .iter()
            .map(|((namespace, name), entry)| GrantSummary {
                namespace: namespace.clone(),
                name: name.clone(),
                audience: entry.audience.clone(),
                actor: entry.actor.clone(),
                token_key_id: entry.token_key_id.clone(),
                token_expires_at: entry.token_expires_at,
                ready: entry.ready,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.0.read().map_or(0, |s| s.grants.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one event of the grant watch.
    pub fn apply(&self, event: &watcher::Event<DelegationGrant>) {
        let Ok(mut state) = self.0.write() else {
            return;
        };
        match event {
            watcher::Event::Apply(grant) => {
                let (key, entry) = state.entry(grant);
                state.grants.insert(key, entry);
            }
            watcher::Event::Delete(grant) => {
                let key = state.key(grant);
                if let Some(entry) = state.grants.remove(&key) {
                    state.drop_unused_dictionary(&key.0, entry);
                }
            }
            watcher::Event::Init => state.relist = Some(HashMap::new()),
            watcher::Event::InitApply(grant) => {
                let (key, entry) = state.entry(grant);
                state.relist.get_or_insert_default().insert(key, entry);
            }
            watcher::Event::InitDone => {
                if let Some(listed) = state.relist.take() {
                    state.grants = listed;
                    state.dictionaries.retain(|_, d| Arc::strong_count(d) > 1);
                }
            }
        }
    }
}

impl State {
    fn key(&mut self, grant: &DelegationGrant) -> Key {
        (
            self.share(&grant.namespace().unwrap_or_default()),
            self.share(&grant.name_any()),
        )
    }

    fn share(&mut self, value: &str) -> Arc<str> {
        let mut shared = Arc::from(value);
        self.strings.share(&mut shared);
        shared
    }

    fn entry(&mut self, grant: &DelegationGrant) -> (Key, Entry) {
        let key = self.key(grant);
        let token = grant.status.as_ref().and_then(|s| s.token.as_ref());
        let entry = Entry {
            body: self.pack(&key.0, grant),
            audience: self.share(&grant.spec.audience),
            actor: self.share(&grant.spec.actor_ref.name),
            token_key_id: token.map(|t| self.share(&t.key_id)),
            token_expires_at: token.map(|t| t.expires_at.0.as_second()),
            ready: Ready::of(grant),
        };
        (key, entry)
    }

    fn pack(&mut self, namespace: &Arc<str>, grant: &DelegationGrant) -> Body {
        let json = match serde_json::to_vec(grant) {
            Ok(json) => json,
            Err(e) => {
                tracing::error!(grant = %grant.name_any(), error = %e, "grant kept uncompressed");
                return Body::Whole(Arc::new(grant.clone()));
            }
        };
        let current = self.dictionaries.get(namespace).cloned();
        let packed = current.and_then(|dictionary| {
            let bytes = lz4_flex::block::compress_prepend_size_with_dict(&json, &dictionary);
            (bytes.len() * 2 <= json.len()).then_some((bytes, dictionary))
        });
        let (bytes, dictionary) = packed.unwrap_or_else(|| {
            // No dictionary yet, or this grant shares little with it: it becomes the dictionary.
            let dictionary: Arc<[u8]> = Arc::from(json.as_slice());
            self.dictionaries
                .insert(namespace.clone(), dictionary.clone());
            let bytes = lz4_flex::block::compress_prepend_size_with_dict(&json, &dictionary);
            (bytes, dictionary)
        });
        let body = Body::Packed {
            bytes: bytes.into_boxed_slice(),
            dictionary,
        };
        debug_assert!(
            round_trips(&body, &json),
            "a cached grant must decode to what was cached"
        );
        body
    }

    /// Forgets a namespace's dictionary once no cached grant uses it.
    fn drop_unused_dictionary(&mut self, namespace: &Arc<str>, removed: Entry) {
        drop(removed);
        if self
            .dictionaries
            .get(namespace)
            .is_some_and(|d| Arc::strong_count(d) == 1)
        {
            self.dictionaries.remove(namespace);
        }
    }
}

fn unpack(bytes: &[u8], dictionary: &[u8]) -> Option<Vec<u8>> {
    match lz4_flex::block::decompress_size_prepended_with_dict(bytes, dictionary) {
        Ok(json) => Some(json),
        Err(e) => {
            tracing::error!(error = %e, "cached grant cannot be decompressed");
            None
        }
    }
}

/// Whether the packed grant decodes to a grant that writes exactly `json` again.
fn round_trips(body: &Body, json: &[u8]) -> bool {
    let Body::Packed { bytes, dictionary } = body else {
        return true;
    };
    unpack(bytes, dictionary)
        .and_then(|unpacked| serde_json::from_slice::<DelegationGrant>(&unpacked).ok())
        .and_then(|decoded| serde_json::to_vec(&decoded).ok())
        .is_some_and(|again| again == json)
}

impl std::fmt::Debug for GrantCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantCache")
            .field("grants", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    /// A Ready grant as the apiserver serves it, its ids and times its own.
    fn ready_grant(namespace: &str, i: usize) -> DelegationGrant {
        let name = format!("grant-{i:05}");
        serde_json::from_value(json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("0000000a-ad6f-4935-8260-{i:012x}"),
                "resourceVersion": format!("{}", 1000 + i), "generation": 1,
                "creationTimestamp": "2026-12-06T07:08:46Z", "finalizers": ["delegation.nhi.dev/revoke-tokens"]},
            "spec": {"actorRef": {"name": "agent"}, "audience": "https://tickets.example.com",
                "principal": {"kind": "User", "name": "alice@example.com"}, "scopes": ["tickets:read"],
                "tokenTTL": "10m", "requester": {"username": "admin", "groups": ["system:authenticated"]}},
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "Rotated", "observedGeneration": 1,
                    "lastTransitionTime": "2026-12-06T07:08:46Z",
                    "message": format!("token renewed for agent:{namespace}/agent on behalf of alice@example.com; expires at 2026-12-06T07:{:02}:10Z", i % 60)}],
                "chain": [{"kind": "User", "name": "alice@example.com"},
                    {"kind": "AgentIdentity", "name": "agent", "grant": name, "scopes": ["tickets:read"]}],
                "effectiveScopes": ["tickets:read"], "observedGeneration": 1,
                "secretName": format!("{name}-token"),
                "token": {"id": format!("0000000c-ad6f-4935-8260-{i:012x}"), "keyID": "18omIB0qfOK4WVNBWR_RERBE-E8JFYrnT8iFyVmtzhA",
                    "issuedAt": "2026-12-06T07:15:10Z", "expiresAt": "2026-12-06T07:25:10Z", "renewalTime": "2026-12-06T07:21:25Z",
                    "claimsDigest": format!("{i:064x}")},
            },
        }))
        .expect("a valid grant")
    }

    fn packed_len(cache: &GrantCache, namespace: &str, name: &str) -> usize {
        let state = cache.0.read().unwrap();
        match &state.grants[&(Arc::from(namespace), Arc::from(name))].body {
            Body::Packed { bytes, .. } => bytes.len(),
            Body::Whole(_) => panic!("kept whole"),
        }
    }

    fn get(cache: &GrantCache, namespace: &str, name: &str) -> Option<Arc<DelegationGrant>> {
        cache.get(&ObjectRef::new(name).within(namespace))
    }

    #[test]
    fn grants_of_one_namespace_are_kept_in_a_fraction_of_their_json() {
        let cache = GrantCache::default();
        let grants: Vec<_> = (0..200).map(|i| ready_grant("team", i)).collect();
        for g in &grants {
            cache.apply(&watcher::Event::Apply(g.clone()));
        }
        for g in &grants {
            assert_eq!(get(&cache, "team", &g.name_any()).as_deref(), Some(g));
        }
        let json = serde_json::to_vec(&grants[100]).unwrap().len();
        let packed = packed_len(&cache, "team", "grant-00100");
        assert!(
            packed * 3 < json,
            "{packed} bytes kept of a {json}-byte grant"
        );
        // One dictionary serves them all.
        assert_eq!(cache.0.read().unwrap().dictionaries.len(), 1);
    }

    #[test]
    fn a_grant_unlike_its_namespaces_dictionary_becomes_the_next_one_and_others_are_untouched() {
        let cache = GrantCache::default();
        cache.apply(&watcher::Event::Apply(ready_grant("team", 0)));
        cache.apply(&watcher::Event::Apply(ready_grant("other", 0)));
        let before = cache.0.read().unwrap().dictionaries[&Arc::<str>::from("other")].clone();
        let mut odd = ready_grant("team", 1);
        // Scopes that repeat nothing: most of this grant matches nothing in the dictionary.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        odd.spec.scopes = (0..200)
            .map(|_| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                format!("{seed:016x}")
            })
            .collect();
        cache.apply(&watcher::Event::Apply(odd.clone()));
        assert_eq!(get(&cache, "team", "grant-00001").as_deref(), Some(&odd));
        assert_eq!(
            get(&cache, "team", "grant-00000"),
            Some(Arc::new(ready_grant("team", 0)))
        );
        let state = cache.0.read().unwrap();
        let team = &state.dictionaries[&Arc::<str>::from("team")];
        assert!(
            **team == *serde_json::to_vec(&odd).unwrap(),
            "the odd grant is the dictionary"
        );
        assert!(Arc::ptr_eq(
            &state.dictionaries[&Arc::<str>::from("other")],
            &before
        ));
    }

    #[test]
    fn a_namespaces_dictionary_goes_with_its_last_grant() {
        let cache = GrantCache::default();
        let (a, b) = (ready_grant("team", 0), ready_grant("team", 1));
        cache.apply(&watcher::Event::Apply(a.clone()));
        cache.apply(&watcher::Event::Apply(b.clone()));
        cache.apply(&watcher::Event::Delete(a));
        assert!(get(&cache, "team", "grant-00000").is_none());
        assert_eq!(get(&cache, "team", "grant-00001").as_deref(), Some(&b));
        cache.apply(&watcher::Event::Delete(b));
        assert!(cache.is_empty());
        assert!(cache.0.read().unwrap().dictionaries.is_empty());
    }

    #[test]
    fn a_relist_replaces_the_cache_only_once_it_is_complete() {
        let cache = GrantCache::default();
        let (kept, gone) = (ready_grant("team", 0), ready_grant("other", 1));
        cache.apply(&watcher::Event::Apply(kept.clone()));
        cache.apply(&watcher::Event::Apply(gone.clone()));
        cache.apply(&watcher::Event::Init);
        let mut changed = kept.clone();
        changed.spec.scopes.push("tickets:write".into());
        cache.apply(&watcher::Event::InitApply(changed.clone()));
        // Readers see the old list while the new one comes in.
        assert_eq!(get(&cache, "team", "grant-00000").as_deref(), Some(&kept));
        assert!(get(&cache, "other", "grant-00001").is_some());
        cache.apply(&watcher::Event::InitDone);
        assert_eq!(
            get(&cache, "team", "grant-00000").as_deref(),
            Some(&changed)
        );
        assert!(get(&cache, "other", "grant-00001").is_none());
        assert_eq!(cache.len(), 1);
        // The namespace whose grants all went loses its dictionary too.
        let state = cache.0.read().unwrap();
        assert!(!state.dictionaries.contains_key(&Arc::<str>::from("other")));
    }

    #[test]
    fn the_summary_says_what_sweeps_read() {
        let cache = GrantCache::default();
        let ready = ready_grant("team", 7);
        let mut pending = ready_grant("team", 8);
        pending.status = None;
        pending.spec.audience = "https://mail.example.com".into();
        cache.apply(&watcher::Event::Apply(ready));
        cache.apply(&watcher::Event::Apply(pending));
        let mut summaries = cache.summaries();
        summaries.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(summaries.len(), 2);
        let (r, p) = (&summaries[0], &summaries[1]);
        assert_eq!(
            (&*r.namespace, &*r.name, &*r.actor),
            ("team", "grant-00007", "agent")
        );
        assert_eq!(&*r.audience, "https://tickets.example.com");
        assert_eq!(
            r.token_key_id.as_deref(),
            Some("18omIB0qfOK4WVNBWR_RERBE-E8JFYrnT8iFyVmtzhA")
        );
        assert_eq!(r.token_expires_at, Some(1_796_541_910));
        assert_eq!(r.ready, Ready::True);
        assert_eq!(
            (
                &*p.audience,
                p.token_key_id.as_deref(),
                p.token_expires_at,
                p.ready
            ),
            ("https://mail.example.com", None, None, Ready::Unknown)
        );
        assert_eq!(r.object_ref(), ObjectRef::new("grant-00007").within("team"));
    }

    #[test]
    fn a_time_with_a_fraction_of_a_second_reads_back_to_the_second_before() {
        let cache = GrantCache::default();
        let mut value = serde_json::to_value(ready_grant("team", 0)).unwrap();
        value["spec"]["validUntil"] = json!("2030-01-01T09:30:00.999999+02:00");
        value["status"]["conditions"][0]["lastTransitionTime"] = json!("2026-12-06T07:08:46.5Z");
        let grant: DelegationGrant = serde_json::from_value(value).unwrap();
        cache.apply(&watcher::Event::Apply(grant.clone()));
        let read = get(&cache, "team", "grant-00000").unwrap();
        let until = read.spec.valid_until.as_ref().unwrap().0;
        assert_eq!(until.to_string(), "2030-01-01T07:30:00Z");
        assert!(until <= grant.spec.valid_until.as_ref().unwrap().0);
        let condition = &read.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
        assert_eq!(
            condition.last_transition_time.0.to_string(),
            "2026-12-06T07:08:46Z"
        );
        // All else as it was.
        let mut expected = grant.clone();
        expected.spec.valid_until = read.spec.valid_until.clone();
        expected.status.as_mut().unwrap().conditions =
            read.status.as_ref().unwrap().conditions.clone();
        assert_eq!(*read, expected);
    }

    #[test]
    fn a_forged_status_larger_than_lz4s_window_still_reads_back_and_so_do_its_neighbours() {
        let cache = GrantCache::default();
        let mut huge = ready_grant("team", 0);
        let conditions = huge.status.as_mut().unwrap().conditions.as_mut().unwrap();
        conditions[0].message = "forged ".repeat(40_000);
        cache.apply(&watcher::Event::Apply(huge.clone()));
        // Packed against the 280 KB dictionary the forged grant became, then against the next one.
        let after: Vec<_> = (1..4).map(|i| ready_grant("team", i)).collect();
        for g in &after {
            cache.apply(&watcher::Event::Apply(g.clone()));
        }
        assert_eq!(get(&cache, "team", "grant-00000").as_deref(), Some(&huge));
        for g in &after {
            assert_eq!(get(&cache, "team", &g.name_any()).as_deref(), Some(g));
        }
    }

    /// Any text a tenant may write, including what JSON escapes.
    fn hostile_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9.-]{1,40}",
            any::<String>(),
            Just("\"\\\u{0}\u{2028}</script>é😀".to_owned()),
        ]
    }

    proptest! {
        #[test]
        fn every_grant_decodes_to_what_was_cached(
            scopes in prop::collection::vec(hostile_text(), 0..6),
            audience in hostile_text(),
            message in hostile_text(),
            until in prop_oneof![Just(Value::Null), Just(json!("2030-01-01T09:30:00+02:00")),
                Just(json!("not a time")), Just(json!("9999-12-31T00:00:00Z"))],
            details in prop_oneof![Just(Value::Null),
                Just(json!([{"type": "t", "actions": ["read"], "locations": ["https://x"]}]))],
            namespaces in 1usize..4,
        ) {
            let cache = GrantCache::default();
            let mut cached = Vec::new();
            for i in 0..8 {
                let namespace = format!("ns-{}", i % namespaces);
                let mut value = serde_json::to_value(ready_grant(&namespace, i)).unwrap();
                value["spec"]["scopes"] = json!(scopes);
                value["spec"]["audience"] = json!(audience);
                value["spec"]["validUntil"] = until.clone();
                value["spec"]["authorizationDetails"] = details.clone();
                value["status"]["conditions"][0]["message"] = json!(format!("{message}{i}"));
                let grant: DelegationGrant = serde_json::from_value(value).unwrap();
                cache.apply(&watcher::Event::Apply(grant.clone()));
                cached.push((namespace, grant));
            }
            for (namespace, grant) in &cached {
                let decoded = get(&cache, namespace, &grant.name_any());
                prop_assert_eq!(decoded.as_deref(), Some(grant));
            }
        }
    }
}

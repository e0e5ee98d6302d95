//! The token Secrets the operator watches, kept compact: of each Secret only what decisions read —
//! its uid, its resourceVersion and the grant that controls it.
//!
//! A kube-rs store would keep each Secret's whole metadata (an `ObjectMeta` of ~0.5 KiB before its
//! strings) plus a key of four more strings; this keeps about a quarter of that, which is one
//! kilobyte less per grant. [`SecretCache::get`] hands back the same metadata a store would have
//! held, as far as anyone reads it.
//!
//! It is fed the watch's events in order, as a reflector would be: a relist (`Init` … `InitDone`)
//! is collected aside and replaces the cache whole when complete, so the cache never shows half a
//! list, and a Secret deleted while the watch was down is gone after the relist.

use std::{collections::HashMap, sync::RwLock};

use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt, api::PartialObjectMeta, runtime::watcher};

use crate::api::DelegationGrant;
use crate::operator::caches::context::key;

/// What is kept of one token Secret.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    uid: Option<Box<str>>,
    resource_version: Option<Box<str>>,
    /// The grant named by its controller owner reference, as (name, uid).
    controller: Option<(Box<str>, Box<str>)>,
}

#[derive(Default)]
struct State {
    /// By a [`key`] of (namespace, name).
    live: HashMap<u64, Entry>,
    /// A relist being collected.
    relist: Option<HashMap<u64, Entry>>,
}

/// Token Secrets' metadata, as far as the operator reads it (see the module doc).
#[derive(Default)]
pub struct SecretCache(RwLock<State>);

impl SecretCache {
    /// Applies one watch event; call it for every event, in order.
    pub fn apply(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        let Ok(mut state) = self.0.write() else {
            return;
        };
        match event {
            watcher::Event::Apply(secret) => {
                state.live.insert(key_of(secret), entry(secret));
            }
            watcher::Event::Delete(secret) => {
                state.live.remove(&key_of(secret));
            }
            watcher::Event::Init => state.relist = Some(HashMap::new()),
            watcher::Event::InitApply(secret) => {
                state
                    .relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key_of(secret), entry(secret));
            }
            watcher::Event::InitDone => {
                if let Some(mut listed) = state.relist.take() {
                    listed.shrink_to_fit();
                    state.live = listed;
                }
            }
        }
    }

    /// The Secret's metadata as the watch last showed it: name, namespace, uid, resourceVersion and
    /// its controller owner reference when that is a DelegationGrant. Labels, annotations and other
    /// owner references are not kept.
    pub fn get(&self, namespace: &str, name: &str) -> Option<PartialObjectMeta<Secret>> {
        let state = self.0.read().ok()?;
        let entry = state.live.get(&key(&(namespace, name)))?;
        Some(PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                uid: entry.uid.as_deref().map(str::to_owned),
                resource_version: entry.resource_version.as_deref().map(str::to_owned),
                owner_references: entry.controller.as_ref().map(|(name, uid)| {
                    vec![OwnerReference {
                        api_version: DelegationGrant::api_version(&()).into_owned(),
                        kind: DelegationGrant::kind(&()).into_owned(),
                        name: name.to_string(),
                        uid: uid.to_string(),
                        controller: Some(true),
                        block_owner_deletion: None,
                    }]
                }),
                ..ObjectMeta::default()
            },
            _phantom: Default::default(),
        })
    }
}

fn key_of(secret: &PartialObjectMeta<Secret>) -> u64 {
    key(&(
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.name_any().as_str(),
    ))
}

fn entry(secret: &PartialObjectMeta<Secret>) -> Entry {
    let meta = &secret.metadata;
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true) && r.kind == DelegationGrant::kind(&()))
        .map(|r| (r.name.as_str().into(), r.uid.as_str().into()));
    Entry {
        uid: meta.uid.as_deref().map(Into::into),
        resource_version: meta.resource_version.as_deref().map(Into::into),
        controller,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, rv: &str, owners: Vec<OwnerReference>) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                resource_version: Some(rv.into()),
                owner_references: Some(owners),
                ..ObjectMeta::default()
            },
            _phantom: Default::default(),
        }
    }

    fn owner(kind: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: "g".into(),
            uid: "grant-uid".into(),
            controller: Some(controller),
            block_owner_deletion: None,
        }
    }

    #[test]
    fn keeps_the_controlling_grant_and_nothing_else_of_the_owners() {
        let cache = SecretCache::default();
        let owners = vec![owner("ConfigMap", true), owner("DelegationGrant", false)];
        cache.apply(&watcher::Event::Apply(secret("a", "1", owners)));
        let got = cache.get("ns", "a").unwrap();
        assert_eq!(got.metadata.uid.as_deref(), Some("uid-a"));
        assert_eq!(got.metadata.resource_version.as_deref(), Some("1"));
        assert_eq!(got.metadata.owner_references, None, "no grant controls it");

        let controlled = secret("b", "2", vec![owner("DelegationGrant", true)]);
        cache.apply(&watcher::Event::Apply(controlled.clone()));
        let got = cache.get("ns", "b").unwrap();
        let refs = got.metadata.owner_references.unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(
            (
                refs[0].kind.as_str(),
                refs[0].name.as_str(),
                refs[0].uid.as_str()
            ),
            ("DelegationGrant", "g", "grant-uid")
        );
        assert_eq!(refs[0].controller, Some(true));
        assert!(cache.get("other", "b").is_none(), "namespaces are apart");
    }

    #[test]
    fn applies_and_deletes_update_the_cache() {
        let cache = SecretCache::default();
        cache.apply(&watcher::Event::Apply(secret("a", "1", vec![])));
        cache.apply(&watcher::Event::Apply(secret("a", "7", vec![])));
        let rv = cache.get("ns", "a").unwrap().metadata.resource_version;
        assert_eq!(rv.as_deref(), Some("7"));
        cache.apply(&watcher::Event::Delete(secret("a", "8", vec![])));
        assert!(cache.get("ns", "a").is_none());
    }

    #[test]
    fn a_relist_replaces_the_cache_only_when_complete() {
        let cache = SecretCache::default();
        cache.apply(&watcher::Event::Apply(secret("gone", "1", vec![])));
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(secret("new", "2", vec![])));
        assert!(
            cache.get("ns", "gone").is_some(),
            "the old list serves until the new one is in"
        );
        assert!(cache.get("ns", "new").is_none());
        cache.apply(&watcher::Event::InitDone);
        assert!(
            cache.get("ns", "gone").is_none(),
            "deleted while the watch was down"
        );
        assert!(cache.get("ns", "new").is_some());
    }
}

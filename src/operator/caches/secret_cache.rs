//! The token Secrets the operator watches, kept compact: of each Secret only what decisions read —
//! its uid, its resourceVersion and the grant that controls it.
//!
//! A kube-rs store would keep each Secret's whole metadata (an `ObjectMeta` of ~0.5 KiB before its
//! strings) plus a key of four more strings. Here a token Secret as the operator writes it — uids
//! that are canonical UUIDs, a decimal resourceVersion, and a controlling grant whose name begins
//! the Secret's name (`<grant>-token` by default) — is 48 bytes without a single allocation of its
//! own; any other Secret is kept as written. [`SecretCache::get`] hands back the same metadata a
//! store would have held, as far as anyone reads it.
//!
//! Secrets are found by a 64-bit hash of `(namespace, name)` keyed at random per process: no one
//! outside can choose names whose hash matches another namespace's Secret, and a chance collision
//! among 100,000 Secrets has a probability of about 3·10⁻¹⁰.
//!
//! It is fed the watch's events in order, as a reflector would be: a relist (`Init` … `InitDone`)
//! is collected aside and replaces the cache whole when complete, so the cache never shows half a
//! list, and a Secret deleted while the watch was down is gone after the relist.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::RwLock,
};

use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt, api::PartialObjectMeta, runtime::watcher};

use crate::api::DelegationGrant;
use crate::operator::caches::ids::{uuid_bytes, uuid_text};

/// What is kept of one token Secret.
#[derive(Clone, Debug, PartialEq)]
enum Entry {
    /// A token Secret as the operator writes it, in 48 bytes.
    Compact {
        uid: [u8; 16],
        /// The uid of the grant named by its controller owner reference.
        grant_uid: [u8; 16],
        resource_version: u64,
        /// That grant's name is this long a beginning of the Secret's name.
        grant_name_len: u32,
    },
    /// Any other, as written.
    Spelled(Box<Spelled>),
}

#[derive(Clone, Debug, PartialEq)]
struct Spelled {
    uid: Option<Box<str>>,
    resource_version: Option<Box<str>>,
    /// The grant named by its controller owner reference, as (name, uid).
    controller: Option<(Box<str>, Box<str>)>,
}

impl Entry {
    fn new(name: &str, spelled: Spelled) -> Self {
        Self::compact(name, &spelled).unwrap_or_else(|| Entry::Spelled(Box::new(spelled)))
    }

    fn compact(name: &str, spelled: &Spelled) -> Option<Self> {
        let (grant_name, grant_uid) = spelled.controller.as_ref()?;
        let version = spelled.resource_version.as_deref()?;
        let resource_version: u64 = version.parse().ok()?;
        (resource_version.to_string() == version && name.starts_with(&**grant_name))
            .then_some(())?;
        Some(Entry::Compact {
            uid: uuid_bytes(spelled.uid.as_deref()?)?,
            grant_uid: uuid_bytes(grant_uid)?,
            resource_version,
            grant_name_len: u32::try_from(grant_name.len()).ok()?,
        })
    }

    /// What was kept, as written, of the Secret named `name`.
    fn spelled(&self, name: &str) -> Spelled {
        match self {
            Entry::Compact {
                uid,
                grant_uid,
                resource_version,
                grant_name_len,
            } => Spelled {
                uid: Some(uuid_text(uid).as_str().into()),
                resource_version: Some(resource_version.to_string().into()),
                controller: Some((
                    name.get(..*grant_name_len as usize)
                        .unwrap_or_default()
                        .into(),
                    uuid_text(grant_uid).as_str().into(),
                )),
            },
            Entry::Spelled(spelled) => (**spelled).clone(),
        }
    }
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
pub struct SecretCache {
    state: RwLock<State>,
    /// Keys the hash of `(namespace, name)`, at random.
    keys: RandomState,
}

impl SecretCache {
    /// Applies one watch event; call it for every event, in order.
    pub fn apply(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        let Ok(mut state) = self.state.write() else {
            return;
        };
        match event {
            watcher::Event::Apply(secret) => {
                state.live.insert(self.key_of(secret), entry(secret));
            }
            watcher::Event::Delete(secret) => {
                state.live.remove(&self.key_of(secret));
            }
            watcher::Event::Init => state.relist = Some(HashMap::new()),
            watcher::Event::InitApply(secret) => {
                state
                    .relist
                    .get_or_insert_with(HashMap::new)
                    .insert(self.key_of(secret), entry(secret));
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
        let entry = {
            let state = self.state.read().ok()?;
            state.live.get(&self.key(namespace, name))?.spelled(name)
        };
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

    fn key(&self, namespace: &str, name: &str) -> u64 {
        self.keys.hash_one((namespace, name))
    }

    fn key_of(&self, secret: &PartialObjectMeta<Secret>) -> u64 {
        self.key(
            secret.metadata.namespace.as_deref().unwrap_or_default(),
            &secret.name_any(),
        )
    }
}

fn entry(secret: &PartialObjectMeta<Secret>) -> Entry {
    let meta = &secret.metadata;
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true) && r.kind == DelegationGrant::kind(&()))
        .map(|r| (r.name.as_str().into(), r.uid.as_str().into()));
    let spelled = Spelled {
        uid: meta.uid.as_deref().map(Into::into),
        resource_version: meta.resource_version.as_deref().map(Into::into),
        controller,
    };
    Entry::new(&secret.name_any(), spelled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn a_token_secret_as_the_operator_writes_it_costs_no_allocation_of_its_own() {
        assert_eq!(std::mem::size_of::<Entry>(), 48);
        let mut secret = secret("g-token", "27926", vec![]);
        secret.metadata.uid = Some("0000000d-ad6f-4935-8260-000000000001".into());
        let mut grant = owner("DelegationGrant", true);
        grant.uid = "0000000a-ad6f-4935-8260-000000000001".into();
        secret.metadata.owner_references = Some(vec![grant]);
        assert!(matches!(entry(&secret), Entry::Compact { .. }));
    }

    fn any_uid() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<[u8; 16]>().prop_map(|b| uuid_text(&b).as_str().to_owned()),
            any::<[u8; 16]>().prop_map(|b| uuid_text(&b).as_str().to_uppercase()),
            "[a-z0-9-]{0,12}",
        ]
    }

    proptest! {
        /// Whatever the Secret's metadata, the cache hands back what it kept of it, as written.
        #[test]
        fn the_cache_gives_back_what_it_was_given(
            name in "[a-z]{0,6}(-token)?",
            uid in proptest::option::of(any_uid()),
            rv in proptest::option::of(prop_oneof![
                any::<u64>().prop_map(|n| n.to_string()),
                "0[0-9]{1,3}",
                "[a-z0-9]{0,4}",
            ]),
            grant in proptest::option::of((0usize..8, "[a-z]{0,4}", any_uid(), any::<bool>())),
        ) {
            let owners = grant.as_ref().map(|(prefix, other, grant_uid, is_prefix)| {
                let grant_name = if *is_prefix {
                    name.get(..*prefix).unwrap_or(&name).to_owned()
                } else {
                    other.clone()
                };
                vec![OwnerReference {
                    name: grant_name,
                    uid: grant_uid.clone(),
                    ..owner("DelegationGrant", true)
                }]
            });
            let given = PartialObjectMeta::<Secret> {
                types: None,
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some("ns".into()),
                    uid: uid.clone(),
                    resource_version: rv.clone(),
                    owner_references: owners.clone(),
                    ..ObjectMeta::default()
                },
                _phantom: Default::default(),
            };
            let cache = SecretCache::default();
            cache.apply(&watcher::Event::Apply(given));
            let got = cache.get("ns", &name).unwrap().metadata;
            prop_assert_eq!(got.uid, uid);
            prop_assert_eq!(got.resource_version, rv);
            let controller = |refs: Option<Vec<OwnerReference>>| {
                refs.and_then(|r| r.into_iter().next()).map(|r| (r.name, r.uid))
            };
            prop_assert_eq!(controller(got.owner_references), controller(owners));
        }
    }
}

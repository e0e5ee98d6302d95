//! What the caches keep of an object's metadata: what decisions read, and nothing a tenant can make
//! large. Anyone who may create a grant may attach up to the apiserver's object size limit (about
//! 1.5 MB) of owner references, finalizers, labels and annotations to it; cached whole, a hundred such
//! grants exhaust the operator's memory limit. The watches prune every object with these functions
//! before it enters a cache.
//!
//! Kept: name, namespace, uid, resourceVersion, generation, creationTimestamp and the deletion
//! fields. Reduced: a grant's finalizers (the operator's own, see [`grant_finalizers`]) and a token
//! Secret's owner references (the grant that controls it). Dropped: everything else.
//!
//! Nothing writes a cached object back whole: status writes go to the status subresource (the
//! apiserver takes only `status` from them) and every metadata write is a patch of the operator's own
//! fields, so what is pruned here never reaches the apiserver.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::{api::DelegationGrant, operator::FINALIZER};

/// The most finalizers besides the operator's own that a grant keeps in the cache as they are, as
/// many as the admission policy `delegation-operator-metadata-bounds` lets a grant carry.
pub const KEPT_FINALIZERS: usize = 8;

/// Stands in the cache for the finalizers of a grant that had more than [`KEPT_FINALIZERS`]. Not a
/// qualified name, so no real finalizer is ever mistaken for it, and the apiserver refuses it should
/// it ever be written (it is not: see [`finalizers_pruned`]).
pub const FINALIZERS_NOT_CACHED: &str = "(more finalizers, not cached)";

/// Drops everything of an object's metadata that tenants write and no decision reads: labels,
/// annotations, owner references, finalizers, generateName and managedFields.
pub fn unread_metadata(meta: &mut ObjectMeta) {
    meta.labels = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.managed_fields = None;
}

/// A grant's metadata as decisions read it: [`unread_metadata`] but for its finalizers, of which the
/// operator reads whether its own is there (and where, to take it off with a tested patch, see
/// `grants::revoke::remove_finalizer`) and, when adding its own, the whole list. A list within the
/// admission policy's bound is kept as it is; a longer one (created without the policy) becomes the
/// operator's own finalizer if present and [`FINALIZERS_NOT_CACHED`], and the two writes read the live
/// grant instead.
pub fn grant_finalizers(grant: &mut DelegationGrant) {
    let finalizers = grant.metadata.finalizers.take();
    unread_metadata(&mut grant.metadata);
    grant.metadata.finalizers = finalizers.map(|list| {
        let ours = list.iter().any(|f| f == FINALIZER);
        if list.len() <= KEPT_FINALIZERS + usize::from(ours) {
            return list;
        }
        let mut kept: Vec<String> = ours.then(|| FINALIZER.to_owned()).into_iter().collect();
        kept.push(FINALIZERS_NOT_CACHED.to_owned());
        kept
    });
}

/// Whether the cached grant's finalizers were reduced by [`grant_finalizers`]: a write of the list
/// must then start from the live grant.
pub fn finalizers_pruned(grant: &DelegationGrant) -> bool {
    grant
        .metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZERS_NOT_CACHED)
}

/// A token Secret's metadata as decisions read it: [`unread_metadata`] but for its owner references,
/// of which only the DelegationGrant that controls it counts (ownership, orphan sweeps, the
/// controller's wake-ups). Labels and annotations are read before this, by the Secret watch itself.
pub fn secret_owner(meta: &mut ObjectMeta) {
    let owners = meta.owner_references.take();
    unread_metadata(meta);
    meta.owner_references = owners
        .map(|refs| {
            refs.into_iter()
                .filter(|r| r.controller == Some(true) && r.kind == "DelegationGrant")
                .take(1)
                .collect::<Vec<_>>()
        })
        .filter(|refs| !refs.is_empty());
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::ResourceExt;

    use super::*;

    /// About 1 MB of owner references naming owners that do not exist (never garbage-collected).
    fn hostile_owners() -> Vec<OwnerReference> {
        (0..5_000)
            .map(|i| OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: format!("{i:0>150}"),
                uid: format!("00000000-0000-0000-0000-{i:0>12}"),
                controller: None,
                block_owner_deletion: None,
            })
            .collect()
    }

    fn hostile_grant(finalizers: usize) -> DelegationGrant {
        let mut grant: DelegationGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
            "metadata": {"name": "g", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z",
                "generateName": "x".repeat(200),
                "labels": {"a": "b"}, "annotations": {"big": "y".repeat(200_000)}},
            "spec": {"principal": {"kind": "User", "name": "alice"}, "actorRef": {"name": "a"},
                "scopes": ["s"], "audience": "https://api", "tokenTTL": "10m"},
        }))
        .unwrap();
        grant.metadata.owner_references = Some(hostile_owners());
        let mut list: Vec<String> = (0..finalizers)
            .map(|i| format!("example.com/f{i:0>40}"))
            .collect();
        list.push(FINALIZER.to_owned());
        grant.metadata.finalizers = Some(list);
        grant
    }

    fn size(value: &impl serde::Serialize) -> usize {
        serde_json::to_vec(value).unwrap().len()
    }

    #[test]
    fn a_grant_keeps_nothing_of_a_megabyte_of_hostile_metadata() {
        let mut grant = hostile_grant(3_000);
        let before = size(&grant);
        assert!(before > 1_000_000, "{before}");
        grant_finalizers(&mut grant);
        let meta = &grant.metadata;
        assert_eq!(meta.owner_references, None);
        assert_eq!((&meta.labels, &meta.annotations), (&None, &None));
        assert_eq!(meta.generate_name, None);
        assert_eq!(
            meta.finalizers.as_deref(),
            Some(&[FINALIZER.to_owned(), FINALIZERS_NOT_CACHED.to_owned()][..])
        );
        assert!(finalizers_pruned(&grant));
        // What decisions read is all there.
        assert_eq!(meta.uid.as_deref(), Some("u"));
        assert_eq!(meta.resource_version.as_deref(), Some("7"));
        assert_eq!(meta.generation, Some(1));
        assert!(meta.creation_timestamp.is_some());
        assert!(size(&grant) < 1_000, "{} bytes left", size(&grant));
    }

    #[test]
    fn a_grants_finalizers_within_the_admission_bound_are_kept_as_they_are() {
        let mut grant = hostile_grant(KEPT_FINALIZERS);
        let list = grant.metadata.finalizers.clone();
        grant_finalizers(&mut grant);
        assert_eq!(grant.metadata.finalizers, list);
        assert!(!finalizers_pruned(&grant));
    }

    #[test]
    fn a_long_list_without_the_operators_finalizer_stays_without_it() {
        let mut grant = hostile_grant(KEPT_FINALIZERS);
        grant
            .metadata
            .finalizers
            .as_mut()
            .unwrap()
            .retain(|f| f != FINALIZER);
        grant
            .metadata
            .finalizers
            .as_mut()
            .unwrap()
            .push("x/y".into());
        grant_finalizers(&mut grant);
        assert_eq!(
            grant.metadata.finalizers.as_deref(),
            Some(&[FINALIZERS_NOT_CACHED.to_owned()][..])
        );
        assert!(!grant.finalizers().iter().any(|f| f == FINALIZER));
    }

    #[test]
    fn a_secret_keeps_only_the_grant_that_controls_it() {
        let mut owners = hostile_owners();
        let controller = OwnerReference {
            api_version: "delegation.nhi.dev/v1alpha1".into(),
            kind: "DelegationGrant".into(),
            name: "g".into(),
            uid: "grant-uid".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        owners.insert(2_500, controller.clone());
        let mut meta = ObjectMeta {
            owner_references: Some(owners),
            ..ObjectMeta::default()
        };
        secret_owner(&mut meta);
        assert_eq!(meta.owner_references, Some(vec![controller]));
        let mut foreign = ObjectMeta {
            owner_references: Some(hostile_owners()),
            ..ObjectMeta::default()
        };
        secret_owner(&mut foreign);
        assert_eq!(foreign.owner_references, None);
    }
}

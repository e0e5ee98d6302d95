//! The leader Lease's owner, our own ServiceAccount, so uninstall deletes it; called by `run` only.

use k8s_openapi::{
    api::{authentication::v1::SelfSubjectReview, coordination::v1::Lease},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{Api, Client, api::PostParams};

use super::{FIELD_MANAGER, LEASE_NAME, error};

/// How many times a write of the owner that conflicts is tried again (a conflict means the Lease
/// changed since it was read: read again and see whether there is still something to add).
const ATTEMPTS: usize = 3;

/// The owner reference to the ServiceAccount this process authenticates as, when it is one in the
/// operator namespace (the Lease's): the apiserver says who we are in a SelfSubjectReview, which any
/// authenticated user may create (no RBAC of ours). `None` for any other identity (a person's
/// kubeconfig), and when the review fails: the Lease then has no owner and outlives an uninstall.
pub async fn service_account_owner(
    client: &Client,
    operator_namespace: &str,
) -> Option<OwnerReference> {
    let user = match Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
    {
        Ok(review) => review.status.and_then(|s| s.user_info).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "could not learn this replica's identity (SelfSubjectReview): the leader Lease gets \
                 no owner, so it outlives an uninstall and a reinstall waits out its duration"
            );
            return None;
        }
    };
    let username = user.username.unwrap_or_default();
    match owner_of(&username, user.uid.as_deref(), operator_namespace) {
        Ok(owner) => {
            tracing::info!(
                service_account = %owner.name,
                uid = %owner.uid,
                "the leader Lease will be owned by this replica's ServiceAccount: it goes with it"
            );
            Some(owner)
        }
        Err(why) => {
            tracing::info!(user = %username, "the leader Lease gets no owner: {why}");
            None
        }
    }
}

/// The owner reference to the ServiceAccount `username` names (`system:serviceaccount:<ns>:<name>`,
/// `uid` being the ServiceAccount's), or why there is none. Only a ServiceAccount of the operator
/// namespace can own the Lease: an owner reference never crosses namespaces (a garbage collector
/// would look for the owner in the Lease's namespace, find nothing, and delete the Lease).
fn owner_of(
    username: &str,
    uid: Option<&str>,
    operator_namespace: &str,
) -> Result<OwnerReference, String> {
    let Some((namespace, name)) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err("this replica does not run as a ServiceAccount".into());
    };
    if namespace != operator_namespace {
        return Err(format!(
            "its ServiceAccount is in namespace {namespace:?}, not in the operator namespace \
             {operator_namespace:?} (an owner must be in the Lease's namespace)"
        ));
    }
    let uid = uid.filter(|u| !u.is_empty()).ok_or_else(|| {
        format!("the apiserver gave no uid for ServiceAccount {namespace}/{name}")
    })?;
    if name.is_empty() {
        return Err("the ServiceAccount has no name".into());
    }
    Ok(OwnerReference {
        api_version: "v1".into(),
        kind: "ServiceAccount".into(),
        name: name.into(),
        uid: uid.into(),
        // Neither: the ServiceAccount's deletion must not wait on the Lease, nor is it a controller.
        block_owner_deletion: None,
        controller: None,
    })
}

/// Adds `owner` to the owner references of the leader Lease in `namespace`, keeping every other
/// one; writes nothing when it is there already, when the Lease is gone, or when `identity` does
/// not hold it. Called as this replica starts leading, long before its first renewal (a retry
/// period later), so that the two writes do not meet. With `get` and `update` (the rights leader
/// election needs) and nothing more. Best-effort: a failure is logged and leadership goes on.
pub async fn ensure_owner(
    client: &Client,
    namespace: &str,
    identity: &str,
    owner: &OwnerReference,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    for _ in 0..ATTEMPTS {
        match add_owner(&leases, identity, owner).await {
            Ok(()) => return,
            Err(e) if error::is_conflict(&e) => continue,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    lease = LEASE_NAME,
                    "could not make the leader Lease owned by this replica's ServiceAccount: it \
                     outlives an uninstall, and a reinstall waits out its duration"
                );
                return;
            }
        }
    }
    tracing::warn!(
        lease = LEASE_NAME,
        "could not make the leader Lease owned by this replica's ServiceAccount: every write \
         conflicted with another"
    );
}

async fn add_owner(
    leases: &Api<Lease>,
    identity: &str,
    owner: &OwnerReference,
) -> Result<(), kube::Error> {
    let Some(mut lease) = leases.get_opt(LEASE_NAME).await? else {
        return Ok(());
    };
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref());
    if holder != Some(identity) {
        return Ok(());
    }
    let Some(owners) = with_owner(lease.metadata.owner_references.take(), owner) else {
        return Ok(());
    };
    lease.metadata.owner_references = Some(owners);
    // A replace at the resourceVersion read: it conflicts if anyone wrote the Lease since.
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    leases.replace(LEASE_NAME, &params, &lease).await?;
    tracing::info!(
        lease = LEASE_NAME,
        service_account = %owner.name,
        "the leader Lease is now owned by this replica's ServiceAccount"
    );
    Ok(())
}

/// `owners` with `owner` added after the others, or `None` when one with its uid is there already.
fn with_owner(
    owners: Option<Vec<OwnerReference>>,
    owner: &OwnerReference,
) -> Option<Vec<OwnerReference>> {
    let mut owners = owners.unwrap_or_default();
    if owners.iter().any(|o| o.uid == owner.uid) {
        return None;
    }
    owners.push(owner.clone());
    Some(owners)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(kind: &str, name: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_service_account_of_the_operator_namespace_owns_the_lease() {
        let owner = owner_of("system:serviceaccount:ops:operator", Some("u-1"), "ops").unwrap();
        assert_eq!(owner, reference("ServiceAccount", "operator", "u-1"));
        assert_eq!(owner.block_owner_deletion, None);
        assert_eq!(owner.controller, None);
    }

    #[test]
    fn no_other_identity_owns_the_lease() {
        assert!(owner_of("admin", Some("u-1"), "ops").is_err());
        assert!(owner_of("system:serviceaccount:other:operator", Some("u-1"), "ops").is_err());
        assert!(owner_of("system:serviceaccount:ops:operator", None, "ops").is_err());
        assert!(owner_of("system:serviceaccount:ops:operator", Some(""), "ops").is_err());
        assert!(owner_of("system:serviceaccount:ops:", Some("u-1"), "ops").is_err());
        assert!(owner_of("system:serviceaccount:ops", Some("u-1"), "ops").is_err());
    }

    #[test]
    fn the_owner_is_added_once_and_others_are_kept() {
        let ours = reference("ServiceAccount", "operator", "u-1");
        let other = reference("ConfigMap", "something", "u-2");
        assert_eq!(with_owner(None, &ours), Some(vec![ours.clone()]));
        assert_eq!(
            with_owner(Some(vec![other.clone()]), &ours),
            Some(vec![other.clone(), ours.clone()])
        );
        assert_eq!(with_owner(Some(vec![other, ours.clone()]), &ours), None);
    }
}

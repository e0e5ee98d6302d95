//! Fencing for overwrites. The leader writes its keys and status lists at the version it last wrote,
//! so a write by anyone else makes its next write conflict. Undoing such a write (an edit of a
//! guarded object, or a conflict on one only the leader writes) is right only while this replica
//! still leads: a replica that was paused past its lease, and has not noticed yet, would otherwise
//! overwrite what the new leader wrote (its reserved indices and token records, which a restart
//! relies on). So before such an overwrite the leader asks the apiserver who holds the Lease.

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use crate::operator::{
    LEASE_NAME,
    error::{Error, Result},
};

/// Who must hold the leader Lease for an overwrite to go ahead; cheap to clone.
#[derive(Clone)]
pub struct Fence(Option<(Api<Lease>, String)>);

impl Fence {
    /// Overwrites go ahead only while `identity` holds the Lease in `namespace`.
    pub fn lease(client: Client, namespace: &str, identity: &str) -> Self {
        Self(Some((
            Api::namespaced(client, namespace),
            identity.to_owned(),
        )))
    }

    /// Without leader election (exactly one replica, by the operator's own warning) nothing fences.
    pub fn none() -> Self {
        Self(None)
    }

    /// Succeeds while this replica holds the Lease; otherwise an error that stops the overwrite.
    pub async fn check(&self) -> Result<()> {
        let Some((leases, identity)) = &self.0 else {
            return Ok(());
        };
        let holder = leases
            .get_opt(LEASE_NAME)
            .await?
            .and_then(|lease| lease.spec)
            .and_then(|spec| spec.holder_identity);
        if holder.as_deref() == Some(identity.as_str()) {
            return Ok(());
        }
        Err(Error::InvalidState(format!(
            "not overwriting: the leader Lease {LEASE_NAME} is held by {}, not by this replica ({identity}); another leader may have written since",
            holder.as_deref().unwrap_or("nobody")
        )))
    }
}

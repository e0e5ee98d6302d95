//! Whether the apiserver was stamping identities when an object was created: the operator watches the
//! stamping MutatingAdmissionPolicies and their bindings (metadata only) and trusts a stamped requester
//! or approver only on objects created after both existed. Without this, a grant created while the
//! policies were missing could carry a requester its author typed.

use k8s_openapi::{
    api::admissionregistration::v1::{MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding},
    jiff::Timestamp,
};
use kube::{
    api::PartialObjectMeta,
    runtime::reflector::{ObjectRef, Store},
};

use crate::delegation::authority::STAMP_SETTLE;

/// The policy (and binding) that stamps `spec.requester` on DelegationGrants.
pub const REQUESTER_POLICY: &str = "delegation-operator-stamp-requester";
/// The policy (and binding) that stamps `spec.approver` on DelegationApprovals.
pub const APPROVER_POLICY: &str = "delegation-operator-stamp-approver";

pub struct Stamps {
    pub policies: Store<PartialObjectMeta<MutatingAdmissionPolicy>>,
    pub bindings: Store<PartialObjectMeta<MutatingAdmissionPolicyBinding>>,
}

impl Stamps {
    /// From when objects are stamped by the named policy: the later creation of the policy and its
    /// binding, plus the time the apiserver takes to load them. `None` while either is missing.
    pub fn since(&self, name: &str) -> Option<Timestamp> {
        let policy = self.policies.get(&ObjectRef::new(name))?;
        let binding = self.bindings.get(&ObjectRef::new(name))?;
        let created = |meta: &kube::api::ObjectMeta| {
            meta.deletion_timestamp
                .is_none()
                .then(|| meta.creation_timestamp.as_ref().map(|t| t.0))
                .flatten()
        };
        let latest = created(&policy.metadata)?.max(created(&binding.metadata)?);
        Some(crate::delegation::chain::add(latest, STAMP_SETTLE))
    }
}

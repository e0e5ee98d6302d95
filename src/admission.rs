//! The admission policies that make a grant's evidence *proven*: the apiserver stamps who created each
//! DelegationGrant (`spec.requester`) and who decided each DelegationApproval (`spec.approver`), and
//! refuses what the requester may not ask for. They are MutatingAdmissionPolicies and
//! ValidatingAdmissionPolicies (`admissionregistration.k8s.io/v1`), so no webhook server runs.
//!
//! The YAML lives in `admission/policies.yaml`, is embedded here, and is printed by
//! `delegation-operator admission-policies`.

/// Every policy and binding, as one multi-document YAML stream.
pub const POLICIES_YAML: &str = include_str!("../admission/policies.yaml");

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{DNS1123_SUBDOMAIN_PATTERN, UserIdentity};

/// A person's decision on one DelegationGrant that its agent says needs approval
/// (`AgentIdentity.spec.requireApproval`): approved or rejected, for one generation of the grant's spec.
///
/// The approver is stamped by the apiserver (admission policy), must be allowed verb `approve` on
/// `delegationgrants` named after the grant, and may not be the grant's requester. A record: it cannot be
/// changed after creation; to change your mind, create another one (a rejection wins over an approval of
/// the same generation).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "delegation.nhi.dev",
    version = "v1alpha1",
    kind = "DelegationApproval",
    plural = "delegationapprovals",
    singular = "delegationapproval",
    shortname = "approval",
    category = "delegation",
    namespaced,
    derive = "PartialEq",
    doc = "A recorded approval or rejection of one generation of a DelegationGrant.",
    validation = Rule::new("self.spec == oldSelf.spec")
        .message("a DelegationApproval is a record and cannot be changed; create a new one"),
    printcolumn(name = "Grant", type_ = "string", json_path = ".spec.grantRef.name"),
    printcolumn(name = "Generation", type_ = "integer", json_path = ".spec.generation"),
    printcolumn(name = "Decision", type_ = "string", json_path = ".spec.decision"),
    printcolumn(
        name = "Approver",
        type_ = "string",
        json_path = ".spec.approver.username"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DelegationApprovalSpec {
    /// The grant (in this namespace) this decision is about, pinned by uid so that a grant re-created
    /// under the same name is not approved by an old record.
    pub grant_ref: GrantRef,

    /// The `metadata.generation` of the grant that was reviewed. Any later change of the grant's spec
    /// needs a new approval.
    #[schemars(range(min = 1))]
    pub generation: i64,

    /// `Approve` or `Reject`.
    pub decision: Decision,

    /// Why, in a sentence (shown in the grant's Events and the audit trail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub comment: Option<String>,

    /// Who decided, as the apiserver authenticated them. Set by the delegation-operator admission
    /// policy on creation (anything written here is replaced); leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<UserIdentity>,
}

/// A grant pinned by name and uid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct GrantRef {
    /// Name of the DelegationGrant, in this namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// The grant's `metadata.uid`.
    #[schemars(length(min = 1, max = 64))]
    pub uid: String,
}

/// An approver's decision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Decision {
    Approve,
    Reject,
}

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{
    AUDIENCE_MESSAGE, AUDIENCE_RULE, ApprovalRequirement, AuthorizationDetail, Duration,
    SCOPE_PATTERN,
};

/// Matches a namespace name (a DNS-1123 label) or `*` (every namespace).
pub const POLICY_NAMESPACE_PATTERN: &str = r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$";

/// The cluster-wide ceiling of what grants may ask of one API (audience), declared by the cluster's
/// administrators or the team that owns the API.
///
/// Fail closed: a DelegationGrant gets a token only when at least one AudiencePolicy for its
/// audience lists the grant's namespace and allows all of the grant (scopes, authorizationDetails,
/// tokenTTL, lifetime). An audience no policy declares gets no tokens at all. Several policies for
/// one audience add up the way RBAC rules do: each is a complete allowance on its own, and a grant is
/// allowed when at least one policy listing its namespace allows all of it (a grant that needs one
/// policy for its scopes and another for its details is refused). When several allow it, the one
/// that asks least applies: no approval before approval, then the longest grant lifetime.
// clippy mistakes the repeated `printcolumn(...)`/`shortname` arguments of `#[kube]` for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "delegation.nhi.dev",
    version = "v1alpha1",
    kind = "AudiencePolicy",
    plural = "audiencepolicies",
    singular = "audiencepolicy",
    shortname = "audpol",
    category = "delegation",
    derive = "PartialEq",
    doc = "The cluster-wide ceiling of which namespaces may obtain tokens for one audience, and with what.",
    printcolumn(name = "Audience", type_ = "string", json_path = ".spec.audience"),
    printcolumn(name = "Namespaces", type_ = "string", json_path = ".spec.namespaces"),
    printcolumn(
        name = "MaxTokenTTL",
        type_ = "string",
        json_path = ".spec.maxTokenTTL"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.audience == oldSelf.audience")
        .message("spec.audience is immutable: create a policy for the other audience instead")
        .field_path(".audience")
)]
#[serde(rename_all = "camelCase")]
pub struct AudiencePolicySpec {
    /// The audience (resource server) this policy is the ceiling for, exactly as grants write it in
    /// `spec.audience`: an absolute URI such as `https://payments.example.com`, no wildcards.
    /// Immutable.
    #[schemars(length(min = 1, max = 512))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": AUDIENCE_RULE, "message": AUDIENCE_MESSAGE}]))]
    pub audience: String,

    /// The namespaces whose grants may obtain tokens for the audience under this policy, by name.
    /// `*` stands for every namespace. A grant in a namespace no policy of its audience lists is
    /// refused (DeniedAudienceUndeclared).
    #[schemars(length(min = 1, max = 256), inner(length(min = 1, max = 63), regex(pattern = POLICY_NAMESPACE_PATTERN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub namespaces: Vec<String>,

    /// The scopes a grant may ask for this audience: every scope of a grant must be one of these.
    /// A grant asking for more is refused (DeniedBeyondPolicy), never silently narrowed.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 128), regex(pattern = SCOPE_PATTERN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub allowed_scopes: Vec<String>,

    /// The RFC 9396 authorizationDetails a grant may carry, as ceilings: every detail of a grant must
    /// fall within one of these (same `type`; the same `identifier` when one is given here; each of
    /// `actions`, `locations`, `datatypes`, `privileges` present exactly where it is present here
    /// and a subset of it — a list left out here may not appear in a grant). When this is set, a
    /// grant must list authorizationDetails. Absent: grants under this policy may carry none (declare
    /// a second policy without this field to also allow grants without details).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub allowed_authorization_details: Option<Vec<AuthorizationDetail>>,

    /// The longest tokenTTL a grant may ask, e.g. `15m`. Units h, m, s. A grant asking more is
    /// refused, never silently shortened.
    #[serde(rename = "maxTokenTTL")]
    pub max_token_ttl: Duration,

    /// How long a grant lasts under this policy, counted from its creation (metadata.creationTimestamp),
    /// e.g. `720h`. No token outlives it; at its end the grant is refused (DeniedGrantLifetimeEnded)
    /// and must be re-created. Absent: no limit besides the grant's own validUntil.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grant_lifetime: Option<Duration>,

    /// Grants under this policy need a person's approval (a DelegationApproval) before any token is
    /// issued, as with AgentIdentity's requireApproval. With `scopes`, only grants asking at least
    /// one of them do. Absent: this policy requires no approval (the agent's own requirement still
    /// applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_approval: Option<ApprovalRequirement>,

    /// How many grants for this audience one namespace may hold tokens for: the oldest (by
    /// creationTimestamp) do, every other is refused (DeniedAudienceGrantLimit) until an older one is
    /// deleted. Of several policies listing a namespace, the largest limit applies, and one without
    /// this field lifts it. Absent: no limit per audience (the operator's --max-grants-per-namespace
    /// still applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_grants_per_namespace: Option<u32>,
}

impl AudiencePolicySpec {
    /// Whether the policy lists `namespace` (or `*`).
    pub fn covers_namespace(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|n| n == "*" || n == namespace)
    }
}

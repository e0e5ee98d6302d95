use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    AUDIENCE_MESSAGE, AUDIENCE_RULE, DNS1123_SUBDOMAIN_PATTERN, Duration, LocalRef, SCOPE_PATTERN,
    UserIdentity,
};

/// "Principal P lets agent A do S, for audience X, until T": one hop of delegated authority.
///
/// The operator turns a valid grant into a short-lived signed token (an RFC 9068 access token carrying
/// the RFC 8693 actor chain) in a Secret, renews it before it expires, and revokes it when the grant
/// ends.
// clippy mistakes the repeated `printcolumn(...)`/`shortname` arguments of `#[kube]` for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "delegation.nhi.dev",
    version = "v1alpha1",
    kind = "DelegationGrant",
    plural = "delegationgrants",
    singular = "delegationgrant",
    shortname = "dg",
    shortname = "grant",
    category = "delegation",
    namespaced,
    status = "DelegationGrantStatus",
    derive = "PartialEq",
    doc = "A delegation of scoped authority from a principal (or a parent grant) to an AgentIdentity.",
    validation = Rule::new("size(self.metadata.name) <= 247 || has(self.spec.secretName)")
        .message("a grant name longer than 247 characters needs spec.secretName (the default <name>-token would not be a valid Secret name)"),
    printcolumn(name = "Actor", type_ = "string", json_path = ".spec.actorRef.name"),
    printcolumn(
        name = "Principal",
        type_ = "string",
        json_path = ".spec.principal.name"
    ),
    printcolumn(
        name = "Requester",
        type_ = "string",
        json_path = ".spec.requester.username"
    ),
    printcolumn(
        name = "Parent",
        type_ = "string",
        json_path = ".spec.parentGrantRef.name"
    ),
    printcolumn(name = "Scopes", type_ = "string", json_path = ".spec.scopes"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Approval",
        type_ = "string",
        json_path = ".status.approval.state"
    ),
    printcolumn(
        name = "Expires",
        type_ = "string",
        json_path = ".status.token.expiresAt"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("has(self.principal) != has(self.parentGrantRef)")
        .message("exactly one of spec.principal or spec.parentGrantRef must be set"),
    validation = Rule::new("has(self.principal) == has(oldSelf.principal) && (!has(self.principal) || self.principal == oldSelf.principal)")
        .message("spec.principal is immutable: create a new grant instead")
        .field_path(".principal"),
    validation = Rule::new("has(self.parentGrantRef) == has(oldSelf.parentGrantRef) && (!has(self.parentGrantRef) || self.parentGrantRef == oldSelf.parentGrantRef)")
        .message("spec.parentGrantRef is immutable: create a new grant instead")
        .field_path(".parentGrantRef"),
    validation = Rule::new("has(self.requester) == has(oldSelf.requester) && (!has(self.requester) || self.requester == oldSelf.requester)")
        .message("spec.requester is stamped by the apiserver when the grant is created and cannot change")
        .field_path(".requester"),
    validation = Rule::new("self.actorRef == oldSelf.actorRef")
        .message("spec.actorRef is immutable: create a new grant instead")
        .field_path(".actorRef"),
    validation = Rule::new("!has(self.renewBefore) || duration(self.renewBefore) < duration(self.tokenTTL)")
        .message("spec.renewBefore must be shorter than spec.tokenTTL")
        .field_path(".renewBefore")
)]
#[serde(rename_all = "camelCase")]
pub struct DelegationGrantSpec {
    /// The root of the chain: the person or ServiceAccount whose authority is delegated. It becomes the
    /// token's `sub`. Set exactly one of `principal` and `parentGrantRef`. Immutable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<Principal>,

    /// A grant (in this namespace) whose actor hands part of its authority on to this grant's actor.
    /// Set exactly one of `principal` and `parentGrantRef`. Immutable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_grant_ref: Option<LocalRef>,

    /// The AgentIdentity (in this namespace) that acts with this authority. Immutable.
    pub actor_ref: LocalRef,

    /// Who created this grant, as the apiserver authenticated them: the evidence of who asked. Set by
    /// the delegation-operator admission policy on creation (anything written here is replaced) and
    /// immutable afterwards. Leave it out of your manifests. A grant without it gets no token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requester: Option<UserIdentity>,

    /// OAuth scopes delegated. Each must be allowed by the actor and held by the parent grant (if any);
    /// a grant asking for more is denied, never silently narrowed.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 128), regex(pattern = SCOPE_PATTERN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub scopes: Vec<String>,

    /// The one resource server the token is for (its `aud`): an absolute URI such as
    /// `https://tickets.example.com`, no wildcards. Must be in the actor's allowedAudiences, and equal to
    /// the parent grant's audience for a hop.
    #[schemars(length(min = 1, max = 512))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": AUDIENCE_RULE, "message": AUDIENCE_MESSAGE}]))]
    pub audience: String,

    /// Lifetime of each token, e.g. `10m`. At most the actor's maxTokenTTL. Units h, m, s.
    #[serde(rename = "tokenTTL")]
    pub token_ttl: Duration,

    /// How long before expiry the token is renewed, e.g. `3m`. Must be shorter than tokenTTL.
    /// When absent the token is renewed after two thirds of its lifetime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<Duration>,

    /// End of the delegation itself (RFC 3339). No token outlives it; once passed, the token is revoked
    /// and the grant reports Expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<Time>,

    /// Fine-grained limits carried in the token's `authorization_details` claim (RFC 9396 shape). A hop
    /// may only narrow its parent's: same type, same identifier, and lists within the parent's — it may
    /// not add a list the parent left out. At most 4 KiB once encoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub authorization_details: Option<Vec<AuthorizationDetail>>,

    /// Name of the Secret the token is written to. Defaults to `<grant name>-token`. The operator never
    /// takes over a Secret it did not create.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub secret_name: Option<String>,

    /// When true, the token is revoked and none is issued until this is set back to false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended: Option<bool>,
}

/// The principal at the root of a delegation chain: whose authority is delegated.
///
/// Naming a principal needs authority: the grant's requester must be that principal, or be allowed verb
/// `delegate` on `users`, `groups` or `serviceaccounts` (API group `delegation.nhi.dev`) with the
/// principal's name as resourceName, in the grant's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, KubeSchema)]
#[x_kube(
    validation = Rule::new(r"!self.name.matches('[\\p{Z}\\p{C}]')")
        .message("spec.principal.name may not contain spaces, control, zero-width or bidirectional characters")
        .field_path(".name"),
    validation = Rule::new("self.kind == 'ServiceAccount' || !self.name.startsWith('system:')")
        .message("names starting with system: are reserved for Kubernetes; a ServiceAccount principal has kind ServiceAccount")
        .field_path(".name"),
    validation = Rule::new("self.kind != 'ServiceAccount' || self.name.matches('^system:serviceaccount:[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9]([-.a-z0-9]*[a-z0-9])?$')")
        .message("a ServiceAccount principal is named system:serviceaccount:<namespace>:<name>")
        .field_path(".name")
)]
pub struct Principal {
    /// `User` (a person, by the user name the Kubernetes apiserver authenticates them with), `Group`
    /// (a group of users, by its name; no one *is* a group, so naming one always needs `delegate` on
    /// `groups`), or `ServiceAccount` (a workload, by its Kubernetes user name).
    pub kind: PrincipalKind,
    /// The user name (`alice@example.com`), group name (`payments-approvers`), or ServiceAccount user
    /// name (`system:serviceaccount:<namespace>:<name>`). It becomes the token's `sub`.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
}

/// The kind of a root principal.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PrincipalKind {
    User,
    Group,
    ServiceAccount,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "User",
            PrincipalKind::Group => "Group",
            PrincipalKind::ServiceAccount => "ServiceAccount",
        }
    }
}

/// One RFC 9396 authorization detail object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationDetail {
    /// The kind of authorization, understood by the resource server (e.g. `ticket`, `customer_case`).
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 128))]
    pub type_: String,
    /// Identifier of the specific resource (e.g. a ticket number).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub identifier: Option<String>,
    /// Actions allowed on the resource (e.g. `read`, `comment`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 128)))]
    pub actions: Option<Vec<String>>,
    /// Locations (URIs) of the resource server.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 512)))]
    pub locations: Option<Vec<String>>,
    /// Kinds of data being requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 128)))]
    pub datatypes: Option<Vec<String>>,
    /// Privilege levels requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 128)))]
    pub privileges: Option<Vec<String>>,
}

/// Observed state of a DelegationGrant: the evidence of who authorised what.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelegationGrantStatus {
    /// `Ready` is True once a valid token is in the Secret. Its reason says why not otherwise
    /// (Denied*, Revoked, Expired, ParentNotReady, AgentSuspended, AgentMissing, SecretConflict, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,

    /// The metadata.generation this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The delegation chain, root principal first; the last link is this grant's actor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<Vec<ChainLink>>,

    /// The scopes the token carries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective_scopes: Option<Vec<String>>,

    /// Metadata of the current token (never the token itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenStatus>,

    /// The token replaced at the last rotation. It stays valid until its own expiry (so clients can
    /// switch over) and is revoked together with the current one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_token: Option<PreviousToken>,

    /// The Secret holding the current token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,

    /// For a hop: the uid of the parent grant it was first resolved under. A parent deleted and
    /// re-created under the same name is not adopted.
    #[serde(rename = "parentGrantUID", skip_serializing_if = "Option::is_none")]
    pub parent_grant_uid: Option<String>,

    /// Where the grant stands when its agent requires approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalStatus>,
}

/// The approval state of a grant whose agent requires one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStatus {
    /// `Pending`, `Approved` or `Rejected`, for the grant's current generation.
    pub state: ApprovalState,
    /// The generation the state refers to.
    pub generation: i64,
    /// The DelegationApproval that decided, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// Who decided, as the apiserver authenticated them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
}

/// Where an approval stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ApprovalState {
    Pending,
    Approved,
    Rejected,
}

/// A replaced token that may still be in use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviousToken {
    /// The token's `jti`.
    pub id: String,
    /// When it stops being valid.
    pub expires_at: Time,
}

/// One link of a delegation chain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChainLink {
    /// `User`, `ServiceAccount` (the root) or `AgentIdentity` (every hop).
    pub kind: String,
    /// The principal's name, or the AgentIdentity's name.
    pub name: String,
    /// For agents: the identifier used in the token (`agent:<namespace>/<name>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// For agents: the grant that gave this agent its authority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// For agents: the scopes this agent holds at this hop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// For agents: who created the grant of this hop, as the apiserver authenticated them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// For agents: who approved the grant of this hop, when its agent requires approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
}

/// Metadata of an issued token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// The token's `jti`: what the revocation list records.
    pub id: String,
    /// The `kid` of the signing key (RFC 7638 thumbprint), found in the published JWKS.
    #[serde(rename = "keyID")]
    pub key_id: String,
    /// When the token was minted.
    pub issued_at: Time,
    /// When the token stops being valid.
    pub expires_at: Time,
    /// When the operator will replace it.
    pub renewal_time: Time,
    /// Digest of the audience and authorizationDetails the token carries: when either changes in the
    /// spec, the token is replaced and revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims_digest: Option<String>,
}

impl DelegationGrantSpec {
    /// The Secret name, applying the documented default in memory.
    pub fn secret_name_or_default(&self, grant_name: &str) -> String {
        self.secret_name
            .clone()
            .unwrap_or_else(|| format!("{grant_name}-token"))
    }

    /// Whether the grant is switched off.
    pub fn is_suspended(&self) -> bool {
        self.suspended.unwrap_or(false)
    }
}

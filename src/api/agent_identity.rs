use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    AUDIENCE_MESSAGE, AUDIENCES_RULE, DNS1123_SUBDOMAIN_PATTERN, Duration, MAX_CONDITIONS,
    SCOPE_PATTERN, TokenDelivery, lenient_status, strict_times,
};

/// A non-human identity (an AI agent, a service, an automation) that may receive delegated authority
/// through DelegationGrants. Its spec sets the ceiling for every grant naming it as actor.
// clippy mistakes the repeated `printcolumn(...)`/`shortname` arguments of `#[kube]` for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "delegation.nhi.dev",
    version = "v1alpha1",
    kind = "AgentIdentity",
    plural = "agentidentities",
    singular = "agentidentity",
    shortname = "agentid",
    shortname = "agent",
    category = "delegation",
    namespaced,
    status = "AgentIdentityStatus",
    derive = "PartialEq",
    doc = "A non-human identity that may act on behalf of principals within the limits of its spec.",
    printcolumn(name = "Subject", type_ = "string", json_path = ".status.subject"),
    printcolumn(name = "Grants", type_ = "integer", json_path = ".status.activeGrants"),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspended"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentitySpec {
    /// Who is accountable for this agent: a User or a Group of the organisation.
    pub owner: Owner,

    /// The Kubernetes ServiceAccount (in this namespace) the agent's workload runs as, if any. That
    /// ServiceAccount may create hops below grants this agent acts under (sub-delegate), within
    /// `delegation`, when its request is made with a pod-bound token (a pod running as it);
    /// impersonating it is not enough.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub service_account_name: Option<String>,

    /// The most this agent may ever be granted: every grant's scopes must be a subset of these.
    /// A grant asking for more is denied, never silently narrowed.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 128), regex(pattern = SCOPE_PATTERN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub allowed_scopes: Vec<String>,

    /// Audiences (resource servers) tokens for this agent may be minted for: exact absolute URIs such
    /// as `https://tickets.example.com`, no wildcards.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 512)))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": AUDIENCES_RULE, "message": AUDIENCE_MESSAGE}]))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub allowed_audiences: Vec<String>,

    /// The longest lifetime of any token minted for this agent, e.g. `15m`. Units h, m, s.
    #[serde(rename = "maxTokenTTL")]
    pub max_token_ttl: Duration,

    /// Whether and to whom this agent may hand its authority on (RFC 8693 `may_act`).
    /// Absent means the chain ends at this agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegation: Option<DelegationPolicy>,

    /// Grants to this agent need a person's approval (a DelegationApproval) before any token is issued.
    /// With `scopes`, only grants asking at least one of them do. Absent: no approval needed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_approval: Option<ApprovalRequirement>,

    /// Where the tokens of grants to this agent go, unless a grant's own `tokenDelivery` says:
    /// `Secret` (a Secret in the namespace) or `Pod` (no Secret: the agent's pods, running as
    /// `serviceAccountName`, fetch them from the issuer's token endpoint). Absent: `Pod` when
    /// `requireProofOfPossession` is true, else `Secret`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_delivery: Option<TokenDelivery>,

    /// When true, every token this agent holds is bound to a key of its own (DPoP, RFC 9449
    /// `cnf.jkt`): a token is handed out or exchanged only with a DPoP proof, and is worth nothing
    /// without that key. Needs Pod delivery (a token in a Secret cannot be bound): a grant that
    /// asks for Secret delivery is denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_proof_of_possession: Option<bool>,

    /// Kill switch. When true, every token naming this agent anywhere in its chain is revoked and no
    /// new one is issued until it is set back to false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended: Option<bool>,
}

/// Who is accountable for an agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Owner {
    /// `User` or `Group`.
    pub kind: OwnerKind,
    /// The user or group name as your identity provider knows it.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
}

/// The kind of an agent's owner.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum OwnerKind {
    User,
    Group,
}

/// Sub-delegation policy of an agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelegationPolicy {
    /// How many further hops are allowed below this agent. 0 means the chain ends here.
    #[schemars(range(min = 0, max = 8))]
    pub max_depth: i32,

    /// Names of the AgentIdentities (in this namespace) this agent may sub-delegate to.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub allowed_actors: Option<Vec<String>>,
}

/// Which grants to an agent need approval.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ApprovalRequirement {
    /// Only grants asking at least one of these scopes need approval. Absent: every grant does.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 128), regex(pattern = SCOPE_PATTERN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub scopes: Option<Vec<String>>,
}

/// Observed state of an AgentIdentity.
// Deserialize is written by hand (below): a status that does not decode reads as no status instead of
// making the whole agent undecodable. Every time in it must be one the operator can read.
#[derive(Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = strict_times)]
pub struct AgentIdentityStatus {
    /// The identifier used for this agent in tokens (`client_id`, `act.sub`): `agent:<namespace>/<name>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,

    /// How many DelegationGrants currently hold a valid token with this agent as actor. Refreshed
    /// within about 10 seconds of a change.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub active_grants: Option<i32>,

    /// `Ready` is True when the agent can receive grants (it is valid and not suspended).
    #[serde(skip_serializing_if = "Option::is_none")]
    // Bounded so that the apiserver can afford the time rules on every lastTransitionTime.
    #[schemars(length(max = MAX_CONDITIONS))]
    pub conditions: Option<Vec<Condition>>,

    /// The metadata.generation this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// [`AgentIdentityStatus`] as stored, decoded strictly; kept field for field in step with it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StrictAgentIdentityStatus {
    subject: Option<String>,
    active_grants: Option<i32>,
    conditions: Option<Vec<Condition>>,
    observed_generation: Option<i64>,
}

impl From<StrictAgentIdentityStatus> for AgentIdentityStatus {
    fn from(s: StrictAgentIdentityStatus) -> Self {
        let StrictAgentIdentityStatus {
            subject,
            active_grants,
            conditions,
            observed_generation,
        } = s;
        Self {
            subject,
            active_grants,
            conditions,
            observed_generation,
        }
    }
}

impl<'de> Deserialize<'de> for AgentIdentityStatus {
    /// Never fails on content: a status that does not decode reads as an empty status, so that one
    /// agent cannot stop the operator's watch of every agent. The operator writes a fresh one.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lenient_status::<D, StrictAgentIdentityStatus, _>(deserializer, "AgentIdentity")
    }
}

impl AgentIdentitySpec {
    /// Whether every token of this agent must be bound to its key.
    pub fn requires_proof_of_possession(&self) -> bool {
        self.require_proof_of_possession.unwrap_or(false)
    }

    /// Whether the kill switch is on.
    pub fn is_suspended(&self) -> bool {
        self.suspended.unwrap_or(false)
    }
}

/// The token subject of an agent, stable for its namespace and name: `agent:<namespace>/<name>`
/// (`client_id`, `act.sub`). No principal's subject takes this form: those begin with `user:`,
/// `group:` or `serviceaccount:` ([`crate::delegation::claims::principal_subject`]).
pub fn agent_subject(namespace: &str, name: &str) -> String {
    format!("agent:{namespace}/{name}")
}

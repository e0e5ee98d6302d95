use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    AUDIENCE_MESSAGE, AUDIENCE_RULE, DNS1123_SUBDOMAIN_PATTERN, Duration, LocalRef, MAX_CONDITIONS,
    SCOPE_PATTERN, TokenDelivery, UserIdentity, duration_guard, fail_closed_time, lenient_status,
    strict_times,
};

/// `renewBefore < tokenTTL`, evaluated only when both are durations CEL can parse (each field's own
/// rule reports a malformed one), so that it never fails with a CEL type-conversion error.
fn renew_before_rule() -> String {
    format!(
        "!has(self.renewBefore) || !{} || !{} || duration(self.renewBefore) < duration(self.tokenTTL)",
        duration_guard("self.renewBefore"),
        duration_guard("self.tokenTTL"),
    )
}

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
    validation = Rule::new("!has(oldSelf.requester) || has(self.requester)")
        .message("spec.requester is stamped by the apiserver and cannot be removed")
        .field_path(".requester"),
    validation = Rule::new("!has(oldSelf.authors) || has(self.authors)")
        .message("spec.authors is stamped by the apiserver and cannot be removed")
        .field_path(".authors"),
    validation = Rule::new("self.actorRef == oldSelf.actorRef")
        .message("spec.actorRef is immutable: create a new grant instead")
        .field_path(".actorRef"),
    validation = Rule::new("!has(self.secretName) || !has(self.tokenDelivery) || self.tokenDelivery != 'Pod'")
        .message("spec.secretName names the Secret of Secret delivery; with tokenDelivery Pod no Secret is written, so leave it out")
        .field_path(".secretName"),
    validation = Rule::new(renew_before_rule())
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

    /// Who asked for what this grant authorises now, as the apiserver authenticated them: whoever
    /// created it or, since then, last changed what it authorises (any spec field but `suspended`, or
    /// resuming it). The evidence of who asked, and the identity checked for the right to ask. Set by
    /// the delegation-operator admission policy (anything written here is replaced); leave it out of
    /// your manifests. A grant without it gets no token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requester: Option<Arc<UserIdentity>>,

    /// The user names of everyone who created this grant or changed what it authorises, in the order
    /// of their last such change (the last is `requester`). An approval by any of them is a
    /// self-approval and does not count. At most 64: re-create a grant more people have changed. Set by
    /// the delegation-operator admission policy; leave it out of your manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub authors: Option<Vec<String>>,

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

    /// End of the delegation itself, an RFC 3339 time such as `2030-01-01T00:00:00Z` or
    /// `2030-01-01T09:30:00+02:00` (at most 9 fractional digits). No token outlives it; once passed, the
    /// token is revoked and the grant reports Expired.
    // The apiserver accepts only times the operator can read (`strict_times`). One stored before it
    // did, and unreadable, counts as long passed rather than making the grant undecodable.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "fail_closed_time"
    )]
    #[schemars(transform = strict_times)]
    pub valid_until: Option<Time>,

    /// Fine-grained limits carried in the token's `authorization_details` claim (RFC 9396 shape). A hop
    /// may only narrow its parent's: same type, same identifier, and lists within the parent's — it may
    /// not add a list the parent left out. At most 4 KiB once encoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub authorization_details: Option<Vec<AuthorizationDetail>>,

    /// Where the token goes: `Secret` (a Secret in this namespace, see `secretName`) or `Pod` (no
    /// Secret: the actor's pods, running as its `serviceAccountName`, fetch short-lived tokens from
    /// the issuer's token endpoint with their pod-bound ServiceAccount token). Absent: the actor's
    /// `tokenDelivery`, else `Secret`. Changing it replaces the token (and revokes the old one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_delivery: Option<TokenDelivery>,

    /// Name of the Secret the token is written to. Defaults to `<grant name>-token`. The operator never
    /// takes over a Secret it did not create. Only for Secret delivery.
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
    /// name (`system:serviceaccount:<namespace>:<name>`). The token's `sub` is it typed by its kind:
    /// `user:<name>`, `group:<name>` or `serviceaccount:<namespace>:<name>`.
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
// Deserialize is written by hand (below): a status that does not decode reads as no status instead of
// making the whole grant undecodable. Every time in it must be one the operator can read.
#[derive(Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = strict_times)]
pub struct DelegationGrantStatus {
    /// `Ready` is True once a valid token is in the Secret. Its reason says why not otherwise
    /// (Denied*, Revoked, Expired, ParentNotReady, AgentSuspended, AgentMissing, SecretConflict, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    // Bounded so that the apiserver can afford the time rules on every lastTransitionTime.
    #[schemars(length(max = MAX_CONDITIONS))]
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

    /// The Secret holding the current token (Secret delivery).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,

    /// Pod delivery: the current token, encrypted (AES-256-GCM) under a key only the operator holds
    /// and bound to this grant's namespace, name and uid. Unreadable to anyone who can read this
    /// status; the token endpoint opens it to hand the agent's pods narrower tokens of their own.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub sealed_token: Option<String>,

    /// For a hop: the uid of the parent grant it was first resolved under. A parent deleted and
    /// re-created under the same name is not adopted.
    #[serde(rename = "parentGrantUID", skip_serializing_if = "Option::is_none")]
    pub parent_grant_uid: Option<String>,

    /// Where the grant stands when its agent requires approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalStatus>,
}

/// [`DelegationGrantStatus`] as stored, decoded strictly; kept field for field in step with it (the
/// conversion below names every field, and a round-trip test checks the names).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StrictDelegationGrantStatus {
    conditions: Option<Vec<Condition>>,
    observed_generation: Option<i64>,
    chain: Option<Vec<ChainLink>>,
    effective_scopes: Option<Vec<String>>,
    token: Option<TokenStatus>,
    previous_token: Option<PreviousToken>,
    secret_name: Option<String>,
    sealed_token: Option<String>,
    #[serde(rename = "parentGrantUID")]
    parent_grant_uid: Option<String>,
    approval: Option<ApprovalStatus>,
}

impl From<StrictDelegationGrantStatus> for DelegationGrantStatus {
    fn from(s: StrictDelegationGrantStatus) -> Self {
        let StrictDelegationGrantStatus {
            conditions,
            observed_generation,
            chain,
            effective_scopes,
            token,
            previous_token,
            secret_name,
            sealed_token,
            parent_grant_uid,
            approval,
        } = s;
        Self {
            conditions,
            observed_generation,
            chain,
            effective_scopes,
            token,
            previous_token,
            secret_name,
            sealed_token,
            parent_grant_uid,
            approval,
        }
    }
}

impl<'de> Deserialize<'de> for DelegationGrantStatus {
    /// Never fails on content: a status that does not decode (say a time jiff cannot read, written
    /// through the status subresource) is read as an empty status, so that one grant cannot stop
    /// the operator's watch of every grant. The operator writes a fresh status over it.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lenient_status::<D, StrictDelegationGrantStatus, _>(deserializer, "DelegationGrant")
    }
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
    /// The token's `jti` (its id in the audit trail and the Events).
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

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use serde_json::{Value, json};

    use super::*;
    use crate::api::{AgentIdentity, AgentIdentityStatus, UNREADABLE_VALID_UNTIL};

    fn grant_json(status: Value) -> Value {
        json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1",
            "kind": "DelegationGrant",
            "metadata": {"name": "g", "namespace": "ns", "generation": 3},
            "spec": {
                "principal": {"kind": "User", "name": "alice@example.com"},
                "actorRef": {"name": "ticket-triage"},
                "scopes": ["tickets:read"],
                "audience": "https://tickets.example.com",
                "tokenTTL": "10m",
                "validUntil": "2030-01-01T00:00:00Z",
            },
            "status": status,
        })
    }

    fn full_status() -> DelegationGrantStatus {
        let t = |s: i64| Time(Timestamp::from_second(s).unwrap());
        DelegationGrantStatus {
            conditions: Some(vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Issued".into(),
                message: "m".into(),
                last_transition_time: t(1_800_000_000),
                observed_generation: Some(3),
            }]),
            observed_generation: Some(3),
            chain: Some(vec![ChainLink {
                kind: "User".into(),
                name: "alice@example.com".into(),
                subject: Some("s".into()),
                grant: Some("g".into()),
                scopes: Some(vec!["tickets:read".into()]),
                requested_by: Some("admin".into()),
                approved_by: Some("carol".into()),
            }]),
            effective_scopes: Some(vec!["tickets:read".into()]),
            token: Some(TokenStatus {
                id: "jti".into(),
                key_id: "kid".into(),
                issued_at: t(1_800_000_000),
                expires_at: t(1_800_000_600),
                renewal_time: t(1_800_000_400),
                claims_digest: Some("d".into()),
            }),
            previous_token: Some(PreviousToken {
                id: "old".into(),
                expires_at: t(1_800_000_100),
            }),
            secret_name: Some("g-token".into()),
            sealed_token: Some("v1.kid.nonce.sealed".into()),
            parent_grant_uid: Some("uid".into()),
            approval: Some(ApprovalStatus {
                state: ApprovalState::Approved,
                generation: 3,
                approval: Some("a".into()),
                approver: Some("carol".into()),
            }),
        }
    }

    /// The strict twin of the status decodes every field the status writes: no rename drifted.
    #[test]
    fn a_readable_status_round_trips() {
        let status = full_status();
        let text = serde_json::to_value(&status).unwrap();
        assert!(text.get("parentGrantUID").is_some() && text["token"].get("keyID").is_some());
        let read: DelegationGrantStatus = serde_json::from_value(text).unwrap();
        assert_eq!(read, status);
        let grant: DelegationGrant =
            serde_json::from_value(grant_json(serde_json::to_value(&status).unwrap())).unwrap();
        assert_eq!(grant.status, Some(status));
    }

    /// A status holding a time jiff cannot read (the apiserver's `format: date-time` let these
    /// through) decodes as an empty status; the grant, and its spec, decode.
    #[test]
    fn a_hostile_status_reads_as_no_status_and_keeps_the_spec() {
        let hostile_times = [
            "9999-12-31T00:00:00Z",
            "2030-01-01T00:00:00.1234567890Z",
            "2030-01-01T00:00:00+99:00",
            "2030-01-01T00:00:00ZT00:00:00",
            "",
        ];
        let paths: [&[&str]; 5] = [
            &["token", "issuedAt"],
            &["token", "expiresAt"],
            &["token", "renewalTime"],
            &["previousToken", "expiresAt"],
            &["conditions", "0", "lastTransitionTime"],
        ];
        for hostile in hostile_times {
            for path in paths {
                let mut status = serde_json::to_value(full_status()).unwrap();
                let mut at = &mut status;
                for key in path {
                    at = match key.parse::<usize>() {
                        Ok(i) => &mut at[i],
                        Err(_) => &mut at[*key],
                    };
                }
                *at = json!(hostile);
                let grant: DelegationGrant = serde_json::from_value(grant_json(status))
                    .unwrap_or_else(|e| panic!("{path:?} = {hostile}: {e}"));
                assert_eq!(
                    grant.status,
                    Some(DelegationGrantStatus::default()),
                    "{path:?} = {hostile}"
                );
                assert_eq!(grant.spec.actor_ref.name, "ticket-triage");
                assert_eq!(grant.spec.scopes, ["tickets:read"]);
                assert_eq!(grant.spec.token_ttl.as_str(), "10m");
                assert_eq!(
                    grant.spec.valid_until.map(|t| t.0),
                    Some("2030-01-01T00:00:00Z".parse().unwrap())
                );
                assert_eq!(grant.metadata.generation, Some(3));
            }
        }
        // A status of the wrong shape altogether reads as empty too; a null one as none.
        let grant: DelegationGrant =
            serde_json::from_value(grant_json(json!({"token": 7}))).unwrap();
        assert_eq!(grant.status, Some(DelegationGrantStatus::default()));
        let grant: DelegationGrant = serde_json::from_value(grant_json(Value::Null)).unwrap();
        assert_eq!(grant.status, None);
    }

    #[test]
    fn an_unreadable_valid_until_decodes_as_long_passed() {
        let mut value = grant_json(Value::Null);
        value["spec"]["validUntil"] = json!("9999-12-31T00:00:00Z");
        let grant: DelegationGrant = serde_json::from_value(value).unwrap();
        assert_eq!(
            grant.spec.valid_until.map(|t| t.0),
            Some(UNREADABLE_VALID_UNTIL)
        );
        let mut value = grant_json(Value::Null);
        value["spec"].as_object_mut().unwrap().remove("validUntil");
        let grant: DelegationGrant = serde_json::from_value(value).unwrap();
        assert_eq!(grant.spec.valid_until, None);
    }

    #[test]
    fn an_agent_with_a_hostile_status_decodes() {
        let agent = |status: Value| {
            serde_json::from_value::<AgentIdentity>(json!({
                "apiVersion": "delegation.nhi.dev/v1alpha1",
                "kind": "AgentIdentity",
                "metadata": {"name": "a", "namespace": "ns"},
                "spec": {
                    "owner": {"kind": "Group", "name": "platform"},
                    "allowedScopes": ["tickets:read"],
                    "allowedAudiences": ["https://tickets.example.com"],
                    "maxTokenTTL": "15m",
                },
                "status": status,
            }))
            .unwrap()
        };
        let good = AgentIdentityStatus {
            subject: Some("agent:ns/a".into()),
            active_grants: Some(2),
            conditions: full_status().conditions,
            observed_generation: Some(3),
        };
        assert_eq!(
            agent(serde_json::to_value(&good).unwrap()).status,
            Some(good.clone())
        );
        let mut hostile = serde_json::to_value(&good).unwrap();
        hostile["conditions"][0]["lastTransitionTime"] = json!("9999-12-31T00:00:00Z");
        let read = agent(hostile);
        assert_eq!(read.status, Some(AgentIdentityStatus::default()));
        assert_eq!(read.spec.max_token_ttl.as_str(), "15m");
    }
}

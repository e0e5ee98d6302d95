//! The claims of a delegated access token: RFC 9068 (JWT access tokens) carrying the RFC 8693 actor
//! chain.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{chain::Resolution, timing::TokenTimes};
use crate::api::{AuthorizationDetail, ChainLink, DelegationGrantSpec, Principal, PrincipalKind};

/// The claim naming the grant a token was minted for.
pub const GRANT_CLAIM: &str = "delegation.nhi.dev/grant";

/// Prefix of the `sub` of a token whose principal is a `User`: `user:alice@example.com`.
pub const USER_SUBJECT_PREFIX: &str = "user:";
/// Prefix of the `sub` of a token whose principal is a `Group`: `group:payments-approvers`.
pub const GROUP_SUBJECT_PREFIX: &str = "group:";
/// Prefix of the `sub` of a token whose principal is a `ServiceAccount`: `serviceaccount:<ns>:<name>`.
pub const SERVICE_ACCOUNT_SUBJECT_PREFIX: &str = "serviceaccount:";

/// The token `sub` of a root principal: its kind, lower-case, then `:`, then its name —
/// `user:<user name>`, `group:<group name>`, `serviceaccount:<namespace>:<name>`.
///
/// Why kind-prefixed: a bare name cannot say which kind of principal it is. The group
/// `alice@example.com` and the user `alice@example.com` would get the same `sub`, and every consumer
/// that maps `sub` to a user (the Kubernetes apiserver recipe in `docs/verifying.md` among them)
/// would let whoever may delegate for the group act as the user; a User named
/// `agent:payments/refund-bot` would get an agent's subject. With the kind in front, the text up to
/// the first `:` says what the subject is, and the four prefixes — these three and the agents'
/// `agent:` ([`crate::api::agent_subject`]) — are pairwise distinct, so no principal's subject can
/// equal another kind's or any agent's whatever its name is (stripping the prefix gives the name
/// back: the map is injective). The `delegation_chain` records keep the name as Kubernetes knows it
/// beside an explicit `kind`, which is unambiguous there.
///
/// A ServiceAccount's subject is not its Kubernetes user name `system:serviceaccount:<ns>:<name>`:
/// a token carrying that verbatim would pass for the ServiceAccount's own credential with any
/// consumer that takes `sub` as a Kubernetes user name, while it is an agent's *delegated* token. The
/// `serviceaccount:` prefix keeps it typed like the others; a resource server that wants the user
/// name prepends `system:` (the recipe maps it to `delegation:system:serviceaccount:<ns>:<name>`, as
/// before). A name not of that form (which the CRD refuses) keeps its whole text after the prefix.
///
/// Not RFC 9493 subject identifiers (`sub_id`): none of its formats names a Kubernetes group or
/// ServiceAccount (only `opaque`, which drops the kind), consumers authorise on `sub` (RFC 9068 §2.2)
/// and the apiserver maps users from a claim, so an ambiguous `sub` would stay ambiguous beside it.
pub fn principal_subject(principal: &Principal) -> String {
    let name = principal.name.as_str();
    match principal.kind {
        PrincipalKind::User => format!("{USER_SUBJECT_PREFIX}{name}"),
        PrincipalKind::Group => format!("{GROUP_SUBJECT_PREFIX}{name}"),
        PrincipalKind::ServiceAccount => format!(
            "{SERVICE_ACCOUNT_SUBJECT_PREFIX}{}",
            name.strip_prefix("system:serviceaccount:").unwrap_or(name)
        ),
    }
}

/// The principal's name from a typed subject (as the other audit records name it): the subject
/// without its kind prefix, a ServiceAccount's as its Kubernetes user name. An untyped subject (a
/// token minted before subjects were typed) is returned as it is.
pub fn principal_name(sub: &str) -> String {
    if let Some(sa) = sub.strip_prefix(SERVICE_ACCOUNT_SUBJECT_PREFIX) {
        return format!("system:serviceaccount:{sa}");
    }
    sub.strip_prefix(USER_SUBJECT_PREFIX)
        .or_else(|| sub.strip_prefix(GROUP_SUBJECT_PREFIX))
        .unwrap_or(sub)
        .to_owned()
}

/// JWT claims of one token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    pub iss: String,
    /// The root principal, whose authority this is, typed by its kind: `user:<name>`,
    /// `group:<name>` or `serviceaccount:<namespace>:<name>` ([`principal_subject`]); never an
    /// agent's `agent:<namespace>/<name>`.
    pub sub: String,
    /// The one resource server the token is for.
    pub aud: String,
    /// The current actor (the agent presenting the token).
    pub client_id: String,
    /// Space-separated scopes (RFC 6749 §3.3).
    pub scope: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    /// RFC 8693 §4.1: the outermost `act` is the current actor, nested ones are prior actors.
    pub act: Actor,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_details: Option<Vec<AuthorizationDetail>>,
    /// Every hop of the delegation, root first: who delegated to whom, what, and who asked for and
    /// approved it (in the spirit of draft-liu-oauth-chain-delegation's `delegation_chain`, beside
    /// the RFC 8693 `act`, which carries identities only). The first record's delegator is the
    /// principal by kind and name as Kubernetes knows them (`{"kind": "User", "sub":
    /// "alice@example.com"}`); the token's `sub` is the same principal typed ([`principal_subject`]).
    pub delegation_chain: Vec<DelegationRecord>,
    #[serde(rename = "delegation.nhi.dev/grant")]
    pub grant: GrantReference,
    /// Where the token's status lives (draft-ietf-oauth-status-list §6.2):
    /// `{"status_list": {"idx": N, "uri": "<list>"}}`, set by the operator when it allocates the
    /// token's index ([`crate::status_list::TokenStatusRef::status_claim`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// The status-list entries (in the list of `status`) reserved for the tokens exchanged from the
    /// grant's token, at any depth: `{"first": N, "count": K}`. A token exchanged from this one
    /// takes one of them as its own `status` entry and carries the same `lineage`; revoking the
    /// grant's token revokes them all in the same publish ([`crate::status_list::LineageEntries`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<crate::status_list::LineageEntries>,
    /// For a token bound to a key (DPoP, RFC 9449): `{"jkt": "<RFC 7638 thumbprint>"}`. Whoever
    /// presents it must also send a DPoP proof signed by that key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<crate::dpop::Confirmation>,
    /// A Pod-delivered grant's own token (which never leaves the operator): `pod`, or `pod+dpop`
    /// when every token handed out from it must be key-bound. Part of what the token grants, so
    /// that a change of delivery replaces it. Absent from every token anyone else sees.
    #[serde(
        rename = "delegation.nhi.dev/delivery",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub delivery: Option<String>,
}

/// One hop of a delegation as the token records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelegationRecord {
    /// Who handed authority on: the principal (kind `User`, `Group` or `ServiceAccount`) or the
    /// agent of the hop above (kind `AgentIdentity`).
    pub delegator: Party,
    /// The agent that received it (its `act.sub`).
    pub delegate: String,
    /// The DelegationGrant of this hop (in the token's namespace).
    pub grant: String,
    /// The scopes of this hop, space-separated.
    pub scope: String,
    /// Who created the grant, as the Kubernetes apiserver authenticated them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Who approved it, when its agent requires approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// For a hop made by token exchange (RFC 8693): the workload that proved possession of the
    /// parent token and asked for this one. Absent for a hop made by a DelegationGrant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
}

/// The workload that proved possession of the parent token in a token exchange, as its pod-bound
/// ServiceAccount token named it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Its ServiceAccount's Kubernetes user name: `system:serviceaccount:<namespace>:<name>`.
    pub service_account: String,
    /// The pod it ran in, by name.
    pub pod: String,
    /// That pod's uid: a pod re-created under the same name is another workload.
    pub pod_uid: String,
}

/// A delegating party.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    pub kind: String,
    pub sub: String,
}

/// The hop records of a resolved chain (`status.chain`, root first).
pub fn delegation_records(chain: &[ChainLink]) -> Vec<DelegationRecord> {
    chain
        .windows(2)
        .map(|pair| {
            let (from, to) = (&pair[0], &pair[1]);
            DelegationRecord {
                delegator: Party {
                    kind: from.kind.clone(),
                    sub: from.subject.clone().unwrap_or_else(|| from.name.clone()),
                },
                delegate: to.subject.clone().unwrap_or_else(|| to.name.clone()),
                grant: to.grant.clone().unwrap_or_default(),
                scope: to.scopes.clone().unwrap_or_default().join(" "),
                requested_by: to.requested_by.clone(),
                approved_by: to.approved_by.clone(),
                workload: None,
            }
        })
        .collect()
}

/// One actor of the chain; identity claims only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

/// Which grant a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantReference {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Digest of the grant fields a token carries besides its chain and scopes (audience, details),
/// recorded with the token so that a change to them is noticed: a token for another audience or with
/// other details must be replaced, while timing edits (TTL, renewBefore, validUntil) need not.
pub fn claims_digest(spec: &DelegationGrantSpec) -> String {
    let fields = serde_json::json!([spec.audience, spec.authorization_details]);
    Sha256::digest(fields.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a token grants, leaving out when and which one it is (`iat`, `nbf`, `exp`, `jti`, its
/// status-list entry, the issuer): two tokens with the same substance allow exactly the same thing.
/// The operator remembers the substance of the token it wrote for each grant, so that whether that
/// token still says what the grant allows is decided from what it minted, not from the grant's
/// status (which whoever may write the status subresource can rewrite).
pub fn substance(claims: &AccessTokenClaims) -> u64 {
    let fields = serde_json::json!([
        claims.sub,
        claims.aud,
        claims.client_id,
        claims.scope,
        claims.act,
        claims.authorization_details,
        claims.delegation_chain,
        claims.grant,
        claims.delivery,
    ]);
    let digest = Sha256::digest(fields.to_string().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Nests actors given root-most first so that the last one is outermost and the first deepest.
/// `None` for an empty list.
pub fn nest_actors(actors: &[String]) -> Option<Actor> {
    actors.iter().fold(None, |prior, sub| {
        Some(Actor {
            sub: sub.clone(),
            act: prior.map(Box::new),
        })
    })
}

/// Builds the claims of a token for a resolved grant.
pub fn build_claims(
    issuer: &str,
    resolution: &Resolution,
    grant: GrantReference,
    authorization_details: Option<Vec<AuthorizationDetail>>,
    times: &TokenTimes,
    jti: String,
) -> Option<AccessTokenClaims> {
    let act = nest_actors(&resolution.actors)?;
    Some(AccessTokenClaims {
        iss: issuer.to_owned(),
        sub: principal_subject(&resolution.principal),
        aud: resolution.audience.clone(),
        client_id: act.sub.clone(),
        scope: resolution.effective_scopes.join(" "),
        iat: times.issued_at.as_second(),
        nbf: times.issued_at.as_second(),
        exp: times.expires_at.as_second(),
        jti,
        act,
        authorization_details,
        delegation_chain: delegation_records(&resolution.chain),
        grant,
        status: None,
        lineage: None,
        cnf: None,
        delivery: delivery_claim(resolution.delivery),
    })
}

/// The `delivery` claim of a Pod-delivered grant's token.
pub const DELIVERY_POD: &str = "pod";
/// The `delivery` claim of a Pod-delivered grant's token whose agent requires proof of possession.
pub const DELIVERY_POD_DPOP: &str = "pod+dpop";

/// The `delivery` claim of a grant's token: none for Secret delivery (tokens as before).
fn delivery_claim(delivery: super::delivery::Delivery) -> Option<String> {
    use super::delivery::Delivery;
    match delivery {
        Delivery::Secret => None,
        Delivery::Pod {
            proof_required: false,
        } => Some(DELIVERY_POD.into()),
        Delivery::Pod {
            proof_required: true,
        } => Some(DELIVERY_POD_DPOP.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outermost_act_is_the_current_actor_and_the_first_actor_is_deepest() {
        let act = nest_actors(&[
            "agent:ns/a".into(),
            "agent:ns/b".into(),
            "agent:ns/c".into(),
        ])
        .unwrap();
        let json = serde_json::to_value(&act).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"sub": "agent:ns/c", "act": {"sub": "agent:ns/b", "act": {"sub": "agent:ns/a"}}})
        );
    }

    fn sample_claims() -> AccessTokenClaims {
        AccessTokenClaims {
            iss: "https://issuer".into(),
            sub: "user:alice".into(),
            aud: "https://api".into(),
            client_id: "agent:ns/a".into(),
            scope: "read write".into(),
            iat: 100,
            nbf: 100,
            exp: 700,
            jti: "one".into(),
            act: nest_actors(&["agent:ns/a".into()]).unwrap(),
            authorization_details: None,
            delegation_chain: Vec::new(),
            grant: GrantReference {
                namespace: "ns".into(),
                name: "g".into(),
                uid: "u".into(),
            },
            status: None,
            lineage: None,
            cnf: None,
            delivery: None,
        }
    }

    #[test]
    fn the_substance_ignores_time_and_identity_and_follows_everything_granted() {
        let base = sample_claims();
        let mut renewed = base.clone();
        renewed.iat = 500;
        renewed.nbf = 500;
        renewed.exp = 1100;
        renewed.jti = "two".into();
        renewed.iss = "https://other-issuer".into();
        renewed.status = Some(serde_json::json!({"status_list": {"idx": 3, "uri": "u"}}));
        assert_eq!(substance(&base), substance(&renewed));
        let changes: Vec<fn(&mut AccessTokenClaims)> = vec![
            |c| c.sub = "user:bob".into(),
            |c| c.aud = "https://else".into(),
            |c| c.client_id = "agent:ns/b".into(),
            |c| c.scope = "read".into(),
            |c| c.act = nest_actors(&["agent:ns/x".into(), "agent:ns/a".into()]).unwrap(),
            |c| {
                c.authorization_details = Some(vec![AuthorizationDetail {
                    type_: "t".into(),
                    identifier: None,
                    actions: None,
                    locations: None,
                    datatypes: None,
                    privileges: None,
                }])
            },
            |c| {
                c.delegation_chain = vec![DelegationRecord {
                    delegator: Party {
                        kind: "User".into(),
                        sub: "alice".into(),
                    },
                    delegate: "agent:ns/a".into(),
                    grant: "g".into(),
                    scope: "read write".into(),
                    requested_by: Some("mallory".into()),
                    approved_by: None,
                    workload: None,
                }]
            },
            |c| c.grant.uid = "other".into(),
        ];
        for change in changes {
            let mut changed = base.clone();
            change(&mut changed);
            assert_ne!(substance(&base), substance(&changed), "{changed:?}");
        }
    }

    #[test]
    fn the_claims_digest_follows_audience_and_details_only() {
        let spec: DelegationGrantSpec = serde_json::from_value(serde_json::json!({
            "principal": {"kind": "User", "name": "a"}, "actorRef": {"name": "x"}, "scopes": ["s"],
            "audience": "https://api", "tokenTTL": "10m",
        }))
        .unwrap();
        let mut timing = spec.clone();
        timing.token_ttl = crate::api::Duration::from("5m");
        timing.renew_before = Some(crate::api::Duration::from("1m"));
        assert_eq!(claims_digest(&spec), claims_digest(&timing));
        let mut audience = spec.clone();
        audience.audience = "https://other".into();
        assert_ne!(claims_digest(&spec), claims_digest(&audience));
        let mut details = spec.clone();
        details.authorization_details = Some(vec![AuthorizationDetail {
            type_: "ticket".into(),
            identifier: Some("1".into()),
            actions: None,
            locations: None,
            datatypes: None,
            privileges: None,
        }]);
        assert_ne!(claims_digest(&spec), claims_digest(&details));
    }

    #[test]
    fn delegation_records_name_each_hop_its_requester_and_approver() {
        let link = |kind: &str, name: &str, subject: Option<&str>| ChainLink {
            kind: kind.into(),
            name: name.into(),
            subject: subject.map(Into::into),
            grant: subject.map(|_| format!("grant-{name}")),
            scopes: subject.map(|_| vec!["a".into(), "b".into()]),
            requested_by: subject.map(|_| "alice".into()),
            approved_by: (name == "second").then(|| "carol".into()),
        };
        let chain = [
            link("User", "alice", None),
            link("AgentIdentity", "first", Some("agent:ns/first")),
            link("AgentIdentity", "second", Some("agent:ns/second")),
        ];
        let json = serde_json::to_value(delegation_records(&chain)).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"delegator": {"kind": "User", "sub": "alice"}, "delegate": "agent:ns/first",
                 "grant": "grant-first", "scope": "a b", "requested_by": "alice"},
                {"delegator": {"kind": "AgentIdentity", "sub": "agent:ns/first"},
                 "delegate": "agent:ns/second", "grant": "grant-second", "scope": "a b",
                 "requested_by": "alice", "approved_by": "carol"},
            ])
        );
    }

    fn principal(kind: PrincipalKind, name: &str) -> Principal {
        Principal {
            kind,
            name: name.into(),
        }
    }

    #[test]
    fn a_principal_subject_says_its_kind_and_never_takes_an_agents_form() {
        use PrincipalKind::*;
        assert_eq!(
            principal_subject(&principal(User, "alice@example.com")),
            "user:alice@example.com"
        );
        assert_eq!(
            principal_subject(&principal(Group, "alice@example.com")),
            "group:alice@example.com"
        );
        assert_eq!(
            principal_subject(&principal(
                ServiceAccount,
                "system:serviceaccount:ci:deployer"
            )),
            "serviceaccount:ci:deployer"
        );
        // The same name under every kind, and names that look like other kinds' subjects: all
        // distinct, none an agent's subject.
        let names = [
            "alice@example.com",
            "agent:payments/refund-bot",
            "user:alice@example.com",
            "group:alice@example.com",
            "serviceaccount:ci:deployer",
            "system:serviceaccount:ci:deployer",
            "ci:deployer",
        ];
        let mut seen = std::collections::BTreeMap::new();
        for kind in [User, Group, ServiceAccount] {
            for name in names {
                let sub = principal_subject(&principal(kind, name));
                assert!(!sub.starts_with("agent:"), "{kind:?} {name:?}: {sub}");
                assert_ne!(sub, crate::api::agent_subject("payments", "refund-bot"));
                let earlier = seen.insert(sub.clone(), (kind, name));
                // Only a malformed ServiceAccount name (which the CRD refuses) maps like a valid one.
                if let Some(earlier) = earlier {
                    assert!(
                        kind == ServiceAccount
                            && earlier.0 == ServiceAccount
                            && [earlier.1, name].contains(&"ci:deployer"),
                        "{earlier:?} and {:?} share the subject {sub}",
                        (kind, name)
                    );
                }
            }
        }
    }

    #[test]
    fn a_single_actor_has_no_nested_act() {
        let json = serde_json::to_value(nest_actors(&["agent:ns/a".into()]).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"sub": "agent:ns/a"}));
        assert!(nest_actors(&[]).is_none());
    }
}

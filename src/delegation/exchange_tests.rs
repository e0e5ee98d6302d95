//! The exchange decision driven through every rule, without a cluster: a grant token, the agents of
//! its namespace, the AudiencePolicies of its audience, a proven caller, and what it asks.

use std::{collections::HashMap, sync::Arc, time::Duration as StdDuration};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::{SignedDuration, Timestamp},
};
use proptest::prelude::*;

use super::*;
use crate::{
    api::{Duration, *},
    delegation::{
        ceilings::tests::{open_policies, policy},
        claims::{GrantReference, nest_actors},
    },
};

const NS: &str = "support";
/// Another tenant's namespace: never named to a caller of `NS`.
const OTHER_NS: &str = "rivals";
const AUD: &str = "https://tickets.example.com";
const READ: &str = "tickets:read";
const WRITE: &str = "tickets:write";
const DELETE: &str = "tickets:delete";
const NOW: i64 = 1_800_000_000;
const SUBJECT_JTI: &str = "jti-of-the-grant-token";
const STATUS_URI: &str = "https://issuer.example.com/statuslists/1";

fn now() -> Timestamp {
    Timestamp::from_second(NOW).unwrap()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn subject_of(name: &str) -> String {
    agent_subject(NS, name)
}

fn agent(
    name: &str,
    sa: Option<&str>,
    scopes: &[&str],
    ttl: &str,
    delegation: Option<(i32, &[&str])>,
) -> AgentIdentity {
    AgentIdentity {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        },
        spec: AgentIdentitySpec {
            owner: Owner {
                kind: OwnerKind::Group,
                name: "support-leads".into(),
            },
            service_account_name: sa.map(Into::into),
            allowed_scopes: strings(scopes),
            allowed_audiences: vec![AUD.into()],
            max_token_ttl: Duration::from(ttl),
            delegation: delegation.map(|(max_depth, allowed)| DelegationPolicy {
                max_depth,
                allowed_actors: Some(strings(allowed)),
            }),
            require_approval: None,
            suspended: None,
            token_delivery: None,
            require_proof_of_possession: None,
        },
        status: None,
    }
}

fn detail(type_: &str, identifier: Option<&str>, actions: &[&str]) -> AuthorizationDetail {
    AuthorizationDetail {
        type_: type_.into(),
        identifier: identifier.map(Into::into),
        actions: Some(strings(actions)),
        locations: None,
        datatypes: None,
        privileges: None,
    }
}

/// What the cluster says: agents by namespace and name, and the AudiencePolicies.
#[derive(Clone)]
struct World {
    agents: HashMap<(String, String), Arc<AgentIdentity>>,
    policies: Vec<Arc<AudiencePolicy>>,
}

impl Directory for World {
    fn agent(&self, namespace: &str, name: &str) -> Option<Arc<AgentIdentity>> {
        self.agents
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
    fn audience_policies(&self, audience: &str) -> Vec<Arc<AudiencePolicy>> {
        self.policies
            .iter()
            .filter(|p| p.spec.audience == audience)
            .cloned()
            .collect()
    }
}

impl World {
    fn put(&mut self, agent: AgentIdentity) {
        let key = (
            agent.metadata.namespace.clone().unwrap_or_default(),
            agent.metadata.name.clone().unwrap_or_default(),
        );
        self.agents.insert(key, Arc::new(agent));
    }

    fn edit(&mut self, name: &str, change: impl FnOnce(&mut AgentIdentitySpec)) {
        let key = (NS.to_owned(), name.to_owned());
        let mut agent = self.agents[&key].as_ref().clone();
        change(&mut agent.spec);
        self.agents.insert(key, Arc::new(agent));
    }
}

/// triage (the grant's actor) may hand on to summarizer, mailer and archiver; summarizer back to
/// triage and on to archiver; mailer needs approval for writes; archiver reads only. Every
/// audience declared for everything, tickets details up to read and write.
fn world() -> World {
    let mut world = World {
        agents: HashMap::new(),
        policies: open_policies(
            AUD,
            strings(&[READ, WRITE, DELETE]),
            vec![detail("ticket", None, &["read", "write"])],
        ),
    };
    world.put(agent(
        "triage",
        Some("triage-sa"),
        &[READ, WRITE, DELETE],
        "1h",
        Some((2, &["summarizer", "mailer", "archiver"])),
    ));
    world.put(agent(
        "summarizer",
        Some("summarizer-sa"),
        &[READ, WRITE],
        "10m",
        Some((1, &["triage", "archiver"])),
    ));
    let mut mailer = agent("mailer", Some("mailer-sa"), &[READ, WRITE], "1h", None);
    mailer.spec.require_approval = Some(ApprovalRequirement {
        scopes: Some(strings(&[WRITE])),
    });
    world.put(mailer);
    world.put(agent("archiver", Some("archiver-sa"), &[READ], "1h", None));
    // Runs as its own ServiceAccount, which no agent of the chain allows.
    world.put(agent("lonely", Some("lonely-sa"), &[READ], "1h", None));
    // Another tenant's agent of the same name and ServiceAccount.
    let mut rival = agent("triage", Some("triage-sa"), &[READ], "1h", None);
    rival.metadata.namespace = Some(OTHER_NS.into());
    world.put(rival);
    world
}

/// alice's grant token for triage: read and write, nine minutes left.
fn grant_token() -> AccessTokenClaims {
    AccessTokenClaims {
        iss: "https://issuer.example.com".into(),
        sub: "user:alice@example.com".into(),
        aud: AUD.into(),
        client_id: subject_of("triage"),
        scope: format!("{READ} {WRITE}"),
        iat: NOW - 60,
        nbf: NOW - 60,
        exp: NOW + 540,
        jti: SUBJECT_JTI.into(),
        act: nest_actors(&[subject_of("triage")]).unwrap(),
        authorization_details: None,
        delegation_chain: vec![DelegationRecord {
            delegator: Party {
                kind: "User".into(),
                sub: "alice@example.com".into(),
            },
            delegate: subject_of("triage"),
            grant: "g".into(),
            scope: format!("{READ} {WRITE}"),
            requested_by: Some("alice@example.com".into()),
            approved_by: None,
            workload: None,
        }],
        grant: GrantReference {
            namespace: NS.into(),
            name: "g".into(),
            uid: "uid-g".into(),
        },
        status: Some(serde_json::json!({"status_list": {"idx": 8, "uri": STATUS_URI}})),
        lineage: Some(LINEAGE),
        cnf: None,
        delivery: None,
    }
}

fn bound_to(jkt: &str) -> crate::dpop::Confirmation {
    crate::dpop::Confirmation { jkt: jkt.into() }
}

#[test]
fn a_proof_binds_the_new_token_and_a_bound_lineage_stays_bound() {
    // Unbound subject, no proof: a bearer token, as before.
    assert_eq!(narrowing().decide().unwrap().cnf, None);
    // Unbound subject with a proof: bound to the proof's key.
    let bound = narrowing()
        .with(|c| c.proof_key = Some("key-a".into()))
        .decide()
        .unwrap();
    assert_eq!(bound.cnf, Some(bound_to("key-a")));
    // A hop from an unbound token binds to the key of whoever exchanged it.
    let hopped = hop()
        .with(|c| c.proof_key = Some("key-b".into()))
        .decide()
        .unwrap();
    assert_eq!(hopped.cnf, Some(bound_to("key-b")));
    // Bound subject, proof by its key: the new token is bound to that key too.
    let again = Case::new("triage-sa")
        .with(|c| {
            c.subject = bound.clone();
            c.proof_key = Some("key-a".into());
        })
        .decide()
        .unwrap();
    assert_eq!(again.cnf, Some(bound_to("key-a")));
    // A bound token handed to the next agent's workload, which holds another key: refused.
    let stolen = Case::new("summarizer-sa")
        .with(|c| {
            c.subject = bound.clone();
            c.proof_key = Some("key-b".into());
        })
        .decide()
        .unwrap_err();
    assert_eq!(stolen.reason, reason::PROOF_KEY_MISMATCH);
}

/// The grant token's lineage: the entries right after its own (8).
const LINEAGE: LineageEntries = LineageEntries { first: 9, count: 7 };

/// The status entry a token carries, and whether it is one of the grant token's lineage.
fn in_lineage(token: &AccessTokenClaims) -> bool {
    let entry = TokenStatusRef::from_status_claim(token.status.as_ref().unwrap()).unwrap();
    entry.uri == STATUS_URI && LINEAGE.contains(entry.idx) && token.lineage == Some(LINEAGE)
}

#[derive(Clone)]
struct Case {
    subject: AccessTokenClaims,
    grant: GrantState,
    caller: ProvenWorkload,
    request: ExchangeRequest,
    world: World,
    limits: ExchangeLimits,
    /// The thumbprint of the DPoP proof's key, if one came.
    proof_key: Option<String>,
    /// A delivery (Pod delivery) rather than an exchange.
    delivery: bool,
}

impl Case {
    /// The grant token, exchanged by a pod running as `sa` in the token's namespace, asking nothing.
    fn new(sa: &str) -> Self {
        Self {
            subject: grant_token(),
            grant: GrantState::Live {
                uid: "uid-g".into(),
                created: Some(Timestamp::from_second(NOW - 600).unwrap()),
            },
            caller: ProvenWorkload {
                namespace: NS.into(),
                service_account: sa.into(),
                pod_name: format!("{sa}-pod"),
                pod_uid: format!("uid-{sa}-pod"),
            },
            request: ExchangeRequest::default(),
            world: world(),
            limits: ExchangeLimits::default(),
            proof_key: None,
            delivery: false,
        }
    }

    fn decide(&self) -> Result<AccessTokenClaims, ExchangeRefusal> {
        decide(&ExchangeFacts {
            subject: &self.subject,
            grant: self.grant.clone(),
            caller: &self.caller,
            request: &self.request,
            directory: &self.world,
            limits: &self.limits,
            now: now(),
            jti: "jti-new".into(),
            proof_key: self.proof_key.clone(),
            delivery: self.delivery,
        })
    }

    fn scopes(mut self, scopes: &[&str]) -> Self {
        self.request.scopes = Some(strings(scopes));
        self
    }

    fn with(mut self, change: impl FnOnce(&mut Case)) -> Self {
        change(&mut self);
        self
    }
}

/// triage's own workload narrows its token to reading.
fn narrowing() -> Case {
    Case::new("triage-sa").scopes(&[READ])
}

/// summarizer's workload takes triage's token on, reading.
fn hop() -> Case {
    Case::new("summarizer-sa").scopes(&[READ])
}

/// The token summarizer got from triage's by exchange.
fn hopped_token() -> AccessTokenClaims {
    hop().decide().unwrap()
}

/// A record of a narrowing by triage's workload.
fn narrowing_record() -> DelegationRecord {
    DelegationRecord {
        delegator: Party {
            kind: "AgentIdentity".into(),
            sub: subject_of("triage"),
        },
        delegate: subject_of("triage"),
        grant: "g".into(),
        scope: READ.into(),
        requested_by: Some(format!("system:serviceaccount:{NS}:triage-sa")),
        approved_by: None,
        workload: Some(Workload {
            service_account: format!("system:serviceaccount:{NS}:triage-sa"),
            pod: "p".into(),
            pod_uid: "u".into(),
        }),
    }
}

/// A chain of `n` agents a0 → a1 → … each allowing the next and eight hops below it, and the grant
/// token of its last.
fn long_chain(n: usize) -> (World, AccessTokenClaims) {
    let mut world = world();
    for i in 0..=n {
        let next = format!("a{}", i + 1);
        world.put(agent(
            &format!("a{i}"),
            Some(&format!("a{i}-sa")),
            &[READ, WRITE],
            "1h",
            Some((8, &[next.as_str()])),
        ));
    }
    let actors: Vec<String> = (0..n).map(|i| subject_of(&format!("a{i}"))).collect();
    let mut token = grant_token();
    token.act = nest_actors(&actors).unwrap();
    token.client_id = actors[n - 1].clone();
    token.delegation_chain = (0..n)
        .map(|i| DelegationRecord {
            delegator: if i == 0 {
                Party {
                    kind: "User".into(),
                    sub: "alice@example.com".into(),
                }
            } else {
                Party {
                    kind: "AgentIdentity".into(),
                    sub: actors[i - 1].clone(),
                }
            },
            delegate: actors[i].clone(),
            grant: format!("g{i}"),
            scope: format!("{READ} {WRITE}"),
            requested_by: None,
            approved_by: None,
            workload: None,
        })
        .collect();
    (world, token)
}

type Expected = Result<(), (ErrorCode, &'static str)>;

/// One row per rule and reason, and a passing neighbour for each.
fn table() -> Vec<(&'static str, Case, Expected)> {
    use ErrorCode::*;
    use reason::*;
    let tall_details: Vec<AuthorizationDetail> = (0..20)
        .map(|i| detail("ticket", Some(&format!("{i:0>200}")), &["read"]))
        .collect();
    let with_details = |c: &mut Case| {
        c.subject.authorization_details = Some(vec![detail("ticket", None, &["read", "write"])])
    };
    let only_policy = |p: AudiencePolicy| move |c: &mut Case| c.world.policies = vec![Arc::new(p)];
    let mut approving = policy("approving", AUD, &[NS], &[READ, WRITE]);
    approving.spec.require_approval = Some(ApprovalRequirement { scopes: None });
    let mut short_lived = policy("short-lived", AUD, &[NS], &[READ, WRITE]);
    short_lived.spec.max_grant_lifetime = Some(Duration::from("1h"));
    vec![
        // 1. The grant.
        ("grant live", narrowing(), Ok(())),
        (
            "grant missing",
            narrowing().with(|c| c.grant = GrantState::Missing),
            Err((InvalidGrant, GRANT_GONE)),
        ),
        (
            "grant deleting",
            narrowing().with(|c| c.grant = GrantState::Deleting),
            Err((InvalidGrant, GRANT_GONE)),
        ),
        (
            "grant re-created under the same name",
            narrowing().with(|c| {
                c.grant = GrantState::Live {
                    uid: "uid-g-2".into(),
                    created: Some(now()),
                }
            }),
            Err((InvalidGrant, GRANT_GONE)),
        ),
        // 2. Status, and act against the chain.
        (
            "no status claim",
            narrowing().with(|c| c.subject.status = None),
            Err((InvalidGrant, NO_STATUS)),
        ),
        (
            "a bound token without a proof",
            narrowing().with(|c| c.subject.cnf = Some(bound_to("key-a"))),
            Err((InvalidDpopProof, PROOF_REQUIRED)),
        ),
        (
            "a bound token with a proof by another key",
            narrowing().with(|c| {
                c.subject.cnf = Some(bound_to("key-a"));
                c.proof_key = Some("key-b".into());
            }),
            Err((InvalidDpopProof, PROOF_KEY_MISMATCH)),
        ),
        (
            "no lineage (a token minted before lineages)",
            narrowing().with(|c| c.subject.lineage = None),
            Err((InvalidGrant, NO_LINEAGE)),
        ),
        (
            "a lineage that does not hold the token's own entry",
            narrowing().with(|c| {
                c.subject.lineage = Some(LineageEntries {
                    first: 100,
                    count: 7,
                })
            }),
            Err((InvalidGrant, NO_LINEAGE)),
        ),
        (
            "an empty lineage",
            narrowing().with(|c| c.subject.lineage = Some(LineageEntries { first: 9, count: 0 })),
            Err((InvalidGrant, NO_LINEAGE)),
        ),
        (
            "act with an actor the chain lacks",
            narrowing().with(|c| {
                c.subject.act =
                    nest_actors(&[subject_of("summarizer"), subject_of("triage")]).unwrap()
            }),
            Err((InvalidGrant, ACT_MISMATCH)),
        ),
        (
            "act reordered",
            hop().with(|c| {
                c.subject = hopped_token();
                c.subject.act =
                    nest_actors(&[subject_of("summarizer"), subject_of("triage")]).unwrap();
                c.subject.client_id = subject_of("triage");
            }),
            Err((InvalidGrant, ACT_MISMATCH)),
        ),
        (
            "client_id other than the current actor",
            narrowing().with(|c| c.subject.client_id = subject_of("summarizer")),
            Err((InvalidGrant, ACT_MISMATCH)),
        ),
        (
            "actor of another namespace",
            narrowing().with(|c| {
                let rival = agent_subject(OTHER_NS, "triage");
                c.subject.act = nest_actors(std::slice::from_ref(&rival)).unwrap();
                c.subject.client_id = rival.clone();
                c.subject.delegation_chain[0].delegate = rival;
            }),
            Err((InvalidGrant, ACT_MISMATCH)),
        ),
        (
            "act nested deeper than the longest chain",
            Case::new("a9-sa").with(|c| {
                let (world, token) = long_chain(MAX_CHAIN_LENGTH + 1);
                (c.world, c.subject) = (world, token);
            }),
            Err((InvalidGrant, ACT_MISMATCH)),
        ),
        (
            "a narrowing record adds no actor",
            narrowing().with(|c| c.subject = narrowing().decide().unwrap()),
            Ok(()),
        ),
        // 3. The chain's agents.
        (
            "agent of the chain missing",
            narrowing().with(|c| {
                c.world.agents.remove(&(NS.to_owned(), "triage".to_owned()));
            }),
            Err((InvalidGrant, AGENT_MISSING)),
        ),
        (
            "agent of the chain suspended",
            hop().with(|c| {
                c.subject = hopped_token();
                c.caller.service_account = "archiver-sa".into();
                c.world.edit("triage", |a| a.suspended = Some(true));
            }),
            Err((InvalidGrant, AGENT_SUSPENDED)),
        ),
        (
            "agent outside the chain suspended",
            narrowing().with(|c| c.world.edit("archiver", |a| a.suspended = Some(true))),
            Ok(()),
        ),
        // 4. The caller's namespace.
        (
            "caller of another namespace",
            narrowing().with(|c| c.caller.namespace = OTHER_NS.into()),
            Err((UnauthorizedClient, OTHER_NAMESPACE)),
        ),
        // 5. Who the new actor is.
        ("the current actor's workload narrows", narrowing(), Ok(())),
        ("an allowed actor's workload hops", hop(), Ok(())),
        (
            "caller runs no agent",
            Case::new("stranger-sa").scopes(&[READ]),
            Err((UnauthorizedClient, NOT_AN_ACTOR)),
        ),
        (
            "caller runs an agent the current actor does not allow",
            Case::new("lonely-sa").scopes(&[READ]),
            Err((UnauthorizedClient, NOT_AN_ACTOR)),
        ),
        (
            "an agent without a ServiceAccount never matches",
            hop().with(|c| {
                c.world
                    .edit("summarizer", |a| a.service_account_name = None)
            }),
            Err((UnauthorizedClient, NOT_AN_ACTOR)),
        ),
        (
            "two allowed agents run as the caller",
            hop().with(|c| {
                c.world.edit("mailer", |a| {
                    a.service_account_name = Some("summarizer-sa".into())
                })
            }),
            Err((UnauthorizedClient, AMBIGUOUS_ACTOR)),
        ),
        // 6. A hop's own limits.
        (
            "hop to a suspended agent",
            hop().with(|c| c.world.edit("summarizer", |a| a.suspended = Some(true))),
            Err((UnauthorizedClient, AGENT_SUSPENDED)),
        ),
        (
            "hop back up the chain",
            Case::new("triage-sa")
                .scopes(&[READ])
                .with(|c| c.subject = hopped_token()),
            Err((UnauthorizedClient, CIRCULAR)),
        ),
        (
            "hop past the grant actor's maxDepth",
            hop().with(|c| {
                c.world
                    .edit("triage", |a| a.delegation.as_mut().unwrap().max_depth = 0)
            }),
            Err((UnauthorizedClient, TOO_DEEP)),
        ),
        (
            "hop within the grant actor's maxDepth",
            hop().with(|c| {
                c.world
                    .edit("triage", |a| a.delegation.as_mut().unwrap().max_depth = 1)
            }),
            Ok(()),
        ),
        (
            "hop past the longest chain",
            Case::new(&format!("a{MAX_CHAIN_LENGTH}-sa"))
                .scopes(&[READ])
                .with(|c| {
                    let (world, token) = long_chain(MAX_CHAIN_LENGTH);
                    (c.world, c.subject) = (world, token);
                }),
            Err((UnauthorizedClient, TOO_DEEP)),
        ),
        (
            "hop to the longest chain",
            Case::new(&format!("a{}-sa", MAX_CHAIN_LENGTH - 1))
                .scopes(&[READ])
                .with(|c| {
                    let (world, token) = long_chain(MAX_CHAIN_LENGTH - 1);
                    (c.world, c.subject) = (world, token);
                }),
            Ok(()),
        ),
        (
            "hop to an agent needing approval for the scopes",
            Case::new("mailer-sa").scopes(&[WRITE]),
            Err((UnauthorizedClient, APPROVAL_REQUIRED)),
        ),
        (
            "hop to an agent needing approval for other scopes",
            Case::new("mailer-sa").scopes(&[READ]),
            Ok(()),
        ),
        (
            "a token recording the most hops",
            narrowing().with(|c| {
                c.subject
                    .delegation_chain
                    .resize(MAX_DELEGATION_RECORDS, narrowing_record())
            }),
            Err((UnauthorizedClient, TOO_MANY_EXCHANGES)),
        ),
        (
            "a token recording one hop fewer",
            narrowing().with(|c| {
                c.subject
                    .delegation_chain
                    .resize(MAX_DELEGATION_RECORDS - 1, narrowing_record())
            }),
            Ok(()),
        ),
        // 7. Scopes.
        ("the token's scopes", Case::new("triage-sa"), Ok(())),
        (
            "scopes asked twice",
            narrowing().scopes(&[READ, READ]),
            Ok(()),
        ),
        (
            "no scope",
            narrowing().scopes(&[]),
            Err((InvalidRequest, MALFORMED_SCOPE)),
        ),
        (
            "a scope with a space",
            narrowing().scopes(&["tickets:read tickets:write"]),
            Err((InvalidRequest, MALFORMED_SCOPE)),
        ),
        (
            "a scope with a quote",
            narrowing().scopes(&["tickets:\"read\""]),
            Err((InvalidRequest, MALFORMED_SCOPE)),
        ),
        (
            "a scope too long",
            narrowing().with(|c| c.request.scopes = Some(vec!["x".repeat(MAX_SCOPE_LEN + 1)])),
            Err((InvalidRequest, MALFORMED_SCOPE)),
        ),
        (
            "too many scopes",
            narrowing().with(|c| {
                c.request.scopes = Some(
                    (0..=MAX_REQUESTED_SCOPES)
                        .map(|i| format!("s{i}"))
                        .collect(),
                )
            }),
            Err((InvalidRequest, MALFORMED_SCOPE)),
        ),
        (
            "a scope the token lacks",
            narrowing().scopes(&[READ, DELETE]),
            Err((InvalidScope, WIDER_SCOPE)),
        ),
        (
            "a scope the new actor lacks",
            Case::new("archiver-sa"),
            Err((InvalidScope, WIDER_SCOPE)),
        ),
        (
            "a scope the current actor no longer allows",
            narrowing().with(|c| {
                c.world
                    .edit("triage", |a| a.allowed_scopes = strings(&[WRITE]))
            }),
            Err((InvalidScope, WIDER_SCOPE)),
        ),
        // 8. Audience.
        (
            "the token's audience",
            hop().with(|c| c.request.audience = Some(AUD.into())),
            Ok(()),
        ),
        (
            "another audience",
            hop().with(|c| c.request.audience = Some("https://else.example.com".into())),
            Err((InvalidTarget, OTHER_AUDIENCE)),
        ),
        (
            "an audience the new actor lacks",
            hop().with(|c| {
                c.world.edit("summarizer", |a| {
                    a.allowed_audiences = vec!["https://else.example.com".into()]
                })
            }),
            Err((InvalidTarget, OTHER_AUDIENCE)),
        ),
        // 9. Details.
        ("the token's details", hop().with(with_details), Ok(())),
        (
            "narrower details",
            hop().with(with_details).with(|c| {
                c.request.authorization_details = Some(vec![detail("ticket", Some("1"), &["read"])])
            }),
            Ok(()),
        ),
        (
            "details below a token without any",
            hop().with(|c| {
                c.request.authorization_details = Some(vec![detail("ticket", Some("1"), &["read"])])
            }),
            Ok(()),
        ),
        (
            "wider details",
            hop().with(with_details).with(|c| {
                c.request.authorization_details =
                    Some(vec![detail("ticket", None, &["read", "delete"])])
            }),
            Err((InvalidAuthorizationDetails, WIDER_DETAILS)),
        ),
        (
            "no details below a token with some",
            hop()
                .with(with_details)
                .with(|c| c.request.authorization_details = Some(Vec::new())),
            Err((InvalidAuthorizationDetails, WIDER_DETAILS)),
        ),
        (
            "details too large",
            hop()
                .with(with_details)
                .with(|c| c.request.authorization_details = Some(tall_details.clone())),
            Err((InvalidAuthorizationDetails, DETAILS_TOO_LARGE)),
        ),
        // 10. AudiencePolicies.
        (
            "audience declared for other namespaces only",
            hop().with(only_policy(policy(
                "rivals-tickets",
                AUD,
                &[OTHER_NS],
                &[READ],
            ))),
            Err((InvalidTarget, AUDIENCE_UNDECLARED)),
        ),
        (
            "audience declared for no namespace",
            hop().with(|c| c.world.policies.clear()),
            Err((InvalidTarget, AUDIENCE_UNDECLARED)),
        ),
        (
            "scopes beyond the policy",
            hop().with(only_policy(policy("writers", AUD, &[NS], &[WRITE]))),
            Err((InvalidScope, BEYOND_POLICY)),
        ),
        (
            "the grant's lifetime under the policy ended",
            hop().with(only_policy(short_lived.clone())).with(|c| {
                c.grant = GrantState::Live {
                    uid: "uid-g".into(),
                    created: Some(Timestamp::from_second(NOW - 7200).unwrap()),
                }
            }),
            Err((InvalidGrant, GRANT_LIFETIME_ENDED)),
        ),
        (
            "the grant's lifetime under the policy goes on",
            hop().with(only_policy(short_lived)),
            Ok(()),
        ),
        (
            "hop under a policy requiring approval",
            hop().with(only_policy(approving.clone())),
            Err((UnauthorizedClient, APPROVAL_REQUIRED)),
        ),
        (
            "narrowing under a policy requiring approval",
            narrowing().with(only_policy(approving)),
            Ok(()),
        ),
        // 11. Lifetime.
        (
            "expires_in within the token's life",
            hop().with(|c| c.request.expires_in = Some(540)),
            Ok(()),
        ),
        (
            "expires_in zero",
            hop().with(|c| c.request.expires_in = Some(0)),
            Err((InvalidRequest, ZERO_LIFETIME)),
        ),
        (
            "expires_in past the token's life",
            hop().with(|c| c.request.expires_in = Some(541)),
            Err((InvalidRequest, TOO_LONG)),
        ),
        (
            "expires_in past the operator's limit",
            hop().with(|c| {
                c.limits.max_ttl = StdDuration::from_secs(300);
                c.request.expires_in = Some(301);
            }),
            Err((InvalidRequest, TOO_LONG)),
        ),
        (
            "the new actor's maxTokenTTL unreadable",
            hop().with(|c| {
                c.world
                    .edit("summarizer", |a| a.max_token_ttl = Duration::from("soon"))
            }),
            Err((UnauthorizedClient, AGENT_INVALID)),
        ),
        (
            "a token with a second left",
            hop().with(|c| c.subject.exp = NOW + 1),
            Ok(()),
        ),
        (
            "a token expiring now",
            hop().with(|c| c.subject.exp = NOW),
            Err((InvalidGrant, SUBJECT_EXPIRING)),
        ),
    ]
}

#[test]
fn each_rule_refuses_with_its_code_and_reason_and_its_neighbour_passes() {
    for (name, case, expected) in table() {
        let got = case.decide().map(|_| ()).map_err(|r| (r.code, r.reason));
        assert_eq!(got, expected, "{name}: {:?}", case.decide());
    }
}

#[test]
fn every_reason_is_in_the_table() {
    use reason::*;
    let tested: Vec<&str> = table()
        .into_iter()
        .filter_map(|(_, _, e)| e.err().map(|(_, r)| r))
        .collect();
    for reason in [
        GRANT_GONE,
        NO_STATUS,
        ACT_MISMATCH,
        AGENT_MISSING,
        AGENT_SUSPENDED,
        OTHER_NAMESPACE,
        NOT_AN_ACTOR,
        AMBIGUOUS_ACTOR,
        CIRCULAR,
        TOO_DEEP,
        APPROVAL_REQUIRED,
        TOO_MANY_EXCHANGES,
        MALFORMED_SCOPE,
        WIDER_SCOPE,
        OTHER_AUDIENCE,
        WIDER_DETAILS,
        DETAILS_TOO_LARGE,
        AUDIENCE_UNDECLARED,
        GRANT_LIFETIME_ENDED,
        BEYOND_POLICY,
        AGENT_INVALID,
        ZERO_LIFETIME,
        SUBJECT_EXPIRING,
        TOO_LONG,
    ] {
        assert!(tested.contains(&reason), "{reason} untested");
    }
}

#[test]
fn error_codes_are_the_rfc_names() {
    use ErrorCode::*;
    let names: Vec<&str> = [
        InvalidRequest,
        InvalidGrant,
        InvalidTarget,
        InvalidScope,
        UnauthorizedClient,
        InvalidAuthorizationDetails,
    ]
    .into_iter()
    .map(ErrorCode::as_str)
    .collect();
    assert_eq!(
        names,
        [
            "invalid_request",
            "invalid_grant",
            "invalid_target",
            "invalid_scope",
            "unauthorized_client",
            "invalid_authorization_details"
        ]
    );
}

#[test]
fn no_description_names_another_namespace_or_carries_token_text() {
    for (name, case, _) in table() {
        let Err(refusal) = case.decide() else {
            continue;
        };
        let text = &refusal.description;
        let other = if case.caller.namespace == NS {
            OTHER_NS
        } else {
            NS
        };
        assert!(!text.contains(other), "{name}: {text}");
        for secret in [SUBJECT_JTI, "jti-new", STATUS_URI, "eyJ", "uid-"] {
            assert!(!text.contains(secret), "{name}: {secret} in {text}");
        }
        assert!(!text.is_empty(), "{name}");
    }
    // What the caller asked is not echoed when it is not what a token may hold.
    let pasted = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
    for case in [
        narrowing().scopes(&[&format!("{pasted} x")]),
        narrowing().with(|c| c.request.audience = Some(pasted.into())),
    ] {
        let refusal = case.decide().unwrap_err();
        assert!(!refusal.description.contains("eyJ"), "{refusal:?}");
    }
}

#[test]
fn a_narrowing_keeps_the_actor_and_records_the_workload() {
    let token = narrowing().decide().unwrap();
    let subject = grant_token();
    assert_eq!(token.act, subject.act);
    assert_eq!(token.client_id, subject_of("triage"));
    assert_eq!(token.scope, READ);
    assert_eq!(token.aud, AUD);
    assert_eq!((token.iat, token.nbf, token.exp), (NOW, NOW, NOW + 540));
    assert_eq!(token.jti, "jti-new");
    assert!(
        in_lineage(&token),
        "its own entry, in the grant token's lineage: {:?}",
        token.status
    );
    assert_ne!(token.status, subject.status);
    assert_eq!(
        (&token.iss, &token.sub, &token.grant),
        (&subject.iss, &subject.sub, &subject.grant)
    );
    assert_eq!(token.delegation_chain[..1], subject.delegation_chain[..]);
    assert_eq!(
        serde_json::to_value(&token.delegation_chain[1]).unwrap(),
        serde_json::json!({
            "delegator": {"kind": "AgentIdentity", "sub": "agent:support/triage"},
            "delegate": "agent:support/triage",
            "grant": "g",
            "scope": "tickets:read",
            "requested_by": "system:serviceaccount:support:triage-sa",
            "workload": {
                "service_account": "system:serviceaccount:support:triage-sa",
                "pod": "triage-sa-pod",
                "pod_uid": "uid-triage-sa-pod",
            },
        })
    );
}

#[test]
fn a_hop_nests_act_one_deeper_and_records_the_hop() {
    let token = hop().decide().unwrap();
    assert_eq!(
        serde_json::to_value(&token.act).unwrap(),
        serde_json::json!({"sub": "agent:support/summarizer", "act": {"sub": "agent:support/triage"}})
    );
    assert_eq!(token.client_id, subject_of("summarizer"));
    let record = &token.delegation_chain[1];
    assert_eq!(record.delegator.sub, subject_of("triage"));
    assert_eq!(record.delegate, subject_of("summarizer"));
    assert_eq!(record.approved_by, None);
    assert_eq!(
        record.workload.as_ref().map(|w| w.pod.as_str()),
        Some("summarizer-sa-pod")
    );
    assert!(in_lineage(&token));
    // summarizer's maxTokenTTL is ten minutes; the token had nine left.
    assert_eq!(token.exp, NOW + 540);
}

#[test]
fn an_exchanged_token_exchanges_again_keeping_its_nested_act_and_never_living_longer() {
    let first = hop().decide().unwrap();
    // Narrowed by summarizer's own workload: the nested act stays as it is (keycloak#52691).
    let narrowed = Case::new("summarizer-sa")
        .with(|c| c.subject = first.clone())
        .decide()
        .unwrap();
    assert_eq!(narrowed.act, first.act);
    assert_eq!(narrowed.act.act.as_ref().unwrap().sub, subject_of("triage"));
    assert_eq!(narrowed.delegation_chain.len(), 3);
    // On to archiver: one deeper again, every prior actor kept.
    let second = Case::new("archiver-sa")
        .scopes(&[READ])
        .with(|c| c.subject = narrowed.clone())
        .decide()
        .unwrap();
    assert_eq!(
        serde_json::to_value(&second.act).unwrap(),
        serde_json::json!({"sub": "agent:support/archiver", "act": {"sub": "agent:support/summarizer",
            "act": {"sub": "agent:support/triage"}}})
    );
    assert!(
        in_lineage(&narrowed) && in_lineage(&second),
        "every depth in the root's lineage"
    );
    assert!(second.exp <= narrowed.exp && narrowed.exp <= first.exp);
    // Asking for longer than the subject has left is refused, not granted.
    let later = Case::new("archiver-sa")
        .scopes(&[READ])
        .with(|c| {
            c.subject = second.clone();
            c.subject.exp = NOW + 30;
            c.request.expires_in = Some(31);
        })
        .decide()
        .unwrap_err();
    assert_eq!(later.reason, reason::TOO_LONG);
    assert!(
        later.description.contains("at most 30"),
        "{}",
        later.description
    );
}

#[test]
fn circular_a_to_b_to_a_is_refused() {
    let refusal = Case::new("triage-sa")
        .scopes(&[READ])
        .with(|c| c.subject = hopped_token())
        .decide()
        .unwrap_err();
    assert_eq!(
        (refusal.code, refusal.reason),
        (ErrorCode::UnauthorizedClient, reason::CIRCULAR)
    );
    assert!(refusal.description.contains("\"triage\""), "{refusal:?}");
}

#[test]
fn depth_past_max_depth_through_two_hops_is_refused_like_a_grant_hop() {
    let mut first = hop();
    first
        .world
        .edit("triage", |a| a.delegation.as_mut().unwrap().max_depth = 1);
    let hopped = first.decide().unwrap();
    let refusal = Case::new("archiver-sa")
        .scopes(&[READ])
        .with(|c| {
            c.world = first.world.clone();
            c.subject = hopped;
        })
        .decide()
        .unwrap_err();
    assert_eq!(
        (refusal.code, refusal.reason),
        (ErrorCode::UnauthorizedClient, reason::TOO_DEEP)
    );
    assert_eq!(
        refusal.description,
        "AgentIdentity \"triage\" allows 1 further hop(s) below it (spec.delegation.maxDepth) but AgentIdentity \"archiver\" would be 2 below it"
    );
}

#[test]
fn the_lifetime_is_the_least_of_every_limit() {
    let exp = |case: Case| case.decide().map(|t| t.exp - NOW);
    assert_eq!(exp(hop()), Ok(540));
    assert_eq!(exp(hop().with(|c| c.request.expires_in = Some(60))), Ok(60));
    assert_eq!(
        exp(hop().with(|c| c.limits.max_ttl = StdDuration::from_secs(300))),
        Ok(300)
    );
    assert_eq!(
        exp(hop().with(|c| c
            .world
            .edit("summarizer", |a| a.max_token_ttl = Duration::from("3m")))),
        Ok(180)
    );
    let mut policy_ttl = policy("brief", AUD, &[NS], &[READ]);
    policy_ttl.spec.max_token_ttl = Duration::from("2m");
    assert_eq!(
        exp(hop().with(|c| c.world.policies = vec![Arc::new(policy_ttl)])),
        Ok(120)
    );
    // The grant was created ten minutes ago; a 15-minute lifetime leaves five.
    let mut ending = policy("ending", AUD, &[NS], &[READ]);
    ending.spec.max_grant_lifetime = Some(Duration::from("15m"));
    assert_eq!(
        exp(hop().with(|c| c.world.policies = vec![Arc::new(ending)])),
        Ok(300)
    );
    // A fraction of a second is never rounded up past the subject.
    let late = hop()
        .with(|c| c.subject.exp = NOW + 2)
        .decide()
        .map(|t| t.exp);
    let facts_now = now().checked_add(SignedDuration::from_millis(900)).unwrap();
    let mut case = hop();
    case.subject.exp = NOW + 2;
    let token = decide(&ExchangeFacts {
        subject: &case.subject,
        grant: case.grant.clone(),
        caller: &case.caller,
        request: &case.request,
        directory: &case.world,
        limits: &case.limits,
        now: facts_now,
        jti: "j".into(),
        proof_key: None,
        delivery: false,
    })
    .unwrap();
    assert_eq!(late, Ok(NOW + 2));
    assert!(token.exp <= case.subject.exp);
}

/// A delivery (Pod delivery) gives the grant's own agent's pod a narrower token of its own, and
/// nobody else one: an agent the actor may delegate to is not its agent.
#[test]
fn a_delivery_goes_only_to_the_grants_own_agent() {
    use ErrorCode::*;
    use reason::*;
    let delivery = |sa: &str| Case::new(sa).with(|c| c.delivery = true);
    let token = delivery("triage-sa")
        .decide()
        .expect("the agent's pod gets one");
    assert_eq!(token.act.sub, subject_of("triage"));
    let record = token
        .delegation_chain
        .last()
        .expect("a record of the delivery");
    assert_eq!(
        record.workload.as_ref().map(|w| w.pod.as_str()),
        Some("triage-sa-pod")
    );
    let refused = delivery("summarizer-sa")
        .decide()
        .expect_err("a hop is no delivery");
    assert_eq!(
        (refused.code, refused.reason),
        (UnauthorizedClient, NOT_THE_AGENT)
    );
    assert!(refused.description.contains("summarizer-sa"));
    // The same ServiceAccount exchanging a token it holds may hop, as before.
    assert!(hop().decide().is_ok());
    for sa in ["lonely-sa", "unknown-sa"] {
        let refused = delivery(sa).decide().expect_err("not an actor");
        assert_eq!(refused.reason, NOT_AN_ACTOR);
    }
}

/// An agent that requires proof of possession is handed no token without a DPoP proof, by
/// delivery or exchange, and every token it gets is bound to the proof's key.
#[test]
fn an_agent_that_requires_proof_gets_only_bound_tokens() {
    use ErrorCode::*;
    use reason::*;
    let requires = |c: &mut Case| {
        c.world
            .edit("triage", |a| a.require_proof_of_possession = Some(true))
    };
    for case in [
        narrowing().with(requires),
        narrowing().with(requires).with(|c| c.delivery = true),
    ] {
        let refused = case.decide().expect_err("no proof");
        assert_eq!(
            (refused.code, refused.reason),
            (InvalidDpopProof, PROOF_REQUIRED)
        );
        assert!(refused.description.contains("triage"));
        let bound = case
            .with(|c| c.proof_key = Some("key-a".into()))
            .decide()
            .expect("with a proof");
        assert_eq!(bound.cnf, Some(bound_to("key-a")));
    }
    // The hop's new agent does not require it: its token needs no proof.
    assert!(hop().with(requires).decide().is_ok());
    // A grant token minted for bound delivery needs a proof even where the agent's spec (as this
    // process last saw it) does not say so yet.
    let lagging = narrowing().with(|c| {
        c.delivery = true;
        c.subject.delivery = Some("pod+dpop".into());
    });
    let refused = lagging.clone().decide().expect_err("no proof");
    assert_eq!(refused.reason, PROOF_REQUIRED);
    assert!(
        lagging
            .with(|c| c.proof_key = Some("k".into()))
            .decide()
            .is_ok()
    );
}

#[test]
fn grant_tokens_serialize_without_a_workload() {
    let json = serde_json::to_value(&grant_token().delegation_chain[0]).unwrap();
    assert!(json.get("workload").is_none(), "{json}");
    let back: DelegationRecord = serde_json::from_value(json).unwrap();
    assert_eq!(back.workload, None);
}

fn any_detail() -> impl Strategy<Value = AuthorizationDetail> {
    (
        prop::sample::select(vec!["ticket", "case"]),
        proptest::option::of(prop::sample::select(vec!["1", "2"])),
        prop::sample::subsequence(vec!["read", "write", "delete"], 0..=3),
    )
        .prop_map(|(t, id, actions)| detail(t, id, &actions))
}

fn any_request() -> impl Strategy<Value = ExchangeRequest> {
    (
        proptest::option::of(proptest::collection::vec(
            prop::sample::select(vec![READ, WRITE, DELETE, "admin"]),
            0..5,
        )),
        proptest::option::of(prop::sample::select(vec![
            AUD,
            AUD,
            "https://else.example.com",
        ])),
        proptest::option::of(0u64..800),
        proptest::option::of(proptest::collection::vec(any_detail(), 0..3)),
    )
        .prop_map(|(scopes, audience, expires_in, details)| ExchangeRequest {
            scopes: scopes.map(|s| strings(&s)),
            audience: audience.map(Into::into),
            authorization_details: details,
            expires_in,
        })
}

/// The subjects a workload may hold: the grant token with or without details, and one already
/// exchanged.
fn any_subject() -> impl Strategy<Value = AccessTokenClaims> {
    prop::sample::select(vec![0usize, 1, 2]).prop_map(|which| match which {
        0 => grant_token(),
        1 => {
            let mut t = grant_token();
            t.authorization_details = Some(vec![detail("ticket", None, &["read", "write"])]);
            t
        }
        _ => hopped_token(),
    })
}

proptest! {
    /// Whatever is asked, a token an exchange yields is within its subject: no more scopes, the
    /// same audience, no later expiry, details covered, an entry of the grant token's lineage, the same principal, issuer
    /// and grant, and exactly one more hop on record.
    #[test]
    fn every_exchanged_token_is_within_its_subject(
        subject in any_subject(),
        request in any_request(),
        sa in prop::sample::select(vec!["triage-sa", "summarizer-sa", "archiver-sa", "mailer-sa"]),
    ) {
        let case = Case::new(sa).with(|c| {
            c.subject = subject.clone();
            c.request = request;
        });
        if let Ok(token) = case.decide() {
            let held = subject_scopes(&subject);
            for scope in token.scope.split(' ') {
                prop_assert!(held.iter().any(|h| h == scope), "{scope} beyond {held:?}");
            }
            prop_assert_eq!(&token.aud, &subject.aud);
            prop_assert!(token.exp <= subject.exp && token.exp > token.iat);
            if let Some(ceiling) = subject.authorization_details.as_deref().filter(|d| !d.is_empty()) {
                let details = token.authorization_details.clone().unwrap_or_default();
                prop_assert!(crate::delegation::chain::uncovered_detail(&details, ceiling).is_none());
            }
            prop_assert!(in_lineage(&token), "{:?}", token.status);
            prop_assert_eq!(token.delegation_chain.len(), subject.delegation_chain.len() + 1);
            prop_assert_eq!(&token.delegation_chain[..subject.delegation_chain.len()], &subject.delegation_chain[..]);
            prop_assert_eq!((&token.sub, &token.iss, &token.grant), (&subject.sub, &subject.iss, &subject.grant));
            // The act is the subject's, or the subject's one deeper.
            let kept = token.act == subject.act
                || token.act.act.as_deref() == Some(&subject.act);
            prop_assert!(kept, "{:?} from {:?}", token.act, subject.act);
        }
    }
}

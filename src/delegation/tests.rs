//! Unit and property tests of chain resolution, driven through plain maps instead of a cluster.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use proptest::prelude::*;

use super::{
    ceilings::tests::open_policies,
    chain::{Lookup, Policy, Reason, Refusal, Resolution},
    claims::{GrantReference, build_claims},
    conditions::set_ready,
    record::{HeldToken, TokenRecord},
    timing::plan_token,
};
use crate::api::*;

const NS: &str = "support";

#[derive(Default, Clone)]
struct World {
    grants: HashMap<String, Arc<DelegationGrant>>,
    agents: HashMap<String, Arc<AgentIdentity>>,
    /// The operator's own record, by grant uid.
    records: HashMap<String, TokenRecord>,
    /// The cluster's AudiencePolicies; `None`: every audience declared for all the world asks.
    policies: Option<Vec<Arc<AudiencePolicy>>>,
    /// The grant being resolved, which need not be in `grants`.
    asked: Option<Arc<DelegationGrant>>,
}

impl Lookup for World {
    fn grant(&self, name: &str) -> Option<Arc<DelegationGrant>> {
        self.grants.get(name).cloned()
    }
    fn agent(&self, name: &str) -> Option<Arc<AgentIdentity>> {
        self.agents.get(name).cloned()
    }
    fn record(&self, grant: &DelegationGrant) -> Option<TokenRecord> {
        self.records.get(grant.metadata.uid.as_deref()?).cloned()
    }
    fn audience_policies(&self, audience: &str) -> Vec<Arc<AudiencePolicy>> {
        if let Some(policies) = &self.policies {
            return policies.clone();
        }
        let scopes = self
            .agents
            .values()
            .flat_map(|a| a.spec.allowed_scopes.clone())
            .chain(self.asked_and_grants().flat_map(|g| g.spec.scopes.clone()))
            .collect();
        let details = self
            .asked_and_grants()
            .flat_map(|g| g.spec.authorization_details.clone().unwrap_or_default())
            .collect();
        open_policies(audience, scopes, details)
    }
}

/// Chain resolution in a world that declares, unless it has policies of its own, every audience
/// for all the world and the grant ask: the rules of the chain are tested here, the ceilings in
/// `ceilings_tests.rs`.
fn resolve(
    grant: &DelegationGrant,
    namespace: &str,
    world: &World,
    policy: &Policy,
    now: Timestamp,
) -> Result<Resolution, Refusal> {
    let mut world = world.clone();
    world.asked = Some(Arc::new(grant.clone()));
    super::chain::resolve(grant, namespace, &world, policy, now)
}

impl World {
    fn asked_and_grants(&self) -> impl Iterator<Item = &Arc<DelegationGrant>> {
        self.asked.iter().chain(self.grants.values())
    }
    fn with_agent(mut self, agent: AgentIdentity) -> Self {
        self.agents
            .insert(agent.metadata.name.clone().unwrap(), Arc::new(agent));
        self
    }
    /// Adds a grant as the operator left it: one whose status holds a token (see [`issued`]) is
    /// recorded as holding it, for its generation and approver, as the operator records what it mints;
    /// any other as refused.
    fn with_grant(mut self, grant: DelegationGrant) -> Self {
        let uid = grant.metadata.uid.clone().unwrap();
        self.records.insert(uid, operators_record(&grant));
        self.grants
            .insert(grant.metadata.name.clone().unwrap(), Arc::new(grant));
        self
    }
    /// Adds a grant whose status someone else wrote over what the operator decided (`record`, `None`:
    /// the operator has not looked at the grant since it started).
    fn with_forged_status(mut self, grant: DelegationGrant, record: Option<TokenRecord>) -> Self {
        let uid = grant.metadata.uid.clone().unwrap();
        match record {
            Some(record) => self.records.insert(uid, record),
            None => self.records.remove(&uid),
        };
        self.grants
            .insert(grant.metadata.name.clone().unwrap(), Arc::new(grant));
        self
    }
    fn get(&self, name: &str) -> DelegationGrant {
        (*self.grants[name]).clone()
    }
}

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).unwrap()
}

fn now() -> Timestamp {
    ts(1_800_000_000)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        generation: Some(1),
        uid: Some(format!("uid-{name}")),
        ..Default::default()
    }
}

fn agent(name: &str, scopes: &[&str], delegation: Option<(i32, &[&str])>) -> AgentIdentity {
    AgentIdentity {
        metadata: meta(name),
        spec: AgentIdentitySpec {
            owner: Owner {
                kind: OwnerKind::Group,
                name: "platform".into(),
            },
            service_account_name: None,
            allowed_scopes: strings(scopes),
            allowed_audiences: strings(&["https://api"]),
            max_token_ttl: Duration::from("15m"),
            delegation: delegation.map(|(max_depth, actors)| DelegationPolicy {
                max_depth,
                allowed_actors: Some(strings(actors)),
            }),
            require_approval: None,
            suspended: None,
            token_delivery: None,
            require_proof_of_possession: None,
        },
        status: None,
    }
}

fn grant_spec(actor: &str, scopes: &[&str]) -> DelegationGrantSpec {
    DelegationGrantSpec {
        principal: None,
        parent_grant_ref: None,
        actor_ref: LocalRef::new(actor),
        authors: None,
        requester: Some(std::sync::Arc::new(UserIdentity {
            username: "alice@example.com".into(),
            ..Default::default()
        })),
        scopes: strings(scopes),
        audience: "https://api".into(),
        token_ttl: Duration::from("10m"),
        renew_before: None,
        valid_until: None,
        authorization_details: None,
        token_delivery: None,
        secret_name: None,
        suspended: None,
    }
}

fn root(name: &str, actor: &str, scopes: &[&str]) -> DelegationGrant {
    let mut spec = grant_spec(actor, scopes);
    spec.principal = Some(Principal {
        kind: PrincipalKind::User,
        name: "alice@example.com".into(),
    });
    DelegationGrant {
        metadata: meta(name),
        spec,
        status: None,
    }
}

fn hop(name: &str, parent: &str, actor: &str, scopes: &[&str]) -> DelegationGrant {
    let mut spec = grant_spec(actor, scopes);
    spec.parent_grant_ref = Some(LocalRef::new(parent));
    DelegationGrant {
        metadata: meta(name),
        spec,
        status: None,
    }
}

/// Marks a grant as Ready holding a token that expires at `exp`, as the operator would have.
fn issued(mut grant: DelegationGrant, exp: Timestamp) -> DelegationGrant {
    grant.status = Some(DelegationGrantStatus {
        conditions: Some(set_ready(
            None,
            true,
            "Issued",
            "",
            grant.metadata.generation,
            now(),
        )),
        observed_generation: grant.metadata.generation,
        token: Some(TokenStatus {
            id: "jti".into(),
            key_id: "kid".into(),
            issued_at: Time(now()),
            expires_at: Time(exp),
            renewal_time: Time(exp),
            claims_digest: None,
        }),
        ..Default::default()
    });
    grant
}

/// What the operator records when it writes the status `issued` describes (or no token).
fn operators_record(grant: &DelegationGrant) -> TokenRecord {
    let Some((status, token)) = grant
        .status
        .as_ref()
        .and_then(|s| Some((s, s.token.as_ref()?)))
    else {
        return TokenRecord::Refused;
    };
    TokenRecord::Holds(HeldToken {
        substance: 0,
        expires_at: token.expires_at.0.as_second(),
        approved_by: status
            .approval
            .as_ref()
            .and_then(|a| a.approver.as_deref())
            .map(Into::into),
        confirmed_for: status.observed_generation,
    })
}

/// user → orchestrator → summarizer → notifier, every hop allowed, every parent issued.
fn three_hops() -> World {
    World::default()
        .with_agent(agent(
            "orchestrator",
            &["t:read", "t:write", "c:read"],
            Some((2, &["summarizer"])),
        ))
        .with_agent(agent(
            "summarizer",
            &["t:read", "c:read"],
            Some((1, &["notifier"])),
        ))
        .with_agent(agent("notifier", &["t:read"], None))
        .with_grant(issued(
            root("g1", "orchestrator", &["t:read", "c:read"]),
            ts(1_800_000_600),
        ))
        .with_grant(issued(
            hop("g2", "g1", "summarizer", &["t:read", "c:read"]),
            ts(1_800_000_300),
        ))
        .with_grant(hop("g3", "g2", "notifier", &["t:read"]))
}

fn refusal(world: &World, name: &str) -> (Reason, String) {
    let err = resolve(&world.get(name), NS, world, &Policy::default(), now())
        .expect_err("should be refused");
    (err.reason, err.message)
}

#[test]
fn a_three_hop_chain_resolves_root_first() {
    let world = three_hops();
    let r = resolve(&world.get("g3"), NS, &world, &Policy::default(), now()).unwrap();
    let kinds: Vec<_> = r
        .chain
        .iter()
        .map(|l| (l.kind.as_str(), l.name.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("User", "alice@example.com"),
            ("AgentIdentity", "orchestrator"),
            ("AgentIdentity", "summarizer"),
            ("AgentIdentity", "notifier")
        ]
    );
    assert_eq!(r.chain[3].grant.as_deref(), Some("g3"));
    assert_eq!(
        r.actors,
        [
            "agent:support/orchestrator",
            "agent:support/summarizer",
            "agent:support/notifier"
        ]
    );
    assert_eq!(r.effective_scopes, ["t:read"]);
    assert_eq!(
        r.not_after,
        Some(ts(1_800_000_300)),
        "capped by the parent's token"
    );
}

#[test]
fn claims_carry_principal_actor_chain_and_scopes() {
    let world = three_hops();
    let r = resolve(&world.get("g2"), NS, &world, &Policy::default(), now()).unwrap();
    let times = plan_token(now(), r.token_ttl, r.renew_before, r.not_after, 0.0);
    let grant = GrantReference {
        namespace: NS.into(),
        name: "g2".into(),
        uid: "uid-g2".into(),
    };
    let claims = build_claims("https://issuer", &r, grant, None, &times, "id-1".into()).unwrap();
    let json = serde_json::to_value(&claims).unwrap();
    assert_eq!(json["sub"], "user:alice@example.com");
    assert_eq!(json["client_id"], "agent:support/summarizer");
    assert_eq!(
        json["act"],
        serde_json::json!({"sub": "agent:support/summarizer", "act": {"sub": "agent:support/orchestrator"}})
    );
    assert_eq!(json["scope"], "t:read c:read");
    assert_eq!(json["aud"], "https://api");
    assert_eq!(json["delegation.nhi.dev/grant"]["name"], "g2");
    assert!(json.get("authorization_details").is_none());
    assert_eq!(
        json["exp"].as_i64().unwrap(),
        1_800_000_600,
        "the 10m token is capped at the parent's expiry"
    );
}

#[test]
fn each_violation_has_its_own_reason() {
    let base = three_hops();
    let cases: Vec<(&str, World, &str, Reason)> = vec![
        (
            "scope beyond the actor",
            base.clone().with_grant(root("x", "notifier", &["t:write"])),
            "x",
            Reason::DeniedScopeNotAllowed,
        ),
        (
            "scope beyond the parent",
            base.clone()
                .with_grant(hop("x", "g1", "summarizer", &["t:read", "t:write"])),
            "x",
            Reason::DeniedScopeNotAllowed,
        ),
        (
            "scope beyond the parent, allowed to the actor",
            {
                let w = base.clone().with_agent(agent(
                    "summarizer",
                    &["t:read", "c:read", "t:write"],
                    Some((1, &["notifier"])),
                ));
                w.with_grant(hop("x", "g1", "summarizer", &["t:write"]))
            },
            "x",
            Reason::DeniedScopeExceedsParent,
        ),
        (
            "audience not allowed",
            {
                let mut g = root("x", "orchestrator", &["t:read"]);
                g.spec.audience = "https://elsewhere".into();
                base.clone().with_grant(g)
            },
            "x",
            Reason::DeniedAudienceNotAllowed,
        ),
        (
            "audience differs from the parent",
            {
                let mut a = agent("summarizer", &["t:read"], None);
                a.spec.allowed_audiences.push("https://other".into());
                let mut g = hop("x", "g1", "summarizer", &["t:read"]);
                g.spec.audience = "https://other".into();
                base.clone().with_agent(a).with_grant(g)
            },
            "x",
            Reason::DeniedAudienceMismatch,
        ),
        (
            "TTL above maxTokenTTL",
            {
                let mut g = root("x", "orchestrator", &["t:read"]);
                g.spec.token_ttl = Duration::from("16m");
                base.clone().with_grant(g)
            },
            "x",
            Reason::DeniedTTLTooLong,
        ),
        (
            "TTL below the operator minimum",
            {
                let mut g = root("x", "orchestrator", &["t:read"]);
                g.spec.token_ttl = Duration::from("30s");
                base.clone().with_grant(g)
            },
            "x",
            Reason::DeniedTTLTooShort,
        ),
        (
            "actor not in allowedActors",
            base.clone()
                .with_grant(hop("x", "g1", "notifier", &["t:read"])),
            "x",
            Reason::DeniedActorNotAllowed,
        ),
        (
            "depth exceeded",
            {
                let w = base.clone().with_agent(agent(
                    "notifier",
                    &["t:read"],
                    Some((1, &["summarizer"])),
                ));
                w.with_grant(issued(
                    hop("g3", "g2", "notifier", &["t:read"]),
                    ts(1_800_000_100),
                ))
                .with_grant(hop("x", "g3", "summarizer", &["t:read"]))
            },
            "x",
            Reason::DeniedDepth,
        ),
        (
            "cycle",
            base.clone()
                .with_grant(hop("c1", "c2", "summarizer", &["t:read"]))
                .with_grant(hop("c2", "c1", "summarizer", &["t:read"])),
            "c1",
            Reason::DeniedCycle,
        ),
        (
            "self cycle",
            base.clone()
                .with_grant(hop("c", "c", "summarizer", &["t:read"])),
            "c",
            Reason::DeniedCycle,
        ),
        (
            "dangling parent",
            base.clone()
                .with_grant(hop("x", "nope", "summarizer", &["t:read"])),
            "x",
            Reason::DeniedParentMissing,
        ),
        (
            "missing actor",
            base.clone().with_grant(root("x", "ghost", &["t:read"])),
            "x",
            Reason::AgentMissing,
        ),
        (
            "suspended actor",
            {
                let mut a = agent("notifier", &["t:read"], None);
                a.spec.suspended = Some(true);
                base.clone()
                    .with_agent(a)
                    .with_grant(root("x", "notifier", &["t:read"]))
            },
            "x",
            Reason::AgentSuspended,
        ),
        (
            "suspended ancestor agent",
            {
                let mut a = agent(
                    "orchestrator",
                    &["t:read", "t:write", "c:read"],
                    Some((2, &["summarizer"])),
                );
                a.spec.suspended = Some(true);
                base.clone().with_agent(a)
            },
            "g3",
            Reason::ParentNotReady,
        ),
        (
            "suspended grant",
            {
                let mut g = root("x", "orchestrator", &["t:read"]);
                g.spec.suspended = Some(true);
                base.clone().with_grant(g)
            },
            "x",
            Reason::Suspended,
        ),
        (
            "expired grant",
            {
                let mut g = root("x", "orchestrator", &["t:read"]);
                g.spec.valid_until = Some(Time(ts(1_799_999_999)));
                base.clone().with_grant(g)
            },
            "x",
            Reason::Expired,
        ),
        (
            "parent not issued yet",
            base.clone()
                .with_grant(hop("g2", "g1", "summarizer", &["t:read"])),
            "g3",
            Reason::ParentNotReady,
        ),
        (
            "parent token expired",
            base.clone().with_grant(issued(
                root("g1", "orchestrator", &["t:read", "c:read"]),
                ts(1_799_999_000),
            )),
            "g2",
            Reason::ParentNotReady,
        ),
    ];
    for (what, world, name, expected) in cases {
        let (reason, message) = refusal(&world, name);
        assert_eq!(reason, expected, "{what}: {message}");
        assert!(!message.is_empty(), "{what}: empty message");
    }
}

#[test]
fn a_denial_names_what_to_fix() {
    let world = three_hops().with_grant(root("x", "notifier", &["t:read", "t:write"]));
    let (_, message) = refusal(&world, "x");
    assert!(
        message.contains("t:write")
            && message.contains("notifier")
            && message.contains("allowedScopes"),
        "{message}"
    );
}

#[test]
fn a_parent_changed_but_not_yet_reconciled_makes_children_wait_not_lose_their_tokens() {
    let mut world = three_hops();
    let mut g1 = world.get("g1");
    g1.metadata.generation = Some(2); // spec changed, not yet reconciled
    world = world.with_grant(g1.clone());
    assert_eq!(refusal(&world, "g2").0, Reason::ParentUpdating);
    g1.metadata.deletion_timestamp = Some(Time(now()));
    world = world.with_grant(g1);
    assert_eq!(
        refusal(&world, "g2").0,
        Reason::ParentNotReady,
        "a parent being deleted is not waited for"
    );
}

fn detail(type_: &str, identifier: Option<&str>, actions: Option<&[&str]>) -> AuthorizationDetail {
    AuthorizationDetail {
        type_: type_.into(),
        identifier: identifier.map(Into::into),
        actions: actions.map(strings),
        locations: None,
        datatypes: None,
        privileges: None,
    }
}

#[test]
fn authorization_details_only_narrow_down_the_chain() {
    let mut g1 = issued(
        root("g1", "orchestrator", &["t:read", "c:read"]),
        ts(1_800_000_600),
    );
    g1.spec.authorization_details = Some(vec![detail(
        "ticket",
        Some("1234"),
        Some(&["read", "comment"]),
    )]);
    let base = three_hops().with_grant(g1);
    let with_details = |details: Option<Vec<AuthorizationDetail>>| {
        let mut g = hop("x", "g1", "summarizer", &["t:read"]);
        g.spec.authorization_details = details;
        base.clone().with_grant(g)
    };
    let verdict = |world: World| {
        resolve(&world.get("x"), NS, &world, &Policy::default(), now())
            .map(|_| ())
            .map_err(|r| r.reason)
    };

    assert_eq!(
        verdict(with_details(Some(vec![detail(
            "ticket",
            Some("1234"),
            Some(&["read"])
        )]))),
        Ok(())
    );
    let denied = Err(Reason::DeniedDetailsExceedParent);
    assert_eq!(
        verdict(with_details(None)),
        denied,
        "dropping the limits would widen the token"
    );
    assert_eq!(
        verdict(with_details(Some(vec![detail(
            "ticket",
            Some("999"),
            Some(&["read"])
        )]))),
        denied
    );
    assert_eq!(
        verdict(with_details(Some(vec![detail(
            "ticket",
            Some("1234"),
            Some(&["delete"])
        )]))),
        denied
    );
    assert_eq!(
        verdict(with_details(Some(vec![detail(
            "ticket",
            Some("1234"),
            None
        )]))),
        denied,
        "no actions = any action"
    );
    assert_eq!(
        verdict(with_details(Some(vec![detail(
            "case",
            Some("1234"),
            Some(&["read"])
        )]))),
        denied
    );
    // A parent detail without identifier covers any identifier of its type; lists it has bound.
    let mut wide = issued(
        root("g1", "orchestrator", &["t:read", "c:read"]),
        ts(1_800_000_600),
    );
    let mut any_ticket = detail("ticket", None, Some(&["read"]));
    any_ticket.locations = Some(strings(&["https://api/tickets"]));
    wide.spec.authorization_details = Some(vec![any_ticket]);
    let under_wide = |details: Vec<AuthorizationDetail>| {
        let mut g = hop("x", "g1", "summarizer", &["t:read"]);
        g.spec.authorization_details = Some(details);
        three_hops().with_grant(wide.clone()).with_grant(g)
    };
    let mut located = detail("ticket", Some("77"), Some(&["read"]));
    located.locations = Some(strings(&["https://api/tickets"]));
    assert_eq!(verdict(under_wide(vec![located.clone()])), Ok(()));
    located.locations = Some(strings(&["https://elsewhere"]));
    assert_eq!(
        verdict(under_wide(vec![located])),
        denied,
        "a location outside the parent's"
    );
    assert_eq!(
        verdict(under_wide(vec![detail(
            "ticket",
            Some("77"),
            Some(&["read"])
        )])),
        denied,
        "no locations = anywhere"
    );

    // A parent without details does not restrict its children's.
    let free = three_hops().with_grant({
        let mut g = hop("x", "g1", "summarizer", &["t:read"]);
        g.spec.authorization_details = Some(vec![detail("anything", None, None)]);
        g
    });
    assert_eq!(verdict(free), Ok(()));
}

#[test]
fn a_hop_may_not_add_a_list_its_parent_left_out() {
    // The parent limits ticket 1234 to reading, and says nothing about privileges.
    let mut g1 = issued(
        root("g1", "orchestrator", &["t:read", "c:read"]),
        ts(1_800_000_600),
    );
    g1.spec.authorization_details = Some(vec![detail("ticket", None, Some(&["read"]))]);
    let world = |child: AuthorizationDetail| {
        let mut g = hop("x", "g1", "summarizer", &["t:read"]);
        g.spec.authorization_details = Some(vec![child]);
        three_hops().with_grant(g1.clone()).with_grant(g)
    };
    let verdict = |world: World| {
        resolve(&world.get("x"), NS, &world, &Policy::default(), now())
            .map(|_| ())
            .map_err(|r| r.reason)
    };
    let mut admin = detail("ticket", None, Some(&["read"]));
    admin.privileges = Some(strings(&["admin"]));
    assert_eq!(
        verdict(world(admin)),
        Err(Reason::DeniedDetailsExceedParent),
        "privileges: [admin] below a parent with none"
    );
    let mut located = detail("ticket", None, Some(&["read"]));
    located.locations = Some(strings(&["https://api"]));
    assert_eq!(
        verdict(world(located)),
        Err(Reason::DeniedDetailsExceedParent)
    );
    assert_eq!(
        verdict(world(detail("ticket", Some("1234"), Some(&["read"])))),
        Ok(()),
        "naming one ticket narrows"
    );
}

#[test]
fn authorization_details_have_a_size_budget() {
    let mut g = root("big", "orchestrator", &["t:read"]);
    let long = "x".repeat(120);
    let actions: Vec<&str> = std::iter::repeat_n(long.as_str(), 16).collect();
    g.spec.authorization_details = Some(
        (0..8)
            .map(|i| detail("ticket", Some(&i.to_string()), Some(&actions)))
            .collect(),
    );
    let world = three_hops().with_grant(g);
    let refusal = resolve(&world.get("big"), NS, &world, &Policy::default(), now()).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedDetailsTooLarge);
    assert!(refusal.message.contains("4096"), "{}", refusal.message);
}

#[test]
fn a_hop_is_not_adopted_by_a_re_created_parent() {
    let world = three_hops();
    let mut g2 = world.get("g2");
    g2.status.get_or_insert_default().parent_grant_uid = Some("uid-g1".into());
    let world = world.with_grant(g2);
    assert!(resolve(&world.get("g2"), NS, &world, &Policy::default(), now()).is_ok());
    let mut g1 = world.get("g1");
    g1.metadata.uid = Some("uid-g1-recreated".into());
    let world = world.with_grant(g1);
    let refusal = resolve(&world.get("g2"), NS, &world, &Policy::default(), now()).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedParentReplaced);
    assert!(
        refusal.message.contains("re-created"),
        "{}",
        refusal.message
    );
}

#[test]
fn each_link_of_the_chain_names_who_requested_it() {
    let world = three_hops();
    let r = resolve(&world.get("g3"), NS, &world, &Policy::default(), now()).unwrap();
    assert_eq!(r.chain[0].requested_by, None, "the principal link");
    for link in &r.chain[1..] {
        assert_eq!(link.requested_by.as_deref(), Some("alice@example.com"));
    }
}

/// Someone allowed to write `delegationgrants/status` marks a parent awaiting approval Ready,
/// approved by the CFO, with a token valid for a year: the hop below rests on the operator's own
/// record of the parent, so it gets nothing, and says the parent holds no valid token.
#[test]
fn a_forged_parent_status_mints_nothing_below_it() {
    let world = three_hops();
    let mut forged = issued(world.get("g2"), ts(now().as_second() + 365 * 86_400));
    forged.status.as_mut().unwrap().approval = Some(ApprovalStatus {
        state: ApprovalState::Approved,
        generation: 1,
        approval: Some("forged".into()),
        approver: Some("cfo@example.com".into()),
    });
    for (record, expected) in [
        (Some(TokenRecord::Refused), Reason::ParentNotReady),
        // Not looked at since the operator started: the child waits, and keeps nothing it lacks.
        (None, Reason::ParentUpdating),
    ] {
        let w = world.clone().with_forged_status(forged.clone(), record);
        let (reason, message) = refusal(&w, "g3");
        assert_eq!(reason, expected, "{message}");
        assert!(message.contains("\"g2\""), "{message}");
    }
}

/// What an ancestor's link says, and how long a child may live, is what the operator minted for the
/// parent: its recorded approver and expiry, whatever the parent's status claims.
#[test]
fn an_ancestors_approver_and_expiry_come_from_the_operators_record() {
    let world = three_hops();
    let mut g2 = world.get("g2");
    g2.status.as_mut().unwrap().approval = Some(ApprovalStatus {
        state: ApprovalState::Approved,
        generation: 1,
        approval: Some("forged".into()),
        approver: Some("cfo@example.com".into()),
    });
    g2.status
        .as_mut()
        .unwrap()
        .token
        .as_mut()
        .unwrap()
        .expires_at = Time(ts(now().as_second() + 365 * 86_400));
    let minted = TokenRecord::Holds(HeldToken {
        substance: 7,
        expires_at: now().as_second() + 120,
        approved_by: Some("carol@example.com".into()),
        confirmed_for: Some(1),
    });
    let world = world.with_forged_status(g2, Some(minted));
    let r = resolve(&world.get("g3"), NS, &world, &Policy::default(), now()).unwrap();
    let g2_link = r.chain.iter().find(|l| l.grant.as_deref() == Some("g2"));
    assert_eq!(
        g2_link.unwrap().approved_by.as_deref(),
        Some("carol@example.com")
    );
    assert_eq!(r.not_after, Some(ts(now().as_second() + 120)));
    assert_eq!(
        r.chain.last().unwrap().approved_by,
        None,
        "the last hop's approver is the decision's evidence, never a status"
    );

    // A record confirmed for an older generation: the parent changed, wait for its reconcile.
    let mut edited = world.get("g2");
    edited.metadata.generation = Some(2);
    let record = world.records.get("uid-g2").cloned();
    let world = world.with_forged_status(edited, record);
    assert_eq!(refusal(&world, "g3").0, Reason::ParentUpdating);
}

#[test]
fn limits_are_whole_seconds() {
    let mut world = three_hops();
    let mut g2 = world.get("g2");
    g2.spec.valid_until = Some(Time(Timestamp::new(1_800_000_100, 500_000_000).unwrap()));
    world = world.with_grant(g2);
    let r = resolve(&world.get("g2"), NS, &world, &Policy::default(), now()).unwrap();
    assert_eq!(r.not_after, Some(ts(1_800_000_100)));
}

#[test]
fn not_after_is_the_earliest_valid_until_in_the_lineage() {
    let mut world = three_hops();
    let mut g1 = world.get("g1");
    g1.spec.valid_until = Some(Time(ts(1_800_000_200)));
    world = world.with_grant(g1);
    let r = resolve(&world.get("g2"), NS, &world, &Policy::default(), now()).unwrap();
    assert_eq!(r.not_after, Some(ts(1_800_000_200)));
}

// ---- properties ---------------------------------------------------------------------------------

const UNIVERSE: [&str; 5] = ["a", "b", "c", "d", "e"];

fn subset(mask: u8) -> Vec<&'static str> {
    UNIVERSE
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, s)| *s)
        .collect()
}

#[derive(Debug, Clone)]
struct HopSpec {
    grant_scopes: u8,
    agent_scopes: u8,
    max_depth: i32,
    agent_ttl_secs: u64,
    grant_ttl_secs: u64,
    valid_until: Option<i64>,
    parent_exp: i64,
    allows_next: bool,
}

fn hop_spec() -> impl Strategy<Value = HopSpec> {
    // Biased towards valid chains (wide agents, narrow grants, deep policies) so that the properties
    // are exercised on many accepted chains, while still generating every kind of violation.
    (
        prop_oneof![Just(1u8), Just(3u8), 1u8..32],
        prop_oneof![Just(31u8), 1u8..32],
        prop_oneof![Just(5i32), 0i32..5],
        60u64..2000,
        60u64..2000,
        proptest::option::of(-100i64..3000),
        1i64..3000,
        proptest::bool::weighted(0.9),
    )
        .prop_map(
            |(
                grant_scopes,
                agent_scopes,
                max_depth,
                agent_ttl_secs,
                grant_ttl_secs,
                valid_until,
                parent_exp,
                allows_next,
            )| HopSpec {
                grant_scopes,
                agent_scopes,
                max_depth,
                agent_ttl_secs,
                grant_ttl_secs: grant_ttl_secs.min(agent_ttl_secs + 100),
                valid_until,
                parent_exp,
                allows_next,
            },
        )
}

/// A linear chain g0 → g1 → … with one agent per hop, every parent issued; returns the world.
fn chain_world(hops: &[HopSpec]) -> World {
    let mut world = World::default();
    for (i, h) in hops.iter().enumerate() {
        let next_actor = format!("agent{}", i + 1);
        let allowed: Vec<&str> = if h.allows_next {
            vec![next_actor.as_str()]
        } else {
            vec![]
        };
        let mut a = agent(
            &format!("agent{i}"),
            &subset(h.agent_scopes),
            Some((h.max_depth, &allowed)),
        );
        a.spec.max_token_ttl = Duration::new(format!("{}s", h.agent_ttl_secs));
        world = world.with_agent(a);
        let scopes = subset(h.grant_scopes);
        let mut g = if i == 0 {
            root("g0", "agent0", &scopes)
        } else {
            hop(
                &format!("g{i}"),
                &format!("g{}", i - 1),
                &format!("agent{i}"),
                &scopes,
            )
        };
        g.spec.token_ttl = Duration::new(format!("{}s", h.grant_ttl_secs));
        g.spec.valid_until = h.valid_until.map(|v| Time(ts(now().as_second() + v)));
        let g = if i + 1 < hops.len() {
            issued(g, ts(now().as_second() + h.parent_exp))
        } else {
            g
        };
        world = world.with_grant(g);
    }
    world
}

/// The properties below only say something if the generator produces valid chains often enough.
#[test]
fn the_chain_generator_yields_valid_chains() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = proptest::collection::vec(hop_spec(), 1..6);
    let valid = (0..500)
        .filter(|_| {
            let hops = strategy.new_tree(&mut runner).unwrap().current();
            let world = chain_world(&hops);
            resolve(
                &world.get(&format!("g{}", hops.len() - 1)),
                NS,
                &world,
                &Policy::default(),
                now(),
            )
            .is_ok()
        })
        .count();
    assert!(
        valid >= 25,
        "only {valid} of 500 generated chains were valid"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn effective_scopes_never_exceed_any_ancestor_or_the_actor(hops in proptest::collection::vec(hop_spec(), 1..6)) {
        let world = chain_world(&hops);
        let last = format!("g{}", hops.len() - 1);
        if let Ok(r) = resolve(&world.get(&last), NS, &world, &Policy::default(), now()) {
            for h in &hops {
                let held = subset(h.grant_scopes);
                let allowed = subset(h.agent_scopes);
                for s in &r.effective_scopes {
                    prop_assert!(held.contains(&s.as_str()), "{s} exceeds an ancestor grant");
                    prop_assert!(allowed.contains(&s.as_str()), "{s} exceeds an agent's allowedScopes");
                }
            }
        }
    }

    #[test]
    fn no_token_outlives_valid_until_its_parent_or_max_token_ttl(
        hops in proptest::collection::vec(hop_spec(), 1..6),
        jitter in 0.0f64..1.0,
    ) {
        let world = chain_world(&hops);
        let n = hops.len();
        if let Ok(r) = resolve(&world.get(&format!("g{}", n - 1)), NS, &world, &Policy::default(), now()) {
            let t = plan_token(now(), r.token_ttl, r.renew_before, r.not_after, jitter);
            let last = &hops[n - 1];
            prop_assert!(t.expires_at.as_second() <= now().as_second() + last.agent_ttl_secs as i64);
            for h in &hops {
                if let Some(v) = h.valid_until { prop_assert!(t.expires_at.as_second() <= now().as_second() + v); }
            }
            if n > 1 { prop_assert!(t.expires_at.as_second() <= now().as_second() + hops[n - 2].parent_exp); }
            prop_assert!(t.renewal_at < t.expires_at || t.expires_at.duration_since(t.issued_at).as_secs() <= 1);
        }
    }

    #[test]
    fn depth_limits_hold(hops in proptest::collection::vec(hop_spec(), 1..7)) {
        let world = chain_world(&hops);
        let n = hops.len();
        if resolve(&world.get(&format!("g{}", n - 1)), NS, &world, &Policy::default(), now()).is_ok() {
            for (j, h) in hops.iter().enumerate() {
                prop_assert!((n - 1 - j) as i32 <= h.max_depth, "agent{j} allows {} but has {} below", h.max_depth, n - 1 - j);
            }
        }
    }

    /// Arbitrary parent pointers (cycles, self-loops, dangling) always resolve to an answer, and a grant
    /// whose ancestry loops is never issued.
    #[test]
    fn cycle_detection_always_terminates(parents in proptest::collection::vec(proptest::option::of(0usize..12), 1..10)) {
        let mut world = World::default().with_agent(agent("a", &["a"], Some((8, &["a"]))));
        for (i, p) in parents.iter().enumerate() {
            let g = match p {
                None => root(&format!("g{i}"), "a", &["a"]),
                Some(p) => hop(&format!("g{i}"), &format!("g{p}"), "a", &["a"]),
            };
            world = world.with_grant(issued(g, ts(now().as_second() + 600)));
        }
        for i in 0..parents.len() {
            let result = resolve(&world.get(&format!("g{i}")), NS, &world, &Policy::default(), now());
            // Walk the pointers ourselves (bounded) to see whether g{i} reaches a cycle.
            let mut seen = vec![i];
            let mut cur = i;
            let mut loops = false;
            while let Some(Some(p)) = parents.get(cur) {
                if seen.contains(p) { loops = true; break; }
                if *p >= parents.len() { break; }
                seen.push(*p);
                cur = *p;
            }
            if loops { prop_assert!(result.is_err()); }
        }
    }
}

#[test]
fn the_cluster_ceiling_applies_to_every_hop_and_bounds_the_token() {
    use super::ceilings::tests::policy;
    let w = three_hops();
    let mut ceiling = policy("api", "https://api", &[NS], &["t:read"]);
    ceiling.spec.max_grant_lifetime = Some(Duration::from("1h"));
    let created = ts(now().as_second() - 600);
    let with_ceiling = |w: &World, p: Option<AudiencePolicy>| {
        let mut w = w.clone();
        w.policies = Some(p.into_iter().map(Arc::new).collect());
        for g in w.grants.values_mut() {
            Arc::make_mut(g).metadata.creation_timestamp = Some(Time(created));
        }
        w
    };
    // The root asks c:read, which the policy does not allow: the root is refused, its hops wait.
    let strict = with_ceiling(&w, Some(ceiling.clone()));
    let root = strict.get("g1");
    let refusal = resolve(&root, NS, &strict, &Policy::default(), now()).unwrap_err();
    assert_eq!(
        refusal.reason,
        Reason::DeniedBeyondPolicy,
        "{}",
        refusal.message
    );
    let refusal = resolve(&strict.get("g2"), NS, &strict, &Policy::default(), now()).unwrap_err();
    assert_eq!(refusal.reason, Reason::ParentNotReady);
    assert!(
        refusal.message.contains("DeniedBeyondPolicy"),
        "{}",
        refusal.message
    );

    // Allowed: the grant's token never outlives creation + maxGrantLifetime.
    ceiling.spec.allowed_scopes.push("c:read".into());
    let allowed = with_ceiling(&w, Some(ceiling.clone()));
    let resolution = resolve(&allowed.get("g1"), NS, &allowed, &Policy::default(), now()).unwrap();
    assert_eq!(resolution.not_after, Some(ts(created.as_second() + 3600)));

    // Undeclared: nothing at all.
    let none = with_ceiling(&w, None);
    let refusal = resolve(&none.get("g1"), NS, &none, &Policy::default(), now()).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedAudienceUndeclared);
}

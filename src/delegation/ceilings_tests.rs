//! The cluster-level ceilings, driven through plain policies: each rule with a table of inputs, and
//! properties that hold for any policies and any grant.

use std::sync::Arc;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use proptest::prelude::*;

use super::*;
use crate::api::*;

const AUD: &str = "https://payments.example.com";
const NS: &str = "payments-team";

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).unwrap()
}

fn now() -> Timestamp {
    ts(1_800_000_000)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A policy for `audience` listing `namespaces`, allowing `scopes` and tokens of up to 15 minutes.
pub(crate) fn policy(
    name: &str,
    audience: &str,
    namespaces: &[&str],
    scopes: &[&str],
) -> AudiencePolicy {
    AudiencePolicy {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(1),
            ..Default::default()
        },
        spec: AudiencePolicySpec {
            audience: audience.into(),
            namespaces: strings(namespaces),
            allowed_scopes: strings(scopes),
            allowed_authorization_details: None,
            max_token_ttl: Duration::from("15m"),
            max_grant_lifetime: None,
            require_approval: None,
            max_grants_per_namespace: None,
        },
    }
}

/// The policies a test world without ceilings of its own declares: everything `scopes` and
/// `details` name, for any namespace, tokens up to the operator's own ceiling; one policy for grants
/// without details and one for grants with them.
pub(crate) fn open_policies(
    audience: &str,
    scopes: Vec<String>,
    details: Vec<AuthorizationDetail>,
) -> Vec<Arc<AudiencePolicy>> {
    let scopes: Vec<String> = if scopes.is_empty() {
        vec!["unused".into()]
    } else {
        scopes
    };
    let scope_refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
    let mut open = policy("open", audience, &["*"], &scope_refs);
    open.spec.max_token_ttl = Duration::from("999999h");
    let mut with_details = open.clone();
    with_details.metadata.name = Some("open-details".into());
    with_details.spec.allowed_authorization_details = Some(details.clone());
    let mut all = vec![Arc::new(open)];
    if !details.is_empty() {
        all.push(Arc::new(with_details));
    }
    all
}

fn grant(scopes: &[&str], ttl: &str) -> DelegationGrant {
    DelegationGrant {
        metadata: ObjectMeta {
            name: Some("self-grant".into()),
            namespace: Some(NS.into()),
            creation_timestamp: Some(Time(ts(1_799_990_000))),
            ..Default::default()
        },
        spec: DelegationGrantSpec {
            principal: Some(Principal {
                kind: PrincipalKind::User,
                name: "mallory@example.com".into(),
            }),
            parent_grant_ref: None,
            actor_ref: LocalRef::new("payments-bot"),
            requester: None,
            authors: None,
            scopes: strings(scopes),
            audience: AUD.into(),
            token_ttl: Duration::from(ttl),
            renew_before: None,
            valid_until: None,
            authorization_details: None,
            token_delivery: None,
            secret_name: None,
            suspended: None,
        },
        status: None,
    }
}

fn detail(
    type_: &str,
    actions: Option<&[&str]>,
    privileges: Option<&[&str]>,
) -> AuthorizationDetail {
    AuthorizationDetail {
        type_: type_.into(),
        identifier: None,
        actions: actions.map(strings),
        locations: None,
        datatypes: None,
        privileges: privileges.map(strings),
    }
}

fn check(grant: &DelegationGrant, policies: Vec<AudiencePolicy>) -> Result<Ceiling, Refusal> {
    let policies: Vec<Arc<AudiencePolicy>> = policies.into_iter().map(Arc::new).collect();
    ceiling(grant, NS, &policies, now())
}

#[test]
fn an_audience_no_policy_declares_gets_no_token() {
    let refusal = check(&grant(&["payments:read"], "5m"), vec![]).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedAudienceUndeclared);
    assert!(refusal.message.contains(AUD), "{}", refusal.message);
    // A policy of another audience declares nothing for this one.
    let other = policy(
        "tickets",
        "https://tickets.example.com",
        &["*"],
        &["payments:read"],
    );
    let refusal = check(&grant(&["payments:read"], "5m"), vec![other]).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedAudienceUndeclared);
}

#[test]
fn a_policy_for_other_namespaces_names_itself_and_the_namespace() {
    let elsewhere = policy("payments", AUD, &["billing"], &["payments:read"]);
    let refusal = check(&grant(&["payments:read"], "5m"), vec![elsewhere]).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedAudienceUndeclared);
    assert!(
        refusal.message.contains("\"payments\""),
        "{}",
        refusal.message
    );
    assert!(refusal.message.contains(NS), "{}", refusal.message);

    // Many such policies: a few are named, the rest counted, so the message stays short.
    let many: Vec<_> = (0..8)
        .map(|i| policy(&format!("p{i}"), AUD, &["billing"], &["payments:read"]))
        .collect();
    let refusal = check(&grant(&["payments:read"], "5m"), many).unwrap_err();
    assert!(
        refusal.message.contains("\"p4\"] and 3 more"),
        "{}",
        refusal.message
    );
    assert!(!refusal.message.contains("\"p5\""), "{}", refusal.message);
}

#[test]
fn a_grant_within_a_policy_is_allowed_by_it() {
    let p = policy(
        "payments",
        AUD,
        &[NS],
        &["payments:read", "payments:execute"],
    );
    let ceiling = check(&grant(&["payments:read"], "15m"), vec![p]).unwrap();
    assert_eq!(
        ceiling,
        Ceiling {
            policy: "payments".into(),
            approval_required: false,
            ends_at: None,
            max_token_ttl: Some(std::time::Duration::from_secs(15 * 60)),
        }
    );
    let star = policy("everyone", AUD, &["*"], &["payments:read"]);
    assert!(check(&grant(&["payments:read"], "1m"), vec![star]).is_ok());
}

#[test]
fn a_question_without_a_lifetime_is_told_the_policys_max_token_ttl() {
    let g = grant(&["payments:read"], "1h");
    let question = CeilingQuestion {
        ttl: None,
        ..CeilingQuestion::of_grant(&g, NS)
    };
    let policies = vec![Arc::new(policy("payments", AUD, &[NS], &["payments:read"]))];
    // The grant's own hour is beyond the policy's fifteen minutes; a question of no lifetime is not.
    assert_eq!(
        ceiling(&g, NS, &policies, now()).unwrap_err().reason,
        Reason::DeniedBeyondPolicy
    );
    let allowed = ceiling_for(&question, &policies, now()).unwrap();
    assert_eq!(
        allowed.max_token_ttl,
        Some(std::time::Duration::from_secs(15 * 60))
    );
    // An unreadable maxTokenTTL still fails closed.
    let mut broken = policy("payments", AUD, &[NS], &["payments:read"]);
    broken.spec.max_token_ttl = Duration::from("soon");
    let refusal = ceiling_for(&question, &[Arc::new(broken)], now()).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedBeyondPolicy);
    assert!(
        refusal.message.contains("its maxTokenTTL cannot be read"),
        "{}",
        refusal.message
    );
}

#[test]
fn each_thing_beyond_the_policy_is_refused_and_named() {
    let p = || {
        let mut p = policy("payments", AUD, &[NS], &["payments:read"]);
        p.spec.allowed_authorization_details =
            Some(vec![detail("payment", Some(&["read"]), Some(&["viewer"]))]);
        p
    };
    let within = || {
        let mut g = grant(&["payments:read"], "10m");
        g.spec.authorization_details =
            Some(vec![detail("payment", Some(&["read"]), Some(&["viewer"]))]);
        g
    };
    assert!(check(&within(), vec![p()]).is_ok());

    let mut admin = within();
    admin.spec.authorization_details =
        Some(vec![detail("payment", Some(&["read"]), Some(&["admin"]))]);
    let mut scope = within();
    scope.spec.scopes = strings(&["payments:read", "payments:admin"]);
    let mut ttl = within();
    ttl.spec.token_ttl = Duration::from("24h");
    let mut no_details = within();
    no_details.spec.authorization_details = None;
    let mut extra_list = within();
    extra_list.spec.authorization_details = Some(vec![AuthorizationDetail {
        locations: Some(strings(&["https://x"])),
        ..detail("payment", Some(&["read"]), Some(&["viewer"]))
    }]);
    for (what, g, phrase) in [
        ("privileges beyond", admin, "privileges [\"admin\"]"),
        ("a scope beyond", scope, "[\"payments:admin\"]"),
        (
            "a longer tokenTTL",
            ttl,
            "tokenTTL 24h exceeds its maxTokenTTL 15m",
        ),
        ("no details", no_details, "lists no authorizationDetails"),
        ("a list the policy left out", extra_list, "locations"),
    ] {
        let refusal = check(&g, vec![p()]).unwrap_err();
        assert_eq!(refusal.reason, Reason::DeniedBeyondPolicy, "{what}");
        assert!(
            refusal.message.contains("\"payments\""),
            "{what}: {}",
            refusal.message
        );
        assert!(
            refusal.message.contains(phrase),
            "{what}: {}",
            refusal.message
        );
    }
}

#[test]
fn a_policy_without_details_allows_no_grant_with_details() {
    let p = policy("payments", AUD, &[NS], &["payments:read"]);
    let mut g = grant(&["payments:read"], "5m");
    g.spec.authorization_details = Some(vec![detail("payment", None, None)]);
    let refusal = check(&g, vec![p]).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedBeyondPolicy);
    assert!(
        refusal.message.contains("allows none"),
        "{}",
        refusal.message
    );
}

#[test]
fn one_policy_must_allow_all_of_the_grant() {
    // One allows the scope, the other the details: neither allows both.
    let scopes_only = policy("a-scopes", AUD, &[NS], &["payments:execute"]);
    let mut details_only = policy("b-details", AUD, &[NS], &["payments:read"]);
    details_only.spec.allowed_authorization_details = Some(vec![detail("payment", None, None)]);
    let mut g = grant(&["payments:execute"], "5m");
    g.spec.authorization_details = Some(vec![detail("payment", None, None)]);
    let refusal = check(&g, vec![scopes_only, details_only]).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedBeyondPolicy);
    assert!(refusal.message.contains("\"a-scopes\"") && refusal.message.contains("\"b-details\""));
}

#[test]
fn the_policy_asking_least_applies() {
    let mut strict = policy("a-strict", AUD, &[NS], &["payments:read"]);
    strict.spec.require_approval = Some(ApprovalRequirement { scopes: None });
    let loose = policy("b-loose", AUD, &[NS], &["payments:read"]);
    let c = check(
        &grant(&["payments:read"], "5m"),
        vec![strict.clone(), loose],
    )
    .unwrap();
    assert_eq!((c.policy.as_str(), c.approval_required), ("b-loose", false));
    let c = check(&grant(&["payments:read"], "5m"), vec![strict]).unwrap();
    assert_eq!((c.policy.as_str(), c.approval_required), ("a-strict", true));
}

#[test]
fn approval_by_scope_applies_only_to_grants_asking_those_scopes() {
    let mut p = policy(
        "payments",
        AUD,
        &[NS],
        &["payments:read", "payments:execute"],
    );
    p.spec.require_approval = Some(ApprovalRequirement {
        scopes: Some(strings(&["payments:execute"])),
    });
    assert!(
        !check(&grant(&["payments:read"], "5m"), vec![p.clone()])
            .unwrap()
            .approval_required
    );
    assert!(
        check(&grant(&["payments:execute"], "5m"), vec![p])
            .unwrap()
            .approval_required
    );
}

#[test]
fn a_grant_lives_at_most_max_grant_lifetime_from_its_creation() {
    let mut p = policy("payments", AUD, &[NS], &["payments:read"]);
    p.spec.max_grant_lifetime = Some(Duration::from("24h"));
    let g = grant(&["payments:read"], "5m");
    let created = ts(1_799_990_000);
    let c = check(&g, vec![p.clone()]).unwrap();
    assert_eq!(c.ends_at, Some(ts(created.as_second() + 86_400)));

    // At its end: refused with the lifetime's own reason.
    let end = ts(created.as_second() + 86_400);
    let policies = vec![Arc::new(p)];
    let refusal = ceiling(&g, NS, &policies, end).unwrap_err();
    assert_eq!(refusal.reason, Reason::DeniedGrantLifetimeEnded);
    assert!(
        refusal.message.contains(&end.to_string()),
        "{}",
        refusal.message
    );
}

#[test]
fn a_grant_without_creation_time_has_no_lifetime_to_count() {
    let mut p = policy("payments", AUD, &[NS], &["payments:read"]);
    p.spec.max_grant_lifetime = Some(Duration::from("1h"));
    let mut g = grant(&["payments:read"], "5m");
    g.metadata.creation_timestamp = None;
    assert_eq!(
        check(&g, vec![p]).unwrap_err().reason,
        Reason::DeniedBeyondPolicy
    );
}

// ---- properties ---------------------------------------------------------------------------------

const SCOPES: [&str; 4] = ["p:read", "p:write", "p:admin", "p:execute"];
const NAMESPACES: [&str; 3] = [NS, "other", "*"];

/// The agent a namespace admin writes: an undeclared audience, an admin scope, 24 hours.
#[test]
fn an_agent_beyond_every_policy_says_what_its_grants_cannot_have() {
    let agent: AgentIdentity = serde_json::from_value(serde_json::json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "greedy", "namespace": NS},
        "spec": {"owner": {"kind": "Group", "name": "p"},
                 "allowedScopes": ["payments:read", "payments:admin"],
                 "allowedAudiences": [AUD, "https://undeclared.example.com"],
                 "maxTokenTTL": "24h"},
    }))
    .unwrap();
    let policies = vec![Arc::new(policy("payments", AUD, &[NS], &["payments:read"]))];
    let beyond = agent_beyond(&agent, NS, &policies);
    assert_eq!(beyond.len(), 3, "{beyond:?}");
    assert!(beyond[0].contains("payments:admin"), "{beyond:?}");
    assert!(beyond[1].contains("maxTokenTTL 24h"), "{beyond:?}");
    assert!(beyond[2].contains("undeclared.example.com"), "{beyond:?}");
    let modest: AgentIdentity = serde_json::from_value(serde_json::json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "modest", "namespace": NS},
        "spec": {"owner": {"kind": "Group", "name": "p"}, "allowedScopes": ["payments:read"],
                 "allowedAudiences": [AUD], "maxTokenTTL": "10m"},
    }))
    .unwrap();
    assert!(agent_beyond(&modest, NS, &policies).is_empty());
    assert_eq!(
        agent_beyond(&modest, "elsewhere", &policies).len(),
        1,
        "another namespace is not declared"
    );
}

fn subset(of: &'static [&'static str]) -> impl Strategy<Value = Vec<&'static str>> {
    proptest::sample::subsequence(of.to_vec(), 0..=of.len())
}

prop_compose! {
    fn any_policy(index: usize)(
        namespaces in subset(&NAMESPACES).prop_filter("at least one", |n| !n.is_empty()),
        scopes in subset(&SCOPES).prop_filter("at least one", |s| !s.is_empty()),
        ttl_minutes in 1u64..30,
        details in proptest::option::of(subset(&["read", "write"])),
        lifetime_hours in proptest::option::of(1u64..6),
        approval in any::<bool>(),
    ) -> AudiencePolicy {
        let mut p = policy(&format!("p{index}"), AUD, &namespaces, &scopes);
        p.spec.max_token_ttl = Duration::from(format!("{ttl_minutes}m").as_str());
        p.spec.allowed_authorization_details =
            details.map(|actions| vec![detail("payment", Some(&actions), None)]);
        p.spec.max_grant_lifetime = lifetime_hours.map(|h| Duration::from(format!("{h}h").as_str()));
        p.spec.require_approval = approval.then_some(ApprovalRequirement { scopes: None });
        p
    }
}

prop_compose! {
    fn any_grant()(
        scopes in subset(&SCOPES).prop_filter("at least one", |s| !s.is_empty()),
        ttl_minutes in 1u64..30,
        details in proptest::option::of(subset(&["read", "write", "delete"])),
        age_hours in 0i64..8,
    ) -> DelegationGrant {
        let mut g = grant(&scopes, &format!("{ttl_minutes}m"));
        g.spec.authorization_details =
            details.map(|actions| vec![detail("payment", Some(&actions), None)]);
        g.metadata.creation_timestamp = Some(Time(ts(now().as_second() - age_hours * 3600)));
        g
    }
}

fn any_policies() -> impl Strategy<Value = Vec<AudiencePolicy>> {
    (0usize..4).prop_flat_map(|n| (0..n).map(any_policy).collect::<Vec<_>>())
}

/// What a policy allows, said once more in the plainest terms, independently of the code under test.
fn plainly_allows(p: &AudiencePolicy, g: &DelegationGrant) -> bool {
    let s = &p.spec;
    let in_namespace = s.namespaces.iter().any(|n| n == "*" || n == NS);
    let scopes = g.spec.scopes.iter().all(|x| s.allowed_scopes.contains(x));
    let ttl = g.spec.token_ttl.parse().unwrap() <= s.max_token_ttl.parse().unwrap();
    let details = match (
        &s.allowed_authorization_details,
        &g.spec.authorization_details,
    ) {
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(allowed), Some(wanted)) => wanted.iter().all(|w| {
            allowed.iter().any(|a| {
                w.actions
                    .as_ref()
                    .unwrap()
                    .iter()
                    .all(|x| a.actions.as_ref().unwrap().contains(x))
            })
        }),
    };
    let alive = s.max_grant_lifetime.as_ref().is_none_or(|l| {
        let created = g
            .metadata
            .creation_timestamp
            .as_ref()
            .unwrap()
            .0
            .as_second();
        created + l.parse().unwrap().as_secs() as i64 > now().as_second()
    });
    in_namespace && scopes && ttl && details && alive
}

proptest! {
    /// A grant gets a ceiling exactly when one policy listing its namespace allows all of it; the
    /// ceiling is that of an allowing policy; and nothing is ever allowed without a policy.
    #[test]
    fn allowed_exactly_when_one_policy_allows_all(policies in any_policies(), g in any_grant()) {
        let allowing: Vec<&AudiencePolicy> =
            policies.iter().filter(|p| plainly_allows(p, &g)).collect();
        match check(&g, policies.clone()) {
            Ok(c) => {
                let p = allowing.iter().find(|p| p.metadata.name.as_deref() == Some(&c.policy));
                prop_assert!(p.is_some(), "allowed by {} which does not allow it", c.policy);
                // No allowing policy asks less than the one chosen.
                if c.approval_required {
                    prop_assert!(allowing.iter().all(|p| p.spec.require_approval.is_some()));
                }
            }
            Err(refusal) => {
                prop_assert!(allowing.is_empty(), "refused ({refusal:?}) though {:?} allow it",
                    allowing.iter().map(|p| &p.metadata.name).collect::<Vec<_>>());
                let listed = policies.iter().any(|p| p.spec.covers_namespace(NS));
                prop_assert_eq!(refusal.reason == Reason::DeniedAudienceUndeclared, !listed);
            }
        }
    }

    /// Removing a policy never allows more, and no token outlives the chosen policy's lifetime.
    #[test]
    fn fewer_policies_never_allow_more(policies in any_policies(), g in any_grant()) {
        let before = check(&g, policies.clone());
        let mut fewer = policies.clone();
        fewer.pop();
        if check(&g, fewer).is_ok() {
            prop_assert!(before.is_ok());
        }
        if let Ok(Ceiling { ends_at: Some(end), .. }) = before {
            prop_assert!(end > now());
        }
    }
}

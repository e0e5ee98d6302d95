//! Cluster-level ceilings per API (AudiencePolicy), against the real apiserver and the real operator,
//! written as the attacker would try: a namespace admin writes an AgentIdentity that allows anything
//! for the payments API, and an editor of the namespace self-grants with it. The cluster's
//! AudiencePolicy for the API is what stops them; an audience nobody declared gets nothing.

mod support;

use std::time::Duration;

use delegation_operator::api::DelegationGrant;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::*;

const GROUP: &str = "delegation.nhi.dev";
const PAYMENTS: &str = "https://payments.example.com";
const MALLORY: &str = "mallory@example.com";

/// What a namespace admin may write: an agent allowing everything for the payments API (and an API
/// no one declared), for a day.
const GREEDY_AGENT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: payments-bot}
spec:
  owner: {kind: User, name: mallory@example.com}
  allowedScopes: [payments:read, payments:admin]
  allowedAudiences: [https://payments.example.com, https://undeclared.example.com]
  maxTokenTTL: 24h
"#;

/// A namespace with the operator and no AudiencePolicy at all (unlike [`Fixture::start`]).
async fn undeclared_fixture(prefix: &str) -> Fixture {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace_undeclared(&client, prefix).await;
    create_namespace(&client, &operator_namespace_for(&ns)).await;
    let operator = Operator::start(&ns, &operator_namespace_for(&ns), &[]);
    Fixture {
        client,
        ns,
        operator: Some(operator),
    }
}

fn policies(client: &Client) -> Api<DynamicObject> {
    dynamic_api(client, "", "AudiencePolicy")
}

/// The payments team's policy for this namespace: read only, details of type `payment` as a viewer,
/// tokens of at most 15 minutes. Named after the namespace; [`Fixture`] removes it when dropped.
fn payments_policy(f: &Fixture) -> serde_json::Value {
    json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "AudiencePolicy",
        "metadata": {"name": policy_name(f), "labels": {TEST_POLICY_LABEL: f.ns}},
        "spec": {
            "audience": PAYMENTS,
            "namespaces": [f.ns],
            "allowedScopes": ["payments:read"],
            "allowedAuthorizationDetails": [{"type": "payment", "actions": ["read"], "privileges": ["viewer"]}],
            "maxTokenTTL": "15m",
        },
    })
}

fn policy_name(f: &Fixture) -> String {
    format!("{}-payments", f.ns)
}

async fn declare(f: &Fixture, policy: serde_json::Value) {
    let obj: DynamicObject = serde_json::from_value(policy).unwrap();
    let name = obj.metadata.name.clone().unwrap();
    policies(&f.client)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("AudiencePolicy {name}: {e}"));
}

/// Mallory may create grants in the namespace (an editor), nothing more.
async fn editor(f: &Fixture) -> Client {
    grant_role(
        &f.client,
        &f.ns,
        "editors",
        &[user_subject(MALLORY)],
        &[rule(
            GROUP,
            &["delegationgrants"],
            &[
                "create", "get", "list", "watch", "update", "patch", "delete",
            ],
            &[],
        )],
    )
    .await;
    client_as(MALLORY, &[]).await
}

/// Mallory lends herself to the agent (no `delegate` needed for oneself).
async fn self_grant(
    mallory: &Client,
    f: &Fixture,
    name: &str,
    scopes: &[&str],
    audience: &str,
    ttl: &str,
    privileges: &[&str],
) {
    let grant: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": {
            "principal": {"kind": "User", "name": MALLORY},
            "actorRef": {"name": "payments-bot"},
            "scopes": scopes, "audience": audience, "tokenTTL": ttl,
            "authorizationDetails": [{"type": "payment", "actions": ["read"], "privileges": privileges}],
        },
    }))
    .unwrap();
    dynamic_api(mallory, &f.ns, "DelegationGrant")
        .create(&PostParams::default(), &grant)
        .await
        .unwrap_or_else(|e| panic!("mallory creates {name}: {e}"));
}

/// The claims of the token in `secret`, verified with the published keys for the payments API.
async fn payments_claims(f: &Fixture, secret: &str) -> serde_json::Value {
    let token = f.token_in(secret).await.expect("a token");
    delegation_operator::signing::verify(&token, &f.jwks().await, PAYMENTS, 0)
        .expect("a token that verifies for the payments API")
}

fn message(grant: &DelegationGrant) -> String {
    grant.status.as_ref().unwrap().conditions.as_ref().unwrap()[0]
        .message
        .clone()
}

async fn assert_refused_without_token(f: &Fixture, name: &str, reason: &str, phrases: &[&str]) {
    let refused = f.wait_ready(name, "False", Some(reason)).await;
    let message = message(&refused);
    for phrase in phrases {
        assert!(message.contains(phrase), "{name}: {phrase:?} in {message}");
    }
    assert!(
        f.secrets()
            .get_opt(&format!("{name}-token"))
            .await
            .unwrap()
            .is_none(),
        "{name}: no token Secret"
    );
    assert!(refused.status.as_ref().unwrap().token.is_none(), "{name}");
    let events = wait_for(
        &format!("a Warning Denied event on {name}"),
        Duration::from_secs(20),
        || async {
            let events = f.event_reasons(name).await;
            events
                .contains(&("Warning".into(), "Denied".into()))
                .then_some(events)
        },
    )
    .await;
    assert!(!events.iter().any(|(_, r)| r == "Issued"), "{events:?}");
}

#[tokio::test]
async fn an_editor_gets_no_token_beyond_the_apis_policy_whatever_the_agent_allows() {
    let f = undeclared_fixture("ceil-attack").await;
    f.apply(GREEDY_AGENT).await;
    declare(&f, payments_policy(&f)).await;
    let mallory = editor(&f).await;
    let policy = policy_name(&f);

    // Admin privileges in the details: the agent does not look at them, the policy does.
    self_grant(
        &mallory,
        &f,
        "admin-details",
        &["payments:read"],
        PAYMENTS,
        "10m",
        &["admin"],
    )
    .await;
    assert_refused_without_token(
        &f,
        "admin-details",
        "DeniedBeyondPolicy",
        &[
            &policy,
            &f.ns,
            "privileges [\"admin\"]",
            "privileges [\"viewer\"]",
        ],
    )
    .await;

    // A scope the agent allows and the policy does not.
    self_grant(
        &mallory,
        &f,
        "admin-scope",
        &["payments:admin"],
        PAYMENTS,
        "10m",
        &["viewer"],
    )
    .await;
    assert_refused_without_token(
        &f,
        "admin-scope",
        "DeniedBeyondPolicy",
        &[
            &policy,
            "[\"payments:admin\"]",
            "allowedScopes [\"payments:read\"]",
        ],
    )
    .await;

    // A day-long token: refused, never silently cut to the policy's 15 minutes.
    self_grant(
        &mallory,
        &f,
        "day-long",
        &["payments:read"],
        PAYMENTS,
        "24h",
        &["viewer"],
    )
    .await;
    assert_refused_without_token(
        &f,
        "day-long",
        "DeniedBeyondPolicy",
        &[&policy, "tokenTTL 24h exceeds its maxTokenTTL 15m"],
    )
    .await;

    // An audience nobody declared: nothing at all.
    self_grant(
        &mallory,
        &f,
        "undeclared",
        &["payments:read"],
        "https://undeclared.example.com",
        "10m",
        &["viewer"],
    )
    .await;
    assert_refused_without_token(
        &f,
        "undeclared",
        "DeniedAudienceUndeclared",
        &["https://undeclared.example.com", &f.ns],
    )
    .await;

    // Within the policy: a token, for exactly what was asked.
    self_grant(
        &mallory,
        &f,
        "within",
        &["payments:read"],
        PAYMENTS,
        "10m",
        &["viewer"],
    )
    .await;
    f.wait_ready("within", "True", None).await;
    let claims = payments_claims(&f, "within-token").await;
    assert_eq!(claims["aud"], PAYMENTS);
    assert_eq!(claims["scope"], "payments:read");
    assert_eq!(
        claims["authorization_details"][0]["privileges"],
        json!(["viewer"])
    );

    // The agent itself says what its grants cannot have, before anyone asks.
    let agent = wait_for(
        "the agent to name what is beyond the policy",
        Duration::from_secs(30),
        || async {
            let agent = f.agents().get("payments-bot").await.ok()?;
            let ready = agent
                .status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (ready.reason == "BeyondPolicy").then_some(ready)
        },
    )
    .await;
    assert_eq!(agent.status, "True", "grants within the policy still work");
    for words in [
        "payments:admin",
        "maxTokenTTL 24h",
        "https://undeclared.example.com",
    ] {
        assert!(
            agent.message.contains(words),
            "{words} missing: {}",
            agent.message
        );
    }
}

#[tokio::test]
async fn a_namespace_the_policy_does_not_list_gets_no_token() {
    let f = undeclared_fixture("ceil-elsewhere").await;
    f.apply(GREEDY_AGENT).await;
    let mut policy = payments_policy(&f);
    policy["spec"]["namespaces"] = json!(["payments-team"]);
    declare(&f, policy).await;
    let mallory = editor(&f).await;
    self_grant(
        &mallory,
        &f,
        "elsewhere",
        &["payments:read"],
        PAYMENTS,
        "10m",
        &["viewer"],
    )
    .await;
    assert_refused_without_token(
        &f,
        "elsewhere",
        "DeniedAudienceUndeclared",
        // Its own policy is named when few policies declare the audience; other tests' may be many.
        &[&f.ns, "declare it for other namespaces"],
    )
    .await;
}

#[tokio::test]
async fn the_policy_can_require_approval_when_the_agent_does_not() {
    let f = undeclared_fixture("ceil-approval").await;
    f.apply(GREEDY_AGENT).await;
    let mut policy = payments_policy(&f);
    policy["spec"]["requireApproval"] = json!({});
    declare(&f, policy).await;
    let mallory = editor(&f).await;
    self_grant(
        &mallory,
        &f,
        "needs-approval",
        &["payments:read"],
        PAYMENTS,
        "10m",
        &["viewer"],
    )
    .await;
    let pending = f
        .wait_ready("needs-approval", "False", Some("ApprovalPending"))
        .await;
    assert!(
        message(&pending).contains(&format!("AudiencePolicy {:?} requires", policy_name(&f))),
        "{}",
        message(&pending)
    );
    assert!(
        f.secrets()
            .get_opt("needs-approval-token")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn narrowing_or_deleting_the_policy_revokes_the_live_token() {
    let f = undeclared_fixture("ceil-revoke").await;
    f.apply(GREEDY_AGENT).await;
    declare(&f, payments_policy(&f)).await;
    let mallory = editor(&f).await;
    self_grant(
        &mallory,
        &f,
        "live",
        &["payments:read"],
        PAYMENTS,
        "10m",
        &["viewer"],
    )
    .await;
    f.wait_ready("live", "True", None).await;
    let token = f.token_in("live-token").await.expect("a token");
    let status = unverified_payload(&token)["status"].clone();
    assert_eq!(f.published_status(&status).await, 0, "VALID while allowed");

    // The payments team narrows its policy: the live token is revoked at once.
    let mut narrowed = payments_policy(&f);
    narrowed["spec"]["allowedScopes"] = json!(["payments:list"]);
    declare(&f, narrowed).await;
    f.wait_ready("live", "False", Some("DeniedBeyondPolicy"))
        .await;
    assert_eq!(
        f.published_status(&status).await,
        1,
        "INVALID once narrowed"
    );
    wait_for("the token Secret gone", Duration::from_secs(20), || async {
        f.secrets()
            .get_opt("live-token")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    // Widened again: a new token. Then the policy is deleted: revoked, and the audience undeclared.
    declare(&f, payments_policy(&f)).await;
    f.wait_ready("live", "True", None).await;
    let token = f.token_in("live-token").await.expect("a new token");
    let status = unverified_payload(&token)["status"].clone();
    policies(&f.client)
        .delete(&policy_name(&f), &DeleteParams::default())
        .await
        .unwrap();
    f.wait_ready("live", "False", Some("DeniedAudienceUndeclared"))
        .await;
    assert_eq!(f.published_status(&status).await, 1, "INVALID once deleted");
}

#[tokio::test]
async fn a_grant_ends_at_its_creation_plus_the_policys_max_grant_lifetime() {
    let f = undeclared_fixture("ceil-lifetime").await;
    f.apply(GREEDY_AGENT).await;
    let mut policy = payments_policy(&f);
    policy["spec"]["maxGrantLifetime"] = json!("20s");
    declare(&f, policy).await;
    let mallory = editor(&f).await;
    self_grant(
        &mallory,
        &f,
        "short-lived",
        &["payments:read"],
        PAYMENTS,
        "10m",
        &["viewer"],
    )
    .await;
    let ready = f.wait_ready("short-lived", "True", None).await;
    let created = ready.metadata.creation_timestamp.as_ref().unwrap().0;
    let end = created.as_second() + 20;
    let claims = payments_claims(&f, "short-lived-token").await;
    assert_eq!(
        claims["exp"].as_i64(),
        Some(end),
        "the token never outlives creation + maxGrantLifetime (not the 10m asked)"
    );
    let ended = f
        .wait_ready("short-lived", "False", Some("DeniedGrantLifetimeEnded"))
        .await;
    assert!(
        message(&ended).contains(&policy_name(&f)),
        "{}",
        message(&ended)
    );
    // Every token it held expired by then (none outlived the end); the Secret is gone.
    wait_for("the token Secret gone", Duration::from_secs(20), || async {
        f.secrets()
            .get_opt("short-lived-token")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

/// The payments team bounds how many grants for its API one namespace may hold tokens for
/// (`maxGrantsPerNamespace`): beyond it a grant is refused (`DeniedAudienceGrantLimit`, an Event, no
/// token) while the first ones keep their tokens; raising the limit lets the waiting grant in, and so
/// does deleting an older grant.
#[tokio::test]
async fn an_apis_policy_bounds_its_grants_per_namespace() {
    let f = undeclared_fixture("ceil-count").await;
    f.apply(GREEDY_AGENT).await;
    let mut limited = payments_policy(&f);
    limited["spec"]["maxGrantsPerNamespace"] = json!(2);
    declare(&f, limited.clone()).await;
    let mallory = editor(&f).await;
    let mut tokens = Vec::new();
    for name in ["p1", "p2"] {
        self_grant(
            &mallory,
            &f,
            name,
            &["payments:read"],
            PAYMENTS,
            "10m",
            &["viewer"],
        )
        .await;
        f.wait_ready(name, "True", None).await;
        tokens.push(f.token_in(&format!("{name}-token")).await.expect("a token"));
    }
    self_grant(
        &mallory,
        &f,
        "p3",
        &["payments:read"],
        PAYMENTS,
        "10m",
        &["viewer"],
    )
    .await;
    assert_refused_without_token(
        &f,
        "p3",
        "DeniedAudienceGrantLimit",
        &[
            &f.ns,
            PAYMENTS,
            "3 DelegationGrants",
            "oldest 2",
            "maxGrantsPerNamespace",
        ],
    )
    .await;
    for (name, token) in ["p1", "p2"].into_iter().zip(&tokens) {
        f.wait_ready(name, "True", None).await;
        assert_eq!(
            f.token_in(&format!("{name}-token")).await.as_ref(),
            Some(token),
            "{name} keeps its token"
        );
    }

    // Raised: the waiting grant gets its token.
    limited["spec"]["maxGrantsPerNamespace"] = json!(3);
    declare(&f, limited).await;
    f.wait_ready("p3", "True", None).await;

    // Full again; deleting the oldest lets the next one in.
    self_grant(
        &mallory,
        &f,
        "p4",
        &["payments:read"],
        PAYMENTS,
        "10m",
        &["viewer"],
    )
    .await;
    f.wait_ready("p4", "False", Some("DeniedAudienceGrantLimit"))
        .await;
    f.delete_grant("p1").await;
    f.wait_ready("p4", "True", None).await;
}

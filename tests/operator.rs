//! The operator against a real kube-apiserver: each test runs the operator binary on its own
//! namespace and checks what a user would see — Secrets, tokens, statuses, Events, the status lists.

mod support;

use std::{collections::BTreeMap, time::Duration};

use delegation_operator::signing;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::*;

const AGENTS: &str = CHAIN_AGENTS;

const THREE_HOPS: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: g1}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: orchestrator}
  scopes: [tickets:read, cases:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
  authorizationDetails:
  - {type: ticket, identifier: "1234", actions: [read]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: g2}
spec:
  parentGrantRef: {name: g1}
  actorRef: {name: summarizer}
  scopes: [tickets:read, cases:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
  authorizationDetails:
  - {type: ticket, identifier: "1234", actions: [read]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: g3}
spec:
  parentGrantRef: {name: g2}
  actorRef: {name: notifier}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 5m
  authorizationDetails:
  - {type: ticket, identifier: "1234", actions: [read]}
"#;

fn grant_yaml(name: &str, root: &str, actor: &str, scopes: &str, ttl: &str, extra: &str) -> String {
    format!(
        "apiVersion: delegation.nhi.dev/v1alpha1\nkind: DelegationGrant\nmetadata: {{name: {name}}}\nspec:\n  {root}\n  actorRef: {{name: {actor}}}\n  scopes: {scopes}\n  audience: https://tickets.example.com\n  tokenTTL: {ttl}\n{extra}"
    )
}

/// A grant from alice to the notifier agent, the simplest valid one.
fn notifier_grant(name: &str, ttl: &str) -> String {
    grant_yaml(name, user_root(), "notifier", "[tickets:read]", ttl, "")
}

fn user_root() -> &'static str {
    "principal: {kind: User, name: alice@example.com}"
}

#[tokio::test]
async fn a_three_hop_chain_gets_verifiable_tokens_with_nested_actors() {
    let f = Fixture::start("issue", &[]).await;
    f.apply(AGENTS).await;
    f.apply(THREE_HOPS).await;
    let g1 = f.wait_ready("g1", "True", Some("Issued")).await;
    let g2 = f.wait_ready("g2", "True", Some("Issued")).await;
    let g3 = f.wait_ready("g3", "True", Some("Issued")).await;

    let token = f
        .token_in("g3-token")
        .await
        .expect("g3's Secret holds a token");
    let claims = signing::verify(&token, &f.jwks().await, "https://tickets.example.com", 0)
        .expect("verifies against the JWKS");
    assert_eq!(claims["iss"], "https://issuer.test");
    // The principal, typed by its kind (a group of the same name would be `group:...`).
    assert_eq!(claims["sub"], "user:alice@example.com");
    assert_eq!(claims["aud"], "https://tickets.example.com");
    assert_eq!(claims["scope"], "tickets:read");
    let ns = &f.ns;
    assert_eq!(claims["client_id"], format!("agent:{ns}/notifier"));
    assert_eq!(
        claims["act"],
        json!({"sub": format!("agent:{ns}/notifier"), "act": {"sub": format!("agent:{ns}/summarizer"), "act": {"sub": format!("agent:{ns}/orchestrator")}}})
    );
    let status = g3.status.clone().unwrap();
    assert_eq!(claims["jti"], status.token.as_ref().unwrap().id);
    assert_eq!(
        claims["delegation.nhi.dev/grant"],
        json!({"namespace": ns, "name": "g3", "uid": g3.uid().unwrap()})
    );
    let parent_exp = g2
        .status
        .as_ref()
        .unwrap()
        .token
        .as_ref()
        .unwrap()
        .expires_at
        .0
        .as_second();
    assert!(
        claims["exp"].as_i64().unwrap() <= parent_exp,
        "no token outlives its parent's"
    );
    assert!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 300,
        "no token outlives its tokenTTL"
    );

    // The chain is written back root first, and the token's header names the published key.
    let chain: Vec<_> = status
        .chain
        .unwrap()
        .iter()
        .map(|l| (l.kind.clone(), l.name.clone()))
        .collect();
    assert_eq!(
        chain,
        [
            ("User", "alice@example.com"),
            ("AgentIdentity", "orchestrator"),
            ("AgentIdentity", "summarizer"),
            ("AgentIdentity", "notifier")
        ]
        .map(|(k, n)| (k.to_owned(), n.to_owned()))
    );
    assert_eq!(status.effective_scopes.unwrap(), ["tickets:read"]);

    // authorization_details travel in g1's token.
    let g1_claims = f.verified_claims("g1-token").await.unwrap();
    assert_eq!(
        g1_claims["authorization_details"],
        json!([{"type": "ticket", "identifier": "1234", "actions": ["read"]}])
    );
    assert_eq!(
        g1_claims["act"],
        json!({"sub": format!("agent:{ns}/orchestrator")})
    );
    assert_eq!(g1_claims["jti"], token_id(&g1));

    // The Secret is ours, typed, labelled and owned by the grant.
    let secret = f.secrets().get("g3-token").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("delegation.nhi.dev/token"));
    assert!(secret.data.as_ref().unwrap().contains_key("expires-at"));
    assert_eq!(
        secret
            .labels()
            .get("delegation.nhi.dev/grant")
            .map(String::as_str),
        Some("g3")
    );
    assert_eq!(secret.owner_references()[0].uid, g3.uid().unwrap());

    // Agents report their subject and how many grants they act under.
    let orchestrator = f.agents().get("orchestrator").await.unwrap();
    let agent_status = orchestrator.status.unwrap();
    assert_eq!(
        agent_status.subject.as_deref(),
        Some(format!("agent:{ns}/orchestrator").as_str())
    );
    wait_for(
        "orchestrator activeGrants=1",
        Duration::from_secs(10),
        || async {
            let s = f.agents().get("orchestrator").await.ok()?.status?;
            (s.active_grants == Some(1)).then_some(())
        },
    )
    .await;

    // Evidence: an Issued event and an audit line with the whole chain — never the token.
    assert!(
        f.event_reasons("g3")
            .await
            .contains(&("Normal".into(), "Issued".into()))
    );
    let audit = f.operator().audit();
    let issued = audit
        .iter()
        .find(|r| r["action"] == "Issued" && r["grant"] == "g3")
        .expect("audit record for g3");
    assert_eq!(issued["chain"].as_array().unwrap().len(), 4);
    assert_eq!(issued["principal"], "alice@example.com");
    assert!(
        !f.operator().raw_output().contains(&token),
        "the token must never be logged"
    );
    assert!(
        !f.operator()
            .raw_output()
            .contains(token.split('.').nth(2).unwrap()),
        "not even its signature"
    );
}

#[tokio::test]
async fn tokens_rotate_before_they_expire_and_the_old_one_is_not_revoked() {
    let f = Fixture::start("rotate", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("short", "6s")).await;
    let first = f.wait_ready("short", "True", Some("Issued")).await;
    let first_token = first.status.as_ref().unwrap().token.clone().unwrap();
    assert!(first_token.renewal_time.0 < first_token.expires_at.0);

    let rotated = wait_for("a rotated token", Duration::from_secs(20), || async {
        let g = f.grants().get("short").await.ok()?;
        let t = g.status.as_ref()?.token.as_ref()?;
        (t.id != first_token.id).then_some(g)
    })
    .await;
    let status = rotated.status.unwrap();
    let new_token = status.token.unwrap();
    assert!(
        new_token.issued_at.0 < first_token.expires_at.0,
        "the new token appears before the old one expires"
    );
    assert_eq!(
        status.previous_token.map(|p| p.id),
        Some(first_token.id.clone()),
        "the old token is kept as previous"
    );
    assert!(
        !f.revoked_ids().await.contains(&first_token.id),
        "rotation does not revoke"
    );
    let claims = f.verified_claims("short-token").await.unwrap();
    assert_eq!(claims["jti"], new_token.id);
    assert!(
        f.operator()
            .audit()
            .iter()
            .any(|r| r["action"] == "Rotated" && r["grant"] == "short")
    );
    assert!(
        f.event_reasons("short")
            .await
            .contains(&("Normal".into(), "Rotated".into()))
    );
}

#[tokio::test]
async fn a_grant_expires_at_valid_until_and_no_token_outlives_it() {
    let f = Fixture::start("expire", &[]).await;
    f.apply(AGENTS).await;
    let until = k8s_openapi::jiff::Timestamp::now().as_second() + 15;
    let until = k8s_openapi::jiff::Timestamp::from_second(until).unwrap();
    f.apply(&grant_yaml(
        "brief",
        user_root(),
        "notifier",
        "[tickets:read]",
        "5m",
        &format!("  validUntil: \"{until}\"\n"),
    ))
    .await;
    let grant = f.wait_ready("brief", "True", None).await;
    let token = grant.status.unwrap().token.unwrap();
    assert!(
        token.expires_at.0 <= until,
        "the token ends with the delegation"
    );
    let expired = f.wait_ready("brief", "False", Some("Expired")).await;
    assert!(
        expired.status.unwrap().conditions.unwrap()[0]
            .message
            .contains("validUntil")
    );
    assert!(
        f.secrets().get_opt("brief-token").await.unwrap().is_none(),
        "the Secret goes with the delegation"
    );
}

#[tokio::test]
async fn deleting_a_grant_revokes_its_token() {
    // EdDSA keys here (ES256 everywhere else): the token verifies with the OKP key of the JWKS.
    let f = Fixture::start("delete", &["--algorithm", "EdDSA"]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("doomed", "5m")).await;
    let grant = f.wait_ready("doomed", "True", None).await;
    let claims = f
        .verified_claims("doomed-token")
        .await
        .expect("an EdDSA token that verifies");
    assert_eq!(claims["sub"], "user:alice@example.com");
    assert_eq!(f.jwks().await["keys"][0]["kty"], "OKP");
    assert!(
        grant
            .finalizers()
            .contains(&"delegation.nhi.dev/revoke-tokens".to_owned())
    );
    // Put there at creation by the admission policy, not by a write of the operator: an update of
    // the finalizer list would own it in managedFields (what the admission adds belongs to no one).
    let finalizer_writers: Vec<_> = grant
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.is_none() && m.operation.as_deref() == Some("Update"))
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:finalizers"))
        })
        .map(|m| m.manager.clone())
        .collect();
    assert!(
        finalizer_writers.is_empty(),
        "the finalizer was written by {finalizer_writers:?}"
    );
    let jti = token_id(&grant);
    assert!(
        f.operator().audit().iter().any(|r| r["action"] == "Issued"
            && r["tokenIds"][0] == jti.as_str()
            && r["statusList"] == claims["status"]["status_list"]),
        "the audit line says where the token's status is published, as the token does"
    );

    f.grants()
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    f.wait_grant_gone(
        "doomed",
        "grant gone (finalizer removed)",
        Duration::from_secs(15),
    )
    .await;
    assert!(
        f.secrets().get_opt("doomed-token").await.unwrap().is_none(),
        "Secret deleted explicitly, not left to GC"
    );
    assert!(
        f.revoked_ids().await.contains(&jti),
        "the token is INVALID in the published status list"
    );
    assert!(f.operator().audit().iter().any(|r| r["action"] == "Revoked"
        && r["grant"] == "doomed"
        && r["tokenIds"][0] == jti.as_str()));
    assert!(
        f.event_reasons("doomed")
            .await
            .contains(&("Normal".into(), "Revoked".into()))
    );
}

#[tokio::test]
async fn suspending_an_agent_revokes_down_the_chain_and_resuming_recovers() {
    let f = Fixture::start("cascade", &[]).await;
    f.apply(AGENTS).await;
    f.apply(THREE_HOPS).await;
    let before: Vec<String> = [
        f.wait_ready("g1", "True", None).await,
        f.wait_ready("g2", "True", None).await,
        f.wait_ready("g3", "True", None).await,
    ]
    .iter()
    .map(token_id)
    .collect();

    let suspend = |on: bool| json!({"spec": {"suspended": on}});
    f.patch_agent("orchestrator", suspend(true)).await;
    f.wait_ready("g1", "False", Some("AgentSuspended")).await;
    let g2 = f.wait_ready("g2", "False", Some("ParentNotReady")).await;
    f.wait_ready("g3", "False", Some("ParentNotReady")).await;
    let message = &g2.status.unwrap().conditions.unwrap()[0].message;
    assert!(
        message.contains("g1"),
        "the message names the broken link: {message}"
    );
    for secret in ["g1-token", "g2-token", "g3-token"] {
        wait_for(
            &format!("{secret} deleted"),
            Duration::from_secs(10),
            || async {
                f.secrets()
                    .get_opt(secret)
                    .await
                    .unwrap()
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    }
    let revoked = f.revoked_ids().await;
    for jti in &before {
        assert!(revoked.contains(jti), "{jti} not revoked");
    }
    assert_eq!(
        f.agents()
            .get("orchestrator")
            .await
            .unwrap()
            .status
            .unwrap()
            .conditions
            .unwrap()[0]
            .reason,
        "Suspended"
    );

    f.patch_agent("orchestrator", suspend(false)).await;
    for (name, old) in ["g1", "g2", "g3"].iter().zip(&before) {
        let g = f.wait_ready(name, "True", None).await;
        assert_ne!(&token_id(&g), old, "{name} got a fresh token");
        assert!(f.token_in(&format!("{name}-token")).await.is_some());
    }

    // An agent that is deleted takes its grants' tokens with it.
    let g3 = token_id(&f.grants().get("g3").await.unwrap());
    f.agents()
        .delete("notifier", &DeleteParams::default())
        .await
        .unwrap();
    f.wait_ready("g3", "False", Some("AgentMissing")).await;
    assert!(f.revoked_ids().await.contains(&g3));
}

#[tokio::test]
async fn every_violation_is_refused_with_its_own_reason_and_no_token() {
    let f = Fixture::start("deny", &["--min-token-ttl", "2m"]).await;
    f.apply(AGENTS).await;
    f.apply(&grant_yaml(
        "parent",
        user_root(),
        "orchestrator",
        "[tickets:read]",
        "10m",
        "",
    ))
    .await;
    f.wait_ready("parent", "True", None).await;
    let parent = |name: &str| format!("parentGrantRef: {{name: {name}}}");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "scope-not-allowed",
            grant_yaml(
                "scope-not-allowed",
                user_root(),
                "notifier",
                "[tickets:write]",
                "5m",
                "",
            ),
            "DeniedScopeNotAllowed",
        ),
        (
            "scope-exceeds-parent",
            grant_yaml(
                "scope-exceeds-parent",
                &parent("parent"),
                "summarizer",
                "[cases:read]",
                "5m",
                "",
            ),
            "DeniedScopeExceedsParent",
        ),
        (
            "audience-not-allowed",
            notifier_grant("audience-not-allowed", "5m").replace(
                "audience: https://tickets.example.com",
                "audience: https://other.example.com",
            ),
            "DeniedAudienceNotAllowed",
        ),
        (
            "ttl-too-long",
            notifier_grant("ttl-too-long", "6m"),
            "DeniedTTLTooLong",
        ),
        (
            "ttl-too-short",
            notifier_grant("ttl-too-short", "90s"),
            "DeniedTTLTooShort",
        ),
        (
            "actor-not-allowed",
            grant_yaml(
                "actor-not-allowed",
                &parent("parent"),
                "notifier",
                "[tickets:read]",
                "5m",
                "",
            ),
            "DeniedActorNotAllowed",
        ),
        (
            "parent-missing",
            grant_yaml(
                "parent-missing",
                &parent("nowhere"),
                "summarizer",
                "[tickets:read]",
                "5m",
                "",
            ),
            "DeniedParentMissing",
        ),
        (
            "cycle-a",
            grant_yaml(
                "cycle-a",
                &parent("cycle-b"),
                "summarizer",
                "[tickets:read]",
                "5m",
                "",
            ),
            "DeniedCycle",
        ),
        (
            "cycle-b",
            grant_yaml(
                "cycle-b",
                &parent("cycle-a"),
                "summarizer",
                "[tickets:read]",
                "5m",
                "",
            ),
            "DeniedCycle",
        ),
        (
            "agent-missing",
            grant_yaml(
                "agent-missing",
                user_root(),
                "ghost",
                "[tickets:read]",
                "5m",
                "",
            ),
            "AgentMissing",
        ),
        (
            "suspended",
            grant_yaml(
                "suspended",
                user_root(),
                "notifier",
                "[tickets:read]",
                "5m",
                "  suspended: true\n",
            ),
            "Suspended",
        ),
        (
            "expired",
            grant_yaml(
                "expired",
                user_root(),
                "notifier",
                "[tickets:read]",
                "5m",
                "  validUntil: \"2020-01-01T00:00:00Z\"\n",
            ),
            "Expired",
        ),
    ];
    for (_, yaml, _) in &cases {
        f.apply(yaml).await;
    }
    // authorizationDetails only narrow: a hop below a parent limited to one ticket must stay within it.
    f.apply(&grant_yaml(
        "one-ticket",
        user_root(),
        "orchestrator",
        "[tickets:read]",
        "10m",
        "  authorizationDetails: [{type: ticket, identifier: \"1234\", actions: [read]}]\n",
    ))
    .await;
    f.apply(&grant_yaml(
        "any-ticket",
        &parent("one-ticket"),
        "summarizer",
        "[tickets:read]",
        "5m",
        "",
    ))
    .await;
    // Depth: parent (orchestrator, maxDepth 2) → hop1 (summarizer, maxDepth 1) → hop2 (notifier) is
    // within every limit; one more hop below is refused, by the orchestrator's limit first.
    f.apply(&grant_yaml(
        "hop1",
        &parent("parent"),
        "summarizer",
        "[tickets:read]",
        "5m",
        "",
    ))
    .await;
    f.wait_ready("hop1", "True", None).await;
    f.apply(&grant_yaml(
        "hop2",
        &parent("hop1"),
        "notifier",
        "[tickets:read]",
        "5m",
        "",
    ))
    .await;
    f.wait_ready("hop2", "True", None).await;
    // One change to the agents: the notifier may hand on to the summarizer but allows no further hop
    // (depth), and the summarizer may also serve a second audience (audience mismatch below a parent).
    let agents = AGENTS
        .replace("  maxTokenTTL: 5m\n", "  maxTokenTTL: 5m\n  delegation: {maxDepth: 0, allowedActors: [summarizer]}\n")
        .replace(
            "allowedAudiences: [https://tickets.example.com]\n  maxTokenTTL: 10m",
            "allowedAudiences: [https://tickets.example.com, https://other.example.com]\n  maxTokenTTL: 10m",
        );
    f.apply(&agents).await;
    f.apply(&grant_yaml(
        "too-deep",
        &parent("hop2"),
        "summarizer",
        "[tickets:read]",
        "5m",
        "",
    ))
    .await;
    f.apply(
        &grant_yaml(
            "audience-mismatch",
            &parent("parent"),
            "summarizer",
            "[tickets:read]",
            "5m",
            "",
        )
        .replace(
            "audience: https://tickets.example.com",
            "audience: https://other.example.com",
        ),
    )
    .await;

    let mut all = cases.iter().map(|(n, _, r)| (*n, *r)).collect::<Vec<_>>();
    all.push(("too-deep", "DeniedDepth"));
    all.push(("any-ticket", "DeniedDetailsExceedParent"));
    all.push(("audience-mismatch", "DeniedAudienceMismatch"));
    for (name, reason) in all {
        let g = f.wait_ready(name, "False", Some(reason)).await;
        let condition = &g.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
        assert!(
            !condition.message.is_empty(),
            "{name}: a message a person can act on"
        );
        assert!(
            g.status.as_ref().unwrap().token.is_none(),
            "{name}: no token in status"
        );
        assert!(
            f.secrets()
                .get_opt(&format!("{name}-token"))
                .await
                .unwrap()
                .is_none(),
            "{name}: no Secret"
        );
        if reason.starts_with("Denied") {
            wait_for(
                &format!("{name}: Warning Denied event"),
                Duration::from_secs(10),
                || async {
                    f.event_reasons(name)
                        .await
                        .contains(&("Warning".into(), "Denied".into()))
                        .then_some(())
                },
            )
            .await;
        }
    }
    assert!(
        f.operator()
            .audit()
            .iter()
            .any(|r| r["action"] == "Denied" && r["reason"] == "DeniedCycle")
    );

    // A valid grant widened beyond what it may have loses its token, it is not narrowed.
    let hop1_jti = token_id(&f.grants().get("hop1").await.unwrap());
    f.patch_grant(
        "hop1",
        json!({"spec": {"scopes": ["tickets:read", "tickets:write"]}}),
    )
    .await;
    f.wait_ready("hop1", "False", Some("DeniedScopeNotAllowed"))
        .await;
    assert!(f.revoked_ids().await.contains(&hop1_jti));
}

#[tokio::test]
async fn a_secret_the_operator_did_not_create_is_never_taken_over() {
    let f = Fixture::start("conflict", &[]).await;
    f.apply(AGENTS).await;
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("taken".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "token".to_owned(),
            ByteString(b"someone else's".to_vec()),
        )])),
        ..Default::default()
    };
    f.secrets()
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    f.apply(&grant_yaml(
        "wants-taken",
        user_root(),
        "notifier",
        "[tickets:read]",
        "5m",
        "  secretName: taken\n",
    ))
    .await;
    let g = f
        .wait_ready("wants-taken", "False", Some("SecretConflict"))
        .await;
    assert!(
        g.status.unwrap().conditions.unwrap()[0]
            .message
            .contains("taken")
    );
    let after = f.secrets().get("taken").await.unwrap();
    assert_eq!(after.data.unwrap()["token"].0, b"someone else's");
    assert!(
        after.metadata.owner_references.is_none(),
        "no owner reference added"
    );
    wait_for(
        "a Warning SecretConflict event",
        Duration::from_secs(10),
        || async {
            f.event_reasons("wants-taken")
                .await
                .contains(&("Warning".into(), "SecretConflict".into()))
                .then_some(())
        },
    )
    .await;

    // Freed up, the grant recovers on its next look: an edit of the grant triggers it at once (without
    // one, the operator looks again within a minute, since a foreign Secret sends it no events).
    f.secrets()
        .delete("taken", &DeleteParams::default())
        .await
        .unwrap();
    f.patch_grant(
        "wants-taken",
        json!({"metadata": {"annotations": {"nudge": "1"}}}),
    )
    .await;
    f.wait_ready("wants-taken", "True", None).await;
}

#[tokio::test]
async fn a_deleted_or_edited_secret_is_restored() {
    let f = Fixture::start("restore", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("keep", "5m")).await;
    let first = token_id(&f.wait_ready("keep", "True", None).await);

    f.secrets()
        .delete("keep-token", &DeleteParams::default())
        .await
        .unwrap();
    let second = wait_for(
        "Secret restored after deletion",
        Duration::from_secs(15),
        || async {
            let claims = f.verified_claims("keep-token").await?;
            (claims["jti"] != first.as_str()).then(|| claims["jti"].as_str().unwrap().to_owned())
        },
    )
    .await;
    assert!(
        f.revoked_ids().await.contains(&first),
        "the token of a deleted Secret is revoked: deleting it says the token leaked"
    );
    wait_for(
        "status names the restored token",
        Duration::from_secs(10),
        || async {
            let g = f.grants().get("keep").await.ok()?;
            (token_id(&g) == second).then_some(())
        },
    )
    .await;

    let tampered = json!({"data": {"token": ByteString(b"eyJhbGciOiJub25lIn0.e30.".to_vec())}});
    f.secrets()
        .patch(
            "keep-token",
            &PatchParams::default(),
            &Patch::Merge(&tampered),
        )
        .await
        .unwrap();
    let third = wait_for(
        "Secret restored after an edit",
        Duration::from_secs(15),
        || async {
            let claims = f.verified_claims("keep-token").await?;
            (claims["jti"] != second.as_str()).then(|| claims["jti"].as_str().unwrap().to_owned())
        },
    )
    .await;
    assert!(
        f.revoked_ids().await.contains(&second),
        "the token of an altered Secret is revoked"
    );
    assert_ne!(third, second);

    // Any key counts: a later expires-at would tell clients to keep a token past its exp.
    let postponed = json!({"data": {"expires-at": ByteString(b"2099-01-01T00:00:00Z".to_vec())}});
    f.secrets()
        .patch(
            "keep-token",
            &PatchParams::default(),
            &Patch::Merge(&postponed),
        )
        .await
        .unwrap();
    wait_for(
        "Secret restored after an expires-at edit",
        Duration::from_secs(15),
        || async {
            let claims = f.verified_claims("keep-token").await?;
            let secret = f.secrets().get("keep-token").await.ok()?;
            let expires = String::from_utf8(secret.data?.get("expires-at")?.0.clone()).ok()?;
            (claims["jti"] != third.as_str() && expires != "2099-01-01T00:00:00Z").then_some(())
        },
    )
    .await;
    assert!(f.revoked_ids().await.contains(&third));
}

#[tokio::test]
async fn a_restarted_operator_loses_nothing_and_revokes_what_was_deleted_meanwhile() {
    let mut f = Fixture::start("restart", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("stays", "5m")).await;
    f.apply(&notifier_grant("goes", "5m")).await;
    let stays = token_id(&f.wait_ready("stays", "True", None).await);
    let goes = token_id(&f.wait_ready("goes", "True", None).await);

    f.operator.take().unwrap().stop();
    f.grants()
        .delete("goes", &DeleteParams::default())
        .await
        .unwrap();
    f.apply(&notifier_grant("arrives", "5m")).await;
    // One created without the admission finalizer (as before the policy existed): the operator adds it.
    f.apply(&notifier_grant("unguarded", "5m")).await;
    f.grants()
        .patch(
            "unguarded",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    // While the operator is down the finalizer holds the deleted grant, and its token is still there.
    let held = f.grants().get("goes").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(f.secrets().get_opt("goes-token").await.unwrap().is_some());

    f.operator = Some(Operator::start(&f.ns, &f.operator_namespace(), &[]));
    f.wait_grant_gone(
        "goes",
        "deleted grant revoked and released",
        Duration::from_secs(20),
    )
    .await;
    assert!(f.secrets().get_opt("goes-token").await.unwrap().is_none());
    assert!(f.revoked_ids().await.contains(&goes));
    f.wait_ready("arrives", "True", None).await;
    let unguarded = f.wait_ready("unguarded", "True", None).await;
    assert_eq!(
        unguarded.finalizers(),
        ["delegation.nhi.dev/revoke-tokens".to_owned()],
        "the operator adds its finalizer where the admission policy did not"
    );
    assert_eq!(
        token_id(&f.grants().get("stays").await.unwrap()),
        stays,
        "a valid token is not reissued on restart"
    );
    let jwks = f.jwks().await;
    assert_eq!(
        jwks["keys"].as_array().unwrap().len(),
        1,
        "the signing key is reused, not regenerated"
    );
    signing::verify(
        &f.token_in("stays-token").await.unwrap(),
        &jwks,
        "https://tickets.example.com",
        0,
    )
    .unwrap();
}

/// Every object the operator could write, with its resourceVersion.
async fn resource_versions(f: &Fixture) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    let lp = ListParams::default();
    for g in f.grants().list(&lp).await.unwrap() {
        versions.insert(
            format!("grant/{}", g.name_any()),
            g.resource_version().unwrap(),
        );
    }
    for a in f.agents().list(&lp).await.unwrap() {
        versions.insert(
            format!("agent/{}", a.name_any()),
            a.resource_version().unwrap(),
        );
    }
    for ns in [f.ns.clone(), f.operator_namespace()] {
        for s in Api::<Secret>::namespaced(f.client.clone(), &ns)
            .list_metadata(&lp)
            .await
            .unwrap()
        {
            versions.insert(
                format!("secret/{ns}/{}", s.name_any()),
                s.resource_version().unwrap(),
            );
        }
        for c in Api::<ConfigMap>::namespaced(f.client.clone(), &ns)
            .list_metadata(&lp)
            .await
            .unwrap()
        {
            versions.insert(
                format!("configmap/{ns}/{}", c.name_any()),
                c.resource_version().unwrap(),
            );
        }
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(f.client.clone(), &ns);
        for e in events.list_metadata(&lp).await.unwrap() {
            versions.insert(
                format!("event/{ns}/{}", e.name_any()),
                e.resource_version().unwrap(),
            );
        }
    }
    versions
}

#[tokio::test]
async fn an_idle_operator_makes_no_writes() {
    let f = Fixture::start("idle", &[]).await;
    f.apply(AGENTS).await;
    f.apply(THREE_HOPS).await;
    for g in ["g1", "g2", "g3"] {
        f.wait_ready(g, "True", None).await;
    }
    wait_for("agent counts settled", Duration::from_secs(10), || async {
        let s = f.agents().get("notifier").await.ok()?.status?;
        (s.active_grants == Some(1)).then_some(())
    })
    .await;
    // Writes already due (Events, the other agents' counts) end first: a bounded wait for two quiet
    // seconds, not a fixed pause that a loaded machine can outlast.
    let before = wait_for(
        "two seconds without writes",
        Duration::from_secs(60),
        || async {
            let first = resource_versions(&f).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            (resource_versions(&f).await == first).then_some(first)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = resource_versions(&f).await;
    assert_eq!(before, after, "something was written while nothing was due");
    assert!(
        before.len() >= 12,
        "the comparison covers grants, agents, Secrets, ConfigMaps and Events: {before:?}"
    );
}

#[tokio::test]
async fn rotated_signing_keys_stay_published_while_their_tokens_live() {
    let f = Fixture::start("keys", &["--key-rotation-period", "6s"]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("early", "5m")).await;
    let early = f.wait_ready("early", "True", None).await;
    let early_kid = early.status.unwrap().token.unwrap().key_id;
    let early_token = f.token_in("early-token").await.unwrap();
    let kids = |jwks: &serde_json::Value| -> Vec<String> {
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };

    // Half a period ahead, the next key is published while the first one still signs (the active key
    // comes first in the JWKS).
    wait_for(
        "the next key published while the first still signs",
        Duration::from_secs(15),
        || async {
            let published = kids(&f.jwks().await);
            (published.len() == 2 && published[0] == early_kid).then_some(())
        },
    )
    .await;

    // After the rotation (and the next-but-one key's publication) the retired key is still there.
    let jwks = wait_for(
        "a rotation and the following publication",
        Duration::from_secs(15),
        || async {
            let jwks = f.jwks().await;
            (jwks["keys"].as_array()?.len() >= 3).then_some(jwks)
        },
    )
    .await;
    assert!(
        kids(&jwks).contains(&early_kid),
        "the retired key is still published"
    );
    signing::verify(&early_token, &jwks, "https://tickets.example.com", 0)
        .expect("a token of the retired key still verifies");

    let published_before = kids(&f.jwks().await);
    f.apply(&notifier_grant("late", "5m")).await;
    let late = f.wait_ready("late", "True", None).await;
    let late_kid = late.status.unwrap().token.unwrap().key_id;
    assert_ne!(
        late_kid, early_kid,
        "new tokens are signed with a newer key"
    );
    assert!(
        published_before.contains(&late_kid),
        "the key that signed was published before the grant existed"
    );
    assert!(f.verified_claims("late-token").await.is_some());
    // Private keys stay in their Secret; the ConfigMap holds public parts only.
    let published = serde_json::to_string(&f.jwks().await).unwrap();
    assert!(
        !published.contains("\"d\""),
        "no private key member in the JWKS"
    );
}

#[tokio::test]
async fn the_operator_refuses_to_start_without_its_namespace() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "refuse").await;
    let (status, log) =
        Operator::start(&ns, "no-such-namespace", &[]).wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        log.contains("no-such-namespace") && log.contains("does not exist"),
        "{log}"
    );
}

#[tokio::test]
async fn tightening_an_agent_policy_revokes_hops_further_down_at_once() {
    let f = Fixture::start("policy", &[]).await;
    f.apply(AGENTS).await;
    f.apply(THREE_HOPS).await;
    let g3 = token_id(&f.wait_ready("g3", "True", None).await);
    let g2 = token_id(&f.wait_ready("g2", "True", None).await);
    // The orchestrator now allows one hop below it: g3 (two below) must lose its token now, not at
    // its next renewal, although g1 and g2 do not change.
    f.patch_agent(
        "orchestrator",
        json!({"spec": {"delegation": {"maxDepth": 1}}}),
    )
    .await;
    f.wait_ready("g3", "False", Some("DeniedDepth")).await;
    assert!(f.revoked_ids().await.contains(&g3));
    assert_eq!(
        token_id(&f.wait_ready("g2", "True", None).await),
        g2,
        "the hop within the limit keeps its token"
    );
}

#[tokio::test]
async fn a_token_displaced_by_a_second_rotation_while_still_valid_is_revoked() {
    let f = Fixture::start("displace", &[]).await;
    f.apply(AGENTS).await;
    // Renewed every second or two while each token lives ten: several are valid at once.
    f.apply(&grant_yaml(
        "busy",
        user_root(),
        "notifier",
        "[tickets:read]",
        "10s",
        "  renewBefore: 8s\n",
    ))
    .await;
    let first = token_id(&f.wait_ready("busy", "True", None).await);
    wait_for(
        "two rotations after the first token",
        Duration::from_secs(20),
        || async {
            let status = f.grants().get("busy").await.ok()?.status?;
            let previous = status.previous_token?.id;
            (status.token?.id != first && previous != first).then_some(())
        },
    )
    .await;
    assert!(
        f.revoked_ids().await.contains(&first),
        "a valid token no status tracks must be revoked"
    );
}

#[tokio::test]
async fn editing_a_parent_in_ways_its_token_survives_revokes_nothing() {
    let f = Fixture::start("edit", &[]).await;
    f.apply(AGENTS).await;
    f.apply(THREE_HOPS).await;
    let mut before = Vec::new();
    for g in ["g1", "g2", "g3"] {
        before.push(token_id(&f.wait_ready(g, "True", None).await));
    }
    f.patch_grant(
        "g1",
        json!({"spec": {"validUntil": "2099-01-01T00:00:00Z", "renewBefore": "2m"}}),
    )
    .await;
    wait_for(
        "g1 acknowledges generation 2",
        Duration::from_secs(10),
        || async {
            let g = f.grants().get("g1").await.ok()?;
            (g.status?.observed_generation == Some(2)).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut after = Vec::new();
    for g in ["g1", "g2", "g3"] {
        after.push(token_id(&f.wait_ready(g, "True", None).await));
    }
    assert_eq!(before, after, "no token was replaced");
    assert!(f.revoked_ids().await.is_empty(), "nothing was revoked");

    // Narrowing the parent's scopes does replace its token, revokes the old one, and reaches the chain.
    f.patch_grant("g1", json!({"spec": {"scopes": ["tickets:read"]}}))
        .await;
    f.wait_ready("g2", "False", Some("DeniedScopeExceedsParent"))
        .await;
    let g1 = f.wait_ready("g1", "True", None).await;
    assert_ne!(token_id(&g1), before[0]);
    assert!(
        f.revoked_ids().await.contains(&before[0]),
        "the wider token is revoked, not left to expire"
    );
}

#[tokio::test]
async fn changes_a_token_cannot_survive_replace_and_revoke_it() {
    let f = Fixture::start("change", &[]).await;
    f.apply(AGENTS).await;
    // The summarizer may serve two audiences; its grant starts with one.
    f.apply(&AGENTS.replace(
        "allowedAudiences: [https://tickets.example.com]\n  maxTokenTTL: 10m",
        "allowedAudiences: [https://tickets.example.com, https://other.example.com]\n  maxTokenTTL: 10m",
    ))
    .await;
    f.apply(&grant_yaml(
        "g",
        user_root(),
        "summarizer",
        "[tickets:read]",
        "10m",
        "",
    ))
    .await;
    let first = token_id(&f.wait_ready("g", "True", None).await);

    // Another audience: the old token is for the wrong resource server.
    f.patch_grant(
        "g",
        json!({"spec": {"audience": "https://other.example.com"}}),
    )
    .await;
    let second = wait_for(
        "a token for the new audience",
        Duration::from_secs(15),
        || async {
            let g = f.grants().get("g").await.ok()?;
            (g.status.as_ref()?.observed_generation == Some(2) && token_id(&g) != first)
                .then(|| token_id(&g))
        },
    )
    .await;
    assert!(
        f.revoked_ids().await.contains(&first),
        "the old-audience token is revoked"
    );

    // A shorter tokenTTL: the current token would outlive it.
    f.patch_grant("g", json!({"spec": {"tokenTTL": "2m"}}))
        .await;
    let third = wait_for(
        "a token within the shorter TTL",
        Duration::from_secs(15),
        || async {
            let g = f.grants().get("g").await.ok()?;
            let token = g.status.as_ref()?.token.clone()?;
            (token.id != second).then_some(token)
        },
    )
    .await;
    assert!(third.expires_at.0.as_second() - third.issued_at.0.as_second() <= 120);
    assert!(
        f.revoked_ids().await.contains(&second),
        "the longer-lived token is revoked"
    );
}

/// The kill switch must never miss: a fleet of agents suspended and resumed again and again, each with
/// a grant and a hop below it. Every suspension revokes every token of that chain within seconds, and
/// every resumption reissues them — however the agent and grant watches interleave.
#[tokio::test]
async fn suspending_and_resuming_a_fleet_of_agents_never_leaves_a_token_behind() {
    const AGENTS_IN_FLEET: usize = 12;
    const CYCLES: usize = 5;
    let f = Fixture::start("fleet", &[]).await;
    let mut yaml = String::from(
        "apiVersion: delegation.nhi.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {name: helper}\nspec:\n  owner: {kind: Group, name: platform}\n  allowedScopes: [tickets:read]\n  allowedAudiences: [https://tickets.example.com]\n  maxTokenTTL: 15m\n",
    );
    for i in 0..AGENTS_IN_FLEET {
        yaml += &format!(
            "---\napiVersion: delegation.nhi.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: agent-{i}}}\nspec:\n  owner: {{kind: Group, name: platform}}\n  allowedScopes: [tickets:read]\n  allowedAudiences: [https://tickets.example.com]\n  maxTokenTTL: 15m\n  delegation: {{maxDepth: 1, allowedActors: [helper]}}\n---\n{}\n---\n{}\n",
            grant_yaml(
                &format!("root-{i}"),
                user_root(),
                &format!("agent-{i}"),
                "[tickets:read]",
                "10m",
                ""
            ),
            grant_yaml(
                &format!("hop-{i}"),
                &format!("parentGrantRef: {{name: root-{i}}}"),
                "helper",
                "[tickets:read]",
                "10m",
                ""
            ),
        );
    }
    f.apply(&yaml).await;
    let names: Vec<String> = (0..AGENTS_IN_FLEET)
        .flat_map(|i| [format!("root-{i}"), format!("hop-{i}")])
        .collect();
    let all_in_state = |ready: bool| {
        let f = &f;
        let names = &names;
        async move {
            let grants = f.grants().list(&ListParams::default()).await.unwrap();
            let secrets = f.secrets().list(&ListParams::default()).await.unwrap();
            let secret_names: Vec<String> = secrets.iter().map(|s| s.name_any()).collect();
            names.iter().all(|name| {
                let grant = grants.iter().find(|g| &g.name_any() == name);
                let is_ready = grant.is_some_and(|g| {
                    g.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                });
                let has_secret = secret_names.contains(&format!("{name}-token"));
                is_ready == ready && has_secret == ready
            })
        }
    };
    wait_for("the fleet Ready", Duration::from_secs(60), || async {
        all_in_state(true).await.then_some(())
    })
    .await;

    for cycle in 0..CYCLES {
        for on in [true, false] {
            let patches = (0..AGENTS_IN_FLEET).map(|i| {
                f.patch_agent_owned(format!("agent-{i}"), json!({"spec": {"suspended": on}}))
            });
            futures::future::join_all(patches).await;
            let what = format!(
                "cycle {cycle}: every chain {}",
                if on { "revoked" } else { "reissued" }
            );
            // As generous as the wait for the fleet above: this asserts that no token is left
            // behind, not how fast (10 s ran out once with two benches and a build beside it).
            wait_for(&what, Duration::from_secs(60), || async {
                all_in_state(!on).await.then_some(())
            })
            .await;
        }
    }
}

/// Deleting many grants at once is normal operation: every token is revoked, and the log has no
/// warning in it (nor colour codes: it is a file, not a terminal).
#[tokio::test]
async fn deleting_many_grants_at_once_revokes_them_all_quietly() {
    let f = Fixture::start("quiet", &[]).await;
    f.apply(AGENTS).await;
    let names: Vec<String> = (0..30).map(|i| format!("g{i}")).collect();
    for name in &names {
        f.apply(&notifier_grant(name, "5m")).await;
    }
    let mut ids = Vec::new();
    for name in &names {
        ids.push(token_id(&f.wait_ready(name, "True", None).await));
    }
    let deletes = names.iter().map(|name| {
        let grants = f.grants();
        let name = name.clone();
        async move {
            grants
                .delete(&name, &DeleteParams::default())
                .await
                .unwrap()
        }
    });
    futures::future::join_all(deletes).await;
    for name in &names {
        f.wait_grant_gone(name, &format!("{name} released"), Duration::from_secs(30))
            .await;
    }
    let revoked = f.revoked_ids().await;
    assert!(
        ids.iter().all(|id| revoked.contains(id)),
        "every token revoked"
    );
    let log = std::fs::read_to_string(&f.operator().log_path).unwrap();
    assert!(
        !log.contains(" WARN "),
        "warnings in a normal deletion:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
}

/// A grant deleted with its finalizer forced off (while the operator was down) leaves its Secret
/// behind; the orphan sweep proves the token in it is ours, revokes it and deletes the Secret.
#[tokio::test]
async fn a_token_secret_whose_grant_is_gone_is_revoked_and_deleted() {
    let mut f = Fixture::start("orphan", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("orphan", "5m")).await;
    let jti = token_id(&f.wait_ready("orphan", "True", None).await);

    f.operator.take().unwrap().stop();
    f.patch_grant("orphan", json!({"metadata": {"finalizers": null}}))
        .await;
    f.grants()
        .delete("orphan", &DeleteParams::default())
        .await
        .unwrap();
    f.wait_grant_gone(
        "orphan",
        "grant gone without its finalizer",
        Duration::from_secs(10),
    )
    .await;
    assert!(f.secrets().get_opt("orphan-token").await.unwrap().is_some());

    f.operator = Some(Operator::start(&f.ns, &f.operator_namespace(), &[]));
    wait_for(
        "the orphaned Secret deleted",
        Duration::from_secs(20),
        || async {
            f.secrets()
                .get_opt("orphan-token")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(f.revoked_ids().await.contains(&jti));
    let audit = f.operator().audit();
    assert!(
        audit.iter().any(|r| r["action"] == "Revoked"
            && r["reason"] == "Orphaned"
            && r["tokenIds"][0] == jti.as_str()),
        "{audit:?}"
    );
}

/// What verifiers trust is guarded: a key injected into the JWKS, a deleted status-list ConfigMap
/// and an edited keys Secret are all put back as the operator holds them. The list of revoked token
/// ids that earlier versions kept is deleted when the operator starts.
#[tokio::test]
async fn published_keys_and_revocations_are_restored_when_tampered_with() {
    let mut f = Fixture::start("guard", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("gone", "5m")).await;
    let jti = token_id(&f.wait_ready("gone", "True", None).await);
    f.delete_grant("gone").await;
    assert!(f.revoked_ids().await.contains(&jti));

    let cms: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    let original = cms
        .get("delegation-operator-jwks")
        .await
        .unwrap()
        .data
        .unwrap();
    let mut forged: serde_json::Value = serde_json::from_str(&original["jwks.json"]).unwrap();
    forged["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty": "EC", "crv": "P-256", "kid": "attacker", "x": "AAAA", "y": "AAAA"}));
    let injected = json!({"data": {"jwks.json": forged.to_string(), "extra.json": "{}"}});
    cms.patch(
        "delegation-operator-jwks",
        &PatchParams::default(),
        &Patch::Merge(&injected),
    )
    .await
    .unwrap();
    wait_for("the JWKS restored", Duration::from_secs(15), || async {
        let data = cms.get("delegation-operator-jwks").await.ok()?.data?;
        (data == original).then_some(())
    })
    .await;

    cms.delete("delegation-operator-status-lists", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the status lists restored, the token still revoked",
        Duration::from_secs(15),
        || async {
            let published = !f.status_list_tokens().await.is_empty();
            (published && f.revoked_ids().await.contains(&jti)).then_some(())
        },
    )
    .await;

    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    let keys = secrets
        .get("delegation-operator-signing-keys")
        .await
        .unwrap()
        .data
        .unwrap();
    let planted = json!({"data": {"planted.json": ByteString(b"{}".to_vec())}});
    secrets
        .patch(
            "delegation-operator-signing-keys",
            &PatchParams::default(),
            &Patch::Merge(&planted),
        )
        .await
        .unwrap();
    wait_for(
        "the keys Secret restored",
        Duration::from_secs(15),
        || async {
            let data = secrets
                .get("delegation-operator-signing-keys")
                .await
                .ok()?
                .data?;
            (data == keys).then_some(())
        },
    )
    .await;

    // A stale list of revoked ids, as an earlier version left it: gone once the operator restarts.
    let legacy = ConfigMap {
        metadata: ObjectMeta {
            name: Some("delegation-operator-revocations".into()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".into(),
                    "delegation-operator".into(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some([("revocations.json".into(), "[]".into())].into()),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &legacy).await.unwrap();
    f.operator.take().unwrap().stop();
    f.operator = Some(Operator::start(&f.ns, &f.operator_namespace(), &[]));
    wait_for(
        "the earlier versions' revocation list deleted",
        Duration::from_secs(30),
        || async {
            let gone = cms.get_opt("delegation-operator-revocations").await.ok()?;
            gone.is_none().then_some(())
        },
    )
    .await;
}

/// Revocation comes from what the operator minted, never from what a tenant writes: a Secret
/// annotation naming another grant's token id (with an unreadable expiry) and a forged status entry
/// revoke nothing; the other grant's token stays VALID.
#[tokio::test]
async fn tenant_written_annotations_and_status_cannot_revoke_or_bloat() {
    let f = Fixture::start("forged-ids", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("victim", "5m")).await;
    f.apply(&notifier_grant("attacker", "5m")).await;
    let victim = token_id(&f.wait_ready("victim", "True", None).await);
    let attacker = token_id(&f.wait_ready("attacker", "True", None).await);

    let forged = json!({"metadata": {"annotations": {
        "delegation.nhi.dev/token-id": victim,
        "delegation.nhi.dev/expires-at": "not-a-time",
    }}});
    f.secrets()
        .patch(
            "attacker-token",
            &PatchParams::default(),
            &Patch::Merge(&forged),
        )
        .await
        .unwrap();
    let huge = "a".repeat(100_000);
    let forged_status =
        json!({"status": {"previousToken": {"id": huge, "expiresAt": "2099-01-01T00:00:00Z"}}});
    f.grants()
        .patch_status(
            "attacker",
            &PatchParams::default(),
            &Patch::Merge(&forged_status),
        )
        .await
        .unwrap();

    f.delete_grant("attacker").await;
    let revoked = f.revoked_ids().await;
    assert!(
        revoked.contains(&attacker),
        "the attacker's own token is revoked"
    );
    assert!(
        !revoked.contains(&victim),
        "another grant's token id named in an annotation"
    );
    assert!(
        revoked.iter().all(|id| id.len() < 64),
        "no forged, oversized entry"
    );
    let claims = f
        .verified_claims("victim-token")
        .await
        .expect("the victim's token");
    assert_eq!(claims["jti"], victim.as_str());
}

/// The emergency key revocation is a command, not a hand edit: the key leaves the JWKS at once, a
/// fresh key signs, and every token it signed is replaced and revoked.
#[tokio::test]
async fn an_emergency_key_revocation_replaces_every_token_the_key_signed() {
    let f = Fixture::start("key-revoke", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("a", "5m")).await;
    f.apply(&notifier_grant("b", "5m")).await;
    let a = f
        .wait_ready("a", "True", None)
        .await
        .status
        .unwrap()
        .token
        .unwrap();
    let b = f
        .wait_ready("b", "True", None)
        .await
        .status
        .unwrap()
        .token
        .unwrap();
    let old_token = f.token_in("a-token").await.unwrap();
    assert_eq!(a.key_id, b.key_id);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
        // After `--`: a kid is base64url and may begin with `-` (one run in 64 did).
        .args([
            "keys",
            "revoke",
            "--operator-namespace",
            &f.operator_namespace(),
        ])
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(["--", &a.key_id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (name, old) in [("a", &a), ("b", &b)] {
        let fresh = wait_for(
            &format!("{name} reissued"),
            Duration::from_secs(20),
            || async {
                let t = f.grants().get(name).await.ok()?.status?.token?;
                (t.key_id != old.key_id).then_some(t)
            },
        )
        .await;
        assert_ne!(fresh.id, old.id);
    }
    let jwks = f.jwks().await;
    assert!(
        !jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == a.key_id.as_str()),
        "the revoked key left the JWKS"
    );
    assert!(
        signing::verify(&old_token, &jwks, "https://tickets.example.com", 0).is_err(),
        "a token the revoked key signed no longer verifies"
    );
    let revoked = f.revoked_ids().await;
    assert!(revoked.contains(&a.id) && revoked.contains(&b.id));
    assert!(
        f.verified_claims("a-token").await.is_some(),
        "the new token verifies"
    );
}

/// The `status` claim of the token in a Secret (verified against the JWKS).
async fn status_claim(f: &Fixture, secret: &str) -> serde_json::Value {
    let claims = f
        .verified_claims(secret)
        .await
        .expect("a token that verifies");
    claims["status"].clone()
}

/// Every token points into an IETF Token Status List the operator publishes and signs; the entry
/// is VALID while the grant holds it and INVALID once the grant is deleted.
#[tokio::test]
async fn every_token_has_a_status_list_entry_that_deletion_sets_invalid() {
    let f = Fixture::start("statuslist", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("listed", "5m")).await;
    f.wait_ready("listed", "True", None).await;
    let status = status_claim(&f, "listed-token").await;
    let uri = status["status_list"]["uri"].as_str().unwrap().to_owned();
    assert!(uri.starts_with("https://issuer.test/statuslists/"), "{uri}");
    assert!(status["status_list"]["idx"].as_u64().is_some(), "{status}");
    assert_eq!(f.published_status(&status).await, 0, "VALID while held");

    f.delete_grant("listed").await;
    // Set INVALID and published before the Secret went: nothing to wait for.
    assert_eq!(f.published_status(&status).await, 1, "INVALID once deleted");
}

/// A rotation keeps the previous token VALID; a token displaced while still valid, and the tokens a
/// grant change supersedes, read INVALID.
#[tokio::test]
async fn rotation_keeps_the_previous_token_valid_and_invalidates_displaced_and_superseded_ones() {
    let f = Fixture::start("statusrot", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&grant_yaml(
        "spin",
        user_root(),
        "notifier",
        "[tickets:read]",
        "6s",
        "  renewBefore: 2s\n",
    ))
    .await;
    // Renewed every 4 s (the floor: a quarter of the lifetime) while each token lives 16 s: the
    // first is displaced while still valid, with 8 s to spare on a loaded machine.
    f.apply(&grant_yaml(
        "busy",
        user_root(),
        "notifier",
        "[tickets:read]",
        "16s",
        "  renewBefore: 12s\n",
    ))
    .await;
    let busy_first = f.wait_ready("busy", "True", None).await;
    let busy_first_id = token_id(&busy_first);
    let busy_first_status = status_claim(&f, "busy-token").await;

    let first = token_id(&f.wait_ready("spin", "True", None).await);
    let first_status = status_claim(&f, "spin-token").await;
    let second = wait_for("a rotation of spin", Duration::from_secs(20), || async {
        let status = f.grants().get("spin").await.ok()?.status?;
        let current = status.token?.id;
        (current != first && status.previous_token?.id == first).then_some(current)
    })
    .await;
    let second_status = wait_for("the rotated token", Duration::from_secs(10), || async {
        let claims = f.verified_claims("spin-token").await?;
        (claims["jti"] == second.as_str()).then(|| claims["status"].clone())
    })
    .await;
    assert_ne!(
        second_status, first_status,
        "every token gets its own entry"
    );
    assert_eq!(
        f.published_status(&first_status).await,
        0,
        "the previous token stays VALID"
    );
    assert_eq!(f.published_status(&second_status).await, 0);

    // A change the token cannot survive supersedes it: the current token (and a still-valid
    // previous one) become INVALID.
    f.patch_grant(
        "spin",
        json!({"spec": {"authorizationDetails": [{"type": "ticket", "identifier": "9"}]}}),
    )
    .await;
    let superseding = wait_for("the superseding token", Duration::from_secs(20), || async {
        let g = f.grants().get("spin").await.ok()?;
        let status = g.status?;
        let token = status.token?;
        (token.claims_digest.is_some()
            && token.id != first
            && token.id != second
            && status.previous_token.is_none()
            && f.revoked_ids().await.contains(&second))
        .then_some(token.id)
    })
    .await;
    assert_eq!(
        f.published_status(&second_status).await,
        1,
        "the superseded token is INVALID"
    );
    let current = status_claim(&f, "spin-token").await;
    let claims = f.verified_claims("spin-token").await.unwrap();
    if claims["jti"] == superseding.as_str() {
        assert_eq!(f.published_status(&current).await, 0);
    }

    wait_for(
        "busy's first token displaced",
        Duration::from_secs(30),
        || async { f.revoked_ids().await.contains(&busy_first_id).then_some(()) },
    )
    .await;
    assert_eq!(
        f.published_status(&busy_first_status).await,
        1,
        "a token displaced while still valid is INVALID"
    );
}

/// The published status lists are guarded like the JWKS: an edited or deleted ConfigMap is put
/// back as the operator holds it.
#[tokio::test]
async fn the_published_status_lists_are_restored_when_tampered_with() {
    let f = Fixture::start("statusguard", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("kept", "5m")).await;
    f.apply(&notifier_grant("gone", "5m")).await;
    f.wait_ready("kept", "True", None).await;
    f.wait_ready("gone", "True", None).await;
    let gone = status_claim(&f, "gone-token").await;
    f.delete_grant("gone").await;
    assert_eq!(f.published_status(&gone).await, 1);
    let original = f.status_list_tokens().await;
    assert!(!original.is_empty());

    // A list reset to all-VALID (here: another list's token under its key) and an extra key.
    let cms: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    let key = original.keys().next().unwrap().clone();
    let forged = json!({"data": {key.clone(): "e30.e30.", "extra.jwt": "e30.e30."}});
    cms.patch(
        "delegation-operator-status-lists",
        &PatchParams::default(),
        &Patch::Merge(&forged),
    )
    .await
    .unwrap();
    wait_for(
        "the status lists restored after an edit",
        Duration::from_secs(15),
        || async { (f.status_list_tokens().await == original).then_some(()) },
    )
    .await;

    cms.delete("delegation-operator-status-lists", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the status lists restored after a deletion",
        Duration::from_secs(15),
        || async { (f.status_list_tokens().await == original).then_some(()) },
    )
    .await;
    assert_eq!(f.published_status(&gone).await, 1);
}

/// The operator's own record behind the status lists — the state Secret and the shard Secrets of
/// minted tokens — is guarded too: an edit that would erase a revocation or a record is undone,
/// while the operator's own writes of them (every issuance) are left alone.
#[tokio::test]
async fn the_status_list_state_secrets_are_restored_when_tampered_with() {
    let f = Fixture::start("stateguard", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("kept", "5m")).await;
    f.apply(&notifier_grant("gone", "5m")).await;
    f.wait_ready("kept", "True", None).await;
    f.wait_ready("gone", "True", None).await;
    f.delete_grant("gone").await;
    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    let data_of = |name: String| {
        let secrets = secrets.clone();
        async move { secrets.get(&name).await.unwrap().data.unwrap_or_default() }
    };
    let state = "delegation-operator-status-lists".to_owned();
    let shards = secrets
        .list(&ListParams::default().labels("delegation.nhi.dev/status-list-shard"))
        .await
        .unwrap();
    let shard = shards
        .items
        .iter()
        .find(|s| {
            s.data
                .as_ref()
                .and_then(|d| d.get("tokens.json"))
                .is_some_and(|t| t.0.len() > 2)
        })
        .expect("a shard holds the kept grant's record")
        .name_any();
    let state_before = data_of(state.clone()).await;
    let shard_before = data_of(shard.clone()).await;

    // An attacker with `update secrets` in the operator namespace empties both.
    let erased = json!({"data": {"state.json": ByteString(b"{}".to_vec()), "tokens.json": ByteString(b"{}".to_vec())}});
    for name in [&state, &shard] {
        secrets
            .patch(name, &PatchParams::default(), &Patch::Merge(&erased))
            .await
            .unwrap();
    }
    wait_for(
        "the state and shard Secrets restored",
        Duration::from_secs(15),
        || async {
            (data_of(state.clone()).await == state_before
                && data_of(shard.clone()).await == shard_before)
                .then_some(())
        },
    )
    .await;

    // The operator's own writes go on as before, and are not "restored" over.
    f.apply(&notifier_grant("later", "5m")).await;
    f.wait_ready("later", "True", None).await;
    let later = status_claim(&f, "later-token").await;
    assert_eq!(
        f.published_status(&later).await,
        0,
        "the new token is VALID"
    );
}

/// An independent decoder (Python's standard library) reads the published list the same way: the
/// revoked token's index is 1, the kept token's 0.
#[tokio::test]
async fn an_independent_decoder_agrees_with_the_published_status_list() {
    let f = Fixture::start("statuspy", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("stays", "5m")).await;
    f.apply(&notifier_grant("revoked", "5m")).await;
    f.wait_ready("stays", "True", None).await;
    f.wait_ready("revoked", "True", None).await;
    let stays = status_claim(&f, "stays-token").await;
    let revoked = status_claim(&f, "revoked-token").await;
    f.delete_grant("revoked").await;

    let uri = revoked["status_list"]["uri"].as_str().unwrap();
    let idx = revoked["status_list"]["idx"].as_u64().unwrap() as usize;
    let (token, _) = f.status_list_token(uri).await.expect("a published list");
    let mut indices = vec![idx];
    if stays["status_list"]["uri"] == uri {
        indices.push(stays["status_list"]["idx"].as_u64().unwrap() as usize);
    }
    let lines = python_decode_status_list(&token, &indices);
    let meta: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(meta["typ"], "statuslist+jwt");
    assert_eq!(meta["sub"], uri);
    assert_eq!(meta["bits"], 2);
    assert_eq!(lines[1], "1", "python reads the revoked index as INVALID");
    assert_eq!(
        f.published_status(&revoked).await,
        1,
        "as the Rust reader does"
    );
    if indices.len() == 2 {
        assert_eq!(lines[2], "0", "and the kept one as VALID");
    }
    assert_eq!(f.published_status(&stays).await, 0);
}

/// The status-list indices a revocation touches come from the operator's own record of what it
/// minted for that grant, never from what a tenant writes: a grant whose status and Secret name
/// another grant's token (with a plausible expiry) invalidates only its own entry.
#[tokio::test]
async fn tenant_written_ids_cannot_invalidate_another_grants_status_entry() {
    let f = Fixture::start("statusforge", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("victim", "5m")).await;
    f.apply(&notifier_grant("attacker", "5m")).await;
    let victim = f.wait_ready("victim", "True", None).await;
    f.wait_ready("attacker", "True", None).await;
    let victim_status = status_claim(&f, "victim-token").await;
    let attacker_status = status_claim(&f, "attacker-token").await;
    let victim_token = victim.status.unwrap().token.unwrap();

    let forged =
        json!({"metadata": {"annotations": {"delegation.nhi.dev/token-id": victim_token.id}}});
    f.secrets()
        .patch(
            "attacker-token",
            &PatchParams::default(),
            &Patch::Merge(&forged),
        )
        .await
        .unwrap();
    let forged_status = json!({"status": {"previousToken": {
        "id": victim_token.id,
        "expiresAt": victim_token.expires_at,
    }}});
    f.grants()
        .patch_status(
            "attacker",
            &PatchParams::default(),
            &Patch::Merge(&forged_status),
        )
        .await
        .unwrap();
    f.delete_grant("attacker").await;
    assert_eq!(f.published_status(&attacker_status).await, 1);
    assert_eq!(
        f.published_status(&victim_status).await,
        0,
        "another grant's entry is untouched"
    );
    assert!(
        !f.revoked_ids().await.contains(&victim_token.id),
        "another grant's token id copied into a status is not revoked"
    );
}

/// What the operator minted is persisted with the lists: after a restart, deleting a grant still
/// invalidates its token's entry, read from the operator's own state (not from the tenant's
/// Secret), in the same list under the same uri.
#[tokio::test]
async fn a_restarted_operator_still_invalidates_the_entries_it_handed_out() {
    let mut f = Fixture::start("statusrestart", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("before", "5m")).await;
    f.wait_ready("before", "True", None).await;
    let before = status_claim(&f, "before-token").await;
    let published = f.status_list_tokens().await;

    f.operator.take().unwrap().stop();
    f.operator = Some(Operator::start(&f.ns, &f.operator_namespace(), &[]));
    f.apply(&notifier_grant("after", "5m")).await;
    f.wait_ready("after", "True", None).await;
    let after = status_claim(&f, "after-token").await;
    assert_ne!(
        after, before,
        "no index is handed out twice across a restart"
    );
    if after["status_list"]["uri"] != before["status_list"]["uri"] {
        assert_eq!(
            f.status_list_tokens().await.len(),
            published.len() + 1,
            "a new list only when the new token's expiry falls in another bucket"
        );
    }

    f.delete_grant("before").await;
    assert_eq!(f.published_status(&before).await, 1);
    assert_eq!(f.published_status(&after).await, 0);
}

/// An unreadable status-list state stops the start: starting
/// over would forget which tokens are INVALID.
#[tokio::test]
async fn the_operator_refuses_to_start_with_an_unreadable_status_list_state() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "statusbad").await;
    let op_ns = operator_namespace_for(&ns);
    create_namespace(&client, &op_ns).await;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("delegation-operator-status-lists".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "state.json".to_owned(),
            ByteString(b"{\"not\": \"a state\"}".to_vec()),
        )])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &op_ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let (status, log) = Operator::start(&ns, &op_ns, &[]).wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        log.contains("delegation-operator-status-lists") && log.contains("refusing to start"),
        "{log}"
    );
}

/// A look-alike Secret wrapping another grant's token (any token ever minted for it) with an owner
/// reference to that grant's uid does not make the orphan sweep revoke the victim's live tokens.
#[tokio::test]
async fn a_look_alike_orphan_cannot_revoke_another_grants_tokens() {
    let f = Fixture::start("lookalike", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("victim", "5m")).await;
    let victim = f.wait_ready("victim", "True", None).await;
    let uid = victim.metadata.uid.clone().unwrap();
    let jti = token_id(&victim);
    let token = f.token_in("victim-token").await.unwrap();
    let status = status_claim(&f, "victim-token").await;
    let lookalike = Secret {
        metadata: ObjectMeta {
            name: Some("lookalike".into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "delegation-operator".to_owned(),
            )])),
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "delegation.nhi.dev/v1alpha1".into(),
                    kind: "DelegationGrant".into(),
                    name: "gone-long-ago".into(),
                    uid: uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: None,
                },
            ]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "token".to_owned(),
            ByteString(token.into_bytes()),
        )])),
        ..Default::default()
    };
    f.secrets()
        .create(&PostParams::default(), &lookalike)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !f.revoked_ids().await.contains(&jti),
        "the victim's token is not revoked"
    );
    assert_eq!(
        f.published_status(&status).await,
        0,
        "nor its status-list entry"
    );
    assert!(
        f.secrets().get_opt("lookalike").await.unwrap().is_some(),
        "nor the Secret touched"
    );
    assert_eq!(token_id(&f.wait_ready("victim", "True", None).await), jti);
}

/// A grant whose Secret lost its label (out of the operator's cache) and whose finalizer was forced
/// off is still revoked when it is deleted: from the operator's own record of what it minted.
#[tokio::test]
async fn a_grant_deleted_around_the_operator_is_still_revoked_from_its_record() {
    let f = Fixture::start("unlabelled", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&notifier_grant("sly", "5m")).await;
    let jti = token_id(&f.wait_ready("sly", "True", None).await);
    let status = status_claim(&f, "sly-token").await;
    let unlabel = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null}}});
    f.secrets()
        .patch(
            "sly-token",
            &PatchParams::default(),
            &Patch::Merge(&unlabel),
        )
        .await
        .unwrap();
    f.patch_grant("sly", json!({"metadata": {"finalizers": null}}))
        .await;
    f.grants()
        .delete("sly", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the token revoked from the record",
        Duration::from_secs(15),
        || async {
            (f.revoked_ids().await.contains(&jti) && f.published_status(&status).await == 1)
                .then_some(())
        },
    )
    .await;
}

/// A repeated Event on one object is one Event whose `series` counts the repeats (client-go's
/// aggregation), not one Event per occurrence: a grant refused, then refused again for another
/// violation, shows a single `Warning Denied` Event with `series.count` 2. Only the series is
/// patched: the Event keeps its first note.
#[tokio::test]
async fn a_repeated_event_is_one_event_with_a_series() {
    let f = Fixture::start("series", &[]).await;
    f.apply(AGENTS).await;
    // The notifier may not write tickets.
    f.apply(&grant_yaml(
        "twice",
        user_root(),
        "notifier",
        "[tickets:write]",
        "5m",
        "",
    ))
    .await;
    let first = f
        .wait_ready("twice", "False", Some("DeniedScopeNotAllowed"))
        .await;
    let denied = || async {
        f.events_of("twice")
            .await
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Denied"))
            .collect::<Vec<_>>()
    };
    wait_for(
        "the first Denied Event",
        Duration::from_secs(10),
        || async { (!denied().await.is_empty()).then_some(()) },
    )
    .await;

    // Within its scopes now, but longer than the notifier's maxTokenTTL (5m): refused again.
    f.patch_grant(
        "twice",
        json!({"spec": {"scopes": ["tickets:read"], "tokenTTL": "6m"}}),
    )
    .await;
    f.wait_ready("twice", "False", Some("DeniedTTLTooLong"))
        .await;
    let denied = wait_for(
        "the Denied Event's series.count to reach 2",
        Duration::from_secs(15),
        || async {
            let denied = denied().await;
            denied
                .iter()
                .any(|e| e.series.as_ref().is_some_and(|s| s.count >= 2))
                .then_some(denied)
        },
    )
    .await;
    let names: Vec<_> = denied.iter().map(|e| e.name_any()).collect();
    assert_eq!(denied.len(), 1, "one Event for both refusals: {names:?}");
    let event = &denied[0];
    let series = event.series.as_ref().unwrap();
    assert!(
        series.last_observed_time.0 > event.event_time.as_ref().unwrap().0,
        "the series was observed after the Event was created"
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.action.as_deref(), Some("Denied"));
    assert_eq!(
        event.reporting_controller.as_deref(),
        Some("delegation-operator")
    );
    let regarding = event.regarding.as_ref().unwrap();
    assert_eq!(regarding.uid, first.metadata.uid);
    assert_eq!(regarding.kind.as_deref(), Some("DelegationGrant"));
    let note = event.note.as_deref().unwrap();
    assert!(
        note.starts_with("DeniedScopeNotAllowed: "),
        "the first note is kept: {note}"
    );
}

/// A status rewritten to look current cannot keep a token broader than the grant allows. Whoever may
/// write the status subresource narrows nothing by it: whether the token still matches the grant is
/// decided from what the operator minted (remembered, or after a restart read from the Secret and
/// verified), never from the status.
#[tokio::test]
async fn a_forged_status_cannot_keep_a_broader_token_than_the_grant_allows() {
    let mut f = Fixture::start("forged", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&grant_yaml(
        "wide",
        user_root(),
        "orchestrator",
        "[tickets:read, tickets:write]",
        "10m",
        "",
    ))
    .await;
    let wide = f.wait_ready("wide", "True", Some("Issued")).await;
    let first = token_id(&wide);
    let claims = f.verified_claims("wide-token").await.unwrap();
    assert_eq!(claims["scope"], "tickets:read tickets:write");

    // With the operator down, the grant is narrowed and its status rewritten to describe the
    // narrower token the operator would mint: chain, effective scopes, everything but the token.
    f.operator.take().unwrap().stop();
    f.patch_grant("wide", json!({"spec": {"scopes": ["tickets:read"]}}))
        .await;
    let narrowed = f.grants().get("wide").await.unwrap();
    let mut forged = serde_json::to_value(narrowed.status.clone().unwrap()).unwrap();
    forged["effectiveScopes"] = json!(["tickets:read"]);
    for link in forged["chain"].as_array_mut().unwrap() {
        if link.get("scopes").is_some() {
            link["scopes"] = json!(["tickets:read"]);
        }
    }
    forged["observedGeneration"] = json!(narrowed.metadata.generation);
    f.grants()
        .patch_status(
            "wide",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": forged})),
        )
        .await
        .unwrap();

    f.operator = Some(Operator::start(&f.ns, &f.operator_namespace(), &[]));
    let reissued = wait_for(
        "a token as narrow as the grant",
        Duration::from_secs(30),
        || async {
            let claims = f.verified_claims("wide-token").await?;
            (claims["scope"] == "tickets:read").then_some(claims)
        },
    )
    .await;
    assert_ne!(
        reissued["jti"],
        json!(first),
        "a new token, not the kept one"
    );
    assert!(
        f.revoked_ids().await.contains(&first),
        "the broader token is revoked, not kept as previous"
    );
}

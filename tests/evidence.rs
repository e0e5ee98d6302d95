//! The side doors of evidence, tried as an attacker would against the real apiserver: an edit by a
//! namespace editor who may not delegate, an approval of one's own edit, and a forged parent status.
//! Each yields a refusal or a token whose evidence is true.

mod support;

use std::time::Duration;

use delegation_operator::{
    api::{Decision, DelegationGrant},
    cli,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use support::*;

const GROUP: &str = "delegation.nhi.dev";

const AGENTS: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: triage}
spec:
  owner: {kind: Group, name: support}
  allowedScopes: [tickets:read, tickets:write]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
  delegation: {maxDepth: 1, allowedActors: [notifier]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: notifier}
spec:
  owner: {kind: Group, name: support}
  allowedScopes: [tickets:read, tickets:write]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: payer}
spec:
  owner: {kind: Group, name: finance}
  allowedScopes: [payments:execute]
  allowedAudiences: [https://payments.example.com]
  maxTokenTTL: 15m
  requireApproval: {}
  delegation: {maxDepth: 1, allowedActors: [clerk]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: clerk}
spec:
  owner: {kind: Group, name: finance}
  allowedScopes: [payments:execute]
  allowedAudiences: [https://payments.example.com]
  maxTokenTTL: 15m
"#;

fn grant(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
           "metadata": {"name": name}, "spec": spec})
}

fn tickets_for_alice(name: &str) -> serde_json::Value {
    grant(
        name,
        json!({"principal": {"kind": "User", "name": "alice@example.com"},
               "actorRef": {"name": "triage"}, "scopes": ["tickets:read"],
               "audience": "https://tickets.example.com", "tokenTTL": "10m"}),
    )
}

fn payment_for_alice(name: &str) -> serde_json::Value {
    grant(
        name,
        json!({"principal": {"kind": "User", "name": "alice@example.com"},
               "actorRef": {"name": "payer"}, "scopes": ["payments:execute"],
               "audience": "https://payments.example.com", "tokenTTL": "10m"}),
    )
}

/// Lets `user` speak for alice in this namespace.
async fn may_delegate_for_alice(f: &Fixture, role: &str, user: &str) {
    grant_role(
        &f.client,
        &f.ns,
        role,
        &[user_subject(user)],
        &[rule(
            GROUP,
            &["users"],
            &["delegate"],
            &["alice@example.com"],
        )],
    )
    .await;
}

async fn patch_as(
    client: &Client,
    ns: &str,
    name: &str,
    patch: serde_json::Value,
) -> Result<DelegationGrant, kube::Error> {
    Api::<DelegationGrant>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

fn refused_at_admission(result: Result<DelegationGrant, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 || status.code == 422 => status.message,
        other => panic!("expected a refusal at admission, got {other:?}"),
    }
}

fn requester(grant: &DelegationGrant) -> String {
    grant.spec.requester.as_ref().unwrap().username.clone()
}

/// Waits until the apiserver loaded the policies that treat an edit as a request: a dry-run widening
/// by `client`, who may not delegate for alice, is refused.
async fn wait_edits_checked(client: &Client, ns: &str, name: &str) {
    let api = Api::<DelegationGrant>::namespaced(client.clone(), ns);
    let patch = json!({"spec": {"scopes": ["tickets:read", "tickets:write"]}});
    wait_for(
        "edits to be checked at admission",
        Duration::from_secs(60),
        || async {
            let dry = PatchParams {
                dry_run: true,
                ..Default::default()
            };
            matches!(
                api.patch(name, &dry, &Patch::Merge(&patch)).await,
                Err(kube::Error::Api(s)) if s.code == 403
            )
            .then_some(())
        },
    )
    .await;
}

/// A namespace editor without `delegate` widens alice's grant, changes its TTL, and resumes it after
/// alice suspended it: each is a request by the editor, refused at admission with the missing
/// permission. Suspending is the kill switch anyone who may update the grant may pull; re-applying
/// the same spec is no request and stamps nothing. Once the editor may delegate for alice, the
/// widened token and the grant's evidence name the editor, not alice. (On the old code the widening
/// was admitted, and the new token said `requested_by: alice`.)
#[tokio::test]
async fn an_edit_is_a_request_by_whoever_makes_it() {
    let f = Fixture::start("edit-request", &[]).await;
    f.apply(AGENTS).await;
    f.tenants(&["alice@example.com", "mallory@example.com"])
        .await;
    let alice = client_as("alice@example.com", &[]).await;
    let mallory = client_as("mallory@example.com", &[]).await;
    create_as(&alice, &f.ns, tickets_for_alice("tickets"))
        .await
        .unwrap();
    let ready = f.wait_ready("tickets", "True", None).await;
    assert_eq!(requester(&ready), "alice@example.com");
    assert_eq!(
        ready.spec.authors.as_deref(),
        Some(&["alice@example.com".to_owned()][..])
    );
    let first_token = token_id(&ready);
    wait_edits_checked(&mallory, &f.ns, "tickets").await;

    for (what, patch) in [
        (
            "widening the scopes",
            json!({"spec": {"scopes": ["tickets:read", "tickets:write"]}}),
        ),
        ("changing the TTL", json!({"spec": {"tokenTTL": "15m"}})),
        (
            "changing the audience",
            json!({"spec": {"audience": "https://payments.example.com"}}),
        ),
        (
            "retargeting the Secret",
            json!({"spec": {"secretName": "mallorys-copy"}}),
        ),
    ] {
        let message = refused_at_admission(patch_as(&mallory, &f.ns, "tickets", patch).await);
        for words in [
            "mallory@example.com may not delegate for User alice@example.com",
            "\"delegate\" on \"users\"",
        ] {
            assert!(
                message.contains(words),
                "{what}: {words} missing: {message}"
            );
        }
    }
    // Nor can the stamps be written by hand.
    let forged = patch_as(
        &mallory,
        &f.ns,
        "tickets",
        json!({"spec": {"requester": {"username": "cfo@example.com"}}}),
    )
    .await;
    assert!(refused_at_admission(forged).contains("stamped"));
    let unchanged = f.grants().get("tickets").await.unwrap();
    assert_eq!(unchanged.metadata.generation, ready.metadata.generation);
    assert_eq!(token_id(&unchanged), first_token);

    // Anyone who may update the grant may stop it; the stamps stay alice's.
    patch_as(
        &mallory,
        &f.ns,
        "tickets",
        json!({"spec": {"suspended": true}}),
    )
    .await
    .expect("suspending is always allowed");
    let suspended = f.wait_ready("tickets", "False", Some("Suspended")).await;
    assert_eq!(requester(&suspended), "alice@example.com");
    assert!(f.revoked_ids().await.contains(&first_token));
    // Resuming is a request: refused for mallory, allowed for alice.
    let message = refused_at_admission(
        patch_as(
            &mallory,
            &f.ns,
            "tickets",
            json!({"spec": {"suspended": false}}),
        )
        .await,
    );
    assert!(message.contains("may not delegate"), "{message}");
    patch_as(
        &alice,
        &f.ns,
        "tickets",
        json!({"spec": {"suspended": false}}),
    )
    .await
    .unwrap();
    let resumed = f.wait_ready("tickets", "True", None).await;
    assert_eq!(requester(&resumed), "alice@example.com");

    // The same spec again (a re-apply by another identity) is no request: nothing is stamped.
    let same = patch_as(
        &mallory,
        &f.ns,
        "tickets",
        json!({"spec": {"scopes": ["tickets:read"], "tokenTTL": "10m"}}),
    )
    .await
    .expect("an unchanged spec is no request");
    assert_eq!(same.metadata.generation, resumed.metadata.generation);
    assert_eq!(requester(&same), "alice@example.com");

    // Allowed to speak for alice, mallory's widening is hers: the token and the evidence say so.
    may_delegate_for_alice(&f, "mallory-for-alice", "mallory@example.com").await;
    let widened = wait_for(
        "mallory's widening to be admitted",
        Duration::from_secs(60),
        || async {
            patch_as(
                &mallory,
                &f.ns,
                "tickets",
                json!({"spec": {"scopes": ["tickets:read", "tickets:write"]}}),
            )
            .await
            .ok()
        },
    )
    .await;
    assert_eq!(requester(&widened), "mallory@example.com");
    assert_eq!(
        widened.spec.authors.clone().unwrap(),
        ["alice@example.com", "mallory@example.com"]
    );
    let reissued = wait_for("the widened token", Duration::from_secs(30), || async {
        let g = f.grants().get("tickets").await.ok()?;
        let status = g.status.as_ref()?;
        let chain = status.chain.as_ref()?;
        (status.observed_generation == g.metadata.generation
            && chain.last()?.requested_by.as_deref() == Some("mallory@example.com"))
        .then_some(g)
    })
    .await;
    let claims = f.verified_claims("tickets-token").await.unwrap();
    assert_eq!(claims["scope"], "tickets:read tickets:write");
    assert_eq!(
        claims["delegation_chain"][0]["requested_by"],
        "mallory@example.com"
    );
    let line = f
        .operator()
        .audit()
        .into_iter()
        .rev()
        .find(|r| r["grant"] == "tickets" && r["action"] == "Rotated")
        .expect("an audit line for the widened token");
    assert_eq!(line["requester"], "mallory@example.com");
    assert_eq!(
        line["authors"],
        json!(["alice@example.com", "mallory@example.com"])
    );
    assert_eq!(line["tokenIds"][0], json!(token_id(&reissued)));
}

/// A hop's edit is checked by the operator (admission cannot read the parent): the editor of a hop
/// who may not extend its chain gets `DeniedNotAuthorized` naming her, and no new token. (On the old
/// code the edited hop was re-issued in the name of its creator.)
#[tokio::test]
async fn an_edit_of_a_hop_is_checked_against_its_editor() {
    let f = Fixture::start("edit-hop", &[]).await;
    f.apply(AGENTS).await;
    f.tenants(&["alice@example.com", "mallory@example.com"])
        .await;
    let alice = client_as("alice@example.com", &[]).await;
    let mallory = client_as("mallory@example.com", &[]).await;
    create_as(&alice, &f.ns, tickets_for_alice("root"))
        .await
        .unwrap();
    f.wait_ready("root", "True", None).await;
    // The admin may extend any chain.
    create_as(
        &f.client,
        &f.ns,
        grant(
            "hop",
            json!({"parentGrantRef": {"name": "root"}, "actorRef": {"name": "notifier"},
                   "scopes": ["tickets:read"], "audience": "https://tickets.example.com",
                   "tokenTTL": "5m"}),
        ),
    )
    .await
    .unwrap();
    let hop = f.wait_ready("hop", "True", None).await;
    let hop_token = token_id(&hop);
    wait_edits_checked(&mallory, &f.ns, "root").await;

    patch_as(&mallory, &f.ns, "hop", json!({"spec": {"tokenTTL": "6m"}}))
        .await
        .expect("admission cannot check a hop's edit; the operator does");
    let refused = f
        .wait_ready("hop", "False", Some("DeniedNotAuthorized"))
        .await;
    assert_eq!(requester(&refused), "mallory@example.com");
    let (_, message) = condition(&refused);
    assert!(
        message.contains("mallory@example.com") && message.contains("\"agentidentities\""),
        "{message}"
    );
    assert!(f.revoked_ids().await.contains(&hop_token));
    assert!(f.secrets().get_opt("hop-token").await.unwrap().is_none());
}

/// Approvals are compared with everyone who wrote a version of the spec: mallory edits alice's
/// payment (she may delegate for alice) and approves it; carol then touches it and mallory approves
/// again. Neither counts; only bob's does. (On the old code, approvals were compared with the creator
/// only, and mallory's first approval made the grant Ready.)
#[tokio::test]
async fn an_editor_may_not_approve_what_she_edited() {
    let f = Fixture::start("edit-approve", &[]).await;
    f.apply(AGENTS).await;
    let people = [
        "alice@example.com",
        "mallory@example.com",
        "carol@example.com",
        "bob@example.com",
    ];
    f.tenants(&people).await;
    may_delegate_for_alice(&f, "mallory-for-alice", "mallory@example.com").await;
    may_delegate_for_alice(&f, "carol-for-alice", "carol@example.com").await;
    let approvers: Vec<_> = people.iter().map(|p| user_subject(p)).collect();
    grant_role(
        &f.client,
        &f.ns,
        "approvers",
        &approvers,
        &[rule(GROUP, &["delegationgrants"], &["approve"], &["pay"])],
    )
    .await;
    let (alice, mallory, carol, bob) = (
        client_as("alice@example.com", &[]).await,
        client_as("mallory@example.com", &[]).await,
        client_as("carol@example.com", &[]).await,
        client_as("bob@example.com", &[]).await,
    );
    create_as(&alice, &f.ns, payment_for_alice("pay"))
        .await
        .unwrap();
    f.wait_ready("pay", "False", Some("ApprovalPending")).await;
    wait_edits_checked(&bob, &f.ns, "pay").await;

    patch_as(&mallory, &f.ns, "pay", json!({"spec": {"tokenTTL": "9m"}}))
        .await
        .unwrap();
    let edited = f.wait_ready("pay", "False", Some("ApprovalPending")).await;
    assert_eq!(requester(&edited), "mallory@example.com");
    cli::decide(mallory.clone(), &f.ns, "pay", Decision::Approve, None, None)
        .await
        .unwrap();
    let ignored = f.wait_message("pay", "own requester").await;
    assert_eq!(condition(&ignored).0, "ApprovalPending");

    patch_as(&carol, &f.ns, "pay", json!({"spec": {"tokenTTL": "8m"}}))
        .await
        .unwrap();
    let touched = f.wait_ready("pay", "False", Some("ApprovalPending")).await;
    assert_eq!(requester(&touched), "carol@example.com");
    assert_eq!(
        touched.spec.authors.clone().unwrap(),
        [
            "alice@example.com",
            "mallory@example.com",
            "carol@example.com"
        ]
    );
    cli::decide(mallory, &f.ns, "pay", Decision::Approve, None, None)
        .await
        .unwrap();
    let ignored = f.wait_message("pay", "spec.authors").await;
    assert_eq!(condition(&ignored).0, "ApprovalPending");
    assert!(f.secrets().get_opt("pay-token").await.unwrap().is_none());

    cli::decide(bob, &f.ns, "pay", Decision::Approve, None, None)
        .await
        .unwrap();
    let approved = f.wait_ready("pay", "True", None).await;
    let chain = approved.status.unwrap().chain.unwrap();
    assert_eq!(chain[1].requested_by.as_deref(), Some("carol@example.com"));
    assert_eq!(chain[1].approved_by.as_deref(), Some("bob@example.com"));
}

/// Someone allowed to write `delegationgrants/status` marks a parent that awaits approval Ready and
/// approved by the CFO, with a token for an hour. The hop below rests on what the operator minted for
/// the parent, so nothing is minted for it, not even for a moment. (On the old code the hop got
/// tokens carrying `approved_by: cfo@example.com`, each revoked a second later.)
#[tokio::test]
async fn a_forged_parent_status_mints_nothing() {
    let f = Fixture::start("forged-parent", &[]).await;
    f.apply(AGENTS).await;
    f.tenants(&["alice@example.com"]).await;
    let alice = client_as("alice@example.com", &[]).await;
    create_as(&alice, &f.ns, payment_for_alice("pay"))
        .await
        .unwrap();
    let pending = f.wait_ready("pay", "False", Some("ApprovalPending")).await;
    let hop = |name: &str| {
        grant(
            name,
            json!({"parentGrantRef": {"name": "pay"}, "actorRef": {"name": "clerk"},
                   "scopes": ["payments:execute"], "audience": "https://payments.example.com",
                   "tokenTTL": "5m"}),
        )
    };
    create_as(&f.client, &f.ns, hop("clerk")).await.unwrap();
    f.wait_ready("clerk", "False", Some("ParentNotReady")).await;

    let writer = "status-writer@example.com";
    grant_role(
        &f.client,
        &f.ns,
        "status-writer",
        &[user_subject(writer)],
        &[rule(
            GROUP,
            &["delegationgrants/status"],
            &["get", "patch", "update"],
            &[],
        )],
    )
    .await;
    let forger = client_as(writer, &[]).await;
    let generation = pending.metadata.generation.unwrap();
    let now = k8s_openapi::jiff::Timestamp::now();
    let in_an_hour = now
        .checked_add(k8s_openapi::jiff::SignedDuration::from_hours(1))
        .unwrap();
    let forged_status = json!({"status": {
        "observedGeneration": generation,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Issued",
                        "message": "approved", "observedGeneration": generation,
                        "lastTransitionTime": now.to_string()}],
        "approval": {"state": "Approved", "generation": generation,
                     "approval": "forged", "approver": "cfo@example.com"},
        "token": {"id": "forged", "keyID": "forged", "issuedAt": now.to_string(),
                  "expiresAt": in_an_hour.to_string(), "renewalTime": in_an_hour.to_string()}}});
    let api = Api::<DelegationGrant>::namespaced(forger, &f.ns);
    wait_for(
        "the status writer's RoleBinding",
        Duration::from_secs(60),
        || async {
            match api
                .patch_status(
                    "pay",
                    &PatchParams::default(),
                    &Patch::Merge(&forged_status),
                )
                .await
            {
                Ok(patched) => Some(patched),
                // Until the RoleBinding is in force.
                Err(kube::Error::Api(s)) if s.code == 403 => None,
                Err(e) => panic!("the forged status must be accepted by the apiserver: {e}"),
            }
        },
    )
    .await;
    // A hop created after the forgery is reconciled after the operator saw it (one watch, in order).
    create_as(&f.client, &f.ns, hop("clerk-later"))
        .await
        .unwrap();
    f.wait_ready("clerk-later", "False", Some("ParentNotReady"))
        .await;
    f.wait_ready("pay", "False", Some("ApprovalPending")).await;
    let clerk = f.wait_ready("clerk", "False", Some("ParentNotReady")).await;
    assert!(clerk.status.unwrap().token.is_none());
    for name in ["clerk", "clerk-later"] {
        assert!(
            f.secrets()
                .get_opt(&format!("{name}-token"))
                .await
                .unwrap()
                .is_none()
        );
    }
    let minted: Vec<_> = f
        .operator()
        .audit()
        .into_iter()
        .filter(|r| matches!(r["action"].as_str(), Some("Issued" | "Rotated")))
        .collect();
    assert!(
        minted.is_empty(),
        "no token for anyone: {minted:?} (cfo@example.com approved nothing)"
    );
}

/// A self-grant is re-checked like any other: once alice may no longer ask for grants here (her
/// RoleBinding is gone: she left the team), her grant ends at the next check. (On the old code a
/// self-grant was never re-checked and kept renewing.)
#[tokio::test]
async fn a_self_grant_ends_when_its_person_may_no_longer_ask() {
    let f = Fixture::start("self-recheck", &["--authority-recheck-period", "2s"]).await;
    f.apply(AGENTS).await;
    f.tenants(&["alice@example.com"]).await;
    let alice = client_as("alice@example.com", &[]).await;
    create_as(&alice, &f.ns, tickets_for_alice("mine"))
        .await
        .unwrap();
    let token = token_id(&f.wait_ready("mine", "True", None).await);

    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(f.client.clone(), &f.ns)
        .delete("tenants", &Default::default())
        .await
        .unwrap();
    wait_denied(
        &f.client,
        &f.ns,
        &user_subject("alice@example.com"),
        &rule(GROUP, &["delegationgrants"], &["create"], &[]),
    )
    .await;
    let ended = f
        .wait_ready("mine", "False", Some("DeniedNotAuthorized"))
        .await;
    let (_, message) = condition(&ended);
    for words in [
        "alice@example.com",
        "no longer",
        "\"create\" on \"delegationgrants\"",
    ] {
        assert!(message.contains(words), "{words} missing from {message}");
    }
    assert!(f.revoked_ids().await.contains(&token));
}

/// A grant a ServiceAccount asked for from its pod (lending its own authority) ends when that
/// ServiceAccount is deleted, and stays ended when one of the same name is created again: the new one
/// is not the one that asked. (On the old code it kept renewing.)
#[tokio::test]
async fn a_service_accounts_grant_ends_when_it_is_deleted_or_re_created() {
    let f = Fixture::start("sa-recheck", &["--authority-recheck-period", "2s"]).await;
    wait_service_account_self_grants_need_a_pod(&f.client).await;
    f.apply(AGENTS).await;
    let robot = format!("system:serviceaccount:{}:robot", f.ns);
    f.tenants(&[&robot]).await;
    let (robot_pod, _pod) = pod_bound_client(&f.client, &f.ns, "robot").await;
    create_as(
        &robot_pod,
        &f.ns,
        grant(
            "robot-itself",
            json!({"principal": {"kind": "ServiceAccount", "name": robot},
                   "actorRef": {"name": "triage"}, "scopes": ["tickets:read"],
                   "audience": "https://tickets.example.com", "tokenTTL": "10m"}),
        ),
    )
    .await
    .unwrap();
    let ready = f.wait_ready("robot-itself", "True", None).await;
    let stamped_uid = ready.spec.requester.as_ref().unwrap().uid.clone();
    assert!(
        stamped_uid.as_deref().is_some_and(|u| !u.is_empty()),
        "a ServiceAccount token carries its uid"
    );
    let token = token_id(&ready);

    let accounts =
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(f.client.clone(), &f.ns);
    accounts.delete("robot", &Default::default()).await.unwrap();
    ensure_service_account(&f.client, &f.ns, "robot").await;
    let ended = f
        .wait_ready("robot-itself", "False", Some("DeniedRequesterGone"))
        .await;
    let (_, message) = condition(&ended);
    assert!(message.contains(&robot), "{message}");
    assert!(f.revoked_ids().await.contains(&token));
    assert!(
        f.secrets()
            .get_opt("robot-itself-token")
            .await
            .unwrap()
            .is_none()
    );
}

/// `--max-grant-lifetime` bounds every grant from its creation: the token never outlives it, and past
/// it the grant is refused (`DeniedGrantLifetimeEnded`), naming the limit.
#[tokio::test]
async fn no_grant_outlives_the_longest_grant_lifetime() {
    let f = Fixture::start("lifetime", &["--max-grant-lifetime", "8s"]).await;
    f.apply(AGENTS).await;
    f.apply(&serde_yaml::to_string(&tickets_for_alice("short")).unwrap())
        .await;
    let ready = f.wait_ready("short", "True", None).await;
    let created = ready.metadata.creation_timestamp.clone().unwrap().0;
    let expires = ready
        .status
        .as_ref()
        .unwrap()
        .token
        .as_ref()
        .unwrap()
        .expires_at
        .0;
    assert!(
        expires.as_second() <= created.as_second() + 8,
        "the token ({expires}) outlives the grant's lifetime (created {created})"
    );
    let ended = wait_for("the grant to end", Duration::from_secs(30), || async {
        let g = f.grants().get("short").await.ok()?;
        (condition(&g).0 == "DeniedGrantLifetimeEnded").then_some(g)
    })
    .await;
    let (_, message) = condition(&ended);
    assert!(message.contains("--max-grant-lifetime"), "{message}");
    // The token expired with the grant: nothing is left to use.
    assert!(ended.status.unwrap().token.is_none());
    assert!(f.secrets().get_opt("short-token").await.unwrap().is_none());
}

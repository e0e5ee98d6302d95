//! Evidence of authority, end to end: grants created by distinct users (impersonated by the admin
//! client), stamped by the admission policies, checked by the operator with SubjectAccessReviews.

mod support;

use std::time::Duration;

use delegation_operator::{api::Decision, cli, delegation::authority};
use kube::{Api, ResourceExt, api::DeleteParams};
use serde_json::json;
use support::*;

const GROUP: &str = "delegation.nhi.dev";

const AGENTS: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: orchestrator}
spec:
  owner: {kind: Group, name: platform}
  serviceAccountName: orchestrator-sa
  allowedScopes: [tickets:read, tickets:write]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
  delegation: {maxDepth: 1, allowedActors: [summarizer]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: summarizer}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: payments}
spec:
  owner: {kind: Group, name: finance}
  allowedScopes: [payments:read, payments:execute]
  allowedAudiences: [https://payments.example.com]
  maxTokenTTL: 10m
  requireApproval: {scopes: [payments:execute]}
"#;

fn root_grant(name: &str, principal: &str, ttl: &str) -> serde_json::Value {
    json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": {"principal": {"kind": "User", "name": principal}, "actorRef": {"name": "orchestrator"},
                 "scopes": ["tickets:read"], "audience": "https://tickets.example.com", "tokenTTL": ttl},
    })
}

fn hop_grant(name: &str, parent: &str) -> serde_json::Value {
    json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": {"parentGrantRef": {"name": parent}, "actorRef": {"name": "summarizer"},
                 "scopes": ["tickets:read"], "audience": "https://tickets.example.com", "tokenTTL": "5m"},
    })
}

fn payment_grant(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": {"principal": {"kind": "User", "name": "alice@example.com"}, "actorRef": {"name": "payments"},
                 "scopes": ["payments:execute"], "audience": "https://payments.example.com", "tokenTTL": "5m"},
    })
}

#[tokio::test]
async fn a_user_delegates_for_herself_and_the_token_says_who_asked() {
    let f = Fixture::start("self", &[]).await;
    f.apply(AGENTS).await;
    f.tenants(&["alice@example.com"]).await;
    let alice = client_as("alice@example.com", &[]).await;
    create_as(
        &alice,
        &f.ns,
        root_grant("mine", "alice@example.com", "10m"),
    )
    .await
    .unwrap();

    let grant = f.wait_ready("mine", "True", None).await;
    assert_eq!(
        grant.spec.requester.as_ref().unwrap().username,
        "alice@example.com"
    );
    let chain = grant.status.as_ref().unwrap().chain.clone().unwrap();
    assert_eq!(chain[1].requested_by.as_deref(), Some("alice@example.com"));
    let claims = f
        .verified_claims("mine-token")
        .await
        .expect("a verifiable token");
    assert_eq!(
        claims["delegation_chain"],
        json!([{"delegator": {"kind": "User", "sub": "alice@example.com"},
                "delegate": format!("agent:{}/orchestrator", f.ns), "grant": "mine",
                "scope": "tickets:read", "requested_by": "alice@example.com"}])
    );
    let issued = f
        .operator()
        .audit()
        .into_iter()
        .find(|r| r["action"] == "Issued")
        .expect("an Issued audit line");
    assert_eq!(issued["requester"], "alice@example.com");
    assert_eq!(issued["principal"], "alice@example.com");
}

/// Authority is re-checked while a token lives: with a 2 s recheck period, removing bob's RoleBinding
/// revokes his grant's token (with its own reason) and the hop below it, long before its renewal.
#[tokio::test]
async fn a_delegate_permission_lets_bob_speak_for_alice_until_it_is_removed() {
    let f = Fixture::start("delegate", &["--authority-recheck-period", "2s"]).await;
    f.apply(AGENTS).await;
    f.tenants(&["bob@example.com"]).await;
    let bob = client_as("bob@example.com", &[]).await;

    let refused = create_as(
        &bob,
        &f.ns,
        root_grant("for-alice", "alice@example.com", "10m"),
    )
    .await;
    let message = match refused {
        Err(kube::Error::Api(status)) => status.message,
        other => panic!("bob without permission must be refused at admission: {other:?}"),
    };
    assert!(message.contains("delegate"), "{message}");

    grant_role(
        &f.client,
        &f.ns,
        "bob-for-alice",
        &[user_subject("bob@example.com")],
        &[rule(
            GROUP,
            &["users"],
            &["delegate"],
            &["alice@example.com"],
        )],
    )
    .await;
    create_as(
        &bob,
        &f.ns,
        root_grant("for-alice", "alice@example.com", "10m"),
    )
    .await
    .unwrap();
    // A hop below it (created by the admin, who may do anything).
    f.apply(&serde_yaml::to_string(&hop_grant("below", "for-alice")).unwrap())
        .await;
    let token = token_id(&f.wait_ready("for-alice", "True", None).await);
    f.wait_ready("below", "True", None).await;

    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(f.client.clone(), &f.ns)
        .delete("bob-for-alice", &DeleteParams::default())
        .await
        .unwrap();
    // The deletion reaches the authorizer a moment later; the operator's recheck asks it.
    wait_denied(
        &f.client,
        &f.ns,
        &user_subject("bob@example.com"),
        &rule(GROUP, &["users"], &["delegate"], &["alice@example.com"]),
    )
    .await;
    let grant = f
        .wait_ready("for-alice", "False", Some("DeniedNotAuthorized"))
        .await;
    let (_, message) = condition(&grant);
    for word in [
        "bob@example.com",
        "alice@example.com",
        "\"delegate\"",
        "\"users\"",
    ] {
        assert!(message.contains(word), "{word} missing from {message}");
    }
    f.wait_ready("below", "False", Some("ParentNotReady")).await;
    assert!(f.revoked_ids().await.contains(&token));
    assert!(
        f.secrets()
            .get_opt("for-alice-token")
            .await
            .unwrap()
            .is_none()
    );
    let revoked = f
        .operator()
        .audit()
        .into_iter()
        .find(|r| r["action"] == "Revoked" && r["grant"] == "for-alice")
        .expect("a Revoked audit line");
    assert_eq!(revoked["reason"], "DeniedNotAuthorized");
    assert_eq!(revoked["requester"], "bob@example.com");
    assert_eq!(revoked["principal"], "alice@example.com");
}

/// A hop is the parent actor's workload's to create (from a pod running as its ServiceAccount), or
/// needs `delegate` on that agent.
#[tokio::test]
async fn only_the_parent_actors_workload_may_extend_a_chain() {
    let f = Fixture::start("hop", &[]).await;
    f.apply(AGENTS).await;
    let workload = format!("system:serviceaccount:{}:orchestrator-sa", f.ns);
    f.tenants(&["alice@example.com", "mallory@example.com", &workload])
        .await;
    let alice = client_as("alice@example.com", &[]).await;
    create_as(
        &alice,
        &f.ns,
        root_grant("root", "alice@example.com", "10m"),
    )
    .await
    .unwrap();
    f.wait_ready("root", "True", None).await;

    let mallory = client_as("mallory@example.com", &[]).await;
    create_as(&mallory, &f.ns, hop_grant("by-mallory", "root"))
        .await
        .unwrap();
    let refused = f
        .wait_ready("by-mallory", "False", Some("DeniedNotAuthorized"))
        .await;
    let (_, message) = condition(&refused);
    assert!(
        message.contains("orchestrator") && message.contains("agentidentities"),
        "{message}"
    );
    assert!(
        f.secrets()
            .get_opt("by-mallory-token")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        f.event_reasons("by-mallory")
            .await
            .contains(&("Warning".into(), "Denied".into())),
        "a Warning Denied event"
    );

    // The workload: a pod running as the orchestrator's ServiceAccount, with the token bound to it.
    let (sa, pod) = pod_bound_client(&f.client, &f.ns, "orchestrator-sa").await;
    create_as(&sa, &f.ns, hop_grant("by-workload", "root"))
        .await
        .unwrap();
    let hop = f.wait_ready("by-workload", "True", None).await;
    let stamped = hop.spec.requester.clone().unwrap();
    assert_eq!(stamped.username, workload);
    assert_eq!(
        authority::bound_pod(&stamped),
        Some((
            pod.metadata.name.as_deref().unwrap(),
            pod.metadata.uid.as_deref().unwrap()
        )),
        "the requester's stamp names the pod: {stamped:?}"
    );
    // The refused grant's first token was planned (its status-list entry recorded) while its
    // finalizer was added; it was never minted, so the entry was given back: once a later issuance
    // wrote the records, the operator holds nothing for it, and the issued hop holds its token.
    assert_eq!(
        f.recorded_token_ids(&hop.uid().unwrap()).await,
        [token_id(&hop)]
    );
    assert_eq!(
        f.recorded_token_ids(&refused.uid().unwrap()).await,
        Vec::<String>::new(),
        "a refused grant holds no status-list record"
    );
    // ... and nothing was reported revoked for it: no token of it ever existed.
    let audit = f.operator().audit();
    let of_mallory: Vec<_> = audit
        .iter()
        .filter(|r| r["grant"] == "by-mallory")
        .collect();
    assert!(
        of_mallory.iter().any(|r| r["action"] == "Denied"),
        "{of_mallory:?}"
    );
    assert!(
        of_mallory
            .iter()
            .all(|r| r["action"] == "Denied" && r["tokenIds"] == json!([])),
        "{of_mallory:?}"
    );
    let chain = hop.status.unwrap().chain.unwrap();
    assert_eq!(chain[1].requested_by.as_deref(), Some("alice@example.com"));
    assert_eq!(chain[2].requested_by.as_deref(), Some(workload.as_str()));
    let claims = f.verified_claims("by-workload-token").await.unwrap();
    assert_eq!(
        claims["delegation_chain"][1]["requested_by"],
        workload.as_str()
    );
}

/// The attack, as an editor of the namespace would run it: the built-in `edit` role may impersonate
/// the namespace's ServiceAccounts. Refused a hop as herself, she creates the same hop as the parent
/// actor's ServiceAccount (`kubectl --as=system:serviceaccount:<ns>:orchestrator-sa`). Without a token
/// bound to one of its pods that is not the workload asking: the hop needs `delegate` on the agent,
/// which the ServiceAccount does not have. (On the old code it became Ready, its evidence saying that
/// the workload asked.)
#[tokio::test]
async fn an_editor_impersonating_the_workload_may_not_extend_its_chain() {
    let f = Fixture::start("hop-edit", &[]).await;
    f.apply(AGENTS).await;
    let workload = format!("system:serviceaccount:{}:orchestrator-sa", f.ns);
    // The editor: anyone bound to `edit` here; a ServiceAccount's token is her credential (the
    // test apiserver trusts no other kind of user but its admin's certificate).
    ensure_service_account(&f.client, &f.ns, "editor").await;
    let editor_user = format!("system:serviceaccount:{}:editor", f.ns);
    make_editor(&f.client, &f.ns, &service_account_subject(&f.ns, "editor")).await;
    // Editors and the workload may create grants (as the chart's roles aggregated into edit allow).
    f.tenants(&["alice@example.com", &workload, &editor_user])
        .await;
    let alice = client_as("alice@example.com", &[]).await;
    create_as(
        &alice,
        &f.ns,
        root_grant("root", "alice@example.com", "10m"),
    )
    .await
    .unwrap();
    f.wait_ready("root", "True", None).await;

    let token = request_service_account_token(&f.client, &f.ns, "editor", None).await;
    let editor = token_client_as(&token, None).await;
    create_as(&editor, &f.ns, hop_grant("by-editor", "root"))
        .await
        .unwrap();
    f.wait_ready("by-editor", "False", Some("DeniedNotAuthorized"))
        .await;

    let as_workload = token_client_as(&token, Some(&workload)).await;
    create_as(&as_workload, &f.ns, hop_grant("as-workload", "root"))
        .await
        .expect("edit may impersonate the namespace's ServiceAccounts");
    let refused = f
        .wait_ready("as-workload", "False", Some("DeniedNotAuthorized"))
        .await;
    let stamped = refused.spec.requester.clone().unwrap();
    assert_eq!(
        stamped.username, workload,
        "the apiserver saw the ServiceAccount"
    );
    assert_eq!(authority::bound_pod(&stamped), None, "{stamped:?}");
    let (_, message) = condition(&refused);
    for words in [
        workload.as_str(),
        "\"agentidentities\" named \"orchestrator\"",
        "presented no pod-bound ServiceAccount token",
        "impersonation",
    ] {
        assert!(message.contains(words), "{words} missing from {message}");
    }
    assert!(
        f.secrets()
            .get_opt("as-workload-token")
            .await
            .unwrap()
            .is_none()
    );
    assert!(refused.status.as_ref().unwrap().token.is_none());
    assert!(
        f.operator()
            .audit()
            .iter()
            .all(|r| !(r["action"] == "Issued" && r["grant"] == "as-workload")),
        "no token was issued for the impersonated hop"
    );
}

/// The same trick for a ServiceAccount principal: an editor impersonating a ServiceAccount lends its
/// authority "as itself". Refused at admission, naming the permission and the missing pod-bound token;
/// a pod running as the ServiceAccount may. (On the old code the impersonated grant was admitted and
/// became Ready.)
#[tokio::test]
async fn an_editor_impersonating_a_service_account_may_not_lend_its_authority() {
    let f = Fixture::start("self-edit", &[]).await;
    wait_service_account_self_grants_need_a_pod(&f.client).await;
    f.apply(AGENTS).await;
    let robot = format!("system:serviceaccount:{}:robot", f.ns);
    ensure_service_account(&f.client, &f.ns, "editor").await;
    make_editor(&f.client, &f.ns, &service_account_subject(&f.ns, "editor")).await;
    f.tenants(&[&robot]).await;
    let own_grant = || {
        json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
            "metadata": {"name": "robot-itself"},
            "spec": {"principal": {"kind": "ServiceAccount", "name": robot},
                     "actorRef": {"name": "orchestrator"}, "scopes": ["tickets:read"],
                     "audience": "https://tickets.example.com", "tokenTTL": "10m"},
        })
    };

    let token = request_service_account_token(&f.client, &f.ns, "editor", None).await;
    let as_robot = token_client_as(&token, Some(&robot)).await;
    let message = match create_as(&as_robot, &f.ns, own_grant()).await {
        Err(kube::Error::Api(status)) if status.code == 403 => status.message,
        other => panic!("an impersonated ServiceAccount must be refused at admission: {other:?}"),
    };
    for words in [
        format!("may not delegate for ServiceAccount {robot}"),
        format!("\"delegate\" on \"serviceaccounts\" named \"{robot}\""),
        "presented no pod-bound ServiceAccount token".into(),
        "impersonation".into(),
    ] {
        assert!(message.contains(&words), "{words} missing from {message}");
    }
    assert!(f.grants().get_opt("robot-itself").await.unwrap().is_none());

    // Its workload lends its own authority: a pod running as it, with the token bound to the pod.
    let (robot_pod, pod) = pod_bound_client(&f.client, &f.ns, "robot").await;
    create_as(&robot_pod, &f.ns, own_grant()).await.unwrap();
    let grant = f.wait_ready("robot-itself", "True", None).await;
    let stamped = grant.spec.requester.clone().unwrap();
    assert_eq!(stamped.username, robot);
    assert_eq!(
        authority::bound_pod(&stamped).map(|(name, _)| name),
        pod.metadata.name.as_deref()
    );
    let chain = grant.status.unwrap().chain.unwrap();
    assert_eq!(chain[1].requested_by.as_deref(), Some(robot.as_str()));
}

/// A parent deleted and re-created under the same name does not adopt its old children.
#[tokio::test]
async fn a_re_created_parent_does_not_adopt_old_hops() {
    let f = Fixture::start("pin", &[]).await;
    f.apply(AGENTS).await;
    f.apply(&serde_yaml::to_string(&root_grant("root", "alice@example.com", "10m")).unwrap())
        .await;
    f.apply(&serde_yaml::to_string(&hop_grant("child", "root")).unwrap())
        .await;
    let first_uid = f
        .wait_ready("root", "True", None)
        .await
        .metadata
        .uid
        .unwrap();
    let child = f.wait_ready("child", "True", None).await;
    assert_eq!(
        child.status.unwrap().parent_grant_uid.as_deref(),
        Some(first_uid.as_str())
    );

    f.delete_grant("root").await;
    // A parent that existed and was deleted: the hop waits for it (not a Denied* of its own). It
    // first reads the parent's revoked status ("does not hold a valid token"), then its absence.
    let waiting = wait_for(
        "the hop to see its parent gone",
        Duration::from_secs(20),
        || async {
            let child = f.grants().get("child").await.ok()?;
            condition(&child)
                .1
                .contains("no longer exists")
                .then_some(child)
        },
    )
    .await;
    assert_eq!(condition(&waiting).0, "ParentNotReady");
    assert!(
        !f.event_reasons("child")
            .await
            .contains(&("Warning".into(), "Denied".into())),
        "no Warning Denied event for a deleted parent"
    );
    f.apply(&serde_yaml::to_string(&root_grant("root", "alice@example.com", "10m")).unwrap())
        .await;
    f.wait_ready("root", "True", None).await;
    let child = f
        .wait_ready("child", "False", Some("DeniedParentReplaced"))
        .await;
    assert!(condition(&child).1.contains(&first_uid));
    assert!(f.secrets().get_opt("child-token").await.unwrap().is_none());
}

/// The seed's "after a human approver signs off": no token before an allowed approver (who is not the
/// requester) approves this generation; a spec change needs a new approval; a rejection holds.
#[tokio::test]
async fn a_grant_needing_approval_waits_for_an_allowed_approver_other_than_its_requester() {
    let f = Fixture::start("approval", &[]).await;
    f.apply(AGENTS).await;
    f.tenants(&["alice@example.com", "carol@example.com"]).await;
    let alice = client_as("alice@example.com", &[]).await;
    let carol = client_as("carol@example.com", &[]).await;
    create_as(&alice, &f.ns, payment_grant("pay"))
        .await
        .unwrap();

    let pending = f.wait_ready("pay", "False", Some("ApprovalPending")).await;
    let approval = pending.status.as_ref().unwrap().approval.clone().unwrap();
    assert_eq!(serde_json::to_value(approval.state).unwrap(), "Pending");
    assert!(
        condition(&pending).1.contains("approve pay"),
        "{}",
        condition(&pending).1
    );
    assert!(f.secrets().get_opt("pay-token").await.unwrap().is_none());
    wait_for(
        "an ApprovalPending event",
        Duration::from_secs(10),
        || async {
            f.event_reasons("pay")
                .await
                .contains(&("Normal".into(), "ApprovalPending".into()))
                .then_some(())
        },
    )
    .await;

    // Carol may not approve yet: refused at admission, naming the permission.
    let refused = cli::decide(carol.clone(), &f.ns, "pay", Decision::Approve, None, None)
        .await
        .unwrap_err();
    assert!(refused.contains("approve"), "{refused}");

    // Alice may approve grants here, but not her own.
    let approvers = [
        user_subject("alice@example.com"),
        user_subject("carol@example.com"),
    ];
    grant_role(
        &f.client,
        &f.ns,
        "approvers",
        &approvers,
        &[rule(GROUP, &["delegationgrants"], &["approve"], &["pay"])],
    )
    .await;
    cli::decide(alice.clone(), &f.ns, "pay", Decision::Approve, None, None)
        .await
        .unwrap();
    let still = f.wait_message("pay", "own requester").await;
    assert_eq!(condition(&still).0, "ApprovalPending");

    // Carol reviews the grant as it is now and approves exactly that generation.
    let approval_generation = still.metadata.generation.unwrap();
    cli::decide(
        carol.clone(),
        &f.ns,
        "pay",
        Decision::Approve,
        Some("invoice 42 checked".into()),
        Some(approval_generation),
    )
    .await
    .unwrap();
    let approved = f.wait_ready("pay", "True", None).await;
    let status = approved.status.clone().unwrap();
    assert_eq!(
        status.approval.as_ref().unwrap().approver.as_deref(),
        Some("carol@example.com")
    );
    assert_eq!(
        status.chain.unwrap()[1].approved_by.as_deref(),
        Some("carol@example.com")
    );
    let token = f.token_in("pay-token").await.unwrap();
    let claims = delegation_operator::signing::verify(
        &token,
        &f.jwks().await,
        "https://payments.example.com",
        0,
    )
    .unwrap();
    assert_eq!(
        claims["delegation_chain"][0]["approved_by"],
        "carol@example.com"
    );
    assert_eq!(
        claims["delegation_chain"][0]["requested_by"],
        "alice@example.com"
    );
    let first_token = status.token.unwrap().id;

    // A new generation needs a new approval: the approved token is revoked meanwhile.
    f.patch_grant("pay", json!({"spec": {"tokenTTL": "4m"}}))
        .await;
    f.wait_ready("pay", "False", Some("ApprovalPending")).await;
    assert!(f.revoked_ids().await.contains(&first_token));
    // An approval of the generation carol reviewed does not carry over to the changed grant.
    let stale = cli::decide(
        carol.clone(),
        &f.ns,
        "pay",
        Decision::Approve,
        None,
        Some(approval_generation),
    )
    .await
    .unwrap_err();
    assert!(
        stale.contains("changed since") && stale.contains("review it again"),
        "{stale}"
    );
    assert_eq!(
        condition(&f.grants().get("pay").await.unwrap()).0,
        "ApprovalPending",
        "no approval was recorded"
    );
    cli::decide(
        carol,
        &f.ns,
        "pay",
        Decision::Reject,
        Some("amount changed".into()),
        None,
    )
    .await
    .unwrap();
    let rejected = f.wait_ready("pay", "False", Some("ApprovalRejected")).await;
    assert!(condition(&rejected).1.contains("carol@example.com"));
    assert!(f.secrets().get_opt("pay-token").await.unwrap().is_none());
}

/// What an approval rests on counts at once: requiring approval on an agent whose grant is Ready
/// revokes its token until someone approves, and a rejection of the approved generation wins.
#[tokio::test]
async fn requiring_approval_later_or_rejecting_an_approved_grant_takes_effect_at_once() {
    let f = Fixture::start("approval-later", &[]).await;
    f.apply(AGENTS).await;
    f.tenants(&["alice@example.com", "carol@example.com"]).await;
    let alice = client_as("alice@example.com", &[]).await;
    create_as(
        &alice,
        &f.ns,
        root_grant("work", "alice@example.com", "10m"),
    )
    .await
    .unwrap();
    let token = token_id(&f.wait_ready("work", "True", None).await);

    f.patch_agent("orchestrator", json!({"spec": {"requireApproval": {}}}))
        .await;
    f.wait_ready("work", "False", Some("ApprovalPending")).await;
    assert!(f.revoked_ids().await.contains(&token));

    grant_role(
        &f.client,
        &f.ns,
        "approvers",
        &[user_subject("carol@example.com")],
        &[rule(GROUP, &["delegationgrants"], &["approve"], &["work"])],
    )
    .await;
    let carol = client_as("carol@example.com", &[]).await;
    cli::decide(carol.clone(), &f.ns, "work", Decision::Approve, None, None)
        .await
        .unwrap();
    f.wait_ready("work", "True", None).await;
    cli::decide(
        carol,
        &f.ns,
        "work",
        Decision::Reject,
        Some("second thoughts".into()),
        None,
    )
    .await
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        f.wait_ready("work", "False", Some("ApprovalRejected")),
    )
    .await
    .expect("the rejection counted at once, not after the recheck period");
    assert!(f.secrets().get_opt("work-token").await.unwrap().is_none());
}

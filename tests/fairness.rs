//! Fair queues against a real kube-apiserver: one namespace's burst of grants does not hold back
//! another namespace's revocations. The operator here watches every namespace, so it runs on a
//! control plane of this test's own (it would otherwise meet every other test's grants).
//!
//! Not timed assertions: the tests compare orders. Both namespaces' work goes through the same
//! operator at `--concurrency 1`, so a loaded machine slows both alike.

mod support;

use std::time::Duration;

use delegation_operator::{api::DelegationGrant, operator::grants::is_ready};
use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;
use support::{private_control_plane::PrivateControlPlane, *};

/// Grants arriving at once in the busy namespace.
const BURST: usize = 500;
/// Grants of the quiet namespace deleted, and as many suspended, once the burst waits.
const REVOKED: usize = 5;
/// Suspended grants (their tokens already revoked) that a tenant edits all at once.
const EDITED: usize = 300;

const AGENT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: worker}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
"#;

fn grant(name: &str) -> DelegationGrant {
    serde_json::from_value(json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": {"principal": {"kind": "User", "name": "alice@example.com"},
                 "actorRef": {"name": "worker"}, "scopes": ["tickets:read"],
                 "audience": "https://tickets.example.com", "tokenTTL": "10m"},
    }))
    .unwrap()
}

fn suspended_grant(name: &str) -> DelegationGrant {
    let mut grant = grant(name);
    grant.spec.suspended = Some(true);
    grant
}

/// How many grants of the namespace are not Ready (yet).
async fn not_ready(api: &Api<DelegationGrant>) -> usize {
    let grants = api.list(&ListParams::default()).await.unwrap().items;
    grants.iter().filter(|g| !is_ready(g)).count()
}

/// Whether the grant says, for its current generation, that it holds no token.
fn revoked(grant: &DelegationGrant) -> bool {
    let Some(status) = grant.status.as_ref() else {
        return false;
    };
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready");
    ready.is_some_and(|c| c.status == "False")
        && status.observed_generation == grant.metadata.generation
}

#[tokio::test]
async fn a_burst_in_one_namespace_does_not_hold_back_another_namespaces_revocations() {
    let cp = PrivateControlPlane::start("fairness");
    cp.install().await;
    let client = cp.client().await;
    let busy = Fixture {
        client: client.clone(),
        ns: fresh_namespace(&client, "fair-busy").await,
        operator: None,
    };
    let quiet = Fixture {
        client: client.clone(),
        ns: fresh_namespace(&client, "fair-quiet").await,
        operator: None,
    };
    let operator_ns = quiet.operator_namespace();
    create_namespace(&client, &operator_ns).await;
    let start =
        || Operator::start_watching_all(&cp.kubeconfig, &operator_ns, &["--concurrency", "1"]);

    // The quiet namespace's grants, Ready, each with its token's status list entry.
    quiet.apply(AGENT).await;
    busy.apply(AGENT).await;
    let first = start();
    let names: Vec<String> = (0..2 * REVOKED).map(|i| format!("quiet-{i}")).collect();
    for name in &names {
        quiet
            .grants()
            .create(&PostParams::default(), &grant(name))
            .await
            .unwrap();
    }
    let mut statuses = Vec::new();
    for name in &names {
        quiet.wait_ready(name, "True", Some("Issued")).await;
        let claims = quiet
            .verified_claims(&format!("{name}-token"))
            .await
            .expect("a verified token");
        statuses.push(claims["status"].clone());
    }

    // The burst arrives while the operator is away: once it is back, all of it waits in line.
    first.stop();
    let busy_grants = busy.grants();
    futures::stream::iter(0..BURST)
        .map(|i| {
            let api = busy_grants.clone();
            async move {
                api.create(&PostParams::default(), &grant(&format!("burst-{i:04}")))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let operator = start();
    wait_for(
        "the operator to work on the burst",
        Duration::from_secs(600),
        || async { (not_ready(&busy_grants).await < BURST).then_some(()) },
    )
    .await;
    let waiting = not_ready(&busy_grants).await;

    // Now the quiet namespace revokes: half its grants deleted, half suspended.
    let (deleted, suspended) = names.split_at(REVOKED);
    for name in deleted {
        quiet
            .grants()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for name in suspended {
        quiet
            .patch_grant(name, json!({"spec": {"suspended": true}}))
            .await;
    }
    // Done: each deleted grant gone (its finalizer let go only once its token is INVALID in the
    // published list), each suspended one Ready=False with its token INVALID there.
    let quiet_grants = quiet.grants();
    wait_for(
        "the quiet namespace's revocations",
        Duration::from_secs(600),
        || async {
            let left: Vec<DelegationGrant> =
                quiet_grants.list(&ListParams::default()).await.ok()?.items;
            let gone = deleted
                .iter()
                .all(|name| left.iter().all(|g| g.name_any() != *name));
            let revoked = suspended
                .iter()
                .all(|name| left.iter().any(|g| g.name_any() == *name && revoked(g)));
            (gone && revoked).then_some(())
        },
    )
    .await;
    let still_waiting = not_ready(&busy_grants).await;
    eprintln!(
        "{waiting} of the burst waited when the quiet namespace revoked; {still_waiting} still did \
         once its revocations were done"
    );
    for status in &statuses {
        assert_eq!(
            quiet.published_status(status).await,
            1,
            "every revoked token is INVALID in the published list"
        );
    }
    // Revocations take the first free slot, and the quiet namespace's other work (its grants looked
    // at again after the restart) alternates with the busy one's: all of it is done within a few
    // dozen of the busy namespace's reconciles. Served from one queue, it came at random places in
    // the burst's line.
    assert!(
        still_waiting * 4 >= waiting * 3,
        "the quiet namespace's {} revocations waited behind the burst: {} of the {waiting} grants \
         waiting when they were asked for were done first",
        2 * REVOKED,
        waiting - still_waiting
    );

    // And the burst is not starved the other way: all of it is issued.
    wait_for(
        "every grant of the burst Ready",
        Duration::from_secs(900),
        || async { (not_ready(&busy_grants).await == 0).then_some(()) },
    )
    .await;
    drop(operator);
}

/// A tenant edits hundreds of its suspended grants (tokens long revoked) at once, then another
/// namespace asks for a new grant: the edits wait their namespace's turn, and the new grant is
/// issued before most of them are looked at. Had a suspended grant without a token still counted as
/// a revocation, every edit would have gone first.
#[tokio::test]
async fn editing_suspended_grants_gains_no_priority_over_another_namespaces_issuance() {
    let cp = PrivateControlPlane::start("fairness-edits");
    cp.install().await;
    let client = cp.client().await;
    let editor = Fixture {
        client: client.clone(),
        ns: fresh_namespace(&client, "fair-editor").await,
        operator: None,
    };
    let other = Fixture {
        client: client.clone(),
        ns: fresh_namespace(&client, "fair-other").await,
        operator: None,
    };
    let operator_ns = other.operator_namespace();
    create_namespace(&client, &operator_ns).await;
    editor.apply(AGENT).await;
    other.apply(AGENT).await;
    // One replica: no Lease to lose on a machine too loaded to renew it in time.
    let operator = Operator::start_watching_all(
        &cp.kubeconfig,
        &operator_ns,
        &["--concurrency", "1", "--leader-election=false"],
    );

    // Suspended from the start: refused, never issued. The operator's record says so once it has
    // looked at each (Ready=False for its generation).
    let edited = editor.grants();
    let names: Vec<String> = (0..EDITED).map(|i| format!("suspended-{i:03}")).collect();
    futures::stream::iter(&names)
        .map(|name| {
            let api = edited.clone();
            async move {
                api.create(&PostParams::default(), &suspended_grant(name))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let acknowledged = || async {
        let grants = edited.list(&ListParams::default()).await.unwrap().items;
        grants.iter().filter(|g| revoked(g)).count()
    };
    wait_for(
        "every suspended grant refused",
        Duration::from_secs(600),
        || async { (acknowledged().await == EDITED).then_some(()) },
    )
    .await;

    // The edits: each a new generation the operator acknowledges once it has looked at it.
    futures::stream::iter(&names)
        .map(|name| editor.patch_grant(name, json!({"spec": {"tokenTTL": "11m"}})))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let waiting = EDITED - acknowledged().await;
    other
        .grants()
        .create(&PostParams::default(), &grant("wanted"))
        .await
        .unwrap();
    other
        .wait_ready_within("wanted", "True", Some("Issued"), Duration::from_secs(600))
        .await;
    let still_waiting = EDITED - acknowledged().await;
    eprintln!(
        "{waiting} of the {EDITED} edits waited when the other namespace's grant was created; \
         {still_waiting} still did once it was issued"
    );
    // Turns: the new grant goes after at most a few edits (its own reconciles alternate with them).
    // As revocations, all the edits went first.
    assert!(
        still_waiting * 2 >= waiting && waiting > 0,
        "the other namespace's grant waited behind the edits of suspended grants: {} of the \
         {waiting} edits waiting when it was created were done before it was issued",
        waiting - still_waiting
    );
    drop(operator);
}

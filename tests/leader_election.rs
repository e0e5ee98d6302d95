//! One writer: two operators on one control plane elect a leader through a Lease; only it writes, and
//! when it is killed (-9) the other takes over within the lease duration without re-minting tokens
//! that are still valid.

mod support;

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use support::*;

const AGENT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: notifier}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
"#;

fn grant(name: &str) -> String {
    format!(
        "apiVersion: delegation.nhi.dev/v1alpha1\nkind: DelegationGrant\nmetadata: {{name: {name}}}\nspec:\n  principal: {{kind: User, name: alice@example.com}}\n  actorRef: {{name: notifier}}\n  scopes: [tickets:read]\n  audience: https://tickets.example.com\n  tokenTTL: 10m\n"
    )
}

async fn token_ids(f: &Fixture, names: &[String]) -> BTreeMap<String, String> {
    let mut ids = BTreeMap::new();
    for name in names {
        let g = f.wait_ready(name, "True", None).await;
        ids.insert(name.clone(), g.status.unwrap().token.unwrap().id);
    }
    ids
}

fn issued_lines(operator: &Operator) -> usize {
    operator
        .audit()
        .iter()
        .filter(|r| r["action"] == "Issued" || r["action"] == "Rotated")
        .count()
}

#[tokio::test]
async fn only_the_leader_writes_and_a_standby_takes_over_after_a_kill() {
    let mut f = Fixture::start("leader", &[]).await;
    let standby = Operator::start(&f.ns, &f.operator_namespace(), &[]);
    f.apply(AGENT).await;
    let names: Vec<String> = (0..5).map(|i| format!("g{i}")).collect();
    for name in &names {
        f.apply(&grant(name)).await;
    }
    let before = token_ids(&f, &names).await;

    let leases: Api<Lease> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    let holder = leases
        .get("delegation-operator-leader")
        .await
        .expect("the leader Lease exists")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("the Lease has a holder");
    let first = f.operator.take().expect("the first operator");
    let (leader, standby) = if issued_lines(&first) > 0 {
        (first, standby)
    } else {
        (standby, first)
    };
    assert_eq!(
        issued_lines(&leader),
        names.len(),
        "the leader issued every token"
    );
    assert_eq!(issued_lines(&standby), 0, "the standby wrote nothing");
    assert!(
        leader.raw_output().contains(&holder),
        "the Lease names the writing replica ({holder})"
    );

    // kill -9: no release of the lease; the standby waits out its duration (3 s here) and takes over.
    leader.stop();
    f.apply(&grant("after-failover")).await;
    let taken_over = tokio::time::timeout(
        Duration::from_secs(20),
        f.wait_ready("after-failover", "True", None),
    )
    .await
    .expect("the standby took over and issued within 20 s");
    assert!(taken_over.status.unwrap().token.is_some());
    assert_eq!(
        token_ids(&f, &names).await,
        before,
        "the new leader re-minted no token that was still valid"
    );
    assert_eq!(
        issued_lines(&standby),
        1,
        "the new leader issued only the new grant's token"
    );
    let now_holder = leases
        .get("delegation-operator-leader")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap();
    assert_ne!(now_holder, holder);
    f.operator = Some(standby);
}

/// A replica that cannot renew its lease stops writing and exits, rather than write beside a new
/// leader: here its lease is taken from under it (as another replica would after a partition).
#[tokio::test]
async fn a_leader_that_loses_its_lease_stops() {
    let mut f = Fixture::start("fenced", &[]).await;
    f.apply(AGENT).await;
    f.apply(&grant("g")).await;
    f.wait_ready("g", "True", None).await;
    let leases: Api<Lease> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    leases
        .patch(
            "delegation-operator-leader",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"spec": {"holderIdentity": "someone-else"}}),
            ),
        )
        .await
        .unwrap();
    let operator = f.operator.take().unwrap();
    let (status, log) = operator.wait_exit(Duration::from_secs(20));
    assert!(log.contains("lost the leader lease"), "{log}");
    assert!(
        !status.success(),
        "it exits non-zero, to be restarted as a standby"
    );
}

//! One writer: two operators on one control plane elect a leader through a Lease; only it writes, and
//! when it is killed (-9) the other takes over within the lease duration without re-minting tokens
//! that are still valid.

mod support;

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{coordination::v1::Lease, core::v1::Secret},
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;
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

/// A leader that lost its lease but has not noticed yet (paused past it, say) must not undo what the
/// new leader wrote: before it overwrites a guarded object it asks who holds the Lease. Here it renews
/// only every 40 s; the lease is taken from it, and a status-list record shard is then rewritten as a
/// new leader would. The old leader's guard sees the change and does not put its own copy back.
#[tokio::test]
async fn a_leader_that_lost_its_lease_does_not_overwrite_the_new_leaders_writes() {
    let slow_renewal = [
        "--leader-election-lease-duration",
        "60s",
        "--leader-election-renew-deadline",
        "50s",
        "--leader-election-retry-period",
        "40s",
    ];
    let f = Fixture::start("overwrite", &slow_renewal).await;
    f.apply(AGENT).await;
    f.apply(&grant("g")).await;
    f.wait_ready("g", "True", None).await;

    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    let shard = secrets
        .list(&ListParams::default().labels("delegation.nhi.dev/status-list-shard"))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|s| {
            s.data
                .as_ref()
                .and_then(|d| d.get("tokens.json"))
                .is_some_and(|t| t.0 != b"{}")
        })
        .expect("the shard holding the grant's token record")
        .name_any();
    let leases: Api<Lease> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    leases
        .patch(
            "delegation-operator-leader",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "the-new-leader"}})),
        )
        .await
        .unwrap();
    let new_leaders = json!({"data": {"tokens.json": ByteString(b"{}".to_vec())}});
    secrets
        .patch(&shard, &PatchParams::default(), &Patch::Merge(&new_leaders))
        .await
        .unwrap();

    wait_for(
        "the old leader refusing to overwrite",
        Duration::from_secs(15),
        || async {
            let log = f.operator().raw_output();
            log.contains("not overwriting: the leader Lease delegation-operator-leader is held by the-new-leader")
                .then_some(())
        },
    )
    .await;
    let kept = secrets.get(&shard).await.unwrap().data.unwrap();
    assert_eq!(kept["tokens.json"].0, b"{}", "the new leader's write stays");
    assert!(
        !f.operator().raw_output().contains("lost the leader lease"),
        "the refusal came from the fence, before the old leader noticed its lost lease"
    );
}

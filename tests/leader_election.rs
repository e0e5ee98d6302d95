//! One writer: two operators on one control plane elect a leader through a Lease; only it writes, and
//! when it is killed (-9) the other takes over within the lease duration without re-minting tokens
//! that are still valid. Run as a ServiceAccount, the leader makes it the Lease's owner, so that the
//! Lease goes with it on uninstall.

mod support;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::SelfSubjectReview,
        coordination::v1::Lease,
        core::v1::{Secret, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;
use support::*;

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
    f.apply(NOTIFIER_AGENT).await;
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

    // kill -9: no release of the lease; the standby waits out its duration (8 s here) and takes over.
    leader.stop();
    f.apply(&grant("after-failover")).await;
    let taken_over = tokio::time::timeout(
        Duration::from_secs(60),
        f.wait_ready("after-failover", "True", None),
    )
    .await
    .expect("the standby took over and issued within 60 s");
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
    f.apply(NOTIFIER_AGENT).await;
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
    f.apply(NOTIFIER_AGENT).await;
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

const LEASE: &str = "delegation-operator-leader";

/// Timings as in a cluster: a candidate takes over a Lease only after seeing it unrenewed for 60 s,
/// so that leading sooner than that shows nothing held the new leader up.
const CLUSTER_TIMINGS: [&str; 6] = [
    "--leader-election-lease-duration",
    "60s",
    "--leader-election-renew-deadline",
    "10s",
    "--leader-election-retry-period",
    "1s",
];

/// `helm uninstall` deletes the operator's ServiceAccount while its leader may still run; the
/// leader cannot release the Lease then. Run as a ServiceAccount, the leader has made it the Lease's
/// owner, so the garbage collector deletes the Lease with it. This control plane has no garbage
/// collector: the test deletes the Lease as it would. A standby (the admin: no ServiceAccount, so no
/// owner) then leads at once instead of waiting out the lease, and the old leader, whose token no
/// longer authenticates, stops.
#[tokio::test]
async fn the_lease_is_owned_by_the_service_account_and_goes_with_it() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "lease-owner").await;
    let operator_ns = operator_namespace_for(&ns);
    create_namespace(&client, &operator_ns).await;
    let account = OperatorAccount::create(&client, &ns, &operator_ns, "operator").await;

    let mut args = vec!["--leader-election-identity", "as-service-account"];
    args.extend(CLUSTER_TIMINGS);
    let first = Operator::start_with_kubeconfig(&account.kubeconfig, &ns, &operator_ns, &args);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &operator_ns);
    let owned = wait_for(
        "the ServiceAccount's operator leading, with an owner on its Lease",
        Duration::from_secs(30),
        || async {
            let lease = leases.get_opt(LEASE).await.unwrap()?;
            (holder(&lease) == Some("as-service-account")
                && lease.metadata.owner_references.is_some())
            .then_some(lease)
        },
    )
    .await;
    let expected = OwnerReference {
        api_version: "v1".into(),
        kind: "ServiceAccount".into(),
        name: "operator".into(),
        uid: account.uid.clone(),
        block_owner_deletion: None,
        controller: None,
    };
    assert_eq!(
        owned.metadata.owner_references,
        Some(vec![expected.clone()]),
        "the Lease is owned by the operator's ServiceAccount, and by it alone"
    );
    // Renewals keep the owner, and it is never added twice.
    let renewed_from = renew_time(&owned);
    let renewed = wait_for("a renewal", Duration::from_secs(10), || async {
        let lease = leases.get(LEASE).await.unwrap();
        (renew_time(&lease) > renewed_from
            && lease.metadata.resource_version.as_deref()
                != owned.metadata.resource_version.as_deref())
        .then_some(lease)
    })
    .await;
    assert_eq!(renewed.metadata.owner_references, Some(vec![expected]));
    assert!(
        first
            .raw_output()
            .contains("the leader Lease is now owned by this replica's ServiceAccount"),
        "{}",
        first.raw_output()
    );

    // A standby run by the admin (no ServiceAccount) waits on the live Lease.
    let mut args = vec!["--leader-election-identity", "as-admin"];
    args.extend(CLUSTER_TIMINGS);
    let second = Operator::start(&ns, &operator_ns, &args);
    wait_for(
        "the standby in the election",
        Duration::from_secs(30),
        || async {
            second
                .raw_output()
                .contains("attempting to acquire leadership lease")
                .then_some(())
        },
    )
    .await;
    assert!(
        second.raw_output().contains(
            "the leader Lease gets no owner: this replica does not run as a ServiceAccount"
        ),
        "{}",
        second.raw_output()
    );
    assert_eq!(
        holder(&leases.get(LEASE).await.unwrap()),
        Some("as-service-account")
    );

    // Uninstall: the ServiceAccount goes; the leader's token stops authenticating (once the
    // apiserver's cache of it lapses, a few seconds), so it cannot write anything any more.
    Api::<ServiceAccount>::namespaced(client.clone(), &operator_ns)
        .delete("operator", &DeleteParams::default())
        .await
        .unwrap();
    let old_token = account.client().await;
    wait_for(
        "the deleted ServiceAccount's token refused",
        Duration::from_secs(60),
        || async {
            match Api::<SelfSubjectReview>::all(old_token.clone())
                .create(&PostParams::default(), &SelfSubjectReview::default())
                .await
            {
                Err(kube::Error::Api(s)) if s.code == 401 => Some(()),
                _ => None,
            }
        },
    )
    .await;
    // The garbage collector deletes what the ServiceAccount owned: the Lease.
    let deleted = Instant::now();
    leases
        .delete(LEASE, &DeleteParams::default())
        .await
        .unwrap();
    let taken = wait_for("the standby leading", Duration::from_secs(20), || async {
        let lease = leases.get_opt(LEASE).await.unwrap()?;
        (holder(&lease) == Some("as-admin")).then_some(lease)
    })
    .await;
    let waited = deleted.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "the standby led {waited:?} after the Lease went, well within the 60 s it would have waited \
         on the old Lease"
    );
    assert_eq!(
        taken.metadata.owner_references, None,
        "an operator not run as a ServiceAccount gives the Lease no owner"
    );

    // The old leader cannot renew (its token is refused): it gives up within its renew deadline.
    let (status, log) = first.wait_exit(Duration::from_secs(30));
    assert!(
        log.contains("failed to renew leadership lease") && log.contains("lost the leader lease"),
        "{log}"
    );
    assert!(!status.success(), "it exits non-zero");
    let lease = leases.get(LEASE).await.unwrap();
    assert_eq!(
        holder(&lease),
        Some("as-admin"),
        "the new leader still leads"
    );
    assert_eq!(lease.metadata.owner_references, None);
    wait_for(
        "the new leader running",
        Duration::from_secs(30),
        || async {
            second
                .raw_output()
                .contains("leading: loading keys and starting the controllers")
                .then_some(())
        },
    )
    .await;
    account.remove(&client).await;
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

fn renew_time(lease: &Lease) -> Option<k8s_openapi::jiff::Timestamp> {
    lease.spec.as_ref()?.renew_time.as_ref().map(|t| t.0)
}

/// A ServiceAccount in the operator namespace with the rights the chart gives the operator's (see
/// `charts/delegation-operator/templates/rbac.yaml`), and a kubeconfig with a token of it.
struct OperatorAccount {
    uid: String,
    kubeconfig: PathBuf,
    cluster_role: String,
}

impl OperatorAccount {
    async fn create(client: &Client, ns: &str, operator_ns: &str, name: &str) -> Self {
        let account = Api::<ServiceAccount>::namespaced(client.clone(), operator_ns)
            .create(
                &PostParams::default(),
                &ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let subject = service_account_subject(operator_ns, name);
        let watched = [
            rule(
                "delegation.nhi.dev",
                &["delegationgrants"],
                &["list", "watch", "patch"],
                &[],
            ),
            rule(
                "delegation.nhi.dev",
                &["delegationgrants/status"],
                &["update"],
                &[],
            ),
            rule(
                "delegation.nhi.dev",
                &["agentidentities/status"],
                &["patch"],
                &[],
            ),
            rule(
                "delegation.nhi.dev",
                &["agentidentities", "delegationapprovals"],
                &["list", "watch"],
                &[],
            ),
            rule(
                "",
                &["secrets"],
                &["get", "list", "watch", "create", "patch", "delete"],
                &[],
            ),
            rule("", &["serviceaccounts"], &["get"], &[]),
            rule("events.k8s.io", &["events"], &["create", "patch"], &[]),
        ];
        grant_role(
            client,
            ns,
            "delegation-operator",
            std::slice::from_ref(&subject),
            &watched,
        )
        .await;
        // The leader Lease: create, and get and update by name; nothing more.
        let own = [
            rule(
                "",
                &["secrets", "configmaps"],
                &["get", "list", "watch", "create", "update", "patch"],
                &[],
            ),
            rule(
                "",
                &["configmaps"],
                &["delete"],
                &["delegation-operator-revocations"],
            ),
            rule("coordination.k8s.io", &["leases"], &["create"], &[]),
            rule(
                "coordination.k8s.io",
                &["leases"],
                &["get", "update"],
                &[LEASE],
            ),
        ];
        grant_role(
            client,
            operator_ns,
            "delegation-operator",
            std::slice::from_ref(&subject),
            &own,
        )
        .await;
        let cluster_role = format!("delegation-operator-{operator_ns}");
        let cluster_rules = [
            rule(
                "authorization.k8s.io",
                &["subjectaccessreviews"],
                &["create"],
                &[],
            ),
            rule("authentication.k8s.io", &["tokenreviews"], &["create"], &[]),
            rule(
                "admissionregistration.k8s.io",
                &[
                    "mutatingadmissionpolicies",
                    "mutatingadmissionpolicybindings",
                    "validatingadmissionpolicies",
                    "validatingadmissionpolicybindings",
                ],
                &["list", "watch"],
                &[],
            ),
            rule(
                "delegation.nhi.dev",
                &["audiencepolicies"],
                &["list", "watch"],
                &[],
            ),
            rule("", &["namespaces"], &["get"], &[operator_ns]),
        ];
        grant_cluster_role(client, &cluster_role, &subject, &cluster_rules).await;
        Self {
            uid: account.uid().expect("a ServiceAccount has a uid"),
            kubeconfig: service_account_kubeconfig(client, operator_ns, name).await,
            cluster_role,
        }
    }

    /// A client with the ServiceAccount's token, as the operator has.
    async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    }

    /// Removes what lives outside the test's namespaces, and the kubeconfig.
    async fn remove(self, client: &Client) {
        let params = DeleteParams::default();
        let _ = Api::<ClusterRoleBinding>::all(client.clone())
            .delete(&self.cluster_role, &params)
            .await;
        let _ = Api::<ClusterRole>::all(client.clone())
            .delete(&self.cluster_role, &params)
            .await;
    }
}

impl Drop for OperatorAccount {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// A ClusterRole with `rules` bound to `subject`, both named `name`; waits until the authorizer
/// allows the first verb of each rule.
async fn grant_cluster_role(
    client: &Client,
    name: &str,
    subject: &k8s_openapi::api::rbac::v1::Subject,
    rules: &[PolicyRule],
) {
    let meta = ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    };
    let role = ClusterRole {
        metadata: meta.clone(),
        rules: Some(rules.to_vec()),
        ..Default::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: name.into(),
        },
        subjects: Some(vec![subject.clone()]),
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<ClusterRole>::all(client.clone())
        .patch(name, &params, &Patch::Apply(&role))
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(name, &params, &Patch::Apply(&binding))
        .await
        .unwrap();
    for rule in rules {
        wait_allowed(client, "", subject, rule).await;
    }
}

//! GitOps: the Argo CD health checks (Lua, run by gopher-lua as Argo CD runs them) and kstatus
//! (sigs.k8s.io/cli-utils, what Flux reads) on status fixtures and on live objects the operator
//! reconciled in every state; no drift under `kubectl diff --server-side` for every example; the
//! Dockerfile's shape. The Go helper that evaluates them is tests/gitops/checker.

mod support;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use delegation_operator::api::DelegationGrant;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, DynamicObject, PostParams},
};
use serde::Deserialize;
use serde_json::json;
use support::{
    Fixture, Operator, dynamic_api, gitops::*, grant_role, kubectl, repo_root, rule, user_subject,
    wait_for,
};

const GROUP: &str = "delegation.nhi.dev";

// ---- fixtures --------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthTests {
    tests: Vec<HealthTest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthTest {
    health_status: Verdict,
    kstatus: String,
    flux: String,
    input_path: String,
}

fn testdata(kind: &str) -> PathBuf {
    repo_root().join("tests/gitops/testdata").join(kind)
}

/// Every fixture (objects captured from the operator, and edge cases derived from them) gets the
/// health status and message its health_test.yaml expects, with and without Lua's standard
/// libraries, and the kstatus it lists. Every fixture file is listed.
#[test]
fn every_status_fixture_gets_the_expected_health_and_kstatus() {
    for kind in ["DelegationGrant", "AgentIdentity"] {
        let dir = testdata(kind);
        let tests: HealthTests =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join("health_test.yaml")).unwrap())
                .unwrap();
        let mut listed: Vec<String> = tests.tests.iter().map(|t| t.input_path.clone()).collect();
        listed.sort();
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") && n != "health_test.yaml")
            .collect();
        on_disk.sort();
        assert_eq!(
            listed, on_disk,
            "{kind}: every fixture is tested exactly once"
        );

        let mut seen = BTreeMap::<String, usize>::new();
        for test in &tests.tests {
            let object = yaml_file_as_json(&dir.join(&test.input_path));
            assert_eq!(object["kind"], kind, "{}", test.input_path);
            let health = argo_health(&object);
            assert_eq!(health, test.health_status, "{kind} {}", test.input_path);
            assert_eq!(
                kstatus(&object).status,
                test.kstatus,
                "kstatus of {kind} {}",
                test.input_path
            );
            assert_eq!(
                flux_health(&object).status,
                test.flux,
                "Flux healthCheckExprs of {kind} {}",
                test.input_path
            );
            *seen.entry(health.status).or_default() += 1;
        }
        let expected: &[&str] = &["Healthy", "Progressing", "Suspended", "Degraded"];
        for status in expected {
            assert!(seen.contains_key(*status), "{kind}: no fixture is {status}");
        }
    }
}

/// The checks return what Argo CD requires even for objects nothing else would produce: a table with
/// a valid status, no runtime error on missing fields.
#[test]
fn the_checks_survive_odd_objects() {
    for kind in ["DelegationGrant", "AgentIdentity"] {
        for (object, expected) in [
            (
                json!({"apiVersion": "delegation.nhi.dev/v1alpha1", "kind": kind, "metadata": {"name": "x"}}),
                "Progressing",
            ),
            (
                json!({"apiVersion": "delegation.nhi.dev/v1alpha1", "kind": kind, "metadata": {"name": "x", "generation": 1},
                       "status": {"conditions": [{"type": "Ready"}]}}),
                "Progressing",
            ),
            (
                json!({"apiVersion": "delegation.nhi.dev/v1alpha1", "kind": kind, "metadata": {"name": "x", "generation": 3},
                       "status": {"observedGeneration": 3, "conditions": [{"type": "Ready", "status": "False"}]}}),
                "Degraded",
            ),
        ] {
            assert_eq!(argo_health(&object).status, expected, "{object}");
        }
    }
}

/// The argocd-cm snippet installs exactly the scripts the fixtures test, under the keys Argo CD
/// reads (`resource.customizations.health.<group>_<kind>`), and the GitOps examples point at
/// directories that exist.
#[test]
fn the_argocd_cm_snippet_installs_exactly_the_tested_checks() {
    let dir = repo_root().join("examples/gitops");
    let cm = yaml_file_as_json(&dir.join("argocd/argocd-cm.yaml"));
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "argocd-cm");
    for kind in ["DelegationGrant", "AgentIdentity"] {
        let key = format!("resource.customizations.health.{GROUP}_{kind}");
        let script = std::fs::read_to_string(health_script(kind)).unwrap();
        assert_eq!(
            cm["data"][&key].as_str(),
            Some(script.as_str()),
            "argocd-cm {key} must be {} verbatim",
            health_script(kind).display()
        );
    }

    let app = yaml_file_as_json(&dir.join("argocd/application.yaml"));
    let path = app["spec"]["source"]["path"].as_str().unwrap();
    assert!(repo_root().join(path).is_dir(), "{path}");
    let sync_options = app["spec"]["syncPolicy"]["syncOptions"].as_array().unwrap();
    assert!(sync_options.contains(&json!("ServerSideApply=true")));

    let text = std::fs::read_to_string(dir.join("flux/kustomizations.yaml")).unwrap();
    let mut paths = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
        if doc["kind"] == "Kustomization" {
            let path = doc["spec"]["path"].as_str().unwrap();
            assert!(repo_root().join(path).is_dir(), "{path}");
            assert_eq!(doc["spec"]["wait"], true);
            paths += 1;
        }
    }
    assert_eq!(
        paths, 3,
        "one Kustomization for the AudiencePolicies, one for agents, one for grants"
    );
}

// ---- live objects ----------------------------------------------------------------------------

/// Agents and grants in every state the operator reports, created for real.
const STATES: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: triage}
spec:
  owner: {kind: Group, name: support-platform}
  allowedScopes: [tickets:read, tickets:comment]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
  delegation: {maxDepth: 1, allowedActors: [summarizer]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: summarizer}
spec:
  owner: {kind: Group, name: support-platform}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: frozen}
spec:
  owner: {kind: Group, name: support-platform}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 10m
  suspended: true
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: payer}
spec:
  owner: {kind: Group, name: payments}
  allowedScopes: [payments:execute]
  allowedAudiences: [https://payments.example.com]
  maxTokenTTL: 10m
  requireApproval: {}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: ready}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: triage}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: suspended}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: triage}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
  suspended: true
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: agent-suspended}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: frozen}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: denied-scope}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: triage}
  scopes: [tickets:read, tickets:close]
  audience: https://tickets.example.com
  tokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: approval-pending}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: payer}
  scopes: [payments:execute]
  audience: https://payments.example.com
  tokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: parent-not-ready}
spec:
  parentGrantRef: {name: suspended}
  actorRef: {name: summarizer}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 5m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: agent-missing}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: nobody}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: expired}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: triage}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
  validUntil: "2020-01-01T00:00:00Z"
"#;

/// The object as the apiserver returns it, as JSON (what Argo CD and Flux read).
async fn live(f: &Fixture, kind: &str, name: &str) -> serde_json::Value {
    let object: DynamicObject = dynamic_api(&f.client, &f.ns, kind)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("get {kind}/{name}: {e}"));
    serde_json::to_value(object).unwrap()
}

/// Waits until the operator has written a Ready condition for the object's current generation.
async fn wait_agent_reconciled(f: &Fixture, name: &str) {
    let agents = f.agents();
    wait_for(
        &format!("agent {name} reconciled"),
        Duration::from_secs(30),
        || async {
            let agent = agents.get_opt(name).await.ok()??;
            let status = agent.status?;
            (status.observed_generation == agent.metadata.generation
                && status.conditions?.iter().any(|c| c.type_ == "Ready"))
            .then_some(())
        },
    )
    .await;
}

/// What Argo CD (health and a part of its message), kstatus and the Flux example should say.
struct Expect<'a> {
    argo: &'a str,
    message_has: &'a str,
    kstatus: &'a str,
    flux: &'a str,
}

const fn expect<'a>(
    argo: &'a str,
    message_has: &'a str,
    kstatus: &'a str,
    flux: &'a str,
) -> Expect<'a> {
    Expect {
        argo,
        message_has,
        kstatus,
        flux,
    }
}

fn assert_verdicts(object: &serde_json::Value, expected: &Expect) {
    let name = &object["metadata"]["name"];
    let verdict = argo_health(object);
    assert_eq!(
        verdict.status, expected.argo,
        "Argo CD health of {name}: {verdict:?}"
    );
    assert!(
        verdict.message.contains(expected.message_has),
        "Argo CD message of {name} should contain {:?}: {verdict:?}",
        expected.message_has
    );
    let computed = kstatus(object);
    assert_eq!(
        computed.status, expected.kstatus,
        "kstatus of {name}: {computed:?}"
    );
    let flux = flux_health(object);
    assert_eq!(
        flux.status, expected.flux,
        "Flux healthCheckExprs of {name}: {flux:?}"
    );
}

/// The operator reconciles real grants and agents into every state; the Argo CD health checks,
/// kstatus and the Flux example's healthCheckExprs read each live object as docs/gitops.md says.
/// Then, with the operator stopped, a spec edit, a new grant and a deletion are Progressing (kstatus:
/// InProgress, Current — kstatus counts an object without conditions as current — and Terminating),
/// and once it runs again they settle.
#[tokio::test]
async fn live_objects_in_every_state_get_the_documented_health() {
    let mut f = Fixture::start("gitops-health", &["--authority-recheck-period", "2s"]).await;
    f.apply(STATES).await;

    // DeniedNotAuthorized: dave may delegate for alice, creates a grant, and loses the right.
    grant_role(
        &f.client,
        &f.ns,
        "dave-for-alice",
        &[user_subject("dave@example.com")],
        &[
            rule(GROUP, &["delegationgrants"], &["create", "get"], &[]),
            rule(GROUP, &["users"], &["delegate"], &["alice@example.com"]),
        ],
    )
    .await;
    let dave = support::client_as("dave@example.com", &[]).await;
    let by_dave: DelegationGrant = serde_json::from_value(json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": "by-dave"},
        "spec": {"principal": {"kind": "User", "name": "alice@example.com"}, "actorRef": {"name": "triage"},
                 "scopes": ["tickets:read"], "audience": "https://tickets.example.com", "tokenTTL": "10m"}
    }))
    .unwrap();
    Api::<DelegationGrant>::namespaced(dave, &f.ns)
        .create(&PostParams::default(), &by_dave)
        .await
        .unwrap();
    f.wait_ready("by-dave", "True", None).await;
    assert_verdicts(
        &live(&f, "DelegationGrant", "by-dave").await,
        &expect("Healthy", "Issued: ", "Current", "Current"),
    );
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(f.client.clone(), &f.ns)
        .delete("dave-for-alice", &DeleteParams::default())
        .await
        .unwrap();
    // The deletion reaches the authorizer a moment later; the operator's recheck asks it.
    support::wait_denied(
        &f.client,
        &f.ns,
        &user_subject("dave@example.com"),
        &rule(GROUP, &["users"], &["delegate"], &["alice@example.com"]),
    )
    .await;

    let grants = [
        (
            "ready",
            "True",
            "Issued",
            expect("Healthy", "Issued: ", "Current", "Current"),
        ),
        (
            "suspended",
            "False",
            "Suspended",
            expect("Suspended", "Suspended: ", "InProgress", "Current"),
        ),
        (
            "agent-suspended",
            "False",
            "AgentSuspended",
            expect("Suspended", "AgentSuspended: ", "InProgress", "Current"),
        ),
        (
            "denied-scope",
            "False",
            "DeniedScopeNotAllowed",
            expect(
                "Degraded",
                "DeniedScopeNotAllowed: ",
                "InProgress",
                "Failed",
            ),
        ),
        (
            "by-dave",
            "False",
            "DeniedNotAuthorized",
            expect("Degraded", "DeniedNotAuthorized: ", "InProgress", "Failed"),
        ),
        (
            "approval-pending",
            "False",
            "ApprovalPending",
            expect(
                "Progressing",
                "ApprovalPending: ",
                "InProgress",
                "InProgress",
            ),
        ),
        (
            "parent-not-ready",
            "False",
            "ParentNotReady",
            expect(
                "Progressing",
                "ParentNotReady: ",
                "InProgress",
                "InProgress",
            ),
        ),
        (
            "agent-missing",
            "False",
            "AgentMissing",
            expect("Progressing", "AgentMissing: ", "InProgress", "InProgress"),
        ),
        (
            "expired",
            "False",
            "Expired",
            expect("Degraded", "Expired: ", "InProgress", "Failed"),
        ),
    ];
    for (name, ready, reason, expected) in &grants {
        f.wait_ready(name, ready, Some(reason)).await;
        assert_verdicts(&live(&f, "DelegationGrant", name).await, expected);
    }
    for (name, expected) in [
        ("triage", expect("Healthy", "Valid: ", "Current", "Current")),
        (
            "frozen",
            expect("Suspended", "Suspended: ", "InProgress", "Current"),
        ),
    ] {
        wait_agent_reconciled(&f, name).await;
        assert_verdicts(&live(&f, "AgentIdentity", name).await, &expected);
    }

    // The operator stops: what GitOps tools see before it has looked at a change.
    f.operator.take().unwrap().stop();
    f.patch_grant("ready", json!({"spec": {"tokenTTL": "9m"}}))
        .await;
    f.patch_agent("triage", json!({"spec": {"maxTokenTTL": "14m"}}))
        .await;
    f.apply(
        r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: fresh}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: triage}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
"#,
    )
    .await;
    f.grants()
        .delete("denied-scope", &DeleteParams::default())
        .await
        .unwrap();
    let lagging = expect(
        "Progressing",
        "Waiting for the operator to observe generation 2 (the status is for generation 1)",
        "InProgress",
        "InProgress",
    );
    assert_verdicts(&live(&f, "DelegationGrant", "ready").await, &lagging);
    assert_verdicts(&live(&f, "AgentIdentity", "triage").await, &lagging);
    // kstatus: no conditions at all means Current, so Flux's `wait` alone does not wait for the
    // operator; the example's healthCheckExprs cannot evaluate without a status (Unknown: Flux waits).
    assert_verdicts(
        &live(&f, "DelegationGrant", "fresh").await,
        &expect("Progressing", "no status yet", "Current", "Unknown"),
    );
    assert_verdicts(
        &live(&f, "DelegationGrant", "denied-scope").await,
        &expect("Progressing", "Being deleted", "Terminating", "InProgress"),
    );

    // The operator is back: everything settles.
    f.operator = Some(Operator::start(
        &f.ns,
        &f.operator_namespace(),
        &["--authority-recheck-period", "2s"],
    ));
    for name in ["ready", "fresh"] {
        f.wait_ready(name, "True", None).await;
        // Issued (fresh) or Rotated (ready: its shorter tokenTTL needs a new token).
        assert_verdicts(
            &live(&f, "DelegationGrant", name).await,
            &expect("Healthy", ": token ", "Current", "Current"),
        );
    }
    wait_agent_reconciled(&f, "triage").await;
    assert_verdicts(
        &live(&f, "AgentIdentity", "triage").await,
        &expect("Healthy", "Valid: ", "Current", "Current"),
    );
    f.wait_grant_gone(
        "denied-scope",
        "the deleted grant released",
        Duration::from_secs(30),
    )
    .await;
}

// ---- no drift --------------------------------------------------------------------------------

/// Every example a user or a GitOps tool applies: examples/*.yaml, examples/rbac/*.yaml and the
/// manifests the GitOps examples sync (examples/gitops/delegation/**).
fn example_files() -> Vec<PathBuf> {
    let root = repo_root().join("examples");
    let mut files = support::yaml_files(&root);
    files.extend(support::yaml_files(&root.join("rbac")));
    let gitops = root.join("gitops/delegation");
    for dir in std::fs::read_dir(&gitops).unwrap() {
        let dir = dir.unwrap().path();
        if dir.is_dir() {
            files.extend(support::yaml_files(&dir));
        }
    }
    files
}

/// The resourceVersions of every grant and agent of the fixture's namespace.
async fn resource_versions(f: &Fixture) -> Option<Vec<String>> {
    let grants = f.grants().list(&Default::default()).await.ok()?.items;
    let agents = f.agents().list(&Default::default()).await.ok()?.items;
    Some(
        grants
            .iter()
            .map(|g| g.metadata.resource_version.clone().unwrap_or_default())
            .chain(
                agents
                    .iter()
                    .map(|a| a.metadata.resource_version.clone().unwrap_or_default()),
            )
            .collect(),
    )
}

/// Applied with `kubectl apply --server-side` and reconciled by the operator (tokens issued, Secrets,
/// finalizers, status and spec.requester written), no example differs from what is live:
/// `kubectl diff --server-side` exits 0 with no output, and applying again conflicts with no field
/// the operator owns. A changed manifest does show (the diff can fail).
#[tokio::test]
async fn no_example_drifts_once_the_operator_has_reconciled_it() {
    let f = Fixture::start("gitops-drift", &[]).await;
    let files = example_files();
    assert!(files.len() >= 10, "examples: {files:?}");
    for file in &files {
        let out = kubectl(&[
            "apply",
            "--server-side",
            "-n",
            &f.ns,
            "-f",
            file.to_str().unwrap(),
        ])
        .await;
        assert!(
            out.status.success(),
            "apply {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Reconciled: every grant and agent has a Ready condition for its generation, and nothing is
    // written any more (status writes between kubectl diff's read and its dry run would show).
    let settled = wait_for(
        "the examples to settle",
        Duration::from_secs(60),
        || async {
            let grants = f.grants().list(&Default::default()).await.ok()?.items;
            let agents = f.agents().list(&Default::default()).await.ok()?.items;
            let grants_done = grants.iter().all(|g| {
                g.status.as_ref().is_some_and(|s| {
                    s.observed_generation == g.metadata.generation
                        && s.conditions
                            .as_ref()
                            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready"))
                })
            });
            // An agent's activeGrants alone may be written up to 10 s after the grants change.
            let ready_with = |agent: &str| {
                grants
                    .iter()
                    .filter(|g| g.spec.actor_ref.name == agent)
                    .filter(|g| {
                        g.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count()
            };
            let agents_done = agents.iter().all(|a| {
                a.status.as_ref().is_some_and(|s| {
                    s.observed_generation == a.metadata.generation
                        && s.conditions.is_some()
                        && s.active_grants == i32::try_from(ready_with(&a.name_any())).ok()
                })
            });
            if !(grants_done && agents_done) {
                return None;
            }
            // Judged on objects read inside the quiet period: the lists above may predate a write.
            let before = resource_versions(&f).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let grants = f.grants().list(&Default::default()).await.ok()?.items;
            (resource_versions(&f).await? == before).then_some(grants)
        },
    )
    .await;
    let mut ready = 0;
    for grant in &settled {
        let ready_condition = grant.status.as_ref().unwrap().conditions.as_ref().unwrap();
        let ready_condition = ready_condition.iter().find(|c| c.type_ == "Ready").unwrap();
        match (
            ready_condition.status.as_str(),
            ready_condition.reason.as_str(),
        ) {
            ("True", _) => ready += 1,
            // The payment example waits for a person's approval: reconciled, not Ready.
            ("False", "ApprovalPending") => {}
            other => panic!(
                "example grant {:?} is {other:?}: {}",
                grant.metadata.name, ready_condition.message
            ),
        }
        assert!(
            grant.spec.requester.is_some(),
            "the apiserver stamped the requester"
        );
    }
    assert!(
        ready >= 6,
        "most example grants hold tokens ({ready} of {})",
        settled.len()
    );

    for file in &files {
        let path = file.to_str().unwrap();
        let out = kubectl(&["diff", "--server-side", "-n", &f.ns, "-f", path]).await;
        assert!(
            out.status.code() == Some(0) && out.stdout.is_empty(),
            "kubectl diff --server-side {} shows drift (exit {:?}):\n{}{}",
            file.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let again = kubectl(&["apply", "--server-side", "-n", &f.ns, "-f", path]).await;
        assert!(
            again.status.success(),
            "applying {} again conflicts: {}",
            file.display(),
            String::from_utf8_lossy(&again.stderr)
        );
    }

    // The control: an edited manifest is a diff.
    let original = repo_root().join("examples/gitops/delegation/grants/grants.yaml");
    let edited = std::env::temp_dir().join(format!("{}-edited-grants.yaml", f.ns));
    let text = std::fs::read_to_string(&original).unwrap();
    assert!(text.contains("tokenTTL: 60m"));
    std::fs::write(&edited, text.replace("tokenTTL: 60m", "tokenTTL: 45m")).unwrap();
    let out = kubectl(&[
        "diff",
        "--server-side",
        "-n",
        &f.ns,
        "-f",
        edited.to_str().unwrap(),
    ])
    .await;
    let diff = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{diff}");
    assert!(
        diff.contains("-  tokenTTL: 60m") && diff.contains("+  tokenTTL: 45m"),
        "{diff}"
    );
    std::fs::remove_file(edited).ok();

    // Another identity (a second controller, another cluster's Argo CD) re-applies the same grants:
    // no request, so the stamps stay, nothing changes, and there is still no drift. (Last: from now
    // on it co-owns the fields, so a changed manifest by the first manager would conflict.)
    let before: Vec<_> = f.grants().list(&Default::default()).await.unwrap().items;
    let grants_file = repo_root().join("examples/gitops/delegation/grants/grants.yaml");
    let grants_file = grants_file.to_str().unwrap();
    let other = kubectl(&[
        "apply",
        "--server-side",
        "--as=another-gitops-bot",
        "--as-group=system:masters",
        "--field-manager=another-gitops-bot",
        "-n",
        &f.ns,
        "-f",
        grants_file,
    ])
    .await;
    assert!(
        other.status.success(),
        "another identity re-applying: {}",
        String::from_utf8_lossy(&other.stderr)
    );
    for grant in &before {
        let now = f.grants().get(&grant.name_any()).await.unwrap();
        assert_eq!(
            now.metadata.generation,
            grant.metadata.generation,
            "{}: {:?} -> {:?}",
            grant.name_any(),
            grant.spec,
            now.spec
        );
        assert_eq!(
            now.spec.requester,
            grant.spec.requester,
            "{}",
            grant.name_any()
        );
        assert_eq!(now.spec.authors, grant.spec.authors);
    }
    let out = kubectl(&["diff", "--server-side", "-n", &f.ns, "-f", grants_file]).await;
    assert!(
        out.status.code() == Some(0) && out.stdout.is_empty(),
        "drift after another identity's re-apply: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---- the image recipe ------------------------------------------------------------------------

/// The Dockerfile builds with hack/static-build.sh (what the test command runs) and ends on a
/// distroless static, non-root image with no shell: nothing runs in the final stage, the entrypoint
/// is the executable itself (exec form).
#[test]
fn the_dockerfile_builds_with_the_checked_script_into_a_static_non_root_image() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    assert_eq!(stages.len(), 2, "a build stage and the final image");
    let (build, image) = (stages[0], stages[1]);
    assert!(build.contains("AS build"));
    assert!(
        build.contains("hack/static-build.sh --out /out/delegation-operator --check"),
        "the build stage runs the checked script"
    );
    assert!(
        image.starts_with("gcr.io/distroless/static-debian12:nonroot"),
        "{image}"
    );
    for line in image.lines() {
        let instruction = line.split_whitespace().next().unwrap_or_default();
        assert!(
            !matches!(instruction, "RUN" | "SHELL" | "ADD"),
            "nothing may run in the final stage: {line}"
        );
    }
    assert!(image.contains("COPY --from=build /out/delegation-operator /delegation-operator"));
    assert!(image.contains("USER 65532:65532"));
    assert!(image.contains("ENTRYPOINT [\"/delegation-operator\"]"));

    // The toolchain of the build stage is at least the crate's rust-version.
    let arg = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let needed = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let minor = |v: &str| v.split('.').nth(1).unwrap().parse::<u32>().unwrap();
    assert!(
        minor(arg) >= minor(needed),
        "rust {arg} < rust-version {needed}"
    );

    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
}

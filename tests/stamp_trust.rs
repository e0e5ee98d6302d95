//! Stamp trust follows the admission policies themselves: re-installing them revokes nothing, and
//! weakening or removing one makes new grants unverified, naming what to fix. These tests delete and
//! edit the cluster-wide policies, so they live in a test binary of their own (cargo runs test
//! binaries one after another), run one at a time, and put the policies back before they end.

mod support;

use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;

/// The policies are cluster-wide: one test of this binary at a time.
static POLICIES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const AGENT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: orchestrator}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
"#;

fn grant(name: &str) -> kube::api::DynamicObject {
    typed_grant(name, None)
}

fn typed_grant(name: &str, requester: Option<serde_json::Value>) -> kube::api::DynamicObject {
    let mut spec = json!({
        "principal": {"kind": "User", "name": "alice@example.com"},
        "actorRef": {"name": "orchestrator"},
        "scopes": ["tickets:read"],
        "audience": "https://tickets.example.com",
        "tokenTTL": "10m",
    });
    if let Some(requester) = requester {
        spec["requester"] = requester;
    }
    our_object("DelegationGrant", name, spec)
}

/// Starts an operator that re-checks every grant's authority every 2 s: a stamp that stops counting
/// would end a Ready grant within seconds.
async fn fixture(prefix: &str) -> Fixture {
    let f = Fixture::start(prefix, &["--authority-recheck-period", "2s"]).await;
    f.apply(AGENT).await;
    f
}

/// The test user's identity as the stamping policy would write it.
async fn own_identity(f: &Fixture) -> serde_json::Value {
    let me = whoami(&f.client).await;
    json!({"username": me.username, "uid": me.uid.unwrap_or_default(),
        "groups": me.groups.unwrap_or_default(), "extra": me.extra.unwrap_or_default()})
}

/// Creates a grant and waits for the operator's verdict on it: its Ready condition's status, reason
/// and message.
async fn verdict_on_new_grant(
    f: &Fixture,
    prefix: &str,
    requester: Option<serde_json::Value>,
) -> Option<(String, String, String, String)> {
    let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    // Refused at admission while the apiserver still loads a change: the caller tries again.
    dynamic_api(&f.client, &f.ns, "DelegationGrant")
        .create(&PostParams::default(), &typed_grant(&name, requester))
        .await
        .ok()?;
    let condition = wait_for(
        &format!("a verdict on grant {name}"),
        Duration::from_secs(30),
        || async {
            let g = f.grants().get(&name).await.ok()?;
            g.status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.reason != "Pending" && c.status != "Unknown")
        },
    )
    .await;
    Some((name, condition.status, condition.reason, condition.message))
}

/// Keeps creating grants until one is refused as unverified (the operator's policy watch and the
/// test's writes are not ordered: a grant created before the operator saw the change is still
/// proven); returns the refusal's message.
async fn new_grants_are_unverified(
    f: &Fixture,
    prefix: &str,
    requester: Option<serde_json::Value>,
) -> String {
    wait_for(
        "a new grant refused as DeniedRequesterUnverified",
        Duration::from_secs(60),
        || async {
            let (name, _, reason, message) =
                verdict_on_new_grant(f, prefix, requester.clone()).await?;
            if reason == "DeniedRequesterUnverified" {
                return Some(message);
            }
            f.delete_grant(&name).await;
            None
        },
    )
    .await
}

/// Runs `delegation-operator admission-policies | kubectl apply --server-side -f -`.
async fn apply_policies_as_documented() {
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
        .arg("admission-policies")
        .output()
        .expect("run delegation-operator admission-policies");
    assert!(printed.status.success());
    let file = std::env::temp_dir().join(format!(
        "stamp-trust-policies-{}.yaml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&file, &printed.stdout).unwrap();
    let applied = kubectl(&["apply", "--server-side", "-f", file.to_str().unwrap()]).await;
    let _ = std::fs::remove_file(&file);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
}

async fn delete_policies(client: &kube::Client) {
    for doc in delegation_operator::admission::documents() {
        let (kind, name) = (
            doc["kind"].as_str().unwrap(),
            doc["metadata"]["name"].as_str().unwrap(),
        );
        match admission_api(client, kind)
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => panic!("deleting {kind} {name}: {e}"),
        }
    }
}

async fn merge_patch(client: &kube::Client, kind: &str, name: &str, patch: serde_json::Value) {
    admission_api(client, kind)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("patching {kind} {name}: {e}"));
}

#[tokio::test]
async fn re_creating_the_identical_policies_revokes_nothing() {
    let _one_at_a_time = POLICIES.lock().await;
    let f = fixture("stamp-reinstall").await;
    f.apply(&serde_yaml::to_string(&grant("before")).unwrap())
        .await;
    let before = f.wait_ready("before", "True", None).await;
    let token_id = before.status.unwrap().token.unwrap().id;
    let token = f.token_in("before-token").await.expect("the token Secret");

    delete_policies(&f.client).await;
    apply_policies_as_documented().await;
    // Waits until the apiserver applies them again and the operator trusts them anew.
    reinstall_admission_policies(&f.client).await;
    // A grant created now is proven: the operator saw the policies back, and settled. By then the
    // older grant has been checked again several times (every 2 s).
    let (_, status, reason, message) = verdict_on_new_grant(&f, "after", None)
        .await
        .expect("admitted");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Issued"),
        "{message}"
    );

    let still = f.wait_ready("before", "True", None).await;
    assert_eq!(still.status.unwrap().token.unwrap().id, token_id);
    assert_eq!(
        f.token_in("before-token").await.as_deref(),
        Some(token.as_str())
    );
}

#[tokio::test]
async fn a_weakened_or_missing_policy_makes_new_grants_unverified_until_it_is_restored() {
    let _one_at_a_time = POLICIES.lock().await;
    let f = fixture("stamp-weakened").await;
    f.apply(&serde_yaml::to_string(&grant("proven")).unwrap())
        .await;
    let proven = f.wait_ready("proven", "True", None).await;
    let token_id = proven.status.unwrap().token.unwrap().id;

    // 1. The check of the stamp only warns: the stamp is still written, but nothing refuses a
    //    forged one.
    merge_patch(
        &f.client,
        "ValidatingAdmissionPolicyBinding",
        "delegation-operator-grant-authority",
        json!({"spec": {"validationActions": ["Warn"]}}),
    )
    .await;
    let message = new_grants_are_unverified(&f, "warned", None).await;
    for words in [
        "ValidatingAdmissionPolicyBinding delegation-operator-grant-authority",
        "validationActions",
        "admission-policies | kubectl apply --server-side",
    ] {
        assert!(message.contains(words), "{words} missing: {message}");
    }
    // A grant proven before stays proven: no revocation.
    let kept = f.wait_ready("proven", "True", None).await;
    assert_eq!(kept.status.unwrap().token.unwrap().id, token_id);
    // Undone by the same field manager: validationActions is a set, which a server-side apply by
    // another manager would merge into [Warn, Deny] (refused by the apiserver).
    merge_patch(
        &f.client,
        "ValidatingAdmissionPolicyBinding",
        "delegation-operator-grant-authority",
        json!({"spec": {"validationActions": ["Deny"]}}),
    )
    .await;
    reinstall_admission_policies(&f.client).await;
    let (_, status, reason, message) = verdict_on_new_grant(&f, "restored", None)
        .await
        .expect("admitted");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Issued"),
        "{message}"
    );

    // 2. The stamping policy no longer matches creations.
    merge_patch(
        &f.client,
        "MutatingAdmissionPolicy",
        "delegation-operator-stamp-requester",
        json!({"spec": {"matchConstraints": {"resourceRules": [{
            "apiGroups": ["delegation.nhi.dev"], "apiVersions": ["*"], "operations": ["UPDATE"],
            "resources": ["delegationgrants"], "scope": "*"}]}}}),
    )
    .await;
    // Stamped no more: a requester typed into the grant (the creator's own, which the checking
    // policy lets through) proves nothing.
    let message = new_grants_are_unverified(&f, "unstamped", Some(own_identity(&f).await)).await;
    for words in [
        "MutatingAdmissionPolicy delegation-operator-stamp-requester",
        "operations",
    ] {
        assert!(message.contains(words), "{words} missing: {message}");
    }

    // 3. The stamping binding is gone.
    reinstall_admission_policies(&f.client).await;
    admission_api(&f.client, "MutatingAdmissionPolicyBinding")
        .delete(
            "delegation-operator-stamp-requester",
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    let message = new_grants_are_unverified(&f, "typed", Some(own_identity(&f).await)).await;
    for words in [
        "MutatingAdmissionPolicyBinding delegation-operator-stamp-requester is missing",
        "admission-policies | kubectl apply --server-side",
    ] {
        assert!(message.contains(words), "{words} missing: {message}");
    }
    let kept = f.wait_ready("proven", "True", None).await;
    assert_eq!(kept.status.unwrap().token.unwrap().id, token_id);

    // Re-created rather than edited back: policies whose spec never changed (generation 1) are what
    // later test binaries expect (an edit made while their operator is down then counts).
    delete_policies(&f.client).await;
    apply_policies_as_documented().await;
    reinstall_admission_policies(&f.client).await;
    let (_, status, reason, message) = verdict_on_new_grant(&f, "back", None)
        .await
        .expect("admitted");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Issued"),
        "{message}"
    );
}

//! Fail closed when the admission policies are missing. This test removes the cluster-wide policy
//! bindings for a while, so it lives in a test binary of its own (cargo runs test binaries one after
//! another) and puts them back before it ends.

mod support;

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBinding,
};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use support::*;

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

fn grant(name: &str, requester: Option<serde_json::Value>) -> kube::api::DynamicObject {
    let mut spec = json!({
        "principal": {"kind": "User", "name": "alice@example.com"},
        "actorRef": {"name": "orchestrator"},
        "scopes": ["tickets:read"],
        "audience": "https://tickets.example.com",
        "tokenTTL": "10m",
    });
    if let Some(r) = requester {
        spec["requester"] = r;
    }
    our_object("DelegationGrant", name, spec)
}

/// Deletes a policy binding (the apiserver stops applying it within seconds; callers wait for that).
async fn unbind<K>(client: &kube::Client, name: &str)
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => panic!("deleting binding {name}: {e}"),
    }
}

#[tokio::test]
async fn without_the_admission_policies_no_requester_is_trusted() {
    let f = Fixture::start("fail-closed", &[]).await;
    f.apply(AGENT).await;
    let grants = dynamic_api(&f.client, &f.ns, "DelegationGrant");

    // 1. Without the validating policy, a requester who may not delegate for alice gets past
    //    admission, stamped; but nothing checked the stamp, so the operator does not trust it, and
    //    says which binding is missing.
    unbind::<ValidatingAdmissionPolicyBinding>(&f.client, "delegation-operator-grant-authority")
        .await;
    grant_role(
        &f.client,
        &f.ns,
        "bob-creates-grants",
        &[user_subject("bob@example.com")],
        &[rule(
            "delegation.nhi.dev",
            &["delegationgrants"],
            &["create", "get"],
            &[],
        )],
    )
    .await;
    let bob = dynamic_api(
        &client_as("bob@example.com", &[]).await,
        &f.ns,
        "DelegationGrant",
    );
    wait_for(
        "bob's grant past admission",
        Duration::from_secs(30),
        || async {
            bob.create(&PostParams::default(), &grant("by-bob", None))
                .await
                .ok()
        },
    )
    .await;
    let refused = f
        .wait_ready("by-bob", "False", Some("DeniedRequesterUnverified"))
        .await;
    assert_eq!(
        refused.spec.requester.as_ref().unwrap().username,
        "bob@example.com"
    );
    let message = &refused.status.unwrap().conditions.unwrap()[0].message;
    assert!(
        message.contains(
            "ValidatingAdmissionPolicyBinding delegation-operator-grant-authority is missing"
        ),
        "{message}"
    );
    assert!(f.secrets().get_opt("by-bob-token").await.unwrap().is_none());

    // 2. Without the stamping policy, nothing stamps: no requester, no token, and a message that
    //    says what to install. A requester typed into the grant is not believed either.
    unbind::<MutatingAdmissionPolicyBinding>(&f.client, "delegation-operator-stamp-requester")
        .await;
    let unstamped = wait_for(
        "a grant created unstamped",
        Duration::from_secs(30),
        || async {
            let created = grants
                .create(
                    &PostParams::default(),
                    &grant(
                        &format!("unstamped-{}", uuid::Uuid::new_v4().simple()),
                        None,
                    ),
                )
                .await
                .ok()?;
            let stamped = created.data["spec"].get("requester").is_some();
            if stamped {
                let _ = grants
                    .delete(
                        &created.metadata.name.clone().unwrap(),
                        &DeleteParams::default(),
                    )
                    .await;
            }
            (!stamped).then_some(created.metadata.name.unwrap())
        },
    )
    .await;
    let missing = f
        .wait_ready(&unstamped, "False", Some("DeniedRequesterMissing"))
        .await;
    let message = &missing.status.unwrap().conditions.unwrap()[0].message;
    assert!(message.contains("admission-policies"), "{message}");

    let forged = json!({"username": "alice@example.com", "groups": ["system:authenticated"]});
    grants
        .create(&PostParams::default(), &grant("forged", Some(forged)))
        .await
        .unwrap();
    let unverified = f
        .wait_ready("forged", "False", Some("DeniedRequesterUnverified"))
        .await;
    assert_eq!(
        unverified.spec.requester.as_ref().unwrap().username,
        "alice@example.com"
    );
    assert!(f.secrets().get_opt("forged-token").await.unwrap().is_none());

    // 3. Once the policies are back, the grant forged meanwhile stays refused: it predates them.
    reinstall_admission_policies(&f.client).await;
    f.patch_grant(
        "forged",
        json!({"metadata": {"labels": {"touched": "yes"}}}),
    )
    .await;
    let still = wait_for(
        "the forged grant looked at again",
        Duration::from_secs(30),
        || async {
            let g = f.grants().get("forged").await.ok()?;
            let c = g.status.as_ref()?.conditions.as_ref()?.first()?.clone();
            (c.reason == "DeniedRequesterUnverified" && c.message.contains("re-create"))
                .then_some(g)
        },
    )
    .await;
    assert!(still.status.unwrap().token.is_none());
}

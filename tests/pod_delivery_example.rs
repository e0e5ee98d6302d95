//! `examples/pod-delivery/` end to end: its objects applied as written — a grant with no Secret —
//! and its agent (`agent.py`, standard-library Python) run as a process with what the kubelet would
//! mount into its Pod (a ServiceAccount token bound to that Pod for the issuer's audience, the
//! issuer's CA) against the live token endpoint. It fetches a token of its own, keeps it in a file
//! only it can read, and fetches a new one after two thirds of its life; deleting the grant
//! revokes what it holds and it is refused from then on.

mod support;

use std::{os::unix::fs::PermissionsExt, path::Path, process::Stdio, time::Duration};

use delegation_operator::signing;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::Value;
use support::{
    verifiers::{Trust, start_https_operator, write_private},
    *,
};

const AUDIENCE: &str = "https://tickets.example.com";
const GRANT: &str = "alice-summary-session";

fn example() -> std::path::PathBuf {
    repo_root().join("examples/pod-delivery")
}

/// Creates the example's objects in the fixture's namespace, as `kubectl apply -f` would.
async fn apply_example(f: &Fixture) -> Pod {
    let mut pod = None;
    for doc in load_documents(&example().join("agent.yaml")) {
        let kind = doc.types.as_ref().unwrap().kind.clone();
        let name = doc.metadata.name.clone().unwrap();
        match kind.as_str() {
            "ServiceAccount" => ensure_service_account(&f.client, &f.ns, &name).await,
            "Pod" => {
                let spec: Pod =
                    serde_json::from_value(serde_json::to_value(&doc).unwrap()).unwrap();
                let created = Api::<Pod>::namespaced(f.client.clone(), &f.ns)
                    .create(&PostParams::default(), &spec)
                    .await
                    .unwrap_or_else(|e| panic!("the example's Pod: {e}"));
                pod = Some(created);
            }
            _ => {
                create_document(&f.client, &f.ns, &doc)
                    .await
                    .unwrap_or_else(|e| panic!("the example's {kind} {name}: {e}"));
            }
        }
    }
    pod.expect("the example has a Pod")
}

/// The value of the environment variable `name` of the example Pod's container.
fn pod_env(pod: &Pod, name: &str) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| panic!("the example Pod sets {name}"))
}

/// Runs the example agent for `rounds` fetches; its exit code and JSON lines.
async fn run_agent(
    issuer: &str,
    trust: &Trust,
    dir: &Path,
    pod: &Pod,
    rounds: u32,
    expires_in: u32,
) -> (i32, Vec<Value>) {
    let out = tokio::process::Command::new("python3")
        .arg(example().join("agent.py"))
        .env("DELEGATION_ISSUER", issuer)
        .env("DELEGATION_CA", &trust.ca_path)
        .env("GRANT", pod_env(pod, "GRANT"))
        .env("SCOPE", pod_env(pod, "SCOPE"))
        .env("ACTOR_TOKEN_FILE", dir.join("delegation-issuer"))
        .env("TOKEN_FILE", dir.join("token"))
        .env("ROUNDS", rounds.to_string())
        .env("EXPIRES_IN", expires_in.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("python3 runs the example agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "the agent printed a line that is not JSON ({e}): {l}\nstderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        })
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

#[tokio::test]
async fn the_example_agent_fetches_and_refreshes_its_token_with_no_secret() {
    let (f, issuer, trust) = start_https_operator("pod-delivery-example", &[]).await;
    let pod = apply_example(&f).await;
    f.wait_ready(GRANT, "True", Some("Issued")).await;
    let secrets = Api::<Secret>::namespaced(f.client.clone(), &f.ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        secrets
            .items
            .iter()
            .all(|s| s.type_.as_deref() != Some("delegation.nhi.dev/token")),
        "no token Secret in the namespace"
    );

    // What the kubelet mounts: the projected token bound to the Pod (and the CA).
    let dir = std::env::temp_dir().join(format!("pod-delivery-example-{}", f.ns));
    std::fs::create_dir(&dir).unwrap();
    let actor = request_service_account_token_for(
        &f.client,
        &f.ns,
        "ticket-summariser",
        Some(&pod),
        &[&issuer.url],
    )
    .await;
    write_private(&dir.join("delegation-issuer"), &actor);

    // Two rounds of 3-second tokens: the second fetched 2 s after the first.
    let (code, lines) = run_agent(&issuer.url, &trust, &dir, &pod, 2, 3).await;
    assert_eq!(code, 0, "the agent succeeded: {lines:?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_ne!(lines[0]["jti"], lines[1]["jti"], "a new token each round");
    for line in &lines {
        assert_eq!(line["scope"], "tickets:read");
        assert_eq!(line["expires_in"], 3);
        assert_eq!(line["refresh_in"], 2);
        assert_eq!(line["token_type"], "Bearer");
    }
    let token_file = dir.join("token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only the agent reads its token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let claims =
        signing::verify(&token, &f.jwks().await, AUDIENCE, 0).expect("the kept token verifies");
    assert_eq!(
        claims["jti"], lines[1]["jti"],
        "the file holds the newest token"
    );
    assert_eq!(
        claims["act"]["sub"],
        format!("agent:{}/ticket-summariser", f.ns)
    );
    let record = claims["delegation_chain"]
        .as_array()
        .unwrap()
        .last()
        .unwrap();
    assert_eq!(record["workload"]["pod"], "ticket-summariser");
    assert_eq!(
        record["workload"]["pod_uid"],
        pod.metadata.uid.clone().unwrap().as_str()
    );
    let delivered: Vec<Value> = f
        .operator()
        .audit()
        .into_iter()
        .filter(|r| r["action"] == "Delivered")
        .collect();
    assert_eq!(delivered.len(), 2, "one audit line per token");
    let to_pod = format!("delivered to pod {}/ticket-summariser", f.ns);
    assert!(delivered.iter().all(|r| r["message"] == to_pod.as_str()));

    // The grant deleted: the agent is refused from then on.
    f.delete_grant(GRANT).await;
    f.wait_grant_gone(GRANT, "deleted", Duration::from_secs(60))
        .await;
    let (code, lines) = run_agent(&issuer.url, &trust, &dir, &pod, 1, 3).await;
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(lines[0]["refused"], "invalid_grant", "{lines:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

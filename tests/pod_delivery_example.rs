//! `examples/pod-delivery/` end to end: its objects applied as written — a grant with no Secret —
//! and its agent (`agent.py`, standard-library Python) run as a process with what the kubelet would
//! mount into its Pod (a ServiceAccount token bound to that Pod for the issuer's audience, the
//! issuer's CA) against the live token endpoint. It fetches a token of its own, keeps it in a file
//! only it can read, and fetches a new one after two thirds of its life; deleting the grant
//! revokes what it holds and it is refused from then on.

mod support;

use std::{os::unix::fs::PermissionsExt, path::Path, process::Stdio, time::Duration};

use delegation_operator::signing;
use k8s_openapi::api::core::v1::Pod;
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
    json_lines_of(&out)
}

/// The operator's `Delivered` audit lines so far.
fn delivered_lines(f: &Fixture) -> Vec<Value> {
    f.operator()
        .audit()
        .into_iter()
        .filter(|r| r["action"] == "Delivered")
        .collect()
}

#[tokio::test]
async fn the_example_agent_fetches_and_refreshes_its_token_with_no_secret() {
    let (f, issuer, trust) = start_https_operator("pod-delivery-example", &[]).await;
    let pod = apply_example(&f, &example().join("agent.yaml")).await;
    f.wait_ready(GRANT, "True", Some("Issued")).await;
    assert!(
        token_secrets(&f.client, &f.ns).await.is_empty(),
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
    // The token endpoint's own grant cache may lag the apiserver by a moment: ask until it delivers
    // (the example client gives up on a refusal, as it should).
    let ask = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", GRANT),
        (
            "subject_token_type",
            "urn:delegation.nhi.dev:token-type:grant",
        ),
        ("actor_token", actor.as_str()),
        ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
    ];
    wait_for(
        "the token endpoint to deliver the grant's token",
        Duration::from_secs(60),
        || async { (trust.exchange(&issuer.url, &ask).await.status == 200).then_some(()) },
    )
    .await;
    let delivered_before = delivered_lines(&f).len();

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
    let delivered = wait_for(
        "the agent's Delivered lines",
        Duration::from_secs(15),
        || async {
            let lines = delivered_lines(&f);
            (lines.len() >= delivered_before + 2).then(|| lines[delivered_before..].to_vec())
        },
    )
    .await;
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

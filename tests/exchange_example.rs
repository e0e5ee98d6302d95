//! `examples/token-exchange/` end to end: its objects applied as written, and its agent
//! (`agent.py`, standard-library Python) run as a process with what the kubelet would mount into
//! its Pod — the grant's token from the grant's Secret, a ServiceAccount token bound to that Pod
//! for the issuer's audience, the issuer's CA — against the live token endpoint. Each task gets a
//! token with only its scopes, which names the Pod in its chain; deleting the grant revokes them.

mod support;

use std::{path::Path, process::Stdio, time::Duration};

use delegation_operator::signing;
use serde_json::Value;
use support::{
    verifiers::{Trust, start_https_operator, write_private},
    *,
};

const AUDIENCE: &str = "https://tickets.example.com";

fn example() -> std::path::PathBuf {
    repo_root().join("examples/token-exchange")
}

/// Runs the example agent with the mounted files of `dir`; its exit code and JSON lines.
async fn run_agent(issuer: &str, trust: &Trust, dir: &Path, tasks: &str) -> (i32, Vec<Value>) {
    let out = tokio::process::Command::new("python3")
        .arg(example().join("agent.py"))
        .env("DELEGATION_ISSUER", issuer)
        .env("DELEGATION_CA", &trust.ca_path)
        .env("GRANT_TOKEN_FILE", dir.join("grant-token"))
        .env("ACTOR_TOKEN_FILE", dir.join("delegation-issuer"))
        .env("TASKS", tasks)
        .env("TOKEN_DIR", dir.join("tokens"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("python3 runs the example agent");
    json_lines_of(&out)
}

#[tokio::test]
async fn the_example_agent_narrows_its_grants_token_per_task() {
    let (f, issuer, trust) = start_https_operator("exchange-example", &[]).await;
    let pod = apply_example(&f, &example().join("agent.yaml")).await;
    f.wait_ready("alice-triage-session", "True", Some("Issued"))
        .await;

    // What the kubelet mounts: the grant's Secret, the projected token bound to the Pod.
    let dir = std::env::temp_dir().join(format!("exchange-example-{}", f.ns));
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(dir.join("tokens")).unwrap();
    let grant_token = f
        .token_in("alice-triage-session-token")
        .await
        .expect("the grant's token");
    write_private(&dir.join("grant-token"), &grant_token);
    let actor = request_service_account_token_for(
        &f.client,
        &f.ns,
        "ticket-triage",
        Some(&pod),
        &[&issuer.url],
    )
    .await;
    write_private(&dir.join("delegation-issuer"), &actor);

    // The tasks exactly as the example Pod asks for them.
    let tasks = pod_env(&pod, "TASKS");
    let (code, lines) = run_agent(&issuer.url, &trust, &dir, &tasks).await;
    assert_eq!(code, 0, "the agent succeeded: {lines:?}");
    let agent = format!("agent:{}/ticket-triage", f.ns);
    let expected = [("summarise", "tickets:read"), ("reply", "tickets:comment")];
    assert_eq!(lines.len(), expected.len(), "{lines:?}");
    let jwks = f.jwks().await;
    let pod_uid = pod.metadata.uid.clone().unwrap();
    for (line, (task, scope)) in lines.iter().zip(expected) {
        assert_eq!(line["task"], task);
        assert_eq!(line["scope"], scope);
        assert_eq!(line["expires_in"], 60);
        assert_eq!(line["actors"], serde_json::json!([agent]));
        let token =
            std::fs::read_to_string(dir.join("tokens").join(format!("{task}.token"))).unwrap();
        let claims =
            signing::verify(&token, &jwks, AUDIENCE, 0).expect("the task's token verifies");
        assert_eq!(claims["scope"], scope, "only the task's scope");
        assert_eq!(claims["jti"], line["jti"]);
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            60
        );
        let hop = claims["delegation_chain"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(
            hop["workload"]["pod"], "ticket-triage",
            "the chain names the pod"
        );
        assert_eq!(hop["workload"]["pod_uid"], pod_uid.as_str());
        assert_eq!(
            hop["requested_by"],
            format!("system:serviceaccount:{}:ticket-triage", f.ns)
        );
        let grant_claims = signing::verify(&grant_token, &jwks, AUDIENCE, 0).unwrap();
        let own = &claims["status"]["status_list"];
        let root = &grant_claims["status"]["status_list"];
        let first = grant_claims["lineage"]["first"].as_u64().unwrap();
        let count = grant_claims["lineage"]["count"].as_u64().unwrap();
        assert_eq!(own["uri"], root["uri"], "the grant token's list");
        assert!(
            (first..first + count).contains(&own["idx"].as_u64().unwrap()),
            "its own entry, in the grant token's lineage: {claims}"
        );
        assert_eq!(claims["lineage"], grant_claims["lineage"]);
    }
    let exchanged: Vec<Value> = f
        .operator()
        .audit()
        .into_iter()
        .filter(|r| r["action"] == "Exchanged")
        .collect();
    assert_eq!(exchanged.len(), 2, "one audit line per task");
    assert!(
        exchanged.iter().all(
            |r| r["workload"]["pod"] == "ticket-triage" && r["grant"] == "alice-triage-session"
        )
    );

    // The grant deleted: its lineage is revoked, and the agent is refused from then on.
    f.delete_grant("alice-triage-session").await;
    f.wait_grant_gone("alice-triage-session", "deleted", Duration::from_secs(60))
        .await;
    std::fs::remove_dir_all(dir.join("tokens")).unwrap();
    std::fs::create_dir(dir.join("tokens")).unwrap();
    let (code, lines) = run_agent(&issuer.url, &trust, &dir, "late=tickets:read:30").await;
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(lines[0]["refused"], "invalid_grant", "{lines:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

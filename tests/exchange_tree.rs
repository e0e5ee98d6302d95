//! `tree` shows the live tokens exchanged from a grant's token as a count under the grant (issue
//! #20, item 4: counts, not tokens), from what the replica serving `/token` publishes in ConfigMap
//! `delegation-operator-exchanges` — at most every 30 s, so the test waits on the count itself. A
//! user who may not read that ConfigMap still gets the tree, and a note saying the counts were not
//! readable.
//!
//! The exchanges go through the real binary (`delegation-operator token exchange`) at the live
//! endpoint of `run`, with a pod-bound ServiceAccount token for the issuer's audience. No token is
//! ever printed: they are kept in private files, and the outputs are checked to carry none.

mod support;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{ConfigMap, ServiceAccount},
};
use kube::{Api, api::PostParams};
use support::{verifiers::start_https_operator, *};

const AGENT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: worker}
spec:
  owner: {kind: Group, name: platform}
  serviceAccountName: worker
  allowedScopes: [tickets:read, tickets:write]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
"#;

const GRANT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: task}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: worker}
  scopes: [tickets:read, tickets:write]
  audience: https://tickets.example.com
  tokenTTL: 10m
"#;

/// How long the exchanged tokens live: short, so the test sees their count go.
const EXCHANGED_LIFETIME: u64 = 15;

/// A private directory for the tokens (0700, files 0600), removed at the end.
struct Private(PathBuf);

impl Private {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("exchange-tree-{}", uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        path
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A token of `service_account` bound to a pod running as it, for `audience`.
async fn pod_bound_token(f: &Fixture, service_account: &str, audience: &str) -> String {
    let pod = pod_running_as(&f.client, &f.ns, service_account).await;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_owned()]),
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(f.client.clone(), &f.ns)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .and_then(|s| s.token)
        .expect("a token")
}

fn binary(args: &[&str], kubeconfig: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap()
}

/// `tree -n <ns> --operator-namespace <op-ns>` as the holder of `kubeconfig`: stdout and stderr.
fn tree(f: &Fixture, kubeconfig: &Path) -> (String, String) {
    let out = binary(
        &[
            "tree",
            "-n",
            &f.ns,
            "--operator-namespace",
            &f.operator_namespace(),
        ],
        kubeconfig,
    );
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(out.status.success(), "tree failed: {stderr}");
    (stdout, stderr)
}

/// The line below the grant's, if it is the count of exchanged tokens.
fn exchanged_line(tree: &str) -> Option<String> {
    let mut lines = tree.lines();
    lines.find(|l| l.contains("DelegationGrant/task "))?;
    lines
        .next()
        .filter(|l| l.contains("exchanged:"))
        .map(|l| l.trim().to_owned())
}

fn carries_no_token(text: &str, tokens: &[&str]) {
    for token in tokens {
        for part in token.split('.').filter(|p| p.len() >= 16) {
            assert!(!text.contains(part), "the output carries a token");
        }
    }
}

#[tokio::test]
async fn tree_counts_live_exchanged_tokens_under_their_grant_until_they_expire() {
    let (f, issuer, trust) = start_https_operator("exchange-tree", &[]).await;
    f.apply(AGENT).await;
    f.apply(GRANT).await;
    f.wait_ready_within("task", "True", None, Duration::from_secs(90))
        .await;
    let grant_token = wait_for("the grant's token", Duration::from_secs(30), || async {
        f.token_in("task-token").await
    })
    .await;
    let actor_token = pod_bound_token(&f, "worker", &issuer.url).await;
    let private = Private::new();
    let subject_file = private.write("subject", &grant_token);
    let actor_file = private.write("actor", &actor_token);
    let admin = kubeconfig_path();

    // The operator created the ConfigMap when it started (the chart does in a cluster).
    let configmaps: Api<ConfigMap> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    wait_for(
        "ConfigMap delegation-operator-exchanges",
        Duration::from_secs(30),
        || async {
            configmaps
                .get_opt("delegation-operator-exchanges")
                .await
                .ok()
                .flatten()
        },
    )
    .await;
    let (before, _) = tree(&f, &admin);
    assert_eq!(exchanged_line(&before), None, "{before}");

    let mut issued = Vec::new();
    for i in 0..3 {
        let output = private.0.join(format!("exchanged-{i}"));
        let out = binary(
            &[
                "token",
                "exchange",
                "--issuer-url",
                &issuer.url,
                "--ca",
                trust.ca_path.to_str().unwrap(),
                "--subject-token-file",
                subject_file.to_str().unwrap(),
                "--actor-token-file",
                actor_file.to_str().unwrap(),
                "--scope",
                "tickets:read",
                "--expires-in",
                &EXCHANGED_LIFETIME.to_string(),
                "--output-file",
                output.to_str().unwrap(),
            ],
            &admin,
        );
        assert!(
            out.status.success(),
            "exchange {i} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        issued.push(std::fs::read_to_string(&output).unwrap());
    }
    let exchanged_at = std::time::Instant::now();
    let mut tokens: Vec<&str> = issued.iter().map(|t| t.trim()).collect();
    tokens.extend([grant_token.as_str(), actor_token.as_str()]);

    // Written within the replica's 30 s period (and whatever the machine adds).
    let shown = wait_for(
        "tree to show 3 live exchanged tokens",
        Duration::from_secs(45),
        || async {
            let (out, _) = tree(&f, &admin);
            (exchanged_line(&out).as_deref() == Some("exchanged: 3 live")).then_some(out)
        },
    )
    .await;
    carries_no_token(&shown, &tokens);
    // The published entry is a count per grant, nothing of a token.
    let cm = configmaps
        .get("delegation-operator-exchanges")
        .await
        .unwrap();
    let data = cm.data.unwrap_or_default();
    assert_eq!(data.len(), 1, "one replica, one entry: {:?}", data.keys());
    let entry: serde_json::Value = serde_json::from_str(data.values().next().unwrap()).unwrap();
    let uid = f.grants().get("task").await.unwrap().metadata.uid.unwrap();
    assert_eq!(
        entry["grants"],
        serde_json::json!({ format!("{}/task/{uid}", f.ns): 3 }),
        "{entry}"
    );
    carries_no_token(&entry.to_string(), &tokens);

    // Someone who may read the grants but not the operator's ConfigMap: the tree, and a note.
    ensure_service_account(&f.client, &f.ns, "reader").await;
    grant_role(
        &f.client,
        &f.ns,
        "tree-reader",
        &[service_account_subject(&f.ns, "reader")],
        &[rule(
            "delegation.nhi.dev",
            &["delegationgrants", "agentidentities"],
            &["list"],
            &[],
        )],
    )
    .await;
    let reader = service_account_kubeconfig(&f.client, &f.ns, "reader").await;
    let (out, err) = wait_for("the reader's tree", Duration::from_secs(30), || async {
        let out = binary(
            &[
                "tree",
                "-n",
                &f.ns,
                "--operator-namespace",
                &f.operator_namespace(),
            ],
            &reader,
        );
        out.status.success().then(|| {
            (
                String::from_utf8(out.stdout).unwrap(),
                String::from_utf8(out.stderr).unwrap(),
            )
        })
    })
    .await;
    let _ = std::fs::remove_file(&reader);
    assert!(out.contains("DelegationGrant/task "), "{out}");
    assert_eq!(exchanged_line(&out), None, "{out}");
    assert_eq!(
        err.matches("exchanged-token counts were not readable")
            .count(),
        1,
        "{err}"
    );

    // Once the tokens have expired (the end of their minute) the next write withdraws them.
    let (gone, _) = wait_for(
        "the count to go once the exchanged tokens expired",
        Duration::from_secs(EXCHANGED_LIFETIME + 60 + 30 + 30),
        || async {
            let (out, err) = tree(&f, &admin);
            exchanged_line(&out).is_none().then_some((out, err))
        },
    )
    .await;
    assert!(
        exchanged_at.elapsed() >= Duration::from_secs(EXCHANGED_LIFETIME),
        "the count went before the tokens expired: {gone}"
    );
    assert!(gone.contains("DelegationGrant/task "), "{gone}");
    let output = f.operator().raw_output();
    carries_no_token(&output, &tokens[..3]);
}

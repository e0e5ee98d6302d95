//! `tree` shows the live tokens exchanged from a grant's token as a count under the grant (issue
//! #20, item 4: counts, not tokens), from what the replica serving `/token` publishes in ConfigMap
//! `delegation-operator-exchanges` — at most every 30 s, so the test waits on the count itself. A
//! user who may not read that ConfigMap still gets the tree, and a note saying the counts were not
//! readable.
//!
//! The exchanges are made at the live endpoint of `run` by a pod-bound workload (the
//! [`support::exchange::Exchange`] fixture); `tree` is the real binary. No token is ever printed:
//! the outputs are checked to carry none.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use support::{
    exchange::{Exchange, GRANT, Step, contains_token},
    *,
};

/// How long the exchanged tokens live: short, so the test sees their count go, and longer than the
/// replica's 30 s between writes, so that the first write after the exchanges still counts them
/// (with 15 s, a write that came after the end of their minute found them expired: a flaky test).
const EXCHANGED_LIFETIME: u64 = 45;

/// `tree -n <ns> --operator-namespace <op-ns>` as the holder of `kubeconfig`: whether it succeeded,
/// stdout and stderr.
fn tree(f: &Fixture, kubeconfig: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
        .args([
            "tree",
            "-n",
            &f.ns,
            "--operator-namespace",
            &f.operator_namespace(),
        ])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `tree` as the admin: stdout.
fn admin_tree(f: &Fixture) -> String {
    let (ok, out, err) = tree(f, &kubeconfig_path());
    assert!(ok, "tree failed: {err}");
    out
}

/// The line below the grant's, if it is the count of exchanged tokens.
fn exchanged_line(tree: &str) -> Option<String> {
    let mut lines = tree.lines();
    lines.find(|l| l.contains(&format!("DelegationGrant/{GRANT} ")))?;
    lines
        .next()
        .filter(|l| l.contains("exchanged:"))
        .map(|l| l.trim().to_owned())
}

fn carries_no_token(text: &str, tokens: &[&str]) {
    for token in tokens {
        assert!(!contains_token(text, token), "the output carries a token");
    }
}

#[tokio::test]
async fn tree_counts_live_exchanged_tokens_under_their_grant_until_they_expire() {
    let x = Exchange::start("exchange-tree").await;
    let f = &x.f;

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
    let before = admin_tree(f);
    assert_eq!(exchanged_line(&before), None, "{before}");

    let lifetime = EXCHANGED_LIFETIME.to_string();
    let mut issued = Vec::new();
    for _ in 0..3 {
        let (token, _) = x
            .exchanged(
                &x.grant_token,
                &x.a,
                Step::Narrowing,
                &[("scope", "tickets:read"), ("expires_in", &lifetime)],
            )
            .await;
        issued.push(token);
    }
    let exchanged_at = std::time::Instant::now();
    let mut tokens: Vec<&str> = issued.iter().map(String::as_str).collect();
    tokens.extend([x.grant_token.as_str(), x.a.token.as_str()]);

    // Written at the replica's next 30 s tick (two periods: a write that fails is tried again at
    // the next one).
    let shown = wait_for(
        "tree to show 3 live exchanged tokens",
        Duration::from_secs(75),
        || async {
            let out = admin_tree(f);
            (exchanged_line(&out).as_deref() == Some("exchanged: 3 live")).then_some(out)
        },
    )
    .await;
    carries_no_token(&shown, &tokens);
    // The published entry is a count per grant, nothing of a token.
    let data = configmaps
        .get("delegation-operator-exchanges")
        .await
        .unwrap()
        .data
        .unwrap_or_default();
    assert_eq!(data.len(), 1, "one replica, one entry: {:?}", data.keys());
    let entry: serde_json::Value = serde_json::from_str(data.values().next().unwrap()).unwrap();
    let uid = f.grants().get(GRANT).await.unwrap().metadata.uid.unwrap();
    assert_eq!(
        entry["grants"],
        serde_json::json!({ format!("{}/{GRANT}/{uid}", f.ns): 3 }),
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
        let (ok, out, err) = tree(f, &reader);
        ok.then_some((out, err))
    })
    .await;
    let _ = std::fs::remove_file(&reader);
    assert!(out.contains(&format!("DelegationGrant/{GRANT} ")), "{out}");
    assert_eq!(exchanged_line(&out), None, "{out}");
    assert_eq!(
        err.matches("exchanged-token counts were not readable")
            .count(),
        1,
        "{err}"
    );

    // Once the tokens have expired (at the end of their minute) the next write withdraws them.
    let gone = wait_for(
        "the count to go once the exchanged tokens expired",
        Duration::from_secs(EXCHANGED_LIFETIME + 60 + 30 + 30),
        || async {
            let out = admin_tree(f);
            exchanged_line(&out).is_none().then_some(out)
        },
    )
    .await;
    assert!(
        exchanged_at.elapsed() >= Duration::from_secs(EXCHANGED_LIFETIME),
        "the count went before the tokens expired: {gone}"
    );
    assert!(
        gone.contains(&format!("DelegationGrant/{GRANT} ")),
        "{gone}"
    );
    carries_no_token(&f.operator().raw_output(), &tokens);
}

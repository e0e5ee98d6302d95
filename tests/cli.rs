//! The commands for people, run as a person runs them: the real binary (directly, and as the kubectl
//! plugin `kubectl delegation` through real kubectl) against the real apiserver and a running
//! operator: `token inspect` verifies a token from the cluster's published keys and status lists or
//! over the operator's HTTPS endpoints, and `tree` shows the grants as a tree.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use support::*;

const SUSPENDED: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: paused}
spec:
  principal: {kind: User, name: carol@example.com}
  actorRef: {name: notifier}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 5m
  suspended: true
"#;

const BRIEF: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: brief}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: notifier}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 2s
"#;

/// The binary's output and exit code.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code().expect("exited, not killed"),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }
}

/// Runs `delegation-operator ARGS` against the test control plane, `stdin` piped in.
fn run(args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
        .args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap().into()
}

/// `token inspect` reading the token from stdin, with the cluster as the source.
fn inspect_stdin(f: &Fixture, token: &str, extra: &[&str]) -> Run {
    let opns = f.operator_namespace();
    let mut args = vec!["token", "inspect", "-", "--operator-namespace", &opns];
    args.extend(extra);
    let out = run(&args, token);
    assert_never_shows(&out, token);
    out
}

/// Neither the token nor its signature (nor its payload) appears in anything printed.
fn assert_never_shows(out: &Run, token: &str) {
    let mut parts = token.split('.');
    let (_, payload, signature) = (parts.next(), parts.next(), parts.next());
    for shown in [&out.stdout, &out.stderr] {
        assert!(!shown.contains(token), "the token was printed");
        for part in [payload, signature].into_iter().flatten() {
            assert!(
                part.len() < 8 || !shown.contains(part),
                "part of the token was printed"
            );
        }
    }
}

/// The token with its payload changed (the signature left as it was).
fn tampered(token: &str, from: &str, to: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert!(payload.contains(from));
    let forged = URL_SAFE_NO_PAD.encode(payload.replace(from, to));
    format!("{}.{forged}.{}", parts[0], parts[2])
}

fn verdict(out: &Run) -> &str {
    out.stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output; stderr: {}", out.stderr))
}

#[tokio::test]
async fn token_inspect_verifies_from_the_cluster_and_reports_tampering_and_revocation() {
    let f = Fixture::start("cli-inspect", &[]).await;
    f.apply(CHAIN_AGENTS).await;
    f.apply(CHAIN_GRANTS).await;
    for g in ["g1", "g2", "g3"] {
        f.wait_ready(g, "True", Some("Issued")).await;
    }
    let (ns, opns) = (f.ns.clone(), f.operator_namespace());
    let token = f.token_in("g3-token").await.expect("g3 has a token");

    // From the grant: the chain as a person reads it, and a VALID verdict with exit code 0.
    let out = run(
        &[
            "token",
            "inspect",
            "grant/g3",
            "-n",
            &ns,
            "--operator-namespace",
            &opns,
        ],
        "",
    );
    assert_never_shows(&out, &token);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let text = &out.stdout;
    for expected in [
        "signature   verified (ES256 kid ".to_owned(),
        format!("grant       {ns}/g3 (uid "),
        "principal   user:alice@example.com (User): whose authority this is".into(),
        format!(
            "chain       1. alice@example.com -> agent:{ns}/orchestrator  (grant g1, scopes tickets:read cases:read)"
        ),
        format!(
            "            2. agent:{ns}/orchestrator -> agent:{ns}/summarizer  (grant g2, scopes tickets:read cases:read)"
        ),
        format!(
            "            3. agent:{ns}/summarizer -> agent:{ns}/notifier  (grant g3, scopes tickets:read)"
        ),
        "               requested by ".into(),
        format!(
            "actors      agent:{ns}/orchestrator -> agent:{ns}/summarizer -> agent:{ns}/notifier (current: agent:{ns}/notifier)"
        ),
        "scopes      tickets:read\n".into(),
        "audience    https://tickets.example.com\n".into(),
        "status      VALID  (index ".into(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    assert!(
        regex_lite::Regex::new(
            r"\nexpires     \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in [45]m( \d+s)?\)\n"
        )
        .unwrap()
        .is_match(text),
        "{text}"
    );
    assert_eq!(verdict(&out), "verdict: VALID");
    // The key id shown is the one the published JWKS holds.
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    assert!(text.contains(&format!("kid {kid}, in the JWKS")));
    assert!(
        f.jwks().await["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == kid.as_str())
    );

    // From stdin, as JSON: the same facts, machine-readable.
    let out = inspect_stdin(&f, &token, &["-o", "json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["signatureVerified"], true);
    assert_eq!(json["claims"]["sub"], "user:alice@example.com");
    assert_eq!(json["claims"]["delegation.nhi.dev/grant"]["name"], "g3");
    assert_eq!(
        json["actors"],
        json!([
            format!("agent:{ns}/notifier"),
            format!("agent:{ns}/summarizer"),
            format!("agent:{ns}/orchestrator")
        ])
    );
    assert_eq!(json["status"]["state"], "valid");
    assert_eq!(json["problems"], json!([]));
    // The token as an argument works too (and is not echoed either).
    let out = run(
        &["token", "inspect", &token, "--operator-namespace", &opns],
        "",
    );
    assert_never_shows(&out, &token);
    assert_eq!((out.code, verdict(&out)), (0, "verdict: VALID"));
    // A required audience it does not have.
    let out = inspect_stdin(&f, &token, &["--audience", "https://payments.example.com"]);
    assert_eq!(out.code, 1);
    assert_eq!(
        verdict(&out),
        "verdict: INVALID: wrong audience (for https://tickets.example.com, not https://payments.example.com)"
    );

    // Tampered: more scopes in the payload, the signature unchanged.
    let forged = tampered(
        &token,
        "\"scope\":\"tickets:read\"",
        "\"scope\":\"tickets:read tickets:write\"",
    );
    let out = inspect_stdin(&f, &forged, &[]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout
            .starts_with("signature   NOT verified (ES256 kid "),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("status      not checked (the claims are not trusted)")
    );
    assert_eq!(verdict(&out), "verdict: INVALID: bad signature");
    // `alg: none` with our kid and typ: refused before any claim is looked at.
    let header =
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "at+jwt", "kid": kid}).to_string());
    let unsigned = format!("{header}.{}.", token.split('.').nth(1).unwrap());
    let out = inspect_stdin(&f, &unsigned, &[]);
    assert_eq!(out.code, 1);
    assert_eq!(
        verdict(&out),
        "verdict: INVALID: malformed token (not a compact JWS)"
    );

    // Revoked: suspend g3, keep its old token; the published status list says INVALID.
    let claims = f.verified_claims("g3-token").await.unwrap();
    f.patch_grant("g3", json!({"spec": {"suspended": true}}))
        .await;
    f.wait_ready("g3", "False", None).await;
    wait_for(
        "g3's entry published INVALID",
        Duration::from_secs(20),
        || async { (f.published_status(&claims["status"]).await == 1).then_some(()) },
    )
    .await;
    let out = inspect_stdin(&f, &token, &[]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("signature   verified"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("status      INVALID (revoked)  (index "),
        "{}",
        out.stdout
    );
    assert_eq!(
        verdict(&out),
        "verdict: INVALID: revoked (status list entry INVALID)"
    );
    let json: Value =
        serde_json::from_str(&inspect_stdin(&f, &token, &["-o", "json"]).stdout).unwrap();
    assert_eq!(
        (&json["valid"], &json["status"]["state"]),
        (&json!(false), &json!("invalid"))
    );

    // Deleted: g2's kept token reads revoked too; and a grant without a token cannot be inspected.
    let g2_token = f.token_in("g2-token").await.unwrap();
    f.delete_grant("g2").await;
    let out = inspect_stdin(&f, &g2_token, &[]);
    assert_eq!(
        (out.code, verdict(&out)),
        (1, "verdict: INVALID: revoked (status list entry INVALID)")
    );
    let out = run(
        &[
            "token",
            "inspect",
            "g3",
            "-n",
            &ns,
            "--operator-namespace",
            &opns,
        ],
        "",
    );
    assert_eq!(out.code, 2, "{}", out.stdout);
    assert!(
        out.stderr
            .contains(&format!("DelegationGrant {ns}/g3 has no token")),
        "{}",
        out.stderr
    );

    // Expired: a token of a 2s grant, kept past its exp (the grant suspended so that it stops
    // renewing; its revocation is reported after the expiry).
    f.apply(BRIEF).await;
    // Issued or already Rotated: a 2 s token is renewed about every 1.3 s, and an issuance slowed by
    // a loaded machine can leave "Issued" showing for less than one poll.
    f.wait_ready("brief", "True", None).await;
    let brief = f.token_in("brief-token").await.unwrap();
    f.patch_grant("brief", json!({"spec": {"suspended": true}}))
        .await;
    let exp = f.jwks().await;
    let exp = delegation_operator::signing::verify(&brief, &exp, "https://tickets.example.com", 60)
        .unwrap()["exp"]
        .as_i64()
        .unwrap();
    wait_for(
        "the brief token to expire",
        Duration::from_secs(10),
        || async { (k8s_openapi::jiff::Timestamp::now().as_second() > exp).then_some(()) },
    )
    .await;
    let out = inspect_stdin(&f, &brief, &[]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("signature   verified"),
        "{}",
        out.stdout
    );
    assert!(
        verdict(&out).starts_with("verdict: INVALID: expired"),
        "{}",
        out.stdout
    );

    // The wrong operator namespace: could not check (2), and says where it looked.
    let out = run(
        &["token", "inspect", "-", "--operator-namespace", &ns],
        &token,
    );
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("delegation-operator-jwks does not exist"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn token_inspect_verifies_over_the_operators_https_endpoints() {
    // Trusting exactly the CA of the serving certificate the operator generated.
    let (f, issuer, trust) = verifiers::start_https_operator("cli-https", &[]).await;
    let issuer = issuer.url;
    let ca_path = trust.ca_path.to_str().unwrap().to_owned();
    f.apply(CHAIN_AGENTS).await;
    f.apply(CHAIN_GRANTS).await;
    f.wait_ready("g3", "True", Some("Issued")).await;
    let token = f.token_in("g3-token").await.unwrap();

    // No kubeconfig at all: everything comes from the endpoints.
    let https = |stdin: &str, extra: &[&str]| {
        let mut args = vec![
            "token",
            "inspect",
            "-",
            "--issuer-url",
            &issuer,
            "--ca",
            &ca_path,
        ];
        args.extend(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
            .args(&args)
            .env("KUBECONFIG", "/nonexistent")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out: Run = child.wait_with_output().unwrap().into();
        assert_never_shows(&out, stdin);
        out
    };
    let out = https(&token, &[]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&format!("issuer      {issuer}\n")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("status      VALID  (index "));
    assert!(out.stdout.contains(&format!("of {issuer}/statuslists/")));
    assert_eq!(verdict(&out), "verdict: VALID");

    let forged = tampered(&token, "alice@example.com", "mallory@example.com");
    let out = https(&forged, &[]);
    assert_eq!(
        (out.code, verdict(&out)),
        (1, "verdict: INVALID: bad signature")
    );

    // Without the CA, the endpoint's certificate is not trusted: could not check.
    let out = run(&["token", "inspect", "-", "--issuer-url", &issuer], &token);
    assert_eq!(out.code, 2, "{}", out.stdout);
    assert!(out.stderr.starts_with("error: "), "{}", out.stderr);

    // Revoked by deletion, read from the published list over HTTPS.
    let claims = f.verified_claims("g3-token").await.unwrap();
    assert!(
        claims["status"]["status_list"]["uri"]
            .as_str()
            .unwrap()
            .starts_with(&issuer)
    );
    // The entry is set INVALID and published before the grant is released.
    f.delete_grant("g3").await;
    let out = https(&token, &["-o", "json"]);
    assert_eq!(out.code, 1);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["status"]["state"], "invalid");
    assert_eq!(
        json["problems"],
        json!(["revoked (status list entry INVALID)"])
    );
}

/// A directory with `kubectl-delegation` linked to the binary, removed when dropped.
struct PluginDir(PathBuf);

impl PluginDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kubectl-plugin-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_delegation-operator"),
            dir.join("kubectl-delegation"),
        )
        .unwrap();
        Self(dir)
    }

    /// Runs the real kubectl with this directory first on PATH.
    fn kubectl(&self, args: &[&str]) -> Run {
        let path = std::env::join_paths(std::iter::once(self.0.clone()).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ))
        .unwrap();
        Command::new(kubectl_path())
            .args(args)
            .env("PATH", path)
            .env("KUBECONFIG", kubeconfig_path())
            .output()
            .unwrap()
            .into()
    }
}

impl Drop for PluginDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_tree(text: &str) {
    let row = |line: &str| -> Vec<String> {
        line.split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let rows: Vec<Vec<String>> = text.lines().map(row).collect();
    let find = |name: &str| -> &Vec<String> {
        rows.iter()
            .find(|r| r.first().map(String::as_str) == Some(name))
            .unwrap_or_else(|| panic!("no row {name:?} in:\n{text}"))
    };
    assert_eq!(
        rows[0],
        ["NAME", "READY", "REASON", "AGENT", "SCOPES", "EXPIRES"]
    );
    // Principals are roots; each grant sits under its parent, in order.
    let names: Vec<&str> = rows
        .iter()
        .take_while(|r| !r.is_empty())
        .map(|r| r[0].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "NAME",
            "User/alice@example.com",
            "└─DelegationGrant/g1",
            "└─DelegationGrant/g2",
            "└─DelegationGrant/g3",
            "User/carol@example.com",
            "└─DelegationGrant/paused [suspended]",
        ]
    );
    assert!(text.contains("\n└─DelegationGrant/g1 "), "{text}");
    assert!(text.contains("\n  └─DelegationGrant/g2 "), "{text}");
    assert!(text.contains("\n    └─DelegationGrant/g3 "), "{text}");
    assert_eq!(
        &find("└─DelegationGrant/g1")[1..5],
        ["True", "Issued", "orchestrator", "tickets:read,cases:read"]
    );
    assert_eq!(
        &find("└─DelegationGrant/g3")[1..5],
        ["True", "Issued", "notifier", "tickets:read"]
    );
    assert!(find("└─DelegationGrant/g3")[5].starts_with("in "), "{text}");
    let paused = find("└─DelegationGrant/paused [suspended]");
    assert_eq!(paused[1], "False");
    assert_eq!(paused[5], "-");
    // Then the agents.
    assert_eq!(
        find("AGENT")[1..],
        ["READY", "REASON", "OWNER", "GRANTS", "ALLOWED SCOPES"]
    );
    assert_eq!(find("AgentIdentity/notifier")[3], "User/bob@example.com");
    assert_eq!(find("AgentIdentity/orchestrator")[3], "Group/platform");
}

#[tokio::test]
async fn tree_shows_the_grants_and_runs_as_a_kubectl_plugin() {
    let f = Fixture::start("cli-tree", &[]).await;
    f.apply(CHAIN_AGENTS).await;
    f.apply(CHAIN_GRANTS).await;
    f.apply(SUSPENDED).await;
    for g in ["g1", "g2", "g3"] {
        f.wait_ready(g, "True", Some("Issued")).await;
    }
    f.wait_ready("paused", "False", None).await;
    let ns = f.ns.clone();

    let out = run(&["tree", "-n", &ns], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_tree(&out.stdout);
    // All namespaces: the same rows with a NAMESPACE column in front.
    let out = run(&["tree", "-A"], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let ours: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with(&format!("{ns} ")))
        .collect();
    assert!(
        ours.iter().any(|l| l.contains("    └─DelegationGrant/g3 ")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.starts_with("NAMESPACE "));

    // As a kubectl plugin: `kubectl delegation ...` through the real kubectl.
    let plugin = PluginDir::new(&ns);
    let out = plugin.kubectl(&["delegation", "tree", "-n", &ns]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_tree(&out.stdout);
    let out = plugin.kubectl(&["delegation", "--help"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("Usage: kubectl delegation <COMMAND>"),
        "{}",
        out.stdout
    );
    let out = plugin.kubectl(&["delegation", "tree", "--bogus"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("Usage: kubectl delegation tree"),
        "{}",
        out.stderr
    );
    let out = plugin.kubectl(&[
        "delegation",
        "token",
        "inspect",
        "grant/g1",
        "-n",
        &ns,
        "--operator-namespace",
        &f.operator_namespace(),
    ]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(verdict(&out), "verdict: VALID");

    // An empty namespace says so.
    let empty = fresh_namespace(&f.client, "cli-empty").await;
    let out = run(&["tree", "-n", &empty], "");
    assert_eq!((out.code, out.stdout.as_str()), (0, ""));
    assert!(
        out.stderr
            .contains("No DelegationGrants or AgentIdentities found")
    );
}

//! The verification server apart (`delegation-operator serve`): the operator runs as the controller
//! only (`--verification-endpoints=false`, its listener serving probes and metrics), and the server
//! runs as a process of its own whose client is a ServiceAccount bound to exactly the chart's verifier
//! RBAC (rendered from the chart by helm and applied), with the serving certificate written to files
//! as the kubelet mounts the TLS Secret. What it serves must be what the controller produced, and its
//! identity must be unable to read any Secret.

mod support;

use std::{path::PathBuf, process::Stdio, time::Duration};

use delegation_operator::{signing, verification};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Secret},
    rbac::v1::PolicyRule,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;
use support::{
    helm,
    verifiers::{Trust, introspection_caller},
    *,
};

const AUDIENCE: &str = "https://tickets.example.com";

const AGENT_AND_GRANT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: triage}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: tickets}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: triage}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
"#;

/// The chart's verifier identity (ServiceAccount, Role, ClusterRole and their bindings), rendered by
/// helm for a release in the operator namespace and applied; the cluster-scoped part is deleted on
/// drop.
struct ChartVerifierIdentity {
    namespace: String,
    name: String,
    /// Every rule bound to it, with the namespace it applies in ("" cluster-wide).
    rules: Vec<(String, PolicyRule)>,
}

impl ChartVerifierIdentity {
    /// Renders it with the chart's values changed by `values` (`--set` arguments).
    async fn apply(client: &Client, namespace: &str, values: &[&str]) -> Self {
        let release = format!("vs-{}", &namespace[namespace.len() - 8..]);
        let mut args = vec!["--show-only", "templates/verifier-rbac.yaml"];
        for value in values {
            args.extend(["--set", value]);
        }
        let docs = helm::template(&release, namespace, &args)
            .unwrap_or_else(|e| panic!("helm template: {e}"));
        let account = docs
            .iter()
            .find(|d| d["kind"] == "ServiceAccount")
            .expect("the chart renders the verifier's ServiceAccount");
        let name = account["metadata"]["name"].as_str().unwrap().to_owned();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
        let file = std::env::temp_dir().join(format!("{release}-verifier-rbac.json"));
        std::fs::write(&file, list.to_string()).unwrap();
        let out = kubectl(&["apply", "-f", file.to_str().unwrap()]).await;
        let _ = std::fs::remove_file(&file);
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rules = docs
            .iter()
            .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
            .flat_map(|role| {
                let applies_in = role["metadata"]["namespace"].as_str().unwrap_or("");
                role["rules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        let rule: PolicyRule = serde_json::from_value(r.clone()).unwrap();
                        (applies_in.to_owned(), rule)
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        let identity = Self {
            namespace: namespace.to_owned(),
            name,
            rules,
        };
        // The bindings reach the authorizer a moment after the write returns.
        let subject = service_account_subject(namespace, &identity.name);
        for (applies_in, rule) in &identity.rules {
            wait_allowed(client, applies_in, &subject, rule).await;
        }
        identity
    }
}

impl Drop for ChartVerifierIdentity {
    fn drop(&mut self) {
        let _ = std::process::Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(kubeconfig_path())
            .args(["delete", "--ignore-not-found", "--wait=false"])
            .arg(format!("clusterrolebinding/{}", self.name))
            .arg(format!("clusterrole/{}", self.name))
            .output();
    }
}

/// `delegation-operator serve`, killed on drop; its log goes to a file.
struct VerificationServer {
    child: std::process::Child,
    log: PathBuf,
    files: Vec<PathBuf>,
}

impl VerificationServer {
    /// Starts it with `kubeconfig` (the ServiceAccount's) and the TLS Secret's certificate and key
    /// written to private files, as the kubelet mounts them, and `extra` flags.
    fn start(
        kubeconfig: &std::path::Path,
        namespace: &str,
        issuer: &str,
        tls: &Secret,
        extra: &[&str],
    ) -> Self {
        let dir = std::env::temp_dir().join("delegation-operator-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let stamp = uuid::Uuid::new_v4().simple().to_string();
        let data = tls.data.as_ref().unwrap();
        let mut files = Vec::new();
        for key in ["tls.crt", "tls.key"] {
            let path = dir.join(format!("{stamp}-{key}"));
            write_private(&path, &data[key].0);
            files.push(path);
        }
        let log = dir.join(format!("{namespace}-serve-{stamp}.log"));
        let address = issuer.trim_start_matches("https://");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
            .arg("serve")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--operator-namespace", namespace, "--issuer", issuer])
            .args(["--https-address", address])
            .arg("--tls-cert-file")
            .arg(&files[0])
            .arg("--tls-key-file")
            .arg(&files[1])
            .args(extra)
            .env("RUST_LOG", "info,delegation_operator=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start delegation-operator serve");
        files.push(kubeconfig.to_owned());
        Self { child, log, files }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for VerificationServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

fn write_private(path: &std::path::Path, content: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut file, content).unwrap();
}

async fn client_of(kubeconfig: &std::path::Path) -> Client {
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    Client::try_from(config).unwrap()
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(ref s)) if s.code == 403)
}

/// GETs `path` of `base` until it answers `status`; returns the answer.
async fn wait_status(
    trust: &Trust,
    base: &str,
    path: &str,
    status: u16,
) -> support::verifiers::HttpResponse {
    wait_for(
        &format!("{base}{path} to answer {status}"),
        Duration::from_secs(60),
        || async {
            trust
                .get(&format!("{base}{path}"))
                .await
                .ok()
                .filter(|r| r.status == status)
        },
    )
    .await
}

/// Waits until the verification server's introspection of `token` says `active`; its answer.
async fn wait_introspected(
    trust: &Trust,
    issuer: &str,
    caller: &str,
    token: &str,
    active: bool,
) -> serde_json::Value {
    wait_for(
        &format!("introspection by the server to say active: {active}"),
        Duration::from_secs(30),
        || async {
            let body = trust.introspect(issuer, caller, token).await.json();
            (body["active"] == active).then_some(body)
        },
    )
    .await
}

/// The token's status in the list the verification server serves at the token's `uri`, verified
/// with the JWKS it serves.
async fn served_status(trust: &Trust, issuer: &str, token: &str) -> String {
    let jwks = trust
        .get(&format!("{issuer}/.well-known/jwks.json"))
        .await
        .unwrap()
        .json();
    let claims = verification::unverified_claims(token).unwrap();
    let uri = claims["status"]["status_list"]["uri"].as_str().unwrap();
    let list = trust.get(uri).await.unwrap();
    assert_eq!(list.status, 200, "{uri}");
    assert_eq!(list.content_type, "application/statuslist+jwt");
    let lists = [(
        delegation_operator::status_list::data_key(uri),
        String::from_utf8(list.body).unwrap(),
    )]
    .into();
    let verified = verification::verify(token, &jwks, &lists, Some(AUDIENCE), 0)
        .expect("the token and its list verify with what the server serves");
    format!("{:?}", verified.status)
}

#[tokio::test]
async fn a_separate_verification_server_serves_what_the_controller_publishes_and_reads_no_secret() {
    // The controller alone: its listener serves probes and metrics, nothing for verifiers.
    let controller = format!("https://127.0.0.1:{}", free_port());
    let issuer = format!("https://127.0.0.1:{}", free_port());
    let f = Fixture::start(
        "verification-server",
        &[
            "--issuer",
            &issuer,
            "--https-address",
            controller.trim_start_matches("https://"),
            "--verification-endpoints=false",
        ],
    )
    .await;
    let operator_ns = f.operator_namespace();
    let trust = Trust::from_operator(&f).await;
    wait_status(&trust, &controller, "/readyz", 200).await;
    for path in [
        "/.well-known/openid-configuration",
        "/.well-known/jwks.json",
    ] {
        let reply = trust.get(&format!("{controller}{path}")).await.unwrap();
        assert_eq!(reply.status, 404, "the controller serves {path}");
    }

    // The server, under the chart's verifier identity, its certificate from files.
    let identity = ChartVerifierIdentity::apply(&f.client, &operator_ns, &[]).await;
    let kubeconfig =
        service_account_kubeconfig(&f.client, &identity.namespace, &identity.name).await;
    let verifier_client = client_of(&kubeconfig).await;
    let tls = f.serving_certificate().await;
    let server = VerificationServer::start(&kubeconfig, &operator_ns, &issuer, &tls, &[]);
    wait_status(&trust, &issuer, "/readyz", 200).await;
    trust.wait_discovery(&f, &issuer).await;

    f.apply(AGENT_AND_GRANT).await;
    f.wait_ready("tickets", "True", Some("Issued")).await;
    let token = f.token_in("tickets-token").await.expect("a token");

    // Its JWKS is the one the controller published, and the grant's token verifies with it.
    let jwks = wait_status(&trust, &issuer, "/.well-known/jwks.json", 200).await;
    assert_eq!(jwks.content_type, "application/jwk-set+json");
    let jwks = jwks.json();
    assert_eq!(jwks, f.jwks().await, "the published JWKS, as published");
    let claims =
        signing::verify(&token, &jwks, AUDIENCE, 0).expect("verifies with the served JWKS");
    assert_eq!(claims["iss"], issuer.as_str());
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("d").is_none()),
        "no private key is served"
    );
    let discovery = trust
        .get(&format!("{issuer}/.well-known/openid-configuration"))
        .await
        .unwrap()
        .json();
    assert_eq!(
        discovery["jwks_uri"],
        format!("{issuer}/.well-known/jwks.json")
    );
    assert_eq!(
        discovery["introspection_endpoint"],
        format!("{issuer}/introspect")
    );
    assert!(
        discovery.get("token_endpoint").is_none(),
        "it cannot sign, so it serves no token endpoint"
    );
    assert_eq!(served_status(&trust, &issuer, &token).await, "Valid");

    // Introspection there says active, to a caller allowed this audience.
    let caller = introspection_caller(&f, &issuer, AUDIENCE).await;
    let active = wait_introspected(&trust, &issuer, &caller.token, &token, true).await;
    assert_eq!(active["sub"], "user:alice@example.com");
    assert_eq!(active["aud"], AUDIENCE);

    // Its identity reads no Secret: neither the signing keys, nor a token, nor the serving
    // certificate it serves (that comes mounted), nor any list of them; and it writes nothing it
    // serves.
    let operator_secrets: Api<Secret> = Api::namespaced(verifier_client.clone(), &operator_ns);
    let tenant_secrets: Api<Secret> = Api::namespaced(verifier_client.clone(), &f.ns);
    assert!(forbidden(
        operator_secrets
            .get("delegation-operator-signing-keys")
            .await
    ));
    assert!(forbidden(
        operator_secrets.get("delegation-operator-tls").await
    ));
    assert!(forbidden(tenant_secrets.get("tickets-token").await));
    assert!(forbidden(
        operator_secrets.list(&ListParams::default()).await
    ));
    assert!(forbidden(tenant_secrets.list(&ListParams::default()).await));
    let configmaps: Api<ConfigMap> = Api::namespaced(verifier_client.clone(), &operator_ns);
    assert!(forbidden(
        configmaps
            .patch(
                "delegation-operator-jwks",
                &PatchParams::default(),
                &Patch::Merge(&json!({"data": {"jwks.json": "{\"keys\": []}"}})),
            )
            .await
    ));
    // The admin can read both Secrets: the refusals above are about the identity, not absence.
    let admin_secrets: Api<Secret> = Api::namespaced(f.client.clone(), &operator_ns);
    assert!(
        admin_secrets
            .get_opt("delegation-operator-signing-keys")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        f.secrets()
            .get_opt("tickets-token")
            .await
            .unwrap()
            .is_some()
    );

    // Revoking the grant flips its token in the list the server serves, and introspection there
    // says inactive.
    f.patch_grant("tickets", json!({"spec": {"suspended": true}}))
        .await;
    f.wait_ready("tickets", "False", Some("Suspended")).await;
    wait_for(
        "the served status list to say INVALID",
        Duration::from_secs(30),
        || async { (served_status(&trust, &issuer, &token).await == "Invalid").then_some(()) },
    )
    .await;
    let inactive = wait_introspected(&trust, &issuer, &caller.token, &token, false).await;
    assert_eq!(inactive, json!({"active": false}));

    // It worked on exactly those rights: nothing it asked for was refused.
    let log = server.log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the verification server was refused something:\n{log}"
    );
}

const EXCHANGING_AGENT_AND_GRANT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: triage}
spec:
  owner: {kind: Group, name: platform}
  serviceAccountName: triage
  allowedScopes: [tickets:read, tickets:comment]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: tickets}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: triage}
  scopes: [tickets:read, tickets:comment]
  audience: https://tickets.example.com
  tokenTTL: 10m
"#;

/// With `verifier.tokenExchange.enabled`, the verification server serves token exchange under the
/// chart's verifier RBAC for it, and nothing more: it signs with the controller's active key (the
/// one Secret it may read), decides from its own watches, and still reads no other Secret and
/// writes nothing.
#[tokio::test]
async fn with_token_exchange_the_verification_server_signs_under_the_charts_rights_alone() {
    let controller = format!("https://127.0.0.1:{}", free_port());
    let issuer = format!("https://127.0.0.1:{}", free_port());
    let f = Fixture::start(
        "verification-exchange",
        &[
            "--issuer",
            &issuer,
            "--https-address",
            controller.trim_start_matches("https://"),
            "--verification-endpoints=false",
        ],
    )
    .await;
    let operator_ns = f.operator_namespace();
    let trust = Trust::from_operator(&f).await;
    let identity = ChartVerifierIdentity::apply(
        &f.client,
        &operator_ns,
        &["verifier.tokenExchange.enabled=true"],
    )
    .await;
    let kubeconfig =
        service_account_kubeconfig(&f.client, &identity.namespace, &identity.name).await;
    let verifier_client = client_of(&kubeconfig).await;
    let tls = f.serving_certificate().await;
    let server = VerificationServer::start(
        &kubeconfig,
        &operator_ns,
        &issuer,
        &tls,
        &["--token-exchange=true"],
    );
    wait_status(&trust, &issuer, "/readyz", 200).await;
    let discovery = trust
        .get(&format!("{issuer}/.well-known/openid-configuration"))
        .await
        .unwrap()
        .json();
    assert_eq!(discovery["token_endpoint"], format!("{issuer}/token"));

    f.apply(EXCHANGING_AGENT_AND_GRANT).await;
    f.wait_ready("tickets", "True", Some("Issued")).await;
    let token = f.token_in("tickets-token").await.expect("a token");
    let pod = pod_running_as(&f.client, &f.ns, "triage").await;
    let actor =
        request_service_account_token_for(&f.client, &f.ns, "triage", Some(&pod), &[&issuer]).await;
    let reply = trust
        .exchange(
            &issuer,
            &[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", &token),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:access_token",
                ),
                ("actor_token", &actor),
                ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("scope", "tickets:read"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "the exchange was refused");
    let exchanged = reply.json()["access_token"].as_str().unwrap().to_owned();
    let jwks = trust
        .get(&format!("{issuer}/.well-known/jwks.json"))
        .await
        .unwrap()
        .json();
    let claims = signing::verify(&exchanged, &jwks, AUDIENCE, 0)
        .expect("the exchanged token verifies with the published JWKS");
    assert_eq!(claims["scope"], "tickets:read");
    assert_eq!(
        claims["delegation_chain"][1]["workload"]["pod"],
        pod.metadata.name.clone().unwrap()
    );
    assert_eq!(served_status(&trust, &issuer, &exchanged).await, "Valid");

    // One Secret by name, nothing else: not the TLS Secret, not a token, no list; and no write.
    let operator_secrets: Api<Secret> = Api::namespaced(verifier_client.clone(), &operator_ns);
    let tenant_secrets: Api<Secret> = Api::namespaced(verifier_client.clone(), &f.ns);
    assert!(forbidden(
        operator_secrets.get("delegation-operator-tls").await
    ));
    assert!(forbidden(tenant_secrets.get("tickets-token").await));
    assert!(forbidden(tenant_secrets.list(&ListParams::default()).await));
    assert!(forbidden(
        operator_secrets
            .patch(
                "delegation-operator-signing-keys",
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await
    ));
    let grants: Api<delegation_operator::api::DelegationGrant> =
        Api::namespaced(verifier_client.clone(), &f.ns);
    assert!(forbidden(
        grants
            .patch(
                "tickets",
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await
    ));

    // The grant suspended: the exchanged token is revoked with it, as served.
    f.patch_grant("tickets", json!({"spec": {"suspended": true}}))
        .await;
    wait_for(
        "the exchanged token to read INVALID",
        Duration::from_secs(30),
        || async { (served_status(&trust, &issuer, &exchanged).await == "Invalid").then_some(()) },
    )
    .await;
    let log = server.log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the verification server was refused something:\n{log}"
    );
}

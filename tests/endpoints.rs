//! The operator's HTTPS endpoints, reached the way a resource server reaches them: over TLS (curl,
//! trusting only the CA in the serving certificate Secret) on the operator's real listener, with
//! callers authenticated by their own ServiceAccount tokens against the real apiserver.

mod support;

use std::{process::Command, time::Duration};

use delegation_operator::verification;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Secret, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef},
    },
};
use kube::{
    Api,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::*;

const AGENT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: orchestrator}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read, payments:read]
  allowedAudiences: [https://tickets.example.com, https://payments.example.com]
  maxTokenTTL: 15m
"#;

fn grant(name: &str, audience: &str) -> String {
    format!(
        r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {{name: {name}}}
spec:
  principal: {{kind: User, name: alice@example.com}}
  actorRef: {{name: orchestrator}}
  scopes: [tickets:read]
  audience: {audience}
  tokenTTL: 10m
"#
    )
}

/// The operator's HTTPS endpoints as a client sees them.
struct Https {
    issuer: String,
    ca: tempfile_path::TempPath,
    /// A ServiceAccount token allowed `get` on `/metrics` (as Prometheus' would be).
    metrics_bearer: String,
    _metrics_reader: Option<ClusterRoleGuard>,
}

/// A file removed on drop, for the CA bundle curl reads.
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

struct Reply {
    status: u16,
    content_type: String,
    cache_control: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Https {
    fn new(port: u16) -> Self {
        let ca = std::env::temp_dir().join(format!(
            "delegation-endpoints-ca-{}.pem",
            uuid::Uuid::new_v4().simple()
        ));
        Self {
            issuer: format!("https://127.0.0.1:{port}"),
            ca: tempfile_path::TempPath(ca),
            metrics_bearer: String::new(),
            _metrics_reader: None,
        }
    }

    fn args(&self) -> Vec<String> {
        let address = self.issuer.trim_start_matches("https://").to_owned();
        vec![
            "--issuer".into(),
            self.issuer.clone(),
            "--https-address".into(),
            address,
        ]
    }

    /// Trusts exactly the CA in the serving certificate Secret, as a client in the cluster would.
    async fn trust_ca_of(&self, fixture: &Fixture) {
        let secret = fixture.serving_certificate().await;
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        std::fs::write(&self.ca.0, &secret.data.unwrap()["ca.crt"].0).unwrap();
    }

    /// One request with curl: `extra` are curl arguments (method, headers, form fields).
    fn request(&self, path: &str, extra: &[&str]) -> Result<Reply, String> {
        self.request_to(&self.issuer, path, extra)
    }

    fn request_to(&self, base: &str, path: &str, extra: &[&str]) -> Result<Reply, String> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&self.ca.0)
            .args(["-w", "\n%{http_code}\n%{content_type}\n"])
            .args(["-D", "-"])
            .args(extra)
            .arg(format!("{base}{path}"))
            .output()
            .expect("curl runs");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines: Vec<&str> = text.trim_end_matches('\n').rsplitn(3, '\n').collect();
        lines.reverse();
        let (head_and_body, status, content_type) = (lines[0], lines[1], lines[2]);
        let (head, body) = head_and_body
            .split_once("\r\n\r\n")
            .unwrap_or((head_and_body, ""));
        let cache_control = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("cache-control:")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_default();
        Ok(Reply {
            status: status.parse().unwrap(),
            content_type: content_type.to_owned(),
            cache_control,
            body: body.to_owned(),
        })
    }

    fn get(&self, path: &str) -> Reply {
        self.request(path, &[])
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Waits until `/readyz` says ok.
    async fn wait_ready(&self, base: &str) {
        wait_for(
            &format!("{base}/readyz"),
            Duration::from_secs(30),
            || async {
                let reply = self.request_to(base, "/readyz", &[]).ok()?;
                (reply.status == 200).then_some(())
            },
        )
        .await;
    }

    /// RFC 7662: `token` introspected by a caller presenting `bearer`.
    fn introspect(&self, bearer: Option<&str>, token: &str) -> Reply {
        let auth = bearer.map(|b| format!("Authorization: Bearer {b}"));
        let form = format!("token={token}");
        let mut args = vec!["-X", "POST", "--data-urlencode", &form];
        if let Some(auth) = &auth {
            args.extend(["-H", auth.as_str()]);
        }
        self.request("/introspect", &args)
            .unwrap_or_else(|e| panic!("POST /introspect: {e}"))
    }

    fn metrics(&self) -> String {
        let reply = self.metrics_as(Some(&self.metrics_bearer));
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.body
    }

    fn metrics_as(&self, bearer: Option<&str>) -> Reply {
        let auth = bearer.map(|b| format!("Authorization: Bearer {b}"));
        let args: Vec<&str> = auth.iter().flat_map(|a| ["-H", a.as_str()]).collect();
        self.request("/metrics", &args)
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"))
    }
}

async fn start() -> (Fixture, Https) {
    let mut https = Https::new(free_port());
    let args = https.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let fixture = Fixture::start("endpoints", &args).await;
    https.trust_ca_of(&fixture).await;
    https.wait_ready(&https.issuer).await;
    // Prometheus' part: a ServiceAccount token for the apiserver's own audience, allowed /metrics.
    let reader = PolicyRule {
        non_resource_urls: Some(vec!["/metrics".into()]),
        verbs: vec!["get".into()],
        ..Default::default()
    };
    https._metrics_reader =
        Some(ClusterRoleGuard::bind(&fixture, "prometheus", "metrics", reader).await);
    https.metrics_bearer = service_account_token(&fixture, "prometheus", None).await;
    let bearer = https.metrics_bearer.clone();
    wait_for(
        "Prometheus' RBAC to be in effect",
        Duration::from_secs(20),
        || async { (https.metrics_as(Some(&bearer)).status == 200).then_some(()) },
    )
    .await;
    (fixture, https)
}

/// Discovery, the JWKS and the status list over HTTPS agree with the issuer, with each other, and
/// with what the operator published; the token verifies with them alone, and /metrics counts it.
#[tokio::test]
async fn discovery_jwks_and_status_lists_are_served_over_https() {
    let (f, https) = start().await;

    let discovery = https.get("/.well-known/openid-configuration");
    assert_eq!(discovery.status, 200);
    let discovery = discovery.json();
    assert_eq!(discovery["issuer"], https.issuer.as_str());
    let jwks_uri = discovery["jwks_uri"].as_str().unwrap();
    assert!(jwks_uri.starts_with(&https.issuer), "{jwks_uri}");
    assert_eq!(
        discovery["introspection_endpoint"],
        format!("{}/introspect", https.issuer)
    );

    let jwks = https.get(jwks_uri.trim_start_matches(&https.issuer));
    assert_eq!(jwks.status, 200);
    assert_eq!(jwks.content_type, "application/jwk-set+json");
    let max_age: u32 = jwks
        .cache_control
        .split("max-age=")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cache-control {:?}", jwks.cache_control));
    assert!(max_age <= 30, "a new key must be picked up before it signs");
    let jwks = jwks.json();
    assert_eq!(jwks, f.jwks().await, "the JWKS served is the one published");

    // A key injected into the published ConfigMap is never served: the endpoints read the keys Secret.
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(f.client.clone(), &f.operator_namespace());
    let mut forged = jwks.clone();
    let mut injected = forged["keys"][0].clone();
    injected["kid"] = "injected-by-a-configmap-writer".into();
    forged["keys"].as_array_mut().unwrap().push(injected);
    configmaps
        .patch(
            "delegation-operator-jwks",
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {"jwks.json": forged.to_string()}})),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            https.get("/.well-known/jwks.json").json(),
            jwks,
            "an edited ConfigMap must not reach verifiers"
        );
    }

    f.apply(AGENT).await;
    f.apply(&grant("tickets", "https://tickets.example.com"))
        .await;
    f.wait_ready("tickets", "True", None).await;
    let token = f.token_in("tickets-token").await.unwrap();

    // The status list the token points to, fetched at its uri, verifies with the served JWKS.
    let claims = verification::unverified_claims(&token).unwrap();
    let uri = claims["status"]["status_list"]["uri"].as_str().unwrap();
    assert!(uri.starts_with(&https.issuer), "{uri}");
    let list = https.get(uri.trim_start_matches(&https.issuer));
    assert_eq!(list.status, 200);
    assert_eq!(list.content_type, "application/statuslist+jwt");
    let lists = [(
        delegation_operator::status_list::data_key(uri),
        list.body.clone(),
    )]
    .into();
    let verified = verification::verify(
        &token,
        &jwks,
        &lists,
        Some("https://tickets.example.com"),
        0,
    )
    .expect("the token verifies with what the endpoints serve");
    assert!(verified.is_active());
    assert_eq!(verified.claims["sub"], "user:alice@example.com");

    // An unknown list is a plain 404, not another list.
    let missing = https.get(&format!(
        "{}/99999",
        uri.trim_start_matches(&https.issuer)
            .rsplit_once('/')
            .unwrap()
            .0
    ));
    assert_eq!(missing.status, 404);
    assert_eq!(
        https.get("/statuslists/not-ours/1").status,
        404,
        "a list id of another state is not served"
    );

    // /metrics names every grant: nobody without `get /metrics` reads it.
    let stranger = service_account_token(&f, "stranger", None).await;
    for bearer in [None, Some("not-a-token"), Some(stranger.as_str())] {
        let reply = https.metrics_as(bearer);
        assert_eq!(reply.status, 401, "{}", reply.body);
        assert!(!reply.body.contains("delegation_"), "{}", reply.body);
    }

    // Metrics: the issuance is counted, the grant has its expiry series ... until it is deleted.
    let series = format!("namespace=\"{}\",name=\"tickets\"", f.ns);
    let metrics = https.metrics();
    assert!(
        metrics.contains("delegation_tokens_issued_total{reason="),
        "{metrics}"
    );
    assert!(metrics.contains("delegation_leader 1"), "{metrics}");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("delegation_grant_token_expiration_timestamp_seconds{")
            && l.contains(&series)),
        "{metrics}"
    );
    assert!(metrics.contains("delegation_reconcile_duration_seconds_bucket{"));
    f.delete_grant("tickets").await;
    wait_for(
        "the deleted grant's series to leave /metrics",
        Duration::from_secs(10),
        || async {
            let metrics = https.metrics();
            (!metrics.contains(&series)
                && metrics.contains("delegation_tokens_revoked_total{reason="))
            .then_some(())
        },
    )
    .await;
}

/// Callers authenticate with their ServiceAccount token (audience: the issuer) and learn about a
/// token only for an audience RBAC lets them introspect; everything else is `active: false`.
#[tokio::test]
async fn introspection_answers_authenticated_callers_for_their_audience_only() {
    let (f, https) = start().await;
    f.apply(AGENT).await;
    f.apply(&grant("tickets", "https://tickets.example.com"))
        .await;
    f.apply(&grant("payments", "https://payments.example.com"))
        .await;
    f.wait_ready("tickets", "True", None).await;
    f.wait_ready("payments", "True", None).await;
    let tickets_token = f.token_in("tickets-token").await.unwrap();
    let payments_token = f.token_in("payments-token").await.unwrap();

    // The tickets API may introspect tickets tokens; a caller without the rule may not.
    let allowed = service_account_token(&f, "tickets-api", Some(&https.issuer)).await;
    let unprivileged = service_account_token(&f, "other-api", Some(&https.issuer)).await;
    let _role = ClusterRoleGuard::bind(
        &f,
        "tickets-api",
        "introspect",
        rule(
            "delegation.nhi.dev",
            &["audiences"],
            &["introspect"],
            &["https://tickets.example.com"],
        ),
    )
    .await;

    // Who is not authenticated for our audience learns nothing: 401, no body about the token.
    let wrong_audience =
        service_account_token(&f, "tickets-api", Some("https://another.example")).await;
    for bearer in [None, Some("not-a-token"), Some(wrong_audience.as_str())] {
        let reply = https.introspect(bearer, &tickets_token);
        assert_eq!(reply.status, 401, "{}", reply.body);
        assert!(!reply.body.contains("active"), "{}", reply.body);
    }

    let reply = wait_for(
        "the tickets API's RBAC to be in effect",
        Duration::from_secs(20),
        || async {
            let reply = https.introspect(Some(&allowed), &tickets_token);
            (reply.json()["active"] == true).then_some(reply)
        },
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.cache_control, "no-store");
    let body = reply.json();
    assert_eq!(body["sub"], "user:alice@example.com");
    assert_eq!(body["aud"], "https://tickets.example.com");
    assert_eq!(body["iss"], https.issuer.as_str());
    assert_eq!(body["scope"], "tickets:read");
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["exp"].as_i64().is_some() && body["jti"].as_str().is_some());
    assert!(body["act"]["sub"].as_str().is_some(), "the chain: {body}");

    // Another audience, another caller, a tampered or garbage token: `active: false`, nothing more.
    let inactive = json!({"active": false});
    assert_eq!(
        https.introspect(Some(&allowed), &payments_token).json(),
        inactive
    );
    assert_eq!(
        https.introspect(Some(&unprivileged), &tickets_token).json(),
        inactive
    );
    assert_eq!(
        https
            .introspect(Some(&allowed), &tamper(&tickets_token))
            .json(),
        inactive
    );
    assert_eq!(https.introspect(Some(&allowed), "garbage").json(), inactive);

    // Revocation is seen at once: suspend the grant, and its token turns inactive.
    f.patch_grant("tickets", json!({"spec": {"suspended": true}}))
        .await;
    wait_for(
        "the suspended grant's token to be inactive",
        Duration::from_secs(15),
        || async {
            (https.introspect(Some(&allowed), &tickets_token).json() == inactive).then_some(())
        },
    )
    .await;
    let metrics = https.metrics();
    for result in ["active", "inactive", "unauthenticated"] {
        assert!(
            metrics.contains(&format!(
                "delegation_introspection_requests_total{{result=\"{result}\"}}"
            )),
            "{metrics}"
        );
    }
}

/// A standby replica (not leading) serves the same verification documents and is ready; a new
/// certificate written into the Secret is served by both without a restart.
#[tokio::test]
async fn a_standby_serves_verification_and_certificates_reload() {
    let (f, https) = start().await;
    let standby_port = free_port();
    let standby_base = format!("https://127.0.0.1:{standby_port}");
    let standby_address = format!("127.0.0.1:{standby_port}");
    let _standby = Operator::start(
        &f.ns,
        &f.operator_namespace(),
        &[
            "--issuer",
            &https.issuer,
            "--https-address",
            &standby_address,
        ],
    );
    https.wait_ready(&standby_base).await;
    let standby_jwks = https
        .request_to(&standby_base, "/.well-known/jwks.json", &[])
        .unwrap();
    assert_eq!(standby_jwks.json(), f.jwks().await);
    let auth = format!("Authorization: Bearer {}", https.metrics_bearer);
    let standby_metrics = https
        .request_to(&standby_base, "/metrics", &["-H", &auth])
        .unwrap();
    assert!(
        standby_metrics.body.contains("delegation_leader 0"),
        "{}",
        standby_metrics.body
    );

    // Replace the certificate: clients that trust only the new CA get through, on both replicas.
    let (ca_pem, cert_pem, key_pem) = new_certificate();
    let secrets: Api<Secret> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    let data = json!({"data": {
        "tls.crt": ByteString(cert_pem.into_bytes()),
        "tls.key": ByteString(key_pem.into_bytes()),
        "ca.crt": ByteString(ca_pem.clone().into_bytes()),
    }});
    secrets
        .patch(
            "delegation-operator-tls",
            &PatchParams::default(),
            &Patch::Merge(&data),
        )
        .await
        .unwrap();
    std::fs::write(&https.ca.0, ca_pem).unwrap();
    for base in [https.issuer.as_str(), standby_base.as_str()] {
        wait_for(
            &format!("{base} to serve the new certificate"),
            Duration::from_secs(20),
            || async {
                let reply = https.request_to(base, "/healthz", &[]).ok()?;
                (reply.status == 200).then_some(())
            },
        )
        .await;
    }

    // A broken edit keeps the last good certificate.
    secrets
        .patch(
            "delegation-operator-tls",
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {"tls.key": ByteString(b"junk".to_vec())}})),
        )
        .await
        .unwrap();
    wait_for(
        "the operator to refuse the broken certificate",
        Duration::from_secs(20),
        || async {
            f.operator()
                .raw_output()
                .contains("still serving the previous certificate")
                .then_some(())
        },
    )
    .await;
    assert_eq!(https.get("/healthz").status, 200);
}

/// A fresh CA and a certificate it signed for 127.0.0.1: (ca, cert, key) as PEM.
fn new_certificate() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A leaf whose subject equals its issuer's would read as self-signed.
    ca.distinguished_name
        .push(DnType::CommonName, "endpoints test CA (rotated)");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "delegation-operator (rotated)");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert_pem = params.signed_by(&key, &issuer).unwrap().pem();
    (ca_pem, cert_pem, key.serialize_pem())
}

/// The token with one payload character changed: the signature no longer matches.
fn tamper(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let payload = &mut parts[1];
    let last = payload.pop().unwrap();
    payload.push(if last == 'A' { 'B' } else { 'A' });
    parts.join(".")
}

/// A token of ServiceAccount `name` in the fixture's namespace (created if needed) for `audience`
/// (`None`: the apiserver's own).
async fn service_account_token(f: &Fixture, name: &str, audience: Option<&str>) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(f.client.clone(), &f.ns);
    if accounts.get_opt(name).await.unwrap().is_none() {
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        accounts
            .create(&PostParams::default(), &account)
            .await
            .unwrap();
    }
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.into()]),
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .expect("a token")
}

/// A ClusterRole granting one ServiceAccount one rule; removed on drop.
struct ClusterRoleGuard {
    name: String,
}

impl ClusterRoleGuard {
    async fn bind(f: &Fixture, account: &str, purpose: &str, grants: PolicyRule) -> Self {
        let name = format!("{}-{account}-{purpose}", f.ns);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let role = ClusterRole {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            rules: Some(vec![grants.clone()]),
            ..Default::default()
        };
        Api::<ClusterRole>::all(f.client.clone())
            .patch(&name, &params, &Patch::Apply(&role))
            .await
            .unwrap();
        let binding = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: name.clone(),
            },
            subjects: Some(vec![service_account_subject(&f.ns, account)]),
        };
        Api::<ClusterRoleBinding>::all(f.client.clone())
            .patch(&name, &params, &Patch::Apply(&binding))
            .await
            .unwrap();
        let guard = Self { name };
        // The binding reaches the authorizer a moment after the write returns: wait until it allows
        // the rule, asked as the operator asks (no namespace), before anyone relies on it.
        let account = service_account_subject(&f.ns, account);
        wait_allowed(&f.client, "", &account, &grants).await;
        guard
    }
}

impl Drop for ClusterRoleGuard {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Best effort, on a runtime and client of its own: the test's runtime is blocked right here.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let client = client().await;
                let _ = Api::<ClusterRoleBinding>::all(client.clone())
                    .delete(&name, &DeleteParams::default())
                    .await;
                let _ = Api::<ClusterRole>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            });
        })
        .join()
        .ok();
    }
}

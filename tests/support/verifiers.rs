//! Verifying tokens the way parties outside the operator do: over its HTTPS endpoints (discovery,
//! JWKS, status lists, introspection), with independent JWT libraries (PyJWT, npm `jose`, go-jose —
//! installed by `hack/verifiers.sh`, programs in `tests/verifiers/`), and as the Kubernetes apiserver's
//! JWT authenticator (the structured authentication configuration of `hack/control-plane.sh`).
//!
//! Tokens are never printed: the programs get them on stdin and answer with verdicts only.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
    sync::OnceLock,
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Fixture, kubeconfig_path, repo_root, wait_for};

// ---- the operator's HTTPS listener ---------------------------------------------------------------

/// An issuer URL on loopback whose endpoints the operator serves itself, with a generated CA.
pub struct HttpsIssuer {
    pub url: String,
    pub port: u16,
}

impl HttpsIssuer {
    pub fn new() -> Self {
        let port = super::free_port();
        Self {
            url: format!("https://127.0.0.1:{port}"),
            port,
        }
    }

    /// The `run` flags: this issuer, HTTPS on its port, a self-signed serving certificate (with an IP
    /// SAN for 127.0.0.1) in Secret `delegation-operator-tls`.
    pub fn operator_args(&self) -> Vec<String> {
        vec![
            "--issuer".into(),
            self.url.clone(),
            "--https-address".into(),
            format!("127.0.0.1:{}", self.port),
            "--tls-self-signed=true".into(),
        ]
    }
}

/// Starts the operator with `extra` flags and an [`HttpsIssuer`]; returns once discovery answers over
/// HTTPS, with the CA (PEM) and a file holding it.
pub async fn start_https_operator(prefix: &str, extra: &[&str]) -> (Fixture, HttpsIssuer, Trust) {
    let issuer = HttpsIssuer::new();
    let mut args: Vec<String> = issuer.operator_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let f = Fixture::start(prefix, &args).await;
    let trust = Trust::from_operator(&f).await;
    trust.wait_discovery(&f, &issuer.url).await;
    (f, issuer, trust)
}

/// The CA that signed the operator's serving certificate, in memory and in a file for the programs.
pub struct Trust {
    pub ca_pem: String,
    pub ca_path: PathBuf,
}

impl Trust {
    /// Reads `ca.crt` of Secret `delegation-operator-tls` in the operator namespace (waiting until the
    /// operator has generated it).
    pub async fn from_operator(f: &Fixture) -> Self {
        let secret = f.serving_certificate().await;
        let ca_pem = String::from_utf8(secret.data.unwrap()["ca.crt"].0.clone()).unwrap();
        assert!(ca_pem.contains("BEGIN CERTIFICATE"), "ca.crt is a PEM");
        let ca_path = std::env::temp_dir().join(format!("{}-ca.crt", f.ns));
        std::fs::write(&ca_path, &ca_pem).unwrap();
        Self { ca_pem, ca_path }
    }

    /// Waits until the discovery document is served over HTTPS, trusting only this CA.
    pub async fn wait_discovery(&self, f: &Fixture, issuer: &str) {
        let url = format!("{issuer}/.well-known/openid-configuration");
        let log = f.operator().log_path.clone();
        let discovery = wait_for(
            &format!(
                "discovery at {url} (operator log: {})",
                log.to_string_lossy()
            ),
            Duration::from_secs(60),
            || async { self.get(&url).await.ok().filter(|r| r.status == 200) },
        )
        .await;
        let doc: Value = serde_json::from_slice(&discovery.body).expect("discovery is JSON");
        assert_eq!(doc["issuer"], issuer, "discovery names the issuer exactly");
    }

    /// GET over HTTPS with curl, trusting only this CA.
    pub async fn get(&self, url: &str) -> Result<HttpResponse, String> {
        self.curl(&[url], None).await
    }

    /// RFC 7662 introspection of `token` by a caller presenting `bearer`.
    pub async fn introspect(&self, issuer: &str, bearer: &str, token: &str) -> HttpResponse {
        let headers = std::env::temp_dir().join(format!("{}.headers", uuid::Uuid::new_v4()));
        write_private(&headers, &format!("Authorization: Bearer {bearer}\n"));
        let url = format!("{issuer}/introspect");
        let header_arg = format!("@{}", headers.display());
        let result = self
            .curl(
                &["-H", &header_arg, "--data-urlencode", "token@-", &url],
                Some(token),
            )
            .await;
        let _ = std::fs::remove_file(&headers);
        result.expect("introspection request")
    }

    /// RFC 8693 token exchange: POSTs `form` (URL-encoded here) to `{issuer}/token` as
    /// `application/x-www-form-urlencoded`. The body goes through curl's stdin, so no token is ever on
    /// a command line.
    pub async fn exchange(&self, issuer: &str, form: &[(&str, &str)]) -> HttpResponse {
        let body = form_urlencoded(form);
        self.exchange_raw(issuer, &body)
            .await
            .unwrap_or_else(|e| panic!("POST {issuer}/token: {e}"))
    }

    /// [`Trust::exchange`] with a body given as it is sent (for malformed and oversize bodies); curl's
    /// error when the request did not complete (a server may cut a body over its limit short).
    pub async fn exchange_raw(&self, issuer: &str, body: &str) -> Result<HttpResponse, String> {
        self.exchange_raw_with(issuer, body, &[]).await
    }

    /// [`Trust::exchange`] with extra request headers (`DPoP: <proof>`), passed to curl in a private
    /// file so that no proof is on a command line.
    pub async fn exchange_with(
        &self,
        issuer: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> HttpResponse {
        let body = form_urlencoded(form);
        self.exchange_raw_with(issuer, &body, headers)
            .await
            .unwrap_or_else(|e| panic!("POST {issuer}/token: {e}"))
    }

    async fn exchange_raw_with(
        &self,
        issuer: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, String> {
        let url = format!("{issuer}/token");
        let file = std::env::temp_dir().join(format!("{}.headers", uuid::Uuid::new_v4()));
        let lines: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\n"))
            .collect();
        write_private(&file, &lines);
        let header_arg = format!("@{}", file.display());
        // An exchange asks the apiserver (TokenReview): more time than a GET on a loaded machine (the
        // last --max-time wins).
        let result = self
            .curl(
                &[
                    "--max-time",
                    "30",
                    "-H",
                    "Content-Type: application/x-www-form-urlencoded",
                    "-H",
                    &header_arg,
                    "--data-binary",
                    "@-",
                    &url,
                ],
                Some(body),
            )
            .await;
        let _ = std::fs::remove_file(&file);
        result
    }

    /// curl with the CA; writes `stdin` (a token, never on the command line) to it.
    async fn curl(&self, args: &[&str], stdin: Option<&str>) -> Result<HttpResponse, String> {
        let mut child = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&self.ca_path)
            .args([
                "-w",
                "\n%{http_code}\t%header{cache-control}\t%{content_type}",
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl is needed for these tests");
        {
            use tokio::io::AsyncWriteExt;
            let mut input = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                input.write_all(s.as_bytes()).await.unwrap();
            }
        }
        let out = child.wait_with_output().await.unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let split = out.stdout.iter().rposition(|b| *b == b'\n').unwrap();
        let trailer = String::from_utf8_lossy(&out.stdout[split + 1..]).into_owned();
        let mut fields = trailer.splitn(3, '\t');
        let status = fields.next().unwrap_or_default();
        let cache_control = fields.next().unwrap_or_default();
        let content_type = fields.next().unwrap_or_default();
        Ok(HttpResponse {
            status: status.parse().unwrap_or(0),
            content_type: content_type.to_owned(),
            cache_control: cache_control.to_owned(),
            body: out.stdout[..split].to_vec(),
        })
    }
}

impl Drop for Trust {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_path);
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    /// The `Cache-Control` header, empty when there is none.
    pub cache_control: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// An `application/x-www-form-urlencoded` body (the operator's own dependency does the encoding).
pub fn form_urlencoded(form: &[(&str, &str)]) -> String {
    let mut body = ::form_urlencoded::Serializer::new(String::new());
    for (name, value) in form {
        body.append_pair(name, value);
    }
    body.finish()
}

/// Writes `content` to a new file only its owner may read (0600), as a token file should be.
pub fn write_private(path: &Path, content: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.write_all(content.as_bytes()).unwrap();
}

// ---- the independent verifiers -------------------------------------------------------------------

/// The cache directory of `hack/verifiers.sh`: `$DELEGATION_VERIFIERS_DIR` when the test command has
/// run it, else the script is run once per test binary (idempotent: installs only what is missing).
pub fn verifiers_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("DELEGATION_VERIFIERS_DIR") {
            return PathBuf::from(dir);
        }
        let out = std::process::Command::new(repo_root().join("hack/verifiers.sh"))
            .output()
            .expect("could not run hack/verifiers.sh");
        assert!(
            out.status.success(),
            "hack/verifiers.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    })
    .clone()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verifier {
    PyJwt,
    Jose,
    GoJose,
}

pub const VERIFIERS: [Verifier; 3] = [Verifier::PyJwt, Verifier::Jose, Verifier::GoJose];

/// One program's answer for one token.
#[derive(Clone, Debug, Deserialize)]
pub struct Verdict {
    pub name: String,
    pub accepted: bool,
    pub reason: String,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub jti: Option<String>,
    /// The nested `act` chain, current actor first.
    #[serde(default)]
    pub actors: Vec<String>,
    /// PyJWT with `--status` only: VALID, INVALID, SUSPENDED (from the token's status list).
    #[serde(default)]
    pub status: Option<String>,
    /// Library and version, e.g. "PyJWT 2.15.1".
    pub verifier: String,
}

/// Runs one verifier on named tokens (discovery and JWKS fetched from `issuer` over HTTPS, trusting
/// only `ca`); `status` asks PyJWT to read each token's status list too. Verdicts by token name.
pub async fn verify_with(
    verifier: Verifier,
    issuer: &str,
    ca: &Path,
    audience: &str,
    status: bool,
    tokens: &[(&str, &str)],
) -> BTreeMap<String, Verdict> {
    let dir = verifiers_dir();
    let programs = repo_root().join("tests/verifiers");
    let mut command = match verifier {
        Verifier::PyJwt => {
            let mut c = tokio::process::Command::new(dir.join("venv/bin/python"));
            c.arg(programs.join("python/verify.py"));
            if status {
                c.arg("--status");
            }
            c
        }
        Verifier::Jose => {
            let mut c = tokio::process::Command::new("node");
            c.arg(programs.join("node/verify.mjs"))
                .env("JOSE_DIR", dir.join("node"));
            c
        }
        Verifier::GoJose => tokio::process::Command::new(dir.join("bin/go-verifier")),
    };
    command
        .arg("--issuer")
        .arg(issuer)
        .arg("--ca")
        .arg(ca)
        .arg("--audience")
        .arg(audience)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting the {verifier:?} verifier: {e}"));
    let input: Vec<Value> = tokens
        .iter()
        .map(|(name, token)| json!({"name": name, "token": token}))
        .collect();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(&serde_json::to_vec(&input).unwrap())
            .await
            .unwrap();
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the {verifier:?} verifier did not finish within 60s"))
        .unwrap();
    assert!(
        out.status.success(),
        "the {verifier:?} verifier failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts: Vec<Verdict> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{verifier:?} printed no verdicts ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(verdicts.len(), tokens.len(), "one verdict per token");
    verdicts.into_iter().map(|v| (v.name.clone(), v)).collect()
}

/// Every verifier on the same tokens.
pub async fn verify_with_all(
    issuer: &str,
    ca: &Path,
    audience: &str,
    tokens: &[(&str, &str)],
) -> BTreeMap<Verifier, BTreeMap<String, Verdict>> {
    let mut all = BTreeMap::new();
    for v in VERIFIERS {
        all.insert(v, verify_with(v, issuer, ca, audience, false, tokens).await);
    }
    all
}

// ---- crafting bad tokens from good ones ----------------------------------------------------------

fn parts(token: &str) -> [String; 3] {
    let mut it = token.split('.');
    let p = [(); 3].map(|_| it.next().expect("a compact JWS").to_owned());
    assert!(it.next().is_none(), "a compact JWS has three parts");
    p
}

fn decode_part(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn encode_part(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// The claims, read without verifying anything.
pub fn unverified_claims(token: &str) -> Value {
    decode_part(&parts(token)[1])
}

/// The header, read without verifying anything.
pub fn unverified_header(token: &str) -> Value {
    decode_part(&parts(token)[0])
}

/// The token with its claims changed by `edit`, header and signature kept (a forgery).
pub fn with_claims(token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let [h, p, s] = parts(token);
    let mut claims = decode_part(&p);
    edit(&mut claims);
    format!("{h}.{}.{s}", encode_part(&claims))
}

/// The token with its header changed by `edit`, claims and signature kept.
pub fn with_header(token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let [h, p, s] = parts(token);
    let mut header = decode_part(&h);
    edit(&mut header);
    format!("{}.{p}.{s}", encode_part(&header))
}

/// The classic `alg: none` forgery: the same header and claims, declared unsigned, no signature.
pub fn alg_none(token: &str) -> String {
    let unsigned = with_header(token, |h| h["alg"] = "none".into());
    let [h, p, _] = parts(&unsigned);
    format!("{h}.{p}.")
}

/// The key-confusion forgery: `alg: HS256`, "signed" with HMAC keyed by the public key of the JWKS —
/// a verifier that lets the token choose the algorithm would accept it.
pub fn hs256_with_public_key(token: &str, public_jwk: &Value) -> String {
    let [h, p, _] = parts(token);
    let mut header = decode_part(&h);
    header["alg"] = "HS256".into();
    let signing_input = format!("{}.{p}", encode_part(&header));
    let key = serde_json::to_vec(public_jwk).unwrap();
    let mac = hmac_sha256(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac))
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 64;
    let mut k = if key.len() > BLOCK {
        Sha256::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    k.resize(BLOCK, 0);
    let pad = |byte: u8| k.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

// ---- the apiserver trusting the issuer -----------------------------------------------------------

/// The structured authentication configuration file of the test control plane: next to its kubeconfig
/// (`hack/control-plane.sh auth-config-path`). Panics with what to do when the running control plane
/// was started without `--authentication-config` (by an older `hack/control-plane.sh`).
pub fn auth_config_path() -> PathBuf {
    let kubeconfig = kubeconfig_path();
    let dir = kubeconfig
        .parent()
        .expect("the kubeconfig is in a directory");
    let path = dir.join("authentication-config.yaml");
    let restart = "restart it with `hack/control-plane.sh stop && hack/control-plane.sh start` \
                   (the control plane is shared: only when nobody else is running tests)";
    assert!(
        path.exists(),
        "the test control plane has no {} — it was started without --authentication-config; {restart}",
        path.display()
    );
    // When this control plane's apiserver runs here, check its flags too.
    if let Ok(pid) = std::fs::read_to_string(dir.join("kube-apiserver.pid"))
        && let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
    {
        assert!(
            String::from_utf8_lossy(&cmdline).contains("--authentication-config"),
            "the running kube-apiserver (pid {}) was started without --authentication-config; {restart}",
            pid.trim()
        );
    }
    path
}

/// Adds a JWT authenticator to the apiserver's authentication configuration for as long as it lives;
/// dropping it (also when a test panics) writes the file back as it was. Holds an exclusive lock on a
/// file beside it meanwhile, so test binaries that change the configuration take turns.
pub struct JwtAuthenticator {
    path: PathBuf,
    original: String,
    _lock: std::fs::File,
}

impl JwtAuthenticator {
    pub fn install(authenticator: Value) -> Self {
        let path = auth_config_path();
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.with_extension("lock"))
            .unwrap();
        lock.lock().expect("lock the authentication configuration");
        let original = std::fs::read_to_string(&path).unwrap();
        let mut config: Value = serde_yaml::from_str(&original).unwrap();
        let jwt = config["jwt"].as_array().cloned().unwrap_or_default();
        config["jwt"] = Value::Array(jwt.into_iter().chain([authenticator]).collect());
        replace_file(&path, &serde_yaml::to_string(&config).unwrap());
        Self {
            path,
            original,
            _lock: lock,
        }
    }
}

impl Drop for JwtAuthenticator {
    fn drop(&mut self) {
        replace_file(&self.path, &self.original);
    }
}

/// Writes `content` to `path` atomically (a rename), so the apiserver never reads half a file.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A client of the test control plane that authenticates with `token` only (no client certificate).
pub async fn client_with_token(token: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).expect("readable test kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("valid test kubeconfig");
    let auth = &mut config.auth_info;
    auth.client_certificate = None;
    auth.client_certificate_data = None;
    auth.client_key = None;
    auth.client_key_data = None;
    auth.token = Some(token.to_owned().into());
    Client::try_from(config).expect("a client with a bearer token")
}

/// A kubeconfig (mode 600, in the temp directory) for the test control plane that authenticates with
/// `token` only, for kubectl; removed when dropped.
pub struct TokenKubeconfig(pub PathBuf);

impl TokenKubeconfig {
    pub fn new(token: &str) -> Self {
        let admin: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(kubeconfig_path()).unwrap()).unwrap();
        let cluster = admin["clusters"][0]["cluster"].clone();
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": "token", "user": {"token": token}}],
            "contexts": [{"name": "token", "context": {"cluster": "local", "user": "token"}}],
            "current-context": "token",
        });
        let path = std::env::temp_dir().join(format!("kubeconfig-{}", uuid::Uuid::new_v4()));
        write_private(&path, &serde_yaml::to_string(&config).unwrap());
        Self(path)
    }
}

impl Drop for TokenKubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---- introspection callers -----------------------------------------------------------------------

/// A resource server's identity for introspection: the token it presents; the cluster-wide RBAC
/// made for it is deleted when this is dropped (also when a test panics).
pub struct IntrospectionCaller {
    pub token: String,
    rbac_name: String,
}

impl Drop for IntrospectionCaller {
    fn drop(&mut self) {
        let _ = std::process::Command::new(super::kubectl_path())
            .arg("--kubeconfig")
            .arg(kubeconfig_path())
            .args(["delete", "--ignore-not-found", "--wait=false"])
            .arg(format!("clusterrolebinding/{}", self.rbac_name))
            .arg(format!("clusterrole/{}", self.rbac_name))
            .output();
    }
}

/// A ServiceAccount in the test namespace allowed to introspect tokens of `audience` (verb
/// `introspect` on `audiences.delegation.nhi.dev` named `audience`, through a ClusterRole and binding
/// named after the namespace), and a token of it whose audience is the issuer — what a resource
/// server in the cluster presents to `/introspect`.
pub async fn introspection_caller(
    f: &Fixture,
    issuer: &str,
    audience: &str,
) -> IntrospectionCaller {
    use k8s_openapi::api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef},
    };
    use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};

    let sa_name = "resource-server";
    let sas: Api<ServiceAccount> = Api::namespaced(f.client.clone(), &f.ns);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(sa_name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let name = format!("{}-introspect", f.ns);
    let params = PatchParams::apply(super::FIELD_MANAGER).force();
    let introspect = super::rule(
        "delegation.nhi.dev",
        &["audiences"],
        &["introspect"],
        &[audience],
    );
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        rules: Some(vec![introspect.clone()]),
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
        subjects: Some(vec![super::service_account_subject(&f.ns, sa_name)]),
    };
    Api::<ClusterRoleBinding>::all(f.client.clone())
        .patch(&name, &params, &Patch::Apply(&binding))
        .await
        .unwrap();
    // The first introspection must not race the authorizer's view of the new binding.
    let subject = super::service_account_subject(&f.ns, sa_name);
    super::wait_allowed(&f.client, "", &subject, &introspect).await;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![issuer.to_owned()]),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = sas
        .create_token_request(sa_name, &PostParams::default(), &request)
        .await
        .expect("a ServiceAccount token for the issuer")
        .status
        .and_then(|s| s.token)
        .expect("TokenRequest status with a token");
    IntrospectionCaller {
        token,
        rbac_name: name,
    }
}

/// A DPoP proof made by the npm package `jose` (`tests/verifiers/node/dpop.mjs prove`), as a client
/// independent of ours would: for `htm` and `htu`, with `ath` of `token` when given, signed by
/// `key` (a private JWK; a new ES256 key when `None`). Returns the key, its thumbprint and the proof.
pub async fn jose_proof(
    key: Option<&Value>,
    htm: &str,
    htu: &str,
    token: Option<&str>,
) -> (Value, String, String) {
    let out = run_dpop_script(
        &[],
        &serde_json::json!({"key": key, "htm": htm, "htu": htu, "token": token}),
        "prove",
    )
    .await;
    (
        out["key"].clone(),
        out["jkt"].as_str().unwrap().to_owned(),
        out["proof"].as_str().unwrap().to_owned(),
    )
}

/// A resource server written with `jose` checks `token` (against the issuer's JWKS) presented with
/// `proof` for a request `htm htu` (`tests/verifiers/node/dpop.mjs check`): whether it accepts, and
/// why not.
pub async fn jose_checks_dpop(
    issuer: &str,
    ca: &Path,
    audience: &str,
    token: &str,
    proof: &str,
    (htm, htu): (&str, &str),
) -> (bool, String) {
    let ca = ca.to_string_lossy();
    let out = run_dpop_script(
        &["--issuer", issuer, "--ca", &ca, "--audience", audience],
        &serde_json::json!({"token": token, "proof": proof, "htm": htm, "htu": htu}),
        "check",
    )
    .await;
    (
        out["accepted"].as_bool().unwrap(),
        out["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn run_dpop_script(args: &[&str], input: &Value, mode: &str) -> Value {
    use tokio::io::AsyncWriteExt;
    let dir = verifiers_dir();
    let mut child = tokio::process::Command::new("node")
        .arg(repo_root().join("tests/verifiers/node/dpop.mjs"))
        .arg(mode)
        .args(args)
        .env("JOSE_DIR", dir.join("node"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs dpop.mjs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "dpop.mjs {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("dpop.mjs prints JSON")
}

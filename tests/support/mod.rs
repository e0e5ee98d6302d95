//! Shared by the integration tests: a client for the project's own control plane (real etcd +
//! kube-apiserver, see hack/control-plane.sh), the CRDs from `crds/`, and a fresh namespace per test.
//!
//! The tests never use the caller's `KUBECONFIG`, so they cannot touch a real cluster by accident:
//! they use `DELEGATION_TEST_KUBECONFIG` when set (the test command sets it), and otherwise start the
//! local control plane themselves (idempotent; `hack/control-plane.sh stop` ends it).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use delegation_operator::api::{AgentIdentity, DelegationGrant};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace, Secret},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};
use serde::Deserialize;

pub const FIELD_MANAGER: &str = "delegation-operator-tests";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The kubeconfig of the test control plane, starting it if needed (once per test binary).
pub fn kubeconfig_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("DELEGATION_TEST_KUBECONFIG") {
            return PathBuf::from(p);
        }
        let out = Command::new(repo_root().join("hack/control-plane.sh"))
            .arg("start")
            .output()
            .expect("could not run hack/control-plane.sh");
        assert!(
            out.status.success(),
            "hack/control-plane.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    })
    .clone()
}

/// A client for the test control plane.
pub async fn client() -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).expect("readable test kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("valid test kubeconfig");
    Client::try_from(config).expect("client for the test control plane")
}

/// Applies every CRD under `crds/` (server-side apply, idempotent) and waits until each is Established.
pub async fn install_crds(client: &Client) -> Vec<CustomResourceDefinition> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut installed = Vec::new();
    for path in crd_files() {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {}: {e}", path.display()));
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        let crd = tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within 30s"))
            .unwrap()
            .unwrap();
        installed.push(crd);
    }
    installed
}

pub fn crd_files() -> Vec<PathBuf> {
    yaml_files(&repo_root().join("crds"))
}

pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// Creates a namespace with a unique name for one test. It is never waited on for deletion: a bare
/// apiserver has no namespace controller, so deleted namespaces stay Terminating.
pub async fn fresh_namespace(client: &Client, prefix: &str) -> String {
    let name = format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create test namespace");
    name
}

/// Every YAML document in a file, as dynamic objects.
pub fn load_documents(path: &Path) -> Vec<DynamicObject> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let value = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
            serde_json::from_value(value).unwrap()
        })
        .collect()
}

/// The dynamic API for one of our kinds, in a namespace.
pub fn dynamic_api(client: &Client, namespace: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("delegation.nhi.dev", "v1alpha1", kind);
    let plural = match kind {
        "AgentIdentity" => "agentidentities",
        "DelegationGrant" => "delegationgrants",
        other => panic!("not one of our kinds: {other}"),
    };
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

/// Creates a document in a namespace; the apiserver's error is returned as is.
pub async fn create_document(
    client: &Client,
    namespace: &str,
    doc: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    let kind = doc
        .types
        .as_ref()
        .expect("document has apiVersion and kind")
        .kind
        .clone();
    let mut doc = doc.clone();
    doc.metadata.namespace = Some(namespace.to_owned());
    dynamic_api(client, namespace, &kind)
        .create(&PostParams::default(), &doc)
        .await
}

/// The apiserver's message for a rejected request, or a panic if it was accepted.
pub fn rejection_message<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Ok(obj) => panic!("the apiserver accepted an invalid object: {obj:?}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            status.message.clone()
        }
        Err(other) => panic!("expected an apiserver validation error, got {other}"),
    }
}

// ---- running the operator --------------------------------------------------------------------

/// The operator binary running against the test control plane, watching one namespace. Its audit
/// trail (stdout) and logs (stderr) go to files; it is killed when dropped.
pub struct Operator {
    child: std::process::Child,
    pub audit_path: PathBuf,
    pub log_path: PathBuf,
    pub namespace: String,
    pub operator_namespace: String,
}

impl Operator {
    /// Starts the operator for `namespace`, keeping keys and revocations in `operator_namespace`.
    pub fn start(namespace: &str, operator_namespace: &str, extra_args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join("delegation-operator-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let stamp = uuid::Uuid::new_v4().simple().to_string();
        let audit_path = dir.join(format!("{namespace}-{stamp}.audit.jsonl"));
        let log_path = dir.join(format!("{namespace}-{stamp}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig_path())
            .args([
                "--namespace",
                namespace,
                "--operator-namespace",
                operator_namespace,
            ])
            .args(["--issuer", "https://issuer.test", "--min-token-ttl", "1s"])
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("DELEGATION_TEST_LOG")
                    .unwrap_or_else(|_| "info,delegation_operator=debug".into()),
            )
            .stdout(std::fs::File::create(&audit_path).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("start the operator binary");
        Self {
            child,
            audit_path,
            log_path,
            namespace: namespace.into(),
            operator_namespace: operator_namespace.into(),
        }
    }

    /// The audit records written so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    pub fn raw_output(&self) -> String {
        std::fs::read_to_string(&self.audit_path).unwrap_or_default()
            + &std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit on its own (for start-up refusals).
    pub fn wait_exit(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (
                    status,
                    std::fs::read_to_string(&self.log_path).unwrap_or_default(),
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "operator did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A namespace for grants plus one for the operator's keys, and the operator watching them.
pub struct Fixture {
    pub client: Client,
    pub ns: String,
    pub operator: Option<Operator>,
}

impl Fixture {
    pub async fn start(prefix: &str, extra_args: &[&str]) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = fresh_namespace(&client, prefix).await;
        create_namespace(&client, &operator_namespace_for(&ns)).await;
        let operator = Operator::start(&ns, &operator_namespace_for(&ns), extra_args);
        Self {
            client,
            ns,
            operator: Some(operator),
        }
    }

    pub fn operator(&self) -> &Operator {
        self.operator.as_ref().expect("operator running")
    }

    pub fn operator_namespace(&self) -> String {
        operator_namespace_for(&self.ns)
    }

    /// Applies YAML documents (our kinds) into the test namespace.
    pub async fn apply(&self, yaml: &str) {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
            let obj: DynamicObject = serde_json::from_value(value).unwrap();
            let kind = obj.types.as_ref().unwrap().kind.clone();
            let name = obj.metadata.name.clone().unwrap();
            let mut obj = obj;
            obj.metadata.namespace = Some(self.ns.clone());
            dynamic_api(&self.client, &self.ns, &kind)
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&obj),
                )
                .await
                .unwrap_or_else(|e| panic!("apply {kind}/{name}: {e}"));
        }
    }

    pub fn grants(&self) -> Api<DelegationGrant> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn agents(&self) -> Api<AgentIdentity> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Merge-patches a grant, as `kubectl patch --type merge` would.
    pub async fn patch_grant(&self, name: &str, patch: serde_json::Value) {
        self.grants()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Merge-patches an agent.
    pub async fn patch_agent(&self, name: &str, patch: serde_json::Value) {
        self.agents()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Merge-patches an agent; an owned future, for patching many at once.
    pub fn patch_agent_owned(
        &self,
        name: String,
        patch: serde_json::Value,
    ) -> impl std::future::Future<Output = ()> + use<> {
        let agents = self.agents();
        async move {
            agents
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    }

    /// Waits until the grant's Ready condition has `status` (and, if given, `reason`); returns the grant.
    pub async fn wait_ready(
        &self,
        name: &str,
        status: &str,
        reason: Option<&str>,
    ) -> DelegationGrant {
        let api = self.grants();
        let what = format!("grant {name} Ready={status} reason={reason:?}");
        wait_for(&what, Duration::from_secs(30), || async {
            let grant = api.get_opt(name).await.ok()??;
            let cond = grant
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Ready")?
                .clone();
            let current = grant.status.as_ref()?.observed_generation == grant.metadata.generation;
            (current && cond.status == status && reason.is_none_or(|r| cond.reason == r))
                .then_some(grant)
        })
        .await
    }

    /// Waits until a grant no longer exists (its finalizer released), panicking with `what` otherwise.
    pub async fn wait_grant_gone(&self, name: &str, what: &str, timeout: Duration) {
        let api = self.grants();
        wait_for(what, timeout, || async {
            api.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }

    /// The token in a Secret, if the Secret exists.
    pub async fn token_in(&self, secret: &str) -> Option<String> {
        let s = self.secrets().get_opt(secret).await.unwrap()?;
        Some(String::from_utf8(s.data?.get("token")?.0.clone()).unwrap())
    }

    /// The claims of the token in a Secret, if the Secret exists and its token verifies against the
    /// published JWKS for the examples' audience.
    pub async fn verified_claims(&self, secret: &str) -> Option<serde_json::Value> {
        let token = self.token_in(secret).await?;
        delegation_operator::signing::verify(
            &token,
            &self.jwks().await,
            "https://tickets.example.com",
            0,
        )
        .ok()
    }

    /// The published JWKS.
    pub async fn jwks(&self) -> serde_json::Value {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.operator_namespace());
        let cm = cms.get("delegation-operator-jwks").await.unwrap();
        serde_json::from_str(&cm.data.unwrap()["jwks.json"]).unwrap()
    }

    /// The token ids in the revocation list.
    pub async fn revoked_ids(&self) -> Vec<String> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.operator_namespace());
        let Some(cm) = cms
            .get_opt("delegation-operator-revocations")
            .await
            .unwrap()
        else {
            return vec![];
        };
        let entries: Vec<serde_json::Value> = serde_json::from_str(
            cm.data
                .unwrap_or_default()
                .get("revocations.json")
                .map_or("[]", |s| s.as_str()),
        )
        .unwrap();
        entries
            .iter()
            .map(|e| e["jti"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Reasons of the Events recorded for an object.
    pub async fn event_reasons(&self, name: &str) -> Vec<(String, String)> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
            .collect()
    }
}

pub fn operator_namespace_for(ns: &str) -> String {
    format!("{ns}-op")
}

pub async fn create_namespace(client: &Client, name: &str) {
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

/// Polls `check` every 200ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

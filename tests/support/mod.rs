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

use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};

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

use serde::Deserialize;

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

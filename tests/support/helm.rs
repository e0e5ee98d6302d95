//! Helm for the tests: the pinned helm (built from its Go module by hack/helm.sh, or `HELM_BIN`),
//! with its state in a private directory, and the chart rendered into documents.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use serde::Deserialize;
use serde_json::Value;

use super::{kubeconfig_path, repo_root};

pub const CHART: &str = "charts/delegation-operator";

/// The helm binary: `HELM_BIN`, else the one hack/helm.sh builds (or reuses) for the pinned version.
pub fn helm_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| built_helm("HELM_BIN", &[])).clone()
}

/// Helm 3 (`HELM3_BIN`, else `hack/helm.sh --helm3`): the chart supports both majors.
pub fn helm3_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| built_helm("HELM3_BIN", &["--helm3"]))
        .clone()
}

fn built_helm(env: &str, args: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let out = Command::new(repo_root().join("hack/helm.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run hack/helm.sh");
    assert!(out.status.success(), "hack/helm.sh {args:?} failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs helm with its state in a private directory (never the user's ~/.config/helm).
pub fn helm(args: &[&str]) -> std::process::Output {
    helm_binary(&helm_path(), args)
}

pub fn helm_binary(binary: &Path, args: &[&str]) -> std::process::Output {
    let home = std::env::temp_dir().join("delegation-operator-tests-helm");
    Command::new(binary)
        .args(args)
        .current_dir(repo_root())
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("run helm")
}

/// helm against the test control plane; panics with its output when it fails.
pub fn helm_cluster(args: &[&str]) -> String {
    let kubeconfig = kubeconfig_path();
    let mut all = args.to_vec();
    all.extend(["--kubeconfig", kubeconfig.to_str().unwrap()]);
    let out = helm(&all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `helm template` of the chart as release `release` in `namespace`, with extra arguments: its
/// documents, or helm's error.
pub fn template(release: &str, namespace: &str, args: &[&str]) -> Result<Vec<Value>, String> {
    let mut all = vec!["template", release, CHART, "--namespace", namespace];
    all.extend(args);
    let out = helm(&all);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(documents(&String::from_utf8(out.stdout).unwrap()))
}

pub fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

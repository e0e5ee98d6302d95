//! GitOps helpers for tests/gitops.rs: the `gitops-check` Go helper (tests/gitops/checker), built once
//! into the versioned cache by tests/gitops/build-tools.sh, which runs the Argo CD health checks of
//! `examples/gitops/argocd/` with gopher-lua (Argo CD's own Lua interpreter), computes kstatus with
//! sigs.k8s.io/cli-utils (what Flux reads by default) and evaluates the `healthCheckExprs` of
//! `examples/gitops/flux/kustomizations.yaml` with Flux's own evaluator.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use serde::Deserialize;

use super::repo_root;

/// What a health check or kstatus said about an object.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Verdict {
    pub status: String,
    pub message: String,
}

/// The `gitops-check` binary (built on first use; a warm cache builds nothing).
pub fn gitops_check() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new(repo_root().join("tests/gitops/build-tools.sh"))
            .output()
            .expect("run tests/gitops/build-tools.sh");
        assert!(
            out.status.success(),
            "tests/gitops/build-tools.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// The Argo CD health check (Lua) shipped for `kind`.
pub fn health_script(kind: &str) -> PathBuf {
    repo_root()
        .join("examples/gitops/argocd/resource_customizations/delegation.nhi.dev")
        .join(kind)
        .join("health.lua")
}

fn run_check(args: &[&std::ffi::OsStr], object: &serde_json::Value) -> Result<Verdict, String> {
    let mut child = Command::new(gitops_check())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gitops-check");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(object.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("gitops-check prints a verdict"))
}

/// Runs the Argo CD health check of the object's kind as Argo CD runs a check from `argocd-cm`
/// (base, table and package libraries only) and, with `open_libs`, as it runs its built-in checks
/// (all standard libraries). Panics when the script fails or returns something Argo CD refuses.
pub fn argo_health_with(object: &serde_json::Value, open_libs: bool) -> Verdict {
    let kind = object["kind"].as_str().expect("an object with a kind");
    let script = health_script(kind);
    let mut args: Vec<&std::ffi::OsStr> = vec!["health".as_ref()];
    if open_libs {
        args.push("--open-libs".as_ref());
    }
    args.push(script.as_os_str());
    run_check(&args, object).unwrap_or_else(|e| panic!("health check of {kind} failed: {e}"))
}

/// The Argo CD health of an object; the same with and without the standard libraries (asserted).
pub fn argo_health(object: &serde_json::Value) -> Verdict {
    let restricted = argo_health_with(object, false);
    assert_eq!(
        restricted,
        argo_health_with(object, true),
        "the check must not depend on Lua's standard libraries"
    );
    restricted
}

/// The kstatus of an object (sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute).
pub fn kstatus(object: &serde_json::Value) -> Verdict {
    run_check(&["kstatus".as_ref()], object).unwrap_or_else(|e| panic!("kstatus failed: {e}"))
}

/// What Flux computes for an object with the `healthCheckExprs` of the Flux example (Flux's
/// `cel.StatusEvaluator`; an expression that cannot be evaluated gives `Unknown`).
pub fn flux_health(object: &serde_json::Value) -> Verdict {
    let kustomizations = repo_root().join("examples/gitops/flux/kustomizations.yaml");
    run_check(&["flux".as_ref(), kustomizations.as_os_str()], object)
        .unwrap_or_else(|e| panic!("flux health failed: {e}"))
}

/// A YAML file's single document as JSON.
pub fn yaml_file_as_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(value).unwrap()
}

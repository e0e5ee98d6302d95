//! A control plane of one test's own: etcd and kube-apiserver started by hack/control-plane.sh in a
//! directory of their own (`CONTROL_PLANE_DIR`, free ports). For tests that restart the apiserver,
//! and for tests whose operator watches every namespace: on the shared control plane it would also
//! reconcile the hundreds of grants other tests leave there, and wait behind them.

use std::path::PathBuf;

use kube::Client;

use super::{
    PROBE_USER, admin_config_of, allow_probe_user, apply_cluster_document, apply_crds, repo_root,
    wait_policies_effective_with, wait_stamps_trusted,
};

/// Stopped, and its directory removed, when dropped (also on panic).
pub struct PrivateControlPlane {
    dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl PrivateControlPlane {
    /// Starts etcd and kube-apiserver; `purpose` names the directory (for a look at its logs).
    pub fn start(purpose: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "delegation-operator-{purpose}-cp-{}",
            uuid::Uuid::new_v4().simple()
        ));
        // The guard exists before the start, so that a half-started control plane is stopped too.
        let mut cp = Self {
            dir,
            kubeconfig: PathBuf::new(),
        };
        let out = cp.script("start");
        cp.kubeconfig = PathBuf::from(out.trim());
        cp
    }

    /// Stops etcd and kube-apiserver and starts them again on the same ports with the same data.
    pub async fn restart(&self) {
        let out = tokio::process::Command::new(repo_root().join("hack/control-plane.sh"))
            .arg("restart")
            .env("CONTROL_PLANE_DIR", &self.dir)
            .output()
            .await
            .expect("run hack/control-plane.sh restart");
        assert!(
            out.status.success(),
            "hack/control-plane.sh restart failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn script(&self, command: &str) -> String {
        let out = std::process::Command::new(repo_root().join("hack/control-plane.sh"))
            .arg(command)
            .env("CONTROL_PLANE_DIR", &self.dir)
            .output()
            .expect("run hack/control-plane.sh");
        assert!(
            out.status.success(),
            "hack/control-plane.sh {command} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A client of its admin user.
    pub async fn client(&self) -> Client {
        Client::try_from(admin_config_of(&self.kubeconfig).await)
            .expect("client for the private control plane")
    }

    /// A client acting as `user` (impersonated with the admin's credentials).
    pub async fn client_as(&self, user: &str) -> Client {
        let mut config = admin_config_of(&self.kubeconfig).await;
        config.auth_info.impersonate = Some(user.to_owned());
        Client::try_from(config).expect("impersonating client for the private control plane")
    }

    /// Installs the CRDs and the admission policies, and waits until this control plane enforces the
    /// policies and the operator would trust their stamps. Unlike [`super::install_crds`], not
    /// remembered per test binary: the shared control plane's installation is another one.
    pub async fn install(&self) {
        let admin = self.client().await;
        apply_crds(&admin).await;
        for doc in delegation_operator::admission::documents() {
            apply_cluster_document(&admin, doc).await;
        }
        allow_probe_user(&admin).await;
        wait_policies_effective_with(&admin, &self.client_as(PROBE_USER).await).await;
        wait_stamps_trusted(&admin).await;
    }
}

impl Drop for PrivateControlPlane {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_root().join("hack/control-plane.sh"))
            .arg("stop")
            .env("CONTROL_PLANE_DIR", &self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

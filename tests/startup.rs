//! Start-up refusals that need a cluster without our CRDs: a second, empty control plane of its own.

mod support;

use std::{path::PathBuf, process::Command, time::Duration};

use support::repo_root;

/// A second control plane (own state directory, own ports), stopped when dropped.
struct EmptyControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl EmptyControlPlane {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "delegation-empty-cp-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let out = Command::new(repo_root().join("hack/control-plane.sh"))
            .arg("start")
            .env("CONTROL_PLANE_DIR", &dir)
            .output()
            .expect("run hack/control-plane.sh");
        let plane = Self {
            dir,
            kubeconfig: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        };
        assert!(
            out.status.success(),
            "second control plane failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        plane
    }
}

impl Drop for EmptyControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("hack/control-plane.sh"))
            .arg("stop")
            .env("CONTROL_PLANE_DIR", &self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_operator_refuses_to_start_without_its_crds_and_says_what_to_install() {
    let plane = EmptyControlPlane::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
        .arg("run")
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig)
        .args(["--operator-namespace", "default"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the operator kept running without its CRDs");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("CRDs are not installed") && stderr.contains("crds | kubectl apply"),
        "{stderr}"
    );
}

//! What `/readyz` reports about the controllers: whether this replica leads and, if so, whether
//! every cache has its initial list (decisions made before that could judge a present object missing).

use std::sync::{
    Mutex,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;

#[derive(Default)]
pub struct Readiness {
    leading: AtomicBool,
    caches: Mutex<Vec<watch::Receiver<bool>>>,
}

impl Readiness {
    /// This replica now leads; `caches` turn true once listed.
    pub fn lead(&self, caches: Vec<watch::Receiver<bool>>) {
        if let Ok(mut held) = self.caches.lock() {
            *held = caches;
        }
        self.leading.store(true, Ordering::SeqCst);
        crate::metrics::metrics().leader.set(1);
    }

    /// This replica stopped leading (lost or released the lease).
    pub fn stop_leading(&self) {
        self.leading.store(false, Ordering::SeqCst);
        if let Ok(mut held) = self.caches.lock() {
            held.clear();
        }
        crate::metrics::metrics().leader.set(0);
    }

    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// A standby has nothing to sync; the leader is ready once its caches exist (it first loads its
    /// keys) and every one of them is listed.
    pub fn controllers_ready(&self) -> bool {
        !self.is_leading()
            || self
                .caches
                .lock()
                .is_ok_and(|caches| !caches.is_empty() && caches.iter().all(|c| *c.borrow()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_is_ready_only_once_its_caches_are_listed() {
        let readiness = Readiness::default();
        assert!(readiness.controllers_ready(), "a standby");
        readiness.lead(Vec::new());
        assert!(!readiness.controllers_ready(), "still loading keys");
        let (listed, caches) = watch::channel(false);
        readiness.lead(vec![caches]);
        assert!(!readiness.controllers_ready(), "still listing");
        listed.send_replace(true);
        assert!(readiness.controllers_ready());
        readiness.stop_leading();
        assert!(readiness.controllers_ready(), "a standby again");
    }
}

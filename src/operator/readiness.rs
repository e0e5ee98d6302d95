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

    /// A standby has nothing to sync; the leader is ready once every cache is listed.
    pub fn controllers_ready(&self) -> bool {
        !self.is_leading()
            || self
                .caches
                .lock()
                .is_ok_and(|caches| caches.iter().all(|c| *c.borrow()))
    }
}

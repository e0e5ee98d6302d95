//! What the token endpoint signs with: the active key of the signing keys Secret, read by a watch of
//! that one Secret. Every replica signs exchanged tokens, standbys included, with exactly the key
//! the leader signs grant tokens with (the leader makes a key active only once it is published, so
//! verifiers already hold it). Only a process that may read that Secret has a signer: the
//! verification server (`serve`) never does.

use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use serde::Serialize;

use crate::{
    endpoints::published::watch_one,
    operator::publishing::keys::{KEYS_SECRET_NAME, keyring_of_secret},
    sealing::GrantId,
    signing::{Keyring, SigningError},
};

/// The keyring of the latest readable version of the keys Secret.
#[derive(Default)]
pub struct Signer(RwLock<Option<Keyring>>);

impl Signer {
    /// Signs `claims` with the active key; `None` before the keys Secret has been read.
    pub fn sign_typed<T: Serialize>(
        &self,
        claims: &T,
        typ: &str,
    ) -> Option<Result<String, SigningError>> {
        let ring = self.0.read().ok()?;
        Some(ring.as_ref()?.active().sign_typed(claims, typ))
    }

    /// Opens a grant's sealed token (Pod delivery) under whichever held key it names.
    pub fn open(&self, grant: GrantId<'_>, sealed: &str) -> Option<String> {
        let ring = self.0.read().ok()?;
        crate::sealing::open(ring.as_ref()?.keys(), grant, sealed).ok()
    }

    pub fn is_loaded(&self) -> bool {
        self.0.read().is_ok_and(|ring| ring.is_some())
    }

    fn apply(&self, secret: &Secret) {
        match keyring_of_secret(secret) {
            Ok(ring) => {
                if let Ok(mut current) = self.0.write() {
                    *current = Some(ring);
                }
            }
            // A broken edit: keep signing with the last good keys until the leader restores them.
            Err(problem) => tracing::warn!(
                secret = KEYS_SECRET_NAME,
                %problem,
                "the signing keys Secret is unreadable; the token endpoint keeps the previous keys"
            ),
        }
    }
}

/// Keeps `signer` in step with the keys Secret of `namespace` for as long as it runs.
pub async fn watch(client: Client, namespace: &str, signer: Arc<Signer>) {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    watch_one(secrets, KEYS_SECRET_NAME, |secret| signer.apply(&secret)).await;
}

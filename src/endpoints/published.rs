//! What the verification endpoints serve, kept here from watches of the operator namespace: the JWKS
//! and the Status List Tokens the leader publishes in a ConfigMap (signed: a forged list does not
//! verify). Every replica — leader or standby — serves the same documents; the leader alone writes
//! them.
//!
//! Where the JWKS comes from depends on who serves it ([`JwksSource`]). The controller, which may
//! read the signing keys Secret anyway, derives it from that Secret, so that an edit of the published
//! ConfigMap (undone by the leader a moment later) never reaches its verifiers. The verification
//! server (`delegation-operator serve`) must never hold a private key: it serves the JWKS ConfigMap,
//! the very document in-cluster verifiers read, after checking that it holds public keys only, each
//! named by its RFC 7638 thumbprint.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::Value;

use crate::{
    operator::{
        publishing::keys::{JWKS_CONFIGMAP_NAME, JWKS_DATA_KEY, KEYS_SECRET_NAME, jwks_of_secret},
        publishing::status_lists,
    },
    signing,
    status_list::{Status, StatusList, TokenStatusRef, data_key},
    verification::VerifyError,
};

/// Where the served JWKS comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwksSource {
    /// The public half of the signing keys Secret (it holds the private keys).
    SigningKeys,
    /// The JWKS ConfigMap the leader publishes (public keys only).
    PublishedConfigMap,
}

#[derive(Debug, Default)]
struct Documents {
    jwks: Option<Value>,
    /// Status List Tokens by ConfigMap key (`<serial>.jwt`).
    lists: BTreeMap<String, String>,
    /// Each list of `lists` once verified against `jwks` and decoded, with the Status List Token it
    /// was read from: a token's status is then a bit lookup, not a signature check and an inflate per
    /// request (the token endpoint answers thousands a second). Emptied when the JWKS changes, and a
    /// list is read again when its token changes.
    decoded: Mutex<HashMap<String, (String, Arc<StatusList>)>>,
}

/// The latest published JWKS and Status List Tokens.
#[derive(Debug, Default)]
pub struct Published(RwLock<Documents>);

impl Published {
    /// The JWKS, once the leader has published one.
    pub fn jwks(&self) -> Option<Value> {
        self.0.read().ok().and_then(|d| d.jwks.clone())
    }

    /// The published Status List Tokens by ConfigMap key.
    pub fn lists(&self) -> BTreeMap<String, String> {
        self.0.read().map(|d| d.lists.clone()).unwrap_or_default()
    }

    /// The Status List Token published under `key`, if any.
    pub fn list(&self, key: &str) -> Option<String> {
        self.0.read().ok().and_then(|d| d.lists.get(key).cloned())
    }

    /// Runs `verify` on the JWKS and the Status List Tokens in place (no copy of the lists per
    /// request); `None` before the JWKS is loaded.
    pub fn with_documents<T>(
        &self,
        verify: impl FnOnce(&Value, &BTreeMap<String, String>) -> T,
    ) -> Option<T> {
        let docs = self.0.read().ok()?;
        Some(verify(docs.jwks.as_ref()?, &docs.lists))
    }

    /// The status of a verified token (its claims) in the published lists: the list it points to
    /// must be published and verify against the published JWKS, as [`crate::verification::status_of`]
    /// requires, but each version of a list is verified and decoded once.
    pub fn status_of(&self, claims: &Value) -> Result<Status, VerifyError> {
        let reference = claims
            .get("status")
            .and_then(TokenStatusRef::from_status_claim)
            .ok_or(VerifyError::NoStatus)?;
        let key = data_key(&reference.uri);
        let docs = self.0.read().map_err(|_| VerifyError::StatusListMissing)?;
        let jwks = docs.jwks.as_ref().ok_or(VerifyError::StatusListMissing)?;
        let token = docs.lists.get(&key).ok_or(VerifyError::StatusListMissing)?;
        let known = docs.decoded.lock().ok().and_then(|decoded| {
            decoded
                .get(&key)
                .filter(|(t, _)| t == token)
                .map(|(_, l)| l.clone())
        });
        let list = match known {
            Some(list) => list,
            None => {
                let list_claims = signing::verify_status_list(token, jwks, &reference.uri)
                    .map_err(VerifyError::StatusListInvalid)?;
                let list = list_claims
                    .get("status_list")
                    .and_then(|claim| StatusList::from_claim(claim).ok())
                    .map(Arc::new)
                    .ok_or(VerifyError::StatusListMalformed)?;
                if let Ok(mut decoded) = docs.decoded.lock() {
                    decoded.insert(key, (token.clone(), list.clone()));
                }
                list
            }
        };
        list.get(reference.idx)
            .map_err(|_| VerifyError::StatusListMalformed)
    }

    pub fn is_loaded(&self) -> bool {
        self.0.read().is_ok_and(|d| d.jwks.is_some())
    }

    fn apply_lists(&self, cm: &ConfigMap) {
        if cm.name_any() != status_lists::CONFIGMAP_NAME {
            return;
        }
        if let Ok(mut docs) = self.0.write() {
            docs.lists = cm.data.clone().unwrap_or_default();
            let Documents { lists, decoded, .. } = &mut *docs;
            if let Ok(decoded) = decoded.get_mut() {
                decoded.retain(|key, _| lists.contains_key(key));
            }
        }
    }

    fn apply_keys(&self, secret: &Secret) {
        match jwks_of_secret(secret) {
            Ok(jwks) => self.set_jwks(jwks),
            // A broken edit: keep serving the last good keys until the leader restores the Secret.
            Err(problem) => tracing::warn!(
                secret = KEYS_SECRET_NAME,
                %problem,
                "the signing keys Secret is unreadable; serving the previous JWKS"
            ),
        }
    }

    fn apply_published_jwks(&self, cm: &ConfigMap) {
        match public_jwks_of(cm) {
            Ok(jwks) => self.set_jwks(jwks),
            // A broken or planted edit: keep serving the last good keys until the leader restores it.
            Err(problem) => tracing::warn!(
                configmap = JWKS_CONFIGMAP_NAME,
                %problem,
                "the published JWKS is not a public key set; serving the previous JWKS"
            ),
        }
    }

    fn set_jwks(&self, jwks: Value) {
        if let Ok(mut docs) = self.0.write() {
            if docs.jwks.as_ref() != Some(&jwks)
                && let Ok(decoded) = docs.decoded.get_mut()
            {
                // A key gone from the set may have signed a list: verify every list again.
                decoded.clear();
            }
            docs.jwks = Some(jwks);
        }
    }
}

/// The key set of the published JWKS ConfigMap, if it is a public key set.
fn public_jwks_of(cm: &ConfigMap) -> std::result::Result<Value, String> {
    let text = cm
        .data
        .as_ref()
        .and_then(|data| data.get(JWKS_DATA_KEY))
        .ok_or_else(|| format!("no {JWKS_DATA_KEY} key"))?;
    let jwks: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    public_key_set(&jwks)?;
    Ok(jwks)
}

/// Checks that `jwks` is a key set the operator could have published: a `keys` array of public
/// keys, each named (`kid`) by its own RFC 7638 thumbprint and with an algorithm we sign with, and
/// no private member anywhere. Reasons never quote key material.
pub fn public_key_set(jwks: &Value) -> std::result::Result<(), String> {
    let keys = jwks["keys"].as_array().ok_or("it has no \"keys\" array")?;
    for key in keys {
        let object = key.as_object().ok_or("a key is not a JSON object")?;
        // EC and OKP private keys carry `d`; any other private member has no place here either.
        if ["d", "p", "q", "dp", "dq", "qi", "k"]
            .iter()
            .any(|m| object.contains_key(*m))
        {
            return Err("a key carries private key material".into());
        }
        key["alg"]
            .as_str()
            .and_then(|alg| alg.parse::<crate::signing::Algorithm>().ok())
            .ok_or("a key has no algorithm the operator signs with")?;
        let thumbprint = crate::signing::thumbprint(key).map_err(|e| e.to_string())?;
        if key["kid"].as_str() != Some(thumbprint.as_str()) {
            return Err("a key's kid is not its RFC 7638 thumbprint".into());
        }
    }
    Ok(())
}

/// Keeps `published` in step with the status-list ConfigMap and the JWKS of `source` for as long as
/// it runs. Each watch names its one object, so RBAC can name it too (`resourceNames`).
pub async fn watch(
    client: Client,
    namespace: String,
    source: JwksSource,
    published: Arc<Published>,
) {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let lists = watch_one(configmaps.clone(), status_lists::CONFIGMAP_NAME, |cm| {
        published.apply_lists(&cm)
    });
    match source {
        JwksSource::SigningKeys => {
            let secrets: Api<Secret> = Api::namespaced(client, &namespace);
            let keys = watch_one(secrets, KEYS_SECRET_NAME, |secret| {
                published.apply_keys(&secret)
            });
            futures::future::join(lists, keys).await;
        }
        JwksSource::PublishedConfigMap => {
            let jwks = watch_one(configmaps, JWKS_CONFIGMAP_NAME, |cm| {
                published.apply_published_jwks(&cm)
            });
            futures::future::join(lists, jwks).await;
        }
    }
}

/// Hands every version of the object `name` to `apply`, retrying a failed watch with backoff.
pub(crate) async fn watch_one<K>(api: Api<K>, name: &str, apply: impl Fn(K))
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .applied_objects()
    .for_each(|object| {
        match object {
            Ok(object) => apply(object),
            Err(e) => tracing::warn!(error = %e, object = name, "watch failed; retrying"),
        }
        futures::future::ready(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{Algorithm, Keyring, SigningKey};
    use serde_json::json;

    fn published_jwks() -> Value {
        let mut ring = Keyring::new(SigningKey::generate(Algorithm::ES256, 1).unwrap());
        ring.rotate(Algorithm::EdDSA, 2).unwrap();
        ring.jwks()
    }

    #[test]
    fn the_operators_key_set_is_a_public_key_set() {
        assert_eq!(public_key_set(&published_jwks()), Ok(()));
        assert_eq!(public_key_set(&json!({"keys": []})), Ok(()));
    }

    /// The verification server never serves (so never holds) a private key, nor a key whose name
    /// is not its own thumbprint, nor anything that is not a key set.
    #[test]
    fn private_renamed_or_malformed_keys_are_refused() {
        let mut private = published_jwks();
        private["keys"][0]["d"] = json!("c2VjcmV0");
        assert!(public_key_set(&private).unwrap_err().contains("private"));
        let mut renamed = published_jwks();
        renamed["keys"][1]["kid"] = renamed["keys"][0]["kid"].clone();
        assert!(public_key_set(&renamed).unwrap_err().contains("thumbprint"));
        let mut unknown_alg = published_jwks();
        unknown_alg["keys"][0]["alg"] = json!("none");
        assert!(public_key_set(&unknown_alg).is_err());
        for junk in [json!({}), json!({"keys": "x"}), json!({"keys": [1]})] {
            assert!(public_key_set(&junk).is_err(), "{junk}");
        }
    }

    fn configmap(name: &str, data: &[(&str, String)]) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    /// A token's status is read from the published list as it is now: a new version of the list is
    /// verified and read again, a list that does not verify against the key set is refused, and so
    /// is one signed by a key that left the set.
    #[test]
    fn statuses_follow_each_published_version_of_a_list() {
        use crate::status_list::{
            STATUS_LIST_TYP, Status, StatusList, data_key, status_list_claims,
        };
        let key = SigningKey::generate(Algorithm::ES256, 1).unwrap();
        let jwks = Keyring::new(key.clone()).jwks();
        let uri = "https://issuer.example/statuslists/s/0";
        let now = 1_800_000_000;
        let list_token = |invalid: bool, signer: &SigningKey| {
            let mut list = StatusList::new(16);
            if invalid {
                list.set(3, Status::Invalid).unwrap();
            }
            let claims = status_list_claims(uri, &list, now, Some(now + 3600), None);
            signer.sign_typed(&claims, STATUS_LIST_TYP).unwrap()
        };
        let published = Published::default();
        published.set_jwks(jwks.clone());
        let lists =
            |token: String| configmap(status_lists::CONFIGMAP_NAME, &[(&data_key(uri), token)]);
        let claims = json!({"status": {"status_list": {"idx": 3, "uri": uri}}});
        assert!(matches!(
            published.status_of(&claims),
            Err(VerifyError::StatusListMissing)
        ));
        published.apply_lists(&lists(list_token(false, &key)));
        assert_eq!(published.status_of(&claims).unwrap(), Status::Valid);
        assert_eq!(
            published.status_of(&claims).unwrap(),
            Status::Valid,
            "from the decoded list"
        );
        published.apply_lists(&lists(list_token(true, &key)));
        assert_eq!(
            published.status_of(&claims).unwrap(),
            Status::Invalid,
            "the new version"
        );
        let stranger = SigningKey::generate(Algorithm::ES256, 2).unwrap();
        published.apply_lists(&lists(list_token(false, &stranger)));
        assert!(matches!(
            published.status_of(&claims),
            Err(VerifyError::StatusListInvalid(_))
        ));
        // A list read under one key set is read again under the next.
        published.apply_lists(&lists(list_token(false, &key)));
        assert_eq!(published.status_of(&claims).unwrap(), Status::Valid);
        published.set_jwks(Keyring::new(stranger).jwks());
        assert!(matches!(
            published.status_of(&claims),
            Err(VerifyError::StatusListInvalid(_))
        ));
        assert!(matches!(
            published.status_of(&json!({})),
            Err(VerifyError::NoStatus)
        ));
    }

    /// A planted edit of the ConfigMap is not served: the last good key set stays.
    #[test]
    fn a_bad_published_jwks_keeps_the_previous_one() {
        let published = Published::default();
        let good = published_jwks();
        published.apply_published_jwks(&configmap(
            JWKS_CONFIGMAP_NAME,
            &[(JWKS_DATA_KEY, good.to_string())],
        ));
        assert_eq!(published.jwks(), Some(good.clone()));
        let mut planted = good.clone();
        planted["keys"][0]["d"] = json!("c2VjcmV0");
        for data in [planted.to_string(), "not json".into()] {
            published
                .apply_published_jwks(&configmap(JWKS_CONFIGMAP_NAME, &[(JWKS_DATA_KEY, data)]));
            assert_eq!(published.jwks(), Some(good.clone()));
        }
        published.apply_published_jwks(&configmap(JWKS_CONFIGMAP_NAME, &[]));
        assert_eq!(published.jwks(), Some(good));
    }
}

//! Identities as the Kubernetes apiserver authenticated them, stamped onto objects by the
//! delegation-operator admission policies (`admission/`): never typed by whoever writes the YAML.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An authenticated Kubernetes user, as admission saw it (`request.userInfo`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub struct UserIdentity {
    /// The user name, e.g. `alice@example.com` or `system:serviceaccount:ci:deployer`.
    #[schemars(length(max = 512))]
    pub username: String,
    /// The user's uid, when the authenticator provides one (empty otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub uid: Option<String>,
    /// The groups the user was authenticated with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(max = 512)))]
    pub groups: Option<Vec<String>>,
    /// Extra attributes of the authenticated user (for example the scopes or credential id an
    /// authenticator adds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    pub extra: Option<BTreeMap<String, ExtraValue>>,
}

/// The values of one extra attribute.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(transparent)]
pub struct ExtraValue(#[schemars(length(max = 64), inner(length(max = 1024)))] pub Vec<String>);

impl UserIdentity {
    /// The uid, with an empty one counted as none.
    pub fn uid(&self) -> Option<&str> {
        self.uid.as_deref().filter(|u| !u.is_empty())
    }

    /// Whether two records name the same authenticated user: same name, and same uid where both
    /// have one.
    pub fn same_user(&self, other: &UserIdentity) -> bool {
        self.username == other.username
            && match (self.uid(), other.uid()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// The username Kubernetes gives a ServiceAccount.
pub fn service_account_username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

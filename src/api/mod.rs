//! The API contract: `AgentIdentity`, `DelegationGrant`, `DelegationApproval` (namespaced) and
//! `AudiencePolicy` (cluster-scoped) in `delegation.nhi.dev/v1alpha1`.
//!
//! Nothing else in the crate defines the shape of these resources. The CRDs under `crds/` are generated
//! from these types (`delegation-operator crds`), and a test keeps the two in sync.
//!
//! Rules for this module: no `default:` in the schemas (defaulting happens in memory so GitOps tools see
//! no drift), optional fields are `Option`, and every field carries a doc comment written for
//! `kubectl explain`.

mod agent_identity;
mod audience_policy;
mod delegation_approval;
mod delegation_grant;
mod duration;
mod identity;
mod times;

pub use agent_identity::*;
pub use audience_policy::*;
pub use delegation_approval::*;
pub use delegation_grant::*;
pub use duration::*;
pub use identity::*;
pub use times::*;

use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of both kinds.
pub const GROUP: &str = "delegation.nhi.dev";
/// The API version of both kinds.
pub const VERSION: &str = "v1alpha1";

/// An OAuth scope token (RFC 6749 §3.3): printable ASCII without space, `"` or `\`.
pub const SCOPE_PATTERN: &str = r#"^[!#-\[\]-~]+$"#;
/// A DNS-1123 subdomain, what Kubernetes accepts as most object names (Secrets included).
pub const DNS1123_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Whether `name` is a DNS-1123 subdomain ([`DNS1123_SUBDOMAIN_PATTERN`]), as most object names
/// must be: checked before a name read from a request or a command line is looked up.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// An audience is an exact absolute URI (`https://api.example.com`, `urn:example:api`): a scheme, a
/// colon, then no whitespace and no `*`, so that no audience can read as a wildcard.
pub const AUDIENCE_RULE: &str = r"self.matches('^[a-zA-Z][a-zA-Z0-9+.-]*:[^\\s*]+$')";
/// [`AUDIENCE_RULE`] for every item of a list.
pub const AUDIENCES_RULE: &str = r"self.all(a, a.matches('^[a-zA-Z][a-zA-Z0-9+.-]*:[^\\s*]+$'))";
pub const AUDIENCE_MESSAGE: &str =
    "must be an exact absolute URI such as https://api.example.com (no spaces, no wildcards)";

/// A reference to another object of a known kind in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct LocalRef {
    /// Name of the object, in the same namespace as the referring resource.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub name: String,
}

impl LocalRef {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Where a grant's token goes: `Secret`, a Secret in the grant's namespace (`secretName`); or
/// `Pod`, no Secret: the agent's pods, running as its serviceAccountName, fetch short-lived tokens of
/// their own from the issuer's token endpoint with their pod-bound ServiceAccount token. On a grant,
/// absent means its actor's tokenDelivery, else Secret. On an AgentIdentity it applies to every grant
/// that does not say; absent means Pod when requireProofOfPossession is true, else Secret. Changing
/// it replaces the token and revokes the old one.
// kube's schema keeps this description, not the fields' own, for an optional enum field.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum TokenDelivery {
    /// A Secret in the grant's namespace (`spec.secretName`, default `<grant name>-token`): whoever
    /// may read Secrets there may use the token.
    Secret,
    /// No Secret: the agent's pods fetch short-lived tokens from the issuer's token endpoint with
    /// their pod-bound ServiceAccount token (projected for the issuer's audience); nothing else in
    /// the namespace can fetch them, and a DPoP proof can bind them to the pod's own key.
    Pod,
}

/// The condition type every resource of this operator reports.
pub const CONDITION_READY: &str = "Ready";

/// The CRDs of this operator, in a stable order.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![
        AgentIdentity::crd(),
        AudiencePolicy::crd(),
        DelegationApproval::crd(),
        DelegationGrant::crd(),
    ]
}

/// The file name under `crds/` for a CRD.
pub fn crd_file_name(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// A CRD as the YAML document checked in under `crds/`.
pub fn crd_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "# Generated by `delegation-operator crds` from src/api/. Do not edit by hand.\n{}",
        serde_yaml::to_string(crd)?
    ))
}

//! The imperative shell: kube-rs controllers, Secret and status writes, keys and revocations.
//!
//! Its rooms, each saying in its own doc comment what lives there and who may call it:
//!
//! - [`run`]: start-up and leadership — the one place that builds the caches, the publishers and the
//!   controllers and runs them while this replica leads.
//! - [`lease`]: the leader Lease's owner — this replica's ServiceAccount, so that the Lease goes
//!   with it on uninstall.
//! - [`grants`]: the DelegationGrant controller — gathers what a grant's reconcile reads, asks the
//!   pure decision in `crate::delegation::decision`, and carries it out (issue, rotate, revoke,
//!   status writes); with its token Secrets, authority checks, renewal slots, alarms, orphan sweep.
//! - [`agents`]: the AgentIdentity controller (subject, active grants, Ready).
//! - [`publishing`]: what verifiers read — signing keys and the JWKS, the Token Status Lists, the
//!   fence before an overwrite, and the guard that puts them back when edited.
//! - [`caches`]: what reconciles read — the shared context, the watches that fill the caches, the
//!   compressed grants cache, the dependency index, the interner, the Secret cache, the stamping
//!   policies.
//! - [`reporting`]: what the operator says — Kubernetes Events and the JSON audit trail.
//! - [`error`], [`readiness`]: the error type and what `/readyz` reports.

pub mod agents;
pub mod caches;
pub mod error;
pub mod grants;
pub mod lease;
pub mod publishing;
pub mod readiness;
pub mod reporting;
pub mod run;

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

pub use caches::context::{Context, LeaderElectionSettings, Settings};
pub use error::{Error, Result};
pub use readiness::Readiness;
pub use run::{LEASE_NAME, check_prerequisites, run, shutdown_signal};

/// The one field manager of every write.
pub const FIELD_MANAGER: &str = "delegation-operator";
/// Held by every grant until its tokens are revoked.
pub const FINALIZER: &str = "delegation.nhi.dev/revoke-tokens";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "delegation-operator";

/// Labels on everything the operator creates; token Secrets are watched by them.
pub fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())])
}

/// The current time in whole seconds: what the apiserver stores, so that a status computed twice
/// compares equal and is not written again.
pub fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

pub fn add_secs(t: Timestamp, secs: u64) -> Timestamp {
    crate::delegation::chain::add(t, std::time::Duration::from_secs(secs))
}

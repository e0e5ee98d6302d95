//! delegation-operator: turns DelegationGrants into short-lived, scoped, signed on-behalf-of tokens.
//!
//! - [`api`]: the CRD types (the contract).
//! - [`admission`]: the admission policies that stamp who asked and check who may.
//! - [`cli`]: commands for people (approve, reject, keys revoke, token inspect, tree; also as `kubectl delegation`).
//! - [`delegation`]: the pure core — chain resolution, attenuation, timing, claims, conditions.
//! - [`endpoints`]: the HTTPS listener — OIDC discovery, JWKS, status lists, introspection, metrics, health.
//! - [`fair_queue`]: which grant is reconciled next — namespaces in turns, revocations first (pure).
//! - [`metrics`]: the Prometheus metrics.
//! - [`operator`]: the kube-rs shell — controllers, Secrets, keys, revocations, audit.
//! - [`sealing`]: a grant's token sealed in its status for Pod delivery (AES-256-GCM, bound to the grant).
//! - [`signing`]: signing keys, JWKS and token verification.
//! - [`status_list`]: the IETF Token Status List for revocation — the bit list, its claims, the index allocator.
//! - [`verification`]: verifying a token as a resource server does (signature, claims, status list).
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod cli;
pub mod delegation;
pub mod dpop;
pub mod endpoints;
pub mod fair_queue;
pub mod metrics;
pub mod operator;
pub mod sealing;
pub mod signing;
pub mod status_list;
pub mod verification;

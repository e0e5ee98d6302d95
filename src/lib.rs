//! delegation-operator: turns DelegationGrants into short-lived, scoped, signed on-behalf-of tokens.
//!
//! - [`api`]: the CRD types (the contract).
//! - [`admission`]: the admission policies that stamp who asked and check who may.
//! - [`cli`]: commands for people (approve, reject).
//! - [`delegation`]: the pure core — chain resolution, attenuation, timing, claims, conditions.
//! - [`operator`]: the kube-rs shell — controllers, Secrets, keys, revocations, audit.
//! - [`signing`]: signing keys, JWKS and token verification.
//! - [`status_list`]: the IETF Token Status List for revocation — the bit list, its claims, the index allocator.
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod cli;
pub mod delegation;
pub mod operator;
pub mod signing;
pub mod status_list;

//! delegation-operator: turns DelegationGrants into short-lived, scoped, signed on-behalf-of tokens.
//!
//! - [`api`]: the CRD types (the contract).
#![forbid(unsafe_code)]

pub mod api;

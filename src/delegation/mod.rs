//! The pure delegation core: no I/O, no clock, no randomness. Everything here takes its inputs as
//! arguments so it can be unit- and property-tested without a cluster.
//!
//! - [`authority`]: who may speak for a principal, extend a chain, or approve.
//! - [`ceilings`]: what the cluster-wide AudiencePolicies of a grant's audience allow it.
//! - [`chain`]: resolve a grant's chain from principal to actor and enforce every attenuation rule.
//! - [`timing`]: when a token expires and when it is renewed.
//! - [`claims`]: the JWT claims of a token (RFC 9068 + RFC 8693 `act`).
//! - [`conditions`]: the `Ready` condition, kstatus style.
//! - [`decision`]: the one decision about a grant's token: refuse, keep or issue, and why.
//! - [`delivery`]: where a grant's token goes (a Secret, or the agent's pods) and whether it is key-bound.
//! - [`exchange`]: the one decision about an RFC 8693 token exchange: the narrower token, or why not.
//! - [`limits`]: which grants of a namespace beyond `--max-grants-per-namespace` are refused.
//! - [`record`]: what the operator itself minted and decided for a grant (a hop rests on its parent's).
//! - [`stamp_trust`]: whether the admission policies that stamp requesters and approvers are in force,
//!   and which generations were written under them.

pub mod authority;
pub mod ceilings;
pub mod chain;
pub mod claims;
pub mod conditions;
pub mod decision;
pub mod delivery;
pub mod exchange;
pub mod explain;
pub mod limits;
pub mod record;
pub mod stamp_trust;
pub mod timing;

pub use chain::{Lookup, Policy, Reason, Refusal, Resolution, resolve};

#[cfg(test)]
mod tests;

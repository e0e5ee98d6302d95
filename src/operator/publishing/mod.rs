//! What verifiers read, and its protection: the signing keys and the JWKS ([`keys`]), the Token
//! Status Lists ([`status_lists`]), the Lease check before overwriting someone else's version
//! ([`fence`]) and the guard that puts edited or deleted artifacts back ([`guard`]). Called by the
//! grant controller (sign, allocate, revoke) and by `operator::run`; never calls a controller.

pub mod fence;
pub mod guard;
pub mod keys;
pub mod status_lists;

//! What the operator itself knows of a grant's token: what it minted (or read back from the grant's
//! Secret and verified against its own keys), and what it decided since. A hop below a grant rests on
//! this record, never on the parent's status: the status subresource is writable by anyone granted
//! `delegationgrants/status`, so a parent's `Ready` condition, approver or token expiry there is a
//! claim, not evidence.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

/// The operator's record of one grant's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenRecord {
    /// The grant holds a token the operator minted, or read back and verified.
    Holds(HeldToken),
    /// The operator refused the grant and revoked its tokens.
    Refused,
}

/// A token the operator minted, or read back and verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldToken {
    /// What the token grants ([`crate::delegation::claims::substance`]).
    pub substance: u64,
    /// When it expires, in seconds since the epoch (as the token's `exp`).
    pub expires_at: i64,
    /// Who approved the grant's hop, as the token records it.
    pub approved_by: Option<Arc<str>>,
    /// The grant's generation the operator last decided the token stands for; `None` when it was read
    /// back from the Secret and this process has not decided on the grant yet (after a restart).
    pub confirmed_for: Option<i64>,
}

impl HeldToken {
    pub fn expires_at(&self) -> Timestamp {
        Timestamp::from_second(self.expires_at).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

impl TokenRecord {
    /// The substance of the token held, if one is.
    pub fn substance(&self) -> Option<u64> {
        match self {
            Self::Holds(held) => Some(held.substance),
            Self::Refused => None,
        }
    }
}

/// The approver of a chain's last hop, as a token minted from it records.
pub fn last_approver(chain: &[crate::api::ChainLink]) -> Option<Arc<str>> {
    chain.last()?.approved_by.as_deref().map(Into::into)
}

//! The operator's one error type.

use crate::signing::SigningError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    #[error("signing: {0}")]
    Signing(#[source] SigningError),

    #[error("serialization: {0}")]
    Serialization(#[source] serde_json::Error),

    #[error("{0}")]
    InvalidState(String),

    /// The grant's namespace holds all the status-list entries its budget allows.
    #[error("{}", .0.message())]
    OverStatusListBudget(crate::status_list::budget::OverBudget),

    /// Every status list the safety limit (`--status-list-max-lists`) allows is in use.
    #[error(
        "all {0} status lists the operator may keep (--status-list-max-lists) are in use; they free \
         up as their tokens expire, and the grant gets its token then (the operator's administrators \
         may raise the limit, or lower --status-list-budget-per-namespace)"
    )]
    StatusListsFull(usize),

    /// A status write found the grant changed since the cached version it was decided from.
    #[error("the grant changed while its status was being written; looking at it again")]
    StaleStatus,
}

impl Error {
    /// A short label for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Signing(_) => "signing",
            Error::Serialization(_) => "serialization",
            Error::InvalidState(_) => "invalid_state",
            Error::OverStatusListBudget(_) => "status_list_budget",
            Error::StatusListsFull(_) => "status_lists_full",
            Error::StaleStatus => "stale_status",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl From<SigningError> for Error {
    fn from(e: SigningError) -> Self {
        Error::Signing(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Serialization(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether an API error is a 404 (an absent object, or an absent API such as uninstalled CRDs,
/// whose plain-text "404 page not found" carries no `NotFound` reason).
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Whether an API error is a 409 (already exists, or a stale resourceVersion).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

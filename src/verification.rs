//! Verifying a token the way a resource server should: signature against the published JWKS, the
//! RFC 9068 checks of [`signing::verify`], then its entry in the published Token Status List. Pure:
//! the caller supplies the JWKS and the published Status List Tokens (from the operator's ConfigMaps,
//! or fetched over HTTPS). Used by the introspection endpoint and `delegation-operator token inspect`.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::Value;

use crate::{
    signing::{self, SigningError},
    status_list::{Status, StatusList, TokenStatusRef, data_key},
};

/// A token whose signature and claims verified, and what its status list says about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    pub claims: Value,
    pub status: Status,
}

impl Verified {
    /// Valid by signature, time and audience, and not revoked or suspended.
    pub fn is_active(&self) -> bool {
        self.status == Status::Valid
    }
}

/// Why a token is not even verified. Static reasons: tokens are attacker input.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Token(#[from] SigningError),
    #[error("token has no status claim (status.status_list)")]
    NoStatus,
    #[error("the status list the token points to is not published")]
    StatusListMissing,
    #[error("the published status list does not verify: {0}")]
    StatusListInvalid(SigningError),
    #[error("the published status list is malformed or too short for the token's index")]
    StatusListMalformed,
}

/// Verifies `token` for `audience` (or, when `None`, for whatever single audience it names — the
/// caller then decides whether that audience concerns it) and looks up its status in `lists`: the
/// published Status List Tokens by ConfigMap key (`<serial>.jwt`).
pub fn verify(
    token: &str,
    jwks: &Value,
    lists: &BTreeMap<String, String>,
    audience: Option<&str>,
    leeway_secs: u64,
) -> Result<Verified, VerifyError> {
    let audience = match audience {
        Some(aud) => aud.to_owned(),
        None => unverified_audience(token).ok_or(SigningError::InvalidClaims)?,
    };
    let claims = signing::verify(token, jwks, &audience, leeway_secs)?;
    let status = status_of(&claims, jwks, lists)?;
    Ok(Verified { claims, status })
}

/// The status of a verified token in the published lists.
pub fn status_of(
    claims: &Value,
    jwks: &Value,
    lists: &BTreeMap<String, String>,
) -> Result<Status, VerifyError> {
    let reference = claims
        .get("status")
        .and_then(TokenStatusRef::from_status_claim)
        .ok_or(VerifyError::NoStatus)?;
    let list_token = lists
        .get(&data_key(&reference.uri))
        .ok_or(VerifyError::StatusListMissing)?;
    let list_claims = signing::verify_status_list(list_token, jwks, &reference.uri)
        .map_err(VerifyError::StatusListInvalid)?;
    let list = list_claims
        .get("status_list")
        .and_then(|claim| StatusList::from_claim(claim).ok())
        .ok_or(VerifyError::StatusListMalformed)?;
    list.get(reference.idx)
        .map_err(|_| VerifyError::StatusListMalformed)
}

/// The `aud` of a token before verification — only to choose what to verify it against. Our tokens
/// carry exactly one audience; a list of several is refused.
pub fn unverified_audience(token: &str) -> Option<String> {
    let claims = unverified_claims(token)?;
    match claims.get("aud")? {
        Value::String(aud) => Some(aud.clone()),
        Value::Array(auds) if auds.len() == 1 => auds[0].as_str().map(str::to_owned),
        _ => None,
    }
}

/// The payload of a compact JWT, NOT verified: for display and routing only.
pub fn unverified_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    // Tokens are bounded (a few KiB); refuse anything absurd before decoding.
    if payload.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

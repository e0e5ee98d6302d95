//! The audit trail: one JSON line on stdout per issue, rotation, revocation and denial, carrying the
//! full actor chain. Never the token itself, only its id. Operational logs go to stderr, so stdout is
//! a clean stream for a log pipeline.

use std::io::Write;

use serde::Serialize;

use crate::api::ChainLink;

/// What happened.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum AuditAction {
    Issued,
    Rotated,
    Revoked,
    Denied,
}

/// One audit record.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord<'a> {
    pub time: String,
    pub action: AuditAction,
    pub namespace: &'a str,
    pub grant: &'a str,
    /// The condition reason behind the action (e.g. `DeniedScopeNotAllowed`, `AgentSuspended`).
    pub reason: &'a str,
    pub message: &'a str,
    /// The root principal, when the chain reaches one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// Who asked for what the grant authorises now (created it, or last changed it), as the apiserver
    /// authenticated them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requester: Option<&'a str>,
    /// Everyone who wrote a version of the grant's spec (`spec.authors`), the requester last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authors: Option<&'a [String]>,
    /// Root principal first: the resolved chain, or for a refusal the chain as written.
    pub chain: Vec<ChainLink>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<&'a str>,
    /// Token ids concerned (the new one, or those revoked).
    pub token_ids: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Of an issued token: where its revocation status is published (`{"idx": …, "uri": …}`, the
    /// token's own `status.status_list` claim), so that an auditor can check it without the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_list: Option<&'a crate::status_list::TokenStatusRef>,
}

/// Writes one record as a JSON line on stdout.
pub fn record(record: &AuditRecord<'_>) {
    let metrics = crate::metrics::metrics();
    let family = match record.action {
        AuditAction::Issued => &metrics.issued,
        AuditAction::Rotated => &metrics.rotated,
        AuditAction::Revoked => &metrics.revoked,
        AuditAction::Denied => &metrics.denied,
    };
    crate::metrics::Metrics::count(family, record.reason);
    match serde_json::to_string(record) {
        Ok(line) => {
            let mut out = std::io::stdout().lock();
            // A failed write (closed stdout) must not stop the operator; the Event still records it.
            let _ = writeln!(out, "{line}").and_then(|_| out.flush());
        }
        Err(e) => tracing::error!(error = %e, "could not serialize audit record"),
    }
}

/// What became of a token exchange (`POST <issuer>/token`).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum ExchangeAction {
    Exchanged,
    ExchangeRefused,
    /// A Pod-delivered grant's token handed to its agent's pod (as a narrowing of its own).
    Delivered,
    DeliveryRefused,
}

/// The proven workload that asked for an exchange.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRecord<'a> {
    pub service_account: String,
    pub pod: &'a str,
    pub pod_uid: &'a str,
}

/// One audit record of a token exchange: who asked (the proven workload), under which grant, for
/// which chain and scopes, and the new token's id and status entry — never a token. A refusal names
/// what is known by the time it was refused.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeRecord<'a> {
    pub time: String,
    pub action: ExchangeAction,
    /// `exchanged`, or the refusal's reason label (`wider_scope`, `not_an_actor`, ...).
    pub reason: &'a str,
    /// The RFC 6749 error code of a refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    /// The subject token's grant, once the subject token verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRecord<'a>>,
    /// The actors of the issued token (or of the subject token, for a refusal), root-most first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<&'a str>,
    /// The id of the subject token exchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_token_id: Option<&'a str>,
    /// The id of the issued token.
    pub token_ids: Vec<&'a str>,
    /// The thumbprint of the key the issued token is bound to (DPoP `cnf.jkt`), if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The issued token's status entry: its lineage's (the grant token's), so that revoking the grant
    /// revokes it in the same publish.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_list: Option<&'a serde_json::Value>,
}

/// Writes one exchange record as a JSON line on stdout, and counts it by result.
pub fn record_exchange(record: &ExchangeRecord<'_>) {
    crate::metrics::metrics()
        .token_exchanges
        .get_or_create(&crate::metrics::ResultLabels {
            result: record.reason.to_owned(),
        })
        .inc();
    match serde_json::to_string(record) {
        Ok(line) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}").and_then(|_| out.flush());
        }
        Err(e) => tracing::error!(error = %e, "could not serialize audit record"),
    }
}

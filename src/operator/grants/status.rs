//! What the grant controller writes and says about a grant: its status (written only when it
//! changed, at the version the decision was made from), and its audit line ([`Said`]). Called by the
//! issue and revoke paths and by the reconcile.

use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt, api::PostParams};

use crate::operator::{
    FIELD_MANAGER,
    caches::context::Context,
    error::{Error, Result},
    now,
    reporting::audit::{self, AuditAction, AuditRecord},
};
use crate::{
    api::{ApprovalStatus, DelegationGrant, DelegationGrantStatus},
    delegation::{
        Lookup, Resolution,
        chain::chain_as_written,
        conditions::{ready_condition, set_ready},
    },
    status_list::TokenStatusRef,
};

/// Condition reasons of a Ready grant, and of a grant whose tokens were revoked on deletion.
pub const ISSUED: &str = "Issued";
pub const ROTATED: &str = "Rotated";
pub const REVOKED: &str = "Revoked";

/// Brings `observedGeneration` up to date when the spec changed in ways the current token survives.
pub(super) async fn acknowledge_generation(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> Result<()> {
    let Some(status) = grant.status.as_ref() else {
        return Ok(());
    };
    if status.observed_generation == grant.metadata.generation {
        return Ok(());
    }
    let Some(ready) = ready_condition(status.conditions.as_deref()) else {
        return Ok(());
    };
    let mut updated = status.clone();
    updated.observed_generation = grant.metadata.generation;
    updated.conditions = Some(set_ready(
        status.conditions.as_deref(),
        ready.status == "True",
        &ready.reason,
        &ready.message,
        grant.metadata.generation,
        now,
    ));
    write_status(grant, ctx, updated).await?;
    Ok(())
}

/// The status of a grant that holds no token.
pub(super) fn refused_status(
    grant: &DelegationGrant,
    approval: Option<ApprovalStatus>,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> DelegationGrantStatus {
    let previous = grant.status.as_ref().and_then(|s| s.conditions.as_deref());
    DelegationGrantStatus {
        conditions: Some(set_ready(
            previous,
            false,
            reason,
            message,
            grant.metadata.generation,
            now,
        )),
        observed_generation: grant.metadata.generation,
        parent_grant_uid: grant
            .status
            .as_ref()
            .and_then(|s| s.parent_grant_uid.clone()),
        approval,
        ..Default::default()
    }
}

/// Writes the status when it differs from what the cache shows. Returns whether it wrote.
///
/// A plain update of the status subresource, made from the cached grant with its resourceVersion as
/// a precondition: the decision was taken from that version, so if the grant changed meanwhile (or
/// another writer got there first) the write fails with a conflict and the grant is looked at again,
/// rather than describing a grant that no longer exists. The apiserver takes only `status` from the
/// body of a status update, so the cache's pruned metadata does not matter.
pub(super) async fn write_status(
    grant: &DelegationGrant,
    ctx: &Context,
    mut status: DelegationGrantStatus,
) -> Result<bool> {
    if status.parent_grant_uid.is_none() {
        status.parent_grant_uid = parent_uid(grant, ctx);
    }
    if grant.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<DelegationGrant> =
        Api::namespaced(ctx.client.clone(), &grant.namespace().unwrap_or_default());
    let mut desired = grant.clone();
    desired.status = Some(status);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api
        .replace_status(&grant.name_any(), &params, &desired)
        .await
    {
        Ok(written) => {
            ctx.remember_status_write(grant, written.resource_version());
            Ok(true)
        }
        // Deleted meanwhile (finalizer already gone): nothing left to describe.
        Err(e) if crate::operator::error::is_not_found(&e) => Ok(false),
        Err(e) if crate::operator::error::is_conflict(&e) => Err(Error::StaleStatus),
        Err(e) => Err(e.into()),
    }
}

/// The uid of a hop's parent as the cache shows it now: pinned into the status the first time the
/// grant's status is written, and never changed afterwards.
pub(super) fn parent_uid(grant: &DelegationGrant, ctx: &Context) -> Option<String> {
    let parent = grant.spec.parent_grant_ref.as_ref()?;
    let namespace = grant.namespace()?;
    ctx.namespace_view(&namespace).grant(&parent.name)?.uid()
}

/// What is said about a grant in the audit trail, as one value: [`Said::audit`] turns it into the
/// record, naming the principal, the requester and the chain — the resolved chain when there is
/// one, else the chain of the token being revoked, else the chain as written.
pub struct Said<'a> {
    pub action: AuditAction,
    /// The condition reason behind it.
    pub reason: &'a str,
    pub message: &'a str,
    pub resolution: Option<&'a Resolution>,
    /// The token ids concerned (the new one, or those revoked).
    pub token_ids: Vec<&'a str>,
    pub expires_at: Option<String>,
    /// Of an issued token: where its status is published.
    pub status_list: Option<&'a TokenStatusRef>,
}

impl<'a> Said<'a> {
    /// An action with its reason and message, concerning no token.
    pub fn new(action: AuditAction, reason: &'a str, message: &'a str) -> Self {
        Self {
            action,
            reason,
            message,
            resolution: None,
            token_ids: Vec::new(),
            expires_at: None,
            status_list: None,
        }
    }

    /// Writes it as `grant`'s audit line.
    pub fn audit(self, grant: &'a DelegationGrant, ctx: &Context) {
        audit::record(&self.record(grant, ctx));
    }

    fn record(self, grant: &'a DelegationGrant, ctx: &Context) -> AuditRecord<'a> {
        let namespace = grant.metadata.namespace.as_deref().unwrap_or_default();
        let chain = match self.resolution {
            Some(r) => r.chain.clone(),
            None => grant
                .status
                .as_ref()
                .and_then(|s| s.chain.clone())
                .unwrap_or_else(|| {
                    chain_as_written(grant, namespace, &ctx.namespace_view(namespace))
                }),
        };
        let principal = chain
            .first()
            .filter(|l| l.kind != "AgentIdentity")
            .map(|l| l.name.clone());
        AuditRecord {
            time: now().to_string(),
            action: self.action,
            namespace,
            grant: grant.metadata.name.as_deref().unwrap_or_default(),
            reason: self.reason,
            message: self.message,
            principal,
            requester: grant.spec.requester.as_ref().map(|r| r.username.as_str()),
            authors: grant.spec.authors.as_deref(),
            chain,
            scopes: self.resolution.map(|r| r.effective_scopes.as_slice()),
            audience: self.resolution.map(|r| r.audience.as_str()),
            token_ids: self.token_ids,
            expires_at: self.expires_at,
            status_list: self.status_list,
        }
    }
}

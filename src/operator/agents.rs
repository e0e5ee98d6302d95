//! The AgentIdentity controller: reports the agent's token subject, how many grants it currently acts
//! under, and whether it can receive grants at all.

use std::{sync::Arc, time::Duration};

use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};

use super::{
    FIELD_MANAGER,
    context::Context,
    error::{Error, Result},
    now,
};
use crate::{
    api::{AgentIdentity, AgentIdentityStatus, agent_subject},
    delegation::conditions::set_ready,
};

pub async fn reconcile(agent: Arc<AgentIdentity>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.caches_ready().await {
        return Err(Error::InvalidState("caches stopped".into()));
    }
    let namespace = agent
        .namespace()
        .ok_or_else(|| Error::InvalidState("agent without namespace".into()))?;
    let name = agent.name_any();
    let active = ctx.index.ready_count(&namespace, &name);
    let (ready, reason, message) = readiness(&agent);
    let previous = agent.status.as_ref().and_then(|s| s.conditions.as_deref());
    let status = AgentIdentityStatus {
        subject: Some(agent_subject(&namespace, &name)),
        active_grants: Some(i32::try_from(active).unwrap_or(i32::MAX)),
        conditions: Some(set_ready(
            previous,
            ready,
            reason,
            &message,
            agent.metadata.generation,
            now(),
        )),
        observed_generation: agent.metadata.generation,
    };
    if agent.status.as_ref() != Some(&status) {
        let api: Api<AgentIdentity> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1",
            "kind": "AgentIdentity",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(Action::await_change())
}

pub fn error_policy(agent: Arc<AgentIdentity>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(agent = %agent.name_any(), error = %error, kind = error.metric_label(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn readiness(agent: &AgentIdentity) -> (bool, &'static str, String) {
    if agent.spec.is_suspended() {
        return (
            false,
            "Suspended",
            "spec.suspended is true: every token naming this agent is revoked".into(),
        );
    }
    if let Err(e) = agent.spec.max_token_ttl.parse() {
        return (false, "InvalidSpec", format!("spec.maxTokenTTL: {e}"));
    }
    (
        true,
        "Valid",
        "the agent can receive grants within its allowedScopes and allowedAudiences".into(),
    )
}

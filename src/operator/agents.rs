//! The AgentIdentity controller: reports the agent's token subject, how many grants it currently acts
//! under, and whether it can receive grants at all.
//!
//! The count alone changes with every grant that becomes Ready or stops being so; written each time,
//! thousands of grants on one agent would mean thousands of writes of one object. So a change of the
//! count alone is written at most once per [`COUNT_REFRESH`]; any other change is written at once.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};

use super::{
    FIELD_MANAGER,
    caches::context::{Context, key},
    error::{Error, Result},
    now,
    reporting::events::Recent,
};
use crate::{
    api::{AgentIdentity, AgentIdentityStatus, agent_subject},
    delegation::{ceilings::agent_beyond, conditions::set_ready},
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
    let policies = ctx.audience_policies.state();
    let beyond = agent_beyond(&agent, &namespace, &policies);
    let (ready, reason, message) = readiness(&agent, &beyond);
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
        let uid = agent.uid().unwrap_or_default();
        let count_only = agent.status.as_ref().is_some_and(|old| {
            let same_count = AgentIdentityStatus {
                active_grants: old.active_grants,
                ..status.clone()
            };
            same_count == *old
        });
        if count_only && let Some(wait) = ctx.agent_count_writes.wait(&uid) {
            // Written when the wait is over, with the count of then.
            return Ok(Action::requeue(wait));
        }
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
        if count_only {
            ctx.agent_count_writes.wrote(&uid);
        }
    }
    Ok(Action::await_change())
}

/// The least time between two writes of an agent's `activeGrants` alone.
pub const COUNT_REFRESH: Duration = Duration::from_secs(10);

/// When each agent (by uid) last had its count alone written. An agent is forgotten one to two
/// [`COUNT_REFRESH`] after that write, deleted or not: only the agents written lately are held.
pub struct CountWrites(Mutex<Recent<()>>);

impl Default for CountWrites {
    fn default() -> Self {
        Self(Mutex::new(Recent::new(COUNT_REFRESH)))
    }
}

impl CountWrites {
    /// How long the agent's count must still wait, if it was written less than [`COUNT_REFRESH`] ago.
    pub fn wait(&self, uid: &str) -> Option<Duration> {
        let mut recent = self.0.lock().ok()?;
        let now = Instant::now();
        let written = recent.get(key(uid), now)?.set_at;
        Some(COUNT_REFRESH.saturating_sub(now.saturating_duration_since(written)))
    }

    pub fn wrote(&self, uid: &str) {
        if let Ok(mut recent) = self.0.lock() {
            // Read under the lock, so that the times handed to `Recent` never go back.
            let now = Instant::now();
            recent.insert(key(uid), (), now);
        }
    }
}

pub fn error_policy(agent: Arc<AgentIdentity>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(agent = %agent.name_any(), error = %error, kind = error.metric_label(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// The agent's Ready condition. An agent allowing more than the AudiencePolicies stays Ready (grants
/// within the policies work) with reason `BeyondPolicy`, saying what its grants cannot have.
fn readiness(agent: &AgentIdentity, beyond: &[String]) -> (bool, &'static str, String) {
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
    if !beyond.is_empty() {
        return (
            true,
            "BeyondPolicy",
            format!(
                "the agent can receive grants within the AudiencePolicies only: {}; grants asking for that are refused",
                beyond.join("; ")
            ),
        );
    }
    (
        true,
        "Valid",
        "the agent can receive grants within its allowedScopes and allowedAudiences".into(),
    )
}

//! The grant controller's loop, in place of kube's `Controller`: every trigger of a grant (its own
//! watch events, its token Secrets', an approval naming it, a wake-up) goes into a
//! [`FairQueue`](crate::fair_queue::FairQueue), which admits at most `--concurrency` reconciles at
//! once besides revocations (deletions and suspensions: first, and in slots of their own), and
//! otherwise namespace by namespace in turns. kube's controller serves one queue for every
//! namespace (and, once saturated, picks among the waiting in no particular order): 10,000 grants
//! arriving in one namespace were reconciled before, or mixed at random with, another namespace's
//! deletion. How long grants wait, and how many, is on `/metrics` by lane.
//!
//! A waiting grant costs its key only; its reconcile is made and boxed when it is admitted. A
//! reconcile that asks to be looked at again does so through the grant's alarm
//! ([`Context::look_again`]), as does a failed one ([`super::retry_after`]). Built by
//! `operator::run`.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{FutureExt, Stream, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Resource, ResourceExt,
    api::PartialObjectMeta,
    runtime::{controller::Action, reflector::ObjectRef},
};
use tracing::Instrument;

use crate::{
    api::{DelegationApproval, DelegationGrant},
    fair_queue::{Admitted, FairQueue, Lane, Tenanted},
    operator::{caches::context::Context, error::Result},
};

/// A grant by `namespace/name`: one shared string, which is all a waiting grant costs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrantKey(Arc<str>);

impl GrantKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self(Arc::from(format!("{namespace}/{name}")))
    }

    fn parts(&self) -> (&str, &str) {
        self.0.split_once('/').unwrap_or(("", &self.0))
    }

    fn object_ref(&self) -> ObjectRef<DelegationGrant> {
        let (namespace, name) = self.parts();
        ObjectRef::new(name).within(namespace)
    }
}

impl Tenanted for GrantKey {
    fn tenant(&self) -> &str {
        self.parts().0
    }
}

impl std::fmt::Display for GrantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request to reconcile a grant, in the lane it waits in.
pub struct Trigger {
    grant: GrantKey,
    lane: Lane,
}

impl Trigger {
    /// A grant's own watch event. A grant being deleted or suspended waits in the revocation lane,
    /// unless the operator's record says it holds no token (`revoked`): otherwise a tenant editing
    /// many suspended grants could keep that lane, which goes before every namespace's issuance,
    /// busy.
    pub fn of_grant(grant: &DelegationGrant, revoked: bool) -> Self {
        let revoking =
            !revoked && (grant.metadata.deletion_timestamp.is_some() || grant.spec.is_suspended());
        Self {
            grant: GrantKey::new(&grant.namespace().unwrap_or_default(), &grant.name_any()),
            lane: if revoking {
                Lane::Revocation
            } else {
                Lane::Routine
            },
        }
    }

    /// A token Secret's event: its controlling grant (the only owner the cache keeps of it).
    pub fn of_token_secret(secret: &PartialObjectMeta<Secret>) -> Option<Self> {
        let namespace = secret.metadata.namespace.as_deref()?;
        let api_version = DelegationGrant::api_version(&());
        let owner = secret
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == DelegationGrant::kind(&()) && o.api_version == api_version)?;
        Some(Self::routine(GrantKey::new(namespace, &owner.name)))
    }

    /// An approval's event: the grant it names.
    pub fn of_approval(approval: &DelegationApproval) -> Option<Self> {
        let namespace = approval.namespace()?;
        Some(Self::routine(GrantKey::new(
            &namespace,
            &approval.spec.grant_ref.name,
        )))
    }

    /// A wake-up (an alarm, a change of something the grant depends on).
    pub fn of_wake(grant: &ObjectRef<DelegationGrant>) -> Self {
        Self::routine(GrantKey::new(
            grant.namespace.as_deref().unwrap_or_default(),
            &grant.name,
        ))
    }

    fn routine(grant: GrantKey) -> Self {
        Self {
            grant,
            lane: Lane::Routine,
        }
    }
}

/// A reconcile that ended: which grant, the version it read, and how it went.
type Finished = (GrantKey, Arc<DelegationGrant>, Result<Action>);

/// Reconciles grants as `triggers` ask, at most `--concurrency` at once, fairly between namespaces,
/// until `shutdown` (then the running reconciles finish, and nothing new starts).
pub async fn run(
    triggers: impl Stream<Item = Trigger> + Send,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()>,
) {
    let mut queue: Queue = FairQueue::new(usize::from(ctx.settings.concurrency));
    let mut running: FuturesUnordered<BoxFuture<'static, Finished>> = FuturesUnordered::new();
    let triggers = triggers.fuse();
    // Nothing runs before the caches hold the cluster (triggers queue meanwhile).
    let caches = {
        let ctx = ctx.clone();
        async move { ctx.caches_ready().await }
    }
    .fuse();
    let shutdown = shutdown.fuse();
    futures::pin_mut!(triggers, caches, shutdown);
    let mut caches_ready = false;
    loop {
        if caches_ready {
            admit(&mut queue, &mut running, &ctx);
        }
        report_depth(&queue);
        tokio::select! {
            trigger = triggers.next() => match trigger {
                Some(Trigger { grant, lane }) => queue.push(grant, lane, Instant::now()),
                None => break,
            },
            Some((grant, version, outcome)) = running.next(), if !running.is_empty() => {
                look_again_after(&ctx, &grant, &version, outcome);
                queue.done(&grant);
            }
            _ = &mut caches, if !caches_ready => caches_ready = true,
            () = &mut shutdown => break,
        }
    }
    tracing::info!(
        running = running.len(),
        waiting = queue.waiting(),
        "grant controller stopping: letting running reconciles finish"
    );
    while let Some((grant, version, outcome)) = running.next().await {
        look_again_after(&ctx, &grant, &version, outcome);
    }
}

/// The grants waiting, each stamped with when it was asked for.
type Queue = FairQueue<GrantKey, Instant>;

/// Starts every reconcile the queue admits now. A grant no longer in the cache (deleted) is done.
fn admit(
    queue: &mut Queue,
    running: &mut FuturesUnordered<BoxFuture<'static, Finished>>,
    ctx: &Arc<Context>,
) {
    while let Some(Admitted {
        item: key,
        lane,
        queued,
    }) = queue.admit()
    {
        crate::metrics::metrics().observe_queue_wait(lane.as_str(), queued.elapsed().as_secs_f64());
        let Some(grant) = ctx.grants.get(&key.object_ref()) else {
            queue.done(&key);
            continue;
        };
        let span = tracing::info_span!("reconciling grant", grant = %key);
        let ctx = ctx.clone();
        running.push(
            async move {
                let outcome =
                    crate::metrics::timed("grants", super::reconcile(grant.clone(), ctx)).await;
                (key, grant, outcome)
            }
            .instrument(span)
            .boxed(),
        );
    }
}

/// The queue's depth per lane, for `/metrics`.
fn report_depth(queue: &Queue) {
    for lane in Lane::ALL {
        crate::metrics::metrics().report_queue_depth(lane.as_str(), queue.waiting_in(lane));
    }
}

/// Every look-again of a grant is its alarm ([`Context::look_again`]); a failed reconcile is
/// retried the same way. An `Action` asking for a requeue has no schedule here to go to: it is
/// looked at again a second later rather than forgotten.
fn look_again_after(
    ctx: &Context,
    key: &GrantKey,
    grant: &DelegationGrant,
    outcome: Result<Action>,
) {
    let after = match outcome {
        Ok(action) if action == Action::await_change() => None,
        Ok(action) => {
            tracing::debug!(grant = %key, ?action, "a requeue asked of the runner; looking again in 1s");
            Some(Duration::from_secs(1))
        }
        Err(error) => super::retry_after(grant, &error),
    };
    if let Some(after) = after {
        let (namespace, name) = key.parts();
        ctx.alarms.set(namespace, name, after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_key_is_its_namespace_and_name_and_its_tenant_the_namespace() {
        let key = GrantKey::new("team-a", "alice-1");
        assert_eq!(key.tenant(), "team-a");
        assert_eq!(key.parts(), ("team-a", "alice-1"));
        let r = key.object_ref();
        assert_eq!(
            (r.name.as_str(), r.namespace.as_deref()),
            ("alice-1", Some("team-a"))
        );
        assert_eq!(key, GrantKey::new("team-a", "alice-1"));
        assert_ne!(key, GrantKey::new("team-b", "alice-1"));
    }

    fn grant(extra_meta: serde_json::Value, extra_spec: serde_json::Value) -> DelegationGrant {
        let mut value = serde_json::json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
            "metadata": {"name": "g", "namespace": "team-a"},
            "spec": {"principal": {"kind": "User", "name": "alice@example.com"},
                     "actorRef": {"name": "agent"}, "scopes": ["tickets:read"],
                     "audience": "https://tickets.example.com", "tokenTTL": "10m"},
        });
        for (k, v) in extra_meta.as_object().into_iter().flatten() {
            value["metadata"][k] = v.clone();
        }
        for (k, v) in extra_spec.as_object().into_iter().flatten() {
            value["spec"][k] = v.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_grant_being_deleted_or_suspended_waits_in_the_revocation_lane() {
        let none = serde_json::json!({});
        let routine = Trigger::of_grant(&grant(none.clone(), none.clone()), false);
        assert_eq!(
            (routine.grant, routine.lane),
            (GrantKey::new("team-a", "g"), Lane::Routine)
        );
        let deleted = grant(
            serde_json::json!({"deletionTimestamp": "2026-12-06T00:00:00Z", "finalizers": ["x"]}),
            none.clone(),
        );
        assert_eq!(Trigger::of_grant(&deleted, false).lane, Lane::Revocation);
        let suspended = grant(none, serde_json::json!({"suspended": true}));
        assert_eq!(Trigger::of_grant(&suspended, false).lane, Lane::Revocation);
        // Already revoked: nothing urgent is left, it waits its namespace's turn.
        assert_eq!(Trigger::of_grant(&suspended, true).lane, Lane::Routine);
        assert_eq!(Trigger::of_grant(&deleted, true).lane, Lane::Routine);
    }

    #[test]
    fn a_token_secret_triggers_its_controlling_grant_only() {
        let secret = |kind: &str, api_version: &str| -> PartialObjectMeta<Secret> {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": "g-token", "namespace": "team-a", "ownerReferences": [{
                    "apiVersion": api_version, "kind": kind, "name": "g", "uid": "u", "controller": true}]},
            }))
            .unwrap()
        };
        let ours =
            Trigger::of_token_secret(&secret("DelegationGrant", "delegation.nhi.dev/v1alpha1"))
                .expect("its grant");
        assert_eq!(
            (ours.grant, ours.lane),
            (GrantKey::new("team-a", "g"), Lane::Routine)
        );
        assert!(Trigger::of_token_secret(&secret("ConfigMap", "v1")).is_none());
        assert!(Trigger::of_token_secret(&secret("DelegationGrant", "example.com/v1")).is_none());
    }
}

//! The watches that fill the caches, and the wake-ups they send once a cache holds a change: a grant
//! woken because its agent or parent changed always reads that change. Built by `operator::run`.

use std::sync::Arc;

use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    runtime::{WatchStreamExt, reflector, reflector::ObjectRef, watcher},
};

use super::index;
use crate::{
    api::{AgentIdentity, AudiencePolicy, DelegationGrant},
    operator::grants::{self, authority, orphans},
};

/// A cache of `K`, the stream of touched objects that fills it (to be polled by a controller), and a
/// flag that turns true once the initial list is in the cache. See [`watch_into`].
pub fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    prune: impl FnMut(&mut K) + Send + 'static,
    after_cached: impl FnMut(&watcher::Event<K>) + Send + 'static,
) -> (
    reflector::Store<K>,
    impl futures::Stream<Item = std::result::Result<K, watcher::Error>> + Send + 'static,
    tokio::sync::watch::Receiver<bool>,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, mut writer) = reflector::store();
    let (events, ready) = watch_into(
        api,
        config,
        prune,
        move |event| writer.apply_watcher_event(event),
        after_cached,
    );
    (store, events, ready)
}

/// Watches `K` into a cache that `cache` keeps, and returns the stream of touched objects (to be
/// polled by a controller) and a flag that turns true once the initial list is in the cache.
/// `after_cached` sees every event once `cache` has it. Before caching, `prune` drops what nothing
/// reads of a `K`, and every kind loses its managedFields and kubectl's last-applied-configuration
/// annotation (a full copy of the object as applied): nothing reads them, and they are most of a
/// small object's size.
pub fn watch_into<K>(
    api: Api<K>,
    config: watcher::Config,
    mut prune: impl FnMut(&mut K) + Send + 'static,
    mut cache: impl FnMut(&watcher::Event<K>) + Send + 'static,
    mut after_cached: impl FnMut(&watcher::Event<K>) + Send + 'static,
) -> (
    impl futures::Stream<Item = std::result::Result<K, watcher::Error>> + Send + 'static,
    tokio::sync::watch::Receiver<bool>,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let events = watcher(api, config)
        .default_backoff()
        .modify(move |obj| {
            let meta = obj.meta_mut();
            meta.managed_fields = None;
            if let Some(annotations) = meta.annotations.as_mut() {
                annotations.remove(LAST_APPLIED_ANNOTATION);
            }
            prune(obj);
        })
        .inspect(move |event| match event {
            Ok(event) => {
                cache(event);
                after_cached(event);
                if matches!(event, watcher::Event::InitDone) {
                    ready_tx.send_replace(true);
                }
            }
            // The watch retries with backoff; say so once per failure, loudly enough to be seen.
            Err(e) => {
                tracing::warn!(kind = K::kind(&()).as_ref(), error = %e, "watch failed; retrying")
            }
        })
        .touched_objects();
    (events, ready_rx)
}

/// Where `kubectl apply` (client-side) keeps the whole object as last applied.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

type Wake<K> = futures::channel::mpsc::UnboundedSender<ObjectRef<K>>;

/// After a grant event: index it, wake its children (they read its status) and, when its readiness
/// changed, its agent (which counts Ready grants). With a grant limit (per namespace, or per audience
/// in a namespace: `audience_limit`), a deletion wakes the grant that now ranks last within it (it
/// was refused for the limit, and no event of its own brings it back).
pub fn grant_fan_out(
    index: Arc<index::GrantIndex>,
    wake_grant: Wake<DelegationGrant>,
    wake_agent: Wake<AgentIdentity>,
    sweep: futures::channel::mpsc::UnboundedSender<orphans::Sweep>,
    max_grants_per_namespace: Option<usize>,
    audience_limit: impl Fn(&str, &str) -> Option<usize> + Send + 'static,
) -> impl FnMut(&watcher::Event<DelegationGrant>) + Send + 'static {
    move |event| {
        let touched = index.apply(event);
        if let Some((ns, actor)) = touched.actor {
            let _ = wake_agent.unbounded_send(ObjectRef::new(&actor).within(&ns));
        }
        match event {
            watcher::Event::Apply(grant) | watcher::Event::Delete(grant) => {
                let ns = grant.namespace().unwrap_or_default();
                for child in index.children(&ns, &grant.name_any()) {
                    let _ = wake_grant.unbounded_send(ObjectRef::new(&child).within(&ns));
                }
                if let (watcher::Event::Delete(_), Some(limit)) = (event, max_grants_per_namespace)
                    && let Some(admitted) = index.ranked(&ns, limit.saturating_sub(1))
                {
                    let _ = wake_grant.unbounded_send(ObjectRef::new(&admitted).within(&ns));
                }
                if let watcher::Event::Delete(_) = event
                    && let Some(limit) = audience_limit(&grant.spec.audience, &ns)
                    && let Some(admitted) = index.ranked_for_audience(
                        &ns,
                        &grant.spec.audience,
                        limit.saturating_sub(1),
                    )
                {
                    let _ = wake_grant.unbounded_send(ObjectRef::new(&admitted).within(&ns));
                }
                // A grant gone without its finalizer (forced off) leaves its Secret behind.
                if matches!(event, watcher::Event::Delete(_)) {
                    for secret in grants::secret_names(grant) {
                        let _ = sweep.unbounded_send(orphans::Sweep::Secret(ns.clone(), secret));
                    }
                    // ... or takes the label off its Secret first: the operator's own record decides.
                    let _ = sweep.unbounded_send(orphans::Sweep::Grant {
                        namespace: ns.clone(),
                        name: grant.name_any(),
                        uid: grant.uid().unwrap_or_default(),
                    });
                }
            }
            // After a re-list every grant is reconciled anyway; agents recount from the new index.
            watcher::Event::InitDone => {
                for (ns, actor) in index.actors() {
                    let _ = wake_agent.unbounded_send(ObjectRef::new(&actor).within(&ns));
                }
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }
}

/// After an agent event: when its spec changed (a new generation) or it is gone, wake every grant
/// with it anywhere in its chain. Its own status writes wake nobody, or every `activeGrants` update
/// would re-run every grant under it. During a re-list the changes are collected and woken once the
/// new list is in the cache.
pub fn agent_fan_out(
    index: Arc<index::GrantIndex>,
    wake_grant: Wake<DelegationGrant>,
    authority: Arc<authority::CheckedAuthority>,
) -> impl FnMut(&watcher::Event<AgentIdentity>) + Send + 'static {
    // uid -> (namespace, name, generation) of every agent seen.
    let mut seen: std::collections::HashMap<String, (String, String, Option<i64>)> =
        Default::default();
    let mut relisted: Option<std::collections::HashSet<String>> = None;
    let mut pending: Vec<(String, String)> = Vec::new();
    // The first list wakes nobody: every grant is reconciled at start-up anyway.
    let mut listed_once = false;
    move |event| {
        let changed = |agent: &AgentIdentity, seen: &mut std::collections::HashMap<_, _>| {
            let entry = (
                agent.namespace().unwrap_or_default(),
                agent.name_any(),
                agent.metadata.generation,
            );
            let key = (entry.0.clone(), entry.1.clone());
            (seen.insert(agent.uid().unwrap_or_default(), entry.clone()) != Some(entry))
                .then_some(key)
        };
        match event {
            watcher::Event::Apply(agent) => pending.extend(changed(agent, &mut seen)),
            watcher::Event::Delete(agent) => {
                seen.remove(&agent.uid().unwrap_or_default());
                pending.push((agent.namespace().unwrap_or_default(), agent.name_any()));
            }
            watcher::Event::Init => relisted = Some(Default::default()),
            watcher::Event::InitApply(agent) => {
                relisted
                    .get_or_insert_default()
                    .insert(agent.uid().unwrap_or_default());
                pending.extend(changed(agent, &mut seen));
                return;
            }
            watcher::Event::InitDone => {
                // Agents deleted while the watch was down are absent from the new list.
                let listed = relisted.take().unwrap_or_default();
                seen.retain(|uid, (ns, name, _)| {
                    listed.contains(uid) || {
                        pending.push((ns.clone(), name.clone()));
                        false
                    }
                });
                if !listed_once {
                    listed_once = true;
                    pending.clear();
                }
            }
        }
        for (ns, agent) in pending.drain(..) {
            for grant in index.dependents_of_agent(&ns, &agent) {
                // Approval requirements and workloads live on the agent: ask again.
                authority.forget_named(&ns, &grant);
                let _ = wake_grant.unbounded_send(ObjectRef::new(&grant).within(&ns));
            }
        }
    }
}

/// After an AudiencePolicy event: when its spec changed (a new generation) or it is gone, wake every
/// grant of its audience — a narrowed or deleted policy revokes at once what it no longer allows, a
/// widened one issues — and forget their authority checks (a policy can require approval). Agents
/// allowing the audience are woken too: their Ready message says which audiences are undeclared.
/// During a re-list the changes are collected and woken once the new list is in the cache; the first
/// list wakes nobody (everything is reconciled at start-up anyway).
pub fn policy_fan_out(
    grants: Arc<super::grant_cache::GrantCache>,
    agents: reflector::Store<AgentIdentity>,
    wake_grant: Wake<DelegationGrant>,
    wake_agent: Wake<AgentIdentity>,
    authority: Arc<authority::CheckedAuthority>,
) -> impl FnMut(&watcher::Event<AudiencePolicy>) + Send + 'static {
    // uid -> (audience, generation) of every policy seen.
    let mut seen: std::collections::HashMap<String, (String, Option<i64>)> = Default::default();
    let mut relisted: Option<std::collections::HashSet<String>> = None;
    let mut pending: std::collections::BTreeSet<String> = Default::default();
    let mut listed_once = false;
    move |event| {
        let mut changed =
            |policy: &AudiencePolicy, pending: &mut std::collections::BTreeSet<String>| {
                let entry = (policy.spec.audience.clone(), policy.metadata.generation);
                if seen.insert(policy.uid().unwrap_or_default(), entry.clone()) != Some(entry) {
                    pending.insert(policy.spec.audience.clone());
                }
            };
        match event {
            watcher::Event::Apply(policy) => changed(policy, &mut pending),
            watcher::Event::Delete(policy) => {
                seen.remove(&policy.uid().unwrap_or_default());
                pending.insert(policy.spec.audience.clone());
            }
            watcher::Event::Init => relisted = Some(Default::default()),
            watcher::Event::InitApply(policy) => {
                relisted
                    .get_or_insert_default()
                    .insert(policy.uid().unwrap_or_default());
                changed(policy, &mut pending);
                return;
            }
            watcher::Event::InitDone => {
                // Policies deleted while the watch was down are absent from the new list.
                let listed = relisted.take().unwrap_or_default();
                seen.retain(|uid, (audience, _)| {
                    listed.contains(uid) || {
                        pending.insert(audience.clone());
                        false
                    }
                });
                if !listed_once {
                    listed_once = true;
                    pending.clear();
                }
            }
        }
        if pending.is_empty() {
            return;
        }
        for grant in grants.summaries() {
            if pending.contains(&*grant.audience) {
                authority.forget_named(&grant.namespace, &grant.name);
                let _ = wake_grant.unbounded_send(grant.object_ref());
            }
        }
        for agent in agents.state() {
            if agent
                .spec
                .allowed_audiences
                .iter()
                .any(|a| pending.contains(a))
            {
                let ns = agent.namespace().unwrap_or_default();
                let _ = wake_agent.unbounded_send(ObjectRef::new(&agent.name_any()).within(&ns));
            }
        }
        pending.clear();
    }
}

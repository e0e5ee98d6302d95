//! The imperative shell: kube-rs controllers, Secret and status writes, keys and revocations.
//!
//! - [`grants`]: the DelegationGrant controller (issue, rotate, revoke).
//! - [`agents`]: the AgentIdentity controller (subject, active grants, Ready).
//! - [`alarms`]: when each grant must be looked at again (renewal, re-checks).
//! - [`interner`]: one shared copy of what many cached grants repeat (their requester, the names in
//!   the dependency index).
//! - [`token_secret`]: the token Secrets and who owns them; [`secret_cache`] what is kept of them.
//! - [`keys`]: signing keys and the published JWKS; [`fence`]: the Lease checked before an overwrite.
//! - [`status_lists`]: the Token Status Lists (every token's `status`, set INVALID on revocation).
//! - [`audit`]: the JSON audit trail.

pub mod agents;
pub mod alarms;
pub mod audit;
pub mod authority;
pub mod context;
pub mod error;
pub mod events;
pub mod fence;
pub mod grants;
pub mod index;
pub mod interner;
pub mod keys;
pub mod orphans;
pub mod readiness;
pub mod renewals;
pub mod secret_cache;
pub mod stamps;
pub mod status_lists;
pub mod token_secret;

use std::{collections::BTreeMap, sync::Arc};

use futures::{StreamExt, future};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace, Secret},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PartialObjectMeta},
    runtime::{
        WatchStreamExt,
        controller::{self, Controller},
        events::Reporter,
        reflector,
        reflector::ObjectRef,
        watcher,
    },
};

pub use context::{Context, LeaderElectionSettings, Settings};
pub use error::{Error, Result};
use k8s_controller::LeaderElection;
pub use readiness::Readiness;

use crate::api::{AgentIdentity, DelegationApproval, DelegationGrant};

/// The one field manager of every write.
pub const FIELD_MANAGER: &str = "delegation-operator";
/// Held by every grant until its tokens are revoked.
pub const FINALIZER: &str = "delegation.nhi.dev/revoke-tokens";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "delegation-operator";

/// Labels on everything the operator creates; token Secrets are watched by them.
pub fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())])
}

/// The current time in whole seconds: what the apiserver stores, so that a status computed twice
/// compares equal and is not written again.
pub fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

pub fn add_secs(t: Timestamp, secs: u64) -> Timestamp {
    crate::delegation::chain::add(t, std::time::Duration::from_secs(secs))
}

/// Runs both controllers and key rotation until a termination signal; `readiness` follows whether
/// this replica leads and has its caches.
pub async fn run(client: Client, settings: Settings, readiness: Arc<Readiness>) -> Result<()> {
    let Some(election) = settings.leader_election.clone() else {
        tracing::warn!(
            "leader election is off: run exactly one replica, or revocations can be lost"
        );
        return lead(client, settings, readiness).await;
    };
    let election = LeaderElection::new(
        client.clone(),
        &settings.operator_namespace,
        LEASE_NAME,
        &election.identity,
    )
    .with_lease_duration(election.lease_duration)
    .with_renew_deadline(election.renew_deadline)
    .with_retry_period(election.retry_period);
    let work = election.with_lease(lead(client, settings, readiness.clone()));
    tokio::pin!(work);
    tokio::select! {
        outcome = &mut work => {
            readiness.stop_leading();
            return lease_outcome(outcome);
        }
        _ = shutdown_signal() => {}
    }
    if readiness.is_leading() {
        // The controllers stop on the same signal; the lease is then released for the next leader.
        return lease_outcome(work.await);
    }
    tracing::info!("delegation-operator stopped while waiting for the leader lease");
    Ok(())
}

/// The Lease in the operator namespace that elects the one replica allowed to write.
pub const LEASE_NAME: &str = "delegation-operator-leader";

/// Losing the lease means another replica may already be writing: stop at once (the process exits
/// non-zero and is restarted as a candidate) rather than write beside it.
fn lease_outcome(outcome: Option<Result<()>>) -> Result<()> {
    outcome.unwrap_or_else(|| {
        Err(Error::InvalidState(
            "lost the leader lease (it could not be renewed within the renew deadline, or another \
             replica took it); stopped writing"
                .into(),
        ))
    })
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate => {},
    }
}

/// Everything the leader does: keys, revocations, both controllers. Nothing here runs on a standby.
async fn lead(client: Client, settings: Settings, readiness: Arc<Readiness>) -> Result<()> {
    tracing::info!("leading: loading keys and starting the controllers");
    // Leading from here on, even while the keys load: /readyz waits for the caches below.
    readiness.lead(Vec::new());
    let fence = match &settings.leader_election {
        Some(election) => fence::Fence::lease(
            client.clone(),
            &settings.operator_namespace,
            &election.identity,
        ),
        None => fence::Fence::none(),
    };
    let keys = keys::KeyStore::load_or_create(
        client.clone(),
        &settings.operator_namespace,
        settings.algorithm,
        settings.key_rotation_period,
        settings.policy.max_token_ttl,
        now(),
        fence.clone(),
    )
    .await?;
    remove_legacy_revocation_list(&client, &settings.operator_namespace).await;
    let status_lists = status_lists::StatusLists::load(
        client.clone(),
        &settings.operator_namespace,
        &settings.issuer,
        settings.policy.max_token_ttl,
        &keys,
        now().as_second(),
        fence,
    )
    .await?;

    let grants_api: Api<DelegationGrant> = scoped_api(&client, &settings);
    let agents_api: Api<AgentIdentity> = scoped_api(&client, &settings);
    // Metadata only: token bytes never reach this process through the watch.
    let secrets_api: Api<PartialObjectMeta<Secret>> = scoped_api(&client, &settings);
    let watch = watcher::Config::default();

    // Wake-ups between controllers come from the very streams that fill the caches, after the cache
    // has the change: a grant woken because its agent or parent changed always reads that change.
    let index = Arc::new(index::GrantIndex::default());
    let authority = Arc::new(authority::CheckedAuthority::default());
    let (sweep, orphan_keys) = futures::channel::mpsc::unbounded();
    let (wake_grant, grant_wakes) = futures::channel::mpsc::unbounded();
    let (wake_agent, agent_wakes) = futures::channel::mpsc::unbounded();
    let (grants_store, grant_events, grants_ready) = reflect(
        grants_api,
        watch.clone(),
        // Nothing reads a grant's labels or annotations; grants by one requester share its identity.
        {
            let mut requesters = interner::Interner::default();
            move |grant: &mut DelegationGrant| {
                grant.metadata.labels = None;
                grant.metadata.annotations = None;
                if let Some(requester) = grant.spec.requester.as_mut() {
                    requesters.share(requester);
                }
            }
        },
        grant_fan_out(index.clone(), wake_grant.clone(), wake_agent, sweep.clone()),
    );
    let (agents_store, agent_events, agents_ready) = reflect(
        agents_api,
        watch.clone(),
        |_| {},
        agent_fan_out(index.clone(), wake_grant.clone(), authority.clone()),
    );
    let approvals_api: Api<DelegationApproval> = scoped_api(&client, &settings);
    // A new approval or rejection must count at once, not when a remembered check expires.
    let forget_checked = authority.clone();
    let (approvals, approval_events, approvals_ready) = reflect(
        approvals_api,
        watch.clone(),
        |_| {},
        move |event| {
            if let watcher::Event::Apply(a) | watcher::Event::Delete(a) = event {
                forget_checked
                    .forget_named(&a.namespace().unwrap_or_default(), &a.spec.grant_ref.name);
            }
        },
    );
    // Cluster-scoped, metadata only: from when identity stamps are proven.
    let ours = watch
        .clone()
        .labels("app.kubernetes.io/part-of=delegation-operator");
    let (policies, policy_events, policies_ready) =
        reflect(Api::all(client.clone()), ours.clone(), |_| {}, |_| {});
    let (bindings, binding_events, bindings_ready) =
        reflect(Api::all(client.clone()), ours, |_| {}, |_| {});
    let managed = watch.labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    // Every token Secret the cache sees is checked for a grant that is gone.
    // Of a token Secret's labels and annotations only the token id is read: it is kept aside, as a
    // hash, and the cache holds neither.
    let secret_token_ids = Arc::new(context::SecretTokenIds::default());
    let token_ids = secret_token_ids.clone();
    let prune_secret = move |secret: &mut PartialObjectMeta<Secret>| {
        secret.metadata.labels = None;
        let token_id = secret
            .metadata
            .annotations
            .take()
            .and_then(|mut a| a.remove(token_secret::TOKEN_ID_ANNOTATION));
        token_ids.record(
            secret.metadata.namespace.as_deref().unwrap_or_default(),
            secret.metadata.name.as_deref().unwrap_or_default(),
            token_id.as_deref(),
        );
    };
    let forget_token_ids = secret_token_ids.clone();
    let unseen_writes = Arc::new(context::UnseenWrites::default());
    let seen = unseen_writes.clone();
    let secrets = Arc::new(secret_cache::SecretCache::default());
    let cache = secrets.clone();
    let (secret_events, secrets_ready) = watch_into(
        secrets_api,
        managed,
        prune_secret,
        move |event| cache.apply(event),
        move |event| match event {
            watcher::Event::Apply(secret) | watcher::Event::InitApply(secret) => {
                let key = (secret.namespace().unwrap_or_default(), secret.name_any());
                seen.seen(&key.0, &key.1);
                let _ = sweep.unbounded_send(orphans::Sweep::Secret(key.0, key.1));
            }
            watcher::Event::Delete(secret) => {
                let key = (secret.namespace().unwrap_or_default(), secret.name_any());
                seen.seen(&key.0, &key.1);
                forget_token_ids.forget(&key.0, &key.1)
            }
            watcher::Event::Init => seen.clear(),
            watcher::Event::InitDone => {}
        },
    );

    let caches_ready = vec![
        grants_ready,
        agents_ready,
        approvals_ready,
        secrets_ready,
        policies_ready,
        bindings_ready,
    ];
    readiness.lead(caches_ready.clone());
    crate::metrics::metrics().watch_grants(Some(grants_store.clone()));
    // Events are written by their own task, which ends when the last Context is dropped.
    let recorder = events::Recorder::start(
        client.clone(),
        Reporter {
            controller: MANAGED_BY.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let ctx = Arc::new(Context {
        wake_grant: wake_grant.clone(),
        client: client.clone(),
        settings: settings.clone(),
        grants: grants_store.clone(),
        agents: agents_store.clone(),
        approvals,
        stamps: stamps::Stamps { policies, bindings },
        secrets,
        index,
        caches_ready,
        authority: authority.clone(),
        keys,
        status_lists,
        recorder,
        agent_count_writes: Default::default(),
        alarms: Default::default(),
        minted: Default::default(),
        trusted_secrets: Default::default(),
        status_written_from: Default::default(),
        secret_token_ids: secret_token_ids.clone(),
        unseen_writes,
        renewals: renewals::Renewals::new(settings.concurrency, wake_grant.clone()),
        released: std::sync::Mutex::new(events::Recent::new(context::RELEASED_KEPT)),
    });

    let grants = Controller::for_stream(grant_events, grants_store)
        .owns_stream(secret_events)
        // The approvals cache is filled by this very stream: a woken grant reads the new approval.
        .watches_stream(approval_events, |approval| {
            approval
                .namespace()
                .map(|ns| ObjectRef::new(&approval.spec.grant_ref.name).within(&ns))
        })
        .reconcile_on(grant_wakes)
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .shutdown_on_signal()
        .run(
            |grant, ctx| crate::metrics::timed("grants", grants::reconcile(grant, ctx)),
            grants::error_policy,
            ctx.clone(),
        )
        .for_each(|_| future::ready(()));
    let agents = Controller::for_stream(agent_events, agents_store)
        .reconcile_on(agent_wakes)
        .shutdown_on_signal()
        .run(
            |agent, ctx| crate::metrics::timed("agents", agents::reconcile(agent, ctx)),
            agents::error_policy,
            ctx.clone(),
        )
        .for_each(|_| future::ready(()));

    tracing::info!(
        namespace = settings.watch_namespace.as_deref().unwrap_or("<all>"),
        operator_namespace = %settings.operator_namespace,
        issuer = %settings.issuer,
        "delegation-operator running"
    );
    // The policy caches have no controller of their own: their streams only need polling.
    let policy_caches = future::join(
        policy_events.for_each(|_| future::ready(())),
        binding_events.for_each(|_| future::ready(())),
    );
    tokio::select! {
        _ = future::join(grants, agents) => {},
        _ = policy_caches => {},
        _ = orphans::run(ctx.clone(), orphan_keys) => {},
        _ = guard_published_artifacts(ctx.clone()) => {},
        _ = ctx.keys.run_rotation() => {},
        _ = ctx.status_lists.run_maintenance(&ctx.keys) => {},
        _ = ctx.alarms.run(wake_grant.clone()) => {},
    }
    tracing::info!("delegation-operator stopped");
    Ok(())
}

/// Watches what verifiers trust — the JWKS, the status lists (and their state Secret and record
/// shards), the keys Secret — and puts each back
/// when someone edits or deletes it. Metadata only; an event costs one read of that one object,
/// except when it shows a version of the status-list state the operator itself just wrote.
async fn guard_published_artifacts(ctx: Arc<Context>) {
    let namespace = ctx.settings.operator_namespace.clone();
    let configmaps: Api<PartialObjectMeta<ConfigMap>> =
        Api::namespaced(ctx.client.clone(), &namespace);
    let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(ctx.client.clone(), &namespace);
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    // Tagged with their kind: the status lists' ConfigMap and state Secret share a name.
    let changed = futures::stream::select(
        watcher(configmaps, ours.clone())
            .default_backoff()
            .flat_map(|e| futures::stream::iter(touched_names(e)))
            .map(|(name, seen)| (false, name, seen)),
        watcher(secrets, ours)
            .default_backoff()
            .flat_map(|e| futures::stream::iter(touched_names(e)))
            .map(|(name, seen)| (true, name, seen)),
    );
    changed
        .for_each(|(secret, name, seen)| {
            let ctx = ctx.clone();
            async move {
                let restored = match (secret, name.as_str()) {
                    (true, keys::KEYS_SECRET_NAME) => revoke_requested_keys(&ctx).await,
                    (false, keys::JWKS_CONFIGMAP_NAME) => ctx.keys.restore().await,
                    (false, status_lists::CONFIGMAP_NAME) => {
                        ctx.status_lists.restore_published().await
                    }
                    (true, name)
                        if name == status_lists::SECRET_NAME
                            || name.starts_with(status_lists::SHARD_PREFIX) =>
                    {
                        ctx.status_lists.restore_state(name, seen.as_deref()).await
                    }
                    _ => Ok(()),
                };
                if let Err(e) = restored {
                    tracing::warn!(object = name, error = %e, "could not restore a published artifact; retried on its next change");
                }
            }
        })
        .await;
}

/// The ConfigMap of revoked token ids that versions before the Token Status Lists kept.
const LEGACY_REVOCATIONS_CONFIGMAP: &str = "delegation-operator-revocations";

/// Deletes the list of revoked token ids that older versions kept: it is no longer written, and a
/// verifier still reading it would accept every token revoked since. Without it such a verifier
/// finds nothing and fails, rather than trusting a stale list. Best effort: nothing of today's
/// revocation depends on it, so a failure is reported, not fatal.
async fn remove_legacy_revocation_list(client: &Client, namespace: &str) {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match configmaps
        .delete(LEGACY_REVOCATIONS_CONFIGMAP, &Default::default())
        .await
    {
        Ok(_) => tracing::info!(
            configmap = LEGACY_REVOCATIONS_CONFIGMAP,
            "deleted the list of revoked token ids older versions kept; revocation is in the Token Status Lists"
        ),
        Err(e) if error::is_not_found(&e) => {}
        Err(e) => tracing::warn!(
            configmap = LEGACY_REVOCATIONS_CONFIGMAP,
            error = %e,
            "could not delete the list of revoked token ids older versions kept; it is no longer updated, delete it by hand"
        ),
    }
}

/// Carries out `delegation-operator keys revoke` (an annotation on the keys Secret), wakes every grant
/// whose token a revoked key signed, and puts the Secret back to the keys held.
async fn revoke_requested_keys(ctx: &Context) -> Result<()> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &ctx.settings.operator_namespace);
    let requested: Vec<String> = secrets
        .get_metadata_opt(keys::KEYS_SECRET_NAME)
        .await?
        .and_then(|s| s.metadata.annotations)
        .and_then(|a| a.get(keys::REVOKE_KEYS_ANNOTATION).cloned())
        .map(|v| {
            v.split(',')
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if !requested.is_empty() && !ctx.keys.revoke(&requested, now()).await?.is_empty() {
        // Status List Tokens the revoked key signed no longer verify: re-sign them at once.
        ctx.status_lists
            .maintain(&ctx.keys, now().as_second())
            .await?;
        for grant in ctx.grants.state() {
            let signed_by = grant
                .status
                .as_ref()
                .and_then(|s| s.token.as_ref())
                .map(|t| t.key_id.as_str());
            if signed_by.is_some_and(|kid| !ctx.keys.is_published(kid)) {
                let _ = ctx
                    .wake_grant
                    .unbounded_send(ObjectRef::from(grant.as_ref()));
            }
        }
    }
    ctx.keys.restore().await
}

/// The names a watch event concerns; the end of a (re-)list checks everything once.
fn touched_names<K: kube::Resource>(
    event: std::result::Result<watcher::Event<K>, watcher::Error>,
) -> Vec<(String, Option<String>)> {
    match event {
        Ok(watcher::Event::Apply(obj)) => {
            let meta = obj.meta();
            vec![(
                meta.name.clone().unwrap_or_default(),
                meta.resource_version.clone(),
            )]
        }
        Ok(watcher::Event::Delete(obj)) => {
            vec![(obj.meta().name.clone().unwrap_or_default(), None)]
        }
        Ok(watcher::Event::InitDone) => [
            keys::JWKS_CONFIGMAP_NAME,
            keys::KEYS_SECRET_NAME,
            status_lists::CONFIGMAP_NAME,
        ]
        .map(|name| (name.to_owned(), None))
        .to_vec(),
        _ => Vec::new(),
    }
}

/// A cache of `K`, the stream of touched objects that fills it (to be polled by a controller), and a
/// flag that turns true once the initial list is in the cache. See [`watch_into`].
fn reflect<K>(
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
fn watch_into<K>(
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
/// changed, its agent (which counts Ready grants).
fn grant_fan_out(
    index: Arc<index::GrantIndex>,
    wake_grant: Wake<DelegationGrant>,
    wake_agent: Wake<AgentIdentity>,
    sweep: futures::channel::mpsc::UnboundedSender<orphans::Sweep>,
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
fn agent_fan_out(
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

fn scoped_api<K>(client: &Client, settings: &Settings) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match &settings.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Refuses to start, saying what to do, when the CRDs or the operator namespace are missing. Reads
/// only where the operator will watch (a single-namespace install has no cluster-wide rights).
pub async fn check_prerequisites(client: &Client, settings: &Settings) -> Result<()> {
    let probe = ListParams::default().limit(1);
    let grants: Api<DelegationGrant> = scoped_api(client, settings);
    let agents: Api<AgentIdentity> = scoped_api(client, settings);
    let listed = match grants.list_metadata(&probe).await {
        Ok(_) => agents.list_metadata(&probe).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = listed {
        return Err(if error::is_not_found(&e) {
            Error::InvalidState(
                "the DelegationGrant and AgentIdentity CRDs are not installed; install them with \
                 `delegation-operator crds | kubectl apply -f -` (or `kubectl apply -f crds/`)"
                    .into(),
            )
        } else {
            e.into()
        });
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces
        .get_opt(&settings.operator_namespace)
        .await?
        .is_none()
    {
        return Err(Error::InvalidState(format!(
            "the operator namespace {:?} does not exist; create it (`kubectl create namespace {0}`) or pass --operator-namespace",
            settings.operator_namespace
        )));
    }
    Ok(())
}

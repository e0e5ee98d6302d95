//! Start-up and leadership: the leader election, and everything the leader runs — the keys and
//! status lists loaded, the caches filled, both controllers, the sweeps and the guard. Called by
//! `main` only; nothing here decides anything about a grant.

use std::sync::Arc;

use futures::{StreamExt, future};
use k8s_controller::LeaderElection;
use k8s_openapi::api::{
    admissionregistration::v1::{
        MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding, ValidatingAdmissionPolicy,
        ValidatingAdmissionPolicyBinding,
    },
    core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PartialObjectMeta},
    runtime::{
        controller::Controller,
        events::Reporter,
        reflector::{self, ObjectRef},
        watcher,
    },
};

use super::{
    Context, Error, MANAGED_BY, MANAGED_BY_LABEL, Readiness, Result, Settings, agents,
    caches::{
        context, grant_cache, index, prune, secret_cache, stamps,
        watches::{agent_fan_out, grant_fan_out, policy_fan_out, reflect, watch_into},
    },
    error,
    grants::{authority, orphans, renewals, runner, token_secret},
    lease, now,
    publishing::{fence, guard, keys, status_lists},
    reporting::events,
};
use crate::api::{AgentIdentity, AudiencePolicy, DelegationApproval, DelegationGrant};
use crate::delegation::limits;

/// Runs both controllers and key rotation until a termination signal; `readiness` follows whether
/// this replica leads and has its caches.
pub async fn run(client: Client, settings: Settings, readiness: Arc<Readiness>) -> Result<()> {
    let Some(election) = settings.leader_election.clone() else {
        tracing::warn!(
            "leader election is off: run exactly one replica, or revocations can be lost"
        );
        return lead(client, settings, readiness).await;
    };
    // As it starts leading, this replica makes its ServiceAccount the Lease's owner: the garbage
    // collector then deletes the Lease with the ServiceAccount (an uninstall), and the next install
    // leads at once instead of waiting out a Lease the old leader could not release. Who we are is
    // asked before the election, so that once leading only the Lease's own write is left.
    let owner = lease::service_account_owner(&client, &settings.operator_namespace).await;
    let identity = election.identity.clone();
    let election = LeaderElection::new(
        client.clone(),
        &settings.operator_namespace,
        LEASE_NAME,
        &election.identity,
    )
    .with_lease_duration(election.lease_duration)
    .with_renew_deadline(election.renew_deadline)
    .with_retry_period(election.retry_period);
    let leader = readiness.clone();
    let work = election.with_lease(async move {
        if let Some(owner) = &owner {
            lease::ensure_owner(&client, &settings.operator_namespace, &identity, owner).await;
        }
        lead(client, settings, leader).await
    });
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

/// Returns on SIGTERM (the kubelet stopping the Pod) or Ctrl-C.
pub async fn shutdown_signal() {
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
    guard::remove_legacy_revocation_list(&client, &settings.operator_namespace).await;
    let status_lists = status_lists::StatusLists::load(
        client.clone(),
        &settings.operator_namespace,
        &settings.issuer,
        settings.policy.max_token_ttl,
        settings.status_list_capacity,
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
    let stamps = Arc::new(stamps::Stamps::default());
    let (sweep, orphan_keys) = futures::channel::mpsc::unbounded();
    let (wake_grant, grant_wakes) = futures::channel::mpsc::unbounded();
    let (wake_agent, agent_wakes) = futures::channel::mpsc::unbounded();
    // The AudiencePolicies' store exists only after the grants' (its fan-out wakes grants); the
    // grants' fan-out reads the per-audience limits from it once it does.
    let policies_for_limits: Arc<std::sync::OnceLock<reflector::Store<AudiencePolicy>>> =
        Arc::default();
    let grants_store = Arc::new(grant_cache::GrantCache::default());
    let (grant_events, grants_ready) = watch_into(
        grants_api,
        watch.clone(),
        // Of a grant's metadata only the operator's finalizer is read.
        prune::grant_finalizers,
        {
            let cache = grants_store.clone();
            move |event| cache.apply(event)
        },
        grant_fan_out(
            index.clone(),
            wake_grant.clone(),
            wake_agent.clone(),
            sweep.clone(),
            settings.max_grants_per_namespace,
            {
                let policies = policies_for_limits.clone();
                move |audience, namespace| {
                    let policies = policies.get()?.state();
                    limits::audience_limit(audience, namespace, &policies)
                }
            },
        ),
    );
    let (agents_store, agent_events, agents_ready) = reflect(
        agents_api,
        watch.clone(),
        |agent: &mut AgentIdentity| prune::unread_metadata(&mut agent.metadata),
        agent_fan_out(index.clone(), wake_grant.clone(), authority.clone()),
    );
    // Cluster-scoped, whatever namespace is watched: the ceilings per API.
    let (audience_policies, audience_policy_events, audience_policies_ready) = reflect(
        Api::<AudiencePolicy>::all(client.clone()),
        watch.clone(),
        |policy: &mut AudiencePolicy| prune::unread_metadata(&mut policy.metadata),
        policy_fan_out(
            grants_store.clone(),
            agents_store.clone(),
            wake_grant.clone(),
            wake_agent,
            authority.clone(),
        ),
    );
    let _ = policies_for_limits.set(audience_policies.clone());
    let approvals_api: Api<DelegationApproval> = scoped_api(&client, &settings);
    // A new approval or rejection must count at once, not when a remembered check expires.
    let forget_checked = authority.clone();
    let forget_stamp = stamps.clone();
    let (approvals, approval_events, approvals_ready) = reflect(
        approvals_api,
        watch.clone(),
        |approval: &mut DelegationApproval| prune::unread_metadata(&mut approval.metadata),
        move |event| {
            if let watcher::Event::Apply(a) | watcher::Event::Delete(a) = event {
                forget_checked
                    .forget_named(&a.namespace().unwrap_or_default(), &a.spec.grant_ref.name);
            }
            if let watcher::Event::Delete(a) = event {
                forget_stamp.forget_approval(a);
            }
        },
    );
    // Cluster-scoped, whole objects: whether identity stamps are proven. A change of trust wakes
    // every grant, and again once new policies have settled.
    let ours = watch
        .clone()
        .labels("app.kubernetes.io/part-of=delegation-operator");
    let (mutating, mutating_ready) = watch_policies::<MutatingAdmissionPolicy>(
        &client,
        &ours,
        &stamps,
        &grants_store,
        &wake_grant,
    );
    let (mutating_bindings, mutating_bindings_ready) =
        watch_policies::<MutatingAdmissionPolicyBinding>(
            &client,
            &ours,
            &stamps,
            &grants_store,
            &wake_grant,
        );
    let (validating, validating_ready) = watch_policies::<ValidatingAdmissionPolicy>(
        &client,
        &ours,
        &stamps,
        &grants_store,
        &wake_grant,
    );
    let (validating_bindings, validating_bindings_ready) =
        watch_policies::<ValidatingAdmissionPolicyBinding>(
            &client,
            &ours,
            &stamps,
            &grants_store,
            &wake_grant,
        );
    let managed = watch.labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    // Every token Secret the cache sees is checked for a grant that is gone.
    // Of a token Secret's labels and annotations only the token id is read: it is kept aside, as a
    // hash, and the cache holds neither.
    let secret_token_ids = Arc::new(context::SecretTokenIds::default());
    let token_ids = secret_token_ids.clone();
    let prune_secret = move |secret: &mut PartialObjectMeta<Secret>| {
        let token_id = secret
            .metadata
            .annotations
            .take()
            .and_then(|mut a| a.remove(token_secret::TOKEN_ID_ANNOTATION));
        prune::secret_owner(&mut secret.metadata);
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
        audience_policies_ready,
        secrets_ready,
        mutating_ready,
        mutating_bindings_ready,
        validating_ready,
        validating_bindings_ready,
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
        audience_policies,
        stamps: stamps.clone(),
        secrets,
        index,
        caches_ready,
        authority: authority.clone(),
        keys,
        status_lists,
        recorder,
        agent_count_writes: Default::default(),
        alarms: Default::default(),
        records: Default::default(),
        trusted_secrets: Default::default(),
        status_written_from: Default::default(),
        secret_token_ids: secret_token_ids.clone(),
        unseen_writes,
        renewals: renewals::Renewals::new(settings.concurrency, wake_grant.clone()),
        released: std::sync::Mutex::new(events::Recent::new(context::RELEASED_KEPT)),
    });

    // Every trigger of a grant, into the fair queue of the grant controller (see grants::runner).
    // The approvals cache is filled by its very stream: a woken grant reads the new approval.
    let revoked = {
        let ctx = ctx.clone();
        move |grant: &DelegationGrant| ctx.holds_no_token(grant)
    };
    let triggers = futures::stream::select_all([
        grant_events
            .filter_map(move |g| {
                future::ready(g.ok().map(|g| runner::Trigger::of_grant(&g, revoked(&g))))
            })
            .boxed(),
        secret_events
            .filter_map(|s| {
                future::ready(s.ok().and_then(|s| runner::Trigger::of_token_secret(&s)))
            })
            .boxed(),
        approval_events
            .filter_map(|a| future::ready(a.ok().and_then(|a| runner::Trigger::of_approval(&a))))
            .boxed(),
        grant_wakes.map(|g| runner::Trigger::of_wake(&g)).boxed(),
    ]);
    let grants = runner::run(triggers, ctx.clone(), shutdown_signal());
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
    let policy_caches = future::join5(
        mutating,
        mutating_bindings,
        validating,
        validating_bindings,
        audience_policy_events.for_each(|_| future::ready(())),
    );
    tokio::select! {
        _ = future::join(grants, agents) => {},
        _ = policy_caches => {},
        _ = orphans::run(ctx.clone(), orphan_keys) => {},
        _ = guard::guard_published_artifacts(ctx.clone()) => {},
        _ = ctx.keys.run_rotation() => {},
        _ = ctx.status_lists.run_maintenance(&ctx.keys) => {},
        _ = ctx.alarms.run(wake_grant.clone()) => {},
    }
    tracing::info!("delegation-operator stopped");
    Ok(())
}

/// Watches one kind of admission object into `stamps`; returns the watch (to be polled) and its
/// ready flag. When trust in a stamp changes, every grant is woken at once and again when the
/// policies have settled (a grant created meanwhile is judged against the settled time).
fn watch_policies<K>(
    client: &Client,
    config: &watcher::Config,
    stamps: &Arc<stamps::Stamps>,
    grants: &Arc<grant_cache::GrantCache>,
    wake: &futures::channel::mpsc::UnboundedSender<ObjectRef<DelegationGrant>>,
) -> (
    impl std::future::Future<Output = ()> + Send + 'static,
    tokio::sync::watch::Receiver<bool>,
)
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (stamps, grants, wake) = (stamps.clone(), grants.clone(), wake.clone());
    let (events, ready) = watch_into(
        Api::<K>::all(client.clone()),
        config.clone(),
        |_| {},
        move |event| {
            if let Some(settled) = stamps.apply(event, now()) {
                wake_every_grant(&grants, &wake);
                let (grants, wake) = (grants.clone(), wake.clone());
                let wait = settled.duration_since(now()).unsigned_abs();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    wake_every_grant(&grants, &wake);
                });
            }
        },
        |_| {},
    );
    (events.for_each(|_| future::ready(())), ready)
}

fn wake_every_grant(
    grants: &grant_cache::GrantCache,
    wake: &futures::channel::mpsc::UnboundedSender<ObjectRef<DelegationGrant>>,
) {
    for grant in grants.summaries() {
        let _ = wake.unbounded_send(grant.object_ref());
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
    let listed = match listed {
        Ok(()) => Api::<AudiencePolicy>::all(client.clone())
            .list_metadata(&probe)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = listed {
        return Err(if error::is_not_found(&e) {
            Error::InvalidState(
                "the DelegationGrant, AgentIdentity and AudiencePolicy CRDs are not installed; install them with \
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

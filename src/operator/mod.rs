//! The imperative shell: kube-rs controllers, Secret and status writes, keys and revocations.
//!
//! - [`grants`]: the DelegationGrant controller (issue, rotate, revoke).
//! - [`agents`]: the AgentIdentity controller (subject, active grants, Ready).
//! - [`token_secret`]: the token Secrets and who owns them.
//! - [`keys`]: signing keys and the published JWKS.
//! - [`revocations`]: the revocation list.
//! - [`audit`]: the JSON audit trail.

pub mod agents;
pub mod audit;
pub mod context;
pub mod error;
pub mod grants;
pub mod keys;
pub mod revocations;
pub mod token_secret;

use std::{collections::BTreeMap, sync::Arc};

use futures::{StreamExt, future};
use k8s_openapi::{
    api::core::v1::{Namespace, Secret},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PartialObjectMeta},
    runtime::{
        WatchStreamExt,
        controller::{self, Controller},
        events::{Recorder, Reporter},
        reflector,
        reflector::ObjectRef,
        watcher,
    },
};

pub use context::{Context, Settings};
pub use error::{Error, Result};

use crate::api::{AgentIdentity, DelegationGrant};

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

/// Runs both controllers and key rotation until a termination signal.
pub async fn run(client: Client, settings: Settings) -> Result<()> {
    check_prerequisites(&client, &settings).await?;
    let keys = keys::KeyStore::load_or_create(
        client.clone(),
        &settings.operator_namespace,
        settings.algorithm,
        settings.key_rotation_period,
        settings.policy.max_token_ttl,
        now(),
    )
    .await?;
    let revocations =
        revocations::RevocationList::load(client.clone(), &settings.operator_namespace).await?;

    let grants_api: Api<DelegationGrant> = scoped_api(&client, &settings);
    let agents_api: Api<AgentIdentity> = scoped_api(&client, &settings);
    // Metadata only: token bytes never reach this process through the watch.
    let secrets_api: Api<PartialObjectMeta<Secret>> = scoped_api(&client, &settings);
    let watch = watcher::Config::default();

    // Each cache is filled by a reflector of ours that raises a flag once its initial list is in:
    // reconciles wait for all flags, so nothing is judged missing at start-up. (kube's own
    // `Store::wait_until_ready` wakes only one of several waiters, so it is not used for this.)
    let (grants_store, grant_events, grants_ready) = reflect(grants_api.clone(), watch.clone());
    let (agents_store, agent_events, agents_ready) = reflect(agents_api.clone(), watch.clone());
    let managed = watch
        .clone()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let (secrets, secret_events, secrets_ready) = reflect(secrets_api, managed);

    let reporter = Reporter {
        controller: MANAGED_BY.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: settings.clone(),
        grants: grants_store.clone(),
        agents: agents_store.clone(),
        secrets,
        caches_ready: [grants_ready, agents_ready, secrets_ready],
        keys,
        revocations,
        recorder: Recorder::new(client.clone(), reporter),
        trusted_secrets: Default::default(),
        status_written_from: Default::default(),
    });

    let actor_index = ctx.grants.clone();
    let children_index = ctx.grants.clone();
    let grants = Controller::for_stream(grant_events, grants_store)
        .owns_stream(secret_events)
        .watches_stream(
            agent_policy_changes(agents_api, watch.clone()),
            move |agent| grants_depending_on(&actor_index, &agent),
        )
        .watches(grants_api.clone(), watch.clone(), move |parent| {
            children_of(&children_index, &parent)
        })
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .shutdown_on_signal()
        .run(grants::reconcile, grants::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));
    let agents = Controller::for_stream(agent_events, agents_store)
        .watches(grants_api, watch, |grant| {
            grant
                .namespace()
                .map(|ns| ObjectRef::<AgentIdentity>::new(&grant.spec.actor_ref.name).within(&ns))
        })
        .shutdown_on_signal()
        .run(agents::reconcile, agents::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));

    tracing::info!(
        namespace = settings.watch_namespace.as_deref().unwrap_or("<all>"),
        operator_namespace = %settings.operator_namespace,
        issuer = %settings.issuer,
        "delegation-operator running"
    );
    tokio::select! {
        _ = future::join(grants, agents) => {},
        _ = ctx.keys.run_rotation() => {},
    }
    tracing::info!("delegation-operator stopped");
    Ok(())
}

/// A cache of `K`, the stream of touched objects that fills it (to be polled by a controller), and a
/// flag that turns true once the initial list is in the cache.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
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
    let (store, writer) = reflector::store();
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let events = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                ready_tx.send_replace(true);
            }
        })
        .touched_objects();
    (store, events, ready_rx)
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

/// The agent events that can change a grant's outcome: spec changes (a new generation) and deletions.
/// An agent's own status writes are left out, or every `activeGrants` update would re-run every grant
/// under that agent (quadratic work during a bulk apply).
fn agent_policy_changes(
    api: Api<AgentIdentity>,
    config: watcher::Config,
) -> impl futures::Stream<Item = std::result::Result<AgentIdentity, watcher::Error>> + Send + 'static
{
    let mut generations: std::collections::HashMap<String, Option<i64>> = Default::default();
    watcher(api, config)
        .default_backoff()
        .filter_map(move |event| {
            let relevant = match event {
                Ok(watcher::Event::Apply(agent) | watcher::Event::InitApply(agent)) => {
                    let uid = agent.uid().unwrap_or_default();
                    (generations.insert(uid, agent.metadata.generation)
                        != Some(agent.metadata.generation))
                    .then_some(Ok(agent))
                }
                Ok(watcher::Event::Delete(agent)) => {
                    generations.remove(&agent.uid().unwrap_or_default());
                    Some(Ok(agent))
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                Err(e) => Some(Err(e)),
            };
            future::ready(relevant)
        })
}

/// Grants with this agent anywhere in their chain: an agent's policy (allowedActors, maxDepth) bounds
/// hops further down, whose parents' statuses need not change when it does.
fn grants_depending_on(
    store: &reflector::Store<DelegationGrant>,
    agent: &AgentIdentity,
) -> Vec<ObjectRef<DelegationGrant>> {
    let Some(ns) = agent.namespace() else {
        return Vec::new();
    };
    let name = agent.name_any();
    let grants = store.state();
    let by_name: std::collections::HashMap<String, &DelegationGrant> = grants
        .iter()
        .filter(|g| g.namespace().as_deref() == Some(ns.as_str()))
        .map(|g| (g.name_any(), g.as_ref()))
        .collect();
    by_name
        .values()
        .filter(|g| {
            // Walk up at most the longest chain the operator resolves, so cycles end the walk too.
            let mut current = Some(**g);
            (0..crate::delegation::chain::MAX_CHAIN_LENGTH).any(|_| {
                let Some(grant) = current else { return false };
                current = grant
                    .spec
                    .parent_grant_ref
                    .as_ref()
                    .and_then(|p| by_name.get(&p.name).copied());
                grant.spec.actor_ref.name == name
            })
        })
        .map(|g| ObjectRef::from(*g))
        .collect()
}

/// Grants whose parent is this grant.
fn children_of(
    store: &reflector::Store<DelegationGrant>,
    parent: &DelegationGrant,
) -> Vec<ObjectRef<DelegationGrant>> {
    let ns = parent.namespace();
    let name = parent.name_any();
    store
        .state()
        .iter()
        .filter(|g| {
            g.namespace() == ns
                && g.spec
                    .parent_grant_ref
                    .as_ref()
                    .is_some_and(|p| p.name == name)
        })
        .map(|g| ObjectRef::from(g.as_ref()))
        .collect()
}

/// Refuses to start, saying what to do, when the CRDs or the operator namespace are missing.
async fn check_prerequisites(client: &Client, settings: &Settings) -> Result<()> {
    let probe = ListParams::default().limit(1);
    let grants: Api<DelegationGrant> = Api::all(client.clone());
    let agents: Api<AgentIdentity> = Api::all(client.clone());
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

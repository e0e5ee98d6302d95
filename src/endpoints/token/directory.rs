//! What the token endpoint knows of the cluster, kept by watches of its own (every replica answers
//! exchanges, and only the leader has the operator's caches): the AgentIdentities (who may act, and
//! as which ServiceAccount), the AudiencePolicies (the ceilings), and of each DelegationGrant its
//! metadata (uid, creation, deletion: whether the grant behind a token still stands) and, for Pod
//! delivery, the sealed token in its status.
//!
//! Whether a grant's token is still good is not read here: the Token Status List the leader
//! publishes says so (a grant refused, suspended or deleted has its token revoked there first), and
//! the grant's own status is whatever anyone allowed to write it says.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use futures::StreamExt;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, reflector, reflector::ObjectRef, watcher},
};

use crate::{
    api::{AgentIdentity, AudiencePolicy, DelegationGrant, DelegationGrantStatus},
    delegation::exchange::{self, GrantState},
    operator::caches::prune::unread_metadata,
};

/// The three caches, each ready once its first list is in.
pub struct Directory {
    agents: reflector::Store<AgentIdentity>,
    policies: reflector::Store<AudiencePolicy>,
    /// Trimmed to their metadata and, for Pod delivery, their sealed token ([`trim_grant`]).
    grants: reflector::Store<DelegationGrant>,
    listed: AtomicUsize,
}

const CACHES: usize = 3;

impl Directory {
    /// Starts the watches (all namespaces, or only `namespace`); the future drives them for as long
    /// as it runs.
    pub fn start(
        client: Client,
        namespace: Option<&str>,
    ) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static + use<>) {
        let (agents, agents_writer) = reflector::store();
        let (policies, policies_writer) = reflector::store();
        let (grants, grants_writer) = reflector::store();
        let directory = Arc::new(Self {
            agents,
            policies,
            grants,
            listed: AtomicUsize::new(0),
        });
        let agent_api: Api<AgentIdentity> = scoped(client.clone(), namespace);
        let grant_api: Api<DelegationGrant> = scoped(client.clone(), namespace);
        let policy_api: Api<AudiencePolicy> = Api::all(client);
        let config = watcher::Config::default();
        let agents = follow(
            watcher(agent_api, config.clone()),
            agents_writer,
            directory.clone(),
            |_| {},
        );
        let policies = follow(
            watcher(policy_api, config.clone()),
            policies_writer,
            directory.clone(),
            |_| {},
        );
        let grants = follow(
            watcher(grant_api, config),
            grants_writer,
            directory.clone(),
            trim_grant,
        );
        let running = async move {
            futures::join!(agents, policies, grants);
        };
        (directory, running)
    }

    /// Whether every cache holds its first list.
    pub fn is_ready(&self) -> bool {
        self.listed.load(Ordering::Acquire) >= CACHES
    }

    /// The grant `namespace/name` as this replica last saw it.
    pub fn grant(&self, namespace: &str, name: &str) -> GrantState {
        match self.grants.get(&ObjectRef::new(name).within(namespace)) {
            None => GrantState::Missing,
            Some(grant) if grant.metadata.deletion_timestamp.is_some() => GrantState::Deleting,
            Some(grant) => GrantState::Live {
                uid: grant.uid().unwrap_or_default(),
                created: grant.metadata.creation_timestamp.as_ref().map(|t| t.0),
            },
        }
    }
}

impl Directory {
    /// The uid and sealed token of the grant `namespace/name`, when its status holds one and it is
    /// not being deleted. Whether the token is still good is not read here: it must open for this
    /// grant's uid, verify, and be VALID in the published status list.
    pub fn sealed_token(&self, namespace: &str, name: &str) -> Option<(String, String)> {
        let grant = self.grants.get(&ObjectRef::new(name).within(namespace))?;
        if grant.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let sealed = grant.status.as_ref()?.sealed_token.clone()?;
        Some((grant.uid()?, sealed))
    }
}

/// What the endpoint keeps of a grant: its metadata and its sealed token. The rest (scopes, details,
/// the chain in its status) is read from the tokens themselves, never from the grant.
fn trim_grant(grant: &mut DelegationGrant) {
    let sealed_token = grant.status.take().and_then(|s| s.sealed_token);
    grant.status = sealed_token.map(|sealed| DelegationGrantStatus {
        sealed_token: Some(sealed),
        ..Default::default()
    });
    let spec = &mut grant.spec;
    spec.scopes = Vec::new();
    spec.authorization_details = None;
    spec.requester = None;
    spec.authors = None;
    spec.principal = None;
    spec.valid_until = None;
}

impl exchange::Directory for Directory {
    fn agent(&self, namespace: &str, name: &str) -> Option<Arc<AgentIdentity>> {
        self.agents.get(&ObjectRef::new(name).within(namespace))
    }

    fn audience_policies(&self, audience: &str) -> Vec<Arc<AudiencePolicy>> {
        self.policies
            .state()
            .into_iter()
            .filter(|p| p.spec.audience == audience)
            .collect()
    }
}

/// The API of `K` in `namespace`, or in all namespaces.
fn scoped<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// Feeds one watch into its cache, without the metadata nothing here reads, and counts its first
/// complete list.
async fn follow<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    mut writer: reflector::store::Writer<K>,
    directory: Arc<Directory>,
    trim: fn(&mut K),
) where
    K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let mut counted = false;
    events
        .default_backoff()
        .modify(move |object| {
            unread_metadata(object.meta_mut());
            trim(object);
        })
        .for_each(|event| {
            match event {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    if matches!(event, watcher::Event::InitDone) && !counted {
                        counted = true;
                        directory.listed.fetch_add(1, Ordering::AcqRel);
                    }
                }
                Err(e) => tracing::warn!(
                    kind = K::kind(&()).as_ref(),
                    error = %e,
                    "a watch of the token endpoint failed; retrying"
                ),
            }
            futures::future::ready(())
        })
        .await;
}

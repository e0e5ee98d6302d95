//! What every reconcile shares: the client, the caches, the keys, the status lists, and a little
//! memory of our own writes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Client, Resource, ResourceExt,
    api::PartialObjectMeta,
    runtime::{
        controller::Action,
        events::EventType,
        reflector::{ObjectRef, Store},
    },
};

use crate::operator::{
    agents::CountWrites,
    publishing::keys::KeyStore,
    publishing::status_lists::StatusLists,
    reporting::events::{Recent, Recorder},
};
use crate::{
    api::{AgentIdentity, AudiencePolicy, DelegationApproval, DelegationGrant},
    delegation::{
        Lookup, Policy, Refusal, limits,
        record::{HeldToken, TokenRecord},
    },
    signing::Algorithm,
};

/// Operator settings, from flags.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where keys, the JWKS and the status lists live.
    pub operator_namespace: String,
    /// Watch only this namespace (all when `None`).
    pub watch_namespace: Option<String>,
    /// The `iss` of every token.
    pub issuer: String,
    pub algorithm: Algorithm,
    pub key_rotation_period: Duration,
    pub policy: Policy,
    /// How often a Ready grant's authority (requester, approver) is re-checked between issuances.
    pub authority_recheck_period: Duration,
    /// How many grants are reconciled at once.
    pub concurrency: u16,
    /// How many grants of one namespace get tokens (`--max-grants-per-namespace`); `None`: all.
    pub max_grants_per_namespace: Option<usize>,
    /// Lease-based leader election; `None` runs without (one replica only).
    pub leader_election: Option<LeaderElectionSettings>,
    /// How large the status lists are and how their capacity is shared between namespaces.
    pub status_list_capacity: crate::operator::publishing::status_lists::Capacity,
}

/// Timings of the leader Lease (client-go's protocol and meaning).
#[derive(Clone, Debug)]
pub struct LeaderElectionSettings {
    /// Unique among the replicas (the pod name in a cluster).
    pub identity: String,
    /// How long the others wait after the last renewal they saw before taking over.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it stops writing (shorter than the lease).
    pub renew_deadline: Duration,
    /// How often the leader renews and candidates retry.
    pub retry_period: Duration,
}

pub struct Context {
    pub client: Client,
    /// Wakes a grant's reconcile from outside its watches (e.g. after a key revocation).
    pub wake_grant: futures::channel::mpsc::UnboundedSender<ObjectRef<DelegationGrant>>,
    pub settings: Settings,
    /// Every watched grant, compressed (see [`crate::operator::caches::grant_cache`]).
    pub grants: Arc<crate::operator::caches::grant_cache::GrantCache>,
    pub agents: Store<AgentIdentity>,
    pub approvals: Store<DelegationApproval>,
    /// The cluster's AudiencePolicies (cluster-scoped; few, and small).
    pub audience_policies: Store<AudiencePolicy>,
    /// The identity-stamping admission policies, and which stamps were found proven.
    pub stamps: Arc<crate::operator::caches::stamps::Stamps>,
    /// Token Secrets, metadata only and only what is read of it: token bytes never sit in this cache.
    pub secrets: Arc<crate::operator::caches::secret_cache::SecretCache>,
    /// Grants by actor and by parent, kept with the grants cache.
    pub index: Arc<crate::operator::caches::index::GrantIndex>,
    /// One flag per cache, true once its initial list is in.
    pub caches_ready: Vec<tokio::sync::watch::Receiver<bool>>,
    /// The last positive authority check of each grant.
    pub authority: Arc<crate::operator::grants::authority::CheckedAuthority>,
    pub keys: KeyStore,
    /// The Token Status Lists every token points into.
    pub status_lists: StatusLists,
    /// Queues Events for the one task that writes them.
    pub recorder: Recorder,
    /// When each agent last had only its `activeGrants` written.
    pub agent_count_writes: CountWrites,
    /// When each grant must be looked at again (renewal, re-checks).
    pub alarms: crate::operator::grants::alarms::Alarms,
    /// For each grant (by a hash of its uid): the operator's own record of its token — what it wrote to
    /// the Secret, or read there and verified, and what it decided since. Never taken from the grant's
    /// status. A hash key keeps it at a few dozen bytes per grant.
    pub records: Mutex<HashMap<u64, TokenRecord>>,
    /// For each token Secret (namespace, name): the resourceVersion whose content we wrote or verified.
    /// A different version means someone else changed it. Keys and versions are kept as [`key`]
    /// hashes: this is one entry per grant.
    pub trusted_secrets: Mutex<HashMap<u64, u64>>,
    /// For each grant uid: the resourceVersion its status was last written from. Seeing that version
    /// again in the cache means the cache has not caught up with our write yet. Hashed like above.
    pub status_written_from: Mutex<HashMap<u64, u64>>,
    /// The token id annotation of each token Secret in the cache (see [`SecretTokenIds`]).
    pub secret_token_ids: Arc<SecretTokenIds>,
    /// Token Secrets written but not yet shown by the watch (see [`UnseenWrites`]).
    pub unseen_writes: Arc<UnseenWrites>,
    /// Renewals' share of the reconcile slots (see [`crate::operator::grants::renewals`]).
    pub renewals: crate::operator::grants::renewals::Renewals,
    /// Deleted grants whose finalizer this process removed, by a [`key`] of their uid, for
    /// [`RELEASED_KEPT`].
    pub released: Mutex<Recent<()>>,
}

/// How long a released grant is remembered: far longer than any watch lags.
pub const RELEASED_KEPT: Duration = Duration::from_secs(600);

/// Token Secrets this process wrote that the Secret watch has not shown yet: (namespace, name) to
/// the uid of the grant written for, as [`key`] hashes. While such a Secret is missing from the
/// cache, the cache only lags our own write (the watch will show it and wake the grant), so the
/// grant needs no read of it. The watch's first word on the Secret — applied or deleted — ends the
/// entry, and so does every relist; an entry the watch overtook is harmless, as only a Secret
/// missing from the cache consults it.
#[derive(Default)]
pub struct UnseenWrites(Mutex<HashMap<u64, u64>>);

impl UnseenWrites {
    pub fn wrote(&self, namespace: &str, name: &str, grant_uid: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key(&(namespace, name)), key(grant_uid));
        }
    }

    pub fn seen(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(&key(&(namespace, name)));
        }
    }

    /// A relist starts: what it shows replaces everything.
    pub fn clear(&self) {
        if let Ok(mut map) = self.0.lock() {
            map.clear();
        }
    }

    /// Whether this grant wrote the Secret and the watch has not shown it yet.
    pub fn wrote_unseen(&self, namespace: &str, name: &str, grant_uid: &str) -> bool {
        self.0
            .lock()
            .is_ok_and(|map| map.get(&key(&(namespace, name))) == Some(&key(grant_uid)))
    }
}

/// The token id each cached token Secret's annotation names, by [`key`] hashes. The Secrets cache
/// keeps no annotations at all: a map of one entry costs a whole B-tree node, half a KiB per
/// Secret. Filled and emptied by the Secret watch before its cache; an entry left by a Secret that
/// vanished during a relist is never read (it is consulted only for Secrets in the cache).
#[derive(Default)]
pub struct SecretTokenIds(Mutex<HashMap<u64, u64>>);

impl SecretTokenIds {
    pub fn record(&self, namespace: &str, name: &str, token_id: Option<&str>) {
        if let Ok(mut map) = self.0.lock() {
            match token_id {
                Some(id) => map.insert(key(&(namespace, name)), key(id)),
                None => map.remove(&key(&(namespace, name))),
            };
        }
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        self.record(namespace, name, None);
    }

    /// Whether the Secret's annotation names `token_id`.
    pub fn names(&self, namespace: &str, name: &str, token_id: &str) -> bool {
        self.0
            .lock()
            .is_ok_and(|map| map.get(&key(&(namespace, name))) == Some(&key(token_id)))
    }
}

/// A compact map key (or compared value) for memory kept per grant: a hash, stable within this
/// process. A collision between two versions of one object is a 2^-64 chance per comparison.
pub fn key<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

impl Context {
    /// A read view of one namespace's grants and agents, for the pure core.
    pub fn namespace_view<'a>(&'a self, namespace: &'a str) -> NamespaceView<'a> {
        NamespaceView {
            ctx: self,
            namespace,
        }
    }

    /// Waits until every cache has its initial list, so that nothing is judged missing at start-up.
    pub async fn caches_ready(&self) -> bool {
        for flag in &self.caches_ready {
            if flag.clone().wait_for(|ready| *ready).await.is_err() {
                return false;
            }
        }
        true
    }

    pub fn cached_secret(&self, namespace: &str, name: &str) -> Option<PartialObjectMeta<Secret>> {
        self.secrets.get(namespace, name)
    }

    /// Queues an Event on an object and returns at once: a background task writes it, and a failure
    /// there is logged, never fatal. The note must never hold a secret.
    pub fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.recorder
            .publish(obj.object_ref(&()), type_, reason, reason, note);
    }

    pub fn remember_trusted_secret(&self, namespace: &str, name: &str, resource_version: String) {
        if let Ok(mut map) = self.trusted_secrets.lock() {
            map.insert(key(&(namespace, name)), key(&resource_version));
        }
    }

    pub fn is_trusted_secret(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<&str>,
    ) -> bool {
        let Some(resource_version) = resource_version else {
            return false;
        };
        self.trusted_secrets
            .lock()
            .is_ok_and(|map| map.get(&key(&(namespace, name))) == Some(&key(resource_version)))
    }

    pub fn forget_secret(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.trusted_secrets.lock() {
            map.remove(&key(&(namespace, name)));
        }
    }

    /// Whether the cached grant predates our own last status write.
    pub fn is_stale(&self, grant: &DelegationGrant) -> bool {
        let (Some(uid), Some(rv)) = (grant.uid(), grant.resource_version()) else {
            return false;
        };
        self.status_written_from
            .lock()
            .is_ok_and(|map| map.get(&key(&uid)) == Some(&key(&rv)))
    }

    /// Records that a status write moved the grant from its cached resourceVersion to `written`. A
    /// write the apiserver found to change nothing keeps the version, and must not mark the cache stale.
    pub fn remember_status_write(&self, grant: &DelegationGrant, written: Option<String>) {
        let (Some(uid), Some(from)) = (grant.uid(), grant.resource_version()) else {
            return;
        };
        if written.as_ref() == Some(&from) {
            return;
        }
        if let Ok(mut map) = self.status_written_from.lock() {
            map.insert(key(&uid), key(&from));
        }
    }

    /// Drops what we remembered about a grant that is going away.
    pub fn forget_grant(&self, grant: &DelegationGrant) {
        if let (Some(uid), Ok(mut map)) = (grant.uid(), self.status_written_from.lock()) {
            map.remove(&key(&uid));
        }
        self.alarms
            .remove(&grant.namespace().unwrap_or_default(), &grant.name_any());
        if let (Some(uid), Ok(mut map)) = (grant.uid(), self.records.lock()) {
            map.remove(&key(&uid));
        }
        self.stamps.forget_grant(grant);
    }

    /// Records that the grant's deletion was carried out and its finalizer removed.
    pub fn remember_released(&self, grant: &DelegationGrant) {
        if let (Some(uid), Ok(mut released)) = (grant.uid(), self.released.lock()) {
            // Read under the lock, so that the times handed to `Recent` never go back.
            released.insert(key(&uid), (), std::time::Instant::now());
        }
    }

    /// Whether this grant's deletion was carried out already (the cache may still show it with our
    /// finalizer for a moment).
    pub fn released_recently(&self, grant: &DelegationGrant) -> bool {
        grant.uid().is_some_and(|uid| {
            self.released.lock().is_ok_and(|mut released| {
                released.get(key(&uid), std::time::Instant::now()).is_some()
            })
        })
    }

    /// Records a token the operator minted for the grant (`confirmed`: decided for its current
    /// generation) or read back from its Secret and verified (`confirmed` false). A token read back
    /// that is the one already recorded keeps its confirmation. Wakes the grant's children when what
    /// they rest on changed.
    pub fn remember_token(&self, grant: &DelegationGrant, mut held: HeldToken, confirmed: bool) {
        let Some(uid) = grant.uid() else { return };
        if confirmed {
            held.confirmed_for = grant.metadata.generation;
        }
        let changed = self.records.lock().is_ok_and(|mut map| {
            let entry = map.entry(key(&uid)).or_insert(TokenRecord::Refused);
            if !confirmed
                && let TokenRecord::Holds(known) = &*entry
                && known.substance == held.substance
                && known.expires_at == held.expires_at
            {
                held.confirmed_for = known.confirmed_for;
            }
            let new = TokenRecord::Holds(held);
            let changed = *entry != new;
            *entry = new;
            changed
        });
        if changed {
            self.wake_children(grant);
        }
    }

    /// Records that the token held stands for the grant's current generation (the decision kept it).
    pub fn confirm_token(&self, grant: &DelegationGrant) {
        let Some(uid) = grant.uid() else { return };
        let changed = self
            .records
            .lock()
            .is_ok_and(|mut map| match map.get_mut(&key(&uid)) {
                Some(TokenRecord::Holds(held))
                    if held.confirmed_for != grant.metadata.generation =>
                {
                    held.confirmed_for = grant.metadata.generation;
                    true
                }
                _ => false,
            });
        if changed {
            self.wake_children(grant);
        }
    }

    /// Refuses the grant when it ranks beyond `--max-grants-per-namespace` in its namespace, or beyond
    /// its audience's `maxGrantsPerNamespace` ([`limits`]).
    pub fn grant_limits(&self, grant: &DelegationGrant) -> Result<(), Refusal> {
        let namespace = grant.namespace().unwrap_or_default();
        let name = grant.name_any();
        // Not in the index: deleted since the reconcile began; nothing to refuse.
        if let Some(limit) = self.settings.max_grants_per_namespace
            && let Some(count) = self.index.namespace_count(&namespace, &name, limit)
        {
            limits::within_namespace_limit(&namespace, limit, count)?;
        }
        let audience = &grant.spec.audience;
        if let Some(limit) = self.audience_limit(audience, &namespace)
            && let Some(count) = self.index.audience_count(&namespace, &name, limit)
        {
            limits::within_audience_limit(&namespace, audience, limit, count)?;
        }
        Ok(())
    }

    /// The AudiencePolicies' per-namespace grant limit for `audience` in `namespace`, if any.
    pub fn audience_limit(&self, audience: &str, namespace: &str) -> Option<usize> {
        limits::audience_limit(audience, namespace, &self.audience_policies_for(audience))
    }

    /// Records that the grant was refused and holds no token.
    pub fn remember_refused(&self, grant: &DelegationGrant) {
        let Some(uid) = grant.uid() else { return };
        let changed = self.records.lock().is_ok_and(|mut map| {
            map.insert(key(&uid), TokenRecord::Refused) != Some(TokenRecord::Refused)
        });
        if changed {
            self.wake_children(grant);
        }
    }

    /// Whether the operator refused the grant and revoked its tokens (its record says so); a grant
    /// without a record may hold one.
    pub fn holds_no_token(&self, grant: &DelegationGrant) -> bool {
        grant
            .uid()
            .is_some_and(|uid| self.record(&uid) == Some(TokenRecord::Refused))
    }

    pub fn record(&self, grant_uid: &str) -> Option<TokenRecord> {
        self.records
            .lock()
            .ok()
            .and_then(|map| map.get(&key(grant_uid)).cloned())
    }

    pub fn minted_substance(&self, grant_uid: &str) -> Option<u64> {
        self.record(grant_uid).and_then(|r| r.substance())
    }

    /// Wakes the grants that hang below this one: their chain rests on its record.
    fn wake_children(&self, grant: &DelegationGrant) {
        let namespace = grant.namespace().unwrap_or_default();
        for child in self.index.children(&namespace, &grant.name_any()) {
            let _ = self
                .wake_grant
                .unbounded_send(ObjectRef::new(&child).within(&namespace));
        }
    }

    /// Looks at the grant again `after` from now, through its alarm rather than the controller's
    /// requeue schedule (see [`crate::operator::grants::alarms`]); nothing else needs to happen meanwhile.
    pub fn look_again(&self, grant: &DelegationGrant, after: Duration) -> Action {
        self.alarms.set(
            &grant.namespace().unwrap_or_default(),
            &grant.name_any(),
            after,
        );
        Action::await_change()
    }
}

pub struct NamespaceView<'a> {
    ctx: &'a Context,
    namespace: &'a str,
}

impl Lookup for NamespaceView<'_> {
    fn grant(&self, name: &str) -> Option<Arc<DelegationGrant>> {
        self.ctx
            .grants
            .get(&ObjectRef::new(name).within(self.namespace))
    }

    fn agent(&self, name: &str) -> Option<Arc<AgentIdentity>> {
        self.ctx
            .agents
            .get(&ObjectRef::new(name).within(self.namespace))
    }

    fn record(&self, grant: &DelegationGrant) -> Option<TokenRecord> {
        self.ctx.record(grant.metadata.uid.as_deref()?)
    }

    fn audience_policies(&self, audience: &str) -> Vec<Arc<AudiencePolicy>> {
        self.ctx.audience_policies_for(audience)
    }
}

impl Context {
    /// The AudiencePolicies declaring `audience` (a policy's audience is immutable).
    pub fn audience_policies_for(&self, audience: &str) -> Vec<Arc<AudiencePolicy>> {
        self.audience_policies
            .state()
            .into_iter()
            .filter(|p| p.spec.audience == audience)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unseen_write_counts_for_its_grant_until_the_watch_shows_the_secret() {
        let unseen = UnseenWrites::default();
        unseen.wrote("ns", "token", "uid-a");
        assert!(unseen.wrote_unseen("ns", "token", "uid-a"));
        assert!(
            !unseen.wrote_unseen("ns", "token", "uid-b"),
            "another grant's Secret name"
        );
        assert!(
            !unseen.wrote_unseen("other", "token", "uid-a"),
            "another namespace"
        );
        unseen.seen("ns", "token");
        assert!(
            !unseen.wrote_unseen("ns", "token", "uid-a"),
            "the watch showed it"
        );
        unseen.wrote("ns", "token", "uid-a");
        unseen.clear();
        assert!(
            !unseen.wrote_unseen("ns", "token", "uid-a"),
            "a relist shows everything"
        );
    }
}

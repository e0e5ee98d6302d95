//! Whether the apiserver was stamping identities when an object was written: the operator watches the
//! stamping MutatingAdmissionPolicies, the ValidatingAdmissionPolicies that check the stamps and all
//! their bindings (whole objects: they are few and small), holds them against the ones it ships
//! ([`crate::delegation::stamp_trust`]), and remembers per grant and per approval which generation it
//! found proven. Without this, a grant created or edited while the policies were missing or weakened
//! could carry a requester its author typed.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt, runtime::watcher};
use serde_json::Value;

use super::context::key;
use crate::{
    api::{DelegationApproval, DelegationGrant},
    delegation::stamp_trust::{
        APPROVER, Observed, REQUESTER, Seen, Stamping, Trust, TrustFollower, Written, in_force,
        judge_generation,
    },
};

/// The watched admission objects by (kind, name), and what is remembered of each stamped object.
pub struct Stamps {
    documents: Vec<Value>,
    restamps_on_update: bool,
    cluster: Mutex<Cluster>,
    requester: Mutex<TrustFollower>,
    approver: Mutex<TrustFollower>,
    /// By a [`key`] of the grant's uid.
    grants: Mutex<HashMap<u64, Seen>>,
    /// By a [`key`] of the approval's uid.
    approvals: Mutex<HashMap<u64, Seen>>,
}

/// The four kinds watched; trust is judged only once each has been listed.
const KINDS: usize = 4;

#[derive(Default)]
struct Cluster {
    objects: HashMap<(String, String), Observed>,
    /// A re-list in progress, per kind: it replaces that kind's objects once complete.
    relisting: HashMap<String, HashMap<String, Observed>>,
    listed: HashSet<String>,
}

impl Default for Stamps {
    fn default() -> Self {
        let documents = crate::admission::documents();
        Self {
            restamps_on_update: REQUESTER.restamps_on_update(&documents),
            documents,
            cluster: Mutex::default(),
            requester: Mutex::default(),
            approver: Mutex::default(),
            grants: Mutex::default(),
            approvals: Mutex::default(),
        }
    }
}

impl Stamps {
    /// Takes one event of a policy or binding watch (called once the event is seen, before anything
    /// reads trust again). Returns the earliest moment a write may count as stamped when trust in
    /// either stamp changed (to wake every grant then, and now), `None` when nothing changed.
    pub fn apply<K>(&self, event: &watcher::Event<K>, now: Timestamp) -> Option<Timestamp>
    where
        K: Resource<DynamicType = ()> + serde::Serialize,
    {
        let kind = K::kind(&()).into_owned();
        let Ok(mut cluster) = self.cluster.lock() else {
            return None;
        };
        match event {
            watcher::Event::Apply(obj) => {
                cluster
                    .objects
                    .insert((kind.clone(), obj.name_any()), observed(obj));
            }
            watcher::Event::Delete(obj) => {
                cluster.objects.remove(&(kind.clone(), obj.name_any()));
            }
            watcher::Event::Init => {
                cluster.relisting.insert(kind.clone(), HashMap::new());
            }
            watcher::Event::InitApply(obj) => {
                cluster
                    .relisting
                    .entry(kind.clone())
                    .or_default()
                    .insert(obj.name_any(), observed(obj));
            }
            watcher::Event::InitDone => {
                let listed = cluster.relisting.remove(&kind).unwrap_or_default();
                cluster.objects.retain(|(k, _), _| *k != kind);
                for (name, obj) in listed {
                    cluster.objects.insert((kind.clone(), name), obj);
                }
                cluster.listed.insert(kind.clone());
            }
        }
        if cluster.listed.len() < KINDS {
            return None;
        }
        let mut changed = None;
        for (stamping, follower) in [(&REQUESTER, &self.requester), (&APPROVER, &self.approver)] {
            let judged = in_force(stamping, &self.documents, |kind, name| {
                cluster.objects.get(&(kind.to_owned(), name.to_owned()))
            });
            if let Ok(mut follower) = follower.lock()
                && follower.observe(judged, now)
            {
                log_change(stamping, &follower.trust());
                let since = match follower.trust() {
                    Trust::InForce(span) => span.since,
                    Trust::Broken(_) => now,
                };
                changed = changed.max(Some(since));
            }
        }
        changed
    }

    fn trust(&self, stamping: &Stamping) -> Trust {
        let follower = match stamping.field {
            f if f == APPROVER.field => &self.approver,
            _ => &self.requester,
        };
        follower.lock().map_or_else(
            |_| Trust::Broken("the operator's record of the admission policies is unusable".into()),
            |f| f.trust(),
        )
    }

    /// Whether the grant's current generation carries a requester stamp written under trust; the
    /// problem in words otherwise. See [`judge_generation`] for when a generation counts.
    pub fn requester_proven(&self, grant: &DelegationGrant, now: Timestamp) -> Result<(), String> {
        let written = Written {
            generation: grant.metadata.generation.unwrap_or(1),
            created: grant.metadata.creation_timestamp.as_ref().map(|t| t.0),
        };
        let trust = self.trust(&REQUESTER);
        judge_in(&self.grants, grant.uid(), |seen| {
            judge_generation(seen, written, &trust, self.restamps_on_update, now)
        })
    }

    /// Whether the operator has judged any generation of this grant since it started.
    pub fn remembers(&self, grant: &DelegationGrant) -> bool {
        let (Some(uid), Ok(grants)) = (grant.uid(), self.grants.lock()) else {
            return false;
        };
        grants.contains_key(&key(&uid))
    }

    /// Records the grant's current generation as proven by other evidence: the operator minted its
    /// current token for this very spec, and checked the stamp when it did.
    pub fn remember_proven(&self, grant: &DelegationGrant, now: Timestamp) {
        if let (Some(uid), Some(generation), Ok(mut grants)) =
            (grant.uid(), grant.metadata.generation, self.grants.lock())
        {
            let seen = Seen {
                generation,
                proven: true,
                at: now,
            };
            grants.insert(key(&uid), seen);
        }
    }

    /// Whether the approval's approver stamp was written under trust. An approval never changes (the
    /// CRD and the checking policy refuse it), so only its creation counts.
    pub fn approver_proven(
        &self,
        approval: &DelegationApproval,
        now: Timestamp,
    ) -> Result<(), String> {
        let written = Written {
            generation: 1,
            created: approval.metadata.creation_timestamp.as_ref().map(|t| t.0),
        };
        let trust = self.trust(&APPROVER);
        judge_in(&self.approvals, approval.uid(), |seen| {
            judge_generation(seen, written, &trust, false, now)
        })
    }

    /// Drops what is remembered of a grant that is going away.
    pub fn forget_grant(&self, grant: &DelegationGrant) {
        if let (Some(uid), Ok(mut grants)) = (grant.uid(), self.grants.lock()) {
            grants.remove(&key(&uid));
        }
    }

    /// Drops what is remembered of a deleted approval.
    pub fn forget_approval(&self, approval: &DelegationApproval) {
        if let (Some(uid), Ok(mut approvals)) = (approval.uid(), self.approvals.lock()) {
            approvals.remove(&key(&uid));
        }
    }
}

/// Judges one object with what `memory` holds of it, and keeps what the judgement says to remember.
fn judge_in(
    memory: &Mutex<HashMap<u64, Seen>>,
    uid: Option<String>,
    judge: impl FnOnce(Option<Seen>) -> (Result<(), String>, Seen),
) -> Result<(), String> {
    let Some(uid) = uid else {
        return Err("the object has no uid yet".into());
    };
    let Ok(mut memory) = memory.lock() else {
        return Err("the operator's record of proven stamps is unusable".into());
    };
    let (verdict, seen) = judge(memory.get(&key(&uid)).copied());
    memory.insert(key(&uid), seen);
    verdict
}

fn observed<K: Resource + serde::Serialize>(obj: &K) -> Observed {
    let meta = obj.meta();
    Observed {
        spec: serde_json::to_value(obj)
            .map(|v| v["spec"].clone())
            .unwrap_or_default(),
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        generation: meta.generation,
        deleting: meta.deletion_timestamp.is_some(),
    }
}

fn log_change(stamping: &Stamping, trust: &Trust) {
    match trust {
        Trust::InForce(span) => tracing::info!(
            stamp = stamping.field,
            since = %span.since,
            "the admission policies that stamp it are in force"
        ),
        Trust::Broken(problem) => tracing::warn!(
            stamp = stamping.field,
            %problem,
            "the admission policies that stamp it are not in force: new stamps are not trusted"
        ),
    }
}

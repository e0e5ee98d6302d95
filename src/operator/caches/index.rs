//! Who depends on whom, kept beside the grants cache: grants by actor, grants by parent, how many
//! grants of each actor hold a valid token, and each namespace's grants in order of seniority, all
//! together (for `--max-grants-per-namespace`) and per audience (for the AudiencePolicies'
//! `maxGrantsPerNamespace`).
//!
//! Every watch event updates the index in the same stream that fills the grants cache, so a lookup
//! costs what it returns, never a scan of every grant (per-event work must not grow with the number of
//! grants).

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use kube::{ResourceExt, runtime::watcher};

use crate::operator::{caches::interner::Interner, grants::is_ready};
use crate::{
    api::DelegationGrant,
    delegation::{
        chain::MAX_CHAIN_LENGTH,
        limits::{NamespaceCount, Seniority},
    },
};

/// `(namespace, name)` of an object.
pub type Key = (String, String);

/// A name the index repeats (a namespace, an agent, a grant as a member and as a parent), one shared
/// copy per distinct name: the index holds a few small entries per grant, not strings.
type Name = Arc<str>;

/// `(namespace, name)` as the index keeps it.
type SharedKey = (Name, Name);

/// What the index keeps of one grant: the references that never change, whether it is Ready, and
/// its rank in its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    actor: Name,
    audience: Name,
    parent: Option<Name>,
    ready: bool,
    seniority: Seniority,
}

#[derive(Default)]
struct State {
    grants: HashMap<SharedKey, Entry>,
    /// During a re-list: the grants seen so far, swapped in at its end.
    relisting: Option<HashMap<SharedKey, Entry>>,
    by_actor: HashMap<SharedKey, BTreeSet<Name>>,
    by_parent: HashMap<SharedKey, BTreeSet<Name>>,
    ready_by_actor: HashMap<SharedKey, usize>,
    by_namespace: HashMap<Name, BTreeSet<Seniority>>,
    /// `(namespace, audience)` -> its grants by rank, for the AudiencePolicies' per-namespace limit.
    by_audience: HashMap<SharedKey, BTreeSet<Seniority>>,
    names: Interner<str>,
}

impl State {
    fn name(&mut self, name: &str) -> Name {
        let mut shared: Name = Arc::from(name);
        self.names.share(&mut shared);
        shared
    }

    fn key_of(&mut self, grant: &DelegationGrant) -> SharedKey {
        (
            self.name(&grant.namespace().unwrap_or_default()),
            self.name(&grant.name_any()),
        )
    }

    fn entry_of(&mut self, grant: &DelegationGrant) -> Entry {
        let ready = is_ready(grant);
        let created = grant.metadata.creation_timestamp.as_ref().map(|t| t.0);
        Entry {
            seniority: Seniority::new(created, ready, self.name(&grant.name_any())),
            actor: self.name(&grant.spec.actor_ref.name),
            audience: self.name(&grant.spec.audience),
            parent: grant
                .spec
                .parent_grant_ref
                .as_ref()
                .map(|p| self.name(&p.name)),
            ready,
        }
    }

    fn insert(&mut self, key: SharedKey, entry: Entry) {
        let (ns, name) = key.clone();
        self.by_actor
            .entry((ns.clone(), entry.actor.clone()))
            .or_default()
            .insert(name.clone());
        if let Some(parent) = &entry.parent {
            self.by_parent
                .entry((ns.clone(), parent.clone()))
                .or_default()
                .insert(name);
        }
        if entry.ready {
            *self
                .ready_by_actor
                .entry((ns.clone(), entry.actor.clone()))
                .or_default() += 1;
        }
        self.by_audience
            .entry((ns.clone(), entry.audience.clone()))
            .or_default()
            .insert(entry.seniority.clone());
        self.by_namespace
            .entry(ns)
            .or_default()
            .insert(entry.seniority.clone());
        self.grants.insert(key, entry);
    }

    fn remove(&mut self, key: &SharedKey) -> Option<Entry> {
        let entry = self.grants.remove(key)?;
        let (ns, name) = key;
        let actor_key = (ns.clone(), entry.actor.clone());
        remove_member(&mut self.by_actor, &actor_key, name);
        if let Some(parent) = &entry.parent {
            remove_member(&mut self.by_parent, &(ns.clone(), parent.clone()), name);
        }
        if let Some(ranked) = self.by_namespace.get_mut(ns) {
            ranked.remove(&entry.seniority);
            if ranked.is_empty() {
                self.by_namespace.remove(ns);
            }
        }
        let audience_key = (ns.clone(), entry.audience.clone());
        if let Some(ranked) = self.by_audience.get_mut(&audience_key) {
            ranked.remove(&entry.seniority);
            if ranked.is_empty() {
                self.by_audience.remove(&audience_key);
            }
        }
        if entry.ready
            && let Some(count) = self.ready_by_actor.get_mut(&actor_key)
        {
            *count -= 1;
            if *count == 0 {
                self.ready_by_actor.remove(&actor_key);
            }
        }
        Some(entry)
    }

    fn rebuild(&mut self, grants: HashMap<SharedKey, Entry>) {
        let names = std::mem::take(&mut self.names);
        *self = State {
            names,
            ..State::default()
        };
        for (key, entry) in grants {
            self.insert(key, entry);
        }
    }

    /// The members of `map` under `(namespace, name)`.
    fn members<'a>(
        map: &'a HashMap<SharedKey, BTreeSet<Name>>,
        namespace: &str,
        name: &str,
    ) -> impl Iterator<Item = &'a Name> + use<'a> {
        map.get(&(Arc::from(namespace), Arc::from(name)))
            .into_iter()
            .flatten()
    }
}

fn remove_member(map: &mut HashMap<SharedKey, BTreeSet<Name>>, key: &SharedKey, name: &str) {
    if let Some(set) = map.get_mut(key) {
        set.remove(name);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

fn nth(ranked: &BTreeSet<Seniority>, rank: usize) -> Option<String> {
    ranked.iter().nth(rank).map(|s| s.name.to_string())
}

fn owned((namespace, name): &SharedKey) -> Key {
    (namespace.to_string(), name.to_string())
}

/// The dependency index of the grants cache.
#[derive(Default)]
pub struct GrantIndex {
    state: Mutex<State>,
}

/// What a watch event changed, for waking those who depend on it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// The actor whose count of Ready grants, or set of grants, changed.
    pub actor: Option<Key>,
}

impl GrantIndex {
    /// Applies one watch event of the grants watch. Returns what changed.
    pub fn apply(&self, event: &watcher::Event<DelegationGrant>) -> Touched {
        let Ok(mut state) = self.state.lock() else {
            return Touched::default();
        };
        match event {
            watcher::Event::Apply(grant) => {
                let key = state.key_of(grant);
                let entry = state.entry_of(grant);
                let old = state.remove(&key);
                // Named only when it changed: most events (a status write) touch no agent.
                let actor = (old.as_ref() != Some(&entry))
                    .then(|| owned(&(key.0.clone(), entry.actor.clone())));
                state.insert(key, entry);
                Touched { actor }
            }
            watcher::Event::Delete(grant) => {
                let key = state.key_of(grant);
                let actor = state.remove(&key).map(|e| owned(&(key.0.clone(), e.actor)));
                Touched { actor }
            }
            watcher::Event::Init => {
                state.relisting = Some(HashMap::new());
                Touched::default()
            }
            watcher::Event::InitApply(grant) => {
                let key = state.key_of(grant);
                let entry = state.entry_of(grant);
                state.relisting.get_or_insert_default().insert(key, entry);
                Touched::default()
            }
            watcher::Event::InitDone => {
                let listed = state.relisting.take().unwrap_or_default();
                state.rebuild(listed);
                Touched::default()
            }
        }
    }

    /// The grants whose parentGrantRef names this grant.
    pub fn children(&self, namespace: &str, name: &str) -> Vec<String> {
        self.members(|s| &s.by_parent, namespace, name)
    }

    /// The grants whose actor is this agent.
    pub fn with_actor(&self, namespace: &str, agent: &str) -> Vec<String> {
        self.members(|s| &s.by_actor, namespace, agent)
    }

    /// Every agent some grant names as actor.
    pub fn actors(&self) -> Vec<Key> {
        self.state
            .lock()
            .map_or_else(|_| Vec::new(), |s| s.by_actor.keys().map(owned).collect())
    }

    /// How many grants with this actor are Ready.
    pub fn ready_count(&self, namespace: &str, agent: &str) -> usize {
        self.state.lock().map_or(0, |s| {
            s.ready_by_actor
                .get(&(Arc::from(namespace), Arc::from(agent)))
                .copied()
                .unwrap_or(0)
        })
    }

    /// How the grant stands in its namespace: the grants ranked before it, counted up to `limit`, and
    /// all of them. `None` for a grant the index does not hold (deleted meanwhile).
    pub fn namespace_count(
        &self,
        namespace: &str,
        name: &str,
        limit: usize,
    ) -> Option<NamespaceCount> {
        self.count_in(namespace, name, limit, |state, _| {
            state.by_namespace.get(namespace)
        })
    }

    /// How the grant stands among its namespace's grants for its audience, as
    /// [`namespace_count`](Self::namespace_count) does among all of them.
    pub fn audience_count(
        &self,
        namespace: &str,
        name: &str,
        limit: usize,
    ) -> Option<NamespaceCount> {
        self.count_in(namespace, name, limit, |state, entry| {
            state
                .by_audience
                .get(&(Arc::from(namespace), entry.audience.clone()))
        })
    }

    /// Where the grant stands in the ranking `ranking` picks for it: the grants before it, counted up
    /// to `limit`, and all of them.
    fn count_in(
        &self,
        namespace: &str,
        name: &str,
        limit: usize,
        ranking: impl for<'a> Fn(&'a State, &Entry) -> Option<&'a BTreeSet<Seniority>>,
    ) -> Option<NamespaceCount> {
        let state = self.state.lock().ok()?;
        let entry = state.grants.get(&(Arc::from(namespace), Arc::from(name)))?;
        let ranked = ranking(&state, entry)?;
        Some(NamespaceCount {
            ahead: ranked.range(..&entry.seniority).take(limit).count(),
            total: ranked.len(),
        })
    }

    /// The grant ranked `rank` (from 0) in its namespace, if there are that many.
    pub fn ranked(&self, namespace: &str, rank: usize) -> Option<String> {
        let state = self.state.lock().ok()?;
        nth(state.by_namespace.get(namespace)?, rank)
    }

    /// The grant ranked `rank` (from 0) among its namespace's grants for `audience`.
    pub fn ranked_for_audience(
        &self,
        namespace: &str,
        audience: &str,
        rank: usize,
    ) -> Option<String> {
        let state = self.state.lock().ok()?;
        nth(
            state
                .by_audience
                .get(&(Arc::from(namespace), Arc::from(audience)))?,
            rank,
        )
    }

    /// Grants with this agent anywhere in their chain: those it acts for and everything below them.
    /// An agent's policy (suspension, allowedActors, maxDepth) bounds hops further down, whose parents'
    /// statuses need not change when it does.
    pub fn dependents_of_agent(&self, namespace: &str, agent: &str) -> Vec<String> {
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        let mut found: BTreeSet<Name> = BTreeSet::new();
        let mut queue: VecDeque<(Name, usize)> = State::members(&state.by_actor, namespace, agent)
            .map(|g| (g.clone(), 0))
            .collect();
        while let Some((grant, depth)) = queue.pop_front() {
            // Bounded like chain resolution, so a cycle of parentGrantRefs ends the walk too.
            if depth >= MAX_CHAIN_LENGTH || !found.insert(grant.clone()) {
                continue;
            }
            let children = State::members(&state.by_parent, namespace, &grant);
            queue.extend(children.map(|c| (c.clone(), depth + 1)));
        }
        found.into_iter().map(|g| g.to_string()).collect()
    }

    fn members(
        &self,
        map: impl Fn(&State) -> &HashMap<SharedKey, BTreeSet<Name>>,
        namespace: &str,
        name: &str,
    ) -> Vec<String> {
        self.state.lock().map_or_else(
            |_| Vec::new(),
            |s| {
                State::members(map(&s), namespace, name)
                    .map(|m| m.to_string())
                    .collect()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(name: &str, actor: &str, parent: Option<&str>, ready: bool) -> DelegationGrant {
        let spec = match parent {
            Some(p) => serde_json::json!({"parentGrantRef": {"name": p}}),
            None => serde_json::json!({"principal": {"kind": "User", "name": "alice"}}),
        };
        let mut spec = spec.as_object().unwrap().clone();
        spec.extend(
            serde_json::json!({"actorRef": {"name": actor}, "scopes": ["s"],
                "audience": "https://api", "tokenTTL": "10m"})
            .as_object()
            .unwrap()
            .clone(),
        );
        let status = if ready {
            serde_json::json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Issued",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
        } else {
            serde_json::json!({})
        };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
            "metadata": {"name": name, "namespace": "ns"}, "spec": spec, "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn finds_children_actors_and_counts_ready_grants() {
        let index = GrantIndex::default();
        index.apply(&watcher::Event::Apply(grant("root", "a", None, true)));
        index.apply(&watcher::Event::Apply(grant(
            "hop",
            "b",
            Some("root"),
            false,
        )));
        index.apply(&watcher::Event::Apply(grant(
            "hop2",
            "c",
            Some("hop"),
            false,
        )));
        index.apply(&watcher::Event::Apply(grant("other", "a", None, false)));
        assert_eq!(index.children("ns", "root"), ["hop"]);
        assert_eq!(index.with_actor("ns", "a"), ["other", "root"]);
        assert_eq!(index.ready_count("ns", "a"), 1);
        assert_eq!(
            index.dependents_of_agent("ns", "a"),
            ["hop", "hop2", "other", "root"]
        );
        assert_eq!(index.dependents_of_agent("ns", "b"), ["hop", "hop2"]);
        assert!(index.dependents_of_agent("other-ns", "a").is_empty());
    }

    #[test]
    fn readiness_changes_and_deletions_update_the_counts_and_name_the_actor() {
        let index = GrantIndex::default();
        let touched = index.apply(&watcher::Event::Apply(grant("g", "a", None, false)));
        assert_eq!(touched.actor, Some(("ns".into(), "a".into())));
        let unchanged = index.apply(&watcher::Event::Apply(grant("g", "a", None, false)));
        assert_eq!(unchanged.actor, None, "nothing the agent counts changed");
        index.apply(&watcher::Event::Apply(grant("g", "a", None, true)));
        assert_eq!(index.ready_count("ns", "a"), 1);
        let deleted = index.apply(&watcher::Event::Delete(grant("g", "a", None, true)));
        assert_eq!(deleted.actor, Some(("ns".into(), "a".into())));
        assert_eq!(index.ready_count("ns", "a"), 0);
        assert!(index.with_actor("ns", "a").is_empty());
    }

    #[test]
    fn a_relist_replaces_everything_at_its_end() {
        let index = GrantIndex::default();
        index.apply(&watcher::Event::Apply(grant("gone", "a", None, true)));
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(grant("new", "b", None, true)));
        assert_eq!(
            index.ready_count("ns", "a"),
            1,
            "kept until the list is complete"
        );
        index.apply(&watcher::Event::InitDone);
        assert_eq!(index.ready_count("ns", "a"), 0);
        assert_eq!(index.ready_count("ns", "b"), 1);
        assert_eq!(index.with_actor("ns", "b"), ["new"]);
    }

    #[test]
    fn repeated_names_are_one_shared_copy() {
        let index = GrantIndex::default();
        index.apply(&watcher::Event::Apply(grant("root", "a", None, true)));
        index.apply(&watcher::Event::Apply(grant(
            "one",
            "a",
            Some("root"),
            true,
        )));
        index.apply(&watcher::Event::Apply(grant(
            "two",
            "a",
            Some("root"),
            true,
        )));
        let state = index.state.lock().unwrap();
        let entry = |name: &str| &state.grants[&(Arc::from("ns"), Arc::from(name))];
        assert!(Arc::ptr_eq(&entry("one").actor, &entry("two").actor));
        let (root_key, _) = state
            .grants
            .get_key_value(&(Arc::from("ns"), Arc::from("root")))
            .unwrap();
        // The parent named by the children is the very string that keys the parent.
        assert!(Arc::ptr_eq(
            entry("one").parent.as_ref().unwrap(),
            &root_key.1
        ));
        assert!(Arc::ptr_eq(
            &root_key.0,
            &state.grants.keys().find(|k| &*k.1 == "two").unwrap().0
        ));
    }

    fn created_at(mut grant: DelegationGrant, second: i64) -> DelegationGrant {
        let at = k8s_openapi::jiff::Timestamp::from_second(second).unwrap();
        grant.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        grant
    }

    #[test]
    fn counts_the_grants_ranked_ahead_in_the_namespace_up_to_the_limit() {
        let index = GrantIndex::default();
        for (i, name) in ["d", "c", "b", "a"].into_iter().enumerate() {
            let ready = i < 2;
            index.apply(&watcher::Event::Apply(created_at(
                grant(name, "x", None, ready),
                i as i64,
            )));
        }
        let count = |name| index.namespace_count("ns", name, 2).unwrap();
        assert_eq!(count("d"), NamespaceCount { ahead: 0, total: 4 });
        assert_eq!(count("b"), NamespaceCount { ahead: 2, total: 4 });
        assert_eq!(count("a").ahead, 2, "counted no further than the limit");
        assert_eq!(index.ranked("ns", 2).as_deref(), Some("b"));
        // A burst created in the same second as "c" (which holds a token) ranks after it.
        index.apply(&watcher::Event::Apply(created_at(
            grant("a0", "x", None, false),
            1,
        )));
        assert_eq!(count("c").ahead, 1);
        index.apply(&watcher::Event::Delete(created_at(
            grant("d", "x", None, true),
            0,
        )));
        assert_eq!(count("c"), NamespaceCount { ahead: 0, total: 4 });
        assert_eq!(index.ranked("ns", 1).as_deref(), Some("a0"), "next in line");
        assert_eq!(index.namespace_count("other", "c", 2), None);
    }

    fn for_audience(mut grant: DelegationGrant, audience: &str) -> DelegationGrant {
        grant.spec.audience = audience.into();
        grant
    }

    #[test]
    fn ranks_each_audience_apart_and_follows_a_changed_audience() {
        let index = GrantIndex::default();
        for (i, (name, audience)) in [
            ("p1", "https://p"),
            ("q1", "https://q"),
            ("p2", "https://p"),
        ]
        .into_iter()
        .enumerate()
        {
            let g = created_at(grant(name, "x", None, false), i as i64);
            index.apply(&watcher::Event::Apply(for_audience(g, audience)));
        }
        let count = |name| index.audience_count("ns", name, 5).unwrap();
        assert_eq!(count("p2"), NamespaceCount { ahead: 1, total: 2 });
        assert_eq!(count("q1"), NamespaceCount { ahead: 0, total: 1 });
        assert_eq!(
            index.ranked_for_audience("ns", "https://p", 1).as_deref(),
            Some("p2")
        );
        // An edit to another audience moves the grant between the rankings.
        let moved = for_audience(created_at(grant("p1", "x", None, false), 0), "https://q");
        index.apply(&watcher::Event::Apply(moved.clone()));
        assert_eq!(count("p2"), NamespaceCount { ahead: 0, total: 1 });
        assert_eq!(count("q1"), NamespaceCount { ahead: 1, total: 2 });
        index.apply(&watcher::Event::Delete(moved));
        index.apply(&watcher::Event::Delete(for_audience(
            created_at(grant("q1", "x", None, false), 1),
            "https://q",
        )));
        assert_eq!(index.ranked_for_audience("ns", "https://q", 0), None);
        assert!(
            !index
                .state
                .lock()
                .unwrap()
                .by_audience
                .contains_key(&(Arc::from("ns"), Arc::from("https://q"))),
            "an empty ranking is dropped"
        );
    }

    #[test]
    fn a_cycle_of_parents_ends_the_walk() {
        let index = GrantIndex::default();
        index.apply(&watcher::Event::Apply(grant("x", "a", Some("y"), false)));
        index.apply(&watcher::Event::Apply(grant("y", "b", Some("x"), false)));
        assert_eq!(index.dependents_of_agent("ns", "a"), ["x", "y"]);
    }
}

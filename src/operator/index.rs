//! Who depends on whom, kept beside the grants cache: grants by actor, grants by parent, and how many
//! grants of each actor hold a valid token.
//!
//! Every watch event updates the index in the same stream that fills the grants cache, so a lookup
//! costs what it returns, never a scan of every grant (per-event work must not grow with the number of
//! grants).

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Mutex,
};

use kube::{ResourceExt, runtime::watcher};

use super::grants::is_ready;
use crate::{api::DelegationGrant, delegation::chain::MAX_CHAIN_LENGTH};

/// `(namespace, name)` of an object.
pub type Key = (String, String);

/// What the index keeps of one grant: the references that never change, and whether it is Ready.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    actor: String,
    parent: Option<String>,
    ready: bool,
}

impl Entry {
    fn of(grant: &DelegationGrant) -> Self {
        Self {
            actor: grant.spec.actor_ref.name.clone(),
            parent: grant.spec.parent_grant_ref.as_ref().map(|p| p.name.clone()),
            ready: is_ready(grant),
        }
    }
}

#[derive(Default)]
struct State {
    grants: HashMap<Key, Entry>,
    /// During a re-list: the grants seen so far, swapped in at its end.
    relisting: Option<HashMap<Key, Entry>>,
    by_actor: HashMap<Key, BTreeSet<String>>,
    by_parent: HashMap<Key, BTreeSet<String>>,
    ready_by_actor: HashMap<Key, usize>,
}

impl State {
    fn insert(&mut self, key: Key, entry: Entry) {
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
                .entry((ns, entry.actor.clone()))
                .or_default() += 1;
        }
        self.grants.insert(key, entry);
    }

    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let entry = self.grants.remove(key)?;
        let (ns, name) = key;
        let actor_key = (ns.clone(), entry.actor.clone());
        remove_member(&mut self.by_actor, &actor_key, name);
        if let Some(parent) = &entry.parent {
            remove_member(&mut self.by_parent, &(ns.clone(), parent.clone()), name);
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

    fn rebuild(&mut self, grants: HashMap<Key, Entry>) {
        *self = State::default();
        for (key, entry) in grants {
            self.insert(key, entry);
        }
    }
}

fn remove_member(map: &mut HashMap<Key, BTreeSet<String>>, key: &Key, name: &str) {
    if let Some(set) = map.get_mut(key) {
        set.remove(name);
        if set.is_empty() {
            map.remove(key);
        }
    }
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
                let key = key_of(grant);
                let entry = Entry::of(grant);
                let old = state.remove(&key);
                let changed = old.as_ref() != Some(&entry);
                let actor = (key.0.clone(), entry.actor.clone());
                state.insert(key, entry);
                Touched {
                    actor: changed.then_some(actor),
                }
            }
            watcher::Event::Delete(grant) => {
                let key = key_of(grant);
                let actor = state.remove(&key).map(|e| (key.0.clone(), e.actor));
                Touched { actor }
            }
            watcher::Event::Init => {
                state.relisting = Some(HashMap::new());
                Touched::default()
            }
            watcher::Event::InitApply(grant) => {
                let entry = Entry::of(grant);
                state
                    .relisting
                    .get_or_insert_default()
                    .insert(key_of(grant), entry);
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
            .map_or_else(|_| Vec::new(), |s| s.by_actor.keys().cloned().collect())
    }

    /// How many grants with this actor are Ready.
    pub fn ready_count(&self, namespace: &str, agent: &str) -> usize {
        self.state.lock().map_or(0, |s| {
            s.ready_by_actor
                .get(&(namespace.to_owned(), agent.to_owned()))
                .copied()
                .unwrap_or(0)
        })
    }

    /// Grants with this agent anywhere in their chain: those it acts for and everything below them.
    /// An agent's policy (suspension, allowedActors, maxDepth) bounds hops further down, whose parents'
    /// statuses need not change when it does.
    pub fn dependents_of_agent(&self, namespace: &str, agent: &str) -> Vec<String> {
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        let mut found: BTreeSet<String> = BTreeSet::new();
        let mut queue: VecDeque<(String, usize)> = state
            .by_actor
            .get(&(namespace.to_owned(), agent.to_owned()))
            .into_iter()
            .flatten()
            .map(|g| (g.clone(), 0))
            .collect();
        while let Some((grant, depth)) = queue.pop_front() {
            // Bounded like chain resolution, so a cycle of parentGrantRefs ends the walk too.
            if depth >= MAX_CHAIN_LENGTH || !found.insert(grant.clone()) {
                continue;
            }
            let children = state.by_parent.get(&(namespace.to_owned(), grant));
            queue.extend(
                children
                    .into_iter()
                    .flatten()
                    .map(|c| (c.clone(), depth + 1)),
            );
        }
        found.into_iter().collect()
    }

    fn members(
        &self,
        map: impl Fn(&State) -> &HashMap<Key, BTreeSet<String>>,
        namespace: &str,
        name: &str,
    ) -> Vec<String> {
        self.state.lock().map_or_else(
            |_| Vec::new(),
            |s| {
                map(&s)
                    .get(&(namespace.to_owned(), name.to_owned()))
                    .map(|set| set.iter().cloned().collect())
                    .unwrap_or_default()
            },
        )
    }
}

fn key_of(grant: &DelegationGrant) -> Key {
    (grant.namespace().unwrap_or_default(), grant.name_any())
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
    fn a_cycle_of_parents_ends_the_walk() {
        let index = GrantIndex::default();
        index.apply(&watcher::Event::Apply(grant("x", "a", Some("y"), false)));
        index.apply(&watcher::Event::Apply(grant("y", "b", Some("x"), false)));
        assert_eq!(index.dependents_of_agent("ns", "a"), ["x", "y"]);
    }
}

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

/// A name the index repeats (a namespace, an agent, an audience, a grant as a member and as a
/// parent), one shared copy per distinct name: the index holds a few small entries per grant, not
/// strings. Namespaces, agents and audiences are shared through the interner; a grant's name is
/// shared with the entries that name it as parent.
type Name = Arc<str>;

/// A grant's [`Seniority`] in 8 bytes: its creation second doubled, plus one when it waits for a
/// token (`i64::MAX - 1` and `i64::MAX` without a creationTimestamp). These order exactly as
/// `(created, waiting)` do, as creation seconds lie far inside ±2^62.
fn packed(seniority: &Seniority) -> i64 {
    let waiting = i64::from(seniority.waiting);
    match seniority.created.checked_mul(2) {
        Some(doubled) if doubled < i64::MAX - 1 => doubled + waiting,
        _ if seniority.created < 0 => i64::MIN + waiting,
        _ => i64::MAX - 1 + waiting,
    }
}

/// Where a grant ranks in its namespace: its packed seniority, then its name (as [`Seniority`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    seniority: i64,
    name: Name,
}

/// What the index keeps of one grant: the references that never change, and its packed seniority
/// (which says whether it is Ready).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    actor: Name,
    audience: Name,
    parent: Option<Name>,
    seniority: i64,
}

impl Entry {
    fn ready(&self) -> bool {
        self.seniority & 1 == 0
    }
}

/// The index of one namespace's grants.
#[derive(Default)]
struct Namespace {
    grants: HashMap<Name, Entry>,
    by_actor: HashMap<Name, BTreeSet<Name>>,
    by_parent: HashMap<Name, BTreeSet<Name>>,
    ready_by_actor: HashMap<Name, usize>,
    /// Its grants by rank, for `--max-grants-per-namespace`.
    ranked: BTreeSet<Rank>,
    /// Audience -> its grants by rank, for the AudiencePolicies' per-namespace limit.
    by_audience: HashMap<Name, BTreeSet<Rank>>,
}

impl Namespace {
    /// The shared copy of a grant's name: the one that keys the grant, or that its children name.
    fn grant_name(&self, name: &str) -> Name {
        self.grants
            .get_key_value(name)
            .map(|(k, _)| k)
            .or_else(|| self.by_parent.get_key_value(name).map(|(k, _)| k))
            .cloned()
            .unwrap_or_else(|| Arc::from(name))
    }

    fn entry_of(&self, grant: &DelegationGrant, names: &mut Interner<str>) -> (Name, Entry) {
        let name = self.grant_name(&grant.name_any());
        let created = grant.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let seniority = Seniority::new(created, is_ready(grant), name.clone());
        let entry = Entry {
            actor: shared(names, &grant.spec.actor_ref.name),
            audience: shared(names, &grant.spec.audience),
            parent: grant
                .spec
                .parent_grant_ref
                .as_ref()
                .map(|p| self.grant_name(&p.name)),
            seniority: packed(&seniority),
        };
        (name, entry)
    }

    fn insert(&mut self, name: Name, entry: Entry) {
        self.by_actor
            .entry(entry.actor.clone())
            .or_default()
            .insert(name.clone());
        if let Some(parent) = &entry.parent {
            self.by_parent
                .entry(parent.clone())
                .or_default()
                .insert(name.clone());
        }
        if entry.ready() {
            *self.ready_by_actor.entry(entry.actor.clone()).or_default() += 1;
        }
        let rank = Rank {
            seniority: entry.seniority,
            name: name.clone(),
        };
        self.by_audience
            .entry(entry.audience.clone())
            .or_default()
            .insert(rank.clone());
        self.ranked.insert(rank);
        self.grants.insert(name, entry);
    }

    fn remove(&mut self, name: &str) -> Option<Entry> {
        let (name, entry) = self.grants.remove_entry(name)?;
        remove_member(&mut self.by_actor, &entry.actor, &name);
        if let Some(parent) = &entry.parent {
            remove_member(&mut self.by_parent, parent, &name);
        }
        let rank = Rank {
            seniority: entry.seniority,
            name,
        };
        self.ranked.remove(&rank);
        if let Some(ranked) = self.by_audience.get_mut(&entry.audience) {
            ranked.remove(&rank);
            if ranked.is_empty() {
                self.by_audience.remove(&entry.audience);
            }
        }
        if entry.ready()
            && let Some(count) = self.ready_by_actor.get_mut(&entry.actor)
        {
            *count -= 1;
            if *count == 0 {
                self.ready_by_actor.remove(&entry.actor);
            }
        }
        Some(entry)
    }

    /// Where the grant stands in `ranked`: the grants before it, counted up to `limit`, and all.
    fn count(&self, name: &str, limit: usize, ranked: &BTreeSet<Rank>) -> Option<NamespaceCount> {
        let (name, entry) = self.grants.get_key_value(name)?;
        let rank = Rank {
            seniority: entry.seniority,
            name: name.clone(),
        };
        Some(NamespaceCount {
            ahead: ranked.range(..&rank).take(limit).count(),
            total: ranked.len(),
        })
    }
}

fn shared(names: &mut Interner<str>, name: &str) -> Name {
    let mut shared: Name = Arc::from(name);
    names.share(&mut shared);
    shared
}

#[derive(Default)]
struct State {
    namespaces: HashMap<Name, Namespace>,
    /// During a re-list: the grants seen so far, swapped in at its end.
    relisting: Option<HashMap<Name, Namespace>>,
    /// Namespaces, agents and audiences.
    names: Interner<str>,
}

impl State {
    /// Puts the grant in `namespaces`; returns its earlier entry and its new one.
    fn apply(
        namespaces: &mut HashMap<Name, Namespace>,
        names: &mut Interner<str>,
        grant: &DelegationGrant,
    ) -> (Name, Option<Entry>, Entry) {
        let namespace = grant.namespace().unwrap_or_default();
        let namespace = match namespaces.get_key_value(namespace.as_str()) {
            Some((shared, _)) => shared.clone(),
            None => shared(names, &namespace),
        };
        let grants = namespaces.entry(namespace.clone()).or_default();
        let (name, entry) = grants.entry_of(grant, names);
        let old = grants.remove(&name);
        grants.insert(name, entry.clone());
        (namespace, old, entry)
    }

    fn delete(&mut self, grant: &DelegationGrant) -> Option<(Name, Entry)> {
        let namespace = grant.namespace().unwrap_or_default();
        let (shared, _) = self.namespaces.get_key_value(namespace.as_str())?;
        let shared = shared.clone();
        let grants = self.namespaces.get_mut(namespace.as_str())?;
        let entry = grants.remove(&grant.name_any());
        if grants.grants.is_empty() {
            self.namespaces.remove(namespace.as_str());
        }
        entry.map(|e| (shared, e))
    }

    fn namespace(&self, namespace: &str) -> Option<&Namespace> {
        self.namespaces.get(namespace)
    }

    /// The members of `map` under `name` in `namespace`.
    fn members<'a>(
        &'a self,
        map: MemberMap,
        namespace: &str,
        name: &str,
    ) -> impl Iterator<Item = &'a Name> + use<'a> {
        self.namespace(namespace)
            .and_then(|ns| map(ns).get(name))
            .into_iter()
            .flatten()
    }
}

/// Which members a lookup reads: by actor or by parent.
type MemberMap = for<'b> fn(&'b Namespace) -> &'b HashMap<Name, BTreeSet<Name>>;

fn remove_member(map: &mut HashMap<Name, BTreeSet<Name>>, key: &Name, name: &str) {
    if let Some(set) = map.get_mut(key) {
        set.remove(name);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

fn nth(ranked: &BTreeSet<Rank>, rank: usize) -> Option<String> {
    ranked.iter().nth(rank).map(|r| r.name.to_string())
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
        let state = &mut *state;
        match event {
            watcher::Event::Apply(grant) => {
                let (namespace, old, entry) =
                    State::apply(&mut state.namespaces, &mut state.names, grant);
                // Named only when it changed: most events (a status write) touch no agent.
                let actor = (old.as_ref() != Some(&entry))
                    .then(|| (namespace.to_string(), entry.actor.to_string()));
                Touched { actor }
            }
            watcher::Event::Delete(grant) => {
                let actor = state
                    .delete(grant)
                    .map(|(namespace, e)| (namespace.to_string(), e.actor.to_string()));
                Touched { actor }
            }
            watcher::Event::Init => {
                state.relisting = Some(HashMap::new());
                Touched::default()
            }
            watcher::Event::InitApply(grant) => {
                let listed = state.relisting.get_or_insert_default();
                State::apply(listed, &mut state.names, grant);
                Touched::default()
            }
            watcher::Event::InitDone => {
                state.namespaces = state.relisting.take().unwrap_or_default();
                Touched::default()
            }
        }
    }

    /// The grants whose parentGrantRef names this grant.
    pub fn children(&self, namespace: &str, name: &str) -> Vec<String> {
        self.members(|ns| &ns.by_parent, namespace, name)
    }

    /// The grants whose actor is this agent.
    pub fn with_actor(&self, namespace: &str, agent: &str) -> Vec<String> {
        self.members(|ns| &ns.by_actor, namespace, agent)
    }

    /// Every agent some grant names as actor.
    pub fn actors(&self) -> Vec<Key> {
        self.state.lock().map_or_else(
            |_| Vec::new(),
            |s| {
                s.namespaces
                    .iter()
                    .flat_map(|(ns, grants)| {
                        grants
                            .by_actor
                            .keys()
                            .map(|actor| (ns.to_string(), actor.to_string()))
                    })
                    .collect()
            },
        )
    }

    /// How many grants with this actor are Ready.
    pub fn ready_count(&self, namespace: &str, agent: &str) -> usize {
        self.state.lock().map_or(0, |s| {
            s.namespace(namespace)
                .and_then(|ns| ns.ready_by_actor.get(agent))
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
        let state = self.state.lock().ok()?;
        let ns = state.namespace(namespace)?;
        ns.count(name, limit, &ns.ranked)
    }

    /// How the grant stands among its namespace's grants for its audience, as
    /// [`namespace_count`](Self::namespace_count) does among all of them.
    pub fn audience_count(
        &self,
        namespace: &str,
        name: &str,
        limit: usize,
    ) -> Option<NamespaceCount> {
        let state = self.state.lock().ok()?;
        let ns = state.namespace(namespace)?;
        let ranked = ns.by_audience.get(&ns.grants.get(name)?.audience)?;
        ns.count(name, limit, ranked)
    }

    /// The grant ranked `rank` (from 0) in its namespace, if there are that many.
    pub fn ranked(&self, namespace: &str, rank: usize) -> Option<String> {
        let state = self.state.lock().ok()?;
        nth(&state.namespace(namespace)?.ranked, rank)
    }

    /// The grant ranked `rank` (from 0) among its namespace's grants for `audience`.
    pub fn ranked_for_audience(
        &self,
        namespace: &str,
        audience: &str,
        rank: usize,
    ) -> Option<String> {
        let state = self.state.lock().ok()?;
        nth(state.namespace(namespace)?.by_audience.get(audience)?, rank)
    }

    /// Grants with this agent anywhere in their chain: those it acts for and everything below them.
    /// An agent's policy (suspension, allowedActors, maxDepth) bounds hops further down, whose parents'
    /// statuses need not change when it does.
    pub fn dependents_of_agent(&self, namespace: &str, agent: &str) -> Vec<String> {
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        let mut found: BTreeSet<Name> = BTreeSet::new();
        let mut queue: VecDeque<(Name, usize)> = state
            .members(|ns| &ns.by_actor, namespace, agent)
            .map(|g| (g.clone(), 0))
            .collect();
        while let Some((grant, depth)) = queue.pop_front() {
            // Bounded like chain resolution, so a cycle of parentGrantRefs ends the walk too.
            if depth >= MAX_CHAIN_LENGTH || !found.insert(grant.clone()) {
                continue;
            }
            let children = state.members(|ns| &ns.by_parent, namespace, &grant);
            queue.extend(children.map(|c| (c.clone(), depth + 1)));
        }
        found.into_iter().map(|g| g.to_string()).collect()
    }

    fn members(&self, map: MemberMap, namespace: &str, name: &str) -> Vec<String> {
        self.state.lock().map_or_else(
            |_| Vec::new(),
            |s| {
                s.members(map, namespace, name)
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
        let ns = &state.namespaces["ns"];
        let entry = |name: &str| &ns.grants[name];
        assert!(Arc::ptr_eq(&entry("one").actor, &entry("two").actor));
        let (root_key, _) = ns.grants.get_key_value("root").unwrap();
        // The parent named by the children is the very string that keys the parent.
        assert!(Arc::ptr_eq(entry("one").parent.as_ref().unwrap(), root_key));
        assert!(Arc::ptr_eq(
            entry("one").parent.as_ref().unwrap(),
            entry("two").parent.as_ref().unwrap()
        ));
        let (namespace, _) = state.namespaces.get_key_value("ns").unwrap();
        assert!(Arc::ptr_eq(
            namespace,
            &state.namespaces.keys().next().unwrap().clone()
        ));
    }

    #[test]
    fn a_child_seen_before_its_parent_shares_the_parents_name() {
        let index = GrantIndex::default();
        index.apply(&watcher::Event::Apply(grant(
            "one",
            "a",
            Some("root"),
            true,
        )));
        index.apply(&watcher::Event::Apply(grant("root", "a", None, true)));
        let state = index.state.lock().unwrap();
        let ns = &state.namespaces["ns"];
        let (root_key, _) = ns.grants.get_key_value("root").unwrap();
        assert!(Arc::ptr_eq(
            ns.grants["one"].parent.as_ref().unwrap(),
            root_key
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
            !index.state.lock().unwrap().namespaces["ns"]
                .by_audience
                .contains_key("https://q"),
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

    #[test]
    fn an_emptied_namespace_is_dropped() {
        let index = GrantIndex::default();
        index.apply(&watcher::Event::Apply(grant("g", "a", None, true)));
        index.apply(&watcher::Event::Delete(grant("g", "a", None, true)));
        assert!(index.state.lock().unwrap().namespaces.is_empty());
        assert!(index.actors().is_empty());
    }

    proptest::proptest! {
        /// The packed seniority orders grants exactly as [`Seniority`] does, and keeps readiness.
        #[test]
        fn packed_seniority_orders_as_seniority(
            a in proptest::option::of(-377_705_116_800i64..=253_402_207_199),
            b in proptest::option::of(-377_705_116_800i64..=253_402_207_199),
            a_holds: bool,
            b_holds: bool,
        ) {
            let at = |s: Option<i64>| s.map(|s| k8s_openapi::jiff::Timestamp::from_second(s).unwrap());
            let x = Seniority::new(at(a), a_holds, "n".into());
            let y = Seniority::new(at(b), b_holds, "n".into());
            proptest::prop_assert_eq!(packed(&x).cmp(&packed(&y)), x.cmp(&y));
            proptest::prop_assert_eq!(packed(&x) & 1 == 0, a_holds);
        }
    }
}

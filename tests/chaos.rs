//! Chaos: the operator is killed (-9) at random moments while grants are created, deleted and
//! suspended and parents are deleted under their hops — also while it is down — and, on a private
//! control plane of its own, etcd and kube-apiserver are stopped and started again mid-churn. After
//! each restart and at the end the invariants that make revocation trustworthy must hold:
//! - every token of a deleted, suspended or refused grant is INVALID in the published, signed Token
//!   Status List (the list a verifier reads);
//! - no token Secret outlives its grant;
//! - no token exceeds its grant (scopes, audience, lifetime);
//! - at most one unrevoked token per grant besides the documented previous one, and the current one
//!   is VALID;
//! - every live grant whose agent and chain allow it is Ready again.
//!
//! The status reference (list uri, index) of every token is learnt as it appears, by watching the
//! token Secrets and the operator's own per-grant token records (the status-list shard Secrets,
//! written before a token is minted): the audit trail names token ids only, and the operator forgets
//! a token's index once it is revoked.
//!
//! `CHAOS_ROUNDS` sets how many kill/restart rounds run (4 in the test suite), `CHAOS_RESTARTS` how
//! many control-plane restarts (1 in the test suite); `make chaos` runs more of both. `CHAOS_SEED`
//! (printed by every run) replays a run's choices.
//!
//! What happens to the operator when the apiserver goes away: with the tests' lease timings (8 s
//! lease, 6 s renew deadline) it cannot renew its lease, stops writing and exits non-zero ("lost the
//! leader lease"); started again while the apiserver is still down it exits at start-up. The
//! restart test supervises it as the kubelet would — it starts the operator again a second after
//! every exit — and prints each exit.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use base64::Engine;
use delegation_operator::{
    api::DelegationGrant, operator::publishing::status_lists, signing, status_list::StatusList,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams},
    runtime::watcher,
};
use serde_json::json;
use support::{private_control_plane::PrivateControlPlane, *};

const AGENTS: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: lead}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read, tickets:write]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
  delegation: {maxDepth: 1, allowedActors: [helper]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: helper}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
"#;

/// A small deterministic generator: the run is reproducible from its seed (printed on failure).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn root(name: &str) -> String {
    format!(
        "apiVersion: delegation.nhi.dev/v1alpha1\nkind: DelegationGrant\nmetadata: {{name: {name}}}\nspec:\n  principal: {{kind: User, name: alice@example.com}}\n  actorRef: {{name: lead}}\n  scopes: [tickets:read, tickets:write]\n  audience: https://tickets.example.com\n  tokenTTL: 10m\n"
    )
}

fn hop(name: &str, parent: &str) -> String {
    format!(
        "apiVersion: delegation.nhi.dev/v1alpha1\nkind: DelegationGrant\nmetadata: {{name: {name}}}\nspec:\n  parentGrantRef: {{name: {parent}}}\n  actorRef: {{name: helper}}\n  scopes: [tickets:read]\n  audience: https://tickets.example.com\n  tokenTTL: 5m\n"
    )
}

/// One random change: create a root or a hop, delete a grant (a parent too), or flip suspension.
async fn churn(f: &Fixture, rng: &mut Rng, serial: &mut u32) {
    let names: Vec<String> = f
        .grants()
        .list(&ListParams::default())
        .await
        .unwrap()
        .iter()
        .filter(|g| g.metadata.deletion_timestamp.is_none())
        .map(|g| g.name_any())
        .collect();
    let roots: Vec<&String> = names.iter().filter(|n| n.starts_with("root-")).collect();
    *serial += 1;
    match rng.below(5) {
        0 | 1 => f.apply(&root(&format!("root-{serial}"))).await,
        2 if !roots.is_empty() => {
            let parent = roots[rng.below(roots.len() as u64) as usize];
            f.apply(&hop(&format!("hop-{serial}"), parent)).await;
        }
        3 if !names.is_empty() => {
            let victim = &names[rng.below(names.len() as u64) as usize];
            let _ = f.grants().delete(victim, &DeleteParams::default()).await;
        }
        _ if !names.is_empty() => {
            let name = &names[rng.below(names.len() as u64) as usize];
            let on = rng.below(2) == 0;
            let _ = f
                .grants()
                .patch(
                    name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({"spec": {"suspended": on}})),
                )
                .await;
        }
        _ => f.apply(&root(&format!("root-{serial}"))).await,
    }
}

/// What the audit trails say: every token id issued, by grant; every id revoked; and where each
/// issued token's status lives (the `statusList` of its Issued or Rotated line).
struct Audited {
    issued: BTreeMap<String, BTreeSet<String>>,
    revoked: BTreeSet<String>,
    refs: BTreeMap<String, StatusRef>,
}

fn audited(records: &[serde_json::Value]) -> Audited {
    let mut audited = Audited {
        issued: BTreeMap::new(),
        revoked: BTreeSet::new(),
        refs: BTreeMap::new(),
    };
    for r in records {
        let ids: Vec<String> = r["tokenIds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        match r["action"].as_str() {
            Some("Issued" | "Rotated") => {
                if let (Some(id), Some(reference)) = (ids.first(), status_ref(&r["statusList"])) {
                    audited.refs.insert(id.clone(), reference);
                }
                audited
                    .issued
                    .entry(r["grant"].as_str().unwrap_or_default().to_owned())
                    .or_default()
                    .extend(ids);
            }
            Some("Revoked") => audited.revoked.extend(ids),
            _ => {}
        }
    }
    audited
}

/// A `{"idx": …, "uri": …}` status reference, as tokens and audit lines carry it.
fn status_ref(reference: &serde_json::Value) -> Option<StatusRef> {
    let uri = reference["uri"].as_str()?;
    Some(StatusRef {
        serial: uri.rsplit('/').next().unwrap_or_default().to_owned(),
        idx: reference["idx"].as_u64()? as usize,
    })
}

// ---- where each token's status lives -------------------------------------------------------------

/// A token's place in a status list: the list's serial (last segment of its uri) and the index.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StatusRef {
    serial: String,
    idx: usize,
}

/// Learns the status reference of every token the operator mints, from two watches: the token
/// Secrets in the grants' namespace (the token's own `status` claim) and the operator's per-grant
/// token records in its namespace (`[jti, exp, serial, idx]`, written before the token exists). A
/// watch that breaks (the apiserver restarts) resumes or relists, so a token minted and revoked
/// while it was down can be missed by both: the token's Issued audit line names its reference too
/// (see [`audited`]), and a token known to neither is reported as a failure.
struct Tracker {
    refs: Arc<Mutex<BTreeMap<String, StatusRef>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Tracker {
    fn start(client: &Client, ns: &str, operator_ns: &str) -> Self {
        let refs: Arc<Mutex<BTreeMap<String, StatusRef>>> = Arc::default();
        let tasks = [ns, operator_ns]
            .into_iter()
            .map(|namespace| {
                let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
                let refs = refs.clone();
                tokio::spawn(async move {
                    let mut events = watcher(api, watcher::Config::default()).boxed();
                    while let Some(event) = events.next().await {
                        if let Ok(
                            watcher::Event::Apply(secret) | watcher::Event::InitApply(secret),
                        ) = event
                        {
                            let learnt = status_refs_in(&secret);
                            refs.lock().unwrap().extend(learnt);
                        }
                    }
                })
            })
            .collect();
        Self { refs, tasks }
    }

    fn get(&self, jti: &str) -> Option<StatusRef> {
        self.refs.lock().unwrap().get(jti).cloned()
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The `(jti, status reference)` pairs a Secret reveals: a token Secret's token (its payload, read
/// without verification: only where the operator put it is learnt here), or a shard's records.
fn status_refs_in(secret: &Secret) -> Vec<(String, StatusRef)> {
    let Some(data) = secret.data.as_ref() else {
        return vec![];
    };
    if let Some(token) = data.get("token") {
        let payload = String::from_utf8_lossy(&token.0)
            .split('.')
            .nth(1)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
            })
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok());
        let Some(claims) = payload else {
            return vec![];
        };
        let (Some(jti), Some(reference)) = (
            claims["jti"].as_str(),
            status_ref(&claims["status"]["status_list"]),
        ) else {
            return vec![];
        };
        return vec![(jti.to_owned(), reference)];
    }
    if !secret.name_any().starts_with(status_lists::SHARD_PREFIX) {
        return vec![];
    }
    let Some(records) = data
        .get("tokens.json")
        .and_then(|t| serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(&t.0).ok())
    else {
        return vec![];
    };
    records
        .values()
        .flat_map(|held| held.as_array().cloned().unwrap_or_default())
        .filter_map(|h| {
            Some((
                h[0].as_str()?.to_owned(),
                StatusRef {
                    serial: h[2].as_str()?.to_owned(),
                    idx: h[3].as_u64()? as usize,
                },
            ))
        })
        .collect()
}

/// The published, verified status lists (by serial), read once for one check.
struct Published {
    base_uri: String,
    lists: BTreeMap<String, StatusList>,
}

impl Published {
    async fn read(f: &Fixture) -> Self {
        let state: Api<Secret> = Api::namespaced(f.client.clone(), &f.operator_namespace());
        let state = state.get(status_lists::SECRET_NAME).await.unwrap();
        let state: serde_json::Value =
            serde_json::from_slice(&state.data.unwrap()[status_lists::STATE_KEY].0).unwrap();
        let base_uri = state["baseUri"]
            .as_str()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        let mut lists = BTreeMap::new();
        for key in f.status_list_tokens().await.keys() {
            let serial = key.trim_end_matches(".jwt").to_owned();
            // Checked as a verifier would: typ, signature by a published key, sub, iss.
            let (_, claims) = f
                .status_list_token(&format!("{base_uri}/{serial}"))
                .await
                .unwrap();
            let list = StatusList::from_claim(&claims["status_list"]).unwrap();
            lists.insert(serial, list);
        }
        Self { base_uri, lists }
    }

    /// 0 VALID, 1 INVALID, 2 SUSPENDED; `None` when no published list covers the reference.
    fn status(&self, r: &StatusRef) -> Option<u8> {
        self.lists.get(&r.serial)?.value(r.idx)
    }
}

// ---- the invariants ------------------------------------------------------------------------------

/// Waits until every grant is settled: deleted ones gone, the others' status describing their
/// current generation.
async fn settle(f: &Fixture) -> Vec<DelegationGrant> {
    wait_for("every grant settled", Duration::from_secs(60), || async {
        let grants = f.grants().list(&ListParams::default()).await.ok()?.items;
        let settled = grants.iter().all(|g| {
            g.metadata.deletion_timestamp.is_none()
                && g.status.as_ref().is_some_and(|s| {
                    s.observed_generation == g.metadata.generation
                        && s.conditions.as_ref().is_some_and(|c| {
                            // A hop whose parent is being reissued may wait a moment.
                            !c.is_empty() && c[0].reason != "ParentUpdating"
                        })
                })
        });
        settled.then_some(grants)
    })
    .await
}

fn is_ready(g: &DelegationGrant) -> bool {
    g.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether a live grant should be Ready: not suspended, and a root or the hop of a live grant that
/// should be Ready (the agents allow every grant the churn writes).
fn should_be_ready(name: &str, grants: &BTreeMap<String, DelegationGrant>) -> bool {
    let Some(g) = grants.get(name) else {
        return false;
    };
    if g.spec.suspended == Some(true) {
        return false;
    }
    match g.spec.parent_grant_ref.as_ref() {
        None => true,
        Some(parent) => should_be_ready(&parent.name, grants),
    }
}

/// Waits for the grants to settle, then checks every invariant, retrying for a few seconds while the
/// last revocations and Secret deletes land; panics with what is still wrong.
async fn check_invariants(
    f: &Fixture,
    tracker: &Tracker,
    records: &[serde_json::Value],
    seed: u64,
) {
    let mut last = Vec::new();
    for _ in 0..10 {
        settle(f).await;
        last = violations(f, tracker, records).await;
        if last.is_empty() {
            let Audited {
                issued, revoked, ..
            } = audited(records);
            eprintln!(
                "invariants hold: {} grants with audited tokens, {} tokens issued, {} revoked",
                issued.len(),
                issued.values().map(BTreeSet::len).sum::<usize>(),
                revoked.len()
            );
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!(
        "seed {seed}: {} invariant violations:\n{}",
        last.len(),
        last.join("\n")
    );
}

async fn violations(f: &Fixture, tracker: &Tracker, records: &[serde_json::Value]) -> Vec<String> {
    let mut wrong = Vec::new();
    let grants: BTreeMap<String, DelegationGrant> = f
        .grants()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|g| (g.name_any(), g))
        .collect();
    let published = Published::read(f).await;
    let Audited {
        issued,
        revoked: audited_revoked,
        refs: audited_refs,
    } = audited(records);
    let jwks = f.jwks().await;
    // The tracker's watches can miss a token minted and revoked while the apiserver was down; its
    // Issued audit line cannot. Where both know the token, they must agree.
    let status_of = |id: &str| -> Result<u8, String> {
        let r = match (tracker.get(id), audited_refs.get(id)) {
            (Some(seen), Some(said)) if seen != *said => {
                return Err(format!(
                    "the audit line of token {id} names {said:?} but the operator recorded {seen:?}"
                ));
            }
            (Some(r), _) => r,
            (None, Some(r)) => r.clone(),
            (None, None) => {
                return Err(format!(
                    "the status reference of token {id} was never seen nor audited"
                ));
            }
        };
        published.status(&r).ok_or_else(|| {
            format!(
                "no published list covers token {id} ({}/{} idx {})",
                published.base_uri, r.serial, r.idx
            )
        })
    };

    for (name, g) in &grants {
        let expected = should_be_ready(name, &grants);
        if is_ready(g) != expected {
            wrong.push(format!(
                "grant {name} is Ready={} but should be {expected}",
                is_ready(g)
            ));
        }
    }

    for (grant, ids) in &issued {
        let live = grants.get(grant).filter(|g| is_ready(g));
        let (current, previous) = match live.and_then(|g| g.status.as_ref()) {
            Some(s) => (
                s.token.as_ref().map(|t| t.id.clone()),
                s.previous_token.as_ref().map(|p| p.id.clone()),
            ),
            None => (None, None),
        };
        for id in ids {
            let status = match status_of(id) {
                Ok(status) => status,
                Err(why) => {
                    wrong.push(format!("grant {grant}: {why}"));
                    continue;
                }
            };
            if Some(id) == current.as_ref() {
                if status != 0 {
                    wrong.push(format!(
                        "the current token {id} of Ready grant {grant} is {status} in the published list, not VALID"
                    ));
                }
            } else if Some(id) != previous.as_ref() && status != 1 {
                wrong.push(format!(
                    "token {id} of grant {grant} ({}) is {status} in the published list, not INVALID",
                    if live.is_some() {
                        "a Ready grant's token that is neither current nor previous"
                    } else {
                        "deleted, suspended or refused"
                    }
                ));
            }
        }
    }
    for id in &audited_revoked {
        match status_of(id) {
            Ok(1) => {}
            Ok(status) => wrong.push(format!(
                "audited revocation {id} is {status} in the published list, not INVALID"
            )),
            Err(why) => wrong.push(format!("audited revocation: {why}")),
        }
    }

    let secrets: Api<Secret> = f.secrets();
    for secret in secrets
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=delegation-operator"))
        .await
        .unwrap()
    {
        let Some(owner) = secret
            .metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.first())
            .cloned()
        else {
            wrong.push(format!("Secret {} has no owner", secret.name_any()));
            continue;
        };
        let Some(grant) = grants
            .get(&owner.name)
            .filter(|g| g.metadata.uid.as_deref() == Some(owner.uid.as_str()))
        else {
            wrong.push(format!(
                "Secret {} outlived its grant {}",
                secret.name_any(),
                owner.name
            ));
            continue;
        };
        let Some(token) = secret.data.as_ref().and_then(|d| d.get("token")) else {
            wrong.push(format!("Secret {} holds no token", secret.name_any()));
            continue;
        };
        let token = String::from_utf8_lossy(&token.0);
        let claims = match signing::verify(&token, &jwks, &grant.spec.audience, 0) {
            Ok(claims) => claims,
            Err(e) => {
                wrong.push(format!("the token of {} does not verify: {e}", owner.name));
                continue;
            }
        };
        let scopes: BTreeSet<&str> = claims["scope"].as_str().unwrap().split(' ').collect();
        let granted: BTreeSet<&str> = grant.spec.scopes.iter().map(String::as_str).collect();
        if !scopes.is_subset(&granted) {
            wrong.push(format!("{} exceeds its scopes", owner.name));
        }
        let ttl = grant.spec.token_ttl.parse().unwrap().as_secs() as i64;
        if claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() > ttl {
            wrong.push(format!("{} outlives its tokenTTL", owner.name));
        }
        let status_id = grant
            .status
            .as_ref()
            .and_then(|s| s.token.as_ref())
            .map(|t| t.id.as_str());
        if status_id != claims["jti"].as_str() {
            wrong.push(format!(
                "the token in {} is not the one its grant's status names",
                secret.name_any()
            ));
        }
    }
    wrong
}

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

fn env_count(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

#[tokio::test]
async fn killing_the_operator_during_churn_never_breaks_revocation() {
    let rounds = env_count("CHAOS_ROUNDS", 4);
    let seed = seed();
    eprintln!("chaos seed {seed} ({rounds} rounds); rerun with CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let mut f = Fixture::start("chaos", &[]).await;
    let tracker = Tracker::start(&f.client, &f.ns, &f.operator_namespace());
    f.apply(AGENTS).await;
    let mut serial = 0;
    let mut records = Vec::new();
    for _ in 0..3 {
        churn(&f, &mut rng, &mut serial).await;
    }
    for round in 0..rounds {
        for _ in 0..(2 + rng.below(4)) {
            churn(&f, &mut rng, &mut serial).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
        let operator = f.operator.take().unwrap();
        records.extend(operator.audit());
        operator.stop(); // SIGKILL: no lease release, no graceful anything
        for _ in 0..rng.below(3) {
            churn(&f, &mut rng, &mut serial).await;
        }
        f.operator = Some(Operator::start(&f.ns, &f.operator_namespace(), &[]));
        if round % 2 == 1 {
            let mut all = records.clone();
            all.extend(f.operator().audit());
            check_invariants(&f, &tracker, &all, seed).await;
        }
    }
    let mut all = records.clone();
    all.extend(f.operator().audit());
    check_invariants(&f, &tracker, &all, seed).await;
}

// ---- restarting etcd and kube-apiserver ------------------------------------------------------------

/// Runs the operator as the kubelet would: started again a second after every exit. Keeps the audit
/// records of every instance and how each one ended.
struct Supervisor {
    state: Arc<Mutex<Supervised>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Supervised {
    current: Operator,
    records: Vec<serde_json::Value>,
    exits: Vec<String>,
}

impl Supervisor {
    fn start(kubeconfig: &Path, ns: &str, operator_ns: &str) -> Self {
        let start = {
            let (kubeconfig, ns, operator_ns) =
                (kubeconfig.to_owned(), ns.to_owned(), operator_ns.to_owned());
            move || Operator::start_with_kubeconfig(&kubeconfig, &ns, &operator_ns, &[])
        };
        let state = Arc::new(Mutex::new(Supervised {
            current: start(),
            records: vec![],
            exits: vec![],
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(250));
                    let exited = state.lock().unwrap().current.exit_status();
                    let Some(status) = exited else { continue };
                    std::thread::sleep(Duration::from_secs(1));
                    let mut s = state.lock().unwrap();
                    let why = last_log_line(&s.current);
                    s.exits.push(format!("{status}: {why}"));
                    let audit = s.current.audit();
                    s.records.extend(audit);
                    s.current = start();
                }
            })
        };
        Self {
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The audit records of every instance so far.
    fn records(&self) -> Vec<serde_json::Value> {
        let s = self.state.lock().unwrap();
        let mut all = s.records.clone();
        all.extend(s.current.audit());
        all
    }

    fn exits(&self) -> Vec<String> {
        self.state.lock().unwrap().exits.clone()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The last line of an operator's log that says why it stopped (errors only: never a token).
fn last_log_line(operator: &Operator) -> String {
    std::fs::read_to_string(&operator.log_path)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| l.contains("ERROR") || l.contains("Error"))
        .map(|l| l.chars().take(300).collect())
        .unwrap_or_else(|| "(no error logged)".into())
}

#[tokio::test]
async fn restarting_the_apiserver_and_etcd_during_churn_never_breaks_revocation() {
    let restarts = env_count("CHAOS_RESTARTS", 1);
    let seed = seed();
    eprintln!(
        "chaos seed {seed} ({restarts} control-plane restarts); rerun with CHAOS_SEED={seed}"
    );
    let mut rng = Rng(seed);
    let cp = PrivateControlPlane::start("chaos");
    cp.install().await;
    let client = cp.client().await;
    let ns = fresh_namespace(&client, "chaos-restart").await;
    create_namespace(&client, &operator_namespace_for(&ns)).await;
    let f = Fixture {
        client: client.clone(),
        ns: ns.clone(),
        operator: None,
    };
    let tracker = Tracker::start(&client, &ns, &f.operator_namespace());
    let supervisor = Supervisor::start(&cp.kubeconfig, &ns, &f.operator_namespace());
    f.apply(AGENTS).await;
    let mut serial = 0;
    for _ in 0..3 {
        churn(&f, &mut rng, &mut serial).await;
    }
    for round in 0..restarts {
        for _ in 0..(2 + rng.below(4)) {
            churn(&f, &mut rng, &mut serial).await;
        }
        // Mid-work: the operator is still reconciling the churn when the control plane goes.
        tokio::time::sleep(Duration::from_millis(rng.below(1000))).await;
        cp.restart().await;
        wait_for(
            "the restarted apiserver answers",
            Duration::from_secs(30),
            || async { f.grants().list(&ListParams::default()).await.ok() },
        )
        .await;
        // Answering is not enforcing: the restarted apiserver loads the admission policies (and the
        // CRD schemas the mutating ones need) a while later, and the churn below relies on them.
        wait_admission_policies_effective(&cp.kubeconfig).await;
        eprintln!(
            "restart {}: operator exits so far: {:?}",
            round + 1,
            supervisor.exits()
        );
        for _ in 0..rng.below(3) {
            churn(&f, &mut rng, &mut serial).await;
        }
        // Whatever the seed chose, revoke something across the restart: a root (its hops lose their
        // parent) is deleted and another grant suspended.
        let roots: Vec<String> = f
            .grants()
            .list(&ListParams::default())
            .await
            .unwrap()
            .iter()
            .filter(|g| g.metadata.deletion_timestamp.is_none())
            .map(|g| g.name_any())
            .filter(|n| n.starts_with("root-"))
            .collect();
        if let Some(victim) = roots.first() {
            let _ = f.grants().delete(victim, &DeleteParams::default()).await;
        }
        if let Some(suspended) = roots.get(1) {
            f.patch_grant(suspended, json!({"spec": {"suspended": true}}))
                .await;
        }
        check_invariants(&f, &tracker, &supervisor.records(), seed).await;
    }
    for _ in 0..3 {
        churn(&f, &mut rng, &mut serial).await;
    }
    check_invariants(&f, &tracker, &supervisor.records(), seed).await;
    eprintln!("operator exits: {:?}", supervisor.exits());
}

//! Chaos: the operator is killed (-9) at random moments while grants are created, deleted and
//! suspended and parents are deleted under their hops — also while it is down. After each restart
//! and at the end the invariants that make revocation trustworthy must hold:
//! - every token of a deleted or refused grant is in the revocation list;
//! - no token Secret outlives its grant;
//! - no token exceeds its grant (scopes, audience, lifetime);
//! - at most one unrevoked token per grant besides the documented previous one.
//!
//! `CHAOS_ROUNDS` sets how many kill/restart rounds run (4 in the test suite, more with `make chaos`).

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use delegation_operator::{api::DelegationGrant, signing};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams},
};
use serde_json::json;
use support::*;

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

/// Every token id the audit trails name, by grant, and every id they say was revoked.
fn audited(
    records: &[serde_json::Value],
) -> (BTreeMap<String, BTreeSet<String>>, BTreeSet<String>) {
    let mut issued: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut revoked = BTreeSet::new();
    for r in records {
        let ids = r["tokenIds"].as_array().cloned().unwrap_or_default();
        let ids = ids.iter().filter_map(|v| v.as_str().map(str::to_owned));
        match r["action"].as_str() {
            Some("Issued" | "Rotated") => issued
                .entry(r["grant"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .extend(ids),
            Some("Revoked") => revoked.extend(ids),
            _ => {}
        }
    }
    (issued, revoked)
}

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

async fn check_invariants(f: &Fixture, records: &[serde_json::Value], seed: u64) {
    let grants = settle(f).await;
    // Let the last revocations and Secret deletes land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grants_now: BTreeMap<String, DelegationGrant> = f
        .grants()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|g| (g.name_any(), g))
        .collect();
    assert_eq!(
        grants.len(),
        grants_now.len(),
        "seed {seed}: grants changed while checking"
    );
    let revoked: BTreeSet<String> = f.revoked_ids().await.into_iter().collect();
    let (issued, audited_revoked) = audited(records);
    let jwks = f.jwks().await;

    for (grant, ids) in &issued {
        let live = grants_now.get(grant);
        let ready = live.is_some_and(|g| {
            g.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c[0].status == "True")
        });
        if !ready {
            for id in ids {
                assert!(
                    revoked.contains(id),
                    "seed {seed}: token {id} of deleted or refused grant {grant} is not revoked"
                );
            }
            continue;
        }
        let status = live.unwrap().status.clone().unwrap();
        let current = status.token.as_ref().unwrap().id.clone();
        let previous = status.previous_token.as_ref().map(|p| p.id.clone());
        let unrevoked: Vec<&String> = ids
            .iter()
            .filter(|id| {
                !revoked.contains(*id) && **id != current && Some(*id) != previous.as_ref()
            })
            .collect();
        assert!(
            unrevoked.is_empty(),
            "seed {seed}: grant {grant} has unrevoked tokens besides the current and previous: {unrevoked:?}"
        );
    }
    for id in &audited_revoked {
        assert!(
            revoked.contains(id),
            "seed {seed}: audited revocation {id} missing from the list"
        );
    }

    let secrets: Api<Secret> = f.secrets();
    for secret in secrets
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=delegation-operator"))
        .await
        .unwrap()
    {
        let owner = secret
            .metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.first())
            .cloned()
            .unwrap();
        let grant = grants_now.get(&owner.name);
        assert!(
            grant.is_some_and(|g| g.metadata.uid.as_deref() == Some(owner.uid.as_str())),
            "seed {seed}: Secret {} outlived its grant {}",
            secret.name_any(),
            owner.name
        );
        let grant = grant.unwrap();
        let token = String::from_utf8(secret.data.as_ref().unwrap()["token"].0.clone()).unwrap();
        let claims = signing::verify(&token, &jwks, &grant.spec.audience, 0).unwrap_or_else(|e| {
            panic!(
                "seed {seed}: the token of {} does not verify: {e}",
                owner.name
            )
        });
        let scopes: BTreeSet<&str> = claims["scope"].as_str().unwrap().split(' ').collect();
        let granted: BTreeSet<&str> = grant.spec.scopes.iter().map(String::as_str).collect();
        assert!(
            scopes.is_subset(&granted),
            "seed {seed}: {} exceeds its scopes",
            owner.name
        );
        let ttl = grant.spec.token_ttl.parse().unwrap().as_secs() as i64;
        assert!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= ttl,
            "seed {seed}: {} outlives its tokenTTL",
            owner.name
        );
        let status_id = grant
            .status
            .as_ref()
            .and_then(|s| s.token.as_ref())
            .map(|t| t.id.as_str());
        assert_eq!(
            status_id,
            claims["jti"].as_str(),
            "seed {seed}: the token in {} is not the one its grant's status names",
            secret.name_any()
        );
    }
}

#[tokio::test]
async fn killing_the_operator_during_churn_never_breaks_revocation() {
    let rounds: u32 = std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4);
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("chaos seed {seed} ({rounds} rounds); rerun with CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let mut f = Fixture::start("chaos", &[]).await;
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
            check_invariants(&f, &all, seed).await;
        }
    }
    let mut all = records.clone();
    all.extend(f.operator().audit());
    check_invariants(&f, &all, seed).await;
}

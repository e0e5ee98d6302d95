//! What each of the operator's caches costs per Ready grant, in heap bytes: `cargo bench --bench
//! cache_footprint` (run by `make bench` beside the RSS figures). Not a test: it asserts nothing and
//! prints JSON.
//!
//! Each cache is filled with `GRANTS` grants (default 10,000; `FOOTPRINT_GRANTS` sets it) as the
//! operator keeps them: a Ready grant and its token Secret as the apiserver serves them (every name,
//! uid, token id and time distinct, as in a cluster), pruned as the watches prune them. The heap is
//! counted by an instrumented allocator: bytes asked for, and allocations (glibc adds 8 bytes to
//! each and rounds up to 16, at least 32: `est_malloc_bytes` adds that).

use std::{alloc::System, collections::HashMap, time::Duration};

use delegation_operator::{
    api::DelegationGrant,
    delegation::record::{HeldToken, TokenRecord},
    endpoints::token::live::LiveCounts,
    operator::{
        caches::{
            context::{SecretTokenIds, key},
            grant_cache::GrantCache,
            index::GrantIndex,
            prune,
            secret_cache::SecretCache,
        },
        grants::alarms::Alarms,
        publishing::status_lists::{SHARDS, TokenRecords},
    },
};
use k8s_openapi::api::core::v1::Secret;
use kube::{api::PartialObjectMeta, runtime::watcher::Event};
use serde_json::{Value, json};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A Ready grant as the apiserver serves it once the operator issued and rotated its token.
fn grant(i: usize) -> DelegationGrant {
    let name = format!("mem-{i:06}");
    serde_json::from_value(json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {
            "creationTimestamp": "2026-12-06T07:08:46Z",
            "finalizers": ["delegation.nhi.dev/revoke-tokens"],
            "generation": 1, "name": name, "namespace": "bench-b03918ca-mem",
            "resourceVersion": format!("{}", 27_927 + i), "uid": uid(i, 0xa),
            "managedFields": [{"manager": "delegation-operator", "operation": "Apply",
                "apiVersion": "delegation.nhi.dev/v1alpha1", "time": "2026-12-06T07:15:10Z",
                "fieldsType": "FieldsV1", "subresource": "status", "fieldsV1": {"f:status": {}}}],
        },
        "spec": {
            "actorRef": {"name": "bench-agent"},
            "audience": "https://tickets.example.com",
            "principal": {"kind": "User", "name": "alice@example.com"},
            "requester": {
                "extra": {"authentication.kubernetes.io/credential-id": [
                    "X509SHA256=bfda441bebd6e17dddcf3f3ce76527b3f5c3a339ff8ce83b8e135fe287b9db22"]},
                "groups": ["system:masters", "system:authenticated"], "uid": "", "username": "admin",
            },
            "scopes": ["tickets:read"], "tokenTTL": "10m",
        },
        "status": {
            "chain": [
                {"kind": "User", "name": "alice@example.com"},
                {"grant": name, "kind": "AgentIdentity", "name": "bench-agent", "requestedBy": "admin",
                 "scopes": ["tickets:read"], "subject": "agent:bench-b03918ca-mem/bench-agent"},
            ],
            "conditions": [{
                "lastTransitionTime": "2026-12-06T07:08:46Z",
                "message": format!("token renewed for agent:bench-b03918ca-mem/bench-agent on behalf of \
                    alice@example.com; expires at 2026-12-06T07:{:02}:10Z, renews at 2026-12-06T07:21:25Z", i % 60),
                "observedGeneration": 1, "reason": "Rotated", "status": "True", "type": "Ready",
            }],
            "effectiveScopes": ["tickets:read"],
            "observedGeneration": 1,
            "previousToken": {"expiresAt": "2026-12-06T07:18:46Z", "id": uid(i, 0xb)},
            "secretName": format!("{name}-token"),
            "token": {
                "claimsDigest": format!("{:064x}", i),
                "expiresAt": "2026-12-06T07:25:10Z", "id": uid(i, 0xc), "issuedAt": "2026-12-06T07:15:10Z",
                "keyID": "18omIB0qfOK4WVNBWR_RERBE-E8JFYrnT8iFyVmtzhA", "renewalTime": "2026-12-06T07:21:25Z",
            },
        },
    }))
    .expect("a valid grant")
}

/// The grant's token Secret as the metadata watch serves it.
fn secret(i: usize) -> PartialObjectMeta<Secret> {
    let name = format!("mem-{i:06}");
    serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {
            "annotations": {"delegation.nhi.dev/expires-at": "2026-12-06T07:25:10Z",
                "delegation.nhi.dev/token-id": uid(i, 0xc)},
            "creationTimestamp": "2026-12-06T07:08:46Z",
            "labels": {"app.kubernetes.io/managed-by": "delegation-operator",
                "delegation.nhi.dev/grant": name, "delegation.nhi.dev/grant-uid": uid(i, 0xa)},
            "name": format!("{name}-token"), "namespace": "bench-b03918ca-mem",
            "ownerReferences": [{"apiVersion": "delegation.nhi.dev/v1alpha1", "controller": true,
                "kind": "DelegationGrant", "name": name, "uid": uid(i, 0xa)}],
            "resourceVersion": format!("{}", 27_926 + i), "uid": uid(i, 0xd),
        },
    }))
    .expect("valid metadata")
}

fn uid(i: usize, kind: u8) -> String {
    format!("{kind:08x}-ad6f-4935-8260-{i:012x}")
}

/// Net heap the closure leaves behind over `n` grants: (bytes, allocations) per grant.
fn per_grant(n: usize, fill: impl FnOnce()) -> Value {
    let region = Region::new(GLOBAL);
    fill();
    let s = region.change();
    let bytes = s.bytes_allocated as f64 - s.bytes_deallocated as f64 + s.bytes_reallocated as f64;
    let allocations = s.allocations as f64 - s.deallocations as f64;
    // glibc: 8 bytes of header, rounded up to 16; on average 8 more per allocation.
    let malloc = bytes + allocations * 16.0;
    json!({
        "bytes": (bytes / n as f64).round(),
        "allocations": (allocations / n as f64 * 10.0).round() / 10.0,
        "est_malloc_bytes": (malloc / n as f64).round(),
    })
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --all-targets` (no `--bench`) a hundred
    // grants only show that it runs.
    let measuring = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("FOOTPRINT_GRANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measuring { 10_000 } else { 100 });
    let grants: Vec<DelegationGrant> = (0..n).map(grant).collect();
    let secrets: Vec<PartialObjectMeta<Secret>> = (0..n).map(secret).collect();
    let mut out = serde_json::Map::new();

    // The grants cache, fed what the grant watch keeps (run.rs).
    let store = GrantCache::default();
    let pruned: Vec<DelegationGrant> = grants
        .iter()
        .map(|g| {
            let mut g = g.clone();
            g.metadata.managed_fields = None;
            prune::grant_finalizers(&mut g);
            g
        })
        .collect();
    out.insert(
        "grants_store".into(),
        per_grant(n, || {
            for g in &pruned {
                store.apply(&Event::Apply(g.clone()));
            }
        }),
    );

    // The worst case for the grants cache: no two grants share a namespace, so none shares a
    // dictionary (each keeps its own JSON beside its packed copy).
    let alone = GrantCache::default();
    out.insert(
        "grants_store_one_per_namespace".into(),
        per_grant(n, || {
            for (i, g) in pruned.iter().enumerate() {
                let mut g = g.clone();
                g.metadata.namespace = Some(format!("bench-alone-{i:06}"));
                alone.apply(&Event::Apply(g));
            }
        }),
    );
    drop(alone);

    let index = GrantIndex::default();
    out.insert(
        "index".into(),
        per_grant(n, || {
            for g in &pruned {
                index.apply(&Event::Apply(g.clone()));
            }
        }),
    );

    // The token Secrets: the compact cache and the token ids kept beside it.
    let cache = SecretCache::default();
    let token_ids = SecretTokenIds::default();
    out.insert(
        "secret_cache".into(),
        per_grant(n, || {
            for s in &secrets {
                let mut s = s.clone();
                let id = s
                    .metadata
                    .annotations
                    .take()
                    .and_then(|mut a| a.remove("delegation.nhi.dev/token-id"));
                prune::secret_owner(&mut s.metadata);
                token_ids.record(
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                    id.as_deref(),
                );
                cache.apply(&Event::Apply(s));
            }
        }),
    );

    // The operator's own memory per grant (Context): token records, trusted Secret versions, the
    // versions its status was written from.
    let mut records: HashMap<u64, TokenRecord> = HashMap::new();
    let mut trusted: HashMap<u64, u64> = HashMap::new();
    let mut written: HashMap<u64, u64> = HashMap::new();
    out.insert(
        "token_records".into(),
        per_grant(n, || {
            for (i, g) in grants.iter().enumerate() {
                let uid = g.metadata.uid.as_deref().unwrap_or_default();
                records.insert(
                    key(uid),
                    TokenRecord::Holds(HeldToken {
                        substance: i as u64,
                        expires_at: 1_796_000_000,
                        approved_by: None,
                        confirmed_for: Some(1),
                    }),
                );
            }
        }),
    );
    out.insert(
        "trusted_secrets_and_status_versions".into(),
        per_grant(n, || {
            for (i, g) in grants.iter().enumerate() {
                trusted.insert(key(&g.metadata.name), i as u64);
                written.insert(key(&g.metadata.uid), i as u64);
            }
        }),
    );

    let alarms = Alarms::default();
    out.insert(
        "alarms".into(),
        per_grant(n, || {
            for (i, g) in grants.iter().enumerate() {
                let name = g.metadata.name.as_deref().unwrap_or_default();
                alarms.set(
                    "bench-b03918ca-mem",
                    name,
                    Duration::from_secs(300 + i as u64),
                );
            }
        }),
    );

    // The status lists' record of each grant's tokens (status_lists::TokenRecords), as the
    // operator holds it between two rotations: the previous token recorded by one flush, the
    // current one by a later flush, in the shard that was open then (the open shard moves on at
    // every flush, so the two are in different shards).
    let mut held = TokenRecords::default();
    out.insert(
        "status_list_records".into(),
        per_grant(n, || {
            for (i, g) in grants.iter().enumerate() {
                let uid = g.metadata.uid.as_deref().unwrap_or_default();
                let (previous, current) = (self::uid(i, 0xb), self::uid(i, 0xc));
                held.record(i % SHARDS, uid, &previous, 1_796_000_000, 1, 2 * i);
                held.record((i + 1) % SHARDS, uid, &current, 1_796_000_300, 1, 2 * i + 1);
            }
        }),
    );
    // The live exchanged-token counts of a replica serving /token (endpoints::token::live): one
    // exchanged token per grant, and the worst case for the default 15-minute exchanged tokens,
    // tokens expiring in each of 16 minutes.
    let mut one = LiveCounts::default();
    out.insert(
        "exchange_counts_one_minute".into(),
        per_grant(n, || {
            for g in &grants {
                let (ns, name, uid) = (
                    g.metadata.namespace.as_deref().unwrap_or_default(),
                    g.metadata.name.as_deref().unwrap_or_default(),
                    g.metadata.uid.as_deref().unwrap_or_default(),
                );
                one.record(ns, name, uid, 1_796_000_300, 1_796_000_000);
            }
        }),
    );
    let mut sixteen = LiveCounts::default();
    out.insert(
        "exchange_counts_sixteen_minutes".into(),
        per_grant(n, || {
            for g in &grants {
                let (ns, name, uid) = (
                    g.metadata.namespace.as_deref().unwrap_or_default(),
                    g.metadata.name.as_deref().unwrap_or_default(),
                    g.metadata.uid.as_deref().unwrap_or_default(),
                );
                for minute in 0..16 {
                    sixteen.record(ns, name, uid, 1_796_000_030 + 60 * minute, 1_796_000_000);
                }
            }
        }),
    );
    assert_eq!((one.tracked(), sixteen.tracked()), (n, n));
    // The token endpoint's DPoP replay cache: one entry per proof accepted in the last minute (per
    // proof, not per grant: `n` proofs of 16 keys and callers, within one minute).
    // Room for 16 more, so that each of the 16 callers' ceil(n / 16) proofs is within its share.
    let mut replay = delegation_operator::dpop::ReplayCache::new(n + 16);
    let callers: Vec<String> = (0..16).map(|c| format!("ns-{c}")).collect();
    let proofs: Vec<delegation_operator::dpop::Proof> = (0..n)
        .map(|i| delegation_operator::dpop::Proof {
            jkt: format!("key-{:02}", i % 16),
            jti: uid(i, 0xd),
            iat: 1_796_000_000 + (i % 60) as i64,
        })
        .collect();
    out.insert(
        "dpop_replay_cache_per_proof".into(),
        per_grant(n, || {
            // 16 callers (namespaces), one per key: each within its share of the cache.
            for (i, proof) in proofs.iter().enumerate() {
                replay
                    .remember(proof, callers[i % 16].as_str(), 1_796_000_000)
                    .expect("room for every proof");
            }
        }),
    );
    assert_eq!(replay.len(), n);
    out.insert("grants".into(), json!(n));
    out.insert("size_of".into(), json!({
        "grant": std::mem::size_of::<DelegationGrant>(),
        "meta": std::mem::size_of::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(),
        "spec": std::mem::size_of::<delegation_operator::api::DelegationGrantSpec>(),
        "status": std::mem::size_of::<delegation_operator::api::DelegationGrantStatus>(),
        "condition": std::mem::size_of::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>(),
        "chain_link": std::mem::size_of::<delegation_operator::api::ChainLink>(),
        "object_ref": std::mem::size_of::<kube::runtime::reflector::ObjectRef<DelegationGrant>>(),
    }));
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    // Keep every cache alive until measured.
    drop((
        store, pruned, index, cache, token_ids, records, trusted, written, alarms, held,
    ));
}

//! The floor of a token exchange (issue #20): `cargo bench --bench exchange_floor` (run by `make
//! bench`). A bare loop that verifies one ES256 access token and signs another with the operator's
//! own code (`signing::verify`, `SigningKey::sign_typed`), no TLS, HTTP or status-list lookup: what
//! the crypto stack allows on this machine, the yardstick an exchange endpoint's rate is a ratio of.
//! Not a test: it asserts nothing about speed and prints JSON.
//!
//! The subject token is shaped as the operator mints them (`AccessTokenClaims`): three hops in its
//! `delegation_chain`, three nested actors in `act`, a status-list entry. Each exchange verifies it
//! against the JWKS (signature, `typ`, `kid`, `aud`, `exp`, `nbf`) and signs a fresh token of the same
//! shape (new `jti` and times). Measured on 1 thread and on 2 (std threads sharing the key and the
//! JWKS), and verify alone and sign alone on 1 thread, each for `FLOOR_SECONDS` (default 3) after a
//! warm-up of a second.
//!
//! Measured on the 2-core machine while idle, 2026-12-06:
//! - before, RustCrypto's `p256` through jsonwebtoken (commit 78e059a, two runs): 1,479 and 1,605
//!   exchanges/s on 1 thread, 3,077 and 3,061 on 2; verify 333 µs, sign 283–286 µs (a p256 sign is
//!   ~100 µs, but jsonwebtoken parses the PKCS#8 key, deriving its public point, for every token).
//!   A p256 build with this token shape (2,225 bytes, as since 950eff5), run between the ring
//!   runs below (16:02): 1,545 and 2,975; verify 337 µs, sign 291 µs.
//! - after, ES256 on `ring`, its key pair parsed once per key (commit 56a9bd2; three runs at 16:02
//!   and 16:14 UTC, 97% idle, load average 2.6 to 2.0): 10,163, 10,328 and 10,374 on 1 thread;
//!   19,862, 19,595 and 19,581 on 2; verify 70–73 µs, sign 24–25 µs (ring alone: ~55 and ~18 µs;
//!   the rest is base64, JSON and the claims checks).
//!
//! With the machine busy building, about 1,000/s before and 4,000–10,000/s after.

use std::{
    hint::black_box,
    sync::Barrier,
    time::{Duration, Instant},
};

use delegation_operator::{
    delegation::claims::{
        AccessTokenClaims, DelegationRecord, GrantReference, Party, Workload, nest_actors,
    },
    signing::{self, Algorithm, Keyring, SigningKey},
};
use serde_json::{Value, json};

const AUDIENCE: &str = "https://tickets.example.com";
const NAMESPACE: &str = "payments";

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// A token of a three-hop chain: alice -> refund-bot -> ledger-agent -> audit-agent.
fn claims(jti: u64, iat: i64) -> AccessTokenClaims {
    let agents = ["refund-bot", "ledger-agent", "audit-agent"]
        .map(|name| format!("agent:{NAMESPACE}/{name}"));
    let record = |i: usize, delegator: Party| DelegationRecord {
        delegator,
        delegate: agents[i].clone(),
        grant: format!("grant-{}", &agents[i][agents[i].find('/').unwrap() + 1..]),
        scope: "tickets:read tickets:comment".into(),
        requested_by: Some("alice@example.com".into()),
        approved_by: (i == 1).then(|| "carol@example.com".into()),
        // The last hop as a token exchange makes it: the pod that proved possession.
        workload: (i == 2).then(|| Workload {
            service_account: format!("system:serviceaccount:{NAMESPACE}:audit-agent"),
            pod: "audit-agent-6b8f9c7d5-x2x9q".into(),
            pod_uid: "0f5a3c1e-8d2b-4f6a-9c7e-1b3d5f7a9c2e".into(),
        }),
    };
    AccessTokenClaims {
        iss: "https://delegation-operator.delegation-system.svc".into(),
        sub: "user:alice@example.com".into(),
        aud: AUDIENCE.into(),
        client_id: agents[2].clone(),
        scope: "tickets:read tickets:comment".into(),
        iat,
        nbf: iat,
        exp: iat + 600,
        jti: format!("00000000-0000-4000-8000-{jti:012x}"),
        act: nest_actors(&agents).unwrap(),
        authorization_details: None,
        delegation_chain: vec![
            record(
                0,
                Party {
                    kind: "User".into(),
                    sub: "alice@example.com".into(),
                },
            ),
            record(
                1,
                Party {
                    kind: "AgentIdentity".into(),
                    sub: agents[0].clone(),
                },
            ),
            record(
                2,
                Party {
                    kind: "AgentIdentity".into(),
                    sub: agents[1].clone(),
                },
            ),
        ],
        grant: GrantReference {
            namespace: NAMESPACE.into(),
            name: "grant-audit-agent".into(),
            uid: "6f1c2b0e-3d4a-4e5f-8a9b-0c1d2e3f4a5b".into(),
        },
        status: Some(json!({"status_list": {
            "idx": 4712,
            "uri": "https://delegation-operator.delegation-system.svc/statuslists/payments/3",
        }})),
        lineage: Some(delegation_operator::status_list::LineageEntries {
            first: 4713,
            count: 7,
        }),
        cnf: None,
        delivery: None,
    }
}

struct Setup {
    key: SigningKey,
    jwks: Value,
    subject: String,
    template: AccessTokenClaims,
}

impl Setup {
    fn new() -> Self {
        let key = SigningKey::generate(Algorithm::ES256, now()).unwrap();
        let jwks = Keyring::new(key.clone()).jwks();
        let template = claims(0, now());
        let subject = key.sign_typed(&template, "at+jwt").unwrap();
        Self {
            key,
            jwks,
            subject,
            template,
        }
    }

    fn verify(&self) -> Value {
        signing::verify(black_box(&self.subject), &self.jwks, AUDIENCE, 60).unwrap()
    }

    /// A fresh token of the same shape: its own `jti` and times.
    fn sign(&self, n: u64) -> String {
        let mut claims = self.template.clone();
        claims.jti = format!("00000000-0000-4000-8000-{n:012x}");
        claims.iat = now();
        (claims.nbf, claims.exp) = (claims.iat, claims.iat + 600);
        self.key.sign_typed(black_box(&claims), "at+jwt").unwrap()
    }

    fn exchange(&self, n: u64) -> String {
        let subject = self.verify();
        debug_assert_eq!(subject["aud"], AUDIENCE);
        self.sign(n)
    }
}

/// Runs `op` on `threads` threads for `warm_up`, then for `measure`; operations per second over the
/// measured part (every thread stops at the same deadline).
fn rate(threads: usize, warm_up: Duration, measure: Duration, op: &(dyn Fn(u64) + Sync)) -> f64 {
    let start = Barrier::new(threads + 1);
    let counts: Vec<(u64, Duration)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    let mut n = (t as u64) << 40;
                    start.wait();
                    let warm = Instant::now() + warm_up;
                    while Instant::now() < warm {
                        op(n);
                        n += 1;
                    }
                    let t0 = Instant::now();
                    let deadline = t0 + measure;
                    let mut done = 0;
                    while Instant::now() < deadline {
                        op(n);
                        n += 1;
                        done += 1;
                    }
                    (done, t0.elapsed())
                })
            })
            .collect();
        start.wait();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    counts
        .iter()
        .map(|&(done, elapsed)| done as f64 / elapsed.as_secs_f64())
        .sum()
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --all-targets` (no `--bench`) a few
    // milliseconds each only show that it runs.
    let measuring = std::env::args().any(|a| a == "--bench");
    let seconds: f64 = std::env::var("FLOOR_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let (warm_up, measure) = if measuring {
        (Duration::from_secs(1), Duration::from_secs_f64(seconds))
    } else {
        (Duration::ZERO, Duration::from_millis(20))
    };

    let setup = Setup::new();
    // The round trip holds: the fresh token verifies as the subject token does.
    let fresh = setup.sign(1);
    let verified = signing::verify(&fresh, &setup.jwks, AUDIENCE, 60).unwrap();
    assert_eq!(
        verified["delegation_chain"].as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(
        verified["act"]["act"]["act"]["sub"],
        "agent:payments/refund-bot"
    );
    eprintln!(
        "exchange_floor: subject token {} bytes, fresh token {} bytes",
        setup.subject.len(),
        fresh.len()
    );

    let verify_per_s = rate(1, warm_up, measure, &|_| {
        black_box(setup.verify());
    });
    let sign_per_s = rate(1, warm_up, measure, &|n| {
        black_box(setup.sign(n));
    });
    let exchange = |n| {
        black_box(setup.exchange(n));
    };
    let threads_1 = rate(1, warm_up, measure, &exchange);
    let threads_2 = rate(2, warm_up, measure, &exchange);

    let out = json!({"exchange_floor": {
        "threads_1_per_s": threads_1.round(),
        "threads_2_per_s": threads_2.round(),
        "verify_us": (1e7 / verify_per_s).round() / 10.0,
        "sign_us": (1e7 / sign_per_s).round() / 10.0,
    }});
    println!("{out}");
}

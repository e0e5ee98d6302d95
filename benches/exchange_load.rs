//! A load generator for the token endpoint (`POST <issuer>/token`): `cargo bench --bench
//! exchange_load`, driven by `hack/bench.py` (section `exchange`). Not a test: it asserts nothing and
//! prints JSON.
//!
//! `EXCHANGE_CONNECTIONS` workers (default 16) each send exchanges back to back over a keep-alive
//! HTTPS connection (kube's client: hyper and rustls, the CA of `EXCHANGE_CA` its only root), for
//! `EXCHANGE_SECONDS` (default 20) after `EXCHANGE_WARMUP_SECONDS` (default 3) not counted. Worker
//! `i` uses request `i mod n` of `EXCHANGE_REQUESTS`: a JSON array of `{"subject": <token>, "actor":
//! <pod-bound ServiceAccount token>, "scope": <scopes>}`. Prints the rate, latency percentiles, the
//! answers by HTTP status, and the CPU seconds the generator itself used (it shares the machine with
//! the server). With `EXCHANGE_DPOP=1` each worker has a key of its own (ES256) and sends a fresh
//! DPoP proof (RFC 9449) with every exchange, so every token it gets is bound to its key: the cost
//! of a DPoP-checked exchange against an unbound one. The proofs are signed before the run
//! (`EXCHANGE_DPOP_PROOFS` per worker, default 40,000; each is used once, well within its minute),
//! so that the generator's signing does not take the server's CPU while it is measured; a worker that
//! runs out signs the rest as it goes.

use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The form body of one exchange.
fn body(request: &Value) -> Vec<u8> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", GRANT_TYPE)
        .append_pair(
            "subject_token",
            request["subject"].as_str().unwrap_or_default(),
        )
        .append_pair("subject_token_type", ACCESS_TOKEN)
        .append_pair("actor_token", request["actor"].as_str().unwrap_or_default())
        .append_pair("actor_token_type", JWT);
    if let Some(scope) = request["scope"].as_str() {
        form.append_pair("scope", scope);
    }
    form.finish().into_bytes()
}

/// CPU seconds (user + system) this process has used.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, in clock ticks (100 a second on Linux).
    (ticks(11) + ticks(12)) / 100.0
}

struct Worker {
    latencies: Vec<Duration>,
    by_status: std::collections::BTreeMap<u16, u64>,
}

/// A fresh DPoP proof by `key` for a POST to `htu`.
fn proof(key: &delegation_operator::signing::SigningKey, htu: &str) -> String {
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    key.sign_proof(
        &json!({"jti": uuid::Uuid::new_v4().to_string(), "htm": "POST", "htu": htu, "iat": iat}),
    )
    .expect("a proof")
}

/// A worker's DPoP key, where its proofs go, and the proofs signed ahead.
struct Prover {
    key: delegation_operator::signing::SigningKey,
    htu: String,
    ahead: Vec<String>,
}

impl Prover {
    fn new(htu: String, ahead: usize) -> Self {
        let key = delegation_operator::signing::SigningKey::generate(
            delegation_operator::signing::Algorithm::ES256,
            0,
        )
        .expect("a key");
        let ahead = (0..ahead).map(|_| proof(&key, &htu)).collect();
        Self { key, htu, ahead }
    }

    fn next(&mut self) -> String {
        self.ahead
            .pop()
            .unwrap_or_else(|| proof(&self.key, &self.htu))
    }
}

async fn work(
    client: kube::Client,
    path: String,
    body: Vec<u8>,
    mut dpop: Option<Prover>,
    measure_from: Instant,
    until: Instant,
) -> Worker {
    let mut worker = Worker {
        latencies: Vec::new(),
        by_status: Default::default(),
    };
    loop {
        let started = Instant::now();
        if started >= until {
            return worker;
        }
        let mut request = http::Request::post(&path).header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        );
        if let Some(prover) = &mut dpop {
            request = request.header("DPoP", prover.next());
        }
        let request = request.body(body.clone()).expect("a request");
        let status = match client.request_text(request).await {
            Ok(_) => 200,
            Err(kube::Error::Api(status)) => status.code,
            Err(_) => 0,
        };
        if started >= measure_from {
            worker.latencies.push(started.elapsed());
            *worker.by_status.entry(status).or_default() += 1;
        }
    }
}

fn main() {
    // `cargo test --all-targets` runs every bench once too; without an endpoint there is no load.
    let Ok(issuer) = std::env::var("EXCHANGE_ISSUER") else {
        eprintln!(
            "exchange_load: EXCHANGE_ISSUER is not set (hack/bench.py sets it); nothing to load"
        );
        return;
    };
    let ca = std::fs::read_to_string(std::env::var("EXCHANGE_CA").expect("EXCHANGE_CA"))
        .expect("the CA file");
    let requests: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(std::env::var("EXCHANGE_REQUESTS").expect("EXCHANGE_REQUESTS"))
            .expect("the requests file"),
    )
    .expect("a JSON array of requests");
    assert!(!requests.is_empty(), "no requests");
    let connections: usize = env_or("EXCHANGE_CONNECTIONS", 16);
    let seconds: f64 = env_or("EXCHANGE_SECONDS", 20.0);
    let warmup: f64 = env_or("EXCHANGE_WARMUP_SECONDS", 3.0);
    let threads: usize = env_or("EXCHANGE_THREADS", 1);
    let dpop = env_or("EXCHANGE_DPOP", 0) == 1;
    let proofs_ahead: usize = env_or("EXCHANGE_DPOP_PROOFS", 40_000);

    let origin_end = issuer[8..].find('/').map_or(issuer.len(), |i| i + 8);
    let (origin, base_path) = issuer.split_at(origin_end);
    let path = format!("{}/token", base_path.trim_end_matches('/'));
    let mut config = kube::Config::new(origin.parse().expect("the issuer's origin"));
    config.root_cert = Some(
        rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes())
            .map(|c| c.expect("a PEM certificate").to_vec())
            .collect(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("a runtime");
    // Signed before the clock starts (each worker's own key).
    let htu = format!("{}/token", issuer.trim_end_matches('/'));
    let mut provers: Vec<Option<Prover>> = (0..connections)
        .map(|_| dpop.then(|| Prover::new(htu.clone(), proofs_ahead)))
        .collect();
    let (workers, elapsed, cpu) = runtime.block_on(async {
        let client = kube::Client::try_from(config).expect("a client");
        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(warmup);
        let until = measure_from + Duration::from_secs_f64(seconds);
        let handles: Vec<_> = (0..connections)
            .map(|i| {
                let body = body(&requests[i % requests.len()]);
                tokio::spawn(work(
                    client.clone(),
                    path.clone(),
                    body,
                    provers[i].take(),
                    measure_from,
                    until,
                ))
            })
            .collect();
        tokio::time::sleep_until(measure_from.into()).await;
        let cpu_at_start = own_cpu_seconds();
        let mut workers = Vec::new();
        for handle in handles {
            workers.push(handle.await.expect("a worker"));
        }
        let elapsed = measure_from.elapsed().as_secs_f64();
        (workers, elapsed, own_cpu_seconds() - cpu_at_start)
    });
    let mut latencies: Vec<Duration> = workers
        .iter()
        .flat_map(|w| w.latencies.iter().copied())
        .collect();
    latencies.sort();
    let mut by_status = std::collections::BTreeMap::<String, u64>::new();
    for worker in &workers {
        for (status, n) in &worker.by_status {
            *by_status.entry(status.to_string()).or_default() += n;
        }
    }
    let ok = by_status.get("200").copied().unwrap_or(0);
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{}",
        json!({"exchange_load": {
            "connections": connections,
            "dpop": dpop,
            "seconds": (elapsed * 10.0).round() / 10.0,
            "exchanges_per_s": (ok as f64 / elapsed).round(),
            "p50_ms": (at(0.50) * 100.0).round() / 100.0,
            "p99_ms": (at(0.99) * 100.0).round() / 100.0,
            "max_ms": (latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0) * 100.0).round() / 100.0,
            "answers_by_status": by_status,
            "generator_cpu_s": (cpu * 100.0).round() / 100.0,
        }})
    );
}

//! No amplification: a flood of junk Bearer tokens at `/introspect` and `/metrics` becomes a bounded
//! number of apiserver reviews (the rest are answered 429, or 401 from the negative cache), and while
//! a flood runs the leader keeps renewing its Lease and revoking deleted grants' tokens. Against the
//! real apiserver, with the operator's real HTTPS listener.

mod support;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    rbac::v1::{ClusterRoleBinding, PolicyRule, RoleRef},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use support::*;

const LEASE: &str = "delegation-operator-leader";

fn grant(name: &str) -> String {
    format!(
        "apiVersion: delegation.nhi.dev/v1alpha1\nkind: DelegationGrant\nmetadata: {{name: {name}}}\nspec:\n  principal: {{kind: User, name: alice@example.com}}\n  actorRef: {{name: notifier}}\n  scopes: [tickets:read]\n  audience: https://tickets.example.com\n  tokenTTL: 10m\n"
    )
}

/// The operator's HTTPS listener as a client sees it, trusting only the serving certificate's CA.
struct Https {
    client: Client,
    /// A ServiceAccount token allowed `get` on `/metrics` (bound to `system:monitoring`).
    metrics_bearer: String,
    binding: String,
}

/// What one request got: its status and, for a 429, its `Retry-After` in seconds.
#[derive(Clone, Copy, Debug)]
struct Answer {
    status: u16,
    retry_after: Option<u64>,
}

impl Https {
    async fn connect(f: &Fixture, port: u16) -> Self {
        let secret = f.serving_certificate().await;
        let ca = CertificateDer::from_pem_slice(&secret.data.unwrap()["ca.crt"].0).unwrap();
        let mut config = kube::Config::new(format!("https://127.0.0.1:{port}").parse().unwrap());
        config.root_cert = Some(vec![ca.to_vec()]);
        // Every answer as the server gave it: kube's client would retry 429s itself.
        config.default_retry = false;
        let client = Client::try_from(config).unwrap();

        // Prometheus' part: a ServiceAccount token whose identity may `get` /metrics.
        ensure_service_account(&f.client, &f.ns, "prometheus").await;
        let binding = format!("{}-metrics", f.ns);
        let subject = service_account_subject(&f.ns, "prometheus");
        let crb = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(binding.clone()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: "system:monitoring".into(),
            },
            subjects: Some(vec![subject.clone()]),
        };
        Api::<ClusterRoleBinding>::all(f.client.clone())
            .patch(
                &binding,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&crb),
            )
            .await
            .unwrap();
        let reader = PolicyRule {
            non_resource_urls: Some(vec!["/metrics".into()]),
            verbs: vec!["get".into()],
            ..Default::default()
        };
        wait_allowed(&f.client, "", &subject, &reader).await;
        let metrics_bearer =
            request_service_account_token(&f.client, &f.ns, "prometheus", None).await;
        let https = Self {
            client,
            metrics_bearer,
            binding,
        };
        wait_for(
            "the endpoints to serve /metrics to Prometheus",
            Duration::from_secs(30),
            || async { https.metrics().await.ok() },
        )
        .await;
        https
    }

    async fn metrics(&self) -> Result<String, kube::Error> {
        let request = http::Request::get("/metrics")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.metrics_bearer),
            )
            .body(Vec::new())
            .unwrap();
        self.client.request_text(request).await
    }

    /// `/metrics`, once it answers: Prometheus' requests come from the flood's address (127.0.0.1)
    /// and, when its cached acceptance has expired, wait for that address's bucket like any other.
    async fn metrics_text(&self) -> String {
        wait_for("/metrics to answer", Duration::from_secs(30), || async {
            self.metrics().await.ok()
        })
        .await
    }

    /// The sum of the counter series of `family` whose labels contain every one of `labels`.
    async fn counter(&self, family: &str, labels: &[&str]) -> u64 {
        let text = self.metrics_text().await;
        assert!(
            text.contains(&format!("# TYPE {family} counter")),
            "the operator has no counter {family}"
        );
        text.lines()
            .filter(|l| l.starts_with(&format!("{family}_total{{")))
            .filter(|l| labels.iter().all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// TokenReviews the operator sent the apiserver and it refused (junk tokens are refused).
    async fn refused_token_reviews(&self) -> u64 {
        self.counter(
            "delegation_caller_reviews",
            &["review=\"TokenReview\"", "answer=\"refused\""],
        )
        .await
    }

    /// One request with a junk Bearer token: `n` even to `/introspect`, odd to `/metrics`.
    async fn junk_request(&self, n: usize, token: &str) -> Answer {
        let builder = if n.is_multiple_of(2) {
            http::Request::post("/introspect")
                .header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(kube::client::Body::from(b"token=anything".to_vec()))
        } else {
            http::Request::get("/metrics").body(kube::client::Body::from(Vec::new()))
        };
        let mut request = builder.unwrap();
        request.headers_mut().insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        let response = self.client.send(request).await.expect("a response");
        Answer {
            status: response.status().as_u16(),
            retry_after: response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse().ok()),
        }
    }

    /// `count` junk requests, `at_once` in flight, with `token(n)` as the n-th one's Bearer token.
    async fn flood(
        &self,
        count: usize,
        at_once: usize,
        token: impl Fn(usize) -> String,
    ) -> Vec<Answer> {
        futures::stream::iter(0..count)
            .map(|n| {
                let token = token(n);
                async move { self.junk_request(n, &token).await }
            })
            .buffer_unordered(at_once)
            .collect()
            .await
    }
}

impl Drop for Https {
    fn drop(&mut self) {
        let name = self.binding.clone();
        // Best effort, on a runtime of its own: the test's runtime is blocked right here.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let _ = Api::<ClusterRoleBinding>::all(client().await)
                    .delete(&name, &DeleteParams::default())
                    .await;
            });
        })
        .join()
        .ok();
    }
}

/// A junk token, different for every `n` (so that no cached answer helps), never a real one.
fn junk(n: usize) -> String {
    format!("junk.{}.{n}", uuid::Uuid::new_v4().simple())
}

async fn start(extra_args: &[&str]) -> (Fixture, Https) {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut args = vec!["--https-address", address.as_str()];
    args.extend(extra_args);
    let f = Fixture::start("flood", &args).await;
    let https = Https::connect(&f, port).await;
    (f, https)
}

fn count(answers: &[Answer], status: u16) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

/// At most `burst` plus `rate` for every second (begun) of `elapsed`: what one source's bucket
/// can give in that time.
fn bucket_bound(burst: u64, rate: u64, elapsed: Duration) -> u64 {
    burst + rate * elapsed.as_secs_f64().ceil() as u64
}

/// 400 requests with junk tokens cost the apiserver what one address's bucket allows (here 10 at
/// once, then 1 a second), not 400 TokenReviews; the rest are answered 429 with `Retry-After`. One
/// junk token sent again and again is reviewed once per negative-cache period, answered 401 from
/// the cache in between.
#[tokio::test]
async fn a_flood_of_junk_tokens_costs_a_bounded_number_of_token_reviews() {
    let (f, https) = start(&["--caller-rate", "1", "--caller-burst", "10"]).await;

    // The same junk token: one review, then 401s from the cache (one more review per 5 s begun).
    let before = https.refused_token_reviews().await;
    let started = Instant::now();
    assert_eq!(https.junk_request(0, "junk.same").await.status, 401);
    let repeated = https.flood(100, 4, |_| "junk.same".to_owned()).await;
    let elapsed = started.elapsed();
    assert_eq!(count(&repeated, 401), 100, "{repeated:?}");
    let reviews = https.refused_token_reviews().await - before;
    let periods = (elapsed.as_secs_f64() / 5.0).ceil() as u64;
    assert!(
        reviews <= 1 + periods * 4,
        "one junk token sent 101 times cost {reviews} TokenReviews in {elapsed:?}"
    );

    // 400 different junk tokens, 32 at once, half to /introspect and half to /metrics.
    let before = https.refused_token_reviews().await;
    let started = Instant::now();
    let answers = https.flood(400, 32, junk).await;
    let elapsed = started.elapsed();
    let reviews = https.refused_token_reviews().await - before;
    let bound = bucket_bound(10, 1, elapsed);
    eprintln!(
        "400 junk requests in {elapsed:?}: {reviews} TokenReviews (bound {bound}), {} × 401, {} × 429",
        count(&answers, 401),
        count(&answers, 429)
    );
    assert!(
        reviews <= bound,
        "400 junk requests cost {reviews} TokenReviews in {elapsed:?}; one address may cost {bound}"
    );
    assert_eq!(
        count(&answers, 401) + count(&answers, 429),
        400,
        "only 401 or 429: {answers:?}"
    );
    assert!(
        count(&answers, 429) as u64 >= 400u64.saturating_sub(bound),
        "what was not reviewed was refused with 429"
    );
    assert!(
        answers
            .iter()
            .filter(|a| a.status == 429)
            .all(|a| a.retry_after.is_some_and(|s| s >= 1)),
        "every 429 says when to retry"
    );
    for path in ["/introspect", "/metrics"] {
        let limited = https
            .counter(
                "delegation_rate_limited_requests",
                &[&format!("path=\"{path}\"")],
            )
            .await;
        assert!(limited > 0, "429s at {path} are counted");
    }
    drop(f);
}

/// While junk tokens flood both endpoints, deleted grants' tokens become INVALID in the published
/// status list and the leader keeps renewing its Lease (it never loses it). No timing is asserted:
/// the figures are printed for the record.
#[tokio::test]
async fn revocations_and_lease_renewals_go_on_during_a_flood() {
    let (f, https) = start(&[]).await;
    let https = Arc::new(https);
    f.apply(NOTIFIER_AGENT).await;
    let names: Vec<String> = (0..10).map(|i| format!("g{i}")).collect();
    for name in &names {
        f.apply(&grant(name)).await;
    }
    let mut statuses = Vec::new();
    for name in &names {
        f.wait_ready(name, "True", None).await;
        let claims = f.verified_claims(&format!("{name}-token")).await.unwrap();
        assert_eq!(f.published_status(&claims["status"]).await, 0);
        statuses.push(claims["status"].clone());
    }
    let leases: Api<Lease> = Api::namespaced(f.client.clone(), &f.operator_namespace());
    let leader = holder(&leases.get(LEASE).await.unwrap()).expect("a leader");

    // The flood: different junk tokens, 64 in flight, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let reviews_before = https.refused_token_reviews().await;
    let flood_started = Instant::now();
    let flood = spawn_flood(https.clone(), stop.clone(), sent.clone(), limited.clone());
    wait_for("the flood to be under way", Duration::from_secs(30), || {
        let limited = limited.clone();
        async move { (limited.load(Ordering::Relaxed) >= 100).then_some(()) }
    })
    .await;

    // Revoke under the flood: every deleted grant's token turns INVALID in the published list.
    let deleted = Instant::now();
    for name in &names {
        f.grants()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    let mut revoked_after = Vec::new();
    for status in &statuses {
        wait_for(
            "a deleted grant's token to be INVALID in the published status list",
            Duration::from_secs(60),
            || async { (f.published_status(status).await == 1).then_some(()) },
        )
        .await;
        revoked_after.push(deleted.elapsed());
    }

    // And the Lease: renewed again and again by the same holder while the flood goes on.
    let mut renewals = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while renewals.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "no three Lease renewals in 60 s of flood: {renewals:?}"
        );
        let lease = leases.get(LEASE).await.unwrap();
        assert_eq!(
            holder(&lease).as_deref(),
            Some(leader.as_str()),
            "the leader kept its Lease"
        );
        if let Some(renewed) = lease.spec.and_then(|s| s.renew_time) {
            renewals.insert(renewed.0);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    flood.await.unwrap();
    let flooded = flood_started.elapsed();
    let reviews = https.refused_token_reviews().await - reviews_before;

    assert!(
        !f.operator().raw_output().contains("lost the leader lease"),
        "the leader never lost its Lease"
    );
    let metrics = https.metrics_text().await;
    assert!(metrics.contains("delegation_leader 1"), "still leading");
    // The defaults bound the flood: 20 at once, then 2 a second, from this one address.
    let bound = bucket_bound(20, 2, flooded);
    assert!(
        reviews <= bound,
        "{reviews} TokenReviews in {flooded:?} of flood; one address may cost {bound}"
    );
    revoked_after.sort();
    eprintln!(
        "flood: {} requests ({} × 429) in {flooded:?}, {reviews} TokenReviews; \
         revocations INVALID after {:?} (first) .. {:?} (last, of {}); {} Lease renewals seen",
        sent.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
        revoked_after[0],
        revoked_after[revoked_after.len() - 1],
        revoked_after.len(),
        renewals.len(),
    );
}

/// Different junk tokens at both endpoints, 64 in flight, until `stop`; counts what was sent and
/// what was answered 429.
fn spawn_flood(
    https: Arc<Https>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    limited: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        futures::stream::iter(0..)
            .take_while(|_| std::future::ready(!stop.load(Ordering::Relaxed)))
            .map(|n| {
                let https = https.clone();
                async move { https.junk_request(n, &junk(n)).await }
            })
            .buffer_unordered(64)
            .for_each(|answer| {
                sent.fetch_add(1, Ordering::Relaxed);
                if answer.status == 429 {
                    limited.fetch_add(1, Ordering::Relaxed);
                }
                std::future::ready(())
            })
            .await;
    })
}

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.holder_identity.clone()
}

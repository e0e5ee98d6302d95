//! The operator's HTTPS listener: what resource servers and the Kubernetes apiserver use to verify
//! tokens, and what Prometheus and the kubelet probe. One listener, TLS only, on every replica.
//!
//! It runs in one of three shapes ([`EndpointSettings::verification`]): inside `run`, serving
//! everything (one process, for development and small installs); inside `run
//! --verification-endpoints=false`, serving only probes and metrics (the controller of the chart,
//! which holds the signing keys and Secret rights and so serves nothing else to the network); and as
//! `delegation-operator serve`, the verification server, which serves everything from ConfigMaps and
//! mounted files under an identity that may read no Secret.
//!
//! Paths below the issuer URL's own path (so the issuer and every URL in discovery agree):
//! - `/.well-known/openid-configuration` — discovery (OIDC Discovery 1.0 / RFC 8414 fields);
//! - `/.well-known/jwks.json` — the public keys (`application/jwk-set+json`, cached 15 s at most);
//! - `/statuslists/<id>/<n>` — a Token Status List (`application/statuslist+jwt`);
//! - `/introspect` — RFC 7662 (see [`introspect`]);
//! - `/token` — RFC 8693 token exchange (see [`token`]), where the process may sign: `run`, not
//!   `serve`.
//!
//! At the root: `/metrics` (Prometheus text format), `/healthz`, `/readyz`.
//!
//! `/introspect` and `/metrics` ask the apiserver about their callers; [`reviews`] keeps a flood of
//! them from becoming apiserver load or delaying the operator's own writes.

pub mod introspect;
pub mod limits;
pub mod published;
pub mod reviews;
pub mod tls;
pub mod token;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{
    Extension, Form, Json, Router,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use kube::Client;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::Layer;

use crate::operator::{Error, Readiness, Result};
use crate::signing::Algorithm;
use published::{JwksSource, Published};
use reviews::{Refusal, ReviewSettings, Reviews};
use tls::{ServingCert, TlsSource};

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct EndpointSettings {
    pub address: SocketAddr,
    /// The `iss` of every token; the endpoints live under it.
    pub issuer: String,
    pub operator_namespace: String,
    pub tls: TlsSource,
    /// Serve discovery, JWKS, status lists and introspection, with the JWKS from this source; `None`
    /// serves only `/metrics`, `/healthz` and `/readyz`.
    pub verification: Option<JwksSource>,
    /// The algorithm the operator's keys are generated with (`--algorithm`); discovery advertises it.
    pub algorithm: Algorithm,
    /// The limits on apiserver reviews made for callers.
    pub reviews: ReviewSettings,
    /// Serve `POST <issuer>/token` (RFC 8693 token exchange) beside the verification routes. Only a
    /// process that may read the signing keys Secret can: `run`, never `serve`.
    pub exchange: Option<token::ExchangeSettings>,
}

pub const JWKS_PATH: &str = "/.well-known/jwks.json";
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
pub const INTROSPECTION_PATH: &str = "/introspect";
pub const STATUS_LISTS_PATH: &str = "/statuslists";
/// How long verifiers may cache the JWKS: below go-oidc's 30 s refetch window and well below the time
/// a pre-published key waits before it signs.
const JWKS_MAX_AGE_SECS: u32 = 15;
/// A TLS handshake that has not finished by then is dropped (slow clients hold no listener slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to send a request's headers (also between keep-alive requests).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog. The same process mints tokens and
/// renews the leader lease: a flood of clients must not starve it of memory or descriptors.
const MAX_CONNECTIONS: usize = 1024;
/// No request is worth holding a connection longer (introspection asks the apiserver twice).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Introspection bodies are small forms; refuse anything bigger before reading it.
const MAX_BODY_BYTES: usize = 64 * 1024;

struct AppState {
    reviews: Reviews,
    issuer: String,
    algorithm: Algorithm,
    published: Arc<Published>,
    cert: Arc<ServingCert>,
    readiness: Arc<Readiness>,
    /// Whether the verification routes are served (and so the JWKS must be loaded to be ready).
    verifies: bool,
    /// The token endpoint, where served.
    exchange: Option<Arc<token::Exchange>>,
}

/// Binds the listener and loads the serving certificate (failing at once if either is impossible),
/// then serves until the process stops. `review_client` makes the apiserver reviews of callers: give
/// it a `Client` of its own, so that they never share a connection pool with the operator's writes.
/// Also returns the token endpoint, where served, to withdraw its counts when the process stops.
pub async fn start(
    client: Client,
    review_client: Client,
    settings: EndpointSettings,
    readiness: Arc<Readiness>,
) -> Result<(impl Future<Output = ()>, Option<Arc<token::Exchange>>)> {
    let cert = Arc::new(ServingCert::default());
    tls::load(&client, &settings.tls, &cert).await?;
    let client_for_tls = client.clone();
    let listener = TcpListener::bind(settings.address).await.map_err(|e| {
        Error::InvalidState(format!(
            "could not listen on {} (--https-address): {e}",
            settings.address
        ))
    })?;
    let published = Arc::new(Published::default());
    let verifies = settings.verification.is_some();
    let (exchange, exchange_watches) = match settings.exchange.clone().filter(|_| verifies) {
        Some(exchange) => {
            let (state, watches) = token::Exchange::start(
                client.clone(),
                settings.operator_namespace.clone(),
                exchange,
            );
            (Some(state), Some(watches))
        }
        None => (None, None),
    };
    let state = Arc::new(AppState {
        reviews: Reviews::new(review_client, settings.reviews.clone()),
        issuer: settings.issuer.trim_end_matches('/').to_owned(),
        algorithm: settings.algorithm,
        published: published.clone(),
        cert: cert.clone(),
        readiness,
        verifies,
        exchange: exchange.clone(),
    });
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(cert.clone())?));
    let router = router(state, &settings.issuer);
    // The bound address: with port 0 the system picked one, and whoever started us needs to know it.
    let bound = listener.local_addr().unwrap_or(settings.address);
    let serving = if exchange_watches.is_some() {
        "serving discovery, JWKS, status lists, introspection, token exchange and metrics over HTTPS"
    } else if verifies {
        "serving discovery, JWKS, status lists, introspection and metrics over HTTPS"
    } else {
        "serving only probes and metrics over HTTPS (the verification endpoints run apart)"
    };
    tracing::info!(address = %bound, issuer = %settings.issuer, "{serving}");
    let documents = async move {
        if let Some(source) = settings.verification {
            published::watch(
                client.clone(),
                settings.operator_namespace,
                source,
                published,
            )
            .await;
        }
    };
    let exchange_watches = async move {
        if let Some(watches) = exchange_watches {
            watches.await;
        }
    };
    let serving = async move {
        tokio::join!(
            tls::watch(client_for_tls, settings.tls, cert),
            documents,
            exchange_watches,
            accept(listener, acceptor, router),
        );
    };
    Ok((serving, exchange))
}

/// The routes: probes and metrics at the root and, when this listener verifies, the verification
/// routes under the issuer URL's path.
fn router(state: Arc<AppState>, issuer: &str) -> Router {
    let root = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    let routes = if state.verifies {
        with_verification(root, issuer, state.exchange.is_some())
    } else {
        root
    };
    routes
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(within_request_timeout))
        .with_state(state)
}

/// Adds discovery, JWKS, status lists and introspection under the issuer URL's path.
fn with_verification(
    root: Router<Arc<AppState>>,
    issuer: &str,
    exchanges: bool,
) -> Router<Arc<AppState>> {
    let mut verification = Router::new()
        .route(DISCOVERY_PATH, get(discovery))
        .route(JWKS_PATH, get(jwks))
        .route(
            &format!("{STATUS_LISTS_PATH}/{{id}}/{{n}}"),
            get(status_list),
        )
        .route(INTROSPECTION_PATH, post(introspection));
    if exchanges {
        verification = verification.route(token::TOKEN_PATH, post(token_exchange));
    }
    let base = issuer_path(issuer);
    if base.is_empty() {
        root.merge(verification)
    } else {
        root.nest(&base, verification)
    }
}

/// Answers 503 when a request takes longer than [`REQUEST_TIMEOUT`].
async fn within_request_timeout(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    tokio::time::timeout(REQUEST_TIMEOUT, next.run(request))
        .await
        .unwrap_or_else(|_| (StatusCode::SERVICE_UNAVAILABLE, "timed out").into_response())
}

/// Why `issuer` cannot be the issuer URL, if it cannot: verifiers (kube-apiserver among them) want an
/// `https` URL with a host and no query, fragment or credentials, and its path becomes our routes'.
pub fn issuer_problem(issuer: &str) -> Option<&'static str> {
    let Some(rest) = issuer.strip_prefix("https://") else {
        return Some("it must start with https://");
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Some("it has no host");
    }
    if host.contains('@') {
        return Some("it must not carry credentials");
    }
    if rest.contains(['?', '#']) {
        return Some("it must have no query or fragment");
    }
    if rest.contains(|c: char| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}' | '*'))
    {
        return Some("it contains characters a URL path cannot hold");
    }
    None
}

/// The path of the issuer URL, without a trailing slash ("" for `https://host`).
fn issuer_path(issuer: &str) -> String {
    let after_scheme = issuer.split_once("://").map_or(issuer, |(_, rest)| rest);
    after_scheme
        .find('/')
        .map(|i| after_scheme[i..].trim_end_matches('/').to_owned())
        .unwrap_or_default()
}

async fn accept(listener: TcpListener, acceptor: TlsAcceptor, router: Router) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(tls)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            // Handlers see the client's address (the per-source limits are keyed by it).
            let service = TowerToHyperService::new(Extension(ConnectInfo(peer)).layer(router));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // hyper enforces the header timeout only with a timer.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(64)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10));
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

/// The discovery document. What a token issuer has (like kube-apiserver's own issuer): no
/// authorization endpoint, since tokens come from grants, not from an OAuth flow.
///
/// `id_token_signing_alg_values_supported` names the algorithm the operator is configured with
/// (`--algorithm`) and, besides it, only the algorithm of any key still in the published key set
/// `jwks` (`None` before it is loaded). Normally every key has the configured algorithm, so it is
/// that one alone. After `--algorithm` changes, the key set holds keys of both for a while: the
/// active key keeps signing until its rotation (and a next key published before the change becomes
/// active at that rotation), and a retired key stays published until every token it signed has
/// expired. Those tokens are valid, and verifiers that take their allow-list from discovery (go-oidc's
/// `Provider.Verifier` does, when it is given none) would refuse them if only the new algorithm were
/// listed. So both are listed exactly while a key of the old one is published; once the last one is
/// pruned, only the configured algorithm remains. The configured one is listed from the start, before
/// any key of it signs (a key signs only after it is published, and a revocation's fresh key is of the
/// configured algorithm).
///
/// Where this process serves token exchange (`exchanges`), discovery names its `token_endpoint` and
/// the one grant type it serves (RFC 8414).
pub fn discovery_document(
    issuer: &str,
    algorithm: Algorithm,
    jwks: Option<&Value>,
    exchanges: bool,
) -> Value {
    let issuer = issuer.trim_end_matches('/');
    let mut algorithms = vec![algorithm];
    let published = jwks
        .and_then(|jwks| jwks["keys"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|key| key["alg"].as_str()?.parse::<Algorithm>().ok());
    for alg in published {
        if !algorithms.contains(&alg) {
            algorithms.push(alg);
        }
    }
    let algorithms: Vec<String> = algorithms.iter().map(Algorithm::to_string).collect();
    let mut document = json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}{JWKS_PATH}"),
        "introspection_endpoint": format!("{issuer}{INTROSPECTION_PATH}"),
        "status_list_endpoint": format!("{issuer}{STATUS_LISTS_PATH}"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
    });
    if exchanges {
        document["token_endpoint"] = json!(format!("{issuer}{}", token::TOKEN_PATH));
        document["grant_types_supported"] = json!([token::TOKEN_EXCHANGE_GRANT]);
        document["dpop_signing_alg_values_supported"] = json!(crate::dpop::ALGORITHMS);
    }
    document
}

async fn discovery(State(state): State<Arc<AppState>>) -> Response {
    let jwks = state.published.jwks();
    let document = discovery_document(
        &state.issuer,
        state.algorithm,
        jwks.as_ref(),
        state.exchange.is_some(),
    );
    let mut response = Json(document).into_response();
    cache_for(&mut response, 300);
    response
}

async fn jwks(State(state): State<Arc<AppState>>) -> Response {
    let Some(jwks) = state.published.jwks() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the JWKS is not published yet",
        )
            .into_response();
    };
    let mut response = Json(jwks).into_response();
    set(
        &mut response,
        header::CONTENT_TYPE,
        "application/jwk-set+json",
    );
    cache_for(&mut response, JWKS_MAX_AGE_SECS);
    response
}

async fn status_list(
    State(state): State<Arc<AppState>>,
    Path((id, n)): Path<(String, String)>,
) -> Response {
    let uri = format!("{}{STATUS_LISTS_PATH}/{id}/{n}", state.issuer);
    let key = crate::status_list::data_key(&uri);
    // The published token must be the list of exactly this uri (its `sub`), not another list that
    // happens to share the last path segment.
    let list = state.published.list(&key).filter(|token| {
        crate::verification::unverified_claims(token)
            .is_some_and(|claims| claims["sub"].as_str() == Some(uri.as_str()))
    });
    let Some(list) = list else {
        return (StatusCode::NOT_FOUND, "no such status list").into_response();
    };
    let mut response = list.into_response();
    set(
        &mut response,
        header::CONTENT_TYPE,
        "application/statuslist+jwt",
    );
    cache_for(&mut response, JWKS_MAX_AGE_SECS);
    response
}

async fn introspection(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    form: Result<Form<introspect::Request>, axum::extract::rejection::FormRejection>,
) -> Response {
    let caller_token = bearer_token(&headers);
    let request = form.ok().map(|Form(request)| request);
    let mut response = match introspect::introspect(
        &state.reviews,
        client_address(peer),
        &state.issuer,
        caller_token,
        request.as_ref(),
        &state.published,
    )
    .await
    {
        introspect::Outcome::Unauthenticated => {
            return unauthenticated(
                "send your ServiceAccount token, with the issuer as its audience, as a Bearer token",
            );
        }
        introspect::Outcome::BadRequest => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_request", "error_description": "expected an application/x-www-form-urlencoded body with a `token` field"})),
            )
                .into_response();
        }
        introspect::Outcome::Unavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response()
        }
        introspect::Outcome::RateLimited(wait) => {
            return too_many_requests(INTROSPECTION_PATH, wait);
        }
        introspect::Outcome::Answer(body) => Json(body).into_response(),
    };
    set(&mut response, header::CACHE_CONTROL, "no-store");
    response
}

/// RFC 8693 token exchange; see [`token`]. Every answer is `no-store` (RFC 6749 §5.1).
async fn token_exchange(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Some(exchange) = state.exchange.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let answer = match form {
        Ok(Form(fields)) => {
            token::handle(
                exchange,
                &state.reviews,
                &state.published,
                &state.issuer,
                client_address(peer),
                token::dpop_header(&headers),
                &fields,
            )
            .await
        }
        Err(_) => token::Answer::Refused {
            error: "invalid_request",
            description: "expected an application/x-www-form-urlencoded body (RFC 8693 §2.1)"
                .into(),
        },
    };
    let mut response = match answer {
        token::Answer::Issued(body) => Json(body).into_response(),
        token::Answer::Refused { error, description } => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": error, "error_description": description})),
        )
            .into_response(),
        token::Answer::Busy(Refusal::RateLimited(wait)) => {
            return too_many_requests(token::TOKEN_PATH, wait);
        }
        token::Answer::Busy(Refusal::Unavailable) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "temporarily_unavailable", "error_description": "try again"})),
        )
            .into_response(),
    };
    set(&mut response, header::CACHE_CONTROL, "no-store");
    set(&mut response, header::PRAGMA, "no-cache");
    response
}

/// The credentials of `Authorization: Bearer <token>` (the scheme is case-insensitive, RFC 6750).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

fn client_address(peer: Option<Extension<ConnectInfo<SocketAddr>>>) -> Option<IpAddr> {
    peer.map(|Extension(ConnectInfo(address))| address.ip())
}

/// 429 with `Retry-After` in whole seconds (at least 1), counted.
fn too_many_requests(path: &str, wait: Duration) -> Response {
    crate::metrics::metrics().count_rate_limited(path);
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        "too many unauthenticated or unauthorised requests from your address; try again later",
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn unauthenticated(what_to_do: &'static str) -> Response {
    let mut response = (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": "invalid_client", "error_description": what_to_do})),
    )
        .into_response();
    set(&mut response, header::WWW_AUTHENTICATE, "Bearer");
    response
}

/// `/metrics` names every grant: only callers the apiserver authenticates, and authorizes for `get`
/// on the non-resource URL `/metrics`, may read it (as kube-rbac-proxy and controller-runtime's secure
/// metrics do) — e.g. Prometheus with its ServiceAccount token.
async fn metrics(
    State(state): State<Arc<AppState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    let address = client_address(peer);
    match introspect::may_read_metrics(&state.reviews, address, bearer_token(&headers)).await {
        Ok(true) => {}
        Ok(false) => {
            return unauthenticated(
                "send a Bearer token of an identity allowed `get` on the non-resource URL /metrics",
            );
        }
        Err(Refusal::RateLimited(wait)) => return too_many_requests("/metrics", wait),
        Err(Refusal::Unavailable) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
        }
    }
    match crate::metrics::metrics().encode() {
        Ok(text) => {
            let mut response = text.into_response();
            set(
                &mut response,
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            );
            response
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Ready when this replica can answer verifiers (certificate and, where it verifies, the published
/// JWKS loaded) and, if it leads, its caches are listed.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let problems: Vec<&str> = [
        (!state.cert.is_loaded()).then_some("no serving certificate"),
        (state.verifies && !state.published.is_loaded()).then_some("the JWKS is not published yet"),
        (!state.readiness.controllers_ready()).then_some("the caches are still listing"),
        state.exchange.as_ref().and_then(|e| e.not_ready()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if problems.is_empty() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("; ")).into_response()
    }
}

fn cache_for(response: &mut Response, seconds: u32) {
    if let Ok(value) = HeaderValue::from_str(&format!("public, max-age={seconds}")) {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
}

fn set(response: &mut Response, name: header::HeaderName, value: &'static str) {
    response
        .headers_mut()
        .insert(name, HeaderValue::from_static(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_without_query_or_fragment_are_issuers() {
        for good in [
            "https://delegation-operator.delegation-system.svc",
            "https://127.0.0.1:8443",
            "https://[::1]:8443/tenants/a",
        ] {
            assert_eq!(issuer_problem(good), None, "{good}");
        }
        for bad in [
            "http://issuer.example",
            "https://",
            "https:///path",
            "https://user:pw@issuer.example",
            "https://issuer.example/?a=b",
            "https://issuer.example/#x",
            "https://issuer.example/{id}",
            "https://issuer.example/a b",
            "issuer.example",
        ] {
            assert!(issuer_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn endpoints_live_under_the_issuer_path() {
        assert_eq!(issuer_path("https://issuer.example"), "");
        assert_eq!(issuer_path("https://issuer.example/"), "");
        assert_eq!(issuer_path("https://h:8443/tenants/a/"), "/tenants/a");
    }

    /// Discovery and the issuer agree byte for byte (kube-apiserver insists), and every URL in it is
    /// under the issuer.
    #[test]
    fn discovery_agrees_with_the_issuer() {
        let doc = discovery_document("https://127.0.0.1:8443/", Algorithm::ES256, None, true);
        assert_eq!(doc["issuer"], "https://127.0.0.1:8443");
        assert_eq!(
            doc["jwks_uri"],
            "https://127.0.0.1:8443/.well-known/jwks.json"
        );
        assert_eq!(
            doc["introspection_endpoint"],
            "https://127.0.0.1:8443/introspect"
        );
        assert!(
            doc["id_token_signing_alg_values_supported"]
                .as_array()
                .unwrap()
                .contains(&json!("ES256"))
        );
        assert_eq!(doc["token_endpoint"], "https://127.0.0.1:8443/token");
        assert_eq!(
            doc["grant_types_supported"],
            json!(["urn:ietf:params:oauth:grant-type:token-exchange"])
        );
        assert_eq!(
            doc["dpop_signing_alg_values_supported"],
            json!(["ES256", "EdDSA"])
        );
        let without = discovery_document("https://127.0.0.1:8443/", Algorithm::ES256, None, false);
        assert!(without.get("token_endpoint").is_none());
        assert!(without.get("grant_types_supported").is_none());
    }

    /// The published key set of a keyring whose keys were generated with `algs`, the first active.
    fn jwks_of(algs: &[Algorithm]) -> Value {
        let mut ring =
            crate::signing::Keyring::new(crate::signing::SigningKey::generate(algs[0], 1).unwrap());
        for (n, alg) in (2..).zip(&algs[1..]) {
            ring.rotate(*alg, n).unwrap();
        }
        ring.jwks()
    }

    /// Discovery advertises the algorithm the operator signs with and no other: an ES256 operator
    /// only ES256 and an EdDSA one only EdDSA, before and after its key set is loaded.
    #[test]
    fn discovery_advertises_only_the_configured_algorithm() {
        for alg in [Algorithm::ES256, Algorithm::EdDSA] {
            let keys = jwks_of(&[alg, alg]);
            for jwks in [None, Some(&keys)] {
                let doc = discovery_document("https://issuer.example", alg, jwks, false);
                assert_eq!(
                    doc["id_token_signing_alg_values_supported"],
                    json!([alg.to_string()]),
                    "{alg} with key set {jwks:?}"
                );
            }
        }
    }

    /// While `--algorithm` changes, tokens signed by still-published keys of the other algorithm are
    /// valid: discovery lists both (the configured one first) until those keys are pruned.
    #[test]
    fn during_an_algorithm_switch_discovery_lists_both() {
        let keys = jwks_of(&[Algorithm::ES256, Algorithm::EdDSA]);
        let doc = discovery_document(
            "https://issuer.example",
            Algorithm::EdDSA,
            Some(&keys),
            false,
        );
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            json!(["EdDSA", "ES256"])
        );
        let doc = discovery_document(
            "https://issuer.example",
            Algorithm::ES256,
            Some(&keys),
            false,
        );
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            json!(["ES256", "EdDSA"])
        );
    }
}

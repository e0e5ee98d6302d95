//! `POST <issuer>/token`: RFC 8693 token exchange. A workload that holds a token this issuer minted
//! (the `subject_token`, e.g. its grant's token) and proves which pod it is (the `actor_token`, its
//! pod-bound ServiceAccount token for the issuer's audience) gets a narrower token: for one task
//! (narrowing, the same agent acting) or for the next agent its own may delegate to (a hop, `act`
//! nested one deeper). No custom resource and no apiserver write per exchange.
//!
//! The shell only: it reads the request, verifies the subject token (signature, type, issuer,
//! expiry, and status VALID in the published Token Status List), asks the apiserver who the actor
//! is ([`workload`]), and signs what the pure decision ([`crate::delegation::exchange`]) allows.
//!
//! **Lineage**: when the operator mints a grant's token it reserves the status-list entries right
//! after the token's own for its lineage (the token's `lineage` claim, seven by default). An
//! exchanged token takes one of them as its own `status` entry (chosen by its `jti`) and carries
//! the same `lineage`, at any depth. Revoking or suspending the grant's token (grant deleted or
//! refused, agent suspended, authority lost) flips its entry and every entry of its lineage in the
//! same signed publish, and nothing per exchange needs to be written, persisted or recovered after a
//! crash: the lineage was persisted with the grant token's own entry. The format lets one exchanged
//! token be revoked alone (its entry flipped, with the siblings that drew the same one); no command
//! does that yet.
//!
//! **Delivery** (a grant's `tokenDelivery: Pod`): the grant's token is never written to a Secret;
//! the leader seals it in the grant's status ([`crate::sealing`]). The agent's pod asks with
//! `subject_token_type` [`GRANT_TOKEN_TYPE`] and the grant's name as `subject_token`, and only its
//! pod-bound ServiceAccount token as `actor_token`: the grant is looked up in the caller's own
//! namespace, its token opened and verified like any subject token, and the same decision makes a
//! narrowing for the pod (never a hop: `not_the_agent`), bound to the key of a DPoP proof if one
//! came (required when the agent says `requireProofOfPossession`). Audit action `Delivered`.

pub mod directory;
pub mod live;
pub mod signer;
pub mod workload;

use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::{
    api::AuthorizationDetail,
    delegation::{
        claims::AccessTokenClaims,
        exchange::{self, ExchangeFacts, ExchangeLimits, ExchangeRequest, ProvenWorkload},
    },
    dpop,
    endpoints::{
        published::Published,
        reviews::{Charge, Refusal, Reviews},
    },
    operator::reporting::audit::{self, ExchangeAction, ExchangeRecord, WorkloadRecord},
    sealing::GrantId,
    signing,
    status_list::Status,
    verification::{self, VerifyError},
};
use directory::Directory;
use signer::Signer;

pub const TOKEN_PATH: &str = "/token";
/// RFC 8693 §2.1.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Pod delivery: the `subject_token` names a DelegationGrant of the caller's namespace whose token
/// the operator keeps sealed (RFC 8693 §3 leaves token types open to URIs like this one).
pub const GRANT_TOKEN_TYPE: &str = "urn:delegation.nhi.dev:token-type:grant";
/// Our tokens are a few KiB; a ServiceAccount token about one.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Scopes one request may name (each is checked against lists of similar size).
const MAX_SCOPES: usize = 64;

/// What an exchange needs besides what every verification endpoint has.
#[derive(Clone, Debug)]
pub struct ExchangeSettings {
    /// The longest an exchanged token lives (`--max-exchanged-token-ttl`).
    pub max_ttl: std::time::Duration,
    /// Watch only this namespace's agents and grants (`run --namespace`).
    pub namespace: Option<String>,
    /// This replica's identity (`$POD_NAME`, else host name and process id): its key in the
    /// exchanged-token counts ([`live`]).
    pub identity: String,
    /// Create the counts ConfigMap when it is missing (`run` may; the verification server may not).
    pub create_counts_configmap: bool,
}

/// The token endpoint's own state.
pub struct Exchange {
    /// The DPoP proofs this replica accepted within their `iat` window (RFC 9449 §11.1).
    replay: std::sync::Mutex<dpop::ReplayCache>,
    signer: Arc<Signer>,
    directory: Arc<Directory>,
    limits: ExchangeLimits,
    /// The live tokens this replica exchanged, per grant, for `tree`.
    counter: Arc<live::Counter>,
}

impl Exchange {
    /// The endpoint's state, and the future that keeps its signer and directory current.
    pub fn start(
        client: kube::Client,
        operator_namespace: String,
        settings: ExchangeSettings,
    ) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static) {
        let signer = Arc::new(Signer::default());
        let (directory, directory_watches) =
            Directory::start(client.clone(), settings.namespace.as_deref());
        let counter = Arc::new(live::Counter::new(
            client.clone(),
            &operator_namespace,
            &settings.identity,
        ));
        let exchange = Arc::new(Self {
            replay: std::sync::Mutex::new(dpop::ReplayCache::new(dpop::DEFAULT_REPLAY_CAPACITY)),
            signer: signer.clone(),
            directory,
            limits: ExchangeLimits {
                max_ttl: settings.max_ttl,
            },
            counter: counter.clone(),
        });
        // Boxed: its kube calls make a large future, kept off the stack of whoever polls this one.
        let counts = Box::pin(async move {
            if settings.create_counts_configmap {
                counter.create_configmap().await;
            }
            counter.publish().await;
        });
        let running = async move {
            futures::join!(
                signer::watch(client, &operator_namespace, signer),
                directory_watches,
                counts
            );
        };
        (exchange, running)
    }

    /// Removes this replica's exchanged-token counts from the ConfigMap (the process is stopping).
    pub async fn withdraw_counts(&self) {
        self.counter.withdraw().await;
    }

    /// Why this replica cannot answer exchanges yet, if it cannot.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.signer.is_loaded() {
            Some("the token endpoint has not read the signing keys yet")
        } else if !self.directory.is_ready() {
            Some("the token endpoint's caches are still listing")
        } else {
            None
        }
    }
}

/// What the endpoint answers.
pub enum Answer {
    /// 200 with this body.
    Issued(Value),
    /// 400 with an RFC 6749 §5.2 error body.
    Refused {
        error: &'static str,
        description: String,
    },
    /// 429 (from the per-source limits) or 503: try again.
    Busy(Refusal),
}

/// A refusal as the endpoint tells it: RFC 6749 code, reason label (metrics, audit), description.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub error: &'static str,
    pub reason: &'static str,
    pub description: String,
}

impl Refused {
    fn new(error: &'static str, reason: &'static str, description: impl Into<String>) -> Self {
        Self {
            error,
            reason,
            description: description.into(),
        }
    }
}

/// The request's `DPoP` header (RFC 9449 §4.1): none, exactly one, or something no proof can be.
pub enum DpopHeader {
    Absent,
    One(String),
    /// More than one, or not visible ASCII.
    Unusable,
}

/// Reads the `DPoP` header of a request.
pub fn dpop_header(headers: &axum::http::HeaderMap) -> DpopHeader {
    let mut values = headers.get_all("dpop").iter();
    match (values.next(), values.next()) {
        (None, _) => DpopHeader::Absent,
        (Some(value), None) => match value.to_str() {
            Ok(text) => DpopHeader::One(text.trim().to_owned()),
            Err(_) => DpopHeader::Unusable,
        },
        (Some(_), Some(_)) => DpopHeader::Unusable,
    }
}

/// What the `subject_token` is.
#[derive(Debug, PartialEq, Eq)]
pub enum Subject {
    /// A token of this issuer, presented by its holder (an exchange).
    Token(String),
    /// The name of a DelegationGrant with Pod delivery in the caller's namespace (a delivery).
    Grant(String),
}

/// A request, read.
pub struct Parsed {
    subject: Subject,
    actor_token: String,
    request: ExchangeRequest,
}

/// Reads the form fields of a request (RFC 8693 §2.1): refuses repeated parameters (RFC 6749 §3.2),
/// and ignores unknown ones.
pub fn parse(fields: &[(String, String)]) -> Result<Parsed, Refused> {
    let mut seen = BTreeSet::new();
    for (name, _) in fields {
        if !seen.insert(name.as_str()) {
            return Err(Refused::new(
                "invalid_request",
                "malformed_request",
                format!("parameter {:?} is given more than once", truncated(name)),
            ));
        }
    }
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let invalid = |what: String| Refused::new("invalid_request", "malformed_request", what);
    match field("grant_type") {
        None => return Err(invalid("grant_type is required".into())),
        Some(TOKEN_EXCHANGE_GRANT) => {}
        Some(_) => {
            return Err(Refused::new(
                "unsupported_grant_type",
                "unsupported_grant_type",
                format!("this endpoint serves only grant_type {TOKEN_EXCHANGE_GRANT}"),
            ));
        }
    }
    let token = |name: &str, type_name: &str, types: &[&str]| {
        let value = field(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| invalid(format!("{name} is required")))?;
        if value.len() > MAX_TOKEN_BYTES {
            return Err(invalid(format!(
                "{name} is longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        match field(type_name) {
            Some(t) if types.contains(&t) => Ok(value.to_owned()),
            _ => Err(invalid(format!("{type_name} must be one of {types:?}"))),
        }
    };
    let subject_token = token(
        "subject_token",
        "subject_token_type",
        &[ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, GRANT_TOKEN_TYPE],
    )?;
    let subject = if field("subject_token_type") == Some(GRANT_TOKEN_TYPE) {
        if !crate::api::is_dns1123_subdomain(&subject_token) {
            return Err(invalid(format!(
                "with subject_token_type {GRANT_TOKEN_TYPE}, subject_token is the name of a DelegationGrant in your namespace"
            )));
        }
        Subject::Grant(subject_token)
    } else {
        Subject::Token(subject_token)
    };
    let actor_token = token("actor_token", "actor_token_type", &[JWT_TOKEN_TYPE])?;
    if let Some(wanted) = field("requested_token_type")
        && wanted != ACCESS_TOKEN_TYPE
        && wanted != JWT_TOKEN_TYPE
    {
        return Err(invalid(format!(
            "requested_token_type must be {ACCESS_TOKEN_TYPE}"
        )));
    }
    let scopes = field("scope").map(scope_list).transpose()?;
    let audience = match (field("resource"), field("audience")) {
        (Some(r), Some(a)) if r != a => {
            return Err(Refused::new(
                "invalid_target",
                "several_audiences",
                "resource and audience name different targets; a token is for exactly one",
            ));
        }
        (r, a) => r.or(a).map(str::to_owned),
    };
    let authorization_details = field("authorization_details")
        .map(|text| {
            serde_json::from_str::<Vec<AuthorizationDetail>>(text).map_err(|_| {
                Refused::new(
                    "invalid_authorization_details",
                    "malformed_details",
                    "authorization_details must be a JSON array of RFC 9396 authorization detail objects",
                )
            })
        })
        .transpose()?;
    let expires_in = field("expires_in")
        .map(|text| {
            text.parse::<u64>()
                .map_err(|_| invalid("expires_in must be a whole number of seconds".into()))
        })
        .transpose()?;
    Ok(Parsed {
        subject,
        actor_token,
        request: ExchangeRequest {
            scopes,
            audience,
            authorization_details,
            expires_in,
        },
    })
}

/// The scopes of a `scope` parameter (RFC 6749 §3.3: space-separated, each a run of printable ASCII
/// other than `"` and `\`).
fn scope_list(text: &str) -> Result<Vec<String>, Refused> {
    let invalid = |what: &str| Refused::new("invalid_request", "malformed_request", what);
    let scopes: Vec<String> = text
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if scopes.is_empty() {
        return Err(invalid(
            "scope is empty; leave it out to keep the subject token's scopes",
        ));
    }
    if scopes.len() > MAX_SCOPES {
        return Err(invalid("scope names more than 64 scopes"));
    }
    let valid = |s: &String| {
        s.len() <= 256
            && s.bytes()
                .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
    };
    if !scopes.iter().all(valid) {
        return Err(invalid("a scope holds a character RFC 6749 does not allow"));
    }
    Ok(scopes)
}

/// At most 64 characters of untrusted text, for a description.
fn truncated(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Answers one exchange request: `fields` is its form body, `address` the client's.
pub async fn handle(
    exchange: &Exchange,
    reviews: &Reviews,
    published: &Published,
    issuer: &str,
    address: Option<std::net::IpAddr>,
    dpop: DpopHeader,
    fields: &[(String, String)],
) -> Answer {
    let mut attempt = Attempt::default();
    let outcome = answer(
        exchange,
        reviews,
        published,
        issuer,
        address,
        &dpop,
        fields,
        &mut attempt,
    )
    .await;
    match outcome {
        Ok((token, claims)) => {
            attempt.record_issued(&claims);
            exchange.counter.record(
                &claims.grant.namespace,
                &claims.grant.name,
                &claims.grant.uid,
                claims.exp,
            );
            Answer::Issued(json!({
                "access_token": token,
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "token_type": if claims.cnf.is_some() { dpop::TOKEN_TYPE } else { "Bearer" },
                "expires_in": claims.exp.saturating_sub(claims.iat),
                "scope": claims.scope,
            }))
        }
        Err(Outcome::Refused(refused)) => {
            attempt.record_refused(&refused);
            Answer::Refused {
                error: refused.error,
                description: refused.description,
            }
        }
        Err(Outcome::Busy(refusal)) => Answer::Busy(refusal),
    }
}

enum Outcome {
    Refused(Refused),
    Busy(Refusal),
}

impl From<Refused> for Outcome {
    fn from(refused: Refused) -> Self {
        Self::Refused(refused)
    }
}

#[allow(clippy::too_many_arguments)]
async fn answer(
    exchange: &Exchange,
    reviews: &Reviews,
    published: &Published,
    issuer: &str,
    address: Option<std::net::IpAddr>,
    dpop: &DpopHeader,
    fields: &[(String, String)],
    attempt: &mut Attempt,
) -> Result<(String, AccessTokenClaims), Outcome> {
    if exchange.not_ready().is_some() {
        return Err(Outcome::Busy(Refusal::Unavailable));
    }
    let parsed = parse(fields)?;
    attempt.delivery = matches!(parsed.subject, Subject::Grant(_));
    // An exchange's subject token is checked first (no apiserver call for a bad one); a delivery's
    // is known only once the caller's namespace is.
    let asked = match &parsed.subject {
        Subject::Token(token) => {
            let subject = verify_subject(published, issuer, token)?;
            attempt.subject = Some(subject.clone());
            Asked::Exchange {
                token,
                subject: Box::new(subject),
            }
        }
        Subject::Grant(name) => Asked::Delivery { grant: name },
    };
    let proof = match &asked {
        Asked::Exchange { token, subject } => {
            check_proof(dpop, issuer, Some(token), subject.cnf.is_some())?
        }
        Asked::Delivery { .. } => check_proof(dpop, issuer, None, false)?,
    };
    let caller = prove_caller(reviews, address, issuer, &parsed.actor_token).await?;
    attempt.caller = Some(caller);
    let caller = attempt.caller.as_ref().expect("just set");
    // Remembered only now, so that unauthenticated traffic cannot fill the replay cache.
    if let Some(proof) = &proof {
        remember_proof(exchange, proof, caller)?;
    }
    let subject = match asked {
        Asked::Exchange { subject, .. } => *subject,
        Asked::Delivery { grant } => {
            let token = sealed_grant_token(exchange, &caller.namespace, grant)?;
            let subject = verify_subject(published, issuer, &token)?;
            attempt.subject = Some(subject.clone());
            subject
        }
    };
    let grant = exchange
        .directory
        .grant(&subject.grant.namespace, &subject.grant.name);
    let facts = ExchangeFacts {
        subject: &subject,
        grant,
        caller,
        request: &parsed.request,
        directory: exchange.directory.as_ref(),
        limits: &exchange.limits,
        now: Timestamp::now(),
        jti: uuid::Uuid::new_v4().to_string(),
        proof_key: proof.map(|p| p.jkt),
        delivery: attempt.delivery,
    };
    let claims = exchange::decide(&facts).map_err(|refusal| {
        Refused::new(refusal.code.as_str(), refusal.reason, refusal.description)
    })?;
    let token = match exchange.signer.sign_typed(&claims, "at+jwt") {
        Some(Ok(token)) => token,
        Some(Err(e)) => {
            tracing::error!(error = %e, "signing an exchanged token failed");
            return Err(Outcome::Busy(Refusal::Unavailable));
        }
        None => return Err(Outcome::Busy(Refusal::Unavailable)),
    };
    Ok((token, claims))
}

/// What a request asks, once its subject is read.
enum Asked<'a> {
    /// An exchange of a token the caller holds, verified.
    Exchange {
        token: &'a str,
        subject: Box<AccessTokenClaims>,
    },
    /// A delivery of the token of this grant (in the caller's namespace).
    Delivery { grant: &'a str },
}

/// Proves who the caller is from its pod-bound ServiceAccount token (TokenReview, cached), counting
/// a failure against its address.
async fn prove_caller(
    reviews: &Reviews,
    address: Option<std::net::IpAddr>,
    issuer: &str,
    actor_token: &str,
) -> Result<ProvenWorkload, Outcome> {
    let mut charge = Charge::new(address);
    match workload::prove_workload(reviews, &mut charge, issuer, actor_token).await {
        Err(refusal) => Err(Outcome::Busy(refusal)),
        Ok(Err(not_proven)) => Err(Refused::new(
            "unauthorized_client",
            not_proven.reason(),
            not_proven.description(),
        )
        .into()),
        Ok(Ok(caller)) => {
            // The caller is who it says it is: a refusal from here on is about what it asked, not
            // about unauthenticated traffic, and does not count against its address.
            reviews.accepted(&mut charge);
            Ok(caller)
        }
    }
}

/// The token of the caller's grant `name`, opened from the grant's status (Pod delivery). Only
/// the grant's own namespace is looked in: the caller's, as the apiserver proved it.
fn sealed_grant_token(exchange: &Exchange, namespace: &str, name: &str) -> Result<String, Outcome> {
    let Some((uid, sealed)) = exchange.directory.sealed_token(namespace, name) else {
        return Err(Refused::new(
            "invalid_grant",
            "not_delivered",
            format!(
                "no DelegationGrant {:?} in namespace {namespace:?} holds a token for Pod delivery: it does not exist, is not Ready, or delivers to a Secret",
                truncated(name)
            ),
        )
        .into());
    };
    let grant = GrantId {
        namespace,
        name,
        uid: &uid,
    };
    exchange.signer.open(grant, &sealed).ok_or_else(|| {
        // Altered, or sealed under a key this replica does not hold yet: the operator replaces a
        // sealed token that does not open within seconds.
        tracing::warn!(
            namespace,
            grant = name,
            "a grant's sealed token does not open"
        );
        Outcome::Busy(Refusal::Unavailable)
    })
}

/// The request's DPoP proof, checked (RFC 9449 §4.3) for a `POST` to this endpoint, with `ath` the
/// hash of the presented subject token (required when it is bound); replay is checked later.
fn check_proof(
    header: &DpopHeader,
    issuer: &str,
    presented: Option<&str>,
    bound: bool,
) -> Result<Option<dpop::Proof>, Outcome> {
    let refused = |description: String| {
        Outcome::Refused(Refused::new(
            "invalid_dpop_proof",
            "proof_invalid",
            description,
        ))
    };
    let proof = match header {
        DpopHeader::Absent => return Ok(None),
        DpopHeader::Unusable => {
            return Err(refused(
                "send exactly one DPoP header holding one proof JWT (RFC 9449 §4.1)".into(),
            ));
        }
        DpopHeader::One(proof) => proof,
    };
    let request = dpop::Request {
        method: "POST",
        uri: &format!("{issuer}{TOKEN_PATH}"),
        token: presented,
        require_ath: bound,
        now: Timestamp::now().as_second(),
    };
    dpop::check_proof(proof, &request)
        .map(Some)
        .map_err(|e| refused(e.to_string()))
}

/// How long a caller over its share of the replay cache is told to wait.
const CALLER_OVER_QUOTA_RETRY_SECS: u64 = 5;

/// Records a proof as used by `caller`; refuses one used before.
fn remember_proof(
    exchange: &Exchange,
    proof: &dpop::Proof,
    caller: &ProvenWorkload,
) -> Result<(), Outcome> {
    let now = Timestamp::now().as_second();
    // Shared per namespace: a tenant making more ServiceAccounts gets no more of it.
    let remembered = match exchange.replay.lock() {
        Ok(mut cache) => cache.remember(proof, &caller.namespace, now),
        // A panic elsewhere while holding it: refuse rather than skip the check.
        Err(_) => Err(dpop::ProofError::ReplayCacheFull),
    };
    match remembered {
        Ok(()) => Ok(()),
        Err(dpop::ProofError::ReplayCacheFull) => Err(Outcome::Busy(Refusal::Unavailable)),
        // This namespace's share of a busy cache is full: it slows down, nobody else does.
        Err(dpop::ProofError::CallerOverQuota) => Err(Outcome::Busy(Refusal::RateLimited(
            std::time::Duration::from_secs(CALLER_OVER_QUOTA_RETRY_SECS),
        ))),
        Err(e) => Err(Refused::new("invalid_dpop_proof", "proof_replayed", e.to_string()).into()),
    }
}

/// The subject token's claims, if it is a token of this issuer that is valid now and VALID in the
/// published status list.
fn verify_subject(
    published: &Published,
    issuer: &str,
    token: &str,
) -> Result<AccessTokenClaims, Outcome> {
    let invalid = |reason, what: &str| Refused::new("invalid_grant", reason, what);
    let audience = verification::unverified_audience(token).unwrap_or_default();
    let verified = published
        .with_documents(|jwks, _| signing::verify(token, jwks, &audience, 0))
        .ok_or(Outcome::Busy(Refusal::Unavailable))?
        .map_err(VerifyError::Token)
        .and_then(|claims| {
            let status = published.status_of(&claims)?;
            Ok(verification::Verified { claims, status })
        });
    let verified = verified.map_err(|e| match e {
        VerifyError::Token(_) => invalid(
            "subject_invalid",
            "the subject_token is not a valid, unexpired access token of this issuer",
        ),
        VerifyError::NoStatus => invalid(
            "subject_invalid",
            "the subject_token has no status entry, so it cannot be exchanged",
        ),
        _ => invalid(
            "subject_status_unknown",
            "the subject_token's status list is not published or does not verify; it cannot be exchanged now",
        ),
    })?;
    match verified.status {
        Status::Valid => {}
        Status::Suspended => {
            return Err(invalid(
                "subject_suspended",
                "the subject_token is suspended (an agent of its chain or its grant is suspended)",
            )
            .into());
        }
        _ => {
            return Err(invalid("subject_revoked", "the subject_token has been revoked").into());
        }
    }
    let claims: AccessTokenClaims = serde_json::from_value(verified.claims).map_err(|_| {
        invalid(
            "subject_invalid",
            "the subject_token is not a delegated access token of this issuer",
        )
    })?;
    if claims.iss != issuer {
        return Err(invalid(
            "subject_invalid",
            "the subject_token was issued by another issuer",
        )
        .into());
    }
    Ok(claims)
}

/// What is known of an exchange by the time it ends, for its audit record.
#[derive(Default)]
struct Attempt {
    /// A delivery (Pod delivery) rather than an exchange.
    delivery: bool,
    subject: Option<AccessTokenClaims>,
    caller: Option<ProvenWorkload>,
}

impl Attempt {
    fn record_issued(&self, issued: &AccessTokenClaims) {
        let expires_at = Timestamp::from_second(issued.exp)
            .map(|t| t.to_string())
            .ok();
        let (action, reason) = if self.delivery {
            (ExchangeAction::Delivered, "delivered")
        } else {
            (ExchangeAction::Exchanged, "exchanged")
        };
        let delivered_to = self
            .caller
            .as_ref()
            .filter(|_| self.delivery)
            .map(|c| format!("delivered to pod {}/{}", c.namespace, c.pod_name));
        let mut record = self.record(action, reason, Some(issued));
        record.message = delivered_to.as_deref();
        record.token_ids = vec![&issued.jti];
        record.expires_at = expires_at;
        record.status_list = issued.status.as_ref();
        record.bound_to = issued.cnf.as_ref().map(|cnf| cnf.jkt.as_str());
        audit::record_exchange(&record);
    }

    fn record_refused(&self, refused: &Refused) {
        let action = if self.delivery {
            ExchangeAction::DeliveryRefused
        } else {
            ExchangeAction::ExchangeRefused
        };
        let mut record = self.record(action, refused.reason, None);
        record.error = Some(refused.error);
        record.message = Some(&refused.description);
        audit::record_exchange(&record);
    }

    /// The record's common part: the chain of the issued token, else of the subject.
    fn record<'a>(
        &'a self,
        action: ExchangeAction,
        reason: &'a str,
        issued: Option<&'a AccessTokenClaims>,
    ) -> ExchangeRecord<'a> {
        let token = issued.or(self.subject.as_ref());
        ExchangeRecord {
            time: Timestamp::now().to_string(),
            action,
            reason,
            error: None,
            message: None,
            namespace: token.map(|t| t.grant.namespace.as_str()),
            grant: token.map(|t| t.grant.name.as_str()),
            principal: token.map(|t| t.sub.as_str()),
            workload: self.caller.as_ref().map(|c| WorkloadRecord {
                service_account: crate::api::service_account_username(
                    &c.namespace,
                    &c.service_account,
                ),
                pod: &c.pod_name,
                pod_uid: &c.pod_uid,
            }),
            actors: token.map(actors_of).unwrap_or_default(),
            scopes: token.map(|t| t.scope.split(' ').collect()),
            audience: token.map(|t| t.aud.as_str()),
            subject_token_id: self.subject.as_ref().map(|s| s.jti.as_str()),
            token_ids: Vec::new(),
            bound_to: None,
            expires_at: None,
            status_list: None,
        }
    }
}

/// The actors of a token, root-most first.
fn actors_of(claims: &AccessTokenClaims) -> Vec<String> {
    let mut actors = Vec::new();
    let mut actor = Some(&claims.act);
    while let Some(a) = actor {
        actors.push(a.sub.clone());
        actor = a.act.as_deref();
    }
    actors.reverse();
    actors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("subject_token", "s.t.x"),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("actor_token", "a.t.x"),
            ("actor_token_type", JWT_TOKEN_TYPE),
        ]
    }

    fn refusal(pairs: &[(&str, &str)]) -> Refused {
        parse(&form(pairs)).err().expect("refused")
    }

    #[test]
    fn a_complete_request_is_read() {
        let mut pairs = base();
        pairs.extend([
            ("scope", "read  tickets:write"),
            ("resource", "https://api.example"),
            ("expires_in", "60"),
            ("unknown", "ignored"),
            (
                "authorization_details",
                r#"[{"type":"ticket","identifier":"1"}]"#,
            ),
        ]);
        let parsed = parse(&form(&pairs)).expect("parsed");
        assert_eq!(parsed.subject, Subject::Token("s.t.x".into()));
        assert_eq!(parsed.actor_token, "a.t.x");
        let request = parsed.request;
        assert_eq!(
            request.scopes,
            Some(vec!["read".to_owned(), "tickets:write".to_owned()])
        );
        assert_eq!(request.audience.as_deref(), Some("https://api.example"));
        assert_eq!(request.expires_in, Some(60));
        assert_eq!(request.authorization_details.map(|d| d.len()), Some(1));
        let minimal = parse(&form(&base())).expect("parsed").request;
        assert!(minimal.scopes.is_none() && minimal.audience.is_none());
    }

    #[test]
    fn malformed_requests_are_refused_with_their_rfc_codes() {
        let without = |name: &str| -> Vec<(&str, &str)> {
            base().into_iter().filter(|(k, _)| *k != name).collect()
        };
        for missing in [
            "grant_type",
            "subject_token",
            "subject_token_type",
            "actor_token",
            "actor_token_type",
        ] {
            assert_eq!(
                refusal(&without(missing)).error,
                "invalid_request",
                "{missing}"
            );
        }
        let with = |extra: (&'static str, &'static str)| {
            let mut pairs = base();
            pairs.push(extra);
            pairs
        };
        let mut other_grant = without("grant_type");
        other_grant.push(("grant_type", "client_credentials"));
        assert_eq!(refusal(&other_grant).error, "unsupported_grant_type");
        let mut id_token = without("subject_token_type");
        id_token.push((
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:id_token",
        ));
        assert_eq!(refusal(&id_token).error, "invalid_request");
        let mut access_actor = without("actor_token_type");
        access_actor.push(("actor_token_type", ACCESS_TOKEN_TYPE));
        assert_eq!(refusal(&access_actor).error, "invalid_request");
        let twice = with(("subject_token", "other"));
        assert_eq!(refusal(&twice).error, "invalid_request");
        for (extra, error) in [
            (("scope", ""), "invalid_request"),
            (("scope", "a\"b"), "invalid_request"),
            (("expires_in", "-5"), "invalid_request"),
            (("expires_in", "soon"), "invalid_request"),
            (
                (
                    "requested_token_type",
                    "urn:ietf:params:oauth:token-type:id_token",
                ),
                "invalid_request",
            ),
            (
                ("authorization_details", "{\"type\":\"x\"}"),
                "invalid_authorization_details",
            ),
        ] {
            assert_eq!(refusal(&with(extra)).error, error, "{extra:?}");
        }
        let mut targets = base();
        targets.extend([
            ("resource", "https://a.example"),
            ("audience", "https://b.example"),
        ]);
        assert_eq!(refusal(&targets).error, "invalid_target");
        let many = vec!["s"; MAX_SCOPES + 1].join(" ");
        let mut pairs = base();
        pairs.push(("scope", &many));
        assert_eq!(refusal(&pairs).error, "invalid_request");
        let long = "x".repeat(MAX_TOKEN_BYTES + 1);
        let mut pairs = without("subject_token");
        pairs.push(("subject_token", &long));
        assert_eq!(refusal(&pairs).error, "invalid_request");
    }

    /// A delivery names a grant: only a Kubernetes object name is taken.
    #[test]
    fn a_delivery_names_a_grant_by_a_valid_name() {
        let delivery = |name: &str| {
            let mut pairs: Vec<(&str, &str)> = base()
                .into_iter()
                .filter(|(k, _)| !k.starts_with("subject_token"))
                .collect();
            pairs.extend([
                ("subject_token", name),
                ("subject_token_type", GRANT_TOKEN_TYPE),
            ]);
            parse(&form(&pairs))
        };
        let parsed = delivery("triage.v2").expect("a grant name");
        assert_eq!(parsed.subject, Subject::Grant("triage.v2".into()));
        let long = "a".repeat(254);
        for bad in [
            "Triage",
            "-x",
            "x-",
            "a..b",
            "a/b",
            "eyJ.x.y_z",
            long.as_str(),
        ] {
            let refused = delivery(bad).err().expect("not a grant name");
            assert_eq!(refused.error, "invalid_request", "{bad:.20}");
            assert!(!refused.description.contains(bad), "{bad:.20}");
        }
    }

    /// A description quotes no more than a short piece of what the caller sent, and never a token.
    #[test]
    fn descriptions_do_not_echo_tokens() {
        let secret = "eyJsecret.payload.signature";
        let mut pairs = base();
        pairs.push(("subject_token", secret));
        let refused = refusal(&pairs);
        assert!(!refused.description.contains(secret));
        let long_name = "n".repeat(500);
        let pairs = vec![(long_name.as_str(), "1"), (long_name.as_str(), "2")];
        assert!(refusal(&pairs).description.len() < 200);
    }
}

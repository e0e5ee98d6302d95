//! DPoP (RFC 9449): checking a proof of possession, binding a token to its key, and remembering
//! proofs already used. Pure: no I/O, and every time is a Unix-seconds argument.
//!
//! A client that wants a token only it can use sends, with its request, a **proof**: a JWT in the
//! `DPoP` header, signed with a key of its own and carrying that key's public half in its header.
//! The token we issue then carries `cnf.jkt`, the RFC 7638 thumbprint of that key (RFC 7800 `cnf`),
//! and is useless to whoever copies it without the key: every use needs a fresh proof by it.
//!
//! [`check_proof`] runs the checks of RFC 9449 §4.3, in its order: one well-formed JWT; `typ`
//! `dpop+jwt`; an asymmetric `alg` we verify (ES256 or EdDSA) matching its `jwk`; a `jwk` with no
//! private member; a valid signature by it; `jti`, `htm`, `htu` and `iat` present; `htm` the
//! request's method; `htu` the request's URI without query and fragment; `iat` within
//! [`IAT_PAST_SECS`] before and [`IAT_FUTURE_SECS`] after now; `ath` the hash of the token
//! presented with it, when one is. We send no nonces, so a `nonce` is not looked at. Replay (a
//! `jti` seen within the `iat` window) is the caller's second step, with a [`ReplayCache`].

use std::collections::{BTreeMap, HashMap};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::signing::{self, Algorithm};

/// The `typ` of a DPoP proof (RFC 9449 §4.2).
pub const PROOF_TYP: &str = "dpop+jwt";

/// The `token_type` of a DPoP-bound token in a token response (RFC 9449 §5).
pub const TOKEN_TYPE: &str = "DPoP";

/// The proof algorithms accepted, as discovery advertises them (`dpop_signing_alg_values_supported`).
pub const ALGORITHMS: [&str; 2] = ["ES256", "EdDSA"];

/// How old a proof's `iat` may be.
pub const IAT_PAST_SECS: i64 = 60;

/// How far ahead of our clock a proof's `iat` may be (the client's clock may run a little fast).
pub const IAT_FUTURE_SECS: i64 = 5;

/// The largest proof looked at: a P-256 or Ed25519 proof is well under 1 KiB.
pub const MAX_PROOF_BYTES: usize = 4096;

/// The longest `jti` accepted.
pub const MAX_JTI_LEN: usize = 256;

/// Proofs remembered at most by default (per process): the proofs of 4,000 exchanges a second over
/// the 65 s window. 90 bytes each (`benches/cache_footprint.rs`), 23 MiB at most.
pub const DEFAULT_REPLAY_CAPACITY: usize = 1 << 18;

/// Once the replay cache is half full, one caller (a namespace) may hold at most this share of it
/// (1/16: 16,384 proofs, 250 a second over the window, by default), so that no one tenant can fill
/// it and stop every other's DPoP exchanges; below half, anyone may use the room.
pub const CALLER_SHARE_DIVISOR: usize = 16;

/// The `cnf` claim of a bound token (RFC 7800 §3.1, RFC 9449 §6.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The RFC 7638 SHA-256 thumbprint of the key the token is bound to (base64url).
    pub jkt: String,
}

/// What the request a proof came with looked like.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The HTTP method, e.g. `POST`.
    pub method: &'a str,
    /// The URI the request was sent to, as the client names it (for us, the discovery document's
    /// `token_endpoint`).
    pub uri: &'a str,
    /// The token presented with the proof, if any: its hash must be the proof's `ath`.
    pub token: Option<&'a str>,
    /// Whether `ath` is required (a bound token is presented).
    pub require_ath: bool,
    pub now: i64,
}

/// A proof that passed every check but replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    /// The thumbprint of the key that signed it: what a token issued on it is bound to.
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
}

/// Why a proof was refused: every one is the RFC's `invalid_dpop_proof`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the DPoP proof is larger than {MAX_PROOF_BYTES} bytes")]
    TooLarge,
    #[error("the DPoP proof is not a well-formed JWT")]
    Malformed,
    #[error("the DPoP proof's typ must be dpop+jwt")]
    WrongType,
    #[error(
        "the DPoP proof must be signed with ES256 or EdDSA (an asymmetric algorithm we verify)"
    )]
    Algorithm,
    #[error("the DPoP proof's jwk must be the public key matching its alg ({0})")]
    Key(&'static str),
    #[error("the DPoP proof's jwk holds a private key; send the public key only")]
    PrivateKey,
    #[error("the DPoP proof's signature does not verify with its jwk")]
    Signature,
    #[error("the DPoP proof lacks the claim {0}")]
    MissingClaim(&'static str),
    #[error("the DPoP proof's jti must be a string of 1 to {MAX_JTI_LEN} characters")]
    Jti,
    #[error("the DPoP proof's htm is {0:?}; it must be the request's method")]
    Method(String),
    #[error("the DPoP proof's htu must be the URI the request was sent to: {0}")]
    Uri(String),
    #[error(
        "the DPoP proof's iat is {0} s from now; it must be within {IAT_PAST_SECS} s before and {IAT_FUTURE_SECS} s after: make a fresh proof for each request"
    )]
    Time(i64),
    #[error(
        "the DPoP proof's ath must be the base64url SHA-256 of the token presented with it (RFC 9449 §4.2)"
    )]
    AccessTokenHash,
    #[error("this DPoP proof was used before; make a fresh proof (a new jti) for each request")]
    Replayed,
    #[error(
        "too many recent DPoP proofs are remembered to check this one for replay; retry shortly"
    )]
    ReplayCacheFull,
    #[error(
        "this namespace's workloads sent more DPoP proofs in the last minute than one namespace may have remembered while the replay cache is busy; retry shortly"
    )]
    CallerOverQuota,
}

/// The `ath` of a token: base64url of its SHA-256 (RFC 9449 §4.2).
pub fn access_token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

/// Runs the checks of RFC 9449 §4.3 (all but replay) on `proof`, sent with `request`.
pub fn check_proof(proof: &str, request: &Request<'_>) -> Result<Proof, ProofError> {
    if proof.len() > MAX_PROOF_BYTES {
        return Err(ProofError::TooLarge);
    }
    let header = decode_part(proof, 0)?;
    if header.get("typ").and_then(Value::as_str) != Some(PROOF_TYP) {
        return Err(ProofError::WrongType);
    }
    let alg: Algorithm = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(|alg| alg.parse().ok())
        .ok_or(ProofError::Algorithm)?;
    let jwk = header
        .get("jwk")
        .filter(|jwk| jwk.is_object())
        .ok_or(ProofError::Key("no jwk in the header"))?;
    if PRIVATE_MEMBERS.iter().any(|m| jwk.get(m).is_some()) {
        return Err(ProofError::PrivateKey);
    }
    let claims = signing::verify_embedded(proof, alg, jwk).map_err(|e| match e {
        signing::SigningError::BadSignature => ProofError::Signature,
        signing::SigningError::InvalidJwk(why) => ProofError::Key(why),
        _ => ProofError::Malformed,
    })?;
    let jkt = signing::thumbprint(jwk).map_err(|_| ProofError::Key("no thumbprint"))?;
    let text = |name: &'static str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .ok_or(ProofError::MissingClaim(name))
    };
    let jti = text("jti")?;
    let (htm, htu) = (text("htm")?, text("htu")?);
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or(ProofError::MissingClaim("iat"))?;
    if jti.is_empty() || jti.len() > MAX_JTI_LEN {
        return Err(ProofError::Jti);
    }
    if htm != request.method {
        return Err(ProofError::Method(htm.chars().take(16).collect()));
    }
    if !same_uri(htu, request.uri) {
        return Err(ProofError::Uri(request.uri.to_owned()));
    }
    let age = request.now.saturating_sub(iat);
    if !(-IAT_FUTURE_SECS..=IAT_PAST_SECS).contains(&age) {
        return Err(ProofError::Time(iat.saturating_sub(request.now)));
    }
    match (claims.get("ath"), request.token) {
        (Some(ath), Some(token)) if ath.as_str() == Some(&access_token_hash(token)) => {}
        (Some(_), _) => return Err(ProofError::AccessTokenHash),
        (None, _) if request.require_ath => return Err(ProofError::AccessTokenHash),
        (None, _) => {}
    }
    Ok(Proof {
        jkt,
        jti: jti.to_owned(),
        iat,
    })
}

/// JWK members that only a private key has (EC and OKP `d`; RSA's CRT members and others' `k`).
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

/// The JSON object in part `index` of a compact JWS.
fn decode_part(jwt: &str, index: usize) -> Result<Value, ProofError> {
    let mut parts = jwt.split('.');
    if jwt.split('.').count() != 3 {
        return Err(ProofError::Malformed);
    }
    let part = parts.nth(index).ok_or(ProofError::Malformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| ProofError::Malformed)?;
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .filter(Value::is_object)
        .ok_or(ProofError::Malformed)
}

/// Whether a proof's `htu` names `expected`, ignoring its query and fragment (RFC 9449 §4.3 step
/// 9) and the case of scheme and host (RFC 3986 §6.2.2.1).
fn same_uri(htu: &str, expected: &str) -> bool {
    let without = |uri: &str| uri.split(['?', '#']).next().unwrap_or_default().to_owned();
    let split = |uri: &str| -> Option<(String, String)> {
        let (scheme, rest) = uri.split_once("://")?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        Some((
            format!(
                "{}://{}",
                scheme.to_ascii_lowercase(),
                authority.to_ascii_lowercase()
            ),
            path.to_owned(),
        ))
    };
    matches!((split(&without(htu)), split(&without(expected))), (Some(a), Some(b)) if a == b)
}

/// The `jti`s of proofs accepted within the `iat` window, so that none is accepted twice
/// (RFC 9449 §11.1). Bounded: when it holds `capacity` proofs that are all still within their
/// window, a new proof is refused ([`ProofError::ReplayCacheFull`]) rather than an old one
/// forgotten early (fail closed). Keys are the first 16 bytes of a SHA-256 of the `jti` and the
/// key's thumbprint, so a client's long `jti`s cost nothing more. Once it is half full, each caller
/// (the proven workload's namespace) may hold at most a [`CALLER_SHARE_DIVISOR`]th of it
/// ([`ProofError::CallerOverQuota`]): the other half stays for everyone else.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    per_caller: usize,
    /// Proof id -> until when it is remembered, and whose it is.
    seen: HashMap<[u8; 16], (i64, u64)>,
    /// Until when -> the proof ids remembered until then, to forget them in order.
    by_expiry: BTreeMap<i64, Vec<[u8; 16]>>,
    /// Caller -> how many of its proofs are remembered.
    callers: HashMap<u64, usize>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            per_caller: (capacity / CALLER_SHARE_DIVISOR).max(1),
            seen: HashMap::new(),
            by_expiry: BTreeMap::new(),
            callers: HashMap::new(),
        }
    }

    /// Records `proof`, sent by `caller` (the proven workload's namespace), as used; refuses one
    /// seen before within its window.
    pub fn remember(&mut self, proof: &Proof, caller: &str, now: i64) -> Result<(), ProofError> {
        // Checked again at this `now` (the proof's `iat` was checked a TokenReview earlier): an
        // entry is forgotten only once no proof with its `iat` can be accepted any more.
        let age = now.saturating_sub(proof.iat);
        if age > IAT_PAST_SECS {
            return Err(ProofError::Time(-age));
        }
        self.forget_before(now);
        let id = proof_id(proof);
        if self.seen.contains_key(&id) {
            return Err(ProofError::Replayed);
        }
        let caller = caller_id(caller);
        let held = self.callers.get(&caller).copied().unwrap_or(0);
        if held >= self.per_caller && self.seen.len() >= self.capacity / 2 {
            return Err(ProofError::CallerOverQuota);
        }
        if self.seen.len() >= self.capacity {
            return Err(ProofError::ReplayCacheFull);
        }
        // Past this, `iat` is outside the window and the proof is refused as too old anyway.
        let until = proof.iat.saturating_add(IAT_PAST_SECS);
        self.seen.insert(id, (until, caller));
        self.by_expiry.entry(until).or_default().push(id);
        self.callers.insert(caller, held + 1);
        Ok(())
    }

    /// How many proofs are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn forget_before(&mut self, now: i64) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if *entry.key() >= now {
                break;
            }
            for id in entry.remove() {
                let Some((_, caller)) = self.seen.remove(&id) else {
                    continue;
                };
                if let Some(held) = self.callers.get_mut(&caller) {
                    *held -= 1;
                    if *held == 0 {
                        self.callers.remove(&caller);
                    }
                }
            }
        }
    }
}

/// A caller's key in the cache: the first 8 bytes of a SHA-256 of its name.
fn caller_id(caller: &str) -> u64 {
    let digest = Sha256::digest(caller.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

fn proof_id(proof: &Proof) -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update(proof.jkt.as_bytes());
    hasher.update([0]);
    hasher.update(proof.jti.as_bytes());
    let digest = hasher.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

#[cfg(test)]
#[path = "dpop_tests.rs"]
mod tests;

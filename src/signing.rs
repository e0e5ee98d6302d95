//! Signing keys for the RFC 9068 access tokens the operator mints, their JWKS publication, and
//! verification.
//!
//! A key's `kid` is its RFC 7638 thumbprint, so a `kid` can never silently point at different key
//! material: [`Keyring::from_stored`] recomputes it instead of trusting the Secret. Retired keys
//! stay in the JWKS until every token they signed has expired, so rotation never invalidates a
//! token that was already handed out.

mod es256;

use std::cmp::Reverse;
use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// RFC 9068 §2.1 `typ`: keeps our access tokens from being accepted where an ID token is expected.
const TOKEN_TYP: &str = "at+jwt";

/// Signing algorithm of the operator's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    ES256,
    EdDSA,
}

impl Algorithm {
    fn as_str(self) -> &'static str {
        match self {
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
        }
    }

    fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Self::ES256 => jsonwebtoken::Algorithm::ES256,
            Self::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ES256" => Ok(Self::ES256),
            "EdDSA" => Ok(Self::EdDSA),
            _ => Err(SigningError::UnsupportedAlgorithm),
        }
    }
}

/// Errors carry static reasons only: messages end up in logs and Kubernetes events, so they must
/// never echo key material or (attacker-controlled) token text.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("key generation failed: {0}")]
    KeyGeneration(&'static str),
    #[error("stored key {kid} is invalid: {reason}")]
    InvalidStoredKey { kid: String, reason: &'static str },
    #[error("keyring is invalid: {0}")]
    InvalidKeyring(&'static str),
    #[error("invalid JWK: {0}")]
    InvalidJwk(&'static str),
    #[error("unsupported signing algorithm (expected ES256 or EdDSA)")]
    UnsupportedAlgorithm,
    #[error("signing failed: {0}")]
    Signing(&'static str),
    #[error("malformed token")]
    MalformedToken,
    #[error("token typ is not at+jwt")]
    WrongType,
    #[error("token kid is missing or not in the key set")]
    UnknownKid,
    #[error("token alg does not match the key's alg")]
    AlgorithmMismatch,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token audience does not match")]
    WrongAudience,
    #[error("token claims are missing or malformed (exp and aud are required)")]
    InvalidClaims,
}

/// One signing key pair. The private key lives in `encoding` (its PKCS#8, as stored; zeroized on
/// drop by jsonwebtoken) and, for ES256, in `es256`, the `ring` key pair tokens are signed with;
/// the public JWK is always derived from it, never read from storage.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    created_at: i64,
    retired_at: Option<i64>,
    encoding: EncodingKey,
    /// Parsed once per key (ES256 only); EdDSA signs through jsonwebtoken with `encoding`.
    es256: Option<es256::KeyPair>,
    /// The key that seals tokens for Pod delivery ([`crate::sealing`]), derived from the private key.
    seal_key: Zeroizing<[u8; 32]>,
    jwk: Value,
}

impl SigningKey {
    pub fn generate(alg: Algorithm, now: i64) -> Result<Self, SigningError> {
        let doc = match alg {
            Algorithm::EdDSA => {
                let mut seed = Zeroizing::new([0u8; 32]);
                random(&mut seed[..])?;
                ed25519_dalek::SigningKey::from_bytes(&seed).to_pkcs8_der()
            }
            Algorithm::ES256 => p256_key()?.to_pkcs8_der(),
        }
        .map_err(|_| SigningError::KeyGeneration("PKCS#8 encoding failed"))?;
        Self::from_pkcs8(alg, doc.as_bytes(), now, None).map_err(SigningError::KeyGeneration)
    }

    /// A key from a PKCS#8 PEM file (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey` writes it),
    /// P-256 (ES256) or Ed25519 (EdDSA), e.g. a client's DPoP key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, SigningError> {
        let body: String = pem
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != "-----BEGIN PRIVATE KEY-----")
            .skip(1)
            .take_while(|l| *l != "-----END PRIVATE KEY-----")
            .collect();
        let der = Zeroizing::new(
            STANDARD
                .decode(body)
                .map_err(|_| SigningError::KeyGeneration("not a PKCS#8 PEM private key"))?,
        );
        Self::from_pkcs8(Algorithm::ES256, &der, 0, None)
            .or_else(|_| Self::from_pkcs8(Algorithm::EdDSA, &der, 0, None))
            .map_err(|_| SigningError::KeyGeneration("not a P-256 or Ed25519 PKCS#8 private key"))
    }

    fn from_pkcs8(
        alg: Algorithm,
        der: &[u8],
        created_at: i64,
        retired_at: Option<i64>,
    ) -> Result<Self, &'static str> {
        let (mut jwk, es256) = match alg {
            Algorithm::ES256 => {
                let key = p256::ecdsa::SigningKey::from_pkcs8_der(der)
                    .map_err(|_| "not a PKCS#8 P-256 private key")?;
                (p256_public_members(&key)?, Some(es256::key_pair(&key)?))
            }
            Algorithm::EdDSA => (ed25519_public_members(der)?, None),
        };
        let kid = thumbprint(&jwk).map_err(|_| "cannot compute thumbprint")?;
        jwk["kid"] = kid.clone().into();
        jwk["alg"] = alg.as_str().into();
        jwk["use"] = "sig".into();
        let encoding = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_der(der),
            Algorithm::EdDSA => EncodingKey::from_ed_der(der),
        };
        Ok(Self {
            kid,
            alg,
            created_at,
            retired_at,
            encoding,
            es256,
            seal_key: crate::sealing::derive_key(der),
            jwk,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    pub fn created_at(&self) -> i64 {
        self.created_at
    }

    pub fn retired_at(&self) -> Option<i64> {
        self.retired_at
    }

    pub fn public_jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// The symmetric key this key pair seals tokens with (never leaves the process).
    pub(crate) fn seal_key(&self) -> &[u8; 32] {
        &self.seal_key
    }

    /// Signs claims into a compact JWT with header {alg, typ: "at+jwt", kid}.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, SigningError> {
        self.sign_typed(claims, TOKEN_TYP)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .field("private_key", &"[redacted]")
            .finish()
    }
}

/// Tokens other than access tokens, such as the Status List Token (`statuslist+jwt`), signed with
/// the same keys and kid: their own `typ` keeps them from being accepted as access tokens (and
/// `verify` accepts only `at+jwt`).
impl SigningKey {
    /// Signs claims into a compact JWT with header {alg, typ: `typ`, kid}.
    pub fn sign_typed<T: Serialize>(&self, claims: &T, typ: &str) -> Result<String, SigningError> {
        let mut header = Header::new(self.alg.jwt());
        header.typ = Some(typ.to_owned());
        header.kid = Some(self.kid.clone());
        self.sign_with(&header, claims)
    }

    /// Signs a DPoP proof (RFC 9449 §4.2): header {alg, typ: `dpop+jwt`, jwk: this key's public
    /// half}, for a client proving possession of this key.
    pub fn sign_proof<T: Serialize>(&self, claims: &T) -> Result<String, SigningError> {
        let mut header = Header::new(self.alg.jwt());
        header.typ = Some(crate::dpop::PROOF_TYP.to_owned());
        let jwk = serde_json::from_value(self.public_jwk())
            .map_err(|_| SigningError::InvalidJwk("the public key is not a JWK"))?;
        header.jwk = Some(jwk);
        self.sign_with(&header, claims)
    }

    fn sign_with<T: Serialize>(&self, header: &Header, claims: &T) -> Result<String, SigningError> {
        install_crypto_provider();
        if let Some(pair) = &self.es256 {
            return es256::encode(pair, header, claims);
        }
        jsonwebtoken::encode(header, claims, &self.encoding).map_err(|e| {
            SigningError::Signing(match e.kind() {
                ErrorKind::Json(_) => "claims could not be serialized",
                _ => "signature creation failed",
            })
        })
    }
}

/// Makes jsonwebtoken verify (and sign) ES256 with `ring`, once per process; returns whether its
/// provider is ours. Every function here that signs or verifies calls it first, so nothing else
/// has to; it loses only to a provider installed earlier, which stays in use (logged once).
pub fn install_crypto_provider() -> bool {
    es256::install()
}

fn random(buf: &mut [u8]) -> Result<(), SigningError> {
    getrandom::fill(buf).map_err(|_| SigningError::KeyGeneration("OS random source unavailable"))
}

/// Rejection sampling: 32 random bytes are zero or >= the group order with probability ~2^-32,
/// so a handful of attempts failing means the random source is broken, not unlucky.
fn p256_key() -> Result<p256::ecdsa::SigningKey, SigningError> {
    let mut scalar = Zeroizing::new([0u8; 32]);
    for _ in 0..8 {
        random(&mut scalar[..])?;
        if let Ok(key) = p256::ecdsa::SigningKey::from_slice(&scalar[..]) {
            return Ok(key);
        }
    }
    Err(SigningError::KeyGeneration("no valid P-256 scalar drawn"))
}

/// The thumbprint's required members of a P-256 key.
fn p256_public_members(key: &p256::ecdsa::SigningKey) -> Result<Value, &'static str> {
    let point = key.verifying_key().to_sec1_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        return Err("public key is the identity point");
    };
    Ok(json!({"kty": "EC", "crv": "P-256", "x": b64url(x), "y": b64url(y)}))
}

/// The thumbprint's required members; also validates that `der` really is an Ed25519 key.
fn ed25519_public_members(der: &[u8]) -> Result<Value, &'static str> {
    let key = ed25519_dalek::SigningKey::from_pkcs8_der(der)
        .map_err(|_| "not a PKCS#8 Ed25519 private key")?;
    Ok(json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(key.verifying_key().as_bytes())}))
}

fn b64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn member<'a>(jwk: &'a Value, name: &str) -> Result<&'a str, SigningError> {
    let missing = SigningError::InvalidJwk("required member missing or not a string");
    jwk.get(name).and_then(Value::as_str).ok_or(missing)
}

/// RFC 7638 JWK thumbprint (SHA-256, base64url without padding). Only the required members take
/// part, in lexicographic order and without whitespace, so `kid`, `alg`, `use` or member order in
/// a published JWK can never change a key's identity.
pub fn thumbprint(jwk: &Value) -> Result<String, SigningError> {
    // Value's Display emits RFC 8259 string escaping, which §3.3 of RFC 7638 requires.
    let q = |name| member(jwk, name).map(|s| Value::from(s).to_string());
    let (crv, x) = (q("crv")?, q("x")?);
    let canonical = match member(jwk, "kty")? {
        "EC" => format!(r#"{{"crv":{crv},"kty":"EC","x":{x},"y":{}}}"#, q("y")?),
        "OKP" => format!(r#"{{"crv":{crv},"kty":"OKP","x":{x}}}"#),
        _ => return Err(SigningError::InvalidJwk("unsupported kty")),
    };
    Ok(b64url(Sha256::digest(canonical.as_bytes())))
}

/// How a key is persisted (JSON in a Kubernetes Secret).
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredKey {
    pub kid: String,
    pub alg: Algorithm,
    pub created_at: i64,
    pub retired_at: Option<i64>,
    /// PKCS#8 DER, base64 (standard alphabet, padded).
    pub private_key_pkcs8: String,
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .field("private_key_pkcs8", &"[redacted]")
            .finish()
    }
}

/// The operator's set of keys: exactly one active (the newest, not retired) plus retired ones kept
/// while tokens they signed can still be valid. Invariant: `keys[0]` is the active key and all
/// others are retired.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Vec<SigningKey>,
}

impl Keyring {
    /// `first` becomes the active key even if it was marked retired.
    pub fn new(mut first: SigningKey) -> Self {
        first.retired_at = None;
        Self { keys: vec![first] }
    }

    /// Several unretired keys can only come from a hand-edited Secret; the newest wins and the
    /// others count as retired when it was created, so their tokens keep verifying until pruned.
    pub fn from_stored(stored: &[StoredKey]) -> Result<Self, SigningError> {
        let mut keys: Vec<SigningKey> = Vec::with_capacity(stored.len());
        for s in stored {
            let invalid = |reason| SigningError::InvalidStoredKey {
                kid: s.kid.clone(),
                reason,
            };
            let der = Zeroizing::new(
                STANDARD
                    .decode(&s.private_key_pkcs8)
                    .map_err(|_| invalid("private key is not base64"))?,
            );
            let key =
                SigningKey::from_pkcs8(s.alg, &der, s.created_at, s.retired_at).map_err(invalid)?;
            if key.kid != s.kid {
                return Err(invalid("kid does not match the key's thumbprint"));
            }
            if keys.iter().any(|k| k.kid == key.kid) {
                return Err(invalid("key stored twice"));
            }
            keys.push(key);
        }
        // Unretired keys (newest first) ahead of retired ones (most recently retired first).
        keys.sort_by_key(|k| Reverse((k.retired_at.is_none(), k.retired_at, k.created_at)));
        let active_created = match keys.first() {
            None => return Err(SigningError::InvalidKeyring("no keys")),
            Some(k) if k.retired_at.is_some() => {
                return Err(SigningError::InvalidKeyring("every key is retired"));
            }
            Some(k) => k.created_at,
        };
        for k in keys[1..].iter_mut().filter(|k| k.retired_at.is_none()) {
            k.retired_at = Some(active_created);
        }
        Ok(Self { keys })
    }

    pub fn to_stored(&self) -> Vec<StoredKey> {
        self.keys
            .iter()
            .map(|k| StoredKey {
                kid: k.kid.clone(),
                alg: k.alg,
                created_at: k.created_at,
                retired_at: k.retired_at,
                private_key_pkcs8: STANDARD.encode(k.encoding.as_bytes()),
            })
            .collect()
    }

    pub fn active(&self) -> &SigningKey {
        &self.keys[0]
    }

    /// When the active key is due for replacement: active.created_at + period.
    pub fn rotation_due_at(&self, period_secs: i64) -> i64 {
        self.active().created_at.saturating_add(period_secs)
    }

    /// Retire the active key at `now` and make a freshly generated key active. The ring is left
    /// unchanged if generation fails.
    pub fn rotate(&mut self, alg: Algorithm, now: i64) -> Result<(), SigningError> {
        let next = SigningKey::generate(alg, now)?;
        self.keys[0].retired_at = Some(now);
        self.keys.insert(0, next);
        Ok(())
    }

    /// Retire the active key at `now` and make `next` (generated earlier and already published)
    /// active; its `created_at` becomes `now`, when it starts signing.
    pub fn rotate_to(&mut self, mut next: SigningKey, now: i64) {
        next.created_at = now;
        next.retired_at = None;
        self.keys[0].retired_at = Some(now);
        self.keys.insert(0, next);
    }

    /// Drop retired keys whose tokens have all expired: retired_at + max_token_lifetime_secs < now.
    /// Returns whether anything was dropped.
    pub fn prune(&mut self, now: i64, max_token_lifetime_secs: i64) -> bool {
        let before = self.keys.len();
        self.keys.retain(|k| {
            k.retired_at
                .is_none_or(|r| r.saturating_add(max_token_lifetime_secs) >= now)
        });
        self.keys.len() != before
    }

    /// JWKS document {"keys":[...]} with every key in the ring (active first), public parts only.
    pub fn jwks(&self) -> Value {
        json!({ "keys": self.keys.iter().map(SigningKey::public_jwk).collect::<Vec<_>>() })
    }

    pub fn keys(&self) -> &[SigningKey] {
        &self.keys
    }
}

/// Verifies a compact JWT against a JWKS document and returns its claims. The key is picked by
/// the header's `kid` and the header's `alg` must equal the JWK's, so a token can never choose
/// how it is verified. `exp` and `aud` are required (jsonwebtoken alone accepts a token with no
/// `aud` even when an audience is configured); `nbf` is checked when present.
pub fn verify(
    token: &str,
    jwks: &Value,
    audience: &str,
    leeway_secs: u64,
) -> Result<Value, SigningError> {
    install_crypto_provider();
    let header = jsonwebtoken::decode_header(token).map_err(|_| SigningError::MalformedToken)?;
    // RFC 9068 §4 allows the full media type as well.
    if !matches!(header.typ.as_deref(), Some("at+jwt" | "application/at+jwt")) {
        return Err(SigningError::WrongType);
    }
    let kid = header.kid.as_deref().ok_or(SigningError::UnknownKid)?;
    let jwk = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(SigningError::InvalidJwk("JWKS has no keys array"))?
        .iter()
        .find(|k| k["kid"] == kid)
        .ok_or(SigningError::UnknownKid)?;
    let alg: Algorithm = member(jwk, "alg")?.parse()?;
    if header.alg != alg.jwt() {
        return Err(SigningError::AlgorithmMismatch);
    }
    let key = decoding_key(alg, jwk)?;
    let mut validation = Validation::new(alg.jwt());
    // jsonwebtoken computes `now - leeway` in u64; a leeway beyond "now" already accepts any exp.
    validation.leeway = leeway_secs.min(jsonwebtoken::get_current_timestamp());
    validation.validate_nbf = true;
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "aud"]);
    let data =
        jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => SigningError::BadSignature,
            ErrorKind::ExpiredSignature => SigningError::Expired,
            ErrorKind::ImmatureSignature => SigningError::NotYetValid,
            ErrorKind::InvalidAudience => SigningError::WrongAudience,
            ErrorKind::InvalidAlgorithm => SigningError::AlgorithmMismatch,
            ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
                SigningError::InvalidClaims
            }
            ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidKeyFormat => SigningError::InvalidJwk("public key is unusable"),
            _ => SigningError::MalformedToken,
        })?;
    Ok(data.claims)
}

/// Verifies a compact JWS signed by the key it carries (`jwk`), such as a DPoP proof, with `alg`
/// (the caller read it from the header and checked it is one we accept), and returns its claims.
/// Straight on `ring`, without jsonwebtoken: the caller has parsed the header already, and a proof
/// is checked on every DPoP request. No claim is required here: the caller checks what its kind of
/// token needs.
pub fn verify_embedded(token: &str, alg: Algorithm, jwk: &Value) -> Result<Value, SigningError> {
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED, ED25519, UnparsedPublicKey, VerificationAlgorithm,
    };
    let (signing_input, signature) = token.rsplit_once('.').ok_or(SigningError::MalformedToken)?;
    let (_, payload) = signing_input
        .split_once('.')
        .ok_or(SigningError::MalformedToken)?;
    let decode = |text: &str| {
        URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| SigningError::MalformedToken)
    };
    let coordinate = |name: &str| -> Result<Vec<u8>, SigningError> {
        URL_SAFE_NO_PAD
            .decode(member(jwk, name)?)
            .ok()
            .filter(|bytes| bytes.len() == 32)
            .ok_or(SigningError::InvalidJwk("a key coordinate is not 32 bytes"))
    };
    let (kty, crv) = (member(jwk, "kty")?, member(jwk, "crv")?);
    let (algorithm, key): (&'static dyn VerificationAlgorithm, Vec<u8>) = match alg {
        Algorithm::ES256 if (kty, crv) == ("EC", "P-256") => {
            // An uncompressed point: 0x04, x, y (SEC 1 §2.3.3).
            let mut point = vec![4u8];
            point.extend(coordinate("x")?);
            point.extend(coordinate("y")?);
            (&ECDSA_P256_SHA256_FIXED, point)
        }
        Algorithm::EdDSA if (kty, crv) == ("OKP", "Ed25519") => (&ED25519, coordinate("x")?),
        _ => return Err(SigningError::InvalidJwk("kty/crv do not match alg")),
    };
    UnparsedPublicKey::new(algorithm, key)
        .verify(signing_input.as_bytes(), &decode(signature)?)
        .map_err(|_| SigningError::BadSignature)?;
    serde_json::from_slice::<Value>(&decode(payload)?)
        .ok()
        .filter(Value::is_object)
        .ok_or(SigningError::MalformedToken)
}

/// Verifies a Status List Token (`typ: statuslist+jwt`) published for `uri` against a JWKS and
/// returns its claims: the key is picked by `kid` with the JWK's own `alg`, `sub` must equal `uri`,
/// and `iat` and `exp` are required, so a list can be neither forged nor replayed under another uri.
pub fn verify_status_list(token: &str, jwks: &Value, uri: &str) -> Result<Value, SigningError> {
    install_crypto_provider();
    let header = jsonwebtoken::decode_header(token).map_err(|_| SigningError::MalformedToken)?;
    if header.typ.as_deref() != Some(crate::status_list::STATUS_LIST_TYP) {
        return Err(SigningError::WrongType);
    }
    let kid = header.kid.as_deref().ok_or(SigningError::UnknownKid)?;
    let jwk = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(SigningError::InvalidJwk("JWKS has no keys array"))?
        .iter()
        .find(|k| k["kid"] == kid)
        .ok_or(SigningError::UnknownKid)?;
    let alg: Algorithm = member(jwk, "alg")?.parse()?;
    if header.alg != alg.jwt() {
        return Err(SigningError::AlgorithmMismatch);
    }
    let key = decoding_key(alg, jwk)?;
    let mut validation = Validation::new(alg.jwt());
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["sub", "iat", "exp"]);
    let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => SigningError::BadSignature,
            ErrorKind::ExpiredSignature => SigningError::Expired,
            _ => SigningError::InvalidClaims,
        })?
        .claims;
    if claims["sub"].as_str() != Some(uri) {
        return Err(SigningError::InvalidClaims);
    }
    Ok(claims)
}

fn decoding_key(alg: Algorithm, jwk: &Value) -> Result<DecodingKey, SigningError> {
    let (kty, crv) = (member(jwk, "kty")?, member(jwk, "crv")?);
    let unusable = |_| SigningError::InvalidJwk("public key is unusable");
    match alg {
        Algorithm::ES256 if (kty, crv) == ("EC", "P-256") => {
            DecodingKey::from_ec_components(member(jwk, "x")?, member(jwk, "y")?).map_err(unusable)
        }
        Algorithm::EdDSA if (kty, crv) == ("OKP", "Ed25519") => {
            let x = member(jwk, "x")?;
            // jsonwebtoken slices `x[..32]` and would panic on a shorter key.
            if URL_SAFE_NO_PAD.decode(x).map(|b| b.len()).ok() != Some(32) {
                return Err(SigningError::InvalidJwk("Ed25519 x must be 32 bytes"));
            }
            DecodingKey::from_ed_components(x).map_err(unusable)
        }
        _ => Err(SigningError::InvalidJwk("kty/crv do not match alg")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SigningError as E;

    const AUD: &str = "https://api.example.com";

    macro_rules! assert_err {
        ($result:expr, $pattern:pat) => {{
            let result = $result;
            assert!(matches!(result, Err($pattern)), "{result:?}");
        }};
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn claims(aud: &str, exp: i64) -> Value {
        json!({"iss": "https://operator", "sub": "alice", "aud": aud, "exp": exp})
    }

    fn ring(alg: Algorithm) -> Keyring {
        Keyring::new(SigningKey::generate(alg, now()).unwrap())
    }

    /// Signs with `key`'s private key and alg, but with a header kid/typ chosen by the test.
    fn forge(key: &SigningKey, kid: &str, typ: &str) -> String {
        install_crypto_provider();
        let mut header = Header::new(key.alg.jwt());
        (header.typ, header.kid) = (Some(typ.into()), Some(kid.into()));
        jsonwebtoken::encode(&header, &claims(AUD, now() + 300), &key.encoding).unwrap()
    }

    #[test]
    fn sign_verify_round_trip_both_algorithms() {
        for alg in [Algorithm::ES256, Algorithm::EdDSA] {
            let ring = ring(alg);
            let c = claims(AUD, now() + 300);
            let token = ring.active().sign(&c).unwrap();
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.typ.as_deref(), Some("at+jwt"));
            assert_eq!(header.kid.as_deref(), Some(ring.active().kid()));
            assert_eq!(header.alg, alg.jwt());
            assert_eq!(verify(&token, &ring.jwks(), AUD, 0).unwrap(), c, "{alg}");
        }
    }

    #[test]
    fn verify_rejects_bad_tokens() {
        let ring = ring(Algorithm::ES256);
        let (key, jwks) = (ring.active(), ring.jwks());
        let check = |token: &str| verify(token, &jwks, AUD, 60);
        let sign = |c: &Value| key.sign(c).unwrap();

        assert_err!(
            check(&sign(&claims("other", now() + 300))),
            E::WrongAudience
        );
        assert_err!(check(&sign(&claims(AUD, now() - 600))), E::Expired);
        let no_aud = sign(&json!({"sub": "alice", "exp": now() + 300}));
        assert_err!(check(&no_aud), E::InvalidClaims);
        let mut early = claims(AUD, now() + 900);
        early["nbf"] = json!(now() + 600);
        assert_err!(check(&sign(&early)), E::NotYetValid);
        assert_err!(check(&forge(key, key.kid(), "JWT")), E::WrongType);
        assert_err!(check("not.a-token"), E::MalformedToken);

        // A key outside the JWKS: its own kid is unknown, and claiming ours fails the signature.
        let stranger = SigningKey::generate(Algorithm::ES256, now()).unwrap();
        let c = claims(AUD, now() + 300);
        assert_err!(check(&stranger.sign(&c).unwrap()), E::UnknownKid);
        let forged = forge(&stranger, key.kid(), "at+jwt");
        assert_err!(check(&forged), E::BadSignature);
        // An EdDSA token naming our ES256 key must not get to pick the verification algorithm.
        let ed = SigningKey::generate(Algorithm::EdDSA, now()).unwrap();
        assert_err!(
            check(&forge(&ed, key.kid(), "at+jwt")),
            E::AlgorithmMismatch
        );
    }

    #[test]
    fn verify_rejects_tampered_payload() {
        let ring = ring(Algorithm::EdDSA);
        let token = ring.active().sign(&claims(AUD, now() + 300)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let evil = b64url(payload.replace("alice", "mallory"));
        let tampered = format!("{}.{evil}.{}", parts[0], parts[2]);
        assert_err!(verify(&tampered, &ring.jwks(), AUD, 0), E::BadSignature);
    }

    #[test]
    fn short_ed25519_key_in_jwks_is_an_error_not_a_panic() {
        let ring = ring(Algorithm::EdDSA);
        let token = ring.active().sign(&claims(AUD, now() + 300)).unwrap();
        let mut jwks = ring.jwks();
        jwks["keys"][0]["x"] = json!(b64url([7u8; 16]));
        assert_err!(verify(&token, &jwks, AUD, 0), E::InvalidJwk(_));
    }

    #[test]
    fn thumbprint_matches_canonical_form_and_known_vectors() {
        // RFC 7517 A.1 EC key; the literal expected value was computed outside Rust.
        let x = "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4";
        let y = "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM";
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let independent = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        assert_eq!(independent, "cn-I_WNMClehiVp51i_0VpOENW1upEerA8sEam5hn-s");
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y});
        assert_eq!(thumbprint(&jwk).unwrap(), independent);

        // Extra members and a different member order do not change the thumbprint.
        let shuffled =
            json!({"use": "sig", "y": y, "kid": "k", "x": x, "crv": "P-256", "kty": "EC"});
        assert_eq!(thumbprint(&shuffled).unwrap(), independent);

        // RFC 8037 A.3 Ed25519 test vector.
        let x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
        let okp = json!({"x": x, "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA"});
        assert_eq!(
            thumbprint(&okp).unwrap(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );

        assert_err!(
            thumbprint(&json!({"kty": "EC", "crv": "P-256", "x": x})),
            E::InvalidJwk(_)
        );
        assert_err!(
            thumbprint(&json!({"kty": "oct", "crv": "P-256", "x": x})),
            E::InvalidJwk(_)
        );
    }

    #[test]
    fn generated_key_kid_is_thumbprint_of_its_public_jwk() {
        for alg in [Algorithm::ES256, Algorithm::EdDSA] {
            let key = SigningKey::generate(alg, 100).unwrap();
            let jwk = key.public_jwk();
            assert_eq!(thumbprint(&jwk).unwrap(), key.kid());
            assert_eq!(
                (&jwk["kid"], &jwk["alg"], &jwk["use"]),
                (&json!(key.kid()), &json!(alg), &json!("sig"))
            );
            assert!(jwk.get("d").is_none());
        }
    }

    #[test]
    fn stored_round_trip_keeps_kids_and_verifies_old_tokens() {
        let mut ring = ring(Algorithm::ES256);
        let old_token = ring.active().sign(&claims(AUD, now() + 300)).unwrap();
        ring.rotate(Algorithm::EdDSA, now()).unwrap();

        let json = serde_json::to_string(&ring.to_stored()).unwrap();
        assert!(json.contains("privateKeyPkcs8") && json.contains("retiredAt"));
        let restored =
            Keyring::from_stored(&serde_json::from_str::<Vec<_>>(&json).unwrap()).unwrap();

        let kids = |r: &Keyring| {
            r.keys()
                .iter()
                .map(|k| k.kid().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(kids(&restored), kids(&ring));
        assert!(verify(&old_token, &restored.jwks(), AUD, 0).is_ok());
        let new_token = restored.active().sign(&claims(AUD, now() + 300)).unwrap();
        assert!(verify(&new_token, &ring.jwks(), AUD, 0).is_ok());
    }

    #[test]
    fn from_stored_rejects_inconsistent_input() {
        let stored = ring(Algorithm::EdDSA).to_stored();
        let mut other_kid = stored.clone();
        other_kid[0].kid = SigningKey::generate(Algorithm::EdDSA, 0)
            .unwrap()
            .kid()
            .into();
        assert_err!(Keyring::from_stored(&other_kid), E::InvalidStoredKey { .. });
        let mut wrong_alg = stored.clone();
        wrong_alg[0].alg = Algorithm::ES256;
        assert_err!(Keyring::from_stored(&wrong_alg), E::InvalidStoredKey { .. });
        let mut all_retired = stored.clone();
        all_retired[0].retired_at = Some(1);
        assert_err!(Keyring::from_stored(&all_retired), E::InvalidKeyring(_));
        assert_err!(Keyring::from_stored(&[]), E::InvalidKeyring(_));
    }

    #[test]
    fn from_stored_makes_newest_unretired_key_active() {
        let (older, newer) = (ring(Algorithm::ES256), ring(Algorithm::EdDSA));
        let mut stored = older.to_stored();
        stored[0].created_at = 10;
        let mut newer_stored = newer.to_stored();
        newer_stored[0].created_at = 20;
        stored.extend(newer_stored);
        let ring = Keyring::from_stored(&stored).unwrap();
        assert_eq!(ring.active().kid(), newer.active().kid());
        assert_eq!(ring.keys()[1].retired_at(), Some(20));
    }

    #[test]
    fn rotate_to_activates_the_prepared_key() {
        let mut ring = Keyring::new(SigningKey::generate(Algorithm::ES256, 100).unwrap());
        let old = ring.active().kid().to_owned();
        let next = SigningKey::generate(Algorithm::ES256, 150).unwrap();
        let next_kid = next.kid().to_owned();
        ring.rotate_to(next, 200);
        assert_eq!(ring.active().kid(), next_kid);
        assert_eq!(
            ring.active().created_at(),
            200,
            "the period counts from activation"
        );
        assert_eq!(ring.keys()[1].kid(), old);
        assert_eq!(ring.keys()[1].retired_at(), Some(200));
        let restored = Keyring::from_stored(&ring.to_stored()).unwrap();
        assert_eq!(restored.active().kid(), next_kid);
    }

    #[test]
    fn rotate_keeps_old_key_published_and_valid() {
        let t0 = now();
        let mut ring = ring(Algorithm::ES256);
        assert_eq!(
            ring.rotation_due_at(3600),
            ring.active().created_at() + 3600
        );
        let old_kid = ring.active().kid().to_owned();
        let old_token = ring.active().sign(&claims(AUD, t0 + 300)).unwrap();

        ring.rotate(Algorithm::ES256, t0 + 10).unwrap();
        let active = ring.active();
        assert_ne!(active.kid(), old_kid);
        assert_eq!((active.created_at(), active.retired_at()), (t0 + 10, None));
        assert_eq!(
            (ring.keys()[1].kid(), ring.keys()[1].retired_at()),
            (&*old_kid, Some(t0 + 10))
        );
        assert_eq!(
            ring.jwks()["keys"],
            json!([active.public_jwk(), ring.keys()[1].public_jwk()])
        );
        assert!(verify(&old_token, &ring.jwks(), AUD, 0).is_ok());
    }

    #[test]
    fn prune_drops_retired_key_only_after_max_lifetime() {
        let mut ring = ring(Algorithm::EdDSA);
        ring.rotate(Algorithm::EdDSA, 1_000).unwrap();
        assert!(
            !ring.prune(1_600, 600),
            "at retired_at + lifetime tokens may still be valid"
        );
        assert_eq!(ring.keys().len(), 2);
        assert!(ring.prune(1_601, 600));
        assert_eq!(ring.keys().len(), 1);
        assert!(!ring.prune(i64::MAX, 600), "the active key is never pruned");
        assert_eq!(ring.active().retired_at(), None);
    }

    #[test]
    fn debug_output_hides_private_key() {
        let ring = ring(Algorithm::ES256);
        let stored = ring.to_stored();
        let secret = &stored[0].private_key_pkcs8;
        for debug in [
            format!("{:?}", ring.active()),
            format!("{stored:?}"),
            format!("{ring:?}"),
        ] {
            // 48..88 covers the private scalar; the start is a fixed DER prefix.
            assert!(
                !debug.contains(&secret[48..88]) && debug.contains("redacted"),
                "{debug}"
            );
        }
    }

    /// A key as the previous release wrote it to its Secret (generated and PKCS#8-encoded by
    /// `p256`; a throwaway test key), and a token signed as that release signed them (same layout,
    /// `p256` with its RFC 6979 nonce), valid until 2100.
    const P256_STORED: &str = r#"[{"kid":"cfx4P_gWbOwr1s_cd1o0gOXj8z8JS0bdcUOhljGRorE","alg":"ES256","createdAt":1700000000,"retiredAt":null,"privateKeyPkcs8":"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgWKjBkvnAqOgiKnO/elu4NhwstvAaRIIAU4zwbq5WN3KhRANCAASAWX9xGJ8pIS4ULDP+h+aU39d8jUR5sW/q3/BXLHdqH+SumnGOLJ/pbLxFeLfGQOYpsgRbSp+MamedwI/pYFsJ"}]"#;
    const P256_TOKEN: &str = "eyJ0eXAiOiJhdCtqd3QiLCJhbGciOiJFUzI1NiIsImtpZCI6ImNmeDRQX2dXYk93cjFzX2NkMW8wZ09Yajh6OEpTMGJkY1VPaGxqR1JvckUifQ.eyJhdWQiOiJodHRwczovL2FwaS5leGFtcGxlLmNvbSIsImV4cCI6NDEwMjQ0NDgwMCwiaXNzIjoiaHR0cHM6Ly9vcGVyYXRvciIsInN1YiI6ImFsaWNlIn0.LumjeT34Gex2KrPqv25yeSl6AauD646GGZnqrx2mMOhWT8whA5mTxscf1BBBWiQr-YDd6lze4kT73qBT9F6vnQ";

    /// The published JWK as a `p256` verifying key: what a RustCrypto resource server uses.
    fn p256_verifying_key(jwk: &Value) -> p256::ecdsa::VerifyingKey {
        let coordinate = |name| URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap()).unwrap();
        let point = [&[4u8][..], &coordinate("x"), &coordinate("y")].concat();
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap()
    }

    #[test]
    fn ring_is_jsonwebtokens_provider_once_signing_is_used() {
        assert!(install_crypto_provider());
        assert!(install_crypto_provider(), "a second call changes nothing");
        assert!(es256::is_default());
    }

    #[test]
    fn es256_token_signed_with_ring_verifies_with_p256() {
        use p256::ecdsa::signature::Verifier;
        let key = SigningKey::generate(Algorithm::ES256, now()).unwrap();
        let c = claims(AUD, now() + 300);
        let token = key.sign(&c).unwrap();
        let (message, signature) = token.rsplit_once('.').unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        let signature = p256::ecdsa::Signature::from_slice(&signature).unwrap();
        p256_verifying_key(&key.public_jwk())
            .verify(message.as_bytes(), &signature)
            .unwrap();

        // Header and payload laid out byte for byte as jsonwebtoken::encode does.
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        (header.typ, header.kid) = (Some("at+jwt".into()), Some(key.kid().into()));
        let by_jsonwebtoken = jsonwebtoken::encode(&header, &c, &key.encoding).unwrap();
        assert_eq!(by_jsonwebtoken.rsplit_once('.').unwrap().0, message);
    }

    #[test]
    fn es256_token_signed_with_p256_verifies_with_ring() {
        use p256::ecdsa::signature::Signer;
        let ring = ring(Algorithm::ES256);
        let stored = &ring.to_stored()[0];
        let der = STANDARD.decode(&stored.private_key_pkcs8).unwrap();
        let p256_key = p256::ecdsa::SigningKey::from_pkcs8_der(&der).unwrap();
        let c = claims(AUD, now() + 300);
        let by_ring = ring.active().sign(&c).unwrap();
        let message = by_ring.rsplit_once('.').unwrap().0;
        let signature: p256::ecdsa::Signature = p256_key.sign(message.as_bytes());
        let by_p256 = format!("{message}.{}", b64url(signature.to_bytes()));
        assert!(es256::is_default());
        assert_eq!(verify(&by_p256, &ring.jwks(), AUD, 0).unwrap(), c);

        let mut wrong = signature.to_bytes();
        wrong[10] ^= 1;
        let tampered = format!("{message}.{}", b64url(wrong));
        assert_err!(verify(&tampered, &ring.jwks(), AUD, 0), E::BadSignature);
    }

    #[test]
    fn key_stored_by_p256_release_loads_signs_and_its_tokens_verify() {
        use p256::ecdsa::signature::Verifier;
        let stored: Vec<StoredKey> = serde_json::from_str(P256_STORED).unwrap();
        let ring = Keyring::from_stored(&stored).unwrap();
        assert_eq!(
            serde_json::to_string(&ring.to_stored()).unwrap(),
            P256_STORED,
            "stored unchanged"
        );
        let old = verify(P256_TOKEN, &ring.jwks(), AUD, 0).unwrap();
        assert_eq!(old, claims(AUD, 4_102_444_800));

        let token = ring.active().sign(&claims(AUD, now() + 300)).unwrap();
        assert!(verify(&token, &ring.jwks(), AUD, 0).is_ok());
        let (message, signature) = token.rsplit_once('.').unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        let signature = p256::ecdsa::Signature::from_slice(&signature).unwrap();
        let der = STANDARD.decode(&stored[0].private_key_pkcs8).unwrap();
        let p256_key = p256::ecdsa::SigningKey::from_pkcs8_der(&der).unwrap();
        p256_key
            .verifying_key()
            .verify(message.as_bytes(), &signature)
            .unwrap();
    }

    #[test]
    fn es256_signatures_use_a_fresh_nonce_each_time() {
        // ring randomizes the nonce (hedged with the key and the message), where p256 derived
        // it from them alone (RFC 6979): the same claims sign differently, and both verify.
        let ring = ring(Algorithm::ES256);
        let c = claims(AUD, now() + 300);
        let (a, b) = (
            ring.active().sign(&c).unwrap(),
            ring.active().sign(&c).unwrap(),
        );
        assert_ne!(a, b);
        assert_eq!(a.rsplit_once('.').unwrap().0, b.rsplit_once('.').unwrap().0);
        for token in [a, b] {
            assert_eq!(verify(&token, &ring.jwks(), AUD, 0).unwrap(), c);
        }
    }

    #[test]
    fn off_curve_es256_key_in_jwks_is_unusable_not_a_bad_signature() {
        let ring = ring(Algorithm::ES256);
        let token = ring.active().sign(&claims(AUD, now() + 300)).unwrap();
        let mut jwks = ring.jwks();
        jwks["keys"][0]["y"] = jwks["keys"][0]["x"].clone();
        assert_err!(verify(&token, &jwks, AUD, 0), E::InvalidJwk(_));
    }

    #[test]
    fn algorithm_string_forms_agree() {
        for (alg, name) in [(Algorithm::ES256, "ES256"), (Algorithm::EdDSA, "EdDSA")] {
            assert_eq!(alg.to_string(), name);
            assert_eq!(name.parse::<Algorithm>().unwrap(), alg);
            assert_eq!(serde_json::to_value(alg).unwrap(), name);
            assert_eq!(
                serde_json::from_value::<Algorithm>(json!(name)).unwrap(),
                alg
            );
        }
        assert_err!("es256".parse::<Algorithm>(), E::UnsupportedAlgorithm);
    }
}

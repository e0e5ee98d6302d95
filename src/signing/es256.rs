//! ES256 on `ring`, about five times faster than RustCrypto's `p256` in both directions (on the
//! 2-core machine: verify 55 µs instead of 325, sign 18 µs instead of 100), which is most of what
//! a token exchange costs (issue #20). Keys are still generated, PKCS#8-encoded and published (JWK,
//! thumbprint) with `p256`; `ring` only signs and verifies, so Secrets and JWKS keep their format.
//!
//! Verification goes through jsonwebtoken, whose crypto is one process-wide `CryptoProvider`:
//! [`install`] makes ours (ES256 → `ring`, every other algorithm → jsonwebtoken's `rust_crypto`)
//! the default. A `SigningKey` signs without it, with a [`KeyPair`] parsed once: `ring` derives
//! the public point and a nonce key from the private key, which would cost about half a signature
//! again for every token if jsonwebtoken's signer factory parsed the PKCS#8 each time.
//!
//! Signatures are no longer deterministic: `p256` derives the nonce from the key and the message
//! (RFC 6979), `ring` hashes fresh OS randomness together with a secret derived from the key and
//! the message digest, so a faulty random source still cannot repeat a nonce for different
//! messages. Both produce ordinary ES256 signatures that either library verifies.

use std::sync::{Arc, LazyLock, OnceLock};

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, rust_crypto};
use jsonwebtoken::errors::{ErrorKind, Result as JwtResult};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{AlgorithmFamily, DecodingKey, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use serde::Serialize;
use zeroize::Zeroizing;

use super::{SigningError, b64url};

static PROVIDER: LazyLock<CryptoProvider> = LazyLock::new(|| CryptoProvider {
    signer_factory,
    verifier_factory,
    key_utils: rust_crypto::DEFAULT_PROVIDER.key_utils.clone(),
});

/// Makes ours jsonwebtoken's process-wide provider, once; returns whether it is. Called by every
/// function of `signing` that signs or verifies, so binaries, tests and benches all get it
/// without a step in `main`. It can lose only to a provider installed earlier (or to
/// jsonwebtoken's feature default, fixed by an `encode`/`decode` that ran first): tokens then
/// still verify, with that provider, only slower; a warning says so once.
pub fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| match LazyLock::force(&PROVIDER).install_default() {
        Ok(()) => true,
        Err(_) => {
            tracing::warn!(
                "jsonwebtoken already has a process-wide CryptoProvider: ES256 tokens are \
                 verified with it instead of ring (correct, but slower)"
            );
            false
        }
    })
}

/// Whether jsonwebtoken's process-wide provider is ours.
#[cfg(test)]
pub(super) fn is_default() -> bool {
    CryptoProvider::try_get_default().is_some_and(|p| std::ptr::eq(p, &*PROVIDER))
}

/// A P-256 key pair ready to sign. Unlike jsonwebtoken's `EncodingKey`, `ring` does not zeroize
/// the private scalar when the pair is dropped.
pub(super) type KeyPair = Arc<EcdsaKeyPair>;

/// From the key `p256` parsed (so any PKCS#8 the operator ever accepted still loads, whether or
/// not it embeds the public key, which `ring`'s own PKCS#8 parser requires).
pub(super) fn key_pair(key: &p256::ecdsa::SigningKey) -> Result<KeyPair, &'static str> {
    let scalar = Zeroizing::new(key.to_bytes());
    let point = key.verifying_key().to_sec1_point(false);
    EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &scalar,
        point.as_bytes(),
        &SystemRandom::new(),
    )
    .map(Arc::new)
    .map_err(|_| "P-256 key rejected by ring")
}

/// A compact JWS laid out exactly as `jsonwebtoken::encode` does (base64url of the header's and the
/// claims' JSON, then of the 64-byte r‖s signature), signed with `pair`.
pub(super) fn encode<T: Serialize>(
    pair: &EcdsaKeyPair,
    header: &Header,
    claims: &T,
) -> Result<String, SigningError> {
    let mut jws = format!("{}.{}", json_b64url(header)?, json_b64url(claims)?);
    let signature = pair
        .sign(&SystemRandom::new(), jws.as_bytes())
        .map_err(|_| SigningError::Signing("signature creation failed"))?;
    jws.push('.');
    jws.push_str(&b64url(signature));
    Ok(jws)
}

fn json_b64url<T: Serialize>(value: &T) -> Result<String, SigningError> {
    serde_json::to_vec(value)
        .map(b64url)
        .map_err(|_| SigningError::Signing("claims could not be serialized"))
}

fn signer_factory(
    alg: &jsonwebtoken::Algorithm,
    key: &EncodingKey,
) -> JwtResult<Box<dyn JwtSigner>> {
    match alg {
        jsonwebtoken::Algorithm::ES256 => {
            if key.family() != AlgorithmFamily::Ec {
                return Err(ErrorKind::InvalidKeyFormat.into());
            }
            // `ring`'s own parser: this path is only taken by direct `jsonwebtoken::encode` calls
            // (a `SigningKey` signs with its parsed pair).
            let pair = EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                key.as_bytes(),
                &SystemRandom::new(),
            )
            .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
            Ok(Box::new(Es256Signer(pair)))
        }
        _ => (rust_crypto::DEFAULT_PROVIDER.signer_factory)(alg, key),
    }
}

fn verifier_factory(
    alg: &jsonwebtoken::Algorithm,
    key: &DecodingKey,
) -> JwtResult<Box<dyn JwtVerifier>> {
    match alg {
        jsonwebtoken::Algorithm::ES256 => {
            if key.family() != AlgorithmFamily::Ec {
                return Err(ErrorKind::InvalidKeyFormat.into());
            }
            // `ring` checks the point only when verifying and would report an unusable key as a
            // bad signature; `p256` rejects it here as jsonwebtoken's own verifier does (and hands
            // `ring` the uncompressed form it expects). About a microsecond.
            let point = p256::ecdsa::VerifyingKey::from_sec1_bytes(key.try_get_as_bytes()?)
                .map_err(|_| ErrorKind::InvalidEcdsaKey)?
                .to_sec1_point(false);
            Ok(Box::new(Es256Verifier(point.as_bytes().to_vec())))
        }
        _ => (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key),
    }
}

struct Es256Signer(EcdsaKeyPair);

impl Signer<Vec<u8>> for Es256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let signature = self.0.sign(&SystemRandom::new(), msg);
        Ok(signature
            .map_err(|_| signature::Error::new())?
            .as_ref()
            .to_vec())
    }
}

impl JwtSigner for Es256Signer {
    fn algorithm(&self) -> jsonwebtoken::Algorithm {
        jsonwebtoken::Algorithm::ES256
    }
}

/// The uncompressed SEC1 point, already validated.
struct Es256Verifier(Vec<u8>);

impl Verifier<Vec<u8>> for Es256Verifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.0)
            .verify(msg, signature)
            .map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for Es256Verifier {
    fn algorithm(&self) -> jsonwebtoken::Algorithm {
        jsonwebtoken::Algorithm::ES256
    }
}

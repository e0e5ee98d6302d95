//! A grant's token sealed for Pod delivery: encrypted and authenticated (AES-256-GCM) under a key
//! derived from the signing key that signed it, bound to the grant's namespace, name and uid. The
//! leader writes it to the grant's status instead of a Secret; every replica serving the token
//! endpoint holds the signing keys and opens it to hand the agent's pods tokens of their own.
//!
//! Whoever can read the status sees ciphertext. Whoever can write it can delete it (the grant gets
//! a new token, the old one revoked), or put back an older sealed token of the same grant: that is
//! still a token the operator minted for that grant, and the token endpoint serves nothing from it
//! unless it verifies and is VALID in the published status list now. The associated data stops a
//! sealed token from opening under any other grant (another name, namespace, or a re-created grant).
//!
//! Format: `v1.<kid>.<nonce>.<ciphertext>` (base64url, no padding).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::{api::DelegationGrant, signing::SigningKey};

const VERSION: &str = "v1";
/// Domain separation: this key is for sealing tokens and nothing else.
const LABEL: &[u8] = b"delegation-operator token seal v1";

/// The grant a sealed token belongs to (its associated data).
#[derive(Clone, Copy, Debug)]
pub struct GrantId<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

impl<'a> GrantId<'a> {
    /// The id of `grant` as stored (empty strings where the apiserver gave none).
    pub fn of(grant: &'a DelegationGrant) -> Self {
        Self {
            namespace: grant.metadata.namespace.as_deref().unwrap_or_default(),
            name: grant.metadata.name.as_deref().unwrap_or_default(),
            uid: grant.metadata.uid.as_deref().unwrap_or_default(),
        }
    }

    fn associated_data(&self) -> String {
        // Neither a namespace nor a grant name can contain '/'.
        format!("{}/{}/{}", self.namespace, self.name, self.uid)
    }
}

/// Why a sealed token does not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the sealed token is not in the v1.<kid>.<nonce>.<ciphertext> form")]
    Malformed,
    #[error("the sealed token names a signing key this issuer does not hold")]
    UnknownKey,
    #[error("the sealed token does not open (altered, or sealed for another grant)")]
    DoesNotOpen,
    #[error("no randomness for a nonce")]
    NoRandomness,
}

/// The sealing key of a signing key, from its private PKCS#8 bytes (HKDF-SHA256).
pub(crate) fn derive_key(private_pkcs8: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, LABEL).extract(private_pkcs8);
    // Expanding 32 bytes with SHA-256 cannot fail (the limit is 255 blocks); were it to, no key
    // (never a zero one) would be better than a guessable one.
    prk.expand(&[LABEL], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut key[..]))
        .expect("HKDF-SHA256 expands 32 bytes");
    key
}

fn aead_key(key: &SigningKey) -> LessSafeKey {
    // A 32-byte key is always a valid AES-256 key.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.seal_key()).expect("32-byte AES-256 key"))
}

/// Seals `token` for `grant` with `key` (the key that signed it).
pub fn seal(key: &SigningKey, grant: GrantId<'_>, token: &str) -> Result<String, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::NoRandomness)?;
    let mut data = token.as_bytes().to_vec();
    aead_key(key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(grant.associated_data()),
            &mut data,
        )
        .map_err(|_| SealError::DoesNotOpen)?;
    Ok(format!(
        "{VERSION}.{}.{}.{}",
        key.kid(),
        URL_SAFE_NO_PAD.encode(nonce),
        URL_SAFE_NO_PAD.encode(data)
    ))
}

/// Opens a sealed token of `grant` with whichever of `keys` it names.
pub fn open(keys: &[SigningKey], grant: GrantId<'_>, sealed: &str) -> Result<String, SealError> {
    let parts: Vec<&str> = sealed.split('.').collect();
    let [version, kid, nonce, data] = parts[..] else {
        return Err(SealError::Malformed);
    };
    if version != VERSION {
        return Err(SealError::Malformed);
    }
    let key = keys
        .iter()
        .find(|k| k.kid() == kid)
        .ok_or(SealError::UnknownKey)?;
    let nonce: [u8; NONCE_LEN] = URL_SAFE_NO_PAD
        .decode(nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or(SealError::Malformed)?;
    let mut data = URL_SAFE_NO_PAD
        .decode(data)
        .map_err(|_| SealError::Malformed)?;
    let plain = aead_key(key)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(grant.associated_data()),
            &mut data,
        )
        .map_err(|_| SealError::DoesNotOpen)?;
    String::from_utf8(plain.to_vec()).map_err(|_| SealError::DoesNotOpen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::Algorithm;

    const GRANT: GrantId<'static> = GrantId {
        namespace: "team-a",
        name: "triage",
        uid: "0b1c",
    };

    fn key() -> SigningKey {
        SigningKey::generate(Algorithm::ES256, 0).expect("key")
    }

    #[test]
    fn a_sealed_token_opens_only_for_its_grant_and_under_its_key() {
        let (key, other_key) = (key(), key());
        let sealed = seal(&key, GRANT, "header.payload.signature").expect("sealed");
        assert!(!sealed.contains("payload"), "the token is not readable");
        assert_eq!(sealed.split('.').nth(1), Some(key.kid()));
        let keys = [other_key.clone(), key.clone()];
        assert_eq!(
            open(&keys, GRANT, &sealed).as_deref(),
            Ok("header.payload.signature")
        );
        for other in [
            GrantId {
                name: "other",
                ..GRANT
            },
            GrantId {
                namespace: "team-b",
                ..GRANT
            },
            GrantId {
                uid: "re-created",
                ..GRANT
            },
        ] {
            assert_eq!(open(&keys, other, &sealed), Err(SealError::DoesNotOpen));
        }
        assert_eq!(
            open(std::slice::from_ref(&other_key), GRANT, &sealed),
            Err(SealError::UnknownKey)
        );
    }

    #[test]
    fn two_seals_differ_and_an_altered_one_does_not_open() {
        let key = key();
        let keys = std::slice::from_ref(&key);
        let (a, b) = (
            seal(&key, GRANT, "t").expect("sealed"),
            seal(&key, GRANT, "t").expect("sealed"),
        );
        assert_ne!(a, b, "a fresh nonce each time");
        let mut parts: Vec<String> = a.split('.').map(str::to_owned).collect();
        let mut data = URL_SAFE_NO_PAD.decode(&parts[3]).expect("b64");
        data[0] ^= 1;
        parts[3] = URL_SAFE_NO_PAD.encode(data);
        assert_eq!(
            open(keys, GRANT, &parts.join(".")),
            Err(SealError::DoesNotOpen)
        );
        for junk in ["", "v1", "v2.a.b.c", "v1.kid.b.c.d", &"x".repeat(10_000)] {
            assert!(open(keys, GRANT, junk).is_err(), "{junk:.20}");
        }
    }

    /// Each signing key seals under a key of its own, the same every time it is loaded (every
    /// replica opens what the leader sealed), and not its private key's bytes.
    #[test]
    fn each_signing_key_has_its_own_stable_sealing_key() {
        let (a, b) = (key(), key());
        assert_ne!(a.seal_key(), b.seal_key());
        let pkcs8 = b"a private key's PKCS#8 bytes, long enough to hold 32 bytes of them";
        let derived = derive_key(pkcs8);
        assert_eq!(*derived, *derive_key(pkcs8));
        assert_ne!(*derived, [0u8; 32]);
        assert!(!pkcs8.windows(32).any(|w| w == &derived[..]));
    }
}

//! Unit and property tests of DPoP proof checking and the replay cache.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::signing::{Algorithm, SigningKey};

const NOW: i64 = 1_800_000_000;
const URI: &str = "https://issuer.example.com/token";
const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";

fn key(alg: Algorithm) -> SigningKey {
    SigningKey::generate(alg, NOW).unwrap()
}

fn claims() -> Value {
    json!({"jti": "proof-1", "htm": "POST", "htu": URI, "iat": NOW})
}

fn request() -> Request<'static> {
    Request {
        method: "POST",
        uri: URI,
        token: Some(TOKEN),
        require_ath: false,
        now: NOW,
    }
}

fn proof_with(key: &SigningKey, edit: impl FnOnce(&mut Value)) -> String {
    let mut c = claims();
    edit(&mut c);
    key.sign_proof(&c).unwrap()
}

/// A proof whose header is replaced (the signature then no longer matches; checks that look at the
/// header come first).
fn with_header(proof: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut parts: Vec<String> = proof.split('.').map(str::to_owned).collect();
    let mut header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[0]).unwrap()).unwrap();
    edit(&mut header);
    parts[0] = URL_SAFE_NO_PAD.encode(header.to_string());
    parts.join(".")
}

#[test]
fn a_good_proof_yields_its_keys_thumbprint() {
    for alg in [Algorithm::ES256, Algorithm::EdDSA] {
        let k = key(alg);
        let proof = proof_with(&k, |_| {});
        let checked = check_proof(&proof, &request()).unwrap();
        assert_eq!(
            checked.jkt,
            crate::signing::thumbprint(&k.public_jwk()).unwrap()
        );
        assert_eq!((checked.jti.as_str(), checked.iat), ("proof-1", NOW));
    }
}

#[test]
fn each_check_of_rfc_9449_refuses_what_it_should() {
    let k = key(Algorithm::ES256);
    let other = key(Algorithm::ES256);
    let good = proof_with(&k, |_| {});
    let signed_by_other = {
        // The header names k's key; the signature is other's.
        let forged = proof_with(&other, |_| {});
        let mut parts: Vec<&str> = good.split('.').collect();
        let sig = forged.rsplit('.').next().unwrap();
        parts[2] = sig;
        parts.join(".")
    };
    let mut private_jwk = k.public_jwk();
    private_jwk["d"] = "c2VjcmV0".into();
    let cases: Vec<(&str, String, Request<'_>, ProofError)> = vec![
        ("not a JWT", "abc".into(), request(), ProofError::Malformed),
        ("two parts", "a.b".into(), request(), ProofError::Malformed),
        (
            "huge",
            "a".repeat(MAX_PROOF_BYTES + 1),
            request(),
            ProofError::TooLarge,
        ),
        (
            "another typ",
            with_header(&good, |h| h["typ"] = "at+jwt".into()),
            request(),
            ProofError::WrongType,
        ),
        (
            "no typ",
            with_header(&good, |h| {
                h.as_object_mut().unwrap().remove("typ");
            }),
            request(),
            ProofError::WrongType,
        ),
        (
            "alg none",
            with_header(&good, |h| h["alg"] = "none".into()),
            request(),
            ProofError::Algorithm,
        ),
        (
            "alg HS256",
            with_header(&good, |h| h["alg"] = "HS256".into()),
            request(),
            ProofError::Algorithm,
        ),
        (
            "no jwk",
            with_header(&good, |h| {
                h.as_object_mut().unwrap().remove("jwk");
            }),
            request(),
            ProofError::Key("no jwk in the header"),
        ),
        (
            "a private key in the header",
            with_header(&good, |h| h["jwk"] = private_jwk.clone()),
            request(),
            ProofError::PrivateKey,
        ),
        (
            "a jwk of another kind than alg",
            with_header(&good, |h| h["jwk"] = key(Algorithm::EdDSA).public_jwk()),
            request(),
            ProofError::Key("kty/crv do not match alg"),
        ),
        (
            "signed by another key",
            signed_by_other,
            request(),
            ProofError::Signature,
        ),
        (
            "the header's key swapped for another",
            with_header(&good, |h| h["jwk"] = other.public_jwk()),
            request(),
            ProofError::Signature,
        ),
        (
            "no jti",
            proof_with(&k, |c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
            request(),
            ProofError::MissingClaim("jti"),
        ),
        (
            "no htu",
            proof_with(&k, |c| {
                c.as_object_mut().unwrap().remove("htu");
            }),
            request(),
            ProofError::MissingClaim("htu"),
        ),
        (
            "iat a string",
            proof_with(&k, |c| c["iat"] = "now".into()),
            request(),
            ProofError::MissingClaim("iat"),
        ),
        (
            "an empty jti",
            proof_with(&k, |c| c["jti"] = "".into()),
            request(),
            ProofError::Jti,
        ),
        (
            "for another method",
            proof_with(&k, |c| c["htm"] = "GET".into()),
            request(),
            ProofError::Method("GET".into()),
        ),
        (
            "for another URL",
            proof_with(&k, |c| c["htu"] = "https://issuer.example.com/other".into()),
            request(),
            ProofError::Uri(URI.into()),
        ),
        (
            "for another host",
            proof_with(&k, |c| c["htu"] = "https://evil.example.com/token".into()),
            request(),
            ProofError::Uri(URI.into()),
        ),
        (
            "too old",
            proof_with(&k, |c| c["iat"] = (NOW - IAT_PAST_SECS - 1).into()),
            request(),
            ProofError::Time(-IAT_PAST_SECS - 1),
        ),
        (
            "from the future",
            proof_with(&k, |c| c["iat"] = (NOW + IAT_FUTURE_SECS + 1).into()),
            request(),
            ProofError::Time(IAT_FUTURE_SECS + 1),
        ),
        (
            "ath of another token",
            proof_with(&k, |c| c["ath"] = access_token_hash("another").into()),
            request(),
            ProofError::AccessTokenHash,
        ),
        (
            "no ath where a bound token is presented",
            good.clone(),
            Request {
                require_ath: true,
                ..request()
            },
            ProofError::AccessTokenHash,
        ),
        (
            "ath but no token presented",
            proof_with(&k, |c| c["ath"] = access_token_hash(TOKEN).into()),
            Request {
                token: None,
                ..request()
            },
            ProofError::AccessTokenHash,
        ),
    ];
    for (name, proof, request, expected) in cases {
        assert_eq!(check_proof(&proof, &request), Err(expected), "{name}");
    }
}

#[test]
fn what_the_rfc_allows_is_accepted() {
    let k = key(Algorithm::ES256);
    let ok = |proof: String, request: Request<'_>| check_proof(&proof, &request).is_ok();
    // Query and fragment of htu are ignored; scheme and host compare without case.
    assert!(ok(
        proof_with(&k, |c| c["htu"] = format!("{URI}?x=1#f").into()),
        request()
    ));
    assert!(ok(
        proof_with(&k, |c| c["htu"] = "HTTPS://Issuer.Example.com/token".into()),
        request()
    ));
    // The edges of the iat window, an ath of the presented token, and a nonce we never asked for.
    assert!(ok(
        proof_with(&k, |c| c["iat"] = (NOW - IAT_PAST_SECS).into()),
        request()
    ));
    assert!(ok(
        proof_with(&k, |c| c["iat"] = (NOW + IAT_FUTURE_SECS).into()),
        request()
    ));
    let with_ath = proof_with(&k, |c| {
        c["ath"] = access_token_hash(TOKEN).into();
        c["nonce"] = "n".into();
    });
    assert!(ok(
        with_ath,
        Request {
            require_ath: true,
            ..request()
        }
    ));
    // The path is compared exactly.
    assert!(!ok(
        proof_with(&k, |c| c["htu"] = "https://issuer.example.com/Token".into()),
        request()
    ));
}

#[test]
fn the_ath_is_the_base64url_sha256_of_the_token() {
    // RFC 9449 §7.1's example: the token "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU" has this ath.
    assert_eq!(
        access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    );
}

#[test]
fn a_proof_is_accepted_once_within_its_window() {
    let k = key(Algorithm::ES256);
    let proof = check_proof(&proof_with(&k, |_| {}), &request()).unwrap();
    let mut cache = ReplayCache::new(10);
    assert_eq!(cache.remember(&proof, "ns/sa", NOW), Ok(()));
    assert_eq!(
        cache.remember(&proof, "ns/sa", NOW + 30),
        Err(ProofError::Replayed)
    );
    // The same jti from another key is another proof.
    let other = check_proof(&proof_with(&key(Algorithm::ES256), |_| {}), &request()).unwrap();
    assert_eq!(cache.remember(&other, "ns/sa", NOW), Ok(()));
    // Forgotten once its iat is out of the window: by then the proof is refused as too old.
    assert_eq!(
        cache.remember(&proof, "ns/sa", NOW + IAT_PAST_SECS),
        Err(ProofError::Replayed)
    );
    let late = Request {
        now: NOW + IAT_PAST_SECS + 1,
        ..request()
    };
    assert_eq!(
        check_proof(&proof_with(&k, |_| {}), &late),
        Err(ProofError::Time(-IAT_PAST_SECS - 1))
    );
    let fresh = Proof {
        jti: "fresh".into(),
        iat: NOW + IAT_PAST_SECS + 1,
        ..proof.clone()
    };
    assert_eq!(
        cache.remember(&fresh, "ns/sa", NOW + IAT_PAST_SECS + 1),
        Ok(())
    );
    assert_eq!(cache.len(), 1, "the two old proofs were forgotten");
}

/// A proof checked just inside its window and remembered just after it (a TokenReview in between)
/// is refused, never accepted because its first use was forgotten meanwhile.
#[test]
fn a_proof_remembered_after_its_window_is_refused_not_replayed() {
    let mut cache = ReplayCache::new(10);
    let proof = Proof {
        jkt: "k".into(),
        jti: "p".into(),
        iat: NOW,
    };
    assert_eq!(cache.remember(&proof, "ns/sa", NOW + 10), Ok(()));
    // The replay passed check_proof at NOW + 60; the review took two seconds.
    assert_eq!(
        cache.remember(&proof, "ns/sa", NOW + IAT_PAST_SECS + 2),
        Err(ProofError::Time(-IAT_PAST_SECS - 2))
    );
}

#[test]
fn a_full_replay_cache_refuses_rather_than_forgets() {
    let mut cache = ReplayCache::new(3);
    let proof = |n: usize| Proof {
        jkt: "k".into(),
        jti: format!("p{n}"),
        iat: NOW,
    };
    for n in 0..3 {
        cache
            .remember(&proof(n), &format!("ns/sa-{n}"), NOW)
            .unwrap();
    }
    assert_eq!(
        cache.remember(&proof(3), "ns/sa-3", NOW),
        Err(ProofError::ReplayCacheFull)
    );
    assert_eq!(
        cache.remember(&proof(0), "ns/sa-0", NOW),
        Err(ProofError::Replayed)
    );
    // Room again once the window has passed.
    let later = Proof {
        iat: NOW + IAT_PAST_SECS + 1,
        ..proof(3)
    };
    assert_eq!(
        cache.remember(&later, "ns/sa-3", NOW + IAT_PAST_SECS + 1),
        Ok(())
    );
}

/// One caller can use free room, but once the cache is half full only its share: past it, its own
/// proofs are refused while everyone else's are still accepted; its share frees as its proofs
/// leave the window.
#[test]
fn one_caller_cannot_fill_the_replay_cache() {
    let mut cache = ReplayCache::new(64);
    let (half, share) = (32, 64 / CALLER_SHARE_DIVISOR);
    let proof = |n: usize, iat: i64| Proof {
        jkt: "k".into(),
        jti: format!("p{n}"),
        iat,
    };
    for n in 0..half {
        assert_eq!(cache.remember(&proof(n, NOW), "greedy", NOW), Ok(()));
    }
    assert_eq!(
        cache.remember(&proof(half, NOW), "greedy", NOW),
        Err(ProofError::CallerOverQuota)
    );
    // A replay is still told apart from the quota.
    assert_eq!(
        cache.remember(&proof(0, NOW), "greedy", NOW),
        Err(ProofError::Replayed)
    );
    for caller in ["honest", "other"] {
        for n in 0..share {
            let theirs = Proof {
                jkt: caller.into(),
                ..proof(n, NOW)
            };
            assert_eq!(cache.remember(&theirs, caller, NOW), Ok(()), "{caller} {n}");
        }
        let over = Proof {
            jkt: caller.into(),
            ..proof(share, NOW)
        };
        assert_eq!(
            cache.remember(&over, caller, NOW),
            Err(ProofError::CallerOverQuota),
            "past half full, everyone keeps to a share"
        );
    }
    assert_eq!(cache.len(), half + 2 * share);
    let later = NOW + IAT_PAST_SECS + 1;
    assert_eq!(
        cache.remember(&proof(half, later), "greedy", later),
        Ok(()),
        "its share freed with the window"
    );
    assert_eq!(cache.len(), 1);
}

proptest! {
    /// Whatever bytes stand in a proof, checking it returns an answer and never panics; and no
    /// proof id is accepted twice while remembered.
    #[test]
    fn any_input_gets_an_answer(text in ".{0,300}", parts in prop::collection::vec("[A-Za-z0-9_-]{0,80}", 0..5)) {
        let _ = check_proof(&text, &request());
        let _ = check_proof(&parts.join("."), &request());
    }

    #[test]
    fn no_proof_is_accepted_twice_within_its_window(
        ops in prop::collection::vec((0usize..20, 0i64..200), 1..200),
    ) {
        let mut cache = ReplayCache::new(1000);
        let mut accepted: Vec<(usize, i64)> = Vec::new();
        let mut now = NOW;
        for (jti, step) in ops {
            now += step / 20;
            let proof = Proof { jkt: "k".into(), jti: jti.to_string(), iat: now };
            let result = cache.remember(&proof, "ns/sa", now);
            let live = accepted.iter().any(|(j, at)| *j == jti && now <= at + IAT_PAST_SECS);
            if live {
                prop_assert_eq!(result, Err(ProofError::Replayed));
            } else {
                prop_assert_eq!(result, Ok(()));
                accepted.push((jti, now));
            }
        }
    }
}

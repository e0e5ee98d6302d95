//! DPoP (RFC 9449) at the token endpoint (issue #21, proof of possession), against the real
//! apiserver and the live endpoint: a client sends a proof with its exchange and gets a token bound
//! to its key (`cnf.jkt`, `token_type` DPoP); a bound token is exchanged only with a proof by its key,
//! and what it yields stays bound; every malformed, forged, misdirected, stale or replayed proof is
//! refused `invalid_dpop_proof` and mints nothing. Proofs are made by the npm package `jose` (an
//! independent client) and by our own signing code, and a resource server written with `jose`
//! checks a bound token we issued against a proof by its key.
//!
//! Tokens and keys are never printed: see `support::exchange`.

mod support;

use delegation_operator::{
    dpop::access_token_hash,
    signing::{Algorithm, SigningKey},
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use support::{
    exchange::{AUDIENCE, Exchange, Step},
    verifiers::{alg_none, hs256_with_public_key, jose_checks_dpop, jose_proof, with_header},
};

const INVALID_DPOP_PROOF: &str = "invalid_dpop_proof";
/// A resource server's URL, as a proof for a request to it names it.
const RESOURCE_URL: &str = "https://tickets.example.com/tickets/42";

/// A proof by `key` made with our own signing code: `htm` POST to the token endpoint, `ath` of
/// `token` when given, `edit` applied to the claims.
fn our_proof(
    x: &Exchange,
    key: &SigningKey,
    token: Option<&str>,
    edit: impl FnOnce(&mut Value),
) -> String {
    let mut claims = json!({
        "jti": uuid::Uuid::new_v4().to_string(),
        "htm": "POST",
        "htu": x.token_endpoint(),
        "iat": Timestamp::now().as_second(),
    });
    if let Some(token) = token {
        claims["ath"] = access_token_hash(token).into();
    }
    edit(&mut claims);
    key.sign_proof(&claims).unwrap()
}

fn thumbprint(key: &SigningKey) -> String {
    delegation_operator::signing::thumbprint(&key.public_jwk()).unwrap()
}

/// The grant's token narrowed by agent a's workload with a proof by a new `jose` key: the bound token,
/// and the key.
async fn bound_token(x: &Exchange) -> (String, Value, String) {
    let (key, jkt, proof) =
        jose_proof(None, "POST", &x.token_endpoint(), Some(&x.grant_token)).await;
    let form = Exchange::form(&x.grant_token, &x.a.token, &[("scope", "tickets:read")]);
    let (token, _) = x
        .exchanged_with(
            &form,
            Some((&proof, &jkt)),
            &x.grant_token,
            &x.a,
            Step::Narrowing,
        )
        .await;
    (token, key, jkt)
}

/// A proof made by `jose` binds the exchanged token to its key; a resource server written with
/// `jose` accepts the token with a proof by that key for its own URL, and refuses it with a proof by
/// any other key (a stolen token is useless). A proof by our own code (EdDSA) binds as well.
#[tokio::test]
async fn a_proof_binds_the_exchanged_token_and_an_independent_resource_server_checks_it() {
    let x = Exchange::start("dpop-bind").await;
    let (bound, key, _) = bound_token(&x).await;

    let (_, _, for_resource) = jose_proof(Some(&key), "GET", RESOURCE_URL, Some(&bound)).await;
    let (accepted, reason) = jose_checks_dpop(
        &x.issuer.url,
        &x.trust.ca_path,
        AUDIENCE,
        &bound,
        &for_resource,
        ("GET", RESOURCE_URL),
    )
    .await;
    assert!(
        accepted,
        "jose refused the bound token with its key's proof: {reason}"
    );

    let (_, _, by_thief) = jose_proof(None, "GET", RESOURCE_URL, Some(&bound)).await;
    let (accepted, reason) = jose_checks_dpop(
        &x.issuer.url,
        &x.trust.ca_path,
        AUDIENCE,
        &bound,
        &by_thief,
        ("GET", RESOURCE_URL),
    )
    .await;
    assert!(!accepted, "a proof by another key must not do");
    assert_eq!(reason, "cnf.jkt is not the proof key");

    // Our own client code, with an Ed25519 key, binds too.
    let ed = SigningKey::generate(Algorithm::EdDSA, Timestamp::now().as_second()).unwrap();
    let proof = our_proof(&x, &ed, None, |_| {});
    let form = Exchange::form(&x.grant_token, &x.a.token, &[]);
    x.exchanged_with(
        &form,
        Some((&proof, &thumbprint(&ed))),
        &x.grant_token,
        &x.a,
        Step::Narrowing,
    )
    .await;
}

/// A bound token: refused without a proof, with a proof by another key, or with its key's proof
/// lacking `ath`; with its key's proof it exchanges, and what it yields is bound to the same key. Its
/// next agent's workload, holding another key, cannot use it; a hop from the unbound grant token is
/// bound to the key of whoever exchanged it.
#[tokio::test]
async fn a_bound_token_is_exchanged_only_with_a_proof_by_its_key() {
    let x = Exchange::start("dpop-bound").await;
    let (bound, key, jkt) = bound_token(&x).await;
    let endpoint = x.token_endpoint();
    let form = Exchange::form(&bound, &x.a.token, &[]);

    x.refused_because_with(&form, &[], INVALID_DPOP_PROOF, "proof_required")
        .await;
    let (_, _, other_key) = jose_proof(None, "POST", &endpoint, Some(&bound)).await;
    x.refused_because_with(
        &form,
        &[("DPoP", &other_key)],
        INVALID_DPOP_PROOF,
        "proof_key_mismatch",
    )
    .await;
    let (_, _, no_ath) = jose_proof(Some(&key), "POST", &endpoint, None).await;
    x.refused_because_with(
        &form,
        &[("DPoP", &no_ath)],
        INVALID_DPOP_PROOF,
        "proof_invalid",
    )
    .await;

    let (_, _, good) = jose_proof(Some(&key), "POST", &endpoint, Some(&bound)).await;
    let (again, _) = x
        .exchanged_with(&form, Some((&good, &jkt)), &bound, &x.a, Step::Narrowing)
        .await;
    assert_ne!(again, bound);

    // b's workload got the bound token (a hop would make b the actor) but holds its own key.
    let hop = Exchange::form(&bound, &x.b.token, &[]);
    let (_, _, b_proof) = jose_proof(None, "POST", &endpoint, Some(&bound)).await;
    x.refused_because_with(
        &hop,
        &[("DPoP", &b_proof)],
        INVALID_DPOP_PROOF,
        "proof_key_mismatch",
    )
    .await;
    // From the unbound grant token, b's hop is bound to b's own key.
    let (_, b_jkt, b_proof) = jose_proof(None, "POST", &endpoint, Some(&x.grant_token)).await;
    let hop = Exchange::form(&x.grant_token, &x.b.token, &[]);
    x.exchanged_with(
        &hop,
        Some((&b_proof, &b_jkt)),
        &x.grant_token,
        &x.b,
        Step::Hop("b"),
    )
    .await;
}

/// RFC 9449 §4.3, each check against the live endpoint: a proof for another method or URL, too old
/// or from the future, with a private key in its header, `alg: none`, HS256 keyed with its public key,
/// signed by another key than its header's, with the `ath` of another token, two DPoP headers, and a
/// replayed proof. Each is refused `invalid_dpop_proof`, names no token, and mints nothing.
#[tokio::test]
async fn bad_proofs_are_refused_and_mint_nothing() {
    let x = Exchange::start("dpop-attacks").await;
    let key = SigningKey::generate(Algorithm::ES256, Timestamp::now().as_second()).unwrap();
    let other = SigningKey::generate(Algorithm::ES256, Timestamp::now().as_second()).unwrap();
    let grant = x.grant_token.clone();
    let form = Exchange::form(&grant, &x.a.token, &[]);
    let now = Timestamp::now().as_second();
    let good = our_proof(&x, &key, Some(&grant), |_| {});
    let signed_by_other = {
        let by_other = our_proof(&x, &other, Some(&grant), |_| {});
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[2] = by_other.rsplit('.').next().unwrap();
        parts.join(".")
    };
    let mut private_jwk = key.public_jwk();
    private_jwk["d"] = "bm90LWEtcmVhbC1rZXk".into();
    let cases: Vec<(&str, String)> = vec![
        (
            "for GET",
            our_proof(&x, &key, Some(&grant), |c| c["htm"] = "GET".into()),
        ),
        (
            "for another URL",
            our_proof(&x, &key, Some(&grant), |c| {
                c["htu"] = format!("{}/introspect", x.issuer.url).into()
            }),
        ),
        (
            "too old",
            our_proof(&x, &key, Some(&grant), |c| c["iat"] = (now - 300).into()),
        ),
        (
            "from the future",
            our_proof(&x, &key, Some(&grant), |c| c["iat"] = (now + 300).into()),
        ),
        (
            "a private key in its header",
            with_header(&good, |h| h["jwk"] = private_jwk.clone()),
        ),
        ("alg none", alg_none(&good)),
        (
            "HS256 keyed with its public key",
            hs256_with_public_key(&good, &key.public_jwk()),
        ),
        ("signed by another key than its header's", signed_by_other),
        (
            "the ath of another token",
            our_proof(&x, &key, Some(&x.a.token), |_| {}),
        ),
        ("not a JWT", "not-a-proof".into()),
    ];
    for (name, proof) in &cases {
        eprintln!("a proof {name}");
        x.refused_because_with(
            &form,
            &[("DPoP", proof)],
            INVALID_DPOP_PROOF,
            "proof_invalid",
        )
        .await;
    }
    let another = our_proof(&x, &key, Some(&grant), |_| {});
    x.refused_because_with(
        &form,
        &[("DPoP", &good), ("DPoP", &another)],
        INVALID_DPOP_PROOF,
        "proof_invalid",
    )
    .await;

    // The good proof works once; the same proof again is a replay.
    x.exchanged_with(
        &form,
        Some((&good, &thumbprint(&key))),
        &grant,
        &x.a,
        Step::Narrowing,
    )
    .await;
    x.refused_because_with(
        &form,
        &[("DPoP", &good)],
        INVALID_DPOP_PROOF,
        "proof_replayed",
    )
    .await;
}

/// `delegation-operator token exchange --dpop-key`: the CLI binds the token it gets to a PKCS#8 PEM
/// key (made by `openssl genpkey`); a bound token is exchanged by the CLI only with that key.
#[tokio::test]
async fn the_cli_binds_with_a_dpop_key_and_needs_it_for_a_bound_token() {
    let x = Exchange::start("dpop-cli").await;
    let dir = std::env::temp_dir().join(format!("dpop-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let key_file = dir.join("key.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&key_file)
        .output()
        .expect("openssl makes a key");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let pem = std::fs::read_to_string(&key_file).unwrap();
    let jkt = thumbprint(&SigningKey::from_pkcs8_pem(&pem).unwrap());
    let (grant_file, actor_file) = (dir.join("grant"), dir.join("actor"));
    support::verifiers::write_private(&grant_file, &x.grant_token);
    support::verifiers::write_private(&actor_file, &x.a.token);

    let cli = |subject: &std::path::Path, key: Option<&std::path::Path>, out: &str| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_delegation-operator"));
        command
            .args(["token", "exchange", "--issuer-url", &x.issuer.url, "--ca"])
            .arg(&x.trust.ca_path)
            .arg("--subject-token-file")
            .arg(subject)
            .arg("--actor-token-file")
            .arg(&actor_file)
            .args(["--scope", "tickets:read", "--output-file"])
            .arg(dir.join(out));
        if let Some(key) = key {
            command.arg("--dpop-key").arg(key);
        }
        command.output().expect("the CLI runs")
    };
    let bound = cli(&grant_file, Some(&key_file), "bound");
    assert!(
        bound.status.success(),
        "{}",
        String::from_utf8_lossy(&bound.stderr)
    );
    let stderr = String::from_utf8_lossy(&bound.stderr);
    assert!(stderr.contains("DPoP token"), "{stderr}");
    let token = std::fs::read_to_string(dir.join("bound")).unwrap();
    let claims = support::verifiers::unverified_claims(token.trim());
    assert_eq!(claims["cnf"], json!({"jkt": jkt}), "bound to the PEM key");

    // The bound token, exchanged again: refused without the key, issued with it.
    let without = cli(&dir.join("bound"), None, "again-without");
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert_eq!(without.status.code(), Some(1), "refused: {stderr}");
    assert!(stderr.contains("invalid_dpop_proof"), "{stderr}");
    assert!(!dir.join("again-without").exists(), "nothing written");
    let with = cli(&dir.join("bound"), Some(&key_file), "again");
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    let again = std::fs::read_to_string(dir.join("again")).unwrap();
    assert_eq!(
        support::verifiers::unverified_claims(again.trim())["cnf"],
        json!({"jkt": jkt})
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

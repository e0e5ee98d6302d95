//! Independent verifiers against the real operator: PyJWT, npm `jose` and go-jose (installed by
//! `hack/verifiers.sh`, programs in `tests/verifiers/`) fetch discovery and the JWKS from the operator's
//! HTTPS listener, trusting only its CA, and judge the tokens of a three-hop chain and forgeries made
//! from them. They must agree with each other and with the operator's introspection endpoint; PyJWT
//! also reads the status list and finds a revoked token INVALID.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{verifiers::*, *};

const AUDIENCE: &str = "https://tickets.example.com";

/// Short-lived, to be kept past its expiry.
const BRIEF: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: brief}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: notifier}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 6s
"#;

const VALID: [&str; 3] = ["g1", "g2", "g3"];

/// Asserts every verifier gave `name` the same verdict `accepted`, and (for rejections) that each
/// reason mentions one of `because` (lowercase).
fn assert_all(
    verdicts: &std::collections::BTreeMap<Verifier, std::collections::BTreeMap<String, Verdict>>,
    name: &str,
    accepted: bool,
    because: &[&str],
) {
    for (verifier, by_name) in verdicts {
        let v = &by_name[name];
        assert_eq!(
            v.accepted, accepted,
            "{} on {name}: accepted={} ({})",
            v.verifier, v.accepted, v.reason
        );
        if !because.is_empty() {
            let reason = v.reason.to_lowercase();
            assert!(
                because.iter().any(|b| reason.contains(b)),
                "{verifier:?} ({}) refused {name} for another reason than {because:?}: {}",
                v.verifier,
                v.reason
            );
        }
    }
}

#[tokio::test]
async fn three_independent_libraries_accept_the_chain_and_refuse_forgeries_as_the_operator_does() {
    let (f, issuer, trust) = start_https_operator("verifiers", &[]).await;
    let ca = trust.ca_path.clone();
    f.apply(CHAIN_AGENTS).await;
    f.apply(CHAIN_GRANTS).await;
    f.apply(BRIEF).await;
    for g in VALID {
        f.wait_ready(g, "True", Some("Issued")).await;
    }
    f.wait_ready("brief", "True", None).await;
    // The short-lived token is read first: its exp is what the "expired" case waits out.
    let brief = f.token_in("brief-token").await.expect("brief's token");
    let brief_exp = unverified_claims(&brief)["exp"].as_i64().unwrap();
    let mut tokens = Vec::new();
    for g in VALID {
        let token = f.token_in(&format!("{g}-token")).await.unwrap();
        tokens.push((g.to_owned(), token));
    }
    let g3 = tokens[2].1.clone();
    let g3_claims = unverified_claims(&g3);
    let ns = &f.ns;

    // The discovery document and the JWKS as an outside party gets them.
    let discovery = trust
        .get(&format!("{}/.well-known/openid-configuration", issuer.url))
        .await
        .unwrap()
        .json();
    assert_eq!(discovery["issuer"], issuer.url.as_str());
    let jwks_uri = discovery["jwks_uri"].as_str().unwrap();
    assert!(jwks_uri.starts_with(&format!("{}/", issuer.url)));
    let jwks = trust.get(jwks_uri).await.unwrap().json();
    let kid = unverified_header(&g3)["kid"].clone();
    let public_jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .expect("the tokens' kid is in the JWKS served over HTTPS")
        .clone();

    // A token of this issuer, validly signed by the same key, but not an access token: a status list.
    let status_uri = g3_claims["status"]["status_list"]["uri"].as_str().unwrap();
    let status_list = trust.get(status_uri).await.unwrap();
    assert_eq!(status_list.status, 200);
    assert_eq!(status_list.content_type, "application/statuslist+jwt");
    let status_list_token = String::from_utf8(status_list.body.clone()).unwrap();

    // The expired case: the brief grant's token read above, after its exp (the grant has long since
    // rotated to a new one; this one is simply too old).
    let wait = brief_exp + 2 - k8s_openapi::jiff::Timestamp::now().as_second();
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
    }

    let forged = [
        (
            "tampered-scope",
            with_claims(&g3, |c| c["scope"] = "tickets:read tickets:write".into()),
        ),
        (
            "tampered-actor",
            with_claims(&g3, |c| {
                c["act"]["sub"] = format!("agent:{ns}/mallory").into()
            }),
        ),
        ("expired", brief.clone()),
        (
            "wrong-typ-header",
            with_header(&g3, |h| h["typ"] = "JWT".into()),
        ),
        ("status-list-token", status_list_token.trim().to_owned()),
        ("alg-none", alg_none(&g3)),
        ("hs256-public-key", hs256_with_public_key(&g3, &public_jwk)),
        (
            "unknown-kid",
            with_header(&g3, |h| h["kid"] = "not-a-published-key".into()),
        ),
    ];
    let mut all: Vec<(&str, &str)> = tokens
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    all.extend(forged.iter().map(|(n, t)| (*n, t.as_str())));

    let verdicts = verify_with_all(&issuer.url, &ca, AUDIENCE, &all).await;
    let chain =
        |hops: &[&str]| -> Vec<String> { hops.iter().map(|h| format!("agent:{ns}/{h}")).collect() };
    let expected_actors = [
        chain(&["orchestrator"]),
        chain(&["summarizer", "orchestrator"]),
        chain(&["notifier", "summarizer", "orchestrator"]),
    ];
    for (g, actors) in VALID.iter().zip(&expected_actors) {
        assert_all(&verdicts, g, true, &[]);
        for by_name in verdicts.values() {
            let v = &by_name[*g];
            assert_eq!(
                v.sub.as_deref(),
                Some("user:alice@example.com"),
                "{}",
                v.verifier
            );
            assert_eq!(
                &v.actors, actors,
                "{} reads the act chain of {g}",
                v.verifier
            );
        }
    }
    assert_all(
        &verdicts,
        "tampered-scope",
        false,
        &["signature", "cryptographic"],
    );
    assert_all(
        &verdicts,
        "tampered-actor",
        false,
        &["signature", "cryptographic"],
    );
    assert_all(&verdicts, "expired", false, &["exp"]);
    assert_all(&verdicts, "wrong-typ-header", false, &["typ", "signature"]);
    assert_all(&verdicts, "status-list-token", false, &["typ"]);
    assert_all(&verdicts, "alg-none", false, &["alg"]);
    assert_all(&verdicts, "hs256-public-key", false, &["alg"]);
    assert_all(&verdicts, "unknown-kid", false, &["kid", "key"]);

    // The same valid tokens, for a resource server of another audience: refused by all three.
    let valid: Vec<(&str, &str)> = all[..3].to_vec();
    let elsewhere = verify_with_all(&issuer.url, &ca, "https://payments.example.com", &valid).await;
    for g in VALID {
        assert_all(&elsewhere, g, false, &["aud"]);
    }

    // The operator's introspection agrees with the libraries, token by token.
    let caller = introspection_caller(&f, &issuer.url, AUDIENCE).await;
    let caller = caller.token.as_str();
    for (name, token) in &all {
        let answer = trust.introspect(&issuer.url, caller, token).await;
        assert_eq!(answer.status, 200, "introspection of {name}");
        let answer = answer.json();
        let accepted = verdicts[&Verifier::PyJwt][*name].accepted;
        assert_eq!(
            answer["active"], accepted,
            "introspection and the verifiers disagree on {name}"
        );
        if accepted {
            assert_eq!(answer["sub"], "user:alice@example.com");
            assert_eq!(answer["jti"], unverified_claims(token)["jti"]);
        } else {
            assert_eq!(
                answer,
                json!({"active": false}),
                "nothing more about {name}"
            );
        }
    }

    // Every entry VALID in the status lists; then g3 is deleted (revoked) and PyJWT, reading the
    // published list over HTTPS, finds its old token INVALID — which the signature alone cannot tell.
    let statuses = verify_with(Verifier::PyJwt, &issuer.url, &ca, AUDIENCE, true, &valid).await;
    for g in VALID {
        assert_eq!(statuses[g].status.as_deref(), Some("VALID"), "{g}");
    }
    f.delete_grant("g3").await;
    let revoked = wait_for(
        "the status list served over HTTPS to show g3's token INVALID",
        Duration::from_secs(30),
        || async {
            let statuses =
                verify_with(Verifier::PyJwt, &issuer.url, &ca, AUDIENCE, true, &valid).await;
            (statuses["g3"].status.as_deref() == Some("INVALID")).then_some(statuses)
        },
    )
    .await;
    assert_eq!(revoked["g1"].status.as_deref(), Some("VALID"));
    assert_eq!(revoked["g2"].status.as_deref(), Some("VALID"));
    let after = verify_with_all(&issuer.url, &ca, AUDIENCE, &valid).await;
    assert_all(&after, "g3", true, &[]);
    let answer = trust.introspect(&issuer.url, caller, &g3).await.json();
    assert_eq!(
        answer,
        json!({"active": false}),
        "introspection knows g3 is revoked"
    );

    // The tokens never reached the operator's logs.
    let output = f.operator().raw_output();
    for (name, token) in &tokens {
        let signature = token.split('.').nth(2).unwrap();
        assert!(!output.contains(signature), "{name}'s token was logged");
    }
}

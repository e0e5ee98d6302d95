//! RFC 8693 token exchange (issue #20) against the real apiserver and the live endpoint: the operator
//! (`run`, HTTPS endpoints on) serves `POST <issuer>/token`; callers prove their workload with the
//! pod-bound ServiceAccount token a pod running as an agent's ServiceAccount gets, for the issuer's
//! audience. Each attack class of the issue is one test, each in a namespace (and operator) of its
//! own: the right `error`, an answer naming no token, key id or other namespace, and nothing minted
//! (no `Exchanged` audit line). The positive tests check every issued token with three independent
//! JOSE libraries and the proven pod in its chain; the lineage test revokes a grant and finds every
//! token exchanged from it INVALID in the served status list.
//!
//! Tokens are never printed: see `support::exchange`.

mod support;

use std::time::Duration;

use delegation_operator::signing::{Algorithm, SigningKey};
use serde_json::{Value, json};
use support::{
    exchange::{
        ACCESS_TOKEN_TYPE, AUDIENCE, Exchange, ExchangeSetup, GRANT, GRANT_TYPE, JWT_TYPE,
        OTHER_AUDIENCE, Step, operator_keyring, scrubbed, served_statuses, wait_served,
        wait_served_at,
    },
    verifiers::{
        Verifier, alg_none, hs256_with_public_key, unverified_claims, verify_with, verify_with_all,
        with_claims, with_header,
    },
    *,
};

const INVALID_GRANT: &str = "invalid_grant";
const UNAUTHORIZED_CLIENT: &str = "unauthorized_client";
const INVALID_REQUEST: &str = "invalid_request";

// ---- helpers -------------------------------------------------------------------------------------

/// Every verifier accepts each token for [`AUDIENCE`], reads alice as its subject and `actors` (current
/// first) as its `act` chain.
async fn accepted_by_all(x: &Exchange, tokens: &[(&str, &str, Vec<String>)]) {
    let named: Vec<(&str, &str)> = tokens.iter().map(|(n, t, _)| (*n, *t)).collect();
    let verdicts = verify_with_all(&x.issuer.url, &x.trust.ca_path, AUDIENCE, &named).await;
    for (verifier, by_name) in &verdicts {
        for (name, _, actors) in tokens {
            let v = &by_name[*name];
            assert!(
                v.accepted,
                "{verifier:?} ({}) refused {name}: {}",
                v.verifier, v.reason
            );
            assert_eq!(v.sub.as_deref(), Some("user:alice@example.com"), "{name}");
            assert_eq!(
                &v.actors, actors,
                "{} reads the act chain of {name}",
                v.verifier
            );
        }
    }
}

/// Deletes the grant and waits until it is gone and its token reads INVALID in the served list.
async fn delete_grant(x: &Exchange, tokens: &[&str]) {
    x.f.grants()
        .delete(GRANT, &Default::default())
        .await
        .unwrap();
    x.f.wait_grant_gone(GRANT, "the grant released", Duration::from_secs(60))
        .await;
    wait_served(x, tokens, "Invalid").await;
}

/// The claims signed again with the operator's own active key (read by the admin from the keys
/// Secret): a token that verifies, whatever its claims say.
async fn signed_with_the_real_key(x: &Exchange, claims: &Value) -> String {
    operator_keyring(&x.f).await.active().sign(claims).unwrap()
}

/// Waits until the agent's Ready condition has `reason` (the operator saw its spec).
async fn wait_agent_reason(x: &Exchange, agent: &str, reason: &str) {
    wait_for(
        &format!("agent {agent} Ready reason {reason}"),
        Duration::from_secs(60),
        || async {
            let a = x.f.agents().get(agent).await.ok()?;
            let status = a.status?;
            let current = status.observed_generation == a.metadata.generation;
            let c = status
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (current && c.reason == reason).then_some(())
        },
    )
    .await;
}

fn exp(token: &str) -> i64 {
    unverified_claims(token)["exp"].as_i64().unwrap()
}

fn now() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

// ---- what works ----------------------------------------------------------------------------------

/// Discovery advertises the endpoint. The agent's own workload narrows the grant's token (a subset of
/// its scopes; nothing asked: the same), and narrows a narrowed token again; `act` stays, the chain
/// gains a record naming the proven pod, and three independent libraries accept every token.
#[tokio::test]
async fn the_agents_own_workload_narrows_its_token() {
    let x = Exchange::start("xchg-narrow").await;
    let discovery = x
        .trust
        .get(&format!(
            "{}/.well-known/openid-configuration",
            x.issuer.url
        ))
        .await
        .unwrap()
        .json();
    assert_eq!(
        discovery["token_endpoint"],
        format!("{}/token", x.issuer.url)
    );
    assert_eq!(discovery["grant_types_supported"], json!([GRANT_TYPE]));

    let (read_only, body) = x
        .exchanged(
            &x.grant_token,
            &x.a,
            Step::Narrowing,
            &[("scope", "tickets:read")],
        )
        .await;
    assert_eq!(body["scope"], "tickets:read");
    let claims = unverified_claims(&read_only);
    assert_eq!(claims["scope"], "tickets:read");
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["client_id"], x.agent("a"));

    // Nothing narrowed: the subject's scopes and audience. `…:jwt` is accepted as the subject's
    // type, the audience may be named, and the only token type there is may be asked for.
    let form = [
        ("grant_type", GRANT_TYPE),
        ("subject_token", x.grant_token.as_str()),
        ("subject_token_type", JWT_TYPE),
        ("actor_token", x.a.token.as_str()),
        ("actor_token_type", JWT_TYPE),
        ("audience", AUDIENCE),
        ("requested_token_type", ACCESS_TOKEN_TYPE),
    ];
    let (same, body) = x
        .exchanged_form(&form, &x.grant_token, &x.a, Step::Narrowing)
        .await;
    assert_eq!(body["scope"], "tickets:read tickets:write");
    assert_eq!(unverified_claims(&same)["aud"], AUDIENCE);

    // A narrowed token narrows again: its scope, one more record.
    let (again, _) = x.exchanged(&read_only, &x.a, Step::Narrowing, &[]).await;
    assert_eq!(unverified_claims(&again)["scope"], "tickets:read");
    assert_eq!(
        unverified_claims(&again)["delegation_chain"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let a = vec![x.agent("a")];
    accepted_by_all(
        &x,
        &[
            ("read-only", &read_only, a.clone()),
            ("same", &same, a.clone()),
            ("again", &again, a.clone()),
        ],
    )
    .await;
    assert_eq!(
        served_statuses(&x, &[&read_only, &same, &again]).await,
        ["Valid"; 3]
    );
}

/// A hop a→b (b's workload exchanges a's token) nests `act` one deeper and names b the client; the
/// exchanged token is exchanged again, b→c, and keeps the nested `act` (keycloak#52691: an exchange
/// of an exchanged token dropped the inner actor). Each hop's record names the pod that proved it.
#[tokio::test]
async fn a_hop_nests_act_and_an_exchanged_token_hops_again() {
    let x = Exchange::start("xchg-hop").await;
    let (to_b, _) = x
        .exchanged(
            &x.grant_token,
            &x.b,
            Step::Hop("b"),
            &[("scope", "tickets:read")],
        )
        .await;
    let (to_c, _) = x.exchanged(&to_b, &x.c, Step::Hop("c"), &[]).await;
    let claims = unverified_claims(&to_c);
    assert_eq!(
        claims["act"],
        json!({"sub": x.agent("c"), "act": {"sub": x.agent("b"), "act": {"sub": x.agent("a")}}})
    );
    assert_eq!(claims["scope"], "tickets:read");
    let chain = claims["delegation_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 3, "the grant's record and one per hop");
    for (record, caller) in chain[1..].iter().zip([&x.b, &x.c]) {
        assert_eq!(record["requested_by"], caller.username.as_str());
        assert_eq!(record["workload"]["pod"], caller.pod_name());
        assert_eq!(record["workload"]["pod_uid"], caller.pod_uid());
    }
    // c's workload narrows its own hop token, for a minute.
    let (brief, _) = x
        .exchanged(&to_c, &x.c, Step::Narrowing, &[("expires_in", "60")])
        .await;
    assert!(
        exp(&brief) <= now() + 61,
        "expires_in 60 asked, exp is {} s away",
        exp(&brief) - now()
    );

    let (a, b, c) = (x.agent("a"), x.agent("b"), x.agent("c"));
    accepted_by_all(
        &x,
        &[
            ("to-b", &to_b, vec![b.clone(), a.clone()]),
            ("to-c", &to_c, vec![c.clone(), b.clone(), a.clone()]),
            ("brief", &brief, vec![c, b, a]),
        ],
    )
    .await;
}

/// Lineage revocation: grant token → narrowing → hop a→b → hop b→c, each with its own status entry
/// among those reserved after the grant token's (its `lineage`); the grant is deleted, and every one
/// of them reads INVALID in one fetch of the served status list (the same publish), for the
/// operator's verification code and for PyJWT.
#[tokio::test]
async fn deleting_the_grant_revokes_every_token_exchanged_from_it() {
    let x = Exchange::start("xchg-lineage").await;
    let (narrowed, _) = x
        .exchanged(
            &x.grant_token,
            &x.a,
            Step::Narrowing,
            &[("scope", "tickets:read")],
        )
        .await;
    let (to_b, _) = x.exchanged(&narrowed, &x.b, Step::Hop("b"), &[]).await;
    let (to_c, _) = x.exchanged(&to_b, &x.c, Step::Hop("c"), &[]).await;
    let lineage = [
        ("grant", x.grant_token.as_str()),
        ("narrowed", narrowed.as_str()),
        ("to-b", to_b.as_str()),
        ("to-c", to_c.as_str()),
    ];
    // Each has its own entry: one of those the operator reserved after the grant token's own.
    let grant_claims = unverified_claims(&x.grant_token);
    let root = &grant_claims["status"]["status_list"];
    let reserved = &grant_claims["lineage"];
    let first = reserved["first"].as_u64().unwrap();
    let count = reserved["count"].as_u64().unwrap();
    assert_eq!(
        (first, count),
        (root["idx"].as_u64().unwrap() + 1, 7),
        "seven entries right after the grant token's own: {grant_claims}"
    );
    for (name, token) in &lineage[1..] {
        let claims = unverified_claims(token);
        let own = &claims["status"]["status_list"];
        assert_eq!(own["uri"], root["uri"], "{name}: the grant token's list");
        let idx = own["idx"].as_u64().unwrap();
        assert!(
            (first..first + count).contains(&idx),
            "{name}: its own entry {idx}, in the grant token's lineage {reserved}"
        );
        assert_eq!(
            claims["lineage"], *reserved,
            "{name} names the same lineage"
        );
    }
    let tokens: Vec<&str> = lineage.iter().map(|(_, t)| *t).collect();
    assert_eq!(served_statuses(&x, &tokens).await, ["Valid"; 4]);
    let pyjwt = verify_with(
        Verifier::PyJwt,
        &x.issuer.url,
        &x.trust.ca_path,
        AUDIENCE,
        true,
        &lineage,
    )
    .await;
    for (name, _) in &lineage {
        assert_eq!(pyjwt[*name].status.as_deref(), Some("VALID"), "{name}");
    }

    delete_grant(&x, &tokens).await;
    assert_eq!(served_statuses(&x, &tokens).await, ["Invalid"; 4]);
    let pyjwt = verify_with(
        Verifier::PyJwt,
        &x.issuer.url,
        &x.trust.ca_path,
        AUDIENCE,
        true,
        &lineage,
    )
    .await;
    for (name, _) in &lineage {
        assert_eq!(pyjwt[*name].status.as_deref(), Some("INVALID"), "{name}");
    }
    // And none of them is exchanged any more.
    x.refused_because(
        &Exchange::form(&to_c, &x.c.token, &[]),
        INVALID_GRANT,
        "subject_revoked",
    )
    .await;
}

// ---- the subject token ---------------------------------------------------------------------------

/// A subject token of another issuer: the caller's own ServiceAccount token (signed by the
/// apiserver), the same claims as the grant's token signed by a key of nobody's JWKS (with its own
/// kid, and claiming ours), and a token of ours that is no access token (a Status List Token).
#[tokio::test]
async fn a_subject_token_of_another_issuer_is_refused() {
    let x = Exchange::start("xchg-issuer").await;
    x.refused_because(
        &Exchange::form(&x.a.token, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_invalid",
    )
    .await;
    let claims = unverified_claims(&x.grant_token);
    let stranger = SigningKey::generate(Algorithm::ES256, now()).unwrap();
    let ours = stranger.sign(&claims).unwrap();
    x.refused_because(
        &Exchange::form(&ours, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_invalid",
    )
    .await;
    let kid = support::verifiers::unverified_header(&x.grant_token)["kid"].clone();
    let claiming_our_kid = with_header(&ours, |h| h["kid"] = kid.clone());
    x.refused_because(
        &Exchange::form(&claiming_our_kid, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_invalid",
    )
    .await;
    let mut elsewhere = claims.clone();
    elsewhere["iss"] = "https://issuer.elsewhere.example".into();
    let elsewhere = stranger.sign(&elsewhere).unwrap();
    x.refused_because(
        &Exchange::form(&elsewhere, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_invalid",
    )
    .await;
    let uri = claims["status"]["status_list"]["uri"].as_str().unwrap();
    let list = x.trust.get(uri).await.unwrap();
    let list_token = String::from_utf8(list.body).unwrap().trim().to_owned();
    x.refused_because(
        &Exchange::form(&list_token, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_invalid",
    )
    .await;
}

/// Forged subject tokens: a tampered payload (wider scope, another actor), `alg: none`, HS256 keyed
/// with our public JWK, another `typ`, an unknown kid.
#[tokio::test]
async fn a_forged_subject_token_is_refused() {
    let x = Exchange::start("xchg-forged").await;
    let jwks = x.f.jwks().await;
    let kid = support::verifiers::unverified_header(&x.grant_token)["kid"].clone();
    let public_jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap()
        .clone();
    let g = &x.grant_token;
    let c_subject = x.agent("c");
    let forged = [
        with_claims(g, |c| {
            c["scope"] = "tickets:read tickets:write tickets:comment".into()
        }),
        with_claims(g, |c| c["act"]["sub"] = c_subject.clone().into()),
        alg_none(g),
        hs256_with_public_key(g, &public_jwk),
        with_header(g, |h| h["typ"] = "JWT".into()),
        with_header(g, |h| h["kid"] = "not-a-published-key".into()),
    ];
    for token in &forged {
        x.refused_because(
            &Exchange::form(token, &x.a.token, &[]),
            INVALID_GRANT,
            "subject_invalid",
        )
        .await;
    }
}

/// `act` stripped or reordered, or a chain record dropped, in a token signed with the operator's own
/// key (an insider's forgery): `act` no longer matches `delegation_chain`. The same claims signed
/// unchanged are exchanged, so the refusals are the mismatch's.
#[tokio::test]
async fn a_token_whose_act_was_stripped_or_reordered_is_refused() {
    let x = Exchange::start("xchg-act").await;
    let (to_b, _) = x.exchanged(&x.grant_token, &x.b, Step::Hop("b"), &[]).await;
    let (to_c, _) = x.exchanged(&to_b, &x.c, Step::Hop("c"), &[]).await;
    let claims = unverified_claims(&to_c);
    let (a, b, c) = (x.agent("a"), x.agent("b"), x.agent("c"));

    let unchanged = signed_with_the_real_key(&x, &claims).await;
    x.exchanged(&unchanged, &x.c, Step::Narrowing, &[]).await;

    let mut stripped = claims.clone();
    stripped["act"] = json!({"sub": c});
    let mut reordered = claims.clone();
    reordered["act"] = json!({"sub": c, "act": {"sub": a, "act": {"sub": b}}});
    let mut record_dropped = claims.clone();
    record_dropped["delegation_chain"]
        .as_array_mut()
        .unwrap()
        .remove(1);
    for forged in [stripped, reordered, record_dropped] {
        let token = signed_with_the_real_key(&x, &forged).await;
        x.refused_because(
            &Exchange::form(&token, &x.c.token, &[]),
            INVALID_GRANT,
            "act_mismatch",
        )
        .await;
    }
}

/// A subject token past its `exp` (a grant with a 5-second token, its first token kept and waited
/// out; the grant has long since rotated).
#[tokio::test]
async fn an_expired_subject_token_is_refused() {
    let setup = ExchangeSetup {
        token_ttl: "5s".into(),
        ..Default::default()
    };
    let x = Exchange::start_with("xchg-expired", setup, &[]).await;
    let expires = exp(&x.grant_token);
    wait_for(
        "the grant's first token to expire",
        Duration::from_secs(30),
        || async { (now() > expires + 1).then_some(()) },
    )
    .await;
    x.refused_because(
        &Exchange::form(&x.grant_token, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_invalid",
    )
    .await;
}

/// A revoked subject token of a grant that still lives: the grant's scopes change, its token is
/// superseded (INVALID in the list) and a new one issued. The old one is refused; the new one works.
#[tokio::test]
async fn a_revoked_subject_token_is_refused() {
    let x = Exchange::start("xchg-revoked").await;
    let old = x.grant_token.clone();
    x.f.patch_grant(GRANT, json!({"spec": {"scopes": ["tickets:read"]}}))
        .await;
    let new = wait_for("the grant's new token", Duration::from_secs(60), || async {
        let token = x.f.token_in(&format!("{GRANT}-token")).await?;
        (token != old && unverified_claims(&token)["scope"] == "tickets:read").then_some(token)
    })
    .await;
    wait_served(&x, &[&old], "Invalid").await;
    x.refused_because(
        &Exchange::form(&old, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_revoked",
    )
    .await;
    x.exchanged(&new, &x.a, Step::Narrowing, &[]).await;
}

/// Suspended agents: b (an actor of a hop token; the grant's own token does not name it, so only the
/// exchange's check of the chain's agents stops it), then a (the grant's agent: its token revoked).
#[tokio::test]
async fn a_subject_token_naming_a_suspended_agent_is_refused() {
    let x = Exchange::start("xchg-suspended").await;
    let (to_b, _) = x.exchanged(&x.grant_token, &x.b, Step::Hop("b"), &[]).await;
    x.f.patch_agent("b", json!({"spec": {"suspended": true}}))
        .await;
    wait_agent_reason(&x, "b", "Suspended").await;
    x.refused_because(
        &Exchange::form(&to_b, &x.b.token, &[]),
        INVALID_GRANT,
        "agent_suspended",
    )
    .await;
    x.refused_because(
        &Exchange::form(&to_b, &x.c.token, &[]),
        INVALID_GRANT,
        "agent_suspended",
    )
    .await;

    x.f.patch_agent("a", json!({"spec": {"suspended": true}}))
        .await;
    wait_agent_reason(&x, "a", "Suspended").await;
    x.f.wait_ready_within(
        GRANT,
        "False",
        Some("AgentSuspended"),
        Duration::from_secs(60),
    )
    .await;
    // The grant token and, in the same served list, the token exchanged from it.
    wait_served(&x, &[&x.grant_token, &to_b], "Invalid").await;
    x.refused_because(
        &Exchange::form(&x.grant_token, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_revoked",
    )
    .await;
}

/// Another audience or resource than the subject token's (RFC 8707), an undeclared one, both named
/// and different, and a subject token minted for another audience asked for ours: refused. The
/// subject's own audience, as `resource`, works.
#[tokio::test]
async fn another_audience_or_resource_is_refused() {
    let x = Exchange::start("xchg-audience").await;
    let g = &x.grant_token;
    let actor = &x.a.token;
    for (field, value) in [
        ("audience", OTHER_AUDIENCE),
        ("resource", OTHER_AUDIENCE),
        ("audience", "https://undeclared.example.com"),
        ("resource", "https://undeclared.example.com/api"),
    ] {
        x.refused_because(
            &Exchange::form(g, actor, &[(field, value)]),
            "invalid_target",
            "other_audience",
        )
        .await;
    }
    // Two different targets: a token is for one (RFC 8707 §2: invalid_target).
    x.refused_because(
        &Exchange::form(
            g,
            actor,
            &[("audience", AUDIENCE), ("resource", OTHER_AUDIENCE)],
        ),
        "invalid_target",
        "several_audiences",
    )
    .await;
    let (token, _) = x
        .exchanged(g, &x.a, Step::Narrowing, &[("resource", AUDIENCE)])
        .await;
    assert_eq!(unverified_claims(&token)["aud"], AUDIENCE);

    // A token minted for another audience, asked for ours.
    let other = json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": "payments"},
        "spec": {"principal": {"kind": "User", "name": "alice@example.com"},
                 "actorRef": {"name": "a"}, "scopes": ["tickets:read"],
                 "audience": OTHER_AUDIENCE, "tokenTTL": "10m"},
    });
    x.f.apply(&serde_yaml::to_string(&other).unwrap()).await;
    x.f.wait_ready_within("payments", "True", None, Duration::from_secs(60))
        .await;
    let payments = x.f.token_in("payments-token").await.unwrap();
    x.refused_because(
        &Exchange::form(&payments, actor, &[("audience", AUDIENCE)]),
        "invalid_target",
        "other_audience",
    )
    .await;
}

// ---- the actor token -----------------------------------------------------------------------------

/// Actor tokens of workloads that are neither the current actor's nor an allowed actor's: a pod of a
/// ServiceAccount no agent runs as, and c's pod on a's token (a may hand on to b only).
#[tokio::test]
async fn an_actor_token_of_another_workload_is_refused() {
    let x = Exchange::start("xchg-stranger").await;
    let stranger = x.workload("sa-x").await;
    x.refused_because(
        &Exchange::form(&x.grant_token, &stranger.token, &[]),
        UNAUTHORIZED_CLIENT,
        "not_an_actor",
    )
    .await;
    x.refused_because(
        &Exchange::form(&x.grant_token, &x.c.token, &[]),
        UNAUTHORIZED_CLIENT,
        "not_an_actor",
    )
    .await;
}

/// The agent's ServiceAccount, for the issuer's audience, but bound to no pod (a TokenRequest without
/// a boundObjectRef, as anyone allowed to mint the ServiceAccount's tokens gets).
#[tokio::test]
async fn an_actor_token_bound_to_no_pod_is_refused() {
    let x = Exchange::start("xchg-unbound").await;
    let unbound =
        request_service_account_token_for(&x.f.client, x.ns(), "sa-a", None, &[&x.issuer.url])
            .await;
    x.refused_because(
        &Exchange::form(&x.grant_token, &unbound, &[]),
        UNAUTHORIZED_CLIENT,
        "actor_not_pod_bound",
    )
    .await;
}

/// Someone who may impersonate the agent's ServiceAccount (with pod extras forged on the
/// impersonation, naming its real pod) mints a token as it: the token is the ServiceAccount's, but
/// bound to no pod.
#[tokio::test]
async fn an_actor_token_minted_by_impersonating_the_service_account_is_refused() {
    let x = Exchange::start("xchg-impersonated").await;
    let minted = x.impersonated_actor_token().await;
    x.refused_because(
        &Exchange::form(&x.grant_token, &minted, &[]),
        UNAUTHORIZED_CLIENT,
        "actor_not_pod_bound",
    )
    .await;
}

/// A pod-bound token for the issuer's audience of a ServiceAccount named like the agent's, in another
/// namespace: refused, and the answer does not name the token's namespace (another tenant's, seen
/// from the caller; the caller's own namespace may be named).
#[tokio::test]
async fn an_actor_token_of_another_namespace_is_refused() {
    let x = Exchange::start("xchg-other-ns").await;
    let other = fresh_namespace_undeclared(&x.f.client, "xchg-elsewhere").await;
    let pod = pod_running_as(&x.f.client, &other, "sa-a").await;
    let token = request_service_account_token_for(
        &x.f.client,
        &other,
        "sa-a",
        Some(&pod),
        &[&x.issuer.url],
    )
    .await;
    x.refused_because_without(
        &Exchange::form(&x.grant_token, &token, &[]),
        UNAUTHORIZED_CLIENT,
        "other_namespace",
        &[x.ns()],
    )
    .await;
}

/// The agent's own pod-bound token, but for the apiserver's audience (what the kubelet mounts by
/// default) or for a resource server's: not accepted for the issuer's audience.
#[tokio::test]
async fn an_actor_token_for_another_audience_is_refused() {
    let x = Exchange::start("xchg-actor-aud").await;
    let apiserver =
        request_service_account_token(&x.f.client, x.ns(), "sa-a", Some(&x.a.pod)).await;
    x.refused_because(
        &Exchange::form(&x.grant_token, &apiserver, &[]),
        UNAUTHORIZED_CLIENT,
        "actor_not_accepted",
    )
    .await;
    let resource_server =
        request_service_account_token_for(&x.f.client, x.ns(), "sa-a", Some(&x.a.pod), &[AUDIENCE])
            .await;
    x.refused_because(
        &Exchange::form(&x.grant_token, &resource_server, &[]),
        UNAUTHORIZED_CLIENT,
        "actor_not_accepted",
    )
    .await;
}

/// The pod's token as subject and the grant's token as actor: the subject is no token of ours.
#[tokio::test]
async fn subject_and_actor_swapped_are_refused() {
    let x = Exchange::start("xchg-swapped").await;
    x.refused_because(
        &Exchange::form(&x.a.token, &x.grant_token, &[]),
        INVALID_GRANT,
        "subject_invalid",
    )
    .await;
}

// ---- what is asked for ---------------------------------------------------------------------------

/// Scopes the subject does not hold (even ones the agent may have): refused, never silently narrowed;
/// a narrowed token cannot get its scope back, nor pass it on to the next agent.
#[tokio::test]
async fn a_wider_scope_is_refused() {
    let x = Exchange::start("xchg-scope").await;
    let g = &x.grant_token;
    for scope in [
        "tickets:read tickets:write tickets:comment",
        "tickets:close",
        "tickets:read payments:execute",
    ] {
        x.refused_because(
            &Exchange::form(g, &x.a.token, &[("scope", scope)]),
            "invalid_scope",
            "wider_scope",
        )
        .await;
    }
    let (read_only, _) = x
        .exchanged(g, &x.a, Step::Narrowing, &[("scope", "tickets:read")])
        .await;
    x.refused_because(
        &Exchange::form(&read_only, &x.a.token, &[("scope", "tickets:write")]),
        "invalid_scope",
        "wider_scope",
    )
    .await;
    x.refused_because(
        &Exchange::form(
            &read_only,
            &x.b.token,
            &[("scope", "tickets:read tickets:write")],
        ),
        "invalid_scope",
        "wider_scope",
    )
    .await;
}

/// RFC 9396 details beyond the subject's (more actions, another type) are refused; narrower ones are
/// issued, and cannot be widened back. Details that are not a JSON array of details are refused too.
#[tokio::test]
async fn more_authorization_details_are_refused() {
    let setup = ExchangeSetup {
        details: Some(json!([{"type": "ticket", "actions": ["read", "write"]}])),
        ..Default::default()
    };
    let x = Exchange::start_with("xchg-details", setup, &[]).await;
    let g = &x.grant_token;
    let more = json!([{"type": "ticket", "actions": ["read", "write", "close"]}]).to_string();
    let other = json!([{"type": "payment_initiation", "actions": ["execute"]}]).to_string();
    for details in [&more, &other] {
        x.refused_because(
            &Exchange::form(g, &x.a.token, &[("authorization_details", details)]),
            "invalid_authorization_details",
            "wider_details",
        )
        .await;
    }
    // Not a JSON array of details: RFC 9396 §5 answers invalid_authorization_details.
    for malformed in ["{not json", r#"{"type": "ticket"}"#] {
        x.refused_because(
            &Exchange::form(g, &x.a.token, &[("authorization_details", malformed)]),
            "invalid_authorization_details",
            "malformed_details",
        )
        .await;
    }
    let read = json!([{"type": "ticket", "actions": ["read"]}]);
    let (narrow, _) = x
        .exchanged(
            g,
            &x.a,
            Step::Narrowing,
            &[("authorization_details", &read.to_string())],
        )
        .await;
    assert_eq!(unverified_claims(&narrow)["authorization_details"], read);
    let back = json!([{"type": "ticket", "actions": ["read", "write"]}]).to_string();
    x.refused_because(
        &Exchange::form(&narrow, &x.a.token, &[("authorization_details", &back)]),
        "invalid_authorization_details",
        "wider_details",
    )
    .await;
}

/// A life longer than the subject's (the grant's token: 10 minutes), zero, negative or not a number:
/// malformed. A one-minute token re-exchanged for five minutes is refused too; re-exchanged without
/// asking, it gets no more than its own minute.
#[tokio::test]
async fn a_longer_life_is_refused_also_through_re_exchange() {
    let x = Exchange::start("xchg-life").await;
    let g = &x.grant_token;
    for (expires_in, reason) in [
        ("3600", "too_long"),
        ("0", "zero_lifetime"),
        ("-5", "malformed_request"),
        ("soon", "malformed_request"),
    ] {
        x.refused_because(
            &Exchange::form(g, &x.a.token, &[("expires_in", expires_in)]),
            INVALID_REQUEST,
            reason,
        )
        .await;
    }
    let (minute, body) = x
        .exchanged(g, &x.a, Step::Narrowing, &[("expires_in", "60")])
        .await;
    assert!(
        body["expires_in"].as_i64().unwrap() <= 60,
        "{}",
        body["expires_in"]
    );
    x.refused_because(
        &Exchange::form(&minute, &x.a.token, &[("expires_in", "300")]),
        INVALID_REQUEST,
        "too_long",
    )
    .await;
    x.refused_because(
        &Exchange::form(&minute, &x.b.token, &[("expires_in", "300")]),
        INVALID_REQUEST,
        "too_long",
    )
    .await;
    let (again, _) = x.exchanged(&minute, &x.a, Step::Narrowing, &[]).await;
    assert!(exp(&again) <= exp(&minute));
}

// ---- the chain -----------------------------------------------------------------------------------

/// b may hand back to a: a→b, then a's workload takes b's token back (a→b→a): a cycle.
#[tokio::test]
async fn circular_delegation_is_refused() {
    let setup = ExchangeSetup {
        delegation: [
            Some(json!({"maxDepth": 2, "allowedActors": ["b"]})),
            Some(json!({"maxDepth": 1, "allowedActors": ["c", "a"]})),
            None,
        ],
        ..Default::default()
    };
    let x = Exchange::start_with("xchg-cycle", setup, &[]).await;
    let (to_b, _) = x.exchanged(&x.grant_token, &x.b, Step::Hop("b"), &[]).await;
    x.refused_because(
        &Exchange::form(&to_b, &x.a.token, &[]),
        UNAUTHORIZED_CLIENT,
        "circular",
    )
    .await;
}

/// a allows one hop below it: a→b works, b→c (two below a) is refused although b lists c.
#[tokio::test]
async fn depth_past_max_depth_is_refused() {
    let setup = ExchangeSetup {
        delegation: [
            Some(json!({"maxDepth": 1, "allowedActors": ["b"]})),
            Some(json!({"maxDepth": 1, "allowedActors": ["c"]})),
            None,
        ],
        ..Default::default()
    };
    let x = Exchange::start_with("xchg-depth", setup, &[]).await;
    let (to_b, _) = x.exchanged(&x.grant_token, &x.b, Step::Hop("b"), &[]).await;
    x.refused_because(
        &Exchange::form(&to_b, &x.c.token, &[]),
        UNAUTHORIZED_CLIENT,
        "too_deep",
    )
    .await;
    // b's own workload may still narrow it: the refusal was the depth's.
    x.exchanged(&to_b, &x.b, Step::Narrowing, &[]).await;
}

// ---- the grant behind it -------------------------------------------------------------------------

/// Once the grant is deleted, neither its token nor a token exchanged from it before is exchanged.
#[tokio::test]
async fn a_subject_token_is_refused_after_its_grant_was_deleted() {
    let x = Exchange::start("xchg-deleted").await;
    let (narrowed, _) = x
        .exchanged(&x.grant_token, &x.a, Step::Narrowing, &[])
        .await;
    delete_grant(&x, &[&x.grant_token, &narrowed]).await;
    x.refused_because(
        &Exchange::form(&x.grant_token, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_revoked",
    )
    .await;
    x.refused_because(
        &Exchange::form(&narrowed, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_revoked",
    )
    .await;
    x.refused_because(
        &Exchange::form(&narrowed, &x.b.token, &[]),
        INVALID_GRANT,
        "subject_revoked",
    )
    .await;
}

/// The grant deleted and created again under the same name: the old token (another grant uid) is
/// refused, the new grant's token is exchanged; a VALID token naming the old grant's uid is refused
/// for that alone.
#[tokio::test]
async fn a_subject_token_of_a_re_created_grant_is_refused() {
    let x = Exchange::start("xchg-recreated").await;
    let old = x.grant_token.clone();
    let old_uid = unverified_claims(&old)["delegation.nhi.dev/grant"]["uid"].clone();
    delete_grant(&x, &[&old]).await;
    x.f.apply(&x.setup.grant()).await;
    x.f.wait_ready_within(GRANT, "True", None, Duration::from_secs(60))
        .await;
    let new = x.current_grant_token().await;
    assert_ne!(
        unverified_claims(&new)["delegation.nhi.dev/grant"]["uid"],
        old_uid
    );
    x.refused_because(
        &Exchange::form(&old, &x.a.token, &[]),
        INVALID_GRANT,
        "subject_revoked",
    )
    .await;
    x.exchanged(&new, &x.a, Step::Narrowing, &[]).await;

    // The new grant's token, VALID in the list, re-signed with the operator's key naming the old
    // grant's uid (an insider's forgery): the grant it names is gone.
    let mut claims = unverified_claims(&new);
    claims["delegation.nhi.dev/grant"]["uid"] = old_uid.clone();
    let forged = signed_with_the_real_key(&x, &claims).await;
    x.refused_because(
        &Exchange::form(&forged, &x.a.token, &[]),
        INVALID_GRANT,
        "grant_gone",
    )
    .await;
}

// ---- the request itself --------------------------------------------------------------------------

/// Malformed requests: another grant type, a token missing, unsupported token types, another
/// requested token type.
#[tokio::test]
async fn malformed_requests_are_refused() {
    let x = Exchange::start("xchg-malformed").await;
    let (g, actor) = (x.grant_token.as_str(), x.a.token.as_str());
    let mut other_grant_type = Exchange::form(g, actor, &[]);
    other_grant_type[0].1 = "authorization_code";
    x.refused_because(
        &other_grant_type,
        "unsupported_grant_type",
        "unsupported_grant_type",
    )
    .await;
    let without = |field: &str| -> Vec<(&str, &str)> {
        Exchange::form(g, actor, &[])
            .into_iter()
            .filter(|(k, _)| !k.starts_with(field))
            .collect()
    };
    x.refused_because(
        &without("actor_token"),
        INVALID_REQUEST,
        "malformed_request",
    )
    .await;
    x.refused_because(
        &without("subject_token"),
        INVALID_REQUEST,
        "malformed_request",
    )
    .await;
    let mut id_token = Exchange::form(g, actor, &[]);
    id_token[2].1 = "urn:ietf:params:oauth:token-type:id_token";
    x.refused_because(&id_token, INVALID_REQUEST, "malformed_request")
        .await;
    let mut actor_type = Exchange::form(g, actor, &[]);
    actor_type[4].1 = ACCESS_TOKEN_TYPE;
    x.refused_because(&actor_type, INVALID_REQUEST, "malformed_request")
        .await;
    x.refused_because(
        &Exchange::form(
            g,
            actor,
            &[(
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:refresh_token",
            )],
        ),
        INVALID_REQUEST,
        "malformed_request",
    )
    .await;
}

/// A body over the limit (a megabyte of scope) and ten thousand scopes: refused without minting
/// (400 or 413), and the endpoint keeps answering.
#[tokio::test]
async fn an_oversize_body_is_refused() {
    let x = Exchange::start("xchg-oversize").await;
    let (g, actor) = (x.grant_token.as_str(), x.a.token.as_str());
    let huge = "a".repeat(1 << 20);
    let body = support::verifiers::form_urlencoded(&Exchange::form(g, actor, &[("scope", &huge)]));
    x.refused_raw(&body, &[g, actor], &[INVALID_REQUEST], &[413], false)
        .await;
    let many: Vec<String> = (0..10_000).map(|i| format!("s{i}")).collect();
    let many = many.join(" ");
    x.refused_with(
        &Exchange::form(g, actor, &[("scope", &many)]),
        &[INVALID_REQUEST, "invalid_scope"],
        &[413],
        false,
        &[],
    )
    .await;
    x.exchanged(g, &x.a, Step::Narrowing, &[("scope", "tickets:read")])
        .await;
}

/// Every replica answers exchanges, not only the leader (a standby has no caches of the operator's:
/// its token endpoint keeps watches of its own and signs with the keys Secret's active key); and a
/// lineage is revoked across a kill -9 of the leader: the replica that takes over revokes the grant's
/// token, and with it every token exchanged from it, whichever replica exchanged them.
#[tokio::test]
async fn every_replica_exchanges_and_a_lineage_outlives_a_leader_kill() {
    let mut x = Exchange::start("exchange-failover").await;
    let port = free_port();
    let second_url = format!("https://127.0.0.1:{port}");
    let address = format!("127.0.0.1:{port}");
    let second = Operator::start(
        &x.f.ns,
        &x.f.operator_namespace(),
        &["--issuer", &x.issuer.url, "--https-address", &address],
    );
    // Both replicas answer discovery and are ready (the second once its token endpoint has read
    // the signing keys and listed what it decides on).
    wait_for(
        "the second replica's /readyz",
        Duration::from_secs(60),
        || async {
            x.trust
                .get(&format!("{second_url}/readyz"))
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await;

    // One exchange at each replica: a narrowing at the first, a hop from it at the second.
    let (narrowed, _) = x
        .exchanged(
            &x.grant_token,
            &x.a,
            Step::Narrowing,
            &[("scope", "tickets:read")],
        )
        .await;
    let hop_form = Exchange::form(&narrowed, &x.b.token, &[]);
    let reply = x.trust.exchange(&second_url, &hop_form).await;
    assert_eq!(reply.status, 200, "{}", scrubbed(&reply.body));
    let hopped = reply.json()["access_token"].as_str().unwrap().to_owned();
    x.check_issued(&narrowed, &hopped, &x.b, Step::Hop("b"));
    let lineage = [x.grant_token.as_str(), narrowed.as_str(), hopped.as_str()];
    wait_served(&x, &lineage, "Valid").await;

    // kill -9 whichever replica leads; the other takes over and revokes the grant's lineage.
    let first = x.f.operator.take().expect("the first operator");
    let first_leads = first.audit().iter().any(|r| r["action"] == "Issued");
    let survivor_url;
    if first_leads {
        first.stop();
        x.f.operator = Some(second);
        survivor_url = second_url.clone();
    } else {
        second.stop();
        x.f.operator = Some(first);
        survivor_url = x.issuer.url.clone();
    }
    x.f.grants()
        .delete(GRANT, &Default::default())
        .await
        .unwrap();
    x.f.wait_grant_gone(
        GRANT,
        "the grant released by the new leader",
        Duration::from_secs(90),
    )
    .await;
    wait_served_at(&x, &survivor_url, &lineage, "Invalid").await;
    // The survivor refuses the lineage from then on.
    let again = x
        .trust
        .exchange(&survivor_url, &Exchange::form(&hopped, &x.b.token, &[]))
        .await;
    assert_eq!(again.status, 400);
    assert_eq!(again.json()["error"], "invalid_grant");
}

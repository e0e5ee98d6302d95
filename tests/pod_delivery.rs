//! Pod delivery (issue #21, "Delivery without a Secret"), against the real apiserver and the live
//! token endpoint: a grant with `tokenDelivery: Pod` holds no Secret; its token is sealed in its
//! status, and only a pod of its agent, proving itself with its pod-bound ServiceAccount token, gets
//! a token of it (a narrowing of its own, audited as delivered to that pod). Every other caller —
//! another agent's pod, another namespace's, a token bound to no pod, an impersonated one, a deleted
//! pod's — is refused and nothing is minted; a sealed token copied to another grant or rolled back
//! after the grant narrowed never serves more than the grant allows now. An agent that requires
//! proof of possession gets only DPoP-bound tokens, and a grant that would put its token in a
//! Secret is denied. Switching a grant between Secret and Pod delivery keeps exactly one copy.
//!
//! Tokens are never printed: see `support::exchange`.

mod support;

use std::time::Duration;

use delegation_operator::signing;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use support::{
    exchange::{AUDIENCE, Exchange, ExchangeSetup, GRANT, served_statuses, wait_served},
    verifiers::{jose_proof, unverified_claims},
    *,
};

const INVALID_GRANT: &str = "invalid_grant";
const UNAUTHORIZED_CLIENT: &str = "unauthorized_client";
const INVALID_DPOP_PROOF: &str = "invalid_dpop_proof";

fn pod_delivery() -> ExchangeSetup {
    ExchangeSetup {
        token_delivery: Some("Pod"),
        ..Default::default()
    }
}

/// A grant from alice to agent `a` of `tickets:read`, with `tokenDelivery` if given.
fn read_only_grant(name: &str, delivery: Option<&str>) -> String {
    let delivery = delivery.map_or(String::new(), |d| format!(", tokenDelivery: {d}"));
    format!(
        "apiVersion: delegation.nhi.dev/v1alpha1\nkind: DelegationGrant\nmetadata: {{name: {name}}}\n\
         spec: {{principal: {{kind: User, name: alice@example.com}}, actorRef: {{name: a}}, \
         scopes: [tickets:read], audience: \"{AUDIENCE}\", tokenTTL: 10m{delivery}}}\n"
    )
}

/// The grant's status as stored.
async fn status_of(x: &Exchange, grant: &str) -> Value {
    let grant = x.f.grants().get(grant).await.unwrap();
    serde_json::to_value(grant.status).unwrap()
}

/// Asks for `grant`'s token as `actor` (a pod-bound token), with a DPoP proof if given; expects a
/// token: checks the answer, that the token verifies with the served keys, narrows the grant to
/// `actor`'s pod (its last record names the pod), and the `Delivered` audit line. Returns the token
/// and its claims.
async fn delivered(
    x: &Exchange,
    grant: &str,
    caller: &support::exchange::Workload,
    proof: Option<(&str, &str)>,
) -> (String, Value) {
    let before = x.audit_lines("Delivered").len();
    let form = Exchange::delivery_form(grant, &caller.token, &[]);
    let reply = match proof {
        // A proof is good once: the caller made sure the endpoint has caught up.
        Some((proof, _)) => x.post_with(&form, &[("DPoP", proof)]).await,
        // The endpoint's own grant cache may not show the grant's newest sealed token yet (or
        // still show a replaced one): asked again until it does, any other answer fails at once.
        None => {
            wait_for(
                "the token endpoint to deliver the grant's current token",
                Duration::from_secs(60),
                || async {
                    let reply = x.post(&form).await;
                    let catching_up = reply.status == 503
                        || (reply.status == 400 && reply.json()["error"] == INVALID_GRANT);
                    (!catching_up).then_some(reply)
                },
            )
            .await
        }
    };
    assert_eq!(
        reply.status,
        200,
        "the agent's pod was refused its token: {}",
        support::exchange::scrubbed(&reply.body)
    );
    assert!(reply.cache_control.contains("no-store"));
    let body = reply.json();
    let token = body["access_token"].as_str().expect("a token").to_owned();
    let claims = signing::verify(&token, &x.f.jwks().await, AUDIENCE, 0)
        .unwrap_or_else(|e| panic!("the delivered token does not verify: {e}"));
    assert_eq!(unverified_claims(&token), claims);
    assert_eq!(claims["sub"], "user:alice@example.com");
    assert_eq!(claims["act"]["sub"], x.agent("a"));
    assert_eq!(claims["delegation.nhi.dev/grant"]["name"], grant);
    let record = claims["delegation_chain"]
        .as_array()
        .and_then(|c| c.last())
        .expect("a delegation record");
    assert_eq!(record["workload"]["pod"], caller.pod_name());
    assert_eq!(record["workload"]["pod_uid"], caller.pod_uid());
    assert_eq!(record["requested_by"], caller.username.as_str());
    assert!(
        claims["status"]["status_list"]["idx"].is_u64(),
        "its own status entry"
    );
    match proof {
        None => {
            assert_eq!(body["token_type"], "Bearer");
            assert!(claims.get("cnf").is_none());
        }
        Some((_, jkt)) => {
            assert_eq!(body["token_type"], "DPoP");
            assert_eq!(claims["cnf"], json!({"jkt": jkt}));
        }
    }
    let line = wait_for(
        "the Delivered audit line",
        Duration::from_secs(15),
        || async { x.audit_lines("Delivered").into_iter().nth(before) },
    )
    .await;
    assert_eq!(
        line["message"],
        format!("delivered to pod {}/{}", x.ns(), caller.pod_name())
    );
    assert_eq!(line["tokenIds"], json!([claims["jti"]]));
    assert!(
        !support::exchange::contains_token(&line.to_string(), &token),
        "the audit line carries no token"
    );
    (token, claims)
}

/// A Pod-delivered grant is Ready with no Secret anywhere in the namespace and its token sealed (no
/// JWT readable in the status); its agent's pod gets a token of its own, which the served status
/// list follows: deleting the grant revokes it, and the grant's token can no longer be fetched.
#[tokio::test]
async fn a_pod_delivered_grant_has_no_secret_and_its_agents_pod_gets_its_token() {
    let x = Exchange::start_with("pod-delivery", pod_delivery(), &[]).await;
    let status = status_of(&x, GRANT).await;
    assert!(status.get("secretName").is_none(), "{status}");
    let sealed = status["sealedToken"].as_str().expect("a sealed token");
    assert!(sealed.starts_with("v1."), "sealed: {sealed:.12}");
    assert!(!sealed.contains("eyJ"), "no JWT readable in the status");
    assert!(
        token_secrets(&x.f.client, x.ns()).await.is_empty(),
        "no token Secret"
    );
    let message = status["conditions"][0]["message"].as_str().unwrap();
    assert!(message.contains("no Secret"), "{message}");
    // What is sealed is the grant's token the status describes (opened with the operator's keys).
    let grant_claims = unverified_claims(&x.grant_token);
    assert_eq!(grant_claims["jti"], status["token"]["id"]);
    assert_eq!(grant_claims["delegation.nhi.dev/delivery"], "pod");

    let (first, claims) = delivered(&x, GRANT, &x.a, None).await;
    let expires = status["token"]["expiresAt"].as_str().unwrap();
    let grant_expiry = expires.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
    assert!(
        claims["exp"].as_i64().unwrap() <= grant_expiry.as_second(),
        "never longer than the grant's own token"
    );
    // Each pod (and each ask) gets a token of its own.
    let other_pod = x.workload("sa-a").await;
    let (second, _) = delivered(&x, GRANT, &other_pod, None).await;
    assert_ne!(first, second);
    assert_eq!(served_statuses(&x, &[&first, &second]).await, ["Valid"; 2]);
    assert!(
        token_secrets(&x.f.client, x.ns()).await.is_empty(),
        "still no token Secret"
    );

    x.f.grants()
        .delete(GRANT, &Default::default())
        .await
        .unwrap();
    x.f.wait_grant_gone(GRANT, "the grant released", Duration::from_secs(60))
        .await;
    wait_served(&x, &[&first, &second], "Invalid").await;
    // Refused: `not_delivered` once the endpoint's cache has seen the deletion, `subject_revoked` or
    // `grant_gone` before.
    x.refused(
        &Exchange::delivery_form(GRANT, &x.a.token, &[]),
        INVALID_GRANT,
    )
    .await;
}

/// Nobody but the agent's own pods gets the token: the pod of an agent it may delegate to, of an
/// agent of the namespace it may not, of another namespace naming the grant, a token bound to no
/// pod, an impersonated one, and the token of a pod that was deleted; and a grant that delivers to
/// a Secret, or does not exist, is not delivered at all. Each refusal mints nothing.
#[tokio::test]
async fn nobody_but_the_agents_own_pods_gets_the_token() {
    let x = Exchange::start_with("pod-delivery-attacks", pod_delivery(), &[]).await;
    // The endpoint has the grant's sealed token (a refusal below is about who asks, not a lag).
    delivered(&x, GRANT, &x.a, None).await;
    fn form(actor: &str) -> Vec<(&str, &str)> {
        Exchange::delivery_form(GRANT, actor, &[])
    }
    x.refused_because(&form(&x.b.token), UNAUTHORIZED_CLIENT, "not_the_agent")
        .await;
    x.refused_because(&form(&x.c.token), UNAUTHORIZED_CLIENT, "not_an_actor")
        .await;

    let other = fresh_namespace_undeclared(&x.f.client, "pod-delivery-elsewhere").await;
    let pod = pod_running_as(&x.f.client, &other, "sa-a").await;
    let elsewhere = request_service_account_token_for(
        &x.f.client,
        &other,
        "sa-a",
        Some(&pod),
        &[&x.issuer.url],
    )
    .await;
    let body = x
        .refused_because_without(&form(&elsewhere), INVALID_GRANT, "not_delivered", &[x.ns()])
        .await;
    assert!(
        body["error_description"].as_str().unwrap().contains(&other),
        "the caller's own namespace is named, the grant's is not: {body}"
    );

    let unbound =
        request_service_account_token_for(&x.f.client, x.ns(), "sa-a", None, &[&x.issuer.url])
            .await;
    x.refused_because(&form(&unbound), UNAUTHORIZED_CLIENT, "actor_not_pod_bound")
        .await;
    let impersonated = x.impersonated_actor_token().await;
    x.refused_because(
        &form(&impersonated),
        UNAUTHORIZED_CLIENT,
        "actor_not_pod_bound",
    )
    .await;

    // A pod's token dies with the pod (within the review cache's 10 s).
    let doomed = x.workload("sa-a").await;
    delivered(&x, GRANT, &doomed, None).await;
    let pods: Api<Pod> = Api::namespaced(x.f.client.clone(), x.ns());
    pods.delete(doomed.pod_name(), &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the deleted pod's token to be refused",
        Duration::from_secs(60),
        || async {
            let reply = x.post(&form(&doomed.token)).await;
            (reply.status == 400 && reply.json()["error"] == UNAUTHORIZED_CLIENT).then_some(())
        },
    )
    .await;
    x.refused(&form(&doomed.token), UNAUTHORIZED_CLIENT).await;

    // A grant of the same agent that delivers to a Secret; and one that does not exist.
    x.f.apply(&read_only_grant("in-secret", None)).await;
    x.f.wait_ready_within("in-secret", "True", None, Duration::from_secs(90))
        .await;
    for grant in ["in-secret", "no-such-grant"] {
        x.refused_because(
            &Exchange::delivery_form(grant, &x.a.token, &[]),
            INVALID_GRANT,
            "not_delivered",
        )
        .await;
    }
}

/// Whoever may write a grant's status gains nothing with a sealed token: one copied from another
/// grant does not open under this one (the operator replaces it), and an older one of the same grant,
/// put back after the grant narrowed, serves nothing wider than the grant allows now.
#[tokio::test]
async fn a_copied_or_rolled_back_sealed_token_serves_nothing_more() {
    let x = Exchange::start_with("pod-delivery-sealed", pod_delivery(), &[]).await;
    x.f.apply(&read_only_grant("narrow", Some("Pod"))).await;
    x.f.wait_ready_within("narrow", "True", None, Duration::from_secs(90))
        .await;
    let wide = status_of(&x, GRANT).await;
    let narrow = status_of(&x, "narrow").await;
    let status_api = |name: &str, status: &Value| {
        let grants = x.f.grants();
        let name = name.to_owned();
        let patch = json!({"status": status});
        async move {
            grants
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };

    // The wide grant's sealed token in the narrow grant's status.
    let mut forged = narrow.clone();
    forged["sealedToken"] = wide["sealedToken"].clone();
    status_api("narrow", &forged).await;
    for _ in 0..5 {
        let reply = x
            .post(&Exchange::delivery_form("narrow", &x.a.token, &[]))
            .await;
        if reply.status == 200 {
            let claims = unverified_claims(reply.json()["access_token"].as_str().unwrap());
            assert_eq!(
                claims["delegation.nhi.dev/grant"]["name"], "narrow",
                "never the other grant's token"
            );
            assert_eq!(claims["scope"], "tickets:read");
        } else {
            assert_eq!(
                reply.status,
                503,
                "{}",
                support::exchange::scrubbed(&reply.body)
            );
        }
    }
    wait_for(
        "the operator to reseal the narrow grant's token",
        Duration::from_secs(60),
        || async {
            let now = status_of(&x, "narrow").await;
            (now["sealedToken"] != wide["sealedToken"] && now["sealedToken"].is_string())
                .then_some(())
        },
    )
    .await;
    delivered(&x, "narrow", &x.a, None).await;

    // The wide grant narrows; its old (wide) status is put back.
    x.f.grants()
        .patch(
            GRANT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scopes": ["tickets:read"]}})),
        )
        .await
        .unwrap();
    wait_for(
        "the grant's token to be replaced",
        Duration::from_secs(60),
        || async {
            let now = status_of(&x, GRANT).await;
            (now["token"]["id"] != wide["token"]["id"]
                && now["effectiveScopes"] == json!(["tickets:read"]))
            .then_some(())
        },
    )
    .await;
    status_api(GRANT, &wide).await;
    for _ in 0..5 {
        let reply = x
            .post(&Exchange::delivery_form(GRANT, &x.a.token, &[]))
            .await;
        match reply.status {
            200 => {
                let claims = unverified_claims(reply.json()["access_token"].as_str().unwrap());
                assert_eq!(
                    claims["scope"], "tickets:read",
                    "nothing wider than the grant now"
                );
            }
            400 => assert_eq!(reply.json()["error"], INVALID_GRANT),
            other => assert_eq!(other, 503, "{}", support::exchange::scrubbed(&reply.body)),
        }
    }
    wait_for(
        "the operator to replace the rolled-back token",
        Duration::from_secs(60),
        || async {
            let now = status_of(&x, GRANT).await;
            (now["effectiveScopes"] == json!(["tickets:read"]) && now["sealedToken"].is_string())
                .then_some(())
        },
    )
    .await;
    let (_, claims) = delivered(&x, GRANT, &x.a, None).await;
    assert_eq!(claims["scope"], "tickets:read");
}

/// Whoever may write the status removes the sealed token, or puts back an older one of the same grant
/// (with the status that described it; it was revoked when it was replaced): either way the operator
/// mints a new one, and the agent's pods get tokens again.
#[tokio::test]
async fn a_removed_or_put_back_sealed_token_is_replaced() {
    let x = Exchange::start_with("pod-delivery-rollback", pod_delivery(), &[]).await;
    let first = status_of(&x, GRANT).await;
    x.f.grants()
        .patch_status(
            GRANT,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"sealedToken": null}})),
        )
        .await
        .unwrap();
    let second = wait_for("a new sealed token", Duration::from_secs(60), || async {
        let now = status_of(&x, GRANT).await;
        (now["sealedToken"].is_string() && now["token"]["id"] != first["token"]["id"])
            .then_some(now)
    })
    .await;
    wait_served(&x, &[&x.grant_token], "Invalid").await;
    delivered(&x, GRANT, &x.a, None).await;

    // The first (revoked) token put back, with the status that described it.
    x.f.grants()
        .patch_status(
            GRANT,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": first})),
        )
        .await
        .unwrap();
    wait_for(
        "the put-back token replaced",
        Duration::from_secs(60),
        || async {
            let now = status_of(&x, GRANT).await;
            (now["sealedToken"].is_string()
                && now["token"]["id"] != first["token"]["id"]
                && now["token"]["id"] != second["token"]["id"])
                .then_some(())
        },
    )
    .await;
    delivered(&x, GRANT, &x.a, None).await;
}

/// An agent that requires proof of possession: its grant (no tokenDelivery) is delivered to pods
/// and needs no Secret; a delivery without a DPoP proof is refused, one with a proof (made by the
/// independent `jose`) is bound to the proof's key, and that token is exchanged only with a proof by
/// the same key. A grant of that agent asking for Secret delivery is denied with a reason.
#[tokio::test]
async fn an_agent_that_requires_proof_gets_only_key_bound_tokens() {
    let setup = ExchangeSetup {
        require_proof: true,
        ..Default::default()
    };
    let x = Exchange::start_with("pod-delivery-dpop", setup, &[]).await;
    assert!(
        token_secrets(&x.f.client, x.ns()).await.is_empty(),
        "no token Secret"
    );
    assert!(status_of(&x, GRANT).await["sealedToken"].is_string());
    let no_proof = Exchange::delivery_form(GRANT, &x.a.token, &[]);
    wait_for(
        "the token endpoint to see the grant's sealed token",
        Duration::from_secs(60),
        || async {
            let reply = x.post(&no_proof).await;
            (reply.status == 400 && reply.json()["error"] == INVALID_DPOP_PROOF).then_some(())
        },
    )
    .await;
    x.refused_because(
        &Exchange::delivery_form(GRANT, &x.a.token, &[]),
        INVALID_DPOP_PROOF,
        "proof_required",
    )
    .await;
    let (key, jkt, proof) = jose_proof(None, "POST", &x.token_endpoint(), None).await;
    assert_eq!(
        unverified_claims(&x.grant_token)["delegation.nhi.dev/delivery"],
        "pod+dpop"
    );
    let (bound, _) = delivered(&x, GRANT, &x.a, Some((&proof, &jkt))).await;

    let narrower = Exchange::form(&bound, &x.a.token, &[("scope", "tickets:read")]);
    x.refused_because(&narrower, INVALID_DPOP_PROOF, "proof_required")
        .await;
    let (_, _, by_key) = jose_proof(Some(&key), "POST", &x.token_endpoint(), Some(&bound)).await;
    let reply = x.post_with(&narrower, &[("DPoP", &by_key)]).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        support::exchange::scrubbed(&reply.body)
    );
    let claims = unverified_claims(reply.json()["access_token"].as_str().unwrap());
    assert_eq!(
        claims["cnf"],
        json!({"jkt": jkt}),
        "the lineage stays bound"
    );

    x.f.apply(&read_only_grant("in-secret", Some("Secret")))
        .await;
    let refused =
        x.f.wait_ready_within(
            "in-secret",
            "False",
            Some("DeniedProofNeedsPodDelivery"),
            Duration::from_secs(90),
        )
        .await;
    let message = refused.status.unwrap().conditions.unwrap()[0]
        .message
        .clone();
    assert!(message.contains("tokenDelivery"), "{message}");
    assert!(
        token_secrets(&x.f.client, x.ns()).await.is_empty(),
        "no token Secret for it either"
    );
}

/// A grant moved from Secret to Pod delivery loses its Secret and the token in it is revoked; moved
/// back, it gets a Secret again and the tokens its pods were delivered are revoked. Only one copy
/// of a grant's token is ever current.
#[tokio::test]
async fn switching_delivery_keeps_exactly_one_copy() {
    let x = Exchange::start("pod-delivery-switch").await;
    let in_secret = x.grant_token.clone();
    let set_delivery = |delivery: &str| {
        let grants = x.f.grants();
        let patch = json!({"spec": {"tokenDelivery": delivery}});
        async move {
            grants
                .patch(GRANT, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    set_delivery("Pod").await;
    wait_for(
        "the grant to deliver to pods",
        Duration::from_secs(60),
        || async {
            let status = status_of(&x, GRANT).await;
            (status["sealedToken"].is_string() && status.get("secretName").is_none()).then_some(())
        },
    )
    .await;
    wait_for(
        "the token Secret to be deleted",
        Duration::from_secs(60),
        || async {
            token_secrets(&x.f.client, x.ns())
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    wait_served(&x, &[&in_secret], "Invalid").await;
    let (from_pod, _) = delivered(&x, GRANT, &x.a, None).await;

    set_delivery("Secret").await;
    let back = wait_for(
        "the token back in its Secret",
        Duration::from_secs(60),
        || async {
            let status = status_of(&x, GRANT).await;
            if status.get("sealedToken").is_some() {
                return None;
            }
            x.f.token_in(&format!("{GRANT}-token")).await
        },
    )
    .await;
    assert_ne!(back, in_secret);
    wait_served(&x, &[&from_pod], "Invalid").await;
    assert_eq!(served_statuses(&x, &[&back]).await, ["Valid"]);
    let not_delivered = |body: &Value| {
        body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("holds a token for Pod delivery"))
    };
    wait_for(
        "the token endpoint to see the grant deliver to a Secret",
        Duration::from_secs(60),
        || async {
            let reply = x
                .post(&Exchange::delivery_form(GRANT, &x.a.token, &[]))
                .await;
            (reply.status == 400 && not_delivered(&reply.json())).then_some(())
        },
    )
    .await;
    x.refused_because(
        &Exchange::delivery_form(GRANT, &x.a.token, &[]),
        INVALID_GRANT,
        "not_delivered",
    )
    .await;
}

/// Where no token endpoint serves deliveries (`--pod-delivery=false`, the chart's default without
/// the verifier's token exchange), a Pod-delivered grant is refused with a reason that says what to
/// do, and no token is minted or written anywhere.
#[tokio::test]
async fn without_a_token_endpoint_pod_delivery_is_refused_not_left_unfetchable() {
    let (f, _issuer, _trust) =
        support::verifiers::start_https_operator("pod-delivery-off", &["--pod-delivery=false"])
            .await;
    let setup = pod_delivery();
    f.apply(&setup.agents()).await;
    f.apply(&setup.grant()).await;
    let refused = f
        .wait_ready_within(
            GRANT,
            "False",
            Some("PodDeliveryNotServed"),
            Duration::from_secs(90),
        )
        .await;
    let status = refused.status.unwrap();
    let message = &status.conditions.unwrap()[0].message;
    assert!(
        message.contains("verifier.tokenExchange.enabled"),
        "{message}"
    );
    assert!(status.token.is_none() && status.sealed_token.is_none());
    assert!(
        f.operator().audit().iter().all(|l| l["action"] != "Issued"),
        "nothing minted"
    );
}

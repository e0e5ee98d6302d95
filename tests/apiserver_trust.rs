//! The Kubernetes apiserver trusting the operator as a JWT issuer: the test control plane's structured
//! authentication configuration (`hack/control-plane.sh`, `--authentication-config`) gets a JWT
//! authenticator whose discovery is the operator's own HTTPS listener on loopback. An agent's token for
//! the apiserver's audience then authenticates as the delegating user, with the actor chain in the
//! user's extra attributes, and RBAC decides what it may do; expired, forged and other-audience tokens
//! are refused. The configuration is restored afterwards, also when the test fails.

mod support;

use std::time::Duration;

use k8s_openapi::api::{authentication::v1::UserInfo, core::v1::ConfigMap};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use serde_json::{Value, json};
use support::{verifiers::*, *};

/// The audience the apiserver accepts (as a real cluster's `--api-audiences` default would be).
const APISERVER_AUDIENCE: &str = "https://kubernetes.default.svc";
/// Prefix of every username (and group) the authenticator maps, so none can pass for a system user.
const PREFIX: &str = "delegation:";

/// The JWT authenticator this project recommends (docs/verifying.md), for an issuer and its CA.
fn authenticator(issuer: &str, ca_pem: &str) -> Value {
    json!({
        "issuer": {
            "url": issuer,
            "certificateAuthority": ca_pem,
            "audiences": [APISERVER_AUDIENCE],
        },
        "claimValidationRules": [
            {
                "expression": "has(claims.act) && has(claims.act.sub) && has(claims.client_id) && claims.client_id == claims.act.sub",
                "message": "a delegation token names its current actor in act.sub and client_id",
            },
            {"expression": "has(claims.jti)", "message": "a delegation token has a jti"},
        ],
        "claimMappings": {
            "username": {"claim": "sub", "prefix": PREFIX},
            "groups": {"expression": "has(claims.client_id) ? ['delegation:' + claims.client_id] : []"},
            "uid": {"expression": "has(claims.jti) ? claims.jti : ''"},
            "extra": [
                {
                    "key": "delegation.nhi.dev/actor",
                    "valueExpression": "has(claims.act) && has(claims.act.sub) ? claims.act.sub : ''",
                },
                {
                    // The chain, current actor first (four hops deep at most: CEL has no recursion).
                    "key": "delegation.nhi.dev/actors",
                    "valueExpression": "!has(claims.act) ? [] : [claims.act.sub] + (!has(claims.act.act) ? [] : [claims.act.act.sub] + (!has(claims.act.act.act) ? [] : [claims.act.act.act.sub] + (!has(claims.act.act.act.act) ? [] : [claims.act.act.act.act.sub])))",
                },
                {
                    "key": "delegation.nhi.dev/scope",
                    "valueExpression": "has(claims.scope) ? claims.scope : ''",
                },
                {
                    "key": "delegation.nhi.dev/grant",
                    // `in claims` is "no such overload" here; the optional index works.
                    "valueExpression": "claims[?'delegation.nhi.dev/grant'].hasValue() ? claims['delegation.nhi.dev/grant'].namespace + '/' + claims['delegation.nhi.dev/grant'].name : ''",
                },
            ],
        },
    })
}

const AGENTS: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: ops-bot}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [configmaps:read]
  allowedAudiences: [https://kubernetes.default.svc, https://tickets.example.com]
  maxTokenTTL: 10m
  delegation: {maxDepth: 1, allowedActors: [reader]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: reader}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [configmaps:read]
  allowedAudiences: [https://kubernetes.default.svc]
  maxTokenTTL: 10m
"#;

const GRANTS: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: root}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: ops-bot}
  scopes: [configmaps:read]
  audience: https://kubernetes.default.svc
  tokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: hop}
spec:
  parentGrantRef: {name: root}
  actorRef: {name: reader}
  scopes: [configmaps:read]
  audience: https://kubernetes.default.svc
  tokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: brief}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: ops-bot}
  scopes: [configmaps:read]
  audience: https://kubernetes.default.svc
  tokenTTL: 30s
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: tickets}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: ops-bot}
  scopes: [configmaps:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
"#;

/// Who the apiserver says the bearer of `token` is, or the HTTP status it refused it with.
async fn whoami_with(token: &str) -> Result<UserInfo, u16> {
    let client = client_with_token(token).await;
    let review = Api::<k8s_openapi::api::authentication::v1::SelfSubjectReview>::all(client)
        .create(&PostParams::default(), &Default::default())
        .await;
    match review {
        Ok(r) => Ok(r.status.and_then(|s| s.user_info).expect("a userInfo")),
        Err(kube::Error::Api(status)) => Err(status.code),
        Err(other) => panic!("SelfSubjectReview failed without an answer: {other}"),
    }
}

fn status_code<T>(result: kube::Result<T>) -> Option<u16> {
    match result {
        Ok(_) => None,
        Err(kube::Error::Api(status)) => Some(status.code),
        Err(other) => panic!("request failed without an answer: {other}"),
    }
}

fn extra(user: &UserInfo, key: &str) -> Vec<String> {
    user.extra
        .as_ref()
        .and_then(|e| e.get(key).cloned())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_apiserver_authenticates_agents_by_their_delegation_tokens_and_rbac_applies() {
    // Fails here, with what to do, when the shared control plane predates --authentication-config.
    auth_config_path();
    let (f, issuer, trust) = start_https_operator("apiserver-trust", &[]).await;
    let ns = f.ns.clone();
    f.apply(AGENTS).await;
    f.apply(GRANTS).await;
    for g in ["root", "hop", "brief", "tickets"] {
        f.wait_ready(g, "True", Some("Issued")).await;
    }
    let token = f.token_in("hop-token").await.unwrap();
    let jti = unverified_claims(&token)["jti"]
        .as_str()
        .unwrap()
        .to_owned();

    // The apiserver reloads its configuration about 10 s after the change and swaps the authenticator
    // in once it has fetched discovery from the operator.
    let _authenticator = JwtAuthenticator::install(authenticator(&issuer.url, &trust.ca_pem));
    let user = wait_for(
        "the apiserver to load the JWT authenticator and accept the agent's token",
        Duration::from_secs(90),
        || async { whoami_with(&token).await.ok() },
    )
    .await;

    // The delegating user, the agent as a group, the chain in extra (SelfSubjectReview).
    let username = format!("{PREFIX}alice@example.com");
    assert_eq!(user.username.as_deref(), Some(username.as_str()));
    assert_eq!(user.uid.as_deref(), Some(jti.as_str()));
    let groups = user.groups.clone().unwrap_or_default();
    let agent_group = format!("{PREFIX}agent:{ns}/reader");
    assert!(groups.contains(&agent_group), "groups: {groups:?}");
    assert!(groups.contains(&"system:authenticated".to_owned()));
    assert_eq!(
        extra(&user, "delegation.nhi.dev/actor"),
        [format!("agent:{ns}/reader")]
    );
    assert_eq!(
        extra(&user, "delegation.nhi.dev/actors"),
        [format!("agent:{ns}/reader"), format!("agent:{ns}/ops-bot")]
    );
    assert_eq!(
        extra(&user, "delegation.nhi.dev/scope"),
        ["configmaps:read"]
    );
    assert_eq!(
        extra(&user, "delegation.nhi.dev/grant"),
        [format!("{ns}/hop")]
    );
    assert_eq!(
        extra(&user, "authentication.kubernetes.io/credential-id"),
        [format!("JTI={jti}")]
    );

    // The same through `kubectl auth whoami`.
    let kubeconfig = TokenKubeconfig::new(&token);
    let out = tokio::process::Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(&kubeconfig.0)
        .args(["auth", "whoami", "-o", "json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl auth whoami: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let review: Value = serde_json::from_slice(&out.stdout).unwrap();
    let info = &review["status"]["userInfo"];
    assert_eq!(info["username"], username.as_str());
    assert_eq!(
        info["extra"]["delegation.nhi.dev/actors"],
        json!([format!("agent:{ns}/reader"), format!("agent:{ns}/ops-bot")])
    );

    // RBAC decides: nothing before a binding, then exactly what the binding allows.
    let probe = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("probe".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(f.client.clone(), &ns)
        .create(&PostParams::default(), &probe)
        .await
        .unwrap();
    let agent: Client = client_with_token(&token).await;
    let configmaps: Api<ConfigMap> = Api::namespaced(agent.clone(), &ns);
    assert_eq!(status_code(configmaps.get("probe").await), Some(403));
    grant_role(
        &f.client,
        &ns,
        "delegated-reader",
        &[user_subject(&username)],
        &[rule("", &["configmaps"], &["get", "list"], &[])],
    )
    .await;
    let read = configmaps.get("probe").await.expect("the bound user reads");
    assert_eq!(read.metadata.name.as_deref(), Some("probe"));
    assert_eq!(
        status_code(configmaps.list(&ListParams::default()).await),
        None
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(agent.clone(), &ns);
    assert_eq!(
        status_code(secrets.list(&ListParams::default()).await),
        Some(403),
        "secrets were not granted"
    );
    let elsewhere: Api<ConfigMap> = Api::namespaced(agent, &f.operator_namespace());
    assert_eq!(
        status_code(elsewhere.list(&ListParams::default()).await),
        Some(403),
        "the binding is for one namespace"
    );

    // Forgeries and tokens for someone else are refused (401).
    let forged_user = with_claims(&token, |c| c["sub"] = "admin".into());
    assert_eq!(
        whoami_with(&forged_user).await.err(),
        Some(401),
        "forged sub"
    );
    let forged_chain = with_claims(&token, |c| c["act"] = json!({"sub": "agent:x/y"}));
    assert_eq!(
        whoami_with(&forged_chain).await.err(),
        Some(401),
        "forged act"
    );
    assert_eq!(
        whoami_with(&alg_none(&token)).await.err(),
        Some(401),
        "alg none"
    );
    let tickets = f.token_in("tickets-token").await.unwrap();
    assert_eq!(
        whoami_with(&tickets).await.err(),
        Some(401),
        "a token for another audience"
    );

    // A token that worked is refused once expired (after the apiserver's 10 s success cache, too).
    // The operator renews it after two thirds of its 30 s: take one with some life left.
    let (brief, brief_exp) = wait_for(
        "a brief token with 8 s to live",
        Duration::from_secs(40),
        || async {
            let token = f.token_in("brief-token").await?;
            let exp = unverified_claims(&token)["exp"].as_i64()?;
            let left = exp - k8s_openapi::jiff::Timestamp::now().as_second();
            (left >= 8).then_some((token, exp))
        },
    )
    .await;
    assert!(
        whoami_with(&brief).await.is_ok(),
        "the brief token works while it is valid"
    );
    let wait = brief_exp + 11 - k8s_openapi::jiff::Timestamp::now().as_second();
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
    }
    assert_eq!(whoami_with(&brief).await.err(), Some(401), "expired");
}

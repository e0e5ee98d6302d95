//! The Kubernetes apiserver trusting the operator as a JWT issuer: the test control plane's structured
//! authentication configuration (`hack/control-plane.sh`, `--authentication-config`) gets a JWT
//! authenticator whose discovery is the operator's own HTTPS listener on loopback. An agent's token for
//! the apiserver's audience then authenticates as the delegating user, with the actor chain in the
//! user's extra attributes, and RBAC decides what it may do; expired, forged and other-audience tokens
//! are refused. Subjects cannot collide: a Group principal's token never authenticates (least of all
//! as the user of the same name), a User principal whose name looks like an agent's subject gets
//! neither that subject nor that agent's permissions, and a ServiceAccount principal does not pass
//! for the ServiceAccount. The configuration is restored afterwards, also when the test fails.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

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
            {
                // `sub` is typed (`user:`, `group:`, `serviceaccount:`): only a User or ServiceAccount
                // principal is someone the apiserver can authenticate. No one *is* a group, so a Group
                // principal's token is refused rather than mapped to any user.
                "expression": "has(claims.sub) && ((claims.sub.startsWith('user:') && !claims.sub.startsWith('user:system:')) || claims.sub.startsWith('serviceaccount:'))",
                "message": "a delegation token authenticates only for a User (sub user:<name>) or ServiceAccount (sub serviceaccount:<namespace>:<name>) principal",
            },
        ],
        "claimMappings": {
            // `user:alice` -> `delegation:alice`; `serviceaccount:ns:sa` ->
            // `delegation:system:serviceaccount:ns:sa` (never the ServiceAccount's own user name).
            "username": {"expression": "claims.sub.startsWith('user:') ? 'delegation:' + claims.sub.substring(5) : 'delegation:system:' + claims.sub"},
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

/// The AuthenticationConfiguration of docs/verifying.md is the one these tests run (but for the
/// issuer's URL and CA), so that what the apiserver is shown to do is what the documentation promises.
#[test]
fn the_documented_authenticator_is_the_tested_one() {
    let docs = std::fs::read_to_string(repo_root().join("docs/verifying.md")).unwrap();
    let start = docs
        .find("```yaml\napiVersion: apiserver.config.k8s.io/v1")
        .expect("docs/verifying.md shows an AuthenticationConfiguration")
        + "```yaml\n".len();
    let end = start + docs[start..].find("```").unwrap();
    let config: Value = serde_yaml::from_str(&docs[start..end]).unwrap();
    let documented = &config["jwt"][0];
    let tested = authenticator("https://issuer", "CA");
    for key in ["claimValidationRules", "claimMappings"] {
        assert_eq!(documented[key], tested[key], "{key}");
    }
    assert_eq!(
        documented["issuer"]["audiences"],
        tested["issuer"]["audiences"]
    );
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

/// The agents of the subject attacks: `refund-bot` is a real agent whose subject a User principal's
/// name imitates; `ops-bot` acts for every principal.
const SUBJECT_AGENTS: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: ops-bot}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [configmaps:read]
  allowedAudiences: [https://kubernetes.default.svc]
  maxTokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: refund-bot}
spec:
  owner: {kind: Group, name: payments}
  allowedScopes: [configmaps:read]
  allowedAudiences: [https://kubernetes.default.svc]
  maxTokenTTL: 10m
"#;

/// A grant of `configmaps:read` for the apiserver's audience, from `principal` to `agent`.
fn subject_grant(name: &str, principal: Value, agent: &str) -> Value {
    json!({
        "principal": principal,
        "actorRef": {"name": agent},
        "scopes": ["configmaps:read"],
        "audience": APISERVER_AUDIENCE,
        "tokenTTL": "10m",
        "secretName": format!("{name}-token"),
    })
}

/// The subject attacks, with the documented authenticator: (a) someone allowed to delegate only for
/// the *group* `alice@example.com` must not get a token the apiserver takes for the *user* alice (with
/// bare subjects and `username: {claim: sub}` it authenticated as `delegation:alice@example.com`);
/// (b) a User principal named `agent:<ns>/refund-bot` must not get that agent's subject (it did) nor
/// its RBAC. Every failed check is listed at the end.
#[tokio::test]
async fn subjects_cannot_collide_at_the_apiserver() {
    auth_config_path();
    let (f, issuer, trust) = start_https_operator("apiserver-subjects", &[]).await;
    let ns = f.ns.clone();
    f.apply(SUBJECT_AGENTS).await;
    let create = |client: Client, name: &str, principal: Value, agent: &str| {
        let obj = our_object(
            "DelegationGrant",
            name,
            subject_grant(name, principal, agent),
        );
        let ns = ns.clone();
        async move {
            dynamic_api(&client, &ns, "DelegationGrant")
                .create(&PostParams::default(), &obj)
                .await
        }
    };
    let alice = json!({"kind": "User", "name": "alice@example.com"});
    let alices_group = json!({"kind": "Group", "name": "alice@example.com"});
    // A User principal named exactly like the agent refund-bot's subject.
    let refund_bot_subject = format!("agent:{ns}/refund-bot");
    let look_alike = json!({"kind": "User", "name": refund_bot_subject});
    let robot_user = format!("system:serviceaccount:{ns}:robot");
    let robot = json!({"kind": "ServiceAccount", "name": robot_user});

    // Mallory may delegate for the *group* named alice@example.com, and for nothing else.
    let mallory = "mallory@example.com";
    grant_role(
        &f.client,
        &ns,
        "mallory-delegates-for-the-group",
        &[user_subject(mallory)],
        &[
            rule(
                "delegation.nhi.dev",
                &["delegationgrants"],
                &["create", "get"],
                &[],
            ),
            rule(
                "delegation.nhi.dev",
                &["groups"],
                &["delegate"],
                &["alice@example.com"],
            ),
        ],
    )
    .await;
    let as_mallory = client_as(mallory, &[]).await;
    let refused = create(
        as_mallory.clone(),
        "mallory-as-alice",
        alice.clone(),
        "ops-bot",
    )
    .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403),
        "mallory may not delegate for the user alice: {refused:?}"
    );
    create(as_mallory, "for-the-group", alices_group, "ops-bot")
        .await
        .expect("mallory delegates for the group alice@example.com");
    for (name, principal, agent) in [
        ("for-alice", alice, "ops-bot"),
        (
            "refunds",
            json!({"kind": "User", "name": "bob@example.com"}),
            "refund-bot",
        ),
        ("not-an-agent", look_alike, "ops-bot"),
        ("for-robot", robot, "ops-bot"),
    ] {
        create(f.client.clone(), name, principal, agent)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }
    let names = [
        "for-alice",
        "for-the-group",
        "refunds",
        "not-an-agent",
        "for-robot",
    ];
    let mut tokens = BTreeMap::new();
    for g in names {
        f.wait_ready(g, "True", Some("Issued")).await;
        tokens.insert(g, f.token_in(&format!("{g}-token")).await.unwrap());
    }
    let sub = |g: &str| {
        unverified_claims(&tokens[g])["sub"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    // Every attack is checked, and every one that succeeds is reported at the end.
    let mut problems: Vec<String> = Vec::new();
    let mut check = |ok: bool, problem: String| {
        if !ok {
            problems.push(problem);
        }
    };

    // Against the apiserver, with the recommended authenticator (docs/verifying.md).
    let _authenticator = JwtAuthenticator::install(authenticator(&issuer.url, &trust.ca_pem));
    let user = wait_for(
        "the apiserver to load the JWT authenticator and accept the User principal's token",
        Duration::from_secs(90),
        || async { whoami_with(&tokens["for-alice"]).await.ok() },
    )
    .await;
    let alice_username = format!("{PREFIX}alice@example.com");
    assert_eq!(user.username.as_deref(), Some(alice_username.as_str()));

    // (a) The Group principal's token never authenticates as the user alice: it is refused.
    match whoami_with(&tokens["for-the-group"]).await {
        Err(code) => check(
            code == 401,
            format!("the Group principal's token was refused with {code}, not 401"),
        ),
        Ok(group_user) => check(
            false,
            format!(
                "the token of Group alice@example.com (sub {:?}) authenticated as {:?}{}",
                sub("for-the-group"),
                group_user.username,
                if group_user.username.as_deref() == Some(alice_username.as_str()) {
                    ": the user alice"
                } else {
                    ""
                }
            ),
        ),
    }
    check(
        sub("for-the-group") != sub("for-alice"),
        format!(
            "the Group and the User alice@example.com share the subject {:?}",
            sub("for-alice")
        ),
    );

    // (b) A User principal named like an agent's subject gets no agent's subject...
    let agent_subjects: BTreeSet<String> = ["ops-bot", "refund-bot"]
        .iter()
        .map(|a| format!("agent:{ns}/{a}"))
        .chain(tokens.values().flat_map(|t| {
            let claims = unverified_claims(t);
            let mut subs = vec![claims["client_id"].as_str().unwrap_or_default().to_owned()];
            let mut act = &claims["act"];
            while let Some(s) = act["sub"].as_str() {
                subs.push(s.to_owned());
                act = &act["act"];
            }
            subs
        }))
        .collect();
    let look_alike_sub = sub("not-an-agent");
    check(
        !agent_subjects.contains(&look_alike_sub) && !look_alike_sub.starts_with("agent:"),
        format!(
            "the User principal named {refund_bot_subject:?} got the sub {look_alike_sub:?}, an agent's subject (agents: {agent_subjects:?})"
        ),
    );
    // ...and at the apiserver neither the agent's group nor its permissions.
    let refunds_user = whoami_with(&tokens["refunds"])
        .await
        .expect("refund-bot's token");
    let agent_group = format!("{PREFIX}{refund_bot_subject}");
    assert!(
        refunds_user
            .groups
            .unwrap_or_default()
            .contains(&agent_group),
        "refund-bot acting authenticates in group {agent_group}"
    );
    match whoami_with(&tokens["not-an-agent"]).await {
        Ok(look_alike_user) => {
            let groups = look_alike_user.groups.clone().unwrap_or_default();
            check(
                !groups.contains(&agent_group)
                    && extra(&look_alike_user, "delegation.nhi.dev/actor")
                        == [format!("agent:{ns}/ops-bot")],
                format!(
                    "the User named {refund_bot_subject:?} authenticated in groups {groups:?} with actor {:?}",
                    extra(&look_alike_user, "delegation.nhi.dev/actor")
                ),
            );
        }
        Err(code) => check(
            false,
            format!("a User principal's token was refused ({code})"),
        ),
    }
    let probe = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("refund-ledger".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(f.client.clone(), &ns)
        .create(&PostParams::default(), &probe)
        .await
        .unwrap();
    grant_role(
        &f.client,
        &ns,
        "refund-bot-reads",
        &[group_subject(&agent_group)],
        &[rule("", &["configmaps"], &["get"], &[])],
    )
    .await;
    let read_as = |g: &'static str| {
        let token = tokens[g].clone();
        let ns = ns.clone();
        async move {
            let client = client_with_token(&token).await;
            status_code(
                Api::<ConfigMap>::namespaced(client, &ns)
                    .get("refund-ledger")
                    .await,
            )
        }
    };
    assert_eq!(read_as("refunds").await, None, "refund-bot reads");
    check(
        read_as("not-an-agent").await == Some(403),
        format!("the User named {refund_bot_subject:?} read what only refund-bot may"),
    );

    // A ServiceAccount principal is typed too, and does not pass for the ServiceAccount itself.
    check(
        sub("for-robot") == format!("serviceaccount:{ns}:robot"),
        format!(
            "the ServiceAccount principal's sub is {:?}",
            sub("for-robot")
        ),
    );
    match whoami_with(&tokens["for-robot"]).await {
        Ok(robot_as) => {
            let groups = robot_as.groups.clone().unwrap_or_default();
            check(
                robot_as.username.as_deref() == Some(format!("{PREFIX}{robot_user}").as_str())
                    && !groups
                        .iter()
                        .any(|g| g.starts_with("system:serviceaccounts")),
                format!(
                    "the ServiceAccount principal's token authenticated as {:?} in {groups:?}",
                    robot_as.username
                ),
            );
        }
        Err(code) => check(
            false,
            format!("the ServiceAccount principal's token was refused ({code})"),
        ),
    }

    assert!(
        problems.is_empty(),
        "subjects collide:\n- {}",
        problems.join("\n- ")
    );
}

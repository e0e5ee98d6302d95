//! The CRDs against a real kube-apiserver: they install, the examples apply, and the apiserver itself
//! rejects invalid objects with a message naming the offending field.

mod support;

use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::*;

fn grant(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1",
        "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

/// A spec without the fields the admission policies stamp (`spec.requester` and `spec.authors` of
/// grants): what the user wrote, when nothing else was changed on the way in.
fn as_written(spec: &Value) -> Value {
    let mut spec = spec.clone();
    if let Some(fields) = spec.as_object_mut() {
        fields.remove("requester");
        fields.remove("authors");
    }
    spec
}

fn agent(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1",
        "kind": "AgentIdentity",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn valid_grant_spec() -> Value {
    json!({
        "principal": {"kind": "User", "name": "alice@example.com"},
        "actorRef": {"name": "ticket-triage"},
        "scopes": ["tickets:read"],
        "audience": "https://tickets.example.com",
        "tokenTTL": "10m",
    })
}

fn valid_agent_spec() -> Value {
    json!({
        "owner": {"kind": "Group", "name": "support-platform"},
        "allowedScopes": ["tickets:read"],
        "allowedAudiences": ["https://tickets.example.com"],
        "maxTokenTTL": "15m",
    })
}

/// `valid_grant_spec()` with one change applied.
fn grant_spec_with(change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut spec = valid_grant_spec();
    change(spec.as_object_mut().unwrap());
    spec
}

fn agent_spec_with(change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut spec = valid_agent_spec();
    change(spec.as_object_mut().unwrap());
    spec
}

#[tokio::test]
async fn every_crd_installs_and_becomes_established() {
    let client = client().await;
    let crds = install_crds(&client).await;
    let names: Vec<_> = crds
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "agentidentities.delegation.nhi.dev",
            "audiencepolicies.delegation.nhi.dev",
            "delegationapprovals.delegation.nhi.dev",
            "delegationgrants.delegation.nhi.dev"
        ]
    );
    for crd in &crds {
        let status = crd.status.as_ref().expect("CRD has a status");
        let conditions = status.conditions.as_ref().expect("CRD has conditions");
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"),
            "{:?} not Established: {conditions:?}",
            crd.metadata.name
        );
        assert_eq!(
            status
                .accepted_names
                .as_ref()
                .and_then(|n| n.categories.as_deref()),
            Some(&["delegation".to_owned()][..])
        );
    }
}

#[tokio::test]
async fn every_example_applies() {
    let client = client().await;
    install_crds(&client).await;
    let me = whoami(&client).await.username.unwrap();
    // Top level only: examples/rbac/ holds RBAC objects, applied by tests/admission.rs.
    let files = yaml_files(&repo_root().join("examples"));
    assert!(
        files.len() >= 3,
        "expected at least three examples, found {files:?}"
    );
    for file in files {
        let ns = fresh_namespace(&client, "examples").await;
        let docs = load_documents(&file);
        assert!(!docs.is_empty(), "{} has no documents", file.display());
        for doc in docs {
            let created = create_document(&client, &ns, &doc)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "{} ({:?}) was rejected: {e}",
                        file.display(),
                        doc.metadata.name
                    )
                });
            // What the apiserver stores is what the user wrote: no defaults, no normalising; only
            // the requester is added, and it is the user who created the grant.
            assert_eq!(
                as_written(&created.data["spec"]),
                doc.data["spec"],
                "spec changed on the way in ({})",
                file.display()
            );
            if doc
                .types
                .as_ref()
                .is_some_and(|t| t.kind == "DelegationGrant")
            {
                assert_eq!(
                    created.data["spec"]["requester"]["username"],
                    me.as_str(),
                    "{}: requester not stamped",
                    file.display()
                );
            }
        }
    }
}

/// Each case: what it is, the object, and the field the apiserver's message must name.
fn invalid_objects() -> Vec<(&'static str, DynamicObject, &'static str)> {
    let many_scopes: Vec<String> = (0..65).map(|i| format!("scope{i}")).collect();
    vec![
        (
            "no scopes",
            grant(
                "no-scopes",
                grant_spec_with(|s| {
                    s.remove("scopes");
                }),
            ),
            "spec.scopes",
        ),
        (
            "empty scopes",
            grant(
                "empty-scopes",
                grant_spec_with(|s| {
                    s.insert("scopes".into(), json!([]));
                }),
            ),
            "spec.scopes",
        ),
        (
            "a scope containing a space",
            grant(
                "spaced-scope",
                grant_spec_with(|s| {
                    s.insert("scopes".into(), json!(["tickets read"]));
                }),
            ),
            "spec.scopes[0]",
        ),
        (
            "a repeated scope",
            grant(
                "dup-scope",
                grant_spec_with(|s| {
                    s.insert("scopes".into(), json!(["a", "a"]));
                }),
            ),
            "spec.scopes[1]",
        ),
        (
            "too many scopes",
            grant(
                "many-scopes",
                grant_spec_with(|s| {
                    s.insert("scopes".into(), json!(many_scopes));
                }),
            ),
            "spec.scopes",
        ),
        (
            "an unparseable TTL",
            grant(
                "bad-ttl",
                grant_spec_with(|s| {
                    s.insert("tokenTTL".into(), json!("ten minutes"));
                }),
            ),
            "spec.tokenTTL",
        ),
        (
            "a zero TTL",
            grant(
                "zero-ttl",
                grant_spec_with(|s| {
                    s.insert("tokenTTL".into(), json!("0m"));
                }),
            ),
            "spec.tokenTTL",
        ),
        (
            "both principal and parentGrantRef",
            grant(
                "both-roots",
                grant_spec_with(|s| {
                    s.insert("parentGrantRef".into(), json!({"name": "p"}));
                }),
            ),
            "exactly one of spec.principal or spec.parentGrantRef",
        ),
        (
            "neither principal nor parentGrantRef",
            grant(
                "no-root",
                grant_spec_with(|s| {
                    s.remove("principal");
                }),
            ),
            "exactly one of spec.principal or spec.parentGrantRef",
        ),
        (
            "an unknown principal kind",
            grant(
                "robot",
                grant_spec_with(|s| {
                    s.insert("principal".into(), json!({"kind": "Robot", "name": "r2"}));
                }),
            ),
            "spec.principal.kind",
        ),
        (
            "renewBefore equal to tokenTTL",
            grant(
                "renew-late",
                grant_spec_with(|s| {
                    s.insert("renewBefore".into(), json!("10m"));
                }),
            ),
            "spec.renewBefore",
        ),
        (
            "renewBefore longer than tokenTTL",
            grant(
                "renew-later",
                grant_spec_with(|s| {
                    s.insert("renewBefore".into(), json!("1h"));
                }),
            ),
            "spec.renewBefore",
        ),
        (
            "a secretName that is not a DNS-1123 name",
            grant(
                "bad-secret",
                grant_spec_with(|s| {
                    s.insert("secretName".into(), json!("Not_A_Name"));
                }),
            ),
            "spec.secretName",
        ),
        (
            "an audience with whitespace",
            grant(
                "bad-aud",
                grant_spec_with(|s| {
                    s.insert("audience".into(), json!("two words"));
                }),
            ),
            "spec.audience",
        ),
        (
            "a validUntil that is not a timestamp",
            grant(
                "bad-until",
                grant_spec_with(|s| {
                    s.insert("validUntil".into(), json!("tomorrow"));
                }),
            ),
            "spec.validUntil",
        ),
        (
            "a validUntil past the last instant the operator can represent",
            grant(
                "until-9999",
                grant_spec_with(|s| {
                    s.insert("validUntil".into(), json!("9999-12-31T00:00:00Z"));
                }),
            ),
            "spec.validUntil",
        ),
        (
            "a validUntil with ten fractional digits",
            grant(
                "until-ten-digits",
                grant_spec_with(|s| {
                    s.insert(
                        "validUntil".into(),
                        json!("2030-01-01T00:00:00.1234567890Z"),
                    );
                }),
            ),
            "spec.validUntil",
        ),
        (
            "a validUntil with a +99:00 offset",
            grant(
                "until-offset",
                grant_spec_with(|s| {
                    s.insert("validUntil".into(), json!("2030-01-01T00:00:00+99:00"));
                }),
            ),
            "spec.validUntil",
        ),
        (
            "a validUntil with text after a second T",
            grant(
                "until-trailing",
                grant_spec_with(|s| {
                    s.insert("validUntil".into(), json!("2030-01-01T00:00:00ZT00:00:00"));
                }),
            ),
            "spec.validUntil",
        ),
        (
            "an empty validUntil",
            grant(
                "until-empty",
                grant_spec_with(|s| {
                    s.insert("validUntil".into(), json!(""));
                }),
            ),
            "spec.validUntil",
        ),
        (
            "a validUntil with lowercase t and z",
            grant(
                "until-lowercase",
                grant_spec_with(|s| {
                    s.insert("validUntil".into(), json!("2030-01-01t00:00:00z"));
                }),
            ),
            "spec.validUntil",
        ),
        (
            "a validUntil without a time",
            grant(
                "until-date",
                grant_spec_with(|s| {
                    s.insert("validUntil".into(), json!("2030-01-01"));
                }),
            ),
            "spec.validUntil",
        ),
        (
            "a validUntil in year 0000",
            grant(
                "until-year-zero",
                grant_spec_with(|s| {
                    s.insert("validUntil".into(), json!("0000-01-01T00:00:00Z"));
                }),
            ),
            "spec.validUntil",
        ),
        (
            "a validUntil on February 30",
            grant(
                "until-feb-30",
                grant_spec_with(|s| {
                    s.insert("validUntil".into(), json!("2030-02-30T00:00:00Z"));
                }),
            ),
            "spec.validUntil",
        ),
        (
            "a TTL whose sum would overflow CEL's duration",
            grant(
                "huge-ttl",
                grant_spec_with(|s| {
                    s.insert("tokenTTL".into(), json!("999999h999999h999999h"));
                }),
            ),
            "spec.tokenTTL",
        ),
        (
            "a malformed renewBefore",
            grant(
                "bad-renew",
                grant_spec_with(|s| {
                    s.insert("renewBefore".into(), json!("soon"));
                }),
            ),
            "spec.renewBefore",
        ),
        (
            "an authorization detail without type",
            grant(
                "no-type",
                grant_spec_with(|s| {
                    s.insert("authorizationDetails".into(), json!([{"identifier": "1"}]));
                }),
            ),
            "spec.authorizationDetails[0].type",
        ),
        (
            "a grant name too long for the default Secret name (five 49-character labels)",
            grant(&vec!["x".repeat(49); 5].join("."), valid_grant_spec()),
            "spec.secretName",
        ),
        (
            "an agent maxDepth above 8",
            agent(
                "deep",
                agent_spec_with(|s| {
                    s.insert("delegation".into(), json!({"maxDepth": 9}));
                }),
            ),
            "spec.delegation.maxDepth",
        ),
        (
            "an unknown owner kind",
            agent(
                "robot-owner",
                agent_spec_with(|s| {
                    s.insert("owner".into(), json!({"kind": "Robot", "name": "x"}));
                }),
            ),
            "spec.owner.kind",
        ),
        (
            "an agent without allowedScopes",
            agent(
                "no-allowed",
                agent_spec_with(|s| {
                    s.remove("allowedScopes");
                }),
            ),
            "spec.allowedScopes",
        ),
        (
            "an agent maxTokenTTL in days",
            agent(
                "days",
                agent_spec_with(|s| {
                    s.insert("maxTokenTTL".into(), json!("1d"));
                }),
            ),
            "spec.maxTokenTTL",
        ),
    ]
}

#[tokio::test]
async fn the_apiserver_rejects_invalid_objects_naming_the_field() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "invalid").await;
    let cases = invalid_objects();
    assert!(cases.len() >= 10);
    for (what, obj, field) in cases {
        let message = rejection_message(create_document(&client, &ns, &obj).await);
        assert!(
            message.contains(field),
            "{what}: message does not name {field:?}: {message}"
        );
        // Sentences for people: never a CEL evaluation error, nor the laxer date-time check.
        for phrase in ["type conversion", "evaluation error", "must be of type"] {
            assert!(!message.contains(phrase), "{what}: {phrase:?} in {message}");
        }
    }
}

#[tokio::test]
async fn the_valid_baseline_objects_are_accepted() {
    // Guards the test above: each invalid case differs from these in one field only.
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "baseline").await;
    create_document(&client, &ns, &agent("ticket-triage", valid_agent_spec()))
        .await
        .unwrap();
    create_document(&client, &ns, &grant("baseline", valid_grant_spec()))
        .await
        .unwrap();
    let hop = grant_spec_with(|s| {
        s.remove("principal");
        s.insert("parentGrantRef".into(), json!({"name": "baseline"}));
        s.insert("renewBefore".into(), json!("9m59s"));
    });
    create_document(&client, &ns, &grant("hop", hop))
        .await
        .unwrap();
}

#[tokio::test]
async fn references_and_principal_are_immutable() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "immutable").await;
    let api = dynamic_api(&client, &ns, "DelegationGrant");
    create_document(&client, &ns, &grant("g", valid_grant_spec()))
        .await
        .unwrap();

    let changes: Vec<(&str, Value, &str)> = vec![
        (
            "actorRef",
            json!({"spec": {"actorRef": {"name": "someone-else"}}}),
            "spec.actorRef",
        ),
        (
            "principal",
            json!({"spec": {"principal": {"kind": "User", "name": "mallory@example.com"}}}),
            "spec.principal",
        ),
        (
            "principal swapped for parentGrantRef",
            json!({"spec": {"principal": null, "parentGrantRef": {"name": "other"}}}),
            "spec.principal",
        ),
    ];
    for (what, patch, field) in changes {
        let result = api
            .patch("g", &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        let message = rejection_message(result);
        assert!(
            message.contains(field) && message.contains("immutable"),
            "{what}: {message}"
        );
    }

    // A hop cannot be moved under another parent either.
    let hop = grant_spec_with(|s| {
        s.remove("principal");
        s.insert("parentGrantRef".into(), json!({"name": "g"}));
    });
    create_document(&client, &ns, &grant("hop", hop))
        .await
        .unwrap();
    let moved = api
        .patch(
            "hop",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"parentGrantRef": {"name": "other"}}})),
        )
        .await;
    let message = rejection_message(moved);
    assert!(
        message.contains("spec.parentGrantRef") && message.contains("immutable"),
        "{message}"
    );

    // Mutable fields still change.
    let patch = json!({"spec": {"scopes": ["tickets:read", "tickets:comment"], "tokenTTL": "5m"}});
    let updated = api
        .patch("g", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(updated.data["spec"]["tokenTTL"], "5m");
}

#[tokio::test]
async fn a_minimal_grant_is_stored_exactly_as_written() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "asis").await;
    let api = dynamic_api(&client, &ns, "DelegationGrant");
    let mut obj = grant(
        "as-written",
        grant_spec_with(|s| {
            s.insert("tokenTTL".into(), json!("60m"));
        }),
    );
    obj.metadata.namespace = Some(ns.clone());
    api.create(&PostParams::default(), &obj).await.unwrap();
    let stored = api.get("as-written").await.unwrap();
    assert_eq!(as_written(&stored.data["spec"]), obj.data["spec"]);
    assert_eq!(
        stored.data["spec"]["tokenTTL"], "60m",
        "60m must not become 1h"
    );
}

#[tokio::test]
async fn references_cannot_name_another_namespace() {
    // References carry a name only; a namespace written into one is an error (strict field validation,
    // what kubectl uses by default), never silently dropped.
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "crossns").await;
    let api = dynamic_api(&client, &ns, "DelegationGrant");
    let spec = grant_spec_with(|s| {
        s.remove("principal");
        s.insert(
            "parentGrantRef".into(),
            json!({"name": "elsewhere", "namespace": "other-team"}),
        );
    });
    let mut obj = grant("cross", spec);
    obj.metadata.namespace = Some(ns.clone());
    let params =
        PatchParams::apply(FIELD_MANAGER).validation(kube::api::ValidationDirective::Strict);
    let result = api.patch("cross", &params, &Patch::Apply(&obj)).await;
    match result {
        Err(kube::Error::Api(status)) => {
            assert!(status.message.contains("namespace"), "{}", status.message);
        }
        other => panic!("a cross-namespace reference was accepted: {other:?}"),
    }
}

/// The AudiencePolicies the examples need (`examples/policies/`, applied by `make run`, and the
/// GitOps examples' `policies/`) are accepted by the apiserver as written (a server-side dry run:
/// they are cluster-wide, and tests/gitops.rs applies the GitOps ones for real).
#[tokio::test]
async fn every_audience_policy_example_is_accepted() {
    let client = client().await;
    install_crds(&client).await;
    let root = repo_root().join("examples");
    let mut files = yaml_files(&root.join("policies"));
    files.extend(yaml_files(&root.join("gitops/delegation/policies")));
    assert_eq!(files.len(), 2, "{files:?}");
    let api = dynamic_api(&client, "", "AudiencePolicy");
    for file in files {
        for doc in load_documents(&file) {
            assert_eq!(doc.types.as_ref().unwrap().kind, "AudiencePolicy");
            let name = doc.metadata.name.clone().unwrap();
            let params = kube::api::PatchParams::apply(FIELD_MANAGER)
                .force()
                .dry_run();
            let created = api
                .patch(&name, &params, &kube::api::Patch::Apply(&doc))
                .await
                .unwrap_or_else(|e| panic!("{} ({name}): {e}", file.display()));
            assert_eq!(created.data["spec"], doc.data["spec"], "stored as written");
        }
    }
}

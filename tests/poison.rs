//! No object the apiserver stores can stop the operator: every time it accepts decodes, every
//! malformed time or duration is refused with one sentence (never a CEL evaluation error or a raw
//! regex), and a status the operator cannot decode (stored before the CRDs had these rules) reads as
//! no status instead of failing a whole list.

mod support;

use delegation_operator::api::{
    self, DURATION_MESSAGE, DURATION_ZERO_MESSAGE, DelegationGrant, TIME_DATE_MESSAGE,
    TIME_FORMAT_MESSAGE, TIME_RANGE_MESSAGE, UNREADABLE_VALID_UNTIL,
};
use k8s_openapi::jiff::Timestamp;
use kube::{
    Client, CustomResourceExt, ResourceExt,
    api::{DynamicObject, ListParams, ObjectList, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::*;

/// What no message of the apiserver may contain: CEL evaluation failures, raw regexes, the laxer
/// OpenAPI date-time check, or rules without a message.
const NOT_FOR_PEOPLE: [&str; 7] = [
    "type conversion",
    "evaluation error",
    "no such overload",
    "should match",
    "must be of type",
    "failed rule",
    "some validation rules were not checked",
];

fn grant_spec(valid_until: Option<&str>) -> Value {
    let mut spec = json!({
        "principal": {"kind": "User", "name": "alice@example.com"},
        "actorRef": {"name": "ticket-triage"},
        "scopes": ["tickets:read"],
        "audience": "https://tickets.example.com",
        "tokenTTL": "10m",
    });
    if let Some(v) = valid_until {
        spec["validUntil"] = json!(v);
    }
    spec
}

fn grant(name: &str, spec: Value) -> DynamicObject {
    our_object("DelegationGrant", name, spec)
}

/// Creates `obj` in `ns` as a server-side dry run: validated exactly as a create, stored nowhere.
async fn dry_run(
    client: &Client,
    ns: &str,
    obj: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    let kind = obj.types.as_ref().unwrap().kind.clone();
    let mut obj = obj.clone();
    obj.metadata.namespace = Some(ns.into());
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    dynamic_api(client, ns, &kind).create(&params, &obj).await
}

/// The typed grant the operator would see in what the apiserver returned.
fn decoded(obj: &DynamicObject) -> DelegationGrant {
    let value = serde_json::to_value(obj).unwrap();
    serde_json::from_value(value.clone()).unwrap_or_else(|e| {
        panic!("the apiserver returned a grant the operator cannot decode ({e}): {value}")
    })
}

/// Asserts that `message` holds exactly one error, about `field`, saying `sentence`.
fn assert_one_sentence(what: &str, message: &str, field: &str, sentence: &str) {
    for phrase in NOT_FOR_PEOPLE {
        assert!(!message.contains(phrase), "{what}: {phrase:?} in {message}");
    }
    assert_eq!(
        message.matches("Invalid value").count(),
        1,
        "{what}: not exactly one error: {message}"
    );
    assert!(
        message.contains(&format!("{field}: Invalid value")) && message.contains(sentence),
        "{what}: expected {field}: {sentence:?}, got {message}"
    );
}

/// Hostile `validUntil` values (each accepted by the apiserver's `format: date-time` before, and
/// unreadable by the operator or by CEL) and the sentence each gets.
fn hostile_times() -> Vec<(&'static str, &'static str)> {
    vec![
        ("9999-12-31T00:00:00Z", TIME_RANGE_MESSAGE),
        ("2030-01-01T00:00:00.1234567890Z", TIME_FORMAT_MESSAGE),
        ("2030-01-01T00:00:00+99:00", TIME_FORMAT_MESSAGE),
        ("2030-01-01T00:00:00ZT00:00:00", TIME_FORMAT_MESSAGE),
        ("", TIME_FORMAT_MESSAGE),
        ("2030-01-01t00:00:00z", TIME_FORMAT_MESSAGE),
        ("2030-01-01t00:00:00Z", TIME_FORMAT_MESSAGE),
        ("2030-01-01T00:00:00z", TIME_FORMAT_MESSAGE),
        ("2030-01-01", TIME_FORMAT_MESSAGE),
        ("2030-01-01T00:00Z", TIME_FORMAT_MESSAGE),
        ("2030-01-01 00:00:00Z", TIME_FORMAT_MESSAGE),
        ("0000-01-01T00:00:00Z", TIME_FORMAT_MESSAGE),
        ("2030-02-30T00:00:00Z", TIME_DATE_MESSAGE),
        ("2030-02-29T00:00:00Z", TIME_DATE_MESSAGE),
        ("2030-04-31T00:00:00Z", TIME_DATE_MESSAGE),
        ("2030-01-01T00:00:60Z", TIME_FORMAT_MESSAGE),
        ("2030-01-01T24:00:00Z", TIME_FORMAT_MESSAGE),
        ("2030-01-01T00:00:00,5Z", TIME_FORMAT_MESSAGE),
        ("2030-01-01T00:00:00+24:00", TIME_FORMAT_MESSAGE),
        ("2030-01-01T00:00:00+02", TIME_FORMAT_MESSAGE),
        ("2030-01-01T00:00:00Z[Europe/Paris]", TIME_FORMAT_MESSAGE),
        ("+002030-01-01T00:00:00Z", TIME_FORMAT_MESSAGE),
        ("tomorrow", TIME_FORMAT_MESSAGE),
        ("0001-01-01T00:00:00+01:00", TIME_RANGE_MESSAGE),
        ("9999-12-30T22:00:01Z", TIME_RANGE_MESSAGE),
        ("9999-12-31T23:59:59Z", TIME_RANGE_MESSAGE),
    ]
}

/// Times both parsers read, and that the apiserver therefore accepts.
const GOOD_TIMES: [&str; 9] = [
    "2030-01-01T00:00:00Z",
    "2030-01-01T02:00:00+02:00",
    "2030-01-01T00:00:00.123Z",
    "2030-01-01T02:00:00.123+02:00",
    "2029-12-31T19:00:00.123456789-05:00",
    "2024-02-29T00:00:00Z",
    "0001-01-01T00:00:00Z",
    "9999-12-30T22:00:00.999999999Z",
    "9999-12-31T00:00:00+02:00",
];

#[tokio::test]
async fn hostile_valid_until_values_are_refused_with_a_sentence() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "hostile-times").await;
    for (value, sentence) in hostile_times() {
        let result = dry_run(&client, &ns, &grant("g", grant_spec(Some(value)))).await;
        let message = rejection_message(result);
        assert_one_sentence(value, &message, "spec.validUntil", sentence);
    }
    // Longer than any time: the length check speaks (and CEL is not run at all).
    let long = "2030-01-01T00:00:00.000000000000000000000000000000000000000000000Z";
    let message =
        rejection_message(dry_run(&client, &ns, &grant("g", grant_spec(Some(long)))).await);
    assert!(
        message.contains("spec.validUntil: Too long: may not be more than 64"),
        "{message}"
    );
}

#[tokio::test]
async fn good_valid_until_values_are_stored_as_written_and_decode() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "good-times").await;
    for (i, value) in GOOD_TIMES.iter().enumerate() {
        let name = format!("g{i}");
        let created = create_document(&client, &ns, &grant(&name, grant_spec(Some(value))))
            .await
            .unwrap_or_else(|e| panic!("{value} was refused: {e}"));
        assert_eq!(
            created.data["spec"]["validUntil"], *value,
            "not stored as written"
        );
        let stored = dynamic_api(&client, &ns, "DelegationGrant")
            .get(&name)
            .await
            .unwrap();
        let until = decoded(&stored).spec.valid_until.expect("validUntil").0;
        assert_eq!(until, value.parse::<Timestamp>().unwrap(), "{value}");
        assert_ne!(until, UNREADABLE_VALID_UNTIL, "{value}");
    }
}

/// Strings around a valid time, one character changed, inserted or removed at every position: the
/// apiserver either accepts a string and the operator reads it as jiff does, or refuses it with one
/// of the three sentences. Nothing it accepts can poison the operator.
#[tokio::test]
async fn every_time_the_apiserver_accepts_decodes() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "time-corpus").await;
    let base = "2030-12-31T23:59:59.5+01:00";
    let mut corpus: Vec<String> = Vec::new();
    for i in 0..=base.len() {
        for c in ["0", "9", "T", "t", "Z", " ", "-", "+", ":", ".", ","] {
            corpus.push(format!("{}{c}{}", &base[..i], &base[i..]));
            if i < base.len() {
                corpus.push(format!("{}{c}{}", &base[..i], &base[i + 1..]));
            }
        }
        if i < base.len() {
            corpus.push(format!("{}{}", &base[..i], &base[i + 1..]));
        }
    }
    corpus.sort();
    corpus.dedup();
    let (mut accepted, mut refused) = (0, 0);
    for value in &corpus {
        match dry_run(&client, &ns, &grant("g", grant_spec(Some(value)))).await {
            Ok(obj) => {
                accepted += 1;
                let until = decoded(&obj).spec.valid_until.expect("validUntil").0;
                assert_eq!(Some(until), value.parse::<Timestamp>().ok(), "{value:?}");
            }
            result => {
                refused += 1;
                let message = rejection_message(result);
                let sentence = [TIME_FORMAT_MESSAGE, TIME_DATE_MESSAGE, TIME_RANGE_MESSAGE]
                    .into_iter()
                    .find(|s| message.contains(s))
                    .unwrap_or_else(|| panic!("{value:?}: no sentence in {message}"));
                assert_one_sentence(value, &message, "spec.validUntil", sentence);
            }
        }
    }
    assert!(
        accepted >= 20 && refused >= 100,
        "{accepted} accepted, {refused} refused"
    );
}

#[tokio::test]
async fn malformed_durations_get_one_sentence() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "durations").await;
    let with = |field: &str, value: &str| {
        let mut spec = grant_spec(None);
        spec[field] = json!(value);
        grant("g", spec)
    };
    for bad in [
        "ten minutes",
        "1d",
        "10",
        "1.5h",
        "-5m",
        "",
        "1h 30m",
        "1H",
        "1234567s",
        "P1D",
    ] {
        for field in ["tokenTTL", "renewBefore"] {
            let message = rejection_message(dry_run(&client, &ns, &with(field, bad)).await);
            assert_one_sentence(bad, &message, &format!("spec.{field}"), DURATION_MESSAGE);
        }
    }
    for zero in ["0s", "0h0m0s"] {
        let message = rejection_message(dry_run(&client, &ns, &with("tokenTTL", zero)).await);
        assert!(
            message.contains("spec.tokenTTL: Invalid value")
                && message.contains(DURATION_ZERO_MESSAGE),
            "{message}"
        );
        assert!(!message.contains("type conversion"), "{message}");
    }
    // The longest durations CEL is asked to parse: no overflow, so no evaluation error.
    let huge = "999999h999999h99999h";
    dry_run(&client, &ns, &with("tokenTTL", huge))
        .await
        .unwrap();
    let mut spec = grant_spec(None);
    spec["tokenTTL"] = json!(huge);
    spec["renewBefore"] = json!(huge);
    let message = rejection_message(dry_run(&client, &ns, &grant("g", spec)).await);
    assert_one_sentence(
        huge,
        &message,
        "spec.renewBefore",
        "spec.renewBefore must be shorter than spec.tokenTTL",
    );
    // One group more would overflow Go's duration: it is too long to be looked at.
    let message =
        rejection_message(dry_run(&client, &ns, &with("tokenTTL", "999999h999999h999999h")).await);
    assert!(
        message.contains("spec.tokenTTL: Too long: may not be more than 20"),
        "{message}"
    );
    assert!(!message.contains("type conversion"), "{message}");

    let agent = |ttl: &str| {
        our_object(
            "AgentIdentity",
            "a",
            json!({
                "owner": {"kind": "Group", "name": "platform"},
                "allowedScopes": ["tickets:read"],
                "allowedAudiences": ["https://tickets.example.com"],
                "maxTokenTTL": ttl,
            }),
        )
    };
    let message = rejection_message(dry_run(&client, &ns, &agent("1d")).await);
    assert_one_sentence(
        "maxTokenTTL 1d",
        &message,
        "spec.maxTokenTTL",
        DURATION_MESSAGE,
    );
    dry_run(&client, &ns, &agent("15m")).await.unwrap();
}

/// Every time field of a grant's status, as a merge patch setting it to `value`.
fn status_patches(value: &str) -> Vec<(&'static str, Value)> {
    let token = |at: &str| {
        let mut t = json!({
            "id": "jti", "keyID": "kid",
            "issuedAt": "2030-01-01T00:00:00Z",
            "expiresAt": "2030-01-01T00:10:00Z",
            "renewalTime": "2030-01-01T00:07:00Z",
        });
        t[at] = json!(value);
        t
    };
    vec![
        (
            "status.token.issuedAt",
            json!({"status": {"token": token("issuedAt")}}),
        ),
        (
            "status.token.expiresAt",
            json!({"status": {"token": token("expiresAt")}}),
        ),
        (
            "status.token.renewalTime",
            json!({"status": {"token": token("renewalTime")}}),
        ),
        (
            "status.previousToken.expiresAt",
            json!({"status": {"previousToken": {"id": "old", "expiresAt": value}}}),
        ),
        (
            "status.conditions[0].lastTransitionTime",
            json!({"status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "Issued", "message": "",
                "lastTransitionTime": value,
            }]}}),
        ),
    ]
}

#[tokio::test]
async fn hostile_status_times_are_refused_too() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "hostile-status").await;
    let api = dynamic_api(&client, &ns, "DelegationGrant");
    create_document(&client, &ns, &grant("g", grant_spec(None)))
        .await
        .unwrap();
    for (value, sentence) in [
        ("9999-12-31T00:00:00Z", TIME_RANGE_MESSAGE),
        ("2030-01-01T00:00:00ZT00:00:00", TIME_FORMAT_MESSAGE),
        ("not-a-time", TIME_FORMAT_MESSAGE),
    ] {
        for (field, patch) in status_patches(value) {
            let result = api
                .patch_status("g", &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            let message = rejection_message(result);
            assert_one_sentence(&format!("{field} = {value}"), &message, field, sentence);
        }
    }
    // What the operator writes still goes in, and the agent's conditions are checked the same way.
    let (_, good) = status_patches("2030-01-01T00:00:00Z").remove(4);
    api.patch_status("g", &PatchParams::default(), &Patch::Merge(&good))
        .await
        .unwrap();
    let agents = dynamic_api(&client, &ns, "AgentIdentity");
    let agent = our_object(
        "AgentIdentity",
        "a",
        json!({
            "owner": {"kind": "Group", "name": "platform"},
            "allowedScopes": ["tickets:read"],
            "allowedAudiences": ["https://tickets.example.com"],
            "maxTokenTTL": "15m",
        }),
    );
    create_document(&client, &ns, &agent).await.unwrap();
    let (field, hostile) = status_patches("9999-12-31T00:00:00Z").remove(4);
    let message = rejection_message(
        agents
            .patch_status("a", &PatchParams::default(), &Patch::Merge(&hostile))
            .await,
    );
    assert_one_sentence("agent condition", &message, field, TIME_RANGE_MESSAGE);
}

/// The group of a copy of the DelegationGrant CRD with the schema it had before the time rules
/// (`format: date-time`): what clusters still hold until they apply the new CRDs, and what objects
/// stored before then look like.
const LEGACY_GROUP: &str = "legacy-poison-test.delegation.nhi.dev";
const LEGACY_KIND: &str = "LegacyPoisonGrant";
const LEGACY_PLURAL: &str = "legacypoisongrants";

/// The DelegationGrant CRD with every strict time turned back into `format: date-time`.
fn legacy_grant_crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    fn loosen(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if m.get("x-kubernetes-validations") == Some(&api::time_rules()) {
                    m.remove("x-kubernetes-validations");
                    m.remove("maxLength");
                    m.insert("format".into(), json!("date-time"));
                }
                m.values_mut().for_each(loosen);
            }
            Value::Array(a) => a.iter_mut().for_each(loosen),
            _ => {}
        }
    }
    let mut crd = serde_json::to_value(DelegationGrant::crd()).unwrap();
    loosen(&mut crd);
    // Names of its own, without short names or categories, so that no one's `kubectl get` of
    // grants ever lands on it.
    crd["metadata"]["name"] = json!(format!("{LEGACY_PLURAL}.{LEGACY_GROUP}"));
    crd["spec"]["group"] = json!(LEGACY_GROUP);
    crd["spec"]["names"] = json!({
        "kind": LEGACY_KIND,
        "listKind": format!("{LEGACY_KIND}List"),
        "plural": LEGACY_PLURAL,
        "singular": LEGACY_KIND.to_lowercase(),
    });
    let text = crd.to_string();
    assert!(
        !text.contains("9999-12-30T22:00:00Z"),
        "time rules left in the legacy CRD"
    );
    serde_json::from_value(crd).unwrap()
}

/// Grants written under the old schema, one with a status the operator cannot decode, one with a
/// `validUntil` it cannot decode: listing grants still works, specs are intact, the status reads as
/// absent and the unreadable `validUntil` as long passed (the grant expires: fail closed).
#[tokio::test]
async fn a_hostile_status_stored_under_the_old_schema_does_not_poison_a_list() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let client = client().await;
    install_crds(&client).await;
    let crd = legacy_grant_crd();
    let crds = kube::Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch(
        crd.metadata.name.as_deref().unwrap(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();
    let established = kube::runtime::wait::await_condition(
        crds.clone(),
        crd.metadata.name.as_deref().unwrap(),
        kube::runtime::wait::conditions::is_crd_established(),
    );
    tokio::time::timeout(std::time::Duration::from_secs(30), established)
        .await
        .expect("legacy CRD Established")
        .unwrap();

    let ns = fresh_namespace(&client, "poison").await;
    let gvk = kube::api::GroupVersionKind::gvk(LEGACY_GROUP, "v1alpha1", LEGACY_KIND);
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, LEGACY_PLURAL);
    let legacy: kube::Api<DynamicObject> =
        kube::Api::namespaced_with(client.clone(), &ns, &resource);
    // A new CRD serves its objects a moment after it is Established.
    wait_for(
        "the legacy CRD serves",
        std::time::Duration::from_secs(60),
        || async { legacy.list(&ListParams::default()).await.ok() },
    )
    .await;
    // Spawned, so that the objects are deleted below whatever the checks find: an unreadable object
    // left behind would be a trap for anyone listing this kind later.
    let checks = tokio::spawn(list_grants_holding_hostile_times(
        client.clone(),
        legacy.clone(),
        ns.clone(),
    ))
    .await;
    for name in ["healthy", "hostile-status", "hostile-until"] {
        let _ = legacy.delete(name, &Default::default()).await;
    }
    if let Err(e) = checks {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn list_grants_holding_hostile_times(
    client: Client,
    legacy: kube::Api<DynamicObject>,
    ns: String,
) {
    let hostile = "9999-12-31T00:00:00Z";
    let object = |name: &str, until: &str| {
        let mut obj = grant(name, grant_spec(Some(until)));
        let types = obj.types.as_mut().unwrap();
        types.api_version = format!("{LEGACY_GROUP}/v1alpha1");
        types.kind = LEGACY_KIND.into();
        obj.metadata.namespace = Some(ns.clone());
        obj
    };
    let create = |obj: DynamicObject| {
        let legacy = legacy.clone();
        async move { legacy.create(&PostParams::default(), &obj).await }
    };
    create(object("healthy", "2030-01-01T00:00:00Z"))
        .await
        .unwrap();
    create(object("hostile-status", "2030-01-01T00:00:00Z"))
        .await
        .unwrap();
    create(object("hostile-until", hostile))
        .await
        .expect("the old schema accepts a validUntil of 9999-12-31T00:00:00Z");
    // The old schema accepts a hostile time in every time field of the status: the hole the new
    // rules close. Each patch leaves its field hostile (the token's fields one after the other).
    for (field, patch) in status_patches(hostile) {
        legacy
            .patch_status(
                "hostile-status",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("the old schema refused {field}: {e}"));
    }
    let stored = legacy.get("hostile-status").await.unwrap();
    let status = &stored.data["status"];
    for at in [
        &status["token"]["renewalTime"],
        &status["previousToken"]["expiresAt"],
        &status["conditions"][0]["lastTransitionTime"],
    ] {
        assert_eq!(at, hostile, "the hostile status was not stored: {status}");
    }
    assert!(
        serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>(json!(
            hostile
        ))
        .is_err(),
        "jiff reads {hostile} after all"
    );

    // What `Api::<DelegationGrant>::list` (and a watcher's list) does: one request, one typed
    // list. Before the lenient status this failed, for every grant in the list.
    let request = kube::core::Request::new(format!(
        "/apis/{LEGACY_GROUP}/v1alpha1/namespaces/{ns}/{LEGACY_PLURAL}"
    ))
    .list(&ListParams::default())
    .unwrap();
    let list: ObjectList<DelegationGrant> = client
        .request(request)
        .await
        .expect("a list holding hostile times decodes");
    let by_name = |n: &str| {
        list.items
            .iter()
            .find(|g| g.name_any() == n)
            .unwrap_or_else(|| panic!("{n} missing from the list"))
            .clone()
    };
    assert_eq!(list.items.len(), 3);

    // The hostile status reads as no status; the spec is intact.
    let grant = by_name("hostile-status");
    assert_eq!(
        grant.status,
        Some(Default::default()),
        "an unreadable status reads as empty"
    );
    assert_eq!(grant.spec.actor_ref.name, "ticket-triage");
    assert_eq!(grant.spec.scopes, ["tickets:read"]);
    assert_eq!(grant.spec.token_ttl.as_str(), "10m");
    assert_eq!(
        grant.spec.valid_until.map(|t| t.0),
        Some("2030-01-01T00:00:00Z".parse().unwrap())
    );

    // A validUntil the operator cannot read counts as long passed (the grant expires, fail
    // closed) instead of making the grant undecodable.
    let grant = by_name("hostile-until");
    assert_eq!(
        grant.spec.valid_until.map(|t| t.0),
        Some(UNREADABLE_VALID_UNTIL)
    );
    assert_eq!(grant.spec.actor_ref.name, "ticket-triage");

    let grant = by_name("healthy");
    assert_eq!(
        grant.spec.valid_until.map(|t| t.0),
        Some("2030-01-01T00:00:00Z".parse().unwrap())
    );
    assert_eq!(grant.status, None);
}

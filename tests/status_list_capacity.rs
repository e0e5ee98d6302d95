//! Status-list capacity against a real kube-apiserver: it grows with demand, one namespace's churn
//! is refused with its own reason while another namespace is still issued and renewed, and a grant
//! its authority refuses spends no entry. Small lists (`--status-list-size 4`) make this cheap.
//!
//! The operator here watches every namespace (the budget is about what namespaces share), so the
//! tests of this file run one at a time.

mod support;

use std::time::Duration;

use delegation_operator::status_list::{Status, StatusList};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client, api::PostParams};
use serde_json::json;
use support::*;

/// One test at a time: each runs an operator over every namespace.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A namespace with the tests' agents and audiences.
async fn tenant_namespace(client: &Client, prefix: &str) -> String {
    let ns = fresh_namespace(client, prefix).await;
    for doc in serde_yaml::Deserializer::from_str(CHAIN_AGENTS) {
        use serde::Deserialize;
        let value = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
        create_as(client, &ns, value).await.unwrap();
    }
    ns
}

fn notifier_grant(name: &str, ttl: &str) -> serde_json::Value {
    json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": {"principal": {"kind": "User", "name": "alice@example.com"}, "actorRef": {"name": "notifier"},
                 "scopes": ["tickets:read"], "audience": "https://tickets.example.com", "tokenTTL": ttl},
    })
}

static PAYMENTS_AGENT: std::sync::LazyLock<serde_json::Value> = std::sync::LazyLock::new(|| {
    json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "payments"},
        "spec": {"owner": {"kind": "Group", "name": "finance"}, "allowedScopes": ["payments:execute"],
                 "allowedAudiences": ["https://payments.example.com"], "maxTokenTTL": "10m",
                 "requireApproval": {"scopes": ["payments:execute"]}},
    })
});

fn payment_grant(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": {"principal": {"kind": "User", "name": "alice@example.com"}, "actorRef": {"name": "payments"},
                 "scopes": ["payments:execute"], "audience": "https://payments.example.com", "tokenTTL": "5m"},
    })
}

/// A namespace's grants, seen as a test's [`Fixture`] sees them (without starting an operator).
fn view(client: &Client, ns: &str) -> Fixture {
    Fixture {
        client: client.clone(),
        ns: ns.to_owned(),
        operator: None,
    }
}

/// The published Status List Tokens' lists, decoded (signatures are checked by `tests/operator.rs`).
async fn published_lists(client: &Client, operator_ns: &str) -> Vec<StatusList> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), operator_ns);
    let data = cms
        .get_opt("delegation-operator-status-lists")
        .await
        .unwrap()
        .and_then(|cm| cm.data)
        .unwrap_or_default();
    data.values()
        .map(|token| {
            let payload = token.split('.').nth(1).unwrap();
            let claims: serde_json::Value = serde_json::from_slice(
                &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                    .unwrap(),
            )
            .unwrap();
            StatusList::from_claim(&claims["status_list"]).unwrap()
        })
        .collect()
}

async fn start_operator(client: &Client, extra_args: &[&str]) -> (Operator, String) {
    install_crds(client).await;
    let operator_ns = format!("cap-op-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    create_namespace(client, &operator_ns).await;
    let args = [&["--status-list-size", "4"], extra_args].concat();
    (
        Operator::start_watching_all(&operator_ns, &args),
        operator_ns,
    )
}

/// How many grants to create in the churning namespace: every entry the safety limit allows.
const CHURN: usize = 32;

/// One namespace creating grants past its budget is refused `DeniedStatusListBudget`, with an
/// Event, while a grant in another namespace is still issued and renewed. Without the budget
/// (`CAPACITY_TEST_WITHOUT_BUDGET=1`, as before budgets existed) the churn takes every entry of the
/// registry and the other namespace's grant is no longer renewed: this test then fails.
#[tokio::test]
async fn one_namespace_over_its_budget_is_refused_and_another_is_still_served() {
    let _one = ONE_AT_A_TIME.lock().await;
    let client = client().await;
    let budget = if std::env::var_os("CAPACITY_TEST_WITHOUT_BUDGET").is_some() {
        "1000000"
    } else {
        "8"
    };
    // 8 lists of 4: CHURN entries in all.
    let (operator, _operator_ns) = start_operator(
        &client,
        &[
            "--status-list-max-lists",
            "8",
            "--status-list-budget-per-namespace",
            budget,
        ],
    )
    .await;
    let quiet = view(&client, &tenant_namespace(&client, "cap-quiet").await);
    let churn = view(&client, &tenant_namespace(&client, "cap-churn").await);
    create_as(&client, &quiet.ns, notifier_grant("steady", "20s"))
        .await
        .unwrap();
    let first = token_id(&quiet.wait_ready("steady", "True", None).await);

    for i in 0..CHURN {
        create_as(
            &client,
            &churn.ns,
            notifier_grant(&format!("churn-{i}"), "5m"),
        )
        .await
        .unwrap();
    }
    // The other namespace, meanwhile: its grant is renewed, and a new one is issued.
    wait_for(
        "the quiet grant renewed",
        Duration::from_secs(40),
        || async {
            let grant = quiet.grants().get("steady").await.ok()?;
            let token = grant.status.as_ref()?.token.as_ref()?;
            (token.id != first).then_some(())
        },
    )
    .await;
    create_as(&client, &quiet.ns, notifier_grant("newcomer", "5m"))
        .await
        .unwrap();
    quiet.wait_ready("newcomer", "True", Some("Issued")).await;

    let refused = churn
        .wait_ready(
            &format!("churn-{}", CHURN - 1),
            "False",
            Some("DeniedStatusListBudget"),
        )
        .await;
    let (_, message) = condition(&refused);
    assert!(
        message.contains(&format!("namespace {:?} holds 8", churn.ns))
            && message.contains("budget of 8")
            && message.contains("--status-list-budget-per-namespace"),
        "{message}"
    );
    assert!(
        churn
            .event_reasons(&format!("churn-{}", CHURN - 1))
            .await
            .contains(&("Warning".into(), "Denied".into()))
    );

    let ready = futures::future::join_all((0..CHURN).map(|i| {
        let api = churn.grants();
        async move { api.get(&format!("churn-{i}")).await.ok().filter(is_ready) }
    }))
    .await;
    assert_eq!(
        ready.iter().flatten().count(),
        8,
        "the churning namespace got exactly its budget"
    );
    operator.stop();
}

fn is_ready(grant: &delegation_operator::api::DelegationGrant) -> bool {
    delegation_operator::operator::grants::is_ready(grant)
}

/// A grant its authority check refuses (an approval it needs is missing) is refused without an
/// entry ever being allocated for it: nothing is published (a withdrawn entry would be published
/// INVALID), and the next token issued gets the very first index.
#[tokio::test]
async fn a_grant_refused_by_its_authority_takes_no_entry() {
    let _one = ONE_AT_A_TIME.lock().await;
    let client = client().await;
    install_crds(&client).await;
    let f = view(&client, &tenant_namespace(&client, "cap-authz").await);
    // Only this namespace: grants other tests left elsewhere must not publish lists here.
    let operator_ns = operator_namespace_for(&f.ns);
    create_namespace(&client, &operator_ns).await;
    let operator = Operator::start(&f.ns, &operator_ns, &[]);
    create_as(&client, &f.ns, PAYMENTS_AGENT.clone())
        .await
        .unwrap();
    create_as(&client, &f.ns, payment_grant("unapproved"))
        .await
        .unwrap();
    f.wait_ready("unapproved", "False", Some("ApprovalPending"))
        .await;
    // Any entry would have been written and published before the refusal was.
    let lists = published_lists(&client, &operator_ns).await;
    assert!(
        lists.is_empty(),
        "no list was needed, yet {} were published",
        lists.len()
    );

    create_as(&client, &f.ns, notifier_grant("by-admin", "5m"))
        .await
        .unwrap();
    f.wait_ready("by-admin", "True", Some("Issued")).await;
    let issued = operator
        .audit()
        .into_iter()
        .find(|r| r["action"] == "Issued" && r["grant"] == "by-admin")
        .expect("an Issued audit line");
    assert_eq!(issued["statusList"]["idx"], 0, "the first entry handed out");
    let lists = published_lists(&client, &operator_ns).await;
    let invalid = lists
        .iter()
        .flat_map(|l| (0..l.len()).map(move |i| l.get(i)))
        .filter(|s| *s != Ok(Status::Valid))
        .count();
    assert_eq!(invalid, 0, "no entry given back INVALID");
    operator.stop();
}

/// Demand beyond the old fixed 64 lists gets more lists: short-lived tokens rotating in one
/// namespace take more than 64 lists of 4 entries, every one published, and issuance goes on.
#[tokio::test]
async fn capacity_grows_past_the_old_64_lists_when_demand_needs_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let client = client().await;
    let (operator, operator_ns) = start_operator(&client, &[]).await;
    let f = view(&client, &tenant_namespace(&client, "cap-grow").await);
    let grants =
        Api::<delegation_operator::api::DelegationGrant>::namespaced(client.clone(), &f.ns);
    for i in 0..30 {
        let grant = serde_json::from_value(notifier_grant(&format!("fast-{i}"), "3s")).unwrap();
        grants.create(&PostParams::default(), &grant).await.unwrap();
    }
    wait_for(
        "more than 64 published lists",
        Duration::from_secs(120),
        || async {
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &operator_ns);
            let cm = cms.get("delegation-operator-status-lists").await.ok()?;
            (cm.data?.len() > 64).then_some(())
        },
    )
    .await;
    create_as(&client, &f.ns, notifier_grant("after", "5m"))
        .await
        .unwrap();
    f.wait_ready("after", "True", Some("Issued")).await;
    assert!(
        !operator.raw_output().contains("status lists are in use"),
        "the safety limit was not reached"
    );
    operator.stop();
}

//! Status-list capacity against a real kube-apiserver: it grows with demand, one namespace's churn
//! is refused with its own reason while another namespace is still issued and renewed, and a grant
//! its authority refuses spends no entry. Small lists (`--status-list-size 4`) make this cheap.
//!
//! The operator of the budget and growth tests watches every namespace (the budget is about what
//! namespaces share), so each runs on a control plane of its own: on the shared one it would also
//! reconcile, and wait behind, the grants every other test left there. Those two run one at a time,
//! so that their control planes and operators do not compete for the machine.

mod support;

use std::time::Duration;

use delegation_operator::status_list::{Status, StatusList};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client, ResourceExt, api::PostParams};
use serde_json::json;
use support::{private_control_plane::PrivateControlPlane, *};

/// One private control plane at a time (see the module doc).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a grant of these tests may take to be decided: generous, as the tests must pass with
/// every core busy (a decision takes well under a second on an idle machine).
const DECIDED_WITHIN: Duration = Duration::from_secs(120);

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
    grant_for("notifier", name, ttl)
}

fn grant_for(actor: &str, name: &str, ttl: &str) -> serde_json::Value {
    json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": {"principal": {"kind": "User", "name": "alice@example.com"}, "actorRef": {"name": actor},
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

/// The one operator of a test needs no lease; with the tests' short lease timings (8 s) a loaded
/// machine can keep it from renewing in time, and it would stop, failing a test that is not about
/// leader election.
const NO_ELECTION: &[&str] = &["--leader-election=false"];

/// A private control plane with the operator watching all of it (lists of 4 entries).
struct Private {
    // Dropped in this order: the operator before its control plane.
    operator: Operator,
    client: Client,
    operator_ns: String,
    _cp: PrivateControlPlane,
}

async fn private_operator(purpose: &str, extra_args: &[&str]) -> Private {
    let cp = PrivateControlPlane::start(purpose);
    cp.install().await;
    let client = cp.client().await;
    let operator_ns = "delegation-system".to_owned();
    create_namespace(&client, &operator_ns).await;
    let args = [&["--status-list-size", "4"], NO_ELECTION, extra_args].concat();
    Private {
        operator: Operator::start_watching_all(&cp.kubeconfig, &operator_ns, &args),
        client,
        operator_ns,
        _cp: cp,
    }
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
    let budget = if std::env::var_os("CAPACITY_TEST_WITHOUT_BUDGET").is_some() {
        "1000000"
    } else {
        "8"
    };
    // 8 lists of 4: CHURN entries in all.
    let private = private_operator(
        "capacity-budget",
        &[
            "--status-list-max-lists",
            "8",
            "--status-list-budget-per-namespace",
            budget,
        ],
    )
    .await;
    let client = &private.client;
    let quiet = view(client, &tenant_namespace(client, "cap-quiet").await);
    let churn = view(client, &tenant_namespace(client, "cap-churn").await);
    // Renewed every 18-20 s: its namespace's 8 entries last the test several minutes.
    create_as(client, &quiet.ns, notifier_grant("steady", "30s"))
        .await
        .unwrap();
    let first = token_id(
        &quiet
            .wait_ready_within("steady", "True", None, DECIDED_WITHIN)
            .await,
    );

    // Not renewed during the test (after 9 min or so): each issued one holds one entry.
    for i in 0..CHURN {
        let grant = grant_for("orchestrator", &format!("churn-{i}"), "15m");
        create_as(client, &churn.ns, grant).await.unwrap();
    }
    // The other namespace, meanwhile: its grant is renewed, and a new one is issued.
    wait_for("the quiet grant renewed", DECIDED_WITHIN, || async {
        let grant = quiet.grants().get("steady").await.ok()?;
        let token = grant.status.as_ref()?.token.as_ref()?;
        (token.id != first).then_some(())
    })
    .await;
    create_as(client, &quiet.ns, notifier_grant("newcomer", "5m"))
        .await
        .unwrap();
    quiet
        .wait_ready_within("newcomer", "True", Some("Issued"), DECIDED_WITHIN)
        .await;

    // Every churn grant decided: exactly the budget issued, the others refused for it.
    let decided = wait_for("every churn grant decided", DECIDED_WITHIN, || async {
        let grants = churn.grants().list(&Default::default()).await.ok()?;
        let decided: Vec<(String, String, String, String)> = grants
            .iter()
            .filter_map(|g| {
                let status = g.status.as_ref()?;
                (status.observed_generation == g.metadata.generation).then_some(())?;
                let ready = status.conditions.as_ref()?.first()?;
                Some((
                    g.name_any(),
                    ready.status.clone(),
                    ready.reason.clone(),
                    ready.message.clone(),
                ))
            })
            .collect();
        (decided.len() == CHURN).then_some(decided)
    })
    .await;
    let issued = decided.iter().filter(|(_, s, _, _)| s == "True").count();
    let over: Vec<_> = decided
        .iter()
        .filter(|(_, s, r, _)| s == "False" && r == "DeniedStatusListBudget")
        .collect();
    assert_eq!(
        (issued, over.len()),
        (8, CHURN - 8),
        "the churning namespace got exactly its budget: {decided:?}"
    );
    let (name, _, _, message) = over[0];
    assert!(
        message.contains(&format!("namespace {:?} holds 8", churn.ns))
            && message.contains("budget of 8")
            && message.contains("--status-list-budget-per-namespace"),
        "{message}"
    );
    // Events are written after the status, by a queue of their own.
    wait_for("the refusal's Warning Event", DECIDED_WITHIN, || async {
        let reasons = churn.event_reasons(name).await;
        reasons
            .contains(&("Warning".into(), "Denied".into()))
            .then_some(())
    })
    .await;
}

/// A grant its authority check refuses (an approval it needs is missing) is refused without an
/// entry ever being allocated for it: nothing is published (a withdrawn entry would be published
/// INVALID), and the next token issued gets the very first index.
#[tokio::test]
async fn a_grant_refused_by_its_authority_takes_no_entry() {
    let client = client().await;
    install_crds(&client).await;
    let f = view(&client, &tenant_namespace(&client, "cap-authz").await);
    // Only this namespace: grants other tests left elsewhere must not publish lists here.
    let operator_ns = operator_namespace_for(&f.ns);
    create_namespace(&client, &operator_ns).await;
    let operator = Operator::start(&f.ns, &operator_ns, NO_ELECTION);
    create_as(&client, &f.ns, PAYMENTS_AGENT.clone())
        .await
        .unwrap();
    create_as(&client, &f.ns, payment_grant("unapproved"))
        .await
        .unwrap();
    f.wait_ready_within(
        "unapproved",
        "False",
        Some("ApprovalPending"),
        DECIDED_WITHIN,
    )
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
    f.wait_ready_within("by-admin", "True", Some("Issued"), DECIDED_WITHIN)
        .await;
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
/// namespace take more than 64 lists of 4 entries, every one published, and issuance goes on. With
/// the old fixed limit (`CAPACITY_TEST_OLD_LIMIT=1` starts the operator with
/// `--status-list-max-lists 64`) the lists stop at 64 and this test fails.
#[tokio::test]
async fn capacity_grows_past_the_old_64_lists_when_demand_needs_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let old_limit: &[&str] = if std::env::var_os("CAPACITY_TEST_OLD_LIMIT").is_some() {
        &["--status-list-max-lists", "64"]
    } else {
        &[]
    };
    let private = private_operator("capacity-growth", old_limit).await;
    let client = &private.client;
    let f = view(client, &tenant_namespace(client, "cap-grow").await);
    let grants =
        Api::<delegation_operator::api::DelegationGrant>::namespaced(client.clone(), &f.ns);
    for i in 0..30 {
        let grant = serde_json::from_value(notifier_grant(&format!("fast-{i}"), "3s")).unwrap();
        grants.create(&PostParams::default(), &grant).await.unwrap();
    }
    // 257 tokens at least; on an idle machine about 20 s. Stops early at the safety limit.
    let at_limit = "status lists are in use";
    let published = wait_for(
        "more than 64 published lists",
        Duration::from_secs(600),
        || async {
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &private.operator_ns);
            let cm = cms.get("delegation-operator-status-lists").await.ok()?;
            let published = cm.data?.len();
            (published > 64 || private.operator.raw_output().contains(at_limit))
                .then_some(published)
        },
    )
    .await;
    assert!(
        published > 64 && !private.operator.raw_output().contains(at_limit),
        "{published} lists published; the safety limit was reached"
    );
    create_as(client, &f.ns, notifier_grant("after", "5m"))
        .await
        .unwrap();
    f.wait_ready_within("after", "True", Some("Issued"), DECIDED_WITHIN)
        .await;
}

/// When every list the safety limit allows is in use (`--status-list-max-lists 1` of 4 entries),
/// a grant that needs an entry is told so on its status (`Ready=False`, reason `StatusListsFull`,
/// naming the flag), with a Warning Event and no token, rather than waiting in silence.
#[tokio::test]
async fn a_grant_beyond_the_safety_limit_is_told_so() {
    let client = client().await;
    install_crds(&client).await;
    let f = view(&client, &tenant_namespace(&client, "cap-full").await);
    let operator_ns = operator_namespace_for(&f.ns);
    create_namespace(&client, &operator_ns).await;
    let limits = ["--status-list-max-lists", "1", "--status-list-size", "4"];
    let operator = Operator::start(&f.ns, &operator_ns, &[NO_ELECTION, &limits].concat());
    // One at a time until one is refused: each issued grant holds an entry of the one list.
    let mut issued = 0;
    let refused = loop {
        let name = format!("g{issued}");
        create_as(&client, &f.ns, notifier_grant(&name, "5m"))
            .await
            .unwrap();
        let decided = wait_for(&format!("{name} decided"), DECIDED_WITHIN, || async {
            let grant = f.grants().get(&name).await.ok()?;
            let reason = grant
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .first()?
                .reason
                .clone();
            (reason == "Issued" || reason == "StatusListsFull").then_some(grant)
        })
        .await;
        match condition(&decided) {
            (reason, _) if reason == "StatusListsFull" => break decided,
            (reason, message) => assert_eq!(reason, "Issued", "{name}: {message}"),
        }
        issued += 1;
        assert!(issued <= 4, "a fifth grant was issued from one list of 4");
    };
    assert!(issued >= 1, "the first grant had a free entry");
    let name = refused.name_any();
    let (_, message) = condition(&refused);
    assert!(message.contains("--status-list-max-lists"), "{message}");
    assert!(refused.status.as_ref().unwrap().token.is_none());
    assert!(
        f.secrets()
            .get_opt(&format!("{name}-token"))
            .await
            .unwrap()
            .is_none()
    );
    wait_for("a StatusListsFull Warning", DECIDED_WITHIN, || async {
        f.event_reasons(&name)
            .await
            .contains(&("Warning".to_owned(), "StatusListsFull".to_owned()))
            .then_some(())
    })
    .await;
    operator.stop();
}

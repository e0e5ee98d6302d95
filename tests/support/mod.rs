//! Shared by the integration tests: a client for the project's own control plane (real etcd +
//! kube-apiserver, see hack/control-plane.sh), the CRDs from `crds/`, and a fresh namespace per test.
//!
//! The tests never use the caller's `KUBECONFIG`, so they cannot touch a real cluster by accident:
//! they use `DELEGATION_TEST_KUBECONFIG` when set (the test command sets it), and otherwise start the
//! local control plane themselves (idempotent; `hack/control-plane.sh stop` ends it).
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod exchange;
pub mod gitops;
pub mod helm;
pub mod private_control_plane;
pub mod verifiers;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use delegation_operator::api::{AgentIdentity, DelegationGrant};
use k8s_openapi::{
    api::{
        authentication::v1::{SelfSubjectReview, UserInfo},
        authorization::v1::{
            NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
        },
        core::v1::{ConfigMap, Namespace, Pod, Secret},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};
use serde::Deserialize;
use serde_json::json;

pub const FIELD_MANAGER: &str = "delegation-operator-tests";

/// Three agents that can form a chain: orchestrator (depth 2) -> summarizer (depth 1) -> notifier.
pub const CHAIN_AGENTS: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: orchestrator}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read, tickets:write, cases:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
  delegation: {maxDepth: 2, allowedActors: [summarizer]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: summarizer}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read, cases:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 10m
  delegation: {maxDepth: 1, allowedActors: [notifier]}
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: notifier}
spec:
  owner: {kind: User, name: bob@example.com}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 5m
"#;

/// One agent, `notifier`, that may act for anyone on `tickets:read` for tickets.example.com, up to 15 m.
pub const NOTIFIER_AGENT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: notifier}
spec:
  owner: {kind: Group, name: platform}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
"#;

/// A three-hop chain over [`CHAIN_AGENTS`]: alice -> g1 (orchestrator) -> g2 (summarizer) -> g3
/// (notifier), each narrowing the scopes.
pub const CHAIN_GRANTS: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: g1}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: orchestrator}
  scopes: [tickets:read, cases:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: g2}
spec:
  parentGrantRef: {name: g1}
  actorRef: {name: summarizer}
  scopes: [tickets:read, cases:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: g3}
spec:
  parentGrantRef: {name: g2}
  actorRef: {name: notifier}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 5m
"#;

/// A loopback port nobody listens on right now (bound and released: a later bind can still race).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// The records of one audit file (an operator's stdout), one JSON object per line. A last line
/// without its newline is still being written, and is left for the next read.
pub fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
        })
        .collect()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test control plane's kubeconfig, once this test binary has used it.
static KUBECONFIG_PATH: OnceLock<PathBuf> = OnceLock::new();

/// The kubeconfig of the test control plane, starting it if needed (once per test binary).
pub fn kubeconfig_path() -> PathBuf {
    KUBECONFIG_PATH
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("DELEGATION_TEST_KUBECONFIG") {
                return PathBuf::from(p);
            }
            let out = Command::new(repo_root().join("hack/control-plane.sh"))
                .arg("start")
                .output()
                .expect("could not run hack/control-plane.sh");
            assert!(
                out.status.success(),
                "hack/control-plane.sh start failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .clone()
}

/// A client for the test control plane.
pub async fn client() -> Client {
    Client::try_from(admin_config().await).expect("client for the test control plane")
}

/// The configuration of the test kubeconfig's own (admin) user.
async fn admin_config() -> Config {
    admin_config_of(&kubeconfig_path()).await
}

/// The configuration of a kubeconfig file's (admin) user: the test control plane's or a private one's.
pub async fn admin_config_of(kubeconfig: &Path) -> Config {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("readable kubeconfig");
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("valid kubeconfig")
}

/// A client acting as `user` in `groups` (impersonated with the admin's credentials). The apiserver
/// adds `system:authenticated` itself.
pub async fn client_as(user: &str, groups: &[&str]) -> Client {
    client_impersonating(user, groups, None, &[]).await
}

/// [`client_as`] with a uid and extra attributes too, as an authenticator that provides them would.
pub async fn client_impersonating(
    user: &str,
    groups: &[&str],
    uid: Option<&str>,
    extra: &[(&str, &[&str])],
) -> Client {
    let mut config = admin_config().await;
    let auth = &mut config.auth_info;
    auth.impersonate = Some(user.to_owned());
    auth.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    auth.impersonate_uid = uid.map(str::to_owned);
    if !extra.is_empty() {
        let extra: HashMap<String, Vec<String>> = extra
            .iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect();
        auth.impersonate_user_extra = Some(extra);
    }
    Client::try_from(config).expect("impersonating client for the test control plane")
}

/// Who the apiserver says the client is (a SelfSubjectReview).
pub async fn whoami(client: &Client) -> UserInfo {
    Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview")
        .status
        .and_then(|s| s.user_info)
        .expect("SelfSubjectReview has a userInfo")
}

/// Applies every CRD under `crds/` (server-side apply, idempotent) and waits until each is Established,
/// then the admission policies (see [`install_admission_policies`]): every object of our kinds is
/// created under them, as in a real installation.
pub async fn install_crds(client: &Client) -> Vec<CustomResourceDefinition> {
    let installed = apply_crds(client).await;
    install_admission_policies(client).await;
    installed
}

/// Applies every CRD under `crds/` and waits until each is Established (no admission policies).
async fn apply_crds(client: &Client) -> Vec<CustomResourceDefinition> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut installed = Vec::new();
    for path in crd_files() {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {}: {e}", path.display()));
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        let crd = tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within 30s"))
            .unwrap()
            .unwrap();
        installed.push(crd);
    }
    installed
}

// ---- admission policies ------------------------------------------------------------------------

/// Set once this test binary has applied the admission policies and seen them take effect.
static POLICIES_EFFECTIVE: AtomicBool = AtomicBool::new(false);

/// The user whose dry-run requests show that the validating policies are loaded: allowed to create
/// grants and approvals in `default`, allowed to delegate and approve nothing.
const PROBE_USER: &str = "delegation-operator-tests:admission-probe";
const PROBE_NAMESPACE: &str = "default";

/// Applies `admission/policies.yaml` (server-side apply, idempotent) and waits until every policy is
/// in effect. Once per test binary; later calls return at once.
pub async fn install_admission_policies(client: &Client) {
    if POLICIES_EFFECTIVE.load(Ordering::Acquire) {
        return;
    }
    for doc in delegation_operator::admission::documents() {
        apply_cluster_document(client, doc).await;
    }
    allow_probe_user(client).await;
    wait_policies_effective(client).await;
    wait_stamps_trusted(client).await;
    POLICIES_EFFECTIVE.store(true, Ordering::Release);
}

/// The operator trusts a stamp only on objects created a settling time after the stamping and checking
/// policies and their bindings (`delegation::authority::STAMP_SETTLE`, so that nothing created while a
/// policy was still loading counts as proven). Right after a first install, wait that out once.
async fn wait_stamps_trusted(client: &Client) {
    let mut latest_ms = 0;
    for doc in delegation_operator::admission::documents() {
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        let created = admission_api(client, kind)
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("reading {kind} {name}: {e}"))
            .metadata
            .creation_timestamp;
        latest_ms = latest_ms.max(created.map_or(0, |t| t.0.as_millisecond()));
    }
    wait_settled_after(latest_ms).await;
}

/// Waits until [`STAMP_SETTLE`](delegation_operator::delegation::authority::STAMP_SETTLE) and a second
/// of margin (for the clock the time was taken with, and the operator's watch) have passed since
/// `from_ms`.
async fn wait_settled_after(from_ms: i64) {
    let settle = delegation_operator::delegation::authority::STAMP_SETTLE;
    let trusted_from_ms = from_ms + settle.as_millis() as i64 + 1000;
    let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    if trusted_from_ms > now_ms {
        tokio::time::sleep(Duration::from_millis((trusted_from_ms - now_ms) as u64)).await;
    }
}

/// Applies the admission policies again and waits until they are in effect, even if this binary did
/// so before: for tests that remove or weaken a policy or binding for a while. An operator that saw
/// them out of force trusts them again a settling time after it saw them back, so that is waited too.
pub async fn reinstall_admission_policies(client: &Client) {
    POLICIES_EFFECTIVE.store(false, Ordering::Release);
    install_admission_policies(client).await;
    wait_settled_after(k8s_openapi::jiff::Timestamp::now().as_millisecond()).await;
}

/// A dynamic API for one kind of `admission/policies.yaml`.
pub fn admission_api(client: &Client, kind: &str) -> Api<DynamicObject> {
    let plural = match kind {
        "MutatingAdmissionPolicy" => "mutatingadmissionpolicies",
        "MutatingAdmissionPolicyBinding" => "mutatingadmissionpolicybindings",
        "ValidatingAdmissionPolicy" => "validatingadmissionpolicies",
        "ValidatingAdmissionPolicyBinding" => "validatingadmissionpolicybindings",
        other => panic!("unexpected kind in admission/policies.yaml: {other}"),
    };
    let gvk = GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

/// Waits (up to 60 s) until the admission policies, already installed on the control plane of
/// `kubeconfig` (admin credentials), are in effect again: after its apiserver restarted, it loads them
/// (and the CRD schemas the mutating ones need) a while after it answers requests. Changes nothing.
pub async fn wait_admission_policies_effective(kubeconfig: &Path) {
    let mut config = admin_config_of(kubeconfig).await;
    let admin = Client::try_from(config.clone()).expect("admin client");
    config.auth_info.impersonate = Some(PROBE_USER.to_owned());
    let probe = Client::try_from(config).expect("probe client");
    wait_policies_effective_with(&admin, &probe).await;
}

async fn apply_cluster_document(client: &Client, doc: serde_json::Value) {
    let obj: DynamicObject = serde_json::from_value(doc).expect("a Kubernetes object");
    let kind = obj.types.clone().expect("apiVersion and kind").kind;
    let name = obj.metadata.name.clone().expect("a name");
    admission_api(client, &kind)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
}

async fn allow_probe_user(client: &Client) {
    let rules = [rule(
        "delegation.nhi.dev",
        &["delegationgrants", "delegationapprovals"],
        &["create"],
        &[],
    )];
    grant_role(
        client,
        PROBE_NAMESPACE,
        "delegation-operator-tests-admission-probe",
        &[user_subject(PROBE_USER)],
        &rules,
    )
    .await;
}

/// Waits (up to 60 s) until dry-run requests show all four policies at work. Right after the CRDs are
/// installed the mutating policies answer 503 until the apiserver has loaded the CRD schemas, and
/// every policy takes a few seconds to load: errors are retried.
async fn wait_policies_effective(admin: &Client) {
    let probe = client_as(PROBE_USER, &[]).await;
    wait_policies_effective_with(admin, &probe).await;
}

/// [`wait_policies_effective`] with the probe user's client given (for another control plane).
async fn wait_policies_effective_with(admin: &Client, probe: &Client) {
    let me = whoami(admin)
        .await
        .username
        .expect("the test user has a name");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let Some(why) = policies_pending(admin, probe, &me).await else {
            return;
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "the admission policies were not in effect after 60s: {why}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Why the policies are not (yet) in effect, or `None` when they are.
async fn policies_pending(admin: &Client, probe: &Client, me: &str) -> Option<String> {
    let forged = json!({"username": "mallory", "groups": ["system:masters"]});
    let grant = probe_grant(json!({"kind": "User", "name": me}), Some(forged.clone()));
    let stamped = dry_run_create(admin, "DelegationGrant", &grant).await;
    let finalizers = stamped
        .as_ref()
        .ok()
        .and_then(|g| g.metadata.finalizers.clone());
    if let Err(why) = stamped_as(stamped, "requester", me) {
        return Some(format!("grant requester: {why}"));
    }
    if !finalizers
        .unwrap_or_default()
        .iter()
        .any(|f| f == "delegation.nhi.dev/revoke-tokens")
    {
        return Some("grant finalizer: not added".into());
    }
    let approval = probe_approval(Some(forged));
    let stamped = dry_run_create(admin, "DelegationApproval", &approval).await;
    if let Err(why) = stamped_as(stamped, "approver", me) {
        return Some(format!("approval approver: {why}"));
    }
    let group_grant = probe_grant(json!({"kind": "Group", "name": "probe-group"}), None);
    let refused = dry_run_create(probe, "DelegationGrant", &group_grant).await;
    if let Err(why) = refused_with(refused, "may not delegate") {
        return Some(format!("grant authority: {why}"));
    }
    let refused = dry_run_create(probe, "DelegationApproval", &probe_approval(None)).await;
    refused_with(refused, "may not approve")
        .err()
        .map(|why| format!("approval authority: {why}"))
}

fn probe_grant(
    principal: serde_json::Value,
    requester: Option<serde_json::Value>,
) -> DynamicObject {
    let mut spec = json!({
        "principal": principal,
        "actorRef": {"name": "probe"},
        "scopes": ["probe"],
        "audience": "https://probe.test",
        "tokenTTL": "1m",
    });
    if let Some(r) = requester {
        spec["requester"] = r;
    }
    our_object("DelegationGrant", "admission-probe", spec)
}

fn probe_approval(approver: Option<serde_json::Value>) -> DynamicObject {
    let mut spec = json!({
        "grantRef": {"name": "admission-probe", "uid": "probe"},
        "generation": 1,
        "decision": "Approve",
    });
    if let Some(a) = approver {
        spec["approver"] = a;
    }
    our_object("DelegationApproval", "admission-probe", spec)
}

/// An object of one of our kinds, from its spec.
pub fn our_object(kind: &str, name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "delegation.nhi.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a valid object")
}

async fn dry_run_create(
    client: &Client,
    kind: &str,
    obj: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    dynamic_api(client, PROBE_NAMESPACE, kind)
        .create(&params, obj)
        .await
}

fn stamped_as(
    result: Result<DynamicObject, kube::Error>,
    field: &str,
    user: &str,
) -> Result<(), String> {
    let obj = result.map_err(|e| e.to_string())?;
    let stamped = &obj.data["spec"][field]["username"];
    (stamped == user)
        .then_some(())
        .ok_or_else(|| format!("{field} is {stamped}, not {user}"))
}

fn refused_with(result: Result<DynamicObject, kube::Error>, words: &str) -> Result<(), String> {
    match result {
        Ok(_) => Err("accepted".into()),
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains(words) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

pub fn crd_files() -> Vec<PathBuf> {
    yaml_files(&repo_root().join("crds"))
}

pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// Creates a namespace with a unique name for one test, with the AudiencePolicies every test's
/// grants need ([`declare_test_audiences`]). It is never waited on for deletion: a bare apiserver
/// has no namespace controller, so deleted namespaces stay Terminating.
pub async fn fresh_namespace(client: &Client, prefix: &str) -> String {
    let name = fresh_namespace_undeclared(client, prefix).await;
    declare_test_audiences(client, &name).await;
    name
}

// ---- cluster-level ceilings --------------------------------------------------------------------

/// The label on the AudiencePolicies [`declare_test_audiences`] creates: the namespace they are for.
pub const TEST_POLICY_LABEL: &str = "delegation.nhi.dev/test-namespace";

/// The audiences the tests' grants ask for, each with every scope and authorizationDetails type the
/// tests and examples use. Tests of the ceilings themselves use [`fresh_namespace_undeclared`].
const TEST_AUDIENCES: &[&str] = &[
    "https://tickets.example.com",
    "https://payments.example.com",
    "https://crm.example.com",
    "https://kb.example.com",
    "https://other.example.com",
    "https://probe.example.com",
    "https://tokens.example.com",
    "https://kubernetes.default.svc",
];

/// Declares, cluster-wide, the audiences the tests use for `namespace` alone (grants elsewhere are
/// not affected): the operator issues no token for an undeclared audience. Two policies per audience,
/// as a cluster administrator would write them: one for grants without authorizationDetails, one
/// for grants with them. Labelled [`TEST_POLICY_LABEL`]; [`Fixture`] removes them when dropped.
pub async fn declare_test_audiences(client: &Client, namespace: &str) {
    let scopes = json!([
        "tickets:read",
        "tickets:write",
        "tickets:comment",
        "tickets:close",
        "tickets:update",
        "payments:execute",
        "payments:read",
        "cases:read",
        "customers:read",
        "configmaps:read",
        "kb:read"
    ]);
    let details = json!([
        {"type": "ticket"},
        {"type": "ticket", "actions": ["read", "write", "comment", "update", "close"]},
        {"type": "ticket_queue", "actions": ["read", "comment"]},
        {"type": "customer_case", "actions": ["read"],
         "locations": ["https://crm.example.com/cases/98765"], "datatypes": ["contact", "case_history"]},
        {"type": "payment_initiation", "actions": ["execute"]}
    ]);
    let api = dynamic_api(client, "", "AudiencePolicy");
    for (i, audience) in TEST_AUDIENCES.iter().enumerate() {
        for with_details in [false, true] {
            let name = format!("{namespace}-{i}{}", if with_details { "d" } else { "" });
            let mut spec = json!({
                "audience": audience,
                "namespaces": [namespace],
                "allowedScopes": scopes,
                "maxTokenTTL": "24h",
            });
            if with_details {
                spec["allowedAuthorizationDetails"] = details.clone();
            }
            let policy: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "delegation.nhi.dev/v1alpha1",
                "kind": "AudiencePolicy",
                "metadata": {"name": name, "labels": {TEST_POLICY_LABEL: namespace}},
                "spec": spec,
            }))
            .unwrap();
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&policy),
            )
            .await
            .unwrap_or_else(|e| panic!("declare AudiencePolicy {name}: {e}"));
        }
    }
}

/// Removes the AudiencePolicies [`declare_test_audiences`] created for `namespace` (synchronously,
/// with kubectl, so that it can run from `Drop`). Only on the test control plane, and only once this
/// binary used it: a private control plane's go with it.
pub fn remove_test_audiences(namespace: &str) {
    let Some(kubeconfig) = KUBECONFIG_PATH.get() else {
        return;
    };
    let _ = Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args([
            "delete",
            "audiencepolicies.delegation.nhi.dev",
            "-l",
            &format!("{TEST_POLICY_LABEL}={namespace}"),
            "--wait=false",
        ])
        .output();
}

/// [`fresh_namespace`] without any AudiencePolicy: every audience is undeclared there.
pub async fn fresh_namespace_undeclared(client: &Client, prefix: &str) -> String {
    let name = format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create test namespace");
    name
}

/// Every YAML document in a file, as dynamic objects.
pub fn load_documents(path: &Path) -> Vec<DynamicObject> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let value = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
            serde_json::from_value(value).unwrap()
        })
        .collect()
}

/// The dynamic API for one of our kinds, in a namespace.
pub fn dynamic_api(client: &Client, namespace: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("delegation.nhi.dev", "v1alpha1", kind);
    let plural = match kind {
        "AgentIdentity" => "agentidentities",
        "DelegationGrant" => "delegationgrants",
        "DelegationApproval" => "delegationapprovals",
        "AudiencePolicy" => {
            return Api::all_with(
                client.clone(),
                &ApiResource::from_gvk_with_plural(&gvk, "audiencepolicies"),
            );
        }
        other => panic!("not one of our kinds: {other}"),
    };
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

/// Creates a document in a namespace; the apiserver's error is returned as is.
pub async fn create_document(
    client: &Client,
    namespace: &str,
    doc: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    let kind = doc
        .types
        .as_ref()
        .expect("document has apiVersion and kind")
        .kind
        .clone();
    let mut doc = doc.clone();
    doc.metadata.namespace = Some(namespace.to_owned());
    dynamic_api(client, namespace, &kind)
        .create(&PostParams::default(), &doc)
        .await
}

/// Creates the object `doc` (JSON with apiVersion and kind) as `client` in `namespace`.
pub async fn create_as(
    client: &Client,
    namespace: &str,
    doc: serde_json::Value,
) -> Result<DynamicObject, kube::Error> {
    let doc: DynamicObject = serde_json::from_value(doc).expect("a Kubernetes object");
    create_document(client, namespace, &doc).await
}

/// `(reason, message)` of a grant's first condition (its `Ready`); panics when it has none.
pub fn condition(grant: &DelegationGrant) -> (String, String) {
    let c = grant.status.as_ref().unwrap().conditions.as_ref().unwrap()[0].clone();
    (c.reason, c.message)
}

/// The apiserver's message for a rejected request, or a panic if it was accepted.
pub fn rejection_message<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Ok(obj) => panic!("the apiserver accepted an invalid object: {obj:?}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            status.message.clone()
        }
        Err(other) => panic!("expected an apiserver validation error, got {other}"),
    }
}

// ---- RBAC --------------------------------------------------------------------------------------

/// An RBAC rule; an empty `names` means every name.
pub fn rule(group: &str, resources: &[&str], verbs: &[&str], names: &[&str]) -> PolicyRule {
    let strings = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        resource_names: (!names.is_empty()).then(|| strings(names)),
        ..Default::default()
    }
}

pub fn user_subject(name: &str) -> Subject {
    Subject {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: "User".into(),
        name: name.into(),
        namespace: None,
    }
}

pub fn group_subject(name: &str) -> Subject {
    Subject {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: "Group".into(),
        name: name.into(),
        namespace: None,
    }
}

pub fn service_account_subject(namespace: &str, name: &str) -> Subject {
    Subject {
        api_group: None,
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some(namespace.into()),
    }
}

/// Creates (server-side apply) a Role with `rules` and a RoleBinding of it to `subjects`, both named
/// `name`, and waits until the authorizer allows each subject the first verb of each rule — RBAC is
/// served from a cache that lags writes a little.
pub async fn grant_role(
    client: &Client,
    namespace: &str,
    name: &str,
    subjects: &[Subject],
    rules: &[PolicyRule],
) {
    let meta = kube::api::ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..Default::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(rules.to_vec()),
    };
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.into(),
        },
        subjects: Some(subjects.to_vec()),
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<Role>::namespaced(client.clone(), namespace)
        .patch(name, &params, &Patch::Apply(&role))
        .await
        .unwrap_or_else(|e| panic!("Role {namespace}/{name}: {e}"));
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .patch(name, &params, &Patch::Apply(&binding))
        .await
        .unwrap_or_else(|e| panic!("RoleBinding {namespace}/{name}: {e}"));
    for subject in subjects {
        for rule in rules {
            wait_allowed(client, namespace, subject, rule).await;
        }
    }
}

/// How long to wait for the authorizer to catch up with an RBAC write. A new (or deleted) binding
/// reaches the authorizer a moment after the write returns; on a loaded machine that moment can be
/// seconds. The bound only matters when something is really wrong.
pub const RBAC_SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until a SubjectAccessReview says `subject` may do the first verb of `rule` (on its first
/// resource and name, or its first non-resource URL), in `namespace` (`""`: cluster-wide).
pub async fn wait_allowed(client: &Client, namespace: &str, subject: &Subject, rule: &PolicyRule) {
    wait_access(client, namespace, subject, rule, true).await;
}

/// Waits until a SubjectAccessReview says `subject` may no longer do the first verb of `rule`: after
/// deleting or narrowing a binding, before expecting anyone (the operator) to see the refusal.
pub async fn wait_denied(client: &Client, namespace: &str, subject: &Subject, rule: &PolicyRule) {
    wait_access(client, namespace, subject, rule, false).await;
}

async fn wait_access(
    client: &Client,
    namespace: &str,
    subject: &Subject,
    rule: &PolicyRule,
    allowed: bool,
) {
    let review = access_review(namespace, subject, rule);
    let api = Api::<SubjectAccessReview>::all(client.clone());
    let what = format!(
        "the authorizer to say {subject_kind} {name} is {answer} {rule:?} in namespace {namespace:?}",
        subject_kind = subject.kind,
        name = subject.name,
        answer = if allowed { "allowed" } else { "denied" },
    );
    wait_for(&what, RBAC_SETTLE_TIMEOUT, || async {
        let answer = api.create(&PostParams::default(), &review).await.ok()?;
        (answer.status?.allowed == allowed).then_some(())
    })
    .await;
}

/// The SubjectAccessReview asking whether `subject` may do the first verb of `rule`.
fn access_review(namespace: &str, subject: &Subject, rule: &PolicyRule) -> SubjectAccessReview {
    let first = |xs: &Option<Vec<String>>| xs.as_ref().and_then(|v| v.first().cloned());
    let (user, groups) = match subject.kind.as_str() {
        "User" => (Some(subject.name.clone()), None),
        "Group" => (Some("any-member".into()), Some(vec![subject.name.clone()])),
        _ => {
            let ns = subject.namespace.as_deref().unwrap_or(namespace);
            (
                Some(format!("system:serviceaccount:{ns}:{}", subject.name)),
                None,
            )
        }
    };
    let verb = rule.verbs.first().cloned();
    let (resource_attributes, non_resource_attributes) = match first(&rule.non_resource_urls) {
        Some(path) => (
            None,
            Some(NonResourceAttributes {
                path: Some(path),
                verb,
            }),
        ),
        None => (
            Some(ResourceAttributes {
                namespace: Some(namespace.into()),
                group: first(&rule.api_groups),
                resource: first(&rule.resources),
                name: first(&rule.resource_names),
                verb,
                ..Default::default()
            }),
            None,
        ),
    };
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user,
            groups,
            resource_attributes,
            non_resource_attributes,
            ..Default::default()
        },
        ..Default::default()
    }
}

// ---- kubectl -----------------------------------------------------------------------------------

/// The kubectl matching the test control plane: `DELEGATION_TEST_KUBECTL`, else the one
/// `hack/control-plane.sh env` puts on PATH, else `kubectl`.
pub fn kubectl_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("DELEGATION_TEST_KUBECTL") {
            return PathBuf::from(p);
        }
        let out = Command::new(repo_root().join("hack/control-plane.sh"))
            .arg("env")
            .output()
            .expect("could not run hack/control-plane.sh env");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("export PATH="))
            .and_then(|p| p.split(':').next())
            .map(|dir| Path::new(dir).join("kubectl"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("kubectl"))
    })
    .clone()
}

/// Runs kubectl against the test control plane (with the admin kubeconfig; pass `--as` to act as
/// someone else).
pub async fn kubectl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(args)
        .output()
        .await
        .expect("run kubectl")
}

// ---- running the operator --------------------------------------------------------------------

/// Leader election timings of the operators the tests start: short, so that a successor started after
/// a kill takes over within seconds, with room for a renewal that is slow on a loaded machine (with a
/// 2 s deadline, one renewal slower than that on a machine loaded by two CPU burners and the suite
/// made a test's only operator give up its lease and exit).
pub const LEASE_TIMINGS: [&str; 6] = [
    "--leader-election-lease-duration",
    "8s",
    "--leader-election-renew-deadline",
    "6s",
    "--leader-election-retry-period",
    "1s",
];

/// The operator binary running against the test control plane, watching one namespace. Its audit
/// trail (stdout) and logs (stderr) go to files; it is killed when dropped.
pub struct Operator {
    child: std::process::Child,
    pub audit_path: PathBuf,
    pub log_path: PathBuf,
    pub namespace: String,
    pub operator_namespace: String,
}

impl Operator {
    /// Starts the operator for `namespace`, keeping keys and revocations in `operator_namespace`.
    pub fn start(namespace: &str, operator_namespace: &str, extra_args: &[&str]) -> Self {
        Self::start_with_kubeconfig(
            &kubeconfig_path(),
            namespace,
            operator_namespace,
            extra_args,
        )
    }

    /// The operator process's resident memory (VmRSS), in bytes.
    pub fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    /// How the process exited, if it has (for a test that restarts it as a supervisor would).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// [`Operator::start`] against the control plane of another kubeconfig (a private one).
    pub fn start_with_kubeconfig(
        kubeconfig: &Path,
        namespace: &str,
        operator_namespace: &str,
        extra_args: &[&str],
    ) -> Self {
        Self::spawn(kubeconfig, Some(namespace), operator_namespace, extra_args)
    }

    /// The operator watching every namespace of the control plane of `kubeconfig`: only on a
    /// control plane of the test's own ([`PrivateControlPlane`]), where it meets no other test's
    /// grants and operators. Its files are named after `operator_namespace`.
    pub fn start_watching_all(
        kubeconfig: &Path,
        operator_namespace: &str,
        extra_args: &[&str],
    ) -> Self {
        Self::spawn(kubeconfig, None, operator_namespace, extra_args)
    }

    fn spawn(
        kubeconfig: &Path,
        namespace: Option<&str>,
        operator_namespace: &str,
        extra_args: &[&str],
    ) -> Self {
        let dir = std::env::temp_dir().join("delegation-operator-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let stamp = uuid::Uuid::new_v4().simple().to_string();
        let named = namespace.unwrap_or(operator_namespace);
        let audit_path = dir.join(format!("{named}-{stamp}.audit.jsonl"));
        let log_path = dir.join(format!("{named}-{stamp}.log"));
        let watched: &[&str] = match &namespace {
            Some(namespace) => &["--namespace", namespace],
            None => &[],
        };
        let child = Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(watched)
            .args(["--operator-namespace", operator_namespace])
            .args(["--issuer", "https://issuer.test", "--min-token-ttl", "1s"])
            // Any free port and a generated certificate; tests of the endpoints pass their own.
            .args(["--https-address", "127.0.0.1:0", "--tls-self-signed=true"])
            // A killed operator's lease must not keep the next one waiting long.
            .args(LEASE_TIMINGS)
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("DELEGATION_TEST_LOG")
                    .unwrap_or_else(|_| "info,delegation_operator=debug".into()),
            )
            .stdout(std::fs::File::create(&audit_path).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("start the operator binary");
        Self {
            child,
            audit_path,
            log_path,
            namespace: named.into(),
            operator_namespace: operator_namespace.into(),
        }
    }

    /// The audit records written so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        audit_lines(&self.audit_path)
    }

    pub fn raw_output(&self) -> String {
        std::fs::read_to_string(&self.audit_path).unwrap_or_default()
            + &std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit on its own (for start-up refusals).
    pub fn wait_exit(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (
                    status,
                    std::fs::read_to_string(&self.log_path).unwrap_or_default(),
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "operator did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The operator first: it must not see its grants' audiences disappear and revoke.
        drop(self.operator.take());
        remove_test_audiences(&self.ns);
    }
}

/// A namespace for grants plus one for the operator's keys, and the operator watching them.
pub struct Fixture {
    pub client: Client,
    pub ns: String,
    pub operator: Option<Operator>,
}

impl Fixture {
    pub async fn start(prefix: &str, extra_args: &[&str]) -> Self {
        let client = client().await;
        install_crds(&client).await;
        let ns = fresh_namespace(&client, prefix).await;
        create_namespace(&client, &operator_namespace_for(&ns)).await;
        let operator = Operator::start(&ns, &operator_namespace_for(&ns), extra_args);
        Self {
            client,
            ns,
            operator: Some(operator),
        }
    }

    pub fn operator(&self) -> &Operator {
        self.operator.as_ref().expect("operator running")
    }

    pub fn operator_namespace(&self) -> String {
        operator_namespace_for(&self.ns)
    }

    /// Applies YAML documents (our kinds) into the test namespace.
    pub async fn apply(&self, yaml: &str) {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
            let obj: DynamicObject = serde_json::from_value(value).unwrap();
            let kind = obj.types.as_ref().unwrap().kind.clone();
            let name = obj.metadata.name.clone().unwrap();
            let mut obj = obj;
            obj.metadata.namespace = Some(self.ns.clone());
            dynamic_api(&self.client, &self.ns, &kind)
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&obj),
                )
                .await
                .unwrap_or_else(|e| panic!("apply {kind}/{name}: {e}"));
        }
    }

    /// Lets these users create, read, edit and delete grants and approvals in the namespace (what the
    /// chart's roles aggregated into the built-in `edit` allow), and nothing more: Role `tenants`.
    pub async fn tenants(&self, users: &[&str]) {
        let subjects: Vec<_> = users.iter().map(|u| user_subject(u)).collect();
        grant_role(
            &self.client,
            &self.ns,
            "tenants",
            &subjects,
            &[rule(
                "delegation.nhi.dev",
                &["delegationgrants", "delegationapprovals"],
                &[
                    "create", "get", "list", "watch", "update", "patch", "delete",
                ],
                &[],
            )],
        )
        .await;
    }

    /// The operator's serving certificate Secret (`delegation-operator-tls`), once it holds `ca.crt`.
    pub async fn serving_certificate(&self) -> Secret {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.operator_namespace());
        wait_for(
            "Secret delegation-operator-tls with ca.crt",
            Duration::from_secs(60),
            || async {
                let secret = secrets.get_opt("delegation-operator-tls").await.ok()??;
                secret
                    .data
                    .as_ref()?
                    .contains_key("ca.crt")
                    .then_some(secret)
            },
        )
        .await
    }

    pub fn grants(&self) -> Api<DelegationGrant> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn agents(&self) -> Api<AgentIdentity> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Merge-patches a grant, as `kubectl patch --type merge` would.
    pub async fn patch_grant(&self, name: &str, patch: serde_json::Value) {
        self.grants()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Merge-patches an agent.
    pub async fn patch_agent(&self, name: &str, patch: serde_json::Value) {
        self.agents()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Merge-patches an agent; an owned future, for patching many at once.
    pub fn patch_agent_owned(
        &self,
        name: String,
        patch: serde_json::Value,
    ) -> impl std::future::Future<Output = ()> + use<> {
        let agents = self.agents();
        async move {
            agents
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    }

    /// Waits (up to 30 s) until the grant's Ready condition has `status` (and, if given, `reason`);
    /// returns the grant.
    pub async fn wait_ready(
        &self,
        name: &str,
        status: &str,
        reason: Option<&str>,
    ) -> DelegationGrant {
        self.wait_ready_within(name, status, reason, Duration::from_secs(30))
            .await
    }

    /// [`Fixture::wait_ready`] with another timeout.
    pub async fn wait_ready_within(
        &self,
        name: &str,
        status: &str,
        reason: Option<&str>,
        timeout: Duration,
    ) -> DelegationGrant {
        let api = self.grants();
        let what = format!("grant {name} Ready={status} reason={reason:?}");
        wait_for(&what, timeout, || async {
            let grant = api.get_opt(name).await.ok()??;
            let cond = grant
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Ready")?
                .clone();
            let current = grant.status.as_ref()?.observed_generation == grant.metadata.generation;
            (current && cond.status == status && reason.is_none_or(|r| cond.reason == r))
                .then_some(grant)
        })
        .await
    }

    /// Waits until the grant's condition message says `words`; returns the grant.
    pub async fn wait_message(&self, name: &str, words: &str) -> DelegationGrant {
        let what = format!("grant {name}'s condition to say {words:?}");
        wait_for(&what, Duration::from_secs(30), || async {
            let grant = self.grants().get(name).await.ok()?;
            let conditions = grant.status.as_ref()?.conditions.as_ref()?;
            conditions
                .first()
                .is_some_and(|c| c.message.contains(words))
                .then_some(grant)
        })
        .await
    }

    /// Deletes a grant and waits until it is gone (its tokens revoked and its finalizer released).
    pub async fn delete_grant(&self, name: &str) {
        self.grants()
            .delete(name, &kube::api::DeleteParams::default())
            .await
            .unwrap();
        self.wait_grant_gone(
            name,
            &format!("grant {name} released"),
            Duration::from_secs(20),
        )
        .await;
    }

    /// Waits until a grant no longer exists (its finalizer released), panicking with `what` otherwise.
    pub async fn wait_grant_gone(&self, name: &str, what: &str, timeout: Duration) {
        let api = self.grants();
        wait_for(what, timeout, || async {
            api.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }

    /// The token in a Secret, if the Secret exists.
    pub async fn token_in(&self, secret: &str) -> Option<String> {
        let s = self.secrets().get_opt(secret).await.unwrap()?;
        Some(String::from_utf8(s.data?.get("token")?.0.clone()).unwrap())
    }

    /// The claims of the token in a Secret, if the Secret exists and its token verifies against the
    /// published JWKS for the examples' audience.
    pub async fn verified_claims(&self, secret: &str) -> Option<serde_json::Value> {
        let token = self.token_in(secret).await?;
        delegation_operator::signing::verify(
            &token,
            &self.jwks().await,
            "https://tickets.example.com",
            0,
        )
        .ok()
    }

    /// The published JWKS.
    pub async fn jwks(&self) -> serde_json::Value {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.operator_namespace());
        let cm = cms.get("delegation-operator-jwks").await.unwrap();
        serde_json::from_str(&cm.data.unwrap()["jwks.json"]).unwrap()
    }

    /// The token ids the operator's own record (the status-list shard Secrets) holds for a grant uid.
    pub async fn recorded_token_ids(&self, grant_uid: &str) -> Vec<String> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.operator_namespace());
        let shards = secrets
            .list(&kube::api::ListParams::default().labels("delegation.nhi.dev/status-list-shard"))
            .await
            .unwrap();
        let mut ids = Vec::new();
        for shard in shards.items {
            let Some(records) = shard.data.as_ref().and_then(|d| d.get("tokens.json")) else {
                continue;
            };
            let records: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
                serde_json::from_slice(&records.0).unwrap();
            for held in records.get(grant_uid).into_iter().flatten() {
                ids.push(held[0].as_str().unwrap().to_owned());
            }
        }
        ids
    }

    /// The ids of the tokens this fixture's operators issued that are INVALID (revoked) in the
    /// published, verified Status List Tokens. Which list and index each token has is read from the
    /// Issued and Rotated audit lines of every operator process started for this namespace.
    pub async fn revoked_ids(&self) -> Vec<String> {
        let mut by_uri: std::collections::BTreeMap<String, Vec<(String, usize)>> =
            Default::default();
        for record in self.all_audit() {
            let issued = matches!(record["action"].as_str(), Some("Issued" | "Rotated"));
            let reference = &record["statusList"];
            if let (true, Some(jti), Some(uri), Some(idx)) = (
                issued,
                record["tokenIds"][0].as_str(),
                reference["uri"].as_str(),
                reference["idx"].as_u64(),
            ) {
                by_uri
                    .entry(uri.to_owned())
                    .or_default()
                    .push((jti.to_owned(), idx as usize));
            }
        }
        let mut revoked = Vec::new();
        for (uri, tokens) in by_uri {
            let (_, claims) = self
                .status_list_token(&uri)
                .await
                .unwrap_or_else(|| panic!("no list published for {uri}"));
            let list =
                delegation_operator::status_list::StatusList::from_claim(&claims["status_list"])
                    .unwrap();
            for (jti, idx) in tokens {
                if list.value(idx) == Some(1) {
                    revoked.push(jti);
                }
            }
        }
        revoked
    }

    /// The audit records of every operator process started for this namespace (their files are
    /// `<namespace>-<32 hex>.audit.jsonl`, see [`Operator::start_with_kubeconfig`]), file by file.
    pub fn all_audit(&self) -> Vec<serde_json::Value> {
        let dir = std::env::temp_dir().join("delegation-operator-tests");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(&format!("{}-", self.ns))
                    .and_then(|rest| rest.strip_suffix(".audit.jsonl"))
                    .is_some_and(|stamp| {
                        stamp.len() == 32 && stamp.bytes().all(|b| b.is_ascii_hexdigit())
                    })
            })
            .map(|e| e.path())
            .collect();
        files.sort();
        files.iter().flat_map(|path| audit_lines(path)).collect()
    }

    /// The published Status List Tokens: ConfigMap `delegation-operator-status-lists`, one
    /// `<serial>.jwt` key per list.
    pub async fn status_list_tokens(&self) -> std::collections::BTreeMap<String, String> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.operator_namespace());
        cms.get_opt("delegation-operator-status-lists")
            .await
            .unwrap()
            .and_then(|cm| cm.data)
            .unwrap_or_default()
    }

    /// The Status List Token published for `uri` (under the last segment of the uri), checked the
    /// way a verifier would: `typ: statuslist+jwt`, signed by a key of the published JWKS (the
    /// header's `alg` must be the key's), `sub` = `uri`, `iss` = the operator's issuer. Returns the
    /// token and its claims; `None` when nothing is published for it.
    pub async fn status_list_token(&self, uri: &str) -> Option<(String, serde_json::Value)> {
        let key = format!("{}.jwt", uri.rsplit('/').next().unwrap());
        let token = self.status_list_tokens().await.remove(&key)?;
        let jwks = self.jwks().await;
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("statuslist+jwt"));
        let kid = header.kid.clone().expect("a kid");
        let jwk = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap_or_else(|| panic!("the list's kid {kid} is in the JWKS"))
            .clone();
        assert_eq!(
            jwk["alg"].as_str(),
            Some(format!("{:?}", header.alg).as_str()),
            "the list's alg is its key's"
        );
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["sub", "iat", "exp"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
            &validation,
        )
        .expect("the Status List Token verifies against the JWKS")
        .claims;
        assert_eq!(claims["sub"], uri, "sub is the list's uri");
        assert_eq!(claims["iss"], "https://issuer.test");
        assert!(claims["ttl"].as_u64().is_some_and(|t| t > 0));
        Some((token, claims))
    }

    /// The status value (0 VALID, 1 INVALID, 2 SUSPENDED) the published, verified list gives the
    /// token whose `status` claim is `status` (`{"status_list": {"idx", "uri"}}`).
    pub async fn published_status(&self, status: &serde_json::Value) -> u8 {
        let reference = &status["status_list"];
        let uri = reference["uri"].as_str().expect("status_list.uri");
        let idx = reference["idx"].as_u64().expect("status_list.idx") as usize;
        let (_, claims) = self
            .status_list_token(uri)
            .await
            .unwrap_or_else(|| panic!("no list published for {uri}"));
        let list = delegation_operator::status_list::StatusList::from_claim(&claims["status_list"])
            .unwrap();
        list.value(idx)
            .unwrap_or_else(|| panic!("index {idx} is outside the list of {}", list.len()))
    }

    /// The Events recorded for an object of the test namespace.
    pub async fn events_of(&self, name: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    /// `(type, reason)` of the Events recorded for an object.
    pub async fn event_reasons(&self, name: &str) -> Vec<(String, String)> {
        self.events_of(name)
            .await
            .into_iter()
            .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
            .collect()
    }
}

/// The id of a grant's current token, as its status names it (panics when it has none).
pub fn token_id(grant: &DelegationGrant) -> String {
    grant
        .status
        .as_ref()
        .unwrap()
        .token
        .as_ref()
        .unwrap()
        .id
        .clone()
}

/// The JSON payload of a JWT, read without checking its signature (for tokens the operator put where
/// only it writes, or whose signature another check covers).
pub fn unverified_payload(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&bytes).expect("a JSON payload")
}

/// The status of `token` in the Status List Token the operator published for it in
/// `operator_namespace` (0 VALID, 1 INVALID), found by the token's `status.status_list` claim.
pub async fn published_status_of(client: &Client, operator_namespace: &str, token: &str) -> u8 {
    let reference = unverified_payload(token)["status"]["status_list"].clone();
    let uri = reference["uri"].as_str().expect("status_list.uri");
    let idx = reference["idx"].as_u64().expect("status_list.idx") as usize;
    let key = format!("{}.jwt", uri.rsplit('/').next().unwrap());
    let list_token = Api::<ConfigMap>::namespaced(client.clone(), operator_namespace)
        .get("delegation-operator-status-lists")
        .await
        .unwrap()
        .data
        .unwrap_or_default()
        .remove(&key)
        .unwrap_or_else(|| panic!("no list published for {uri}"));
    let claims = unverified_payload(&list_token);
    assert_eq!(
        claims["sub"], uri,
        "the list published under {key} is {uri}"
    );
    delegation_operator::status_list::StatusList::from_claim(&claims["status_list"])
        .unwrap()
        .value(idx)
        .unwrap_or_else(|| panic!("index {idx} is outside the list {uri}"))
}

pub fn operator_namespace_for(ns: &str) -> String {
    format!("{ns}-op")
}

pub async fn create_namespace(client: &Client, name: &str) {
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

/// Polls `check` every 200ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the independent decoder `tests/python/decode_status_list.py` on a Status List Token and
/// returns its lines: a JSON line (`typ`, `sub`, `bits`, `len`), then the value at each of `indices`.
pub fn python_decode_status_list(token: &str, indices: &[usize]) -> Vec<String> {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!(
        "delegation-operator-status-list-{}.jwt",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, token).unwrap();
    let script = repo_root().join("tests/python/decode_status_list.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is needed for this test");
    let input: String = indices.iter().map(|i| format!("{i}\n")).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        output.status.success(),
        "decoder failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

// ---- ServiceAccounts: a workload's own token, and acting as one ------------------------------

/// Creates ServiceAccount `name` in `namespace` unless it exists.
pub async fn ensure_service_account(admin: &Client, namespace: &str, name: &str) {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    if accounts.get_opt(name).await.unwrap().is_some() {
        return;
    }
    let account = ServiceAccount {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap_or_else(|e| panic!("ServiceAccount {namespace}/{name}: {e}"));
}

/// A token of ServiceAccount `name` of `namespace` for the apiserver's own audience (a TokenRequest),
/// bound to `pod` when given, as the token the kubelet projects into a pod is.
pub async fn request_service_account_token(
    admin: &Client,
    namespace: &str,
    name: &str,
    pod: Option<&k8s_openapi::api::core::v1::Pod>,
) -> String {
    request_service_account_token_for(admin, namespace, name, pod, &[]).await
}

/// [`request_service_account_token`] for `audiences` (empty: the apiserver's own), as a projected
/// ServiceAccount token volume with `audience:` set is: `client` makes the TokenRequest (the admin,
/// or anyone allowed `create` on `serviceaccounts/token`).
pub async fn request_service_account_token_for(
    client: &Client,
    namespace: &str,
    name: &str,
    pod: Option<&k8s_openapi::api::core::v1::Pod>,
    audiences: &[&str],
) -> String {
    use k8s_openapi::api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: (!audiences.is_empty())
                .then(|| audiences.iter().map(|a| a.to_string()).collect()),
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|pod| BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"))
        .status
        .and_then(|s| s.token)
        .expect("a token")
}

/// A client of the test control plane that authenticates with a bearer token (and no client
/// certificate), acting as `impersonate` when given: `kubectl --token <token> [--as <user>]`.
pub async fn token_client_as(token: &str, impersonate: Option<&str>) -> Client {
    let mut config = admin_config().await;
    config.auth_info = serde_json::from_value(json!({"token": token})).expect("a token user");
    config.auth_info.impersonate = impersonate.map(str::to_owned);
    Client::try_from(config).expect("token client for the test control plane")
}

/// A Pod (named after the ServiceAccount, with a unique suffix) that runs as ServiceAccount
/// `service_account` (created if needed). The test apiserver has no kubelet and no ServiceAccount
/// admission plugin: the Pod stays Pending and nothing mounts a token into it.
pub async fn pod_running_as(
    admin: &Client,
    namespace: &str,
    service_account: &str,
) -> k8s_openapi::api::core::v1::Pod {
    use k8s_openapi::api::core::v1::Pod;
    ensure_service_account(admin, namespace, service_account).await;
    let name = format!(
        "{service_account}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..5]
    );
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"serviceAccountName": service_account,
                 "containers": [{"name": "workload", "image": "registry.invalid/workload"}]},
    }))
    .unwrap();
    Api::<Pod>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("Pod {namespace}/{name}: {e}"))
}

/// A client authenticated as ServiceAccount `service_account` of `namespace` the way its workload is:
/// with a token bound to a Pod running as it (created here), so that the apiserver puts the pod's
/// name and uid into the user's extra. Returns the client and the Pod.
pub async fn pod_bound_client(
    admin: &Client,
    namespace: &str,
    service_account: &str,
) -> (Client, k8s_openapi::api::core::v1::Pod) {
    let pod = pod_running_as(admin, namespace, service_account).await;
    let token = request_service_account_token(admin, namespace, service_account, Some(&pod)).await;
    (token_client_as(&token, None).await, pod)
}

/// Binds ClusterRole `cluster_role` to `subjects` in `namespace` (a RoleBinding named `name`, server-side
/// apply), as an admin gives someone a built-in role there.
pub async fn bind_cluster_role(
    admin: &Client,
    namespace: &str,
    name: &str,
    cluster_role: &str,
    subjects: &[Subject],
) {
    let binding = RoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: cluster_role.into(),
        },
        subjects: Some(subjects.to_vec()),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&binding),
        )
        .await
        .unwrap_or_else(|e| panic!("RoleBinding {namespace}/{name}: {e}"));
}

/// Makes `subject` an editor of `namespace` the way a cluster admin does: a RoleBinding to the
/// built-in ClusterRole `edit`. A control plane without a controller-manager (the tests') never
/// aggregates `edit`'s rules into it; then the subject is also bound to `system:aggregate-to-edit`,
/// the ClusterRole the apiserver bootstraps with the rules upstream aggregates into `edit` (among
/// them verb `impersonate` on `serviceaccounts`), so that the editor holds exactly what upstream
/// gives one. Waits until the authorizer lets the subject impersonate the namespace's
/// ServiceAccounts.
pub async fn make_editor(admin: &Client, namespace: &str, subject: &Subject) {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let impersonates_service_accounts = |role: &ClusterRole| {
        role.rules.iter().flatten().any(|r| {
            r.verbs.iter().any(|v| v == "impersonate")
                && r.api_groups.iter().flatten().any(|g| g.is_empty())
                && r.resources.iter().flatten().any(|x| x == "serviceaccounts")
        })
    };
    let roles = Api::<ClusterRole>::all(admin.clone());
    let edit = roles
        .get("edit")
        .await
        .expect("the built-in ClusterRole edit");
    bind_cluster_role(
        admin,
        namespace,
        "editor",
        "edit",
        std::slice::from_ref(subject),
    )
    .await;
    if !impersonates_service_accounts(&edit) {
        let upstream = roles
            .get("system:aggregate-to-edit")
            .await
            .expect("the bootstrap ClusterRole system:aggregate-to-edit");
        assert!(
            impersonates_service_accounts(&upstream),
            "upstream's edit rules let an editor impersonate ServiceAccounts"
        );
        bind_cluster_role(
            admin,
            namespace,
            "editor-aggregated",
            "system:aggregate-to-edit",
            std::slice::from_ref(subject),
        )
        .await;
    }
    wait_allowed(
        admin,
        namespace,
        subject,
        &rule("", &["serviceaccounts"], &["impersonate"], &[]),
    )
    .await;
}

/// Waits (up to 60 s) until the loaded grant-authority policy refuses a ServiceAccount that lends its
/// own authority without a pod-bound token. [`install_admission_policies`] sees a policy in effect
/// by behaviour older versions share too; on a control plane that ran an older version, the apiserver
/// may still enforce it for a few seconds after the new one is applied.
pub async fn wait_service_account_self_grants_need_a_pod(admin: &Client) {
    install_admission_policies(admin).await;
    let account = "delegation-operator-tests-probe";
    grant_role(
        admin,
        PROBE_NAMESPACE,
        "delegation-operator-tests-probe-sa",
        &[service_account_subject(PROBE_NAMESPACE, account)],
        &[rule(
            "delegation.nhi.dev",
            &["delegationgrants"],
            &["create"],
            &[],
        )],
    )
    .await;
    let user = format!("system:serviceaccount:{PROBE_NAMESPACE}:{account}");
    let impersonated = client_as(&user, &[]).await;
    let grant = probe_grant(json!({"kind": "ServiceAccount", "name": user}), None);
    wait_for(
        "the admission policy to refuse a ServiceAccount without a pod-bound token",
        Duration::from_secs(60),
        || async {
            let result = dry_run_create(&impersonated, "DelegationGrant", &grant).await;
            refused_with(result, "pod-bound").ok()
        },
    )
    .await;
}

/// A kubeconfig for the test apiserver that authenticates with a TokenRequest token of the
/// ServiceAccount (never printed; the file is private and removed by its owner).
pub async fn service_account_kubeconfig(client: &Client, namespace: &str, name: &str) -> PathBuf {
    let request = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: Some(k8s_openapi::api::authentication::v1::TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token =
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), namespace)
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .expect("TokenRequest for the ServiceAccount")
            .status
            .expect("a token")
            .token;
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(kubeconfig_path()).unwrap()).unwrap();
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = serde_yaml::to_string(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": serde_json::to_value(cluster).unwrap()}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": name}}],
        "current-context": "test",
    }))
    .unwrap();
    let path = std::env::temp_dir().join(format!(
        "delegation-operator-sa-{}.kubeconfig",
        uuid::Uuid::new_v4().simple()
    ));
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut file, config.as_bytes()).unwrap();
    path
}

/// The names of the token Secrets (type `delegation.nhi.dev/token`) in `namespace`.
pub async fn token_secrets(client: &Client, namespace: &str) -> Vec<String> {
    Api::<Secret>::namespaced(client.clone(), namespace)
        .list(&kube::api::ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.type_.as_deref() == Some("delegation.nhi.dev/token"))
        .filter_map(|s| s.metadata.name)
        .collect()
}

// ---- the examples ------------------------------------------------------------------------------

/// Creates an example's objects (`manifest`, one Pod among them) in the fixture's namespace, as
/// `kubectl apply -f` would; returns the Pod as created.
pub async fn apply_example(f: &Fixture, manifest: &std::path::Path) -> Pod {
    let mut pod = None;
    for doc in load_documents(manifest) {
        let kind = doc.types.as_ref().unwrap().kind.clone();
        let name = doc.metadata.name.clone().unwrap();
        match kind.as_str() {
            "ServiceAccount" => ensure_service_account(&f.client, &f.ns, &name).await,
            "Pod" => {
                let spec: Pod =
                    serde_json::from_value(serde_json::to_value(&doc).unwrap()).unwrap();
                let created = Api::<Pod>::namespaced(f.client.clone(), &f.ns)
                    .create(&PostParams::default(), &spec)
                    .await
                    .unwrap_or_else(|e| panic!("the example's Pod: {e}"));
                pod = Some(created);
            }
            _ => {
                create_document(&f.client, &f.ns, &doc)
                    .await
                    .unwrap_or_else(|e| panic!("the example's {kind} {name}: {e}"));
            }
        }
    }
    pod.expect("the example has a Pod")
}

/// The value of the environment variable `name` of a Pod's first container.
pub fn pod_env(pod: &Pod, name: &str) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| panic!("the example Pod sets {name}"))
}

/// A finished example agent's exit code and the JSON lines it printed (each line must be JSON).
pub fn json_lines_of(out: &std::process::Output) -> (i32, Vec<serde_json::Value>) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "the agent printed a line that is not JSON ({e}): {l}\nstderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        })
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

//! The admission policies (`admission/policies.yaml`) against a real kube-apiserver: who created a
//! grant or an approval is stamped by the apiserver and cannot be forged or changed, and naming a
//! principal or approving a grant needs RBAC permission. Users are impersonated with the admin's
//! credentials; each test has its own namespace.

mod support;

use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams, PostParams},
    discovery::{Scope, pinned_kind},
};
use serde_json::{Value, json};
use support::*;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@example.com";
/// A group the impersonated people are in, to see that real groups are stamped.
const PEOPLE: &str = "example:people";
const G: &str = "delegation.nhi.dev";

/// One test's namespace, with alice, bob and carol allowed to manage grants, approvals and agents
/// there (and nothing else).
struct Env {
    admin: Client,
    ns: String,
}

impl Env {
    async fn new(prefix: &str) -> Self {
        let admin = client().await;
        install_crds(&admin).await;
        let ns = fresh_namespace(&admin, prefix).await;
        let env = Self { admin, ns };
        env.allow_editing(&[user_subject(ALICE), user_subject(BOB), user_subject(CAROL)])
            .await;
        env
    }

    /// Lets `subjects` create, read and change grants, approvals and agents in the namespace:
    /// asking, not yet speaking for anyone.
    async fn allow_editing(&self, subjects: &[k8s_openapi::api::rbac::v1::Subject]) {
        let resources = ["delegationgrants", "delegationapprovals", "agentidentities"];
        let verbs = ["create", "get", "list", "update", "patch"];
        let name = format!("edit-{}", uuid::Uuid::new_v4().simple());
        let rules = [rule(G, &resources, &verbs, &[])];
        grant_role(&self.admin, &self.ns, &name, subjects, &rules).await;
    }

    /// Lets `subject` do `verb` on `resource` named `names` (API group delegation.nhi.dev) here.
    async fn allow(
        &self,
        subject: k8s_openapi::api::rbac::v1::Subject,
        verb: &str,
        resource: &str,
        names: &[&str],
    ) {
        let name = format!("{verb}-{resource}-{}", uuid::Uuid::new_v4().simple());
        let rules = [rule(G, &[resource], &[verb], names)];
        grant_role(&self.admin, &self.ns, &name, &[subject], &rules).await;
    }

    fn service_account_user(&self, name: &str) -> String {
        format!("system:serviceaccount:{}:{name}", self.ns)
    }

    async fn create(
        &self,
        client: &Client,
        kind: &str,
        obj: &DynamicObject,
    ) -> Result<DynamicObject, kube::Error> {
        let mut obj = obj.clone();
        obj.metadata.namespace = Some(self.ns.clone());
        dynamic_api(client, &self.ns, kind)
            .create(&PostParams::default(), &obj)
            .await
    }

    async fn create_grant(
        &self,
        client: &Client,
        obj: &DynamicObject,
    ) -> Result<DynamicObject, kube::Error> {
        self.create(client, "DelegationGrant", obj).await
    }

    async fn merge_patch(
        &self,
        client: &Client,
        kind: &str,
        name: &str,
        patch: Value,
    ) -> Result<DynamicObject, kube::Error> {
        dynamic_api(client, &self.ns, kind)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
    }

    async fn get(&self, kind: &str, name: &str) -> DynamicObject {
        dynamic_api(&self.admin, &self.ns, kind)
            .get(name)
            .await
            .unwrap()
    }
}

fn grant_spec(principal: Value) -> Value {
    json!({
        "principal": principal,
        "actorRef": {"name": "ticket-triage"},
        "scopes": ["tickets:read"],
        "audience": "https://tickets.example.com",
        "tokenTTL": "10m",
    })
}

fn user(name: &str) -> Value {
    json!({"kind": "User", "name": name})
}

fn grant_for(name: &str, principal: Value) -> DynamicObject {
    our_object("DelegationGrant", name, grant_spec(principal))
}

fn forged_identity() -> Value {
    json!({"username": "mallory", "groups": ["system:masters"], "extra": {"x": ["y"]}})
}

fn approval_of(name: &str, grant: &DynamicObject) -> DynamicObject {
    our_object(
        "DelegationApproval",
        name,
        json!({
            "grantRef": {"name": grant.metadata.name, "uid": grant.metadata.uid},
            "generation": grant.metadata.generation,
            "decision": "Approve",
            "comment": "looks right",
        }),
    )
}

/// The status of a request the admission policies refused: 403 Forbidden for missing permissions.
fn forbidden_message<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Ok(obj) => panic!("the apiserver accepted a request it should refuse: {obj:?}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "expected 403 Forbidden, got {status:?}");
            assert_eq!(status.reason, "Forbidden", "{status:?}");
            status.message.clone()
        }
        Err(other) => panic!("expected an apiserver refusal, got {other}"),
    }
}

fn requester(grant: &DynamicObject) -> &Value {
    &grant.data["spec"]["requester"]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

// ---- the stamp -------------------------------------------------------------------------------

#[tokio::test]
async fn a_forged_requester_is_replaced_by_the_real_identity() {
    let env = Env::new("adm-forged").await;
    let alice = client_impersonating(
        ALICE,
        &[PEOPLE],
        Some("alice-uid-1"),
        &[("example.com/team", &["support"])],
    )
    .await;
    let mut obj = grant_for("forged", user(ALICE));
    obj.data["spec"]["requester"] = forged_identity();

    let created = env.create_grant(&alice, &obj).await.unwrap();

    let stamped = requester(&created);
    assert_eq!(stamped["username"], ALICE, "{stamped}");
    assert_eq!(stamped["uid"], "alice-uid-1", "{stamped}");
    let groups = strings(&stamped["groups"]);
    assert!(
        groups.contains(&PEOPLE) && groups.contains(&"system:authenticated"),
        "{stamped}"
    );
    assert!(
        !groups.contains(&"system:masters"),
        "forged group kept: {stamped}"
    );
    assert_eq!(
        stamped["extra"],
        json!({"example.com/team": ["support"]}),
        "extra must be alice's own, without the forged key"
    );
    // What is stored is what was returned.
    assert_eq!(
        requester(&env.get("DelegationGrant", "forged").await),
        stamped
    );
}

#[tokio::test]
async fn the_stamp_is_the_callers_full_identity_including_extra() {
    // The admin is a client-certificate user: no uid, and an extra credential id added by the
    // apiserver. Both must be recorded as the apiserver saw them.
    let env = Env::new("adm-admin").await;
    let me = whoami(&env.admin).await;
    let mut obj = grant_for("by-admin", user(ALICE));
    obj.data["spec"]["requester"] = forged_identity();

    let created = env.create_grant(&env.admin, &obj).await.unwrap();

    let stamped = requester(&created);
    assert_eq!(stamped["username"], json!(me.username), "{stamped}");
    assert_eq!(
        stamped["uid"],
        json!(me.uid.unwrap_or_default()),
        "{stamped}"
    );
    assert_eq!(stamped["groups"], json!(me.groups.unwrap_or_default()));
    assert_eq!(stamped["extra"], json!(me.extra.unwrap_or_default()));
}

#[tokio::test]
async fn the_requester_cannot_be_edited_but_other_updates_pass_and_a_change_is_a_request() {
    let env = Env::new("adm-immutable").await;
    let alice = client_as(ALICE, &[PEOPLE]).await;
    let bob = client_as(BOB, &[PEOPLE]).await;
    let created = env
        .create_grant(&alice, &grant_for("mine", user(ALICE)))
        .await
        .unwrap();
    let original = requester(&created).clone();

    let attempts = [
        ("bob claims it", &bob, json!({"username": BOB})),
        ("alice adds a group", &alice, {
            let mut r = original.clone();
            r["groups"] = json!(["system:masters"]);
            r
        }),
        ("bob removes it", &bob, Value::Null),
    ];
    for (what, client, value) in attempts {
        let patch = json!({"spec": {"requester": value}});
        let result = env
            .merge_patch(client, "DelegationGrant", "mine", patch)
            .await;
        let message = rejection_message(result);
        assert!(
            message.contains("spec.requester")
                && (message.contains("cannot be edited") || message.contains("cannot be removed")),
            "{what}: {message}"
        );
    }

    // Someone else's unrelated update (a label, a finalizer as the operator adds) passes.
    let patch = json!({"metadata": {
        "labels": {"team": "support"},
        "finalizers": ["delegation.nhi.dev/test"],
    }});
    let updated = env
        .merge_patch(&bob, "DelegationGrant", "mine", patch)
        .await
        .unwrap();
    assert_eq!(updated.metadata.labels.as_ref().unwrap()["team"], "support");
    assert_eq!(requester(&updated), &original);
    // A change of what the grant authorises is a request by whoever makes it: the admin (who may
    // delegate for anyone) becomes the requester, after alice in the authors.
    let patch = json!({"spec": {"tokenTTL": "5m"}, "metadata": {"finalizers": null}});
    let updated = env
        .merge_patch(&env.admin, "DelegationGrant", "mine", patch)
        .await
        .unwrap();
    assert_eq!(updated.data["spec"]["tokenTTL"], "5m");
    let admin = whoami(&env.admin).await.username.unwrap();
    assert_eq!(requester(&updated)["username"], json!(admin));
    assert_eq!(updated.data["spec"]["authors"], json!([ALICE, admin]));
}

// ---- who may delegate for whom ---------------------------------------------------------------

#[tokio::test]
async fn a_user_may_delegate_her_own_authority_without_permission() {
    let env = Env::new("adm-self").await;
    let alice = client_as(ALICE, &[PEOPLE]).await;
    let created = env
        .create_grant(&alice, &grant_for("alice-herself", user(ALICE)))
        .await
        .unwrap();
    assert_eq!(requester(&created)["username"], ALICE);
}

#[tokio::test]
async fn delegating_for_another_user_needs_delegate_on_users_named_after_them() {
    let env = Env::new("adm-users").await;
    let bob = client_as(BOB, &[PEOPLE]).await;

    let refused = env
        .create_grant(&bob, &grant_for("for-alice", user(ALICE)))
        .await;
    let message = forbidden_message(refused);
    for words in [
        "user bob@example.com may not delegate for User alice@example.com",
        r#"verb "delegate""#,
        r#"on "users""#,
        r#"named "alice@example.com""#,
        "(API group delegation.nhi.dev)",
        &format!("in namespace {}", env.ns),
    ] {
        assert!(message.contains(words), "{words:?} missing: {message}");
    }

    env.allow(user_subject(BOB), "delegate", "users", &[ALICE])
        .await;
    let created = env
        .create_grant(&bob, &grant_for("for-alice", user(ALICE)))
        .await
        .unwrap();
    assert_eq!(requester(&created)["username"], BOB);

    // The permission names alice only.
    let refused = env
        .create_grant(&bob, &grant_for("for-carol", user(CAROL)))
        .await;
    assert!(forbidden_message(refused).contains(r#"named "carol@example.com""#));
}

#[tokio::test]
async fn a_group_principal_always_needs_delegate_on_groups() {
    let env = Env::new("adm-groups").await;
    // Alice is in the group, and holds `delegate` on a *user* of that name: neither is enough.
    let alice = client_as(ALICE, &[PEOPLE, "support-team"]).await;
    env.allow(user_subject(ALICE), "delegate", "users", &["support-team"])
        .await;
    let group = json!({"kind": "Group", "name": "support-team"});

    let refused = env
        .create_grant(&alice, &grant_for("team", group.clone()))
        .await;
    let message = forbidden_message(refused);
    assert!(
        message.contains("may not delegate for Group support-team")
            && message.contains(r#"on "groups" named "support-team""#),
        "{message}"
    );

    env.allow(user_subject(ALICE), "delegate", "groups", &["support-team"])
        .await;
    env.create_grant(&alice, &grant_for("team", group))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_service_account_may_delegate_for_itself_and_others_need_delegate_on_serviceaccounts() {
    let env = Env::new("adm-sa").await;
    wait_service_account_self_grants_need_a_pod(&env.admin).await;
    let robot_user = env.service_account_user("robot");
    env.allow_editing(&[service_account_subject(&env.ns, "robot")])
        .await;
    let principal = json!({"kind": "ServiceAccount", "name": robot_user});

    // Acting as the ServiceAccount (impersonation) is not the ServiceAccount asking.
    let impersonated = client_as(&robot_user, &["system:serviceaccounts"]).await;
    let refused = env
        .create_grant(&impersonated, &grant_for("robot-itself", principal.clone()))
        .await;
    let message = forbidden_message(refused);
    for words in [
        format!("user {robot_user} may not delegate for ServiceAccount {robot_user}"),
        format!(r#"on "serviceaccounts" named "{robot_user}""#),
        "presented no pod-bound ServiceAccount token".into(),
    ] {
        assert!(message.contains(&words), "{words:?} missing: {message}");
    }

    // Its workload: a pod running as it, authenticated with the token bound to that pod.
    let (robot, pod) = pod_bound_client(&env.admin, &env.ns, "robot").await;
    let created = env
        .create_grant(&robot, &grant_for("robot-itself", principal.clone()))
        .await
        .unwrap();
    assert_eq!(requester(&created)["username"], robot_user.as_str());
    assert!(strings(&requester(&created)["groups"]).contains(&"system:serviceaccounts"));
    let extra = &requester(&created)["extra"];
    assert_eq!(
        extra["authentication.kubernetes.io/pod-name"],
        json!([pod.metadata.name]),
        "{extra}"
    );
    assert_eq!(
        extra["authentication.kubernetes.io/pod-uid"],
        json!([pod.metadata.uid]),
        "{extra}"
    );

    let bob = client_as(BOB, &[PEOPLE]).await;
    let refused = env
        .create_grant(&bob, &grant_for("for-robot", principal.clone()))
        .await;
    let message = forbidden_message(refused);
    assert!(
        message.contains(&format!(r#"on "serviceaccounts" named "{robot_user}""#)),
        "{message}"
    );
    env.allow(
        user_subject(BOB),
        "delegate",
        "serviceaccounts",
        &[&robot_user],
    )
    .await;
    env.create_grant(&bob, &grant_for("for-robot", principal))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_hop_is_left_to_the_operator() {
    // CEL cannot read the parent grant, so admission neither checks nor refuses a hop: the operator
    // does. Bob holds no delegate permission at all.
    let env = Env::new("adm-hop").await;
    let bob = client_as(BOB, &[PEOPLE]).await;
    let mut spec = grant_spec(Value::Null);
    spec.as_object_mut().unwrap().remove("principal");
    spec["parentGrantRef"] = json!({"name": "someone-elses-grant"});
    let created = env
        .create_grant(&bob, &our_object("DelegationGrant", "hop", spec))
        .await
        .unwrap();
    assert_eq!(requester(&created)["username"], BOB);
}

// ---- approvals -------------------------------------------------------------------------------

#[tokio::test]
async fn approving_needs_approve_on_the_grant_and_stamps_the_approver() {
    let env = Env::new("adm-approve").await;
    let alice = client_as(ALICE, &[PEOPLE]).await;
    let carol = client_as(CAROL, &[PEOPLE]).await;
    let grant = env
        .create_grant(&alice, &grant_for("needs-ok", user(ALICE)))
        .await
        .unwrap();

    let refused = env
        .create(&carol, "DelegationApproval", &approval_of("ok", &grant))
        .await;
    let message = forbidden_message(refused);
    for words in [
        "user carol@example.com may not approve DelegationGrant needs-ok",
        r#"verb "approve" on "delegationgrants" named "needs-ok""#,
        &format!("in namespace {}", env.ns),
    ] {
        assert!(message.contains(words), "{words:?} missing: {message}");
    }

    // Approving another grant does not help; approving this one does.
    env.allow(
        user_subject(CAROL),
        "approve",
        "delegationgrants",
        &["other"],
    )
    .await;
    let refused = env
        .create(&carol, "DelegationApproval", &approval_of("ok", &grant))
        .await;
    forbidden_message(refused);
    env.allow(
        user_subject(CAROL),
        "approve",
        "delegationgrants",
        &["needs-ok"],
    )
    .await;
    let mut approval = approval_of("ok", &grant);
    approval.data["spec"]["approver"] = forged_identity();
    let created = env
        .create(&carol, "DelegationApproval", &approval)
        .await
        .unwrap();
    let approver = &created.data["spec"]["approver"];
    assert_eq!(approver["username"], CAROL, "{approver}");
    assert!(!strings(&approver["groups"]).contains(&"system:masters"));
    assert_eq!(approver["extra"], json!({}), "{approver}");
}

#[tokio::test]
async fn an_approval_cannot_be_changed() {
    let env = Env::new("adm-record").await;
    let alice = client_as(ALICE, &[PEOPLE]).await;
    let carol = client_as(CAROL, &[PEOPLE]).await;
    let grant = env
        .create_grant(&alice, &grant_for("g", user(ALICE)))
        .await
        .unwrap();
    env.allow(user_subject(CAROL), "approve", "delegationgrants", &["g"])
        .await;
    env.create(&carol, "DelegationApproval", &approval_of("ok", &grant))
        .await
        .unwrap();

    for patch in [
        json!({"spec": {"decision": "Reject"}}),
        json!({"spec": {"approver": {"username": ALICE}}}),
        json!({"spec": {"approver": null}}),
    ] {
        let result = env
            .merge_patch(&carol, "DelegationApproval", "ok", patch)
            .await;
        let message = rejection_message(result);
        assert!(message.contains("record"), "{message}");
    }
    // Metadata is not part of the record.
    env.merge_patch(
        &carol,
        "DelegationApproval",
        "ok",
        json!({"metadata": {"labels": {"seen": "yes"}}}),
    )
    .await
    .unwrap();
    let stored = env.get("DelegationApproval", "ok").await;
    assert_eq!(stored.data["spec"]["decision"], "Approve");
    assert_eq!(stored.data["spec"]["approver"]["username"], CAROL);
}

// ---- GitOps ----------------------------------------------------------------------------------

/// kubectl acting as `user` in `groups` (or as the admin when `user` is `None`), in `ns`.
async fn kubectl_as(
    user: Option<(&str, &[&str])>,
    ns: &str,
    args: &[&str],
) -> std::process::Output {
    let mut all: Vec<String> = vec!["--namespace".into(), ns.into()];
    if let Some((name, groups)) = user {
        all.push(format!("--as={name}"));
        all.extend(groups.iter().map(|g| format!("--as-group={g}")));
    }
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    kubectl(&all).await
}

fn show(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kubectl diff --server-side` must print nothing and exit 0.
async fn assert_no_drift(who: &str, user: Option<(&str, &[&str])>, ns: &str, file: &str) {
    let args = [
        "diff",
        "--server-side",
        "--field-manager",
        "argocd",
        "-f",
        file,
    ];
    let out = kubectl_as(user, ns, &args).await;
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "diff as {who} shows drift: {}",
        show(&out)
    );
}

#[tokio::test]
async fn gitops_apply_by_a_service_account_shows_no_drift() {
    let env = Env::new("adm-gitops").await;
    let gitops_user = env.service_account_user("gitops");
    let gitops_groups: &[&str] = &["system:serviceaccounts"];
    let gitops = Some((gitops_user.as_str(), gitops_groups));
    env.allow_editing(&[service_account_subject(&env.ns, "gitops")])
        .await;
    env.allow(
        service_account_subject(&env.ns, "gitops"),
        "delegate",
        "users",
        &[ALICE],
    )
    .await;
    env.allow(user_subject(BOB), "delegate", "users", &[ALICE])
        .await;
    let bob_groups: &[&str] = &[PEOPLE];
    let bob = Some((BOB, bob_groups));

    let manifest = serde_yaml::to_string(&grant_for("from-git", user(ALICE))).unwrap();
    let file = std::env::temp_dir().join(format!("{}-grant.yaml", env.ns));
    std::fs::write(&file, manifest).unwrap();
    let file = file.to_str().unwrap();

    let apply = [
        "apply",
        "--server-side",
        "--field-manager",
        "argocd",
        "-f",
        file,
    ];
    let out = kubectl_as(gitops, &env.ns, &apply).await;
    assert!(out.status.success(), "gitops apply: {}", show(&out));
    let stamped = requester(&env.get("DelegationGrant", "from-git").await).clone();
    assert_eq!(stamped["username"], gitops_user.as_str());

    assert_no_drift("the gitops ServiceAccount", gitops, &env.ns, file).await;
    assert_no_drift("the admin", None, &env.ns, file).await;
    assert_no_drift("bob", bob, &env.ns, file).await;

    // Re-applied by others, and by kubectl's own field manager: the stamp stays.
    let out = kubectl_as(bob, &env.ns, &apply).await;
    assert!(out.status.success(), "bob's apply: {}", show(&out));
    let out = kubectl_as(None, &env.ns, &["apply", "--server-side", "-f", file]).await;
    assert!(out.status.success(), "admin's apply: {}", show(&out));
    let out = kubectl_as(gitops, &env.ns, &apply).await;
    assert!(out.status.success(), "gitops re-apply: {}", show(&out));
    assert_eq!(
        requester(&env.get("DelegationGrant", "from-git").await),
        &stamped
    );
    assert_no_drift("the gitops ServiceAccount, again", gitops, &env.ns, file).await;
    std::fs::remove_file(file).ok();
}

// ---- installing the policies ------------------------------------------------------------------

#[tokio::test]
async fn the_policies_apply_again_under_another_field_manager_without_conflict() {
    // An installer applied them (the test harness did); `kubectl apply --server-side` of the same
    // YAML by someone else must not conflict. Atomic fields the apiserver fills in with defaults
    // (matchConstraints) conflict unless the YAML already holds the defaulted form.
    let admin = client().await;
    install_crds(&admin).await;
    let params = PatchParams::apply("another-installer").dry_run();
    for doc in delegation_operator::admission::documents() {
        let doc: DynamicObject = serde_json::from_value(doc).unwrap();
        apply_document(&admin, "default", &doc, &params)
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", doc.metadata.name));
    }
}

// ---- the RBAC examples -----------------------------------------------------------------------

#[tokio::test]
async fn every_rbac_example_applies() {
    let admin = client().await;
    install_crds(&admin).await;
    let ns = fresh_namespace(&admin, "adm-rbac").await;
    let dry_run = PatchParams::apply(FIELD_MANAGER).dry_run();
    let files = yaml_files(&repo_root().join("examples/rbac"));
    assert!(files.len() >= 4, "expected four RBAC examples: {files:?}");
    for file in files {
        let docs = load_documents(&file);
        assert!(!docs.is_empty(), "{} has no documents", file.display());
        for doc in docs {
            apply_document(&admin, &ns, &doc, &dry_run)
                .await
                .unwrap_or_else(|e| panic!("{} ({:?}): {e}", file.display(), doc.metadata.name));
        }
    }
}

/// Server-side applies one document of any kind (its resource found by discovery), into `ns` when
/// it is namespaced.
async fn apply_document(
    client: &Client,
    ns: &str,
    doc: &DynamicObject,
    params: &PatchParams,
) -> Result<(), kube::Error> {
    let types = doc.types.as_ref().expect("apiVersion and kind");
    let gvk = kube::api::GroupVersionKind::try_from(types).expect("a valid apiVersion");
    let (resource, caps) = pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), ns, &resource),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let name = doc.metadata.name.as_deref().expect("a name");
    api.patch(name, params, &Patch::Apply(doc)).await?;
    Ok(())
}

#[tokio::test]
async fn the_who_may_delegate_example_lets_its_group_delegate_for_the_names_it_lists() {
    // The example, applied for real in a test namespace: a member of support-leads may start a
    // session for alice, and not for carol.
    let env = Env::new("adm-rbac-effect").await;
    let file = repo_root().join("examples/rbac/who-may-delegate.yaml");
    for doc in load_documents(&file) {
        apply_document(
            &env.admin,
            &env.ns,
            &doc,
            &PatchParams::apply(FIELD_MANAGER),
        )
        .await
        .unwrap_or_else(|e| panic!("{:?}: {e}", doc.metadata.name));
    }
    // The example's bindings reach the authorizer a moment after they are written: wait until it
    // lets the group ask for grants and delegate for alice (what the admission policy asks).
    let leads = group_subject("support-leads");
    for rule in [
        rule(G, &["delegationgrants"], &["create"], &[]),
        rule(G, &["users"], &["delegate"], &[ALICE]),
    ] {
        wait_allowed(&env.admin, &env.ns, &leads, &rule).await;
    }
    let dana = client_as("dana@example.com", &["support-leads"]).await;
    wait_for(
        "the example's RoleBindings to apply",
        std::time::Duration::from_secs(10),
        || async {
            env.create_grant(&dana, &grant_for("for-alice", user(ALICE)))
                .await
                .ok()
        },
    )
    .await;
    let refused = env
        .create_grant(&dana, &grant_for("for-carol", user(CAROL)))
        .await;
    assert!(forbidden_message(refused).contains("may not delegate for User carol@example.com"));
}

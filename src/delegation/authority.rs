//! Who may speak for whom: the pure half of the authority decision.
//!
//! A grant's requester (stamped by the apiserver) may name a principal when it *is* that principal, or
//! when Kubernetes RBAC allows it verb `delegate` on the principal (resource `users`, `groups` or
//! `serviceaccounts` of group `delegation.nhi.dev`, resourceName = the principal). It may extend a chain
//! when it is the parent actor's workload (its ServiceAccount), or when RBAC allows it `delegate` on
//! `agentidentities` named after the parent's actor. A ServiceAccount counts as itself (the principal,
//! or the workload) only when it authenticated with a token bound to a pod ([`bound_pod`]): the built-in
//! `edit` and `admin` roles may impersonate a namespace's ServiceAccounts, so the name alone is not
//! evidence that the workload asked. The requester is whoever last changed what the grant authorises
//! (an edit is a request, stamped and checked like a creation). An approval counts when its approver
//! was allowed `approve` on the grant and wrote no version of its spec (neither the requester nor
//! any of `spec.authors`). This module says which question to ask; the operator asks the
//! apiserver (SubjectAccessReview) and this module turns the answer into a decision.

use k8s_openapi::jiff::Timestamp;

use crate::api::{
    AgentIdentity, ApprovalStatus, Decision, DelegationApproval, DelegationGrant, Principal,
    PrincipalKind, UserIdentity, service_account_username,
};

use super::{Reason, Refusal};

/// What a grant's authority check found: the approval it stands on, if its agent requires one.
#[derive(Clone, Debug, PartialEq)]
pub struct Evidence {
    pub approval: Option<ApprovalStatus>,
    /// When the apiserver was asked.
    pub checked_at: Timestamp,
}

/// A refusal, with the approval state to show when the refusal is about approval.
#[derive(Clone, Debug, PartialEq)]
pub struct Unauthorized {
    pub refusal: Refusal,
    pub approval: Option<ApprovalStatus>,
}

/// The API group of the authority resources.
pub const GROUP: &str = "delegation.nhi.dev";
/// The verb that lets a requester speak for a principal or extend an agent's chain.
pub const DELEGATE: &str = "delegate";
/// The verb that lets an approver approve or reject a grant.
pub const APPROVE: &str = "approve";

/// The `userInfo.extra` keys the apiserver sets when a ServiceAccount token bound to a Pod (the
/// projected token the kubelet gives a pod, or a TokenRequest with `boundObjectRef` kind Pod)
/// authenticates a request; the stamping admission policy copies them into `spec.requester.extra`.
/// Impersonation sets extra only with verb `impersonate` on `userextras/<key>` (API group
/// `authentication.k8s.io`), which the built-in `edit` and `admin` roles do not grant, while they do
/// grant `impersonate` on `serviceaccounts`.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// See [`POD_NAME_EXTRA`].
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// The pod (name, uid) whose bound ServiceAccount token authenticated `user`, if one did: both extras
/// hold a non-empty value (as the admission policy checks).
pub fn bound_pod(user: &UserIdentity) -> Option<(&str, &str)> {
    let extra = user.extra.as_ref()?;
    let value = |key| {
        extra
            .get(key)?
            .0
            .iter()
            .find(|v| !v.is_empty())
            .map(String::as_str)
    };
    Some((value(POD_NAME_EXTRA)?, value(POD_UID_EXTRA)?))
}

/// Whether `user` is a ServiceAccount (by the user name Kubernetes gives one).
fn is_service_account(user: &UserIdentity) -> bool {
    user.username.starts_with("system:serviceaccount:")
}

/// Whether `user`, whose name is the one that counts as itself (the principal, or the parent actor's
/// workload), may be believed: anyone but a ServiceAccount is; a ServiceAccount only with a pod-bound
/// token.
fn proven_itself(user: &UserIdentity) -> bool {
    !is_service_account(user) || bound_pod(user).is_some()
}

/// How long after the stamping and checking policies and their bindings are in force (created, or seen
/// back after a problem) the operator trusts that every apiserver applies them (they load within
/// seconds). See [`super::stamp_trust`].
pub const STAMP_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// A question for the apiserver's authorizer: may `user` do `verb` on `resource` named `name`?
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessQuestion {
    pub verb: &'static str,
    pub resource: &'static str,
    pub name: String,
    pub namespace: String,
}

impl AccessQuestion {
    /// The permission in words, for messages: what a RoleBinding must grant.
    pub fn describe(&self) -> String {
        let named = if self.name.is_empty() {
            String::new()
        } else {
            format!(" named {:?}", self.name)
        };
        format!(
            "verb {:?} on {:?}{named} (API group {GROUP}) in namespace {:?}",
            self.verb, self.resource, self.namespace
        )
    }
}

/// What a requester that counted as itself (a self-grant, or the workload extending its chain) must
/// still be allowed, at every check: to ask for grants in the namespace (`create` on
/// `delegationgrants`). Removing the person's or the ServiceAccount's RoleBinding ends the delegation,
/// as removing `delegate` does for everyone else.
pub fn still_may_ask(namespace: &str) -> AccessQuestion {
    AccessQuestion {
        verb: "create",
        resource: "delegationgrants",
        name: String::new(),
        namespace: namespace.to_owned(),
    }
}

/// The refusal when a requester that counted as itself may no longer ask.
pub fn no_longer_may_ask(requester: &UserIdentity, question: &AccessQuestion) -> Refusal {
    Refusal::new(
        Reason::DeniedNotAuthorized,
        format!(
            "requester {:?} may no longer ask for grants here: it needs {} (a grant of one's own \
             authority stands only while its requester may ask for it)",
            requester.username,
            question.describe()
        ),
    )
}

/// The ServiceAccount (namespace, name) a user name stands for, if it is one.
pub fn service_account_of(user: &UserIdentity) -> Option<(&str, &str)> {
    let rest = user.username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then_some((namespace, name))
}

/// Whether the ServiceAccount that asked is still the one that asked: it exists, with the uid the
/// apiserver stamped (when one was). `found` is the uid of the ServiceAccount of that name now
/// (`None`: there is none). Returns the refusal otherwise.
pub fn service_account_gone(requester: &UserIdentity, found: Option<&str>) -> Option<Refusal> {
    let stamped = requester.uid();
    let gone = match (found, stamped) {
        (None, _) => "was deleted",
        (Some(now), Some(then)) if now != then => "was deleted and re-created (another uid)",
        _ => return None,
    };
    Some(Refusal::new(
        Reason::DeniedRequesterGone,
        format!(
            "the ServiceAccount {:?} that asked for this grant {gone} since; a new one of the same \
             name is not the one that asked: re-create the grant",
            requester.username
        ),
    ))
}

/// What it takes for a grant's requester to be allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequesterCheck {
    /// The requester is the principal, or the parent actor's workload (a ServiceAccount: from a
    /// pod-bound token): allowed without asking.
    Itself,
    /// Allowed only if the apiserver says yes.
    Ask(AccessQuestion),
}

/// Which check a grant's requester must pass. `parent_actor` is the AgentIdentity acting under the
/// parent grant (for a hop). Refuses a grant without a stamped requester: the admission policies were
/// not installed when it was created, so nothing proves who asked.
pub fn requester_check<'a>(
    grant: &'a DelegationGrant,
    namespace: &str,
    parent_actor: Option<&AgentIdentity>,
) -> Result<(&'a UserIdentity, RequesterCheck), Refusal> {
    let Some(requester) = grant
        .spec
        .requester
        .as_ref()
        .filter(|r| !r.username.is_empty())
    else {
        return Err(Refusal::new(
            Reason::DeniedRequesterMissing,
            "spec.requester is empty: nothing proves who created this grant. Install the admission \
             policies (`delegation-operator admission-policies | kubectl apply --server-side -f -`), \
             then delete and re-create the grant",
        ));
    };
    let check = match (&grant.spec.principal, &grant.spec.parent_grant_ref) {
        (Some(principal), _) => principal_check(requester, principal, namespace),
        (None, Some(_)) => {
            let actor_name = parent_actor
                .and_then(|a| a.metadata.name.clone())
                .unwrap_or_default();
            let workload = parent_actor
                .and_then(|a| a.spec.service_account_name.as_deref())
                .map(|sa| service_account_username(namespace, sa));
            if workload.as_deref() == Some(requester.username.as_str()) && proven_itself(requester)
            {
                RequesterCheck::Itself
            } else {
                RequesterCheck::Ask(AccessQuestion {
                    verb: DELEGATE,
                    resource: "agentidentities",
                    name: actor_name,
                    namespace: namespace.to_owned(),
                })
            }
        }
        (None, None) => {
            return Err(Refusal::new(
                Reason::DeniedInvalidSpec,
                "exactly one of spec.principal or spec.parentGrantRef must be set",
            ));
        }
    };
    Ok((requester, check))
}

fn principal_check(
    requester: &UserIdentity,
    principal: &Principal,
    namespace: &str,
) -> RequesterCheck {
    let resource = match principal.kind {
        PrincipalKind::User => "users",
        PrincipalKind::Group => "groups",
        PrincipalKind::ServiceAccount => "serviceaccounts",
    };
    // No one *is* a group: naming one always needs the permission. A ServiceAccount is itself only
    // from a pod-bound token.
    if principal.kind != PrincipalKind::Group
        && requester.username == principal.name
        && proven_itself(requester)
    {
        return RequesterCheck::Itself;
    }
    RequesterCheck::Ask(AccessQuestion {
        verb: DELEGATE,
        resource,
        name: principal.name.clone(),
        namespace: namespace.to_owned(),
    })
}

/// The refusal when the apiserver said no to a requester.
pub fn requester_refused(
    grant: &DelegationGrant,
    requester: &UserIdentity,
    question: &AccessQuestion,
) -> Refusal {
    let (what, might_be_itself) = match &grant.spec.principal {
        Some(p) => (
            format!("delegate for {} {:?}", p.kind.as_str(), p.name),
            p.name == requester.username,
        ),
        None => (
            format!(
                "extend the chain of AgentIdentity {:?} (only its workload's ServiceAccount may, from a \
                 pod-bound token, or someone allowed to)",
                question.name
            ),
            // The workload is a ServiceAccount of the grant's namespace.
            requester
                .username
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.strip_prefix(question.namespace.as_str()))
                .is_some_and(|rest| rest.starts_with(':')),
        ),
    };
    // A ServiceAccount that would have counted as itself, but showed no pod: say why it did not.
    let unproven = if might_be_itself && !proven_itself(requester) {
        format!(
            "; {:?} presented no pod-bound ServiceAccount token (the token a pod running as it is given), \
             and acting as a ServiceAccount by impersonation (which the built-in edit and admin roles \
             allow) is not evidence that its workload asked",
            requester.username
        )
    } else {
        String::new()
    };
    Refusal::new(
        Reason::DeniedNotAuthorized,
        format!(
            "requester {:?} may not {what}: it needs {}{unproven}",
            requester.username,
            question.describe()
        ),
    )
}

/// Whether a grant to `actor` needs a person's approval.
pub fn approval_required(grant: &DelegationGrant, actor: &AgentIdentity) -> bool {
    match &actor.spec.require_approval {
        None => false,
        Some(requirement) => match &requirement.scopes {
            None => true,
            Some(scopes) => grant.spec.scopes.iter().any(|s| scopes.contains(s)),
        },
    }
}

/// An approval or rejection that may count, once its approver is confirmed allowed to decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The DelegationApproval's name.
    pub name: String,
    pub decision: Decision,
    pub approver: UserIdentity,
    pub question: AccessQuestion,
}

/// The decisions recorded for a grant, sorted for the operator to confirm: rejections first (one
/// confirmed rejection wins), then approvals, oldest first. `ignored` says, per record, why it cannot
/// count at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    pub candidates: Vec<Candidate>,
    pub ignored: Vec<String>,
}

/// Sorts the approvals of one namespace into those that may decide this grant's current generation.
pub fn decisions_for(
    grant: &DelegationGrant,
    namespace: &str,
    approvals: &[std::sync::Arc<DelegationApproval>],
    approver_proven: impl Fn(&DelegationApproval) -> Result<(), String>,
) -> Decisions {
    let name = grant.metadata.name.clone().unwrap_or_default();
    let uid = grant.metadata.uid.clone().unwrap_or_default();
    let generation = grant.metadata.generation.unwrap_or_default();
    let requester = grant.spec.requester.as_ref();
    let mut mine: Vec<&DelegationApproval> = approvals
        .iter()
        .map(AsRef::as_ref)
        .filter(|a| a.spec.grant_ref.name == name && a.spec.grant_ref.uid == uid)
        .filter(|a| a.spec.generation == generation)
        .collect();
    mine.sort_by_key(|a| {
        (
            a.spec.decision == Decision::Approve,
            a.metadata.creation_timestamp.clone().map(|t| t.0),
        )
    });
    let mut decisions = Decisions::default();
    for approval in mine {
        let approval_name = approval.metadata.name.clone().unwrap_or_default();
        let Some(approver) = approval
            .spec
            .approver
            .as_ref()
            .filter(|a| !a.username.is_empty())
        else {
            decisions.ignored.push(format!(
                "{approval_name:?} has no stamped approver (admission policies missing when it was created)"
            ));
            continue;
        };
        if let Err(problem) = approver_proven(approval) {
            decisions
                .ignored
                .push(format!("{approval_name:?}: {problem}"));
            continue;
        }
        if requester.is_some_and(|r| r.same_user(approver)) {
            decisions.ignored.push(format!(
                "{approval_name:?} is by the grant's own requester {:?}: a requester may not approve their own grant",
                approver.username
            ));
            continue;
        }
        if authored(grant, &approver.username) {
            decisions.ignored.push(format!(
                "{approval_name:?} is by {:?}, who wrote a version of this grant's spec (spec.authors): no one may approve a grant they asked for",
                approver.username
            ));
            continue;
        }
        decisions.candidates.push(Candidate {
            name: approval_name,
            decision: approval.spec.decision,
            approver: approver.clone(),
            question: AccessQuestion {
                verb: APPROVE,
                resource: "delegationgrants",
                name: name.clone(),
                namespace: namespace.to_owned(),
            },
        });
    }
    decisions
}

/// Whether `username` created the grant or changed what it authorises (the stamped `spec.authors`).
fn authored(grant: &DelegationGrant, username: &str) -> bool {
    grant
        .spec
        .authors
        .as_ref()
        .is_some_and(|authors| authors.iter().any(|a| a == username))
}

/// Control, zero-width and bidirectional characters: they make a name read differently from what it
/// is. The CRD refuses them; this is the operator's own check, fail closed.
pub fn principal_name_problem(principal: &Principal) -> Option<String> {
    let name = &principal.name;
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || is_invisible_format(c))
    {
        return Some(format!(
            "principal name {name:?} contains whitespace, control, zero-width or bidirectional characters"
        ));
    }
    if principal.kind != PrincipalKind::ServiceAccount && name.starts_with("system:") {
        return Some(format!(
            "principal name {name:?} starts with system:, which is reserved for Kubernetes"
        ));
    }
    // The token's subject drops this prefix (`serviceaccount:<namespace>:<name>`): a name without
    // it, or with other than two parts after it, could take another ServiceAccount's subject.
    if principal.kind == PrincipalKind::ServiceAccount
        && name
            .strip_prefix("system:serviceaccount:")
            .is_none_or(|rest| rest.split(':').count() != 2 || rest.split(':').any(str::is_empty))
    {
        return Some(format!(
            "ServiceAccount principal {name:?} is not named system:serviceaccount:<namespace>:<name>"
        ));
    }
    None
}

fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DelegationApprovalSpec, GrantRef};

    #[test]
    fn a_service_account_principal_must_have_the_kubernetes_form() {
        let sa = |name: &str| Principal {
            kind: PrincipalKind::ServiceAccount,
            name: name.into(),
        };
        assert_eq!(
            principal_name_problem(&sa("system:serviceaccount:ns:robot")),
            None
        );
        for bad in [
            "ns:robot",
            "system:serviceaccount:ns",
            "system:serviceaccount:ns:robot:x",
            "system:serviceaccount::robot",
        ] {
            assert!(principal_name_problem(&sa(bad)).is_some(), "{bad}");
        }
    }

    fn grant(spec: serde_json::Value) -> DelegationGrant {
        let mut base = serde_json::json!({"actorRef": {"name": "bot"}, "scopes": ["s"],
            "audience": "https://api", "tokenTTL": "10m"});
        base.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        serde_json::from_value(serde_json::json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
            "metadata": {"name": "g", "namespace": "ns", "uid": "uid-g", "generation": 2},
            "spec": base,
        }))
        .unwrap()
    }

    fn agent(service_account: Option<&str>) -> AgentIdentity {
        let mut a: AgentIdentity = serde_json::from_value(serde_json::json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "AgentIdentity",
            "metadata": {"name": "orchestrator", "namespace": "ns"},
            "spec": {"owner": {"kind": "Group", "name": "p"}, "allowedScopes": ["s"],
                     "allowedAudiences": ["https://api"], "maxTokenTTL": "15m"},
        }))
        .unwrap();
        a.spec.service_account_name = service_account.map(Into::into);
        a
    }

    fn requested_by(user: &str) -> serde_json::Value {
        serde_json::json!({"username": user, "groups": ["system:authenticated"]})
    }

    /// A ServiceAccount's identity as the apiserver stamps it from a token bound to a pod.
    fn from_pod(service_account: &str) -> serde_json::Value {
        serde_json::json!({"username": service_account,
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "extra": {"authentication.kubernetes.io/credential-id": ["JTI=1"],
                      POD_NAME_EXTRA: ["orchestrator-7d9"], POD_UID_EXTRA: ["uid-pod"]}})
    }

    #[test]
    fn a_grant_without_a_stamped_requester_is_refused_saying_what_to_install() {
        let g = grant(serde_json::json!({"principal": {"kind": "User", "name": "alice"}}));
        let refusal = requester_check(&g, "ns", None).unwrap_err();
        assert_eq!(refusal.reason, Reason::DeniedRequesterMissing);
        assert!(
            refusal.message.contains("admission-policies"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn a_requester_may_always_delegate_for_itself_but_never_is_a_group() {
        let own = grant(
            serde_json::json!({"principal": {"kind": "User", "name": "alice"},
            "requester": requested_by("alice")}),
        );
        assert_eq!(
            requester_check(&own, "ns", None).unwrap().1,
            RequesterCheck::Itself
        );
        let sa = "system:serviceaccount:ns:robot";
        let own_sa = grant(
            serde_json::json!({"principal": {"kind": "ServiceAccount", "name": sa},
            "requester": from_pod(sa)}),
        );
        assert_eq!(
            requester_check(&own_sa, "ns", None).unwrap().1,
            RequesterCheck::Itself
        );
        let group = grant(
            serde_json::json!({"principal": {"kind": "Group", "name": "alice"},
            "requester": requested_by("alice")}),
        );
        let RequesterCheck::Ask(q) = requester_check(&group, "ns", None).unwrap().1 else {
            panic!("a group principal needs the permission");
        };
        assert_eq!(
            (q.verb, q.resource, q.name.as_str()),
            (DELEGATE, "groups", "alice")
        );
    }

    #[test]
    fn someone_else_needs_delegate_on_the_principal_in_the_namespace() {
        let g = grant(
            serde_json::json!({"principal": {"kind": "User", "name": "cfo@corp.example"},
            "requester": requested_by("mallory")}),
        );
        let (requester, RequesterCheck::Ask(q)) = requester_check(&g, "ns", None).unwrap() else {
            panic!("must ask");
        };
        assert_eq!(
            q,
            AccessQuestion {
                verb: DELEGATE,
                resource: "users",
                name: "cfo@corp.example".into(),
                namespace: "ns".into()
            }
        );
        let refusal = requester_refused(&g, requester, &q);
        assert_eq!(refusal.reason, Reason::DeniedNotAuthorized);
        for word in [
            "mallory",
            "cfo@corp.example",
            "\"delegate\"",
            "\"users\"",
            "\"ns\"",
        ] {
            assert!(
                refusal.message.contains(word),
                "{word} missing: {}",
                refusal.message
            );
        }
    }

    #[test]
    fn a_hop_is_the_parent_actors_workload_or_needs_delegate_on_that_agent() {
        let by_workload = grant(serde_json::json!({"parentGrantRef": {"name": "p"},
            "requester": from_pod("system:serviceaccount:ns:orchestrator-sa")}));
        let workload = agent(Some("orchestrator-sa"));
        assert_eq!(
            requester_check(&by_workload, "ns", Some(&workload))
                .unwrap()
                .1,
            RequesterCheck::Itself
        );
        let by_other_sa = grant(serde_json::json!({"parentGrantRef": {"name": "p"},
            "requester": from_pod("system:serviceaccount:other-ns:orchestrator-sa")}));
        let RequesterCheck::Ask(q) = requester_check(&by_other_sa, "ns", Some(&workload))
            .unwrap()
            .1
        else {
            panic!("a same-named ServiceAccount of another namespace is not the workload");
        };
        assert_eq!(
            (q.resource, q.name.as_str()),
            ("agentidentities", "orchestrator")
        );
        let no_workload = agent(None);
        assert!(matches!(
            requester_check(&by_workload, "ns", Some(&no_workload))
                .unwrap()
                .1,
            RequesterCheck::Ask(_)
        ));
    }

    /// The built-in `edit` role may impersonate the namespace's ServiceAccounts, but not set the
    /// extras a pod-bound token carries: a ServiceAccount's name without them proves nothing.
    #[test]
    fn a_service_account_is_itself_only_from_a_pod_bound_token() {
        let workload = agent(Some("orchestrator-sa"));
        let sa = "system:serviceaccount:ns:orchestrator-sa";
        let mut missing_uid = from_pod(sa);
        missing_uid["extra"]
            .as_object_mut()
            .unwrap()
            .remove(POD_UID_EXTRA);
        let mut empty_name = from_pod(sa);
        empty_name["extra"][POD_NAME_EXTRA] = serde_json::json!([""]);
        let mut no_values = from_pod(sa);
        no_values["extra"][POD_UID_EXTRA] = serde_json::json!([]);
        let not_from_a_pod = [
            requested_by(sa),
            serde_json::json!({"username": sa, "groups": ["system:serviceaccounts"], "extra": {}}),
            missing_uid,
            empty_name,
            no_values,
        ];
        for requester in not_from_a_pod {
            let hop = grant(serde_json::json!({"parentGrantRef": {"name": "p"},
                "requester": requester.clone()}));
            let (who, RequesterCheck::Ask(q)) =
                requester_check(&hop, "ns", Some(&workload)).unwrap()
            else {
                panic!("a hop by {requester} must ask");
            };
            assert_eq!(
                (q.verb, q.resource, q.name.as_str()),
                (DELEGATE, "agentidentities", "orchestrator")
            );
            let message = requester_refused(&hop, who, &q).message;
            for words in [
                "presented no pod-bound",
                "impersonation",
                "\"agentidentities\"",
            ] {
                assert!(message.contains(words), "{words} missing: {message}");
            }

            let own = grant(
                serde_json::json!({"principal": {"kind": "ServiceAccount", "name": sa},
                "requester": requester.clone()}),
            );
            let (who, RequesterCheck::Ask(q)) = requester_check(&own, "ns", None).unwrap() else {
                panic!("a ServiceAccount lending its own authority as {requester} must ask");
            };
            assert_eq!(
                (q.verb, q.resource, q.name.as_str()),
                (DELEGATE, "serviceaccounts", sa)
            );
            let message = requester_refused(&own, who, &q).message;
            for words in [
                "presented no pod-bound",
                "impersonation",
                "\"serviceaccounts\"",
            ] {
                assert!(message.contains(words), "{words} missing: {message}");
            }
        }
        let bound: UserIdentity = serde_json::from_value(from_pod(sa)).unwrap();
        assert_eq!(bound_pod(&bound), Some(("orchestrator-7d9", "uid-pod")));

        // The note is only for a ServiceAccount that would have counted as itself.
        let other = grant(serde_json::json!({"parentGrantRef": {"name": "p"},
            "requester": requested_by("system:serviceaccount:other-ns:orchestrator-sa")}));
        let (who, RequesterCheck::Ask(q)) = requester_check(&other, "ns", Some(&workload)).unwrap()
        else {
            panic!("must ask");
        };
        assert!(
            !requester_refused(&other, who, &q)
                .message
                .contains("presented no")
        );
        let for_sa = grant(
            serde_json::json!({"principal": {"kind": "ServiceAccount", "name": sa},
            "requester": requested_by("system:serviceaccount:ns:someone-else")}),
        );
        let (who, RequesterCheck::Ask(q)) = requester_check(&for_sa, "ns", None).unwrap() else {
            panic!("must ask");
        };
        assert!(
            !requester_refused(&for_sa, who, &q)
                .message
                .contains("presented no")
        );
        // People are not ServiceAccounts: no pod needed.
        let alice = grant(
            serde_json::json!({"principal": {"kind": "User", "name": "alice"},
            "requester": requested_by("alice")}),
        );
        assert_eq!(
            requester_check(&alice, "ns", None).unwrap().1,
            RequesterCheck::Itself
        );
    }

    fn approval(
        name: &str,
        by: &str,
        decision: Decision,
        generation: i64,
        uid: &str,
    ) -> std::sync::Arc<DelegationApproval> {
        let mut a = DelegationApproval::new(
            name,
            DelegationApprovalSpec {
                grant_ref: GrantRef {
                    name: "g".into(),
                    uid: uid.into(),
                },
                generation,
                decision,
                comment: None,
                approver: (!by.is_empty()).then(|| UserIdentity {
                    username: by.into(),
                    ..Default::default()
                }),
            },
        );
        a.metadata.namespace = Some("ns".into());
        a.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(100).unwrap(),
        ));
        std::sync::Arc::new(a)
    }

    #[test]
    fn only_approvals_of_this_grant_and_generation_by_someone_else_may_count_rejections_first() {
        let g = grant(
            serde_json::json!({"principal": {"kind": "User", "name": "alice"},
            "requester": requested_by("alice"), "authors": ["mallory", "alice"]}),
        );
        let approvals = vec![
            approval("ok", "carol", Decision::Approve, 2, "uid-g"),
            approval("no", "dave", Decision::Reject, 2, "uid-g"),
            approval("old-generation", "carol", Decision::Approve, 1, "uid-g"),
            approval(
                "other-grant",
                "carol",
                Decision::Approve,
                2,
                "uid-recreated",
            ),
            approval("self", "alice", Decision::Approve, 2, "uid-g"),
            approval("unstamped", "", Decision::Approve, 2, "uid-g"),
            approval(
                "by-an-earlier-editor",
                "mallory",
                Decision::Approve,
                2,
                "uid-g",
            ),
        ];
        let d = decisions_for(&g, "ns", &approvals, |_| Ok(()));
        let names: Vec<_> = d.candidates.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["no", "ok"]);
        assert_eq!(d.candidates[0].question.verb, APPROVE);
        assert_eq!(d.ignored.len(), 3, "{:?}", d.ignored);
        assert!(d.ignored.iter().any(|m| m.contains("own requester")));
        assert!(
            d.ignored
                .iter()
                .any(|m| m.contains("\"mallory\"") && m.contains("spec.authors"))
        );
        assert!(d.ignored.iter().any(|m| m.contains("no stamped approver")));
    }

    #[test]
    fn approval_is_required_for_all_grants_or_listed_scopes() {
        let g = grant(serde_json::json!({"principal": {"kind": "User", "name": "alice"}}));
        let mut a = agent(None);
        assert!(!approval_required(&g, &a));
        a.spec.require_approval = Some(crate::api::ApprovalRequirement { scopes: None });
        assert!(approval_required(&g, &a));
        a.spec.require_approval = Some(crate::api::ApprovalRequirement {
            scopes: Some(vec!["payments:execute".into()]),
        });
        assert!(!approval_required(&g, &a));
        a.spec.require_approval = Some(crate::api::ApprovalRequirement {
            scopes: Some(vec!["s".into()]),
        });
        assert!(approval_required(&g, &a));
    }

    #[test]
    fn a_service_account_requester_must_still_be_the_one_that_asked() {
        let sa: UserIdentity = serde_json::from_value(serde_json::json!({
            "username": "system:serviceaccount:ns:robot", "uid": "uid-1"}))
        .unwrap();
        assert_eq!(service_account_of(&sa), Some(("ns", "robot")));
        assert_eq!(service_account_gone(&sa, Some("uid-1")), None);
        let deleted = service_account_gone(&sa, None).unwrap();
        assert_eq!(deleted.reason, Reason::DeniedRequesterGone);
        assert!(
            deleted.message.contains("was deleted"),
            "{}",
            deleted.message
        );
        let recreated = service_account_gone(&sa, Some("uid-2")).unwrap();
        assert!(
            recreated.message.contains("another uid"),
            "{}",
            recreated.message
        );
        // Impersonated ServiceAccounts carry no uid: only existence can be checked.
        let no_uid = UserIdentity {
            uid: None,
            ..sa.clone()
        };
        assert_eq!(service_account_gone(&no_uid, Some("uid-2")), None);
        for not_one in [
            "alice",
            "system:serviceaccount:ns",
            "system:serviceaccount:ns:a:b",
        ] {
            let user = UserIdentity {
                username: not_one.into(),
                ..Default::default()
            };
            assert_eq!(service_account_of(&user), None, "{not_one}");
        }
        let q = still_may_ask("ns");
        assert_eq!(
            q.describe(),
            "verb \"create\" on \"delegationgrants\" (API group delegation.nhi.dev) in namespace \"ns\""
        );
        let refusal = no_longer_may_ask(&sa, &q);
        assert_eq!(refusal.reason, Reason::DeniedNotAuthorized);
        assert!(refusal.message.contains("no longer"), "{}", refusal.message);
    }

    #[test]
    fn principal_names_that_read_differently_are_refused() {
        let p = |kind, name: &str| Principal {
            kind,
            name: name.into(),
        };
        assert!(principal_name_problem(&p(PrincipalKind::User, "alice@example.com")).is_none());
        for bad in [
            "ali\u{200B}ce",
            "alice\u{202E}moc.evil",
            "a\tb",
            "a b",
            "\u{FEFF}alice",
            "a\u{2066}b",
        ] {
            assert!(
                principal_name_problem(&p(PrincipalKind::User, bad)).is_some(),
                "{bad:?}"
            );
        }
        assert!(principal_name_problem(&p(PrincipalKind::Group, "system:masters")).is_some());
        assert!(
            principal_name_problem(&p(
                PrincipalKind::ServiceAccount,
                "system:serviceaccount:a:b"
            ))
            .is_none()
        );
    }
}

//! Asking the apiserver who may speak for whom: SubjectAccessReviews of the stamped requester and of
//! approvers, at every issuance and rotation and at least every `--authority-recheck-period` while a
//! token lives (continuous evaluation: removing a RoleBinding ends the delegation).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    api::core::v1::ServiceAccount,
    jiff::Timestamp,
};
use kube::{Api, ResourceExt, api::PostParams};

use crate::operator::{caches::context::Context, error::Result, reporting::events::Recent};
use crate::{
    api::{
        ApprovalState, ApprovalStatus, Decision, DelegationApproval, DelegationGrant, UserIdentity,
    },
    delegation::{
        Lookup, Reason, Refusal,
        authority::{
            AccessQuestion, Evidence, GROUP, RequesterCheck, Unauthorized, approval_required,
            decisions_for, no_longer_may_ask, requester_check, requester_refused,
            service_account_gone, service_account_of, still_may_ask,
        },
        ceilings,
        chain::add,
    },
};

/// The last positive check of each grant (by namespace and name), reused until the recheck period has
/// passed, the grant changes, or something it rests on changes (its agent's spec, an approval of it).
/// Refusals are never reused: a refused grant is looked at afresh every time.
/// Keyed by a hash of namespace and name ([`crate::operator::caches::context::key`]): one entry per grant.
pub struct CheckedAuthority {
    checked: Mutex<HashMap<u64, Checked>>,
    /// Recent "allowed" answers of the apiserver, by a hash of the whole question, holding the
    /// question itself: a hit must be the very same question, not merely the same hash (see [`allowed`]).
    answers: Mutex<Recent<String>>,
}

impl Default for CheckedAuthority {
    fn default() -> Self {
        Self {
            checked: Mutex::default(),
            answers: Mutex::new(Recent::new(SHARED_ANSWER)),
        }
    }
}

/// How long one "allowed" answer serves identical questions: a burst of grants by one requester for
/// one agent asks once, while a removed RoleBinding still counts within a second. Denials are never
/// shared.
const SHARED_ANSWER: Duration = Duration::from_secs(1);

/// One positive check: of which grant (a hash of its uid) and generation, when, and what it found.
/// The approval is boxed: most grants need none, and this is one entry per grant.
struct Checked {
    uid: Option<u64>,
    generation: Option<i64>,
    at: Timestamp,
    approval: Option<Box<ApprovalStatus>>,
    checked_at: Timestamp,
}

impl CheckedAuthority {
    fn get(&self, grant: &DelegationGrant, period: Duration, now: Timestamp) -> Option<Evidence> {
        let map = self.checked.lock().ok()?;
        let checked = map.get(&key(grant))?;
        (checked.uid
            == grant
                .uid()
                .map(|u| crate::operator::caches::context::key(&u))
            && checked.generation == grant.metadata.generation
            && add(checked.at, period) > now)
            .then(|| Evidence {
                approval: checked.approval.as_deref().cloned(),
                checked_at: checked.checked_at,
            })
    }

    fn put(&self, grant: &DelegationGrant, now: Timestamp, evidence: &Evidence) {
        if let Ok(mut map) = self.checked.lock() {
            let checked = Checked {
                uid: grant
                    .uid()
                    .map(|u| crate::operator::caches::context::key(&u)),
                generation: grant.metadata.generation,
                at: now,
                approval: evidence.approval.clone().map(Box::new),
                checked_at: evidence.checked_at,
            };
            map.insert(key(grant), checked);
        }
    }

    fn forget(&self, grant: &DelegationGrant) {
        if let Ok(mut map) = self.checked.lock() {
            map.remove(&key(grant));
        }
    }

    /// Forgets the check of a grant whose grounds changed (its agent, an approval of it).
    pub fn forget_named(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.checked.lock() {
            map.remove(&named_key(namespace, name));
        }
    }

    /// When the grant's authority must be checked again.
    pub fn due_at(&self, grant: &DelegationGrant, period: Duration) -> Option<Timestamp> {
        let map = self.checked.lock().ok()?;
        map.get(&key(grant)).map(|c| add(c.at, period))
    }

    /// Drops what is remembered of a grant that is going away.
    pub fn forget_grant(&self, grant: &DelegationGrant) {
        self.forget(grant);
    }
}

impl CheckedAuthority {
    /// Whether `question` was answered "allowed" less than [`SHARED_ANSWER`] before `now` (`None`:
    /// the present, read under the lock so that the times given to `Recent` never go back).
    fn recently_allowed(&self, question: &str, now: Option<Instant>) -> bool {
        self.answers.lock().is_ok_and(|mut answers| {
            let now = now.unwrap_or_else(Instant::now);
            answers
                .get(crate::operator::caches::context::key(question), now)
                .is_some_and(|answer| answer.value == question)
        })
    }

    fn allowed_at(&self, question: String, now: Option<Instant>) {
        if let Ok(mut answers) = self.answers.lock() {
            let now = now.unwrap_or_else(Instant::now);
            answers.insert(
                crate::operator::caches::context::key(&question),
                question,
                now,
            );
        }
    }
}

fn key(grant: &DelegationGrant) -> u64 {
    named_key(&grant.namespace().unwrap_or_default(), &grant.name_any())
}

fn named_key(namespace: &str, name: &str) -> u64 {
    crate::operator::caches::context::key(&(namespace, name))
}

/// Checks whether the grant's requester may ask for it and, when its agent requires approval, whether
/// an allowed approver approved this generation. `fresh` forces asking the apiserver even when a recent
/// positive answer is remembered (every issuance and rotation asks).
pub async fn evaluate(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
    fresh: bool,
) -> Result<std::result::Result<Evidence, Unauthorized>> {
    // Before any remembered check: trust in the stamp can end at any moment (a policy edited away).
    if let Err(refusal) = requester_stamp(grant, ctx, now) {
        ctx.authority.forget(grant);
        return Ok(Err(Unauthorized {
            refusal,
            approval: None,
        }));
    }
    let period = ctx.settings.authority_recheck_period;
    if !fresh && let Some(evidence) = ctx.authority.get(grant, period, now) {
        return Ok(Ok(evidence));
    }
    let outcome = ask(grant, ctx, now).await?;
    match &outcome {
        Ok(evidence) => ctx.authority.put(grant, now, evidence),
        Err(_) => ctx.authority.forget(grant),
    }
    Ok(outcome)
}

/// Refuses a grant whose stamped requester is not proven (see [`crate::delegation::stamp_trust`]). A
/// grant without a requester passes here: [`requester_check`] refuses it with its own reason.
fn requester_stamp(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> std::result::Result<(), Refusal> {
    if grant
        .spec
        .requester
        .as_ref()
        .is_none_or(|r| r.username.is_empty())
    {
        return Ok(());
    }
    ctx.stamps
        .requester_proven(grant, now)
        .map_err(|problem| Refusal::new(Reason::DeniedRequesterUnverified, problem))
}

async fn ask(
    grant: &DelegationGrant,
    ctx: &Context,
    now: Timestamp,
) -> Result<std::result::Result<Evidence, Unauthorized>> {
    let namespace = grant.namespace().unwrap_or_default();
    let view = ctx.namespace_view(&namespace);
    let parent_actor = grant
        .spec
        .parent_grant_ref
        .as_ref()
        .and_then(|p| view.grant(&p.name))
        .and_then(|p| view.agent(&p.spec.actor_ref.name));
    let unauthorized = |refusal| Unauthorized {
        refusal,
        approval: None,
    };
    let (requester, check) = match requester_check(grant, &namespace, parent_actor.as_deref()) {
        Ok(found) => found,
        Err(refusal) => return Ok(Err(unauthorized(refusal))),
    };
    match &check {
        RequesterCheck::Ask(question) if !allowed(ctx, requester, question).await? => {
            return Ok(Err(unauthorized(requester_refused(
                grant, requester, question,
            ))));
        }
        RequesterCheck::Itself => {
            let question = still_may_ask(&namespace);
            if !allowed(ctx, requester, &question).await? {
                return Ok(Err(unauthorized(no_longer_may_ask(requester, &question))));
            }
        }
        RequesterCheck::Ask(_) => {}
    }
    // Allowed by name; but a ServiceAccount deleted (or re-created) since is not the one that asked.
    if let Some(refusal) = service_account_replaced(ctx, requester).await? {
        return Ok(Err(unauthorized(refusal)));
    }
    let Some(actor) = view.agent(&grant.spec.actor_ref.name) else {
        // Chain resolution has already refused a grant without its agent.
        return Ok(Ok(Evidence {
            approval: None,
            checked_at: now,
        }));
    };
    // The cluster's ceiling for the audience may require approval too; a grant it does not allow
    // is refused by its chain before it gets here, and counts as requiring it (fail closed).
    let policy = ceilings::ceiling(
        grant,
        &namespace,
        &ctx.audience_policies_for(&grant.spec.audience),
        now,
    );
    let required_by = match (approval_required(grant, &actor), &policy) {
        (false, Ok(c)) if !c.approval_required => {
            return Ok(Ok(Evidence {
                approval: None,
                checked_at: now,
            }));
        }
        (true, Ok(c)) if c.approval_required => format!(
            "AgentIdentity {:?} and AudiencePolicy {:?} require",
            grant.spec.actor_ref.name, c.policy
        ),
        (false, Ok(c)) => format!("AudiencePolicy {:?} requires", c.policy),
        (true, _) => format!("AgentIdentity {:?} requires", grant.spec.actor_ref.name),
        (false, Err(_)) => "the grant's AudiencePolicies require".to_string(),
    };
    approval(grant, ctx, &namespace, now, &required_by).await
}

/// Finds the decision of an allowed approver on this generation: a rejection wins over approvals.
async fn approval(
    grant: &DelegationGrant,
    ctx: &Context,
    namespace: &str,
    now: Timestamp,
    required_by: &str,
) -> Result<std::result::Result<Evidence, Unauthorized>> {
    let generation = grant.metadata.generation.unwrap_or_default();
    let approvals: Vec<std::sync::Arc<DelegationApproval>> = ctx
        .approvals
        .state()
        .into_iter()
        .filter(|a| a.namespace().as_deref() == Some(namespace))
        .collect();
    let mut decisions = decisions_for(grant, namespace, &approvals, |approval| {
        ctx.stamps.approver_proven(approval, now)
    });
    for candidate in &decisions.candidates {
        if !allowed(ctx, &candidate.approver, &candidate.question).await? {
            decisions.ignored.push(format!(
                "{:?} by {:?} does not count: it needs {}",
                candidate.name,
                candidate.approver.username,
                candidate.question.describe()
            ));
            continue;
        }
        let status = ApprovalStatus {
            state: match candidate.decision {
                Decision::Approve => ApprovalState::Approved,
                Decision::Reject => ApprovalState::Rejected,
            },
            generation,
            approval: Some(candidate.name.clone()),
            approver: Some(candidate.approver.username.clone()),
        };
        if candidate.decision == Decision::Reject {
            let refusal = Refusal::new(
                Reason::ApprovalRejected,
                format!(
                    "{:?} rejected generation {generation} of this grant (DelegationApproval {:?}); change the grant and ask again",
                    candidate.approver.username, candidate.name
                ),
            );
            return Ok(Err(Unauthorized {
                refusal,
                approval: Some(status),
            }));
        }
        return Ok(Ok(Evidence {
            approval: Some(status),
            checked_at: now,
        }));
    }
    let name = grant.name_any();
    let mut message = format!(
        "{required_by} approval: waiting for someone allowed verb \"approve\" on \"delegationgrants\" named {name:?} (API group {GROUP}) to approve generation {generation}, e.g. `delegation-operator approve {name} -n {namespace}`"
    );
    if !decisions.ignored.is_empty() {
        message += &format!("; not counted: {}", decisions.ignored.join("; "));
    }
    Ok(Err(Unauthorized {
        refusal: Refusal::new(Reason::ApprovalPending, message),
        approval: Some(ApprovalStatus {
            state: ApprovalState::Pending,
            generation,
            approval: None,
            approver: None,
        }),
    }))
}

/// When the requester is a ServiceAccount: the refusal if it was deleted, or re-created with another
/// uid, since it asked (read from the apiserver at each check; they are few, and a cache of every
/// ServiceAccount would cost more than these reads).
async fn service_account_replaced(
    ctx: &Context,
    requester: &UserIdentity,
) -> Result<Option<Refusal>> {
    let Some((namespace, name)) = service_account_of(requester) else {
        return Ok(None);
    };
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    let found = api.get_metadata_opt(name).await?;
    let uid = found.as_ref().and_then(|sa| sa.metadata.uid.as_deref());
    Ok(service_account_gone(requester, uid))
}

/// One SubjectAccessReview: may this authenticated user do what the question asks? Uses everything
/// the apiserver stamped (name, uid, groups, extra), so RBAC sees the user as it authenticated.
async fn allowed(ctx: &Context, user: &UserIdentity, question: &AccessQuestion) -> Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.username.clone()),
            uid: user.uid().map(str::to_owned),
            groups: user.groups.clone(),
            extra: user.extra.as_ref().map(|extra| {
                extra
                    .iter()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect()
            }),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(question.resource.into()),
                verb: Some(question.verb.into()),
                // An empty name asks about every object of the resource (e.g. `create`).
                name: (!question.name.is_empty()).then(|| question.name.clone()),
                namespace: Some(question.namespace.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    // The whole spec is the question: same user (name, uid, groups, extra) and same attributes.
    let question = serde_json::to_string(&review.spec)?;
    if ctx.authority.recently_allowed(&question, None) {
        return Ok(true);
    }
    let api: Api<SubjectAccessReview> = Api::all(ctx.client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    let allowed = answer
        .status
        .is_some_and(|s| s.allowed && s.denied != Some(true));
    if allowed {
        ctx.authority.allowed_at(question, None);
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allowed_answer_serves_the_same_question_for_a_second_only() {
        let authority = CheckedAuthority::default();
        let t0 = Instant::now();
        assert!(
            !authority.recently_allowed("q1", Some(t0)),
            "nothing asked yet"
        );
        authority.allowed_at("q1".into(), Some(t0));
        let soon = t0 + Duration::from_millis(999);
        assert!(authority.recently_allowed("q1", Some(soon)));
        assert!(
            !authority.recently_allowed("q2", Some(soon)),
            "another question is asked afresh"
        );
        assert!(
            !authority.recently_allowed("q1", Some(t0 + SHARED_ANSWER)),
            "an answer a second old is asked again"
        );
    }

    #[test]
    fn an_answer_counts_only_for_the_very_same_question_not_its_hash() {
        let authority = CheckedAuthority::default();
        let t0 = Instant::now();
        // As if another question had the victim's hash: its answer must not serve the victim.
        authority.answers.lock().unwrap().insert(
            crate::operator::caches::context::key("victim"),
            "another question".into(),
            t0,
        );
        assert!(!authority.recently_allowed("victim", Some(t0)));
    }

    #[test]
    fn remembered_answers_stay_bounded() {
        let authority = CheckedAuthority::default();
        let t0 = Instant::now();
        for question in 0..5000 {
            authority.allowed_at(question.to_string(), Some(t0));
        }
        assert_eq!(authority.answers.lock().unwrap().len(), 5000, "all fresh");
        let later = t0 + SHARED_ANSWER;
        for question in 10_000..20_000 {
            authority.allowed_at(question.to_string(), Some(later));
        }
        assert_eq!(
            authority.answers.lock().unwrap().len(),
            10_000,
            "the 5,000 expired answers are gone"
        );
        assert!(
            (10_000..20_000).all(|q| authority.recently_allowed(&q.to_string(), Some(later))),
            "fresh answers are kept"
        );
    }
}

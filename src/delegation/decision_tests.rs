//! The grant decision driven through every reason and every invariant, without a cluster: a grant,
//! its agent, the facts a reconcile would gather, and the verdict.

use std::{collections::HashMap, sync::Arc, time::Duration as StdDuration};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use proptest::prelude::*;

use super::*;
use crate::{
    api::*,
    delegation::{Lookup, Policy, chain::resolve, conditions::set_ready},
};

const NS: &str = "support";
const ISSUER: &str = "https://issuer.example.com";
const RECHECK: StdDuration = StdDuration::from_secs(300);

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).unwrap()
}

/// The moment every test decides at.
fn now() -> Timestamp {
    ts(1_800_000_000)
}

struct World {
    agents: HashMap<String, Arc<AgentIdentity>>,
}

impl Lookup for World {
    fn grant(&self, _name: &str) -> Option<Arc<DelegationGrant>> {
        None
    }
    fn agent(&self, name: &str) -> Option<Arc<AgentIdentity>> {
        self.agents.get(name).cloned()
    }
    fn record(&self, _grant: &DelegationGrant) -> Option<crate::delegation::record::TokenRecord> {
        None
    }
    /// No ceilings of its own: every audience declared for everything the agents allow.
    fn audience_policies(&self, audience: &str) -> Vec<Arc<AudiencePolicy>> {
        let scopes = self
            .agents
            .values()
            .flat_map(|a| a.spec.allowed_scopes.clone())
            .collect();
        crate::delegation::ceilings::tests::open_policies(audience, scopes, Vec::new())
    }
}

fn world() -> World {
    let agent = AgentIdentity {
        metadata: ObjectMeta {
            name: Some("triage".into()),
            namespace: Some(NS.into()),
            uid: Some("uid-triage".into()),
            generation: Some(1),
            ..Default::default()
        },
        spec: AgentIdentitySpec {
            owner: Owner {
                kind: OwnerKind::Group,
                name: "platform".into(),
            },
            service_account_name: None,
            allowed_scopes: vec!["tickets:read".into(), "tickets:write".into()],
            allowed_audiences: vec!["https://api".into()],
            max_token_ttl: crate::api::Duration::from("1h"),
            delegation: None,
            require_approval: None,
            suspended: None,
            token_delivery: None,
            require_proof_of_possession: None,
        },
        status: None,
    };
    World {
        agents: HashMap::from([("triage".into(), Arc::new(agent))]),
    }
}

/// A grant for alice, acted on by `triage`, with no status yet.
fn grant() -> DelegationGrant {
    DelegationGrant {
        metadata: ObjectMeta {
            name: Some("g".into()),
            namespace: Some(NS.into()),
            uid: Some("uid-g".into()),
            generation: Some(1),
            ..Default::default()
        },
        spec: DelegationGrantSpec {
            principal: Some(Principal {
                kind: PrincipalKind::User,
                name: "alice@example.com".into(),
            }),
            parent_grant_ref: None,
            actor_ref: LocalRef::new("triage"),
            authors: None,
            requester: Some(Arc::new(UserIdentity {
                username: "alice@example.com".into(),
                ..Default::default()
            })),
            scopes: vec!["tickets:read".into()],
            audience: "https://api".into(),
            token_ttl: crate::api::Duration::from("10m"),
            renew_before: None,
            valid_until: None,
            authorization_details: None,
            token_delivery: None,
            secret_name: None,
            suspended: None,
        },
        status: None,
    }
}

fn resolved(grant: &DelegationGrant) -> Result<Resolution, Refusal> {
    resolve(grant, NS, &world(), &Policy::default(), now())
}

fn evidence(at: Timestamp) -> Result<Evidence, Unauthorized> {
    Ok(Evidence {
        approval: None,
        checked_at: at,
    })
}

/// The grant as the operator leaves it after issuing from `resolution` at `issued` (expiring after
/// ten minutes, renewed after seven), and the substance of the token it minted.
fn issued(mut grant: DelegationGrant, issued: i64) -> (DelegationGrant, u64) {
    let resolution = resolved(&grant).unwrap();
    let (exp, renew) = (issued + 600, issued + 420);
    grant.status = Some(DelegationGrantStatus {
        conditions: Some(set_ready(
            None,
            true,
            "Issued",
            "issued",
            Some(1),
            ts(issued),
        )),
        observed_generation: Some(1),
        chain: Some(resolution.chain.clone()),
        effective_scopes: Some(resolution.effective_scopes.clone()),
        token: Some(TokenStatus {
            id: "00000000-0000-4000-8000-000000000001".into(),
            key_id: "kid-1".into(),
            issued_at: Time(ts(issued)),
            expires_at: Time(ts(exp)),
            renewal_time: Time(ts(renew)),
            claims_digest: Some(claims_digest(&grant.spec)),
        }),
        secret_name: Some("g-token".into()),
        ..Default::default()
    });
    let minted = {
        let fresh = evidence(now());
        let ok = resolution_ok(&resolution);
        let facts = base(&grant, &ok, Some(&fresh), None);
        expected_substance(&facts, &resolution, "uid-g".into()).unwrap()
    };
    (grant, minted)
}

fn resolution_ok(r: &Resolution) -> Result<Resolution, Refusal> {
    Ok(r.clone())
}

/// Facts with an intact Secret, a published key, no remembered authority due, and `minted`.
fn base<'a>(
    grant: &'a DelegationGrant,
    resolved: &'a Result<Resolution, Refusal>,
    authority: Option<&'a Result<Evidence, Unauthorized>>,
    minted: Option<u64>,
) -> Facts<'a> {
    Facts {
        grant,
        issuer: ISSUER,
        resolved,
        authority,
        secret: Some(SecretHolder::Ours(SecretState::Intact)),
        minted,
        key_published: true,
        authority_due: None,
        authority_recheck: RECHECK,
        now: now(),
    }
}

fn cause(verdict: &Verdict) -> IssueCause {
    match verdict {
        Verdict::Issue(issue) => issue.cause,
        other => panic!("expected an issuance, got {other:?}"),
    }
}

fn refused(verdict: &Verdict) -> &Refused {
    match verdict {
        Verdict::Refuse(refused) => refused,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_new_grant_gets_its_first_token() {
    let g = grant();
    let r = resolved(&g);
    let a = evidence(now());
    let mut facts = base(&g, &r, Some(&a), None);
    facts.secret = Some(SecretHolder::Ours(SecretState::Missing));
    let verdict = decide(&facts);
    let Verdict::Issue(issue) = &verdict else {
        panic!("{verdict:?}")
    };
    assert_eq!(issue.cause, IssueCause::First);
    assert!(issue.first, "the first token is Issued, not Rotated");
    assert_eq!(issue.revoke, Revoke::AllButCurrent);
    assert_eq!(issue.resolution, r.clone().unwrap());
}

#[test]
fn a_parent_being_updated_makes_the_grant_wait() {
    let g = grant();
    let r = Err(Refusal::new(Reason::ParentUpdating, "wait"));
    assert_eq!(
        decide(&base(&g, &r, None, None)),
        Verdict::Wait(PARENT_UPDATING_RECHECK)
    );
}

#[test]
fn a_chain_that_does_not_resolve_is_refused_with_its_reason_and_revokes_everything() {
    let mut g = grant();
    g.spec.scopes = vec!["tickets:admin".into()];
    let r = resolved(&g);
    let verdict = decide(&base(&g, &r, None, None));
    let refused = refused(&verdict);
    assert_eq!(refused.refusal.reason, Reason::DeniedScopeNotAllowed);
    assert_eq!(refused.revoke, Revoke::Every);
    assert_eq!(
        refused.look_again, None,
        "a change of the grant brings the next look"
    );
}

#[test]
fn unchecked_authority_is_refused_fail_closed() {
    let g = grant();
    let r = resolved(&g);
    let verdict = decide(&base(&g, &r, None, None));
    assert_eq!(
        refused(&verdict).refusal.reason,
        Reason::DeniedNotAuthorized
    );
}

#[test]
fn a_requester_without_authority_is_refused_and_looked_at_again() {
    let g = grant();
    let r = resolved(&g);
    let a = Err(Unauthorized {
        refusal: Refusal::new(Reason::DeniedNotAuthorized, "bob may not"),
        approval: None,
    });
    let verdict = decide(&base(&g, &r, Some(&a), None));
    let refused = refused(&verdict);
    assert_eq!(refused.refusal.message, "bob may not");
    assert_eq!(refused.revoke, Revoke::Every);
    assert_eq!(
        refused.look_again,
        Some(RECHECK),
        "RBAC changes send no events"
    );
}

#[test]
fn a_pending_approval_is_refused_with_the_approval_state() {
    let g = grant();
    let r = resolved(&g);
    let approval = ApprovalStatus {
        state: ApprovalState::Pending,
        generation: 1,
        approval: None,
        approver: None,
    };
    let a = Err(Unauthorized {
        refusal: Refusal::new(Reason::ApprovalPending, "waiting for an approver"),
        approval: Some(approval.clone()),
    });
    let verdict = decide(&base(&g, &r, Some(&a), None));
    let refused = refused(&verdict);
    assert_eq!(refused.refusal.reason, Reason::ApprovalPending);
    assert_eq!(refused.approval, Some(approval));
    assert_eq!(refused.look_again, None, "an approval wakes the grant");
}

#[test]
fn a_foreign_secret_is_never_taken_over() {
    let (g, minted) = issued(grant(), 1_800_000_000 - 60);
    let r = resolved(&g);
    let a = evidence(now());
    let mut facts = base(&g, &r, Some(&a), Some(minted));
    facts.secret = Some(SecretHolder::Foreign);
    let verdict = decide(&facts);
    let refused = refused(&verdict);
    assert_eq!(refused.refusal.reason, Reason::SecretConflict);
    assert!(refused.refusal.message.contains("\"g-token\""));
    assert_eq!(refused.revoke, Revoke::Every);
    assert_eq!(refused.look_again, Some(SECRET_CONFLICT_RECHECK));
}

#[test]
fn a_current_token_is_kept_until_its_renewal_or_the_authority_recheck() {
    let (g, minted) = issued(grant(), 1_800_000_000 - 60);
    let r = resolved(&g);
    let a = evidence(ts(1_800_000_000 - 60));
    let mut facts = base(&g, &r, Some(&a), Some(minted));
    assert_eq!(
        decide(&facts),
        Verdict::Keep(Keep {
            look_again: StdDuration::from_secs(360),
            acknowledge_generation: false,
        }),
        "renewal at issued + 420 s, now is issued + 60 s"
    );
    facts.authority_due = Some(ts(1_800_000_100));
    assert_eq!(
        decide(&facts),
        Verdict::Keep(Keep {
            look_again: StdDuration::from_secs(100),
            acknowledge_generation: false,
        }),
        "the authority re-check comes first"
    );
}

/// What a case may change of the facts besides the grant.
struct Knobs {
    now: Timestamp,
    minted: Option<u64>,
    secret: SecretHolder,
    key_published: bool,
}

type Change = fn(&mut DelegationGrant, &mut Knobs);

#[test]
fn each_reason_for_a_new_token_has_its_cause_and_its_revocation() {
    let issued_at = 1_800_000_000 - 60;
    let cases: [(&str, Change, IssueCause, Revoke); 10] = [
        (
            "renewal time reached",
            |_, k| k.now = ts(1_800_000_000 - 60 + 421),
            IssueCause::Renewal,
            Revoke::AllButCurrent,
        ),
        (
            "expired",
            |_, k| k.now = ts(1_800_000_000 - 60 + 700),
            IssueCause::Renewal,
            Revoke::AllButCurrent,
        ),
        (
            "nothing remembered of what was minted",
            |_, k| k.minted = None,
            IssueCause::GrantChanged,
            Revoke::Every,
        ),
        (
            "the minted substance differs",
            |_, k| k.minted = k.minted.map(|m| m ^ 1),
            IssueCause::GrantChanged,
            Revoke::Every,
        ),
        (
            "the Secret was deleted (its token is taken as leaked)",
            |_, k| k.secret = SecretHolder::Ours(SecretState::Missing),
            IssueCause::SecretMissing,
            Revoke::Every,
        ),
        (
            "the Secret was altered",
            |_, k| k.secret = SecretHolder::Ours(SecretState::Changed),
            IssueCause::SecretChanged,
            Revoke::Every,
        ),
        (
            "the signing key was revoked",
            |_, k| k.key_published = false,
            IssueCause::KeyRevoked,
            Revoke::Every,
        ),
        (
            "the status was not written for this grant (not Ready)",
            |g, _| {
                let status = g.status.as_mut().unwrap();
                status.conditions = Some(set_ready(None, false, "X", "x", Some(1), now()));
            },
            IssueCause::GrantChanged,
            Revoke::Every,
        ),
        (
            "the audience or details changed (claims digest)",
            |g, _| {
                g.status
                    .as_mut()
                    .unwrap()
                    .token
                    .as_mut()
                    .unwrap()
                    .claims_digest = Some("other".into())
            },
            IssueCause::GrantChanged,
            Revoke::Every,
        ),
        (
            "the Secret name changed",
            |g, _| g.spec.secret_name = Some("elsewhere".into()),
            IssueCause::GrantChanged,
            Revoke::Every,
        ),
    ];
    for (what, change, want_cause, want_revoke) in cases {
        let (mut g, minted) = issued(grant(), issued_at);
        let mut knobs = Knobs {
            now: now(),
            minted: Some(minted),
            secret: SecretHolder::Ours(SecretState::Intact),
            key_published: true,
        };
        change(&mut g, &mut knobs);
        let r = resolve(&g, NS, &world(), &Policy::default(), knobs.now);
        let a = evidence(knobs.now);
        let facts = Facts {
            now: knobs.now,
            minted: knobs.minted,
            secret: Some(knobs.secret),
            key_published: knobs.key_published,
            ..base(&g, &r, Some(&a), None)
        };
        let verdict = decide(&facts);
        assert_eq!(cause(&verdict), want_cause, "{what}");
        let Verdict::Issue(issue) = verdict else {
            unreachable!()
        };
        assert_eq!(issue.revoke, want_revoke, "{what}");
        assert!(!issue.first, "{what}: a replacement is Rotated");
    }
}

/// A token delivered to pods is described by a status that names no Secret; a change of delivery,
/// or an agent that comes to require proof of possession, replaces it and revokes it (with every
/// token delivered or exchanged from it), whatever the status says.
#[test]
fn a_change_of_delivery_or_of_proof_replaces_and_revokes_the_token() {
    use crate::delegation::delivery::Delivery;
    let (mut g, minted_for_secret) = issued(grant(), 1_800_000_000 - 60);
    let a = evidence(now());
    let pod = |g: &DelegationGrant, proof_required| {
        let mut r = resolved(g).unwrap();
        r.delivery = Delivery::Pod { proof_required };
        r
    };
    let replaced = |verdict: Verdict| match verdict {
        Verdict::Issue(issue) => {
            assert_eq!(issue.cause, IssueCause::GrantChanged);
            assert_eq!(issue.revoke, Revoke::Every);
        }
        other => panic!("expected a new token, got {other:?}"),
    };
    // The Secret-delivered token, asked for Pod delivery: its status names a Secret.
    replaced(decide(&base(
        &g,
        &Ok(pod(&g, false)),
        Some(&a),
        Some(minted_for_secret),
    )));

    g.status.as_mut().unwrap().secret_name = None;
    let unbound = Ok(pod(&g, false));
    let minted = expected_substance(
        &base(&g, &unbound, Some(&a), None),
        &pod(&g, false),
        "uid-g".into(),
    );
    assert_ne!(
        minted,
        Some(minted_for_secret),
        "the delivery is part of it"
    );
    let kept = decide(&base(&g, &unbound, Some(&a), minted));
    assert!(matches!(kept, Verdict::Keep(_)), "{kept:?}");
    // The agent now requires proof of possession: the unbound lineage goes.
    replaced(decide(&base(&g, &Ok(pod(&g, true)), Some(&a), minted)));
    // Back to Secret delivery: a status that names no Secret does not describe it.
    replaced(decide(&base(&g, &resolved(&g), Some(&a), minted)));
}

#[test]
fn a_tightened_limit_replaces_a_token_that_would_outlive_it() {
    for tighten in [
        |g: &mut DelegationGrant| g.spec.token_ttl = crate::api::Duration::from("2m"),
        |g: &mut DelegationGrant| g.spec.valid_until = Some(Time(ts(1_800_000_100))),
    ] {
        let (mut g, minted) = issued(grant(), 1_800_000_000 - 60);
        tighten(&mut g);
        let r = resolved(&g);
        let a = evidence(now());
        let verdict = decide(&base(&g, &r, Some(&a), Some(minted)));
        assert_eq!(cause(&verdict), IssueCause::OutlivesLimit);
    }
}

#[test]
fn a_wider_scope_is_a_changed_grant_even_when_the_status_is_forged() {
    let (mut g, minted) = issued(grant(), 1_800_000_000 - 60);
    g.spec.scopes = vec!["tickets:read".into(), "tickets:write".into()];
    let r = resolved(&g);
    // Someone who may write the status makes it describe the wider grant.
    let forged = r.clone().unwrap();
    let status = g.status.as_mut().unwrap();
    status.chain = Some(forged.chain.clone());
    status.effective_scopes = Some(forged.effective_scopes.clone());
    let a = evidence(now());
    let verdict = decide(&base(&g, &r, Some(&a), Some(minted)));
    assert_eq!(cause(&verdict), IssueCause::GrantChanged, "{verdict:?}");
}

#[test]
fn a_token_is_issued_only_on_evidence_taken_now() {
    let (g, minted) = issued(grant(), 1_800_000_000 - 600);
    let r = resolved(&g);
    let stale = evidence(ts(1_800_000_000 - 10));
    assert_eq!(
        decide(&base(&g, &r, Some(&stale), Some(minted))),
        Verdict::Confirm(IssueCause::Renewal)
    );
    let fresh = evidence(now());
    assert_eq!(
        cause(&decide(&base(&g, &r, Some(&fresh), Some(minted)))),
        IssueCause::Renewal
    );
}

#[test]
fn the_approver_of_the_evidence_is_named_on_the_last_hop() {
    let g = grant();
    let r = resolved(&g);
    let a = Ok(Evidence {
        approval: Some(ApprovalStatus {
            state: ApprovalState::Approved,
            generation: 1,
            approval: Some("ok".into()),
            approver: Some("carol@example.com".into()),
        }),
        checked_at: now(),
    });
    let mut facts = base(&g, &r, Some(&a), None);
    facts.secret = Some(SecretHolder::Ours(SecretState::Missing));
    let Verdict::Issue(issue) = decide(&facts) else {
        panic!()
    };
    let last = issue.resolution.chain.last().unwrap();
    assert_eq!(last.approved_by.as_deref(), Some("carol@example.com"));
}

#[test]
fn a_timing_edit_the_token_survives_only_acknowledges_the_generation() {
    let (mut g, minted) = issued(grant(), 1_800_000_000 - 60);
    g.metadata.generation = Some(2);
    g.spec.renew_before = Some(crate::api::Duration::from("1m"));
    let r = resolved(&g);
    let a = evidence(now());
    let verdict = decide(&base(&g, &r, Some(&a), Some(minted)));
    assert!(
        matches!(
            verdict,
            Verdict::Keep(Keep {
                acknowledge_generation: true,
                ..
            })
        ),
        "{verdict:?}"
    );
}

// ---- properties ---------------------------------------------------------------------------------

/// Arbitrary facts around one grant: a valid or refused chain, any authority answer, any Secret,
/// any memory of what was minted, any key state, any moment in the token's life.
#[derive(Clone, Debug)]
struct Scenario {
    issued: bool,
    wider_scope: bool,
    chain_refused: bool,
    authority: u8,
    secret: u8,
    minted: u8,
    key_published: bool,
    fresh: bool,
    elapsed: i64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.2),
        0u8..4,
        0u8..4,
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        0i64..900,
    )
        .prop_map(
            |(
                issued,
                wider_scope,
                chain_refused,
                authority,
                secret,
                minted,
                key,
                fresh,
                elapsed,
            )| {
                Scenario {
                    issued,
                    wider_scope,
                    chain_refused,
                    authority,
                    secret,
                    minted,
                    key_published: key,
                    fresh,
                    elapsed,
                }
            },
        )
}

proptest! {
    #[test]
    fn the_decision_keeps_its_invariants(s in scenario()) {
        let issued_at = 1_800_000_000 - s.elapsed;
        let (mut g, substance) = if s.issued { issued(grant(), issued_at) } else { (grant(), 0) };
        if s.wider_scope {
            g.spec.scopes.push("tickets:write".into());
        }
        if s.chain_refused {
            g.spec.suspended = Some(true);
        }
        let r = resolved(&g);
        let authority = match s.authority {
            0 => None,
            1 => Some(Err(Unauthorized {
                refusal: Refusal::new(Reason::DeniedNotAuthorized, "no"),
                approval: None,
            })),
            _ => Some(evidence(if s.fresh { now() } else { ts(1_800_000_000 - 5) })),
        };
        let secret = match s.secret {
            0 => Some(SecretHolder::Foreign),
            1 => Some(SecretHolder::Ours(SecretState::Missing)),
            2 => Some(SecretHolder::Ours(SecretState::Changed)),
            _ => Some(SecretHolder::Ours(SecretState::Intact)),
        };
        let minted = match s.minted {
            0 => None,
            1 => Some(substance ^ 1),
            _ => Some(substance),
        };
        let facts = Facts {
            secret,
            minted,
            key_published: s.key_published,
            ..base(&g, &r, authority.as_ref(), None)
        };
        let verdict = decide(&facts);
        let allowed = match (&r, &authority) {
            (Ok(resolution), Some(Ok(evidence))) => Some(approved(resolution, evidence)),
            _ => None,
        };
        match &verdict {
            Verdict::Refuse(refused) => {
                // A refusal always revokes every token.
                prop_assert_eq!(refused.revoke, Revoke::Every);
            }
            Verdict::Issue(issue) => {
                // Never a token beyond what the chain allows, and only on evidence taken now.
                prop_assert_eq!(Some(&issue.resolution), allowed.as_ref());
                prop_assert_eq!(issue.evidence.checked_at, now());
                prop_assert_ne!(secret, Some(SecretHolder::Foreign));
                // The current token survives only a renewal or a first issuance (listed here, not
                // taken from the code under test).
                let keeps_current = matches!(issue.cause, IssueCause::First | IssueCause::Renewal);
                prop_assert_eq!(issue.revoke == Revoke::AllButCurrent, keeps_current);
            }
            Verdict::Keep(_) => {
                // Never keep a token whose recorded substance differs from what the grant allows
                // now, nor one in a Secret that is not intact, nor one whose key is revoked.
                let allowed = allowed.as_ref();
                prop_assert!(allowed.is_some());
                prop_assert!(s.issued && minted == Some(substance) && !s.wider_scope);
                prop_assert_eq!(secret, Some(SecretHolder::Ours(SecretState::Intact)));
                prop_assert!(s.key_published);
            }
            Verdict::Confirm(_) => prop_assert!(allowed.is_some() && !s.fresh),
            Verdict::Wait(_) => prop_assert!(false, "no parent in these scenarios"),
        }
        // Whatever the chain or the apiserver refused is refused, and nothing else decides first.
        if r.is_err() || !matches!(authority, Some(Ok(_))) || secret == Some(SecretHolder::Foreign) {
            prop_assert!(matches!(verdict, Verdict::Refuse(_)), "{:?}", verdict);
        }
    }
}

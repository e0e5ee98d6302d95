//! When a stamp written by the admission policies is evidence: the pure half of stamp trust.
//!
//! A stamped `spec.requester` (or `spec.approver`) proves who wrote the object only if the apiserver
//! applied the stamping MutatingAdmissionPolicy and the ValidatingAdmissionPolicy that checks the stamp
//! when the object was written. The operator therefore holds the policies and their bindings as they
//! are in the cluster against the ones it ships ([`crate::admission::documents`]): they are *in force*
//! when each exists, is not being deleted, and its spec says everything the shipped spec says
//! ([`spec_holds`]). Only the spec is compared, so a Helm-installed copy (generated from the same YAML
//! by `hack/helm.sh sync-chart`, with other labels and annotations) counts as the same policy.
//!
//! [`Trust`] says whether they are in force now, and since when the operator relies on it
//! ([`TrustSpan`]); [`judge_generation`] says whether one generation of an object was written under it.

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::authority::STAMP_SETTLE;
use super::chain::add;

/// The admission objects that make one stamp evidence: the policy that stamps it and the policy that
/// checks it, each with its binding (named like the policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamping {
    /// The stamped field, for messages (`spec.requester`).
    pub field: &'static str,
    /// The MutatingAdmissionPolicy (and binding) that writes the stamp.
    pub stamp_policy: &'static str,
    /// The ValidatingAdmissionPolicy (and binding) that refuses a stamp that is not the caller.
    pub check_policy: &'static str,
}

/// The requester of a DelegationGrant.
pub const REQUESTER: Stamping = Stamping {
    field: "spec.requester",
    stamp_policy: "delegation-operator-stamp-requester",
    check_policy: "delegation-operator-grant-authority",
};

/// The approver of a DelegationApproval.
pub const APPROVER: Stamping = Stamping {
    field: "spec.approver",
    stamp_policy: "delegation-operator-stamp-approver",
    check_policy: "delegation-operator-approval-authority",
};

/// How to put the admission policies back as the operator ships them. Forcing, as a weakening edit by
/// another field manager owns the fields it changed; a set such as `validationActions` would then be
/// merged rather than replaced, which `kubectl replace` avoids.
pub const INSTALL_HINT: &str = "`delegation-operator admission-policies | kubectl apply --server-side \
     --force-conflicts -f -`, or `kubectl replace -f -` for an edited list";

impl Stamping {
    /// The (kind, name) of the four objects, in the order they are reported.
    pub fn objects(&self) -> [(&'static str, &'static str); 4] {
        [
            ("MutatingAdmissionPolicy", self.stamp_policy),
            ("MutatingAdmissionPolicyBinding", self.stamp_policy),
            ("ValidatingAdmissionPolicy", self.check_policy),
            ("ValidatingAdmissionPolicyBinding", self.check_policy),
        ]
    }

    /// Whether the shipped stamping policy stamps again on UPDATE: then every spec change carries its
    /// own author's stamp; otherwise the creator's stamp stays (the checking policy keeps it unchanged).
    pub fn restamps_on_update(&self, documents: &[Value]) -> bool {
        documents
            .iter()
            .find(|d| {
                d["kind"] == "MutatingAdmissionPolicy" && d["metadata"]["name"] == self.stamp_policy
            })
            .and_then(|d| d["spec"]["matchConstraints"]["resourceRules"].as_array())
            .is_some_and(|rules| {
                rules.iter().any(|r| {
                    r["operations"]
                        .as_array()
                        .is_some_and(|ops| ops.iter().any(|o| o == "UPDATE" || o == "*"))
                })
            })
    }
}

/// One admission object as the cluster has it.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub spec: Value,
    pub created: Option<Timestamp>,
    /// `metadata.generation`: 1 while the spec never changed since the object was created.
    pub generation: Option<i64>,
    pub deleting: bool,
}

/// What makes the policies of one stamping in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InForce {
    /// The latest creation of the four objects.
    pub created: Option<Timestamp>,
    /// No spec of the four changed since it was created: they were in force, as they are now,
    /// ever since.
    pub unchanged: bool,
}

/// Whether the policies and bindings of `stamping` are in force: `Ok` with their creation and
/// history ([`InForce`]), or the first problem in words (what is missing or differs, and how to fix it).
/// `documents` are the shipped ones; `observed` finds an object by kind and name.
pub fn in_force<'a>(
    stamping: &Stamping,
    documents: &[Value],
    observed: impl Fn(&str, &str) -> Option<&'a Observed>,
) -> Result<InForce, String> {
    let mut found = InForce {
        created: None,
        unchanged: true,
    };
    for (kind, name) in stamping.objects() {
        let shipped = documents
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name);
        let problem = match (shipped, observed(kind, name)) {
            (None, _) => Some(format!(
                "{kind} {name} is not among the operator's own policies"
            )),
            (_, None) => Some(format!("{kind} {name} is missing")),
            (_, Some(o)) if o.deleting => Some(format!("{kind} {name} is being deleted")),
            (Some(shipped), Some(o)) => spec_holds(&shipped["spec"], &o.spec, "spec")
                .err()
                .map(|diff| format!("{kind} {name} differs from the operator's: {diff}")),
        };
        if let Some(problem) = problem {
            return Err(format!(
                "{problem}, so nothing proves who wrote {}; put the admission policies back as the \
                 operator ships them ({INSTALL_HINT})",
                stamping.field
            ));
        }
        if let Some(o) = observed(kind, name) {
            found.created = found.created.max(o.created);
            found.unchanged &= o.generation == Some(1);
        }
    }
    Ok(found)
}

/// Fields the apiserver fills in when a manifest leaves them out, with the value it gives them: an
/// object may carry them beyond what the shipped spec says.
const DEFAULTED: [(&str, &str); 3] = [
    ("matchPolicy", "Equivalent"),
    ("scope", "*"),
    ("failurePolicy", "Fail"),
];

/// Whether `actual` says everything `expected` says: every field of `expected` is in `actual` with an
/// equal value (lists: the same length, element by element). A field only `actual` has must be empty
/// or hold the apiserver's default ([`DEFAULTED`]): an added `matchConditions` or `matchResources`
/// narrows what a policy sees. `Err` names the first difference by its path.
pub fn spec_holds(expected: &Value, actual: &Value, path: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                let at = format!("{path}.{key}");
                match have.get(key) {
                    Some(found) => spec_holds(value, found, &at)?,
                    None => return Err(format!("{at} is missing")),
                }
            }
            for (key, value) in have.iter().filter(|(k, _)| !want.contains_key(*k)) {
                if !is_default(key, value) {
                    return Err(format!(
                        "{path}.{key} is set ({value}), the operator's has none"
                    ));
                }
            }
            Ok(())
        }
        (Value::Array(want), Value::Array(have)) => {
            if want.len() != have.len() {
                return Err(format!(
                    "{path} has {} entries, the operator's {}",
                    have.len(),
                    want.len()
                ));
            }
            want.iter()
                .zip(have)
                .enumerate()
                .try_for_each(|(i, (w, h))| spec_holds(w, h, &format!("{path}[{i}]")))
        }
        _ if expected == actual => Ok(()),
        _ => Err(format!("{path} is {actual}, the operator's is {expected}")),
    }
}

fn is_default(key: &str, value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => fields.iter().all(|(k, v)| is_default(k, v)),
        Value::String(s) => DEFAULTED.contains(&(key, s.as_str())),
        _ => false,
    }
}

/// Whether the stamping policies are in force now, and from when the operator relies on them.
#[derive(Clone, Debug, PartialEq)]
pub enum Trust {
    InForce(TrustSpan),
    /// Not in force: the problem in words.
    Broken(String),
}

/// An unbroken stretch of the policies being in force, as far as the operator can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustSpan {
    /// From when a write counts as stamped: [`STAMP_SETTLE`] (every apiserver has loaded them) after
    /// the latest of the objects' creation and, when this process saw them out of force before, the
    /// moment it saw them back.
    pub since: Timestamp,
    /// The policies never changed since they were created and this process never saw them out of
    /// force: an object created after `since` lived its whole life under them.
    pub unchanged: bool,
}

/// Follows whether the policies of one stamping are in force, as the policy watches report them.
#[derive(Clone, Debug, Default)]
pub struct TrustFollower {
    /// The last judgement, `None` before the first.
    last: Option<Result<InForce, String>>,
    /// When this process last saw them come back after a problem.
    restored_at: Option<Timestamp>,
}

impl TrustFollower {
    /// Takes a fresh judgement ([`in_force`]) seen at `now`; returns whether trust changed.
    pub fn observe(&mut self, judged: Result<InForce, String>, now: Timestamp) -> bool {
        if judged.is_ok() && matches!(self.last, Some(Err(_))) {
            self.restored_at = Some(now);
        }
        let before = self.trust();
        self.last = Some(judged);
        self.trust() != before
    }

    pub fn trust(&self) -> Trust {
        match &self.last {
            None => {
                Trust::Broken("the operator has not read the admission policies yet".to_owned())
            }
            Some(Err(problem)) => Trust::Broken(problem.clone()),
            Some(Ok(found)) => {
                let from = found
                    .created
                    .max(self.restored_at)
                    .unwrap_or(Timestamp::UNIX_EPOCH);
                Trust::InForce(TrustSpan {
                    since: add(from, STAMP_SETTLE),
                    unchanged: found.unchanged && self.restored_at.is_none(),
                })
            }
        }
    }
}

/// What the operator remembers of one object's stamp: the generation it last looked at, when it last
/// looked at it, and whether it found that generation's stamp proven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub generation: i64,
    pub proven: bool,
    pub at: Timestamp,
}

/// One generation of a stamped object, as the operator sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub generation: i64,
    pub created: Option<Timestamp>,
}

/// Whether `written` was written while the stamping policies were in force, so its stamp is evidence;
/// `seen` is what the operator remembers of the object, `restamps_on_update` whether an edit carries
/// its own stamp ([`Stamping::restamps_on_update`]). Returns the verdict (the problem in words when
/// unproven) and what to remember from now on.
///
/// A generation counts as written under trust when:
/// 1. the operator already proved this very generation: it stays proven whatever the policies do
///    later (re-installing them must not revoke what they once vouched for); or
/// 2. the policies are in force now, and
///    - generation 1 (the creation): it was created at or after the span's `since` — the
///      creationTimestamp is the apiserver's, and nothing was created under the span's policies
///      before they settled;
///    - a later generation: the operator saw an earlier generation of the object at or after
///      `since`, so the policies stayed in force, as far as their watch showed, from before the
///      edit until now; and that earlier generation was proven, unless every edit is stamped afresh
///      (then the edit's own stamp is the evidence, whatever the earlier one was); or, for an edit
///      the operator did not follow (made while it was down), the object was created after `since`
///      and the policies never changed since their creation (`metadata.generation` 1, never seen
///      out of force): every version of the object was written under them.
///
/// The window that remains: the operator's watch of the policies and its watch of the objects are
/// not ordered with each other. An edit made just after a policy was weakened can reach a reconcile
/// before the policy watch reports the weakening, and is then taken as written under trust (the
/// window is the policy watch's lag, normally well under a second). An edit of the policies that
/// is undone while the operator is not running is not seen at all: after a restart only the
/// policies' creation times are known.
pub fn judge_generation(
    seen: Option<Seen>,
    written: Written,
    trust: &Trust,
    restamps_on_update: bool,
    now: Timestamp,
) -> (Result<(), String>, Seen) {
    let remember = |proven: bool| Seen {
        generation: written.generation,
        proven,
        at: now,
    };
    let settled = matches!(trust, Trust::InForce(span) if now >= span.since);
    if let Some(seen) = seen.filter(|s| s.generation == written.generation && s.proven) {
        // Seen again under settled policies: they held from this look on.
        let at = if settled { now } else { seen.at };
        return (Ok(()), Seen { at, ..seen });
    }
    let verdict = match trust {
        Trust::Broken(problem) => Err(problem.clone()),
        Trust::InForce(span) if written.generation <= 1 => created_under(written, span),
        Trust::InForce(span) => edited_under(seen, written, span, restamps_on_update),
    };
    let proven = verdict.is_ok();
    (verdict, remember(proven))
}

fn created_under(written: Written, span: &TrustSpan) -> Result<(), String> {
    match written.created {
        Some(created) if created >= span.since => Ok(()),
        _ => Err(format!(
            "this object was created before the admission policies that stamp it were in force (from \
             {}), so nothing proves its stamp was not typed by its author; delete and re-create it",
            span.since
        )),
    }
}

fn edited_under(
    seen: Option<Seen>,
    written: Written,
    span: &TrustSpan,
    restamps_on_update: bool,
) -> Result<(), String> {
    let followed = seen.is_some_and(|s| {
        s.generation < written.generation && s.at >= span.since && (s.proven || restamps_on_update)
    });
    let lived_under = span.unchanged && written.created.is_some_and(|c| c >= span.since);
    if followed || lived_under {
        return Ok(());
    }
    let again = if restamps_on_update {
        "edit it again or re-create it"
    } else {
        "re-create it"
    };
    Err(format!(
        "generation {} of this object was written while the operator could not tell that the \
         admission policies that stamp it were in force (they are, from {}), so nothing proves its \
         stamp; {again}",
        written.generation, span.since
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn shipped() -> Vec<Value> {
        crate::admission::documents()
    }

    fn as_installed(docs: &[Value]) -> Vec<((String, String), Observed)> {
        docs.iter()
            .map(|d| {
                let key = (
                    d["kind"].as_str().unwrap().to_owned(),
                    d["metadata"]["name"].as_str().unwrap().to_owned(),
                );
                (
                    key,
                    Observed {
                        spec: d["spec"].clone(),
                        created: Some(t(100)),
                        generation: Some(1),
                        deleting: false,
                    },
                )
            })
            .collect()
    }

    fn judge(
        stamping: &Stamping,
        cluster: &[((String, String), Observed)],
    ) -> Result<InForce, String> {
        in_force(stamping, &shipped(), |kind, name| {
            cluster
                .iter()
                .find(|((k, n), _)| k == kind && n == name)
                .map(|(_, o)| o)
        })
    }

    fn edit(
        cluster: &mut [((String, String), Observed)],
        kind: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) {
        let (_, o) = cluster
            .iter_mut()
            .find(|((k, n), _)| k == kind && n == name)
            .unwrap();
        change(&mut o.spec);
    }

    #[test]
    fn the_shipped_policies_are_in_force_as_shipped_for_both_stamps() {
        let cluster = as_installed(&shipped());
        assert_eq!(judge(&REQUESTER, &cluster), ok(100));
        assert_eq!(judge(&APPROVER, &cluster), ok(100));
    }

    #[test]
    fn defaults_the_apiserver_adds_and_other_metadata_do_not_count() {
        let mut cluster = as_installed(&shipped());
        edit(
            &mut cluster,
            "MutatingAdmissionPolicyBinding",
            REQUESTER.stamp_policy,
            |s| {
                s["matchResources"] = json!({"matchPolicy": "Equivalent", "namespaceSelector": {}, "objectSelector": {}});
            },
        );
        edit(
            &mut cluster,
            "ValidatingAdmissionPolicy",
            REQUESTER.check_policy,
            |s| {
                s["auditAnnotations"] = json!([]);
            },
        );
        assert!(judge(&REQUESTER, &cluster).is_ok());
    }

    /// The object's kind and name, the edit, and words the problem must name.
    type Weakening = (&'static str, &'static str, fn(&mut Value), &'static str);

    #[test]
    fn a_weakened_policy_or_binding_is_named_with_the_difference_and_the_fix() {
        let weakenings: [Weakening; 6] = [
            (
                "MutatingAdmissionPolicy",
                REQUESTER.stamp_policy,
                |s| s["matchConstraints"]["resourceRules"][0]["operations"] = json!(["DELETE"]),
                "operations",
            ),
            (
                "MutatingAdmissionPolicy",
                REQUESTER.stamp_policy,
                |s| {
                    s["matchConditions"].as_array_mut().unwrap().push(
                 json!({"name": "not-mallory", "expression": "request.userInfo.username != 'mallory'"}))
                },
                "spec.matchConditions has 3 entries, the operator's 2",
            ),
            (
                "ValidatingAdmissionPolicyBinding",
                REQUESTER.check_policy,
                |s| s["validationActions"] = json!(["Warn"]),
                "validationActions",
            ),
            (
                "ValidatingAdmissionPolicy",
                REQUESTER.check_policy,
                |s| s["matchConditions"] = json!([{"name": "skip", "expression": "false"}]),
                "matchConditions is set",
            ),
            (
                "MutatingAdmissionPolicyBinding",
                REQUESTER.stamp_policy,
                |s| s["matchResources"] = json!({"namespaceSelector": {"matchLabels": {"a": "b"}}}),
                "matchResources is set",
            ),
            (
                "ValidatingAdmissionPolicy",
                REQUESTER.check_policy,
                |s| s["failurePolicy"] = json!("Ignore"),
                "failurePolicy",
            ),
        ];
        for (kind, name, weaken, words) in weakenings {
            let mut cluster = as_installed(&shipped());
            edit(&mut cluster, kind, name, weaken);
            let problem = judge(&REQUESTER, &cluster).unwrap_err();
            for word in [kind, name, words, "spec.requester", INSTALL_HINT] {
                assert!(problem.contains(word), "{word} missing: {problem}");
            }
            assert!(
                judge(&APPROVER, &cluster).is_ok(),
                "the approver's are untouched"
            );
        }
    }

    #[test]
    fn a_missing_or_deleted_object_ends_trust() {
        for (kind, name) in REQUESTER.objects() {
            let mut cluster = as_installed(&shipped());
            cluster.retain(|((k, n), _)| !(k == kind && n == name));
            let problem = judge(&REQUESTER, &cluster).unwrap_err();
            assert!(
                problem.contains(&format!("{kind} {name} is missing")),
                "{problem}"
            );

            let mut cluster = as_installed(&shipped());
            cluster
                .iter_mut()
                .filter(|((k, n), _)| k == kind && n == name)
                .for_each(|(_, o)| o.deleting = true);
            assert!(
                judge(&REQUESTER, &cluster)
                    .unwrap_err()
                    .contains("being deleted")
            );
        }
    }

    #[test]
    fn the_latest_creation_counts() {
        let mut cluster = as_installed(&shipped());
        cluster
            .iter_mut()
            .filter(|((k, _), _)| k == "ValidatingAdmissionPolicyBinding")
            .for_each(|(_, o)| o.created = Some(t(300)));
        assert_eq!(judge(&REQUESTER, &cluster), ok(300));
        cluster[0].1.generation = Some(3);
        assert!(
            !judge(&REQUESTER, &cluster).unwrap().unchanged,
            "edited once"
        );
    }

    #[test]
    fn whether_an_edit_is_stamped_follows_the_shipped_policy() {
        let mut docs = shipped();
        assert!(
            REQUESTER.restamps_on_update(&docs),
            "the shipped policy stamps every edit that is a request"
        );
        let operations = |docs: &mut [Value], ops: Value| {
            docs.iter_mut()
                .filter(|d| {
                    d["metadata"]["name"] == REQUESTER.stamp_policy
                        && d["kind"] == "MutatingAdmissionPolicy"
                })
                .for_each(|d| {
                    d["spec"]["matchConstraints"]["resourceRules"][0]["operations"] = ops.clone()
                });
        };
        operations(&mut docs, json!(["CREATE"]));
        assert!(!REQUESTER.restamps_on_update(&docs));
        operations(&mut docs, json!(["*"]));
        assert!(REQUESTER.restamps_on_update(&docs));
    }

    fn ok(created: i64) -> Result<InForce, String> {
        Ok(InForce {
            created: Some(t(created)),
            unchanged: true,
        })
    }

    #[test]
    fn trust_starts_a_settling_time_after_the_policies_or_their_return() {
        let mut follower = TrustFollower::default();
        assert!(
            matches!(follower.trust(), Trust::Broken(_)),
            "nothing read yet"
        );
        assert!(follower.observe(ok(100), t(500)));
        assert_eq!(
            follower.trust(),
            Trust::InForce(TrustSpan {
                since: t(110),
                unchanged: true
            })
        );
        assert!(!follower.observe(ok(100), t(600)), "the same state again");
        assert!(follower.observe(Err("binding missing".into()), t(700)));
        assert_eq!(follower.trust(), Trust::Broken("binding missing".into()));
        // Put back by an edit: their creation is old, the return is what counts.
        assert!(follower.observe(ok(100), t(800)));
        assert_eq!(
            follower.trust(),
            Trust::InForce(TrustSpan {
                since: t(810),
                unchanged: false
            })
        );
        // Re-created later still: the creation counts.
        follower.observe(ok(900), t(901));
        assert_eq!(
            follower.trust(),
            Trust::InForce(TrustSpan {
                since: t(910),
                unchanged: false
            })
        );
    }

    /// In force since `s`, seen changed or come back (so only what the operator followed counts).
    fn in_force_since(s: i64) -> Trust {
        Trust::InForce(TrustSpan {
            since: t(s),
            unchanged: false,
        })
    }

    fn written(generation: i64, created: i64) -> Written {
        Written {
            generation,
            created: Some(t(created)),
        }
    }

    #[test]
    fn a_creation_is_proven_when_it_follows_the_settled_policies() {
        let (ok, seen) =
            judge_generation(None, written(1, 120), &in_force_since(110), false, t(130));
        assert!(ok.is_ok());
        assert_eq!(
            seen,
            Seen {
                generation: 1,
                proven: true,
                at: t(130)
            }
        );
        let (early, seen) =
            judge_generation(None, written(1, 105), &in_force_since(110), false, t(130));
        assert!(early.unwrap_err().contains("re-create"));
        assert!(!seen.proven);
        let broken = Trust::Broken("MutatingAdmissionPolicyBinding x is missing".into());
        let (refused, _) = judge_generation(None, written(1, 120), &broken, false, t(130));
        assert!(refused.unwrap_err().contains("is missing"));
    }

    #[test]
    fn a_proven_generation_stays_proven_when_the_policies_come_and_go() {
        let proven = Seen {
            generation: 2,
            proven: true,
            at: t(130),
        };
        let gone = Trust::Broken("gone".into());
        let (ok, seen) = judge_generation(Some(proven), written(2, 50), &gone, false, t(20_000));
        assert!(ok.is_ok());
        assert_eq!(seen, proven, "remembered as it was");
        // Back (re-created): still proven, and seen under the new policies once they settled, so
        // that an edit from now on is followed.
        let back = in_force_since(10_000);
        let (ok, seen) = judge_generation(Some(proven), written(2, 50), &back, false, t(9_000));
        assert!(ok.is_ok());
        assert_eq!(seen.at, t(130), "not settled yet");
        let (ok, seen) = judge_generation(Some(proven), written(2, 50), &back, false, t(20_000));
        assert!(ok.is_ok());
        assert_eq!(seen.at, t(20_000));
        assert!(
            judge_generation(Some(seen), written(3, 50), &back, false, t(20_001))
                .0
                .is_ok()
        );
    }

    #[test]
    fn an_edit_is_proven_only_when_trust_held_since_the_generation_before() {
        let trust = in_force_since(110);
        let before = |proven, at| {
            Some(Seen {
                generation: 1,
                proven,
                at: t(at),
            })
        };
        // Followed under the same policies: proven.
        assert!(
            judge_generation(before(true, 120), written(2, 50), &trust, false, t(200))
                .0
                .is_ok()
        );
        // The earlier generation was seen before the policies settled (or came back): not followed.
        let (refused, seen) =
            judge_generation(before(true, 100), written(2, 50), &trust, false, t(200));
        assert!(refused.unwrap_err().contains("generation 2"));
        assert_eq!(
            seen,
            Seen {
                generation: 2,
                proven: false,
                at: t(200)
            }
        );
        // Never seen before (e.g. edited before the operator first looked): not followed.
        assert!(
            judge_generation(None, written(3, 50), &trust, false, t(200))
                .0
                .is_err()
        );
        // Broken now: refused whatever came before.
        let broken = Trust::Broken("gone".into());
        assert!(
            judge_generation(before(true, 120), written(2, 50), &broken, false, t(200))
                .0
                .is_err()
        );
    }

    #[test]
    fn an_edit_while_the_operator_was_down_counts_if_the_policies_never_changed_in_its_life() {
        let unchanged = |since| {
            Trust::InForce(TrustSpan {
                since: t(since),
                unchanged: true,
            })
        };
        // Nothing remembered (a restart): created after the unchanged policies settled.
        assert!(
            judge_generation(None, written(3, 120), &unchanged(110), false, t(200))
                .0
                .is_ok()
        );
        // Created before them: its first version may predate them.
        assert!(
            judge_generation(None, written(3, 100), &unchanged(110), false, t(200))
                .0
                .is_err()
        );
        // Policies edited at some time the operator cannot know: only followed edits count.
        assert!(
            judge_generation(None, written(3, 120), &in_force_since(110), false, t(200))
                .0
                .is_err()
        );
    }

    #[test]
    fn an_unproven_creation_is_redeemed_by_an_edit_only_when_edits_are_stamped() {
        let trust = in_force_since(110);
        let unproven = Some(Seen {
            generation: 1,
            proven: false,
            at: t(120),
        });
        let (kept_creator, _) = judge_generation(unproven, written(2, 50), &trust, false, t(200));
        assert!(kept_creator.unwrap_err().contains("re-create it"));
        let (restamped, seen) = judge_generation(unproven, written(2, 50), &trust, true, t(200));
        assert!(restamped.is_ok());
        assert!(seen.proven);
        // The same unproven generation looked at again stays unproven.
        let again = Some(Seen {
            generation: 2,
            proven: false,
            at: t(200),
        });
        assert!(
            judge_generation(again, written(2, 50), &trust, true, t(300))
                .0
                .is_err()
        );
    }
}

//! The admission policies that make a grant's evidence *proven*: the apiserver stamps who created each
//! DelegationGrant (`spec.requester`) and who decided each DelegationApproval (`spec.approver`), and
//! refuses what the requester may not ask for. They are MutatingAdmissionPolicies and
//! ValidatingAdmissionPolicies (`admissionregistration.k8s.io/v1`), so no webhook server runs.
//!
//! The YAML lives in `admission/policies.yaml`, is embedded here, and is printed by
//! `delegation-operator admission-policies`.

/// Every policy and binding, as one multi-document YAML stream.
pub const POLICIES_YAML: &str = include_str!("../admission/policies.yaml");

/// The kinds of document [`POLICIES_YAML`] may hold.
pub const KINDS: [&str; 4] = [
    "MutatingAdmissionPolicy",
    "MutatingAdmissionPolicyBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// Every document of [`POLICIES_YAML`], in order, as JSON values (what a client sends).
pub fn documents() -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(POLICIES_YAML)
        .map(|doc| {
            // The YAML is embedded at compile time and covered by the tests below.
            let value =
                serde_yaml::Value::deserialize(doc).expect("admission/policies.yaml parses");
            serde_json::to_value(value).expect("admission/policies.yaml is plain JSON data")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn kind(doc: &Value) -> &str {
        doc["kind"].as_str().unwrap_or_default()
    }

    fn name(doc: &Value) -> &str {
        doc["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn policies() -> Vec<Value> {
        documents()
            .into_iter()
            .filter(|d| !kind(d).ends_with("Binding"))
            .collect()
    }

    #[test]
    fn every_document_is_a_known_admission_kind_in_v1() {
        let docs = documents();
        assert!(docs.len() >= 12, "expected six policies and their bindings");
        for doc in &docs {
            assert_eq!(
                doc["apiVersion"], "admissionregistration.k8s.io/v1",
                "{doc}"
            );
            assert!(KINDS.contains(&kind(doc)), "unknown kind: {doc}");
        }
    }

    #[test]
    fn every_document_is_named_and_labelled_for_the_operator() {
        for doc in documents() {
            assert!(
                name(&doc).starts_with("delegation-operator-"),
                "{} {:?} lacks the delegation-operator- prefix",
                kind(&doc),
                name(&doc)
            );
            assert_eq!(
                doc["metadata"]["labels"]["app.kubernetes.io/part-of"],
                "delegation-operator",
                "{} {}",
                kind(&doc),
                name(&doc)
            );
        }
    }

    #[test]
    fn names_are_unique_per_kind() {
        let docs = documents();
        let mut seen: Vec<(&str, &str)> = docs.iter().map(|d| (kind(d), name(d))).collect();
        let total = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), total, "a kind/name pair is repeated");
    }

    #[test]
    fn every_policy_fails_closed() {
        // An error (a missing field, a policy not yet loaded) must refuse, never wave a request through.
        for policy in policies() {
            assert_eq!(policy["spec"]["failurePolicy"], "Fail", "{}", name(&policy));
        }
    }

    #[test]
    fn every_policy_has_a_binding_naming_it() {
        let docs = documents();
        for policy in policies() {
            let binding_kind = format!("{}Binding", kind(&policy));
            let bound = docs.iter().any(|d| {
                kind(d) == binding_kind && d["spec"]["policyName"].as_str() == Some(name(&policy))
            });
            assert!(bound, "{} {} has no binding", kind(&policy), name(&policy));
        }
    }

    #[test]
    fn every_binding_names_a_policy_and_validating_ones_deny() {
        let docs = documents();
        for binding in docs.iter().filter(|d| kind(d).ends_with("Binding")) {
            let policy_kind = kind(binding).trim_end_matches("Binding");
            let target = binding["spec"]["policyName"].as_str();
            assert!(
                docs.iter()
                    .any(|d| kind(d) == policy_kind && Some(name(d)) == target),
                "{} names no {policy_kind}",
                name(binding)
            );
            if policy_kind == "ValidatingAdmissionPolicy" {
                // Warn or Audit alone would let every refused request through.
                assert_eq!(
                    binding["spec"]["validationActions"],
                    serde_json::json!(["Deny"])
                );
            }
        }
    }

    #[test]
    fn both_stamped_fields_are_replaced_whole_by_json_patch() {
        // ApplyConfiguration merges, so a forged group would survive next to the real ones.
        for field in ["/spec/requester", "/spec/approver"] {
            let policy = policies()
                .into_iter()
                .find(|p| {
                    kind(p) == "MutatingAdmissionPolicy"
                        && p["spec"]["mutations"].to_string().contains(field)
                })
                .unwrap_or_else(|| panic!("no mutating policy stamps {field}"));
            for mutation in policy["spec"]["mutations"].as_array().unwrap() {
                assert_eq!(mutation["patchType"], "JSONPatch", "{}", name(&policy));
                let expr = mutation["jsonPatch"]["expression"].as_str().unwrap();
                assert!(expr.contains(r#"op: "add""#), "{expr}");
                for guarded in [".?uid.orValue(", ".?groups.orValue(", ".?extra.orValue("] {
                    assert!(
                        expr.contains(guarded),
                        "{field}: {guarded} missing in {expr}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_metadata_bounds_cover_every_tenant_kind_and_match_what_the_cache_keeps() {
        let policy = policies()
            .into_iter()
            .find(|p| name(p) == "delegation-operator-metadata-bounds")
            .expect("the metadata bounds policy");
        assert_eq!(kind(&policy), "ValidatingAdmissionPolicy");
        let rules = &policy["spec"]["matchConstraints"]["resourceRules"];
        assert_eq!(
            rules[0]["resources"],
            serde_json::json!(["delegationgrants", "agentidentities", "delegationapprovals"])
        );
        assert_eq!(
            rules[0]["operations"],
            serde_json::json!(["CREATE", "UPDATE"])
        );
        let spec = policy["spec"].to_string();
        // The operator's own finalizer never counts: it adds it to grants created without the policy.
        assert!(spec.contains(crate::operator::FINALIZER), "{spec}");
        let kept = crate::operator::caches::prune::KEPT_FINALIZERS;
        assert!(
            spec.contains(&format!("variables.finalizers <= {kept} ||")),
            "the cache keeps the finalizers the policy allows: {spec}"
        );
        // Every bound may be kept, never grown, by an update (objects from before the policy).
        for validation in policy["spec"]["validations"].as_array().unwrap() {
            let expr = validation["expression"].as_str().unwrap();
            assert!(expr.contains("|| variables."), "{expr}");
            assert!(validation["messageExpression"].is_string(), "{validation}");
        }
    }

    #[test]
    fn the_finalizer_policy_adds_the_operators_finalizer_to_new_grants_only() {
        let finalizer = crate::operator::FINALIZER;
        let policy = policies()
            .into_iter()
            .find(|p| name(p) == "delegation-operator-add-finalizer")
            .expect("the finalizer policy");
        assert_eq!(kind(&policy), "MutatingAdmissionPolicy");
        let rules = &policy["spec"]["matchConstraints"]["resourceRules"];
        assert_eq!(
            rules[0]["resources"],
            serde_json::json!(["delegationgrants"])
        );
        // On an update it could fight a controller's or a person's edit of the list.
        assert_eq!(rules[0]["operations"], serde_json::json!(["CREATE"]));
        let condition = policy["spec"]["matchConditions"].to_string();
        assert!(condition.contains(finalizer), "{condition}");
        let mutations = policy["spec"]["mutations"].as_array().unwrap();
        assert_eq!(mutations.len(), 1);
        let expr = mutations[0]["jsonPatch"]["expression"].as_str().unwrap();
        // Both branches (a list to append to, or none yet) add exactly this finalizer.
        assert_eq!(expr.matches(finalizer).count(), 2, "{expr}");
        assert!(
            expr.contains("/metadata/finalizers/-") && expr.contains("\"/metadata/finalizers\"")
        );
    }
}

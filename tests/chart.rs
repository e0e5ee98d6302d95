//! The Helm chart (charts/delegation-operator): linted and rendered by a real helm (built from its Go
//! module by hack/helm.sh, or `HELM_BIN`), then installed into the real apiserver. The control plane
//! runs no Pods, so the operator binary runs out of cluster with exactly the arguments of the chart's
//! Deployment and a token of the chart's own ServiceAccount: the grant lifecycle then works under
//! exactly the chart's RBAC. Upgrade and uninstall behave as the chart README says.

mod support;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Secret},
    rbac::v1::{ClusterRole, PolicyRule, RoleBinding, RoleRef},
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::{helm::*, *};

const AUDIENCE: &str = "https://tickets.example.com";

/// `helm template` of the chart with extra arguments: its documents, or helm's error.
fn try_render(args: &[&str]) -> Result<Vec<Value>, String> {
    template("rel", "ops", args)
}

fn render(args: &[&str]) -> Vec<Value> {
    try_render(args).unwrap_or_else(|e| panic!("helm template {args:?} failed: {e}"))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// One RBAC rule as (apiGroups, resources, verbs, resourceNames).
type Rule = (Vec<String>, Vec<String>, Vec<String>, Vec<String>);

/// The rules of a rendered Role or ClusterRole.
fn rules(role: &Value) -> Vec<Rule> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                strings(&r["apiGroups"]),
                strings(&r["resources"]),
                strings(&r["verbs"]),
                strings(&r["resourceNames"]),
            )
        })
        .collect()
}

/// The verbs a role allows on `group`/`resource` (without resourceNames restrictions).
fn verbs_on(role: &Value, group: &str, resource: &str) -> Vec<String> {
    let mut verbs: Vec<String> = rules(role)
        .into_iter()
        .filter(|(g, r, _, names)| {
            g.iter().any(|x| x == group) && r.iter().any(|x| x == resource) && names.is_empty()
        })
        .flat_map(|(_, _, v, _)| v)
        .collect();
    verbs.sort();
    verbs.dedup();
    verbs
}

fn sorted(xs: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = xs.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

// ---- lint and render ---------------------------------------------------------------------------

/// Helm 3 users get the same chart: it lints clean with Helm 3 and renders exactly what Helm 4 does.
#[test]
fn helm3_lints_clean_and_renders_what_helm4_renders() {
    let helm3 = helm3_path();
    for extra in LINT_MODES {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend(*extra);
        let out = helm_binary(&helm3, &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success()
                && text.contains("0 chart(s) failed")
                && !text.contains("[WARNING]"),
            "helm 3 lint --strict {extra:?}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Helm 3 assumes Kubernetes 1.20 without a cluster; the chart requires ≥ 1.36.
        let mut args = vec!["template", "rel", CHART, "--namespace", "ops"];
        args.extend(["--kube-version", "v1.37.2"]);
        args.extend(*extra);
        let out = helm_binary(&helm3, &args);
        assert!(
            out.status.success(),
            "helm 3 template {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            documents(&String::from_utf8(out.stdout).unwrap()),
            render(extra),
            "Helm 3 and Helm 4 render {extra:?} differently"
        );
    }
    // The schema binds Helm 3 too.
    let out = helm_binary(
        &helm3,
        &[
            "template",
            "rel",
            CHART,
            "--kube-version",
            "v1.37.2",
            "--set",
            "replicaCount=2",
        ],
    );
    let refusal = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && refusal.contains("replicaCount"),
        "an unknown key must be refused by Helm 3 as well: {refusal}"
    );
}

/// The value combinations every lint runs with.
const LINT_MODES: &[&[&str]] = &[
    &[],
    &["--set", "watchNamespace=team-a"],
    &[
        "--set",
        "tls.certManager.enabled=true",
        "--set",
        "tls.certManager.issuerRef.name=ca",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "networkPolicy.enabled=true",
    ],
    &[
        "--set",
        "crds.enabled=false",
        "--set",
        "admissionPolicies.enabled=false",
    ],
];

#[test]
fn helm_lint_is_clean_in_every_mode() {
    for extra in LINT_MODES {
        let extra = *extra;
        let mut args = vec!["lint", "--strict", CHART];
        args.extend(extra);
        let out = helm(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("0 chart(s) failed"),
            "helm lint --strict {extra:?}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("[WARNING]"), "lint warnings: {text}");
    }
}

#[test]
fn the_charts_app_version_is_the_operators_version() {
    let chart: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join(CHART).join("Chart.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion (the default image tag) must be Cargo.toml's version"
    );
    let docs = render(&[]);
    let deployment = find(&docs, "Deployment", "rel-delegation-operator");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        format!(
            "ghcr.io/nhi-dev/delegation-operator:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
}

/// The CRD templates are crds/ byte for byte, plus only the chart's labels and the keep annotation
/// after the name: they cannot drift from the types (`hack/helm.sh sync-chart` regenerates them).
#[test]
fn crd_templates_render_exactly_the_crds() {
    for path in crd_files() {
        let file = path.file_name().unwrap().to_str().unwrap();
        let template = format!("templates/crd-{file}");
        let out = helm(&["template", "rel", CHART, "--show-only", &template]);
        assert!(
            out.status.success(),
            "{template} missing: run `hack/helm.sh sync-chart` ({})",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        let body = rendered
            .split_once(&format!("# Source: delegation-operator/{template}\n"))
            .unwrap()
            .1;
        let (stripped, added) = without_chart_metadata(body);
        assert_eq!(
            stripped.trim(),
            std::fs::read_to_string(&path).unwrap().trim(),
            "{template} differs from crds/{file}: run `hack/helm.sh sync-chart`"
        );
        // What was added is the chart's metadata, and the CRD is kept on uninstall by default.
        let added: Value = serde_json::to_value(
            serde_yaml::from_str::<serde_yaml::Value>(&added.join("\n")).unwrap(),
        )
        .unwrap();
        assert_eq!(added["annotations"]["helm.sh/resource-policy"], "keep");
        assert_eq!(added["labels"]["app.kubernetes.io/managed-by"], "Helm");
        assert_eq!(added["labels"]["app.kubernetes.io/component"], "crds");
    }
    // Exactly the CRDs of crds/, no more.
    let crds = render(&[])
        .into_iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .count();
    assert_eq!(crds, crd_files().len());

    let not_kept = render(&["--set", "crds.keep=false"]);
    for crd in not_kept
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        assert!(crd["metadata"]["annotations"].is_null(), "{crd}");
    }
    let off = render(&["--set", "crds.enabled=false"]);
    assert!(!kinds(&off).contains(&"CustomResourceDefinition".to_owned()));
}

/// Splits a rendered object's text into the text without the `labels:` and `annotations:` blocks of
/// its top-level metadata, and those blocks' lines (dedented).
fn without_chart_metadata(body: &str) -> (String, Vec<String>) {
    let (mut kept, mut added) = (Vec::new(), Vec::new());
    let (mut in_metadata, mut in_block) = (false, false);
    for line in body.lines() {
        if !line.starts_with(' ') {
            in_metadata = line == "metadata:";
            in_block = false;
        } else if in_metadata && (line == "  labels:" || line == "  annotations:") {
            in_block = true;
        } else if in_block && !line.starts_with("    ") {
            in_block = false;
        }
        if in_block {
            added.push(line[2..].to_owned());
        } else {
            kept.push(line);
        }
    }
    (kept.join("\n") + "\n", added)
}

/// The admission-policy template is admission/policies.yaml, plus only the chart's labels and the
/// keep annotation.
#[test]
fn admission_policy_template_renders_exactly_the_policies() {
    let docs = render(&[]);
    let rendered: Vec<Value> = docs
        .iter()
        .filter(|d| {
            delegation_operator::admission::KINDS.contains(&d["kind"].as_str().unwrap_or_default())
        })
        .cloned()
        .collect();
    let mut expected = delegation_operator::admission::documents();
    assert_eq!(rendered.len(), expected.len());
    // Helm orders objects by kind; compare by kind and name.
    let key = |d: &Value| (d["kind"].to_string(), d["metadata"]["name"].to_string());
    let mut rendered = rendered;
    rendered.sort_by_key(key);
    expected.sort_by_key(key);
    for (mut got, want) in rendered.into_iter().zip(expected) {
        let meta = got["metadata"].as_object_mut().unwrap();
        let annotations = meta.remove("annotations");
        if meta["name"] == FINALIZER_POLICY {
            // Never kept: with no operator left it would hold every new grant's deletion.
            assert_eq!(annotations, None);
        } else {
            assert_eq!(
                annotations,
                Some(json!({"helm.sh/resource-policy": "keep"}))
            );
        }
        let labels = meta["labels"].as_object_mut().unwrap();
        assert_eq!(labels["app.kubernetes.io/component"], "admission");
        for added in [
            "helm.sh/chart",
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/component",
        ] {
            labels.remove(added).unwrap();
        }
        assert_eq!(
            got, want,
            "the chart's policy differs from admission/policies.yaml: run `hack/helm.sh sync-chart`"
        );
    }
    let off = render(&["--set", "admissionPolicies.enabled=false"]);
    assert!(
        kinds(&off)
            .iter()
            .all(|k| !delegation_operator::admission::KINDS.contains(&k.as_str()))
    );
    let not_kept = render(&["--set", "admissionPolicies.keep=false"]);
    assert!(
        not_kept
            .iter()
            .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
            .all(|d| d["metadata"]["annotations"].is_null())
    );
}

const FINALIZER_POLICY: &str = "delegation-operator-add-finalizer";

#[test]
fn the_finalizer_policy_is_bound_only_to_the_watched_namespace_when_there_is_one() {
    let binding = |docs: &[Value]| {
        docs.iter()
            .find(|d| {
                d["kind"] == "MutatingAdmissionPolicyBinding"
                    && d["metadata"]["name"] == FINALIZER_POLICY
            })
            .cloned()
            .expect("the finalizer policy's binding")
    };
    // Cluster-wide operator: every namespace.
    assert!(binding(&render(&[]))["spec"]["matchResources"].is_null());
    let scoped = binding(&render(&["--set", "watchNamespace=team-a"]));
    assert_eq!(
        scoped["spec"]["matchResources"]["namespaceSelector"],
        json!({"matchLabels": {"kubernetes.io/metadata.name": "team-a"}})
    );
    // The other policies are about who asks, wherever the grant is: never scoped.
    for doc in render(&["--set", "watchNamespace=team-a"]) {
        if doc["kind"] == "MutatingAdmissionPolicyBinding"
            && doc["metadata"]["name"] != FINALIZER_POLICY
        {
            assert!(doc["spec"]["matchResources"].is_null(), "{doc}");
        }
    }
}

#[test]
fn default_render_is_a_controller_and_a_verification_server_behind_an_https_service() {
    let docs = render(&[]);
    let mut found = kinds(&docs);
    found.sort();
    found.dedup();
    for kind in [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "MutatingAdmissionPolicy",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
    ] {
        assert!(found.contains(&kind.to_owned()), "{kind} missing");
    }
    for kind in ["ServiceMonitor", "Certificate"] {
        assert!(!found.contains(&kind.to_owned()), "{kind} is opt-in");
    }
    // The NetworkPolicies are on by default: the verification server takes ingress on its HTTPS
    // port from anyone (verifiers, resource servers, Prometheus), the controller only on its metrics
    // port, no other port; egress open (the apiserver's address varies).
    for (name, port) in [
        ("rel-delegation-operator", "metrics"),
        ("rel-delegation-operator-verifier", "https"),
    ] {
        let policy = find(&docs, "NetworkPolicy", name);
        assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(
            policy["spec"]["ingress"],
            json!([{"ports": [{"port": port, "protocol": "TCP"}]}]),
            "{name}"
        );
        assert_eq!(policy["spec"]["egress"], json!([{}]));
    }

    let deployment = find(&docs, "Deployment", "rel-delegation-operator");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(pod["serviceAccountName"], "rel-delegation-operator");
    // Restricted Pod Security Standard.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    for field in ["hostNetwork", "hostPID", "hostIPC", "volumes"] {
        assert!(pod[field].is_null(), "{field} set");
    }
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null());
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !c["resources"][kind][resource].is_null(),
                "{kind}.{resource}"
            );
        }
    }
    // The controller exposes one port, for probes and /metrics: no verification endpoint.
    assert_eq!(
        c["ports"],
        json!([{"name": "metrics", "containerPort": 8443, "protocol": "TCP"}])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            c[probe]["httpGet"],
            json!({"path": path, "port": "metrics", "scheme": "HTTPS"}),
            "{probe}"
        );
    }
    // The replica's identity and namespace from the downward API.
    for (env, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == env)
            .unwrap_or_else(|| panic!("env {env}"));
        assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for expected in [
        "run",
        "--operator-namespace=$(POD_NAMESPACE)",
        "--issuer=https://rel-delegation-operator.ops.svc",
        "--https-address=0.0.0.0:8443",
        "--verification-endpoints=false",
        // No token endpoint by default: Pod-delivered grants are refused, not left unfetchable.
        "--pod-delivery=false",
        "--tls-secret=delegation-operator-tls",
        "--tls-self-signed=true",
        "--tls-dns-name=rel-delegation-operator.ops.svc",
        "--leader-election=true",
        "--leader-election-lease-duration=15s",
        "--leader-election-renew-deadline=10s",
        "--leader-election-retry-period=2s",
        "--caller-rate=2",
        "--caller-burst=20",
        "--review-concurrency=4",
        "--review-rate=20",
        "--review-cache-ttl=10s",
        "--review-negative-cache-ttl=5s",
        "--log-format=json",
    ] {
        assert!(args.contains(&expected), "{expected} not in {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "watches all namespaces"
    );
    let spread = pod["topologySpreadConstraints"].as_array().unwrap();
    assert!(
        spread
            .iter()
            .any(|t| t["topologyKey"] == "kubernetes.io/hostname")
    );
    assert!(spread.iter().all(|t| {
        t["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    }));

    // The Service of the HTTPS endpoints selects the verification server, never the controller.
    let verifier = find(&docs, "Deployment", "rel-delegation-operator-verifier");
    let service = find(&docs, "Service", "rel-delegation-operator");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}])
    );
    assert_eq!(
        service["spec"]["selector"],
        verifier["spec"]["selector"]["matchLabels"]
    );
    assert!(!selects(
        &service["spec"]["selector"],
        &deployment["spec"]["template"]["metadata"]["labels"]
    ));
    // Neither Deployment's selector (nor its PodDisruptionBudget's) matches the other's Pods.
    for (own, other) in [(deployment, verifier), (verifier, deployment)] {
        let labels = &other["spec"]["template"]["metadata"]["labels"];
        assert!(!selects(&own["spec"]["selector"]["matchLabels"], labels));
    }
    for (pdb, own) in [
        ("rel-delegation-operator", deployment),
        ("rel-delegation-operator-verifier", verifier),
    ] {
        let pdb = find(&docs, "PodDisruptionBudget", pdb);
        assert_eq!(pdb["spec"]["minAvailable"], 1);
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"],
            own["spec"]["selector"]["matchLabels"]
        );
    }
    // No Service for the controller unless a ServiceMonitor needs one.
    assert_eq!(docs.iter().filter(|d| d["kind"] == "Service").count(), 1);
}

/// Whether a label selector (`matchLabels`) selects an object with these labels.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

#[test]
fn the_verification_server_is_restricted_and_reads_its_certificate_from_a_mounted_secret() {
    let docs = render(&[]);
    let verifier = find(&docs, "Deployment", "rel-delegation-operator-verifier");
    assert_eq!(verifier["spec"]["replicas"], 2);
    let pod = &verifier["spec"]["template"]["spec"];
    assert_eq!(
        pod["serviceAccountName"],
        "rel-delegation-operator-verifier"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(pod[field].is_null(), "{field} set");
    }
    // Its one volume: the TLS Secret's certificate and key (the kubelet mounts it; the
    // ServiceAccount has no right on Secrets), readable by its group only.
    assert_eq!(
        pod["volumes"],
        json!([{"name": "tls", "secret": {"secretName": "delegation-operator-tls",
            "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
            "defaultMode": 288}}])
    );
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "tls", "mountPath": "/etc/delegation-operator/tls", "readOnly": true}])
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        c["ports"],
        json!([{"name": "https", "containerPort": 8443, "protocol": "TCP"}])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            c[probe]["httpGet"],
            json!({"path": path, "port": "https", "scheme": "HTTPS"}),
            "{probe}"
        );
    }
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for expected in [
        "serve",
        "--operator-namespace=$(POD_NAMESPACE)",
        "--issuer=https://rel-delegation-operator.ops.svc",
        "--algorithm=ES256",
        "--https-address=0.0.0.0:8443",
        "--tls-cert-file=/etc/delegation-operator/tls/tls.crt",
        "--tls-key-file=/etc/delegation-operator/tls/tls.key",
        "--caller-rate=2",
        "--review-negative-cache-ttl=5s",
        "--log-format=json",
    ] {
        assert!(args.contains(&expected), "{expected} not in {args:?}");
    }
    assert_eq!(args[0], "serve");
    // The controller's discovery and the server's agree: the same issuer and algorithm.
    let controller = find(&docs, "Deployment", "rel-delegation-operator");
    let controller_args = controller["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    for shared in ["--issuer=", "--algorithm="] {
        let of = |list: &[&str]| {
            list.iter()
                .find(|a| a.starts_with(shared))
                .map(|a| a.to_string())
        };
        let controller_list: Vec<&str> = controller_args
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(of(&args), of(&controller_list), "{shared}");
    }
}

/// Everything the chart binds to the verification server's ServiceAccount: no Secret, no write, no
/// ConfigMap but the two it serves (by name, in the release namespace), and the two reviews it asks
/// about its callers. This is exactly what `tests/verification_server.rs` runs it under.
#[test]
fn the_verification_servers_rbac_reads_no_secret_and_writes_nothing() {
    for args in [&[][..], &["--set", "watchNamespace=team-a"]] {
        let docs = render(args);
        let bound = rules_bound_to(&docs, "ops", "rel-delegation-operator-verifier");
        let mut seen: Vec<(String, Rule)> = bound.clone();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (
                    "".into(),
                    (
                        vec!["authentication.k8s.io".into()],
                        vec!["tokenreviews".into()],
                        vec!["create".into()],
                        vec![]
                    )
                ),
                (
                    "".into(),
                    (
                        vec!["authorization.k8s.io".into()],
                        vec!["subjectaccessreviews".into()],
                        vec!["create".into()],
                        vec![]
                    )
                ),
                (
                    "ops".into(),
                    (
                        vec!["".into()],
                        vec!["configmaps".into()],
                        vec!["list".into(), "watch".into()],
                        vec![
                            "delegation-operator-jwks".into(),
                            "delegation-operator-status-lists".into()
                        ]
                    )
                ),
            ],
            "{args:?}"
        );
        for (_, (_, resources, _, _)) in &bound {
            assert!(!resources.iter().any(|r| r == "secrets"));
        }
    }
}

/// With token exchange on, the verification server may write exactly one thing: its own counts of
/// live exchanged tokens, `get` and `patch` on ConfigMap `delegation-operator-exchanges` in the
/// release namespace (no create: the chart creates it, with no data of its own). Off, it has no
/// right on it at all.
#[test]
fn with_token_exchange_the_verifier_may_patch_only_the_exchange_counts() {
    let counts = |docs: &[Value]| -> Vec<(String, Rule)> {
        rules_bound_to(docs, "ops", "rel-delegation-operator-verifier")
            .into_iter()
            .filter(|(_, (_, resources, _, names))| {
                resources.iter().any(|r| r == "configmaps")
                    && names.iter().any(|n| n == "delegation-operator-exchanges")
            })
            .collect()
    };
    for args in [
        &["--set", "verifier.tokenExchange.enabled=true"][..],
        &[
            "--set",
            "verifier.tokenExchange.enabled=true",
            "--set",
            "watchNamespace=team-a",
        ],
    ] {
        let docs = render(args);
        assert_eq!(
            counts(&docs),
            vec![(
                "ops".into(),
                (
                    vec!["".into()],
                    vec!["configmaps".into()],
                    vec!["get".into(), "patch".into()],
                    vec!["delegation-operator-exchanges".into()]
                )
            )],
            "{args:?}"
        );
        for (_, (_, resources, verbs, _)) in
            rules_bound_to(&docs, "ops", "rel-delegation-operator-verifier")
        {
            if resources.iter().any(|r| r == "configmaps") {
                assert!(
                    !verbs
                        .iter()
                        .any(|v| v == "create" || v == "update" || v == "delete")
                );
            }
        }
    }
    let docs = render(&[]);
    assert!(counts(&docs).is_empty());
    let cm = find(&docs, "ConfigMap", "delegation-operator-exchanges");
    assert_eq!(cm["metadata"]["namespace"], "ops");
    assert!(cm.get("data").is_none_or(|d| d.is_null()), "{cm}");
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/instance"], "rel",
        "labelled like the chart's other objects: {cm}"
    );
}

/// Grants with Pod delivery are issued only where a token endpoint serves them: the controller's
/// `--pod-delivery` follows `verifier.tokenExchange.enabled`.
#[test]
fn pod_delivery_follows_the_verifiers_token_exchange() {
    for (args, expected) in [
        (&[][..], "--pod-delivery=false"),
        (
            &["--set", "verifier.tokenExchange.enabled=true"][..],
            "--pod-delivery=true",
        ),
    ] {
        let docs = render(args);
        let deployment = find(&docs, "Deployment", "rel-delegation-operator");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let flags: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .filter(|a| a.starts_with("--pod-delivery"))
            .collect();
        assert_eq!(flags, [expected], "{args:?}");
    }
}

/// The rules of every Role and ClusterRole bound to ServiceAccount `namespace`/`name` in `docs`, with
/// the namespace each applies in ("" for cluster-wide).
fn rules_bound_to(docs: &[Value], namespace: &str, name: &str) -> Vec<(String, Rule)> {
    let mut bound = Vec::new();
    for binding in docs
        .iter()
        .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
    {
        let names_account = binding["subjects"].as_array().unwrap().iter().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == name && s["namespace"] == namespace
        });
        if !names_account {
            continue;
        }
        let applies_in = binding["metadata"]["namespace"].as_str().unwrap_or("");
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap();
        let role_name = binding["roleRef"]["name"].as_str().unwrap();
        let role = find(docs, role_kind, role_name);
        bound.extend(rules(role).into_iter().map(|r| (applies_in.to_owned(), r)));
    }
    bound
}

#[test]
fn operator_rbac_is_least_privilege_cluster_wide() {
    let docs = render(&[]);
    for role in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        for (groups, resources, verbs, _) in rules(role) {
            assert!(
                !groups
                    .iter()
                    .chain(&resources)
                    .chain(&verbs)
                    .any(|x| x.contains('*')),
                "wildcard in {}: {groups:?} {resources:?} {verbs:?}",
                role["metadata"]["name"]
            );
        }
    }
    let cluster = find(&docs, "ClusterRole", "rel-delegation-operator");
    let group = "delegation.nhi.dev";
    assert_eq!(
        verbs_on(cluster, group, "delegationgrants"),
        sorted(&["list", "watch", "patch"])
    );
    assert_eq!(
        verbs_on(cluster, group, "delegationgrants/status"),
        sorted(&["update"])
    );
    assert_eq!(
        verbs_on(cluster, group, "agentidentities"),
        sorted(&["list", "watch"])
    );
    assert_eq!(
        verbs_on(cluster, group, "agentidentities/status"),
        sorted(&["patch"])
    );
    assert_eq!(
        verbs_on(cluster, group, "delegationapprovals"),
        sorted(&["list", "watch"])
    );
    // The ceilings per API: read, never written.
    assert_eq!(
        verbs_on(cluster, group, "audiencepolicies"),
        sorted(&["list", "watch"])
    );
    // Token Secrets everywhere, but never replaced wholesale.
    assert_eq!(
        verbs_on(cluster, "", "secrets"),
        sorted(&["get", "list", "watch", "create", "patch", "delete"])
    );
    assert!(
        verbs_on(cluster, "", "configmaps").is_empty(),
        "ConfigMaps only in its namespace"
    );
    assert!(verbs_on(cluster, "coordination.k8s.io", "leases").is_empty());
    assert_eq!(
        verbs_on(cluster, "events.k8s.io", "events"),
        sorted(&["create", "patch"])
    );
    assert_eq!(
        verbs_on(cluster, "authorization.k8s.io", "subjectaccessreviews"),
        sorted(&["create"])
    );
    // Only read, to see that a ServiceAccount that asked still exists with its uid.
    assert_eq!(verbs_on(cluster, "", "serviceaccounts"), sorted(&["get"]));
    assert_eq!(
        verbs_on(cluster, "authentication.k8s.io", "tokenreviews"),
        sorted(&["create"])
    );
    // Whether stamps are proven: the policies and bindings, read through watches only.
    for resource in [
        "mutatingadmissionpolicies",
        "mutatingadmissionpolicybindings",
        "validatingadmissionpolicies",
        "validatingadmissionpolicybindings",
    ] {
        assert_eq!(
            verbs_on(cluster, "admissionregistration.k8s.io", resource),
            sorted(&["list", "watch"]),
            "{resource}"
        );
    }
    // The only namespace it may read is its own.
    assert!(
        rules(cluster)
            .iter()
            .any(|(_, r, v, names)| r == &["namespaces"] && v == &["get"] && names == &["ops"])
    );

    let own = find(&docs, "Role", "rel-delegation-operator");
    assert_eq!(own["metadata"]["namespace"], "ops");
    assert_eq!(
        verbs_on(own, "", "secrets"),
        sorted(&["get", "list", "watch", "create", "update", "patch"])
    );
    assert_eq!(
        verbs_on(own, "coordination.k8s.io", "leases"),
        sorted(&["create"])
    );
    assert!(rules(own).iter().any(|(_, r, v, names)| r == &["leases"]
        && sorted(&v.iter().map(String::as_str).collect::<Vec<_>>())
            == sorted(&["get", "update"])
        && names == &["delegation-operator-leader"]));
}

#[test]
fn single_namespace_mode_uses_roles_in_that_namespace() {
    let docs = render(&["--set", "watchNamespace=team-a"]);
    let cluster = find(&docs, "ClusterRole", "rel-delegation-operator");
    for resource in [
        "secrets",
        "events",
        "delegationgrants/status",
        "agentidentities/status",
    ] {
        assert!(
            !rules(cluster)
                .iter()
                .any(|(_, r, _, _)| r.iter().any(|x| x == resource)),
            "{resource} in the ClusterRole"
        );
    }
    // Nothing of our kinds stays cluster-wide: even the start-up probe reads the watched namespace.
    assert!(verbs_on(cluster, "delegation.nhi.dev", "delegationgrants").is_empty());
    assert!(verbs_on(cluster, "delegation.nhi.dev", "agentidentities").is_empty());
    // ... but the cluster-scoped ceilings are read in every mode.
    assert_eq!(
        verbs_on(cluster, "delegation.nhi.dev", "audiencepolicies"),
        sorted(&["list", "watch"])
    );
    let watched = find(&docs, "Role", "rel-delegation-operator-watch");
    assert_eq!(watched["metadata"]["namespace"], "team-a");
    assert_eq!(
        verbs_on(watched, "", "secrets"),
        sorted(&["get", "list", "watch", "create", "patch", "delete"])
    );
    assert_eq!(
        verbs_on(watched, "delegation.nhi.dev", "delegationgrants"),
        sorted(&["list", "watch", "patch"])
    );
    assert_eq!(
        verbs_on(watched, "events.k8s.io", "events"),
        sorted(&["create", "patch"])
    );
    let binding = find(&docs, "RoleBinding", "rel-delegation-operator-watch");
    assert_eq!(binding["metadata"]["namespace"], "team-a");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "rel-delegation-operator", "namespace": "ops"}])
    );
    let deployment = find(&docs, "Deployment", "rel-delegation-operator");
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array()
            .unwrap()
            .contains(&json!("--namespace=team-a"))
    );
}

#[test]
fn aggregated_roles_extend_admin_edit_view() {
    let docs = render(&[]);
    let label = |role: &Value, to: &str| {
        role["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{to}")] == "true"
    };
    let view = find(&docs, "ClusterRole", "delegation-view");
    let edit = find(&docs, "ClusterRole", "delegation-edit");
    let admin = find(&docs, "ClusterRole", "delegation-admin");
    assert!(label(view, "view") && label(view, "edit") && label(view, "admin"));
    assert!(!label(edit, "view") && label(edit, "edit") && label(edit, "admin"));
    assert!(!label(admin, "view") && !label(admin, "edit") && label(admin, "admin"));
    let g = "delegation.nhi.dev";
    let read = sorted(&["get", "list", "watch"]);
    for kind in ["agentidentities", "delegationgrants", "delegationapprovals"] {
        assert_eq!(verbs_on(view, g, kind), read);
    }
    // edit: request and withdraw grants, record approvals; agents are read-only.
    assert!(verbs_on(edit, g, "delegationgrants").contains(&"create".to_owned()));
    assert_eq!(verbs_on(edit, g, "agentidentities"), read);
    // admin: agents too.
    assert!(verbs_on(admin, g, "agentidentities").contains(&"update".to_owned()));
    // Authority is never handed out by aggregation, nor are the cluster's ceilings.
    for role in [view, edit, admin] {
        assert!(verbs_on(role, g, "audiencepolicies").is_empty());
        for (_, resources, verbs, _) in rules(role) {
            assert!(
                !verbs.iter().any(|v| v == "delegate" || v == "approve"),
                "{resources:?}"
            );
            assert!(!resources.iter().any(|r| r.ends_with("/status")));
        }
    }
}

#[test]
fn optional_parts_render_when_enabled() {
    let docs = render(&[
        "--set",
        "tls.certManager.enabled=true",
        "--set",
        "tls.certManager.issuerRef.name=ca",
        "--set",
        "tls.certManager.issuerRef.kind=ClusterIssuer",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.metricsFrom[0].podSelector.matchLabels.app=prometheus",
        "--set",
        "issuer=https://tokens.example.com",
    ]);
    let cert = find(&docs, "Certificate", "rel-delegation-operator");
    assert_eq!(cert["spec"]["secretName"], "delegation-operator-tls");
    assert_eq!(cert["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    let names = cert["spec"]["dnsNames"].as_array().unwrap();
    assert!(names.contains(&json!("tokens.example.com")));
    assert!(names.contains(&json!("rel-delegation-operator.ops.svc")));
    let deployment = find(&docs, "Deployment", "rel-delegation-operator");
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    // cert-manager writes the Secret: the operator must not generate one.
    assert!(args.contains(&json!("--tls-self-signed=false")));
    assert!(args.contains(&json!("--issuer=https://tokens.example.com")));
    assert!(args.contains(&json!("--tls-dns-name=tokens.example.com")));
    // Both processes' /metrics: the controller's through its metrics Service, the verification
    // server's through the endpoints' Service.
    let monitor = find(&docs, "ServiceMonitor", "rel-delegation-operator");
    let endpoints = monitor["spec"]["endpoints"].as_array().unwrap();
    let ports: Vec<&str> = endpoints
        .iter()
        .map(|e| e["port"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["metrics", "https"]);
    for endpoint in endpoints {
        assert_eq!(endpoint["path"], "/metrics");
        assert_eq!(endpoint["scheme"], "https");
        // /metrics is authenticated: Prometheus sends its token and needs the reader role.
        assert_eq!(
            endpoint["bearerTokenFile"],
            "/var/run/secrets/kubernetes.io/serviceaccount/token"
        );
    }
    let metrics = find(&docs, "Service", "rel-delegation-operator-metrics");
    assert_eq!(
        metrics["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        metrics["spec"]["ports"],
        json!([{"name": "metrics", "port": 8443, "targetPort": "metrics", "protocol": "TCP"}])
    );
    let selector = &monitor["spec"]["selector"];
    for service in [metrics, find(&docs, "Service", "rel-delegation-operator")] {
        let labels = &service["metadata"]["labels"];
        assert!(selects(&selector["matchLabels"], labels), "{service}");
        let component = &selector["matchExpressions"][0];
        assert_eq!(component["key"], "app.kubernetes.io/component");
        assert!(
            component["values"]
                .as_array()
                .unwrap()
                .contains(&labels["app.kubernetes.io/component"]),
            "{service}"
        );
    }
    let reader = find(
        &docs,
        "ClusterRole",
        "rel-delegation-operator-metrics-reader",
    );
    assert_eq!(
        reader["rules"],
        json!([{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}])
    );
    let policy = find(&docs, "NetworkPolicy", "rel-delegation-operator-verifier");
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], "https");
    assert!(policy["spec"]["ingress"][0]["from"].is_null());
    let controller = find(&docs, "NetworkPolicy", "rel-delegation-operator");
    assert_eq!(
        controller["spec"]["ingress"],
        json!([{"ports": [{"port": "metrics", "protocol": "TCP"}],
                "from": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]}])
    );
}

#[test]
fn schema_refuses_unknown_keys_and_wrong_types() {
    for (args, says) in [
        (
            &["--set", "replica=3"][..],
            "additional properties 'replica' not allowed",
        ),
        (
            &["--set", "crds.install=true"],
            "additional properties 'install' not allowed",
        ),
        (
            &["--set", "tls.certManager.issuerRef.namespace=x"],
            "additional properties 'namespace' not allowed",
        ),
        (
            &["--set", "resources.requests.gpu=1"],
            "additional properties 'gpu' not allowed",
        ),
        (
            &["--set", "verifier.replica=3"],
            "additional properties 'replica' not allowed",
        ),
        (
            &["--set", "verifier.resources.limits.gpu=1"],
            "additional properties 'gpu' not allowed",
        ),
        (&["--set", "verifier.replicas=0"], "verifier/replicas"),
        (&["--set", "replicas=two"], "got string, want integer"),
        (&["--set", "crds.enabled=yes"], "got string, want boolean"),
        (&["--set", "logFormat=xml"], "logFormat"),
        (&["--set-string", "tokenTTL.max=1d"], "tokenTTL/max"),
        (&["--set", "issuer=http://insecure.example.com"], "issuer"),
        (&["--set", "watchNamespace=Team_A"], "watchNamespace"),
    ] {
        let error = try_render(args).expect_err(&format!("{args:?} was accepted"));
        assert!(
            error.contains(says),
            "{args:?}: expected {says:?} in:\n{error}"
        );
    }
    // What the schema cannot express, the templates refuse.
    let error = try_render(&["--set", "leaderElection.enabled=false"]).unwrap_err();
    assert!(error.contains("needs replicas: 1"), "{error}");
    render(&[
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "replicas=1",
    ]);
    let error = try_render(&["--set", "tls.certManager.enabled=true"]).unwrap_err();
    assert!(error.contains("issuerRef.name"), "{error}");
}

// ---- on the real apiserver -----------------------------------------------------------------------

/// The operator binary started as the chart's Deployment would start it.
struct ChartOperator {
    child: std::process::Child,
    log: PathBuf,
    kubeconfig: PathBuf,
    /// Directories standing in for mounted volumes, removed with it.
    mounted: Vec<PathBuf>,
}

impl ChartOperator {
    fn start(args: &[String], kubeconfig: PathBuf, pod_name: &str, pod_namespace: &str) -> Self {
        let log = std::env::temp_dir()
            .join("delegation-operator-tests")
            .join(format!("{pod_name}.log"));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
            .args(args)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .env("POD_NAME", pod_name)
            .env("POD_NAMESPACE", pod_namespace)
            .env("RUST_LOG", "info,delegation_operator=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the operator");
        Self {
            child,
            log,
            kubeconfig,
            mounted: Vec::new(),
        }
    }

    /// SIGTERM, as the kubelet stops a Pod: the leader releases its Lease and exits (zero). Nothing
    /// in its log may say the chart's RBAC refused it something.
    fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the operator did not stop on SIGTERM; log: {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(
            status.success(),
            "the operator exited with {status}:\n{log}"
        );
        let lower = log.to_lowercase();
        assert!(
            !lower.contains("forbidden") && !log.contains("\"level\":\"ERROR\""),
            "the operator was refused something under the chart's RBAC:\n{log}"
        );
    }
}

impl Drop for ChartOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.kubeconfig);
        for dir in &self.mounted {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Uninstalls a release when dropped, so that a failed test leaves no release behind (a no-op after
/// the test's own uninstall).
struct ReleaseGuard {
    release: String,
    namespace: String,
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        let kubeconfig = kubeconfig_path();
        let _ = helm(&[
            "uninstall",
            &self.release,
            "--namespace",
            &self.namespace,
            "--ignore-not-found",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ]);
    }
}

/// The flags `delegation-operator <subcommand>` knows.
fn known_flags(subcommand: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_delegation-operator"))
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    regex_lite::Regex::new(r"--[a-z][a-z0-9-]*")
        .unwrap()
        .find_iter(&help)
        .map(|m| m.as_str().to_owned())
        .collect()
}

/// The Deployment's container arguments as the kubelet passes them: `$(VAR)` expanded from the
/// container's environment (the downward API gives POD_NAME and POD_NAMESPACE).
fn container_args(deployment: &Deployment, pod_name: &str) -> Vec<String> {
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    let namespace = deployment.namespace().unwrap();
    let env = |name: &str| -> String {
        let var = container
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("$({name}) is not in the container's env"));
        match var.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
            Some(f) if f.field_path == "metadata.namespace" => namespace.clone(),
            Some(f) if f.field_path == "metadata.name" => pod_name.to_owned(),
            _ => var.value.clone().unwrap_or_default(),
        }
    };
    let var = regex_lite::Regex::new(r"\$\(([A-Z_][A-Z0-9_]*)\)").unwrap();
    let mut args: Vec<String> = container.command.clone().unwrap_or_default();
    args.extend(container.args.clone().unwrap_or_default());
    args.into_iter()
        .map(|a| {
            var.replace_all(&a, |c: &regex_lite::Captures| {
                env(c.get(1).unwrap().as_str())
            })
            .into_owned()
        })
        .collect()
}

/// The chart's arguments, each checked to be a flag the binary under test knows for the subcommand
/// they start with.
fn runnable(args: Vec<String>) -> Vec<String> {
    let subcommand = args.first().expect("a subcommand").clone();
    let known = known_flags(&subcommand);
    for arg in &args {
        let flag = arg.split('=').next().unwrap();
        assert!(
            !flag.starts_with("--") || known.iter().any(|k| k == flag),
            "the chart passes {arg}, which `delegation-operator {subcommand}` does not know"
        );
    }
    args
}

/// What the kubelet does for the Deployment's Secret volumes: each mounted Secret's items written
/// into a directory of their own, which then stands in for the mount path in the arguments.
async fn mount_secret_volumes(
    client: &Client,
    deployment: &Deployment,
    args: Vec<String>,
) -> (Vec<String>, Vec<PathBuf>) {
    let namespace = deployment.namespace().unwrap();
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    let mut args = args;
    let mut dirs = Vec::new();
    for mount in pod.containers[0].volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("no volume {}", mount.name));
        let source = volume.secret.as_ref().expect("only Secret volumes");
        let secret_name = source.secret_name.as_deref().unwrap();
        let secret = Api::<Secret>::namespaced(client.clone(), &namespace)
            .get(secret_name)
            .await
            .unwrap_or_else(|e| panic!("Secret {secret_name} to mount: {e}"));
        let data = secret.data.unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("chart-mount-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        for item in source.items.iter().flatten() {
            std::fs::write(dir.join(&item.path), &data[&item.key].0).unwrap();
        }
        let path = dir.to_str().unwrap().to_owned();
        args = args
            .into_iter()
            .map(|a| a.replace(&mount.mount_path, &path))
            .collect();
        dirs.push(dir);
    }
    (args, dirs)
}

/// Puts Helm's ownership metadata on the chart's cluster-scoped objects that already exist (the test
/// harness applies the CRDs and admission policies without Helm): Helm's documented way to adopt
/// existing objects into a release.
async fn adopt_existing(release: &str, namespace: &str, rendered: &[Value]) {
    for doc in rendered
        .iter()
        .filter(|d| d["metadata"]["namespace"].is_null())
    {
        let kind = doc["kind"].as_str().unwrap();
        let group = doc["apiVersion"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        let object = format!(
            "{kind}.{group}/{}",
            doc["metadata"]["name"].as_str().unwrap()
        );
        let exists = kubectl(&["get", &object, "--ignore-not-found", "-o", "name"]).await;
        if String::from_utf8_lossy(&exists.stdout).trim().is_empty() {
            continue;
        }
        for args in [
            vec![
                "annotate".to_owned(),
                "--overwrite".into(),
                object.clone(),
                format!("meta.helm.sh/release-name={release}"),
                format!("meta.helm.sh/release-namespace={namespace}"),
            ],
            vec![
                "label".to_owned(),
                "--overwrite".into(),
                object.clone(),
                "app.kubernetes.io/managed-by=Helm".into(),
            ],
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = kubectl(&args).await;
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Binds a ClusterRole to a user in a namespace (a RoleBinding), and waits until the authorizer
/// allows the user every rule of the role there: a binding (and a role Helm just created) reaches
/// the authorizer a moment after the write returns.
async fn bind(client: &Client, namespace: &str, cluster_role: &str, user: &str) {
    let binding = RoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{cluster_role}-{}", user.replace(['@', '.'], "-"))),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: cluster_role.into(),
        },
        subjects: Some(vec![user_subject(user)]),
    };
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .patch(
            binding.metadata.name.as_deref().unwrap(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&binding),
        )
        .await
        .unwrap();
    let rules = Api::<ClusterRole>::all(client.clone())
        .get(cluster_role)
        .await
        .unwrap_or_else(|e| panic!("ClusterRole {cluster_role}: {e}"))
        .rules
        .unwrap_or_default();
    for rule in &rules {
        wait_allowed(client, namespace, &user_subject(user), rule).await;
    }
}

/// What the roles bound to the chart's ServiceAccount allow, rule by rule, with the namespace each
/// applies in: its ClusterRoleBindings (asked in the release namespace) and its RoleBindings in the
/// release namespace and in each namespace the operator watches (`--namespace=` of `args`).
async fn operator_rbac(
    client: &Client,
    release_ns: &str,
    fullname: &str,
    args: &[String],
) -> Vec<(String, PolicyRule)> {
    use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, Subject};
    let is_account = |subjects: &Option<Vec<Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == fullname
                && s.namespace.as_deref() == Some(release_ns)
        })
    };
    let mut bound: Vec<(String, RoleRef)> = Vec::new();
    for binding in Api::<ClusterRoleBinding>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap()
    {
        if is_account(&binding.subjects) {
            bound.push((release_ns.to_owned(), binding.role_ref));
        }
    }
    let watched = args.iter().filter_map(|a| a.strip_prefix("--namespace="));
    for namespace in std::iter::once(release_ns).chain(watched) {
        for binding in Api::<RoleBinding>::namespaced(client.clone(), namespace)
            .list(&Default::default())
            .await
            .unwrap()
        {
            if is_account(&binding.subjects) {
                bound.push((namespace.to_owned(), binding.role_ref));
            }
        }
    }
    let mut rules = Vec::new();
    for (namespace, role_ref) in bound {
        let role_rules = if role_ref.kind == "ClusterRole" {
            Api::<ClusterRole>::all(client.clone())
                .get(&role_ref.name)
                .await
                .map(|r| r.rules)
        } else {
            Api::<Role>::namespaced(client.clone(), &namespace)
                .get(&role_ref.name)
                .await
                .map(|r| r.rules)
        }
        .unwrap_or_else(|e| panic!("{} {}: {e}", role_ref.kind, role_ref.name));
        rules.extend(
            role_rules
                .unwrap_or_default()
                .into_iter()
                .map(|rule| (namespace.clone(), rule)),
        );
    }
    rules
}

/// Creates (server-side apply) one of our objects as `client`, retrying while RBAC catches up.
async fn apply_as(client: &Client, namespace: &str, yaml: &str) {
    let value =
        serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(yaml).unwrap()).unwrap();
    let mut obj: kube::api::DynamicObject = serde_json::from_value(value).unwrap();
    obj.metadata.namespace = Some(namespace.into());
    let kind = obj.types.as_ref().unwrap().kind.clone();
    let name = obj.metadata.name.clone().unwrap();
    let api = dynamic_api(client, namespace, &kind);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&obj),
            )
            .await
        {
            Ok(_) => return,
            // RBAC is served from a cache that lags the RoleBindings a little.
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "apply {kind}/{name}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `client` is refused (403) creating an object of `kind`.
async fn forbidden_to_create(client: &Client, namespace: &str, kind: &str, spec: Value) -> bool {
    let obj = our_object(kind, "rbac-probe", spec);
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    matches!(
        dynamic_api(client, namespace, kind).create(&params, &obj).await,
        Err(kube::Error::Api(s)) if s.code == 403
    )
}

async fn wait_ready(
    grants: &Api<delegation_operator::api::DelegationGrant>,
    name: &str,
    status: &str,
    reason: &str,
) -> delegation_operator::api::DelegationGrant {
    wait_for(
        &format!("grant {name} Ready={status} reason={reason}"),
        Duration::from_secs(60),
        || async {
            let grant = grants.get_opt(name).await.ok()??;
            let s = grant.status.as_ref()?;
            let cond = s.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready")?;
            (s.observed_generation == grant.metadata.generation
                && cond.status == status
                && cond.reason == reason)
                .then(|| grant.clone())
        },
    )
    .await
}

async fn jwks(client: &Client, operator_namespace: &str) -> Value {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), operator_namespace)
        .get("delegation-operator-jwks")
        .await
        .unwrap();
    serde_json::from_str(&cm.data.unwrap()["jwks.json"]).unwrap()
}

async fn token_in(secrets: &Api<Secret>, name: &str) -> Option<String> {
    let secret = secrets.get_opt(name).await.unwrap()?;
    Some(String::from_utf8(secret.data?.get("token")?.0.clone()).unwrap())
}

/// GET an endpoint of the operator over HTTPS, trusting only the CA in the chart's TLS Secret.
async fn https_get(client: &Client, namespace: &str, port: u16, path: &str) -> (String, String) {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get("delegation-operator-tls")
        .await
        .expect("the operator created the self-signed TLS Secret");
    let ca = std::env::temp_dir().join(format!("chart-ca-{}.pem", uuid::Uuid::new_v4().simple()));
    std::fs::write(&ca, &secret.data.unwrap()["ca.crt"].0).unwrap();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
        .arg(&ca)
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .await
        .expect("curl");
    let _ = std::fs::remove_file(&ca);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    (code.to_owned(), body.to_owned())
}

/// Waits until each of `paths` answers 200 over HTTPS on `port`.
async fn wait_answers(client: &Client, namespace: &str, port: u16, paths: &[&str]) {
    for path in paths {
        wait_for(
            &format!("{path} on port {port} answers 200"),
            Duration::from_secs(60),
            || async {
                let answer = https_get(client, namespace, port, path).await;
                (answer.0 == "200").then_some(())
            },
        )
        .await;
    }
}

/// Starts the operator as the installed chart's Deployment runs it, with a fresh token of the chart's
/// ServiceAccount; returns it and the arguments it got.
async fn start_as_deployed(
    client: &Client,
    release_ns: &str,
    fullname: &str,
    pod: &str,
    https_port: u16,
) -> (ChartOperator, Vec<String>) {
    let deployment = Api::<Deployment>::namespaced(client.clone(), release_ns)
        .get(fullname)
        .await
        .unwrap();
    let mut args = runnable(container_args(&deployment, pod));
    assert_eq!(args.first().map(String::as_str), Some("run"));
    // The only change: the Pod listens on 8443 on its own IP; here several tests share one host.
    // (`run` lets a later flag override an earlier one.)
    args.push(format!("--https-address=127.0.0.1:{https_port}"));
    // The RBAC Helm just wrote reaches the authorizer a moment after Helm returns; an operator
    // started before that is refused (and its log says so).
    let account = service_account_subject(release_ns, fullname);
    for (namespace, rule) in operator_rbac(client, release_ns, fullname, &args).await {
        wait_allowed(client, &namespace, &account, &rule).await;
    }
    let kubeconfig = service_account_kubeconfig(client, release_ns, fullname).await;
    let operator = ChartOperator::start(&args, kubeconfig, pod, release_ns);
    (operator, args)
}

/// Starts the verification server as the installed chart's Deployment runs it: its Secret volume
/// mounted, with a fresh token of its own ServiceAccount; returns it and the arguments it got.
async fn start_verifier_as_deployed(
    client: &Client,
    release_ns: &str,
    name: &str,
    pod: &str,
    https_port: u16,
) -> (ChartOperator, Vec<String>) {
    let deployment = Api::<Deployment>::namespaced(client.clone(), release_ns)
        .get(name)
        .await
        .unwrap();
    let args = runnable(container_args(&deployment, pod));
    assert_eq!(args.first().map(String::as_str), Some("serve"));
    let (mut args, mounted) = mount_secret_volumes(client, &deployment, args).await;
    args.push(format!("--https-address=127.0.0.1:{https_port}"));
    let account = service_account_subject(release_ns, name);
    for (namespace, rule) in operator_rbac(client, release_ns, name, &args).await {
        wait_allowed(client, &namespace, &account, &rule).await;
    }
    let kubeconfig = service_account_kubeconfig(client, release_ns, name).await;
    let mut server = ChartOperator::start(&args, kubeconfig, pod, release_ns);
    server.mounted = mounted;
    (server, args)
}

#[tokio::test]
async fn installed_chart_runs_the_grant_lifecycle_under_its_own_service_account() {
    let client = client().await;
    // As every test binary does: CRDs and policies applied (without Helm) and in effect.
    install_crds(&client).await;
    let crds_before = crd_uids(&client).await;
    let policy_uids_before = policy_uids(&client).await;

    let release_ns = fresh_namespace(&client, "chart").await;
    let watch_ns = fresh_namespace(&client, "chart-watch").await;
    let release = format!("dop-{}", &release_ns[release_ns.len() - 8..]);
    let fullname = format!("{release}-delegation-operator");
    let chart = repo_root().join(CHART);
    let chart = chart.to_str().unwrap();
    // One namespace only: other tests' grants on this apiserver are not ours to reconcile.
    let values = format!("watchNamespace={watch_ns}");

    let _uninstall_on_failure = ReleaseGuard {
        release: release.clone(),
        namespace: release_ns.clone(),
    };
    let rendered = render(&["--set", &values]);
    adopt_existing(&release, &release_ns, &rendered).await;
    let installed = helm_cluster(&[
        "install",
        &release,
        chart,
        "--namespace",
        &release_ns,
        "--set",
        &values,
    ]);
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    assert!(
        installed.contains("Issuer (the `iss` of every token"),
        "NOTES: {installed}"
    );
    // Adopted, not replaced: the same CRDs (their objects survive), the same policies (grants stamped
    // before stay trusted).
    assert_eq!(crd_uids(&client).await, crds_before);
    assert_eq!(policy_uids(&client).await, policy_uids_before);
    for crd in Api::<CustomResourceDefinition>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|c| c.spec.group == "delegation.nhi.dev")
    {
        assert_eq!(
            crd.annotations()
                .get("helm.sh/resource-policy")
                .map(String::as_str),
            Some("keep")
        );
        assert_eq!(crd.annotations()["meta.helm.sh/release-name"], release);
    }

    // People: an admin defines the agent, a developer requests the grant, a viewer only reads.
    let admin_user = format!("admin@{release}.test");
    let dev_user = format!("dev@{release}.test");
    let viewer_user = format!("viewer@{release}.test");
    bind(&client, &watch_ns, "delegation-admin", &admin_user).await;
    bind(&client, &watch_ns, "delegation-edit", &dev_user).await;
    bind(&client, &watch_ns, "delegation-view", &viewer_user).await;
    // Naming alice as principal needs verb `delegate` on her, granted explicitly.
    grant_role(
        &client,
        &watch_ns,
        "delegate-for-alice",
        &[user_subject(&dev_user)],
        &[rule(
            "delegation.nhi.dev",
            &["users"],
            &["delegate"],
            &["alice@example.com"],
        )],
    )
    .await;
    let admin = client_as(&admin_user, &[]).await;
    let dev = client_as(&dev_user, &[]).await;
    let viewer = client_as(&viewer_user, &[]).await;
    apply_as(
        &admin,
        &watch_ns,
        "apiVersion: delegation.nhi.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {name: triage}\nspec:\n  owner: {kind: Group, name: platform}\n  allowedScopes: [tickets:read]\n  allowedAudiences: [https://tickets.example.com]\n  maxTokenTTL: 20h\n",
    )
    .await;
    let agent_spec = json!({"owner": {"kind": "Group", "name": "x"}, "allowedScopes": ["a"],
        "allowedAudiences": [AUDIENCE], "maxTokenTTL": "1m"});
    assert!(forbidden_to_create(&dev, &watch_ns, "AgentIdentity", agent_spec.clone()).await);
    let grant_spec = json!({"principal": {"kind": "User", "name": viewer_user}, "actorRef": {"name": "triage"},
        "scopes": ["tickets:read"], "audience": AUDIENCE, "tokenTTL": "10m"});
    assert!(forbidden_to_create(&viewer, &watch_ns, "DelegationGrant", grant_spec).await);
    let grant = |name: &str, ttl: &str| {
        format!(
            "apiVersion: delegation.nhi.dev/v1alpha1\nkind: DelegationGrant\nmetadata: {{name: {name}}}\nspec:\n  principal: {{kind: User, name: alice@example.com}}\n  actorRef: {{name: triage}}\n  scopes: [tickets:read]\n  audience: {AUDIENCE}\n  tokenTTL: {ttl}\n"
        )
    };

    // The operator, as the Deployment runs it, with the chart's ServiceAccount.
    let https_port = free_port();
    let (operator, args) = start_as_deployed(
        &client,
        &release_ns,
        &fullname,
        &format!("{fullname}-0"),
        https_port,
    )
    .await;
    assert!(
        args.contains(&format!("--namespace={watch_ns}")),
        "{args:?}"
    );
    assert!(
        args.contains(&format!("--operator-namespace={release_ns}")),
        "{args:?}"
    );

    let grants: Api<delegation_operator::api::DelegationGrant> =
        Api::namespaced(client.clone(), &watch_ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &watch_ns);
    apply_as(&dev, &watch_ns, &grant("lifecycle", "13h")).await;
    let ready = wait_ready(&grants, "lifecycle", "True", "Issued").await;
    assert_eq!(
        ready.spec.requester.as_ref().map(|r| r.username.as_str()),
        Some(dev_user.as_str()),
        "stamped by the chart's admission policy"
    );
    let token = token_in(&secrets, "lifecycle-token")
        .await
        .expect("a token Secret");
    let claims = delegation_operator::signing::verify(
        &token,
        &jwks(&client, &release_ns).await,
        AUDIENCE,
        0,
    )
    .expect("the token verifies against the JWKS in the release namespace");
    assert_eq!(claims["sub"], "user:alice@example.com");
    assert_eq!(
        claims["iss"],
        format!("https://{fullname}.{release_ns}.svc")
    );
    let lease = Api::<Lease>::namespaced(client.clone(), &release_ns)
        .get("delegation-operator-leader")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(format!("{fullname}-0").as_str()),
        "the replica leads under its POD_NAME"
    );
    wait_for("an Issued Event", Duration::from_secs(10), || async {
        let list =
            Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &watch_ns)
                .list(&Default::default())
                .await
                .ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Issued"))
            .then_some(())
    })
    .await;
    // The controller serves its probes (with the certificate it generated) and nothing a verifier
    // would ask for.
    wait_answers(&client, &release_ns, https_port, &["/healthz", "/readyz"]).await;
    let (code, _) = https_get(&client, &release_ns, https_port, "/.well-known/jwks.json").await;
    assert_eq!(
        code, "404",
        "the controller serves no verification endpoint"
    );

    // The verification server, as its Deployment runs it, under its own ServiceAccount: the same
    // issuer, and a JWKS the grant's token verifies with.
    let verifier_name = format!("{fullname}-verifier");
    let verifier_port = free_port();
    let (verifier, verifier_args) = start_verifier_as_deployed(
        &client,
        &release_ns,
        &verifier_name,
        &format!("{verifier_name}-0"),
        verifier_port,
    )
    .await;
    wait_answers(
        &client,
        &release_ns,
        verifier_port,
        &["/healthz", "/readyz"],
    )
    .await;
    let (code, body) = https_get(
        &client,
        &release_ns,
        verifier_port,
        "/.well-known/openid-configuration",
    )
    .await;
    assert_eq!(code, "200", "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        doc["issuer"],
        format!("https://{fullname}.{release_ns}.svc")
    );
    let (code, body) = https_get(
        &client,
        &release_ns,
        verifier_port,
        "/.well-known/jwks.json",
    )
    .await;
    assert_eq!(code, "200", "{body}");
    let served: Value = serde_json::from_str(&body).unwrap();
    delegation_operator::signing::verify(&token, &served, AUDIENCE, 0)
        .expect("the token verifies against the JWKS the verification server serves");
    // It ran on exactly the chart's rights (its log would say what was forbidden).
    let verifier_rules = operator_rbac(&client, &release_ns, &verifier_name, &verifier_args).await;
    assert!(
        !verifier_rules
            .iter()
            .any(|(_, r)| r.resources.iter().flatten().any(|x| x == "secrets")),
        "{verifier_rules:?}"
    );
    verifier.terminate();

    // Suspend: the token is revoked and its Secret deleted.
    let suspended = token_in(&secrets, "lifecycle-token")
        .await
        .expect("the grant's token");
    dynamic_api(&dev, &watch_ns, "DelegationGrant")
        .patch(
            "lifecycle",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"suspended": true}})),
        )
        .await
        .unwrap();
    wait_ready(&grants, "lifecycle", "False", "Suspended").await;
    assert!(secrets.get_opt("lifecycle-token").await.unwrap().is_none());
    assert_eq!(
        published_status_of(&client, &release_ns, &suspended).await,
        1,
        "the suspended grant's token is INVALID in the published status list"
    );
    // Delete: the finalizer is released.
    dynamic_api(&dev, &watch_ns, "DelegationGrant")
        .delete("lifecycle", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("grant lifecycle gone", Duration::from_secs(30), || async {
        grants
            .get_opt("lifecycle")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(secrets.get_opt("lifecycle-token").await.unwrap().is_none());

    // Upgrade: a value changes the Deployment; restarted with it (as a rollout would), the operator
    // enforces it. The release's CRDs are the same objects.
    operator.terminate();
    let upgraded = helm_cluster(&[
        "upgrade",
        &release,
        chart,
        "--namespace",
        &release_ns,
        "--reuse-values",
        "--set",
        "tokenTTL.max=12h",
    ]);
    assert!(upgraded.contains("REVISION: 2"), "{upgraded}");
    let (operator, args) = start_as_deployed(
        &client,
        &release_ns,
        &fullname,
        &format!("{fullname}-1"),
        https_port,
    )
    .await;
    assert!(args.contains(&"--max-token-ttl=12h".to_owned()), "{args:?}");
    apply_as(&dev, &watch_ns, &grant("too-long", "13h")).await;
    wait_ready(&grants, "too-long", "False", "DeniedTTLTooLong").await;
    apply_as(&dev, &watch_ns, &grant("survivor", "10m")).await;
    let survivor = wait_ready(&grants, "survivor", "True", "Issued").await;
    assert_eq!(crd_uids(&client).await, crds_before);

    // Uninstall: the operator's Pods, ServiceAccount and RBAC go; CRDs and policies stay (keep), and
    // with them the grants, their finalizers and their token Secrets.
    let operator_rules = operator_rbac(&client, &release_ns, &fullname, &args).await;
    operator.terminate();
    let uninstalled = helm_cluster(&["uninstall", &release, "--namespace", &release_ns]);
    assert!(
        uninstalled.contains("kept due to the resource policy"),
        "{uninstalled}"
    );
    assert_eq!(crd_uids(&client).await, crds_before);
    // Every policy stays but the finalizer's: with no operator it would hold new grants' deletion.
    let kept: Vec<_> = policy_uids_before
        .iter()
        .filter(|(name, _)| name != FINALIZER_POLICY)
        .cloned()
        .collect();
    let finalizer_policy = Api::<
        k8s_openapi::api::admissionregistration::v1::MutatingAdmissionPolicy,
    >::all(client.clone())
    .get_opt(FINALIZER_POLICY)
    .await
    .unwrap();
    assert!(
        finalizer_policy.is_none(),
        "the finalizer policy outlived the release"
    );
    assert_eq!(policy_uids(&client).await, kept);
    for name in [
        fullname.as_str(),
        "delegation-admin",
        "delegation-edit",
        "delegation-view",
    ] {
        assert!(
            Api::<ClusterRole>::all(client.clone())
                .get_opt(name)
                .await
                .unwrap()
                .is_none(),
            "ClusterRole {name} left behind"
        );
    }
    assert!(
        Api::<Deployment>::namespaced(client.clone(), &release_ns)
            .get_opt(&fullname)
            .await
            .unwrap()
            .is_none()
    );
    let kept = grants.get("survivor").await.unwrap();
    assert_eq!(kept.finalizers(), survivor.finalizers());
    assert!(!kept.finalizers().is_empty());
    assert!(
        token_in(&secrets, "survivor-token").await.is_some(),
        "tokens stay until they expire"
    );
    // Deleting a grant with no operator: it waits on its finalizer.
    grants
        .delete("survivor", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = grants.get("survivor").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    let survivor_token = token_in(&secrets, "survivor-token")
        .await
        .expect("the Secret waits with the grant");

    // The uninstall's RBAC deletions reach the authorizer a moment later: wait until it refuses the
    // ServiceAccount, so that what allows it after the next install is the new RBAC, not a stale view.
    let account = service_account_subject(&release_ns, &fullname);
    for (namespace, rule) in &operator_rules {
        wait_denied(&client, namespace, &account, rule).await;
    }

    // Installed again, the release adopts the kept objects by itself; the operator finishes the
    // deletion it missed: token revoked, Secret gone, finalizer released.
    helm_cluster(&[
        "install",
        &release,
        chart,
        "--namespace",
        &release_ns,
        "--set",
        &values,
    ]);
    let (operator, _) = start_as_deployed(
        &client,
        &release_ns,
        &fullname,
        &format!("{fullname}-2"),
        https_port,
    )
    .await;
    wait_for(
        "grant survivor finalized",
        Duration::from_secs(60),
        || async {
            grants
                .get_opt("survivor")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(secrets.get_opt("survivor-token").await.unwrap().is_none());
    assert_eq!(
        published_status_of(&client, &release_ns, &survivor_token).await,
        1,
        "the token of the grant deleted while no operator ran is INVALID in the published list"
    );
    operator.terminate();
    helm_cluster(&["uninstall", &release, "--namespace", &release_ns]);

    // Left as the other test binaries need it: CRDs and policies installed and in effect.
    assert_eq!(crd_uids(&client).await, crds_before);
    reinstall_admission_policies(&client).await;
}

async fn crd_uids(client: &Client) -> Vec<(String, String)> {
    let mut uids: Vec<(String, String)> = Api::<CustomResourceDefinition>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|c| c.spec.group == "delegation.nhi.dev")
        .map(|c| (c.name_any(), c.uid().unwrap()))
        .collect();
    uids.sort();
    assert_eq!(uids.len(), crd_files().len());
    uids
}

/// The uid of each policy of `admission/policies.yaml` that exists.
async fn policy_uids(client: &Client) -> Vec<(String, String)> {
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingAdmissionPolicy, ValidatingAdmissionPolicy,
    };
    let mut created = Vec::new();
    for doc in delegation_operator::admission::documents() {
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        let uid = match doc["kind"].as_str().unwrap() {
            "MutatingAdmissionPolicy" => Api::<MutatingAdmissionPolicy>::all(client.clone())
                .get_opt(&name)
                .await
                .unwrap()
                .and_then(|p| p.uid()),
            "ValidatingAdmissionPolicy" => Api::<ValidatingAdmissionPolicy>::all(client.clone())
                .get_opt(&name)
                .await
                .unwrap()
                .and_then(|p| p.uid()),
            _ => continue,
        };
        if let Some(uid) = uid {
            created.push((name, uid));
        }
    }
    created
}

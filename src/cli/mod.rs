//! Commands for people, beside the operator itself: approving and rejecting grants, revoking keys,
//! inspecting a token ([`inspect`]), exchanging one for a narrower one ([`exchange`]) and showing a namespace's grants as a tree ([`tree`]). The binary
//! also works as a kubectl plugin: installed as `kubectl-delegation`, it is `kubectl delegation ...`.

pub mod exchange;
mod https;
pub mod inspect;
pub mod tree;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, PostParams},
};

use crate::api::{Decision, DelegationApproval, DelegationApprovalSpec, DelegationGrant, GrantRef};

/// Records a decision on the grant's current generation as a DelegationApproval. The apiserver stamps
/// who decided and refuses anyone not allowed verb `approve` on the grant. With `reviewed`, the
/// decision is for exactly the generation the approver reviewed, and refused when the grant has
/// changed since (an approval only ever counts for the generation it names). Returns the approval's
/// name.
pub async fn decide(
    client: Client,
    namespace: &str,
    grant_name: &str,
    decision: Decision,
    comment: Option<String>,
    reviewed: Option<i64>,
) -> Result<String, String> {
    let grants: Api<DelegationGrant> = Api::namespaced(client.clone(), namespace);
    let grant = grants
        .get_opt(grant_name)
        .await
        .map_err(|e| format!("reading DelegationGrant {namespace}/{grant_name}: {e}"))?
        .ok_or_else(|| format!("DelegationGrant {namespace}/{grant_name} does not exist"))?;
    let (Some(uid), Some(generation)) = (grant.uid(), grant.metadata.generation) else {
        return Err(format!(
            "DelegationGrant {namespace}/{grant_name} has no uid or generation"
        ));
    };
    if let Some(reviewed) = reviewed
        && reviewed != generation
    {
        return Err(format!(
            "DelegationGrant {namespace}/{grant_name} is at generation {generation}, not generation {reviewed} that you reviewed: it changed since; review it again (kubectl get delegationgrant {grant_name} -n {namespace} -o yaml) and decide on the generation you see"
        ));
    }
    let approval = DelegationApproval {
        metadata: ObjectMeta {
            // Kept short enough for the random suffix the apiserver adds.
            generate_name: Some(format!("{}-", truncate(grant_name, 200))),
            namespace: Some(namespace.to_owned()),
            // Cleaned up with the grant by Kubernetes' garbage collector.
            owner_references: Some(vec![OwnerReference {
                api_version: DelegationGrant::api_version(&()).into_owned(),
                kind: DelegationGrant::kind(&()).into_owned(),
                name: grant_name.to_owned(),
                uid: uid.clone(),
                controller: None,
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: DelegationApprovalSpec {
            grant_ref: GrantRef {
                name: grant_name.to_owned(),
                uid,
            },
            generation,
            decision,
            comment,
            approver: None,
        },
    };
    let approvals: Api<DelegationApproval> = Api::namespaced(client, namespace);
    let created = approvals
        .create(&PostParams::default(), &approval)
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) => status.message,
            other => other.to_string(),
        })?;
    Ok(created.name_any())
}

fn truncate(name: &str, max: usize) -> &str {
    match name.char_indices().nth(max) {
        Some((i, _)) => &name[..i],
        None => name,
    }
}

/// Asks the running operator to revoke signing keys at once (an emergency, e.g. a leaked key): the
/// key ids are added to an annotation of the keys Secret in the operator namespace; the operator drops
/// them from its keyring and the published JWKS, signs with a fresh key, and reissues every token they
/// signed. Needs `get` and `patch` on that Secret (operator administrators only).
pub async fn revoke_keys(
    client: Client,
    operator_namespace: &str,
    kids: &[String],
) -> Result<String, String> {
    use crate::operator::publishing::keys::{KEYS_SECRET_NAME, REVOKE_KEYS_ANNOTATION};
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client, operator_namespace);
    let current = secrets
        .get_metadata_opt(KEYS_SECRET_NAME)
        .await
        .map_err(|e| format!("reading Secret {operator_namespace}/{KEYS_SECRET_NAME}: {e}"))?
        .ok_or_else(|| format!("Secret {operator_namespace}/{KEYS_SECRET_NAME} does not exist: is the operator running there?"))?;
    let mut revoked: Vec<String> = current
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVOKE_KEYS_ANNOTATION))
        .map(|v| {
            v.split(',')
                .map(str::to_owned)
                .filter(|k| !k.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for kid in kids {
        if !revoked.contains(kid) {
            revoked.push(kid.clone());
        }
    }
    let value = revoked.join(",");
    let patch = serde_json::json!({"metadata": {"annotations": {REVOKE_KEYS_ANNOTATION: value}}});
    secrets
        .patch(
            KEYS_SECRET_NAME,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(value)
}

/// What the binary is called when it runs as a kubectl plugin (installed as `kubectl-delegation`).
pub const PLUGIN_NAME: &str = "kubectl delegation";

/// The name to show in help and errors for a program started as `argv0`: [`PLUGIN_NAME`] when its
/// file name is `kubectl-delegation` (with or without `.exe`), else `None` (the default name).
pub fn plugin_name(argv0: Option<&std::ffi::OsStr>) -> Option<&'static str> {
    let stem = std::path::Path::new(argv0?).file_stem()?;
    (stem == "kubectl-delegation").then_some(PLUGIN_NAME)
}

/// Parses the command line like `P::parse()`, but names the program `kubectl delegation` when it
/// runs as that kubectl plugin.
pub fn parse<P: clap::Parser>() -> P {
    let mut command = P::command();
    if let Some(name) = plugin_name(std::env::args_os().next().as_deref()) {
        command = command.name(name).bin_name(name).display_name(name);
    }
    let mut matches = command.clone().get_matches();
    P::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut command).exit())
}

/// The client configuration, like kubectl's: `--kubeconfig` (else `$KUBECONFIG`, `~/.kube/config`,
/// in-cluster) and `--context`.
pub async fn kube_config(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<kube::Config, String> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    match (kubeconfig, context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| e.to_string())
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| e.to_string()),
        (None, None) => kube::Config::infer().await.map_err(|e| e.to_string()),
    }
}

/// Runs `f` on a fresh runtime; an error is printed and exits with 2 (could not check).
fn block_on<F>(f: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<std::process::ExitCode, String>>,
{
    let outcome = tokio::runtime::Runtime::new()
        .map_err(|e| format!("could not start the async runtime: {e}"))
        .and_then(|rt| rt.block_on(f));
    outcome.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::ExitCode::from(2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_name_follows_the_file_name() {
        let name = |s: &str| plugin_name(Some(std::ffi::OsStr::new(s)));
        assert_eq!(name("/usr/local/bin/kubectl-delegation"), Some(PLUGIN_NAME));
        assert_eq!(name("kubectl-delegation"), Some(PLUGIN_NAME));
        assert_eq!(name("C:/bin/kubectl-delegation.exe"), Some(PLUGIN_NAME));
        assert_eq!(name("/usr/bin/delegation-operator"), None);
        assert_eq!(name("kubectl-delegation-old"), None);
        assert_eq!(plugin_name(None), None);
    }
}

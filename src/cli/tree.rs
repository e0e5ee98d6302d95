//! `tree`: the grants of a namespace (or all) as a tree from each principal down the
//! `parentGrantRef`s, with their state and the live tokens exchanged from each grant's token (the
//! counts the replicas serving `/token` publish, [`crate::endpoints::token::live`]), then the
//! agents. The rendering is [`crate::delegation::explain::render_tree`].

use std::path::PathBuf;
use std::process::ExitCode;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client, api::ListParams};

use crate::api::{AgentIdentity, DelegationGrant};
use crate::delegation::explain::render_tree;
use crate::endpoints::token::live;

/// Show the DelegationGrants as a tree (principal -> grant -> the grants below it) with their Ready
/// state, agent, scopes, token expiry and live exchanged tokens (a count), then the AgentIdentities.
#[derive(clap::Args, Debug)]
pub struct TreeArgs {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// All namespaces.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// The operator's namespace, where the replicas serving token exchange publish how many
    /// exchanged tokens are live per grant (ConfigMap delegation-operator-exchanges).
    #[arg(long, default_value = "delegation-system")]
    pub operator_namespace: String,
    /// Kubeconfig file to use; without it, the usual discovery ($KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long)]
    pub context: Option<String>,
}

/// Runs `tree`.
pub fn run(args: TreeArgs) -> ExitCode {
    super::block_on(tree(args))
}

async fn tree(args: TreeArgs) -> Result<ExitCode, String> {
    let config = super::kube_config(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| e.to_string())?;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &args.operator_namespace);
    let (grants, agents): (Api<DelegationGrant>, Api<AgentIdentity>) = if args.all_namespaces {
        (Api::all(client.clone()), Api::all(client))
    } else {
        (
            Api::namespaced(client.clone(), &namespace),
            Api::namespaced(client, &namespace),
        )
    };
    let where_ = if args.all_namespaces {
        "in any namespace".to_owned()
    } else {
        format!("in namespace {namespace}")
    };
    let grants = grants
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing DelegationGrants {where_}: {e}"))?
        .items;
    let agents = agents
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing AgentIdentities {where_}: {e}"))?
        .items;
    if grants.is_empty() && agents.is_empty() {
        eprintln!("No DelegationGrants or AgentIdentities found {where_}.");
        return Ok(ExitCode::SUCCESS);
    }
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let (exchanged, note) = match configmaps.get_opt(live::CONFIGMAP_NAME).await {
        Ok(cm) => {
            let data = cm.and_then(|cm| cm.data).unwrap_or_default();
            let (live, omitted) = live::live_by_grant_uid(&data, now);
            let note = (omitted > 0).then(|| {
                format!(
                    "note: {omitted} more grants have live exchanged tokens whose counts are not published (over a replica's limit of {} grants)",
                    live::MAX_PUBLISHED_GRANTS
                )
            });
            (live, note)
        }
        Err(e) => (
            BTreeMap::new(),
            Some(format!(
                "note: exchanged-token counts were not readable (ConfigMap {} in namespace {}: {})",
                live::CONFIGMAP_NAME,
                args.operator_namespace,
                short_error(&e)
            )),
        ),
    };
    print!(
        "{}",
        crate::delegation::explain::printable(&render_tree(
            &grants,
            &agents,
            &exchanged,
            now,
            args.all_namespaces
        ))
    );
    if let Some(note) = note {
        eprintln!("{}", crate::delegation::explain::printable(&note));
    }
    Ok(ExitCode::SUCCESS)
}

/// The apiserver's reason (`Forbidden`, `NotFound`, ...) or the error itself.
fn short_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if !status.reason.is_empty() => status.reason.clone(),
        other => other.to_string(),
    }
}

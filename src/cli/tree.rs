//! `tree`: the grants of a namespace (or all) as a tree from each principal down the
//! `parentGrantRef`s, with their state, then the agents. The rendering is
//! [`crate::delegation::explain::render_tree`].

use std::path::PathBuf;
use std::process::ExitCode;

use kube::{Api, Client, api::ListParams};

use crate::api::{AgentIdentity, DelegationGrant};
use crate::delegation::explain::render_tree;

/// Show the DelegationGrants as a tree (principal -> grant -> the grants below it) with their Ready
/// state, agent, scopes and token expiry, then the AgentIdentities.
#[derive(clap::Args, Debug)]
pub struct TreeArgs {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// All namespaces.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
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
    print!(
        "{}",
        crate::delegation::explain::printable(&render_tree(
            &grants,
            &agents,
            now,
            args.all_namespaces
        ))
    );
    Ok(ExitCode::SUCCESS)
}

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use delegation_operator::{
    api::{self, parse_duration},
    delegation::Policy,
    operator::{self, Settings},
    signing::Algorithm,
};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Kubernetes operator that turns DelegationGrants into short-lived, scoped, signed tokens.
#[derive(Parser)]
#[command(name = "delegation-operator", version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (pipe into `kubectl apply -f -`).
    Crds {
        /// Write one file per CRD into this directory instead (how `crds/` is regenerated).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Print the admission policies that stamp who created each grant and check who may delegate
    /// (pipe into `kubectl apply --server-side -f -`, after the CRDs).
    AdmissionPolicies,
    /// Run the operator: reconcile DelegationGrants and AgentIdentities into tokens.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Kubeconfig file to use; without it, the usual discovery ($KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long)]
    namespace: Option<String>,
    /// The operator's own namespace: signing keys, JWKS and revocation list live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "delegation-system")]
    operator_namespace: String,
    /// The `iss` claim of every token.
    #[arg(
        long,
        default_value = "https://delegation-operator.delegation-system.svc"
    )]
    issuer: String,
    /// Signing algorithm of new keys.
    #[arg(long, default_value = "ES256", value_parser = ["ES256", "EdDSA"])]
    algorithm: String,
    /// How long a signing key signs before it is replaced (h, m, s units).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    key_rotation_period: std::time::Duration,
    /// Shortest tokenTTL a grant may ask for.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    min_token_ttl: std::time::Duration,
    /// Longest tokenTTL any grant may have; retired keys stay published this long.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_token_ttl: std::time::Duration,
    /// How many grants are reconciled at once.
    #[arg(long, default_value_t = 4)]
    concurrency: u16,
    /// Log format on stderr (audit records always go to stdout as JSON lines).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crds { dir: None } => print_crds(),
        Command::Crds { dir: Some(dir) } => write_crds(&dir),
        Command::AdmissionPolicies => {
            print!("{}", delegation_operator::admission::POLICIES_YAML);
            ExitCode::SUCCESS
        }
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    init_logging(&args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_operator(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_operator(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = match &args.kubeconfig {
        Some(path) => {
            kube::Config::from_custom_kubeconfig(
                Kubeconfig::read_from(path)?,
                &KubeConfigOptions::default(),
            )
            .await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(config)?;
    let settings = Settings {
        operator_namespace: args.operator_namespace,
        watch_namespace: args.namespace,
        issuer: args.issuer,
        algorithm: args.algorithm.parse::<Algorithm>()?,
        key_rotation_period: args.key_rotation_period,
        policy: Policy {
            min_token_ttl: args.min_token_ttl,
            max_token_ttl: args.max_token_ttl,
        },
        concurrency: args.concurrency,
    };
    operator::run(client, settings).await?;
    Ok(())
}

/// Operational logs go to stderr; stdout carries only audit records.
fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn print_crds() -> ExitCode {
    for crd in api::crds() {
        match api::crd_yaml(&crd) {
            Ok(yaml) => print!("---\n{yaml}"),
            Err(e) => {
                eprintln!("error: could not render CRD: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

fn write_crds(dir: &std::path::Path) -> ExitCode {
    for crd in api::crds() {
        let path = dir.join(api::crd_file_name(&crd));
        let written = api::crd_yaml(&crd)
            .map_err(|e| e.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("error: could not write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

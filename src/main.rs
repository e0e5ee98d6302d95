#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use delegation_operator::api;

/// Kubernetes operator that turns DelegationGrants into short-lived, scoped, signed tokens.
#[derive(Parser)]
#[command(name = "delegation-operator", version)]
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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crds { dir: None } => print_crds(),
        Command::Crds { dir: Some(dir) } => write_crds(&dir),
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

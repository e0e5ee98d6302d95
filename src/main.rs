#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use delegation_operator::{
    api::{self, Decision, parse_duration},
    cli,
    delegation::Policy,
    endpoints,
    operator::{self, Settings, publishing::status_lists},
    signing::Algorithm,
    status_list,
};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// jemalloc rather than glibc's malloc: what a burst of grants frees goes back to the kernel instead
/// of staying resident between the caches' long-lived entries (settings in `.cargo/config.toml`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    Run(Box<RunArgs>),
    /// Run the verification server alone: discovery, JWKS, status lists and introspection, from the
    /// ConfigMaps the operator publishes and a certificate on disk. It reads no Secret and writes
    /// nothing (run the operator with --verification-endpoints=false beside it).
    Serve(Box<ServeArgs>),
    /// Approve the current generation of a grant whose agent requires approval (you need verb
    /// `approve` on that grant, and may not approve your own).
    Approve(DecisionArgs),
    /// Reject the current generation of a grant whose agent requires approval.
    Reject(DecisionArgs),
    /// Signing keys of a running operator.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Tokens, as a person or a resource server sees them.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The grants of a namespace as a tree (principal -> grant -> the grants below it) with their
    /// state, then the agents.
    Tree(cli::tree::TreeArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Verify a token (signature, expiry, status list) and show its chain as a person reads it:
    /// who authorised, each actor, scopes, audience, expiry, revoked or not. Never prints the token.
    /// Exits 0 when it is valid, 1 when it is not, 2 when it could not be checked.
    Inspect(cli::inspect::InspectArgs),
    /// Exchange a token for a narrower one at the issuer's token endpoint (RFC 8693), proving your
    /// workload with your pod's projected ServiceAccount token. Writes the new token to
    /// --output-file (0600) or stdout; never logs it.
    Exchange(cli::exchange::ExchangeArgs),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Revoke signing keys at once (e.g. a leaked key): dropped from the JWKS, a fresh key signs, and
    /// every token they signed is reissued. Key ids are the `kid`s of the JWKS.
    Revoke {
        /// Key ids to revoke. Put them after `--`: a kid is base64url and may begin with `-`.
        #[arg(required = true)]
        kids: Vec<String>,
        /// The operator's namespace.
        #[arg(long, default_value = "delegation-system")]
        operator_namespace: String,
        /// Kubeconfig file to use; without it, the usual discovery.
        #[arg(long)]
        kubeconfig: Option<std::path::PathBuf>,
    },
}

#[derive(Args)]
struct DecisionArgs {
    /// The DelegationGrant's name.
    grant: String,
    /// Its namespace.
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// Why, in a sentence (kept with the decision).
    #[arg(long)]
    comment: Option<String>,
    /// The generation you reviewed (the grant's `metadata.generation`): the decision is refused if
    /// the grant has changed since. Without it, the decision is for whatever generation is current.
    #[arg(long)]
    generation: Option<i64>,
    /// Kubeconfig file to use; without it, the usual discovery.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// Act as this user (impersonation, like kubectl's --as; needs the `impersonate` permission).
    #[arg(long = "as")]
    as_user: Option<String>,
    /// Groups of the impersonated user (repeatable, like kubectl's --as-group).
    #[arg(long = "as-group")]
    as_groups: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    /// Kubeconfig file to use; without it, the usual discovery ($KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long)]
    namespace: Option<String>,
    /// The operator's own namespace: signing keys, JWKS and status lists live there.
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
    /// How long any grant lives from its creation; past it the grant is refused
    /// (DeniedGrantLifetimeEnded) and must be re-created (unset: no limit beyond AudiencePolicies').
    #[arg(long, value_parser = parse_duration)]
    max_grant_lifetime: Option<std::time::Duration>,
    /// How many grants of one namespace get tokens; the oldest (by creationTimestamp) do, and the
    /// others are refused (DeniedNamespaceGrantLimit) until older ones are deleted (unset: no limit;
    /// a ResourceQuota on count/delegationgrants.delegation.nhi.dev refuses them at creation instead).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_grants_per_namespace: Option<u64>,
    /// How often a Ready grant's authority (its requester's RBAC, its approver's) is checked again
    /// between issuances; every issuance and rotation checks it too.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    authority_recheck_period: std::time::Duration,
    /// How many grants are reconciled at once; a free slot goes to the next namespace in turn (a
    /// namespace's deletions and suspensions first). Revocations have as many slots again of their
    /// own, and while one runs or waits, other work takes at most half the slots. 8 keeps up with a
    /// bare client making the same writes on 8 connections (the bench's yardstick); fewer slows
    /// bursts of new grants.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// Elect one writing replica through a Lease in the operator namespace. Turn off only when exactly
    /// one replica can ever run.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// How long standby replicas wait after the leader's last renewal before taking over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_election_lease_duration: std::time::Duration,
    /// How long the leader keeps trying to renew before it stops writing; below the lease duration.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    leader_election_renew_deadline: std::time::Duration,
    /// How often the leader renews and standbys retry; below the renew deadline.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    leader_election_retry_period: std::time::Duration,
    /// This replica's identity in the Lease (default: $POD_NAME, else host name and process id).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// Where the HTTPS endpoints listen: discovery, JWKS, status lists, introspection, /metrics,
    /// /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:8443")]
    https_address: std::net::SocketAddr,
    /// Serve discovery, JWKS, status lists and introspection too. With false, --https-address serves
    /// only /metrics, /healthz and /readyz, and `delegation-operator serve` serves the rest.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    verification_endpoints: bool,
    /// Whether the agents' pods can fetch the tokens of grants with `tokenDelivery: Pod` from a
    /// token endpoint: this process's (with --verification-endpoints) or the verification
    /// server's (`serve --token-exchange=true`). With false such grants are refused
    /// (PodDeliveryNotServed) instead of holding a token no pod could fetch. Default: the value of
    /// --verification-endpoints.
    #[arg(long, action = clap::ArgAction::Set)]
    pod_delivery: Option<bool>,
    /// The `kubernetes.io/tls` Secret (in the operator namespace) with the serving certificate, e.g.
    /// written by cert-manager; a new version is picked up without a restart.
    #[arg(long, default_value = "delegation-operator-tls")]
    tls_secret: String,
    /// When the --tls-secret does not exist, create it with a generated CA (in `ca.crt`) and a
    /// certificate for the --tls-dns-name values and 127.0.0.1. For development and tests.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    tls_self_signed: bool,
    /// A DNS name for the self-signed certificate (repeatable). Default: the issuer's host, localhost
    /// and the operator's Service names.
    #[arg(long = "tls-dns-name")]
    tls_dns_names: Vec<String>,
    /// Status-list entries one namespace may hold: every token issued in it takes one (with the
    /// entries reserved for the tokens exchanged from it) until all the tokens of its list have
    /// expired (about the token lifetime plus an hour). A namespace at its
    /// budget has its grants refused (DeniedStatusListBudget) until entries free up; other
    /// namespaces are not affected.
    #[arg(long, default_value_t = status_list::budget::DEFAULT_ENTRIES_PER_NAMESPACE)]
    status_list_budget_per_namespace: usize,
    /// Safety limit on live status lists (memory, and the Secret and ConfigMap they are kept in);
    /// lists open as demand needs them and retire when their tokens have expired.
    #[arg(long, default_value_t = status_list::DEFAULT_MAX_LISTS)]
    status_list_max_lists: usize,
    /// Tokens per status list (each takes its own entry and 7 for the tokens exchanged from it).
    /// For tests (small lists make growth cheap to exercise); the default
    /// suits production.
    #[arg(long, default_value_t = status_list::DEFAULT_LIST_CAPACITY)]
    status_list_size: usize,
    /// The longest an exchanged token lives (RFC 8693 token exchange at <issuer>/token, served with
    /// the verification endpoints). It is also never longer than the token it was exchanged from,
    /// the agent's maxTokenTTL and the AudiencePolicy's.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    max_exchanged_token_ttl: std::time::Duration,
    #[command(flatten)]
    callers: CallerLimitArgs,
    /// Log format on stderr (audit records always go to stdout as JSON lines).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// Limits on the apiserver reviews that callers of /introspect and /metrics cause.
#[derive(Args)]
struct CallerLimitArgs {
    /// Per client address: requests to /introspect and /metrics that need an apiserver review
    /// (TokenReview, SubjectAccessReview) a second; a caller the apiserver accepts is not counted.
    /// Over it (and --caller-burst), 429 with Retry-After.
    #[arg(long, default_value_t = 2.0)]
    caller_rate: f64,
    /// How many such requests one address may make at once before --caller-rate applies.
    #[arg(long, default_value_t = 20)]
    caller_burst: u32,
    /// Apiserver reviews for endpoint callers in flight at once (on a connection pool of their own).
    #[arg(long, default_value_t = 4)]
    review_concurrency: u16,
    /// Apiserver reviews for endpoint callers a second, over all callers.
    #[arg(long, default_value_t = 20.0)]
    review_rate: f64,
    /// How long an accepted caller (authenticated, authorised) is remembered.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    review_cache_ttl: std::time::Duration,
    /// How long a refused caller token or access (not authenticated, not authorised) is remembered.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    review_negative_cache_ttl: std::time::Duration,
}

#[derive(Args)]
struct ServeArgs {
    /// Kubeconfig file to use; without it, the usual discovery ($KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// The operator's namespace: the published JWKS and status lists (ConfigMaps) are read there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "delegation-system")]
    operator_namespace: String,
    /// The operator's --issuer: the endpoints live under it and discovery names it.
    #[arg(
        long,
        default_value = "https://delegation-operator.delegation-system.svc"
    )]
    issuer: String,
    /// The operator's --algorithm (discovery advertises it).
    #[arg(long, default_value = "ES256", value_parser = ["ES256", "EdDSA"])]
    algorithm: String,
    /// Where the endpoints listen: discovery, JWKS, status lists, introspection, /metrics, /healthz,
    /// /readyz.
    #[arg(long, default_value = "0.0.0.0:8443")]
    https_address: std::net::SocketAddr,
    /// The serving certificate (PEM chain), e.g. `tls.crt` of the TLS Secret mounted into the Pod;
    /// read again when it changes.
    #[arg(long)]
    tls_cert_file: std::path::PathBuf,
    /// Its private key (PEM), e.g. the mounted `tls.key`.
    #[arg(long)]
    tls_key_file: std::path::PathBuf,
    /// Also serve RFC 8693 token exchange at <issuer>/token. The server then signs, so it must be
    /// allowed to read the signing keys Secret (and to list and watch AgentIdentities,
    /// AudiencePolicies and DelegationGrants); without it, it may read no Secret at all.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    token_exchange: bool,
    /// The longest an exchanged token lives (with --token-exchange). It is also never longer than
    /// the token it was exchanged from, the agent's maxTokenTTL and the AudiencePolicy's.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    max_exchanged_token_ttl: std::time::Duration,
    /// With --token-exchange: exchange only tokens of grants in this namespace, the operator's
    /// --namespace (default: all namespaces).
    #[arg(long)]
    namespace: Option<String>,
    #[command(flatten)]
    callers: CallerLimitArgs,
    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> ExitCode {
    // `kubectl delegation ...` in help and errors when installed as the kubectl plugin.
    match cli::parse::<Cli>().command {
        Command::Crds { dir: None } => print_crds(),
        Command::Crds { dir: Some(dir) } => write_crds(&dir),
        Command::AdmissionPolicies => {
            print!("{}", delegation_operator::admission::POLICIES_YAML);
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            init_logging(&args.log_format);
            block_on(run_operator(*args))
        }
        Command::Serve(args) => {
            init_logging(&args.log_format);
            block_on(serve(*args))
        }
        Command::Approve(args) => decide(args, Decision::Approve),
        Command::Reject(args) => decide(args, Decision::Reject),
        Command::Token(TokenCommand::Inspect(args)) => cli::inspect::run(args),
        Command::Token(TokenCommand::Exchange(args)) => cli::exchange::run(args),
        Command::Tree(args) => cli::tree::run(args),
        Command::Keys(KeysCommand::Revoke {
            kids,
            operator_namespace,
            kubeconfig,
        }) => revoke_keys(&kids, &operator_namespace, kubeconfig.as_deref()),
    }
}

fn revoke_keys(
    kids: &[String],
    operator_namespace: &str,
    kubeconfig: Option<&std::path::Path>,
) -> ExitCode {
    let outcome = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let client = client(kubeconfig).await.map_err(|e| e.to_string())?;
                cli::revoke_keys(client, operator_namespace, kids).await
            })
        });
    match outcome {
        Ok(all) => {
            println!("revocation requested; revoked keys: {all}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn decide(args: DecisionArgs, decision: Decision) -> ExitCode {
    let outcome = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let mut config = config(args.kubeconfig.as_deref())
                    .await
                    .map_err(|e| e.to_string())?;
                if let Some(user) = args.as_user {
                    config.auth_info.impersonate = Some(user);
                    config.auth_info.impersonate_groups =
                        (!args.as_groups.is_empty()).then_some(args.as_groups);
                }
                let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
                cli::decide(
                    client,
                    &args.namespace,
                    &args.grant,
                    decision,
                    args.comment,
                    args.generation,
                )
                .await
            })
        });
    match outcome {
        Ok(name) => {
            println!(
                "delegationapproval.delegation.nhi.dev/{name} created ({decision:?} {}/{})",
                args.namespace, args.grant
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A client from a kubeconfig file, or from the usual discovery (in-cluster included).
async fn client(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Client, Box<dyn std::error::Error>> {
    Ok(kube::Client::try_from(config(kubeconfig).await?)?)
}

async fn config(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Config, Box<dyn std::error::Error>> {
    Ok(match kubeconfig {
        Some(path) => {
            kube::Config::from_custom_kubeconfig(
                Kubeconfig::read_from(path)?,
                &KubeConfigOptions::default(),
            )
            .await?
        }
        None => kube::Config::infer().await?,
    })
}

/// Runs a long-lived command to its end; its error is logged and printed.
fn block_on(command: impl Future<Output = Result<(), Box<dyn std::error::Error>>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_operator(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = config(args.kubeconfig.as_deref()).await?;
    let client = kube::Client::try_from(config.clone())?;
    // Reviews made for endpoint callers get a client (and connection pool) of their own: however
    // many there are, the Lease renewals and revocations of `client` never queue behind them.
    let review_client = kube::Client::try_from(config)?;
    let leader_election = leader_election(&args)?;
    let reviews = review_settings(&args.callers)?;
    let issuer = checked_issuer(&args.issuer)?;
    let settings = Settings {
        operator_namespace: args.operator_namespace.clone(),
        watch_namespace: args.namespace.clone(),
        issuer: issuer.clone(),
        algorithm: args.algorithm.parse::<Algorithm>()?,
        key_rotation_period: args.key_rotation_period,
        policy: Policy {
            min_token_ttl: args.min_token_ttl,
            max_token_ttl: args.max_token_ttl,
            max_grant_lifetime: args.max_grant_lifetime,
            pod_delivery: args.pod_delivery.unwrap_or(args.verification_endpoints),
        },
        concurrency: args.concurrency,
        max_grants_per_namespace: args
            .max_grants_per_namespace
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        authority_recheck_period: args.authority_recheck_period,
        leader_election,
        status_list_capacity: status_lists::Capacity {
            list_size: args.status_list_size,
            max_lists: args.status_list_max_lists,
            budget_per_namespace: args.status_list_budget_per_namespace,
        },
    };
    operator::check_prerequisites(&client, &settings).await?;
    let readiness = std::sync::Arc::new(operator::Readiness::default());
    let (serve, exchange) = endpoints::start(
        client.clone(),
        review_client,
        endpoint_settings(&args, &issuer, settings.algorithm, reviews),
        readiness.clone(),
    )
    .await?;
    // Every replica serves its endpoints; the operator itself writes only while leading.
    let outcome = tokio::select! {
        outcome = operator::run(client, settings, readiness) => outcome,
        _ = serve => Ok(()),
    };
    withdraw_exchange_counts(exchange).await;
    Ok(outcome?)
}

/// Removes this replica's exchanged-token counts as it stops (readers would otherwise show them
/// until they expire), giving up after 2 s.
async fn withdraw_exchange_counts(exchange: Option<std::sync::Arc<endpoints::token::Exchange>>) {
    if let Some(exchange) = exchange {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            exchange.withdraw_counts(),
        )
        .await;
    }
}

/// This replica's identity: `explicit` (`$POD_NAME`), else host name and process id.
fn replica_identity(explicit: Option<String>) -> String {
    explicit.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "delegation-operator".into());
        format!("{host}-{}", std::process::id())
    })
}

/// The verification server: the endpoints alone, under an identity that reads two ConfigMaps and
/// asks the apiserver about callers, and nothing else (with --token-exchange, also the signing keys
/// Secret and the objects an exchange is decided on).
async fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = config(args.kubeconfig.as_deref()).await?;
    let client = kube::Client::try_from(config.clone())?;
    let review_client = kube::Client::try_from(config)?;
    let reviews = review_settings(&args.callers)?;
    let issuer = checked_issuer(&args.issuer)?;
    let settings = endpoints::EndpointSettings {
        address: args.https_address,
        issuer,
        operator_namespace: args.operator_namespace,
        tls: endpoints::tls::TlsSource::Files(endpoints::tls::CertFiles {
            cert: args.tls_cert_file,
            key: args.tls_key_file,
        }),
        verification: Some(endpoints::published::JwksSource::PublishedConfigMap),
        algorithm: args.algorithm.parse::<Algorithm>()?,
        reviews,
        // Without --token-exchange it may read no Secret, so it cannot sign.
        exchange: args
            .token_exchange
            .then_some(endpoints::token::ExchangeSettings {
                max_ttl: args.max_exchanged_token_ttl,
                namespace: args.namespace.clone(),
                identity: replica_identity(std::env::var("POD_NAME").ok()),
                create_counts_configmap: false,
            }),
    };
    // Never leading: ready once the certificate and the published JWKS are loaded.
    let readiness = std::sync::Arc::new(operator::Readiness::default());
    let (serving, exchange) = endpoints::start(client, review_client, settings, readiness).await?;
    // It holds no state: on SIGTERM it withdraws its exchanged-token counts and stops (exit 0), as
    // the kubelet expects.
    tokio::select! {
        _ = serving => {}
        _ = operator::shutdown_signal() => tracing::info!("stopping on a termination signal"),
    }
    withdraw_exchange_counts(exchange).await;
    Ok(())
}

/// The issuer in one spelling everywhere: the tokens' `iss` and discovery must agree byte for byte.
fn checked_issuer(issuer: &str) -> Result<String, Box<dyn std::error::Error>> {
    let issuer = issuer.trim_end_matches('/').to_owned();
    match endpoints::issuer_problem(&issuer) {
        Some(problem) => {
            Err(format!("--issuer {issuer:?} cannot be an issuer URL: {problem}").into())
        }
        None => Ok(issuer),
    }
}

fn endpoint_settings(
    args: &RunArgs,
    issuer: &str,
    algorithm: Algorithm,
    reviews: endpoints::reviews::ReviewSettings,
) -> endpoints::EndpointSettings {
    let ns = &args.operator_namespace;
    let dns_names = if args.tls_dns_names.is_empty() {
        // A DNS name only: an IP literal (127.0.0.1, [::1]) is no DNS SAN.
        let issuer_host = issuer
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', ':']).next().unwrap_or_default())
            .filter(|host| {
                !host.is_empty()
                    && !host.starts_with('[')
                    && host.parse::<std::net::IpAddr>().is_err()
            });
        issuer_host
            .map(str::to_owned)
            .into_iter()
            .chain([
                "localhost".to_owned(),
                "delegation-operator".to_owned(),
                format!("delegation-operator.{ns}"),
                format!("delegation-operator.{ns}.svc"),
            ])
            .collect()
    } else {
        args.tls_dns_names.clone()
    };
    endpoints::EndpointSettings {
        address: args.https_address,
        issuer: issuer.to_owned(),
        operator_namespace: ns.clone(),
        tls: endpoints::tls::TlsSource::Secret(endpoints::tls::TlsSettings {
            namespace: ns.clone(),
            secret_name: args.tls_secret.clone(),
            self_signed: args.tls_self_signed,
            dns_names,
        }),
        verification: args
            .verification_endpoints
            .then_some(endpoints::published::JwksSource::SigningKeys),
        algorithm,
        reviews,
        exchange: Some(endpoints::token::ExchangeSettings {
            max_ttl: args.max_exchanged_token_ttl,
            namespace: args.namespace.clone(),
            identity: replica_identity(args.leader_election_identity.clone()),
            create_counts_configmap: true,
        }),
    }
}

fn review_settings(
    args: &CallerLimitArgs,
) -> Result<endpoints::reviews::ReviewSettings, Box<dyn std::error::Error>> {
    for (flag, rate) in [
        ("--caller-rate", args.caller_rate),
        ("--review-rate", args.review_rate),
    ] {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("{flag} must be a positive number (got {rate})").into());
        }
    }
    if args.review_concurrency == 0 || args.caller_burst == 0 {
        return Err("--review-concurrency and --caller-burst must be at least 1".into());
    }
    Ok(endpoints::reviews::ReviewSettings {
        per_source: endpoints::limits::Rate::new(args.caller_rate, args.caller_burst),
        concurrency: args.review_concurrency.into(),
        per_second: args.review_rate,
        cache_ttl: args.review_cache_ttl,
        negative_cache_ttl: args.review_negative_cache_ttl,
    })
}

/// The leader election settings, checked: each timing must be below the one before, or the leader
/// could still be writing when another replica takes over.
fn leader_election(
    args: &RunArgs,
) -> Result<Option<operator::LeaderElectionSettings>, Box<dyn std::error::Error>> {
    if !args.leader_election {
        return Ok(None);
    }
    let (lease, renew, retry) = (
        args.leader_election_lease_duration,
        args.leader_election_renew_deadline,
        args.leader_election_retry_period,
    );
    if !(retry < renew && renew < lease) {
        return Err(format!(
            "leader election needs --leader-election-retry-period < --leader-election-renew-deadline \
             < --leader-election-lease-duration (got {retry:?}, {renew:?}, {lease:?})"
        )
        .into());
    }
    let identity = replica_identity(args.leader_election_identity.clone());
    Ok(Some(operator::LeaderElectionSettings {
        identity,
        lease_duration: lease,
        renew_deadline: renew,
        retry_period: retry,
    }))
}

/// Operational logs go to stderr; stdout carries only audit records.
/// kube-client logs a whole response body at WARN when it cannot decode it (every object of a list);
/// the operator logs such errors itself, in one line.
fn init_logging(format: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,kube_client::client=error")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal, never in a log file.
        .with_ansi(std::io::stderr().is_terminal())
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

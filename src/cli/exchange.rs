//! `token exchange`: trade a token this issuer minted for a narrower one at the issuer's RFC 8693
//! token endpoint, as an agent does — or, with `--grant`, fetch a token of a grant the operator
//! delivers to its agent's pods — for trying it out and for scripts. The caller proves which
//! workload it is with its pod's projected ServiceAccount token (audience: the issuer URL).
//!
//! The tokens read are never printed or put into an error message; the issued one goes to
//! `--output-file` (created 0600) or, without it, to stdout alone, as `kubectl create token` does.

use std::{path::PathBuf, process::ExitCode};

use super::https::Endpoints;
use crate::endpoints::token::{
    ACCESS_TOKEN_TYPE, GRANT_TOKEN_TYPE, JWT_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT,
};

/// Exchange a token for a narrower one (RFC 8693) at the issuer's token endpoint. Exits 0 when a
/// token was issued, 1 when the endpoint refused (its error on stderr), 2 when it could not ask.
#[derive(clap::Args, Debug)]
pub struct ExchangeArgs {
    /// The issuer URL (OIDC discovery at `<URL>/.well-known/openid-configuration` names the token
    /// endpoint).
    #[arg(long)]
    pub issuer_url: String,
    /// PEM file of the CA that signed the endpoint's serving certificate (default: system roots).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// File holding the token to exchange (e.g. the `token` key of a grant's Secret, mounted).
    #[arg(long, required_unless_present = "grant", conflicts_with = "grant")]
    pub subject_token_file: Option<PathBuf>,
    /// Instead of exchanging a token you hold, fetch a token of this DelegationGrant (in your
    /// pod's namespace), whose token the operator delivers to its agent's pods (`tokenDelivery:
    /// Pod`).
    #[arg(long)]
    pub grant: Option<String>,
    /// File holding your pod's projected ServiceAccount token for the issuer's audience.
    #[arg(long)]
    pub actor_token_file: PathBuf,
    /// Scopes of the new token, space-separated (default: the subject token's); never more.
    #[arg(long)]
    pub scope: Option<String>,
    /// The audience of the new token (default: the subject token's; it cannot be another).
    #[arg(long)]
    pub audience: Option<String>,
    /// RFC 9396 authorization details of the new token, as a JSON array (default: the subject's).
    #[arg(long)]
    pub authorization_details: Option<String>,
    /// Lifetime of the new token in seconds (default: the longest allowed).
    #[arg(long)]
    pub expires_in: Option<u64>,
    /// Write the issued token to this file (created, mode 0600) instead of stdout.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
    /// Bind the new token to this key with a DPoP proof (RFC 9449): a PKCS#8 PEM private key,
    /// P-256 or Ed25519 (`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`). Needed
    /// to exchange a token bound to that key; the new one is bound to it too.
    #[arg(long)]
    pub dpop_key: Option<PathBuf>,
}

pub fn run(args: ExchangeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(exchange(&args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn exchange(args: &ExchangeArgs) -> Result<ExitCode, String> {
    let (subject, subject_type) = match (&args.subject_token_file, &args.grant) {
        (Some(path), _) => (read_token(path, "--subject-token-file")?, ACCESS_TOKEN_TYPE),
        (None, Some(grant)) => (grant.clone(), GRANT_TOKEN_TYPE),
        (None, None) => return Err("give --subject-token-file or --grant".into()),
    };
    let actor = read_token(&args.actor_token_file, "--actor-token-file")?;
    let dpop_key = match &args.dpop_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("--dpop-key {}: {e}", path.display()))?;
            Some(
                crate::signing::SigningKey::from_pkcs8_pem(&pem)
                    .map_err(|e| format!("--dpop-key {}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    let endpoints = Endpoints::discover(&args.issuer_url, args.ca.as_deref()).await?;
    let expires_in = args.expires_in.map(|s| s.to_string());
    let mut fields = vec![
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", subject.as_str()),
        ("subject_token_type", subject_type),
        ("actor_token", actor.as_str()),
        ("actor_token_type", JWT_TOKEN_TYPE),
    ];
    for (name, value) in [
        ("scope", args.scope.as_deref()),
        ("audience", args.audience.as_deref()),
        (
            "authorization_details",
            args.authorization_details.as_deref(),
        ),
        ("expires_in", expires_in.as_deref()),
    ] {
        if let Some(value) = value {
            fields.push((name, value));
        }
    }
    let (status, body) = endpoints.exchange(&fields, dpop_key.as_ref()).await?;
    let Some(token) = body["access_token"].as_str().filter(|_| status == 200) else {
        let error = body["error"].as_str().unwrap_or("no error code");
        let description = body["error_description"].as_str().unwrap_or_default();
        eprintln!("refused (HTTP {status}): {error}: {description}");
        return Ok(ExitCode::from(if status == 400 { 1 } else { 2 }));
    };
    match &args.output_file {
        Some(path) => write_private(path, token)?,
        None => println!("{token}"),
    }
    eprintln!(
        "issued: scope {:?}, expires in {}s, {} token",
        body["scope"].as_str().unwrap_or_default(),
        body["expires_in"],
        body["token_type"].as_str().unwrap_or("Bearer")
    );
    Ok(ExitCode::SUCCESS)
}

fn read_token(path: &PathBuf, flag: &str) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{flag} {}: the file is empty", path.display()));
    }
    Ok(token.to_owned())
}

fn write_private(path: &PathBuf, token: &str) -> Result<(), String> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("--output-file {}: {e}", path.display()))?;
    file.write_all(token.as_bytes())
        .and_then(|_| file.write_all(b"\n"))
        .map_err(|e| format!("--output-file {}: {e}", path.display()))
}

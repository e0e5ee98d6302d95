//! `token inspect`: verify one token as a resource server would (signature against the JWKS, times,
//! status list entry) and show its chain as a person reads it. The keys and lists come from the
//! cluster (the ConfigMaps the operator publishes) or from the operator's HTTPS endpoints.
//!
//! The token is never printed, logged or put into an error message.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use serde_json::Value;

use crate::api::DelegationGrant;
use crate::delegation::explain::{self, StatusState};
use crate::operator::grants::token_secret::TOKEN_KEY;
use crate::operator::publishing::keys::{JWKS_CONFIGMAP_NAME, JWKS_DATA_KEY};
use crate::operator::publishing::status_lists::CONFIGMAP_NAME as LISTS_CONFIGMAP_NAME;
use crate::signing;
use crate::status_list::TokenStatusRef;
use crate::status_list::data_key;
use crate::verification::{self, VerifyError};

/// Verify a token and show who authorised it, each actor, scopes, audience, expiry and whether it is
/// revoked. Exits 0 when the token is valid, 1 when it is not, 2 when it could not be checked.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The token: `-` to read it from stdin (recommended: a token in the command line ends up in
    /// shell history), a compact JWT, or a grant as `grant/NAME` or `NAME` to read the token from
    /// that grant's Secret (needs `get` on it).
    pub token: String,
    /// Namespace of the grant (default: the kubeconfig context's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// The operator's namespace, where it publishes its JWKS and status lists (cluster source).
    #[arg(long, default_value = "delegation-system")]
    pub operator_namespace: String,
    /// Verify against the operator's HTTPS endpoints instead of the cluster: its issuer URL (OIDC
    /// discovery at `<URL>/.well-known/openid-configuration`). The token's `iss` must be this URL.
    #[arg(long)]
    pub issuer_url: Option<String>,
    /// PEM file of the CA that signed the endpoints' serving certificate (default: system roots).
    #[arg(long, requires = "issuer_url")]
    pub ca: Option<PathBuf>,
    /// Also require this audience (`aud`), as the resource server would.
    #[arg(long)]
    pub audience: Option<String>,
    /// Output format.
    #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
    /// Kubeconfig file to use; without it, the usual discovery ($KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long)]
    pub context: Option<String>,
}

/// What the positional argument names.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// Read the token from stdin.
    Stdin,
    /// The token itself.
    Token(String),
    /// The grant whose Secret holds the token.
    Grant(String),
}

/// `-`, `grant/NAME` (or `delegationgrant/NAME`, `delegationgrant.delegation.nhi.dev/NAME`, plural
/// too), a bare object name (a DNS-1123 subdomain: a JWT, with its `eyJ` start, never is one), or a
/// token.
pub fn target(arg: &str) -> Target {
    if arg == "-" {
        return Target::Stdin;
    }
    let prefixes = [
        "grant/",
        "grants/",
        "delegationgrant/",
        "delegationgrants/",
        "delegationgrant.delegation.nhi.dev/",
        "delegationgrants.delegation.nhi.dev/",
    ];
    if let Some(name) = prefixes.iter().find_map(|p| arg.strip_prefix(p)) {
        return Target::Grant(name.to_owned());
    }
    if crate::api::is_dns1123_subdomain(arg) {
        Target::Grant(arg.to_owned())
    } else {
        Target::Token(arg.to_owned())
    }
}

/// Where the JWKS and the status lists are read from.
enum Source {
    Cluster {
        configmaps: Api<ConfigMap>,
        namespace: String,
    },
    Https(super::https::Endpoints),
}

impl Source {
    async fn jwks(&self) -> Result<Value, String> {
        match self {
            Self::Cluster {
                configmaps,
                namespace,
            } => {
                let cm = configmaps
                    .get_opt(JWKS_CONFIGMAP_NAME)
                    .await
                    .map_err(|e| format!("reading ConfigMap {namespace}/{JWKS_CONFIGMAP_NAME}: {e}"))?
                    .ok_or_else(|| {
                        format!(
                            "ConfigMap {namespace}/{JWKS_CONFIGMAP_NAME} does not exist: is the operator running in namespace {namespace} (--operator-namespace)?"
                        )
                    })?;
                let text = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(JWKS_DATA_KEY))
                    .ok_or_else(|| {
                        format!(
                            "ConfigMap {namespace}/{JWKS_CONFIGMAP_NAME} has no {JWKS_DATA_KEY}"
                        )
                    })?;
                serde_json::from_str(text)
                    .map_err(|e| format!("the published JWKS is not JSON: {e}"))
            }
            Self::Https(endpoints) => endpoints.jwks().await,
        }
    }

    /// The Status List Token for `uri`, if one is published. Errors are failures to ask at all.
    async fn status_list_token(&self, uri: &str) -> Result<Option<String>, String> {
        match self {
            Self::Cluster {
                configmaps,
                namespace,
            } => {
                let cm = configmaps
                    .get_opt(LISTS_CONFIGMAP_NAME)
                    .await
                    .map_err(|e| {
                        format!("reading ConfigMap {namespace}/{LISTS_CONFIGMAP_NAME}: {e}")
                    })?;
                Ok(cm
                    .and_then(|cm| cm.data)
                    .and_then(|mut d| d.remove(&data_key(uri))))
            }
            Self::Https(endpoints) => endpoints.status_list(uri).await,
        }
    }

    /// What the status list says about the verified `claims`, from a list whose signature verifies
    /// ([`crate::verification::status_of`]).
    async fn status(&self, claims: &Value, jwks: &Value) -> StatusState {
        let Some(status_ref) = claims
            .get("status")
            .and_then(TokenStatusRef::from_status_claim)
        else {
            return StatusState::Absent;
        };
        let lists: BTreeMap<String, String> = match self.status_list_token(&status_ref.uri).await {
            Ok(token) => token
                .map(|t| (data_key(&status_ref.uri), t))
                .into_iter()
                .collect(),
            Err(e) => return StatusState::Unavailable(e),
        };
        match verification::status_of(claims, jwks, &lists) {
            Ok(status) => status.into(),
            Err(VerifyError::NoStatus) => StatusState::Absent,
            Err(e) => StatusState::Unavailable(e.to_string()),
        }
    }
}

/// Runs `token inspect`.
pub fn run(args: InspectArgs) -> ExitCode {
    super::block_on(inspect(args))
}

async fn inspect(args: InspectArgs) -> Result<ExitCode, String> {
    let target = target(&args.token);
    // A kube client only when the cluster is needed: for a grant, or for the cluster source.
    let needs_cluster = matches!(target, Target::Grant(_)) || args.issuer_url.is_none();
    let cluster = if needs_cluster {
        let config =
            super::kube_config(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        Some((
            Client::try_from(config).map_err(|e| e.to_string())?,
            namespace,
        ))
    } else {
        None
    };
    let token = match target {
        Target::Stdin => {
            // A token is a few KiB; read no more than 1 MiB of whatever was piped in.
            let mut text = String::new();
            std::io::stdin()
                .take(1 << 20)
                .read_to_string(&mut text)
                .map_err(|e| format!("reading the token from stdin: {e}"))?;
            text.trim().to_owned()
        }
        Target::Token(token) => token,
        Target::Grant(name) => {
            let (client, namespace) = cluster.as_ref().ok_or("no cluster")?;
            grant_token(client, namespace, &name).await?
        }
    };
    let source = match &args.issuer_url {
        Some(issuer) => {
            Source::Https(super::https::Endpoints::discover(issuer, args.ca.as_deref()).await?)
        }
        None => {
            let (client, _) = cluster.as_ref().ok_or("no cluster")?;
            Source::Cluster {
                configmaps: Api::namespaced(client.clone(), &args.operator_namespace),
                namespace: args.operator_namespace.clone(),
            }
        }
    };
    let jwks = source.jwks().await?;
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let decoded = decode(&token);
    let own_audience = verification::unverified_audience(&token).unwrap_or_default();
    // The signature and everything but the times (a leeway beyond now accepts any exp and nbf)...
    let signature = signing::verify(&token, &jwks, &own_audience, u64::MAX)
        .map_err(|e| explain::signing_problem(&e));
    // ...then the times, exactly.
    let times = signing::verify(&token, &jwks, &own_audience, 0)
        .map(|_| ())
        .map_err(|e| explain::signing_problem(&e));
    let mut extra = Vec::new();
    if let Some(wanted) = &args.audience
        && wanted != &own_audience
    {
        extra.push(format!("wrong audience (for {own_audience}, not {wanted})"));
    }
    if let Some(issuer) = &args.issuer_url {
        let iss = decoded
            .as_ref()
            .and_then(|d| d.claims.get("iss"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        if iss.trim_end_matches('/') != issuer.trim_end_matches('/') {
            extra.push(format!("wrong issuer ({iss}, not {issuer})"));
        }
    }
    // The status of trusted claims only: a forged token's `status` could point anywhere.
    let status = match &signature {
        Ok(claims) => source.status(claims, &jwks).await,
        Err(_) => StatusState::NotChecked,
    };
    let signature = signature.map(|_| ());
    let inspection = explain::inspection(decoded.as_ref(), signature, times, status, extra);
    if args.output == "json" {
        let json = serde_json::to_string_pretty(&inspection).map_err(|e| e.to_string())?;
        println!("{json}");
    } else {
        print!(
            "{}",
            explain::printable(&explain::render_inspection(&inspection, now))
        );
    }
    Ok(if inspection.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The header and claims of a compact JWT, NOT verified (for display; marked untrusted unless the
/// signature verifies).
fn decode(token: &str) -> Option<explain::Decoded> {
    let header = jsonwebtoken::decode_header(token).ok()?;
    Some(explain::Decoded {
        header: serde_json::to_value(header).ok()?,
        claims: verification::unverified_claims(token).filter(Value::is_object)?,
    })
}

/// The token in a grant's Secret (`status.secretName`, else the spec's, else `<name>-token`).
async fn grant_token(client: &Client, namespace: &str, name: &str) -> Result<String, String> {
    let grants: Api<DelegationGrant> = Api::namespaced(client.clone(), namespace);
    let grant = grants
        .get_opt(name)
        .await
        .map_err(|e| format!("reading DelegationGrant {namespace}/{name}: {e}"))?
        .ok_or_else(|| format!("DelegationGrant {namespace}/{name} does not exist"))?;
    if grant
        .status
        .as_ref()
        .is_some_and(|s| s.sealed_token.is_some() && s.secret_name.is_none())
    {
        return Err(format!(
            "DelegationGrant {namespace}/{name} delivers its token to its agent's pods (tokenDelivery: Pod): no Secret holds it and it never leaves the operator; inspect a token a pod fetched (`token exchange --grant {name}` from the agent's pod, then `token inspect --token-file`)"
        ));
    }
    let secret_name = grant
        .status
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .unwrap_or_else(|| grant.spec.secret_name_or_default(name));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(&secret_name)
        .await
        .map_err(|e| format!("reading Secret {namespace}/{secret_name}: {e}"))?
        .ok_or_else(|| {
            format!("DelegationGrant {namespace}/{name} has no token: Secret {secret_name} does not exist")
        })?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(TOKEN_KEY))
        .ok_or_else(|| format!("Secret {namespace}/{secret_name} has no key {TOKEN_KEY}"))?;
    String::from_utf8(bytes.0.clone())
        .map(|t| t.trim().to_owned())
        .map_err(|_| format!("Secret {namespace}/{secret_name} key {TOKEN_KEY} is not text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_names_stdin_a_grant_or_a_token() {
        assert_eq!(target("-"), Target::Stdin);
        assert_eq!(target("grant/g1"), Target::Grant("g1".into()));
        assert_eq!(target("delegationgrant/g1"), Target::Grant("g1".into()));
        assert_eq!(
            target("delegationgrants.delegation.nhi.dev/a.b"),
            Target::Grant("a.b".into())
        );
        assert_eq!(target("my-grant.v2"), Target::Grant("my-grant.v2".into()));
        // A JWT's header starts with `eyJ`: never a lowercase object name, even with its two dots.
        let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln";
        assert_eq!(target(jwt), Target::Token(jwt.into()));
        assert_eq!(target("a..b"), Target::Token("a..b".into()));
        assert_eq!(target("-grant"), Target::Token("-grant".into()));
    }
}

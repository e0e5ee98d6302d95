//! Reading the operator's verification endpoints over HTTPS, as a resource server would: OIDC
//! discovery at the issuer, then its `jwks_uri`, then the status list at a token's status `uri`.
//!
//! The HTTPS client is kube's own (rustls, the `--ca` file as its only root, or the system's roots):
//! a `kube::Client` whose base URL is the issuer's origin sends plain GETs, without credentials.
//! Every URL followed must be on the issuer's origin.

use std::path::Path;

use serde_json::Value;

/// The endpoints of one issuer, found through its discovery document.
pub struct Endpoints {
    client: kube::Client,
    /// `https://host:port`, without a trailing slash.
    origin: String,
    jwks_uri: String,
    /// The RFC 8693 token endpoint, when the issuer serves one.
    token_endpoint: Option<String>,
}

/// The DER certificates of a PEM file (every `CERTIFICATE` block; at least one).
fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// `(origin, path)` of an https URL; the path without a trailing slash ("" for the root).
pub fn split_https_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url} is not an https:// URL"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.is_empty() || authority.contains(['@', '?', '#']) || path.contains(['?', '#']) {
        return Err(format!("{url} is not a plain https URL"));
    }
    Ok((
        format!("https://{authority}"),
        path.trim_end_matches('/').to_owned(),
    ))
}

impl Endpoints {
    /// Reads `<issuer>/.well-known/openid-configuration`, checks that it names this issuer, and
    /// keeps its `jwks_uri` (which must be on the issuer's origin).
    pub async fn discover(issuer: &str, ca: Option<&Path>) -> Result<Self, String> {
        let (origin, path) = split_https_url(issuer)?;
        let mut config = kube::Config::new(
            origin
                .parse()
                .map_err(|e| format!("issuer URL {issuer}: {e}"))?,
        );
        if let Some(ca) = ca {
            let pem = std::fs::read_to_string(ca)
                .map_err(|e| format!("reading CA file {}: {e}", ca.display()))?;
            config.root_cert =
                Some(pem_certificates(&pem).map_err(|e| format!("CA file {}: {e}", ca.display()))?);
        }
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        let mut endpoints = Self {
            client,
            origin,
            jwks_uri: String::new(),
            token_endpoint: None,
        };
        let discovery_url = format!(
            "{}{path}/.well-known/openid-configuration",
            endpoints.origin
        );
        let text = endpoints
            .get(&discovery_url, "application/json")
            .await?
            .ok_or_else(|| format!("{discovery_url}: not found"))?;
        let discovery: Value =
            serde_json::from_str(&text).map_err(|e| format!("{discovery_url} is not JSON: {e}"))?;
        let named = discovery["issuer"].as_str().unwrap_or_default();
        if named.trim_end_matches('/') != issuer.trim_end_matches('/') {
            return Err(format!(
                "{discovery_url} names issuer {}, not {issuer}",
                discovery["issuer"]
            ));
        }
        endpoints.jwks_uri = discovery["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{discovery_url} has no jwks_uri"))?
            .to_owned();
        endpoints.token_endpoint = discovery["token_endpoint"].as_str().map(str::to_owned);
        Ok(endpoints)
    }

    /// POSTs the form `fields` to the discovered token endpoint (on the issuer's origin only) and
    /// returns the HTTP status and the JSON body, error bodies included.
    pub async fn exchange(
        &self,
        fields: &[(&str, &str)],
        dpop: Option<&crate::signing::SigningKey>,
    ) -> Result<(u16, Value), String> {
        let url = self
            .token_endpoint
            .as_deref()
            .ok_or("the issuer's discovery document names no token_endpoint: this endpoint does not serve token exchange (the operator's `run` serves it with its verification endpoints)")?;
        let (origin, _) = split_https_url(url)?;
        if origin != self.origin {
            return Err(format!(
                "{url} is not on the issuer's origin {}",
                self.origin
            ));
        }
        let mut body = form_urlencoded::Serializer::new(String::new());
        for (name, value) in fields {
            body.append_pair(name, value);
        }
        let mut request = http::Request::post(&url[origin.len()..])
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        if let Some(key) = dpop {
            request = request.header("DPoP", dpop_proof(key, url, fields)?);
        }
        let request = request
            .body(kube::client::Body::from(body.finish().into_bytes()))
            .map_err(|e| format!("{url}: {e}"))?;
        // Sent raw: kube would read an OAuth error body as a Kubernetes Status and lose it.
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect_bytes()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let json = serde_json::from_slice(&bytes)
            .map_err(|_| format!("POST {url}: HTTP {status} with a body that is not JSON"))?;
        Ok((status, json))
    }

    /// The JWKS at the discovered `jwks_uri`.
    pub async fn jwks(&self) -> Result<Value, String> {
        let text = self
            .get(&self.jwks_uri, "application/jwk-set+json, application/json")
            .await?
            .ok_or_else(|| format!("{}: not found", self.jwks_uri))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", self.jwks_uri))
    }

    /// The Status List Token at `uri`; `None` when the server has none there.
    pub async fn status_list(&self, uri: &str) -> Result<Option<String>, String> {
        self.get(uri, "application/statuslist+jwt")
            .await
            .map(|t| t.map(|t| t.trim().to_owned()))
    }

    /// GETs `url` (on the issuer's origin only); `None` on 404.
    async fn get(&self, url: &str, accept: &str) -> Result<Option<String>, String> {
        let (origin, _) = split_https_url(url)?;
        if origin != self.origin {
            return Err(format!(
                "{url} is not on the issuer's origin {}",
                self.origin
            ));
        }
        let path_and_query = &url[origin.len()..];
        let request = http::Request::get(if path_and_query.is_empty() {
            "/"
        } else {
            path_and_query
        })
        .header(http::header::ACCEPT, accept)
        .body(Vec::new())
        .map_err(|e| format!("{url}: {e}"))?;
        match self.client.request_text(request).await {
            Ok(text) => Ok(Some(text)),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
            Err(kube::Error::Api(status)) => Err(format!("GET {url}: HTTP {}", status.code)),
            Err(e) => Err(format!("GET {url}: {e}")),
        }
    }
}

/// A DPoP proof (RFC 9449) by `key` for a POST of `fields` to `url`: `ath` is the hash of the
/// `subject_token`, so that a bound subject token can be exchanged.
fn dpop_proof(
    key: &crate::signing::SigningKey,
    url: &str,
    fields: &[(&str, &str)],
) -> Result<String, String> {
    let mut claims = serde_json::json!({
        "jti": uuid::Uuid::new_v4().to_string(),
        "htm": "POST",
        "htu": url,
        "iat": k8s_openapi::jiff::Timestamp::now().as_second(),
    });
    // `ath` covers a token presented; a delivery presents none (its subject is a grant's name).
    let delivery = fields.contains(&(
        "subject_token_type",
        crate::endpoints::token::GRANT_TOKEN_TYPE,
    ));
    if let Some((_, subject)) = fields.iter().find(|(name, _)| *name == "subject_token")
        && !delivery
    {
        claims["ath"] = crate::dpop::access_token_hash(subject).into();
    }
    key.sign_proof(&claims)
        .map_err(|e| format!("signing the DPoP proof: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_origin_and_path() {
        assert_eq!(
            split_https_url("https://127.0.0.1:8443").unwrap(),
            ("https://127.0.0.1:8443".into(), "".into())
        );
        assert_eq!(
            split_https_url("https://op.example.com/tenant/").unwrap(),
            ("https://op.example.com".into(), "/tenant".into())
        );
        assert!(split_https_url("http://op.example.com").is_err());
        assert!(split_https_url("https://user@evil.example.com/").is_err());
        assert!(split_https_url("https:///path").is_err());
    }
}

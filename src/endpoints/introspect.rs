//! RFC 7662 token introspection for resource servers in the cluster.
//!
//! The caller authenticates with its own ServiceAccount token, bound to the issuer as audience
//! (a projected token): a TokenReview says who it is. It may learn about a token only when it is
//! allowed the verb `introspect` on `audiences.delegation.nhi.dev` named by that token's audience —
//! so a payments API can check payments tokens and nothing else:
//!
//! ```yaml
//! rules:
//! - apiGroups: [delegation.nhi.dev]
//!   resources: [audiences]
//!   resourceNames: ["https://payments.example.com"]
//!   verbs: [introspect]
//! ```
//!
//! An unauthenticated caller gets 401 and nothing else. Everything that is not a valid, unrevoked
//! token of an audience the caller may introspect — unknown, expired, tampered, revoked, suspended,
//! another audience — is the same `{"active": false}`.

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{api::GROUP, metrics::ResultLabels, verification};

/// The verb and resource a caller needs, per audience.
pub const VERB: &str = "introspect";
pub const RESOURCE: &str = "audiences";
/// Tokens longer than this are not ours (ours are a few KiB at most).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The form body of an introspection request (RFC 7662 §2.1).
#[derive(Debug, Deserialize)]
pub struct Request {
    pub token: String,
    /// Accepted and ignored: every token here is an access token.
    #[allow(dead_code)]
    pub token_type_hint: Option<String>,
}

/// What the endpoint answers.
pub enum Outcome {
    /// 401: the caller's own credentials were missing or not accepted.
    Unauthenticated,
    /// 200 with this body.
    Answer(Value),
    /// 503: the apiserver could not be asked; try again.
    Unavailable,
}

pub fn inactive() -> Value {
    json!({"active": false})
}

/// Answers one request. `jwks` and `lists` are the published documents.
pub async fn introspect(
    client: &Client,
    issuer: &str,
    caller_token: Option<&str>,
    request: &Request,
    jwks: Option<&Value>,
    lists: &std::collections::BTreeMap<String, String>,
) -> Outcome {
    let outcome = answer(client, issuer, caller_token, request, jwks, lists).await;
    let result = match &outcome {
        Outcome::Unauthenticated => "unauthenticated",
        Outcome::Unavailable => "error",
        Outcome::Answer(body) if body["active"] == true => "active",
        Outcome::Answer(_) => "inactive",
    };
    crate::metrics::metrics()
        .introspections
        .get_or_create(&ResultLabels {
            result: result.into(),
        })
        .inc();
    outcome
}

async fn answer(
    client: &Client,
    issuer: &str,
    caller_token: Option<&str>,
    request: &Request,
    jwks: Option<&Value>,
    lists: &std::collections::BTreeMap<String, String>,
) -> Outcome {
    let Some(caller_token) = caller_token.filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES)
    else {
        return Outcome::Unauthenticated;
    };
    let caller = match authenticate(client, issuer, caller_token).await {
        Ok(Some(user)) => user,
        Ok(None) => return Outcome::Unauthenticated,
        Err(e) => {
            tracing::warn!(error = %e, "introspection: TokenReview failed");
            return Outcome::Unavailable;
        }
    };
    let (Some(jwks), true) = (jwks, request.token.len() <= MAX_TOKEN_BYTES) else {
        return Outcome::Answer(inactive());
    };
    // Verified first, authorised second: the same `active: false` either way.
    let Ok(verified) = verification::verify(&request.token, jwks, lists, None, 0) else {
        return Outcome::Answer(inactive());
    };
    let Some(audience) = verified.claims["aud"].as_str().map(str::to_owned) else {
        return Outcome::Answer(inactive());
    };
    match may_introspect(client, &caller, &audience).await {
        Ok(true) if verified.is_active() => Outcome::Answer(active_response(verified.claims)),
        Ok(_) => Outcome::Answer(inactive()),
        Err(e) => {
            tracing::warn!(error = %e, "introspection: SubjectAccessReview failed");
            Outcome::Unavailable
        }
    }
}

/// The RFC 7662 fields of an active token: its verified claims (`iss`, `sub`, `aud`, `exp`, `iat`,
/// `jti`, `scope`, `client_id`, the `act` chain, ...) plus `active` and `token_type`.
pub fn active_response(claims: Value) -> Value {
    let mut body = match claims {
        Value::Object(map) => map,
        _ => Default::default(),
    };
    body.insert("active".into(), true.into());
    body.insert("token_type".into(), "Bearer".into());
    Value::Object(body)
}

/// Who the caller is, if the apiserver accepts its token for our audience.
async fn authenticate(
    client: &Client,
    issuer: &str,
    caller_token: &str,
) -> kube::Result<Option<UserInfo>> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: caller_token.to_owned(),
            audiences: Some(vec![issuer.to_owned()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(reviewed
        .status
        .filter(|s| s.authenticated == Some(true))
        .filter(|s| {
            s.audiences
                .as_ref()
                .is_none_or(|a| a.iter().any(|a| a == issuer))
        })
        .and_then(|s| s.user))
}

/// Whether the caller may introspect tokens for `audience`.
async fn may_introspect(client: &Client, caller: &UserInfo, audience: &str) -> kube::Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: caller.username.clone(),
            groups: caller.groups.clone(),
            uid: caller.uid.clone(),
            extra: caller.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(RESOURCE.into()),
                name: Some(audience.to_owned()),
                verb: Some(VERB.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviewed = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(reviewed.status.is_some_and(|s| s.allowed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_active_answer_carries_the_claims_and_the_rfc_fields() {
        let body = active_response(json!({"sub": "alice", "act": {"sub": "agent"}}));
        assert_eq!(body["active"], true);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["act"]["sub"], "agent");
        assert_eq!(inactive(), json!({"active": false}));
    }
}

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
//! The SubjectAccessReview names no namespace (an audience belongs to none), so the rule must be
//! bound with a ClusterRoleBinding: a RoleBinding never matches a review without a namespace. A
//! refused caller is told nothing more than `{"active": false}`; the log says once per caller what
//! is missing.
//!
//! An unauthenticated caller gets 401 and nothing else. Everything that is not a valid, unrevoked
//! token of an audience the caller may introspect — unknown, expired, tampered, revoked, suspended,
//! another audience — is the same `{"active": false}`.

use std::{collections::BTreeSet, sync::Mutex};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{
        NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    },
};
use kube::{Api, Client, api::PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

use super::published::Published;
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
    /// 400: an authenticated caller sent no `token` form field.
    BadRequest,
    /// 200 with this body.
    Answer(Value),
    /// 503: the apiserver could not be asked; try again.
    Unavailable,
}

pub fn inactive() -> Value {
    json!({"active": false})
}

/// Answers one request from the published JWKS and status lists.
pub async fn introspect(
    client: &Client,
    issuer: &str,
    caller_token: Option<&str>,
    request: Option<&Request>,
    published: &Published,
) -> Outcome {
    let outcome = answer(client, issuer, caller_token, request, published).await;
    let result = match &outcome {
        Outcome::Unauthenticated => "unauthenticated",
        Outcome::BadRequest => "bad_request",
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
    request: Option<&Request>,
    published: &Published,
) -> Outcome {
    // Who asks comes first: an unauthenticated caller learns nothing, not even about its request.
    let Some(caller_token) = caller_token.filter(|t| t.len() <= MAX_TOKEN_BYTES) else {
        return Outcome::Unauthenticated;
    };
    let caller = match authenticate(client, Some(issuer), caller_token).await {
        Ok(Some(user)) => user,
        Ok(None) => return Outcome::Unauthenticated,
        Err(e) => {
            tracing::warn!(error = %e, "introspection: TokenReview failed");
            return Outcome::Unavailable;
        }
    };
    let Some(request) = request else {
        return Outcome::BadRequest;
    };
    let token = request.token.as_str();
    let Some(audience) = (token.len() <= MAX_TOKEN_BYTES)
        .then(|| verification::unverified_audience(token))
        .flatten()
    else {
        return Outcome::Answer(inactive());
    };
    // Authorised before the token is verified, whatever it holds: a caller without rights cannot
    // tell a genuine token from a forgery by how long the answer takes.
    let allowed = match may_introspect(client, &caller, &audience).await {
        Ok(allowed) => allowed,
        Err(e) => {
            tracing::warn!(error = %e, "introspection: SubjectAccessReview failed");
            return Outcome::Unavailable;
        }
    };
    if !allowed {
        hint_refused(&caller, &audience);
    }
    let Some(jwks) = published.jwks() else {
        return Outcome::Answer(inactive());
    };
    match verification::verify(token, &jwks, &published.lists(), Some(&audience), 0) {
        Ok(verified)
            if allowed
                && verified.is_active()
                && verified.claims["iss"].as_str() == Some(issuer) =>
        {
            Outcome::Answer(active_response(verified.claims))
        }
        _ => Outcome::Answer(inactive()),
    }
}

/// Whether the bearer of `caller_token` may read `/metrics`: authenticated by the apiserver for its
/// own audience (a plain ServiceAccount token, as Prometheus sends) and allowed `get` on the
/// non-resource URL `/metrics`. `Err` when the apiserver could not be asked.
pub async fn may_read_metrics(client: &Client, caller_token: Option<&str>) -> Result<bool, ()> {
    let Some(caller_token) = caller_token.filter(|t| t.len() <= MAX_TOKEN_BYTES) else {
        return Ok(false);
    };
    let caller = match authenticate(client, None, caller_token).await {
        Ok(Some(user)) => user,
        Ok(None) => return Ok(false),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: TokenReview failed");
            return Err(());
        }
    };
    let review = access_review(
        &caller,
        None,
        Some(NonResourceAttributes {
            path: Some("/metrics".into()),
            verb: Some("get".into()),
        }),
    );
    allowed(client, review).await.map_err(|e| {
        tracing::warn!(error = %e, "metrics: SubjectAccessReview failed");
    })
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

/// Who the caller is, if the apiserver accepts its token — for `audience` when given (and then only
/// if the review confirms that audience: an authenticator that ignores audiences answers with none,
/// which must not count), else for the apiserver's own.
async fn authenticate(
    client: &Client,
    audience: Option<&str>,
    caller_token: &str,
) -> kube::Result<Option<UserInfo>> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: caller_token.to_owned(),
            audiences: audience.map(|a| vec![a.to_owned()]),
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
            audience.is_none_or(|wanted| {
                s.audiences
                    .as_ref()
                    .is_some_and(|a| a.iter().any(|a| a == wanted))
            })
        })
        .and_then(|s| s.user))
}

/// Callers already told about in the log (see [`hint_refused`]), by username; forgotten all at once
/// when it reaches [`MAX_HINTED_CALLERS`], so it stays small and a hint repeats at worst.
static HINTED_CALLERS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
const MAX_HINTED_CALLERS: usize = 1024;
/// How much of a refused audience the hint shows: it comes from a token nobody has verified yet.
const HINT_AUDIENCE_CHARS: usize = 200;

/// Logs, once per caller, why an authenticated caller only ever gets `{"active": false}`: it may
/// not `introspect` the audience. The answer cannot say so (it must not tell a refused caller from
/// an inactive token), so the operator's log does, with what to do. The commonest cause is a
/// RoleBinding: the access review names no namespace (an audience belongs to no namespace), and
/// Kubernetes RBAC answers a review without a namespace from ClusterRoleBindings only. Neither the
/// caller's token nor the introspected one is logged; the audience is shortened and escaped.
fn hint_refused(caller: &UserInfo, audience: &str) {
    let user = caller.username.clone().unwrap_or_default();
    if !first_refusal(&user) {
        return;
    }
    let audience: String = audience.chars().take(HINT_AUDIENCE_CHARS).collect();
    tracing::warn!(
        caller = ?user,
        ?audience,
        "introspection: this caller may not `{VERB}` the token's audience, so it is answered \
         {{\"active\": false}}. To allow it, bind a ClusterRole with verbs [{VERB}] on resource \
         {RESOURCE} of apiGroup {GROUP} (resourceNames: the audience) to the caller with a \
         ClusterRoleBinding; a RoleBinding never applies, because the check is cluster-wide (it \
         names no namespace). See docs/verifying.md. Logged once per caller"
    );
}

/// Whether `user` has not been hinted about yet (and is now remembered).
fn first_refusal(user: &str) -> bool {
    HINTED_CALLERS.lock().is_ok_and(|mut hinted| {
        if hinted.len() >= MAX_HINTED_CALLERS && !hinted.contains(user) {
            hinted.clear();
        }
        hinted.insert(user.to_owned())
    })
}

/// Whether the caller may introspect tokens for `audience`. The review names no namespace: an
/// audience is not in one, so only a ClusterRoleBinding can grant it (see [`hint_refused`]).
async fn may_introspect(client: &Client, caller: &UserInfo, audience: &str) -> kube::Result<bool> {
    let review = access_review(
        caller,
        Some(ResourceAttributes {
            group: Some(GROUP.into()),
            resource: Some(RESOURCE.into()),
            name: Some(audience.to_owned()),
            verb: Some(VERB.into()),
            ..Default::default()
        }),
        None,
    );
    allowed(client, review).await
}

fn access_review(
    caller: &UserInfo,
    resource_attributes: Option<ResourceAttributes>,
    non_resource_attributes: Option<NonResourceAttributes>,
) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: caller.username.clone(),
            groups: caller.groups.clone(),
            uid: caller.uid.clone(),
            extra: caller.extra.clone(),
            resource_attributes,
            non_resource_attributes,
        },
        ..Default::default()
    }
}

async fn allowed(client: &Client, review: SubjectAccessReview) -> kube::Result<bool> {
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

    /// The hint about a refused caller is logged once per caller, and what is remembered stays
    /// bounded.
    #[test]
    fn a_refused_caller_is_hinted_about_once() {
        let caller = "system:serviceaccount:hint-test:tickets-api";
        assert!(first_refusal(caller));
        assert!(!first_refusal(caller));
        assert!(first_refusal(
            "system:serviceaccount:hint-test:payments-api"
        ));
        for n in 0..MAX_HINTED_CALLERS + 1 {
            first_refusal(&format!("system:serviceaccount:hint-test:caller-{n}"));
        }
        assert!(HINTED_CALLERS.lock().unwrap().len() <= MAX_HINTED_CALLERS);
    }
}

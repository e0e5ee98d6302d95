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

use std::{collections::BTreeSet, net::IpAddr, sync::Mutex, time::Duration};

use k8s_openapi::api::{
    authentication::v1::UserInfo,
    authorization::v1::{
        NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    },
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::published::Published;
use super::reviews::{Charge, Refusal, Reviews};
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
    /// 429: the client's address is over its budget of requests needing a review; try again after
    /// this long.
    RateLimited(Duration),
}

pub fn inactive() -> Value {
    json!({"active": false})
}

/// Answers one request from the published JWKS and status lists; `address` is the client's.
pub async fn introspect(
    reviews: &Reviews,
    address: Option<IpAddr>,
    issuer: &str,
    caller_token: Option<&str>,
    request: Option<&Request>,
    published: &Published,
) -> Outcome {
    let mut charge = Charge::new(address);
    let outcome = answer(
        reviews,
        &mut charge,
        issuer,
        caller_token,
        request,
        published,
    )
    .await;
    let result = match &outcome {
        Outcome::Unauthenticated => "unauthenticated",
        Outcome::BadRequest => "bad_request",
        Outcome::Unavailable => "error",
        Outcome::RateLimited(_) => "rate_limited",
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
    reviews: &Reviews,
    charge: &mut Charge,
    issuer: &str,
    caller_token: Option<&str>,
    request: Option<&Request>,
    published: &Published,
) -> Outcome {
    // Who asks comes first: an unauthenticated caller learns nothing, not even about its request.
    let Some(caller_token) = caller_token.filter(|t| t.len() <= MAX_TOKEN_BYTES) else {
        return Outcome::Unauthenticated;
    };
    let caller = match reviews
        .authenticate(charge, Some(issuer), caller_token)
        .await
    {
        Ok(Some(user)) => user,
        Ok(None) => return Outcome::Unauthenticated,
        Err(refusal) => return refusal.into(),
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
    let allowed = match may_introspect(reviews, charge, &caller, &audience).await {
        Ok(allowed) => allowed,
        Err(refusal) => return refusal.into(),
    };
    if allowed {
        reviews.accepted(charge);
    } else {
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

impl From<Refusal> for Outcome {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::RateLimited(wait) => Outcome::RateLimited(wait),
            Refusal::Unavailable => Outcome::Unavailable,
        }
    }
}

/// Whether the bearer of `caller_token` may read `/metrics`: authenticated by the apiserver for its
/// own audience (a plain ServiceAccount token, as Prometheus sends) and allowed `get` on the
/// non-resource URL `/metrics`.
pub async fn may_read_metrics(
    reviews: &Reviews,
    address: Option<IpAddr>,
    caller_token: Option<&str>,
) -> Result<bool, Refusal> {
    let Some(caller_token) = caller_token.filter(|t| t.len() <= MAX_TOKEN_BYTES) else {
        return Ok(false);
    };
    let mut charge = Charge::new(address);
    let Some(caller) = reviews
        .authenticate(&mut charge, None, caller_token)
        .await?
    else {
        return Ok(false);
    };
    let review = access_review(
        &caller,
        None,
        Some(NonResourceAttributes {
            path: Some("/metrics".into()),
            verb: Some("get".into()),
        }),
    );
    let allowed = reviews.allowed(&mut charge, review).await?;
    if allowed {
        reviews.accepted(&mut charge);
    }
    Ok(allowed)
}

/// The RFC 7662 fields of an active token: its verified claims (`iss`, `sub`, `aud`, `exp`, `iat`,
/// `jti`, `scope`, `client_id`, the `act` chain, ...) plus `active` and `token_type`.
pub fn active_response(claims: Value) -> Value {
    let mut body = match claims {
        Value::Object(map) => map,
        _ => Default::default(),
    };
    body.insert("active".into(), true.into());
    // A token bound to a key (its `cnf`, returned as it is) is used with DPoP (RFC 9449 §6.2).
    let token_type = if body.get("cnf").is_some_and(|cnf| cnf.get("jkt").is_some()) {
        crate::dpop::TOKEN_TYPE
    } else {
        "Bearer"
    };
    body.insert("token_type".into(), token_type.into());
    Value::Object(body)
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
async fn may_introspect(
    reviews: &Reviews,
    charge: &mut Charge,
    caller: &UserInfo,
    audience: &str,
) -> Result<bool, Refusal> {
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
    reviews.allowed(charge, review).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_active_answer_carries_the_claims_and_the_rfc_fields() {
        let body = active_response(json!({"sub": "alice", "act": {"sub": "agent"}}));
        assert_eq!(body["active"], true);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["act"]["sub"], "agent");
        assert_eq!(body["token_type"], "Bearer");
        let bound = active_response(json!({"sub": "alice", "cnf": {"jkt": "thumb"}}));
        assert_eq!(
            (&bound["token_type"], &bound["cnf"]["jkt"]),
            (&json!("DPoP"), &json!("thumb"))
        );
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

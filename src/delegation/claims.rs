//! The claims of a delegated access token: RFC 9068 (JWT access tokens) carrying the RFC 8693 actor
//! chain.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{chain::Resolution, timing::TokenTimes};
use crate::api::{AuthorizationDetail, DelegationGrantSpec};

/// The claim naming the grant a token was minted for.
pub const GRANT_CLAIM: &str = "delegation.nhi.dev/grant";

/// JWT claims of one token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    pub iss: String,
    /// The root principal: whose authority this is.
    pub sub: String,
    /// The one resource server the token is for.
    pub aud: String,
    /// The current actor (the agent presenting the token).
    pub client_id: String,
    /// Space-separated scopes (RFC 6749 §3.3).
    pub scope: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    /// RFC 8693 §4.1: the outermost `act` is the current actor, nested ones are prior actors.
    pub act: Actor,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_details: Option<Vec<AuthorizationDetail>>,
    #[serde(rename = "delegation.nhi.dev/grant")]
    pub grant: GrantReference,
}

/// One actor of the chain; identity claims only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

/// Which grant a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantReference {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Digest of the grant fields a token carries besides its chain and scopes (audience, details),
/// recorded with the token so that a change to them is noticed: a token for another audience or with
/// other details must be replaced, while timing edits (TTL, renewBefore, validUntil) need not.
pub fn claims_digest(spec: &DelegationGrantSpec) -> String {
    let fields = serde_json::json!([spec.audience, spec.authorization_details]);
    Sha256::digest(fields.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Nests actors given root-most first so that the last one is outermost and the first deepest.
/// `None` for an empty list.
pub fn nest_actors(actors: &[String]) -> Option<Actor> {
    actors.iter().fold(None, |prior, sub| {
        Some(Actor {
            sub: sub.clone(),
            act: prior.map(Box::new),
        })
    })
}

/// Builds the claims of a token for a resolved grant.
pub fn build_claims(
    issuer: &str,
    resolution: &Resolution,
    grant: GrantReference,
    authorization_details: Option<Vec<AuthorizationDetail>>,
    times: &TokenTimes,
    jti: String,
) -> Option<AccessTokenClaims> {
    let act = nest_actors(&resolution.actors)?;
    Some(AccessTokenClaims {
        iss: issuer.to_owned(),
        sub: resolution.principal.name.clone(),
        aud: resolution.audience.clone(),
        client_id: act.sub.clone(),
        scope: resolution.effective_scopes.join(" "),
        iat: times.issued_at.as_second(),
        nbf: times.issued_at.as_second(),
        exp: times.expires_at.as_second(),
        jti,
        act,
        authorization_details,
        grant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outermost_act_is_the_current_actor_and_the_first_actor_is_deepest() {
        let act = nest_actors(&[
            "agent:ns/a".into(),
            "agent:ns/b".into(),
            "agent:ns/c".into(),
        ])
        .unwrap();
        let json = serde_json::to_value(&act).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"sub": "agent:ns/c", "act": {"sub": "agent:ns/b", "act": {"sub": "agent:ns/a"}}})
        );
    }

    #[test]
    fn the_claims_digest_follows_audience_and_details_only() {
        let spec: DelegationGrantSpec = serde_json::from_value(serde_json::json!({
            "principal": {"kind": "User", "name": "a"}, "actorRef": {"name": "x"}, "scopes": ["s"],
            "audience": "https://api", "tokenTTL": "10m",
        }))
        .unwrap();
        let mut timing = spec.clone();
        timing.token_ttl = crate::api::Duration::from("5m");
        timing.renew_before = Some(crate::api::Duration::from("1m"));
        assert_eq!(claims_digest(&spec), claims_digest(&timing));
        let mut audience = spec.clone();
        audience.audience = "https://other".into();
        assert_ne!(claims_digest(&spec), claims_digest(&audience));
        let mut details = spec.clone();
        details.authorization_details = Some(vec![AuthorizationDetail {
            type_: "ticket".into(),
            identifier: Some("1".into()),
            actions: None,
            locations: None,
            datatypes: None,
            privileges: None,
        }]);
        assert_ne!(claims_digest(&spec), claims_digest(&details));
    }

    #[test]
    fn a_single_actor_has_no_nested_act() {
        let json = serde_json::to_value(nest_actors(&["agent:ns/a".into()]).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"sub": "agent:ns/a"}));
        assert!(nest_actors(&[]).is_none());
    }
}

//! Where a grant's token goes, decided: a Secret in the namespace, or no Secret at all (the agent's
//! pods fetch tokens of their own from the token endpoint), and whether every token of the agent must
//! be bound to a key (DPoP). No I/O: [`super::chain::resolve`] calls [`delivery_of`] with the grant
//! and its actor, and the answer travels in the [`super::Resolution`].
//!
//! The rules:
//! 1. The grant's `spec.tokenDelivery`, else its actor's, else `Pod` when the actor requires proof
//!    of possession, else `Secret` (existing grants are unaffected).
//! 2. An actor that requires proof of possession cannot have its token in a Secret: a token written
//!    there is bound to no key (`DeniedProofNeedsPodDelivery`).
//! 3. Pod delivery needs the actor's `serviceAccountName`: it says which pods are the agent's, and
//!    without it no pod could ever fetch the token (`DeniedPodDeliveryNeedsServiceAccount`).
//! 4. Pod delivery needs a token endpoint that serves it (`--pod-delivery`, on when the chart's
//!    verification server serves token exchange): without one the grant is refused
//!    (`PodDeliveryNotServed`), never Ready with a token nobody could fetch.

use super::chain::{Reason, Refusal};
use crate::api::{AgentIdentity, DelegationGrant, TokenDelivery};

/// How a valid grant's token reaches its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the grant's Secret.
    Secret,
    /// Sealed in the grant's status; the agent's pods fetch narrower tokens of their own.
    Pod {
        /// Every token handed out needs a DPoP proof and is bound to its key.
        proof_required: bool,
    },
}

impl Delivery {
    pub fn is_pod(self) -> bool {
        matches!(self, Delivery::Pod { .. })
    }
}

/// The delivery of `grant`'s token to `actor` (its resolved AgentIdentity), or why there can be none;
/// `served`: whether a token endpoint serves deliveries.
pub fn delivery_of(
    grant: &DelegationGrant,
    actor: &AgentIdentity,
    served: bool,
) -> Result<Delivery, Refusal> {
    let proof_required = actor.spec.requires_proof_of_possession();
    let chosen = grant
        .spec
        .token_delivery
        .or(actor.spec.token_delivery)
        .unwrap_or(if proof_required {
            TokenDelivery::Pod
        } else {
            TokenDelivery::Secret
        });
    let actor_name = actor.metadata.name.as_deref().unwrap_or_default();
    match chosen {
        TokenDelivery::Secret if proof_required => Err(Refusal::new(
            Reason::DeniedProofNeedsPodDelivery,
            format!(
                "AgentIdentity {actor_name:?} requires proof of possession (requireProofOfPossession), \
                 and a token in a Secret is bound to no key; set spec.tokenDelivery to Pod (or leave \
                 it out) so that its pods fetch key-bound tokens from the token endpoint"
            ),
        )),
        TokenDelivery::Secret => Ok(Delivery::Secret),
        TokenDelivery::Pod if actor.spec.service_account_name.is_none() => Err(Refusal::new(
            Reason::DeniedPodDeliveryNeedsServiceAccount,
            format!(
                "tokenDelivery is Pod, but AgentIdentity {actor_name:?} names no serviceAccountName, \
                 so no pod could prove it is the agent's; set its serviceAccountName, or use Secret \
                 delivery"
            ),
        )),
        TokenDelivery::Pod if !served => Err(Refusal::new(
            Reason::PodDeliveryNotServed,
            "tokenDelivery is Pod, but no token endpoint serves deliveries to pods here (the \
             operator runs with --pod-delivery=false; with the Helm chart, set \
             verifier.tokenExchange.enabled=true), so no pod could fetch the token; use Secret \
             delivery or ask the cluster's operator admins",
        )),
        TokenDelivery::Pod => Ok(Delivery::Pod { proof_required }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentIdentitySpec, DelegationGrantSpec, LocalRef, Owner, OwnerKind};
    use kube::api::ObjectMeta;

    fn agent(
        delivery: Option<TokenDelivery>,
        proof: Option<bool>,
        service_account: Option<&str>,
    ) -> AgentIdentity {
        AgentIdentity {
            metadata: ObjectMeta {
                name: Some("bot".into()),
                ..Default::default()
            },
            spec: AgentIdentitySpec {
                owner: Owner {
                    kind: OwnerKind::Group,
                    name: "platform".into(),
                },
                service_account_name: service_account.map(Into::into),
                allowed_scopes: vec!["read".into()],
                allowed_audiences: vec!["https://api".into()],
                max_token_ttl: "15m".into(),
                delegation: None,
                require_approval: None,
                token_delivery: delivery,
                require_proof_of_possession: proof,
                suspended: None,
            },
            status: None,
        }
    }

    fn grant(delivery: Option<TokenDelivery>) -> DelegationGrant {
        DelegationGrant::new(
            "g",
            DelegationGrantSpec {
                principal: None,
                parent_grant_ref: None,
                actor_ref: LocalRef::new("bot"),
                requester: None,
                authors: None,
                scopes: vec!["read".into()],
                audience: "https://api".into(),
                token_ttl: "10m".into(),
                renew_before: None,
                valid_until: None,
                authorization_details: None,
                token_delivery: delivery,
                secret_name: None,
                suspended: None,
            },
        )
    }

    use TokenDelivery::{Pod, Secret};

    fn delivery_of_served(
        grant: &DelegationGrant,
        actor: &AgentIdentity,
    ) -> Result<Delivery, Refusal> {
        delivery_of(grant, actor, true)
    }

    #[test]
    fn pod_delivery_needs_an_endpoint_that_serves_it() {
        let actor = agent(Some(Pod), None, Some("bot-sa"));
        let refusal = delivery_of(&grant(None), &actor, false).expect_err("nobody could fetch it");
        assert_eq!(refusal.reason, Reason::PodDeliveryNotServed);
        assert!(refusal.message.contains("verifier.tokenExchange.enabled"));
        assert_eq!(
            delivery_of(&grant(Some(Secret)), &actor, false),
            Ok(Delivery::Secret),
            "Secret delivery needs no endpoint"
        );
    }

    #[test]
    fn the_grant_decides_then_its_agent_then_the_secret_default() {
        let sa = Some("bot-sa");
        let pod = Ok(Delivery::Pod {
            proof_required: false,
        });
        assert_eq!(
            delivery_of_served(&grant(None), &agent(None, None, sa)),
            Ok(Delivery::Secret)
        );
        assert_eq!(
            delivery_of_served(&grant(None), &agent(Some(Pod), None, sa)),
            pod
        );
        assert_eq!(
            delivery_of_served(&grant(Some(Pod)), &agent(None, None, sa)),
            pod
        );
        assert_eq!(
            delivery_of_served(&grant(Some(Secret)), &agent(Some(Pod), None, sa)),
            Ok(Delivery::Secret)
        );
    }

    #[test]
    fn proof_of_possession_means_pod_delivery_and_refuses_a_secret() {
        let sa = Some("bot-sa");
        let bound = Ok(Delivery::Pod {
            proof_required: true,
        });
        assert_eq!(
            delivery_of_served(&grant(None), &agent(None, Some(true), sa)),
            bound
        );
        assert_eq!(
            delivery_of_served(&grant(Some(Pod)), &agent(Some(Secret), Some(true), sa)),
            bound
        );
        for refused in [
            delivery_of_served(&grant(Some(Secret)), &agent(None, Some(true), sa)),
            delivery_of_served(&grant(None), &agent(Some(Secret), Some(true), sa)),
        ] {
            let refusal = refused.expect_err("a bound agent's token is never put in a Secret");
            assert_eq!(refusal.reason, Reason::DeniedProofNeedsPodDelivery);
            assert!(refusal.message.contains("tokenDelivery"));
        }
    }

    #[test]
    fn pod_delivery_needs_the_agents_service_account() {
        for actor in [agent(Some(Pod), None, None), agent(None, Some(true), None)] {
            let refusal =
                delivery_of_served(&grant(None), &actor).expect_err("no pod could fetch it");
            assert_eq!(refusal.reason, Reason::DeniedPodDeliveryNeedsServiceAccount);
        }
        assert_eq!(
            delivery_of_served(&grant(None), &agent(None, None, None)),
            Ok(Delivery::Secret)
        );
    }
}

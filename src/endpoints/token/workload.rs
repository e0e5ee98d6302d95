//! Who is asking for an exchange: the workload its `actor_token` proves. The token must be a
//! Kubernetes ServiceAccount token for the issuer's audience (a projected token, not one for the
//! apiserver that any holder could replay here), which the apiserver accepts in a TokenReview, and
//! bound to a Pod: the review's `extra` names the pod. Only the kubelet (or whoever may create
//! `serviceaccounts/token` with a `boundObjectRef`) obtains such a token; impersonating the
//! ServiceAccount cannot set those extras.

use k8s_openapi::api::authentication::v1::UserInfo;

use crate::{
    api::{ExtraValue, UserIdentity},
    delegation::{
        authority::{bound_pod, service_account_of},
        exchange::ProvenWorkload,
    },
    endpoints::reviews::{Charge, Refusal, Reviews},
};

/// Why an actor token proves no workload (the reason label of the refusal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotProven {
    /// The apiserver does not accept it for the issuer's audience (expired, forged, another audience).
    NotAccepted,
    /// It authenticates someone who is not a ServiceAccount.
    NotServiceAccount,
    /// A ServiceAccount's token bound to no Pod (a TokenRequest without a boundObjectRef, a legacy
    /// Secret token).
    NotPodBound,
}

impl NotProven {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotAccepted => "actor_not_accepted",
            Self::NotServiceAccount => "actor_not_service_account",
            Self::NotPodBound => "actor_not_pod_bound",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Self::NotAccepted => {
                "the actor_token is not a ServiceAccount token the cluster accepts for this issuer's audience; \
                 send the token the kubelet projects into your pod with the issuer URL as its audience"
            }
            Self::NotServiceAccount => {
                "the actor_token does not authenticate a ServiceAccount; send your pod's projected ServiceAccount token"
            }
            Self::NotPodBound => {
                "the actor_token is not bound to a pod; send the token the kubelet projects into your pod \
                 (a serviceAccountToken volume with the issuer URL as audience), not one requested by hand"
            }
        }
    }
}

/// The workload `actor_token` proves, asking the apiserver (through the caller's budget) unless a
/// recent answer is cached — for no longer than the token's own validity.
pub async fn prove_workload(
    reviews: &Reviews,
    charge: &mut Charge,
    issuer: &str,
    actor_token: &str,
) -> Result<Result<ProvenWorkload, NotProven>, Refusal> {
    let Some(user) = reviews
        .authenticate(charge, Some(issuer), actor_token)
        .await?
    else {
        return Ok(Err(NotProven::NotAccepted));
    };
    Ok(workload_of(&user))
}

/// The workload of an authenticated user: a ServiceAccount with the pod its token is bound to.
pub fn workload_of(user: &UserInfo) -> Result<ProvenWorkload, NotProven> {
    let identity = UserIdentity {
        username: user.username.clone().unwrap_or_default(),
        uid: user.uid.clone(),
        groups: None,
        extra: user.extra.as_ref().map(|extra| {
            extra
                .iter()
                .map(|(key, values)| (key.clone(), ExtraValue(values.clone())))
                .collect()
        }),
    };
    let (namespace, service_account) =
        service_account_of(&identity).ok_or(NotProven::NotServiceAccount)?;
    let (pod_name, pod_uid) = bound_pod(&identity).ok_or(NotProven::NotPodBound)?;
    Ok(ProvenWorkload {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod_name: pod_name.to_owned(),
        pod_uid: pod_uid.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegation::authority::{POD_NAME_EXTRA, POD_UID_EXTRA};

    fn user(name: &str, pod: Option<(&str, &str)>) -> UserInfo {
        UserInfo {
            username: Some(name.into()),
            extra: pod.map(|(pod, uid)| {
                [
                    (POD_NAME_EXTRA.to_owned(), vec![pod.to_owned()]),
                    (POD_UID_EXTRA.to_owned(), vec![uid.to_owned()]),
                ]
                .into()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_pod_bound_service_account_is_a_workload() {
        let proven =
            workload_of(&user("system:serviceaccount:team:agent", Some(("p", "u")))).unwrap();
        assert_eq!(
            (
                proven.namespace.as_str(),
                proven.service_account.as_str(),
                proven.pod_name.as_str(),
                proven.pod_uid.as_str()
            ),
            ("team", "agent", "p", "u")
        );
        assert_eq!(
            workload_of(&user("system:serviceaccount:team:agent", None)).err(),
            Some(NotProven::NotPodBound)
        );
        assert_eq!(
            workload_of(&user("alice@example.com", Some(("p", "u")))).err(),
            Some(NotProven::NotServiceAccount)
        );
        assert_eq!(
            workload_of(&user("system:serviceaccount:team:a:b", Some(("p", "u")))).err(),
            Some(NotProven::NotServiceAccount)
        );
    }
}

//! Commands for people, beside the operator itself: approving and rejecting grants.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, PostParams},
};

use crate::api::{Decision, DelegationApproval, DelegationApprovalSpec, DelegationGrant, GrantRef};

/// Records a decision on the grant's current generation as a DelegationApproval. The apiserver stamps
/// who decided and refuses anyone not allowed verb `approve` on the grant. Returns the approval's name.
pub async fn decide(
    client: Client,
    namespace: &str,
    grant_name: &str,
    decision: Decision,
    comment: Option<String>,
) -> Result<String, String> {
    let grants: Api<DelegationGrant> = Api::namespaced(client.clone(), namespace);
    let grant = grants
        .get_opt(grant_name)
        .await
        .map_err(|e| format!("reading DelegationGrant {namespace}/{grant_name}: {e}"))?
        .ok_or_else(|| format!("DelegationGrant {namespace}/{grant_name} does not exist"))?;
    let (Some(uid), Some(generation)) = (grant.uid(), grant.metadata.generation) else {
        return Err(format!(
            "DelegationGrant {namespace}/{grant_name} has no uid or generation"
        ));
    };
    let approval = DelegationApproval {
        metadata: ObjectMeta {
            // Kept short enough for the random suffix the apiserver adds.
            generate_name: Some(format!("{}-", truncate(grant_name, 200))),
            namespace: Some(namespace.to_owned()),
            // Cleaned up with the grant by Kubernetes' garbage collector.
            owner_references: Some(vec![OwnerReference {
                api_version: DelegationGrant::api_version(&()).into_owned(),
                kind: DelegationGrant::kind(&()).into_owned(),
                name: grant_name.to_owned(),
                uid: uid.clone(),
                controller: None,
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: DelegationApprovalSpec {
            grant_ref: GrantRef {
                name: grant_name.to_owned(),
                uid,
            },
            generation,
            decision,
            comment,
            approver: None,
        },
    };
    let approvals: Api<DelegationApproval> = Api::namespaced(client, namespace);
    let created = approvals
        .create(&PostParams::default(), &approval)
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) => status.message,
            other => other.to_string(),
        })?;
    Ok(created.name_any())
}

fn truncate(name: &str, max: usize) -> &str {
    match name.char_indices().nth(max) {
        Some((i, _)) => &name[..i],
        None => name,
    }
}

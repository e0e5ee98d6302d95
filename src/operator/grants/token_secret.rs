//! The Secret holding a grant's token: what it looks like, whose it is, and how it is written,
//! checked and deleted. The operator never takes over a Secret it did not create.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
};
use kube::{
    Api, Resource,
    api::{
        DeleteParams, ObjectMeta, PartialObjectMeta, Patch, PatchParams, PostParams, Preconditions,
    },
};

use crate::api::DelegationGrant;
use crate::operator::{
    FIELD_MANAGER,
    error::{Result, is_conflict, is_not_found},
    managed_labels,
};

pub const SECRET_TYPE: &str = "delegation.nhi.dev/token";
pub const TOKEN_KEY: &str = "token";
pub const EXPIRES_AT_KEY: &str = "expires-at";
/// Label naming the grant a token Secret belongs to.
pub const GRANT_LABEL: &str = "delegation.nhi.dev/grant";
/// Annotations with the token id and expiry (not secret), visible in the metadata-only cache, so a
/// token can be revoked even when the grant's status never recorded it.
pub const TOKEN_ID_ANNOTATION: &str = "delegation.nhi.dev/token-id";
pub const EXPIRES_AT_ANNOTATION: &str = "delegation.nhi.dev/expires-at";
/// The grant's uid, always; the grant's name also labels the Secret when it fits a label value.
pub const GRANT_UID_LABEL: &str = "delegation.nhi.dev/grant-uid";

/// Who a Secret of the right name belongs to.
#[derive(Debug, PartialEq, Eq)]
pub enum Ownership {
    Absent,
    /// Created by this operator for this grant.
    Ours,
    /// Someone else's (or another grant's): hands off.
    Foreign,
}

/// Decides ownership from the Secret's metadata: ours only when its controller owner reference is
/// this very grant (same uid), so a same-named grant recreated later does not inherit it either.
pub fn ownership(secret: Option<&PartialObjectMeta<Secret>>, grant: &DelegationGrant) -> Ownership {
    let Some(secret) = secret else {
        return Ownership::Absent;
    };
    let grant_uid = grant.metadata.uid.as_deref();
    let ours = secret.metadata.owner_references.iter().flatten().any(|r| {
        r.controller == Some(true)
            && r.kind == "DelegationGrant"
            && Some(r.uid.as_str()) == grant_uid
    });
    if ours {
        Ownership::Ours
    } else {
        Ownership::Foreign
    }
}

/// The Secret for a freshly minted token.
pub fn desired(
    grant: &DelegationGrant,
    name: &str,
    token: &str,
    token_id: &str,
    expires_at: &Time,
) -> Secret {
    let mut labels = managed_labels();
    labels.insert(
        GRANT_UID_LABEL.into(),
        grant.metadata.uid.clone().unwrap_or_default(),
    );
    let grant_name = grant.metadata.name.clone().unwrap_or_default();
    if grant_name.len() <= 63 {
        labels.insert(GRANT_LABEL.into(), grant_name);
    }
    let expires = expires_at.0.to_string();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: grant.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([
                (TOKEN_ID_ANNOTATION.to_owned(), token_id.to_owned()),
                (EXPIRES_AT_ANNOTATION.to_owned(), expires.clone()),
            ])),
            owner_references: Some(vec![owner_reference(grant)]),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(BTreeMap::from([
            (TOKEN_KEY.to_owned(), ByteString(token.as_bytes().to_vec())),
            (EXPIRES_AT_KEY.to_owned(), ByteString(expires.into_bytes())),
        ])),
        ..Default::default()
    }
}

fn owner_reference(grant: &DelegationGrant) -> OwnerReference {
    OwnerReference {
        api_version: DelegationGrant::api_version(&()).into_owned(),
        kind: DelegationGrant::kind(&()).into_owned(),
        name: grant.metadata.name.clone().unwrap_or_default(),
        uid: grant.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The outcome of writing a token Secret.
pub enum Written {
    /// Written; the new resourceVersion.
    Done(String),
    /// A Secret of that name appeared that is not ours.
    Conflict,
}

/// Updates our Secret when `secret.metadata.uid` is set (the apiserver refuses the write if that uid
/// is not the Secret's), creates it otherwise (refused if the name is taken). Never overwrites a Secret
/// that is not ours.
pub async fn write(api: &Api<Secret>, secret: &Secret) -> Result<Written> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let result = if secret.metadata.uid.is_some() {
        let mut value = serde_json::to_value(secret)?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "Secret".into();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await
    } else {
        api.create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            secret,
        )
        .await
    };
    match result {
        Ok(written) => Ok(Written::Done(
            written.metadata.resource_version.unwrap_or_default(),
        )),
        Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(Written::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// Deletes our Secret, guarded by its uid so that a Secret recreated by someone else is never hit.
pub async fn delete(api: &Api<Secret>, name: &str, uid: Option<String>) -> Result<()> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The token of a Secret whose content is exactly what the operator writes: its type, the keys
/// `token` and `expires-at` and nothing else, `expires-at` as recorded. `None` when anything differs
/// (read only to check a Secret whose content changed unseen).
pub fn stored_token<'a>(secret: &'a Secret, expires_at: &Time) -> Option<&'a str> {
    let data = secret.data.as_ref()?;
    let shaped = secret.type_.as_deref() == Some(SECRET_TYPE)
        && data.len() == 2
        && data.get(EXPIRES_AT_KEY).map(|b| b.0.as_slice())
            == Some(expires_at.0.to_string().as_bytes())
        && secret.string_data.is_none();
    shaped
        .then(|| data.get(TOKEN_KEY))
        .flatten()
        .and_then(|b| std::str::from_utf8(&b.0).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(uid: &str) -> DelegationGrant {
        let mut g: DelegationGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
            "metadata": {"name": "g", "namespace": "ns", "uid": uid},
            "spec": {"principal": {"kind": "User", "name": "a"}, "actorRef": {"name": "x"}, "scopes": ["s"],
                     "audience": "https://api", "tokenTTL": "10m"},
        }))
        .unwrap();
        g.metadata.uid = Some(uid.into());
        g
    }

    fn secret_owned_by(owner: Option<OwnerReference>) -> PartialObjectMeta<Secret> {
        let mut meta = PartialObjectMeta::<Secret>::default();
        meta.metadata.name = Some("g-token".into());
        meta.metadata.owner_references = owner.map(|o| vec![o]);
        meta
    }

    #[test]
    fn only_a_secret_controlled_by_this_very_grant_is_ours() {
        let g = grant("uid-1");
        assert_eq!(ownership(None, &g), Ownership::Absent);
        assert_eq!(
            ownership(Some(&secret_owned_by(Some(owner_reference(&g)))), &g),
            Ownership::Ours
        );
        assert_eq!(
            ownership(Some(&secret_owned_by(None)), &g),
            Ownership::Foreign,
            "a user's Secret"
        );
        let recreated = grant("uid-2");
        assert_eq!(
            ownership(
                Some(&secret_owned_by(Some(owner_reference(&g)))),
                &recreated
            ),
            Ownership::Foreign,
            "a same-named grant created later does not inherit the old grant's Secret"
        );
        let mut not_controller = owner_reference(&g);
        not_controller.controller = None;
        assert_eq!(
            ownership(Some(&secret_owned_by(Some(not_controller))), &g),
            Ownership::Foreign
        );
    }

    #[test]
    fn a_secret_is_intact_only_with_exactly_the_keys_and_expiry_written() {
        let g = grant("uid-1");
        let expires = Time(k8s_openapi::jiff::Timestamp::from_second(1_900_000_000).unwrap());
        let written = desired(&g, "g-token", "header.payload.sig", "jti-1", &expires);
        assert_eq!(stored_token(&written, &expires), Some("header.payload.sig"));
        let mut later = written.clone();
        later.data.as_mut().unwrap().insert(
            EXPIRES_AT_KEY.into(),
            ByteString(b"2099-01-01T00:00:00Z".to_vec()),
        );
        assert_eq!(stored_token(&later, &expires), None, "an edited expires-at");
        let mut extra = written.clone();
        extra
            .data
            .as_mut()
            .unwrap()
            .insert("note".into(), ByteString(b"x".to_vec()));
        assert_eq!(stored_token(&extra, &expires), None, "an added key");
        let mut retyped = written;
        retyped.type_ = Some("Opaque".into());
        assert_eq!(stored_token(&retyped, &expires), None, "another type");
    }

    #[test]
    fn the_secret_carries_the_token_its_metadata_and_its_owner() {
        let g = grant("uid-1");
        let expires = Time(k8s_openapi::jiff::Timestamp::from_second(1_900_000_000).unwrap());
        let s = desired(&g, "g-token", "header.payload.sig", "jti-1", &expires);
        assert_eq!(s.type_.as_deref(), Some(SECRET_TYPE));
        let data = s.data.unwrap();
        assert_eq!(data[TOKEN_KEY].0, b"header.payload.sig");
        assert_eq!(data[EXPIRES_AT_KEY].0, b"2030-03-17T17:46:40Z");
        let annotations = s.metadata.annotations.unwrap();
        assert_eq!(annotations[TOKEN_ID_ANNOTATION], "jti-1");
        assert!(
            !annotations.values().any(|v| v.contains("payload")),
            "no token material in metadata"
        );
        let labels = s.metadata.labels.unwrap();
        assert_eq!(labels[GRANT_LABEL], "g");
        assert_eq!(labels[GRANT_UID_LABEL], "uid-1");
        assert_eq!(s.metadata.owner_references.unwrap()[0].uid, "uid-1");
    }
}

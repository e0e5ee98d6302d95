//! RFC 8693 token exchange against the live endpoint (`POST <issuer>/token` of `run` with its
//! verification endpoints on): a namespace with three agents that can form a chain, a grant to the
//! first, and pods running as each agent's ServiceAccount with pod-bound tokens for the issuer's
//! audience — what the kubelet projects into an agent's pod.
//!
//! Tokens are never printed: assertions name tokens by role, and every answer is checked to carry
//! none of the tokens of its request.

use std::time::Duration;

use k8s_openapi::api::{
    core::v1::{Pod, ServiceAccount},
    rbac::v1::{Role, RoleBinding, RoleRef},
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use serde_json::{Value, json};

use super::{
    Fixture, RBAC_SETTLE_TIMEOUT, client_impersonating, pod_running_as,
    request_service_account_token_for, rule, service_account_subject,
    verifiers::{HttpResponse, HttpsIssuer, Trust, start_https_operator, unverified_claims},
    wait_for,
};

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Pod delivery: the subject names a grant.
pub const GRANT_TOKEN_TYPE: &str = "urn:delegation.nhi.dev:token-type:grant";

/// The audience of the fixture's grant (declared for every test namespace).
pub const AUDIENCE: &str = "https://tickets.example.com";
/// Another declared audience the agents may have, which the grant is not for.
pub const OTHER_AUDIENCE: &str = "https://payments.example.com";
/// The fixture grant's name (its token is in Secret `<GRANT>-token`).
pub const GRANT: &str = "task";

/// What the fixture creates, with the defaults of issue #20's tests: `a` (maxDepth 2, may hand on to
/// `b`), `b` (maxDepth 1, to `c`), `c` (no delegation); a 10-minute grant from alice to `a`.
#[derive(Clone, Debug)]
pub struct ExchangeSetup {
    /// `spec.delegation` of agent `a`, `b` and `c` (`None`: the chain ends there).
    pub delegation: [Option<Value>; 3],
    /// The grant's `tokenTTL`.
    pub token_ttl: String,
    /// The grant's `authorizationDetails`, if any.
    pub details: Option<Value>,
    /// The grant's `tokenDelivery` (`None`: left out, Secret delivery unless agent `a` says).
    pub token_delivery: Option<&'static str>,
    /// Agent `a`'s `requireProofOfPossession`.
    pub require_proof: bool,
}

impl Default for ExchangeSetup {
    fn default() -> Self {
        Self {
            delegation: [
                Some(json!({"maxDepth": 2, "allowedActors": ["b"]})),
                Some(json!({"maxDepth": 1, "allowedActors": ["c"]})),
                None,
            ],
            token_ttl: "10m".into(),
            details: None,
            token_delivery: None,
            require_proof: false,
        }
    }
}

impl ExchangeSetup {
    /// The three agents, `a`, `b`, `c`, running as `sa-a`, `sa-b`, `sa-c`.
    pub fn agents(&self) -> String {
        ["a", "b", "c"]
            .iter()
            .zip(&self.delegation)
            .map(|(name, delegation)| {
                let mut spec = json!({
                    "owner": {"kind": "Group", "name": "platform"},
                    "serviceAccountName": format!("sa-{name}"),
                    "allowedScopes": ["tickets:read", "tickets:write", "tickets:comment"],
                    "allowedAudiences": [AUDIENCE, OTHER_AUDIENCE],
                    "maxTokenTTL": "15m",
                });
                if let Some(d) = delegation {
                    spec["delegation"] = d.clone();
                }
                if *name == "a" && self.require_proof {
                    spec["requireProofOfPossession"] = true.into();
                }
                let agent = json!({
                    "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "AgentIdentity",
                    "metadata": {"name": name}, "spec": spec,
                });
                serde_yaml::to_string(&agent).unwrap()
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    /// The grant from alice to `a`: `tickets:read tickets:write` for [`AUDIENCE`].
    pub fn grant(&self) -> String {
        let mut spec = json!({
            "principal": {"kind": "User", "name": "alice@example.com"},
            "actorRef": {"name": "a"},
            "scopes": ["tickets:read", "tickets:write"],
            "audience": AUDIENCE,
            "tokenTTL": self.token_ttl,
        });
        if let Some(details) = &self.details {
            spec["authorizationDetails"] = details.clone();
        }
        if let Some(delivery) = self.token_delivery {
            spec["tokenDelivery"] = delivery.into();
        }
        let grant = json!({
            "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
            "metadata": {"name": GRANT}, "spec": spec,
        });
        serde_yaml::to_string(&grant).unwrap()
    }
}

/// A pod running as a ServiceAccount, and the pod-bound token the kubelet would project into it.
pub struct Workload {
    pub service_account: String,
    /// `system:serviceaccount:<ns>:<sa>`.
    pub username: String,
    pub pod: Pod,
    pub token: String,
}

impl Workload {
    pub fn pod_name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap()
    }

    pub fn pod_uid(&self) -> &str {
        self.pod.metadata.uid.as_deref().unwrap()
    }
}

/// Whether an exchange keeps the current actor or hands on to another agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// The caller is the current actor's workload: `act` unchanged.
    Narrowing,
    /// The caller is the workload of this agent, an allowed actor of the current one.
    Hop(&'a str),
}

/// The operator (HTTPS endpoints on, `/token` among them), its trust, the agents, the grant's token
/// and the three agents' workloads.
pub struct Exchange {
    pub f: Fixture,
    pub issuer: HttpsIssuer,
    pub trust: Trust,
    pub setup: ExchangeSetup,
    /// The token in the grant's Secret; with Pod delivery, the token sealed in its status (opened
    /// with the operator's keys, so that the checks for leaked tokens look for it too).
    pub grant_token: String,
    pub a: Workload,
    pub b: Workload,
    pub c: Workload,
}

impl Exchange {
    pub async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, ExchangeSetup::default(), &[]).await
    }

    pub async fn start_with(prefix: &str, setup: ExchangeSetup, operator_args: &[&str]) -> Self {
        let (f, issuer, trust) = start_https_operator(prefix, operator_args).await;
        f.apply(&setup.agents()).await;
        f.apply(&setup.grant()).await;
        f.wait_ready_within(GRANT, "True", None, Duration::from_secs(90))
            .await;
        let pod_delivery = setup.token_delivery == Some("Pod")
            || (setup.require_proof && setup.token_delivery.is_none());
        let grant_token = if pod_delivery {
            // Opened with the operator's keys (as its token endpoint does), only so that every
            // check that no answer or log carries the grant's token looks for this one too.
            open_sealed(&f, GRANT).await
        } else {
            wait_for("the grant's token", Duration::from_secs(30), || async {
                f.token_in(&format!("{GRANT}-token")).await
            })
            .await
        };
        let a = workload(&f, &issuer, "sa-a").await;
        let b = workload(&f, &issuer, "sa-b").await;
        let c = workload(&f, &issuer, "sa-c").await;
        Self {
            f,
            issuer,
            trust,
            setup,
            grant_token,
            a,
            b,
            c,
        }
    }

    pub fn ns(&self) -> &str {
        &self.f.ns
    }

    /// `agent:<ns>/<name>`, an agent's subject in `act`.
    pub fn agent(&self, name: &str) -> String {
        format!("agent:{}/{name}", self.f.ns)
    }

    /// A new pod running as `service_account` (created if needed) with its pod-bound token for the
    /// issuer's audience.
    pub async fn workload(&self, service_account: &str) -> Workload {
        workload(&self.f, &self.issuer, service_account).await
    }

    /// The token in the grant's Secret now (a new one after a rotation or re-creation).
    pub async fn current_grant_token(&self) -> String {
        wait_for("the grant's token", Duration::from_secs(60), || async {
            self.f.token_in(&format!("{GRANT}-token")).await
        })
        .await
    }

    /// The form of an exchange of `subject` by the holder of `actor`, with `extra` fields after the
    /// required ones.
    pub fn form<'a>(
        subject: &'a str,
        actor: &'a str,
        extra: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        let mut form = vec![
            ("grant_type", GRANT_TYPE),
            ("subject_token", subject),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("actor_token", actor),
            ("actor_token_type", JWT_TYPE),
        ];
        form.extend_from_slice(extra);
        form
    }

    /// A token of agent a's ServiceAccount for the issuer's audience, minted by someone who may
    /// impersonate it (with pod extras forged on the impersonation, naming its real pod): the
    /// ServiceAccount's, but bound to no pod.
    pub async fn impersonated_actor_token(&self) -> String {
        let ns = self.ns().to_owned();
        // The ServiceAccount may mint its own tokens (so that the impersonated request is allowed).
        let meta = ObjectMeta {
            name: Some("sa-a-mints-itself".into()),
            namespace: Some(ns.clone()),
            ..Default::default()
        };
        let role = Role {
            metadata: meta.clone(),
            rules: Some(vec![rule(
                "",
                &["serviceaccounts/token"],
                &["create"],
                &["sa-a"],
            )]),
        };
        Api::<Role>::namespaced(self.f.client.clone(), &ns)
            .create(&PostParams::default(), &role)
            .await
            .unwrap();
        let binding = RoleBinding {
            metadata: meta,
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: "sa-a-mints-itself".into(),
            },
            subjects: Some(vec![service_account_subject(&ns, "sa-a")]),
        };
        Api::<RoleBinding>::namespaced(self.f.client.clone(), &ns)
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
        let as_sa = client_impersonating(
            &self.a.username,
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{ns}"),
            ],
            None,
            &[
                (
                    "authentication.kubernetes.io/pod-name",
                    &[self.a.pod_name()],
                ),
                ("authentication.kubernetes.io/pod-uid", &[self.a.pod_uid()]),
            ],
        )
        .await;
        let request = k8s_openapi::api::authentication::v1::TokenRequest {
            spec: Some(k8s_openapi::api::authentication::v1::TokenRequestSpec {
                audiences: Some(vec![self.issuer.url.clone()]),
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let accounts = Api::<ServiceAccount>::namespaced(as_sa, &ns);
        wait_for(
            "the impersonated ServiceAccount to be allowed to mint its token",
            RBAC_SETTLE_TIMEOUT,
            || async {
                match accounts
                    .create_token_request("sa-a", &PostParams::default(), &request)
                    .await
                {
                    Ok(r) => r.status.and_then(|s| s.token),
                    Err(kube::Error::Api(s)) if s.code == 403 => None,
                    Err(e) => panic!("TokenRequest as the impersonated ServiceAccount: {e}"),
                }
            },
        )
        .await
    }

    /// The form of a delivery (Pod delivery) of grant `grant`'s token to the holder of `actor`.
    pub fn delivery_form<'a>(
        grant: &'a str,
        actor: &'a str,
        extra: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        let mut form = vec![
            ("grant_type", GRANT_TYPE),
            ("subject_token", grant),
            ("subject_token_type", GRANT_TOKEN_TYPE),
            ("actor_token", actor),
            ("actor_token_type", JWT_TYPE),
        ];
        form.extend_from_slice(extra);
        form
    }

    /// POSTs a form to the token endpoint.
    pub async fn post(&self, form: &[(&str, &str)]) -> HttpResponse {
        self.trust.exchange(&self.issuer.url, form).await
    }

    /// POSTs a form to the token endpoint with extra headers (`DPoP`).
    pub async fn post_with(&self, form: &[(&str, &str)], headers: &[(&str, &str)]) -> HttpResponse {
        self.trust
            .exchange_with(&self.issuer.url, form, headers)
            .await
    }

    /// The token endpoint's URL, as a DPoP proof's `htu` names it.
    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer.url)
    }

    /// How many tokens the endpoint minted so far: its `Exchanged` and `Delivered` audit lines.
    pub fn exchanged_lines(&self) -> usize {
        self.audit_lines("Exchanged").len() + self.audit_lines("Delivered").len()
    }

    /// The audit lines of refusals, of exchanges and deliveries.
    fn refusal_lines(&self) -> Vec<Value> {
        self.f
            .operator()
            .audit()
            .into_iter()
            .filter(|l| l["action"] == "ExchangeRefused" || l["action"] == "DeliveryRefused")
            .collect()
    }

    /// The operator's audit lines with this `action`.
    pub fn audit_lines(&self, action: &str) -> Vec<Value> {
        self.f
            .operator()
            .audit()
            .into_iter()
            .filter(|l| l["action"] == action)
            .collect()
    }

    /// Exchanges `subject` as `caller` (its pod-bound token) with `extra` fields and expects a token:
    /// checks the answer (200, JSON, `no-store`, RFC 8693 fields), the issued token against its
    /// subject ([`Exchange::check_issued`]) and the `Exchanged` audit line. Returns the token and the
    /// answer.
    pub async fn exchanged(
        &self,
        subject: &str,
        caller: &Workload,
        step: Step<'_>,
        extra: &[(&str, &str)],
    ) -> (String, Value) {
        let form = Self::form(subject, &caller.token, extra);
        self.exchanged_form(&form, subject, caller, step).await
    }

    /// [`Exchange::exchanged`] with the whole form given (other token types, fields left out).
    pub async fn exchanged_form(
        &self,
        form: &[(&str, &str)],
        subject: &str,
        caller: &Workload,
        step: Step<'_>,
    ) -> (String, Value) {
        self.exchanged_with(form, None, subject, caller, step).await
    }

    /// [`Exchange::exchanged_form`] with a DPoP proof in the `DPoP` header: the token is bound to the
    /// proof's key (`cnf.jkt`, `token_type` DPoP, the audit line's `boundTo`). `proof` is the proof
    /// and its key's thumbprint.
    pub async fn exchanged_with(
        &self,
        form: &[(&str, &str)],
        proof: Option<(&str, &str)>,
        subject: &str,
        caller: &Workload,
        step: Step<'_>,
    ) -> (String, Value) {
        let headers: Vec<(&str, &str)> = proof.iter().map(|(p, _)| ("DPoP", *p)).collect();
        let reply = self.post_with(form, &headers).await;
        assert_eq!(
            reply.status,
            200,
            "an exchange by {} ({step:?}) was refused: {}",
            caller.username,
            scrubbed(&reply.body)
        );
        assert!(
            reply.content_type.starts_with("application/json"),
            "{}",
            reply.content_type
        );
        assert!(
            reply.cache_control.contains("no-store"),
            "a token answer is never cached: Cache-Control {:?}",
            reply.cache_control
        );
        let body = reply.json();
        let token = body["access_token"]
            .as_str()
            .expect("an access_token")
            .to_owned();
        assert_eq!(body["issued_token_type"], ACCESS_TOKEN_TYPE);
        let claims = unverified_claims(&token);
        match proof {
            None => {
                assert_eq!(body["token_type"], "Bearer");
                assert!(
                    claims.get("cnf").is_none(),
                    "no proof, no binding: {claims}"
                );
            }
            Some((_, jkt)) => {
                assert_eq!(body["token_type"], "DPoP");
                assert_eq!(
                    claims["cnf"],
                    json!({"jkt": jkt}),
                    "bound to the proof's key"
                );
            }
        }
        assert_eq!(body["scope"], claims["scope"], "the answer names the scope");
        let expires_in = body["expires_in"].as_i64().expect("expires_in");
        let left =
            claims["exp"].as_i64().unwrap() - k8s_openapi::jiff::Timestamp::now().as_second();
        assert!(
            expires_in > 0 && (expires_in - left).abs() <= 5,
            "expires_in {expires_in} and the token's exp ({left} s left) agree"
        );
        assert_ne!(
            token.as_str(),
            subject,
            "an exchange mints a new token, it does not echo the subject"
        );
        self.check_issued(subject, &token, caller, step);
        let line = self.check_audit(subject, &token, caller).await;
        assert_eq!(
            line.get("boundTo").and_then(Value::as_str),
            proof.map(|(_, jkt)| jkt),
            "the audit line names the key the token is bound to"
        );
        (token, body)
    }

    /// The issued token against its subject: `typ: at+jwt`, same `sub`, `iss`, grant and `lineage`,
    /// and its own `status` entry among the lineage's, in the subject's list;
    /// `act` unchanged (narrowing) or nested one deeper (hop); `client_id` the current actor;
    /// `delegation_chain` the subject's records plus one naming the proven workload; `exp` within
    /// the subject's.
    pub fn check_issued(&self, subject: &str, issued: &str, caller: &Workload, step: Step<'_>) {
        let header = super::verifiers::unverified_header(issued);
        assert_eq!(header["typ"], "at+jwt", "{header}");
        let (s, t) = (unverified_claims(subject), unverified_claims(issued));
        for claim in ["sub", "iss", "delegation.nhi.dev/grant", "lineage"] {
            assert_eq!(
                t[claim], s[claim],
                "{claim} is copied from the subject token"
            );
        }
        let (own, lineage) = (&t["status"]["status_list"], &t["lineage"]);
        assert_eq!(
            own["uri"], s["status"]["status_list"]["uri"],
            "the subject's list"
        );
        let (first, count) = (lineage["first"].as_u64(), lineage["count"].as_u64());
        let idx = own["idx"].as_u64();
        assert!(
            matches!((first, count, idx), (Some(f), Some(c), Some(i)) if (f..f + c).contains(&i)),
            "its own entry {idx:?} is one of its lineage's {lineage}"
        );
        assert!(
            t["status"]["status_list"]["uri"].is_string(),
            "an exchanged token has a status"
        );
        assert_ne!(t["jti"], s["jti"], "a new jti");
        assert!(
            t["exp"].as_i64().unwrap() <= s["exp"].as_i64().unwrap(),
            "the exchanged token outlives its subject: exp {} > {}",
            t["exp"],
            s["exp"]
        );
        match step {
            Step::Narrowing => {
                assert_eq!(t["act"], s["act"], "a narrowing keeps act");
                assert_eq!(
                    t["client_id"], s["client_id"],
                    "a narrowing keeps client_id"
                );
            }
            Step::Hop(agent) => {
                assert_eq!(
                    t["act"],
                    json!({"sub": self.agent(agent), "act": s["act"]}),
                    "a hop nests act one level deeper"
                );
                assert_eq!(t["client_id"], self.agent(agent));
            }
        }
        let (before, after) = (
            s["delegation_chain"].as_array().unwrap(),
            t["delegation_chain"].as_array().unwrap(),
        );
        assert_eq!(
            after.len(),
            before.len() + 1,
            "one record for the exchange: {}",
            t["delegation_chain"]
        );
        assert_eq!(
            &after[..before.len()],
            &before[..],
            "the subject's records are kept as they are"
        );
        let record = &after[before.len()];
        assert_eq!(record["requested_by"], caller.username.as_str(), "{record}");
        assert_eq!(
            record["workload"],
            json!({"service_account": caller.username, "pod": caller.pod_name(),
                   "pod_uid": caller.pod_uid()}),
            "the record names the proven pod: {record}"
        );
    }

    /// The `Exchanged` audit line of `issued`: its jti, the subject's, the proven workload; no token.
    async fn check_audit(&self, subject: &str, issued: &str, caller: &Workload) -> Value {
        let jti = unverified_claims(issued)["jti"].clone();
        let line = wait_for(
            "the Exchanged audit line",
            Duration::from_secs(15),
            || async {
                self.audit_lines("Exchanged").into_iter().find(|l| {
                    l["tokenIds"]
                        .as_array()
                        .is_some_and(|ids| ids.contains(&jti))
                })
            },
        )
        .await;
        let shown = redact(&line.to_string());
        assert_eq!(line["namespace"], self.f.ns.as_str(), "{shown}");
        assert_eq!(line["grant"], GRANT, "{shown}");
        assert_eq!(
            line["subjectTokenId"],
            unverified_claims(subject)["jti"],
            "{shown}"
        );
        assert_eq!(
            line["workload"],
            json!({"serviceAccount": caller.username, "pod": caller.pod_name(),
                   "podUid": caller.pod_uid()}),
            "{shown}"
        );
        assert_eq!(
            line["audience"],
            unverified_claims(issued)["aud"],
            "{shown}"
        );
        let text = line.to_string();
        for token in [subject, issued, caller.token.as_str()] {
            assert!(
                !contains_token(&text, token),
                "the audit line carries a token"
            );
        }
        line
    }

    /// POSTs `form` and expects a refusal with `code`: HTTP 400 (`statuses` lists any other allowed,
    /// e.g. 413 for a body over the limit), a JSON `{error, error_description}` naming no token, key
    /// id or other namespace (nor any of `forbidden`), no `Exchanged` audit line, and — when
    /// `audited` — an `ExchangeRefused` line with the same `error`. Returns the answer's JSON (or
    /// `Null` when the body is not JSON, allowed only for a status in `statuses` other than 400).
    pub async fn refused_with(
        &self,
        form: &[(&str, &str)],
        codes: &[&str],
        statuses: &[u16],
        audited: bool,
        forbidden: &[&str],
    ) -> Value {
        self.refused_checked(form, codes, None, statuses, audited, forbidden)
            .await
    }

    /// The usual refusal: HTTP 400 with `code`, audited.
    pub async fn refused(&self, form: &[(&str, &str)], code: &str) -> Value {
        self.refused_checked(form, &[code], None, &[], true, &[])
            .await
    }

    /// [`Exchange::refused`], and the `ExchangeRefused` audit line gives `reason` (the refusal is the
    /// rule under test's, not an earlier one's that answers the same code).
    pub async fn refused_because(&self, form: &[(&str, &str)], code: &str, reason: &str) -> Value {
        self.refused_checked(form, &[code], Some(reason), &[], true, &[])
            .await
    }

    /// [`Exchange::refused_because`] with words the answer must not contain.
    pub async fn refused_because_without(
        &self,
        form: &[(&str, &str)],
        code: &str,
        reason: &str,
        forbidden: &[&str],
    ) -> Value {
        self.refused_checked(form, &[code], Some(reason), &[], true, forbidden)
            .await
    }

    /// [`Exchange::refused_because`] for a request with extra headers (a `DPoP` proof).
    pub async fn refused_because_with(
        &self,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
        code: &str,
        reason: &str,
    ) -> Value {
        self.refused_checked_with(form, headers, &[code], Some(reason), &[], true, &[])
            .await
    }

    async fn refused_checked(
        &self,
        form: &[(&str, &str)],
        codes: &[&str],
        reason: Option<&str>,
        statuses: &[u16],
        audited: bool,
        forbidden: &[&str],
    ) -> Value {
        self.refused_checked_with(form, &[], codes, reason, statuses, audited, forbidden)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn refused_checked_with(
        &self,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
        codes: &[&str],
        reason: Option<&str>,
        statuses: &[u16],
        audited: bool,
        forbidden: &[&str],
    ) -> Value {
        let minted_before = self.exchanged_lines();
        let refused_before = self.refusal_lines().len();
        let reply = self.post_with(form, headers).await;
        self.check_refusal(
            reply,
            form,
            codes,
            reason,
            statuses,
            audited,
            forbidden,
            minted_before,
            refused_before,
        )
        .await
    }

    /// [`Exchange::refused_with`] for a raw body (malformed or oversize); `tokens` are the tokens in
    /// it.
    pub async fn refused_raw(
        &self,
        body: &str,
        tokens: &[&str],
        codes: &[&str],
        statuses: &[u16],
        audited: bool,
    ) -> Value {
        let minted_before = self.exchanged_lines();
        let refused_before = self.refusal_lines().len();
        let reply = match self.trust.exchange_raw(&self.issuer.url, body).await {
            Ok(reply) => reply,
            Err(e) => {
                // The server stopped reading a body over its limit and closed the connection: refused
                // too, as long as nothing was minted.
                eprintln!(
                    "the token endpoint cut a {}-byte request short: {e}",
                    body.len()
                );
                assert_eq!(self.exchanged_lines(), minted_before, "nothing minted");
                return Value::Null;
            }
        };
        let form: Vec<(&str, &str)> = tokens.iter().map(|t| ("token", *t)).collect();
        self.check_refusal(
            reply,
            &form,
            codes,
            None,
            statuses,
            audited,
            &[],
            minted_before,
            refused_before,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn check_refusal(
        &self,
        reply: HttpResponse,
        form: &[(&str, &str)],
        codes: &[&str],
        reason: Option<&str>,
        statuses: &[u16],
        audited: bool,
        forbidden: &[&str],
        minted_before: usize,
        refused_before: usize,
    ) -> Value {
        // Every long value of the request counts as a secret (tokens, and anything made from them).
        let mut secrets: Vec<&str> = form
            .iter()
            .map(|(_, v)| *v)
            .filter(|v| v.len() > 40 && v.contains('.'))
            .collect();
        for known in [
            &self.grant_token,
            &self.a.token,
            &self.b.token,
            &self.c.token,
        ] {
            if !known.is_empty() {
                secrets.push(known.as_str());
            }
        }
        let text = String::from_utf8_lossy(&reply.body).into_owned();
        let want = codes.join(" or ");
        assert!(
            reply.status == 400 || statuses.contains(&reply.status),
            "expected HTTP 400 ({want}), got {}: {}",
            reply.status,
            scrubbed(&reply.body)
        );
        for token in &secrets {
            assert!(
                !contains_token(&text, token),
                "the answer carries a token of the request"
            );
        }
        let jwks = self.f.jwks().await;
        for kid in jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|k| k["kid"].as_str())
        {
            assert!(!text.contains(kid), "the answer names key id {kid}: {text}");
        }
        let operator_ns = self.f.operator_namespace();
        for word in forbidden.iter().copied().chain([operator_ns.as_str()]) {
            assert!(!text.contains(word), "the answer names {word:?}: {text}");
        }
        let body = if reply.status == 400 || reply.content_type.starts_with("application/json") {
            let body = reply.json();
            let error = body["error"].as_str().unwrap_or_default();
            assert!(
                codes.contains(&error),
                "expected error {want}, got {} (HTTP {})",
                redact(&body.to_string()),
                reply.status
            );
            assert!(
                body["error_description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "a description a person can act on: {body}"
            );
            assert!(body.get("access_token").is_none(), "{body}");
            body
        } else {
            Value::Null
        };
        if audited {
            let line = wait_for(
                &format!("an ExchangeRefused audit line ({want}, reason {reason:?})"),
                Duration::from_secs(15),
                || async {
                    self.refusal_lines()
                        .into_iter()
                        .skip(refused_before)
                        .find(|l| {
                            l["error"].as_str().is_some_and(|e| codes.contains(&e))
                                && reason.is_none_or(|r| l["reason"] == r)
                        })
                },
            )
            .await;
            assert!(
                line["reason"].as_str().is_some_and(|r| !r.is_empty()
                    && r.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')),
                "a snake_case reason: {}",
                redact(&line.to_string())
            );
            let line = line.to_string();
            for token in &secrets {
                assert!(
                    !contains_token(&line, token),
                    "the audit line carries a token"
                );
            }
        }
        assert_eq!(
            self.exchanged_lines(),
            minted_before,
            "a refused exchange ({want}) minted a token: {}",
            redact(&format!("{:?}", self.audit_lines("Exchanged").last()))
        );
        let output = self.f.operator().raw_output();
        for token in &secrets {
            assert!(
                !contains_token(&output, token),
                "a token of the request reached the operator's output"
            );
        }
        body
    }
}

/// The status of each token in the status list served over HTTPS at its `uri` — one fetch of the
/// list (one published version) for all of them — verified with the served JWKS by the operator's own
/// verification code: "Valid", "Invalid" or "Suspended".
pub async fn served_statuses(x: &Exchange, tokens: &[&str]) -> Vec<String> {
    served_statuses_at(x, &x.issuer.url, tokens).await
}

/// [`served_statuses`] as the replica listening at `base` serves them (the `uri`s name the issuer).
pub async fn served_statuses_at(x: &Exchange, base: &str, tokens: &[&str]) -> Vec<String> {
    let jwks = x
        .trust
        .get(&format!("{base}/.well-known/jwks.json"))
        .await
        .unwrap()
        .json();
    let mut lists = std::collections::BTreeMap::new();
    for token in tokens {
        let claims = unverified_claims(token);
        let uri = claims["status"]["status_list"]["uri"].as_str().unwrap();
        let key = delegation_operator::status_list::data_key(uri);
        if lists.contains_key(&key) {
            continue;
        }
        let served_at = format!("{base}{}", uri.strip_prefix(x.issuer.url.as_str()).unwrap());
        let list = x.trust.get(&served_at).await.unwrap();
        assert_eq!(list.status, 200, "{served_at}");
        assert_eq!(list.content_type, "application/statuslist+jwt");
        lists.insert(key, String::from_utf8(list.body).unwrap());
    }
    tokens
        .iter()
        .map(|token| {
            let verified =
                delegation_operator::verification::verify(token, &jwks, &lists, Some(AUDIENCE), 0)
                    .unwrap_or_else(|e| panic!("a token of the lineage does not verify: {e}"));
            format!("{:?}", verified.status)
        })
        .collect()
}

/// Waits until every token reads `status` in one fetch of the served list.
pub async fn wait_served(x: &Exchange, tokens: &[&str], status: &str) {
    wait_served_at(x, &x.issuer.url, tokens, status).await;
}

/// [`wait_served`] at the replica listening at `base`.
pub async fn wait_served_at(x: &Exchange, base: &str, tokens: &[&str], status: &str) {
    wait_for(
        &format!("the status list served at {base} to say {status} for every token"),
        Duration::from_secs(60),
        || async {
            let statuses = served_statuses_at(x, base, tokens).await;
            statuses.iter().all(|s| s == status).then_some(())
        },
    )
    .await;
}

/// The operator's signing keys, as the admin can read them from its keys Secret.
pub async fn operator_keyring(f: &Fixture) -> delegation_operator::signing::Keyring {
    use delegation_operator::signing::{Keyring, StoredKey};
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
        f.client.clone(),
        &f.operator_namespace(),
    )
    .get("delegation-operator-signing-keys")
    .await
    .unwrap();
    let stored: Vec<StoredKey> =
        serde_json::from_slice(&secret.data.unwrap()["keys.json"].0).unwrap();
    Keyring::from_stored(&stored).unwrap()
}

/// The token sealed in grant `name`'s status (Pod delivery), opened with the signing keys the
/// admin can read from the operator's keys Secret.
pub async fn open_sealed(f: &Fixture, name: &str) -> String {
    use delegation_operator::sealing::{GrantId, open};
    let grant = f.grants().get(name).await.unwrap();
    let sealed = grant
        .status
        .as_ref()
        .and_then(|s| s.sealed_token.clone())
        .expect("a sealed token in the grant's status");
    let ring = operator_keyring(f).await;
    let uid = grant.metadata.uid.clone().unwrap();
    let id = GrantId {
        namespace: &f.ns,
        name,
        uid: &uid,
    };
    open(ring.keys(), id, &sealed).expect("the sealed token opens with the operator's keys")
}

/// A new pod running as `service_account` and its pod-bound token for `issuer`'s audience.
pub async fn workload(f: &Fixture, issuer: &HttpsIssuer, service_account: &str) -> Workload {
    let pod = pod_running_as(&f.client, &f.ns, service_account).await;
    let token = request_service_account_token_for(
        &f.client,
        &f.ns,
        service_account,
        Some(&pod),
        &[&issuer.url],
    )
    .await;
    Workload {
        service_account: service_account.to_owned(),
        username: format!("system:serviceaccount:{}:{service_account}", f.ns),
        pod,
        token,
    }
}

/// Whether `text` holds `token` or its payload or signature (a token cut in pieces is still one).
pub fn contains_token(text: &str, token: &str) -> bool {
    text.contains(token)
        || token
            .split('.')
            .skip(1)
            .filter(|part| part.len() >= 16)
            .any(|part| text.contains(part))
}

/// A body for an assertion message, with anything that looks like a JWT (a run of base64url and
/// dots with two dots, 40 characters or more) replaced by `<jwt>`.
pub fn scrubbed(body: &[u8]) -> String {
    redact(&String::from_utf8_lossy(body))
}

/// `text` with anything that looks like a JWT replaced by `<jwt>`.
pub fn redact(text: &str) -> String {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 40 && run.matches('.').count() >= 2 {
            out.push_str("<jwt>");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if is_token_char(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

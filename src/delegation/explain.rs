//! The human view of tokens and grants: pure functions from what was read and checked to text (or
//! JSON), for `delegation-operator token inspect` and `delegation-operator tree`. No I/O and no clock:
//! the current time is an argument, so the output can be tested exactly.
//!
//! Nothing here ever sees a token's signature: [`Inspection`] is built from the decoded header and
//! claims, so neither its text nor its JSON can reveal the token itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::claims::{AccessTokenClaims, Actor};
use super::conditions::ready_condition;
use crate::api::{AgentIdentity, DelegationGrant};
use crate::signing::SigningError;

// ---- token inspect ------------------------------------------------------------------------------

/// The JOSE header and claims of a compact JWT, decoded but NOT verified.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    pub header: Value,
    pub claims: Value,
}

/// What the token's status list entry says (draft-ietf-oauth-status-list §7.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state", content = "detail")]
pub enum StatusState {
    /// 0x00: not revoked.
    Valid,
    /// 0x01: revoked, for good.
    Invalid,
    /// 0x02: temporarily invalid.
    Suspended,
    /// The list could not be read or trusted (not published, expired, bad signature, index outside,
    /// a value without a registered meaning).
    Unavailable(String),
    /// The token names no status list entry.
    Absent,
    /// Not looked up: the claims themselves could not be trusted.
    NotChecked,
}

impl From<crate::status_list::Status> for StatusState {
    fn from(status: crate::status_list::Status) -> Self {
        match status {
            crate::status_list::Status::Valid => Self::Valid,
            crate::status_list::Status::Invalid => Self::Invalid,
            crate::status_list::Status::Suspended => Self::Suspended,
        }
    }
}

impl StatusState {
    fn label(&self) -> String {
        match self {
            Self::Valid => "VALID".into(),
            Self::Invalid => "INVALID (revoked)".into(),
            Self::Suspended => "SUSPENDED".into(),
            Self::Unavailable(why) => format!("UNAVAILABLE ({why})"),
            Self::Absent => "none (the token names no status list entry)".into(),
            Self::NotChecked => "not checked (the claims are not trusted)".into(),
        }
    }

    /// Why this state makes the token invalid, if it does.
    fn problem(&self) -> Option<String> {
        match self {
            Self::Valid | Self::NotChecked => None,
            // Fail closed: a token whose revocation cannot be looked up is not taken as valid.
            Self::Absent => Some("no status list entry: its revocation cannot be checked".into()),
            Self::Invalid => Some("revoked (status list entry INVALID)".into()),
            Self::Suspended => Some("suspended (status list entry SUSPENDED)".into()),
            Self::Unavailable(why) => Some(format!("status unavailable: {why}")),
        }
    }
}

/// Where the token's status lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusView {
    #[serde(flatten)]
    pub state: StatusState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idx: Option<usize>,
}

/// Everything `token inspect` found out about one token (never the token itself).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    /// True only when the signature, the claims, the times and the status all check out.
    pub valid: bool,
    /// Why not, most fundamental first; empty when valid.
    pub problems: Vec<String>,
    /// Whether the signature verified against the JWKS (so the claims below can be trusted).
    pub signature_verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The claims, as a delegation token carries them; `None` when they are not of that shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<AccessTokenClaims>,
    /// The current actor first, the first actor last (the nesting of `act`).
    pub actors: Vec<String>,
    pub status: StatusView,
}

/// The reason a person reads for a verification failure.
pub fn signing_problem(error: &SigningError) -> String {
    match error {
        SigningError::MalformedToken => "malformed token (not a compact JWS)".into(),
        SigningError::WrongType => "wrong typ (not an at+jwt access token)".into(),
        SigningError::UnknownKid => "unknown key (kid missing or not in the JWKS)".into(),
        SigningError::AlgorithmMismatch => "alg does not match the key's alg".into(),
        SigningError::BadSignature => "bad signature".into(),
        SigningError::Expired => "expired".into(),
        SigningError::NotYetValid => "not yet valid (nbf in the future)".into(),
        SigningError::WrongAudience => "wrong audience".into(),
        SigningError::InvalidClaims => {
            "claims missing or malformed (exp and aud are required)".into()
        }
        other => other.to_string(),
    }
}

/// Puts the checks together. `signature` is the outcome of verifying the signature (everything but
/// the times), `times` that of the time checks; `status` is what the status list says, or
/// [`StatusState::NotChecked`]. `extra_problems` are further refusals (say an unexpected issuer).
pub fn inspection(
    decoded: Option<&Decoded>,
    signature: Result<(), String>,
    times: Result<(), String>,
    status: StatusState,
    extra_problems: Vec<String>,
) -> Inspection {
    let header = decoded.map(|d| &d.header);
    let text = |name: &str| {
        header
            .and_then(|h| h.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let claims: Option<AccessTokenClaims> =
        decoded.and_then(|d| serde_json::from_value(d.claims.clone()).ok());
    let signature_verified = signature.is_ok();
    let mut problems = Vec::new();
    if let Err(why) = signature {
        problems.push(why);
    } else {
        if claims.is_none() {
            problems.push("not a delegation token (its claims are not of that shape)".into());
        }
        if let Err(why) = times {
            problems.push(why);
        }
    }
    problems.extend(extra_problems);
    problems.extend(status.problem());
    let status_ref = claims
        .as_ref()
        .and_then(|c| c.status.as_ref())
        .and_then(crate::status_list::TokenStatusRef::from_status_claim);
    Inspection {
        valid: problems.is_empty(),
        problems,
        signature_verified,
        alg: text("alg"),
        typ: text("typ"),
        kid: text("kid"),
        actors: claims.as_ref().map(|c| actors(&c.act)).unwrap_or_default(),
        claims,
        status: StatusView {
            state: status,
            uri: status_ref.as_ref().map(|r| r.uri.clone()),
            idx: status_ref.map(|r| r.idx),
        },
    }
}

/// The actors of an `act` claim, outermost (current) first.
fn actors(act: &Actor) -> Vec<String> {
    let mut out = vec![act.sub.clone()];
    let mut next = act.act.as_deref();
    while let Some(a) = next {
        out.push(a.sub.clone());
        next = a.act.as_deref();
    }
    out
}

/// `t` (Unix seconds) as RFC 3339 UTC with how far it is from `now`.
pub fn when(t: i64, now: i64) -> String {
    let stamp = k8s_openapi::jiff::Timestamp::from_second(t)
        .map(|ts| ts.to_string())
        .unwrap_or_else(|_| format!("@{t}"));
    format!("{stamp} ({})", relative(t - now))
}

/// `delta` seconds as "in 4m 12s" / "4m 12s ago" / "now".
pub fn relative(delta: i64) -> String {
    if delta == 0 {
        return "now".into();
    }
    let span = span(delta.unsigned_abs());
    if delta > 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// A duration with its two largest units: `2d 3h`, `1h 5m`, `4m 12s`, `9s`.
fn span(secs: u64) -> String {
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let Some(first) = units.iter().position(|(n, _)| secs >= *n) else {
        return "0s".into();
    };
    let (n, u) = units[first];
    let mut out = format!("{}{u}", secs / n);
    if let Some((m, v)) = units.get(first + 1) {
        let rest = (secs % n) / m;
        if rest > 0 {
            let _ = write!(out, " {rest}{v}");
        }
    }
    out
}

/// The inspection as a person reads it: who authorised, each hop, the actor, scopes, audience,
/// times, key, status, and a verdict line last.
/// Text safe for a terminal: every control character but the line break is shown escaped, so that
/// claims or spec fields carrying ANSI or OSC sequences cannot rewrite a verdict on screen.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub fn render_inspection(inspection: &Inspection, now: i64) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &str| {
        let _ = writeln!(out, "{label:<12}{value}");
    };
    let key = format!(
        "{} kid {}",
        inspection.alg.as_deref().unwrap_or("?"),
        inspection.kid.as_deref().unwrap_or("(none)")
    );
    line(
        "signature",
        &if inspection.signature_verified {
            format!("verified ({key}, in the JWKS)")
        } else {
            format!("NOT verified ({key}): the claims below are not trusted")
        },
    );
    if let Some(c) = &inspection.claims {
        line(
            "grant",
            &format!(
                "{}/{} (uid {})",
                c.grant.namespace, c.grant.name, c.grant.uid
            ),
        );
        line("token id", &c.jti);
        line("issuer", &c.iss);
        let principal_kind = c
            .delegation_chain
            .first()
            .map(|r| r.delegator.kind.as_str())
            .unwrap_or("principal");
        line(
            "principal",
            &format!("{} ({principal_kind}): whose authority this is", c.sub),
        );
        for (i, hop) in c.delegation_chain.iter().enumerate() {
            let label = if i == 0 { "chain" } else { "" };
            line(
                label,
                &format!(
                    "{}. {} -> {}  (grant {}, scopes {})",
                    i + 1,
                    hop.delegator.sub,
                    hop.delegate,
                    hop.grant,
                    hop.scope
                ),
            );
            let mut who = vec![format!(
                "requested by {}",
                hop.requested_by.as_deref().unwrap_or("(not recorded)")
            )];
            // A token exchange: the pod that proved possession of the parent token.
            if let Some(workload) = &hop.workload {
                who.push(format!(
                    "exchanged by pod {} (uid {})",
                    workload.pod, workload.pod_uid
                ));
            }
            if let Some(approver) = &hop.approved_by {
                who.push(format!("approved by {approver}"));
            }
            line("", &format!("   {}", who.join(", ")));
        }
        let mut order: Vec<&str> = inspection.actors.iter().map(String::as_str).collect();
        order.reverse();
        line(
            "actors",
            &format!("{} (current: {})", order.join(" -> "), c.client_id),
        );
        line("scopes", &c.scope);
        line("audience", &c.aud);
        for (i, d) in c.authorization_details.iter().flatten().enumerate() {
            let mut text = d.type_.clone();
            if let Some(id) = &d.identifier {
                let _ = write!(text, " {id}");
            }
            for (name, list) in [
                ("actions", &d.actions),
                ("locations", &d.locations),
                ("datatypes", &d.datatypes),
                ("privileges", &d.privileges),
            ] {
                if let Some(list) = list {
                    let _ = write!(text, "; {name} {}", list.join(","));
                }
            }
            line(if i == 0 { "details" } else { "" }, &text);
        }
        line("issued", &when(c.iat, now));
        if c.nbf > c.iat {
            line("not before", &when(c.nbf, now));
        }
        line("expires", &when(c.exp, now));
        if let Some(cnf) = &c.cnf {
            line(
                "bound to",
                &format!(
                    "key {} (DPoP, RFC 9449): usable only with a proof signed by that key",
                    cnf.jkt
                ),
            );
        }
    }
    let mut status = inspection.status.state.label();
    if let (Some(uri), Some(idx)) = (&inspection.status.uri, inspection.status.idx) {
        let _ = write!(status, "  (index {idx} of {uri})");
    }
    line("status", &status);
    if inspection.valid {
        out.push_str("verdict: VALID\n");
    } else {
        let _ = writeln!(out, "verdict: INVALID: {}", inspection.problems.join("; "));
    }
    out
}

// ---- tree ---------------------------------------------------------------------------------------

/// One row of the tree.
struct Row {
    namespace: String,
    name: String,
    ready: String,
    reason: String,
    agent: String,
    scopes: String,
    expires: String,
}

fn ready_of(
    conditions: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
) -> (String, String) {
    match ready_condition(conditions) {
        Some(c) => (c.status.clone(), c.reason.clone()),
        None => ("-".into(), "-".into()),
    }
}

fn name_of<K: kube::Resource>(o: &K) -> String {
    o.meta().name.clone().unwrap_or_default()
}

fn namespace_of<K: kube::Resource>(o: &K) -> String {
    o.meta().namespace.clone().unwrap_or_default()
}

/// The grants and agents as a tree, `kubectl tree` style: each principal, the grants naming it, and
/// below each grant the grants whose `parentGrantRef` names it; then the agents. Every grant
/// appears exactly once: a grant whose parent is missing hangs under a `(missing)` node, and grants
/// that only reach each other in a cycle under `(cycle)`. `exchanged` maps a grant's uid to the
/// live tokens exchanged from its token (RFC 8693): a grant with some has a line
/// `exchanged: N live` below it (counts only: nothing of a token is ever shown). `now` is Unix
/// seconds; `show_namespace` adds a NAMESPACE column (for all namespaces).
pub fn render_tree(
    grants: &[DelegationGrant],
    agents: &[AgentIdentity],
    exchanged: &BTreeMap<String, u64>,
    now: i64,
    show_namespace: bool,
) -> String {
    let mut namespaces: BTreeSet<String> = grants.iter().map(namespace_of).collect();
    namespaces.extend(agents.iter().map(namespace_of));
    let agent_suspended: BTreeSet<(String, String)> = agents
        .iter()
        .filter(|a| a.spec.suspended == Some(true))
        .map(|a| (namespace_of(a), name_of(a)))
        .collect();
    let mut rows = Vec::new();
    let context = Walk {
        ns: "",
        now,
        agent_suspended: &agent_suspended,
        exchanged,
    };
    for ns in &namespaces {
        let context = Walk {
            ns: ns.as_str(),
            ..context
        };
        let in_ns: Vec<&DelegationGrant> =
            grants.iter().filter(|g| &namespace_of(*g) == ns).collect();
        let names: BTreeSet<String> = in_ns.iter().map(|g| name_of(*g)).collect();
        // Roots: principals, then missing parents, then grants with no root at all.
        let mut roots: BTreeMap<(u8, String), Vec<&DelegationGrant>> = BTreeMap::new();
        let mut children: BTreeMap<String, Vec<&DelegationGrant>> = BTreeMap::new();
        for g in &in_ns {
            match (&g.spec.principal, &g.spec.parent_grant_ref) {
                (Some(p), _) => roots
                    .entry((0, format!("{}/{}", p.kind.as_str(), p.name)))
                    .or_default()
                    .push(g),
                (None, Some(parent)) if names.contains(&parent.name) => {
                    children.entry(parent.name.clone()).or_default().push(g)
                }
                (None, Some(parent)) => roots
                    .entry((1, format!("(missing) DelegationGrant/{}", parent.name)))
                    .or_default()
                    .push(g),
                (None, None) => roots
                    .entry((2, "(no principal)".into()))
                    .or_default()
                    .push(g),
            }
        }
        for list in roots.values_mut().chain(children.values_mut()) {
            list.sort_by_key(|g| name_of(*g));
        }
        let mut seen = BTreeSet::new();
        let mut ns_rows = Vec::new();
        for ((_, label), list) in &roots {
            ns_rows.push(root_row(ns, label));
            walk(list, "", &children, &mut seen, &mut ns_rows, &context);
        }
        // Whatever was not reached hangs in a cycle of parentGrantRefs.
        let cycle: Vec<&DelegationGrant> = in_ns
            .iter()
            .copied()
            .filter(|g| !seen.contains(&name_of(*g)))
            .collect();
        if !cycle.is_empty() {
            ns_rows.push(root_row(ns, "(cycle)"));
            let mut cycle = cycle;
            cycle.sort_by_key(|g| name_of(*g));
            // Entered at its first member; the walk stops where it comes round again.
            for g in cycle {
                walk(&[g], "", &children, &mut seen, &mut ns_rows, &context);
            }
        }
        rows.extend(ns_rows);
    }
    let mut out = table(
        &["NAME", "READY", "REASON", "AGENT", "SCOPES", "EXPIRES"],
        rows.iter()
            .map(|r| {
                (
                    r.namespace.clone(),
                    vec![
                        r.name.clone(),
                        r.ready.clone(),
                        r.reason.clone(),
                        r.agent.clone(),
                        r.scopes.clone(),
                        r.expires.clone(),
                    ],
                )
            })
            .collect(),
        show_namespace,
    );
    if !agents.is_empty() {
        let mut sorted: Vec<&AgentIdentity> = agents.iter().collect();
        sorted.sort_by_key(|a| (namespace_of(*a), name_of(*a)));
        let agent_rows = sorted
            .iter()
            .map(|a| {
                let (ready, reason) =
                    ready_of(a.status.as_ref().and_then(|s| s.conditions.as_deref()));
                let mut name = format!("AgentIdentity/{}", name_of(*a));
                if a.spec.suspended == Some(true) {
                    name.push_str(" [suspended]");
                }
                let grants = a
                    .status
                    .as_ref()
                    .and_then(|s| s.active_grants)
                    .map_or("-".into(), |n| n.to_string());
                let owner = format!("{:?}/{}", a.spec.owner.kind, a.spec.owner.name);
                (
                    namespace_of(*a),
                    vec![
                        name,
                        ready,
                        reason,
                        owner,
                        grants,
                        a.spec.allowed_scopes.join(","),
                    ],
                )
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "AGENT",
                "READY",
                "REASON",
                "OWNER",
                "GRANTS",
                "ALLOWED SCOPES",
            ],
            agent_rows,
            show_namespace,
        ));
    }
    out
}

fn root_row(ns: &str, label: &str) -> Row {
    Row {
        namespace: ns.to_owned(),
        name: label.to_owned(),
        ready: String::new(),
        reason: String::new(),
        agent: String::new(),
        scopes: String::new(),
        expires: String::new(),
    }
}

/// What every row of one namespace's tree is drawn with.
#[derive(Clone, Copy)]
struct Walk<'a> {
    ns: &'a str,
    now: i64,
    agent_suspended: &'a BTreeSet<(String, String)>,
    /// Live exchanged tokens by grant uid.
    exchanged: &'a BTreeMap<String, u64>,
}

fn walk(
    list: &[&DelegationGrant],
    indent: &str,
    children: &BTreeMap<String, Vec<&DelegationGrant>>,
    seen: &mut BTreeSet<String>,
    rows: &mut Vec<Row>,
    context: &Walk<'_>,
) {
    for (i, g) in list.iter().enumerate() {
        let name = name_of(*g);
        if !seen.insert(name.clone()) {
            continue;
        }
        let last = i + 1 == list.len();
        let (branch, further) = if last {
            ("└─", "  ")
        } else {
            ("├─", "│ ")
        };
        rows.push(grant_row(
            g,
            &format!("{indent}{branch}"),
            context.ns,
            context.now,
            context.agent_suspended,
        ));
        let kids = children.get(&name);
        let live = g
            .metadata
            .uid
            .as_ref()
            .and_then(|uid| context.exchanged.get(uid))
            .copied()
            .unwrap_or(0);
        if live > 0 {
            // Below the grant's name, with the line down to its children when it has some.
            let down = if kids.is_some_and(|k| k.iter().any(|k| !seen.contains(&name_of(*k)))) {
                "│ "
            } else {
                "  "
            };
            rows.push(root_row(
                context.ns,
                &format!("{indent}{further}{down}exchanged: {live} live"),
            ));
        }
        if let Some(kids) = kids {
            walk(
                kids,
                &format!("{indent}{further}"),
                children,
                seen,
                rows,
                context,
            );
        }
    }
}

fn grant_row(
    g: &DelegationGrant,
    prefix: &str,
    ns: &str,
    now: i64,
    agent_suspended: &BTreeSet<(String, String)>,
) -> Row {
    let status = g.status.as_ref();
    let (ready, reason) = ready_of(status.and_then(|s| s.conditions.as_deref()));
    let mut name = format!("{prefix}DelegationGrant/{}", name_of(g));
    if g.spec.is_suspended() {
        name.push_str(" [suspended]");
    }
    let mut agent = g.spec.actor_ref.name.clone();
    if agent_suspended.contains(&(ns.to_owned(), agent.clone())) {
        agent.push_str(" [suspended]");
    }
    let scopes = status
        .and_then(|s| s.effective_scopes.clone())
        .unwrap_or_else(|| g.spec.scopes.clone())
        .join(",");
    let expires = status
        .and_then(|s| s.token.as_ref())
        .map(|t| relative(t.expires_at.0.as_second() - now))
        .unwrap_or_else(|| "-".into());
    Row {
        namespace: ns.to_owned(),
        name,
        ready,
        reason,
        agent,
        scopes,
        expires,
    }
}

/// Left-aligned columns separated by three spaces, like kubectl's. Widths count characters, so the
/// tree's box-drawing characters line up.
fn table(headers: &[&str], rows: Vec<(String, Vec<String>)>, show_namespace: bool) -> String {
    let mut all: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    all.push(if show_namespace {
        std::iter::once("NAMESPACE".to_owned())
            .chain(header)
            .collect()
    } else {
        header
    });
    for (ns, cells) in rows {
        all.push(if show_namespace {
            std::iter::once(ns).chain(cells).collect()
        } else {
            cells
        });
    }
    let columns = all[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| all.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &all {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 < columns {
                let pad = widths[c] - cell.chars().count();
                let _ = write!(line, "{cell}{}   ", " ".repeat(pad));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{Algorithm, Keyring, SigningKey, verify};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn three_hop_claims() -> Value {
        json!({
            "iss": "https://issuer.test", "sub": "user:alice@example.com", "aud": "https://tickets.example.com",
            "client_id": "agent:demo/notifier", "scope": "tickets:read",
            "iat": NOW - 125, "nbf": NOW - 125, "exp": NOW + 175, "jti": "0b8e6b0e",
            "act": {"sub": "agent:demo/notifier", "act": {"sub": "agent:demo/summarizer",
                    "act": {"sub": "agent:demo/orchestrator"}}},
            "authorization_details": [{"type": "ticket", "identifier": "1234", "actions": ["read"]}],
            "delegation_chain": [
                {"delegator": {"kind": "User", "sub": "alice@example.com"}, "delegate": "agent:demo/orchestrator",
                 "grant": "g1", "scope": "tickets:read cases:read", "requested_by": "alice@example.com"},
                {"delegator": {"kind": "AgentIdentity", "sub": "agent:demo/orchestrator"},
                 "delegate": "agent:demo/summarizer", "grant": "g2", "scope": "tickets:read cases:read",
                 "requested_by": "alice@example.com", "approved_by": "carol@example.com"},
                {"delegator": {"kind": "AgentIdentity", "sub": "agent:demo/summarizer"},
                 "delegate": "agent:demo/notifier", "grant": "g3", "scope": "tickets:read",
                 "requested_by": "bob@example.com"},
            ],
            "delegation.nhi.dev/grant": {"namespace": "demo", "name": "g3", "uid": "u-3"},
            "status": {"status_list": {"idx": 17, "uri": "https://issuer.test/statuslists/s/0"}},
        })
    }

    fn decoded(claims: Value) -> Decoded {
        Decoded {
            header: json!({"alg": "ES256", "typ": "at+jwt", "kid": "k-1"}),
            claims,
        }
    }

    #[test]
    fn a_valid_token_reads_as_its_chain_and_a_verdict() {
        let d = decoded(three_hop_claims());
        let inspection = inspection(Some(&d), Ok(()), Ok(()), StatusState::Valid, vec![]);
        assert!(inspection.valid && inspection.problems.is_empty());
        assert_eq!(
            inspection.actors,
            [
                "agent:demo/notifier",
                "agent:demo/summarizer",
                "agent:demo/orchestrator"
            ]
        );
        let expected = "\
signature   verified (ES256 kid k-1, in the JWKS)
grant       demo/g3 (uid u-3)
token id    0b8e6b0e
issuer      https://issuer.test
principal   user:alice@example.com (User): whose authority this is
chain       1. alice@example.com -> agent:demo/orchestrator  (grant g1, scopes tickets:read cases:read)
               requested by alice@example.com
            2. agent:demo/orchestrator -> agent:demo/summarizer  (grant g2, scopes tickets:read cases:read)
               requested by alice@example.com, approved by carol@example.com
            3. agent:demo/summarizer -> agent:demo/notifier  (grant g3, scopes tickets:read)
               requested by bob@example.com
actors      agent:demo/orchestrator -> agent:demo/summarizer -> agent:demo/notifier (current: agent:demo/notifier)
scopes      tickets:read
audience    https://tickets.example.com
details     ticket 1234; actions read
issued      2027-01-15T07:57:55Z (2m 5s ago)
expires     2027-01-15T08:02:55Z (in 2m 55s)
status      VALID  (index 17 of https://issuer.test/statuslists/s/0)
verdict: VALID
";
        assert_eq!(render_inspection(&inspection, NOW), expected);
    }

    /// A hop made by token exchange names the pod that proved possession of the parent token.
    #[test]
    fn an_exchanged_hop_names_its_pod() {
        let mut claims = three_hop_claims();
        claims["delegation_chain"]
            .as_array_mut()
            .unwrap()
            .push(json!({
                "delegator": {"kind": "AgentIdentity", "sub": "agent:demo/notifier"},
                "delegate": "agent:demo/notifier", "grant": "g3", "scope": "tickets:read",
                "requested_by": "system:serviceaccount:demo:notifier",
                "workload": {"service_account": "system:serviceaccount:demo:notifier",
                             "pod": "notifier-5f7c", "pod_uid": "p-1"},
            }));
        let d = decoded(claims);
        let inspection = inspection(Some(&d), Ok(()), Ok(()), StatusState::Valid, vec![]);
        let text = render_inspection(&inspection, NOW);
        assert!(
            text.contains(
                "            4. agent:demo/notifier -> agent:demo/notifier  (grant g3, scopes tickets:read)\n               requested by system:serviceaccount:demo:notifier, exchanged by pod notifier-5f7c (uid p-1)\n"
            ),
            "{text}"
        );
        // A DPoP-bound token names the key's thumbprint.
        let mut bound = three_hop_claims();
        bound["cnf"] = json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"});
        let d = decoded(bound);
        let text = render_inspection(
            &super::inspection(Some(&d), Ok(()), Ok(()), StatusState::Valid, vec![]),
            NOW,
        );
        assert!(
            text.contains(
                "bound to    key 0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I (DPoP, RFC 9449)"
            ),
            "{text}"
        );
        assert!(!render_inspection(&inspection, NOW).contains("bound to"));
    }

    #[test]
    fn revoked_suspended_and_expired_tokens_say_why() {
        let d = decoded(three_hop_claims());
        let revoked = inspection(Some(&d), Ok(()), Ok(()), StatusState::Invalid, vec![]);
        assert!(!revoked.valid);
        let text = render_inspection(&revoked, NOW);
        assert!(
            text.contains("\nstatus      INVALID (revoked)  (index 17 of"),
            "{text}"
        );
        assert!(
            text.ends_with("verdict: INVALID: revoked (status list entry INVALID)\n"),
            "{text}"
        );

        let both = inspection(
            Some(&d),
            Ok(()),
            Err("expired".into()),
            StatusState::Suspended,
            vec![],
        );
        assert_eq!(
            both.problems,
            ["expired", "suspended (status list entry SUSPENDED)"]
        );
        assert!(
            render_inspection(&both, NOW)
                .ends_with("verdict: INVALID: expired; suspended (status list entry SUSPENDED)\n")
        );

        // A list that cannot be read fails the token too (a verifier must reject it, §8.3).
        let unknown = inspection(
            Some(&d),
            Ok(()),
            Ok(()),
            StatusState::Unavailable("no status list published at its uri".into()),
            vec![],
        );
        assert!(!unknown.valid);
        assert_eq!(
            unknown.problems,
            ["status unavailable: no status list published at its uri"]
        );
    }

    #[test]
    fn untrusted_claims_are_marked_and_their_status_is_not_looked_up() {
        let d = decoded(three_hop_claims());
        let bad = inspection(
            Some(&d),
            Err("bad signature".into()),
            Err("expired".into()),
            StatusState::NotChecked,
            vec![],
        );
        assert!(!bad.valid && !bad.signature_verified);
        assert_eq!(
            bad.problems,
            ["bad signature"],
            "the times of untrusted claims are moot"
        );
        let text = render_inspection(&bad, NOW);
        assert!(text.starts_with(
            "signature   NOT verified (ES256 kid k-1): the claims below are not trusted\n"
        ));
        assert!(text.contains("\nstatus      not checked (the claims are not trusted)"));
        assert!(text.ends_with("verdict: INVALID: bad signature\n"));

        // Something that is not a JWT at all.
        let garbage = inspection(
            None,
            Err("malformed token (not a compact JWS)".into()),
            Err("x".into()),
            StatusState::NotChecked,
            vec![],
        );
        assert_eq!(
            render_inspection(&garbage, NOW),
            "signature   NOT verified (? kid (none)): the claims below are not trusted\n\
             status      not checked (the claims are not trusted)\n\
             verdict: INVALID: malformed token (not a compact JWS)\n"
        );

        // A verified token of another shape is not taken for a delegation token.
        let foreign = decoded(json!({"sub": "x", "aud": "y", "exp": NOW + 10}));
        let other = inspection(Some(&foreign), Ok(()), Ok(()), StatusState::Absent, vec![]);
        assert_eq!(
            other.problems,
            [
                "not a delegation token (its claims are not of that shape)",
                "no status list entry: its revocation cannot be checked"
            ]
        );
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(
            printable("alice\u{1b}[2K\rverdict: VALID\nnext"),
            "alice\\u{1b}[2K\\u{d}verdict: VALID\nnext"
        );
    }

    /// Through the crate's real signing and verification: what is shown never includes the token.
    #[test]
    fn neither_the_text_nor_the_json_reveals_the_token() {
        let ring = Keyring::new(SigningKey::generate(Algorithm::ES256, NOW).unwrap());
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let mut claims = three_hop_claims();
        (claims["iat"], claims["nbf"], claims["exp"]) = (json!(now), json!(now), json!(now + 300));
        let token = ring.active().sign(&claims).unwrap();
        let verified = verify(&token, &ring.jwks(), "https://tickets.example.com", 0).unwrap();
        let d = Decoded {
            header: serde_json::to_value(jsonwebtoken::decode_header(&token).unwrap()).unwrap(),
            claims: verified,
        };
        assert_eq!(d.header["kid"], ring.active().kid());
        let inspection = inspection(Some(&d), Ok(()), Ok(()), StatusState::Valid, vec![]);
        let text = render_inspection(&inspection, now);
        let json = serde_json::to_string(&inspection).unwrap();
        let signature = token.rsplit('.').next().unwrap();
        for shown in [&text, &json] {
            assert!(!shown.contains(&token) && !shown.contains(signature));
            assert!(!shown.contains(token.split('.').nth(1).unwrap()));
        }
        let json: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json["valid"], true);
        assert_eq!(json["kid"], ring.active().kid());
        assert_eq!(json["claims"]["sub"], "user:alice@example.com");
        assert_eq!(
            json["status"],
            json!({"state": "valid", "uri": "https://issuer.test/statuslists/s/0", "idx": 17})
        );
        let revoked = super::inspection(Some(&d), Ok(()), Ok(()), StatusState::Invalid, vec![]);
        let json = serde_json::to_value(&revoked).unwrap();
        assert_eq!(
            (&json["valid"], &json["status"]["state"]),
            (&json!(false), &json!("invalid"))
        );
    }

    #[test]
    fn times_read_relative_to_now() {
        assert_eq!(relative(0), "now");
        assert_eq!(relative(9), "in 9s");
        assert_eq!(relative(-252), "4m 12s ago");
        assert_eq!(relative(3_900), "in 1h 5m");
        assert_eq!(relative(3_600), "in 1h");
        assert_eq!(relative(-(2 * 86_400 + 3 * 3_600 + 59)), "2d 3h ago");
        assert_eq!(when(NOW, NOW), "2027-01-15T08:00:00Z (now)");
    }

    fn grant(name: &str, root: Value, agent: &str, extra: Value) -> DelegationGrant {
        let mut spec = json!({"actorRef": {"name": agent}, "scopes": ["tickets:read"],
                              "audience": "https://tickets.example.com", "tokenTTL": "10m"});
        spec.as_object_mut()
            .unwrap()
            .extend(root.as_object().unwrap().clone());
        let mut g = json!({"apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
                           "metadata": {"name": name, "namespace": "demo"}, "spec": spec});
        g.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(g).unwrap()
    }

    fn ready(status: &str, reason: &str, expires_in: Option<i64>) -> Value {
        let mut s = json!({"conditions": [{"type": "Ready", "status": status, "reason": reason,
            "message": "", "lastTransitionTime": "2027-01-15T07:00:00Z"}]});
        if let Some(secs) = expires_in {
            let t = |d: i64| {
                k8s_openapi::jiff::Timestamp::from_second(NOW + d)
                    .unwrap()
                    .to_string()
            };
            s["token"] = json!({"id": "j", "keyID": "k", "issuedAt": t(-60), "expiresAt": t(secs),
                                "renewalTime": t(secs / 2)});
            s["effectiveScopes"] = json!(["tickets:read"]);
        }
        json!({"status": s})
    }

    fn parent(name: &str) -> Value {
        json!({"parentGrantRef": {"name": name}})
    }

    #[test]
    fn the_tree_hangs_grants_under_their_principal_and_parent() {
        let alice = json!({"principal": {"kind": "User", "name": "alice@example.com"}});
        let grants = vec![
            grant(
                "g3",
                parent("g2"),
                "notifier",
                ready("True", "Issued", Some(240)),
            ),
            grant(
                "g1",
                alice.clone(),
                "orchestrator",
                ready("True", "Issued", Some(540)),
            ),
            grant(
                "g2",
                parent("g1"),
                "summarizer",
                ready("True", "Issued", Some(300)),
            ),
            grant(
                "g2b",
                parent("g1"),
                "notifier",
                ready("False", "Revoked", None),
            ),
            grant(
                "solo",
                json!({"principal": {"kind": "ServiceAccount", "name": "system:serviceaccount:demo:ci"},
                       "suspended": true}),
                "notifier",
                ready("False", "Suspended", None),
            ),
            grant("lost", parent("gone"), "notifier", json!({})),
            grant("loop-a", parent("loop-b"), "notifier", json!({})),
            grant("loop-b", parent("loop-a"), "notifier", json!({})),
        ];
        let agent = |name: &str, suspended: bool, active: i32| -> AgentIdentity {
            serde_json::from_value(json!({
                "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "AgentIdentity",
                "metadata": {"name": name, "namespace": "demo"},
                "spec": {"owner": {"kind": "Group", "name": "platform"}, "allowedScopes": ["tickets:read"],
                         "allowedAudiences": ["https://tickets.example.com"], "maxTokenTTL": "15m",
                         "suspended": suspended},
                "status": {"activeGrants": active, "conditions": [{"type": "Ready",
                    "status": if suspended { "False" } else { "True" },
                    "reason": if suspended { "Suspended" } else { "Valid" },
                    "message": "", "lastTransitionTime": "2027-01-15T07:00:00Z"}]},
            }))
            .unwrap()
        };
        let agents = vec![
            agent("orchestrator", false, 1),
            agent("summarizer", false, 1),
            agent("notifier", true, 0),
        ];
        let expected = "\
NAME                                           READY   REASON      AGENT                  SCOPES         EXPIRES
ServiceAccount/system:serviceaccount:demo:ci
└─DelegationGrant/solo [suspended]             False   Suspended   notifier [suspended]   tickets:read   -
User/alice@example.com
└─DelegationGrant/g1                           True    Issued      orchestrator           tickets:read   in 9m
  ├─DelegationGrant/g2                         True    Issued      summarizer             tickets:read   in 5m
  │ └─DelegationGrant/g3                       True    Issued      notifier [suspended]   tickets:read   in 4m
  └─DelegationGrant/g2b                        False   Revoked     notifier [suspended]   tickets:read   -
(missing) DelegationGrant/gone
└─DelegationGrant/lost                         -       -           notifier [suspended]   tickets:read   -
(cycle)
└─DelegationGrant/loop-a                       -       -           notifier [suspended]   tickets:read   -
  └─DelegationGrant/loop-b                     -       -           notifier [suspended]   tickets:read   -

AGENT                                READY   REASON      OWNER            GRANTS   ALLOWED SCOPES
AgentIdentity/notifier [suspended]   False   Suspended   Group/platform   0        tickets:read
AgentIdentity/orchestrator           True    Valid       Group/platform   1        tickets:read
AgentIdentity/summarizer             True    Valid       Group/platform   1        tickets:read
";
        assert_eq!(
            render_tree(&grants, &agents, &BTreeMap::new(), NOW, false),
            expected
        );

        // All namespaces: a NAMESPACE column, each namespace its own trees.
        let mut other = grant("g1", alice, "orchestrator", json!({}));
        other.metadata.namespace = Some("apps".into());
        let text = render_tree(
            &[grants[1].clone(), other],
            &[],
            &BTreeMap::new(),
            NOW,
            true,
        );
        assert_eq!(
            text,
            "\
NAMESPACE   NAME                     READY   REASON   AGENT          SCOPES         EXPIRES
apps        User/alice@example.com
apps        └─DelegationGrant/g1     -       -        orchestrator   tickets:read   -
demo        User/alice@example.com
demo        └─DelegationGrant/g1     True    Issued   orchestrator   tickets:read   in 9m
"
        );
    }
    /// Live exchanged tokens show as a count below their grant, drawn into the tree; a grant
    /// without any, or without a uid, shows nothing more.
    #[test]
    fn live_exchanged_tokens_show_as_a_count_below_their_grant() {
        let alice = json!({"principal": {"kind": "User", "name": "alice@example.com"}});
        let with_uid = |mut g: DelegationGrant, uid: &str| {
            g.metadata.uid = Some(uid.into());
            g
        };
        let grants = vec![
            with_uid(
                grant(
                    "g1",
                    alice.clone(),
                    "orchestrator",
                    ready("True", "Issued", Some(540)),
                ),
                "u-1",
            ),
            with_uid(
                grant(
                    "g2",
                    parent("g1"),
                    "summarizer",
                    ready("True", "Issued", Some(300)),
                ),
                "u-2",
            ),
            with_uid(
                grant(
                    "g3",
                    parent("g2"),
                    "notifier",
                    ready("True", "Issued", Some(240)),
                ),
                "u-3",
            ),
            with_uid(grant("quiet", alice, "notifier", json!({})), "u-4"),
        ];
        let exchanged = BTreeMap::from([
            ("u-1".to_owned(), 3),
            ("u-3".to_owned(), 12),
            ("u-4".to_owned(), 0),
            ("u-other".to_owned(), 7),
        ]);
        let expected = "\
NAME                         READY   REASON   AGENT          SCOPES         EXPIRES
User/alice@example.com
├─DelegationGrant/g1         True    Issued   orchestrator   tickets:read   in 9m
│ │ exchanged: 3 live
│ └─DelegationGrant/g2       True    Issued   summarizer     tickets:read   in 5m
│   └─DelegationGrant/g3     True    Issued   notifier       tickets:read   in 4m
│       exchanged: 12 live
└─DelegationGrant/quiet      -       -        notifier       tickets:read   -
";
        let text = render_tree(&grants, &[], &exchanged, NOW, false);
        assert_eq!(text, expected);
        assert!(!text.contains("u-other") && !text.contains("u-1"));
    }
}

//! Key rotation without a flap: through several rotations and next-key publications at a short
//! period, the keys Secret only ever moves forward, the key that signs is never missing from it (nor
//! from the JWKS every replica derives from it, nor from the published JWKS ConfigMap), and the guard
//! takes none of the operator's own writes for tampering.
//!
//! The Secret and the ConfigMap are watched, so every version the apiserver stores is checked, not
//! just those a poller happens to catch: the flap this guards against lasted about 10 ms.

mod support;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use delegation_operator::operator::publishing::keys::{
    JWKS_CONFIGMAP_NAME, JWKS_DATA_KEY, KEYS_DATA_KEY, KEYS_SECRET_NAME, NEXT_KEY_DATA_KEY,
    jwks_of_secret,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Resource, runtime::watcher};
use support::*;

/// The shortest period at which a next key is still published ahead of its use: the lead is half a
/// period in whole seconds, so at `1s` a new key would sign the moment it is generated.
const PERIOD: &str = "2s";
/// How many rotations (and as many next-key publications) the test goes through.
const ROTATIONS: usize = 4;

/// What the guard logs when it puts the keys back (`KeyStore::restore`).
const RESTORED_WARNING: &str =
    "the signing keys Secret or the published JWKS was edited or deleted";

/// Renewed every 2 s (a quarter of its lifetime), so tokens are signed throughout the rotations.
const GRANT: &str = r#"
apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {name: spin}
spec:
  principal: {kind: User, name: alice@example.com}
  actorRef: {name: notifier}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 8s
  renewBefore: 6s
"#;

/// One version of the keys Secret, by key id.
#[derive(Clone, Debug, PartialEq)]
struct Ring {
    /// The key that signs (first in `keys.json`).
    active: String,
    /// Retired keys, still published.
    retired: Vec<String>,
    /// The key published to succeed the active one (`next.json`).
    next: Option<String>,
    /// The key ids of the JWKS a replica derives from this version (`jwks_of_secret`).
    served: BTreeSet<String>,
}

impl Ring {
    fn of(secret: &Secret) -> Result<Self, String> {
        let data = secret.data.clone().unwrap_or_default();
        let stored: Vec<serde_json::Value> = serde_json::from_slice(
            &data
                .get(KEYS_DATA_KEY)
                .ok_or_else(|| format!("no {KEYS_DATA_KEY}"))?
                .0,
        )
        .map_err(|e| e.to_string())?;
        let kid = |k: &serde_json::Value| k["kid"].as_str().unwrap_or_default().to_owned();
        let (active, retired) = stored
            .split_first()
            .ok_or_else(|| format!("an empty {KEYS_DATA_KEY}"))?;
        if !active["retiredAt"].is_null() || retired.iter().any(|k| k["retiredAt"].is_null()) {
            return Err(format!(
                "{KEYS_DATA_KEY} does not start with its one active key"
            ));
        }
        let next = match data.get(NEXT_KEY_DATA_KEY) {
            Some(bytes) => Some(kid(
                &serde_json::from_slice(&bytes.0).map_err(|e| e.to_string())?
            )),
            None => None,
        };
        let served = jwks_of_secret(secret)?["keys"]
            .as_array()
            .map(|keys| keys.iter().map(kid).collect())
            .unwrap_or_default();
        Ok(Self {
            active: kid(active),
            retired: retired.iter().map(kid).collect(),
            next,
            served,
        })
    }

    fn kids(&self) -> BTreeSet<String> {
        std::iter::once(&self.active)
            .chain(&self.retired)
            .chain(&self.next)
            .cloned()
            .collect()
    }
}

/// Every version of the keys Secret seen, checked against the one before.
#[derive(Default)]
struct KeysTimeline {
    /// `rv: active [retired] next=…` per version, for the failure message.
    log: Vec<String>,
    last: Option<Ring>,
    /// Every key that has been active (and so may have signed), in order.
    activated: Vec<String>,
    /// Every key published as the next one, in order.
    announced: Vec<String>,
    /// Keys gone from the Secret: none may come back.
    removed: BTreeSet<String>,
    /// Every key id the Secret ever held.
    held: BTreeSet<String>,
    problems: Vec<String>,
}

impl KeysTimeline {
    fn see(&mut self, rv: &str, secret: Option<&Secret>) {
        let Some(secret) = secret else {
            self.log.push(format!("{rv}: deleted"));
            self.problems
                .push(format!("{rv}: the keys Secret was deleted"));
            return;
        };
        let ring = match Ring::of(secret) {
            Ok(ring) => ring,
            Err(e) => {
                self.log.push(format!("{rv}: unreadable ({e})"));
                self.problems
                    .push(format!("{rv}: the keys Secret is unreadable: {e}"));
                return;
            }
        };
        if self.last.as_ref() == Some(&ring) {
            return; // the same keys (e.g. the watch re-listed)
        }
        self.log.push(format!(
            "{rv}: active {} retired {:?} next {:?}",
            short(&ring.active),
            ring.retired.iter().map(|k| short(k)).collect::<Vec<_>>(),
            ring.next.as_deref().map(short)
        ));
        let kids = ring.kids();
        let mut problem = |what: String| self.problems.push(format!("{rv}: {what}"));
        // Reported once: it counts as removed again only when it goes again.
        let back: Vec<String> = kids.intersection(&self.removed).cloned().collect();
        for kid in back {
            problem(format!("key {} is back after it was removed", short(&kid)));
            self.removed.remove(&kid);
        }
        if let Some(last) = &self.last {
            if ring.active != last.active {
                if self.activated.contains(&ring.active) {
                    problem(format!(
                        "the active key went back from {} to the older {}",
                        short(&last.active),
                        short(&ring.active)
                    ));
                } else if last.next.is_some() && last.next.as_ref() != Some(&ring.active) {
                    problem(format!(
                        "rotated to {} instead of the published next key {}",
                        short(&ring.active),
                        short(last.next.as_deref().unwrap_or_default())
                    ));
                }
            }
            if let Some(next) = &last.next
                && ring.next.as_ref() != Some(next)
                && &ring.active != next
            {
                problem(format!(
                    "the published next key {} was withdrawn",
                    short(next)
                ));
            }
            for kid in last.kids().difference(&kids) {
                self.removed.insert(kid.clone());
            }
        }
        // Retired keys stay in the keyring for the maximum token lifetime (24 h here): a key that
        // has signed is never gone from it during the test (being the next key again is no
        // substitute: a replica that starts leading from this version would sign with an older
        // key), nor from the JWKS served from it.
        let signing = self.activated.iter().chain(std::iter::once(&ring.active));
        for kid in signing {
            if kid != &ring.active && !ring.retired.contains(kid) {
                let only_next = if ring.next.as_ref() == Some(kid) {
                    " (it is the next key again)"
                } else {
                    ""
                };
                self.problems.push(format!(
                    "{rv}: key {} (it has signed) is missing from the keyring{only_next}",
                    short(kid)
                ));
            }
            if !ring.served.contains(kid) {
                self.problems.push(format!(
                    "{rv}: key {} (it has signed) is missing from the JWKS a replica serves",
                    short(kid)
                ));
            }
        }
        if !self.activated.contains(&ring.active) {
            self.activated.push(ring.active.clone());
        }
        if let Some(next) = &ring.next
            && !self.announced.contains(next)
        {
            self.announced.push(next.clone());
        }
        self.held.extend(kids);
        self.last = Some(ring);
    }

    /// Rotations and next-key publications seen (each counted once, however often it flapped).
    fn steps(&self) -> (usize, usize) {
        (self.activated.len().saturating_sub(1), self.announced.len())
    }
}

/// Every version of the published JWKS ConfigMap (active key first), checked against the one before.
#[derive(Default)]
struct JwksTimeline {
    log: Vec<String>,
    last: Option<Vec<String>>,
    /// Every key that has been first (active).
    activated: Vec<String>,
    removed: BTreeSet<String>,
    problems: Vec<String>,
}

impl JwksTimeline {
    fn see(&mut self, rv: &str, cm: Option<&ConfigMap>) {
        let Some(cm) = cm else {
            self.problems
                .push(format!("{rv}: the JWKS ConfigMap was deleted"));
            return;
        };
        let kids: Option<Vec<String>> = cm
            .data
            .as_ref()
            .and_then(|d| d.get(JWKS_DATA_KEY))
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .and_then(|j| {
                j["keys"].as_array().map(|keys| {
                    keys.iter()
                        .map(|k| k["kid"].as_str().unwrap_or_default().to_owned())
                        .collect()
                })
            });
        let Some(kids) = kids.filter(|k| !k.is_empty()) else {
            self.problems
                .push(format!("{rv}: the JWKS ConfigMap holds no keys"));
            return;
        };
        if self.last.as_ref() == Some(&kids) {
            return;
        }
        self.log.push(format!(
            "{rv}: {:?}",
            kids.iter().map(|k| short(k)).collect::<Vec<_>>()
        ));
        let mut problem = |what: String| self.problems.push(format!("{rv}: {what}"));
        for kid in &kids {
            if self.removed.remove(kid) {
                problem(format!("key {} is back after it was removed", short(kid)));
            }
        }
        let active = &kids[0];
        if let Some(last) = &self.last {
            if active != &last[0] && self.activated.contains(active) {
                problem(format!(
                    "the active key went back from {} to the older {}",
                    short(&last[0]),
                    short(active)
                ));
            }
            for kid in last.iter().filter(|k| !kids.contains(k)) {
                self.removed.insert(kid.clone());
            }
        }
        for kid in &self.activated {
            if !kids.contains(kid) {
                self.problems.push(format!(
                    "{rv}: key {} (it has signed) is missing from the published JWKS",
                    short(kid)
                ));
            }
        }
        if !self.activated.contains(active) {
            self.activated.push(active.clone());
        }
        self.last = Some(kids);
    }
}

fn short(kid: &str) -> &str {
    &kid[..kid.len().min(8)]
}

/// Feeds every version of the one object named `name` to `see` (a deletion as `None`).
fn watch_versions<K>(
    api: Api<K>,
    name: &str,
    mut see: impl FnMut(&str, Option<&K>) + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut events = watcher(api, config).boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                    let rv = obj.meta().resource_version.clone().unwrap_or_default();
                    see(&rv, Some(&obj));
                }
                Ok(watcher::Event::Delete(obj)) => {
                    let rv = obj.meta().resource_version.clone().unwrap_or_default();
                    see(&rv, None);
                }
                Ok(_) => {}
                // The watcher re-lists by itself; a version missed meanwhile is not checked.
                Err(e) => eprintln!("watch of {name}: {e}"),
            }
        }
    })
}

/// What the watches saw; printed when the test fails, wherever it fails.
#[derive(Clone, Default)]
struct Seen {
    keys: Arc<Mutex<KeysTimeline>>,
    jwks: Arc<Mutex<JwksTimeline>>,
    /// `(resourceVersion, kid)` of each token the grant's Secret held, in order.
    tokens: Arc<Mutex<Vec<(String, String)>>>,
}

impl Seen {
    fn timelines(&self) -> String {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let jwks = self.jwks.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "keys Secret versions:\n  {}\nJWKS ConfigMap versions:\n  {}\ntoken key ids: {:?}",
            keys.log.join("\n  "),
            jwks.log.join("\n  "),
            tokens
                .iter()
                .map(|(rv, kid)| format!("{rv}: {}", short(kid)))
                .collect::<Vec<_>>()
        )
    }

    /// Every step back, and every moment a key that signs was missing.
    fn problems(&self) -> Vec<String> {
        let keys = self.keys.lock().unwrap();
        let mut problems = keys.problems.clone();
        // Tokens are signed only by keys the Secret (and so every replica's JWKS) held.
        for (rv, kid) in self.tokens.lock().unwrap().iter() {
            if !keys.held.contains(kid) {
                problems.push(format!(
                    "token Secret {rv}: signed by {}, never in the keys Secret",
                    short(kid)
                ));
            }
        }
        problems.extend(self.jwks.lock().unwrap().problems.iter().cloned());
        problems
    }
}

/// Prints what was seen when the test panics (a timeout included).
struct PrintOnPanic(Seen);

impl Drop for PrintOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0.timelines());
        }
    }
}

#[tokio::test]
async fn the_keys_only_move_forward_through_rotations() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "keyrot").await;
    let operator_ns = operator_namespace_for(&ns);
    create_namespace(&client, &operator_ns).await;

    // Watching from before the operator starts: its very first write is checked too.
    let seen = Seen::default();
    let _print = PrintOnPanic(seen.clone());
    let watches = [
        watch_versions(
            Api::<Secret>::namespaced(client.clone(), &operator_ns),
            KEYS_SECRET_NAME,
            {
                let keys = seen.keys.clone();
                move |rv, secret| keys.lock().unwrap().see(rv, secret)
            },
        ),
        watch_versions(
            Api::<ConfigMap>::namespaced(client.clone(), &operator_ns),
            JWKS_CONFIGMAP_NAME,
            {
                let jwks = seen.jwks.clone();
                move |rv, cm| jwks.lock().unwrap().see(rv, cm)
            },
        ),
        // The key id of every token issued meanwhile.
        watch_versions(
            Api::<Secret>::namespaced(client.clone(), &ns),
            "spin-token",
            {
                let tokens = seen.tokens.clone();
                move |rv, secret| {
                    let kid = secret
                        .and_then(|s| s.data.as_ref()?.get("token").cloned())
                        .and_then(|t| String::from_utf8(t.0).ok())
                        .and_then(|t| jsonwebtoken::decode_header(&t).ok()?.kid);
                    if let Some(kid) = kid {
                        let mut tokens = tokens.lock().unwrap();
                        if tokens.last().is_none_or(|(_, last)| *last != kid) {
                            tokens.push((rv.to_owned(), kid));
                        }
                    }
                }
            },
        ),
    ];

    let operator = Operator::start(&ns, &operator_ns, &["--key-rotation-period", PERIOD]);
    let f = Fixture {
        client,
        ns,
        operator: Some(operator),
    };
    f.apply(NOTIFIER_AGENT).await;
    f.apply(GRANT).await;
    f.wait_ready("spin", "True", None).await;

    let what = format!("{ROTATIONS} rotations and {ROTATIONS} next-key publications");
    wait_for(&what, Duration::from_secs(60), || async {
        let (rotations, publications) = seen.keys.lock().unwrap().steps();
        (rotations >= ROTATIONS && publications > ROTATIONS).then_some(())
    })
    .await;
    // The token Secret is watched apart: wait until it shows a token of a rotated-to key.
    let rotated_to = seen.keys.lock().unwrap().activated[1..].to_vec();
    wait_for(
        "a token signed by a key the rotations made active",
        Duration::from_secs(20),
        || async {
            let tokens = seen.tokens.lock().unwrap();
            tokens
                .iter()
                .any(|(_, kid)| rotated_to.contains(kid))
                .then_some(())
        },
    )
    .await;
    for watch in watches {
        watch.abort();
    }

    let problems = seen.problems();
    assert!(
        problems.is_empty(),
        "the keys did not only move forward:\n  {}",
        problems.join("\n  ")
    );

    let log = std::fs::read_to_string(&f.operator().log_path).unwrap_or_default();
    let restored: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(RESTORED_WARNING)
                || (l.contains("could not restore")
                    && (l.contains(KEYS_SECRET_NAME) || l.contains(JWKS_CONFIGMAP_NAME)))
        })
        .collect();
    assert!(
        restored.is_empty(),
        "the guard answered the operator's own key writes:\n{}",
        restored.join("\n")
    );
    eprintln!("{}", seen.timelines());
}

//! How many exchanged tokens are live, per grant, for `delegation-operator tree` (issue #20: "counts,
//! not tokens"). Nothing per exchanged token is stored anywhere, so each replica that serves
//! `/token` counts what it issued itself, in memory: per grant (its uid, with its namespace and
//! name), a count per minute of expiry. A token is counted in the bucket of the minute its `exp`
//! falls in, rounded up, and stops counting when that minute has passed: a count may include a
//! token that expired less than a minute ago, never miss one that is live. Bytes per grant,
//! nothing per token: a grant whose exchanged tokens live 15 minutes holds at most 16 buckets of 8
//! bytes.
//!
//! **Bounded memory.** At most [`MAX_TRACKED_GRANTS`] grants are tracked; when a new grant would
//! go beyond, the expired ones are dropped and, if that is not enough, the hundredth of the tracked
//! grants whose last token expires first (one pass over them per 1,000 new grants at the cap).
//! Dropped grants are no longer counted (their tokens still live: `tree` then shows fewer).
//!
//! **Bounded writes.** Every [`PUBLISH_PERIOD`] (30 s), and only when the counts changed since its
//! last write, the replica server-side applies its own data key in ConfigMap
//! [`CONFIGMAP_NAME`] of the operator namespace, under a field manager of its own (so replicas never
//! overwrite each other): `{"until": <end of the minute its latest counted token expires in>,
//! "grants": {"<ns>/<name>/<uid>": <live count>, ...}}`, at most [`MAX_PUBLISHED_GRANTS`] grants
//! (those with the most live tokens; `"omitted"` says how many more have some). An exchange never
//! waits for a write nor causes one: it adds one to a count under a lock held for a hash lookup.
//! Whatever the exchange rate, a replica writes at most twice a minute — above 200 exchanges a
//! minute, fewer than one write per 100 exchanges (the amortisation issue #20 asks for). When its
//! counts fall to nothing, and when the process stops on SIGTERM, the replica withdraws its key
//! (an apply without it). Readers ignore an entry whose `until` has passed (a replica killed
//! without SIGTERM), and a writer removes such entries of others an hour after their `until`.
//!
//! The ConfigMap must exist: the chart creates it, and `run` creates it when missing. A replica
//! that cannot write it (missing, forbidden) says so once at warn and keeps serving: exchanges
//! never fail for it. A replica that restarts forgets its counts (tokens it issued before still
//! live, uncounted).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use k8s_openapi::{api::core::v1::ConfigMap, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

/// The ConfigMap in the operator namespace holding each replica's counts.
pub const CONFIGMAP_NAME: &str = "delegation-operator-exchanges";
/// Grants one replica tracks at most.
pub const MAX_TRACKED_GRANTS: usize = 100_000;
/// Grants one replica's entry names at most (about 80 bytes each: a dozen replicas stay well under
/// the ConfigMap's 1 MiB).
pub const MAX_PUBLISHED_GRANTS: usize = 1_000;
/// How often a replica writes its entry, at most.
pub const PUBLISH_PERIOD: Duration = Duration::from_secs(30);
/// How long a write may take before it is given up (and tried again at the next tick).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after its `until` an entry of another replica is removed by a writer.
const STALE_AFTER_SECS: i64 = 3_600;

/// The end of the minute `exp` (Unix seconds) falls in, as Unix minutes: a token with this `exp`
/// counts while `now` is before `minute * 60`.
fn expiry_minute(exp: i64) -> u32 {
    u32::try_from((exp + 59).div_euclid(60)).unwrap_or(u32::MAX)
}

fn live(minute: u32, now: i64) -> bool {
    i64::from(minute) * 60 > now
}

/// One grant's counts.
#[derive(Debug)]
struct Tracked {
    /// `<namespace>/<name>` (the uid is the map's key).
    grant: Box<str>,
    /// (expiry minute, tokens), by minute.
    buckets: Vec<(u32, u32)>,
}

impl Tracked {
    fn last_minute(&self) -> u32 {
        self.buckets.last().map_or(0, |(m, _)| *m)
    }

    fn live_count(&self, now: i64) -> u64 {
        self.buckets
            .iter()
            .filter(|(m, _)| live(*m, now))
            .map(|(_, n)| u64::from(*n))
            .sum()
    }
}

/// A replica's count of the live tokens it exchanged, per grant (pure: the time is an argument).
#[derive(Debug)]
pub struct LiveCounts {
    grants: HashMap<Uuid, Tracked>,
    cap: usize,
}

impl Default for LiveCounts {
    fn default() -> Self {
        Self::with_cap(MAX_TRACKED_GRANTS)
    }
}

impl LiveCounts {
    pub fn with_cap(cap: usize) -> Self {
        Self {
            grants: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Grants tracked now.
    pub fn tracked(&self) -> usize {
        self.grants.len()
    }

    /// Counts one token issued for grant `namespace/name` (uid `uid`) expiring at `exp`. A uid that
    /// is not a UUID (the apiserver's always are) and a token already expired are not counted.
    pub fn record(&mut self, namespace: &str, name: &str, uid: &str, exp: i64, now: i64) {
        let Ok(id) = Uuid::parse_str(uid) else {
            return;
        };
        if exp <= now {
            return;
        }
        let minute = expiry_minute(exp);
        if !self.grants.contains_key(&id) && self.grants.len() >= self.cap {
            self.make_room(now);
        }
        let tracked = self.grants.entry(id).or_insert_with(|| Tracked {
            grant: format!("{namespace}/{name}").into_boxed_str(),
            buckets: Vec::new(),
        });
        match tracked.buckets.binary_search_by_key(&minute, |(m, _)| *m) {
            Ok(i) => tracked.buckets[i].1 = tracked.buckets[i].1.saturating_add(1),
            Err(i) => tracked.buckets.insert(i, (minute, 1)),
        }
    }

    /// Drops the expired grants and, if the cap is still reached, the hundredth whose last token
    /// expires first.
    fn make_room(&mut self, now: i64) {
        self.prune(now);
        if self.grants.len() < self.cap {
            return;
        }
        let drop = (self.cap / 100).max(1);
        let mut order: Vec<(u32, Uuid)> = self
            .grants
            .iter()
            .map(|(id, t)| (t.last_minute(), *id))
            .collect();
        order.select_nth_unstable(drop - 1);
        for (_, id) in &order[..drop] {
            self.grants.remove(id);
        }
    }

    /// Forgets the buckets whose minute has passed, and the grants left with none.
    pub fn prune(&mut self, now: i64) {
        self.grants.retain(|_, t| {
            t.buckets.retain(|(m, _)| live(*m, now));
            !t.buckets.is_empty()
        });
    }

    /// The entry to publish now: the grants with live tokens (at most [`MAX_PUBLISHED_GRANTS`], those
    /// with the most first) and `until`, the end of the last live bucket.
    pub fn entry(&self, now: i64) -> Entry {
        self.entry_of_at_most(now, MAX_PUBLISHED_GRANTS)
    }

    fn entry_of_at_most(&self, now: i64, most: usize) -> Entry {
        let mut until = 0;
        let mut counted: Vec<(u64, String)> = Vec::new();
        for (id, t) in &self.grants {
            let n = t.live_count(now);
            if n > 0 {
                counted.push((n, format!("{}/{id}", t.grant)));
                until = until.max(i64::from(t.last_minute()) * 60);
            }
        }
        let omitted = counted.len().saturating_sub(most) as u64;
        counted.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        counted.truncate(most);
        Entry {
            until,
            grants: counted.into_iter().map(|(n, key)| (key, n)).collect(),
            omitted,
        }
    }
}

/// One replica's published counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix seconds: the entry says nothing live after this.
    pub until: i64,
    /// `<namespace>/<name>/<uid>` → live exchanged tokens.
    pub grants: BTreeMap<String, u64>,
    /// Grants with live tokens left out (over [`MAX_PUBLISHED_GRANTS`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Entry {
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty() && self.omitted == 0
    }
}

/// What a replica last wrote, to write only what changed.
#[derive(Debug, Default)]
pub struct Published {
    /// `None`: nothing of ours is in the ConfigMap.
    last: Option<Entry>,
}

impl Published {
    /// Whether `entry` must be written: it differs from the last write (an empty entry is written as
    /// the key's withdrawal, and only when something was written before).
    pub fn due(&self, entry: &Entry) -> bool {
        match &self.last {
            None => !entry.is_empty(),
            Some(last) => last != entry,
        }
    }

    /// `entry` was written (`None` after a withdrawal).
    pub fn written(&mut self, entry: &Entry) {
        self.last = (!entry.is_empty()).then(|| entry.clone());
    }
}

/// The live exchanged tokens per grant uid in the ConfigMap's `data`, summed over the entries still
/// fresh at `now` (malformed ones are skipped), and how many grants with live tokens the entries
/// left out.
pub fn live_by_grant_uid(
    data: &BTreeMap<String, String>,
    now: i64,
) -> (BTreeMap<String, u64>, u64) {
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    let mut omitted = 0;
    for text in data.values() {
        let Ok(entry) = serde_json::from_str::<Entry>(text) else {
            continue;
        };
        if entry.until <= now {
            continue;
        }
        omitted += entry.omitted;
        for (key, n) in entry.grants {
            if let Some((_, uid)) = key.rsplit_once('/') {
                *sums.entry(uid.to_owned()).or_default() += n;
            }
        }
    }
    sums.retain(|_, n| *n > 0);
    (sums, omitted)
}

/// A replica's identity as a ConfigMap data key (`[-._a-zA-Z0-9]`, at most 253 characters).
pub fn data_key(identity: &str) -> String {
    let key: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '-'
            }
        })
        .take(253)
        .collect();
    if key.is_empty() || key == "." || key == ".." {
        "replica".into()
    } else {
        key
    }
}

/// The counts of this replica, shared by the exchanges that add to them and the task that writes
/// them.
pub struct Counter {
    counts: Mutex<LiveCounts>,
    api: Api<ConfigMap>,
    key: String,
    manager: String,
}

impl Counter {
    /// `identity`: this replica's (`$POD_NAME`, else host name and process id).
    pub fn new(client: Client, operator_namespace: &str, identity: &str) -> Self {
        let key = data_key(identity);
        let manager: String = format!("delegation-operator-exchanges/{key}")
            .chars()
            .take(128)
            .collect();
        Self {
            counts: Mutex::new(LiveCounts::default()),
            api: Api::namespaced(client, operator_namespace),
            key,
            manager,
        }
    }

    /// Counts one issued token.
    pub fn record(&self, namespace: &str, name: &str, uid: &str, exp: i64) {
        let now = Timestamp::now().as_second();
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(namespace, name, uid, exp, now);
    }

    /// Creates the ConfigMap when it is missing (`run` may; the verification server may not).
    pub async fn create_configmap(&self) {
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(CONFIGMAP_NAME.into()),
                labels: Some(crate::operator::managed_labels()),
                ..Default::default()
            },
            ..Default::default()
        };
        let params = PostParams {
            field_manager: Some(self.manager.clone()),
            ..Default::default()
        };
        match self.api.create(&params, &cm).await {
            Ok(_) => tracing::info!(configmap = CONFIGMAP_NAME, "created"),
            Err(kube::Error::Api(status)) if status.is_already_exists() => {}
            Err(e) => tracing::warn!(
                configmap = CONFIGMAP_NAME,
                error = %e,
                "could not create the exchanged-token counts ConfigMap; tree will not show this replica's counts"
            ),
        }
    }

    /// Writes the counts every [`PUBLISH_PERIOD`] when they changed. Never returns.
    pub async fn publish(&self) {
        let mut tick = tokio::time::interval(PUBLISH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published = Published::default();
        let mut warned = false;
        loop {
            tick.tick().await;
            let now = Timestamp::now().as_second();
            let entry = {
                let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
                counts.prune(now);
                counts.entry(now)
            };
            if !published.due(&entry) {
                continue;
            }
            // A write that does not answer in time counts as failed and is tried at the next tick.
            let written = tokio::time::timeout(WRITE_TIMEOUT, self.apply(Some(&entry)))
                .await
                .unwrap_or_else(|_| Err(kube::Error::Service("timed out".into())));
            match written {
                Ok(cm) => {
                    published.written(&entry);
                    warned = false;
                    self.remove_stale(&cm, now).await;
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(
                        configmap = CONFIGMAP_NAME,
                        error = %e,
                        "could not write this replica's exchanged-token counts (tree will not show them); exchanges go on, and it tries again every 30 s"
                    );
                }
                Err(_) => {}
            }
        }
    }

    /// Removes this replica's entry (on SIGTERM).
    pub async fn withdraw(&self) {
        if let Err(e) = self.apply(None).await {
            tracing::debug!(error = %e, "could not withdraw the exchanged-token counts");
        }
    }

    /// Applies this replica's key (`None`: an apply without it, which withdraws it).
    async fn apply(&self, entry: Option<&Entry>) -> Result<ConfigMap, kube::Error> {
        let mut body = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP_NAME},
        });
        if let Some(entry) = entry.filter(|e| !e.is_empty()) {
            let text = serde_json::to_string(entry).map_err(kube::Error::SerdeError)?;
            body["data"] = json!({ &self.key: text });
        }
        self.api
            .patch(
                CONFIGMAP_NAME,
                &PatchParams::apply(&self.manager).force(),
                &Patch::Apply(&body),
            )
            .await
    }

    /// Removes the entries of other replicas whose `until` passed an hour ago (a replica killed
    /// without SIGTERM), each only if unchanged since read.
    async fn remove_stale(&self, cm: &ConfigMap, now: i64) {
        let Some(data) = &cm.data else { return };
        for (key, text) in data {
            let stale = *key != self.key
                && serde_json::from_str::<Entry>(text)
                    .map_or(true, |e| e.until + STALE_AFTER_SECS < now);
            if !stale || key.contains(['/', '~']) {
                continue;
            }
            let path = format!("/data/{key}");
            let Ok(patch) = serde_json::from_value::<json_patch::Patch>(json!([
                {"op": "test", "path": path, "value": text},
                {"op": "remove", "path": path},
            ])) else {
                continue;
            };
            let _ = self
                .api
                .patch(
                    CONFIGMAP_NAME,
                    &PatchParams::default(),
                    &Patch::<()>::Json(patch),
                )
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000; // a whole minute (30,000,000 minutes)
    const UID: &str = "0b8e6b0e-1111-4222-8333-444455556666";
    const UID2: &str = "0b8e6b0e-1111-4222-8333-777788889999";

    #[test]
    fn a_token_counts_until_the_end_of_the_minute_it_expires_in() {
        let mut counts = LiveCounts::default();
        counts.record("demo", "g1", UID, NOW + 30, NOW);
        counts.record("demo", "g1", UID, NOW + 59, NOW);
        counts.record("demo", "g1", UID, NOW + 150, NOW);
        let key = format!("demo/g1/{UID}");
        let at = |t| counts.entry(t).grants.get(&key).copied();
        assert_eq!(at(NOW), Some(3));
        assert_eq!(counts.entry(NOW).until, NOW + 180);
        assert_eq!(at(NOW + 59), Some(3), "counted until the minute ends");
        assert_eq!(at(NOW + 60), Some(1), "the first minute's two are gone");
        assert_eq!(at(NOW + 179), Some(1));
        assert_eq!(at(NOW + 180), None);
        assert!(counts.entry(NOW + 180).is_empty());
        assert_eq!(counts.entry(NOW + 180).until, 0);
    }

    #[test]
    fn expired_tokens_and_foreign_uids_are_not_counted() {
        let mut counts = LiveCounts::default();
        counts.record("demo", "g1", UID, NOW, NOW);
        counts.record("demo", "g1", "not-a-uuid", NOW + 60, NOW);
        assert_eq!(counts.tracked(), 0);
    }

    #[test]
    fn pruning_forgets_grants_whose_tokens_all_expired() {
        let mut counts = LiveCounts::default();
        counts.record("demo", "g1", UID, NOW + 10, NOW);
        counts.record("demo", "g2", UID2, NOW + 600, NOW);
        counts.prune(NOW + 60);
        assert_eq!(counts.tracked(), 1);
        assert_eq!(
            counts.entry(NOW + 60).grants,
            BTreeMap::from([(format!("demo/g2/{UID2}"), 1)])
        );
        counts.prune(NOW + 600);
        assert_eq!(counts.tracked(), 0);
    }

    fn uid(i: usize) -> String {
        format!("00000000-0000-4000-8000-{i:012}")
    }

    #[test]
    fn at_the_cap_the_grants_expiring_first_are_dropped() {
        let mut counts = LiveCounts::with_cap(200);
        // Grant i's token expires i minutes from now.
        for i in 1..=200 {
            counts.record("demo", &format!("g{i}"), &uid(i), NOW + 60 * i as i64, NOW);
        }
        assert_eq!(counts.tracked(), 200);
        counts.record("demo", "new", &uid(999), NOW + 30, NOW);
        // A hundredth (2) dropped: the two expiring first; the new one is in.
        assert_eq!(counts.tracked(), 199);
        let entry = counts.entry(NOW);
        assert!(!entry.grants.contains_key(&format!("demo/g1/{}", uid(1))));
        assert!(!entry.grants.contains_key(&format!("demo/g2/{}", uid(2))));
        assert!(entry.grants.contains_key(&format!("demo/g3/{}", uid(3))));
        assert!(entry.grants.contains_key(&format!("demo/new/{}", uid(999))));
        // A grant already tracked is counted at the cap without dropping anything.
        for _ in 0..5 {
            counts.record("demo", "g200", &uid(200), NOW + 60, NOW);
        }
        assert_eq!(counts.tracked(), 199);
        // Expired grants go first, before any live one.
        let mut counts = LiveCounts::with_cap(3);
        counts.record("demo", "a", &uid(1), NOW + 10, NOW);
        counts.record("demo", "b", &uid(2), NOW + 600, NOW);
        counts.record("demo", "c", &uid(3), NOW + 900, NOW);
        counts.record("demo", "d", &uid(4), NOW + 900, NOW + 120);
        assert_eq!(counts.tracked(), 3);
        assert_eq!(counts.entry(NOW + 120).grants.len(), 3);
    }

    #[test]
    fn an_entry_names_at_most_so_many_grants_the_busiest_first() {
        let mut counts = LiveCounts::default();
        for i in 1..=5 {
            for _ in 0..i {
                counts.record("demo", &format!("g{i}"), &uid(i), NOW + 300, NOW);
            }
        }
        let entry = counts.entry_of_at_most(NOW, 2);
        assert_eq!(
            entry.grants,
            BTreeMap::from([
                (format!("demo/g5/{}", uid(5)), 5),
                (format!("demo/g4/{}", uid(4)), 4)
            ])
        );
        assert_eq!(entry.omitted, 3);
        let text = serde_json::to_value(&entry).unwrap();
        assert_eq!(text["omitted"], 3);
        assert_eq!(text["until"], NOW + 300);
        let all = serde_json::to_value(counts.entry(NOW)).unwrap();
        assert!(all.get("omitted").is_none(), "{all}");
    }

    #[test]
    fn only_what_changed_is_written() {
        let mut counts = LiveCounts::default();
        let mut published = Published::default();
        assert!(!published.due(&counts.entry(NOW)), "nothing to say yet");
        counts.record("demo", "g1", UID, NOW + 90, NOW);
        let first = counts.entry(NOW);
        assert!(published.due(&first));
        published.written(&first);
        assert!(!published.due(&counts.entry(NOW + 30)), "the same counts");
        counts.record("demo", "g1", UID, NOW + 100, NOW + 30);
        let second = counts.entry(NOW + 30);
        assert!(published.due(&second), "one more token");
        published.written(&second);
        // The tokens expire: the empty entry is due once (the withdrawal), then nothing.
        let gone = counts.entry(NOW + 120);
        assert!(gone.is_empty() && published.due(&gone));
        published.written(&gone);
        assert!(!published.due(&counts.entry(NOW + 150)));
    }

    #[test]
    fn readers_sum_fresh_entries_per_grant_uid() {
        let entry = |until: i64, grants: &[(&str, u64)]| {
            serde_json::to_string(&Entry {
                until,
                grants: grants.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
                omitted: 0,
            })
            .unwrap()
        };
        let g1 = format!("demo/g1/{UID}");
        let g2 = format!("demo/g2/{UID2}");
        let data = BTreeMap::from([
            (
                "replica-a".to_owned(),
                entry(NOW + 60, &[(&g1, 2), (&g2, 1)]),
            ),
            ("replica-b".to_owned(), entry(NOW + 120, &[(&g1, 3)])),
            ("killed".to_owned(), entry(NOW, &[(&g1, 100)])),
            ("garbage".to_owned(), "{not json".to_owned()),
            (
                "busy".to_owned(),
                json!({"until": NOW + 60, "grants": {}, "omitted": 7}).to_string(),
            ),
        ]);
        let (sums, omitted) = live_by_grant_uid(&data, NOW);
        assert_eq!(
            sums,
            BTreeMap::from([(UID.to_owned(), 5), (UID2.to_owned(), 1)])
        );
        assert_eq!(omitted, 7);
    }

    #[test]
    fn identities_become_valid_data_keys() {
        assert_eq!(
            data_key("delegation-operator-7d9f-abcde"),
            "delegation-operator-7d9f-abcde"
        );
        assert_eq!(data_key("host name/1:2"), "host-name-1-2");
        assert_eq!(data_key(""), "replica");
        assert_eq!(data_key(&"x".repeat(300)).len(), 253);
    }
}

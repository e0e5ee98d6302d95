//! The operator's record of the tokens it minted for each grant uid, kept compactly.
//!
//! Every grant holds one or two records (its current token and the one before) for as long as it
//! lives, so this is kept per grant: the grant uid and the token id as 16 bytes when they are
//! canonical UUIDs (as the apiserver and the operator write them, see [`Id`]), and a record of a
//! UUID token id with a list serial and index below 2^32 (every record the operator writes) as 32
//! bytes. Anything else — a state written by hand — is kept as it was written. The records
//! serialize exactly as before (`{grant uid: [[jti, exp, "serial", idx], …]}`), in the same order,
//! so a shard reads back byte for byte.

use std::{collections::BTreeMap, num::NonZeroU32};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

use crate::operator::caches::ids::{Id, uuid_bytes, uuid_text};

use super::SHARDS;

/// A token the operator minted and may have to revoke: `[jti, exp, list serial, idx]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Held {
    /// A UUID token id, and a serial and an index that fit 32 bits: every record the operator makes.
    Minted {
        jti: [u8; 16],
        exp: i64,
        /// The serial plus one (the zero leaves room for [`Held::Spelled`] without growing).
        serial: NonZeroU32,
        idx: u32,
    },
    /// Anything else, as written.
    Spelled(Box<(Box<str>, i64, u64, usize)>),
}

impl Held {
    pub(super) fn new(jti: &str, exp: i64, serial: u64, idx: usize) -> Self {
        let minted = uuid_bytes(jti).and_then(|jti| {
            let serial = u32::try_from(serial.checked_add(1)?).ok()?;
            Some(Held::Minted {
                jti,
                exp,
                serial: NonZeroU32::new(serial)?,
                idx: u32::try_from(idx).ok()?,
            })
        });
        minted.unwrap_or_else(|| Held::Spelled(Box::new((jti.into(), exp, serial, idx))))
    }

    /// The token id.
    pub(super) fn jti(&self) -> String {
        match self {
            Held::Minted { jti, .. } => uuid_text(jti).as_str().to_owned(),
            Held::Spelled(spelled) => spelled.0.to_string(),
        }
    }

    /// Whether this is the record of token `jti`.
    pub(super) fn is(&self, jti: &str) -> bool {
        match self {
            Held::Minted { jti: own, .. } => uuid_bytes(jti).as_ref() == Some(own),
            Held::Spelled(spelled) => *spelled.0 == *jti,
        }
    }

    /// When the token expires (seconds).
    pub(super) fn exp(&self) -> i64 {
        match self {
            Held::Minted { exp, .. } => *exp,
            Held::Spelled(spelled) => spelled.1,
        }
    }

    /// The serial of the list its entry is in.
    pub(super) fn serial(&self) -> u64 {
        match self {
            Held::Minted { serial, .. } => u64::from(serial.get()) - 1,
            Held::Spelled(spelled) => spelled.2,
        }
    }

    /// Its entry's index in that list.
    pub(super) fn idx(&self) -> usize {
        match self {
            Held::Minted { idx, .. } => *idx as usize,
            Held::Spelled(spelled) => spelled.3,
        }
    }
}

impl Serialize for Held {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let jti = match self {
            Held::Minted { jti, .. } => uuid_text(jti).as_str().to_owned(),
            Held::Spelled(spelled) => spelled.0.to_string(),
        };
        (jti, self.exp(), self.serial().to_string(), self.idx()).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Held {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (jti, exp, serial, idx) = <(String, i64, String, usize)>::deserialize(deserializer)?;
        // Only the canonical decimal the operator writes, so that the record reads back as written.
        let number: u64 = serial
            .parse()
            .ok()
            .filter(|n: &u64| n.to_string() == serial)
            .ok_or_else(|| D::Error::custom(format!("list serial {serial:?} is not a number")))?;
        Ok(Held::new(&jti, exp, number, idx))
    }
}

/// Grant uid -> the tokens minted for it, in one shard.
pub(super) type Shard = BTreeMap<Id, Box<[Held]>>;

/// The records of every grant, in [`SHARDS`] shards (see the module doc of [`super`]).
pub struct TokenRecords {
    shards: Vec<Shard>,
}

impl Default for TokenRecords {
    fn default() -> Self {
        Self {
            shards: vec![Shard::new(); SHARDS],
        }
    }
}

impl TokenRecords {
    /// Records that a token `jti` expiring at `exp` holds entry `idx` of list `serial`, for
    /// `grant_uid`, in `shard` (what an issuance does in the open shard).
    pub fn record(
        &mut self,
        shard: usize,
        grant_uid: &str,
        jti: &str,
        exp: i64,
        serial: u64,
        idx: usize,
    ) {
        let held = Held::new(jti, exp, serial, idx);
        self.edit(shard, grant_uid, |records| records.push(held));
    }

    pub(super) fn shard(&self, shard: usize) -> &Shard {
        &self.shards[shard]
    }

    pub(super) fn replace_shard(&mut self, shard: usize, records: Shard) {
        self.shards[shard] = records;
    }

    /// Changes the records of `grant_uid` in `shard` (dropped when none are left).
    pub(super) fn edit(
        &mut self,
        shard: usize,
        grant_uid: &str,
        edit: impl FnOnce(&mut Vec<Held>),
    ) {
        let records = &mut self.shards[shard];
        let uid = Id::new(grant_uid);
        let mut held = records.remove(&uid).map(Vec::from).unwrap_or_default();
        edit(&mut held);
        if !held.is_empty() {
            records.insert(uid, held.into_boxed_slice());
        }
    }

    /// Every record of `grant_uid`, in whichever shards they are.
    pub(super) fn held(&self, grant_uid: &str) -> impl Iterator<Item = &Held> {
        let uid = Id::new(grant_uid);
        self.shards
            .iter()
            .filter_map(move |shard| shard.get(&uid))
            .flatten()
    }

    /// Removes every record of `grant_uid` from every shard.
    pub(super) fn take(&mut self, grant_uid: &str) -> Vec<Held> {
        let uid = Id::new(grant_uid);
        let mut taken = Vec::new();
        for records in self.shards.iter_mut() {
            if let Some(held) = records.remove(&uid) {
                taken.extend(held);
            }
        }
        taken
    }

    /// Removes the record of token `jti` of `grant_uid`: it and the shard it was in.
    pub(super) fn remove(&mut self, grant_uid: &str, jti: &str) -> Option<(usize, Held)> {
        let uid = Id::new(grant_uid);
        let shard = self.shards.iter().position(|records| {
            records
                .get(&uid)
                .is_some_and(|h| h.iter().any(|h| h.is(jti)))
        })?;
        let mut removed = None;
        self.edit(shard, grant_uid, |held| {
            if let Some(at) = held.iter().position(|h| h.is(jti)) {
                removed = Some(held.remove(at));
            }
        });
        removed.map(|held| (shard, held))
    }

    /// Forgets the records of tokens expired at `now`.
    pub(super) fn forget_expired(&mut self, now: i64) {
        for shard in self.shards.iter_mut() {
            shard.retain(|_, held| {
                if held.iter().any(|h| h.exp() <= now) {
                    let live: Vec<Held> = held.iter().filter(|h| h.exp() > now).cloned().collect();
                    *held = live.into_boxed_slice();
                }
                !held.is_empty()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const JTI: &str = "0b8e6b0e-2f7a-4a57-9d64-0cbd5d1d7c1f";

    #[test]
    fn a_minted_record_takes_32_bytes() {
        assert_eq!(std::mem::size_of::<Held>(), 32);
        assert!(matches!(Held::new(JTI, 10, 0, 0), Held::Minted { .. }));
        assert!(matches!(
            Held::new(JTI, 10, u64::from(u32::MAX) - 1, u32::MAX as usize),
            Held::Minted { .. }
        ));
    }

    #[test]
    fn what_does_not_fit_is_kept_as_written() {
        for held in [
            Held::new("j", 10, 3, 17),
            Held::new(&JTI.to_uppercase(), 10, 3, 17),
            Held::new(JTI, 10, u64::from(u32::MAX), 17),
            Held::new(JTI, 10, 3, u32::MAX as usize + 1),
        ] {
            assert!(matches!(held, Held::Spelled(_)), "{held:?}");
        }
        let held = Held::new(JTI, 10, u64::MAX, usize::MAX);
        assert_eq!(
            (held.jti(), held.exp(), held.serial(), held.idx()),
            (JTI.to_owned(), 10, u64::MAX, usize::MAX)
        );
    }

    #[test]
    fn a_serial_that_is_not_a_canonical_number_is_refused() {
        for serial in ["x", "01", "-1", ""] {
            let json = format!(r#"["{JTI}",10,"{serial}",1]"#);
            assert!(serde_json::from_str::<Held>(&json).is_err(), "{serial}");
        }
    }

    #[test]
    fn records_of_uuid_and_other_grant_uids_are_kept_apart_and_in_text_order() {
        let mut records = TokenRecords::default();
        let uuid = "0000000a-0000-4000-8000-00000000000b";
        records.record(0, uuid, JTI, 10, 0, 0);
        records.record(0, "uid-1", "j", 10, 0, 1);
        records.record(0, &uuid.to_uppercase(), "k", 10, 0, 2);
        assert_eq!(records.held(uuid).count(), 1);
        assert_eq!(records.held("uid-1").next().unwrap().jti(), "j");
        assert_eq!(
            records.held(&uuid.to_uppercase()).next().unwrap().jti(),
            "k"
        );
        let upper = uuid.to_uppercase();
        let text = serde_json::to_string(records.shard(0)).unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"{upper}":[["k",10,"0",2]],"{uuid}":[["{JTI}",10,"0",0]],"uid-1":[["j",10,"0",1]]}}"#
            ),
            "in the order of the texts"
        );
    }

    fn any_uid() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<[u8; 16]>().prop_map(|b| uuid_text(&b).as_str().to_owned()),
            "[a-zA-Z0-9-]{0,40}",
        ]
    }

    fn any_held() -> impl Strategy<Value = (String, i64, u64, usize)> {
        (
            any_uid(),
            any::<i64>(),
            prop_oneof![0u64..100, any::<u64>()],
            prop_oneof![0usize..100_000, any::<usize>()],
        )
    }

    proptest! {
        /// A shard serializes exactly as the map of texts it stands for, and reads back to itself.
        #[test]
        fn a_shard_serializes_as_the_texts_it_keeps(
            records in proptest::collection::vec((any_uid(), any_held()), 0..20)
        ) {
            let mut compact = TokenRecords::default();
            let mut plain: BTreeMap<String, Vec<(String, i64, String, usize)>> = BTreeMap::new();
            for (uid, (jti, exp, serial, idx)) in &records {
                compact.record(0, uid, jti, *exp, *serial, *idx);
                plain.entry(uid.clone()).or_default().push((jti.clone(), *exp, serial.to_string(), *idx));
            }
            let text = serde_json::to_string(compact.shard(0)).unwrap();
            prop_assert_eq!(&text, &serde_json::to_string(&plain).unwrap());
            let read: Shard = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(&read, compact.shard(0));
            for (uid, held) in &plain {
                let got: Vec<(String, i64, String, usize)> = compact
                    .held(uid)
                    .map(|h| (h.jti(), h.exp(), h.serial().to_string(), h.idx()))
                    .collect();
                prop_assert_eq!(&got, held);
                for (jti, ..) in held {
                    prop_assert!(compact.held(uid).any(|h| h.is(jti)));
                }
            }
        }
    }
}

//! The IETF Token Status List (draft-ietf-oauth-status-list-20) for revocation: the pure core, no
//! I/O and no clock (every time is a Unix-seconds argument).
//!
//! # The format
//!
//! - A **Status List** (§4) is a byte array holding one `bits`-wide status per token, `bits` ∈ {1, 2,
//!   4, 8}; index 0 sits in the least significant bits of byte 0 (§4.1 step 3). It travels as the
//!   JSON object `{"bits": 2, "lst": …}` (§4.2), `lst` being base64url without padding of the array
//!   compressed with DEFLATE (RFC 1951) in the ZLIB format (RFC 1950), at the highest level (§4.1).
//! - **Status Types** (§7.1): `0x00` VALID, `0x01` INVALID, `0x02` SUSPENDED. SUSPENDED does not fit
//!   in one bit, so our lists use 2 bits per token (`0x03` is application-specific; we never set it).
//! - A **Referenced Token** (§6.2) carries `"status": {"status_list": {"idx": N, "uri": "<list>"}}`.
//! - The **Status List Token** (§5.1) is a JWT with header `typ: statuslist+jwt` and claims `sub` (the
//!   list's uri, equal to the referenced token's `uri`), `iat`, `exp` (recommended), `ttl`
//!   (recommended, positive seconds a verifier may cache it) and `status_list`.
//!
//! A verifier must reject a token whose index is outside the list (§8.3 step 6), so a list has to
//! cover an index *before* the token holding it is handed out. Our lists therefore have a fixed
//! capacity from the start; the unused entries are VALID, which compresses to almost nothing and
//! hides how many tokens were issued (§13.3, "Default Values and Double Allocation").
//!
//! # The allocator: lists per expiry bucket, never reusing a `(uri, idx)`
//!
//! Reusing an index while a token holding it may still be valid would either resurrect a revoked
//! token (the slot is reset to VALID for its new owner) or revoke an innocent one. The draft
//! requires preventing unintended double allocation and recommends preventing it altogether
//! (§13.3). [`Registry`] never reuses a pair:
//!
//! - A token goes into a list of the **bucket of its `exp`** (`bucket_secs` wide, default 1 h); a list
//!   records `expires_by`, the bucket's end, so every token in it has `exp < expires_by`. Indices are
//!   handed out in order; a full list is followed by a new list (a new shard) for the same bucket.
//! - A list is **dropped whole** once `now >= expires_by + grace_secs`: every token in it has then
//!   expired even for a verifier whose clock or leeway is `grace_secs` behind. Its revocations stay
//!   set until then, and nothing of it is kept afterwards.
//! - Every list gets a **new uri** `<base_uri>/<serial>` from a persisted counter that only grows, so a
//!   uri (and therefore a `(uri, idx)` pair) is never handed out twice, whatever the clocks do.
//!   `base_uri` should include something unique to this registry's stored state (e.g. the uid of the
//!   Secret it is persisted in), so that a lost state can never restart the serials under old uris.
//! - Indices are **reserved in blocks** (`reserve_block`): [`Allocation::persist_before_use`] says when
//!   the state must be persisted before the token is handed out. After a crash the registry restarts
//!   from the reserved mark, skipping at most a block per list and never handing out an index twice,
//!   while the operator writes its state once per block rather than once per token.
//!
//! **Lineages.** Each token the operator mints gets `lineage_entries` more entries right after its
//! own (7 by default: 8 entries, 2 bytes, a token), at a multiple of the list's `stride`, and its
//! `lineage` claim names them ([`LineageEntries`]). A token exchanged from it (RFC 8693), at any
//! depth, takes one of them as its own entry. Revoking, suspending or reinstating a token's own
//! entry does the same to its lineage's in the same change ([`Registry::revoke`]), so the whole
//! lineage follows its root in one publish, with nothing recorded per exchanged token: the lineage
//! entries are reserved, persisted and never handed out again together with the root's. A lineage
//! entry revoked on its own stays revoked when its root is reinstated. Each list records its
//! `stride`, so lists written before lineages (one entry a token) read back as they were.
//!
//! Why buckets by expiry rather than lists per issuance epoch: a list then lives exactly as long as
//! its tokens (plus the grace), whatever their lifetimes (1 min or 24 h) — an issuance-epoch list would
//! live as long as its longest-lived token. Why not one ring with per-slot expiry: it would keep an
//! `exp` per slot (8 bytes per live token where a list needs 2 bits), reuse `(uri, idx)` pairs that
//! verifiers may still hold in cached lists, and make verifiers' cached copies lie about a reused slot.
//!
//! **Capacity follows demand.** A list exists only while `now < expires_by + grace` and `expires_by
//! <= now + max_token_lifetime + bucket`, so at most `(max_token_lifetime + grace) / bucket + 2`
//! buckets are live, each with `ceil(tokens in the bucket / capacity)` shards: a new list opens
//! whenever the open ones of a bucket are full, and retires whole once all its tokens expired. The
//! only cap is `max_lists`, a safety limit on memory and on the one Secret and ConfigMap the lists
//! are kept in (default [`DEFAULT_MAX_LISTS`]); past it allocation fails closed
//! ([`RegistryError::Full`]). What one tenant may take is bounded apart from it, per namespace
//! ([`budget`]). **Cost**: an entry is 2 bits, a token's 8 entries 2 bytes (a default list of
//! 32,768 tokens holds 64 KiB in memory); persisted, a list is its base64 compressed `lst` (≈ 110
//! characters with no revocations, a few bytes per revocation, ≈ 12,000 for a default list full of
//! random statuses) plus ~100 bytes, and published it is a signed Status List Token of ≈ 0.7 KB
//! when sparse. 64 lists full of random statuses persist in 0.79 MB (measured: 787,793 bytes; 0.85
//! MB with one token in 64 having an exchanged token revoked alone; a Secret holds 1 MiB);
//! realistic loads persist in a few KB (`state_stays_small_for_realistic_loads`), and `max_lists`
//! sparse lists (1,024: 64 MiB of memory when all are full, 32 Mi tokens) about 220 KB persisted
//! and 0.7 MB published. A state or ConfigMap that would not fit its object is refused, not
//! written (fail closed).
//!
//! **Cost of a revocation.** [`Registry::revoke`] finds the list by uri in a map of at most
//! `max_lists` entries and sets two bits: it does not depend on how many tokens are revoked. Encoding
//! a list for publication is linear in its fixed capacity, not in its revocations.
//!
//! # What the operator does with it
//!
//! 1. Keep the [`RegistryState`] (serde JSON) in a Secret in its own namespace; refuse to start when it
//!    is unreadable (an empty registry would forget revocations and restart serials).
//! 2. Issue: [`Registry::allocate`] with the token's `exp`; if `persist_before_use`, persist the state
//!    first; make sure the list at `status_ref.uri` is published; then put
//!    [`TokenStatusRef::status_claim`] into the token's `status` claim and
//!    [`Registry::lineage_of`] into its `lineage` claim, sign it and write the Secret.
//! 3. Revoke: [`Registry::revoke`], persist, publish the list (sign [`status_list_claims`] with
//!    `typ` [`STATUS_LIST_TYP`]), then delete the token Secret — fail closed, as today.
//! 4. Periodically: [`Registry::prune`] (unpublish the uris it returns, persist) and re-sign every list
//!    in [`Registry::lists`] before its Status List Token's `exp`.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU64;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use miniz_oxide::deflate::compress_to_vec_zlib;
use miniz_oxide::inflate::{TINFLStatus, decompress_to_vec_zlib_with_limit};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};

pub mod budget;

/// JWT `typ` of a Status List Token (§5.1); keeps it from being taken for an access token.
pub const STATUS_LIST_TYP: &str = "statuslist+jwt";

/// Bits per token in the lists we issue: enough for VALID, INVALID and SUSPENDED.
pub const BITS: u8 = 2;

/// Largest decompressed list [`StatusList::from_claim`] accepts (4 MiB: 16 Mi 2-bit entries, 16×
/// the draft's largest test vector). DEFLATE expands up to ~1000:1, so without a limit a few KiB
/// of `lst` could demand gigabytes.
pub const MAX_LIST_BYTES: usize = 1 << 22;

/// miniz_oxide's highest level: the draft recommends the highest compression available (§4.1).
const COMPRESSION_LEVEL: u8 = 10;

/// The registered Status Types (§7.1), with their values in the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// The token is valid (if it is otherwise valid: its `exp` still rules).
    Valid = 0x00,
    /// Revoked: final, never set back.
    Invalid = 0x01,
    /// Temporarily invalid.
    Suspended = 0x02,
}

impl Status {
    /// The value stored in the list.
    pub const fn value(self) -> u8 {
        self as u8
    }

    /// The registered Status Type of `value`, if it is one.
    pub const fn from_value(value: u8) -> Option<Self> {
        match value {
            0x00 => Some(Self::Valid),
            0x01 => Some(Self::Invalid),
            0x02 => Some(Self::Suspended),
            _ => None,
        }
    }
}

/// Why a Status List could not be read or changed. Static reasons only: the input may come from
/// elsewhere and messages end up in logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusListError {
    #[error("status_list must be an object with an integer `bits` and a string `lst`")]
    Malformed,
    #[error("bits must be 1, 2, 4 or 8")]
    UnsupportedBits,
    #[error("lst is not base64url without padding")]
    BadBase64,
    #[error("lst is not a ZLIB (RFC 1950) stream")]
    BadZlib,
    #[error("the status list is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("index {idx} is outside the list of {len} entries")]
    IndexOutOfRange { idx: usize, len: usize },
    #[error("status value {0:#04x} is not a registered Status Type")]
    UnregisteredStatus(u8),
    #[error("the status does not fit in {0} bits")]
    StatusTooWide(u8),
}

/// A Status List: `bits`-wide statuses packed into bytes, index 0 in the low bits of byte 0 (§4.1).
/// Lists we create have 2 bits per entry; decoded ones may have any of the draft's widths.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusList {
    bits: u8,
    bytes: Vec<u8>,
}

impl StatusList {
    /// An all-VALID 2-bit list of at least `capacity` entries, rounded up to whole bytes (the size a
    /// verifier sees anyway, and what the draft recommends, §13.4).
    pub fn new(capacity: usize) -> Self {
        Self {
            bits: BITS,
            bytes: vec![0; capacity.div_ceil(per_byte(BITS))],
        }
    }

    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Number of entries: every index below it is covered.
    pub fn len(&self) -> usize {
        self.bytes.len() * per_byte(self.bits)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The raw value at `idx` (which may be an unregistered one in a list we did not write).
    pub fn value(&self, idx: usize) -> Option<u8> {
        let (byte, shift) = self.locate(idx)?;
        Some((self.bytes[byte] >> shift) & self.mask())
    }

    /// The Status Type at `idx`. Out of range is an error, as the draft requires verifiers to
    /// reject such a token (§8.3).
    pub fn get(&self, idx: usize) -> Result<Status, StatusListError> {
        let value = self.value(idx).ok_or_else(|| self.out_of_range(idx))?;
        Status::from_value(value).ok_or(StatusListError::UnregisteredStatus(value))
    }

    /// Sets the status at `idx`, leaving every other entry as it was.
    pub fn set(&mut self, idx: usize, status: Status) -> Result<(), StatusListError> {
        let (value, mask) = (status.value(), self.mask());
        if value > mask {
            return Err(StatusListError::StatusTooWide(self.bits));
        }
        let (byte, shift) = self.locate(idx).ok_or_else(|| self.out_of_range(idx))?;
        let b = &mut self.bytes[byte];
        *b = (*b & !(mask << shift)) | (value << shift);
        Ok(())
    }

    /// The `status_list` claim `{"bits", "lst"}` (§4.2). Deterministic: equal lists encode equally,
    /// so an unchanged list never needs re-publishing.
    pub fn to_claim(&self) -> Value {
        let compressed = compress_to_vec_zlib(&self.bytes, COMPRESSION_LEVEL);
        json!({"bits": self.bits, "lst": URL_SAFE_NO_PAD.encode(compressed)})
    }

    /// Reads a `status_list` claim, decompressing at most [`MAX_LIST_BYTES`].
    pub fn from_claim(claim: &Value) -> Result<Self, StatusListError> {
        Self::from_claim_with_limit(claim, MAX_LIST_BYTES)
    }

    /// Reads a `status_list` claim, refusing a list larger than `max_bytes` once decompressed.
    pub fn from_claim_with_limit(claim: &Value, max_bytes: usize) -> Result<Self, StatusListError> {
        let bits = claim.get("bits").and_then(Value::as_u64);
        let lst = claim.get("lst").and_then(Value::as_str);
        let (Some(bits), Some(lst)) = (bits, lst) else {
            return Err(StatusListError::Malformed);
        };
        let bits = match bits {
            1 | 2 | 4 | 8 => bits as u8,
            _ => return Err(StatusListError::UnsupportedBits),
        };
        // DEFLATE never grows data by more than a few bytes per 64 KiB block, so a longer `lst`
        // cannot decompress within the limit: refuse it before decoding it at all.
        if lst.len() / 4 * 3 > max_bytes.saturating_add(max_bytes / 1024 + 64) {
            return Err(StatusListError::TooLarge(max_bytes));
        }
        let compressed = URL_SAFE_NO_PAD
            .decode(lst)
            .map_err(|_| StatusListError::BadBase64)?;
        let bytes =
            decompress_to_vec_zlib_with_limit(&compressed, max_bytes).map_err(|e| {
                match e.status {
                    TINFLStatus::HasMoreOutput => StatusListError::TooLarge(max_bytes),
                    _ => StatusListError::BadZlib,
                }
            })?;
        Ok(Self { bits, bytes })
    }

    fn mask(&self) -> u8 {
        // bits is 1, 2, 4 or 8: the mask fits in a u8.
        ((1u16 << self.bits) - 1) as u8
    }

    /// Byte and bit shift of `idx`, if it is in the list.
    fn locate(&self, idx: usize) -> Option<(usize, u32)> {
        let per = per_byte(self.bits);
        let byte = idx / per;
        let shift = (idx % per) * usize::from(self.bits);
        (byte < self.bytes.len()).then_some((byte, shift as u32))
    }

    fn out_of_range(&self, idx: usize) -> StatusListError {
        StatusListError::IndexOutOfRange {
            idx,
            len: self.len(),
        }
    }
}

/// Entries per byte for a width of `bits`.
fn per_byte(bits: u8) -> usize {
    8 / usize::from(bits)
}

/// Summarised: a list is up to megabytes of mostly zeros.
impl fmt::Debug for StatusList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let not_valid = (0..self.len()).filter(|&i| self.value(i) != Some(0));
        f.debug_struct("StatusList")
            .field("bits", &self.bits)
            .field("len", &self.len())
            .field("not_valid", &not_valid.count())
            .finish()
    }
}

/// Persisted in its claim form: compact, and the same bytes a verifier sees.
impl Serialize for StatusList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_claim().serialize(serializer)
    }
}

/// Validated like any claim from outside, size limit included.
impl<'de> Deserialize<'de> for StatusList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let claim = Value::deserialize(deserializer)?;
        Self::from_claim(&claim).map_err(serde::de::Error::custom)
    }
}

/// The claims of a Status List Token (§5.1), to be signed with `typ` [`STATUS_LIST_TYP`]. `ttl`
/// is a `NonZeroU64` because the draft requires a positive number. Add `iss` if verifiers want it.
pub fn status_list_claims(
    uri: &str,
    list: &StatusList,
    iat: i64,
    exp: Option<i64>,
    ttl: Option<NonZeroU64>,
) -> Value {
    let mut claims = json!({"sub": uri, "iat": iat, "status_list": list.to_claim()});
    if let Some(exp) = exp {
        claims["exp"] = exp.into();
    }
    if let Some(ttl) = ttl {
        claims["ttl"] = ttl.get().into();
    }
    claims
}

/// The key of a list in the published ConfigMap (`delegation-operator-status-lists`): the last
/// segment of its uri, plus `.jwt`.
pub fn data_key(uri: &str) -> String {
    format!("{}.jwt", uri.rsplit('/').next().unwrap_or_default())
}

/// Where a token's status lives: its `status.status_list` claim (§6.2).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenStatusRef {
    pub idx: usize,
    pub uri: String,
}

impl TokenStatusRef {
    /// The value of the token's `status` claim: `{"status_list": {"idx": …, "uri": …}}`.
    pub fn status_claim(&self) -> Value {
        json!({"status_list": {"idx": self.idx, "uri": self.uri}})
    }

    /// Reads back the reference from a `status` claim (as [`status_claim`](Self::status_claim)
    /// writes it), e.g. from a token the operator verified.
    pub fn from_status_claim(status: &Value) -> Option<Self> {
        let reference = status.get("status_list")?;
        let idx = usize::try_from(reference.get("idx")?.as_u64()?).ok()?;
        let uri = reference.get("uri")?.as_str()?.to_owned();
        Some(Self { idx, uri })
    }
}

/// How the registry cuts and sizes its lists. Every setting may change between restarts: each list
/// keeps its own uri, bucket end and capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Prefix of the lists' uris (`<base_uri>/<serial>`): the URL they are published under, plus a
    /// component unique to the persisted state (see the module doc).
    pub base_uri: String,
    /// Width of an expiry bucket: tokens expiring within the same bucket share lists.
    pub bucket_secs: i64,
    /// Tokens per list. Each takes `1 + lineage_entries` entries (the list holds that many times
    /// more, rounded up to a multiple of 4).
    pub list_capacity: usize,
    /// Entries reserved right after each token's own for the tokens exchanged from it (its
    /// lineage, see [`LineageEntries`]); 0 for none.
    pub lineage_entries: usize,
    /// Indices reserved per persist.
    pub reserve_block: usize,
    /// How long a list outlives its bucket: the largest clock skew plus leeway of any verifier.
    pub grace_secs: i64,
    /// Longest token lifetime accepted: bounds how far ahead a list can live.
    pub max_token_lifetime_secs: i64,
    /// Safety limit on the number of lists (memory, and the size of the objects they are kept in);
    /// not a share anyone can fill alone (see [`budget`]).
    pub max_lists: usize,
}

/// Tokens per list by default: 32,768, with their lineage entries 256 Ki entries, 64 KiB in memory.
pub const DEFAULT_LIST_CAPACITY: usize = 1 << 15;
/// Lineage entries per token by default: with its own entry, a token takes 8 entries (2 bytes).
pub const DEFAULT_LINEAGE_ENTRIES: usize = 7;
/// The most lineage entries a token may name (a bound on what a verified claim can make us touch).
pub const MAX_LINEAGE_ENTRIES: usize = 255;
/// Lists at most by default: 32 Mi entries, 8 MiB in memory if all were full; sparse lists persist
/// and publish well within a Secret's and a ConfigMap's 1 MiB (see the module doc).
pub const DEFAULT_MAX_LISTS: usize = 1 << 10;

impl RegistryConfig {
    /// Defaults sized for the operator: 1 h buckets, [`DEFAULT_LIST_CAPACITY`] entries per list,
    /// blocks of 1,024, 5 min grace, at most [`DEFAULT_MAX_LISTS`] lists.
    pub fn new(base_uri: impl Into<String>, max_token_lifetime_secs: i64) -> Self {
        Self {
            base_uri: base_uri.into(),
            bucket_secs: 3600,
            list_capacity: DEFAULT_LIST_CAPACITY,
            lineage_entries: DEFAULT_LINEAGE_ENTRIES,
            reserve_block: 1 << 10,
            grace_secs: 300,
            max_token_lifetime_secs,
            max_lists: DEFAULT_MAX_LISTS,
        }
    }

    /// Entries each token takes in lists opened now: its own and its lineage's.
    fn stride(&self) -> usize {
        1 + self.lineage_entries
    }

    fn validate(&self) -> Result<(), RegistryError> {
        let checks = [
            (!self.base_uri.is_empty(), "base_uri is empty"),
            (self.bucket_secs > 0, "bucket_secs must be positive"),
            (self.list_capacity > 0, "list_capacity must be positive"),
            (
                self.lineage_entries <= MAX_LINEAGE_ENTRIES,
                "lineage_entries is larger than MAX_LINEAGE_ENTRIES",
            ),
            (
                self.list_capacity
                    .checked_mul(self.stride())
                    .is_some_and(|entries| entries <= MAX_LIST_BYTES * 4),
                "list_capacity times the entries per token exceeds MAX_LIST_BYTES",
            ),
            (self.reserve_block > 0, "reserve_block must be positive"),
            (self.grace_secs >= 0, "grace_secs must not be negative"),
            (
                self.max_token_lifetime_secs > 0,
                "max_token_lifetime_secs must be positive",
            ),
            (self.max_lists > 0, "max_lists must be positive"),
        ];
        match checks.into_iter().find(|(ok, _)| !ok) {
            Some((_, reason)) => Err(RegistryError::InvalidConfig(reason)),
            None => Ok(()),
        }
    }
}

/// Why the registry refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid status list configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("stored status list state is invalid: {0}")]
    InvalidState(&'static str),
    #[error("the token would already be expired (exp <= now)")]
    AlreadyExpired,
    #[error("the token lifetime exceeds the maximum the status lists are sized for")]
    LifetimeTooLong,
    #[error(
        "all {0} status lists are in use (the safety limit); they free up as their tokens expire"
    )]
    Full(usize),
    #[error("no status list with this uri: it was retired (all its tokens expired) or is not ours")]
    UnknownList,
    #[error("index {0} was never handed out in this status list")]
    NotAllocated(usize),
    #[error("the token is revoked; a revocation is never undone")]
    Revoked,
}

/// A status reference just handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "the state may have to be persisted before the index is used"]
pub struct Allocation {
    pub status_ref: TokenStatusRef,
    /// A new block was reserved: persist [`Registry::state`] before handing out the token, or a
    /// restart could hand out the same index again.
    pub persist_before_use: bool,
}

/// One list: its tokens all expire before `expires_by`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IssuedList {
    expires_by: i64,
    /// Indices `[0, reserved)` may have been handed out; a restart continues from here.
    reserved: usize,
    statuses: StatusList,
    /// Entries per token: a token's own at a multiple of `stride`, followed by its `stride - 1`
    /// lineage entries. Absent (1) in lists written before lineages existed.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    stride: usize,
    /// Indices `[0, handed_out)` were handed out by this process. Never persisted: after a
    /// restart it starts at `reserved`.
    #[serde(skip)]
    handed_out: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl IssuedList {
    fn has_room(&self) -> bool {
        self.handed_out
            .checked_add(self.stride)
            .is_some_and(|end| end <= self.statuses.len())
    }

    /// The lineage entries of the token whose own entry is `idx`, if `idx` is a token's own entry
    /// in a list with lineages.
    fn lineage_of(&self, idx: usize) -> Option<LineageEntries> {
        (self.stride > 1 && idx.is_multiple_of(self.stride)).then(|| LineageEntries {
            first: idx + 1,
            count: self.stride - 1,
        })
    }
}

/// The entries reserved for the lineage of one token (a grant's): every token exchanged from it,
/// at any depth, takes one of them as its own status entry, in the same list. Revoking or
/// suspending the token does the same to all of them in the same change, so the whole lineage
/// follows its root in one publish with no record of the exchanged tokens; revoking one of these
/// entries revokes only the exchanged tokens holding it. Tokens carry it as their `lineage` claim,
/// `{"first": N, "count": K}`: entries `[first, first + count)` of the list of their `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineageEntries {
    pub first: usize,
    pub count: usize,
}

impl LineageEntries {
    /// Whether `idx` is one of these entries.
    pub fn contains(&self, idx: usize) -> bool {
        idx >= self.first && idx - self.first < self.count
    }

    /// The entry an exchanged token with this `seed` (e.g. a hash of its id) takes: spread evenly,
    /// so that revoking one exchanged token on its own revokes as few siblings as possible.
    pub fn entry_for(&self, seed: u64) -> Option<usize> {
        let count = u64::try_from(self.count).ok().filter(|c| *c > 0)?;
        let offset = usize::try_from(seed % count).ok()?;
        self.first.checked_add(offset)
    }

    /// Whether a token whose own entry is `idx` may carry this lineage: it is the lineage's root
    /// (the entry right before it) or one of its entries, and the lineage is not larger than any
    /// we hand out.
    pub fn admits(&self, idx: usize) -> bool {
        self.count > 0
            && self.count <= MAX_LINEAGE_ENTRIES
            && self.first.checked_add(self.count).is_some()
            && (idx.checked_add(1) == Some(self.first) || self.contains(idx))
    }
}

/// What the operator persists: the serial counter and the live lists by uri.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryState {
    next_serial: u64,
    lists: BTreeMap<String, IssuedList>,
}

/// The operator's status lists and index allocator (design in the module doc).
#[derive(Clone, Debug)]
pub struct Registry {
    config: RegistryConfig,
    state: RegistryState,
}

impl Registry {
    /// An empty registry, for the very first start only (see the module doc).
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        Self::restore(config, RegistryState::default())
    }

    /// Resumes from persisted state; allocation continues after every reserved index.
    pub fn restore(
        config: RegistryConfig,
        mut state: RegistryState,
    ) -> Result<Self, RegistryError> {
        config.validate()?;
        for list in state.lists.values_mut() {
            if list.statuses.bits() != BITS {
                return Err(RegistryError::InvalidState(
                    "a list is not 2 bits per entry",
                ));
            }
            if list.reserved > list.statuses.len() {
                return Err(RegistryError::InvalidState(
                    "more reserved than the list holds",
                ));
            }
            if list.stride == 0 || list.stride > 1 + MAX_LINEAGE_ENTRIES {
                return Err(RegistryError::InvalidState(
                    "a list has an impossible number of entries per token",
                ));
            }
            // Tokens' own entries sit at multiples of the stride.
            list.handed_out = list.reserved.next_multiple_of(list.stride);
        }
        Ok(Self { config, state })
    }

    /// What to persist (serialize it with serde).
    pub fn state(&self) -> &RegistryState {
        &self.state
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Hands out a fresh `(uri, idx)` for a token expiring at `exp`, in a list that outlives it,
    /// with the lineage entries after it ([`Registry::lineage_of`]).
    pub fn allocate(&mut self, now: i64, exp: i64) -> Result<Allocation, RegistryError> {
        if exp <= now {
            return Err(RegistryError::AlreadyExpired);
        }
        match exp.checked_sub(now) {
            Some(lifetime) if lifetime <= self.config.max_token_lifetime_secs => {}
            _ => return Err(RegistryError::LifetimeTooLong),
        }
        let expires_by = bucket_end(exp, self.config.bucket_secs)?;
        let open = self
            .state
            .lists
            .iter()
            .find(|(_, list)| list.expires_by == expires_by && list.has_room())
            .map(|(uri, _)| uri.clone());
        let uri = match open {
            Some(uri) => uri,
            None => self.open_list(expires_by)?,
        };
        let block = self.config.reserve_block;
        let list = self
            .state
            .lists
            .get_mut(&uri)
            .ok_or(RegistryError::InvalidState("the chosen list is missing"))?;
        let idx = list.handed_out;
        let end = idx + list.stride; // has_room: no overflow
        list.handed_out = end;
        // The token's lineage entries must be reserved too: a restart must never hand them out.
        let persist_before_use = end > list.reserved;
        if persist_before_use {
            list.reserved = idx
                .saturating_add(block.max(list.stride))
                .next_multiple_of(list.stride)
                .min(list.statuses.len());
        }
        Ok(Allocation {
            status_ref: TokenStatusRef { idx, uri },
            persist_before_use,
        })
    }

    /// Starts a list for the bucket ending at `expires_by` under a never-used uri.
    fn open_list(&mut self, expires_by: i64) -> Result<String, RegistryError> {
        if self.state.lists.len() >= self.config.max_lists {
            return Err(RegistryError::Full(self.config.max_lists));
        }
        let base = self.config.base_uri.trim_end_matches('/');
        let uri = loop {
            let serial = self.state.next_serial;
            self.state.next_serial = serial
                .checked_add(1)
                .ok_or(RegistryError::InvalidState("list serials are exhausted"))?;
            let uri = format!("{base}/{serial}");
            // Only a changed base_uri could collide; skipping keeps uris unique regardless.
            if !self.state.lists.contains_key(&uri) {
                break uri;
            }
        };
        let stride = self.config.stride();
        let list = IssuedList {
            expires_by,
            reserved: 0,
            // No overflow: validated.
            statuses: StatusList::new(self.config.list_capacity * stride),
            stride,
            handed_out: 0,
        };
        self.state.lists.insert(uri.clone(), list);
        Ok(uri)
    }

    /// The current status of a handed-out reference.
    pub fn status(&self, status_ref: &TokenStatusRef) -> Result<Status, RegistryError> {
        let list = self
            .state
            .lists
            .get(&status_ref.uri)
            .ok_or(RegistryError::UnknownList)?;
        if status_ref.idx >= list.handed_out {
            return Err(RegistryError::NotAllocated(status_ref.idx));
        }
        list.statuses
            .get(status_ref.idx)
            .map_err(|_| RegistryError::InvalidState("a list holds an unregistered status"))
    }

    /// The lineage entries of the token whose entry is `status_ref`, if it has any (it is a token's
    /// own entry, handed out in a list with lineages).
    pub fn lineage_of(&self, status_ref: &TokenStatusRef) -> Option<LineageEntries> {
        let list = self.state.lists.get(&status_ref.uri)?;
        (status_ref.idx < list.handed_out)
            .then(|| list.lineage_of(status_ref.idx))
            .flatten()
    }

    /// Marks the token INVALID for good, and with it its lineage (every token exchanged from it).
    /// An entry of a lineage is revoked alone. Returns whether anything changed (persist and
    /// republish if so). [`RegistryError::UnknownList`] for a retired list means the token has
    /// expired.
    pub fn revoke(&mut self, status_ref: &TokenStatusRef) -> Result<bool, RegistryError> {
        self.change(status_ref, |_| Ok(Status::Invalid))
    }

    /// Marks a VALID token SUSPENDED, and its lineage's VALID entries; a revoked one stays revoked.
    /// Returns whether anything changed.
    pub fn suspend(&mut self, status_ref: &TokenStatusRef) -> Result<bool, RegistryError> {
        self.change(status_ref, |current| {
            Ok(match current {
                Status::Valid | Status::Suspended => Status::Suspended,
                Status::Invalid => Status::Invalid,
            })
        })
    }

    /// Makes a SUSPENDED token VALID again, and its lineage's SUSPENDED entries (one revoked on its
    /// own stays revoked). Refuses a revoked token: that would resurrect it.
    pub fn reinstate(&mut self, status_ref: &TokenStatusRef) -> Result<bool, RegistryError> {
        self.change(status_ref, |current| match current {
            Status::Invalid => Err(RegistryError::Revoked),
            Status::Valid | Status::Suspended => Ok(Status::Valid),
        })
    }

    /// Applies `next` to the entry, then to each of its lineage entries (where `next` refuses, an
    /// entry of the lineage keeps its status: one revoked on its own is never reinstated).
    fn change(
        &mut self,
        status_ref: &TokenStatusRef,
        next: impl Fn(Status) -> Result<Status, RegistryError>,
    ) -> Result<bool, RegistryError> {
        let current = self.status(status_ref)?;
        let wanted = next(current)?;
        let lineage = self.lineage_of(status_ref);
        let list = self
            .state
            .lists
            .get_mut(&status_ref.uri)
            .ok_or(RegistryError::UnknownList)?;
        let mut changed = false;
        if wanted != current {
            list.statuses
                .set(status_ref.idx, wanted)
                .map_err(|_| RegistryError::InvalidState("a list cannot hold the status"))?;
            changed = true;
        }
        for idx in lineage.iter().flat_map(|l| l.first..l.first + l.count) {
            let current = list
                .statuses
                .get(idx)
                .map_err(|_| RegistryError::InvalidState("a list holds an unregistered status"))?;
            match next(current) {
                Ok(wanted) if wanted != current => {
                    list.statuses.set(idx, wanted).map_err(|_| {
                        RegistryError::InvalidState("a list cannot hold the status")
                    })?;
                    changed = true;
                }
                _ => {}
            }
        }
        Ok(changed)
    }

    /// Drops every list whose tokens have all expired, grace included, and returns their uris (to
    /// unpublish). Revocations in the remaining lists are kept.
    pub fn prune(&mut self, now: i64) -> Vec<String> {
        let grace = self.config.grace_secs;
        let retired: Vec<String> = self
            .state
            .lists
            .iter()
            .filter(|(_, list)| now >= list.expires_by.saturating_add(grace))
            .map(|(uri, _)| uri.clone())
            .collect();
        for uri in &retired {
            self.state.lists.remove(uri);
        }
        retired
    }

    /// Every live list with its uri, to publish as Status List Tokens.
    pub fn lists(&self) -> impl Iterator<Item = (&str, &StatusList)> {
        self.state
            .lists
            .iter()
            .map(|(uri, list)| (uri.as_str(), &list.statuses))
    }

    /// The list at `uri`, if it is live.
    pub fn list(&self, uri: &str) -> Option<&StatusList> {
        self.state.lists.get(uri).map(|list| &list.statuses)
    }

    /// When the list at `uri` retires (every token in it expired, grace included): until then its
    /// entries hold capacity.
    pub fn retires_at(&self, uri: &str) -> Option<i64> {
        let list = self.state.lists.get(uri)?;
        Some(list.expires_by.saturating_add(self.config.grace_secs))
    }

    /// How much of the capacity is in use, in tokens (each with its lineage entries).
    pub fn usage(&self) -> Usage {
        let lists = self.state.lists.values();
        Usage {
            lists: self.state.lists.len(),
            allocated: lists.clone().map(|l| l.handed_out / l.stride).sum(),
            in_lists: lists.map(|l| l.statuses.len() / l.stride).sum(),
            limit: self
                .config
                .max_lists
                .saturating_mul(self.config.list_capacity),
        }
    }
}

/// The registry's use of its capacity, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Live lists.
    pub lists: usize,
    /// Tokens' entries handed out (or skipped after a restart) in live lists: never handed out
    /// again. Counted per token: a token's lineage entries come with it.
    pub allocated: usize,
    /// Tokens the live lists hold, handed out or not.
    pub in_lists: usize,
    /// Tokens the safety limit allows: `max_lists` lists of the configured capacity.
    pub limit: usize,
}

/// End of the `bucket_secs`-wide bucket holding `exp`: the first second after it.
fn bucket_end(exp: i64, bucket_secs: i64) -> Result<i64, RegistryError> {
    exp.div_euclid(bucket_secs)
        .checked_add(1)
        .and_then(|k| k.checked_mul(bucket_secs))
        .ok_or(RegistryError::LifetimeTooLong)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    const T0: i64 = 1_800_000_000;
    const BASE_URI: &str = "https://delegation-operator.delegation-system.svc/statuslists/6f1c2d3e-9a8b-4c7d-8e6f-5a4b3c2d1e0f";

    /// Draft -20, §4.1 / §4.2: the 1-bit example (16 entries) and the 2-bit example (12 entries).
    const DRAFT_1BIT_LST: &str = "eNrbuRgAAhcBXQ";
    const DRAFT_2BIT_LST: &str = "eNo76fITAAPfAgc";

    /// Draft -20, Appendix "Test vectors", 2-bit Status List of 2^20 entries.
    const DRAFT_2BIT_LONG_LST: &str = concat!(
        "eNrt2zENACEQAEEuoaBABP5VIO01fCjIHTMStt9ovGVIAAAAAABAbiEBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAEB5",
        "WwIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAID0",
        "ugQAAAAAAAAAAAAAAAAAQG12SgAAAAAAAAAAAAAAAAAAAAAAAAAAAOCSIQEAAAAAAAAAAAAAAAAAAAAAAAD8ExIAAAAAAAAAAAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAAAwJEuAQAAAAAAAAAAAAAAAAAAAAAAAMB9SwIAAAAAAAAAAAAAAAAAAACoYUoAAAAAAAAAAAAAAEBqH81gAQw",
    );
    const DRAFT_2BIT_LONG_SET: [(usize, u8); 11] = [
        (0, 0b01),
        (1993, 0b10),
        (25460, 0b01),
        (159495, 0b11),
        (495669, 0b01),
        (554353, 0b01),
        (645645, 0b10),
        (723232, 0b01),
        (854545, 0b01),
        (934534, 0b10),
        (1000345, 0b11),
    ];

    fn claim(bits: u8, lst: &str) -> Value {
        json!({"bits": bits, "lst": lst})
    }

    fn lst(list: &StatusList) -> String {
        list.to_claim()["lst"].as_str().unwrap().to_owned()
    }

    fn from_statuses(capacity: usize, set: &[(usize, Status)]) -> StatusList {
        let mut list = StatusList::new(capacity);
        for &(idx, status) in set {
            list.set(idx, status).unwrap();
        }
        list
    }

    #[test]
    fn status_types_have_the_drafts_values() {
        assert_eq!(Status::Valid.value(), 0x00);
        assert_eq!(Status::Invalid.value(), 0x01);
        assert_eq!(Status::Suspended.value(), 0x02);
        for status in [Status::Valid, Status::Invalid, Status::Suspended] {
            assert_eq!(Status::from_value(status.value()), Some(status));
        }
        assert_eq!(Status::from_value(0x03), None);
    }

    #[test]
    fn drafts_small_examples_decode_and_encode_byte_for_byte() {
        // 1 bit: statuses 1,0,0,1,1,1,0,1 | 1,1,0,0,0,1,0,1 = bytes 0xB9 0xA3.
        let one = StatusList::from_claim(&claim(1, DRAFT_1BIT_LST)).unwrap();
        let expected = [1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1];
        assert_eq!(one.len(), 16);
        assert_eq!(
            (0..16).map(|i| one.value(i).unwrap()).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(one.bytes, [0xB9, 0xA3]);
        assert_eq!(lst(&one), DRAFT_1BIT_LST);

        // 2 bits: bytes 0xC9 0x44 0xF9, including the application-specific value 0b11.
        let two = StatusList::from_claim(&claim(2, DRAFT_2BIT_LST)).unwrap();
        let expected = [1, 2, 0, 3, 0, 1, 0, 1, 1, 2, 3, 3];
        assert_eq!(
            (0..12).map(|i| two.value(i).unwrap()).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(two.bytes, [0xC9, 0x44, 0xF9]);
        assert_eq!(lst(&two), DRAFT_2BIT_LST);
        assert_eq!(two.get(3), Err(StatusListError::UnregisteredStatus(3)));

        // The same 2-bit list built through our own API, registered values only.
        let ours = from_statuses(12, &[(0, Status::Invalid), (1, Status::Suspended)]);
        assert_eq!(
            ours.bytes[0], 0b0000_1001,
            "index 0 is in the least significant bits"
        );
    }

    #[test]
    fn drafts_long_two_bit_vector_decodes() {
        let list = StatusList::from_claim(&claim(2, DRAFT_2BIT_LONG_LST)).unwrap();
        assert_eq!(list.len(), 1 << 20, "the test vectors are 2^20 entries");
        let set: HashMap<usize, u8> = DRAFT_2BIT_LONG_SET.into_iter().collect();
        for idx in 0..list.len() {
            assert_eq!(
                list.value(idx),
                Some(set.get(&idx).copied().unwrap_or(0)),
                "{idx}"
            );
        }
        // Our encoding of it decodes to the same list (compressors may differ in bytes).
        assert_eq!(StatusList::from_claim(&list.to_claim()).unwrap(), list);
    }

    #[test]
    fn errors_for_out_of_range_and_too_wide_statuses() {
        let mut list = StatusList::new(5);
        assert_eq!(list.len(), 8, "rounded up to whole bytes");
        let out = StatusListError::IndexOutOfRange { idx: 8, len: 8 };
        assert_eq!(list.get(8), Err(out.clone()));
        assert_eq!(list.set(8, Status::Invalid), Err(out));
        assert_eq!(list.value(usize::MAX), None);

        let mut one_bit = StatusList::from_claim(&claim(1, DRAFT_1BIT_LST)).unwrap();
        assert_eq!(
            one_bit.set(0, Status::Suspended),
            Err(StatusListError::StatusTooWide(1))
        );
        one_bit.set(0, Status::Valid).unwrap();
        assert_eq!(one_bit.value(0), Some(0));
        list.set(7, Status::Suspended).unwrap();
        assert_eq!(
            format!("{list:?}"),
            "StatusList { bits: 2, len: 8, not_valid: 1 }"
        );
    }

    #[test]
    fn from_claim_rejects_malformed_claims() {
        use StatusListError as E;
        let good = lst(&StatusList::new(64));
        let raw_deflate = URL_SAFE_NO_PAD.encode(miniz_oxide::deflate::compress_to_vec(&[0; 4], 9));
        let mut bad_adler = compress_to_vec_zlib(&[7; 16], 9);
        *bad_adler.last_mut().unwrap() ^= 1;
        let cases = [
            (json!({"lst": good}), E::Malformed),
            (json!({"bits": 2}), E::Malformed),
            (json!({"bits": "2", "lst": good}), E::Malformed),
            (json!({"bits": 2.5, "lst": good}), E::Malformed),
            (json!({"bits": -2, "lst": good}), E::Malformed),
            (json!({"bits": 2, "lst": 5}), E::Malformed),
            (json!([2, good]), E::Malformed),
            (json!({"bits": 0, "lst": good}), E::UnsupportedBits),
            (json!({"bits": 3, "lst": good}), E::UnsupportedBits),
            (json!({"bits": 16, "lst": good}), E::UnsupportedBits),
            (json!({"bits": 2, "lst": format!("{good}=")}), E::BadBase64),
            (
                json!({"bits": 2, "lst": format!("+{}", &good[1..])}),
                E::BadBase64,
            ),
            (json!({"bits": 2, "lst": "e"}), E::BadBase64),
            (json!({"bits": 2, "lst": ""}), E::BadZlib),
            (json!({"bits": 2, "lst": "AAAA"}), E::BadZlib),
            (json!({"bits": 2, "lst": raw_deflate}), E::BadZlib),
            (
                json!({"bits": 2, "lst": &good[..good.len() - 4]}),
                E::BadZlib,
            ),
            (
                json!({"bits": 2, "lst": URL_SAFE_NO_PAD.encode(bad_adler)}),
                E::BadZlib,
            ),
        ];
        for (claim, error) in cases {
            assert_eq!(StatusList::from_claim(&claim), Err(error), "{claim}");
        }
    }

    #[test]
    fn decompression_bombs_are_refused_at_the_limit() {
        // 16 MiB of zeros compress to ~16 KiB: refused without inflating past the limit.
        let bomb = compress_to_vec_zlib(&vec![0u8; 16 << 20], 10);
        assert!(bomb.len() < 100 << 10, "{}", bomb.len());
        let bomb = claim(2, &URL_SAFE_NO_PAD.encode(bomb));
        assert_eq!(
            StatusList::from_claim(&bomb),
            Err(StatusListError::TooLarge(MAX_LIST_BYTES))
        );

        // Exactly at the limit is fine, one byte over is not.
        let at_limit = claim(
            2,
            &URL_SAFE_NO_PAD.encode(compress_to_vec_zlib(&[0; 4096], 10)),
        );
        assert_eq!(
            StatusList::from_claim_with_limit(&at_limit, 4096)
                .unwrap()
                .len(),
            16384
        );
        assert_eq!(
            StatusList::from_claim_with_limit(&at_limit, 4095),
            Err(StatusListError::TooLarge(4095))
        );
        // A string too long to fit is refused before decoding.
        let long = claim(2, &"A".repeat(8000));
        assert_eq!(
            StatusList::from_claim_with_limit(&long, 4096),
            Err(StatusListError::TooLarge(4096))
        );
    }

    #[test]
    fn encoding_is_deterministic_whatever_the_order_of_changes() {
        let a = from_statuses(4096, &[(5, Status::Invalid), (900, Status::Suspended)]);
        let b = from_statuses(
            4096,
            &[
                (900, Status::Invalid),
                (900, Status::Suspended),
                (5, Status::Invalid),
            ],
        );
        assert_eq!(a, b);
        assert_eq!(a.to_claim(), b.to_claim());
        assert_eq!(a.to_claim(), a.clone().to_claim());
    }

    #[test]
    fn list_serde_is_its_claim_and_is_validated() {
        let list = from_statuses(100, &[(99, Status::Invalid)]);
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json, list.to_claim());
        assert_eq!(serde_json::from_value::<StatusList>(json).unwrap(), list);
        assert!(serde_json::from_value::<StatusList>(json!({"bits": 3, "lst": "x"})).is_err());
    }

    #[test]
    fn status_list_token_claims_follow_the_draft() {
        let list = from_statuses(16, &[(3, Status::Invalid)]);
        let uri = "https://operator.example/statuslists/r1/7";
        let claims = status_list_claims(uri, &list, 1000, Some(1600), NonZeroU64::new(300));
        assert_eq!(
            claims,
            json!({"sub": uri, "iat": 1000, "exp": 1600, "ttl": 300, "status_list": list.to_claim()})
        );
        let bare = status_list_claims(uri, &list, 1000, None, None);
        assert_eq!(
            bare,
            json!({"sub": uri, "iat": 1000, "status_list": list.to_claim()})
        );
    }

    #[test]
    fn status_claim_round_trips() {
        let r = TokenStatusRef {
            idx: 42,
            uri: "https://x/statuslists/r/3".into(),
        };
        let claim = r.status_claim();
        assert_eq!(
            claim,
            json!({"status_list": {"idx": 42, "uri": "https://x/statuslists/r/3"}})
        );
        assert_eq!(TokenStatusRef::from_status_claim(&claim), Some(r));
        assert_eq!(
            TokenStatusRef::from_status_claim(&json!({"status_list": {"idx": -1, "uri": "u"}})),
            None
        );
        assert_eq!(
            TokenStatusRef::from_status_claim(&json!({"other": {}})),
            None
        );
    }

    proptest! {
        #[test]
        fn set_then_get_returns_what_was_set_and_nothing_else_changes(
            capacity in 1usize..3000,
            writes in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3), 0..200),
        ) {
            let mut list = StatusList::new(capacity);
            let mut model: HashMap<usize, u8> = HashMap::new();
            for (idx, value) in writes {
                let idx = idx.index(list.len());
                list.set(idx, Status::from_value(value).unwrap()).unwrap();
                model.insert(idx, value);
            }
            for idx in 0..list.len() {
                let expected = model.get(&idx).copied().unwrap_or(0);
                prop_assert_eq!(list.get(idx).unwrap().value(), expected);
            }
        }

        #[test]
        fn encode_decode_round_trips(
            capacity in 0usize..20_000,
            writes in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3), 0..300),
        ) {
            let mut list = StatusList::new(capacity);
            for (idx, value) in writes {
                if !list.is_empty() {
                    let idx = idx.index(list.len());
                    list.set(idx, Status::from_value(value).unwrap()).unwrap();
                }
            }
            let claim = list.to_claim();
            prop_assert_eq!(&claim["bits"], &json!(2));
            let lst = claim["lst"].as_str().unwrap();
            prop_assert!(!lst.contains(['=', '+', '/']));
            let decoded = StatusList::from_claim(&claim).unwrap();
            prop_assert_eq!(&decoded, &list);
            prop_assert_eq!(decoded.to_claim(), claim);
        }

        #[test]
        fn any_bit_width_round_trips(
            bits in prop::sample::select(vec![1u8, 2, 4, 8]),
            bytes in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let list = StatusList { bits, bytes };
            let decoded = StatusList::from_claim(&list.to_claim()).unwrap();
            prop_assert_eq!(decoded.len(), list.bytes.len() * 8 / usize::from(bits));
            prop_assert_eq!(decoded, list);
        }
    }

    // ---------------------------------------------------------------- the registry

    fn config() -> RegistryConfig {
        RegistryConfig {
            base_uri: "https://op.example/statuslists/r1/".into(),
            bucket_secs: 60,
            list_capacity: 8,
            lineage_entries: 0,
            reserve_block: 3,
            grace_secs: 10,
            max_token_lifetime_secs: 300,
            max_lists: 1000,
        }
    }

    fn registry() -> Registry {
        Registry::new(config()).unwrap()
    }

    fn alloc(registry: &mut Registry, now: i64, exp: i64) -> TokenStatusRef {
        registry.allocate(now, exp).unwrap().status_ref
    }

    #[test]
    fn tokens_expiring_in_one_bucket_share_a_list_in_order_then_a_new_shard() {
        let mut r = registry();
        let start = T0 - T0 % 60; // a bucket boundary
        let refs: Vec<_> = (0..10)
            .map(|i| alloc(&mut r, start, start + 5 + i))
            .collect();
        let base = "https://op.example/statuslists/r1";
        for (i, status_ref) in refs.iter().take(8).enumerate() {
            assert_eq!(
                (status_ref.uri.as_str(), status_ref.idx),
                (&*format!("{base}/0"), i)
            );
        }
        assert_eq!(
            (refs[8].uri.as_str(), refs[8].idx),
            (&*format!("{base}/1"), 0),
            "full: new shard"
        );
        // A token expiring in the next bucket gets another list.
        let later = alloc(&mut r, start, start + 61);
        assert_eq!((later.uri.as_str(), later.idx), (&*format!("{base}/2"), 0));
        assert_eq!(r.lists().count(), 3);
        assert!(r.lists().all(|(_, list)| list.len() == 8));
    }

    #[test]
    fn allocation_is_refused_for_expired_too_long_lived_or_too_many_lists() {
        let mut r = registry();
        assert_eq!(r.allocate(T0, T0), Err(RegistryError::AlreadyExpired));
        assert_eq!(r.allocate(T0, T0 - 5), Err(RegistryError::AlreadyExpired));
        assert_eq!(
            r.allocate(T0, T0 + 301),
            Err(RegistryError::LifetimeTooLong)
        );
        assert_eq!(
            r.allocate(i64::MIN, i64::MAX),
            Err(RegistryError::LifetimeTooLong)
        );
        assert_eq!(
            r.allocate(i64::MAX - 10, i64::MAX),
            Err(RegistryError::LifetimeTooLong)
        );
        assert!(r.allocate(T0, T0 + 300).is_ok());

        let mut small = Registry::new(RegistryConfig {
            max_lists: 2,
            ..config()
        })
        .unwrap();
        for _ in 0..16 {
            let _ = small.allocate(T0, T0 + 30).unwrap();
        }
        assert_eq!(small.allocate(T0, T0 + 30), Err(RegistryError::Full(2)));
        let retired = small.prune(T0 + 200);
        assert_eq!(retired.len(), 2);
        assert!(
            small.allocate(T0 + 200, T0 + 230).is_ok(),
            "room again after pruning"
        );
    }

    #[test]
    fn invalid_configurations_are_refused() {
        for broken in [
            RegistryConfig {
                base_uri: String::new(),
                ..config()
            },
            RegistryConfig {
                bucket_secs: 0,
                ..config()
            },
            RegistryConfig {
                list_capacity: 0,
                ..config()
            },
            RegistryConfig {
                reserve_block: 0,
                ..config()
            },
            RegistryConfig {
                grace_secs: -1,
                ..config()
            },
            RegistryConfig {
                max_token_lifetime_secs: 0,
                ..config()
            },
            RegistryConfig {
                max_lists: 0,
                ..config()
            },
            RegistryConfig {
                lineage_entries: MAX_LINEAGE_ENTRIES + 1,
                ..config()
            },
            RegistryConfig {
                list_capacity: usize::MAX / 2,
                lineage_entries: 7,
                ..config()
            },
        ] {
            assert!(matches!(
                Registry::new(broken),
                Err(RegistryError::InvalidConfig(_))
            ));
        }
    }

    #[test]
    fn revocation_is_final_and_suspension_reversible() {
        let mut r = registry();
        let a = alloc(&mut r, T0, T0 + 100);
        let b = alloc(&mut r, T0, T0 + 100);
        assert_eq!(r.status(&a), Ok(Status::Valid));

        assert_eq!(r.suspend(&b), Ok(true));
        assert_eq!(r.suspend(&b), Ok(false));
        assert_eq!(r.status(&b), Ok(Status::Suspended));
        assert_eq!(r.reinstate(&b), Ok(true));
        assert_eq!(r.status(&b), Ok(Status::Valid));
        assert_eq!(r.reinstate(&b), Ok(false));

        assert_eq!(r.revoke(&a), Ok(true));
        assert_eq!(r.revoke(&a), Ok(false));
        assert_eq!(r.suspend(&a), Ok(false), "a revoked token stays revoked");
        assert_eq!(r.reinstate(&a), Err(RegistryError::Revoked));
        assert_eq!(r.status(&a), Ok(Status::Invalid));
        assert_eq!(r.list(&a.uri).unwrap().get(a.idx), Ok(Status::Invalid));

        let unknown = TokenStatusRef {
            idx: 0,
            uri: "https://elsewhere/1".into(),
        };
        assert_eq!(r.revoke(&unknown), Err(RegistryError::UnknownList));
        let unallocated = TokenStatusRef {
            idx: 5,
            uri: a.uri.clone(),
        };
        assert_eq!(r.revoke(&unallocated), Err(RegistryError::NotAllocated(5)));
        assert_eq!(r.status(&b), Ok(Status::Valid), "nothing else changed");
    }

    #[test]
    fn a_list_is_kept_until_its_bucket_and_grace_are_over() {
        let mut r = registry();
        let bucket_start = T0 - T0 % 60;
        let a = alloc(&mut r, bucket_start, bucket_start + 59); // bucket ends at +60
        r.revoke(&a).unwrap();
        assert!(
            r.prune(bucket_start + 69).is_empty(),
            "exp + grace not yet passed for every verifier"
        );
        assert_eq!(r.status(&a), Ok(Status::Invalid));
        assert_eq!(r.prune(bucket_start + 70), vec![a.uri.clone()]);
        assert_eq!(r.status(&a), Err(RegistryError::UnknownList));
        assert_eq!(r.lists().count(), 0);
        // The next list gets a new uri, never the retired one.
        let b = alloc(&mut r, bucket_start + 70, bucket_start + 90);
        assert_ne!(b.uri, a.uri);
    }

    #[test]
    fn persisting_at_each_reservation_is_enough_to_survive_a_restart() {
        let mut r = registry();
        let flags: Vec<bool> = (0..8)
            .map(|_| r.allocate(T0, T0 + 30).unwrap().persist_before_use)
            .collect();
        assert_eq!(flags, [true, false, false, true, false, false, true, false]);

        let mut r = registry();
        let first = r.allocate(T0, T0 + 30).unwrap();
        assert!(first.persist_before_use);
        let persisted = serde_json::to_string(r.state()).unwrap();
        let second = alloc(&mut r, T0, T0 + 30);
        // Crash: the second index was handed out without persisting, but it was reserved.
        let mut restarted =
            Registry::restore(config(), serde_json::from_str(&persisted).unwrap()).unwrap();
        let third = restarted.allocate(T0, T0 + 30).unwrap();
        assert!(third.persist_before_use);
        assert_eq!(
            (first.status_ref.idx, second.idx, third.status_ref.idx),
            (0, 1, 3)
        );
        assert_eq!(third.status_ref.uri, first.status_ref.uri);
    }

    #[test]
    fn restore_rejects_inconsistent_state() {
        let mut r = registry();
        alloc(&mut r, T0, T0 + 30);
        let mut json = serde_json::to_value(r.state()).unwrap();
        let uri = "https://op.example/statuslists/r1/0";
        assert_eq!(json["lists"][uri]["reserved"], 3);
        json["lists"][uri]["reserved"] = 9.into();
        let state = serde_json::from_value(json.clone()).unwrap();
        assert!(matches!(
            Registry::restore(config(), state),
            Err(RegistryError::InvalidState(_))
        ));

        json["lists"][uri]["reserved"] = 3.into();
        json["lists"][uri]["statuses"] = claim(1, DRAFT_1BIT_LST);
        let state = serde_json::from_value(json.clone()).unwrap();
        assert!(matches!(
            Registry::restore(config(), state),
            Err(RegistryError::InvalidState(_))
        ));

        json["lists"][uri]["statuses"] = claim(2, "not base64!");
        assert!(serde_json::from_value::<RegistryState>(json.clone()).is_err());
        json["lists"][uri]["statuses"] = claim(2, "AAAA");
        json["lists"][uri]["surprise"] = true.into();
        assert!(serde_json::from_value::<RegistryState>(json).is_err());
    }

    #[test]
    fn state_serializes_compactly_in_camel_case() {
        let mut r = registry();
        let a = alloc(&mut r, T0, T0 + 30);
        r.revoke(&a).unwrap();
        let json = serde_json::to_value(r.state()).unwrap();
        let list = &json["lists"][&a.uri];
        assert_eq!(json["nextSerial"], 1);
        assert_eq!(list["expiresBy"], (T0 + 30).div_euclid(60) * 60 + 60);
        assert_eq!(list["statuses"], r.list(&a.uri).unwrap().to_claim());
        assert!(list.get("handedOut").is_none(), "never persisted");
    }

    fn lineage_registry() -> Registry {
        Registry::new(RegistryConfig {
            lineage_entries: 3,
            ..config()
        })
        .unwrap()
    }

    fn entry(of: &TokenStatusRef, idx: usize) -> TokenStatusRef {
        TokenStatusRef {
            idx,
            uri: of.uri.clone(),
        }
    }

    #[test]
    fn each_token_gets_its_lineage_entries_right_after_its_own() {
        let mut r = lineage_registry();
        let refs: Vec<_> = (0..9).map(|_| alloc(&mut r, T0, T0 + 30)).collect();
        let own: Vec<usize> = refs.iter().map(|r| r.idx).collect();
        assert_eq!(own[..8], [0, 4, 8, 12, 16, 20, 24, 28], "a stride of 1 + 3");
        assert_eq!(
            refs[8].idx, 0,
            "8 tokens per list: the ninth opens a new one"
        );
        assert_ne!(refs[8].uri, refs[0].uri);
        assert_eq!(
            r.lineage_of(&refs[1]),
            Some(LineageEntries { first: 5, count: 3 })
        );
        assert_eq!(
            r.lineage_of(&entry(&refs[1], 5)),
            None,
            "an entry of a lineage has none"
        );
        assert_eq!(r.lineage_of(&entry(&refs[7], 32)), None, "never handed out");
        assert_eq!(r.list(&refs[0].uri).unwrap().len(), 32);
        assert_eq!(r.usage().allocated, 9, "usage counts tokens");
        // Without lineages (or in a list written before them), a token has none.
        let mut plain = registry();
        let a = alloc(&mut plain, T0, T0 + 30);
        assert_eq!(plain.lineage_of(&a), None);
    }

    #[test]
    fn a_lineage_follows_its_root_and_an_entry_can_be_revoked_alone() {
        let mut r = lineage_registry();
        let root = alloc(&mut r, T0, T0 + 30);
        let neighbour = alloc(&mut r, T0, T0 + 30);
        let lineage = r.lineage_of(&root).unwrap();
        let statuses = |r: &Registry| -> Vec<Status> {
            (0..8)
                .map(|i| r.list(&root.uri).unwrap().get(i).unwrap())
                .collect()
        };
        use Status::{Invalid as I, Suspended as S, Valid as V};

        // One exchanged token's entry revoked on its own: nothing else changes.
        assert_eq!(r.revoke(&entry(&root, lineage.first + 1)), Ok(true));
        assert_eq!(statuses(&r), [V, V, I, V, V, V, V, V]);
        // Suspending the root suspends its lineage, except what is revoked.
        assert_eq!(r.suspend(&root), Ok(true));
        assert_eq!(statuses(&r), [S, S, I, S, V, V, V, V]);
        assert_eq!(r.reinstate(&root), Ok(true));
        assert_eq!(statuses(&r), [V, V, I, V, V, V, V, V], "never resurrected");
        // Revoking the root revokes the whole lineage in the same change; the neighbour is untouched.
        assert_eq!(r.revoke(&root), Ok(true));
        assert_eq!(statuses(&r), [I, I, I, I, V, V, V, V]);
        assert_eq!(r.revoke(&root), Ok(false));
        assert_eq!(r.status(&neighbour), Ok(Status::Valid));
        assert_eq!(r.reinstate(&root), Err(RegistryError::Revoked));
    }

    #[test]
    fn a_restart_never_hands_out_a_lineage_entry_again() {
        let cfg = RegistryConfig {
            lineage_entries: 3,
            reserve_block: 6,
            ..config()
        };
        let mut r = Registry::new(cfg.clone()).unwrap();
        let first = r.allocate(T0, T0 + 30).unwrap();
        assert!(first.persist_before_use);
        let persisted = serde_json::to_string(r.state()).unwrap();
        assert!(persisted.contains(r#""stride":4"#), "{persisted}");
        let second = r.allocate(T0, T0 + 30).unwrap();
        assert!(
            !second.persist_before_use,
            "reserved with the first: 8 entries"
        );
        let mut restarted =
            Registry::restore(cfg, serde_json::from_str(&persisted).unwrap()).unwrap();
        let third = restarted.allocate(T0, T0 + 30).unwrap();
        assert!(third.persist_before_use);
        assert_eq!(third.status_ref.idx, 8, "past the second token's lineage");
        assert_eq!(
            restarted.lineage_of(&third.status_ref),
            Some(LineageEntries { first: 9, count: 3 })
        );
    }

    #[test]
    fn lists_written_before_lineages_read_back_without_them() {
        let mut r = registry();
        let a = alloc(&mut r, T0, T0 + 30);
        let json = serde_json::to_string(r.state()).unwrap();
        assert!(!json.contains("stride"), "{json}");
        // Restored by an operator that now reserves lineages: the old list keeps one entry a token.
        let mut restored = Registry::restore(
            RegistryConfig {
                lineage_entries: 3,
                ..config()
            },
            serde_json::from_str(&json).unwrap(),
        )
        .unwrap();
        assert_eq!(restored.lineage_of(&a), None);
        assert_eq!(restored.revoke(&a), Ok(true));
        assert_eq!(
            restored.list(&a.uri).unwrap().get(a.idx + 1),
            Ok(Status::Valid)
        );
        let b = alloc(&mut restored, T0, T0 + 30);
        assert_eq!(
            (b.uri.as_str(), b.idx),
            (a.uri.as_str(), 3),
            "continues in the old list"
        );
        assert_eq!(restored.lineage_of(&b), None);
    }

    #[test]
    fn lineage_claims_admit_only_their_root_and_entries() {
        let lineage = LineageEntries { first: 9, count: 7 };
        assert!(lineage.admits(8), "the root");
        assert!(lineage.admits(9) && lineage.admits(15));
        assert!(!lineage.admits(16) && !lineage.admits(7));
        assert!(!LineageEntries { first: 9, count: 0 }.admits(8));
        assert!(
            !LineageEntries {
                first: 9,
                count: MAX_LINEAGE_ENTRIES + 1
            }
            .admits(8)
        );
        assert!(
            !LineageEntries {
                first: usize::MAX,
                count: 2
            }
            .admits(usize::MAX - 1)
        );
        let taken: HashSet<usize> = (0..1000u64).filter_map(|s| lineage.entry_for(s)).collect();
        assert_eq!(taken, (9..16).collect(), "every entry used, none outside");
        assert_eq!(LineageEntries { first: 9, count: 0 }.entry_for(3), None);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Issue { lifetime: i64 },
        Wait { secs: i64 },
        Revoke { pick: prop::sample::Index },
        Suspend { pick: prop::sample::Index },
        Reinstate { pick: prop::sample::Index },
        Prune,
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1i64..=300).prop_map(|lifetime| Op::Issue { lifetime }),
            3 => (0i64..90).prop_map(|secs| Op::Wait { secs }),
            2 => any::<prop::sample::Index>().prop_map(|pick| Op::Revoke { pick }),
            1 => any::<prop::sample::Index>().prop_map(|pick| Op::Suspend { pick }),
            1 => any::<prop::sample::Index>().prop_map(|pick| Op::Reinstate { pick }),
            1 => Just(Op::Prune),
            1 => Just(Op::Crash),
        ]
    }

    /// One issued token as the operator knows it.
    struct Issued {
        status_ref: TokenStatusRef,
        exp: i64,
        status: Status,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// The operator's loop: persist when told to (and after every status change), crash at
        /// random, restore from what was persisted. No `(uri, idx)` is ever handed out twice, every
        /// token that a verifier could still accept has exactly the status the operator gave it,
        /// and pruned state is bounded by the lifetimes, not by how many tokens were issued.
        #[test]
        fn the_allocator_never_reuses_an_index_and_keeps_statuses_while_they_matter(
            ops in prop::collection::vec(op(), 1..300),
            lineage_entries in 0usize..4,
        ) {
            let cfg = RegistryConfig { lineage_entries, ..config() };
            let mut now = T0;
            let mut r = Registry::new(cfg.clone()).unwrap();
            let mut persisted = serde_json::to_string(r.state()).unwrap();
            let mut handed_out = HashSet::new();
            let mut issued: Vec<Issued> = Vec::new();

            for op in ops {
                match op {
                    Op::Issue { lifetime } => {
                        let allocation = r.allocate(now, now + lifetime).unwrap();
                        if allocation.persist_before_use {
                            persisted = serde_json::to_string(r.state()).unwrap();
                        }
                        prop_assert!(handed_out.insert(allocation.status_ref.clone()), "reused {:?}", allocation.status_ref);
                        // Nor is any of its lineage entries anyone else's.
                        let lineage = r.lineage_of(&allocation.status_ref);
                        prop_assert_eq!(lineage.map(|l| l.count), (lineage_entries > 0).then_some(lineage_entries));
                        for idx in lineage.iter().flat_map(|l| l.first..l.first + l.count) {
                            let entry = TokenStatusRef { idx, uri: allocation.status_ref.uri.clone() };
                            prop_assert!(handed_out.insert(entry.clone()), "lineage entry reused {:?}", entry);
                        }
                        issued.push(Issued { status_ref: allocation.status_ref, exp: now + lifetime, status: Status::Valid });
                    }
                    Op::Wait { secs } => now += secs,
                    Op::Revoke { pick } | Op::Suspend { pick } | Op::Reinstate { pick } if !issued.is_empty() => {
                        let picked = pick.index(issued.len());
                        let token = &mut issued[picked];
                        let live = now < token.exp + cfg.grace_secs;
                        let (result, expected) = match op {
                            Op::Revoke { .. } => (r.revoke(&token.status_ref), Status::Invalid),
                            Op::Suspend { .. } if token.status != Status::Invalid => (r.suspend(&token.status_ref), Status::Suspended),
                            Op::Suspend { .. } => (r.suspend(&token.status_ref), Status::Invalid),
                            _ if token.status == Status::Invalid => {
                                if live {
                                    prop_assert_eq!(r.reinstate(&token.status_ref), Err(RegistryError::Revoked));
                                }
                                continue;
                            }
                            _ => (r.reinstate(&token.status_ref), Status::Valid),
                        };
                        match result {
                            Ok(_) => token.status = expected,
                            // Only a token whose list was retired, i.e. long expired.
                            Err(e) => {
                                prop_assert_eq!(e, RegistryError::UnknownList);
                                prop_assert!(!live);
                            }
                        }
                        persisted = serde_json::to_string(r.state()).unwrap();
                    }
                    Op::Revoke { .. } | Op::Suspend { .. } | Op::Reinstate { .. } => {}
                    Op::Prune => {
                        r.prune(now);
                        persisted = serde_json::to_string(r.state()).unwrap();
                        let buckets: HashSet<i64> = r.state().lists.values().map(|l| l.expires_by).collect();
                        let bound = (cfg.max_token_lifetime_secs + cfg.grace_secs) / cfg.bucket_secs + 2;
                        prop_assert!(buckets.len() as i64 <= bound, "{} buckets", buckets.len());
                        for list in r.state().lists.values() {
                            prop_assert!(now < list.expires_by + cfg.grace_secs);
                            prop_assert!(list.expires_by <= now + cfg.max_token_lifetime_secs + cfg.bucket_secs);
                        }
                    }
                    Op::Crash => {
                        r = Registry::restore(cfg.clone(), serde_json::from_str(&persisted).unwrap()).unwrap();
                    }
                }
                for token in &issued {
                    if now < token.exp + cfg.grace_secs {
                        prop_assert_eq!(r.status(&token.status_ref), Ok(token.status));
                        let list = r.list(&token.status_ref.uri).unwrap();
                        prop_assert_eq!(list.get(token.status_ref.idx), Ok(token.status));
                    }
                }
            }
        }
    }

    /// Serialized size of the state, the way the operator persists it.
    fn persisted_bytes(r: &Registry) -> usize {
        serde_json::to_vec(r.state()).unwrap().len()
    }

    /// A small deterministic generator (xorshift64*): the figures below must be reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn one_in(&mut self, n: u64) -> bool {
            self.next().is_multiple_of(n)
        }
    }

    struct Load {
        max_persisted: usize,
        max_lists: usize,
        max_lst: usize,
        issued: usize,
    }

    /// Runs `issue_times` (sorted) with 10-minute tokens, revoking one token in `revoke_one_in`,
    /// pruning every minute, and measures the persisted state every 10 minutes.
    fn run_load(issue_times: &[i64], revoke_one_in: u64) -> Load {
        let mut r = Registry::new(RegistryConfig::new(BASE_URI, 86_400)).unwrap();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut last_prune, mut last_measure) = (i64::MIN / 2, i64::MIN / 2);
        let mut load = Load {
            max_persisted: 0,
            max_lists: 0,
            max_lst: 0,
            issued: 0,
        };
        for &now in issue_times {
            if now - last_prune >= 60 {
                r.prune(now);
                last_prune = now;
            }
            let status_ref = r.allocate(now, now + 600).unwrap().status_ref;
            load.issued += 1;
            if revoke_one_in > 0 && rng.one_in(revoke_one_in) {
                r.revoke(&status_ref).unwrap();
            }
            load.max_lists = load.max_lists.max(r.lists().count());
            if now - last_measure >= 600 {
                last_measure = now;
                load.max_persisted = load.max_persisted.max(persisted_bytes(&r));
                for (_, list) in r.lists() {
                    load.max_lst = load
                        .max_lst
                        .max(list.to_claim()["lst"].as_str().unwrap().len());
                }
            }
        }
        load
    }

    /// The figures of the module doc: run with `--nocapture` to see them.
    #[test]
    fn state_stays_small_for_realistic_loads() {
        // 100,000 tokens issued evenly within 24 h, 10-minute lifetimes.
        let spread: Vec<i64> = (0..100_000i64).map(|i| T0 + i * 86_400 / 100_000).collect();
        // 10,000 live grants rotating 10-minute tokens at 2/3 of their life (every 400 s): 4 h, of
        // which all but the first 10 minutes are the steady state (90,000 tokens an hour).
        let mut rotating: Vec<i64> = (0..10_000i64)
            .flat_map(|g| (0..36i64).map(move |k| T0 + g * 400 / 10_000 + k * 400))
            .collect();
        rotating.sort_unstable();

        for (name, times) in [
            ("100k tokens / 24 h", &spread),
            ("10k grants rotating / 4 h", &rotating),
        ] {
            for revoke_one_in in [0, 100] {
                let load = run_load(times, revoke_one_in);
                eprintln!(
                    "{name}, revoking {}: {} tokens, at most {} lists live, persisted state at most {} bytes, largest lst {} chars",
                    if revoke_one_in == 0 {
                        "none".to_owned()
                    } else {
                        format!("1 in {revoke_one_in}")
                    },
                    load.issued,
                    load.max_lists,
                    load.max_persisted,
                    load.max_lst,
                );
                assert!(load.max_lists <= 6, "{name}: {} lists", load.max_lists);
                assert!(
                    load.max_persisted <= 16 << 10,
                    "{name}: {} bytes",
                    load.max_persisted
                );
            }
        }
    }

    /// One namespace's default budget (64 lists' worth), every list full of random statuses, still
    /// fits a Secret; and the safety limit is a hard one. Random as the operator can make them: each
    /// token revoked, suspended or valid with its lineage, and one token in 64 with one exchanged
    /// token of its lineage revoked on its own (0.79 MB without those, 0.85 MB with them, 0.99 MB
    /// with one in 16).
    #[test]
    fn worst_case_persisted_state_fits_a_secret() {
        // One token in this many has one exchanged token revoked on its own.
        const ALONE_ONE_IN: u64 = 64;
        let cfg = RegistryConfig {
            max_lists: 64,
            ..RegistryConfig::new(BASE_URI, 86_400)
        };
        let stride = cfg.stride();
        let mut rng = Rng(7);
        let mut state = RegistryState::default();
        for serial in 0..cfg.max_lists {
            let mut statuses = StatusList::new(cfg.list_capacity * stride);
            for token in (0..statuses.len()).step_by(stride) {
                let random = Status::from_value((rng.next() % 3) as u8).unwrap();
                for idx in token..token + stride {
                    statuses.set(idx, random).unwrap();
                }
                if rng.one_in(ALONE_ONE_IN) {
                    let alone = token + 1 + (rng.next() as usize) % (stride - 1);
                    statuses.set(alone, Status::Invalid).unwrap();
                }
            }
            let len = statuses.len();
            let list = IssuedList {
                expires_by: T0 + 86_400,
                reserved: len,
                statuses,
                stride,
                handed_out: len,
            };
            state.lists.insert(format!("{BASE_URI}/{serial}"), list);
            state.next_serial = serial as u64 + 1;
        }
        let mut r = Registry::restore(cfg, state).unwrap();
        assert_eq!(r.allocate(T0, T0 + 600), Err(RegistryError::Full(64)));
        let bytes = persisted_bytes(&r);
        eprintln!("worst case: 64 full lists of random statuses persist as {bytes} bytes");
        assert!(bytes < 1 << 20, "{bytes} bytes");
    }

    /// Demand beyond the old fixed 64 lists opens more lists; each retires whole once its tokens
    /// expired, and the usage says so.
    #[test]
    fn capacity_grows_with_demand_and_retires_with_expiry() {
        let cfg = RegistryConfig {
            list_capacity: 4,
            reserve_block: 2,
            ..RegistryConfig::new(BASE_URI, 86_400)
        };
        let mut r = Registry::new(cfg.clone()).unwrap();
        let refs: Vec<TokenStatusRef> = (0..400).map(|_| alloc(&mut r, T0, T0 + 600)).collect();
        let usage = r.usage();
        assert_eq!(
            (usage.lists, usage.allocated, usage.in_lists),
            (100, 400, 400)
        );
        assert_eq!(usage.limit, DEFAULT_MAX_LISTS * 4);
        let unique: HashSet<&TokenStatusRef> = refs.iter().collect();
        assert_eq!(unique.len(), 400, "no entry handed out twice");
        let retires = r.retires_at(&refs[0].uri).unwrap();
        assert_eq!(
            retires,
            bucket_end(T0 + 600, 3600).unwrap() + cfg.grace_secs
        );
        assert!(
            r.prune(retires - 1).is_empty(),
            "not before every token expired"
        );
        assert_eq!(r.prune(retires).len(), 100);
        assert_eq!(r.usage().lists, 0);
    }

    #[test]
    fn the_safety_limit_still_fails_closed() {
        let cfg = RegistryConfig {
            list_capacity: 4,
            max_lists: 2,
            ..RegistryConfig::new(BASE_URI, 86_400)
        };
        let mut r = Registry::new(cfg).unwrap();
        for _ in 0..8 {
            alloc(&mut r, T0, T0 + 600);
        }
        assert_eq!(r.allocate(T0, T0 + 600), Err(RegistryError::Full(2)));
    }
}

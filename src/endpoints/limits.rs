//! The pure parts of the endpoints' flood protection: token buckets, a per-source limiter whose
//! memory is bounded however many sources there are, and a bounded cache with expiry. Time is passed
//! in, so each is tested without a clock or a cluster.

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

/// The longest wait a bucket reports (a rate near zero would otherwise overflow a `Duration`).
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// How fast a bucket refills and how much it holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second: per_second.max(f64::MIN_POSITIVE),
            burst: f64::from(burst.max(1)),
        }
    }
}

/// A token bucket: `burst` tokens at most, refilled at `per_second`.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            updated: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.updated = now;
    }

    /// Takes one token, or says how long until one is there.
    pub fn try_take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / rate.per_second;
            Err(Duration::try_from_secs_f64(wait).map_or(MAX_WAIT, |w| w.min(MAX_WAIT)))
        }
    }

    /// Gives a token back (never beyond `burst`).
    pub fn refund(&mut self, rate: Rate, now: Instant) {
        self.refill(rate, now);
        self.tokens = (self.tokens + 1.0).min(rate.burst);
    }

    /// Whether the bucket has refilled completely: then it is no different from a new one.
    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * rate.per_second >= rate.burst
    }
}

/// Who a request is charged to: its client address, IPv6 by /64 (one host usually holds a whole
/// /64, so counting its addresses apart would give it 2^64 buckets); IPv4-mapped IPv6 as IPv4.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// One token bucket per source, at most `capacity` of them. A bucket that has refilled is dropped
/// (it is the same as a new one); when every slot holds a bucket still in use, further sources share
/// one overflow bucket — so many sources together get no more than `capacity + 1` sources' worth,
/// and memory never grows past `capacity` buckets.
#[derive(Debug)]
pub struct SourceLimiter {
    rate: Rate,
    capacity: usize,
    buckets: HashMap<IpAddr, TokenBucket>,
    overflow: TokenBucket,
    last_sweep: Instant,
}

/// How often a full limiter looks for refilled buckets to drop: the sweep reads every bucket, and
/// new sources can arrive at the request rate.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl SourceLimiter {
    pub fn new(rate: Rate, capacity: usize, now: Instant) -> Self {
        Self {
            rate,
            capacity: capacity.max(1),
            buckets: HashMap::new(),
            overflow: TokenBucket::full(rate, now),
            last_sweep: now,
        }
    }

    /// Takes a token from `source`'s bucket, or says how long until it has one.
    pub fn try_take(&mut self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let rate = self.rate;
        self.bucket(source, now).try_take(rate, now)
    }

    /// Gives `source` back the token a request took (it turned out to be a legitimate caller's).
    pub fn refund(&mut self, source: IpAddr, now: Instant) {
        let rate = self.rate;
        self.bucket(source, now).refund(rate, now);
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn bucket(&mut self, source: IpAddr, now: Instant) -> &mut TokenBucket {
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.capacity {
            self.sweep(now);
        }
        if self.buckets.contains_key(&source) || self.buckets.len() < self.capacity {
            let rate = self.rate;
            self.buckets
                .entry(source)
                .or_insert_with(|| TokenBucket::full(rate, now))
        } else {
            &mut self.overflow
        }
    }

    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < SWEEP_INTERVAL {
            return;
        }
        self.last_sweep = now;
        let rate = self.rate;
        self.buckets.retain(|_, bucket| !bucket.is_full(rate, now));
    }
}

/// A map whose entries expire and which never holds more than `capacity` of them: when full, the
/// expired go first, then the entry closest to expiry.
#[derive(Debug)]
pub struct ExpiringCache<K, V> {
    capacity: usize,
    entries: HashMap<K, (V, Instant)>,
}

impl<K: Eq + Hash + Clone, V: Clone> ExpiringCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
        }
    }

    /// The value of `key` if it has not expired.
    pub fn get(&self, key: &K, now: Instant) -> Option<V> {
        self.entries
            .get(key)
            .filter(|(_, expires)| *expires > now)
            .map(|(value, _)| value.clone())
    }

    /// Keeps `value` under `key` for `ttl` (nothing is kept when `ttl` is zero).
    pub fn insert(&mut self, key: K, value: V, ttl: Duration, now: Instant) {
        if ttl.is_zero() {
            return;
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.make_room(now);
        }
        self.entries.insert(key, (value, now + ttl));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn make_room(&mut self, now: Instant) {
        self.entries.retain(|_, (_, expires)| *expires > now);
        if self.entries.len() < self.capacity {
            return;
        }
        let soonest = self
            .entries
            .iter()
            .min_by_key(|(_, (_, expires))| *expires)
            .map(|(key, _)| key.clone());
        if let Some(key) = soonest {
            self.entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_bucket_gives_its_burst_then_refills_at_its_rate() {
        let rate = Rate::new(2.0, 3);
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(rate, t0);
        for _ in 0..3 {
            assert!(bucket.try_take(rate, t0).is_ok());
        }
        let wait = bucket.try_take(rate, t0).unwrap_err();
        assert_eq!(wait, secs(0.5), "one token every half second");
        assert!(bucket.try_take(rate, t0 + secs(0.4)).is_err());
        assert!(bucket.try_take(rate, t0 + secs(0.5)).is_ok());
        // A long pause refills to the burst, no further.
        let later = t0 + secs(3600.0);
        for _ in 0..3 {
            assert!(bucket.try_take(rate, later).is_ok());
        }
        assert!(bucket.try_take(rate, later).is_err());
    }

    #[test]
    fn a_refund_gives_a_token_back_up_to_the_burst() {
        let rate = Rate::new(1.0, 2);
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(rate, t0);
        bucket.try_take(rate, t0).unwrap();
        bucket.try_take(rate, t0).unwrap();
        bucket.refund(rate, t0);
        assert!(bucket.try_take(rate, t0).is_ok());
        assert!(bucket.try_take(rate, t0).is_err());
        let mut full = TokenBucket::full(rate, t0);
        full.refund(rate, t0);
        full.refund(rate, t0);
        full.try_take(rate, t0).unwrap();
        full.try_take(rate, t0).unwrap();
        assert!(full.try_take(rate, t0).is_err(), "never beyond the burst");
    }

    #[test]
    fn sources_are_limited_apart() {
        let t0 = Instant::now();
        let mut limiter = SourceLimiter::new(Rate::new(1.0, 2), 16, t0);
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        limiter.try_take(a, t0).unwrap();
        limiter.try_take(a, t0).unwrap();
        assert!(limiter.try_take(a, t0).is_err());
        assert!(limiter.try_take(b, t0).is_ok(), "b has its own bucket");
        limiter.refund(a, t0);
        assert!(limiter.try_take(a, t0).is_ok());
    }

    /// An attacker with a million addresses cannot grow the limiter beyond its capacity, and gets no
    /// more than the capacity's buckets plus the shared overflow bucket.
    #[test]
    fn many_sources_stay_bounded_and_share_the_overflow() {
        let t0 = Instant::now();
        let capacity = 64;
        let mut limiter = SourceLimiter::new(Rate::new(1.0, 1), capacity, t0);
        let mut admitted = 0;
        for n in 0..1_000_000u32 {
            let ip = IpAddr::V4(n.into());
            admitted += usize::from(limiter.try_take(ip, t0).is_ok());
        }
        assert_eq!(limiter.len(), capacity);
        assert_eq!(admitted, capacity + 1);
        // Once the buckets have refilled they are dropped, and new sources get their own again.
        let later = t0 + secs(2.0);
        let newcomer = "192.0.2.1".parse().unwrap();
        assert!(limiter.try_take(newcomer, later).is_ok());
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn ipv6_sources_count_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(other));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(source_of(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn cached_answers_expire() {
        let t0 = Instant::now();
        let mut cache = ExpiringCache::new(8);
        cache.insert("k", 1, secs(5.0), t0);
        assert_eq!(cache.get(&"k", t0 + secs(4.9)), Some(1));
        assert_eq!(cache.get(&"k", t0 + secs(5.0)), None);
        cache.insert("zero", 2, Duration::ZERO, t0);
        assert_eq!(cache.get(&"zero", t0), None, "a zero ttl caches nothing");
    }

    #[test]
    fn a_full_cache_drops_the_expired_then_the_soonest_to_expire() {
        let t0 = Instant::now();
        let mut cache = ExpiringCache::new(3);
        cache.insert(1, (), secs(1.0), t0);
        cache.insert(2, (), secs(10.0), t0);
        cache.insert(3, (), secs(5.0), t0);
        cache.insert(4, (), secs(10.0), t0);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&1, t0).is_none(), "the soonest to expire went");
        // Expired entries make room first.
        cache.insert(5, (), secs(10.0), t0 + secs(6.0));
        assert!(cache.get(&3, t0 + secs(6.0)).is_none());
        assert!(cache.get(&2, t0 + secs(6.0)).is_some());
        for n in 6..10_000 {
            cache.insert(n, (), secs(10.0), t0);
        }
        assert_eq!(cache.len(), 3, "bounded");
    }
}

//! The shared token verdict cache: bounded, sharded, CLOCK eviction, keyed by 128 bits of
//! SHA-256 over the verifier and the token.
//!
//! Why not moka: per entry it keeps access and write deques, a timer wheel node and an
//! entry header (about 300 bytes beside the value), and it hands writes to a maintenance
//! task, whose wake-ups showed in the cold-token profile. Here an entry is one slot of
//! 40 bytes plus about 33 bytes of index, and all work is done inline under a shard lock.
//!
//! Memory, worst case: `capacity × (73 bytes + one principal)`; a principal is about 180
//! bytes of its own (`claims::Principal`), its grants, issuer and client id shared.
//! `auth.cache_max_entries = 100000` therefore bounds the cache at about 25 MiB.
//!
//! Eviction is CLOCK (second chance): a hit marks its entry, and the hand, looking for a
//! slot to reuse, spares marked entries once. A flood of new tokens thus recycles the
//! slots of tokens seen once, not those in use. Expired entries are reused first, when
//! the hand reaches them; a lookup never returns one.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Verdict;

/// Shards: enough that workers rarely meet on one lock.
const SHARDS: usize = 64;

/// A cache key: the first 128 bits of a SHA-256.
pub type Key = [u64; 2];

/// Bounded verdicts by key, with their time to live.
pub struct VerdictCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    epoch: Instant,
    /// Verifications under way, so that concurrent first lookups of one token share one.
    /// Holds at most one entry per request in flight.
    inflight: Mutex<HashMap<Key, Arc<tokio::sync::OnceCell<Verdict>>, KeyHash>>,
}

struct Shard {
    index: HashMap<Key, u32, KeyHash>,
    slots: Vec<Slot>,
    hand: usize,
}

struct Slot {
    key: Key,
    verdict: Verdict,
    /// Seconds since the cache's epoch at which the entry stops being returned.
    until: u32,
    referenced: bool,
}

/// The key is already uniformly distributed: its first word is its hash.
#[derive(Default, Clone, Copy)]
pub struct KeyHash;

impl BuildHasher for KeyHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

/// See [`KeyHash`].
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
    // `[u64; 2]` hashes its length first: no information.
    fn write_usize(&mut self, _: usize) {}
    fn finish(&self) -> u64 {
        self.0
    }
}

/// What an insertion did, for the eviction counter.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A free slot, a reused expired one, or the key's own.
    Stored,
    /// A live entry was evicted to make room.
    Evicted,
    /// Not kept: its time to live is under a second.
    Skipped,
}

impl VerdictCache {
    /// A cache of at most `capacity` verdicts (at least one per shard).
    pub fn new(capacity: u64) -> VerdictCache {
        let per_shard = usize::try_from(capacity.div_ceil(SHARDS as u64))
            .unwrap_or(usize::MAX)
            .max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    index: HashMap::with_hasher(KeyHash),
                    slots: Vec::new(),
                    hand: 0,
                })
            })
            .collect();
        VerdictCache {
            shards,
            per_shard,
            epoch: Instant::now(),
            inflight: Mutex::new(HashMap::with_hasher(KeyHash)),
        }
    }

    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        // The second word picks the shard, the first places the key within it.
        self.shards[(key[1] % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The live verdict for `key`, marking it used.
    pub fn get(&self, key: &Key) -> Option<Verdict> {
        let now = self.now();
        let mut shard = self.shard(key);
        let i = *shard.index.get(key)? as usize;
        let slot = &mut shard.slots[i];
        if slot.until <= now {
            return None;
        }
        slot.referenced = true;
        Some(slot.verdict.clone())
    }

    /// Keeps `verdict` for `ttl` (whole seconds; less than one is not kept).
    pub fn insert(&self, key: Key, verdict: Verdict, ttl: Duration) -> Inserted {
        let secs = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        if secs == 0 {
            return Inserted::Skipped;
        }
        let now = self.now();
        let slot = Slot {
            key,
            verdict,
            until: now.saturating_add(secs),
            referenced: false,
        };
        let per_shard = self.per_shard;
        let mut guard = self.shard(&key);
        let shard = &mut *guard;
        if let Some(&i) = shard.index.get(&key) {
            shard.slots[i as usize] = slot;
            return Inserted::Stored;
        }
        if shard.slots.len() < per_shard {
            if shard.slots.len() == shard.slots.capacity() {
                // Doubling, but never past the bound: the slots are the bulk of the memory.
                let len = shard.slots.len();
                shard
                    .slots
                    .reserve_exact((len * 2).max(16).min(per_shard) - len);
            }
            shard.index.insert(key, shard.slots.len() as u32);
            shard.slots.push(slot);
            return Inserted::Stored;
        }
        // The hand sweeps: expired or unmarked entries are taken, marked ones spared once.
        // Two turns at most: the first clears every mark it passes.
        let len = shard.slots.len();
        let mut victim = shard.hand;
        for _ in 0..2 * len {
            let s = &mut shard.slots[shard.hand];
            victim = shard.hand;
            shard.hand = (shard.hand + 1) % len;
            if s.until <= now || !s.referenced {
                break;
            }
            s.referenced = false;
        }
        let old = std::mem::replace(&mut shard.slots[victim], slot);
        shard.index.remove(&old.key);
        shard.index.insert(key, victim as u32);
        if old.until <= now {
            Inserted::Stored
        } else {
            Inserted::Evicted
        }
    }

    /// Entries held (live or expired, not yet reused).
    pub fn len(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .slots
                    .len() as u64
            })
            .sum()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The verdict for `key`, from `verify` when no other caller is already verifying it;
    /// otherwise the one that caller gets. `Err` (nothing cached) when `verify` could not
    /// judge. `keep` gives each verdict's time to live and records the insertion.
    pub async fn get_or_verify<E>(
        &self,
        key: Key,
        verify: impl Future<Output = Result<Verdict, E>>,
        keep: impl FnOnce(&Verdict, Inserted),
        ttl: impl FnOnce(&Verdict) -> Duration,
    ) -> Result<Verdict, E> {
        let guard = Inflight::join(&self.inflight, key);
        let verdict = guard
            .cell()
            .get_or_try_init(|| async move {
                let v = verify.await?;
                let inserted = self.insert(key, v.clone(), ttl(&v));
                keep(&v, inserted);
                Ok(v)
            })
            .await?
            .clone();
        Ok(verdict)
    }
}

/// A caller's share of an in-flight verification; the last one out removes the entry.
struct Inflight<'a> {
    map: &'a Mutex<HashMap<Key, Arc<tokio::sync::OnceCell<Verdict>>, KeyHash>>,
    key: Key,
    cell: Option<Arc<tokio::sync::OnceCell<Verdict>>>,
}

impl<'a> Inflight<'a> {
    fn join(
        map: &'a Mutex<HashMap<Key, Arc<tokio::sync::OnceCell<Verdict>>, KeyHash>>,
        key: Key,
    ) -> Inflight<'a> {
        let mut m = map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Cloned (and, in drop, released) under the lock: the count is exact there.
        let cell = m.entry(key).or_default().clone();
        Inflight {
            map,
            key,
            cell: Some(cell),
        }
    }

    fn cell(&self) -> &tokio::sync::OnceCell<Verdict> {
        self.cell.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cell) = self.cell.take() {
            let last = m.get(&self.key).is_some_and(|c| Arc::ptr_eq(c, &cell))
                && Arc::strong_count(&cell) == 2;
            drop(cell);
            if last {
                m.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenError;

    fn key(i: u64) -> Key {
        [i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i]
    }

    fn refused() -> Verdict {
        Err(TokenError::Signature)
    }

    /// Never more than the capacity; what was not used recently goes first.
    #[test]
    fn bounded_and_second_chance() {
        let c = VerdictCache::new(64);
        for i in 0..64 {
            assert_eq!(
                c.insert(key(i), refused(), Duration::from_secs(60)),
                Inserted::Stored
            );
        }
        assert_eq!(c.len(), 64);
        assert!(c.get(&key(5)).is_some());
        // Each shard holds one: a new key in 5's shard (5 + 64) evicts... only after 5
        // had its second chance, and the shard has no other slot: 5 goes on the second turn.
        assert_eq!(
            c.insert(key(5 + 64), refused(), Duration::from_secs(60)),
            Inserted::Evicted
        );
        assert_eq!(c.len(), 64);
        for i in 0..10_000 {
            c.insert(key(1000 + i), refused(), Duration::from_secs(60));
        }
        assert_eq!(c.len(), 64);
    }

    /// A marked entry survives a sweep that takes unmarked ones.
    #[test]
    fn used_entries_survive_a_flood() {
        let c = VerdictCache::new(4 * SHARDS as u64);
        let hot = key(7);
        c.insert(hot, refused(), Duration::from_secs(60));
        for round in 0..50u64 {
            assert!(c.get(&hot).is_some(), "round {round}");
            for i in 0..3 {
                // New keys in the hot key's shard.
                let k = [
                    round * 10 + i + 1_000_000,
                    hot[1] + SHARDS as u64 * (round * 10 + i + 1),
                ];
                c.insert(k, refused(), Duration::from_secs(60));
            }
        }
    }

    /// Under a second is not kept; an expired entry is not returned and its slot is reused
    /// without counting as an eviction.
    #[test]
    fn time_to_live() {
        let c = VerdictCache::new(SHARDS as u64);
        assert_eq!(
            c.insert(key(1), refused(), Duration::from_millis(999)),
            Inserted::Skipped
        );
        assert!(c.get(&key(1)).is_none());
        c.insert(key(2), refused(), Duration::from_secs(2));
        assert!(c.get(&key(2)).is_some());
        let later = VerdictCache {
            epoch: Instant::now() - Duration::from_secs(5),
            ..VerdictCache::new(SHARDS as u64)
        };
        later.shard(&key(3)).index.insert(key(3), 0);
        later.shard(&key(3)).slots.push(Slot {
            key: key(3),
            verdict: refused(),
            until: 4,
            referenced: true,
        });
        assert!(later.get(&key(3)).is_none(), "expired");
        let same_shard = [99, key(3)[1] + SHARDS as u64];
        assert_eq!(
            later.insert(same_shard, refused(), Duration::from_secs(9)),
            Inserted::Stored
        );
        assert_eq!(later.len(), 1);
    }

    /// Concurrent first lookups share one verification, and leave nothing in flight.
    #[tokio::test]
    async fn one_verification_for_concurrent_lookups() {
        let c = Arc::new(VerdictCache::new(64));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, calls, mut rx) = (c.clone(), calls.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_verify(
                    key(1),
                    async move {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = rx.wait_for(|go| *go).await;
                        Ok::<_, ()>(refused())
                    },
                    |_, _| {},
                    |_| Duration::from_secs(10),
                )
                .await
            }));
        }
        tokio::task::yield_now().await;
        tx.send(true).unwrap();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(refused()));
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(c.inflight.lock().unwrap().is_empty());
        assert_eq!(c.get(&key(1)), Some(refused()));
    }

    /// A verification that cannot judge caches nothing; a caller that gives up leaves
    /// nothing in flight.
    #[tokio::test]
    async fn failures_and_cancellation_leave_nothing() {
        let c = VerdictCache::new(64);
        let r = c
            .get_or_verify(
                key(2),
                async { Err::<Verdict, _>("down") },
                |_, _| {},
                |_| Duration::from_secs(10),
            )
            .await;
        assert_eq!(r, Err("down"));
        assert!(c.get(&key(2)).is_none());
        let pending = c.get_or_verify(
            key(3),
            std::future::pending::<Result<Verdict, ()>>(),
            |_, _| {},
            |_| Duration::from_secs(10),
        );
        let _ = tokio::time::timeout(Duration::from_millis(10), pending).await;
        assert!(c.inflight.lock().unwrap().is_empty());
    }
}

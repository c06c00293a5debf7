//! LRU caches of metadata tables (L2 slices, refcount blocks).
//!
//! A [`TableCache`] only holds bytes and dirty flags; it never does I/O.
//! Loading on a miss and writing back a dirty victim are done by the caller
//! (the metadata layer), which knows the write-ordering rules: a dirty L2
//! slice may only be written after the refcount cache has been flushed, so
//! eviction hands the victim back instead of writing it.
//!
//! Lookups under the image's shared lock ([`TableCache::get_shared`]) need
//! only `&self`: they set the entry's atomic *referenced* bit and epoch
//! stamp and count the hit atomically. The victim search gives referenced
//! entries a second chance (moved to the most recently used end, bit
//! cleared), so the LRU order stays approximately right for those hits.

use crossbeam_utils::CachePadded;
use lru::LruCache;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// One cached table (or slice of a table).
#[derive(Debug)]
pub struct CachedTable {
    /// The raw on-disk bytes (big-endian entries).
    pub data: Box<[u8]>,
    /// Modified in memory and not yet written back.
    pub dirty: bool,
    /// The cache's epoch when this entry was last used (`cache-clean-interval`).
    epoch: AtomicU32,
    /// Used under the shared lock since the victim search last looked at it.
    referenced: AtomicBool,
}

/// Hit/miss counters of a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found the table cached.
    pub hits: u64,
    /// Lookups that had to load it.
    pub misses: u64,
    /// Entries currently cached.
    pub entries: usize,
    /// Capacity in entries.
    pub capacity: usize,
}

/// An LRU cache of fixed-size tables keyed by host offset.
#[derive(Debug)]
pub struct TableCache {
    lru: LruCache<u64, CachedTable>,
    capacity: usize,
    entry_bytes: usize,
    hits: ShardedCounter,
    misses: AtomicU64,
    epoch: u32,
}

impl TableCache {
    /// A cache of at most `capacity` (≥ 1) entries of `entry_bytes` each.
    pub fn new(capacity: usize, entry_bytes: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            lru: LruCache::unbounded(),
            capacity,
            entry_bytes,
            hits: ShardedCounter::default(),
            misses: AtomicU64::new(0),
            epoch: 0,
        }
    }

    /// Size of one entry in bytes.
    pub fn entry_bytes(&self) -> usize {
        self.entry_bytes
    }

    /// Looks `offset` up, counting a hit or a miss and refreshing its LRU position.
    pub fn get(&mut self, offset: u64) -> Option<&CachedTable> {
        let epoch = self.epoch;
        match self.lru.get_mut(&offset) {
            Some(t) => {
                self.hits.add_one();
                *t.epoch.get_mut() = epoch;
                Some(t)
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Looks `offset` up through a shared reference (the image's shared
    /// lock): a hit is counted and marks the entry referenced (see the
    /// module docs); a miss is not counted (the caller retries under the
    /// exclusive lock, whose [`get`](Self::get) counts it). `count: false`
    /// counts nothing (a retry right after the load).
    pub fn get_shared(&self, offset: u64, count: bool) -> Option<&CachedTable> {
        let t = self.lru.peek(&offset)?;
        if count {
            self.hits.add_one();
        }
        if t.epoch.load(Ordering::Relaxed) != self.epoch {
            t.epoch.store(self.epoch, Ordering::Relaxed);
        }
        if !t.referenced.load(Ordering::Relaxed) {
            t.referenced.store(true, Ordering::Relaxed);
        }
        Some(t)
    }

    /// Mutable lookup that does not count a hit or a miss (used after `get`).
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut CachedTable> {
        self.lru.get_mut(&offset)
    }

    /// Looks `offset` up without touching the LRU order or the counters.
    pub fn peek(&self, offset: u64) -> Option<&CachedTable> {
        self.lru.peek(&offset)
    }

    /// Whether the cache is full, so an insert would need a victim first.
    pub fn is_full(&self) -> bool {
        self.lru.len() >= self.capacity
    }

    /// The next victim, without removing it: the least recently used entry
    /// not referenced under the shared lock since the last search (a
    /// referenced one is moved to the most recently used end instead, its
    /// bit cleared: a second chance).
    pub fn lru_victim(&mut self) -> Option<(u64, bool)> {
        for _ in 0..self.lru.len() {
            let (k, referenced) = match self.lru.peek_lru() {
                Some((k, v)) => (*k, v.referenced.load(Ordering::Relaxed)),
                None => return None,
            };
            if !referenced {
                break;
            }
            if let Some(t) = self.lru.get_mut(&k) {
                *t.referenced.get_mut() = false;
            }
        }
        self.lru.peek_lru().map(|(k, v)| (*k, v.dirty))
    }

    /// Removes an entry, returning it.
    pub fn remove(&mut self, offset: u64) -> Option<CachedTable> {
        self.lru.pop(&offset)
    }

    /// Inserts a table. The caller must have made room (see [`is_full`](Self::is_full)).
    pub fn insert(&mut self, offset: u64, data: Box<[u8]>, dirty: bool) {
        self.lru.put(
            offset,
            CachedTable {
                data,
                dirty,
                epoch: AtomicU32::new(self.epoch),
                referenced: AtomicBool::new(false),
            },
        );
    }

    /// Offsets of every dirty entry, sorted (so write-back is sequential).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .lru
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether any entry is dirty.
    pub fn has_dirty(&self) -> bool {
        self.lru.iter().any(|(_, t)| t.dirty)
    }

    /// Drops every clean entry (cache-clean-interval, or after external changes).
    pub fn drop_clean(&mut self) {
        let clean: Vec<u64> = self
            .lru
            .iter()
            .filter(|(_, t)| !t.dirty)
            .map(|(k, _)| *k)
            .collect();
        for k in clean {
            self.lru.pop(&k);
        }
    }

    /// Drops clean entries not used since the previous call and starts a new
    /// interval (QEMU's `cache-clean-interval`). Returns how many were dropped.
    pub fn clean_unused(&mut self) -> usize {
        let epoch = self.epoch;
        let stale: Vec<u64> = self
            .lru
            .iter()
            .filter(|(_, t)| !t.dirty && t.epoch.load(Ordering::Relaxed) != epoch)
            .map(|(k, _)| *k)
            .collect();
        for k in &stale {
            self.lru.pop(k);
        }
        self.epoch = self.epoch.wrapping_add(1);
        stale.len()
    }

    /// Drops every entry whose key lies in `[start, end)` (the cluster was freed).
    ///
    /// Keys are entry-aligned (tables and slices start at multiples of the
    /// entry size), so a range holding fewer entry positions than the cache
    /// holds entries is handled by direct lookups: freeing one cluster costs
    /// a few hash lookups, not a walk over the whole cache.
    pub fn forget_range(&mut self, start: u64, end: u64) {
        let step = self.entry_bytes.max(1) as u64;
        let first = start.div_ceil(step).saturating_mul(step);
        let positions = end.saturating_sub(first).div_ceil(step);
        if positions <= self.lru.len() as u64 {
            let mut k = first;
            while k < end {
                self.lru.pop(&k);
                k += step;
            }
            return;
        }
        let keys: Vec<u64> = self
            .lru
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| *k >= start && *k < end)
            .collect();
        for k in keys {
            self.lru.pop(&k);
        }
    }

    /// Counters for tests and benches.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.sum(),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.lru.len(),
            capacity: self.capacity,
        }
    }
}

/// Shards of [`ShardedCounter`]: enough that two or four threads rarely
/// share one.
const COUNTER_SHARDS: usize = 8;

/// A counter bumped by many threads at once (cache hits under the shared
/// lock): each thread adds to its own cache line ([`CachePadded`]), so hits on two cores do not
/// bounce one line between them; reading sums the shards.
#[derive(Debug, Default)]
struct ShardedCounter {
    shards: [CachePadded<AtomicU64>; COUNTER_SHARDS],
}

impl ShardedCounter {
    fn add_one(&self) {
        let shard = self.shards.get(thread_shard()).unwrap_or(&self.shards[0]);
        shard.fetch_add(1, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |a, s| a.wrapping_add(s.load(Ordering::Relaxed)))
    }
}

/// This thread's shard of every [`ShardedCounter`] (threads get shards round
/// robin on first use).
fn thread_shard() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % COUNTER_SHARDS;
    }
    // During the thread's teardown (an image dropped by a thread-local
    // destructor) the slot may be gone: any shard will do.
    SHARD.try_with(|s| *s).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_order_and_stats() {
        let mut c = TableCache::new(2, 8);
        c.insert(0, vec![0; 8].into(), false);
        c.insert(8, vec![0; 8].into(), true);
        assert!(c.is_full());
        assert!(c.get(0).is_some());
        assert_eq!(c.lru_victim(), Some((8, true)));
        assert!(c.get(16).is_none());
        assert_eq!(
            c.stats(),
            CacheStats {
                hits: 1,
                misses: 1,
                entries: 2,
                capacity: 2
            }
        );
        assert_eq!(c.dirty_offsets(), vec![8]);
        c.drop_clean();
        assert!(c.peek(0).is_none());
        assert!(c.peek(8).is_some());
    }

    /// A hit under the shared lock saves the entry from being the next
    /// victim once (second chance) and counts as a hit.
    #[test]
    fn shared_hits_get_a_second_chance() {
        let mut c = TableCache::new(3, 8);
        for k in [0u64, 8, 16] {
            c.insert(k, vec![0; 8].into(), false);
        }
        assert_eq!(c.lru_victim(), Some((0, false)));
        assert!(c.get_shared(0, true).is_some());
        assert!(c.get_shared(24, true).is_none());
        assert_eq!(c.lru_victim(), Some((8, false)), "0 was referenced");
        c.remove(8);
        c.insert(32, vec![0; 8].into(), false);
        // 16 is now the oldest entry, and not referenced.
        assert_eq!(c.lru_victim(), Some((16, false)));
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (1, 0));
        // All referenced: the search still ends, on the oldest.
        for k in [0u64, 16, 32] {
            c.get_shared(k, false);
        }
        assert!(c.lru_victim().is_some());
    }

    #[test]
    fn clean_interval_drops_only_unused_clean_entries() {
        let mut c = TableCache::new(4, 8);
        c.insert(0, vec![0; 8].into(), false);
        c.insert(8, vec![0; 8].into(), false);
        c.insert(16, vec![0; 8].into(), true);
        assert_eq!(
            c.clean_unused(),
            0,
            "everything was used in the first interval"
        );
        assert!(c.get(0).is_some());
        assert_eq!(c.clean_unused(), 1, "8 was not used, 16 is dirty");
        assert!(c.peek(8).is_none());
        assert!(c.peek(0).is_some() && c.peek(16).is_some());
    }

    #[test]
    fn forget_range_direct_and_walk() {
        let mut c = TableCache::new(8, 16);
        for k in [0u64, 16, 32, 48, 64] {
            c.insert(k, vec![0; 16].into(), false);
        }
        // Few positions: direct lookups.
        c.forget_range(16, 48);
        assert!(c.peek(0).is_some() && c.peek(16).is_none() && c.peek(32).is_none());
        assert!(c.peek(48).is_some());
        // Many positions: the walk.
        c.forget_range(40, 1 << 20);
        assert!(c.peek(48).is_none() && c.peek(64).is_none() && c.peek(0).is_some());
    }
}

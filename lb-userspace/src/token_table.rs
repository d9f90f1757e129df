//! The token table as the host sees it: the dataplane's set-associative array of buckets
//! (`lb_common::tokens`), mapped into this process and read and written one slot at a
//! time, with the same atomicity the dataplane has: a slot's identity word is loaded and
//! stored whole, after its stamps. No syscall per entry: the CLI lists a million tokens,
//! and the controller finds a removed backend's tokens, in one pass over memory.
//!
//! Slots keep idle tokens until a token of their bucket reuses them; the daemon clears
//! them ([`TokenTable::remove_idle`]) so that the table's occupancy counts live tokens
//! and no stamp lives long enough to wrap (2.28 years).

#[cfg(not(target_endian = "little"))]
compile_error!("the token table's stamp word is read as two little-endian u32s");

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use aya::maps::{Array, IterableMap as _, Map, MapData};
use lb_common::{
    maps::TokenEntry,
    tokens::{self, Place, TOKEN_WAYS, TokenBucket, TokenId},
};

/// Words of one slot: the identity, then both stamps (`learned` low, `seen` high).
const SLOT_WORDS: usize = 2;
const BUCKET_WORDS: usize = TOKEN_WAYS * SLOT_WORDS;

/// The token table, mapped.
pub struct TokenTable {
    /// The map, kept open for as long as the mapping is used.
    _map: Array<MapData, TokenBucket>,
    base: NonNull<AtomicU64>,
    bytes: usize,
    buckets: u32,
    /// The bucket hash's key, `Config::token_key` of the dataplane using the table.
    key: [u64; 2],
}

// SAFETY: the mapping is shared memory accessed only through atomics; the handle owns it.
unsafe impl Send for TokenTable {}
// SAFETY: as above: every access is an atomic load, store or compare-exchange.
unsafe impl Sync for TokenTable {}

impl Drop for TokenTable {
    fn drop(&mut self) {
        // SAFETY: the region this handle mapped, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

impl TokenTable {
    /// Maps the token table `map`, whose bucket hash has key `key`.
    pub fn open(map: Map, key: [u64; 2]) -> anyhow::Result<Self> {
        let map: Array<MapData, TokenBucket> =
            Array::try_from(map).context("the token table is not an array of buckets")?;
        let buckets = map.len();
        if !buckets.is_power_of_two() {
            anyhow::bail!("the token table has {buckets} buckets, not a power of two");
        }
        let bytes = (buckets as usize * size_of::<TokenBucket>()).next_multiple_of(page_size());
        let fd = map.map().fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's memory, which the kernel keeps while
        // it is mapped; the handle unmaps it on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .context("mapping the token table (created without BPF_F_MMAPABLE?)");
        }
        Ok(Self {
            _map: map,
            base: NonNull::new(p.cast()).context("mmap returned null")?,
            bytes,
            buckets,
            key,
        })
    }

    /// The table pinned in `layout_dir` (`<pin path>/v<layout>`), with the key its
    /// dataplane's config holds.
    pub fn from_pins(layout_dir: &std::path::Path) -> anyhow::Result<Self> {
        use lb_common::maps::{Config, MAP_CONFIG, MAP_TOKENS};
        let open = |name: &str| -> anyhow::Result<Map> {
            let path = layout_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        let config: Array<MapData, Config> = Array::try_from(open(MAP_CONFIG)?)?;
        let key = config.get(&0, 0).context("reading LB_CONFIG")?.token_key;
        Self::open(open(MAP_TOKENS)?, key)
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// CLOCK_MONOTONIC_COARSE, the dataplane's clock.
fn now_ns() -> u64 {
    crate::clock::monotonic_coarse_ns()
}

impl TokenTable {
    /// Buckets in the table.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// The bucket hash's key.
    pub fn key(&self) -> [u64; 2] {
        self.key
    }

    /// Puts into `cfg` what the dataplane needs to index this table: its mask and key.
    /// Every write of the config goes through this, so none can leave them stale.
    pub fn write_into(&self, cfg: &mut lb_common::maps::Config) {
        cfg.token_mask = self.buckets - 1;
        cfg.token_key = self.key;
    }

    /// Sets the key of a table that had none yet (all empty), as its dataplane will.
    pub fn set_key(&mut self, key: [u64; 2]) {
        self.key = key;
    }

    fn word(&self, bucket: u32, slot: usize, w: usize) -> &AtomicU64 {
        assert!(bucket < self.buckets && slot < TOKEN_WAYS && w < SLOT_WORDS);
        let i = bucket as usize * BUCKET_WORDS + slot * SLOT_WORDS + w;
        // SAFETY: in bounds (asserted); the mapping is 8-aligned and lives as long as self.
        unsafe { &*self.base.as_ptr().add(i) }
    }

    fn ident(&self, bucket: u32, slot: usize) -> u64 {
        self.word(bucket, slot, 0).load(Ordering::Acquire)
    }

    fn stamps(&self, bucket: u32, slot: usize) -> (u32, u32) {
        let w = self.word(bucket, slot, 1).load(Ordering::Acquire);
        (w as u32, (w >> 32) as u32)
    }

    fn bucket_of(&self, token: u32) -> u32 {
        tokens::bucket_of(token, self.buckets - 1, self.key)
    }

    fn entry(id: TokenId, (learned, seen): (u32, u32), now: u64) -> TokenEntry {
        TokenEntry {
            backend: id.backend,
            service: id.service,
            learned_ns: now.saturating_sub(tokens::age_ns(now, learned)),
            last_seen_ns: now.saturating_sub(tokens::age_ns(now, seen)),
            version: id.version,
            origin: id.origin,
        }
    }

    /// What the table holds for `token`.
    pub fn get(&self, token: u32) -> Option<TokenEntry> {
        let b = self.bucket_of(token);
        let (i, id) = tokens::find(token, |i| self.ident(b, i))?;
        Some(Self::entry(
            TokenId::unpack(id)?,
            self.stamps(b, i),
            now_ns(),
        ))
    }

    /// Every token in the table (a token two CPUs wrote at once into two slots of its
    /// bucket is listed once, as lookups find it).
    pub fn iter(&self) -> impl Iterator<Item = (u32, TokenEntry)> + '_ {
        let now = now_ns();
        (0..self.buckets).flat_map(move |b| {
            let idents: [u64; TOKEN_WAYS] = std::array::from_fn(|i| self.ident(b, i));
            (0..TOKEN_WAYS).filter_map(move |i| {
                let id = TokenId::unpack(idents[i])?;
                if idents[..i].iter().any(|&x| tokens::holds(x, id.token)) {
                    return None;
                }
                Some((id.token, Self::entry(id, self.stamps(b, i), now)))
            })
        })
    }

    /// Tokens in the table (a pass over it).
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// Writes `token` → `e`: over its own slot if the table holds it, else into a free
    /// slot of its bucket (empty, or idle for `idle_ns`), else over the slot seen least
    /// recently. Returns the live token pushed out, if any. A slot the dataplane rewrote
    /// since this looked is not overwritten: the choice is made again. (The dataplane's
    /// own writes are plain stores: one landing in the same instant as this may
    /// overwrite it; and if the swap fails, the stamps just written stay with the token
    /// the dataplane wrote there, both fresh.)
    pub fn set(&self, token: u32, e: &TokenEntry, idle_ns: u64) -> Option<u32> {
        let b = self.bucket_of(token);
        let id = TokenId {
            token,
            backend: e.backend,
            service: e.service,
            version: e.version,
            origin: e.origin,
        }
        .pack();
        let stamps =
            u64::from(tokens::stamp(e.learned_ns)) | u64::from(tokens::stamp(e.last_seen_ns)) << 32;
        loop {
            let now = now_ns();
            // The bucket as `place` judges it; the swap expects what it saw.
            let seen: [(u64, u32); TOKEN_WAYS] =
                std::array::from_fn(|i| (self.ident(b, i), self.stamps(b, i).1));
            let (i, evicted) = match tokens::place(token, now, idle_ns, |i| seen[i]) {
                Place::Held(i) | Place::Free(i) => (i, None),
                Place::Evict(i) => (i, Some(seen[i].0 as u32)),
            };
            let old = seen[i].0;
            self.word(b, i, 1).store(stamps, Ordering::Release);
            if self
                .word(b, i, 0)
                .compare_exchange(old, id, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return evicted;
            }
        }
    }

    /// Removes `token`. Returns whether the table held it.
    pub fn remove(&self, token: u32) -> bool {
        let b = self.bucket_of(token);
        self.clear(b, |id, _| id.token == token) > 0
    }

    /// Removes `token` if it is `backend`'s. Returns whether it was.
    pub fn remove_for(&self, token: u32, backend: u32) -> bool {
        let b = self.bucket_of(token);
        self.clear(b, |id, _| id.token == token && id.backend == backend) > 0
    }

    /// Clears the slots of tokens idle for `idle_ns` or longer (they route no join
    /// already). Returns how many.
    pub fn remove_idle(&self, idle_ns: u64) -> usize {
        let now = now_ns();
        (0..self.buckets)
            .map(|b| self.clear(b, |_, seen| tokens::age_ns(now, seen) >= idle_ns))
            .sum()
    }

    /// Removes every token `doomed` says so of. Returns how many.
    pub fn remove_if(&self, doomed: impl Fn(&TokenId) -> bool) -> usize {
        (0..self.buckets)
            .map(|b| self.clear(b, |id, _| doomed(id)))
            .sum()
    }

    /// Empties the slots of bucket `b` whose token `doomed` picks (given its identity
    /// and `seen` stamp), unless the dataplane rewrote one meanwhile (then that slot
    /// holds another token, which stays).
    fn clear(&self, b: u32, doomed: impl Fn(&TokenId, u32) -> bool) -> usize {
        let mut n = 0;
        for i in 0..TOKEN_WAYS {
            let ident = self.ident(b, i);
            if TokenId::unpack(ident).is_some_and(|id| doomed(&id, self.stamps(b, i).1))
                && self
                    .word(b, i, 0)
                    .compare_exchange(ident, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                n += 1;
            }
        }
        n
    }
}

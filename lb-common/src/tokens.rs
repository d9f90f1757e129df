//! The token table: MPTCP token → the backend of its connection, read by every MP_JOIN
//! SYN and written once per MPTCP connection.
//!
//! A set-associative array, as CPU caches are built: a token belongs to one bucket of
//! [`TOKEN_WAYS`] slots (64 bytes, one cache line), found by a hash of the token. An
//! insert reads the bucket and writes one slot: no lock, no list, no allocation, where
//! the kernel's LRU hash map takes a bucket lock and moves a node between lists (measured
//! at about twice the cost, see the README). A full bucket gives up the slot seen least
//! recently, so a flood of handshakes pushes out the oldest tokens, as an LRU would, but
//! only within one bucket. Buckets are sized for [`TOKEN_SLOTS_PER_ENTRY`] slots per
//! token of capacity, so that a table filled to its capacity rarely overflows a bucket.
//!
//! Each slot's identity (token, backend, service, version, origin) is one 64-bit word,
//! written and read with single 8-byte accesses: a reader on another CPU sees one token's
//! backend beside that token, never beside another's. Its two time stamps are 32-bit
//! counts of [`STAMP_NS`]; writers store the stamps before the identity.

use crate::maps::{MAX_BACKENDS, MAX_SERVICES};
use bytemuck::{Pod, Zeroable};

/// Slots per bucket.
pub const TOKEN_WAYS: usize = 4;
/// Slots allocated per token of configured capacity: a table filled to its capacity has
/// buckets half full on average, and few (about 5%) overflow.
pub const TOKEN_SLOTS_PER_ENTRY: u32 = 2;
/// Time stamps count units of 2^24 ns (16.8 ms): ample for idle times of seconds and
/// hours; a 32-bit stamp wraps after 2.28 years, ages are computed modulo that.
pub const STAMP_SHIFT: u32 = 24;
pub const STAMP_NS: u64 = 1 << STAMP_SHIFT;

const OCCUPIED: u64 = 1 << 63;
const BACKEND_BITS: u32 = 12;
const SERVICE_BITS: u32 = 6;
const _: () = assert!(MAX_BACKENDS <= 1 << BACKEND_BITS && MAX_SERVICES <= 1 << SERVICE_BITS);

/// One slot of a bucket. All zero: empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TokenSlot {
    /// [`TokenId::pack`]; 0 when the slot is empty.
    pub ident: u64,
    /// [`stamp`] of when the token was learned (or announced).
    pub learned: u32,
    /// [`stamp`] of when a subflow of its connection was last seen.
    pub seen: u32,
}

/// One bucket: the value of the token-table array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TokenBucket {
    pub slots: [TokenSlot; TOKEN_WAYS],
}
const _: () = assert!(core::mem::size_of::<TokenBucket>() == 64);

// SAFETY: #[repr(C)], bytemuck::Pod (no padding, any bit pattern).
#[cfg(feature = "user")]
unsafe impl aya::Pod for TokenBucket {}

/// What a slot says of its token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenId {
    pub token: u32,
    pub backend: u32,
    pub service: u32,
    /// MPTCP version the token was derived for (0 = SHA-1, 1 = SHA-256).
    pub version: u32,
    /// [`crate::maps::TOKEN_FROM_CLIENT`] or [`crate::maps::TOKEN_FROM_BACKEND`].
    pub origin: u32,
}

impl TokenId {
    /// The slot word: token in the low 32 bits, then backend (12 bits), service (6),
    /// version (1), origin (1); bit 63 marks the slot occupied.
    #[inline(always)]
    pub const fn pack(&self) -> u64 {
        OCCUPIED
            | self.token as u64
            | ((self.backend as u64) & ((1 << BACKEND_BITS) - 1)) << 32
            | ((self.service as u64) & ((1 << SERVICE_BITS) - 1)) << 44
            | ((self.version as u64) & 1) << 50
            | ((self.origin as u64) & 1) << 51
    }

    /// The identity a slot word holds, if the slot is occupied.
    #[inline(always)]
    pub const fn unpack(ident: u64) -> Option<Self> {
        if ident & OCCUPIED == 0 {
            return None;
        }
        Some(Self {
            token: ident as u32,
            backend: ident_backend(ident),
            service: ident_service(ident),
            version: ((ident >> 50) & 1) as u32,
            origin: ((ident >> 51) & 1) as u32,
        })
    }
}

/// Whether slot word `ident` holds `token`.
#[inline(always)]
pub const fn holds(ident: u64, token: u32) -> bool {
    ident & (OCCUPIED | 0xffff_ffff) == OCCUPIED | token as u64
}

/// The backend of an occupied slot word.
#[inline(always)]
pub const fn ident_backend(ident: u64) -> u32 {
    ((ident >> 32) & ((1 << BACKEND_BITS) - 1)) as u32
}

/// The service of an occupied slot word.
#[inline(always)]
pub const fn ident_service(ident: u64) -> u32 {
    ((ident >> 44) & ((1 << SERVICE_BITS) - 1)) as u32
}

/// Buckets of a table for `entries` tokens: [`TOKEN_SLOTS_PER_ENTRY`] slots each, in a
/// power of two of buckets (the index is a mask of the hash).
pub const fn buckets_for(entries: u32) -> u32 {
    let slots = (entries as u64) * TOKEN_SLOTS_PER_ENTRY as u64;
    let buckets = slots.div_ceil(TOKEN_WAYS as u64);
    if buckets <= 1 {
        1
    } else if buckets >= 1 << 31 {
        1 << 31
    } else {
        (buckets as u32).next_power_of_two()
    }
}

/// The bucket of `token` in a table of `mask + 1` buckets, by SipHash-1-3 keyed with the
/// table's random `key` ([`crate::maps::Config::token_key`]): a client makes up the
/// tokens it teaches (its handshake's keys are its own), and anyone who saw a
/// connection's keys knows its token; without the key neither can choose tokens that
/// land in that token's bucket.
#[inline(always)]
pub fn bucket_of(token: u32, mask: u32, key: [u64; 2]) -> u32 {
    crate::hash::siphash13_u32(key, token) as u32 & mask
}

/// The stamp of a `CLOCK_MONOTONIC` time.
#[inline(always)]
pub const fn stamp(ns: u64) -> u32 {
    (ns >> STAMP_SHIFT) as u32
}

/// Stamps up to this many units ahead of the clock read as age 0: a writer on another
/// CPU (or the daemon) may have read the clock a moment later than the reader.
const AHEAD_UNITS: u32 = 2;

/// Time from stamp `then` to `now_ns`, to the stamp's resolution, modulo the stamp's
/// wrap (2.28 years: the daemon clears idle slots long before, see `TokenTable`). A stamp
/// at most two units ahead of `now_ns` has age 0.
#[inline(always)]
pub const fn age_ns(now_ns: u64, then: u32) -> u64 {
    let d = stamp(now_ns).wrapping_sub(then);
    if d > u32::MAX - AHEAD_UNITS {
        0
    } else {
        (d as u64) << STAMP_SHIFT
    }
}

/// Where a token goes in its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Slot `i` holds the token already.
    Held(usize),
    /// Slot `i` is empty, or its token idle for `idle_ns` or longer.
    Free(usize),
    /// Every slot holds a live token: slot `i` is the one seen least recently.
    Evict(usize),
}

/// Where `token` goes in a bucket whose slot `i` reads as `slot(i)` = (ident, seen).
/// Generic over the read so that the dataplane reads the map value in place and the
/// host reads it through atomics.
#[inline(always)]
pub fn place(
    token: u32,
    now_ns: u64,
    idle_ns: u64,
    mut slot: impl FnMut(usize) -> (u64, u32),
) -> Place {
    let mut free = TOKEN_WAYS;
    let mut oldest = 0;
    let mut oldest_age = 0;
    let mut i = 0;
    while i < TOKEN_WAYS {
        let (ident, seen) = slot(i);
        if holds(ident, token) {
            return Place::Held(i);
        }
        let age = age_ns(now_ns, seen);
        if free == TOKEN_WAYS && (ident & OCCUPIED == 0 || age >= idle_ns) {
            free = i;
        }
        if age >= oldest_age {
            oldest_age = age;
            oldest = i;
        }
        i += 1;
    }
    if free < TOKEN_WAYS {
        Place::Free(free)
    } else {
        Place::Evict(oldest)
    }
}

/// The slot of a bucket that holds `token`, and its identity word, if one does.
#[inline(always)]
pub fn find(token: u32, mut ident: impl FnMut(usize) -> u64) -> Option<(usize, u64)> {
    let mut i = 0;
    while i < TOKEN_WAYS {
        let id = ident(i);
        if holds(id, token) {
            return Some((i, id));
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(token: u32, backend: u32) -> TokenId {
        TokenId {
            token,
            backend,
            service: 63,
            version: 1,
            origin: 1,
        }
    }

    #[test]
    fn a_slot_word_keeps_every_field() {
        let t = TokenId {
            token: 0xffff_ffff,
            backend: MAX_BACKENDS - 1,
            service: MAX_SERVICES - 1,
            version: 1,
            origin: 1,
        };
        assert_eq!(TokenId::unpack(t.pack()), Some(t));
        let z = TokenId::default();
        assert_eq!(TokenId::unpack(z.pack()), Some(z), "token 0, backend 0");
        assert_eq!(TokenId::unpack(0), None, "an empty slot");
        assert!(holds(t.pack(), 0xffff_ffff) && !holds(t.pack(), 0xffff_fffe));
        assert!(!holds(0, 0), "an empty slot holds no token, not even 0");
        assert_eq!(ident_backend(t.pack()), MAX_BACKENDS - 1);
    }

    #[test]
    fn tables_have_two_slots_per_token_in_a_power_of_two_of_buckets() {
        assert_eq!(buckets_for(1 << 20), 1 << 19);
        assert_eq!(buckets_for(1000), 512);
        assert_eq!(buckets_for(1), 1);
        assert_eq!(buckets_for(0), 1);
        assert_eq!(buckets_for(u32::MAX), 1 << 31);
    }

    #[test]
    fn ages_survive_the_stamp_wrapping_and_a_clock_slightly_ahead() {
        let now = 5 * STAMP_NS;
        assert_eq!(age_ns(now, stamp(now)), 0);
        assert_eq!(age_ns(now, stamp(now) - 2), 2 * STAMP_NS);
        assert_eq!(age_ns(now, stamp(now) + 1), 0, "a stamp a unit ahead");
        assert_eq!(age_ns(now, stamp(now) + 2), 0, "two units ahead");
        let wrapped = (u32::MAX as u64 + 3) << STAMP_SHIFT;
        assert_eq!(age_ns(wrapped, u32::MAX - 1), 4 * STAMP_NS);
        // An old stamp is old, however old: 1.5 years reads as 1.5 years (ages wrap
        // only at 2.28).
        let old = 1u64 << 32 << STAMP_SHIFT; // ~2.28 years after boot
        let then = stamp(old - (3 << 30 << STAMP_SHIFT));
        assert_eq!(age_ns(old, then), 3 << 30 << STAMP_SHIFT);
    }

    #[test]
    fn a_token_goes_to_its_own_slot_then_a_free_one_then_the_least_recently_seen() {
        let now = 1000 * STAMP_NS;
        let idle = 100 * STAMP_NS;
        let s = stamp(now);
        // Slots: token 1 (seen 10 units ago), empty, token 3 idle, token 4.
        let b = [
            (id(1, 5).pack(), s - 10),
            (0, 0),
            (id(3, 5).pack(), s - 200),
            (id(4, 5).pack(), s - 20),
        ];
        assert_eq!(place(3, now, idle, |i| b[i]), Place::Held(2));
        assert_eq!(place(9, now, idle, |i| b[i]), Place::Free(1));
        let full = [b[0], (id(2, 5).pack(), s - 30), b[2], b[3]];
        assert_eq!(place(9, now, idle, |i| full[i]), Place::Free(2), "idle");
        let live = [b[0], full[1], (id(3, 5).pack(), s - 5), b[3]];
        assert_eq!(place(9, now, idle, |i| live[i]), Place::Evict(1));
        assert_eq!(find(4, |i| live[i].0), Some((3, live[3].0)));
        assert_eq!(find(9, |i| live[i].0), None);
    }

    #[test]
    fn made_up_tokens_spread_over_the_buckets() {
        // Consecutive tokens (what a client trying to aim at one bucket would not get
        // from SHA-256, but a test can) still land in every bucket about evenly.
        let mask = 255;
        let mut n = [0u32; 256];
        for t in 0..256 * 64 {
            n[bucket_of(t, mask, [0x5eed, 1]) as usize] += 1;
        }
        assert!(n.iter().all(|&c| (32..=96).contains(&c)), "{n:?}");
        // Tokens that share a bucket under one key mostly do not under another.
        let (k1, k2) = ([1, 2], [1, 3]);
        let shared = (1..10_000u32)
            .filter(|t| bucket_of(*t, mask, k1) == bucket_of(0, mask, k1))
            .filter(|t| bucket_of(*t, mask, k2) == bucket_of(0, mask, k2))
            .count();
        assert!(
            shared < 5,
            "{shared} tokens share token 0's bucket under both keys"
        );
    }
}

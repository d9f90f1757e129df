//! MPTCP subflow affinity: learn each connection's token from the server key the client
//! echoes, and send every MP_JOIN SYN carrying it to the connection's backend.

use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    counters::Counter,
    maps::*,
    mptcp::{self, MptcpOption},
    packet::TCP_MIN_HLEN,
    tokens::{self, Place, TokenBucket, TokenId},
};

use aya_log_ebpf::debug;

use crate::{
    balancer::may_log,
    maps::{BACKENDS, OPTION_SCRATCH, TOKENS, conn_get, count},
    parse::{Packet, ptr_at},
};
use core::ptr::{
    addr_of, addr_of_mut, read_unaligned, read_volatile, write_unaligned, write_volatile,
};

/// The MPTCP option of a TCP packet, if it has one.
#[inline(always)]
pub fn option(ctx: &XdpContext, pkt: &Packet) -> Option<MptcpOption> {
    let len = pkt.tcp_hlen.wrapping_sub(TCP_MIN_HLEN);
    if len == 0 || len > mptcp::MAX_OPTION_BYTES {
        return None;
    }
    // A per-CPU scratch buffer rather than the stack: nothing to zero first (the walk
    // reads only the `len` bytes copied in), and map values may be read misaligned.
    let buf = OPTION_SCRATCH.get_ptr_mut(0)? as *mut u8;
    // Copied with plain loads, eight bytes at a time and a last four (TCP options come
    // in 32-bit words): a bpf_xdp_load_bytes call costs more than the copy.
    let base = pkt.l4_off + TCP_MIN_HLEN;
    let mut k = 0;
    while k < mptcp::MAX_OPTION_BYTES / 8 {
        let off = k * 8;
        if off + 8 > len {
            break;
        }
        let p = ptr_at::<u64>(ctx, base + off).ok()?;
        // SAFETY: ptr_at checked the packet bytes; off + 8 <= 40 < OPTION_BUF.
        unsafe { write_unaligned(buf.add(off) as *mut u64, read_unaligned(p)) };
        k += 1;
    }
    if len & 4 != 0 {
        let off = len - 4;
        let p = ptr_at::<u32>(ctx, base + off).ok()?;
        // SAFETY: as above, off + 4 <= 40.
        unsafe { write_unaligned(buf.add(off & 63) as *mut u32, read_unaligned(p)) };
    }
    // SAFETY: a live per-CPU map value; only this program on this CPU uses it, now.
    mptcp::find(unsafe { &*(buf as *const [u8; mptcp::OPTION_BUF]) }, len)
}

/// CLOCK_MONOTONIC at the last tick: millisecond resolution is plenty for idle times of
/// seconds, and reading the precise clock costs ~150 ns on a VM.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn idle_ns(cfg: &Config) -> u64 {
    if cfg.token_idle_ns == 0 {
        DEFAULT_TOKEN_IDLE_NS
    } else {
        cfg.token_idle_ns
    }
}

/// On a flow that began with MP_CAPABLE and has not learned yet: learn the token from
/// this packet's keys, or conclude the connection fell back to plain TCP. Learning is
/// once per connection; the flow entry records the outcome.
#[inline(always)]
pub fn learn(ctx: &XdpContext, pkt: &Packet, cfg: &Config, conn: *mut Conn) {
    // SAFETY: conn points at a live map value; Conn is plain data.
    let c = unsafe { *conn };
    // A backend out of service had its tokens dropped: a handshake it answered before
    // going down must not teach one again and steer joins back to it.
    match BACKENDS.get(c.backend) {
        Some(b) if b.flags & BACKEND_TAKES_JOINS != 0 => {}
        _ => {
            count(Counter::LearnBackendOut);
            // SAFETY: as above.
            unsafe { conclude(conn, c.flags, 0) };
            return;
        }
    }
    let Some(MptcpOption::Capable {
        version,
        sender_key,
        receiver_key: Some(key),
        ..
    }) = option(ctx, pkt)
    else {
        // No keys: one more packet that taught nothing. Learning ends (fallback) only
        // after several, so that neither a packet reordered ahead of the keys nor one
        // forged bare ACK settles it.
        let (flags, over) = c.learn_missed();
        if over {
            count(Counter::MptcpFallback);
            // SAFETY: as above.
            unsafe { conclude(conn, flags, 0) };
        } else {
            // SAFETY: as above. Not over a conclusion another CPU wrote meanwhile (its
            // third ACK and this packet handled at once): that one stands.
            unsafe {
                if (*conn).flags & CONN_TOKEN_DONE == 0 {
                    (*conn).flags = flags;
                }
            }
        }
        return;
    };
    // The SYN of a version 0 connection told its client's key: keys that do not echo it
    // were forged (or belong to no connection of this flow) and are not used, nor counted
    // as a miss, so that they cannot hasten the fallback either.
    if c.flags & CONN_KEY_CHECK != 0 && sender_key.map(|k| k as u32) != Some(c.token) {
        count(Counter::LearnKeyMismatch);
        return;
    }
    // Each token costs a SHA-256 and an insert, and clients make handshakes at will:
    // over the limit the keys are not used, and a later packet with keys may teach.
    // One clock read for the limit and the token's time stamps (a helper call each).
    let t = now();
    if crate::balancer::over_rate_at(ctx, RATE_LEARNING, cfg.max_learn_rate, t) {
        count(Counter::LearnRateLimited);
        return;
    }
    let token = if version == 0 {
        mptcp::token_v0(key)
    } else {
        let Some(scratch) = OPTION_SCRATCH.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: a live, 8-aligned per-CPU map value of 128 bytes, used by this program
        // only; the option bytes in it are no longer needed (the key is a copy).
        mptcp::token_v1_in(key, unsafe { &mut *(scratch as *mut [u32; 16]) })
    };
    let id = TokenId {
        token,
        backend: c.backend,
        service: c.service,
        version: version as u32,
        origin: TOKEN_FROM_CLIENT,
    };
    // Two CPUs may run this for one flow at once (its third ACK and first data segment):
    // both derive the same token for the same backend, and may both write it (the same
    // slot, or two slots of its bucket, one of which the bucket later reuses). The flow
    // entry records the token only if the table now holds it for this flow's backend (a
    // token in no table would be refreshed in vain).
    let owned = match store(ctx, id, t, cfg) {
        Stored::New => {
            count_learned(version);
            true
        }
        Stored::Held => true,
        Stored::Kept => false,
    };
    // SAFETY: as above.
    unsafe { conclude(conn, c.flags, if owned { token } else { 0 }) };
}

/// What [`store`] did.
pub enum Stored {
    /// Written: the token was in no live slot of its bucket (a full bucket gave up the
    /// slot seen least recently, counted).
    New,
    /// The token was there for the same backend: seen again.
    Held,
    /// The token is live for another backend: kept there (a forged or colliding
    /// handshake must not redirect another connection's joins).
    Kept,
}

/// The bucket of `token` in the token table. None only if the config's mask were larger
/// than the table (the controller writes it from the table it created).
#[inline(always)]
fn bucket(token: u32, cfg: &Config) -> Option<*mut TokenBucket> {
    TOKENS.get_ptr_mut(tokens::bucket_of(token, cfg.token_mask, cfg.token_key))
}

/// Slot `i`'s identity word, read at once.
///
/// # Safety
/// `b` points at a live token-table value; `i` < TOKEN_WAYS.
#[inline(always)]
unsafe fn ident(b: *mut TokenBucket, i: usize) -> u64 {
    // SAFETY: the caller's promise.
    unsafe { read_volatile(addr_of!((*b).slots[i].ident)) }
}

/// Slot `i`'s `seen` stamp. # Safety: as [`ident`].
#[inline(always)]
unsafe fn seen(b: *mut TokenBucket, i: usize) -> u32 {
    // SAFETY: the caller's promise.
    unsafe { read_volatile(addr_of!((*b).slots[i].seen)) }
}

/// Writes identity word `id` into slot `i`, learned and seen at `t`: stamps first, the
/// identity last, so that a reader that finds the token finds its stamps (x86 keeps
/// stores in order; elsewhere a reader may see the slot's previous stamps for a moment).
/// Plain stores: a slot the daemon swapped in the same instant may be overwritten.
/// # Safety: as [`ident`].
#[inline(always)]
unsafe fn write_slot(b: *mut TokenBucket, i: usize, id: u64, t: u64) {
    let s = tokens::stamp(t);
    // SAFETY: the caller's promise.
    unsafe {
        write_volatile(addr_of_mut!((*b).slots[i].learned), s);
        write_volatile(addr_of_mut!((*b).slots[i].seen), s);
        write_volatile(addr_of_mut!((*b).slots[i].ident), id);
    }
}

/// Puts token `id` in the table at time `t`, as learning does.
#[inline(always)]
pub fn store(ctx: &XdpContext, id: TokenId, t: u64, cfg: &Config) -> Stored {
    let Some(b) = bucket(id.token, cfg) else {
        return Stored::Kept;
    };
    let idle = idle_ns(cfg);
    // SAFETY: b is a live map value; place reads slots below TOKEN_WAYS.
    let place = tokens::place(id.token, t, idle, |i| unsafe { (ident(b, i), seen(b, i)) });
    let i = match place {
        Place::Held(i) => {
            // SAFETY: as above, i below TOKEN_WAYS.
            let (held, last) = unsafe { (ident(b, i), seen(b, i)) };
            if !tokens::holds(held, id.token) {
                // Rewritten by another CPU since `place` read it: not ours to judge.
                return Stored::Kept;
            }
            if tokens::ident_backend(held) == id.backend {
                // SAFETY: as above.
                unsafe { write_volatile(addr_of_mut!((*b).slots[i].seen), tokens::stamp(t)) };
                return Stored::Held;
            }
            if tokens::age_ns(t, last) < idle {
                count(Counter::TokenCollision);
                if may_log() {
                    debug!(
                        ctx,
                        "token {:x} learned for backend {} is live for backend {}: kept there",
                        id.token,
                        id.backend,
                        tokens::ident_backend(held)
                    );
                }
                return Stored::Kept;
            }
            // Another backend's entry that went idle is replaced.
            i
        }
        Place::Free(i) => i,
        Place::Evict(i) => {
            count(Counter::TokenEvicted);
            i
        }
    };
    // SAFETY: as above, i below TOKEN_WAYS.
    unsafe { write_slot(b, i, id.pack(), t) };
    Stored::New
}

/// The identity and `learned`/`seen` stamps of `token`'s slot, if the table holds it.
#[inline(always)]
fn lookup(token: u32, cfg: &Config) -> Option<(*mut TokenBucket, usize, u64)> {
    let b = bucket(token, cfg)?;
    // SAFETY: b is a live map value, indices below TOKEN_WAYS.
    let (i, id) = tokens::find(token, |i| unsafe { ident(b, i) })?;
    Some((b, i, id))
}

/// Ends learning for the flow at `conn`: `token` (0 for none) replaces what the token
/// field held while learning (a version 0 client's key check).
///
/// # Safety
/// `conn` points at a live flow-table value.
#[inline(always)]
unsafe fn conclude(conn: *mut Conn, flags: u32, token: u32) {
    // SAFETY: the caller's promise.
    unsafe {
        (*conn).token = token;
        (*conn).flags = (flags & !CONN_KEY_CHECK) | CONN_TOKEN_DONE;
    }
}

#[inline(always)]
fn count_learned(version: u8) {
    count(if version == 0 {
        Counter::TokenLearnedV0
    } else {
        Counter::TokenLearnedV1
    });
}

/// Traffic on any subflow keeps its connection's token alive (at most one write a second;
/// the caller looks the token up only a few times a second per flow, `Conn::refresh_due`).
#[inline(always)]
pub fn refresh(token: u32, backend: u32, cfg: &Config) {
    if let Some((b, i, id)) = lookup(token, cfg) {
        let t = now();
        // SAFETY: a live map value, i below TOKEN_WAYS.
        unsafe {
            if tokens::ident_backend(id) == backend
                && tokens::age_ns(t, seen(b, i)) > TOKEN_REFRESH_NS
            {
                write_volatile(addr_of_mut!((*b).slots[i].seen), tokens::stamp(t));
            }
        }
    }
}

/// The backend of the flow `key` if it learned its token less than
/// [`RELEARN_HOLDOFF_NS`] ago and that backend still owns it: an MP_CAPABLE SYN on it then
/// keeps the entry rather than restart learning.
#[inline(always)]
pub fn learned_recently(key: &FlowKey, cfg: &Config) -> Option<u32> {
    let c = conn_get(key)?;
    let token = c.known_token()?;
    if c.flags & CONN_JOIN != 0 {
        return None;
    }
    let (b, i, id) = lookup(token, cfg)?;
    // SAFETY: a live map value, i below TOKEN_WAYS.
    let learned = unsafe { read_volatile(addr_of!((*b).slots[i].learned)) };
    if tokens::ident_backend(id) != c.backend
        || tokens::age_ns(now(), learned) >= RELEARN_HOLDOFF_NS
    {
        return None;
    }
    match BACKENDS.get(c.backend) {
        Some(b) if b.flags & BACKEND_TAKES_JOINS != 0 => Some(c.backend),
        _ => None,
    }
}

/// The backend that owns `token` in `service`, if the token is live and the backend takes
/// joins (draining counts: its connections keep their joins; out of service does not).
/// An idle token's slot stays until a token of its bucket reuses it or the daemon's sweep
/// clears it.
#[inline(always)]
pub fn owner(ctx: &XdpContext, token: u32, service: u32, cfg: &Config) -> Option<u32> {
    let (b, i, id) = lookup(token, cfg)?;
    // SAFETY: a live map value, i below TOKEN_WAYS.
    if tokens::age_ns(now(), unsafe { seen(b, i) }) >= idle_ns(cfg) {
        count(Counter::TokenExpired);
        return None;
    }
    // Fields read from the word (no TokenId on the stack: the verifier refuses the
    // misaligned stores the compiler makes of one).
    if tokens::ident_service(id) != service {
        return None;
    }
    let backend = tokens::ident_backend(id);
    match BACKENDS.get(backend) {
        Some(b) if b.flags & BACKEND_TAKES_JOINS != 0 => Some(backend),
        _ => {
            if may_log() {
                debug!(
                    ctx,
                    "join for token {:x}: its backend {} is out of service or removed",
                    token,
                    backend
                );
            }
            None
        }
    }
}

//! MPTCP subflow affinity: learn each connection's token from the server key the client
//! echoes, and send every MP_JOIN SYN carrying it to the connection's backend.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext,
};
use lb_common::{
    counters::Counter,
    maps::*,
    mptcp::{self, MptcpOption},
    packet::TCP_MIN_HLEN,
};

use aya_log_ebpf::debug;

use crate::{
    balancer::may_log,
    maps::{BACKENDS, OPTION_SCRATCH, TOKENS, conn_get, count},
    parse::{Packet, ptr_at},
};
use core::ptr::{read_unaligned, write_unaligned};

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
    let entry = TokenEntry {
        backend: c.backend,
        service: c.service,
        learned_ns: t,
        last_seen_ns: t,
        version: version as u32,
        origin: TOKEN_FROM_CLIENT,
    };
    // The common case, a token nobody holds, costs one insert: BPF_NOEXIST fails only
    // when the token is already there. Two CPUs may run this for one flow at once (its
    // third ACK and first data segment); both derive the same token for the same
    // backend, and only the one whose insert wins counts it.
    // Whether the table now holds the token for this flow's backend: the flow entry
    // records the token only then (a token in no table would be refreshed in vain).
    let mut owned = true;
    if TOKENS.insert(token, entry, BPF_NOEXIST as u64).is_ok() {
        count_learned(version);
    } else if let Some(e) = TOKENS.get_ptr_mut(token) {
        // SAFETY: a live map value.
        let e = unsafe { &mut *e };
        if e.backend == c.backend {
            e.last_seen_ns = t;
        } else if t.saturating_sub(e.last_seen_ns) < idle_ns(cfg) {
            // Live for another backend: keep it (a forged or colliding handshake must
            // not redirect another connection's joins).
            count(Counter::TokenCollision);
            if may_log() {
                debug!(
                    ctx,
                    "token {:x} learned for backend {} is live for backend {}: kept there",
                    token,
                    c.backend,
                    e.backend
                );
            }
            owned = false;
        } else if TOKENS.insert(token, entry, 0).is_ok() {
            // Another backend's entry that went idle is replaced.
            count_learned(version);
        } else {
            insert_failed(ctx, token);
            owned = false;
        }
    } else if TOKENS.insert(token, entry, BPF_NOEXIST as u64).is_ok() {
        // Removed between the two calls (expired, or evicted): inserted after all.
        count_learned(version);
    } else {
        insert_failed(ctx, token);
        owned = false;
    }
    // SAFETY: as above.
    unsafe { conclude(conn, c.flags, if owned { token } else { 0 }) };
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
fn insert_failed(ctx: &XdpContext, token: u32) {
    count(Counter::TokenInsertFailed);
    if may_log() {
        debug!(ctx, "token {:x}: the token table refused the insert", token);
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
pub fn refresh(token: u32, backend: u32) {
    if let Some(e) = TOKENS.get_ptr_mut(token) {
        let t = now();
        // SAFETY: a live map value.
        let e = unsafe { &mut *e };
        if e.backend == backend && t.saturating_sub(e.last_seen_ns) > TOKEN_REFRESH_NS {
            e.last_seen_ns = t;
        }
    }
}

/// The backend of the flow `key` if it learned its token less than
/// [`RELEARN_HOLDOFF_NS`] ago and that backend still owns it: an MP_CAPABLE SYN on it then
/// keeps the entry rather than restart learning.
#[inline(always)]
pub fn learned_recently(key: &FlowKey) -> Option<u32> {
    let c = conn_get(key)?;
    let token = c.known_token()?;
    if c.flags & CONN_JOIN != 0 {
        return None;
    }
    // SAFETY: TokenEntry is Copy and read at once.
    let e = unsafe { TOKENS.get(token) }.copied()?;
    if e.backend != c.backend || now().saturating_sub(e.learned_ns) >= RELEARN_HOLDOFF_NS {
        return None;
    }
    match BACKENDS.get(c.backend) {
        Some(b) if b.flags & BACKEND_TAKES_JOINS != 0 => Some(c.backend),
        _ => None,
    }
}

/// The backend that owns `token` in `service`, if the token is live and the backend takes
/// joins (draining counts: its connections keep their joins; out of service does not).
#[inline(always)]
pub fn owner(ctx: &XdpContext, token: u32, service: u32, cfg: &Config) -> Option<u32> {
    // SAFETY: TokenEntry is Copy and read at once.
    let e = unsafe { TOKENS.get(token) }.copied()?;
    // Saturating: the daemon stamps the tokens the backends announce with the precise
    // clock, which may run up to a tick ahead of this coarse one; such a token is fresh.
    if now().saturating_sub(e.last_seen_ns) >= idle_ns(cfg) {
        count(Counter::TokenExpired);
        let _ = TOKENS.remove(token);
        return None;
    }
    if e.service != service {
        return None;
    }
    match BACKENDS.get(e.backend) {
        Some(b) if b.flags & BACKEND_TAKES_JOINS != 0 => Some(e.backend),
        _ => {
            if may_log() {
                debug!(
                    ctx,
                    "join for token {:x}: its backend {} is out of service or removed",
                    token,
                    e.backend
                );
            }
            None
        }
    }
}

//! MPTCP subflow affinity: learn each connection's token from the server key the client
//! echoes, and send every MP_JOIN SYN carrying it to the connection's backend.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use lb_common::{
    counters::Counter,
    maps::*,
    mptcp::{self, MptcpOption, OPTION_BUF},
    packet::TCP_MIN_HLEN,
};

use crate::{
    maps::{BACKENDS, TOKENS, count},
    parse::Packet,
};

/// The MPTCP option of a TCP packet, if it has one.
#[inline(always)]
pub fn option(ctx: &XdpContext, pkt: &Packet) -> Option<MptcpOption> {
    let len = pkt.tcp_hlen.wrapping_sub(TCP_MIN_HLEN);
    if len == 0 || len > mptcp::MAX_OPTION_BYTES {
        return None;
    }
    // The same value, in a form whose range ([1, 64]) the verifier derives by itself.
    let n = (core::hint::black_box(len - 1) & (OPTION_BUF - 1)) + 1;
    let mut buf = [0u8; OPTION_BUF];
    // SAFETY: the helper bounds-checks the packet itself and writes at most n <= 64 bytes
    // into the 64-byte buffer.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            (pkt.l4_off + TCP_MIN_HLEN) as u32,
            buf.as_mut_ptr() as *mut _,
            n as u32,
        )
    };
    if rc != 0 {
        return None;
    }
    mptcp::find(&buf, len)
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
    let Some(MptcpOption::Capable {
        version,
        receiver_key: Some(key),
        ..
    }) = option(ctx, pkt)
    else {
        count(Counter::MptcpFallback);
        // SAFETY: as above.
        unsafe { (*conn).flags = c.flags | CONN_TOKEN_DONE };
        return;
    };
    let token = if version == 0 {
        mptcp::token_v0(key)
    } else {
        mptcp::token_v1(key)
    };
    let t = now();
    // Two CPUs may run this for one flow at once (its third ACK and first data segment);
    // both derive the same token for the same backend, so the outcome is the same, and
    // only the one whose insert wins counts it.
    let mut owned = true;
    let mut exists = false;
    let mut known = false;
    if let Some(e) = TOKENS.get_ptr_mut(token) {
        // SAFETY: a live map value.
        let e = unsafe { &mut *e };
        exists = true;
        if e.backend == c.backend {
            e.last_seen_ns = t;
            known = true;
        } else if t.wrapping_sub(e.last_seen_ns) < idle_ns(cfg) {
            // Live for another backend: keep it (a forged or colliding handshake must
            // not redirect another connection's joins).
            count(Counter::TokenCollision);
            owned = false;
        }
    }
    if owned && !known {
        let entry = TokenEntry {
            backend: c.backend,
            service: c.service,
            learned_ns: t,
            last_seen_ns: t,
            version: version as u32,
            _pad: 0,
        };
        // A new token is added only if no other CPU added it meanwhile (BPF_NOEXIST);
        // an expired entry of another backend is replaced.
        let flags = if exists { 0 } else { BPF_NOEXIST as u64 };
        if TOKENS.insert(token, entry, flags).is_ok() {
            count(if version == 0 {
                Counter::TokenLearnedV0
            } else {
                Counter::TokenLearnedV1
            });
        }
    }
    // SAFETY: as above.
    unsafe {
        (*conn).token = if owned { token } else { 0 };
        (*conn).flags = c.flags | CONN_TOKEN_DONE;
    }
}

/// Traffic on any subflow keeps its connection's token alive (at most one write a second).
#[inline(always)]
pub fn refresh(token: u32, backend: u32) {
    if let Some(e) = TOKENS.get_ptr_mut(token) {
        let t = now();
        // SAFETY: a live map value.
        let e = unsafe { &mut *e };
        if e.backend == backend && t.wrapping_sub(e.last_seen_ns) > TOKEN_REFRESH_NS {
            e.last_seen_ns = t;
        }
    }
}

/// The backend that owns `token` in `service`, if the token is live and the backend still
/// exists (draining counts: its connections keep their joins).
#[inline(always)]
pub fn owner(token: u32, service: u32, cfg: &Config) -> Option<u32> {
    // SAFETY: TokenEntry is Copy and read at once.
    let e = unsafe { TOKENS.get(token) }.copied()?;
    if now().wrapping_sub(e.last_seen_ns) >= idle_ns(cfg) {
        count(Counter::TokenExpired);
        let _ = TOKENS.remove(token);
        return None;
    }
    if e.service != service {
        return None;
    }
    match BACKENDS.get(e.backend) {
        Some(b) if b.flags != 0 => Some(e.backend),
        _ => None,
    }
}

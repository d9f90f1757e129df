//! Benchmark harness (never attached): BPF_PROG_TEST_RUN with repeat > 1 does not reset
//! the packet between iterations, so an encapsulating program would measure itself on
//! its own output. These wrappers restore the original frame from `LB_BENCH` first.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    maps::{BENCH_FRAME, CONN_MPTCP, TOKEN_FROM_CLIENT},
    mptcp,
    tokens::TokenId,
};

use crate::{
    maps::{BENCH, CONFIG, CONNS4, OPTION_SCRATCH},
    parse::ptr_at,
};

/// Restores the frame (and applies the per-iteration variation); false if it could not.
#[inline(always)]
pub fn reset(ctx: &XdpContext) -> bool {
    let Some(b) = BENCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a live map value, only this program writes it during the run.
    let b = unsafe { &mut *b };
    let len = (b.len as usize) & (BENCH_FRAME - 8);
    let cur = ctx.data_end() - ctx.data();
    if cur > len {
        // Undo the previous iteration's encapsulation (it grew the head).
        // SAFETY: the helper validates the new head.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, (cur - len) as i32) } != 0 {
            return false;
        }
    }
    let mut i = 0usize;
    while i < BENCH_FRAME / 8 {
        let off = i * 8;
        if off >= len {
            break;
        }
        let Ok(p) = ptr_at::<u64>(ctx, off) else {
            return false;
        };
        // SAFETY: ptr_at checked the destination; off + 8 <= BENCH_FRAME bounds the source.
        unsafe {
            let v = core::ptr::read_unaligned(b.bytes.as_ptr().add(off) as *const u64);
            core::ptr::write_unaligned(p, v);
        }
        i += 1;
    }
    b.seq = b.seq.wrapping_add(1);
    let off = (b.vary_off as usize) & (BENCH_FRAME - 1);
    if off != 0 {
        let Ok(p) = ptr_at::<u32>(ctx, off) else {
            return false;
        };
        // SAFETY: ptr_at checked the bounds.
        unsafe { core::ptr::write_unaligned(p, b.seq) };
    }
    // IPv4 flows only (the learning class's), and the key written to the stack on every
    // path: paths that differ in which stack slots they wrote are states the verifier
    // cannot prune, and each of them goes on through the whole balancer. Built only
    // when relearning, the key took the wrapper from 590k to 886k instructions verified
    // (the limit is 1M).
    let flow = core::hint::black_box(b.flow.v4());
    if b.relearn != 0
        && let Some(c) = CONNS4.get_ptr_mut(flow)
    {
        // SAFETY: a live map value.
        unsafe {
            (*c).flags = CONN_MPTCP;
            (*c).token = 0;
        }
    }
    true
}

/// The reset alone: the floor of this method.
#[inline(always)]
pub fn reset_only(ctx: &XdpContext) -> u32 {
    if reset(ctx) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_ABORTED
    }
}

/// The iteration number `reset` just advanced (a new value every iteration).
#[inline(always)]
fn seq() -> Option<u32> {
    BENCH.get(0).map(|b| b.seq)
}

/// One part of the learning ACK alone: SHA-256 of a new 8-byte key, in the same
/// per-CPU schedule window `mptcp::learn` uses. The token is stored there, so the
/// computation cannot be left out.
#[inline(always)]
pub fn sha256_only(ctx: &XdpContext) -> u32 {
    if !reset(ctx) {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(seq), Some(scratch)) = (seq(), OPTION_SCRATCH.get_ptr_mut(0)) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a live, 8-aligned per-CPU map value of 128 bytes, used by this program only.
    let w = unsafe { &mut *(scratch as *mut [u32; 16]) };
    let token = mptcp::token_v1_in(0x7a9c_0000_0000_0000 | seq as u64, w);
    w[0] = token;
    xdp_action::XDP_PASS
}

/// The other part alone: the token-table insert `mptcp::learn` makes for a token nobody
/// holds (a new, well-spread token every iteration).
#[inline(always)]
pub fn token_insert_only(ctx: &XdpContext) -> u32 {
    if !reset(ctx) {
        return xdp_action::XDP_ABORTED;
    }
    let Some(seq) = seq() else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let id = TokenId {
        token: seq.wrapping_mul(0x9e37_79b9),
        backend: 1,
        service: 1,
        version: 1,
        origin: TOKEN_FROM_CLIENT,
    };
    // SAFETY: plain helper call (learning reads the same clock).
    let t = unsafe { bpf_ktime_get_coarse_ns() };
    match crate::mptcp::store(ctx, id, t, cfg) {
        crate::mptcp::Stored::New => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_ABORTED,
    }
}

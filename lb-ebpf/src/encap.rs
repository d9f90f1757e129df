//! IPIP / IP6IP6 (and 4in6, 6in4) encapsulation and the next-hop decision.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_xdp_adjust_head,
    },
    programs::XdpContext,
};
use lb_common::{
    counters::Counter,
    hash::{flow_hash, vary_source},
    maps::*,
    packet::*,
};

use crate::{
    maps::{NEXTHOPS, count},
    parse::ptr_at,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const OUTER_TTL: u8 = 64;

/// Folds a 32-bit one's-complement sum to the 16-bit IPv4 header checksum.
#[inline(always)]
fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Encapsulates the IP packet at `l3_off` (whose IP length is `inner_len`, whose family
/// is `inner_v6`) towards `backend` and decides its fate. Consumes the packet: returns
/// the XDP verdict. `hash` is the flow hash when `hashed` says the caller has it; it is
/// computed here only when the outer header needs it (IPv6 flow label, varied source).
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "one inlined step of the fast path"
)]
pub fn forward(
    ctx: &XdpContext,
    cfg: &Config,
    key: &FlowKey,
    hash: u32,
    hashed: bool,
    backend_id: u32,
    backend: &Backend,
    l3_off: usize,
    inner_len: u16,
    inner_v6: bool,
) -> u32 {
    let outer_v6 = backend.family == FAMILY_V6;
    if (outer_v6 && cfg.src6 == [0; 4]) || (!outer_v6 && cfg.src4 == 0) {
        count(Counter::DropNoSource);
        return xdp_action::XDP_DROP;
    }
    let outer_len: usize = if outer_v6 { IPV6_HLEN } else { IPV4_MIN_HLEN };
    let inner_proto = if inner_v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
    let needs_hash = outer_v6 || cfg.src4_vary_bits != 0;
    let hash = if hashed {
        hash
    } else if needs_hash {
        flow_hash(key, cfg.seed)
    } else {
        0
    };

    // The inner packet's DSCP and ECN bits go to the outer header (RFC 6040, normal
    // mode): routers between here and the backend see the client's marking, and
    // congestion they mark reaches the backend.
    let Ok(inner) = ptr_at::<[u8; 2]>(ctx, l3_off) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: ptr_at checked the two bytes are inside the packet.
    let (b0, b1) = unsafe { ((*inner)[0], (*inner)[1]) };
    let tos = if inner_v6 { (b0 << 4) | (b1 >> 4) } else { b1 };

    // Keep the frame's MAC addresses: if the kernel must resolve the next hop, it gets
    // a frame still addressed to this host and forwards it.
    let Ok(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: ptr_at checked the 12 bytes are inside the packet.
    let macs = unsafe { read_macs(eth as *const u8) };

    // Grow the head so that [Ethernet][outer IP] ends where the inner IP header begins
    // (a VLAN tag, if any, is dropped: the egress comes from the route lookup).
    let delta = l3_off as i32 - ETH_HLEN as i32 - outer_len as i32;
    // SAFETY: the helper validates the context and the new head itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        count(Counter::DropEncap);
        return xdp_action::XDP_DROP;
    }

    let outer_total = inner_len as u32 + outer_len as u32;
    let mut src6 = cfg.src6;
    let mut src4 = 0;
    if outer_v6 {
        let Ok(hdr) = ptr_at::<[u32; 10]>(ctx, ETH_HLEN) else {
            return xdp_action::XDP_ABORTED;
        };
        src6[3] = vary_source(src6[3], cfg.src6_vary_bits, hash);
        let ver_flow = (0x6000_0000u32 | (tos as u32) << 20 | (hash & 0x000f_ffff)).to_be();
        let len_nh_hop =
            ((inner_len as u32) << 16 | (inner_proto as u32) << 8 | OUTER_TTL as u32).to_be();
        // SAFETY: ptr_at checked the 40 bytes are inside the packet.
        unsafe {
            (*hdr)[0] = ver_flow;
            (*hdr)[1] = len_nh_hop;
            (*hdr)[2] = src6[0];
            (*hdr)[3] = src6[1];
            (*hdr)[4] = src6[2];
            (*hdr)[5] = src6[3];
            (*hdr)[6] = backend.addr[0];
            (*hdr)[7] = backend.addr[1];
            (*hdr)[8] = backend.addr[2];
            (*hdr)[9] = backend.addr[3];
        }
    } else {
        let Ok(hdr) = ptr_at::<[u32; 5]>(ctx, ETH_HLEN) else {
            return xdp_action::XDP_ABORTED;
        };
        src4 = vary_source(cfg.src4, cfg.src4_vary_bits, hash);
        // Built in host order as five 32-bit words and stored big-endian; the checksum is
        // the one's-complement sum of the 16-bit words as sent, which a sum of the 32-bit
        // words folded twice gives.
        // Don't Fragment: a tunnel packet is never fragmented on the way (the backend's
        // decapsulation could not reassemble it, and one too big for the egress is
        // dropped here), so it is an atomic datagram and ID 0 is allowed (RFC 6864).
        let (s, d) = (u32::from_be(src4), u32::from_be(backend.addr[0]));
        let w0 = 0x4500_0000 | (tos as u32) << 16 | (outer_total & 0xffff);
        let w1 = IPV4_DF as u32;
        let w2 = (OUTER_TTL as u32) << 24 | (inner_proto as u32) << 16;
        let sum = w0 as u64 + w1 as u64 + w2 as u64 + s as u64 + d as u64;
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        let csum = csum_fold(((sum as u32) & 0xffff) + ((sum as u32) >> 16));
        // SAFETY: ptr_at checked the 20 bytes are inside the packet.
        unsafe {
            (*hdr)[0] = w0.to_be();
            (*hdr)[1] = w1.to_be();
            (*hdr)[2] = (w2 | csum as u32).to_be();
            (*hdr)[3] = src4;
            (*hdr)[4] = backend.addr[0];
        }
    }

    let Ok(eth) = ptr_at::<[u8; ETH_HLEN]>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let ethertype = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    // SAFETY: ptr_at checked the 14 bytes are inside the packet.
    unsafe { core::ptr::write_unaligned((eth as *mut u8).add(12) as *mut u16, ethertype.to_be()) };

    // The cached route lookup for this backend, if still fresh. Aged in jiffies: the
    // verifier inlines bpf_jiffies64 as a load, where a clock helper call costs ~20 ns
    // per packet here (the precise clock ~150 ns).
    // SAFETY: plain helper call (inlined).
    let now = unsafe { bpf_jiffies64() } as u32;
    if let Some(nh) = NEXTHOPS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot; only this CPU touches it during the program.
        let nh = unsafe { &*nh };
        if nh.fresh(now) {
            if outer_total > nh.mtu {
                count(Counter::DropTooBig);
                return xdp_action::XDP_DROP;
            }
            // SAFETY: ptr_at checked the 14 bytes above; dmac and smac are the first 12
            // bytes of the NextHop.
            unsafe { write_macs(eth as *mut u8, read_macs(nh as *const NextHop as *const u8)) };
            return transmit(ctx, nh.ifindex);
        }
    }
    // Not cached: the frame keeps its own addresses unless the lookup gives others.
    // SAFETY: ptr_at checked the 14 bytes above.
    unsafe { write_macs(eth as *mut u8, macs) };

    // SAFETY: bpf_fib_lookup is a plain C struct for which all-zero is valid.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_1.tot_len = outer_total as u16;
    if outer_v6 {
        fib.family = AF_INET6;
        // SAFETY: both fields are [u32; 4] inside `fib`.
        unsafe {
            store_words(&raw mut fib.__bindgen_anon_3.ipv6_src, src6);
            store_words(&raw mut fib.__bindgen_anon_4.ipv6_dst, backend.addr);
        }
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = src4;
        fib.__bindgen_anon_4.ipv4_dst = backend.addr[0];
    }
    // SAFETY: fib is a valid, initialised bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // SAFETY: as above.
            unsafe {
                (&mut *eth)[..6].copy_from_slice(&fib.dmac);
                (&mut *eth)[6..12].copy_from_slice(&fib.smac);
            }
            if let Some(nh) = NEXTHOPS.get_ptr_mut(backend_id) {
                // SAFETY: as above; the union holds the route's MTU after a success.
                unsafe {
                    *nh = NextHop {
                        dmac: fib.dmac,
                        smac: fib.smac,
                        ifindex: fib.ifindex,
                        mtu: fib.__bindgen_anon_1.mtu_result as u32,
                        expires_jiffies: NextHop::expiry(now),
                        // A plain helper call (inside the unsafe block); once a TTL
                        // per backend and CPU.
                        expires_ns: bpf_ktime_get_coarse_ns() + NEXTHOP_TTL_NS,
                    };
                }
            }
            transmit(ctx, fib.ifindex)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            count(Counter::PassNoNeigh);
            xdp_action::XDP_PASS
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            count(Counter::DropTooBig);
            xdp_action::XDP_DROP
        }
        _ => {
            count(Counter::DropFib);
            xdp_action::XDP_DROP
        }
    }
}

/// The 12 bytes of two MAC addresses (destination, source) at `p`, as one 8-byte and one
/// 4-byte load: a `[u8; 12]` copy compiles to 24 single-byte loads and stores.
///
/// # Safety
/// `p` must be valid for reading 12 bytes.
#[inline(always)]
unsafe fn read_macs(p: *const u8) -> (u64, u32) {
    // SAFETY: the caller's contract; the object allows misaligned access.
    unsafe {
        (
            core::ptr::read_unaligned(p as *const u64),
            core::ptr::read_unaligned(p.add(8) as *const u32),
        )
    }
}

/// Writes what `read_macs` read.
///
/// # Safety
/// `p` must be valid for writing 12 bytes.
#[inline(always)]
unsafe fn write_macs(p: *mut u8, (a, b): (u64, u32)) {
    // SAFETY: the caller's contract; the object allows misaligned access.
    unsafe {
        core::ptr::write_unaligned(p as *mut u64, a);
        core::ptr::write_unaligned(p.add(8) as *mut u32, b);
    }
}

/// Stores four words one by one. The object is built with misaligned access allowed,
/// so LLVM would merge neighbouring 4-byte stores into 8-byte ones; on the stack at an
/// offset that is 4 mod 8 the verifier refuses those (it checks stack alignment always).
///
/// # Safety
/// `dst` must be valid for writing four u32 words.
#[inline(always)]
pub unsafe fn store_words(dst: *mut [u32; 4], v: [u32; 4]) {
    let p = dst as *mut u32;
    let mut i = 0;
    while i < 4 {
        // SAFETY: the caller's contract; i < 4.
        unsafe { core::ptr::write_volatile(p.add(i), v[i]) };
        i += 1;
    }
}

/// Out of the ingress interface (XDP_TX) or another one (redirect).
#[inline(always)]
fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        count(Counter::Tx);
        xdp_action::XDP_TX
    } else {
        count(Counter::Redirect);
        // SAFETY: plain helper call; it validates the ifindex.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

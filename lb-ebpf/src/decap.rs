//! Backend side: strips the outer IPv4/IPv6 header of IPIP, IP6IP6, 4in6 and 6in4
//! packets addressed to this host and hands the inner packet to the stack, for hosts
//! without the ipip/ip6tnl drivers.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_head, programs::XdpContext,
};
use lb_common::{counters::Counter, maps::*, packet::*};

use crate::{
    maps::{DECAP_ADDRS, count},
    parse::{self, ptr_at},
};

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = parse::parse(ctx) else {
        return xdp_action::XDP_PASS;
    };
    if pkt.fragment || (pkt.proto != IPPROTO_IPIP && pkt.proto != IPPROTO_IPV6) {
        return xdp_action::XDP_PASS;
    }
    let key = AddrKey {
        addr: pkt.dst,
        family: if pkt.ipv6 { FAMILY_V6 } else { FAMILY_V4 },
        _pad: [0; 3],
    };
    // SAFETY: only checked for presence.
    if unsafe { DECAP_ADDRS.get(key) }.is_none() {
        return xdp_action::XDP_PASS;
    }
    let Ok(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: ptr_at checked the bounds.
    let macs = unsafe { *eth };
    // The inner header starts at l4_off; the new Ethernet header goes right before it.
    let delta = pkt.l4_off as i32 - ETH_HLEN as i32;
    // SAFETY: the helper validates the new head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return xdp_action::XDP_PASS;
    }
    let Ok(eth) = ptr_at::<[u8; ETH_HLEN]>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let ethertype = if pkt.proto == IPPROTO_IPV6 {
        ETH_P_IPV6
    } else {
        ETH_P_IP
    }
    .to_be_bytes();
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        (&mut *eth)[..12].copy_from_slice(&macs);
        (*eth)[12] = ethertype[0];
        (*eth)[13] = ethertype[1];
    }
    count(Counter::DecapOk);
    xdp_action::XDP_PASS
}

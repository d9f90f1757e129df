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
    // The outer header's ECN field, for RFC 6040's decapsulation rule below.
    let Ok(outer) = ptr_at::<[u8; 2]>(ctx, pkt.l3_off) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: ptr_at checked the bounds.
    let outer_ecn = unsafe {
        if pkt.ipv6 {
            ((*outer)[1] >> 4) & ECN_MASK
        } else {
            (*outer)[1] & ECN_MASK
        }
    };
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
    if outer_ecn == ECN_CE && !carry_ce(ctx, pkt.proto == IPPROTO_IPV6) {
        count(Counter::DecapCeNotEct);
        return xdp_action::XDP_DROP;
    }
    count(Counter::DecapOk);
    xdp_action::XDP_PASS
}

const ECN_MASK: u8 = 0x03;
const ECN_CE: u8 = 0x03;

/// RFC 6040: congestion a router on the tunnel marked (CE on the outer header) goes on in
/// the inner header when the inner packet is ECN-capable; a packet that is not cannot
/// carry it and must be dropped (returns false). The inner header is at ETH_HLEN.
#[inline(always)]
fn carry_ce(ctx: &XdpContext, inner_v6: bool) -> bool {
    if inner_v6 {
        let Ok(ip) = ptr_at::<[u8; 2]>(ctx, ETH_HLEN) else {
            return true;
        };
        // SAFETY: ptr_at checked the bounds.
        unsafe {
            if ((*ip)[1] >> 4) & ECN_MASK == 0 {
                return false;
            }
            (*ip)[1] |= ECN_CE << 4;
        }
        return true;
    }
    let Ok(ip) = ptr_at::<[u8; 12]>(ctx, ETH_HLEN) else {
        return true;
    };
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        let tos = (*ip)[1];
        if tos & ECN_MASK == 0 {
            return false;
        }
        if tos & ECN_MASK == ECN_CE {
            return true;
        }
        // The header checksum, updated for the one changed 16-bit word (RFC 1624):
        // HC' = ~(~HC + ~m + m').
        let old = u16::from_be_bytes([(*ip)[0], tos]);
        let new = u16::from_be_bytes([(*ip)[0], tos | ECN_CE]);
        let hc = u16::from_be_bytes([(*ip)[10], (*ip)[11]]);
        let mut sum = (!hc) as u32 + (!old) as u32 + new as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let hc = !(sum as u16);
        (*ip)[1] = tos | ECN_CE;
        (*ip)[10] = (hc >> 8) as u8;
        (*ip)[11] = hc as u8;
    }
    true
}

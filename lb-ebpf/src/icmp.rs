//! ICMP for VIP flows. A backend answers clients directly (direct server return), with
//! the VIP as its source; when one of its packets is too big for a link on the way, the
//! router there sends "fragmentation needed" (ICMPv4) or "packet too big" (ICMPv6) to
//! the VIP, which leads here. Path MTU discovery works only if that message reaches the
//! backend that sent the packet, so it goes where the flow it quotes goes (Katran does
//! the same).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{counters::Counter, hash::flow_hash, maps::*, packet::*};

use crate::{
    balancer::maglev_pick,
    encap,
    maps::{BACKEND_STATS, BACKENDS, add_traffic, conn_get, count, vip_lookup},
    parse::{Packet, field, ptr_at},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// Type, code, checksum and the 4-byte field (next-hop MTU) before the quoted packet.
const ICMP_HLEN: usize = 8;

/// The verdict for an ICMP packet to a VIP address: `Some` when it quotes a packet of a
/// VIP flow and goes to that flow's backend (or is dropped for want of one), `None` to
/// treat it as before (handed to the host).
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, pkt: &Packet, cfg: &Config, packet_len: usize) -> Option<u32> {
    let icmp = ptr_at::<[u8; ICMP_HLEN]>(ctx, pkt.l4_off).ok()?;
    let (kind, code): (u8, u8) = (field(icmp, 0), field(icmp, 1));
    let too_big = if pkt.ipv6 {
        pkt.proto == IPPROTO_ICMPV6 && kind == ICMPV6_PACKET_TOO_BIG
    } else {
        pkt.proto == IPPROTO_ICMP && kind == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED
    };
    if !too_big || pkt.l3_off + pkt.ip_len as usize > packet_len {
        return None;
    }
    // The quoted packet: the backend's reply, VIP:port -> client:port. Its source must
    // be the VIP this message was sent to.
    let family = if pkt.ipv6 { FAMILY_V6 } else { FAMILY_V4 };
    let mut key = FlowKey {
        src: [0; 4],
        dst: [0; 4],
        sport: 0,
        dport: 0,
        proto: 0,
        family,
        _pad: [0; 2],
    };
    // Word by word: LLVM may place the key at 4 mod 8 and merge a whole-array copy into
    // 8-byte stores there, which the verifier refuses (encap::store_words).
    // SAFETY: key.dst is four u32 words.
    unsafe { encap::store_words(&raw mut key.dst, pkt.dst) };
    let quoted = pkt.l4_off + ICMP_HLEN;
    let l4 = if pkt.ipv6 {
        let ip = ptr_at::<[u8; IPV6_HLEN]>(ctx, quoted).ok()?;
        if field::<_, u8>(ip, 0) >> 4 != 6 || field::<_, [u32; 4]>(ip, 8) != pkt.dst {
            return None;
        }
        key.proto = field(ip, 6);
        // SAFETY: key.src is four u32 words.
        unsafe { encap::store_words(&raw mut key.src, field(ip, 24)) };
        quoted + IPV6_HLEN
    } else {
        let ip = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, quoted).ok()?;
        let vihl: u8 = field(ip, 0);
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < IPV4_MIN_HLEN || field::<_, u32>(ip, 12) != pkt.dst[0] {
            return None;
        }
        key.proto = field(ip, 9);
        key.src[0] = field(ip, 16);
        quoted + (ihl & 0x3c)
    };
    if key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP {
        return None;
    }
    let ports = ptr_at::<[u16; 2]>(ctx, l4).ok()?;
    // The reply's ports the other way round: the flow as its client's packets key it.
    key.dport = field(ports, 0);
    key.sport = field(ports, 2);
    let vip_key = VipKey {
        addr: pkt.dst,
        port: key.dport,
        proto: key.proto,
        family,
    };
    let vip = vip_lookup(cfg, &vip_key)?;
    let service = vip.service;
    // A join port's subflows belong to its backend and have no table entry.
    let mut backend_id = match conn_get(&key) {
        _ if vip.flags & VIP_JOIN_PORT != 0 => vip.join_backend(),
        Some(c) if BACKENDS.get(c.backend).is_some_and(|b| b.flags != 0) => c.backend,
        _ => 0,
    };
    let hash = flow_hash(&key, cfg.seed);
    if backend_id == 0 {
        backend_id = maglev_pick(cfg, service, hash);
    }
    let Some(backend) = BACKENDS.get(backend_id).copied() else {
        count(Counter::DropNoBackend);
        return Some(xdp_action::XDP_DROP);
    };
    if backend_id == 0 || backend.flags == 0 {
        count(Counter::DropNoBackend);
        return Some(xdp_action::XDP_DROP);
    }
    count(Counter::IcmpToBackend);
    add_traffic(&BACKEND_STATS, backend_id, packet_len as u64);
    Some(encap::forward(
        ctx, cfg, &key, hash, true, backend_id, &backend, pkt.l3_off, pkt.ip_len, pkt.ipv6,
    ))
}

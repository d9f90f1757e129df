//! Packet builders for fixtures and benchmarks (etherparse does the checksums).

use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep, TcpHeader};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// TCP flags for [`tcp4`]/[`tcp6`].
#[derive(Clone, Copy, Default)]
pub struct Flags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

pub const SYN: Flags = Flags {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const ACK: Flags = Flags {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
pub const SYN_ACK: Flags = Flags {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};

fn tcp_step(
    b: PacketBuilderStep<IpHeaders>,
    sport: u16,
    dport: u16,
    flags: Flags,
    options: &[u8],
) -> PacketBuilderStep<TcpHeader> {
    let mut t = b.tcp(sport, dport, 1000, 64240);
    if flags.syn {
        t = t.syn();
    }
    if flags.ack {
        t = t.ack(1);
    }
    if flags.fin {
        t = t.fin();
    }
    if flags.rst {
        t = t.rst();
    }
    if !options.is_empty() {
        t = t
            .options_raw(options)
            .expect("TCP options must be a multiple of 4, at most 40");
    }
    t
}

/// An Ethernet + IPv4 + TCP packet.
pub fn tcp4(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: Flags,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv4(src, dst, 64);
    let b = tcp_step(b, sport, dport, flags, options);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).expect("write packet");
    v
}

/// An Ethernet + IPv6 + TCP packet.
pub fn tcp6(
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    flags: Flags,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv6(src, dst, 64);
    let b = tcp_step(b, sport, dport, flags, options);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).expect("write packet");
    v
}

/// An Ethernet + IPv4 + UDP packet.
pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).expect("write packet");
    v
}

/// An Ethernet + IPv6 + UDP packet.
pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).expect("write packet");
    v
}

/// Inserts an 802.1Q tag with `vid` after the MAC addresses.
pub fn with_vlan(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(frame.len() + 4);
    v.extend_from_slice(&frame[..12]);
    v.extend_from_slice(&0x8100u16.to_be_bytes());
    v.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    v.extend_from_slice(&frame[12..]);
    v
}

/// RFC 1071 checksum over `bytes`.
pub fn inet_csum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IP packet inside an Ethernet frame (after an optional VLAN tag), trimmed to the
/// length its own header gives.
pub fn ip_of(frame: &[u8]) -> Vec<u8> {
    let off = if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    };
    let ip = &frame[off..];
    let len = if ip[0] >> 4 == 4 {
        usize::from(u16::from_be_bytes([ip[2], ip[3]]))
    } else {
        40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))
    };
    ip[..len].to_vec()
}

/// The DSCP and ECN bits of an IP packet (IPv4 TOS, IPv6 traffic class).
pub fn tos_of(ip: &[u8]) -> u8 {
    if ip[0] >> 4 == 6 {
        (ip[0] << 4) | (ip[1] >> 4)
    } else {
        ip[1]
    }
}

/// What the balancer must emit for `inner` sent to an IPv4 backend: Ethernet, then an
/// outer IPv4 header (the inner packet's DSCP and ECN, Don't Fragment with ID 0,
/// protocol 4 or 41 after the inner version, TTL 64, no options, checksum), then the
/// inner packet untouched.
pub fn ipip4(dmac: [u8; 6], smac: [u8; 6], src: [u8; 4], dst: [u8; 4], inner: &[u8]) -> Vec<u8> {
    let proto = if inner[0] >> 4 == 6 { 41 } else { 4 };
    let total = (20 + inner.len()) as u16;
    let mut ip = vec![0x45, tos_of(inner)];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = inet_csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut v = Vec::new();
    v.extend_from_slice(&dmac);
    v.extend_from_slice(&smac);
    v.extend_from_slice(&0x0800u16.to_be_bytes());
    v.extend_from_slice(&ip);
    v.extend_from_slice(inner);
    v
}

/// The same for an IPv6 backend: outer IPv6 with the inner packet's DSCP and ECN as its
/// traffic class, next header 4 or 41, hop limit 64 and the given flow label.
pub fn ipip6(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    flow_label: u32,
    inner: &[u8],
) -> Vec<u8> {
    let nh = if inner[0] >> 4 == 6 { 41 } else { 4 };
    let mut v = Vec::new();
    v.extend_from_slice(&dmac);
    v.extend_from_slice(&smac);
    v.extend_from_slice(&0x86ddu16.to_be_bytes());
    let tc = u32::from(tos_of(inner)) << 20;
    v.extend_from_slice(&(0x6000_0000u32 | tc | (flow_label & 0xf_ffff)).to_be_bytes());
    v.extend_from_slice(&(inner.len() as u16).to_be_bytes());
    v.extend_from_slice(&[nh, 64]);
    v.extend_from_slice(&src);
    v.extend_from_slice(&dst);
    v.extend_from_slice(inner);
    v
}

/// An ICMPv4 "fragmentation needed" (type 3, code 4) from `src` to `dst` announcing
/// `mtu`, quoting `quoted` (an IP packet, as a router quotes the packet it could not send).
pub fn icmp4_frag_needed(src: [u8; 4], dst: [u8; 4], mtu: u16, quoted: &[u8]) -> Vec<u8> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ));
    let mut v = Vec::with_capacity(b.size(quoted.len()));
    b.write(&mut v, quoted).expect("write packet");
    v
}

/// An ICMPv6 "packet too big" from `src` to `dst` announcing `mtu`, quoting `quoted`.
pub fn icmp6_too_big(src: [u8; 16], dst: [u8; 16], mtu: u32, quoted: &[u8]) -> Vec<u8> {
    use etherparse::Icmpv6Type;
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu });
    let mut v = Vec::with_capacity(b.size(quoted.len()));
    b.write(&mut v, quoted).expect("write packet");
    v
}

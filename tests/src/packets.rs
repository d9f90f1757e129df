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

//! Header parsing with a single bounds-checked accessor; no other raw pointer arithmetic.

use aya_ebpf::programs::XdpContext;
use lb_common::packet::*;

/// Why a packet was not parsed to the end.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than the header it claims to carry.
    Truncated,
    /// Not IPv4 or IPv6, or an IP version nibble that does not match the EtherType.
    NotIp,
    /// An IPv4 header length below 20 bytes.
    BadHeader,
}

/// What the balancer needs to know about a packet.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the transport header, when there is one we parsed.
    pub l4_off: usize,
    pub ipv6: bool,
    /// Transport protocol (IPv4 protocol or IPv6 next header).
    pub proto: u8,
    /// Addresses in network byte order; IPv4 uses word 0 only.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Ports in network byte order; 0 when there is no TCP/UDP header.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// An IPv4 fragment (MF set or a non-zero offset).
    pub fragment: bool,
    /// Length of the IP packet from its own header (total length / payload + 40).
    pub ip_len: u16,
}

/// The one accessor for packet memory: a pointer to a `T` at `off`, or `Truncated` when
/// the packet ends before the `T` does.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(ParseError::Truncated);
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Result<T, ParseError> {
    let p = ptr_at::<T>(ctx, off)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p lie inside the packet;
    // read_unaligned because headers have no alignment guarantee.
    Ok(unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, ParseError> {
    let mut off = ETH_HLEN;
    let mut ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?);
        off += VLAN_HLEN;
    }
    let mut pkt = Packet {
        l4_off: 0,
        ipv6: false,
        proto: 0,
        src: [0; 4],
        dst: [0; 4],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        fragment: false,
        ip_len: 0,
    };
    match ethertype {
        ETH_P_IP => {
            let vihl = read::<u8>(ctx, off)?;
            if vihl >> 4 != 4 {
                return Err(ParseError::NotIp);
            }
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < IPV4_MIN_HLEN {
                return Err(ParseError::BadHeader);
            }
            // The whole header, options included, must be in the packet.
            ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, off)?;
            pkt.ip_len = u16::from_be(read::<u16>(ctx, off + 2)?);
            let frag = u16::from_be(read::<u16>(ctx, off + 6)?);
            pkt.fragment = frag & (IPV4_MF | IPV4_OFFSET_MASK) != 0;
            pkt.proto = read::<u8>(ctx, off + 9)?;
            pkt.src[0] = read::<u32>(ctx, off + 12)?;
            pkt.dst[0] = read::<u32>(ctx, off + 16)?;
            pkt.l4_off = off + ihl;
            if pkt.l4_off > ctx.data_end() - ctx.data() {
                return Err(ParseError::Truncated);
            }
        }
        ETH_P_IPV6 => {
            let v = read::<u8>(ctx, off)?;
            if v >> 4 != 6 {
                return Err(ParseError::NotIp);
            }
            pkt.ipv6 = true;
            ptr_at::<[u8; IPV6_HLEN]>(ctx, off)?;
            pkt.ip_len = u16::from_be(read::<u16>(ctx, off + 4)?).wrapping_add(IPV6_HLEN as u16);
            pkt.proto = read::<u8>(ctx, off + 6)?;
            pkt.src = read::<[u32; 4]>(ctx, off + 8)?;
            pkt.dst = read::<[u32; 4]>(ctx, off + 24)?;
            pkt.l4_off = off + IPV6_HLEN;
        }
        _ => return Err(ParseError::NotIp),
    }
    if pkt.fragment {
        return Ok(pkt);
    }
    match pkt.proto {
        IPPROTO_TCP => {
            ptr_at::<[u8; TCP_MIN_HLEN]>(ctx, pkt.l4_off)?;
            pkt.sport = read::<u16>(ctx, pkt.l4_off)?;
            pkt.dport = read::<u16>(ctx, pkt.l4_off + 2)?;
            pkt.tcp_flags = read::<u8>(ctx, pkt.l4_off + 13)?;
        }
        IPPROTO_UDP => {
            ptr_at::<[u8; UDP_HLEN]>(ctx, pkt.l4_off)?;
            pkt.sport = read::<u16>(ctx, pkt.l4_off)?;
            pkt.dport = read::<u16>(ctx, pkt.l4_off + 2)?;
        }
        _ => {}
    }
    Ok(pkt)
}

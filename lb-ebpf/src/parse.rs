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
    /// Offset of the IP header (after Ethernet and an optional VLAN tag).
    pub l3_off: usize,
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
    /// TCP header length in bytes (data offset x 4, at least 20); 0 when not TCP.
    pub tcp_hlen: usize,
    /// An IPv4 fragment (MF set or a non-zero offset).
    pub fragment: bool,
    /// Length of the IP packet from its own header (total length / payload + 40).
    pub ip_len: u16,
    /// The IP header is whole but the TCP/UDP header is cut short.
    pub l4_truncated: bool,
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

/// Reads a `T` at `off` inside a header `H` whose pointer `ptr_at` already checked; the
/// verifier then sees a constant offset from a checked pointer.
#[inline(always)]
pub fn field<H, T: Copy>(hdr: *const H, off: usize) -> T {
    debug_assert!(off + core::mem::size_of::<T>() <= core::mem::size_of::<H>());
    // SAFETY: callers pass offsets inside H (the assertion above in debug builds), and
    // hdr was bounds-checked for size_of::<H>() bytes.
    unsafe { core::ptr::read_unaligned((hdr as *const u8).add(off) as *const T) }
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
        l3_off: off,
        l4_off: 0,
        ipv6: false,
        proto: 0,
        src: [0; 4],
        dst: [0; 4],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        tcp_hlen: 0,
        fragment: false,
        ip_len: 0,
        l4_truncated: false,
    };
    match ethertype {
        ETH_P_IP => {
            let ip = ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, off)?;
            let vihl: u8 = field(ip, 0);
            if vihl >> 4 != 4 {
                return Err(ParseError::NotIp);
            }
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < IPV4_MIN_HLEN {
                return Err(ParseError::BadHeader);
            }
            pkt.ip_len = u16::from_be(field(ip, 2));
            if (pkt.ip_len as usize) < ihl {
                return Err(ParseError::BadHeader);
            }
            let frag = u16::from_be(field(ip, 6));
            pkt.fragment = frag & (IPV4_MF | IPV4_OFFSET_MASK) != 0;
            pkt.proto = field(ip, 9);
            pkt.src[0] = field(ip, 12);
            pkt.dst[0] = field(ip, 16);
            pkt.l4_off = off + ihl;
        }
        ETH_P_IPV6 => {
            let ip = ptr_at::<[u8; IPV6_HLEN]>(ctx, off)?;
            let v: u8 = field(ip, 0);
            if v >> 4 != 6 {
                return Err(ParseError::NotIp);
            }
            pkt.ipv6 = true;
            // A payload length this large (jumbograms aside, which carry 0 here) cannot
            // be real, and the IP length would wrap around u16.
            let payload = u16::from_be(field(ip, 4));
            if payload as usize > u16::MAX as usize - IPV6_HLEN {
                return Err(ParseError::BadHeader);
            }
            pkt.ip_len = payload + IPV6_HLEN as u16;
            pkt.proto = field(ip, 6);
            pkt.src = field(ip, 8);
            pkt.dst = field(ip, 24);
            pkt.l4_off = off + IPV6_HLEN;
        }
        _ => return Err(ParseError::NotIp),
    }
    if pkt.fragment {
        return Ok(pkt);
    }
    match pkt.proto {
        IPPROTO_TCP => {
            let Ok(tcp) = ptr_at::<[u8; TCP_MIN_HLEN]>(ctx, pkt.l4_off) else {
                pkt.l4_truncated = true;
                return Ok(pkt);
            };
            pkt.sport = field(tcp, 0);
            pkt.dport = field(tcp, 2);
            pkt.tcp_flags = field(tcp, 13);
            let doff: u8 = field(tcp, 12);
            pkt.tcp_hlen = ((doff >> 4) as usize) * 4;
            // A data offset below 5 is a broken header, one past the end of the IP
            // packet a cut one (its options would be read from padding or nothing).
            if pkt.tcp_hlen < TCP_MIN_HLEN
                || pkt.l4_off + pkt.tcp_hlen > pkt.l3_off + pkt.ip_len as usize
            {
                pkt.l4_truncated = true;
            }
        }
        IPPROTO_UDP => {
            let Ok(udp) = ptr_at::<[u8; UDP_HLEN]>(ctx, pkt.l4_off) else {
                pkt.l4_truncated = true;
                return Ok(pkt);
            };
            pkt.sport = field(udp, 0);
            pkt.dport = field(udp, 2);
            // A UDP header past the end of the IP packet is a cut one.
            if pkt.l4_off + UDP_HLEN > pkt.l3_off + pkt.ip_len as usize {
                pkt.l4_truncated = true;
            }
        }
        _ => {}
    }
    Ok(pkt)
}

//! Backend side: every SYN/ACK with MP_CAPABLE that leaves the backend carries the server
//! key of a new MPTCP connection, one client round trip before the client's third ACK
//! or any join can reach a balancer. This tc egress program hands the key, the version
//! and the VIP:port the connection was made to (the SYN/ACK's source, under direct
//! server return) to `mptcp-lb agent` through a ring buffer; the agent derives the token
//! and announces it to the balancer nodes. It never changes or drops a packet.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use lb_common::{
    maps::{FAMILY_V4, FAMILY_V6, TokenEvent},
    mptcp::{self, MptcpOption},
    packet::*,
};

use crate::maps::{OPTION_SCRATCH, TOKEN_EVENTS};

#[inline(always)]
pub fn token_egress(ctx: &TcContext) -> i32 {
    let _ = report(ctx);
    TC_ACT_OK
}

#[inline(always)]
fn report(ctx: &TcContext) -> Option<()> {
    let mut ev = TokenEvent::default();
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let l3 = ETH_HLEN;
    let l4 = match ethertype {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(l3).ok()?;
            if vihl >> 4 != 4 || ctx.load::<u8>(l3 + 9).ok()? != IPPROTO_TCP {
                return None;
            }
            // No fragment carries a whole SYN/ACK's options worth reading.
            if u16::from_be(ctx.load::<u16>(l3 + 6).ok()?) & 0x3fff != 0 {
                return None;
            }
            ev.family = FAMILY_V4;
            ev.addr[0] = ctx.load::<u32>(l3 + 12).ok()?;
            l3 + ((vihl & 0x0f) as usize) * 4
        }
        ETH_P_IPV6 => {
            // A backend's SYN/ACK has no extension headers.
            if ctx.load::<u8>(l3 + 6).ok()? != IPPROTO_TCP {
                return None;
            }
            ev.family = FAMILY_V6;
            // Word by word: a 16-byte load lands misaligned on the stack.
            let mut w = 0;
            while w < 4 {
                ev.addr[w] = ctx.load::<u32>(l3 + 8 + w * 4).ok()?;
                w += 1;
            }
            l3 + IPV6_HLEN
        }
        _ => return None,
    };
    if l4 < l3 + 20 {
        return None;
    }
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN | TCP_FLAG_ACK {
        return None;
    }
    ev.port = ctx.load::<u16>(l4).ok()?;
    let hlen = ((ctx.load::<u8>(l4 + 12).ok()? >> 4) as usize) * 4;
    let len = hlen.wrapping_sub(TCP_MIN_HLEN);
    if len == 0 || len > mptcp::MAX_OPTION_BYTES {
        return None;
    }
    let buf = OPTION_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value used only by this program on this CPU, now.
    let buf = unsafe { &mut *buf };
    // The options, a 32-bit word at a time (they come in words).
    let mut k = 0;
    while k < mptcp::MAX_OPTION_BYTES / 4 {
        let off = k * 4;
        if off >= len {
            break;
        }
        let w = ctx.load::<u32>(l4 + TCP_MIN_HLEN + off).ok()?.to_ne_bytes();
        buf[off & mptcp::MASK] = w[0];
        buf[(off + 1) & mptcp::MASK] = w[1];
        buf[(off + 2) & mptcp::MASK] = w[2];
        buf[(off + 3) & mptcp::MASK] = w[3];
        k += 1;
    }
    let Some(MptcpOption::Capable {
        version,
        sender_key: Some(key),
        ..
    }) = mptcp::find(buf, len)
    else {
        return None;
    };
    if version > 1 {
        return None;
    }
    ev.key = key;
    ev.version = version;
    TOKEN_EVENTS.output::<TokenEvent>(&ev, 0).ok()
}

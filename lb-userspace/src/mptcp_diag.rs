//! This host's MPTCP connections and their tokens, from the kernel (sock_diag with
//! `INET_DIAG_REQ_PROTOCOL` = IPPROTO_MPTCP, the listing `ss -M` prints).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

const IPPROTO_MPTCP: u32 = 262;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_REQ_PROTOCOL: u16 = 3;
const NLMSG_HDR: usize = 16;
const INET_DIAG_MSG: usize = 72;
const TCP_LISTEN: u8 = 10;
/// `struct mptcp_info`: six u8 counters, `mptcpi_flags` (u32), then `mptcpi_token`.
const MPTCP_INFO_TOKEN: usize = 12;

/// One MPTCP connection of this host: its token and its local address (for a server,
/// the address and port the client connected to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    pub token: u32,
    pub local: SocketAddr,
}

/// Every MPTCP connection (not listeners) in this network namespace.
pub fn connections() -> io::Result<Vec<Connection>> {
    // SAFETY: socket() with constant arguments; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut out = Vec::new();
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        dump(&fd, seq, family, &mut out)?;
    }
    Ok(out)
}

fn dump(
    fd: &std::os::fd::OwnedFd,
    seq: u32,
    family: u8,
    out: &mut Vec<Connection>,
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // nlmsghdr, inet_diag_req_v2 (56 bytes), then the protocol attribute (8 bytes).
    let len = NLMSG_HDR + 56 + 8;
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // sdiag_family, sdiag_protocol (the attribute below overrides it), idiag_ext, pad.
    req.extend_from_slice(&[family, 0, 1 << (INET_DIAG_INFO - 1), 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: no filter
    req.extend_from_slice(&8u16.to_ne_bytes());
    req.extend_from_slice(&INET_DIAG_REQ_PROTOCOL.to_ne_bytes());
    req.extend_from_slice(&IPPROTO_MPTCP.to_ne_bytes());
    // SAFETY: sends `req`'s bytes on our socket; the kernel is the default destination.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: receives into `buf`, within its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= NLMSG_HDR {
            let mlen = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
            let mtype = u16::from_ne_bytes(msgs[4..6].try_into().expect("2 bytes"));
            if mlen < NLMSG_HDR || mlen > msgs.len() {
                return Err(io::Error::other("sock_diag: a truncated message"));
            }
            match mtype as i32 {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR if mlen >= NLMSG_HDR + 4 => {
                    let errno = i32::from_ne_bytes(msgs[16..20].try_into().expect("4 bytes"));
                    // No MPTCP diag module: no MPTCP connection can be listed.
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => {
                    if let Some(c) = parse(&msgs[NLMSG_HDR..mlen]) {
                        out.push(c);
                    }
                }
            }
            msgs = &msgs[((mlen + 3) & !3).min(msgs.len())..];
            if msgs.len() < NLMSG_HDR {
                break;
            }
        }
    }
}

/// One inet_diag_msg and its attributes.
fn parse(m: &[u8]) -> Option<Connection> {
    if m.len() < INET_DIAG_MSG || m[1] == TCP_LISTEN {
        return None;
    }
    let family = m[0];
    let sport = u16::from_be_bytes([m[4], m[5]]);
    let src: [u8; 16] = m[8..24].try_into().ok()?;
    let ip = if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(src)).to_canonical()
    };
    let mut attrs = &m[INET_DIAG_MSG..];
    while attrs.len() >= 4 {
        let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let atype = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if alen < 4 || alen > attrs.len() {
            return None;
        }
        if atype == INET_DIAG_INFO && alen >= 4 + MPTCP_INFO_TOKEN + 4 {
            let at = 4 + MPTCP_INFO_TOKEN;
            let token = u32::from_ne_bytes(attrs[at..at + 4].try_into().ok()?);
            return (token != 0).then_some(Connection {
                token,
                local: SocketAddr::new(ip, sport),
            });
        }
        attrs = &attrs[((alen + 3) & !3).min(attrs.len())..];
    }
    None
}

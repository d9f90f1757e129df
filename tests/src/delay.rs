//! A path with a real round trip: this kernel has no netem, so the client's links run
//! through a namespace where a small userspace relay copies every Ethernet frame from one
//! side to the other after a fixed delay, in both directions (an L2-transparent delaying
//! bridge: ARP and neighbour discovery pass through it too).

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::{Netns, veth};

/// Relays running between the client and the router; stopped when dropped.
pub struct Delay {
    stop: Arc<AtomicBool>,
    /// While set, the client's MPTCP third ACKs (MP_CAPABLE of length 20 on a pure ACK)
    /// are dropped on their way to the router, as a lossy Wi-Fi would.
    pub drop_third_acks: Arc<AtomicBool>,
    /// Third ACKs dropped so far.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    _ns: Netns,
}

/// Whether `frame` is a client's MPTCP third ACK: a TCP segment with ACK and not SYN,
/// carrying MP_CAPABLE (subtype 0) of length 20.
pub fn is_third_ack(frame: &[u8]) -> bool {
    let tcp = match frame.get(12..14) {
        Some([0x08, 0x00]) if frame.get(23) == Some(&6) => {
            14 + (frame.get(14).map_or(0, |v| v & 0x0f) as usize) * 4
        }
        Some([0x86, 0xdd]) if frame.get(20) == Some(&6) => 14 + 40,
        _ => return false,
    };
    let Some(hdr) = frame.get(tcp..tcp + 20) else {
        return false;
    };
    if hdr[13] & 0x12 != 0x10 {
        return false;
    }
    let end = (tcp + (hdr[12] >> 4) as usize * 4).min(frame.len());
    let mut at = tcp + 20;
    while at < end {
        match frame[at] {
            0 => return false,
            1 => at += 1,
            kind => {
                let Some(&len) = frame.get(at + 1) else {
                    return false;
                };
                if kind == 30 && len == 20 && frame.get(at + 2).is_some_and(|b| b >> 4 == 0) {
                    return true;
                }
                if len < 2 {
                    return false;
                }
                at += len as usize;
            }
        }
    }
    false
}

impl Drop for Delay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Puts delay on the router's links to the client (`links`: each device and its delay,
/// each way): each link's router end moves into a new namespace `<prefix>-delay`, a new
/// link takes its place in the router (same name, MAC and addresses), and a relay joins
/// the two.
pub fn delay_links(prefix: &str, router: &Netns, links: &[(&str, Duration)]) -> Delay {
    let ns = Netns::new(&format!("{prefix}-delay"));
    let stop = Arc::new(AtomicBool::new(false));
    let drop_third_acks = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut threads = Vec::new();
    for (n, (rdev, one_way)) in links.iter().enumerate() {
        let one_way = *one_way;
        let mac = router.mac(rdev);
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let addrs = router.run(&["ip", "-o", "addr", "show", "dev", rdev, "scope", "global"]);
        router.run(&["ip", "link", "set", rdev, "netns", ns.name()]);
        let inner = format!("dl{n}");
        veth(&ns, &inner, router, rdev, 1500);
        router.run(&["ip", "link", "set", rdev, "address", &mac]);
        for line in addrs.lines() {
            // "4: rtw    inet 10.1.1.1/24 ..." -> family and address.
            let mut f = line.split_whitespace().skip(2);
            if let (Some(_), Some(a)) = (f.next(), f.next()) {
                router.addr(rdev, a);
            }
        }
        router.offloads_off(rdev);
        for dev in [*rdev, inner.as_str()] {
            ns.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1");
            ns.run(&["ip", "link", "set", dev, "up"]);
            ns.offloads_off(dev);
        }
        let (a, b) = ns
            .enter({
                let (x, y) = (rdev.to_string(), inner.clone());
                move || (packet_socket(&x), packet_socket(&y))
            })
            .join()
            .expect("relay sockets");
        let (a, b) = (Arc::new(a), Arc::new(b));
        // `a` faces the client: what it reads goes to the router.
        let filter = Filter {
            on: drop_third_acks.clone(),
            dropped: dropped.clone(),
        };
        threads.extend(relay(
            a.clone(),
            b.clone(),
            one_way,
            stop.clone(),
            Some(filter),
        ));
        threads.extend(relay(b, a, one_way, stop.clone(), None));
    }
    Delay {
        stop,
        drop_third_acks,
        dropped,
        threads,
        _ns: ns,
    }
}

/// An AF_PACKET socket on `dev` (in the calling thread's namespace) that sees every
/// frame, with a 100 ms receive timeout so its reader can notice the stop.
fn packet_socket(dev: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket() with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(dev).expect("name");
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "no interface {dev}");
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: binds our socket to a valid sockaddr_ll of the right size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert!(r == 0, "bind {dev}: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO with a timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

/// Third ACKs to drop, while `on` is set.
struct Filter {
    on: Arc<AtomicBool>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// Frames that arrive on `from` leave by `to` `delay` later, in order.
fn relay(
    from: Arc<OwnedFd>,
    to: Arc<OwnedFd>,
    delay: Duration,
    stop: Arc<AtomicBool>,
    filter: Option<Filter>,
) -> [JoinHandle<()>; 2] {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: an all-zero sockaddr_ll is valid for recvfrom to fill.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receives into buf within its length, and the address into sll.
            let n = unsafe {
                libc::recvfrom(
                    from.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            // Frames this relay sent out of `from` come back as outgoing: not relayed.
            if n <= 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if let Some(f) = &filter
                && f.on.load(Ordering::Relaxed)
                && is_third_ack(&buf[..n as usize])
            {
                f.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if tx
                .send((Instant::now() + delay, buf[..n as usize].to_vec()))
                .is_err()
            {
                return;
            }
        }
    });
    let writer = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            let Ok((due, frame)) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // SAFETY: sends frame's bytes on our bound socket.
            unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        }
    });
    [reader, writer]
}

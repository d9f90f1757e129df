//! End to end, real kernel: a client, an edge router, a one-armed load balancer running
//! the XDP program, and backends with the VIP on `lo` that strip the tunnel with the
//! decapsulation program. Results are read where they happen: on the backends (which
//! connections each accepted) and on the client (every byte came back).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use aya::programs::XdpMode;
use lb_common::maps::{BACKEND_ACTIVE, Config};
use lb_userspace::{
    dataplane::{Dataplane, Sizes, addr_words},
    decap, maglev,
};
use mptcp_lb_tests::{
    netns::{Netns, veth},
    privileged,
};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
const PORT: u16 = 80;
const UPLOAD: usize = 20_000;
const DOWNLOAD: usize = 100_000;
const BPFFS: &str = "/sys/fs/bpf/mlb-e2e";

struct Testbed {
    client: Netns,
    router: Netns,
    lb: Netns,
    backends: Vec<Netns>,
}

fn backend_addr4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 10 + i as u8, 2)
}

/// Builds the topology; backend `i` (1-based) hangs off the router on 10.0.(10+i).0/24.
fn testbed(n_backends: usize) -> Testbed {
    let client = Netns::new("mlb-e2e-client");
    let router = Netns::new("mlb-e2e-router");
    let lb = Netns::new("mlb-e2e-lb");
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        router.sysctl(k, v);
    }
    veth(&client, "cl0", &router, "rtc", 1500);
    client.addr("cl0", "10.0.1.2/24");
    client.addr("cl0", "fd00:c1::2/64");
    client.route(&["default", "via", "10.0.1.1"]);
    client.run(&["ip", "-6", "route", "add", "default", "via", "fd00:c1::1"]);
    router.addr("rtc", "10.0.1.1/24");
    router.addr("rtc", "fd00:c1::1/64");

    // The balancer's link carries tunnelled packets: room for the outer header.
    veth(&lb, "lb0", &router, "rtl", 1600);
    lb.addr("lb0", "10.0.2.2/24");
    lb.addr("lb0", "fd00:a2::2/64");
    lb.route(&["default", "via", "10.0.2.1"]);
    lb.run(&["ip", "-6", "route", "add", "default", "via", "fd00:a2::1"]);
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.lb0.send_redirects", "0"),
    ] {
        lb.sysctl(k, v);
    }
    router.addr("rtl", "10.0.2.1/24");
    router.addr("rtl", "fd00:a2::1/64");
    router.route(&["10.100.0.1/32", "via", "10.0.2.2"]);
    router.route(&["fd00:100::1/128", "via", "fd00:a2::2"]);

    let backends = (1..=n_backends).map(|i| backend(&router, i)).collect();
    for (ns, dev) in [
        (&client, "cl0"),
        (&router, "rtc"),
        (&router, "rtl"),
        (&lb, "lb0"),
    ] {
        ns.offloads_off(dev);
    }
    Testbed {
        client,
        router,
        lb,
        backends,
    }
}

fn backend(router: &Netns, i: usize) -> Netns {
    let be = Netns::new(&format!("mlb-e2e-be{i}"));
    let rt_if = format!("rtb{i}");
    veth(&be, "eth0", router, &rt_if, 1600);
    be.addr("eth0", &format!("{}/24", backend_addr4(i)));
    be.addr("eth0", &format!("fd00:b{i}::2/64"));
    be.route(&["default", "via", &format!("10.0.{}.1", 10 + i)]);
    be.run(&[
        "ip",
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("fd00:b{i}::1"),
    ]);
    // VIP on lo; the backend must not answer ARP for it on its real interface.
    be.addr("lo", "10.100.0.1/32");
    be.addr("lo", "fd00:100::1/128");
    for (k, v) in [
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.eth0.rp_filter", "0"),
    ] {
        be.sysctl(k, v);
    }
    router.addr(&rt_if, &format!("10.0.{}.1/24", 10 + i));
    router.addr(&rt_if, &format!("fd00:b{i}::1/64"));
    router.offloads_off(&rt_if);
    be.offloads_off("eth0");
    let bpffs = format!("{BPFFS}/be{i}");
    be.within(move || decap::attach(&bpffs, "eth0", None).expect("attach decapsulation"));
    be
}

/// A server on a backend: reads UPLOAD bytes, answers DOWNLOAD bytes, counts connections.
struct Server {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

fn serve(ns: &Netns) -> Server {
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (a, s) = (accepted.clone(), stop.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    ns.enter(move || {
        // Dual-stack: v4 clients arrive as v4-mapped addresses.
        let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, PORT)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("ready");
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    a.fetch_add(1, Ordering::Relaxed);
                    std::thread::spawn(move || {
                        conn.set_nonblocking(false).expect("blocking");
                        conn.set_read_timeout(Some(Duration::from_secs(20)))
                            .expect("timeout");
                        let mut buf = vec![0u8; UPLOAD];
                        if conn.read_exact(&mut buf).is_ok()
                            && buf.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8)
                        {
                            let reply: Vec<u8> = (0..DOWNLOAD).map(|i| (i % 253) as u8).collect();
                            let _ = conn.write_all(&reply);
                        }
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server listening");
    Server { accepted, stop }
}

/// One client connection: the upload in two halves (`between` runs in the middle, to
/// change the balancer while the connection is established), then the whole download.
fn exchange(vip: IpAddr, between: impl FnOnce()) -> Result<(), String> {
    let addr = SocketAddr::new(vip, PORT);
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let upload: Vec<u8> = (0..UPLOAD).map(|i| (i % 251) as u8).collect();
    c.write_all(&upload[..UPLOAD / 2])
        .map_err(|e| format!("write: {e}"))?;
    between();
    c.write_all(&upload[UPLOAD / 2..])
        .map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; DOWNLOAD];
    c.read_exact(&mut got)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    if got.iter().enumerate().any(|(i, b)| *b != (i % 253) as u8) {
        return Err(format!("corrupted reply from {addr}"));
    }
    Ok(())
}

/// `n` connections from the client, `parallel` at a time, alternating IPv4 and IPv6.
fn run_clients(client: &Netns, n: usize, parallel: usize) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..parallel)
        .map(|_| {
            let next = next.clone();
            client.enter(move || {
                let mut errors = Vec::new();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= n {
                        return errors;
                    }
                    let vip = if k.is_multiple_of(2) {
                        IpAddr::V4(VIP4)
                    } else {
                        IpAddr::V6(VIP6)
                    };
                    if let Err(e) = exchange(vip, || {}) {
                        errors.push(e);
                    }
                }
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect()
}

fn members(ids: &[usize]) -> Vec<maglev::Member> {
    ids.iter()
        .map(|&i| maglev::Member {
            id: i as u32,
            key: backend_addr4(i).to_string(),
            weight: 1,
        })
        .collect()
}

#[test]
fn l4_balancing_with_direct_server_return() {
    if !privileged("l4_balancing_with_direct_server_return") {
        return;
    }
    let _ = std::fs::remove_dir_all(BPFFS);
    let tb = testbed(4);
    let servers: Vec<Server> = tb.backends.iter().map(serve).collect();

    // Negative control: without the balancer nothing answers on the VIP.
    let unreachable = tb.client.within(|| {
        TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V4(VIP4), PORT),
            Duration::from_millis(500),
        )
        .is_err()
    });
    assert!(
        unreachable,
        "the VIP must be unreachable before the balancer is attached"
    );

    let mut dp = tb.lb.within(|| {
        let mut dp = Dataplane::load(Sizes {
            ring_size: 65537,
            conn_entries: 1 << 16,
        })
        .expect("load balancer");
        dp.attach("lb0", Some(XdpMode::Skb)).expect("attach");
        dp
    });
    dp.set_config(Config {
        seed: 0x0bad_cafe,
        src4: addr_words("10.0.2.2".parse().expect("ip")).0[0],
        src6: addr_words("fd00:a2::2".parse().expect("ip")).0,
        ..Default::default()
    })
    .expect("config");
    for i in 1..=4 {
        dp.set_backend(i as u32, IpAddr::V4(backend_addr4(i)), BACKEND_ACTIVE)
            .expect("backend");
    }
    dp.add_vip(IpAddr::V4(VIP4), PORT, 6, 0).expect("vip4");
    dp.add_vip(IpAddr::V6(VIP6), PORT, 6, 0).expect("vip6");
    dp.set_ring(0, &members(&[1, 2, 3])).expect("ring");

    // Phase 1: 300 connections over three backends.
    let lb_before = tb.lb.link_stats("lb0");
    let errors = run_clients(&tb.client, 300, 12);
    assert!(
        errors.is_empty(),
        "{} of 300 connections failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let counts: Vec<usize> = servers
        .iter()
        .map(|s| s.accepted.load(Ordering::Relaxed))
        .collect();
    println!("connections accepted per backend: {counts:?}");
    assert_eq!(
        counts[..3].iter().sum::<usize>(),
        300,
        "every connection reached a backend exactly once"
    );
    assert_eq!(counts[3], 0, "backend 4 is not in the pool yet");
    for (i, c) in counts[..3].iter().enumerate() {
        assert!(
            (70..=130).contains(c),
            "backend {} got {c} of 300 connections (mean 100)",
            i + 1
        );
    }
    // Direct server return: the replies (300 x 100 kB) never cross the balancer.
    let lb_after = tb.lb.link_stats("lb0");
    let lb_rx = lb_after.rx_bytes - lb_before.rx_bytes;
    let downloaded = (300 * DOWNLOAD) as u64;
    println!("balancer received {lb_rx} bytes while clients downloaded {downloaded}");
    assert!(
        lb_rx < downloaded / 2,
        "reply traffic went through the balancer ({lb_rx} bytes)"
    );

    // Phase 2: add a fourth backend while 30 connections are established: none breaks.
    let established = Arc::new(Barrier::new(31));
    let resumed = Arc::new(Barrier::new(31));
    let handles: Vec<_> = (0..30)
        .map(|k: usize| {
            let (est, res) = (established.clone(), resumed.clone());
            tb.client.enter(move || {
                let vip = if k.is_multiple_of(2) {
                    IpAddr::V4(VIP4)
                } else {
                    IpAddr::V6(VIP6)
                };
                let r = exchange(vip, || {
                    est.wait();
                    res.wait();
                });
                if r.is_err() {
                    // exchange failed before the barrier: release the others.
                    est.wait();
                    res.wait();
                }
                r
            })
        })
        .collect();
    established.wait();
    let rewritten = dp
        .set_ring(0, &members(&[1, 2, 3, 4]))
        .expect("ring with backend 4");
    println!("adding backend 4 rewrote {rewritten} of 65537 Maglev slots");
    resumed.wait();
    let errors: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().expect("client").err())
        .collect();
    assert!(
        errors.is_empty(),
        "established connections broke when backend 4 was added: {errors:?}"
    );

    let before4 = servers[3].accepted.load(Ordering::Relaxed);
    let errors = run_clients(&tb.client, 80, 8);
    assert!(
        errors.is_empty(),
        "new connections failed after adding backend 4: {errors:?}"
    );
    let new4 = servers[3].accepted.load(Ordering::Relaxed) - before4;
    println!("backend 4 took {new4} of 80 new connections");
    assert!(new4 > 0, "the new backend takes new connections");

    for s in &servers {
        s.stop.store(true, Ordering::Relaxed);
    }
    for (i, be) in tb.backends.iter().enumerate() {
        let bpffs = format!("{BPFFS}/be{}", i + 1);
        be.within(move || decap::detach(&bpffs, "eth0").expect("detach"));
    }
    drop(tb.router);
    let _ = std::fs::remove_dir_all(BPFFS);
}

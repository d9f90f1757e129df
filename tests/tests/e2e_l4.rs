//! End to end, real kernel, plain TCP: a client, an edge router, a one-armed load
//! balancer running the XDP program, and backends with the VIP on `lo` that strip the
//! tunnel with the decapsulation program. Results are read where they happen: on the
//! backends (which connections each accepted) and on the client (every byte came back).

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    sync::atomic::Ordering,
    time::Duration,
};

use lb_common::maps::BACKEND_ACTIVE;
use lb_userspace::dataplane::Sizes;
use mptcp_lb_tests::{
    privileged,
    testbed::{
        DOWNLOAD, E2E_SIZES, LB4, PORT, Server, Testbed, VIP4, across, alternate, backend_addr4,
        run_clients, serve,
    },
};

#[test]
fn l4_balancing_with_direct_server_return() {
    if !privileged("l4_balancing_with_direct_server_return") {
        return;
    }
    let tb = Testbed::new("mlb-l4", 4);
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

    let mut dp = tb.balancer(E2E_SIZES, 0);
    for i in 1..=4 {
        dp.set_backend(i as u32, IpAddr::V4(backend_addr4(i)), BACKEND_ACTIVE)
            .expect("backend");
    }
    dp.set_ring(0, &Testbed::members(&[1, 2, 3])).expect("ring");

    // Phase 1: 300 plain TCP connections over three backends.
    let lb_before = tb.lb.link_stats("lb0");
    let errors = run_clients(&tb.client, 300, 12, false, alternate);
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
    let lb_rx = tb.lb.link_stats("lb0").rx_bytes - lb_before.rx_bytes;
    let downloaded = (300 * DOWNLOAD) as u64;
    println!("balancer received {lb_rx} bytes while clients downloaded {downloaded}");
    assert!(
        lb_rx < downloaded / 2,
        "reply traffic went through the balancer ({lb_rx} bytes)"
    );

    // Phase 2: add a fourth backend while 30 connections are established: none breaks.
    let errors = across(&tb.client, 30, false, alternate, || {
        let rewritten = dp
            .set_ring(0, &Testbed::members(&[1, 2, 3, 4]))
            .expect("ring with backend 4");
        println!("adding backend 4 rewrote {rewritten} of 65537 Maglev slots");
    });
    assert!(
        errors.is_empty(),
        "established connections broke when backend 4 was added: {errors:?}"
    );

    let before4 = servers[3].accepted.load(Ordering::Relaxed);
    let errors = run_clients(&tb.client, 80, 8, false, alternate);
    assert!(
        errors.is_empty(),
        "new connections failed after adding backend 4: {errors:?}"
    );
    let new4 = servers[3].accepted.load(Ordering::Relaxed) - before4;
    println!("backend 4 took {new4} of 80 new connections");
    assert!(new4 > 0, "the new backend takes new connections");
}

/// A backend whose next hop the balancer's host has no neighbour entry for: the program
/// hands the tunnelled packet to the kernel (`pass_no_neigh`), whose outer source is the
/// balancer's own address. The kernel must forward it and resolve the neighbour, which
/// it does only with `accept_local` on (what the daemon sets); without it the packet is a
/// martian, no ARP request leaves, and the VIP stays unreachable (the control).
#[test]
fn a_next_hop_without_a_neighbour_entry_is_resolved_by_the_kernel() {
    if !privileged("a_next_hop_without_a_neighbour_entry_is_resolved_by_the_kernel") {
        return;
    }
    let tb = Testbed::new("mlb-nn", 1);
    let _server = serve(&tb.backends[0]);
    // The router knows the balancer for good, so its own ARP requests never teach the
    // balancer's host the router's address behind the program's back.
    let lb_mac = tb.lb.mac("lb0");
    let mac = lb_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    tb.router.neigh_permanent("rtl", LB4, &mac);
    let mut dp = tb.balancer(
        Sizes {
            ring_size: 65537,
            conn_entries: 1 << 12,
            conn6_entries: 1 << 12,
            token_entries: 1 << 12,
        },
        0,
    );
    dp.set_backend(1, IpAddr::V4(backend_addr4(1)), BACKEND_ACTIVE)
        .expect("backend");
    dp.set_ring(0, &Testbed::members(&[1])).expect("ring");
    let router_neigh = || {
        tb.lb
            .run(&["ip", "-4", "neigh", "show", "10.0.2.1", "dev", "lb0"])
    };
    let connect = |timeout_ms| {
        tb.client.within(move || {
            TcpStream::connect_timeout(
                &SocketAddr::new(IpAddr::V4(VIP4), PORT),
                Duration::from_millis(timeout_ms),
            )
            .is_ok()
        })
    };
    let no_neigh = || {
        dp.counter(lb_common::counters::Counter::PassNoNeigh)
            .expect("counter")
    };

    // Control: accept_local off (the testbed's balancer has it on, as the daemon sets it).
    tb.lb.sysctl("net.ipv4.conf.lb0.accept_local", "0");
    tb.lb.run(&["ip", "neigh", "flush", "dev", "lb0"]);
    assert!(!connect(1500), "reached the VIP with accept_local off");
    assert!(no_neigh() >= 1, "the SYN was handed to the kernel");
    let neigh = router_neigh();
    assert!(
        !neigh.contains("REACHABLE") && !neigh.contains("STALE"),
        "the kernel resolved the next hop from a martian: {neigh}"
    );

    // What the daemon does before it attaches.
    assert!(
        tb.lb
            .within(|| lb_userspace::host::accept_own_source("lb0"))
            .expect("accept_local"),
        "accept_local was off"
    );
    tb.lb.run(&["ip", "neigh", "flush", "dev", "lb0"]);
    let before = no_neigh();
    assert!(
        connect(3000),
        "the VIP through a next hop resolved by the kernel"
    );
    assert!(
        no_neigh() > before,
        "the first packet went through the kernel"
    );
    let neigh = router_neigh();
    assert!(
        neigh.contains("REACHABLE") || neigh.contains("STALE") || neigh.contains("DELAY"),
        "the next hop is resolved: {neigh}"
    );
}

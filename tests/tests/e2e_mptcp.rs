//! MPTCP subflow affinity end to end with the real kernel MPTCP stack: every join of every
//! connection must reach the backend that owns the connection. Checked on the backends
//! themselves: their MPTCP counters (MPJoinNoTokenFound, MPJoinSynRx) and, per accepted
//! connection, its token and its subflows' address families read from the socket.
//!
//! The client has two paths. IPv6 connections start on cell and join from the wifi IPv6
//! address (a `subflow` endpoint). IPv4 connections start on wifi; the backends announce
//! the IPv6 VIP (a `signal` endpoint), so their join crosses families and paths: it
//! arrives on the IPv6 VIP for a connection the IPv4 VIP began.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::atomic::Ordering,
};

use lb_common::{
    counters::Counter,
    maps::{BACKEND_ACTIVE, BACKEND_DRAINING, CONFIG_NO_MPTCP, Config},
};
use lb_userspace::dataplane::{Dataplane, addr_words};
use mptcp_lb_tests::{
    netns::Netns,
    privileged,
    testbed::{
        E2E_SIZES, LB4, LB6, Server, Testbed, VIP6, across, alternate, backend_addr4, run_clients,
        serve,
    },
};

const JOIN_NO_TOKEN: &str = "MPTcpExtMPJoinNoTokenFound";
const JOIN_SYN_RX: &str = "MPTcpExtMPJoinSynRx";

fn config(flags: u32) -> Config {
    Config {
        seed: 0x0bad_cafe,
        src4: addr_words(LB4.parse().expect("ip")).0[0],
        src6: addr_words(LB6.parse().expect("ip")).0,
        flags,
        ..Default::default()
    }
}

fn v6(_: usize) -> IpAddr {
    IpAddr::V6(VIP6)
}

#[test]
fn every_subflow_reaches_its_connections_backend() {
    if !privileged("every_subflow_reaches_its_connections_backend") {
        return;
    }
    let tb = Testbed::new("mlb-mp", 3);
    tb.announce_vip6();
    tb.client_joins(true);
    let servers: Vec<Server> = tb.backends.iter().map(serve).collect();
    for s in &servers {
        s.expect_joins.store(true, Ordering::Relaxed);
    }
    let mut dp = tb.balancer(E2E_SIZES, 0);
    for i in 1..=3 {
        dp.set_backend(i as u32, IpAddr::V4(backend_addr4(i)), BACKEND_ACTIVE)
            .expect("backend");
    }
    dp.set_ring(0, &Testbed::members(&[1, 2, 3])).expect("ring");

    // 200 connections, half IPv4 (cross-family join) and half IPv6.
    let errors = run_clients(&tb.client, 200, 10, true, alternate);
    assert!(
        errors.is_empty(),
        "{} of 200 connections failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // The balancer's side of the story, printed before any assertion so that a failure
    // shows where a missing join went (dropped as unknown, expired, never sent).
    for (c, v) in dp.counters().expect("counters") {
        if v > 0 {
            println!("    counter {}: {v}", c.label());
        }
    }
    let mptcp_counters = |ns: &Netns| {
        let mut v: Vec<String> = ns
            .nstat()
            .into_iter()
            .filter(|(k, v)| {
                *v > 0
                    && (k.starts_with("MPTcpExt")
                        || k.contains("Listen")
                        || k.contains("SynRetrans")
                        || k.contains("Drop")
                        || k.contains("Reset"))
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        v.sort();
        v.join(" ")
    };
    println!("    client: {}", mptcp_counters(&tb.client));
    for (i, (s, be)) in servers.iter().zip(&tb.backends).enumerate() {
        println!("    backend {}: {}", i + 1, mptcp_counters(be));
        for r in s
            .recorded()
            .iter()
            .filter(|r| r.subflow_families.len() != 2)
        {
            println!("    backend {}: a connection without a join: {r:?}", i + 1);
        }
    }
    let (mut crossed, mut same) = (0, 0);
    let mut server_tokens: HashMap<u32, usize> = HashMap::new();
    for (i, (s, be)) in servers.iter().zip(&tb.backends).enumerate() {
        let recs = s.recorded();
        let owned = s.accepted.load(Ordering::Relaxed) as u64;
        let (no_token, join_rx) = (be.nstat_value(JOIN_NO_TOKEN), be.nstat_value(JOIN_SYN_RX));
        println!(
            "backend {}: {owned} connections, {join_rx} joins received, MPJoinNoTokenFound {no_token}",
            i + 1
        );
        assert_eq!(
            no_token,
            0,
            "backend {} was sent joins for connections it does not have",
            i + 1
        );
        assert_eq!(
            join_rx,
            owned,
            "backend {}: one join per connection it owns",
            i + 1
        );
        for r in &recs {
            assert_eq!(
                r.subflow_families.len(),
                2,
                "backend {}: a connection without its second subflow: {r:?}",
                i + 1
            );
            assert_ne!(r.token, 0, "an MPTCP connection has a token");
            match r.subflow_families[..] {
                [4, 6] => crossed += 1,
                [6, 6] => same += 1,
                _ => panic!("unexpected subflow families {r:?}"),
            }
            server_tokens.insert(r.token, i + 1);
        }
    }
    println!(
        "{same} connections joined within IPv6, {crossed} joined across families (IPv4 then IPv6)"
    );
    assert_eq!(crossed + same, 200);
    assert!(crossed >= 90 && same >= 90, "both kinds of join happened");

    // The balancer learned exactly these tokens, each for the backend that holds it.
    for (token, backend) in &server_tokens {
        let e = dp
            .maps
            .tokens
            .get(*token)
            .unwrap_or_else(|| panic!("token {token:08x} not learned"));
        assert_eq!(e.backend as usize, *backend, "token {token:08x}");
    }
    let c = |k| dp.counter(k).expect("counter");
    let learned: HashSet<u32> = dp.maps.tokens.iter().map(|(k, _)| k).collect();
    let servers_set: HashSet<u32> = server_tokens.keys().copied().collect();
    assert_eq!(
        learned, servers_set,
        "the balancer holds exactly the backends' tokens"
    );
    // At least one learn per connection; concurrent learning on two CPUs can count a
    // token twice (the map above is exact).
    assert!(
        c(Counter::TokenLearnedV1) >= 200,
        "{}",
        c(Counter::TokenLearnedV1)
    );
    // Per packet: a retransmitted join SYN is routed (by token) again.
    assert!(c(Counter::JoinRouted) >= 200, "{}", c(Counter::JoinRouted));
    assert_eq!(c(Counter::JoinUnknownDropped), 0);

    drain(&tb, &mut dp, &servers);
    negative_control(&tb, &mut dp, &servers);
}

/// Backend 1 drains while 30 connections are established and before they have joined:
/// their joins still reach it, and no new connection does.
fn drain(tb: &Testbed, dp: &mut Dataplane, servers: &[Server]) {
    tb.client_joins(false);
    let before: Vec<usize> = servers.iter().map(|s| s.recorded().len()).collect();
    let errors = across(&tb.client, 30, true, v6, || {
        dp.set_ring(0, &Testbed::members(&[2, 3]))
            .expect("ring without backend 1");
        dp.set_backend(1, IpAddr::V4(backend_addr4(1)), BACKEND_DRAINING)
            .expect("drain");
        // Only now may the established connections open their second subflows.
        tb.client_joins(true);
    });
    assert!(
        errors.is_empty(),
        "connections failed across the drain: {errors:?}"
    );
    let on_drained = &servers[0].recorded()[before[0]..];
    println!(
        "{} of the 30 connections were on backend 1 when it drained",
        on_drained.len()
    );
    assert!(
        !on_drained.is_empty(),
        "backend 1 held some of the connections"
    );
    for r in on_drained {
        assert_eq!(
            r.subflow_families.len(),
            2,
            "a join for a draining backend's connection was lost: {r:?}"
        );
    }
    assert_eq!(tb.backends[0].nstat_value(JOIN_NO_TOKEN), 0);

    let accepted1 = servers[0].accepted.load(Ordering::Relaxed);
    let errors = run_clients(&tb.client, 30, 6, true, v6);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        servers[0].accepted.load(Ordering::Relaxed),
        accepted1,
        "a draining backend takes no new connection"
    );
}

/// With MPTCP awareness off (plain 5-tuple hashing, what a classic L4 balancer does),
/// joins land on backends that do not know them: the backends' check can fail.
fn negative_control(tb: &Testbed, dp: &mut Dataplane, servers: &[Server]) {
    dp.set_ring(0, &Testbed::members(&[1, 2, 3])).expect("ring");
    dp.set_backend(1, IpAddr::V4(backend_addr4(1)), BACKEND_ACTIVE)
        .expect("undrain");
    dp.set_config(config(CONFIG_NO_MPTCP))
        .expect("awareness off");
    for s in servers {
        s.expect_joins.store(false, Ordering::Relaxed);
    }
    let before: u64 = tb
        .backends
        .iter()
        .map(|b| b.nstat_value(JOIN_NO_TOKEN))
        .sum();
    let errors = run_clients(&tb.client, 30, 6, true, alternate);
    assert!(
        errors.is_empty(),
        "first subflows still work without awareness: {errors:?}"
    );
    let lost: u64 = tb
        .backends
        .iter()
        .map(|b| b.nstat_value(JOIN_NO_TOKEN))
        .sum::<u64>()
        - before;
    println!("awareness off: backends refused {lost} joins (MPJoinNoTokenFound)");
    assert!(
        lost > 0,
        "without MPTCP awareness some joins must reach the wrong backend"
    );
    let unique: HashSet<u32> = servers
        .iter()
        .flat_map(Server::recorded)
        .map(|r| r.token)
        .collect();
    assert!(unique.len() >= 260);
}

//! A fleet: three balancer nodes, each running `mptcp-lb run` from the same services,
//! behind a router that spreads the VIPs over them by 5-tuple ECMP, with real kernel
//! MPTCP on the client and the backends. A join's 5-tuple is hashed on its own, so it
//! reaches a node chosen independently of the one that saw its connection's handshake.
//!
//! With `join_steering = "port"` (backends set up by `mptcp-lb join-ports apply`), every
//! join is held by its connection's backend, whichever node carried it, also when a node
//! leaves under traffic; with token steering (the negative control, in the same test)
//! joins that land on another node are lost. Checked on the backends: their MPTCP
//! counters and each connection's subflows read from its socket.

use std::{net::IpAddr, process::Output, sync::atomic::Ordering, time::Duration};

use mptcp_lb_tests::{
    daemon::{Daemon, cli_in},
    privileged,
    testbed::{
        PORT, Server, Testbed, VIP4, VIP6, across, alternate, backend_addr4, run_clients, serve,
    },
};

/// Nodes running from the start; one more (node 4) joins the fleet under traffic.
const NODES: usize = 3;
const BACKENDS: usize = 3;
const JOIN_PORT_BASE: u16 = 20000;
/// The client's second path (cell): its joins leave from here (a fullmesh endpoint).
const SECOND_PATH: &str = "10.1.2.2";

/// The service: both VIPs, backends 1-3; with `port`, joins steered by port
/// (backend i announces JOIN_PORT_BASE + i).
fn service(port: bool) -> String {
    let mut s = format!(
        "[[service]]\nname = \"web\"\nvips = [\"{VIP4}:{PORT}/tcp\", \"[{VIP6}]:{PORT}/tcp\"]\n"
    );
    if port {
        s.push_str("join_steering = \"port\"\n");
    }
    for i in 1..=BACKENDS {
        s.push_str(&format!(
            "[[service.backend]]\naddress = \"{}\"\n",
            backend_addr4(i)
        ));
        if port {
            s.push_str(&format!("join_port = {}\n", JOIN_PORT_BASE + i as u16));
        }
    }
    s
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Packets node `d` forwarded (sent back out or redirected), from its counters.
fn forwarded(d: &Daemon) -> u64 {
    let s = d.json(&["inspect", "stats", "--json"]);
    ["tx", "redirect"]
        .iter()
        .map(|k| s[*k].as_u64().unwrap_or(0))
        .sum()
}

/// Every connection the servers recorded after `before` (their counts then) had both
/// subflows on its backend.
fn assert_both_subflows_since(servers: &[Server], before: &[usize]) {
    for (i, s) in servers.iter().enumerate() {
        for r in &s.recorded()[before[i]..] {
            assert_eq!(r.subflow_families.len(), 2, "backend {}: {r:?}", i + 1);
        }
    }
}

/// Service `web`'s Maglev table on node `d`, slot by slot, as backend addresses (ids
/// are each node's own; the addresses must agree).
fn ring_by_address(d: &Daemon) -> Vec<Option<IpAddr>> {
    let sid = d.status()["services"][0]["id"]
        .as_u64()
        .expect("service id") as u32;
    let maps =
        lb_userspace::dataplane::Maps::from_pins(&lb_userspace::pins::layout_dir(&d.pin_path))
            .expect("pinned maps");
    let ring = lb_common::maps::DEFAULT_RING_SIZE;
    let mut names = std::collections::HashMap::new();
    (0..ring)
        .map(|slot| {
            let id = maps.maglev.get(&(sid * ring + slot), 0).expect("slot");
            if id == 0 {
                return None;
            }
            Some(*names.entry(id).or_insert_with(|| {
                let b = maps.backends.get(&id, 0).expect("backend");
                lb_userspace::dataplane::words_addr(b.addr, b.family)
            }))
        })
        .collect()
}

/// Every node holds the same Maglev table (by address, slot by slot).
fn rings_agree(daemons: &[Daemon], when: &str) {
    let first = ring_by_address(&daemons[0]);
    assert!(first.iter().all(Option::is_some), "{when}: empty slots");
    for (k, d) in daemons.iter().enumerate().skip(1) {
        let other = ring_by_address(d);
        let differ = first.iter().zip(&other).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "{when}: node {} differs from node 1 in {differ} slots",
            k + 1
        );
    }
    println!(
        "{when}: the {} nodes' Maglev tables are identical",
        daemons.len()
    );
}

/// Per backend: (connections accepted, MPJoinSynRx, MPJoinPortSynRx, MPJoinNoTokenFound).
fn join_counts(tb: &Testbed, servers: &[Server]) -> Vec<(u64, u64, u64, u64)> {
    servers
        .iter()
        .zip(&tb.backends)
        .map(|(s, be)| {
            (
                s.accepted.load(Ordering::Relaxed) as u64,
                be.nstat_value("MPTcpExtMPJoinSynRx"),
                be.nstat_value("MPTcpExtMPJoinPortSynRx"),
                be.nstat_value("MPTcpExtMPJoinNoTokenFound"),
            )
        })
        .collect()
}

#[test]
fn every_join_reaches_its_backend_through_any_node() {
    if !privileged("every_join_reaches_its_backend_through_any_node") {
        return;
    }
    let tb = Testbed::fleet("mlb-flt", NODES + 1, BACKENDS);
    let servers: Vec<Server> = tb.backends.iter().map(serve).collect();
    for s in &servers {
        s.expect_joins.store(true, Ordering::Relaxed);
    }
    let mut daemons: Vec<Daemon> = (1..=NODES)
        .map(|k| {
            let tag = format!("flt{k}");
            Daemon::start(
                tb.node(k),
                &tag,
                &Testbed::node_config(&tag, k, &service(true)),
            )
        })
        .collect();
    // The backends' side, from the same file (node 1's copy).
    let file = daemons[0].config.to_str().expect("path").to_string();
    for (i, be) in tb.backends.iter().enumerate() {
        let i = i + 1;
        let out = cli_in(be, &["join-ports", "apply", "--config", &file]);
        let said = text(&out);
        assert!(out.status.success(), "backend {i}: {said}");
        let port = JOIN_PORT_BASE + i as u16;
        assert!(said.contains(&format!("announced {VIP4}:{port}")), "{said}");
        assert!(said.contains("C bit set"), "{said}");
        // Idempotent, and `status` agrees.
        let again = cli_in(be, &["join-ports", "apply", "--config", &file]);
        assert!(
            text(&again).contains("nothing to change"),
            "{}",
            text(&again)
        );
        let status = cli_in(be, &["join-ports", "status", "--config", &file]);
        assert!(status.status.success(), "{}", text(&status));
        println!("backend {i}: {}", text(&status).trim().replace('\n', "; "));
    }
    // A join port changed in the file: status says so, apply withdraws the old one.
    let be1 = &tb.backends[0];
    let moved_file = format!("{file}.moved");
    std::fs::write(
        &moved_file,
        std::fs::read_to_string(&file)
            .expect("file")
            .replace("join_port = 20001", "join_port = 20011"),
    )
    .expect("moved file");
    let status = cli_in(be1, &["join-ports", "status", "--config", &moved_file]);
    assert!(!status.status.success(), "{}", text(&status));
    assert!(
        text(&status).contains(&format!("announced but not in the file {VIP4}:20001")),
        "{}",
        text(&status)
    );
    let said = text(&cli_in(
        be1,
        &["join-ports", "apply", "--config", &moved_file],
    ));
    assert!(
        said.contains(&format!("withdrew {VIP4}:20001 (not in the file)")),
        "{said}"
    );
    assert!(said.contains(&format!("announced {VIP4}:20011")), "{said}");
    let said = text(&cli_in(be1, &["join-ports", "apply", "--config", &file]));
    assert!(
        said.contains(&format!("withdrew {VIP4}:20011 (not in the file)")),
        "{said}"
    );
    assert!(
        cli_in(be1, &["join-ports", "status", "--config", &file])
            .status
            .success()
    );
    let _ = std::fs::remove_file(&moved_file);
    tb.client.run(&[
        "ip",
        "mptcp",
        "endpoint",
        "add",
        SECOND_PATH,
        "dev",
        "cell0",
        "subflow",
        "fullmesh",
    ]);
    // Each daemon announces the VIPs; the router's BGP installs one ECMP route per VIP.
    let t = std::time::Instant::now();
    tb.wait_next_hops(NODES, Duration::from_secs(20));
    println!(
        "the router reaches the VIPs through {NODES} nodes {} ms after the backends were set up",
        t.elapsed().as_millis()
    );
    rings_agree(&daemons, "at start");
    // A fleet node keeps CAP_NET_ADMIN too, for its announcement routes, and nothing more.
    let want = (1u64 << lb_userspace::privileges::CAP_BPF)
        | (1u64 << lb_userspace::privileges::CAP_NET_ADMIN);
    let pid = daemons[0].pid();
    let (eff, bnd, nnp) = lb_userspace::privileges::thread_caps(pid, pid).expect("status");
    assert_eq!((eff, bnd, nnp), (want, want, true));
    announcements_follow_the_node(&tb, &mut daemons);
    rings_agree(
        &daemons,
        "after node 3's backends were disabled and enabled again",
    );

    // 200 connections, half on each VIP; every join leaves from the second path to
    // the IPv4 join port (the IPv6 announcement does not fit beside timestamps).
    let errors = run_clients(&tb.client, 200, 10, true, alternate);
    let counts = join_counts(&tb, &servers);
    let per_node: Vec<u64> = daemons.iter().map(forwarded).collect();
    let routed: Vec<u64> = daemons.iter().map(|d| d.stat("join_port_routed")).collect();
    println!("per backend (connections, joins, joins on a join port, no token): {counts:?}");
    println!(
        "packets forwarded per node: {per_node:?}; join SYNs steered by port per node: {routed:?}"
    );
    assert!(
        errors.is_empty(),
        "{} failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    for (i, (owned, joins, port_joins, no_token)) in counts.iter().enumerate() {
        assert_eq!(*no_token, 0, "backend {} got joins it does not know", i + 1);
        assert_eq!(joins, owned, "backend {}: one join per connection", i + 1);
        assert_eq!(
            port_joins,
            owned,
            "backend {}: every join on its join port",
            i + 1
        );
    }
    let mut shapes = 0;
    for (i, s) in servers.iter().enumerate() {
        for r in s.recorded() {
            assert_eq!(r.subflow_families.len(), 2, "backend {}: {r:?}", i + 1);
            assert_eq!(
                r.subflow_peers[1],
                SECOND_PATH.parse::<IpAddr>().expect("ip"),
                "the join came from the second path: {r:?}"
            );
            shapes += 1;
        }
    }
    assert_eq!(shapes, 200);
    let total: u64 = per_node.iter().sum();
    for (k, n) in per_node.iter().enumerate() {
        assert!(
            *n * 10 >= total,
            "node {} carried {n} of {total} packets: under 10%, the fleet proves nothing",
            k + 1
        );
    }
    assert!(routed.iter().sum::<u64>() >= 200);
    assert!(
        routed.iter().all(|r| *r > 0),
        "joins reached every node: {routed:?}"
    );

    node_leaves_under_traffic(&tb, &servers, &daemons);
    daemons.push(node_joins_under_traffic(&tb, &servers));
    rings_agree(&daemons, "with node 4");
    negative_control(&tb, &servers, &mut daemons, &file);

    // A node taken out for good: the daemon stops (its dataplane still forwards and its
    // VIPs stay announced), then `detach` removes the dataplane and the announcements.
    let n = daemons.len();
    assert!(daemons[2].term(), "daemon 3 exits cleanly");
    assert_eq!(
        tb.vip_next_hops(),
        (n, n),
        "a stopped daemon's dataplane still serves"
    );
    let out = cli_in(
        tb.node(3),
        &[
            "detach",
            "--pin-path",
            daemons[2].pin_path.to_str().expect("path"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("withdrew 2 VIP announcements"),
        "{}",
        text(&out)
    );
    tb.wait_next_hops(n - 1, Duration::from_secs(10));
}

/// Established connections held open while a node leaves or joins (the issue's "200
/// long transfers").
const HELD: usize = 200;

/// Node 4 joins the fleet while 200 connections are established: its daemon starts, its
/// BGP speaker announces the VIPs, and the router spreads flows over four nodes, so a
/// quarter of the established flows move to a node that has never seen them. Maglev
/// gives them the same backend there, and joins go by port: none breaks.
fn node_joins_under_traffic(tb: &Testbed, servers: &[Server]) -> Daemon {
    let before: Vec<usize> = servers.iter().map(|s| s.recorded().len()).collect();
    let mut new = None;
    let errors = across(&tb.client, HELD, true, alternate, || {
        let k = NODES + 1;
        let tag = format!("flt{k}");
        new = Some(Daemon::start(
            tb.node(k),
            &tag,
            &Testbed::node_config(&tag, k, &service(true)),
        ));
        tb.wait_next_hops(k, Duration::from_secs(20));
    });
    let d = new.expect("node 4 started");
    let moved = d.stat("conn_miss_non_syn");
    println!(
        "node 4 joined under {HELD} connections: {} failed, {moved} established flows moved to it",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "connections broken by a node's arrival: {errors:?}"
    );
    assert!(
        moved > 0,
        "no flow moved to the new node: the test proves nothing"
    );
    assert_both_subflows_since(servers, &before);
    d
}

/// Node 2 leaves while 200 connections are established: the router's route loses it (as
/// a BGP withdrawal or a dead link would do) and its flows move to the other nodes,
/// which have never seen them. Maglev on the same configuration picks the same backend
/// there, and joins go by port: every connection completes with both subflows.
fn node_leaves_under_traffic(tb: &Testbed, servers: &[Server], daemons: &[Daemon]) {
    let before: Vec<usize> = servers.iter().map(|s| s.recorded().len()).collect();
    let misses_before: u64 = daemons.iter().map(|d| d.stat("conn_miss_non_syn")).sum();
    let errors = across(&tb.client, HELD, true, alternate, || {
        // Node 2 dies: its BGP speaker with it (the router withdraws its routes), and
        // its link.
        tb.kill_node_bgp(2);
        tb.wait_next_hops(NODES - 1, Duration::from_secs(10));
        tb.router.run(&["ip", "link", "set", "rtl2", "down"]);
    });
    let moved: u64 = daemons
        .iter()
        .map(|d| d.stat("conn_miss_non_syn"))
        .sum::<u64>()
        - misses_before;
    println!(
        "node 2 left under {HELD} connections: {} failed, {moved} established flows moved to the other nodes",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "connections broken by a node's loss: {errors:?}"
    );
    assert!(
        moved > 0,
        "no flow moved to another node: the test proves nothing"
    );
    assert_both_subflows_since(servers, &before);
    // Node 2 back, for what follows.
    tb.router.run(&["ip", "link", "set", "rtl2", "up"]);
    tb.start_node_bgp(2);
    tb.wait_next_hops(NODES, Duration::from_secs(20));
}

/// What a node announces follows what it can serve: an operator's node drain withdraws
/// its VIPs and undrain announces them again; a node whose service has no usable
/// backend left (all disabled) withdraws it. Read on the router, as BGP installed it.
fn announcements_follow_the_node(tb: &Testbed, daemons: &mut [Daemon]) {
    let ok = |d: &Daemon, args: &[&str]| {
        let out = d.cli(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        text(&out)
    };
    ok(&daemons[0], &["node", "drain"]);
    tb.wait_next_hops(NODES - 1, Duration::from_secs(10));
    // The drain is kept across a restart of the daemon: the node stays withdrawn.
    assert!(daemons[0].term(), "daemon 1 exits cleanly");
    daemons[0].spawn();
    mptcp_lb_tests::netns::wait_until(
        Duration::from_secs(10),
        "the restarted daemon's first announcement sync",
        || (daemons[0].status()["announce_syncs"].as_u64() >= Some(1)).then_some(()),
    );
    let status = ok(&daemons[0], &["status"]);
    assert!(status.contains("node DRAINED: nothing"), "{status}");
    assert!(
        tb.node(1)
            .try_run(&["ip", "route", "show", "table", "200"])
            .stdout
            .is_empty(),
        "a restart announced a drained node"
    );
    ok(&daemons[0], &["node", "undrain"]);
    tb.wait_next_hops(NODES, Duration::from_secs(10));
    let status = ok(&daemons[0], &["status"]);
    assert!(
        status.contains(&format!("announce    table 200: {VIP4}, {VIP6}")),
        "{status}"
    );

    let d3 = &daemons[2];
    // All of node 3's backends draining: their established connections and joins still
    // need the route, so the VIPs stay in its table.
    let syncs = |d: &Daemon| d.status()["announce_syncs"].as_u64().unwrap_or(0);
    for i in 1..=BACKENDS {
        ok(
            d3,
            &["backend", "drain", "web", &backend_addr4(i).to_string()],
        );
    }
    // Two syncs after this point: the second began after every drain above. (Each
    // `node undrain`, a no-op here, wakes the announcer.)
    let before = syncs(d3);
    mptcp_lb_tests::netns::wait_until(Duration::from_secs(10), "two announcement syncs", || {
        ok(d3, &["node", "undrain"]);
        (syncs(d3) > before + 1).then_some(())
    });
    let table = String::from_utf8_lossy(
        &tb.node(3)
            .try_run(&["ip", "-4", "route", "show", "table", "200"])
            .stdout,
    )
    .into_owned();
    assert!(
        table.contains(&VIP4.to_string()),
        "a draining service was withdrawn: {table:?}"
    );
    for i in 1..=BACKENDS {
        ok(
            d3,
            &["backend", "undrain", "web", &backend_addr4(i).to_string()],
        );
    }
    for i in 1..=BACKENDS {
        ok(
            d3,
            &["backend", "disable", "web", &backend_addr4(i).to_string()],
        );
    }
    tb.wait_next_hops(NODES - 1, Duration::from_secs(10));
    for i in 1..=BACKENDS {
        ok(
            d3,
            &["backend", "enable", "web", &backend_addr4(i).to_string()],
        );
    }
    tb.wait_next_hops(NODES, Duration::from_secs(10));
    // Someone else removes an announcement from node 3's table: the daemon puts it back
    // at its next periodic sync (every 10 s).
    let vip4 = format!("{VIP4}/32");
    tb.node(3).run(&[
        "ip", "route", "del", &vip4, "dev", "lo", "table", "200", "proto", "91",
    ]);
    let t = std::time::Instant::now();
    mptcp_lb_tests::netns::wait_until(Duration::from_secs(15), "the route put back", || {
        String::from_utf8_lossy(
            &tb.node(3)
                .try_run(&["ip", "-4", "route", "show", "table", "200"])
                .stdout,
        )
        .contains(&VIP4.to_string())
        .then_some(())
    });
    println!(
        "a route removed by hand was back after {} ms",
        t.elapsed().as_millis()
    );
    println!("node drain, undrain, and a node without a usable backend: the router followed each");
}

/// The same fleet with token steering (the backends' join ports withdrawn, the C bit
/// cleared): each join lands on a node by its own 5-tuple, and the two nodes that did not
/// see its handshake do not know its token. Joins are lost.
fn negative_control(tb: &Testbed, servers: &[Server], daemons: &mut [Daemon], file: &str) {
    for (k, d) in daemons.iter_mut().enumerate() {
        let tag = format!("flt{}", k + 1);
        d.write_config(&Testbed::node_config(&tag, k + 1, &service(false)));
        let out = d.cli(&["reload"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    // Undone from the new file, which lists no join port: what was announced on its
    // VIP addresses is withdrawn all the same.
    for be in &tb.backends {
        let out = cli_in(be, &["join-ports", "undo", "--config", file]);
        let said = text(&out);
        assert!(out.status.success(), "{said}");
        assert!(
            said.contains("C bit cleared") && said.contains("withdrew"),
            "{said}"
        );
        assert!(
            be.run(&["ip", "mptcp", "endpoint", "show"])
                .trim()
                .is_empty()
        );
    }
    for s in servers {
        s.join_wait_ms.store(2000, Ordering::Relaxed);
    }
    rings_agree(daemons, "after a reload");
    let before = join_counts(tb, servers);
    let recs_before: Vec<usize> = servers.iter().map(|s| s.recorded().len()).collect();
    let v4 = |_: usize| IpAddr::V4(VIP4);
    let errors = run_clients(&tb.client, 60, 10, true, v4);
    assert!(errors.is_empty(), "{errors:?}");
    let mut joined = 0;
    for (i, s) in servers.iter().enumerate() {
        joined += s.recorded()[recs_before[i]..]
            .iter()
            .filter(|r| r.subflow_families.len() == 2)
            .count();
    }
    let after = join_counts(tb, servers);
    let dropped: u64 = daemons.iter().map(|d| d.stat("join_unknown_dropped")).sum();
    println!(
        "negative control, token steering through {} nodes: {joined} of 60 connections kept their join; {dropped} join SYNs dropped as unknown; backends before {before:?} after {after:?}",
        daemons.len()
    );
    assert!(
        joined < 50,
        "without port steering most joins should land on a node that does not know them"
    );
    assert!(dropped > 0);
}

/// When the last line of `log` that contains `what` was written, in seconds of the day
/// (the daemon's log lines start with an RFC 3339 UTC time).
fn last_logged(log: &str, what: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains(what))?;
    let time = line.split('T').nth(1)?.split('Z').next()?;
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Each node checks the backends on its own: when a backend fails or recovers, the
/// nodes' verdicts (and so their Maglev tables) differ for a while. Measured from the
/// daemons' own logs over three failures and recoveries: the spread between the first
/// and the last node stays within one check interval plus the probe's timeout, as the
/// design says (each node's checks run on their own phase).
#[test]
fn the_nodes_health_verdicts_differ_for_at_most_an_interval() {
    if !privileged("the_nodes_health_verdicts_differ_for_at_most_an_interval") {
        return;
    }
    const INTERVAL_MS: u64 = 200;
    const TIMEOUT_MS: u64 = 150;
    let tb = Testbed::fleet("mlb-fhc", NODES, 2);
    let _s1 = serve(&tb.backends[0]);
    let mut s2 = Some(serve(&tb.backends[1]));
    let health = format!(
        "{{ kind = \"tcp\", port = {}, interval_ms = {INTERVAL_MS}, timeout_ms = {TIMEOUT_MS}, rise = 2, fall = 3 }}",
        mptcp_lb_tests::testbed::HEALTH_PORT
    );
    let daemons: Vec<Daemon> = (1..=NODES)
        .map(|k| {
            let tag = format!("fhc{k}");
            Daemon::start(
                tb.node(k),
                &tag,
                &Testbed::node_config(&tag, k, &Testbed::service_toml("web", &[1, 2], &health)),
            )
        })
        .collect();
    let b2 = backend_addr4(2).to_string();
    let wait_all = |state: &str| {
        for d in &daemons {
            d.wait_state("web", &b2, state, Duration::from_secs(10));
        }
    };
    wait_all("active");
    tb.wait_next_hops(NODES, Duration::from_secs(20));
    let spread = |what: &str| {
        let times: Vec<f64> = daemons
            .iter()
            .map(|d| {
                last_logged(&d.log(), &format!("{what} service=web backend={b2}"))
                    .unwrap_or_else(|| panic!("no {what:?} in:\n{}", d.log()))
            })
            .collect();
        let max = times.iter().copied().fold(f64::MIN, f64::max);
        let min = times.iter().copied().fold(f64::MAX, f64::min);
        ((max - min) * 1000.0).round() as u64
    };
    let mut windows = Vec::new();
    for _ in 0..3 {
        drop(s2.take());
        wait_all("down");
        let down = spread("backend down");
        s2 = Some(serve(&tb.backends[1]));
        wait_all("active");
        let up = spread("backend up");
        windows.push((down, up));
    }
    println!(
        "nodes disagreeing after a failure / a recovery (ms, 3 nodes, interval {INTERVAL_MS} ms): {windows:?}"
    );
    for (down, up) in windows {
        assert!(
            down <= INTERVAL_MS + TIMEOUT_MS,
            "down verdicts {down} ms apart"
        );
        assert!(up <= INTERVAL_MS + TIMEOUT_MS, "up verdicts {up} ms apart");
    }
}

//! The lab behind `cargo xtask demo` and `cargo xtask testbed up|down|status`: the same
//! network-namespace testbed the end-to-end tests use (`mptcp_lb_tests::testbed`), the
//! real `mptcp-lb` binary as its load balancer, and real MPTCP clients and servers.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use mptcp_lb_tests::{
    daemon::{Daemon, binary, cli_in},
    netns::{Netns, namespaces},
    testbed::{
        ConnRecord, HEALTH_PORT, Server, Testbed, VIP4, VIP6, backend_addr4, exchange, serve,
    },
};

const USAGE: &str =
    "usage: lab demo [--keep] [--lb-nodes N] | lab up [--lb-nodes N] | lab down | lab status";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("lab: needs root (network namespaces, BPF); try: sudo -E cargo xtask ...");
        return std::process::ExitCode::FAILURE;
    }
    // `--lb-nodes N` anywhere: a fleet of N balancer nodes behind ECMP (BGP).
    let mut nodes = 1;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if *a == "--lb-nodes" {
            match it.next().and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if (1..=8).contains(&n) => nodes = n,
                _ => {
                    eprintln!("--lb-nodes takes a number from 1 to 8\n{USAGE}");
                    return std::process::ExitCode::from(2);
                }
            }
        } else {
            rest.push(*a);
        }
    }
    let r = match (rest.as_slice(), nodes) {
        (["demo"], 1) => demo(false),
        (["demo", "--keep"], 1) => demo(true),
        (["demo"], n) => demo_fleet(n, false),
        (["demo", "--keep"], n) => demo_fleet(n, true),
        (["up"], n) => up(n),
        (["down"], _) => down(),
        (["status"], _) => status(),
        (["serve", ns, records], _) => serve_forever(ns, records),
        _ => {
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Namespaces of the persistent testbed (`lab up`) and of the demo.
const TESTBED: &str = "mlb-tb";
const DEMO: &str = "mlb-demo";
const SERVICE: &str = "web";

fn step(started: Instant, what: &str) {
    println!("[{:5.1}s] {what}", started.elapsed().as_secs_f64());
}

fn config(tag: &str) -> String {
    let health = format!(
        "{{ kind = \"mptcp\", port = {HEALTH_PORT}, interval_ms = 500, timeout_ms = 300, rise = 1, fall = 2 }}"
    );
    Testbed::daemon_config(tag, &Testbed::service_toml(SERVICE, &[1, 2, 3], &health))
}

fn backend_name(addr: IpAddr) -> String {
    (1..=3)
        .find(|i| IpAddr::V4(backend_addr4(*i)) == addr)
        .map_or(addr.to_string(), |i| format!("be{i} ({addr})"))
}

/// An IPv4 address as itself, not v4-mapped.
fn plain(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// "wifi/IPv4", "cell/IPv6": which of the client's paths an address belongs to.
fn path_of(a: IpAddr) -> String {
    let s = a.to_string();
    let path = if s.starts_with("10.1.1.") || s.starts_with("fd00:1:1:") {
        "wifi"
    } else if s.starts_with("10.1.2.") || s.starts_with("fd00:1:2:") {
        "cell"
    } else {
        "?"
    };
    format!("{path}/IPv{}", if a.is_ipv4() { 4 } else { 6 })
}

struct Outcome {
    vip: IpAddr,
    client: Result<SocketAddr, String>,
}

const RESET: &str = "JOIN RESET: 2nd subflow sent to a backend without its token";

/// `n` MPTCP connections, alternating the IPv4 and IPv6 VIP, all at once.
fn connections(tb: &Testbed, n: usize) -> Vec<Outcome> {
    connections_to(tb, n, true)
}

/// `n` MPTCP connections all at once: alternating the VIPs, or IPv4 only.
fn connections_to(tb: &Testbed, n: usize, both: bool) -> Vec<Outcome> {
    let handles: Vec<_> = (0..n)
        .map(|k| {
            let vip = if k % 2 == 0 || !both {
                IpAddr::V4(VIP4)
            } else {
                IpAddr::V6(VIP6)
            };
            (vip, tb.client.enter(move || exchange(vip, true, || {})))
        })
        .collect();
    handles
        .into_iter()
        .map(|(vip, h)| Outcome {
            vip,
            client: h
                .join()
                .unwrap_or_else(|_| Err("client thread panicked".into())),
        })
        .collect()
}

/// Prints the per-connection table; returns (connections whose every subflow reached
/// its connection's backend, connections).
fn report(
    outcomes: &[Outcome],
    servers: &[Server],
    seen_before: &[usize],
    lb_choice: &HashMap<SocketAddr, String>,
    lost: &str,
    fleet: Option<&Testbed>,
) -> (usize, usize) {
    // Backend records by the client's first-subflow address.
    let mut served: HashMap<SocketAddr, (usize, ConnRecord)> = HashMap::new();
    for (i, s) in servers.iter().enumerate() {
        for r in s
            .records
            .lock()
            .expect("records")
            .iter()
            .skip(seen_before[i])
        {
            if let Some(p) = r.peer {
                served.insert(plain(p), (i + 1, r.clone()));
            }
        }
    }
    let mut rows = Vec::new();
    let mut good = 0;
    for (k, o) in outcomes.iter().enumerate() {
        let family = if o.vip.is_ipv4() { "IPv4" } else { "IPv6" };
        let (client, rec) = match &o.client {
            Ok(a) => (plain(*a), served.get(&plain(*a))),
            Err(e) => {
                rows.push(vec![
                    (k + 1).to_string(),
                    family.into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("FAILED: {e}"),
                ]);
                continue;
            }
        };
        let chose = lb_choice
            .get(&client)
            .cloned()
            .unwrap_or_else(|| "?".into());
        let (token, by, subflows, verdict) = match rec {
            None => (
                "-".into(),
                "?".into(),
                "-".into(),
                "not seen on any backend".into(),
            ),
            Some((be, r)) => {
                let fams: Vec<String> = r
                    .subflow_peers
                    .iter()
                    .enumerate()
                    .map(|(k, a)| {
                        // In a fleet: the node the router's ECMP gave this subflow, as
                        // the router's kernel computes it for the subflow's 5-tuple
                        // (IPv4; for IPv6 `ip route get` does not match what the
                        // router forwards, so an IPv6 first subflow shows the node
                        // whose table holds it, and an IPv6 join "?").
                        let node = match fleet {
                            None => None,
                            Some(_) if a.is_ipv6() && k == 0 => {
                                chose.split(" via lb").nth(1).map(String::from)
                            }
                            Some(_) if a.is_ipv6() => Some("?".into()),
                            Some(tb) => r
                                .subflow_ports
                                .get(k)
                                .and_then(|(sp, dp)| tb.ecmp_node(*a, *sp, *dp))
                                .map(|n| n.to_string()),
                        };
                        match node {
                            Some(n) => format!("{} via lb{n}", path_of(*a)),
                            None => path_of(*a),
                        }
                    })
                    .collect();
                let (subflows, verdict) = if r.subflow_families.len() >= 2 {
                    good += 1;
                    (fams.join(" + "), format!("ok: both subflows on be{be}"))
                } else {
                    (format!("{} only", fams.join(" + ")), lost.to_string())
                };
                (
                    format!("{:08x}", r.token),
                    format!("be{be}"),
                    subflows,
                    verdict,
                )
            }
        };
        rows.push(vec![
            (k + 1).to_string(),
            family.into(),
            client.to_string(),
            token,
            chose,
            by,
            subflows,
            verdict,
        ]);
    }
    print!(
        "{}",
        lb_userspace::inspect::table(
            &[
                "#",
                "VIP",
                "CLIENT",
                "TOKEN",
                "LB CHOSE",
                "SERVED BY",
                "SUBFLOWS",
                "VERDICT"
            ],
            &rows
        )
    );
    (good, outcomes.len())
}

/// The load balancer's choice per client first-subflow address, from `inspect conns`.
fn lb_choices(d: &Daemon) -> HashMap<SocketAddr, String> {
    let conns = d.json(&["inspect", "conns", "--json"]);
    conns
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let client: SocketAddr = c["client"].as_str()?.parse().ok()?;
            let be: IpAddr = c["backend"].as_str()?.parse().ok()?;
            let name = backend_name(be);
            Some((
                client,
                name.split(' ').next().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

fn show_cli(d: &Daemon, args: &[&str]) {
    let out = d.cli(args);
    println!("$ mptcp-lb {}", args.join(" "));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}

/// How many connections each server has recorded so far.
fn records_seen(servers: &[Server]) -> Vec<usize> {
    servers
        .iter()
        .map(|s| s.records.lock().expect("records").len())
        .collect()
}

/// Per position, how much `now` grew since `before`.
fn since(now: &[u64], before: &[u64]) -> Vec<u64> {
    now.iter().zip(before).map(|(a, b)| a - b).collect()
}

fn join_resets(tb: &Testbed) -> Vec<u64> {
    tb.backends
        .iter()
        .map(|b| {
            b.nstat()
                .get("MPTcpExtMPJoinNoTokenFound")
                .copied()
                .unwrap_or(0)
        })
        .collect()
}

fn demo(keep: bool) -> Result<(), String> {
    let t = Instant::now();
    let n = 20;
    step(
        t,
        "building the testbed: client (wifi + cell paths), router, load balancer, 3 MPTCP backends",
    );
    let tb = Testbed::new(DEMO, 3);
    tb.announce_vip6();
    tb.client_joins(true);
    let servers: Vec<Server> = tb.backends.iter().map(serve).collect();
    // With awareness on every join arrives, so the servers may wait long for one (a join
    // SYN lost on the way is retransmitted after 1 s, then 3 s); with it off most joins
    // are reset and waiting 3 s for them is enough.
    for s in &servers {
        s.expect_joins.store(true, Ordering::Relaxed);
        s.join_wait_ms.store(10_000, Ordering::Relaxed);
    }
    step(
        t,
        "starting mptcp-lb in the load balancer's namespace (generated configuration)",
    );
    let d = Daemon::start(&tb.lb, "demo", &config("demo"));
    for i in 1..=3 {
        d.wait_state(
            SERVICE,
            &backend_addr4(i).to_string(),
            "active",
            Duration::from_secs(15),
        );
    }
    step(t, "all 3 backends pass their MPTCP health check");
    println!();
    show_cli(&d, &["status"]);
    println!();

    step(
        t,
        &format!("opening {n} MPTCP connections (IPv4 and IPv6 VIP), each adds a second subflow"),
    );
    let before = records_seen(&servers);
    let resets_before = join_resets(&tb);
    let outcomes = connections(&tb, n);
    let choice = lb_choices(&d);
    println!("\nWith MPTCP awareness ON (joins follow their token):");
    let (good_on, total) = report(&outcomes, &servers, &before, &choice, RESET, None);
    let resets_on: u64 = since(&join_resets(&tb), &resets_before).iter().sum();
    println!(
        "=> {good_on} of {total} connections have every subflow on their backend; backends reset {resets_on} joins with an unknown token\n"
    );
    println!("The load balancer's own view:");
    show_cli(&d, &["inspect", "tokens"]);
    println!();
    show_cli(&d, &["inspect", "stats"]);
    println!();

    step(t, "contrast: mptcp_aware = false, applied by a live reload");
    d.write_config(&config("demo").replace("[balancer]", "[balancer]\nmptcp_aware = false"));
    show_cli(&d, &["reload"]);
    for s in &servers {
        s.join_wait_ms.store(3000, Ordering::Relaxed);
    }
    let before = records_seen(&servers);
    let resets_before = join_resets(&tb);
    let outcomes = connections(&tb, n);
    let choice = lb_choices(&d);
    println!(
        "\nWith MPTCP awareness OFF (a classic L4 balancer: each subflow hashed on its own 5-tuple):"
    );
    let (good_off, _) = report(&outcomes, &servers, &before, &choice, RESET, None);
    let resets = since(&join_resets(&tb), &resets_before);
    println!(
        "=> {good_off} of {total} connections kept their second subflow (only by luck of the hash); backends reset {} joins (MPJoinNoTokenFound per backend: {resets:?})\n",
        resets.iter().sum::<u64>()
    );

    let ok = good_on == total && good_off < total;
    if keep {
        println!(
            "--keep: the testbed stays up (namespaces {DEMO}-*; the daemon's files in {}); `cargo xtask testbed down` does not remove it, `ip -all netns delete` does",
            d.dir.display()
        );
        std::mem::forget(d);
        std::mem::forget(servers);
        std::mem::forget(tb);
    } else {
        step(t, "tearing down");
        drop(d);
        drop(servers);
        drop(tb);
    }
    step(t, "done");
    if ok {
        println!(
            "RESULT: awareness on: {good_on}/{total} connections fully on one backend; off: {good_off}/{total}, the rest lost their second path"
        );
        Ok(())
    } else {
        Err(format!(
            "unexpected result: awareness on {good_on}/{total}, off {good_off}/{total}"
        ))
    }
}

/// Node `k`'s configuration in a fleet: the demo's service, joins steered by port
/// (backend i announces 2000i) or by token.
fn fleet_config(tag: &str, k: usize, port: bool) -> String {
    let health = format!(
        "{{ kind = \"mptcp\", port = {HEALTH_PORT}, interval_ms = 500, timeout_ms = 300, rise = 1, fall = 2 }}"
    );
    let mut svc = Testbed::service_toml(SERVICE, &[1, 2, 3], &health);
    if port {
        svc = svc.replacen(
            "[[service.backend]]",
            "join_steering = \"port\"\n[[service.backend]]",
            1,
        );
        for i in 1..=3 {
            let a = format!("address = \"{}\"\n", backend_addr4(i));
            svc = svc.replace(&a, &format!("{a}join_port = {}\n", 20000 + i));
        }
    }
    Testbed::node_config(tag, k, &svc)
}

fn node_tag(prefix: &str, k: usize) -> String {
    if k == 1 {
        prefix.to_string()
    } else {
        format!("{prefix}{k}")
    }
}

/// Starts a daemon on every node of the fleet and waits until each sees every backend
/// active.
fn start_fleet(tb: &Testbed, prefix: &str, port: bool) -> Vec<Daemon> {
    let daemons: Vec<Daemon> = (1..=tb.nodes())
        .map(|k| {
            let tag = node_tag(prefix, k);
            Daemon::start(tb.node(k), &tag, &fleet_config(&tag, k, port))
        })
        .collect();
    for d in &daemons {
        for i in 1..=3 {
            d.wait_state(
                SERVICE,
                &backend_addr4(i).to_string(),
                "active",
                Duration::from_secs(15),
            );
        }
    }
    daemons
}

/// `mptcp-lb join-ports ACTION --config FILE` on every backend; prints what each said.
fn join_ports(tb: &Testbed, action: &str, file: &Path) -> Result<(), String> {
    for (i, be) in tb.backends.iter().enumerate() {
        let file = file
            .to_str()
            .ok_or("a configuration path that is not UTF-8")?;
        let out = cli_in(be, &["join-ports", action, "--config", file]);
        let said = String::from_utf8_lossy(&out.stdout);
        for line in said.lines() {
            println!("  be{}: {line}", i + 1);
        }
        if !out.status.success() {
            return Err(format!(
                "join-ports {action} on be{}: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// Per client first-subflow address: the backend the node holding its entry chose,
/// and which node that is.
fn fleet_choices(daemons: &[Daemon]) -> HashMap<SocketAddr, String> {
    let mut out = HashMap::new();
    for (k, d) in daemons.iter().enumerate() {
        for (client, be) in lb_choices(d) {
            out.insert(client, format!("{be} via lb{}", k + 1));
        }
    }
    out
}

fn per_node(daemons: &[Daemon], counter: &str) -> Vec<u64> {
    daemons
        .iter()
        .map(|d| {
            d.json(&["inspect", "stats", "--json"])[counter]
                .as_u64()
                .unwrap_or(0)
        })
        .collect()
}

const LOST: &str = "JOIN LOST: the 2nd subflow reached a node without its token";

/// `demo --lb-nodes N`: the fleet. N nodes behind a router doing ECMP over their BGP
/// announcements; joins steered by port, then the contrast with joins steered by the
/// token each node learned.
fn demo_fleet(nodes: usize, keep: bool) -> Result<(), String> {
    let t = Instant::now();
    let n = 20;
    step(
        t,
        &format!(
            "building the fleet testbed: client (wifi + cell paths), a router running BGP (BIRD) with 5-tuple ECMP, {nodes} balancer nodes each with BIRD, 3 MPTCP backends"
        ),
    );
    let tb = Testbed::fleet(DEMO, nodes, 3);
    let servers: Vec<Server> = tb.backends.iter().map(serve).collect();
    for s in &servers {
        s.expect_joins.store(true, Ordering::Relaxed);
        s.join_wait_ms.store(10_000, Ordering::Relaxed);
    }
    step(
        t,
        "starting mptcp-lb on every node: the same service, joins steered by port",
    );
    let daemons = start_fleet(&tb, "demo", true);
    step(
        t,
        "all 3 backends pass their MPTCP health check on every node",
    );
    step(
        t,
        "the backends' side, from node 1's file: mptcp-lb join-ports apply",
    );
    let file = daemons[0].config.clone();
    join_ports(&tb, "apply", &file)?;
    // Joins leave from the client's second path (cell) to the announced VIP:port.
    tb.client.run(&[
        "ip", "mptcp", "endpoint", "add", "10.1.2.2", "dev", "cell0", "subflow", "fullmesh",
    ]);
    tb.wait_next_hops(nodes, Duration::from_secs(20));
    step(
        t,
        "the router's routes to the VIPs, learned by BGP from the nodes:",
    );
    print!(
        "{}",
        tb.router
            .run(&["ip", "route", "show", &format!("{VIP4}/32")])
    );
    print!(
        "{}",
        tb.router
            .run(&["ip", "-6", "route", "show", &format!("{VIP6}/128")])
    );
    println!();
    show_cli(&daemons[0], &["status"]);
    println!();

    step(
        t,
        &format!(
            "opening {n} MPTCP connections (IPv4 and IPv6 VIP), each adds a second subflow from cell"
        ),
    );
    let before = records_seen(&servers);
    let routed_before = per_node(&daemons, "join_port_routed");
    let outcomes = connections(&tb, n);
    let choice = fleet_choices(&daemons);
    println!(
        "\nJoins steered by PORT (each backend announced VIP:2000i; no state shared by the nodes):"
    );
    let (good_on, total) = report(&outcomes, &servers, &before, &choice, LOST, Some(&tb));
    let routed = since(&per_node(&daemons, "join_port_routed"), &routed_before);
    println!(
        "=> {good_on} of {total} connections have every subflow on their backend; join SYNs steered by port per node: {routed:?}\n"
    );

    step(
        t,
        "contrast: joins steered by token (each node learns the tokens of the handshakes it sees), applied by live reloads; the backends' join ports undone",
    );
    for (k, d) in daemons.iter().enumerate() {
        d.write_config(&fleet_config(&node_tag("demo", k + 1), k + 1, false));
        show_cli(d, &["reload"]);
    }
    join_ports(&tb, "undo", &file)?;
    for s in &servers {
        s.join_wait_ms.store(3000, Ordering::Relaxed);
    }
    let before = records_seen(&servers);
    let dropped_before = per_node(&daemons, "join_unknown_dropped");
    // IPv4 only: without announcements the client's second path (IPv4) joins the IPv4
    // service port, and an IPv6 connection would have nothing to join.
    let outcomes = connections_to(&tb, n, false);
    let choice = fleet_choices(&daemons);
    println!(
        "\nJoins steered by TOKEN through {nodes} nodes (ECMP sends each join to a node of its own):"
    );
    let (good_off, _) = report(&outcomes, &servers, &before, &choice, LOST, Some(&tb));
    let dropped = since(&per_node(&daemons, "join_unknown_dropped"), &dropped_before);
    println!(
        "=> {good_off} of {total} connections kept their second subflow (their join reached the node that saw the handshake); join SYNs dropped as unknown per node: {dropped:?}\n"
    );

    let ok = good_on == total && good_off < total;
    if keep {
        println!(
            "--keep: the fleet stays up (namespaces {DEMO}-*); `ip -all netns delete` and killing the bird processes remove it"
        );
        std::mem::forget(daemons);
        std::mem::forget(servers);
        std::mem::forget(tb);
    } else {
        step(t, "tearing down");
        drop(daemons);
        drop(servers);
        drop(tb);
    }
    step(t, "done");
    if ok {
        println!(
            "RESULT: fleet of {nodes} nodes: joins steered by port: {good_on}/{total} connections fully on one backend; by token: {good_off}/{total}, the rest lost their second path"
        );
        Ok(())
    } else {
        Err(format!(
            "unexpected result: by port {good_on}/{total}, by token {good_off}/{total}"
        ))
    }
}

fn state_dir() -> PathBuf {
    PathBuf::from("/run/mptcp-lb-testbed")
}

/// A server for `lab up`: runs until killed, appending what it saw to `records`.
fn serve_forever(ns: &str, records: &str) -> Result<(), String> {
    let netns = Netns::existing(ns);
    let server = serve(&netns);
    server.expect_joins.store(true, Ordering::Relaxed);
    server.join_wait_ms.store(3000, Ordering::Relaxed);
    let mut written = 0;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let recs = server.records.lock().expect("records").clone();
        if recs.len() > written {
            let lines: String = recs[written..]
                .iter()
                .map(|r| {
                    format!(
                        "{{\"token\":\"{:08x}\",\"peer\":\"{}\",\"subflows\":{}}}\n",
                        r.token,
                        r.peer.map(plain).map_or(String::new(), |p| p.to_string()),
                        r.subflow_families.len()
                    )
                })
                .collect();
            use std::io::Write as _;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(records)
                .and_then(|mut f| f.write_all(lines.as_bytes()))
                .map_err(|e| format!("{records}: {e}"))?;
            written = recs.len();
        }
    }
}

fn up(nodes: usize) -> Result<(), String> {
    let t = Instant::now();
    // Up twice in a row: the second replaces the first.
    let _ = down();
    let dir = state_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tb = if nodes == 1 {
        step(t, "namespaces: client (wifi, cell), router, lb, be1..be3");
        let tb = Testbed::new(TESTBED, 3);
        tb.announce_vip6();
        tb.client_joins(true);
        // Applications with IPv4 sockets (curl under mptcpize) open their second
        // subflow from the other path's IPv4 address.
        tb.client.run(&[
            "ip", "mptcp", "endpoint", "add", "10.1.2.2", "dev", "cell0", "subflow",
        ]);
        tb
    } else {
        step(
            t,
            &format!(
                "namespaces: client (wifi, cell), router (BIRD, ECMP), {nodes} balancer nodes (lb, lb2, ...; BIRD each), be1..be3"
            ),
        );
        Testbed::fleet(TESTBED, nodes, 3)
    };
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut pids = Vec::new();
    for be in &tb.backends {
        let records = dir.join(format!("{}.records", be.name()));
        let log = std::fs::File::create(dir.join(format!("{}.log", be.name())))
            .map_err(|e| e.to_string())?;
        // Its own session and no pipe of ours: it outlives `lab up`, and whoever runs
        // `lab up` and waits for its output is not kept waiting by it.
        let mut cmd = std::process::Command::new(&me);
        cmd.args(["serve", be.name(), records.to_str().unwrap_or_default()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        // SAFETY: setsid between fork and exec has no preconditions.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting the server for {}: {e}", be.name()))?;
        pids.push(child.id());
    }
    step(t, "MPTCP servers on the backends (port 80, health on 81)");
    let daemons = if nodes == 1 {
        let d = Daemon::start(&tb.lb, "testbed", &config("testbed"));
        for i in 1..=3 {
            d.wait_state(
                SERVICE,
                &backend_addr4(i).to_string(),
                "active",
                Duration::from_secs(15),
            );
        }
        vec![d]
    } else {
        let daemons = start_fleet(&tb, "testbed", true);
        join_ports(&tb, "apply", &daemons[0].config)?;
        tb.client.run(&[
            "ip", "mptcp", "endpoint", "add", "10.1.2.2", "dev", "cell0", "subflow", "fullmesh",
        ]);
        tb.wait_next_hops(nodes, Duration::from_secs(20));
        daemons
    };
    pids.extend(daemons.iter().map(Daemon::pid));
    pids.extend(tb.bgp_pids());
    step(
        t,
        &format!(
            "mptcp-lb running on {} node{}, all backends active",
            daemons.len(),
            if daemons.len() == 1 { "" } else { "s" }
        ),
    );
    let pid_list: String = pids.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(dir.join("pids"), pid_list).map_err(|e| e.to_string())?;
    println!("testbed up. Try:");
    for (k, d) in daemons.iter().enumerate() {
        println!(
            "  nsenter --net={} {} status --socket {}",
            tb.node(k + 1).path(),
            binary().display(),
            d.socket.display()
        );
    }
    println!(
        "  the VIPs {VIP4} and {VIP6}: port 80 is the tests' own server (it reads 20,000 bytes, then answers 100,000), not HTTP; for HTTP run a server on the backends (e.g. `mptcpize run nginx`) on another port and add a [[service]] for it\n  cargo xtask testbed down"
    );
    std::mem::forget(daemons);
    std::mem::forget(tb);
    Ok(())
}

fn down() -> Result<(), String> {
    let dir = state_dir();
    if let Ok(pids) = std::fs::read_to_string(dir.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.parse::<i32>().ok()) {
            // SAFETY: kill with a pid we started (a stale one is at worst ESRCH).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for k in 1..=8 {
        let (ddir, _, pins) = Daemon::paths(&node_tag("testbed", k));
        let _ = lb_userspace::pins::remove(&pins);
        let _ = std::fs::remove_dir_all(ddir);
    }
    let _ = std::fs::remove_dir_all(format!("/tmp/mptcp-lb-bgp-{TESTBED}"));
    for ns in namespaces(&format!("{TESTBED}-")) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &ns])
            .status();
    }
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{TESTBED}"));
    let _ = std::fs::remove_dir_all(&dir);
    let left = namespaces(&format!("{TESTBED}-"));
    if left.is_empty() {
        println!("testbed down: no {TESTBED}-* namespace or process left");
        Ok(())
    } else {
        Err(format!("namespaces left behind: {left:?}"))
    }
}

fn status() -> Result<(), String> {
    let ns = namespaces(&format!("{TESTBED}-"));
    if ns.is_empty() {
        println!("testbed down");
        return Ok(());
    }
    println!("namespaces: {}", ns.join(" "));
    let pids = std::fs::read_to_string(state_dir().join("pids")).unwrap_or_default();
    for pid in pids.lines() {
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        println!("process {pid}: {}", if alive { "running" } else { "gone" });
    }
    let (_, socket, _) = Daemon::paths("testbed");
    let out = std::process::Command::new(binary())
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .map_err(|e| e.to_string())?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

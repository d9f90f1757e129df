//! Backends announce their tokens: each backend runs `mptcp-lb agent`, whose tc egress
//! program sees every SYN/ACK with MP_CAPABLE leave and whose agent tells every node of
//! the fleet token -> this backend, authenticated with the fleet's key. The service
//! learns tokens from the backends only (`learn_tokens = "backend"`), and steers joins by
//! token (no join ports, no C bit), so a join reaches whichever node ECMP picks for its
//! 5-tuple, and that node must know the token the backend announced. Checked where it
//! happens: every connection's second subflow on its backend, no join SYN retransmitted
//! by the client (each found its token on its first SYN), no token learned from client
//! packets. Then forged, garbage, unknown-backend, wrongly sourced and replayed datagrams
//! are refused and counted, and change no token; and with the agents stopped (the
//! negative control) joins find no token.

use std::{net::IpAddr, process::Child, sync::atomic::Ordering, time::Duration};

use lb_userspace::announcement::{self, Announcement, Entry, Key};
use mptcp_lb_tests::{
    daemon::{Daemon, binary},
    delay::delay_links,
    netns::{Netns, wait_until},
    privileged,
    testbed::{
        PORT, Server, Testbed, VIP4, VIP6, across, alternate, backend_addr4, node_addrs,
        run_clients, serve,
    },
};

const NODES: usize = 3;
const BACKENDS: usize = 3;
const LISTEN: u16 = 7400;
/// The client's one-way delays (round trips of 40 ms on wifi and 10 ms on cell).
const WIFI_ONE_WAY_MS: u64 = 20;
const CELL_ONE_WAY_MS: u64 = 5;
const METRICS: &str = "127.0.0.1:9641";
const KEY: &str = "6d707463702d6c622074657374206b6579206f6620746865206669656574212121";

fn service() -> String {
    let mut s = format!(
        "[[service]]\nname = \"web\"\nvips = [\"{VIP4}:{PORT}/tcp\", \"[{VIP6}]:{PORT}/tcp\"]\nlearn_tokens = \"backend\"\n"
    );
    for i in 1..=BACKENDS {
        s.push_str(&format!(
            "[[service.backend]]\naddress = \"{}\"\n",
            backend_addr4(i)
        ));
    }
    s
}

/// How many connections each server has recorded.
fn record_counts(servers: &[Server]) -> Vec<usize> {
    servers.iter().map(|s| s.recorded().len()).collect()
}

/// Connections recorded since `before` (from `record_counts`) that had their join.
fn joined_since(servers: &[Server], before: &[usize]) -> usize {
    servers
        .iter()
        .zip(before)
        .map(|(s, b)| {
            s.recorded()[*b..]
                .iter()
                .filter(|r| r.subflow_families.len() == 2)
                .count()
        })
        .sum()
}

/// Join SYNs the nodes refused because they did not know the token.
fn unknown_joins(daemons: &[Daemon]) -> u64 {
    daemons.iter().map(|d| d.stat("join_unknown_dropped")).sum()
}

fn tokens_in(d: &Daemon) -> serde_json::Value {
    d.status()["token_announcements"].clone()
}

/// Sends `datagram` from `ns` to node 1's listener.
fn send_from(ns: &Netns, datagram: Vec<u8>) {
    let (a4, _) = node_addrs(1);
    ns.enter(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        s.send_to(&datagram, (a4, LISTEN)).expect("send");
    })
    .join()
    .expect("sender");
}

fn agent_log(i: usize) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mlb-tka-agent{i}.log"))
}

/// `f`'s first Some within `limit`, polled every 50 ms.
fn wait_until_or<R>(limit: Duration, mut f: impl FnMut() -> Option<R>) -> Option<R> {
    let end = std::time::Instant::now() + limit;
    loop {
        if let Some(r) = f() {
            return Some(r);
        }
        if std::time::Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// When each MPTCP connection was created on a backend and when its first join was
/// established there, from `ip mptcp monitor` (its lines stamped as they are read).
struct Monitor {
    child: Child,
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u32, JoinTimes>>>,
}

#[derive(Default, Clone, Copy)]
struct JoinTimes {
    created: Option<std::time::Instant>,
    joined: Option<std::time::Instant>,
}

impl Monitor {
    fn start(be: &Netns) -> Monitor {
        let mut cmd = be.command(&["ip", "mptcp", "monitor"]);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("ip mptcp monitor");
        let out = child.stdout.take().expect("stdout");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let at = std::time::Instant::now();
                let Some(token) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("token="))
                    .and_then(|t| u32::from_str_radix(t, 16).ok())
                else {
                    continue;
                };
                let mut s = s.lock().expect("monitor");
                let e: &mut JoinTimes = s.entry(token).or_default();
                if line.contains("] CREATED") || line.contains(" CREATED]") {
                    e.created.get_or_insert(at);
                } else if line.contains("SF_ESTABLISHED") {
                    e.joined.get_or_insert(at);
                }
            }
        });
        Monitor { child, seen }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Each of `tokens`' time from its creation on its backend to its join's establishment.
fn join_delays(monitors: &[Monitor], tokens: &[u32]) -> Vec<Duration> {
    let mut out: Vec<Duration> = tokens
        .iter()
        .filter_map(|t| {
            monitors.iter().find_map(|m| {
                let e = *m.seen.lock().expect("monitor").get(t)?;
                Some(e.joined?.duration_since(e.created?))
            })
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_join_finds_its_token_on_its_first_syn_through_any_node() {
    if !privileged("every_join_finds_its_token_on_its_first_syn_through_any_node") {
        return;
    }
    let tb = Testbed::fleet("mlb-tka", NODES, BACKENDS);
    // A client with real round trips, its first path slower than its second for IPv4
    // connections (which start on wifi and join from cell; IPv6 ones the other way).
    let delay = delay_links(
        "mlb-tka",
        &tb.router,
        &[
            ("rtw", Duration::from_millis(WIFI_ONE_WAY_MS)),
            ("rtc", Duration::from_millis(CELL_ONE_WAY_MS)),
        ],
    );
    let key_file = std::env::temp_dir().join("mlb-tka.key");
    std::fs::write(&key_file, format!("{KEY}\n")).expect("key file");
    let key_path = key_file.to_str().expect("path").to_string();
    let servers: Vec<Server> = tb.backends.iter().map(serve).collect();
    for s in &servers {
        s.expect_joins.store(true, Ordering::Relaxed);
    }
    let mut daemons: Vec<Daemon> = (1..=NODES)
        .map(|k| {
            let tag = format!("tka{k}");
            let config = Testbed::node_config(&tag, k, &service()).replacen(
                "[balancer]\n",
                &format!(
                    "[balancer]\ntoken_announcements_listen = \"0.0.0.0:{LISTEN}\"\ntoken_announcements_key_file = \"{key_path}\"\nmetrics_listen = \"{METRICS}\"\n"
                ),
                1,
            );
            Daemon::start(tb.node(k), &tag, &config)
        })
        .collect();
    let bin = binary();
    let nodes: Vec<String> = (1..=NODES)
        .map(|k| format!("{}:{LISTEN}", node_addrs(k).0))
        .collect();
    let mut agents: Vec<Child> = tb
        .backends
        .iter()
        .enumerate()
        .map(|(i, be)| {
            let backend = backend_addr4(i + 1).to_string();
            let mut args = vec![
                bin.to_str().expect("path"),
                "agent",
                "--interface",
                "eth0",
                "--backend",
                &backend,
                "--key-file",
                &key_path,
                "--snapshot-secs",
                "2",
            ];
            for n in &nodes {
                args.extend(["--node", n]);
            }
            // Its log, for the failure messages below.
            let log = std::fs::File::create(agent_log(i + 1)).expect("agent log");
            let mut cmd = be.command(&args);
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log);
            cmd.spawn().expect("spawning the agent")
        })
        .collect();
    // Every node hears every agent (its first listing, at start).
    for d in &daemons {
        let heard = wait_until_or(Duration::from_secs(20), || {
            (tokens_in(d)["agents"].as_array().map_or(0, Vec::len) == BACKENDS).then_some(())
        });
        assert!(
            heard.is_some(),
            "every agent heard by every node: {}\nagents' logs:\n{}",
            tokens_in(d),
            (1..=BACKENDS)
                .map(|i| std::fs::read_to_string(agent_log(i)).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    tb.client_second_paths();
    tb.wait_next_hops(NODES, Duration::from_secs(20));

    let monitors: Vec<Monitor> = tb.backends.iter().map(Monitor::start).collect();
    let syn_retrans = tb.client.nstat_value("TcpExtTCPSynRetrans");
    let no_token: Vec<u64> = tb
        .backends
        .iter()
        .map(|be| be.nstat_value("MPTcpExtMPJoinNoTokenFound"))
        .collect();
    let t = std::time::Instant::now();
    let errors = run_clients(&tb.client, 200, 10, true, alternate);
    assert!(errors.is_empty(), "{errors:?}");
    let took = t.elapsed();
    let joined: usize = servers
        .iter()
        .map(|s| {
            s.recorded()
                .iter()
                .filter(|r| r.subflow_families.len() == 2)
                .count()
        })
        .sum();
    let per_backend: Vec<usize> = servers.iter().map(|s| s.recorded().len()).collect();
    let retrans = tb.client.nstat_value("TcpExtTCPSynRetrans") - syn_retrans;
    let lost: Vec<u64> = tb
        .backends
        .iter()
        .zip(&no_token)
        .map(|(be, b)| be.nstat_value("MPTcpExtMPJoinNoTokenFound") - b)
        .collect();
    let per_node: Vec<(u64, u64, u64, u64)> = daemons
        .iter()
        .map(|d| {
            (
                d.stat("join_routed"),
                d.stat("join_unknown_dropped"),
                d.stat("token_learned_v1") + d.stat("token_learned_v0"),
                tokens_in(d)["entries"]["applied"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    println!(
        "200 connections in {} ms through {NODES} nodes: {joined} with their join held by their backend; connections per backend {per_backend:?}; SYNs retransmitted by the client {retrans}; joins without their connection on the backends {lost:?}; per node (joins routed by token, joins dropped as unknown, tokens learned from clients, announced entries applied) {per_node:?}",
        took.as_millis()
    );
    for d in &daemons {
        println!("{}", serde_json::to_string(&tokens_in(d)).expect("json"));
    }
    let tokens: Vec<u32> = servers
        .iter()
        .flat_map(|s| s.recorded().into_iter().map(|r| r.token))
        .collect();
    let delays = join_delays(&monitors, &tokens);
    let pct = |p: usize| {
        delays
            .get((delays.len() * p / 100).min(delays.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "join delay, from the connection's creation on its backend to its join's (ip mptcp monitor), {} connections: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        delays.len(),
        pct(50),
        pct(90),
        pct(99),
        pct(100)
    );
    drop(monitors);
    assert_eq!(joined, 200, "every connection kept its second subflow");
    assert_eq!(retrans, 0, "a join (or a first SYN) was retransmitted");
    assert!(lost.iter().all(|l| *l == 0), "{lost:?}");
    for (routed, unknown, learned, applied) in &per_node {
        assert_eq!(*unknown, 0, "a node met a join whose token it did not know");
        assert_eq!(*learned, 0, "client packets taught a token");
        assert!(*routed > 0 && *applied > 0);
    }
    assert_eq!(per_node.iter().map(|p| p.0).sum::<u64>(), 200);

    // The third ACK of every connection lost before the balancer (a lossy Wi-Fi): the
    // backend learns the keys from the first data segment, and the nodes need no third
    // ACK at all: the joins still find their token on their first SYN.
    delay.drop_third_acks.store(true, Ordering::Relaxed);
    let recs_before = record_counts(&servers);
    let retrans_before = tb.client.nstat_value("TcpExtTCPSynRetrans");
    let unknown_before = unknown_joins(&daemons);
    let errors = run_clients(&tb.client, 60, 10, true, alternate);
    delay.drop_third_acks.store(false, Ordering::Relaxed);
    assert!(errors.is_empty(), "{errors:?}");
    let joined = joined_since(&servers, &recs_before);
    let retrans = tb.client.nstat_value("TcpExtTCPSynRetrans") - retrans_before;
    let unknown = unknown_joins(&daemons) - unknown_before;
    let dropped_acks = delay.dropped.load(Ordering::Relaxed);
    println!(
        "third ACKs dropped ({dropped_acks}): {joined} of 60 connections joined; join SYNs refused {unknown}; SYNs retransmitted {retrans}"
    );
    assert!(
        dropped_acks >= 60,
        "the relay dropped {dropped_acks} third ACKs"
    );
    assert_eq!((joined, unknown, retrans), (60, 0, 0));

    // A node killed with -9 under traffic: its dataplane forwards on (pinned), but no one
    // applies what the backends announce meanwhile. 40 connections open while it is
    // dead, with no second path yet; the node restarts, and its next listings from the
    // agents teach it their tokens; then the client's second path comes up and every
    // held connection joins, through any node.
    tb.client.run(&["ip", "mptcp", "endpoint", "flush"]);
    daemons[1].kill9();
    let recs_before = record_counts(&servers);
    let joins_before: u64 = tb
        .backends
        .iter()
        .map(|be| be.nstat_value("MPTcpExtMPJoinSynRx"))
        .sum();
    let dropped_before = unknown_joins(&daemons);
    let retrans_before = tb.client.nstat_value("TcpExtTCPSynRetrans");
    let held = 40;
    let mut node2_routed_before = 0;
    let errors = across(&tb.client, held, true, alternate, || {
        // Node 2's counters live in its pinned maps: readable without its daemon.
        node2_routed_before = daemons[1].stat("join_routed");
        daemons[1].spawn();
        let t = std::time::Instant::now();
        wait_until(
            Duration::from_secs(20),
            "node 2 to hear every agent again",
            || {
                (tokens_in(&daemons[1])["agents"]
                    .as_array()
                    .map_or(0, Vec::len)
                    == BACKENDS)
                    .then_some(())
            },
        );
        println!(
            "node 2 restarted; every agent's listing reached it {} ms after its start",
            t.elapsed().as_millis()
        );
        tb.client_second_paths();
        wait_until(
            Duration::from_secs(20),
            "every held connection to join",
            || {
                let j: u64 = tb
                    .backends
                    .iter()
                    .map(|be| be.nstat_value("MPTcpExtMPJoinSynRx"))
                    .sum();
                (j - joins_before >= held as u64).then_some(())
            },
        );
    });
    assert!(errors.is_empty(), "{errors:?}");
    let joined = joined_since(&servers, &recs_before);
    let node2_routed = daemons[1].stat("join_routed") - node2_routed_before;
    let dropped = unknown_joins(&daemons) - dropped_before;
    let retrans = tb.client.nstat_value("TcpExtTCPSynRetrans") - retrans_before;
    println!(
        "node 2 killed and restarted: {joined} of {held} connections opened meanwhile joined; node 2 routed {node2_routed} of their joins; joins refused as unknown {dropped}; SYNs retransmitted {retrans}"
    );
    assert_eq!(joined, held);
    assert!(node2_routed > 0, "no join went through the restarted node");
    assert_eq!(dropped, 0);
    assert_eq!(retrans, 0);

    // What a hostile client can send node 1. First, a token its backend announces (the
    // test holds the fleet's key and sends from backend 1's address), sent twice.
    let token = 0x7e57_0001u32;
    let announce = |backend: usize, boot: u64| Announcement {
        backend: IpAddr::V4(backend_addr4(backend)),
        boot,
        seq: 1,
        sent_unix_ms: lb_userspace::controller::unix_ns() / 1_000_000,
        snapshot: false,
        entries: vec![Entry {
            token,
            version: 1,
            vip: (VIP4, PORT).into(),
            live: true,
        }],
    };
    let key = Key::load(&key_file).expect("key");
    let before = tokens_in(&daemons[0]);
    let genuine = announcement::seal(&key, &announce(1, 2));
    send_from(&tb.backends[0], genuine.clone());
    send_from(&tb.backends[0], genuine);
    // From the client: the token claimed for backend 2 under a wrong key, garbage, an
    // authentic datagram for a backend the nodes do not have, and an authentic one for
    // backend 2 that does not come from backend 2's address.
    let wrong_key = Key::new(b"not the fleet's key, but 32 bytes long".to_vec()).expect("key");
    send_from(&tb.client, announcement::seal(&wrong_key, &announce(2, 3)));
    send_from(&tb.client, b"\x01 not an announcement".to_vec());
    let mut stranger = announce(2, 4);
    stranger.backend = "10.0.99.2".parse().expect("addr");
    send_from(&tb.client, announcement::seal(&key, &stranger));
    send_from(&tb.client, announcement::seal(&key, &announce(2, 5)));
    let after = wait_until(Duration::from_secs(5), "the datagrams counted", || {
        let v = tokens_in(&daemons[0]);
        (v["datagrams"].as_u64() >= before["datagrams"].as_u64().map(|n| n + 6)).then_some(v)
    });
    println!("node 1 after the hostile datagrams: {after}");
    let refused = |v: &serde_json::Value, r: &str| v["refused"][r].as_u64().unwrap_or(0);
    for reason in [
        "bad_tag",
        "malformed",
        "unknown_backend",
        "wrong_source",
        "replayed",
    ] {
        assert_eq!(
            refused(&after, reason) - refused(&before, reason),
            1,
            "{reason}: {after}"
        );
    }
    // The token stays its own backend's, as that backend announced it.
    let t = daemons[0].json(&["inspect", "token", &format!("{token:08x}"), "--json"]);
    assert_eq!(
        (t["backend"].as_str(), t["origin"].as_str()),
        (Some(backend_addr4(1).to_string().as_str()), Some("backend")),
        "{t}"
    );

    // The same in the metrics.
    let metrics = tb
        .node(1)
        .enter(|| {
            use std::io::{Read as _, Write as _};
            let mut c = std::net::TcpStream::connect(METRICS).expect("metrics endpoint");
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .expect("request");
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        })
        .join()
        .expect("scrape");
    for line in [
        "mptcp_lb_token_announcements_refused_total{reason=\"replayed\"} 1",
        "mptcp_lb_token_announcements_refused_total{reason=\"wrong_source\"} 1",
        &format!(
            "mptcp_lb_token_agent_datagrams_total{{backend=\"{}\"}}",
            backend_addr4(2)
        ),
    ] {
        assert!(
            metrics.contains(line),
            "{line} not in the metrics:\n{metrics}"
        );
    }

    // How many announced tokens a node absorbs a second (reported, not asserted: the
    // tests run debug builds unless MPTCP_LB_BIN names another, and the sender competes
    // with it for two cores): 400
    // datagrams of 32 tokens from backend 1, as fast as it can send them.
    let datagrams = 400u64;
    let before = tokens_in(&daemons[0]);
    let burst: Vec<Vec<u8>> = (0..datagrams)
        .map(|i| {
            let mut a = announce(1, 6);
            a.seq = i + 1;
            a.entries = (0..32)
                .map(|k| Entry {
                    token: 0x5ca1_0000 + (i * 32 + k) as u32,
                    version: 1,
                    vip: (VIP4, PORT).into(),
                    live: true,
                })
                .collect();
            announcement::seal(&key, &a)
        })
        .collect();
    let t = std::time::Instant::now();
    let (a4, _) = node_addrs(1);
    tb.backends[0]
        .enter(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
            for d in burst {
                s.send_to(&d, (a4, LISTEN)).expect("send");
            }
        })
        .join()
        .expect("sender");
    let accepted = |v: &serde_json::Value| v["accepted"].as_u64().unwrap_or(0);
    let mut last = accepted(&before);
    let mut still = std::time::Instant::now();
    // Until every datagram is counted, or none was for half a second (the socket's
    // buffer may have overflowed: those are lost, as UDP is).
    let took = loop {
        let now = accepted(&tokens_in(&daemons[0]));
        if now - accepted(&before) >= datagrams {
            break t.elapsed();
        }
        if now != last {
            last = now;
            still = std::time::Instant::now();
        } else if still.elapsed() > Duration::from_millis(500) {
            break still.duration_since(t);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let got = accepted(&tokens_in(&daemons[0])) - accepted(&before);
    println!(
        "absorbed: {got} of {datagrams} datagrams ({} tokens) in {} ms: {:.0} tokens a second ({})",
        got * 32,
        took.as_millis(),
        (got * 32) as f64 / took.as_secs_f64(),
        bin.display()
    );

    // The negative control: without the agents, nothing tells the nodes the new tokens
    // (and client packets teach none): joins that land on a node are refused there.
    for a in &mut agents {
        // SAFETY: SIGTERM to an agent this test started.
        unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    }
    for mut a in agents {
        let _ = a.wait();
    }
    for s in &servers {
        s.join_wait_ms.store(1500, Ordering::Relaxed);
    }
    let dropped_before = unknown_joins(&daemons);
    let recs_before = record_counts(&servers);
    let errors = run_clients(&tb.client, 30, 10, true, alternate);
    assert!(errors.is_empty(), "{errors:?}");
    let joined = joined_since(&servers, &recs_before);
    let dropped = unknown_joins(&daemons) - dropped_before;
    println!(
        "negative control, agents stopped: {joined} of 30 connections had their join; {dropped} join SYNs dropped as unknown"
    );
    assert_eq!(joined, 0, "a join found a token nobody announced");
    assert!(dropped >= 30);
    let _ = std::fs::remove_file(&key_file);
}

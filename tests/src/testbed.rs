//! The network-namespace testbed the end-to-end tests share: a client with two paths
//! (call them wifi and cell, each with IPv4 and IPv6, source-based routing so each
//! subflow leaves by its own path), an edge router, a one-armed load balancer, and
//! backends with the VIPs on `lo` and the decapsulation program, each running a server
//! that speaks MPTCP (and plain TCP) and records what it saw.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use lb_common::maps::Config;
use lb_userspace::{
    dataplane::{Dataplane, Sizes, addr_words},
    decap, maglev,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::{Netns, veth, wait_until};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
pub const PORT: u16 = 80;
/// Where the servers answer health checks.
pub const HEALTH_PORT: u16 = 81;
pub const UPLOAD: usize = 20_000;
pub const DOWNLOAD: usize = 100_000;
/// The kernel routing table a fleet node's daemon announces its VIPs in
/// (`balancer.announce_route_table`), which the node's BIRD exports.
pub const ANNOUNCE_TABLE: u32 = 200;
/// Map sizes of the end-to-end runs: the default Maglev ring, 64k flows per family and
/// 64k tokens.
pub const E2E_SIZES: Sizes = Sizes {
    ring_size: 65537,
    conn_entries: 1 << 16,
    conn6_entries: 1 << 16,
    token_entries: 1 << 16,
};
pub const LB4: &str = "10.0.2.2";
pub const LB6: &str = "fd00:a2::2";
const IPPROTO_MPTCP: i32 = 262;
const SOL_MPTCP: i32 = 284;
const MPTCP_INFO: i32 = 1;
const MPTCP_SUBFLOW_ADDRS: i32 = 3;

pub fn backend_addr4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 10 + i as u8, 2)
}

/// Balancer node `k`'s (1-based) addresses on its link to the router: node 1 has
/// [`LB4`] and [`LB6`]; node k has 10.0.(1+k).2 and fd00:a(1+k)::2.
pub fn node_addrs(k: usize) -> (Ipv4Addr, Ipv6Addr) {
    let n = 1 + k as u16;
    (
        Ipv4Addr::new(10, 0, n as u8, 2),
        Ipv6Addr::new(0xfd00, 0xa0 + n, 0, 0, 0, 0, 0, 2),
    )
}

pub struct Testbed {
    pub client: Netns,
    pub router: Netns,
    /// Balancer node 1 (the only one unless built with [`Testbed::fleet`]).
    pub lb: Netns,
    /// Balancer nodes 2, 3, ... of a fleet.
    pub more_lbs: Vec<Netns>,
    pub backends: Vec<Netns>,
    bpffs: String,
    /// A fleet's BGP speakers (BIRD): the router's, then each node's.
    bgp: Mutex<Vec<Option<std::process::Child>>>,
    bgp_dir: String,
}

impl Testbed {
    /// Builds the topology with one balancer and `n_backends` backends; namespaces are
    /// named `<prefix>-client`, `<prefix>-be1`, ... so tests do not collide.
    pub fn new(prefix: &str, n_backends: usize) -> Testbed {
        Testbed::fleet(prefix, 1, n_backends)
    }

    /// The same with `n_nodes` balancer nodes (`<prefix>-lb`, `<prefix>-lb2`, ...)
    /// behind the router, which spreads the VIPs over them by ECMP, hashing each packet's
    /// 5-tuple as a production router does (`fib_multipath_hash_policy` 3 with addresses,
    /// protocol and ports: policy 1 would reuse the socket's hash on veth, which Linux
    /// redraws on retransmission timeouts).
    pub fn fleet(prefix: &str, n_nodes: usize, n_backends: usize) -> Testbed {
        Testbed::fleet_with(prefix, n_nodes, n_backends, true)
    }

    /// The fleet with BGP on the router only: the nodes' BGP speakers are left to
    /// whoever sets the nodes up (`cargo xtask deploy --bgp-neighbor`).
    pub fn fleet_without_node_bgp(prefix: &str, n_nodes: usize, n_backends: usize) -> Testbed {
        Testbed::fleet_with(prefix, n_nodes, n_backends, false)
    }

    fn fleet_with(prefix: &str, n_nodes: usize, n_backends: usize, node_bgp: bool) -> Testbed {
        assert!((1..=8).contains(&n_nodes), "1 to 8 balancer nodes");
        let bpffs = format!("/sys/fs/bpf/{prefix}");
        let _ = std::fs::remove_dir_all(&bpffs);
        let client = Netns::new(&format!("{prefix}-client"));
        let router = Netns::new(&format!("{prefix}-router"));
        let lb = Netns::new(&format!("{prefix}-lb"));
        let more_lbs: Vec<Netns> = (2..=n_nodes)
            .map(|k| Netns::new(&format!("{prefix}-lb{k}")))
            .collect();
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            // A link taken down and up again (a node's loss) keeps its IPv6 addresses.
            ("net.ipv6.conf.all.keep_addr_on_down", "1"),
            ("net.ipv6.conf.default.keep_addr_on_down", "1"),
            ("net.ipv4.fib_multipath_hash_policy", "3"),
            ("net.ipv6.fib_multipath_hash_policy", "3"),
            // Source and destination address, protocol, source and destination port.
            ("net.ipv4.fib_multipath_hash_fields", "0x37"),
            ("net.ipv6.fib_multipath_hash_fields", "0x37"),
        ] {
            router.sysctl(k, v);
        }

        // Two client paths. IPv4 leaves by wifi and IPv6 by cell unless the source
        // address says otherwise (policy routing), so each subflow takes its own path.
        for (n, dev, rdev) in [(1, "wifi0", "rtw"), (2, "cell0", "rtc")] {
            veth(&client, dev, &router, rdev, 1500);
            let (a4, g4) = (format!("10.1.{n}.2"), format!("10.1.{n}.1"));
            let (a6, g6) = (format!("fd00:1:{n}::2"), format!("fd00:1:{n}::1"));
            client.addr(dev, &format!("{a4}/24"));
            client.addr(dev, &format!("{a6}/64"));
            router.addr(rdev, &format!("{g4}/24"));
            router.addr(rdev, &format!("{g6}/64"));
            let table = (100 + n).to_string();
            client.run(&["ip", "rule", "add", "from", &a4, "table", &table]);
            client.run(&["ip", "-6", "rule", "add", "from", &a6, "table", &table]);
            client.run(&[
                "ip", "route", "add", "default", "via", &g4, "dev", dev, "table", &table,
            ]);
            client.run(&[
                "ip", "-6", "route", "add", "default", "via", &g6, "dev", dev, "table", &table,
            ]);
            client.offloads_off(dev);
            router.offloads_off(rdev);
        }
        client.run(&[
            "ip", "route", "add", "default", "via", "10.1.1.1", "dev", "wifi0",
        ]);
        client.run(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:1:2::1",
            "dev",
            "cell0",
        ]);
        client.run(&[
            "ip",
            "mptcp",
            "limits",
            "set",
            "subflow",
            "2",
            "add_addr_accepted",
            "2",
        ]);

        // The balancers' links carry tunnelled packets: room for the outer header.
        for (k, node) in std::iter::once(&lb).chain(&more_lbs).enumerate() {
            let k = k + 1;
            let (a4, a6) = node_addrs(k);
            let (g4, g6) = (
                Ipv4Addr::from(u32::from(a4) - 1),
                Ipv6Addr::from(u128::from(a6) - 1),
            );
            let rt_if = if k == 1 {
                "rtl".to_string()
            } else {
                format!("rtl{k}")
            };
            veth(node, "lb0", &router, &rt_if, 1600);
            node.addr("lb0", &format!("{a4}/24"));
            node.addr("lb0", &format!("{a6}/64"));
            node.route(&["default", "via", &g4.to_string()]);
            node.run(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &g6.to_string(),
            ]);
            for (key, v) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.lb0.send_redirects", "0"),
            ] {
                node.sysctl(key, v);
            }
            router.addr(&rt_if, &format!("{g4}/24"));
            router.addr(&rt_if, &format!("{g6}/64"));
            node.offloads_off("lb0");
            router.offloads_off(&rt_if);
        }
        // One node: static routes to the VIPs. A fleet: BGP (below), no static route.
        if n_nodes == 1 {
            router.route(&[&format!("{VIP4}/32"), "via", LB4]);
            router.route(&[&format!("{VIP6}/128"), "via", LB6]);
        }

        let bgp_dir = format!("/tmp/mptcp-lb-bgp-{prefix}");
        let mut tb = Testbed {
            client,
            router,
            lb,
            more_lbs,
            backends: Vec::new(),
            bpffs,
            bgp: Mutex::new(Vec::new()),
            bgp_dir,
        };
        if n_nodes > 1 {
            tb.start_bgp(node_bgp);
        }
        for i in 1..=n_backends {
            tb.add_backend(i);
        }
        // No IPv6 address may still be tentative when traffic starts (see Netns::new).
        for ns in [&tb.client, &tb.router, &tb.lb]
            .into_iter()
            .chain(&tb.more_lbs)
            .chain(&tb.backends)
        {
            wait_until(Duration::from_secs(5), "IPv6 addresses past DAD", || {
                ns.tentative_addrs().trim().is_empty().then_some(())
            });
        }
        tb
    }

    /// BGP, as fleets run it: BIRD on the router (AS 65000) with one session per node and
    /// family, installing ECMP routes (`merge paths`); BIRD on each node (AS 65001)
    /// announcing what the node's daemon puts in routing table [`ANNOUNCE_TABLE`].
    fn start_bgp(&self, nodes_too: bool) {
        let _ = std::fs::remove_dir_all(&self.bgp_dir);
        std::fs::create_dir_all(&self.bgp_dir).expect("bgp dir");
        let timers = "hold time 3; keepalive time 1; connect delay time 1; connect retry time 1; error wait time 1, 2;";
        let mut router = format!(
            "router id 10.0.2.1;\nlog \"{d}/router.log\" all;\nprotocol device {{ scan time 10; }}\n\
             protocol kernel {{ merge paths on; ipv4 {{ import none; export all; }}; }}\n\
             protocol kernel {{ merge paths on; ipv6 {{ import none; export all; }}; }}\n",
            d = self.bgp_dir
        );
        for k in 1..=self.nodes() {
            let (a4, a6) = node_addrs(k);
            router.push_str(&format!(
                "protocol bgp node{k}v4 {{ local as 65000; neighbor {a4} as 65001; {timers} ipv4 {{ import all; export none; }}; }}\n\
                 protocol bgp node{k}v6 {{ local as 65000; neighbor {a6} as 65001; {timers} ipv6 {{ import all; export none; }}; }}\n"
            ));
        }
        let mut procs = self.bgp.lock().expect("bgp");
        procs.push(Some(self.bird(&self.router, "router", &router)));
        for k in 1..=self.nodes() {
            procs.push(nodes_too.then(|| self.start_node_bird(k)));
        }
    }

    fn bird(&self, ns: &Netns, name: &str, conf: &str) -> std::process::Child {
        let conf_path = format!("{}/{name}.conf", self.bgp_dir);
        std::fs::write(&conf_path, conf).expect("bird config");
        let sock = format!("{}/{name}.ctl", self.bgp_dir);
        let pid = format!("{}/{name}.pid", self.bgp_dir);
        // No pipe of ours: it logs to its file, and may outlive this process
        // (`testbed up`), whose output a caller may be reading to its end.
        ns.spawn_detached(&["bird", "-f", "-c", &conf_path, "-s", &sock, "-P", &pid])
    }

    fn start_node_bird(&self, k: usize) -> std::process::Child {
        let (a4, a6) = node_addrs(k);
        let (g4, g6) = (
            Ipv4Addr::from(u32::from(a4) - 1),
            Ipv6Addr::from(u128::from(a6) - 1),
        );
        let timers = "hold time 3; keepalive time 1; connect delay time 1; connect retry time 1; error wait time 1, 2;";
        let conf = format!(
            "router id {a4};\nlog \"{d}/node{k}.log\" all;\nprotocol device {{ scan time 10; }}\n\
             protocol kernel {{ kernel table {ANNOUNCE_TABLE}; learn; scan time 1; ipv4 {{ import all; export none; }}; }}\n\
             protocol kernel {{ kernel table {ANNOUNCE_TABLE}; learn; scan time 1; ipv6 {{ import all; export none; }}; }}\n\
             protocol bgp up4 {{ local as 65001; neighbor {g4} as 65000; {timers} ipv4 {{ import none; export all; }}; }}\n\
             protocol bgp up6 {{ local as 65001; neighbor {g6} as 65000; {timers} ipv6 {{ import none; export all; }}; }}\n",
            d = self.bgp_dir
        );
        self.bird(self.node(k), &format!("node{k}"), &conf)
    }

    /// Node `k`'s BGP speaker dies (kill -9), as with the node: the router's sessions to
    /// it close and it withdraws the node's routes.
    pub fn kill_node_bgp(&self, k: usize) {
        let mut procs = self.bgp.lock().expect("bgp");
        if let Some(mut c) = procs[k].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Node `k`'s BGP speaker starts again.
    pub fn start_node_bgp(&self, k: usize) {
        let child = self.start_node_bird(k);
        self.bgp.lock().expect("bgp")[k] = Some(child);
    }

    /// Process ids of the BGP speakers running now (router first).
    pub fn bgp_pids(&self) -> Vec<u32> {
        self.bgp
            .lock()
            .expect("bgp")
            .iter()
            .flatten()
            .map(std::process::Child::id)
            .collect()
    }

    /// The router's next hops for the IPv4 and the IPv6 VIP (0 when it has no route).
    pub fn vip_next_hops(&self) -> (usize, usize) {
        let count = |family: &str, vip: String| {
            let out = self
                .router
                .run(&["ip", "-j", family, "route", "show", &vip]);
            let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
            rows.first()
                .map_or(0, |r| r["nexthops"].as_array().map_or(1, Vec::len))
        };
        (
            count("-4", format!("{VIP4}/32")),
            count("-6", format!("{VIP6}/128")),
        )
    }

    /// The balancer node (1-based) the router's ECMP sends a client packet to: the
    /// kernel's own multipath choice for that 5-tuple (`ip route get` with ports), as it
    /// arrives from the client's path of `src`.
    pub fn ecmp_node(&self, src: IpAddr, sport: u16, dport: u16) -> Option<usize> {
        let (dst, family) = if src.is_ipv4() {
            (VIP4.to_string(), "-4")
        } else {
            (VIP6.to_string(), "-6")
        };
        let s = src.to_string();
        let iif = if s.starts_with("10.1.1.") || s.starts_with("fd00:1:1:") {
            "rtw"
        } else {
            "rtc"
        };
        let out = self.router.try_run(&[
            "ip",
            family,
            "route",
            "get",
            &dst,
            "from",
            &s,
            "iif",
            iif,
            "ipproto",
            "tcp",
            "sport",
            &sport.to_string(),
            "dport",
            &dport.to_string(),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let via = text.split_whitespace().skip_while(|w| *w != "via").nth(1)?;
        let via: IpAddr = via.parse().ok()?;
        (1..=self.nodes()).find(|k| {
            let (a4, a6) = node_addrs(*k);
            via == IpAddr::V4(a4) || via == IpAddr::V6(a6)
        })
    }

    /// Waits until the router reaches both VIPs through `n` nodes.
    pub fn wait_next_hops(&self, n: usize, within: Duration) {
        wait_until(
            within,
            &format!("the router's VIP routes through {n} nodes"),
            || (self.vip_next_hops() == (n, n)).then_some(()),
        );
    }

    /// Balancer node `k` (1-based).
    pub fn node(&self, k: usize) -> &Netns {
        if k == 1 {
            &self.lb
        } else {
            &self.more_lbs[k - 2]
        }
    }

    pub fn nodes(&self) -> usize {
        1 + self.more_lbs.len()
    }

    /// Backend `i` (1-based) on 10.0.(10+i).0/24 and fd00:b<i>::/64.
    fn add_backend(&mut self, i: usize) {
        let be = Netns::new(&format!(
            "{}-be{i}",
            self.client.name().trim_end_matches("-client")
        ));
        let rt_if = format!("rtb{i}");
        veth(&be, "eth0", &self.router, &rt_if, 1600);
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
        // VIPs on lo; the backend must not answer ARP for them on its real interface.
        be.addr("lo", &format!("{VIP4}/32"));
        be.addr("lo", &format!("{VIP6}/128"));
        for (k, v) in [
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
        ] {
            be.sysctl(k, v);
        }
        be.run(&[
            "ip",
            "mptcp",
            "limits",
            "set",
            "subflow",
            "2",
            "add_addr_accepted",
            "2",
        ]);
        self.router.addr(&rt_if, &format!("10.0.{}.1/24", 10 + i));
        self.router.addr(&rt_if, &format!("fd00:b{i}::1/64"));
        self.router.offloads_off(&rt_if);
        be.offloads_off("eth0");
        let bpffs = format!("{}/be{i}", self.bpffs);
        be.within(move || decap::attach(&bpffs, "eth0", None).expect("attach decapsulation"));
        self.backends.push(be);
    }

    /// Loads the balancer into the LB namespace, attaches it (generic XDP), and
    /// configures both VIPs as service 0 with no backends yet.
    pub fn balancer(&self, sizes: Sizes, flags: u32) -> Dataplane {
        let mut dp = self.lb.within(move || {
            // What the daemon sets before it attaches (lb_userspace::host).
            lb_userspace::host::accept_own_source("lb0").expect("accept_local on lb0");
            let mut dp = Dataplane::load(sizes).expect("load balancer");
            dp.attach("lb0", Some(XdpMode::Skb)).expect("attach");
            dp
        });
        dp.set_config(Config {
            seed: 0x0bad_cafe,
            src4: addr_words(LB4.parse().expect("ip")).0[0],
            src6: addr_words(LB6.parse().expect("ip")).0,
            flags,
            ..Default::default()
        })
        .expect("config");
        dp.add_vip(IpAddr::V4(VIP4), PORT, 6, 0).expect("vip4");
        dp.add_vip(IpAddr::V6(VIP6), PORT, 6, 0).expect("vip6");
        dp
    }

    /// A daemon configuration for this testbed: the `[balancer]` section (pin path and
    /// control socket those of [`crate::daemon::Daemon::paths`]`(tag)`), then `services`.
    pub fn daemon_config(tag: &str, services: &str) -> String {
        Testbed::balancer_config(tag, 1, "", services)
    }

    /// The same for balancer node `k` of a fleet: its own addresses as the tunnels'
    /// source, and its VIPs announced through [`ANNOUNCE_TABLE`].
    pub fn node_config(tag: &str, k: usize, services: &str) -> String {
        let announce = format!("announce_route_table = {ANNOUNCE_TABLE}\n");
        Testbed::balancer_config(tag, k, &announce, services)
    }

    /// Node `k`'s `[balancer]` section with `extra` lines, then `services`.
    fn balancer_config(tag: &str, k: usize, extra: &str, services: &str) -> String {
        let (_, socket, pins) = crate::daemon::Daemon::paths(tag);
        let (a4, a6) = node_addrs(k);
        format!(
            r#"[balancer]
interface = "lb0"
xdp_mode = "generic"
pin_path = "{}"
control_socket = "{}"
hash_seed = 0x0badcafe
conn_table_size = 65536
token_table_size = 65536
source_v4 = "{a4}"
source_v6 = "{a6}"
{extra}
{services}"#,
            pins.display(),
            socket.display()
        )
    }

    /// A `[[service]]` with both VIPs on PORT and backends `ids`, each checked by
    /// `health` (TOML inline table, or empty for none).
    pub fn service_toml(name: &str, ids: &[usize], health: &str) -> String {
        let mut s = format!(
            "[[service]]\nname = \"{name}\"\nvips = [\"{VIP4}:{PORT}/tcp\", \"[{VIP6}]:{PORT}/tcp\"]\n"
        );
        if !health.is_empty() {
            s.push_str(&format!("health = {health}\n"));
        }
        for i in ids {
            s.push_str(&format!(
                "[[service.backend]]\naddress = \"{}\"\n",
                backend_addr4(*i)
            ));
        }
        s
    }

    /// Backends announce the IPv6 VIP (an MPTCP `signal` endpoint), so IPv4 connections
    /// add a subflow to it: their join crosses families.
    pub fn announce_vip6(&self) {
        for be in &self.backends {
            be.run(&[
                "ip",
                "mptcp",
                "endpoint",
                "add",
                &VIP6.to_string(),
                "dev",
                "lo",
                "signal",
            ]);
        }
    }

    /// A second path for both families, also for connections already established:
    /// IPv6 connections (which start on cell) join from wifi, IPv4 ones (which start on
    /// wifi) join from cell. No family crossing: applications open IPv4 sockets.
    pub fn client_second_paths(&self) {
        self.client_joins(true);
        self.client.run(&[
            "ip", "mptcp", "endpoint", "add", "10.1.2.2", "dev", "cell0", "subflow",
        ]);
    }

    /// On: the client opens a second subflow from its wifi IPv6 address (a `subflow`
    /// endpoint), also for connections already established. Off: it opens none.
    pub fn client_joins(&self, on: bool) {
        if on {
            self.client.run(&[
                "ip",
                "mptcp",
                "endpoint",
                "add",
                "fd00:1:1::2",
                "dev",
                "wifi0",
                "subflow",
            ]);
        } else {
            self.client.run(&["ip", "mptcp", "endpoint", "flush"]);
        }
    }

    pub fn members(ids: &[usize]) -> Vec<maglev::Member> {
        ids.iter()
            .map(|&i| maglev::Member {
                id: i as u32,
                key: backend_addr4(i).to_string(),
                weight: 1,
            })
            .collect()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for c in self.bgp.lock().expect("bgp").iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Unpin the decapsulation links; the namespaces go with their Netns values.
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// What a backend's server saw of one connection, read from its own socket.
#[derive(Clone, Debug, Default)]
pub struct ConnRecord {
    /// MPTCP token (0 for plain TCP).
    pub token: u32,
    /// Address family (4 or 6) of each subflow's remote address, initial one first.
    pub subflow_families: Vec<u8>,
    /// The client's address of each subflow (which path it took).
    pub subflow_peers: Vec<IpAddr>,
    /// Each subflow's (client port, server port): with the addresses, its 5-tuple.
    pub subflow_ports: Vec<(u16, u16)>,
    /// The client's address and port of the first subflow (v4-mapped for IPv4).
    pub peer: Option<SocketAddr>,
}

/// A server on a backend: reads UPLOAD bytes, answers DOWNLOAD bytes. With
/// `expect_joins` set it waits (up to `join_wait_ms`, default 10 s) until the connection
/// has a second subflow before answering, so what it records is the connection's final
/// shape.
pub struct Server {
    pub accepted: Arc<AtomicUsize>,
    pub records: Arc<Mutex<Vec<ConnRecord>>>,
    pub expect_joins: Arc<AtomicBool>,
    pub join_wait_ms: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// What the server has recorded so far (a copy).
    pub fn recorded(&self) -> Vec<ConnRecord> {
        self.records.lock().expect("records").clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn mptcp_socket(domain: Domain) -> std::io::Result<Socket> {
    Socket::new(domain, Type::STREAM, Some(Protocol::from(IPPROTO_MPTCP)))
}

/// The address of a sockaddr_in/sockaddr_in6 (v4-mapped ones as IPv4).
fn sockaddr_ip(raw: &[u8]) -> Option<IpAddr> {
    match u16::from_ne_bytes([raw[0], raw[1]]) as i32 {
        libc::AF_INET => Some(IpAddr::from([raw[4], raw[5], raw[6], raw[7]])),
        libc::AF_INET6 => {
            let a: [u8; 16] = raw[8..24].try_into().ok()?;
            let v6 = Ipv6Addr::from(a);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

fn sockaddr_family_addr(raw: &[u8]) -> u8 {
    match u16::from_ne_bytes([raw[0], raw[1]]) as i32 {
        libc::AF_INET => 4,
        libc::AF_INET6 => {
            // A v4-mapped IPv6 address is an IPv4 peer on a dual-stack socket.
            let a = &raw[8..24];
            if a[..10].iter().all(|b| *b == 0) && a[10..12] == [0xff, 0xff] {
                4
            } else {
                6
            }
        }
        _ => 0,
    }
}

/// The token and the subflows' remote address families of an MPTCP socket.
pub fn mptcp_shape(sock: &impl std::os::fd::AsRawFd) -> ConnRecord {
    let fd = sock.as_raw_fd();
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_MPTCP,
            MPTCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return ConnRecord::default();
    }
    let token = u32::from_ne_bytes(info[12..16].try_into().expect("4 bytes"));
    // struct mptcp_subflow_data (16 bytes) then one mptcp_subflow_addrs (two
    // sockaddr_storage, 256 bytes) per subflow.
    const ENTRY: usize = 256;
    let mut buf = vec![0u8; 16 + 8 * ENTRY];
    buf[..4].copy_from_slice(&16u32.to_ne_bytes());
    buf[12..16].copy_from_slice(&(ENTRY as u32).to_ne_bytes());
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: as above, into `buf`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_MPTCP,
            MPTCP_SUBFLOW_ADDRS,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return ConnRecord {
            token,
            ..Default::default()
        };
    }
    let n = u32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    let families = (0..n.min(8))
        .map(|k| sockaddr_family_addr(&buf[16 + k * ENTRY + 128..]))
        .collect();
    let peers = (0..n.min(8))
        .filter_map(|k| sockaddr_ip(&buf[16 + k * ENTRY + 128..]))
        .collect();
    // Both sockaddr_in and sockaddr_in6 keep the port at bytes 2-3, network order.
    let port = |at: usize| u16::from_be_bytes([buf[at + 2], buf[at + 3]]);
    let ports = (0..n.min(8))
        .map(|k| (port(16 + k * ENTRY + 128), port(16 + k * ENTRY)))
        .collect();
    ConnRecord {
        token,
        subflow_families: families,
        subflow_peers: peers,
        subflow_ports: ports,
        peer: None,
    }
}

/// A listening socket on every address: MPTCP, dual-stack (IPv4 clients arrive
/// v4-mapped; plain TCP clients fall back). Where MPTCP is disabled
/// (`net.mptcp.enabled=0`) a plain TCP socket, as `mptcpize` would leave a server.
fn listen(port: u16) -> std::net::TcpListener {
    let listener = mptcp_socket(Domain::IPV6)
        .or_else(|_| Socket::new(Domain::IPV6, Type::STREAM, None))
        .expect("socket");
    listener.set_only_v6(false).expect("dual-stack");
    listener.set_reuse_address(true).expect("reuse");
    listener
        .bind(&SockAddr::from(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            port,
        )))
        .expect("bind");
    listener.listen(1024).expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    listener.into()
}

/// Starts the server in `ns` and returns once it listens (on PORT, and on HEALTH_PORT
/// for health checks).
pub fn serve(ns: &Netns) -> Server {
    let accepted = Arc::new(AtomicUsize::new(0));
    let records = Arc::new(Mutex::new(Vec::new()));
    let expect_joins = Arc::new(AtomicBool::new(false));
    let join_wait_ms = Arc::new(std::sync::atomic::AtomicU64::new(10_000));
    let jw = join_wait_ms.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (a, r, e, s) = (
        accepted.clone(),
        records.clone(),
        expect_joins.clone(),
        stop.clone(),
    );
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    ns.enter(move || {
        let listener = listen(PORT);
        // Health checks connect here, so they never count as served connections.
        let health = listen(HEALTH_PORT);
        ready_tx.send(()).expect("ready");
        while !s.load(Ordering::Relaxed) {
            while let Ok((probe, _)) = health.accept() {
                drop(probe);
            }
            match listener.accept() {
                Ok((mut conn, peer)) => {
                    a.fetch_add(1, Ordering::Relaxed);
                    let (r, wait, w) = (r.clone(), e.load(Ordering::Relaxed), jw.clone());
                    std::thread::spawn(move || {
                        conn.set_nonblocking(false).expect("blocking");
                        conn.set_read_timeout(Some(Duration::from_secs(20)))
                            .expect("timeout");
                        let mut buf = vec![0u8; UPLOAD];
                        if conn.read_exact(&mut buf).is_err()
                            || buf.iter().enumerate().any(|(i, b)| *b != (i % 251) as u8)
                        {
                            return;
                        }
                        let mut shape = mptcp_shape(&conn);
                        let deadline =
                            Instant::now() + Duration::from_millis(w.load(Ordering::Relaxed));
                        while wait && shape.subflow_families.len() < 2 && Instant::now() < deadline
                        {
                            std::thread::sleep(Duration::from_millis(5));
                            shape = mptcp_shape(&conn);
                        }
                        shape.peer = Some(peer);
                        r.lock().expect("records").push(shape);
                        let reply: Vec<u8> = (0..DOWNLOAD).map(|i| (i % 253) as u8).collect();
                        let _ = conn.write_all(&reply);
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server listening");
    Server {
        accepted,
        records,
        expect_joins,
        join_wait_ms,
        stop,
    }
}

/// One client connection (MPTCP or plain TCP): the upload in two halves (`between` runs
/// in the middle, to change something while the connection is established), then the
/// whole download, checked byte by byte.
/// Returns the client's address and port of the first subflow.
pub fn exchange(vip: IpAddr, mptcp: bool, between: impl FnOnce()) -> Result<SocketAddr, String> {
    let addr = SocketAddr::new(vip, PORT);
    // MPTCP clients use a dual-stack IPv6 socket (IPv4 VIPs as v4-mapped addresses): the
    // kernel lets one connection mix address families only on an AF_INET6 socket.
    let (domain, target) = match (mptcp, vip) {
        (true, IpAddr::V4(v4)) => (
            Domain::IPV6,
            SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), PORT),
        ),
        (_, IpAddr::V4(_)) => (Domain::IPV4, addr),
        (_, IpAddr::V6(_)) => (Domain::IPV6, addr),
    };
    let sock = if mptcp {
        mptcp_socket(domain)
    } else {
        Socket::new(domain, Type::STREAM, None)
    }
    .map_err(|e| format!("socket: {e}"))?;
    sock.connect_timeout(&SockAddr::from(target), Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut c: std::net::TcpStream = sock.into();
    let local = c.local_addr().map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(30)))
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
    Ok(local)
}

/// `n` connections from the client, `parallel` at a time; `vip_of(k)` picks each one's VIP.
pub fn run_clients(
    client: &Netns,
    n: usize,
    parallel: usize,
    mptcp: bool,
    vip_of: fn(usize) -> IpAddr,
) -> Vec<String> {
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
                    if let Err(e) = exchange(vip_of(k), mptcp, || {}) {
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

/// Opens `n` connections and holds each one established after half its upload; runs
/// `during` (change the balancer under them), then lets them finish. Returns the errors.
pub fn across(
    client: &Netns,
    n: usize,
    mptcp: bool,
    vip_of: fn(usize) -> IpAddr,
    during: impl FnOnce(),
) -> Vec<String> {
    let established = Arc::new(std::sync::Barrier::new(n + 1));
    let resumed = Arc::new(std::sync::Barrier::new(n + 1));
    let handles: Vec<_> = (0..n)
        .map(|k| {
            let (est, res) = (established.clone(), resumed.clone());
            client.enter(move || {
                let mut waited = false;
                let r = exchange(vip_of(k), mptcp, || {
                    est.wait();
                    res.wait();
                    waited = true;
                });
                if !waited {
                    // Failed before the pause: still release the others.
                    est.wait();
                    res.wait();
                }
                r
            })
        })
        .collect();
    established.wait();
    during();
    resumed.wait();
    handles
        .into_iter()
        .filter_map(|h| h.join().expect("client thread").err())
        .collect()
}

/// Alternating IPv4 and IPv6 VIPs.
pub fn alternate(k: usize) -> IpAddr {
    if k.is_multiple_of(2) {
        IpAddr::V4(VIP4)
    } else {
        IpAddr::V6(VIP6)
    }
}

//! The configuration file (`mptcp-lb run --config FILE`): parsed, then validated as a
//! whole before anything is applied. Every error names the file, the field and the
//! reason, so an operator can fix it without reading code.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::maglev;

/// A configuration the daemon refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: String, reason: String },
    /// Not TOML, a wrong type, or an unknown key (toml names the key).
    #[error("{file}:{line}:{column}: {reason}")]
    Parse {
        file: String,
        line: usize,
        column: usize,
        reason: String,
    },
    /// Well-formed but wrong: the field, as a path (`service[0].backend[1].weight`).
    #[error("{file}: {field}: {reason}")]
    Invalid {
        file: String,
        field: String,
        reason: String,
    },
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// Native (driver) mode, falling back to generic with a warning.
    #[default]
    Auto,
    Native,
    Generic,
}

/// What to do with an MP_JOIN whose token nobody learned.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnknownJoinPolicy {
    /// Drop it: the client keeps its first subflow.
    #[default]
    Drop,
    /// Place it by Maglev on the token.
    Hash,
}

/// How a service places new connections.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    /// Each connection by its own 5-tuple (Maglev): the most even spread.
    #[default]
    None,
    /// Every connection of one client address to one backend (Maglev on the client's
    /// address), for applications whose connections must meet on one server (iperf3's
    /// control and data connections, sessions kept in a server's memory), as IPVS
    /// persistence does. Costs evenness: clients behind one NAT address share a
    /// backend. MPTCP joins from another address still follow their connection.
    ClientAddress,
}

/// Where a service's nodes learn its connections' MPTCP tokens from.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LearnTokens {
    /// From the client's handshake, in the dataplane (needs no backend software; a node
    /// learns only the connections whose third ACK it forwards).
    #[default]
    Client,
    /// Only from the backends' announcements (`mptcp-lb agent` on each backend): every
    /// node knows every token one client round trip before the client can join, and no
    /// client packet can create or change a token.
    Backend,
    /// Both.
    Both,
}

/// How a service's MP_JOIN subflows find their backend.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JoinSteering {
    /// By the token in the join SYN, looked up in the token table this node learned.
    #[default]
    Token,
    /// By port: each backend has a `join_port`, sets the C bit and announces VIP:port
    /// (ADD_ADDR), and every node sends that port's packets to it with no state.
    /// Version 0 clients (no C bit) still use the token path; version 1 tokens are not
    /// learned, so a version 1 client that ignores the C bit and joins the service port
    /// meets `unknown_join_policy`.
    Port,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect.
    Tcp,
    /// A connect with IPPROTO_MPTCP that must really negotiate MPTCP.
    Mptcp,
    /// An HTTP GET that must answer the expected status.
    Http,
    /// The same over TLS (rustls): the certificate is checked against `tls_ca_file` or
    /// the system's roots, for `tls_server_name` or the backend's address.
    Https,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// Port to check; default: the service's first VIP port.
    pub port: Option<u16>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Successes in a row before a down backend is up again.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row before an up backend is down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    #[serde(default = "default_http_path")]
    pub http_path: String,
    #[serde(default = "default_http_status")]
    pub http_status: u16,
    /// `https`: PEM file of the CA certificates to trust (default: the system's).
    pub tls_ca_file: Option<PathBuf>,
    /// `https`: the name the certificate must carry (default: the backend's address).
    pub tls_server_name: Option<String>,
    /// `https`: check the certificate at all (default true; false trusts any).
    #[serde(default = "default_true")]
    pub tls_verify: bool,
}

fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_http_path() -> String {
    "/".into()
}
fn default_http_status() -> u16 {
    200
}
fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// No new connections; established ones and their joins still reach it.
    #[serde(default)]
    pub drain: bool,
    /// Overrides the service's health check.
    pub health: Option<HealthCheck>,
    /// With `join_steering = "port"`: the port this backend announces on every TCP VIP
    /// of its service, where its joins arrive. The same on every node.
    pub join_port: Option<u16>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// `ADDRESS:PORT/PROTO`, e.g. `203.0.113.10:443/tcp` or `[2001:db8::10]:443/tcp`.
    pub vips: Vec<String>,
    pub health: Option<HealthCheck>,
    #[serde(default)]
    pub join_steering: JoinSteering,
    #[serde(default)]
    pub affinity: Affinity,
    #[serde(default)]
    pub learn_tokens: LearnTokens,
    #[serde(rename = "backend", default)]
    pub backends: Vec<BackendConfig>,
}

impl ServiceConfig {
    /// The join ports of this service as VIPs: each backend's port on every TCP VIP
    /// address (once per address, however many ports the service has there), with the
    /// backend's index in `backends`. Empty unless it steers by port.
    pub fn join_vips(&self) -> Vec<(Vip, usize)> {
        if self.join_steering != JoinSteering::Port {
            return Vec::new();
        }
        let mut addrs: Vec<IpAddr> = Vec::new();
        for v in self.vips.iter().filter_map(|v| parse_vip(v).ok()) {
            if v.proto == 6 && !addrs.contains(&v.addr) {
                addrs.push(v.addr);
            }
        }
        let mut out = Vec::new();
        for addr in addrs {
            for (bi, be) in self.backends.iter().enumerate() {
                if let Some(port) = be.join_port {
                    out.push((
                        Vip {
                            addr,
                            port,
                            proto: 6,
                        },
                        bi,
                    ));
                }
            }
        }
        out
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalancerConfig {
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: XdpModeConfig,
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Same on every balancer node, so nodes agree on backends.
    #[serde(default)]
    pub hash_seed: u32,
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    /// Capacity of the IPv4 connection table.
    #[serde(default = "default_conn_entries")]
    pub conn_table_size: u32,
    /// Capacity of the IPv6 connection table.
    #[serde(default = "default_conn6_entries")]
    pub conn6_table_size: u32,
    #[serde(default = "default_token_entries")]
    pub token_table_size: u32,
    /// Outer source of tunnels to IPv4 backends.
    pub source_v4: Option<Ipv4Addr>,
    /// Outer source of tunnels to IPv6 backends.
    pub source_v6: Option<Ipv6Addr>,
    /// Low bits of the outer source replaced by flow-hash bits (0 to 16).
    #[serde(default)]
    pub source_vary_bits: u32,
    #[serde(default)]
    pub unknown_join_policy: UnknownJoinPolicy,
    #[serde(default = "default_token_idle_secs")]
    pub token_idle_secs: u64,
    /// Flood guard: new flows a second per CPU above which a new flow (any SYN, a miss,
    /// a new UDP flow) is forwarded but not recorded until a packet under the limit
    /// (Katran's MAX_CONN_RATE); 0 = no limit.
    #[serde(default = "default_max_conn_rate")]
    pub max_conn_rate: u32,
    /// Tokens one CPU may learn a second (each costs a SHA-256 and a token-table insert,
    /// and any client can make handshakes); keys over it are not used. 0 = no limit.
    #[serde(default = "default_max_learn_rate")]
    pub max_learn_rate: u32,
    /// Prometheus metrics listen address.
    pub metrics_listen: Option<SocketAddr>,
    /// The daemon's control socket (Unix, root only), used by `mptcp-lb reload`,
    /// `status` and `backend ...`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// A fleet behind ECMP: the kernel routing table the daemon keeps its VIP routes in,
    /// for the node's BGP speaker to announce (see `announce`). None: no announcements.
    pub announce_route_table: Option<u32>,
    /// Where this node receives the backends' token announcements (UDP), for services
    /// with `learn_tokens = "backend"` or `"both"`. None: not received.
    pub token_announcements_listen: Option<SocketAddr>,
    /// The key the announcements are authenticated with (HMAC-SHA256), shared with the
    /// backends' agents: a file of at least 32 bytes (e.g. `openssl rand -hex 32`).
    pub token_announcements_key_file: Option<PathBuf>,
    /// MPTCP awareness (token learning, joins steered by token). Off, joins are placed
    /// by their 5-tuple like any SYN, as a classic L4 balancer does: for comparison.
    #[serde(default = "default_true")]
    pub mptcp_aware: bool,
}

fn default_true() -> bool {
    true
}
fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

/// Where the daemon listens for the CLI unless the configuration says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/mptcp-lb/control.sock";

fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/mptcp-lb")
}
fn default_ring_size() -> u32 {
    lb_common::maps::DEFAULT_RING_SIZE
}
fn default_conn_entries() -> u32 {
    lb_common::maps::DEFAULT_CONN_ENTRIES
}
fn default_conn6_entries() -> u32 {
    lb_common::maps::DEFAULT_CONN6_ENTRIES
}
fn default_token_entries() -> u32 {
    lb_common::maps::DEFAULT_TOKEN_ENTRIES
}
fn default_max_conn_rate() -> u32 {
    DEFAULT_MAX_CONN_RATE
}
/// Katran's figure: 125,000 new connections a second on one CPU.
pub const DEFAULT_MAX_CONN_RATE: u32 = 125_000;
fn default_max_learn_rate() -> u32 {
    DEFAULT_MAX_LEARN_RATE
}
/// 10,000 tokens a second per CPU: far above the new MPTCP connections one CPU of a
/// balancer sees, and 5 ms of SHA-256 a second at most.
pub const DEFAULT_MAX_LEARN_RATE: u32 = 10_000;
impl BalancerConfig {
    /// `token_idle_secs` in ns: how long a token routes joins without traffic (never 0:
    /// validation refuses it).
    pub fn token_idle_ns(&self) -> u64 {
        self.token_idle_secs.saturating_mul(1_000_000_000)
    }
}

fn default_token_idle_secs() -> u64 {
    lb_common::maps::DEFAULT_TOKEN_IDLE_NS / 1_000_000_000
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub balancer: BalancerConfig,
    #[serde(rename = "service", default)]
    pub services: Vec<ServiceConfig>,
}

/// A VIP as the dataplane keys it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Vip {
    pub addr: IpAddr,
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
}

impl std::fmt::Display for Vip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.proto == 17 { "udp" } else { "tcp" };
        write!(f, "{}/{proto}", SocketAddr::new(self.addr, self.port))
    }
}

/// Parses `ADDRESS:PORT/PROTO` (`/PROTO` optional, default tcp).
pub fn parse_vip(s: &str) -> Result<Vip, String> {
    let (sock, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p),
        None => (s, "tcp"),
    };
    let proto = match proto {
        "tcp" => 6,
        "udp" => 17,
        other => return Err(format!("protocol {other:?} is neither tcp nor udp")),
    };
    let sock: SocketAddr = sock.parse().map_err(|_| {
        format!("{s:?} is not ADDRESS:PORT/PROTO (IPv6 in brackets: [2001:db8::1]:443/tcp)")
    })?;
    if sock.port() == 0 {
        return Err("port 0 cannot be a VIP".into());
    }
    Ok(Vip {
        addr: sock.ip(),
        port: sock.port(),
        proto,
    })
}

/// Largest backend weight (the Maglev table gives each weight unit its turns).
pub const MAX_WEIGHT: u32 = 1000;

impl Config {
    /// Reads, parses and validates `path`; `interface_exists` tells whether a network
    /// interface exists (the daemon passes a real check, tests a fake).
    pub fn load(
        path: &Path,
        interface_exists: impl Fn(&str) -> bool,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        Config::parse(&file, &text, interface_exists)
    }

    pub fn parse(
        file: &str,
        text: &str,
        interface_exists: impl Fn(&str) -> bool,
    ) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start).min(text.len());
            let before = &text[..at];
            ConfigError::Parse {
                file: file.to_string(),
                line: before.matches('\n').count() + 1,
                column: at - before.rfind('\n').map_or(0, |n| n + 1) + 1,
                reason: e.message().to_string(),
            }
        })?;
        cfg.validate(file, interface_exists)?;
        Ok(cfg)
    }

    fn validate(
        &self,
        file: &str,
        interface_exists: impl Fn(&str) -> bool,
    ) -> Result<(), ConfigError> {
        let bad = |field: String, reason: String| ConfigError::Invalid {
            file: file.to_string(),
            field,
            reason,
        };
        let b = &self.balancer;
        if b.interface.is_empty() {
            return Err(bad("balancer.interface".into(), "is empty".into()));
        }
        if !interface_exists(&b.interface) {
            return Err(bad(
                "balancer.interface".into(),
                format!("no interface named {:?} on this host", b.interface),
            ));
        }
        if !maglev::is_prime(b.ring_size) {
            return Err(bad(
                "balancer.ring_size".into(),
                format!(
                    "{} is not prime (Maglev needs a prime, e.g. 65537)",
                    b.ring_size
                ),
            ));
        }
        if b.ring_size.saturating_mul(lb_common::maps::MAX_SERVICES) > 1 << 26 {
            return Err(bad(
                "balancer.ring_size".into(),
                format!("{} is too large (at most 1048573)", b.ring_size),
            ));
        }
        if b.conn_table_size < 1024 {
            return Err(bad(
                "balancer.conn_table_size".into(),
                format!("{} is too small (at least 1024)", b.conn_table_size),
            ));
        }
        if b.conn6_table_size < 1024 {
            return Err(bad(
                "balancer.conn6_table_size".into(),
                format!("{} is too small (at least 1024)", b.conn6_table_size),
            ));
        }
        if b.token_table_size < 1024 {
            return Err(bad(
                "balancer.token_table_size".into(),
                format!("{} is too small (at least 1024)", b.token_table_size),
            ));
        }
        if b.source_vary_bits > lb_common::hash::MAX_VARY_BITS {
            return Err(bad(
                "balancer.source_vary_bits".into(),
                format!("{} is more than 16", b.source_vary_bits),
            ));
        }
        if let Some(t) = b.announce_route_table
            && (t == 0 || t >= 253)
        {
            return Err(bad(
                "balancer.announce_route_table".into(),
                format!(
                    "{t} is not a table of its own (1 to 252; 253-255 are the kernel's default, main and local)"
                ),
            ));
        }
        if b.token_announcements_listen.is_some() && b.token_announcements_key_file.is_none() {
            return Err(bad(
                "balancer.token_announcements_key_file".into(),
                "missing: announcements are accepted only with the key the backends' agents share"
                    .into(),
            ));
        }
        if b.token_idle_secs == 0 {
            return Err(bad(
                "balancer.token_idle_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.services.len() > lb_common::maps::MAX_SERVICES as usize {
            return Err(bad(
                "service".into(),
                format!(
                    "{} services, at most {}",
                    self.services.len(),
                    lb_common::maps::MAX_SERVICES
                ),
            ));
        }

        let mut names = HashSet::new();
        let mut vips: HashMap<Vip, String> = HashMap::new();
        let mut backends_total = 0usize;
        for (si, s) in self.services.iter().enumerate() {
            let at = |f: &str| format!("service[{si}] ({}).{f}", s.name);
            if s.name.is_empty() {
                return Err(bad(format!("service[{si}].name"), "is empty".into()));
            }
            // Names are stored whole in the pinned metadata (that is how a restarted
            // daemon keeps ids, drains and tokens) and written into metrics labels.
            if s.name.len() > lb_common::maps::SERVICE_NAME_LEN {
                return Err(bad(
                    format!("service[{si}].name"),
                    format!(
                        "{:?} is {} bytes, more than the {} a name may have",
                        s.name,
                        s.name.len(),
                        lb_common::maps::SERVICE_NAME_LEN
                    ),
                ));
            }
            if let Some(c) = s
                .name
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            {
                return Err(bad(
                    format!("service[{si}].name"),
                    format!(
                        "{:?} contains {c:?}: names are letters, digits, '-', '_' and '.'",
                        s.name
                    ),
                ));
            }
            if !names.insert(&s.name) {
                return Err(bad(
                    at("name"),
                    format!("duplicate service name {:?}", s.name),
                ));
            }
            if s.vips.is_empty() {
                return Err(bad(at("vips"), "a service needs at least one VIP".into()));
            }
            for (vi, v) in s.vips.iter().enumerate() {
                let vip = parse_vip(v).map_err(|r| bad(at(&format!("vips[{vi}]")), r))?;
                if let Some(other) = vips.insert(vip, s.name.clone()) {
                    return Err(bad(
                        at(&format!("vips[{vi}]")),
                        format!("duplicate VIP {vip}, already in service {other:?}"),
                    ));
                }
            }
            let mut addrs = HashSet::new();
            for (bi, be) in s.backends.iter().enumerate() {
                let field = |f: &str| at(&format!("backend[{bi}].{f}"));
                if be.weight == 0 || be.weight > MAX_WEIGHT {
                    return Err(bad(
                        field("weight"),
                        format!("{} is out of range 1..={MAX_WEIGHT}", be.weight),
                    ));
                }
                if !addrs.insert(be.address) {
                    return Err(bad(
                        field("address"),
                        format!("duplicate backend {}", be.address),
                    ));
                }
                match be.address {
                    IpAddr::V4(_) if b.source_v4.is_none() => {
                        return Err(bad(
                            field("address"),
                            format!(
                                "IPv4 backend {} but balancer.source_v4 is not set (the outer source of IPv4 tunnels)",
                                be.address
                            ),
                        ));
                    }
                    IpAddr::V6(_) if b.source_v6.is_none() => {
                        return Err(bad(
                            field("address"),
                            format!(
                                "IPv6 backend {} but balancer.source_v6 is not set (the outer source of IPv6 tunnels)",
                                be.address
                            ),
                        ));
                    }
                    _ => {}
                }
                if let Some(h) = &be.health {
                    check_health(h).map_err(|(f, r)| bad(field(&format!("health.{f}")), r))?;
                }
            }
            if let Some(h) = &s.health {
                check_health(h).map_err(|(f, r)| bad(at(&format!("health.{f}")), r))?;
            }
            for (bi, be) in s.backends.iter().enumerate() {
                let field = at(&format!("backend[{bi}].join_port"));
                match (s.join_steering, be.join_port) {
                    (JoinSteering::Port, None) => {
                        return Err(bad(
                            field,
                            "missing: every backend of a service with join_steering = \"port\" needs its own join port".into(),
                        ));
                    }
                    (JoinSteering::Token, Some(_)) => {
                        return Err(bad(
                            field,
                            "set, but the service's join_steering is \"token\" (set join_steering = \"port\", or remove it)".into(),
                        ));
                    }
                    (_, Some(0)) => return Err(bad(field, "port 0 cannot be a join port".into())),
                    _ => {}
                }
            }
            if s.learn_tokens != LearnTokens::Client && b.token_announcements_listen.is_none() {
                return Err(bad(
                    at("learn_tokens"),
                    "learning from the backends needs balancer.token_announcements_listen (and its key file)".into(),
                ));
            }
            if s.join_steering == JoinSteering::Port
                && !s
                    .vips
                    .iter()
                    .filter_map(|v| parse_vip(v).ok())
                    .any(|v| v.proto == 6)
            {
                return Err(bad(
                    at("join_steering"),
                    "\"port\" needs a TCP VIP (MPTCP runs over TCP)".into(),
                ));
            }
            backends_total += s.backends.len();
        }
        // Join ports are VIPs too: none may be a service port or another backend's join
        // port on the same address, in any service.
        for (si, s) in self.services.iter().enumerate() {
            for (vip, bi) in s.join_vips() {
                let field = format!("service[{si}] ({}).backend[{bi}].join_port", s.name);
                let this = format!("the join port of backend {}", s.backends[bi].address);
                if let Some(other) = vips.insert(vip, this) {
                    let other = if self.services.iter().any(|s| s.name == other) {
                        format!("a port of service {other:?}")
                    } else {
                        other
                    };
                    return Err(bad(field, format!("{vip} is already {other}")));
                }
            }
        }
        // The VIP map holds every service port, every join port and one marker per
        // address: what does not fit there is refused here, not when the daemon applies it.
        let addrs: HashSet<IpAddr> = vips.keys().map(|v| v.addr).collect();
        let entries = vips.len() + addrs.len();
        if entries > lb_common::maps::MAX_VIPS as usize {
            return Err(bad(
                "service".into(),
                format!(
                    "{} VIPs and join ports on {} addresses need {entries} VIP map entries, at most {}",
                    vips.len(),
                    addrs.len(),
                    lb_common::maps::MAX_VIPS
                ),
            ));
        }
        if backends_total >= lb_common::maps::MAX_BACKENDS as usize {
            return Err(bad(
                "service".into(),
                format!(
                    "{backends_total} backends, at most {}",
                    lb_common::maps::MAX_BACKENDS - 1
                ),
            ));
        }
        Ok(())
    }
}

fn check_health(h: &HealthCheck) -> Result<(), (&'static str, String)> {
    if h.interval_ms < 10 {
        return Err((
            "interval_ms",
            format!("{} ms is too short (at least 10)", h.interval_ms),
        ));
    }
    if h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
        return Err((
            "timeout_ms",
            format!(
                "{} ms must be between 1 and interval_ms ({})",
                h.timeout_ms, h.interval_ms
            ),
        ));
    }
    if h.rise == 0 {
        return Err(("rise", "must be at least 1".into()));
    }
    if h.fall == 0 {
        return Err(("fall", "must be at least 1".into()));
    }
    if !h.http_path.starts_with('/')
        || h.http_path.len() > 1024
        || h.http_path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err((
            "http_path",
            format!(
                "{:?} is not a request path (it starts with '/', has no spaces or control characters, at most 1024 bytes)",
                h.http_path
            ),
        ));
    }
    if h.kind != HealthKind::Https
        && (h.tls_ca_file.is_some() || h.tls_server_name.is_some() || !h.tls_verify)
    {
        return Err((
            "kind",
            "tls_ca_file, tls_server_name and tls_verify apply to kind = \"https\" only".into(),
        ));
    }
    if matches!(h.kind, HealthKind::Http | HealthKind::Https)
        && !(100..=599).contains(&h.http_status)
    {
        return Err((
            "http_status",
            format!("{} is not an HTTP status", h.http_status),
        ));
    }
    Ok(())
}

impl HealthCheck {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[balancer]
interface = "eth0"
source_v4 = "10.0.0.1"
source_v6 = "fd00::1"
hash_seed = 7

[[service]]
name = "web"
vips = ["203.0.113.10:443/tcp", "[2001:db8::10]:443/tcp"]
health = { kind = "mptcp" }

  [[service.backend]]
  address = "10.0.1.11"

  [[service.backend]]
  address = "fd00:1::12"
  weight = 2
  drain = true
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("lb.toml", text, |i| i == "eth0")
    }

    /// The GOOD file with `from` replaced by `to`, which must change it.
    fn variant(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from:?}");
        GOOD.replacen(from, to, 1)
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn a_complete_file_parses_with_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.balancer.ring_size, 65537);
        assert_eq!(c.balancer.xdp_mode, XdpModeConfig::Auto);
        assert_eq!(c.balancer.unknown_join_policy, UnknownJoinPolicy::Drop);
        assert_eq!(c.services[0].backends[1].weight, 2);
        assert!(c.services[0].backends[1].drain);
        let h = c.services[0].health.as_ref().expect("health");
        assert_eq!(
            (h.kind, h.interval_ms, h.rise, h.fall),
            (HealthKind::Mptcp, 1000, 2, 3)
        );
        assert_eq!(
            parse_vip("[2001:db8::10]:443/tcp")
                .expect("vip")
                .to_string(),
            "[2001:db8::10]:443/tcp"
        );
    }

    #[test]
    fn every_refusal_names_the_file_the_field_and_the_reason() {
        let cases: &[(String, &str)] = &[
            (
                variant("hash_seed = 7", "hash_seed = 7\nbogus = 1"),
                "lb.toml:7:1: unknown field `bogus`",
            ),
            (
                variant(r#"interface = "eth0""#, r#"interface = "eth9""#),
                "lb.toml: balancer.interface: no interface named \"eth9\"",
            ),
            (
                variant(
                    r#"vips = ["203.0.113.10:443/tcp", "#,
                    r#"vips = ["203.0.113.10:443/tcp", "203.0.113.10:443/tcp", "#,
                ),
                "lb.toml: service[0] (web).vips[1]: duplicate VIP 203.0.113.10:443/tcp",
            ),
            (
                variant("weight = 2", "weight = 0"),
                "lb.toml: service[0] (web).backend[1].weight: 0 is out of range 1..=1000",
            ),
            (
                variant("weight = 2", "weight = 5000"),
                "backend[1].weight: 5000 is out of range",
            ),
            (
                variant("source_v6 = \"fd00::1\"\n", ""),
                "lb.toml: service[0] (web).backend[1].address: IPv6 backend fd00:1::12 but balancer.source_v6 is not set",
            ),
            (
                variant("source_v4 = \"10.0.0.1\"\n", ""),
                "backend[0].address: IPv4 backend 10.0.1.11 but balancer.source_v4 is not set",
            ),
            (
                variant("hash_seed = 7", "hash_seed = 7\nring_size = 65536"),
                "lb.toml: balancer.ring_size: 65536 is not prime",
            ),
            (
                variant("443/tcp\", \"[2001", "443/sctp\", \"[2001"),
                "vips[0]: protocol \"sctp\" is neither tcp nor udp",
            ),
            (
                variant("\"[2001:db8::10]:443/tcp\"", "\"2001:db8::10:443/tcp\""),
                "vips[1]: \"2001:db8::10:443/tcp\" is not ADDRESS:PORT/PROTO",
            ),
            (
                variant(r#"address = "fd00:1::12""#, r#"address = "10.0.1.11""#),
                "backend[1].address: duplicate backend 10.0.1.11",
            ),
            (
                variant(r#"kind = "mptcp""#, r#"kind = "icmp""#),
                "lb.toml:11:19: unknown variant `icmp`",
            ),
            (
                variant(r#"kind = "mptcp""#, r#"kind = "tcp", timeout_ms = 5000"#),
                "health.timeout_ms: 5000 ms must be between 1 and interval_ms (1000)",
            ),
            (
                variant("hash_seed = 7", "hash_seed = \"seven\""),
                "lb.toml:6:13: invalid type",
            ),
            (
                format!("{GOOD}\n[[service]]\nname = \"web\"\nvips = [\"198.51.100.1:80\"]\n"),
                "service[1] (web).name: duplicate service name \"web\"",
            ),
            (
                variant(
                    r#"name = "web""#,
                    r#"name = "checkout-frontend-europe-west-canary2""#,
                ),
                "service[0].name: \"checkout-frontend-europe-west-canary2\" is 37 bytes, more than the 32 a name may have",
            ),
            (
                variant(r#"name = "web""#, "name = \"we\\\"b\\n\""),
                "service[0].name: \"we\\\"b\\n\" contains '\"': names are letters, digits, '-', '_' and '.'",
            ),
            (
                variant("hash_seed = 7", "hash_seed = 7\nsource_vary_bits = 20"),
                "balancer.source_vary_bits: 20 is more than 16",
            ),
            (
                variant(r#"address = "10.0.1.11""#, r#"address = "10.0.1""#),
                "lb.toml:14:13: invalid IP address syntax",
            ),
            (
                variant(
                    r#"address = "10.0.1.11""#,
                    r#"address = "10.0.1.11"
  join_port = 20001"#,
                ),
                "service[0] (web).backend[0].join_port: set, but the service's join_steering is \"token\"",
            ),
            (
                variant(
                    r#"health = { kind = "mptcp" }"#,
                    r#"join_steering = "port""#,
                )
                .replace(
                    r#"address = "10.0.1.11""#,
                    r#"address = "10.0.1.11"
  join_port = 20001"#,
                ),
                "service[0] (web).backend[1].join_port: missing: every backend",
            ),
            (
                variant(
                    r#"health = { kind = "mptcp" }"#,
                    r#"join_steering = "port""#,
                )
                .replace(
                    r#"address = "10.0.1.11""#,
                    r#"address = "10.0.1.11"
  join_port = 20001"#,
                )
                .replace("drain = true", "join_port = 20001"),
                "service[0] (web).backend[1].join_port: 203.0.113.10:20001/tcp is already the join port of backend 10.0.1.11",
            ),
            (
                variant(
                    r#"health = { kind = "mptcp" }"#,
                    r#"join_steering = "port""#,
                )
                .replace(
                    r#"address = "10.0.1.11""#,
                    r#"address = "10.0.1.11"
  join_port = 443"#,
                )
                .replace("drain = true", "join_port = 20002"),
                "service[0] (web).backend[0].join_port: 203.0.113.10:443/tcp is already a port of service \"web\"",
            ),
            (
                variant(
                    r#"health = { kind = "mptcp" }"#,
                    r#"learn_tokens = "backend""#,
                ),
                "service[0] (web).learn_tokens: learning from the backends needs balancer.token_announcements_listen",
            ),
            (
                variant(
                    "hash_seed = 7",
                    "hash_seed = 7\ntoken_announcements_listen = \"0.0.0.0:7400\"",
                ),
                "balancer.token_announcements_key_file: missing",
            ),
        ];
        for (text, expected) in cases {
            let got = error(text);
            assert!(got.contains(expected), "expected {expected:?} in:\n{got}");
        }
        assert!(cases.len() >= 10);
    }

    #[test]
    fn join_ports_are_one_per_backend_on_every_tcp_vip() {
        let text = variant(
            r#"health = { kind = "mptcp" }"#,
            r#"join_steering = "port""#,
        )
        .replace(
            r#"address = "10.0.1.11""#,
            "address = \"10.0.1.11\"\n  join_port = 20001",
        )
        .replace("drain = true", "join_port = 20002");
        let c = parse(&text).expect("valid");
        assert_eq!(c.services[0].affinity, Affinity::None);
        let sticky = parse(&text.replace(
            "join_steering",
            "affinity = \"client_address\"\njoin_steering",
        ))
        .expect("valid");
        assert_eq!(sticky.services[0].affinity, Affinity::ClientAddress);
        let got: Vec<String> = c.services[0]
            .join_vips()
            .iter()
            .map(|(v, bi)| format!("{v} {bi}"))
            .collect();
        assert_eq!(
            got,
            [
                "203.0.113.10:20001/tcp 0",
                "203.0.113.10:20002/tcp 1",
                "[2001:db8::10]:20001/tcp 0",
                "[2001:db8::10]:20002/tcp 1"
            ]
        );
        assert!(
            parse(GOOD).expect("valid").services[0]
                .join_vips()
                .is_empty()
        );
    }

    #[test]
    fn the_documented_example_is_valid() {
        let text = include_str!("../../mptcp-lb.example.toml");
        let c = Config::parse("mptcp-lb.example.toml", text, |i| i == "eth0")
            .expect("the example parses");
        assert_eq!(c.services[0].backends.len(), 3);
        assert_eq!(c.balancer.hash_seed, 0x5eed);
    }

    #[test]
    fn unreadable_files_say_so() {
        let e = Config::load(Path::new("/nonexistent/lb.toml"), |_| true).expect_err("no file");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/lb.toml: cannot read:"),
            "{e}"
        );
    }
}

//! `mptcp-lb join-ports apply|undo|status`: the backend's side of port steering. The
//! backend sets the C bit in its SYN/ACKs (`net.mptcp.allow_join_initial_addr_port=0`:
//! clients must not join the VIP's service port) and announces each of its service's
//! TCP VIPs with its own join port (an MPTCP `signal` endpoint VIP port P: the kernel
//! listens there and sends ADD_ADDR VIP:P on every connection), so that every balancer
//! node sends its joins to it from the configuration alone.
//!
//! The endpoints are managed with iproute2 (`ip mptcp endpoint`), as an operator would;
//! the command touches only the endpoints it plans, and says what it changed.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::{
    config::{Config, JoinSteering},
    host::ip,
};

const ALLOW_JOIN_INITIAL: &str = "/proc/sys/net/mptcp/allow_join_initial_addr_port";
const TCP_TIMESTAMPS: &str = "/proc/sys/net/ipv4/tcp_timestamps";

/// What a backend must announce: VIP:join_port endpoints, one per TCP VIP address of
/// each service that steers its joins by port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub backend: IpAddr,
    pub endpoints: Vec<SocketAddr>,
}

impl Plan {
    /// The plan for the backend at `backend` in `cfg`; without `backend`, the configured
    /// backend among `local` (this host's addresses).
    pub fn from_config(
        cfg: &Config,
        backend: Option<IpAddr>,
        local: &[IpAddr],
    ) -> anyhow::Result<Plan> {
        let me = match backend {
            Some(a) => a,
            None => {
                let mine: Vec<IpAddr> = cfg
                    .services
                    .iter()
                    .filter(|s| s.join_steering == JoinSteering::Port)
                    .flat_map(|s| s.backends.iter().map(|b| b.address))
                    .filter(|a| local.contains(a))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                match mine.as_slice() {
                    [one] => *one,
                    [] => bail!(
                        "none of this host's addresses is a backend of a service with join_steering = \"port\": pass --backend ADDRESS"
                    ),
                    many => bail!(
                        "this host has several backend addresses ({}): pass --backend ADDRESS",
                        many.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            }
        };
        let mut endpoints = Vec::new();
        for s in &cfg.services {
            for (vip, bi) in s.join_vips() {
                if s.backends[bi].address == me {
                    let ep = SocketAddr::new(vip.addr, vip.port);
                    if !endpoints.contains(&ep) {
                        endpoints.push(ep);
                    }
                }
            }
        }
        if endpoints.is_empty() {
            bail!(
                "backend {me} has no join port in the configuration (a backend of a service with join_steering = \"port\" and its join_port)"
            );
        }
        Ok(Plan {
            backend: me,
            endpoints,
        })
    }

    /// True when one of the endpoints is IPv6: its ADD_ADDR (30 bytes with a port) does
    /// not fit beside TCP timestamps, and Linux drops it.
    pub fn has_ipv6(&self) -> bool {
        self.endpoints.iter().any(SocketAddr::is_ipv6)
    }
}

/// An MPTCP endpoint as `ip -j mptcp endpoint show` lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    #[serde(default)]
    pub port: Option<u16>,
    pub id: u32,
    #[serde(default)]
    pub signal: bool,
}

/// This host's MPTCP endpoints.
pub fn endpoints() -> anyhow::Result<Vec<Endpoint>> {
    let text = ip(&["-j", "mptcp", "endpoint", "show"])?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).context("reading `ip -j mptcp endpoint show`")
}

fn read_sysctl(path: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {path} (is MPTCP built into this kernel?)"))?
        .trim()
        .to_string())
}

fn write_sysctl(path: &str, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))
}

/// What is applied on this host, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// The C bit: clients may not join the initial address and port.
    pub c_bit: bool,
    pub present: Vec<SocketAddr>,
    pub missing: Vec<SocketAddr>,
    /// Ports announced on the plan's VIP addresses that the plan does not have (a join
    /// port changed in the file): clients would join a port nobody steers here.
    pub stale: Vec<(u32, SocketAddr)>,
    pub timestamps: bool,
}

impl State {
    pub fn read(plan: &Plan) -> anyhow::Result<State> {
        let eps = endpoints()?;
        let has = |ep: &SocketAddr| {
            eps.iter()
                .any(|e| e.signal && e.address == ep.ip() && e.port == Some(ep.port()))
        };
        let (present, missing) = plan.endpoints.iter().partition(|ep| has(ep));
        let stale = eps
            .iter()
            .filter_map(|e| {
                let ep = SocketAddr::new(e.address, e.port?);
                (e.signal
                    && plan.endpoints.iter().any(|p| p.ip() == e.address)
                    && !plan.endpoints.contains(&ep))
                .then_some((e.id, ep))
            })
            .collect();
        Ok(State {
            c_bit: read_sysctl(ALLOW_JOIN_INITIAL)? == "0",
            present,
            missing,
            stale,
            timestamps: read_sysctl(TCP_TIMESTAMPS)? != "0",
        })
    }

    pub fn complete(&self) -> bool {
        self.c_bit && self.missing.is_empty() && self.stale.is_empty()
    }

    /// Lines for the operator.
    pub fn report(&self, plan: &Plan) -> Vec<String> {
        let mut out = vec![format!(
            "backend {}: C bit {} (net.mptcp.allow_join_initial_addr_port={})",
            plan.backend,
            if self.c_bit { "set" } else { "NOT set" },
            if self.c_bit { 0 } else { 1 }
        )];
        for ep in &self.present {
            out.push(format!("announced {ep}"));
        }
        for ep in &self.missing {
            out.push(format!("NOT announced {ep}"));
        }
        for (_, ep) in &self.stale {
            out.push(format!(
                "announced but not in the file {ep} (apply withdraws it)"
            ));
        }
        if plan.has_ipv6() && self.timestamps {
            out.push(
                "IPv6 join ports: Linux drops their ADD_ADDR beside TCP timestamps (MPTcpExtAddAddrTxDrop); clients join the IPv4 join port instead when they have IPv4 (--no-timestamps turns timestamps off, see the README)".into(),
            );
        }
        out
    }
}

/// Sets the C bit and adds the missing endpoints (idempotent). With `no_timestamps`,
/// turns TCP timestamps off so that IPv6 announcements fit. Returns what it changed.
pub fn apply(plan: &Plan, no_timestamps: bool) -> anyhow::Result<Vec<String>> {
    let mut changed = Vec::new();
    let before = State::read(plan)?;
    for ep in &before.missing {
        ip(&[
            "mptcp",
            "endpoint",
            "add",
            &ep.ip().to_string(),
            "port",
            &ep.port().to_string(),
            "signal",
        ])
        .with_context(|| {
            format!(
                "announcing {ep} (is {} an address of this host, e.g. on lo?)",
                ep.ip()
            )
        })?;
        changed.push(format!("announced {ep}"));
    }
    // Ports the file no longer gives this backend: clients must not join them.
    for (id, ep) in &before.stale {
        ip(&["mptcp", "endpoint", "delete", "id", &id.to_string()])?;
        changed.push(format!("withdrew {ep} (not in the file)"));
    }
    // The C bit last: clients are sent away from the service port only once the join
    // ports are announced.
    if !before.c_bit {
        write_sysctl(ALLOW_JOIN_INITIAL, "0")?;
        changed.push("C bit set (net.mptcp.allow_join_initial_addr_port=0)".into());
    }
    if no_timestamps && before.timestamps {
        write_sysctl(TCP_TIMESTAMPS, "0")?;
        changed.push("TCP timestamps off (net.ipv4.tcp_timestamps=0)".into());
    }
    Ok(changed)
}

/// The addresses of `cfg`'s TCP VIPs: where a backend's join-port endpoints live.
pub fn vip_addresses(cfg: &Config) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = cfg
        .services
        .iter()
        .flat_map(|s| s.vips.iter())
        .filter_map(|v| crate::config::parse_vip(v).ok())
        .filter(|v| v.proto == 6)
        .map(|v| v.addr)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Clears the C bit first (clients may join the service port again), then withdraws
/// every announcement of a port on one of `vips` (also those of a file that no longer
/// lists join ports). Timestamps are left as they are. Returns what it changed.
pub fn undo(vips: &[IpAddr]) -> anyhow::Result<Vec<String>> {
    let mut changed = Vec::new();
    if read_sysctl(ALLOW_JOIN_INITIAL)? == "0" {
        write_sysctl(ALLOW_JOIN_INITIAL, "1")?;
        changed.push("C bit cleared (net.mptcp.allow_join_initial_addr_port=1)".into());
    }
    for e in endpoints()? {
        if let (true, Some(port)) = (e.signal && vips.contains(&e.address), e.port) {
            ip(&["mptcp", "endpoint", "delete", "id", &e.id.to_string()])?;
            changed.push(format!("withdrew {}", SocketAddr::new(e.address, port)));
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[balancer]
interface = "eth0"
source_v4 = "10.0.0.1"
source_v6 = "fd00::1"

[[service]]
name = "web"
vips = ["203.0.113.10:443/tcp", "[2001:db8::10]:443/tcp", "203.0.113.10:53/udp"]
join_steering = "port"
  [[service.backend]]
  address = "10.0.1.11"
  join_port = 20011
  [[service.backend]]
  address = "10.0.1.12"
  join_port = 20012

[[service]]
name = "plain"
vips = ["203.0.113.11:80/tcp"]
  [[service.backend]]
  address = "10.0.1.13"
"#;

    fn cfg() -> Config {
        Config::parse("lb.toml", FILE, |_| true).expect("valid")
    }

    #[test]
    fn a_backend_announces_its_port_on_every_tcp_vip_of_its_services() {
        let me: IpAddr = "10.0.1.12".parse().expect("ip");
        let plan =
            Plan::from_config(&cfg(), None, &[me, "127.0.0.1".parse().expect("ip")]).expect("plan");
        assert_eq!(plan.backend, me);
        let eps: Vec<String> = plan.endpoints.iter().map(ToString::to_string).collect();
        assert_eq!(eps, ["203.0.113.10:20012", "[2001:db8::10]:20012"]);
        assert!(plan.has_ipv6());
        assert_eq!(
            Plan::from_config(&cfg(), Some(me), &[]).expect("plan"),
            plan
        );
    }

    #[test]
    fn a_host_that_is_no_port_steered_backend_is_told_what_to_pass() {
        let e = Plan::from_config(&cfg(), None, &["10.0.1.13".parse().expect("ip")])
            .expect_err("not port-steered");
        assert!(e.to_string().contains("pass --backend ADDRESS"), "{e}");
        let e = Plan::from_config(&cfg(), Some("10.0.1.13".parse().expect("ip")), &[])
            .expect_err("no join port");
        assert!(
            e.to_string().contains("backend 10.0.1.13 has no join port"),
            "{e}"
        );
    }
}

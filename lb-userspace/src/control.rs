//! The daemon's control socket: one JSON request per line, one JSON answer per line.
//! Unix socket, mode 0600 in a root-only directory: only root may operate the balancer.
//!
//! The CLI side is synchronous (std), the daemon side runs on tokio.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::controller::AdminOp;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    Reload,
    Backend {
        action: AdminOp,
        service: String,
        address: IpAddr,
    },
    /// Drain (`drained: true`) or undrain this node: withdraw or announce its VIPs.
    Node {
        drained: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// What `status` answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub interface: String,
    /// `native` or `generic`, or `unchanged` when the program was swapped into an
    /// existing attachment.
    pub xdp_mode: String,
    /// Why that mode (what `xdp_mode` asked for, and what the host allowed).
    #[serde(default)]
    pub xdp_mode_reason: String,
    pub program_id: u32,
    pub pin_path: String,
    pub started_unix: u64,
    pub uptime_secs: u64,
    pub config_file: String,
    pub reloads: u64,
    pub reload_failures: u64,
    pub last_reload_unix: u64,
    pub last_reload_error: Option<String>,
    pub mptcp_aware: bool,
    /// `balancer.announce_route_table`, when the node announces its VIPs.
    #[serde(default)]
    pub announce_route_table: Option<u32>,
    /// VIP addresses announced now (routes in that table).
    #[serde(default)]
    pub announced: Vec<IpAddr>,
    /// The operator drained this node (`mptcp-lb node drain`).
    #[serde(default)]
    pub node_drained: bool,
    /// Times the announcer brought the table in line with what should be announced.
    #[serde(default)]
    pub announce_syncs: u64,
    /// Token announcements from the backends' agents, when this node receives them.
    #[serde(default)]
    pub token_announcements: Option<TokenAnnouncementStatus>,
    pub services: Vec<ServiceStatus>,
}

/// What this node did with the backends' token announcements.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TokenAnnouncementStatus {
    pub listen: String,
    pub datagrams: u64,
    /// Authentic, fresh datagrams from a configured backend.
    pub accepted: u64,
    /// Datagrams not believed, per reason (`announcement::Refusal::label`).
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Entries of accepted datagrams, per outcome (`controller::Announced::label`).
    pub entries: std::collections::BTreeMap<String, u64>,
    pub agents: Vec<AgentStatus>,
}

/// One backend's agent, as this node hears it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub backend: IpAddr,
    pub datagrams: u64,
    pub entries: u64,
    pub last_unix_ms: u64,
    /// Receive time minus the agent's send time, last datagram (clock offset included).
    pub last_lag_ms: i64,
    pub max_lag_ms: i64,
    /// The agent's run (changes when it restarts).
    pub boot: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub id: u32,
    pub vips: Vec<String>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub id: u32,
    pub weight: u32,
    /// active, draining, down or disabled.
    pub state: String,
    /// The health check kind, if one runs.
    pub health: Option<String>,
}

/// Sends one request to the daemon at `socket` and returns its data, or its error.
pub fn request(socket: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied on the control socket {}: the daemon is operated as root",
            socket.display()
        ),
        Err(e) => bail!(
            "no daemon answers on {} ({e}): is `mptcp-lb run` running, and is this the control_socket its configuration names (--socket)?",
            socket.display()
        ),
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .with_context(|| format!("writing to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .with_context(|| format!("reading the answer from {}", socket.display()))?;
    let resp: Response =
        serde_json::from_str(&answer).with_context(|| format!("the daemon answered {answer:?}"))?;
    if resp.ok {
        Ok(resp.data)
    } else {
        bail!(
            "{}",
            resp.error.unwrap_or_else(|| "the daemon refused".into())
        )
    }
}

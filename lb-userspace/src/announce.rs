//! VIP announcements for a fleet behind ECMP. The daemon keeps one route per VIP address
//! it wants announced (`VIP/32` or `VIP/128` on `lo`) in a kernel routing table of its
//! own (`balancer.announce_route_table`, tagged with protocol [`ROUTE_PROTO`]), and the
//! node's BGP speaker exports that table to the routers: BIRD's `kernel` protocol with
//! `learn` reads it (see the README for the configuration). The table is consulted by no
//! routing rule, so its routes change nothing on the node itself.
//!
//! A VIP address is announced while the dataplane is attached, the node is not drained
//! by the operator (`mptcp-lb node drain`), and one of its services has a backend that
//! takes new connections; otherwise it is withdrawn. `mptcp-lb detach` withdraws all.
//! A daemon that exits leaves its routes: the dataplane it leaves behind still forwards.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Context as _;
use serde::Deserialize;

use crate::host::ip;

/// The routing protocol number the daemon's routes carry (`ip route ... proto 91`),
/// so that its routes are told apart from anyone else's in the table.
pub const ROUTE_PROTO: u8 = 91;

#[derive(Deserialize)]
struct RouteRow {
    dst: String,
}

/// The VIP addresses announced now in `table`.
pub fn installed(table: u32) -> anyhow::Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    let table = table.to_string();
    let proto = ROUTE_PROTO.to_string();
    for family in ["-4", "-6"] {
        let text = match ip(&[
            "-j", family, "route", "show", "table", &table, "proto", &proto,
        ]) {
            Ok(t) => t,
            // The kernel creates a table with its first route.
            Err(e) if e.to_string().contains("table does not exist") => continue,
            Err(e) => return Err(e),
        };
        if text.trim().is_empty() {
            continue;
        }
        let rows: Vec<RouteRow> =
            serde_json::from_str(&text).context("reading `ip -j route show`")?;
        for r in rows {
            let addr = r.dst.split('/').next().unwrap_or_default();
            if let Ok(a) = addr.parse() {
                out.insert(a);
            }
        }
    }
    Ok(out)
}

/// Makes `table` hold exactly `wanted` (announce the missing, withdraw the rest).
/// Returns (announced, withdrawn).
pub fn sync(table: u32, wanted: &BTreeSet<IpAddr>) -> anyhow::Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    let have = installed(table)?;
    let table = table.to_string();
    let proto = ROUTE_PROTO.to_string();
    let route = |verb: &str, a: &IpAddr| {
        let (family, prefix) = if a.is_ipv4() {
            ("-4", format!("{a}/32"))
        } else {
            ("-6", format!("{a}/128"))
        };
        ip(&[
            family, "route", verb, &prefix, "dev", "lo", "table", &table, "proto", &proto,
        ])
        .map(|_| ())
    };
    let mut added = Vec::new();
    for a in wanted.difference(&have) {
        route("replace", a)?;
        added.push(*a);
    }
    let mut removed = Vec::new();
    for a in have.difference(wanted) {
        route("del", a)?;
        removed.push(*a);
    }
    Ok((added, removed))
}

/// Withdraws every announcement of this network namespace (any table), for `detach`.
/// Returns how many routes went.
pub fn withdraw_all() -> anyhow::Result<usize> {
    let proto = ROUTE_PROTO.to_string();
    let mut n = 0;
    for family in ["-4", "-6"] {
        let text = ip(&[
            "-j", family, "route", "show", "table", "all", "proto", &proto,
        ])?;
        if !text.trim().is_empty() {
            let rows: Vec<serde_json::Value> =
                serde_json::from_str(&text).context("reading `ip -j route show`")?;
            n += rows.len();
        }
        ip(&[family, "route", "flush", "table", "all", "proto", &proto])?;
    }
    Ok(n)
}

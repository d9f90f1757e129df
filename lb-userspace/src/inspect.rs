//! `mptcp-lb inspect ...`: reads the pinned maps directly (no daemon needed) and shows
//! them as people read them, or as JSON for scripts. The JSON field names are stable and
//! documented in the README.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context as _, bail};
use lb_common::{counters::Counter, maps::*};
use serde::Serialize;

use crate::{
    controller::{meta_name, state_name},
    dataplane::{Maps, total, words_addr},
    pins,
};

/// The balancer's maps, opened from their pins.
pub struct Pinned(Maps);

impl std::ops::Deref for Pinned {
    type Target = Maps;
    fn deref(&self) -> &Maps {
        &self.0
    }
}

impl Pinned {
    pub fn open(root: &Path) -> anyhow::Result<Pinned> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("reading the balancer's maps needs root (BPF object access)");
        }
        let dir = pins::layout_dir(root);
        if !dir.exists() {
            let others = pins::other_layouts(root);
            if !others.is_empty() {
                bail!(
                    "{} holds pins of another mptcp-lb layout ({}); this mptcp-lb reads v{LAYOUT_VERSION}: use the mptcp-lb that pinned them",
                    root.display(),
                    others.join(", ")
                );
            }
            if !pins::on_bpffs(root) {
                bail!(
                    "{} is not on a BPF filesystem here: `ip netns exec` remounts /sys and hides the host's bpffs; run the CLI with `nsenter --net=/run/netns/NAME` instead (or mount a bpffs at /sys/fs/bpf)",
                    root.display()
                );
            }
            bail!(
                "no pinned maps under {}: is the balancer running (mptcp-lb run), and is this its pin path (--pin-path, balancer.pin_path)?",
                dir.display()
            );
        }
        Ok(Pinned(Maps::from_pins(&dir)?))
    }

    /// Configured services: id → name.
    pub fn service_names(&self) -> anyhow::Result<BTreeMap<u32, String>> {
        let mut out = BTreeMap::new();
        for id in 0..MAX_SERVICES {
            let meta = self.service_meta.get(&id, 0)?;
            if meta.in_use != 0 {
                out.insert(id, meta_name(&meta));
            }
        }
        Ok(out)
    }

    /// Configured backends: id → (address, metadata).
    pub fn backend_list(&self) -> anyhow::Result<BTreeMap<u32, (IpAddr, BackendMeta)>> {
        let mut out = BTreeMap::new();
        for id in 1..MAX_BACKENDS {
            let b = self.backends.get(&id, 0)?;
            if b.flags == 0 {
                continue;
            }
            let meta = self.backend_meta.get(&id, 0)?;
            out.insert(id, (words_addr(b.addr, b.family), meta));
        }
        Ok(out)
    }

    /// Slots per backend id in service `sid`'s ring.
    pub fn ring_shares(&self, sid: u32) -> anyhow::Result<(u32, HashMap<u32, u32>)> {
        let ring = self.config.get(&0, 0)?.ring_size;
        let mut shares = HashMap::new();
        for slot in 0..ring {
            let id = self.maglev.get(&(sid * ring + slot), 0)?;
            *shares.entry(id).or_insert(0u32) += 1;
        }
        Ok((ring, shares))
    }
}

/// Parses a token as written by people and by `ss -M` (hex, with or without 0x).
pub fn parse_token(s: &str) -> anyhow::Result<u32> {
    let t = s.trim().trim_start_matches("0x").trim_start_matches("0X");
    if t.is_empty() || t.len() > 8 {
        bail!("malformed token {s:?}: a token is 1 to 8 hex digits, as `ss -M` prints it");
    }
    u32::from_str_radix(t, 16)
        .map_err(|_| anyhow::anyhow!("malformed token {s:?}: not hexadecimal"))
}

pub use crate::controller::monotonic_ns;

/// "3s", "4m12s", "2h05m", "3d4h".
pub fn human_age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// "812", "12.3k", "4.56M", "7.89G".
pub fn human_count(n: u64) -> String {
    match n {
        n if n < 1000 => n.to_string(),
        n if n < 1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        n if n < 1_000_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n => format!("{:.2}G", n as f64 / 1e9),
    }
}

/// "512 B", "1.5 KiB", "3.2 MiB", ...
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// An aligned text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn endpoint(words: [u32; 4], family: u8, port_be: u16) -> String {
    SocketAddr::new(words_addr(words, family), u16::from_be(port_be)).to_string()
}

fn proto_name(p: u8) -> &'static str {
    match p {
        6 => "tcp",
        17 => "udp",
        _ => "other",
    }
}

#[derive(Serialize)]
pub struct ServiceRow {
    pub id: u32,
    pub name: String,
    pub vips: Vec<String>,
    /// `join_steering = "port"`: each backend's join port, `ADDR:PORT -> BACKEND`.
    pub join_ports: Vec<String>,
    pub backends: BTreeMap<String, u32>,
    pub packets: u64,
    pub bytes: u64,
}

pub fn services(p: &Pinned) -> anyhow::Result<Vec<ServiceRow>> {
    let names = p.service_names()?;
    let backends = p.backend_list()?;
    let mut vips: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut joins: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for k in p.vips.keys() {
        let k = k?;
        if k.proto == 0 {
            continue;
        }
        let info = p.vips.get(&k, 0)?;
        if info.flags & lb_common::maps::VIP_JOIN_PORT != 0 {
            let id = info.join_backend();
            let to = backends
                .get(&id)
                .map_or(format!("id {id}"), |(addr, _)| addr.to_string());
            joins
                .entry(info.service)
                .or_default()
                .push(format!("{} -> {to}", endpoint(k.addr, k.family, k.port)));
            continue;
        }
        vips.entry(info.service).or_default().push(format!(
            "{}/{}",
            endpoint(k.addr, k.family, k.port),
            proto_name(k.proto)
        ));
    }
    let mut rows = Vec::new();
    for (id, name) in names {
        let mut counts: BTreeMap<String, u32> = ["active", "draining", "down", "disabled"]
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
        for (_, meta) in backends.values().filter(|(_, m)| m.service == id) {
            *counts.entry(state_name(meta.state).into()).or_default() += 1;
        }
        let t = total(&p.service_stats.get(&id, 0)?);
        let mut v = vips.remove(&id).unwrap_or_default();
        v.sort();
        let mut j = joins.remove(&id).unwrap_or_default();
        j.sort();
        rows.push(ServiceRow {
            id,
            name,
            vips: v,
            join_ports: j,
            backends: counts,
            packets: t.packets,
            bytes: t.bytes,
        });
    }
    Ok(rows)
}

pub fn services_text(rows: &[ServiceRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let b = &r.backends;
            vec![
                r.id.to_string(),
                r.name.clone(),
                r.vips.join(", "),
                format!(
                    "{} active, {} draining, {} down, {} disabled",
                    b["active"], b["draining"], b["down"], b["disabled"]
                ),
                human_count(r.packets),
                human_bytes(r.bytes),
            ]
        })
        .collect();
    table(
        &["ID", "SERVICE", "VIPS", "BACKENDS", "PACKETS", "BYTES"],
        &body,
    )
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub service: String,
    pub address: IpAddr,
    pub weight: u32,
    pub state: String,
    pub health_checked: bool,
    pub drained_by: Vec<String>,
    pub maglev_slots: u32,
    pub packets: u64,
    pub bytes: u64,
    pub state_since_unix: u64,
}

pub fn backends(
    p: &Pinned,
    service: Option<&str>,
    backend: Option<IpAddr>,
) -> anyhow::Result<Vec<BackendRow>> {
    let names = p.service_names()?;
    if let Some(s) = service
        && !names.values().any(|n| n == s)
    {
        bail!("no service named {s:?} (mptcp-lb inspect services lists them)");
    }
    let mut shares: HashMap<u32, HashMap<u32, u32>> = HashMap::new();
    let mut rows = Vec::new();
    for (id, (addr, meta)) in p.backend_list()? {
        let sname = names.get(&meta.service).cloned().unwrap_or_default();
        if service.is_some_and(|s| s != sname) || backend.is_some_and(|b| b != addr) {
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = shares.entry(meta.service) {
            e.insert(p.ring_shares(meta.service)?.1);
        }
        let mut drained_by = Vec::new();
        if meta.state & BMETA_DRAIN_CONFIG != 0 {
            drained_by.push("config".to_string());
        }
        if meta.state & BMETA_DRAIN_ADMIN != 0 {
            drained_by.push("operator".to_string());
        }
        let t = total(&p.backend_stats.get(&id, 0)?);
        rows.push(BackendRow {
            id,
            service: sname,
            address: addr,
            weight: meta.weight,
            state: state_name(meta.state).into(),
            health_checked: meta.state & BMETA_CHECKED != 0,
            drained_by,
            maglev_slots: shares[&meta.service].get(&id).copied().unwrap_or(0),
            packets: t.packets,
            bytes: t.bytes,
            state_since_unix: meta.changed_unix_ns / 1_000_000_000,
        });
    }
    if let Some(b) = backend
        && rows.is_empty()
    {
        bail!("no backend {b} (mptcp-lb inspect backends lists them)");
    }
    Ok(rows)
}

pub fn backends_text(rows: &[BackendRow]) -> String {
    let now = crate::controller::unix_ns() / 1_000_000_000;
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut state = r.state.clone();
            if !r.drained_by.is_empty() {
                state = format!("{state} ({})", r.drained_by.join("+"));
            }
            vec![
                r.id.to_string(),
                r.service.clone(),
                r.address.to_string(),
                r.weight.to_string(),
                state,
                human_age(now.saturating_sub(r.state_since_unix)),
                if r.health_checked { "yes" } else { "no" }.into(),
                r.maglev_slots.to_string(),
                human_count(r.packets),
                human_bytes(r.bytes),
            ]
        })
        .collect();
    table(
        &[
            "ID", "SERVICE", "BACKEND", "WEIGHT", "STATE", "FOR", "CHECKED", "SLOTS", "PACKETS",
            "BYTES",
        ],
        &body,
    )
}

#[derive(Serialize)]
pub struct MaglevRow {
    pub backend_id: u32,
    pub address: Option<IpAddr>,
    pub weight: u32,
    pub slots: u32,
    pub share_percent: f64,
    /// The share its weight asks for among backends in the table.
    pub expected_percent: f64,
}

pub fn maglev(p: &Pinned, service: &str) -> anyhow::Result<(u32, Vec<MaglevRow>)> {
    let names = p.service_names()?;
    let sid = names
        .iter()
        .find(|(_, n)| *n == service)
        .map(|(id, _)| *id)
        .with_context(|| {
            format!("no service named {service:?} (mptcp-lb inspect services lists them)")
        })?;
    let (ring, shares) = p.ring_shares(sid)?;
    let backends = p.backend_list()?;
    let total_weight: u32 = shares
        .keys()
        .filter_map(|id| backends.get(id).map(|(_, m)| m.weight))
        .sum();
    let mut rows: Vec<MaglevRow> = shares
        .iter()
        .map(|(&id, &slots)| {
            let b = backends.get(&id);
            let weight = b.map_or(0, |(_, m)| m.weight);
            MaglevRow {
                backend_id: id,
                address: b.map(|(a, _)| *a),
                weight,
                slots,
                share_percent: 100.0 * f64::from(slots) / f64::from(ring),
                expected_percent: if id == 0 || total_weight == 0 {
                    0.0
                } else {
                    100.0 * f64::from(weight) / f64::from(total_weight)
                },
            }
        })
        .collect();
    rows.sort_by_key(|r| r.backend_id);
    Ok((ring, rows))
}

pub fn maglev_text(ring: u32, rows: &[MaglevRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                if r.backend_id == 0 {
                    "(empty)".to_string()
                } else {
                    r.address.map_or("?".into(), |a| a.to_string())
                },
                r.backend_id.to_string(),
                r.weight.to_string(),
                r.slots.to_string(),
                format!("{:.2}%", r.share_percent),
                format!("{:.2}%", r.expected_percent),
            ]
        })
        .collect();
    format!(
        "ring of {ring} slots\n{}",
        table(
            &["BACKEND", "ID", "WEIGHT", "SLOTS", "SHARE", "WEIGHT SHARE"],
            &body
        )
    )
}

#[derive(Serialize, Clone)]
pub struct ConnRow {
    pub client: String,
    pub vip: String,
    pub proto: String,
    pub service: String,
    pub backend: Option<IpAddr>,
    pub backend_id: u32,
    /// Hex, as `ss -M` prints it; null when the flow has none.
    pub token: Option<String>,
    /// plain, mptcp (learning its token), mptcp-learned, mptcp-join.
    pub kind: String,
}

fn conn_kind(flags: u32, token: Option<u32>) -> &'static str {
    if flags & CONN_JOIN != 0 {
        "mptcp-join"
    } else if flags & CONN_MPTCP == 0 {
        "plain"
    } else if token.is_some() {
        "mptcp-learned"
    } else if flags & CONN_TOKEN_DONE != 0 {
        "mptcp-fallback"
    } else {
        "mptcp"
    }
}

pub struct Filter {
    pub service: Option<String>,
    pub backend: Option<IpAddr>,
    pub token: Option<u32>,
    pub limit: Option<usize>,
}

pub fn conns(p: &Pinned, f: &Filter) -> anyhow::Result<Vec<ConnRow>> {
    let names = p.service_names()?;
    let backends = p.backend_list()?;
    let mut rows = Vec::new();
    for entry in p.conns.iter() {
        let Ok((k, c)) = entry else { continue };
        let service = names.get(&c.service).cloned().unwrap_or_default();
        let backend = backends.get(&c.backend).map(|(a, _)| *a);
        if f.service.as_ref().is_some_and(|s| *s != service)
            || f.backend.is_some_and(|b| Some(b) != backend)
            || f.token.is_some_and(|t| Some(t) != c.known_token())
        {
            continue;
        }
        rows.push(ConnRow {
            client: endpoint(k.src, k.family, k.sport),
            vip: endpoint(k.dst, k.family, k.dport),
            proto: proto_name(k.proto).into(),
            service,
            backend,
            backend_id: c.backend,
            token: c.known_token().map(|t| format!("{t:08x}")),
            kind: conn_kind(c.flags, c.known_token()).into(),
        });
    }
    rows.sort_by(|a, b| (&a.token, &a.client).cmp(&(&b.token, &b.client)));
    if let Some(n) = f.limit {
        rows.truncate(n);
    }
    Ok(rows)
}

pub fn conns_text(rows: &[ConnRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.client.clone(),
                r.vip.clone(),
                r.proto.clone(),
                r.service.clone(),
                r.backend
                    .map_or(format!("(id {} gone)", r.backend_id), |a| a.to_string()),
                r.kind.clone(),
                r.token.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "CLIENT", "VIP", "PROTO", "SERVICE", "BACKEND", "KIND", "TOKEN",
        ],
        &body,
    )
}

#[derive(Serialize, Clone)]
pub struct TokenRow {
    pub token: String,
    pub service: String,
    pub backend: Option<IpAddr>,
    pub backend_id: u32,
    /// MPTCP version the token was derived for (0: SHA-1, 1: SHA-256).
    pub version: u32,
    /// Who told this node: "client" (learned from the handshake) or "backend" (announced
    /// by the backend's agent).
    pub origin: String,
    pub learned_unix: u64,
    pub last_seen_unix: u64,
    pub idle_secs: u64,
}

pub fn tokens(p: &Pinned, f: &Filter) -> anyhow::Result<Vec<TokenRow>> {
    let names = p.service_names()?;
    let backends = p.backend_list()?;
    let (mono, unix) = (monotonic_ns(), crate::controller::unix_ns());
    let to_unix = |ns: u64| unix.saturating_sub(mono.saturating_sub(ns)) / 1_000_000_000;
    let mut rows = Vec::new();
    for (t, e) in p.tokens.iter() {
        let service = names.get(&e.service).cloned().unwrap_or_default();
        let backend = backends.get(&e.backend).map(|(a, _)| *a);
        if f.service.as_ref().is_some_and(|s| *s != service)
            || f.backend.is_some_and(|b| Some(b) != backend)
            || f.token.is_some_and(|x| x != t)
        {
            continue;
        }
        rows.push(TokenRow {
            token: format!("{t:08x}"),
            service,
            backend,
            backend_id: e.backend,
            version: e.version,
            origin: if e.origin == lb_common::maps::TOKEN_FROM_BACKEND {
                "backend"
            } else {
                "client"
            }
            .into(),
            learned_unix: to_unix(e.learned_ns),
            last_seen_unix: to_unix(e.last_seen_ns),
            idle_secs: mono.saturating_sub(e.last_seen_ns) / 1_000_000_000,
        });
    }
    rows.sort_by(|a, b| a.token.cmp(&b.token));
    if let Some(n) = f.limit {
        rows.truncate(n);
    }
    Ok(rows)
}

pub fn tokens_text(rows: &[TokenRow]) -> String {
    let now = crate::controller::unix_ns() / 1_000_000_000;
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.token.clone(),
                r.service.clone(),
                r.backend
                    .map_or(format!("(id {} gone)", r.backend_id), |a| a.to_string()),
                format!("v{}", r.version),
                format!("{} ago", human_age(now.saturating_sub(r.learned_unix))),
                format!("{} ago", human_age(r.idle_secs)),
            ]
        })
        .collect();
    table(
        &[
            "TOKEN",
            "SERVICE",
            "BACKEND",
            "VERSION",
            "LEARNED",
            "LAST SEEN",
        ],
        &body,
    )
}

#[derive(Serialize)]
pub struct TokenDetail {
    #[serde(flatten)]
    pub token: TokenRow,
    /// The connection-table entries (subflows) that carry this token.
    pub subflows: Vec<ConnRow>,
}

pub fn token(p: &Pinned, token: u32) -> anyhow::Result<TokenDetail> {
    let f = Filter {
        service: None,
        backend: None,
        token: Some(token),
        limit: None,
    };
    let row = tokens(p, &f)?.pop().with_context(|| {
        format!("token {token:08x} is not in the token table (never learned, expired, or its backend left)")
    })?;
    Ok(TokenDetail {
        token: row,
        subflows: conns(p, &f)?,
    })
}

pub fn token_text(d: &TokenDetail) -> String {
    let t = &d.token;
    let mut out = format!(
        "token     {}\nservice   {}\nbackend   {}\nversion   v{} ({})\nlearned   {} ago\nlast seen {} ago\n\nsubflows\n",
        t.token,
        t.service,
        t.backend
            .map_or(format!("(id {} gone)", t.backend_id), |a| a.to_string()),
        t.version,
        if t.version == 0 { "SHA-1" } else { "SHA-256" },
        human_age((crate::controller::unix_ns() / 1_000_000_000).saturating_sub(t.learned_unix)),
        human_age(t.idle_secs),
    );
    out.push_str(&conns_text(&d.subflows));
    out
}

/// Global counters: label → total.
pub fn stats(p: &Pinned) -> anyhow::Result<Vec<(&'static str, u64)>> {
    Counter::ALL
        .iter()
        .map(|&c| Ok((c.label(), p.stats.get(&(c as u32), 0)?.iter().sum())))
        .collect()
}

pub fn stats_text(now: &[(&'static str, u64)], rates: Option<&[f64]>) -> String {
    let body: Vec<Vec<String>> = now
        .iter()
        .enumerate()
        .map(|(i, (label, v))| {
            let mut row = vec![label.to_string(), v.to_string()];
            if let Some(r) = rates {
                row.push(format!("{:.1}/s", r[i]));
            }
            row
        })
        .collect();
    if rates.is_some() {
        table(&["COUNTER", "TOTAL", "RATE"], &body)
    } else {
        table(&["COUNTER", "TOTAL"], &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_as_people_write_them() {
        assert_eq!(parse_token("7a3bc0de").expect("hex"), 0x7a3b_c0de);
        assert_eq!(parse_token("0x7A3BC0DE").expect("hex"), 0x7a3b_c0de);
        assert_eq!(parse_token("abc").expect("short"), 0xabc);
        for bad in ["", "0x", "123456789", "xyz", "12 34"] {
            let e = parse_token(bad).expect_err(bad).to_string();
            assert!(e.starts_with("malformed token"), "{e}");
        }
    }

    #[test]
    fn tables_align_and_units_read_naturally() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
        assert_eq!(human_age(59), "59s");
        assert_eq!(human_age(61), "1m01s");
        assert_eq!(human_age(7300), "2h01m");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_count(12_345), "12.3k");
    }
}

//! `mptcp-lb agent`: the backend side of token announcements. A tc egress program
//! (`token_egress`) reports each SYN/ACK with MP_CAPABLE leaving this backend through a
//! ring buffer; the agent derives the token (SHA-256 for version 1, SHA-1 for version 0)
//! and announces token -> this backend to every balancer node at once, one client round
//! trip before the client's third ACK or any join can arrive. Every `snapshot` interval
//! it lists this host's live MPTCP connections from the kernel and announces them all
//! (so a node that starts or restarts learns every live token within one interval, and
//! long idle connections keep theirs), and announces closed the tokens that are gone.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    maps::RingBuf,
    programs::{SchedClassifier, TcAttachType},
};
use lb_common::{
    maps::{FAMILY_V4, MAP_TOKEN_EVENTS, TokenEvent},
    mptcp::{token_v0, token_v1},
};
use tokio::{
    io::unix::AsyncFd,
    net::UdpSocket,
    signal::unix::{SignalKind, signal},
};

use crate::{
    announcement::{self, Announcement, Entry, Key, MAX_ENTRIES},
    loader, mptcp_diag,
};

pub struct Args {
    pub interface: String,
    pub backend: IpAddr,
    pub nodes: Vec<SocketAddr>,
    pub key_file: PathBuf,
    pub snapshot: Duration,
    /// New tokens a second announced at once; more wait for the next listing. 0: no
    /// limit.
    pub max_news_rate: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("mptcp-lb agent needs root (it loads and attaches a tc program)");
    }
    if args.nodes.is_empty() {
        bail!("--node: at least one balancer node to announce to");
    }
    let key = Key::load(&args.key_file).context("--key-file")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(args, key))
}

/// Sends announcements to every node.
struct Sender {
    key: Key,
    backend: IpAddr,
    boot: u64,
    seq: u64,
    nodes: Vec<SocketAddr>,
    v4: UdpSocket,
    v6: UdpSocket,
    datagrams: u64,
    entries: u64,
    errors: u64,
    /// SYN/ACK reports not announced at once (over `--max-news-rate`).
    over_rate: u64,
}

/// Tokens a second the agent announces as news (snapshots are not limited).
struct RateBudget {
    rate: u64,
    window: Instant,
    used: u64,
}

impl RateBudget {
    fn new(rate: u64) -> RateBudget {
        RateBudget {
            rate,
            window: Instant::now(),
            used: 0,
        }
    }

    fn take(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.used = 0;
        }
        self.used += 1;
        self.rate == 0 || self.used <= self.rate
    }
}

/// SYN/ACKs reported and not yet seen in a listing, at most.
const MAX_PENDING: usize = 1 << 18;

impl Sender {
    async fn send(&mut self, snapshot: bool, entries: &[Entry]) {
        // A listing with nothing in it still goes out: the nodes hear the agent is alive.
        let empty: &[&[Entry]] = &[&[]];
        let chunks: Vec<&[Entry]> = if entries.is_empty() && snapshot {
            empty.to_vec()
        } else {
            entries.chunks(MAX_ENTRIES).collect()
        };
        for chunk in chunks {
            self.seq += 1;
            let a = Announcement {
                backend: self.backend,
                boot: self.boot,
                seq: self.seq,
                sent_unix_ms: crate::controller::unix_ns() / 1_000_000,
                snapshot,
                entries: chunk.to_vec(),
            };
            let d = announcement::seal(&self.key, &a);
            for node in &self.nodes {
                let sock = if node.is_ipv4() { &self.v4 } else { &self.v6 };
                match sock.send_to(&d, node).await {
                    Ok(_) => self.datagrams += 1,
                    Err(e) => {
                        self.errors += 1;
                        tracing::warn!(%node, "sending an announcement: {e}");
                    }
                }
            }
            self.entries += chunk.len() as u64;
        }
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // The clock is unique enough to tell two runs of one agent apart.
        return crate::controller::unix_ns();
    }
    u64::from_ne_bytes(b)
}

async fn serve(args: Args, key: Key) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut ebpf = loader::open_for_backend()?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(loader::PROG_TOKEN_EGRESS)
        .context("token_egress program missing from the object")?
        .try_into()?;
    prog.load()
        .context("the verifier refused the token_egress program")?;
    let link = prog
        .attach(&args.interface, TcAttachType::Egress)
        .with_context(|| format!("attaching token_egress to {} (egress)", args.interface))?;
    let ring = RingBuf::try_from(
        ebpf.take_map(MAP_TOKEN_EVENTS)
            .with_context(|| format!("map {MAP_TOKEN_EVENTS} missing"))?,
    )?;
    // SAFETY: the ring buffer's descriptor stays open as long as the AsyncFd owns it.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
    let mut tx = Sender {
        key,
        backend: args.backend,
        boot: random_u64(),
        seq: 0,
        nodes: args.nodes.clone(),
        // From the backend's own address: the nodes believe a backend only from there.
        v4: UdpSocket::bind(match args.backend {
            IpAddr::V4(a) => SocketAddr::new(a.into(), 0),
            IpAddr::V6(_) => "0.0.0.0:0".parse().expect("address"),
        })
        .await
        .with_context(|| format!("binding to {}", args.backend))?,
        v6: UdpSocket::bind(match args.backend {
            IpAddr::V6(a) => SocketAddr::new(a.into(), 0),
            IpAddr::V4(_) => "[::]:0".parse().expect("address"),
        })
        .await
        .with_context(|| format!("binding to {}", args.backend))?,
        datagrams: 0,
        entries: 0,
        errors: 0,
        over_rate: 0,
    };
    tracing::info!(
        interface = %args.interface,
        backend = %args.backend,
        nodes = ?args.nodes,
        "announcing this backend's MPTCP tokens"
    );
    // Tokens reported by SYN/ACKs and not yet seen in a kernel listing (tokens are unique
    // per host): a handshake that never completes is announced closed after two
    // intervals. Bounded: a SYN flood makes the backend answer SYN/ACKs at its rate.
    let mut pending: HashMap<u32, (u8, SocketAddr, Instant)> = HashMap::new();
    // What the last listings showed, with how many listings in a row missed it since: a
    // connection is announced closed after two misses (a dump is not atomic, and one
    // can skip an entry while connections come and go).
    let mut listed: HashMap<u32, (u8, SocketAddr, u8)> = HashMap::new();
    let mut budget = RateBudget::new(args.max_news_rate);
    let mut tick = tokio::time::interval(args.snapshot);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let mut news = Vec::new();
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    if item.len() < std::mem::size_of::<TokenEvent>() {
                        continue;
                    }
                    let ev: TokenEvent = bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<TokenEvent>()]);
                    // Over the rate (a flood of MP_CAPABLE SYNs answered by this backend),
                    // news waits for the next listing, which has only real connections.
                    if pending.len() >= MAX_PENDING || !budget.take() {
                        tx.over_rate += 1;
                        continue;
                    }
                    let e = entry_of(&ev);
                    pending.insert(e.token, (e.version, e.vip, Instant::now()));
                    news.push(e);
                }
                guard.clear_ready();
                if !news.is_empty() {
                    let t = Instant::now();
                    tx.send(false, &news).await;
                    tracing::debug!(tokens = news.len(), us = t.elapsed().as_micros() as u64, "announced");
                }
            }
            _ = tick.tick() => {
                let conns = match tokio::task::spawn_blocking(mptcp_diag::connections).await? {
                    Ok(c) => c,
                    Err(e) => {
                        // Nothing is known to be closed; memory stays bounded.
                        tracing::warn!("listing this host's MPTCP connections: {e}");
                        pending.retain(|_, p| p.2.elapsed() < 2 * args.snapshot);
                        continue;
                    }
                };
                let mut current: HashMap<u32, (u8, SocketAddr, u8)> = HashMap::new();
                for c in conns {
                    let version = pending
                        .remove(&c.token)
                        .map(|p| p.0)
                        .or_else(|| listed.get(&c.token).map(|l| l.0))
                        .unwrap_or(1);
                    current.insert(c.token, (version, c.local, 0));
                }
                let mut entries: Vec<Entry> = current
                    .iter()
                    .map(|(&token, &(version, vip, _))| Entry { token, version, vip, live: true })
                    .collect();
                let mut closed = 0;
                for (token, (version, vip, misses)) in listed {
                    if current.contains_key(&token) {
                        continue;
                    }
                    if misses + 1 >= 2 {
                        entries.push(Entry { token, version, vip, live: false });
                        closed += 1;
                    } else {
                        current.insert(token, (version, vip, misses + 1));
                    }
                }
                pending.retain(|&token, &mut (version, vip, at)| {
                    if at.elapsed() < 2 * args.snapshot {
                        return true;
                    }
                    entries.push(Entry { token, version, vip, live: false });
                    closed += 1;
                    false
                });
                tracing::debug!(live = entries.len() - closed, closed, "snapshot");
                tx.send(true, &entries).await;
                listed = current;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(
        datagrams = tx.datagrams,
        entries = tx.entries,
        errors = tx.errors,
        over_rate = tx.over_rate,
        "agent stopping"
    );
    let prog: &mut SchedClassifier = ebpf
        .program_mut(loader::PROG_TOKEN_EGRESS)
        .expect("loaded above")
        .try_into()?;
    prog.detach(link)?;
    Ok(())
}

fn entry_of(ev: &TokenEvent) -> Entry {
    let ip = if ev.family == FAMILY_V4 {
        IpAddr::from(ev.addr[0].to_ne_bytes())
    } else {
        let mut b = [0u8; 16];
        for (i, w) in ev.addr.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(b)
    };
    let token = if ev.version == 0 {
        token_v0(ev.key)
    } else {
        token_v1(ev.key)
    };
    Entry {
        token,
        version: ev.version,
        vip: SocketAddr::new(ip, u16::from_be(ev.port)),
        live: true,
    }
}

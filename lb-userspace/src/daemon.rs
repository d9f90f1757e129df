//! `mptcp-lb run`: the controller daemon. Loads (or adopts) the pinned dataplane,
//! applies the configuration, runs the health checks, answers the control socket and
//! the metrics endpoint, reloads on SIGHUP, and exits on SIGTERM leaving the dataplane
//! forwarding.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, UnixListener},
    signal::unix::{SignalKind, signal},
    sync::Mutex,
    task::JoinHandle,
};

use crate::{
    config::{Config, HealthCheck, XdpModeConfig},
    control::{BackendStatus, Request, Response, ServiceStatus, Status},
    controller::{Controller, state_name, unix_ns},
    dataplane::{Dataplane, Sizes},
    health::{Failure, Hysteresis, probe},
    metrics,
};

/// True when this network namespace has an interface called `name`.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// A running health check: what it checks, and its task.
type RunningCheck = (HealthCheck, SocketAddr, JoinHandle<()>);

struct Shared {
    ctl: Mutex<Controller>,
    started_unix: u64,
    started: Instant,
    xdp_mode: String,
    xdp_mode_reason: String,
    program_id: u32,
    /// Running health checks: backend id → (what it checks, its task).
    checks: Mutex<HashMap<u32, RunningCheck>>,
    /// Wakes the announcer after a change that may change what to announce.
    announce: tokio::sync::Notify,
    /// VIP addresses announced now.
    announced: std::sync::Mutex<std::collections::BTreeSet<std::net::IpAddr>>,
    /// Completed announcement syncs.
    announce_syncs: std::sync::atomic::AtomicU64,
    /// The backends' token announcements, when received.
    tokens_in: std::sync::Mutex<Option<crate::control::TokenAnnouncementStatus>>,
}

pub fn run(config_path: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("mptcp-lb run needs root (it loads and attaches XDP programs)");
    }
    let config = Config::load(config_path, interface_exists)?;
    raise_open_file_limit();
    // SIGHUP, SIGTERM and SIGINT stay blocked (pending, not lost) in every thread until
    // the daemon is ready: without a handler they would kill it, and with one they would
    // interrupt the verifier, which then fails the program load with EAGAIN. The
    // runtime's worker threads inherit the mask and keep it; `serve` unblocks the thread
    // it runs on once ready, and that thread receives them from then on.
    set_start_up_signals(libc::SIG_BLOCK);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(config, config_path.to_path_buf()))
}

/// Raises the soft limit on open files to the hard one (systemd's default soft limit is
/// 1024): health probes, control and metrics connections each need a descriptor.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write or read only `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Blocks or unblocks (`how`) SIGHUP, SIGTERM and SIGINT for the calling thread.
fn set_start_up_signals(how: libc::c_int) {
    // SAFETY: a sigset built by sigemptyset/sigaddset, passed to pthread_sigmask for this
    // thread; no memory is shared.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

async fn serve(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    // Handlers first: a SIGHUP (`systemctl reload` right after a start) or SIGTERM during
    // the start-up below must not kill the daemon halfway; they wait, blocked, and are
    // acted on once it is ready.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let b = &config.balancer;
    // One daemon per dataplane: nothing is loaded, applied or attached without the lock.
    let _lock = crate::pins::lock(&b.pin_path)?;
    let sizes = Sizes {
        ring_size: b.ring_size,
        conn_entries: b.conn_table_size,
        conn6_entries: b.conn6_table_size,
        token_entries: b.token_table_size,
    };
    let (mut dp, adopted) = Dataplane::load_pinned(sizes, &b.pin_path)?;
    // The sweep's own handle on the token table, opened before anything is attached.
    let sweep = crate::token_table::TokenTable::from_pins(&crate::pins::layout_dir(&b.pin_path))
        .context("opening the pinned token table")?;
    if adopted {
        tracing::info!(pin_path = %b.pin_path.display(), "adopting the pinned maps: connection and token tables carry over");
    }
    // Rare kernel-side events (token collisions, limits reached, joins
    // for a backend out of service) come through aya-log into this daemon's log, at
    // debug level under the target `lb_ebpf`.
    match crate::kernel_log::forward(&mut dp) {
        Ok(()) => {}
        Err(e) => tracing::warn!("kernel-side events will not be logged: {e:#}"),
    }
    // Configure before attaching, so a fresh attach forwards from its first packet; an
    // adopted dataplane keeps forwarding with its old program meanwhile.
    let mut ctl = Controller::start(dp, config.clone(), config_path)?;
    let (mode, mut mode_reason) = match b.xdp_mode {
        XdpModeConfig::Auto => crate::host::auto_xdp_mode(&b.interface),
        XdpModeConfig::Native => (Some(XdpMode::Driver), "configured: native".to_string()),
        XdpModeConfig::Generic => (Some(XdpMode::Skb), "configured: generic".to_string()),
    };
    if b.source_v4.is_some() && crate::host::accept_own_source(&b.interface)? {
        tracing::info!(
            interface = %b.interface,
            "turned accept_local on: packets handed to the kernel before their next hop is resolved carry this host's own address as their source"
        );
    }
    let attached = ctl.dp.attach_pinned(&b.interface, mode)?;
    let xdp_mode = match attached {
        Some(XdpMode::Driver) => "native".to_string(),
        Some(_) => "generic".to_string(),
        None => "unchanged".to_string(),
    };
    match (mode, attached) {
        (None, Some(XdpMode::Skb)) => {
            mode_reason = "auto: the driver refused native XDP, so generic".into()
        }
        (_, None) => {
            mode_reason = "the running attachment was kept (its program replaced through the pinned link); `detach` and restart to change the mode".into()
        }
        _ => {}
    }
    let program_id = ctl.dp.program().info().map(|i| i.id()).unwrap_or(0);
    match attached {
        Some(_) => {
            tracing::info!(interface = %b.interface, mode = %xdp_mode, reason = %mode_reason, program_id, "attached")
        }
        None => {
            tracing::info!(interface = %b.interface, program_id, "program replaced through the pinned link, no forwarding gap")
        }
    }
    let shared = Arc::new(Shared {
        ctl: Mutex::new(ctl),
        started_unix: unix_ns() / 1_000_000_000,
        started: Instant::now(),
        xdp_mode,
        xdp_mode_reason: mode_reason,
        program_id,
        checks: Mutex::new(HashMap::new()),
        announce: tokio::sync::Notify::new(),
        announced: std::sync::Mutex::new(Default::default()),
        announce_syncs: std::sync::atomic::AtomicU64::new(0),
        tokens_in: std::sync::Mutex::new(None),
    });
    sync_checks(&shared).await;

    if let Some(table) = config.balancer.announce_route_table {
        tokio::spawn(announce_loop(shared.clone(), table));
    }
    if let Some(listen) = config.balancer.token_announcements_listen {
        let path = config
            .balancer
            .token_announcements_key_file
            .as_ref()
            .expect("validated: a key file comes with the listen address");
        let key = crate::announcement::Key::load(path)
            .context("balancer.token_announcements_key_file")?;
        let sock = announcement_socket(listen)
            .with_context(|| format!("balancer.token_announcements_listen: binding {listen}"))?;
        *shared.tokens_in.lock().expect("tokens_in") =
            Some(crate::control::TokenAnnouncementStatus {
                listen: listen.to_string(),
                ..Default::default()
            });
        tracing::info!(%listen, "receiving the backends' token announcements");
        tokio::spawn(token_announcements_loop(shared.clone(), sock, key));
    }
    let control = bind_control(&config.balancer.control_socket)?;
    tokio::spawn(control_loop(shared.clone(), control));
    tokio::spawn(token_sweep_loop(shared.clone(), sweep));
    if let Some(addr) = config.balancer.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("balancer.metrics_listen: binding {addr}"))?;
        let tables = Arc::new(metrics::TableCounter::open(&crate::pins::layout_dir(
            &b.pin_path,
        ))?);
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        let http = Arc::new(metrics::HttpStats::default());
        let (shared, stats) = (shared.clone(), http.clone());
        tokio::spawn(metrics::serve(l, http, move || {
            let (shared, tables, stats) = (shared.clone(), tables.clone(), stats.clone());
            async move {
                // The table walks run off the runtime's threads and without the
                // controller's lock: a slow scrape delays no health change.
                let counts = tokio::task::spawn_blocking(move || tables.count()).await?;
                let tokens_in = shared.tokens_in.lock().expect("tokens_in").clone();
                let ctl = shared.ctl.lock().await;
                metrics::render(&ctl, counts, &stats, tokens_in.as_ref())
            }
        }));
    }
    // Everything that needs root is done: keep what operating the maps (and, on a fleet
    // node, the announcement routes) needs, in every thread, for good.
    let mut keep = vec![crate::privileges::CAP_BPF];
    if config.balancer.announce_route_table.is_some() {
        keep.push(crate::privileges::CAP_NET_ADMIN);
    }
    match crate::privileges::drop_to(&keep) {
        Ok(()) => tracing::info!(
            kept = if keep.len() == 2 {
                "CAP_BPF CAP_NET_ADMIN"
            } else {
                "CAP_BPF"
            },
            "dropped every other capability"
        ),
        Err(e) => tracing::warn!("keeping root's capabilities: {e:#}"),
    }
    tracing::info!(control_socket = %config.balancer.control_socket.display(), "ready");
    sd_notify(&format!(
        "READY=1\nSTATUS=forwarding on {}, program id {program_id}",
        config.balancer.interface
    ));
    // Signals sent during the start-up are delivered now (this thread runs `serve`).
    set_start_up_signals(libc::SIG_UNBLOCK);

    loop {
        tokio::select! {
            _ = hup.recv() => {
                let _ = reload(&shared).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    sd_notify("STOPPING=1");
    let _ = std::fs::remove_file(&config.balancer.control_socket);
    tracing::info!(
        "exiting; the dataplane keeps forwarding through its pinned link (`mptcp-lb detach` removes it)"
    );
    Ok(())
}

/// Re-reads the configuration file and applies the difference; on any error the running
/// configuration stays in force.
async fn reload(shared: &Arc<Shared>) -> Result<String, String> {
    sd_notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    let result = reload_inner(shared).await;
    sd_notify("READY=1");
    result
}

/// CLOCK_MONOTONIC in microseconds, as systemd wants it beside RELOADING=1.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// The node's announcement socket, with room for bursts (a backend's listing of every
/// live connection, all backends at once after a node restarts): 8 MiB of receive
/// buffer, about 3,500 datagrams, where the default holds about 200.
fn announcement_socket(listen: std::net::SocketAddr) -> anyhow::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(listen), Type::DGRAM, None)?;
    // SO_RCVBUFFORCE (past net.core.rmem_max) needs CAP_NET_ADMIN, which the daemon has
    // while it starts; without it, what rmem_max allows.
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt on our socket with an int of the right size.
    let forced = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    } == 0;
    if !forced {
        s.set_recv_buffer_size(size as usize)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&listen.into())?;
    Ok(tokio::net::UdpSocket::from_std(s.into())?)
}

/// Receives the backends' token announcements and applies the authentic, fresh ones.
async fn token_announcements_loop(
    shared: Arc<Shared>,
    sock: tokio::net::UdpSocket,
    key: crate::announcement::Key,
) {
    use crate::announcement::{self, MAX_DATAGRAM, Refusal, ReplayGuard};
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut guard = ReplayGuard::default();
    let refuse = |r: Refusal| {
        if let Some(st) = shared.tokens_in.lock().expect("tokens_in").as_mut() {
            *st.refused.entry(r.label().to_string()).or_default() += 1;
        }
    };
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("receiving a token announcement: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if let Some(st) = shared.tokens_in.lock().expect("tokens_in").as_mut() {
            st.datagrams += 1;
        }
        let a = match announcement::open(&key, &buf[..n.min(MAX_DATAGRAM)]) {
            Ok(a) if n <= MAX_DATAGRAM => a,
            Ok(_) => {
                refuse(Refusal::Malformed);
                continue;
            }
            Err(r) => {
                refuse(r);
                continue;
            }
        };
        let now_ms = unix_ns() / 1_000_000;
        let t0 = Instant::now();
        let mut ctl = shared.ctl.lock().await;
        let locked = t0.elapsed().as_micros() as u64;
        if !ctl.backend_addresses().contains(&a.backend) {
            refuse(Refusal::UnknownBackend);
            continue;
        }
        // The key is the fleet's: a backend speaks for itself only, from its address.
        if from.ip().to_canonical() != a.backend {
            refuse(Refusal::WrongSource);
            continue;
        }
        if let Err(r) = guard.accept(&a, now_ms) {
            refuse(r);
            continue;
        }
        let outcomes: Vec<_> = a
            .entries
            .iter()
            .map(|e| ctl.apply_announced(a.backend, e))
            .collect();
        drop(ctl);
        tracing::debug!(
            locked_us = locked,
            applied_us = t0.elapsed().as_micros() as u64,
            "announcement applied"
        );
        let mut st = shared.tokens_in.lock().expect("tokens_in");
        let Some(st) = st.as_mut() else { continue };
        st.accepted += 1;
        for o in outcomes {
            *st.entries.entry(o.label().to_string()).or_default() += 1;
        }
        let lag = now_ms as i64 - a.sent_unix_ms as i64;
        let agent = match st.agents.iter_mut().position(|g| g.backend == a.backend) {
            Some(i) => &mut st.agents[i],
            None => {
                st.agents.push(crate::control::AgentStatus {
                    backend: a.backend,
                    datagrams: 0,
                    entries: 0,
                    last_unix_ms: 0,
                    last_lag_ms: 0,
                    max_lag_ms: i64::MIN,
                    boot: String::new(),
                });
                st.agents.last_mut().expect("pushed")
            }
        };
        agent.datagrams += 1;
        agent.entries += a.entries.len() as u64;
        agent.last_unix_ms = now_ms;
        agent.last_lag_ms = lag;
        agent.max_lag_ms = agent.max_lag_ms.max(lag);
        agent.boot = format!("{:016x}", a.boot);
    }
}

/// Tells the service manager what the daemon is doing (systemd's `Type=notify`: ready
/// once it forwards and answers, reloading, stopping), when `NOTIFY_SOCKET` names one.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "telling the service manager {state:?}");
    }
}

async fn reload_inner(shared: &Arc<Shared>) -> Result<String, String> {
    let result = {
        let mut ctl = shared.ctl.lock().await;
        let path = ctl.config_path.clone();
        let applied = Config::load(&path, interface_exists)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                ctl.check_reloadable(&new)
                    .map_err(|e| format!("{}: {e:#}", path.display()))?;
                ctl.apply(&new).map_err(|e| {
                    // Half applied: put the maps and the controller back to the
                    // configuration in force, so what the daemon says is what forwards.
                    let old = ctl.config.clone();
                    match ctl.apply(&old) {
                        Ok(_) => format!(
                            "applying: {e:#} (the running configuration was re-applied)"
                        ),
                        Err(e2) => format!(
                            "applying: {e:#}; re-applying the running configuration failed too: {e2:#}"
                        ),
                    }
                })
            });
        match applied {
            Ok(summary) => {
                ctl.reloads += 1;
                ctl.last_reload_unix = unix_ns() / 1_000_000_000;
                ctl.last_reload_error = None;
                tracing::info!(%summary, "configuration reloaded");
                Ok(summary.to_string())
            }
            Err(e) => {
                ctl.reload_failures += 1;
                ctl.last_reload_error = Some(e.clone());
                tracing::error!(error = %e, "reload refused; the running configuration stays in force");
                Err(e)
            }
        }
    };
    if result.is_ok() {
        sync_checks(shared).await;
        shared.announce.notify_one();
    }
    result
}

/// Starts, restarts or stops health-check tasks to match the controller's backends.
async fn sync_checks(shared: &Arc<Shared>) {
    let wanted: HashMap<u32, (HealthCheck, SocketAddr, bool)> = {
        let ctl = shared.ctl.lock().await;
        ctl.backends()
            .filter_map(|b| {
                let h = b.health.clone()?;
                let up = b.state & lb_common::maps::BMETA_DOWN == 0;
                Some((b.id, (h, SocketAddr::new(b.address, b.health_port), up)))
            })
            .collect()
    };
    let mut checks = shared.checks.lock().await;
    checks.retain(|id, (check, addr, task)| {
        let keep = wanted
            .get(id)
            .is_some_and(|(c, a, _)| c == check && a == addr);
        if !keep {
            task.abort();
        }
        keep
    });
    for (id, (check, addr, up)) in wanted {
        if checks.contains_key(&id) {
            continue;
        }
        let task = tokio::spawn(check_loop(shared.clone(), id, check.clone(), addr, up));
        checks.insert(id, (check, addr, task));
    }
}

async fn check_loop(shared: Arc<Shared>, id: u32, check: HealthCheck, addr: SocketAddr, up: bool) {
    let mut verdict = Hysteresis::new(up, check.rise, check.fall);
    let mut tick = tokio::time::interval(check.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ok = None;
    let mut unapplied: Option<bool> = None;
    loop {
        tick.tick().await;
        let result = match probe(&check, addr).await {
            // This host could not run the check (e.g. out of file descriptors): say so
            // and leave the backend's state as it is.
            Err(Failure::Local(e)) => {
                if last_ok != Some(None) {
                    tracing::warn!(%addr, kind = ?check.kind, error = %e, "health check could not run on this host; the backend keeps its state");
                }
                last_ok = Some(None);
                continue;
            }
            Err(Failure::Backend(e)) => Err(e),
            Ok(()) => Ok(()),
        };
        match &result {
            // The first failure of a run says why; the rest are debug noise.
            Err(e) if last_ok != Some(Some(false)) => {
                tracing::warn!(%addr, kind = ?check.kind, error = %e, "health check failed")
            }
            Err(e) => tracing::debug!(%addr, kind = ?check.kind, error = %e, "health check failed"),
            Ok(()) => {}
        }
        last_ok = Some(Some(result.is_ok()));
        if let Some(now_up) = verdict.record(result.is_ok()) {
            unapplied = Some(now_up);
        }
        // A verdict the maps did not take is applied again at every tick until they do.
        if let Some(now_up) = unapplied {
            let mut ctl = shared.ctl.lock().await;
            match ctl.set_health(id, now_up) {
                Ok(()) => unapplied = None,
                Err(e) => tracing::error!(
                    %addr,
                    error = %format!("{e:#}"),
                    "applying a health change; retrying at the next check"
                ),
            }
            shared.announce.notify_one();
        }
    }
}

fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        // Whoever may write in the directory may replace the socket with one of theirs.
        let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            bail!(
                "balancer.control_socket: {} is {} (mode {:o}, owner uid {}): the socket needs a directory of its own that only this user may write, e.g. /run/mptcp-lb",
                dir.display(),
                if meta.uid() != me {
                    "owned by another user"
                } else {
                    "writable by others"
                },
                meta.mode() & 0o7777,
                meta.uid()
            );
        }
    }
    // A socket file left by a daemon that was killed: nobody listens on it.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "balancer.control_socket: {} exists and is not a socket; not removing it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another daemon answers on {} (balancer.control_socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("balancer.control_socket: binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Longest control request, and how long a client may take to send it.
const MAX_REQUEST: u64 = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One request line from `r`: at most [`MAX_REQUEST`] bytes within [`REQUEST_TIMEOUT`].
async fn read_request(r: impl tokio::io::AsyncRead + Unpin) -> Result<String, String> {
    use futures_util::StreamExt as _;
    use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
    let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_REQUEST as usize));
    match tokio::time::timeout(REQUEST_TIMEOUT, lines.next()).await {
        Err(_) => Err(format!(
            "no request line within {} s",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(None) => Err("the connection closed before a request".into()),
        Ok(Some(Err(LinesCodecError::MaxLineLengthExceeded))) => Err(format!(
            "a request is one line of at most {MAX_REQUEST} bytes"
        )),
        Ok(Some(Err(e))) => Err(format!("reading the request: {e}")),
        Ok(Some(Ok(line))) => Ok(line),
    }
}

async fn control_loop(shared: Arc<Shared>, l: UnixListener) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let resp = match read_request(r).await {
                Err(e) => refused(e),
                Ok(line) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => answer(&shared, req).await,
                    Err(e) => refused(format!("bad request: {e}")),
                },
            };
            let mut out = serde_json::to_string(&resp).unwrap_or_default();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

fn ok(data: serde_json::Value) -> Response {
    Response {
        ok: true,
        error: None,
        data,
    }
}

fn refused(e: String) -> Response {
    Response {
        ok: false,
        error: Some(e),
        data: serde_json::Value::Null,
    }
}

async fn answer(shared: &Arc<Shared>, req: Request) -> Response {
    let changes = !matches!(req, Request::Status);
    let resp = answer_inner(shared, req).await;
    if changes {
        shared.announce.notify_one();
    }
    resp
}

async fn answer_inner(shared: &Arc<Shared>, req: Request) -> Response {
    match req {
        Request::Status => {
            let status = status(shared).await;
            ok(serde_json::to_value(status).unwrap_or_default())
        }
        Request::Reload => match reload(shared).await {
            Ok(summary) => ok(serde_json::Value::String(summary)),
            Err(e) => refused(e),
        },
        Request::Backend {
            action,
            service,
            address,
        } => {
            let r = shared.ctl.lock().await.admin(&service, address, action);
            match r {
                Ok(state) => ok(serde_json::Value::String(state)),
                Err(e) => refused(format!("{e:#}")),
            }
        }
        Request::Node { drained } => {
            let r = shared.ctl.lock().await.set_node_drained(drained);
            match r {
                Ok(()) => ok(serde_json::Value::Bool(drained)),
                Err(e) => refused(format!("{e:#}")),
            }
        }
    }
}

/// Clears the token table's idle slots every minute (their tokens route no join
/// already): the table's occupancy then counts live tokens, and no slot's stamp lives
/// long enough to wrap. A pass over the table's memory, off the runtime's threads and
/// without the controller's lock.
async fn token_sweep_loop(shared: Arc<Shared>, table: crate::token_table::TokenTable) {
    let table = Arc::new(table);
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let idle = shared.ctl.lock().await.config.balancer.token_idle_ns();
        let t = table.clone();
        if let Ok(n) = tokio::task::spawn_blocking(move || t.remove_idle(idle)).await
            && n > 0
        {
            tracing::debug!(slots = n, "cleared idle tokens from the token table");
        }
    }
}

/// Keeps the announcement table equal to what the controller says should be announced:
/// at once after a change (health, reload, operator), and every 10 s in case someone
/// else touched the table.
async fn announce_loop(shared: Arc<Shared>, table: u32) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shared.announce.notified() => {}
            _ = tick.tick() => {}
        }
        let wanted = shared.ctl.lock().await.announceable();
        let w = wanted.clone();
        match tokio::task::spawn_blocking(move || crate::announce::sync(table, &w)).await {
            Ok(Ok((added, removed))) => {
                for a in added {
                    tracing::info!(vip = %a, table, "announcing");
                }
                for a in removed {
                    tracing::warn!(vip = %a, table, "withdrawn");
                }
                *shared.announced.lock().expect("announced") = wanted;
                shared
                    .announce_syncs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                failing = false;
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::error!(error = %format!("{e:#}"), table, "announcing the VIPs");
                }
                failing = true;
                // What `status` shows is what the table holds, not what was wanted.
                if let Ok(Ok(now)) =
                    tokio::task::spawn_blocking(move || crate::announce::installed(table)).await
                {
                    *shared.announced.lock().expect("announced") = now;
                }
            }
            Err(_) => {}
        }
    }
}

async fn status(shared: &Arc<Shared>) -> Status {
    let ctl = shared.ctl.lock().await;
    let cfg = &ctl.config;
    let services = cfg
        .services
        .iter()
        .map(|s| {
            let backends = ctl
                .backends()
                .filter(|b| b.service == s.name)
                .map(|b| BackendStatus {
                    address: b.address,
                    id: b.id,
                    weight: b.weight,
                    state: state_name(b.state).to_string(),
                    health: b
                        .health
                        .as_ref()
                        .map(|h| format!("{:?}", h.kind).to_lowercase()),
                })
                .collect();
            ServiceStatus {
                name: s.name.clone(),
                id: ctl
                    .services()
                    .find(|(n, _)| **n == s.name)
                    .map_or(0, |(_, id)| *id),
                vips: s.vips.clone(),
                backends,
            }
        })
        .collect();
    Status {
        pid: std::process::id(),
        interface: cfg.balancer.interface.clone(),
        xdp_mode: shared.xdp_mode.clone(),
        xdp_mode_reason: shared.xdp_mode_reason.clone(),
        program_id: shared.program_id,
        pin_path: cfg.balancer.pin_path.display().to_string(),
        started_unix: shared.started_unix,
        uptime_secs: shared.started.elapsed().as_secs(),
        config_file: ctl.config_path.display().to_string(),
        reloads: ctl.reloads,
        reload_failures: ctl.reload_failures,
        last_reload_unix: ctl.last_reload_unix,
        last_reload_error: ctl.last_reload_error.clone(),
        mptcp_aware: cfg.balancer.mptcp_aware,
        announce_route_table: cfg.balancer.announce_route_table,
        announced: shared
            .announced
            .lock()
            .expect("announced")
            .iter()
            .copied()
            .collect(),
        node_drained: ctl.node_drained(),
        announce_syncs: shared
            .announce_syncs
            .load(std::sync::atomic::Ordering::Relaxed),
        token_announcements: shared.tokens_in.lock().expect("tokens_in").clone(),
        services,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn control_requests_are_one_bounded_line() {
        assert_eq!(
            read_request(&b"{\"op\":\"status\"}\n"[..]).await,
            Ok("{\"op\":\"status\"}".to_string())
        );
        let huge = vec![b'x'; 1 << 20];
        let e = read_request(&huge[..]).await.expect_err("too long");
        assert!(e.contains("at most 65536 bytes"), "{e}");
        // A client that sends nothing and keeps the connection open is given up on.
        let (_client, server) = tokio::io::duplex(64);
        tokio::time::pause();
        let e = read_request(server).await.expect_err("silent");
        assert!(e.contains("no request line within 5 s"), "{e}");
    }

    #[test]
    fn the_control_socket_needs_a_directory_of_its_own() {
        let base = std::env::temp_dir().join(format!("mlb-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        // Created by the daemon: mode 0700, and it binds.
        let fresh = base.join("fresh");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        bind_control(&fresh.join("c.sock")).expect("binds in a new directory");
        let mode = std::fs::metadata(&fresh).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // A directory anyone may write (like /tmp) is refused.
        let open = base.join("open");
        std::fs::create_dir_all(&open).expect("dir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let e = bind_control(&open.join("c.sock")).expect_err("world-writable");
        assert!(e.to_string().contains("writable by others"), "{e}");
        // A regular file where the socket goes is left alone.
        let file = fresh.join("not-a-socket");
        std::fs::write(&file, "data").expect("file");
        let e = bind_control(&file).expect_err("a file");
        assert!(
            e.to_string().contains("is not a socket; not removing it"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&file).expect("kept"), "data");
        // A stale socket (nobody listening) is replaced.
        let stale = fresh.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        bind_control(&stale).expect("a stale socket is replaced");
        let _ = std::fs::remove_dir_all(&base);
    }
}

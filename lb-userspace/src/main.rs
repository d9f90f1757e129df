//! `mptcp-lb`: the controller daemon and CLI.
use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    config::DEFAULT_CONTROL_SOCKET,
    control::{self, Request, Status},
    controller::AdminOp,
    decap, inspect, loader,
};

/// An XDP layer-4 load balancer that keeps every subflow of a Multipath TCP connection
/// on the same backend.
#[derive(Parser)]
#[command(name = "mptcp-lb", version, about)]
struct Cli {
    /// Root of the BPF filesystem where links and maps are pinned.
    #[arg(long, global = true, default_value = "/sys/fs/bpf")]
    bpffs: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller daemon: load (or adopt) the dataplane, apply the configuration,
    /// check backends, serve metrics and the control socket. SIGHUP reloads; SIGTERM
    /// exits and leaves the dataplane forwarding (`mptcp-lb detach` removes it).
    Run {
        #[arg(long)]
        config: std::path::PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Ask the running daemon to re-read its configuration file (as SIGHUP does) and say
    /// what changed, or why it refused.
    Reload {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Attached interface and mode, program id, uptime, configuration and last reload,
    /// backends per state (from the running daemon).
    Status {
        #[command(flatten)]
        socket: SocketArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Operate a backend through the running daemon.
    Backend {
        #[arg(value_enum)]
        action: BackendAction,
        /// Service name.
        service: String,
        /// Backend address.
        address: std::net::IpAddr,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// This node of a fleet: `drain` withdraws its VIPs from the routers (BGP, through
    /// `balancer.announce_route_table`) while its dataplane keeps forwarding what still
    /// arrives; `undrain` announces them again. Kept across restarts.
    Node {
        #[arg(value_enum)]
        action: NodeAction,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Change a service in the configuration file (comments and layout kept), validate
    /// the whole file, write it, and have the daemon reload it; a reload the daemon
    /// refuses puts the file back.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Look into the pinned maps (works while the daemon is down).
    Inspect {
        #[command(subcommand)]
        what: InspectWhat,
        /// The pin path of the configuration (`balancer.pin_path`).
        #[arg(long, global = true, default_value = "/sys/fs/bpf/mptcp-lb")]
        pin_path: std::path::PathBuf,
        /// Find the pin path in the daemon's configuration file instead.
        #[arg(long, global = true, conflicts_with = "pin_path")]
        config: Option<std::path::PathBuf>,
        /// JSON for scripts (field names documented in the README).
        #[arg(long, global = true)]
        json: bool,
    },
    /// Load the dataplane programs into the kernel (verifier check) without attaching;
    /// with --config, validate that configuration file instead.
    Check {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// With --config: validate the file alone, without checking it against this host
        /// (its interface), e.g. before copying it to the balancer.
        #[arg(long, requires = "config")]
        no_host_checks: bool,
    },
    /// Remove the balancer: unpin its link and maps (the program detaches, forwarding
    /// stops, connection and token tables are gone).
    Detach {
        /// The pin path of the configuration (`balancer.pin_path`).
        #[arg(long, default_value = "/sys/fs/bpf/mptcp-lb")]
        pin_path: std::path::PathBuf,
        /// Find the pin path in the daemon's configuration file instead.
        #[arg(long, conflicts_with = "pin_path")]
        config: Option<std::path::PathBuf>,
    },
    /// Backend side: announce this backend's MPTCP tokens to every balancer node (for
    /// services with `learn_tokens = "backend"` or `"both"`). A tc egress program on
    /// INTERFACE reports each SYN/ACK with MP_CAPABLE; every --snapshot-secs the live
    /// connections are listed from the kernel and announced again. Runs until SIGTERM.
    Agent {
        /// The interface the backend's replies leave by.
        #[arg(long)]
        interface: String,
        /// This backend's address, as the nodes' configuration lists it.
        #[arg(long)]
        backend: std::net::IpAddr,
        /// A node's `balancer.token_announcements_listen` (repeat for each node).
        #[arg(long = "node", required = true)]
        nodes: Vec<std::net::SocketAddr>,
        /// The key shared with the nodes (`balancer.token_announcements_key_file`).
        #[arg(long)]
        key_file: std::path::PathBuf,
        #[arg(long, default_value_t = 10)]
        snapshot_secs: u64,
        /// New tokens a second announced at once (each SYN/ACK with MP_CAPABLE, so a
        /// flood of SYNs too); more wait for the next listing, which holds only real
        /// connections. 0: no limit.
        #[arg(long, default_value_t = 10_000)]
        max_news_rate: u64,
    },
    /// Backend side: strip IPIP/IP6IP6 tunnels addressed to this host (for hosts
    /// without the ipip/ip6tnl drivers).
    Decap {
        #[command(subcommand)]
        action: DecapAction,
    },
    /// Backend side of `join_steering = "port"`: set the C bit (clients do not join the
    /// service port) and announce VIP:join_port on each TCP VIP (MPTCP signal
    /// endpoints), from the balancer's configuration file.
    JoinPorts {
        #[arg(value_enum)]
        action: JoinPortsAction,
        /// The balancer's configuration file (the same on every node and backend).
        #[arg(long)]
        config: std::path::PathBuf,
        /// This backend's address in the file (default: the one this host has).
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// With apply: turn TCP timestamps off so that IPv6 join ports can be announced
        /// (their ADD_ADDR does not fit beside timestamps). Costs PAWS and per-ACK RTT
        /// samples on every TCP connection of the host.
        #[arg(long)]
        no_timestamps: bool,
    },
}

#[derive(Subcommand)]
enum ServiceAction {
    /// Add a VIP (another port, another address) to SERVICE: `ADDRESS:PORT[/PROTO]`.
    AddVip {
        service: String,
        vip: String,
        /// The daemon's configuration file.
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Remove a VIP from SERVICE.
    RemoveVip {
        service: String,
        vip: String,
        #[arg(long)]
        config: std::path::PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum NodeAction {
    Drain,
    Undrain,
}

#[derive(Clone, Copy, ValueEnum)]
enum JoinPortsAction {
    /// Set the C bit and add the missing endpoints (idempotent).
    Apply,
    /// Clear the C bit, then withdraw every port announced on the file's VIP addresses.
    Undo,
    /// What is applied and what is missing; exit 1 when incomplete.
    Status,
}

#[derive(clap::Args)]
struct SocketArg {
    /// The daemon's control socket (`balancer.control_socket`).
    #[arg(long = "socket", default_value = DEFAULT_CONTROL_SOCKET)]
    path: std::path::PathBuf,
    /// Find the control socket in the daemon's configuration file instead.
    #[arg(long = "config", conflicts_with = "path")]
    config: Option<std::path::PathBuf>,
}

impl SocketArg {
    /// The socket: `--socket`, or the one `--config` names.
    fn socket(&self) -> anyhow::Result<std::path::PathBuf> {
        match &self.config {
            Some(c) => Ok(balancer_of(c)?.control_socket),
            None => Ok(self.path.clone()),
        }
    }
}

/// The `[balancer]` section of a configuration file (validated as a file, not against
/// this host).
fn balancer_of(path: &std::path::Path) -> anyhow::Result<lb_userspace::config::BalancerConfig> {
    Ok(lb_userspace::config::Config::load(path, |_| true)?.balancer)
}

/// `--pin-path`, or the pin path `--config` names.
fn pin_path_of(
    pin_path: std::path::PathBuf,
    config: Option<&std::path::Path>,
) -> anyhow::Result<std::path::PathBuf> {
    match config {
        Some(c) => Ok(balancer_of(c)?.pin_path),
        None => Ok(pin_path),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendAction {
    /// No new connections; established ones and their MPTCP joins still reach it.
    Drain,
    Undrain,
    /// Out of service as if its health check failed (its tokens are dropped).
    Disable,
    Enable,
}

#[derive(clap::Args)]
struct Filters {
    /// Only this service.
    #[arg(long)]
    service: Option<String>,
    /// Only this backend address.
    #[arg(long)]
    backend: Option<std::net::IpAddr>,
    /// Only this MPTCP token (hex, as `ss -M` prints it).
    #[arg(long)]
    token: Option<String>,
    /// At most N rows.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Subcommand)]
enum InspectWhat {
    /// Services: VIPs, backends by state, traffic.
    Services,
    /// Backends: service, weight, state and since when, Maglev slots, traffic.
    Backends {
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
    },
    /// A service's Maglev table: each backend's share of slots.
    Maglev { service: String },
    /// The connection table: client, VIP, backend, MPTCP token.
    Conns {
        #[command(flatten)]
        filters: Filters,
    },
    /// Learned MPTCP tokens: backend, when learned, when last seen.
    Tokens {
        #[command(flatten)]
        filters: Filters,
    },
    /// One token: its backend, service, times, and the subflows carrying it.
    Token { token: String },
    /// Dataplane counters; with --watch, rates every second.
    Stats {
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Subcommand)]
enum DecapAction {
    /// Attach the decapsulation program to IFACE; it stays attached after exit.
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
    },
    /// Detach it again.
    Detach {
        #[arg(long)]
        iface: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

impl Mode {
    fn xdp(self) -> Option<XdpMode> {
        match self {
            Mode::Auto => None,
            Mode::Native => Some(XdpMode::Driver),
            Mode::Generic => Some(XdpMode::Skb),
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter);
    match cli.command {
        Command::Run {
            log_format: LogFormat::Json,
            ..
        } => builder.json().init(),
        _ => builder.init(),
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and what was being done, without a backtrace.
            eprintln!("mptcp-lb: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, .. } => lb_userspace::daemon::run(&config)?,
        Command::Agent {
            interface,
            backend,
            nodes,
            key_file,
            snapshot_secs,
            max_news_rate,
        } => lb_userspace::agent::run(lb_userspace::agent::Args {
            interface,
            backend,
            nodes,
            key_file,
            snapshot: std::time::Duration::from_secs(snapshot_secs.max(1)),
            max_news_rate,
        })?,
        Command::Reload { socket } => {
            let summary = control::request(&socket.socket()?, &Request::Reload)?;
            println!("reloaded: {}", summary.as_str().unwrap_or_default());
        }
        Command::Status { socket, json } => {
            let v = control::request(&socket.socket()?, &Request::Status)?;
            if json {
                print_json(&v)?;
            } else {
                let s: Status = serde_json::from_value(v)?;
                print!("{}", status_text(&s));
            }
        }
        Command::Backend {
            action,
            service,
            address,
            socket,
        } => {
            let action = match action {
                BackendAction::Drain => AdminOp::Drain,
                BackendAction::Undrain => AdminOp::Undrain,
                BackendAction::Disable => AdminOp::Disable,
                BackendAction::Enable => AdminOp::Enable,
            };
            let state = control::request(
                &socket.socket()?,
                &Request::Backend {
                    action,
                    service: service.clone(),
                    address,
                },
            )?;
            println!(
                "{service} {address}: {}",
                state.as_str().unwrap_or_default()
            );
        }
        Command::Node { action, socket } => {
            let drained = matches!(action, NodeAction::Drain);
            control::request(&socket.socket()?, &Request::Node { drained })?;
            println!(
                "node {}",
                if drained {
                    "drained: its VIPs are withdrawn (established flows that still arrive are forwarded)"
                } else {
                    "undrained: its VIPs are announced where their services have a usable backend"
                }
            );
        }
        Command::Service { action } => {
            type Edit = fn(&str, &str, &str) -> anyhow::Result<String>;
            let (service, vip, config, edit, what): (_, _, _, Edit, _) = match &action {
                ServiceAction::AddVip {
                    service,
                    vip,
                    config,
                } => (service, vip, config, lb_userspace::edit::add_vip, "added"),
                ServiceAction::RemoveVip {
                    service,
                    vip,
                    config,
                } => (
                    service,
                    vip,
                    config,
                    lb_userspace::edit::remove_vip,
                    "removed",
                ),
            };
            let old = std::fs::read_to_string(config)
                .with_context(|| format!("reading {}", config.display()))?;
            let new = edit(&old, service, vip)?;
            // The whole new file is checked as the daemon will check it, before it is
            // written.
            let parsed = lb_userspace::config::Config::parse(
                &config.display().to_string(),
                &new,
                lb_userspace::daemon::interface_exists,
            )?;
            lb_userspace::edit::write_file(config, &new)?;
            match control::request(&parsed.balancer.control_socket, &Request::Reload) {
                Ok(summary) => println!(
                    "{what}; {} rewritten and reloaded: {}",
                    config.display(),
                    summary.as_str().unwrap_or_default()
                ),
                Err(e) => {
                    lb_userspace::edit::write_file(config, &old)?;
                    anyhow::bail!(
                        "the daemon did not apply it ({e:#}); {} is back as it was",
                        config.display()
                    );
                }
            }
        }
        Command::Inspect {
            what,
            pin_path,
            config,
            json,
        } => inspect_cmd(what, &pin_path_of(pin_path, config.as_deref())?, json)?,
        Command::Check {
            config: Some(path),
            no_host_checks,
        } => {
            let c = if no_host_checks {
                lb_userspace::config::Config::load(&path, |_| true)?
            } else {
                lb_userspace::config::Config::load(&path, lb_userspace::daemon::interface_exists)
                    .map_err(|e| match e {
                        lb_userspace::config::ConfigError::Invalid { ref field, .. }
                            if field == "balancer.interface" =>
                        {
                            anyhow::anyhow!(
                                "{e} (checked against this host's network namespace: run the check \
                                 where the balancer runs, e.g. `nsenter --net=/run/netns/NAME`, or \
                                 add --no-host-checks to validate the file alone)"
                            )
                        }
                        e => e.into(),
                    })?
            };
            let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
            println!(
                "{}: valid ({} services, {backends} backends){}",
                path.display(),
                c.services.len(),
                if no_host_checks {
                    "; not checked against this host"
                } else {
                    ""
                }
            );
        }
        Command::Check { config: None, .. } => {
            let mut ebpf = loader::open()?;
            for name in [loader::PROG_BALANCER, loader::PROG_DECAP, loader::PROG_PASS] {
                let prog: &mut aya::programs::Xdp = ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name} missing from the object"))?
                    .try_into()?;
                prog.load()
                    .with_context(|| format!("the verifier refused {name}"))?;
                println!("{name}: loaded, verifier accepted it");
            }
        }
        Command::Detach { pin_path, config } => {
            let pin_path = pin_path_of(pin_path, config.as_deref())?;
            // A running daemon holds the link: unpinning it would not detach anything.
            // (A pin path that does not exist has nothing to lock, nor to detach.)
            let _lock = if !pin_path.exists() {
                None
            } else {
                Some(lb_userspace::pins::lock(&pin_path).map_err(|e| match e {
                lb_userspace::pins::LockError::Held { root } => anyhow::anyhow!(
                    "a running mptcp-lb daemon holds {root}; stop it first (SIGTERM leaves the dataplane forwarding), then detach"
                ),
                    e => e.into(),
                })?)
            };
            let removed = lb_userspace::pins::remove(&pin_path)
                .with_context(|| format!("removing pins under {}", pin_path.display()))?;
            if !removed {
                anyhow::bail!(
                    "nothing pinned under {} (which pin path does the configuration use?)",
                    lb_userspace::pins::layout_dir(&pin_path).display()
                );
            }
            println!("detached: pins under {} removed", pin_path.display());
            // What this namespace announced goes with the dataplane.
            match lb_userspace::announce::withdraw_all() {
                Ok(0) => {}
                Ok(n) => println!("withdrew {n} VIP announcements"),
                Err(e) => eprintln!("withdrawing the VIP announcements: {e:#}"),
            }
        }
        Command::Decap {
            action: DecapAction::Attach { iface, mode },
        } => {
            let got = decap::attach(&cli.bpffs, &iface, mode.xdp())?;
            println!("decapsulation attached to {iface} ({got:?} mode)");
        }
        Command::Decap {
            action: DecapAction::Detach { iface },
        } => {
            decap::detach(&cli.bpffs, &iface)?;
            println!("decapsulation detached from {iface}");
        }
        Command::JoinPorts {
            action,
            config,
            backend,
            no_timestamps,
        } => {
            use lb_userspace::join_ports::{self, Plan, State};
            // The file is the balancer's: its interface is not this host's.
            let cfg = lb_userspace::config::Config::load(&config, |_| true)?;
            if let JoinPortsAction::Undo = action {
                let changed = join_ports::undo(&join_ports::vip_addresses(&cfg))?;
                if changed.is_empty() {
                    println!("nothing to change");
                }
                for line in changed {
                    println!("{line}");
                }
                return Ok(());
            }
            let plan = Plan::from_config(&cfg, backend, &decap::local_addresses()?)?;
            let changed = match action {
                JoinPortsAction::Apply => join_ports::apply(&plan, no_timestamps)?,
                JoinPortsAction::Undo => unreachable!("handled above"),
                JoinPortsAction::Status => {
                    let state = State::read(&plan)?;
                    for line in state.report(&plan) {
                        println!("{line}");
                    }
                    if !state.complete() {
                        anyhow::bail!(
                            "join ports incomplete on this backend: run `mptcp-lb join-ports apply --config {}`",
                            config.display()
                        );
                    }
                    return Ok(());
                }
            };
            if changed.is_empty() {
                println!("backend {}: nothing to change", plan.backend);
            }
            for line in changed {
                println!("backend {}: {line}", plan.backend);
            }
        }
    }
    Ok(())
}

fn status_text(s: &Status) -> String {
    use lb_userspace::inspect::{human_age, table};
    let mut out = format!(
        "daemon      pid {}, up {}\ninterface   {} (XDP {}: {}), program id {}\npins        {}\nconfig      {}, last applied {} ago ({} reloads, {} refused)\nmptcp       {}\n",
        s.pid,
        human_age(s.uptime_secs),
        s.interface,
        s.xdp_mode,
        s.xdp_mode_reason,
        s.program_id,
        s.pin_path,
        s.config_file,
        human_age(
            (lb_userspace::controller::unix_ns() / 1_000_000_000)
                .saturating_sub(s.last_reload_unix)
        ),
        s.reloads,
        s.reload_failures,
        if s.mptcp_aware {
            "aware (joins follow their token)"
        } else {
            "awareness OFF"
        },
    );
    if let Some(e) = &s.last_reload_error {
        out.push_str(&format!("last reload refused: {e}\n"));
    }
    if let Some(t) = s.announce_route_table {
        let vips: Vec<String> = s.announced.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "announce    table {t}{}: {}\n",
            if s.node_drained { ", node DRAINED" } else { "" },
            if vips.is_empty() {
                "nothing".to_string()
            } else {
                vips.join(", ")
            }
        ));
    } else if s.node_drained {
        out.push_str("announce    node drained (no announce_route_table configured)\n");
    }
    if let Some(t) = &s.token_announcements {
        let refused: u64 = t.refused.values().sum();
        out.push_str(&format!(
            "tokens in   {}: {} datagrams, {} accepted, {refused} refused{}\n",
            t.listen,
            t.datagrams,
            t.accepted,
            if t.refused.is_empty() {
                String::new()
            } else {
                format!(" ({:?})", t.refused)
            }
        ));
        let now = lb_userspace::controller::unix_ns() / 1_000_000;
        for g in &t.agents {
            out.push_str(&format!(
                "            agent {}: {} datagrams, {} tokens, last {} ms ago, lag {} ms (max {})\n",
                g.backend,
                g.datagrams,
                g.entries,
                now.saturating_sub(g.last_unix_ms),
                g.last_lag_ms,
                g.max_lag_ms
            ));
        }
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = s
        .services
        .iter()
        .map(|svc| {
            let count = |st: &str| svc.backends.iter().filter(|b| b.state == st).count();
            vec![
                svc.name.clone(),
                svc.vips.join(", "),
                count("active").to_string(),
                count("draining").to_string(),
                count("down").to_string(),
                count("disabled").to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["SERVICE", "VIPS", "ACTIVE", "DRAINING", "DOWN", "DISABLED"],
        &rows,
    ));
    out
}

fn inspect_cmd(what: InspectWhat, pin_path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let p = inspect::Pinned::open(pin_path)?;
    let filter = |f: Filters| -> anyhow::Result<inspect::Filter> {
        Ok(inspect::Filter {
            service: f.service,
            backend: f.backend,
            token: f.token.as_deref().map(inspect::parse_token).transpose()?,
            limit: f.limit,
        })
    };
    match what {
        InspectWhat::Services => {
            let rows = inspect::services(&p)?;
            if json {
                print_json(&rows)?
            } else {
                print!("{}", inspect::services_text(&rows))
            }
        }
        InspectWhat::Backends { service, backend } => {
            let rows = inspect::backends(&p, service.as_deref(), backend)?;
            if json {
                print_json(&rows)?
            } else {
                print!("{}", inspect::backends_text(&rows))
            }
        }
        InspectWhat::Maglev { service } => {
            let (ring, rows) = inspect::maglev(&p, &service)?;
            if json {
                print_json(&serde_json::json!({ "ring_size": ring, "backends": rows }))?
            } else {
                print!("{}", inspect::maglev_text(ring, &rows))
            }
        }
        InspectWhat::Conns { filters } => {
            let rows = inspect::conns(&p, &filter(filters)?)?;
            if json {
                print_json(&rows)?
            } else {
                print!("{}", inspect::conns_text(&rows))
            }
        }
        InspectWhat::Tokens { filters } => {
            let rows = inspect::tokens(&p, &filter(filters)?)?;
            if json {
                print_json(&rows)?
            } else {
                print!("{}", inspect::tokens_text(&rows))
            }
        }
        InspectWhat::Token { token } => {
            let d = inspect::token(&p, inspect::parse_token(&token)?)?;
            if json {
                print_json(&d)?
            } else {
                print!("{}", inspect::token_text(&d))
            }
        }
        InspectWhat::Stats { watch } => {
            let mut last = inspect::stats(&p)?;
            if !watch {
                if json {
                    let m: std::collections::BTreeMap<_, _> = last.into_iter().collect();
                    print_json(&m)?
                } else {
                    print!("{}", inspect::stats_text(&last, None))
                }
                return Ok(());
            }
            let mut at = std::time::Instant::now();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                let now = inspect::stats(&p)?;
                let dt = at.elapsed().as_secs_f64();
                at = std::time::Instant::now();
                let rates: Vec<f64> = now
                    .iter()
                    .zip(&last)
                    .map(|((_, n), (_, l))| n.saturating_sub(*l) as f64 / dt)
                    .collect();
                if json {
                    let m: std::collections::BTreeMap<_, _> = now
                        .iter()
                        .zip(&rates)
                        .map(|((k, v), r)| (*k, serde_json::json!({"total": v, "per_sec": r})))
                        .collect();
                    println!("{}", serde_json::to_string(&m)?);
                } else {
                    // Clear the screen and redraw.
                    print!("\x1b[2J\x1b[H{}", inspect::stats_text(&now, Some(&rates)));
                }
                last = now;
            }
        }
    }
    Ok(())
}

//! `cargo xtask deploy|undeploy`: put mptcp-lb on a host (or into a network namespace)
//! and keep it running, and upgrade it in place through the pinned link.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

#[derive(clap::Args)]
pub struct DeployArgs {
    /// Interface the XDP program attaches to (overrides `balancer.interface`).
    #[arg(long)]
    pub iface: String,
    /// The configuration file (installed as `<prefix>/etc/mptcp-lb/<instance>.toml`).
    #[arg(long)]
    pub config: PathBuf,
    /// XDP mode (overrides `balancer.xdp_mode`).
    #[arg(long, value_parser = ["auto", "native", "generic"])]
    pub mode: Option<String>,
    /// Installation prefix: `<prefix>/bin/mptcp-lb`, `<prefix>/etc/mptcp-lb/`,
    /// `<prefix>/var/log/mptcp-lb/`, `<prefix>/var/run/mptcp-lb/`.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Deploy into this network namespace (`ip netns`); the instance is named after it.
    #[arg(long)]
    pub netns: Option<String>,
    /// Remote host (ssh target): print the commands that deploy there (a dry run).
    #[arg(long)]
    pub host: Option<String>,
    /// Install this binary instead of building a release one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// A node of a fleet: announce its VIPs by BGP (BIRD, Debian's bird2) to this
    /// neighbour; repeat for several, IPv4 and IPv6 alike. Sets
    /// `balancer.announce_route_table` (200) unless the file does.
    #[arg(long = "bgp-neighbor")]
    pub bgp_neighbors: Vec<std::net::IpAddr>,
    /// This node's AS number.
    #[arg(long, default_value_t = 65001)]
    pub bgp_as: u32,
    /// The neighbours' AS number.
    #[arg(long, default_value_t = 65000)]
    pub bgp_neighbor_as: u32,
    /// BGP router id (default: `balancer.source_v4`).
    #[arg(long)]
    pub bgp_router_id: Option<std::net::Ipv4Addr>,
}

/// `deploy-backend`: the backends' side of mptcp-lb.
#[derive(clap::Args)]
pub struct BackendArgs {
    /// The balancers' configuration file (the same on every node); installed as
    /// `<prefix>/etc/mptcp-lb/backend.toml`.
    #[arg(long)]
    pub config: PathBuf,
    /// Interface the tunnels arrive on (the decapsulation program attaches here).
    #[arg(long)]
    pub iface: String,
    /// This backend's address in the file (default: the one this host has).
    #[arg(long)]
    pub backend: Option<std::net::IpAddr>,
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Deploy into this network namespace.
    #[arg(long)]
    pub netns: Option<String>,
    /// Install this binary instead of building a release one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Turn TCP timestamps off so that IPv6 join ports can be announced (see
    /// `mptcp-lb join-ports`).
    #[arg(long)]
    pub no_timestamps: bool,
    /// Announce this backend's MPTCP tokens to this balancer node's
    /// `balancer.token_announcements_listen` (repeat per node): runs `mptcp-lb agent`.
    #[arg(long = "announce-to")]
    pub announce_to: Vec<std::net::SocketAddr>,
    /// The key shared with the nodes, for --announce-to (installed as
    /// `<prefix>/etc/mptcp-lb/announce.key`, mode 0600).
    #[arg(long)]
    pub announce_key: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct UndeployBackendArgs {
    #[arg(long)]
    pub iface: String,
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    #[arg(long)]
    pub netns: Option<String>,
}

fn run_checked(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{what}: {}", text.trim());
    }
    Ok(text)
}

/// Backends in namespaces share the host's bpffs, where the decapsulation pins its link
/// by interface name: each namespace gets a directory of its own.
fn decap_bpffs(ns: Option<&str>) -> Vec<String> {
    ns.map(|ns| {
        vec![
            "--bpffs".to_string(),
            format!("/sys/fs/bpf/mptcp-lb-backend-{ns}"),
        ]
    })
    .unwrap_or_default()
}

/// Whether the file steers some service's joins by port.
fn steers_by_port(config: &str) -> bool {
    config.parse::<toml::Table>().is_ok_and(|d| {
        d.get("service")
            .and_then(toml::Value::as_array)
            .is_some_and(|svcs| {
                svcs.iter()
                    .any(|s| s.get("join_steering").and_then(toml::Value::as_str) == Some("port"))
            })
    })
}

/// Installs the binary and the file, strips the tunnels (`decap attach`) and, where the
/// file steers joins by port, sets the C bit and announces the join ports
/// (`join-ports apply`); under systemd, a oneshot unit redoes both at boot.
pub fn deploy_backend(
    args: &BackendArgs,
    build: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<()> {
    let bin = args.prefix.join("bin/mptcp-lb");
    let config = args.prefix.join("etc/mptcp-lb/backend.toml");
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let built = match &args.binary {
        Some(b) => b.clone(),
        None => build()?,
    };
    std::fs::create_dir_all(config.parent().context("dir")?)?;
    let staged = config.with_extension("toml.new");
    write_synced(&staged, &text)?;
    let mut check = Command::new(&built);
    check
        .args(["check", "--no-host-checks", "--config"])
        .arg(&staged);
    if let Err(e) = run_checked(check, "mptcp-lb check") {
        let _ = std::fs::remove_file(&staged);
        bail!("the configuration is refused; nothing was installed: {e:#}");
    }
    install_file(&built, &bin, 0o755)?;
    std::fs::rename(&staged, &config)?;
    println!(
        "deploy-backend: checked and installed {} and {}",
        bin.display(),
        config.display()
    );
    let ns = args.netns.as_deref();
    let mut decap = in_netns(ns, &bin);
    decap.args(["decap", "attach", "--iface", &args.iface]);
    decap.args(decap_bpffs(ns));
    match run_checked(decap, "mptcp-lb decap attach") {
        Ok(said) => print!("deploy-backend: {said}"),
        Err(e) if e.to_string().contains("already attached") => {
            println!(
                "deploy-backend: decapsulation already attached to {}",
                args.iface
            )
        }
        Err(e) => return Err(e),
    }
    if steers_by_port(&text) {
        let mut apply = in_netns(ns, &bin);
        apply.args(["join-ports", "apply", "--config"]).arg(&config);
        if let Some(b) = args.backend {
            apply.arg("--backend").arg(b.to_string());
        }
        if args.no_timestamps {
            apply.arg("--no-timestamps");
        }
        for line in run_checked(apply, "mptcp-lb join-ports apply")?.lines() {
            println!("deploy-backend: {line}");
        }
    } else {
        println!(
            "deploy-backend: no service of the file steers joins by port: no C bit, no join ports"
        );
    }
    if !args.announce_to.is_empty() {
        deploy_agent(args, &bin)?;
    }
    if systemd() && ns.is_none() {
        // At boot, the kernel has forgotten both: a oneshot unit redoes them.
        let unit = format!(
            "[Unit]\nDescription=mptcp-lb backend side: tunnel decapsulation{jp}\nAfter=network-online.target\nWants=network-online.target\n\n\
             [Service]\nType=oneshot\nRemainAfterExit=yes\n\
             ExecStartPre=-{bin} decap detach --iface {iface}\n\
             ExecStart={bin} decap attach --iface {iface}\n{apply}\
             ExecStop={bin} join-ports undo --config {cfg}\nExecStop={bin} decap detach --iface {iface}\n\n\
             [Install]\nWantedBy=multi-user.target\n",
            jp = if steers_by_port(&text) {
                " and join ports"
            } else {
                ""
            },
            bin = bin.display(),
            iface = args.iface,
            cfg = config.display(),
            apply = if steers_by_port(&text) {
                format!(
                    "ExecStart={} join-ports apply --config {}\n",
                    bin.display(),
                    config.display()
                )
            } else {
                String::new()
            },
        );
        std::fs::write(unit_path("mptcp-lb-backend"), unit)?;
        for a in [vec!["daemon-reload"], vec!["enable", "mptcp-lb-backend"]] {
            if !Command::new("systemctl").args(&a).status()?.success() {
                bail!("systemctl {} failed", a.join(" "));
            }
        }
        println!("deploy-backend: systemd unit mptcp-lb-backend enabled (redoes this at boot)");
    }
    Ok(())
}

/// Where a backend's token agent keeps its pid and log (without systemd).
fn agent_files(prefix: &Path) -> (PathBuf, PathBuf) {
    (
        prefix.join("var/run/mptcp-lb/agent.pid"),
        prefix.join("var/log/mptcp-lb/agent.log"),
    )
}

/// Stops the token agent the pid file names, if it is one; returns its pid.
fn stop_agent(prefix: &Path) -> anyhow::Result<Option<i32>> {
    let (pid_file, _) = agent_files(prefix);
    let Some((pid, argv)) = process_of(&pid_file) else {
        let _ = std::fs::remove_file(&pid_file);
        return Ok(None);
    };
    if !argv.iter().any(|a| a == b"agent") {
        let _ = std::fs::remove_file(&pid_file);
        return Ok(None);
    }
    // SAFETY: kill on the pid the agent's pid file names, checked above to be an agent.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            bail!("the token agent (pid {pid}) did not exit within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&pid_file);
    Ok(Some(pid))
}

/// Installs the announcement key and (re)starts `mptcp-lb agent`: a systemd unit on a
/// host with systemd, else a background process with a pid file and a log. Waits until
/// it announces, or says why it stopped.
fn deploy_agent(args: &BackendArgs, bin: &Path) -> anyhow::Result<()> {
    let key = args
        .announce_key
        .as_ref()
        .context("--announce-key: needed with --announce-to (the key the nodes share)")?;
    let backend = args.backend.context(
        "--backend: needed with --announce-to (the address the nodes know this backend by)",
    )?;
    let installed = args.prefix.join("etc/mptcp-lb/announce.key");
    install_file(key, &installed, 0o600)?;
    let mut argv: Vec<String> = vec![
        "agent".into(),
        "--interface".into(),
        args.iface.clone(),
        "--backend".into(),
        backend.to_string(),
        "--key-file".into(),
        installed.display().to_string(),
    ];
    for n in &args.announce_to {
        argv.push("--node".into());
        argv.push(n.to_string());
    }
    let ns = args.netns.as_deref();
    if systemd() && ns.is_none() {
        let unit = format!(
            "[Unit]\nDescription=mptcp-lb token agent: this backend's MPTCP tokens to the balancer nodes\nAfter=network-online.target\nWants=network-online.target\n\n\
             [Service]\nType=simple\nExecStart={} {}\nRestart=always\nRestartSec=1\n\n[Install]\nWantedBy=multi-user.target\n",
            bin.display(),
            argv.join(" ")
        );
        std::fs::write(unit_path("mptcp-lb-agent"), unit)?;
        for a in [
            vec!["daemon-reload"],
            vec!["enable", "mptcp-lb-agent"],
            vec!["restart", "mptcp-lb-agent"],
        ] {
            if !Command::new("systemctl").args(&a).status()?.success() {
                bail!("systemctl {} failed", a.join(" "));
            }
        }
        println!("deploy-backend: token agent: systemd unit mptcp-lb-agent (re)started");
        return Ok(());
    }
    if let Some(old) = stop_agent(&args.prefix)? {
        println!("deploy-backend: previous token agent (pid {old}) stopped");
    }
    let (pid_file, log_file) = agent_files(&args.prefix);
    for p in [&pid_file, &log_file] {
        std::fs::create_dir_all(p.parent().context("dir")?)?;
    }
    let start = std::fs::metadata(&log_file).map_or(0, |m| m.len());
    let mut cmd = in_netns(ns, bin);
    cmd.args(&argv);
    let mut child = spawn_detached(cmd, &log_file).context("starting mptcp-lb agent")?;
    let pid = child.id() as i32;
    std::fs::write(&pid_file, format!("{pid}\n"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let said = std::fs::read(&log_file)
            .map(|b| String::from_utf8_lossy(&b[start as usize..]).into_owned())
            .unwrap_or_default();
        if said.contains("announcing this backend's MPTCP tokens") {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let _ = std::fs::remove_file(&pid_file);
            bail!("the token agent stopped ({status}): {}", said.trim());
        }
        if Instant::now() > deadline {
            bail!("the token agent did not start within 15 s: {}", said.trim());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let nodes: Vec<String> = args.announce_to.iter().map(ToString::to_string).collect();
    println!(
        "deploy-backend: token agent started (pid {pid}, log {}), announcing to {}",
        log_file.display(),
        nodes.join(", ")
    );
    Ok(())
}

/// Withdraws the join ports, clears the C bit and detaches the decapsulation.
pub fn undeploy_backend(args: &UndeployBackendArgs) -> anyhow::Result<()> {
    let bin = args.prefix.join("bin/mptcp-lb");
    let config = args.prefix.join("etc/mptcp-lb/backend.toml");
    let ns = args.netns.as_deref();
    if systemd() && ns.is_none() && unit_path("mptcp-lb-agent").exists() {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "mptcp-lb-agent"])
            .status();
        std::fs::remove_file(unit_path("mptcp-lb-agent"))?;
        let _ = Command::new("systemctl").arg("daemon-reload").status();
        println!("undeploy-backend: token agent unit removed");
    }
    if let Some(pid) = stop_agent(&args.prefix)? {
        println!("undeploy-backend: token agent (pid {pid}) stopped");
    }
    let _ = std::fs::remove_file(args.prefix.join("etc/mptcp-lb/announce.key"));
    if systemd() && ns.is_none() && unit_path("mptcp-lb-backend").exists() {
        let _ = Command::new("systemctl")
            .args(["disable", "mptcp-lb-backend"])
            .status();
        std::fs::remove_file(unit_path("mptcp-lb-backend"))?;
        let _ = Command::new("systemctl").arg("daemon-reload").status();
    }
    if config.exists() {
        let mut undo = in_netns(ns, &bin);
        undo.args(["join-ports", "undo", "--config"]).arg(&config);
        for line in run_checked(undo, "mptcp-lb join-ports undo")?.lines() {
            println!("undeploy-backend: {line}");
        }
    }
    let mut detach = in_netns(ns, &bin);
    detach.args(["decap", "detach", "--iface", &args.iface]);
    detach.args(decap_bpffs(ns));
    match run_checked(detach, "mptcp-lb decap detach") {
        Ok(said) => print!("undeploy-backend: {said}"),
        Err(e) => println!("undeploy-backend: {e:#}"),
    }
    if let Some(dir) = decap_bpffs(ns).get(1) {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_file(&config);
    Ok(())
}

#[derive(clap::Args)]
pub struct UndeployArgs {
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    #[arg(long)]
    pub netns: Option<String>,
}

struct Layout {
    instance: String,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    pid: PathBuf,
    /// The node's BGP speaker: its configuration, pid file, control socket and log.
    bird_config: PathBuf,
    bird_pid: PathBuf,
    bird_socket: PathBuf,
    bird_log: PathBuf,
}

fn layout(prefix: &Path, netns: Option<&str>) -> Layout {
    let instance = netns.map_or("mptcp-lb".to_string(), |n| format!("mptcp-lb-{n}"));
    Layout {
        bin: prefix.join("bin/mptcp-lb"),
        config: prefix.join(format!("etc/mptcp-lb/{instance}.toml")),
        log: prefix.join(format!("var/log/mptcp-lb/{instance}.log")),
        pid: prefix.join(format!("var/run/mptcp-lb/{instance}.pid")),
        bird_config: prefix.join(format!("etc/mptcp-lb/{instance}-bird.conf")),
        bird_pid: prefix.join(format!("var/run/mptcp-lb/{instance}-bird.pid")),
        bird_socket: prefix.join(format!("var/run/mptcp-lb/{instance}-bird.ctl")),
        bird_log: prefix.join(format!("var/log/mptcp-lb/{instance}-bird.log")),
        instance,
    }
}

/// The routing table a deployed fleet node announces from, unless its file names one.
const DEFAULT_ANNOUNCE_TABLE: u32 = 200;

/// The BIRD configuration of a fleet node: read the daemon's announcement table and
/// export it to every neighbour over BGP.
fn bird_config(args: &DeployArgs, l: &Layout, config: &str) -> anyhow::Result<String> {
    let doc: toml::Table = config.parse()?;
    let b = doc.get("balancer").context("no [balancer] section")?;
    let table = b
        .get("announce_route_table")
        .and_then(toml::Value::as_integer)
        .context("balancer.announce_route_table is not set")?;
    let router_id = match args.bgp_router_id {
        Some(id) => id.to_string(),
        None => b
            .get("source_v4")
            .and_then(toml::Value::as_str)
            .map(String::from)
            .context("no BGP router id: pass --bgp-router-id, or set balancer.source_v4")?,
    };
    let mut out = format!(
        "# Written by `cargo xtask deploy` for {i}: BGP announcements of what mptcp-lb keeps\n\
         # in routing table {table} (one route per VIP address it serves).\n\
         router id {router_id};\n\
         log \"{log}\" all;\n\
         protocol device {{ scan time 10; }}\n\
         protocol kernel {{ kernel table {table}; learn; scan time 10; ipv4 {{ import all; export none; }}; }}\n\
         protocol kernel {{ kernel table {table}; learn; scan time 10; ipv6 {{ import all; export none; }}; }}\n",
        i = l.instance,
        log = l.bird_log.display()
    );
    for (n, peer) in args.bgp_neighbors.iter().enumerate() {
        let family = if peer.is_ipv4() { "ipv4" } else { "ipv6" };
        out.push_str(&format!(
            "protocol bgp peer{n} {{ local as {}; neighbor {peer} as {}; connect delay time 1; {family} {{ import none; export all; }}; }}\n",
            args.bgp_as, args.bgp_neighbor_as
        ));
    }
    Ok(out)
}

/// The pid in `pid_file` when it runs `program` with `config` among its arguments.
fn pid_running(pid_file: &Path, program: &str, config: &Path) -> Option<i32> {
    let (pid, args) = process_of(pid_file)?;
    let ok = args
        .first()
        .is_some_and(|a| a.ends_with(program.as_bytes()))
        && args
            .iter()
            .any(|a| a == config.as_os_str().as_encoded_bytes());
    ok.then_some(pid)
}

/// The pid a pid file names, and that process's arguments (from /proc), while it runs.
fn process_of(pid_file: &Path) -> Option<(i32, Vec<Vec<u8>>)> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args = cmdline.split(|b| *b == 0).map(<[u8]>::to_vec).collect();
    Some((pid, args))
}

/// Writes the node's BIRD configuration, checks it, and starts BIRD or has the running
/// one re-read it.
fn deploy_bird(args: &DeployArgs, l: &Layout, config: &str) -> anyhow::Result<()> {
    let text = bird_config(args, l, config)?;
    for p in [&l.bird_config, &l.bird_log, &l.bird_pid] {
        std::fs::create_dir_all(p.parent().context("dir")?)?;
    }
    let staged = l.bird_config.with_extension("conf.new");
    write_synced(&staged, &text)?;
    let check = Command::new("bird")
        .args(["-p", "-c"])
        .arg(&staged)
        .output()
        .context("running bird -p (is bird2 installed? cargo xtask setup installs it)")?;
    if !check.status.success() {
        let _ = std::fs::remove_file(&staged);
        bail!(
            "BIRD refused the generated configuration: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    std::fs::rename(&staged, &l.bird_config)?;
    if pid_running(&l.bird_pid, "bird", &l.bird_config).is_some() {
        let out = in_netns(args.netns.as_deref(), Path::new("birdc"))
            .arg("-s")
            .arg(&l.bird_socket)
            .arg("configure")
            .output()?;
        if !out.status.success() {
            bail!(
                "birdc configure: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        println!(
            "deploy: BGP speaker (BIRD) re-read {}",
            l.bird_config.display()
        );
        return Ok(());
    }
    // BIRD daemonizes itself once its configuration is read and writes its pid file.
    let out = in_netns(args.netns.as_deref(), Path::new("bird"))
        .arg("-c")
        .arg(&l.bird_config)
        .arg("-s")
        .arg(&l.bird_socket)
        .arg("-P")
        .arg(&l.bird_pid)
        .stdin(Stdio::null())
        .output()
        .context("starting bird")?;
    if !out.status.success() {
        bail!("bird: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    println!(
        "deploy: BGP speaker (BIRD) started: AS {} to {} (config {}, log {})",
        args.bgp_as,
        args.bgp_neighbors
            .iter()
            .map(|n| format!("{n} (AS {})", args.bgp_neighbor_as))
            .collect::<Vec<_>>()
            .join(", "),
        l.bird_config.display(),
        l.bird_log.display()
    );
    Ok(())
}

/// Stops the node's BIRD started by `deploy`, if any.
fn undeploy_bird(l: &Layout) {
    if let Some(pid) = pid_running(&l.bird_pid, "bird", &l.bird_config) {
        // SAFETY: kill on a pid whose command line is our BIRD with our configuration.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        println!("undeploy: BGP speaker (BIRD, pid {pid}) stopped");
    }
    for f in [&l.bird_config, &l.bird_pid] {
        let _ = std::fs::remove_file(f);
    }
}

fn systemd() -> bool {
    Path::new("/run/systemd/system").exists()
}

fn unit_path(instance: &str) -> PathBuf {
    PathBuf::from(format!("/etc/systemd/system/{instance}.service"))
}

/// The configuration with `--iface`/`--mode` applied, and its pin path and socket.
fn prepared_config(args: &DeployArgs) -> anyhow::Result<(String, PathBuf, PathBuf)> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut doc: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not TOML", args.config.display()))?;
    let balancer = doc
        .get_mut("balancer")
        .and_then(toml::Value::as_table_mut)
        .with_context(|| format!("{}: no [balancer] section", args.config.display()))?;
    balancer.insert("interface".into(), toml::Value::String(args.iface.clone()));
    if let Some(m) = &args.mode {
        balancer.insert("xdp_mode".into(), toml::Value::String(m.clone()));
    }
    if !args.bgp_neighbors.is_empty() && !balancer.contains_key("announce_route_table") {
        balancer.insert(
            "announce_route_table".into(),
            toml::Value::Integer(i64::from(DEFAULT_ANNOUNCE_TABLE)),
        );
    }
    // Instances in namespaces share the host's bpffs and /run: unless the file says
    // otherwise, each gets its own pin path and control socket, so that a second
    // instance can neither take over the first one's maps nor answer for it.
    if let Some(ns) = &args.netns {
        let instance = format!("mptcp-lb-{ns}");
        for (key, value) in [
            ("pin_path", format!("/sys/fs/bpf/{instance}")),
            ("control_socket", format!("/run/mptcp-lb/{instance}.sock")),
        ] {
            if !balancer.contains_key(key) {
                balancer.insert(key.into(), toml::Value::String(value));
            }
        }
    }
    let get = |k: &str, d: &str| {
        PathBuf::from(
            balancer
                .get(k)
                .and_then(toml::Value::as_str)
                .unwrap_or(d)
                .to_string(),
        )
    };
    let pins = get("pin_path", "/sys/fs/bpf/mptcp-lb");
    let socket = get("control_socket", "/run/mptcp-lb/control.sock");
    Ok((toml::to_string(&doc)?, pins, socket))
}

/// Starts `cmd` in a session of its own (setsid before exec: it leaves our session and
/// process group, so it outlives this command and its terminal), its output appended to
/// `log`, no standard input.
fn spawn_detached(mut cmd: Command, log: &Path) -> anyhow::Result<std::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn install_file(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = to.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Copy beside, then rename: a running daemon's binary is replaced, not rewritten.
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    Ok(())
}

/// Writes `text` to `path` and flushes it to disk.
fn write_synced(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The pid in the pid file when that process is this instance's daemon: `l.bin run
/// --config l.config`, read from /proc. A pid file that outlived its daemon (a crash, a
/// reboot) may name an unrelated process by now, which must not get our SIGTERM.
fn running_pid(l: &Layout) -> Option<i32> {
    let (pid, args) = process_of(&l.pid)?;
    let is = |a: &[u8], p: &Path| a == p.as_os_str().as_encoded_bytes();
    let ours = args.first().is_some_and(|a| is(a, &l.bin))
        && args.iter().any(|a| a == b"run")
        && args.iter().any(|a| is(a, &l.config));
    if !ours {
        println!(
            "deploy: the pid file {} names pid {pid}, which is not this instance's daemon: not signalled",
            l.pid.display()
        );
        return None;
    }
    Some(pid)
}

/// Waits until the daemon answers `status` with an attached program.
fn wait_ready(
    l: &Layout,
    netns: Option<&str>,
    socket: &Path,
    expect_pid: Option<i32>,
) -> anyhow::Result<serde_json::Value> {
    // Where the daemon's output went: the journal under systemd, else the log file.
    let log = || {
        if expect_pid.is_none() {
            let out = Command::new("journalctl")
                .args(["-u", &l.instance, "-n", "15", "--no-pager"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            format!("journalctl -u {}:\n{out}", l.instance)
        } else {
            format!("its log ({}):\n{}", l.log.display(), tail(&l.log))
        }
    };
    let start = Instant::now();
    loop {
        let out = in_netns(netns, &l.bin)
            .args(["status", "--json", "--socket"])
            .arg(socket)
            .output()
            .context("running mptcp-lb status")?;
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let pid_ok = expect_pid.is_none_or(|p| v["pid"].as_i64() == Some(i64::from(p)));
            if pid_ok && v["program_id"].as_u64().unwrap_or(0) > 0 {
                return Ok(v);
            }
        }
        if let Some(p) = expect_pid {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(p, 0) } != 0 {
                bail!("the daemon exited; {}", log());
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "mptcp-lb status did not report the program attached within 30 s; {}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub fn deploy(
    args: &DeployArgs,
    build: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<()> {
    let l = layout(&args.prefix, args.netns.as_deref());
    let (config, pins, socket) = prepared_config(args)?;
    if let Some(host) = &args.host {
        // Nothing here can reach another host: print what would run there.
        let unit = unit_text(&l);
        println!("# dry run: deploying to {host} would run:");
        println!("cargo build --release -p lb-userspace --bin mptcp-lb");
        println!("scp target/release/mptcp-lb {host}:/tmp/mptcp-lb.new");
        println!("scp <prepared config> {host}:/tmp/{}.toml", l.instance);
        println!(
            "ssh {host} 'sudo install -D -m 0755 /tmp/mptcp-lb.new {bin} && sudo install -D -m 0644 /tmp/{i}.toml {cfg}'",
            bin = l.bin.display(),
            i = l.instance,
            cfg = l.config.display()
        );
        println!(
            "ssh {host} 'sudo {} check --config {}'",
            l.bin.display(),
            l.config.display()
        );
        println!(
            "ssh {host} 'sudo tee {} <<EOF\n{unit}EOF'",
            unit_path(&l.instance).display()
        );
        println!(
            "ssh {host} 'sudo systemctl daemon-reload && sudo systemctl enable {i} && sudo systemctl restart {i}'",
            i = l.instance
        );
        println!(
            "ssh {host} 'sudo {} status --socket {}'",
            l.bin.display(),
            socket.display()
        );
        return Ok(());
    }
    let built = match &args.binary {
        Some(b) => b.clone(),
        None => build()?,
    };
    // Check the new configuration with the new binary before anything is installed: a
    // refused file leaves the installed binary, configuration and daemon as they were.
    let cfg_dir = l.config.parent().context("config dir")?;
    std::fs::create_dir_all(cfg_dir).with_context(|| format!("creating {}", cfg_dir.display()))?;
    let staged = l.config.with_extension("toml.new");
    write_synced(&staged, &config)?;
    let check = in_netns(args.netns.as_deref(), &built)
        .args(["check", "--config"])
        .arg(&staged)
        .output()?;
    if !check.status.success() {
        let _ = std::fs::remove_file(&staged);
        bail!(
            "the configuration is refused; nothing was installed, and the running balancer and its files are untouched: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    install_file(&built, &l.bin, 0o755)?;
    // Rename over the old file: a reload or restart reads the old file or the new one,
    // never half of one.
    std::fs::rename(&staged, &l.config)
        .with_context(|| format!("installing {}", l.config.display()))?;
    println!(
        "deploy: checked and installed {} and {}",
        l.bin.display(),
        l.config.display()
    );

    let upgrading = pins
        .join(format!("v{}", lb_common::maps::LAYOUT_VERSION))
        .exists();
    if systemd() && args.netns.is_none() {
        std::fs::write(unit_path(&l.instance), unit_text(&l))?;
        for a in [
            vec!["daemon-reload"],
            vec!["enable", &l.instance],
            vec!["restart", &l.instance],
        ] {
            let ok = Command::new("systemctl").args(&a).status()?.success();
            if !ok {
                bail!("systemctl {} failed", a.join(" "));
            }
        }
        println!("deploy: systemd unit {} (re)started", l.instance);
        let v = wait_ready(&l, None, &socket, None)?;
        report(&v, upgrading);
        if !args.bgp_neighbors.is_empty() {
            deploy_bird(args, &l, &installed_text(&l)?)?;
        }
        return Ok(());
    }

    // No systemd (or a namespace): the daemon in the background with a log and pid file.
    if let Some(old) = running_pid(&l) {
        // SIGTERM leaves the dataplane forwarding; the new daemon adopts the pins and
        // swaps the program through the pinned link.
        // SAFETY: kill on the pid our own pid file names, checked alive just above.
        unsafe { libc::kill(old, libc::SIGTERM) };
        let start = Instant::now();
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(old, 0) } == 0 {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the running daemon (pid {old}) did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("deploy: previous daemon (pid {old}) stopped; the dataplane kept forwarding");
    }
    for p in [&l.log, &l.pid] {
        std::fs::create_dir_all(p.parent().context("dir")?)?;
    }
    let mut cmd = in_netns(args.netns.as_deref(), &l.bin);
    cmd.args(["run", "--config"]).arg(&l.config);
    let child = spawn_detached(cmd, &l.log).context("starting mptcp-lb run")?;
    // nsenter execs the daemon in place: the child's pid is the daemon's.
    let pid = child.id() as i32;
    std::fs::write(&l.pid, format!("{pid}\n"))?;
    println!(
        "deploy: no systemd{}: started the daemon in the background (pid {pid}, log {}, pid file {})",
        if args.netns.is_some() {
            " for a namespace"
        } else {
            ""
        },
        l.log.display(),
        l.pid.display()
    );
    let v = wait_ready(&l, args.netns.as_deref(), &socket, Some(pid))?;
    report(&v, upgrading);
    if !args.bgp_neighbors.is_empty() {
        deploy_bird(args, &l, &installed_text(&l)?)?;
    }
    Ok(())
}

fn installed_text(l: &Layout) -> anyhow::Result<String> {
    std::fs::read_to_string(&l.config).with_context(|| format!("reading {}", l.config.display()))
}

fn report(v: &serde_json::Value, upgrading: bool) {
    println!(
        "deploy: attached to {} (XDP {}), program id {}{}",
        v["interface"].as_str().unwrap_or("?"),
        v["xdp_mode"].as_str().unwrap_or("?"),
        v["program_id"],
        if upgrading {
            ": upgraded in place through the pinned link, connection and token tables kept"
        } else {
            ""
        }
    );
}

fn unit_text(l: &Layout) -> String {
    format!(
        "[Unit]
Description=mptcp-lb: XDP load balancer for Multipath TCP ({i})
After=network-online.target
Wants=network-online.target

[Service]
# Ready once it forwards and answers its socket; it reports reloads and its stop too.
Type=notify
NotifyAccess=main
ExecStart={bin} run --config {cfg}
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM leaves the dataplane forwarding (pinned link); `mptcp-lb detach` removes it.
KillSignal=SIGTERM
Restart=on-failure
RestartSec=1
# Health probes, control and metrics connections each take a descriptor.
LimitNOFILE=65536
# It writes only to the bpffs (pins), /run/mptcp-lb (its socket) and net sysctls.
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=yes
PrivateTmp=yes
RuntimeDirectory=mptcp-lb
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes

[Install]
WantedBy=multi-user.target
",
        i = l.instance,
        bin = l.bin.display(),
        cfg = l.config.display()
    )
}

pub fn undeploy(args: &UndeployArgs) -> anyhow::Result<()> {
    let l = layout(&args.prefix, args.netns.as_deref());
    let pins = std::fs::read_to_string(&l.config)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|d| {
            d.get("balancer")?
                .get("pin_path")?
                .as_str()
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mptcp-lb"));
    if systemd() && args.netns.is_none() && unit_path(&l.instance).exists() {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", &l.instance])
            .status();
        std::fs::remove_file(unit_path(&l.instance))?;
        let _ = Command::new("systemctl").arg("daemon-reload").status();
    }
    if let Some(pid) = running_pid(&l) {
        // SAFETY: kill on the pid our pid file names, checked alive.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    undeploy_bird(&l);
    if l.bin.exists() {
        let out = in_netns(args.netns.as_deref(), &l.bin)
            .args(["detach", "--pin-path"])
            .arg(&pins)
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    for f in [&l.config, &l.pid] {
        let _ = std::fs::remove_file(f);
    }
    println!(
        "undeploy: {} stopped and detached; {} and the log {} left in place",
        l.instance,
        l.bin.display(),
        l.log.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(config: &Path, netns: Option<&str>) -> DeployArgs {
        DeployArgs {
            iface: "eth1".into(),
            config: config.to_path_buf(),
            mode: None,
            prefix: PathBuf::from("/usr/local"),
            netns: netns.map(String::from),
            host: None,
            binary: None,
            bgp_neighbors: Vec::new(),
            bgp_as: 65001,
            bgp_neighbor_as: 65000,
            bgp_router_id: None,
        }
    }

    /// Two instances in two namespaces never share pins or a control socket unless the
    /// file says so; a file that names them keeps its choice.
    #[test]
    fn namespace_instances_get_their_own_pins_and_socket() {
        let dir = std::env::temp_dir().join(format!("mlb-deploy-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let plain = dir.join("plain.toml");
        std::fs::write(&plain, "[balancer]\ninterface = \"eth0\"\n").expect("write");
        let (_, pins_a, sock_a) = prepared_config(&args(&plain, Some("a"))).expect("a");
        let (_, pins_b, sock_b) = prepared_config(&args(&plain, Some("b"))).expect("b");
        assert_eq!(pins_a, PathBuf::from("/sys/fs/bpf/mptcp-lb-a"));
        assert_eq!(sock_a, PathBuf::from("/run/mptcp-lb/mptcp-lb-a.sock"));
        assert_ne!(pins_a, pins_b);
        assert_ne!(sock_a, sock_b);
        let (text, pins, _) = prepared_config(&args(&plain, None)).expect("host");
        assert_eq!(pins, PathBuf::from("/sys/fs/bpf/mptcp-lb"));
        assert!(text.contains("interface = \"eth1\""), "{text}");
        let named = dir.join("named.toml");
        std::fs::write(
            &named,
            "[balancer]\ninterface = \"eth0\"\npin_path = \"/sys/fs/bpf/x\"\n",
        )
        .expect("write");
        let (_, pins, _) = prepared_config(&args(&named, Some("a"))).expect("named");
        assert_eq!(pins, PathBuf::from("/sys/fs/bpf/x"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fleet node's BIRD configuration: the daemon's table read, one session per
    /// neighbour in its own family, the router id from source_v4.
    #[test]
    fn a_fleet_node_gets_a_bird_configuration_for_its_neighbours() {
        let dir = std::env::temp_dir().join(format!("mlb-deploy-bird-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("node.toml");
        std::fs::write(
            &file,
            "[balancer]\ninterface = \"eth0\"\nsource_v4 = \"10.0.3.2\"\n",
        )
        .expect("write");
        let mut a = args(&file, Some("n2"));
        a.bgp_neighbors = vec![
            "10.0.3.1".parse().expect("ip"),
            "fd00:a3::1".parse().expect("ip"),
        ];
        let (text, _, _) = prepared_config(&a).expect("prepared");
        assert!(text.contains("announce_route_table = 200"), "{text}");
        let l = layout(Path::new("/usr/local"), Some("n2"));
        let bird = bird_config(&a, &l, &text).expect("bird");
        assert!(bird.contains("router id 10.0.3.2;"), "{bird}");
        assert!(bird.contains("kernel table 200; learn;"), "{bird}");
        assert!(
            bird.contains("neighbor 10.0.3.1 as 65000; connect delay time 1; ipv4 { import none; export all; }"),
            "{bird}"
        );
        assert!(
            bird.contains("neighbor fd00:a3::1 as 65000; connect delay time 1; ipv6 {"),
            "{bird}"
        );
        // Without source_v4 nor --bgp-router-id, it says what to pass.
        std::fs::write(&file, "[balancer]\ninterface = \"eth0\"\n").expect("write");
        let (text, _, _) = prepared_config(&a).expect("prepared");
        let e = bird_config(&a, &l, &text).expect_err("no router id");
        assert!(e.to_string().contains("--bgp-router-id"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

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
}

fn layout(prefix: &Path, netns: Option<&str>) -> Layout {
    let instance = netns.map_or("mptcp-lb".to_string(), |n| format!("mptcp-lb-{n}"));
    Layout {
        bin: prefix.join("bin/mptcp-lb"),
        config: prefix.join(format!("etc/mptcp-lb/{instance}.toml")),
        log: prefix.join(format!("var/log/mptcp-lb/{instance}.log")),
        pid: prefix.join(format!("var/run/mptcp-lb/{instance}.pid")),
        instance,
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
    let pid: i32 = std::fs::read_to_string(&l.pid).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is = |a: &[u8], p: &Path| a == p.as_os_str().as_encoded_bytes();
    let ours = args.first().is_some_and(|a| is(a, &l.bin))
        && args.contains(&b"run".as_slice())
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
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&l.log)
        .with_context(|| format!("opening {}", l.log.display()))?;
    let mut cmd = in_netns(args.netns.as_deref(), &l.bin);
    cmd.args(["run", "--config"])
        .arg(&l.config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid in the child before exec: it leaves our session and process group,
    // so it outlives this command and its terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting mptcp-lb run")?;
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
    Ok(())
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
Type=simple
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
    if l.bin.exists() {
        let out = Command::new(&l.bin)
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
}

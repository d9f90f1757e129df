//! Runs the real `mptcp-lb` binary (the daemon and the CLI) inside a namespace, the way
//! an operator would, with its configuration file, log file and control socket in a
//! directory of its own.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, wait_until};

/// `mptcp-lb ARGS` inside the namespace at `ns_path` (through nsenter, which keeps the
/// host's bpffs visible).
fn cli_command(ns_path: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={ns_path}"))
        .arg("--")
        .arg(binary())
        .args(args);
    cmd
}

/// Runs `mptcp-lb ARGS` inside namespace `ns`, e.g. on a backend or a node without a
/// [`Daemon`] of this process.
pub fn cli_in(ns: &Netns, args: &[&str]) -> Output {
    cli_command(&ns.path(), args)
        .output()
        .expect("run mptcp-lb")
}

/// The `mptcp-lb` binary of this build: `$MPTCP_LB_BIN`, else beside this executable
/// (a bin) or one directory up (a test, which runs from `deps/`).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MPTCP_LB_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let candidates = [dir.join("mptcp-lb"), dir.join("../mptcp-lb")];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no mptcp-lb binary beside {}: build it first (cargo build -p lb-userspace; cargo xtask test does)",
                exe.display()
            )
        })
}

pub struct Daemon {
    ns_path: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_path: PathBuf,
    child: Option<Child>,
    /// SIGHUPs sent by the last `spawn_hupping`.
    hups: usize,
    /// The daemon's open-file limit (soft and hard), when set before a spawn.
    pub nofile: Option<u64>,
    /// `NOTIFY_SOCKET` for the daemon (systemd's readiness protocol), when set.
    pub notify_socket: Option<PathBuf>,
    /// More environment for the daemon (e.g. `MPTCP_LB_FAILPOINT`).
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Writes `config` (which must name `socket` and `pin_path` as given by
    /// [`Daemon::paths`]) and starts the daemon in `ns`; returns once it answers.
    pub fn start(ns: &Netns, tag: &str, config: &str) -> Daemon {
        let mut d = Daemon::prepare(ns, tag, config);
        d.spawn();
        d
    }

    /// As [`Daemon::start`], without starting it.
    pub fn prepare(ns: &Netns, tag: &str, config: &str) -> Daemon {
        let (dir, socket, pin_path) = Daemon::paths(tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("daemon dir");
        let d = Daemon {
            ns_path: ns.path(),
            config: dir.join("lb.toml"),
            dir,
            socket,
            pin_path,
            child: None,
            hups: 0,
            nofile: None,
            notify_socket: None,
            env: Vec::new(),
        };
        d.write_config(config);
        d
    }

    /// Directory, control socket and pin path for daemon `tag`.
    pub fn paths(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = PathBuf::from(format!("/tmp/mptcp-lb-test-{tag}"));
        let socket = dir.join("control.sock");
        let pins = PathBuf::from(format!("/sys/fs/bpf/mptcp-lb-test-{tag}"));
        (dir, socket, pins)
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write config");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Starts (again) and waits until the control socket answers.
    pub fn spawn(&mut self) {
        self.spawn_inner(false);
    }

    /// Starts (again); from the moment the process catches SIGHUP, sends one every 2 ms
    /// until the control socket answers, as `systemctl reload` right after a start
    /// does. Returns how many were sent and whether the daemon already answered when it
    /// began to catch SIGHUP (it should not: the handler comes before the start-up's
    /// slow part, loading and attaching).
    pub fn spawn_hupping(&mut self) -> (usize, bool) {
        let ready_when_caught = self.spawn_inner(true);
        (self.hups, ready_when_caught)
    }

    fn spawn_inner(&mut self, hup: bool) -> bool {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("log file");
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.ns_path))
            .arg("--")
            .arg(binary())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(n) = &self.notify_socket {
            command.env("NOTIFY_SOCKET", n);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing
            // else.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command.spawn().expect("spawn mptcp-lb run");
        self.child = Some(child);
        let start = Instant::now();
        let mut hups = 0;
        let mut ready_when_caught = false;
        if hup {
            let pid = self.pid();
            wait_until(
                Duration::from_secs(10),
                "the daemon to catch SIGHUP",
                || catches_sighup(pid).then_some(()),
            );
            ready_when_caught = self.cli(&["status", "--json"]).status.success();
        }
        loop {
            if hup {
                // Between the hangups, a status request: the daemon must answer one.
                for _ in 0..5 {
                    if let Some(c) = &self.child {
                        // SAFETY: kill on our own child's pid.
                        unsafe { libc::kill(c.id() as i32, libc::SIGHUP) };
                        hups += 1;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            if self.cli(&["status", "--json"]).status.success() {
                self.hups = hups;
                return ready_when_caught;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!("mptcp-lb run exited ({status}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "mptcp-lb run did not answer within 30 s:\n{}",
                self.log()
            );
            if !hup {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no cleanup of any kind.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().expect("kill -9");
        c.wait().expect("reap");
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn term(&mut self) -> bool {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s.success();
            }
            assert!(Instant::now() < deadline, "no exit 10 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn hup(&self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, libc::SIGHUP) };
    }

    /// Runs the CLI (in the daemon's namespace) with `--socket`/`--pin-path` supplied
    /// where the subcommand takes them.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = cli_command(&self.ns_path, args);
        match args.first() {
            Some(&("status" | "reload" | "backend" | "node")) => {
                cmd.arg("--socket").arg(&self.socket);
            }
            Some(&"inspect") => {
                cmd.arg("--pin-path").arg(&self.pin_path);
            }
            _ => {}
        }
        cmd.output().expect("run mptcp-lb")
    }

    /// The CLI's stdout as JSON; panics with its stderr when it fails.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "mptcp-lb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    /// One dataplane counter (`inspect stats`), 0 when absent.
    pub fn stat(&self, name: &str) -> u64 {
        self.json(&["inspect", "stats", "--json"])[name]
            .as_u64()
            .unwrap_or(0)
    }

    pub fn status(&self) -> serde_json::Value {
        self.json(&["status", "--json"])
    }

    /// Backend `addr`'s state in `service`, as the daemon reports it.
    pub fn backend_state(&self, service: &str, addr: &str) -> Option<String> {
        let s = self.status();
        s["services"]
            .as_array()?
            .iter()
            .find(|x| x["name"] == service)?["backends"]
            .as_array()?
            .iter()
            .find(|b| b["address"] == addr)
            .map(|b| b["state"].as_str().unwrap_or_default().to_string())
    }

    /// Waits until backend `addr` of `service` is in `state`; returns how long it took.
    pub fn wait_state(
        &self,
        service: &str,
        addr: &str,
        state: &str,
        deadline: Duration,
    ) -> Duration {
        let start = Instant::now();
        wait_until(deadline, &format!("{service}/{addr} {state}"), || {
            (self.backend_state(service, addr).as_deref() == Some(state)).then_some(())
        });
        start.elapsed()
    }
}

/// Whether process `pid` has a handler for SIGHUP (`SigCgt` in /proc/PID/status).
fn catches_sighup(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGHUP - 1)) != 0)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = lb_userspace::pins::remove(&self.pin_path);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! Network namespaces as test hosts. Commands run through `nsenter --net` (not
//! `ip netns exec`, which remounts /sys and hides bpffs); Rust code runs inside a
//! namespace on a thread that `setns()`ed into it, so its sockets and BPF test runs
//! belong to that namespace.

use std::{
    collections::HashMap,
    os::fd::AsRawFd as _,
    process::{Command, Output},
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub struct Netns {
    name: String,
}

fn check(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    /// Creates the namespace (replacing a stale one of that name) with `lo` up, and IPv6
    /// duplicate address detection off for the interfaces created in it later.
    ///
    /// With DAD on, a new link's link-local address stays tentative for one to two
    /// seconds, and neighbour discovery cannot send a solicitation from it: every IPv6
    /// packet of the first second waits in a neighbour queue (seen: the first IPv6 SYNs
    /// of the MPTCP test reached their backend 1 s late, with their retransmissions, and
    /// ~10 SYNs a run were retransmitted), and a resolution that gives up before the
    /// address is usable drops the queue with an ICMPv6 error, which kills a join
    /// subflow for good. Tests start from a settled network instead.
    pub fn new(name: &str) -> Netns {
        remove(name);
        check(Command::new("ip").args(["netns", "add", name]));
        let ns = Netns {
            name: name.to_string(),
        };
        ns.run(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// IPv6 addresses still tentative (duplicate address detection running), one line
    /// each as `ip -6 addr show tentative` prints them.
    pub fn tentative_addrs(&self) -> String {
        self.run(&["ip", "-6", "-o", "addr", "show", "tentative"])
    }

    /// A handle on a namespace someone else created (`ip netns add`); it is not removed
    /// when the handle goes (forget it rather than drop it).
    pub fn existing(name: &str) -> std::mem::ManuallyDrop<Netns> {
        std::mem::ManuallyDrop::new(Netns {
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path()))
            .arg("--")
            .args(args);
        cmd
    }

    /// Runs a command inside the namespace; panics with its stderr if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        check(&mut self.command(args))
    }

    pub fn try_run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
    }

    /// Starts a long-running command inside the namespace.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        let mut cmd = self.command(args);
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
    }

    /// The same with no standard input, output or error of ours.
    pub fn spawn_detached(&self, args: &[&str]) -> std::process::Child {
        let mut cmd = self.command(args);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
    }

    /// The id of the XDP program attached to `dev`, if any (from `ip -d link`).
    pub fn xdp_prog(&self, dev: &str) -> Option<u32> {
        let out = self.run(&["ip", "-d", "link", "show", "dev", dev]);
        let at = out.find("prog/xdp id ")? + "prog/xdp id ".len();
        out[at..].split_whitespace().next()?.parse().ok()
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Moves the calling thread into the namespace (threads it starts later follow).
    pub fn join_current_thread(&self) {
        let path = self.path();
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns on a valid namespace fd; it only changes this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
    }

    /// Runs `f` on a new thread inside the namespace.
    pub fn enter<F, R>(&self, f: F) -> JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it only changes this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Runs `f` inside the namespace and returns its result (re-raising its panic).
    pub fn within<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        match self.enter(f).join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Adds an address (IPv6 ones without duplicate address detection).
    pub fn addr(&self, dev: &str, cidr: &str) {
        if cidr.contains(':') {
            self.run(&["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"]);
        } else {
            self.run(&["ip", "addr", "add", cidr, "dev", dev]);
        }
    }

    /// `ip route add ARGS` (IPv6 when the destination has a colon).
    pub fn route(&self, args: &[&str]) {
        let family = if args.first().is_some_and(|d| d.contains(':')) {
            "-6"
        } else {
            "-4"
        };
        let mut full = vec!["ip", family, "route", "add"];
        full.extend_from_slice(args);
        self.run(&full);
    }

    pub fn neigh_permanent(&self, dev: &str, ip: &str, mac: &str) {
        self.run(&[
            "ip",
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }

    fn link_json(&self, dev: &str, stats: bool) -> serde_json::Value {
        let args: &[&str] = if stats {
            &["ip", "-s", "-j", "link", "show", "dev", dev]
        } else {
            &["ip", "-j", "link", "show", "dev", dev]
        };
        let v: serde_json::Value = serde_json::from_str(&self.run(args)).expect("ip -j output");
        v[0].clone()
    }

    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let s = self.link_json(dev, false)["address"]
            .as_str()
            .expect("address")
            .to_string();
        let mut mac = [0u8; 6];
        for (i, part) in s.split(':').enumerate() {
            mac[i] = u8::from_str_radix(part, 16).expect("hex");
        }
        mac
    }

    pub fn ifindex(&self, dev: &str) -> u32 {
        self.link_json(dev, false)["ifindex"]
            .as_u64()
            .expect("ifindex") as u32
    }

    pub fn link_stats(&self, dev: &str) -> LinkStats {
        let v = self.link_json(dev, true);
        let n = |dir: &str, f: &str| v["stats64"][dir][f].as_u64().unwrap_or(0);
        LinkStats {
            rx_packets: n("rx", "packets"),
            rx_bytes: n("rx", "bytes"),
            tx_packets: n("tx", "packets"),
            tx_bytes: n("tx", "bytes"),
        }
    }

    /// Checksum and segmentation offloads off: redirected and encapsulated packets then
    /// carry complete checksums and fit the MTU.
    pub fn offloads_off(&self, dev: &str) {
        let _ = self.try_run(&[
            "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
        ]);
    }

    /// The namespace's kernel counters (nstat names, e.g. `TcpExtTCPSynRetrans`,
    /// `MPTcpExtMPJoinNoTokenFound`), absolute values.
    /// One counter of `nstat` (0 when the kernel has none of that name).
    pub fn nstat_value(&self, name: &str) -> u64 {
        self.nstat().get(name).copied().unwrap_or(0)
    }

    pub fn nstat(&self) -> HashMap<String, u64> {
        let history = std::env::temp_dir().join(format!("nstat-{}", self.name));
        let mut cmd = self.command(&["nstat", "-a", "-z", "-s"]);
        cmd.env("NSTAT_HISTORY", &history);
        let text = check(&mut cmd);
        text.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let (k, v) = (it.next()?, it.next()?);
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

fn remove(name: &str) {
    let path = format!("/run/netns/{name}");
    if !std::path::Path::new(&path).exists() {
        return;
    }
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

/// A veth pair between two namespaces, both ends up, with the given MTU.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str, mtu: u32) {
    check(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]));
    let mtu = mtu.to_string();
    a.run(&["ip", "link", "set", a_if, "mtu", &mtu, "up"]);
    b.run(&["ip", "link", "set", b_if, "mtu", &mtu, "up"]);
}

/// Names of the namespaces (`ip netns`) that start with `prefix`.
pub fn namespaces(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `deadline`.
pub fn wait_until<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

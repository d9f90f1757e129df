//! `cargo xtask bench`, its end-to-end part: goodput of long MPTCP transfers through the
//! balancer against plain routing, on the testbed, in one run; and the balancer's CPU per
//! gigabit, from the kernel's own accounting of the program (`kernel.bpf_stats_enabled`).
//!
//! One backend. iperf3 under `mptcpize` sends from the client for `GOODPUT_SECS` (default
//! 4) seconds, alternately to the backend's own address (client, router, backend: plain
//! routing) and to the VIP (client, router, balancer, router, backend, replies straight
//! back: direct server return), `GOODPUT_ROUNDS` (default 3) times each. The bulk of the
//! data crosses the balancer; the acknowledgements do not. The balancer is attached in
//! generic (skb) mode, as everywhere on the testbed.

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use lb_common::maps::BACKEND_ACTIVE;
use mptcp_lb_tests::{
    netns::wait_until,
    testbed::{E2E_SIZES, PORT, Testbed, VIP4, backend_addr4},
};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `kernel.bpf_stats_enabled` on while it lives, then back to what it was.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> BpfStats {
        const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";
        let was = std::fs::read_to_string(PATH).unwrap_or_else(|_| "0".into());
        std::fs::write(PATH, "1").expect("kernel.bpf_stats_enabled=1");
        BpfStats(was.trim().to_string())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// (run_time_ns, run_cnt) of the program behind `fd`, as its fdinfo reports them.
fn prog_stats(fd: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from the program's fdinfo:\n{text}"))
    };
    (field("run_time_ns:"), field("run_cnt:"))
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("goodput: needs root (network namespaces, XDP)");
        std::process::exit(1);
    }
    for tool in ["iperf3", "mptcpize"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!("goodput: {tool} is missing (`cargo xtask setup` installs it)");
            std::process::exit(1);
        }
    }
    let secs = env_or("GOODPUT_SECS", 4);
    let rounds = env_or("GOODPUT_ROUNDS", 3);

    let tb = Testbed::new("mlb-gp", 1);
    let mut dp = tb.balancer(E2E_SIZES, 0);
    dp.set_backend(1, IpAddr::V4(backend_addr4(1)), BACKEND_ACTIVE)
        .expect("backend");
    dp.set_ring(0, &Testbed::members(&[1])).expect("ring");
    let prog_fd = dp.program().fd().expect("program fd").as_fd().as_raw_fd();

    let be = &tb.backends[0];
    let mut server =
        be.spawn_detached(&["mptcpize", "run", "iperf3", "-s", "-p", &PORT.to_string()]);
    wait_until(
        Duration::from_secs(10),
        "the iperf3 server to listen",
        || {
            let out = be.try_run(&["ss", "-Hltn", &format!("sport = :{PORT}")]);
            (!out.stdout.is_empty()).then_some(())
        },
    );
    let stats = BpfStats::enable();

    // One transfer: bits a second received by the server, bytes received.
    let transfer = |to: &str| -> (f64, u64) {
        let out = tb.client.try_run(&[
            "mptcpize",
            "run",
            "iperf3",
            "-c",
            to,
            "-p",
            &PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ]);
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let received = &report["end"]["sum_received"];
        let (bps, bytes) = (
            received["bits_per_second"].as_f64().unwrap_or(0.0),
            received["bytes"].as_u64().unwrap_or(0),
        );
        assert!(
            out.status.success() && bytes > 0,
            "iperf3 to {to}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (bps, bytes)
    };
    let direct_to = backend_addr4(1).to_string();
    let vip = VIP4.to_string();
    let (mut direct, mut via, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut run_ns, mut runs, mut bytes) = (0u64, 0u64, 0u64);
    for _ in 0..rounds {
        let (d, _) = transfer(&direct_to);
        let before = prog_stats(prog_fd);
        let (v, b) = transfer(&vip);
        let after = prog_stats(prog_fd);
        run_ns += after.0 - before.0;
        runs += after.1 - before.1;
        bytes += b;
        ratios.push(v / d);
        direct.push(d);
        via.push(v);
    }
    drop(stats);
    let _ = server.kill();
    let _ = server.wait();

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let gbit = |bps: f64| bps / 1e9;
    let gigabits = bytes as f64 * 8.0 / 1e9;
    println!(
        "end to end (testbed, one backend, MPTCP, iperf3 -t {secs}, {rounds} rounds alternating): \
         plain routing {:.2} Gbit/s, through the balancer {:.2} Gbit/s (medians); \
         through / plain {:.2} (median of the rounds' ratios)",
        gbit(median(direct)),
        gbit(median(via)),
        median(ratios)
    );
    println!(
        "balancer CPU (kernel.bpf_stats_enabled): {runs} packets, {:.0} ns each; {:.1} ms of \
         one CPU per gigabit received ({:.2}% of a core at 1 Gbit/s)",
        run_ns as f64 / runs.max(1) as f64,
        run_ns as f64 / 1e6 / gigabits,
        run_ns as f64 / 1e9 / gigabits * 100.0
    );
}

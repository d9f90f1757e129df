//! Off-the-shelf applications through the balancer, as the README's "Try it with your
//! application" runs them: nginx under `mptcpize` on three backends, curl under
//! `mptcpize` on the client (IPv4 and IPv6, small pages and a 20 MB file checked by
//! hash), and iperf3 under `mptcpize` through a service with client-address affinity
//! (its control and data connections must meet on one backend). The balancer is the real
//! daemon; joins are checked on the backends themselves.
//!
//! iperf3 runs with the client's second path as a backup path: on this kernel (6.18),
//! when the first data of a fresh join subflow reaches the server while data of the
//! first subflow is being taken from its backlog on the other CPU, the server's MPTCP
//! stack drops the join segment's first bytes from the data stream (its TCP acks all of
//! them, its MPTCP data ack stops short) and iperf3's parameter exchange arrives
//! corrupted: about one run in thirty over IPv6 through the balancer with both paths
//! active, none in 150 with the second path as backup, which still opens its subflow
//! through the balancer. See the README's "Try it with your application".

use std::{collections::HashMap, path::PathBuf, process::Child, time::Duration};

use mptcp_lb_tests::{
    daemon::Daemon,
    netns::{Netns, wait_until},
    privileged,
    testbed::{Testbed, VIP4, VIP6, backend_addr4},
};
use sha2::Digest as _;

const HTTP: u16 = 8080;
const IPERF: u16 = 5201;
/// iperf3 runs per address family.
const IPERF_RUNS: usize = 4;
const BIG: usize = 20 << 20;

/// Whether `tool` is installed; under CI=true a missing one fails the test (`cargo xtask
/// setup` installs them), elsewhere the test says why it does not run.
fn have(tool: &str, test: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !ci,
            "{test}: {tool} is missing (cargo xtask setup installs it)"
        );
        println!("SKIPPED {test}: {tool} is not installed (cargo xtask setup installs it)");
    }
    found
}

fn big_file() -> Vec<u8> {
    (0..BIG)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// nginx (under mptcpize) serving `dir/html` on HTTP, in `ns`.
fn nginx(ns: &Netns, dir: &std::path::Path, name: &str) -> Child {
    let html = dir.join("html");
    std::fs::create_dir_all(&html).expect("html dir");
    std::fs::write(html.join("index.html"), format!("served by {name}\n")).expect("index");
    std::fs::write(html.join("big"), big_file()).expect("big file");
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
             server {{ listen {HTTP}; listen [::]:{HTTP}; root {d}/html; }}\n}}\n",
            d = dir.display()
        ),
    )
    .expect("nginx.conf");
    ns.spawn_detached(&[
        "mptcpize",
        "run",
        "nginx",
        "-c",
        conf.to_str().expect("path"),
        "-p",
        dir.to_str().expect("path"),
    ])
}

fn mptcp_counters(ns: &Netns) -> HashMap<String, u64> {
    ns.nstat()
        .into_iter()
        .filter(|(k, _)| k.starts_with("MPTcpExt"))
        .collect()
}

/// The MPTCP counters of every backend, less those of `before`: (connections, joins,
/// joins that found no connection).
fn deltas(tb: &Testbed, before: &[HashMap<String, u64>]) -> Vec<(u64, u64, u64)> {
    tb.backends
        .iter()
        .zip(before)
        .map(|(be, b)| {
            let now = mptcp_counters(be);
            let delta = |k: &str| now.get(k).copied().unwrap_or(0) - b.get(k).copied().unwrap_or(0);
            (
                delta("MPTcpExtMPCapableSYNRX"),
                delta("MPTcpExtMPJoinSynRx"),
                delta("MPTcpExtMPJoinNoTokenFound"),
            )
        })
        .collect()
}

#[test]
fn nginx_curl_and_iperf3_under_mptcpize() {
    let test = "nginx_curl_and_iperf3_under_mptcpize";
    if !privileged(test)
        || !["nginx", "curl", "iperf3", "mptcpize"]
            .iter()
            .all(|t| have(t, test))
    {
        return;
    }
    let tb = Testbed::new("mlb-app", 3);
    tb.client_second_paths();
    let base = PathBuf::from("/tmp/mlb-app");
    let _ = std::fs::remove_dir_all(&base);
    let mut servers: Vec<Child> = Vec::new();
    let mut iperf_logs: Vec<PathBuf> = Vec::new();
    for (i, be) in tb.backends.iter().enumerate() {
        let dir = base.join(format!("be{}", i + 1));
        std::fs::create_dir_all(dir.join("tmp")).expect("dir");
        servers.push(nginx(be, &dir, &format!("be{}", i + 1)));
        let log = dir.join("iperf3.log");
        servers.push(be.spawn_detached(&[
            "mptcpize",
            "run",
            "iperf3",
            "-s",
            "-p",
            &IPERF.to_string(),
            "--logfile",
            log.to_str().expect("path"),
            "--forceflush",
        ]));
        iperf_logs.push(log);
    }
    // Both services are checked on nginx's port: an iperf3 server takes every connection
    // for a test's control connection, and a check's connect-and-close would break the
    // test running.
    let service = |name: &str, port: u16, extra: &str| {
        let head = format!(
            "[[service]]\nname = \"{name}\"\nvips = [\"{VIP4}:{port}/tcp\", \"[{VIP6}]:{port}/tcp\"]\n\
             health = {{ kind = \"tcp\", port = {HTTP}, interval_ms = 200, timeout_ms = 150, rise = 1, fall = 3 }}\n{extra}"
        );
        (1..=3).fold(head, |s, i| {
            format!(
                "{s}[[service.backend]]\naddress = \"{}\"\n",
                backend_addr4(i)
            )
        })
    };
    let services = format!(
        "{}\n{}",
        service("web", HTTP, ""),
        service("iperf", IPERF, "affinity = \"client_address\"\n")
    );
    let d = Daemon::start(&tb.lb, "app", &Testbed::daemon_config("app", &services));
    for svc in ["web", "iperf"] {
        for i in 1..=3 {
            d.wait_state(
                svc,
                &backend_addr4(i).to_string(),
                "active",
                Duration::from_secs(15),
            );
        }
    }
    let before: Vec<HashMap<String, u64>> = tb.backends.iter().map(mptcp_counters).collect();
    let curl = |url: &str, out: &str| {
        tb.client.try_run(&[
            "mptcpize",
            "run",
            "curl",
            "-sS",
            "--max-time",
            "30",
            "-o",
            out,
            url,
        ])
    };
    let urls = [
        format!("http://{VIP4}:{HTTP}"),
        format!("http://[{VIP6}]:{HTTP}"),
    ];

    // Small pages: 10 per family, answered by every backend.
    let mut served_by: HashMap<String, usize> = HashMap::new();
    for url in &urls {
        for _ in 0..10 {
            let out = curl(&format!("{url}/"), "-");
            assert!(
                out.status.success(),
                "curl {url}/: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            *served_by
                .entry(String::from_utf8_lossy(&out.stdout).trim().to_string())
                .or_default() += 1;
        }
    }
    println!("small pages: {served_by:?}");
    assert_eq!(served_by.values().sum::<usize>(), 20);

    // 20 MB files, intact, 2 per family.
    let want = sha2::Sha256::digest(big_file());
    let file = base.join("download");
    let mut big = 0;
    for url in &urls {
        for _ in 0..2 {
            let out = curl(&format!("{url}/big"), file.to_str().expect("path"));
            assert!(
                out.status.success(),
                "curl {url}/big: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got = sha2::Sha256::digest(std::fs::read(&file).expect("downloaded"));
            assert_eq!(got, want, "{url}/big arrived damaged");
            big += 1;
        }
    }

    // On the backends: every join found its connection (none reached a backend without
    // its token), and the 20 MB transfers, long enough for their second subflow, had it.
    let web = deltas(&tb, &before);
    println!("per backend (MPTCP connections, joins, joins without their token): {web:?}");
    assert!(web.iter().all(|(_, _, lost)| *lost == 0), "{web:?}");
    let joins: u64 = web.iter().map(|(_, j, _)| j).sum();
    assert!(
        joins >= big,
        "each 20 MB transfer had its second subflow: {web:?}"
    );

    // iperf3: its control and data connections meet on one backend thanks to the
    // service's client-address affinity. The second path is a backup path (the module's
    // comment says why): it still opens its subflow, through the balancer, by token.
    for id in ["1", "2"] {
        tb.client
            .run(&["ip", "mptcp", "endpoint", "change", "id", id, "backup"]);
    }
    let before: Vec<HashMap<String, u64>> = tb.backends.iter().map(mptcp_counters).collect();
    for vip in [VIP4.to_string(), VIP6.to_string()] {
        for _ in 0..IPERF_RUNS {
            // An iperf3 server closes its listening socket when a test ends and opens a
            // new one for the next: a client that connects in between is refused (seen
            // once in CI). Each run waits until every server listens for a new test.
            wait_until(
                Duration::from_secs(10),
                "the iperf3 servers to listen for a new test",
                || iperf_logs.iter().all(|log| iperf_ready(log)).then_some(()),
            );
            let out = tb.client.try_run(&[
                "mptcpize",
                "run",
                "iperf3",
                "-c",
                &vip,
                "-p",
                &IPERF.to_string(),
                "-t",
                "1",
                "-J",
            ]);
            let report: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
            println!("iperf3 to {vip}: {bytes} bytes received");
            assert!(
                out.status.success() && bytes > 0,
                "iperf3 to {vip}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // Each run is two MPTCP connections (control and data) on one backend, each with its
    // second subflow, all found by their backend.
    let runs = 2 * IPERF_RUNS as u64;
    let iperf = deltas(&tb, &before);
    println!(
        "iperf3, per backend (MPTCP connections, joins, joins without their token): {iperf:?}"
    );
    assert!(iperf.iter().all(|(_, _, lost)| *lost == 0), "{iperf:?}");
    assert!(
        iperf.iter().map(|(_, j, _)| j).sum::<u64>() >= 2 * runs,
        "every iperf3 connection had its second subflow: {iperf:?}"
    );

    drop(d);
    // nginx stops on SIGTERM to its master (its pid file goes with it); iperf3 is ours.
    for i in 1..=3 {
        let pid_file = base.join(format!("be{i}/nginx.pid"));
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill on the nginx master this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    wait_until(Duration::from_secs(10), "nginx to stop", || {
        (1..=3)
            .all(|i| !base.join(format!("be{i}/nginx.pid")).exists())
            .then_some(())
    });
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Whether the iperf3 server logging to `log` listens for a new test: it writes "Server
/// listening on PORT (test #N)" once its listening socket is open again, and "Accepted
/// connection from ..." when a test's control connection arrives.
fn iperf_ready(log: &std::path::Path) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.matches("Server listening on").count() > text.matches("Accepted connection from").count()
}

//! The controller daemon as operators run it (`mptcp-lb run --config FILE` in the
//! balancer's namespace), against real MPTCP servers on the backends: restarts under
//! load (kill -9), reloads that add and remove backends, bad reloads, health checks
//! (including a backend whose MPTCP is off) and drains from the CLI.

use std::{
    net::IpAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use mptcp_lb_tests::{
    daemon::{Daemon, cli_in},
    netns::{Netns, wait_until},
    privileged,
    testbed::{
        ConnRecord, HEALTH_PORT, Server, Testbed, VIP6, across, alternate, backend_addr4,
        run_clients, serve,
    },
};

fn accepted(servers: &[Server]) -> Vec<usize> {
    servers
        .iter()
        .map(|s| s.accepted.load(Ordering::Relaxed))
        .collect()
}

fn v6(_: usize) -> IpAddr {
    IpAddr::V6(VIP6)
}

const METRICS: &str = "127.0.0.1:9640";

/// GET /metrics from the daemon in `ns`.
fn scrape(ns: &Netns) -> String {
    try_scrape(ns).expect("the metrics endpoint answers 200")
}

/// The value of the sample named exactly `name` (with its labels).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

fn health(kind: &str) -> String {
    format!(
        "{{ kind = \"{kind}\", port = {HEALTH_PORT}, interval_ms = 200, timeout_ms = 150, rise = 2, fall = 3 }}"
    )
}

/// Kill -9 in the middle of 50 MPTCP transfers whose joins are opened while the daemon
/// is dead; a new daemon adopts the pins. Then a reload that removes backend 3 and adds
/// backend 4 under load, and a reload with a bad file.
#[test]
fn restart_under_load_and_reload() {
    if !privileged("restart_under_load_and_reload") {
        return;
    }
    let t0 = Instant::now();
    let tb = Testbed::new("mlb-dmn", 4);
    // Backends announce the IPv6 VIP, so IPv4 connections join across families.
    tb.announce_vip6();
    let servers: Vec<Server> = tb.backends.iter().map(serve).collect();
    for s in &servers {
        s.expect_joins.store(true, Ordering::Relaxed);
    }
    let tag = "dmn";
    let hc = health("mptcp");
    let cfg = |ids: &[usize]| {
        Testbed::daemon_config(tag, &Testbed::service_toml("web", ids, &hc)).replace(
            "[balancer]",
            &format!("[balancer]\nmetrics_listen = \"{METRICS}\""),
        )
    };
    let mut d = Daemon::start(&tb.lb, tag, &cfg(&[1, 2, 3]));
    for i in 1..=3 {
        d.wait_state(
            "web",
            &backend_addr4(i).to_string(),
            "active",
            Duration::from_secs(10),
        );
    }
    let prog = tb
        .lb
        .xdp_prog("lb0")
        .expect("the daemon attached XDP to lb0");

    // 50 MPTCP connections (IPv6), established; their second subflows are opened only
    // once the daemon is dead, and they finish after a new daemon took over.
    tb.client_joins(false);
    let mut during_outage = Vec::new();
    let errors = across(&tb.client, 50, true, v6, || {
        let t = Instant::now();
        d.kill9();
        assert_eq!(
            tb.lb.xdp_prog("lb0"),
            Some(prog),
            "the program stays attached after kill -9"
        );
        tb.client_joins(true);
        // New connections while no daemon runs.
        during_outage = run_clients(&tb.client, 20, 5, true, alternate);
        let served = t.elapsed();
        d.spawn();
        println!(
            "daemon down for {} ms (20 connections served meanwhile in {} ms)",
            t.elapsed().as_millis(),
            served.as_millis()
        );
    });
    assert!(
        errors.is_empty(),
        "{} of 50 failed: {:?}",
        errors.len(),
        errors
    );
    assert!(
        during_outage.is_empty(),
        "connections while the daemon was down: {during_outage:?}"
    );
    let new_prog = tb.lb.xdp_prog("lb0").expect("still attached");
    println!("program {prog} replaced by {new_prog} through the pinned link");
    // Every connection, the held ones included, has both subflows on one backend: a
    // join sent elsewhere would have been reset (no second subflow recorded).
    let recs: Vec<ConnRecord> = servers.iter().flat_map(Server::recorded).collect();
    assert_eq!(recs.len(), 70, "50 held + 20 during the outage");
    for r in &recs {
        assert_eq!(
            r.subflow_families.len(),
            2,
            "a connection lost its join: {r:?}"
        );
    }
    // The daemon's view equals the backends' (issue: CLI shows the tokens they hold).
    let listed = d.json(&["inspect", "tokens", "--json"]);
    let listed: std::collections::HashMap<String, String> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|t| {
            (
                t["token"].as_str().expect("token").to_string(),
                t["backend"].as_str().expect("backend").to_string(),
            )
        })
        .collect();
    for (i, s) in servers.iter().enumerate() {
        for r in s.recorded() {
            let token = format!("{:08x}", r.token);
            assert_eq!(
                listed.get(&token).map(String::as_str),
                Some(backend_addr4(i + 1).to_string().as_str()),
                "token {token} as `inspect tokens` lists it"
            );
        }
    }
    assert_eq!(listed.len(), 70, "exactly the backends' tokens");

    println!("t={} ms", t0.elapsed().as_millis());
    // Reload under load: backend 3 leaves, backend 4 joins (plain TCP from here on).
    for s in &servers {
        s.expect_joins.store(false, Ordering::Relaxed);
    }
    let before = accepted(&servers);
    let status = d.status();
    let reloads = status["reloads"].as_u64().expect("reloads");
    let errors = across(&tb.client, 30, false, alternate, || {
        d.write_config(&cfg(&[1, 2, 4]));
        d.hup();
        wait_until(Duration::from_secs(10), "the reload", || {
            (d.status()["reloads"].as_u64() == Some(reloads + 1)).then_some(())
        });
    });
    let after = accepted(&servers);
    let on_removed = after[2] - before[2];
    println!(
        "reload under load: {} of 30 held connections were on the removed backend, {} failed",
        on_removed,
        errors.len()
    );
    assert_eq!(
        errors.len(),
        on_removed,
        "exactly the connections to the removed backend broke: {errors:?}"
    );
    assert!(on_removed < 30, "some connections were on kept backends");
    d.wait_state(
        "web",
        &backend_addr4(4).to_string(),
        "active",
        Duration::from_secs(10),
    );
    println!("t={} ms", t0.elapsed().as_millis());
    let before = accepted(&servers);
    let errors = run_clients(&tb.client, 60, 6, false, alternate);
    assert!(errors.is_empty(), "{errors:?}");
    let after = accepted(&servers);
    let got: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("60 new connections after the reload: {got:?}");
    assert_eq!(got[2], 0, "the removed backend gets nothing");
    assert!(got[3] > 0, "the added backend takes its share");

    println!("t={} ms", t0.elapsed().as_millis());
    // A bad file: refused, counted, the running configuration stays.
    d.write_config(&cfg(&[1, 2, 4]).replace("hash_seed", "hash_sed"));
    let out = d.cli(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `hash_sed`"), "{err}");
    let s = d.status();
    assert_eq!(s["reload_failures"], 1);
    assert!(
        s["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("lb.toml")),
        "{s}"
    );
    let errors = run_clients(&tb.client, 10, 5, false, alternate);
    assert!(errors.is_empty(), "still forwarding: {errors:?}");
    // The same file again: nothing to rewrite.
    d.write_config(&cfg(&[1, 2, 4]));
    let out = d.cli(&["reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("backends +0 -0") && said.contains(" 0 Maglev slots rewritten"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Metrics: summed dataplane counters, per-backend traffic and health, reloads.
    let text = scrape(&tb.lb);
    for expected in [
        "mptcp_lb_backend_healthy{service=\"web\",backend=\"10.0.14.2\"} 1",
        "mptcp_lb_backend_state{service=\"web\",backend=\"10.0.11.2\",state=\"active\"} 1",
        "mptcp_lb_config_reloads_total 2",
        "mptcp_lb_config_reload_failures_total 1",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    let joins = metric(
        &text,
        "mptcp_lb_dataplane_events_total{event=\"join_routed\"}",
    );
    assert!(joins >= 70, "join_routed {joins}");
    // The removed backend's tokens were dropped with it; the others remain.
    let on_3 = servers[2]
        .recorded()
        .iter()
        .filter(|r| r.token != 0)
        .count() as u64;
    assert_eq!(metric(&text, "mptcp_lb_token_table_entries"), 70 - on_3);
    assert!(
        metric(
            &text,
            "mptcp_lb_backend_packets_total{service=\"web\",backend=\"10.0.14.2\"}"
        ) > 0
    );

    println!("t={} ms", t0.elapsed().as_millis());
    // SIGTERM: a clean exit that leaves the dataplane forwarding.
    assert!(d.term(), "clean exit on SIGTERM");
    assert!(tb.lb.xdp_prog("lb0").is_some());
    let errors = run_clients(&tb.client, 10, 5, true, alternate);
    assert!(errors.is_empty(), "forwarding after SIGTERM: {errors:?}");
    println!("t={} ms", t0.elapsed().as_millis());
    // `mptcp-lb detach` removes it.
    let out = d.cli(&["detach", "--pin-path", d.pin_path.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(5), "the program to detach", || {
        tb.lb.xdp_prog("lb0").is_none().then_some(())
    });
}

/// Health checks: a backend whose MPTCP is off fails `mptcp` but passes `tcp`; a backend
/// whose server stops is down within interval x fall + 1 s and new connections avoid
/// it; it comes back after `rise` successes. Drains from the CLI show at once.
#[test]
fn health_checks_and_drain() {
    if !privileged("health_checks_and_drain") {
        return;
    }
    let tb = Testbed::new("mlb-hlt", 3);
    tb.backends[2].sysctl("net.mptcp.enabled", "0");
    let s1 = serve(&tb.backends[0]);
    let s2 = serve(&tb.backends[1]);
    let _s3 = serve(&tb.backends[2]);
    let tag = "hlt";
    let services = format!(
        "{}\n{}",
        Testbed::service_toml("web", &[1, 2, 3], &health("mptcp")),
        Testbed::service_toml("plain", &[3], &health("tcp"))
            .replace(&format!(":{}/tcp", 80), ":8080/tcp")
    );
    let d = Daemon::start(&tb.lb, tag, &Testbed::daemon_config(tag, &services));
    let (b1, b2, b3) = (
        backend_addr4(1).to_string(),
        backend_addr4(2).to_string(),
        backend_addr4(3).to_string(),
    );
    d.wait_state("web", &b1, "active", Duration::from_secs(10));
    d.wait_state("web", &b2, "active", Duration::from_secs(10));
    d.wait_state("plain", &b3, "active", Duration::from_secs(10));
    // Several intervals later, the MPTCP-less backend is still down for `web`.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(d.backend_state("web", &b3).as_deref(), Some("down"));
    assert!(d.log().contains("fell back to TCP"), "{}", d.log());

    // Backend 2's server stops: down within interval x fall + 1 s = 1.6 s.
    let stopped = Instant::now();
    drop(s2);
    d.wait_state("web", &b2, "down", Duration::from_secs(5));
    let took = stopped.elapsed();
    println!(
        "backend 2 marked down {} ms after its server stopped",
        took.as_millis()
    );
    assert!(took <= Duration::from_millis(200 * 3 + 1000), "{took:?}");
    let before = s1.accepted.load(Ordering::Relaxed);
    let errors = run_clients(&tb.client, 30, 5, true, alternate);
    assert!(
        errors.is_empty(),
        "new connections avoid the down backend: {errors:?}"
    );
    assert_eq!(
        s1.accepted.load(Ordering::Relaxed) - before,
        30,
        "all on backend 1"
    );

    // It comes back after `rise` successes.
    let _s2 = serve(&tb.backends[1]);
    d.wait_state("web", &b2, "active", Duration::from_secs(5));

    // Drain backend 1 from the CLI with connections held open: they complete, new ones
    // go to backend 2 only, and `inspect backends` shows it at once.
    let s1_before = s1.accepted.load(Ordering::Relaxed);
    let errors = across(&tb.client, 20, true, alternate, || {
        let out = d.cli(&["backend", "drain", "web", &b1]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("web {b1}: draining")
        );
        let rows = d.json(&["inspect", "backends", "--json", "--service", "web"]);
        let row = rows
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["address"] == b1.as_str())
            .expect("backend 1 listed")
            .clone();
        assert_eq!(row["state"], "draining");
        assert_eq!(row["drained_by"][0], "operator");
        assert_eq!(row["maglev_slots"], 0);
    });
    assert!(
        errors.is_empty(),
        "held connections survive the drain: {errors:?}"
    );
    let held_on_1 = s1.accepted.load(Ordering::Relaxed) - s1_before;
    let errors = run_clients(&tb.client, 20, 5, true, alternate);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        s1.accepted.load(Ordering::Relaxed) - s1_before,
        held_on_1,
        "no new connection reaches the drained backend"
    );
    // Unknown names are refused with a clear message and a non-zero exit.
    let out = d.cli(&["backend", "drain", "nosuch", &b1]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service named \"nosuch\""));
    let out = d.cli(&["backend", "drain", "web", "10.9.9.9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("service \"web\" has no backend 10.9.9.9")
    );
}

/// Clients of the metrics port cannot take backends down: 600 idle connections against a
/// daemon limited to 256 open files (a local user can open them; anyone, when
/// `metrics_listen` is public) leave every health check running and every backend
/// active, the control socket answering, VIP traffic flowing and the daemon's CPU
/// quiet; the endpoint serves again as soon as they go.
#[test]
fn metrics_connection_flood_takes_no_backend_down() {
    if !privileged("metrics_connection_flood_takes_no_backend_down") {
        return;
    }
    let tb = Testbed::new("mlb-mfl", 2);
    let _s1 = serve(&tb.backends[0]);
    let _s2 = serve(&tb.backends[1]);
    let tag = "mfl";
    let config =
        Testbed::daemon_config(tag, &Testbed::service_toml("web", &[1, 2], &health("tcp")))
            .replacen(
                "[balancer]",
                &format!("[balancer]\nmetrics_listen = \"{METRICS}\""),
                1,
            );
    let mut d = Daemon::prepare(&tb.lb, tag, &config);
    d.nofile = Some(256);
    d.spawn();
    let (b1, b2) = (backend_addr4(1).to_string(), backend_addr4(2).to_string());
    d.wait_state("web", &b1, "active", Duration::from_secs(10));
    d.wait_state("web", &b2, "active", Duration::from_secs(10));

    let cpu_before = cpu_seconds(d.pid());
    let held: Vec<std::net::TcpStream> = tb.lb.within(|| {
        (0..600)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(
                    &METRICS.parse().expect("addr"),
                    Duration::from_secs(1),
                )
                .ok()
            })
            .collect()
    });
    println!("{} idle connections to the metrics port", held.len());
    assert!(
        held.len() > 256,
        "the flood needs more connections than the daemon has files"
    );
    // Five times interval x fall: a backend whose checks failed would be down by now.
    let until = Instant::now() + Duration::from_secs(3);
    let mut polls = 0;
    while Instant::now() < until {
        for b in [&b1, &b2] {
            assert_eq!(
                d.backend_state("web", b).as_deref(),
                Some("active"),
                "backend {b} under a metrics flood:\n{}",
                d.log()
            );
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu = cpu_seconds(d.pid()) - cpu_before;
    println!("{polls} status polls all active; daemon CPU {cpu:.2} s in 3 s");
    assert!(cpu < 0.6, "the daemon spun: {cpu:.2} s of CPU in 3 s");
    assert!(!d.log().contains("health check failed"), "{}", d.log());
    let errors = run_clients(&tb.client, 20, 5, true, alternate);
    assert!(
        errors.is_empty(),
        "VIP traffic during the flood: {errors:?}"
    );

    drop(held);
    let text = wait_until(Duration::from_secs(10), "a scrape after the flood", || {
        let text = try_scrape(&tb.lb)?;
        Some(text)
    });
    let refused = metric(&text, "mptcp_lb_metrics_connections_refused_total");
    println!("metrics connections refused: {refused}");
    assert!(refused > 0, "{text}");
    // Other paths and methods get their own answers.
    assert!(http(&tb.lb, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(
        http(
            &tb.lb,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        .starts_with("HTTP/1.1 405")
    );
}

/// `xdp_mode = "auto"` on a veth (a one-armed balancer, as in every namespace set-up):
/// native XDP attaches there but loses what it sends back out, so auto picks generic,
/// says why in `status`, and VIP traffic flows.
#[test]
fn auto_xdp_mode_on_veth_forwards_and_says_why() {
    if !privileged("auto_xdp_mode_on_veth_forwards_and_says_why") {
        return;
    }
    let tb = Testbed::new("mlb-aut", 1);
    let _server = serve(&tb.backends[0]);
    let tag = "aut";
    let config = Testbed::daemon_config(tag, &Testbed::service_toml("web", &[1], ""))
        .replace("xdp_mode = \"generic\"", "xdp_mode = \"auto\"");
    assert!(config.contains("xdp_mode = \"auto\""));
    let d = Daemon::start(&tb.lb, tag, &config);
    let status = d.status();
    println!(
        "xdp_mode {}: {}",
        status["xdp_mode"], status["xdp_mode_reason"]
    );
    assert_eq!(status["xdp_mode"], "generic");
    assert!(
        status["xdp_mode_reason"]
            .as_str()
            .unwrap_or("")
            .contains("veth"),
        "{status}"
    );
    let errors = run_clients(&tb.client, 20, 5, true, alternate);
    assert!(
        errors.is_empty(),
        "VIP traffic with xdp_mode = auto: {errors:?}"
    );
    let text = String::from_utf8_lossy(&d.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("(XDP generic: auto: generic, because native XDP on veth"),
        "{text}"
    );

    // Running, the daemon holds CAP_BPF and nothing else, in every thread, for good
    // (bounding set, no_new_privs); it still serves, reloads and answers (above, below).
    let pid = d.pid();
    let tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    assert!(tids.len() > 1, "the daemon has its runtime's threads");
    let bpf = 1u64 << lb_userspace::privileges::CAP_BPF;
    for tid in &tids {
        let (eff, bnd, nnp) =
            lb_userspace::privileges::thread_caps(pid, *tid).expect("thread status");
        assert_eq!(
            (eff, bnd, nnp),
            (bpf, bpf, true),
            "thread {tid} of {}",
            tids.len()
        );
    }
    println!(
        "{} threads, each with CapEff = CapBnd = CAP_BPF, no_new_privs",
        tids.len()
    );
    let out = d.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Commands find the instance from its configuration file: no --socket, no
    // --pin-path (this daemon uses neither default).
    for args in [
        vec!["status"],
        vec!["inspect", "services"],
        vec!["backend", "drain", "web", "10.0.11.2"],
    ] {
        let config = d.config.to_str().expect("path");
        let out = cli_in(&tb.lb, &[&args[..], &["--config", config]].concat());
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains("web"),
            "{args:?} --config: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `mptcp-lb service add-vip|remove-vip`: another port for a service without repeating
/// its backends; the file is rewritten (its comments kept), the daemon reloads it, and
/// traffic reaches the new port; with no daemon to apply it, the file is put back.
#[test]
fn a_vip_is_added_and_removed_through_the_file() {
    if !privileged("a_vip_is_added_and_removed_through_the_file") {
        return;
    }
    let tb = Testbed::new("mlb-vip", 1);
    let _server = serve(&tb.backends[0]);
    let tag = "vip";
    let config = format!(
        "# kept by hand\n{}",
        Testbed::daemon_config(tag, &Testbed::service_toml("web", &[1], ""))
    );
    let mut d = Daemon::start(&tb.lb, tag, &config);
    let cfg = d.config.to_str().expect("path").to_string();
    let vip = format!("{}:{HEALTH_PORT}", mptcp_lb_tests::testbed::VIP4);
    let run = |args: &[&str]| {
        let out = cli_in(&tb.lb, args);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, said) = run(&["service", "add-vip", "web", &vip, "--config", &cfg]);
    assert!(ok, "{said}");
    assert!(
        said.contains("reloaded: services +0 -0, backends +0 -0, VIPs +1"),
        "{said}"
    );
    let text = std::fs::read_to_string(&d.config).expect("file");
    assert!(text.starts_with("# kept by hand"), "{text}");
    let status = d.status();
    assert!(
        status["services"][0]["vips"]
            .to_string()
            .contains(&format!("{vip}/tcp")),
        "{status}"
    );
    // The new port is served: a TCP connection to it reaches the backend's listener.
    let reached = tb.client.within(move || {
        std::net::TcpStream::connect_timeout(&vip.parse().expect("addr"), Duration::from_secs(3))
            .is_ok()
    });
    assert!(reached, "a connection to the added VIP port");
    let vip = format!("{}:{HEALTH_PORT}", mptcp_lb_tests::testbed::VIP4);
    let (ok, said) = run(&["service", "add-vip", "web", &vip, "--config", &cfg]);
    assert!(!ok && said.contains("already has VIP"), "{said}");
    let (ok, said) = run(&["service", "remove-vip", "web", &vip, "--config", &cfg]);
    assert!(ok && said.contains("VIPs +0 -1"), "{said}");
    assert_eq!(
        std::fs::read_to_string(&d.config).expect("file"),
        text.replace(&format!(", \"{vip}/tcp\""), "")
    );

    // No daemon to apply it: the file is put back as it was.
    assert!(d.term());
    let before = std::fs::read_to_string(&d.config).expect("file");
    let (ok, said) = run(&["service", "add-vip", "web", &vip, "--config", &cfg]);
    assert!(!ok && said.contains("is back as it was"), "{said}");
    assert_eq!(std::fs::read_to_string(&d.config).expect("file"), before);
}

/// Under systemd (`Type=notify`), the daemon says READY=1 only once it forwards and
/// answers its socket, RELOADING=1 then READY=1 around a SIGHUP reload, and STOPPING=1
/// on SIGTERM: read here from a socket standing in for systemd's.
#[test]
fn the_service_manager_hears_ready_reloading_and_stopping() {
    if !privileged("the_service_manager_hears_ready_reloading_and_stopping") {
        return;
    }
    let tb = Testbed::new("mlb-ntf", 1);
    let _server = serve(&tb.backends[0]);
    let tag = "ntf";
    let mut d = Daemon::prepare(
        &tb.lb,
        tag,
        &Testbed::daemon_config(tag, &Testbed::service_toml("web", &[1], "")),
    );
    let path = d.dir.join("notify");
    let listener = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    d.notify_socket = Some(path);
    let next = || {
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).expect("a message from the daemon");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // The first message is READY, and when it arrives the control socket answers.
    let socket = d.socket.clone();
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            let ready = next();
            let answers = std::os::unix::net::UnixStream::connect(&socket).is_ok();
            (ready, answers)
        });
        d.spawn();
        let (ready, answers) = first.join().expect("thread");
        assert!(
            ready.starts_with("READY=1\nSTATUS=forwarding on lb0"),
            "{ready}"
        );
        assert!(answers, "READY=1 came before the control socket answered");
    });
    assert!(d.status()["program_id"].as_u64() > Some(0));
    d.hup();
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1");
    assert!(d.term());
    assert_eq!(next(), "STOPPING=1");
}

/// A reload whose map writes fail halfway (a write failure made on demand in this debug
/// build) is refused and rolled back: the daemon reports and forwards with the running
/// configuration, not half of the new one; the next reload applies it whole. A health
/// verdict whose write failed is applied at the next check.
#[test]
fn failed_writes_are_rolled_back_or_retried() {
    if !privileged("failed_writes_are_rolled_back_or_retried") {
        return;
    }
    let tb = Testbed::new("mlb-fpt", 3);
    let servers: Vec<Server> = tb.backends.iter().map(serve).collect();
    let tag = "fpt";
    let two = Testbed::daemon_config(tag, &Testbed::service_toml("web", &[1, 2], ""));
    let mut d = Daemon::prepare(&tb.lb, tag, &two);
    // The first apply is the start-up's; the second is the reload below.
    d.env.push(("MPTCP_LB_FAILPOINT".into(), "apply:2".into()));
    d.spawn();
    d.write_config(&Testbed::daemon_config(
        tag,
        &Testbed::service_toml("web", &[1, 2, 3], ""),
    ));
    let out = d.cli(&["reload"]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the failed reload was reported as applied"
    );
    assert!(
        said.contains("the running configuration was re-applied"),
        "{said}"
    );
    let listed = |d: &Daemon| -> Vec<String> {
        d.json(&["inspect", "backends", "--json"])
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| r["address"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let b3 = backend_addr4(3).to_string();
    assert!(
        !listed(&d).contains(&b3),
        "backend 3 half-installed: {:?}",
        listed(&d)
    );
    assert_eq!(d.backend_state("web", &b3), None, "status claims backend 3");
    let before = accepted(&servers);
    let errors = run_clients(&tb.client, 30, 5, false, alternate);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        accepted(&servers)[2],
        before[2],
        "backend 3 got connections"
    );
    // Applied whole the next time.
    let out = d.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listed(&d).contains(&b3));
    assert!(d.term());
    let out = d.cli(&["detach", "--pin-path", d.pin_path.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Health: the first state change's write fails; the next check applies it.
    let tag = "fpt2";
    let mut h = Daemon::prepare(
        &tb.lb,
        tag,
        &Testbed::daemon_config(tag, &Testbed::service_toml("web", &[1], &health("tcp"))),
    );
    h.env
        .push(("MPTCP_LB_FAILPOINT".into(), "set-bits:1".into()));
    h.spawn();
    h.wait_state(
        "web",
        &backend_addr4(1).to_string(),
        "active",
        Duration::from_secs(10),
    );
    assert!(
        h.log().contains("retrying at the next check"),
        "{}",
        h.log()
    );
}

/// User plus system CPU seconds of process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which ends with the last ')').
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 here.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// One request `req` to the metrics port; the whole answer ("" when it failed).
fn http(ns: &Netns, req: &str) -> String {
    let req = req.to_string();
    ns.within(move || {
        use std::io::{Read as _, Write as _};
        let Ok(mut s) = std::net::TcpStream::connect(METRICS) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(req.as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

fn try_scrape(ns: &Netns) -> Option<String> {
    let out = http(
        ns,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    out.starts_with("HTTP/1.1 200 OK").then_some(out)
}

/// One daemon per dataplane: a second `mptcp-lb run` on the same pin path (its own
/// control socket and service) refuses to start before it touches anything, and the
/// first keeps its maps, program and traffic; `detach` refuses while a daemon holds the
/// link. SIGHUPs sent while a daemon starts (`systemctl reload` right after a restart)
/// do not kill it.
#[test]
fn one_daemon_per_pin_path_and_hangups_during_start_up() {
    if !privileged("one_daemon_per_pin_path_and_hangups_during_start_up") {
        return;
    }
    let tb = Testbed::new("mlb-one", 1);
    let _server = serve(&tb.backends[0]);
    let tag = "one";
    let mut a = Daemon::start(
        &tb.lb,
        tag,
        &Testbed::daemon_config(tag, &Testbed::service_toml("alpha", &[1], "")),
    );
    let prog = tb.lb.xdp_prog("lb0").expect("attached");

    // A second daemon on the same pin path.
    let (b_dir, b_socket, b_pins) = Daemon::paths("one-b");
    let _ = std::fs::remove_dir_all(&b_dir);
    std::fs::create_dir_all(&b_dir).expect("dir");
    let b_config = b_dir.join("lb.toml");
    let text = Testbed::daemon_config("one-b", &Testbed::service_toml("beta", &[1], "")).replace(
        b_pins.to_str().expect("utf-8"),
        a.pin_path.to_str().expect("utf-8"),
    );
    assert!(text.contains(b_socket.to_str().expect("utf-8")));
    std::fs::write(&b_config, text).expect("config");
    let started = Instant::now();
    let out = tb.lb.try_run(&[
        mptcp_lb_tests::daemon::binary().to_str().expect("utf-8"),
        "run",
        "--config",
        b_config.to_str().expect("utf-8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second daemon ran: {err}");
    assert!(err.contains("already runs on this pin path"), "{err}");
    println!(
        "the second daemon refused in {} ms",
        started.elapsed().as_millis()
    );
    let services = a.json(&["inspect", "services", "--json"]);
    let names: Vec<&str> = services
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["alpha"], "the first daemon's services");
    assert_eq!(
        tb.lb.xdp_prog("lb0"),
        Some(prog),
        "the program was not replaced"
    );
    let errors = run_clients(&tb.client, 5, 5, false, alternate);
    assert!(errors.is_empty(), "{errors:?}");

    // detach while the daemon holds the link: refused, still attached.
    let out = a.cli(&["detach", "--pin-path", a.pin_path.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "detach went ahead: {err}");
    assert!(err.contains("stop it first"), "{err}");
    assert_eq!(tb.lb.xdp_prog("lb0"), Some(prog));

    // Hangups during start-up.
    a.kill9();
    let (hups, ready_when_caught) = a.spawn_hupping();
    println!("{hups} SIGHUPs during start-up");
    assert!(
        !ready_when_caught,
        "the daemon caught SIGHUP only once its start-up was over"
    );
    assert!(hups > 0);
    // The hangups sent during the start-up are acted on once it is ready: a reload.
    wait_until(
        Duration::from_secs(5),
        "a reload for the SIGHUPs of the start-up",
        || (a.status()["reloads"].as_u64() >= Some(1)).then_some(()),
    );
    let errors = run_clients(&tb.client, 5, 5, false, alternate);
    assert!(errors.is_empty(), "{errors:?}");
    let _ = std::fs::remove_dir_all(&b_dir);
}

//! What a newcomer and an operator run first: the demo, the testbed's up/down cycle, and
//! `cargo xtask deploy` into a namespace, twice, under load, without a forwarding gap.

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Instant,
};

use mptcp_lb_tests::{
    daemon::binary,
    netns::namespaces,
    privileged,
    testbed::{Testbed, VIP4, alternate, run_clients, serve},
};

fn lab(args: &[&str]) -> (bool, String) {
    outcome(Command::new(env!("CARGO_BIN_EXE_lab")).args(args))
}

/// Whether `cmd` succeeded, and what it printed (standard output, then error).
fn outcome(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run a command");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_demo_shows_affinity_on_and_resets_off() {
    if !privileged("the_demo_shows_affinity_on_and_resets_off") {
        return;
    }
    let started = Instant::now();
    let (ok, out) = lab(&["demo"]);
    println!("{out}");
    // The rows that went wrong go into the failure message itself, so a CI summary that
    // keeps only the message still says what happened.
    let on_phase = out
        .lines()
        .skip_while(|l| !l.contains("awareness ON"))
        .take_while(|l| !l.starts_with("=>"));
    let bad: Vec<&str> = on_phase
        .filter(|l| !l.contains("ok: both"))
        .chain(out.lines().filter(|l| l.starts_with("lab:")))
        .collect();
    assert!(ok, "the demo failed: {bad:#?}");
    assert!(
        out.contains("RESULT: awareness on: 20/20 connections fully on one backend"),
        "{out}"
    );
    assert!(
        out.contains("JOIN RESET"),
        "awareness off shows resets: {out}"
    );
    assert!(namespaces("mlb-demo-").is_empty(), "the demo tears down");
    println!("demo took {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn testbed_up_twice_then_down_leaves_nothing() {
    if !privileged("testbed_up_twice_then_down_leaves_nothing") {
        return;
    }
    let (ok, out) = lab(&["up"]);
    assert!(ok, "{out}");
    let (ok, out) = lab(&["up"]);
    assert!(ok, "up twice in a row: {out}");
    let (ok, out) = lab(&["status"]);
    assert!(ok, "{out}");
    assert!(out.contains("mlb-tb-lb") && out.contains("web"), "{out}");
    let pids = testbed_pids();
    assert_eq!(pids.len(), 4, "three servers and the daemon");
    let (ok, out) = lab(&["down"]);
    assert!(ok, "{out}");
    assert!(namespaces("mlb-tb-").is_empty(), "namespaces left: {out}");
    assert_gone(&pids);
}

/// `demo --lb-nodes 3`: the fleet behind BGP and ECMP, every join held when steered by
/// port, joins lost when steered by token; nothing left afterwards.
#[test]
fn the_fleet_demo_holds_every_join_by_port_and_loses_some_by_token() {
    if !privileged("the_fleet_demo_holds_every_join_by_port_and_loses_some_by_token") {
        return;
    }
    let (ok, out) = lab(&["demo", "--lb-nodes", "3"]);
    println!("{out}");
    let by_port = out
        .lines()
        .skip_while(|l| !l.contains("steered by PORT"))
        .take_while(|l| !l.starts_with("=>"));
    let bad: Vec<&str> = by_port
        .filter(|l| !l.contains("ok: both") && !l.starts_with('#') && !l.contains("by PORT"))
        .chain(out.lines().filter(|l| l.starts_with("lab:")))
        .collect();
    assert!(ok, "the fleet demo failed: {bad:#?}");
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(
        out.contains("RESULT: fleet of 3 nodes: joins steered by port: 20/20 connections fully on one backend"),
        "{out}"
    );
    assert!(
        out.contains("JOIN LOST"),
        "steering by token loses joins: {out}"
    );
    // Each node carried first subflows.
    for k in 1..=3 {
        assert!(
            out.contains(&format!(" via lb{k} ")),
            "node {k} carried nothing: {out}"
        );
    }
    // Per row of the port phase: the node holding the first subflow's entry, then the
    // nodes the router's ECMP gave each subflow. The first two agree (the table is
    // right about the router); joins often reached another node, and were held anyway.
    let mut crossed = 0;
    for row in out
        .lines()
        .skip_while(|l| !l.contains("steered by PORT"))
        .take_while(|l| !l.starts_with("=>"))
        .filter(|l| l.contains("ok: both"))
    {
        let nodes: Vec<&str> = row
            .split(" via lb")
            .skip(1)
            .map(|t| t.split(|c: char| !c.is_ascii_digit()).next().unwrap_or(""))
            .collect();
        assert_eq!(nodes.len(), 3, "{row}");
        assert_eq!(
            nodes[0], nodes[1],
            "the table and the router disagree: {row}"
        );
        if nodes[2] != nodes[1] {
            crossed += 1;
        }
    }
    println!("{crossed} of 20 joins reached another node than their connection's first subflow");
    assert!(
        crossed > 0,
        "no join crossed nodes: the demo shows nothing: {out}"
    );
    assert!(namespaces("mlb-demo-").is_empty(), "the demo tears down");
    let birds = Command::new("pgrep")
        .args(["-f", "mptcp-lb-bgp-mlb-demo"])
        .output()
        .expect("pgrep");
    assert!(birds.stdout.is_empty(), "BGP speakers left behind");
}

/// `testbed up --lb-nodes 2` then `down`: the fleet's daemons and BGP speakers go too.
#[test]
fn fleet_testbed_up_then_down_leaves_nothing() {
    if !privileged("fleet_testbed_up_then_down_leaves_nothing") {
        return;
    }
    let (ok, out) = lab(&["up", "--lb-nodes", "2"]);
    assert!(ok, "{out}");
    assert!(out.contains("mptcp-lb running on 2 nodes"), "{out}");
    let pids = testbed_pids();
    assert_eq!(
        pids.len(),
        3 + 2 + 3,
        "three servers, two daemons, three BGP speakers"
    );
    let (ok, out) = lab(&["down"]);
    assert!(ok, "{out}");
    assert!(namespaces("mlb-tb-").is_empty(), "namespaces left: {out}");
    assert_gone(&pids);
}

/// The processes `testbed up` started, from its pid file.
fn testbed_pids() -> Vec<String> {
    std::fs::read_to_string("/run/mptcp-lb-testbed/pids")
        .expect("pid file")
        .lines()
        .map(String::from)
        .collect()
}

/// None of `pids` runs any more.
fn assert_gone(pids: &[String]) {
    for p in pids {
        // A killed child of ours is a zombie until reaped by init; check its state.
        let state = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let alive = !state.is_empty() && !state.contains(") Z ");
        assert!(!alive, "process {p} left behind");
    }
}

fn xtask() -> PathBuf {
    let bin = binary().with_file_name("xtask");
    assert!(
        bin.exists(),
        "{} missing: cargo build -p xtask",
        bin.display()
    );
    bin
}

fn deploy(config: &str, prefix: &str) -> String {
    let (ok, text) = try_deploy(config, prefix);
    assert!(ok, "deploy failed:\n{text}");
    text
}

fn try_deploy(config: &str, prefix: &str) -> (bool, String) {
    let out = Command::new(xtask())
        .args([
            "deploy",
            "--iface",
            "lb0",
            "--mode",
            "generic",
            "--netns",
            "mlb-dep-lb",
            "--config",
            config,
            "--prefix",
            prefix,
            "--binary",
        ])
        .arg(binary())
        .output()
        .expect("xtask deploy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn deploy_into_a_namespace_then_upgrade_without_a_gap() {
    if !privileged("deploy_into_a_namespace_then_upgrade_without_a_gap") {
        return;
    }
    let tb = Testbed::new("mlb-dep", 3);
    let _servers: Vec<_> = tb.backends.iter().map(serve).collect();
    let prefix = "/tmp/mlb-deploy-test";
    let _ = std::fs::remove_dir_all(prefix);
    let config = format!("{prefix}.toml");
    std::fs::write(
        &config,
        Testbed::daemon_config("dep", &Testbed::service_toml("web", &[1, 2, 3], ""))
            .replace("interface = \"lb0\"", "interface = \"eth9\""),
    )
    .expect("config");

    // A refused file installs nothing: no binary, no configuration.
    let bad = format!("{prefix}-bad.toml");
    let good_text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &bad,
        good_text.replace("[[service.backend]]\n", "[[service.backend]]\nweight = 0\n"),
    )
    .expect("bad config");
    let installed_config = format!("{prefix}/etc/mptcp-lb/mptcp-lb-mlb-dep-lb.toml");
    let installed_bin = format!("{prefix}/bin/mptcp-lb");
    let (ok, out) = try_deploy(&bad, prefix);
    assert!(!ok, "a bad configuration deployed:\n{out}");
    assert!(
        out.contains("nothing was installed") && out.contains("weight: 0 is out of range"),
        "{out}"
    );
    assert!(!std::path::Path::new(&installed_config).exists(), "{out}");
    assert!(!std::path::Path::new(&installed_bin).exists(), "{out}");

    // --iface overrides the file's interface; the daemon reports the program attached.
    let first = deploy(&config, prefix);
    println!("{first}");
    assert!(first.contains("attached to lb0 (XDP generic)"), "{first}");
    assert!(
        first.contains("started the daemon in the background"),
        "{first}"
    );
    let errors = run_clients(&tb.client, 30, 5, false, alternate);
    assert!(errors.is_empty(), "{errors:?}");

    // Deployed once, a refused file changes nothing: same file, same daemon.
    let pid_file = format!("{prefix}/var/run/mptcp-lb/mptcp-lb-mlb-dep-lb.pid");
    let pid = std::fs::read_to_string(&pid_file).expect("pid file");
    let installed = std::fs::read_to_string(&installed_config).expect("installed config");
    let (ok, out) = try_deploy(&bad, prefix);
    assert!(!ok, "{out}");
    assert_eq!(
        std::fs::read_to_string(&installed_config).expect("config"),
        installed
    );
    assert_eq!(std::fs::read_to_string(&pid_file).expect("pid"), pid);
    let pid: i32 = pid.trim().parse().expect("pid");
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the daemon still runs");
    let _ = std::fs::remove_file(&bad);

    // Deploy again while clients keep connecting: not one connection fails.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, done) = (stop.clone(), done.clone());
        let client = tb.client.name().to_string();
        std::thread::spawn(move || {
            let ns = mptcp_lb_tests::netns::Netns::existing(&client);
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                errors.extend(run_clients(&ns, 8, 4, true, alternate));
                done.fetch_add(8, Ordering::Relaxed);
            }
            errors
        })
    };
    let before = done.load(Ordering::Relaxed);
    let second = deploy(&config, prefix);
    let during = done.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    let errors = load.join().expect("load thread");
    println!("{second}");
    println!(
        "{during} connections completed while the second deploy ran; {} failed overall",
        errors.len()
    );
    assert!(
        second.contains("upgraded in place through the pinned link"),
        "{second}"
    );
    assert!(second.contains("previous daemon"), "{second}");
    assert!(
        errors.is_empty(),
        "connections failed during the upgrade: {errors:?}"
    );
    assert!(during > 0, "the load ran during the upgrade");

    // A pid file naming another process (the daemon died, the pid was reused) gets no
    // SIGTERM from undeploy.
    let daemon_pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    let mut bystander = Command::new("sleep").arg("60").spawn().expect("sleep");
    std::fs::write(&pid_file, format!("{}\n", bystander.id())).expect("pid file");
    // The daemon no longer has a pid file: stop it the way an operator would.
    // SAFETY: kill on the daemon's pid read from its own pid file.
    unsafe { libc::kill(daemon_pid, libc::SIGTERM) };
    mptcp_lb_tests::netns::wait_until(
        std::time::Duration::from_secs(10),
        "the daemon to exit",
        // SAFETY: signal 0 only checks that the process exists.
        || (unsafe { libc::kill(daemon_pid, 0) } != 0).then_some(()),
    );

    // Undeploy: the program is gone.
    assert!(tb.lb.xdp_prog("lb0").is_some(), "attached before undeploy");
    let out = Command::new(xtask())
        .args(["undeploy", "--netns", "mlb-dep-lb", "--prefix", prefix])
        .output()
        .expect("undeploy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    mptcp_lb_tests::netns::wait_until(
        std::time::Duration::from_secs(5),
        "the program to detach",
        || tb.lb.xdp_prog("lb0").is_none().then_some(()),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("not this instance's daemon: not signalled"),
        "{said}"
    );
    assert!(
        bystander.try_wait().expect("wait").is_none(),
        "undeploy killed an unrelated process whose pid was in the pid file"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    let _ = std::fs::remove_dir_all(prefix);
    let _ = std::fs::remove_file(&config);
}

fn xtask_run(args: &[&str]) -> (bool, String) {
    outcome(Command::new(xtask()).args(args))
}

/// A fleet set up the way an operator would: `cargo xtask deploy --bgp-neighbor` on two
/// nodes (daemon and BIRD each; the router's BGP is the testbed's), `cargo xtask
/// deploy-backend` on the backends (decapsulation, C bit, join ports). The router
/// learns both nodes, 40 MPTCP connections keep both subflows on their backend, and
/// undeploying a node withdraws it.
#[test]
fn deploy_a_fleet_node_with_bgp_and_the_backends() {
    if !privileged("deploy_a_fleet_node_with_bgp_and_the_backends") {
        return;
    }
    let tb = Testbed::fleet_without_node_bgp("mlb-fdp", 2, 2);
    let servers: Vec<_> = tb.backends.iter().map(serve).collect();
    for s in &servers {
        s.expect_joins
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let prefix = "/tmp/mlb-fleet-deploy";
    let _ = std::fs::remove_dir_all(prefix);
    std::fs::create_dir_all(prefix).expect("prefix");
    // Joins steered by port, and the tokens (for clients without the C bit) from the
    // backends' agents as well as from clients.
    let mut service = Testbed::service_toml("web", &[1, 2], "").replacen(
        "[[service.backend]]",
        "join_steering = \"port\"\nlearn_tokens = \"both\"\n[[service.backend]]",
        1,
    );
    let key = format!("{prefix}/announce.key");
    std::fs::write(
        &key,
        "a key that the fleet deploy test shares, 64 bytes of it, ok\n",
    )
    .expect("key");
    for i in 1..=2 {
        let a = format!(
            "address = \"{}\"\n",
            mptcp_lb_tests::testbed::backend_addr4(i)
        );
        service = service.replace(&a, &format!("{a}join_port = {}\n", 20000 + i));
    }
    let bin = binary();
    let bin = bin.to_str().expect("path");
    for k in 1..=2 {
        let tag = format!("fdp{k}");
        let file = format!("{prefix}/node{k}.toml");
        let config = Testbed::node_config(&tag, k, &service).replacen(
            "[balancer]\n",
            &format!(
                "[balancer]\ntoken_announcements_listen = \"0.0.0.0:7400\"\ntoken_announcements_key_file = \"{key}\"\n"
            ),
            1,
        );
        std::fs::write(&file, config).expect("file");
        let (a4, a6) = mptcp_lb_tests::testbed::node_addrs(k);
        let (g4, g6) = (
            std::net::Ipv4Addr::from(u32::from(a4) - 1).to_string(),
            std::net::Ipv6Addr::from(u128::from(a6) - 1).to_string(),
        );
        let ns = tb.node(k).name().to_string();
        let (ok, out) = xtask_run(&[
            "deploy",
            "--iface",
            "lb0",
            "--mode",
            "generic",
            "--netns",
            &ns,
            "--config",
            &file,
            "--prefix",
            prefix,
            "--binary",
            bin,
            "--bgp-neighbor",
            &g4,
            "--bgp-neighbor",
            &g6,
        ]);
        println!("{out}");
        assert!(ok, "node {k}: {out}");
        assert!(
            out.contains("BGP speaker (BIRD) started: AS 65001"),
            "{out}"
        );
    }
    tb.wait_next_hops(2, std::time::Duration::from_secs(30));

    // The backends: the testbed's own decapsulation goes (its pins removed), so the
    // traffic below depends on what deploy-backend attached.
    for (i, be) in tb.backends.iter().enumerate() {
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/mlb-fdp/be{}", i + 1));
        let backend = mptcp_lb_tests::testbed::backend_addr4(i + 1).to_string();
        let nodes: Vec<String> = (1..=2)
            .map(|k| format!("{}:7400", mptcp_lb_tests::testbed::node_addrs(k).0))
            .collect();
        let (ok, out) = xtask_run(&[
            "deploy-backend",
            "--iface",
            "eth0",
            "--netns",
            be.name(),
            "--config",
            &format!("{prefix}/node1.toml"),
            "--prefix",
            &format!("{prefix}/be{}", i + 1),
            "--binary",
            bin,
            "--backend",
            &backend,
            "--announce-to",
            &nodes[0],
            "--announce-to",
            &nodes[1],
            "--announce-key",
            &key,
        ]);
        println!("{out}");
        assert!(ok, "backend {}: {out}", i + 1);
        assert!(out.contains("decapsulation attached to eth0"), "{out}");
        assert!(out.contains("token agent started"), "{out}");
        assert!(
            out.contains(&format!("announced {VIP4}:{}", 20001 + i)),
            "{out}"
        );
    }
    tb.client.run(&[
        "ip", "mptcp", "endpoint", "add", "10.1.2.2", "dev", "cell0", "subflow", "fullmesh",
    ]);
    let errors = run_clients(&tb.client, 40, 8, true, alternate);
    assert!(errors.is_empty(), "{errors:?}");
    for (i, s) in servers.iter().enumerate() {
        let recs = s.records.lock().expect("records").clone();
        assert!(!recs.is_empty(), "backend {} served nothing", i + 1);
        for r in recs {
            assert_eq!(r.subflow_families.len(), 2, "backend {}: {r:?}", i + 1);
        }
    }

    // Both nodes hear both backends' agents.
    for k in 1..=2 {
        let file = format!("{prefix}/node{k}.toml");
        mptcp_lb_tests::netns::wait_until(
            std::time::Duration::from_secs(20),
            "every agent heard",
            || {
                let out = mptcp_lb_tests::daemon::cli_in(
                    tb.node(k),
                    &["status", "--json", "--config", &file],
                );
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                (v["token_announcements"]["agents"].as_array()?.len() == 2).then_some(())
            },
        );
    }

    // Undeploy node 2: its daemon, dataplane, BIRD and announcements go.
    let ns2 = tb.node(2).name().to_string();
    let (ok, out) = xtask_run(&["undeploy", "--netns", &ns2, "--prefix", prefix]);
    println!("{out}");
    assert!(ok, "{out}");
    tb.wait_next_hops(1, std::time::Duration::from_secs(15));
    let ns1 = tb.node(1).name().to_string();
    let (ok, out) = xtask_run(&["undeploy", "--netns", &ns1, "--prefix", prefix]);
    assert!(ok, "{out}");
    for (i, be) in tb.backends.iter().enumerate() {
        let (ok, out) = xtask_run(&[
            "undeploy-backend",
            "--iface",
            "eth0",
            "--netns",
            be.name(),
            "--prefix",
            &format!("{prefix}/be{}", i + 1),
        ]);
        println!("{out}");
        assert!(ok, "{out}");
        assert!(out.contains("C bit cleared"), "{out}");
        assert!(out.contains("token agent (pid"), "{out}");
        assert!(be.xdp_prog("eth0").is_none(), "decapsulation detached");
    }
    let _ = std::fs::remove_dir_all(prefix);
}

//! `mptcp-lb inspect` against maps that packets filled: a handshake that learns a token,
//! a join that follows it, a plain connection, run through BPF_PROG_TEST_RUN on a pinned
//! dataplane. The CLI (the real binary) must show exactly those entries. Then every
//! error case: message and exit code.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{Command, Output},
};

use lb_common::maps::{BackendMeta, SERVICE_NAME_LEN, ServiceMeta};
use lb_userspace::{dataplane::Dataplane, pins};
use mptcp_lb_tests::{
    daemon::binary,
    fixture::{XDP_TX, run_once},
    packets::*,
    privileged,
    testenv::*,
};

const ROOT: &str = "/sys/fs/bpf/mlb-cli-test";

fn cli(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("run mptcp-lb")
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--json", "--pin-path", ROOT]);
    let out = cli(&all);
    assert!(
        out.status.success(),
        "mptcp-lb {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Runs `args`, expects exit code 1 and `message` in the one-line error.
fn refused(args: &[&str], message: &str) {
    let out = cli(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "mptcp-lb {args:?}: {err}");
    assert!(
        err.contains(message),
        "mptcp-lb {args:?}: {err:?} lacks {message:?}"
    );
    assert!(err.starts_with("mptcp-lb: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

fn sha256_token(key: u64) -> u32 {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(key.to_be_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

#[test]
fn inspect_shows_exactly_what_packets_put_in_the_maps() {
    if !privileged("inspect_shows_exactly_what_packets_put_in_the_maps") {
        return;
    }
    let _ = pins::remove(Path::new(ROOT));
    let env = environment("cli");
    let ifindex = env.ifindex;
    let server_key = 0x7a9c_3840_1a72_f870u64;
    let token = sha256_token(server_key);
    let owner: u32 = env.ns.within(move || {
        let (mut dp, _) = Dataplane::load_pinned(TEST_SIZES, Path::new(ROOT)).expect("load");
        let ring = configure(&mut dp);
        dp.add_vip(v6(vip6(6)), 80, 6, 5).expect("vip6");
        // Name service 5 and its backends, as the daemon records them.
        let mut name = [0u8; SERVICE_NAME_LEN];
        name[..7].copy_from_slice(b"fixture");
        dp.maps
            .service_meta
            .set(
                5,
                ServiceMeta {
                    name,
                    in_use: 1,
                    _pad: 0,
                },
                0,
            )
            .expect("meta");
        for m in maglev_members() {
            let meta = BackendMeta {
                service: 5,
                weight: 1,
                ..Default::default()
            };
            dp.maps.backend_meta.set(m.id, meta, 0).expect("meta");
        }
        let owner = ring[(lb_common::hash::flow_hash(&key4(CLIENT4, vip4(6), 41000, 80, 6), SEED)
            % RING) as usize];
        let key = mp_capable_keys(1, 20, 0x1111_2222_3333_4444, server_key);
        for p in [
            tcp4(CLIENT4, vip4(6), 41000, 80, SYN, &MP_CAPABLE_SYN_V1, &[]),
            tcp4(CLIENT4, vip4(6), 41000, 80, ACK, &key, &[]),
            tcp6(CLIENT6, vip6(6), 42000, 80, SYN, &mp_join_syn(token), &[]),
            tcp4(OTHER4, vip4(6), 43000, 80, SYN, &[], &[]),
        ] {
            assert_eq!(run_once(dp.program(), &p, ifindex).0, XDP_TX);
        }
        owner
    });
    let owner_addr = MAGLEV_BES[(owner - 5) as usize];
    let owner_addr = IpAddr::from(owner_addr).to_string();
    let tok = format!("{token:08x}");
    let (vip4s, vip6s) = (
        format!("{}:80", Ipv4Addr::from(vip4(6))),
        format!("[{}]:80", Ipv6Addr::from(vip6(6))),
    );

    // Tokens: exactly the one learned, for the backend the handshake went to.
    let tokens = json(&["inspect", "tokens"]);
    let rows = tokens.as_array().expect("array");
    assert_eq!(rows.len(), 1, "{tokens}");
    assert_eq!(rows[0]["token"], tok.as_str());
    assert_eq!(rows[0]["service"], "fixture");
    assert_eq!(rows[0]["backend"], owner_addr.as_str());
    assert_eq!(rows[0]["version"], 1);

    // Connections: the first subflow, the join, the plain connection.
    let conns = json(&["inspect", "conns"]);
    let got: BTreeSet<(String, String, String, String, String)> = conns
        .as_array()
        .expect("array")
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("-").to_string();
            (s("client"), s("vip"), s("kind"), s("token"), s("service"))
        })
        .collect();
    let client6 = format!("[{}]:42000", Ipv6Addr::from(CLIENT6));
    let want: BTreeSet<(String, String, String, String, String)> = [
        ("192.0.2.10:41000", &vip4s, "mptcp-learned", tok.as_str()),
        (client6.as_str(), &vip6s, "mptcp-join", tok.as_str()),
        ("198.51.100.1:43000", &vip4s, "plain", "-"),
    ]
    .iter()
    .map(|(c, v, k, t)| {
        (
            c.to_string(),
            v.to_string(),
            k.to_string(),
            t.to_string(),
            "fixture".to_string(),
        )
    })
    .collect();
    assert_eq!(got, want, "{conns}");

    // One token: its subflows are the two connection entries carrying it.
    let one = json(&["inspect", "token", &tok]);
    assert_eq!(one["backend"], owner_addr.as_str());
    assert_eq!(one["subflows"].as_array().expect("subflows").len(), 2);
    for s in one["subflows"].as_array().expect("subflows") {
        assert_eq!(
            s["backend"],
            owner_addr.as_str(),
            "every subflow on the owner"
        );
    }
    // Filters.
    assert_eq!(
        json(&["inspect", "conns", "--token", &tok])
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(
        json(&["inspect", "conns", "--limit", "1"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        json(&["inspect", "conns", "--backend", &owner_addr])
            .as_array()
            .map(Vec::len),
        Some(
            2 + usize::from(
                conns
                    .as_array()
                    .expect("a")
                    .iter()
                    .any(|c| c["kind"] == "plain" && c["backend"] == owner_addr.as_str())
            )
        )
    );
    // Counters, services, Maglev shares.
    let stats = json(&["inspect", "stats"]);
    assert_eq!(stats["token_learned_v1"], 1);
    assert_eq!(stats["join_routed"], 1);
    let services = json(&["inspect", "services"]);
    let fixture = services
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["name"] == "fixture")
        .expect("service listed");
    assert_eq!(fixture["packets"], 4);
    let maglev = json(&["inspect", "maglev", "fixture"]);
    let slots: u64 = maglev["backends"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["slots"].as_u64().expect("slots"))
        .sum();
    assert_eq!(slots, u64::from(RING));
    assert_eq!(maglev["backends"].as_array().map(Vec::len), Some(3));
    // Human output: aligned tables with people's notation.
    let out = cli(&["inspect", "tokens", "--pin-path", ROOT]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("TOKEN "), "{text}");
    assert!(
        text.contains(&tok) && text.contains(&owner_addr) && text.contains("v1"),
        "{text}"
    );

    // Errors: one line, exit code 1.
    refused(
        &["inspect", "token", "zz", "--pin-path", ROOT],
        "malformed token \"zz\"",
    );
    refused(
        &["inspect", "token", "123456789", "--pin-path", ROOT],
        "malformed token",
    );
    refused(
        &["inspect", "token", "0badf00d", "--pin-path", ROOT],
        "token 0badf00d is not in the token table",
    );
    refused(
        &["inspect", "maglev", "nosuch", "--pin-path", ROOT],
        "no service named \"nosuch\"",
    );
    refused(
        &[
            "inspect",
            "tokens",
            "--pin-path",
            "/sys/fs/bpf/mlb-nothing-here",
        ],
        "no pinned maps under /sys/fs/bpf/mlb-nothing-here/v",
    );
    let other = "/sys/fs/bpf/mlb-cli-other";
    let _ = std::fs::remove_dir_all(other);
    std::fs::create_dir_all(format!("{other}/v1")).expect("mkdir");
    refused(
        &["inspect", "conns", "--pin-path", other],
        "holds pins of another mptcp-lb layout (v1)",
    );
    let _ = std::fs::remove_dir_all(other);
    refused(
        &["status", "--socket", "/tmp/mlb-no-daemon.sock"],
        "no daemon answers on /tmp/mlb-no-daemon.sock",
    );
    // Not root: as nobody.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary())
        .args(["inspect", "tokens", "--pin-path", ROOT])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs root"), "{err}");

    pins::remove(Path::new(ROOT)).expect("unpin");
}

/// `check --config` outside the balancer's namespace: the interface check says where it
/// checked and what to do; `--no-host-checks` validates the file alone. Needs no root.
#[test]
fn check_says_where_it_looked_and_can_validate_the_file_alone() {
    let dir = std::env::temp_dir().join(format!("mlb-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("lb.toml");
    std::fs::write(
        &file,
        "[balancer]\ninterface = \"nosuch-if0\"\nsource_v4 = \"192.0.2.1\"\n\n\
         [[service]]\nname = \"web\"\nvips = [\"203.0.113.10:443/tcp\"]\n\
         [[service.backend]]\naddress = \"10.0.1.11\"\n",
    )
    .expect("write");
    let path = file.to_str().expect("utf-8");
    let out = cli(&["check", "--config", path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for expected in [
        "balancer.interface: no interface named \"nosuch-if0\"",
        "this host's network namespace",
        "--no-host-checks",
    ] {
        assert!(err.contains(expected), "{expected:?} missing from: {err}");
    }
    let out = cli(&["check", "--config", path, "--no-host-checks"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("valid (1 services, 1 backends); not checked against this host"),
        "{said}"
    );
    // A file that is wrong in itself is still refused without host checks.
    std::fs::write(&file, "[balancer]\ninterface = \"x\"\nring_size = 65536\n").expect("write");
    let out = cli(&["check", "--config", path, "--no-host-checks"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("balancer.ring_size: 65536 is not prime")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ip netns exec NS mptcp-lb inspect ...` sees no bpffs (it remounts /sys): the CLI says
/// so and what works, instead of suggesting the balancer is not running.
#[test]
fn inspect_under_ip_netns_exec_says_why_it_sees_no_pins() {
    if !privileged("inspect_under_ip_netns_exec_says_why_it_sees_no_pins") {
        return;
    }
    let ns = mptcp_lb_tests::netns::Netns::new("mlb-cli-nsexec");
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(binary())
        .args(["inspect", "services", "--pin-path", "/sys/fs/bpf/mptcp-lb"])
        .output()
        .expect("ip netns exec");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`ip netns exec` remounts /sys") && err.contains("nsenter --net="),
        "{err}"
    );
    // Through nsenter the same command reaches the bpffs: the usual diagnosis.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .arg("--")
        .arg(binary())
        .args([
            "inspect",
            "services",
            "--pin-path",
            "/sys/fs/bpf/mlb-cli-none",
        ])
        .output()
        .expect("nsenter");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the balancer running"), "{err}");
}

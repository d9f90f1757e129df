//! `cargo xtask bench`: nanoseconds per packet of the balancer, per traffic class, beside
//! the floors measured in the same run.
//!
//! Method (../shared/PLATFORM.md): BPF_PROG_TEST_RUN does not reset the packet between
//! repeats, and the balancer rewrites it (encapsulation). So the measured program is a
//! wrapper, `bench_balancer`, that first restores the original frame from a map, then
//! runs the very same `balance()` function. Each iteration can also get a new source
//! address (new-flow classes then really insert into the table every time) or a new
//! server key (the learning class then derives a new token every time). The wrapper's
//! own cost is measured per class as `bench_reset` with that class's frame (restore,
//! variation, relearn reset, then XDP_PASS): the class's floor. A bare XDP_PASS program
//! gives the absolute floor. The time is the kernel's (per iteration, averaged over
//! `BENCH_REPEAT`, default 1,000); the table shows the median over the calls (`BENCH_CALLS`, default 30),
//! and the verdict of every call is checked. The calls are interleaved (one call of every
//! class per round), so the machine's drift during a run moves all rows alike.
//! `BENCH_FULL=1` fills the tables first, so that every measured insert evicts.

use aya::{
    maps::Array,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{
    maps::{BENCH_FRAME, BenchFrame, FlowKey, MAP_BENCH, TokenEntry},
    mptcp::token_v1,
};
use lb_userspace::{
    dataplane::{Dataplane, Sizes},
    loader,
};
use mptcp_lb_tests::{
    fixture::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, run_once, verdict_name},
    packets::*,
    testenv::*,
};

/// Calls per class; `BENCH_CALLS` raises it (e.g. to profile one class with perf).
fn calls() -> usize {
    std::env::var("BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}
/// Iterations per call (`BENCH_REPEAT`, default 1,000). At the defaults a class makes
/// 32k new flows at most: a table of 1M never has to evict on a host with up to 32 CPUs
/// (each CPU owns 1/CPUs of a connection table), unless `BENCH_FULL`.
fn repeat() -> u32 {
    std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}
/// `BENCH_FULL=1`: before the calls, fill the IPv4 and IPv6 connection tables and the
/// token table past their size, so that every insert measured evicts, as on a busy
/// balancer whose tables stay full. By default they never fill (see [`repeat`]).
fn full_tables() -> bool {
    std::env::var("BENCH_FULL").is_ok_and(|v| v == "1")
}

/// Offsets in an untagged IPv4 frame: source address; low half of the server key in a
/// third ACK built by `mp_capable_keys` (options at 54: NOP NOP 30 20 ver flags ckey skey).
const IPV4_SRC: u32 = 26;
const IPV6_SRC_LAST: u32 = 34;
const SERVER_KEY_LOW: u32 = 72;

struct Class {
    name: &'static str,
    /// The measured program: the balancer behind the wrapper, or one part of it alone.
    prog: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    vary_off: u32,
    relearn: Option<FlowKey>,
    /// `Config::max_conn_rate` while this class runs. By default `u32::MAX`: the guard
    /// is on, as the daemon runs it (it reads the clock for every new flow), and never
    /// reached; 1 for the classes over the limit.
    max_conn_rate: u32,
    katran: Option<u32>,
}

struct Row {
    name: &'static str,
    /// Per-iteration nanoseconds of every call, sorted.
    ns: Vec<f64>,
    /// The wrapper alone with this class's frame (restore, vary, relearn reset).
    floor: Option<Vec<f64>>,
    /// Per round, in order: the call's time minus its floor's (taken just before it).
    net_by_round: Vec<f64>,
    katran: Option<u32>,
}

fn class(
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    vary_off: u32,
    katran: Option<u32>,
) -> Class {
    Class {
        name,
        prog: loader::PROG_BENCH_BALANCER,
        frame,
        verdict,
        vary_off,
        relearn: None,
        max_conn_rate: u32::MAX,
        katran,
    }
}

/// Sets the flood guard to `max_conn_rate` and turns the learning limit on (the
/// daemon's default is 10,000 a second per CPU) where it is never reached: both read
/// the clock as they do in service.
fn set_limits(dp: &mut Dataplane, max_conn_rate: u32) {
    let mut cfg = dp.maps.config.get(&0, 0).expect("config");
    cfg.max_conn_rate = max_conn_rate;
    cfg.max_learn_rate = u32::MAX;
    dp.set_config(cfg).expect("config");
}

/// Per-iteration nanoseconds of one call of `repeat()` iterations; the verdict is checked.
fn call(prog: &Xdp, frame: &[u8], ifindex: u32, verdict: u32, name: &str) -> f64 {
    call_n(prog, frame, ifindex, verdict, name, repeat())
}

/// [`call`] with `repeat` iterations.
fn call_n(prog: &Xdp, frame: &[u8], ifindex: u32, verdict: u32, name: &str, repeat: u32) -> f64 {
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&md),
        repeat,
        ..Default::default()
    };
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    assert_eq!(
        r.return_value,
        verdict,
        "{name}: {} instead of {}",
        verdict_name(r.return_value),
        verdict_name(verdict)
    );
    // The kernel reports the mean over the repeats.
    r.duration.as_nanos() as f64
}

/// Puts class `c`'s frame and variation, starting at `seq`, where the wrapper restores it
/// from, and sets the limits it runs with; returns the frame.
fn set_frame(dp: &mut Dataplane, c: &Class, seq: u32) -> Vec<u8> {
    set_limits(dp, c.max_conn_rate);
    let frame = padded(c.frame.clone());
    let mut bytes = [0u8; BENCH_FRAME];
    bytes[..frame.len()].copy_from_slice(&frame);
    let b = BenchFrame {
        len: frame.len() as u32,
        vary_off: c.vary_off,
        relearn: u32::from(c.relearn.is_some()),
        seq,
        flow: c.relearn.unwrap_or_default(),
        bytes,
    };
    let mut m: Array<_, BenchFrame> =
        Array::try_from(dp.ebpf.map_mut(MAP_BENCH).expect("bench map")).expect("bench map type");
    m.set(0, b, 0).expect("bench frame");
    frame
}

/// `BENCH_FULL`: fills the IPv4 and IPv6 connection tables (`conn_entries` each) and the
/// token table with 1/8 more new entries than they hold, from the upper half of the
/// varied field's range, which no class uses (theirs stay below 2^31 at any sane
/// `BENCH_CALLS` and `BENCH_REPEAT`). Every CPU in turn makes its part: a connection
/// table keeps a list per CPU (`BPF_F_NO_COMMON_LRU`), `1/CPUs` of the entries each, and a
/// CPU evicts only once its own share is full. Done before the flow state the classes
/// start from is set up, which the filling would otherwise evict.
fn fill_tables(dp: &mut Dataplane, ifindex: u32, conn_entries: u32) {
    // SAFETY: a zeroed cpu_set_t that sched_getaffinity fills in for this thread.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the call writes at most size_of_val(&allowed) bytes.
    let got = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&allowed), &mut allowed) };
    assert_eq!(got, 0, "sched_getaffinity");
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set within its size.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &allowed) })
        .collect();
    let stride = 0x8000_0000 / cpus.len() as u32;
    for (n, &cpu) in cpus.iter().enumerate() {
        pin_to_cpu(cpu);
        fill_tables_here(
            dp,
            ifindex,
            conn_entries,
            0x8000_0000 + n as u32 * stride,
            cpus.len() as u32,
            stride,
        );
    }
    // SAFETY: the set read above, for this thread; the call only reads it.
    let set = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&allowed), &allowed) };
    assert_eq!(set, 0, "sched_setaffinity");
}

/// This CPU's part of [`fill_tables`]: 1/`cpus` of each table's fill, from `base` on,
/// within `stride` values of the varied field.
fn fill_tables_here(
    dp: &mut Dataplane,
    ifindex: u32,
    conn_entries: u32,
    base: u32,
    cpus: u32,
    stride: u32,
) {
    let token_insert = Class {
        prog: loader::PROG_BENCH_TOKEN_INSERT,
        ..class(
            "token table",
            tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &[], &[]),
            XDP_PASS,
            0,
            None,
        )
    };
    for (c, size) in [
        (
            class(
                "IPv4 connection table",
                tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &[], &[]),
                XDP_TX,
                IPV4_SRC,
                None,
            ),
            conn_entries,
        ),
        (
            class(
                "IPv6 connection table",
                tcp6(CLIENT6, vip6(4), 40000, 80, SYN, &[], &[]),
                XDP_REDIRECT,
                IPV6_SRC_LAST,
                None,
            ),
            conn_entries,
        ),
        (token_insert, lb_common::maps::DEFAULT_TOKEN_ENTRIES),
    ] {
        let frame = set_frame(dp, &c, base);
        let n = (size + size / 8).div_ceil(cpus);
        assert!(
            n <= stride,
            "BENCH_FULL: too many CPUs for the fill's range"
        );
        call_n(
            bench_program(dp, c.prog),
            &frame,
            ifindex,
            c.verdict,
            c.name,
            n,
        );
    }
}

fn bench_program<'a>(dp: &'a Dataplane, name: &str) -> &'a Xdp {
    dp.ebpf
        .program(name)
        .expect("bench program")
        .try_into()
        .expect("xdp")
}

fn bench_program_mut<'a>(dp: &'a mut Dataplane, name: &str) -> &'a mut Xdp {
    dp.ebpf
        .program_mut(name)
        .expect("bench program")
        .try_into()
        .expect("xdp")
}

fn padded(mut frame: Vec<u8>) -> Vec<u8> {
    // Trailing bytes after the IP packet are ignored by everyone (its length says so).
    while !frame.len().is_multiple_of(8) {
        frame.push(0);
    }
    assert!(frame.len() <= BENCH_FRAME);
    frame
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench: needs root (BPF_PROG_TEST_RUN and a network namespace)");
        std::process::exit(1);
    }
    let env = environment("bench");
    let ifindex = env.ifindex;
    let (rows, verified) = env.ns.within(move || {
        let mut bare = loader::open().expect("object");
        let pass: &mut Xdp = bare
            .program_mut(loader::PROG_PASS)
            .expect("xdp_pass")
            .try_into()
            .expect("xdp");
        pass.load().expect("load xdp_pass");

        // Both connection tables (IPv4, IPv6) get the same size, 1M unless told otherwise.
        let conn_entries = std::env::var("BENCH_CONN_ENTRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(lb_common::maps::DEFAULT_CONN_ENTRIES);
        let mut dp = Dataplane::load(Sizes {
            ring_size: RING,
            conn_entries,
            conn6_entries: conn_entries,
            ..Default::default()
        })
        .expect("load balancer");
        configure(&mut dp);
        for name in [
            loader::PROG_BENCH_BALANCER,
            loader::PROG_BENCH_RESET,
            loader::PROG_BENCH_SHA256,
            loader::PROG_BENCH_TOKEN_INSERT,
        ] {
            bench_program_mut(&mut dp, name)
                .load()
                .expect("load bench program");
        }
        // How close the programs are to the verifier's limit: the wrapper inlines the
        // whole balancer, and a change that doubles its states fails to load.
        let verified: Vec<(&'static str, u32)> =
            [loader::PROG_BALANCER, loader::PROG_BENCH_BALANCER]
                .into_iter()
                .map(|name| {
                    let count = bench_program(&dp, name)
                        .info()
                        .ok()
                        .and_then(|i| i.verified_instruction_count())
                        .unwrap_or(0);
                    (name, count)
                })
                .collect();

        if full_tables() {
            fill_tables(&mut dp, ifindex, conn_entries);
        }
        // Flow state the hit and learning classes start from.
        let ack = tcp4(
            CLIENT4,
            vip4(1),
            40001,
            80,
            ACK,
            &[],
            b"GET / HTTP/1.1\r\n\r\n",
        );
        assert_eq!(
            run_once(
                dp.program(),
                &tcp4(CLIENT4, vip4(1), 40001, 80, SYN, &[], &[]),
                ifindex
            )
            .0,
            XDP_TX
        );
        let syn_mp = tcp4(CLIENT4, vip4(6), 41000, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
        assert_eq!(run_once(dp.program(), &syn_mp, ifindex).0, XDP_TX);
        let learn_flow = FlowKey {
            src: [u32::from_ne_bytes(CLIENT4), 0, 0, 0],
            dst: [u32::from_ne_bytes(vip4(6)), 0, 0, 0],
            sport: 41000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        };
        // An MPTCP connection whose token is learned: its packets refresh the token.
        let mp_ack = |flags, opts: &[u8], payload: &[u8]| {
            tcp4(CLIENT4, vip4(6), 41001, 80, flags, opts, payload)
        };
        for (frame, what) in [
            (mp_ack(SYN, &MP_CAPABLE_SYN_V1, &[]), "its SYN"),
            (
                mp_ack(
                    ACK,
                    &mp_capable_keys(1, 20, 0x2222, 0x5eed_0000_0000_0001),
                    &[],
                ),
                "its third ACK",
            ),
        ] {
            assert_eq!(run_once(dp.program(), &frame, ifindex).0, XDP_TX, "{what}");
        }
        let known = token_v1(0x7a9c_3840_1a72_f870);
        let now = lb_userspace::inspect::monotonic_ns();
        let entry = TokenEntry {
            backend: 5,
            service: 5,
            learned_ns: now,
            last_seen_ns: now,
            version: 1,
            origin: lb_common::maps::TOKEN_FROM_CLIENT,
        };
        dp.maps
            .tokens
            .set(known, &entry, lb_common::maps::DEFAULT_TOKEN_IDLE_NS);

        // A service steering its joins by port: the Maglev service's backends behind VIP
        // 10.100.0.9, with join ports 20005-20007. Its v1 handshakes learn nothing.
        dp.set_vip(
            v4(vip4(9)),
            80,
            6,
            lb_common::maps::VipInfo {
                service: 5,
                flags: lb_common::maps::VIP_STEERS_BY_PORT,
            },
        )
        .expect("steered VIP");
        for id in 5..=7u32 {
            dp.set_vip(
                v4(vip4(9)),
                20000 + id as u16,
                6,
                lb_common::maps::VipInfo::join_port(5, id),
            )
            .expect("join port");
        }
        let steered = |flags, opts: &[u8]| tcp4(CLIENT4, vip4(9), 41002, 80, flags, opts, &[]);
        assert_eq!(
            run_once(dp.program(), &steered(SYN, &MP_CAPABLE_SYN_V1), ifindex).0,
            XDP_TX
        );

        // A SYN as Linux sends it: MSS, SACK permitted, timestamps, NOP, window scale.
        let mut linux_syn_opts = vec![
            2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        let plain_opts = linux_syn_opts.clone();
        linux_syn_opts.extend_from_slice(&MP_CAPABLE_SYN_V1);
        // An MP_JOIN SYN as Linux sends it: the same options, then MP_JOIN.
        let linux_join = |token: u32| {
            let mut o = plain_opts.clone();
            o.extend_from_slice(&mp_join_syn(token));
            o
        };

        let mut classes = vec![
            class(
                "non-VIP, passed to the host",
                tcp4(CLIENT4, OTHER4, 40000, 22, ACK, &[], &[]),
                XDP_PASS,
                0,
                Some(72),
            ),
            class(
                "TCP SYN, one 5-tuple (entry rewritten)",
                tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &[], &[]),
                XDP_TX,
                0,
                None,
            ),
            Class {
                max_conn_rate: 1,
                ..class(
                    "TCP SYN over the SYN-flood limit (no insert)",
                    tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &[], &[]),
                    XDP_TX,
                    IPV4_SRC,
                    Some(277),
                )
            },
            class(
                "TCP SYN, new flow (table insert)",
                tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &[], &[]),
                XDP_TX,
                IPV4_SRC,
                None,
            ),
            class(
                "TCP SYN with Linux's options, new flow",
                tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &plain_opts, &[]),
                XDP_TX,
                IPV4_SRC,
                None,
            ),
            class("established ACK (table hit)", ack, XDP_TX, 0, Some(159)),
            class(
                "established ACK, MPTCP (token kept fresh)",
                mp_ack(ACK, &[], b"GET / HTTP/1.1\r\n\r\n"),
                XDP_TX,
                0,
                None,
            ),
            class(
                "IPv6 SYN, one 5-tuple (IP6IP6)",
                tcp6(CLIENT6, vip6(4), 40000, 80, SYN, &[], &[]),
                XDP_REDIRECT,
                0,
                None,
            ),
            Class {
                max_conn_rate: 1,
                ..class(
                    "IPv6 SYN over the SYN-flood limit (no insert)",
                    tcp6(CLIENT6, vip6(4), 40000, 80, SYN, &[], &[]),
                    XDP_REDIRECT,
                    IPV6_SRC_LAST,
                    Some(300),
                )
            },
            class(
                "IPv6 SYN, new flow (IP6IP6)",
                tcp6(CLIENT6, vip6(4), 40000, 80, SYN, &[], &[]),
                XDP_REDIRECT,
                IPV6_SRC_LAST,
                None,
            ),
            class(
                "MP_CAPABLE SYN (Linux options), new flow",
                tcp4(CLIENT4, vip4(6), 40000, 80, SYN, &linux_syn_opts, &[]),
                XDP_TX,
                IPV4_SRC,
                None,
            ),
            class(
                "ACK that learns a token (SHA-256 in BPF)",
                tcp4(
                    CLIENT4,
                    vip4(6),
                    41000,
                    80,
                    ACK,
                    &mp_capable_keys(1, 20, 0x1111, 0x7a9c_0000_0000_0000),
                    &[],
                ),
                XDP_TX,
                SERVER_KEY_LOW,
                None,
            ),
            // The learning ACK's two big parts, each alone behind the same wrapper.
            Class {
                prog: loader::PROG_BENCH_SHA256,
                ..class(
                    "  its part: SHA-256 of a key, alone",
                    tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &[], &[]),
                    XDP_PASS,
                    0,
                    None,
                )
            },
            Class {
                prog: loader::PROG_BENCH_TOKEN_INSERT,
                ..class(
                    "  its part: token-table insert, alone",
                    tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &[], &[]),
                    XDP_PASS,
                    0,
                    None,
                )
            },
            class(
                "MP_JOIN SYN (Linux options), known token",
                tcp4(OTHER4, vip4(6), 40000, 80, SYN, &linux_join(known), &[]),
                XDP_TX,
                IPV4_SRC,
                None,
            ),
            class(
                "MP_JOIN SYN (Linux options), unknown: dropped",
                tcp4(
                    OTHER4,
                    vip4(6),
                    40000,
                    80,
                    SYN,
                    &linux_join(0xdead_beef),
                    &[],
                ),
                XDP_DROP,
                IPV4_SRC,
                None,
            ),
            class(
                "MP_CAPABLE SYN, service steering by port",
                tcp4(CLIENT4, vip4(9), 40000, 80, SYN, &linux_syn_opts, &[]),
                XDP_TX,
                IPV4_SRC,
                None,
            ),
            class(
                "ACK with keys, steering by port (no learning)",
                steered(ACK, &mp_capable_keys(1, 20, 0x1111, 0x7a9c_0000_0000_0000)),
                XDP_TX,
                0,
                None,
            ),
            class(
                "MP_JOIN SYN (Linux options) to a join port",
                tcp4(
                    OTHER4,
                    vip4(9),
                    40000,
                    20006,
                    SYN,
                    &linux_join(0xdead_beef),
                    &[],
                ),
                XDP_TX,
                IPV4_SRC,
                None,
            ),
        ];
        let learning = classes
            .iter()
            .position(|c| c.name.starts_with("ACK that learns"))
            .expect("learning class");
        classes[learning].relearn = Some(learn_flow);

        let reset_frame = padded(tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &[], &[]));
        let reset_class = class(
            "restore only (floor of this method)",
            reset_frame.clone(),
            XDP_PASS,
            IPV4_SRC,
            None,
        );
        // `BENCH_ONLY=substring` measures only the classes whose name contains it.
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let selected: Vec<&Class> = classes
            .iter()
            .filter(|c| c.name.contains(only.as_str()))
            .collect();
        // `BENCH_FRAMES_OUT=dir` writes every selected class's frame and how it is varied,
        // so another program can be measured with the very same frames (the closing notes'
        // side-by-side runs against Katran use it; see README "Performance").
        if let Ok(dir) = std::env::var("BENCH_FRAMES_OUT") {
            dump_frames(std::path::Path::new(&dir), &reset_class, &selected);
        }
        // `BENCH_PIN=dir` (on a bpffs): pins the wrapper, its floor and LB_BENCH there with
        // the flow state above in place, prints the interface index the calls must pass
        // (also written to `$BENCH_FRAMES_OUT/ifindex`: a bpffs holds no plain files),
        // then waits for its standard input to close, the namespace kept alive: another
        // program running in it (nsenter --net=/run/netns/mlb-bench) can then call the
        // very same programs call by call beside its own (the side-by-side runs against
        // Katran do).
        if let Ok(dir) = std::env::var("BENCH_PIN") {
            // The limits as the classes run them (none of them over a limit).
            set_limits(&mut dp, u32::MAX);
            let dir = std::path::Path::new(&dir);
            std::fs::create_dir_all(dir).expect("pin directory");
            for name in [loader::PROG_BENCH_BALANCER, loader::PROG_BENCH_RESET] {
                bench_program_mut(&mut dp, name)
                    .pin(dir.join(name))
                    .expect("pin program");
            }
            dp.ebpf
                .map(MAP_BENCH)
                .expect("bench map")
                .pin(dir.join(MAP_BENCH))
                .expect("pin map");
            if let Ok(frames) = std::env::var("BENCH_FRAMES_OUT") {
                std::fs::write(
                    std::path::Path::new(&frames).join("ifindex"),
                    ifindex.to_string(),
                )
                .expect("ifindex");
            }
            println!(
                "pinned in {} (ifindex {ifindex}); close standard input to end",
                dir.display()
            );
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
            let _ = std::fs::remove_dir_all(dir);
            // The namespaces go with the next run (`Netns::new` removes a leftover).
            std::process::exit(0);
        }
        // Each class gets its own range of the varied field, so a "new flow" class never
        // meets entries another class left in the table.
        let span = (calls() as u32 + 2) * repeat();
        // Calls are interleaved: round after round, every class (and its floor) gets one
        // call, so a drift of the machine's speed during the run (common on a VM) moves
        // all rows alike and the rows stay comparable with each other.
        // The wrapper alone (restore, vary, relearn reset, then XDP_PASS) with a frame.
        let floor = |dp: &Dataplane, frame: &[u8], name: &str| {
            call(
                bench_program(dp, loader::PROG_BENCH_RESET),
                frame,
                ifindex,
                XDP_PASS,
                name,
            )
        };
        let mut bare = Vec::new();
        let mut restore = Vec::new();
        let mut ns = vec![Vec::new(); selected.len()];
        let mut floors = vec![Vec::new(); selected.len()];
        for round in 0..calls() as u32 + 2 {
            let warm = round >= 2;
            let t = call(pass, &reset_frame, ifindex, XDP_PASS, "floor");
            if warm {
                bare.push(t);
            }
            let frame = set_frame(&mut dp, &reset_class, round * repeat());
            let t = floor(&dp, &frame, reset_class.name);
            if warm {
                restore.push(t);
            }
            for (i, c) in selected.iter().enumerate() {
                let seq = (i as u32 + 1) * span + round * repeat();
                // The wrapper's own work for this class: restore its frame, vary it, reset
                // its flow for relearning, then XDP_PASS. It records nothing, so the
                // balancer's call then reuses the same range of the varied field.
                let frame = set_frame(&mut dp, c, seq);
                let f = floor(&dp, &frame, c.name);
                set_frame(&mut dp, c, seq);
                let t = call(
                    bench_program(&dp, c.prog),
                    &frame,
                    ifindex,
                    c.verdict,
                    c.name,
                );
                if warm {
                    floors[i].push(f);
                    ns[i].push(t);
                }
            }
        }
        let sorted = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
            v
        };
        let mut rows = vec![
            Row {
                name: "bare XDP_PASS program (absolute floor)",
                ns: sorted(bare),
                floor: None,
                net_by_round: Vec::new(),
                katran: Some(15),
            },
            Row {
                name: reset_class.name,
                ns: sorted(restore),
                floor: None,
                net_by_round: Vec::new(),
                katran: None,
            },
        ];
        for ((c, t), f) in selected.iter().zip(ns).zip(floors) {
            rows.push(Row {
                name: c.name,
                net_by_round: t.iter().zip(&f).map(|(t, f)| t - f).collect(),
                ns: sorted(t),
                floor: Some(sorted(f)),
                katran: c.katran,
            });
        }
        (rows, verified)
    });

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "mptcp-lb dataplane: kernel {}, BPF_PROG_TEST_RUN through a resetting wrapper, {} interleaved calls x {} iterations per class{}",
        kernel.trim(),
        calls(),
        repeat(),
        if full_tables() {
            "; tables full before the calls (BENCH_FULL): every insert evicts"
        } else {
            ""
        }
    );
    println!(
        "verifier, instructions processed (limit 1,000,000): {}",
        verified
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{:<46} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "class", "median", "min", "floor", "net", "Katran"
    );
    let median = |ns: &[f64]| ns[ns.len() / 2];
    for r in &rows {
        let m = median(&r.ns);
        let (floor, net) = match &r.floor {
            Some(f) => (
                format!("{:.0}ns", median(f)),
                format!("{:.0}ns", m - median(f)),
            ),
            None => (String::from("-"), String::from("-")),
        };
        let k = r.katran.map_or(String::from("-"), |k| format!("{k}ns"));
        println!(
            "{:<46} {m:>6.0}ns {:>6.0}ns {floor:>8} {net:>8} {k:>8}",
            r.name, r.ns[0]
        );
    }
    let find = |prefix: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(prefix))
            .map(|r| median(&r.ns))
    };
    println!();
    if let (Some(join), Some(syn), Some(linux)) = (
        find("MP_JOIN SYN (Linux options), known"),
        find("TCP SYN, new flow"),
        find("TCP SYN with Linux's options"),
    ) {
        println!(
            "MP_JOIN SYN with a known token: {:.2}x a TCP SYN (new flow), {:.2}x a SYN with the same \
             Linux options (new flow); target 1.2x",
            join / syn,
            join / linux
        );
    }
    // Net times of two classes as a ratio paired by round (their calls ran within
    // milliseconds of each other), the median over the rounds: a fast or slow spell of
    // the VM then moves both sides of each ratio alike.
    let paired = |a: &str, b: &str| -> Option<f64> {
        let by_round = |p: &str| {
            rows.iter()
                .find(|r| r.name.starts_with(p))
                .map(|r| &r.net_by_round)
        };
        let (ra, rb) = (by_round(a)?, by_round(b)?);
        let mut v: Vec<f64> = ra
            .iter()
            .zip(rb)
            .filter(|(_, y)| **y > 0.0)
            .map(|(x, y)| x / y)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    if let Some(r) = paired("ACK that learns", "TCP SYN, new flow") {
        println!(
            "ACK that learns a token: {r:.2}x a TCP SYN (new flow), net, paired by round; goal at most 2.0x"
        );
    }
    if let Some(r) = paired(
        "ACK with keys, steering by port",
        "established ACK (table hit)",
    ) {
        println!(
            "ACK with keys of a service steering by port: {r:.2}x an established ACK (it learns nothing)"
        );
    }
    let net = |prefix: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(prefix))
            .and_then(|r| r.floor.as_ref().map(|f| median(&r.ns) - median(f)))
    };
    if let (Some(ack), Some(sha), Some(insert)) = (
        net("established ACK (table hit)"),
        net("  its part: SHA-256"),
        net("  its part: token-table insert"),
    ) {
        println!(
            "  net of their floors: established ACK {ack:.0}ns + SHA-256 {sha:.0}ns + token insert \
             {insert:.0}ns = {:.0}ns",
            ack + sha + insert
        );
    }
    // What one connection costs the balancer in its first packets, by kind.
    let sum = |parts: &[&str]| -> Option<f64> { parts.iter().map(|p| net(p)).sum() };
    if let (Some(plain), Some(token), Some(port)) = (
        sum(&["TCP SYN, new flow", "established ACK (table hit)"]),
        sum(&[
            "MP_CAPABLE SYN (Linux options), new flow",
            "ACK that learns a token",
            "MP_JOIN SYN (Linux options), known token",
        ]),
        sum(&[
            "MP_CAPABLE SYN, service steering by port",
            "ACK with keys, steering by port",
            "MP_JOIN SYN (Linux options) to a join port",
        ]),
    ) {
        println!(
            "per connection (net): plain TCP (SYN + ACK) {plain:.0}ns; MPTCP by token (SYN + learning \
             ACK + join) {token:.0}ns = {:.2}x; MPTCP by port (SYN + ACK + join) {port:.0}ns = {:.2}x",
            token / plain,
            port / plain
        );
    }
    maglev_build_times();
    table_memory(&env.ns);
    println!();
    for line in [
        "median, min: per-iteration time over the calls. floor: the wrapper alone with that class's",
        "frame (restore, per-iteration variation, relearn reset); net: median minus floor.",
        "one 5-tuple: the same frame every iteration (a SYN rewrites its own entry); new flow: a new",
        "source address every iteration (a fresh insert into the 1M-entry table each time).",
        "over the SYN-flood limit: max_conn_rate reached, so the SYN is forwarded but not recorded.",
        "established ACK, MPTCP: a subflow whose token is learned; it looks the token up (to keep it",
        "alive) at most once per 64 kernel ticks: within a call, at most its first iteration does.",
        "steering by port: a service whose backends set the C bit and announce join ports; its v1",
        "handshake ACK hits the table and learns nothing; a join SYN to a join port records nothing.",
        "its part ... alone: the wrapper, then only SHA-256 of a new key (or only the insert of a new",
        "token into the 1M-entry token table, as learning does it), then XDP_PASS.",
        "Katran: median ns from ../shared/PLATFORM.md, measured when the bare XDP_PASS floor was",
        "15ns (compare the first row). Over the SYN-flood limit, Katran also skips its LRU insert",
        "(above 125k new connections a second per CPU). Katran run side by side: README.md.",
    ] {
        println!("{line}");
    }
    if full_tables() {
        println!(
            "BENCH_FULL: the connection tables and the token table were filled past their size \
             first, as on a busy balancer: every insert evicts an entry (by default they never fill)."
        );
    } else {
        println!(
            "tables: never full in this run (a busy balancer's are): BENCH_FULL=1 fills them first."
        );
    }
}

/// One file per class (`NN.bin`, the padded frame) and `classes.tsv`: index, verdict,
/// offset varied per iteration (0: none), SYN-flood limit, name.
fn dump_frames(dir: &std::path::Path, reset: &Class, classes: &[&Class]) {
    std::fs::create_dir_all(dir).expect("frames directory");
    let mut tsv = String::from("index\tverdict\tvary_off\tmax_conn_rate\tname\n");
    for (i, c) in std::iter::once(reset)
        .chain(classes.iter().copied())
        .enumerate()
    {
        std::fs::write(dir.join(format!("{i:02}.bin")), padded(c.frame.clone())).expect("frame");
        tsv.push_str(&format!(
            "{i:02}\t{}\t{}\t{}\t{}\n",
            verdict_name(c.verdict),
            c.vary_off,
            c.max_conn_rate,
            c.name
        ));
    }
    std::fs::write(dir.join("classes.tsv"), tsv).expect("classes.tsv");
}

/// The kernel memory (memlock, as /proc/PID/fdinfo reports it) of the three big tables
/// at the sizes of the goal: 8M IPv4 connections and 2M tokens (and the IPv6
/// connection table at 1M). Loaded with the whole object, as the daemon loads them.
fn table_memory(ns: &mptcp_lb_tests::netns::Netns) {
    const V4: u32 = 8 << 20;
    const V6: u32 = 1 << 20;
    const TOKENS: u32 = 2 << 20;
    let sizes = Sizes {
        ring_size: lb_common::maps::DEFAULT_RING_SIZE,
        conn_entries: V4,
        conn6_entries: V6,
        token_entries: TOKENS,
    };
    let mem = ns.within(move || {
        let dp = Dataplane::load(sizes).expect("load with the goal's sizes");
        let mut mem = std::collections::HashMap::new();
        for entry in std::fs::read_dir("/proc/self/fdinfo").expect("fdinfo") {
            let text =
                std::fs::read_to_string(entry.expect("fdinfo entry").path()).unwrap_or_default();
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:"))
                && let Ok(info) = aya::maps::MapInfo::from_id(id as u32)
                && let Some(name) = info.name_as_str()
            {
                mem.insert(name.to_string(), bytes);
            }
        }
        drop(dp);
        mem
    });
    let get = |name: &str| mem.get(name).copied().unwrap_or(0);
    let (v4, v6, tokens) = (
        get(lb_common::maps::MAP_CONNS4),
        get(lb_common::maps::MAP_CONNS),
        get(lb_common::maps::MAP_TOKENS),
    );
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "table memory (kernel memlock): IPv4 connections {:.1} B/entry, IPv6 {:.1}, tokens {:.1}; \
         8M IPv4 connections + 2M tokens = {:.3} GiB (goal within 1 GiB); with 1M IPv6 connections {:.3} GiB",
        v4 as f64 / f64::from(V4),
        v6 as f64 / f64::from(V6),
        tokens as f64 / f64::from(TOKENS),
        gib(v4 + tokens),
        gib(v4 + tokens + v6)
    );
}

/// How long the controller takes to build one service's Maglev table (ring 65,537) for
/// 10, 100 and 1,000 backends: a reload or a health change rebuilds it. Median of 5.
fn maglev_build_times() {
    use lb_userspace::maglev::{Member, build};
    let ring = lb_common::maps::DEFAULT_RING_SIZE;
    let mut out = Vec::new();
    for n in [10u32, 100, 1000] {
        let members: Vec<Member> = (1..=n)
            .map(|i| Member {
                id: i,
                key: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff),
                weight: 1 + i % 3,
            })
            .collect();
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                let table = build(&members, ring);
                assert!(table.iter().all(|&id| id != 0), "every slot filled");
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        out.push(format!("{n} backends {:.2} ms", times[2]));
    }
    println!(
        "Maglev table build, ring {ring}, median of 5: {}; goal under 5 ms for 1000",
        out.join(", ")
    );
}

//! `cargo xtask bench`: nanoseconds per packet of the balancer, per traffic class, beside
//! a bare XDP_PASS program measured in the same run (the floor).
//!
//! Method (../shared/PLATFORM.md): BPF_PROG_TEST_RUN with repeat = 1 for every packet,
//! because the balancer rewrites the packet (encapsulation) and with repeat > 1 it would
//! measure itself on its own output. The time is the kernel's own measurement of the run
//! (no syscall overhead). Every run's verdict is checked; new-flow classes use a new
//! 5-tuple for every packet, so each one really inserts.

use std::time::Duration;

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_userspace::{
    dataplane::{Dataplane, Sizes},
    loader,
};
use mptcp_lb_tests::{
    fixture::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, verdict_name},
    packets::*,
    testenv::*,
};

const RUNS: usize = 20_000;
const WARMUP: usize = 1_000;

/// Runs `input` once as if received on `ifindex`; returns the verdict and the kernel's time.
fn run(prog: &Xdp, input: &[u8], ifindex: u32) -> (u32, Duration) {
    let mut out = vec![0u8; input.len() + 256];
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(input.len() as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ctx_in: Some(&md),
        repeat: 1,
        ..Default::default()
    };
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    (r.return_value, r.duration)
}

struct Row {
    class: &'static str,
    median: f64,
    p90: f64,
    mean: f64,
}

/// Measures `packets(i)` for i in 0..WARMUP+RUNS (`before(i)` runs first, untimed: the
/// handshake a learning ACK needs, say), checking every verdict.
fn measure(
    class: &'static str,
    prog: &Xdp,
    ifindex: u32,
    verdict: u32,
    mut before: impl FnMut(usize),
    mut packet: impl FnMut(usize) -> Vec<u8>,
) -> Row {
    let mut ns: Vec<f64> = Vec::with_capacity(RUNS);
    for i in 0..WARMUP + RUNS {
        before(i);
        let p = packet(i);
        let (v, d) = run(prog, &p, ifindex);
        assert_eq!(
            v,
            verdict,
            "{class}: run {i} gave {} instead of {}",
            verdict_name(v),
            verdict_name(verdict)
        );
        if i >= WARMUP {
            ns.push(d.as_nanos() as f64);
        }
    }
    ns.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    Row {
        class,
        median: ns[ns.len() / 2],
        p90: ns[ns.len() * 9 / 10],
        mean: ns.iter().sum::<f64>() / ns.len() as f64,
    }
}

/// A distinct client for flow number i (so new-flow classes never hit the table).
fn client4(i: usize) -> ([u8; 4], u16) {
    (
        [192, 0, (2 + (i >> 16)) as u8, 10],
        1024 + (i & 0xffff) as u16 % 60000,
    )
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench: needs root (BPF_PROG_TEST_RUN and a network namespace)");
        std::process::exit(1);
    }
    let env = environment("bench");
    let ifindex = env.ifindex;
    let rows = env.ns.within(move || {
        let mut floor_obj = loader::open().expect("object");
        let pass: &mut Xdp = floor_obj
            .program_mut(loader::PROG_PASS)
            .expect("xdp_pass")
            .try_into()
            .expect("xdp");
        pass.load().expect("load xdp_pass");

        let mut dp = Dataplane::load(Sizes {
            ring_size: RING,
            ..Default::default()
        })
        .expect("load balancer");
        configure(&mut dp);
        let prog = dp.program();
        let syn4 = |i: usize| {
            let (c, p) = client4(i);
            tcp4(c, vip4(1), p, 80, SYN, &[], &[])
        };
        let mut rows = vec![measure(
            "floor: bare XDP_PASS program",
            pass,
            ifindex,
            XDP_PASS,
            |_| {},
            syn4,
        )];
        rows.push(measure(
            "non-VIP, passed to the host",
            prog,
            ifindex,
            XDP_PASS,
            |_| {},
            |i| tcp4(client4(i).0, OTHER4, client4(i).1, 22, ACK, &[], &[]),
        ));
        rows.push(measure(
            "TCP SYN, new flow (table insert)",
            prog,
            ifindex,
            XDP_TX,
            |_| {},
            syn4,
        ));
        let ack = tcp4(
            CLIENT4,
            vip4(1),
            40001,
            80,
            ACK,
            &[],
            b"GET / HTTP/1.1\r\n\r\n",
        );
        rows.push(measure(
            "established ACK (table hit)",
            prog,
            ifindex,
            XDP_TX,
            |_| {},
            |_| ack.clone(),
        ));
        // IPv6 VIP to an IPv6 backend (IP6IP6), routed out of the other interface.
        rows.push(measure(
            "IPv6 SYN, new flow",
            prog,
            ifindex,
            XDP_REDIRECT,
            |_| {},
            |i| {
                let mut c = CLIENT6;
                c[12..16].copy_from_slice(&(i as u32).to_be_bytes());
                tcp6(c, vip6(4), 40000, 80, SYN, &[], &[])
            },
        ));
        // MPTCP classes, on the Maglev service (VIP .6): every backend reached by XDP_TX.
        let mp_syn = |i: usize| {
            let (c, p) = client4(i + 200_000);
            tcp4(c, vip4(6), p, 80, SYN, &MP_CAPABLE_SYN_V1, &[])
        };
        rows.push(measure(
            "MP_CAPABLE SYN, new flow",
            prog,
            ifindex,
            XDP_TX,
            |_| {},
            mp_syn,
        ));
        let learn_ack = |i: usize| {
            let (c, p) = client4(i + 400_000);
            tcp4(
                c,
                vip4(6),
                p,
                80,
                ACK,
                &mp_capable_keys(1, 20, 0x1111, 0x7a9c_0000_0000_0000 | i as u64),
                &[],
            )
        };
        rows.push(measure(
            "ACK that learns a token (SHA-256 in BPF)",
            prog,
            ifindex,
            XDP_TX,
            |i| {
                let (c, p) = client4(i + 400_000);
                let syn = tcp4(c, vip4(6), p, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
                assert_eq!(run(prog, &syn, ifindex).0, XDP_TX);
            },
            learn_ack,
        ));
        // One known token (learned just above), joined from new 5-tuples.
        let token = lb_common::mptcp::token_v1(0x7a9c_0000_0000_0000);
        rows.push(measure(
            "MP_JOIN SYN, known token",
            prog,
            ifindex,
            XDP_TX,
            |_| {},
            |i| {
                let (c, p) = client4(i + 600_000);
                tcp4(c, vip4(6), p, 80, SYN, &mp_join_syn(token), &[])
            },
        ));
        rows.push(measure(
            "MP_JOIN SYN, unknown token (dropped)",
            prog,
            ifindex,
            XDP_DROP,
            |_| {},
            |i| {
                let (c, p) = client4(i + 800_000);
                tcp4(
                    c,
                    vip4(6),
                    p,
                    80,
                    SYN,
                    &mp_join_syn(0xdead_0000 | (i as u32 & 0xffff)),
                    &[],
                )
            },
        ));
        rows
    });

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "mptcp-lb dataplane, kernel {}, BPF_PROG_TEST_RUN, repeat=1 per packet, {RUNS} packets per class",
        kernel.trim()
    );
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>10}",
        "class", "median", "p90", "mean", "vs floor"
    );
    let floor = rows[0].median;
    for r in &rows {
        println!(
            "{:<44} {:>6.0}ns {:>6.0}ns {:>6.0}ns {:>8.0}ns",
            r.class,
            r.median,
            r.p90,
            r.mean,
            r.median - floor
        );
    }
    println!();
    println!(
        "Katran, same machine and method (median): floor 15, non-VIP 72, SYN 277, ACK 159, IPv6 SYN 300 ns"
    );
}

//! Floods against live MPTCP connections, measured where it matters: on the backends.
//! Real kernel MPTCP in the testbed: 30 connections are established and held while a
//! hostile client floods the balancer's tables (through its own program, in bulk:
//! `mptcp_lb_tests::flood`) with each kind of traffic, 10 times the tables' capacity;
//! the held connections open their second subflows after the floods that go for the
//! token table and during the others. Every one of them must keep both subflows on its
//! backend. The same floods with the limits off are the control: joins are lost. 30 new
//! connections right after the floods are reported, not asserted on: a flood that fills
//! a CPU's learning window for the second also stops genuine learning on that CPU.
//!
//! `cargo xtask flood` runs this test and prints its table.

use std::{collections::HashMap, net::IpAddr, sync::atomic::Ordering};

use lb_common::{
    counters::Counter,
    maps::{BACKEND_ACTIVE, DEFAULT_CONN_ENTRIES, DEFAULT_TOKEN_ENTRIES},
};
use lb_userspace::{
    config::{DEFAULT_MAX_CONN_RATE, DEFAULT_MAX_LEARN_RATE},
    dataplane::{Dataplane, Sizes},
};
use mptcp_lb_tests::{
    flood::{Kind, Report, Target, flood},
    privileged,
    testbed::{Server, Testbed, VIP4, VIP6, across, backend_addr4, run_clients, serve},
};

/// The tables here: small, so that 10 times their capacity is quick to send.
const CONNS: u32 = 16384;
const TOKENS: u32 = 16384;
const HELD: usize = 30;
const AFTER: usize = 30;

fn v6(_: usize) -> IpAddr {
    IpAddr::V6(VIP6)
}

/// Connections the backends recorded since `before` (per backend) that lack their
/// second subflow, and how many they recorded in all.
fn without_join(servers: &[Server], before: &[usize]) -> (usize, usize) {
    let mut lacking = 0;
    let mut all = 0;
    for (s, b) in servers.iter().zip(before) {
        let recs = s.records.lock().expect("records");
        for r in &recs[*b..] {
            all += 1;
            if r.subflow_families.len() != 2 {
                lacking += 1;
            }
        }
    }
    (lacking, all)
}

struct Phase {
    reports: Vec<Report>,
    counters: HashMap<&'static str, u64>,
    /// The held connections: established before the floods, joining after some.
    lacking: usize,
    recorded: usize,
    /// New connections right after the floods.
    new_lacking: usize,
    new_recorded: usize,
    errors: Vec<String>,
}

/// Holds connections, floods with every kind (joins enabled half way), then opens new
/// connections; what the backends saw.
fn phase(tb: &Testbed, dp: &mut Dataplane, servers: &[Server], rounds: u64) -> Phase {
    let cpus = aya::util::nr_cpus().expect("cpus").min(4);
    let ifindex = tb.lb.ifindex("lb0");
    let before: Vec<usize> = servers
        .iter()
        .map(|s| s.records.lock().expect("records").len())
        .collect();
    let counters_before: HashMap<&'static str, u64> = dp
        .counters()
        .expect("counters")
        .into_iter()
        .map(|(c, v)| (c.label(), v))
        .collect();
    tb.client_joins(false);
    let mut reports = Vec::new();
    let prog = dp.program();
    let target = Target {
        prog,
        ns: &tb.lb,
        ifindex,
        vip: VIP4.octets(),
        tcp_port: 80,
        udp_port: 53,
    };
    let mut errors = across(&tb.client, HELD, true, v6, || {
        for kind in [
            Kind::MpCapableSyns,
            Kind::HandshakesOneFlow,
            Kind::HandshakesManyFlows,
        ] {
            reports.push(flood(&target, kind, rounds, cpus));
        }
        // The held connections open their second subflows now, after the floods that
        // go for the token table and during the ones below.
        tb.client_joins(true);
        for kind in [Kind::Acks, Kind::Udp] {
            reports.push(flood(&target, kind, rounds, cpus));
        }
    });
    let (lacking, recorded) = without_join(servers, &before);
    let middle: Vec<usize> = servers
        .iter()
        .map(|s| s.records.lock().expect("records").len())
        .collect();
    errors.extend(run_clients(&tb.client, AFTER, 5, true, v6));
    let (new_lacking, new_recorded) = without_join(servers, &middle);
    let counters = dp
        .counters()
        .expect("counters")
        .into_iter()
        .map(|(c, v)| {
            (
                c.label(),
                v - counters_before.get(c.label()).copied().unwrap_or(0),
            )
        })
        .collect();
    Phase {
        reports,
        counters,
        lacking,
        recorded,
        new_lacking,
        new_recorded,
        errors,
    }
}

fn print(title: &str, p: &Phase, dp: &Dataplane) {
    println!("{title}");
    println!(
        "  {:<48} {:>9} {:>8} {:>10}",
        "flood", "packets", "seconds", "packets/s"
    );
    for r in &p.reports {
        println!(
            "  {:<48} {:>9} {:>8.2} {:>10.0}",
            r.kind.describe(),
            r.packets,
            r.elapsed.as_secs_f64(),
            r.pps()
        );
    }
    for c in [
        Counter::ConnFloodBypass,
        Counter::TokenLearnedV1,
        Counter::LearnRateLimited,
        Counter::SynOnLearnedFlow,
        Counter::JoinRouted,
        Counter::JoinUnknownDropped,
    ] {
        println!("  {:<48} {:>9}", c.label(), p.counters[c.label()]);
    }
    println!(
        "  tables after: {} flows, {} tokens; client errors {}",
        dp.conn_entries(),
        dp.token_entries(),
        p.errors.len()
    );
    println!(
        "  held connections (live before the floods) with both subflows on their backend: {} of {}",
        p.recorded - p.lacking,
        p.recorded
    );
    println!(
        "  new connections right after the floods with both subflows: {} of {}",
        p.new_recorded - p.new_lacking,
        p.new_recorded
    );
    if let Some(e) = p.errors.first() {
        println!("  first client error: {e}");
    }
}

#[test]
fn live_connections_keep_their_subflows_through_floods() {
    if !privileged("live_connections_keep_their_subflows_through_floods") {
        return;
    }
    let tb = Testbed::new("mlb-fl", 3);
    tb.client_joins(false);
    let servers: Vec<Server> = tb.backends.iter().map(serve).collect();
    for s in &servers {
        s.expect_joins.store(true, Ordering::Relaxed);
    }
    let mut dp = tb.balancer(
        Sizes {
            ring_size: 65537,
            conn_entries: CONNS,
            conn6_entries: CONNS,
            token_entries: TOKENS,
        },
        0,
    );
    for i in 1..=3 {
        dp.set_backend(i as u32, IpAddr::V4(backend_addr4(i)), BACKEND_ACTIVE)
            .expect("backend");
    }
    dp.set_ring(0, &Testbed::members(&[1, 2, 3])).expect("ring");
    dp.add_vip(IpAddr::V4(VIP4), 53, 17, 0).expect("UDP VIP");
    let rounds = 10 * u64::from(CONNS.max(TOKENS));

    // The default limits, in the same ratio to these tables as to the default ones.
    let mut cfg = dp.maps.config.get(&0, 0).expect("config");
    cfg.max_conn_rate = (u64::from(DEFAULT_MAX_CONN_RATE) * u64::from(CONNS)
        / u64::from(DEFAULT_CONN_ENTRIES)) as u32;
    cfg.max_learn_rate = (u64::from(DEFAULT_MAX_LEARN_RATE) * u64::from(TOKENS)
        / u64::from(DEFAULT_TOKEN_ENTRIES)) as u32;
    dp.set_config(cfg).expect("limits");
    let guarded = phase(&tb, &mut dp, &servers, rounds);
    print(
        &format!(
            "limits on (max_conn_rate {}, max_learn_rate {} per CPU; tables {CONNS} flows, {TOKENS} tokens)",
            cfg.max_conn_rate, cfg.max_learn_rate
        ),
        &guarded,
        &dp,
    );

    // The control: the same floods with no limits.
    cfg.max_conn_rate = 0;
    cfg.max_learn_rate = 0;
    dp.set_config(cfg).expect("no limits");
    for s in &servers {
        s.join_wait_ms.store(2000, Ordering::Relaxed);
    }
    let open = phase(&tb, &mut dp, &servers, rounds);
    print("limits off (the control)", &open, &dp);

    assert!(
        guarded.errors.is_empty(),
        "first subflows failed under the flood: {:?}",
        guarded.errors
    );
    assert_eq!((guarded.recorded, guarded.new_recorded), (HELD, AFTER));
    assert_eq!(
        guarded.lacking, 0,
        "live connections lost their second subflow under the flood"
    );
    assert!(
        open.lacking > 0 && open.counters["join_unknown_dropped"] > 0,
        "the control: with no limits the floods should have cost joins, dropped as unknown \
         (not merely late)"
    );
}

//! The dataplane against what a hostile or unlucky client side can do to its state, and
//! against backends changing state under it, through BPF_PROG_TEST_RUN: each test sets a
//! scene, sends the packets, then reads the tables and counters.

use lb_common::{
    counters::Counter,
    hash::flow_hash,
    maps::{BACKEND_DRAINING, BACKEND_OUT_OF_SERVICE, VIP_NO_CLIENT_LEARNING, VipInfo},
};
use lb_userspace::dataplane::Dataplane;
use mptcp_lb_tests::{
    fixture::{XDP_DROP, XDP_PASS, XDP_TX, run_once},
    packets::*,
    testenv::*,
};

/// The Maglev service (VIP 10.100.0.6, backends 5-7): which backend Maglev gives a port.
fn owner_of(ring: &[u32], port: u16) -> u32 {
    ring[(flow_hash(&key4(CLIENT4, vip4(6), port, 80, 6), SEED) % RING) as usize]
}

/// The backend the connection table records for the flow from `src`:`port` to the
/// Maglev service's VIP.
fn recorded_backend(dp: &Dataplane, src: [u8; 4], port: u16) -> u32 {
    dp.maps
        .conns
        .get(&key4(src, vip4(6), port, 80, 6))
        .expect("the flow is recorded")
        .backend
}

/// A backend's handshake seen by the balancer: its MP_CAPABLE SYN, then (after `between`
/// ran) its third ACK with `server_key`. Returns the verdicts of both.
fn handshake(
    dp: &mut Dataplane,
    ifindex: u32,
    port: u16,
    server_key: u64,
    between: impl FnOnce(&mut Dataplane),
) -> (u32, u32) {
    let syn = tcp4(CLIENT4, vip4(6), port, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
    let ack = tcp4(
        CLIENT4,
        vip4(6),
        port,
        80,
        ACK,
        &mp_capable_keys(1, 20, 0x1234, server_key),
        &[],
    );
    let s = run_once(dp.program(), &syn, ifindex).0;
    between(dp);
    (s, run_once(dp.program(), &ack, ifindex).0)
}

/// A backend taken out of service (health check down, or `backend disable`) between a
/// connection's SYN and its third ACK: the established flow still reaches it, but the
/// ACK teaches no token, so the connection's joins are not steered to it. A draining
/// backend, by contrast, learns and keeps its joins (the control).
#[test]
fn a_backend_out_of_service_learns_no_token_and_takes_no_join() {
    let test = "a_backend_out_of_service_learns_no_token_and_takes_no_join";
    with_balancer(test, "oos", |mut dp, ring, link| {
        let ifindex = link.ifindex;
        let join = |token: u32, port: u16| {
            tcp4(
                [192, 0, 2, 99],
                vip4(6),
                port,
                80,
                SYN,
                &mp_join_syn(token),
                &[],
            )
        };
        let addr_of = |id: u32| v4(MAGLEV_BES[(id - 5) as usize]);

        // Out of service between SYN and ACK: forwarded, not learned.
        let (port, key) = (41200u16, 0x0a0a_0000_0000_0001u64);
        let x = owner_of(&ring, port);
        let verdicts = handshake(&mut dp, ifindex, port, key, |dp| {
            dp.set_backend(x, addr_of(x), BACKEND_OUT_OF_SERVICE)
                .expect("out of service");
        });
        assert_eq!(
            verdicts,
            (XDP_TX, XDP_TX),
            "the established flow still reaches it"
        );
        assert!(
            dp.maps.tokens.get(sha256_token(key)).is_none(),
            "a backend out of service learned a token"
        );
        assert_eq!(
            run_once(dp.program(), &join(sha256_token(key), 46000), ifindex).0,
            XDP_DROP,
            "a join for it is not steered to it"
        );
        let c = |dp: &Dataplane, k| dp.counter(k).expect("counter");
        assert_eq!(c(&dp, Counter::LearnBackendOut), 1);

        // A token learned while it served: no longer steers joins once it is out of
        // service, even before the controller has dropped the token.
        dp.set_backend(x, addr_of(x), lb_common::maps::BACKEND_ACTIVE)
            .expect("back");
        let (port2, key2) = (
            (41201u16..)
                .find(|p| owner_of(&ring, *p) == x)
                .expect("port"),
            0x0a0a_0000_0000_0002u64,
        );
        assert_eq!(
            handshake(&mut dp, ifindex, port2, key2, |_| {}),
            (XDP_TX, XDP_TX)
        );
        assert!(dp.maps.tokens.get(sha256_token(key2)).is_some(), "learned");
        dp.set_backend(x, addr_of(x), BACKEND_OUT_OF_SERVICE)
            .expect("out of service");
        assert_eq!(
            run_once(dp.program(), &join(sha256_token(key2), 46001), ifindex).0,
            XDP_DROP,
            "a join for a backend out of service"
        );

        // Control: draining between SYN and ACK still learns, and the join reaches it.
        dp.set_backend(x, addr_of(x), lb_common::maps::BACKEND_ACTIVE)
            .expect("back");
        let (port3, key3) = (
            (port2 + 1..)
                .find(|p| owner_of(&ring, *p) == x)
                .expect("port"),
            0x0a0a_0000_0000_0003u64,
        );
        let verdicts = handshake(&mut dp, ifindex, port3, key3, |dp| {
            dp.set_backend(x, addr_of(x), BACKEND_DRAINING)
                .expect("drain");
        });
        assert_eq!(verdicts, (XDP_TX, XDP_TX));
        assert_eq!(
            run_once(dp.program(), &join(sha256_token(key3), 46002), ifindex).0,
            XDP_TX,
            "a draining backend keeps its connections' joins"
        );
        assert_eq!(recorded_backend(&dp, [192, 0, 2, 99], 46002), x);
        assert_eq!(c(&dp, Counter::LearnBackendOut), 1);
    });
}

/// Packets that teach nothing do not end learning at once: neither a forged bare ACK
/// sent between a connection's SYN and its third ACK, nor a data segment reordered ahead
/// of the keys (another CPU), stops the third ACK from teaching the token. A connection
/// that really fell back to plain TCP stops looking after a few packets.
#[test]
fn one_packet_without_keys_does_not_settle_learning() {
    let test = "one_packet_without_keys_does_not_settle_learning";
    with_balancer(test, "settle", |mut dp, _, link| {
        let ifindex = link.ifindex;
        let run = |dp: &mut Dataplane, p: &[u8]| run_once(dp.program(), p, ifindex).0;
        let c = |dp: &Dataplane, k| dp.counter(k).expect("counter");
        let key = 0x0b0b_0000_0000_0001u64;
        let port = 41300;
        let syn = tcp4(CLIENT4, vip4(6), port, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
        let bare = tcp4(CLIENT4, vip4(6), port, 80, ACK, &[], &[]);
        // A DSS (subtype 2) data segment, as Linux sends after the first one.
        let dss = tcp4(
            CLIENT4,
            vip4(6),
            port,
            80,
            ACK,
            &[30, 4, 0x20, 0x01],
            b"data",
        );
        let keys = tcp4(
            CLIENT4,
            vip4(6),
            port,
            80,
            ACK,
            &mp_capable_keys(1, 20, 0x99, key),
            &[],
        );
        for p in [&syn, &bare, &dss, &keys] {
            assert_eq!(run(&mut dp, p), XDP_TX);
        }
        assert!(
            dp.maps.tokens.get(sha256_token(key)).is_some(),
            "a forged bare ACK and a reordered segment kept the third ACK from teaching"
        );
        assert_eq!(c(&dp, Counter::MptcpFallback), 0);

        // A connection that fell back: its packets carry no MPTCP option at all. After
        // LEARN_MISSES_MAX of them it is settled, and keys that come later teach nothing.
        let port = 41301;
        let late_key = 0x0b0b_0000_0000_0002u64;
        let syn = tcp4(CLIENT4, vip4(6), port, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
        assert_eq!(run(&mut dp, &syn), XDP_TX);
        for _ in 0..lb_common::maps::LEARN_MISSES_MAX {
            let data = tcp4(CLIENT4, vip4(6), port, 80, ACK, &[], b"plain");
            assert_eq!(run(&mut dp, &data), XDP_TX);
        }
        assert_eq!(
            c(&dp, Counter::MptcpFallback),
            1,
            "the fallback is concluded"
        );
        let late = tcp4(
            CLIENT4,
            vip4(6),
            port,
            80,
            ACK,
            &mp_capable_keys(1, 20, 0x98, late_key),
            &[],
        );
        assert_eq!(run(&mut dp, &late), XDP_TX);
        assert!(dp.maps.tokens.get(sha256_token(late_key)).is_none());
    });
}

/// A version 0 SYN carries the client's key, and the real third ACK echoes it. Third
/// ACKs with another client key (forged by someone who knows the 5-tuple but did not see
/// the SYN) teach nothing, however many, and do not hasten the fallback: the real one
/// still teaches. Before, the first of them taught its made-up token.
#[test]
fn version_0_keys_must_echo_the_client_key_of_the_syn() {
    let test = "version_0_keys_must_echo_the_client_key_of_the_syn";
    with_balancer(test, "v0echo", |mut dp, _, link| {
        let ifindex = link.ifindex;
        let run = |dp: &mut Dataplane, p: &[u8]| run_once(dp.program(), p, ifindex).0;
        let c = |dp: &Dataplane, k| dp.counter(k).expect("counter");
        let client_key = V0_CLIENT_KEY;
        let (real, forged) = (0x0d0d_0000_0000_0001u64, 0x0d0d_0000_0000_0002u64);
        let port = 41400;
        let syn = tcp4(CLIENT4, vip4(6), port, 80, SYN, &MP_CAPABLE_SYN_V0, &[]);
        let ack = |client: u64, server: u64| {
            tcp4(
                CLIENT4,
                vip4(6),
                port,
                80,
                ACK,
                &mp_capable_keys(0, 20, client, server),
                &[],
            )
        };
        assert_eq!(run(&mut dp, &syn), XDP_TX);
        let rounds = lb_common::maps::LEARN_MISSES_MAX as u64 + 2;
        for k in 0..rounds {
            assert_eq!(run(&mut dp, &ack(client_key ^ 1, forged + k)), XDP_TX);
        }
        for k in 0..rounds {
            assert!(
                dp.maps.tokens.get(sha1_token(forged + k)).is_none(),
                "a third ACK that does not echo the SYN's client key taught a token"
            );
        }
        assert_eq!(c(&dp, Counter::LearnKeyMismatch), rounds);
        assert_eq!(
            c(&dp, Counter::MptcpFallback),
            0,
            "forged keys settled learning"
        );
        assert_eq!(run(&mut dp, &ack(client_key, real)), XDP_TX);
        assert!(
            dp.maps.tokens.get(sha1_token(real)).is_some(),
            "the real third ACK taught its token"
        );
        assert_eq!(c(&dp, Counter::TokenLearnedV0), 1);
        // The flow entry now holds the token, not the key check.
        let conn = dp
            .maps
            .conns
            .get(&key4(CLIENT4, vip4(6), port, 80, 6))
            .expect("the flow's entry");
        assert_eq!(conn.known_token(), Some(sha1_token(real)));
    });
}

/// A service that learns its tokens from its backends only (`learn_tokens = "backend"`):
/// no client packet creates a token, however many handshakes, version 0 or 1; the same
/// handshakes on a service that learns from clients do (the control).
#[test]
fn a_service_learning_from_its_backends_learns_nothing_from_clients() {
    let test = "a_service_learning_from_its_backends_learns_nothing_from_clients";
    with_balancer(test, "bklearn", |mut dp, _, link| {
        let ifindex = link.ifindex;
        let handshake = |dp: &mut Dataplane, port: u16, version: u8, server_key: u64| {
            // The SYN, the third ACK, and the first data segment with the keys again.
            let data = tcp4(
                CLIENT4,
                vip4(6),
                port,
                80,
                ACK,
                &mp_capable_keys(version, 22, V0_CLIENT_KEY, server_key),
                b"data",
            );
            let [syn, ack] = mp_handshake4(port, version, server_key);
            for p in [&syn, &ack, &data] {
                assert_eq!(run_once(dp.program(), p, ifindex).0, XDP_TX);
            }
        };
        // The control: learning from clients.
        handshake(&mut dp, 45000, 1, 0x1000);
        assert!(dp.maps.tokens.get(sha256_token(0x1000)).is_some());

        let addr = v4(vip4(6));
        dp.set_vip(
            addr,
            80,
            6,
            VipInfo {
                service: 5,
                flags: VIP_NO_CLIENT_LEARNING,
            },
        )
        .expect("service port");
        for k in 0..200u64 {
            handshake(&mut dp, 45001 + k as u16, (k % 2) as u8, 0x2000 + k);
        }
        for k in 0..200u64 {
            let t = if k % 2 == 0 {
                sha1_token(0x2000 + k)
            } else {
                sha256_token(0x2000 + k)
            };
            assert!(
                dp.maps.tokens.get(t).is_none(),
                "a client handshake taught a token"
            );
        }
        let learned = dp.counter(Counter::TokenLearnedV1).expect("counter")
            + dp.counter(Counter::TokenLearnedV0).expect("counter");
        assert_eq!(learned, 1, "only the control's token");
    });
}

/// One client, one 5-tuple, rounds of three packets: an MP_CAPABLE SYN, an ACK with a
/// made-up key, and a plain ACK (which makes the balancer use the new token). Before,
/// every round taught a token and the token table's LRU pushed out the real ones. Now a
/// SYN on a flow that learned moments ago keeps the flow and its token: after more rounds
/// than the token table holds, the real connection's join still reaches its backend.
#[test]
fn rounds_of_forged_handshakes_on_one_flow_keep_its_token() {
    let test = "rounds_of_forged_handshakes_on_one_flow_keep_its_token";
    with_balancer(test, "rounds", |mut dp, ring, link| {
        let ifindex = link.ifindex;
        let run = |dp: &mut Dataplane, p: &[u8]| run_once(dp.program(), p, ifindex).0;
        // The victim: a live connection whose token the balancer learned.
        let victim_key = 0x0c0c_0000_0000_0001u64;
        assert_eq!(
            handshake(&mut dp, ifindex, 41400, victim_key, |_| {}),
            (XDP_TX, XDP_TX)
        );
        let victim = owner_of(&ring, 41400);
        // The attacker's flow learns once, then tries again and again.
        let port = 41401;
        let syn = tcp4(CLIENT4, vip4(6), port, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
        let plain = tcp4(CLIENT4, vip4(6), port, 80, ACK, &[], b"x");
        let rounds = TEST_SIZES.token_entries as u64 + 100;
        let started = std::time::Instant::now();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..rounds {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let forged = tcp4(
                CLIENT4,
                vip4(6),
                port,
                80,
                ACK,
                &mp_capable_keys(1, 20, 0x42, x),
                &[],
            );
            for p in [&syn, &forged, &plain] {
                assert_eq!(run(&mut dp, p), XDP_TX);
            }
        }
        // The rule lasts RELEARN_HOLDOFF_NS from the learning: the rounds must fit in it.
        let took = started.elapsed();
        assert!(
            took.as_nanos() < u128::from(lb_common::maps::RELEARN_HOLDOFF_NS),
            "{rounds} rounds took {took:?}, longer than the hold-off: the machine is too slow for this test"
        );
        let c = |k| dp.counter(k).expect("counter");
        println!(
            "{rounds} rounds in {took:?}: tokens learned {}, SYNs kept on the learned flow {}, tokens held {}",
            c(Counter::TokenLearnedV1),
            c(Counter::SynOnLearnedFlow),
            dp.token_entries()
        );
        assert_eq!(
            c(Counter::TokenLearnedV1),
            2,
            "the victim's and the first forged one"
        );
        assert_eq!(c(Counter::SynOnLearnedFlow), rounds - 1);
        let join = tcp4(
            [192, 0, 2, 55],
            vip4(6),
            46100,
            80,
            SYN,
            &mp_join_syn(sha256_token(victim_key)),
            &[],
        );
        assert_eq!(run(&mut dp, &join), XDP_TX, "the victim's join");
        assert_eq!(recorded_backend(&dp, [192, 0, 2, 55], 46100), victim);
    });
}

/// Tokens learned a second per CPU are capped by `max_learn_rate`: handshakes from many
/// spoofed 5-tuples cannot buy more SHA-256 work or token-table inserts than that. A
/// connection over the limit still learns from its next packet with keys.
#[test]
fn learning_is_capped_per_cpu() {
    let test = "learning_is_capped_per_cpu";
    with_balancer(test, "lrate", |mut dp, _, link| {
        // The window is per CPU.
        pin_to_cpu0();
        let ifindex = link.ifindex;
        let mut cfg = dp.maps.config.get(&0, 0).expect("config");
        cfg.max_learn_rate = 5;
        dp.set_config(cfg).expect("config");
        for attempt in 0..3u16 {
            let base = 41500 + attempt * 20;
            reset_rate_window(&mut dp, lb_common::maps::RATE_LEARNING);
            let learned_before = dp.counter(Counter::TokenLearnedV1).expect("counter");
            let start = std::time::Instant::now();
            let keys: Vec<u64> = (0..8u64)
                .map(|i| 0x0d0d_0000_0000_0000 | u64::from(base) << 8 | i)
                .collect();
            for (i, key) in keys.iter().enumerate() {
                let verdicts = handshake(&mut dp, ifindex, base + i as u16, *key, |_| {});
                assert_eq!(verdicts, (XDP_TX, XDP_TX), "forwarded over the limit too");
            }
            if start.elapsed() >= std::time::Duration::from_millis(900) {
                continue;
            }
            let learned = dp.counter(Counter::TokenLearnedV1).expect("counter") - learned_before;
            assert_eq!(learned, 5, "tokens learned within one second on one CPU");
            let held = keys
                .iter()
                .filter(|k| dp.maps.tokens.get(sha256_token(**k)).is_some())
                .count();
            assert_eq!(held, 5);
            assert!(dp.counter(Counter::LearnRateLimited).expect("counter") >= 3);
            // The next second, a limited connection's first data (keys again) teaches.
            reset_rate_window(&mut dp, lb_common::maps::RATE_LEARNING);
            let data = tcp4(
                CLIENT4,
                vip4(6),
                base + 7,
                80,
                ACK,
                &mp_capable_keys(1, 22, 0x1234, keys[7]),
                b"data",
            );
            assert_eq!(run_once(dp.program(), &data, ifindex).0, XDP_TX);
            assert!(
                dp.maps.tokens.get(sha256_token(keys[7])).is_some(),
                "a limited connection learns from its next packet with keys"
            );
            return;
        }
        panic!("three tries each took a second or more");
    });
}

/// Length fields that lie: a packet whose IP or UDP length cannot be right is passed to
/// the host or dropped, and counted, never encapsulated with a wrong length.
#[test]
fn lying_length_fields_are_never_forwarded() {
    let test = "lying_length_fields_are_never_forwarded";
    with_balancer(test, "lens", |mut dp, _, link| {
        let ifindex = link.ifindex;
        let c = |dp: &Dataplane, k| dp.counter(k).expect("counter");
        // IPv6 payload length 65535: the IP length (payload + 40) would wrap to 39, and a
        // UDP datagram was forwarded with that length in its tunnel header.
        dp.add_vip(v6(vip6(3)), 53, 17, 2).expect("UDP VIP");
        let mut v6 = udp6(CLIENT6, vip6(3), 42000, 53, b"query");
        v6[18..20].copy_from_slice(&0xffffu16.to_be_bytes());
        // IPv4 total length 10, shorter than its own header.
        let mut v4 = tcp4(CLIENT4, vip4(1), 42001, 80, SYN, &[], &[]);
        v4[16..18].copy_from_slice(&10u16.to_be_bytes());
        // UDP whose IP packet ends 4 bytes into its header (the frame has all 8).
        let mut udp = udp4(CLIENT4, vip4(1), 42002, 53, b"query");
        udp[16..18].copy_from_slice(&24u16.to_be_bytes());
        let malformed = c(&dp, Counter::PassMalformed);
        let truncated = c(&dp, Counter::DropTruncated);
        assert_eq!(run_once(dp.program(), &v6, ifindex).0, XDP_PASS, "IPv6");
        assert_eq!(run_once(dp.program(), &v4, ifindex).0, XDP_PASS, "IPv4");
        assert_eq!(c(&dp, Counter::PassMalformed) - malformed, 2);
        assert_eq!(run_once(dp.program(), &udp, ifindex).0, XDP_DROP, "UDP");
        assert_eq!(c(&dp, Counter::DropTruncated) - truncated, 1);
    });
}

/// MPTCP awareness turned off while a connection is between its SYN and its third ACK:
/// nothing is learned any more, as the setting says.
#[test]
fn awareness_off_learns_nothing_for_flows_marked_before() {
    let test = "awareness_off_learns_nothing_for_flows_marked_before";
    with_balancer(test, "nomp", |mut dp, _, link| {
        let key = 0x0e0e_0000_0000_0001u64;
        let verdicts = handshake(&mut dp, link.ifindex, 41600, key, |dp| {
            let mut cfg = dp.maps.config.get(&0, 0).expect("config");
            cfg.flags |= lb_common::maps::CONFIG_NO_MPTCP;
            dp.set_config(cfg).expect("awareness off");
        });
        assert_eq!(verdicts, (XDP_TX, XDP_TX));
        assert!(
            dp.maps.tokens.get(sha256_token(key)).is_none(),
            "learned with awareness off"
        );
    });
}

/// What a `log::Log` received: level and message of each record.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<(log::Level, String)>>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .expect("records")
            .push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}

/// Rare kernel-side events reach the daemon's log through aya-log, at debug level: a
/// token collision, a join for a backend out of service, a rate limit reached. A flood of
/// such events gives at most MAX_LOG_RATE lines a second per CPU.
#[test]
fn rare_events_reach_the_log_at_a_bounded_rate() {
    let test = "rare_events_reach_the_log_at_a_bounded_rate";
    with_balancer(test, "klog", |mut dp, ring, link| {
        pin_to_cpu0();
        let ifindex = link.ifindex;
        let captured = Captured::default();
        let mut logs = lb_userspace::kernel_log::logger(&mut dp, captured.clone())
            .expect("the program's log ring");
        let key = 0x0f0e_0000_0000_0001u64;
        let x = owner_of(&ring, 41700);
        assert_eq!(
            handshake(&mut dp, ifindex, 41700, key, |_| {}),
            (XDP_TX, XDP_TX)
        );
        // Handshakes on other backends presenting the same server key: collisions.
        let others: Vec<u16> = (41701u16..)
            .filter(|p| owner_of(&ring, *p) != x)
            .take(101)
            .collect();
        for port in &others {
            assert_eq!(
                handshake(&mut dp, ifindex, *port, key, |_| {}),
                (XDP_TX, XDP_TX)
            );
        }
        let collisions = dp.counter(Counter::TokenCollision).expect("counter");
        assert_eq!(collisions, 101);
        // A join for a backend taken out of service (in a new log window: the collisions
        // filled this one).
        reset_rate_window(&mut dp, lb_common::maps::RATE_LOG);
        let addr = v4(MAGLEV_BES[(x - 5) as usize]);
        dp.set_backend(x, addr, BACKEND_OUT_OF_SERVICE)
            .expect("out of service");
        let join = tcp4(
            [192, 0, 2, 44],
            vip4(6),
            46200,
            80,
            SYN,
            &mp_join_syn(sha256_token(key)),
            &[],
        );
        assert_eq!(run_once(dp.program(), &join, ifindex).0, XDP_DROP);
        // The flood limit reached.
        let mut cfg = dp.maps.config.get(&0, 0).expect("config");
        cfg.max_conn_rate = 2;
        dp.set_config(cfg).expect("config");
        reset_rate_window(&mut dp, lb_common::maps::RATE_NEW_FLOWS);
        reset_rate_window(&mut dp, lb_common::maps::RATE_LOG);
        for port in 41900..41904u16 {
            let syn = tcp4(CLIENT4, vip4(1), port, 80, SYN, &[], &[]);
            assert_eq!(run_once(dp.program(), &syn, ifindex).0, XDP_TX);
        }

        logs.flush();
        let records = captured.0.lock().expect("records").clone();
        let with = |text: &str| records.iter().filter(|(_, m)| m.contains(text)).count();
        println!("{} records, e.g.:", records.len());
        for (level, m) in records.iter().take(3) {
            println!("  {level} {m}");
        }
        assert!(
            records.iter().all(|(l, _)| *l == log::Level::Debug),
            "{records:?}"
        );
        let collision_lines = with("is live for backend");
        assert!(collision_lines >= 1, "a collision is logged: {records:?}");
        assert!(
            collision_lines <= 2 * lb_common::maps::MAX_LOG_RATE as usize,
            "{collision_lines} lines for {collisions} collisions: not rate-limited"
        );
        assert_eq!(with("is out of service or removed"), 1, "{records:?}");
        assert_eq!(with("new-flow limit reached on this CPU"), 1, "{records:?}");
    });
}

/// A join subflow's table entry against a flood of spoofed ACKs, more than this CPU's
/// share of the connection table (BPF_F_NO_COMMON_LRU: each CPU evicts only from its
/// own list): under the flood limit the flood is not recorded, so the join's entry stays
/// and its next packet follows the token to its backend. Without the limit (the control)
/// the entry is evicted and the packet is placed by its own 5-tuple, elsewhere.
#[test]
fn a_flood_of_spoofed_acks_does_not_evict_a_join() {
    let test = "a_flood_of_spoofed_acks_does_not_evict_a_join";
    with_balancer(test, "evict", |mut dp, ring, link| {
        pin_to_cpu0();
        let ifindex = link.ifindex;
        let cpus = aya::util::nr_cpus().expect("cpus") as u32;
        let share = TEST_SIZES.conn_entries / cpus;
        let run = |dp: &mut Dataplane, limit: u32, port: u16, key: u64| {
            let mut cfg = dp.maps.config.get(&0, 0).expect("config");
            cfg.max_conn_rate = limit;
            dp.set_config(cfg).expect("config");
            reset_rate_window(dp, lb_common::maps::RATE_NEW_FLOWS);
            assert_eq!(handshake(dp, ifindex, port, key, |_| {}), (XDP_TX, XDP_TX));
            let owner = owner_of(&ring, port);
            // A join from another address whose own 5-tuple Maglev puts elsewhere.
            let other = [192, 0, 2, 33];
            let jport = (47000u16..)
                .find(|p| {
                    ring[(flow_hash(&key4(other, vip4(6), *p, 80, 6), SEED) % RING) as usize]
                        != owner
                })
                .expect("a join 5-tuple hashing elsewhere");
            let join = tcp4(
                other,
                vip4(6),
                jport,
                80,
                SYN,
                &mp_join_syn(sha256_token(key)),
                &[],
            );
            assert_eq!(run_once(dp.program(), &join, ifindex).0, XDP_TX);
            assert_eq!(recorded_backend(dp, other, jport), owner);
            // The flood: spoofed ACKs, each a new flow, past this CPU's share.
            let mut ack = tcp4([0; 4], vip4(6), 0, 80, ACK, &[], b"x");
            for i in 0..share + 100 {
                let src = (0x6440_0000u32 | i).to_be_bytes();
                ack[26..30].copy_from_slice(&src);
                ack[34..36].copy_from_slice(&(1024 + (i % 60000) as u16).to_be_bytes());
                run_once(dp.program(), &ack, ifindex);
            }
            let next = tcp4(other, vip4(6), jport, 80, ACK, &[], b"join data");
            let (verdict, out) = run_once(dp.program(), &next, ifindex);
            assert_eq!(verdict, XDP_TX);
            let to: [u8; 4] = out[30..34].try_into().expect("outer destination");
            to == MAGLEV_BES[(owner - 5) as usize]
        };
        let kept = run(&mut dp, 100, 41800, 0x0f0f_0000_0000_0101);
        assert!(
            kept,
            "with the flood limit, the join's next packet reached another backend"
        );
        let kept = run(&mut dp, 0, 41801, 0x0f0f_0000_0000_0102);
        assert!(
            !kept,
            "the control: without the limit, {} spoofed ACKs should have evicted the join",
            share + 100
        );
    });
}

/// README: "no packet ever meets a table half written". Packets to one VIP are run
/// without pause while the controller adds and removes 4 other VIPs, 150 times each,
/// chosen so that the first one's displacement, and so its slot, changes as they come
/// and go. Every packet must be forwarded. Written in place
/// (the negative control, checked by hand: `publish_vips` writing the live table), the
/// VIP goes missing for some packets, which are then passed to the host.
#[test]
fn packets_never_meet_a_vip_table_half_written() {
    let test = "packets_never_meet_a_vip_table_half_written";
    with_balancer(test, "viprace", |mut dp, _ring, link| {
        use lb_common::maps::{FAMILY_V4, VipKey, vip_hash};
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        };
        let stable = VipKey {
            addr: [u32::from_ne_bytes(vip4(1)), 0, 0, 0],
            port: 80u16.to_be(),
            proto: 6,
            family: FAMILY_V4,
        };
        // VIPs that move it: X shares its bucket and has the base slot where Y (whose
        // bucket, with Y2 and Y3, is bigger, so placed first) sits. With them, the
        // VIP's bucket needs another displacement; without them, it has 0 again.
        let (bucket, _, _) = vip_hash(&stable);
        let v4 = |i: u32| {
            let a = std::net::Ipv4Addr::from(0x0ac8_0000 + i);
            let k = VipKey {
                addr: [u32::from_ne_bytes(a.octets()), 0, 0, 0],
                ..stable
            };
            (a, vip_hash(&k))
        };
        let (x, (_, x_base, _)) = (0u32..)
            .map(v4)
            .find(|(_, (b, _, _))| *b == bucket)
            .expect("X");
        let (y, (y_bucket, _, _)) = (0u32..)
            .map(v4)
            .find(|(_, (b, base, _))| *base == x_base && *b != bucket)
            .expect("Y");
        let ys: Vec<std::net::Ipv4Addr> = (0u32..)
            .map(v4)
            .filter(|(a, (b, _, _))| *b == y_bucket && *a != y)
            .map(|(a, _)| a)
            .take(2)
            .collect();
        let others: Vec<std::net::Ipv4Addr> = [x, y].into_iter().chain(ys).collect();

        // The program, a second handle of it for the other thread.
        let pin = format!("/sys/fs/bpf/mlb-viprace-{}", std::process::id());
        dp.program().pin(&pin).expect("pin the program");
        let prog = aya::programs::Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface)
            .expect("the pinned program");
        let _ = std::fs::remove_file(&pin);
        let syn = tcp4(CLIENT4, vip4(1), 40001, 80, SYN, &[], &[]);
        let ack = tcp4(CLIENT4, vip4(1), 40001, 80, ACK, &[], b"x");
        assert_eq!(run_once(&prog, &syn, link.ifindex).0, XDP_TX);
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let sender = {
            let (stop, sent, lost) = (stop.clone(), sent.clone(), lost.clone());
            let ifindex = link.ifindex;
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let verdict = run_once(&prog, &ack, ifindex).0;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if verdict != XDP_TX {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let mut shifts = std::collections::HashSet::new();
        for _ in 0..150 {
            dp.begin_vip_batch();
            for a in &others {
                dp.add_vip(std::net::IpAddr::V4(*a), 80, 6, 0)
                    .expect("add a VIP");
            }
            dp.end_vip_batch().expect("publish");
            shifts.insert(dp.maps.vip_buckets.get(&bucket, 0).unwrap_or(0));
            shifts.insert(
                dp.maps
                    .vip_buckets
                    .get(&(lb_common::maps::VIP_BUCKETS + bucket), 0)
                    .unwrap_or(0),
            );
            for a in &others {
                let (words, family) = lb_userspace::dataplane::addr_words((*a).into());
                for port in [80u16.to_be(), 0] {
                    let proto = if port == 0 { 0 } else { 6 };
                    let _ = dp.maps.vips.remove(&VipKey {
                        addr: words,
                        port,
                        proto,
                        family,
                    });
                }
            }
            dp.publish_vips().expect("publish");
        }
        stop.store(true, Ordering::Relaxed);
        sender.join().expect("sender");
        let (sent, lost) = (sent.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
        println!(
            "{sent} packets during 300 switches of the VIP table, {lost} not forwarded; \
             displacements of the VIP's bucket seen: {shifts:?}"
        );
        assert!(
            shifts.len() >= 2,
            "the VIP's displacement changed: {shifts:?}"
        );
        assert!(
            sent >= 1000,
            "packets ran while the tables switched: {sent}"
        );
        assert_eq!(lost, 0, "packets that met no VIP");
    });
}

/// A token learned into a full bucket of the token table takes the slot of the token
/// seen least recently there, and says so (`token_evicted`): the other three keep
/// routing their joins, the pushed-out one follows the unknown-token policy. A live
/// token of another backend is never overwritten (the collision rule), full or not.
#[test]
fn a_full_token_bucket_gives_up_the_token_seen_least_recently() {
    let test = "a_full_token_bucket_gives_up_the_token_seen_least_recently";
    with_balancer(test, "bucket", |mut dp, ring, link| {
        let ifindex = link.ifindex;
        let key = 0x0b0c_0000_0000_0001u64;
        let token = sha256_token(key);
        let port = 41900;
        let owner = owner_of(&ring, port);
        // Four other tokens of the same bucket, learned 10, 20, 30, 40 s ago, each on a
        // backend of the VIP's service (live: the idle time is an hour).
        let (mask, seed) = (dp.maps.tokens.buckets() - 1, dp.maps.tokens.key());
        let bucket = lb_common::tokens::bucket_of(token, mask, seed);
        let others: Vec<u32> = (1u32..)
            .filter(|t| *t != token && lb_common::tokens::bucket_of(*t, mask, seed) == bucket)
            .take(4)
            .collect();
        let now = coarse_now_ns();
        for (i, t) in others.iter().enumerate() {
            let seen = now.saturating_sub((10 + 10 * i as u64) * 1_000_000_000);
            let e = lb_common::maps::TokenEntry {
                backend: 5 + i as u32 % 3,
                service: 5,
                learned_ns: seen,
                last_seen_ns: seen,
                version: 1,
                origin: lb_common::maps::TOKEN_FROM_CLIENT,
            };
            let pushed = dp
                .maps
                .tokens
                .set(*t, &e, lb_common::maps::DEFAULT_TOKEN_IDLE_NS);
            assert_eq!(pushed, None, "the bucket had room for token {t:08x}");
        }
        assert_eq!(
            handshake(&mut dp, ifindex, port, key, |_| {}),
            (XDP_TX, XDP_TX)
        );
        let learned = dp.maps.tokens.get(token).expect("the new token is learned");
        assert_eq!(learned.backend, owner);
        assert_eq!(dp.counter(Counter::TokenEvicted).expect("counter"), 1);
        let join =
            |t: u32, p: u16| tcp4([192, 0, 2, 44], vip4(6), p, 80, SYN, &mp_join_syn(t), &[]);
        for (i, t) in others.iter().enumerate() {
            let verdict = run_once(dp.program(), &join(*t, 47100 + i as u16), ifindex).0;
            if i == 3 {
                assert!(dp.maps.tokens.get(*t).is_none(), "the oldest is gone");
                assert_eq!(verdict, XDP_DROP, "its join is unknown now");
            } else {
                assert_eq!(verdict, XDP_TX, "token {i} still routes its join");
                assert_eq!(
                    recorded_backend(&dp, [192, 0, 2, 44], 47100 + i as u16),
                    5 + i as u32 % 3
                );
            }
        }
        // The collision rule holds in a full bucket: the same token learned for another
        // backend by a second connection leaves it where it is.
        let port2 = (41901u16..)
            .find(|p| owner_of(&ring, *p) != owner)
            .expect("a flow Maglev puts on another backend");
        assert_eq!(
            handshake(&mut dp, ifindex, port2, key, |_| {}),
            (XDP_TX, XDP_TX)
        );
        assert_eq!(dp.maps.tokens.get(token).expect("kept").backend, owner);
        assert_eq!(dp.counter(Counter::TokenCollision).expect("counter"), 1);
        assert_eq!(dp.counter(Counter::TokenEvicted).expect("counter"), 1);
    });
}

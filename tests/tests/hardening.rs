//! The dataplane against what a hostile or unlucky client side can do to its state, and
//! against backends changing state under it, through BPF_PROG_TEST_RUN: each test sets a
//! scene, sends the packets, then reads the tables and counters.

use lb_common::{
    counters::Counter,
    hash::flow_hash,
    maps::{BACKEND_DRAINING, BACKEND_OUT_OF_SERVICE},
};
use lb_userspace::dataplane::Dataplane;
use mptcp_lb_tests::{
    fixture::{XDP_DROP, XDP_TX, run_once},
    packets::*,
    testenv::*,
};

/// The Maglev service (VIP 10.100.0.6, backends 5-7): which backend Maglev gives a port.
fn owner_of(ring: &[u32], port: u16) -> u32 {
    ring[(flow_hash(&key4(CLIENT4, vip4(6), port, 80, 6), SEED) % RING) as usize]
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
            dp.maps.tokens.get(&sha256_token(key), 0).is_err(),
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
        assert!(
            dp.maps.tokens.get(&sha256_token(key2), 0).is_ok(),
            "learned"
        );
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
        let joined = dp
            .maps
            .conns
            .get(&key4([192, 0, 2, 99], vip4(6), 46002, 80, 6), 0)
            .expect("the join is recorded");
        assert_eq!(joined.backend, x);
        assert_eq!(c(&dp, Counter::LearnBackendOut), 1);
    });
}

//! Joins steered by port (`join_steering = "port"`), through BPF_PROG_TEST_RUN: the
//! backends set the C bit and announce VIP:join_port, and the dataplane sends every
//! packet of a join port to its backend from the VIP map alone, with no table entry, so
//! every node gives the same answer. Anything but an MP_JOIN SYN opening a subflow there
//! is dropped and counted; v1 handshakes on the service port teach no token.

use lb_common::{
    counters::Counter,
    maps::{BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_OUT_OF_SERVICE, VIP_STEERS_BY_PORT, VipInfo},
};
use lb_userspace::dataplane::Dataplane;
use mptcp_lb_tests::{
    fixture::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, run_once},
    packets::*,
    testenv::*,
};

/// The Maglev service (id 5, VIP 10.100.0.6:80, backends 5-7) with join ports 20005-20007
/// for backends 5-7; its service port marked as steering by port.
fn steer_by_port(dp: &mut Dataplane) {
    let vip = v4(vip4(6));
    dp.set_vip(
        vip,
        80,
        6,
        VipInfo {
            service: 5,
            flags: VIP_STEERS_BY_PORT,
        },
    )
    .expect("service port");
    for id in 5..=7u32 {
        dp.set_vip(vip, 20000 + id as u16, 6, VipInfo::join_port(5, id))
            .expect("join port");
    }
}

/// The outer destination of an IPv4-in-IPv4 frame.
fn outer_dst4(frame: &[u8]) -> [u8; 4] {
    let ip = ip_of(frame);
    [ip[16], ip[17], ip[18], ip[19]]
}

fn counter(dp: &Dataplane, c: Counter) -> u64 {
    dp.counter(c).expect("counter")
}

#[test]
fn every_packet_of_a_join_port_goes_to_its_backend_without_state() {
    let test = "every_packet_of_a_join_port_goes_to_its_backend_without_state";
    with_balancer(test, "jport", |mut dp, ring, link| {
        steer_by_port(&mut dp);
        let ifindex = link.ifindex;
        let client = [198, 18, 0, 7];
        let pkt = |port: u16, sport: u16, flags: Flags, opts: &[u8]| {
            tcp4(client, vip4(6), sport, port, flags, opts, &[])
        };
        // A join for a token nobody learned, on every join port: each reaches the
        // port's backend (the token does not matter), and nothing is recorded.
        for id in 5..=7u32 {
            let port = 20000 + id as u16;
            let (v, out) = run_once(
                dp.program(),
                &pkt(port, 40000 + id as u16, SYN, &mp_join_syn(0xdead_0000 + id)),
                ifindex,
            );
            assert_eq!(v, XDP_TX, "join SYN to port {port}");
            assert_eq!(
                outer_dst4(&out),
                MAGLEV_BES[(id - 5) as usize],
                "join SYN to port {port} reached backend {id}"
            );
        }
        assert_eq!(counter(&dp, Counter::JoinPortRouted), 3);
        assert_eq!(counter(&dp, Counter::JoinUnknownDropped), 0);
        assert_eq!(dp.maps.conns.len(), 0, "join ports keep no per-flow state");
        // The subflow's later packets follow it, on this node or any other.
        let (v, out) = run_once(dp.program(), &pkt(20006, 40006, ACK, &[]), ifindex);
        assert_eq!((v, outer_dst4(&out)), (XDP_TX, MAGLEV_BES[1]));
        // Path MTU: a "fragmentation needed" answering backend 6's reply on its join
        // subflow goes to backend 6 (no table entry to find it by).
        // A subflow Maglev would place elsewhere, so only the join port can be right.
        let sport = (41100u16..)
            .find(|p| {
                let k = key4(client, vip4(6), *p, 20006, 6);
                ring[(lb_common::hash::flow_hash(&k, SEED) % RING) as usize] != 6
            })
            .expect("a port");
        let reply = ip_of(&tcp4(vip4(6), client, 20006, sport, ACK, &[], &[0; 64]));
        let (v, out) = run_once(
            dp.program(),
            &icmp4_frag_needed(OTHER4, vip4(6), 1400, &reply),
            ifindex,
        );
        assert_eq!(
            (v, outer_dst4(&out)),
            (XDP_TX, MAGLEV_BES[1]),
            "ICMP to the join port's backend"
        );
        assert_eq!(counter(&dp, Counter::IcmpToBackend), 1);
        // Not a join: a new connection or a scan to a join port is dropped.
        assert_eq!(
            run_once(dp.program(), &pkt(20006, 41000, SYN, &[]), ifindex).0,
            XDP_DROP
        );
        assert_eq!(
            run_once(
                dp.program(),
                &pkt(20006, 41001, SYN, &MP_CAPABLE_SYN_V1),
                ifindex
            )
            .0,
            XDP_DROP
        );
        assert_eq!(counter(&dp, Counter::DropJoinPortNotJoin), 2);
        // A port nobody was given is no VIP.
        assert_eq!(
            run_once(
                dp.program(),
                &pkt(20008, 41002, SYN, &mp_join_syn(1)),
                ifindex
            )
            .0,
            XDP_PASS
        );

        // Backend 6 drains: its joins still arrive. Out of service: new joins are
        // dropped, established subflows still reach it. Removed: nothing reaches it.
        let addr6 = v4(MAGLEV_BES[1]);
        dp.set_backend(6, addr6, BACKEND_DRAINING).expect("drain");
        assert_eq!(
            run_once(
                dp.program(),
                &pkt(20006, 42000, SYN, &mp_join_syn(7)),
                ifindex
            )
            .0,
            XDP_TX
        );
        dp.set_backend(6, addr6, BACKEND_OUT_OF_SERVICE)
            .expect("out of service");
        assert_eq!(
            run_once(
                dp.program(),
                &pkt(20006, 42001, SYN, &mp_join_syn(7)),
                ifindex
            )
            .0,
            XDP_DROP
        );
        assert_eq!(counter(&dp, Counter::DropJoinPortBackendOut), 1);
        assert_eq!(
            run_once(dp.program(), &pkt(20006, 42000, ACK, &[]), ifindex).0,
            XDP_TX
        );
        dp.set_backend(6, addr6, 0).expect("removed");
        assert_eq!(
            run_once(dp.program(), &pkt(20006, 42000, ACK, &[]), ifindex).0,
            XDP_DROP
        );
        dp.set_backend(6, addr6, BACKEND_ACTIVE).expect("back");

        // IPv6 VIP, IPv6 backend (service 3: VIP fd00:1::4, backend 4): IP6IP6.
        dp.set_vip(v6(vip6(4)), 20004, 6, VipInfo::join_port(3, 4))
            .expect("join port v6");
        let (v, out) = run_once(
            dp.program(),
            &tcp6(CLIENT6, vip6(4), 43000, 20004, SYN, &mp_join_syn(9), &[]),
            ifindex,
        );
        assert_eq!(
            v, XDP_REDIRECT,
            "backend 4 is routed out of the other interface"
        );
        let ip = ip_of(&out);
        assert_eq!(ip[0] >> 4, 6, "IPv6 outer header");
        assert_eq!(&ip[24..40], &BE4, "to backend 4");
    });
}

/// With the C bit, a version 1 client never joins the service port: its handshake
/// teaches no token (no SHA-256, no insert). Version 0 clients have no C bit and are
/// still learned; a service that steers by token learns both (the control).
#[test]
fn a_service_steering_by_port_learns_only_version_0_tokens() {
    let test = "a_service_steering_by_port_learns_only_version_0_tokens";
    with_balancer(test, "jlearn", |mut dp, _ring, link| {
        let ifindex = link.ifindex;
        let handshake = |dp: &mut Dataplane, port: u16, version: u8, server_key: u64| {
            for p in mp_handshake4(port, version, server_key) {
                assert_eq!(run_once(dp.program(), &p, ifindex).0, XDP_TX);
            }
        };
        // The control first: steering by token, a v1 handshake is learned.
        handshake(&mut dp, 44000, 1, 0x1111);
        assert!(dp.maps.tokens.get(sha256_token(0x1111)).is_some());

        steer_by_port(&mut dp);
        handshake(&mut dp, 44001, 1, 0x2222);
        assert!(
            dp.maps.tokens.get(sha256_token(0x2222)).is_none(),
            "a v1 token learned on a service that steers by port"
        );
        assert_eq!(counter(&dp, Counter::TokenLearnedV1), 1);
        handshake(&mut dp, 44002, 0, 0x3333);
        assert!(
            dp.maps.tokens.get(sha1_token(0x3333)).is_some(),
            "v0 clients have no C bit: their tokens are still learned"
        );
        assert_eq!(counter(&dp, Counter::TokenLearnedV0), 1);
    });
}

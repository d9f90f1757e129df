//! Client-address affinity (`affinity = "client_address"`), through BPF_PROG_TEST_RUN:
//! every new connection of one client address goes to one backend, whatever its ports,
//! while different clients still spread over the backends; without it, one client's
//! connections spread too (the control).

use std::collections::HashSet;

use lb_common::maps::{VIP_AFFINITY_CLIENT, VipInfo};
use lb_userspace::dataplane::Dataplane;
use mptcp_lb_tests::{
    fixture::{XDP_TX, run_once},
    packets::*,
    testenv::*,
};

/// The backends (by outer destination) that `clients` x `ports` SYNs to the Maglev
/// service's VIP reach.
fn backends_reached(
    dp: &mut Dataplane,
    ifindex: u32,
    clients: &[[u8; 4]],
    ports: &[u16],
) -> HashSet<[u8; 4]> {
    let mut out = HashSet::new();
    for c in clients {
        for p in ports {
            let (v, frame) = run_once(
                dp.program(),
                &tcp4(*c, vip4(6), *p, 80, SYN, &[], &[]),
                ifindex,
            );
            assert_eq!(v, XDP_TX);
            let ip = ip_of(&frame);
            out.insert([ip[16], ip[17], ip[18], ip[19]]);
        }
    }
    out
}

#[test]
fn one_client_address_reaches_one_backend_and_clients_still_spread() {
    let test = "one_client_address_reaches_one_backend_and_clients_still_spread";
    with_balancer(test, "affin", |mut dp, _ring, link| {
        let ports: Vec<u16> = (42000..42040).collect();
        let one = [[198, 18, 7, 7]];
        // The control: without affinity, one client's 40 connections spread.
        let spread = backends_reached(&mut dp, link.ifindex, &one, &ports);
        assert!(
            spread.len() > 1,
            "the 5-tuple hash spreads one client's connections"
        );

        dp.set_vip(
            v4(vip4(6)),
            80,
            6,
            VipInfo {
                service: 5,
                flags: VIP_AFFINITY_CLIENT,
            },
        )
        .expect("affinity");
        let ports: Vec<u16> = (43000..43040).collect();
        let sticky = backends_reached(&mut dp, link.ifindex, &one, &ports);
        assert_eq!(
            sticky.len(),
            1,
            "one client address, one backend: {sticky:?}"
        );
        // Different clients still use every backend.
        let clients: Vec<[u8; 4]> = (1..=40).map(|i| [198, 18, 8, i]).collect();
        let many = backends_reached(&mut dp, link.ifindex, &clients, &[44000]);
        assert_eq!(many.len(), 3, "40 clients over the 3 backends: {many:?}");
        println!(
            "one client: {} backend(s) without affinity, {} with; 40 clients: {} backends",
            spread.len(),
            sticky.len(),
            many.len()
        );
    });
}

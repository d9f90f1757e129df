//! The backends' decapsulation program through BPF_PROG_TEST_RUN: tunnels addressed to
//! this host are stripped, and a congestion mark a router put on the outer header goes
//! on in the inner one (RFC 6040), or the packet is dropped when the inner packet is not
//! ECN-capable.

use std::net::IpAddr;

use aya::{Ebpf, maps::PerCpuArray, programs::Xdp};
use lb_common::{counters::Counter, maps::MAP_STATS};
use lb_userspace::{decap, loader::PROG_DECAP};
use mptcp_lb_tests::{
    fixture::{Fixture, Output, XDP_DROP, XDP_PASS, run_table},
    packets::*,
    privileged,
    testenv::{BE1, BE4, CLIENT4, CLIENT6, LB4, LB6, vip4, vip6},
};

const DMAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 1];
const SMAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 1];

/// `frame` with the IP header at 14 given the ECN bits `ecn` (IPv4 TOS, checksum
/// recomputed; IPv6 traffic class).
fn with_ecn(mut frame: Vec<u8>, ecn: u8) -> Vec<u8> {
    if frame[14] >> 4 == 4 {
        frame[15] = (frame[15] & !3) | ecn;
        frame[24..26].copy_from_slice(&[0, 0]);
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let c = inet_csum(&frame[14..14 + ihl]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
    } else {
        frame[15] = (frame[15] & !0x30) | (ecn << 4);
    }
    frame
}

/// The inner packet as the decapsulation program hands it to the stack.
fn stripped(inner: &[u8]) -> Vec<u8> {
    let mut v = DMAC.to_vec();
    v.extend_from_slice(&SMAC);
    let ethertype: u16 = if inner[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    v.extend_from_slice(&ethertype.to_be_bytes());
    v.extend_from_slice(inner);
    v
}

fn counter(ebpf: &Ebpf, c: Counter) -> u64 {
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(MAP_STATS).expect("stats map")).expect("stats type");
    stats.get(&(c as u32), 0).expect("counter").iter().sum()
}

#[test]
fn decapsulation_carries_congestion_marks_inward() {
    if !privileged("decapsulation_carries_congestion_marks_inward") {
        return;
    }
    let ebpf = decap::load(&[IpAddr::from(BE1), IpAddr::from(BE4)]).expect("load decap");
    let prog: &Xdp = ebpf
        .program(PROG_DECAP)
        .expect("decap program")
        .try_into()
        .expect("XDP");
    // IPv4 inner SYN marked ECT(0) and Not-ECT, in an IPIP tunnel whose outer header a
    // router marked CE (or left ECT(0)).
    let ect0 = with_ecn(tcp4(CLIENT4, vip4(1), 40001, 80, SYN, &[], &[]), 2);
    let not_ect = tcp4(CLIENT4, vip4(1), 40002, 80, SYN, &[], &[]);
    let tunnel4 = |inner: &[u8], outer_ecn: u8| {
        with_ecn(ipip4(DMAC, SMAC, LB4, BE1, &ip_of(inner)), outer_ecn)
    };
    // IPv6 inner marked ECT(1), in IP6IP6.
    let ect1_6 = with_ecn(tcp6(CLIENT6, vip6(4), 40004, 80, SYN, &[], &[]), 1);
    let tunnel6 = with_ecn(ipip6(DMAC, SMAC, LB6, BE4, 7, &ip_of(&ect1_6)), 3);

    let case = |description: &str, input: Vec<u8>, verdict: u32, output: Output| Fixture {
        description: description.into(),
        input,
        verdict,
        output,
    };
    let table = [
        case(
            "outer CE, inner IPv4 ECT(0) -> inner CE, checksum updated",
            tunnel4(&ect0, 3),
            XDP_PASS,
            Output::Exactly(stripped(&ip_of(&with_ecn(ect0.clone(), 3)))),
        ),
        case(
            "outer ECT(0), inner ECT(0) -> inner untouched",
            tunnel4(&ect0, 2),
            XDP_PASS,
            Output::Exactly(stripped(&ip_of(&ect0))),
        ),
        case(
            "outer CE, inner Not-ECT -> dropped",
            tunnel4(&not_ect, 3),
            XDP_DROP,
            Output::Ignored,
        ),
        case(
            "IP6IP6, outer CE, inner ECT(1) -> inner CE",
            tunnel6,
            XDP_PASS,
            Output::Exactly(stripped(&ip_of(&with_ecn(ect1_6.clone(), 3)))),
        ),
    ];
    run_table(prog, &table, 0);
    assert_eq!(counter(&ebpf, Counter::DecapCeNotEct), 1);
    assert_eq!(counter(&ebpf, Counter::DecapOk), 3);
}

//! The balancer program through BPF_PROG_TEST_RUN: the verifier accepts it, and each
//! crafted packet gets the expected verdict and leaves as expected.

use aya::programs::Xdp;
use lb_userspace::loader;
use mptcp_lb_tests::{
    fixture::{Fixture, Output, XDP_PASS, run_table},
    packets::*,
    privileged,
};

const CLIENT4: [u8; 4] = [10, 0, 0, 1];
const OTHER4: [u8; 4] = [10, 0, 0, 99];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const OTHER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99,
];

fn pass_untouched(description: &str, input: Vec<u8>) -> Fixture {
    Fixture {
        description: description.into(),
        input,
        verdict: XDP_PASS,
        output: Output::Unchanged,
    }
}

#[test]
fn parser_passes_everything_untouched() {
    if !privileged("parser_passes_everything_untouched") {
        return;
    }
    let mut ebpf = loader::open().expect("open object");
    let prog: &mut Xdp = ebpf
        .program_mut(loader::PROG_BALANCER)
        .expect("program")
        .try_into()
        .expect("xdp");
    prog.load().expect("the verifier accepts the balancer");

    let syn4 = tcp4(CLIENT4, OTHER4, 40000, 80, SYN, &[], &[]);
    let mut table = vec![
        pass_untouched("IPv4 TCP SYN", syn4.clone()),
        pass_untouched(
            "IPv6 TCP SYN",
            tcp6(CLIENT6, OTHER6, 40000, 80, SYN, &[], &[]),
        ),
        pass_untouched("IPv4 UDP", udp4(CLIENT4, OTHER4, 5353, 53, b"query")),
        pass_untouched("IPv6 UDP", udp6(CLIENT6, OTHER6, 5353, 53, b"query")),
        pass_untouched("802.1Q IPv4 TCP", with_vlan(&syn4, 42)),
        pass_untouched("ARP", {
            let mut p = syn4[..42].to_vec();
            p[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
            p
        }),
    ];
    // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header.
    for cut in [14, 15, 20, 33, 34, 40, 53] {
        table.push(pass_untouched(
            &format!("IPv4 TCP truncated to {cut} bytes"),
            syn4[..cut].to_vec(),
        ));
    }
    run_table(prog, &table);
}

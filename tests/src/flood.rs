//! A flood generator: hostile client traffic driven through the balancer's own program
//! in bulk (BPF_PROG_TEST_RUN), so it changes the very tables the attached program
//! forwards live traffic with. One thread per CPU, each pinned, as a NIC's receive-side
//! scaling would spread the packets; the frames are patched in place per packet (new
//! spoofed source, port or key), never rebuilt.

use std::time::{Duration, Instant};

use aya::programs::Xdp;

use crate::{
    fixture::run_once,
    netns::Netns,
    packets::{ACK, SYN, tcp4, udp4},
    testenv::{MP_CAPABLE_SYN_V1, mp_capable_keys, pin_to_cpu},
};

/// What the attacker sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// MP_CAPABLE SYNs, each from a new spoofed source and port.
    MpCapableSyns,
    /// Rounds of an MP_CAPABLE SYN, an ACK with a made-up server key and a plain ACK,
    /// all on one 5-tuple.
    HandshakesOneFlow,
    /// The same rounds, each from a new spoofed source and port.
    HandshakesManyFlows,
    /// Plain ACKs, each from a new spoofed source and port (misses in the table).
    Acks,
    /// UDP datagrams, each from a new spoofed source and port.
    Udp,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::MpCapableSyns,
        Kind::HandshakesOneFlow,
        Kind::HandshakesManyFlows,
        Kind::Acks,
        Kind::Udp,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Kind::MpCapableSyns => "spoofed MP_CAPABLE SYNs",
            Kind::HandshakesOneFlow => "SYN + forged-key ACK + ACK, one 5-tuple",
            Kind::HandshakesManyFlows => "SYN + forged-key ACK + ACK, spoofed 5-tuples",
            Kind::Acks => "spoofed plain ACKs",
            Kind::Udp => "spoofed UDP",
        }
    }
}

/// Where the flood goes: the balancer's program (attached or not: its maps are the
/// live ones), the namespace and interface it runs for, and the VIP.
pub struct Target<'a> {
    pub prog: &'a Xdp,
    pub ns: &'a Netns,
    pub ifindex: u32,
    pub vip: [u8; 4],
    pub tcp_port: u16,
    pub udp_port: u16,
}

/// What one flood did.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub kind: Kind,
    pub rounds: u64,
    pub packets: u64,
    pub elapsed: Duration,
}

impl Report {
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64()
    }
}

/// Spoofed sources: 100.64.0.0/10 (shared address space) plus the round number.
fn spoofed(i: u64) -> [u8; 4] {
    let a = 0x6440_0000u32 | (i as u32 & 0x003f_ffff);
    a.to_be_bytes()
}

/// Frame offsets: Ethernet 14, IPv4 20 (source at 26), TCP/UDP at 34 (source port);
/// the MP_CAPABLE option of a third ACK starts at 54, its server key 14 bytes in.
const SRC: usize = 26;
const SPORT: usize = 34;
const SERVER_KEY: usize = 54 + 14;

fn patch(frame: &mut [u8], src: [u8; 4], sport: u16) {
    frame[SRC..SRC + 4].copy_from_slice(&src);
    frame[SPORT..SPORT + 2].copy_from_slice(&sport.to_be_bytes());
}

/// Sends `rounds` rounds of `kind` from `cpus` threads (thread k pinned to CPU k, taking
/// every k-th round).
pub fn flood(t: &Target, kind: Kind, rounds: u64, cpus: usize) -> Report {
    let started = Instant::now();
    let packets: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cpus)
            .map(|cpu| {
                s.spawn(move || {
                    t.ns.join_current_thread();
                    pin_to_cpu(cpu);
                    one_thread(t, kind, rounds, cpu as u64, cpus as u64)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("flood thread"))
            .sum()
    });
    Report {
        kind,
        rounds,
        packets,
        elapsed: started.elapsed(),
    }
}

fn one_thread(t: &Target, kind: Kind, rounds: u64, first: u64, step: u64) -> u64 {
    let (vip, port) = (t.vip, t.tcp_port);
    let mut syn = tcp4([0; 4], vip, 0, port, SYN, &MP_CAPABLE_SYN_V1, &[]);
    let mut keys = tcp4(
        [0; 4],
        vip,
        0,
        port,
        ACK,
        &mp_capable_keys(1, 20, 0x5eed, 0),
        &[],
    );
    let mut ack = tcp4([0; 4], vip, 0, port, ACK, &[], b"x");
    let mut udp = udp4([0; 4], vip, 0, t.udp_port, b"flood");
    // One flow per thread for the one-5-tuple kind, as one client's RSS queue.
    let own = spoofed(0xff_0000 + first);
    for f in [&mut syn, &mut keys, &mut ack] {
        patch(f, own, 40000);
    }
    let mut sent = 0;
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ first;
    let mut i = first;
    while i < rounds {
        let (src, sport) = (spoofed(i), 1024 + (i % 60000) as u16);
        match kind {
            Kind::MpCapableSyns => {
                patch(&mut syn, src, sport);
                run_once(t.prog, &syn, t.ifindex);
                sent += 1;
            }
            Kind::HandshakesOneFlow | Kind::HandshakesManyFlows => {
                if kind == Kind::HandshakesManyFlows {
                    for f in [&mut syn, &mut keys, &mut ack] {
                        patch(f, src, sport);
                    }
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                keys[SERVER_KEY..SERVER_KEY + 8].copy_from_slice(&x.to_be_bytes());
                for f in [&syn, &keys, &ack] {
                    run_once(t.prog, f, t.ifindex);
                }
                sent += 3;
            }
            Kind::Acks => {
                patch(&mut ack, src, sport);
                run_once(t.prog, &ack, t.ifindex);
                sent += 1;
            }
            Kind::Udp => {
                patch(&mut udp, src, sport);
                run_once(t.prog, &udp, t.ifindex);
                sent += 1;
            }
        }
        i += step;
    }
    sent
}

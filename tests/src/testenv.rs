//! The namespace and balancer configuration that the packet fixtures and the benchmark
//! share, so they cannot drift apart: routes and permanent neighbours make every FIB
//! lookup, and so every output frame, deterministic.

use std::net::IpAddr;

use lb_common::maps::{BACKEND_ACTIVE, Config, FlowKey};
use lb_userspace::{
    dataplane::{Dataplane, Sizes, addr_words},
    maglev,
};

use crate::privileged;

use crate::netns::{Netns, veth};

pub const CLIENT4: [u8; 4] = [192, 0, 2, 10];
pub const CLIENT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
pub const OTHER4: [u8; 4] = [198, 51, 100, 1];
pub const OTHER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];
pub const LB4: [u8; 4] = [10, 10, 0, 1];
pub const LB6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const GW_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
pub const OUT_GW_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
pub const SEED: u32 = 0x5eed_1234;
pub const RING: u32 = 1009;
/// Map sizes of the packet-level tests: small tables load fast and nothing evicts.
pub const TEST_SIZES: Sizes = Sizes {
    ring_size: RING,
    conn_entries: 4096,
    conn6_entries: 4096,
    token_entries: 4096,
};

pub fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::from(a)
}
pub fn v6(a: [u8; 16]) -> IpAddr {
    IpAddr::from(a)
}
pub fn vip4(last: u8) -> [u8; 4] {
    [10, 100, 0, last]
}
pub fn vip6(last: u8) -> [u8; 16] {
    [0xfd, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last]
}

// Backends: ids 1-2 are routed out of the ingress interface (XDP_TX), 3-4 out of the
// other one (XDP_REDIRECT); 5-7 share a service to exercise Maglev.
pub const BE1: [u8; 4] = [10, 1, 0, 11];
pub const BE2: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12];
pub const BE3: [u8; 4] = [10, 2, 0, 13];
pub const BE4: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x14];
pub const MAGLEV_BES: [[u8; 4]; 3] = [[10, 1, 0, 21], [10, 1, 0, 22], [10, 1, 0, 23]];

pub struct Env {
    pub ns: Netns,
    _peer: Netns,
    pub lb_mac: [u8; 6],
    pub out_mac: [u8; 6],
    pub ifindex: u32,
}

/// The balancer's namespace `mlb-<tag>` and a peer holding the other veth ends.
pub fn environment(tag: &str) -> Env {
    let ns = Netns::new(&format!("mlb-{tag}"));
    let peer = Netns::new(&format!("mlb-{tag}-peer"));
    veth(&ns, "lb0", &peer, "gw0", 1500);
    veth(&ns, "out0", &peer, "gw1", 1500);
    ns.addr("lb0", "10.10.0.1/24");
    ns.addr("lb0", "fd00:10::1/64");
    ns.addr("out0", "10.20.0.1/24");
    ns.addr("out0", "fd00:20::1/64");
    ns.neigh_permanent("lb0", "10.10.0.254", "02:aa:00:00:00:01");
    ns.neigh_permanent("lb0", "fd00:10::fe", "02:aa:00:00:00:01");
    ns.neigh_permanent("out0", "10.20.0.254", "02:bb:00:00:00:01");
    ns.neigh_permanent("out0", "fd00:20::fe", "02:bb:00:00:00:01");
    ns.route(&["10.1.0.0/24", "via", "10.10.0.254"]);
    ns.route(&["fd00:1::/64", "via", "fd00:10::fe"]);
    ns.route(&["10.2.0.0/24", "via", "10.20.0.254"]);
    ns.route(&["fd00:2::/64", "via", "fd00:20::fe"]);
    ns.sysctl("net.ipv4.ip_forward", "1");
    ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    Env {
        lb_mac: ns.mac("lb0"),
        out_mac: ns.mac("out0"),
        ifindex: ns.ifindex("lb0"),
        ns,
        _peer: peer,
    }
}

pub fn key4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: addr_words(v4(src)).0,
        dst: addr_words(v4(dst)).0,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family: 4,
        _pad: [0; 2],
    }
}

pub fn key6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> FlowKey {
    FlowKey {
        src: addr_words(v6(src)).0,
        dst: addr_words(v6(dst)).0,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: 6,
        family: 6,
        _pad: [0; 2],
    }
}

/// The Maglev service's backends (ids 5, 6, 7).
pub fn maglev_members() -> Vec<maglev::Member> {
    MAGLEV_BES
        .iter()
        .enumerate()
        .map(|(i, a)| maglev::Member {
            id: 5 + i as u32,
            key: v4(*a).to_string(),
            weight: 1,
        })
        .collect()
}

pub fn configure(dp: &mut Dataplane) -> Vec<u32> {
    dp.set_config(Config {
        seed: SEED,
        src4: addr_words(v4(LB4)).0[0],
        src6: addr_words(v6(LB6)).0,
        ..Default::default()
    })
    .expect("config");
    let backends: [(u32, IpAddr); 4] = [(1, v4(BE1)), (2, v6(BE2)), (3, v4(BE3)), (4, v6(BE4))];
    for (id, addr) in backends {
        dp.set_backend(id, addr, BACKEND_ACTIVE).expect("backend");
    }
    let single = |id: u32, addr: IpAddr| {
        vec![maglev::Member {
            id,
            key: addr.to_string(),
            weight: 1,
        }]
    };
    // One service per encapsulation combination, each with a single backend.
    for (service, vip, (id, addr)) in [
        (0, v4(vip4(1)), backends[0]),
        (1, v4(vip4(2)), backends[1]),
        (2, v6(vip6(3)), backends[2]),
        (3, v6(vip6(4)), backends[3]),
    ] {
        dp.add_vip(vip, 80, 6, service).expect("vip");
        dp.set_ring(service, &single(id, addr)).expect("ring");
    }
    dp.add_vip(v4(vip4(1)), 53, 17, 0).expect("udp vip");
    // Service 5: three backends under Maglev.
    let members = maglev_members();
    for m in &members {
        dp.set_backend(m.id, m.key.parse().expect("addr"), BACKEND_ACTIVE)
            .expect("backend");
    }
    dp.add_vip(v4(vip4(6)), 80, 6, 5).expect("vip");
    dp.set_ring(5, &members).expect("ring");
    // Service 6: a VIP with no backend.
    dp.add_vip(v4(vip4(7)), 80, 6, 6).expect("vip");
    maglev::build(&members, RING)
}

/// MP_CAPABLE option of a client's third ACK or first data segment: both keys, then
/// (len 22, 24) the data-level length and checksum; padded with NOPs to a multiple of 4.
pub fn mp_capable_keys(version: u8, len: u8, client_key: u64, server_key: u64) -> Vec<u8> {
    let mut o = vec![1, 1, 30, len, version, 0x01];
    o.extend_from_slice(&client_key.to_be_bytes());
    o.extend_from_slice(&server_key.to_be_bytes());
    o.resize(2 + len as usize, 0);
    while o.len() % 4 != 0 {
        o.push(1);
    }
    o
}

pub fn mp_join_syn(token: u32) -> Vec<u8> {
    let mut o = vec![30, 12, 0x10, 1];
    o.extend_from_slice(&token.to_be_bytes());
    o.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    o
}

/// A client's MP_CAPABLE SYN (its key in it for version 0) and its third ACK with both
/// keys (the client's, then `server_key`), on CLIENT4:`port` -> vip4(6):80.
pub fn mp_handshake4(port: u16, version: u8, server_key: u64) -> [Vec<u8>; 2] {
    use crate::packets::{ACK, SYN, tcp4};
    let syn_opt: &[u8] = if version == 0 {
        &MP_CAPABLE_SYN_V0
    } else {
        &MP_CAPABLE_SYN_V1
    };
    [
        tcp4(CLIENT4, vip4(6), port, 80, SYN, syn_opt, &[]),
        tcp4(
            CLIENT4,
            vip4(6),
            port,
            80,
            ACK,
            &mp_capable_keys(version, 20, V0_CLIENT_KEY, server_key),
            &[],
        ),
    ]
}

/// The client key [`MP_CAPABLE_SYN_V0`] carries.
pub const V0_CLIENT_KEY: u64 = 0xc1c2_c3c4_c5c6_c7c8;

pub const MP_CAPABLE_SYN_V1: [u8; 4] = [30, 4, 0x01, 0x01];
pub const MP_CAPABLE_SYN_V0: [u8; 12] = [
    30, 12, 0x00, 0x01, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8,
];

/// What a fixture test knows of its balancer's namespace and link.
pub struct Link {
    pub ns_name: String,
    pub ifindex: u32,
    pub lb_mac: [u8; 6],
    pub out_mac: [u8; 6],
}

/// The frame of every fixture test. Without root it says why and stops (`privileged`; under
/// CI=true it fails instead). Otherwise `body` runs inside the new namespace `mlb-<tag>`
/// with the balancer loaded and configured, and gets `configure`'s Maglev ring.
pub fn with_balancer(
    test: &str,
    tag: &str,
    body: impl FnOnce(Dataplane, Vec<u32>, Link) + Send + 'static,
) {
    if !privileged(test) {
        return;
    }
    let env = environment(tag);
    let link = Link {
        ns_name: env.ns.name().to_string(),
        ifindex: env.ifindex,
        lb_mac: env.lb_mac,
        out_mac: env.out_mac,
    };
    env.ns.within(move || {
        let mut dp = Dataplane::load(TEST_SIZES).expect("load balancer");
        let ring = configure(&mut dp);
        body(dp, ring, link);
    });
}

/// Keeps the calling thread on CPU 0, so per-CPU dataplane state (the next-hop cache,
/// the rate windows) has one value the test can reason about.
pub fn pin_to_cpu0() {
    pin_to_cpu(0);
}

/// Keeps the calling thread on CPU `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread; the call only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0,
            "pin to CPU {cpu}"
        );
    }
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock of the token table's times. Not
/// `inspect::monotonic_ns`: the precise clock runs up to a tick ahead of it, and a time
/// read before a packet must not be later than what the packet writes.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn sha256_token(key: u64) -> u32 {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(key.to_be_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

pub fn sha1_token(key: u64) -> u32 {
    use sha1::Digest as _;
    let d = sha1::Sha1::digest(key.to_be_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Empties rate window `slot` (`lb_common::maps::RATE_*`) on every CPU, as if a new
/// second had begun: tests of the per-CPU limits run without waiting for the clock.
pub fn reset_rate_window(dp: &mut Dataplane, slot: u32) {
    let mut rate: aya::maps::PerCpuArray<_, lb_common::maps::ConnRate> =
        aya::maps::PerCpuArray::try_from(
            dp.ebpf
                .map_mut(lb_common::maps::MAP_CONN_RATE)
                .expect("rate map"),
        )
        .expect("rate map type");
    let cpus = aya::util::nr_cpus().expect("cpus");
    rate.set(
        slot,
        aya::maps::PerCpuValues::try_from(vec![Default::default(); cpus]).expect("values"),
        0,
    )
    .expect("reset the window");
}

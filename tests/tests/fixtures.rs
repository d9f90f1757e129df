//! The balancer through BPF_PROG_TEST_RUN, Katran style: a table of {description, input,
//! expected verdict, expected output}. It runs inside a network namespace whose routes
//! and permanent neighbour entries make the FIB lookups, and so the output frames,
//! deterministic.

use lb_common::{
    counters::Counter,
    hash::flow_hash,
    maps::{Config, FlowKey},
    tokens::STAMP_NS,
};
use lb_userspace::{
    dataplane::{Dataplane, addr_words},
    maglev,
};
use mptcp_lb_tests::{
    fixture::{Fixture, Output, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, run_once, run_table},
    netns::{Netns, wait_until},
    packets::*,
    testenv::*,
};
use std::time::{Duration, Instant};

fn case(description: &str, input: Vec<u8>, verdict: u32, output: Output) -> Fixture {
    Fixture {
        description: description.into(),
        input,
        verdict,
        output,
    }
}

#[test]
fn balancer_fixtures() {
    with_balancer("balancer_fixtures", "fx", |mut dp, ring, link| {
        assert_eq!(ring.len(), RING as usize);
        let table = table(link.lb_mac, link.out_mac, &ring);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_table(dp.program(), &table, link.ifindex)
        }));
        for (c, v) in dp.counters().expect("counters") {
            if v > 0 {
                println!("    counter {}: {v}", c.label());
            }
        }
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        check_state_after_table(&dp);
    });
}

/// The connection table and counters the table must have left behind.
fn check_state_after_table(dp: &Dataplane) {
    let c = |k| dp.counter(k).expect("counter");
    assert_eq!(
        c(Counter::DropFragment),
        2,
        "fragments to a VIP are dropped and counted"
    );
    assert_eq!(c(Counter::DropIpv6Ext), 1);
    assert_eq!(c(Counter::DropNoBackend), 1);
    assert_eq!(c(Counter::DropTooBig), 1);
    assert_eq!(
        c(Counter::IcmpToBackend),
        2,
        "fragmentation needed and packet too big quoting VIP flows"
    );
    assert_eq!(c(Counter::DropTruncated), 4);
    assert!(
        c(Counter::ConnHit) >= 2,
        "the ACK and the second UDP datagram hit the table"
    );
    assert_eq!(
        c(Counter::ConnMissNonSyn),
        2,
        "the unknown ACK and the oversized ACK"
    );
    assert!(c(Counter::Tx) >= 5 && c(Counter::Redirect) >= 2);
    let conn = dp
        .maps
        .conns
        .get(&key4(CLIENT4, vip4(1), 40001, 80, 6))
        .expect("the SYN's flow is in the connection table");
    assert_eq!(conn.backend, 1);
    let traffic = dp.backend_traffic(1).expect("backend stats");
    assert!(traffic.packets >= 3 && traffic.bytes > 0);
}

fn table(lb_mac: [u8; 6], out_mac: [u8; 6], ring: &[u32]) -> Vec<Fixture> {
    let tx4 = |inner: &[u8], dst: [u8; 4]| ipip4(GW_MAC, lb_mac, LB4, dst, inner);
    let flow_label = |k: &FlowKey| flow_hash(k, SEED);

    // What leaves for backend 4 (IPv6, out of the other interface) for a packet from
    // CLIENT6:port to the IPv6 VIP of service 3.
    let to_be4 = |p: &[u8], port: u16| {
        Output::Exactly(ipip6(
            OUT_GW_MAC,
            out_mac,
            LB6,
            BE4,
            flow_label(&key6(CLIENT6, vip6(4), port, 80)),
            &ip_of(p),
        ))
    };
    let syn_v4v4 = tcp4(CLIENT4, vip4(1), 40001, 80, SYN, &[], &[]);
    // A router on the way back to the client could not send a backend's direct reply
    // (VIP:80 -> client:port) and tells the VIP; and one quoting a packet that is no VIP
    // flow's (its source is not the VIP it is sent to).
    let reply4 = ip_of(&tcp4(vip4(1), CLIENT4, 80, 40001, ACK, &[], &[0; 64]));
    let frag_needed = icmp4_frag_needed(OTHER4, vip4(1), 1400, &reply4);
    let other_reply = ip_of(&tcp4(OTHER4, CLIENT4, 80, 40001, ACK, &[], &[]));
    let frag_needed_other = icmp4_frag_needed(OTHER4, vip4(1), 1400, &other_reply);
    let reply6 = ip_of(&tcp6(vip6(4), CLIENT6, 80, 40004, ACK, &[], &[0; 64]));
    let too_big = icmp6_too_big(OTHER6, vip6(4), 1280, &reply6);
    // DSCP EF (46) with ECN ECT(0), and with CE: the TOS byte 0xba and 0xbb. IPv4's
    // header checksum is patched for the changed byte.
    let mut marked_v4 = tcp4(CLIENT4, vip4(1), 40013, 80, SYN, &[], &[]);
    marked_v4[15] = 0xba;
    marked_v4[24..26].copy_from_slice(&[0, 0]);
    let sum = inet_csum(&marked_v4[14..34]);
    marked_v4[24..26].copy_from_slice(&sum.to_be_bytes());
    let mut marked_v6 = tcp6(CLIENT6, vip6(4), 40014, 80, SYN, &[], &[]);
    marked_v6[14] = 0x60 | (0xbb >> 4);
    marked_v6[15] = (0xbb << 4) | (marked_v6[15] & 0x0f);
    let syn_v4v6 = tcp4(CLIENT4, vip4(2), 40002, 80, SYN, &[], &[]);
    let syn_v6v4 = tcp6(CLIENT6, vip6(3), 40003, 80, SYN, &[], &[]);
    let syn_v6v6 = tcp6(CLIENT6, vip6(4), 40004, 80, SYN, &[], &[]);
    let ack_known = tcp4(
        CLIENT4,
        vip4(1),
        40001,
        80,
        ACK,
        &[],
        b"GET / HTTP/1.1\r\n\r\n",
    );
    let ack_unknown = tcp4(CLIENT4, vip4(1), 40099, 80, ACK, &[], b"data");
    let udp = udp4(CLIENT4, vip4(1), 5353, 53, b"query");
    let mut t = vec![
        case(
            "IPv4 TCP SYN to a non-VIP passes untouched",
            tcp4(CLIENT4, OTHER4, 40000, 22, SYN, &[], &[]),
            XDP_PASS,
            Output::Unchanged,
        ),
        case(
            "IPv6 TCP SYN to a non-VIP passes untouched",
            tcp6(CLIENT6, OTHER6, 40000, 22, SYN, &[], &[]),
            XDP_PASS,
            Output::Unchanged,
        ),
        case(
            "IPv4 TCP to a VIP address on a port with no service",
            tcp4(CLIENT4, vip4(1), 40000, 8080, SYN, &[], &[]),
            XDP_PASS,
            Output::Unchanged,
        ),
        case(
            "UDP to a TCP-only VIP port",
            udp4(CLIENT4, vip4(2), 40000, 80, b"x"),
            XDP_PASS,
            Output::Unchanged,
        ),
        case(
            "IPv6 UDP to a non-VIP",
            udp6(CLIENT6, OTHER6, 5353, 53, b"q"),
            XDP_PASS,
            Output::Unchanged,
        ),
        case(
            "IPv4 VIP SYN, new flow -> IPv4 backend (IPIP, XDP_TX)",
            syn_v4v4.clone(),
            XDP_TX,
            Output::Exactly(tx4(&ip_of(&syn_v4v4), BE1)),
        ),
        case(
            "IPv4 VIP SYN -> IPv6 backend (4in6, XDP_TX)",
            syn_v4v6.clone(),
            XDP_TX,
            Output::Exactly(ipip6(
                GW_MAC,
                lb_mac,
                LB6,
                BE2,
                flow_label(&key4(CLIENT4, vip4(2), 40002, 80, 6)),
                &ip_of(&syn_v4v6),
            )),
        ),
        case(
            "IPv6 VIP SYN -> IPv4 backend (6in4, XDP_REDIRECT)",
            syn_v6v4.clone(),
            XDP_REDIRECT,
            Output::Exactly(ipip4(OUT_GW_MAC, out_mac, LB4, BE3, &ip_of(&syn_v6v4))),
        ),
        case(
            "IPv6 VIP SYN -> IPv6 backend (IP6IP6, XDP_REDIRECT)",
            syn_v6v6.clone(),
            XDP_REDIRECT,
            to_be4(&syn_v6v6, 40004),
        ),
        case(
            "IPv4 SYN marked EF + ECT(0) -> the outer IPv4 header carries the marking",
            marked_v4.clone(),
            XDP_TX,
            Output::Exactly(ipip4(GW_MAC, lb_mac, LB4, BE1, &ip_of(&marked_v4))),
        ),
        case(
            "IPv6 SYN marked EF + CE -> the outer IPv6 traffic class carries the marking",
            marked_v6.clone(),
            XDP_REDIRECT,
            to_be4(&marked_v6, 40014),
        ),
        case(
            "ICMP fragmentation needed quoting a VIP flow's reply -> that flow's backend",
            frag_needed.clone(),
            XDP_TX,
            Output::Exactly(ipip4(GW_MAC, lb_mac, LB4, BE1, &ip_of(&frag_needed))),
        ),
        case(
            "ICMPv6 packet too big quoting a VIP flow's reply -> that flow's backend",
            too_big.clone(),
            XDP_REDIRECT,
            to_be4(&too_big, 40004),
        ),
        case(
            "ICMP fragmentation needed quoting no VIP flow -> host",
            frag_needed_other,
            XDP_PASS,
            Output::Unchanged,
        ),
        case(
            "ACK with data on the known flow -> its backend",
            ack_known.clone(),
            XDP_TX,
            Output::Exactly(tx4(&ip_of(&ack_known), BE1)),
        ),
        case(
            "ACK on an unknown flow -> Maglev fallback, counted",
            ack_unknown.clone(),
            XDP_TX,
            Output::Exactly(tx4(&ip_of(&ack_unknown), BE1)),
        ),
        case(
            "UDP to a VIP -> encapsulated",
            udp.clone(),
            XDP_TX,
            Output::Exactly(tx4(&ip_of(&udp), BE1)),
        ),
        case(
            "UDP again on the same flow (table hit)",
            udp.clone(),
            XDP_TX,
            Output::Exactly(tx4(&ip_of(&udp), BE1)),
        ),
        case(
            "802.1Q-tagged SYN to a VIP -> encapsulated, tag dropped",
            with_vlan(&syn_v4v4, 7),
            XDP_TX,
            Output::Exactly(tx4(&ip_of(&syn_v4v4), BE1)),
        ),
    ];

    // IPv4 with options (IHL 6): the inner packet, options included, goes untouched.
    let mut with_opts = tcp4(CLIENT4, vip4(1), 40010, 80, SYN, &[], &[]);
    with_opts.splice(34..34, [1u8, 1, 1, 0]); // NOP NOP NOP EOL
    with_opts[14] = 0x46;
    let tot = u16::from_be_bytes([with_opts[16], with_opts[17]]) + 4;
    with_opts[16..18].copy_from_slice(&tot.to_be_bytes());
    with_opts[24..26].copy_from_slice(&[0, 0]);
    let c = inet_csum(&with_opts[14..38]);
    with_opts[24..26].copy_from_slice(&c.to_be_bytes());
    t.push(case(
        "IPv4 with options (IHL 6) to a VIP -> encapsulated whole",
        with_opts.clone(),
        XDP_TX,
        Output::Exactly(tx4(&ip_of(&with_opts), BE1)),
    ));

    let frag = |flags_off: u16, dst: [u8; 4]| {
        let mut p = udp4(CLIENT4, dst, 5353, 53, b"fragmented");
        p[20..22].copy_from_slice(&flags_off.to_be_bytes());
        p
    };
    t.push(case(
        "IPv4 first fragment (MF) to a VIP address: dropped",
        frag(0x2000, vip4(1)),
        XDP_DROP,
        Output::Unchanged,
    ));
    t.push(case(
        "IPv4 later fragment (offset) to a VIP address: dropped",
        frag(0x0010, vip4(1)),
        XDP_DROP,
        Output::Unchanged,
    ));
    t.push(case(
        "IPv4 fragment to a non-VIP: passed",
        frag(0x2000, OTHER4),
        XDP_PASS,
        Output::Unchanged,
    ));

    let hop_by_hop = |dst: [u8; 16]| {
        let mut p = tcp6(CLIENT6, dst, 40000, 80, SYN, &[], &[]);
        p[20] = 0; // next header: hop-by-hop options
        p
    };
    t.push(case(
        "IPv6 with an extension header to a VIP: dropped",
        hop_by_hop(vip6(3)),
        XDP_DROP,
        Output::Unchanged,
    ));
    t.push(case(
        "IPv6 with an extension header to a non-VIP: passed",
        hop_by_hop(OTHER6),
        XDP_PASS,
        Output::Unchanged,
    ));

    let mut icmp = udp4(CLIENT4, vip4(1), 0, 0, b"ping");
    icmp[23] = 1; // protocol ICMP
    t.push(case(
        "ICMP to a VIP address: passed to the host",
        icmp,
        XDP_PASS,
        Output::Unchanged,
    ));
    let mut ihl4 = syn_v4v4.clone();
    ihl4[14] = 0x44;
    t.push(case(
        "IPv4 header length below 20: passed as malformed",
        ihl4,
        XDP_PASS,
        Output::Unchanged,
    ));
    let mut wrong_version = syn_v4v4.clone();
    wrong_version[14] = 0x65;
    t.push(case(
        "EtherType IPv4 with version 6 inside: passed",
        wrong_version,
        XDP_PASS,
        Output::Unchanged,
    ));
    let mut arp = syn_v4v4[..42].to_vec();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    t.push(case("ARP: passed", arp, XDP_PASS, Output::Unchanged));

    t.push(case(
        "SYN to a service without backends: dropped",
        tcp4(CLIENT4, vip4(7), 40000, 80, SYN, &[], &[]),
        XDP_DROP,
        Output::Unchanged,
    ));
    let big = tcp4(CLIENT4, vip4(1), 40020, 80, ACK, &[], &[0x55; 1460]);
    t.push(case(
        "1500-byte packet: too big for the 1500 MTU once encapsulated: dropped",
        big,
        XDP_DROP,
        Output::Ignored,
    ));

    // Maglev: each new flow goes where the ring (built independently here) says.
    for sport in [50001u16, 50002, 50003, 50004] {
        let k = key4(CLIENT4, vip4(6), sport, 80, 6);
        let id = ring[(flow_hash(&k, SEED) % RING) as usize];
        let be = MAGLEV_BES[(id - 5) as usize];
        let syn = tcp4(CLIENT4, vip4(6), sport, 80, SYN, &[], &[]);
        t.push(case(
            &format!("Maglev service, source port {sport} -> backend {}", v4(be)),
            syn.clone(),
            XDP_TX,
            Output::Exactly(tx4(&ip_of(&syn), be)),
        ));
    }

    // Truncation at every layer: never read past the end; VIP traffic is dropped,
    // the rest passed.
    for cut in [14, 15, 20, 33] {
        t.push(case(
            &format!("IPv4 SYN to a VIP cut to {cut} bytes (IP header incomplete): passed"),
            syn_v4v4[..cut].to_vec(),
            XDP_PASS,
            Output::Unchanged,
        ));
    }
    for cut in [34, 40, 53] {
        t.push(case(
            &format!("IPv4 SYN to a VIP cut to {cut} bytes (TCP header incomplete): dropped"),
            syn_v4v4[..cut].to_vec(),
            XDP_DROP,
            Output::Unchanged,
        ));
    }
    let non_vip = tcp4(CLIENT4, OTHER4, 40000, 22, SYN, &[], &[]);
    t.push(case(
        "IPv4 SYN to a non-VIP cut inside TCP: passed",
        non_vip[..40].to_vec(),
        XDP_PASS,
        Output::Unchanged,
    ));
    t.push(case(
        "IPv6 SYN cut inside the IPv6 header: passed",
        syn_v6v6[..40].to_vec(),
        XDP_PASS,
        Output::Unchanged,
    ));
    let mut long_claim = syn_v4v4.clone();
    long_claim[16..18].copy_from_slice(&200u16.to_be_bytes());
    t.push(case(
        "IPv4 total length beyond the frame, to a VIP: dropped",
        long_claim,
        XDP_DROP,
        Output::Unchanged,
    ));
    t.push(case(
        "VLAN tag cut short: passed",
        with_vlan(&syn_v4v4, 7)[..16].to_vec(),
        XDP_PASS,
        Output::Unchanged,
    ));
    t
}

#[test]
fn removed_backend_connections_are_replaced() {
    let test = "removed_backend_connections_are_replaced";
    with_balancer(test, "repick", |mut dp, _, link| {
        let ifindex = link.ifindex;
        let syn = tcp4(CLIENT4, vip4(6), 50001, 80, SYN, &[], &[]);
        let ack = tcp4(CLIENT4, vip4(6), 50001, 80, ACK, &[], b"x");
        assert_eq!(run_once(dp.program(), &syn, ifindex).0, XDP_TX);
        let first = dp
            .maps
            .conns
            .get(&key4(CLIENT4, vip4(6), 50001, 80, 6))
            .expect("conn")
            .backend;
        // Take the flow's backend out of service: the next packet re-picks among the rest.
        let rest: Vec<maglev::Member> = maglev_members()
            .into_iter()
            .filter(|m| m.id != first)
            .collect();
        dp.set_ring(5, &rest).expect("ring");
        dp.set_backend(first, v4(MAGLEV_BES[(first - 5) as usize]), 0)
            .expect("remove backend");
        let (verdict, out) = run_once(dp.program(), &ack, ifindex);
        assert_eq!(verdict, XDP_TX);
        let now = dp
            .maps
            .conns
            .get(&key4(CLIENT4, vip4(6), 50001, 80, 6))
            .expect("conn")
            .backend;
        assert_ne!(now, first, "a connection to a removed backend moves");
        assert_eq!(
            &out[30..34],
            &MAGLEV_BES[(now - 5) as usize],
            "outer destination is the new backend"
        );
        assert_eq!(dp.counter(Counter::ConnRepick).expect("counter"), 1);
    });
}

/// A SYN on a 5-tuple the table knows (a client reusing its port) starts a new
/// connection: it goes where the pool sends new connections now, not to the old entry's
/// backend, and the entry becomes the new connection's (its learned token and MPTCP
/// state gone), with no second entry for the 5-tuple.
#[test]
fn a_syn_on_a_known_5_tuple_replaces_its_entry() {
    let test = "a_syn_on_a_known_5_tuple_replaces_its_entry";
    with_balancer(test, "reuse", |mut dp, _, link| {
        let ifindex = link.ifindex;
        let key = key4(CLIENT4, vip4(6), 50002, 80, 6);
        // An MPTCP connection that learned its token.
        let syn = tcp4(CLIENT4, vip4(6), 50002, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
        let keys = mp_capable_keys(1, 20, 0x51, 0x0e0e_0000_0000_0002);
        let ack = tcp4(CLIENT4, vip4(6), 50002, 80, ACK, &keys, &[]);
        assert_eq!(run_once(dp.program(), &syn, ifindex).0, XDP_TX);
        assert_eq!(run_once(dp.program(), &ack, ifindex).0, XDP_TX);
        let old = dp.maps.conns.get(&key).expect("conn");
        assert_ne!(old.token, 0, "the first connection learned its token");
        // Its backend stays in service (draining) but leaves the ring.
        let rest: Vec<maglev::Member> = maglev_members()
            .into_iter()
            .filter(|m| m.id != old.backend)
            .collect();
        dp.set_ring(5, &rest).expect("ring");
        let addr = v4(MAGLEV_BES[(old.backend - 5) as usize]);
        dp.set_backend(old.backend, addr, lb_common::maps::BACKEND_DRAINING)
            .expect("drain");
        let entries = dp.maps.conns.len();

        // A new plain-TCP connection from the same address and port.
        let syn = tcp4(CLIENT4, vip4(6), 50002, 80, SYN, &[], &[]);
        let (verdict, out) = run_once(dp.program(), &syn, ifindex);
        assert_eq!(verdict, XDP_TX);
        let new = dp.maps.conns.get(&key).expect("conn");
        assert_ne!(
            new.backend, old.backend,
            "the new connection follows the ring"
        );
        assert_eq!(&out[30..34], &MAGLEV_BES[(new.backend - 5) as usize]);
        assert_eq!(
            (new.token, new.flags),
            (0, 0),
            "nothing of the old connection's MPTCP state is left"
        );
        assert_eq!(dp.maps.conns.len(), entries, "one entry for the 5-tuple");
        // Its next packet follows the new entry.
        let data = tcp4(CLIENT4, vip4(6), 50002, 80, ACK, &[], b"x");
        let (verdict, out) = run_once(dp.program(), &data, ifindex);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(&out[30..34], &MAGLEV_BES[(new.backend - 5) as usize]);

        // The same in the IPv6 table, through a VIP of the same service.
        dp.add_vip(v6(vip6(9)), 80, 6, 5).expect("vip");
        let key = key6(CLIENT6, vip6(9), 50003, 80);
        let syn = tcp6(CLIENT6, vip6(9), 50003, 80, SYN, &[], &[]);
        let (verdict, _) = run_once(dp.program(), &syn, ifindex);
        assert_ne!(verdict, XDP_DROP);
        let old = dp.maps.conns.get(&key).expect("conn");
        let rest: Vec<maglev::Member> = rest.into_iter().filter(|m| m.id != old.backend).collect();
        dp.set_ring(5, &rest).expect("ring");
        let entries = dp.maps.conns.len();
        let (again, out) = run_once(dp.program(), &syn, ifindex);
        assert_eq!(again, verdict);
        let new = dp.maps.conns.get(&key).expect("conn");
        assert_eq!(
            new.backend, rest[0].id,
            "the new connection follows the ring"
        );
        assert_eq!(&out[30..34], &MAGLEV_BES[(new.backend - 5) as usize]);
        assert_eq!(dp.maps.conns.len(), entries, "one entry for the 5-tuple");
    });
}

/// The next hop of a backend is cached per CPU for NEXTHOP_TTL_JIFFIES (1 s at HZ=250):
/// a neighbour that changes its MAC address gets the balancer's packets within that
/// time, not never (and not by a route lookup per packet).
#[test]
fn a_changed_neighbour_gets_the_packets_within_the_cache_ttl() {
    let test = "a_changed_neighbour_gets_the_packets_within_the_cache_ttl";
    with_balancer(test, "nhttl", |mut dp, _, link| {
        // The cache is per CPU: on one CPU only, a packet cannot dodge a stale entry by
        // running where there is none.
        pin_to_cpu0();
        let ifindex = link.ifindex;
        let ack = tcp4(CLIENT4, vip4(1), 50002, 80, ACK, &[], b"x");
        let dmac = |dp: &mut Dataplane| {
            let (verdict, out) = run_once(dp.program(), &ack, ifindex);
            assert_eq!(verdict, XDP_TX);
            <[u8; 6]>::try_from(&out[..6]).expect("6 bytes")
        };
        assert_eq!(dmac(&mut dp), GW_MAC, "the route's neighbour");
        let moved = [0x02, 0xaa, 0, 0, 0, 0x09];
        let ns = Netns::existing(&link.ns_name);
        ns.neigh_permanent("lb0", "10.10.0.254", "02:aa:00:00:00:09");
        let changed = Instant::now();
        let cached = dmac(&mut dp) == GW_MAC;
        // 250 jiffies is 2.5 s at HZ=100, the slowest tick a kernel may have.
        wait_until(
            Duration::from_secs(4),
            "the new neighbour MAC in the output",
            || (dmac(&mut dp) == moved).then_some(()),
        );
        println!(
            "neighbour change reached the dataplane after {:?} (first packet after it on the cached MAC: {cached})",
            changed.elapsed()
        );
    });
}

/// Katran's flood guard: over `max_conn_rate` new flows a second on one CPU, every new
/// flow (a plain SYN, an MP_CAPABLE SYN, a packet missing from the table) is forwarded by
/// Maglev but not recorded, and its later packets go to the same backend; it is recorded
/// at a packet under the limit. A join steered by a known token is recorded whatever the
/// rate (its later packets must follow the token).
#[test]
fn flood_guard_limits_every_new_flow_but_token_joins() {
    let test = "flood_guard_limits_every_new_flow_but_token_joins";
    with_balancer(test, "flood", |mut dp, _, link| {
        // The window is per CPU: keep every test run on one.
        pin_to_cpu0();
        let ifindex = link.ifindex;
        let recorded = |dp: &Dataplane, src: [u8; 4], sport: u16| {
            dp.maps.conns.get(&key4(src, vip4(6), sport, 80, 6))
        };
        // A connection that learned its token before the flood.
        let server_key = 0x0f0f_0000_0000_0001u64;
        let syn = tcp4(CLIENT4, vip4(6), 50999, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
        let keys = mp_capable_keys(1, 20, 0x77, server_key);
        let ack = tcp4(CLIENT4, vip4(6), 50999, 80, ACK, &keys, &[]);
        assert_eq!(run_once(dp.program(), &syn, ifindex).0, XDP_TX);
        assert_eq!(run_once(dp.program(), &ack, ifindex).0, XDP_TX);
        let owner = recorded(&dp, CLIENT4, 50999).expect("learned").backend;

        let mut cfg = dp.maps.config.get(&0, 0).expect("config");
        cfg.max_conn_rate = 2;
        dp.set_config(cfg).expect("config");
        // Up to three tries, in case one straddles the one-second window.
        for attempt in 0..3u16 {
            let base = 51000 + attempt * 10;
            reset_rate_window(&mut dp, lb_common::maps::RATE_NEW_FLOWS);
            let bypassed = dp.counter(Counter::ConnFloodBypass).expect("counter");
            let start = std::time::Instant::now();
            let mut outs = Vec::new();
            for i in 0..3 {
                let syn = tcp4(CLIENT4, vip4(6), base + i, 80, SYN, &[], &[]);
                let (verdict, out) = run_once(dp.program(), &syn, ifindex);
                assert_eq!(verdict, XDP_TX, "a SYN over the limit is still forwarded");
                outs.push(out);
            }
            let mp = tcp4(CLIENT4, vip4(6), base + 3, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
            assert_eq!(run_once(dp.program(), &mp, ifindex).0, XDP_TX);
            let miss = tcp4(CLIENT4, vip4(6), base + 4, 80, ACK, &[], b"x");
            assert_eq!(run_once(dp.program(), &miss, ifindex).0, XDP_TX);
            let ack = tcp4(CLIENT4, vip4(6), base + 2, 80, ACK, &[], &[]);
            let (verdict, ack_out) = run_once(dp.program(), &ack, ifindex);
            assert_eq!(verdict, XDP_TX);
            let join = tcp4(
                [192, 0, 2, 66],
                vip4(6),
                base + 5,
                80,
                SYN,
                &mp_join_syn(sha256_token(server_key)),
                &[],
            );
            assert_eq!(run_once(dp.program(), &join, ifindex).0, XDP_TX);
            if start.elapsed() >= std::time::Duration::from_millis(900) {
                continue;
            }
            assert!(recorded(&dp, CLIENT4, base).is_some());
            assert!(recorded(&dp, CLIENT4, base + 1).is_some());
            for (port, what) in [
                (base + 2, "a third SYN in a second, over the limit of 2"),
                (
                    base + 3,
                    "an MP_CAPABLE SYN over the limit (no bypass of the guard)",
                ),
                (base + 4, "a packet missing from the table, over the limit"),
            ] {
                assert!(recorded(&dp, CLIENT4, port).is_none(), "{what}: recorded");
            }
            assert_eq!(
                &ack_out[30..34],
                &outs[2][30..34],
                "the unrecorded flow's next packet goes where its SYN went"
            );
            let joined = recorded(&dp, [192, 0, 2, 66], base + 5)
                .expect("a join steered by a known token is recorded whatever the rate");
            assert_eq!(joined.backend, owner);
            assert_eq!(
                dp.counter(Counter::ConnFloodBypass).expect("counter") - bypassed,
                4,
                "SYN, MP_CAPABLE SYN, miss, and the ACK of the unrecorded SYN"
            );

            // Under the limit again, the flow's next packet records it, on that backend.
            reset_rate_window(&mut dp, lb_common::maps::RATE_NEW_FLOWS);
            let (verdict, out) = run_once(dp.program(), &ack, ifindex);
            assert_eq!(verdict, XDP_TX);
            let conn = recorded(&dp, CLIENT4, base + 2).expect("recorded under the limit");
            assert_eq!(&out[30..34], &outs[2][30..34]);
            assert_eq!(&out[30..34], &MAGLEV_BES[(conn.backend - 5) as usize]);
            return;
        }
        panic!("three tries each took a second or more: the machine is too slow for this test");
    });
}

/// `cargo xtask bench` runs bench-only programs, and CI does not run the bench: they all
/// pass the verifier, and the learning ACK's two parts each do the work their row claims.
#[test]
fn the_bench_part_programs_do_the_work_they_measure() {
    use aya::maps::{Array, PerCpuArray};
    use lb_common::maps::{BENCH_FRAME, BenchFrame, MAP_BENCH};
    use lb_userspace::loader::{
        PROG_BENCH_BALANCER, PROG_BENCH_RESET, PROG_BENCH_SHA256, PROG_BENCH_TOKEN_INSERT,
    };
    let test = "the_bench_part_programs_do_the_work_they_measure";
    with_balancer(test, "bp", |mut dp, _, link| {
        let ifindex = link.ifindex;
        // All four bench programs pass the verifier; the two parts are run below.
        for name in [
            PROG_BENCH_BALANCER,
            PROG_BENCH_RESET,
            PROG_BENCH_SHA256,
            PROG_BENCH_TOKEN_INSERT,
        ] {
            let p: &mut aya::programs::Xdp = dp
                .ebpf
                .program_mut(name)
                .expect("bench program")
                .try_into()
                .expect("xdp");
            p.load()
                .unwrap_or_else(|e| panic!("the verifier refused {name}: {e:#}"));
        }
        // The wrapper restores frames in 8-byte words: padded, as the bench pads them.
        let mut frame = tcp4(CLIENT4, vip4(1), 40000, 80, SYN, &[], &[]);
        frame.resize(frame.len().next_multiple_of(8), 0);
        let mut bytes = [0u8; BENCH_FRAME];
        bytes[..frame.len()].copy_from_slice(&frame);
        let seq = 0x5000u32;
        let mut bench: Array<_, BenchFrame> =
            Array::try_from(dp.ebpf.map_mut(MAP_BENCH).expect("bench map")).expect("array");
        let b = BenchFrame {
            len: frame.len() as u32,
            vary_off: 0,
            relearn: 0,
            seq,
            flow: FlowKey::default(),
            bytes,
        };
        bench.set(0, b, 0).expect("bench frame");
        let run = |dp: &Dataplane, name: &str| {
            let p: &aya::programs::Xdp = dp
                .ebpf
                .program(name)
                .expect("bench program")
                .try_into()
                .expect("xdp");
            run_once(p, &frame, ifindex).0
        };

        // Each run advances the iteration number: the key of the first is seq + 1.
        assert_eq!(run(&dp, PROG_BENCH_SHA256), XDP_PASS);
        let want = sha256_token(0x7a9c_0000_0000_0000 | u64::from(seq + 1));
        let scratch: PerCpuArray<_, [u8; 128]> =
            PerCpuArray::try_from(dp.ebpf.map("LB_SCRATCH").expect("scratch map"))
                .expect("per-CPU");
        let per_cpu = scratch.get(&0, 0).expect("scratch");
        assert!(
            per_cpu
                .iter()
                .any(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]) == want),
            "bench_sha256 left the SHA-256 token of its key ({want:#010x})"
        );

        assert_eq!(run(&dp, PROG_BENCH_TOKEN_INSERT), XDP_PASS);
        let token = (seq + 2).wrapping_mul(0x9e37_79b9);
        assert!(
            dp.maps.tokens.get(token).is_some(),
            "bench_token_insert inserted its token ({token:#010x})"
        );
    });
}

#[test]
fn an_idle_token_expires_and_subflow_traffic_keeps_one_alive() {
    let test = "an_idle_token_expires_and_subflow_traffic_keeps_one_alive";
    with_balancer(test, "idle", |mut dp, _, link| {
        let ifindex = link.ifindex;
        let run = |dp: &mut Dataplane, frame: &[u8]| run_once(dp.program(), frame, ifindex).0;
        // Connections A and B learn their tokens.
        let (key_a, key_b) = (0x0aaa_0000_0000_0011u64, 0x0bbb_0000_0000_0012u64);
        for (port, key) in [(41100u16, key_a), (41101, key_b)] {
            let syn = tcp4(CLIENT4, vip4(6), port, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
            let keys = mp_capable_keys(1, 20, 0x1234, key);
            let ack = tcp4(CLIENT4, vip4(6), port, 80, ACK, &keys, &[]);
            assert_eq!((run(&mut dp, &syn), run(&mut dp, &ack)), (XDP_TX, XDP_TX));
        }
        let (token_a, token_b) = (sha256_token(key_a), sha256_token(key_b));
        let owner_a = dp
            .maps
            .conns
            .get(&key4(CLIENT4, vip4(6), 41100, 80, 6))
            .expect("flow A")
            .backend;
        // Both fall silent for longer than the idle time (the default hour): their last
        // traffic is moved back in the table rather than waited for. Wrapping, as the
        // dataplane computes ages: a machine up for less than an hour has no such past.
        let rewind = |dp: &mut Dataplane, token: u32| {
            let mut e = dp.maps.tokens.get(token).expect("a learned token");
            e.last_seen_ns = coarse_now_ns()
                .wrapping_sub(lb_common::maps::DEFAULT_TOKEN_IDLE_NS + 1_000_000_000);
            dp.maps
                .tokens
                .set(token, &e, lb_common::maps::DEFAULT_TOKEN_IDLE_NS);
        };
        rewind(&mut dp, token_a);
        rewind(&mut dp, token_b);

        // A packet on A's first subflow: A's token is alive again.
        let before = coarse_now_ns();
        let data_a = tcp4(CLIENT4, vip4(6), 41100, 80, ACK, &[], b"more");
        assert_eq!(run(&mut dp, &data_a), XDP_TX);
        let a = dp.maps.tokens.get(token_a).expect("token A");
        assert!(
            a.last_seen_ns + STAMP_NS > before,
            "traffic on A's subflow refreshed its token"
        );

        // Joins: A's reaches A's backend; B's token went idle, so B's join is unknown.
        let other = [192, 0, 2, 88];
        let join =
            |token: u32, port: u16| tcp4(other, vip4(6), port, 80, SYN, &mp_join_syn(token), &[]);
        assert_eq!(run(&mut dp, &join(token_a, 45100)), XDP_TX);
        let joined = dp.maps.conns.get(&key4(other, vip4(6), 45100, 80, 6));
        assert_eq!(joined.expect("A's join recorded").backend, owner_a);
        assert_eq!(
            run(&mut dp, &join(token_b, 45101)),
            XDP_DROP,
            "B's join (idle token)"
        );
        let b = dp
            .maps
            .tokens
            .get(token_b)
            .expect("B's slot stays until reused or swept");
        assert!(
            coarse_now_ns().saturating_sub(b.last_seen_ns) > lb_common::maps::DEFAULT_TOKEN_IDLE_NS,
            "B's join did not revive its idle token"
        );
        // The daemon's sweep clears B's slot, and only B's.
        assert_eq!(
            dp.maps
                .tokens
                .remove_idle(lb_common::maps::DEFAULT_TOKEN_IDLE_NS),
            1
        );
        assert!(dp.maps.tokens.get(token_b).is_none() && dp.maps.tokens.get(token_a).is_some());

        // Traffic on A's second subflow (the join) keeps the token alive as well.
        rewind(&mut dp, token_a);
        let before = coarse_now_ns();
        assert_eq!(
            run(&mut dp, &tcp4(other, vip4(6), 45100, 80, ACK, &[], b"x")),
            XDP_TX
        );
        let a = dp.maps.tokens.get(token_a).expect("token A");
        assert!(
            a.last_seen_ns + STAMP_NS > before,
            "traffic on A's join refreshed its token"
        );
        assert_eq!(run(&mut dp, &join(token_a, 45102)), XDP_TX);

        let c = |k| dp.counter(k).expect("counter");
        assert_eq!(
            (
                c(Counter::JoinRouted),
                c(Counter::TokenExpired),
                c(Counter::JoinUnknownDropped)
            ),
            (2, 1, 1)
        );
    });
}

#[test]
fn mptcp_fixtures() {
    with_balancer("mptcp_fixtures", "mp", |mut dp, ring, link| {
        let (lb_mac, ifindex) = (link.lb_mac, link.ifindex);
        // The Maglev service also answers on an IPv6 VIP: joins may cross families.
        dp.add_vip(v6(vip6(6)), 80, 6, 5).expect("vip6");
        let backend_of = |k: &FlowKey| ring[(flow_hash(k, SEED) % RING) as usize];
        let be_addr = |id: u32| MAGLEV_BES[(id - 5) as usize];
        let tx =
            |p: &[u8], id: u32| Output::Exactly(ipip4(GW_MAC, lb_mac, LB4, be_addr(id), &ip_of(p)));

        // Connection A: v1 handshake on the IPv4 VIP.
        let server_key_a = 0x7a9c_3840_1a72_f870u64;
        let token_a = sha256_token(server_key_a);
        assert_eq!(
            token_a, 0x4e4b_2c90,
            "the wire example of ../shared/MPTCP.md"
        );
        let owner = backend_of(&key4(CLIENT4, vip4(6), 41000, 80, 6));
        let syn_a = tcp4(CLIENT4, vip4(6), 41000, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
        let ack_a = tcp4(
            CLIENT4,
            vip4(6),
            41000,
            80,
            ACK,
            &mp_capable_keys(1, 20, 0x1111, server_key_a),
            &[],
        );
        // A join from another address whose own 5-tuple Maglev would send elsewhere.
        let other = [192, 0, 2, 77];
        let join_port = (42000u16..)
            .find(|p| backend_of(&key4(other, vip4(6), *p, 80, 6)) != owner)
            .expect("a 5-tuple that hashes to another backend");
        let join4 = tcp4(
            other,
            vip4(6),
            join_port,
            80,
            SYN,
            &mp_join_syn(token_a),
            &[],
        );
        let join6 = tcp6(CLIENT6, vip6(6), 43000, 80, SYN, &mp_join_syn(token_a), &[]);
        // The same join at the very end of a full option space (40 bytes, data offset 15).
        let join40_port = (join_port + 1..)
            .find(|p| backend_of(&key4(other, vip4(6), *p, 80, 6)) != owner)
            .expect("a second 5-tuple that hashes to another backend");
        let mut nops_then_join = vec![1u8; 28];
        nops_then_join.extend_from_slice(&mp_join_syn(token_a));
        let join40 = tcp4(other, vip4(6), join40_port, 80, SYN, &nops_then_join, &[]);
        let join6_out = ipip4(GW_MAC, lb_mac, LB4, be_addr(owner), &ip_of(&join6));

        // Connections B (len 22) and C (len 24): the third ACK was lost, data carries the keys.
        let (key_b, key_c) = (0x0bbb_0000_0000_0002u64, 0x0ccc_0000_0000_0003u64);
        let syn_b = tcp4(CLIENT4, vip4(6), 41001, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
        let data_b = tcp4(
            CLIENT4,
            vip4(6),
            41001,
            80,
            ACK,
            &mp_capable_keys(1, 22, 0x2222, key_b),
            b"hello",
        );
        let syn_c = tcp4(CLIENT4, vip4(6), 41002, 80, SYN, &MP_CAPABLE_SYN_V1, &[]);
        let data_c = tcp4(
            CLIENT4,
            vip4(6),
            41002,
            80,
            ACK,
            &mp_capable_keys(1, 24, 0x3333, key_c),
            b"hello",
        );
        // Connection D: version 0 (SHA-1).
        let key_d = 0x0ddd_0000_0000_0004u64;
        let syn_d = tcp4(CLIENT4, vip4(6), 41003, 80, SYN, &MP_CAPABLE_SYN_V0, &[]);
        let ack_d = tcp4(
            CLIENT4,
            vip4(6),
            41003,
            80,
            ACK,
            &mp_capable_keys(0, 20, V0_CLIENT_KEY, key_d),
            &[],
        );
        // A forged third ACK for a flow that never sent a SYN through us.
        let forged = tcp4(
            CLIENT4,
            vip4(6),
            41500,
            80,
            ACK,
            &mp_capable_keys(1, 20, 0x5555, 0x0eee_0000_0000_0005),
            &[],
        );
        // A second handshake on another backend presenting connection A's server key.
        let coll_port = (44000u16..)
            .find(|p| backend_of(&key4(CLIENT4, vip4(6), *p, 80, 6)) != owner)
            .expect("a flow on another backend");
        let coll_be = backend_of(&key4(CLIENT4, vip4(6), coll_port, 80, 6));
        let syn_e = tcp4(
            CLIENT4,
            vip4(6),
            coll_port,
            80,
            SYN,
            &MP_CAPABLE_SYN_V1,
            &[],
        );
        let ack_e = tcp4(
            CLIENT4,
            vip4(6),
            coll_port,
            80,
            ACK,
            &mp_capable_keys(1, 20, 0x6666, server_key_a),
            &[],
        );
        let unknown = tcp4(
            other,
            vip4(6),
            45000,
            80,
            SYN,
            &mp_join_syn(0xdead_beef),
            &[],
        );
        // Malformed option spaces: the option walk stops, the SYN is balanced as plain TCP.
        let short_opt = tcp4(CLIENT4, vip4(6), 41600, 80, SYN, &[30, 1, 0x01, 0x01], &[]);
        let past_end = tcp4(CLIENT4, vip4(6), 41601, 80, SYN, &[1, 1, 30, 12], &[]);
        let mut doff4 = tcp4(CLIENT4, vip4(6), 41602, 80, SYN, &[], &[]);
        doff4[46] = 0x40;
        // A join whose data offset claims 40 option bytes where the IP packet has 12;
        // the frame is padded so that the claimed bytes exist, but outside the packet.
        let mut doff15 = join4.clone();
        doff15[46] = 0xf0;
        doff15.extend_from_slice(&[0; 28]);
        let plain = |p: &[u8], port: u16| tx(p, backend_of(&key4(CLIENT4, vip4(6), port, 80, 6)));

        let table = vec![
            case(
                "MP_CAPABLE SYN v1 (len 4) -> Maglev backend",
                syn_a.clone(),
                XDP_TX,
                tx(&syn_a, owner),
            ),
            case(
                "third ACK (len 20) learns the token",
                ack_a.clone(),
                XDP_TX,
                tx(&ack_a, owner),
            ),
            case(
                "MP_JOIN SYN, known token, 5-tuple hashing elsewhere -> token's backend",
                join4.clone(),
                XDP_TX,
                tx(&join4, owner),
            ),
            case(
                "MP_JOIN SYN on the IPv6 VIP for the IPv4 connection -> same backend",
                join6,
                XDP_TX,
                Output::Exactly(join6_out),
            ),
            case(
                "MP_JOIN SYN in the last 12 of 40 option bytes -> token's backend",
                join40.clone(),
                XDP_TX,
                tx(&join40, owner),
            ),
            case(
                "MP_CAPABLE SYN (B)",
                syn_b.clone(),
                XDP_TX,
                plain(&syn_b, 41001),
            ),
            case(
                "first data with MP_CAPABLE len 22 (ACK lost) learns",
                data_b.clone(),
                XDP_TX,
                plain(&data_b, 41001),
            ),
            case(
                "MP_CAPABLE SYN (C)",
                syn_c.clone(),
                XDP_TX,
                plain(&syn_c, 41002),
            ),
            case(
                "first data with MP_CAPABLE len 24 (checksums) learns",
                data_c.clone(),
                XDP_TX,
                plain(&data_c, 41002),
            ),
            case(
                "MP_CAPABLE SYN v0 (len 12)",
                syn_d.clone(),
                XDP_TX,
                plain(&syn_d, 41003),
            ),
            case(
                "v0 third ACK (len 20) learns a SHA-1 token",
                ack_d.clone(),
                XDP_TX,
                plain(&ack_d, 41003),
            ),
            case(
                "forged MP_CAPABLE ACK for an unknown flow: forwarded, teaches nothing",
                forged.clone(),
                XDP_TX,
                plain(&forged, 41500),
            ),
            case(
                "handshake on another backend reusing a live token (SYN)",
                syn_e.clone(),
                XDP_TX,
                tx(&syn_e, coll_be),
            ),
            case(
                "... its third ACK collides: first writer keeps the token",
                ack_e.clone(),
                XDP_TX,
                tx(&ack_e, coll_be),
            ),
            case(
                "MP_JOIN SYN with an unknown token, policy drop: dropped",
                unknown.clone(),
                XDP_DROP,
                Output::Unchanged,
            ),
            case(
                "MPTCP option with length 1: plain SYN",
                short_opt.clone(),
                XDP_TX,
                plain(&short_opt, 41600),
            ),
            case(
                "MPTCP option running past the header: plain SYN",
                past_end.clone(),
                XDP_TX,
                plain(&past_end, 41601),
            ),
            case(
                "TCP data offset 4 to a VIP: dropped",
                doff4,
                XDP_DROP,
                Output::Unchanged,
            ),
            case(
                "TCP header running past the IP packet (into padding): dropped",
                doff15,
                XDP_DROP,
                Output::Unchanged,
            ),
        ];
        run_table(dp.program(), &table, ifindex);

        let tokens = &dp.maps.tokens;
        let entry = tokens.get(token_a).expect("token A learned");
        assert_eq!((entry.backend, entry.service, entry.version), (owner, 5, 1));
        assert!(entry.learned_ns > 0 && entry.last_seen_ns >= entry.learned_ns);
        for (key, conn_port) in [(key_b, 41001), (key_c, 41002)] {
            let e = tokens
                .get(sha256_token(key))
                .expect("token learned from data");
            assert_eq!(
                e.backend,
                backend_of(&key4(CLIENT4, vip4(6), conn_port, 80, 6))
            );
        }
        let d = tokens
            .get(sha1_token(key_d))
            .expect("v0 token learned with SHA-1");
        assert_eq!(d.version, 0);
        assert!(
            tokens.get(sha256_token(0x0eee_0000_0000_0005)).is_none(),
            "a forged ACK taught a token"
        );
        let conn_a = dp
            .maps
            .conns
            .get(&key4(CLIENT4, vip4(6), 41000, 80, 6))
            .expect("conn A");
        assert_eq!(conn_a.token, token_a, "the flow entry carries its token");
        let join_conn = dp
            .maps
            .conns
            .get(&key4(other, vip4(6), join_port, 80, 6))
            .expect("join flow recorded");
        assert_eq!((join_conn.backend, join_conn.token), (owner, token_a));

        let c = |k| dp.counter(k).expect("counter");
        assert_eq!(c(Counter::MpCapableSynV1), 4);
        assert_eq!(c(Counter::MpCapableSynV0), 1);
        assert_eq!(c(Counter::TokenLearnedV1), 3);
        assert_eq!(c(Counter::TokenLearnedV0), 1);
        assert_eq!(c(Counter::TokenCollision), 1);
        assert_eq!(c(Counter::JoinRouted), 3);
        assert_eq!(c(Counter::JoinUnknownDropped), 1);
        // Data offsets 4 and 15 (past the IP packet).
        assert_eq!(c(Counter::DropTruncated), 2);

        // Policy `hash`: an unknown token is placed by Maglev on the token itself.
        dp.set_config(Config {
            seed: SEED,
            src4: addr_words(v4(LB4)).0[0],
            src6: addr_words(v6(LB6)).0,
            flags: lb_common::maps::CONFIG_JOIN_UNKNOWN_HASH,
            ..Default::default()
        })
        .expect("config");
        let hashed = ring[(lb_common::hash::hash_u32(0xdead_beef, SEED) % RING) as usize];
        let table = vec![case(
            "MP_JOIN SYN with an unknown token, policy hash -> Maglev on the token",
            unknown.clone(),
            XDP_TX,
            tx(&unknown, hashed),
        )];
        run_table(dp.program(), &table, ifindex);
        assert_eq!(dp.counter(Counter::JoinUnknownHashed).expect("counter"), 1);
    });
}

//! Every shape of reload an operator makes (add only, remove only, both, a weight change,
//! a drain, every backend removed, backends back), applied by the daemon's controller to a
//! loaded balancer. After each, the Maglev ring in the map must be exactly the ring a
//! freshly started daemon builds from the same file (so every node of a fleet agrees,
//! whatever reloads it went through), must name only backends that exist, and new
//! connections (SYNs through BPF_PROG_TEST_RUN) must reach a backend, never be dropped
//! for want of one.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf};

use lb_common::{
    counters::Counter,
    maps::{BACKEND_ACTIVE, MAX_BACKENDS, VipKey},
};
use lb_userspace::{
    config::Config as FileConfig,
    controller::Controller,
    dataplane::{Dataplane, words_addr},
    maglev,
};
use mptcp_lb_tests::{
    fixture::{XDP_DROP, XDP_TX, run_once},
    packets::{ACK, SYN, tcp4},
    privileged,
    testenv::{CLIENT4, RING, TEST_SIZES, environment, vip4},
};

/// The backends the reloads shuffle; 10.1.0.0/24 is routed out of the ingress link.
const ADDRS: [&str; 4] = ["10.1.0.21", "10.1.0.22", "10.1.0.23", "10.1.0.24"];
const SYNS: u16 = 300;

/// One backend line of a configuration: its address index, weight and drain flag.
type Be = (usize, u32, bool);

fn file(backends: &[Be]) -> FileConfig {
    file_and(backends, "")
}

/// [`file`] with more TOML (another service) after it.
fn file_and(backends: &[Be], more: &str) -> FileConfig {
    let mut text = format!(
        "[balancer]\ninterface = \"lb0\"\nring_size = {RING}\nhash_seed = 0x5eed\n\
         source_v4 = \"10.10.0.1\"\n\n[[service]]\nname = \"web\"\n\
         vips = [\"10.100.0.1:80/tcp\"]\n"
    );
    for (i, weight, drain) in backends {
        text += &format!(
            "  [[service.backend]]\n  address = \"{}\"\n  weight = {weight}\n  drain = {drain}\n",
            ADDRS[*i]
        );
    }
    text += more;
    FileConfig::parse("reload.toml", &text, |_| true).expect("a valid file")
}

/// Service 0's ring as the map holds it, each slot as its backend's address ("?" for an
/// id with no backend entry, "-" for an empty slot).
fn ring_addresses(dp: &Dataplane) -> Vec<String> {
    (0..RING)
        .map(|slot| {
            let id = dp.maps.maglev.get(&slot, 0).expect("LB_MAGLEV slot");
            if id == 0 {
                return "-".to_string();
            }
            let b = dp.maps.backends.get(&id, 0).expect("LB_BACKENDS entry");
            if b.flags == 0 {
                "?".to_string()
            } else {
                words_addr(b.addr, b.family).to_string()
            }
        })
        .collect()
}

/// The ring a daemon started afresh would build from `backends`, by address.
fn fresh_ring(backends: &[Be]) -> Vec<String> {
    let members: Vec<maglev::Member> = backends
        .iter()
        .filter(|(_, _, drain)| !drain)
        .map(|(i, weight, _)| maglev::Member {
            id: *i as u32 + 1,
            key: ADDRS[*i].to_string(),
            weight: *weight,
        })
        .collect();
    maglev::build(&members, RING)
        .into_iter()
        .map(|id| {
            if id == 0 {
                "-".to_string()
            } else {
                ADDRS[id as usize - 1].to_string()
            }
        })
        .collect()
}

/// SYNs from `SYNS` client ports: where each went (outer destination), or None if dropped.
fn place_syns(dp: &mut Dataplane, ifindex: u32, round: u16) -> Vec<Option<IpAddr>> {
    (0..SYNS)
        .map(|i| {
            let syn = tcp4(
                CLIENT4,
                vip4(1),
                10_000 + round * SYNS + i,
                80,
                SYN,
                &[],
                &[],
            );
            let (verdict, out) = run_once(dp.program(), &syn, ifindex);
            match verdict {
                XDP_TX => {
                    let dst: [u8; 4] = out[30..34].try_into().expect("outer dst");
                    Some(IpAddr::from(dst))
                }
                XDP_DROP => None,
                v => panic!("SYN {i}: unexpected verdict {v}"),
            }
        })
        .collect()
}

#[test]
fn every_reload_shape_leaves_the_ring_a_fresh_start_would_build() {
    if !privileged("every_reload_shape_leaves_the_ring_a_fresh_start_would_build") {
        return;
    }
    let env = environment("rld");
    let ifindex = env.ifindex;
    env.ns.within(move || {
        let dp = Dataplane::load(TEST_SIZES).expect("load balancer");
        let first: Vec<Be> = vec![(0, 1, false), (1, 1, false), (2, 1, false)];
        let mut ctl =
            Controller::start(dp, file(&first), PathBuf::from("reload.toml")).expect("first apply");
        let shapes: [(&str, Vec<Be>); 8] = [
            (
                "add only",
                vec![(0, 1, false), (1, 1, false), (2, 1, false), (3, 1, false)],
            ),
            ("remove only", vec![(0, 1, false), (1, 1, false)]),
            ("remove one, add one", vec![(1, 1, false), (2, 1, false)]),
            ("weight change", vec![(1, 3, false), (2, 1, false)]),
            ("drain", vec![(1, 3, false), (2, 1, true)]),
            ("remove the drained one", vec![(1, 3, false)]),
            ("all backends removed", vec![]),
            ("backends back", vec![(0, 1, false), (3, 2, false)]),
        ];
        for (round, (shape, backends)) in shapes.iter().enumerate() {
            let dropped_before = ctl.dp.counter(Counter::DropNoBackend).expect("counter");
            let summary = ctl.apply(&file(backends)).expect("reload");
            println!("{shape}: {summary}");
            let ring = ring_addresses(&ctl.dp);
            assert!(
                !ring.iter().any(|a| a == "?"),
                "{shape}: the ring names a backend that is gone ({} slots)",
                ring.iter().filter(|a| *a == "?").count()
            );
            let expected = fresh_ring(backends);
            let differ = ring.iter().zip(&expected).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ, 0,
                "{shape}: {differ} slots differ from the ring a fresh start builds"
            );

            // Only configured backends keep a dataplane entry; a drained one keeps it
            // (its connections and joins still reach it) but takes no slot.
            let live: BTreeSet<String> = (1..64u32)
                .filter_map(|id| {
                    let b = ctl.dp.maps.backends.get(&id, 0).ok()?;
                    (b.flags != 0).then(|| words_addr(b.addr, b.family).to_string())
                })
                .collect();
            let configured: BTreeSet<String> = backends
                .iter()
                .map(|(i, _, _)| ADDRS[*i].to_string())
                .collect();
            assert_eq!(live, configured, "{shape}: backend entries");
            for id in 1..64u32 {
                let b = ctl.dp.maps.backends.get(&id, 0).expect("entry");
                let addr = words_addr(b.addr, b.family).to_string();
                if let Some((_, _, drain)) = backends.iter().find(|(i, _, _)| ADDRS[*i] == addr)
                    && b.flags != 0
                {
                    assert_eq!(b.flags == BACKEND_ACTIVE, !drain, "{shape}: {addr}'s flags");
                }
            }

            // New connections: each reaches the backend its slot names; none is dropped
            // unless the service has no backend at all.
            let placed = place_syns(&mut ctl.dp, ifindex, round as u16);
            let dropped = ctl.dp.counter(Counter::DropNoBackend).expect("counter") - dropped_before;
            let in_ring: BTreeSet<String> =
                expected.iter().filter(|a| *a != "-").cloned().collect();
            if in_ring.is_empty() {
                assert!(
                    placed.iter().all(Option::is_none),
                    "{shape}: no backend, no forward"
                );
                assert_eq!(
                    dropped,
                    u64::from(SYNS),
                    "{shape}: counted as drop_no_backend"
                );
            } else {
                assert_eq!(dropped, 0, "{shape}: SYNs dropped for want of a backend");
                let reached: BTreeSet<String> =
                    placed.iter().flatten().map(IpAddr::to_string).collect();
                assert_eq!(
                    reached, in_ring,
                    "{shape}: backends that new connections reach"
                );
            }
        }
    });
}

/// The id the controller gave the backend at `addr`.
fn id_of(ctl: &Controller, addr: &str) -> Option<u32> {
    ctl.backends()
        .find(|b| b.address.to_string() == addr)
        .map(|b| b.id)
}

/// A backend removed from one service leaves an idle flow behind (no packet since). Its
/// id, later given to a backend of another service, must not inherit that flow: the
/// flow's next packet is placed again within its own service.
#[test]
fn a_reused_backend_id_does_not_inherit_idle_flows() {
    if !privileged("a_reused_backend_id_does_not_inherit_idle_flows") {
        return;
    }
    let env = environment("rid");
    let ifindex = env.ifindex;
    env.ns.within(move || {
        let dp = Dataplane::load(TEST_SIZES).expect("load balancer");
        let two: Vec<Be> = vec![(0, 1, false), (1, 1, false)];
        let mut ctl =
            Controller::start(dp, file(&two), PathBuf::from("reload.toml")).expect("apply");
        let old_id = id_of(&ctl, ADDRS[1]).expect("backend 2 has an id");
        // A flow that Maglev puts on backend 2.
        let sport = (20_000u16..)
            .find(|p| {
                let syn = tcp4(CLIENT4, vip4(1), *p, 80, SYN, &[], &[]);
                let (v, out) = run_once(ctl.dp.program(), &syn, ifindex);
                v == XDP_TX && out[30..34] == [10, 1, 0, 22]
            })
            .expect("a flow on backend 2");
        let ack = tcp4(CLIENT4, vip4(1), sport, 80, ACK, &[], b"later");

        // Backend 2 leaves; the flow stays idle. Then another service arrives whose
        // backend takes the freed id.
        ctl.apply(&file(&[(0, 1, false)]))
            .expect("remove backend 2");
        let other = format!(
            "[[service]]\nname = \"other\"\nvips = [\"10.100.0.2:80/tcp\"]\n\
             [[service.backend]]\naddress = \"{}\"\n",
            ADDRS[2]
        );
        ctl.apply(&file_and(&[(0, 1, false)], &other))
            .expect("add another service");
        assert_eq!(
            id_of(&ctl, ADDRS[2]),
            Some(old_id),
            "the scene needs the freed id reused"
        );

        let (verdict, out) = run_once(ctl.dp.program(), &ack, ifindex);
        assert_eq!(verdict, XDP_TX);
        let went_to = IpAddr::from(<[u8; 4]>::try_from(&out[30..34]).expect("outer dst"));
        assert_eq!(
            went_to.to_string(),
            ADDRS[0],
            "the idle flow of service web went to another service's backend"
        );
    });
}

/// A reload that cannot fit (it replaces 2,100 backends by 2,100 others: the ids of the
/// leaving ones are freed only once the new ones are in place, 4,200 > 4,095) is refused
/// before anything is written: the running configuration stays whole, in the maps as in
/// the controller. Before, it failed half-way, with the new settings and part of the new
/// backends written.
#[test]
fn a_reload_that_cannot_fit_changes_nothing() {
    if !privileged("a_reload_that_cannot_fit_changes_nothing") {
        return;
    }
    let env = environment("rfit");
    env.ns.within(move || {
        let many = |third: u8, seed: u32| {
            let mut text = format!(
                "[balancer]\ninterface = \"lb0\"\nring_size = {RING}\nhash_seed = {seed}\n\
                 source_v4 = \"10.10.0.1\"\n\n[[service]]\nname = \"web\"\n\
                 vips = [\"10.100.0.1:80/tcp\"]\n"
            );
            for i in 0..2100u32 {
                text += &format!(
                    "  [[service.backend]]\n  address = \"10.{third}.{}.{}\"\n",
                    i / 250,
                    i % 250 + 1
                );
            }
            FileConfig::parse("reload.toml", &text, |_| true).expect("a valid file")
        };
        let dp = Dataplane::load(TEST_SIZES).expect("load balancer");
        let mut ctl =
            Controller::start(dp, many(1, 7), PathBuf::from("reload.toml")).expect("apply");
        let ring_before = ring_addresses(&ctl.dp);
        let config_before = ctl.dp.maps.config.get(&0, 0).expect("config");
        let entries_before = ctl.backends().count();

        let err = ctl
            .apply(&many(2, 8))
            .expect_err("2,100 new backends beside 2,100 installed cannot fit");
        let msg = format!("{err:#}");
        println!("refused: {msg}");
        assert!(msg.contains("apply it in two steps"), "{msg}");
        assert_eq!(ring_addresses(&ctl.dp), ring_before, "the ring changed");
        assert_eq!(
            ctl.dp.maps.config.get(&0, 0).expect("config"),
            config_before,
            "the dataplane settings changed"
        );
        assert_eq!(ctl.backends().count(), entries_before);
        let live = (1..MAX_BACKENDS)
            .filter(|id| ctl.dp.maps.backends.get(id, 0).is_ok_and(|b| b.flags != 0))
            .count();
        assert_eq!(live, entries_before, "backend entries written");
    });
}

/// The same for VIPs: 400 VIPs on 400 addresses (800 map entries with their address
/// markers) replaced by 400 others cannot sit side by side in the 1,024-entry VIP map:
/// refused before anything is written.
#[test]
fn a_vip_swap_that_cannot_fit_changes_nothing() {
    if !privileged("a_vip_swap_that_cannot_fit_changes_nothing") {
        return;
    }
    let env = environment("rvip");
    env.ns.within(move || {
        let vips = |third: u8| {
            let list: Vec<String> = (0..400u32)
                .map(|i| format!("\"10.{third}.{}.{}:80/tcp\"", i / 200, i % 200 + 1))
                .collect();
            let text = format!(
                "[balancer]\ninterface = \"lb0\"\nring_size = {RING}\nsource_v4 = \"10.10.0.1\"\n\n\
                 [[service]]\nname = \"web\"\nvips = [{}]\n  [[service.backend]]\n  address = \"{}\"\n",
                list.join(", "),
                ADDRS[0]
            );
            FileConfig::parse("reload.toml", &text, |_| true).expect("a valid file")
        };
        let dp = Dataplane::load(TEST_SIZES).expect("load balancer");
        let mut ctl = Controller::start(dp, vips(101), PathBuf::from("reload.toml")).expect("apply");
        let before: usize = ctl.dp.maps.vips.keys().count();
        assert_eq!(before, 800, "400 VIPs and their 400 address markers");
        let err = ctl
            .apply(&vips(102))
            .expect_err("800 new entries beside 800 cannot fit in 1,024");
        let msg = format!("{err:#}");
        println!("refused: {msg}");
        assert!(msg.contains("apply it in two steps"), "{msg}");
        let after: Vec<VipKey> = ctl
            .dp
            .maps
            .vips
            .keys()
            .collect::<Result<_, _>>()
            .expect("keys");
        assert_eq!(after.len(), 800, "VIP entries written or removed");
        assert!(
            after.iter().all(|k| u32::from_be(k.addr[0]) >> 16 == 0x0a65),
            "only the old VIPs (10.101.x.x) are installed"
        );
    });
}

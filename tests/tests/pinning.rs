//! Pinned maps and link: what a controller restart relies on. A second load adopts the
//! pins (the connection table survives), replaces the program through the pinned link
//! without detaching it, and pins of another size or layout are refused with the command
//! that clears them.

use std::path::Path;

use aya::programs::XdpMode;
use lb_common::maps::{FlowKey, LAYOUT_VERSION};
use lb_userspace::{
    dataplane::{Dataplane, Sizes},
    pins,
};
use mptcp_lb_tests::{
    fixture::{XDP_TX, run_once},
    packets::*,
    privileged,
    testenv::*,
};

const ROOT: &str = "/sys/fs/bpf/mlb-pin-test";

const TOKEN: u32 = 0x7e57_0001;

fn sizes(conn_entries: u32) -> Sizes {
    Sizes {
        ring_size: RING,
        conn_entries,
        conn6_entries: conn_entries,
        token_entries: 4096,
    }
}

#[test]
fn pins_survive_a_restart_and_mismatches_are_refused() {
    if !privileged("pins_survive_a_restart_and_mismatches_are_refused") {
        return;
    }
    let _ = std::fs::remove_dir_all(ROOT);
    let env = environment("pin");
    let ifindex = env.ifindex;
    let root = Path::new(ROOT);
    let key = FlowKey {
        src: [u32::from_ne_bytes(CLIENT4), 0, 0, 0],
        dst: [u32::from_ne_bytes(vip4(1)), 0, 0, 0],
        sport: 40001u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        family: 4,
        _pad: [0; 2],
    };

    // First process: nothing pinned yet; it attaches, pins, and records a flow.
    let first = env.ns.within(move || {
        let (mut dp, adopted) = Dataplane::load_pinned(sizes(4096), Path::new(ROOT)).expect("load");
        assert!(!adopted, "nothing was pinned before");
        configure(&mut dp);
        assert_eq!(
            dp.attach_pinned("lb0", Some(XdpMode::Skb)).expect("attach"),
            Some(XdpMode::Skb)
        );
        let syn = tcp4(CLIENT4, vip4(1), 40001, 80, SYN, &[], &[]);
        assert_eq!(run_once(dp.program(), &syn, ifindex).0, XDP_TX);
        // A token, in the bucket the table's key puts it in.
        let now = coarse_now_ns();
        let token = lb_common::maps::TokenEntry {
            backend: 1,
            service: 1,
            learned_ns: now,
            last_seen_ns: now,
            version: 1,
            origin: lb_common::maps::TOKEN_FROM_BACKEND,
        };
        dp.maps
            .tokens
            .set(TOKEN, &token, lb_common::maps::DEFAULT_TOKEN_IDLE_NS);
        (
            dp.program().info().expect("info").id(),
            dp.maps.tokens.key(),
        )
    });
    let (first, seed) = first;
    // The process's handles are gone; the pinned link keeps the program attached.
    assert_eq!(
        env.ns.xdp_prog("lb0"),
        Some(first),
        "the program stays attached"
    );

    // Second process: adopts the pins, the flow is still there, the program is replaced
    // through the link (one atomic swap: there is never no program on lb0).
    let second = env.ns.within(move || {
        let (mut dp, adopted) =
            Dataplane::load_pinned(sizes(4096), Path::new(ROOT)).expect("adopt");
        assert!(adopted, "the pins were adopted");
        let conn = dp
            .maps
            .conns
            .get(&key)
            .expect("the connection table survived the restart");
        assert_eq!(conn.backend, 1);
        // The token table keeps its bucket key, so its tokens are found where they are.
        assert_eq!(dp.maps.tokens.key(), seed, "the token table's key survived");
        assert_eq!(
            dp.maps.config.get(&0, 0).expect("config").token_key,
            seed,
            "the dataplane uses it"
        );
        assert_eq!(
            dp.maps.tokens.get(TOKEN).map(|e| e.backend),
            Some(1),
            "the token table survived the restart"
        );
        assert_eq!(
            dp.attach_pinned("lb0", Some(XdpMode::Skb))
                .expect("replace"),
            None,
            "replaced through the link"
        );
        dp.program().info().expect("info").id()
    });
    assert_ne!(second, first);
    assert_eq!(
        env.ns.xdp_prog("lb0"),
        Some(second),
        "the new program is the one attached"
    );

    // A configuration with another table size must not reuse the pinned table.
    let err = Dataplane::load_pinned(sizes(8192), root)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("LB_CONNS") && err.contains("max_entries 4096") && err.contains("needs 8192"),
        "{err}"
    );
    assert!(
        err.contains(&format!("mptcp-lb detach --pin-path {ROOT}")),
        "{err}"
    );

    // Pins of another layout version are refused, with the command that clears them.
    let other = root.join(format!("v{}", LAYOUT_VERSION + 100));
    std::fs::create_dir_all(&other).expect("fake other layout");
    let err = Dataplane::load_pinned(sizes(4096), root)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("another mptcp-lb layout")
            && err.contains(&format!("rm -r {}", other.display())),
        "{err}"
    );
    std::fs::remove_dir(&other).expect("remove fake layout");

    // Detach: the pins go, and with them the program.
    assert!(pins::remove(root).expect("remove pins"));
    assert_eq!(env.ns.xdp_prog("lb0"), None, "detached");
    assert!(
        !pins::remove(root).expect("second remove"),
        "nothing left to remove"
    );
}

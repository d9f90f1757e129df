//! Global dataplane counters: one per-CPU u64 each, summed by the controller and CLI.

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident = $label:literal,)*) => {
        /// Index into [`crate::maps::MAP_STATS`].
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $($(#[doc = $doc])* $name,)* }

        impl Counter {
            pub const ALL: &[Counter] = &[$(Counter::$name,)*];
            /// Stable name for metrics and `--json`.
            pub const fn label(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }
        }
    };
}

counters! {
    /// Not addressed to a VIP: handed to the host stack untouched.
    PassNonVip = "pass_non_vip",
    /// Could not be parsed (truncated, not IP, bad header): handed to the host stack.
    PassMalformed = "pass_malformed",
    /// To a VIP address but neither TCP nor UDP (ICMP and the like): host stack.
    PassVipOtherProto = "pass_vip_other_proto",
    /// Encapsulated, but the kernel has no neighbour entry for the next hop yet: the
    /// kernel forwards this one and resolves the neighbour.
    PassNoNeigh = "pass_no_neigh",
    /// A TCP/UDP packet to a VIP whose header is cut short.
    DropTruncated = "drop_truncated",
    /// An IPv4 fragment to a VIP address (no ports to balance on).
    DropFragment = "drop_fragment",
    /// An IPv6 packet to a VIP address with extension headers.
    DropIpv6Ext = "drop_ipv6_ext",
    /// The service has no backend that takes new connections.
    DropNoBackend = "drop_no_backend",
    /// No outer source address configured for the backend's address family.
    DropNoSource = "drop_no_source",
    /// Too big for the egress MTU once encapsulated.
    DropTooBig = "drop_too_big",
    /// The route lookup for the backend failed (no route, blackhole, ...).
    DropFib = "drop_fib",
    /// The kernel refused to grow the packet headroom.
    DropEncap = "drop_encap",
    /// Sent back out of the interface it came in on.
    Tx = "tx",
    /// Redirected to another interface.
    Redirect = "redirect",
    /// Established flow found in the connection table.
    ConnHit = "conn_hit",
    /// New flow (TCP SYN or a UDP flow) placed by Maglev and recorded.
    ConnNew = "conn_new",
    /// A non-SYN TCP packet missing from the table: placed by Maglev (table lost or
    /// flow began before this node saw it) and recorded.
    ConnMissNonSyn = "conn_miss_non_syn",
    /// A connection whose backend was removed: re-placed by Maglev.
    ConnRepick = "conn_repick",
    /// A new flow over the new-flow rate limit (flood guard): forwarded by Maglev, not
    /// recorded until a later packet under the limit.
    ConnFloodBypass = "conn_flood_bypass",
    /// Decapsulation program: tunnels stripped.
    DecapOk = "decap_ok",
    /// A SYN to a VIP carrying MP_CAPABLE (no server key yet), version 1.
    MpCapableSynV1 = "mp_capable_syn_v1",
    /// The same, version 0.
    MpCapableSynV0 = "mp_capable_syn_v0",
    /// A token learned from the server key the client echoed (SHA-256, version 1).
    TokenLearnedV1 = "token_learned_v1",
    /// A token learned with SHA-1 (version 0).
    TokenLearnedV0 = "token_learned_v0",
    /// A token already live for another backend: not overwritten (first writer wins).
    TokenCollision = "token_collision",
    /// A flow that began with MP_CAPABLE whose first non-SYN packets (several) carried
    /// no keys: the connection fell back to plain TCP.
    MptcpFallback = "mptcp_fallback",
    /// An MP_JOIN SYN sent to the backend that owns its token.
    JoinRouted = "join_routed",
    /// An MP_JOIN SYN with no live token, dropped (policy `drop`).
    JoinUnknownDropped = "join_unknown_dropped",
    /// An MP_JOIN SYN with no live token, placed by Maglev on the token (policy `hash`).
    JoinUnknownHashed = "join_unknown_hashed",
    /// A token found idle for longer than the idle time: forgotten.
    TokenExpired = "token_expired",
    /// A handshake's keys for a connection whose backend is out of service (down or
    /// disabled): no token learned, so its joins are not steered there.
    LearnBackendOut = "learn_backend_out",
    /// Keys not used because this CPU learned `max_learn_rate` tokens this second; the
    /// flow may still learn from a later packet with keys.
    LearnRateLimited = "learn_rate_limited",
    /// An MP_CAPABLE SYN on a flow that learned its token moments ago: the entry and its
    /// token are kept, the SYN follows them (a forgery, or a stray duplicate).
    SynOnLearnedFlow = "syn_on_learned_flow",
    /// A token learned into a full bucket of the token table pushed out the live token
    /// seen least recently there (whose joins then follow the unknown-token policy): the
    /// table is too small for the connections, or a flood of handshakes is turning it.
    TokenEvicted = "token_evicted",
    /// An ICMP "fragmentation needed" / "packet too big" to a VIP quoting a VIP flow's
    /// packet (a backend's direct reply too big for a link to the client): sent to that
    /// flow's backend, so path MTU discovery works.
    IcmpToBackend = "icmp_to_backend",
    /// Decapsulation program: a tunnel packet marked CE (congestion) whose inner packet
    /// is not ECN-capable: dropped, as RFC 6040 requires.
    DecapCeNotEct = "decap_ce_not_ect",
    /// An MP_JOIN SYN to a backend's join port: sent to that backend.
    JoinPortRouted = "join_port_routed",
    /// A SYN to a join port that is not an MP_JOIN (a new connection, a scan): dropped.
    DropJoinPortNotJoin = "drop_join_port_not_join",
    /// An MP_JOIN SYN to the join port of a backend out of service (down, disabled or
    /// removed): dropped, as a token join for it would be.
    DropJoinPortBackendOut = "drop_join_port_backend_out",
    /// Keys of a version 0 handshake that did not echo the client key of its SYN: not
    /// used (forged, or not of this connection).
    LearnKeyMismatch = "learn_key_mismatch",
}

/// Number of global counters.
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;
/// Slots of the stats map: room for counters added later, so that adding one does not
/// change the pinned map and a new program still adopts a running balancer's maps.
pub const COUNTER_SLOTS: u32 = 64;
const _: () = assert!(COUNTER_COUNT <= COUNTER_SLOTS);

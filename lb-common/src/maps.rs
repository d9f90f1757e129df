//! Map names, sizes and the `#[repr(C)]` keys and values the dataplane and the
//! controller exchange. Explicit padding everywhere: `bytemuck::Pod` refuses to derive
//! on a struct with implicit padding, and the size asserts catch layout drift.

use bytemuck::{Pod, Zeroable};

/// Bumped whenever a map's key or value layout, or the set of maps, changes: pinned maps
/// live under `<pin path>/v<LAYOUT_VERSION>` so a new binary never adopts old layouts.
pub const LAYOUT_VERSION: u32 = 9;

/// Single-entry array holding [`Config`].
pub const MAP_CONFIG: &str = "LB_CONFIG";
/// VIP (address, port, protocol) → [`VipInfo`]: what the controller installed, read by
/// the controller and the CLI. The dataplane reads [`MAP_VIP_SLOTS`], built from it.
pub const MAP_VIPS: &str = "LB_VIPS";
/// The VIPs as the dataplane looks them up: two tables of [`VIP_SLOTS`] [`VipSlot`]s
/// (`Config::vip_table` says which is live). Hash and displace: a VIP's slot is its
/// [`vip_hash`] base plus the displacement [`MAP_VIP_BUCKETS`] holds for its bucket,
/// which the controller chose so that no two VIPs share a slot. Two array lookups, both
/// inlined by the verifier, and one comparison: a few nanoseconds where a hash-map
/// lookup costs about twenty, on every packet.
pub const MAP_VIP_SLOTS: &str = "LB_VIP_SLOTS";
/// Displacements of the VIP tables: two tables of [`VIP_BUCKETS`] u32s, beside
/// [`MAP_VIP_SLOTS`]'s two.
pub const MAP_VIP_BUCKETS: &str = "LB_VIP_BUCKETS";
/// Backend id → [`Backend`]; id 0 is reserved so an all-zero Maglev slot never routes.
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
/// Maglev lookup tables, one ring of `Config::ring_size` backend ids per service.
pub const MAP_MAGLEV: &str = "LB_MAGLEV";
/// Connection table of IPv6 flows: [`FlowKey`] → [`Conn`] (LRU, shared across CPUs).
pub const MAP_CONNS: &str = "LB_CONNS";
/// Connection table of IPv4 flows: [`FlowKey4`] → [`Conn`] (LRU, shared across CPUs).
/// A table of its own with 16-byte keys: a hit hashes and compares 16 bytes, not 40, and
/// an entry takes 96 bytes of memory instead of 120.
pub const MAP_CONNS4: &str = "LB_CONNS4";
/// Global counters (per CPU), indexed by [`crate::counters::Counter`].
pub const MAP_STATS: &str = "LB_STATS";
/// Per-service packets and bytes (per CPU), indexed by service id.
pub const MAP_SERVICE_STATS: &str = "LB_SVC_STATS";
/// Per-backend packets and bytes (per CPU), indexed by backend id.
pub const MAP_BACKEND_STATS: &str = "LB_BE_STATS";
/// Local addresses the decapsulation program accepts tunnels for.
pub const MAP_DECAP_ADDRS: &str = "LB_DECAP_ADDRS";
/// MPTCP token → its connection's backend: an array of
/// [`crate::tokens::TokenBucket`]s, set-associative (see [`crate::tokens`]), shared across
/// CPUs and mmapable (the host reads and writes single slots in place).
pub const MAP_TOKENS: &str = "LB_TOKENS";
/// Next hop per backend, per CPU: what the last route lookup said (cache).
pub const MAP_NEXTHOPS: &str = "LB_NEXTHOPS";
/// Benchmark only: the frame the resetting wrapper restores before every iteration.
pub const MAP_BENCH: &str = "LB_BENCH";
/// Per-CPU windows of the flood guard and the learning limit (private to each loaded
/// program, not pinned).
pub const MAP_CONN_RATE: &str = "LB_CONN_RATE";
/// Controller metadata, never read by the dataplane: service id → [`ServiceMeta`]
/// (its name), so the CLI can name services while the daemon is down.
pub const MAP_SERVICE_META: &str = "LB_SVC_META";
/// Controller metadata: backend id → [`BackendMeta`] (service, weight, why it is out of
/// the Maglev table). Administrative drains survive a daemon restart through it.
pub const MAP_BACKEND_META: &str = "LB_BE_META";
/// Backend side: ring buffer of [`TokenEvent`]s, one per SYN/ACK with MP_CAPABLE leaving
/// the backend (`token_egress`), read by `mptcp-lb agent`. Not pinned.
pub const MAP_TOKEN_EVENTS: &str = "LB_TOKEN_EVENTS";
/// Bytes of [`MAP_TOKEN_EVENTS`]: 8,192 events of 32 bytes (plus the ring's 8-byte record
/// headers) between two reads of the agent.
pub const TOKEN_EVENTS_BYTES: u32 = 1 << 19;

pub const MAX_SERVICES: u32 = 64;
pub const MAX_BACKENDS: u32 = 4096;
pub const MAX_VIPS: u32 = 1024;
/// Slots of one VIP table: its at most [`MAX_VIPS`] entries (VIPs and their address
/// markers, which `LB_VIPS` holds and the controller counts) fill a sixteenth of it.
pub const VIP_SLOTS: u32 = 16384;
/// Buckets (displacements) of one VIP table.
pub const VIP_BUCKETS: u32 = 4096;
pub const MAX_DECAP_ADDRS: u32 = 64;
/// Default Maglev ring size per service (prime, as Maglev requires).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default capacity of the IPv4 connection table.
pub const DEFAULT_CONN_ENTRIES: u32 = 1 << 20;
/// Default capacity of the IPv6 connection table.
pub const DEFAULT_CONN6_ENTRIES: u32 = 1 << 18;
/// Default token-table capacity.
pub const DEFAULT_TOKEN_ENTRIES: u32 = 1 << 20;
/// Default idle time after which a token no longer routes joins (and may be relearned
/// for another backend).
pub const DEFAULT_TOKEN_IDLE_NS: u64 = 3600 * 1_000_000_000;
/// A token's `last_seen` is rewritten at most this often by a connection's traffic.
pub const TOKEN_REFRESH_NS: u64 = 1_000_000_000;
/// For this long after a flow learned its token, an MP_CAPABLE SYN on the same 5-tuple
/// keeps the flow entry and its token, so that one client cannot churn the token table
/// by replaying handshakes on one flow. The price: a genuine new connection on the same
/// 5-tuple within that time (possible when the server closed first and holds the
/// TIME_WAIT) learns no token, and its joins are refused; its first subflow is not
/// affected.
pub const RELEARN_HOLDOFF_NS: u64 = 3_000_000_000;
/// Slots of the per-CPU rate windows ([`ConnRate`]): new flows, and tokens learned.
pub const RATE_NEW_FLOWS: u32 = 0;
pub const RATE_LEARNING: u32 = 1;
/// Log records of rare events (aya-log), per CPU and second.
pub const RATE_LOG: u32 = 2;
/// At most this many log records a second per CPU: a flood of rare events (collisions,
/// limits reached) must not become a flood of log lines.
pub const MAX_LOG_RATE: u32 = 32;
/// Slots of [`MAP_CONN_RATE`].
pub const RATE_SLOTS: u32 = 3;

/// `Config::flags`: an MP_JOIN with an unknown token is placed by Maglev on the token
/// (the `hash` policy) instead of dropped (the `drop` policy, default).
pub const CONFIG_JOIN_UNKNOWN_HASH: u32 = 1;
/// `Config::flags`: MPTCP awareness off: no token learning, joins are placed by their
/// 5-tuple like any SYN (what a classic L4 balancer does; for comparison and tests).
pub const CONFIG_NO_MPTCP: u32 = 2;
/// Not read by the dataplane: the operator drained this node (`mptcp-lb node drain`),
/// so its VIPs are not announced; kept here so that a restarted daemon keeps it.
pub const CONFIG_NODE_DRAINED: u32 = 4;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Run-time settings of the balancer program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// Keyed-hash seed; identical on every node so nodes agree on backends.
    pub seed: u32,
    /// Maglev ring size per service (prime); 0 means not configured: pass everything.
    pub ring_size: u32,
    /// Outer IPv4 source, network order; 0 = no IPv4 backends can be reached.
    pub src4: u32,
    /// How many low bits of `src4` are replaced by flow-hash bits (0..=16), so a
    /// backend's receive-side scaling spreads tunnelled flows over its queues.
    pub src4_vary_bits: u32,
    /// Outer IPv6 source, network order; all zero = no IPv6 backends.
    pub src6: [u32; 4],
    /// Low bits of `src6` (in its last word) replaced by flow-hash bits (0..=16).
    pub src6_vary_bits: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Idle time after which a token is forgotten; 0 means [`DEFAULT_TOKEN_IDLE_NS`].
    pub token_idle_ns: u64,
    /// Flood guard (Katran's): above this many new flows a second on one CPU, a new flow
    /// (any SYN, a non-SYN miss, a new UDP flow, a join with an unknown token) is placed
    /// by Maglev but not recorded, so a flood cannot turn the table over; it is recorded
    /// at a later packet once under the limit. Only joins steered by a known token are
    /// always recorded (their later packets must follow the token). 0 = no limit.
    pub max_conn_rate: u32,
    /// Tokens one CPU may learn a second: each costs a SHA-256 and a token-table insert,
    /// and a client can make handshakes at will. Over it, a packet's keys are not used
    /// (the flow keeps learning from its next packet with keys). 0 = no limit.
    pub max_learn_rate: u32,
    /// Which of the two VIP tables in [`MAP_VIP_SLOTS`] is live (0 or 1). The controller
    /// writes the other one, then switches.
    pub vip_table: u32,
    /// Buckets of the token table minus one (a power of two minus one), which the
    /// controller writes from the table it created.
    pub token_mask: u32,
    /// Key of the token table's bucket hash (SipHash-1-3), random per table and kept
    /// with it across restarts; all zero until drawn. Who does not know it cannot pick
    /// tokens that share a bucket with a given one, and so cannot push a given token out
    /// with a few handshakes.
    pub token_key: [u64; 2],
}
const _: () = assert!(core::mem::size_of::<Config>() == 80);

/// Per-CPU window of a rate limit ([`Config::max_conn_rate`], [`Config::max_learn_rate`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ConnRate {
    pub window_start_ns: u64,
    pub count: u64,
}

/// Key of [`MAP_VIPS`]. A key with `port == 0 && proto == 0` marks a VIP address, so
/// fragments and IPv6 extension headers sent to it are recognised and dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipKey {
    /// Address in network order; IPv4 in word 0, the rest zero.
    pub addr: [u32; 4],
    /// Port in network order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// One slot of a VIP table ([`MAP_VIP_SLOTS`]); `key.family == 0` is a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipSlot {
    pub key: VipKey,
    pub info: VipInfo,
}
const _: () = assert!(core::mem::size_of::<VipSlot>() == 28);

/// `key`'s slot in a VIP table whose bucket of `key` holds displacement `shift`:
/// `base + d0 * step + d1` modulo [`VIP_SLOTS`], with `d0` the high and `d1` the low half
/// of `shift`, and `(bucket, base, step)` = [`vip_hash`]`(key)`. Two keys of one bucket
/// that share their base are parted by `d0` unless they also share their step.
#[inline(always)]
pub fn vip_slot(base: u32, step: u32, shift: u32) -> u32 {
    base.wrapping_add((shift >> 16).wrapping_mul(step))
        .wrapping_add(shift & 0xffff)
        & (VIP_SLOTS - 1)
}

/// `key`'s bucket (below [`VIP_BUCKETS`]), base slot (below [`VIP_SLOTS`]) and step (odd)
/// in a VIP table: see [`vip_slot`]. Not keyed: the table is built from the
/// configuration, never from traffic, and a lookup costs the same whatever the key.
#[inline(always)]
pub fn vip_hash(key: &VipKey) -> (u32, u32, u32) {
    let mut h = (key.addr[0] as u64) << 32 | key.addr[1] as u64;
    h = (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= (key.addr[2] as u64) << 32 | key.addr[3] as u64;
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= (key.port as u64) << 16 | (key.proto as u64) << 8 | key.family as u64;
    h = (h ^ (h >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 29;
    (
        (h >> 52) as u32 & (VIP_BUCKETS - 1),
        h as u32 & (VIP_SLOTS - 1),
        ((h >> 24) as u32 & (VIP_SLOTS - 1)) | 1,
    )
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipInfo {
    /// Service id: index of its Maglev ring and its stats slot.
    pub service: u32,
    /// `VIP_*` bits; for a join port, the backend's id above [`VIP_BACKEND_SHIFT`].
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 8);

/// A backend's join port (VIP:P, announced by the backend with ADD_ADDR): every packet
/// of an MP_JOIN subflow there goes to that backend, on every node, without state.
pub const VIP_JOIN_PORT: u32 = 1;
/// A service port whose service steers joins by port: its backends set the C bit, so
/// version 1 clients never join it and their tokens need not be learned.
pub const VIP_STEERS_BY_PORT: u32 = 2;
/// A service port with client-address affinity: new flows are placed by Maglev on the
/// client's address alone (every connection of one client to one backend, as IPVS
/// persistence does), not on the 5-tuple.
pub const VIP_AFFINITY_CLIENT: u32 = 4;
/// A service port whose service learns tokens only from its backends' announcements
/// (`learn_tokens = "backend"`): client packets teach nothing.
pub const VIP_NO_CLIENT_LEARNING: u32 = 8;
/// Where a join port's backend id sits in [`VipInfo::flags`].
pub const VIP_BACKEND_SHIFT: u32 = 16;
const _: () = assert!(MAX_BACKENDS <= 1 << (32 - VIP_BACKEND_SHIFT));

impl VipInfo {
    /// The entry of backend `backend`'s join port in `service`.
    pub const fn join_port(service: u32, backend: u32) -> Self {
        Self {
            service,
            flags: VIP_JOIN_PORT | (backend << VIP_BACKEND_SHIFT),
        }
    }

    /// The backend of a join port (0 for a service port).
    #[inline(always)]
    pub const fn join_backend(&self) -> u32 {
        if self.flags & VIP_JOIN_PORT != 0 {
            self.flags >> VIP_BACKEND_SHIFT
        } else {
            0
        }
    }
}

/// The backend may take new connections (it is in the Maglev table).
pub const BACKEND_ACTIVE: u32 = 1;
/// Draining: no new connections, established ones (and their joins) still reach it.
pub const BACKEND_DRAINING: u32 = 2;
/// Out of service (its health check failed, or an operator disabled it): established
/// flows still reach it, but it learns no new token and no join is steered to it.
pub const BACKEND_OUT_OF_SERVICE: u32 = 4;
/// The `BACKEND_*` bits of a backend that owns its connections' tokens: joins of its
/// connections are steered to it and handshakes it answers teach their tokens.
pub const BACKEND_TAKES_JOINS: u32 = BACKEND_ACTIVE | BACKEND_DRAINING;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    /// Address in network order; IPv4 in word 0.
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
    /// One `BACKEND_*` value; 0 = slot unused or backend removed: connections to it
    /// re-pick.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// Key of the connection table: the client's 5-tuple as the balancer sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Ports in network order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The key of this flow in the IPv4 table ([`MAP_CONNS4`]); meaningful when `family`
    /// is [`FAMILY_V4`].
    #[inline(always)]
    pub fn v4(&self) -> FlowKey4 {
        // Built as four words: written field by field, the three padding bytes become a
        // call to the BPF object's byte-wise memset on every IPv4 table lookup.
        let [s0, s1] = self.sport.to_ne_bytes();
        let [d0, d1] = self.dport.to_ne_bytes();
        bytemuck::cast([
            self.src[0],
            self.dst[0],
            u32::from_ne_bytes([s0, s1, d0, d1]),
            u32::from_ne_bytes([self.proto, 0, 0, 0]),
        ])
    }
}

/// Key of the IPv4 connection table: the client's 5-tuple, addresses and ports in
/// network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey4 {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey4>() == 16);

impl From<FlowKey4> for FlowKey {
    fn from(k: FlowKey4) -> FlowKey {
        FlowKey {
            src: [k.src, 0, 0, 0],
            dst: [k.dst, 0, 0, 0],
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }
}

/// `Conn::flags`: the flow began with a SYN carrying MP_CAPABLE, seen by this node.
pub const CONN_MPTCP: u32 = 1;
/// `Conn::flags`: token learning is over for this flow (learned, collided, or the
/// connection fell back to plain TCP).
pub const CONN_TOKEN_DONE: u32 = 2;
/// `Conn::flags`: the flow is an additional subflow (it began with MP_JOIN).
pub const CONN_JOIN: u32 = 4;
/// `Conn::flags`: the flow began with a version 0 MP_CAPABLE SYN, which carries the
/// client's key; until learning is over, `Conn::token` holds that key's low 32 bits, and
/// only a packet echoing the same client key may teach the token. A client that forges
/// a third ACK without having seen the SYN cannot match it.
pub const CONN_KEY_CHECK: u32 = 8;
/// `Conn::flags`: how many packets of a flow still learning its token taught nothing
/// (3 bits). Learning gives up (the connection fell back to plain TCP) at
/// [`LEARN_MISSES_MAX`], not at the first such packet: a packet reordered ahead of the
/// keys (a second data segment handled on another CPU) or one forged bare ACK between the
/// SYN and the real third ACK must not settle learning for good.
pub const CONN_LEARN_MISSES: u32 = 0x700;
const CONN_LEARN_MISSES_SHIFT: u32 = 8;
/// Packets without usable keys after which a flow stops looking for them.
pub const LEARN_MISSES_MAX: u32 = 4;
/// `Conn::flags`: the `CONN_*` bits. The high 16 bits of a flow that knows its token hold
/// the stamp of its last token refresh ([`Conn::refresh_due`]).
pub const CONN_BITS: u32 = 0xffff;
/// A refresh stamp counts jiffies in units of 2^6: 64 ms at HZ=1000, 256 ms at HZ=250,
/// 640 ms at HZ=100; below `TOKEN_REFRESH_NS` at any HZ, so the token's own one-second
/// rule still decides when `last_seen_ns` is written.
const REFRESH_UNIT_SHIFT: u32 = 6;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Conn {
    pub backend: u32,
    pub service: u32,
    /// MPTCP token of the connection this flow belongs to, once `CONN_TOKEN_DONE` is set
    /// (0 = none known). While a version 0 flow learns, the low half of its client's key
    /// (`CONN_KEY_CHECK`). [`Conn::known_token`] reads it right.
    pub token: u32,
    /// `CONN_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Conn>() == 16);

impl Conn {
    /// The connection's token, if learning is over and gave one.
    #[inline(always)]
    pub fn known_token(&self) -> Option<u32> {
        (self.flags & CONN_TOKEN_DONE != 0 && self.token != 0).then_some(self.token)
    }

    /// The high half of `flags` once the flow refreshed its token at `jiffies`: bit 31
    /// set (a flow that never refreshed has 0 there), then 15 bits of the time unit.
    #[inline(always)]
    pub fn refresh_stamp(jiffies: u64) -> u32 {
        (1 << 31) | ((jiffies >> REFRESH_UNIT_SHIFT) as u32 & 0x7fff) << 16
    }

    /// Whether a packet at `jiffies` should refresh the flow's token: not when an earlier
    /// packet did within the same time unit. This spares the token-table lookup to all
    /// but a few packets a second of every MPTCP subflow.
    #[inline(always)]
    pub fn refresh_due(&self, jiffies: u64) -> bool {
        self.flags & !CONN_BITS != Self::refresh_stamp(jiffies)
    }

    /// `flags` after one more packet of a learning flow that taught nothing, and whether
    /// learning is now over (`CONN_TOKEN_DONE` set: the connection fell back).
    #[inline(always)]
    pub fn learn_missed(&self) -> (u32, bool) {
        let misses = ((self.flags & CONN_LEARN_MISSES) >> CONN_LEARN_MISSES_SHIFT) + 1;
        if misses >= LEARN_MISSES_MAX {
            ((self.flags & !CONN_LEARN_MISSES) | CONN_TOKEN_DONE, true)
        } else {
            (
                (self.flags & !CONN_LEARN_MISSES) | (misses << CONN_LEARN_MISSES_SHIFT),
                false,
            )
        }
    }

    /// `flags` with the refresh stamp of `jiffies` and the same `CONN_*` bits.
    #[inline(always)]
    pub fn refreshed_flags(&self, jiffies: u64) -> u32 {
        self.flags & CONN_BITS | Self::refresh_stamp(jiffies)
    }
}

/// What the balancer knows of a learned MPTCP token, as the host reads it from its slot
/// ([`crate::tokens::TokenSlot`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenEntry {
    pub backend: u32,
    pub service: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC) when it was learned and last
    /// refreshed, to the slot stamps' resolution ([`crate::tokens::STAMP_NS`]).
    pub learned_ns: u64,
    pub last_seen_ns: u64,
    /// MPTCP version the token was derived for (0 = SHA-1, 1 = SHA-256).
    pub version: u32,
    /// Who told the balancer: [`TOKEN_FROM_CLIENT`] (learned from the handshake) or
    /// [`TOKEN_FROM_BACKEND`] (announced by the backend, the authority on its tokens).
    pub origin: u32,
}
/// [`TokenEntry::origin`]: learned in the dataplane from the client's handshake.
pub const TOKEN_FROM_CLIENT: u32 = 0;
/// [`TokenEntry::origin`]: announced by the backend's agent.
pub const TOKEN_FROM_BACKEND: u32 = 1;

/// One SYN/ACK with MP_CAPABLE leaving a backend, as `token_egress` reports it: the
/// server key, and the address and port the connection was made to (the SYN/ACK's
/// source: the VIP, under direct server return).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TokenEvent {
    /// Address in network order; IPv4 in word 0, the rest zero.
    pub addr: [u32; 4],
    pub key: u64,
    /// Port in network order.
    pub port: u16,
    pub family: u8,
    /// MP_CAPABLE version (0 or 1).
    pub version: u8,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<TokenEvent>() == 32);

/// Packets and bytes, per CPU, per service or backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Traffic>() == 16);

/// Key of [`MAP_DECAP_ADDRS`]: a local address that tunnels may be addressed to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

/// How long a route lookup's answer for a backend is reused: route and neighbour changes
/// reach the dataplane within this time. Counted in kernel ticks (jiffies), which the
/// verifier turns into one memory load where any clock helper costs a call: 250 ticks is
/// 1 s at HZ=250 (Debian's kernels), 0.25 s at HZ=1000, 2.5 s at HZ=100.
pub const NEXTHOP_TTL_JIFFIES: u32 = 250;
/// The same in nanoseconds, for the `expires_ns` field older programs read.
pub const NEXTHOP_TTL_NS: u64 = 1_000_000_000;

/// A cached route lookup for one backend (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// Egress interface; 0 = no entry.
    pub ifindex: u32,
    /// MTU of the route: larger outer packets are dropped as too big.
    pub mtu: u32,
    /// Low 32 bits of the jiffies after which the entry must be looked up again; 0 (what
    /// an older program of this layout leaves) is never fresh.
    pub expires_jiffies: u32,
    /// `bpf_ktime_get_coarse_ns` expiry: read by older programs of this layout (written
    /// still, so a rollback finds it right), not by this one.
    pub expires_ns: u64,
}

impl NextHop {
    /// Whether the entry may be used at `now_jiffies` (low 32 bits): between the lookup
    /// and its expiry, whatever the wrap-around of the 32-bit tick count.
    #[inline(always)]
    pub fn fresh(&self, now_jiffies: u32) -> bool {
        self.ifindex != 0
            && self.expires_jiffies != 0
            && self.expires_jiffies.wrapping_sub(now_jiffies) <= NEXTHOP_TTL_JIFFIES
    }

    /// The expiry to record for a lookup made at `now_jiffies`. Never 0: at the one tick
    /// in 2^32 where it would be, it is 1, and that lookup is redone at the next packet.
    #[inline(always)]
    pub fn expiry(now_jiffies: u32) -> u32 {
        match now_jiffies.wrapping_add(NEXTHOP_TTL_JIFFIES) {
            0 => 1,
            e => e,
        }
    }
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);
// The dataplane copies the two MAC addresses as the first 12 bytes of a NextHop, in
// Ethernet order (destination, then source).
const _: () =
    assert!(core::mem::offset_of!(NextHop, dmac) == 0 && core::mem::offset_of!(NextHop, smac) == 6);

/// Longest service name the metadata map holds.
pub const SERVICE_NAME_LEN: usize = 32;

/// What the controller records of a service (id = index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceMeta {
    /// UTF-8, NUL-padded.
    pub name: [u8; SERVICE_NAME_LEN],
    /// 1 while the service is configured.
    pub in_use: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceMeta>() == 40);

/// `BackendMeta::state`: drained by the configuration (`drain = true`).
pub const BMETA_DRAIN_CONFIG: u32 = 1;
/// Drained by `mptcp-lb backend drain`.
pub const BMETA_DRAIN_ADMIN: u32 = 2;
/// Disabled by `mptcp-lb backend disable`: out of the Maglev table, tokens dropped.
pub const BMETA_DISABLED: u32 = 4;
/// Failing its health check.
pub const BMETA_DOWN: u32 = 8;
/// A health check runs for it.
pub const BMETA_CHECKED: u32 = 16;

/// What the controller records of a backend (id = index, as in [`MAP_BACKENDS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendMeta {
    pub service: u32,
    pub weight: u32,
    /// `BMETA_*` bits.
    pub state: u32,
    pub _pad: u32,
    /// Wall-clock time (Unix ns) of the last change of `state`.
    pub changed_unix_ns: u64,
}
const _: () = assert!(core::mem::size_of::<BackendMeta>() == 24);

/// Largest frame the benchmark wrapper restores.
pub const BENCH_FRAME: usize = 256;

/// What `cargo xtask bench` asks of the resetting wrapper program for one class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BenchFrame {
    /// Frame length, a multiple of 8 (pad with trailing bytes; IP lengths stay right).
    pub len: u32,
    /// Offset at which to write the iteration number (u32) before each run, so every
    /// iteration is a new flow or carries a new key; 0 = leave the frame as it is.
    pub vary_off: u32,
    /// 1: before each run, reset the connection entry of `flow` to "began with
    /// MP_CAPABLE, token not learned", so every iteration learns.
    pub relearn: u32,
    /// Iteration counter.
    pub seq: u32,
    pub flow: FlowKey,
    pub bytes: [u8; BENCH_FRAME],
}
const _: () = assert!(core::mem::size_of::<BenchFrame>() == 16 + 40 + BENCH_FRAME);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], bytemuck::Pod (no padding, any bit pattern).
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnRate {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Conn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Traffic {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BenchFrame {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendMeta {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_flow_key_keeps_every_field() {
        let key = FlowKey {
            src: [0x0a00_0001u32.to_be(), 0, 0, 0],
            dst: [0x0a64_0001u32.to_be(), 0, 0, 0],
            sport: 40_000u16.to_be(),
            dport: 443u16.to_be(),
            proto: 6,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let k4 = key.v4();
        assert_eq!(
            k4,
            FlowKey4 {
                src: key.src[0],
                dst: key.dst[0],
                sport: key.sport,
                dport: key.dport,
                proto: 6,
                _pad: [0; 3],
            }
        );
        assert_eq!(FlowKey::from(k4), key);
    }

    #[test]
    fn a_token_refresh_is_due_once_per_time_unit() {
        let unit = 1u64 << REFRESH_UNIT_SHIFT;
        for start in [
            0u64,
            1,
            63,
            64,
            12_345,
            (0x7fff << REFRESH_UNIT_SHIFT) + 5,
            u64::MAX - 70,
        ] {
            for kind in [
                CONN_MPTCP | CONN_TOKEN_DONE,
                CONN_MPTCP | CONN_TOKEN_DONE | CONN_JOIN,
            ] {
                let mut c = Conn {
                    backend: 1,
                    service: 1,
                    token: 0x4e4b_2c90,
                    flags: kind,
                };
                assert!(
                    c.refresh_due(start),
                    "a flow that never refreshed ({start})"
                );
                c.flags = c.refreshed_flags(start);
                assert_eq!(c.flags & CONN_BITS, kind, "the kind bits are kept");
                let unit_start = start & !(unit - 1);
                assert!(!c.refresh_due(start));
                assert!(!c.refresh_due(unit_start + unit - 1), "same unit ({start})");
                assert!(
                    c.refresh_due(unit_start.wrapping_add(unit)),
                    "the next unit ({start})"
                );
            }
        }
    }

    #[test]
    fn learning_gives_up_only_after_several_packets_without_keys() {
        let mut c = Conn {
            flags: CONN_MPTCP | Conn::refresh_stamp(5),
            ..Default::default()
        };
        for n in 1..LEARN_MISSES_MAX {
            let (flags, over) = c.learn_missed();
            assert!(!over, "over after {n} packets");
            assert_eq!(flags & CONN_TOKEN_DONE, 0);
            c.flags = flags;
        }
        let (flags, over) = c.learn_missed();
        assert!(over, "still learning after {LEARN_MISSES_MAX} packets");
        assert_eq!(flags & CONN_BITS, CONN_MPTCP | CONN_TOKEN_DONE);
        assert_eq!(
            flags & !CONN_BITS,
            Conn::refresh_stamp(5),
            "the stamp is kept"
        );
    }

    fn looked_up_at(now: u32) -> NextHop {
        NextHop {
            ifindex: 2,
            expires_jiffies: NextHop::expiry(now),
            ..Default::default()
        }
    }

    #[test]
    fn a_next_hop_is_fresh_for_its_ttl_and_not_after() {
        for start in [
            0u32,
            1,
            12_345,
            u32::MAX - 100,
            u32::MAX - NEXTHOP_TTL_JIFFIES,
        ] {
            let nh = looked_up_at(start);
            assert!(nh.fresh(start), "at the lookup ({start})");
            assert!(nh.fresh(start.wrapping_add(NEXTHOP_TTL_JIFFIES - 1)));
            assert!(
                !nh.fresh(start.wrapping_add(NEXTHOP_TTL_JIFFIES + 1)),
                "after the TTL ({start})"
            );
            assert!(
                !nh.fresh(start.wrapping_add(1 << 31)),
                "long after ({start})"
            );
        }
    }

    #[test]
    fn entries_older_programs_wrote_or_never_filled_are_stale() {
        // An older program of this layout leaves expires_jiffies at 0.
        let old = NextHop {
            ifindex: 2,
            expires_ns: u64::MAX,
            ..Default::default()
        };
        for now in [0u32, 1, 250, u32::MAX] {
            assert!(!old.fresh(now));
        }
        // The expiry is never 0, even where the tick count wraps to it.
        assert_ne!(NextHop::expiry(0u32.wrapping_sub(NEXTHOP_TTL_JIFFIES)), 0);
        assert!(looked_up_at(0u32.wrapping_sub(NEXTHOP_TTL_JIFFIES)).fresh(0u32.wrapping_sub(1)));
        // No egress interface: nothing to use.
        let empty = NextHop {
            ifindex: 0,
            ..looked_up_at(7)
        };
        assert!(!empty.fresh(7));
    }
}

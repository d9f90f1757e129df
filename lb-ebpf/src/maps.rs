//! The dataplane's maps. Names are spelled out here (the macro needs literals) and must
//! equal the constants in `lb_common::maps`; the controller refuses an object that
//! lacks one.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    counters::{COUNTER_SLOTS, Counter},
    maps::*,
    mptcp::OPTION_BUF,
    tokens::TokenBucket,
};

/// Run-time settings (seed, ring size, outer sources).
#[map(name = "LB_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Backend side: SYN/ACKs with MP_CAPABLE leaving the host, for `mptcp-lb agent`.
#[map(name = "LB_TOKEN_EVENTS")]
pub static TOKEN_EVENTS: RingBuf = RingBuf::with_byte_size(TOKEN_EVENTS_BYTES, 0);

/// VIP → service, plus address-only markers for fragments and extension headers, as
/// the controller installed them. The programs read [`VIP_TABLES`], built from it.
#[map(name = "LB_VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// The same VIPs as two tables of `VIP_SLOTS` slots; `Config::vip_table` says which
/// one is live. Read through [`vip_lookup`].
#[map(name = "LB_VIP_SLOTS")]
pub static VIP_TABLES: Array<VipSlot> = Array::with_max_entries(2 * VIP_SLOTS, 0);

/// The displacements of the two VIP tables, `VIP_BUCKETS` each.
#[map(name = "LB_VIP_BUCKETS")]
pub static VIP_BUCKETS_MAP: Array<u32> = Array::with_max_entries(2 * VIP_BUCKETS, 0);

/// What the live VIP table holds for `key`: the one slot [`vip_hash`] and its bucket's
/// displacement point at, if it holds `key`.
#[inline(always)]
pub fn vip_lookup(cfg: &Config, key: &VipKey) -> Option<VipInfo> {
    let table = cfg.vip_table & 1;
    let (bucket, base, step) = vip_hash(key);
    let shift = *VIP_BUCKETS_MAP.get(table * VIP_BUCKETS + bucket)?;
    let s = VIP_TABLES.get(table * VIP_SLOTS + vip_slot(base, step, shift))?;
    (s.key.addr[0] == key.addr[0]
        && s.key.addr[1] == key.addr[1]
        && s.key.addr[2] == key.addr[2]
        && s.key.addr[3] == key.addr[3]
        && s.key.port == key.port
        && s.key.proto == key.proto
        && s.key.family == key.family)
        .then_some(s.info)
}

/// Backend id → address and state; id 0 never routes.
#[map(name = "LB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Maglev rings, `ring_size` ids per service; resized by the loader.
#[map(name = "LB_MAGLEV")]
pub static MAGLEV: Array<u32> = Array::with_max_entries(MAX_SERVICES * DEFAULT_RING_SIZE, 0);

/// Connection table of IPv6 flows. Shared, not per-CPU: an MPTCP connection's subflows
/// come from other addresses and land on other CPUs, and the controller and CLI read one
/// table. BPF_F_NO_COMMON_LRU keeps an LRU list per CPU, so inserts do not contend on one
/// lock. Reached through [`conn_ptr`], [`conn_get`] and [`conn_insert`].
#[map(name = "LB_CONNS")]
pub static CONNS6: LruHashMap<FlowKey, Conn> =
    LruHashMap::with_max_entries(DEFAULT_CONN6_ENTRIES, BPF_F_NO_COMMON_LRU);

/// Connection table of IPv4 flows, the same otherwise: 16-byte keys make a hit cheaper
/// (the kernel hashes and compares the whole key) and an entry smaller.
#[map(name = "LB_CONNS4")]
pub static CONNS4: LruHashMap<FlowKey4, Conn> =
    LruHashMap::with_max_entries(DEFAULT_CONN_ENTRIES, BPF_F_NO_COMMON_LRU);

/// The live table entry of flow `key`, in its family's table.
#[inline(always)]
pub fn conn_ptr(key: &FlowKey) -> Option<*mut Conn> {
    if key.family == FAMILY_V4 {
        CONNS4.get_ptr_mut(key.v4())
    } else {
        CONNS6.get_ptr_mut(key)
    }
}

/// A copy of flow `key`'s table entry.
#[inline(always)]
pub fn conn_get(key: &FlowKey) -> Option<Conn> {
    // SAFETY: a live map value; Conn is plain data, copied at once.
    conn_ptr(key).map(|c| unsafe { *c })
}

/// Records flow `key` (replacing what its 5-tuple had); a full table evicts its least
/// recently used entry.
#[inline(always)]
pub fn conn_insert(key: &FlowKey, conn: Conn) {
    let _ = if key.family == FAMILY_V4 {
        CONNS4.insert(key.v4(), conn, 0)
    } else {
        CONNS6.insert(key, conn, 0)
    };
}

/// MPTCP tokens learned from handshakes → the backend that owns the connection.
/// Shared: a join arrives on whatever CPU its new 5-tuple hashes to. Set-associative
/// ([`lb_common::tokens`]): bounded, a flood of handshakes pushes out the tokens seen
/// least recently in their buckets. Mmapable: the host reads and writes slots in place.
/// Sized by the loader.
#[map(name = "LB_TOKENS")]
pub static TOKENS: Array<TokenBucket> = Array::with_max_entries(
    lb_common::tokens::buckets_for(DEFAULT_TOKEN_ENTRIES),
    BPF_F_MMAPABLE,
);

/// Route lookups per backend, per CPU, reused for NEXTHOP_TTL_JIFFIES: a FIB lookup per
/// packet costs more than the rest of the fast path.
#[map(name = "LB_NEXTHOPS")]
pub static NEXTHOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Per-CPU scratch space the MPTCP option walk copies a packet's TCP options into.
/// Private to each loaded program (not pinned).
#[map(name = "LB_SCRATCH")]
pub static OPTION_SCRATCH: PerCpuArray<[u8; OPTION_BUF]> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU windows of the flood guard (new flows), the learning limit and the log limit.
/// Private to each loaded program.
#[map(name = "LB_CONN_RATE")]
pub static CONN_RATE: PerCpuArray<ConnRate> = PerCpuArray::with_max_entries(RATE_SLOTS, 0);

/// Benchmark only: the frame `bench_balancer` restores before every iteration.
#[map(name = "LB_BENCH")]
pub static BENCH: Array<BenchFrame> = Array::with_max_entries(1, 0);

/// Controller metadata (service names); the programs never read it. Declared here so
/// it is created and pinned with the others.
#[map(name = "LB_SVC_META")]
pub static SERVICE_META: Array<ServiceMeta> = Array::with_max_entries(MAX_SERVICES, 0);

/// Controller metadata (backend service, weight, state); never read by the programs.
#[map(name = "LB_BE_META")]
pub static BACKEND_META: Array<BackendMeta> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Global counters.
#[map(name = "LB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Per-service traffic.
#[map(name = "LB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per-backend traffic.
#[map(name = "LB_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Local tunnel endpoints for the decapsulation program.
#[map(name = "LB_DECAP_ADDRS")]
pub static DECAP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn add_traffic(map: &PerCpuArray<Traffic>, index: u32, bytes: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: as in `count`.
        unsafe {
            (*p).packets += 1;
            (*p).bytes += bytes;
        }
    }
}

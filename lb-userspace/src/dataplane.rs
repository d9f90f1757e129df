//! Loading the balancer and managing its maps: the one place that writes them.

use std::net::IpAddr;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    counters::{COUNTER_COUNT, Counter},
    maps::*,
    tokens::buckets_for,
};

use crate::{loader, maglev, pins};

/// Load-time sizes (they fix map sizes, so changing them means reloading).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub ring_size: u32,
    /// Capacity of the IPv4 connection table.
    pub conn_entries: u32,
    /// Capacity of the IPv6 connection table.
    pub conn6_entries: u32,
    pub token_entries: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            ring_size: DEFAULT_RING_SIZE,
            conn_entries: DEFAULT_CONN_ENTRIES,
            conn6_entries: DEFAULT_CONN6_ENTRIES,
            token_entries: DEFAULT_TOKEN_ENTRIES,
        }
    }
}

/// Every map of the balancer, typed. Built once at start-up: a missing or mistyped map
/// fails here, by name, rather than on first use.
pub struct Maps {
    pub config: Array<MapData, Config>,
    pub vips: HashMap<MapData, VipKey, VipInfo>,
    pub vip_tables: Array<MapData, VipSlot>,
    pub vip_buckets: Array<MapData, u32>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    pub conns: ConnTables,
    pub tokens: crate::token_table::TokenTable,
    pub stats: PerCpuArray<MapData, u64>,
    pub service_stats: PerCpuArray<MapData, Traffic>,
    pub backend_stats: PerCpuArray<MapData, Traffic>,
    pub service_meta: Array<MapData, ServiceMeta>,
    pub backend_meta: Array<MapData, BackendMeta>,
    pub nexthops: PerCpuArray<MapData, NextHop>,
}

impl Maps {
    /// The maps of a freshly loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::build(|name| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        })
    }

    /// The maps pinned in `dir` (`<pin path>/v<layout>`) by a running balancer.
    pub fn from_pins(dir: &std::path::Path) -> anyhow::Result<Self> {
        Self::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))?;
            Map::from_map_data(data)
                .with_context(|| format!("pinned map {} has an unknown type", path.display()))
        })
    }

    /// Every map by name from `get`, typed; a wrong type or key/value size fails here.
    fn build(mut get: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        fn typed<T>(
            get: &mut impl FnMut(&str) -> anyhow::Result<Map>,
            name: &str,
        ) -> anyhow::Result<T>
        where
            T: TryFrom<Map, Error = aya::maps::MapError>,
        {
            T::try_from(get(name)?)
                .with_context(|| format!("map {name} has an unexpected type or layout"))
        }
        let g = &mut get;
        let config: Array<MapData, Config> = typed(g, MAP_CONFIG)?;
        // The token table's bucket key: a running balancer's (pins), or none yet (a fresh
        // object: `Dataplane::load_inner` draws one).
        let key = config.get(&0, 0).context("reading LB_CONFIG")?.token_key;
        Ok(Self {
            config,
            vips: typed(g, MAP_VIPS)?,
            vip_tables: typed(g, MAP_VIP_SLOTS)?,
            vip_buckets: typed(g, MAP_VIP_BUCKETS)?,
            backends: typed(g, MAP_BACKENDS)?,
            maglev: typed(g, MAP_MAGLEV)?,
            conns: ConnTables {
                v4: typed(g, MAP_CONNS4)?,
                v6: typed(g, MAP_CONNS)?,
            },
            tokens: crate::token_table::TokenTable::open(g(MAP_TOKENS)?, key)
                .with_context(|| format!("map {MAP_TOKENS}"))?,
            stats: typed(g, MAP_STATS)?,
            service_stats: typed(g, MAP_SERVICE_STATS)?,
            backend_stats: typed(g, MAP_BACKEND_STATS)?,
            service_meta: typed(g, MAP_SERVICE_META)?,
            backend_meta: typed(g, MAP_BACKEND_META)?,
            nexthops: typed(g, MAP_NEXTHOPS)?,
        })
    }
}

/// Packets and bytes summed over CPUs.
/// Entries in a hash map, by a walk over its keys (one evicted meanwhile is skipped).
pub fn entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> usize {
    map.keys().filter(Result::is_ok).count()
}

/// The two connection tables, IPv4 (16-byte keys) and IPv6, read as one.
pub struct ConnTables {
    pub v4: HashMap<MapData, FlowKey4, Conn>,
    pub v6: HashMap<MapData, FlowKey, Conn>,
}

impl ConnTables {
    /// Flow `key`'s entry, from its family's table.
    pub fn get(&self, key: &FlowKey) -> Option<Conn> {
        if key.family == FAMILY_V4 {
            self.v4.get(&key.v4(), 0).ok()
        } else {
            self.v6.get(key, 0).ok()
        }
    }

    /// Removes flow `key`'s entry.
    pub fn remove(&mut self, key: &FlowKey) -> Result<(), aya::maps::MapError> {
        if key.family == FAMILY_V4 {
            self.v4.remove(&key.v4())
        } else {
            self.v6.remove(key)
        }
    }

    /// Every entry, IPv4 first; IPv4 keys come back as [`FlowKey`]s.
    pub fn iter(&self) -> impl Iterator<Item = Result<(FlowKey, Conn), aya::maps::MapError>> + '_ {
        self.v4
            .iter()
            .map(|r| r.map(|(k, c)| (FlowKey::from(k), c)))
            .chain(self.v6.iter())
    }

    /// Entries in both tables (a walk over their keys).
    pub fn len(&self) -> usize {
        entries(&self.v4) + entries(&self.v6)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn total(per_cpu: &PerCpuValues<Traffic>) -> Traffic {
    per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
        packets: a.packets + t.packets,
        bytes: a.bytes + t.bytes,
    })
}

/// One of the dataplane's two VIP tables, as it is written to LB_VIP_SLOTS and
/// LB_VIP_BUCKETS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipTable {
    pub slots: Vec<VipSlot>,
    /// Per bucket, what its VIPs' base slots are shifted by.
    pub buckets: Vec<u32>,
}

impl VipTable {
    pub fn empty() -> Self {
        Self {
            slots: vec![VipSlot::default(); VIP_SLOTS as usize],
            buckets: vec![0; VIP_BUCKETS as usize],
        }
    }

    /// The table holding `entries` (hash and displace): buckets with the most VIPs first,
    /// each gets the first displacement that puts all its VIPs on free slots, trying
    /// every `d1` for `d0` = 0, then 1, ...: `d0` parts the keys of a bucket that share
    /// their base slot.
    pub fn build(entries: &[(VipKey, VipInfo)]) -> anyhow::Result<Self> {
        let mut t = Self::empty();
        let mut by_bucket: std::collections::BTreeMap<u32, Vec<(VipKey, VipInfo, u32, u32)>> =
            Default::default();
        for (key, info) in entries {
            let (bucket, base, step) = vip_hash(key);
            by_bucket
                .entry(bucket)
                .or_default()
                .push((*key, *info, base, step));
        }
        let mut buckets: Vec<_> = by_bucket.into_iter().collect();
        buckets.sort_by_key(|(b, members)| (std::cmp::Reverse(members.len()), *b));
        for (bucket, members) in buckets {
            let fits = |shift: u32| {
                let mut seen = std::collections::HashSet::new();
                members.iter().all(|(_, _, base, step)| {
                    let s = vip_slot(*base, *step, shift) as usize;
                    t.slots[s].key.family == 0 && seen.insert(s)
                })
            };
            let shift = (0..64u32)
                .flat_map(|d0| (0..VIP_SLOTS).map(move |d1| d0 << 16 | d1))
                .find(|&shift| fits(shift));
            let Some(shift) = shift else {
                bail!(
                    "no room in the VIP table for bucket {bucket} ({} VIPs)",
                    members.len()
                );
            };
            t.buckets[bucket as usize] = shift;
            for (key, info, base, step) in members {
                t.slots[vip_slot(base, step, shift) as usize] = VipSlot { key, info };
            }
        }
        Ok(t)
    }

    /// What the dataplane finds for `key` in this table (as `vip_lookup` does).
    pub fn lookup(&self, key: &VipKey) -> Option<VipInfo> {
        let (bucket, base, step) = vip_hash(key);
        let shift = self.buckets[bucket as usize];
        let s = self.slots[vip_slot(base, step, shift) as usize];
        (s.key == *key && s.key.family != 0).then_some(s.info)
    }
}

/// Writes `new[i]` to `map[base + i]` where it differs from `mirror[i]` (what the map
/// holds), keeping `mirror` in step with every write that succeeded.
fn write_changed<T: aya::Pod + PartialEq>(
    map: &mut Array<MapData, T>,
    base: u32,
    new: &[T],
    mirror: &mut [T],
) -> Result<(), aya::maps::MapError> {
    for (i, (value, held)) in new.iter().zip(mirror.iter_mut()).enumerate() {
        if held != value {
            map.set(base + i as u32, *value, 0)?;
            *held = *value;
        }
    }
    Ok(())
}

/// Waits for an RCU grace period: every BPF program running when it was called has
/// returned (programs run inside RCU read-side sections). The kernel waits for one
/// whenever the syscall updates an element of an array of maps (its
/// `maybe_wait_bpf_programs`), so a throwaway array of maps, updated once, is the wait:
/// it needs nothing but BPF, which this host has. (membarrier(MEMBARRIER_CMD_GLOBAL)
/// waits the same but is refused on hosts booted with `nohz_full`.)
fn synchronize_rcu() -> anyhow::Result<()> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
        // SAFETY: `attr` is a zero-filled bpf_attr of 128 bytes holding the command's
        // fields; the pointers in it (if any) point at live locals of the caller.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128usize) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
    let create = |map_type: u32, inner_fd: u32| -> anyhow::Result<OwnedFd> {
        let mut attr = [0u64; 16];
        // map_type, key_size, value_size, max_entries, map_flags, inner_map_fd.
        attr[0] = u64::from(map_type) | 4 << 32;
        attr[1] = 4 | 1 << 32;
        attr[2] = u64::from(inner_fd) << 32;
        let fd = bpf(BPF_MAP_CREATE, &mut attr).context("creating a map to wait on")?;
        // SAFETY: the kernel just gave us this descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let inner = create(BPF_MAP_TYPE_ARRAY, 0)?;
    let outer = create(
        BPF_MAP_TYPE_ARRAY_OF_MAPS,
        std::os::fd::AsRawFd::as_raw_fd(&inner) as u32,
    )?;
    let key = 0u32;
    let value = std::os::fd::AsRawFd::as_raw_fd(&inner) as u32;
    let mut attr = [0u64; 16];
    // map_fd, then pointers to key and value, then flags.
    attr[0] = std::os::fd::AsRawFd::as_raw_fd(&outer) as u64;
    attr[1] = &key as *const u32 as u64;
    attr[2] = &value as *const u32 as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("waiting for an RCU grace period")?;
    Ok(())
}

/// An address as the dataplane stores it: network byte order, IPv4 in word 0.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The inverse of [`addr_words`].
pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(words[0].to_ne_bytes())
    }
}

pub struct Dataplane {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub sizes: Sizes,
    /// Where maps and link are pinned, if they are.
    pub pin_root: Option<std::path::PathBuf>,
    /// What the rings hold now, per service: only changed slots are rewritten.
    rings: std::collections::HashMap<u32, Vec<u32>>,
    /// What the two VIP tables hold (only changed slots are rewritten), and which one
    /// the dataplane reads (`Config::vip_table`).
    vip_tables: [VipTable; 2],
    vip_live: u32,
    /// While set, VIP changes wait for [`Dataplane::end_vip_batch`] to reach the dataplane.
    vip_batch: bool,
    /// The last switch of tables was not followed by a grace period yet.
    vip_wait_pending: bool,
}

impl Dataplane {
    /// Loads the object with the given sizes and verifies the balancer program; its
    /// maps are private to this process.
    pub fn load(sizes: Sizes) -> anyhow::Result<Self> {
        Self::load_inner(sizes, None)
    }

    /// Loads with every map pinned under `<root>/v<layout>`: pins of this layout that
    /// match are adopted (tables survive a restart), others are refused before anything
    /// is loaded. Returns whether existing pins were adopted.
    pub fn load_pinned(sizes: Sizes, root: &std::path::Path) -> anyhow::Result<(Self, bool)> {
        let adopted = pins::check(root, &sizes)?;
        let dir = pins::layout_dir(root);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating {} (is bpffs mounted?)", dir.display()))?;
        Ok((Self::load_inner(sizes, Some(root))?, adopted))
    }

    fn load_inner(sizes: Sizes, root: Option<&std::path::Path>) -> anyhow::Result<Self> {
        if !maglev::is_prime(sizes.ring_size) {
            bail!("Maglev ring size {} is not prime", sizes.ring_size);
        }
        loader::raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_MAGLEV, MAX_SERVICES * sizes.ring_size)
            .map_max_entries(MAP_CONNS4, sizes.conn_entries)
            .map_max_entries(MAP_CONNS, sizes.conn6_entries)
            .map_max_entries(MAP_TOKENS, buckets_for(sizes.token_entries));
        if let Some(root) = root {
            let dir = pins::layout_dir(root);
            for spec in pins::specs(&sizes) {
                loader.map_pin_path(spec.name, dir.join(spec.name));
            }
        }
        let mut ebpf = loader
            .load(loader::EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(loader::PROG_BALANCER)
            .context("balancer program missing from the object")?
            .try_into()?;
        prog.load()
            .context("the verifier refused the balancer program")?;
        let mut maps = Maps::take_from(&mut ebpf)?;
        // The token table's size and bucket key, for the dataplane to index it, before
        // any packet: a fresh config is otherwise all zero until the controller writes
        // one. Adopted pins keep their key (their tokens sit where it put them).
        let mut cfg = maps.config.get(&0, 0).context("reading LB_CONFIG")?;
        if cfg.token_key == [0; 2] {
            maps.tokens.set_key(random_key()?);
        }
        maps.tokens.write_into(&mut cfg);
        maps.config.set(0, cfg, 0).context("writing LB_CONFIG")?;
        // Adopted pins: the tables as the previous process left them.
        let vip_live = maps.config.get(&0, 0).map_or(0, |c| c.vip_table & 1);
        let read = |half: u32| -> anyhow::Result<VipTable> {
            Ok(VipTable {
                slots: (0..VIP_SLOTS)
                    .map(|i| maps.vip_tables.get(&(half * VIP_SLOTS + i), 0))
                    .collect::<Result<_, _>>()
                    .context("reading LB_VIP_SLOTS")?,
                buckets: (0..VIP_BUCKETS)
                    .map(|i| maps.vip_buckets.get(&(half * VIP_BUCKETS + i), 0))
                    .collect::<Result<_, _>>()
                    .context("reading LB_VIP_BUCKETS")?,
            })
        };
        let vip_tables = if root.is_some() {
            [read(0)?, read(1)?]
        } else {
            [VipTable::empty(), VipTable::empty()]
        };
        Ok(Self {
            ebpf,
            maps,
            sizes,
            pin_root: root.map(Into::into),
            rings: Default::default(),
            vip_tables,
            vip_live,
            vip_batch: false,
            // An adopted table may have just been switched by the previous process.
            vip_wait_pending: root.is_some(),
        })
    }

    /// Holds VIP changes back from the dataplane until [`Dataplane::end_vip_batch`]: a
    /// reload changing many VIPs switches tables once.
    pub fn begin_vip_batch(&mut self) {
        self.vip_batch = true;
    }

    /// Publishes the VIP changes made since [`Dataplane::begin_vip_batch`].
    pub fn end_vip_batch(&mut self) -> anyhow::Result<()> {
        self.vip_batch = false;
        self.publish_vips()
    }

    /// Makes the dataplane see what LB_VIPS holds: builds the table that is not live,
    /// writing only the slots that differ from what it holds, switches the dataplane to
    /// it (`Config::vip_table`), then waits until no program can still be reading the
    /// other one, so that the next change may rewrite it. No packet ever sees a table
    /// half written.
    pub fn publish_vips(&mut self) -> anyhow::Result<()> {
        if self.vip_batch {
            return Ok(());
        }
        let entries: Vec<(VipKey, VipInfo)> = self
            .maps
            .vips
            .iter()
            .collect::<Result<_, _>>()
            .context("reading LB_VIPS")?;
        let table = VipTable::build(&entries)?;
        // Nothing to switch to when the live table already holds exactly this.
        if !self.vip_wait_pending && table == self.vip_tables[self.vip_live as usize] {
            return Ok(());
        }
        if self.vip_wait_pending {
            synchronize_rcu()?;
            self.vip_wait_pending = false;
        }
        let next = self.vip_live ^ 1;
        let old = &mut self.vip_tables[next as usize];
        write_changed(
            &mut self.maps.vip_tables,
            next * VIP_SLOTS,
            &table.slots,
            &mut old.slots,
        )
        .context("writing LB_VIP_SLOTS")?;
        write_changed(
            &mut self.maps.vip_buckets,
            next * VIP_BUCKETS,
            &table.buckets,
            &mut old.buckets,
        )
        .context("writing LB_VIP_BUCKETS")?;
        // The switch, then the wait: after it no program still reads the other table, and
        // the next change may rewrite it. `vip_live` moves only once the dataplane
        // switched; if the wait fails, the next publish waits first.
        let mut cfg = self.maps.config.get(&0, 0).context("reading LB_CONFIG")?;
        cfg.ring_size = self.sizes.ring_size;
        cfg.vip_table = next;
        self.maps.tokens.write_into(&mut cfg);
        self.maps
            .config
            .set(0, cfg, 0)
            .context("writing LB_CONFIG")?;
        self.vip_live = next;
        self.vip_wait_pending = true;
        synchronize_rcu()?;
        self.vip_wait_pending = false;
        Ok(())
    }

    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(loader::PROG_BALANCER)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Attaches to `iface`; `None` tries native (driver) mode, then generic, and says which.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: Option<XdpMode>,
    ) -> anyhow::Result<(XdpMode, XdpLinkId)> {
        attach_xdp(self.program(), iface, mode)
    }

    /// Attaches through the pinned link when there is one (the running program is
    /// replaced atomically: forwarding never stops), otherwise attaches to `iface` and
    /// pins the new link. Needs `load_pinned`. Returns the mode, or None when replaced.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: Option<XdpMode>,
    ) -> anyhow::Result<Option<XdpMode>> {
        let root = self
            .pin_root
            .clone()
            .context("attach_pinned needs a dataplane loaded with load_pinned")?;
        let link_path = pins::link_path(&root);
        let prog = self.program();
        if link_path.exists() {
            let pinned = PinnedLink::from_pin(&link_path)
                .with_context(|| format!("opening the pinned link {}", link_path.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .context("the pinned link is not an XDP link")?;
            prog.attach_to_link(link)
                .context("replacing the program through the pinned link")?;
            return Ok(None);
        }
        let (mode, id) = attach_xdp(prog, iface, mode)?;
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .context("the kernel attached XDP without a BPF link (too old for pinning)")?;
        link.pin(&link_path)
            .with_context(|| format!("pinning the link at {}", link_path.display()))?;
        Ok(Some(mode))
    }

    pub fn set_config(&mut self, mut cfg: Config) -> anyhow::Result<()> {
        cfg.ring_size = self.sizes.ring_size;
        cfg.vip_table = self.vip_live;
        self.maps.tokens.write_into(&mut cfg);
        self.maps.config.set(0, cfg, 0).context("writing LB_CONFIG")
    }

    pub fn set_backend(&mut self, id: u32, addr: IpAddr, flags: u32) -> anyhow::Result<()> {
        if id == 0 || id >= MAX_BACKENDS {
            bail!("backend id {id} out of range 1..{MAX_BACKENDS}");
        }
        let (words, family) = addr_words(addr);
        let b = Backend {
            addr: words,
            family,
            _pad: [0; 3],
            flags,
        };
        self.maps
            .backends
            .set(id, b, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    /// Forgets what the tables still hold of backend ids about to be given to new
    /// backends. Flow entries and tokens left by the backend that held an id before (idle
    /// flows never re-pick; UDP entries never age) would send their packets to the new
    /// holder, of any service, and a cached next hop to the old holder's neighbour.
    /// Returns the flow entries and tokens removed.
    pub fn forget_backend_ids(
        &mut self,
        ids: &std::collections::HashSet<u32>,
    ) -> anyhow::Result<(usize, usize)> {
        if ids.is_empty() {
            return Ok((0, 0));
        }
        // A walk of each table (two syscalls an entry: about a second for a million).
        // An entry evicted meanwhile is skipped by aya, and the kernel may restart the
        // walk and show keys twice (hence the sets); an error ends the walk and is
        // returned, so the id is not handed out half-cleaned.
        let mut flows = std::collections::HashSet::new();
        for entry in self.maps.conns.iter() {
            let (k, c) = entry.context("walking the connection tables")?;
            if ids.contains(&c.backend) {
                flows.insert(k);
            }
        }
        for k in &flows {
            let _ = self.maps.conns.remove(k);
        }
        let tokens = self.maps.tokens.remove_if(|t| ids.contains(&t.backend));
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        for id in ids {
            let stale = PerCpuValues::try_from(vec![NextHop::default(); cpus])
                .context("per-CPU next-hop values")?;
            self.maps
                .nexthops
                .set(*id, stale, 0)
                .with_context(|| format!("clearing the next-hop cache of backend {id}"))?;
        }
        Ok((flows.len(), tokens))
    }

    /// Adds a VIP of `service`, with the address-only marker that makes the dataplane
    /// drop fragments and extension-header packets sent to it rather than pass them.
    pub fn add_vip(
        &mut self,
        addr: IpAddr,
        port: u16,
        proto: u8,
        service: u32,
    ) -> anyhow::Result<()> {
        self.set_vip(addr, port, proto, VipInfo { service, flags: 0 })
    }

    /// Installs (or rewrites) VIP `addr:port/proto` with `info`, and its address marker.
    pub fn set_vip(
        &mut self,
        addr: IpAddr,
        port: u16,
        proto: u8,
        info: VipInfo,
    ) -> anyhow::Result<()> {
        let (words, family) = addr_words(addr);
        let key = VipKey {
            addr: words,
            port: port.to_be(),
            proto,
            family,
        };
        self.maps
            .vips
            .insert(key, info, 0)
            .context("writing LB_VIPS")?;
        let marker = VipKey {
            addr: words,
            port: 0,
            proto: 0,
            family,
        };
        let marker_info = VipInfo {
            service: info.service,
            flags: 0,
        };
        self.maps
            .vips
            .insert(marker, marker_info, 0)
            .context("writing LB_VIPS address marker")?;
        self.publish_vips()
    }

    /// Rebuilds `service`'s Maglev ring from `members` and writes the slots that changed.
    /// Returns how many slots were written.
    pub fn set_ring(&mut self, service: u32, members: &[maglev::Member]) -> anyhow::Result<usize> {
        if service >= MAX_SERVICES {
            bail!("service id {service} out of range 0..{MAX_SERVICES}");
        }
        let ring = self.sizes.ring_size;
        let new = maglev::build(members, ring);
        let base = service * ring;
        // Unknown shadow (first write, or maps adopted from a previous process): start
        // from what the map holds, so only slots that really change are written.
        let old = match self.rings.remove(&service) {
            Some(r) => r,
            None => (0..ring)
                .map(|slot| self.maps.maglev.get(&(base + slot), 0))
                .collect::<Result<Vec<u32>, _>>()
                .context("reading LB_MAGLEV")?,
        };
        let changes = maglev::delta(&old, &new);
        for &(slot, id) in &changes {
            self.maps
                .maglev
                .set(base + slot, id, 0)
                .context("writing LB_MAGLEV")?;
        }
        self.rings.insert(service, new);
        Ok(changes.len())
    }

    /// Global counters summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        let mut out = Vec::with_capacity(COUNTER_COUNT as usize);
        for &c in Counter::ALL {
            let per_cpu = self
                .maps
                .stats
                .get(&(c as u32), 0)
                .context("reading LB_STATS")?;
            out.push((c, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    pub fn counter(&self, c: Counter) -> anyhow::Result<u64> {
        let per_cpu = self
            .maps
            .stats
            .get(&(c as u32), 0)
            .context("reading LB_STATS")?;
        Ok(per_cpu.iter().sum())
    }

    /// Packets and bytes a service was sent, summed over CPUs.
    pub fn service_traffic(&self, id: u32) -> anyhow::Result<Traffic> {
        let per_cpu = self
            .maps
            .service_stats
            .get(&id, 0)
            .context("reading LB_SVC_STATS")?;
        Ok(total(&per_cpu))
    }

    /// Entries in the connection tables (a walk over their keys).
    pub fn conn_entries(&self) -> usize {
        self.maps.conns.len()
    }

    /// Tokens in the token table (a pass over its memory).
    pub fn token_entries(&self) -> usize {
        self.maps.tokens.len()
    }

    /// Packets and bytes a backend was sent, summed over CPUs.
    pub fn backend_traffic(&self, id: u32) -> anyhow::Result<Traffic> {
        let per_cpu = self
            .maps
            .backend_stats
            .get(&id, 0)
            .context("reading LB_BE_STATS")?;
        Ok(total(&per_cpu))
    }
}

/// A random key, not all zero, for the token table's bucket hash.
fn random_key() -> anyhow::Result<[u64; 2]> {
    loop {
        let mut b = [0u8; 16];
        // SAFETY: getrandom writes at most the 16 bytes it is given.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != 16 {
            return Err(std::io::Error::last_os_error()).context("getrandom");
        }
        let key: [u64; 2] = bytemuck::cast(b);
        if key != [0; 2] {
            return Ok(key);
        }
    }
}

/// Attaches `prog` to `iface`; `None` tries native (driver) mode, then generic, and says
/// which one it got.
pub fn attach_xdp(
    prog: &mut Xdp,
    iface: &str,
    mode: Option<XdpMode>,
) -> anyhow::Result<(XdpMode, XdpLinkId)> {
    match mode {
        Some(m) => {
            let id = prog
                .attach(iface, m)
                .with_context(|| format!("attaching XDP ({m:?} mode) to {iface}"))?;
            Ok((m, id))
        }
        None => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => Ok((XdpMode::Driver, id)),
            Err(native) => {
                tracing::warn!(%iface, error = %native, "native XDP refused; falling back to generic mode");
                let id = prog
                    .attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP (generic mode) to {iface}"))?;
                Ok((XdpMode::Skb, id))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32, port: u16, v6: bool) -> VipKey {
        let addr = if v6 {
            [0x2001_0db8u32.to_be(), 0, 0, (i + 1).to_be()]
        } else {
            [(0x0a64_0000u32 + i).to_be(), 0, 0, 0]
        };
        VipKey {
            addr,
            port: port.to_be(),
            proto: 6,
            family: if v6 { FAMILY_V6 } else { FAMILY_V4 },
        }
    }

    /// Twice what a configuration may hold (MAX_VIPS VIPs, each with its address marker;
    /// `LB_VIPS` holds MAX_VIPS entries in all) fits, every entry is found where the
    /// dataplane looks, and nothing else is.
    #[test]
    fn a_full_vip_table_finds_every_vip_and_nothing_else() {
        let mut entries = Vec::new();
        for i in 0..MAX_VIPS {
            let v6 = i % 2 == 1;
            let info = VipInfo {
                service: i % MAX_SERVICES,
                flags: i,
            };
            entries.push((key(i, 443, v6), info));
            entries.push((key(i, 0, v6), VipInfo { flags: 0, ..info }));
        }
        let t = VipTable::build(&entries).expect("a full configuration fits");
        for (k, info) in &entries {
            assert_eq!(t.lookup(k), Some(*info), "{k:?}");
        }
        for i in 0..MAX_VIPS {
            for (port, v6) in [(80, i % 2 == 1), (443, i % 2 == 0)] {
                assert_eq!(t.lookup(&key(i, port, v6)), None);
            }
        }
        assert_eq!(
            t.lookup(&VipKey::default()),
            None,
            "an empty slot is no VIP"
        );
    }

    /// Two VIPs of one bucket with the same base slot (found by search: 26 bits of the
    /// hash alike) still get slots of their own, and so do 1,024 entries however they
    /// fall: 100 configurations of consecutive addresses, from 100 starting points.
    #[test]
    fn vips_that_share_bucket_and_base_slot_still_fit() {
        let mut seen = std::collections::HashMap::new();
        let pair = (0..1u32 << 22)
            .find_map(|i| {
                let k = key(i, 80, false);
                let (bucket, base, _) = vip_hash(&k);
                seen.insert((bucket, base), k).map(|other| (other, k))
            })
            .expect("two keys alike in bucket and base slot");
        let entries = [
            (
                pair.0,
                VipInfo {
                    service: 1,
                    flags: 0,
                },
            ),
            (
                pair.1,
                VipInfo {
                    service: 2,
                    flags: 0,
                },
            ),
        ];
        let t = VipTable::build(&entries).expect("both fit");
        for (k, info) in &entries {
            assert_eq!(t.lookup(k), Some(*info));
        }
        for start in 0..100u32 {
            let entries: Vec<(VipKey, VipInfo)> = (0..MAX_VIPS)
                .map(|i| {
                    (
                        key(start * 7919 + i, 443, start % 2 == 1),
                        VipInfo::default(),
                    )
                })
                .collect();
            let t = VipTable::build(&entries).expect("1,024 entries fit");
            assert!(entries.iter().all(|(k, info)| t.lookup(k) == Some(*info)));
        }
    }

    /// The same entries in another order give a table that answers the same.
    #[test]
    fn a_vip_table_answers_the_same_whatever_the_order() {
        let entries: Vec<(VipKey, VipInfo)> = (0..300)
            .map(|i| {
                (
                    key(i, 80, false),
                    VipInfo {
                        service: 1,
                        flags: i,
                    },
                )
            })
            .collect();
        let mut reversed = entries.clone();
        reversed.reverse();
        let (a, b) = (
            VipTable::build(&entries).expect("fits"),
            VipTable::build(&reversed).expect("fits"),
        );
        for (k, info) in &entries {
            assert_eq!((a.lookup(k), b.lookup(k)), (Some(*info), Some(*info)));
        }
    }
}

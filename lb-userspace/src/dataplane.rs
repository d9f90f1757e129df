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
};

use crate::{loader, maglev, pins};

/// Load-time sizes (they fix map sizes, so changing them means reloading).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub ring_size: u32,
    pub conn_entries: u32,
    pub token_entries: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            ring_size: DEFAULT_RING_SIZE,
            conn_entries: DEFAULT_CONN_ENTRIES,
            token_entries: DEFAULT_TOKEN_ENTRIES,
        }
    }
}

/// Every map of the balancer, typed. Built once at start-up: a missing or mistyped map
/// fails here, by name, rather than on first use.
pub struct Maps {
    pub config: Array<MapData, Config>,
    pub vips: HashMap<MapData, VipKey, VipInfo>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    pub conns: HashMap<MapData, FlowKey, Conn>,
    pub tokens: HashMap<MapData, u32, TokenEntry>,
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
        Ok(Self {
            config: typed(g, MAP_CONFIG)?,
            vips: typed(g, MAP_VIPS)?,
            backends: typed(g, MAP_BACKENDS)?,
            maglev: typed(g, MAP_MAGLEV)?,
            conns: typed(g, MAP_CONNS)?,
            tokens: typed(g, MAP_TOKENS)?,
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

pub fn total(per_cpu: &PerCpuValues<Traffic>) -> Traffic {
    per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
        packets: a.packets + t.packets,
        bytes: a.bytes + t.bytes,
    })
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
            .map_max_entries(MAP_CONNS, sizes.conn_entries)
            .map_max_entries(MAP_TOKENS, sizes.token_entries);
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
        let maps = Maps::take_from(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            sizes,
            pin_root: root.map(Into::into),
            rings: Default::default(),
        })
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
            let (k, c) = entry.context("walking LB_CONNS")?;
            if ids.contains(&c.backend) {
                flows.insert(k);
            }
        }
        for k in &flows {
            let _ = self.maps.conns.remove(k);
        }
        let mut tokens = std::collections::HashSet::new();
        for entry in self.maps.tokens.iter() {
            let (t, e) = entry.context("walking LB_TOKENS")?;
            if ids.contains(&e.backend) {
                tokens.insert(t);
            }
        }
        for t in &tokens {
            let _ = self.maps.tokens.remove(t);
        }
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        for id in ids {
            let stale = PerCpuValues::try_from(vec![NextHop::default(); cpus])
                .context("per-CPU next-hop values")?;
            self.maps
                .nexthops
                .set(*id, stale, 0)
                .with_context(|| format!("clearing the next-hop cache of backend {id}"))?;
        }
        Ok((flows.len(), tokens.len()))
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
            .context("writing LB_VIPS address marker")
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

    /// Entries in the connection table (a walk over its keys).
    pub fn conn_entries(&self) -> usize {
        entries(&self.maps.conns)
    }

    /// Learned tokens (a walk over the token table's keys).
    pub fn token_entries(&self) -> usize {
        entries(&self.maps.tokens)
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

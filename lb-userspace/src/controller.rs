//! Applying a configuration to the dataplane, and every later change: reloads, health
//! transitions, administrative drains. The one owner of the dataplane's maps in the
//! daemon.
//!
//! Ids: a service keeps its id (its Maglev ring and stats slot) as long as its name is
//! configured; a backend keeps its id as long as its (service, address) is. A restarted
//! daemon reads them back from the pinned metadata maps, so connection and token entries
//! (which hold ids) stay meaningful across restarts and reloads.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{Context as _, bail};
use lb_common::maps::*;

use crate::{
    config::{self, Config as FileConfig, HealthCheck, JoinSteering, UnknownJoinPolicy, Vip},
    dataplane::{Dataplane, addr_words, words_addr},
    maglev,
};

/// A backend is placed in new connections' Maglev table only with none of these bits.
const OUT_OF_RING: u32 = BMETA_DRAIN_CONFIG | BMETA_DRAIN_ADMIN | BMETA_DISABLED | BMETA_DOWN;
/// Its learned tokens are dropped when one of these is set: joins of its connections are
/// no longer steered to it.
const TOKENS_DROPPED: u32 = BMETA_DISABLED | BMETA_DOWN;

/// A backend's state as people name it.
pub fn state_name(state: u32) -> &'static str {
    if state & BMETA_DISABLED != 0 {
        "disabled"
    } else if state & BMETA_DOWN != 0 {
        "down"
    } else if state & (BMETA_DRAIN_CONFIG | BMETA_DRAIN_ADMIN) != 0 {
        "draining"
    } else {
        "active"
    }
}

/// What an operator can do to a backend at run time (`mptcp-lb backend ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminOp {
    /// No new connections; established ones and their joins still reach it.
    Drain,
    Undrain,
    /// Out of service as if its health check failed: no new connections, its tokens
    /// dropped.
    Disable,
    Enable,
}

/// One configured backend, as the controller tracks it.
#[derive(Clone, Debug)]
pub struct BackendState {
    pub id: u32,
    pub service: String,
    pub service_id: u32,
    pub address: IpAddr,
    pub weight: u32,
    /// `BMETA_*` bits.
    pub state: u32,
    pub changed_unix_ns: u64,
    /// The health check that applies (the backend's own, else its service's).
    pub health: Option<HealthCheck>,
    /// Port the health check connects to.
    pub health_port: u16,
}

pub struct Controller {
    pub dp: Dataplane,
    pub config: FileConfig,
    pub config_path: PathBuf,
    /// Service name → id.
    services: BTreeMap<String, u32>,
    /// Installed VIPs (service ports and join ports) → what the dataplane has for them.
    vips: HashMap<Vip, VipInfo>,
    /// Backend id → state.
    backends: BTreeMap<u32, BackendState>,
    pub reloads: u64,
    pub reload_failures: u64,
    pub last_reload_unix: u64,
    pub last_reload_error: Option<String>,
    /// The operator drained this node: its VIPs are withdrawn from the routers.
    node_drained: bool,
}

/// A write failure on demand, for the tests of what a failed write leaves behind:
/// `MPTCP_LB_FAILPOINT=NAME:N` makes the Nth pass through failpoint NAME fail. Debug
/// builds only; a release build never fails here.
pub fn failpoint(name: &str) -> anyhow::Result<()> {
    #[cfg(debug_assertions)]
    {
        use std::sync::atomic::{AtomicU32, Ordering};
        static PASSES: AtomicU32 = AtomicU32::new(0);
        if let Ok(spec) = std::env::var("MPTCP_LB_FAILPOINT")
            && let Some((n, at)) = spec.split_once(':')
            && n == name
        {
            let pass = PASSES.fetch_add(1, Ordering::SeqCst) + 1;
            if at.parse() == Ok(pass) {
                bail!("failpoint {name}: a map write failed (test)");
            }
        }
    }
    let _ = name;
    Ok(())
}

pub use crate::clock::{monotonic_coarse_ns, monotonic_ns, unix_ns};

fn name_bytes(name: &str) -> [u8; SERVICE_NAME_LEN] {
    let mut out = [0u8; SERVICE_NAME_LEN];
    let n = name.len().min(SERVICE_NAME_LEN);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// A service name from its NUL-padded metadata bytes.
pub fn meta_name(meta: &ServiceMeta) -> String {
    let end = meta
        .name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(SERVICE_NAME_LEN);
    String::from_utf8_lossy(&meta.name[..end]).into_owned()
}

/// The dataplane's run-time settings from the file's `[balancer]` section.
pub fn dataplane_config(cfg: &FileConfig) -> Config {
    let b = &cfg.balancer;
    let mut flags = 0;
    if b.unknown_join_policy == UnknownJoinPolicy::Hash {
        flags |= CONFIG_JOIN_UNKNOWN_HASH;
    }
    if !b.mptcp_aware {
        flags |= CONFIG_NO_MPTCP;
    }
    Config {
        seed: b.hash_seed,
        ring_size: b.ring_size,
        src4: b.source_v4.map_or(0, |a| u32::from_ne_bytes(a.octets())),
        src4_vary_bits: if b.source_v4.is_some() {
            b.source_vary_bits
        } else {
            0
        },
        src6: b.source_v6.map_or([0; 4], |a| addr_words(IpAddr::V6(a)).0),
        src6_vary_bits: if b.source_v6.is_some() {
            b.source_vary_bits
        } else {
            0
        },
        flags,
        token_idle_ns: b.token_idle_ns(),
        max_conn_rate: b.max_conn_rate,
        max_learn_rate: b.max_learn_rate,
        // Set by `Dataplane::set_config`, which knows which VIP table is live and how
        // big the token table is, and its key.
        vip_table: 0,
        token_mask: 0,
        token_key: [0; 2],
    }
}

impl Controller {
    /// Takes over `dp` (fresh or adopted from pins): reads back the ids and states a
    /// previous daemon recorded, then applies `config`.
    pub fn start(
        dp: Dataplane,
        config: FileConfig,
        config_path: PathBuf,
    ) -> anyhow::Result<Controller> {
        let mut c = Controller {
            dp,
            config: config.clone(),
            config_path,
            services: BTreeMap::new(),
            vips: HashMap::new(),
            backends: BTreeMap::new(),
            reloads: 0,
            reload_failures: 0,
            last_reload_unix: unix_ns() / 1_000_000_000,
            last_reload_error: None,
            node_drained: false,
        };
        c.read_back().context("reading the pinned metadata")?;
        c.apply(&config)?;
        Ok(c)
    }

    /// What the maps say a previous daemon configured.
    fn read_back(&mut self) -> anyhow::Result<()> {
        self.node_drained = self.dp.maps.config.get(&0, 0)?.flags & CONFIG_NODE_DRAINED != 0;
        for id in 0..MAX_SERVICES {
            let m = self.dp.maps.service_meta.get(&id, 0)?;
            if m.in_use != 0 {
                self.services.insert(meta_name(&m), id);
            }
        }
        let names: HashMap<u32, String> = self
            .services
            .iter()
            .map(|(n, id)| (*id, n.clone()))
            .collect();
        for id in 1..MAX_BACKENDS {
            let b = self.dp.maps.backends.get(&id, 0)?;
            if b.flags == 0 {
                continue;
            }
            let m = self.dp.maps.backend_meta.get(&id, 0)?;
            let Some(service) = names.get(&m.service) else {
                continue;
            };
            self.backends.insert(
                id,
                BackendState {
                    id,
                    service: service.clone(),
                    service_id: m.service,
                    address: words_addr(b.addr, b.family),
                    weight: m.weight,
                    state: m.state,
                    changed_unix_ns: m.changed_unix_ns,
                    health: None,
                    health_port: 0,
                },
            );
        }
        let keys: Vec<VipKey> = self.dp.maps.vips.keys().collect::<Result<_, _>>()?;
        for k in keys {
            if k.proto == 0 {
                continue;
            }
            let info = self.dp.maps.vips.get(&k, 0)?;
            self.vips.insert(
                Vip {
                    addr: words_addr(k.addr, k.family),
                    port: u16::from_be(k.port),
                    proto: k.proto,
                },
                info,
            );
        }
        Ok(())
    }

    /// Settings that fix map sizes or the attachment cannot change without a restart.
    pub fn check_reloadable(&self, new: &FileConfig) -> anyhow::Result<()> {
        let (a, b) = (&self.config.balancer, &new.balancer);
        for (field, changed) in [
            ("balancer.interface", a.interface != b.interface),
            ("balancer.xdp_mode", a.xdp_mode != b.xdp_mode),
            ("balancer.pin_path", a.pin_path != b.pin_path),
            ("balancer.ring_size", a.ring_size != b.ring_size),
            (
                "balancer.conn_table_size",
                a.conn_table_size != b.conn_table_size,
            ),
            (
                "balancer.conn6_table_size",
                a.conn6_table_size != b.conn6_table_size,
            ),
            (
                "balancer.token_table_size",
                a.token_table_size != b.token_table_size,
            ),
            (
                "balancer.metrics_listen",
                a.metrics_listen != b.metrics_listen,
            ),
            (
                "balancer.control_socket",
                a.control_socket != b.control_socket,
            ),
            (
                "balancer.announce_route_table",
                a.announce_route_table != b.announce_route_table,
            ),
        ] {
            if changed {
                bail!("{field} changed: it takes a restart (mptcp-lb run), not a reload");
            }
        }
        Ok(())
    }

    /// Applies `new` as the difference from what is installed: only changed Maglev slots
    /// are rewritten, connection and token tables are left alone (except tokens of
    /// backends that left or went out of service).
    pub fn apply(&mut self, new: &FileConfig) -> anyhow::Result<ApplySummary> {
        // All or nothing: what cannot fit is refused before anything is written.
        self.check_capacity(new)?;
        let mut summary = ApplySummary::default();
        self.write_config(new)?;

        // Service ids: kept by name; new names take the lowest free id.
        let wanted: HashSet<&str> = new.services.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<(String, u32)> = self
            .services
            .iter()
            .filter(|(n, _)| !wanted.contains(n.as_str()))
            .map(|(n, id)| (n.clone(), *id))
            .collect();
        for s in &new.services {
            if !self.services.contains_key(&s.name) {
                // Ids of services leaving in this same apply are not reused yet.
                let used: HashSet<u32> = self.services.values().copied().collect();
                let id = (0..MAX_SERVICES)
                    .find(|i| !used.contains(i))
                    .context("no free service id")?;
                self.services.insert(s.name.clone(), id);
                summary.services_added += 1;
            }
            let id = self.services[&s.name];
            self.dp.maps.service_meta.set(
                id,
                ServiceMeta {
                    name: name_bytes(&s.name),
                    in_use: 1,
                    _pad: 0,
                },
                0,
            )?;
        }

        // Backends: kept by (service, address); the rest take the lowest free id.
        let now = unix_ns();
        let mut keep: HashSet<u32> = HashSet::new();
        // Ids given to new backends: written only once the tables forgot any previous
        // holder of the id.
        let mut fresh: HashSet<u32> = HashSet::new();
        for s in &new.services {
            let sid = self.services[&s.name];
            let vip_port = s
                .vips
                .first()
                .and_then(|v| config::parse_vip(v).ok())
                .map_or(0, |v| v.port);
            for be in &s.backends {
                let health = be.health.clone().or_else(|| s.health.clone());
                let health_port = health.as_ref().and_then(|h| h.port).unwrap_or(vip_port);
                let existing = self
                    .backends
                    .values()
                    .find(|b| b.service_id == sid && b.address == be.address)
                    .map(|b| b.id);
                let id = match existing {
                    Some(id) => id,
                    None => {
                        let id = (1..MAX_BACKENDS)
                            .find(|i| !self.backends.contains_key(i))
                            .context("no free backend id")?;
                        // A new backend with a health check waits for `rise` successes.
                        let state = if health.is_some() { BMETA_DOWN } else { 0 };
                        self.backends.insert(
                            id,
                            BackendState {
                                id,
                                service: s.name.clone(),
                                service_id: sid,
                                address: be.address,
                                weight: be.weight,
                                state,
                                changed_unix_ns: now,
                                health: None,
                                health_port: 0,
                            },
                        );
                        summary.backends_added += 1;
                        fresh.insert(id);
                        id
                    }
                };
                keep.insert(id);
                let b = self.backends.get_mut(&id).expect("just inserted");
                b.weight = be.weight;
                b.health = health;
                b.health_port = health_port;
                if b.health.is_none() && b.state & BMETA_DOWN != 0 {
                    b.state &= !BMETA_DOWN;
                    b.changed_unix_ns = now;
                }
                let checked = if b.health.is_some() { BMETA_CHECKED } else { 0 };
                let drain = if be.drain { BMETA_DRAIN_CONFIG } else { 0 };
                let state = (b.state & !(BMETA_CHECKED | BMETA_DRAIN_CONFIG)) | checked | drain;
                if state != b.state {
                    b.state = state;
                    b.changed_unix_ns = now;
                }
                if !fresh.contains(&id) {
                    self.write_backend(id)?;
                }
            }
        }
        let (flows, tokens) = self
            .dp
            .forget_backend_ids(&fresh)
            .context("clearing what the tables kept of reused backend ids")?;
        if flows + tokens > 0 {
            tracing::info!(
                flows,
                tokens,
                "forgot entries left by earlier holders of reused backend ids"
            );
        }
        for id in &fresh {
            self.write_backend(*id)?;
        }
        failpoint("apply")?;

        // Backends that left are taken out of the controller's list before the rings
        // are rebuilt from it: a ring built with them would keep their slots, and new
        // connections hashed there would find no backend once their entries are cleared.
        let removed: Vec<BackendState> = self
            .backends
            .extract_if(.., |id, _| !keep.contains(id))
            .map(|(_, b)| b)
            .collect();

        // Rings first (the backends above are in place), then new VIPs, then stale ones.
        let mut want_vips: HashMap<Vip, VipInfo> = HashMap::new();
        for s in &new.services {
            let sid = self.services[&s.name];
            let mut flags = if s.join_steering == JoinSteering::Port {
                VIP_STEERS_BY_PORT
            } else {
                0
            };
            if s.affinity == config::Affinity::ClientAddress {
                flags |= VIP_AFFINITY_CLIENT;
            }
            if s.learn_tokens == config::LearnTokens::Backend {
                flags |= VIP_NO_CLIENT_LEARNING;
            }
            for v in &s.vips {
                let vip = config::parse_vip(v).map_err(anyhow::Error::msg)?;
                want_vips.insert(
                    vip,
                    VipInfo {
                        service: sid,
                        flags,
                    },
                );
            }
            for (vip, bi) in s.join_vips() {
                let address = s.backends[bi].address;
                let id = self
                    .backends
                    .values()
                    .find(|b| b.service_id == sid && b.address == address)
                    .map(|b| b.id)
                    .context("a join port's backend has no id")?;
                want_vips.insert(vip, VipInfo::join_port(sid, id));
            }
        }
        for s in &new.services {
            let sid = self.services[&s.name];
            let written = self.write_ring(sid)?;
            summary.slots_written += written;
        }
        // One switch of the dataplane's VIP table for all of them, made whatever happens
        // half way: what LB_VIPS holds then is what the dataplane sees.
        self.dp.begin_vip_batch();
        let changed = self.write_vips(&want_vips, &mut summary);
        let published = self.dp.end_vip_batch();
        changed?;
        published?;

        // Backends that left: out of every ring already (their services were rebuilt
        // above); now the connections to them re-pick and their tokens go.
        for b in removed {
            let id = b.id;
            tracing::info!(service = %b.service, backend = %b.address, id, "backend removed");
            self.dp.maps.backends.set(id, Backend::default(), 0)?;
            self.dp
                .maps
                .backend_meta
                .set(id, BackendMeta::default(), 0)?;
            summary.tokens_dropped += self.drop_tokens(id)?;
            summary.backends_removed += 1;
        }
        // Services that left: their VIPs are gone; clear the ring and the name.
        for (name, id) in gone {
            self.dp.set_ring(id, &[])?;
            self.dp
                .maps
                .service_meta
                .set(id, ServiceMeta::default(), 0)?;
            self.services.remove(&name);
            summary.services_removed += 1;
        }
        self.config = new.clone();
        Ok(summary)
    }

    /// Whether `new` fits beside what is installed: ids of services and backends that
    /// leave are freed only at the end of an apply (their connections still use them
    /// meanwhile), so the ids the new ones take must be free already.
    fn check_capacity(&self, new: &FileConfig) -> anyhow::Result<()> {
        let new_services: Vec<&str> = new
            .services
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| !self.services.contains_key(*n))
            .collect();
        let free_services = MAX_SERVICES as usize - self.services.len();
        if new_services.len() > free_services {
            bail!(
                "this change adds {} services while {} of {MAX_SERVICES} are in use, and the ids of services that leave are freed only after it: apply it in two steps, removals first",
                new_services.len(),
                self.services.len()
            );
        }
        let installed: HashSet<(u32, IpAddr)> = self
            .backends
            .values()
            .map(|b| (b.service_id, b.address))
            .collect();
        let mut added = 0usize;
        for s in &new.services {
            let sid = self.services.get(&s.name);
            added += s
                .backends
                .iter()
                .filter(|be| !sid.is_some_and(|sid| installed.contains(&(*sid, be.address))))
                .count();
        }
        // VIPs: new entries (and a marker per new address) are added before stale ones
        // go, so both sets must fit in the VIP map at once.
        let mut new_vips: HashSet<Vip> = HashSet::new();
        for s in &new.services {
            for v in &s.vips {
                let vip = config::parse_vip(v).map_err(anyhow::Error::msg)?;
                if !self.vips.contains_key(&vip) {
                    new_vips.insert(vip);
                }
            }
            for (vip, _) in s.join_vips() {
                if !self.vips.contains_key(&vip) {
                    new_vips.insert(vip);
                }
            }
        }
        let installed_addrs: HashSet<IpAddr> = self.vips.keys().map(|v| v.addr).collect();
        let new_addrs: HashSet<IpAddr> = new_vips
            .iter()
            .map(|v| v.addr)
            .filter(|a| !installed_addrs.contains(a))
            .collect();
        let in_use = self.vips.len() + installed_addrs.len();
        let needed = new_vips.len() + new_addrs.len();
        if in_use + needed > MAX_VIPS as usize {
            bail!(
                "this change adds {needed} VIP map entries (VIPs and one per new address) while {in_use} of {MAX_VIPS} are in use, and the VIPs that leave are removed only after it: apply it in two steps, removals first"
            );
        }
        let usable = MAX_BACKENDS as usize - 1;
        if added > usable - self.backends.len() {
            bail!(
                "this change adds {added} backends while {} of {usable} are in use, and the ids of backends that leave are freed only after it: apply it in two steps, removals first",
                self.backends.len()
            );
        }
        Ok(())
    }

    /// Installs the VIPs of `want` that are new or changed and removes the others, in
    /// LB_VIPS (the caller publishes them to the dataplane).
    fn write_vips(
        &mut self,
        want: &HashMap<Vip, VipInfo>,
        summary: &mut ApplySummary,
    ) -> anyhow::Result<()> {
        for (vip, info) in want {
            if self.vips.get(vip) != Some(info) {
                self.dp.set_vip(vip.addr, vip.port, vip.proto, *info)?;
                self.vips.insert(*vip, *info);
                summary.vips_added += 1;
            }
        }
        let stale: Vec<Vip> = self
            .vips
            .keys()
            .filter(|v| !want.contains_key(v))
            .copied()
            .collect();
        for vip in stale {
            self.remove_vip(&vip, want)?;
            self.vips.remove(&vip);
            summary.vips_removed += 1;
        }
        Ok(())
    }

    fn remove_vip(&mut self, vip: &Vip, keep: &HashMap<Vip, VipInfo>) -> anyhow::Result<()> {
        let (words, family) = addr_words(vip.addr);
        let key = VipKey {
            addr: words,
            port: vip.port.to_be(),
            proto: vip.proto,
            family,
        };
        let _ = self.dp.maps.vips.remove(&key);
        // The address marker goes with the last VIP on that address.
        if !keep.keys().any(|v| v.addr == vip.addr) {
            let marker = VipKey {
                port: 0,
                proto: 0,
                ..key
            };
            let _ = self.dp.maps.vips.remove(&marker);
        }
        Ok(())
    }

    /// Writes backend `id`'s dataplane entry and metadata from its state.
    fn write_backend(&mut self, id: u32) -> anyhow::Result<()> {
        let b = &self.backends[&id];
        let flags = if b.state & TOKENS_DROPPED != 0 {
            BACKEND_OUT_OF_SERVICE
        } else if b.state & OUT_OF_RING != 0 {
            BACKEND_DRAINING
        } else {
            BACKEND_ACTIVE
        };
        let meta = BackendMeta {
            service: b.service_id,
            weight: b.weight,
            state: b.state,
            _pad: 0,
            changed_unix_ns: b.changed_unix_ns,
        };
        let addr = b.address;
        self.dp.set_backend(id, addr, flags)?;
        self.dp.maps.backend_meta.set(id, meta, 0)?;
        Ok(())
    }

    /// Rebuilds service `sid`'s ring from its backends that take new connections.
    fn write_ring(&mut self, sid: u32) -> anyhow::Result<usize> {
        let members: Vec<maglev::Member> = self
            .backends
            .values()
            .filter(|b| b.service_id == sid && b.state & OUT_OF_RING == 0)
            .map(|b| maglev::Member {
                id: b.id,
                key: b.address.to_string(),
                weight: b.weight,
            })
            .collect();
        self.dp.set_ring(sid, &members)
    }

    /// Deletes the tokens learned for backend `id`. Returns how many.
    fn drop_tokens(&mut self, id: u32) -> anyhow::Result<usize> {
        Ok(self.dp.maps.tokens.remove_if(|t| t.backend == id))
    }

    /// Sets or clears `bits` of backend `id`, then rewrites what depends on them. If a
    /// write fails, the backend's state goes back to what it was (in memory and, as far
    /// as the maps take it, in the maps) and the error is returned: the caller retries.
    fn set_bits(&mut self, id: u32, bits: u32, on: bool) -> anyhow::Result<bool> {
        let b = self.backends.get_mut(&id).context("no such backend")?;
        let (before, before_ns) = (b.state, b.changed_unix_ns);
        if on {
            b.state |= bits;
        } else {
            b.state &= !bits;
        }
        if b.state == before {
            return Ok(false);
        }
        b.changed_unix_ns = unix_ns();
        let (sid, now_state) = (b.service_id, b.state);
        if let Err(e) = self.write_state(id, sid, now_state) {
            let b = self.backends.get_mut(&id).context("no such backend")?;
            b.state = before;
            b.changed_unix_ns = before_ns;
            let _ = self.write_state(id, sid, before);
            return Err(e);
        }
        if now_state & TOKENS_DROPPED != 0 && before & TOKENS_DROPPED == 0 {
            let n = self.drop_tokens(id)?;
            tracing::info!(
                id,
                tokens = n,
                "dropped the tokens of a backend out of service"
            );
        }
        Ok(true)
    }

    /// Writes backend `id` (state `state`, in service `sid`) and its service's ring.
    fn write_state(&mut self, id: u32, sid: u32, state: u32) -> anyhow::Result<()> {
        failpoint("set-bits")?;
        // Into the ring: the backend entry first; out of it: the ring first.
        if state & OUT_OF_RING == 0 {
            self.write_backend(id)?;
            self.write_ring(sid)?;
        } else {
            self.write_ring(sid)?;
            self.write_backend(id)?;
        }
        Ok(())
    }

    /// A health check's verdict changed.
    pub fn set_health(&mut self, id: u32, up: bool) -> anyhow::Result<()> {
        if self.set_bits(id, BMETA_DOWN, !up)? {
            let b = &self.backends[&id];
            if up {
                tracing::info!(service = %b.service, backend = %b.address, "backend up");
            } else {
                tracing::warn!(service = %b.service, backend = %b.address, "backend down");
            }
        }
        Ok(())
    }

    /// `mptcp-lb backend drain|undrain|disable|enable SERVICE ADDR`.
    pub fn admin(&mut self, service: &str, address: IpAddr, op: AdminOp) -> anyhow::Result<String> {
        let sid = *self
            .services
            .get(service)
            .with_context(|| format!("no service named {service:?}"))?;
        let id = self
            .backends
            .values()
            .find(|b| b.service_id == sid && b.address == address)
            .map(|b| b.id)
            .with_context(|| format!("service {service:?} has no backend {address}"))?;
        let (bits, on) = match op {
            AdminOp::Drain => (BMETA_DRAIN_ADMIN, true),
            AdminOp::Undrain => (BMETA_DRAIN_ADMIN, false),
            AdminOp::Disable => (BMETA_DISABLED, true),
            AdminOp::Enable => (BMETA_DISABLED, false),
        };
        self.set_bits(id, bits, on)?;
        let state = state_name(self.backends[&id].state);
        tracing::info!(service, backend = %address, ?op, state, "backend changed by an operator");
        Ok(state.to_string())
    }

    /// The dataplane's settings from `file`, with the node's drain kept.
    fn write_config(&mut self, file: &FileConfig) -> anyhow::Result<()> {
        let mut cfg = dataplane_config(file);
        if self.node_drained {
            cfg.flags |= CONFIG_NODE_DRAINED;
        }
        self.dp.set_config(cfg)
    }

    /// `mptcp-lb node drain|undrain`: withdraw this node's VIPs from the routers (its
    /// dataplane keeps forwarding what still arrives), or announce them again.
    pub fn set_node_drained(&mut self, drained: bool) -> anyhow::Result<()> {
        let was = self.node_drained;
        self.node_drained = drained;
        let file = self.config.clone();
        if let Err(e) = self.write_config(&file) {
            self.node_drained = was;
            return Err(e);
        }
        tracing::info!(drained, "node drain changed by an operator");
        Ok(())
    }

    pub fn node_drained(&self) -> bool {
        self.node_drained
    }

    /// The VIP addresses this node should announce: those of services with a backend in
    /// service (active or draining: a draining backend still serves its established
    /// connections and their joins, which need the route), unless the node is drained.
    pub fn announceable(&self) -> std::collections::BTreeSet<IpAddr> {
        let mut out = std::collections::BTreeSet::new();
        if self.node_drained {
            return out;
        }
        for s in &self.config.services {
            let Some(sid) = self.services.get(&s.name) else {
                continue;
            };
            let usable = self
                .backends
                .values()
                .any(|b| b.service_id == *sid && b.state & TOKENS_DROPPED == 0);
            if usable {
                out.extend(
                    s.vips
                        .iter()
                        .filter_map(|v| config::parse_vip(v).ok())
                        .map(|v| v.addr),
                );
            }
        }
        out
    }

    /// The service of a TCP VIP (a service port, not a join port).
    pub fn service_of_vip(&self, addr: IpAddr, port: u16) -> Option<u32> {
        let info = self.vips.get(&Vip {
            addr,
            port,
            proto: 6,
        })?;
        (info.flags & VIP_JOIN_PORT == 0).then_some(info.service)
    }

    /// The backend at `address` in service `service_id`.
    pub fn backend_in(&self, service_id: u32, address: IpAddr) -> Option<&BackendState> {
        self.backends
            .values()
            .find(|b| b.service_id == service_id && b.address == address)
    }

    /// Applies one entry of an authentic, fresh announcement from the backend at
    /// `backend`, with the same rules as learning in the dataplane: the token goes to
    /// that backend unless another backend announced it and it is still live (first
    /// writer wins); a token learned from a client's handshake gives way (the backend is
    /// the authority on its tokens); a backend out of service gets none.
    pub fn apply_announced(
        &mut self,
        backend: IpAddr,
        e: &crate::announcement::Entry,
    ) -> Announced {
        let Some(sid) = self.service_of_vip(e.vip.ip().to_canonical(), e.vip.port()) else {
            return Announced::UnknownVip;
        };
        let learns = self
            .config
            .services
            .iter()
            .find(|s| self.services.get(&s.name) == Some(&sid))
            .is_some_and(|s| s.learn_tokens != config::LearnTokens::Client);
        if !learns {
            return Announced::NotLearning;
        }
        let Some(b) = self.backend_in(sid, backend) else {
            return Announced::NotItsBackend;
        };
        if b.state & TOKENS_DROPPED != 0 {
            return Announced::OutOfService;
        }
        let id = b.id;
        let now = monotonic_coarse_ns();
        let idle = self.config.balancer.token_idle_ns();
        let old = self.dp.maps.tokens.get(e.token);
        if !e.live {
            // Every slot of this backend's (two writers at one instant may have left two).
            if self.dp.maps.tokens.remove_for(e.token, id) {
                return Announced::Removed;
            }
            return Announced::Unchanged;
        }
        let learned_ns = match old {
            Some(o) if o.backend == id => o.learned_ns,
            Some(o)
                if o.origin == TOKEN_FROM_BACKEND && now.saturating_sub(o.last_seen_ns) < idle =>
            {
                return Announced::Collision;
            }
            _ => now,
        };
        let entry = TokenEntry {
            backend: id,
            service: sid,
            learned_ns,
            last_seen_ns: now,
            version: e.version as u32,
            origin: TOKEN_FROM_BACKEND,
        };
        match self.dp.maps.tokens.set(e.token, &entry, idle) {
            None => Announced::Applied,
            Some(evicted) => {
                tracing::debug!(
                    token = format!("{:08x}", e.token),
                    evicted = format!("{evicted:08x}"),
                    "announced token took the slot of the token seen least recently in its bucket"
                );
                Announced::AppliedEvicting
            }
        }
    }

    /// The configured backends' addresses (any service).
    pub fn backend_addresses(&self) -> std::collections::BTreeSet<IpAddr> {
        self.backends.values().map(|b| b.address).collect()
    }

    pub fn backends(&self) -> impl Iterator<Item = &BackendState> {
        self.backends.values()
    }

    pub fn services(&self) -> impl Iterator<Item = (&String, &u32)> {
        self.services.iter()
    }
}

/// What became of one announced token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Announced {
    Applied,
    Removed,
    /// A closed connection's token this node did not hold for that backend.
    Unchanged,
    /// Live for another backend that announced it first.
    Collision,
    /// No service of this node has that VIP:port.
    UnknownVip,
    /// The service learns tokens from clients only.
    NotLearning,
    /// The announcing backend is not one of that service's.
    NotItsBackend,
    OutOfService,
    /// Written, in the slot of the live token seen least recently in its bucket (the
    /// token table is full there).
    AppliedEvicting,
}

impl Announced {
    pub const ALL: [Announced; 9] = [
        Announced::Applied,
        Announced::Removed,
        Announced::Unchanged,
        Announced::Collision,
        Announced::UnknownVip,
        Announced::NotLearning,
        Announced::NotItsBackend,
        Announced::OutOfService,
        Announced::AppliedEvicting,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Announced::Applied => "applied",
            Announced::Removed => "removed",
            Announced::Unchanged => "unchanged",
            Announced::Collision => "collision",
            Announced::UnknownVip => "unknown_vip",
            Announced::NotLearning => "service_not_learning",
            Announced::NotItsBackend => "not_its_backend",
            Announced::OutOfService => "backend_out_of_service",
            Announced::AppliedEvicting => "applied_evicting",
        }
    }
}

/// What an apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub services_added: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub vips_added: usize,
    pub vips_removed: usize,
    pub slots_written: usize,
    pub tokens_dropped: usize,
}

impl std::fmt::Display for ApplySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "services +{} -{}, backends +{} -{}, VIPs +{} -{}, {} Maglev slots rewritten, {} tokens dropped",
            self.services_added,
            self.services_removed,
            self.backends_added,
            self.backends_removed,
            self.vips_added,
            self.vips_removed,
            self.slots_written,
            self.tokens_dropped
        )
    }
}

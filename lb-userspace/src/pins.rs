//! Pinned maps and link: a restarted controller adopts the running dataplane (its
//! connection and token tables survive, and the program is replaced atomically through
//! the pinned link), and never reuses pins of another layout.
//!
//! Layout: `<pin path>/v<LAYOUT_VERSION>/<MAP NAME>` for every map, `.../link` for the
//! XDP link.

use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};
use lb_common::{
    counters::COUNTER_SLOTS,
    maps::*,
    tokens::{TokenBucket, buckets_for},
};

use crate::dataplane::Sizes;

/// Why pinned state was refused.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{root} holds pins of another mptcp-lb layout ({found}); this version uses v{LAYOUT_VERSION} and will not reuse them. \
         Remove them first (forwarding stops until this version attaches): rm -r {remove}"
    )]
    OtherLayout {
        root: String,
        found: String,
        remove: String,
    },
    #[error(
        "pinned map {path} has {what} {pinned}, this configuration needs {expected}; \
         clear the pins first (forwarding stops until the new program attaches): mptcp-lb detach --pin-path {root}"
    )]
    Mismatch {
        path: String,
        what: &'static str,
        pinned: String,
        expected: String,
        root: String,
    },
    #[error("reading pinned map {path}: {reason}")]
    Unreadable { path: String, reason: String },
}

/// What a map must look like: checked against pins before they are adopted.
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

fn size<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

/// The balancer's maps as this build and these sizes define them.
pub fn specs(sizes: &Sizes) -> Vec<MapSpec> {
    let spec = |name, map_type, key_size, value_size, max_entries| MapSpec {
        name,
        map_type,
        key_size,
        value_size,
        max_entries,
    };
    vec![
        spec(MAP_CONFIG, MapType::Array, 4, size::<Config>(), 1),
        spec(
            MAP_VIPS,
            MapType::Hash,
            size::<VipKey>(),
            size::<VipInfo>(),
            MAX_VIPS,
        ),
        spec(
            MAP_VIP_SLOTS,
            MapType::Array,
            4,
            size::<VipSlot>(),
            2 * VIP_SLOTS,
        ),
        spec(MAP_VIP_BUCKETS, MapType::Array, 4, 4, 2 * VIP_BUCKETS),
        spec(
            MAP_BACKENDS,
            MapType::Array,
            4,
            size::<Backend>(),
            MAX_BACKENDS,
        ),
        spec(
            MAP_MAGLEV,
            MapType::Array,
            4,
            4,
            MAX_SERVICES * sizes.ring_size,
        ),
        spec(
            MAP_CONNS4,
            MapType::LruHash,
            size::<FlowKey4>(),
            size::<Conn>(),
            sizes.conn_entries,
        ),
        spec(
            MAP_CONNS,
            MapType::LruHash,
            size::<FlowKey>(),
            size::<Conn>(),
            sizes.conn6_entries,
        ),
        spec(
            MAP_TOKENS,
            MapType::Array,
            4,
            size::<TokenBucket>(),
            buckets_for(sizes.token_entries),
        ),
        spec(
            MAP_NEXTHOPS,
            MapType::PerCpuArray,
            4,
            size::<NextHop>(),
            MAX_BACKENDS,
        ),
        spec(MAP_STATS, MapType::PerCpuArray, 4, 8, COUNTER_SLOTS),
        spec(
            MAP_SERVICE_META,
            MapType::Array,
            4,
            size::<ServiceMeta>(),
            MAX_SERVICES,
        ),
        spec(
            MAP_BACKEND_META,
            MapType::Array,
            4,
            size::<BackendMeta>(),
            MAX_BACKENDS,
        ),
        spec(
            MAP_SERVICE_STATS,
            MapType::PerCpuArray,
            4,
            size::<Traffic>(),
            MAX_SERVICES,
        ),
        spec(
            MAP_BACKEND_STATS,
            MapType::PerCpuArray,
            4,
            size::<Traffic>(),
            MAX_BACKENDS,
        ),
    ]
}

/// `<root>/v<LAYOUT_VERSION>`.
pub fn layout_dir(root: &Path) -> PathBuf {
    root.join(format!("v{LAYOUT_VERSION}"))
}

pub fn link_path(root: &Path) -> PathBuf {
    layout_dir(root).join("link")
}

/// The `v<N>` directories under `root` of layouts other than this build's.
pub fn other_layouts(root: &Path) -> Vec<String> {
    let current = format!("v{LAYOUT_VERSION}");
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with('v') && n[1..].parse::<u32>().is_ok() && *n != current)
        .collect()
}

/// Checks the pins under `root` before anything is loaded. Ok(true): pins of this layout
/// exist and match, they will be adopted; Ok(false): nothing pinned yet.
pub fn check(root: &Path, sizes: &Sizes) -> Result<bool, PinError> {
    let others = other_layouts(root);
    if !others.is_empty() {
        return Err(PinError::OtherLayout {
            root: root.display().to_string(),
            found: others.join(", "),
            remove: others
                .iter()
                .map(|o| root.join(o).display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
        });
    }
    let dir = layout_dir(root);
    let mut adopting = false;
    for s in specs(sizes) {
        let path = dir.join(s.name);
        if !path.exists() {
            continue;
        }
        adopting = true;
        let p = path.display().to_string();
        let info = MapInfo::from_pin(&path).map_err(|e| PinError::Unreadable {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        let mismatch = |what, pinned: String, expected: String| PinError::Mismatch {
            path: p.clone(),
            what,
            pinned,
            expected,
            root: root.display().to_string(),
        };
        let map_type = info.map_type().map_err(|e| PinError::Unreadable {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        if map_type != s.map_type {
            return Err(mismatch(
                "type",
                format!("{map_type:?}"),
                format!("{:?}", s.map_type),
            ));
        }
        for (what, pinned, expected) in [
            ("key size", info.key_size(), s.key_size),
            ("value size", info.value_size(), s.value_size),
            ("max_entries", info.max_entries(), s.max_entries),
        ] {
            if pinned != expected {
                return Err(mismatch(what, pinned.to_string(), expected.to_string()));
            }
        }
    }
    Ok(adopting)
}

/// Removes the link and map pins under `root`: the kernel detaches the program once no
/// process holds it. Returns whether anything was pinned.
pub fn remove(root: &Path) -> std::io::Result<bool> {
    let dir = layout_dir(root);
    if !dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&dir)?;
    // The root itself only if nothing else lives there.
    let _ = std::fs::remove_dir(root);
    Ok(true)
}

/// An exclusive hold on a pin path, for as long as the value lives: one daemon per
/// dataplane. Without it a second daemon started on the same pin path rewrote the first
/// one's maps and replaced its program before it found out, and `detach` unpinned a
/// link a running daemon still held.
#[derive(Debug)]
pub struct PinLock {
    _dir: std::fs::File,
}

/// Why a pin path's lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another process holds {root}: an mptcp-lb daemon already runs on this pin path \
         (give each instance its own balancer.pin_path, or stop that daemon first)"
    )]
    Held { root: String },
    #[error("locking {root}: {source}")]
    Io {
        root: String,
        #[source]
        source: std::io::Error,
    },
}

/// Takes the lock of pin path `root` (an exclusive `flock` on its directory, created if
/// missing), without waiting. Taken before anything of the dataplane is touched.
pub fn lock(root: &Path) -> Result<PinLock, LockError> {
    use std::os::fd::AsRawFd as _;
    let io = |source| LockError::Io {
        root: root.display().to_string(),
        source,
    };
    std::fs::create_dir_all(root).map_err(io)?;
    let dir = std::fs::File::open(root).map_err(io)?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            LockError::Held {
                root: root.display().to_string(),
            }
        } else {
            io(e)
        });
    }
    Ok(PinLock { _dir: dir })
}

/// Whether `path` (or, when it does not exist, its nearest existing ancestor) is on a BPF
/// filesystem. `ip netns exec` remounts /sys, which hides the host's bpffs: pins are then
/// not missing, just out of sight.
pub fn on_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct it is given; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

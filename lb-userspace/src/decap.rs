//! `mptcp-lb decap attach|detach`: the backend-side tunnel decapsulation program, for
//! hosts without the ipip/ip6tnl drivers. Its link is pinned, so it stays attached
//! after the command exits, until `detach`.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use aya::{
    maps::HashMap,
    programs::{Xdp, XdpMode, links::FdLink},
};
use lb_common::maps::{AddrKey, MAP_DECAP_ADDRS};

use crate::{dataplane::addr_words, loader};

/// Where `decap attach` pins its link, per interface.
pub fn pin_path(bpffs: &str, iface: &str) -> PathBuf {
    PathBuf::from(bpffs).join("mptcp-lb-decap").join(iface)
}

/// Every address of this host (in the current network namespace).
pub fn local_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says its real type.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET means a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 means a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// Loads the decapsulation program, tells it this host's addresses, attaches it to
/// `iface` and pins the link. Returns the mode it got.
pub fn attach(bpffs: &str, iface: &str, mode: Option<XdpMode>) -> anyhow::Result<XdpMode> {
    let pin = pin_path(bpffs, iface);
    if pin.exists() {
        bail!(
            "decapsulation is already attached to {iface} ({} exists); detach first",
            pin.display()
        );
    }
    let local = local_addresses()?;
    let mut ebpf = load(&local)?;
    let prog: &mut Xdp = ebpf
        .program_mut(loader::PROG_DECAP)
        .context("decap program missing from the object")?
        .try_into()?;
    let (got, id) = crate::dataplane::attach_xdp(prog, iface, mode)?;
    let link: FdLink = prog
        .take_link(id)?
        .try_into()
        .context("the kernel attached XDP without a BPF link (too old for pinning)")?;
    std::fs::create_dir_all(pin.parent().expect("pin path has a parent"))
        .with_context(|| format!("creating {}", pin.display()))?;
    link.pin(&pin)
        .with_context(|| format!("pinning the link at {}", pin.display()))?;
    Ok(got)
}

/// Loads the decapsulation program (not attached), accepting tunnels to `local`.
pub fn load(local: &[IpAddr]) -> anyhow::Result<aya::Ebpf> {
    let mut ebpf = loader::open_for_backend()?;
    let mut addrs: HashMap<_, AddrKey, u32> = HashMap::try_from(
        ebpf.map_mut(MAP_DECAP_ADDRS)
            .with_context(|| format!("map {MAP_DECAP_ADDRS} missing"))?,
    )?;
    for ip in local {
        let (addr, family) = addr_words(*ip);
        addrs.insert(
            AddrKey {
                addr,
                family,
                _pad: [0; 3],
            },
            1,
            0,
        )?;
    }
    let prog: &mut Xdp = ebpf
        .program_mut(loader::PROG_DECAP)
        .context("decap program missing from the object")?
        .try_into()?;
    prog.load()
        .context("the verifier refused the decap program")?;
    Ok(ebpf)
}

/// Removes the pinned link: the kernel detaches the program once nothing holds it.
pub fn detach(bpffs: &str, iface: &str) -> anyhow::Result<()> {
    let pin = pin_path(bpffs, iface);
    if !pin.exists() {
        bail!(
            "decapsulation is not attached to {iface} (no {})",
            pin.display()
        );
    }
    std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))
}

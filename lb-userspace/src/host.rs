//! Kernel settings of the balancer's host that the dataplane relies on.
//!
//! When a route lookup finds no neighbour entry for a backend's next hop, the program
//! hands the encapsulated packet to the kernel to forward (and resolve the neighbour,
//! `pass_no_neigh`). Its outer IPv4 source is `source_v4`, usually an address of this
//! host: IPv4 input drops a packet arriving with one of the host's own addresses as its
//! source (a martian) unless the interface has `accept_local` on. Without it the packet
//! is lost, no ARP request leaves, and every packet to that backend keeps being lost for
//! as long as nothing else teaches the neighbour. IPv6 has no such check.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

fn accept_local_path(interface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/accept_local"))
}

/// Turns `accept_local` on for `interface` (in the caller's network namespace), so
/// tunnelled packets handed to the kernel with the balancer's own outer source are
/// forwarded. Returns whether it was off.
pub fn accept_own_source(interface: &str) -> anyhow::Result<bool> {
    let path = accept_local_path(interface);
    let now =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if now.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(&path, "1").with_context(|| format!("writing 1 to {}", path.display()))?;
    Ok(true)
}

/// The kernel driver of `interface` (`veth`, `mlx5_core`, ...), from the ethtool
/// interface (ETHTOOL_GDRVINFO); None when the interface has none or does not exist.
pub fn driver(interface: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    if interface.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: zeroed plain-data structs; the ioctl writes at most a DrvInfo into `info`
    // through ifr_data, and the socket is closed below.
    unsafe {
        let mut info: DrvInfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(interface.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr);
        libc::close(fd);
        if rc != 0 {
            return None;
        }
        let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
        Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
    }
}

/// The XDP mode `xdp_mode = "auto"` asks for on `interface` (None: native, falling back
/// to generic where the driver refuses), and why.
pub fn auto_xdp_mode(interface: &str) -> (Option<aya::programs::XdpMode>, String) {
    match driver(interface).as_deref() {
        Some("veth") => (
            Some(aya::programs::XdpMode::Skb),
            "auto: generic, because native XDP on veth loses the frames it sends back out (XDP_TX) or redirects unless the peer runs an XDP program".into(),
        ),
        Some(d) => (None, format!("auto: native on driver {d}, generic if it refuses")),
        None => (None, "auto: native, generic if the driver refuses".into()),
    }
}

/// Runs iproute2's `ip` with `args`; its standard output, or its error in words.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_has_no_driver_and_unknown_interfaces_none() {
        // lo answers ETHTOOL_GDRVINFO with an empty driver or an error; neither is veth.
        assert_ne!(super::driver("lo").as_deref(), Some("veth"));
        assert_eq!(super::driver("no-such-if0"), None);
        assert_eq!(super::driver("a-name-longer-than-ifnamsiz"), None);
    }
}

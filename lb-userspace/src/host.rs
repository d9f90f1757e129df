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

use anyhow::Context as _;

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

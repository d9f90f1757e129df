//! The embedded eBPF object and loading it into the kernel.

use anyhow::Context as _;
use aya::Ebpf;

/// Name of the XDP balancer program inside the object.
pub const PROG_BALANCER: &str = "mptcp_lb";
/// Name of the backends' decapsulation program.
pub const PROG_DECAP: &str = "lb_decap";
/// Benchmark harness: restore the frame, then balance.
pub const PROG_BENCH_BALANCER: &str = "bench_balancer";
/// Benchmark harness: restore the frame only.
pub const PROG_BENCH_RESET: &str = "bench_reset";
/// Benchmark part: restore the frame, then SHA-256 of a new key.
pub const PROG_BENCH_SHA256: &str = "bench_sha256";
/// Benchmark part: restore the frame, then one token-table insert of a new token.
pub const PROG_BENCH_TOKEN_INSERT: &str = "bench_token_insert";
/// Name of the bare XDP_PASS program (the benchmark floor).
pub const PROG_PASS: &str = "xdp_pass";
/// Name of the backends' tc egress program that reports SYN/ACKs with MP_CAPABLE.
pub const PROG_TOKEN_EGRESS: &str = "token_egress";

/// The eBPF object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Parses the embedded object and creates its maps (programs are loaded by the caller).
pub fn open() -> anyhow::Result<Ebpf> {
    raise_memlock_limit();
    Ebpf::load(EBPF_OBJECT).context("parsing the embedded eBPF object and creating its maps")
}

/// The object for a backend's programs (decapsulation, token reports): the balancer's
/// big maps are not used there and are created with one entry.
pub fn open_for_backend() -> anyhow::Result<Ebpf> {
    use lb_common::maps::{MAP_CONNS, MAP_CONNS4, MAP_MAGLEV, MAP_TOKENS};
    raise_memlock_limit();
    aya::EbpfLoader::new()
        .map_max_entries(MAP_MAGLEV, 1)
        .map_max_entries(MAP_CONNS, 1)
        .map_max_entries(MAP_CONNS4, 1)
        .map_max_entries(MAP_TOKENS, 1)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object")
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; raising it is harmless after.
pub fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct; failure only matters on old kernels,
    // where the load that follows reports it.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

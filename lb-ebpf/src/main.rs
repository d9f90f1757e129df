//! mptcp-lb's kernel side: the XDP balancer, the backends' decapsulation program, and
//! a bare XDP_PASS program used as the benchmark floor.
//!
//! On the host this crate compiles to an empty binary so `cargo clippy --workspace`
//! works; the real object is built for bpfel-unknown-none by lb-userspace's build.rs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod balancer;
mod bench;
mod decap;
mod encap;
mod icmp;
mod maps;
mod mptcp;
mod parse;
mod token_egress;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// The load balancer, attached to the interface that receives VIP traffic.
#[xdp]
pub fn mptcp_lb(ctx: XdpContext) -> u32 {
    balancer::balance(&ctx)
}

/// Backend side: tunnel decapsulation.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap::decap(&ctx)
}

/// Backend side (tc egress): reports each SYN/ACK with MP_CAPABLE to `mptcp-lb agent`.
#[classifier]
pub fn token_egress(ctx: TcContext) -> i32 {
    token_egress::token_egress(&ctx)
}

/// Benchmark harness: restores the original frame, then runs the balancer.
#[xdp]
pub fn bench_balancer(ctx: XdpContext) -> u32 {
    if !bench::reset(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    balancer::balance(&ctx)
}

/// Benchmark harness: the restore alone (the floor of the resetting method).
#[xdp]
pub fn bench_reset(ctx: XdpContext) -> u32 {
    bench::reset_only(&ctx)
}

/// Benchmark part: SHA-256 of a key alone (the learning ACK's token derivation).
#[xdp]
pub fn bench_sha256(ctx: XdpContext) -> u32 {
    bench::sha256_only(&ctx)
}

/// Benchmark part: one token-table insert alone (the learning ACK's record).
#[xdp]
pub fn bench_token_insert(ctx: XdpContext) -> u32 {
    bench::token_insert_only(&ctx)
}

/// Does nothing but pass: the floor that `cargo xtask bench` measures beside the balancer.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

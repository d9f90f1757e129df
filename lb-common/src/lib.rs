//! Types and pure logic shared by the XDP dataplane (`lb-ebpf`) and the host side
//! (`lb-userspace`, `tests`). Everything here is `no_std` so the kernel program and the
//! host run the same code, and the host can test and fuzz it.
#![no_std]

pub mod counters;
pub mod hash;
pub mod maps;
pub mod mptcp;
pub mod packet;
pub mod tokens;

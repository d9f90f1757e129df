//! Builds the eBPF object (lb-ebpf, nightly, bpfel-unknown-none) so the controller can
//! embed it; `cargo xtask setup` installs what this needs (rust-src, bpf-linker).
//!
//! This does what `aya_build::build_ebpf` does, plus one flag it cannot be given:
//! `-C target-cpu=v3`. rustc otherwise asks bpf-linker for the `generic` CPU, which has
//! no 32-bit jumps: every comparison of a u32 (ports, lengths, flags, the token's SHA-256)
//! then needs extra instructions to widen it, and booleans are materialised before they
//! are branched on. With v3 the established-flow ACK takes ~20 ns less (`cargo xtask
//! bench`). Kernels have run v3 programs since 5.1.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

const TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "lb-ebpf";

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest.parent().context("workspace root")?;
    let root = workspace.join(PACKAGE);
    // The program also compiles lb-common's code (the option walk, the token hashes, the
    // map layouts), so a change there rebuilds it too.
    for dir in [&root, &workspace.join("lb-common")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    // aya-ebpf picks its helper bindings by the architecture the programs will run on.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let flags = [
        &format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
        "-Ctarget-cpu=v3",
    ]
    .join("\x1f");
    let target_dir = out_dir.join("ebpf-target");
    let output = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--quiet", "--release"])
        .args(["--package", PACKAGE, "--bins", "--target", TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&root)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        // The outer build's compiler (stable) must not leak into the nightly one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .output()
        .context("running `rustup run nightly cargo build` for the eBPF object (`cargo xtask setup` installs the toolchain)")?;
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        println!("cargo:warning={line}");
    }
    if !output.status.success() {
        bail!("building {PACKAGE} for {TARGET} failed: {}", output.status);
    }
    let built = target_dir.join(TARGET).join("release").join(PACKAGE);
    copy(&built, &out_dir.join(PACKAGE))
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

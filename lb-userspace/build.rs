//! Builds the eBPF object (lb-ebpf, nightly, bpfel-unknown-none) so the controller can
//! embed it; `cargo xtask setup` installs what this needs (rust-src, bpf-linker).
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let metadata = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .output()
        .context("cargo locate-project")?;
    let workspace_toml = String::from_utf8(metadata.stdout).context("workspace path")?;
    let workspace = std::path::Path::new(workspace_toml.trim())
        .parent()
        .context("workspace root")?;
    // aya-build watches lb-ebpf only; the program also compiles lb-common's code (the
    // option walk, the token hashes, the map layouts), so a change there rebuilds it too.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("lb-common").display()
    );
    let root = workspace.join("lb-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

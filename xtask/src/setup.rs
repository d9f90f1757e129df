//! `cargo xtask setup`: checks, and where missing installs, what building and testing
//! mptcp-lb needs on a fresh Debian machine. Every other task calls [`ensure`] first.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the namespace tests drive
/// (ip, nstat: iproute2; ethtool; sysctl: procps; nsenter: util-linux; the fleet
/// testbed's BGP speakers: bird2; real applications under mptcpize: nginx-light, curl,
/// iperf3, mptcpd).
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "ethtool",
    "procps",
    "util-linux",
    "bird2",
    "nginx-light",
    "curl",
    "iperf3",
    "mptcpd",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";

/// One thing the project needs: how to tell it is there, and how to put it there.
struct Requirement {
    what: String,
    needs_root: bool,
    install: Vec<String>,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn missing() -> Vec<Requirement> {
    let mut missing = Vec::new();

    let absent: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", p]))
                != "installed"
        })
        .collect();
    if !absent.is_empty() {
        missing.push(Requirement {
            what: format!("Debian packages: {}", absent.join(" ")),
            needs_root: true,
            install: vec![
                "apt-get update".into(),
                format!(
                    "DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
                    absent.join(" ")
                ),
            ],
        });
    }

    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        missing.push(Requirement {
            what: "rust-src for the nightly toolchain (eBPF builds core from source)".into(),
            needs_root: false,
            install: vec!["rustup component add rust-src --toolchain nightly".into()],
        });
    }

    let linker = output(Command::new("bpf-linker").arg("--version"));
    if !linker.contains(BPF_LINKER_VERSION) {
        missing.push(Requirement {
            what: format!("bpf-linker {BPF_LINKER_VERSION} built against LLVM 22"),
            needs_root: false,
            install: vec![format!(
                "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version {BPF_LINKER_VERSION} \
                 --locked --no-default-features --features llvm-22"
            )],
        });
    }

    if !quiet_ok(Command::new("mountpoint").args(["-q", BPFFS])) {
        missing.push(Requirement {
            what: format!("a bpffs mount at {BPFFS} (pinned maps and links live there)"),
            needs_root: true,
            install: vec![format!("mount -t bpf bpf {BPFFS}")],
        });
    }
    missing
}

fn run_shell(line: &str) -> anyhow::Result<()> {
    println!("setup: running: {line}");
    let status = Command::new("sh")
        .args(["-c", line])
        .status()
        .with_context(|| format!("spawning `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed with {status}");
    }
    Ok(())
}

/// Installs whatever is missing (as root), or prints the exact commands (not root).
/// `verbose` says so when nothing had to be done.
pub fn ensure(verbose: bool) -> anyhow::Result<()> {
    let todo = missing();
    if todo.is_empty() {
        if verbose {
            println!(
                "setup: nothing to do: Debian packages, nightly rust-src, bpf-linker {BPF_LINKER_VERSION} \
                 and the bpffs mount are all in place"
            );
        }
        return Ok(());
    }
    let root = is_root();
    if !root && todo.iter().any(|r| r.needs_root) {
        eprintln!("setup: missing, and installing it needs root; run these commands:");
        for r in &todo {
            eprintln!("  # {}", r.what);
            for line in &r.install {
                let sudo = if r.needs_root { "sudo " } else { "" };
                eprintln!("  {sudo}{line}");
            }
        }
        bail!(
            "setup incomplete (not root): run the commands above, or `sudo -E cargo xtask setup`"
        );
    }
    for r in &todo {
        let started = std::time::Instant::now();
        println!("setup: installing {}", r.what);
        for line in &r.install {
            run_shell(line)?;
        }
        println!("setup: {} done in {:.0?}", r.what, started.elapsed());
    }
    let left = missing();
    if !left.is_empty() {
        let names: Vec<_> = left.iter().map(|r| r.what.as_str()).collect();
        bail!(
            "setup ran but these are still missing: {}",
            names.join("; ")
        );
    }
    Ok(())
}

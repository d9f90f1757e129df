//! Developer tasks for mptcp-lb: `cargo xtask <task>`.

mod deploy;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "mptcp-lb developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, rust-src, bpf-linker, bpffs); idempotent.
    Setup,
    /// Build the eBPF object and the `mptcp-lb` binary.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// THE test command: format check, clippy (warnings denied), host unit tests, then
    /// the privileged tests (kernel loads, packet fixtures, network namespaces).
    Test,
    /// Benchmark the dataplane with BPF_PROG_TEST_RUN: ns/packet per traffic class
    /// beside the floor (a bare XDP_PASS program) measured in the same run; then goodput
    /// through the balancer against plain routing on the testbed, and its CPU per gigabit.
    Bench,
    /// Flood the balancer's tables (spoofed MP_CAPABLE SYNs, forged handshakes from one
    /// and from many 5-tuples, spoofed ACKs and UDP, each 10 times the tables' capacity)
    /// while live MPTCP connections open their second subflows; prints what each flood
    /// did and how many connections kept both subflows, with the limits on and off.
    Flood,
    /// Show MPTCP subflow affinity end to end: testbed, load balancer, 20 MPTCP
    /// connections with a second subflow each, awareness on, then off.
    Demo {
        /// Leave the testbed and the daemon running afterwards.
        #[arg(long)]
        keep: bool,
        /// A fleet of N balancer nodes behind a router's ECMP (BGP), joins steered by
        /// port, against joins steered by token.
        #[arg(long, default_value_t = 1)]
        lb_nodes: usize,
    },
    /// The network-namespace testbed: client (wifi, cell), router, load balancer, three
    /// MPTCP backends.
    Testbed {
        #[arg(value_parser = ["up", "down", "status"])]
        action: String,
        /// With up: N balancer nodes behind the router's ECMP (BGP), joins steered by port.
        #[arg(long, default_value_t = 1)]
        lb_nodes: usize,
    },
    /// Build in release, install mptcp-lb and its configuration, start it (systemd, or
    /// in the background), wait until it reports the program attached. Run again to
    /// upgrade in place without a forwarding gap.
    Deploy(deploy::DeployArgs),
    /// Stop the daemon, detach the dataplane, remove the unit and configuration.
    Undeploy(deploy::UndeployArgs),
    /// The backends' side: install mptcp-lb, attach the tunnel decapsulation and, for
    /// services that steer joins by port, set the C bit and announce the join ports.
    DeployBackend(deploy::BackendArgs),
    /// Undo deploy-backend: withdraw the join ports, clear the C bit, detach.
    UndeployBackend(deploy::UndeployBackendArgs),
}

/// The release `mptcp-lb`, built.
fn release_build() -> anyhow::Result<std::path::PathBuf> {
    setup::ensure(false)?;
    run(
        "release build of mptcp-lb",
        cargo().args([
            "build",
            "--release",
            "-p",
            "lb-userspace",
            "--bin",
            "mptcp-lb",
        ]),
    )?;
    Ok(workspace_root().join("target/release/mptcp-lb"))
}

/// Builds the debug `mptcp-lb` and the lab, then runs `lab <args>`.
fn lab(args: &[&str]) -> anyhow::Result<()> {
    setup::ensure(false)?;
    run(
        "build mptcp-lb and the lab",
        cargo().args([
            "build",
            "-p",
            "lb-userspace",
            "--bin",
            "mptcp-lb",
            "-p",
            "mptcp-lb-tests",
            "--bin",
            "lab",
        ]),
    )?;
    let bin = workspace_root().join("target/debug/lab");
    let status = Command::new(&bin)
        .args(args)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        bail!("lab {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn run(step: &str, cmd: &mut Command) -> anyhow::Result<()> {
    println!("xtask: {step}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}

/// Runs `cargo test ...`, echoing its output, and adds its `test result:` lines to
/// `totals` (passed, failed).
fn run_tests(step: &str, cmd: &mut Command, totals: &mut (u64, u64)) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    println!("xtask: {step}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            totals.0 += num("passed");
            totals.1 += num("failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn test() -> anyhow::Result<()> {
    setup::ensure(false)?;
    run(
        "format check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "clippy, warnings denied",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let mut totals = (0, 0);
    run_tests(
        "host unit tests",
        cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--exclude",
            "mptcp-lb-tests",
        ]),
        &mut totals,
    )?;
    if !setup::is_root() {
        if in_ci() {
            bail!("privileged tests need root and CI=true forbids skipping them");
        }
        println!("xtask: not root: the privileged tests will report themselves as skipped");
    }
    // The daemon, CLI and deploy tests run the real binaries.
    run(
        "build the mptcp-lb and xtask binaries",
        cargo().args([
            "build",
            "-p",
            "lb-userspace",
            "--bin",
            "mptcp-lb",
            "-p",
            "xtask",
        ]),
    )?;
    run_tests(
        "privileged tests (kernel loads, packet fixtures, network namespaces)",
        cargo().args([
            "test",
            "-p",
            "mptcp-lb-tests",
            "--",
            "--test-threads=1",
            "--show-output",
        ]),
        &mut totals,
    )?;
    println!("all tests: {} passed, {} failed", totals.0, totals.1);
    if totals.0 == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::ensure(true),
        Task::Build { release } => {
            setup::ensure(false)?;
            let mut cmd = cargo();
            cmd.args(["build", "-p", "lb-userspace"]);
            if release {
                cmd.arg("--release");
            }
            run("build eBPF object and mptcp-lb", &mut cmd)
        }
        Task::Test => test(),
        Task::Bench => {
            setup::ensure(false)?;
            let release_bin = |name: &str| {
                let mut cmd = cargo();
                cmd.args([
                    "run",
                    "--quiet",
                    "--release",
                    "-p",
                    "mptcp-lb-tests",
                    "--bin",
                    name,
                ]);
                cmd
            };
            run("benchmark (release build)", &mut release_bin("bench"))?;
            run(
                "end to end: goodput through the balancer against plain routing",
                &mut release_bin("goodput"),
            )
        }
        Task::Flood => {
            setup::ensure(false)?;
            run(
                "flood test (prints its table)",
                cargo().args([
                    "test",
                    "--quiet",
                    "-p",
                    "mptcp-lb-tests",
                    "--test",
                    "flood",
                    "--",
                    "--nocapture",
                ]),
            )
        }
        Task::Demo { keep, lb_nodes } => {
            let nodes = lb_nodes.to_string();
            let mut args = vec!["demo", "--lb-nodes", nodes.as_str()];
            if keep {
                args.push("--keep");
            }
            lab(&args)
        }
        Task::Testbed { action, lb_nodes } => {
            let nodes = lb_nodes.to_string();
            lab(&[action.as_str(), "--lb-nodes", nodes.as_str()])
        }
        Task::Deploy(args) => deploy::deploy(&args, release_build),
        Task::Undeploy(args) => deploy::undeploy(&args),
        Task::DeployBackend(args) => deploy::deploy_backend(&args, release_build),
        Task::UndeployBackend(args) => deploy::undeploy_backend(&args),
    }
}

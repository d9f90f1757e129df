//! Developer tasks for mptcp-lb: `cargo xtask <task>`.

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
    /// beside the floor (a bare XDP_PASS program) measured in the same run.
    Bench,
    /// Show MPTCP subflow affinity end to end in network namespaces.
    Demo,
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
    // The daemon and CLI tests run the real binary.
    run(
        "build the mptcp-lb binary",
        cargo().args(["build", "-p", "lb-userspace", "--bin", "mptcp-lb"]),
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
            run(
                "benchmark (release build)",
                cargo().args([
                    "run",
                    "--quiet",
                    "--release",
                    "-p",
                    "mptcp-lb-tests",
                    "--bin",
                    "bench",
                ]),
            )
        }
        Task::Demo => {
            println!(
                "The demo is not built yet. It will bring up a client with two paths, an edge \
                 router, the XDP load balancer and three MPTCP backends in network namespaces, \
                 open about 20 MPTCP connections with a second subflow each, and show every \
                 subflow landing on its connection's backend (and the resets without MPTCP \
                 awareness). Meanwhile `cargo xtask test` runs what exists."
            );
            Ok(())
        }
    }
}

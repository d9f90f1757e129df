//! `mptcp-lb`: the controller daemon and CLI.
use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{decap, loader};

/// An XDP layer-4 load balancer that keeps every subflow of a Multipath TCP connection
/// on the same backend.
#[derive(Parser)]
#[command(name = "mptcp-lb", version, about)]
struct Cli {
    /// Root of the BPF filesystem where links and maps are pinned.
    #[arg(long, global = true, default_value = "/sys/fs/bpf")]
    bpffs: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the dataplane programs into the kernel (verifier check) without attaching.
    Check,
    /// Remove the balancer: unpin its link and maps (the program detaches, forwarding
    /// stops, connection and token tables are gone).
    Detach {
        /// The pin path of the configuration (`balancer.pin_path`).
        #[arg(long, default_value = "/sys/fs/bpf/mptcp-lb")]
        pin_path: std::path::PathBuf,
    },
    /// Backend side: strip IPIP/IP6IP6 tunnels addressed to this host (for hosts
    /// without the ipip/ip6tnl drivers).
    Decap {
        #[command(subcommand)]
        action: DecapAction,
    },
}

#[derive(Subcommand)]
enum DecapAction {
    /// Attach the decapsulation program to IFACE; it stays attached after exit.
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
    },
    /// Detach it again.
    Detach {
        #[arg(long)]
        iface: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

impl Mode {
    fn xdp(self) -> Option<XdpMode> {
        match self {
            Mode::Auto => None,
            Mode::Native => Some(XdpMode::Driver),
            Mode::Generic => Some(XdpMode::Skb),
        }
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and what was being done, without a backtrace.
            eprintln!("mptcp-lb: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check => {
            let mut ebpf = loader::open()?;
            for name in [loader::PROG_BALANCER, loader::PROG_DECAP, loader::PROG_PASS] {
                let prog: &mut aya::programs::Xdp = ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name} missing from the object"))?
                    .try_into()?;
                prog.load()
                    .with_context(|| format!("the verifier refused {name}"))?;
                println!("{name}: loaded, verifier accepted it");
            }
        }
        Command::Detach { pin_path } => {
            let removed = lb_userspace::pins::remove(&pin_path)
                .with_context(|| format!("removing pins under {}", pin_path.display()))?;
            if !removed {
                anyhow::bail!(
                    "nothing pinned under {} (which pin path does the configuration use?)",
                    lb_userspace::pins::layout_dir(&pin_path).display()
                );
            }
            println!("detached: pins under {} removed", pin_path.display());
        }
        Command::Decap {
            action: DecapAction::Attach { iface, mode },
        } => {
            let got = decap::attach(&cli.bpffs, &iface, mode.xdp())?;
            println!("decapsulation attached to {iface} ({got:?} mode)");
        }
        Command::Decap {
            action: DecapAction::Detach { iface },
        } => {
            decap::detach(&cli.bpffs, &iface)?;
            println!("decapsulation detached from {iface}");
        }
    }
    Ok(())
}

//! `mptcp-lb`: the controller daemon and CLI.
use clap::Parser;

/// An XDP layer-4 load balancer that keeps every subflow of a Multipath TCP connection
/// on the same backend.
#[derive(Parser)]
#[command(name = "mptcp-lb", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Load the dataplane into the kernel (verifier check) without attaching it.
    Check,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check => {
            let mut ebpf = lb_userspace::loader::open()?;
            for name in [
                lb_userspace::loader::PROG_BALANCER,
                lb_userspace::loader::PROG_PASS,
            ] {
                let prog: &mut aya::programs::Xdp = ebpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow::anyhow!("program {name} missing from the object"))?
                    .try_into()?;
                prog.load()?;
                println!("{name}: loaded, verifier accepted it");
            }
        }
    }
    Ok(())
}

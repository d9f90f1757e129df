//! Rare events the dataplane reports itself (aya-log): token collisions, a rate limit
//! reached, a token insert refused, a join for a backend out of service. The program
//! writes them to a ring buffer, at most `MAX_LOG_RATE` a second per CPU and never on
//! the per-packet fast path; this module hands them to the `log` facade, which the
//! daemon's tracing subscriber receives (debug level, target `lb_ebpf::...`).

use anyhow::Context as _;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

use crate::dataplane::Dataplane;

/// The dataplane's log ring, read into `logger`.
pub fn logger<T: log::Log>(dp: &mut Dataplane, logger: T) -> anyhow::Result<EbpfLogger<T>> {
    EbpfLogger::init_with_logger(&mut dp.ebpf, logger)
        .context("opening the program's log ring (AYA_LOGS)")
}

/// Starts a task that forwards the dataplane's log records to the `log` facade whenever
/// the ring has some. Needs a Tokio runtime.
pub fn forward(dp: &mut Dataplane) -> anyhow::Result<()> {
    let ring = logger(dp, log::logger())?;
    // SAFETY: the fd is the ring buffer map's, owned by `ring`, which the AsyncFd owns
    // and never replaces: it stays open and the same until the AsyncFd is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("polling the program's log ring")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = ring.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

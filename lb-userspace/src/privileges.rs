//! Dropping root's capabilities once the daemon is running. Loading and attaching the
//! program, opening the pins and binding the sockets need root; afterwards the daemon
//! only operates maps through file descriptors it holds (CAP_BPF, since this kernel
//! refuses bpf(2) without it: `kernel.unprivileged_bpf_disabled`), and, on a fleet node,
//! rewrites its announcement routes with ip(8) (CAP_NET_ADMIN). It keeps those two and
//! nothing else, in every thread, with no way back (bounding set, no_new_privs), while it
//! parses HTTP from the network and requests from its control socket.
//!
//! Capabilities belong to threads, and the runtime's threads exist already: each thread
//! is made to drop its own, by a signal whose handler makes only raw system calls (what
//! libpsx does for C programs), and the result is read back from /proc.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyhow::{Context as _, bail};

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_BPF: u32 = 39;

/// The capabilities each thread is to keep (a bit per capability).
static KEEP: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops the calling thread's capabilities to `keep`; raw system calls only, so that a
/// signal handler may run it.
fn drop_own(keep: u64, last: u32) -> bool {
    // SAFETY: prctl and capset with valid arguments; no memory is shared.
    unsafe {
        for cap in 0..=last {
            if keep & (1 << cap) == 0 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
        let header = CapHeader {
            version: CAP_V3,
            pid: 0,
        };
        let data = [
            CapData {
                effective: keep as u32,
                permitted: keep as u32,
                inheritable: 0,
            },
            CapData {
                effective: (keep >> 32) as u32,
                permitted: (keep >> 32) as u32,
                inheritable: 0,
            },
        ];
        let capset = libc::syscall(libc::SYS_capset, &header, data.as_ptr());
        let nnp = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        capset == 0 && nnp == 0
    }
}

static LAST_CAP: AtomicUsize = AtomicUsize::new(40);

extern "C" fn on_signal(_: libc::c_int) {
    if drop_own(
        KEEP.load(Ordering::SeqCst),
        LAST_CAP.load(Ordering::SeqCst) as u32,
    ) {
        DONE.fetch_add(1, Ordering::SeqCst);
    } else {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
}

fn threads() -> anyhow::Result<Vec<libc::pid_t>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        if let Some(tid) = e?.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(tid);
        }
    }
    Ok(out)
}

/// A thread's effective and bounding capabilities and no_new_privs, from /proc.
pub fn thread_caps(pid: u32, tid: u32) -> Option<(u64, u64, bool)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    Some((
        u64::from_str_radix(field("CapEff:")?, 16).ok()?,
        u64::from_str_radix(field("CapBnd:")?, 16).ok()?,
        field("NoNewPrivs:")? == "1",
    ))
}

/// Keeps only `keep` (capability numbers) in every thread of this process, for good.
pub fn drop_to(keep: &[u32]) -> anyhow::Result<()> {
    let mask = keep.iter().fold(0u64, |m, c| m | (1 << c));
    KEEP.store(mask, Ordering::SeqCst);
    LAST_CAP.store(last_cap() as usize, Ordering::SeqCst);
    let sig = libc::SIGRTMIN() + 3;
    // SAFETY: a handler that makes only async-signal-safe system calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            bail!("sigaction: {}", std::io::Error::last_os_error());
        }
    }
    let pid = std::process::id();
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    // Threads started meanwhile inherit from a thread that may not have dropped yet:
    // go round until every thread reads back as dropped.
    for _ in 0..20 {
        let pending: Vec<libc::pid_t> = threads()?
            .into_iter()
            .filter(|t| thread_caps(pid, *t as u32).is_some_and(|(eff, _, _)| eff != mask))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        DONE.store(0, Ordering::SeqCst);
        FAILED.store(0, Ordering::SeqCst);
        let mut sent = 0;
        for t in &pending {
            if *t == me {
                on_signal(sig);
            } else {
                // SAFETY: tgkill to a thread of this process.
                unsafe { libc::syscall(libc::SYS_tgkill, pid as libc::pid_t, *t, sig) };
            }
            sent += 1;
        }
        let start = std::time::Instant::now();
        while DONE.load(Ordering::SeqCst) + FAILED.load(Ordering::SeqCst) < sent
            && start.elapsed() < std::time::Duration::from_millis(500)
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if FAILED.load(Ordering::SeqCst) > 0 {
            bail!("a thread could not drop its capabilities");
        }
    }
    bail!("threads kept appearing with full capabilities")
}

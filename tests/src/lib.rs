//! Shared machinery for mptcp-lb's privileged tests: the root/CI gate, a Katran-style
//! packet-fixture runner over BPF_PROG_TEST_RUN, and packet builders.

pub mod daemon;
pub mod delay;
pub mod fixture;
pub mod flood;
pub mod netns;
pub mod packets;
pub mod testbed;
pub mod testenv;

/// True when the test may go on. Not root: prints why it skips, or under `CI=true`
/// panics, because CI runs as root and a skip there would hide a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{test}: needs root (BPF and network namespaces); CI=true forbids skipping"
    );
    println!("SKIPPED {test}: needs root to load BPF programs and create namespaces");
    false
}

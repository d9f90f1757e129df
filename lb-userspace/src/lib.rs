//! The host side of mptcp-lb: loading the dataplane, and (in later modules) the
//! controller daemon and the CLI. `tests/` links this library to exercise the same code.

pub mod loader;

//! The host side of mptcp-lb: loading the dataplane, and (in later modules) the
//! controller daemon and the CLI. `tests/` links this library to exercise the same code.

pub mod config;
pub mod dataplane;
pub mod decap;
pub mod loader;
pub mod maglev;
pub mod pins;

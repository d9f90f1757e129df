//! The host side of mptcp-lb: loading the dataplane, the controller daemon and the CLI. `tests/` links this library to exercise the same code.

pub mod agent;
pub mod announce;
pub mod announcement;
pub mod clock;
pub mod config;
pub mod control;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod edit;
pub mod health;
pub mod host;
pub mod inspect;
pub mod join_ports;
pub mod kernel_log;
pub mod loader;
pub mod maglev;
pub mod metrics;
pub mod mptcp_diag;
pub mod pins;
pub mod privileges;
pub mod token_table;

//! Backend health checks: `tcp` (a connect), `mptcp` (a connect that must negotiate
//! MPTCP, not fall back to TCP), `http` (a GET that must answer the expected status),
//! and the rise/fall hysteresis that turns results into up and down.

use std::{net::SocketAddr, os::fd::AsRawFd as _};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::{HealthCheck, HealthKind};

const IPPROTO_MPTCP: i32 = 262;
const SOL_MPTCP: i32 = 284;
const MPTCP_INFO: i32 = 1;

/// Why a check did not pass, in words for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The backend failed it: refused, no answer in time, a wrong answer.
    Backend(String),
    /// This host could not run it (out of file descriptors, memory or buffers, no
    /// MPTCP here): it says nothing about the backend, whose state must not change.
    Local(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Backend(s) => f.write_str(s),
            Failure::Local(s) => write!(f, "could not run on this host: {s}"),
        }
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Backend(s)
    }
}

/// An I/O error of step `what`, as the backend's failure or this host's.
pub fn io_failure(what: &str, e: &std::io::Error) -> Failure {
    let msg = format!("{what}: {e}");
    match e.raw_os_error() {
        // Out of descriptors, buffers, memory, or local ports (EADDRNOTAVAIL on connect).
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL) => {
            Failure::Local(msg)
        }
        _ => Failure::Backend(msg),
    }
}

/// Runs one check of `kind` against `addr`, bounded by the check's timeout.
pub async fn probe(check: &HealthCheck, addr: SocketAddr) -> Result<(), Failure> {
    match tokio::time::timeout(check.timeout(), probe_inner(check, addr)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Backend(format!(
            "no answer within {} ms",
            check.timeout_ms
        ))),
    }
}

async fn probe_inner(check: &HealthCheck, addr: SocketAddr) -> Result<(), Failure> {
    match check.kind {
        HealthKind::Tcp => {
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| io_failure("connect", &e))?;
            Ok(())
        }
        HealthKind::Mptcp => {
            let stream = connect_mptcp(addr).await?;
            if mptcp_negotiated(&stream) {
                Ok(())
            } else {
                Err(Failure::Backend("connected, but the backend answered without MPTCP (fell back to TCP: is net.mptcp.enabled=1 and does the server use IPPROTO_MPTCP?)".into()))
            }
        }
        HealthKind::Http => {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| io_failure("connect", &e))?;
            let req = format!(
                "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: mptcp-lb-health\r\nConnection: close\r\n\r\n",
                check.http_path,
                host_header(addr)
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| io_failure("send", &e))?;
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 256];
            while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
                let n = s.read(&mut buf).await.map_err(|e| io_failure("read", &e))?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let status = parse_status(&head)?;
            if status == check.http_status {
                Ok(())
            } else {
                Err(Failure::Backend(format!(
                    "HTTP status {status}, expected {}",
                    check.http_status
                )))
            }
        }
    }
}

/// The Host header for `addr` (RFC 9110: an IPv6 literal in brackets, and the port).
pub fn host_header(addr: SocketAddr) -> String {
    addr.to_string()
}

/// The status code of an HTTP/1.x status line.
pub fn parse_status(head: &[u8]) -> Result<u16, String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code
            .parse()
            .map_err(|_| format!("bad HTTP status line {:?}", line.trim_end())),
        _ => Err(format!("not an HTTP answer: {:?}", line.trim_end())),
    }
}

async fn connect_mptcp(addr: SocketAddr) -> Result<tokio::net::TcpStream, Failure> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock =
        Socket::new(domain, Type::STREAM, Some(Protocol::from(IPPROTO_MPTCP))).map_err(|e| {
            Failure::Local(format!(
                "MPTCP socket on the balancer host: {e} (net.mptcp.enabled=0 here?)"
            ))
        })?;
    sock.set_nonblocking(true)
        .map_err(|e| Failure::Local(e.to_string()))?;
    let std_stream: std::net::TcpStream = sock.into();
    tokio::net::TcpSocket::from_std_stream(std_stream)
        .connect(addr)
        .await
        .map_err(|e| io_failure("connect", &e))
}

/// True when the connection speaks MPTCP: on a connection that fell back to TCP the
/// kernel hands SOL_MPTCP options to the TCP subflow, which refuses them.
fn mptcp_negotiated(stream: &tokio::net::TcpStream) -> bool {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            SOL_MPTCP,
            MPTCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    rc == 0
}

/// Rise/fall hysteresis: `fall` failures in a row take an up backend down, `rise`
/// successes in a row bring a down one up.
#[derive(Clone, Debug)]
pub struct Hysteresis {
    pub up: bool,
    streak: u32,
    rise: u32,
    fall: u32,
}

impl Hysteresis {
    pub fn new(up: bool, rise: u32, fall: u32) -> Self {
        Self {
            up,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Feeds one result; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_take_it_down_and_rise_successes_bring_it_back() {
        let mut h = Hysteresis::new(true, 2, 3);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        // A success in between resets the count.
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert!(!h.up);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert!(h.up);
    }

    #[test]
    fn host_headers_bracket_ipv6_and_carry_the_port() {
        assert_eq!(
            host_header("10.0.1.11:8080".parse().expect("addr")),
            "10.0.1.11:8080"
        );
        assert_eq!(
            host_header("[2001:db8::12]:80".parse().expect("addr")),
            "[2001:db8::12]:80"
        );
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\nServer: x\r\n"), Ok(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Ok(503)
        );
        assert!(parse_status(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status(b"HTTP/1.1 abc\r\n").is_err());
        assert!(parse_status(b"").is_err());
    }

    fn check(kind: HealthKind) -> HealthCheck {
        HealthCheck {
            kind,
            port: None,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 1,
            fall: 1,
            http_path: "/healthz".into(),
            http_status: 200,
        }
    }

    /// A one-shot HTTP server on loopback answering `status`.
    async fn http_server(status: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = buf[..n].starts_with(b"GET /healthz HTTP/1.0\r\n");
                let line = if ok {
                    status
                } else {
                    "HTTP/1.0 400 Bad\r\n\r\n"
                };
                let _ = s.write_all(line.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_and_http_checks_against_loopback_servers() {
        let good = http_server("HTTP/1.0 200 OK\r\n\r\n").await;
        let bad = http_server("HTTP/1.0 503 Unavailable\r\n\r\n").await;
        assert_eq!(probe(&check(HealthKind::Tcp), good).await, Ok(()));
        assert_eq!(probe(&check(HealthKind::Http), good).await, Ok(()));
        let e = probe(&check(HealthKind::Http), bad).await.expect_err("503");
        assert_eq!(e, Failure::Backend("HTTP status 503, expected 200".into()));
        // Nobody listens on a port we just closed.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let e = probe(&check(HealthKind::Tcp), closed)
            .await
            .expect_err("refused");
        assert!(
            matches!(&e, Failure::Backend(m) if m.starts_with("connect:")),
            "{e}"
        );
    }

    /// Running out of descriptors or memory here is this host's failure, not the
    /// backend's: the daemon must not take a backend down for it.
    #[test]
    fn local_exhaustion_is_not_the_backends_failure() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(io_failure("connect", &e), Failure::Local(_)),
                "{e}"
            );
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ETIMEDOUT,
            libc::ECONNRESET,
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(io_failure("connect", &e), Failure::Backend(_)),
                "{e}"
            );
        }
    }
}

//! Backend health checks: `tcp` (a connect), `mptcp` (a connect that must negotiate
//! MPTCP, not fall back to TCP), `http` (a GET that must answer the expected status),
//! and the rise/fall hysteresis that turns results into up and down.

use std::{net::SocketAddr, os::fd::AsRawFd as _};

use socket2::{Domain, Protocol, Socket, Type};

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
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| io_failure("connect", &e))?;
            http_status(check, s, addr).await
        }
        HealthKind::Https => {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| io_failure("connect", &e))?;
            let tls = tls_connect(check, s, addr).await?;
            http_status(check, tls, addr).await
        }
    }
}

/// One GET of `http_path` over `stream` (hyper, HTTP/1.1): the answer's status must be
/// `http_status`. Redirects are not followed (a 301 is a 301); the answer's head is
/// bounded (16 KiB) and its body never read.
async fn http_status<S>(check: &HealthCheck, stream: S, addr: SocketAddr) -> Result<(), Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::Empty;
    use hyper::header;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(16 * 1024)
        .handshake::<_, Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Backend(format!("HTTP: {e}")))?;
    let req = hyper::Request::get(check.http_path.as_str())
        .header(header::HOST, host_header(addr))
        .header(header::USER_AGENT, "mptcp-lb-health")
        .header(header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| Failure::Backend(format!("HTTP request: {e}")))?;
    // The connection is driven beside the request, and dropped with the probe
    // (answered, failed or timed out).
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Failure::Backend(format!("HTTP: {e}")))?;
    let status = resp.status().as_u16();
    if status == check.http_status {
        Ok(())
    } else {
        Err(Failure::Backend(format!(
            "HTTP status {status}, expected {}",
            check.http_status
        )))
    }
}

/// The system's trusted roots, read once.
fn native_roots() -> &'static [tokio_rustls::rustls::pki_types::CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<
        Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    > = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// Accepts any certificate (`tls_verify = false`), still checking the handshake's
/// signatures with the provider's algorithms.
#[derive(Debug)]
struct NoVerify(std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider>);

impl tokio_rustls::rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        _: &[tokio_rustls::rustls::pki_types::CertificateDer<'_>],
        _: &tokio_rustls::rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: tokio_rustls::rustls::pki_types::UnixTime,
    ) -> Result<tokio_rustls::rustls::client::danger::ServerCertVerified, tokio_rustls::rustls::Error>
    {
        Ok(tokio_rustls::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS (rustls) over `stream`: the backend's certificate is checked against
/// `tls_ca_file` (else the system's roots) for `tls_server_name` (else the backend's
/// address), unless `tls_verify = false`.
async fn tls_connect(
    check: &HealthCheck,
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Failure> {
    use tokio_rustls::rustls::{self, pki_types::ServerName};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Local(format!("TLS: {e}")))?;
    let config = if check.tls_verify {
        let mut roots = rustls::RootCertStore::empty();
        match &check.tls_ca_file {
            Some(path) => {
                use rustls::pki_types::{CertificateDer, pem::PemObject as _};
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| Failure::Local(format!("tls_ca_file {}: {e}", path.display())))?;
                for c in certs {
                    let c = c.map_err(|e| {
                        Failure::Local(format!("tls_ca_file {}: {e}", path.display()))
                    })?;
                    let _ = roots.add(c);
                }
            }
            None => {
                roots.add_parsable_certificates(native_roots().iter().cloned());
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    };
    let name = match &check.tls_server_name {
        Some(n) => ServerName::try_from(n.clone())
            .map_err(|e| Failure::Local(format!("tls_server_name {n:?}: {e}")))?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|e| Failure::Backend(format!("TLS: {e}")))
}

/// The Host header for `addr` (RFC 9110: an IPv6 literal in brackets, and the port).
pub fn host_header(addr: SocketAddr) -> String {
    addr.to_string()
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
            tls_ca_file: None,
            tls_server_name: None,
            tls_verify: true,
        }
    }

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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
                let ok = buf[..n].starts_with(b"GET /healthz HTTP/1.1\r\n");
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

    /// An HTTPS server on loopback with a self-signed certificate for 127.0.0.1;
    /// returns its address and the certificate (PEM).
    async fn https_server() -> (SocketAddr, String) {
        use tokio_rustls::rustls;
        let cert =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
        let pem = cert.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = [0u8; 512];
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    let line = if buf[..n].starts_with(b"GET /healthz HTTP/1.1\r\n") {
                        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    } else {
                        "HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n"
                    };
                    let _ = tls.write_all(line.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (addr, pem)
    }

    /// HTTPS checks: a certificate signed by the configured CA passes; the same
    /// certificate without that CA fails, as a certificate for another name does;
    /// tls_verify = false passes whatever the certificate.
    #[tokio::test]
    async fn https_checks_verify_the_certificate() {
        let (addr, pem) = https_server().await;
        let ca = std::env::temp_dir().join(format!("mlb-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, pem).expect("ca file");
        let mut c = check(HealthKind::Https);
        c.tls_ca_file = Some(ca.clone());
        assert_eq!(probe(&c, addr).await, Ok(()));
        c.tls_server_name = Some("backend.example".into());
        let e = probe(&c, addr).await.expect_err("wrong name");
        assert!(e.to_string().contains("TLS:"), "{e}");
        let untrusted = check(HealthKind::Https);
        let e = probe(&untrusted, addr).await.expect_err("unknown issuer");
        assert!(
            matches!(&e, Failure::Backend(m) if m.contains("certificate")),
            "{e}"
        );
        let mut any = check(HealthKind::Https);
        any.tls_verify = false;
        assert_eq!(probe(&any, addr).await, Ok(()));
        let _ = std::fs::remove_file(&ca);
    }
}

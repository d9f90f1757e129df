//! Prometheus metrics, built from the maps at each scrape (per-CPU counters summed), and
//! the HTTP endpoint that serves them (hyper), bounded so that clients of the metrics
//! port cannot exhaust the daemon's file descriptors or its CPU.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use lb_common::maps::{MAP_CONNS, MAP_CONNS4};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::controller::{Controller, state_name};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// Sizes of the two big tables, counted through handles of their own so that a scrape
/// walks them without holding the controller (health changes and reloads go on).
pub struct TableCounter {
    conns: crate::dataplane::ConnTables,
    tokens: crate::token_table::TokenTable,
}

impl TableCounter {
    /// Opens the tables pinned in `layout_dir` (`<pin path>/v<layout>`).
    pub fn open(layout_dir: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let open = |name: &str| -> anyhow::Result<aya::maps::Map> {
            let path = layout_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))?;
            Ok(aya::maps::Map::from_map_data(data)?)
        };
        Ok(Self {
            conns: crate::dataplane::ConnTables {
                v4: HashMap::try_from(open(MAP_CONNS4)?)?,
                v6: HashMap::try_from(open(MAP_CONNS)?)?,
            },
            tokens: crate::token_table::TokenTable::from_pins(layout_dir)?,
        })
    }

    /// (connection entries, token entries), each a walk over the table's keys.
    pub fn count(&self) -> (usize, usize) {
        (self.conns.len(), self.tokens.len())
    }
}

/// The text exposition of everything the daemon knows; `tables` is
/// [`TableCounter::count`]'s answer, taken before the controller was locked.
pub fn render(
    ctl: &Controller,
    tables: (usize, usize),
    http: &HttpStats,
    tokens_in: Option<&crate::control::TokenAnnouncementStatus>,
) -> anyhow::Result<String> {
    let mut reg = Registry::with_prefix("mptcp_lb");

    let events: Family<Labels, Counter> = Family::default();
    for (c, v) in ctl.dp.counters()? {
        events
            .get_or_create(&labels(&[("event", c.label())]))
            .inc_by(v);
    }
    reg.register(
        "dataplane_events",
        "Dataplane counters (packets) by event, summed over CPUs",
        events,
    );

    let svc_packets: Family<Labels, Counter> = Family::default();
    let svc_bytes: Family<Labels, Counter> = Family::default();
    for (name, id) in ctl.services() {
        let t = ctl.dp.service_traffic(*id)?;
        let l = labels(&[("service", name)]);
        svc_packets.get_or_create(&l).inc_by(t.packets);
        svc_bytes.get_or_create(&l).inc_by(t.bytes);
    }
    reg.register(
        "service_packets",
        "Packets forwarded per service",
        svc_packets,
    );
    reg.register("service_bytes", "Bytes forwarded per service", svc_bytes);

    let be_packets: Family<Labels, Counter> = Family::default();
    let be_bytes: Family<Labels, Counter> = Family::default();
    let be_up: Family<Labels, Gauge> = Family::default();
    let be_weight: Family<Labels, Gauge> = Family::default();
    let be_state: Family<Labels, Gauge> = Family::default();
    for b in ctl.backends() {
        let addr = b.address.to_string();
        let l = labels(&[("service", &b.service), ("backend", &addr)]);
        let t = ctl.dp.backend_traffic(b.id)?;
        be_packets.get_or_create(&l).inc_by(t.packets);
        be_bytes.get_or_create(&l).inc_by(t.bytes);
        let up = b.state & lb_common::maps::BMETA_DOWN == 0;
        be_up.get_or_create(&l).set(i64::from(up));
        be_weight.get_or_create(&l).set(i64::from(b.weight));
        for s in ["active", "draining", "down", "disabled"] {
            let mut ls = l.clone();
            ls.push(("state".into(), s.into()));
            be_state
                .get_or_create(&ls)
                .set(i64::from(state_name(b.state) == s));
        }
    }
    reg.register(
        "backend_packets",
        "Packets forwarded per backend",
        be_packets,
    );
    reg.register("backend_bytes", "Bytes forwarded per backend", be_bytes);
    reg.register(
        "backend_healthy",
        "1 when the backend passes its health check (or has none)",
        be_up,
    );
    reg.register("backend_weight", "Configured Maglev weight", be_weight);
    reg.register(
        "backend_state",
        "1 for the backend's current state (active, draining, down, disabled)",
        be_state,
    );

    let conns: Gauge = Gauge::default();
    conns.set(tables.0 as i64);
    reg.register(
        "conn_table_entries",
        "Entries in the connection tables, IPv4 and IPv6",
        conns,
    );
    let conns_cap: Gauge = Gauge::default();
    conns_cap.set(i64::from(ctl.dp.sizes.conn_entries) + i64::from(ctl.dp.sizes.conn6_entries));
    reg.register(
        "conn_table_capacity",
        "Capacity of the connection tables, IPv4 and IPv6 (LRU)",
        conns_cap,
    );
    let tokens: Gauge = Gauge::default();
    tokens.set(tables.1 as i64);
    reg.register("token_table_entries", "Learned MPTCP tokens", tokens);
    let tokens_cap: Gauge = Gauge::default();
    tokens_cap.set(i64::from(ctl.dp.sizes.token_entries));
    reg.register(
        "token_table_capacity",
        "Capacity of the token table (tokens; it has two slots for each)",
        tokens_cap,
    );

    let reloads: Counter = Counter::default();
    reloads.inc_by(ctl.reloads);
    reg.register("config_reloads", "Configuration reloads applied", reloads);
    let failures: Counter = Counter::default();
    failures.inc_by(ctl.reload_failures);
    reg.register(
        "config_reload_failures",
        "Configuration reloads refused (the running configuration stayed)",
        failures,
    );
    let last: Gauge = Gauge::default();
    last.set(ctl.last_reload_unix as i64);
    reg.register(
        "config_last_reload_timestamp_seconds",
        "When the running configuration was applied (Unix time)",
        last,
    );

    let refused: Counter = Counter::default();
    refused.inc_by(http.refused.load(Ordering::Relaxed));
    reg.register(
        "metrics_connections_refused",
        "Connections to the metrics endpoint closed at once because it already served its maximum",
        refused,
    );

    if let Some(t) = tokens_in {
        let datagrams: Counter = Counter::default();
        datagrams.inc_by(t.datagrams);
        reg.register(
            "token_announcement_datagrams",
            "Datagrams received on balancer.token_announcements_listen",
            datagrams,
        );
        let refused: Family<Labels, Counter> = Family::default();
        for r in crate::announcement::Refusal::ALL {
            refused
                .get_or_create(&labels(&[("reason", r.label())]))
                .inc_by(t.refused.get(r.label()).copied().unwrap_or(0));
        }
        reg.register(
            "token_announcements_refused",
            "Announcement datagrams not believed, per reason",
            refused,
        );
        let entries: Family<Labels, Counter> = Family::default();
        for o in crate::controller::Announced::ALL {
            entries
                .get_or_create(&labels(&[("outcome", o.label())]))
                .inc_by(t.entries.get(o.label()).copied().unwrap_or(0));
        }
        reg.register(
            "token_announcement_entries",
            "Tokens in accepted announcements, per outcome",
            entries,
        );
        let agent_datagrams: Family<Labels, Counter> = Family::default();
        let agent_lag: Family<Labels, Gauge> = Family::default();
        let agent_age: Family<Labels, Gauge> = Family::default();
        let now = crate::controller::unix_ns() / 1_000_000;
        for g in &t.agents {
            let backend = g.backend.to_string();
            let l = labels(&[("backend", &backend)]);
            agent_datagrams.get_or_create(&l).inc_by(g.datagrams);
            agent_lag.get_or_create(&l).set(g.last_lag_ms);
            agent_age
                .get_or_create(&l)
                .set(now.saturating_sub(g.last_unix_ms) as i64);
        }
        reg.register(
            "token_agent_datagrams",
            "Accepted announcement datagrams per backend agent",
            agent_datagrams,
        );
        reg.register(
            "token_agent_lag_milliseconds",
            "Receive time minus the agent's send time, last datagram (clocks' offset included)",
            agent_lag,
        );
        reg.register(
            "token_agent_silence_milliseconds",
            "Time since the agent's last accepted datagram (it sends a listing every --snapshot-secs)",
            agent_age,
        );
    }

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

/// Connections the metrics endpoint serves at once; more are closed on accept, so that
/// idle or slow clients hold at most this many of the daemon's file descriptors.
pub const MAX_CONNECTIONS: usize = 16;
/// A client must send its request head within this, and a connection lives at most
/// [`CONNECTION_LIFETIME`] (keep-alive included), so a held slot frees itself.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// What the endpoint itself counts.
#[derive(Default)]
pub struct HttpStats {
    pub refused: AtomicU64,
}

/// Serves `GET /metrics` on `l` with the body `render` returns, until the task is
/// dropped. Other paths get 404, other methods 405; at most [`MAX_CONNECTIONS`] at once.
pub async fn serve<F, Fut>(l: tokio::net::TcpListener, stats: Arc<HttpStats>, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<String>> + Send,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut last_warning = None::<std::time::Instant>;
    loop {
        let stream = match l.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors (or memory): the pending connection stays in
                // the backlog and accept would fail again at once, so wait instead of
                // spinning, and say so now and then.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed; retrying in 100 ms");
                    last_warning = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(req, render).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

async fn answer<F, Fut>(req: Request<Incoming>, render: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<String>>,
{
    let (status, body) = if req.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_string(),
        )
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_string())
    } else {
        match render().await {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
    }
    resp
}

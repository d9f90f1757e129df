//! Prometheus metrics, built from the maps at each scrape (per-CPU counters summed).

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

/// The text exposition of everything the daemon knows.
pub fn render(ctl: &Controller) -> anyhow::Result<String> {
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
    conns.set(ctl.dp.conn_entries() as i64);
    reg.register(
        "conn_table_entries",
        "Entries in the connection table",
        conns,
    );
    let conns_cap: Gauge = Gauge::default();
    conns_cap.set(i64::from(ctl.dp.sizes.conn_entries));
    reg.register(
        "conn_table_capacity",
        "Capacity of the connection table (LRU)",
        conns_cap,
    );
    let tokens: Gauge = Gauge::default();
    tokens.set(ctl.dp.token_entries() as i64);
    reg.register("token_table_entries", "Learned MPTCP tokens", tokens);
    let tokens_cap: Gauge = Gauge::default();
    tokens_cap.set(i64::from(ctl.dp.sizes.token_entries));
    reg.register(
        "token_table_capacity",
        "Capacity of the token table (LRU)",
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

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

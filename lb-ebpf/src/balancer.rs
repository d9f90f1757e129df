//! The balancer's decision: which packets are ours, which backend gets them.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    counters::Counter,
    hash::{client_hash, flow_hash, hash_u32},
    maps::*,
    mptcp::MptcpOption,
    packet::*,
};

use crate::{
    encap,
    maps::{
        BACKEND_STATS, BACKENDS, CONFIG, CONN_RATE, MAGLEV, SERVICE_STATS, add_traffic,
        conn_insert, conn_ptr, count, vip_lookup,
    },
    mptcp,
    parse::{self, Packet},
};

/// IPv6 next-header values that are extension headers (RFC 8200 and IANA).
#[inline(always)]
fn is_ipv6_ext(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

#[inline(always)]
fn family(pkt: &Packet) -> u8 {
    if pkt.ipv6 { FAMILY_V6 } else { FAMILY_V4 }
}

/// A packet to a VIP address that has no port we can balance on: fragments, IPv6
/// extension headers, truncated transport headers, ICMP. Not guessed at, except ICMP
/// that quotes a VIP flow's packet, which goes to that flow's backend ([`crate::icmp`]).
#[inline(always)]
fn not_balanceable(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let marker = VipKey {
        addr: pkt.dst,
        port: 0,
        proto: 0,
        family: family(pkt),
    };
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if vip_lookup(cfg, &marker).is_none() {
        count(Counter::PassNonVip);
        return xdp_action::XDP_PASS;
    }
    let reason = if pkt.fragment {
        Counter::DropFragment
    } else if pkt.l4_truncated {
        Counter::DropTruncated
    } else if pkt.ipv6 && is_ipv6_ext(pkt.proto) {
        Counter::DropIpv6Ext
    } else {
        if (pkt.proto == IPPROTO_ICMP || pkt.proto == IPPROTO_ICMPV6)
            && cfg.ring_size != 0
            && let Some(verdict) =
                crate::icmp::to_backend(ctx, pkt, cfg, ctx.data_end() - ctx.data())
        {
            return verdict;
        }
        count(Counter::PassVipOtherProto);
        return xdp_action::XDP_PASS;
    };
    count(reason);
    xdp_action::XDP_DROP
}

/// Maglev: the backend id for `hash` in `service`'s ring, 0 when there is none.
#[inline(always)]
pub fn maglev_pick(cfg: &Config, service: u32, hash: u32) -> u32 {
    let ring = cfg.ring_size;
    // `cfg` is live map memory: the caller's non-zero check is not proof enough here.
    let Some(slot) = hash.checked_rem(ring) else {
        return 0;
    };
    let index = service.wrapping_mul(ring).wrapping_add(slot);
    match MAGLEV.get(index) {
        Some(id) => *id,
        None => 0,
    }
}

/// Where this CPU stands in window `slot` after counting one more event.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Under,
    /// This event is the first over the limit in the current second.
    JustOver,
    Over,
}

/// Counts one event in this CPU's one-second window `slot` against `limit` (0 = no
/// limit): Katran's flood guard for new flows ([`RATE_NEW_FLOWS`]), the limit on tokens
/// learned ([`RATE_LEARNING`]) and on log records ([`RATE_LOG`]).
#[inline(always)]
pub fn rate(slot: u32, limit: u32) -> Rate {
    if limit == 0 {
        return Rate::Under;
    }
    // SAFETY: plain helper call.
    rate_at(slot, limit, unsafe { bpf_ktime_get_coarse_ns() })
}

/// [`rate`] at time `now` (`bpf_ktime_get_coarse_ns`), for a caller that has read it.
#[inline(always)]
pub fn rate_at(slot: u32, limit: u32, now: u64) -> Rate {
    if limit == 0 {
        return Rate::Under;
    }
    let Some(r) = CONN_RATE.get_ptr_mut(slot) else {
        return Rate::Under;
    };
    // SAFETY: a per-CPU slot; only this CPU touches it while the program runs.
    let r = unsafe { &mut *r };
    if now.wrapping_sub(r.window_start_ns) >= 1_000_000_000 {
        r.window_start_ns = now;
        r.count = 1;
        return Rate::Under;
    }
    r.count += 1;
    if r.count <= limit as u64 {
        Rate::Under
    } else if r.count == limit as u64 + 1 {
        Rate::JustOver
    } else {
        Rate::Over
    }
}

/// True once this CPU has counted more than `limit` events of window `slot` this second;
/// the first time in a second, says so in the log.
#[inline(always)]
pub fn over_rate(ctx: &XdpContext, slot: u32, limit: u32) -> bool {
    if limit == 0 {
        return false;
    }
    // SAFETY: plain helper call.
    over_rate_at(ctx, slot, limit, unsafe { bpf_ktime_get_coarse_ns() })
}

/// [`over_rate`] at time `now` (`bpf_ktime_get_coarse_ns`), for a caller that has read it.
#[inline(always)]
pub fn over_rate_at(ctx: &XdpContext, slot: u32, limit: u32, now: u64) -> bool {
    match rate_at(slot, limit, now) {
        Rate::Under => false,
        Rate::JustOver => {
            if may_log() {
                if slot == RATE_NEW_FLOWS {
                    debug!(
                        ctx,
                        "new-flow limit reached on this CPU: {} a second; more new flows this second are forwarded, not recorded",
                        limit
                    );
                } else {
                    debug!(
                        ctx,
                        "learning limit reached on this CPU: {} a second; more keys this second are not used",
                        limit
                    );
                }
            }
            true
        }
        Rate::Over => true,
    }
}

/// Whether a rare event may be logged now ([`MAX_LOG_RATE`] a second per CPU).
#[inline(always)]
pub fn may_log() -> bool {
    rate(RATE_LOG, MAX_LOG_RATE) == Rate::Under
}

/// A packet to a backend's join port (VIP:P). The service's backends set the C bit
/// (RFC 8684: no joins to the initial address and port) and each announced VIP with a
/// port of its own (ADD_ADDR), so every packet here belongs to that port's backend: the
/// same answer on every node, from the configuration alone, with no table entry. An
/// MP_JOIN SYN opens a subflow (while the backend takes joins: active or draining);
/// any other SYN is not a join and is dropped; later packets follow their subflow.
#[inline(always)]
fn to_join_port(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    vip: &VipInfo,
    cfg: &Config,
    is_syn: bool,
    packet_len: u64,
) -> u32 {
    let backend_id = vip.join_backend();
    let Some(backend) = BACKENDS.get(backend_id).copied() else {
        count(Counter::DropNoBackend);
        return xdp_action::XDP_DROP;
    };
    if is_syn {
        if !matches!(mptcp::option(ctx, pkt), Some(MptcpOption::JoinSyn { .. })) {
            count(Counter::DropJoinPortNotJoin);
            return xdp_action::XDP_DROP;
        }
        if backend.flags & BACKEND_TAKES_JOINS == 0 {
            count(Counter::DropJoinPortBackendOut);
            return xdp_action::XDP_DROP;
        }
        count(Counter::JoinPortRouted);
    } else if backend.flags == 0 {
        count(Counter::DropNoBackend);
        return xdp_action::XDP_DROP;
    }
    add_traffic(&SERVICE_STATS, vip.service, packet_len);
    add_traffic(&BACKEND_STATS, backend_id, packet_len);
    encap::forward(
        ctx, cfg, key, 0, false, backend_id, &backend, pkt.l3_off, pkt.ip_len, pkt.ipv6,
    )
}

/// A SYN's entry for flow `key`: its 5-tuple's entry rewritten in place if the table has
/// one (a retransmitted SYN, a reused port), else a new one. In place costs a lookup,
/// where the LRU's update of an existing key takes a new element and moves it on the
/// lists; for a new 5-tuple the lookup's miss leaves the bucket in cache for the insert.
#[inline(always)]
fn record(key: &FlowKey, conn: Conn) {
    match conn_ptr(key) {
        // SAFETY: a live map value of the connection table.
        Some(p) => unsafe { *p = conn },
        None => conn_insert(key, conn),
    }
}

#[inline(always)]
pub fn balance(ctx: &XdpContext) -> u32 {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(_) => {
            count(Counter::PassMalformed);
            return xdp_action::XDP_PASS;
        }
    };
    if pkt.fragment || pkt.l4_truncated || (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP) {
        return not_balanceable(ctx, &pkt);
    }
    let vip_key = VipKey {
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
        family: family(&pkt),
    };
    // A reference into the map value, not a copy: the program's 512-byte stack is
    // needed by the token derivation.
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let Some(vip) = vip_lookup(cfg, &vip_key) else {
        count(Counter::PassNonVip);
        return xdp_action::XDP_PASS;
    };
    if cfg.ring_size == 0 {
        count(Counter::PassNonVip);
        return xdp_action::XDP_PASS;
    }
    let packet_len = (ctx.data_end() - ctx.data()) as u64;
    if pkt.l3_off + pkt.ip_len as usize > packet_len as usize {
        count(Counter::DropTruncated);
        return xdp_action::XDP_DROP;
    }

    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: family(&pkt),
        _pad: [0; 2],
    };
    let is_syn =
        pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if vip.flags & VIP_JOIN_PORT != 0 {
        return to_join_port(ctx, &pkt, &key, &vip, cfg, is_syn, packet_len);
    }

    let mut backend_id = 0;
    // What a new table entry for this flow records (used when it is not in the table).
    let mut conn_flags = 0;
    let mut conn_token = 0;
    if is_syn {
        // A SYN starts a connection: it is placed now (Maglev, or its token for a join)
        // and replaces whatever the table remembers of its 5-tuple: clients reuse ports,
        // and a new connection must follow the current pool (not a stale entry's
        // draining backend). Katran overwrites it without reading it; here an entry
        // that is there is rewritten in place ([`record`]), which is cheaper.
        count(Counter::ConnNew);
        let option = if cfg.flags & CONFIG_NO_MPTCP == 0 {
            mptcp::option(ctx, &pkt)
        } else {
            None
        };
        match option {
            Some(MptcpOption::Capable {
                version,
                sender_key,
                ..
            }) => {
                count(if version == 0 {
                    Counter::MpCapableSynV0
                } else {
                    Counter::MpCapableSynV1
                });
                conn_flags = CONN_MPTCP;
                // Nothing to learn from the client when its backends announce their
                // tokens (`learn_tokens = "backend"`), or when they set the C bit and
                // announce a join port: a version 1 client never joins this port.
                if vip.flags & VIP_NO_CLIENT_LEARNING != 0
                    || (version == 1 && vip.flags & VIP_STEERS_BY_PORT != 0)
                {
                    conn_flags |= CONN_TOKEN_DONE;
                } else if let Some(k) = sender_key {
                    // A version 0 SYN carries the client's key: the keys that teach the
                    // token must echo it (a third ACK forged without seeing this SYN
                    // cannot).
                    conn_flags |= CONN_KEY_CHECK;
                    conn_token = k as u32;
                }
                // Not a restart of learning for a flow that just learned: its entry and
                // token stay, and the SYN follows them.
                if let Some(id) = mptcp::learned_recently(&key, cfg) {
                    count(Counter::SynOnLearnedFlow);
                    backend_id = id;
                }
            }
            Some(MptcpOption::JoinSyn { token, .. }) => {
                let mut record_join = true;
                match mptcp::owner(ctx, token, vip.service, cfg) {
                    Some(id) => {
                        count(Counter::JoinRouted);
                        backend_id = id;
                    }
                    None if cfg.flags & CONFIG_JOIN_UNKNOWN_HASH != 0 => {
                        count(Counter::JoinUnknownHashed);
                        backend_id = maglev_pick(cfg, vip.service, hash_u32(token, cfg.seed));
                        // Anyone can send these: recorded only under the flood limit.
                        if backend_id != 0 && over_rate(ctx, RATE_NEW_FLOWS, cfg.max_conn_rate) {
                            count(Counter::ConnFloodBypass);
                            record_join = false;
                        }
                    }
                    None => {
                        // The client keeps its other subflows; this one is refused here
                        // rather than reset by a backend that does not know it.
                        count(Counter::JoinUnknownDropped);
                        return xdp_action::XDP_DROP;
                    }
                }
                if backend_id != 0 && record_join {
                    let flags = CONN_MPTCP | CONN_TOKEN_DONE | CONN_JOIN;
                    record(
                        &key,
                        Conn {
                            backend: backend_id,
                            service: vip.service,
                            token,
                            flags,
                        },
                    );
                }
            }
            _ => {}
        }
    } else if let Some(conn) = conn_ptr(&key) {
        // SAFETY: a valid map value pointer; Conn is plain data.
        let c = unsafe { *conn };
        match BACKENDS.get(c.backend) {
            Some(b) if b.flags != 0 => {
                backend_id = c.backend;
                count(Counter::ConnHit);
                if let Some(token) = c.known_token() {
                    // SAFETY: plain helper call; the verifier inlines it as a load.
                    let jiffies = unsafe { bpf_jiffies64() };
                    if c.refresh_due(jiffies) {
                        // SAFETY: conn is the live map value read above.
                        unsafe { (*conn).flags = c.refreshed_flags(jiffies) };
                        mptcp::refresh(token, c.backend, cfg);
                    }
                } else if c.flags & (CONN_MPTCP | CONN_TOKEN_DONE) == CONN_MPTCP
                    && cfg.flags & CONFIG_NO_MPTCP == 0
                {
                    mptcp::learn(ctx, &pkt, cfg, conn);
                }
            }
            _ => count(Counter::ConnRepick),
        }
    } else if pkt.proto == IPPROTO_TCP {
        count(Counter::ConnMissNonSyn);
    } else {
        count(Counter::ConnNew);
    }
    // The flow hash is needed only to place a new flow (Katran's habit too).
    // A plain value and a flag, not an Option: a None's payload is undefined, and LLVM
    // may spill that undefined register, which the verifier refuses (`!read_ok`).
    let mut hash = 0u32;
    let mut hashed = false;
    if backend_id == 0 {
        let h = if vip.flags & VIP_AFFINITY_CLIENT != 0 {
            client_hash(&key, cfg.seed)
        } else {
            flow_hash(&key, cfg.seed)
        };
        hash = h;
        hashed = true;
        backend_id = maglev_pick(cfg, vip.service, h);
        // A new flow over the rate limit is forwarded but not recorded, whatever began
        // it (SYN, MP_CAPABLE SYN, a miss, UDP): floods do not turn the table over, and
        // a real flow is recorded at a later packet, placed by the same Maglev answer.
        if backend_id != 0 && over_rate(ctx, RATE_NEW_FLOWS, cfg.max_conn_rate) {
            count(Counter::ConnFloodBypass);
        } else if backend_id != 0 {
            let conn = Conn {
                backend: backend_id,
                service: vip.service,
                token: conn_token,
                flags: conn_flags,
            };
            if is_syn {
                record(&key, conn);
            } else {
                conn_insert(&key, conn);
            }
        }
    }
    let Some(backend) = BACKENDS.get(backend_id).copied() else {
        count(Counter::DropNoBackend);
        return xdp_action::XDP_DROP;
    };
    if backend_id == 0 || backend.flags == 0 {
        count(Counter::DropNoBackend);
        return xdp_action::XDP_DROP;
    }
    add_traffic(&SERVICE_STATS, vip.service, packet_len);
    add_traffic(&BACKEND_STATS, backend_id, packet_len);
    encap::forward(
        ctx, cfg, &key, hash, hashed, backend_id, &backend, pkt.l3_off, pkt.ip_len, pkt.ipv6,
    )
}

//! Token announcements: what a backend's agent tells every balancer node about its MPTCP
//! connections (token -> this backend, for VIP:port), and how a node decides whether to
//! believe it.
//!
//! A datagram is `[VERSION] || postcard(Announcement) || HMAC-SHA256(key, VERSION || body)`.
//! The key is shared by the fleet's nodes and backends. A node accepts a datagram only if
//! the tag is right, the backend is one of its configured backends and sent it from its
//! own address, the sender's clock is
//! within [`MAX_SKEW_MS`] of its own, and the datagram is not one it accepted before
//! (a window of [`REPLAY_WINDOW`] sequence numbers per agent run, and an agent run older
//! than the newest one seen is refused).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context as _, bail};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The first byte of every datagram: the format's version.
pub const VERSION: u8 = 1;
const TAG_LEN: usize = 32;
/// Largest datagram a node reads.
pub const MAX_DATAGRAM: usize = 1472;
/// Entries per datagram: keeps each one within an Ethernet frame.
pub const MAX_ENTRIES: usize = 32;
/// How far the sender's clock may be from the node's.
pub const MAX_SKEW_MS: u64 = 30_000;
/// Sequence numbers behind the newest that may still arrive (reordered) once each.
pub const REPLAY_WINDOW: u64 = 64;

/// The shared key, at least 32 bytes (trailing whitespace of the file is not part of it).
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl Key {
    pub fn load(path: &Path) -> anyhow::Result<Key> {
        let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let end = raw
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        Key::new(raw[..end].to_vec()).with_context(|| path.display().to_string())
    }

    pub fn new(bytes: Vec<u8>) -> anyhow::Result<Key> {
        if bytes.len() < 32 {
            bail!(
                "the announcement key has {} bytes, at least 32 are needed (e.g. `openssl rand -hex 32 > FILE`)",
                bytes.len()
            );
        }
        Ok(Key(bytes))
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

/// What one backend says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The backend's address as the nodes' configuration has it.
    pub backend: IpAddr,
    /// A random number chosen when the agent starts.
    pub boot: u64,
    /// Counts this run's datagrams from 1.
    pub seq: u64,
    pub sent_unix_ms: u64,
    /// Part of a periodic listing of every live connection (as opposed to news).
    pub snapshot: bool,
    pub entries: Vec<Entry>,
}

/// One connection's token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub token: u32,
    /// MPTCP version (0 or 1).
    pub version: u8,
    /// The VIP and port the connection was made to.
    pub vip: SocketAddr,
    /// false: the connection closed, the token is free.
    pub live: bool,
}

/// Why a datagram was not believed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Not a datagram of this format (too short, other version, undecodable body).
    Malformed,
    /// The tag does not match: forged, or another key.
    BadTag,
    /// From an address no service of this node has as a backend.
    UnknownBackend,
    /// The sender's clock is too far from this node's.
    Stale,
    /// Accepted before (or from an agent run older than the newest seen).
    Replayed,
    /// Not sent from the address of the backend it speaks for.
    WrongSource,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Malformed,
        Refusal::BadTag,
        Refusal::UnknownBackend,
        Refusal::Stale,
        Refusal::Replayed,
        Refusal::WrongSource,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::BadTag => "bad_tag",
            Refusal::UnknownBackend => "unknown_backend",
            Refusal::Stale => "stale",
            Refusal::Replayed => "replayed",
            Refusal::WrongSource => "wrong_source",
        }
    }
}

/// The datagram for `a`.
pub fn seal(key: &Key, a: &Announcement) -> Vec<u8> {
    let mut out = vec![VERSION];
    out.extend(postcard::to_stdvec(a).expect("serializing to memory cannot fail"));
    let mut mac = key.mac();
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

/// The announcement in `datagram`, if its tag is right.
pub fn open(key: &Key, datagram: &[u8]) -> Result<Announcement, Refusal> {
    if datagram.len() < 1 + TAG_LEN || datagram[0] != VERSION {
        return Err(Refusal::Malformed);
    }
    let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
    let mut mac = key.mac();
    mac.update(signed);
    // Constant-time comparison.
    mac.verify_slice(tag).map_err(|_| Refusal::BadTag)?;
    postcard::from_bytes(&signed[1..]).map_err(|_| Refusal::Malformed)
}

#[derive(Clone, Copy, Debug)]
struct Run {
    boot: u64,
    /// The newest accepted sequence number, and which of the REPLAY_WINDOW before it
    /// were accepted (bit k: newest - k).
    newest: u64,
    seen: u64,
    /// The send time of the run's first accepted datagram.
    started_ms: u64,
}

/// What a node remembers of each backend's agent, to refuse replays.
#[derive(Default)]
pub struct ReplayGuard {
    runs: HashMap<IpAddr, Run>,
}

impl ReplayGuard {
    /// Whether `a` (authentic) is fresh at `now_ms`; if so it is remembered.
    pub fn accept(&mut self, a: &Announcement, now_ms: u64) -> Result<(), Refusal> {
        if a.sent_unix_ms.abs_diff(now_ms) > MAX_SKEW_MS || a.seq == 0 {
            return Err(Refusal::Stale);
        }
        let Some(run) = self.runs.get_mut(&a.backend) else {
            self.runs.insert(a.backend, Run::first(a));
            return Ok(());
        };
        if run.boot != a.boot {
            // Another run of the agent: a newer one replaces the old; an older one is a
            // replay of the past.
            if a.sent_unix_ms <= run.started_ms {
                return Err(Refusal::Replayed);
            }
            *run = Run::first(a);
            return Ok(());
        }
        if a.seq > run.newest {
            let shift = a.seq - run.newest;
            run.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                run.seen << shift
            } | 1;
            run.newest = a.seq;
            return Ok(());
        }
        let back = run.newest - a.seq;
        if back >= REPLAY_WINDOW || run.seen & (1 << back) != 0 {
            return Err(Refusal::Replayed);
        }
        run.seen |= 1 << back;
        Ok(())
    }
}

impl Run {
    fn first(a: &Announcement) -> Run {
        Run {
            boot: a.boot,
            newest: a.seq,
            seen: 1,
            started_ms: a.sent_unix_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::new(vec![b; 32]).unwrap()
    }

    fn ann(boot: u64, seq: u64, sent: u64) -> Announcement {
        Announcement {
            backend: "10.0.11.2".parse().unwrap(),
            boot,
            seq,
            sent_unix_ms: sent,
            snapshot: false,
            entries: vec![Entry {
                token: 0x1234_5678,
                version: 1,
                vip: "10.100.0.1:80".parse().unwrap(),
                live: true,
            }],
        }
    }

    #[test]
    fn a_sealed_announcement_opens_with_its_key_only() {
        let a = ann(7, 1, 1000);
        let d = seal(&key(1), &a);
        assert!(d.len() <= MAX_DATAGRAM);
        assert_eq!(open(&key(1), &d), Ok(a));
        assert_eq!(open(&key(2), &d), Err(Refusal::BadTag));
        // Any changed byte (here the token) breaks the tag.
        let mut forged = d.clone();
        let at = forged.len() - TAG_LEN - 5;
        forged[at] ^= 1;
        assert_eq!(open(&key(1), &forged), Err(Refusal::BadTag));
        assert_eq!(open(&key(1), &d[..10]), Err(Refusal::Malformed));
        assert!(Key::new(vec![0; 31]).is_err());
    }

    #[test]
    fn a_full_datagram_fits_a_frame() {
        let mut a = ann(u64::MAX, u64::MAX, u64::MAX);
        let e = Entry {
            token: u32::MAX,
            version: 1,
            vip: "[2001:db8::ffff:ffff]:65535".parse().unwrap(),
            live: true,
        };
        a.backend = "2001:db8::ffff:ffff:ffff".parse().unwrap();
        a.entries = vec![e; MAX_ENTRIES];
        assert!(seal(&key(1), &a).len() <= MAX_DATAGRAM);
    }

    #[test]
    fn replays_are_refused_and_reordering_is_not() {
        let mut g = ReplayGuard::default();
        let t = 1_000_000;
        assert_eq!(g.accept(&ann(7, 1, t), t), Ok(()));
        assert_eq!(g.accept(&ann(7, 1, t), t), Err(Refusal::Replayed));
        assert_eq!(g.accept(&ann(7, 5, t), t), Ok(()));
        // 3 arrives after 5: once.
        assert_eq!(g.accept(&ann(7, 3, t), t), Ok(()));
        assert_eq!(g.accept(&ann(7, 3, t), t), Err(Refusal::Replayed));
        assert_eq!(g.accept(&ann(7, 5 + REPLAY_WINDOW, t), t), Ok(()));
        assert_eq!(g.accept(&ann(7, 4, t), t), Err(Refusal::Replayed));
        // Clocks too far apart.
        assert_eq!(
            g.accept(&ann(7, 1000, t - MAX_SKEW_MS - 1), t),
            Err(Refusal::Stale)
        );
        // A new run of the agent replaces the old one; the old one's datagrams are then
        // refused, however fresh their numbers.
        assert_eq!(g.accept(&ann(8, 1, t + 10), t), Ok(()));
        assert_eq!(g.accept(&ann(7, 2000, t), t), Err(Refusal::Replayed));
        assert_eq!(g.accept(&ann(8, 2, t + 10), t), Ok(()));
    }
}

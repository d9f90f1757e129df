//! The keyed flow hash. The XDP program and the host use this same function, so the
//! host can predict (and tests can check) which backend a flow gets, and every node
//! configured with the same seed makes the same choice.

use crate::maps::FlowKey;

#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The seed mixed with a flow's addresses (both families), the part that a 5-tuple hash
/// and a client-address hash share.
#[inline(always)]
fn mix_addresses(k: &FlowKey, seed: u32) -> u32 {
    let mut h = seed;
    h = mix(h, k.src[0]);
    h = mix(h, k.dst[0]);
    if k.family == crate::maps::FAMILY_V6 {
        h = mix(h, k.src[1]);
        h = mix(h, k.src[2]);
        h = mix(h, k.src[3]);
        h = mix(h, k.dst[1]);
        h = mix(h, k.dst[2]);
        h = mix(h, k.dst[3]);
    }
    h
}

/// MurmurHash3-style keyed hash of a flow's 5-tuple.
#[inline(always)]
pub fn flow_hash(k: &FlowKey, seed: u32) -> u32 {
    let mut h = mix_addresses(k, seed);
    h = mix(h, (k.sport as u32) << 16 | k.dport as u32);
    h = mix(h, k.proto as u32);
    fmix(h)
}

/// A flow's client-address hash: every flow of one client address to one VIP gets the
/// same value, whatever its ports and protocol (client-address affinity).
#[inline(always)]
pub fn client_hash(k: &FlowKey, seed: u32) -> u32 {
    fmix(mix_addresses(k, seed))
}

/// Keyed hash of a 32-bit value (an MPTCP token under the `hash` join policy).
#[inline(always)]
pub fn hash_u32(v: u32, seed: u32) -> u32 {
    fmix(mix(seed, v))
}

/// SipHash-1-3 (the variant Rust's `HashMap` uses against hash flooding) of a 32-bit
/// value under a 128-bit key: who sees outputs, or which values collide, learns nothing
/// useful of the key. The token table's bucket hash.
#[inline(always)]
pub fn siphash13_u32(key: [u64; 2], v: u32) -> u64 {
    sip::<1, 3>(key, v)
}

/// SipHash-c-d of the 4-byte little-endian message `v`.
#[inline(always)]
fn sip<const C: usize, const D: usize>(key: [u64; 2], v: u32) -> u64 {
    let mut s = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    // The last (here the only) block: the message bytes, its length in the top byte.
    let m = (4u64 << 56) | u64::from(v);
    s[3] ^= m;
    let mut i = 0;
    while i < C {
        sip_round(&mut s);
        i += 1;
    }
    s[0] ^= m;
    s[2] ^= 0xff;
    let mut i = 0;
    while i < D {
        sip_round(&mut s);
        i += 1;
    }
    s[0] ^ s[1] ^ s[2] ^ s[3]
}

#[inline(always)]
fn sip_round(s: &mut [u64; 4]) {
    s[0] = s[0].wrapping_add(s[1]);
    s[1] = s[1].rotate_left(13) ^ s[0];
    s[0] = s[0].rotate_left(32);
    s[2] = s[2].wrapping_add(s[3]);
    s[3] = s[3].rotate_left(16) ^ s[2];
    s[0] = s[0].wrapping_add(s[3]);
    s[3] = s[3].rotate_left(21) ^ s[0];
    s[2] = s[2].wrapping_add(s[1]);
    s[1] = s[1].rotate_left(17) ^ s[2];
    s[2] = s[2].rotate_left(32);
}

/// Most low bits of a tunnel's outer source that flow-hash bits may replace.
pub const MAX_VARY_BITS: u32 = 16;

/// A tunnel's outer source (network order): the configured address with its low `bits`
/// (at most [`MAX_VARY_BITS`]) replaced by flow-hash bits, so a backend's NIC, which
/// hashes the outer header, spreads flows over its queues.
#[inline(always)]
pub fn vary_source(addr_be: u32, bits: u32, hash: u32) -> u32 {
    if bits == 0 {
        return addr_be;
    }
    let bits = if bits > MAX_VARY_BITS {
        MAX_VARY_BITS
    } else {
        bits
    };
    let mask = (1u32 << bits) - 1;
    ((u32::from_be(addr_be) & !mask) | (hash & mask)).to_be()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The round function and key schedule are SipHash's: with 2 and 4 rounds they give
    /// what `core`'s (SipHash-2-4) hasher gives for the same key and bytes.
    #[test]
    #[allow(deprecated)]
    fn sip_matches_the_reference_siphash_2_4() {
        use core::hash::Hasher as _;
        for (k0, k1, v) in [
            (0u64, 0u64, 0u32),
            (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908, 0x0302_0100),
            (u64::MAX, 0x1234_5678_9abc_def0, 0xdead_beef),
        ] {
            let mut h = core::hash::SipHasher::new_with_keys(k0, k1);
            h.write(&v.to_le_bytes());
            assert_eq!(sip::<2, 4>([k0, k1], v), h.finish(), "{k0:x} {k1:x} {v:x}");
        }
    }

    #[test]
    fn every_allowed_vary_width_varies_exactly_that_many_bits() {
        let base = u32::from_be_bytes([192, 0, 2, 1]).to_be();
        for bits in 0..=MAX_VARY_BITS {
            let mut seen_low = 0u32;
            let mut kept_high = true;
            for h in [0u32, 0xffff_ffff, 0x1234_5678, 0x8765_4321] {
                let out = u32::from_be(vary_source(base, bits, h));
                let mask = if bits == 0 { 0 } else { (1u32 << bits) - 1 };
                kept_high &= out & !mask == u32::from_be(base) & !mask;
                seen_low |= out ^ u32::from_be(base);
            }
            assert!(kept_high, "{bits} bits: the prefix stays");
            // With hashes of all zeros and all ones, every varied bit flips at least once.
            let mask = if bits == 0 { 0 } else { (1u32 << bits) - 1 };
            assert_eq!(seen_low, mask, "{bits} bits vary");
        }
        // More than allowed is capped, never wrapped around to fewer.
        assert_eq!(
            vary_source(base, 20, 0xffff_ffff),
            vary_source(base, 16, 0xffff_ffff)
        );
    }

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src: [0x0100_000a, 0, 0, 0],
            dst: [0x0200_000a, 0, 0, 0],
            sport,
            dport: 80,
            proto: 6,
            family: 4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn seed_changes_the_hash_and_ports_spread() {
        assert_ne!(flow_hash(&key(1000), 1), flow_hash(&key(1000), 2));
        // 10k source ports into 16 buckets: each within 20% of the mean.
        let mut buckets = [0u32; 16];
        for p in 0..10_000u16 {
            buckets[(flow_hash(&key(p), 7) % 16) as usize] += 1;
        }
        let mean = 10_000 / 16;
        assert!(
            buckets
                .iter()
                .all(|&b| b > mean * 8 / 10 && b < mean * 12 / 10),
            "{buckets:?}"
        );
    }
}

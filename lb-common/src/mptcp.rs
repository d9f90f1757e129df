//! MPTCP (TCP option kind 30) as the balancer needs it: find MP_CAPABLE and MP_JOIN in a
//! TCP option space, and derive a connection's token from a key.
//!
//! The option walk works on a fixed 128-byte buffer (the XDP program copies at most 40
//! option bytes into it; what follows is stale and never read) with every index masked to
//! its first 64 bytes, so it cannot read out of bounds whatever the input, and the
//! verifier sees bounded accesses even where LLVM merges byte reads into wider loads.

/// TCP option kind of MPTCP.
pub const TCPOPT_MPTCP: u8 = 30;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
/// Most option bytes a TCP header can carry (data offset 15).
pub const MAX_OPTION_BYTES: usize = 40;
/// Size of the buffer the parser reads. Indices are masked to [`MASK`] (64 bytes, more
/// than the 40 option bytes); the second half is slack for reads of up to 8 bytes that
/// start below 64, so a merged load is inside the buffer for the verifier too.
pub const OPTION_BUF: usize = 128;
/// Mask applied to every index into the option buffer.
pub const MASK: usize = 63;

const SUBTYPE_CAPABLE: u8 = 0;
const SUBTYPE_JOIN: u8 = 1;

/// What the balancer found in a packet's options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MptcpOption {
    /// MP_CAPABLE. `receiver_key` is the key of the packet's receiver: on a client's
    /// third ACK or first data (lengths 20, 22, 24), the server's key.
    Capable {
        version: u8,
        flags: u8,
        len: u8,
        sender_key: Option<u64>,
        receiver_key: Option<u64>,
    },
    /// MP_JOIN as carried by a SYN (length 12): the receiver's token.
    JoinSyn {
        token: u32,
        addr_id: u8,
        backup: bool,
        nonce: u32,
    },
    /// MP_JOIN of another length (SYN/ACK 16, ACK 24).
    JoinOther { len: u8 },
}

#[inline(always)]
fn be64(buf: &[u8; OPTION_BUF], at: usize) -> u64 {
    let mut v = 0u64;
    let mut k = 0;
    while k < 8 {
        v = (v << 8) | buf[(at + k) & MASK] as u64;
        k += 1;
    }
    v
}

#[inline(always)]
fn be32(buf: &[u8; OPTION_BUF], at: usize) -> u32 {
    (buf[at & MASK] as u32) << 24
        | (buf[(at + 1) & MASK] as u32) << 16
        | (buf[(at + 2) & MASK] as u32) << 8
        | buf[(at + 3) & MASK] as u32
}

#[inline(always)]
fn decode(buf: &[u8; OPTION_BUF], at: usize, len: usize) -> Option<MptcpOption> {
    if len < 3 {
        return None;
    }
    let sub_ver = buf[(at + 2) & MASK];
    let (subtype, version) = (sub_ver >> 4, sub_ver & 0x0f);
    match subtype {
        SUBTYPE_CAPABLE => {
            if len < 4 {
                return None;
            }
            let flags = buf[(at + 3) & MASK];
            let (sender_key, receiver_key) = match len {
                4 => (None, None),
                12 => (Some(be64(buf, at + 4)), None),
                // v1 third ACK (20), first data with data-level length (22), with checksum (24);
                // v0 third ACK (20). Versions above 1 have no token derivation anyone
                // knows: their keys are not used.
                20 | 22 | 24 if version == 1 || (len == 20 && version == 0) => {
                    (Some(be64(buf, at + 4)), Some(be64(buf, at + 12)))
                }
                20 | 22 | 24 if version > 1 => (None, None),
                _ => return None,
            };
            Some(MptcpOption::Capable {
                version,
                flags,
                len: len as u8,
                sender_key,
                receiver_key,
            })
        }
        SUBTYPE_JOIN => {
            if len == 12 {
                Some(MptcpOption::JoinSyn {
                    token: be32(buf, at + 4),
                    addr_id: buf[(at + 3) & MASK],
                    backup: sub_ver & 0x01 != 0,
                    nonce: be32(buf, at + 8),
                })
            } else {
                Some(MptcpOption::JoinOther { len: len as u8 })
            }
        }
        _ => None,
    }
}

/// Walks `len` option bytes in `buf` (a TCP header's bytes after the fixed 20) and
/// returns the first MP_CAPABLE or MP_JOIN. Stops at EOL, at an option shorter than two
/// bytes, or one that runs past `len`; never reads past the buffer.
#[inline(always)]
pub fn find(buf: &[u8; OPTION_BUF], len: usize) -> Option<MptcpOption> {
    let len = if len > MAX_OPTION_BYTES {
        MAX_OPTION_BYTES
    } else {
        len
    };
    let mut i = 0usize;
    let mut steps = 0;
    // At most one step per option byte: the bound the verifier needs.
    while steps < MAX_OPTION_BYTES {
        steps += 1;
        // Masking lets the verifier merge states (see ../shared/PLATFORM.md).
        i &= core::hint::black_box(MASK);
        if i >= len {
            return None;
        }
        let kind = buf[i & MASK];
        if kind == TCPOPT_EOL {
            return None;
        }
        if kind == TCPOPT_NOP {
            i += 1;
            continue;
        }
        if i + 1 >= len {
            return None;
        }
        let olen = buf[(i + 1) & MASK] as usize;
        if olen < 2 || i + olen > len {
            return None;
        }
        if kind == TCPOPT_MPTCP {
            return decode(buf, i, olen);
        }
        i += olen;
    }
    None
}

// ---- token derivation: one block of SHA-256 / SHA-1 over the 8-byte key ----

const K256: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];
const H256: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The message block of an 8-byte message: key, the 0x80 pad byte, zeros, bit length 64.
#[inline(always)]
fn block(key: u64) -> [u32; 16] {
    let mut w = [0u32; 16];
    w[0] = (key >> 32) as u32;
    w[1] = key as u32;
    w[2] = 0x8000_0000;
    w[15] = 64;
    w
}

/// Most significant 32 bits of SHA-256 over the key taken big-endian: the MPTCP v1 token
/// (RFC 8684 section 3.2).
#[inline(always)]
pub fn token_v1(key: u64) -> u32 {
    sha256_block(key)[0]
}

/// [`token_v1`] with the message schedule kept in `window` (its contents on entry do
/// not matter): the XDP program passes per-CPU map memory, to spare its 512-byte stack.
#[inline(always)]
pub fn token_v1_in(key: u64, window: &mut [u32; 16]) -> u32 {
    sha256_block_in(key, window)[0]
}

/// `x` in both halves of a 64-bit word: shifting that right by `n` (< 32) leaves
/// `x.rotate_right(n)` in the low half. BPF has no rotate instruction; this way three
/// rotates of one word cost three shifts instead of nine instructions.
#[inline(always)]
fn doubled(x: u32) -> u64 {
    (x as u64) << 32 | x as u64
}

/// Σ0 of SHA-256 (rotations 2, 13, 22).
#[inline(always)]
fn big_sigma0(x: u32) -> u32 {
    let d = doubled(x);
    ((d >> 2) ^ (d >> 13) ^ (d >> 22)) as u32
}

/// Σ1 (rotations 6, 11, 25).
#[inline(always)]
fn big_sigma1(x: u32) -> u32 {
    let d = doubled(x);
    ((d >> 6) ^ (d >> 11) ^ (d >> 25)) as u32
}

/// σ0 of the message schedule (rotations 7, 18, shift 3).
#[inline(always)]
fn small_sigma0(x: u32) -> u32 {
    let d = doubled(x);
    ((d >> 7) ^ (d >> 18)) as u32 ^ (x >> 3)
}

/// σ1 (rotations 17, 19, shift 10).
#[inline(always)]
fn small_sigma1(x: u32) -> u32 {
    let d = doubled(x);
    ((d >> 17) ^ (d >> 19)) as u32 ^ (x >> 10)
}

/// Schedule window access that stays a memory access. Left to itself LLVM keeps all 16
/// words in registers; BPF has ten, and the spills overflow its 512-byte stack.
#[inline(always)]
fn word(w: &[u32; 16], j: usize) -> u32 {
    // SAFETY: a reference to an element is valid for reading.
    unsafe { core::ptr::read_volatile(&w[j]) }
}

#[inline(always)]
fn set_word(w: &mut [u32; 16], j: usize, v: u32) {
    // SAFETY: a reference to an element is valid for writing.
    unsafe { core::ptr::write_volatile(&mut w[j], v) }
}

/// One round, the state passed by name: eight calls with the names rotated are eight
/// rounds without moving the state between registers. `$kw` is K[t] + W[t].
macro_rules! round256 {
    ($a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident, $kw:expr) => {
        let t1 = $h
            .wrapping_add(big_sigma1($e))
            .wrapping_add($g ^ ($e & ($f ^ $g)))
            .wrapping_add($kw);
        let t2 = big_sigma0($a).wrapping_add(($a & $b) | ($c & ($a | $b)));
        $d = $d.wrapping_add(t1);
        $h = t1.wrapping_add(t2);
    };
}

/// Schedule word `k` as step `j` of block `i` (`i` >= 1) finds it in the rolling window:
/// in block 1, a word not yet overwritten is one of the padded block's, known in advance
/// except the key's two (which `sha256_block_in` stores), so the compiler folds it.
/// `i`, `j` and `k` are constants wherever this is called.
#[inline(always)]
fn window_word(w: &[u32; 16], m: &[u32; 16], i: usize, j: usize, k: usize) -> u32 {
    if i == 1 && k >= j && k >= 2 {
        m[k]
    } else {
        word(w, k)
    }
}

/// Round `16 * $i + $j` (`$i` >= 1): the next schedule word into the rolling window,
/// then the round. `$i` and `$j` are literals, so every window index and round constant
/// is one.
macro_rules! scheduled_round256 {
    ($w:ident, $m:ident, $i:literal, $j:literal, $a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident) => {
        let v = window_word($w, &$m, $i, $j, $j)
            .wrapping_add(small_sigma0(window_word($w, &$m, $i, $j, ($j + 1) & 15)))
            .wrapping_add(window_word($w, &$m, $i, $j, ($j + 9) & 15))
            .wrapping_add(small_sigma1(window_word($w, &$m, $i, $j, ($j + 14) & 15)));
        set_word($w, $j, v);
        round256!(
            $a,
            $b,
            $c,
            $d,
            $e,
            $f,
            $g,
            $h,
            K256[(16 * $i + $j) & 63].wrapping_add(v)
        );
    };
}

/// Rounds `16 * $i` to `16 * $i + 15`.
macro_rules! scheduled_block256 {
    ($w:ident, $m:ident, $i:literal, $a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident) => {
        scheduled_round256!($w, $m, $i, 0, $a, $b, $c, $d, $e, $f, $g, $h);
        scheduled_round256!($w, $m, $i, 1, $h, $a, $b, $c, $d, $e, $f, $g);
        scheduled_round256!($w, $m, $i, 2, $g, $h, $a, $b, $c, $d, $e, $f);
        scheduled_round256!($w, $m, $i, 3, $f, $g, $h, $a, $b, $c, $d, $e);
        scheduled_round256!($w, $m, $i, 4, $e, $f, $g, $h, $a, $b, $c, $d);
        scheduled_round256!($w, $m, $i, 5, $d, $e, $f, $g, $h, $a, $b, $c);
        scheduled_round256!($w, $m, $i, 6, $c, $d, $e, $f, $g, $h, $a, $b);
        scheduled_round256!($w, $m, $i, 7, $b, $c, $d, $e, $f, $g, $h, $a);
        scheduled_round256!($w, $m, $i, 8, $a, $b, $c, $d, $e, $f, $g, $h);
        scheduled_round256!($w, $m, $i, 9, $h, $a, $b, $c, $d, $e, $f, $g);
        scheduled_round256!($w, $m, $i, 10, $g, $h, $a, $b, $c, $d, $e, $f);
        scheduled_round256!($w, $m, $i, 11, $f, $g, $h, $a, $b, $c, $d, $e);
        scheduled_round256!($w, $m, $i, 12, $e, $f, $g, $h, $a, $b, $c, $d);
        scheduled_round256!($w, $m, $i, 13, $d, $e, $f, $g, $h, $a, $b, $c);
        scheduled_round256!($w, $m, $i, 14, $c, $d, $e, $f, $g, $h, $a, $b);
        scheduled_round256!($w, $m, $i, 15, $b, $c, $d, $e, $f, $g, $h, $a);
    };
}

/// The whole SHA-256 digest as eight big-endian words (the token and the IDSN are parts).
///
/// Written for the BPF target as much as for the host: the first 16 rounds use the
/// padded block's known words as constants, the other 48 run unrolled, in three blocks
/// of 16, with a rolling 16-word schedule whose indices are all constants. Unrolled, the
/// round constants are immediates and block 1 folds the padding's zeros: SHA-256 alone
/// takes ~10% less at its fastest (`cargo xtask bench`, min), ~25% at the median, than
/// as a loop over the three blocks. The verifier walks each path that reaches it through
/// the whole straight line (mptcp_lb: 522k of its 1M instructions, the bench's second
/// line).
#[inline(always)]
pub fn sha256_block(key: u64) -> [u32; 8] {
    sha256_block_in(key, &mut [0; 16])
}

/// [`sha256_block`] with the schedule window supplied by the caller.
#[inline(always)]
pub fn sha256_block_in(key: u64, w: &mut [u32; 16]) -> [u32; 8] {
    let m = block(key);
    // Only the key's words are read from the window before they are overwritten; the
    // other words of block 1's schedule are constants (`window_word`).
    set_word(w, 0, m[0]);
    set_word(w, 1, m[1]);
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = H256;
    // Rounds 0-15: W = [key_hi, key_lo, 0x80000000, 0 x 12, 64].
    round256!(a, b, c, d, e, f, g, h, K256[0].wrapping_add(m[0]));
    round256!(h, a, b, c, d, e, f, g, K256[1].wrapping_add(m[1]));
    round256!(g, h, a, b, c, d, e, f, K256[2].wrapping_add(0x8000_0000));
    round256!(f, g, h, a, b, c, d, e, K256[3]);
    round256!(e, f, g, h, a, b, c, d, K256[4]);
    round256!(d, e, f, g, h, a, b, c, K256[5]);
    round256!(c, d, e, f, g, h, a, b, K256[6]);
    round256!(b, c, d, e, f, g, h, a, K256[7]);
    round256!(a, b, c, d, e, f, g, h, K256[8]);
    round256!(h, a, b, c, d, e, f, g, K256[9]);
    round256!(g, h, a, b, c, d, e, f, K256[10]);
    round256!(f, g, h, a, b, c, d, e, K256[11]);
    round256!(e, f, g, h, a, b, c, d, K256[12]);
    round256!(d, e, f, g, h, a, b, c, K256[13]);
    round256!(c, d, e, f, g, h, a, b, K256[14]);
    round256!(b, c, d, e, f, g, h, a, K256[15].wrapping_add(64));
    // Unrolled, so that the round constants are immediates and the first block's
    // schedule folds the padding's zeros. The window stays in memory (`word`), so the
    // state is all LLVM keeps in registers.
    scheduled_block256!(w, m, 1, a, b, c, d, e, f, g, h);
    scheduled_block256!(w, m, 2, a, b, c, d, e, f, g, h);
    scheduled_block256!(w, m, 3, a, b, c, d, e, f, g, h);
    [
        H256[0].wrapping_add(a),
        H256[1].wrapping_add(b),
        H256[2].wrapping_add(c),
        H256[3].wrapping_add(d),
        H256[4].wrapping_add(e),
        H256[5].wrapping_add(f),
        H256[6].wrapping_add(g),
        H256[7].wrapping_add(h),
    ]
}

/// Most significant 32 bits of SHA-1 over the key: the MPTCP v0 token (RFC 6824).
#[inline(always)]
pub fn token_v0(key: u64) -> u32 {
    let mut w = block(key);
    let (mut a, mut b, mut c, mut d, mut e) = (
        0x67452301u32,
        0xefcdab89u32,
        0x98badcfeu32,
        0x10325476u32,
        0xc3d2e1f0u32,
    );
    let mut t = 0usize;
    while t < 80 {
        let wt = if t < 16 {
            w[t & 15]
        } else {
            let v =
                (w[(t + 13) & 15] ^ w[(t + 8) & 15] ^ w[(t + 2) & 15] ^ w[t & 15]).rotate_left(1);
            w[t & 15] = v;
            v
        };
        let (f, k) = if t < 20 {
            ((b & c) | (!b & d), 0x5a827999)
        } else if t < 40 {
            (b ^ c ^ d, 0x6ed9eba1)
        } else if t < 60 {
            ((b & c) | (b & d) | (c & d), 0x8f1bbcdc)
        } else {
            (b ^ c ^ d, 0xca62c1d6)
        };
        let temp = a
            .rotate_left(5)
            .wrapping_add(f)
            .wrapping_add(e)
            .wrapping_add(k)
            .wrapping_add(wt);
        e = d;
        d = c;
        c = b.rotate_left(30);
        b = a;
        a = temp;
        t += 1;
    }
    0x67452301u32.wrapping_add(a)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use sha1::Digest as _;

    use super::*;

    fn buf(bytes: &[u8]) -> [u8; OPTION_BUF] {
        let mut b = [0u8; OPTION_BUF];
        b[..bytes.len()].copy_from_slice(bytes);
        b
    }

    /// A reference walk written differently (slices, no masking) to compare against.
    fn reference(opts: &[u8]) -> Option<MptcpOption> {
        let mut rest = &opts[..opts.len().min(MAX_OPTION_BYTES)];
        loop {
            match rest {
                [] | [0, ..] => return None,
                [1, tail @ ..] => rest = tail,
                [_] => return None,
                [kind, olen, ..] => {
                    let olen = *olen as usize;
                    if olen < 2 || olen > rest.len() {
                        return None;
                    }
                    if *kind == TCPOPT_MPTCP {
                        let mut b = [0u8; OPTION_BUF];
                        b[..olen].copy_from_slice(&rest[..olen]);
                        return decode(&b, 0, olen);
                    }
                    rest = &rest[olen..];
                }
            }
        }
    }

    #[test]
    fn tokens_match_sha2_and_sha1() {
        // The example seen on the wire (../shared/MPTCP.md).
        assert_eq!(token_v1(0x7a9c_3840_1a72_f870), 0x4e4b_2c90);
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d256 = sha2::Sha256::digest(x.to_be_bytes());
            assert_eq!(
                token_v1(x),
                u32::from_be_bytes(d256[..4].try_into().unwrap()),
                "key {x:016x}"
            );
            let full: Vec<u8> = sha256_block(x)
                .iter()
                .flat_map(|w| w.to_be_bytes())
                .collect();
            assert_eq!(full[..], d256[..]);
            let d1 = sha1::Sha1::digest(x.to_be_bytes());
            assert_eq!(
                token_v0(x),
                u32::from_be_bytes(d1[..4].try_into().unwrap()),
                "key {x:016x}"
            );
        }
    }

    #[test]
    fn handshake_options_as_captured() {
        // SYN: MSS, SACK_PERM, TS, NOP, WS, then MP_CAPABLE v1 len 4.
        let syn = [
            2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7, 30, 4, 0x01, 0x01,
        ];
        assert_eq!(
            find(&buf(&syn), syn.len()),
            Some(MptcpOption::Capable {
                version: 1,
                flags: 1,
                len: 4,
                sender_key: None,
                receiver_key: None
            })
        );
        // v0 SYN: len 12 with the client's key.
        let v0 = [1, 1, 30, 12, 0x00, 0x81, 1, 2, 3, 4, 5, 6, 7, 8];
        assert!(matches!(
            find(&buf(&v0), v0.len()),
            Some(MptcpOption::Capable {
                version: 0,
                len: 12,
                sender_key: Some(0x0102030405060708),
                receiver_key: None,
                ..
            })
        ));
        // Third ACK: len 20, both keys; data before the DSS ack: 22 and 24.
        for len in [20u8, 22, 24] {
            let mut o = std::vec![1, 1, 30, len, 0x01, 0x01];
            o.extend_from_slice(&0x1111_2222_3333_4444u64.to_be_bytes());
            o.extend_from_slice(&0x7a9c_3840_1a72_f870u64.to_be_bytes());
            o.resize(2 + len as usize, 0);
            assert_eq!(
                find(&buf(&o), o.len()),
                Some(MptcpOption::Capable {
                    version: 1,
                    flags: 1,
                    len,
                    sender_key: Some(0x1111_2222_3333_4444),
                    receiver_key: Some(0x7a9c_3840_1a72_f870)
                })
            );
        }
        // MP_JOIN SYN, backup bit set, address id 2.
        let join = [
            30, 12, 0x11, 2, 0x4e, 0x4b, 0x2c, 0x90, 0xde, 0xad, 0xbe, 0xef,
        ];
        assert_eq!(
            find(&buf(&join), join.len()),
            Some(MptcpOption::JoinSyn {
                token: 0x4e4b_2c90,
                addr_id: 2,
                backup: true,
                nonce: 0xdead_beef
            })
        );
    }

    #[test]
    fn keys_of_an_unknown_version_are_not_taken() {
        // Versions 2-15 have no known token derivation: a third ACK of theirs is MPTCP,
        // but hands over no key to hash (it used to be hashed as version 1).
        for version in [2u8, 7, 15] {
            let mut o = std::vec![1, 1, 30, 20, version, 0x01];
            o.extend_from_slice(&[0x11; 16]);
            assert!(matches!(
                find(&buf(&o), o.len()),
                Some(MptcpOption::Capable {
                    sender_key: None,
                    receiver_key: None,
                    ..
                })
            ));
        }
        // Version 0 has no 22- or 24-byte form.
        let mut o = std::vec![1, 1, 30, 22, 0x00, 0x01];
        o.extend_from_slice(&[0x11; 18]);
        assert_eq!(find(&buf(&o), o.len()), None);
    }

    #[test]
    fn malformed_option_spaces_find_nothing() {
        let cases: &[&[u8]] = &[
            &[30, 1, 0x01, 0x01],        // length below 2
            &[30, 20, 0x01, 0x01, 1, 2], // runs past the option space
            &[2, 0, 30, 4, 0x01, 0x01],  // zero-length option before it: stop
            &[0, 30, 4, 0x01, 0x01],     // EOL first
            &[2],                        // kind without a length byte
            &[30, 5, 0x01, 0x01, 0],     // MP_CAPABLE of an impossible length
            &[
                30, 22, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ], // v0 has no 22
        ];
        for c in cases {
            assert_eq!(find(&buf(c), c.len()), None, "{c:?}");
        }
        // A declared length beyond the 40 option bytes is cut to 40.
        let mut long = [1u8; OPTION_BUF];
        long[40..44].copy_from_slice(&[30, 4, 0x01, 0x01]);
        assert_eq!(find(&long, 60), None);
    }

    #[test]
    fn random_option_spaces_agree_with_the_reference_walk() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut found = 0;
        for _ in 0..300_000 {
            let len = (next() % 45) as usize;
            let mut b = [0u8; OPTION_BUF];
            for byte in b.iter_mut().take(len) {
                // Bias towards the interesting kinds and small lengths.
                *byte = match next() % 8 {
                    0 => 30,
                    1 => 1,
                    2 => (next() % 26) as u8,
                    3 => 0x01,
                    _ => next() as u8,
                };
            }
            // The XDP program's buffer holds an earlier packet's bytes past `len`.
            for byte in b.iter_mut().skip(len) {
                *byte = next() as u8;
            }
            let got = find(&b, len);
            assert_eq!(got, reference(&b[..len.min(OPTION_BUF)]), "{:?}", &b[..len]);
            found += usize::from(got.is_some());
        }
        assert!(
            found > 1000,
            "the generator must reach MPTCP options ({found})"
        );
    }
}

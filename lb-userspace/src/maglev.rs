//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights.
//!
//! Each backend walks its own permutation of the ring, derived from its stable key (its
//! address) alone, so every node builds the same table from the same backend set, and
//! removing a backend moves its own slots and very few others.

/// A backend as the table sees it: `id` goes into the slots; `key` fixes its permutation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: u32,
    pub key: String,
    pub weight: u32,
}

/// FNV-1a, 64-bit: stable across builds and hosts (std's hasher is not).
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV mixes the last byte weakly; finish with a 64-bit avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

/// Builds the lookup table: `ring_size` slots, each holding a member id (0 where there is
/// no member with a non-zero weight). `ring_size` must be prime.
pub fn build(members: &[Member], ring_size: u32) -> Vec<u32> {
    assert!(
        is_prime(ring_size),
        "Maglev ring size {ring_size} is not prime"
    );
    let m = u64::from(ring_size);
    let mut sorted: Vec<&Member> = members.iter().filter(|b| b.weight > 0).collect();
    // Same order on every node, whatever order the configuration lists them in.
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut table = vec![0u32; ring_size as usize];
    if sorted.is_empty() {
        return table;
    }
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|b| {
            let offset = fnv1a(b.key.as_bytes(), 0x6d61_676c) % m;
            let skip = fnv1a(b.key.as_bytes(), 0x6576_7621) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; sorted.len()];
    let mut filled = 0u64;
    loop {
        for (i, b) in sorted.iter().enumerate() {
            // A weight-w backend claims w slots per round: shares are proportional.
            for _ in 0..b.weight {
                let (offset, skip) = perms[i];
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if table[slot] == 0 {
                        table[slot] = b.id;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    return table;
                }
            }
        }
    }
}

/// Slots whose backend differs between two tables: what the controller rewrites.
pub fn delta(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    new.iter()
        .enumerate()
        .filter(|&(i, id)| old.get(i) != Some(id))
        .map(|(i, id)| (i as u32, *id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u32) -> Vec<Member> {
        (1..=n)
            .map(|i| Member {
                id: i,
                key: format!("10.1.0.{i}"),
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[u32], id: u32) -> usize {
        table.iter().filter(|&&x| x == id).count()
    }

    #[test]
    fn equal_weights_balance_within_one_percent() {
        for n in [2, 3, 5, 10, 64] {
            let t = build(&members(n), 65537);
            let mean = 65537.0 / f64::from(n);
            for id in 1..=n {
                let s = shares(&t, id) as f64;
                assert!(
                    (s - mean).abs() / mean <= 0.01,
                    "n={n} backend {id}: {s} slots, mean {mean}"
                );
            }
        }
    }

    #[test]
    fn weights_are_proportional() {
        let mut m = members(3);
        m[0].weight = 2;
        m[2].weight = 3;
        let t = build(&m, 65537);
        let unit = 65537.0 / 6.0;
        for (id, w) in [(1, 2.0), (2, 1.0), (3, 3.0)] {
            let s = shares(&t, id) as f64;
            assert!(
                (s - w * unit).abs() / (w * unit) <= 0.01,
                "backend {id}: {s} slots for weight {w}"
            );
        }
    }

    #[test]
    fn removing_one_backend_moves_almost_only_its_slots() {
        for n in [3, 4, 10] {
            let all = members(n);
            let before = build(&all, 65537);
            let removed = 2;
            let kept: Vec<Member> = all.iter().filter(|b| b.id != removed).cloned().collect();
            let after = build(&kept, 65537);
            assert_eq!(shares(&after, removed), 0);
            let others = before.iter().filter(|&&x| x != removed).count();
            let moved = before
                .iter()
                .zip(&after)
                .filter(|&(b, a)| *b != removed && a != b)
                .count();
            assert!(
                moved as f64 <= 0.01 * others as f64,
                "n={n}: {moved} of {others} slots of kept backends moved"
            );
        }
    }

    #[test]
    fn same_table_whatever_the_configuration_order() {
        let mut m = members(5);
        let a = build(&m, 65537);
        m.reverse();
        assert_eq!(a, build(&m, 65537));
    }

    #[test]
    fn no_members_leaves_every_slot_empty_and_delta_lists_changes() {
        let empty = build(&[], 7);
        assert!(empty.iter().all(|&x| x == 0));
        let one = build(&members(1), 7);
        assert!(one.iter().all(|&x| x == 1));
        assert_eq!(delta(&empty, &one).len(), 7);
        assert!(delta(&one, &one).is_empty());
        assert!(is_prime(65537) && !is_prime(65536) && !is_prime(1));
    }
}

//! Backend selection: which eligible backend gets a new connection or flow. Pure.

use std::net::IpAddr;

use super::Algorithm;

/// What the balancer knows about one eligible (running, not unhealthy) backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate<'a> {
    /// Stable identity of the backend (its VM id): the `source` hash is taken over it, so a
    /// client keeps its backend while the set of other backends changes.
    pub key: &'a str,
    /// Connections (TCP) or flows (UDP) open to it now.
    pub open: usize,
}

/// Picks the index in `candidates` of the backend for a new connection from `client`.
///
/// `turn` is the rule's running counter of picks: `round_robin` takes `turn % len`,
/// `least_connection` breaks ties from `turn` on (so equal backends share new connections
/// in turn), `source` ignores it. `None` when there is no candidate.
pub(crate) fn pick(algorithm: Algorithm, candidates: &[Candidate<'_>], client: IpAddr, turn: usize) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let start = turn % n;
    Some(match algorithm {
        Algorithm::RoundRobin => start,
        Algorithm::LeastConnection => (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&i| candidates[i].open)
            .unwrap_or(start),
        // Rendezvous (highest random weight) hashing: every (client, backend) pair gets a
        // score and the highest wins. Only the clients of a backend that leaves move.
        Algorithm::Source => (0..n)
            .max_by_key(|&i| source_score(client, candidates[i].key))
            .unwrap_or(start),
    })
}

/// The `turn` to use when retrying after the backend at `failed` (picked with `turn`)
/// could not be reached and was removed from the candidates: for `round_robin` the
/// backend after it, for the others the normal choice among the rest.
pub(crate) fn retry_turn(failed: usize) -> usize {
    failed
}

/// A hash of (client IP, backend key) that is stable across runs and releases
/// (FNV-1a, then a splitmix64 finaliser for better spread).
fn source_score(client: IpAddr, key: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    };
    match client.to_canonical() {
        IpAddr::V4(v4) => feed(&v4.octets()),
        IpAddr::V6(v6) => feed(&v6.octets()),
    }
    feed(&[0xff]);
    feed(key.as_bytes());
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn cands<'a>(keys: &[&'a str], open: &[usize]) -> Vec<Candidate<'a>> {
        keys.iter()
            .zip(open)
            .map(|(k, o)| Candidate { key: k, open: *o })
            .collect()
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
    }

    #[test]
    fn no_candidates_no_pick() {
        for alg in [Algorithm::RoundRobin, Algorithm::LeastConnection, Algorithm::Source] {
            assert_eq!(pick(alg, &[], ip(1), 7), None);
        }
    }

    #[test]
    fn round_robin_takes_turns() {
        let c = cands(&["a", "b", "c"], &[5, 0, 0]);
        let picks: Vec<_> = (0..6)
            .map(|t| pick(Algorithm::RoundRobin, &c, ip(1), t).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_connection_picks_fewest_and_rotates_ties() {
        let c = cands(&["a", "b", "c"], &[3, 1, 2]);
        for t in 0..5 {
            assert_eq!(pick(Algorithm::LeastConnection, &c, ip(1), t), Some(1));
        }
        let c = cands(&["a", "b", "c"], &[1, 0, 0]);
        assert_eq!(pick(Algorithm::LeastConnection, &c, ip(1), 0), Some(1));
        assert_eq!(pick(Algorithm::LeastConnection, &c, ip(1), 2), Some(2));
        assert_eq!(pick(Algorithm::LeastConnection, &c, ip(1), 3), Some(1));
    }

    #[test]
    fn source_is_sticky_and_spreads() {
        let c = cands(&["vm-a", "vm-b", "vm-c"], &[0, 0, 0]);
        let mut per_backend = [0usize; 3];
        for last in 1..=240u8 {
            let first = pick(Algorithm::Source, &c, ip(last), 0).unwrap();
            for turn in 1..5 {
                assert_eq!(pick(Algorithm::Source, &c, ip(last), turn), Some(first));
            }
            per_backend[first] += 1;
        }
        for n in per_backend {
            assert!(n > 40, "uneven spread: {per_backend:?}");
        }
    }

    #[test]
    fn source_moves_only_the_clients_of_a_leaving_backend() {
        let all = cands(&["vm-a", "vm-b", "vm-c"], &[0, 0, 0]);
        let without_b = cands(&["vm-a", "vm-c"], &[0, 0]);
        for last in 1..=200u8 {
            let before = all[pick(Algorithm::Source, &all, ip(last), 0).unwrap()].key;
            let after = without_b[pick(Algorithm::Source, &without_b, ip(last), 0).unwrap()].key;
            if before != "vm-b" {
                assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn source_treats_mapped_v6_as_v4() {
        let c = cands(&["vm-a", "vm-b", "vm-c", "vm-d"], &[0; 4]);
        for last in 1..50u8 {
            let v4 = Ipv4Addr::new(203, 0, 113, last);
            assert_eq!(
                pick(Algorithm::Source, &c, IpAddr::V4(v4), 0),
                pick(Algorithm::Source, &c, IpAddr::V6(v4.to_ipv6_mapped()), 0)
            );
        }
    }

    #[test]
    fn retry_after_round_robin_failure_takes_the_next() {
        let mut c = cands(&["a", "b", "c"], &[0, 0, 0]);
        let failed = pick(Algorithm::RoundRobin, &c, ip(1), 1).unwrap();
        assert_eq!(c[failed].key, "b");
        c.remove(failed);
        let next = pick(Algorithm::RoundRobin, &c, ip(1), retry_turn(failed)).unwrap();
        assert_eq!(c[next].key, "c");
        let mut c = cands(&["a", "b", "c"], &[0, 0, 0]);
        let failed = pick(Algorithm::RoundRobin, &c, ip(1), 2).unwrap();
        c.remove(failed);
        let next = pick(Algorithm::RoundRobin, &c, ip(1), retry_turn(failed)).unwrap();
        assert_eq!(c[next].key, "a");
    }
}

//! Load balancing over a cluster's healthy endpoints: LEAST_REQUEST (power of two choices,
//! weighted by `w / (active + 1)`), ROUND_ROBIN (weighted), RANDOM (weighted), ring hash and
//! Maglev for consistent hashing. Hash tables are cached per endpoint set.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;

use super::{EndpointState, Target};
use crate::compile::policy::LbAlgorithm;

/// Mutable LB state of a cluster.
#[derive(Debug, Default)]
pub struct LbState {
    cursor: AtomicUsize,
    table: Mutex<Option<(u64, Tables)>>,
}

impl LbState {
    /// Forget cached hash tables (endpoints changed).
    pub fn invalidate(&self) {
        *self.table.lock().expect("lb lock") = None;
    }
}

/// A stable 64-bit hash (SipHash with fixed keys: the same key maps the same way in every run).
pub fn hash64(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

fn fingerprint(set: &[Arc<EndpointState>]) -> u64 {
    let mut h = DefaultHasher::new();
    for e in set {
        e.target.hash(&mut h);
        e.weight.hash(&mut h);
    }
    h.finish()
}

/// Pick an endpoint from `set`, avoiding `exclude` when others exist.
pub fn pick(
    state: &LbState,
    algorithm: &LbAlgorithm,
    set: &[Arc<EndpointState>],
    hash: Option<u64>,
    exclude: &[Target],
) -> Option<Arc<EndpointState>> {
    if set.is_empty() {
        return None;
    }
    let filtered: Vec<Arc<EndpointState>>;
    let set = if !exclude.is_empty()
        && set.iter().any(|e| !exclude.contains(&e.target))
        && hash.is_none()
    {
        filtered = set
            .iter()
            .filter(|e| !exclude.contains(&e.target))
            .cloned()
            .collect();
        &filtered[..]
    } else {
        set
    };
    if set.len() == 1 {
        return Some(set[0].clone());
    }
    let mut rng = rand::rng();
    let total: u64 = set.iter().map(|e| e.weight as u64).sum();
    let weighted_random = |rng: &mut rand::rngs::ThreadRng| {
        let mut r = rng.random_range(0..total.max(1));
        for e in set {
            if r < e.weight as u64 {
                return e.clone();
            }
            r -= e.weight as u64;
        }
        set[set.len() - 1].clone()
    };
    match algorithm {
        LbAlgorithm::RoundRobin | LbAlgorithm::Passthrough => {
            let n = state.cursor.fetch_add(1, Ordering::Relaxed) as u64 % total.max(1);
            let mut acc = 0;
            for e in set {
                acc += e.weight as u64;
                if n < acc {
                    return Some(e.clone());
                }
            }
            Some(set[0].clone())
        }
        LbAlgorithm::Random => Some(weighted_random(&mut rng)),
        LbAlgorithm::LeastRequest => {
            let a = weighted_random(&mut rng);
            let b = weighted_random(&mut rng);
            let score = |e: &EndpointState| {
                e.weight as f64 / (e.active_requests.load(Ordering::Relaxed) as f64 + 1.0)
            };
            Some(if score(&b) > score(&a) { b } else { a })
        }
        LbAlgorithm::RingHash { min_ring_size, .. } => {
            let Some(h) = hash else {
                return Some(weighted_random(&mut rng));
            };
            // At least one entry per endpoint whatever the configured size (0 included).
            let ring = tables(state, set, (*min_ring_size).max(1), 0).1;
            let i = ring.partition_point(|(k, _)| *k < h);
            Some(set[ring[if i == ring.len() { 0 } else { i }].1].clone())
        }
        LbAlgorithm::Maglev { table_size, .. } => {
            let Some(h) = hash else {
                return Some(weighted_random(&mut rng));
            };
            let table = tables(state, set, 0, *table_size).0;
            Some(set[table[(h % table.len() as u64) as usize]].clone())
        }
    }
}

type Tables = (Arc<Vec<usize>>, Arc<Vec<(u64, usize)>>);

/// Build (or reuse) the Maglev table and the hash ring for this endpoint set.
fn tables(state: &LbState, set: &[Arc<EndpointState>], min_ring: u64, maglev_size: u64) -> Tables {
    let fp = fingerprint(set) ^ min_ring ^ (maglev_size << 20);
    let mut guard = state.table.lock().expect("lb lock");
    if let Some((f, t)) = guard.as_ref()
        && *f == fp
    {
        return t.clone();
    }
    let mut ring = Vec::new();
    if min_ring > 0 {
        let total: u64 = set.iter().map(|e| e.weight as u64).sum::<u64>().max(1);
        let size = min_ring.max(set.len() as u64);
        for (i, e) in set.iter().enumerate() {
            let n = (size * e.weight as u64).div_ceil(total).max(1);
            for k in 0..n {
                ring.push((hash64((e.target.to_string(), k)), i));
            }
        }
        ring.sort_unstable();
    }
    let mut maglev = Vec::new();
    if maglev_size > 0 {
        // Maglev population (Eisenbud et al. 2016): each backend walks its permutation and
        // claims the next free slot, round by round.
        let m = maglev_size as usize;
        let perms: Vec<(usize, usize)> = set
            .iter()
            .map(|e| {
                let name = e.target.to_string();
                (
                    (hash64((&name, 0u8)) % m as u64) as usize,
                    (hash64((&name, 1u8)) % (m as u64 - 1)) as usize + 1,
                )
            })
            .collect();
        let mut next = vec![0usize; set.len()];
        maglev = vec![usize::MAX; m];
        let mut filled = 0;
        'outer: loop {
            for i in 0..set.len() {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while maglev[c] != usize::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                maglev[c] = i;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'outer;
                }
            }
        }
    }
    let t = (Arc::new(maglev), Arc::new(ring));
    *guard = Some((fp, t.clone()));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Arc<EndpointState>> {
        (0..n)
            .map(|i| {
                Arc::new(EndpointState::new(
                    Target::Addr(format!("127.0.0.1:{}", 1000 + i).parse().unwrap()),
                    1,
                    Default::default(),
                ))
            })
            .collect()
    }

    #[test]
    fn consistent_hash_is_stable_and_spreads() {
        for alg in [
            LbAlgorithm::RingHash {
                key: crate::compile::policy::HashKey::SourceIp,
                min_ring_size: 1024,
            },
            LbAlgorithm::Maglev {
                key: crate::compile::policy::HashKey::SourceIp,
                table_size: 65537,
            },
        ] {
            let set = eps(4);
            let st = LbState::default();
            let mut seen = std::collections::HashSet::new();
            for k in 0..200u64 {
                let h = hash64(k);
                let a = pick(&st, &alg, &set, Some(h), &[]).unwrap();
                let b = pick(&st, &alg, &set, Some(h), &[]).unwrap();
                assert_eq!(a.target, b.target);
                seen.insert(a.target.clone());
            }
            assert_eq!(seen.len(), 4, "{alg:?} uses every endpoint");
        }
    }

    #[test]
    fn round_robin_honours_weights() {
        let set: Vec<_> = [3u32, 1]
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(EndpointState::new(
                    Target::Addr(format!("127.0.0.1:{}", 1000 + i).parse().unwrap()),
                    *w,
                    Default::default(),
                ))
            })
            .collect();
        let st = LbState::default();
        let mut first = 0;
        for _ in 0..400 {
            if pick(&st, &LbAlgorithm::RoundRobin, &set, None, &[])
                .unwrap()
                .target
                == set[0].target
            {
                first += 1;
            }
        }
        assert_eq!(first, 300);
    }

    #[test]
    fn exclusion_prefers_other_hosts() {
        let set = eps(2);
        let st = LbState::default();
        for _ in 0..50 {
            let e = pick(
                &st,
                &LbAlgorithm::Random,
                &set,
                None,
                std::slice::from_ref(&set[0].target),
            )
            .unwrap();
            assert_eq!(e.target, set[1].target);
        }
    }
}

//! Locality-weighted load balancing (ISTIO-API.md §3.3): the node proxy's locality
//! (`--locality region/zone/subzone`, shared by every client on the node) against endpoint
//! localities. Failover priorities apply when the cluster has outlier detection, as in Istio:
//! 0 same region/zone/subzone, 1 same region/zone, 2 same region, 3 elsewhere (4 for regions a
//! `failover` rule does not name). Traffic stays on the best priority while it is healthy
//! enough (Envoy's overprovisioning factor 1.4: all of it while at least ~71% is healthy) and
//! spills over proportionally. `distribute` splits traffic over localities by weight instead.

use std::sync::Arc;

use rand::Rng;

use super::EndpointState;
use crate::config::LocalityLbSetting;

/// Envoy's default overprovisioning factor, percent.
const OVERPROVISIONING: u32 = 140;

fn parts(l: &str) -> [&str; 3] {
    let mut it = l.split('/');
    [
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    ]
}

/// Does locality `l` match a `distribute` pattern (`region/zone/*`, `region/*`, exact)?
fn matches(pattern: &str, l: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => l.starts_with(prefix) || prefix.trim_end_matches('/') == l,
        None => pattern == l,
    }
}

/// Failover priority of an endpoint locality for a client locality.
pub fn priority(client: &str, ep: &str, setting: Option<&LocalityLbSetting>) -> u8 {
    let (c, e) = (parts(client), parts(ep));
    if c[0] != e[0] {
        let failover = setting.map(|s| s.failover.as_slice()).unwrap_or(&[]);
        let named = failover
            .iter()
            .filter(|f| f.from == c[0])
            .any(|f| f.to == e[0]);
        let has_rule = failover.iter().any(|f| f.from == c[0]);
        return if has_rule && !named { 4 } else { 3 };
    }
    if c[1] != e[1] {
        2
    } else if c[2] != e[2] {
        1
    } else {
        0
    }
}

/// The endpoints to balance over, or `None` when locality does not apply.
pub fn select(
    all: &[Arc<EndpointState>],
    healthy: &[Arc<EndpointState>],
    client: &str,
    setting: Option<&LocalityLbSetting>,
    failover_enabled: bool,
) -> Option<Vec<Arc<EndpointState>>> {
    if setting.is_some_and(|s| s.enabled == Some(false)) || all.iter().all(|e| e.locality.is_none())
    {
        return None;
    }
    let loc = |e: &EndpointState| e.locality.clone().unwrap_or_default();
    let mut rng = rand::rng();
    if let Some(rule) = setting.and_then(|s| s.distribute.iter().find(|d| matches(&d.from, client)))
    {
        let total: u32 = rule.to.values().sum();
        if total > 0 {
            let mut r = rng.random_range(0..total);
            for (target, w) in &rule.to {
                if r < *w {
                    let chosen: Vec<_> = healthy
                        .iter()
                        .filter(|e| matches(target, &loc(e)))
                        .cloned()
                        .collect();
                    return (!chosen.is_empty()).then_some(chosen);
                }
                r -= w;
            }
        }
        return None;
    }
    if !failover_enabled {
        return None;
    }
    // Per priority: total and healthy endpoints.
    let mut levels = [(0u32, 0u32); 5];
    for e in all {
        levels[priority(client, &loc(e), setting) as usize].0 += 1;
    }
    for e in healthy {
        levels[priority(client, &loc(e), setting) as usize].1 += 1;
    }
    let mut loads = [0u32; 5];
    let mut left = 100u32;
    for (p, (total, ok)) in levels.iter().enumerate() {
        if *total == 0 || left == 0 {
            continue;
        }
        let load = (ok * OVERPROVISIONING / total).min(left);
        loads[p] = load;
        left -= load;
    }
    let sum: u32 = loads.iter().sum();
    if sum == 0 {
        return None;
    }
    let mut r = rng.random_range(0..sum);
    let p = loads.iter().position(|l| {
        if r < *l {
            true
        } else {
            r -= l;
            false
        }
    })?;
    let chosen: Vec<_> = healthy
        .iter()
        .filter(|e| priority(client, &loc(e), setting) as usize == p)
        .cloned()
        .collect();
    (!chosen.is_empty()).then_some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Target;

    fn ep(port: u16, loc: &str) -> Arc<EndpointState> {
        let mut e = EndpointState::new(
            Target::Addr(format!("127.0.0.1:{port}").parse().unwrap()),
            1,
            Default::default(),
        );
        e.locality = Some(loc.into());
        Arc::new(e)
    }

    #[test]
    fn priorities_follow_istio() {
        assert_eq!(priority("us/a/1", "us/a/1", None), 0);
        assert_eq!(priority("us/a/1", "us/a/2", None), 1);
        assert_eq!(priority("us/a/1", "us/b/1", None), 2);
        assert_eq!(priority("us/a/1", "eu/a/1", None), 3);
        let s: LocalityLbSetting = serde_yaml::from_str("failover: [{from: us, to: eu}]").unwrap();
        assert_eq!(priority("us/a/1", "eu/a/1", Some(&s)), 3);
        assert_eq!(priority("us/a/1", "ap/a/1", Some(&s)), 4);
    }

    #[test]
    fn stays_local_while_healthy_and_spills_when_not() {
        let all = vec![ep(1, "us/a/1"), ep(2, "us/a/1"), ep(3, "us/b/1")];
        for _ in 0..100 {
            let s = select(&all, &all, "us/a/1", None, true).unwrap();
            assert!(s.iter().all(|e| e.locality.as_deref() == Some("us/a/1")));
        }
        // One of two local endpoints ejected: 50% healthy x 1.4 = 70% stays local, 30% spills.
        let healthy = vec![all[1].clone(), all[2].clone()];
        let local = (0..2000)
            .filter(|_| {
                select(&all, &healthy, "us/a/1", None, true).unwrap()[0]
                    .locality
                    .as_deref()
                    == Some("us/a/1")
            })
            .count();
        assert!((1250..1550).contains(&local), "{local}");
    }

    #[test]
    fn distribute_splits_by_weight() {
        let all = vec![ep(1, "us/a/1"), ep(2, "us/b/1")];
        let s: LocalityLbSetting = serde_yaml::from_str(
            "distribute: [{from: \"us/a/*\", to: {\"us/a/*\": 80, \"us/b/*\": 20}}]",
        )
        .unwrap();
        let a = (0..2000)
            .filter(|_| {
                select(&all, &all, "us/a/1", Some(&s), false).unwrap()[0]
                    .locality
                    .as_deref()
                    == Some("us/a/1")
            })
            .count();
        assert!((1500..1700).contains(&a), "{a}");
        assert!(
            select(&all, &all, "eu/x/1", Some(&s), false).is_none(),
            "rule does not apply to other clients"
        );
    }
}

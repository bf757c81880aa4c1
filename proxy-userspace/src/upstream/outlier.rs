//! Outlier detection with Envoy's algorithm (ISTIO-API.md §3.5): consecutive 5xx / gateway /
//! local-origin counters per endpoint, ejection for `base × multiplier` (capped), refused past
//! `maxEjectionPercent`, un-ejection only at an `interval` sweep, and the multiplier decaying for
//! hosts that stay healthy.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{ClusterState, EndpointState};

/// Per-endpoint outlier state.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostOutlier {
    /// Consecutive 5xx (and local-origin failures unless split).
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (and local-origin failures unless split).
    pub consecutive_gateway: u32,
    /// Consecutive local-origin failures (split mode).
    pub consecutive_local: u32,
    /// Ejection multiplier.
    pub multiplier: u32,
    /// Ejected until (set while ejected).
    #[serde(skip)]
    pub ejected_until: Option<Instant>,
    /// When it last came back.
    #[serde(skip)]
    pub returned_at: Option<Instant>,
    /// Times ejected.
    pub ejections: u64,
}

impl HostOutlier {
    fn reset_counters(&mut self) {
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_local = 0;
    }
}

/// The result of one attempt, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// Connect failure, timeout or reset: a local-origin failure.
    LocalFailure,
}

/// Envoy's `max_ejection_time` default: max(300 s, base).
fn max_ejection_time(base: Duration) -> Duration {
    base.max(Duration::from_secs(300))
}

/// Feed one attempt's outcome for `ep`.
pub fn record(cluster: &ClusterState, ep: &EndpointState, outcome: Outcome) {
    let policy = cluster.policy.load();
    let Some(o) = &policy.outlier else { return };
    let mut st = ep.outlier.lock().expect("outlier lock");
    let (is_5xx, is_gateway) = match outcome {
        Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
        Outcome::LocalFailure if o.split_local_origin => {
            st.consecutive_local += 1;
            let trip = o.consecutive_local_origin > 0
                && st.consecutive_local >= o.consecutive_local_origin;
            drop(st);
            if trip {
                eject(cluster, ep);
            }
            return;
        }
        Outcome::LocalFailure => (true, true),
    };
    if matches!(outcome, Outcome::Status(_)) && o.split_local_origin {
        st.consecutive_local = 0;
    }
    if is_5xx {
        st.consecutive_5xx += 1;
    } else {
        st.consecutive_5xx = 0;
    }
    if is_gateway {
        st.consecutive_gateway += 1;
    } else {
        st.consecutive_gateway = 0;
    }
    let trip = (o.consecutive_5xx > 0 && st.consecutive_5xx >= o.consecutive_5xx)
        || (o.consecutive_gateway > 0 && st.consecutive_gateway >= o.consecutive_gateway);
    drop(st);
    if trip {
        eject(cluster, ep);
    }
}

/// Eject `ep` unless it is ejected already or `maxEjectionPercent` forbids it.
fn eject(cluster: &ClusterState, ep: &EndpointState) {
    let policy = cluster.policy.load();
    let Some(o) = &policy.outlier else { return };
    if ep.ejected.load(Ordering::Relaxed) {
        return;
    }
    let all = cluster.endpoints.load();
    let ejected_now = all
        .iter()
        .filter(|e| e.ejected.load(Ordering::Relaxed))
        .count();
    let mut st = ep.outlier.lock().expect("outlier lock");
    st.reset_counters();
    // Envoy >= 1.28: allowed only if (ejected + 1) / total stays within the limit.
    if (ejected_now + 1) * 100 > o.max_ejection_percent as usize * all.len() {
        cluster
            .stats
            .ejections_overflow
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    let base = o.base_ejection_time;
    let max = max_ejection_time(base);
    if base * st.multiplier < max + base {
        st.multiplier += 1;
    }
    st.ejected_until = Some(Instant::now() + (base * st.multiplier).min(max));
    st.ejections += 1;
    ep.ejected.store(true, Ordering::Relaxed);
    cluster
        .stats
        .ejections_enforced_total
        .fetch_add(1, Ordering::Relaxed);
    tracing::warn!(cluster = %cluster.key.name(), endpoint = %ep.target, multiplier = st.multiplier, "outlier ejected");
}

/// Run the interval sweep if it is due: return hosts whose ejection time is up, decay the
/// multiplier of hosts that stayed healthy for an interval.
pub fn maybe_sweep(cluster: &ClusterState, now: Instant) {
    let policy = cluster.policy.load();
    let Some(o) = &policy.outlier else { return };
    {
        let mut last = cluster.last_sweep.lock().expect("sweep lock");
        if now.duration_since(*last) < o.interval {
            return;
        }
        *last = now;
    }
    for ep in cluster.endpoints.load().iter() {
        let mut st = ep.outlier.lock().expect("outlier lock");
        if ep.ejected.load(Ordering::Relaxed) {
            if st.ejected_until.is_some_and(|t| now >= t) {
                ep.ejected.store(false, Ordering::Relaxed);
                st.ejected_until = None;
                st.returned_at = Some(now);
                st.reset_counters();
                tracing::info!(cluster = %cluster.key.name(), endpoint = %ep.target, "outlier returned");
            }
        } else if st.multiplier > 0
            && st
                .returned_at
                .is_none_or(|t| now.duration_since(t) >= o.interval)
        {
            st.multiplier -= 1;
        }
    }
}

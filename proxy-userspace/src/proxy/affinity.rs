//! `--cpu-affinity auto`: one CPU per data-plane runtime.
//!
//! The runtimes float by default, which is what a node shared with pods wants: the scheduler
//! may move a runtime away from a CPU a pod keeps busy. Measured on the benchmark (two cores
//! shared by the load generator, the backend and the proxy), floating runtimes sometimes end up
//! on the same CPU and stay there; that run's keep-alive p99 is then 2–4 ms instead of 1.6–1.7
//! ms. Pinning runtime `i` to the `i`-th CPU the process may use (its cpuset, so a Kubernetes
//! CPU-manager allocation is honoured) rules that placement out. Threads a pinned thread starts
//! later (Tokio's blocking pool) are handed back the process's original CPU set.

use std::io;

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// The CPUs this process may run on, and which runtime goes where.
#[derive(Clone, Debug)]
pub struct CpuPlan {
    original: CpuSet,
    cpus: Vec<usize>,
}

impl CpuPlan {
    /// The plan for the CPUs the calling thread may use now.
    pub fn from_current() -> io::Result<CpuPlan> {
        let original = sched_getaffinity(Pid::from_raw(0)).map_err(io::Error::from)?;
        Ok(CpuPlan::new(original))
    }

    fn new(original: CpuSet) -> CpuPlan {
        let cpus = (0..CpuSet::count())
            .filter(|&c| original.is_set(c).unwrap_or(false))
            .collect();
        CpuPlan { original, cpus }
    }

    /// The CPU of runtime `runtime` (0 is the primary); runtimes wrap around when there are
    /// more of them than CPUs.
    pub fn cpu_for(&self, runtime: usize) -> Option<usize> {
        (!self.cpus.is_empty()).then(|| self.cpus[runtime % self.cpus.len()])
    }

    /// Pin the calling thread to runtime `runtime`'s CPU; returns the CPU.
    pub fn pin_current(&self, runtime: usize) -> io::Result<usize> {
        let cpu = self
            .cpu_for(runtime)
            .ok_or_else(|| io::Error::other("the process may run on no CPU"))?;
        let mut set = CpuSet::new();
        set.set(cpu).map_err(io::Error::from)?;
        sched_setaffinity(Pid::from_raw(0), &set)
            .map_err(|e| io::Error::other(format!("sched_setaffinity(CPU {cpu}): {e}")))?;
        Ok(cpu)
    }

    /// Give the calling thread the process's original CPU set back.
    pub fn unpin_current(&self) {
        if let Err(e) = sched_setaffinity(Pid::from_raw(0), &self.original) {
            tracing::warn!(error = %e, "could not restore the CPU set of a helper thread");
        }
    }

    /// Pin the calling thread as runtime `runtime`, logging the outcome (a refusal leaves the
    /// runtime floating; it still serves).
    pub fn pin_runtime(&self, runtime: usize) {
        match self.pin_current(runtime) {
            Ok(cpu) => tracing::info!(runtime, cpu, "data-plane runtime pinned"),
            Err(e) => {
                tracing::warn!(runtime, error = %e, "data-plane runtime not pinned, left floating")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap())
            .collect()
    }

    #[test]
    fn runtimes_take_the_allowed_cpus_in_order_and_wrap() {
        let mut set = CpuSet::new();
        for c in [1, 3, 6] {
            set.set(c).unwrap();
        }
        let plan = CpuPlan::new(set);
        let got: Vec<_> = (0..5).map(|r| plan.cpu_for(r).unwrap()).collect();
        assert_eq!(got, [1, 3, 6, 1, 3]);
        assert_eq!(CpuPlan::new(CpuSet::new()).cpu_for(0), None);
    }

    #[test]
    fn pin_then_unpin_a_thread() {
        let before = allowed();
        let plan = CpuPlan::from_current().unwrap();
        let last = before.len() - 1;
        let (pinned, restored) = std::thread::spawn(move || {
            let cpu = plan.pin_current(last).unwrap();
            let pinned = (cpu, allowed());
            plan.unpin_current();
            (pinned, allowed())
        })
        .join()
        .unwrap();
        assert_eq!(pinned, (before[last], vec![before[last]]));
        assert_eq!(restored, before);
        // The calling thread was not touched.
        assert_eq!(allowed(), before);
    }
}

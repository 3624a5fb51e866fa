//! Worker threads pinned to CPUs (`server.worker_cpu_affinity`).
//!
//! The workers are thread-per-core: one event loop per CPU, each always busy under load.
//! Left to the scheduler, two of them often end up sharing one CPU while the other CPUs
//! run what they talk to (the load generator, the upstream): each then waits a whole
//! time slice while the other runs, and every request on its connections waits with
//! it. On two shared cores that put a 4.5 ms bump at p98–p99 of a saturated load run,
//! which pinning one worker per CPU removes (README, Performance). nginx offers the same
//! as `worker_cpu_affinity auto`.
//!
//! Pinning is only right when the process has those CPUs to itself, which a worker per
//! allowed CPU says: `workers = 0` on a machine or a dedicated cpuset. Under a CPU quota
//! smaller than the CPUs visible (a container limited to 2 of 64 CPUs), there are fewer
//! workers than CPUs, and the scheduler stays free to move them to idle ones.

use crate::config::CpuAffinity;

/// The CPU each worker is pinned to (worker i to the i-th), or `None` to leave them to
/// the scheduler. `allowed` is the CPUs the process may run on, when known.
pub fn plan(mode: CpuAffinity, workers: usize, allowed: Option<&[usize]>) -> Option<Vec<usize>> {
    match (mode, allowed) {
        (CpuAffinity::Auto, Some(cpus)) if workers > 1 && cpus.len() == workers => {
            Some(cpus.to_vec())
        }
        _ => None,
    }
}

/// The CPUs the calling thread may run on, in ascending order.
#[cfg(target_os = "linux")]
pub fn allowed_cpus() -> Option<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None).ok()?;
    let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect();
    (!cpus.is_empty()).then_some(cpus)
}

#[cfg(not(target_os = "linux"))]
pub fn allowed_cpus() -> Option<Vec<usize>> {
    None
}

/// Pins the calling thread to `cpu`.
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= rustix::thread::CpuSet::MAX_CPU {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
pub fn pin_current_thread(_cpu: usize) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_only_one_worker_per_allowed_cpu() {
        let four = [0, 1, 2, 3];
        assert_eq!(
            plan(CpuAffinity::Auto, 4, Some(&four)),
            Some(vec![0, 1, 2, 3])
        );
        // A cpuset: the CPUs it names, in order.
        assert_eq!(plan(CpuAffinity::Auto, 2, Some(&[5, 9])), Some(vec![5, 9]));
        // Fewer workers than CPUs (a quota, or workers set lower): the scheduler decides.
        assert_eq!(plan(CpuAffinity::Auto, 2, Some(&four)), None);
        // More workers than CPUs: two would share a CPU for good.
        assert_eq!(plan(CpuAffinity::Auto, 8, Some(&four)), None);
        assert_eq!(plan(CpuAffinity::Auto, 1, Some(&[0])), None);
        assert_eq!(plan(CpuAffinity::Auto, 4, None), None);
        assert_eq!(plan(CpuAffinity::Off, 4, Some(&four)), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pinned_thread_runs_on_its_cpu_only() {
        let allowed = allowed_cpus().expect("the affinity of this thread");
        let last = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(last).unwrap();
            allowed_cpus()
        })
        .join()
        .unwrap();
        assert_eq!(seen, Some(vec![last]));
        // The pinning stays with that thread.
        assert_eq!(allowed_cpus(), Some(allowed));
        assert!(pin_current_thread(usize::MAX).is_err());
    }
}

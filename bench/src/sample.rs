//! CPU and thread sampling from /proc.

use std::time::Instant;

/// Clock ticks per second of /proc's counters. Linux exports USER_HZ = 100 on every
/// architecture zring targets.
pub const USER_HZ: f64 = 100.0;

/// System-wide CPU counters: (busy ticks, total ticks).
pub fn system_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// utime + stime of a process (all its threads), in ticks.
pub fn process_ticks(pid: u32) -> u64 {
    let (user, system) = process_user_system_ticks(pid);
    user + system
}

/// utime and stime of a process (all its threads), in ticks: the kernel splits the precise
/// run time by where its ticks landed, so the split is sampled, the sum is not.
pub fn process_user_system_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that closes the command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return (0, 0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (get(11), get(12))
}

/// Threads of a process whose name starts with `prefix`.
pub fn threads_named(pid: u32, prefix: &str) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .map(|c| c.starts_with(prefix))
                .unwrap_or(false)
        })
        .count()
}

/// CPU use over an interval.
#[derive(Debug, Clone, Copy)]
pub struct CpuWindow {
    start: Instant,
    sys: (u64, u64),
    /// The process's (user, system) ticks at the start.
    proc_ticks: Option<(u64, u64)>,
    pid: Option<u32>,
}

/// What a [`CpuWindow`] measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CpuUse {
    /// Busy share of all CPUs, 0..=1.
    pub system_busy: f64,
    /// CPU-seconds per second used by the process (1.0 = one full core).
    pub process_cores: Option<f64>,
    /// The part of `process_cores` spent in user space.
    pub process_user_cores: Option<f64>,
}

impl CpuWindow {
    pub fn start(pid: Option<u32>) -> Self {
        Self {
            start: Instant::now(),
            sys: system_ticks(),
            proc_ticks: pid.map(process_user_system_ticks),
            pid,
        }
    }

    pub fn finish(&self) -> CpuUse {
        let secs = self.start.elapsed().as_secs_f64();
        let (busy, total) = system_ticks();
        let system_busy = if total > self.sys.1 {
            (busy - self.sys.0) as f64 / (total - self.sys.1) as f64
        } else {
            0.0
        };
        let (process_cores, process_user_cores) = match (self.pid, self.proc_ticks) {
            (Some(pid), Some((u0, s0))) => {
                let (u, s) = process_user_system_ticks(pid);
                let cores = |ticks: u64| Some(ticks as f64 / USER_HZ / secs);
                (
                    cores(u.saturating_sub(u0) + s.saturating_sub(s0)),
                    cores(u.saturating_sub(u0)),
                )
            }
            _ => (None, None),
        };
        CpuUse {
            system_busy,
            process_cores,
            process_user_cores,
        }
    }
}

/// Resident set size of a process, MiB (0 when it is gone).
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

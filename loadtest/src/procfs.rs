//! Linux `/proc` readings: resident memory and CPU time of a process.
//!
//! CPU times in `/proc/<pid>/stat` are in clock ticks of `USER_HZ`, which is
//! 100 on every Linux architecture the harness runs on.

use std::fs;

/// `USER_HZ`: the unit of `utime`/`stime` in `/proc/<pid>/stat`.
pub const TICKS_PER_SEC: f64 = 100.0;

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kib(&s, "VmRSS:")
}

fn status_field_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds consumed so far by `pid` (all threads).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    cpu_split(Some(pid)).map(|(u, s)| u + s)
}

/// User + system CPU seconds of this process.
pub fn self_cpu_secs() -> f64 {
    cpu_split(None).map_or(0.0, |(u, s)| u + s)
}

/// User and system CPU seconds of `pid` (`None`: this process), apart.
pub fn cpu_split(pid: Option<u32>) -> Option<(f64, f64)> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    stat_cpu_split(&fs::read_to_string(path).ok()?)
}

fn stat_cpu_split(stat: &str) -> Option<(f64, f64)> {
    // Fields after the command name (which may contain spaces, inside parens).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime as f64 / TICKS_PER_SEC, stime as f64 / TICKS_PER_SEC))
}

/// Pids of processes whose `comm` is exactly `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm"))
                && comm.trim_end() == name
            {
                out.push(pid);
            }
        }
    }
    out.sort_unstable();
    out
}

/// The soft open-files limit of this process.
pub fn open_files_limit() -> Option<u64> {
    let s = fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A CPU-time stopwatch for one process.
#[derive(Clone, Copy, Debug)]
pub struct CpuMeter {
    pid: Option<u32>,
    /// User and system seconds at the start.
    cpu0: (f64, f64),
    t0: std::time::Instant,
}

impl CpuMeter {
    /// Starts measuring `pid` (`None`: this process).
    pub fn start(pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            pid,
            cpu0: cpu_split(pid).unwrap_or((0.0, 0.0)),
            t0: std::time::Instant::now(),
        }
    }

    /// User and system CPU seconds used since start.
    pub fn split_secs(&self) -> Option<(f64, f64)> {
        let (u, s) = cpu_split(self.pid)?;
        Some((u - self.cpu0.0, s - self.cpu0.1))
    }

    /// CPU seconds used since start.
    pub fn cpu_secs(&self) -> Option<f64> {
        self.split_secs().map(|(u, s)| u + s)
    }

    /// Average CPU use since start in percent of one core.
    pub fn percent(&self) -> Option<f64> {
        self.split_percent().map(|(u, s)| u + s)
    }

    /// Average user and system CPU use since start, each in percent of one core.
    pub fn split_percent(&self) -> Option<(f64, f64)> {
        let wall = self.t0.elapsed().as_secs_f64();
        let (u, s) = self.split_secs()?;
        (wall > 0.0).then(|| (100.0 * u / wall, 100.0 * s / wall))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_name() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 10";
        assert_eq!(stat_cpu_split(stat), Some((2.5, 0.5)));
    }

    #[test]
    fn parses_status_rss() {
        let s = "Name:\tx\nVmPeak:\t 100 kB\nVmRSS:\t    4242 kB\n";
        assert_eq!(status_field_kib(s, "VmRSS:"), Some(4242));
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_secs(me).is_some());
        assert!(open_files_limit().unwrap() > 0);
    }
}

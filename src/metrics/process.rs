//! The process's own figures from /proc, read only when `/metrics` is
//! scraped. Linux only: elsewhere (or if /proc is not mounted) each is
//! `None` and its series is left out.

use std::path::Path;

/// Clock ticks per second of /proc's CPU and start times (`USER_HZ`).
/// `sysconf(_SC_CLK_TCK)` needs `unsafe` (this crate forbids it); the value
/// is part of the kernel ABI and 100 on every architecture Linux still
/// supports for userspace.
const USER_HZ: f64 = 100.0;

#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Process {
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

pub(crate) fn read() -> Process {
    let proc_self = Path::new("/proc/self");
    let status = std::fs::read_to_string(proc_self.join("status")).ok();
    let stat = std::fs::read_to_string(proc_self.join("stat")).ok();
    let stat = stat.as_deref().and_then(StatFields::parse);
    let btime = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| boot_time(&s));
    Process {
        resident_bytes: status.as_deref().and_then(|s| status_kb(s, "VmRSS:")),
        virtual_bytes: status.as_deref().and_then(|s| status_kb(s, "VmSize:")),
        cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / USER_HZ),
        // Bounded by the fd limit (see `max_fds`).
        open_fds: std::fs::read_dir(proc_self.join("fd"))
            .ok()
            .map(|d| d.count() as u64),
        max_fds: std::fs::read_to_string(proc_self.join("limits"))
            .ok()
            .and_then(|s| max_open_files(&s)),
        start_time_seconds: match (stat, btime) {
            (Some(s), Some(b)) => Some(b as f64 + s.starttime as f64 / USER_HZ),
            _ => None,
        },
    }
}

/// `VmRSS:    1234 kB` -> bytes.
fn status_kb(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix(field))?;
    let kb: u64 = line.split_whitespace().next()?.parse().ok()?;
    kb.checked_mul(1024)
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct StatFields {
    utime: u64,
    stime: u64,
    starttime: u64,
}

impl StatFields {
    /// /proc/self/stat: fields 14, 15 and 22 (proc(5)), counted after the
    /// command name, which is in parentheses and may hold spaces.
    fn parse(stat: &str) -> Option<StatFields> {
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().take(20).collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(StatFields {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
        })
    }
}

fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// The soft limit in `Max open files  1024  4096  files`.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let status = "Name:\tkvgate\nVmSize:\t  20000 kB\nVmRSS:\t    1234 kB\n";
        assert_eq!(status_kb(status, "VmRSS:"), Some(1234 * 1024));
        assert_eq!(status_kb(status, "VmSize:"), Some(20000 * 1024));
        assert_eq!(status_kb(status, "VmSwap:"), None);
        let stat =
            "42 (kv gate) S 1 42 42 0 -1 4194560 500 0 0 0 250 150 0 0 20 0 9 0 7000 1000 200";
        assert_eq!(
            StatFields::parse(stat),
            Some(StatFields {
                utime: 250,
                stime: 150,
                starttime: 7000
            })
        );
        assert_eq!(StatFields::parse("garbage"), None);
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 4096                 files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let p = read();
        assert!(p.resident_bytes.is_some_and(|b| b > 0), "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        assert!(
            p.max_fds.is_some_and(|n| n >= p.open_fds.unwrap_or(0)),
            "{p:?}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let start = p.start_time_seconds.unwrap_or(0.0);
        assert!(
            start > now - 86_400.0 * 365.0 && start <= now + 1.0,
            "{p:?}"
        );
        assert!(p.cpu_seconds.is_some(), "{p:?}");
    }
}

//! Process memory from `/proc`: finding the proxy's pid and reading its peak RSS.

use std::path::Path;

/// The pid of the process whose command line contains `needle` (e.g. the proxy's unique
/// temp config path). Panics if there is none.
pub fn pid_with_arg(needle: &Path) -> u32 {
    let needle = needle.as_os_str().as_encoded_bytes();
    let entries = std::fs::read_dir("/proc").expect("read /proc");
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|arg| arg == needle) {
            return pid;
        }
    }
    panic!(
        "no process has {} on its command line",
        String::from_utf8_lossy(needle)
    );
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmHWM`, `VmRSS`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Bytes the process read through `read`/`pread` (`rchar` of `/proc/<pid>/io`: files and
/// pipes, not sockets read with `recv`); 0 when it cannot be read.
pub fn read_chars(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("rchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The pid of the process holding the socket that listens on 127.0.0.1:`port` (IPv4), if
/// it can be seen (`/proc/net/tcp`, then `/proc/*/fd`).
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    let inode = tcp.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st ... inode (column 9); 0A = LISTEN
        (cols.get(1) == Some(&local.as_str()) && cols.get(3) == Some(&"0A"))
            .then(|| cols.get(9).map(|s| s.to_string()))
            .flatten()
    })?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

/// User + system CPU time the process used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // `rest` starts at field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks = ticks(11) + ticks(12);
    ticks as f64 / USER_HZ
}

/// `/proc` reports CPU times in USER_HZ ticks, 100 per second on Linux.
const USER_HZ: f64 = 100.0;

/// The machine's cumulative CPU time split from the first line of `/proc/stat`, in ticks:
/// `(total, idle, iowait)`.
pub fn machine_ticks() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let total = (0..8).map(at).sum();
    (total, at(3), at(4))
}

/// Shares of idle and iowait time of the whole machine between two [`machine_ticks`].
pub fn idle_iowait(before: (u64, u64, u64), after: (u64, u64, u64)) -> (f64, f64) {
    let total = after.0.saturating_sub(before.0).max(1) as f64;
    (
        after.1.saturating_sub(before.1) as f64 / total,
        after.2.saturating_sub(before.2) as f64 / total,
    )
}

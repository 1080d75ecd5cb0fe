//! What the kernel reports about a process through /proc: CPU time in clock
//! ticks, resident memory, open file descriptors, and the machine's CPU model.
//! Reading only; which process to measure is the caller's choice.

use std::fs;
use std::io;

/// Clock ticks per second for the utime/stime fields (`getconf CLK_TCK`),
/// 100 on every mainstream Linux build when `getconf` is not available.
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}

/// Counters of a whole process (every thread, living or exited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStat {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Page faults served without I/O: mostly first touches of fresh memory.
    pub minor_faults: u64,
}

/// The counters of process `pid`.
pub fn process_stat(pid: u32) -> io::Result<ProcessStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

/// utime + stime of the calling thread only, in clock ticks.
pub fn thread_cpu_ticks() -> io::Result<u64> {
    Ok(parse_stat(&fs::read_to_string("/proc/thread-self/stat")?)?.cpu_ticks)
}

/// proc(5): the command name (field 2) may hold spaces and parentheses, so
/// fields are counted from the last `)`; minflt is field 10, utime and stime
/// are fields 14 and 15.
fn parse_stat(stat: &str) -> io::Result<ProcessStat> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc stat format");
    let (_, after_name) = stat.rsplit_once(')').ok_or_else(bad)?;
    // After the name the first field is field 3 (state).
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |number: usize| -> io::Result<u64> {
        fields.get(number - 3).and_then(|text| text.parse().ok()).ok_or_else(bad)
    };
    Ok(ProcessStat { cpu_ticks: field(14)? + field(15)?, minor_faults: field(10)? })
}

/// Busy time of the whole machine (all CPUs, every state but idle and
/// iowait), in clock ticks, from the first line of /proc/stat.
pub fn machine_busy_ticks() -> io::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/stat format");
    let line = stat.lines().next().and_then(|line| line.strip_prefix("cpu ")).ok_or_else(bad)?;
    let ticks: Vec<u64> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>().map_err(|_| bad())?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user and nice]
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| ticks.get(i)).sum();
    Ok(busy)
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS line"))
}

/// Number of file descriptors a process holds.
pub fn open_fds(pid: u32) -> io::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The first "model name" of /proc/cpuinfo.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_name_with_parentheses() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 100 1000 10";
        assert_eq!(parse_stat(stat).unwrap(), ProcessStat { cpu_ticks: 10, minor_faults: 100 });
    }
}

//! This process's resources, read from `/proc/self` (the tests that check
//! nothing leaks compare them before and after), and [`ProcessLock`], which
//! lets such a test run alone among the tests of its binary, and
//! [`RestoreLimit`], which puts back a resource limit a test lowered.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Open file descriptors of this process: the entries of `/proc/self/fd`
/// (the directory handle used to list them is counted every time, so it
/// cancels out of a comparison).
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Threads of this process: the entries of `/proc/self/task`.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .count()
}

/// Live threads of this process whose name starts with `prefix`: unlike
/// [`thread_count`], not moved by the test harness starting another test's
/// thread meanwhile.
pub fn threads_named(prefix: &str) -> usize {
    threads_stat(prefix).len()
}

/// The CPUs each live thread of this process whose name starts with
/// `prefix` may run on, as `/proc` lists them (`Cpus_allowed_list`, e.g.
/// "0" or "0-1"), one entry per thread.
pub fn threads_allowed_cpus(prefix: &str) -> Vec<String> {
    threads_allowed_cpus_of("self", prefix)
}

/// [`threads_allowed_cpus`] of another process: `process` is its pid (or
/// "self").
pub fn threads_allowed_cpus_of(process: &str, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let tasks = format!("/proc/{process}/task");
    for task in std::fs::read_dir(&tasks).unwrap_or_else(|e| panic!("read {tasks}: {e}")) {
        let Ok(task) = task else { continue };
        let Ok(name) = std::fs::read_to_string(task.path().join("comm")) else {
            continue; // the thread exited meanwhile
        };
        if name.starts_with(prefix)
            && let Some(list) = cpus_allowed_list(&task.path().join("status"))
        {
            found.push(list);
        }
    }
    found
}

/// The CPUs this process may run on, in increasing order (its
/// `Cpus_allowed_list`, "0-3", "0,2-5", ..., expanded).
pub fn allowed_cpus() -> Vec<usize> {
    let list = cpus_allowed_list(std::path::Path::new("/proc/self/status"))
        .expect("Cpus_allowed_list in /proc/self/status");
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (low, high) = part.split_once('-').unwrap_or((part, part));
        let (low, high): (usize, usize) = (low.parse().unwrap(), high.parse().unwrap());
        cpus.extend(low..=high);
    }
    assert!(!cpus.is_empty(), "no CPU in {list:?}");
    cpus
}

/// The `Cpus_allowed_list` line of a `/proc/.../status` file, trimmed;
/// `None` when the file is gone (its thread exited) or has no such line.
fn cpus_allowed_list(status: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(status)
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map(|list| list.trim().to_string())
}

/// CPU time (user + system, in clock ticks, usually 100 per second) used
/// so far by the live threads of this process whose name starts with
/// `prefix` (names are cut to 15 bytes: `pulse-server-lo` for loops).
pub fn threads_cpu_ticks(prefix: &str) -> u64 {
    threads_stat(prefix)
        .iter()
        .map(|fields| {
            // After the name: utime and stime are fields 14 and 15.
            let field = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            field(11) + field(12)
        })
        .sum()
}

/// Whether any live thread whose name starts with `prefix` is running or
/// waiting for a CPU right now (state `R`). A thread that polls or spins
/// (yielding between looks) stays `R` however busy the machine is; one
/// asleep in `epoll_wait` or on a futex is `S`. So unlike CPU time, which
/// a loaded machine shares out, the share of samples in which a thread is
/// `R` tells polling from sleeping on a noisy machine.
pub fn any_thread_running(prefix: &str) -> bool {
    threads_stat(prefix)
        .iter()
        .any(|fields| fields.first().is_some_and(|state| state == "R"))
}

/// Whether any live thread whose name starts with `prefix` is asleep right
/// now (state `S`: blocked on a futex, a socket, `epoll_wait`).
pub fn any_thread_asleep(prefix: &str) -> bool {
    threads_stat(prefix)
        .iter()
        .any(|fields| fields.first().is_some_and(|state| state == "S"))
}

/// The share of samples, taken every 5 ms for `window`, in which
/// [`any_thread_running`] held.
pub fn share_running(prefix: &str, window: std::time::Duration) -> f64 {
    let end = std::time::Instant::now() + window;
    let (mut samples, mut running) = (0u32, 0u32);
    while samples == 0 || std::time::Instant::now() < end {
        samples += 1;
        running += u32::from(any_thread_running(prefix));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    f64::from(running) / f64::from(samples)
}

/// The fields after the name in `/proc/self/task/*/stat` (state first) of
/// each live thread whose name starts with `prefix`.
fn threads_stat(prefix: &str) -> Vec<Vec<String>> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("read /proc/self/task") {
        let Ok(task) = task else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread exited meanwhile
        };
        // "tid (name) state ...": the name may hold spaces, so split at ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let rest = stat.get(close + 2..).unwrap_or_default();
        threads.push(rest.split(' ').map(str::to_string).collect());
    }
    threads
}

/// Resident set size of this process in KiB (`VmRSS`).
pub fn rss_kib() -> u64 {
    status_kib("VmRSS")
}

/// Peak resident set size since the last reset in KiB (`VmHWM`); resets the
/// peak first when `reset` (by writing 5 to `/proc/self/clear_refs`).
pub fn peak_rss_kib(reset: bool) -> u64 {
    if reset {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
    status_kib("VmHWM")
}

/// Virtual memory of this process in KiB, now (`VmSize`) and at its peak
/// (`VmPeak`, never reset). An allocation counts at once, even before any
/// of its pages is touched (and so resident).
pub fn virtual_kib() -> (u64, u64) {
    (status_kib("VmSize"), status_kib("VmPeak"))
}

/// A `<field>: <n> kB` line of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} line in /proc/self/status"))
}

/// Lets the tests of one binary run in parallel while one that measures the
/// whole process (its fds or its memory) runs alone: every test takes
/// [`ProcessLock::shared`], such a test [`ProcessLock::exclusive`]. A test
/// that panicked while holding it does not fail the others (poisoning is
/// ignored).
pub struct ProcessLock(RwLock<()>);

impl ProcessLock {
    /// An unlocked lock, for a `static`.
    pub const fn new() -> ProcessLock {
        ProcessLock(RwLock::new(()))
    }

    /// Held by a test that may run alongside the others.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Held by a test that must run alone.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What `pick` makes of each row of `/proc/net/tcp` (IPv4 TCP sockets of
/// this network namespace), given the row's first ten fields: `sl
/// local_address rem_address st tx_queue:rx_queue tr:when retrnsmt uid
/// timeout inode`; rows it gives `None` for are left out.
fn tcp_table<T>(mut pick: impl FnMut(&[&str]) -> Option<T>) -> Vec<T> {
    use std::io::BufRead;
    // Read a line at a time into one buffer, not the whole table into one
    // string split into a string per field: with hundreds of sockets that
    // was ~100 KiB and thousands of small blocks per look, and tests that
    // poll it while they measure this process's RSS saw the allocator's
    // heap grow by megabytes from it.
    let file = std::fs::File::open("/proc/net/tcp").expect("open /proc/net/tcp");
    let mut table = std::io::BufReader::with_capacity(16 * 1024, file);
    let mut line = String::new();
    let mut picked = Vec::new();
    let mut header = true;
    loop {
        line.clear();
        if table.read_line(&mut line).expect("read /proc/net/tcp") == 0 {
            return picked;
        }
        if std::mem::take(&mut header) {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().take(10).collect();
        picked.extend(pick(&fields));
    }
}

/// Inodes of the IPv4 TCP sockets this process holds open whose remote
/// port is `port` (the client ends of connections to a local server on
/// it), from `/proc/net/tcp` and `/proc/self/fd`.
pub fn open_sockets_to_port(port: u16) -> Vec<u64> {
    let remote_port = format!(":{port:04X}");
    tcp_table(|fields| {
        let remote = fields.get(2)?;
        let inode = fields.get(9)?.parse::<u64>().ok()?;
        (remote.ends_with(&remote_port) && inode != 0).then_some(inode)
    })
    .into_iter()
    .filter(|&inode| socket_open(inode))
    .collect()
}

/// Bytes received and not yet read on each connected IPv4 TCP socket whose
/// local port is `port` (a local server's ends of its connections), from
/// `/proc/net/tcp`'s `rx_queue`: zero once the server has read everything.
pub fn unread_bytes_on_port(port: u16) -> Vec<u64> {
    let local_port = format!(":{port:04X}");
    tcp_table(|fields| {
        let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
        let rx = queues.split(':').nth(1)?;
        // State 01 is ESTABLISHED.
        (local.ends_with(&local_port) && *state == "01")
            .then(|| u64::from_str_radix(rx, 16).ok())
            .flatten()
    })
}

/// Whether a descriptor of this process refers to the socket `inode`.
pub fn socket_open(inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .any(|target| target.to_str() == Some(wanted.as_str()))
}

/// A resource limit of this process, as it was when [`RestoreLimit::save`]
/// read it, put back when dropped: a test that lowers a limit restores it
/// even when it fails.
pub struct RestoreLimit {
    resource: nix::sys::resource::Resource,
    soft: u64,
    hard: u64,
}

impl RestoreLimit {
    /// Reads `resource`'s limits now, to be restored on drop.
    pub fn save(resource: nix::sys::resource::Resource) -> RestoreLimit {
        let (soft, hard) = nix::sys::resource::getrlimit(resource).expect("getrlimit");
        RestoreLimit {
            resource,
            soft,
            hard,
        }
    }

    /// The hard limit read by [`save`](Self::save) (a test lowering the
    /// soft limit keeps it).
    pub fn hard(&self) -> u64 {
        self.hard
    }
}

impl Drop for RestoreLimit {
    fn drop(&mut self) {
        let _ = nix::sys::resource::setrlimit(self.resource, self.soft, self.hard);
    }
}

//! Pinning an event-loop thread to one CPU (`ConnectionConfig::loop_cpus`).

use std::io;

/// Lets the calling thread run only on `cpu`.
///
/// # Errors
/// The OS error when `cpu` does not exist or is outside the process's CPU
/// set (EINVAL), and `Unsupported` off Linux.
#[cfg(target_os = "linux")]
pub(super) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let to_io = |errno: nix::errno::Errno| io::Error::from_raw_os_error(errno as i32);
    let mut set = CpuSet::new();
    set.set(cpu).map_err(to_io)?;
    // Pid 0: the calling thread.
    sched_setaffinity(Pid::from_raw(0), &set).map_err(to_io)
}

/// Lets the calling thread run only on `cpu` (not supported here).
///
/// # Errors
/// Always `Unsupported`: `ConnectionConfig::validate` refuses `loop_cpus`
/// off Linux, so this is not reached.
#[cfg(not(target_os = "linux"))]
pub(super) fn pin_current_thread(_cpu: usize) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "pinning threads to CPUs is supported on Linux only",
    ))
}

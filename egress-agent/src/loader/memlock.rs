//! The locked-memory limit, which kernels before 5.11 charge BPF maps and programs to.
use std::io;

/// Lifts `RLIMIT_MEMLOCK`: before 5.11 the kernel charges BPF maps and programs to it
/// (64 KiB by default before 5.16), far below what the maps take. Later kernels charge the
/// memory cgroup instead and ignore it. Without CAP_SYS_RESOURCE this can fail: then only
/// an older kernel refuses the maps, with EPERM.
pub fn lift_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct and changes only this process's limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "cannot lift RLIMIT_MEMLOCK ({}): kernels before 5.11 may refuse the maps",
            io::Error::last_os_error()
        );
    }
}

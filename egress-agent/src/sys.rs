//! What the agent asks of the system: its clocks and its allocator.
use std::time::SystemTime;

/// Nanoseconds on `CLOCK_BOOTTIME`, the clock of `bpf_ktime_get_boot_ns`.
pub fn boot_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The time as events give it.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Returns the heap's free pages to the system. glibc's allocator keeps what it freed for
/// later allocations, so the memory that parsing and compiling a policy took (tens of MiB
/// for a large one) would otherwise stay in the agent's RSS for good.
pub fn give_back_freed_memory() {
    // SAFETY: only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

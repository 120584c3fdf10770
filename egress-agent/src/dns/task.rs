//! The DNS learning task: answers from the kernel's ring buffer, and expiry once a second.
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use egress_common::DnsEvent;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use super::learner::{LearnedStore, Learner, LearnerCounters};
use crate::events::decode;

const EXPIRY_PERIOD: Duration = Duration::from_secs(1);

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

/// Runs until `stop` turns true; returns what the learner counted.
pub async fn run<S: LearnedStore>(
    ring: RingBuf<MapData>,
    mut learner: Learner<S>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<LearnerCounters> {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut tick = tokio::time::interval(EXPIRY_PERIOD);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                while let Some(item) = guard.get_inner_mut().next() {
                    match decode::<DnsEvent>(&item) {
                        Some(event) => learner.answer(&event, boot_time_ns())?,
                        None => log::warn!("ignoring a DNS event of {} bytes", item.len()),
                    }
                }
                guard.clear_ready();
            }
            _ = tick.tick() => learner.expire(boot_time_ns())?,
            _ = stop.changed() => return Ok(learner.counters),
        }
    }
}

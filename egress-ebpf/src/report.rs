//! Counters and rate-limited events.
use egress_common::{Event, STAT_EVENTS_LOST, Settings};

use crate::maps::{EVENTS, RATE, STATS};

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it during this run.
        unsafe { *c += 1 };
    }
}

/// One token, in the bucket's unit (event × nanosecond / second).
const TOKEN: u64 = 1_000_000_000;
/// Refill is computed over at most this long an idle gap, which keeps the product in u64.
const MAX_REFILL_NS: u64 = 60_000_000_000;

/// Takes a token from this CPU's bucket: a flood of denied packets costs a bounded number
/// of events, and the rest are counted as lost.
#[inline(always)]
fn take_token(settings: &Settings, now: u64) -> bool {
    let Some(state) = RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, only this CPU writes it during this run.
    let state = unsafe { &mut *state };
    let elapsed = now.saturating_sub(state.last_ns).min(MAX_REFILL_NS);
    let capacity = u64::from(settings.events_burst) * TOKEN;
    let tokens = (state.tokens + elapsed * u64::from(settings.events_per_sec)).min(capacity);
    state.last_ns = now;
    if tokens >= TOKEN {
        state.tokens = tokens - TOKEN;
        true
    } else {
        state.tokens = tokens;
        false
    }
}

/// Sends an event to the agent if this CPU's rate limit allows it; whether it did.
#[inline(always)]
pub fn emit(settings: &Settings, now: u64, event: &Event) -> bool {
    let sent = take_token(settings, now) && EVENTS.output::<Event>(event, 0).is_ok();
    if !sent {
        count(STAT_EVENTS_LOST);
    }
    sent
}

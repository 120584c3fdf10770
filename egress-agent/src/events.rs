//! Turns kernel events into JSON lines on stdout.
use std::{io::Write as _, net::IpAddr, sync::PoisonError, time::Duration};

use aya::maps::{HashMap, MapData, RingBuf};
use egress_common::{
    ACTION_AUDIT, ACTION_DENY, EVENT_V1_LEN, Event, FlowKey, FlowValue, REASON_UNKNOWN,
    addr::display_addr, proto,
};
use serde_json::{Value, json};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use crate::{
    cgroup::{CgroupNames, first_process},
    denials::{Denials, Flows, Idle},
    dns::seen::{self, SeenNames},
    metrics::Snapshot,
    podinfo::PodLogs,
    reason::Reason,
    sys::{boot_time_ns, now},
};

pub fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        other => other.to_string(),
    }
}

/// Decodes one ring buffer record; `None` for a record of the wrong size (a kernel object
/// built from another version of `egress-common`).
pub fn decode<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    (bytes.len() == size_of::<T>())
        // SAFETY: the length matches and T is plain old data.
        .then(|| unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one `EVENTS` record: an [`Event`], or the previous release's shorter one (no
/// source port, no reason), found in a ring an upgrade took over.
pub fn decode_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() != EVENT_V1_LEN {
        return decode(bytes);
    }
    let mut whole = [0u8; size_of::<Event>()];
    whole[..EVENT_V1_LEN].copy_from_slice(bytes);
    decode::<Event>(&whole).map(|e| Event {
        reason: REASON_UNKNOWN,
        ..e
    })
}

/// The JSON line for an event. `sender` adds what identifies the sending cgroup.
pub fn render(event: &Event, names: &mut CgroupNames) -> Value {
    let action = match event.action {
        ACTION_DENY => "deny",
        ACTION_AUDIT => "audit",
        _ => "unknown",
    };
    let mut v = json!({
        "time": now(),
        "action": action,
        "reason": Reason::from_code(event.reason).name(),
        "proto": proto_name(event.proto),
        "dst": display_addr(&event.dst).to_string(),
        "dport": event.dport,
        "sport": event.sport,
        "cgroup_id": event.cgroup_id,
    });
    if event.uid != u32::MAX {
        v["uid"] = json!(event.uid);
    }
    let root = names.root().to_path_buf();
    if let Some(dir) = names.path_of(event.cgroup_id).map(ToOwned::to_owned) {
        let rel = dir.strip_prefix(&root).unwrap_or(&dir);
        v["cgroup"] = json!(format!("/{}", rel.display()));
        if let Some((pid, comm)) = first_process(&dir) {
            v["pid"] = json!(pid);
            v["comm"] = json!(comm);
        }
    }
    v
}

/// Adds `names`: the names a trusted resolver answered with the line's address, if any.
fn add_names(line: &mut Value, asked: &SeenNames) {
    let Some(dst) = line["dst"].as_str().and_then(|d| d.parse::<IpAddr>().ok()) else {
        return;
    };
    let names = asked.names(dst);
    if !names.is_empty() {
        line["names"] = json!(names);
    }
}

/// The kernel's `FLOWS` map, where it counts the packets of a denied flow.
pub type FlowsMap = HashMap<MapData, FlowKey, FlowValue>;

impl Flows for FlowsMap {
    fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.get(key, 0).ok()
    }
}

/// How often held deny lines are looked at (see `denials`).
const DENIALS_TICK: Duration = Duration::from_millis(500);

/// What names an event's sender and destination.
pub struct Who {
    pub cgroups: CgroupNames,
    pub pods: PodLogs,
    /// The names asked for addresses.
    pub asked: seen::Shared,
}

/// Reads events until the ring buffer fails or `stop` turns true, writing one JSON line per
/// event, on the next tick (within half a second) with the names asked for its address; a
/// denied flow's line waits for its retransmits (see `denials`), and what is held is
/// printed on stop.
pub async fn forward(
    ring: RingBuf<MapData>,
    who: Who,
    snapshots: watch::Receiver<Option<Snapshot>>,
    flows: FlowsMap,
    mut stop: watch::Receiver<bool>,
    idle: Idle,
) -> anyhow::Result<()> {
    let Who {
        cgroups: mut names,
        mut pods,
        asked,
    } = who;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let mut denials = Denials::new(flows, idle);
    let mut tick = tokio::time::interval(DENIALS_TICK);
    // Lines to print on the next tick, when the DNS answer that named their address (read
    // by another task from another ring) has been read too.
    let mut pending = Vec::new();
    // The kernel's count of events it could not hand over, as last printed.
    let mut reported_lost = 0;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                while let Some(item) = guard.get_inner_mut().next() {
                    let Some(event) = decode_event(&item) else {
                        log::warn!("ignoring an event of {} bytes", item.len());
                        continue;
                    };
                    let mut line = render(&event, &mut names);
                    pods.annotate(&mut line);
                    pending.extend(denials.add(&event, line, boot_time_ns()));
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                pending.extend(denials.due(boot_time_ns()));
                let lost = snapshots.borrow().map_or(reported_lost, |s| s.stats.events_lost);
                if lost != reported_lost {
                    reported_lost = lost;
                    pending.push(json!({"time": now(), "events_lost": lost}));
                }
                print(&mut pending, &asked)?;
            }
            _ = stop.changed() => {
                pending.extend(denials.flush());
                return print(&mut pending, &asked);
            }
        }
    }
}

/// Prints (and empties) `lines`, each with the names asked for its address.
fn print(lines: &mut Vec<Value>, asked: &seen::Shared) -> anyhow::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let asked = asked.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = std::io::stdout().lock();
    for mut line in lines.drain(..) {
        add_names(&mut line, &asked);
        writeln!(out, "{line}")?;
    }
    Ok(out.flush()?)
}

#[cfg(test)]
mod tests {
    use egress_common::{REASON_NO_RULE, REASON_PORT, v4_mapped};

    use super::*;

    #[test]
    fn records_of_the_wrong_size_are_rejected() {
        assert!(decode::<Event>(&[0u8; 3]).is_none());
        let e = Event {
            cgroup_id: 7,
            dst: v4_mapped([198, 51, 100, 1]),
            dport: 443,
            proto: proto::TCP,
            action: ACTION_DENY,
            uid: 0,
            sport: 40000,
            reason: REASON_PORT,
            _pad: [0; 5],
        };
        // SAFETY: Event is plain old data.
        let bytes =
            unsafe { core::slice::from_raw_parts((&raw const e).cast::<u8>(), size_of::<Event>()) };
        assert_eq!(decode(bytes), Some(e));
        assert_eq!(decode_event(bytes), Some(e));
        assert_eq!(
            decode_event(&bytes[..EVENT_V1_LEN]),
            Some(Event {
                sport: 0,
                reason: REASON_UNKNOWN,
                ..e
            }),
            "the previous release's record"
        );
        assert!(decode_event(&bytes[..EVENT_V1_LEN + 1]).is_none());
    }

    #[test]
    fn events_render_with_action_proto_dst_and_port() {
        let e = Event {
            cgroup_id: u64::MAX,
            dst: v4_mapped([198, 51, 100, 1]),
            dport: 443,
            proto: proto::TCP,
            action: ACTION_AUDIT,
            uid: 1000,
            sport: 40000,
            reason: REASON_NO_RULE,
            _pad: [0; 5],
        };
        let mut names = CgroupNames::new("/nonexistent-cgroup-root".into());
        let v = render(&e, &mut names);
        assert_eq!(v["action"], "audit");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["dst"], "198.51.100.1");
        assert_eq!(v["dport"], 443);
        assert_eq!(v["uid"], 1000);
        assert_eq!(v["reason"], "no_rule");
        assert_eq!(v["sport"], 40000);
        assert!(v.get("cgroup").is_none());
    }
}

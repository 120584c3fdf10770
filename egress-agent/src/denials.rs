//! One deny line per flow (a connection attempt), not per retransmit, with the packets it
//! stands for.
//!
//! In enforce mode the kernel reports a dropped flow's first packet only, and counts the
//! flow's later drops in its `FLOWS` entry (`FLOW_DENIED`). Its line is held until the flow
//! has been quiet for [`QUIET_NS`] (or held for [`MAX_HOLD_NS`]), then printed with
//! `packets`: the packets dropped so far, the first included. Should the flow drop more
//! after that (a retry after a long back-off), one more line says so, with `"repeat":
//! true` and the packets dropped since the previous line. Counting stops when the flow's
//! entry is gone or decided otherwise, or the flow has been idle past its idle timeout (the
//! kernel then reports its next packet afresh).
use std::collections::HashMap;

use egress_common::{ACTION_DENY, Event, FLOW_DENIED, FlowKey, FlowValue, REASON_MALFORMED};
use serde_json::{Value, json};

/// A flow quiet this long has its line printed: longer than TCP's early SYN retransmission
/// gaps (1 s apart for the first four since Linux 6.5's `tcp_syn_linear_timeouts`, else
/// 1 s then 2 s), so that a connect that gives up within a few seconds is one line.
pub const QUIET_NS: u64 = 3_000_000_000;
/// No line is held longer than this, however busy its flow.
pub const MAX_HOLD_NS: u64 = 10_000_000_000;
/// Flows counted at once, at most; past that, lines are printed at once, without `packets`.
pub const MAX_HELD: usize = 16_384;

/// Where the kernel counts a denied flow's packets: `FLOWS`.
pub trait Flows {
    fn flow(&self, key: &FlowKey) -> Option<FlowValue>;
}

struct Held {
    line: Value,
    first_ns: u64,
    /// Packets the printed lines stand for (0 until the first is printed).
    reported: u64,
    /// The count last read, kept for when the entry goes.
    seen: u64,
    idle_ns: u64,
}

/// The kernel's idle timeouts (`Settings`): a flow idle longer is reported afresh.
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub tcp_ns: u64,
    pub other_ns: u64,
}

pub struct Denials<F> {
    flows: F,
    held: HashMap<FlowKey, Held>,
    idle: Idle,
}

/// The flow an event reports.
pub fn flow_key(event: &Event) -> FlowKey {
    FlowKey {
        remote: event.dst,
        remote_port: event.dport,
        local_port: event.sport,
        proto: event.proto,
        _pad: [0; 3],
    }
}

impl<F: Flows> Denials<F> {
    pub fn new(flows: F, idle: Idle) -> Self {
        Self {
            flows,
            held: HashMap::new(),
            idle,
        }
    }

    /// Takes an event's line: returns it when it is to be printed now (audit lines, packets
    /// whose headers could not be read, none of which the kernel folds), else holds it.
    pub fn add(&mut self, event: &Event, mut line: Value, now: u64) -> Option<Value> {
        if event.action != ACTION_DENY {
            return Some(line);
        }
        if event.reason == REASON_MALFORMED {
            line["packets"] = json!(1);
            return Some(line);
        }
        let key = flow_key(event);
        if self.held.len() >= MAX_HELD && !self.held.contains_key(&key) {
            return Some(line);
        }
        let idle_ns = if event.proto == egress_common::proto::TCP {
            self.idle.tcp_ns
        } else {
            self.idle.other_ns
        };
        // A flow reported afresh (its entry had gone idle) starts a new count.
        self.held.insert(
            key,
            Held {
                line,
                first_ns: now,
                reported: 0,
                seen: 1,
                idle_ns,
            },
        );
        None
    }

    /// The lines due at `now`, oldest flow first.
    pub fn due(&mut self, now: u64) -> Vec<Value> {
        let mut out: Vec<(u64, Value)> = Vec::new();
        self.held.retain(|key, held| {
            let entry = self.flows.flow(key).filter(|f| f.state == FLOW_DENIED);
            let Some(entry) = entry else {
                // Gone (evicted, or decided otherwise, e.g. allowed after a reload).
                if let Some(line) = held.take(held.seen) {
                    out.push((held.first_ns, line));
                }
                return false;
            };
            held.seen = entry.owner.max(1);
            let quiet = now.saturating_sub(entry.last_seen_ns) >= QUIET_NS;
            let overdue = held.reported == 0 && now.saturating_sub(held.first_ns) >= MAX_HOLD_NS;
            if (quiet || overdue)
                && let Some(line) = held.take(held.seen)
            {
                out.push((held.first_ns, line));
            }
            now.saturating_sub(entry.last_seen_ns) <= held.idle_ns
        });
        out.sort_by_key(|(first, _)| *first);
        out.into_iter().map(|(_, line)| line).collect()
    }
}

impl<F: Flows> Denials<F> {
    /// Every line held, with the packets counted so far: the agent stops.
    pub fn flush(&mut self) -> Vec<Value> {
        let mut held: Vec<(FlowKey, Held)> = self.held.drain().collect();
        held.sort_by_key(|(_, h)| h.first_ns);
        held.into_iter()
            .filter_map(|(key, mut h)| {
                let total = match self.flows.flow(&key) {
                    Some(f) if f.state == FLOW_DENIED => f.owner.max(1),
                    _ => h.seen,
                };
                h.take(total)
            })
            .collect()
    }
}

impl Held {
    /// The line for the packets counted up to `total` not yet reported, if any.
    fn take(&mut self, total: u64) -> Option<Value> {
        if total <= self.reported {
            return None;
        }
        let mut line = self.line.clone();
        line["packets"] = json!(total - self.reported);
        if self.reported > 0 {
            line["repeat"] = json!(true);
            line["time"] = json!(crate::sys::now());
        }
        self.reported = total;
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use egress_common::{ACTION_AUDIT, FLOW_ALLOWED, REASON_NO_RULE, proto, v4_mapped};

    use super::*;

    const S: u64 = 1_000_000_000;

    #[derive(Clone, Default)]
    struct FakeFlows(Rc<RefCell<HashMap<FlowKey, FlowValue>>>);

    impl Flows for FakeFlows {
        fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
            self.0.borrow().get(key).copied()
        }
    }

    impl FakeFlows {
        fn set(&self, key: FlowKey, state: u8, packets: u64, last_seen_ns: u64) {
            self.0.borrow_mut().insert(
                key,
                FlowValue {
                    last_seen_ns,
                    owner: packets,
                    state,
                    _pad: [0; 7],
                },
            );
        }
    }

    fn event(action: u8, sport: u16) -> Event {
        Event {
            cgroup_id: 1,
            dst: v4_mapped([198, 51, 100, 9]),
            dport: 443,
            proto: proto::TCP,
            action,
            uid: 0,
            sport,
            reason: REASON_NO_RULE,
            _pad: [0; 5],
        }
    }

    fn denials(flows: &FakeFlows) -> Denials<FakeFlows> {
        Denials::new(
            flows.clone(),
            Idle {
                tcp_ns: 3600 * S,
                other_ns: 120 * S,
            },
        )
    }

    #[test]
    fn retransmits_fold_into_one_line_printed_when_the_flow_is_quiet() {
        let flows = FakeFlows::default();
        let mut d = denials(&flows);
        let e = event(ACTION_DENY, 40000);
        flows.set(flow_key(&e), FLOW_DENIED, 1, 100 * S);
        assert!(d.add(&e, json!({"dst": "x"}), 100 * S).is_none(), "held");
        flows.set(flow_key(&e), FLOW_DENIED, 2, 101 * S);
        assert!(d.due(103 * S).is_empty(), "not quiet yet");
        let lines = d.due(104 * S);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["packets"], 2);
        assert!(lines[0].get("repeat").is_none());
        assert!(d.due(105 * S).is_empty(), "nothing new");
        // A retry after a long back-off: one more line, with the new packets only.
        flows.set(flow_key(&e), FLOW_DENIED, 3, 110 * S);
        let lines = d.due(113 * S);
        assert_eq!(
            (lines[0]["packets"].clone(), lines[0]["repeat"].clone()),
            (json!(1), json!(true))
        );
    }

    #[test]
    fn a_busy_flow_is_printed_after_the_longest_hold() {
        let flows = FakeFlows::default();
        let mut d = denials(&flows);
        let e = event(ACTION_DENY, 40001);
        assert!(d.add(&e, json!({}), 0).is_none());
        flows.set(flow_key(&e), FLOW_DENIED, 50, 9 * S);
        assert!(d.due(9 * S).is_empty());
        flows.set(flow_key(&e), FLOW_DENIED, 60, 10 * S);
        assert_eq!(d.due(10 * S)[0]["packets"], 60);
    }

    #[test]
    fn a_flow_whose_entry_goes_is_printed_with_what_was_counted_and_forgotten() {
        let flows = FakeFlows::default();
        let mut d = denials(&flows);
        let e = event(ACTION_DENY, 40002);
        flows.set(flow_key(&e), FLOW_DENIED, 3, S);
        d.add(&e, json!({}), S);
        assert!(d.due(2 * S).is_empty());
        flows.set(flow_key(&e), FLOW_ALLOWED, 0, 2 * S);
        assert_eq!(d.due(2 * S)[0]["packets"], 3);
        assert!(d.held.is_empty());
    }

    #[test]
    fn an_idle_flow_is_forgotten_after_its_idle_timeout() {
        let flows = FakeFlows::default();
        let mut d = denials(&flows);
        let e = event(ACTION_DENY, 40003);
        flows.set(flow_key(&e), FLOW_DENIED, 1, 0);
        d.add(&e, json!({}), 0);
        assert_eq!(d.due(3 * S).len(), 1);
        assert!(!d.held.is_empty(), "still counting");
        assert!(d.due(3601 * S).is_empty());
        assert!(d.held.is_empty());
    }

    #[test]
    fn a_stop_prints_what_is_held_and_what_is_not_yet_reported() {
        let flows = FakeFlows::default();
        let mut d = denials(&flows);
        let (held, printed) = (event(ACTION_DENY, 40004), event(ACTION_DENY, 40005));
        flows.set(flow_key(&held), FLOW_DENIED, 2, S);
        flows.set(flow_key(&printed), FLOW_DENIED, 1, 0);
        d.add(&printed, json!({"n": 1}), 0);
        assert_eq!(d.due(3 * S).len(), 1);
        d.add(&held, json!({"n": 2}), S);
        flows.set(flow_key(&printed), FLOW_DENIED, 4, 3 * S);
        let lines = d.flush();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            (lines[0]["n"].clone(), lines[0]["packets"].clone()),
            (json!(1), json!(3))
        );
        assert_eq!(lines[0]["repeat"], true);
        assert_eq!(
            (lines[1]["n"].clone(), lines[1]["packets"].clone()),
            (json!(2), json!(2))
        );
        assert!(d.held.is_empty());
    }

    #[test]
    fn audit_lines_and_unreadable_packets_are_printed_at_once() {
        let flows = FakeFlows::default();
        let mut d = denials(&flows);
        assert!(d.add(&event(ACTION_AUDIT, 1), json!({}), 0).is_some());
        let mut bad = event(ACTION_DENY, 0);
        bad.reason = REASON_MALFORMED;
        assert_eq!(d.add(&bad, json!({}), 0).expect("at once")["packets"], 1);
        assert!(d.held.is_empty());
    }
}

//! Flows the agent reported, and checks on probe results.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

use crate::{Agent, ProbeResult, TestCgroup};

/// How long an event may lag behind the packet that caused it.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What identifies an event: destination address, destination port, protocol.
pub type Flow = (String, u16, &'static str);

pub fn tcp(addr: impl Into<IpAddr>, port: u16) -> Flow {
    (addr.into().to_string(), port, "tcp")
}

pub fn udp(addr: impl Into<IpAddr>, port: u16) -> Flow {
    (addr.into().to_string(), port, "udp")
}

pub(crate) fn flow_of(event: &Value) -> Option<Flow> {
    let proto = match event["proto"].as_str()? {
        "tcp" => "tcp",
        "udp" => "udp",
        _ => "other",
    };
    let port = u16::try_from(event["dport"].as_u64()?).ok()?;
    Some((event["dst"].as_str()?.to_owned(), port, proto))
}

/// Waits until the agent has reported each of `flows`.
pub fn wait_for_flows(agent: &Agent, flows: &[Flow]) {
    for flow in flows {
        agent.wait_for_event(|event| flow_of(event).as_ref() == Some(flow), EVENT_TIMEOUT);
    }
}

/// Stops the agent (which drains its output), checks it exited cleanly, and returns how
/// often each flow was reported. Every flow event must carry `action` and the test cgroup.
pub fn stop_and_collect(
    agent: &mut Agent,
    action: &str,
    cgroup: &TestCgroup,
) -> BTreeMap<Flow, usize> {
    let status = agent.terminate();
    assert!(
        status.success(),
        "agent exited with {status}; stderr:\n{}",
        agent.stderr_lines().join("\n")
    );
    let expected_cgroup = event_cgroup(cgroup);
    let mut flows = BTreeMap::new();
    for event in agent.flow_events() {
        assert_eq!(event["action"], action, "{event}");
        assert_eq!(event["cgroup"], expected_cgroup.as_str(), "{event}");
        assert!(
            event["cgroup_id"].as_u64().is_some_and(|id| id > 0),
            "{event}"
        );
        let flow = flow_of(&event).unwrap_or_else(|| panic!("event without a flow: {event}"));
        *flows.entry(flow).or_insert(0) += 1;
    }
    flows
}

/// Asserts that exactly `expected` were reported (each at least once).
pub fn assert_reported_exactly(reported: &BTreeMap<Flow, usize>, expected: &[Flow]) {
    let mut got: Vec<&Flow> = reported.keys().collect();
    let mut want: Vec<&Flow> = expected.iter().collect();
    got.sort();
    want.sort();
    want.dedup();
    assert_eq!(got, want, "reported flows (with counts: {reported:?})");
}

#[track_caller]
pub fn assert_ok(result: &ProbeResult, what: &str) {
    assert!(result.ok, "{what} should pass: {result:?}");
}

/// A dropped SYN is silence: the connect times out.
#[track_caller]
pub fn assert_timeout(result: &ProbeResult, what: &str) {
    assert!(!result.ok, "{what} should be dropped: {result:?}");
    assert_eq!(
        result.errno,
        Some(libc::ETIMEDOUT),
        "{what} should time out: {result:?}"
    );
}

/// A dropped datagram fails the `sendto` itself.
#[track_caller]
pub fn assert_eperm(result: &ProbeResult, what: &str) {
    assert!(!result.ok, "{what} should be dropped: {result:?}");
    assert_eq!(
        result.errno,
        Some(libc::EPERM),
        "{what} should fail with EPERM: {result:?}"
    );
}

/// The cgroup's path as events name it: relative to the cgroup2 mount, which the test
/// cgroup sits directly below.
fn event_cgroup(cgroup: &TestCgroup) -> String {
    let name = cgroup
        .path()
        .file_name()
        .expect("the test cgroup has a name");
    format!("/{}", name.to_string_lossy())
}

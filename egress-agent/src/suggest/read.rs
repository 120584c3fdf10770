//! Reads event logs: JSON lines as the agent prints them, with or without the prefix
//! `kubectl logs --prefix` adds (`[pod/egress-agent-abc/agent] `), mixed with anything else
//! (the agent's diagnostics), which is skipped.
use std::{collections::BTreeMap, io::BufRead, net::IpAddr};

use anyhow::Context as _;
use serde_json::Value;

use crate::policy::Proto;

/// One audited or denied flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub dst: IpAddr,
    pub proto: Proto,
    /// 0 for ICMP.
    pub port: u16,
    /// The names the workload resolved to get `dst` (the asked names, CNAMEs followed).
    pub names: Vec<String>,
    /// `namespace/pod`, or `host <comm> (<cgroup>)` for a host process.
    pub workload: String,
    pub time: String,
}

/// What a set of logs holds.
#[derive(Debug, Default)]
pub struct Input {
    pub flows: Vec<Flow>,
    /// Lines that were not events (diagnostics, other output).
    pub other_lines: u64,
    /// Events for another protocol than TCP, UDP and ICMP, left out.
    pub unsupported: u64,
    /// The largest `events_lost` each source (file and prefix: one agent) reported.
    lost: BTreeMap<(String, String), u64>,
}

impl Input {
    /// Events the agents did not print (rate limit, full ring buffer), in all sources.
    pub fn events_lost(&self) -> u64 {
        self.lost.values().sum()
    }

    /// Reads one log; `source` names it (a file, `-`).
    pub fn read(&mut self, source: &str, input: impl BufRead) -> anyhow::Result<()> {
        for (n, line) in input.lines().enumerate() {
            let line = line.with_context(|| format!("{source}: line {}", n + 1))?;
            self.line(source, &line);
        }
        Ok(())
    }

    fn line(&mut self, source: &str, line: &str) {
        let (prefix, json) = split_prefix(line);
        let Some(event) = json.and_then(|j| serde_json::from_str::<Value>(j).ok()) else {
            self.other_lines += 1;
            return;
        };
        if let Some(lost) = event["events_lost"].as_u64() {
            let seen = self
                .lost
                .entry((source.to_owned(), prefix.to_owned()))
                .or_default();
            *seen = (*seen).max(lost);
        }
        match flow(&event) {
            Some(Some(flow)) => self.flows.push(flow),
            Some(None) => self.unsupported += 1,
            // The agent's counts of lost events and its own events (attached, reloaded).
            None if event.get("events_lost").is_some() || event.get("event").is_some() => {}
            None => self.other_lines += 1,
        }
    }
}

/// The `kubectl logs --prefix` prefix (or "") and the JSON object after it, if any.
fn split_prefix(line: &str) -> (&str, Option<&str>) {
    let line = line.trim();
    let (prefix, rest) = match line.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((prefix, rest)) => (prefix, rest.trim_start()),
        None => ("", line),
    };
    (prefix, rest.starts_with('{').then_some(rest))
}

/// The flow an event line reports: `None` for no event, `Some(None)` for an event of a
/// protocol no rule can name. A `repeat` line (more packets of a flow already reported) is
/// no new flow.
fn flow(event: &Value) -> Option<Option<Flow>> {
    let action = event["action"].as_str()?;
    if !matches!(action, "audit" | "deny") || event["repeat"] == true {
        return None;
    }
    let dst: IpAddr = event["dst"].as_str()?.parse().ok()?;
    let proto = match event["proto"].as_str()? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" | "icmpv6" => Proto::Icmp,
        _ => return Some(None),
    };
    let port = match proto {
        Proto::Icmp => 0,
        _ => u16::try_from(event["dport"].as_u64()?).ok()?,
    };
    let names = event["names"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n.as_str()).map(normalize).collect())
        .unwrap_or_default();
    Some(Some(Flow {
        dst,
        proto,
        port,
        names,
        workload: workload(event),
        time: event["time"].as_str().unwrap_or_default().to_owned(),
    }))
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn workload(event: &Value) -> String {
    let field = |key: &str| event[key].as_str();
    match (field("namespace"), field("pod")) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => match (field("pod_uid"), field("comm"), field("cgroup")) {
            (Some(uid), ..) => format!("pod {uid}"),
            (None, Some(comm), Some(cgroup)) => format!("host {comm} ({cgroup})"),
            (None, None, Some(cgroup)) => format!("host {cgroup}"),
            (None, Some(comm), None) => format!("host {comm}"),
            (None, None, None) => "unknown".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_diagnostics_and_repeats() {
        let log = r#"[pod/egress-agent-abc/agent] {"action":"audit","dst":"203.0.113.7","dport":443,"proto":"tcp","names":["API.Example.com."],"namespace":"shop","pod":"web","time":"2026-12-02T10:00:00.000Z"}
[pod/egress-agent-abc/agent] [2026-12-02T10:00:00Z INFO  egress_agent::run] attached
[pod/egress-agent-abc/agent] {"event":"attached","mode":"audit","time":"t"}
{"action":"deny","dst":"2001:db8::9","dport":123,"proto":"udp","cgroup":"/system.slice/chronyd.service","comm":"chronyd","time":"2026-12-02T10:00:01.000Z"}
{"action":"deny","dst":"2001:db8::9","dport":123,"proto":"udp","repeat":true,"packets":3}
{"action":"audit","dst":"203.0.113.8","dport":0,"proto":"icmp","time":"t"}
{"action":"audit","dst":"203.0.113.8","dport":9,"proto":"132","time":"t"}
[pod/egress-agent-abc/agent] {"events_lost":4,"time":"t"}
[pod/egress-agent-abc/agent] {"events_lost":7,"time":"t"}
[pod/egress-agent-def/agent] {"events_lost":2,"time":"t"}
"#;
        let mut input = Input::default();
        input.read("-", log.as_bytes()).unwrap();
        assert_eq!(input.flows.len(), 3);
        assert_eq!(input.flows[0].names, ["api.example.com"]);
        assert_eq!(input.flows[0].workload, "shop/web");
        assert_eq!(
            input.flows[1].workload,
            "host chronyd (/system.slice/chronyd.service)"
        );
        assert_eq!(
            (input.flows[2].proto, input.flows[2].port),
            (Proto::Icmp, 0)
        );
        assert_eq!(input.unsupported, 1);
        assert_eq!(
            input.other_lines, 2,
            "the diagnostic and the repeat; the agent's own event is neither"
        );
        assert_eq!(
            input.events_lost(),
            9,
            "the latest count of each agent, summed"
        );
    }
}

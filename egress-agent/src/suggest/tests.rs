use super::*;
use crate::policy;

fn event(node_time: &str, dst: &str, port: u16, proto: &str, names: &[&str], pod: &str) -> String {
    let (ns, pod) = pod.split_once('/').unwrap();
    serde_json::json!({
        "time": node_time, "action": "audit", "dst": dst, "dport": port, "proto": proto,
        "names": names, "namespace": ns, "pod": pod,
    })
    .to_string()
}

/// Two nodes' logs, as `kubectl logs --prefix` merges them, give one rule per name.
#[test]
fn logs_of_several_nodes_merge() {
    let node_a = [
        event(
            "2026-12-02T10:00:00.000Z",
            "203.0.113.7",
            443,
            "tcp",
            &["api.example.com"],
            "shop/web-1",
        ),
        event(
            "2026-12-02T10:05:00.000Z",
            "203.0.113.9",
            123,
            "udp",
            &[],
            "kube-system/ntp",
        ),
        event(
            "2026-12-02T10:01:00.000Z",
            "203.0.113.21",
            443,
            "tcp",
            &["a.cdn.example.net"],
            "shop/web-1",
        ),
    ];
    let node_b = [
        event(
            "2026-12-02T09:00:00.000Z",
            "203.0.113.8",
            8443,
            "tcp",
            &["api.example.com"],
            "shop/web-2",
        ),
        event(
            "2026-12-02T11:00:00.000Z",
            "203.0.113.22",
            443,
            "tcp",
            &["b.cdn.example.net"],
            "shop/web-2",
        ),
        event(
            "2026-12-02T11:00:01.000Z",
            "203.0.113.23",
            443,
            "tcp",
            &["c.cdn.example.net"],
            "shop/web-2",
        ),
        r#"{"events_lost":3,"time":"x"}"#.to_string(),
    ];
    let mut input = Input::default();
    let a: String = node_a
        .iter()
        .map(|l| format!("[pod/egress-agent-a/agent] {l}\n"))
        .collect();
    let b: String = node_b
        .iter()
        .map(|l| format!("[pod/egress-agent-b/agent] {l}\n"))
        .collect();
    input.read("-", format!("{a}{b}").as_bytes()).unwrap();
    let s = suggest(
        &input,
        &Options {
            wildcard_min: 3,
            covered: None,
        },
    );
    let p = &s.policy;
    assert!(
        p.contains("  - fqdn: \"*.cdn.example.net\"\n    ports: [TCP:443]"),
        "{p}"
    );
    assert!(
        p.contains("  - fqdn: api.example.com\n    ports: [TCP:443, TCP:8443]"),
        "{p}"
    );
    assert!(
        p.contains("# shop/web-1, shop/web-2; 2 flows; 2026-12-02T09:00:00.000Z .. 2026-12-02T10:00:00.000Z\n  - fqdn: api.example.com"),
        "{p}"
    );
    assert!(
        p.contains("  - cidr: 203.0.113.9/32\n    ports: [UDP:123]"),
        "{p}"
    );
    assert_eq!(s.rules, 3);
    assert!(s.summary.contains("6 flows read"), "{}", s.summary);
    assert!(
        s.summary.contains("events lost in the input: 3"),
        "{}",
        s.summary
    );
    let parsed = policy::parse(p, "suggestion").expect("check accepts it");
    assert_eq!(parsed.rules.len(), 3);
    for flow in &input.flows {
        assert!(covers(&parsed, flow), "{flow:?} is allowed");
    }
}

#[test]
fn flows_the_presets_allow_are_left_out() {
    let mut input = Input::default();
    let lines = [
        event(
            "t1",
            "203.0.113.7",
            443,
            "tcp",
            &["mcr.microsoft.com"],
            "shop/web",
        ),
        event(
            "t2",
            "203.0.113.8",
            443,
            "tcp",
            &["api.example.com"],
            "shop/web",
        ),
    ];
    input.read("-", lines.join("\n").as_bytes()).unwrap();
    let presets = policy::preset_rules(
        "aks-global",
        crate::policy::presets::Params {
            location: Some("eastus".into()),
        },
        None,
        None,
    )
    .unwrap();
    let s = suggest(
        &input,
        &Options {
            wildcard_min: 3,
            covered: Some(Covered {
                label: "preset aks-global".into(),
                policy: presets,
                presets_yaml: Some("presets:\n  - name: aks-global\n    location: eastus\n".into()),
            }),
        },
    );
    assert!(!s.policy.contains("mcr.microsoft.com"), "{}", s.policy);
    assert!(
        s.policy.contains("# 1 flow left out: preset aks-global"),
        "{}",
        s.policy
    );
    assert!(s.policy.contains("fqdn: api.example.com"));
    policy::parse(&s.policy, "suggestion").expect("check accepts it");
}

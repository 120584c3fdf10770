//! From audit to enforce, end to end: two workloads in cgroups laid out like kubelet pods
//! (with the kubelet's log layout faked) reach names (exact, siblings under one zone, a
//! CNAME), a UDP service and an address without a name while the agent audits; the events
//! name the pods and the names; `suggest` turns the log into a policy `check` accepts; the
//! agent enforcing it lets the same traffic through and denies what the log never saw.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use egress_tests::dns::{DnsServer, Lookup, Record, query_wait, resolve_connect};
use egress_tests::{
    Agent, REMOTE_V4_B, SERVER_V4, SERVER_V6, Server, TempFile, TestCgroup, Topology, agent_bin,
    assert_ok, assert_timeout, probe_tcp, probe_udp, require_root, start_agent_with, tcp, udp,
    wait_for_flows,
};
use serde_json::Value;

const HTTPS: u16 = 443;
const NTP: u16 = 123;
const API: (&str, Ipv4Addr) = ("api.example.com", Ipv4Addr::new(203, 0, 113, 31));
/// Siblings under one zone: `suggest` makes them a wildcard.
const SIBLINGS: [(&str, Ipv4Addr); 3] = [
    ("a.svc.example.net", Ipv4Addr::new(203, 0, 113, 41)),
    ("b.svc.example.net", Ipv4Addr::new(203, 0, 113, 42)),
    ("c.svc.example.net", Ipv4Addr::new(203, 0, 113, 43)),
];
/// `www.example.org` is a CNAME for `edge.cdn.example.org`.
const WWW: &str = "www.example.org";
const EDGE: (&str, Ipv4Addr) = ("edge.cdn.example.org", Ipv4Addr::new(203, 0, 113, 51));
const TIME: (&str, Ipv4Addr) = ("time.example.com", Ipv4Addr::new(203, 0, 113, 61));
/// Never in the audit log.
const OTHER: (&str, Ipv4Addr) = ("other.example.com", Ipv4Addr::new(203, 0, 113, 71));

const WEB_UID: &str = "0f3c9a2e-7b1d-4c55-9e0a-1234567890ab";
const WEB_ID: &str = "4e5b6c7d8e9f00112233445566778899aabbccddeeff00112233445566778899";
const SYNC_UID: &str = "9a8b7c6d-1111-2222-3333-444455556666";
const SYNC_ID: &str = "aa5b6c7d8e9f00112233445566778899aabbccddeeff001122334455667788bb";

/// The kubelet's log layout for one container, under `root`.
fn fake_logs(root: &Path, ns: &str, pod: &str, uid: &str, container: &str, id: &str) {
    fs::create_dir_all(root.join(format!("pods/{ns}_{pod}_{uid}/{container}"))).unwrap();
    fs::create_dir_all(root.join("containers")).unwrap();
    fs::write(
        root.join(format!("containers/{pod}_{ns}_{container}-{id}.log")),
        "",
    )
    .unwrap();
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Drops in field order: workloads' cgroups before their parent.
struct Pods {
    web: TestCgroup,
    sync: TestCgroup,
    parent: TestCgroup,
}

fn pods() -> Pods {
    let parent = TestCgroup::new();
    let web = parent.nested(&format!("kubepods/burstable/pod{WEB_UID}/{WEB_ID}"));
    let sync = parent.nested(&format!("kubepods/besteffort/pod{SYNC_UID}/{SYNC_ID}"));
    Pods { web, sync, parent }
}

fn records() -> Vec<Record<'static>> {
    let mut r = vec![
        Record::Host(API.0, API.1.into()),
        Record::Cname(WWW, EDGE.0),
        Record::Host(EDGE.0, EDGE.1.into()),
        Record::Host(TIME.0, TIME.1.into()),
        Record::Host(OTHER.0, OTHER.1.into()),
    ];
    r.extend(SIBLINGS.iter().map(|(n, a)| Record::Host(n, (*a).into())));
    r
}

/// The traffic of both workloads; `pass` says whether each is expected through.
fn traffic(topo: &Topology, pods: &Pods, pass: bool) {
    let connect = |cgroup: &TestCgroup, name: &str, what: &str| {
        let r = resolve_connect(
            &topo.client,
            Some(cgroup),
            Lookup::a(name, SERVER_V4),
            HTTPS,
        );
        assert!(r.addr.is_some(), "{what}: {name} resolves ({r:?})");
        if pass {
            assert_ok(&r.result, what);
        } else {
            assert_timeout(&r.result, what);
        }
    };
    connect(&pods.web, API.0, "web to the API");
    for (name, _) in SIBLINGS {
        connect(&pods.web, name, "web to a sibling");
    }
    connect(&pods.web, WWW, "web to the CNAME");
    // The UDP service: looked up, then a datagram to its address.
    let mut lookup = query_wait(&topo.client, Some(&pods.sync), TIME.0, SERVER_V4, 4242, 1);
    lookup.finish_line();
    assert_ok(
        &probe_udp(&topo.client, Some(&pods.sync), TIME.1, NTP),
        "sync to the time service",
    );
    assert_ok(
        &probe_tcp(&topo.client, Some(&pods.sync), REMOTE_V4_B, HTTPS),
        "sync to an address without a name",
    );
}

fn policy(mode: &str) -> String {
    format!(
        "mode: {mode}\nallow:\n  - cidr: 198.51.100.250/32\ndns:\n  resolvers: [{SERVER_V4}, {SERVER_V6}]\n"
    )
}

fn agent(policy: &TempFile, pods: &Pods, mode: &str, logs: &Path) -> Agent {
    start_agent_with(
        policy,
        &pods.parent,
        Some(mode),
        &["--pod-logs", logs.to_str().unwrap()],
    )
}

fn run_agent_cli(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(agent_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn event_for(events: &[Value], dst: Ipv4Addr) -> &Value {
    let dst = dst.to_string();
    events
        .iter()
        .find(|e| e["dst"] == dst.as_str())
        .unwrap_or_else(|| panic!("no event for {dst} in {events:#?}"))
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn audit_then_suggest_then_enforce() {
    if !require_root() {
        return;
    }
    let logs =
        TempDir(std::env::temp_dir().join(format!("egress-suggest-logs-{}", std::process::id())));
    fake_logs(&logs.0, "shop", "web-7d9f", WEB_UID, "nginx", WEB_ID);
    fake_logs(&logs.0, "batch", "sync-x2", SYNC_UID, "worker", SYNC_ID);
    let topo = Topology::new();
    let addrs: Vec<Ipv4Addr> = [API.1, EDGE.1, TIME.1, OTHER.1]
        .into_iter()
        .chain(SIBLINGS.iter().map(|(_, a)| *a))
        .collect();
    for a in &addrs {
        topo.add_remote(*a);
    }
    let any = IpAddr::from(Ipv4Addr::UNSPECIFIED);
    let _servers = [
        Server::tcp(&topo.server, None, any, HTTPS),
        Server::udp(&topo.server, None, TIME.1, NTP),
    ];
    let _dns = DnsServer::start(&topo.server, 300, &records());
    let pods = pods();

    // Audit.
    let audit_policy = TempFile::new(&policy("audit"));
    let mut audit = agent(&audit_policy, &pods, "audit", &logs.0);
    traffic(&topo, &pods, true);
    let mut expected: Vec<_> = [API.1, EDGE.1]
        .into_iter()
        .chain(SIBLINGS.iter().map(|(_, a)| *a))
        .map(|a| tcp(a, HTTPS))
        .collect();
    expected.extend([udp(TIME.1, NTP), tcp(REMOTE_V4_B, HTTPS)]);
    wait_for_flows(&audit, &expected);
    assert!(audit.terminate().success());
    let events = audit.events();
    let api = event_for(&events, API.1);
    assert_eq!(
        (&api["namespace"], &api["pod"], &api["container"]),
        (&"shop".into(), &"web-7d9f".into(), &"nginx".into()),
        "{api}"
    );
    assert_eq!(api["names"], serde_json::json!([API.0]), "{api}");
    assert_eq!(
        event_for(&events, EDGE.1)["names"],
        serde_json::json!([WWW])
    );
    let time = event_for(&events, TIME.1);
    assert_eq!(
        (&time["pod"], &time["container"], &time["proto"]),
        (&"sync-x2".into(), &"worker".into(), &"udp".into()),
        "{time}"
    );
    assert_eq!(time["names"], serde_json::json!([TIME.0]));
    assert!(event_for(&events, REMOTE_V4_B).get("names").is_none());

    // Suggest, from the log as `kubectl logs --prefix` shows it.
    let log: String = events
        .iter()
        .map(|e| format!("[pod/egress-agent-test/agent] {e}\n"))
        .collect();
    eprintln!("{log}");
    let (ok, suggested, summary) = run_agent_cli(&["suggest", "--events", "-"], &log);
    assert!(ok, "{summary}");
    eprintln!("{suggested}{summary}");
    assert!(
        suggested.contains("- fqdn: \"*.svc.example.net\"\n    ports: [TCP:443]"),
        "{suggested}"
    );
    assert!(
        suggested.contains("- fqdn: api.example.com\n    ports: [TCP:443]"),
        "{suggested}"
    );
    assert!(
        suggested.contains("- fqdn: www.example.org\n    ports: [TCP:443]"),
        "{suggested}"
    );
    assert!(
        suggested.contains("- fqdn: time.example.com\n    ports: [UDP:123]"),
        "{suggested}"
    );
    assert!(
        suggested.contains(&format!("- cidr: {REMOTE_V4_B}/32\n    ports: [TCP:443]")),
        "{suggested}"
    );
    assert!(
        suggested.contains("# shop/web-7d9f; 1 flow;"),
        "{suggested}"
    );
    assert!(summary.contains("7 flows read"), "{summary}");
    assert!(summary.contains("events lost in the input: 0"), "{summary}");
    let enforce_policy = TempFile::new(&format!(
        "{suggested}dns:\n  resolvers: [{SERVER_V4}, {SERVER_V6}]\n"
    ));
    let check = run_agent_cli(
        &["check", "--config", enforce_policy.path().to_str().unwrap()],
        "",
    );
    assert!(check.0, "check refuses the suggestion: {}", check.2);

    // Enforce: the same traffic passes, the rest does not.
    let mut enforce = agent(&enforce_policy, &pods, "enforce", &logs.0);
    traffic(&topo, &pods, true);
    let other = resolve_connect(
        &topo.client,
        Some(&pods.web),
        Lookup::a(OTHER.0, SERVER_V4),
        HTTPS,
    );
    assert_timeout(&other.result, "web to a name the log never saw");
    let denied = enforce.wait_for_event(
        |e| e["dst"] == OTHER.1.to_string().as_str(),
        Duration::from_secs(20),
    );
    assert_eq!(denied["names"], serde_json::json!([OTHER.0]), "{denied}");
    assert_eq!(denied["pod"], "web-7d9f", "{denied}");
    assert!(enforce.terminate().success());
    let denials: Vec<Value> = enforce
        .events()
        .into_iter()
        .filter(|e| e.get("action").is_some())
        .collect();
    assert_eq!(
        denials.len(),
        1,
        "only the unseen name is denied: {denials:#?}"
    );
}

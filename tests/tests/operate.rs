//! Operating a running agent: policy reloads (a rename over the file, SIGHUP, a bad
//! policy) apply atomically without dropping established flows, and the metrics and
//! health endpoints answer.
use std::{fs, time::Duration};

use egress_tests::{
    REMOTE_V4_A, REMOTE_V4_B, Server, TempFile, TestCgroup, Topology, assert_ok, assert_timeout,
    dns::tcp_hold, probe_tcp, require_root, start_agent,
};

const HTTPS: u16 = 443;
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

fn allow_only(addr: &str) -> String {
    format!("mode: enforce\nallow:\n  - cidr: {addr}/32\n    ports: [HTTPS:443]\n")
}

/// Replaces the policy the way an editor or a ConfigMap update does: a new file renamed
/// over the old one.
fn replace(policy: &TempFile, contents: &str) {
    let next = policy.path().with_extension("next");
    fs::write(&next, contents).expect("write the new policy");
    fs::rename(&next, policy.path()).expect("rename it over the old one");
}

#[test]
fn reloads_apply_atomically_keep_established_flows_and_reject_bad_policies() {
    if !require_root() {
        return;
    }
    let (a, b) = (REMOTE_V4_A, REMOTE_V4_B);
    let policy = TempFile::new(&allow_only(&a.to_string()));
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let _servers = [
        Server::tcp(&topo.server, None, a, HTTPS),
        Server::tcp(&topo.server, None, b, HTTPS),
    ];
    let agent = start_agent(&policy, &cgroup, None);
    let cg = Some(&cgroup);
    assert_ok(
        &probe_tcp(&topo.client, cg, a, HTTPS),
        "a before the reload",
    );
    assert_timeout(
        &probe_tcp(&topo.client, cg, b, HTTPS),
        "b before the reload",
    );
    // A connection to `a` that lives through the reload that takes `a` away.
    let mut held = tcp_hold(
        &topo.client,
        cg,
        a,
        HTTPS,
        Duration::from_secs(6),
        Duration::from_millis(200),
    );
    held.line(0);

    replace(&policy, &allow_only(&b.to_string()));
    agent.wait_for_stderr("policy reloaded", RELOAD_TIMEOUT);
    assert_ok(&probe_tcp(&topo.client, cg, b, HTTPS), "b after the reload");
    assert_timeout(
        &probe_tcp(&topo.client, cg, a, HTTPS),
        "a new connection to a after the reload",
    );

    // Host bits set: rejected, and the running policy stays in force.
    fs::write(
        policy.path(),
        "mode: enforce\nallow:\n  - cidr: 203.0.113.21/24\n",
    )
    .expect("write a bad policy");
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) }, 0);
    let rejected = agent.wait_for_stderr("policy reload rejected", RELOAD_TIMEOUT);
    assert!(rejected.contains("host bits are set"), "{rejected}");
    assert_ok(
        &probe_tcp(&topo.client, cg, b, HTTPS),
        "b after the rejected reload",
    );
    assert_timeout(
        &probe_tcp(&topo.client, cg, a, HTTPS),
        "a after the rejected reload",
    );

    let held = held.finish();
    assert_ok(&held, "the connection established before the reload");
}

/// `GET path` on the agent's metrics listener: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a read timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// The value of one sample (`name{labels}`) in a Prometheus text exposition.
fn sample(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_and_health_endpoints_answer() {
    if !require_root() {
        return;
    }
    let policy = TempFile::new(&allow_only(&REMOTE_V4_A.to_string()));
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let _servers = [
        Server::tcp(&topo.server, None, REMOTE_V4_A, HTTPS),
        Server::tcp(&topo.server, None, REMOTE_V4_B, HTTPS),
    ];
    let agent = start_agent(&policy, &cgroup, None);
    let line = agent.wait_for_stderr("serving /metrics", RELOAD_TIMEOUT);
    let addr = line
        .rsplit("http://")
        .next()
        .expect("the listener's address")
        .trim()
        .to_owned();

    assert_eq!(http_get(&addr, "/healthz").0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(&addr, "/readyz").0, "HTTP/1.1 200 OK");
    assert!(http_get(&addr, "/nope").0.contains("404"));

    let cg = Some(&cgroup);
    assert_ok(&probe_tcp(&topo.client, cg, REMOTE_V4_A, HTTPS), "allowed");
    assert_timeout(&probe_tcp(&topo.client, cg, REMOTE_V4_B, HTTPS), "denied");
    // Counters are published once a second.
    let deadline = std::time::Instant::now() + RELOAD_TIMEOUT;
    let body = loop {
        let (status, body) = http_get(&addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        if sample(&body, "egress_packets_total{verdict=\"dropped\"}").is_some_and(|v| v >= 1) {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no drop counted in /metrics:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(sample(&body, "egress_ready"), Some(1));
    assert!(sample(&body, "egress_packets_total{verdict=\"allowed\"}").is_some_and(|v| v >= 1));
    assert_eq!(sample(&body, "egress_learned_addresses"), Some(0));
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("`series value`");
        assert!(value.parse::<u64>().is_ok(), "{line}");
        assert!(name.starts_with("egress_"), "{line}");
    }
}

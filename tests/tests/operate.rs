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

//! Proves the fixtures themselves, without the agent: the topology routes TCP and UDP in
//! both families, the probe reports results faithfully, cgroups work from inside
//! namespaces, and every guard leaves nothing behind, also when a test panics.

use std::net::{IpAddr, Ipv4Addr};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use egress_tests::{
    ATTACH_TIMEOUT, Agent, ProbeResult, REMOTE_V4_A, REMOTE_V6_A, Server, TestCgroup, Topology,
    egress_probe_bin, probe_tcp, probe_udp, require_root,
};

const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
/// Nobody listens here.
const CLOSED_PORT: u16 = 7999;
/// A documentation address the topology does not assign; tests route it as they need.
const UNASSIGNED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);

fn assert_ok(result: &ProbeResult, what: &str) {
    assert!(result.ok, "{what} failed: {result:?}");
}

/// Echo over TCP and UDP from the client to a remote server address.
fn assert_echo_reaches(remote: IpAddr) {
    let topo = Topology::new();
    let _tcp = Server::tcp(&topo.server, None, remote, TCP_PORT);
    let _udp = Server::udp(&topo.server, None, remote, UDP_PORT);
    assert_ok(&probe_tcp(&topo.client, None, remote, TCP_PORT), "tcp");
    assert_ok(&probe_udp(&topo.client, None, remote, UDP_PORT), "udp");
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn echo_reaches_remote_v4() {
    if !require_root() {
        return;
    }
    assert_echo_reaches(REMOTE_V4_A.into());
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn echo_reaches_remote_v6() {
    if !require_root() {
        return;
    }
    assert_echo_reaches(REMOTE_V6_A.into());
}

#[test]
fn probe_bin_is_the_one_cargo_built() {
    if std::env::var_os("EGRESS_PROBE_BIN").is_some() {
        return;
    }
    let expected = Path::new(env!("CARGO_BIN_EXE_egress-probe"));
    assert_eq!(
        egress_probe_bin()
            .canonicalize()
            .expect("probe path exists"),
        expected.canonicalize().expect("cargo's probe path exists")
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn probes_and_servers_run_inside_a_test_cgroup() {
    if !require_root() {
        return;
    }
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let path = cgroup.path().to_owned();
    let server = Server::tcp(&topo.server, Some(&cgroup), REMOTE_V4_A, TCP_PORT);
    assert_eq!(
        cgroup.procs(),
        vec![server.pid()],
        "server joined the cgroup"
    );
    assert_ok(
        &probe_tcp(&topo.client, Some(&cgroup), REMOTE_V4_A, TCP_PORT),
        "tcp from the cgroup",
    );
    assert_eq!(
        cgroup.procs(),
        vec![server.pid()],
        "the probe client exited"
    );
    // Dropping the cgroup first must kill the server still inside it.
    drop(cgroup);
    assert!(!path.exists(), "{} removed", path.display());
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn refused_connection_fails_fast() {
    if !require_root() {
        return;
    }
    let topo = Topology::new();
    // ECONNREFUSED, not a timeout: the reset came back, however long the probe took to
    // start (no wall-clock bound, which a slow machine could miss).
    for remote in [IpAddr::from(REMOTE_V4_A), REMOTE_V6_A.into()] {
        let result = probe_tcp(&topo.client, None, remote, CLOSED_PORT);
        assert!(!result.ok, "{remote}: {result:?}");
        assert_eq!(
            result.errno,
            Some(libc::ECONNREFUSED),
            "{remote}: {result:?}"
        );
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn silence_is_reported_as_timeout() {
    if !require_root() {
        return;
    }
    let topo = Topology::new();
    // The server silently discards traffic for this documentation address, as an
    // egress drop would.
    topo.server
        .ip(&format!("route add blackhole {UNASSIGNED}/32"));
    let tcp = probe_tcp(&topo.client, None, UNASSIGNED, TCP_PORT);
    // Unconnected UDP ignores the ICMP port unreachable, so a closed port is silence too.
    let udp = probe_udp(&topo.client, None, REMOTE_V4_A, CLOSED_PORT);
    for (what, result) in [("tcp", tcp), ("udp", udp)] {
        assert!(!result.ok, "{what}: {result:?}");
        assert_eq!(result.errno, Some(libc::ETIMEDOUT), "{what}: {result:?}");
        assert_eq!(
            result.error.as_deref(),
            Some("timeout"),
            "{what}: {result:?}"
        );
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn send_errors_carry_their_errno() {
    if !require_root() {
        return;
    }
    let topo = Topology::new();
    // A prohibit route fails sendto/connect locally (EACCES), the same path by which a
    // cgroup egress drop fails sendto with EPERM.
    topo.client
        .ip(&format!("route add prohibit {UNASSIGNED}/32"));
    let udp = probe_udp(&topo.client, None, UNASSIGNED, UDP_PORT);
    assert_eq!(udp.errno, Some(libc::EACCES), "{udp:?}");
    let tcp = probe_tcp(&topo.client, None, UNASSIGNED, TCP_PORT);
    assert_eq!(tcp.errno, Some(libc::EACCES), "{tcp:?}");
}

/// What a test created, to check for leftovers after its guards are gone.
struct Created {
    namespaces: Vec<String>,
    cgroup: PathBuf,
    server_pid: u32,
}

/// Builds every kind of fixture, with a server left running inside the cgroup.
fn build_fixtures(created: &mut Option<Created>, then_panic: bool) {
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let server = Server::udp(&topo.server, Some(&cgroup), REMOTE_V6_A, UDP_PORT);
    *created = Some(Created {
        namespaces: vec![topo.client.name().to_owned(), topo.server.name().to_owned()],
        cgroup: cgroup.path().to_owned(),
        server_pid: server.pid(),
    });
    assert!(!then_panic, "deliberate panic to test cleanup on unwind");
}

fn assert_nothing_left(created: &Created) {
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    for name in &created.namespaces {
        assert!(
            !list
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name)),
            "namespace {name} left behind:\n{list}"
        );
    }
    assert!(
        !created.cgroup.exists(),
        "cgroup {} left behind",
        created.cgroup.display()
    );
    let server = PathBuf::from(format!("/proc/{}", created.server_pid));
    assert!(
        !server.exists(),
        "server process {} left behind",
        created.server_pid
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn guards_leave_nothing_behind() {
    if !require_root() {
        return;
    }
    let mut created = None;
    build_fixtures(&mut created, false);
    assert_nothing_left(&created.expect("fixtures were built"));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn guards_leave_nothing_behind_after_a_panic() {
    if !require_root() {
        return;
    }
    let mut created = None;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| build_fixtures(&mut created, true)));
    assert!(outcome.is_err(), "build_fixtures should have panicked");
    assert_nothing_left(&created.expect("fixtures were built before the panic"));
}

/// A stand-in agent: one event on stdout, logs on stderr, a clean exit on SIGTERM.
/// The trap comes first, so SIGTERM cannot arrive before it is installed; the log line comes
/// before the event, so it is written once the test has seen the event and stops it.
const FAKE_AGENT: &str = r#"trap 'echo "agent: bye" >&2; exit 0' TERM
echo 'agent: attached' >&2; echo '{"event":"ready","n":1}'
while :; do sleep 0.05; done"#;

#[test]
fn agent_guard_captures_output_and_terminates() {
    let mut agent = Agent::spawn(Path::new("/bin/sh"), &["-c", FAKE_AGENT]);
    let event = agent.wait_for_named("ready", ATTACH_TIMEOUT);
    assert_eq!(event["n"], 1);
    assert_eq!(agent.events().len(), 1);
    let status = agent.terminate();
    assert!(status.success(), "{status}");
    assert_eq!(agent.stderr_lines(), ["agent: attached", "agent: bye"]);
}

#[test]
fn agent_guard_reports_its_own_exit() {
    let mut agent = Agent::spawn(
        Path::new("/bin/sh"),
        &["-c", "echo 'bad policy' >&2; exit 3"],
    );
    let status = agent.wait_for_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(3));
    assert_eq!(agent.stderr_lines(), ["bad policy"]);
}

#[test]
fn agent_guard_kills_an_agent_that_ignores_sigterm() {
    let script = r#"trap '' TERM; echo '{"event":"ignoring_sigterm"}'; exec sleep 60"#;
    let agent = Agent::spawn(Path::new("/bin/sh"), &["-c", script]);
    let pid = libc::pid_t::try_from(agent.pid()).expect("pid fits in pid_t");
    agent.wait_for_named("ignoring_sigterm", ATTACH_TIMEOUT);
    drop(agent);
    // SAFETY: signal 0 only checks whether the pid exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "agent {pid} survived its guard");
}

//! The real agent against real traffic: what the policy allows passes, everything else
//! from the enforced cgroup is dropped (TCP connects time out, UDP sends fail with
//! EPERM) and reported, in both address families; audit mode passes everything and
//! reports exactly what enforcement would drop; the cgroup scope, inbound flows and
//! loopback are respected; SIGTERM leaves nothing attached; and a bad policy, or a policy
//! file that never ends or nests too deep, is rejected without touching the kernel.
//!
//! The agent runs in the host namespace (inside `ip netns exec` the cgroup2 mount is
//! hidden) and is attached only to a fresh [`TestCgroup`], never to the cgroup2 root:
//! only the probes placed in that cgroup are enforced.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output};
use std::time::Duration;

use egress_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, REMOTE_V4_A, REMOTE_V4_B, REMOTE_V6_A, REMOTE_V6_B,
    SERVER_V4, SERVER_V6, Server, TempFile, TestCgroup, Topology, agent_bin, assert_eperm,
    assert_ok, assert_reported_exactly, assert_timeout, attached_programs, probe_tcp, probe_udp,
    require_root, run_args, start_agent, stop_and_collect, tcp, udp, wait_for_flows,
};

/// The policy every test enforces: TCP 443 and UDP 53 to `REMOTE_V4_A` and
/// `REMOTE_V6_A` (spelt differently), nothing else.
const POLICY: &str = "\
mode: enforce
allow:
  - cidr: 203.0.113.10/32
    ports: [HTTPS:443, UDP:53]
  - cidr: 2001:db8:2::10/128
    ports: [UDP:53, TCP:443]
";

/// Host bits set: `check` and `run` must both reject it.
const BAD_POLICY: &str = "\
mode: enforce
allow:
  - cidr: 203.0.113.5/24
    ports: [HTTPS:443]
";

/// How long a rejected `run` may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

const HTTPS: u16 = 443;
const ALT_HTTPS: u16 = 8443;
const DNS: u16 = 53;

/// Allowed and denied traffic from the cgroup, in one address family: `allowed` takes
/// TCP 443 and UDP 53 only; `denied` is covered by no rule.
fn enforce_family(allowed: IpAddr, denied: IpAddr) {
    let policy = TempFile::new(POLICY);
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let _servers = [
        Server::tcp(&topo.server, None, allowed, HTTPS),
        Server::tcp(&topo.server, None, allowed, ALT_HTTPS),
        Server::udp(&topo.server, None, allowed, DNS),
        Server::tcp(&topo.server, None, denied, HTTPS),
        Server::udp(&topo.server, None, denied, DNS),
    ];
    let mut agent = start_agent(&policy, &cgroup, None);
    let cg = Some(&cgroup);

    // Allowed traffic first: the ring buffer keeps order, so had it been reported, it
    // would be among the events by the time the denied flows show up.
    assert_ok(
        &probe_tcp(&topo.client, cg, allowed, HTTPS),
        "tcp allowed:443",
    );
    assert_ok(&probe_udp(&topo.client, cg, allowed, DNS), "udp allowed:53");
    assert_timeout(
        &probe_tcp(&topo.client, cg, allowed, ALT_HTTPS),
        "tcp allowed:8443",
    );
    assert_timeout(
        &probe_tcp(&topo.client, cg, denied, HTTPS),
        "tcp denied:443",
    );
    assert_eperm(&probe_udp(&topo.client, cg, denied, DNS), "udp denied:53");
    let denied_flows = [
        tcp(allowed, ALT_HTTPS),
        tcp(denied, HTTPS),
        udp(denied, DNS),
    ];

    wait_for_flows(&agent, &denied_flows);
    let reported = stop_and_collect(&mut agent, "deny", &cgroup);
    assert_reported_exactly(&reported, &denied_flows);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn enforce_ipv4() {
    if !require_root() {
        return;
    }
    enforce_family(REMOTE_V4_A.into(), REMOTE_V4_B.into());
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn enforce_ipv6() {
    if !require_root() {
        return;
    }
    enforce_family(REMOTE_V6_A.into(), REMOTE_V6_B.into());
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn audit_mode() {
    if !require_root() {
        return;
    }
    let policy = TempFile::new(POLICY);
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let (a4, b4) = (IpAddr::from(REMOTE_V4_A), IpAddr::from(REMOTE_V4_B));
    let (a6, b6) = (IpAddr::from(REMOTE_V6_A), IpAddr::from(REMOTE_V6_B));
    let mut servers = Vec::new();
    for addr in [a4, a6] {
        servers.push(Server::tcp(&topo.server, None, addr, HTTPS));
        servers.push(Server::tcp(&topo.server, None, addr, ALT_HTTPS));
        servers.push(Server::udp(&topo.server, None, addr, DNS));
    }
    for addr in [b4, b6] {
        servers.push(Server::tcp(&topo.server, None, addr, HTTPS));
        servers.push(Server::udp(&topo.server, None, addr, DNS));
    }
    let mut agent = start_agent(&policy, &cgroup, Some("audit"));
    let cg = Some(&cgroup);

    // Allowed first (see enforce_family), then what enforce mode would drop.
    let allowed = [tcp(a4, HTTPS), udp(a4, DNS), tcp(a6, HTTPS), udp(a6, DNS)];
    let would_drop = [
        tcp(a4, ALT_HTTPS),
        tcp(b4, HTTPS),
        udp(b4, DNS),
        tcp(a6, ALT_HTTPS),
        tcp(b6, HTTPS),
        udp(b6, DNS),
    ];
    for (addr, port, proto) in allowed.iter().chain(&would_drop) {
        let ip: IpAddr = addr.parse().expect("flows hold addresses");
        let result = match *proto {
            "tcp" => probe_tcp(&topo.client, cg, ip, *port),
            _ => probe_udp(&topo.client, cg, ip, *port),
        };
        assert_ok(&result, &format!("{proto} {addr} {port} in audit mode"));
    }

    wait_for_flows(&agent, &would_drop);
    let reported = stop_and_collect(&mut agent, "audit", &cgroup);
    assert_reported_exactly(&reported, &would_drop);
    // "In audit mode a flow is reported once, not once per packet."
    for (flow, count) in &reported {
        assert_eq!(*count, 1, "{flow:?} reported {count} times");
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn unrelated_processes_are_not_enforced() {
    if !require_root() {
        return;
    }
    let policy = TempFile::new(POLICY);
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let _server = Server::tcp(&topo.server, None, REMOTE_V4_B, HTTPS);
    let mut agent = start_agent(&policy, &cgroup, None);

    // The same destination: dropped from the cgroup, reached from outside it.
    assert_timeout(
        &probe_tcp(&topo.client, Some(&cgroup), REMOTE_V4_B, HTTPS),
        "tcp denied:443 from the cgroup",
    );
    assert_ok(
        &probe_tcp(&topo.client, None, REMOTE_V4_B, HTTPS),
        "tcp denied:443 from outside the cgroup",
    );
    // Mark the end with a denied probe: once it is reported, so is anything before it.
    assert_eperm(
        &probe_udp(&topo.client, Some(&cgroup), REMOTE_V4_B, DNS),
        "udp marker",
    );

    let expected = [tcp(REMOTE_V4_B, HTTPS), udp(REMOTE_V4_B, DNS)];
    wait_for_flows(&agent, &expected);
    let reported = stop_and_collect(&mut agent, "deny", &cgroup);
    assert_reported_exactly(&reported, &expected);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn server_in_cgroup_answers_unlisted_client() {
    if !require_root() {
        return;
    }
    server_in_cgroup_answers(CLIENT_V4.into(), SERVER_V4.into());
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn server_in_cgroup_answers_unlisted_client_over_ipv6() {
    if !require_root() {
        return;
    }
    server_in_cgroup_answers(CLIENT_V6.into(), SERVER_V6.into());
}

/// Servers in the cgroup (on `client`) answer a client no rule lists (`server`), over TCP
/// and UDP, while the cgroup may not start traffic to that client.
fn server_in_cgroup_answers(client: IpAddr, server: IpAddr) {
    const ECHO_TCP: u16 = 7443;
    const ECHO_UDP: u16 = 7453;
    const OUT_TCP: u16 = 7444;
    const OUT_UDP: u16 = 7454;
    let policy = TempFile::new(POLICY);
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let cg = Some(&cgroup);
    // Servers inside the enforced cgroup, in the client namespace...
    let tcp_server = Server::tcp(&topo.client, cg, client, ECHO_TCP);
    let udp_server = Server::udp(&topo.client, cg, client, ECHO_UDP);
    assert!(cgroup.procs().contains(&tcp_server.pid()));
    assert!(cgroup.procs().contains(&udp_server.pid()));
    // ...and, for the outbound check, servers on the client's address outside it.
    let _out_tcp = Server::tcp(&topo.server, None, server, OUT_TCP);
    let _out_udp = Server::udp(&topo.server, None, server, OUT_UDP);
    let mut agent = start_agent(&policy, &cgroup, None);

    // server is on no rule, yet its requests to the cgroup's servers get answers.
    assert_ok(
        &probe_tcp(&topo.server, None, client, ECHO_TCP),
        "inbound tcp to the server in the cgroup",
    );
    assert_ok(
        &probe_udp(&topo.server, None, client, ECHO_UDP),
        "inbound udp to the server in the cgroup",
    );
    // But nothing in the cgroup may start traffic to that client.
    assert_timeout(
        &probe_tcp(&topo.client, cg, server, OUT_TCP),
        "outbound tcp from the cgroup to the unlisted client",
    );
    assert_eperm(
        &probe_udp(&topo.client, cg, server, OUT_UDP),
        "outbound udp from the cgroup to the unlisted client",
    );

    // The replies were never denied: only the outbound attempts are reported.
    let expected = [tcp(server, OUT_TCP), udp(server, OUT_UDP)];
    wait_for_flows(&agent, &expected);
    let reported = stop_and_collect(&mut agent, "deny", &cgroup);
    assert_reported_exactly(&reported, &expected);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn loopback_works() {
    if !require_root() {
        return;
    }
    const PORT: u16 = 7080;
    let policy = TempFile::new(POLICY);
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let cg = Some(&cgroup);
    let loopbacks = [
        IpAddr::from(Ipv4Addr::LOCALHOST),
        Ipv6Addr::LOCALHOST.into(),
    ];
    let mut servers = Vec::new();
    for addr in loopbacks {
        servers.push(Server::tcp(&topo.client, cg, addr, PORT));
        servers.push(Server::udp(&topo.client, cg, addr, PORT));
    }
    let mut agent = start_agent(&policy, &cgroup, None);

    for addr in loopbacks {
        assert_ok(
            &probe_tcp(&topo.client, cg, addr, PORT),
            &format!("tcp {addr}"),
        );
        assert_ok(
            &probe_udp(&topo.client, cg, addr, PORT),
            &format!("udp {addr}"),
        );
    }
    // Mark the end with a denied probe: once it is reported, so is anything before it.
    assert_eperm(&probe_udp(&topo.client, cg, REMOTE_V4_B, DNS), "udp marker");

    let expected = [udp(REMOTE_V4_B, DNS)];
    wait_for_flows(&agent, &expected);
    let reported = stop_and_collect(&mut agent, "deny", &cgroup);
    assert_reported_exactly(&reported, &expected);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn sigterm_detaches_everything() {
    if !require_root() {
        return;
    }
    let policy = TempFile::new(POLICY);
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let _tcp = Server::tcp(&topo.server, None, REMOTE_V4_B, HTTPS);
    let _udp = Server::udp(&topo.server, None, REMOTE_V4_B, DNS);
    assert_eq!(
        attached_programs(cgroup.path()),
        Vec::<u64>::new(),
        "a fresh cgroup has no programs"
    );
    let mut agent = start_agent(&policy, &cgroup, None);

    let attached = attached_programs(cgroup.path());
    assert!(
        !attached.is_empty(),
        "bpftool lists no programs on {} while the agent runs",
        cgroup.path().display()
    );
    let cg = Some(&cgroup);
    assert_timeout(
        &probe_tcp(&topo.client, cg, REMOTE_V4_B, HTTPS),
        "tcp before SIGTERM",
    );
    assert_eperm(
        &probe_udp(&topo.client, cg, REMOTE_V4_B, DNS),
        "udp before SIGTERM",
    );

    let status = agent.terminate();
    assert!(
        status.success(),
        "agent exited with {status}; stderr:\n{}",
        agent.stderr_lines().join("\n")
    );
    let stderr = agent.stderr_lines();
    assert!(
        stderr
            .iter()
            .any(|line| line.contains("SIGTERM") && line.contains("detached")),
        "no SIGTERM summary mentioning \"detached\" on stderr:\n{}",
        stderr.join("\n")
    );
    assert_eq!(
        attached_programs(cgroup.path()),
        Vec::<u64>::new(),
        "programs left on {} after SIGTERM (were: {attached:?})",
        cgroup.path().display()
    );
    assert_ok(
        &probe_tcp(&topo.client, cg, REMOTE_V4_B, HTTPS),
        "tcp after SIGTERM",
    );
    assert_ok(
        &probe_udp(&topo.client, cg, REMOTE_V4_B, DNS),
        "udp after SIGTERM",
    );
}

/// Runs `egress-agent ARGS...` to completion.
fn agent_output(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .output()
        .expect("cannot run egress-agent")
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn check_command() {
    if !require_root() {
        return;
    }
    let good = TempFile::new(POLICY);
    let good_path = good.path().to_str().expect("temp paths are UTF-8");
    let out = agent_output(&["check", "--config", good_path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check of a good policy failed ({}): {stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"# mode: enforce"), "{stdout}");
    // No `dns` section: the node's resolvers are trusted, and `check` says so.
    let dns = lines
        .iter()
        .find(|l| l.starts_with("# implicit: DNS (UDP:53 TCP:53) to "))
        .unwrap_or_else(|| panic!("no implicit DNS line:\n{stdout}"));
    assert!(
        dns.contains("the policy has no dns.resolvers: the node's resolvers are trusted"),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("# dns: min_ttl 30s, max_ttl 86400s")),
        "{stdout}"
    );
    let rules: Vec<&str> = lines.into_iter().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rules.len(), 2, "one line per rule:\n{stdout}");
    let rule_for = |cidr: &str| -> Vec<&str> {
        let line = rules
            .iter()
            .find(|line| line.split_whitespace().next() == Some(cidr))
            .unwrap_or_else(|| panic!("no rule for {cidr}:\n{stdout}"));
        // `CIDR PORTS... # origins`
        let mut ports: Vec<&str> = line
            .split_whitespace()
            .skip(1)
            .take_while(|word| *word != "#")
            .collect();
        ports.sort_unstable();
        ports
    };
    assert_eq!(rule_for("203.0.113.10/32"), ["TCP:443", "UDP:53"]);
    assert_eq!(rule_for("2001:db8:2::10/128"), ["TCP:443", "UDP:53"]);

    let bad = TempFile::new(BAD_POLICY);
    let bad_path = bad.path().to_str().expect("temp paths are UTF-8");
    let out = agent_output(&["check", "--config", bad_path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check accepted a bad policy: {stderr}"
    );
    assert!(
        stderr.contains(bad_path) && stderr.contains("allow[0]"),
        "the error should name {bad_path} and allow[0]: {stderr}"
    );

    // `run` rejects it the same way, before attaching anything.
    let cgroup = TestCgroup::new();
    let pins = PinDir::new();
    let mut agent = Agent::spawn(&agent_bin(), &run_args(&bad, &cgroup, &pins));
    let status = agent.wait_for_exit(EXIT_TIMEOUT);
    let stderr = agent.stderr_lines().join("\n");
    assert!(!status.success(), "run accepted a bad policy: {stderr}");
    assert!(
        stderr.contains(bad_path) && stderr.contains("allow[0]"),
        "the error should name {bad_path} and allow[0]: {stderr}"
    );
    assert!(agent.events().is_empty(), "events from a rejected run");
    assert_eq!(
        attached_programs(cgroup.path()),
        Vec::<u64>::new(),
        "a rejected run attached programs"
    );
    assert!(!pins.root().exists(), "a rejected run pinned state");
}

/// `egress-agent ARGS...` with at most 1 GiB of address space: an agent that reads a file
/// that never ends to its end fails there, instead of taking the machine's memory.
fn spawn_bounded(args: &[OsString]) -> Agent {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Agent::spawn_command(cmd)
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_policy_file_that_never_ends_or_nests_too_deep_is_refused_at_once() {
    if !require_root() {
        return;
    }
    let deep = TempFile::new(&format!(
        "allow: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    ));
    let cgroup = TestCgroup::new();
    let pins = PinDir::new();
    for (config, problem) in [
        (std::path::Path::new("/dev/zero"), "larger than 64 MiB"),
        (
            deep.path(),
            "line 1: collections nested more than 64 levels deep",
        ),
    ] {
        let check: Vec<OsString> = vec!["check".into(), "--config".into(), config.into()];
        let mut run = run_args(&deep, &cgroup, &pins);
        let policy_arg = 1 + run.iter().position(|a| a == "--config").expect("--config");
        run[policy_arg] = config.into();
        for args in [check, run] {
            let mut agent = spawn_bounded(&args);
            let status = agent.wait_for_exit(EXIT_TIMEOUT);
            let stderr = agent.stderr_lines().join("\n");
            assert!(!status.success(), "{args:?} succeeded: {stderr}");
            let expected = format!("{}: {problem}", config.display());
            assert!(
                stderr.contains(&expected),
                "{args:?}: no {expected:?} in: {stderr}"
            );
        }
    }
    assert_eq!(
        attached_programs(cgroup.path()),
        Vec::<u64>::new(),
        "a rejected run attached programs"
    );
    assert!(!pins.root().exists(), "a rejected run pinned state");
}

//! Operating a running agent: policy reloads (a rename over the file, SIGHUP, a bad
//! policy, an edit while the agent starts) apply atomically without dropping established
//! flows, and the metrics and health endpoints answer.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Duration,
};

use egress_tests::{
    ATTACH_TIMEOUT, Agent, Netns, PinDir, REMOTE_V4_A, REMOTE_V4_B, REMOTE_V6_A, Server, TempFile,
    TestCgroup, Topology, agent_bin, assert_eperm, assert_ok, assert_timeout, dns::tcp_hold,
    http_get, probe_tcp, probe_udp, require_root, run_args, start_agent,
};
use serde_json::json;

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

/// A policy that allows only `a`, HTTPS servers on `a` and `b`, and the cgroup to enforce.
fn reload_world(a: Ipv4Addr, b: Ipv4Addr) -> (TempFile, Topology, TestCgroup, [Server; 2]) {
    let topo = Topology::new();
    let servers = [
        Server::tcp(&topo.server, None, a, HTTPS),
        Server::tcp(&topo.server, None, b, HTTPS),
    ];
    let policy = TempFile::new(&allow_only(&a.to_string()));
    (policy, topo, TestCgroup::new(), servers)
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn reloads_apply_atomically_keep_established_flows_and_reject_bad_policies() {
    if !require_root() {
        return;
    }
    let (a, b) = (REMOTE_V4_A, REMOTE_V4_B);
    let (policy, topo, cgroup, _servers) = reload_world(a, b);
    let mut agent = start_agent(&policy, &cgroup, None);
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
    agent.wait_for_named("policy_reloaded", RELOAD_TIMEOUT);
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
    let rejected = agent.wait_for_named("policy_reload_rejected", RELOAD_TIMEOUT);
    let error = rejected["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("host bits are set"), "{rejected}");
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

    // The operator is told why on stderr: read once the agent has exited, when all of its
    // output is in (its stdout and stderr are read apart, in no set order).
    assert!(agent.terminate().success());
    let stderr = agent.stderr_lines();
    assert!(
        stderr
            .iter()
            .any(|line| line.contains("policy reload rejected") && line.contains(&error)),
        "the operator is not told why: {stderr:?}"
    );
}

/// The agent reads the policy long before it watches the file: loading and attaching the
/// programs come between. An edit made then is applied once it watches.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn an_edit_while_the_agent_starts_is_applied() {
    if !require_root() {
        return;
    }
    let (a, b) = (REMOTE_V4_A, REMOTE_V4_B);
    let (policy, topo, cgroup, _servers) = reload_world(a, b);
    let pins = PinDir::new();
    let mut cmd = Command::new(agent_bin());
    cmd.args(run_args(&policy, &cgroup, &pins))
        .env("RUST_LOG", "info");
    let agent = Agent::spawn_command(cmd);
    // Logged after the policy is read, before the programs load.
    agent.wait_for_named("serving", ATTACH_TIMEOUT);
    replace(&policy, &allow_only(&b.to_string()));
    let attached = agent.wait_for_named("attached", ATTACH_TIMEOUT);
    assert_eq!(
        (
            &attached["mode"],
            &attached["rules"],
            &attached["cidr_entries"]
        ),
        (&json!("enforce"), &json!(1), &json!(1)),
        "{attached}"
    );
    agent.wait_for_named("policy_reloaded", RELOAD_TIMEOUT);
    let cg = Some(&cgroup);
    assert_ok(
        &probe_tcp(&topo.client, cg, b, HTTPS),
        "b, allowed by the edit",
    );
    assert_timeout(
        &probe_tcp(&topo.client, cg, a, HTTPS),
        "a, allowed before the edit",
    );
}

/// A sample's labels, sorted by name.
type Labels = BTreeMap<String, String>;

/// A Prometheus text exposition (format 0.0.4), parsed strictly: every family is a
/// `# HELP` line, a `# TYPE` line (counter or gauge) and at least one sample of that name;
/// no family or series appears twice; every value is an integer. Panics otherwise.
struct Exposition {
    samples: BTreeMap<(String, Labels), u64>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut samples = BTreeMap::new();
        let mut families = BTreeSet::new();
        let mut lines = text.lines().peekable();
        while let Some(help) = lines.next() {
            let (name, doc) = help
                .strip_prefix("# HELP ")
                .and_then(|h| h.split_once(' '))
                .unwrap_or_else(|| panic!("expected a HELP line, got {help:?} in:\n{text}"));
            assert!(!doc.trim().is_empty(), "{name} has an empty HELP");
            assert!(families.insert(name.to_owned()), "{name} twice:\n{text}");
            let kind = lines
                .next()
                .and_then(|t| t.strip_prefix(&format!("# TYPE {name} ")))
                .unwrap_or_else(|| panic!("no TYPE line after the HELP of {name}:\n{text}"));
            assert!(matches!(kind, "counter" | "gauge"), "{name} is a {kind}");
            let mut count = 0;
            while let Some(line) = lines.next_if(|l| !l.starts_with('#')) {
                let (series, value) = line.rsplit_once(' ').expect("`series value`");
                let value = value
                    .parse()
                    .unwrap_or_else(|_| panic!("not an integer: {line}"));
                let (sample_name, labels) = match series.split_once('{') {
                    None => (series, Labels::new()),
                    Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}').expect("`}`"))),
                };
                assert_eq!(sample_name, name, "a sample outside its family: {line}");
                let key = (name.to_owned(), labels);
                assert!(samples.insert(key, value).is_none(), "{line} twice");
                count += 1;
            }
            assert!(count > 0, "{name} has no samples");
        }
        Exposition { samples }
    }

    /// The sample with exactly these labels, if present.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    /// `egress_packets_total{verdict, proto}`, which must be there.
    fn packets(&self, verdict: &str, proto: &str) -> u64 {
        self.get(
            "egress_packets_total",
            &[("verdict", verdict), ("proto", proto)],
        )
        .unwrap_or_else(|| panic!("no egress_packets_total for {verdict} {proto}"))
    }
}

/// `a="x",b="y"` (no commas or quotes inside values: the agent writes none).
fn parse_labels(body: &str) -> Labels {
    body.split(',')
        .map(|pair| {
            let (k, v) = pair.split_once('=').expect("`label=value`");
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
            (k.to_owned(), v.expect("a quoted label value").to_owned())
        })
        .collect()
}

/// Sends one ICMP (or ICMPv6) echo request to `dst` from `netns`, inside `cgroup`, and
/// returns `sendto`'s errno (0: sent). No reply is awaited.
///
/// The probe binary has no ICMP mode and `ping` is not among the test dependencies, so a
/// forked child does it between fork and exec (`pre_exec`), with plain system calls: join
/// the cgroup (the socket's cgroup is its creator's), enter the namespace, open a raw socket,
/// send, and `_exit` with the errno. It never execs.
fn ping(netns: &Netns, cgroup: &TestCgroup, dst: IpAddr) -> i32 {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let ns = fs::File::open(format!("/run/netns/{}", netns.name())).expect("open the netns");
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.path().join("cgroup.procs"))
        .expect("open cgroup.procs");
    let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());
    // Echo request, id 0x4567, sequence 1, a short payload.
    let mut packet = vec![0, 0, 0, 0, 0x45, 0x67, 0, 1];
    packet.extend_from_slice(b"egress-metrics");
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (family, protocol, addr_len) = match dst {
        IpAddr::V4(v4) => {
            packet[0] = 8;
            let sum = internet_checksum(&packet);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut addr).cast(), sin) };
            (
                libc::AF_INET,
                libc::IPPROTO_ICMP,
                size_of::<libc::sockaddr_in>(),
            )
        }
        IpAddr::V6(v6) => {
            // The kernel fills in the ICMPv6 checksum of raw ICMPv6 sockets.
            packet[0] = 128;
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = v6.octets();
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut addr).cast(), sin6) };
            (
                libc::AF_INET6,
                libc::IPPROTO_ICMPV6,
                size_of::<libc::sockaddr_in6>(),
            )
        }
    };
    let mut cmd = std::process::Command::new("/bin/true");
    // SAFETY: the hook runs in the forked child and makes only async-signal-safe system
    // calls on memory prepared before the fork (no allocation, no locks); `ns` and `procs`
    // stay open until the child is reaped.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return fail();
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return fail();
            }
            let fd = libc::socket(family, libc::SOCK_RAW, protocol);
            if fd < 0 {
                return fail();
            }
            let sent = libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                addr_len as libc::socklen_t,
            );
            libc::_exit(if sent < 0 {
                *libc::__errno_location()
            } else {
                0
            })
        });
    }
    let status = cmd
        .status()
        .unwrap_or_else(|err| panic!("ICMP echo to {dst}: the child failed to set up: {err}"));
    drop((ns, procs));
    status
        .code()
        .unwrap_or_else(|| panic!("ICMP echo to {dst}: the child died: {status}"))
}

/// RFC 1071 checksum (ICMPv4 has no pseudo-header).
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

const METRICS_UDP_PORT: u16 = 5353;

/// Per-protocol verdict counters for traffic this test makes, in enforce mode: A is allowed
/// on TCP 443, UDP 5353 and ICMP, REMOTE_V6_A on ICMP only, B on nothing.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn metrics_and_health_endpoints_answer() {
    if !require_root() {
        return;
    }
    let (a, b, a6) = (REMOTE_V4_A, REMOTE_V4_B, REMOTE_V6_A);
    let policy = TempFile::new(&format!(
        "mode: enforce\nallow:\n  - cidr: {a}/32\n    ports: [HTTPS:443, UDP:{METRICS_UDP_PORT}, ICMP]\n  - cidr: {a6}/128\n    ports: [ICMP]\n"
    ));
    let topo = Topology::new();
    let cgroup = TestCgroup::new();
    let _servers = [
        Server::tcp(&topo.server, None, a, HTTPS),
        Server::tcp(&topo.server, None, b, HTTPS),
        Server::udp(&topo.server, None, a, METRICS_UDP_PORT),
        Server::udp(&topo.server, None, b, METRICS_UDP_PORT),
    ];
    let agent = start_agent(&policy, &cgroup, None);
    let addr = agent.metrics_addr();

    assert_eq!(http_get(&addr, "/healthz").0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(&addr, "/readyz").0, "HTTP/1.1 200 OK");
    assert!(http_get(&addr, "/nope").0.contains("404"));
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let before = Exposition::parse(&body);
    for verdict in ["allowed", "dropped", "audited"] {
        for proto in ["tcp", "udp", "icmp", "other"] {
            assert_eq!(before.packets(verdict, proto), 0, "{verdict} {proto}");
        }
    }

    let cg = Some(&cgroup);
    assert_ok(&probe_tcp(&topo.client, cg, a, HTTPS), "tcp to a");
    assert_timeout(&probe_tcp(&topo.client, cg, b, HTTPS), "tcp to b");
    assert_ok(
        &probe_udp(&topo.client, cg, a, METRICS_UDP_PORT),
        "udp to a",
    );
    assert_eperm(
        &probe_udp(&topo.client, cg, b, METRICS_UDP_PORT),
        "udp to b",
    );
    assert_eq!(ping(&topo.client, &cgroup, a.into()), 0, "ping a");
    assert_eq!(ping(&topo.client, &cgroup, a6.into()), 0, "ping a (IPv6)");
    assert_eq!(
        ping(&topo.client, &cgroup, b.into()),
        libc::EPERM,
        "ping b is dropped"
    );

    // Exact where the traffic is: one datagram each way of UDP, three echo requests. A TCP
    // connection is at least SYN, ACK, the line and FIN; a dropped connect is its SYN and
    // however many retransmissions fit in the probe's timeout.
    let exact = [
        (("allowed", "udp"), 1),
        (("dropped", "udp"), 1),
        (("allowed", "icmp"), 2),
        (("dropped", "icmp"), 1),
        (("allowed", "other"), 0),
        (("dropped", "other"), 0),
    ];
    // Counters are published once a second.
    let deadline = std::time::Instant::now() + RELOAD_TIMEOUT;
    let metrics = loop {
        let (status, body) = http_get(&addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let m = Exposition::parse(&body);
        let settled = m.packets("allowed", "tcp") >= 4
            && m.packets("dropped", "tcp") >= 1
            && exact.iter().all(|((v, p), n)| m.packets(v, p) >= *n);
        if settled {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the counters never reached the traffic:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for ((verdict, proto), n) in exact {
        assert_eq!(metrics.packets(verdict, proto), n, "{verdict} {proto}");
    }
    for proto in ["tcp", "udp", "icmp", "other"] {
        assert_eq!(metrics.packets("audited", proto), 0, "audited {proto}");
    }
    assert_eq!(metrics.get("egress_ready", &[]), Some(1));
    assert_eq!(metrics.get("egress_learned_addresses", &[]), Some(0));
    assert!(
        metrics
            .get("egress_learned_addresses_capacity", &[])
            .is_some_and(|c| c > 0)
    );
    // The policy's two CIDRs and no names.
    for (map, n) in [("cidrs", 2), ("names", 0)] {
        assert_eq!(
            metrics.get("egress_policy_entries", &[("map", map)]),
            Some(n),
            "{map}"
        );
    }
    // A handful of drops is far within the event rate limit: every one was reported.
    assert_eq!(metrics.get("egress_events_lost_total", &[]), Some(0));
    for name in ["egress_dns_answers_total", "egress_dns_events_lost_total"] {
        assert_eq!(metrics.get(name, &[]), Some(0), "{name}");
    }
}

/// The SHA-256 of a file, as `sha256sum` prints it.
fn sha256sum(file: &TempFile) -> String {
    let out = Command::new("sha256sum")
        .arg(file.path())
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    text.split_whitespace().next().expect("a hash").to_owned()
}

/// Scrapes `/metrics` until `done` holds for it (counters are published once a second).
fn scrape_until(addr: &str, what: &str, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = std::time::Instant::now() + RELOAD_TIMEOUT;
    loop {
        let (status, body) = http_get(addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let m = Exposition::parse(&body);
        if done(&m) {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}, never seen in:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A rejected reload is counted on `/metrics` (an alert can fire on it) and the running
/// policy's hash stays; an applied one is counted and changes the hash and the time. The
/// build's version and commit are there too, as `--version` prints them.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn reloads_are_counted_by_result_with_the_running_policy_on_metrics() {
    if !require_root() {
        return;
    }
    let (a, b) = (REMOTE_V4_A, REMOTE_V4_B);
    let (policy, _topo, cgroup, _servers) = reload_world(a, b);
    let first = sha256sum(&policy);
    let agent = start_agent(&policy, &cgroup, None);
    let addr = agent.metrics_addr();
    let reloads =
        |m: &Exposition, result: &str| m.get("egress_policy_reloads_total", &[("result", result)]);
    let running = |m: &Exposition, hash: &str| m.get("egress_policy_info", &[("sha256", hash)]);
    let start = scrape_until(&addr, "the policy's hash", |m| {
        running(m, &first) == Some(1)
    });
    assert_eq!(reloads(&start, "applied"), Some(0));
    assert_eq!(reloads(&start, "rejected"), Some(0));
    let started_at = start
        .get("egress_policy_applied_timestamp_seconds", &[])
        .expect("the time the policy was applied");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    assert!(
        started_at <= now && now - started_at < 600,
        "{started_at} vs {now}"
    );

    let version = Command::new(agent_bin())
        .arg("--version")
        .output()
        .expect("run egress-agent --version");
    let version = String::from_utf8(version.stdout).expect("UTF-8");
    let commit = version
        .split("(commit ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no commit in {version:?}"));
    let semver = version.split_whitespace().nth(1).expect("a version");
    let build = [("version", semver), ("commit", commit)];
    assert_eq!(start.get("egress_build_info", &build), Some(1), "{version}");

    // Host bits set: rejected by the parser, counted, and the running policy stays.
    replace(
        &policy,
        "mode: enforce\nallow:\n  - cidr: 203.0.113.21/24\n",
    );
    agent.wait_for_named("policy_reload_rejected", RELOAD_TIMEOUT);
    let rejected = scrape_until(&addr, "one rejected reload", |m| {
        reloads(m, "rejected") == Some(1)
    });
    assert_eq!(reloads(&rejected, "applied"), Some(0));
    assert_eq!(running(&rejected, &first), Some(1));

    replace(&policy, &allow_only(&b.to_string()));
    let second = sha256sum(&policy);
    agent.wait_for_named("policy_reloaded", RELOAD_TIMEOUT);
    let applied = scrape_until(&addr, "the new policy's hash", |m| {
        running(m, &second) == Some(1)
    });
    assert_eq!(reloads(&applied, "applied"), Some(1));
    assert_eq!(reloads(&applied, "rejected"), Some(1));
    assert_eq!(running(&applied, &first), None, "one policy runs");
    assert!(
        applied
            .get("egress_policy_applied_timestamp_seconds", &[])
            .is_some_and(|t| t >= started_at)
    );
}

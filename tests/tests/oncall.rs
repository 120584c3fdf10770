//! The questions asked on call, answered by the real agent against real namespaces, a real
//! DNS server (dnsmasq) and real sockets: what is loaded and where it comes from
//! (`status --rules`, also once the agent is gone), would this pass and why (`explain`),
//! and why was this denied (the event's `reason`), one line per connection attempt.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use egress_tests::dns::{DnsServer, Lookup, Record, resolve_connect};
use egress_tests::{
    Agent, PinDir, REMOTE_V4_A, REMOTE_V4_B, SERVER_V4, SERVER_V6, Server, TempFile, TestCgroup,
    Topology, agent_bin, assert_ok, assert_timeout, probe_tcp, probe_tcp_for, require_root,
    start_pinned_agent,
};
use serde_json::Value;

const HTTPS: u16 = 443;
const ALT: u16 = 8443;
const APP: &str = "app.example.com";
const APP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const API_SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
const TTL: u32 = 300;
/// The agent writes its name records once a second.
const NAMES_TIMEOUT: Duration = Duration::from_secs(10);

fn policy() -> String {
    format!(
        "mode: enforce
allow:
  - cidr: {REMOTE_V4_A}/32
    ports: [HTTPS:443]
  - fqdn: {APP}
    ports: [TCP:443]
api_server: {API_SERVER}
dns:
  resolvers: [\"{SERVER_V4}\", \"{SERVER_V6}\"]
"
    )
}

/// The topology with dnsmasq serving [`APP`], echo servers on 443 and 8443 on every
/// address of the server namespace, a cgroup, and the agent (`--on-exit keep` when
/// `keep`) on a pin root the test holds. Fields drop in order: the agent first.
struct World {
    agent: Agent,
    _servers: Vec<Server>,
    _dns: DnsServer,
    cgroup: TestCgroup,
    topo: Topology,
    pins: PinDir,
    _policy: TempFile,
}

impl World {
    fn start(keep: bool) -> World {
        let policy = TempFile::new(&policy());
        let topo = Topology::new();
        topo.add_remote(APP_V4);
        let any = IpAddr::from(Ipv6Addr::UNSPECIFIED);
        let servers = vec![
            Server::tcp(&topo.server, None, any, HTTPS),
            Server::tcp(&topo.server, None, any, ALT),
        ];
        let dns = DnsServer::start(&topo.server, TTL, &[Record::Host(APP, APP_V4.into())]);
        let cgroup = TestCgroup::new();
        let pins = PinDir::new();
        let extra: &[&str] = if keep { &["--on-exit", "keep"] } else { &[] };
        let agent = start_pinned_agent(&agent_bin(), &policy, &cgroup, &pins, None, extra);
        World {
            agent,
            _servers: servers,
            _dns: dns,
            cgroup,
            topo,
            pins,
            _policy: policy,
        }
    }

    /// Resolves [`APP`] from the cgroup and connects to it on 443, which the name allows.
    fn learn_app(&self) {
        let r = resolve_connect(
            &self.topo.client,
            Some(&self.cgroup),
            Lookup::a(APP, SERVER_V4),
            HTTPS,
        );
        assert_eq!(r.addr, Some(APP_V4.into()), "{r:?}");
        assert_ok(&r.result, "the allowed name on 443");
        self.agent.wait_learned(APP, APP_V4);
    }

    /// `egress-agent ARGS... --pin-root`: its stdout, which must be a success.
    fn agent_stdout(&self, args: &[&str]) -> String {
        let out = self.pins.command(args);
        assert!(
            out.status.success(),
            "egress-agent {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    fn agent_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.agent_stdout(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    fn explain(&self, addr: impl Into<IpAddr>, port: u16) -> Value {
        let (addr, port) = (addr.into().to_string(), port.to_string());
        self.agent_json(&["explain", &addr, &port])
    }
}

/// The `status --rules` line for `target` (`  cidr TARGET PORTS  # FROM`), split.
fn rule_line<'a>(text: &'a str, kind: &str, target: &str) -> (Vec<&'a str>, &'a str) {
    let line = text
        .lines()
        .find(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(kind) && words.next() == Some(target)
        })
        .unwrap_or_else(|| panic!("no {kind} {target} in:\n{text}"));
    let (entry, from) = line.split_once(" # ").expect("an origin");
    let mut ports: Vec<&str> = entry.split_whitespace().skip(2).collect();
    ports.sort_unstable();
    (ports, from.trim())
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn status_rules_names_every_entry_s_origin_also_once_the_agent_is_gone() {
    if !require_root() {
        return;
    }
    let mut world = World::start(true);
    let check = |text: &str| {
        assert_eq!(
            rule_line(text, "cidr", &format!("{REMOTE_V4_A}/32")),
            (vec!["TCP:443"], "allow[0]")
        );
        assert_eq!(
            rule_line(text, "cidr", &format!("{API_SERVER}/32")),
            (
                vec!["TCP:22", "TCP:443", "TCP:9000", "UDP:1194"],
                "api_server"
            )
        );
        assert_eq!(rule_line(text, "name", APP), (vec!["TCP:443"], "allow[1]"));
        let implicit: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("implicit "))
            .collect();
        assert!(
            implicit[0].starts_with(&format!(
                "DNS (UDP:53 TCP:53) to {SERVER_V4} {SERVER_V6}  # trusted resolvers, from dns.resolvers"
            )),
            "{text}"
        );
        for what in ["loopback", "neighbour discovery", "DHCPv6", "ICMP errors"] {
            assert!(implicit.iter().any(|l| l.contains(what)), "{what}: {text}");
        }
    };
    let running = world.agent_stdout(&["status", "--rules"]);
    assert!(running.contains("agent      running"), "{running}");
    check(&running);

    let status = world.agent_json(&["status"]);
    assert_eq!(status["agent_running"], true, "{status}");
    assert_eq!(status["maps"]["mode"], "enforce", "{status}");
    assert_eq!(status["maps"]["cidr_entries"], 2, "{status}");
    assert!(status["maps"].get("rules").is_none(), "{status}");
    let rules = world.agent_json(&["status", "--rules"]);
    let rules = &rules["maps"]["rules"];
    assert!(
        rules["policy"]
            .as_str()
            .is_some_and(|p| p.ends_with(".yaml")),
        "{rules}"
    );
    let name = &rules["names"][0];
    assert_eq!(
        (&name["target"], &name["ports"], &name["from"]["own"][0]),
        (
            &Value::from(APP),
            &Value::from("TCP:443"),
            &Value::from("allow[1]")
        ),
        "{rules}"
    );
    assert_eq!(rules["cidrs"].as_array().map(Vec::len), Some(2), "{rules}");

    // Gone, its programs enforcing: the pinned state still says where each entry comes from.
    let status = world.agent.terminate();
    assert!(status.success(), "the agent exited with {status}");
    let stopped = world.agent_stdout(&["status", "--rules"]);
    assert!(stopped.contains("agent      not running"), "{stopped}");
    check(&stopped);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn explain_answers_from_the_live_maps_by_rule_learned_name_or_reason() {
    if !require_root() {
        return;
    }
    let world = World::start(false);
    world.learn_app();

    let cidr = world.explain(REMOTE_V4_A, HTTPS);
    assert_eq!(cidr["verdict"], "allowed", "{cidr}");
    assert_eq!(
        cidr["cidr"]["target"],
        format!("{REMOTE_V4_A}/32"),
        "{cidr}"
    );
    assert_eq!(cidr["cidr"]["from"]["own"][0], "allow[0]", "{cidr}");

    // The name records follow the kernel's learning by up to a second.
    let deadline = Instant::now() + NAMES_TIMEOUT;
    let learned = loop {
        let e = world.explain(APP_V4, HTTPS);
        if e["learned"]["names"][0]["name"] == APP || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(learned["verdict"], "allowed", "{learned}");
    let name = &learned["learned"]["names"][0];
    assert_eq!(name["name"], APP, "{learned}");
    let ttl = name["ttl_secs"].as_u64().expect("a TTL");
    assert!(ttl > 0 && ttl <= u64::from(TTL), "{learned}");
    assert_eq!(
        name["from"]["own"][0],
        format!("{APP} TCP:443 (allow[1])"),
        "{learned}"
    );

    for (addr, port, reason) in [
        (IpAddr::from(REMOTE_V4_A), 80, "port"),
        (IpAddr::from(REMOTE_V4_B), HTTPS, "no_rule"),
        (IpAddr::from(APP_V4), ALT, "learned_port"),
    ] {
        let e = world.explain(addr, port);
        assert_eq!(
            (&e["verdict"], &e["reason"]),
            (&Value::from("denied"), &Value::from(reason)),
            "{addr} {port}: {e}"
        );
    }
    let dns = world.agent_json(&["explain", &SERVER_V4.to_string(), "53", "--proto", "udp"]);
    assert_eq!(dns["verdict"], "allowed", "{dns}");

    let text = world.agent_stdout(&["explain", &REMOTE_V4_A.to_string(), "80"]);
    assert_eq!(
        text.lines().next(),
        Some(format!("{REMOTE_V4_A} tcp port 80: denied (port)").as_str()),
        "{text}"
    );
    let text = world.agent_stdout(&["explain", &APP_V4.to_string(), "443"]);
    assert!(
        text.contains(&format!("learned for {APP} (")) && text.contains("s left)"),
        "{text}"
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_denied_connect_is_one_line_with_its_reason_and_its_retransmits_counted() {
    if !require_root() {
        return;
    }
    let mut world = World::start(false);
    let cg = Some(&world.cgroup);
    // Long enough for the kernel to retransmit the SYN at least twice (after 1 s, and again
    // 1 s later with `tcp_syn_linear_timeouts`, else 2 s later).
    let attempt = probe_tcp_for(
        &world.topo.client,
        cg,
        REMOTE_V4_B,
        HTTPS,
        Duration::from_millis(3500),
    );
    assert_timeout(&attempt, "an address no rule covers");
    assert_timeout(
        &probe_tcp(&world.topo.client, cg, REMOTE_V4_A, ALT),
        "an allowed address on another port",
    );
    world.learn_app();
    assert_timeout(
        &probe_tcp(&world.topo.client, cg, APP_V4, ALT),
        "a learned address on a port its name does not allow",
    );
    let dropped = world.agent_json(&["status"])["maps"]["counters"]["dropped"]["tcp"]
        .as_u64()
        .expect("a counter");

    // Stopping prints what is held, with the packets counted so far.
    let status = world.agent.terminate();
    assert!(status.success(), "the agent exited with {status}");
    let events = world.agent.flow_events();
    let lines = |dst: Ipv4Addr, port: u16| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["dst"] == dst.to_string() && e["dport"] == port)
            .collect()
    };
    let mut packets = 0;
    for (dst, port, reason) in [
        (REMOTE_V4_B, HTTPS, "no_rule"),
        (REMOTE_V4_A, ALT, "port"),
        (APP_V4, ALT, "learned_port"),
    ] {
        let found = lines(dst, port);
        assert_eq!(
            found.len(),
            1,
            "one line per attempt to {dst}:{port}: {events:?}"
        );
        let e = found[0];
        assert_eq!(
            (&e["action"], &e["reason"], &e["proto"]),
            (
                &Value::from("deny"),
                &Value::from(reason),
                &Value::from("tcp")
            ),
            "{e}"
        );
        assert!(e["sport"].as_u64().is_some_and(|p| p > 0), "{e}");
        packets += e["packets"].as_u64().expect("packets counted");
    }
    let retried = lines(REMOTE_V4_B, HTTPS)[0]["packets"].as_u64();
    assert!(
        retried.is_some_and(|n| n >= 3),
        "the SYN and its two retransmits: {events:?}"
    );
    assert_eq!(
        packets, dropped,
        "every dropped packet is in a line: {events:?}"
    );
    assert_eq!(events.len(), 3, "{events:?}");
}

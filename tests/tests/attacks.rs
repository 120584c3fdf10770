//! Ways out of the enforced cgroup that the policy does not allow, each run for real, next
//! to the legitimate use that closing it must keep working.
//!
//! The attacker is a process in the enforced cgroup: either unprivileged but able to make
//! user and network namespaces of its own (an [`Island`]), or root in its own network
//! namespace with `CAP_NET_RAW` (raw sockets: any source address, any header). What it
//! wants is to reach [`REMOTE_V4_B`] (or [`REMOTE_V6_B`]), which no rule allows: each
//! attack ends with that connect or send from the client namespace, in the cgroup, which
//! must be dropped (a TCP connect times out, a UDP send fails with EPERM), or with a
//! [`Sniffer`] on the server's link that must not see the smuggled packet.
//!
//! Negative checks on the wire end with a marker: a packet sent afterwards on the same
//! path that must arrive; once it has, anything sent before it would have too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use egress_tests::attack::{
    At, Island, Sniffer, Spur, client_from, mac_of, netstat, query_wait_at, raw_ack, raw_dns_query,
    raw_fragment, raw_icmp, raw_syn, raw_udp, serve_at, start_agent_in, tcp_from, udp_from,
    udp_listen_at, wait_until,
};
use egress_tests::dns::{DnsServer, Lookup, Record, resolve_connect};
use egress_tests::{
    ATTACH_TIMEOUT, Agent, CLIENT_V4, Netns, ProbeResult, REMOTE_V4_A, REMOTE_V4_B, REMOTE_V6_A,
    REMOTE_V6_B, SERVER_V4, SERVER_V6, Server, TempFile, TestCgroup, Topology, assert_eperm,
    assert_ok, assert_timeout, probe_tcp, probe_udp, require_root, start_agent,
};
use serde_json::{Value, json};

const HTTPS: u16 = 443;
const NTP: u16 = 123;
/// Where the attacker's echo server listens on the forbidden address.
const DISCARD: u16 = 9;
const DNS: u16 = 53;
/// TTL of dnsmasq's answers: longer than any test.
const LONG_TTL: u32 = 300;
/// A deny line waits for its flow to be quiet for 3 s.
const FORGED_EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// The allowed zone (as in the `aks-global` preset), a name in it the attacker wants to
/// point at [`REMOTE_V4_B`], and one a real resolver really answers.
const ZONE: &str = "*.hcp.eastus.azmk8s.io";
const PWN: &str = "pwn.hcp.eastus.azmk8s.io";
const OK_NAME: &str = "ok.hcp.eastus.azmk8s.io";
/// The id of the attacker's query.
const QUERY_ID: u16 = 0x0bad;
/// Where systemd-resolved's stub listens.
const STUB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

/// A resolver a hop behind the server, and an upstream it asks that never answers (the
/// server routes it into a blackhole), so its answers for names it must forward come
/// late, as a recursive resolver's do for names not in its cache.
const FAR_RESOLVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
const SILENT_UPSTREAM: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);
/// A host a hop behind the server, past a link with a smaller MTU.
const FAR_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
const NARROW_MTU: u32 = 1280;

/// Local ports the attacker chooses.
const LOCAL_PORT: u16 = 7100;
const REMOTE_PORT: u16 = 7101;

/// The DNS attacks' policy: the zone on TCP 443, learned from `resolver` only.
fn zone_policy(resolver: Ipv4Addr) -> String {
    format!(
        "mode: enforce\nallow:\n  - fqdn: \"{ZONE}\"\n    ports: [TCP:{HTTPS}]\ndns:\n  resolvers: [{resolver}]\n"
    )
}

/// The other attacks' policy: [`REMOTE_V4_A`] on UDP 123 and TCP 443, [`FAR_HOST`] and
/// [`REMOTE_V6_A`] on TCP 443; nothing for the `B` addresses.
const POLICY: &str = "\
mode: enforce
allow:
  - cidr: 203.0.113.10/32
    ports: [UDP:123, TCP:443]
  - cidr: 203.0.113.30/32
    ports: [TCP:443]
  - cidr: 2001:db8:2::10/128
    ports: [TCP:443]
";

/// One test's base: the topology, a fresh cgroup and the agent enforcing `policy` on it.
/// Fields drop in order: the agent detaches first.
struct Base {
    agent: Agent,
    cgroup: TestCgroup,
    topo: Topology,
    _policy: TempFile,
}

impl Base {
    /// The agent on the cgroup only.
    fn start(policy: &str) -> Base {
        let policy = TempFile::new(policy);
        let topo = Topology::new();
        let cgroup = TestCgroup::new();
        let agent = start_agent(&policy, &cgroup, None);
        Base {
            agent,
            cgroup,
            topo,
            _policy: policy,
        }
    }

    /// The agent on the cgroup and, with its TC programs, on the client's link (run in
    /// the client namespace, which holds the link).
    fn start_with_tc(policy: &str) -> Base {
        let policy = TempFile::new(policy);
        let topo = Topology::new();
        let cgroup = TestCgroup::new();
        let agent = start_agent_in(
            &topo.client,
            &policy,
            &cgroup,
            &["--interface", &topo.client_veth],
        );
        Base {
            agent,
            cgroup,
            topo,
            _policy: policy,
        }
    }

    /// Looks [`OK_NAME`] up through `resolver` from the cgroup and connects to the answer
    /// at once: the connect must pass, and the agent must have learned the address.
    fn resolve_ok_and_connect(&self, resolver: Ipv4Addr, through: &str) {
        let _server = Server::tcp(&self.topo.server, None, REMOTE_V4_A, HTTPS);
        let r = resolve_connect(
            &self.topo.client,
            Some(&self.cgroup),
            Lookup::a(OK_NAME, resolver),
            HTTPS,
        );
        assert_eq!(r.addr, Some(REMOTE_V4_A.into()), "{r:?}");
        assert_ok(&r.result, &format!("resolve through {through} and connect"));
        self.agent.wait_learned(OK_NAME, REMOTE_V4_A);
    }

    /// The client namespace, in the enforced cgroup: where the attacker runs.
    fn client(&self) -> At<'_> {
        At(&self.topo.client, Some(&self.cgroup))
    }

    /// The client namespace outside the cgroup (for markers, and for traffic that only
    /// the TC programs decide).
    fn client_outside(&self) -> At<'_> {
        At(&self.topo.client, None)
    }

    /// A sniffer on the server's end of the client's link: what left the client.
    fn sniff_server(&self) -> Sniffer {
        Sniffer::start(&self.topo.server, &self.topo.server_veth)
    }

    /// The attack's end: a TCP connect from the cgroup to `REMOTE_V4_B:443` (where an echo
    /// server listens) must be dropped.
    fn assert_b_https_dropped(&self, what: &str) {
        let _server = Server::tcp(&self.topo.server, None, REMOTE_V4_B, HTTPS);
        assert_timeout(
            &probe_tcp(&self.topo.client, Some(&self.cgroup), REMOTE_V4_B, HTTPS),
            &format!("TCP to {REMOTE_V4_B}:{HTTPS} after {what}"),
        );
    }
}

fn v4(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

fn any_port(port: u16) -> SocketAddr {
    (Ipv4Addr::UNSPECIFIED, port).into()
}

/// The DNS answer a probe received claims `name` is at [`REMOTE_V4_B`].
fn assert_claims_b(line: &Value, what: &str) {
    assert_eq!(
        line["addrs"],
        json!([REMOTE_V4_B.to_string()]),
        "{what}: {line}"
    );
}

/// `--dns-answer PWN --id QUERY_ID --a REMOTE_V4_B`, and any further `raw-udp` arguments.
fn pwn_answer(more: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--dns-answer", PWN, "--id"].map(str::to_owned).to_vec();
    args.extend([QUERY_ID.to_string(), "--a".into(), REMOTE_V4_B.to_string()]);
    args.extend(more.iter().map(|a| (*a).to_owned()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

// --- 1. Forged answers over loopback ---------------------------------------------------

/// Closes: teaching the kernel an address through loopback. A root process in the cgroup
/// sends, with a raw socket, a query for an allowed name "from" `127.0.0.1:P` to the
/// trusted resolver (the kernel remembers it, although no answer can ever come back to a
/// loopback address from outside), then the answer to it "from" the resolver to
/// `127.0.0.1:P`, which the routing delivers over `lo` to its own UDP socket there: a
/// trusted, solicited answer by every field the kernel compares.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn forged_answer_over_loopback_teaches_nothing() {
    if !require_root() {
        return;
    }
    let base = Base::start(&zone_policy(SERVER_V4));
    let client = base.client();
    let (mut socket, port) = udp_listen_at(&client, (Ipv4Addr::LOCALHOST, 0).into(), 1, None);
    let (local, resolver) = (v4(Ipv4Addr::LOCALHOST, port), v4(SERVER_V4, DNS));

    // The enforcer drops DNS from raw sockets to where the policy does not allow; the
    // query may or may not leave, and either way the answer must teach nothing.
    let _ = raw_dns_query(&client, local, resolver, PWN, QUERY_ID);
    let forged = raw_udp(&client, resolver, local, &strs(&pwn_answer(&[])));
    if forged.ok {
        // Received by the socket: the cgroup's ingress program has seen it.
        assert_claims_b(&socket.line(1), "the forged answer");
        assert_ok(&socket.finish(), "the loopback socket");
    } else {
        // A raw socket may not claim a trusted resolver's port 53 at all, and the deny
        // line says so.
        assert_eperm(&forged, "the forged answer from a raw socket");
        base.agent.wait_for_event(
            |e| e["reason"] == "forged_dns_answer" && e["dport"] == port,
            FORGED_EVENT_TIMEOUT,
        );
    }

    base.assert_b_https_dropped("a forged answer over loopback");
}

/// The legitimate use next to it: a real lookup through the trusted resolver teaches the
/// address, and the connect to it passes.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn real_answer_from_the_resolver_is_learned() {
    if !require_root() {
        return;
    }
    let base = Base::start(&zone_policy(SERVER_V4));
    let _dns = ok_name_server(&base);
    base.resolve_ok_and_connect(SERVER_V4, "the trusted resolver");
}

/// The legitimate use that loopback's distrust must not break: host processes that ask a
/// stub resolver on `127.0.0.53` (systemd-resolved on Ubuntu nodes), which asks the
/// trusted resolver. The stub's own upstream query and its answer teach the address
/// before the stub answers over loopback, so the connect right after passes.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_stub_resolver_s_upstream_answers_are_learned() {
    if !require_root() {
        return;
    }
    let base = Base::start(&zone_policy(SERVER_V4));
    let _dns = ok_name_server(&base);
    let _stub = DnsServer::start_stub(
        &base.topo.client,
        &base.cgroup,
        STUB.into(),
        SERVER_V4.into(),
    );
    base.resolve_ok_and_connect(STUB, "the stub");
}

/// The trusted resolver in the server namespace, knowing [`OK_NAME`] at `REMOTE_V4_A`.
fn ok_name_server(base: &Base) -> DnsServer {
    DnsServer::start(
        &base.topo.server,
        LONG_TTL,
        &[Record::Host(OK_NAME, REMOTE_V4_A.into())],
    )
}

// --- 2. Answers from the workload's own namespaces -------------------------------------

/// Closes: teaching the kernel an address from a network namespace the workload made for
/// itself, unprivileged. As uid 65534, `unshare -Urn` gives it a namespace where it is
/// root: it puts the trusted resolver's address on its own `lo`, answers its own query
/// for an allowed name there with a tiny DNS server, and the kernel, which keys queries by
/// addresses alone, takes that for the resolver's answer. Learned addresses hold in every
/// namespace, so the real one is open too.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn answer_from_own_user_namespace_over_its_loopback_teaches_nothing() {
    if !require_root() {
        return;
    }
    let base = Base::start(&zone_policy(SERVER_V4));
    let island = Island::new(&base.cgroup);
    island.ip(&format!("addr add {SERVER_V4}/32 dev lo"));
    let b = REMOTE_V4_B.to_string();
    let _dns = serve_at(
        &island,
        &["serve-dns", &SERVER_V4.to_string(), "53", "--a", &b],
    );
    let (mut query, _) = query_wait_at(&island, PWN, SERVER_V4.into(), QUERY_ID, 1);
    assert_claims_b(&query.line(1), "the island's own answer");
    assert_ok(&query.finish(), "the island's lookup");

    base.assert_b_https_dropped("an answer from the workload's own namespace");
}

/// Closes the same way out as the test above, with the answer coming over a real link
/// rather than `lo`: two namespaces of the island joined by a veth pair, the client's
/// address on one end, the resolver's on the other, where the DNS server runs. Both
/// processes are in the enforced cgroup.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn answer_from_own_user_namespace_over_its_veth_teaches_nothing() {
    if !require_root() {
        return;
    }
    let base = Base::start(&zone_policy(SERVER_V4));
    let island = Island::new(&base.cgroup);
    let resolver = island.sibling(&base.cgroup);
    let (here, there) = island.link(&resolver);
    island.ip(&format!("addr add {CLIENT_V4}/24 dev {here}"));
    resolver.ip(&format!("addr add {SERVER_V4}/24 dev {there}"));
    let b = REMOTE_V4_B.to_string();
    let _dns = serve_at(
        &resolver,
        &["serve-dns", &SERVER_V4.to_string(), "53", "--a", &b],
    );
    let (mut query, _) = query_wait_at(&island, PWN, SERVER_V4.into(), QUERY_ID, 1);
    assert_claims_b(&query.line(1), "the answer over the island's veth");
    assert_ok(&query.finish(), "the island's lookup");

    base.assert_b_https_dropped("an answer over the workload's own veth");
}

// --- 3. Forged answers routed back by the next hop -------------------------------------

/// The topology of the next-hop tests: a resolver a hop behind the server, which routes
/// for it; it answers [`OK_NAME`] at once and asks a silent upstream for [`PWN`].
fn far_resolver(base: &Base) -> (Spur, DnsServer) {
    let spur = Spur::new(&base.topo, FAR_RESOLVER, None);
    base.topo
        .server
        .ip(&format!("route add blackhole {SILENT_UPSTREAM}/32"));
    let records = [
        Record::Host(OK_NAME, REMOTE_V4_A.into()),
        Record::Forward(PWN, SILENT_UPSTREAM.into()),
    ];
    let dns = DnsServer::start_at(&spur.netns, &[FAR_RESOLVER.into()], LONG_TTL, &records);
    (spur, dns)
}

/// Closes: an answer forged on the client's own host that reaches its socket from the
/// wire. The client (root in its namespace, in the cgroup) sends a real query to the
/// trusted resolver a hop away, then writes the answer to it itself, "from" the resolver,
/// as an Ethernet frame to its gateway (a packet socket: no local delivery, whatever the
/// destination). The gateway routes it straight back, and it arrives on the client's
/// link, from the resolver's address, before the resolver's own (which has to wait for an
/// upstream). The kernel cannot tell it from the real one by addresses, ports and id.
///
/// (The resolver's answer is held back by a silent upstream rather than by a netem
/// delay: this kernel has no `sch_netem`, and a blackhole never loses the race.)
///
/// A packet socket's frame never meets the cgroup programs, so this is closed by the TC
/// programs on the link the frame leaves by (on a node: the uplink, or the links to the
/// pods), which take it for what it is, a packet to an address the policy does not
/// allow. With the cgroup programs alone it is not closed: SECURITY.md says so. (An IP
/// raw socket cannot send it: a packet to the host's own address goes over `lo`, where
/// nothing teaches.)
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn forged_answer_routed_back_by_the_next_hop_teaches_nothing() {
    if !require_root() {
        return;
    }
    let base = Base::start_with_tc(&zone_policy(FAR_RESOLVER));
    let (_spur, _dns) = far_resolver(&base);
    let client = base.client();
    let (_query, port) = query_wait_at(&client, PWN, FAR_RESOLVER.into(), QUERY_ID, 1);
    let gateway_mac = mac_of(&base.topo.server, &base.topo.server_veth);
    let link = ["--link", &base.topo.client_veth, "--dst-mac", &gateway_mac];
    let sniffer = base.sniff_server();
    // Dropped by the TC program, the frame may fail to send (ENOBUFS) or vanish.
    let _ = raw_udp(
        &client,
        v4(FAR_RESOLVER, DNS),
        v4(CLIENT_V4, port),
        &strs(&pwn_answer(&link)),
    );
    // The marker: a query to the resolver from outside the cgroup, after the forgery.
    let (_marker, marker_port) =
        query_wait_at(&base.client_outside(), OK_NAME, FAR_RESOLVER.into(), 1, 1);
    sniffer.wait_received("the marker", |p| {
        p["dst"] == FAR_RESOLVER.to_string() && p["sport"] == marker_port
    });
    let leaked = sniffer.received(|p| p["src"] == FAR_RESOLVER.to_string());
    assert!(leaked.is_empty(), "the forged answer left: {leaked:?}");

    base.assert_b_https_dropped("a forged answer routed back by the gateway");
}

/// The legitimate use next to it: the same resolver a hop away, really answering; the
/// answer is learned and the connect passes.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn real_answer_from_a_resolver_behind_a_router_is_learned() {
    if !require_root() {
        return;
    }
    let base = Base::start(&zone_policy(FAR_RESOLVER));
    let (_spur, _dns) = far_resolver(&base);
    let _server = Server::tcp(&base.topo.server, None, REMOTE_V4_A, HTTPS);
    let r = resolve_connect(
        &base.topo.client,
        Some(&base.cgroup),
        Lookup::a(OK_NAME, FAR_RESOLVER),
        HTTPS,
    );
    assert_eq!(r.addr, Some(REMOTE_V4_A.into()), "{r:?}");
    assert_ok(&r.result, "resolve through the far resolver and connect");
    base.agent.wait_learned(OK_NAME, REMOTE_V4_A);
}

// --- 4. Spoofed inbound packets that make "reply" flows ---------------------------------
//
// The legitimate use, a server in the cgroup answering a client no rule lists over UDP
// and TCP, is `server_in_cgroup_answers_unlisted_client` in tests/enforce.rs.

/// Closes: a UDP "reply" flow opened by a datagram the workload sent itself. Inbound
/// datagrams open a flow back to their source, so that servers in the cgroup can answer;
/// a root process with a raw socket writes one "from" `REMOTE_V4_B:9` to its own UDP
/// socket (over `lo`, to 127.0.0.1), and that socket then sends to `REMOTE_V4_B:9`, as
/// if replying.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn spoofed_inbound_datagram_over_loopback_opens_no_reply_path() {
    if !require_root() {
        return;
    }
    let base = Base::start(POLICY);
    let _echo = Server::udp(&base.topo.server, None, REMOTE_V4_B, DISCARD);
    let sniffer = base.sniff_server();
    let client = base.client();
    let b9 = SocketAddr::from((REMOTE_V4_B, DISCARD));
    let (mut socket, port) = udp_listen_at(&client, any_port(0), 1, Some(b9));

    assert_ok(
        &raw_udp(
            &client,
            v4(REMOTE_V4_B, DISCARD),
            v4(Ipv4Addr::LOCALHOST, port),
            &[],
        ),
        "the spoofed datagram",
    );
    assert_eq!(
        socket.line(1)["from"],
        b9.to_string(),
        "the spoofed datagram"
    );
    assert_eperm(&socket.finish(), "the \"reply\" to REMOTE_V4_B:9");

    // Nothing from that socket reached the server before the marker did.
    assert_ok(
        &probe_udp(&base.topo.client, None, REMOTE_V4_B, DISCARD),
        "the marker, from outside the cgroup",
    );
    let to_b = |p: &Value| p["dst"] == REMOTE_V4_B.to_string();
    sniffer.assert_none_before_marker(
        |p| to_b(p) && p["sport"] != port,
        |p| to_b(p) && p["sport"] == port,
        "the \"reply\" reached the server",
    );
}

/// Closes: a TCP "reply" flow opened by a connection request the workload sent itself.
/// Inbound SYNs open a flow back to their source, so that servers in the cgroup can
/// accept; a root process writes one "from" `REMOTE_V4_B:P` to its own listener on port
/// L (over `lo`), then connects from port L to `REMOTE_V4_B:P`.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn spoofed_inbound_syn_over_loopback_opens_no_reply_path() {
    if !require_root() {
        return;
    }
    let base = Base::start(POLICY);
    let _echo = Server::tcp(&base.topo.server, None, REMOTE_V4_B, REMOTE_PORT);
    let client = base.client();
    let listener = Server::tcp(
        &base.topo.client,
        Some(&base.cgroup),
        Ipv4Addr::UNSPECIFIED,
        LOCAL_PORT,
    );
    // The listener cannot answer 127.0.0.1 -> REMOTE_V4_B (a loopback source leaves no
    // host), so the kernel drops the request, after the cgroup's ingress program saw it.
    let listen_drops = || netstat(&base.topo.client, "netstat", "TcpExt", "ListenDrops");
    let before = listen_drops();
    assert_ok(
        &raw_syn(
            &client,
            v4(REMOTE_V4_B, REMOTE_PORT),
            v4(Ipv4Addr::LOCALHOST, LOCAL_PORT),
        ),
        "the spoofed SYN",
    );
    wait_until(
        "the listener handled the spoofed SYN",
        Duration::from_secs(10),
        || listen_drops() > before,
    );
    drop(listener);

    assert_timeout(
        &tcp_from(
            &client,
            any_port(LOCAL_PORT),
            (REMOTE_V4_B, REMOTE_PORT).into(),
        ),
        "the \"reply\" connection to REMOTE_V4_B",
    );
}

/// Closes: a UDP "reply" flow opened inside the workload's own namespace, used outside
/// it. Unprivileged in its island, the workload puts `REMOTE_V4_B` on its own `lo` and
/// really sends from `REMOTE_V4_B:9` to its UDP server on port L there. The flow that
/// opens has no namespace in it, so in the real namespace a socket on port L may "reply"
/// to the real `REMOTE_V4_B:9`.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn inbound_datagram_in_own_user_namespace_opens_no_reply_path_outside_it() {
    if !require_root() {
        return;
    }
    let base = Base::start(POLICY);
    let _echo = Server::udp(&base.topo.server, None, REMOTE_V4_B, DISCARD);
    assert_eperm(
        &reply_after_island_exchange(&base, "udp", DISCARD),
        "UDP from port L to the real REMOTE_V4_B:9",
    );
}

/// Closes the same way out as the test above for TCP: a real connection inside the
/// island from `REMOTE_V4_B:P` to the workload's server on port L opens a flow that a
/// connect from port L in the real namespace to `REMOTE_V4_B:P` then rides.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn inbound_connection_in_own_user_namespace_opens_no_reply_path_outside_it() {
    if !require_root() {
        return;
    }
    let base = Base::start(POLICY);
    let _echo = Server::tcp(&base.topo.server, None, REMOTE_V4_B, REMOTE_PORT);
    assert_timeout(
        &reply_after_island_exchange(&base, "tcp", REMOTE_PORT),
        "TCP from port L to the real REMOTE_V4_B:P",
    );
}

/// Closes: data written into an inbound TCP connection from outside it. A real client
/// (the server namespace, on no rule) connects to a server in the cgroup; once the
/// listener has answered, the connection's replies pass from any of the kernel's
/// sockets. A root process's raw socket then writes a segment with data "from" the
/// server's port to that client: it must not leave. A bare ACK, as the kernel's own raw
/// sockets send in time-wait, still does.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn raw_data_into_an_inbound_connection_does_not_leave() {
    if !require_root() {
        return;
    }
    let base = Base::start(POLICY);
    let _server = Server::tcp(&base.topo.client, Some(&base.cgroup), CLIENT_V4, LOCAL_PORT);
    let sniffer = base.sniff_server();
    let (client, server) = (v4(SERVER_V4, REMOTE_PORT), v4(CLIENT_V4, LOCAL_PORT));
    assert_ok(
        &client_from(
            &At(&base.topo.server, None),
            "tcp-connect",
            Some(client.into()),
            server.into(),
            None,
        ),
        "the real client's connection to the server in the cgroup",
    );
    assert_eperm(
        &raw_ack(&base.client(), server, client, 64),
        "a raw segment with data into the inbound connection",
    );
    assert_ok(
        &raw_ack(&base.client(), server, client, 0),
        "a bare ACK into the inbound connection",
    );
    let raw = |p: &Value| {
        p["out"] == false && p["dst"] == SERVER_V4.to_string() && p["dport"] == REMOTE_PORT
    };
    sniffer.wait_received("the bare ACK", |p| raw(p) && p["len"] == 40);
    let leaked = sniffer.received(|p| raw(p) && p["len"] == 40 + 64);
    assert!(leaked.is_empty(), "the data segment left: {leaked:?}");
}

/// In an island with `REMOTE_V4_B` on its `lo`, a real `proto` ("udp" or "tcp") exchange
/// from `REMOTE_V4_B:remote_port` with the island's echo server on port L; then, in the
/// real client namespace (in the cgroup), the same exchange from port L to the real
/// `REMOTE_V4_B:remote_port`, whose result is returned.
fn reply_after_island_exchange(base: &Base, proto: &str, remote_port: u16) -> ProbeResult {
    let island = Island::new(&base.cgroup);
    island.ip(&format!("addr add {REMOTE_V4_B}/32 dev lo"));
    let (serve, client) = match proto {
        "udp" => ("serve-udp", "udp-send"),
        _ => ("serve-tcp", "tcp-connect"),
    };
    // On 127.0.0.1: bound to any address, a UDP server would answer from REMOTE_V4_B
    // itself (the source its route to a local address picks), not from where it was asked.
    let _server = serve_at(&island, &[serve, "127.0.0.1", &LOCAL_PORT.to_string()]);
    let b = SocketAddr::from((REMOTE_V4_B, remote_port));
    let island_side = (Ipv4Addr::LOCALHOST, LOCAL_PORT).into();
    assert_ok(
        &client_from(&island, client, Some(b), island_side, None),
        &format!("the island's {proto} exchange from {b}"),
    );
    client_from(&base.client(), client, Some(any_port(LOCAL_PORT)), b, None)
}

// --- 5. ICMP errors as a tunnel ---------------------------------------------------------

/// One allowed UDP exchange with `REMOTE_V4_A:123` from local port L; returns the datagram
/// an ICMP error about it quotes: the echo that came back (source, destination).
fn allowed_exchange(base: &Base) -> (SocketAddrV4, SocketAddrV4) {
    assert_ok(
        &udp_from(
            &base.client(),
            any_port(LOCAL_PORT),
            (REMOTE_V4_A, NTP).into(),
        ),
        "the allowed UDP exchange",
    );
    (v4(REMOTE_V4_A, NTP), v4(CLIENT_V4, LOCAL_PORT))
}

fn is_icmp_to(p: &Value, dst: impl Into<IpAddr>, types: &[u8]) -> bool {
    p["dst"] == dst.into().to_string()
        && p["icmp_type"]
            .as_u64()
            .is_some_and(|t| types.iter().any(|x| u64::from(*x) == t))
}

/// Closes: ICMP errors as a tunnel. An error passes when the datagram it quotes belongs to
/// an allowed flow; nothing ties the error's destination to that flow, nor limits what
/// follows the quote. After one allowed exchange with `REMOTE_V4_A`, a raw socket sends
/// destination unreachable, time exceeded and parameter problem to `REMOTE_V4_B`, each
/// quoting that exchange and carrying 512 bytes more.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn icmp_errors_to_another_address_carry_nothing_out() {
    if !require_root() {
        return;
    }
    const TYPES: [(u8, u8); 3] = [(3, 3), (11, 0), (12, 0)];
    let base = Base::start(POLICY);
    let _ntp = Server::udp(&base.topo.server, None, REMOTE_V4_A, NTP);
    let sniffer = base.sniff_server();
    let quote = allowed_exchange(&base);

    let sends: Vec<ProbeResult> = TYPES
        .iter()
        .map(|&(t, code)| {
            raw_icmp(
                &base.client(),
                REMOTE_V4_B.into(),
                t,
                code,
                Some(quote),
                512,
            )
        })
        .collect();
    // The marker: an echo request from outside the cgroup.
    assert_ok(
        &raw_icmp(&base.client_outside(), REMOTE_V4_B.into(), 8, 0, None, 0),
        "the marker",
    );
    sniffer.wait_received("the marker", |p| is_icmp_to(p, REMOTE_V4_B, &[8]));
    let leaked = sniffer.received(|p| is_icmp_to(p, REMOTE_V4_B, &[3, 11, 12]));
    assert!(
        leaked.is_empty(),
        "ICMP errors reached REMOTE_V4_B: {leaked:?} (sends: {sends:?})"
    );
}

/// The legitimate use next to it: an ICMP error about the allowed flow, sent to that
/// flow's remote end (the quoted datagram's source) with a quote of the usual size,
/// arrives.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn icmp_error_to_the_flow_s_remote_arrives() {
    if !require_root() {
        return;
    }
    let base = Base::start(POLICY);
    let _ntp = Server::udp(&base.topo.server, None, REMOTE_V4_A, NTP);
    let sniffer = base.sniff_server();
    let quote = allowed_exchange(&base);
    assert_ok(
        &raw_icmp(&base.client(), REMOTE_V4_A.into(), 3, 3, Some(quote), 0),
        "port unreachable to REMOTE_V4_A",
    );
    sniffer.wait_received("the ICMP error to REMOTE_V4_A", |p| {
        is_icmp_to(p, REMOTE_V4_A, &[3])
    });
}

/// The legitimate use next to it: path MTU discovery. An allowed 64 KiB TCP exchange with
/// a host past a router whose next link is narrower completes: the router's
/// "fragmentation needed" comes back to the client, which sends smaller segments.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn path_mtu_discovery_works() {
    if !require_root() {
        return;
    }
    let base = Base::start(POLICY);
    let spur = Spur::new(&base.topo, FAR_HOST, Some(NARROW_MTU));
    let _server = Server::tcp(&spur.netns, None, FAR_HOST, HTTPS);
    let to_client = Sniffer::start(&base.topo.client, &base.topo.client_veth);
    assert_ok(
        &client_from(
            &base.client(),
            "tcp-connect",
            None,
            (FAR_HOST, HTTPS).into(),
            Some(64 * 1024),
        ),
        "64 KiB to and from FAR_HOST past the narrow link",
    );
    // The exchange needed the router's "fragmentation needed" (type 3).
    to_client.wait_received("fragmentation needed", |p| is_icmp_to(p, CLIENT_V4, &[3]));
}

// --- 6. ICMPv6 neighbour discovery and MLD as a tunnel ----------------------------------

/// Closes: ICMPv6 neighbour discovery and MLD types as a tunnel. They pass whatever
/// their destination, for the network's sake; a raw ICMPv6 socket sends MLD query (130),
/// router solicitation (133), neighbour solicitation (135), redirect (137) and MLDv2
/// report (143), each with 256 bytes of payload, to the global `REMOTE_V6_B`. The agent
/// enforces on the cgroup and on the client's link (TC).
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn icmpv6_nd_and_mld_to_a_global_address_carry_nothing_out() {
    if !require_root() {
        return;
    }
    const TYPES: [u8; 5] = [130, 133, 135, 137, 143];
    let base = Base::start_with_tc(POLICY);
    let _https = Server::tcp(&base.topo.server, None, REMOTE_V6_A, HTTPS);
    let sniffer = base.sniff_server();

    let sends: Vec<ProbeResult> = TYPES
        .iter()
        .map(|&t| raw_icmp(&base.client(), REMOTE_V6_B.into(), t, 0, None, 256))
        .collect();
    // The marker: an allowed connection, from outside the cgroup.
    assert_ok(
        &probe_tcp(&base.topo.client, None, REMOTE_V6_A, HTTPS),
        "the marker",
    );
    sniffer.wait_received("the marker", |p| {
        p["dst"] == REMOTE_V6_A.to_string() && p["dport"] == HTTPS
    });
    let leaked = sniffer.received(|p| is_icmp_to(p, REMOTE_V6_B, &TYPES));
    assert!(
        leaked.is_empty(),
        "ND/MLD messages reached REMOTE_V6_B: {leaked:?} (sends: {sends:?})"
    );
}

/// The legitimate use next to it: neighbour discovery with the real neighbour. With the
/// client's neighbour table flushed, an allowed IPv6 connection must first resolve the
/// gateway (solicitation out, advertisement back, and the client's own advertisements
/// when the gateway asks), on the cgroup and TC paths alike.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn neighbour_discovery_with_the_real_neighbour_works() {
    if !require_root() {
        return;
    }
    let base = Base::start_with_tc(POLICY);
    let _https = Server::tcp(&base.topo.server, None, REMOTE_V6_A, HTTPS);
    for ns in [&base.topo.client, &base.topo.server] {
        ns.ip("-6 neigh flush all");
    }
    assert_ok(
        &probe_tcp(&base.topo.client, Some(&base.cgroup), REMOTE_V6_A, HTTPS),
        "IPv6 TCP to REMOTE_V6_A after a neighbour flush",
    );
    let client_v6: Ipv6Addr = egress_tests::CLIENT_V6;
    assert_ok(
        &probe_tcp(&base.topo.client, None, REMOTE_V6_A, HTTPS),
        &format!("the same from {client_v6} outside the cgroup (TC only)"),
    );
}

// --- 7. The TC path: fragments ----------------------------------------------------------

/// The legitimate use: a UDP datagram larger than the link's MTU leaves in fragments, of
/// which only the first carries ports; through the TC programs (the sender is outside the
/// cgroup, as forwarded traffic is), the server must get all of them and answer.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn fragmented_datagram_to_an_allowed_destination_arrives_whole() {
    if !require_root() {
        return;
    }
    let base = Base::start_with_tc(POLICY);
    let _ntp = Server::udp(&base.topo.server, None, REMOTE_V4_A, NTP);
    assert_ok(
        &client_from(
            &base.client_outside(),
            "udp-send",
            None,
            (REMOTE_V4_A, NTP).into(),
            Some(3000),
        ),
        "3,000 bytes to REMOTE_V4_A:123 and back",
    );
}

/// Closes: later fragments as a tunnel. A later fragment carries no ports; one sent
/// alone (a raw socket, offset 1480) to `REMOTE_V4_B`, which no rule allows, must not
/// leave through the TC programs.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn lone_later_fragment_to_a_denied_destination_does_not_leave() {
    if !require_root() {
        return;
    }
    let base = Base::start_with_tc(POLICY);
    let _ntp = Server::udp(&base.topo.server, None, REMOTE_V4_A, NTP);
    let sniffer = base.sniff_server();
    let sent = raw_fragment(&base.client_outside(), CLIENT_V4, REMOTE_V4_B, 1480, 200);
    assert_fragment_did_not_leave(&base, &sniffer, &sent);
}

/// Closes: a flow for later fragments opened from outside. A later fragment arriving
/// from `REMOTE_V4_B` (here sent by the server, as any host on the path could) carries
/// no ports either, but the ingress program takes it for a UDP datagram that starts a
/// flow; later fragments to `REMOTE_V4_B` then ride that flow out.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn inbound_fragment_opens_no_path_for_later_fragments() {
    if !require_root() {
        return;
    }
    let base = Base::start_with_tc(POLICY);
    let _ntp = Server::udp(&base.topo.server, None, REMOTE_V4_A, NTP);
    let sniffer = base.sniff_server();
    let reassembly = || netstat(&base.topo.client, "snmp", "Ip", "ReasmReqds");
    let before = reassembly();
    assert_ok(
        &raw_fragment(
            &At(&base.topo.server, None),
            REMOTE_V4_B,
            CLIENT_V4,
            1480,
            200,
        ),
        "the inbound fragment",
    );
    // Reassembly comes after the TC ingress program.
    wait_until(
        "the client got the inbound fragment",
        Duration::from_secs(10),
        || reassembly() > before,
    );
    let sent = raw_fragment(&base.client_outside(), CLIENT_V4, REMOTE_V4_B, 1480, 200);
    assert_fragment_did_not_leave(&base, &sniffer, &sent);
}

/// No fragment to `REMOTE_V4_B` reached the server before a marker (an allowed datagram
/// to `REMOTE_V4_A:123`) did.
fn assert_fragment_did_not_leave(base: &Base, sniffer: &Sniffer, sent: &ProbeResult) {
    assert_ok(
        &probe_udp(&base.topo.client, None, REMOTE_V4_A, NTP),
        "the marker",
    );
    sniffer.wait_received("the marker", |p| {
        p["dst"] == REMOTE_V4_A.to_string() && p["dport"] == NTP
    });
    let leaked = sniffer
        .received(|p| p["dst"] == REMOTE_V4_B.to_string() && p["frag_offset"].as_u64() != Some(0));
    assert!(
        leaked.is_empty(),
        "a lone fragment reached REMOTE_V4_B: {leaked:?} (send: {sent:?})"
    );
}

// --- 8. Packet sockets -----------------------------------------------------------------

/// Closes, with the TC programs on the link: frames written to the link itself. A root
/// process with `CAP_NET_RAW` opens a packet socket and sends a whole Ethernet frame,
/// UDP to `REMOTE_V4_B:9`, to its gateway's MAC address. Packet sockets hand frames to
/// the device directly: no IP output path runs, so no cgroup `cgroup_skb` program sees
/// them; only a TC program on the link (or taking `CAP_NET_RAW` away) can stop them.
/// With the cgroup programs alone the frame leaves: SECURITY.md says so.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn packet_socket_frame_from_the_cgroup_does_not_leave() {
    if !require_root() {
        return;
    }
    let base = Base::start_with_tc(POLICY);
    let _https = Server::tcp(&base.topo.server, None, REMOTE_V4_A, HTTPS);
    let sniffer = base.sniff_server();
    let gateway_mac = mac_of(&base.topo.server, &base.topo.server_veth);
    // Dropped by the TC program, the frame may fail to send (ENOBUFS) or vanish.
    let sent = raw_udp(
        &base.client(),
        v4(CLIENT_V4, LOCAL_PORT),
        v4(REMOTE_V4_B, DISCARD),
        &["--link", &base.topo.client_veth, "--dst-mac", &gateway_mac],
    );
    // The marker: an allowed connection, from outside the cgroup, after the frame.
    assert_ok(
        &probe_tcp(&base.topo.client, None, REMOTE_V4_A, HTTPS),
        "the marker",
    );
    sniffer.wait_received("the marker", |p| {
        p["dst"] == REMOTE_V4_A.to_string() && p["dport"] == HTTPS
    });
    let leaked = sniffer.received(|p| p["dst"] == REMOTE_V4_B.to_string());
    assert!(
        leaked.is_empty(),
        "a frame from a packet socket in the cgroup reached the server: {leaked:?} (send: {sent:?})"
    );
}

// --- 9. Links to workloads (`--workload-interface`) ----------------------------------------
//
// On a node, the packet-socket attacks above are closed by the TC programs on the node's
// end of each pod's link, facing the pod. Here the server namespace plays the node (the
// agent runs there) and the client namespace a pod behind it; the agent's cgroup programs
// are on the pod's cgroup as before.

impl Base {
    /// The agent in the server namespace, on the cgroup and, facing the workload, on the
    /// links matching `pattern` (the server's end of the client's link by default).
    fn start_on_node(policy: &str, pattern: Option<&str>) -> Base {
        Base::start_on_node_with(policy, Topology::new(), pattern)
    }

    fn start_on_node_with(policy: &str, topo: Topology, pattern: Option<&str>) -> Base {
        let policy = TempFile::new(policy);
        let cgroup = TestCgroup::new();
        let pattern = pattern.unwrap_or(&topo.server_veth).to_owned();
        // A node forwards, IPv6 included (the check on the pod's link depends on it).
        for setting in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            let status = topo.server.exec(&["sysctl", "-q", "-w", setting]).status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "sysctl -w {setting} failed"
            );
        }
        let agent = start_agent_in(
            &topo.server,
            &policy,
            &cgroup,
            &["--workload-interface", &pattern],
        );
        Base {
            agent,
            cgroup,
            topo,
            _policy: policy,
        }
    }

    /// The server's MAC on the client's link: where a pod's frames to the world go.
    fn gateway_mac(&self) -> String {
        mac_of(&self.topo.server, self.node_link())
    }

    /// The interface that holds the server's addresses on the client's link: the veth
    /// end, or the bridge it is a port of.
    fn node_link(&self) -> &str {
        let links = self.topo.server.ip("-j link show");
        if links.contains(&format!("\"ifname\":\"{BRIDGE}\"")) {
            BRIDGE
        } else {
            &self.topo.server_veth
        }
    }
}

/// The bridge of `start_on_bridge`, named as kubenet names its own.
const BRIDGE: &str = "cbr0";

/// As kubenet lays out a node: the pods' links are ports of a bridge that holds the
/// node's address on the pods' network, and the agent guards the bridge.
fn start_on_bridge(policy: &str) -> Base {
    let topo = Topology::new();
    let server = &topo.server;
    server.ip(&format!("link add {BRIDGE} type bridge"));
    server.ip(&format!("addr flush dev {}", topo.server_veth));
    server.ip(&format!("link set {} master {BRIDGE}", topo.server_veth));
    server.ip(&format!("addr add {SERVER_V4}/24 dev {BRIDGE}"));
    server.ip(&format!("-6 addr add {SERVER_V6}/64 dev {BRIDGE} nodad"));
    server.ip(&format!("link set {BRIDGE} up"));
    Base::start_on_node_with(policy, topo, Some(BRIDGE))
}

/// Closes, on the node: the answer of `forged_answer_routed_back_by_the_next_hop_teaches_
/// nothing`, forged by a pod with a packet socket, which the node would route straight
/// back to the pod's socket. On the node's end of the pod's link its source, the
/// resolver's address, is not one the node routes to that link: the frame is dropped
/// there and never comes back. (With the cgroup programs alone it comes back and
/// teaches: SECURITY.md.)
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn forged_answer_reflected_by_the_node_is_dropped_on_the_workload_link() {
    if !require_root() {
        return;
    }
    let base = Base::start_on_node(&zone_policy(FAR_RESOLVER), None);
    let (_spur, _dns) = far_resolver(&base);
    let client = base.client();
    let (_query, port) = query_wait_at(&client, PWN, FAR_RESOLVER.into(), QUERY_ID, 1);
    let gateway_mac = base.gateway_mac();
    let link = ["--link", &base.topo.client_veth, "--dst-mac", &gateway_mac];
    let sniffer = Sniffer::start(&base.topo.client, &base.topo.client_veth);
    let _ = raw_udp(
        &client,
        v4(FAR_RESOLVER, DNS),
        v4(CLIENT_V4, port),
        &strs(&pwn_answer(&link)),
    );
    // The marker: a real answer from the resolver, to a query sent after the forgery.
    let (_marker, marker_port) =
        query_wait_at(&base.client_outside(), OK_NAME, FAR_RESOLVER.into(), 1, 1);
    let from_resolver = |p: &Value, port: u16| {
        p["out"] == false && p["src"] == FAR_RESOLVER.to_string() && p["dport"] == port
    };
    sniffer.assert_none_before_marker(
        |p| from_resolver(p, marker_port),
        |p| from_resolver(p, port),
        "the node sent the forged answer back",
    );
    // The deny line names the forgery.
    base.agent.wait_for_event(
        |e| {
            e["reason"] == "spoofed_source"
                && e["dst"] == CLIENT_V4.to_string()
                && e["dport"] == port
        },
        FORGED_EVENT_TIMEOUT,
    );

    base.assert_b_https_dropped("a forged answer the node would reflect");
}

/// Closes, on the node: a frame a pod writes with a packet socket, to an address the
/// policy does not allow (UDP to [`FAR_HOST`], allowed on TCP 443 only), which no cgroup
/// program sees: the node does not forward it.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn packet_socket_frame_from_a_workload_is_dropped_at_the_node() {
    if !require_root() {
        return;
    }
    let base = Base::start_on_node(POLICY, None);
    let spur = Spur::new(&base.topo, FAR_HOST, None);
    let _https = Server::tcp(&spur.netns, None, FAR_HOST, HTTPS);
    let sniffer = Sniffer::start(&spur.netns, &spur.spur_veth);
    let gateway_mac = base.gateway_mac();
    let sent = raw_udp(
        &base.client(),
        v4(CLIENT_V4, LOCAL_PORT),
        v4(FAR_HOST, DISCARD),
        &["--link", &base.topo.client_veth, "--dst-mac", &gateway_mac],
    );
    assert_far_host_marker_only(&base, &sniffer, &sent);
}

/// An allowed connection from the client (outside the cgroup: only the node's programs
/// decide it) reached [`FAR_HOST`], and nothing to its UDP port 9 did before it.
fn assert_far_host_marker_only(base: &Base, sniffer: &Sniffer, sent: &ProbeResult) {
    assert_ok(
        &probe_tcp(&base.topo.client, None, FAR_HOST, HTTPS),
        "the marker",
    );
    let to_far_host = |p: &Value, port: u16| p["dst"] == FAR_HOST.to_string() && p["dport"] == port;
    sniffer.assert_none_before_marker(
        |p| to_far_host(p, HTTPS),
        |p| to_far_host(p, DISCARD),
        &format!("a datagram to FAR_HOST:9 left the node (send: {sent:?})"),
    );
}

/// Closes, on the node: a "reply" flow opened by a datagram the pod writes itself, "from"
/// `FAR_HOST:9` to its own socket, as a frame to the node, which would route it straight
/// back: the pod's socket would then "reply" to `FAR_HOST:9`, which the policy does not
/// allow. The frame is dropped on the node's end of the link (its source is not the
/// pod's), so the socket receives nothing, and sends nothing there.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn spoofed_inbound_datagram_reflected_by_the_node_opens_no_reply_path() {
    if !require_root() {
        return;
    }
    let base = Base::start_on_node(POLICY, None);
    let spur = Spur::new(&base.topo, FAR_HOST, None);
    let _https = Server::tcp(&spur.netns, None, FAR_HOST, HTTPS);
    let at_pod = Sniffer::start(&base.topo.client, &base.topo.client_veth);
    let at_far_host = Sniffer::start(&spur.netns, &spur.spur_veth);
    let client = base.client();
    let far9 = SocketAddr::from((FAR_HOST, DISCARD));
    let (mut socket, port) = udp_listen_at(&client, any_port(0), 1, Some(far9));
    let gateway_mac = base.gateway_mac();
    let sent = raw_udp(
        &client,
        v4(FAR_HOST, DISCARD),
        v4(CLIENT_V4, port),
        &["--link", &base.topo.client_veth, "--dst-mac", &gateway_mac],
    );
    assert_far_host_marker_only(&base, &at_far_host, &sent);
    let back = at_pod.received(|p| p["src"] == FAR_HOST.to_string() && p["dport"] == port);
    assert!(
        back.is_empty(),
        "the node sent the spoofed datagram back: {back:?}"
    );
    assert!(socket.running(), "the socket received a datagram");
    socket.stop();
}

/// The legitimate use next to the tests above, with the node's programs on the pod's
/// link as well as the cgroup programs: a name looked up through the resolver a hop
/// away is learned and reached at once; allowed addresses are reached over TCP, UDP and
/// IPv6 (neighbour discovery with the node included); a server in the pod answers a
/// client no rule lists; and what the policy does not allow is still dropped.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn workloads_behind_a_workload_link_keep_working() {
    if !require_root() {
        return;
    }
    let policy = format!(
        "{POLICY}  - fqdn: \"{ZONE}\"\n    ports: [TCP:{HTTPS}]\ndns:\n  resolvers: [{FAR_RESOLVER}]\n"
    );
    let base = Base::start_on_node(&policy, None);
    let (_spur, _dns) = far_resolver(&base);
    base.resolve_ok_and_connect(FAR_RESOLVER, "the resolver behind the node");
    let cg = Some(&base.cgroup);
    let _ntp = Server::udp(&base.topo.server, None, REMOTE_V4_A, NTP);
    let _v6 = Server::tcp(&base.topo.server, None, REMOTE_V6_A, HTTPS);
    assert_ok(
        &probe_udp(&base.topo.client, cg, REMOTE_V4_A, NTP),
        "UDP to an allowed address",
    );
    assert_ok(
        &probe_tcp(&base.topo.client, cg, REMOTE_V6_A, HTTPS),
        "TCP to an allowed IPv6 address",
    );
    const ECHO: u16 = 7443;
    let _echo = Server::tcp(&base.topo.client, cg, CLIENT_V4, ECHO);
    assert_ok(
        &probe_tcp(&base.topo.server, None, CLIENT_V4, ECHO),
        "the node's connection to a server in the pod",
    );
    assert_ok(
        &probe_udp(&base.topo.client, None, REMOTE_V4_A, NTP),
        "UDP to an allowed address from outside the cgroup",
    );
    base.assert_b_https_dropped("nothing");
}

/// A pod's link that appears after the agent started is guarded within moments, and
/// forgotten (its pins removed) when it goes: a second pod, its link named to match the
/// agent's pattern, writes the forbidden frame once its link is attached, next to an
/// allowed connection.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_workload_link_that_appears_later_is_guarded() {
    if !require_root() {
        return;
    }
    const POD2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
    let prefix = format!("wl{}", std::process::id() % 100_000);
    let base = Base::start_on_node(POLICY, Some(&format!("{prefix}*")));
    let spur = Spur::new(&base.topo, FAR_HOST, None);
    let _https = Server::tcp(&spur.netns, None, FAR_HOST, HTTPS);
    let pod = Netns::new();
    let (pod_veth, node_veth) = (format!("{prefix}a"), format!("{prefix}b"));
    base.topo.server.ip(&format!(
        "link add {node_veth} type veth peer name {pod_veth} netns {}",
        pod.name()
    ));
    base.agent.wait_for_event(
        |e| e["event"] == "workload_attached" && e["interface"] == node_veth.as_str(),
        ATTACH_TIMEOUT,
    );
    pod.ip(&format!("link set {pod_veth} up"));
    pod.ip(&format!("addr add {POD2}/32 dev {pod_veth}"));
    pod.ip(&format!("route add {SERVER_V4}/32 dev {pod_veth}"));
    pod.ip(&format!("route add default via {SERVER_V4} dev {pod_veth}"));
    base.topo.server.ip(&format!("link set {node_veth} up"));
    base.topo
        .server
        .ip(&format!("route add {POD2}/32 dev {node_veth}"));

    let sniffer = Sniffer::start(&spur.netns, &spur.spur_veth);
    let gateway_mac = mac_of(&base.topo.server, &node_veth);
    let sent = raw_udp(
        &At(&pod, None),
        v4(POD2, LOCAL_PORT),
        v4(FAR_HOST, DISCARD),
        &["--link", &pod_veth, "--dst-mac", &gateway_mac],
    );
    assert_ok(
        &probe_tcp(&pod, None, FAR_HOST, HTTPS),
        "the marker, from the second pod",
    );
    sniffer.assert_none_before_marker(
        |p| p["src"] == POD2.to_string() && p["dport"] == HTTPS,
        |p| p["dst"] == FAR_HOST.to_string() && p["dport"] == DISCARD,
        &format!("a packet-socket frame from the second pod left the node (send: {sent:?})"),
    );

    let pins = base
        .agent
        .pin_dir()
        .expect("the agent has a pin root of its own");
    let node_pins = || -> Vec<String> {
        pins.link_pins()
            .into_iter()
            .filter(|p| p.starts_with(&format!("workload-{node_veth}-")))
            .collect()
    };
    // TCX links (kernel 6.6 and later) are pinned; netlink filters are not.
    let pinned = !node_pins().is_empty();
    base.topo.server.ip(&format!("link del {node_veth}"));
    if pinned {
        wait_until(
            "the gone link's pins removed",
            Duration::from_secs(10),
            || node_pins().is_empty(),
        );
    }
}

/// Under kubenet the node's end of every pod's link is a port of the bridge `cbr0`, which
/// holds the node's address: guarding the bridge decides what the pods send through the
/// node, and the pods' sources route back over the bridge. The packet-socket frame of
/// `packet_socket_frame_from_a_workload_is_dropped_at_the_node`, and the reflected
/// forged answer, are dropped there.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_bridge_to_workloads_is_guarded_like_their_links() {
    if !require_root() {
        return;
    }
    let base = start_on_bridge(&zone_policy(FAR_RESOLVER));
    let (spur, _dns) = far_resolver(&base);
    let sniffer = Sniffer::start(&spur.netns, &spur.spur_veth);
    let gateway_mac = base.gateway_mac();
    let link = ["--link", &base.topo.client_veth, "--dst-mac", &gateway_mac];
    let sent = raw_udp(
        &base.client(),
        v4(CLIENT_V4, LOCAL_PORT),
        v4(FAR_RESOLVER, DISCARD),
        &link,
    );
    let client = base.client();
    let (_query, port) = query_wait_at(&client, PWN, FAR_RESOLVER.into(), QUERY_ID, 1);
    let at_pod = Sniffer::start(&base.topo.client, &base.topo.client_veth);
    let _ = raw_udp(
        &client,
        v4(FAR_RESOLVER, DNS),
        v4(CLIENT_V4, port),
        &strs(&pwn_answer(&link)),
    );
    // The marker: a real lookup and connect, which must pass.
    base.resolve_ok_and_connect(FAR_RESOLVER, "the resolver behind the bridged node");
    sniffer.assert_none_before_marker(
        |p| p["dport"] == DNS && p["src"] == CLIENT_V4.to_string(),
        |p| p["dport"] == DISCARD,
        &format!("a packet-socket frame from the pod left the node (send: {sent:?})"),
    );
    let back = at_pod.received(|p| p["src"] == FAR_RESOLVER.to_string() && p["dport"] == port);
    assert!(
        back.is_empty(),
        "the node sent the forged answer back: {back:?}"
    );
    base.assert_b_https_dropped("a forged answer the bridged node would reflect");
}

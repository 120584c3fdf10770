//! DNS learning end to end: a real DNS server (Debian's dnsmasq) in the server namespace,
//! clients in the enforced cgroup that resolve a name and connect at once, and the real
//! agent enforcing a policy of names.
//!
//! An allowed name's address must pass from the very first packet: the kernel learns it
//! from the answer before the client sees the answer. A first SYN dropped anyway would be
//! reported as a deny event, so every test ends by checking that exactly the expected
//! flows were reported, besides the agent's DNS counters.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use egress_tests::dns::{DnsCounters, Forged, Lookup, Record, forge_answer, query_wait, tcp_hold};
use egress_tests::world::{Setup, World, assert_connects, assert_resolved_but_dropped};
use egress_tests::{
    CLIENT_V4, Flow, SERVER_V4, SERVER_V6, assert_ok, assert_timeout, require_root, tcp,
};

const HTTPS: u16 = 443;
const ALT_HTTPS: u16 = 8443;
/// TTL of answers where expiry is not the point: longer than any test.
const LONG_TTL: u32 = 300;

const APP: &str = "app.example.com";
const APP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const APP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x11);
/// A name no test's policy lists.
const OTHER: &str = "other.example.org";
const OTHER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);

/// dnsmasq's addresses, both trusted.
fn resolvers() -> [IpAddr; 2] {
    [SERVER_V4.into(), SERVER_V6.into()]
}

/// A policy in `mode` allowing each of `names` on TCP 443 only, learning from
/// `resolvers`, with `dns_extra` (e.g. `"  min_ttl: 2\n"`) added to its `dns` section.
fn policy(mode: &str, names: &[&str], resolvers: &[IpAddr], dns_extra: &str) -> String {
    let allow: String = names
        .iter()
        .map(|n| format!("  - fqdn: \"{n}\"\n    ports: [TCP:443]\n"))
        .collect();
    let resolvers: Vec<String> = resolvers.iter().map(ToString::to_string).collect();
    format!(
        "mode: {mode}\nallow:\n{allow}dns:\n  resolvers: [{}]\n{dns_extra}",
        resolvers.join(", ")
    )
}

/// [`policy`] in enforce mode, learning from dnsmasq.
fn enforce(names: &[&str]) -> String {
    policy("enforce", names, &resolvers(), "")
}

/// One test's world: echo servers on TCP 443 and 8443 of every address of the server
/// namespace, dnsmasq serving `records` with `ttl`, and the agent on `policy` in `mode`.
fn start(policy: &str, mode: &'static str, ttl: u32, records: &[Record]) -> World {
    World::start(Setup {
        policy,
        mode: Some(mode),
        records,
        ttl,
        remotes: &[],
        tcp_ports: &[HTTPS, ALT_HTTPS],
        udp: &[],
        agent_args: &[],
        files: Vec::new(),
    })
}

/// Counters of `n` answers for allowed names, one address each, and nothing else.
fn learned_only(n: u64) -> DnsCounters {
    DnsCounters {
        answers: n,
        learned: n,
        kernel_answers: n,
        kernel_learned: n,
        ..DnsCounters::default()
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn exact_name_is_learned_and_allowed_on_its_ports_only() {
    if !require_root() {
        return;
    }
    let records = [Record::Host(APP, APP_V4.into())];
    let mut env = start(&enforce(&[APP]), "enforce", LONG_TTL, &records);

    let r = env.resolve(Lookup::a(APP, SERVER_V4), HTTPS);
    assert_connects(&r, APP_V4, "resolve and connect to 443");
    let learned = env.agent.wait_learned(APP, APP_V4);
    assert_eq!(learned["ports"], "TCP:443", "{learned}");
    assert_eq!(learned["ttl"], LONG_TTL, "{learned}");
    assert_timeout(
        &env.connect(APP_V4, ALT_HTTPS),
        "the learned address on a port the name does not allow",
    );

    let (_, counters) = env.finish(&[tcp(APP_V4, ALT_HTTPS)]);
    assert_eq!(counters, learned_only(1));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn wildcard_one_and_two_labels_deep() {
    if !require_root() {
        return;
    }
    const ZONE: &str = "*.hcp.eastus.example.net";
    // Each name has its own address, so a drop means the name taught nothing.
    let allowed = [
        ("a.hcp.eastus.example.net", Ipv4Addr::new(203, 0, 113, 51)),
        ("a.b.hcp.eastus.example.net", Ipv4Addr::new(203, 0, 113, 52)),
    ];
    let dropped = [
        ("hcp.eastus.example.net", Ipv4Addr::new(203, 0, 113, 53)),
        ("a.hcp.westus.example.net", Ipv4Addr::new(203, 0, 113, 54)),
        ("a.xhcp.eastus.example.net", Ipv4Addr::new(203, 0, 113, 55)),
        (
            "a.hcp.eastus.example.net.evil.example.org",
            Ipv4Addr::new(203, 0, 113, 56),
        ),
    ];
    let records: Vec<Record> = allowed
        .iter()
        .chain(&dropped)
        .map(|(name, addr)| Record::Host(name, (*addr).into()))
        .collect();
    let mut env = start(&enforce(&[ZONE]), "enforce", LONG_TTL, &records);

    for (name, addr) in allowed {
        assert_connects(&env.resolve(Lookup::a(name, SERVER_V4), HTTPS), addr, name);
    }
    for (name, addr) in dropped {
        assert_resolved_but_dropped(&env.resolve(Lookup::a(name, SERVER_V4), HTTPS), addr, name);
    }

    let expected: Vec<Flow> = dropped.iter().map(|(_, a)| tcp(*a, HTTPS)).collect();
    for (name, addr) in allowed {
        env.agent.wait_learned(name, addr);
    }
    let (_, counters) = env.finish(&expected);
    assert_eq!(
        counters,
        DnsCounters {
            kernel_answers: 6,
            unmatched: 4,
            ..learned_only(2)
        }
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn cname_chain() {
    if !require_root() {
        return;
    }
    const ALIAS: &str = "cdn.example.com";
    const MIDDLE: &str = "edge1.example.net";
    const TARGET: &str = "edge2.example.net";
    let target_v4 = Ipv4Addr::new(203, 0, 113, 40);
    let target_v6 = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x40);
    let records = [
        Record::Cname(ALIAS, MIDDLE),
        Record::Cname(MIDDLE, TARGET),
        Record::Host(TARGET, target_v4.into()),
        Record::Host(TARGET, target_v6.into()),
    ];
    let mut env = start(&enforce(&[ALIAS]), "enforce", LONG_TTL, &records);

    // The chain's end is not allowed on its own: asked for directly, it teaches nothing.
    assert_resolved_but_dropped(
        &env.resolve(Lookup::a(TARGET, SERVER_V4), HTTPS),
        target_v4,
        "the CNAME target, resolved directly",
    );
    // Through the allowed alias (alias -> CNAME -> CNAME -> A), its address passes.
    assert_connects(
        &env.resolve(Lookup::a(ALIAS, SERVER_V4), HTTPS),
        target_v4,
        "the alias",
    );
    env.agent.wait_learned(ALIAS, target_v4);
    // The target's other address, asked for directly afterwards, stays dropped.
    assert_resolved_but_dropped(
        &env.resolve(Lookup::aaaa(TARGET, SERVER_V6), HTTPS),
        target_v6,
        "the CNAME target's AAAA, resolved directly",
    );

    let (_, counters) = env.finish(&[tcp(target_v4, HTTPS), tcp(target_v6, HTTPS)]);
    assert_eq!(
        counters,
        DnsCounters {
            kernel_answers: 3,
            unmatched: 2,
            ..learned_only(1)
        }
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn aaaa_over_ipv6() {
    if !require_root() {
        return;
    }
    let records = [
        Record::Host(APP, APP_V4.into()),
        Record::Host(APP, APP_V6.into()),
    ];
    let mut env = start(&enforce(&[APP]), "enforce", LONG_TTL, &records);

    assert_connects(
        &env.resolve(Lookup::aaaa(APP, SERVER_V6), HTTPS),
        APP_V6,
        "AAAA from the IPv6 resolver, connect over IPv6",
    );
    env.agent.wait_learned(APP, APP_V6);
    // The AAAA answer taught only its own address.
    assert_timeout(
        &env.connect(APP_V4, HTTPS),
        "the name's IPv4 address, never resolved",
    );

    let (_, counters) = env.finish(&[tcp(APP_V4, HTTPS)]);
    assert_eq!(counters, learned_only(1));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn mixed_case_query() {
    if !require_root() {
        return;
    }
    let records = [Record::Host(APP, APP_V4.into())];
    let mut env = start(&enforce(&[APP]), "enforce", LONG_TTL, &records);

    assert_connects(
        &env.resolve(Lookup::a("App.Example.COM", SERVER_V4), HTTPS),
        APP_V4,
        "App.Example.COM",
    );
    env.agent.wait_learned(APP, APP_V4);

    let (_, counters) = env.finish(&[]);
    assert_eq!(counters, learned_only(1));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn never_resolved_address_stays_dropped() {
    if !require_root() {
        return;
    }
    let records = [Record::Host(APP, APP_V4.into())];
    let mut env = start(&enforce(&[APP]), "enforce", LONG_TTL, &records);

    assert_timeout(
        &env.connect(APP_V4, HTTPS),
        "an allowed name's address before any lookup",
    );
    assert_connects(
        &env.resolve(Lookup::a(APP, SERVER_V4), HTTPS),
        APP_V4,
        "the same address after the lookup",
    );
    env.agent.wait_learned(APP, APP_V4);

    let (_, counters) = env.finish(&[tcp(APP_V4, HTTPS)]);
    assert_eq!(counters, learned_only(1));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn ttl_expiry_keeps_open_connections() {
    if !require_root() {
        return;
    }
    /// The floor the policy puts under dnsmasq's 1-second TTL: the held connection, a new
    /// process, must connect before it runs out, which takes seconds on a slow machine.
    const MIN_TTL: u64 = 5;
    /// Past the latest the expiry can be seen (`deadline` below).
    const HOLD: Duration = Duration::from_secs(MIN_TTL + 7);
    const EXCHANGE_EVERY: Duration = Duration::from_millis(200);
    let records = [Record::Host(APP, APP_V4.into())];
    let policy = policy(
        "enforce",
        &[APP],
        &resolvers(),
        &format!("  min_ttl: {MIN_TTL}\n"),
    );
    let mut env = start(&policy, "enforce", 1, &records);
    let cg = Some(&env.cgroup);

    let resolved_at = Instant::now();
    assert_connects(
        &env.resolve(Lookup::a(APP, SERVER_V4), HTTPS),
        APP_V4,
        "resolve and connect",
    );
    let mut hold = tcp_hold(&env.topo.client, cg, APP_V4, HTTPS, HOLD, EXCHANGE_EVERY);
    // Connected before the TTL ran out, or this would have timed out.
    assert_eq!(hold.line(0)["connected"], true, "the held connection");
    assert_eq!(env.agent.wait_learned(APP, APP_V4)["ttl"], 1);

    // Every expiry the kernel or the agent set for the name was computed before this: the
    // (floored) TTL runs out by `learned_by + MIN_TTL` at the latest.
    let learned_by = Instant::now();
    let latest_expiry = learned_by + Duration::from_secs(MIN_TTL);

    // New connections pass until the (floored) TTL runs out, then are dropped; the
    // kernel checks the expiry itself, the agent removes the entry within a second.
    let dropped = loop {
        let tried_at = Instant::now();
        let r = env.connect(APP_V4, HTTPS);
        if !r.ok {
            break r;
        }
        assert!(
            tried_at < latest_expiry,
            "a new connection sent {:?} after the TTL ran out passed",
            tried_at - latest_expiry
        );
    };
    assert_timeout(&dropped, "a new connection after the TTL");
    // The dropped SYN went out before now and after the expiry, which is at least MIN_TTL
    // after the lookup began (dnsmasq's 1 s would drop at 1 s). Only a bound a correct
    // agent meets on any machine: a slower one only makes `dropped_by` larger.
    let dropped_by = resolved_at.elapsed();
    assert!(
        dropped_by >= Duration::from_secs(MIN_TTL),
        "a new connection was dropped {dropped_by:?} after the lookup: min_ttl not applied"
    );
    assert!(
        hold.running(),
        "the held connection should outlive the expiry"
    );
    // It exchanged a line every EXCHANGE_EVERY for all of HOLD, before and after.
    assert_ok(&hold.finish(), "every echo on the held connection");

    let (_, counters) = env.finish(&[tcp(APP_V4, HTTPS)]);
    assert_eq!(
        counters,
        DnsCounters {
            expired: 1,
            ..learned_only(1)
        }
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn a_name_s_ports_end_with_it_while_another_name_keeps_the_address() {
    if !require_root() {
        return;
    }
    /// The floor the policy puts under the short-lived name's 1-second TTL.
    const MIN_TTL: u64 = 2;
    const ALT: &str = "alt.example.com";
    // Two names of one address: APP on 443 for long, ALT on 8443 for a moment.
    let records = [
        Record::Host(APP, APP_V4.into()),
        Record::HostWithTtl(ALT, APP_V4.into(), 1),
    ];
    let resolvers: Vec<String> = resolvers().iter().map(ToString::to_string).collect();
    let policy = format!(
        "mode: enforce\nallow:\n  - fqdn: {APP}\n    ports: [TCP:{HTTPS}]\n  - fqdn: {ALT}\n    ports: [TCP:{ALT_HTTPS}]\ndns:\n  resolvers: [{}]\n  min_ttl: {MIN_TTL}\n",
        resolvers.join(", ")
    );
    let mut env = start(&policy, "enforce", LONG_TTL, &records);

    assert_connects(
        &env.resolve(Lookup::a(APP, SERVER_V4), HTTPS),
        APP_V4,
        "APP on its port",
    );
    let alt_resolved_at = Instant::now();
    assert_connects(
        &env.resolve(Lookup::a(ALT, SERVER_V4), ALT_HTTPS),
        APP_V4,
        "ALT on its port",
    );
    env.agent.wait_learned(ALT, APP_V4);
    // Every expiry set for ALT was computed before this. The kernel checks an address's
    // expiry, but a name's ports on an address another name keeps are the agent's to
    // take back, on its expiry tick (every second; later on a loaded machine): the check
    // is that the port closes, with a bound no slow machine reaches, not how soon.
    let expired_by = Instant::now() + Duration::from_secs(MIN_TTL);
    let patience = Duration::from_secs(30);
    // ALT's port closes once its TTL has run out, although APP still holds the address.
    loop {
        let tried_at = Instant::now();
        let r = env.connect(APP_V4, ALT_HTTPS);
        if !r.ok {
            assert_timeout(&r, "ALT's port after its TTL");
            break;
        }
        assert!(
            tried_at < expired_by + patience,
            "ALT's port still open {:?} after ALT's TTL ran out: APP's name keeps it open",
            tried_at - expired_by
        );
    }
    // The dropped SYN went out after ALT's (floored) TTL, counted from before the lookup.
    let dropped_by = alt_resolved_at.elapsed();
    assert!(
        dropped_by >= Duration::from_secs(MIN_TTL),
        "ALT's port closed {dropped_by:?} after the lookup: min_ttl not applied"
    );
    // Refreshing APP's name does not bring it back.
    assert_connects(
        &env.resolve(Lookup::a(APP, SERVER_V4), HTTPS),
        APP_V4,
        "APP again",
    );
    assert_timeout(
        &env.connect(APP_V4, ALT_HTTPS),
        "ALT's port after APP's refresh",
    );

    let (_, counters) = env.finish(&[tcp(APP_V4, ALT_HTTPS)]);
    assert_eq!(
        counters,
        DnsCounters {
            expired: 1,
            ..learned_only(3)
        }
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn forged_answers_are_ignored() {
    if !require_root() {
        return;
    }
    const NAME: &str = "forged.example.com";
    const ID: u16 = 0x5eed;
    /// A trusted resolver where nothing answers, so only forged answers come back.
    const SILENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 153);
    const UNTRUSTED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
    // What each forged answer claims the name is at.
    let wrong_source = Ipv4Addr::new(203, 0, 113, 71);
    let unsolicited = Ipv4Addr::new(203, 0, 113, 72);
    let matching = Ipv4Addr::new(203, 0, 113, 73);
    let policy = policy("enforce", &[NAME], &[SILENT.into()], "");
    let mut env = start(&policy, "enforce", LONG_TTL, &[]);
    for addr in [wrong_source, unsolicited, matching] {
        env.topo.add_remote(addr);
    }
    let query = query_wait(&env.topo.client, Some(&env.cgroup), NAME, SILENT, ID, 3);
    let port = query.line(0)["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("query-wait reports its port");
    let forge = |n: usize, src: Ipv4Addr, id: u16, a: Ipv4Addr| {
        let answer = Forged {
            src,
            dst: CLIENT_V4,
            dport: port,
            id,
            name: NAME,
            a,
        };
        forge_answer(&env.topo.server, answer);
        // Received by the socket: the cgroup's ingress program has seen it.
        let got = query.line(n);
        assert_eq!(got["from"], format!("{src}:53"), "{got}");
        assert_eq!(got["addrs"], serde_json::json!([a.to_string()]), "{got}");
    };

    forge(1, UNTRUSTED, ID, wrong_source);
    assert_timeout(
        &env.connect(wrong_source, HTTPS),
        "an address from an answer with a wrong source",
    );
    forge(2, SILENT, ID.wrapping_add(1), unsolicited);
    assert_timeout(
        &env.connect(unsolicited, HTTPS),
        "an address from an answer to no query",
    );
    // The control: the same forger, with the source and id of the query, is believed,
    // so the two drops above are the checks at work, not a broken forgery.
    forge(3, SILENT, ID, matching);
    env.agent.wait_learned(NAME, matching);
    assert_ok(
        &env.connect(matching, HTTPS),
        "an address from an answer matching the query",
    );

    let (_, counters) = env.finish(&[tcp(wrong_source, HTTPS), tcp(unsolicited, HTTPS)]);
    assert_eq!(
        counters,
        DnsCounters {
            untrusted: 1,
            unsolicited: 1,
            ..learned_only(1)
        }
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn dns_over_tcp() {
    if !require_root() {
        return;
    }
    let records = [Record::Host(APP, APP_V4.into())];
    let mut env = start(&enforce(&[APP]), "enforce", LONG_TTL, &records);

    assert_connects(
        &env.resolve(Lookup::a(APP, SERVER_V4).over_tcp(), HTTPS),
        APP_V4,
        "resolve over TCP and connect",
    );
    env.agent.wait_learned(APP, APP_V4);

    let (_, counters) = env.finish(&[]);
    assert_eq!(counters, learned_only(1));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn unlisted_names_resolve_but_stay_dropped() {
    if !require_root() {
        return;
    }
    let records = [
        Record::Host(APP, APP_V4.into()),
        Record::Host(OTHER, OTHER_V4.into()),
    ];
    let mut env = start(&enforce(&[APP]), "enforce", LONG_TTL, &records);

    assert_resolved_but_dropped(
        &env.resolve(Lookup::a(OTHER, SERVER_V4), HTTPS),
        OTHER_V4,
        "a name the policy does not list",
    );

    let (_, counters) = env.finish(&[tcp(OTHER_V4, HTTPS)]);
    assert_eq!(
        counters,
        DnsCounters {
            kernel_answers: 1,
            unmatched: 1,
            ..DnsCounters::default()
        }
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (namespaces, cgroups, eBPF): run as root, or CI=true"
)]
#[test]
fn audit_mode_reports_would_drops_of_a_name_only_policy() {
    if !require_root() {
        return;
    }
    let records = [
        Record::Host(APP, APP_V4.into()),
        Record::Host(OTHER, OTHER_V4.into()),
    ];
    let policy = policy("audit", &[APP], &resolvers(), "");
    let mut env = start(&policy, "audit", LONG_TTL, &records);

    // Everything passes; only what enforcement would drop is reported.
    assert_connects(
        &env.resolve(Lookup::a(APP, SERVER_V4), HTTPS),
        APP_V4,
        "an allowed name",
    );
    env.agent.wait_learned(APP, APP_V4);
    assert_connects(
        &env.resolve(Lookup::a(OTHER, SERVER_V4), HTTPS),
        OTHER_V4,
        "an unlisted name",
    );
    assert_ok(
        &env.connect(APP_V4, ALT_HTTPS),
        "the allowed name's address on another port",
    );

    let (reported, counters) = env.finish(&[tcp(OTHER_V4, HTTPS), tcp(APP_V4, ALT_HTTPS)]);
    for (flow, count) in &reported {
        assert_eq!(*count, 1, "{flow:?} reported {count} times");
    }
    assert_eq!(
        counters,
        DnsCounters {
            kernel_answers: 2,
            unmatched: 1,
            ..learned_only(1)
        }
    );
}

//! The kernel verdict on crafted packets, through `BPF_PROG_TEST_RUN`: the real object, the
//! real verifier, the maps as the agent fills them. Needs root (CAP_BPF); in CI (`CI=true`)
//! a missing privilege fails the test instead of skipping it.

mod common;
mod frames;

use common::privileged;
use frames::*;
use std::net::{Ipv4Addr, Ipv6Addr};

use egress_agent::{
    compile::{compile, compile_with, settings},
    dns::learner::LearnedStore as _,
    events::{decode, decode_event},
    loader::{ByProto, EGRESS_CGROUP, EGRESS_TC, Enforcer, INGRESS_CGROUP, LinkSide, Stats},
    policy::{DnsSettings, Mode, parse},
    reason::Reason,
    sys::boot_time_ns,
};
use egress_common::{ACTION_AUDIT, ACTION_DENY, Event, LearnedValue, proto, v4_mapped};

// ---- tests ----------------------------------------------------------------------------

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn allowed_cidr_and_port_pass_and_everything_else_drops() {
    if !privileged() {
        return;
    }
    let e = enforcer(Mode::Enforce);
    let cases = [
        ("203.0.113.10", 443, PASS),
        ("203.0.113.10", 80, DROP),
        ("203.0.113.200", 8080, PASS), // nested /25 adds its own port
        ("203.0.113.200", 443, PASS),  // ... and keeps the /24's
        ("203.0.113.10", 8080, DROP),  // the /25's port is not the /24's
        ("198.51.100.200", 5, PASS),   // a rule without ports allows every port
        ("198.51.100.201", 443, DROP),
        ("2001:db8:2::10", 443, PASS),
        ("2001:db8:2::10", 80, DROP),
        ("2001:db8:3::10", 443, DROP),
    ];
    for (dst, port, want) in cases {
        assert_eq!(
            run(&e, EGRESS_CGROUP, &tcp_to(ip(dst), port)),
            want,
            "tcp {dst}:{port}"
        );
    }
    let ntp = v4_frame(Ipv4Addr::new(203, 0, 113, 10), proto::UDP, &udp(40000, 123));
    assert_eq!(run(&e, EGRESS_CGROUP, &ntp), PASS, "udp 123");
    let tcp_123 = tcp_to(ip("203.0.113.10"), 123);
    assert_eq!(
        run(&e, EGRESS_CGROUP, &tcp_123),
        DROP,
        "UDP:123 does not allow TCP:123"
    );
    let stats = e.stats().expect("counters");
    assert_eq!(
        (stats.allowed, stats.dropped, stats.audited),
        (
            ByProto {
                tcp: 5,
                udp: 1,
                ..ByProto::default()
            },
            ByProto {
                tcp: 6,
                ..ByProto::default()
            },
            ByProto::default()
        )
    );
}

const GRE: u8 = 47;

/// Every decided packet is counted once, under its verdict and protocol: ICMPv6 with ICMP,
/// anything else (and an unreadable packet) as other, also for the flow-table fast path.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn verdict_counters_are_split_by_protocol() {
    if !privileged() {
        return;
    }
    let e = enforcer(Mode::Enforce);
    let all_ports = Ipv4Addr::new(198, 51, 100, 200);
    let tcp_only: Ipv6Addr = "2001:db8:2::10".parse().expect("literal");
    let ns_dst: Ipv6Addr = "ff02::1:ff00:2".parse().expect("literal");
    let mut truncated = tcp_to(ip("203.0.113.10"), 443);
    truncated.truncate(14 + 20 + 2);
    let cases = [
        (tcp_to(ip("203.0.113.10"), 443), PASS),
        (tcp_to(ip("203.0.113.10"), 443), PASS), // the same flow, from FLOWS
        (tcp_to(ip("203.0.113.10"), 80), DROP),
        (v4_frame(all_ports, proto::UDP, &udp(40000, 9)), PASS),
        (v4_frame(all_ports, proto::ICMP, &icmp(8, 0, &[])), PASS),
        (icmpv6_frame(ns_dst, 255, &icmp(135, 0, &[0; 16])), PASS),
        (v6_frame(tcp_only, proto::ICMPV6, &icmp(128, 0, &[])), DROP),
        (v6_frame(tcp_only, proto::ICMPV6, &icmp(128, 0, &[])), DROP),
        (v4_frame(all_ports, GRE, &[0; 8]), PASS),
        (v4_frame(Ipv4Addr::new(203, 0, 113, 10), GRE, &[0; 8]), DROP),
        (truncated, DROP),
    ];
    for (i, (frame, want)) in cases.iter().enumerate() {
        assert_eq!(run(&e, EGRESS_CGROUP, frame), *want, "case {i}");
    }
    assert_eq!(
        e.stats().expect("counters"),
        Stats {
            allowed: ByProto {
                tcp: 2,
                udp: 1,
                icmp: 2,
                other: 1,
            },
            dropped: ByProto {
                tcp: 1,
                udp: 0,
                icmp: 2,
                other: 2,
            },
            events_lost: 0,
            ..Stats::default()
        }
    );

    // Audit mode, through `deny` and then the audited flow's fast path.
    let e = enforcer(Mode::Audit);
    let denied_udp = v4_frame(Ipv4Addr::new(203, 0, 113, 10), proto::UDP, &udp(40000, 9));
    let denied_ping = v6_frame(tcp_only, proto::ICMPV6, &icmp(128, 0, &[]));
    for frame in [&denied_udp, &denied_udp, &denied_ping, &cases[10].0] {
        assert_eq!(run(&e, EGRESS_CGROUP, frame), PASS);
    }
    let stats = e.stats().expect("counters");
    assert_eq!(
        (stats.allowed, stats.dropped),
        (ByProto::default(), ByProto::default())
    );
    assert_eq!(
        stats.audited,
        ByProto {
            tcp: 0,
            udp: 2,
            icmp: 1,
            other: 1,
        }
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn the_tc_program_makes_the_same_decisions_and_passes_non_ip() {
    if !privileged() {
        return;
    }
    let mut e = enforcer(Mode::Enforce);
    e.load_tc(LinkSide::Uplink).expect("TC programs load");
    assert_eq!(
        run(&e, EGRESS_TC, &tcp_to(ip("203.0.113.10"), 443)),
        TC_ACT_OK
    );
    assert_eq!(
        run(&e, EGRESS_TC, &tcp_to(ip("203.0.113.10"), 80)),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&e, EGRESS_TC, &tcp_to(ip("2001:db8:3::1"), 443)),
        TC_ACT_SHOT
    );
    let arp = ethernet(0x0806, &[0u8; 28]);
    assert_eq!(run(&e, EGRESS_TC, &arp), TC_ACT_OK);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn loopback_neighbour_discovery_and_dhcpv6_always_pass() {
    if !privileged() {
        return;
    }
    let e = enforcer(Mode::Enforce);
    assert_eq!(run(&e, EGRESS_CGROUP, &tcp_to(ip("127.0.0.1"), 9)), PASS);
    assert_eq!(run(&e, EGRESS_CGROUP, &tcp_to(ip("127.8.9.10"), 9)), PASS);
    assert_eq!(run(&e, EGRESS_CGROUP, &tcp_to(ip("::1"), 9)), PASS);
    let solicited_node: Ipv6Addr = "ff02::1:ff00:2".parse().expect("literal");
    let ns = icmpv6_frame(solicited_node, 255, &icmp(135, 0, &[0; 16]));
    assert_eq!(run(&e, EGRESS_CGROUP, &ns), PASS, "neighbour solicitation");
    let echo = v6_frame(solicited_node, proto::ICMPV6, &icmp(128, 0, &[]));
    assert_eq!(
        run(&e, EGRESS_CGROUP, &echo),
        DROP,
        "an echo request is not ND"
    );
    let dhcp = v6_frame(
        "ff02::1:2".parse().expect("literal"),
        proto::UDP,
        &udp(546, 547),
    );
    assert_eq!(run(&e, EGRESS_CGROUP, &dhcp), PASS, "DHCPv6 solicit");
}

/// Neighbour discovery and MLD pass only where they stay on the link: to link-local or
/// link-scope multicast addresses with their hop limit, or, to a neighbour's routable
/// address, a solicitation or advertisement with nothing of its own in it.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn neighbour_discovery_and_mld_stay_on_the_link() {
    if !privileged() {
        return;
    }
    let e = enforcer(Mode::Enforce);
    let global: Ipv6Addr = "2001:db8:3::1".parse().expect("literal");
    let solicited_node: Ipv6Addr = "ff02::1:ff00:1".parse().expect("literal");
    let mld_routers: Ipv6Addr = "ff02::16".parse().expect("literal");
    let link_local: Ipv6Addr = "fe80::1".parse().expect("literal");
    let about = |target: Ipv6Addr, extra: &[u8]| {
        let mut body = target.octets().to_vec();
        body.extend_from_slice(extra);
        body
    };
    let lladdr = [1, 1, 2, 0, 0, 0, 0, 1];
    let cases = [
        (
            "NS to solicited-node",
            icmpv6_frame(solicited_node, 255, &icmp(135, 0, &about(global, &lladdr))),
            PASS,
        ),
        (
            "NS with another hop limit",
            icmpv6_frame(solicited_node, 64, &icmp(135, 0, &about(global, &[]))),
            DROP,
        ),
        (
            "NS to a link-local neighbour",
            icmpv6_frame(link_local, 255, &icmp(135, 0, &about(link_local, &lladdr))),
            PASS,
        ),
        (
            "unreachability probe of a routable neighbour",
            icmpv6_frame(global, 255, &icmp(135, 0, &about(global, &lladdr))),
            PASS,
        ),
        (
            "NS to a routable address about another",
            icmpv6_frame(global, 255, &icmp(135, 0, &about(CLIENT6, &[]))),
            DROP,
        ),
        (
            "NS to a routable address with a payload",
            icmpv6_frame(global, 255, &icmp(135, 0, &about(global, &[7; 64]))),
            DROP,
        ),
        (
            "NA about this host to a routable neighbour",
            icmpv6_frame(global, 255, &icmp(136, 0, &about(CLIENT6, &lladdr))),
            PASS,
        ),
        (
            "NA about another address",
            icmpv6_frame(global, 255, &icmp(136, 0, &about(global, &[]))),
            DROP,
        ),
        (
            "RS to all routers",
            icmpv6_frame("ff02::2".parse().expect("literal"), 255, &icmp(133, 0, &[])),
            PASS,
        ),
        (
            "RS to a routable address",
            icmpv6_frame(global, 255, &icmp(133, 0, &[9; 32])),
            DROP,
        ),
        (
            "redirect to a routable address",
            icmpv6_frame(global, 255, &icmp(137, 0, &[9; 32])),
            DROP,
        ),
        (
            "MLDv2 report",
            icmpv6_frame(mld_routers, 1, &icmp(143, 0, &[0; 4])),
            PASS,
        ),
        (
            "MLDv2 report with another hop limit",
            icmpv6_frame(mld_routers, 64, &icmp(143, 0, &[0; 4])),
            DROP,
        ),
        (
            "MLD report to a routable address",
            icmpv6_frame(global, 1, &icmp(143, 0, &[9; 32])),
            DROP,
        ),
        (
            "MLD query to a routable address",
            icmpv6_frame(global, 1, &icmp(130, 0, &[9; 32])),
            DROP,
        ),
    ];
    for (what, frame, want) in cases {
        assert_eq!(run(&e, EGRESS_CGROUP, &frame), want, "{what}");
    }
}

/// The later fragments of a datagram carry no ports: they follow a first fragment that
/// passed, and nothing else.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn later_fragments_follow_their_first() {
    if !privileged() {
        return;
    }
    let mut e = enforcer(Mode::Enforce);
    e.load_tc(LinkSide::Uplink).expect("TC programs load");
    let allowed = Ipv4Addr::new(203, 0, 113, 10);
    let denied = Ipv4Addr::new(198, 51, 100, 9);
    let first = ipv4_fragment(allowed, proto::UDP, 77, 0, true, &udp(40000, 123));
    let later = ipv4_fragment(allowed, proto::UDP, 77, 185, false, &[7; 64]);
    let stranger = ipv4_fragment(allowed, proto::UDP, 78, 185, false, &[7; 64]);
    assert_eq!(run(&e, EGRESS_CGROUP, &later), DROP, "before its first");
    assert_eq!(run(&e, EGRESS_TC, &first), TC_ACT_OK);
    assert_eq!(run(&e, EGRESS_TC, &later), TC_ACT_OK, "after its first");
    assert_eq!(
        run(&e, EGRESS_TC, &stranger),
        TC_ACT_SHOT,
        "another datagram"
    );
    let first_denied = ipv4_fragment(denied, proto::UDP, 79, 0, true, &udp(40000, 123));
    let later_denied = ipv4_fragment(denied, proto::UDP, 79, 185, false, &[7; 64]);
    assert_eq!(run(&e, EGRESS_TC, &first_denied), TC_ACT_SHOT);
    assert_eq!(run(&e, EGRESS_TC, &later_denied), TC_ACT_SHOT);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn a_server_answers_a_client_no_rule_allows() {
    if !privileged() {
        return;
    }
    let e = enforcer(Mode::Enforce);
    let remote = Ipv4Addr::new(198, 51, 100, 77);
    let reply = ethernet(
        0x0800,
        &ipv4(CLIENT4, remote, proto::TCP, &tcp(8080, 5555, TCP_SYN_ACK)),
    );
    assert_eq!(
        run(&e, EGRESS_CGROUP, &reply),
        DROP,
        "no inbound connection yet"
    );
    let syn = ethernet(
        0x0800,
        &ipv4(remote, CLIENT4, proto::TCP, &tcp(5555, 8080, TCP_SYN)),
    );
    assert_eq!(run(&e, INGRESS_CGROUP, &syn), PASS);
    assert_eq!(
        run(&e, EGRESS_CGROUP, &reply),
        PASS,
        "reply to the inbound connection"
    );
    let other_port = ethernet(
        0x0800,
        &ipv4(CLIENT4, remote, proto::TCP, &tcp(8081, 5555, TCP_SYN)),
    );
    assert_eq!(run(&e, EGRESS_CGROUP, &other_port), DROP, "only that flow");
    let new_connection = ethernet(
        0x0800,
        &ipv4(CLIENT4, remote, proto::TCP, &tcp(8080, 5555, TCP_SYN)),
    );
    assert_eq!(
        run(&e, EGRESS_CGROUP, &new_connection),
        DROP,
        "a reply never opens a connection"
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn an_inbound_ack_alone_opens_nothing() {
    if !privileged() {
        return;
    }
    let e = enforcer(Mode::Enforce);
    let remote = Ipv4Addr::new(198, 51, 100, 78);
    let ack = ethernet(
        0x0800,
        &ipv4(remote, CLIENT4, proto::TCP, &tcp(5555, 8080, 0x10)),
    );
    assert_eq!(run(&e, INGRESS_CGROUP, &ack), PASS);
    let out = ethernet(
        0x0800,
        &ipv4(CLIENT4, remote, proto::TCP, &tcp(8080, 5555, 0x10)),
    );
    assert_eq!(run(&e, EGRESS_CGROUP, &out), DROP);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn icmp_errors_pass_only_for_flows_already_allowed() {
    if !privileged() {
        return;
    }
    let e = enforcer(Mode::Enforce);
    let remote = Ipv4Addr::new(198, 51, 100, 79);
    // Port unreachable about a datagram the remote sent us (quoted: remote -> us).
    let quoted = ipv4(remote, CLIENT4, proto::UDP, &udp(6000, 7000));
    let unreachable = ethernet(
        0x0800,
        &ipv4(CLIENT4, remote, proto::ICMP, &icmp(3, 3, &quoted)),
    );
    assert_eq!(run(&e, EGRESS_CGROUP, &unreachable), DROP, "unknown flow");
    let inbound = ethernet(0x0800, &quoted);
    assert_eq!(run(&e, INGRESS_CGROUP, &inbound), PASS);
    assert_eq!(run(&e, EGRESS_CGROUP, &unreachable), PASS, "known flow");
    let elsewhere = Ipv4Addr::new(198, 51, 100, 9);
    let tunnel = ethernet(
        0x0800,
        &ipv4(CLIENT4, elsewhere, proto::ICMP, &icmp(3, 3, &quoted)),
    );
    assert_eq!(
        run(&e, EGRESS_CGROUP, &tunnel),
        DROP,
        "only to the quoted packet's source"
    );
    let mut long_quote = quoted.clone();
    long_quote.extend_from_slice(&[7; 600]);
    let oversized = ethernet(
        0x0800,
        &ipv4(CLIENT4, remote, proto::ICMP, &icmp(11, 0, &long_quote)),
    );
    assert_eq!(
        run(&e, EGRESS_CGROUP, &oversized),
        DROP,
        "no longer than the kernel's errors"
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn ipv6_extension_headers_are_walked_to_the_ports() {
    if !privileged() {
        return;
    }
    let e = enforcer(Mode::Enforce);
    let dst: Ipv6Addr = "2001:db8:2::10".parse().expect("literal");
    for (port, want) in [(443, PASS), (80, DROP)] {
        // Hop-by-hop options (8 bytes: next header TCP, length 0, padding) then TCP.
        let mut payload = vec![proto::TCP, 0, 1, 4, 0, 0, 0, 0];
        payload.extend_from_slice(&tcp(40000, port, TCP_SYN));
        assert_eq!(
            run(&e, EGRESS_CGROUP, &v6_frame(dst, 0, &payload)),
            want,
            "port {port}"
        );
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn truncated_headers_fail_closed() {
    if !privileged() {
        return;
    }
    let e = enforcer(Mode::Enforce);
    let mut frame = tcp_to(ip("203.0.113.10"), 443);
    frame.truncate(14 + 20 + 2); // IPv4 header, then half of the ports
    assert_eq!(run(&e, EGRESS_CGROUP, &frame), DROP);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn audit_mode_passes_and_reports_each_would_drop_flow_once() {
    if !privileged() {
        return;
    }
    let mut e = enforcer(Mode::Audit);
    let denied = tcp_to(ip("198.51.100.9"), 443);
    for _ in 0..3 {
        assert_eq!(run(&e, EGRESS_CGROUP, &denied), PASS);
    }
    assert_eq!(
        run(&e, EGRESS_CGROUP, &tcp_to(ip("203.0.113.10"), 443)),
        PASS
    );
    let mut ring = e.take_events().expect("ring buffer");
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.push(decode::<Event>(&item).expect("event layout"));
    }
    assert_eq!(events.len(), 1, "one event per audited flow: {events:?}");
    assert_eq!(events[0].action, ACTION_AUDIT);
    assert_eq!(events[0].dport, 443);
    assert_eq!(events[0].proto, proto::TCP);
    assert_eq!(
        e.stats().expect("counters"),
        Stats {
            allowed: ByProto {
                tcp: 1,
                ..ByProto::default()
            },
            audited: ByProto {
                tcp: 3,
                ..ByProto::default()
            },
            ..Stats::default()
        }
    );
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn enforce_mode_reports_drops_within_the_rate_limit() {
    if !privileged() {
        return;
    }
    let mut e = enforcer(Mode::Enforce);
    let mut limits = settings(Mode::Enforce, &DnsSettings::default());
    let burst = u64::from(limits.events_burst);
    let flood = u32::try_from(burst).expect("small") + 500;
    // Each attempt its own flow (a flow is reported once).
    let attempt = |sport: u32| {
        let sport = 10000 + u16::try_from(sport).expect("small");
        v4_frame(
            Ipv4Addr::new(198, 51, 100, 9),
            proto::TCP,
            &tcp(sport, 443, TCP_SYN),
        )
    };
    // The bucket is per CPU: one CPU for the whole flood.
    pin_to_one_cpu();
    // The bucket holds `events_burst` tokens and refills at `events_per_sec` with the time
    // between packets, so what a flood gets depends on how long it takes. The first packet
    // finds the bucket full (a refill rate this high fills it within a millisecond of
    // boot) and takes one token; with no refill after it, the rest of the flood gets what
    // is left of the burst however slow the machine, and the rest is counted as lost.
    limits.events_per_sec = limits.events_burst * 1000;
    e.write_settings(&limits).expect("settings");
    assert_eq!(run(&e, EGRESS_CGROUP, &attempt(0)), DROP);
    limits.events_per_sec = 0;
    e.write_settings(&limits).expect("settings");
    for sport in 1..flood {
        assert_eq!(run(&e, EGRESS_CGROUP, &attempt(sport)), DROP);
    }
    let stats = e.stats().expect("counters");
    assert_eq!(
        stats.dropped,
        ByProto {
            tcp: u64::from(flood),
            ..ByProto::default()
        }
    );
    let mut ring = e.take_events().expect("ring buffer");
    let mut delivered = 0u64;
    while let Some(item) = ring.next() {
        assert_eq!(
            decode::<Event>(&item).expect("event layout").action,
            ACTION_DENY
        );
        delivered += 1;
    }
    assert_eq!(delivered, burst, "a full bucket's events, no more");
    assert_eq!(delivered + stats.events_lost, u64::from(flood));
}

/// Keeps this thread on the CPU it runs on: `BPF_PROG_TEST_RUN` may reschedule between
/// repetitions, and on another CPU the program would find another CPU's full bucket.
fn pin_to_one_cpu() {
    // SAFETY: sched_getcpu has no preconditions; CPU_SET writes only into the local set, and
    // sched_setaffinity reads it.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

// ---- single addresses (`HOSTS`): a host with ports of its own inside a prefix with others,
// an IPv6 /128 inside a /64, a host beside and under a learned address, a reload ---------

const HOSTS_POLICY: &str = "
allow:
  - cidr: 203.0.113.0/24
    ports: [TCP:443]
  - cidr: 203.0.113.7
    ports: [TCP:22]
  - cidr: 2001:db8:5::/64
    ports: [TCP:443]
  - cidr: 2001:db8:5::7/128
    ports: [TCP:8443]
  - cidr: 198.51.100.5
    ports: [TCP:80]
  - fqdn: app.example.com
    ports: [TCP:443]
";

/// The enforcer with `HOSTS_POLICY`, and addresses learned for `app.example.com`: one
/// beside the host 198.51.100.5, and the host itself.
fn hosts_enforcer() -> Enforcer {
    let policy = parse(HOSTS_POLICY, "hosts.yaml").expect("test policy parses");
    let compiled = compile(&policy).expect("compiles");
    assert_eq!((compiled.cidrs.len(), compiled.hosts.len()), (2, 3));
    let app = compiled.names.lookup("app.example.com").expect("name").1;
    let mut e = Enforcer::load_for_test_run(&settings(Mode::Enforce, &policy.dns), 1024)
        .expect("kernel object loads");
    e.write_policy(&compiled).expect("maps accept the policy");
    let live = LearnedValue::new(app, boot_time_ns() + 3600 * 1_000_000_000);
    for learned in [[198, 51, 100, 6], [198, 51, 100, 5]] {
        e.put(&v4_mapped(learned), &live).expect("learned entry");
    }
    e
}

/// The reasons of the events the ring holds, in order.
fn reasons(e: &mut Enforcer) -> Vec<Reason> {
    let mut ring = e.take_events().expect("ring buffer");
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(Reason::from_code(
            decode_event(&item).expect("event layout").reason,
        ));
    }
    out
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn a_host_entry_decides_as_the_longest_prefix_with_its_containers_ports() {
    if !privileged() {
        return;
    }
    let mut e = hosts_enforcer();
    e.load_tc(LinkSide::Uplink).expect("TC programs load");
    let cases = [
        ("203.0.113.7", 22, PASS, None),  // the host's own port
        ("203.0.113.7", 443, PASS, None), // ... and its /24's
        ("203.0.113.7", 80, DROP, Some(Reason::Port)),
        ("203.0.113.8", 22, DROP, Some(Reason::Port)), // the host's port is its own
        ("203.0.113.8", 443, PASS, None),
        ("2001:db8:5::7", 8443, PASS, None),
        ("2001:db8:5::7", 443, PASS, None),
        ("2001:db8:5::7", 80, DROP, Some(Reason::Port)),
        ("2001:db8:5::8", 8443, DROP, Some(Reason::Port)),
        ("2001:db8:5:1::7", 8443, DROP, Some(Reason::NoRule)),
        ("198.51.100.5", 80, PASS, None),  // the host rule
        ("198.51.100.5", 443, PASS, None), // its learned name's port
        ("198.51.100.5", 22, DROP, Some(Reason::LearnedPort)),
        ("198.51.100.6", 443, PASS, None), // learned beside the host
        ("198.51.100.6", 80, DROP, Some(Reason::LearnedPort)),
        ("198.51.100.4", 80, DROP, Some(Reason::NoRule)),
    ];
    for (dst, port, want, _) in cases {
        let frame = tcp_to(ip(dst), port);
        assert_eq!(
            run(&e, EGRESS_CGROUP, &frame),
            want,
            "cgroup: tcp {dst}:{port}"
        );
    }
    let want: Vec<Reason> = cases.iter().filter_map(|c| c.3).collect();
    assert_eq!(reasons(&mut e), want);
    // The TC programs read the same maps (fresh source ports: no flow is known).
    for (dst, port, want, _) in cases {
        let frame = syn(41_000, dst, port);
        let tc = if want == PASS { TC_ACT_OK } else { TC_ACT_SHOT };
        assert_eq!(run(&e, EGRESS_TC, &frame), tc, "tc: tcp {dst}:{port}");
    }
}

/// A TCP SYN from `sport` to `dst`.
fn syn(sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let l4 = tcp(sport, dport, TCP_SYN);
    match ip(dst) {
        std::net::IpAddr::V4(v4) => v4_frame(v4, proto::TCP, &l4),
        std::net::IpAddr::V6(v6) => v6_frame(v6, proto::TCP, &l4),
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn a_reload_moves_ports_between_a_host_and_its_prefix_and_removes_hosts() {
    if !privileged() {
        return;
    }
    let e = &mut hosts_enforcer();
    let first = compile(&parse(HOSTS_POLICY, "hosts.yaml").expect("parses")).expect("compiles");
    let next = parse(
        "
allow:
  - cidr: 203.0.113.0/24
    ports: [TCP:25]
  - cidr: 203.0.113.9
    ports: [TCP:22]
  - cidr: 2001:db8:5::7/128
    ports: [TCP:8443]
",
        "next.yaml",
    )
    .expect("parses");
    e.write_policy(&compile_with(&next, first.port_sets).expect("compiles"))
        .expect("reload");
    let cases = [
        ("203.0.113.7", 22, DROP), // the host is gone: its /24 decides
        ("203.0.113.7", 25, PASS),
        ("203.0.113.9", 22, PASS), // a new host
        ("203.0.113.9", 25, PASS), // ... with its /24's new port
        ("203.0.113.9", 443, DROP),
        ("2001:db8:5::7", 8443, PASS), // kept, its /64 gone
        ("2001:db8:5::7", 443, DROP),
        ("2001:db8:5::8", 443, DROP),
        ("198.51.100.5", 80, DROP), // the host rule is gone; the learned entry stays
        ("198.51.100.5", 443, PASS),
    ];
    for (i, (dst, port, want)) in cases.into_iter().enumerate() {
        let frame = syn(42_000 + i as u16, dst, port);
        assert_eq!(run(e, EGRESS_CGROUP, &frame), want, "tcp {dst}:{port}");
    }
    assert_eq!(
        e.policy_entries().cidrs,
        3,
        "the /24 and two hosts, nothing stale"
    );
}

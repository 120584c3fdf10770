//! Single addresses (`HOSTS`) decide as the longest prefix they are, through
//! `BPF_PROG_TEST_RUN`: a host with ports of its own inside a prefix with others, an IPv6
//! /128 inside a /64, a host beside and under a learned address, and a reload that moves
//! ports between them. Needs root, as `verdict.rs`.

mod common;
mod frames;

use common::privileged;
use frames::*;

use egress_agent::{
    compile::{compile, compile_with, settings},
    dns::learner::LearnedStore as _,
    events::decode_event,
    loader::{EGRESS_CGROUP, EGRESS_TC, Enforcer, LinkSide},
    policy::{Mode, parse},
    reason::Reason,
    sys::boot_time_ns,
};
use egress_common::{LearnedValue, v4_mapped};

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
fn enforcer() -> Enforcer {
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
    let mut e = enforcer();
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
        std::net::IpAddr::V4(v4) => v4_frame(v4, egress_common::proto::TCP, &l4),
        std::net::IpAddr::V6(v6) => v6_frame(v6, egress_common::proto::TCP, &l4),
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
    let e = &mut enforcer();
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

//! Why the kernel denied a packet (the event's `reason`), and one event per denied flow in
//! enforce mode, through `BPF_PROG_TEST_RUN`. Needs root, as `verdict.rs`.

mod common;
mod frames;

use common::privileged;
use frames::*;
use std::net::{Ipv4Addr, Ipv6Addr};

use egress_agent::{
    compile::compile,
    dns::learner::LearnedStore as _,
    events::decode_event,
    loader::{EGRESS_CGROUP, EGRESS_TC, Enforcer, INGRESS_CGROUP, LinkSide},
    policy::{Mode, parse},
    reason::Reason,
    sys::boot_time_ns,
};
use egress_common::{ACTION_DENY, Event, LearnedValue, proto, v4_mapped};

/// Every event the ring holds.
fn events(e: &mut Enforcer) -> Vec<Event> {
    let mut ring = e.take_events().expect("ring buffer");
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(decode_event(&item).expect("event layout"));
    }
    out
}

/// The port set the test policy gives addresses learned for `app.example.com`.
fn app_port_set() -> u32 {
    let policy = parse(POLICY, "verdict-test.yaml").expect("test policy parses");
    compile(&policy)
        .expect("compiles")
        .names
        .lookup("app.example.com")
        .expect("a name rule")
        .1
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn each_deny_point_reports_its_reason() {
    if !privileged() {
        return;
    }
    let mut e = enforcer(Mode::Enforce);
    e.load_tc(LinkSide::Uplink).expect("TC programs load");
    let hour = 3600 * 1_000_000_000;
    let learned_live = Ipv4Addr::new(198, 51, 100, 70);
    let learned_gone = Ipv4Addr::new(198, 51, 100, 71);
    e.put(
        &v4_mapped(learned_live.octets()),
        &LearnedValue::new(app_port_set(), boot_time_ns() + hour),
    )
    .expect("learned entry");
    e.put(
        &v4_mapped(learned_gone.octets()),
        &LearnedValue::new(app_port_set(), 1),
    )
    .expect("learned entry");
    let remote = Ipv4Addr::new(198, 51, 100, 79);
    let quoted = ipv4(remote, CLIENT4, proto::UDP, &udp(6000, 7000));
    let solicited_node: Ipv6Addr = "ff02::1:ff00:1".parse().expect("literal");
    let mut truncated = tcp_to(ip("203.0.113.10"), 443);
    truncated.truncate(14 + 20 + 2);
    let cases = [
        ("no rule", tcp_to(ip("198.51.100.9"), 443), Reason::NoRule),
        (
            "CIDR, other port",
            tcp_to(ip("203.0.113.10"), 80),
            Reason::Port,
        ),
        (
            "learned, other port",
            tcp_to(learned_live.into(), 80),
            Reason::LearnedPort,
        ),
        (
            "learned, expired",
            tcp_to(learned_gone.into(), 443),
            Reason::LearnedExpired,
        ),
        (
            "ICMP error about no flow",
            ethernet(
                0x0800,
                &ipv4(CLIENT4, remote, proto::ICMP, &icmp(3, 3, &quoted)),
            ),
            Reason::IcmpError,
        ),
        (
            "neighbour solicitation off the link's hop limit",
            icmpv6_frame(
                solicited_node,
                64,
                &icmp(135, 0, &Ipv6Addr::LOCALHOST.octets()),
            ),
            Reason::Neighbour,
        ),
        ("truncated header", truncated, Reason::Malformed),
    ];
    for (what, frame, _) in &cases {
        assert_eq!(run(&e, EGRESS_CGROUP, frame), DROP, "{what}");
    }
    let later = ipv4_fragment(
        Ipv4Addr::new(203, 0, 113, 10),
        proto::UDP,
        91,
        185,
        false,
        &[7; 64],
    );
    assert_eq!(run(&e, EGRESS_TC, &later), TC_ACT_SHOT);
    let got: Vec<(u8, Reason)> = events(&mut e)
        .iter()
        .map(|ev| (ev.action, Reason::from_code(ev.reason)))
        .collect();
    let mut want: Vec<(u8, Reason)> = cases.iter().map(|c| (ACTION_DENY, c.2)).collect();
    want.push((ACTION_DENY, Reason::Fragment));
    assert_eq!(got, want);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn enforce_mode_reports_a_flow_once_and_counts_its_retransmits() {
    if !privileged() {
        return;
    }
    let mut e = enforcer(Mode::Enforce);
    let dst = Ipv4Addr::new(198, 51, 100, 9);
    let attempt = |sport| v4_frame(dst, proto::TCP, &tcp(sport, 443, TCP_SYN));
    for _ in 0..4 {
        assert_eq!(run(&e, EGRESS_CGROUP, &attempt(40000)), DROP);
    }
    assert_eq!(
        run(&e, EGRESS_CGROUP, &attempt(40001)),
        DROP,
        "a new attempt"
    );
    let flows = e.stats().expect("counters");
    assert_eq!(flows.dropped.tcp, 5, "every packet is still dropped");
    assert_eq!(flows.events_lost, 0, "folded packets are not lost events");
    let got: Vec<u16> = events(&mut e).iter().map(|ev| ev.sport).collect();
    assert_eq!(got, vec![40000, 40001], "one event per flow");
    // A reload that allows the address lets the same flow's next retransmit through.
    let allowing =
        parse(&format!("{POLICY}  - cidr: {dst}\n"), "reloaded-test.yaml").expect("valid");
    e.write_policy(&compile(&allowing).expect("compiles"))
        .expect("maps accept the policy");
    assert_eq!(run(&e, EGRESS_CGROUP, &attempt(40000)), PASS);
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn a_denied_packet_of_an_inbound_flow_leaves_its_replies_passing() {
    if !privileged() {
        return;
    }
    for mode in [Mode::Enforce, Mode::Audit] {
        let e = enforcer(mode);
        let remote = Ipv4Addr::new(198, 51, 100, 79);
        let syn_in = ethernet(
            0x0800,
            &ipv4(remote, CLIENT4, proto::TCP, &tcp(6000, 7000, TCP_SYN)),
        );
        assert_eq!(run(&e, INGRESS_CGROUP, &syn_in), PASS);
        // A connection request from the server's port is no reply: the policy decides.
        let syn_out = v4_frame(remote, proto::TCP, &tcp(7000, 6000, TCP_SYN));
        let want = if mode == Mode::Enforce { DROP } else { PASS };
        assert_eq!(run(&e, EGRESS_CGROUP, &syn_out), want, "{mode}");
        let answer = v4_frame(remote, proto::TCP, &tcp(7000, 6000, TCP_SYN_ACK));
        assert_eq!(run(&e, EGRESS_CGROUP, &answer), PASS, "{mode}: the reply");
        let stats = e.stats().expect("counters");
        assert_eq!(stats.allowed.tcp, 1, "{mode}: the reply passed as a reply");
    }
}

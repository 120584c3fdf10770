//! What the BPF_PROG_TEST_RUN verdict tests share: the test policy loaded into an enforcer,
//! and crafted frames. Each test file uses a part of it.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egress_agent::{
    compile::{compile, settings},
    loader::Enforcer,
    policy::{Mode, parse},
};
use egress_common::proto;

pub const PASS: u32 = 1;
pub const DROP: u32 = 0;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

pub const POLICY: &str = "
allow:
  - cidr: 203.0.113.0/24
    ports: [HTTPS:443, UDP:123]
  - cidr: 203.0.113.128/25
    ports: [TCP:8080]
  - cidr: 2001:db8:2::/48
    ports: [TCP:443]
  - cidr: 198.51.100.200
  - fqdn: app.example.com
    ports: [TCP:443]
";

pub fn enforcer(mode: Mode) -> Enforcer {
    let policy = parse(POLICY, "verdict-test.yaml").expect("test policy parses");
    let mut e = Enforcer::load_for_test_run(&settings(mode, &policy.dns), policy.dns.max_ips)
        .expect("kernel object loads");
    e.write_policy(&compile(&policy).expect("test policy compiles"))
        .expect("maps accept the policy");
    e
}

pub fn run(e: &Enforcer, program: &'static str, frame: &[u8]) -> u32 {
    e.test_run(program, frame, 1)
        .expect("test run")
        .return_value
}

// ---- crafted frames -------------------------------------------------------------------

pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const TCP_SYN: u8 = 0x02;
pub const TCP_SYN_ACK: u8 = 0x12;

pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).expect("small packet");
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p
}

/// An IPv4 fragment: `offset` in 8-byte units, `more` for the more-fragments flag.
pub fn ipv4_fragment(
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    offset: u16,
    more: bool,
    l4: &[u8],
) -> Vec<u8> {
    let mut p = ipv4(CLIENT4, dst, proto, l4);
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let flags = if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&(flags | offset).to_be_bytes());
    ethernet(0x0800, &p)
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_hops(src, dst, next, 64, payload)
}

pub fn ipv6_hops(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hops: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("small packet");
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[next, hops]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0; 8]);
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

pub fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut u = Vec::with_capacity(12);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&[0, 12, 0, 0, b'p', b'i', b'n', b'g']);
    u
}

pub fn icmp(kind: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut i = vec![kind, code, 0, 0, 0, 0, 0, 0];
    i.extend_from_slice(body);
    i
}

pub fn v4_frame(dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    ethernet(0x0800, &ipv4(CLIENT4, dst, proto, l4))
}

pub fn v6_frame(dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
    ethernet(0x86dd, &ipv6(CLIENT6, dst, next, l4))
}

/// An ICMPv6 message with the hop limit neighbour discovery (255) or MLD (1) uses.
pub fn icmpv6_frame(dst: Ipv6Addr, hops: u8, message: &[u8]) -> Vec<u8> {
    ethernet(
        0x86dd,
        &ipv6_hops(CLIENT6, dst, proto::ICMPV6, hops, message),
    )
}

pub fn tcp_to(dst: IpAddr, dport: u16) -> Vec<u8> {
    let t = tcp(40000, dport, TCP_SYN);
    match dst {
        IpAddr::V4(a) => v4_frame(a, proto::TCP, &t),
        IpAddr::V6(a) => v6_frame(a, proto::TCP, &t),
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

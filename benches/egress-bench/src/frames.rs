//! Crafted frames for `BPF_PROG_TEST_RUN`, built like those of `egress-agent/tests/verdict.rs`:
//! an Ethernet header (the kernel strips it for cgroup programs), IPv4 or IPv6, TCP.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egress_common::proto;

/// The sender's addresses: the client end of the benchmark topology.
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
const TCP_SYN: u8 = 0x02;

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).unwrap_or(u16::MAX);
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto::TCP, 0, 0]);
    p.extend_from_slice(&CLIENT4.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p
}

fn ipv6(dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
    let len = u16::try_from(l4.len()).unwrap_or(u16::MAX);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[proto::TCP, 64]);
    p.extend_from_slice(&CLIENT6.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p
}

fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0; 8]);
    t.extend_from_slice(&[0x50, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// A TCP SYN from the client to `dst:dport`, from `sport`.
pub fn syn(dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let t = tcp_syn(sport, dport);
    match dst {
        IpAddr::V4(a) => ethernet(0x0800, &ipv4(a, &t)),
        IpAddr::V6(a) => ethernet(0x86dd, &ipv6(a, &t)),
    }
}

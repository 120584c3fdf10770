//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`: an Ethernet header (the kernel strips it
//! for cgroup programs), IPv4 or IPv6, then TCP, UDP, ICMP or DNS. No checksums: the
//! programs never check them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::proto;

/// The client the agent's kernel tests send from.
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const TCP_SYN: u8 = 0x02;
pub const TCP_SYN_ACK: u8 = 0x12;
/// PSH|ACK: a segment carrying data.
pub const TCP_PSH_ACK: u8 = 0x18;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

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

/// An IPv4 fragment from [`CLIENT4`]: `offset` in 8-byte units, `more` for the
/// more-fragments flag.
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
    ethernet(ETH_P_IP, &p)
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

/// A TCP header (no options, no data) with `flags`.
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0; 8]);
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// A UDP datagram carrying `data`.
pub fn udp_with(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + data.len()).expect("small datagram");
    let mut u = Vec::with_capacity(usize::from(len));
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// A UDP datagram carrying `ping`.
pub fn udp(sport: u16, dport: u16) -> Vec<u8> {
    udp_with(sport, dport, b"ping")
}

pub fn icmp(kind: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut i = vec![kind, code, 0, 0, 0, 0, 0, 0];
    i.extend_from_slice(body);
    i
}

/// An Ethernet frame: an IPv4 or IPv6 header from `src` to `dst`, then `l4`.
pub fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(ETH_P_IP, &ipv4(s, d, proto, l4)),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet(ETH_P_IPV6, &ipv6(s, d, proto, l4)),
        _ => panic!("mixed address families"),
    }
}

pub fn v4_frame(dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    ethernet(ETH_P_IP, &ipv4(CLIENT4, dst, proto, l4))
}

pub fn v6_frame(dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
    ethernet(ETH_P_IPV6, &ipv6(CLIENT6, dst, next, l4))
}

/// An ICMPv6 message with the hop limit neighbour discovery (255) or MLD (1) uses.
pub fn icmpv6_frame(dst: Ipv6Addr, hops: u8, message: &[u8]) -> Vec<u8> {
    ethernet(
        ETH_P_IPV6,
        &ipv6_hops(CLIENT6, dst, proto::ICMPV6, hops, message),
    )
}

/// The client of `dst`'s family: [`CLIENT4`] or [`CLIENT6`].
pub fn client_for(dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V4(_) => IpAddr::V4(CLIENT4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT6),
    }
}

/// A TCP connection request from the client to `dst:dport`, from `sport`.
pub fn syn(dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    syn_from(client_for(dst), dst, sport, dport)
}

/// A TCP connection request from `src:sport` to `dst:dport`.
pub fn syn_from(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    ip_frame(src, dst, proto::TCP, &tcp(sport, dport, TCP_SYN))
}

/// A TCP connection request from the client to `dst:dport`.
pub fn tcp_to(dst: IpAddr, dport: u16) -> Vec<u8> {
    syn(dst, 40000, dport)
}

/// An Ethernet frame carrying `dns` over UDP, or over TCP after its 2-byte length.
pub fn dns(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    over_tcp: bool,
    dns: &[u8],
) -> Vec<u8> {
    if over_tcp {
        let mut l4 = tcp(sport, dport, TCP_PSH_ACK);
        let len = u16::try_from(dns.len()).expect("small message");
        l4.extend_from_slice(&len.to_be_bytes());
        l4.extend_from_slice(dns);
        ip_frame(src, dst, proto::TCP, &l4)
    } else {
        ip_frame(src, dst, proto::UDP, &udp_with(sport, dport, dns))
    }
}

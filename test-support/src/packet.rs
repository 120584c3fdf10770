//! IPv4 packets built byte by byte, for the probe's raw-socket modes: any source address,
//! any flags, any fragment offset. Each builder returns a complete header with its
//! checksum, so a packet can go out through a packet socket as it is.

use std::net::Ipv4Addr;

use crate::proto;

pub const IPV4_HEADER: usize = 20;
pub const UDP_HEADER: usize = 8;
pub const ICMP_HEADER: usize = 8;
const TCP_HEADER: usize = 20;
const DONT_FRAGMENT: u16 = 0x4000;
const MORE_FRAGMENTS: u16 = 0x2000;
/// TCP flags.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
const TTL: u8 = 64;

/// Where an IPv4 packet sits among the fragments of its datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram, with Don't Fragment set.
    Whole,
    /// A fragment at `offset` bytes (a multiple of 8) into the datagram, with More
    /// Fragments set if `more`.
    At { offset: u16, more: bool },
}

/// The IPv4 packet carrying `payload` (a transport header and data, or the later bytes of
/// a fragmented datagram). `id` identifies a datagram's fragments.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    fragment: Fragment,
    payload: &[u8],
) -> Vec<u8> {
    let total = u16::try_from(IPV4_HEADER + payload.len()).expect("an IPv4 packet fits 64 KiB");
    let flags_offset = match fragment {
        Fragment::Whole => DONT_FRAGMENT,
        Fragment::At { offset, more } => {
            assert!(offset % 8 == 0, "fragment offsets are multiples of 8");
            (offset / 8) | if more { MORE_FRAGMENTS } else { 0 }
        }
    };
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags_offset.to_be_bytes());
    p.extend_from_slice(&[TTL, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = internet_checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A whole IPv4 datagram of `proto` (id 0: a raw socket's kernel picks one).
pub fn ipv4_whole(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4(src, dst, proto, 0, Fragment::Whole, payload)
}

/// A UDP datagram (header with its checksum, then `data`).
pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(UDP_HEADER + data.len()).expect("a UDP datagram fits 64 KiB");
    let mut udp = Vec::with_capacity(usize::from(len));
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(data);
    // 0 means "no checksum" in UDP over IPv4; a sum of 0 is sent as all ones.
    let sum = match transport_checksum(src, dst, proto::UDP, &udp) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    udp
}

/// [`udp`] inside its IPv4 header.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    ipv4_whole(src, dst, proto::UDP, &udp(src, dst, sport, dport, data))
}

/// A TCP segment (no options) with `flags` and `data`, inside its IPv4 header.
pub fn ipv4_tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    (sport, dport): (u16, u16),
    seq: u32,
    flags: u8,
    data: &[u8],
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(TCP_HEADER + data.len());
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes());
    tcp.extend_from_slice(&[(TCP_HEADER as u8 / 4) << 4, flags]);
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(data);
    let sum = transport_checksum(src, dst, proto::TCP, &tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4_whole(src, dst, proto::TCP, &tcp)
}

/// An ICMP (IPv4) message: type, code, checksum, the 4 bytes `rest`, then `body`.
pub fn icmp(icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(ICMP_HEADER + body.len());
    m.extend_from_slice(&[icmp_type, code, 0, 0]);
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let sum = internet_checksum(&m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// What an ICMP error quotes of a UDP datagram it is about: the datagram's IPv4 header and
/// the first 8 bytes after it (its UDP header), as RFC 792 asks at least.
pub fn quoted_udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut datagram = ipv4_udp(src, dst, sport, dport, &[0; 32]);
    datagram.truncate(IPV4_HEADER + UDP_HEADER);
    datagram
}

/// The TCP or UDP checksum: over the pseudo header and the segment.
fn transport_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let len = u16::try_from(segment.len()).expect("a segment fits 64 KiB");
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    pseudo.extend_from_slice(segment);
    internet_checksum(&pseudo)
}

/// RFC 1071.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_with_its_checksum_sums_to_zero() {
        let p = ipv4_udp(
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(203, 0, 113, 20),
            9,
            53,
            b"x",
        );
        assert_eq!(internet_checksum(&p[..IPV4_HEADER]), 0);
        assert_eq!(p.len(), IPV4_HEADER + UDP_HEADER + 1);
    }

    #[test]
    fn a_later_fragment_carries_its_offset_in_8_byte_units() {
        let src = Ipv4Addr::new(198, 51, 100, 1);
        let p = ipv4(
            src,
            src,
            proto::UDP,
            7,
            Fragment::At {
                offset: 1480,
                more: false,
            },
            &[0; 16],
        );
        assert_eq!(u16::from_be_bytes([p[6], p[7]]), 1480 / 8);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 7);
    }
}

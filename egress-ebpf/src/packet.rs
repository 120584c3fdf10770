//! Header parsing shared by the cgroup and TC programs.
//!
//! Every read goes through `bpf_skb_load_bytes` (`load`), which bounds-checks in the kernel:
//! no packet-pointer arithmetic for the verifier to lose track of, and non-linear skbs work.
use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    programs::{SkBuffContext, TcContext},
};
use egress_common::{Addr, proto, v4_mapped};

/// A context whose packet bytes can be read; implemented for both attach kinds.
pub trait Skb: EbpfContext {
    fn read<T>(&self, offset: usize) -> Option<T>;

    /// Bytes in the packet, from the start of what `read` offsets count from.
    fn skb_len(&self) -> u32;

    fn skb(&self) -> *mut __sk_buff {
        self.as_ptr().cast()
    }
}

/// Both contexts have the same inherent `load` and `len`; one impl body serves both.
macro_rules! impl_skb {
    ($($ctx:ty),*) => {$(
        impl Skb for $ctx {
            #[inline(always)]
            fn read<T>(&self, offset: usize) -> Option<T> {
                self.load(offset).ok()
            }

            #[inline(always)]
            fn skb_len(&self) -> u32 {
                self.len()
            }
        }
    )*};
}

impl_skb!(SkBuffContext, TcContext);

/// Offset of the IP header in the packet data.
#[derive(Clone, Copy)]
pub struct L3Start(usize);

impl L3Start {
    pub const fn at(offset: usize) -> Self {
        Self(offset)
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;

/// Where the IP header starts in a TC packet (after Ethernet and at most one VLAN tag), or
/// `None` when the frame is not IP.
#[inline(always)]
pub fn tc_l3_start(ctx: &TcContext) -> Option<L3Start> {
    let ethertype = u16::from_be_bytes(ctx.read::<[u8; 2]>(12)?);
    match ethertype {
        ETH_P_IP | ETH_P_IPV6 => Some(L3Start(ETH_HLEN)),
        ETH_P_8021Q | ETH_P_8021AD => {
            let inner = u16::from_be_bytes(ctx.read::<[u8; 2]>(16)?);
            (inner == ETH_P_IP || inner == ETH_P_IPV6).then_some(L3Start(ETH_HLEN + VLAN_HLEN))
        }
        _ => None,
    }
}

/// What the verdict needs to know about a packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    pub proto: u8,
    /// Host byte order; 0 when the protocol has no ports or the packet is a later fragment.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type (0 for other protocols).
    pub icmp_type: u8,
    /// Offset of the L4 header, for ICMP errors whose quoted packet is read later.
    pub l4: usize,
    /// Offset of the TCP or UDP payload (0 for other protocols).
    pub payload: usize,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_IPV6_EXT_HEADERS: usize = 4;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// Parses the IP header at `l3` and the start of the transport header.
/// `None` means the headers are truncated or not IPv4/IPv6.
#[inline(always)]
pub fn parse<C: Skb>(ctx: &C, l3: L3Start) -> Option<Packet> {
    let l3 = l3.0;
    let first: u8 = ctx.read(l3)?;
    let (src, dst, proto, l4, later_fragment) = match first >> 4 {
        4 => {
            let h: [u8; 20] = ctx.read(l3)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            (
                v4_mapped([h[12], h[13], h[14], h[15]]),
                v4_mapped([h[16], h[17], h[18], h[19]]),
                h[9],
                l3 + ihl,
                frag_offset != 0,
            )
        }
        6 => {
            let h: [u8; IPV6_HLEN] = ctx.read(l3)?;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&h[8..24]);
            dst.copy_from_slice(&h[24..40]);
            let (proto, l4, later_fragment) = skip_ipv6_extensions(ctx, h[6], l3 + IPV6_HLEN)?;
            (src, dst, proto, l4, later_fragment)
        }
        _ => return None,
    };
    let mut p = Packet {
        src,
        dst,
        proto,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
        l4,
        payload: 0,
    };
    if later_fragment {
        return Some(p);
    }
    match proto {
        proto::TCP => {
            let t: [u8; 14] = ctx.read(l4)?;
            p.sport = u16::from_be_bytes([t[0], t[1]]);
            p.dport = u16::from_be_bytes([t[2], t[3]]);
            p.tcp_flags = t[13];
            p.payload = l4 + usize::from(t[12] >> 4) * 4;
        }
        proto::UDP => {
            let u: [u8; 4] = ctx.read(l4)?;
            p.sport = u16::from_be_bytes([u[0], u[1]]);
            p.dport = u16::from_be_bytes([u[2], u[3]]);
            p.payload = l4 + UDP_HLEN;
        }
        proto::ICMP | proto::ICMPV6 => p.icmp_type = ctx.read(l4)?,
        _ => {}
    }
    Some(p)
}

/// Walks IPv6 extension headers; returns (transport protocol, its offset, is a later fragment).
#[inline(always)]
fn skip_ipv6_extensions<C: Skb>(ctx: &C, first: u8, start: usize) -> Option<(u8, usize, bool)> {
    let mut next = first;
    let mut off = start;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h: [u8; 2] = ctx.read(off)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let h: [u8; 2] = ctx.read(off)?;
                next = h[0];
                off += (usize::from(h[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let h: [u8; 4] = ctx.read(off)?;
                let frag_offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                if frag_offset != 0 {
                    return Some((h[0], off + 8, true));
                }
                next = h[0];
                off += 8;
            }
            _ => return Some((next, off, false)),
        }
    }
    // More extension headers than we walk: treat as unparsable (fail closed on egress).
    None
}

/// The flow an ICMP error quotes: the offending packet's headers follow the 8-byte ICMP
/// header. Returns (remote, remote port, local port, proto) of the quoted packet, which was
/// sent *to* this host, so its source is the remote end.
#[inline(always)]
pub fn quoted_flow<C: Skb>(ctx: &C, p: &Packet) -> Option<(Addr, u16, u16, u8)> {
    let inner = parse(ctx, L3Start(p.l4 + 8))?;
    Some((inner.src, inner.sport, inner.dport, inner.proto))
}

//! Header parsing shared by the cgroup and TC programs.
//!
//! Every read goes through `bpf_skb_load_bytes` (`load`), which bounds-checks in the kernel:
//! no packet-pointer arithmetic for the verifier to lose track of, and non-linear skbs work.
use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    helpers::{bpf_get_socket_cookie, bpf_sk_fullsock, bpf_skb_load_bytes},
    programs::{SkBuffContext, TcContext},
};
use core::{mem::MaybeUninit, ptr::addr_of_mut};

use egress_common::{Addr, proto};

/// A context whose packet bytes can be read; implemented for both attach kinds.
pub trait Skb: EbpfContext {
    /// Whether the hook runs for a local socket: the cgroup programs run as a socket sends
    /// (egress) or as a packet is delivered to one (ingress); the TC programs see packets on
    /// an interface, forwarded ones included, and no receiving socket.
    const SOCKET_HOOK: bool;

    fn read<T>(&self, offset: usize) -> Option<T>;

    /// Bytes in the packet, from the start of what `read` offsets count from.
    fn skb_len(&self) -> u32;

    fn skb(&self) -> *mut __sk_buff {
        self.as_ptr().cast()
    }

    /// The socket cookie of the packet's socket (the sender on egress; on cgroup ingress
    /// the receiver), 0 when it has none. Unique for the life of the system, so it also
    /// stands for the socket's network namespace.
    #[inline(always)]
    fn socket_cookie(&self) -> u64 {
        // SAFETY: a read of a global; the helper only reads the skb the program was
        // called with.
        unsafe {
            if core::ptr::read_volatile(&TEST_RUN) != 0 {
                return 0;
            }
            bpf_get_socket_cookie(self.as_ptr())
        }
    }

    /// On ingress, the cookie of the local socket the packet is delivered to; 0 for the TC
    /// programs, which see packets before any socket does.
    #[inline(always)]
    fn receiving_socket(&self) -> u64 {
        if Self::SOCKET_HOOK {
            self.socket_cookie()
        } else {
            0
        }
    }

    /// Whether the packet went through (egress) or arrives on (ingress) a loopback device,
    /// in whatever network namespace: it never left the namespace, so whoever sent it is
    /// there too, possibly the workload itself with a forged source.
    #[inline(always)]
    fn on_loopback(&self) -> bool {
        // SAFETY: a read of a context field the verifier allows for both program types.
        unsafe { (*self.skb()).ifindex == LOOPBACK_IFINDEX }
    }

    /// Whether the packet's socket is a raw socket, which can write any header: its packets
    /// must never be taken for a DNS query or a resolver's answer.
    fn raw_socket(&self) -> bool;
}

/// 1 when the object is loaded for `BPF_PROG_TEST_RUN` (the kernel tests and benchmarks
/// only; the agent never sets it): each run then gets a dummy socket of its own, so the
/// programs see every packet as socketless (cookie 0, not raw), as the TC programs see
/// forwarded packets. Set before load, so the verifier drops the branch not taken.
#[unsafe(no_mangle)]
static TEST_RUN: u8 = 0;

/// Every network namespace's loopback device has this index (the kernel's
/// `LOOPBACK_IFINDEX`; `loopback_net_init` insists on it).
const LOOPBACK_IFINDEX: u32 = 1;
/// `SOCK_RAW`, as `bpf_sock.type` reports it.
const SOCK_RAW: u32 = 3;

/// Both contexts have the same inherent `load` and `len`; one impl body serves both.
macro_rules! impl_skb {
    ($($ctx:ty: socket_hook $hook:expr, raw_socket $raw:path;)*) => {$(
        impl Skb for $ctx {
            const SOCKET_HOOK: bool = $hook;

            #[inline(always)]
            fn read<T>(&self, offset: usize) -> Option<T> {
                self.load(offset).ok()
            }

            #[inline(always)]
            fn skb_len(&self) -> u32 {
                self.len()
            }

            #[inline(always)]
            fn raw_socket(&self) -> bool {
                $raw(self)
            }
        }
    )*};
}

impl_skb! {
    SkBuffContext: socket_hook true, raw_socket sends_from_raw_socket;
    TcContext: socket_hook false, raw_socket never_raw;
}

#[inline(always)]
fn sends_from_raw_socket(ctx: &SkBuffContext) -> bool {
    // SAFETY: a read of a global; `sk` is a context field (a socket pointer or null) the
    // verifier lets cgroup_skb programs read and hand to `bpf_sk_fullsock`, which checks it.
    unsafe {
        if core::ptr::read_volatile(&TEST_RUN) != 0 {
            return false;
        }
        let sk = (*ctx.skb()).__bindgen_anon_2.sk;
        if sk.is_null() {
            return false;
        }
        let full = bpf_sk_fullsock(sk);
        !full.is_null() && (*full).type_ == SOCK_RAW
    }
}

/// The TC programs decide forwarded packets, which have no socket; a local socket's
/// packets are decided by the cgroup programs.
#[inline(always)]
fn never_raw(_: &TcContext) -> bool {
    false
}

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
#[repr(C)]
pub struct Packet {
    /// `src` and `dst` first and in this order: `parse` reads both at once.
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
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// [`NOT_FRAGMENT`], [`FIRST_FRAGMENT`] or [`LATER_FRAGMENT`].
    pub fragment: u8,
    /// The datagram's fragment identification (0 when not a fragment).
    pub frag_id: u32,
    /// Offset of the L4 header, for ICMP errors whose quoted packet is read later.
    pub l4: usize,
    /// Offset of the TCP or UDP payload (0 for other protocols).
    pub payload: usize,
}

/// [`Packet::fragment`]: a whole datagram.
pub const NOT_FRAGMENT: u8 = 0;
/// The first fragment of a datagram: it has the transport header.
pub const FIRST_FRAGMENT: u8 = 1;
/// A fragment after the first: no transport header, so no ports.
pub const LATER_FRAGMENT: u8 = 2;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_IPV6_EXT_HEADERS: usize = 4;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const IPV6_MORE_FRAGMENTS: u16 = 1;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// Parses the IP header at `l3` and the start of the transport header.
/// `None` means the headers are truncated or not IPv4/IPv6.
///
/// The addresses are written straight into the `Packet`, in memory: built from bytes in
/// registers, each of their 32 bytes took a register or a stack slot of its own (the
/// verifier allows 512 bytes of stack for all frames of a call chain) and a dozen
/// instructions. Every field is written once, with no zeroing first: the compiler turns a
/// run of zero stores into a call to a byte-by-byte `memset`, on every packet.
#[inline(always)]
pub fn parse<C: Skb>(ctx: &C, l3: L3Start) -> Option<Packet> {
    let l3 = l3.0;
    // The whole IPv4 header without options in one read (an IPv6 header is longer still):
    // each read is a helper call, a call and a return through the kernel's return thunk.
    let h: [u8; 20] = ctx.read(l3)?;
    let mut p = MaybeUninit::<Packet>::uninit();
    let pp = p.as_mut_ptr();
    let (proto, l4, hop_limit, (fragment, frag_id)) = match h[0] >> 4 {
        4 => {
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let flags_offset = u16::from_be_bytes([h[6], h[7]]);
            let fragment = if flags_offset & 0x1fff != 0 {
                LATER_FRAGMENT
            } else if flags_offset & IPV4_MORE_FRAGMENTS != 0 {
                FIRST_FRAGMENT
            } else {
                NOT_FRAGMENT
            };
            // SAFETY: both point into `p`.
            unsafe {
                write_v4_mapped(addr_of_mut!((*pp).src), [h[12], h[13], h[14], h[15]]);
                write_v4_mapped(addr_of_mut!((*pp).dst), [h[16], h[17], h[18], h[19]]);
            }
            let id = u32::from(u16::from_be_bytes([h[4], h[5]]));
            (h[9], l3 + ihl, h[8], (fragment, id))
        }
        6 => {
            // Both addresses at once: `src` and `dst` are adjacent, in this order.
            read_into(ctx, l3 + 8, pp.cast(), 2 * size_of::<Addr>())?;
            let (proto, l4, frag) = skip_ipv6_extensions(ctx, h[6], l3 + IPV6_HLEN)?;
            (proto, l4, h[7], frag)
        }
        _ => return None,
    };
    let (mut sport, mut dport, mut tcp_flags, mut icmp_type, mut payload) = (0, 0, 0, 0, 0);
    if fragment != LATER_FRAGMENT {
        match proto {
            proto::TCP => {
                let t: [u8; 14] = ctx.read(l4)?;
                sport = u16::from_be_bytes([t[0], t[1]]);
                dport = u16::from_be_bytes([t[2], t[3]]);
                tcp_flags = t[13];
                payload = l4 + usize::from(t[12] >> 4) * 4;
            }
            proto::UDP => {
                let u: [u8; 4] = ctx.read(l4)?;
                sport = u16::from_be_bytes([u[0], u[1]]);
                dport = u16::from_be_bytes([u[2], u[3]]);
                payload = l4 + UDP_HLEN;
            }
            proto::ICMP | proto::ICMPV6 => icmp_type = ctx.read(l4)?,
            _ => {}
        }
    }
    // SAFETY: the addresses are written above, every other field here.
    unsafe {
        addr_of_mut!((*pp).proto).write(proto);
        addr_of_mut!((*pp).sport).write(sport);
        addr_of_mut!((*pp).dport).write(dport);
        addr_of_mut!((*pp).tcp_flags).write(tcp_flags);
        addr_of_mut!((*pp).icmp_type).write(icmp_type);
        addr_of_mut!((*pp).hop_limit).write(hop_limit);
        addr_of_mut!((*pp).fragment).write(fragment);
        addr_of_mut!((*pp).frag_id).write(frag_id);
        addr_of_mut!((*pp).l4).write(l4);
        addr_of_mut!((*pp).payload).write(payload);
        Some(p.assume_init())
    }
}

/// Writes the IPv4-mapped form of `v4` (see `egress_common::v4_mapped`) as three stores.
///
/// # Safety
/// `to` must be valid for writes.
#[inline(always)]
unsafe fn write_v4_mapped(to: *mut Addr, v4: [u8; 4]) {
    let to = to.cast::<u8>();
    // SAFETY: all three are within the 16 bytes at `to`.
    unsafe {
        to.cast::<u64>().write_unaligned(0);
        to.add(8).cast::<[u8; 4]>().write([0, 0, 0xff, 0xff]);
        to.add(12).cast::<[u8; 4]>().write(v4);
    }
}

/// Copies `len` packet bytes at `offset` to `to`.
#[inline(always)]
fn read_into<C: Skb>(ctx: &C, offset: usize, to: *mut u8, len: usize) -> Option<()> {
    // SAFETY: the callers pass a destination with room for `len` bytes.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr().cast_const(),
            offset as u32,
            to.cast(),
            len as u32,
        )
    };
    (rc == 0).then_some(())
}

/// Walks IPv6 extension headers; returns the transport protocol, its offset, and the
/// fragment kind and identification.
#[inline(always)]
fn skip_ipv6_extensions<C: Skb>(
    ctx: &C,
    first: u8,
    start: usize,
) -> Option<(u8, usize, (u8, u32))> {
    let mut next = first;
    let mut off = start;
    let mut frag = (NOT_FRAGMENT, 0);
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
                let h: [u8; 8] = ctx.read(off)?;
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                if offset_flags >> 3 != 0 {
                    return Some((h[0], off + 8, (LATER_FRAGMENT, id)));
                }
                if offset_flags & IPV6_MORE_FRAGMENTS != 0 {
                    frag = (FIRST_FRAGMENT, id);
                }
                next = h[0];
                off += 8;
            }
            _ => return Some((next, off, frag)),
        }
    }
    // More extension headers than we walk: treat as unparsable (fail closed on egress).
    None
}

/// Whether a TCP or UDP packet carries bytes after its transport header.
#[inline(always)]
pub fn carries_payload<C: Skb>(ctx: &C, p: &Packet) -> bool {
    p.payload != 0 && ctx.skb_len() as usize > p.payload
}

/// The flow an ICMP error quotes: the offending packet's headers follow the 8-byte ICMP
/// header. Returns (remote, remote port, local port, proto) of the quoted packet, which was
/// sent *to* this host, so its source is the remote end.
#[inline(always)]
pub fn quoted_flow<C: Skb>(ctx: &C, p: &Packet) -> Option<(Addr, u16, u16, u8)> {
    let inner = parse(ctx, L3Start(p.l4 + 8))?;
    Some((inner.src, inner.sport, inner.dport, inner.proto))
}

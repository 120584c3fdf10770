//! Reverse-path check for the links to workloads (`from_workload_tc`).
//!
//! A frame a workload writes with a packet socket never meets the cgroup programs, and it
//! can claim any source: a trusted resolver's (a forged answer the node routes straight
//! back to the workload's socket), or a forbidden address (a forged inbound packet that
//! opens a "reply" flow). On the node's side of the workload's link, a packet whose source
//! the node does not route back out of that same link is such a forgery (strict
//! reverse-path filtering, RFC 3704), whatever the policy says about its destination.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup as FibLookup,
    },
    helpers::bpf_fib_lookup,
};
use egress_common::Addr;

use crate::packet::{Packet, Skb};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Whether the node's routes lead the packet's source back out of the interface the packet
/// arrived on. A lookup "as output through that interface" (`BPF_FIB_LOOKUP_OUTPUT` with its
/// index) finds only a route through it; the result's interface is compared as well, since
/// an IPv6 lookup takes the interface as a preference only. A route without a resolved
/// neighbour yet (`NO_NEIGH`) is a route all the same.
///
/// IPv6 link-local and unspecified sources pass: the node forwards neither, so nothing
/// that claims one comes back, and neighbour discovery (duplicate address detection
/// included) needs them.
#[inline(always)]
pub fn source_routes_back<C: Skb>(ctx: &C, p: &Packet) -> bool {
    if is_v6_link_local(&p.src) || p.src == [0; 16] {
        return true;
    }
    // SAFETY: a read of a context field TC programs may read.
    let ifindex = unsafe { (*ctx.skb()).ifindex };
    // SAFETY: a plain C struct of integers and byte arrays, for which zero is valid.
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    params.ifindex = ifindex;
    if is_v4_mapped(&p.src) {
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst =
            u32::from_ne_bytes([p.src[12], p.src[13], p.src[14], p.src[15]]);
    } else {
        params.family = AF_INET6;
        let mut dst = [0u32; 4];
        for (i, word) in dst.iter_mut().enumerate() {
            let b = 4 * i;
            *word = u32::from_ne_bytes([p.src[b], p.src[b + 1], p.src[b + 2], p.src[b + 3]]);
        }
        params.__bindgen_anon_4.ipv6_dst = dst;
    }
    // SAFETY: `params` is a valid lookup of the size passed; the helper reads the skb's
    // network namespace only.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<FibLookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc == BPF_FIB_LKUP_RET_FWD_DISABLED as i64 {
        // IPv6 forwarding is off on this link (IPv4 lookups as output never say so): the
        // node routes nothing that arrives on it, so nothing comes back either. (A link's
        // setting follows `net.ipv6.conf.all.forwarding`, unless set on its own.)
        return true;
    }
    let found = rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64;
    found && params.ifindex == ifindex
}

/// `::ffff:0:0/96`: how `Packet` holds an IPv4 address.
#[inline(always)]
fn is_v4_mapped(a: &Addr) -> bool {
    a[0..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff
}

/// `fe80::/10`.
#[inline(always)]
fn is_v6_link_local(a: &Addr) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

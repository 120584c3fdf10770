//! The allowed addresses every benchmark uses, so that `run.sh` (through
//! `egress-bench addresses N`) and the per-packet benchmark agree.
//!
//! Only documentation addresses: IPv6 from 2001:db8::/32, which holds any number of them,
//! and IPv4 from 203.0.113.0/24 and 198.51.100.0/24, which hold 500 between them.
use std::net::{Ipv4Addr, Ipv6Addr};

/// The allowed destination the traffic goes to: the last entry of every list, so that a
/// filter that walks its rules in order (iptables) walks all of them.
pub const V6_TARGET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// A denied destination next to the allowed ones: a trie lookup for it goes as deep as for
/// an allowed one before it fails.
pub const V6_MISS: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);
/// A denied IPv4 destination inside the /24 the allowed IPv4 entries fill.
pub const V4_MISS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 253);
/// At most this many IPv4 entries (203.0.113.0-249, 198.51.100.0-249).
pub const V4_MAX: usize = 500;

/// The `i`th filler address: `2001:db8:<i / 65536>:<i % 65536>::1`, distinct for every
/// `i < 2^32` and never the target, the miss, or the topology's link addresses
/// (`2001:db8:ffff::/64`) for `i < 0xffff_0000`.
pub fn v6_filler(i: u32) -> Ipv6Addr {
    let hi = u16::try_from(i >> 16).unwrap_or(u16::MAX);
    let lo = u16::try_from(i & 0xffff).unwrap_or(u16::MAX);
    Ipv6Addr::new(0x2001, 0xdb8, hi, lo, 0, 0, 0, 1)
}

/// `n` distinct IPv6 addresses: `n - 1` fillers, then [`V6_TARGET`].
pub fn v6_list(n: usize) -> Vec<Ipv6Addr> {
    let fillers = u32::try_from(n.saturating_sub(1)).unwrap_or(u32::MAX);
    let mut v: Vec<Ipv6Addr> = (0..fillers).map(v6_filler).collect();
    if n > 0 {
        v.push(V6_TARGET);
    }
    v
}

/// `n` (at most [`V4_MAX`]) distinct IPv4 addresses: 203.0.113.0-249, then
/// 198.51.100.0-249. The last one is the IPv4 target.
pub fn v4_list(n: usize) -> Vec<Ipv4Addr> {
    (0..n.min(V4_MAX))
        .map(|j| {
            let host = u8::try_from(j % 250).unwrap_or(0);
            if j < 250 {
                Ipv4Addr::new(203, 0, 113, host)
            } else {
                Ipv4Addr::new(198, 51, 100, host)
            }
        })
        .collect()
}

//! Crafted frames for `BPF_PROG_TEST_RUN`, from the test kit (`egress-test-support`), sent
//! from the client end of the benchmark topology.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egress_test_support::frame;

/// The sender's addresses: the client end of the benchmark topology.
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

/// A TCP SYN from the client to `dst:dport`, from `sport`.
pub fn syn(dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let client = match dst {
        IpAddr::V4(_) => IpAddr::V4(CLIENT4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT6),
    };
    frame::syn_from(client, dst, sport, dport)
}

//! The test kit: packets and frames built byte by byte, and the raw sockets that send them.
//! A dev-only crate (never published): the agent's `BPF_PROG_TEST_RUN` tests, the
//! end-to-end harness and its probe, and the benchmarks build their packets here.
//!
//! - [`frame`]: Ethernet frames for `BPF_PROG_TEST_RUN` (no checksums: the programs never
//!   check them), IPv4 and IPv6, TCP, UDP, ICMP, DNS, fragments.
//! - [`packet`]: complete IPv4 packets with their checksums, for raw sockets.
//! - [`raw`]: sending such packets from any source address, routed or out of one link.

pub mod frame;
pub mod packet;
pub mod raw;

pub use egress_common::proto;

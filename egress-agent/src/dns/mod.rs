//! Learning the addresses of allowed names from DNS answers.
//!
//! The kernel does the time-critical part (see `egress-ebpf/src/dns.rs`): it writes the
//! addresses of an allowed name into `LEARNED` before the answer reaches the client. The
//! agent then receives every answer the kernel learned from and stays authoritative: it
//! follows CNAME chains, takes back addresses that are not on the chain, unites the ports of
//! every name an address was learned through, enforces the bounds, and expires addresses.
pub mod answer;
pub mod journal;
pub mod learner;
pub mod names;
mod resolv_conf;
pub mod resolvers;
pub mod seen;
pub mod slot_bits;
pub mod wire;

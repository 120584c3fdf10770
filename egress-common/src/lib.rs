//! Every map the kernel programs and the agent share, with its key and value layout.
//!
//! Both sides compile this crate, so a layout change is one edit. All structs are `#[repr(C)]`
//! with explicit padding: the kernel compares keys byte for byte, so padding must be zeroed,
//! which the constructors do.
//!
//! Addresses are 16 bytes in network byte order. IPv4 addresses are stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one map serves both families and an IPv4 /n prefix is a /(96+n).
#![cfg_attr(not(any(feature = "user", test)), no_std)]

#[cfg(feature = "user")]
pub mod addr;
pub mod maps;

pub use maps::*;

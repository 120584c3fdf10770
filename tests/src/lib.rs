//! Fixtures for the end-to-end tests: network namespaces, cgroups, probe clients and
//! servers, the agent process and checks on what it reported; DNS servers and clients
//! in [`dns`].
//!
//! Every fixture is a guard that removes what it created in `Drop`, also when a test
//! panics, and every kernel object gets a name unique to this process and fixture, so
//! tests can run in parallel and repeated runs never meet each other's leftovers.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub mod agent;
pub mod attack;
pub mod cgroup;
pub mod dns;
pub mod flows;
pub mod netns;
pub mod pins;
pub mod probe;
pub mod world;

pub use agent::*;
pub use cgroup::*;
pub use flows::*;
pub use netns::*;
pub use pins::*;
pub use probe::*;

/// Client end of the veth pair.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Client end of the veth pair.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// Server end of the veth pair, and the client's default gateway.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Server end of the veth pair, and the client's default gateway.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// Off-link server addresses (on the server's `lo`), reached only through the client's
/// default route, like real egress destinations. Two per family so a test can allow one
/// and deny the other.
pub const REMOTE_V4_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// See [`REMOTE_V4_A`].
pub const REMOTE_V4_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// See [`REMOTE_V4_A`].
pub const REMOTE_V6_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
/// See [`REMOTE_V4_A`].
pub const REMOTE_V6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20);

pub(crate) static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process, for names that must not collide.
pub(crate) fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// `<pid>-<n>`: unique across concurrently running test processes too.
pub(crate) fn unique_suffix() -> String {
    format!("{}-{}", std::process::id(), next_id())
}

/// Whether the tests can run here. Without root they cannot create namespaces or
/// cgroups. A build without root marks them `#[ignore]` (`build.rs`), so `cargo test`
/// reports them as ignored; a build with root run without it prints a skip message and
/// returns `false` (callers return early); with `CI=true` it panics, because CI must
/// never skip.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let reason = "end-to-end tests need root (network namespaces, cgroups, eBPF)";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{reason}, and CI=true forbids skipping them"
    );
    eprintln!("skipping: {reason}");
    false
}

/// Runs `cmd` to completion and returns its stdout. Panics with its stderr on failure:
/// a fixture that cannot set itself up makes every later assertion meaningless.
pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|err| panic!("cannot run {cmd:?}: {err}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cleanup step for `Drop`: reports failure instead of panicking, since a panic while
/// already unwinding would abort the whole test binary.
pub(crate) fn run_in_drop(cmd: &mut Command) {
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "cleanup {cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => eprintln!("cleanup {cmd:?} could not run: {err}"),
    }
}

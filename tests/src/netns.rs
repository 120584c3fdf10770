//! Network namespaces and the client/server topology between two of them.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{
    CLIENT_V4, CLIENT_V6, REMOTE_V4_A, REMOTE_V4_B, REMOTE_V6_A, REMOTE_V6_B, SERVER_V4, SERVER_V6,
    next_id, run, run_in_drop, unique_suffix,
};

/// How long a new veth pair may take to carry traffic.
const LINK_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `egt-<pid>-<n>` with `lo` up.
    #[expect(
        clippy::new_without_default,
        reason = "creating a namespace is not a default value"
    )]
    pub fn new() -> Netns {
        let name = format!("egt-{}", unique_suffix());
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Netns { name };
        netns.ip("link set lo up");
        netns
    }

    /// The name `ip netns` knows it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ARGS` and returns its stdout; panics if it fails. `args` is split
    /// on whitespace (no `ip` argument contains any), so calls read like the shell:
    /// `ns.ip("route add blackhole 203.0.113.99/32")`.
    pub fn ip(&self, args: &str) -> String {
        run(Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args.split_whitespace()))
    }

    /// `ip netns exec <ns> ARGV...`, ready to configure and spawn. Note that
    /// `ip netns exec` mounts a fresh sysfs over `/sys`, hiding cgroup mounts below it.
    pub fn exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(&self.name).args(argv);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        run_in_drop(Command::new("ip").args(["netns", "delete", &self.name]));
    }
}

/// Two namespaces joined by a veth pair: `client` reaches the `REMOTE_*` addresses on
/// `server` only through its default routes, as a pod reaches the outside world.
#[derive(Debug)]
pub struct Topology {
    /// Holds [`CLIENT_V4`] and [`CLIENT_V6`]; default routes point at the server.
    pub client: Netns,
    /// Holds [`SERVER_V4`], [`SERVER_V6`] and the `REMOTE_*` addresses.
    pub server: Netns,
    /// The veth end inside `client`.
    pub client_veth: String,
    /// The veth end inside `server`.
    pub server_veth: String,
}

impl Topology {
    /// Builds the namespaces, the veth pair, addresses and routes, and returns once both
    /// veth ends carry traffic. IPv6 addresses use `nodad`, so they are usable at once
    /// instead of after duplicate address detection.
    #[expect(
        clippy::new_without_default,
        reason = "creating namespaces is not a default value"
    )]
    pub fn new() -> Topology {
        let client = Netns::new();
        let server = Netns::new();
        // Both ends are created directly inside their namespaces and never exist in the
        // root namespace, so the short names cannot collide with other test processes.
        let id = next_id();
        let client_veth = format!("ev{id}a");
        let server_veth = format!("ev{id}b");
        let (client_ns, server_ns) = (client.name(), server.name());
        let veth = format!(
            "link add {client_veth} netns {client_ns} type veth peer name {server_veth} netns {server_ns}"
        );
        run(Command::new("ip").args(veth.split_whitespace()));
        client.ip(&format!("link set {client_veth} up"));
        server.ip(&format!("link set {server_veth} up"));
        add_link_addresses(&client, &client_veth, CLIENT_V4, CLIENT_V6);
        add_link_addresses(&server, &server_veth, SERVER_V4, SERVER_V6);
        for remote in [REMOTE_V4_A, REMOTE_V4_B] {
            server.ip(&format!("addr add {remote}/32 dev lo"));
        }
        for remote in [REMOTE_V6_A, REMOTE_V6_B] {
            server.ip(&format!("-6 addr add {remote}/128 dev lo nodad"));
        }
        client.ip(&format!("route add default via {SERVER_V4}"));
        client.ip(&format!("-6 route add default via {SERVER_V6}"));
        wait_link_ready(&client, &client_veth);
        wait_link_ready(&server, &server_veth);
        Topology {
            client,
            server,
            client_veth,
            server_veth,
        }
    }

    /// Adds another off-link destination address on the server's `lo`, like the
    /// `REMOTE_*` ones (IPv6 without duplicate address detection, usable at once).
    pub fn add_remote(&self, addr: impl Into<IpAddr>) {
        match addr.into() {
            IpAddr::V4(v4) => self.server.ip(&format!("addr add {v4}/32 dev lo")),
            IpAddr::V6(v6) => self
                .server
                .ip(&format!("-6 addr add {v6}/128 dev lo nodad")),
        };
    }
}

/// Puts the on-link addresses on one veth end. Adding them while the link is up also
/// installs its ff00::/8 route at once (see [`wait_link_ready`]).
pub(crate) fn add_link_addresses(netns: &Netns, veth: &str, v4: Ipv4Addr, v6: Ipv6Addr) {
    netns.ip(&format!("addr add {v4}/24 dev {veth}"));
    netns.ip(&format!("-6 addr add {v6}/64 dev {veth} nodad"));
}

/// Waits until `veth` can carry traffic. The kernel applies carrier changes
/// asynchronously (linkwatch, rate-limited to about once a second): until then the device
/// may keep the `noop` qdisc or lack its ff00::/8 route, so ARP or NDP packets vanish and
/// the first connection of a test stalls for a retransmit second.
pub(crate) fn wait_link_ready(netns: &Netns, veth: &str) {
    let deadline = Instant::now() + LINK_READY_TIMEOUT;
    while !link_ready(netns, veth) {
        assert!(
            Instant::now() < deadline,
            "{veth} in {} not ready after {LINK_READY_TIMEOUT:?}:\n{}",
            netns.name(),
            netns.ip(&format!("link show dev {veth}"))
        );
        thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn link_ready(netns: &Netns, veth: &str) -> bool {
    let query = |args: String| -> Value {
        serde_json::from_str(&netns.ip(&args)).expect("`ip -j` prints JSON")
    };
    let link = query(format!("-j link show dev {veth}"));
    let multicast = query(format!(
        "-j -6 route show table local type multicast dev {veth}"
    ));
    link[0]["operstate"] == "UP"
        && link[0]["qdisc"] != "noop"
        && multicast
            .as_array()
            .is_some_and(|routes| !routes.is_empty())
}

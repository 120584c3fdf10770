//! The node's own resolvers, from `/etc/resolv.conf`.

use std::net::IpAddr;

/// The `nameserver` addresses in the text of `/etc/resolv.conf`, in order and without
/// repeats, for when the policy names no resolvers. Loopback entries are dropped: a pod can
/// answer itself on its own loopback, and a local stub such as systemd-resolved's
/// 127.0.0.53 asks upstream servers (listed in `/run/systemd/resolve/resolv.conf`), whose
/// answers are the ones learned from. `0.0.0.0` and `::` mean this host to the C library,
/// and go too. Lines that do not parse are skipped, as the C library does.
pub fn system_resolvers(resolv_conf: &str) -> Vec<IpAddr> {
    let mut resolvers = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else {
            continue;
        };
        // An IPv6 link-local server carries its interface: `fe80::1%eth0`.
        let addr = addr.split_once('%').map_or(addr, |(addr, _scope)| addr);
        let Ok(addr) = addr.parse::<IpAddr>() else {
            continue;
        };
        let addr = addr.to_canonical();
        if !addr.is_loopback() && !addr.is_unspecified() && !resolvers.contains(&addr) {
            resolvers.push(addr);
        }
    }
    resolvers
}

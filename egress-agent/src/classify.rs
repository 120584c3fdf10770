//! The kernel's decision for a new flow, taken again from what its maps hold: `explain`
//! answers with it, and the reasons are the kernel's own (`REASON_*`), in the kernel's
//! order (see `egress-ebpf/src/verdict.rs`). It leaves out what needs a packet: flows
//! already decided, fragments, and ICMP errors and neighbour discovery (which pass when
//! they are about an allowed flow or stay on the link).
use std::net::IpAddr;

use egress_common::{ALL_PORTS, Addr, LearnedValue, NO_PORT_SET, proto};

use crate::reason::Reason;

/// The longest CIDR entry containing an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrMatch {
    /// Over the 128-bit key (an IPv4 /n is /(96+n)).
    pub prefix_len: u32,
    pub network: Addr,
    pub port_set: u32,
}

/// What the kernel's maps say, as `classify` asks it.
pub trait View {
    fn cidr(&self, addr: &Addr) -> anyhow::Result<Option<CidrMatch>>;
    /// Whether port set `set` holds (`proto`, `port`) exactly.
    fn has_port(&self, set: u32, proto: u8, port: u16) -> anyhow::Result<bool>;
    fn learned(&self, addr: &Addr) -> anyhow::Result<Option<LearnedValue>>;
    fn is_resolver(&self, addr: &Addr) -> anyhow::Result<bool>;
}

/// Traffic allowed whatever the policy says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implicit {
    Loopback,
    /// DNS (UDP or TCP port 53) to a trusted resolver.
    Dns,
    /// DHCPv6 solicitations to `ff02::1:2`.
    Dhcpv6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    Implicit(Implicit),
    /// By the CIDR entry in [`Classified::cidr`].
    Cidr,
    /// By the learned address in [`Classified::learned`].
    Learned,
}

/// The decision, and the entries it looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub verdict: Result<Allowed, Reason>,
    pub cidr: Option<CidrMatch>,
    pub learned: Option<LearnedValue>,
}

/// ff02::1:2, where DHCPv6 clients send (link scope).
const DHCPV6_SERVERS: Addr = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];
const DHCPV6_SERVER_PORT: u16 = 547;
const DNS_PORT: u16 = 53;

/// ICMP and ICMPv6 share one policy entry, stored under the IPv4 number; a protocol
/// without ports is stored with port 0.
fn port_set_allows<V: View>(view: &V, set: u32, ip_proto: u8, port: u16) -> anyhow::Result<bool> {
    if set == ALL_PORTS {
        return Ok(true);
    }
    if set == NO_PORT_SET {
        return Ok(false);
    }
    let stored = if ip_proto == proto::ICMPV6 {
        proto::ICMP
    } else {
        ip_proto
    };
    Ok(view.has_port(set, stored, port)? || (port != 0 && view.has_port(set, stored, 0)?))
}

/// The decision for a new flow to `addr` (`port` 0 for ICMP) at `now` (boot-time ns).
pub fn classify<V: View>(
    view: &V,
    addr: IpAddr,
    ip_proto: u8,
    port: u16,
    now: u64,
) -> anyhow::Result<Classified> {
    let key = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut out = Classified {
        verdict: Err(Reason::NoRule),
        cidr: view.cidr(&key)?,
        learned: view.learned(&key)?,
    };
    let transport = ip_proto == proto::TCP || ip_proto == proto::UDP;
    let implicit = if addr.to_canonical().is_loopback() {
        Some(Implicit::Loopback)
    } else if transport && port == DNS_PORT && view.is_resolver(&key)? {
        Some(Implicit::Dns)
    } else if ip_proto == proto::UDP && port == DHCPV6_SERVER_PORT && key == DHCPV6_SERVERS {
        Some(Implicit::Dhcpv6)
    } else {
        None
    };
    if let Some(implicit) = implicit {
        out.verdict = Ok(Allowed::Implicit(implicit));
        return Ok(out);
    }
    let cidr_reason = match out.cidr {
        Some(m) if port_set_allows(view, m.port_set, ip_proto, port)? => {
            out.verdict = Ok(Allowed::Cidr);
            return Ok(out);
        }
        Some(_) => Reason::Port,
        None => Reason::NoRule,
    };
    out.verdict = match out.learned {
        Some(l) if l.expires_ns > now => {
            let extra =
                l.extra_set != NO_PORT_SET && port_set_allows(view, l.extra_set, ip_proto, port)?;
            if port_set_allows(view, l.port_set, ip_proto, port)? || extra {
                Ok(Allowed::Learned)
            } else {
                Err(Reason::LearnedPort)
            }
        }
        Some(_) if cidr_reason == Reason::NoRule => Err(Reason::LearnedExpired),
        _ => Err(cidr_reason),
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use egress_common::v4_mapped;

    use super::*;

    /// Maps as a test writes them: one CIDR match per address.
    #[derive(Default)]
    struct Fake {
        cidrs: HashMap<Addr, CidrMatch>,
        ports: HashSet<(u32, u8, u16)>,
        learned: HashMap<Addr, LearnedValue>,
        resolvers: HashSet<Addr>,
    }

    impl View for Fake {
        fn cidr(&self, addr: &Addr) -> anyhow::Result<Option<CidrMatch>> {
            Ok(self.cidrs.get(addr).copied())
        }
        fn has_port(&self, set: u32, proto: u8, port: u16) -> anyhow::Result<bool> {
            Ok(self.ports.contains(&(set, proto, port)))
        }
        fn learned(&self, addr: &Addr) -> anyhow::Result<Option<LearnedValue>> {
            Ok(self.learned.get(addr).copied())
        }
        fn is_resolver(&self, addr: &Addr) -> anyhow::Result<bool> {
            Ok(self.resolvers.contains(addr))
        }
    }

    const NOW: u64 = 1_000;

    fn addr(last: u8) -> (IpAddr, Addr) {
        let octets = [203, 0, 113, last];
        (IpAddr::from(octets), v4_mapped(octets))
    }

    fn fake() -> Fake {
        let mut f = Fake::default();
        let cidr = CidrMatch {
            prefix_len: 120,
            network: v4_mapped([203, 0, 113, 0]),
            port_set: 0,
        };
        f.cidrs.insert(addr(1).1, cidr);
        f.cidrs.insert(addr(3).1, cidr);
        f.ports.insert((0, proto::TCP, 443));
        f.ports.insert((1, proto::TCP, 8443));
        f.ports.insert((2, proto::UDP, 0));
        f.ports.insert((3, proto::ICMP, 0));
        f.learned.insert(addr(2).1, LearnedValue::new(1, NOW + 1));
        f.learned.insert(addr(3).1, LearnedValue::new(1, NOW));
        f.learned.insert(
            addr(4).1,
            LearnedValue {
                port_set: 1,
                extra_set: 2,
                expires_ns: NOW + 1,
            },
        );
        f.learned.insert(addr(5).1, LearnedValue::new(1, NOW - 1));
        f.learned.insert(addr(6).1, LearnedValue::new(3, NOW + 1));
        f.resolvers.insert(addr(53).1);
        f
    }

    fn verdict(ip_proto: u8, last: u8, port: u16) -> Result<Allowed, Reason> {
        classify(&fake(), addr(last).0, ip_proto, port, NOW)
            .expect("fake maps")
            .verdict
    }

    #[test]
    fn cidr_rules_decide_by_their_port_set() {
        assert_eq!(verdict(proto::TCP, 1, 443), Ok(Allowed::Cidr));
        assert_eq!(verdict(proto::TCP, 1, 80), Err(Reason::Port));
        assert_eq!(verdict(proto::UDP, 1, 443), Err(Reason::Port));
    }

    #[test]
    fn learned_addresses_decide_by_their_sets_while_live() {
        assert_eq!(verdict(proto::TCP, 2, 8443), Ok(Allowed::Learned));
        assert_eq!(verdict(proto::TCP, 2, 443), Err(Reason::LearnedPort));
        assert_eq!(
            verdict(proto::UDP, 4, 5353),
            Ok(Allowed::Learned),
            "second set"
        );
        assert_eq!(verdict(proto::TCP, 5, 8443), Err(Reason::LearnedExpired));
        assert_eq!(verdict(proto::ICMPV6, 6, 0), Ok(Allowed::Learned));
    }

    #[test]
    fn an_expired_learned_address_under_a_cidr_rule_is_denied_for_the_rule_s_ports() {
        // Expiry is at NOW exactly: the kernel allows while `expires_ns > now`.
        assert_eq!(verdict(proto::TCP, 3, 8443), Err(Reason::Port));
    }

    #[test]
    fn nothing_known_is_no_rule() {
        assert_eq!(verdict(proto::TCP, 9, 443), Err(Reason::NoRule));
    }

    #[test]
    fn loopback_dns_to_resolvers_and_dhcpv6_pass_whatever_the_policy() {
        let f = fake();
        let at = |a: IpAddr, p, port| classify(&f, a, p, port, NOW).expect("fake").verdict;
        let implicit = |i| Ok(Allowed::Implicit(i));
        assert_eq!(
            at("127.0.0.1".parse().unwrap(), proto::TCP, 1),
            implicit(Implicit::Loopback)
        );
        assert_eq!(
            at("::1".parse().unwrap(), proto::UDP, 1),
            implicit(Implicit::Loopback)
        );
        assert_eq!(at(addr(53).0, proto::UDP, 53), implicit(Implicit::Dns));
        assert_eq!(at(addr(53).0, proto::TCP, 53), implicit(Implicit::Dns));
        assert_eq!(at(addr(53).0, proto::TCP, 443), Err(Reason::NoRule));
        assert_eq!(
            at("ff02::1:2".parse().unwrap(), proto::UDP, 547),
            implicit(Implicit::Dhcpv6)
        );
    }
}

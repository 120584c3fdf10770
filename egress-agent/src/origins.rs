//! Where what the maps hold comes from: the policy entries behind a CIDR or name entry (by
//! the policy recorded when it was applied, see `record`), and what passes whatever the
//! policy says. `check`, `status --rules` and `explain` all say it through here.
use std::net::IpAddr;

use serde::Serialize;

use crate::{
    classify::{CidrMatch, Implicit},
    compile::to_key_space,
    dns::resolvers::FROM_POLICY,
    pinned::cidr_text,
    policy::{NamePattern, Origin, Policy, Prefix, PrefixList, Rule, Target},
};

/// The policy entries behind a map entry: its own (the rules of exactly this target) and
/// the containing ones whose ports it carries too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Origins {
    /// Whether a recorded policy was there to ask (the default, `false`, says nothing).
    pub known: bool,
    pub own: Vec<String>,
    /// `<target> (<its origins>)` of each containing rule.
    pub inside: Vec<String>,
    /// With no `own`: the lists the entry came from, one of them, as they were applied;
    /// their files do not match the hashes recorded, so they were not searched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed_lists: Vec<String>,
}

impl Origins {
    /// None found yet, from a recorded policy.
    fn known() -> Self {
        Self {
            known: true,
            ..Self::default()
        }
    }

    /// As one phrase, e.g. `allow[1]; inside 203.0.113.0/24 (allow[0])`.
    pub fn text(&self) -> String {
        if !self.known {
            return "origins unknown: no policy recorded".to_owned();
        }
        let mut parts = Vec::new();
        if !self.own.is_empty() {
            parts.push(self.own.join(", "));
        }
        if !self.changed_lists.is_empty() {
            parts.push(format!(
                "{} as applied; its file does not match the hash recorded, so not read",
                self.changed_lists.join(" or ")
            ));
        }
        for outer in &self.inside {
            parts.push(format!("inside {outer}"));
        }
        if parts.is_empty() {
            "not in the recorded policy".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

fn origin_list(rule: &Rule) -> String {
    rule.origins
        .iter()
        .map(Origin::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `allow[2] (cidrs_from big.txt)`: a list as an origin.
pub fn of_list(list: &PrefixList) -> String {
    format!("allow[{}] (cidrs_from {})", list.entry, list.name)
}

/// The rules behind a `CIDRS` entry. `changed` names the lists of the policy whose files
/// are not the ones applied (see `status::Recorded`), left out of `policy.lists`: an entry
/// no rule or other list holds came from one of them.
pub fn of_cidr(policy: &Policy, changed: &[String], entry: &CidrMatch) -> Origins {
    let network = u128::from_be_bytes(entry.network);
    let mut out = Origins::known();
    for rule in &policy.rules {
        let Target::Cidr(net) = &rule.target else {
            continue;
        };
        let (len, addr) = to_key_space(net);
        if (len, addr) == (entry.prefix_len, network) {
            out.own.push(origin_list(rule));
        } else if len < entry.prefix_len && (len == 0 || (addr ^ network) >> (128 - len) == 0) {
            out.inside.push(format!("{net} ({})", origin_list(rule)));
        }
    }
    if let Ok(len) = u8::try_from(entry.prefix_len) {
        let prefix = Prefix {
            len,
            addr: entry.network,
        };
        for list in policy.lists.iter().filter(|list| list.contains(&prefix)) {
            out.own.push(of_list(list));
        }
    }
    if out.own.is_empty() {
        out.changed_lists = changed.to_vec();
    }
    out
}

/// The rules behind a `NAMES` entry.
pub fn of_name(policy: &Policy, pattern: &NamePattern) -> Origins {
    let mut out = Origins::known();
    for rule in &policy.rules {
        let Target::Name(rule_pattern) = &rule.target else {
            continue;
        };
        if rule_pattern == pattern {
            out.own.push(origin_list(rule));
            continue;
        }
        let inner = match pattern {
            NamePattern::Exact(name) | NamePattern::Wildcard(name) => name,
        };
        if matches!(rule_pattern, NamePattern::Wildcard(_)) && rule_pattern.matches(inner) {
            out.inside
                .push(format!("{rule_pattern} ({})", origin_list(rule)));
        }
    }
    out
}

/// The rules a learned address was allowed by: those of the names it was learned through.
pub fn of_learned_name(policy: &Policy, name: &str) -> Origins {
    let mut out = Origins::known();
    for rule in &policy.rules {
        if let Target::Name(pattern) = &rule.target
            && pattern.matches(name)
        {
            out.own
                .push(format!("{pattern} {} ({})", rule.ports, origin_list(rule)));
        }
    }
    out
}

/// Where the trusted resolvers come from, by the recorded policy.
pub fn resolver_source(policy: Option<&Policy>) -> String {
    match policy {
        Some(p) if p.dns.resolvers.is_some() => FROM_POLICY.to_owned(),
        Some(_) => "the node's resolv.conf (the policy has no dns.resolvers)".to_owned(),
        None => "unknown (no recorded policy)".to_owned(),
    }
}

/// One thing that passes whatever the policy says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImplicitAllow {
    pub what: String,
    pub why: String,
}

/// The words for an implicit allow `explain` found.
pub fn implicit_text(implicit: Implicit) -> &'static str {
    match implicit {
        Implicit::Loopback => "loopback: 127.0.0.0/8, ::1 and anything on the loopback interface",
        Implicit::Dns => "DNS (UDP:53 TCP:53) to a trusted resolver",
        Implicit::Dhcpv6 => "DHCPv6 solicitations (UDP:547) to ff02::1:2",
    }
}

/// Everything the kernel lets through whatever the policy says, with `resolvers` the
/// trusted resolvers and `source` where they come from.
pub fn implicit_allows(resolvers: &[IpAddr], source: &str) -> Vec<ImplicitAllow> {
    let listed = if resolvers.is_empty() {
        "none".to_owned()
    } else {
        resolvers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let always = |what: &str, why: &str| ImplicitAllow {
        what: what.to_owned(),
        why: why.to_owned(),
    };
    vec![
        ImplicitAllow {
            what: format!("DNS (UDP:53 TCP:53) to {listed}"),
            why: format!(
                "trusted resolvers, from {source}; their answers teach the names' addresses"
            ),
        },
        always(implicit_text(Implicit::Loopback), "never leaves the node"),
        always(
            "IPv6 neighbour discovery (hop limit 255) and MLD (hop limit 1) on the link",
            "the link needs it; never routed",
        ),
        always(implicit_text(Implicit::Dhcpv6), "link scope; never routed"),
        always(
            "ICMP errors about an allowed or inbound flow, to that flow's remote end",
            "path MTU discovery and unreachables; no longer than the kernel's own",
        ),
        always(
            "replies of flows started from outside, from the socket that received them",
            "a server in the cgroup answers its clients",
        ),
    ]
}

/// The CIDR of a map entry as the policy writes it.
pub fn cidr_of(entry: &CidrMatch) -> String {
    cidr_text(entry.prefix_len, &entry.network).to_string()
}

#[cfg(test)]
mod tests {
    use egress_common::v4_mapped;

    use super::*;
    use crate::policy::parse;

    const POLICY: &str = "
allow:
  - cidr: 203.0.113.0/24
    ports: [TCP:443]
  - cidr: 203.0.113.7
    ports: [UDP:123]
  - fqdn: \"*.example.com\"
    ports: [TCP:443]
  - fqdn: api.example.com
    ports: [TCP:8443]
api_server: 198.51.100.5
";

    fn policy() -> Policy {
        parse(POLICY, "origins.yaml").expect("valid")
    }

    fn cidr(octets: [u8; 4], len: u32) -> CidrMatch {
        CidrMatch {
            prefix_len: 96 + len,
            network: v4_mapped(octets),
            port_set: 0,
        }
    }

    #[test]
    fn a_cidr_entry_names_its_own_rule_and_the_rules_around_it() {
        let p = policy();
        let inner = of_cidr(&p, &[], &cidr([203, 0, 113, 7], 32));
        assert_eq!(inner.own, ["allow[1]"]);
        assert_eq!(inner.inside, ["203.0.113.0/24 (allow[0])"]);
        assert_eq!(inner.text(), "allow[1]; inside 203.0.113.0/24 (allow[0])");
        let api = of_cidr(&p, &[], &cidr([198, 51, 100, 5], 32));
        assert_eq!(api.own, ["api_server"]);
        assert_eq!(cidr_of(&cidr([203, 0, 113, 0], 24)), "203.0.113.0/24");
        assert_eq!(
            of_cidr(&p, &[], &cidr([192, 0, 2, 0], 24)).text(),
            "not in the recorded policy"
        );
        assert_eq!(
            Origins::default().text(),
            "origins unknown: no policy recorded"
        );
    }

    #[test]
    fn an_entry_of_no_rule_names_the_lists_whose_files_changed() {
        let p = policy();
        let changed = ["allow[4] (cidrs_from big.txt)".to_owned()];
        let listed = of_cidr(&p, &changed, &cidr([192, 0, 2, 0], 24));
        assert_eq!(
            listed.text(),
            "allow[4] (cidrs_from big.txt) as applied; its file does not match the hash recorded, so not read"
        );
        let inline = of_cidr(&p, &changed, &cidr([203, 0, 113, 7], 32));
        assert_eq!(inline.text(), "allow[1]; inside 203.0.113.0/24 (allow[0])");
    }

    #[test]
    fn a_name_entry_names_its_own_rule_and_the_zones_around_it() {
        let p = policy();
        let api = of_name(&p, &NamePattern::Exact("api.example.com".into()));
        assert_eq!(api.own, ["allow[3]"]);
        assert_eq!(api.inside, ["*.example.com (allow[2])"]);
        let zone = of_name(&p, &NamePattern::Wildcard("example.com".into()));
        assert_eq!((zone.own.len(), zone.inside.len()), (1, 0));
        let learned = of_learned_name(&p, "api.example.com");
        assert_eq!(
            learned.own,
            [
                "*.example.com TCP:443 (allow[2])",
                "api.example.com TCP:8443 (allow[3])"
            ]
        );
    }

    #[test]
    fn the_resolvers_say_where_they_come_from() {
        let p = policy();
        assert!(resolver_source(Some(&p)).contains("resolv.conf"));
        let listed = parse(
            "allow:\n  - cidr: 203.0.113.0/24\ndns:\n  resolvers: [198.51.100.53]\n",
            "r.yaml",
        )
        .expect("valid");
        assert_eq!(resolver_source(Some(&listed)), "dns.resolvers");
        let implicit = implicit_allows(&["198.51.100.53".parse().unwrap()], "dns.resolvers");
        assert_eq!(implicit[0].what, "DNS (UDP:53 TCP:53) to 198.51.100.53");
        assert!(implicit[0].why.contains("dns.resolvers"));
    }
}

//! From the YAML as read to a [`Policy`]: every check that needs more than one token.

use std::cmp::Reverse;
use std::net::{IpAddr, Ipv4Addr};

use egress_common::LEARNED_LIMIT;
use ipnet::{IpNet, Ipv6Net};

use super::lists::{list_entry, refuse_repeats};
use super::merge::{RuleSet, add_presets};
use super::prefix_list::PrefixList;
use super::presets::API_SERVER_PORTS;
use super::raw::{RawDns, RawEntry, RawPolicy};
use super::suffix::{Reach, reach};
use super::syntax::{parse_cidr, parse_fqdn, parse_ports};
use super::types::{DnsSettings, Mode, NamePattern, Notice, Origin, Policy, Ports, Rule, Target};
use super::{PolicyError, Problem};
use crate::kubeconfig::KubeletApiServer;

/// The cluster's own API server name, and where it was found.
pub(super) struct ApiServerName<'a> {
    pub(super) name: &'a str,
    /// `api_server` in the policy, or the kubelet's kubeconfig file.
    pub(super) from: ApiServerSource<'a>,
}

#[derive(Clone, Copy)]
pub(super) enum ApiServerSource<'a> {
    Policy,
    Kubeconfig(&'a str),
}

/// `api_server`: the address the API server's name resolves to, or that name.
enum ApiServer {
    Address(IpNet),
    Name(String),
}

fn parse_api_server(text: &str) -> Result<ApiServer, String> {
    if text.parse::<IpAddr>().is_ok() || text.contains('/') {
        return parse_cidr(text).map(ApiServer::Address);
    }
    match parse_fqdn(text) {
        Ok(NamePattern::Exact(name)) => Ok(ApiServer::Name(name)),
        Ok(NamePattern::Wildcard(_)) => Err(
            "a wildcard is not one API server; give its name (`az aks show -g RG -n NAME --query fqdn`) or its address"
                .to_string(),
        ),
        Err(problem) => Err(format!(
            "neither an address nor an API server name: {problem}"
        )),
    }
}

/// Validates everything in `raw`, and reports every problem found, not only the first.
/// `problems` holds those found before, in reading the YAML; their entries are marked
/// `reported` in `raw` and skipped here.
pub(super) fn validate(
    raw: RawPolicy,
    source: &str,
    kubelet: Option<&KubeletApiServer>,
    mut problems: Problems,
) -> Result<Policy, PolicyError> {
    let mode = match raw.mode {
        None => Mode::default(),
        Some(mode) => problems
            .keep(mode.parse().map_err(|p: String| invalid(source, "mode", p)))
            .unwrap_or_default(),
    };
    let dns = match raw.dns {
        None => DnsSettings::default(),
        Some(dns) => problems.keep(parse_dns(dns, source)).unwrap_or_default(),
    };
    let mut rules = RuleSet::default();
    let mut lists = Vec::new();
    let mut notices = Vec::new();
    let allow_given = raw.allow.is_some();
    for (entry, mut raw) in raw.allow.into_iter().flatten().enumerate() {
        if raw.reported {
            continue;
        }
        if let Some(name) = raw.cidrs_from.take() {
            lists.extend(problems.keep(list_entry(entry, raw, name, source)));
            continue;
        }
        let parsed = parse_entry(entry, raw, &rules, &mut notices, source);
        if let Some((target, ports)) = problems.keep(parsed) {
            rules.add(target, ports, Origin::Allow(entry));
        }
    }
    let api_server = raw.api_server.as_ref().and_then(|text| {
        let at = format!("api_server ({text})");
        let parsed = parse_api_server(text).map_err(|p| invalid(source, &at, p));
        problems.keep(parsed).map(|parsed| (at, parsed))
    });
    let name = match &api_server {
        Some((_, ApiServer::Name(name))) => Some(ApiServerName {
            name,
            from: ApiServerSource::Policy,
        }),
        _ => kubelet.map(|k| ApiServerName {
            name: &k.name,
            from: ApiServerSource::Kubeconfig(&k.file),
        }),
    };
    add_presets(
        raw.presets,
        &mut rules,
        name,
        &mut notices,
        &mut problems,
        source,
    );
    if let Some((at, api_server)) = api_server {
        let target = match api_server {
            ApiServer::Address(net) => Target::Cidr(net),
            ApiServer::Name(name) => Target::Name(NamePattern::Exact(name)),
        };
        let ports = parse_ports(API_SERVER_PORTS).map_err(|p| invalid(source, &at, p));
        if let Some(ports) = problems.keep(ports) {
            rules.add(target, ports, Origin::ApiServer);
        }
    }
    if let Some(cidrs) = raw.cluster_cidrs {
        if cidrs.is_empty() {
            problems.keep::<()>(Err(invalid(
                source,
                "cluster_cidrs",
                "is empty; omit it, or list the node subnet, pod CIDR and service CIDR",
            )));
        }
        for (entry, cidr) in cidrs.iter().enumerate() {
            let at = format!("cluster_cidrs[{entry}] ({cidr})");
            let Some(target) = problems.keep(
                parse_cidr(cidr)
                    .map(Target::Cidr)
                    .map_err(|p| invalid(source, &at, p)),
            ) else {
                continue;
            };
            if let Some(first) = rules
                .origins(&target)
                .iter()
                .find(|o| matches!(o, Origin::ClusterCidr(_)))
            {
                let problem = format!("repeats {first} ({target})");
                problems.keep::<()>(Err(invalid(source, at, problem)));
                continue;
            }
            rules.add(target, Ports::All, Origin::ClusterCidr(entry));
        }
    }
    problems.keep(refuse_repeats(&lists, &rules.rules, source));
    problems.keep(refuse_whole_family(&rules.rules, &lists, source));
    if !problems.0.is_empty() {
        return Err(PolicyError::Invalid {
            file: source.to_string(),
            problems: problems.0,
        });
    }
    if rules.rules.is_empty() && lists.is_empty() {
        let problem = if allow_given {
            "is empty, so all egress would be dropped; list at least one destination, or use `presets`"
        } else {
            "missing; list the destinations pods may reach, or use `presets` (a policy without rules would drop all egress)"
        };
        return Err(invalid(source, "allow", problem));
    }
    Ok(Policy {
        mode,
        rules: rules.rules,
        lists,
        dns,
        notices,
    })
}

/// Refuses CIDR rules that together allow every destination of an address family:
/// `0.0.0.0/1` and `128.0.0.0/1` admit as much as `0.0.0.0/0`, which [`parse_cidr`] refuses.
/// As for `/0`, the rules' ports do not matter: every destination on a port is a hole an
/// allowlist is there to close. Names the rules that do it, the widest ones only.
fn refuse_whole_family(
    rules: &[Rule],
    lists: &[PrefixList],
    source: &str,
) -> Result<(), PolicyError> {
    /// Rules named in the error at most; thousands of /16s can cover IPv4.
    const NAMED: usize = 8;
    // IPv6 rules may not hold the IPv4-mapped range (see `parse_cidr`), and no IPv6 packet
    // goes there: rules that cover all else cover every IPv6 destination.
    let mapped = Ipv6Net::new_assert(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96);
    let mapped: (u128, u128, Option<usize>) =
        (mapped.network().into(), mapped.broadcast().into(), None);
    for (ipv4, family, last, implied) in [
        (true, "IPv4", u128::from(u32::MAX), None),
        (false, "IPv6", u128::MAX, Some(mapped)),
    ] {
        let ranges = rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| match rule.target {
                Target::Cidr(IpNet::V4(net)) if ipv4 => Some((
                    u32::from(net.network()).into(),
                    u32::from(net.broadcast()).into(),
                    Some(i),
                )),
                Target::Cidr(IpNet::V6(net)) if !ipv4 => {
                    Some((net.network().into(), net.broadcast().into(), Some(i)))
                }
                _ => None,
            });
        // A list's prefixes count as rules numbered after the inline ones.
        let listed = lists.iter().enumerate().flat_map(|(k, list)| {
            list.prefixes.iter().filter_map(move |p| match p.net() {
                IpNet::V4(net) if ipv4 => Some((
                    u32::from(net.network()).into(),
                    u32::from(net.broadcast()).into(),
                    Some(rules.len() + k),
                )),
                IpNet::V6(net) if !ipv4 => Some((
                    net.network().into(),
                    net.broadcast().into(),
                    Some(rules.len() + k),
                )),
                _ => None,
            })
        });
        let Some(mut widest) = covering(ranges.chain(listed).chain(implied), last) else {
            continue;
        };
        // A list is named once, where its first prefix comes.
        let mut seen = std::collections::HashSet::new();
        widest.retain(|&i| seen.insert(i));
        let mut named: Vec<String> = widest
            .iter()
            .take(NAMED)
            .map(|&i| match rules.get(i) {
                Some(rule) => {
                    let origins: Vec<String> = rule.origins.iter().map(Origin::to_string).collect();
                    format!("{} ({})", origins.join(" and "), rule.target)
                }
                None => {
                    let list = &lists[i - rules.len()];
                    super::lists::at(list.entry, &list.name)
                }
            })
            .collect();
        if widest.len() > NAMED {
            named.push(format!("and {} more", widest.len() - NAMED));
        }
        return Err(invalid(
            source,
            named.join(", "),
            format!(
                "together allow every {family} destination, as a /0 would; the enforcer would admit everything"
            ),
        ));
    }
    Ok(())
}

/// Whether the ranges `(first, last, rule)` cover every number from 0 to `last`; if so, the
/// rules of the widest ranges, which are all it takes since CIDR ranges nest or are apart.
fn covering(
    ranges: impl Iterator<Item = (u128, u128, Option<usize>)> + Clone,
    last: u128,
) -> Option<Vec<usize>> {
    // Ranges that add up to less than the whole cannot cover it: most policies stop here,
    // without the memory and time a sort of a million entries takes.
    let total = ranges.clone().fold(0u128, |sum, (first, end, _)| {
        sum.saturating_add((end - first).saturating_add(1))
    });
    // (`<`, not `<=`: for IPv6 the sum saturates at `u128::MAX`, one short of the whole.)
    if total < last {
        return None;
    }
    let mut ranges: Vec<_> = ranges.collect();
    ranges.sort_unstable_by_key(|&(first, end, _)| (first, Reverse(end)));
    // The first number not covered yet; `None` once past `u128::MAX`.
    let mut next = Some(0u128);
    let mut widest = Vec::new();
    for (first, end, rule) in ranges {
        let Some(uncovered) = next else {
            break;
        };
        if first > uncovered {
            return None;
        }
        if end >= uncovered {
            next = end.checked_add(1);
            widest.extend(rule);
        }
    }
    next.is_none_or(|n| n > last).then_some(widest)
}

/// Validates one `allow` entry. Entries repeating an earlier one are refused: unlike preset
/// rows, which legitimately share targets, a repeated entry is a typo or a leftover.
fn parse_entry(
    entry: usize,
    raw: RawEntry,
    rules: &RuleSet,
    notices: &mut Vec<Notice>,
    source: &str,
) -> Result<(Target, Ports), PolicyError> {
    let (target, at) = match (raw.cidr, raw.fqdn) {
        (Some(cidr), None) => (
            parse_cidr(&cidr).map(Target::Cidr),
            format!("allow[{entry}] (cidr {cidr})"),
        ),
        (None, Some(fqdn)) => (
            parse_fqdn(&fqdn).map(Target::Name),
            format!("allow[{entry}] (fqdn {fqdn})"),
        ),
        (Some(_), Some(_)) => {
            return Err(invalid(
                source,
                format!("allow[{entry}]"),
                "has both `cidr` and `fqdn`; split it into two entries",
            ));
        }
        (None, None) => {
            return Err(invalid(
                source,
                format!("allow[{entry}]"),
                "needs a `cidr` or an `fqdn`",
            ));
        }
    };
    let target = target.map_err(|p| invalid(source, &at, p))?;
    if let Target::Name(pattern) = &target {
        match reach(pattern) {
            Reach::Owned => {}
            Reach::PublicSuffix(zone) => {
                return Err(invalid(
                    source,
                    at,
                    format!(
                        "`{pattern}` admits every domain anyone registers under `{zone}`, a public suffix; name the domains you need, e.g. `*.example.{zone}` or `www.example.{zone}`"
                    ),
                ));
            }
            Reach::MultiTenant(zone) => notices.push(Notice {
                warning: true,
                at: at.clone(),
                text: format!(
                    "`{pattern}` admits every name anyone creates under `{zone}`, a provider's shared zone (Public Suffix List, private section); name your own, e.g. `mine.{zone}`"
                ),
            }),
        }
    }
    if let Some(first) = rules.origins(&target).first() {
        return Err(invalid(
            source,
            at,
            format!("repeats {first} ({target}); merge their ports into one entry"),
        ));
    }
    let ports = match raw.ports {
        None => Ports::All,
        Some(items) => {
            parse_ports(&items.unwrap_or_default()).map_err(|p| invalid(source, &at, p))?
        }
    };
    Ok((target, ports))
}

fn parse_dns(raw: RawDns, source: &str) -> Result<DnsSettings, PolicyError> {
    let default = DnsSettings::default();
    let resolvers = match raw.resolvers {
        None => None,
        Some(list) => {
            let list = list.unwrap_or_default();
            if list.is_empty() {
                return Err(invalid(
                    source,
                    "dns.resolvers",
                    "is empty, so no DNS answer would be trusted; omit it to use the node's nameservers from /etc/resolv.conf",
                ));
            }
            let mut resolvers: Vec<IpAddr> = Vec::with_capacity(list.len());
            for (i, text) in list.iter().enumerate() {
                let at = format!("dns.resolvers[{i}] ({text})");
                let addr = parse_resolver(text).map_err(|p| invalid(source, &at, p))?;
                if let Some(j) = resolvers.iter().position(|r| *r == addr) {
                    return Err(invalid(source, at, format!("repeats dns.resolvers[{j}]")));
                }
                resolvers.push(addr);
            }
            Some(resolvers)
        }
    };
    let dns = DnsSettings {
        resolvers,
        min_ttl: raw.min_ttl.unwrap_or(default.min_ttl),
        max_ttl: raw.max_ttl.unwrap_or(default.max_ttl),
        max_ips_per_name: raw.max_ips_per_name.unwrap_or(default.max_ips_per_name),
        max_ips: raw.max_ips.unwrap_or(default.max_ips),
    };
    let refuse = |at: &str, problem: String| Err(invalid(source, at, problem));
    if dns.max_ttl == 0 {
        return refuse(
            "dns.max_ttl",
            "is 0, so no learned address would stay allowed".into(),
        );
    }
    if dns.min_ttl > dns.max_ttl {
        return refuse(
            "dns.min_ttl",
            format!("{} is above dns.max_ttl ({})", dns.min_ttl, dns.max_ttl),
        );
    }
    if dns.max_ips == 0 {
        return refuse("dns.max_ips", "is 0, so no address could be learned".into());
    }
    if dns.max_ips > LEARNED_LIMIT {
        return refuse(
            "dns.max_ips",
            format!(
                "{} is above {LEARNED_LIMIT}, the most the kernel map of learned addresses is made for",
                dns.max_ips
            ),
        );
    }
    if dns.max_ips_per_name == 0 {
        return refuse(
            "dns.max_ips_per_name",
            "is 0, so no name could get an address".into(),
        );
    }
    if dns.max_ips_per_name > dns.max_ips {
        return refuse(
            "dns.max_ips_per_name",
            format!(
                "{} is above dns.max_ips ({})",
                dns.max_ips_per_name, dns.max_ips
            ),
        );
    }
    Ok(dns)
}

/// Parses a trusted resolver: one host that can really be the one answering.
fn parse_resolver(text: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = text
        .parse()
        .map_err(|_| format!("`{text}` is not an IP address"))?;
    if let IpAddr::V6(v6) = addr
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return Err(format!(
            "is an IPv4-mapped IPv6 address; write the IPv4 form instead: {v4}"
        ));
    }
    if addr.is_loopback() {
        return Err(
            "is a loopback address, which can never be trusted: a pod can answer itself on its own loopback; name the servers a local stub resolver forwards to instead"
                .to_string(),
        );
    }
    if addr.is_unspecified() {
        return Err("is the unspecified address, not a server".to_string());
    }
    if addr.is_multicast() || addr == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err("is a multicast or broadcast address, not a single server".to_string());
    }
    Ok(addr)
}

pub(super) fn invalid(
    file: &str,
    at: impl Into<String>,
    problem: impl Into<String>,
) -> PolicyError {
    PolicyError::Invalid {
        file: file.to_string(),
        problems: vec![Problem {
            line: None,
            at: at.into(),
            problem: problem.into(),
        }],
    }
}

/// The problems found so far, so that one run reports them all rather than the first.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    /// The value of `result`, or `None` with its problems kept.
    pub(super) fn keep<T>(&mut self, result: Result<T, PolicyError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(PolicyError::Invalid { problems, .. }) => {
                self.0.extend(problems);
                None
            }
            Err(other) => {
                self.0.push(Problem {
                    line: None,
                    at: String::new(),
                    problem: other.to_string(),
                });
                None
            }
        }
    }
}

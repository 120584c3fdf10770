//! The policy file: which destinations the pods on this node may reach.
//!
//! The YAML is first read into loose `Raw*` structs and then validated by hand, so that every
//! mistake is reported with the file, the `allow` entry and what is wrong. Anything doubtful is
//! an error, never a warning: an allowlist that quietly admits more, or less, than its author
//! meant is worse than one that refuses to load.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer};

/// What the enforcer does with traffic the policy does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Log it and let it through: the safe way to try a new policy out.
    #[default]
    Audit,
    /// Drop it.
    Enforce,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Audit => "audit",
            Mode::Enforce => "enforce",
        })
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "audit" => Ok(Mode::Audit),
            "enforce" => Ok(Mode::Enforce),
            _ => Err(format!("unknown mode `{s}`; expected `audit` or `enforce`")),
        }
    }
}

/// A validated policy file.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    /// One rule per `allow` entry, in file order.
    pub rules: Vec<Rule>,
}

/// One `allow` entry: traffic to `target` on `ports` is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    pub ports: Ports,
    /// Index of the entry in `allow`, so later messages can point back into the file.
    pub entry: usize,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.target, self.ports)
    }
}

/// Where a rule lets traffic go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A network, with the host bits clear.
    Cidr(IpNet),
    /// Addresses learnt from DNS answers for matching names.
    Name(NamePattern),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cidr(net) => net.fmt(f),
            Target::Name(pattern) => pattern.fmt(f),
        }
    }
}

/// A DNS name to match, lowercased and without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    /// Exactly this name.
    Exact(String),
    /// Any name strictly below this zone (written `*.zone`; the zone itself does not match).
    Wildcard(String),
}

impl NamePattern {
    /// Whether `name` (as seen in a DNS answer) is covered, ignoring case and a trailing dot.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
        match self {
            NamePattern::Exact(exact) => name.eq_ignore_ascii_case(exact.as_bytes()),
            NamePattern::Wildcard(zone) => {
                // Needs at least one character and a dot before the zone: `a.zone`, not `zone`
                // nor `xzone`.
                name.len() > zone.len() + 1 && {
                    let (head, tail) = name.split_at(name.len() - zone.len());
                    head.ends_with(b".") && tail.eq_ignore_ascii_case(zone.as_bytes())
                }
            }
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(name) => f.write_str(name),
            NamePattern::Wildcard(zone) => write!(f, "*.{zone}"),
        }
    }
}

/// The ports a rule allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ports {
    /// Every port of every protocol (the entry had no `ports`).
    All,
    /// Sorted by protocol then first port, never empty, and no two ranges of one protocol
    /// overlap or touch, so each allowed port appears exactly once.
    Some(Vec<PortRange>),
}

impl Ports {
    /// The ports allowed by either side, e.g. for two rules that resolve to the same address.
    pub fn union(&self, other: &Ports) -> Ports {
        match (self, other) {
            (Ports::Some(a), Ports::Some(b)) => {
                Ports::Some(merge(a.iter().chain(b).copied().collect()))
            }
            _ => Ports::All,
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::All => f.write_str("any"),
            Ports::Some(ranges) => {
                for (i, range) in ranges.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    range.fmt(f)?;
                }
                Ok(())
            }
        }
    }
}

/// Ports `first..=last` of one protocol. The field order makes the derived `Ord` sort by
/// protocol, then first port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub proto: Proto,
    pub first: u16,
    /// Inclusive; for ICMP, which has no ports, both are 0.
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            Proto::Icmp => f.write_str("ICMP"),
            _ if self.first == self.last => write!(f, "{}:{}", self.proto, self.first),
            _ => write!(f, "{}:{}-{}", self.proto, self.first, self.last),
        }
    }
}

/// Transport protocol; HTTP and HTTPS in the file are TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP for IPv4 destinations, ICMPv6 for IPv6 ones.
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Icmp => "ICMP",
        })
    }
}

/// Why a policy file was refused. Each message is one line that starts with the file name.
///
/// Underlying errors are part of the message rather than `source()`, so they are printed once
/// in `{:#}` chains.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read (missing, unreadable or not UTF-8).
    #[error("{file}: cannot read: {error}")]
    Read { file: String, error: std::io::Error },
    /// Bad YAML or an unknown key; serde's message has the line and column.
    #[error("{file}: {error}")]
    Yaml {
        file: String,
        error: serde_norway::Error,
    },
    /// Well-formed YAML that the enforcer will not accept; `at` is e.g.
    /// `allow[2] (cidr 203.0.113.5/24)`.
    #[error("{file}: {at}: {problem}")]
    Invalid {
        file: String,
        at: String,
        problem: String,
    },
}

/// Reads and validates the policy file at `path`.
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &file),
        Err(error) => Err(PolicyError::Read { file, error }),
    }
}

/// Parses and validates policy YAML; `source` names the file in error messages.
pub fn parse(text: &str, source: &str) -> Result<Policy, PolicyError> {
    let raw: RawPolicy = serde_norway::from_str(text).map_err(|error| PolicyError::Yaml {
        file: source.to_string(),
        error,
    })?;
    let mode = match raw.mode {
        None => Mode::default(),
        Some(mode) => mode
            .parse()
            .map_err(|p: String| invalid(source, "mode", p))?,
    };
    let entries = match raw.allow {
        None => {
            return Err(invalid(
                source,
                "allow",
                "missing; list the destinations pods may reach (an empty allowlist would drop all egress)",
            ));
        }
        Some(entries) if entries.is_empty() => {
            return Err(invalid(
                source,
                "allow",
                "is empty, so all egress would be dropped; list at least one destination",
            ));
        }
        Some(entries) => entries,
    };

    let mut seen: HashMap<Target, usize> = HashMap::new();
    let mut rules = Vec::with_capacity(entries.len());
    for (entry, raw) in entries.into_iter().enumerate() {
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
        if let Some(first) = seen.insert(target.clone(), entry) {
            return Err(invalid(
                source,
                at,
                format!("repeats allow[{first}] ({target}); merge their ports into one entry"),
            ));
        }
        let ports = match raw.ports {
            None => Ports::All,
            Some(items) => {
                parse_ports(&items.unwrap_or_default()).map_err(|p| invalid(source, &at, p))?
            }
        };
        rules.push(Rule {
            target,
            ports,
            entry,
        });
    }
    Ok(Policy { mode, rules })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `mode` and `allow`")]
struct RawPolicy {
    mode: Option<String>,
    allow: Option<Vec<RawEntry>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `cidr` or `fqdn`, and optionally `ports`"
)]
struct RawEntry {
    cidr: Option<String>,
    fqdn: Option<String>,
    /// `Some(None)` is a bare `ports:`, which must not be mistaken for an omitted `ports`
    /// (every port).
    #[serde(default, deserialize_with = "present")]
    ports: Option<Option<Vec<String>>>,
}

/// Marks a key as present even when its value is null.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn invalid(file: &str, at: impl Into<String>, problem: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        file: file.to_string(),
        at: at.into(),
        problem: problem.into(),
    }
}

/// Parses a `cidr` value; a bare address is a single host.
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net = match text.split_once('/') {
        None => IpNet::from(
            text.parse::<IpAddr>()
                .map_err(|_| "not an IP address or CIDR".to_string())?,
        ),
        Some((addr, len)) => {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("`{addr}` is not an IP address"))?;
            if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("`/{len}` is not a prefix length"));
            }
            let max = if addr.is_ipv4() { 32 } else { 128 };
            len.parse()
                .ok()
                .and_then(|len| IpNet::new(addr, len).ok())
                .ok_or_else(|| {
                    format!("prefix /{len} is longer than the {max} bits of the address")
                })?
        }
    };
    if net.prefix_len() == 0 {
        let family = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(format!(
            "allows every {family} destination; the enforcer would admit everything"
        ));
    }
    // The kernel maps hold IPv4 addresses in their IPv4-mapped IPv6 form, so an IPv6 rule
    // over that range would quietly act as an IPv4 rule.
    if let IpNet::V6(v6) = net {
        let mapped = Ipv6Net::new_assert(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96);
        if v6.trunc().contains(&mapped) {
            return Err(format!(
                "contains the IPv4-mapped range {mapped}, so it would also allow every IPv4 destination"
            ));
        }
        if let Some(v4) = v6.addr().to_ipv4_mapped()
            && v6.prefix_len() > 96
        {
            return Err(format!(
                "is an IPv4-mapped IPv6 range; write the IPv4 form instead: {}",
                Ipv4Net::new_assert(v4, v6.prefix_len() - 96).trunc()
            ));
        }
    }
    if net != net.trunc() {
        return Err(format!("host bits are set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// Parses an `fqdn` value: a DNS name, or `*.` and a zone.
fn parse_fqdn(text: &str) -> Result<NamePattern, String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() {
        return Err("the name is empty".to_string());
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "an IP address is not a name; write it as `cidr: {name}`"
        ));
    }
    if name.len() > 253 {
        return Err(format!(
            "the name is {} characters long; DNS allows at most 253",
            name.len()
        ));
    }
    if name == "*" {
        return Err(
            "`*` alone would match every name; write `*.` and a zone, e.g. `*.example.com`"
                .to_string(),
        );
    }
    let wildcard = name.strip_prefix("*.");
    let zone = wildcard.unwrap_or(&name);
    if zone.is_empty() {
        return Err("`*.` needs a zone after it, e.g. `*.example.com`".to_string());
    }
    for label in zone.split('.') {
        if label.is_empty() {
            return Err("has an empty label (a leading dot or two dots in a row)".to_string());
        }
        if label.contains('*') {
            return Err(
                "`*` is only allowed as the whole first label, as in `*.example.com`".to_string(),
            );
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(format!(
                "character `{c}` is not allowed; use letters, digits, `-` and `_` (international names in their xn-- form)"
            ));
        }
        if label.len() > 63 {
            return Err(format!(
                "label `{label}` is {} characters long; DNS allows at most 63",
                label.len()
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label `{label}` starts or ends with `-`"));
        }
    }
    Ok(match wildcard {
        Some(zone) => NamePattern::Wildcard(zone.to_string()),
        None => NamePattern::Exact(name),
    })
}

/// Parses an entry's `ports`. Overlapping items are an error rather than merged: they are
/// almost always a typo or a leftover, and merging would hide it.
fn parse_ports(items: &[String]) -> Result<Ports, String> {
    if items.is_empty() {
        return Err("`ports` is empty; omit `ports` to allow every port".to_string());
    }
    let mut ranges = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_port(item).map(|range| (range, i)))
        .collect::<Result<Vec<_>, _>>()?;
    ranges.sort_unstable();
    // Sorted by first port, any overlap shows up between neighbours.
    for pair in ranges.windows(2) {
        let ((a, i), (b, j)) = (pair[0], pair[1]);
        if a.proto == b.proto && b.first <= a.last {
            let (i, j) = (i.min(j), i.max(j));
            return Err(format!(
                "ports `{}` and `{}` overlap; list each port once",
                items[i], items[j]
            ));
        }
    }
    Ok(Ports::Some(merge(
        ranges.into_iter().map(|(range, _)| range).collect(),
    )))
}

/// Parses one `ports` item: `TCP:443`, `https:443`, `UDP:1000-2000` or `ICMP`.
fn parse_port(item: &str) -> Result<PortRange, String> {
    let (name, spec) = match item.split_once(':') {
        Some((name, spec)) => (name, Some(spec)),
        None => (item, None),
    };
    let proto = match name.to_ascii_lowercase().as_str() {
        "tcp" | "http" | "https" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        _ if spec.is_none() && !item.is_empty() && item.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(format!(
                "port `{item}` has no protocol; write TCP:{item} or UDP:{item}"
            ));
        }
        _ => {
            return Err(format!(
                "unknown protocol in `{item}`; expected TCP, UDP, HTTP, HTTPS or ICMP"
            ));
        }
    };
    match (proto, spec) {
        (Proto::Icmp, None) => Ok(PortRange {
            proto,
            first: 0,
            last: 0,
        }),
        (Proto::Icmp, Some(_)) => Err(format!("`{item}`: ICMP has no ports; write just ICMP")),
        (_, None) => Err(format!("`{item}` has no port; write e.g. {name}:443")),
        (_, Some(spec)) => {
            let (first, last) = match spec.split_once('-') {
                Some((first, last)) => (port_number(first, item)?, port_number(last, item)?),
                None => {
                    let port = port_number(spec, item)?;
                    (port, port)
                }
            };
            if first > last {
                return Err(format!("`{item}`: the range starts after it ends"));
            }
            Ok(PortRange { proto, first, last })
        }
    }
}

fn port_number(text: &str, item: &str) -> Result<u16, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{item}`: `{text}` is not a port number"));
    }
    match text.parse() {
        Ok(0) => Err(format!("`{item}`: port 0 is not a valid port")),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("`{item}`: port {text} is above 65535")),
    }
}

/// Sorts ranges and joins those of one protocol that overlap or touch.
fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_unstable();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last)
                if last.proto == range.proto
                    && u32::from(range.first) <= u32::from(last.last) + 1 =>
            {
                last.last = last.last.max(range.last);
            }
            _ => merged.push(range),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
mode: audit
allow:
  - cidr: 203.0.113.0/24
    ports: [HTTPS:443, UDP:123]
  - cidr: 2001:db8::/32
  - fqdn: mcr.microsoft.com
    ports: [HTTPS:443]
  - fqdn: "*.hcp.eastus.azmk8s.io"
    ports: [HTTPS:443, TCP:9000, UDP:1194]
  - cidr: 198.51.100.7
    ports: [ICMP]
"#;

    fn tcp(first: u16, last: u16) -> PortRange {
        PortRange {
            proto: Proto::Tcp,
            first,
            last,
        }
    }

    fn udp(first: u16, last: u16) -> PortRange {
        PortRange {
            proto: Proto::Udp,
            first,
            last,
        }
    }

    const ICMP: PortRange = PortRange {
        proto: Proto::Icmp,
        first: 0,
        last: 0,
    };

    /// Parses a policy with a single entry made of `entry` (YAML flow mapping content).
    fn one(entry: &str) -> Result<Policy, PolicyError> {
        parse(&format!("allow:\n  - {{{entry}}}\n"), "policy.yaml")
    }

    fn ports_of(entry: &str) -> Ports {
        one(entry).expect("valid policy").rules[0].ports.clone()
    }

    /// Asserts that `result` failed with a message naming the file, `at` and `phrase`.
    #[track_caller]
    fn assert_error(result: Result<Policy, PolicyError>, at: &str, phrase: &str) {
        let message = result.expect_err("policy should be refused").to_string();
        assert!(message.starts_with("policy.yaml: "), "{message}");
        assert!(message.contains(at), "missing {at:?} in {message}");
        assert!(message.contains(phrase), "missing {phrase:?} in {message}");
        assert!(!message.contains('\n'), "not one line: {message}");
    }

    #[track_caller]
    fn assert_entry_error(entry: &str, at: &str, phrase: &str) {
        assert_error(one(entry), at, phrase);
    }

    #[test]
    fn example_parses() {
        let policy = parse(EXAMPLE, "policy.yaml").expect("valid policy");
        let net = |s: &str| Target::Cidr(s.parse().expect("valid net"));
        let name = |s: &str| Target::Name(NamePattern::Exact(s.to_string()));
        let zone = |s: &str| Target::Name(NamePattern::Wildcard(s.to_string()));
        let rule = |entry, target, ports| Rule {
            target,
            ports,
            entry,
        };
        assert_eq!(
            policy,
            Policy {
                mode: Mode::Audit,
                rules: vec![
                    rule(
                        0,
                        net("203.0.113.0/24"),
                        Ports::Some(vec![tcp(443, 443), udp(123, 123)])
                    ),
                    rule(1, net("2001:db8::/32"), Ports::All),
                    rule(
                        2,
                        name("mcr.microsoft.com"),
                        Ports::Some(vec![tcp(443, 443)])
                    ),
                    rule(
                        3,
                        zone("hcp.eastus.azmk8s.io"),
                        Ports::Some(vec![tcp(443, 443), tcp(9000, 9000), udp(1194, 1194)])
                    ),
                    rule(4, net("198.51.100.7/32"), Ports::Some(vec![ICMP])),
                ],
            }
        );
    }

    #[test]
    fn rules_display_one_line_each() {
        let policy = parse(EXAMPLE, "policy.yaml").expect("valid policy");
        let lines: Vec<String> = policy.rules.iter().map(Rule::to_string).collect();
        assert_eq!(
            lines,
            [
                "203.0.113.0/24 TCP:443 UDP:123",
                "2001:db8::/32 any",
                "mcr.microsoft.com TCP:443",
                "*.hcp.eastus.azmk8s.io TCP:443 TCP:9000 UDP:1194",
                "198.51.100.7/32 ICMP",
            ]
        );
        let range = one("cidr: 10.0.0.0/8, ports: [TCP:30000-32767]").expect("valid policy");
        assert_eq!(range.rules[0].to_string(), "10.0.0.0/8 TCP:30000-32767");
    }

    #[test]
    fn mode_defaults_to_audit_and_accepts_enforce() {
        let policy = parse("allow: [{cidr: 10.0.0.0/8}]", "policy.yaml").expect("valid policy");
        assert_eq!(policy.mode, Mode::Audit);
        let policy = parse("mode: enforce\nallow: [{cidr: 10.0.0.0/8}]", "policy.yaml")
            .expect("valid policy");
        assert_eq!(policy.mode, Mode::Enforce);
    }

    #[test]
    fn mode_from_str_and_display() {
        assert_eq!("audit".parse(), Ok(Mode::Audit));
        assert_eq!("enforce".parse(), Ok(Mode::Enforce));
        assert_eq!(Mode::Audit.to_string(), "audit");
        assert_eq!(Mode::Enforce.to_string(), "enforce");
        let message = "block".parse::<Mode>().expect_err("not a mode");
        assert!(message.contains("`audit` or `enforce`"), "{message}");
    }

    #[test]
    fn ports_are_sorted_and_merged() {
        assert_eq!(
            ports_of("cidr: 10.0.0.0/8, ports: [UDP:53, TCP:81, ICMP, TCP:80, TCP:82-90, TCP:1-5]"),
            Ports::Some(vec![tcp(1, 5), tcp(80, 90), udp(53, 53), ICMP])
        );
    }

    #[test]
    fn http_and_https_are_tcp() {
        assert_eq!(
            ports_of("cidr: 10.0.0.0/8, ports: [HTTP:80, HTTPS:8443]"),
            Ports::Some(vec![tcp(80, 80), tcp(8443, 8443)])
        );
    }

    #[test]
    fn protocols_are_case_insensitive() {
        assert_eq!(
            ports_of("cidr: 10.0.0.0/8, ports: [https:443, Tcp:80, uDp:53, icmp]"),
            Ports::Some(vec![tcp(80, 80), tcp(443, 443), udp(53, 53), ICMP])
        );
    }

    #[test]
    fn bare_addresses_are_single_hosts() {
        let policy = parse(
            "allow: [{cidr: 198.51.100.7}, {cidr: '2001:db8::1'}]",
            "policy.yaml",
        )
        .expect("valid policy");
        assert_eq!(policy.rules[0].target.to_string(), "198.51.100.7/32");
        assert_eq!(policy.rules[1].target.to_string(), "2001:db8::1/128");
    }

    #[test]
    fn names_are_normalised() {
        let policy = parse(
            "allow: [{fqdn: MCR.Microsoft.COM.}, {fqdn: '*.com'}, {fqdn: _sip._udp.example.com}]",
            "policy.yaml",
        )
        .expect("valid policy");
        let targets: Vec<String> = policy.rules.iter().map(|r| r.target.to_string()).collect();
        assert_eq!(
            targets,
            ["mcr.microsoft.com", "*.com", "_sip._udp.example.com"]
        );
    }

    #[test]
    fn name_pattern_matches() {
        let exact = NamePattern::Exact("mcr.microsoft.com".to_string());
        let zone = NamePattern::Wildcard("hcp.eastus.azmk8s.io".to_string());
        let table = [
            (&exact, "mcr.microsoft.com", true),
            (&exact, "MCR.Microsoft.Com", true),
            (&exact, "mcr.microsoft.com.", true),
            (&exact, "x.mcr.microsoft.com", false),
            (&exact, "microsoft.com", false),
            (&zone, "a.hcp.eastus.azmk8s.io", true),
            (&zone, "a.b.hcp.eastus.azmk8s.io", true),
            (&zone, "A.HCP.EastUS.azmk8s.io", true),
            (&zone, "a.hcp.eastus.azmk8s.io.", true),
            (&zone, "hcp.eastus.azmk8s.io", false),
            (&zone, "hcp.eastus.azmk8s.io.", false),
            (&zone, "xhcp.eastus.azmk8s.io", false),
            (&zone, ".hcp.eastus.azmk8s.io", false),
            (&zone, "a.hcp.eastus.azmk8s.io.evil", false),
            (&zone, "ä.hcp.eastus.azmk8s.io", true),
            (&zone, "", false),
        ];
        for (pattern, name, expected) in table {
            assert_eq!(pattern.matches(name), expected, "{pattern} vs {name:?}");
        }
    }

    #[test]
    fn ports_union() {
        let a = Ports::Some(vec![tcp(80, 80), udp(53, 53)]);
        let b = Ports::Some(vec![tcp(81, 90), tcp(443, 443), ICMP]);
        assert_eq!(
            a.union(&b),
            Ports::Some(vec![tcp(80, 90), tcp(443, 443), udp(53, 53), ICMP])
        );
        assert_eq!(a.union(&a), a);
        assert_eq!(a.union(&Ports::All), Ports::All);
        assert_eq!(Ports::All.union(&b), Ports::All);
    }

    #[test]
    fn load_reads_the_file_and_names_it_in_errors() {
        let path = std::env::temp_dir().join(format!("policy-test-{}.yaml", std::process::id()));
        std::fs::write(&path, EXAMPLE).expect("write temp file");
        let loaded = load(&path);
        std::fs::remove_file(&path).expect("remove temp file");
        assert_eq!(loaded.expect("valid policy").rules.len(), 5);

        let message = load(&path).expect_err("file is gone").to_string();
        assert!(
            message.starts_with(&path.display().to_string()),
            "{message}"
        );
        assert!(message.contains("cannot read"), "{message}");
    }

    // Error paths: one test each.

    #[test]
    fn yaml_syntax_error_has_line_and_column() {
        assert_error(
            parse("mode: audit\nallow: [\n", "policy.yaml"),
            "line 3 column 1",
            "did not find expected node content",
        );
    }

    #[test]
    fn unknown_top_level_key() {
        assert_error(
            parse("allow: [{cidr: 10.0.0.0/8}]\nallowed: []\n", "policy.yaml"),
            "policy.yaml",
            "unknown field `allowed`",
        );
    }

    #[test]
    fn unknown_entry_key() {
        assert_error(
            parse(
                "allow:\n  - cidr: 10.0.0.0/8\n  - fqdn: example.com\n    port: [TCP:443]\n",
                "policy.yaml",
            ),
            "allow[1]",
            "unknown field `port`",
        );
    }

    #[test]
    fn top_level_not_a_mapping() {
        assert_error(
            parse("- cidr: 10.0.0.0/8\n", "policy.yaml"),
            "policy.yaml",
            "expected a mapping with `mode` and `allow`",
        );
    }

    #[test]
    fn missing_allow() {
        assert_error(parse("mode: enforce\n", "policy.yaml"), "allow", "missing");
        assert_error(parse("", "policy.yaml"), "allow", "missing");
    }

    #[test]
    fn empty_allow() {
        assert_error(
            parse("allow: []\n", "policy.yaml"),
            "allow",
            "all egress would be dropped",
        );
    }

    #[test]
    fn unknown_mode() {
        assert_error(
            parse("mode: block\nallow: [{cidr: 10.0.0.0/8}]", "policy.yaml"),
            "mode",
            "unknown mode `block`; expected `audit` or `enforce`",
        );
    }

    #[test]
    fn both_cidr_and_fqdn() {
        assert_entry_error(
            "cidr: 10.0.0.0/8, fqdn: example.com",
            "allow[0]",
            "has both `cidr` and `fqdn`",
        );
    }

    #[test]
    fn neither_cidr_nor_fqdn() {
        assert_entry_error(
            "ports: [TCP:443]",
            "allow[0]",
            "needs a `cidr` or an `fqdn`",
        );
        assert_error(
            parse("allow:\n  -\n", "policy.yaml"),
            "allow[0]",
            "needs a `cidr` or an `fqdn`",
        );
    }

    #[test]
    fn cidr_unparsable() {
        assert_entry_error(
            "cidr: example.com",
            "allow[0] (cidr example.com)",
            "not an IP address or CIDR",
        );
        assert_entry_error(
            "cidr: 10.0.0/8",
            "allow[0] (cidr 10.0.0/8)",
            "`10.0.0` is not an IP address",
        );
        assert_entry_error(
            "cidr: 10.0.0.0/x",
            "allow[0] (cidr 10.0.0.0/x)",
            "`/x` is not a prefix length",
        );
    }

    #[test]
    fn cidr_prefix_too_long() {
        assert_entry_error(
            "cidr: 10.0.0.0/33",
            "allow[0] (cidr 10.0.0.0/33)",
            "prefix /33 is longer than the 32 bits",
        );
        assert_entry_error(
            "cidr: '2001:db8::/129'",
            "allow[0] (cidr 2001:db8::/129)",
            "prefix /129 is longer than the 128 bits",
        );
        assert_entry_error(
            "cidr: 10.0.0.0/300",
            "allow[0] (cidr 10.0.0.0/300)",
            "prefix /300 is longer",
        );
    }

    #[test]
    fn cidr_host_bits_set() {
        assert_error(
            parse(
                "allow:\n  - fqdn: a.example\n  - fqdn: b.example\n  - cidr: 203.0.113.5/24\n",
                "policy.yaml",
            ),
            "allow[2] (cidr 203.0.113.5/24)",
            "host bits are set; did you mean 203.0.113.0/24?",
        );
        assert_entry_error(
            "cidr: '2001:db8::1/32'",
            "allow[0] (cidr 2001:db8::1/32)",
            "did you mean 2001:db8::/32?",
        );
    }

    #[test]
    fn cidr_ipv4_mapped() {
        assert_entry_error(
            "cidr: '::ffff:0:0/96'",
            "allow[0] (cidr ::ffff:0:0/96)",
            "contains the IPv4-mapped range ::ffff:0.0.0.0/96, so it would also allow every IPv4 destination",
        );
        assert_entry_error(
            "cidr: '::ffff:192.0.2.0/120'",
            "allow[0] (cidr ::ffff:192.0.2.0/120)",
            "is an IPv4-mapped IPv6 range; write the IPv4 form instead: 192.0.2.0/24",
        );
        assert_entry_error(
            "cidr: '::ffff:192.0.2.7'",
            "allow[0] (cidr ::ffff:192.0.2.7)",
            "write the IPv4 form instead: 192.0.2.7/32",
        );
        assert_entry_error(
            "cidr: '::ffff:192.0.2.7/100'",
            "allow[0]",
            "write the IPv4 form instead: 192.0.0.0/4",
        );
    }

    #[test]
    fn cidr_containing_ipv4_mapped_range() {
        for cidr in ["::/80", "::/8", "::ffff:0:0/88", "::1/64"] {
            assert_entry_error(
                &format!("cidr: '{cidr}'"),
                &format!("allow[0] (cidr {cidr})"),
                "so it would also allow every IPv4 destination",
            );
        }
        assert!(one("cidr: '::/97'").is_ok());
        assert!(one("cidr: '64:ff9b::/96'").is_ok());
    }

    #[test]
    fn cidr_everything() {
        assert_entry_error(
            "cidr: 0.0.0.0/0",
            "allow[0] (cidr 0.0.0.0/0)",
            "allows every IPv4 destination; the enforcer would admit everything",
        );
        assert_entry_error(
            "cidr: 10.1.2.3/0",
            "allow[0] (cidr 10.1.2.3/0)",
            "allows every IPv4 destination",
        );
        assert_entry_error(
            "cidr: '::/0'",
            "allow[0] (cidr ::/0)",
            "allows every IPv6 destination; the enforcer would admit everything",
        );
    }

    #[test]
    fn fqdn_empty() {
        assert_entry_error("fqdn: ''", "allow[0] (fqdn )", "the name is empty");
        assert_entry_error("fqdn: '.'", "allow[0] (fqdn .)", "the name is empty");
    }

    #[test]
    fn fqdn_too_long() {
        let name = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62),
        ]
        .join(".");
        assert_eq!(name.len(), 254);
        assert_entry_error(
            &format!("fqdn: {name}"),
            "allow[0] (fqdn aaa",
            "the name is 254 characters long; DNS allows at most 253",
        );
        let fits = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert!(one(&format!("fqdn: {fits}.")).is_ok());
    }

    #[test]
    fn fqdn_empty_label() {
        assert_entry_error(
            "fqdn: a..example.com",
            "allow[0] (fqdn a..example.com)",
            "empty label",
        );
        assert_entry_error("fqdn: .example.com", "allow[0]", "empty label");
    }

    #[test]
    fn fqdn_label_too_long() {
        let label = "x".repeat(64);
        assert_entry_error(
            &format!("fqdn: {label}.example.com"),
            "allow[0] (fqdn xxx",
            "is 64 characters long; DNS allows at most 63",
        );
    }

    #[test]
    fn fqdn_bad_character() {
        assert_entry_error(
            "fqdn: 'exa mple.com'",
            "allow[0] (fqdn exa mple.com)",
            "character ` ` is not allowed",
        );
        assert_entry_error("fqdn: bücher.example", "allow[0]", "xn--");
        assert_entry_error(
            "fqdn: 'https://example.com'",
            "allow[0]",
            "character `:` is not allowed",
        );
    }

    #[test]
    fn fqdn_hyphen_at_label_edge() {
        assert_entry_error(
            "fqdn: -a.example.com",
            "allow[0] (fqdn -a.example.com)",
            "label `-a` starts or ends with `-`",
        );
        assert_entry_error(
            "fqdn: a.example-.com",
            "allow[0]",
            "label `example-` starts or ends with `-`",
        );
    }

    #[test]
    fn fqdn_misplaced_star() {
        for name in [
            "a.*.example.com",
            "*a.example.com",
            "**.example.com",
            "*.*.example.com",
            "example.*",
        ] {
            assert_entry_error(
                &format!("fqdn: '{name}'"),
                &format!("allow[0] (fqdn {name})"),
                "`*` is only allowed as the whole first label",
            );
        }
    }

    #[test]
    fn fqdn_star_alone() {
        assert_entry_error(
            "fqdn: '*'",
            "allow[0] (fqdn *)",
            "`*` alone would match every name",
        );
        assert_entry_error(
            "fqdn: '*.'",
            "allow[0] (fqdn *.)",
            "`*` alone would match every name",
        );
    }

    #[test]
    fn fqdn_star_without_zone() {
        assert_entry_error("fqdn: '*..'", "allow[0] (fqdn *..)", "`*.` needs a zone");
    }

    #[test]
    fn fqdn_ip_literal() {
        assert_entry_error(
            "fqdn: 203.0.113.7",
            "allow[0] (fqdn 203.0.113.7)",
            "write it as `cidr: 203.0.113.7`",
        );
        assert_entry_error("fqdn: '2001:db8::1'", "allow[0]", "`cidr: 2001:db8::1`");
    }

    #[test]
    fn ports_empty() {
        assert_entry_error(
            "cidr: 10.0.0.0/8, ports: []",
            "allow[0] (cidr 10.0.0.0/8)",
            "`ports` is empty; omit `ports` to allow every port",
        );
        assert_error(
            parse("allow:\n  - cidr: 10.0.0.0/8\n    ports:\n", "policy.yaml"),
            "allow[0] (cidr 10.0.0.0/8)",
            "`ports` is empty",
        );
    }

    #[test]
    fn ports_unknown_protocol() {
        assert_entry_error(
            "fqdn: example.com, ports: [SCTP:9]",
            "allow[0] (fqdn example.com)",
            "unknown protocol in `SCTP:9`",
        );
    }

    #[test]
    fn ports_without_protocol() {
        assert_entry_error(
            "fqdn: example.com, ports: [443]",
            "allow[0] (fqdn example.com)",
            "port `443` has no protocol; write TCP:443 or UDP:443",
        );
    }

    #[test]
    fn ports_without_port() {
        assert_entry_error(
            "fqdn: example.com, ports: [TCP]",
            "allow[0] (fqdn example.com)",
            "`TCP` has no port",
        );
    }

    #[test]
    fn ports_not_a_number() {
        assert_entry_error(
            "fqdn: example.com, ports: [TCP:https]",
            "allow[0] (fqdn example.com)",
            "`TCP:https`: `https` is not a port number",
        );
        assert_entry_error(
            "fqdn: example.com, ports: ['TCP:']",
            "allow[0]",
            "is not a port number",
        );
        assert_entry_error(
            "fqdn: example.com, ports: [TCP:+80]",
            "allow[0]",
            "is not a port number",
        );
    }

    #[test]
    fn ports_zero() {
        assert_entry_error(
            "fqdn: example.com, ports: [UDP:0]",
            "allow[0] (fqdn example.com)",
            "port 0 is not a valid port",
        );
    }

    #[test]
    fn ports_too_large() {
        assert_entry_error(
            "fqdn: example.com, ports: [TCP:65536]",
            "allow[0] (fqdn example.com)",
            "port 65536 is above 65535",
        );
        assert_entry_error(
            "fqdn: example.com, ports: [TCP:1-99999999999999999999999]",
            "allow[0]",
            "is above 65535",
        );
    }

    #[test]
    fn ports_reversed_range() {
        assert_entry_error(
            "fqdn: example.com, ports: [TCP:2000-1000]",
            "allow[0] (fqdn example.com)",
            "`TCP:2000-1000`: the range starts after it ends",
        );
    }

    #[test]
    fn ports_icmp_with_port() {
        assert_entry_error(
            "cidr: 10.0.0.0/8, ports: [ICMP:5]",
            "allow[0] (cidr 10.0.0.0/8)",
            "`ICMP:5`: ICMP has no ports",
        );
    }

    #[test]
    fn ports_duplicate() {
        assert_entry_error(
            "fqdn: example.com, ports: [TCP:443, UDP:53, TCP:443]",
            "allow[0] (fqdn example.com)",
            "ports `TCP:443` and `TCP:443` overlap",
        );
        assert_entry_error(
            "fqdn: example.com, ports: [HTTPS:443, TCP:443]",
            "allow[0]",
            "ports `HTTPS:443` and `TCP:443` overlap",
        );
        assert_entry_error(
            "cidr: 10.0.0.0/8, ports: [ICMP, icmp]",
            "allow[0]",
            "ports `ICMP` and `icmp` overlap",
        );
    }

    #[test]
    fn ports_overlapping_ranges() {
        assert_entry_error(
            "fqdn: example.com, ports: [TCP:30000-32767, UDP:31000, TCP:32000-40000]",
            "allow[0] (fqdn example.com)",
            "ports `TCP:30000-32767` and `TCP:32000-40000` overlap",
        );
        assert_entry_error(
            "fqdn: example.com, ports: [TCP:8080, TCP:8000-9000]",
            "allow[0]",
            "ports `TCP:8080` and `TCP:8000-9000` overlap",
        );
    }

    #[test]
    fn duplicate_cidr() {
        assert_error(
            parse(
                "allow:\n  - cidr: 203.0.113.0/24\n  - fqdn: a.example\n  - cidr: 198.51.100.7\n  - cidr: 203.0.113.0/24\n",
                "policy.yaml",
            ),
            "allow[3] (cidr 203.0.113.0/24)",
            "repeats allow[0] (203.0.113.0/24); merge their ports into one entry",
        );
        assert_error(
            parse(
                "allow: [{cidr: 198.51.100.7}, {cidr: 198.51.100.7/32}]",
                "policy.yaml",
            ),
            "allow[1] (cidr 198.51.100.7/32)",
            "repeats allow[0]",
        );
    }

    #[test]
    fn duplicate_name() {
        assert_error(
            parse(
                "allow: [{fqdn: mcr.microsoft.com}, {fqdn: MCR.microsoft.com.}]",
                "policy.yaml",
            ),
            "allow[1] (fqdn MCR.microsoft.com.)",
            "repeats allow[0] (mcr.microsoft.com)",
        );
        assert_error(
            parse(
                "allow: [{fqdn: '*.Example.com'}, {fqdn: '*.example.com.'}]",
                "policy.yaml",
            ),
            "allow[1] (fqdn *.example.com.)",
            "repeats allow[0] (*.example.com)",
        );
    }

    #[test]
    fn contradictory_entries() {
        assert_error(
            parse(
                "allow:\n  - fqdn: example.com\n    ports: [TCP:443]\n  - fqdn: example.com\n",
                "policy.yaml",
            ),
            "allow[1] (fqdn example.com)",
            "repeats allow[0]",
        );
    }

    #[test]
    fn exact_name_and_wildcard_of_it_are_distinct() {
        assert!(
            parse(
                "allow: [{fqdn: example.com}, {fqdn: '*.example.com'}]",
                "policy.yaml"
            )
            .is_ok()
        );
    }
}

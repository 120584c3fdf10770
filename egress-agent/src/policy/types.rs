//! The validated policy's values: mode, rules, targets, ports and DNS settings.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use egress_common::LEARNED_MAX_ENTRIES;
use ipnet::IpNet;

use super::prefix_list::PrefixList;
use super::syntax::merge;

/// What the enforcer does with traffic the policy does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
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
    /// One rule per target: the `allow` entries in file order, then what `presets`,
    /// `api_server` and `cluster_cidrs` add.
    pub rules: Vec<Rule>,
    /// The `cidrs_from` entries, in file order: CIDR rules too, kept compact.
    pub lists: Vec<PrefixList>,
    pub dns: DnsSettings,
    /// What `check` says about the policy beside its rules, and the agent logs on loading
    /// it: what a preset did with the API server name, and doubtful but valid entries.
    pub notices: Vec<Notice>,
}

/// A remark on a valid policy: a warning when it admits more than its author may think.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    /// The part of the policy it is about, e.g. `presets[0] (aks-global)`.
    pub at: String,
    pub text: String,
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.warning { "warning" } else { "note" };
        write!(f, "{kind}: {}: {}", self.at, self.text)
    }
}

/// Traffic to `target` on `ports` is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    pub ports: Ports,
    /// Where the rule comes from, so messages can point back into the file. Never empty;
    /// more than one when presets, `api_server` or `cluster_cidrs` repeat a target and their
    /// ports were merged into one rule.
    pub origins: Vec<Origin>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.target, self.ports)
    }
}

/// The part of the policy a rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The `allow` entry with this index.
    Allow(usize),
    /// A row of this built-in preset's table.
    Preset { name: &'static str },
    /// `api_server`: the article's network rules to the API server.
    ApiServer,
    /// The `cluster_cidrs` entry with this index.
    ClusterCidr(usize),
    /// An Azure platform address that the cloud presets add.
    Platform,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Allow(i) => write!(f, "allow[{i}]"),
            Origin::Preset { name } => write!(f, "preset {name}"),
            Origin::ApiServer => f.write_str("api_server"),
            Origin::ClusterCidr(i) => write!(f, "cluster_cidrs[{i}]"),
            Origin::Platform => f.write_str("azure platform"),
        }
    }
}

/// The rules as `check` and `presets show` print them: one per line, the target and its
/// ports, then where the rule comes from as a comment.
pub fn rule_lines(rules: &[Rule]) -> Vec<String> {
    let width = rules
        .iter()
        .map(|r| r.to_string().len())
        .max()
        .unwrap_or_default();
    rules
        .iter()
        .map(|rule| {
            let origins: Vec<String> = rule.origins.iter().map(Origin::to_string).collect();
            format!("{:width$}  # {}", rule.to_string(), origins.join(", "))
        })
        .collect()
}

/// The `dns` section: which resolvers' answers teach addresses for `fqdn` rules, and bounds
/// on what is learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Trusted resolvers; `None` means the node's nameservers (see `dns::resolvers`).
    pub resolvers: Option<Vec<IpAddr>>,
    /// Seconds a learned address stays allowed at least, whatever the answer's TTL.
    pub min_ttl: u32,
    /// Seconds a learned address stays allowed at most without a fresh answer.
    pub max_ttl: u32,
    pub max_ips_per_name: u32,
    /// Also the size of the kernel map of learned addresses (see `egress_common::LEARNED_LIMIT`).
    pub max_ips: u32,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            resolvers: None,
            min_ttl: 30,
            max_ttl: 86_400,
            max_ips_per_name: 64,
            max_ips: LEARNED_MAX_ENTRIES,
        }
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

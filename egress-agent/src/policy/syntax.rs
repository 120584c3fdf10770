//! One token of the policy file: a CIDR, a name pattern, a port item.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::types::{NamePattern, PortRange, Ports, Proto};

/// Parses a `cidr` value; a bare address is a single host.
pub(super) fn parse_cidr(text: &str) -> Result<IpNet, String> {
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
pub(crate) fn parse_fqdn(text: &str) -> Result<NamePattern, String> {
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
pub(crate) fn parse_ports(items: &[impl AsRef<str>]) -> Result<Ports, String> {
    if items.is_empty() {
        return Err("`ports` is empty; omit `ports` to allow every port".to_string());
    }
    let mut ranges = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_port(item.as_ref()).map(|range| (range, i)))
        .collect::<Result<Vec<_>, _>>()?;
    ranges.sort_unstable();
    // Sorted by first port, any overlap shows up between neighbours.
    for pair in ranges.windows(2) {
        let ((a, i), (b, j)) = (pair[0], pair[1]);
        if a.proto == b.proto && b.first <= a.last {
            let (i, j) = (i.min(j), i.max(j));
            return Err(format!(
                "ports `{}` and `{}` overlap; list each port once",
                items[i].as_ref(),
                items[j].as_ref()
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
        (_, Some(spec)) if spec.starts_with('-') => Err(format!(
            "`{item}`: `{spec}` is not a port number; ports run from 1 to 65535"
        )),
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
pub fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
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

//! Which resolvers are trusted.
use std::{fs, net::IpAddr, path::Path};

use anyhow::{Context as _, bail};

use super::resolv_conf::system_resolvers;
use crate::policy::DnsSettings;

/// Where systemd-resolved lists the upstream servers it forwards to. On nodes whose
/// `/etc/resolv.conf` names only its loopback stub (127.0.0.53), those upstreams are what
/// the kernel learns from: resolved's own queries leave from the host and are snooped.
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The policy's own list, as [`Trusted::source`] names it.
pub const FROM_POLICY: &str = "dns.resolvers";

/// The trusted resolvers, and where they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted {
    pub addrs: Vec<IpAddr>,
    /// [`FROM_POLICY`], or the file they were read from.
    pub source: &'static str,
}

/// The trusted resolvers: the policy's `dns.resolvers`, else the node's nameservers (without
/// loopback), else systemd-resolved's upstreams.
pub fn trusted(dns: &DnsSettings) -> anyhow::Result<Trusted> {
    if let Some(list) = &dns.resolvers {
        return Ok(Trusted {
            addrs: list.clone(),
            source: FROM_POLICY,
        });
    }
    for file in [RESOLV_CONF, RESOLVED_UPSTREAMS] {
        if let Some(found) = read(Path::new(file))?
            && !found.is_empty()
        {
            return Ok(Trusted {
                addrs: found,
                source: file,
            });
        }
    }
    bail!(
        "no trusted DNS resolver: {RESOLV_CONF} and {RESOLVED_UPSTREAMS} name none that is not loopback; set dns.resolvers in the policy"
    )
}

/// The trusted resolvers for a policy; none found is an error only when the policy has
/// names to learn.
pub fn for_policy(dns: &DnsSettings, has_names: bool) -> anyhow::Result<Vec<IpAddr>> {
    match trusted(dns) {
        Ok(Trusted { addrs, source }) => {
            log::info!(
                "trusted resolvers (from {source}): {}",
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(addrs)
        }
        Err(e) if !has_names => {
            log::warn!("{e:#}; DNS is then allowed only where a rule allows it");
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

fn read(path: &Path) -> anyhow::Result<Option<Vec<IpAddr>>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(system_resolvers(&text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policys_resolvers_win() {
        let dns = DnsSettings {
            resolvers: Some(vec!["198.51.100.53".parse().expect("literal")]),
            ..DnsSettings::default()
        };
        assert_eq!(
            trusted(&dns).expect("resolvers"),
            Trusted {
                addrs: vec!["198.51.100.53".parse::<IpAddr>().expect("literal")],
                source: FROM_POLICY
            }
        );
    }
}

//! `egress-agent explain ADDR PORT`: would a new connection from the enforced cgroup to
//! ADDR:PORT pass, by which entry of the live (pinned) maps, or why not: the kernel's
//! decision (`classify`) with the policy entries behind it (`origins`).
use std::{fmt::Write as _, net::IpAddr};

use anyhow::bail;
use egress_common::proto;
use serde::Serialize;

use crate::{
    classify::{Allowed, Classified, classify},
    kubeconfig::KubeletApiServer,
    origins::{self, Origins},
    pin::PinRoot,
    pinned::{PinnedMaps, set_ports},
    status::recorded_policy,
    sys::boot_time_ns,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// The protocol asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub addr: String,
    pub proto: &'static str,
    pub port: u16,
    pub verdict: &'static str,
    /// Why a denial (`REASON_*` by name, as in events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// What allowed it, or what was found and did not.
    pub because: Vec<String>,
    /// The CIDR entry that matched, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Found>,
    /// The learned address, if any: the names it was learned through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned: Option<LearnedFound>,
}

#[derive(Debug, Serialize)]
pub struct Found {
    pub target: String,
    pub ports: String,
    pub from: Origins,
}

#[derive(Debug, Serialize)]
pub struct LearnedFound {
    pub ports: String,
    /// Seconds left; 0 once expired.
    pub ttl_secs: u64,
    pub names: Vec<LearnedName>,
}

#[derive(Debug, Serialize)]
pub struct LearnedName {
    pub name: String,
    pub ttl_secs: u64,
    pub from: Origins,
}

/// Asks the pinned maps about a new flow to `addr`:`port`.
pub fn explain(
    pins: &PinRoot,
    addr: IpAddr,
    port: u16,
    p: Proto,
    kubelet: Option<&KubeletApiServer>,
) -> anyhow::Result<Explanation> {
    let Some(maps) = PinnedMaps::open(pins)? else {
        bail!(
            "no maps of this agent's layout under {} (no agent ran with this --pin-root, or it was uninstalled)",
            pins.root().display()
        );
    };
    let addr = addr.to_canonical();
    let (ip_proto, port) = match (p, addr) {
        (Proto::Tcp, _) => (proto::TCP, port),
        (Proto::Udp, _) => (proto::UDP, port),
        (Proto::Icmp, IpAddr::V4(_)) => (proto::ICMP, 0),
        (Proto::Icmp, IpAddr::V6(_)) => (proto::ICMPV6, 0),
    };
    let now = boot_time_ns();
    let decided = classify(&maps, addr, ip_proto, port, now)?;
    let recorded = recorded_policy(pins, kubelet)?;
    let policy = recorded.policy;
    let sets = maps.port_sets()?;
    let cidr = decided.cidr.map(|c| Found {
        target: origins::cidr_of(&c),
        ports: set_ports(&sets, c.port_set).to_string(),
        from: policy
            .as_ref()
            .map(|p| origins::of_cidr(p, &recorded.changed, &c))
            .unwrap_or_default(),
    });
    let key = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let learned = decided.learned.map(|l| {
        let mut ports = set_ports(&sets, l.port_set);
        if l.extra_set != egress_common::NO_PORT_SET {
            ports = ports.union(&set_ports(&sets, l.extra_set));
        }
        let names = maps
            .learned_names()
            .remove(&key)
            .unwrap_or_default()
            .into_iter()
            .map(|(name, expires)| LearnedName {
                ttl_secs: expires.saturating_sub(now).div_ceil(NS_PER_SEC),
                from: policy
                    .as_ref()
                    .map(|p| origins::of_learned_name(p, &name))
                    .unwrap_or_default(),
                name,
            })
            .collect();
        LearnedFound {
            ports: ports.to_string(),
            ttl_secs: l.expires_ns.saturating_sub(now).div_ceil(NS_PER_SEC),
            names,
        }
    });
    Ok(Explanation {
        addr: addr.to_string(),
        proto: match p {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        },
        port,
        verdict: if decided.verdict.is_ok() {
            "allowed"
        } else {
            "denied"
        },
        reason: decided.verdict.err().map(|r| r.name()),
        because: because(&decided, cidr.as_ref(), learned.as_ref()),
        cidr,
        learned,
    })
}

/// The answer's sentences.
fn because(
    decided: &Classified,
    cidr: Option<&Found>,
    learned: Option<&LearnedFound>,
) -> Vec<String> {
    let mut out = Vec::new();
    match decided.verdict {
        Ok(Allowed::Implicit(i)) => {
            out.push(format!("implicit: {}", origins::implicit_text(i)));
            return out;
        }
        Ok(Allowed::Cidr) => {}
        Ok(Allowed::Learned) => {}
        Err(reason) => out.push(reason.describe().to_owned()),
    }
    if let Some(c) = cidr {
        out.push(format!(
            "CIDR rule {} allows {}  # {}",
            c.target,
            c.ports,
            c.from.text()
        ));
    }
    if let Some(l) = learned {
        let state = if l.ttl_secs == 0 {
            "expired".to_owned()
        } else {
            format!("{} s left", l.ttl_secs)
        };
        out.push(format!("learned address ({state}) allows {}", l.ports));
        for n in &l.names {
            out.push(format!(
                "  learned for {} ({} s left)  # {}",
                n.name,
                n.ttl_secs,
                n.from.text()
            ));
        }
    }
    out
}

/// The answer as `explain` prints it.
pub fn text(e: &Explanation) -> anyhow::Result<String> {
    let mut out = String::new();
    let port = if e.proto == "icmp" {
        String::new()
    } else {
        format!(" port {}", e.port)
    };
    write!(out, "{} {}{port}: {}", e.addr, e.proto, e.verdict)?;
    match e.reason {
        Some(reason) => writeln!(out, " ({reason})")?,
        None => writeln!(out)?,
    }
    for line in &e.because {
        writeln!(out, "  {line}")?;
    }
    Ok(out)
}

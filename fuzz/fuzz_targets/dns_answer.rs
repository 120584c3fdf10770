//! Arbitrary answers for the agent's DNS learner, as the kernel hands them over.
//!
//! The input is a DNS-over-TCP stream: messages, each after its 2-byte length. Each one
//! becomes a `DnsEvent` for `Learner::answer`, seven seconds after the one before, against
//! `LEARNED` and `PORTS` in memory. After every message:
//! - a message whose question name no rule allows has changed nothing;
//! - every address in `LEARNED` has exactly the ports of the names it was learned through,
//!   and each of those names is allowed; an entry the learner no longer accounts for (kept
//!   for an expiry the kernel may have extended) still has ports some allowed names give.
//!
//! What is allowed is decided here from the policy written out by hand (`EXACT`, `ZONES`)
//! and the question read off the wire, not with the agent's name table or DNS parser.
#![no_main]

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::OnceLock,
};

use egress_agent::{
    compile::compile,
    dns::learner::{LearnedStore, Learner},
    policy::{Policy, parse},
};
use egress_common::{
    Addr, DNS_MAX_LEARNED, DNS_MAX_PAYLOAD, DnsEvent, LearnedValue, NO_PORT_SET, PortKey, proto,
};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = "
allow:
  - fqdn: app.example.com
    ports: [HTTPS:443]
  - fqdn: \"*.hcp.eastus.example.net\"
    ports: [HTTPS:443, TCP:9000]
  - fqdn: api.hcp.eastus.example.net
    ports: [TCP:22]
  - fqdn: ntp.example.org
    ports: [UDP:123]
dns:
  min_ttl: 10
  max_ttl: 600
  max_ips_per_name: 3
  max_ips: 5
";

/// (protocol, port) pairs.
type Ports = BTreeSet<(u8, u16)>;

/// `POLICY`'s exact names and wildcard zones, each with its own ports.
const EXACT: &[(&str, &[(u8, u16)])] = &[
    ("app.example.com", &[(proto::TCP, 443)]),
    ("api.hcp.eastus.example.net", &[(proto::TCP, 22)]),
    ("ntp.example.org", &[(proto::UDP, 123)]),
];
const ZONES: &[(&str, &[(u8, u16)])] = &[(
    "hcp.eastus.example.net",
    &[(proto::TCP, 443), (proto::TCP, 9000)],
)];

const MAX_MESSAGES: usize = 16;
const NS_PER_SEC: u64 = 1_000_000_000;
const START: u64 = 1_000 * NS_PER_SEC;
const STEP: u64 = 7 * NS_PER_SEC;

fn policy() -> &'static Policy {
    static PARSED: OnceLock<Policy> = OnceLock::new();
    PARSED.get_or_init(|| parse(POLICY, "fuzz.yaml").expect("the policy parses"))
}

fn producible_ports() -> &'static [Ports] {
    static ALL: OnceLock<Vec<Ports>> = OnceLock::new();
    ALL.get_or_init(producible)
}

/// `LEARNED` and `PORTS`, in memory.
#[derive(Clone, Default, PartialEq)]
struct Maps {
    learned: HashMap<Addr, LearnedValue>,
    ports: HashSet<PortKey>,
}

impl LearnedStore for Maps {
    fn get(&self, addr: &Addr) -> Option<LearnedValue> {
        self.learned.get(addr).copied()
    }

    fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()> {
        self.learned.insert(*addr, *value);
        Ok(())
    }

    fn remove(&mut self, addr: &Addr) -> anyhow::Result<()> {
        self.learned.remove(addr);
        Ok(())
    }

    fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
        self.ports.extend(keys);
        Ok(())
    }

    fn remove_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
        for k in keys {
            self.ports.remove(k);
        }
        Ok(())
    }
}

impl Maps {
    /// The members of a port set.
    fn port_set(&self, id: u32) -> Ports {
        self.ports
            .iter()
            .filter(|k| k.port_set == id)
            .map(|k| (k.proto, k.port))
            .collect()
    }
}

fn labels(name: &str) -> Vec<&[u8]> {
    name.split('.').map(str::as_bytes).collect()
}

/// The ports a name (its lowercase labels) is allowed: those of its exact rule and of every
/// zone it is strictly inside. `None` when no rule allows it.
fn allowed_ports(name: &[&[u8]]) -> Option<Ports> {
    let exact = EXACT.iter().filter(|(n, _)| labels(n) == name);
    let zones = ZONES.iter().filter(|(z, _)| {
        let zone = labels(z);
        name.len() > zone.len() && name.ends_with(&zone)
    });
    let mut rules = exact.chain(zones).peekable();
    rules.peek()?;
    Some(rules.flat_map(|(_, ports)| ports.iter().copied()).collect())
}

/// The question name's labels, lowercase, as RFC 1035 reads them: compression pointers only
/// backwards, at most 255 bytes. `None` when the name cannot be read.
fn question_name(msg: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut labels = Vec::new();
    let mut at = 12;
    // A pointer must lead before everything read so far, so that the walk ends.
    let mut before = at;
    let mut wire_len = 1;
    loop {
        let len = *msg.get(at)?;
        match len & 0xc0 {
            0xc0 => {
                let target = usize::from(u16::from_be_bytes([len & 0x3f, *msg.get(at + 1)?]));
                if target >= before {
                    return None;
                }
                (at, before) = (target, target);
            }
            0 if len == 0 => return Some(labels),
            0 => {
                let label = msg.get(at + 1..at + 1 + usize::from(len))?;
                wire_len += label.len() + 1;
                if wire_len > 255 {
                    return None;
                }
                labels.push(label.to_ascii_lowercase());
                at += label.len() + 1;
            }
            _ => return None,
        }
    }
}

/// The messages of a DNS-over-TCP stream; the last one may be cut short.
fn messages(mut stream: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (len, rest) = stream.split_first_chunk::<2>()?;
        let (msg, rest) = rest.split_at(usize::from(u16::from_be_bytes(*len)).min(rest.len()));
        stream = rest;
        Some(msg)
    })
}

/// What the kernel hands over for `msg` (of which it reads at most `DNS_MAX_PAYLOAD` bytes).
fn event(msg: &[u8]) -> DnsEvent {
    let mut payload = [0; DNS_MAX_PAYLOAD];
    payload[..msg.len()].copy_from_slice(msg);
    DnsEvent {
        resolver: [0; 16],
        client: [0; 16],
        len: u16::try_from(msg.len()).expect("at most DNS_MAX_PAYLOAD"),
        learned: 0,
        _pad: 0,
        addrs: [[0; 16]; DNS_MAX_LEARNED],
        payload,
    }
}

/// Every union of the ports of some of the policy's names.
fn producible() -> Vec<Ports> {
    let names = EXACT
        .iter()
        .map(|(n, _)| n.to_string())
        .chain(ZONES.iter().map(|(z, _)| format!("x.{z}")));
    let each: Vec<Ports> = names
        .map(|n| allowed_ports(&labels(&n)).expect("a name of the policy"))
        .collect();
    (1..1u32 << each.len())
        .map(|subset| {
            (each.iter().enumerate())
                .filter(|(i, _)| subset & (1 << i) != 0)
                .flat_map(|(_, ports)| ports.iter().copied())
                .collect()
        })
        .collect()
}

/// Every address in `LEARNED` has exactly the ports of the allowed names it was learned
/// through, or, when the learner no longer accounts for it, ports that some names give.
fn check(learner: &Learner, maps: &Maps, producible: &[Ports]) {
    let names_of: HashMap<&Addr, Vec<(&str, u64)>> = (learner.learned())
        .map(|(addr, names)| (addr, names.collect()))
        .collect();
    for (addr, value) in &maps.learned {
        assert_eq!(
            value.extra_set, NO_PORT_SET,
            "only the kernel sets extra_set"
        );
        let ports = maps.port_set(value.port_set);
        let Some(names) = names_of.get(addr) else {
            assert!(producible.contains(&ports), "{addr:?} has ports {ports:?}");
            continue;
        };
        let mut want = Ports::new();
        for (name, _) in names {
            let ports = allowed_ports(&labels(name))
                .unwrap_or_else(|| panic!("{addr:?} learned through {name}, which no rule allows"));
            want.extend(ports);
        }
        assert_eq!(ports, want, "ports of {addr:?} ({names:?})");
    }
}

fuzz_target!(|stream: &[u8]| {
    let policy = policy();
    let compiled = compile(policy).expect("the policy compiles");
    let mut maps = Maps {
        learned: HashMap::new(),
        ports: compiled.port_sets.entries().copied().collect(),
    };
    let mut learner = Learner::new(compiled.names, compiled.port_sets, policy.dns.clone());
    for (i, msg) in messages(stream).take(MAX_MESSAGES).enumerate() {
        let msg = &msg[..msg.len().min(DNS_MAX_PAYLOAD)];
        let now = START + i as u64 * STEP;
        learner.expire(&mut maps, now).expect("in-memory maps");
        let before = maps.clone();
        let learned = learner.counters.learned;
        learner
            .answer(&mut maps, &event(msg), now)
            .expect("in-memory maps");
        let question = question_name(msg);
        let allowed = question
            .as_ref()
            .and_then(|q| allowed_ports(&q.iter().map(Vec::as_slice).collect::<Vec<_>>()));
        if allowed.is_none() {
            assert!(
                maps == before && learner.counters.learned == learned,
                "learned from an answer to {question:?}, which no rule allows"
            );
        }
        check(&learner, &maps, producible_ports());
    }
});

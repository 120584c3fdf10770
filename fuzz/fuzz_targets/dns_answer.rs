//! Arbitrary answers for the agent's DNS learner, after what the kernel wrote for them.
//!
//! The input is a DNS-over-TCP stream: messages, each after its 2-byte length, seven seconds
//! apart (so that learned addresses expire in between), against `LEARNED` and `PORTS` in
//! memory. The kernel, modelled here after `egress-ebpf/src/dns.rs`, learns from each
//! message as it comes, a second port set next to another name's included, and queues it
//! for the agent; the low two bits of the message's ID say when the agent reads the queue,
//! so that the kernel may run ahead of the learner. No answer is lost to a full ring: a
//! lost answer's second set stays until the learner next rewrites its entry, so the checks
//! below would not hold. Checked:
//! - a message whose question name no rule allows changes nothing when the learner gets it;
//! - every name an address is held through is allowed and has not expired;
//! - once the learner has been handed every queued message: no entry holds a second port
//!   set, every held address is in `LEARNED` with exactly the ports of its names, and an
//!   entry the learner no longer accounts for (kept for an expiry the kernel may have
//!   extended) still has ports some allowed names give.
//!
//! What is allowed is decided here from the policy written out by hand (`EXACT`, `ZONES`)
//! and the question read off the wire, not with the agent's name table or DNS parser.
#![no_main]

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::OnceLock,
};

use egress_agent::{
    compile::compile,
    dns::{
        answer::DnsAnswer,
        learner::{LearnedStore, Learner},
    },
    policy::{DnsSettings, Policy, parse},
};
use egress_common::{
    Addr, DNS_MAX_LEARNED, DNS_MAX_PAYLOAD, DnsEvent, LearnedValue, NO_PORT_SET, PortKey, proto,
    v4_mapped,
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

/// What the kernel's DNS walk (`egress-ebpf/src/dns.rs`) goes by.
const HEADER_LEN: usize = 12;
const FLAG_QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
/// Where a question name's root label can be at the latest (255 bytes of name).
const LAST_ROOT_AT: usize = HEADER_LEN + 254;
const MAX_ANSWER_STEPS: usize = 2 * DNS_MAX_LEARNED + 8;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

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

/// The kernel's DNS learning (`egress-ebpf/src/dns.rs`), every answer taken as solicited.
struct Kernel {
    /// The port set of each rule's ports, as `PORTS` holds it (`NAMES`'s values).
    sets: Vec<(Ports, u32)>,
    min_ttl: u32,
    max_ttl: u32,
}

impl Kernel {
    /// From `maps.ports` while it holds the policy's sets only, before the learner adds its
    /// unions.
    fn new(maps: &Maps, dns: &DnsSettings) -> Self {
        let ids: BTreeSet<u32> = maps.ports.iter().map(|k| k.port_set).collect();
        Self {
            sets: ids.into_iter().map(|id| (maps.port_set(id), id)).collect(),
            min_ttl: dns.min_ttl,
            max_ttl: dns.max_ttl,
        }
    }

    /// Learns from `msg` at `now`; returns the event for the agent, with the addresses
    /// written. (Every message is handed over here, even one the kernel would not send.)
    fn handle(&self, maps: &mut Maps, msg: &[u8], now: u64) -> DnsEvent {
        let mut ev = event(msg);
        if let Some((set, answers_at)) = self.question(msg) {
            for (addr, ttl) in walk(msg, answers_at) {
                self.remember(maps, addr, set, ttl, now);
                ev.addrs[usize::from(ev.learned)] = addr;
                ev.learned += 1;
            }
        }
        ev
    }

    /// The port set of the question name and where the answer records start, for a
    /// response to a standard query with one question whose name some rule allows. The
    /// name is read as the kernel reads it: no compression pointer, at most 255 bytes.
    fn question(&self, msg: &[u8]) -> Option<(u32, usize)> {
        let header = msg.get(..HEADER_LEN)?;
        if be16(header, 2) & (FLAG_QR | OPCODE_MASK) != FLAG_QR || be16(header, 4) != 1 {
            return None;
        }
        let mut name = Vec::new();
        let mut at = HEADER_LEN;
        loop {
            let len = usize::from(*msg.get(at)?);
            if at > LAST_ROOT_AT || len > 63 {
                return None;
            }
            if len == 0 {
                break;
            }
            name.push(msg.get(at + 1..at + 1 + len)?.to_ascii_lowercase());
            at += len + 1;
        }
        let ports = allowed_ports(&name.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
        let (_, set) = (self.sets.iter())
            .find(|(p, _)| *p == ports)
            .expect("a rule's ports are a set of PORTS");
        Some((*set, at + 5))
    }

    /// Writes `addr`, learned through a name with port set `set`: a live entry that allows
    /// other ports gets `set` as its second set (replacing an earlier second one) and keeps
    /// the later expiry; a missing or expired one is replaced.
    fn remember(&self, maps: &mut Maps, addr: Addr, set: u32, ttl: u32, now: u64) {
        let secs = ttl.max(self.min_ttl).min(self.max_ttl);
        let expires_ns = now + u64::from(secs) * NS_PER_SEC;
        (maps.learned.entry(addr))
            .and_modify(|v| v.teach(set, expires_ns, now))
            .or_insert(LearnedValue::new(set, expires_ns));
    }
}

/// The class IN A and AAAA addresses (whatever their owner) among the first
/// `DNS_MAX_LEARNED` answer records from `at`, with their TTLs, as the kernel's walk finds
/// them: it stops at a record it cannot read, and after `MAX_ANSWER_STEPS` steps, one per
/// record and one per label of an owner name that is not compressed.
fn walk(msg: &[u8], mut at: usize) -> Vec<(Addr, u32)> {
    let records = usize::from(be16(msg, 6)).min(DNS_MAX_LEARNED);
    let mut walked = 0;
    let mut found = Vec::new();
    for _ in 0..MAX_ANSWER_STEPS {
        if walked == records {
            break;
        }
        let Some(&len) = msg.get(at) else {
            break;
        };
        let rec = match len & 0xc0 {
            0xc0 => at + 2,
            0 if len == 0 => at + 1,
            0 => {
                at += usize::from(len) + 1;
                continue;
            }
            _ => break,
        };
        let Some(fixed) = msg.get(rec..rec + 10) else {
            break;
        };
        let data_at = rec + 10;
        let Some(data) = msg.get(data_at..data_at + usize::from(be16(fixed, 8))) else {
            break;
        };
        at = data_at + data.len();
        walked += 1;
        let addr = match (be16(fixed, 0), data.len()) {
            (TYPE_A, 4) => v4_mapped(data.try_into().expect("4 bytes")),
            (TYPE_AAAA, 16) => data.try_into().expect("16 bytes"),
            _ => continue,
        };
        if be16(fixed, 2) == CLASS_IN {
            let ttl = u32::from_be_bytes(fixed[4..8].try_into().expect("4 bytes"));
            found.push((addr, ttl));
        }
    }
    found
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
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

/// Hands every queued message to the learner at `now`; one whose question name no rule
/// allows must change nothing.
fn hand_over(learner: &mut Learner, maps: &mut Maps, queue: &mut VecDeque<DnsEvent>, now: u64) {
    while let Some(ev) = queue.pop_front() {
        let answer = DnsAnswer::from(&ev);
        let before = maps.clone();
        let learned = learner.counters.learned;
        learner.answer(maps, &answer, now).expect("in-memory maps");
        let question = question_name(answer.message);
        let allowed = question
            .as_ref()
            .and_then(|q| allowed_ports(&q.iter().map(Vec::as_slice).collect::<Vec<_>>()));
        if allowed.is_none() {
            assert!(
                *maps == before && learner.counters.learned == learned,
                "learned from an answer to {question:?}, which no rule allows"
            );
        }
    }
}

/// Every name an address is held through is allowed and has not expired at `now`. Once the
/// learner has been handed every message (`caught_up`), no entry has a second port set, and
/// each has exactly the ports of the names its address is held through, or, when the
/// learner no longer accounts for it, ports that some names give.
fn check(learner: &Learner, maps: &Maps, now: u64, caught_up: bool) {
    let mut held = HashMap::new();
    for (addr, names) in learner.learned() {
        let names: Vec<(&str, u64)> = names.collect();
        let mut ports = Ports::new();
        for (name, expires) in &names {
            assert!(
                *expires > now,
                "{addr:?} held through {name} past its expiry"
            );
            ports.extend(allowed_ports(&labels(name)).unwrap_or_else(|| {
                panic!("{addr:?} learned through {name}, which no rule allows")
            }));
        }
        held.insert(addr, (names, ports));
    }
    if !caught_up {
        return;
    }
    for (addr, (names, want)) in &held {
        let value = (maps.learned.get(*addr))
            .unwrap_or_else(|| panic!("{addr:?} ({names:?}) is not in LEARNED"));
        let ports = maps.port_set(value.port_set);
        assert_eq!(ports, *want, "ports of {addr:?} ({names:?})");
    }
    for (addr, value) in &maps.learned {
        // The kernel's second set stands for an answer still queued: once handled, the
        // answer explains it (its name's ports join the union) or takes it back.
        assert_eq!(
            value.extra_set, NO_PORT_SET,
            "{addr:?} keeps a second port set with every answer handled"
        );
        if !held.contains_key(addr) {
            let ports = maps.port_set(value.port_set);
            assert!(
                producible_ports().contains(&ports),
                "{addr:?} has ports {ports:?}"
            );
        }
    }
}

fuzz_target!(|stream: &[u8]| {
    let policy = policy();
    let compiled = compile(policy).expect("the policy compiles");
    let mut maps = Maps {
        learned: HashMap::new(),
        ports: compiled.port_sets.entries().copied().collect(),
    };
    let kernel = Kernel::new(&maps, &policy.dns);
    let mut learner = Learner::new(compiled.names, compiled.port_sets, policy.dns.clone());
    let mut queue = VecDeque::new();
    let mut now = START;
    for (i, msg) in messages(stream).take(MAX_MESSAGES).enumerate() {
        let msg = &msg[..msg.len().min(DNS_MAX_PAYLOAD)];
        now = START + i as u64 * STEP;
        learner.expire(&mut maps, now).expect("in-memory maps");
        // When the agent reads the ring of answers, and finds it empty (`drained`).
        match msg.get(1).map_or(0, |id| id & 3) {
            // After the kernel queued the message.
            0 => {
                queue.push_back(kernel.handle(&mut maps, msg, now));
                hand_over(&mut learner, &mut maps, &mut queue, now);
                learner.drained();
            }
            // Later: the message waits.
            1 => queue.push_back(kernel.handle(&mut maps, msg, now)),
            // Just before: the kernel queues the message after the agent found the ring
            // empty, before the agent says so.
            2 => {
                hand_over(&mut learner, &mut maps, &mut queue, now);
                queue.push_back(kernel.handle(&mut maps, msg, now));
                learner.drained();
            }
            // While the kernel queues the message, behind those the agent is handling.
            _ => {
                hand_over(&mut learner, &mut maps, &mut queue, now);
                queue.push_back(kernel.handle(&mut maps, msg, now));
                hand_over(&mut learner, &mut maps, &mut queue, now);
                learner.drained();
            }
        }
        check(&learner, &maps, now, queue.is_empty());
    }
    hand_over(&mut learner, &mut maps, &mut queue, now);
    learner.drained();
    check(&learner, &maps, now, true);
});

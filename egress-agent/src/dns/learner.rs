//! The agent's side of DNS learning: bookkeeping per (name, address), CNAME chains, port
//! unions, bounds and expiry. The kernel has usually written an answer's addresses already;
//! this makes `LEARNED` exactly what the answers justify.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use egress_common::{Addr, DnsEvent, LearnedValue, NO_PORT_SET, PortKey};
use hickory_proto::{
    op::{Message, MessageType},
    rr::{Name, RData},
};
use serde::Serialize;

use super::names::NameTable;
use crate::{
    compile::PortSets,
    policy::{DnsSettings, Ports},
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// CNAME links followed from the question name; longer chains are cut (and counted).
const MAX_CHAIN: usize = 16;

/// What the learner needs of the kernel maps (a trait, so the logic is tested without BPF).
pub trait LearnedStore {
    fn get(&self, addr: &Addr) -> Option<LearnedValue>;
    fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()>;
    fn remove(&mut self, addr: &Addr) -> anyhow::Result<()>;
    fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()>;
    fn remove_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()>;
}

/// Counters of what the agent did with the answers it was handed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LearnerCounters {
    pub answers: u64,
    pub learned: u64,
    pub malformed: u64,
    pub unmatched: u64,
    /// A/AAAA records not on the question's CNAME chain (taken back if the kernel had
    /// written them).
    pub off_chain: u64,
    pub evicted: u64,
    pub expired: u64,
}

/// The bookkeeping; the kernel maps are passed to each call, so one owner (the agent's
/// control task) holds both them and this.
pub struct Learner {
    names: NameTable,
    port_sets: PortSets,
    written_sets: HashSet<u32>,
    limits: DnsSettings,
    /// address -> (name it was learned through -> when that expires, boot-time ns)
    by_addr: HashMap<Addr, HashMap<String, u64>>,
    by_name: HashMap<String, HashSet<Addr>>,
    /// The port set each address's kernel entry was last written with.
    written: HashMap<Addr, u32>,
    pub counters: LearnerCounters,
}

fn lower_name(n: &Name) -> String {
    let s = n.to_lowercase().to_ascii();
    s.strip_suffix('.').unwrap_or(&s).to_owned()
}

impl Learner {
    pub fn new(names: NameTable, port_sets: PortSets, limits: DnsSettings) -> Self {
        Self {
            names,
            port_sets,
            written_sets: HashSet::new(),
            limits,
            by_addr: HashMap::new(),
            by_name: HashMap::new(),
            written: HashMap::new(),
            counters: LearnerCounters::default(),
        }
    }

    /// The port set registry, which a policy reload compiles into.
    pub fn port_sets(&self) -> &PortSets {
        &self.port_sets
    }

    /// Takes a reloaded policy's names, bounds and registry: addresses learned through names
    /// it no longer allows are taken back, the others get the new ports, and port sets
    /// nothing refers to any more leave the kernel.
    pub fn reload(
        &mut self,
        store: &mut impl LearnedStore,
        names: NameTable,
        port_sets: PortSets,
        limits: DnsSettings,
        policy_sets: &HashSet<u32>,
        now: u64,
    ) -> anyhow::Result<()> {
        self.names = names;
        self.port_sets = port_sets;
        self.limits = limits;
        let gone: Vec<String> = self
            .by_name
            .keys()
            .filter(|n| self.names.lookup(n).is_none())
            .cloned()
            .collect();
        let addrs: Vec<Addr> = self.by_addr.keys().copied().collect();
        for name in &gone {
            for addr in &addrs {
                self.forget(name, addr);
            }
        }
        for addr in addrs {
            self.sync(store, &addr, now, true)?;
        }
        let names: Vec<String> = self.by_name.keys().cloned().collect();
        for name in names {
            self.bound_name(store, &name, now)?;
        }
        self.bound_total(store, now)?;
        let mut keep: HashSet<u32> = self.written.values().copied().collect();
        keep.extend(policy_sets);
        let dropped = self.port_sets.retain(&keep);
        self.written_sets.retain(|id| keep.contains(id));
        store.remove_ports(&dropped)
    }

    /// Addresses currently learned, for `status` and tests.
    pub fn learned(&self) -> impl Iterator<Item = (&Addr, &HashMap<String, u64>)> {
        self.by_addr.iter()
    }

    fn expiry(&self, ttl: u32, now: u64) -> u64 {
        let secs = ttl.max(self.limits.min_ttl).min(self.limits.max_ttl);
        now + u64::from(secs) * NS_PER_SEC
    }

    /// Handles one answer the kernel learned from. Every address the kernel wrote that this
    /// answer does not justify (off the CNAME chain, or in an answer the agent cannot parse)
    /// is taken back, unless another answer justifies it.
    pub fn answer(
        &mut self,
        store: &mut impl LearnedStore,
        event: &DnsEvent,
        now: u64,
    ) -> anyhow::Result<()> {
        let justified = self.justify(store, event, now)?;
        let kernel = &event.addrs[..usize::from(event.learned).min(event.addrs.len())];
        for addr in kernel.iter().filter(|a| !justified.contains(*a)) {
            // Rewrites a tracked address without this answer's ports; removes the rest.
            self.sync(store, addr, now, true)?;
        }
        Ok(())
    }

    /// Learns what the answer justifies; returns those addresses.
    fn justify(
        &mut self,
        store: &mut impl LearnedStore,
        event: &DnsEvent,
        now: u64,
    ) -> anyhow::Result<HashSet<Addr>> {
        let mut changed = HashSet::new();
        let len = usize::from(event.len).min(event.payload.len());
        let Ok(msg) = Message::from_vec(&event.payload[..len]) else {
            self.counters.malformed += 1;
            return Ok(changed);
        };
        let [query] = msg.queries.as_slice() else {
            self.counters.malformed += 1;
            return Ok(changed);
        };
        if msg.metadata.message_type != MessageType::Response {
            self.counters.malformed += 1;
            return Ok(changed);
        }
        let qname = lower_name(&query.name);
        // A label holding a dot (`x\.zone`) is one label to DNS but would split into two
        // here; the kernel never matches such a name, and neither does the agent.
        if qname.contains('\\') || self.names.lookup(&qname).is_none() {
            self.counters.unmatched += 1;
            return Ok(changed);
        }
        self.counters.answers += 1;
        let chain = cname_chain(&msg, &qname);
        for record in &msg.answers {
            let addr: IpAddr = match &record.data {
                RData::A(a) => a.0.into(),
                RData::AAAA(a) => a.0.into(),
                _ => continue,
            };
            if !chain.contains(&lower_name(&record.name)) {
                self.counters.off_chain += 1;
                continue;
            }
            let key = to_key(addr);
            let expires = self.expiry(record.ttl, now);
            let entry = self.by_addr.entry(key).or_default();
            let at = entry.entry(qname.clone()).or_insert(0);
            *at = (*at).max(expires);
            self.by_name.entry(qname.clone()).or_default().insert(key);
            self.counters.learned += 1;
            changed.insert(key);
            log::debug!(
                "{}",
                serde_json::json!({
                    "event": "learned",
                    "name": qname,
                    "addr": addr.to_string(),
                    "ttl": record.ttl,
                    "ports": self.names.lookup(&qname).map(|(p, _)| p.to_string()),
                })
            );
        }
        self.bound_name(store, &qname, now)?;
        self.bound_total(store, now)?;
        for addr in &changed {
            self.sync(store, addr, now, false)?;
        }
        Ok(changed)
    }

    /// Drops (name, address) pairs whose TTL has run out.
    pub fn expire(&mut self, store: &mut impl LearnedStore, now: u64) -> anyhow::Result<()> {
        let due: Vec<Addr> = self
            .by_addr
            .iter()
            .filter(|(_, names)| names.values().any(|e| *e <= now))
            .map(|(a, _)| *a)
            .collect();
        for addr in due {
            self.sync(store, &addr, now, false)?;
        }
        Ok(())
    }

    /// At most `max_ips_per_name` addresses per name: the ones expiring first go.
    fn bound_name(
        &mut self,
        store: &mut impl LearnedStore,
        name: &str,
        now: u64,
    ) -> anyhow::Result<()> {
        let limit = self.limits.max_ips_per_name as usize;
        let Some(addrs) = self.by_name.get(name) else {
            return Ok(());
        };
        if addrs.len() <= limit {
            return Ok(());
        }
        let mut ranked: Vec<(u64, Addr)> = addrs
            .iter()
            .map(|a| (self.by_addr[a].get(name).copied().unwrap_or(0), *a))
            .collect();
        ranked.sort_unstable();
        let surplus = ranked.len() - limit;
        log::warn!(
            "{name}: more than {limit} addresses (dns.max_ips_per_name); evicting the {surplus} expiring first"
        );
        for (_, addr) in ranked.into_iter().take(surplus) {
            self.forget(name, &addr);
            self.counters.evicted += 1;
            self.sync(store, &addr, now, true)?;
        }
        Ok(())
    }

    /// At most `max_ips` addresses in all: the ones expiring first go.
    fn bound_total(&mut self, store: &mut impl LearnedStore, now: u64) -> anyhow::Result<()> {
        let limit = self.limits.max_ips as usize;
        if self.by_addr.len() <= limit {
            return Ok(());
        }
        let mut ranked: Vec<(u64, Addr)> = self
            .by_addr
            .iter()
            .map(|(a, names)| (names.values().copied().max().unwrap_or(0), *a))
            .collect();
        ranked.sort_unstable();
        let surplus = ranked.len() - limit;
        log::warn!(
            "more than {limit} learned addresses (dns.max_ips); evicting the {surplus} expiring first"
        );
        for (_, addr) in ranked.into_iter().take(surplus) {
            let names: Vec<String> = self
                .by_addr
                .get(&addr)
                .map(|n| n.keys().cloned().collect())
                .unwrap_or_default();
            for name in names {
                self.forget(&name, &addr);
            }
            self.counters.evicted += 1;
            self.sync(store, &addr, now, true)?;
        }
        Ok(())
    }

    fn forget(&mut self, name: &str, addr: &Addr) {
        if let Some(names) = self.by_addr.get_mut(addr) {
            names.remove(name);
        }
        if let Some(addrs) = self.by_name.get_mut(name) {
            addrs.remove(addr);
            if addrs.is_empty() {
                self.by_name.remove(name);
            }
        }
    }

    /// Makes the kernel's entry for `addr` what the bookkeeping says: the union of the ports
    /// of every name it is still valid for, until the last of them expires. Otherwise a
    /// later expiry and a second port set written by the kernel (from an answer still queued
    /// for the agent) are kept; `evicting` (taking something back) drops them, and removes
    /// the entry outright when no name is left.
    fn sync(
        &mut self,
        store: &mut impl LearnedStore,
        addr: &Addr,
        now: u64,
        evicting: bool,
    ) -> anyhow::Result<()> {
        let expired: Vec<String> = self
            .by_addr
            .get(addr)
            .map(|n| {
                n.iter()
                    .filter(|(_, e)| **e <= now)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        for name in &expired {
            self.forget(name, addr);
            self.counters.expired += 1;
        }
        let current = store.get(addr);
        let live = self.by_addr.get(addr).filter(|n| !n.is_empty()).cloned();
        let Some(live) = live else {
            self.by_addr.remove(addr);
            self.written.remove(addr);
            let kernel_knows_newer = current.is_some_and(|v| v.expires_ns > now) && !evicting;
            if !kernel_knows_newer {
                store.remove(addr)?;
            }
            return Ok(());
        };
        let ports = live
            .keys()
            .filter_map(|n| self.names.lookup(n).map(|(p, _)| p.clone()))
            .reduce(|a, b| a.union(&b))
            .unwrap_or(Ports::Some(Vec::new()));
        let port_set = self.port_set(store, &ports)?;
        let mut expires_ns = live.values().copied().max().unwrap_or(now);
        let mut extra_set = NO_PORT_SET;
        // When taking something back, what the kernel wrote is exactly what must go.
        if let Some(cur) = current.filter(|v| v.expires_ns > now && !evicting) {
            expires_ns = expires_ns.max(cur.expires_ns);
            // A name the kernel learned this address through, whose answer is still queued.
            if cur.extra_set != NO_PORT_SET && cur.extra_set != port_set {
                extra_set = cur.extra_set;
            }
        }
        self.written.insert(*addr, port_set);
        store.put(
            addr,
            &LearnedValue {
                port_set,
                extra_set,
                expires_ns,
            },
        )
    }

    /// The id of a port set, writing its entries to the kernel the first time.
    fn port_set(&mut self, store: &mut impl LearnedStore, ports: &Ports) -> anyhow::Result<u32> {
        let id = self.port_sets.intern(ports);
        if self.written_sets.insert(id) {
            let keys: Vec<PortKey> = self.port_sets.entries_of(id).copied().collect();
            store.add_ports(&keys)?;
        }
        Ok(id)
    }
}

/// The question name and every name a CNAME chain from it reaches.
fn cname_chain(msg: &Message, qname: &str) -> HashSet<String> {
    let mut chain = HashSet::from([qname.to_owned()]);
    for _ in 0..MAX_CHAIN {
        let before = chain.len();
        for r in &msg.answers {
            if let RData::CNAME(target) = &r.data
                && chain.contains(&lower_name(&r.name))
            {
                chain.insert(lower_name(&target.0));
            }
        }
        if chain.len() == before {
            break;
        }
    }
    chain
}

/// The map key of an address (IPv4 as IPv4-mapped).
pub fn to_key(addr: IpAddr) -> Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use egress_common::{DNS_MAX_LEARNED, DNS_MAX_PAYLOAD};
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{
            RecordType,
            rdata::{A, AAAA, CNAME},
        },
    };

    use super::*;
    use crate::{compile::compile, policy::parse};

    /// The kernel maps, in memory.
    #[derive(Default)]
    struct FakeStore {
        learned: HashMap<Addr, LearnedValue>,
        ports: HashSet<PortKey>,
    }

    impl LearnedStore for FakeStore {
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

    const POLICY: &str = "
allow:
  - fqdn: mcr.microsoft.com
    ports: [HTTPS:443]
  - fqdn: \"*.hcp.eastus.azmk8s.io\"
    ports: [HTTPS:443, TCP:9000]
  - fqdn: ntp.example.org
    ports: [UDP:123]
dns:
  min_ttl: 10
  max_ttl: 600
  max_ips_per_name: 3
  max_ips: 5
";
    const T0: u64 = 1_000 * NS_PER_SEC;

    fn learner() -> Learner {
        let policy = parse(POLICY, "learn.yaml").expect("policy");
        let compiled = compile(&policy).expect("compiles");
        Learner::new(compiled.names, compiled.port_sets, policy.dns)
    }

    fn name(s: &str) -> Name {
        Name::from_str(s).expect("name")
    }

    fn answer(qname: &str, records: Vec<Record>) -> DnsEvent {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name(qname), RecordType::A));
        m.add_answers(records);
        event(&m.to_vec().expect("encodes"))
    }

    fn event(bytes: &[u8]) -> DnsEvent {
        let mut payload = [0u8; DNS_MAX_PAYLOAD];
        payload[..bytes.len()].copy_from_slice(bytes);
        DnsEvent {
            resolver: [0; 16],
            client: [0; 16],
            len: bytes.len() as u16,
            learned: 0,
            _pad: 0,
            addrs: [[0; 16]; DNS_MAX_LEARNED],
            payload,
        }
    }

    fn a(owner: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A::from_str(ip).expect("ipv4")))
    }

    fn aaaa(owner: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(
            name(owner),
            ttl,
            RData::AAAA(AAAA::from_str(ip).expect("ipv6")),
        )
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
    }

    fn key(ip: &str) -> Addr {
        to_key(ip.parse().expect("address"))
    }

    use hickory_proto::rr::Record;

    #[test]
    fn a_cname_chain_is_followed_to_its_addresses() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let ev = answer(
            "mcr.microsoft.com.",
            vec![
                cname("mcr.microsoft.com.", "mcr.trafficmanager.example."),
                cname("mcr.trafficmanager.example.", "edge.example."),
                a("edge.example.", 60, "203.0.113.7"),
                aaaa("edge.example.", 60, "2001:db8::7"),
            ],
        );
        l.answer(&mut store, &ev, T0).expect("answer");
        assert_eq!(l.counters.learned, 2);
        let v = store.learned[&key("203.0.113.7")];
        assert_eq!(v.expires_ns, T0 + 60 * NS_PER_SEC);
        assert_eq!(v.extra_set, NO_PORT_SET);
        assert!(store.learned.contains_key(&key("2001:db8::7")));
        assert!(
            store
                .ports
                .iter()
                .any(|k| k.port_set == v.port_set && k.port == 443)
        );
    }

    /// What the kernel did with an answer: wrote each of `addrs` for the question's name.
    fn kernel_wrote(store: &mut FakeStore, event: &mut DnsEvent, addrs: &[&str]) {
        for (i, ip) in addrs.iter().enumerate() {
            let k = key(ip);
            store.learned.insert(
                k,
                LearnedValue {
                    port_set: 0,
                    extra_set: NO_PORT_SET,
                    expires_ns: T0 + 86_400 * NS_PER_SEC,
                },
            );
            event.addrs[i] = k;
        }
        event.learned = addrs.len() as u16;
    }

    #[test]
    fn records_off_the_chain_are_taken_back() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let mut ev = answer(
            "mcr.microsoft.com.",
            vec![
                a("mcr.microsoft.com.", 60, "203.0.113.7"),
                a("evil.example.", 60, "198.51.100.66"),
            ],
        );
        // The kernel attributes every A record of the answer to the question's name.
        kernel_wrote(&mut store, &mut ev, &["203.0.113.7", "198.51.100.66"]);
        l.answer(&mut store, &ev, T0).expect("answer");
        assert_eq!(l.counters.off_chain, 1);
        assert!(!store.learned.contains_key(&key("198.51.100.66")));
        assert!(store.learned.contains_key(&key("203.0.113.7")));
    }

    #[test]
    fn what_the_kernel_learned_from_an_answer_the_agent_cannot_parse_is_taken_back() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let good = answer(
            "mcr.microsoft.com.",
            vec![a("mcr.microsoft.com.", 60, "203.0.113.7")],
        );
        // A broken record after the good ones: the kernel learned, hickory refuses.
        let mut bytes = good.payload[..usize::from(good.len)].to_vec();
        bytes[11] = 1; // arcount 1, and no additional record follows
        let mut ev = event(&bytes);
        kernel_wrote(&mut store, &mut ev, &["203.0.113.7"]);
        l.answer(&mut store, &ev, T0).expect("answer");
        assert_eq!(l.counters.malformed, 1);
        assert!(store.learned.is_empty());
    }

    #[test]
    fn a_label_holding_a_dot_never_matches_a_zone() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let name = Name::from_labels(vec![
            b"x.hcp".to_vec(),
            b"eastus".to_vec(),
            b"azmk8s".to_vec(),
            b"io".to_vec(),
        ])
        .expect("name");
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            name,
            60,
            RData::A(A::from_str("203.0.113.9").expect("ipv4")),
        ));
        let mut ev = event(&m.to_vec().expect("encodes"));
        kernel_wrote(&mut store, &mut ev, &["203.0.113.9"]);
        l.answer(&mut store, &ev, T0).expect("answer");
        assert_eq!(l.counters.unmatched, 1);
        assert!(store.learned.is_empty());
    }

    #[test]
    fn ttls_are_floored_and_capped() {
        let mut store = FakeStore::default();
        let mut l = learner();
        l.answer(
            &mut store,
            &answer(
                "x.hcp.eastus.azmk8s.io.",
                vec![a("x.hcp.eastus.azmk8s.io.", 0, "203.0.113.1")],
            ),
            T0,
        )
        .expect("answer");
        l.answer(
            &mut store,
            &answer(
                "y.hcp.eastus.azmk8s.io.",
                vec![a("y.hcp.eastus.azmk8s.io.", 999_999, "203.0.113.2")],
            ),
            T0,
        )
        .expect("answer");
        assert_eq!(
            store.learned[&key("203.0.113.1")].expires_ns,
            T0 + 10 * NS_PER_SEC
        );
        assert_eq!(
            store.learned[&key("203.0.113.2")].expires_ns,
            T0 + 600 * NS_PER_SEC
        );
    }

    #[test]
    fn an_address_of_two_names_gets_the_union_of_their_ports_until_each_expires() {
        let mut store = FakeStore::default();
        let mut l = learner();
        l.answer(
            &mut store,
            &answer(
                "mcr.microsoft.com.",
                vec![a("mcr.microsoft.com.", 30, "203.0.113.9")],
            ),
            T0,
        )
        .expect("answer");
        l.answer(
            &mut store,
            &answer(
                "ntp.example.org.",
                vec![a("ntp.example.org.", 100, "203.0.113.9")],
            ),
            T0,
        )
        .expect("answer");
        let both = store.learned[&key("203.0.113.9")].port_set;
        let members: HashSet<(u8, u16)> = store
            .ports
            .iter()
            .filter(|k| k.port_set == both)
            .map(|k| (k.proto, k.port))
            .collect();
        assert_eq!(members, HashSet::from([(6, 443), (17, 123)]));
        // mcr's 30 s run out: only NTP's port is left.
        l.expire(&mut store, T0 + 31 * NS_PER_SEC).expect("expire");
        let left = store.learned[&key("203.0.113.9")].port_set;
        assert_ne!(left, both);
        assert!(store.ports.contains(&PortKey::new(left, 17, 123)));
        // NTP's 100 s run out: the address is gone.
        l.expire(&mut store, T0 + 101 * NS_PER_SEC).expect("expire");
        assert!(!store.learned.contains_key(&key("203.0.113.9")));
        assert_eq!(l.counters.expired, 2);
    }

    #[test]
    fn per_name_and_total_bounds_evict_what_expires_first() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let records = (1..=4)
            .map(|i| a("mcr.microsoft.com.", 10 * i, &format!("203.0.113.{i}")))
            .collect();
        l.answer(&mut store, &answer("mcr.microsoft.com.", records), T0)
            .expect("answer");
        assert_eq!(l.counters.evicted, 1, "max_ips_per_name is 3");
        assert!(!store.learned.contains_key(&key("203.0.113.1")));
        let more = (5..=7)
            .map(|i| {
                a(
                    &format!("h{i}.hcp.eastus.azmk8s.io."),
                    100,
                    &format!("203.0.113.{i}"),
                )
            })
            .collect::<Vec<_>>();
        for r in more {
            let owner = r.name.to_ascii();
            l.answer(&mut store, &answer(&owner, vec![r]), T0)
                .expect("answer");
        }
        assert_eq!(l.learned().count(), 5, "max_ips is 5");
        assert!(
            !store.learned.contains_key(&key("203.0.113.2")),
            "expired first"
        );
    }

    #[test]
    fn hostile_answers_never_panic_and_never_learn() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let good = answer(
            "mcr.microsoft.com.",
            vec![a("mcr.microsoft.com.", 60, "203.0.113.7")],
        );
        let bytes = &good.payload[..usize::from(good.len)];
        // Every truncation, and a compression pointer loop in the question.
        for cut in 0..bytes.len() {
            l.answer(&mut store, &event(&bytes[..cut]), T0)
                .expect("no error");
        }
        let mut looped = bytes.to_vec();
        looped[12] = 0xc0;
        looped[13] = 12;
        l.answer(&mut store, &event(&looped), T0).expect("no error");
        let mut wrong_len = event(bytes);
        wrong_len.len = u16::MAX;
        l.answer(&mut store, &wrong_len, T0).expect("no error");
        assert!(l.counters.malformed > 0);
        assert_eq!(
            l.counters.learned, 1,
            "only the whole answer (len clamped) teaches"
        );
    }

    #[test]
    fn a_reload_takes_back_names_no_longer_allowed_and_repaints_the_rest() {
        let mut store = FakeStore::default();
        let mut l = learner();
        for (name, ip) in [
            ("mcr.microsoft.com.", "203.0.113.1"),
            ("ntp.example.org.", "203.0.113.2"),
        ] {
            l.answer(&mut store, &answer(name, vec![a(name, 300, ip)]), T0)
                .expect("answer");
        }
        let old_mcr_set = store.learned[&key("203.0.113.1")].port_set;
        // mcr now on 8443 only; NTP gone.
        let policy = parse(
            "allow:\n  - fqdn: mcr.microsoft.com\n    ports: [TCP:8443]\n",
            "reload.yaml",
        )
        .expect("policy");
        let compiled =
            crate::compile::compile_with(&policy, l.port_sets().clone()).expect("compiles");
        let sets = compiled.sets_in_use().expect("names");
        l.reload(
            &mut store,
            compiled.names,
            compiled.port_sets,
            policy.dns,
            &sets,
            T0 + NS_PER_SEC,
        )
        .expect("reload");
        assert!(
            !store.learned.contains_key(&key("203.0.113.2")),
            "NTP taken back"
        );
        let mcr = store.learned[&key("203.0.113.1")];
        assert_ne!(mcr.port_set, old_mcr_set);
        assert!(store.ports.contains(&PortKey::new(mcr.port_set, 6, 8443)));
        assert!(
            !store.ports.iter().any(|k| k.port == 123),
            "the NTP set is referenced by nothing and left the kernel"
        );
    }

    #[test]
    fn answers_for_names_no_rule_allows_teach_nothing() {
        let mut store = FakeStore::default();
        let mut l = learner();
        l.answer(
            &mut store,
            &answer(
                "hcp.eastus.azmk8s.io.",
                vec![a("hcp.eastus.azmk8s.io.", 60, "203.0.113.8")],
            ),
            T0,
        )
        .expect("answer");
        l.answer(
            &mut store,
            &answer("evil.example.", vec![a("evil.example.", 60, "203.0.113.9")]),
            T0,
        )
        .expect("answer");
        assert_eq!(l.counters.unmatched, 2);
        assert!(store.learned.is_empty());
    }
}

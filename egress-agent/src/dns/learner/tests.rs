use std::str::FromStr as _;

use egress_common::{
    DNS_MAX_LEARNED, DNS_MAX_PAYLOAD, DnsEvent, LearnedValue, NO_PORT_SET, PortKey, addr::to_key,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{
        DNSClass, Name, RData, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};

use super::{store::fake::FakeStore, *};
use crate::{compile::compile, policy::parse};

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

/// Hands `event` to the learner as the control task hands it a record of the ring.
fn feed(
    l: &mut Learner,
    store: &mut impl LearnedStore,
    event: &DnsEvent,
    now: u64,
) -> anyhow::Result<()> {
    l.answer(store, &event.into(), now)
}

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
fn a_restore_relearns_what_the_policy_still_allows_and_takes_back_the_rest() {
    let mut l = learner();
    let mut store = FakeStore::default();
    // What a previous agent left: entries with its own port set ids.
    let old = LearnedValue {
        port_set: 40,
        extra_set: NO_PORT_SET,
        expires_ns: T0 + 500 * NS_PER_SEC,
    };
    for ip in ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"] {
        store.learned.insert(key(ip), old);
    }
    let until = T0 + 300 * NS_PER_SEC;
    let record = |ip, name, expires| {
        let key = LearnedNameKey::new(key(ip), name);
        (key, LearnedName::new(name, expires).expect("fits"))
    };
    let mut unreadable = record("203.0.113.5", "mcr.microsoft.com", until);
    unreadable.1.name[0] = 0xff;
    let pinned = [
        record("203.0.113.1", "mcr.microsoft.com", until),
        record("203.0.113.1", "ntp.example.org", until + 1),
        // A name the policy no longer has.
        record("203.0.113.2", "gone.example.com", until),
        // Expired already.
        record("203.0.113.3", "mcr.microsoft.com", T0 - 1),
        unreadable,
    ];
    l.restore(&mut store, &pinned, T0).expect("restores");
    // What is taken over is not rewritten; what is not goes.
    let changes = l.journal_changes(usize::MAX);
    assert!(changes.put.is_empty() && changes.complete);
    let mut deleted = changes.delete;
    deleted.sort();
    let mut not_taken: Vec<_> = pinned[2..].iter().map(|(k, _)| *k).collect();
    not_taken.sort();
    assert_eq!(deleted, not_taken);
    let kept = store.learned[&key("203.0.113.1")];
    assert_ne!(kept.port_set, 40, "repainted with this agent's set");
    // The kernel's later expiry stands: it may come from an answer still queued.
    assert_eq!(kept.expires_ns, old.expires_ns);
    let ports: HashSet<(u8, u16)> = store
        .ports
        .iter()
        .filter(|k| k.port_set == kept.port_set)
        .map(|k| (k.proto, k.port))
        .collect();
    assert_eq!(ports, HashSet::from([(6, 443), (17, 123)]), "the union");
    assert!(!store.learned.contains_key(&key("203.0.113.2")));
    assert!(!store.learned.contains_key(&key("203.0.113.3")));
    // No record: left to its own expiry (its answer may still be queued).
    assert_eq!(store.learned[&key("203.0.113.4")], old);
    let names: Vec<(String, u64)> = l
        .learned()
        .flat_map(|(_, names)| names.map(|(n, e)| (n.to_owned(), e)))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

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
    feed(&mut l, &mut store, &ev, T0).expect("answer");
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
    feed(&mut l, &mut store, &ev, T0).expect("answer");
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
    feed(&mut l, &mut store, &ev, T0).expect("answer");
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
    feed(&mut l, &mut store, &ev, T0).expect("answer");
    assert_eq!(l.counters.unmatched, 1);
    assert!(store.learned.is_empty());
}

#[test]
fn ttls_are_floored_and_capped() {
    let mut store = FakeStore::default();
    let mut l = learner();
    feed(
        &mut l,
        &mut store,
        &answer(
            "x.hcp.eastus.azmk8s.io.",
            vec![a("x.hcp.eastus.azmk8s.io.", 0, "203.0.113.1")],
        ),
        T0,
    )
    .expect("answer");
    feed(
        &mut l,
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
    feed(
        &mut l,
        &mut store,
        &answer(
            "mcr.microsoft.com.",
            vec![a("mcr.microsoft.com.", 30, "203.0.113.9")],
        ),
        T0,
    )
    .expect("answer");
    feed(
        &mut l,
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
    feed(
        &mut l,
        &mut store,
        &answer("mcr.microsoft.com.", records),
        T0,
    )
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
        feed(&mut l, &mut store, &answer(&owner, vec![r]), T0).expect("answer");
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
        feed(&mut l, &mut store, &event(&bytes[..cut]), T0).expect("no error");
    }
    let mut looped = bytes.to_vec();
    looped[12] = 0xc0;
    looped[13] = 12;
    feed(&mut l, &mut store, &event(&looped), T0).expect("no error");
    let mut wrong_len = event(bytes);
    wrong_len.len = u16::MAX;
    feed(&mut l, &mut store, &wrong_len, T0).expect("no error");
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
        feed(
            &mut l,
            &mut store,
            &answer(name, vec![a(name, 300, ip)]),
            T0,
        )
        .expect("answer");
    }
    let old_mcr_set = store.learned[&key("203.0.113.1")].port_set;
    // mcr now on 8443 only; NTP gone.
    let policy = parse(
        "allow:\n  - fqdn: mcr.microsoft.com\n    ports: [TCP:8443]\n",
        "reload.yaml",
    )
    .expect("policy");
    let compiled = crate::compile::compile_with(&policy, l.port_sets().clone()).expect("compiles");
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
    feed(
        &mut l,
        &mut store,
        &answer(
            "hcp.eastus.azmk8s.io.",
            vec![a("hcp.eastus.azmk8s.io.", 60, "203.0.113.8")],
        ),
        T0,
    )
    .expect("answer");
    feed(
        &mut l,
        &mut store,
        &answer("evil.example.", vec![a("evil.example.", 60, "203.0.113.9")]),
        T0,
    )
    .expect("answer");
    assert_eq!(l.counters.unmatched, 2);
    assert!(store.learned.is_empty());
}

/// The kernel maps, counting the learner's lookups and writes.
#[derive(Default)]
struct Counting {
    maps: FakeStore,
    gets: std::cell::Cell<usize>,
    puts: usize,
}

impl LearnedStore for Counting {
    fn get(&self, addr: &Addr) -> Option<LearnedValue> {
        self.gets.set(self.gets.get() + 1);
        self.maps.get(addr)
    }
    fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()> {
        self.puts += 1;
        self.maps.put(addr, value)
    }
    fn remove(&mut self, addr: &Addr) -> anyhow::Result<()> {
        self.maps.remove(addr)
    }
    fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
        self.maps.add_ports(keys)
    }
    fn remove_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
        self.maps.remove_ports(keys)
    }
}

/// What the kernel does with an answer before the agent sees it (`egress-ebpf/src/dns.rs`):
/// every class IN A/AAAA address among the first records goes into `LEARNED` with the
/// question name's port set (a second set next to another name's), until its TTL runs
/// out (or later, if it already was). `None` when no rule allows the question.
fn kernel_handles(l: &Learner, maps: &mut FakeStore, m: &Message, now: u64) -> Option<DnsEvent> {
    let text = m.queries[0].name.to_lowercase().to_ascii();
    let q = text.strip_suffix('.').unwrap_or(&text);
    if q.contains('\\') {
        return None;
    }
    let set = l.names.lookup(q)?.1;
    let mut ev = event(&m.to_vec().expect("encodes"));
    for r in m.answers.iter().take(DNS_MAX_LEARNED) {
        let addr = match &r.data {
            RData::A(a) => to_key(a.0.into()),
            RData::AAAA(a) => to_key(a.0.into()),
            _ => continue,
        };
        let secs = r.ttl.max(l.limits.min_ttl).min(l.limits.max_ttl);
        let expires_ns = now + u64::from(secs) * NS_PER_SEC;
        (maps.learned.entry(addr))
            .and_modify(|v| v.teach(set, expires_ns, now))
            .or_insert(LearnedValue::new(set, expires_ns));
        ev.addrs[usize::from(ev.learned)] = addr;
        ev.learned += 1;
    }
    Some(ev)
}

/// An answer of one A record for `qname` itself.
fn single(qname: &str, ttl: u32, ip: &str) -> Message {
    message(qname, vec![a(qname, ttl, ip)])
}

fn message(qname: &str, records: Vec<Record>) -> Message {
    let mut m = Message::new(7, MessageType::Response, OpCode::Query);
    m.add_query(Query::query(name(qname), RecordType::A));
    m.add_answers(records);
    m
}

#[test]
fn a_refreshed_address_costs_no_map_call_and_a_new_one_a_lookup() {
    let mut store = Counting::default();
    let mut l = learner();
    let records = |ttl| {
        (1..=3)
            .map(|i| a("x.hcp.eastus.azmk8s.io.", ttl, &format!("203.0.113.{i}")))
            .collect()
    };
    let m = message("x.hcp.eastus.azmk8s.io.", records(60));
    let ev = kernel_handles(&l, &mut store.maps, &m, T0).expect("allowed");
    feed(&mut l, &mut store, &ev, T0).expect("answer");
    l.drained();
    assert_eq!(
        (store.gets.get(), store.puts),
        (3, 0),
        "what the kernel wrote stands"
    );
    // The same answer later, with a longer TTL: the kernel's write stands again.
    let t1 = T0 + 30 * NS_PER_SEC;
    let m = message("x.hcp.eastus.azmk8s.io.", records(300));
    let ev = kernel_handles(&l, &mut store.maps, &m, t1).expect("allowed");
    feed(&mut l, &mut store, &ev, t1).expect("answer");
    assert_eq!((store.gets.get(), store.puts), (3, 0), "no map call");
    assert_eq!(
        store.maps.learned[&key("203.0.113.2")].expires_ns,
        t1 + 300 * NS_PER_SEC
    );
    assert_eq!(l.learned().count(), 3);
}

#[test]
fn an_answer_queued_behind_a_write_of_the_agent_is_not_taken_as_standing() {
    let mut store = FakeStore::default();
    let mut l = learner();
    let mcr = |ttl| {
        message(
            "mcr.microsoft.com.",
            vec![a("mcr.microsoft.com.", ttl, "203.0.113.7")],
        )
    };
    let ev = kernel_handles(&l, &mut store, &mcr(60), T0).expect("allowed");
    feed(&mut l, &mut store, &ev, T0).expect("answer");
    l.drained();
    // The kernel handles two answers before the agent reads either: NTP's, where the
    // address is off the chain, then a refresh of mcr's with a longer TTL.
    let t1 = T0 + NS_PER_SEC;
    let ntp = message(
        "ntp.example.org.",
        vec![a("elsewhere.example.", 60, "203.0.113.7")],
    );
    let taken_back = kernel_handles(&l, &mut store, &ntp, t1).expect("allowed");
    let refresh = kernel_handles(&l, &mut store, &mcr(600), t1).expect("allowed");
    // Taking NTP's ports back rewrites the entry with mcr's first expiry, replacing the
    // kernel's write for the refresh; the refresh must then be written again.
    feed(&mut l, &mut store, &taken_back, t1).expect("answer");
    feed(&mut l, &mut store, &refresh, t1).expect("answer");
    let v = store.learned[&key("203.0.113.7")];
    assert_eq!(v.extra_set, NO_PORT_SET, "NTP's ports taken back");
    assert_eq!(v.expires_ns, t1 + 600 * NS_PER_SEC, "the refresh's expiry");
}

#[test]
fn a_lost_answer_s_second_port_set_goes_after_a_recheck_while_another_name_refreshes() {
    let mut store = FakeStore::default();
    let mut l = learner();
    store.ports.extend(l.port_sets.entries().copied());
    let mcr = single("mcr.microsoft.com.", 60, "203.0.113.7");
    let ev = kernel_handles(&l, &mut store, &mcr, T0).expect("allowed");
    feed(&mut l, &mut store, &ev, T0).expect("answer");
    l.drained();
    // NTP's answer reaches the kernel, but its event is lost (a full ring).
    let ntp = single("ntp.example.org.", 30, "203.0.113.7");
    kernel_handles(&l, &mut store, &ntp, T0).expect("allowed");
    let refresh = |l: &mut Learner, store: &mut FakeStore, at: u64| {
        let ev = kernel_handles(l, store, &mcr, at).expect("allowed");
        feed(l, store, &ev, at).expect("answer");
        l.drained();
    };
    // Each refresh of mcr's name is explained by the kernel's own write: nothing reads
    // the entry, and NTP's port stays open long after NTP's TTL.
    let mut now = T0;
    for _ in 0..5 {
        now += 20 * NS_PER_SEC;
        refresh(&mut l, &mut store, now);
        l.expire(&mut store, now).expect("expire");
    }
    assert_eq!(
        open_ports(&store, "203.0.113.7"),
        HashSet::from([(6, 443), (17, 123)])
    );
    // Once the loss is known, the entries are read back, a few at a time; the next
    // write drops the set.
    l.start_recheck();
    while l.rechecking() {
        l.recheck_some(&mut store, now, 1).expect("recheck");
    }
    l.drained();
    refresh(&mut l, &mut store, now + NS_PER_SEC);
    assert_eq!(open_ports(&store, "203.0.113.7"), HashSet::from([(6, 443)]));
}

/// The ports `LEARNED` lets through to `ip`, as (protocol, port) pairs.
fn open_ports(store: &FakeStore, ip: &str) -> HashSet<(u8, u16)> {
    let v = store.learned[&key(ip)];
    (store.ports.iter())
        .filter(|k| k.port_set == v.port_set || k.port_set == v.extra_set)
        .map(|k| (k.proto, k.port))
        .collect()
}

#[test]
fn a_name_s_ports_end_with_it_while_another_name_refreshes_the_address() {
    let mut store = FakeStore::default();
    let mut l = learner();
    store.ports.extend(l.port_sets.entries().copied());
    let mcr = |ttl| {
        message(
            "mcr.microsoft.com.",
            vec![a("mcr.microsoft.com.", ttl, "203.0.113.7")],
        )
    };
    let ntp = single("ntp.example.org.", 30, "203.0.113.7");
    for m in [mcr(60), ntp] {
        let ev = kernel_handles(&l, &mut store, &m, T0).expect("allowed");
        feed(&mut l, &mut store, &ev, T0).expect("answer");
    }
    l.drained();
    assert_eq!(
        open_ports(&store, "203.0.113.7"),
        HashSet::from([(6, 443), (17, 123)])
    );
    // NTP's 30 s run out; mcr's name is then refreshed again and again.
    let mut now = T0 + 31 * NS_PER_SEC;
    l.expire(&mut store, now).expect("expire");
    for _ in 0..3 {
        assert_eq!(open_ports(&store, "203.0.113.7"), HashSet::from([(6, 443)]));
        now += 20 * NS_PER_SEC;
        let ev = kernel_handles(&l, &mut store, &mcr(60), now).expect("allowed");
        feed(&mut l, &mut store, &ev, now).expect("answer");
        l.drained();
        l.expire(&mut store, now).expect("expire");
    }
    assert_eq!(open_ports(&store, "203.0.113.7"), HashSet::from([(6, 443)]));
}

#[test]
fn a_second_port_set_no_handled_answer_explains_goes_at_the_next_write() {
    let mut store = FakeStore::default();
    let mut l = learner();
    store.ports.extend(l.port_sets.entries().copied());
    let mcr = single("mcr.microsoft.com.", 60, "203.0.113.7");
    let hcp = message(
        "x.hcp.eastus.azmk8s.io.",
        vec![a("x.hcp.eastus.azmk8s.io.", 30, "203.0.113.7")],
    );
    for m in [&mcr, &hcp] {
        let ev = kernel_handles(&l, &mut store, m, T0).expect("allowed");
        feed(&mut l, &mut store, &ev, T0).expect("answer");
    }
    l.drained();
    // NTP's answer reaches the kernel, but its event is lost (a full ring).
    let ntp = single("ntp.example.org.", 30, "203.0.113.7");
    kernel_handles(&l, &mut store, &ntp, T0).expect("allowed");
    // The hcp name expires: the rewrite keeps NTP's set, which may belong to an answer
    // still queued.
    let t1 = T0 + 31 * NS_PER_SEC;
    l.expire(&mut store, t1).expect("expire");
    assert_eq!(
        open_ports(&store, "203.0.113.7"),
        HashSet::from([(6, 443), (17, 123)])
    );
    // The ring is then found empty, so no answer explains the set: the next write,
    // for a refresh of mcr's name, drops it.
    l.drained();
    let t2 = t1 + NS_PER_SEC;
    let ev = kernel_handles(&l, &mut store, &mcr, t2).expect("allowed");
    feed(&mut l, &mut store, &ev, t2).expect("answer");
    assert_eq!(open_ports(&store, "203.0.113.7"), HashSet::from([(6, 443)]));
}

#[test]
fn a_kernel_list_that_disagrees_with_the_answer_is_checked_address_by_address() {
    let mut store = Counting::default();
    let mut l = learner();
    let m = single("mcr.microsoft.com.", 60, "203.0.113.7");
    let mut ev = kernel_handles(&l, &mut store.maps, &m, T0).expect("allowed");
    feed(&mut l, &mut store, &ev, T0).expect("answer");
    l.drained();
    let gets = store.gets.get();
    // A list naming another address: nothing is assumed about what the kernel wrote.
    ev.addrs[0] = key("198.51.100.1");
    feed(&mut l, &mut store, &ev, T0).expect("answer");
    assert!(store.gets.get() > gets, "looked up");
    assert!(store.maps.learned.contains_key(&key("203.0.113.7")));
    assert!(!store.maps.learned.contains_key(&key("198.51.100.1")));
}

#[test]
fn a_cname_chain_is_followed_whatever_the_case_of_its_names() {
    let mut store = FakeStore::default();
    let mut l = learner();
    let ev = answer(
        "MCR.microsoft.com.",
        vec![
            cname("mcr.Microsoft.com.", "Edge.Example."),
            a("eDGE.example.", 60, "203.0.113.7"),
            a("edge.example.org.", 60, "203.0.113.8"),
        ],
    );
    feed(&mut l, &mut store, &ev, T0).expect("answer");
    assert_eq!((l.counters.learned, l.counters.off_chain), (1, 1));
    assert!(store.learned.contains_key(&key("203.0.113.7")));
}

/// xorshift64: a fixed sequence of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A random answer: a name of the policy (or not), maybe a CNAME, addresses from a
/// small pool (so that names share them), some off the chain, various TTLs.
fn random_answer(rng: &mut Rng) -> Message {
    const QUESTIONS: [&str; 8] = [
        "mcr.microsoft.com.",
        "MCR.microsoft.com.",
        "a.hcp.eastus.azmk8s.io.",
        "b.HCP.eastus.azmk8s.io.",
        "ntp.example.org.",
        "hcp.eastus.azmk8s.io.",
        "evil.example.",
        "c.d.hcp.eastus.azmk8s.io.",
    ];
    const TTLS: [u32; 6] = [0, 5, 30, 60, 300, 3600];
    let q = QUESTIONS[rng.below(QUESTIONS.len())];
    let mut records = Vec::new();
    let mut owner = q;
    if rng.below(3) == 0 {
        records.push(cname(q, "Edge.example."));
        owner = "edge.EXAMPLE.";
    }
    for _ in 0..=rng.below(5) {
        let owner = if rng.below(6) == 0 {
            "other.example."
        } else {
            owner
        };
        let ttl = TTLS[rng.below(TTLS.len())];
        let i = 1 + rng.below(8);
        records.push(if rng.below(4) == 0 {
            aaaa(owner, ttl, &format!("2001:db8::{i}"))
        } else {
            a(owner, ttl, &format!("203.0.113.{i}"))
        });
    }
    message(q, records)
}

/// The learner's reading of an answer before `dns::wire`, kept as the reference: hickory
/// decodes the message, and the question's key, the CNAME chain and the model of the
/// kernel's writes are computed from its records as the learner computed them.
mod before {
    use egress_common::{Addr, DNS_MAX_LEARNED, addr::to_key};
    use hickory_proto::{
        op::{Message, MessageType},
        rr::{DNSClass, Name, RData},
    };

    use super::super::chain::MAX_CHAIN;
    use crate::dns::wire::policy_key_of;

    pub struct Reading {
        /// The question's key; `None` when a label is one no rule can match.
        pub key: Option<String>,
        /// The A/AAAA records on the chain: address and TTL.
        pub learned: Vec<(Addr, u32)>,
        pub off_chain: u64,
        /// The class IN A/AAAA records among the first `DNS_MAX_LEARNED`.
        pub kernel: Vec<(Addr, u32)>,
    }

    /// `None` when the learner counted the answer malformed.
    pub fn read(bytes: &[u8]) -> Option<Reading> {
        let msg = Message::from_vec(bytes).ok()?;
        let [query] = msg.queries.as_slice() else {
            return None;
        };
        if msg.metadata.message_type != MessageType::Response {
            return None;
        }
        let mut key = String::new();
        let key = policy_key_of(query.name.iter(), &mut key).then_some(key);
        let chain = cname_chain(&msg, &query.name);
        let (mut learned, mut off_chain) = (Vec::new(), 0);
        for record in &msg.answers {
            let addr = match &record.data {
                RData::A(a) => to_key(a.0.into()),
                RData::AAAA(a) => to_key(a.0.into()),
                _ => continue,
            };
            if chain.contains(&&record.name) {
                learned.push((addr, record.ttl));
            } else {
                off_chain += 1;
            }
        }
        let kernel = (msg.answers.iter().take(DNS_MAX_LEARNED))
            .filter_map(|record| match (&record.data, record.dns_class) {
                (RData::A(a), DNSClass::IN) => Some((to_key(a.0.into()), record.ttl)),
                (RData::AAAA(a), DNSClass::IN) => Some((to_key(a.0.into()), record.ttl)),
                _ => None,
            })
            .collect();
        Some(Reading {
            key,
            learned,
            off_chain,
            kernel,
        })
    }

    fn cname_chain<'m>(msg: &'m Message, qname: &'m Name) -> Vec<&'m Name> {
        let mut chain = vec![qname];
        for _ in 0..MAX_CHAIN {
            let before = chain.len();
            for r in &msg.answers {
                if let RData::CNAME(target) = &r.data
                    && chain.contains(&&r.name)
                    && !chain.contains(&&target.0)
                {
                    chain.push(&target.0);
                }
            }
            if chain.len() == before {
                break;
            }
        }
        chain
    }
}

/// An answer with a CNAME chain of up to 20 links (past `MAX_CHAIN`), its records in any
/// order (following it takes up to one pass per link), sometimes looping back, with
/// addresses on the chain and off it, in classes other than IN too.
fn chained_answer(rng: &mut Rng) -> Message {
    const Q: [&str; 4] = [
        "mcr.microsoft.com.",
        "a.HCP.eastus.azmk8s.io.",
        "ntp.example.org.",
        "evil.example.",
    ];
    let q = Q[rng.below(Q.len())];
    let links = rng.below(21);
    let link = |i: usize| {
        if i == 0 {
            q.to_owned()
        } else {
            format!("c{i}.Example.")
        }
    };
    let mut records = Vec::new();
    for i in 0..links {
        records.push(cname(&link(i), &link(i + 1).to_lowercase()));
    }
    if links > 0 && rng.below(4) == 0 {
        records.push(cname(&link(links), &link(rng.below(links))));
    }
    for _ in 0..rng.below(8) {
        let owner = if rng.below(5) == 0 {
            "off.example.".to_owned()
        } else {
            link(rng.below(links + 1)).to_uppercase()
        };
        let i = 1 + rng.below(20);
        let mut r = if rng.below(3) == 0 {
            aaaa(&owner, 60 * i as u32, &format!("2001:db8::{i}"))
        } else {
            a(&owner, 60 * i as u32, &format!("203.0.113.{i}"))
        };
        if rng.below(6) == 0 {
            r.dns_class = [DNSClass::CH, DNSClass::ANY, DNSClass::NONE][rng.below(3)];
        }
        records.push(r);
    }
    match rng.below(4) {
        // Each pass over the records then follows one link.
        0 => records.reverse(),
        1 => {}
        _ => {
            for i in (1..records.len()).rev() {
                records.swap(i, rng.below(i + 1));
            }
        }
    }
    message(q, records)
}

#[test]
fn the_learner_reads_answers_as_it_did_with_hickory() {
    let policy = parse(
        &POLICY.replace(
            "max_ips_per_name: 3\n  max_ips: 5",
            "max_ips_per_name: 100\n  max_ips: 100",
        ),
        "learn.yaml",
    )
    .expect("policy");
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let (mut malformed, mut unmatched, mut answered, mut agreed) = (0, 0, 0, 0);
    for i in 0..6_000 {
        let m = if i % 2 == 0 {
            random_answer(&mut rng)
        } else {
            chained_answer(&mut rng)
        };
        let mut bytes = m.to_vec().expect("encodes");
        for _ in 0..[0, 0, 1, 2][rng.below(4)] {
            if bytes.is_empty() {
                break;
            }
            let at = rng.below(bytes.len());
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = [0, 0xc0, 12, 0x3f][rng.below(4)],
                2 => bytes.truncate(at),
                _ => bytes[at] = rng.below(256) as u8,
            }
        }
        let reading = before::read(&bytes);
        let mut ev = event(&bytes);
        // The kernel's list: what the reading says it wrote, or something else.
        let mut kernel: Vec<Addr> = (reading.iter().flat_map(|r| &r.kernel))
            .map(|(a, _)| *a)
            .collect();
        match rng.below(6) {
            0 => drop(kernel.pop()),
            1 => kernel.push(key("198.51.100.1")),
            _ => {}
        }
        for (slot, addr) in ev.addrs.iter_mut().zip(&kernel) {
            *slot = *addr;
        }
        ev.learned = kernel.len().min(DNS_MAX_LEARNED) as u16;

        let compiled = compile(&policy).expect("compiles");
        let mut l = Learner::new(compiled.names, compiled.port_sets, policy.dns.clone());
        let mut store = FakeStore::default();
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        let at = format!("message {i}: {bytes:02x?}");
        let Some(reading) = reading else {
            malformed += 1;
            let want = LearnerCounters {
                malformed: 1,
                ..Default::default()
            };
            assert_eq!(l.counters, want, "{at}");
            continue;
        };
        if reading
            .key
            .as_ref()
            .and_then(|k| l.names.lookup(k))
            .is_none()
        {
            unmatched += 1;
            let want = LearnerCounters {
                unmatched: 1,
                ..Default::default()
            };
            assert_eq!(l.counters, want, "{at}");
            continue;
        }
        answered += 1;
        let c = l.counters;
        assert_eq!(
            (c.answers, c.learned, c.off_chain, c.malformed, c.unmatched),
            (1, reading.learned.len() as u64, reading.off_chain, 0, 0),
            "{at}"
        );
        let mut want: HashMap<Addr, u64> = HashMap::new();
        for (addr, ttl) in &reading.learned {
            let e = want.entry(*addr).or_default();
            *e = (*e).max(l.expiry(*ttl, T0));
        }
        let got: HashMap<Addr, u64> = (l.learned())
            .map(|(addr, mut names)| {
                let (name, expires) = names.next().expect("a name");
                assert_eq!(Some(name), reading.key.as_deref(), "{at}");
                (*addr, expires)
            })
            .collect();
        assert_eq!(got, want, "{at}");
        // The model of the kernel's writes: only when its list agrees with the answer.
        let mut model: Vec<(Addr, u64)> = Vec::new();
        if (reading.kernel.iter().map(|(a, _)| a)).eq(&ev.addrs[..usize::from(ev.learned)]) {
            agreed += 1;
            for (addr, ttl) in &reading.kernel {
                let until = l.expiry(*ttl, T0);
                match model.iter_mut().find(|(a, _)| a == addr) {
                    Some((_, u)) => *u = (*u).max(until),
                    None => model.push((*addr, until)),
                }
            }
        }
        assert_eq!(l.kernel_wrote, model, "{at}");
    }
    assert!(
        malformed > 500 && unmatched > 500 && answered > 2_000 && agreed > 1_000,
        "{malformed} malformed, {unmatched} unmatched, {answered} answered ({agreed} with the kernel's list)"
    );
}

/// What must hold whenever the agent has caught up with the kernel: `LEARNED` holds
/// every tracked address with the port set the learner keeps for it and no second one,
/// that set is the union of its names' ports, and each name's list and each address's
/// names agree.
/// `now`: an expiry pass has just run at this time (`None`: none has).
fn check_view(l: &Learner, store: &FakeStore, now: Option<u64>, at: &str) {
    for (addr, s) in &l.index {
        let slot = &l.slots[*s as usize];
        let v = store
            .learned
            .get(addr)
            .unwrap_or_else(|| panic!("{at}: {addr:?} missing"));
        assert_eq!(
            (v.port_set, v.extra_set),
            (slot.port_set, NO_PORT_SET),
            "{at}: entry of {addr:?} (every answer handled: no second port set is left)"
        );
        assert_eq!(slot.extra_set, NO_PORT_SET, "{at}: view of {addr:?}");
        let want = (slot.names())
            .map(|h| {
                l.names
                    .lookup(&l.name_ids.get(h.name).name)
                    .expect("allowed")
                    .0
                    .clone()
            })
            .reduce(|a, b| a.union(&b))
            .expect("a name");
        let mut registry = l.port_sets.clone();
        assert_eq!(
            registry.intern(&want),
            v.port_set,
            "{at}: ports of {addr:?}"
        );
        for h in slot.names() {
            let expired = now.is_some_and(|now| h.expires <= now);
            assert!(!expired, "{at}: {addr:?} kept past its expiry");
            assert_eq!(
                l.name_ids.get(h.name).addrs[h.at as usize],
                *s,
                "{at}: list of {}",
                h.name
            );
        }
    }
    for id in l.name_ids.live() {
        for (at, s) in l.name_ids.get(id).addrs.iter().enumerate() {
            let held = l.slots[*s as usize].names().find(|h| h.name == id);
            assert_eq!(held.map(|h| h.at as usize), Some(at), "{at}: name {id}");
        }
    }
}

/// What must hold once every journal change is written: `LEARNED_NAMES` holds a record
/// of each (address, name) pair and no other, each at most the slack early.
fn check_journal(l: &mut Learner, store: &mut FakeStore, rng: &mut Rng, at: &str) {
    while !store.flush(l, 1 + rng.below(4)) {}
    let pairs: HashMap<LearnedNameKey, u64> = (l.learned())
        .flat_map(|(addr, names)| names.map(|(n, e)| (LearnedNameKey::new(*addr, n), e)))
        .collect();
    let mut recorded: Vec<_> = store.names.keys().collect();
    let mut held: Vec<_> = pairs.keys().collect();
    recorded.sort();
    held.sort();
    assert_eq!(recorded, held, "{at}: the records are the pairs");
    for (key, expires) in &pairs {
        let written = store.names[key];
        assert!(
            written <= *expires && !journal::stale(written, *expires),
            "{at}: record of {key:?} written with {written}, the pair expires at {expires}"
        );
    }
}

#[test]
fn the_view_of_learned_stays_what_the_store_holds() {
    for seed in 1..=24u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut store = FakeStore::default();
        let mut l = learner();
        store.ports.extend(l.port_sets.entries().copied());
        let mut queue = std::collections::VecDeque::new();
        let mut now = T0;
        for step in 0..300 {
            let at = format!("seed {seed} step {step}");
            for _ in 0..=rng.below(3) {
                now += rng.below(100) as u64 * 1_000_000;
                if let Some(ev) = kernel_handles(&l, &mut store, &random_answer(&mut rng), now) {
                    queue.push_back(ev);
                }
            }
            // The agent reads the ring a moment later, and not always all of it.
            now += rng.below(100) as u64 * 1_000_000;
            let keep = if rng.below(3) == 0 { rng.below(3) } else { 0 };
            while queue.len() > keep {
                let ev = queue.pop_front().expect("queued");
                feed(&mut l, &mut store, &ev, now).expect("answer");
            }
            if rng.below(2) == 0 {
                store.flush(&mut l, 1 + rng.below(4));
            }
            if !queue.is_empty() {
                continue;
            }
            l.drained();
            check_view(&l, &store, None, &at);
            if rng.below(4) == 0 {
                check_journal(&mut l, &mut store, &mut rng, &at);
            }
            if rng.below(4) == 0 {
                now += rng.below(40) as u64 * NS_PER_SEC;
            }
            l.expire(&mut store, now).expect("expire");
            check_view(&l, &store, Some(now), &at);
            if step == 150 {
                let policy = parse(
                    "allow:\n  - fqdn: mcr.microsoft.com\n    ports: [TCP:8443]\n  - fqdn: \"*.hcp.eastus.azmk8s.io\"\n    ports: [HTTPS:443]\ndns:\n  min_ttl: 10\n  max_ttl: 600\n  max_ips_per_name: 2\n  max_ips: 4\n",
                    "reload.yaml",
                )
                .expect("policy");
                let compiled =
                    crate::compile::compile_with(&policy, l.port_sets().clone()).expect("compiles");
                let sets = compiled.sets_in_use().expect("names");
                store.ports.extend(compiled.port_sets.entries().copied());
                l.reload(
                    &mut store,
                    compiled.names,
                    compiled.port_sets,
                    policy.dns,
                    &sets,
                    now,
                )
                .expect("reload");
                check_view(&l, &store, Some(now), &at);
                check_journal(&mut l, &mut store, &mut rng, &at);
            }
        }
    }
}

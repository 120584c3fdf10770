use std::{
    collections::VecDeque,
    mem::offset_of,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    str::FromStr as _,
    sync::Mutex,
};

use egress_common::{
    Addr, DNS_EVENT_HEADER, DnsEvent, LearnedName, LearnedNameKey, LearnedValue, MODE_AUDIT,
    MODE_ENFORCE, PortKey, Settings, proto, v4_mapped,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};

use super::*;
use crate::{
    compile::{Compiled, compile},
    dns::{
        learner::{LearnedStore, store::fake::FakeStore},
        seen::SeenNames,
    },
    loader::PolicyEntries,
    policy::parse,
};

/// The kernel state, in memory: the learner's maps and what the control task writes.
#[derive(Default)]
struct FakeState {
    maps: FakeStore,
    cidrs: usize,
    resolvers: Vec<IpAddr>,
    settings: Option<Settings>,
    recorded: Option<(PathBuf, Vec<u8>)>,
    stats: Stats,
}

impl LearnedStore for FakeState {
    fn get(&self, addr: &Addr) -> Option<LearnedValue> {
        self.maps.get(addr)
    }

    fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()> {
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

impl KernelState for FakeState {
    fn write_policy(&mut self, compiled: &Compiled) -> Result<(), LoadError> {
        self.maps.ports.extend(compiled.port_sets.entries());
        self.cidrs = compiled.cidr_entries().count();
        Ok(())
    }

    fn write_resolvers(&mut self, resolvers: &[IpAddr]) -> Result<(), LoadError> {
        self.resolvers = resolvers.to_vec();
        Ok(())
    }

    fn write_settings(&mut self, settings: &Settings) -> Result<(), LoadError> {
        self.settings = Some(*settings);
        Ok(())
    }

    fn update_learned_names(
        &mut self,
        delete: &[LearnedNameKey],
        put: &[(LearnedNameKey, LearnedName)],
    ) -> Result<(), LoadError> {
        for key in delete {
            self.maps.names.remove(key);
        }
        for (key, record) in put {
            self.maps.names.insert(*key, record.expires_ns);
        }
        Ok(())
    }

    fn record_policy(
        &mut self,
        _pins: &PinRoot,
        config: &Path,
        bytes: &[u8],
    ) -> anyhow::Result<()> {
        self.recorded = Some((config.to_path_buf(), bytes.to_vec()));
        Ok(())
    }

    fn policy_entries(&self) -> PolicyEntries {
        PolicyEntries {
            cidrs: self.cidrs,
            names: 0,
            resolvers: self.resolvers.len(),
        }
    }

    fn stats(&self) -> Result<Stats, LoadError> {
        Ok(self.stats)
    }
}

const AUDIT: &str = "
mode: audit
dns:
  resolvers: [198.51.100.53]
allow:
  - cidr: 203.0.113.0/24
    ports: [TCP:443]
";

const ENFORCE: &str = "
mode: enforce
dns:
  resolvers: [198.51.100.53, 2001:db8::53]
allow:
  - cidr: 203.0.113.0/24
    ports: [TCP:443]
  - cidr: 198.51.100.0/25
    ports: [TCP:80, TCP:8080]
";

/// A control task running `yaml`, with `legacy` as a previous agent's port sets.
fn control(yaml: &str, legacy: LegacySets) -> Control<FakeState> {
    let policy = parse(yaml, "policy.yaml").expect("valid policy");
    let compiled = compile(&policy).expect("compiles");
    let mut enforcer = FakeState::default();
    enforcer.write_policy(&compiled).expect("in memory");
    Control {
        enforcer,
        learner: Learner::new(compiled.names, compiled.port_sets, policy.dns.clone()),
        mode_override: None,
        learned_capacity: policy.dns.max_ips,
        keep_on_exit: false,
        legacy,
        journal_behind: false,
        dns_events_lost: 0,
        pins: PinRoot::new("/nonexistent/egress-test"),
        config: PathBuf::from("/etc/egress/policy.yaml"),
        running: Running::default(),
        reloads: Reloads::default(),
        names: Arc::new(Mutex::new(SeenNames::new(16))),
    }
}

fn reloaded(yaml: &str) -> Reloaded {
    Reloaded {
        policy: parse(yaml, "policy.yaml").expect("valid policy"),
        bytes: yaml.as_bytes().to_vec(),
    }
}

#[test]
fn a_reload_writes_the_policy_its_resolvers_and_settings_then_records_it() {
    let mut c = control(AUDIT, LegacySets::default());
    let sha256 = c.reload(reloaded(ENFORCE)).expect("applies");
    assert_eq!(
        sha256,
        crate::policy::policy_sha256(ENFORCE.as_bytes(), b"")
    );
    let state = &c.enforcer;
    assert_eq!(state.cidrs, 2);
    assert!(
        [80, 8080, 443]
            .iter()
            .all(|p| state.maps.ports.iter().any(|k| k.port == *p))
    );
    assert_eq!(
        state
            .resolvers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["198.51.100.53", "2001:db8::53"]
    );
    assert_eq!(state.settings.expect("written").mode, MODE_ENFORCE);
    assert_eq!(
        state.recorded,
        Some((
            c.config.clone(),
            crate::record::content(ENFORCE.as_bytes(), b"")
        ))
    );
}

#[test]
fn the_mode_given_on_the_command_line_wins_over_a_reloaded_policy() {
    let mut c = control(AUDIT, LegacySets::default());
    c.mode_override = Some(Mode::Audit);
    c.reload(reloaded(ENFORCE)).expect("applies");
    assert_eq!(c.enforcer.settings.expect("written").mode, MODE_AUDIT);
}

#[test]
fn a_reload_keeps_the_port_sets_of_both_policies_apart() {
    let mut c = control(AUDIT, LegacySets::default());
    let before = c.learner.port_sets().entries().len();
    c.reload(reloaded(ENFORCE)).expect("applies");
    assert!(c.learner.port_sets().entries().len() > before);
}

#[test]
fn a_tick_removes_a_previous_agent_s_port_sets_once_nothing_refers_to_them() {
    let old = PortKey::new(7, proto::TCP, 22);
    // Referred to by one learned address until boot-time 1 ns: long gone when the tick runs.
    let learned = [(v4_mapped([203, 0, 113, 7]), LearnedValue::new(7, 1))];
    let (legacy, _, unused) = LegacySets::new(vec![old], &learned, 0);
    assert!(unused.is_empty());
    let mut c = control(AUDIT, legacy);
    c.enforcer.maps.ports.insert(old);
    c.tick(None).expect("ticks");
    assert!(!c.enforcer.maps.ports.contains(&old));
    assert_eq!(c.legacy.len(), 0);
}

#[test]
fn answers_lost_to_a_full_ring_are_noted_once() {
    let mut c = control(AUDIT, LegacySets::default());
    let stats = Stats {
        dns_events_lost: 3,
        ..Stats::default()
    };
    c.tick(Some(&stats)).expect("ticks");
    assert_eq!(c.dns_events_lost, 3);
    c.tick(None).expect("ticks without counters");
    assert_eq!(c.dns_events_lost, 3, "no counters: the last count stands");
}

#[test]
fn publishing_sends_the_counters_and_a_failed_read_sends_nothing() {
    let mut c = control(AUDIT, LegacySets::default());
    c.enforcer.stats.dns_answers = 5;
    let (tx, rx) = watch::channel(None);
    c.publish(c.enforcer.stats(), &tx);
    let sent = rx.borrow().expect("a snapshot");
    assert_eq!(sent.stats.dns_answers, 5);
    assert_eq!(sent.policy.cidrs, 1);
    assert_eq!(sent.policy.resolvers, 0, "the resolvers are written by run");
    assert_eq!(sent.learned_capacity, c.learned_capacity);
    c.enforcer.stats.dns_answers = 6;
    c.publish(Err(LoadError::MissingMap("STATS")), &tx);
    assert_eq!(rx.borrow().expect("the last snapshot").stats.dns_answers, 5);
}

/// A ring buffer's records, in memory.
impl Records for VecDeque<Vec<u8>> {
    fn next_with<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Option<T> {
        self.pop_front().map(|record| f(&record))
    }
}

const NAMED: &str = "
dns:
  resolvers: [198.51.100.53]
allow:
  - fqdn: app.example.com
    ports: [TCP:443]
";

/// A `DNS_EVENTS` record as the kernel sends it: the header (nothing learned in the
/// kernel) and an answer giving `addr` for `qname`.
fn dns_record(qname: &str, addr: [u8; 4]) -> Vec<u8> {
    let name = Name::from_str(qname).expect("a name");
    let mut msg = Message::new(7, MessageType::Response, OpCode::Query);
    msg.add_query(Query::query(name.clone(), RecordType::A));
    msg.add_answer(Record::from_rdata(
        name,
        300,
        RData::A(A::from(Ipv4Addr::from(addr))),
    ));
    let msg = msg.to_vec().expect("encodes");
    let mut record = vec![0; DNS_EVENT_HEADER];
    let at = offset_of!(DnsEvent, len);
    record[at..at + 2].copy_from_slice(&u16::try_from(msg.len()).expect("short").to_ne_bytes());
    record.extend(msg);
    record
}

#[test]
fn drain_hands_every_answer_on_and_skips_records_of_another_size() {
    let mut c = control(NAMED, LegacySets::default());
    let (a, b) = ([203, 0, 113, 7], [203, 0, 113, 8]);
    let record = dns_record("app.example.com.", a);
    // The previous release's format: the whole event, whatever the message's length.
    let mut whole = dns_record("app.example.com.", b);
    whole.resize(size_of::<DnsEvent>(), 0);
    let mut ring = VecDeque::from([
        record[..DNS_EVENT_HEADER - 1].to_vec(),
        record.clone(),
        record[..record.len() - 1].to_vec(),
        [record.as_slice(), &[0]].concat(),
        whole,
        vec![0; size_of::<DnsEvent>() + 8],
    ]);
    assert_eq!(c.drain(&mut ring).expect("drains"), 2);
    assert!(ring.is_empty(), "every record is taken");
    assert_eq!(c.learner.counters.answers, 2);
    let names = c.names.lock().expect("not poisoned");
    for addr in [a, b] {
        assert!(
            c.enforcer.maps.learned.contains_key(&v4_mapped(addr)),
            "{addr:?} is learned"
        );
        assert_eq!(
            names.names(Ipv4Addr::from(addr).into()),
            ["app.example.com"],
            "{addr:?} is named"
        );
    }
}

#[test]
fn drain_of_an_empty_ring_hands_nothing_on() {
    let mut c = control(NAMED, LegacySets::default());
    assert_eq!(c.drain(&mut VecDeque::new()).expect("drains"), 0);
    assert_eq!(c.learner.counters.answers, 0);
}

#[test]
fn drain_counts_an_answer_for_a_name_no_rule_allows_but_learns_nothing_from_it() {
    let mut c = control(NAMED, LegacySets::default());
    let mut ring = VecDeque::from([dns_record("other.example.com.", [203, 0, 113, 9])]);
    assert_eq!(c.drain(&mut ring).expect("drains"), 1);
    assert!(c.enforcer.maps.learned.is_empty());
    assert_eq!(c.learner.counters.unmatched, 1);
}

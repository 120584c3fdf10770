//! The kernel's DNS answer parser under hostile input, through `BPF_PROG_TEST_RUN`: a query
//! leaves for the trusted resolver (`egress_cgroup`), a crafted answer comes back
//! (`ingress_cgroup`), and `LEARNED` and the counters show what the kernel made of it.
//! Needs root (CAP_BPF); in CI (`CI=true`) a missing privilege fails the test instead of
//! skipping it.

mod common;

use common::privileged;
use egress_test_support::frame::{self, CLIENT4, CLIENT6, syn};
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{MapData, RingBuf};
use egress_agent::{
    compile::{compile, settings},
    dns::{
        answer::{DnsAnswer, decode_dns},
        learner::LearnedStore as _,
    },
    loader::{ByProto, EGRESS_CGROUP, Enforcer, INGRESS_CGROUP, Stats},
    policy::{Mode, parse},
    sys::boot_time_ns,
};
use egress_common::{
    DNS_EVENT_HEADER, DNS_MAX_PAYLOAD, DnsEvent,
    addr::{display_addr, to_key},
};

const PASS: u32 = 1;

/// One event reached the agent, naming the one address the kernel learned (`ADDR`).
fn assert_learned_reported(events: &[DnsEvent], what: &str) {
    assert_eq!(events.len(), 1, "{what}: one event");
    assert_eq!(events[0].learned, 1, "{what}");
    assert_eq!(
        events[0].addrs[0],
        ADDR.to_ipv6_mapped().octets(),
        "{what}: the event names the learned address"
    );
}

const POLICY: &str = "
allow:
  - fqdn: app.example.com
    ports: [HTTPS:443]
  - fqdn: \"*.hcp.eastus.example.net\"
    ports: [HTTPS:443]
dns:
  resolvers: [198.51.100.53, 2001:db8:53::53]
";

const RESOLVER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
const RESOLVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x53, 0, 0, 0, 0, 0x53);
const CLIENT_PORT: u16 = 40000;
const DNS_PORT: u16 = 53;

const APP: &str = "app.example.com";
const ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const ID: u16 = 0x1234;
const TTL: u32 = 300;

// ---- DNS messages ---------------------------------------------------------------------

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_NULL: u16 = 10;
const TYPE_OPT: u16 = 41;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const QUERY_FLAGS: u16 = 0x0100; // RD
const RESPONSE_FLAGS: u16 = 0x8180; // QR, RD, RA
const HEADER_LEN: usize = 12;
/// Offsets of header fields.
const FLAGS_AT: usize = 2;
const QDCOUNT_AT: usize = 4;
const ANCOUNT_AT: usize = 6;
const ARCOUNT_AT: usize = 10;
/// A record's type, class, TTL and data length.
const RECORD_FIXED_LEN: usize = 10;
/// A compression pointer to the question name.
const TO_QUESTION: [u8; 2] = [0xc0, HEADER_LEN as u8];

/// A name in wire format: length-prefixed labels and the root label.
fn wire(name: &str) -> Vec<u8> {
    let mut w = Vec::new();
    for label in name.split('.') {
        w.push(u8::try_from(label.len()).expect("short label"));
        w.extend_from_slice(label.as_bytes());
    }
    w.push(0);
    w
}

/// A compression pointer to `offset`.
fn pointer(offset: usize) -> [u8; 2] {
    let offset = u16::try_from(offset).expect("small offset") | 0xc000;
    offset.to_be_bytes()
}

fn set16(msg: &mut [u8], at: usize, value: u16) {
    msg[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn get16(msg: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([msg[at], msg[at + 1]])
}

/// A DNS message: a header, one question (type A, class IN), then records; the header's
/// counts follow what is added.
struct Message(Vec<u8>);

impl Message {
    fn new(id: u16, flags: u16, qname: &[u8]) -> Self {
        let mut m = Vec::new();
        for field in [id, flags, 1, 0, 0, 0] {
            m.extend_from_slice(&field.to_be_bytes());
        }
        m.extend_from_slice(qname);
        m.extend_from_slice(&TYPE_A.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        Self(m)
    }

    fn query(id: u16, name: &str) -> Self {
        Self::new(id, QUERY_FLAGS, &wire(name))
    }

    fn response(id: u16, name: &str) -> Self {
        Self::new(id, RESPONSE_FLAGS, &wire(name))
    }

    /// Adds an answer record.
    fn answer(self, owner: &[u8], rtype: u16, rdata: &[u8]) -> Self {
        self.record(ANCOUNT_AT, owner, rtype, rdata)
    }

    /// Adds an additional record.
    fn additional(self, owner: &[u8], rtype: u16, rdata: &[u8]) -> Self {
        self.record(ARCOUNT_AT, owner, rtype, rdata)
    }

    fn record(mut self, count_at: usize, owner: &[u8], rtype: u16, rdata: &[u8]) -> Self {
        let count = get16(&self.0, count_at);
        set16(&mut self.0, count_at, count + 1);
        self.0.extend_from_slice(owner);
        self.0.extend_from_slice(&rtype.to_be_bytes());
        self.0.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.0.extend_from_slice(&TTL.to_be_bytes());
        let rdlen = u16::try_from(rdata.len()).expect("small record");
        self.0.extend_from_slice(&rdlen.to_be_bytes());
        self.0.extend_from_slice(rdata);
        self
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Where the data of the next record starts if its owner is a compression pointer.
    fn next_rdata(&self) -> usize {
        self.len() + TO_QUESTION.len() + RECORD_FIXED_LEN
    }

    fn a(self, addr: Ipv4Addr) -> Self {
        self.answer(&TO_QUESTION, TYPE_A, &addr.octets())
    }

    fn bytes(self) -> Vec<u8> {
        self.0
    }
}

/// The well-formed answer most cases start from: `app.example.com A 203.0.113.7`.
fn app_answer() -> Vec<u8> {
    Message::response(ID, APP).a(ADDR).bytes()
}

// ---- frames ---------------------------------------------------------------------------

/// The two ends of a DNS exchange and its transport.
#[derive(Clone, Copy)]
struct Path {
    client: IpAddr,
    resolver: IpAddr,
    client_port: u16,
    tcp: bool,
}

const UDP4: Path = Path {
    client: IpAddr::V4(CLIENT4),
    resolver: IpAddr::V4(RESOLVER4),
    client_port: CLIENT_PORT,
    tcp: false,
};
const TCP4: Path = Path { tcp: true, ..UDP4 };
const UDP6: Path = Path {
    client: IpAddr::V6(CLIENT6),
    resolver: IpAddr::V6(RESOLVER6),
    ..UDP4
};

impl Path {
    /// `msg` from the client to the resolver.
    fn query(&self, msg: &[u8]) -> Vec<u8> {
        frame::dns(
            self.client,
            self.resolver,
            self.client_port,
            DNS_PORT,
            self.tcp,
            msg,
        )
    }

    /// `msg` from the resolver back to the client.
    fn answer(&self, msg: &[u8]) -> Vec<u8> {
        frame::dns(
            self.resolver,
            self.client,
            DNS_PORT,
            self.client_port,
            self.tcp,
            msg,
        )
    }
}

// ---- the enforcer ---------------------------------------------------------------------

/// One loaded enforcer with the test policy and its resolvers.
struct Dns {
    enforcer: Enforcer,
    events: RingBuf<MapData>,
    /// Source port of the next connection `connects` tries (each is a new flow).
    next_port: u16,
}

impl Dns {
    fn new() -> Self {
        let policy = parse(POLICY, "dns-kernel-test.yaml").expect("test policy parses");
        let mut enforcer =
            Enforcer::load_for_test_run(&settings(Mode::Enforce, &policy.dns), policy.dns.max_ips)
                .expect("kernel object loads");
        enforcer
            .write_policy(&compile(&policy).expect("test policy compiles"))
            .expect("maps accept the policy");
        let resolvers = policy.dns.resolvers.as_deref().expect("listed resolvers");
        enforcer
            .write_resolvers(resolvers)
            .expect("maps accept the resolvers");
        let events = enforcer.take_dns_events().expect("DNS ring buffer");
        Self {
            enforcer,
            events,
            next_port: 50000,
        }
    }

    fn run(&self, program: &'static str, frame: &[u8]) -> u32 {
        self.enforcer
            .test_run(program, frame, 1)
            .expect("test run")
            .return_value
    }

    fn stats(&self) -> Stats {
        self.enforcer.stats().expect("counters")
    }

    /// Sends `query` out and `answer` back (both frames); returns what the answer moved.
    /// Queries to a trusted resolver always pass, and the ingress program never drops.
    fn exchange(&self, query: &[u8], answer: &[u8]) -> Stats {
        assert_eq!(self.run(EGRESS_CGROUP, query), PASS, "the query passes");
        let before = self.stats();
        assert_eq!(
            self.run(INGRESS_CGROUP, answer),
            PASS,
            "ingress never drops"
        );
        delta(&self.stats(), &before)
    }

    /// The standard exchange: a UDP query for app.example.com with id `ID`, and `answer`.
    fn reply(&self, answer: &[u8]) -> Stats {
        self.exchange(
            &UDP4.query(&Message::query(ID, APP).bytes()),
            &UDP4.answer(answer),
        )
    }

    /// Every address in `LEARNED`, which is emptied for the next case.
    fn take_learned(&mut self) -> BTreeSet<IpAddr> {
        let addrs: Vec<_> = (self.enforcer.learned_entries().expect("LEARNED iterates"))
            .into_iter()
            .map(|(addr, _)| addr)
            .collect();
        for a in &addrs {
            self.enforcer.remove(a).expect("LEARNED deletes");
        }
        addrs.iter().map(display_addr).collect()
    }

    /// Whether a new TCP connection from the client to `dst:port` passes.
    fn connects(&mut self, dst: IpAddr, port: u16) -> bool {
        self.next_port += 1;
        self.run(EGRESS_CGROUP, &syn(dst, self.next_port, port)) == PASS
    }

    /// The answers handed to the agent since the last call, whole. Each record holds the
    /// event's header and the message, nothing after it, and decodes to what it holds.
    fn events(&mut self) -> Vec<DnsEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            assert!(item.len() >= DNS_EVENT_HEADER, "record size");
            // SAFETY: DnsEvent is plain old data (all zeroes is a value) and the record,
            // checked long enough, starts with its header.
            let mut event = unsafe {
                let mut event = std::mem::zeroed::<DnsEvent>();
                std::ptr::copy_nonoverlapping(
                    item.as_ptr(),
                    (&raw mut event).cast::<u8>(),
                    DNS_EVENT_HEADER,
                );
                event
            };
            let len = usize::from(event.len);
            assert_eq!(item.len(), DNS_EVENT_HEADER + len, "record size");
            event.payload[..len].copy_from_slice(&item[DNS_EVENT_HEADER..]);
            let decoded = decode_dns(&item).expect("a record the agent decodes");
            assert_eq!(decoded, DnsAnswer::from(&event));
            out.push(event);
        }
        out
    }
}

fn delta(after: &Stats, before: &Stats) -> Stats {
    Stats {
        allowed: delta_by_proto(&after.allowed, &before.allowed),
        dropped: delta_by_proto(&after.dropped, &before.dropped),
        audited: delta_by_proto(&after.audited, &before.audited),
        events_lost: after.events_lost - before.events_lost,
        dns_answers: after.dns_answers - before.dns_answers,
        dns_learned: after.dns_learned - before.dns_learned,
        dns_untrusted: after.dns_untrusted - before.dns_untrusted,
        dns_unsolicited: after.dns_unsolicited - before.dns_unsolicited,
        dns_unmatched: after.dns_unmatched - before.dns_unmatched,
        dns_malformed: after.dns_malformed - before.dns_malformed,
        dns_events_lost: after.dns_events_lost - before.dns_events_lost,
    }
}

fn delta_by_proto(after: &ByProto, before: &ByProto) -> ByProto {
    ByProto {
        tcp: after.tcp - before.tcp,
        udp: after.udp - before.udp,
        icmp: after.icmp - before.icmp,
        other: after.other - before.other,
    }
}

fn learned_one() -> Stats {
    Stats {
        dns_answers: 1,
        dns_learned: 1,
        ..Stats::default()
    }
}

fn unsolicited() -> Stats {
    Stats {
        dns_unsolicited: 1,
        ..Stats::default()
    }
}

fn unmatched() -> Stats {
    Stats {
        dns_answers: 1,
        dns_unmatched: 1,
        ..Stats::default()
    }
}

fn malformed() -> Stats {
    Stats {
        dns_malformed: 1,
        ..Stats::default()
    }
}

/// Malformed past the question: the answer matched its query and was counted first.
fn malformed_answer() -> Stats {
    Stats {
        dns_answers: 1,
        dns_malformed: 1,
        ..Stats::default()
    }
}

fn set<const N: usize>(addrs: [&str; N]) -> BTreeSet<IpAddr> {
    addrs
        .iter()
        .map(|a| a.parse().expect("address literal"))
        .collect()
}

fn none() -> BTreeSet<IpAddr> {
    BTreeSet::new()
}

// ---- tests ----------------------------------------------------------------------------

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn a_well_formed_answer_teaches_its_address_with_the_names_ports() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let answer = app_answer();
    let before = boot_time_ns();
    assert_eq!(dns.reply(&answer), learned_one());
    let after = boot_time_ns();
    let learned = dns.enforcer.get(&to_key(ADDR.into())).expect("learned");
    let ttl_ns = u64::from(TTL) * 1_000_000_000;
    assert!((before + ttl_ns..=after + ttl_ns).contains(&learned.expires_ns));
    assert!(
        dns.connects(ADDR.into(), 443),
        "HTTPS:443 is the name's port"
    );
    assert!(!dns.connects(ADDR.into(), 80), "and the only one");
    let events = dns.events();
    assert_eq!(events.len(), 1, "the agent gets the answer");
    let event = &events[0];
    assert_eq!(event.resolver, to_key(RESOLVER4.into()));
    assert_eq!(event.client, to_key(CLIENT4.into()));
    assert_eq!(event.learned, 1);
    assert_eq!(
        &event.payload[..usize::from(event.len)],
        answer.as_slice(),
        "the whole message"
    );
    assert_eq!(dns.take_learned(), set(["203.0.113.7"]));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn an_aaaa_answer_over_ipv6_is_learned() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let v6: Ipv6Addr = "2001:db8:7::7".parse().expect("literal");
    let answer = Message::response(ID, APP)
        .answer(&TO_QUESTION, TYPE_AAAA, &v6.octets())
        .bytes();
    let query = Message::query(ID, APP).bytes();
    assert_eq!(
        dns.exchange(&UDP6.query(&query), &UDP6.answer(&answer)),
        learned_one()
    );
    assert!(dns.connects(v6.into(), 443));
    assert!(!dns.connects(v6.into(), 80));
    assert_eq!(dns.take_learned(), set(["2001:db8:7::7"]));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn dns_over_tcp_is_learned() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let query = Message::query(ID, APP).bytes();
    assert_eq!(
        dns.exchange(&TCP4.query(&query), &TCP4.answer(&app_answer())),
        learned_one()
    );
    assert_eq!(dns.take_learned(), set(["203.0.113.7"]));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn a_query_longer_than_what_the_kernel_reads_of_it_is_remembered() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    // EDNS padding (RFC 7830) after the question: the kernel reads a query's first 512
    // bytes, which hold the header and the longest question name.
    let query = Message::query(ID, APP)
        .additional(&[0], TYPE_OPT, &[0; 1000])
        .bytes();
    assert!(query.len() > 512);
    assert_eq!(
        dns.exchange(&UDP4.query(&query), &UDP4.answer(&app_answer())),
        learned_one()
    );
    assert_eq!(dns.take_learned(), set(["203.0.113.7"]));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn owner_names_need_not_be_compressed() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let addrs = ["203.0.113.7", "203.0.113.8", "203.0.113.9", "2001:db8:7::7"];
    let answer = addrs.iter().fold(Message::response(ID, APP), |m, a| {
        match a.parse::<IpAddr>().expect("address literal") {
            IpAddr::V4(v4) => m.answer(&wire(APP), TYPE_A, &v4.octets()),
            IpAddr::V6(v6) => m.answer(&wire(APP), TYPE_AAAA, &v6.octets()),
        }
    });
    let learned_all = Stats {
        dns_answers: 1,
        dns_learned: 4,
        ..Stats::default()
    };
    assert_eq!(dns.reply(&answer.bytes()), learned_all);
    assert_eq!(dns.take_learned(), set(addrs));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn the_answer_may_spell_the_question_in_another_case() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let query = UDP4.query(&Message::query(ID, "aPP.example.COM").bytes());
    let answer = Message::response(ID, "App.Example.com").a(ADDR).bytes();
    assert_eq!(dns.exchange(&query, &UDP4.answer(&answer)), learned_one());
    assert_eq!(dns.take_learned(), set(["203.0.113.7"]));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn answers_from_any_other_address_are_untrusted() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let rogue = Path {
        resolver: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 54)),
        ..UDP4
    };
    let query = UDP4.query(&Message::query(ID, APP).bytes());
    let untrusted = Stats {
        dns_untrusted: 1,
        ..Stats::default()
    };
    assert_eq!(
        dns.exchange(&query, &rogue.answer(&app_answer())),
        untrusted
    );
    assert_eq!(dns.take_learned(), none());
    // The query is still open: the resolver's own answer counts.
    let before = dns.stats();
    assert_eq!(dns.run(INGRESS_CGROUP, &UDP4.answer(&app_answer())), PASS);
    assert_eq!(delta(&dns.stats(), &before), learned_one());
    assert_eq!(dns.take_learned(), set(["203.0.113.7"]));
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn answers_must_match_their_query() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let query = UDP4.query(&Message::query(ID, APP).bytes());
    let other_port = Path {
        client_port: CLIENT_PORT + 1,
        ..UDP4
    };
    let other_name = Message::response(ID, "other.example.com").a(ADDR).bytes();
    let cases = [
        (
            "another id",
            UDP4.answer(&Message::response(ID + 1, APP).a(ADDR).bytes()),
        ),
        ("another client port", other_port.answer(&app_answer())),
        ("another question", UDP4.answer(&other_name)),
        ("TCP for a UDP query", TCP4.answer(&app_answer())),
    ];
    for (what, answer) in cases {
        assert_eq!(dns.exchange(&query, &answer), unsolicited(), "{what}");
        assert_eq!(dns.take_learned(), none(), "{what}");
    }
    // One answer per query: a second one, even from the resolver, is a forgery.
    assert_eq!(
        dns.exchange(&query, &UDP4.answer(&app_answer())),
        learned_one()
    );
    assert_eq!(dns.take_learned(), set(["203.0.113.7"]));
    let second = Message::response(ID, APP)
        .a(Ipv4Addr::new(203, 0, 113, 66))
        .bytes();
    let before = dns.stats();
    assert_eq!(dns.run(INGRESS_CGROUP, &UDP4.answer(&second)), PASS);
    assert_eq!(delta(&dns.stats(), &before), unsolicited());
    assert_eq!(dns.take_learned(), none());
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn names_match_case_blind_and_wildcards_only_strictly_inside_their_zone() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let learned = [
        "App.Example.COM",
        "x.hcp.eastus.example.net",
        "a.b.HCP.eastus.example.net",
    ];
    let not_allowed = [
        "other.example.com",
        "example.com",
        "xapp.example.com",
        "app.example.com.evil.example",
        "hcp.eastus.example.net",
        "a.xhcp.eastus.example.net",
        "hcp.eastus.example.net.evil.example",
    ];
    // A dot inside a label is part of the label: these names have one label fewer.
    let dotted: [&[u8]; 2] = [
        b"\x05x.hcp\x06eastus\x07example\x03net\x00",
        b"\x0bapp.example\x03com\x00",
    ];
    let teaches = |name: &str| (wire(name), learned_one(), set(["203.0.113.7"]));
    let teaches_nothing = |name: Vec<u8>| (name, unmatched(), none());
    let cases = (learned.map(teaches).into_iter())
        .chain(not_allowed.map(|n| teaches_nothing(wire(n))))
        .chain(dotted.map(|n| teaches_nothing(n.to_vec())));
    for (id, (name, want, learned)) in (1..).zip(cases) {
        let what = String::from_utf8_lossy(&name).into_owned();
        let query = UDP4.query(&Message::new(id, QUERY_FLAGS, &name).bytes());
        let answer = UDP4.answer(&Message::new(id, RESPONSE_FLAGS, &name).a(ADDR).bytes());
        assert_eq!(dns.exchange(&query, &answer), want, "{what}");
        assert_eq!(dns.take_learned(), learned, "{what}");
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn malformed_headers_teach_nothing() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let with_header = |flags: u16, qdcount: u16| {
        let mut m = app_answer();
        set16(&mut m, FLAGS_AT, flags);
        set16(&mut m, QDCOUNT_AT, qdcount);
        m
    };
    let cases = [
        ("QR clear", with_header(RESPONSE_FLAGS & !0x8000, 1)),
        (
            "opcode 1 (inverse query)",
            with_header(RESPONSE_FLAGS | (1 << 11), 1),
        ),
        (
            "opcode 5 (update)",
            with_header(RESPONSE_FLAGS | (5 << 11), 1),
        ),
        ("qdcount 0", with_header(RESPONSE_FLAGS, 0)),
        ("qdcount 2", with_header(RESPONSE_FLAGS, 2)),
    ];
    for (what, answer) in cases {
        assert_eq!(dns.reply(&answer), malformed(), "{what}");
        assert_eq!(dns.take_learned(), none(), "{what}");
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn hostile_question_names_teach_nothing() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let with_qname = |qname: &[u8]| Message::new(ID, RESPONSE_FLAGS, qname).a(ADDR).bytes();
    let label = |len: usize| {
        let mut l = vec![u8::try_from(len).expect("label length")];
        l.extend(std::iter::repeat_n(b'a', len));
        l
    };
    // 256 bytes with the root label: one more than a name may have.
    let too_long = [label(63), label(63), label(63), label(62), vec![0]].concat();
    let cases = [
        ("a pointer to the question itself", TO_QUESTION.to_vec()),
        ("a pointer into the header", pointer(4).to_vec()),
        (
            "a pointer after a label",
            [&label(3)[..], &TO_QUESTION].concat(),
        ),
        ("a label of 64 bytes", [label(64), vec![0]].concat()),
        ("label type 0b10", [vec![0x80, b'a'], vec![0]].concat()),
        ("a name of 256 bytes", too_long),
    ];
    for (what, qname) in cases {
        assert_eq!(dns.reply(&with_qname(&qname)), malformed(), "{what}");
        assert_eq!(dns.take_learned(), none(), "{what}");
    }
    // 255 bytes is the longest name there is: parsed, and allowed by no rule.
    let longest = [label(63), label(63), label(63), label(61), vec![0]].concat();
    assert_eq!(longest.len(), 255);
    let query = Message::new(ID, QUERY_FLAGS, &longest).bytes();
    assert_eq!(
        dns.exchange(&UDP4.query(&query), &UDP4.answer(&with_qname(&longest))),
        unmatched()
    );
    assert_eq!(dns.take_learned(), none());
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn a_truncated_answer_teaches_nothing_at_any_length() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let answer = app_answer();
    let question_end = HEADER_LEN + wire(APP).len();
    for cut in 0..answer.len() {
        let want = if cut < HEADER_LEN {
            Stats::default() // not even a header: no answer at all
        } else if cut < question_end {
            malformed()
        } else {
            malformed_answer()
        };
        assert_eq!(dns.reply(&answer[..cut]), want, "cut at {cut}");
        assert_eq!(dns.take_learned(), none(), "cut at {cut}");
    }
    assert_eq!(dns.events().len(), 0, "nothing reaches the agent");
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn hostile_answer_records_teach_nothing_else() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();

    for rdlen in [5, 0xffff] {
        let mut past_the_end = app_answer();
        let rdlen_at = past_the_end.len() - 4 - 2; // before the address
        set16(&mut past_the_end, rdlen_at, rdlen);
        assert_eq!(
            dns.reply(&past_the_end),
            malformed_answer(),
            "rdlength {rdlen}"
        );
        assert_eq!(dns.take_learned(), none(), "rdlength {rdlen}");
    }

    let a5 = Message::response(ID, APP)
        .answer(&TO_QUESTION, TYPE_A, &[203, 0, 113, 7, 1])
        .bytes();
    let answered = Stats {
        dns_answers: 1,
        ..Stats::default()
    };
    assert_eq!(dns.reply(&a5), answered, "an A record of 5 bytes");
    let aaaa4 = Message::response(ID, APP)
        .answer(&TO_QUESTION, TYPE_AAAA, &ADDR.octets())
        .bytes();
    assert_eq!(dns.reply(&aaaa4), answered, "an AAAA record of 4 bytes");
    assert_eq!(dns.take_learned(), none());
    assert_eq!(dns.events().len(), 2, "both reach the agent");

    // Label types 0b01 and 0b10 are reserved: not a pointer to the question either.
    for kind in [0x40, 0x80] {
        let bad_owner = Message::response(ID, APP)
            .answer(&[kind, TO_QUESTION[1]], TYPE_A, &ADDR.octets())
            .bytes();
        assert_eq!(dns.reply(&bad_owner), malformed_answer(), "owner {kind:#x}");
        assert_eq!(dns.take_learned(), none(), "owner {kind:#x}");
    }

    // The kernel learns while it walks: records before the one that breaks stay learned,
    // and the event names them, so that the agent (whose parser refuses the answer) takes
    // them back.
    let mut many = app_answer();
    set16(&mut many, ANCOUNT_AT, 0xffff);
    let malformed_after_one = Stats {
        dns_learned: 1,
        ..malformed_answer()
    };
    assert_eq!(dns.reply(&many), malformed_after_one, "ancount 0xffff");
    assert_eq!(dns.take_learned(), set(["203.0.113.7"]));
    assert_learned_reported(&dns.events(), "ancount 0xffff");

    // The kernel never follows an owner's compression pointer, so a loop cannot trap it;
    // it attributes the record to the question, as it does every A record. (The agent's
    // parser rejects the loop, and takes the address, named in the event, back.)
    let start = Message::response(ID, APP);
    let itself = pointer(start.len());
    let looped = start.answer(&itself, TYPE_A, &ADDR.octets()).bytes();
    assert_eq!(
        dns.reply(&looped),
        learned_one(),
        "an owner pointing at itself"
    );
    assert_eq!(dns.take_learned(), set(["203.0.113.7"]));
    assert_eq!(dns.events().len(), 1, "an owner pointing at itself");
}

/// A NULL record whose data looks like a run of A records for 198.51.100.99: a parser that
/// lost its place would learn that address.
fn decoy(rdlen: usize) -> Vec<u8> {
    let fake = [
        &TO_QUESTION[..],
        &[0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 198, 51, 100, 99],
    ]
    .concat();
    fake.iter().copied().cycle().take(rdlen).collect()
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn only_records_in_the_first_2048_bytes_are_learned() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    // The third record starts 8 bytes before the end of what the kernel reads: the walk
    // stops there, after the first.
    let straddling_at = DNS_MAX_PAYLOAD - 8;
    let head = Message::response(ID, APP).a(ADDR);
    let decoy_len = straddling_at - head.next_rdata();
    let straddling = head
        .answer(&TO_QUESTION, TYPE_NULL, &decoy(decoy_len))
        .a(Ipv4Addr::new(203, 0, 113, 8))
        .a(Ipv4Addr::new(203, 0, 113, 9))
        .bytes();
    assert_eq!(
        get16(&straddling, straddling_at + TO_QUESTION.len()),
        TYPE_A,
        "layout"
    );
    let malformed_after_one = Stats {
        dns_learned: 1,
        ..malformed_answer()
    };
    assert_eq!(dns.reply(&straddling), malformed_after_one);
    assert_eq!(dns.take_learned(), set(["203.0.113.7"]));
    assert_learned_reported(&dns.events(), "a record straddling byte 2048");

    // All answers are within the first 2048 bytes; the additional section is not.
    let head = Message::response(ID, APP)
        .a(ADDR)
        .a(Ipv4Addr::new(203, 0, 113, 8));
    let decoy_len = DNS_MAX_PAYLOAD + 100 - head.next_rdata();
    let long = head
        .additional(&TO_QUESTION, TYPE_NULL, &decoy(decoy_len))
        .additional(&TO_QUESTION, TYPE_A, &[203, 0, 113, 9])
        .bytes();
    let learned_two = Stats {
        dns_answers: 1,
        dns_learned: 2,
        ..Stats::default()
    };
    assert_eq!(dns.reply(&long), learned_two);
    assert_eq!(dns.take_learned(), set(["203.0.113.7", "203.0.113.8"]));
    let events = dns.events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        usize::from(events[0].len),
        DNS_MAX_PAYLOAD,
        "cut to what the kernel reads"
    );
    assert_eq!(&events[0].payload[..], &long[..DNS_MAX_PAYLOAD]);
}

/// xorshift64: a fixed sequence of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn mutated_answers_never_teach_another_address() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    // app.example.com CNAME edge.example.com, edge.example.com A 203.0.113.7: compressed
    // names in the data and in an owner, which mutations turn into every kind of broken.
    let start = Message::response(ID, APP);
    let edge = start.next_rdata();
    let base = start
        .answer(
            &TO_QUESTION,
            TYPE_CNAME,
            &[&b"\x04edge"[..], &pointer(HEADER_LEN + 4)].concat(), // example.com
        )
        .answer(&pointer(edge), TYPE_A, &ADDR.octets())
        .bytes();
    // Changing the A record's own address bytes would teach that address, legitimately.
    let mutable = base.len() - 4;
    let query = UDP4.query(&Message::query(ID, APP).bytes());
    let interesting = [0x00, 0x01, 0x04, 0x3f, 0x40, 0x80, 0xc0, 0xff];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let allowed = set(["203.0.113.7"]);
    for round in 0..2000 {
        // One to four bytes: a bit flipped, a value parsers trip on, or any value.
        let mut answer = base.clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(mutable);
            answer[at] = match rng.below(3) {
                0 => answer[at] ^ (1 << rng.below(8)),
                1 => interesting[rng.below(interesting.len())],
                _ => rng.next() as u8,
            };
        }
        dns.exchange(&query, &UDP4.answer(&answer));
        let learned = dns.take_learned();
        assert!(
            learned.is_subset(&allowed),
            "round {round}: {learned:?} from {answer:02x?}"
        );
        for event in dns.events() {
            assert_eq!(
                &event.payload[..usize::from(event.len)],
                &answer[..],
                "round {round}"
            );
        }
    }
    // The mutants reached both the learning and the rejecting ends of the parser.
    let stats = dns.stats();
    assert!(
        stats.dns_learned > 0 && stats.dns_malformed > 0,
        "{stats:?}"
    );
}

/// A trusted, solicited answer for a name no rule allows teaches nothing, but reaches the
/// agent (to name the address in its events) while the ring is less than half full; past
/// that, only answers the kernel learned from do, so those always keep half the ring.
#[cfg_attr(
    unprivileged_tests,
    ignore = "needs root (BPF_PROG_TEST_RUN): run as root, or CI=true"
)]
#[test]
fn answers_for_names_no_rule_allows_reach_the_agent_only_while_the_ring_has_room() {
    if !privileged() {
        return;
    }
    let mut dns = Dns::new();
    let other = |id: u16| {
        let name = wire("other.example.org");
        (
            UDP4.query(&Message::new(id, QUERY_FLAGS, &name).bytes()),
            Message::new(id, RESPONSE_FLAGS, &name).a(ADDR).bytes(),
        )
    };
    let (query, answer) = other(1);
    assert_eq!(dns.exchange(&query, &UDP4.answer(&answer)), unmatched());
    assert_eq!(dns.take_learned(), none());
    let events = dns.events();
    assert_eq!(events.len(), 1, "the agent gets the answer");
    assert_eq!(events[0].learned, 0, "which taught nothing");
    assert_eq!(
        &events[0].payload[..usize::from(events[0].len)],
        answer.as_slice()
    );

    // Learned-from answers, unread, past half the ring (8 bytes of ring header a record).
    let record = 8 + (DNS_EVENT_HEADER + app_answer().len()).next_multiple_of(8);
    let half = usize::try_from(egress_common::DNS_EVENTS_BYTES / 2).unwrap();
    let filled = half / record + 1;
    for _ in 0..filled {
        assert_eq!(dns.reply(&app_answer()), learned_one());
    }
    let (query, answer) = other(2);
    assert_eq!(dns.exchange(&query, &UDP4.answer(&answer)), unmatched());
    let events = dns.events();
    assert_eq!(
        events.len(),
        filled,
        "the unmatched answer is not handed over"
    );
    assert!(events.iter().all(|e| e.learned == 1));
}

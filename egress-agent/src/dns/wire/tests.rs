use std::{cell::Cell, str::FromStr as _};

use hickory_proto::{
    op::{Message, MessageType},
    rr::{self, RData},
};

use super::*;

/// What hickory's decoder makes of `msg`, as the learner used it: accepted only if it
/// decodes and is a response with one question.
fn hickory(msg: &[u8]) -> Option<Message> {
    Message::from_vec(msg)
        .ok()
        .filter(|m| m.queries.len() == 1 && m.metadata.message_type == MessageType::Response)
}

fn labels(name: &Name<'_>) -> Vec<Vec<u8>> {
    name.labels().map(<[u8]>::to_vec).collect()
}

fn hickory_labels(name: &rr::Name) -> Vec<Vec<u8>> {
    name.iter().map(<[u8]>::to_vec).collect()
}

/// The question key as the policy's text would give it (what `policy_key` replaces).
fn text_key(name: &rr::Name) -> Option<String> {
    let text = name.to_lowercase().to_ascii();
    let text = text.strip_suffix('.').unwrap_or(&text);
    (!text.contains('\\')).then(|| text.to_owned())
}

/// Asserts that the walker and hickory agree on `msg`: both refuse it, or both accept it
/// with the same question, the same answer records, and the same verdicts on whether
/// two of its names are equal.
fn agree(msg: &[u8]) -> bool {
    let ours = Response::parse(msg);
    let theirs = hickory(msg);
    let (ours, theirs) = match (ours, theirs) {
        (Err(_), None) => return false,
        (Ok(o), Some(t)) => (o, t),
        (o, _) => panic!(
            "walker {:?}, hickory {:?} on {msg:02x?}",
            o.map(|_| "accepts"),
            Message::from_vec(msg).map(|m| (m.queries.len(), m.metadata.message_type))
        ),
    };
    let question = &theirs.queries[0].name;
    assert_eq!(labels(&ours.question()), hickory_labels(question));
    let mut key = String::new();
    assert_eq!(
        ours.question().policy_key(&mut key).then_some(key),
        text_key(question),
        "{msg:02x?}"
    );
    let records: Vec<Record<'_>> = ours.answers().collect();
    assert_eq!(records.len(), theirs.answers.len());
    let mut names = vec![(ours.question(), question.clone())];
    for (o, t) in records.iter().zip(&theirs.answers) {
        assert_eq!(o.rtype, u16::from(t.record_type()));
        assert_eq!(o.class, u16::from(t.dns_class));
        assert_eq!(o.ttl, t.ttl);
        let addr = match &t.data {
            RData::A(a) => Some(IpAddr::from(a.0)),
            RData::AAAA(a) => Some(IpAddr::from(a.0)),
            _ => None,
        };
        assert_eq!(o.addr(), addr, "{msg:02x?}");
        names.push((o.owner, t.name.clone()));
        match (&t.data, o.cname()) {
            (RData::CNAME(target), Some(ours)) => names.push((ours, target.0.clone())),
            (RData::CNAME(_), None) | (_, Some(_)) => panic!("CNAME differs: {msg:02x?}"),
            _ => {}
        }
    }
    for (o, t) in &names {
        assert_eq!(labels(o), hickory_labels(t), "{msg:02x?}");
        for (o2, t2) in &names {
            assert_eq!(
                o.eq_ignore_case(o2),
                t == t2,
                "{o:?} vs {o2:?} in {msg:02x?}"
            );
        }
    }
    true
}

fn wire(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A message under construction: header, one question, then records.
struct Msg(Vec<u8>);

impl Msg {
    fn response(qname: &[u8]) -> Self {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(qname);
        m.extend_from_slice(&[0, 1, 0, 1]);
        Self(m)
    }

    /// Appends a record to section `count_at` (6 answers, 8 authority, 10 additional).
    fn record(
        mut self,
        count_at: usize,
        owner: &[u8],
        rtype: u16,
        class: u16,
        rdata: &[u8],
    ) -> Self {
        let m = &mut self.0;
        m.extend_from_slice(owner);
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&class.to_be_bytes());
        m.extend_from_slice(&300u32.to_be_bytes());
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(rdata);
        let n = u16::from_be_bytes([m[count_at], m[count_at + 1]]) + 1;
        m[count_at..count_at + 2].copy_from_slice(&n.to_be_bytes());
        self
    }

    fn answer(self, owner: &[u8], rtype: u16, rdata: &[u8]) -> Self {
        self.record(6, owner, rtype, CLASS_IN, rdata)
    }

    fn additional(self, owner: &[u8], rtype: u16, rdata: &[u8]) -> Self {
        self.record(10, owner, rtype, CLASS_IN, rdata)
    }

    /// Where the next record's data will start, for an owner of `owner_len` bytes.
    fn next_rdata(&self, owner_len: usize) -> usize {
        self.0.len() + owner_len + 10
    }
}

const Q: [u8; 2] = [0xc0, 12];

fn ptr(at: usize) -> [u8; 2] {
    (0xc000 | at as u16).to_be_bytes()
}

#[test]
fn an_answer_through_pointers_reads_as_written() {
    let m = Msg::response(&wire("App.Example.com"));
    let target_at = m.next_rdata(2);
    let m = m
        .answer(&Q, rtype::CNAME, &[&[4][..], b"edge", &ptr(16)].concat())
        .answer(
            &ptr(target_at),
            rtype::AAAA,
            &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
        )
        .answer(&wire("EDGE.example.COM"), rtype::A, &[203, 0, 113, 7]);
    assert!(agree(&m.0));
    let r = Response::parse(&m.0).expect("parses");
    let mut key = String::new();
    assert!(r.question().policy_key(&mut key));
    assert_eq!(key, "app.example.com");
    let a: Vec<Record<'_>> = r.answers().collect();
    let target = a[0].cname().expect("a CNAME");
    assert_eq!(labels(&target), [&b"edge"[..], b"Example", b"com"]);
    assert!(a[1].owner.eq_ignore_case(&target));
    assert!(a[2].owner.eq_ignore_case(&target), "case and compression");
    assert!(!a[2].owner.eq_ignore_case(&r.question()));
    assert_eq!(a[2].addr(), Some("203.0.113.7".parse().expect("address")));
    assert_eq!(a[1].addr(), Some("2001:db8::7".parse().expect("address")));
}

#[test]
fn pointers_that_loop_or_lead_forward_are_refused() {
    let good = Msg::response(&wire("app.example.com")).answer(&Q, rtype::A, &[203, 0, 113, 1]);
    let owner_at = 12 + 17 + 4;
    for (what, owner) in [
        ("to itself", ptr(owner_at)),
        ("forward", ptr(owner_at + 2)),
        ("past the end", ptr(4000)),
        ("into the header's flags", ptr(2)),
    ] {
        let mut m = good.0.clone();
        m[owner_at..owner_at + 2].copy_from_slice(&owner);
        assert!(!agree(&m), "{what}");
    }
    // Two pointers leading to each other, and a name that points into its own labels.
    let mut m = Msg::response(&ptr(14).iter().chain(&ptr(12)).copied().collect::<Vec<_>>()).0;
    assert!(!agree(&m));
    m = Msg::response(&[&[3][..], b"abc", &ptr(12)].concat()).0;
    assert!(!agree(&m));
    // A pointer to the label `y` right before it (a TXT record's data) leads back to
    // the pointer itself.
    let m = Msg::response(&wire("app.example.com")).answer(&Q, rtype::TXT, &[1, b'y']);
    let y = m.0.len() - 2;
    assert!(agree(&m.0));
    assert!(!agree(&m.answer(&ptr(y), rtype::A, &[203, 0, 113, 1]).0));
    // Labels reached through a pointer may not run into the name that pointed at them,
    // even to end after it: here a 4-byte label (its length the last byte of a NULL
    // record) over the pointer and the type, ended by the class's high byte.
    let m = Msg::response(&wire("app.example.com")).answer(&Q, rtype::NULL, &[9, 4]);
    let label = m.0.len() - 1;
    assert!(!agree(
        &m.answer(&ptr(label), rtype::A, &[203, 0, 113, 1]).0
    ));
    // A chain of pointers, each further back, is a name.
    let m = Msg::response(&wire("app.example.com")).answer(&ptr(12), rtype::CNAME, &ptr(12));
    let target = m.0.len() - 2;
    let m = m.answer(&ptr(target), rtype::A, &[203, 0, 113, 1]);
    assert!(agree(&m.0));
    let r = Response::parse(&m.0).expect("parses");
    assert!(r.answers().all(|a| a.owner.eq_ignore_case(&r.question())));
}

#[test]
fn every_truncation_is_refused_and_trailing_bytes_are_ignored() {
    let m = Msg::response(&wire("app.example.com"))
        .answer(&Q, rtype::CNAME, &wire("edge.example.net"))
        .answer(&wire("edge.example.net"), rtype::A, &[203, 0, 113, 1])
        .additional(&[0], rtype::OPT, &[0, 8, 0, 7, 0, 1, 24, 0, 203, 0, 113]);
    assert!(agree(&m.0));
    for cut in 0..m.0.len() {
        assert!(!agree(&m.0[..cut]), "cut at {cut}");
    }
    let mut longer = m.0.clone();
    longer.extend_from_slice(&[0xc0, 0xff, 0x01]);
    assert!(agree(&longer));
}

#[test]
fn header_checks() {
    let m = Msg::response(&wire("app.example.com"))
        .answer(&Q, rtype::A, &[203, 0, 113, 1])
        .0;
    let mut query = m.clone();
    query[2] &= 0x7f;
    assert_eq!(Response::parse(&query).err(), Some(WireError::NotResponse));
    for questions in [0u16, 2] {
        let mut q = m.clone();
        q[4..6].copy_from_slice(&questions.to_be_bytes());
        assert_eq!(
            Response::parse(&q).err(),
            Some(WireError::Questions(questions))
        );
        assert!(!agree(&q));
    }
    // Empty data is for updates (RFC 2136): a record without an address there.
    let empty = Msg::response(&wire("app.example.com"))
        .answer(&Q, rtype::A, &[])
        .0;
    assert_eq!(
        Response::parse(&empty).err(),
        Some(WireError::EmptyRdata(rtype::A))
    );
    let mut update = empty.clone();
    update[2] |= OPCODE_UPDATE << 3;
    assert!(agree(&update));
    let r = Response::parse(&update).expect("an update");
    assert_eq!(r.answers().next().and_then(|a| a.addr()), None);
}

#[test]
fn odd_classes_and_types() {
    let q = wire("app.example.com");
    let m = Msg::response(&q)
        .record(6, &Q, rtype::A, 3, &[203, 0, 113, 1])
        .record(6, &Q, 0xff00, 0xfffe, &[1, 2, 3])
        .record(6, &Q, rtype::AAAA, 255, &[0; 16])
        .record(8, &Q, 46, CLASS_IN, &[9; 30]);
    assert!(agree(&m.0));
    let r = Response::parse(&m.0).expect("parses");
    let classes: Vec<u16> = r.answers().map(|a| a.class).collect();
    assert_eq!(classes, [3, 0xfffe, 255]);
    for (t, rdata) in [
        (rtype::A, &[1, 2, 3][..]),
        (rtype::AAAA, &[0; 4]),
        (rtype::ZERO, &[0]),
        (rtype::ANY, &[0]),
        (rtype::AXFR, &[1]),
        (rtype::CNAME, &[0, 0]),
        (rtype::MX, &[0, 1]),
        (rtype::CAA, &[0, 0]),
        (rtype::CAA, &[0, 1, b'-']),
        (rtype::CERT, &[0; 5]),
        (rtype::SSHFP, &[1]),
        (rtype::TLSA, &[1, 1]),
        (rtype::TXT, &[5, b'a']),
        (rtype::NAPTR, &[0, 0, 0, 0, 1, b'!', 0, 0, 0]),
        (rtype::CSYNC, &[0, 0, 0, 0, 0, 4]),
        (rtype::SVCB, &[0, 1, 0, 0, 2, 0, 1, 0, 3, 0, 2, 1, 187]),
        (rtype::HTTPS, &[0, 1, 0, 0, 1, 0, 2, 1, 0xff]),
    ] {
        let bad = Msg::response(&q).answer(&Q, t, rdata).0;
        assert!(!agree(&bad), "type {t} with {rdata:?}");
    }
    for (t, rdata) in [
        (rtype::CAA, &[0x80, 5, b'i', b's', b's', b'u', b'e'][..]),
        (rtype::CSYNC, &[0, 0, 0, 1, 0xff, 3, 0, 1, 0x40]),
        (
            rtype::SVCB,
            &[0, 1, 0, 0, 1, 0, 3, 2, b'h', b'2', 0, 3, 0, 3, 1, 187, 0],
        ),
        (rtype::TXT, &[0, 1, b'x']),
        (rtype::NAPTR, &[0, 0, 0, 0, 1, b'S', 0, 0, 0]),
        (39, &[0xc0, 12]),
    ] {
        let good = Msg::response(&q).answer(&Q, t, rdata).0;
        assert!(agree(&good), "type {t} with {rdata:?}");
    }
    // OPT, SIG and TSIG belong in the additional section; OPT owned by the root, once.
    for t in [rtype::OPT, rtype::SIG, rtype::TSIG] {
        assert!(!agree(&Msg::response(&q).answer(&[0], t, &[0; 4]).0));
    }
    let opt = |m: Msg| m.additional(&[0], rtype::OPT, &[]);
    assert!(agree(&opt(Msg::response(&q)).0));
    assert!(!agree(&opt(opt(Msg::response(&q))).0));
    assert!(!agree(&Msg::response(&q).additional(&Q, rtype::OPT, &[]).0));
    assert!(agree(&Msg::response(&q).additional(&Q, rtype::SIG, &[1]).0));
}

#[test]
fn edns_options_decode_as_hickory_decodes_them() {
    let q = wire("app.example.com");
    let opt = |rdata: &[u8]| agree(&Msg::response(&q).additional(&[0], rtype::OPT, rdata).0);
    // A client subnet: IPv4 /24 with its three bytes, IPv6 /33 with five, and a
    // longer one the decoder ignores the rest of.
    assert!(opt(&[0, 8, 0, 7, 0, 1, 24, 0, 203, 0, 113]));
    assert!(opt(&[0, 8, 0, 9, 0, 2, 33, 0, 0x20, 1, 0xd, 0xb8, 0]));
    assert!(opt(&[0, 8, 0, 8, 0, 1, 8, 0, 203, 0, 113, 9]));
    // An option cut short by the end of the data, or only its code: ignored.
    assert!(opt(&[0, 10, 0, 6, 1, 2, 3]));
    assert!(opt(&[0, 10]));
    assert!(opt(&[0, 10, 0, 0, 0, 10, 0, 6, 1]));
    for bad in [
        &[0, 8, 0, 4, 0, 3, 0, 0][..],      // unknown family
        &[0, 8, 0, 5, 0, 1, 33, 0, 1],      // a /33 in IPv4
        &[0, 8, 0, 6, 0, 1, 24, 0, 203, 0], // address bytes missing
        &[0, 8, 0, 0],                      // empty
        &[0, 10, 0, 9, 1],                  // longer than the whole data
        &[0, 10, 0, 0, 0, 10, 0, 10, 1],
        &[0, 10, 0], // half a length
    ] {
        assert!(!opt(bad), "{bad:?}");
    }
    let svcb = |rdata: &[u8]| agree(&Msg::response(&q).answer(&Q, rtype::SVCB, rdata).0);
    assert!(svcb(&[
        0, 1, 0, 0, 0, 0, 2, 0, 1, 0, 4, 0, 4, 203, 0, 113, 1
    ]));
    for bad in [
        &[0, 1, 0, 0, 0, 0, 0][..],                 // mandatory without a key
        &[0, 1, 0, 0, 0, 0, 1, 0],                  // mandatory with half a key
        &[0, 1, 0, 0, 3, 0, 2, 1, 187, 0, 1, 0, 0], // keys out of order
        &[0, 1, 0, 0, 4, 0, 3, 203, 0, 113],        // a partial address
        &[0, 1, 0, 0, 6, 0, 4, 0, 0, 0, 0],
        &[0, 1, 0, 0, 1, 0, 0],          // alpn empty
        &[0, 1, 0, 0, 1, 0, 2, 2, b'h'], // alpn id cut short
        &[0, 1, 0, 0, 9, 0, 0, 7],       // bytes left after the parameters
    ] {
        assert!(!svcb(bad), "{bad:?}");
    }
}

#[test]
fn names_compare_without_regard_to_case_across_compression() {
    let m = Msg::response(&wire("a.B.example.COM"))
        .answer(
            &[&[1][..], b"A", &ptr(14)].concat(),
            rtype::A,
            &[203, 0, 113, 1],
        )
        .answer(&wire("A.b.EXAMPLE.com"), rtype::A, &[203, 0, 113, 2])
        .answer(
            &[&[1][..], b"b", &ptr(14)].concat(),
            rtype::A,
            &[203, 0, 113, 3],
        )
        .answer(&ptr(14), rtype::A, &[203, 0, 113, 4])
        .answer(&wire("a.b.example.com.x"), rtype::A, &[203, 0, 113, 5]);
    assert!(agree(&m.0));
    let r = Response::parse(&m.0).expect("parses");
    let same: Vec<bool> = r
        .answers()
        .map(|a| a.owner.eq_ignore_case(&r.question()))
        .collect();
    assert_eq!(same, [true, true, false, false, false]);
}

#[test]
fn escaped_looking_bytes_are_label_bytes() {
    let labels: [&[u8]; 13] = [
        b"abc",
        b"ABC",
        b"-a",
        b"a-",
        b"*",
        b"a*",
        b"_x",
        b"x.y",
        b"x\\y",
        b"\xc3\xa9",
        b"a b",
        b"0",
        b"Z9",
    ];
    for first in labels {
        for second in labels {
            for third in [&b"io"[..], b"Example", b"\x00"] {
                let mut q = Vec::new();
                for l in [first, second, third] {
                    q.push(l.len() as u8);
                    q.extend_from_slice(l);
                }
                q.push(0);
                let m = Msg::response(&q).answer(&Q, rtype::A, &[203, 0, 113, 1]);
                assert!(agree(&m.0));
            }
        }
    }
    // "x.y" as one label is not the two labels x and y.
    let m = Msg::response(&[&[3][..], b"x.y", &[0]].concat()).answer(
        &wire("x.y"),
        rtype::A,
        &[203, 0, 113, 1],
    );
    let r = Response::parse(&m.0).expect("parses");
    assert!(
        !r.answers()
            .next()
            .expect("a record")
            .owner
            .eq_ignore_case(&r.question())
    );
    assert!(!r.question().policy_key(&mut String::new()));
}

#[test]
fn names_of_255_bytes_are_the_longest() {
    let label = [b'a'; 63];
    let name = |n: usize, last: usize| {
        let mut q = Vec::new();
        for _ in 0..n {
            q.push(63);
            q.extend_from_slice(&label);
        }
        q.push(last as u8);
        q.extend(std::iter::repeat_n(b'b', last));
        q.push(0);
        q
    };
    // 3 × 64 + 62 + 1 = 255 bytes, then one more.
    assert!(agree(
        &Msg::response(&name(3, 61))
            .answer(&Q, rtype::A, &[203, 0, 113, 1])
            .0
    ));
    assert!(!agree(
        &Msg::response(&name(3, 62))
            .answer(&Q, rtype::A, &[203, 0, 113, 1])
            .0
    ));
}

/// xorshift64: a fixed sequence of pseudo-random numbers.
struct Rng {
    state: Cell<u64>,
    /// One in this many of the generator's choices makes a field ill formed.
    junk: Cell<usize>,
}

impl Rng {
    fn next(&self) -> u64 {
        let mut x = self.state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.set(x);
        x
    }

    fn below(&self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn junk(&self) -> bool {
        self.chance(self.junk.get())
    }

    fn byte(&self) -> u8 {
        self.next() as u8
    }

    fn bytes(&self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// Fewer than `below` random bytes.
    fn some(&self, below: usize) -> Vec<u8> {
        let n = self.below(below);
        self.bytes(n)
    }

    fn pick<T: Copy>(&self, from: &[T]) -> T {
        from[self.below(from.len())]
    }

    /// An address in 203.0.113.0/24.
    fn ipv4(&self) -> Vec<u8> {
        vec![203, 0, 113, self.byte()]
    }

    /// An address in 2001:db8::/32.
    fn ipv6(&self) -> Vec<u8> {
        [&[0x20, 0x01, 0x0d, 0xb8][..], &self.bytes(12)].concat()
    }
}

const NAMES: [&str; 6] = [
    "app.example.com",
    "APP.Example.com",
    "edge.example.net",
    "x.hcp.eastus.example.net",
    "example.com",
    "",
];

/// A name: written out (from the pool, or random labels), compressed to one of `names`,
/// or a mix.
fn random_name(rng: &Rng, msg: &[u8], names: &[usize]) -> Vec<u8> {
    if rng.junk() {
        return ptr(rng.below(msg.len() + 4)).to_vec();
    }
    match rng.below(8) {
        0..=2 if !names.is_empty() => ptr(rng.pick(names)).to_vec(),
        3 => {
            let mut n = Vec::new();
            for _ in 0..rng.below(5) {
                let len = if rng.junk() {
                    0
                } else {
                    rng.pick(&[1, 2, 5, 63, 1 + rng.below(63)])
                };
                n.push(len as u8);
                for _ in 0..len {
                    let b = rng.byte();
                    n.push(if rng.chance(2) { b'a' + b % 26 } else { b });
                }
            }
            n.push(0);
            n
        }
        4 if !names.is_empty() => [&[3][..], b"Www", &ptr(rng.pick(names))].concat(),
        _ => {
            let mut n = wire(rng.pick(&NAMES));
            for b in &mut n {
                if b.is_ascii_alphabetic() && rng.chance(4) {
                    *b ^= 0x20;
                }
            }
            n
        }
    }
}

/// Types whose data hickory decodes, types it reads as opaque, and a few that may not
/// appear in answers at all.
const TYPES: [u16; 28] = [
    rtype::A,
    rtype::A,
    rtype::AAAA,
    rtype::AAAA,
    rtype::CNAME,
    rtype::CNAME,
    rtype::NS,
    rtype::PTR,
    rtype::ANAME,
    rtype::MX,
    rtype::SOA,
    rtype::SRV,
    rtype::TXT,
    rtype::HINFO,
    rtype::NAPTR,
    rtype::CAA,
    rtype::CERT,
    rtype::CSYNC,
    rtype::SVCB,
    rtype::HTTPS,
    rtype::SSHFP,
    rtype::TLSA,
    rtype::SMIMEA,
    rtype::OPENPGPKEY,
    rtype::NULL,
    39,
    46,
    0xff00,
];
const ADDITIONAL_ONLY: [u16; 3] = [rtype::OPT, rtype::SIG, rtype::TSIG];
const NEVER: [u16; 4] = [rtype::ZERO, rtype::ANY, rtype::AXFR, rtype::IXFR];

/// Record data for `t`, with names in it compressed to `names`.
fn random_rdata(rng: &Rng, t: u16, msg: &[u8], names: &[usize]) -> Vec<u8> {
    if rng.junk() {
        return rng.some(24);
    }
    let name = |rng: &Rng| random_name(rng, msg, names);
    let string = |rng: &Rng| {
        let n = rng.below(6);
        let mut s = vec![n as u8];
        s.extend(rng.bytes(n).iter().map(|b| b'0' + b % 75));
        s
    };
    match t {
        rtype::A => rng.ipv4(),
        rtype::AAAA => rng.ipv6(),
        rtype::CNAME | rtype::NS | rtype::PTR | rtype::ANAME => name(rng),
        rtype::MX => [rng.bytes(2), name(rng)].concat(),
        rtype::SOA => [name(rng), name(rng), rng.bytes(20)].concat(),
        rtype::SRV => [rng.bytes(6), name(rng)].concat(),
        rtype::TXT => (0..=rng.below(3)).flat_map(|_| string(rng)).collect(),
        rtype::HINFO => [string(rng), string(rng)].concat(),
        rtype::NAPTR => {
            let flags = if rng.junk() {
                string(rng)
            } else {
                vec![1, b'S']
            };
            [rng.bytes(4), flags, string(rng), string(rng), name(rng)].concat()
        }
        rtype::CAA => {
            let tag = if rng.junk() {
                rng.below(17)
            } else {
                1 + rng.below(15)
            };
            let chars: &[u8] = if rng.junk() {
                b"issueAZ09-."
            } else {
                b"issueAZ09"
            };
            let mut d = vec![rng.byte() & 0x81, tag as u8];
            d.extend((0..tag).map(|_| rng.pick(chars)));
            d.extend(rng.some(5));
            d
        }
        rtype::CSYNC => {
            let mut d = rng.bytes(4);
            let low = if rng.junk() {
                rng.byte()
            } else {
                rng.byte() & 3
            };
            d.extend_from_slice(&[rng.byte(), low]);
            for _ in 0..rng.below(3) {
                let len = if rng.junk() {
                    rng.pick(&[0, 33, 40])
                } else {
                    1 + rng.below(32)
                };
                d.extend_from_slice(&[rng.byte(), len as u8]);
                d.extend((0..len).map(|_| if rng.chance(3) { rng.byte() } else { 0 }));
            }
            d
        }
        rtype::SVCB | rtype::HTTPS => {
            let mut d = [rng.bytes(2), name(rng)].concat();
            let mut key = 0u16;
            for i in 0..rng.below(5) {
                key = if rng.junk() {
                    rng.below(8) as u16
                } else {
                    key + u16::from(i > 0) + rng.below(3) as u16
                };
                let value = match key {
                    0 => rng.bytes(2 + 2 * rng.below(2)),
                    1 => [string(rng), vec![2, b'h', b'3']].concat(),
                    2 => vec![],
                    3 => rng.bytes(2),
                    4 => (0..rng.below(3)).flat_map(|_| rng.ipv4()).collect(),
                    6 => (0..rng.below(2)).flat_map(|_| rng.ipv6()).collect(),
                    _ => rng.some(3),
                };
                let value = match (key, rng.junk()) {
                    (1, true) => vec![2, 0xc3, 0x28],
                    (0 | 2 | 3 | 4 | 6, true) => rng.some(3),
                    _ => value,
                };
                d.extend_from_slice(&key.to_be_bytes());
                d.extend_from_slice(&(value.len() as u16).to_be_bytes());
                d.extend_from_slice(&value);
            }
            d
        }
        rtype::OPT => {
            let mut d = Vec::new();
            for _ in 0..rng.below(3) {
                let code = rng.pick(&[3, 8, 8, 10, rng.below(20) as u16]);
                let value = if code == 8 {
                    let (family, source) = if rng.junk() {
                        (rng.pick(&[1, 2, 3]), rng.pick(&[33, 129, 255]))
                    } else if rng.chance(2) {
                        (1, rng.below(33) as u8)
                    } else {
                        (2, rng.below(129) as u8)
                    };
                    let mut v = vec![0, family, source, 0];
                    let n = usize::from(source.div_ceil(8)) + rng.below(2);
                    let n = if rng.junk() { rng.below(n + 1) } else { n };
                    let addr = if family == 1 { rng.ipv4() } else { rng.ipv6() };
                    v.extend(addr.iter().chain(&[0; 16]).take(n));
                    v
                } else {
                    rng.some(6)
                };
                let len = if rng.junk() {
                    rng.below(40)
                } else {
                    value.len()
                };
                d.extend_from_slice(&code.to_be_bytes());
                d.extend_from_slice(&(len as u16).to_be_bytes());
                d.extend_from_slice(&value);
            }
            if rng.junk() {
                d.extend(rng.some(4));
            }
            d
        }
        rtype::TSIG => {
            let mac = rng.below(20);
            let other = rng.below(4);
            let mut d = [name(rng), rng.bytes(8)].concat();
            d.extend_from_slice(&(mac as u16).to_be_bytes());
            d.extend(rng.bytes(mac + 4));
            d.extend_from_slice(&(other as u16).to_be_bytes());
            d.extend(rng.bytes(other));
            d
        }
        _ => rng.bytes(1 + rng.below(8)),
    }
}

/// A response: a question from the pool or random, then records of all kinds, each
/// field ill formed once in `rng.junk` choices.
fn random_message(rng: &Rng) -> Vec<u8> {
    let flags = if rng.junk() {
        rng.byte()
    } else {
        0x81 | if rng.chance(8) { OPCODE_UPDATE << 3 } else { 0 }
    };
    let questions = if rng.junk() { rng.below(3) as u8 } else { 1 };
    let mut m = vec![rng.byte(), rng.byte(), flags, rng.byte(), 0, questions];
    m.extend_from_slice(&[0; 6]);
    let mut names = vec![12];
    let q = random_name(rng, &m, &[]);
    m.extend_from_slice(&q);
    m.extend_from_slice(&[0, rng.pick(&[1, 28, 5, 255]), 0, 1]);
    let mut opt = false;
    for section in [6, 8, 10] {
        for _ in 0..rng.pick(&[0, 1, 2, 3, 5, 17]) {
            let t = if rng.junk() {
                rng.pick(&[NEVER.as_slice(), &ADDITIONAL_ONLY].concat())
            } else if section == 10 && rng.chance(4) {
                let t = if opt {
                    rng.pick(&ADDITIONAL_ONLY[1..])
                } else {
                    rng.pick(&ADDITIONAL_ONLY)
                };
                opt |= t == rtype::OPT;
                t
            } else if rng.chance(30) {
                rng.next() as u16
            } else {
                rng.pick(&TYPES)
            };
            let class = rng.pick(&[CLASS_IN, CLASS_IN, CLASS_IN, 3, 254, 255, rng.next() as u16]);
            let mut rdata = random_rdata(rng, t, &m, &names);
            if t == rtype::OPT && !rng.junk() {
                m.push(0);
            } else {
                names.push(m.len());
                let owner = random_name(rng, &m, &names[..names.len() - 1]);
                m.extend_from_slice(&owner);
            }
            let update = (m[2] >> 3) & 0x0f == OPCODE_UPDATE;
            if rng.junk() || (update && rng.chance(4)) {
                rdata.clear();
            }
            let rdata_at = m.len() + 10;
            if matches!(t, rtype::CNAME | rtype::NS) {
                names.push(rdata_at);
            }
            let len = rdata.len() as u16
                ^ if rng.junk() {
                    1 + rng.below(3) as u16
                } else {
                    0
                };
            m.extend_from_slice(&t.to_be_bytes());
            m.extend_from_slice(&class.to_be_bytes());
            m.extend_from_slice(&rng.bytes(4));
            m.extend_from_slice(&len.to_be_bytes());
            m.extend_from_slice(&rdata);
            let count = u16::from_be_bytes([m[section], m[section + 1]]) + 1;
            m[section..section + 2].copy_from_slice(&count.to_be_bytes());
        }
    }
    if rng.junk() {
        let at = 6 + 2 * rng.below(3) + 1;
        m[at] = m[at].wrapping_add(1);
    }
    m
}

/// A few random edits: bit flips, pointer-like bytes, truncation, insertion, deletion.
fn mutate(rng: &Rng, m: &mut Vec<u8>) {
    for _ in 0..=rng.below(3) {
        if m.is_empty() {
            return;
        }
        let at = rng.below(m.len());
        match rng.below(7) {
            0 => m[at] ^= 1 << rng.below(8),
            1 => m[at] = [0, 0xc0, 0x3f, 0x40, 0x80, 0xff, 12][rng.below(7)],
            2 => m.truncate(at),
            3 => m.insert(at, rng.byte()),
            4 => drop(m.remove(at)),
            5 => {
                let p = ptr(rng.below(m.len() + 2));
                m[at] = p[0];
                if at + 1 < m.len() {
                    m[at + 1] = p[1];
                }
            }
            _ => m[at] = rng.byte(),
        }
    }
}

#[test]
fn the_walker_accepts_and_reads_what_hickory_does() {
    let rng = Rng {
        state: Cell::new(0x5eed_d15c_0ba1_1e55),
        junk: Cell::new(1),
    };
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..60_000 {
        rng.junk.set(rng.pick(&[8, 40, 200, 1_000_000]));
        let mut m = random_message(&rng);
        if i % 2 == 1 {
            mutate(&rng, &mut m);
        }
        if agree(&m) {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    // Both sides of the decision are exercised.
    assert!(
        accepted > 5_000 && refused > 5_000,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn hickory_built_messages_read_the_same() {
    let m = {
        let mut m = Message::new(7, MessageType::Response, hickory_proto::op::OpCode::Query);
        let name = |s| rr::Name::from_str(s).expect("name");
        m.add_query(hickory_proto::op::Query::query(
            name("mcr.microsoft.com."),
            rr::RecordType::A,
        ));
        m.add_answer(rr::Record::from_rdata(
            name("mcr.microsoft.com."),
            60,
            RData::CNAME(rr::rdata::CNAME(name("edge.example."))),
        ));
        m.add_answer(rr::Record::from_rdata(
            name("EDGE.example."),
            60,
            RData::A(rr::rdata::A::from_str("203.0.113.7").expect("ipv4")),
        ));
        m.to_vec().expect("encodes")
    };
    assert!(agree(&m));
}

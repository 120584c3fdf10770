//! The agent's DNS walker (`egress_agent::dns::wire`) against hickory-proto's decoder, which
//! the learner used before it.
//!
//! The input is one DNS message. Both must refuse it, or both accept it as a response with
//! one question and read the same: the question's labels and its policy key (computed here
//! from hickory's labels as the learner computed it), every answer record's owner, type,
//! class, TTL, address and CNAME target, and for every two of those names whether they are
//! equal (DNS compares names without regard to ASCII case).
#![no_main]

use egress_agent::dns::wire::{Name, Response};
use hickory_proto::{
    op::{Message, MessageType},
    rr::{self, RData},
};
use libfuzzer_sys::fuzz_target;

/// The learner's key of a question name before `dns::wire`, from hickory's labels.
fn key(name: &rr::Name) -> Option<String> {
    let mut out = String::new();
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for (j, b) in label.iter().enumerate() {
            let c = b.to_ascii_lowercase();
            let plain = c.is_ascii_alphanumeric()
                || c == b'_'
                || (c == b'-' && j > 0)
                || (c == b'*' && j == 0);
            if !plain {
                return None;
            }
            out.push(char::from(c));
        }
    }
    Some(out)
}

fn labels(name: &Name<'_>) -> Vec<Vec<u8>> {
    name.labels().map(<[u8]>::to_vec).collect()
}

fn hickory_labels(name: &rr::Name) -> Vec<Vec<u8>> {
    name.iter().map(<[u8]>::to_vec).collect()
}

fuzz_target!(|msg: &[u8]| {
    let decoded = Message::from_vec(msg);
    let theirs = (decoded.as_ref().ok())
        .filter(|m| m.queries.len() == 1 && m.metadata.message_type == MessageType::Response);
    let (ours, theirs) = match (Response::parse(msg), theirs) {
        (Err(_), None) => return,
        (Ok(o), Some(t)) => (o, t),
        (o, _) => panic!(
            "walker: {:?}; hickory: {:?}",
            o.err(),
            decoded.map(|m| (m.queries.len(), m.metadata.message_type))
        ),
    };
    let question = &theirs.queries[0].name;
    assert_eq!(labels(&ours.question()), hickory_labels(question));
    let mut ours_key = String::new();
    let ours_key = ours
        .question()
        .policy_key(&mut ours_key)
        .then_some(ours_key);
    assert_eq!(ours_key, key(question));

    let records: Vec<_> = ours.answers().collect();
    assert_eq!(records.len(), theirs.answers.len());
    let mut names = vec![(ours.question(), question.clone())];
    for (o, t) in records.iter().zip(&theirs.answers) {
        assert_eq!(o.rtype, u16::from(t.record_type()));
        assert_eq!(o.class, u16::from(t.dns_class));
        assert_eq!(o.ttl, t.ttl);
        let addr = match &t.data {
            RData::A(a) => Some(std::net::IpAddr::from(a.0)),
            RData::AAAA(a) => Some(std::net::IpAddr::from(a.0)),
            _ => None,
        };
        assert_eq!(o.addr(), addr);
        names.push((o.owner, t.name.clone()));
        match (&t.data, o.cname()) {
            (RData::CNAME(target), Some(ours)) => names.push((ours, target.0.clone())),
            (RData::CNAME(_), None) | (_, Some(_)) => panic!("a CNAME on one side only"),
            _ => {}
        }
    }
    let cnames = theirs
        .answers
        .iter()
        .any(|r| matches!(r.data, RData::CNAME(_)));
    assert_eq!(ours.has_cname(), cnames);
    for (o, t) in &names {
        assert_eq!(labels(o), hickory_labels(t));
        for (o2, t2) in &names {
            assert_eq!(o.eq_ignore_case(o2), t == t2, "{o:?} and {o2:?}");
        }
    }
});

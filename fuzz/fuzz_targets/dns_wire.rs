//! The agent's DNS walker (`egress_agent::dns::wire`) against hickory-proto's decoder, which
//! the learner used before it.
//!
//! The input is one DNS message. Both must refuse it, or both accept it as a response with
//! one question and read the same: the question's labels (its policy key is a function of
//! them, `dns::wire::policy_key_of`), every answer record's owner, type, class, TTL,
//! address and CNAME target, and for every two of those names whether they are
//! equal (DNS compares names without regard to ASCII case).
#![no_main]

use egress_agent::dns::wire::{Name, Response};
use hickory_proto::{
    op::{Message, MessageType},
    rr::{self, RData},
};
use libfuzzer_sys::fuzz_target;

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

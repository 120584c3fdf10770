//! Which name a workload resolved to get an address: every trusted answer the kernel hands
//! over (for allowed names, and for others while its ring has room), kept as address →
//! asked names, in memory and bounded, so that a deny or audit event can say which name it
//! was for. A CNAME chain's addresses are the asked name's.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use egress_common::Addr;
use egress_common::addr::to_key;

use super::answer::DnsAnswer;
use super::{
    learner::{cname_chain, on_chain},
    wire::Response,
};

/// Addresses remembered at most; past that the least recently answered goes.
pub const MAX_ADDRS: usize = 65_536;
/// Names remembered per address, most recent first.
const NAMES_PER_ADDR: usize = 4;

#[derive(Debug, Default)]
pub struct SeenNames {
    by_addr: HashMap<Addr, (u64, Vec<String>)>,
    /// Stamp → address, oldest first: the LRU order.
    order: BTreeMap<u64, Addr>,
    stamp: u64,
    cap: usize,
    /// Addresses forgotten to make room (`egress_dns_names_evicted_total`).
    pub evicted: u64,
    chain: Vec<usize>,
    qname: String,
}

/// The agent's one memory of names, shared by the DNS reader and the event reader.
pub type Shared = Arc<Mutex<SeenNames>>;

impl SeenNames {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }

    pub fn shared() -> Shared {
        Arc::new(Mutex::new(Self::new(MAX_ADDRS)))
    }

    /// Addresses remembered (`egress_dns_names`).
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// Remembers the addresses of an answer under its question's name.
    pub fn answer(&mut self, answer: &DnsAnswer<'_>) {
        let Ok(msg) = Response::parse(answer.message) else {
            return;
        };
        let mut qname = std::mem::take(&mut self.qname);
        if msg.question().policy_key(&mut qname) {
            cname_chain(&msg, &mut self.chain);
            for record in msg.answers() {
                if let Some(addr) = record.addr()
                    && on_chain(&msg, &self.chain, &record.owner)
                {
                    self.insert(to_key(addr), &qname);
                }
            }
        }
        self.qname = qname;
    }

    fn insert(&mut self, addr: Addr, name: &str) {
        self.stamp += 1;
        let stamp = self.stamp;
        match self.by_addr.get_mut(&addr) {
            Some((old, names)) => {
                self.order.remove(old);
                *old = stamp;
                names.retain(|n| n != name);
                names.insert(0, name.to_owned());
                names.truncate(NAMES_PER_ADDR);
            }
            None => {
                if self.by_addr.len() >= self.cap
                    && let Some((_, oldest)) = self.order.pop_first()
                {
                    self.by_addr.remove(&oldest);
                    self.evicted += 1;
                }
                self.by_addr.insert(addr, (stamp, vec![name.to_owned()]));
            }
        }
        self.order.insert(stamp, addr);
    }

    /// The names asked for `addr`, most recent first.
    pub fn names(&self, addr: IpAddr) -> &[String] {
        self.by_addr
            .get(&to_key(addr))
            .map_or(&[], |(_, names)| names.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer for `qname`: a CNAME to `target` if given, then A records.
    fn answer(qname: &str, target: Option<&str>, addrs: &[[u8; 4]]) -> Vec<u8> {
        fn name(out: &mut Vec<u8>, n: &str) {
            for label in n.split('.') {
                out.push(label.len() as u8);
                out.extend_from_slice(label.as_bytes());
            }
            out.push(0);
        }
        let count = addrs.len() + usize::from(target.is_some());
        let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, count as u8, 0, 0, 0, 0];
        name(&mut m, qname);
        m.extend_from_slice(&[0, 1, 0, 1]);
        let owner = target.unwrap_or(qname);
        if let Some(t) = target {
            name(&mut m, qname);
            let mut rdata = Vec::new();
            name(&mut rdata, t);
            m.extend_from_slice(&[0, 5, 0, 1, 0, 0, 0, 60, 0, rdata.len() as u8]);
            m.extend_from_slice(&rdata);
        }
        for a in addrs {
            name(&mut m, owner);
            m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            m.extend_from_slice(a);
        }
        m
    }

    fn feed(seen: &mut SeenNames, msg: &[u8]) {
        seen.answer(&DnsAnswer {
            learned: &[],
            message: msg,
        });
    }

    #[test]
    fn addresses_name_the_asked_name_through_a_cname() {
        let mut seen = SeenNames::new(8);
        feed(
            &mut seen,
            &answer(
                "www.Example.com",
                Some("edge.cdn.example.net"),
                &[[203, 0, 113, 5]],
            ),
        );
        feed(
            &mut seen,
            &answer(
                "api.example.com",
                None,
                &[[203, 0, 113, 6], [203, 0, 113, 5]],
            ),
        );
        assert_eq!(
            seen.names("203.0.113.5".parse().unwrap()),
            ["api.example.com", "www.example.com"]
        );
        assert_eq!(
            seen.names("203.0.113.6".parse().unwrap()),
            ["api.example.com"]
        );
        assert!(seen.names("203.0.113.7".parse().unwrap()).is_empty());
    }

    #[test]
    fn the_least_recently_answered_address_goes_first() {
        let mut seen = SeenNames::new(2);
        feed(
            &mut seen,
            &answer("a.example.com", None, &[[203, 0, 113, 1]]),
        );
        feed(
            &mut seen,
            &answer("b.example.com", None, &[[203, 0, 113, 2]]),
        );
        feed(
            &mut seen,
            &answer("a.example.com", None, &[[203, 0, 113, 1]]),
        );
        feed(
            &mut seen,
            &answer("c.example.com", None, &[[203, 0, 113, 3]]),
        );
        assert_eq!(seen.len(), 2);
        assert_eq!(seen.evicted, 1);
        assert!(seen.names("203.0.113.2".parse().unwrap()).is_empty());
        assert_eq!(
            seen.names("203.0.113.1".parse().unwrap()),
            ["a.example.com"]
        );
    }
}

//! Reading a DNS response in place: the header, its one question, its answer records, and
//! names compared across compression pointers, all without allocating.
//!
//! The learner used to decode every answer with hickory-proto's `Message::from_vec`, which
//! builds the whole message on the heap: about half of the agent's CPU per answer.
//! [`Response::parse`] accepts exactly the responses with one question that decoder accepts
//! (hickory-proto 0.26 without its DNSSEC and mDNS features), so what the learner counts as
//! malformed is unchanged: every record of every section is checked, the record data of each
//! type hickory decodes as hickory decodes it. The differential test (`tests.rs`) and the fuzz
//! target `dns_wire` hold the two to that.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

mod name;
mod rdata;
mod reader;
#[cfg(test)]
mod tests;

use name::name_end;
pub use name::{Labels, Name, policy_key_of};
use reader::{Reader, Records, Section};

/// The record types whose data the decoder checks, and those the learner reads.
pub mod rtype {
    pub const ZERO: u16 = 0;
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const CNAME: u16 = 5;
    pub const SOA: u16 = 6;
    pub const NULL: u16 = 10;
    pub const PTR: u16 = 12;
    pub const HINFO: u16 = 13;
    pub const MX: u16 = 15;
    pub const TXT: u16 = 16;
    pub const SIG: u16 = 24;
    pub const AAAA: u16 = 28;
    pub const SRV: u16 = 33;
    pub const NAPTR: u16 = 35;
    pub const CERT: u16 = 37;
    pub const OPT: u16 = 41;
    pub const SSHFP: u16 = 44;
    pub const TLSA: u16 = 52;
    pub const SMIMEA: u16 = 53;
    pub const OPENPGPKEY: u16 = 61;
    pub const CSYNC: u16 = 62;
    pub const SVCB: u16 = 64;
    pub const HTTPS: u16 = 65;
    pub const TSIG: u16 = 250;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const ANY: u16 = 255;
    pub const CAA: u16 = 257;
    /// hickory's code for ANAME (a draft type without an assigned number).
    pub const ANAME: u16 = 65305;
}

/// The Internet class.
pub const CLASS_IN: u16 = 1;
const HEADER_LEN: usize = 12;
/// A compression pointer to the question name, right after the header.
const QUESTION_POINTER: [u8; 2] = [0xc0, HEADER_LEN as u8];
/// The longest a name may be, uncompressed, root included (RFC 1035 §2.3.4).
const MAX_NAME_LEN: usize = 255;
const OPCODE_UPDATE: u8 = 5;
/// EDNS options hickory decodes (RFC 7871 client subnet); the others are opaque to it.
const EDNS_SUBNET: u16 = 8;

/// Why a message is not a response the learner can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the message ends inside a field")]
    Truncated,
    #[error("not a response")]
    NotResponse,
    #[error("{0} questions, not one")]
    Questions(u16),
    #[error("the name at byte {0} is not well formed")]
    Name(usize),
    #[error("the data of a type {rtype} record at byte {at} does not decode")]
    Rdata { rtype: u16, at: usize },
    #[error("a type {0} record with empty data outside an UPDATE")]
    EmptyRdata(u16),
    #[error("a type {0} record outside the additional section")]
    Section(u16),
    #[error("an OPT record not owned by the root")]
    OptOwner,
    #[error("a second OPT record")]
    DuplicateOpt,
}

/// A response with one question, checked whole; its parts are read from the bytes on demand.
#[derive(Debug, Clone, Copy)]
pub struct Response<'m> {
    msg: &'m [u8],
    question: Name<'m>,
    answers_at: usize,
    answers: u16,
    /// CNAME records among the answers.
    cnames: u16,
}

impl<'m> Response<'m> {
    /// Checks `msg` as hickory's decoder would, and that it is a response to one question.
    pub fn parse(msg: &'m [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(msg, 0, msg.len());
        let header = r.take(HEADER_LEN)?;
        let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
        if header[2] & 0x80 == 0 {
            return Err(WireError::NotResponse);
        }
        if count(4) != 1 {
            return Err(WireError::Questions(count(4)));
        }
        let update = (header[2] >> 3) & 0x0f == OPCODE_UPDATE;
        let question = r.name()?;
        r.take(4)?;
        let answers_at = r.at;
        let mut records = Records {
            update,
            opt_seen: false,
            cnames: 0,
        };
        for (n, section) in [
            (count(6), Section::Answer),
            (count(8), Section::Authority),
            (count(10), Section::Additional),
        ] {
            for _ in 0..n {
                records.check(&mut r, section)?;
            }
        }
        Ok(Self {
            msg,
            question,
            answers_at,
            answers: count(6),
            cnames: records.cnames,
        })
    }

    pub fn question(&self) -> Name<'m> {
        self.question
    }

    /// Whether the answer section holds a CNAME record.
    pub fn has_cname(&self) -> bool {
        self.cnames > 0
    }

    /// The records of the answer section, in order.
    pub fn answers(&self) -> Answers<'m> {
        Answers {
            msg: self.msg,
            at: self.answers_at,
            left: self.answers,
        }
    }

    /// The name at `offset` (one of [`Name::offset`]'s for this response), so that callers can
    /// keep names in a reused buffer of plain numbers.
    pub fn name_at(&self, offset: usize) -> Name<'m> {
        Name::at(self.msg, offset)
    }
}

/// One resource record, read in place.
#[derive(Debug, Clone, Copy)]
pub struct Record<'m> {
    pub owner: Name<'m>,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub rdata: &'m [u8],
    rdata_at: usize,
}

impl<'m> Record<'m> {
    /// The address of an A or AAAA record (empty data, which only an UPDATE may carry, has
    /// none).
    pub fn addr(&self) -> Option<IpAddr> {
        match self.rtype {
            rtype::A => <[u8; 4]>::try_from(self.rdata)
                .ok()
                .map(|a| Ipv4Addr::from(a).into()),
            rtype::AAAA => <[u8; 16]>::try_from(self.rdata)
                .ok()
                .map(|a| Ipv6Addr::from(a).into()),
            _ => None,
        }
    }

    /// The target of a CNAME record.
    pub fn cname(&self) -> Option<Name<'m>> {
        (self.rtype == rtype::CNAME && !self.rdata.is_empty())
            .then(|| Name::at(self.owner.msg, self.rdata_at))
    }
}

/// The records of a checked answer section.
pub struct Answers<'m> {
    msg: &'m [u8],
    at: usize,
    left: u16,
}

impl<'m> Iterator for Answers<'m> {
    type Item = Record<'m>;

    fn next(&mut self) -> Option<Record<'m>> {
        self.left = self.left.checked_sub(1)?;
        let owner = Name::at(self.msg, self.at);
        let fixed = name_end(self.msg, self.at)?;
        let field = |i: usize, n: usize| self.msg.get(fixed + i..fixed + i + n);
        let be16 = |i| field(i, 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        let rtype = be16(0)?;
        let class = be16(2)?;
        let ttl = u32::from_be_bytes(field(4, 4)?.try_into().ok()?);
        let rdata = field(10, usize::from(be16(8)?))?;
        let rdata_at = fixed + 10;
        self.at = rdata_at + rdata.len();
        Some(Record {
            owner,
            rtype,
            class,
            ttl,
            rdata,
            rdata_at,
        })
    }
}

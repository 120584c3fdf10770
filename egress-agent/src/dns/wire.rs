//! Reading a DNS response in place: the header, its one question, its answer records, and
//! names compared across compression pointers, all without allocating.
//!
//! The learner used to decode every answer with hickory-proto's `Message::from_vec`, which
//! builds the whole message on the heap: about half of the agent's CPU per answer.
//! [`Response::parse`] accepts exactly the responses with one question that decoder accepts
//! (hickory-proto 0.26 without its DNSSEC and mDNS features), so what the learner counts as
//! malformed is unchanged: every record of every section is checked, the record data of each
//! type hickory decodes as hickory decodes it. The differential test below and the fuzz
//! target `dns_wire` hold the two to that.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// A name in a message, followed through compression pointers when read.
#[derive(Clone, Copy)]
pub struct Name<'m> {
    msg: &'m [u8],
    at: usize,
}

impl<'m> Name<'m> {
    fn at(msg: &'m [u8], at: usize) -> Self {
        Self { msg, at }
    }

    /// Where the name starts in its message.
    pub fn offset(&self) -> usize {
        self.at
    }

    /// Its labels, from the first (leftmost) to the last before the root.
    pub fn labels(&self) -> Labels<'m> {
        Labels {
            msg: self.msg,
            at: self.at,
            segment: self.at,
        }
    }

    pub fn is_root(&self) -> bool {
        self.labels().next().is_none()
    }

    /// Whether both names have the same labels, ASCII letters compared without regard to
    /// case (as DNS compares names).
    pub fn eq_ignore_case(&self, other: &Name<'_>) -> bool {
        let same_message = std::ptr::eq(self.msg, other.msg);
        let (mut a, mut b) = (self.labels(), other.labels());
        loop {
            // The same bytes from here on: a pointer to a name already seen, usually.
            if same_message && a.resolve() == b.resolve() {
                return true;
            }
            match (a.next(), b.next()) {
                (None, None) => return true,
                (Some(x), Some(y)) if x.eq_ignore_ascii_case(y) => {}
                _ => return false,
            }
        }
    }

    /// The name as the policy matches it, into `out`: lowercase labels joined by dots, no
    /// trailing dot. False when a label holds a byte a name's text would escape (a dot, a
    /// backslash, a leading hyphen, ...): no rule can match such a name.
    pub fn policy_key(&self, out: &mut String) -> bool {
        policy_key_of(self.labels(), out)
    }
}

impl std::fmt::Debug for Name<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.labels().map(|l| l.escape_ascii().to_string()))
            .finish()
    }
}

/// The labels of a name. A pointer must lead before the part of the name that led to it, as
/// the decoder requires, so the walk ends even in a message that was never checked.
pub struct Labels<'m> {
    msg: &'m [u8],
    at: usize,
    /// Where the part being read started: the name, or the last pointer's target.
    segment: usize,
}

impl Labels<'_> {
    /// Follows pointers to the next label or the root; returns where that is.
    fn resolve(&mut self) -> usize {
        while let Some(&b) = self.msg.get(self.at)
            && b & 0xc0 == 0xc0
            && let Some(target) = pointer(self.msg, self.at)
            && target < self.segment
        {
            self.at = target;
            self.segment = target;
        }
        self.at
    }
}

/// [`Name::policy_key`] of a name given by its labels, first to last.
pub fn policy_key_of<'a>(labels: impl IntoIterator<Item = &'a [u8]>, out: &mut String) -> bool {
    out.clear();
    for (i, label) in labels.into_iter().enumerate() {
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
                return false;
            }
            out.push(char::from(c));
        }
    }
    true
}

impl<'m> Iterator for Labels<'m> {
    type Item = &'m [u8];

    fn next(&mut self) -> Option<&'m [u8]> {
        let at = self.resolve();
        let len = *self.msg.get(at)?;
        if len == 0 || len & 0xc0 != 0 {
            return None;
        }
        let label = self.msg.get(at + 1..at + 1 + usize::from(len))?;
        self.at = at + 1 + label.len();
        Some(label)
    }
}

/// The target of the compression pointer at `at`.
fn pointer(msg: &[u8], at: usize) -> Option<usize> {
    let b = msg.get(at..at + 2)?;
    Some(usize::from(u16::from_be_bytes([b[0] & 0x3f, b[1]])))
}

/// Where the name at `at` ends in the message (after its root label or first pointer),
/// without checking it.
fn name_end(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let b = *msg.get(at)?;
        match b & 0xc0 {
            0 if b == 0 => return Some(at + 1),
            0 => at += 1 + usize::from(b),
            0xc0 => return Some(at + 2),
            _ => return None,
        }
    }
}

/// Checks the name at `start` as hickory's decoder does; returns where it ends. A pointer must
/// lead strictly before the start of the part of the name it is in, and the labels it leads to
/// must start before that part too (so pointers neither loop nor overlap); at most 255 bytes
/// uncompressed.
fn read_name(msg: &[u8], start: usize) -> Result<usize, WireError> {
    let bad = WireError::Name(start);
    let mut at = start;
    let mut segment = start;
    let mut limit = usize::MAX;
    let mut end = None;
    let mut len = 1;
    loop {
        if at >= limit {
            return Err(bad);
        }
        let b = *msg.get(at).ok_or(WireError::Truncated)?;
        match b & 0xc0 {
            0 if b == 0 => return Ok(end.unwrap_or(at + 1)),
            0 => {
                let label_end = at + 1 + usize::from(b);
                if label_end > msg.len() {
                    return Err(WireError::Truncated);
                }
                len += 1 + usize::from(b);
                if len > MAX_NAME_LEN {
                    return Err(bad);
                }
                at = label_end;
            }
            0xc0 => {
                let target = pointer(msg, at).ok_or(WireError::Truncated)?;
                if target >= segment {
                    return Err(bad);
                }
                end.get_or_insert(at + 2);
                limit = segment;
                segment = target;
                at = target;
            }
            _ => return Err(bad),
        }
    }
}

/// Reads fields of a message from `at`, never past `end`.
struct Reader<'m> {
    msg: &'m [u8],
    at: usize,
    end: usize,
}

impl<'m> Reader<'m> {
    fn new(msg: &'m [u8], at: usize, end: usize) -> Self {
        Self { msg, at, end }
    }

    fn left(&self) -> usize {
        self.end.saturating_sub(self.at)
    }

    fn take(&mut self, n: usize) -> Result<&'m [u8], WireError> {
        let bytes = (self.msg.get(self.at..self.at + n))
            .filter(|_| n <= self.left())
            .ok_or(WireError::Truncated)?;
        self.at += n;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A length octet and that many bytes (RFC 1035's `<character-string>`).
    fn string(&mut self) -> Result<&'m [u8], WireError> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn name(&mut self) -> Result<Name<'m>, WireError> {
        let name = Name::at(self.msg, self.at);
        let end = read_name(self.msg, self.at)?;
        if end > self.end {
            return Err(WireError::Truncated);
        }
        self.at = end;
        Ok(name)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Answer,
    Authority,
    Additional,
}

/// What checking a message's records carries from one to the next.
struct Records {
    /// An UPDATE (RFC 2136), where records may have empty data.
    update: bool,
    opt_seen: bool,
    cnames: u16,
}

impl Records {
    /// Checks one record, as hickory's `Record::read` and `Message::read_records` do.
    fn check(&mut self, r: &mut Reader<'_>, section: Section) -> Result<(), WireError> {
        let owner_at = r.at;
        // Almost every owner is a pointer to the question right after it, whose checks
        // hold wherever a pointer to it comes from.
        if r.msg.get(owner_at..owner_at + 2) == Some(&QUESTION_POINTER) {
            r.take(2)?;
        } else {
            r.name()?;
        }
        let rtype = r.u16()?;
        r.take(6)?; // class and TTL: any value
        let len = usize::from(r.u16()?);
        let at = r.at;
        r.take(len)?;
        if rtype == rtype::OPT && !Name::at(r.msg, owner_at).is_root() {
            return Err(WireError::OptOwner);
        }
        if len == 0 {
            // RFC 2136 gives empty data a meaning in updates only (OPT may always be empty).
            if !self.update && rtype != rtype::OPT {
                return Err(WireError::EmptyRdata(rtype));
            }
        } else {
            check_rdata(&mut Reader::new(r.msg, at, at + len), rtype)
                .map_err(|_| WireError::Rdata { rtype, at })?;
        }
        if matches!(rtype, rtype::OPT | rtype::SIG | rtype::TSIG) && section != Section::Additional
        {
            return Err(WireError::Section(rtype));
        }
        if rtype == rtype::OPT {
            if self.opt_seen {
                return Err(WireError::DuplicateOpt);
            }
            self.opt_seen = true;
        }
        if rtype == rtype::CNAME && len > 0 && section == Section::Answer {
            self.cnames += 1;
        }
        Ok(())
    }
}

/// Checks non-empty record data as hickory's `RData::read` does: the types it decodes must
/// decode and fill the data exactly; the others are opaque bytes.
fn check_rdata(r: &mut Reader<'_>, rtype: u16) -> Result<(), WireError> {
    let bad = Err(WireError::Rdata { rtype, at: r.at });
    let len = r.left();
    match rtype {
        rtype::A => {
            r.take(4)?;
        }
        rtype::AAAA => {
            r.take(16)?;
        }
        rtype::NS | rtype::CNAME | rtype::PTR | rtype::ANAME => {
            r.name()?;
        }
        rtype::MX => {
            r.u16()?;
            r.name()?;
        }
        rtype::SOA => {
            r.name()?;
            r.name()?;
            r.take(20)?;
        }
        rtype::SRV => {
            r.take(6)?;
            r.name()?;
        }
        rtype::TXT => {
            while r.left() > 0 {
                r.string()?;
            }
        }
        rtype::HINFO => {
            r.string()?;
            r.string()?;
        }
        rtype::NAPTR => {
            r.take(4)?;
            if !r.string()?.iter().all(u8::is_ascii_alphanumeric) {
                return bad;
            }
            r.string()?;
            r.string()?;
            r.name()?;
        }
        rtype::CAA => {
            r.u8()?;
            let tag = r.string()?;
            if !(1..=15).contains(&tag.len()) || !tag.iter().all(u8::is_ascii_alphanumeric) {
                return bad;
            }
            r.take(r.left())?;
        }
        rtype::CERT if len <= 5 => return bad,
        rtype::SSHFP if len < 2 => return bad,
        rtype::TLSA | rtype::SMIMEA if len < 3 => return bad,
        rtype::CSYNC => {
            r.take(4)?;
            // hickory checks the low byte of the flags only.
            if r.u16()? & 0xfc != 0 || !type_bitmap_ok(r.take(r.left())?) {
                return bad;
            }
        }
        rtype::SVCB | rtype::HTTPS => {
            if !svcb_ok(r)? {
                return bad;
            }
        }
        rtype::OPT => {
            if !opt_ok(r)? {
                return bad;
            }
        }
        rtype::TSIG => {
            r.name()?;
            r.take(8)?; // time and fudge
            let mac = usize::from(r.u16()?);
            if mac + 6 > r.left() {
                return bad;
            }
            r.take(mac + 4)?; // the MAC, the original id and the error
            let other = usize::from(r.u16()?);
            if other != r.left() {
                return bad;
            }
            r.take(other)?;
        }
        rtype::ZERO | rtype::IXFR | rtype::AXFR | rtype::ANY => return bad,
        _ => {
            r.take(len)?;
        }
    }
    if r.left() != 0 {
        return bad;
    }
    Ok(())
}

/// A type bit map (RFC 4034 §4.1.2) as hickory reads one: a window of length zero may only
/// come last, and no bit may be set past the 32nd byte of a window.
fn type_bitmap_ok(bytes: &[u8]) -> bool {
    enum State {
        Window,
        Len,
        Bits { len: u8, left: u8 },
    }
    let mut state = State::Window;
    for &b in bytes {
        state = match state {
            State::Window => State::Len,
            State::Len => State::Bits { len: b, left: b },
            State::Bits { len, left } => {
                if left == 0 || (b != 0 && len - left >= 32) {
                    return false;
                }
                match left - 1 {
                    0 => State::Window,
                    left => State::Bits { len, left },
                }
            }
        };
    }
    true
}

/// SVCB and HTTPS data (RFC 9460): priority, target, then parameters in increasing key order,
/// each checked as hickory checks it.
fn svcb_ok(r: &mut Reader<'_>) -> Result<bool, WireError> {
    r.u16()?;
    r.name()?;
    let mut last = None;
    while r.left() >= 4 {
        let key = r.u16()?;
        let n = r.u16()?;
        let value = r.take(usize::from(n))?;
        let ok = match key {
            // mandatory: at least one key
            0 => !value.is_empty() && value.len() % 2 == 0,
            // alpn: at least one protocol id, each UTF-8
            1 => !value.is_empty() && alpn_ok(value),
            // no-default-alpn
            2 => value.is_empty(),
            // port: hickory reads two bytes and ignores any more
            3 => value.len() >= 2,
            // ipv4hint, ipv6hint
            4 => value.len() % 4 == 0,
            6 => value.len() % 16 == 0,
            _ => true,
        };
        if !ok || last.is_some_and(|last| last >= key) {
            return Ok(false);
        }
        last = Some(key);
    }
    Ok(true)
}

fn alpn_ok(mut ids: &[u8]) -> bool {
    while let Some((&n, rest)) = ids.split_first() {
        let Some((id, rest)) = rest.split_at_checked(usize::from(n)) else {
            return false;
        };
        if std::str::from_utf8(id).is_err() {
            return false;
        }
        ids = rest;
    }
    true
}

/// OPT data (RFC 6891): options of a code, a length and that many bytes. An option cut short
/// by the end of the data is ignored, as hickory ignores it; a client subnet option must
/// decode.
fn opt_ok(r: &mut Reader<'_>) -> Result<bool, WireError> {
    let len = r.left();
    while r.left() > 0 {
        let code = r.u16()?;
        if r.left() == 0 {
            break;
        }
        let n = usize::from(r.u16()?);
        if n > len {
            return Ok(false);
        }
        if n > r.left() {
            r.take(r.left())?;
            break;
        }
        let value = r.take(n)?;
        if code == EDNS_SUBNET && !subnet_ok(value) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A client subnet option: family, prefix lengths, and as many address bytes as the source
/// prefix needs (more are ignored).
fn subnet_ok(data: &[u8]) -> bool {
    let Some((head, addr)) = data.split_first_chunk::<4>() else {
        return false;
    };
    let octets = match u16::from_be_bytes([head[0], head[1]]) {
        1 => 4,
        2 => 16,
        _ => return false,
    };
    let needed = usize::from(head[2].div_ceil(8));
    needed <= octets && needed <= addr.len()
}

#[cfg(test)]
mod tests {
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
                let class =
                    rng.pick(&[CLASS_IN, CLASS_IN, CLASS_IN, 3, 254, 255, rng.next() as u16]);
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
}

//! Reading a message field by field, and checking its records one by one.
use super::{Name, QUESTION_POINTER, WireError, name::read_name, rdata::check_rdata, rtype};

/// Reads fields of a message from `at`, never past `end`.
pub(super) struct Reader<'m> {
    pub(super) msg: &'m [u8],
    pub(super) at: usize,
    pub(super) end: usize,
}

impl<'m> Reader<'m> {
    pub(super) fn new(msg: &'m [u8], at: usize, end: usize) -> Self {
        Self { msg, at, end }
    }

    pub(super) fn left(&self) -> usize {
        self.end.saturating_sub(self.at)
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'m [u8], WireError> {
        let bytes = (self.msg.get(self.at..self.at + n))
            .filter(|_| n <= self.left())
            .ok_or(WireError::Truncated)?;
        self.at += n;
        Ok(bytes)
    }

    pub(super) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A length octet and that many bytes (RFC 1035's `<character-string>`).
    pub(super) fn string(&mut self) -> Result<&'m [u8], WireError> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    pub(super) fn name(&mut self) -> Result<Name<'m>, WireError> {
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
pub(super) enum Section {
    Answer,
    Authority,
    Additional,
}

/// What checking a message's records carries from one to the next.
pub(super) struct Records {
    /// An UPDATE (RFC 2136), where records may have empty data.
    pub(super) update: bool,
    pub(super) opt_seen: bool,
    pub(super) cnames: u16,
}

impl Records {
    /// Checks one record, as hickory's `Record::read` and `Message::read_records` do.
    pub(super) fn check(&mut self, r: &mut Reader<'_>, section: Section) -> Result<(), WireError> {
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

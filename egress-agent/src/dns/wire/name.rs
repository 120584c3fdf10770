//! Names in a message: compared and walked across compression pointers, and checked as
//! hickory's decoder checks them.
use super::{MAX_NAME_LEN, WireError};

/// A name in a message, followed through compression pointers when read.
#[derive(Clone, Copy)]
pub struct Name<'m> {
    pub(super) msg: &'m [u8],
    at: usize,
}

impl<'m> Name<'m> {
    pub(super) fn at(msg: &'m [u8], at: usize) -> Self {
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
pub(super) fn name_end(msg: &[u8], mut at: usize) -> Option<usize> {
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
pub(super) fn read_name(msg: &[u8], start: usize) -> Result<usize, WireError> {
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

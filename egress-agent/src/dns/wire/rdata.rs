//! Checking record data as hickory's `RData::read` does.
use super::{EDNS_SUBNET, WireError, reader::Reader, rtype};

/// Checks non-empty record data as hickory's `RData::read` does: the types it decodes must
/// decode and fill the data exactly; the others are opaque bytes.
pub(super) fn check_rdata(r: &mut Reader<'_>, rtype: u16) -> Result<(), WireError> {
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

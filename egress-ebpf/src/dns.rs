//! DNS snooping: queries leaving for a trusted resolver are remembered; answers to them are
//! parsed here, in the kernel, and the addresses of allowed names are written into `LEARNED`
//! before the answer reaches the client, so its first packet already passes. The agent
//! receives each learned-from answer afterwards and stays authoritative for expiry, CNAME
//! bookkeeping and bounds.
//!
//! Every index into the message is masked with `MASK`, so the verifier sees each access in
//! bounds whatever the message says; the message's own lengths are checked against `len`.
use aya_ebpf::{check_bounds_signed, helpers::bpf_skb_load_bytes};
use egress_common::{
    ALL_PORTS, Addr, DNS_MAX_LEARNED, DNS_MAX_PAYLOAD, DnsEvent, LearnedValue, NAME_KEY_LEN,
    NAME_MAX_LABELS, NO_PORT_SET, QueryKey, QueryValue, STAT_DNS_ANSWERS, STAT_DNS_EVENTS_LOST,
    STAT_DNS_LEARNED, STAT_DNS_MALFORMED, STAT_DNS_UNMATCHED, STAT_DNS_UNSOLICITED,
    STAT_DNS_UNTRUSTED, Settings, proto, v4_mapped,
};

use crate::{
    maps::{DNS_EVENTS, DNS_QUERIES, DNS_SCRATCH, DNS_WORK, DnsWork, LEARNED, NAMES, RESOLVERS},
    packet::{Packet, Skb},
    report::count,
};

const DNS_PORT: u16 = 53;
const MASK: usize = DNS_MAX_PAYLOAD - 1;
const HEADER_LEN: usize = 12;
/// Answer records the kernel walks; later ones are left to the agent.
const MAX_ANSWERS: usize = DNS_MAX_LEARNED;
/// Steps of the answer walk: a compressed owner name and its record take two.
const MAX_ANSWER_STEPS: usize = 2 * MAX_ANSWERS + 8;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const NS_PER_SEC: u64 = 1_000_000_000;

/// A packet from a DNS server's port (an answer, if anything).
#[inline(always)]
pub fn from_dns_port(p: &Packet) -> bool {
    p.sport == DNS_PORT && is_dns_transport(p)
}

#[inline(always)]
fn is_dns_transport(p: &Packet) -> bool {
    p.proto == proto::UDP || p.proto == proto::TCP
}

#[inline(always)]
fn is_resolver(addr: &Addr) -> bool {
    // SAFETY: only tested for presence.
    unsafe { RESOLVERS.get(addr).is_some() }
}

/// An outgoing packet to a trusted resolver's DNS port: remember the query and let it pass.
/// Returns false for every other packet.
#[inline(always)]
pub fn query<C: Skb>(ctx: &C, p: &Packet) -> bool {
    if p.dport != DNS_PORT || !is_dns_transport(p) || !is_resolver(&p.dst) {
        return false;
    }
    if let Some(msg) = load_message(ctx, p)
        && let Some((id, name_hash)) = question_of_query(msg)
    {
        let key = query_key(p.dst, p.src, p.sport, id, p.proto);
        let _ = DNS_QUERIES.insert(key, QueryValue { name_hash }, 0);
    }
    true
}

/// An incoming packet from port 53: if it is a trusted, solicited answer for an allowed
/// name, learn its addresses and hand it to the agent.
#[inline(always)]
///
/// The packet's fields pass to the parser through map memory (`work.query`, volatile): the
/// verifier then enters the parser's loops in one state, whichever header path (IPv4/IPv6,
/// extension headers, UDP/TCP) led there, instead of verifying them once per path.
pub fn answer<C: Skb>(ctx: &C, p: &Packet, settings: &Settings, now: u64) {
    if !is_resolver(&p.src) {
        count(STAT_DNS_UNTRUSTED);
        return;
    }
    let Some(work) = work() else {
        return;
    };
    let Some(msg) = load_message(ctx, p) else {
        return;
    };
    // SAFETY: a valid reference into this CPU's work area.
    unsafe {
        core::ptr::write_volatile(
            &mut work.query,
            query_key(p.src, p.dst, p.dport, 0, p.proto),
        )
    };
    if let Err(stat) = learn(msg, work, settings, now) {
        count(stat);
        // Addresses learned before the error still go to the agent, which takes back
        // whatever its own parse does not justify.
        if msg.learned == 0 {
            return;
        }
    }
    // SAFETY: as above.
    let asked = unsafe { core::ptr::read_volatile(&work.query) };
    msg.resolver = asked.resolver;
    msg.client = asked.client;
    if DNS_EVENTS.output::<DnsEvent>(msg, 0).is_err() {
        count(STAT_DNS_EVENTS_LOST);
    }
}

#[inline(always)]
fn query_key(resolver: Addr, client: Addr, client_port: u16, id: u16, proto: u8) -> QueryKey {
    QueryKey {
        resolver,
        client,
        client_port,
        id,
        proto,
        _pad: [0; 3],
    }
}

/// Copies the DNS message (after TCP's 2-byte length prefix) into this CPU's scratch slot.
/// `None` when there is no message (a bare TCP segment) or it cannot be read.
#[inline(always)]
fn load_message<C: Skb>(ctx: &C, p: &Packet) -> Option<&'static mut DnsEvent> {
    let start = if p.proto == proto::TCP {
        p.payload + 2
    } else {
        p.payload
    };
    let total = ctx.skb_len() as usize;
    let n = total.saturating_sub(start).min(DNS_MAX_PAYLOAD);
    // The verifier must see a non-zero, bounded length on the very register passed to the
    // helper (aya issue #1207): check_bounds_signed is inline asm that pins it.
    if !check_bounds_signed(n as i64, HEADER_LEN as i64, DNS_MAX_PAYLOAD as i64) {
        return None;
    }
    let slot = DNS_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, used only within this program run.
    let msg = unsafe { &mut *slot };
    // SAFETY: the destination has DNS_MAX_PAYLOAD bytes and n is at most that.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr().cast_const(),
            start as u32,
            msg.payload.as_mut_ptr().cast(),
            n as u32,
        )
    };
    if rc != 0 {
        return None;
    }
    msg.len = n as u16;
    msg.learned = 0;
    Some(msg)
}

#[inline(always)]
fn byte(m: &DnsEvent, i: usize) -> u8 {
    m.payload[i & MASK]
}

#[inline(always)]
fn be16(m: &DnsEvent, i: usize) -> u16 {
    u16::from_be_bytes([byte(m, i), byte(m, i + 1)])
}

#[inline(always)]
fn lower(b: u8) -> u8 {
    if b.is_ascii_uppercase() { b + 32 } else { b }
}

/// The question name, walked once: its FNV-1a hash (over the lowercased wire form). Where
/// it ends (the offset of its root label) goes into `work.end`, how many labels it has into
/// `work.labels`, and the start of each of the last `NAME_MAX_LABELS` into `work.starts`.
struct Question {
    hash: u64,
}

/// Longest name in wire form, root label included.
const MAX_NAME_WIRE: usize = 255;

/// One flat loop over the name's bytes (no loop per label): bounded loops cost the verifier
/// one pass per iteration, so nested ones multiply. The loop's state (label counter, next
/// label offset) lives in map memory on purpose: the verifier tracks the exact value or
/// range of a register and would keep one state per possible value at every iteration; a
/// value read back from a map is just "some number", so all paths merge.
#[inline(always)]
fn question(m: &DnsEvent, work: &mut DnsWork) -> Option<Question> {
    let len = usize::from(get16(&m.len));
    let mut q = Question { hash: FNV_OFFSET };
    put(&mut work.labels, 0);
    put(&mut work.next, HEADER_LEN as u32);
    for i in 0..MAX_NAME_WIRE {
        let pos = HEADER_LEN + i;
        if pos >= len {
            return None;
        }
        let b = byte(m, pos);
        if pos == get(&work.next) as usize {
            if b == 0 {
                // Through memory: returned in a register, the exact offset of each of the
                // 255 exits would make 255 states for everything that follows.
                put(&mut work.end, pos as u32);
                return Some(q);
            }
            // Compression pointers have no place in a question; lengths above 63 are invalid.
            if b > 63 {
                return None;
            }
            let labels = get(&work.labels);
            work.starts[labels as usize % NAME_MAX_LABELS] = pos as u16;
            put(&mut work.labels, labels + 1);
            put(&mut work.next, (pos + usize::from(b) + 1) as u32);
        }
        q.hash = (q.hash ^ u64::from(lower(b))).wrapping_mul(FNV_PRIME);
    }
    None
}

const FLAG_QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;

/// (id, question name hash) of a standard query with one question.
#[inline(always)]
fn question_of_query(m: &DnsEvent) -> Option<(u16, u64)> {
    let flags = be16(m, 2);
    if flags & (FLAG_QR | OPCODE_MASK) != 0 || be16(m, 4) != 1 {
        return None;
    }
    let work = work()?;
    Some((be16(m, 0), question(m, work)?.hash))
}

/// Loop state goes through memory with volatile accesses: the compiler would otherwise keep
/// it in a register, where the verifier tracks its exact range (see `question`).
#[inline(always)]
fn get(v: &u32) -> u32 {
    // SAFETY: a valid reference.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn get16(v: &u16) -> u16 {
    // SAFETY: a valid reference.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn put(v: &mut u32, value: u32) {
    // SAFETY: a valid reference.
    unsafe { core::ptr::write_volatile(v, value) }
}

/// This CPU's work area.
#[inline(always)]
fn work() -> Option<&'static mut DnsWork> {
    let slot = DNS_WORK.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, used only within this program run.
    Some(unsafe { &mut *slot })
}

/// Checks the answer against its query and the policy, then learns its addresses.
/// `Err` carries the counter that says why nothing was learned.
#[inline(always)]
fn learn(m: &mut DnsEvent, work: &mut DnsWork, settings: &Settings, now: u64) -> Result<(), u32> {
    let flags = be16(m, 2);
    if flags & (FLAG_QR | OPCODE_MASK) != FLAG_QR || be16(m, 4) != 1 {
        return Err(STAT_DNS_MALFORMED);
    }
    // SAFETY: a valid reference into this CPU's work area.
    let mut key = unsafe { core::ptr::read_volatile(&work.query) };
    key.id = be16(m, 0);
    // SAFETY: the value is copied out at once.
    let Some(asked) = (unsafe { DNS_QUERIES.get(key) }).copied() else {
        return Err(STAT_DNS_UNSOLICITED);
    };
    let q = question(m, work).ok_or(STAT_DNS_MALFORMED)?;
    if q.hash != asked.name_hash {
        return Err(STAT_DNS_UNSOLICITED);
    }
    // One answer per query: a second one (a forgery racing the real one) is unsolicited.
    let _ = DNS_QUERIES.remove(key);
    count(STAT_DNS_ANSWERS);
    let port_set = allowed_port_set(m, work).ok_or(STAT_DNS_UNMATCHED)?;
    let ancount = usize::from(be16(m, 6));
    let len = usize::from(get16(&m.len));
    // After the question's root label, type and class. One flat loop again: each step
    // consumes either one label of an owner name or one record's fixed part and data.
    // The walk's state is in map memory for the same reason as in `question`.
    put(&mut work.pos, get(&work.end) + 5);
    put(&mut work.in_name, 1);
    put(&mut work.records, 0);
    for _ in 0..MAX_ANSWER_STEPS {
        let pos = get(&work.pos) as usize;
        let records = get(&work.records) as usize;
        if records >= ancount || records >= MAX_ANSWERS {
            break;
        }
        if pos >= len {
            return Err(STAT_DNS_MALFORMED);
        }
        if get(&work.in_name) != 0 {
            let b = byte(m, pos);
            let (step, name_ends) = match b & 0xc0 {
                0xc0 => (2, true),
                0 if b == 0 => (1, true),
                0 => (usize::from(b) + 1, false),
                _ => return Err(STAT_DNS_MALFORMED),
            };
            put(&mut work.pos, (pos + step) as u32);
            if name_ends {
                put(&mut work.in_name, 0);
            }
            continue;
        }
        if pos + 10 > len {
            return Err(STAT_DNS_MALFORMED);
        }
        let rdlen = usize::from(be16(m, pos + 8));
        if pos + 10 + rdlen > len {
            return Err(STAT_DNS_MALFORMED);
        }
        if be16(m, pos + 2) == CLASS_IN
            && let Some(addr) = record_address(m, be16(m, pos), pos + 10, rdlen)
        {
            let ttl = u32::from_be_bytes([
                byte(m, pos + 4),
                byte(m, pos + 5),
                byte(m, pos + 6),
                byte(m, pos + 7),
            ]);
            remember_address(&addr, port_set, ttl, settings, now);
            let n = get16(&m.learned);
            m.addrs[usize::from(n) % DNS_MAX_LEARNED] = addr;
            m.learned = n + 1;
            count(STAT_DNS_LEARNED);
        }
        put(&mut work.pos, (pos + 10 + rdlen) as u32);
        put(&mut work.records, records as u32 + 1);
        put(&mut work.in_name, 1);
    }
    Ok(())
}

/// The address an A or AAAA record's data holds.
#[inline(always)]
fn record_address(m: &DnsEvent, rtype: u16, data: usize, rdlen: usize) -> Option<Addr> {
    match (rtype, rdlen) {
        (TYPE_A, 4) => Some(v4_mapped([
            byte(m, data),
            byte(m, data + 1),
            byte(m, data + 2),
            byte(m, data + 3),
        ])),
        (TYPE_AAAA, 16) => {
            let mut a = [0u8; 16];
            for (j, b) in a.iter_mut().enumerate() {
                *b = byte(m, data + j);
            }
            Some(a)
        }
        _ => None,
    }
}

/// The port set of the most specific rule that allows the question name: one longest-prefix
/// lookup of the name's labels in reverse order (see `egress_common::NAMES`).
#[inline(always)]
fn allowed_port_set(m: &DnsEvent, work: &mut DnsWork) -> Option<u32> {
    reversed_name(m, work);
    let found = NAMES.get(&work.key).map(|v| v.port_set)?;
    (found != NO_PORT_SET).then_some(found)
}

/// Writes the question name's last `NAME_MAX_LABELS` labels, last label first, into
/// `work.key`, with a terminating zero when that is the whole name. One flat loop over the
/// output bytes, its state in map memory (see `question`).
#[inline(always)]
fn reversed_name(m: &DnsEvent, work: &mut DnsWork) {
    let labels = get(&work.labels);
    let first_kept = labels.saturating_sub(NAME_MAX_LABELS as u32);
    put(&mut work.label, labels);
    put(&mut work.left, 0);
    let mut written = 0;
    for i in 0..NAME_KEY_LEN {
        let left = get(&work.left);
        let b = if left == 0 {
            let label = get(&work.label);
            if label <= first_kept {
                if first_kept == 0 {
                    work.key.data.bytes[i] = 0;
                    written = i + 1;
                }
                break;
            }
            put(&mut work.label, label - 1);
            let start = usize::from(work.starts[(label - 1) as usize % NAME_MAX_LABELS]);
            let len = byte(m, start);
            put(&mut work.from, start as u32 + 1);
            put(&mut work.left, u32::from(len));
            len
        } else {
            let from = get(&work.from);
            put(&mut work.from, from + 1);
            put(&mut work.left, left - 1);
            lower(byte(m, from as usize))
        };
        work.key.data.bytes[i] = b;
        written = i + 1;
    }
    work.key.prefix_len = (written * 8) as u32;
}

/// Writes a learned address, keeping a second port set when the address is already allowed
/// through another name (the agent later replaces both with their union).
#[inline(always)]
fn remember_address(addr: &Addr, port_set: u32, ttl: u32, settings: &Settings, now: u64) {
    // Not `clamp`: it panics when min > max, and a panic is an endless loop here.
    let secs = ttl.max(settings.dns_min_ttl).min(settings.dns_max_ttl);
    let expires_ns = now + u64::from(secs) * NS_PER_SEC;
    if let Some(v) = LEARNED.get_ptr_mut(addr) {
        // SAFETY: pointer from a successful lookup, valid for this run.
        let v = unsafe { &mut *v };
        if v.expires_ns > now {
            if v.port_set != port_set && v.port_set != ALL_PORTS && v.extra_set != port_set {
                v.extra_set = port_set;
            }
            if expires_ns > v.expires_ns {
                v.expires_ns = expires_ns;
            }
            return;
        }
    }
    let value = LearnedValue {
        port_set,
        extra_set: NO_PORT_SET,
        expires_ns,
    };
    let _ = LEARNED.insert(addr, value, 0);
}

//! DNS snooping: queries leaving for a trusted resolver are remembered; answers to them are
//! parsed here, in the kernel, and the addresses of allowed names are written into `LEARNED`
//! before the answer reaches the client, so its first packet already passes. The agent
//! receives each learned-from answer afterwards and stays authoritative for expiry, CNAME
//! bookkeeping and bounds.
//!
//! Every index into a message is masked to its buffer, so the verifier sees each access in
//! bounds whatever the message says; the message's own lengths are checked against `len`.
//!
//! What the verifier costs (it is most of the agent's start-up time): the parsing is done
//! in global functions (`#[no_mangle] extern "C"`, BTF linkage global, Linux 5.6+), which
//! the kernel verifies once each, on their own, with unknown scalar arguments, instead of
//! once for every state in which the packet parsing reaches them. Their loops keep at most
//! one live state per iteration: what one iteration hands to the next goes through map
//! memory (volatile), where the verifier sees "some number" rather than one exact range
//! per path.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA},
    check_bounds_signed,
    helpers::bpf_skb_load_bytes,
};
use aya_log_ebpf::debug;
use egress_common::{
    Addr, DNS_EVENT_HEADER, DNS_EVENTS_BYTES, DNS_MAX_LEARNED, DNS_MAX_PAYLOAD, DnsEvent,
    LearnedValue, NAME_KEY_LEN, NAME_MAX_LABELS, NO_PORT_SET, QueryKey, QueryValue,
    STAT_DNS_ANSWERS, STAT_DNS_EVENTS_LOST, STAT_DNS_LEARNED, STAT_DNS_MALFORMED,
    STAT_DNS_UNMATCHED, STAT_DNS_UNSOLICITED, STAT_DNS_UNTRUSTED, Settings, proto, v4_mapped,
};

use crate::{
    maps::{
        DNS_EVENTS, DNS_QUERIES, DNS_QUERY, DNS_SCRATCH, DNS_WORK, DnsWork, LEARNED, NAMES,
        NameWork, QUERY_BYTES, QueryWork, RESOLVERS, SETTINGS,
    },
    packet::{Packet, Skb, carries_payload},
    report::count,
};

const DNS_PORT: u16 = 53;
const HEADER_LEN: usize = 12;
/// Answer records the kernel walks; later ones are left to the agent.
const MAX_ANSWERS: usize = DNS_MAX_LEARNED;
/// Steps of the answer walk: one per record (a pointer or the root label that ends its
/// owner name is read in the record's step), one more per label of an owner name that is
/// not compressed. Room for every record with 24 such labels in all.
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

/// A packet to a trusted resolver's DNS port (a query, if anything).
#[inline(always)]
fn to_resolver(p: &Packet) -> bool {
    p.dport == DNS_PORT && is_dns_transport(p) && is_resolver(&p.dst)
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

/// Where the DNS message starts: after TCP's 2-byte length prefix.
#[inline(always)]
fn message_start(p: &Packet) -> usize {
    if p.proto == proto::TCP {
        p.payload + 2
    } else {
        p.payload
    }
}

/// Copies up to `max` bytes of the DNS message into `to`; returns how many, at least a
/// header's worth, or `None`.
#[inline(always)]
fn load<C: Skb>(ctx: &C, p: &Packet, to: *mut u8, max: usize) -> Option<usize> {
    let start = message_start(p);
    let n = (ctx.skb_len() as usize).saturating_sub(start).min(max);
    // The verifier must see a non-zero, bounded length on the very register passed to the
    // helper (aya issue #1207): check_bounds_signed is inline asm that pins it.
    if !check_bounds_signed(n as i64, HEADER_LEN as i64, max as i64) {
        return None;
    }
    // SAFETY: `to` has room for `max` bytes and n is at most that.
    let rc =
        unsafe { bpf_skb_load_bytes(ctx.as_ptr().cast_const(), start as u32, to.cast(), n as u32) };
    (rc == 0).then_some(n)
}

/// An outgoing packet that claims to come from a trusted resolver's DNS port, carries a
/// message, and is sent by a raw socket: a forged answer (the real resolver answers from
/// its UDP or TCP socket; the kernel's own raw sockets send only resets and bare ACKs),
/// which a router could send straight back to the asking socket ahead of the real one.
#[inline(always)]
pub fn forged_answer<C: Skb>(ctx: &C, p: &Packet) -> bool {
    from_dns_port(p) && carries_payload(ctx, p) && ctx.raw_socket() && is_resolver(&p.src)
}

/// An outgoing packet to a trusted resolver's DNS port from a UDP or TCP socket: remember
/// the query, with the socket that asks, and let it pass. Returns false for every other
/// packet; a raw socket's are decided by the policy like any other, and teach nothing.
#[inline(always)]
pub fn query<C: Skb>(ctx: &C, p: &Packet) -> bool {
    if !to_resolver(p) || ctx.raw_socket() {
        return false;
    }
    if let Some(q) = per_cpu(&DNS_QUERY)
        && let Some(n) = load(ctx, p, q.msg.as_mut_ptr(), QUERY_BYTES)
    {
        put(&mut q.len, n as u32);
        let id = u16::from_be_bytes([q.msg[0], q.msg[1]]);
        // `q` is not used past the call, which borrows the slot itself.
        let name_hash = dns_query_name_hash();
        if name_hash != NO_NAME {
            let key = query_key(p.dst, p.src, p.sport, id, p.proto);
            let value = QueryValue {
                name_hash,
                cookie: ctx.socket_cookie(),
            };
            // A TC program sees a local socket's query after the cgroup program has
            // remembered it with the socket (a pod's query, on the node's end of the pod's
            // link): it must not overwrite that with no socket at all.
            let flags = if C::SOCKET_HOOK { 0 } else { BPF_NOEXIST };
            let _ = DNS_QUERIES.insert(key, value, flags.into());
        }
    }
    true
}

/// An incoming query for a trusted resolver's address delivered to a local socket: the
/// "resolver" is on this side of the enforcer (a namespace of the workload's own, or a
/// resolver running in the enforced cgroup), so its answer must teach nothing: the query
/// is forgotten. A local resolver's names are learned from its upstream's answers.
#[inline(always)]
pub fn query_delivered<C: Skb>(ctx: &C, p: &Packet) {
    if !to_resolver(p) {
        return;
    }
    let Some(id) = ctx.read::<[u8; 2]>(message_start(p)) else {
        return;
    };
    let key = query_key(p.dst, p.src, p.sport, u16::from_be_bytes(id), p.proto);
    let _ = DNS_QUERIES.remove(key);
}

/// What `dns_query_name_hash` returns for a message that is no standard query with one
/// well-formed question. (A name whose hash is this value is not remembered: its answers
/// teach nothing, which harms no one but the one who crafted it.)
const NO_NAME: u64 = 0;

/// The question name's hash of the query in `DNS_QUERY` (or `NO_NAME`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dns_query_name_hash() -> u64 {
    let Some(q) = per_cpu(&DNS_QUERY) else {
        return NO_NAME;
    };
    let QueryWork { name, len, msg, .. } = q;
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if flags & (FLAG_QR | OPCODE_MASK) != 0 || qdcount != 1 {
        return NO_NAME;
    }
    if question(msg, get(len) as usize, name) {
        get64(&name.hash)
    } else {
        NO_NAME
    }
}

/// An incoming packet from port 53: if it is a trusted, solicited answer for an allowed
/// name, learn its addresses and hand it to the agent.
#[inline(always)]
pub fn answer<C: Skb>(ctx: &C, p: &Packet, now: u64) {
    if !is_resolver(&p.src) {
        count(STAT_DNS_UNTRUSTED);
        log_taught_nothing(ctx, p, STAT_DNS_UNTRUSTED);
        return;
    }
    let (Some(msg), Some(work)) = (per_cpu(&DNS_SCRATCH), per_cpu(&DNS_WORK)) else {
        return;
    };
    let Some(n) = load(ctx, p, msg.payload.as_mut_ptr(), DNS_MAX_PAYLOAD) else {
        return;
    };
    msg.len = n as u16;
    msg.learned = 0;
    msg.resolver = p.src;
    msg.client = p.dst;
    work.query = query_key(p.src, p.dst, p.dport, 0, p.proto);
    let stat = dns_learn(now, ctx.receiving_socket());
    if stat == LOCAL_SOCKET {
        return;
    }
    // Borrowed afresh: the slots changed under the call.
    let Some(msg) = per_cpu(&DNS_SCRATCH) else {
        return;
    };
    if stat != LEARNED_OK {
        count(stat);
        log_taught_nothing(ctx, p, stat);
        // Addresses learned before the error still go to the agent, which takes back
        // whatever its own parse does not justify. A trusted, solicited answer for a name
        // no rule allows teaches nothing, but goes to the agent too, so that its events can
        // name what a denied address was resolved from: only while the ring is less than
        // half full, so that such answers can never crowd out the learned-from ones.
        let unmatched = stat == STAT_DNS_UNMATCHED && ring_has_room();
        if get16(&msg.learned) == 0 && !unmatched {
            return;
        }
    }
    send(msg);
}

/// Says why an answer taught nothing, or less than all it holds (debug level, off unless
/// the agent runs with `EGRESS_KERNEL_LOG`; as `verdict::log_denied`, free when off).
/// `why` is the `STAT_DNS_*` counter the answer was counted in.
#[inline(always)]
fn log_taught_nothing<C: Skb>(ctx: &C, p: &Packet, why: u32) {
    debug!(
        ctx,
        "answer from {:i} to {:i} port {}: stopped at STAT_DNS_* {}", p.src, p.dst, p.dport, why
    );
}

/// Whether `DNS_EVENTS` is less than half full.
#[inline(always)]
fn ring_has_room() -> bool {
    DNS_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) < u64::from(DNS_EVENTS_BYTES / 2)
}

/// Hands the answer to the agent: the record is the event's header and the message, not
/// the whole buffer (most answers are a few hundred bytes).
#[inline(always)]
fn send(msg: &DnsEvent) {
    let n = DNS_EVENT_HEADER + usize::from(get16(&msg.len));
    // As in `load`: the size register must be bounded where the helper gets it.
    if !check_bounds_signed(
        n as i64,
        DNS_EVENT_HEADER as i64,
        size_of::<DnsEvent>() as i64,
    ) {
        return;
    }
    // SAFETY: n is at most the size of `msg`.
    let record = unsafe { core::slice::from_raw_parts((msg as *const DnsEvent).cast::<u8>(), n) };
    if DNS_EVENTS.output::<[u8]>(record, 0).is_err() {
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

#[inline(always)]
fn byte(m: &DnsEvent, i: usize) -> u8 {
    m.payload[i & (DNS_MAX_PAYLOAD - 1)]
}

#[inline(always)]
fn be16(m: &DnsEvent, i: usize) -> u16 {
    u16::from_be_bytes([byte(m, i), byte(m, i + 1)])
}

/// ASCII lowercase without a branch: bit 8 of `b + 191` is set from `A` on, that of
/// `b + 165` after `Z`. A branch would make two paths through every step of the loops
/// that call this, and the verifier walks each.
#[inline(always)]
fn lower(b: u8) -> u8 {
    let b = u32::from(b);
    let upper = ((b + 191) & !(b + 165)) >> 8 & 1;
    (b + (upper << 5)) as u8
}

/// Longest name in wire form, root label included.
const MAX_NAME_WIRE: usize = 255;
/// Where a name's root label can be at the latest.
const LAST_ROOT_AT: usize = HEADER_LEN + MAX_NAME_WIRE - 1;
/// Labels of the longest name with its root label: each other label takes two bytes at least.
const MAX_NAME_LABELS: usize = MAX_NAME_WIRE / 2 + 1;

/// Walks the question name of `msg` (`len` bytes of it) into `name`: its labels (how many,
/// where the last `NAME_MAX_LABELS` start), its end (the offset of its root label) and its
/// FNV-1a hash over the lowercased wire form without the root label. False when the name
/// is malformed or longer than 255 bytes.
///
/// Two flat loops, one label and one byte per step: nested loops would multiply their
/// iterations for the verifier.
#[inline(always)]
fn question<const N: usize>(msg: &[u8; N], len: usize, name: &mut NameWork) -> bool {
    const { assert!(N.is_power_of_two() && N > LAST_ROOT_AT) };
    let mut pos = HEADER_LEN;
    let mut ended = false;
    for label in 0..MAX_NAME_LABELS {
        if pos >= len || pos > LAST_ROOT_AT {
            return false;
        }
        let b = msg[pos & (N - 1)];
        if b == 0 {
            // Through memory: kept in registers, the exact values of each of the loop's
            // exits would make one state per exit for everything that follows.
            put(&mut name.end, pos as u32);
            put(&mut name.labels, label as u32);
            ended = true;
            break;
        }
        // Compression pointers have no place in a question; lengths above 63 are invalid.
        if b > 63 {
            return false;
        }
        name.starts[label % NAME_MAX_LABELS] = pos as u16;
        pos += usize::from(b) + 1;
    }
    if !ended {
        return false;
    }
    let end = get(&name.end) as usize;
    let mut hash = FNV_OFFSET;
    for i in 0..MAX_NAME_WIRE - 1 {
        let pos = HEADER_LEN + i;
        if pos >= end {
            break;
        }
        hash = (hash ^ u64::from(lower(msg[pos & (N - 1)]))).wrapping_mul(FNV_PRIME);
    }
    put64(&mut name.hash, hash);
    true
}

const FLAG_QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;

/// Loop state goes through memory with volatile accesses: the compiler would otherwise keep
/// it in a register, where the verifier tracks its exact range.
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
fn get64(v: &u64) -> u64 {
    // SAFETY: a valid reference.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn put(v: &mut u32, value: u32) {
    // SAFETY: a valid reference.
    unsafe { core::ptr::write_volatile(v, value) }
}

#[inline(always)]
fn put64(v: &mut u64, value: u64) {
    // SAFETY: a valid reference.
    unsafe { core::ptr::write_volatile(v, value) }
}

/// This CPU's slot of a one-entry per-CPU array.
#[inline(always)]
fn per_cpu<T>(map: &aya_ebpf::maps::PerCpuArray<T>) -> Option<&'static mut T> {
    let slot = map.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, used only within this program run.
    Some(unsafe { &mut *slot })
}

/// What `dns_learn` returns when the answer was walked to its end.
const LEARNED_OK: u32 = 0;
/// What `dns_learn` returns to a TC program for an answer to a local socket's query: the
/// cgroup program learns from it as it reaches that socket.
const LOCAL_SOCKET: u32 = u32::MAX;

/// Checks the answer in `DNS_SCRATCH`, delivered to the socket `cookie` (0: none seen),
/// against its query (`DNS_WORK.query`, id still 0) and the policy, then learns its
/// addresses. Returns `LEARNED_OK`, `LOCAL_SOCKET`, or the counter that says why the walk
/// stopped.
///
/// Each global function borrows the per-CPU slots itself; a caller borrows them afresh
/// after a call rather than hold a reference across it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dns_learn(now: u64, cookie: u64) -> u32 {
    let (Some(m), Some(work)) = (per_cpu(&DNS_SCRATCH), per_cpu(&DNS_WORK)) else {
        return STAT_DNS_MALFORMED;
    };
    let flags = be16(m, 2);
    if flags & (FLAG_QR | OPCODE_MASK) != FLAG_QR || be16(m, 4) != 1 {
        return STAT_DNS_MALFORMED;
    }
    work.query.id = be16(m, 0);
    // The key stays in map memory: a copy would take 40 bytes of the stack.
    let key: &QueryKey = &work.query;
    // SAFETY: the value is copied out at once.
    let Some((asked, asker)) = (unsafe { DNS_QUERIES.get(key) }).map(|v| (v.name_hash, v.cookie))
    else {
        return STAT_DNS_UNSOLICITED;
    };
    if asker != cookie {
        // Only the socket that asked is answered: not another socket that shares the
        // query's addresses and port, in this namespace or another.
        return if cookie == 0 {
            LOCAL_SOCKET
        } else {
            STAT_DNS_UNSOLICITED
        };
    }
    if dns_answer_question() == 0 {
        return STAT_DNS_MALFORMED;
    }
    let Some(work) = per_cpu(&DNS_WORK) else {
        return STAT_DNS_MALFORMED;
    };
    if get64(&work.name.hash) != asked {
        return STAT_DNS_UNSOLICITED;
    }
    // One answer per query: a second one (a forgery racing the real one) is unsolicited.
    let key: &QueryKey = &work.query;
    let _ = DNS_QUERIES.remove(key);
    count(STAT_DNS_ANSWERS);
    let port_set = dns_answer_port_set();
    if port_set == NO_PORT_SET {
        return STAT_DNS_UNMATCHED;
    }
    walk(port_set, now)
}

/// Walks the question of the answer in `DNS_SCRATCH` into `DNS_WORK.name`; 0 when it is
/// malformed.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dns_answer_question() -> u32 {
    let (Some(m), Some(work)) = (per_cpu(&DNS_SCRATCH), per_cpu(&DNS_WORK)) else {
        return 0;
    };
    let len = usize::from(get16(&m.len));
    u32::from(question(&m.payload, len, &mut work.name))
}

/// The port set of the most specific rule that allows the question name walked into
/// `DNS_WORK.name` (`NO_PORT_SET` when none does): one longest-prefix lookup of the name's
/// labels in reverse order (see `egress_common::NAMES`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dns_answer_port_set() -> u32 {
    let (Some(m), Some(work)) = (per_cpu(&DNS_SCRATCH), per_cpu(&DNS_WORK)) else {
        return NO_PORT_SET;
    };
    reversed_name(m, work);
    NAMES.get(&work.key).map_or(NO_PORT_SET, |v| v.port_set)
}

/// After the question's root label, type and class: the answer records. One flat loop:
/// each step consumes one label of an owner name, or the end of one (a pointer or the
/// root label) and its record's fixed part and data.
#[inline(always)]
fn walk(port_set: u32, now: u64) -> u32 {
    let Some(work) = per_cpu(&DNS_WORK) else {
        return STAT_DNS_MALFORMED;
    };
    put(&mut work.pos, get(&work.name.end) + 5);
    put(&mut work.records, 0);
    for _ in 0..MAX_ANSWER_STEPS {
        // Borrowed in each step: a step ends with a call that borrows them too.
        let (Some(m), Some(work)) = (per_cpu(&DNS_SCRATCH), per_cpu(&DNS_WORK)) else {
            return STAT_DNS_MALFORMED;
        };
        let records = get(&work.records) as usize;
        let ancount = usize::from(be16(m, 6));
        if records >= ancount || records >= MAX_ANSWERS {
            break;
        }
        let len = usize::from(get16(&m.len));
        let pos = get(&work.pos) as usize;
        if pos >= len {
            return STAT_DNS_MALFORMED;
        }
        let b = byte(m, pos);
        let rec = match b & 0xc0 {
            0xc0 => pos + 2,
            0 if b == 0 => pos + 1,
            0 => {
                put(&mut work.pos, (pos + usize::from(b) + 1) as u32);
                continue;
            }
            _ => return STAT_DNS_MALFORMED,
        };
        if rec + 10 > len {
            return STAT_DNS_MALFORMED;
        }
        let rdlen = usize::from(be16(m, rec + 8));
        if rec + 10 + rdlen > len {
            return STAT_DNS_MALFORMED;
        }
        put(&mut work.pos, (rec + 10 + rdlen) as u32);
        put(&mut work.records, records as u32 + 1);
        if be16(m, rec + 2) == CLASS_IN {
            dns_learn_record(rec as u32, port_set, now);
        }
    }
    LEARNED_OK
}

/// Learns the address of the class IN record at offset `rec` of the answer in
/// `DNS_SCRATCH`, if it is an A or AAAA record, with `port_set`, and adds it to the event.
/// A function of its own: each step of the walk then ends in one state, whatever became of
/// the address. The address and the new `LEARNED` value are built in map memory, not on
/// the stack: the verifier allows 512 bytes for all frames of a call chain together.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dns_learn_record(rec: u32, port_set: u32, now: u64) -> u32 {
    let (Some(m), Some(work), Some(settings)) =
        (per_cpu(&DNS_SCRATCH), per_cpu(&DNS_WORK), SETTINGS.get(0))
    else {
        return 0;
    };
    let rec = rec as usize;
    let data = rec + 10;
    let n = get16(&m.learned);
    let slot = usize::from(n) % DNS_MAX_LEARNED;
    match (be16(m, rec), be16(m, rec + 8)) {
        (TYPE_A, 4) => {
            let a = [
                byte(m, data),
                byte(m, data + 1),
                byte(m, data + 2),
                byte(m, data + 3),
            ];
            m.addrs[slot] = v4_mapped(a);
        }
        (TYPE_AAAA, 16) => {
            for j in 0..16 {
                m.addrs[slot][j] = byte(m, data + j);
            }
        }
        _ => return 0,
    }
    let ttl = u32::from_be_bytes([
        byte(m, rec + 4),
        byte(m, rec + 5),
        byte(m, rec + 6),
        byte(m, rec + 7),
    ]);
    remember_address(&m.addrs[slot], work, port_set, ttl, settings, now);
    m.learned = n + 1;
    count(STAT_DNS_LEARNED);
    1
}

/// Writes the question name's last `NAME_MAX_LABELS` labels, last label first, into
/// `work.key`, with a terminating zero when that is the whole name. One flat loop over the
/// output bytes, all of its state in map memory.
#[inline(always)]
fn reversed_name(m: &DnsEvent, work: &mut DnsWork) {
    let labels = get(&work.name.labels);
    put(&mut work.label, labels);
    put(&mut work.kept, labels.min(NAME_MAX_LABELS as u32));
    put(&mut work.left, 0);
    put(&mut work.written, 0);
    for i in 0..NAME_KEY_LEN {
        let left = get(&work.left);
        let b = if left == 0 {
            let kept = get(&work.kept);
            if kept == 0 {
                if get(&work.label) == 0 {
                    work.key.data.bytes[i] = 0;
                    put(&mut work.written, i as u32 + 1);
                }
                break;
            }
            put(&mut work.kept, kept - 1);
            let label = get(&work.label) - 1;
            put(&mut work.label, label);
            let start = usize::from(work.name.starts[label as usize % NAME_MAX_LABELS]);
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
        put(&mut work.written, i as u32 + 1);
    }
    work.key.prefix_len = get(&work.written) * 8;
}

/// Writes a learned address, keeping a second port set when the address is already allowed
/// through another name (the agent later replaces both with their union).
#[inline(always)]
fn remember_address(
    addr: &Addr,
    work: &mut DnsWork,
    port_set: u32,
    ttl: u32,
    settings: &Settings,
    now: u64,
) {
    // Not `clamp`: it panics when min > max, and a panic is an endless loop here.
    let secs = ttl.max(settings.dns_min_ttl).min(settings.dns_max_ttl);
    let expires_ns = now + u64::from(secs) * NS_PER_SEC;
    if let Some(v) = LEARNED.get_ptr_mut(addr) {
        // SAFETY: pointer from a successful lookup, valid for this run.
        unsafe { &mut *v }.teach(port_set, expires_ns, now);
        return;
    }
    work.value = LearnedValue::new(port_set, expires_ns);
    let value: &LearnedValue = &work.value;
    let _ = LEARNED.insert(addr, value, 0);
}

//! The per-packet decision, shared by the cgroup and TC programs.
//!
//! Egress, in order (first match wins):
//! 0. on a link to workloads (`from_workload_tc`), a packet whose source the node does not
//!    route back over that link is denied: a forgery (see `route`);
//! 1. a later fragment passes when its datagram's first fragment did (`FRAGS`);
//! 2. a forged DNS answer (a raw socket claiming a trusted resolver's port 53) is denied,
//!    and DNS queries to trusted resolvers pass (see `dns`);
//! 3. a fresh entry in `FLOWS` (one lookup for every packet after a flow's first); a flow
//!    started from outside passes only replies, from the socket that received it;
//! 4. what the network itself needs: loopback, IPv6 neighbour discovery and MLD on the
//!    link, DHCPv6 solicitations, and ICMP errors about a known flow sent to its remote;
//! 5. `HOSTS` (single addresses), else `CIDRS` (longest prefix), then the port set; then
//!    `LEARNED` (DNS-learned addresses).
//!
//! Anything else is denied: dropped in enforce mode, passed and reported in audit mode,
//! with the reason the decision path knows where it denies (`REASON_*` in egress-common).
//! An IP packet whose headers cannot be read is denied (fail closed).
//!
//! Each way past the policy is narrowed against a workload that forges packets (raw
//! sockets, or namespaces of its own): see SECURITY.md.
use aya_ebpf::helpers::{bpf_get_socket_uid, bpf_ktime_get_boot_ns, bpf_skb_cgroup_id};
use aya_ebpf::maps::lpm_trie::Key;
use aya_log_ebpf::debug;
use egress_common::{
    ACTION_AUDIT, ACTION_DENY, ALL_PORTS, Addr, CidrKey, Event, FLOW_ALLOWED, FLOW_AUDITED,
    FLOW_DENIED, FLOW_INBOUND, FlowKey, FlowValue, FragKey, MODE_ENFORCE, NO_PORT_SET, PortKey,
    REASON_FORGED_DNS, REASON_FRAGMENT, REASON_ICMP_ERROR, REASON_LEARNED_EXPIRED,
    REASON_LEARNED_PORT, REASON_MALFORMED, REASON_NEIGHBOUR, REASON_NO_RULE, REASON_PORT,
    REASON_SPOOFED_SOURCE, STAT_ALLOWED_BASE, STAT_AUDITED_BASE, STAT_DROPPED_BASE,
    STAT_PROTO_OTHER, Settings, proto, stat_proto,
};

use crate::{
    dns,
    maps::{CIDRS, FLOWS, FRAGS, HOSTS, LEARNED, PORTS, SETTINGS},
    packet::{
        FIRST_FRAGMENT, L3Start, LATER_FRAGMENT, Packet, Skb, TCP_ACK, TCP_SYN, carries_payload,
        parse, quoted_flow,
    },
    report::{count, emit},
    route,
};

/// A flow's `last_seen_ns` is rewritten at most this often, so that busy flows do not dirty
/// a shared cache line on every packet.
const REFRESH_NS: u64 = 1_000_000_000;

/// What `decide` returns for a packet the policy does not let through: this plus the
/// packet's `REASON_*` (above every verdict counter base).
const DENIED: u32 = 0x100;

#[inline(always)]
fn denied(reason: u8) -> u32 {
    DENIED + u32::from(reason)
}

/// Decides an outgoing packet: `true` lets it pass. `from_workload`: the packet comes in
/// over a link from workloads (`from_workload_tc`), not from this host's own stack.
#[inline(always)]
pub fn egress<C: Skb>(ctx: &C, l3: L3Start, from_workload: bool) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        // Cannot happen (a one-entry array always has index 0); fail closed if it does.
        return false;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(p) = parse(ctx, l3) else {
        return deny(ctx, settings, None, REASON_MALFORMED, now);
    };
    let words = flow_key(&p.dst, p.dport, p.sport, p.proto);
    let key = words.key();
    let verdict = if from_workload && !route::source_routes_back(ctx, &p) {
        denied(REASON_SPOOFED_SOURCE)
    } else {
        decide(ctx, settings, &p, key, now)
    };
    let pass = if verdict >= DENIED {
        deny(
            ctx,
            settings,
            Some((&p, key)),
            (verdict - DENIED) as u8,
            now,
        )
    } else {
        count(verdict + stat_proto(p.proto));
        true
    };
    if pass && p.fragment == FIRST_FRAGMENT {
        remember_datagram(&p);
    }
    pass
}

/// The verdict counter base (`STAT_ALLOWED_BASE` or `STAT_AUDITED_BASE`) of a packet that
/// passes, or `denied(reason)`.
///
/// The order is the cost order of what a connection's packets meet: a packet of a known
/// flow pays for its header read, the fragment and port-53 tests (two compares each, a
/// helper call only on a packet from or to port 53), one `FLOWS` lookup and the counter.
/// The tests before the lookup must stay there: a later fragment has no ports (no flow
/// key), a forged answer may share its key with a live flow (a raw socket writing into an
/// allowed UDP flow from port 53), and every query must be seen, also on a socket already
/// in `FLOWS`. Everything after the lookup (loopback, neighbour discovery, ICMP errors,
/// the policy) a flow's first packet needs only: a flow is remembered as allowed only when
/// the policy allowed it, so its later packets passed these already; a flow started from
/// outside (`FLOW_INBOUND`) is checked at the lookup itself, packet by packet (replies
/// only, from the socket that received it); a raw socket's forgery is caught before it.
#[inline(always)]
fn decide<C: Skb>(ctx: &C, settings: &Settings, p: &Packet, key: &FlowKey, now: u64) -> u32 {
    if p.fragment == LATER_FRAGMENT {
        return if datagram_allowed(p) {
            STAT_ALLOWED_BASE
        } else {
            denied(REASON_FRAGMENT)
        };
    }
    if dns::forged_answer(ctx, p) {
        return denied(REASON_FORGED_DNS);
    }
    // Before the flow lookup: every query must be seen, also on a socket already in FLOWS.
    if dns::query(ctx, p) {
        return STAT_ALLOWED_BASE;
    }
    if let Some(at) = FLOWS.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful map lookup and stays valid for
        // the program run; concurrent writers only store whole integers.
        let flow = unsafe { &mut *at };
        let age = now.saturating_sub(flow.last_seen_ns);
        if age <= idle_timeout(settings, p.proto) {
            let verdict = match flow.state {
                FLOW_ALLOWED => STAT_ALLOWED_BASE,
                FLOW_AUDITED if settings.mode != MODE_ENFORCE => STAT_AUDITED_BASE,
                FLOW_INBOUND => {
                    if replies_inbound(ctx, p, flow) {
                        STAT_ALLOWED_BASE
                    } else {
                        DENIED
                    }
                }
                _ => DENIED,
            };
            if verdict != DENIED {
                if age > REFRESH_NS {
                    flow.last_seen_ns = now;
                }
                return verdict;
            }
        }
    }
    // Not remembered as a flow: the flow key has no ICMP type, so an allowed neighbour
    // solicitation must not open the address to every ICMPv6 message.
    let refused = match always_allowed(ctx, p) {
        Needed::Yes => return STAT_ALLOWED_BASE,
        Needed::OutOfScope(reason) => reason,
        Needed::No => 0,
    };
    match policy_allows(p, now) {
        0 => {
            remember(key, FLOW_ALLOWED, 0, now);
            STAT_ALLOWED_BASE
        }
        // What the network needs, out of its scope, says more than "no rule".
        _ if refused != 0 => denied(refused),
        reason => denied(reason),
    }
}

/// Whether a packet of a flow started from outside is a reply the flow allows: never a
/// TCP connection request or an ICMP message other than an echo reply, and only from the
/// socket that received the flow (see `FLOW_INBOUND`).
#[inline(always)]
fn replies_inbound<C: Skb>(ctx: &C, p: &Packet, flow: &FlowValue) -> bool {
    let reply = match p.proto {
        proto::TCP => p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN,
        proto::ICMP => p.icmp_type == ICMP_ECHO_REPLY,
        proto::ICMPV6 => p.icmp_type == ICMPV6_ECHO_REPLY,
        _ => true,
    };
    if !reply {
        return false;
    }
    if flow.owner == 0 {
        // Past its handshake a TCP flow is the kernel's own: a raw socket elsewhere could
        // write data into it. The kernel's own raw sockets send resets and bare ACKs
        // (time-wait), which carry none.
        return p.proto != proto::TCP || !carries_payload(ctx, p) || !ctx.raw_socket();
    }
    flow.owner == ctx.socket_cookie()
}

/// Learns from DNS answers, and records flows that a remote end starts towards the enforced
/// side, so that the replies pass: TCP connection requests, UDP datagrams and ICMP echo
/// requests. Nothing that arrives over loopback counts: its sender is in the same network
/// namespace, possibly the workload itself with a forged source, and replies over loopback
/// pass anyway.
#[inline(always)]
pub fn ingress<C: Skb>(ctx: &C, l3: L3Start) {
    if ctx.on_loopback() {
        return;
    }
    let Some(p) = parse(ctx, l3) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // Answers to this side's own queries start no flow: nothing more to do for them.
    if dns::from_dns_port(&p) {
        dns::answer(ctx, &p, now);
        return;
    }
    if C::SOCKET_HOOK {
        dns::query_delivered(ctx, &p);
    }
    // A later fragment has no ports: it cannot start a flow (one with ports 0 would let
    // any later fragment to its sender out).
    if p.fragment == LATER_FRAGMENT {
        return;
    }
    let starts_flow = match p.proto {
        proto::TCP => p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        proto::UDP => true,
        proto::ICMP => p.icmp_type == ICMP_ECHO_REQUEST,
        proto::ICMPV6 => p.icmp_type == ICMPV6_ECHO_REQUEST,
        _ => false,
    };
    if !starts_flow {
        return;
    }
    // A TCP connection is answered by the listener's request socket (the SYN-ACK: its
    // cookie is the listener's on some kernels and not on others, IPv6 on 6.1 and before)
    // and then by the accepted socket, neither of them the socket that received the SYN;
    // past a SYN only the kernel's TCP stack answers, which the raw-socket rule covers.
    let owner = if p.proto == proto::TCP {
        0
    } else {
        ctx.receiving_socket()
    };
    let words = flow_key(&p.src, p.sport, p.dport, p.proto);
    let key = words.key();
    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: as in `decide`.
        let flow = unsafe { &mut *flow };
        let kept = flow.state == FLOW_ALLOWED
            || (flow.state == FLOW_INBOUND && (flow.owner == 0 || flow.owner == owner));
        if kept {
            if now.saturating_sub(flow.last_seen_ns) > REFRESH_NS {
                flow.last_seen_ns = now;
            }
            return;
        }
    }
    remember(key, FLOW_INBOUND, owner, now);
}

/// A `FlowKey` built in 8-byte-aligned memory as three whole words. Built field by field,
/// the compiler copied the address byte by byte (32 instructions) and zeroed the padding
/// with a call to a byte loop (`memset`, a BPF-to-BPF call and return), twice per packet.
#[repr(C, align(8))]
struct FlowKeyWords([u64; 3]);

impl FlowKeyWords {
    #[inline(always)]
    fn key(&self) -> &FlowKey {
        const {
            assert!(size_of::<FlowKey>() == size_of::<Self>());
            assert!(align_of::<FlowKey>() <= align_of::<Self>());
        };
        // SAFETY: same size, alignment at least FlowKey's, and FlowKey (repr(C), integers
        // and byte arrays) is valid for any bytes.
        unsafe { &*(self as *const Self).cast::<FlowKey>() }
    }
}

/// The words of `FlowKey { remote, remote_port, local_port, proto, _pad: 0 }` (BPF is
/// little-endian: the ports at bytes 16..20, the protocol at 20, padding after it).
#[inline(always)]
fn flow_key(remote: &Addr, remote_port: u16, local_port: u16, proto: u8) -> FlowKeyWords {
    let remote = remote.as_ptr().cast::<u64>();
    // SAFETY: two reads within the 16 bytes of `remote` (the compiler makes them whole-word
    // loads where it knows the alignment, as for `Packet`'s addresses).
    let (a, b) = unsafe { (remote.read_unaligned(), remote.add(1).read_unaligned()) };
    let ports = u64::from(remote_port) | u64::from(local_port) << 16 | u64::from(proto) << 32;
    FlowKeyWords([a, b, ports])
}

#[inline(always)]
fn idle_timeout(settings: &Settings, proto: u8) -> u64 {
    if proto == proto::TCP {
        settings.tcp_idle_ns
    } else {
        settings.other_idle_ns
    }
}

#[inline(always)]
fn remember(key: &FlowKey, state: u8, owner: u64, now: u64) {
    const { assert!(size_of::<FlowValue>() == size_of::<[u64; 3]>()) };
    // As three words, for the reason given at `FlowKeyWords`: last seen, owner, then the
    // state in the low byte of the third (its padding zero).
    // SAFETY: same size; FlowValue (repr(C), integers and bytes) is valid for any bytes.
    let value: FlowValue = unsafe { core::mem::transmute([now, owner, u64::from(state)]) };
    // A full LRU map evicts the oldest flow; an insert failure only costs a re-decision.
    let _ = FLOWS.insert(key, value, 0);
}

#[inline(always)]
fn datagram_key(p: &Packet) -> FragKey {
    FragKey {
        dst: p.dst,
        id: p.frag_id,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// Lets the later fragments of a datagram whose first fragment passed follow it.
#[inline(always)]
fn remember_datagram(p: &Packet) {
    // A full LRU map evicts the oldest datagram, whose later fragments are then denied.
    let _ = FRAGS.insert(datagram_key(p), 1, 0);
}

#[inline(always)]
fn datagram_allowed(p: &Packet) -> bool {
    // SAFETY: only tested for presence.
    unsafe { FRAGS.get(datagram_key(p)).is_some() }
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMPROB: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ICMPV6_MLD_QUERY: u8 = 130;
const ICMPV6_MLD_DONE: u8 = 132;
const ICMPV6_ND_FIRST: u8 = 133; // router solicitation
const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const ICMPV6_ND_LAST: u8 = 137; // redirect
const ICMPV6_MLD2_REPORT: u8 = 143;
const DHCPV6_SERVER_PORT: u16 = 547;
/// ff02::1:2, All_DHCP_Relay_Agents_and_Servers: link-local scope, never leaves the link.
const DHCPV6_SERVERS: Addr = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];
/// The largest ICMP error the kernel sends (from the ICMP header on): it quotes what fits
/// in 576 bytes of IPv4 (RFC 1812), 1,280 of IPv6 (RFC 4443), after the IP header.
const ICMP_MAX_ERROR: u32 = 576 - 20;
const ICMPV6_MAX_ERROR: u32 = 1280 - 40;
/// Neighbour discovery messages carry hop limit 255 (RFC 4861), MLD messages 1 (RFC 3810):
/// a receiver drops anything else, so nothing else is neighbour discovery or MLD.
const ND_HOP_LIMIT: u8 = 255;
const MLD_HOP_LIMIT: u8 = 1;
/// A neighbour solicitation or advertisement: 24 bytes and one link-layer address option.
const ND_MAX_LEN: u32 = 24 + 8;

/// Whether a packet is traffic the network itself needs.
enum Needed {
    /// It is: it passes whatever the policy says.
    Yes,
    /// It is of a kind the network needs (an ICMP error, neighbour discovery, MLD), but
    /// not within that kind's scope: the policy decides, and this `REASON_*` explains a deny.
    OutOfScope(u8),
    No,
}

impl Needed {
    #[inline(always)]
    fn within(in_scope: bool, reason: u8) -> Self {
        if in_scope {
            Needed::Yes
        } else {
            Needed::OutOfScope(reason)
        }
    }
}

/// Traffic the network itself needs, whatever the policy says.
#[inline(always)]
fn always_allowed<C: Skb>(ctx: &C, p: &Packet) -> Needed {
    if ctx.on_loopback() || is_loopback(&p.dst) {
        return Needed::Yes;
    }
    match p.proto {
        proto::ICMPV6 => match p.icmp_type {
            ICMPV6_MLD_QUERY..=ICMPV6_MLD_DONE | ICMPV6_MLD2_REPORT => Needed::within(
                p.hop_limit == MLD_HOP_LIMIT && is_multicast(&p.dst),
                REASON_NEIGHBOUR,
            ),
            ICMPV6_ND_FIRST..=ICMPV6_ND_LAST => Needed::within(
                p.hop_limit == ND_HOP_LIMIT
                    && (is_link_scope(&p.dst) || is_neighbour_unicast(ctx, p)),
                REASON_NEIGHBOUR,
            ),
            ICMPV6_DEST_UNREACH..=ICMPV6_PARAMPROB => Needed::within(
                error_about_known_flow(ctx, p, ICMPV6_MAX_ERROR),
                REASON_ICMP_ERROR,
            ),
            _ => Needed::No,
        },
        proto::ICMP => match p.icmp_type {
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB => Needed::within(
                error_about_known_flow(ctx, p, ICMP_MAX_ERROR),
                REASON_ICMP_ERROR,
            ),
            _ => Needed::No,
        },
        proto::UDP if p.dport == DHCPV6_SERVER_PORT && p.dst == DHCPV6_SERVERS => Needed::Yes,
        _ => Needed::No,
    }
}

/// `127.0.0.0/8` (IPv4-mapped) or `::1`.
#[inline(always)]
fn is_loopback(a: &Addr) -> bool {
    let head_zero = a[0..10].iter().all(|b| *b == 0);
    (head_zero && a[10] == 0xff && a[11] == 0xff && a[12] == 127)
        || (head_zero && a[10..15].iter().all(|b| *b == 0) && a[15] == 1)
}

/// `ff00::/8`.
#[inline(always)]
fn is_multicast(a: &Addr) -> bool {
    a[0] == 0xff
}

/// Addresses no router forwards: `fe80::/10`, and multicast of interface- or link-local
/// scope (`ff01::/16`, `ff02::/16`).
#[inline(always)]
fn is_link_scope(a: &Addr) -> bool {
    (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || (a[0] == 0xff && matches!(a[1] & 0x0f, 1 | 2))
}

/// A neighbour solicitation or advertisement to a neighbour's routable address (address
/// resolution answers, and unreachability probes, go to the neighbour's own address): only
/// when it carries nothing of its own, so that it cannot carry data to a distant address.
/// The target must be the destination (a solicitation) or the source (an advertisement),
/// the reserved bits zero, and there is room for one link-layer address option.
#[inline(always)]
fn is_neighbour_unicast<C: Skb>(ctx: &C, p: &Packet) -> bool {
    let about = match p.icmp_type {
        ICMPV6_NEIGHBOUR_SOLICITATION => &p.dst,
        ICMPV6_NEIGHBOUR_ADVERTISEMENT => &p.src,
        _ => return false,
    };
    if ctx.skb_len().saturating_sub(p.l4 as u32) > ND_MAX_LEN {
        return false;
    }
    let Some(m) = ctx.read::<[u8; 24]>(p.l4) else {
        return false;
    };
    // NS: 32 reserved bits; NA: the R, S and O flags, then 29 reserved bits.
    let reserved = u32::from_be_bytes([m[4], m[5], m[6], m[7]]) & 0x1fff_ffff;
    reserved == 0 && m[8..24] == about[..]
}

/// An ICMP error passes when it quotes a packet of a flow already allowed or started from
/// outside, goes to that flow's remote end (the quoted packet's source), and is no longer
/// than the errors the kernel sends: never to anyone else, never a carrier of data.
#[inline(always)]
fn error_about_known_flow<C: Skb>(ctx: &C, p: &Packet, max_len: u32) -> bool {
    if ctx.skb_len().saturating_sub(p.l4 as u32) > max_len {
        return false;
    }
    let Some((remote, remote_port, local_port, proto)) = quoted_flow(ctx, p) else {
        return false;
    };
    if remote != p.dst {
        return false;
    }
    let words = flow_key(&remote, remote_port, local_port, proto);
    // SAFETY: the reference is only read within this program run.
    matches!(unsafe { FLOWS.get(words.key()) }, Some(f) if f.state == FLOW_ALLOWED || f.state == FLOW_INBOUND)
}

/// Static rules first (`HOSTS`, then `CIDRS`), then DNS-learned addresses: 0 when they allow the packet,
/// else why not (a `REASON_*`). A live learned address whose names' ports do not fit says
/// more than a CIDR rule's ports, and either more than an expired learned address.
#[inline(always)]
fn policy_allows(p: &Packet, now: u64) -> u8 {
    // A host entry is the longest prefix its address can match: the trie would answer the
    // same, with a walk instead of a hash.
    // SAFETY: the reference is only read within this program run.
    let rule = match unsafe { HOSTS.get(p.dst) } {
        Some(v) => Some(v.port_set),
        None => CIDRS
            .get(Key::new(128, CidrKey { addr: p.dst }))
            .map(|v| v.port_set),
    };
    let cidr_reason = match rule {
        Some(set) if port_set_allows(set, p) => return 0,
        Some(_) => REASON_PORT,
        None => REASON_NO_RULE,
    };
    // SAFETY: the reference is only read within this program run.
    match unsafe { LEARNED.get(p.dst) } {
        Some(l) if l.expires_ns > now => {
            if port_set_allows(l.port_set, p)
                || (l.extra_set != NO_PORT_SET && port_set_allows(l.extra_set, p))
            {
                0
            } else {
                REASON_LEARNED_PORT
            }
        }
        Some(_) if cidr_reason == REASON_NO_RULE => REASON_LEARNED_EXPIRED,
        _ => cidr_reason,
    }
}

#[inline(always)]
fn port_set_allows(port_set: u32, p: &Packet) -> bool {
    if port_set == ALL_PORTS {
        return true;
    }
    let proto = ports_proto(p.proto);
    // SAFETY: the references are only tested for presence.
    unsafe {
        PORTS.get(PortKey::new(port_set, proto, p.dport)).is_some()
            || (p.dport != 0 && PORTS.get(PortKey::new(port_set, proto, 0)).is_some())
    }
}

/// ICMP and ICMPv6 share one policy entry ("ICMP"), stored under the IPv4 number.
#[inline(always)]
fn ports_proto(proto: u8) -> u8 {
    if proto == proto::ICMPV6 {
        proto::ICMP
    } else {
        proto
    }
}

/// Applies the mode to a packet the policy does not allow, for `reason`. One event per
/// flow: a later packet of a flow already reported passes quietly (audit mode) or is
/// dropped and counted in the flow's entry (enforce mode: retransmits), see `FLOW_DENIED`.
#[inline(always)]
fn deny<C: Skb>(
    ctx: &C,
    settings: &Settings,
    packet: Option<(&Packet, &FlowKey)>,
    reason: u8,
    now: u64,
) -> bool {
    let enforce = settings.mode == MODE_ENFORCE;
    let action = if enforce { ACTION_DENY } else { ACTION_AUDIT };
    let verdict = if enforce {
        STAT_DROPPED_BASE
    } else {
        STAT_AUDITED_BASE
    };
    count(verdict + packet.map_or(STAT_PROTO_OTHER, |(p, _)| stat_proto(p.proto)));
    log_denied(ctx, packet.map(|(p, _)| p), reason);
    let mut keep_entry = false;
    if let Some((p, key)) = packet
        && let Some(flow) = FLOWS.get_ptr_mut(key)
    {
        // SAFETY: as in `decide`.
        let flow = unsafe { &mut *flow };
        let live = now.saturating_sub(flow.last_seen_ns) <= idle_timeout(settings, p.proto);
        if enforce && live && flow.state == FLOW_DENIED {
            flow.owner += 1;
            flow.last_seen_ns = now;
            return false;
        }
        // A live flow allowed or started from outside keeps its entry, so that its
        // packets still pass after a packet with its key was denied (one that is no reply,
        // or a forged one, which is denied before the flow is looked at).
        keep_entry = live && (flow.state == FLOW_INBOUND || flow.state == FLOW_ALLOWED);
    }
    // SAFETY: both helpers only read the skb the program was called with.
    let (cgroup_id, uid) = unsafe { (bpf_skb_cgroup_id(ctx.skb()), bpf_get_socket_uid(ctx.skb())) };
    let mut event = Event {
        cgroup_id,
        dst: [0; 16],
        dport: 0,
        proto: 0,
        action,
        uid,
        sport: 0,
        reason,
        _pad: [0; 5],
    };
    if let Some((p, _)) = packet {
        (event.dst, event.dport, event.proto, event.sport) = (p.dst, p.dport, p.proto, p.sport);
    }
    let sent = emit(settings, now, &event);
    if let Some((_, key)) = packet
        && !keep_entry
    {
        if !enforce {
            // One event per audited flow: later packets pass quietly while in audit mode.
            remember(key, FLOW_AUDITED, 0, now);
        } else if sent {
            // A flow whose event was lost (rate limit) is reported by its next packet.
            remember(key, FLOW_DENIED, 1, now);
        }
    }
    !enforce
}

/// Says why a packet was denied (debug level, off unless the agent runs with
/// `EGRESS_KERNEL_LOG`): the agent sets the level before load, so when it is off the
/// verifier removes this as dead code and the path pays nothing for it.
#[inline(always)]
fn log_denied<C: Skb>(ctx: &C, packet: Option<&Packet>, reason: u8) {
    match packet {
        Some(p) => debug!(
            ctx,
            "denied: reason {} (REASON_*), proto {}, {:i} port {} from port {}",
            reason,
            p.proto,
            p.dst,
            p.dport,
            p.sport
        ),
        None => debug!(
            ctx,
            "denied: reason {} (REASON_*), headers unreadable", reason
        ),
    }
}

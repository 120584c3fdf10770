//! The per-packet decision, shared by the cgroup and TC programs.
//!
//! Egress, in order (first match wins):
//! 1. a fresh entry in `FLOWS` (one lookup for every packet after a flow's first);
//! 2. what the network itself needs: loopback, IPv6 neighbour discovery and MLD, DHCPv6
//!    solicitations, and ICMP errors about a flow in `FLOWS`;
//! 3. `CIDRS` (longest prefix, then its port set), then `LEARNED` (DNS-learned addresses).
//!
//! Anything else is denied: dropped in enforce mode, passed and reported in audit mode.
//! An IP packet whose headers cannot be read is denied (fail closed).
use aya_ebpf::helpers::{bpf_get_socket_uid, bpf_ktime_get_boot_ns, bpf_skb_cgroup_id};
use aya_ebpf::maps::lpm_trie::Key;
use egress_common::{
    ACTION_AUDIT, ACTION_DENY, ALL_PORTS, Addr, CidrKey, Event, FLOW_ALLOWED, FLOW_AUDITED,
    FlowKey, FlowValue, MODE_ENFORCE, NO_PORT_SET, PortKey, STAT_ALLOWED_BASE, STAT_AUDITED_BASE,
    STAT_DROPPED_BASE, STAT_PROTO_OTHER, Settings, proto, stat_proto,
};

use crate::{
    dns,
    maps::{CIDRS, FLOWS, LEARNED, PORTS, SETTINGS},
    packet::{L3Start, Packet, Skb, TCP_ACK, TCP_SYN, parse, quoted_flow},
    report::{count, emit},
};

/// A flow's `last_seen_ns` is rewritten at most this often, so that busy flows do not dirty
/// a shared cache line on every packet.
const REFRESH_NS: u64 = 1_000_000_000;

/// Decides an outgoing packet: `true` lets it pass.
#[inline(always)]
pub fn egress<C: Skb>(ctx: &C, l3: L3Start) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        // Cannot happen (a one-entry array always has index 0); fail closed if it does.
        return false;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(p) = parse(ctx, l3) else {
        return deny(ctx, settings, None, now);
    };
    // The protocol slot of this packet's verdict counter (see `egress_common::STATS`).
    let slot = stat_proto(p.proto);
    // Before the flow lookup: every query must be seen, also on a socket already in FLOWS.
    if dns::query(ctx, &p) {
        count(STAT_ALLOWED_BASE + slot);
        return true;
    }
    let key = flow_key(p.dst, p.dport, p.sport, p.proto);
    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful map lookup and stays valid for
        // the program run; concurrent writers only store whole integers.
        let flow = unsafe { &mut *flow };
        let age = now.saturating_sub(flow.last_seen_ns);
        if age <= idle_timeout(settings, p.proto) {
            let pass = flow.state == FLOW_ALLOWED
                || (flow.state == FLOW_AUDITED && settings.mode != MODE_ENFORCE);
            if pass {
                if age > REFRESH_NS {
                    flow.last_seen_ns = now;
                }
                let verdict = if flow.state == FLOW_ALLOWED {
                    STAT_ALLOWED_BASE
                } else {
                    STAT_AUDITED_BASE
                };
                count(verdict + slot);
                return true;
            }
        }
    }
    // Not remembered as a flow: the flow key has no ICMP type, so an allowed neighbour
    // solicitation must not open the address to every ICMPv6 message.
    if always_allowed(ctx, &p) {
        count(STAT_ALLOWED_BASE + slot);
        return true;
    }
    if policy_allows(&p, now) {
        remember(&key, FLOW_ALLOWED, now);
        count(STAT_ALLOWED_BASE + slot);
        return true;
    }
    deny(ctx, settings, Some((&p, &key)), now)
}

/// Learns from DNS answers, and records flows that a remote end starts towards the enforced
/// side, so that the replies pass: TCP connection requests, UDP datagrams and ICMP echo
/// requests.
#[inline(always)]
pub fn ingress<C: Skb>(ctx: &C, l3: L3Start) {
    let Some(p) = parse(ctx, l3) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // Answers to this side's own queries start no flow: nothing more to do for them.
    if dns::from_dns_port(&p) {
        dns::answer(ctx, &p, now);
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
    let key = flow_key(p.src, p.sport, p.dport, p.proto);
    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: as in `egress`.
        let flow = unsafe { &mut *flow };
        if flow.state == FLOW_ALLOWED {
            if now.saturating_sub(flow.last_seen_ns) > REFRESH_NS {
                flow.last_seen_ns = now;
            }
            return;
        }
    }
    remember(&key, FLOW_ALLOWED, now);
}

#[inline(always)]
fn flow_key(remote: Addr, remote_port: u16, local_port: u16, proto: u8) -> FlowKey {
    FlowKey {
        remote,
        remote_port,
        local_port,
        proto,
        _pad: [0; 3],
    }
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
fn remember(key: &FlowKey, state: u8, now: u64) {
    let value = FlowValue {
        last_seen_ns: now,
        state,
        _pad: [0; 7],
    };
    // A full LRU map evicts the oldest flow; an insert failure only costs a re-decision.
    let _ = FLOWS.insert(key, value, 0);
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMPROB: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_MLD_QUERY: u8 = 130;
const ICMPV6_MLD_DONE: u8 = 132;
const ICMPV6_ND_FIRST: u8 = 133; // router solicitation
const ICMPV6_ND_LAST: u8 = 137; // redirect
const ICMPV6_MLD2_REPORT: u8 = 143;
const DHCPV6_SERVER_PORT: u16 = 547;
/// ff02::1:2, All_DHCP_Relay_Agents_and_Servers: link-local scope, never leaves the link.
const DHCPV6_SERVERS: Addr = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];

/// Traffic the network itself needs, whatever the policy says.
#[inline(always)]
fn always_allowed<C: Skb>(ctx: &C, p: &Packet) -> bool {
    if is_loopback(&p.dst) {
        return true;
    }
    match p.proto {
        proto::ICMPV6 => match p.icmp_type {
            ICMPV6_MLD_QUERY..=ICMPV6_MLD_DONE
            | ICMPV6_ND_FIRST..=ICMPV6_ND_LAST
            | ICMPV6_MLD2_REPORT => true,
            ICMPV6_DEST_UNREACH..=ICMPV6_PARAMPROB => quotes_known_flow(ctx, p),
            _ => false,
        },
        proto::ICMP => match p.icmp_type {
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB => {
                quotes_known_flow(ctx, p)
            }
            _ => false,
        },
        proto::UDP => p.dport == DHCPV6_SERVER_PORT && p.dst == DHCPV6_SERVERS,
        _ => false,
    }
}

/// `127.0.0.0/8` (IPv4-mapped) or `::1`.
#[inline(always)]
fn is_loopback(a: &Addr) -> bool {
    let head_zero = a[0..10].iter().all(|b| *b == 0);
    (head_zero && a[10] == 0xff && a[11] == 0xff && a[12] == 127)
        || (head_zero && a[10..15].iter().all(|b| *b == 0) && a[15] == 1)
}

/// An ICMP error passes when the packet it quotes belongs to a flow already allowed.
#[inline(always)]
fn quotes_known_flow<C: Skb>(ctx: &C, p: &Packet) -> bool {
    let Some((remote, remote_port, local_port, proto)) = quoted_flow(ctx, p) else {
        return false;
    };
    let key = flow_key(remote, remote_port, local_port, proto);
    // SAFETY: the reference is only read within this program run.
    matches!(unsafe { FLOWS.get(key) }, Some(f) if f.state == FLOW_ALLOWED)
}

/// Static CIDR rules first, then DNS-learned addresses.
#[inline(always)]
fn policy_allows(p: &Packet, now: u64) -> bool {
    let key = Key::new(128, CidrKey { addr: p.dst });
    if let Some(v) = CIDRS.get(key)
        && port_set_allows(v.port_set, p)
    {
        return true;
    }
    // SAFETY: the reference is only read within this program run.
    match unsafe { LEARNED.get(p.dst) } {
        Some(l) => {
            l.expires_ns > now
                && (port_set_allows(l.port_set, p)
                    || (l.extra_set != NO_PORT_SET && port_set_allows(l.extra_set, p)))
        }
        None => false,
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

/// Applies the mode to a packet the policy does not allow.
#[inline(always)]
fn deny<C: Skb>(
    ctx: &C,
    settings: &Settings,
    packet: Option<(&Packet, &FlowKey)>,
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
    // SAFETY: both helpers only read the skb the program was called with.
    let (cgroup_id, uid) = unsafe { (bpf_skb_cgroup_id(ctx.skb()), bpf_get_socket_uid(ctx.skb())) };
    let mut event = Event {
        cgroup_id,
        dst: [0; 16],
        dport: 0,
        proto: 0,
        action,
        uid,
    };
    if let Some((p, key)) = packet {
        (event.dst, event.dport, event.proto) = (p.dst, p.dport, p.proto);
        if !enforce {
            // One event per audited flow: later packets pass quietly while in audit mode.
            remember(key, FLOW_AUDITED, now);
        }
    }
    emit(settings, now, &event);
    !enforce
}

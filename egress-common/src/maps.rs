//! Map names, sizes and key/value types.

/// A 16-byte address in network byte order; IPv4 is IPv4-mapped (`::ffff:a.b.c.d`).
pub type Addr = [u8; 16];

/// Prefix length of `::ffff:0:0/96`, the IPv4-mapped range: an IPv4 /n prefix is /(96+n).
pub const V4_MAPPED_PREFIX: u32 = 96;

/// Builds the IPv4-mapped form of an IPv4 address given as its four network-order bytes.
pub const fn v4_mapped(octets: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// IP protocol numbers the kernel programs look at.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// `CIDRS`: `LpmTrie<CidrKey, CidrValue>`. Static CIDR rules, but for single addresses
/// (those are in `HOSTS`).
///
/// The trie returns only the longest matching prefix, so the agent stores in every prefix the
/// union of the port sets of all prefixes that contain it: one lookup gives the full answer.
pub const CIDRS: &str = "CIDRS";
/// Room for policies of two million entries, at no cost until they are used: an LPM trie
/// is never preallocated (`BPF_F_NO_PREALLOC` is mandatory for it). Each entry takes a
/// 64-byte kernel allocation, plus at most one more for an intermediate node: 128 MB for a
/// million IPv6 hosts, measured on 6.18 (`bpftool map show` counts only 44 bytes each).
pub const CIDRS_MAX_ENTRIES: u32 = 1 << 21;

/// `HOSTS`: `HashMap<Addr, CidrValue>`. The static rules for single addresses (an IPv4 /32,
/// as its IPv4-mapped /128, or an IPv6 /128), which are not in `CIDRS`: an exact-match hash
/// takes a policy's million host addresses in a fraction of the trie's insert time, and a
/// packet finds its host in one hash lookup instead of a trie walk.
///
/// A host is the longest prefix any address can match, so a hit here is what `CIDRS` would
/// have answered, and its port set is, as there, the union of the ports of every prefix
/// that contains the host; a miss falls through to `CIDRS`.
pub const HOSTS: &str = "HOSTS";
/// The size in the object (the kernel tests and benchmarks use it), and the largest the
/// agent sizes it to: as many as `CIDRS`. Created with `BPF_F_NO_PREALLOC`: entries are
/// allocated as they are inserted, but the kernel allocates the bucket array up front, 16
/// bytes a bucket (`bpftool map show` on 6.18): 32 MiB at this size, used or not. So the
/// agent sizes it at load for the policy it starts with ([`hosts_capacity`]).
pub const HOSTS_MAX_ENTRIES: u32 = CIDRS_MAX_ENTRIES;
/// The smallest size the agent gives `HOSTS`: 16 KiB of buckets.
pub const HOSTS_MIN_ENTRIES: u32 = 1 << 10;

/// The size of `HOSTS` for a policy of `hosts` single addresses: twice as many, rounded up
/// to a power of two (the kernel's bucket count), within [`HOSTS_MIN_ENTRIES`] and
/// [`HOSTS_MAX_ENTRIES`]; the room doubles as headroom for reloads. Single addresses a
/// reload brings beyond it are written to `CIDRS` as /128s, which the trie finds after a
/// `HOSTS` miss, until a restart sizes `HOSTS` for them.
pub const fn hosts_capacity(hosts: usize) -> u32 {
    let wanted = hosts.saturating_mul(2);
    if wanted <= HOSTS_MIN_ENTRIES as usize {
        HOSTS_MIN_ENTRIES
    } else if wanted >= HOSTS_MAX_ENTRIES as usize {
        HOSTS_MAX_ENTRIES
    } else {
        wanted.next_power_of_two() as u32
    }
}

/// Key data of `CIDRS`; the trie key's prefix length counts bits of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CidrKey {
    pub addr: Addr,
}

/// Value of `CIDRS`, `HOSTS` and `NAMES`: which port set applies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrValue {
    /// An id in `PORTS`, or [`ALL_PORTS`].
    pub port_set: u32,
}

/// A port set id meaning "every protocol and port": no `PORTS` lookup needed.
pub const ALL_PORTS: u32 = u32::MAX;

/// `PORTS`: `HashMap<PortKey, u8>`. Membership of (protocol, port) in a port set; value 1.
///
/// Port ranges are expanded into one entry per port by the agent. Port 0 stands for "every
/// port of this protocol" (TCP and UDP never use destination port 0), and protocols without
/// ports (ICMP, ...) are always stored with port 0.
pub const PORTS: &str = "PORTS";
pub const PORTS_MAX_ENTRIES: u32 = 262_144;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub port_set: u32,
    /// Destination port in host byte order; 0 = every port.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl PortKey {
    pub const fn new(port_set: u32, proto: u8, port: u16) -> Self {
        Self {
            port_set,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// `LEARNED`: `LruHashMap<Addr, LearnedValue>`. Addresses learned from DNS answers for
/// allowed names. Least recently used entries are evicted when full; the agent also removes
/// entries when their TTL ends, and the kernel ignores entries past `expires_ns`.
pub const LEARNED: &str = "LEARNED";
/// The size in the object, and the default of the policy's `dns.max_ips`, which sizes the
/// map at load.
pub const LEARNED_MAX_ENTRIES: u32 = 65_536;
/// The largest `dns.max_ips` the agent takes. An LRU map is preallocated: each entry costs
/// 96 bytes of kernel memory (`bpftool map show`), charged to the agent's cgroup, whether
/// used or not.
pub const LEARNED_LIMIT: u32 = 1 << 20;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnedValue {
    /// An id in `PORTS`, or [`ALL_PORTS`].
    pub port_set: u32,
    /// A second port set, or [`NO_PORT_SET`]. The kernel cannot build the union of two sets,
    /// so when it learns an address already allowed through another name it keeps both
    /// here; the agent then writes the union as `port_set`.
    pub extra_set: u32,
    /// `bpf_ktime_get_boot_ns()` after which the address is no longer allowed.
    pub expires_ns: u64,
}

/// "No port set" in [`LearnedValue::extra_set`].
pub const NO_PORT_SET: u32 = u32::MAX - 1;

impl LearnedValue {
    /// The entry the kernel writes for an address it had none for.
    #[inline(always)]
    pub fn new(port_set: u32, expires_ns: u64) -> Self {
        Self {
            port_set,
            extra_set: NO_PORT_SET,
            expires_ns,
        }
    }

    /// What the kernel makes of an address's entry at `now` when an answer teaches the
    /// address again, with `port_set` until `expires_ns`: an expired entry is replaced; in
    /// a live one, another name's set becomes the second set (replacing an earlier second
    /// one) and the later expiry stands. The one definition the kernel and the agent's
    /// models of it share.
    #[inline(always)]
    pub fn teach(&mut self, port_set: u32, expires_ns: u64, now: u64) {
        if self.expires_ns <= now {
            *self = Self::new(port_set, expires_ns);
            return;
        }
        if self.port_set != port_set && self.port_set != ALL_PORTS && self.extra_set != port_set {
            self.extra_set = port_set;
        }
        if expires_ns > self.expires_ns {
            self.expires_ns = expires_ns;
        }
    }
}

/// `FLOWS`: `LruHashMap<FlowKey, FlowValue>`. Flows already decided, so later packets take
/// one lookup, and flows started from outside (a server in the cgroup answering a client),
/// recorded by the ingress programs as [`FLOW_INBOUND`].
pub const FLOWS: &str = "FLOWS";
pub const FLOWS_MAX_ENTRIES: u32 = 262_144;

/// A flow as seen from the enforced side: the remote end and the local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub remote: Addr,
    /// Host byte order; 0 for protocols without ports.
    pub remote_port: u16,
    /// Host byte order; 0 for protocols without ports.
    pub local_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_boot_ns()` of the last packet; a flow idle for longer than the
    /// protocol's idle timeout in [`Settings`] is decided afresh.
    pub last_seen_ns: u64,
    /// For [`FLOW_INBOUND`]: the socket cookie of the local socket that received the flow's
    /// first packet, the only socket whose packets are replies (0: any socket; see
    /// [`FLOW_INBOUND`]). For [`FLOW_DENIED`]: the packets dropped. 0 in the other states.
    pub owner: u64,
    /// [`FLOW_ALLOWED`], [`FLOW_AUDITED`], [`FLOW_INBOUND`] or [`FLOW_DENIED`].
    pub state: u8,
    pub _pad: [u8; 7],
}

/// The flow was allowed by policy.
pub const FLOW_ALLOWED: u8 = 1;
/// The flow would have been dropped; it passed because the mode is audit. Its packets pass
/// without further events while the mode stays audit, and are decided afresh in enforce mode.
pub const FLOW_AUDITED: u8 = 2;
/// The flow was started from outside, over a real interface (never loopback): only replies
/// pass, that is no TCP SYN without ACK, and of ICMP only echo replies, and only from the
/// socket in `owner`. TCP flows record 0: the listener's request socket (the SYN-ACK) and
/// the accepted socket answer, not the socket that received the SYN, and only a raw socket
/// could send anything else (it may send no payload). The TC programs, which see no
/// receiving socket, record 0.
pub const FLOW_INBOUND: u8 = 3;
/// The flow was dropped (enforce mode) and its first packet reported: later packets are
/// still decided by the policy (a reload or a DNS answer may allow them), and those it
/// drops are counted in `owner` (packets dropped in all, the first one included) instead of
/// being reported again, while the flow is not idle for longer than its idle timeout.
/// Programs of releases without this state decide such an entry's packets afresh.
pub const FLOW_DENIED: u8 = 4;

/// `FRAGS`: `LruHashMap<FragKey, u8>`. IP datagrams whose first fragment was allowed: later
/// fragments carry no ports and pass only when their datagram is here (value 1). Only the
/// TC programs see fragments of local datagrams (the cgroup programs see whole ones), and
/// raw sockets can send their own.
pub const FRAGS: &str = "FRAGS";
pub const FRAGS_MAX_ENTRIES: u32 = 16_384;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub dst: Addr,
    /// The IPv4 identification or IPv6 fragment header identification, host byte order.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `SETTINGS`: `Array<Settings>` with one entry, written by the agent before attaching.
pub const SETTINGS: &str = "SETTINGS";

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// [`MODE_AUDIT`] or [`MODE_ENFORCE`].
    pub mode: u8,
    pub _pad: [u8; 3],
    /// Events each CPU may emit per second (token bucket refill rate).
    pub events_per_sec: u32,
    /// Events each CPU may emit in a burst (token bucket size).
    pub events_burst: u32,
    pub _pad2: u32,
    /// Idle time after which a TCP flow is decided afresh.
    pub tcp_idle_ns: u64,
    /// Idle time after which any other flow is decided afresh.
    pub other_idle_ns: u64,
    /// Bounds on how long a DNS-learned address stays allowed, in seconds: the answer's TTL
    /// raised to `dns_min_ttl` and cut to `dns_max_ttl`.
    pub dns_min_ttl: u32,
    pub dns_max_ttl: u32,
}

pub const MODE_AUDIT: u8 = 0;
pub const MODE_ENFORCE: u8 = 1;

/// `RESOLVERS`: `HashMap<Addr, u8>`. Trusted DNS resolvers; value 1. DNS (UDP and TCP port
/// 53) to them always passes, and only their answers teach addresses.
pub const RESOLVERS: &str = "RESOLVERS";
pub const RESOLVERS_MAX_ENTRIES: u32 = 64;

/// `NAMES`: `LpmTrie<NameKey, CidrValue>`. Allowed names and wildcard zones, with the port
/// set that addresses learned through them get.
///
/// A name is keyed by its labels in *reverse* order (`io`, `azmk8s`, `eastus`, `hcp`, ...),
/// each as a length byte and the lowercase label, so that a zone is a prefix of every name
/// inside it and one longest-prefix lookup finds the most specific rule:
/// - an exact name is its reversed labels and a terminating zero byte;
/// - a wildcard zone `*.zone` is `zone`'s reversed labels, without the zero, so it matches
///   names strictly inside the zone at any depth;
/// - each zone's apex (`zone` + zero) is stored too, so that the apex is not matched by its
///   own wildcard: with the exact rule's port set if `zone` is also listed exactly, else the
///   set of the next zone out, else [`NO_PORT_SET`] (not allowed).
///
/// Like `CIDRS`, every entry carries the union of the ports of all zones that contain it.
/// Exact bytes, not a hash: a crafted name can never collide with an allowed zone.
pub const NAMES: &str = "NAMES";
pub const NAMES_MAX_ENTRIES: u32 = 16_384;

/// Bytes of a [`NameKey`].
pub const NAME_KEY_LEN: usize = 128;
/// Labels of a name the kernel keys (its last ones): deeper names still match zones of up
/// to `NAME_MAX_LABELS - 1` labels, but cannot be listed exactly.
pub const NAME_MAX_LABELS: usize = 16;

/// Key data of `NAMES`; the trie key's prefix length counts bits of `bytes`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NameKey {
    pub bytes: [u8; NAME_KEY_LEN],
}

/// `DNS_QUERIES`: `LruHashMap<QueryKey, QueryValue>`. DNS queries seen leaving for a trusted
/// resolver from a UDP or TCP socket (never a raw one); an answer counts only when it
/// matches one (resolver, client, port, id, name) and reaches the socket that asked.
pub const DNS_QUERIES: &str = "DNS_QUERIES";
pub const DNS_QUERIES_MAX_ENTRIES: u32 = 65_536;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueryKey {
    pub resolver: Addr,
    pub client: Addr,
    /// The client's source port, host byte order.
    pub client_port: u16,
    /// The DNS message id, host byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryValue {
    /// FNV-1a over the lowercased question name in wire format.
    pub name_hash: u64,
    /// Socket cookie of the querying socket: only an answer delivered to that socket
    /// teaches (0 for a query forwarded through a TC program, which no local socket sent).
    pub cookie: u64,
}

/// DNS payload bytes the kernel reads and forwards (a power of two: indexes are masked).
pub const DNS_MAX_PAYLOAD: usize = 2048;

/// `DNS_EVENTS`: `RingBuf` of [`DnsEvent`]s: trusted answers for allowed names, after the
/// kernel has learned their addresses, for the agent's bookkeeping (expiry, CNAMEs, bounds);
/// and, while the ring is less than half full, trusted and solicited answers for names no
/// rule allows (`learned` 0), from which the agent only names addresses in its events.
/// Each record is an event cut after its message: the fields before `payload`
/// ([`DNS_EVENT_HEADER`] bytes) and `len` bytes of `payload`.
pub const DNS_EVENTS: &str = "DNS_EVENTS";
/// A record takes 8 bytes of ring header, [`DNS_EVENT_HEADER`] and the message, rounded up
/// to 8: 808 bytes for a 500-byte answer, so 2 MiB hold 2,595 answers of up to 500 bytes
/// (typical answers are 100 to 500; 4 MiB of whole events held 1,783 of any size), 891 of
/// the largest (2,048 bytes). A larger ring only absorbs longer bursts, and the agent maps
/// it twice (its RSS shows twice the size); with 8 MiB the benchmark's flood lost as many
/// answers as with 4 (BENCHMARKS.md).
///
/// Releases before this one sent whole events into a 4 MiB ring. An agent that finds a
/// pinned ring of another size replaces it, and reads what is queued in the old one once
/// the old programs are detached (the agent decodes both formats): no `LAYOUT_VERSION`
/// bump, which would forget every learned address.
pub const DNS_EVENTS_BYTES: u32 = 2 * 1024 * 1024;

/// Bytes of a [`DnsEvent`] before `payload`: the part of every `DNS_EVENTS` record that does
/// not depend on the message's length.
pub const DNS_EVENT_HEADER: usize = core::mem::offset_of!(DnsEvent, payload);

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsEvent {
    pub resolver: Addr,
    pub client: Addr,
    /// Bytes of `payload` in use.
    pub len: u16,
    /// Addresses the kernel learned from this answer: the first `learned` of `addrs`.
    pub learned: u16,
    pub _pad: u32,
    /// What the kernel wrote into `LEARNED`, so that the agent can take back every address
    /// its own parse of the answer does not justify (also when it cannot parse it at all).
    pub addrs: [Addr; DNS_MAX_LEARNED],
    /// The DNS message (for TCP, without its length prefix); a `DNS_EVENTS` record holds
    /// its first `len` bytes only.
    pub payload: [u8; DNS_MAX_PAYLOAD],
}

/// Answer records the kernel walks and may learn from, at most.
pub const DNS_MAX_LEARNED: usize = 16;

/// `EVENTS`: `RingBuf` of [`Event`]s, one per dropped or audited flow, rate limited.
pub const EVENTS: &str = "EVENTS";
pub const EVENTS_BYTES: u32 = 256 * 1024;

///
/// One event per flow, at its first denied packet: in audit mode the flow is then
/// remembered as [`FLOW_AUDITED`] and passes quietly; in enforce mode it is remembered as
/// [`FLOW_DENIED`], whose later packets (retransmits) are dropped without an event and
/// counted in the flow's entry, where the agent reads the count.
///
/// | offset | field |
/// |---|---|
/// | 0 | `cgroup_id` (u64) |
/// | 8 | `dst` (16 bytes) |
/// | 24 | `dport` (u16), `proto` (u8), `action` (u8) |
/// | 28 | `uid` (u32) |
/// | 32 | `sport` (u16), `reason` (u8), 5 bytes of padding |
///
/// Releases before this one sent the first 32 bytes only ([`EVENT_V1_LEN`]); an agent that
/// takes over their ring reads those with [`REASON_UNKNOWN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// cgroup v2 id (the inode number of the cgroup directory) of the sending socket; 0 when
    /// the packet has no socket (forwarded traffic seen by TC).
    pub cgroup_id: u64,
    pub dst: Addr,
    /// Host byte order; 0 for protocols without ports.
    pub dport: u16,
    pub proto: u8,
    /// [`ACTION_DENY`] or [`ACTION_AUDIT`].
    pub action: u8,
    /// Owner uid of the sending socket, `u32::MAX` when unknown.
    pub uid: u32,
    /// The local (source) port, host byte order; 0 for protocols without ports. With `dst`,
    /// `dport` and `proto` it is the flow's [`FlowKey`].
    pub sport: u16,
    /// Why the packet was not allowed: one of the `REASON_*` codes.
    pub reason: u8,
    pub _pad: [u8; 5],
}

/// Bytes of an [`Event`] as releases before `reason` sent it.
pub const EVENT_V1_LEN: usize = 32;

pub const ACTION_DENY: u8 = 1;
pub const ACTION_AUDIT: u8 = 2;

/// [`Event::reason`]: an event of a release that sent no reason.
pub const REASON_UNKNOWN: u8 = 0;
/// No CIDR rule covers the address, and it is not a learned address.
pub const REASON_NO_RULE: u8 = 1;
/// A CIDR rule covers the address, but not this protocol and port.
pub const REASON_PORT: u8 = 2;
/// The address was learned from a DNS answer, but its TTL has ended.
pub const REASON_LEARNED_EXPIRED: u8 = 3;
/// The address was learned for a name whose ports do not include this protocol and port.
pub const REASON_LEARNED_PORT: u8 = 4;
/// A raw socket sent a message from a trusted resolver's DNS port: a forged answer.
pub const REASON_FORGED_DNS: u8 = 5;
/// A later fragment of a datagram whose first fragment was not allowed (or not seen).
pub const REASON_FRAGMENT: u8 = 6;
/// The IP or transport header could not be read.
pub const REASON_MALFORMED: u8 = 7;
/// An ICMP error that quotes no allowed or inbound flow, goes to another address than the
/// quoted packet's source, or is longer than the kernel's own errors.
pub const REASON_ICMP_ERROR: u8 = 8;
/// Neighbour discovery or MLD out of scope: a hop limit other than the protocol's, an
/// address beyond the link, or a unicast neighbour message that carries more than its own.
pub const REASON_NEIGHBOUR: u8 = 9;
/// A packet from a link to workloads whose source address the node does not route back
/// over that link: a forged source.
pub const REASON_SPOOFED_SOURCE: u8 = 10;

/// `RATE`: `PerCpuArray<RateState>` with one entry: each CPU's event token bucket.
pub const RATE: &str = "RATE";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub tokens: u64,
    pub last_ns: u64,
}

/// `STATS`: `PerCpuArray<u64>` indexed by these constants; the agent sums the CPUs.
///
/// | index | counter |
/// |---|---|
/// | 0..=3 | packets allowed, by protocol: `STAT_ALLOWED_BASE + STAT_PROTO_*` |
/// | 4..=7 | packets dropped (enforce mode), by protocol: `STAT_DROPPED_BASE + STAT_PROTO_*` |
/// | 8..=11 | packets audited (passed, would be dropped), by protocol: `STAT_AUDITED_BASE + STAT_PROTO_*` |
/// | 12 | [`STAT_EVENTS_LOST`] |
/// | 13..=19 | the DNS counters, [`STAT_DNS_ANSWERS`] to [`STAT_DNS_EVENTS_LOST`] |
///
/// Every packet the egress programs decide is counted once, in exactly one of the verdict
/// slots; [`stat_proto`] picks the protocol slot.
pub const STATS: &str = "STATS";
/// Protocol slots of each verdict's counters, in this order.
pub const STAT_PROTO_TCP: u32 = 0;
pub const STAT_PROTO_UDP: u32 = 1;
/// ICMP and ICMPv6, every message type.
pub const STAT_PROTO_ICMP: u32 = 2;
/// Any other protocol, and packets whose IP or transport header cannot be read.
pub const STAT_PROTO_OTHER: u32 = 3;
/// Protocol slots per verdict.
pub const STAT_PROTOS: u32 = 4;
pub const STAT_ALLOWED_BASE: u32 = 0;
pub const STAT_DROPPED_BASE: u32 = STAT_ALLOWED_BASE + STAT_PROTOS;
pub const STAT_AUDITED_BASE: u32 = STAT_DROPPED_BASE + STAT_PROTOS;
/// Deny/audit events not delivered (rate limit or full `EVENTS` ring buffer).
pub const STAT_EVENTS_LOST: u32 = STAT_AUDITED_BASE + STAT_PROTOS;
/// Answers from a trusted resolver to a query seen leaving.
pub const STAT_DNS_ANSWERS: u32 = STAT_EVENTS_LOST + 1;
/// Addresses written into `LEARNED` by the kernel.
pub const STAT_DNS_LEARNED: u32 = STAT_EVENTS_LOST + 2;
/// Answers (source port 53) from an address that is not a trusted resolver.
pub const STAT_DNS_UNTRUSTED: u32 = STAT_EVENTS_LOST + 3;
/// Answers from a trusted resolver that match no query seen leaving.
pub const STAT_DNS_UNSOLICITED: u32 = STAT_EVENTS_LOST + 4;
/// Trusted, solicited answers for a name no rule allows.
pub const STAT_DNS_UNMATCHED: u32 = STAT_EVENTS_LOST + 5;
/// Answers the kernel could not parse (or that do not fit `DNS_MAX_PAYLOAD`).
pub const STAT_DNS_MALFORMED: u32 = STAT_EVENTS_LOST + 6;
/// `DNS_EVENTS` records lost because the ring buffer was full.
pub const STAT_DNS_EVENTS_LOST: u32 = STAT_EVENTS_LOST + 7;
pub const STATS_LEN: u32 = STAT_DNS_EVENTS_LOST + 1;

/// The protocol slot of a verdict counter for an IP protocol number.
#[inline(always)]
pub const fn stat_proto(ip_proto: u8) -> u32 {
    match ip_proto {
        proto::TCP => STAT_PROTO_TCP,
        proto::UDP => STAT_PROTO_UDP,
        proto::ICMP | proto::ICMPV6 => STAT_PROTO_ICMP,
        _ => STAT_PROTO_OTHER,
    }
}

/// The version of the pinned layout: the agent pins its maps and links under
/// `<pin root>/v<LAYOUT_VERSION>/`. Bump it when a map's meaning changes in a way its type,
/// key and value sizes do not show (a reordered field, a new flag value): the agent checks
/// those itself and replaces a map that differs, but it cannot see a change of meaning.
pub const LAYOUT_VERSION: u32 = 1;

/// `LEARNED_NAMES`: `HashMap<LearnedNameKey, LearnedName>`, created and read by the agent
/// only (no program uses it). Which names each learned address was learned through, and
/// when each expires (`bpf_ktime_get_boot_ns` time), so that a restarted agent takes over
/// its predecessor's bookkeeping and `egress-agent status` can show names while no agent
/// runs. Written once a second with what changed. The key is small (the name's hash), so a
/// record is deleted knowing only the address and the name; the name itself is in the
/// value.
pub const LEARNED_NAMES: &str = "LEARNED_NAMES";
/// Room for a DNS name in text form (at most 253 bytes), zero-padded.
pub const LEARNED_NAME_LEN: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LearnedNameKey {
    pub addr: Addr,
    /// FNV-1a of the name's bytes ([`name_hash`]).
    pub name_hash: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnedName {
    pub expires_ns: u64,
    /// Lowercase, without the trailing dot, zero-padded.
    pub name: [u8; LEARNED_NAME_LEN],
}

/// 64-bit FNV-1a: stable across builds, so a new agent finds its predecessor's keys.
pub const fn name_hash(name: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < name.len() {
        hash ^= name[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

impl LearnedNameKey {
    pub fn new(addr: Addr, name: &str) -> Self {
        Self {
            addr,
            name_hash: name_hash(name.as_bytes()),
        }
    }
}

impl LearnedName {
    /// `None` for a name longer than a DNS name can be.
    pub fn new(name: &str, expires_ns: u64) -> Option<Self> {
        let bytes = name.as_bytes();
        if bytes.len() >= LEARNED_NAME_LEN {
            return None;
        }
        let mut value = Self {
            expires_ns,
            name: [0; LEARNED_NAME_LEN],
        };
        value.name[..bytes.len()].copy_from_slice(bytes);
        Some(value)
    }

    /// The name, up to its first zero byte.
    pub fn name_bytes(&self) -> &[u8] {
        let len = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(LEARNED_NAME_LEN);
        &self.name[..len]
    }
}

/// `POLICY`: `Array<PolicyChunk>`, created and read by the agent only (no program uses it):
/// the policy file the maps were last filled from, so that `egress-agent status --rules`
/// and `explain` can name the policy entry each map entry comes from, also while no agent
/// runs (bpffs holds pinned objects only, no plain files). Entry 0 is a header: the
/// content's length (u64, native byte order), the file's path's length (u16, native) and
/// the path (UTF-8, cut to fit); entries 1.. hold the content, [`POLICY_CHUNK`] bytes each,
/// the last one zero-padded. The content is the file alone (an earlier release), or
/// `\0lists\n`, the file's length (u64, little-endian), the file and its list files' hashes
/// (a `sha256sum` line each), so that a reader can tell a list file changed since. Replaced
/// whole when a policy is applied: a new map is pinned beside the old one and renamed over
/// it, so that a reader sees one policy or the other, never a mix.
pub const POLICY: &str = "POLICY";
pub const POLICY_CHUNK: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyChunk {
    pub bytes: [u8; POLICY_CHUNK],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all of these are #[repr(C)], Copy, and built only of integers and byte arrays,
    // with every padding byte an explicit field.
    unsafe impl aya::Pod for CidrKey {}
    unsafe impl aya::Pod for CidrValue {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for LearnedValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for RateState {}
    unsafe impl aya::Pod for NameKey {}
    unsafe impl aya::Pod for QueryKey {}
    unsafe impl aya::Pod for QueryValue {}
    unsafe impl aya::Pod for DnsEvent {}
    unsafe impl aya::Pod for LearnedNameKey {}
    unsafe impl aya::Pod for LearnedName {}
    unsafe impl aya::Pod for PolicyChunk {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    #[test]
    fn hosts_is_sized_for_twice_the_policy_in_powers_of_two_within_its_bounds() {
        assert_eq!(hosts_capacity(0), HOSTS_MIN_ENTRIES);
        assert_eq!(hosts_capacity(512), HOSTS_MIN_ENTRIES);
        assert_eq!(hosts_capacity(513), 2048);
        assert_eq!(hosts_capacity(1_000_000), 1 << 21);
        assert_eq!(hosts_capacity(1_048_577), HOSTS_MAX_ENTRIES);
        assert_eq!(hosts_capacity(usize::MAX), HOSTS_MAX_ENTRIES);
    }

    /// The kernel hashes keys byte for byte: a size that grows implicit padding would make
    /// equal keys differ. These sizes are the layouts documented above.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<CidrKey>(), 16);
        assert_eq!(size_of::<CidrValue>(), 4);
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(size_of::<LearnedValue>(), 16);
        assert_eq!(size_of::<FlowKey>(), 24);
        assert_eq!(size_of::<FlowValue>(), 24);
        assert_eq!(size_of::<FragKey>(), 24);
        assert_eq!(size_of::<Settings>(), 40);
        assert_eq!(size_of::<NameKey>(), 128);
        assert_eq!(size_of::<QueryKey>(), 40);
        assert_eq!(
            size_of::<DnsEvent>(),
            40 + 16 * DNS_MAX_LEARNED + DNS_MAX_PAYLOAD
        );
        assert_eq!(DNS_EVENT_HEADER, 40 + 16 * DNS_MAX_LEARNED);
        assert_eq!(size_of::<Event>(), 40);
        assert_eq!(core::mem::offset_of!(Event, sport), EVENT_V1_LEN);
        assert_eq!(size_of::<LearnedNameKey>(), 24);
        assert_eq!(size_of::<LearnedName>(), 8 + LEARNED_NAME_LEN);
        assert_eq!(align_of::<Event>(), 8);
    }

    #[test]
    fn a_relearned_entry_keeps_another_name_s_set_as_its_second_and_the_later_expiry() {
        let entry = |port_set, extra_set, expires_ns| LearnedValue {
            port_set,
            extra_set,
            expires_ns,
        };
        // At time 10.
        let relearned = |mut v: LearnedValue, set, until| {
            v.teach(set, until, 10);
            v
        };
        assert_eq!(
            relearned(entry(1, NO_PORT_SET, 50), 1, 90),
            entry(1, NO_PORT_SET, 90)
        );
        assert_eq!(relearned(entry(1, NO_PORT_SET, 90), 2, 50), entry(1, 2, 90));
        assert_eq!(
            relearned(entry(1, 2, 90), 3, 50),
            entry(1, 3, 90),
            "replaced"
        );
        assert_eq!(
            relearned(entry(ALL_PORTS, NO_PORT_SET, 90), 2, 50),
            entry(ALL_PORTS, NO_PORT_SET, 90),
            "every port already"
        );
        assert_eq!(
            relearned(entry(1, 2, 10), 3, 50),
            LearnedValue::new(3, 50),
            "expired: replaced"
        );
    }

    #[test]
    fn v4_mapped_is_the_rfc4291_form() {
        let a = v4_mapped([203, 0, 113, 7]);
        assert_eq!(
            std::net::Ipv6Addr::from(a),
            std::net::Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped()
        );
    }

    /// The documented table: the verdict blocks, then the events and DNS counters, each
    /// index used once.
    #[test]
    fn stats_layout_is_the_documented_table() {
        assert_eq!(
            (STAT_ALLOWED_BASE, STAT_DROPPED_BASE, STAT_AUDITED_BASE),
            (0, 4, 8)
        );
        assert_eq!((STAT_EVENTS_LOST, STAT_DNS_ANSWERS), (12, 13));
        assert_eq!((STAT_DNS_EVENTS_LOST, STATS_LEN), (19, 20));
        let protos = [
            STAT_PROTO_TCP,
            STAT_PROTO_UDP,
            STAT_PROTO_ICMP,
            STAT_PROTO_OTHER,
        ];
        let mut seen = std::collections::BTreeSet::new();
        for base in [STAT_ALLOWED_BASE, STAT_DROPPED_BASE, STAT_AUDITED_BASE] {
            for p in protos {
                assert!(p < STAT_PROTOS);
                assert!(seen.insert(base + p));
            }
        }
        for i in STAT_EVENTS_LOST..STATS_LEN {
            assert!(seen.insert(i));
        }
        assert_eq!(seen.len(), STATS_LEN as usize);
        assert_eq!(seen.last(), Some(&(STATS_LEN - 1)));
    }

    #[test]
    fn stat_proto_folds_icmpv6_into_icmp_and_the_rest_into_other() {
        assert_eq!(stat_proto(proto::TCP), STAT_PROTO_TCP);
        assert_eq!(stat_proto(proto::UDP), STAT_PROTO_UDP);
        assert_eq!(stat_proto(proto::ICMP), STAT_PROTO_ICMP);
        assert_eq!(stat_proto(proto::ICMPV6), STAT_PROTO_ICMP);
        for other in [0u8, 2, 41, 47, 50, 132, 136, 255] {
            assert_eq!(stat_proto(other), STAT_PROTO_OTHER, "protocol {other}");
        }
    }

    #[test]
    fn learned_names_round_trip_and_refuse_what_no_dns_name_is() {
        let v = LearnedName::new("api.example.com", 7).unwrap();
        assert_eq!(v.name_bytes(), b"api.example.com");
        assert!(LearnedName::new(&"a".repeat(255), 7).is_some());
        assert!(LearnedName::new(&"a".repeat(256), 7).is_none());
        // FNV-1a's published test vectors: the hash must never change between releases.
        assert_eq!(name_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(
            LearnedNameKey::new([1; 16], "a.example.com"),
            LearnedNameKey::new([1; 16], "b.example.com")
        );
    }

    #[test]
    fn port_key_zeroes_its_padding() {
        let k = PortKey::new(7, proto::TCP, 443);
        assert_eq!(k._pad, 0);
        assert_eq!((k.port_set, k.proto, k.port), (7, 6, 443));
    }
}

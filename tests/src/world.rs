//! One DNS test's world, as `tests/dns.rs` and `tests/aks.rs` build it: the topology with
//! every address the DNS server hands out, echo servers, dnsmasq, a fresh cgroup and the
//! agent attached to it; and the checks such a test ends with.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use crate::dns::{DnsCounters, DnsServer, Lookup, Record, Resolved, resolve_connect};
use crate::{
    Agent, Flow, ProbeResult, REMOTE_V4_B, Server, TempFile, TestCgroup, Topology, assert_eperm,
    assert_ok, assert_reported_exactly, assert_timeout, probe_tcp, probe_udp, start_agent_with,
    stop_and_collect, udp, wait_for_flows,
};

/// The UDP echo port of the end marker (see [`World::finish`]), on [`REMOTE_V4_B`].
pub const MARKER_PORT: u16 = 7;

/// What a [`World`] is made of.
pub struct Setup<'a> {
    /// The policy file's text.
    pub policy: &'a str,
    /// `--mode`; `None` runs the policy's own mode, which must then be `enforce`.
    pub mode: Option<&'static str>,
    /// dnsmasq's answers (each host's address is put on the server's `lo`) and their TTL.
    pub records: &'a [Record<'a>],
    pub ttl: u32,
    /// More addresses for the server's `lo`.
    pub remotes: &'a [IpAddr],
    /// TCP echo servers on every address of the server namespace.
    pub tcp_ports: &'a [u16],
    /// UDP echo servers, each on its address (the reply must come from where the datagram
    /// went); the end marker's is always added.
    pub udp: &'a [(IpAddr, u16)],
    /// More agent arguments, and files they name, kept until the world ends.
    pub agent_args: &'a [&'a str],
    pub files: Vec<TempFile>,
}

/// One test's world. Fields drop in order: the agent detaches first.
pub struct World {
    pub agent: Agent,
    _servers: Vec<Server>,
    _dns: DnsServer,
    pub cgroup: TestCgroup,
    pub topo: Topology,
    _policy: TempFile,
    _files: Vec<TempFile>,
    audit: bool,
}

impl World {
    pub fn start(setup: Setup) -> World {
        let policy = TempFile::new(setup.policy);
        let topo = Topology::new();
        let hosts: BTreeSet<IpAddr> = (setup.records.iter())
            .filter_map(|record| match record {
                Record::Host(_, addr) | Record::HostWithTtl(_, addr, _) => Some(*addr),
                Record::Cname(..) | Record::Forward(..) => None,
            })
            .chain(setup.remotes.iter().copied())
            .collect();
        for addr in hosts {
            topo.add_remote(addr);
        }
        let any = IpAddr::from(Ipv6Addr::UNSPECIFIED);
        let marker = (IpAddr::from(REMOTE_V4_B), MARKER_PORT);
        let tcp = (setup.tcp_ports.iter()).map(|port| Server::tcp(&topo.server, None, any, *port));
        let udp = (setup.udp.iter().chain([&marker]))
            .map(|(addr, port)| Server::udp(&topo.server, None, *addr, *port));
        let servers = tcp.chain(udp).collect();
        let dns = DnsServer::start(&topo.server, setup.ttl, setup.records);
        let cgroup = TestCgroup::new();
        let agent = start_agent_with(&policy, &cgroup, setup.mode, setup.agent_args);
        World {
            agent,
            _servers: servers,
            _dns: dns,
            cgroup,
            topo,
            _policy: policy,
            _files: setup.files,
            audit: setup.mode == Some("audit"),
        }
    }

    /// `resolve-connect` from the cgroup.
    pub fn resolve(&self, lookup: Lookup, port: u16) -> Resolved {
        resolve_connect(&self.topo.client, Some(&self.cgroup), lookup, port)
    }

    /// A plain TCP connect (and echo) from the cgroup, without resolving anything.
    pub fn connect(&self, addr: impl Into<IpAddr>, port: u16) -> ProbeResult {
        probe_tcp(&self.topo.client, Some(&self.cgroup), addr, port)
    }

    /// A UDP datagram (and echo) from the cgroup.
    pub fn send(&self, addr: impl Into<IpAddr>, port: u16) -> ProbeResult {
        probe_udp(&self.topo.client, Some(&self.cgroup), addr, port)
    }

    /// Ends the test: sends a marker datagram to an address no policy allows and waits
    /// until it and every one of `expected` are reported (the ring buffer keeps order, so
    /// anything denied before the marker is in by then), stops the agent, checks that
    /// exactly these flows were reported, and returns them with the DNS counters.
    pub fn finish(&mut self, expected: &[Flow]) -> (BTreeMap<Flow, usize>, DnsCounters) {
        let marker = self.send(REMOTE_V4_B, MARKER_PORT);
        if self.audit {
            assert_ok(&marker, "the end marker");
        } else {
            assert_eperm(&marker, "the end marker");
        }
        let mut all = expected.to_vec();
        all.push(udp(REMOTE_V4_B, MARKER_PORT));
        wait_for_flows(&self.agent, &all);
        let action = if self.audit { "audit" } else { "deny" };
        let reported = stop_and_collect(&mut self.agent, action, &self.cgroup);
        assert_reported_exactly(&reported, &all);
        (reported, self.agent.dns_counters())
    }
}

/// The lookup found `addr`, and the connection to it echoed.
#[track_caller]
pub fn assert_connects(r: &Resolved, addr: impl Into<IpAddr>, what: &str) {
    assert_eq!(
        r.addr,
        Some(addr.into()),
        "{what}: resolved address ({r:?})"
    );
    assert_ok(&r.result, what);
}

/// The lookup found `addr` (DNS to the trusted resolver passes), but the connection to
/// it was dropped.
#[track_caller]
pub fn assert_resolved_but_dropped(r: &Resolved, addr: impl Into<IpAddr>, what: &str) {
    assert_eq!(
        r.addr,
        Some(addr.into()),
        "{what}: resolved address ({r:?})"
    );
    assert_timeout(&r.result, what);
}

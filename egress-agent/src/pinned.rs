//! Reading the pinned maps: what the kernel enforces, from bpffs alone, so that `status`
//! and `explain` work the same while an agent runs and while none does.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData};
use egress_common::{
    ALL_PORTS, Addr, CIDRS, CidrKey, CidrValue, HOSTS, LEARNED, LEARNED_NAMES, LearnedName,
    LearnedNameKey, LearnedValue, NAMES, NameKey, PORTS, PortKey, RESOLVERS, SETTINGS, STATS,
    Settings, V4_MAPPED_PREFIX, addr::display_addr, proto,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    classify::{CidrMatch, View},
    compile::HOST_PREFIX,
    dns::names::pattern_of,
    loader::{Stats, read_stats},
    pin::PinRoot,
    policy::{self, NamePattern, PortRange, Ports, Proto},
};

pub fn open(pins: &PinRoot, name: &str) -> anyhow::Result<MapData> {
    let path = pins.map_path(name);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

fn hash<K: aya::Pod, V: aya::Pod>(
    pins: &PinRoot,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    Ok(HashMap::try_from(Map::HashMap(open(pins, name)?))?)
}

fn trie<K: aya::Pod>(pins: &PinRoot, name: &str) -> anyhow::Result<LpmTrie<MapData, K, CidrValue>> {
    Ok(LpmTrie::try_from(Map::LpmTrie(open(pins, name)?))?)
}

/// A CIDR entry's prefix as written in a policy: IPv4-mapped keys as IPv4.
pub fn cidr_text(prefix_len: u32, network: &Addr) -> IpNet {
    match display_addr(network) {
        IpAddr::V4(v4) if prefix_len >= V4_MAPPED_PREFIX => IpNet::V4(
            Ipv4Net::new(v4, (prefix_len - V4_MAPPED_PREFIX) as u8)
                .expect("a prefix of 32 or less"),
        ),
        _ => IpNet::V6(
            Ipv6Net::new((*network).into(), prefix_len.min(128) as u8)
                .expect("a prefix of 128 or less"),
        ),
    }
}

/// The policy maps an agent filled, open for reading.
pub struct PinnedMaps {
    cidrs: LpmTrie<MapData, CidrKey, CidrValue>,
    /// `None` when a release before `HOSTS` filled the maps (its hosts are in `CIDRS`).
    hosts: Option<HashMap<MapData, Addr, CidrValue>>,
    names: LpmTrie<MapData, NameKey, CidrValue>,
    ports: HashMap<MapData, PortKey, u8>,
    learned: HashMap<MapData, Addr, LearnedValue>,
    resolvers: HashMap<MapData, Addr, u8>,
    settings: Settings,
    stats: Stats,
    learned_names: Option<HashMap<MapData, LearnedNameKey, LearnedName>>,
}

/// A `NAMES` entry: the name or zone, and its port set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    pub pattern: NamePattern,
    pub port_set: u32,
}

impl PinnedMaps {
    /// `None` when the pin root holds no maps of this agent's layout.
    pub fn open(pins: &PinRoot) -> anyhow::Result<Option<Self>> {
        if !pins.map_path(SETTINGS).exists() {
            return Ok(None);
        }
        let settings: Array<MapData, Settings> =
            Array::try_from(Map::Array(open(pins, SETTINGS)?))?;
        let learned_names = if pins.map_path(LEARNED_NAMES).exists() {
            Some(hash(pins, LEARNED_NAMES)?)
        } else {
            None
        };
        let hosts = if pins.map_path(HOSTS).exists() {
            Some(hash(pins, HOSTS)?)
        } else {
            None
        };
        Ok(Some(Self {
            cidrs: trie(pins, CIDRS)?,
            hosts,
            names: trie(pins, NAMES)?,
            ports: hash(pins, PORTS)?,
            learned: hash(pins, LEARNED)?,
            resolvers: hash(pins, RESOLVERS)?,
            settings: settings.get(&0, 0).context("reading SETTINGS")?,
            stats: read_stats(&Map::PerCpuArray(open(pins, STATS)?))?,
            learned_names,
        }))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Every `CIDRS` and `HOSTS` entry, by prefix. A host in both (a predecessor's /128
    /// in `CIDRS` while its programs are being replaced) is shown as `HOSTS` has it, the
    /// entry the programs look at first.
    pub fn cidr_entries(&self) -> anyhow::Result<Vec<CidrMatch>> {
        let mut out = Vec::new();
        for entry in self.hosts.iter().flat_map(|m| m.iter()) {
            let (addr, value) = entry.context("reading HOSTS")?;
            out.push(CidrMatch {
                prefix_len: HOST_PREFIX,
                network: addr,
                port_set: value.port_set,
            });
        }
        for key in self.cidrs.keys() {
            let key = key.context("reading CIDRS")?;
            let value = self.cidrs.get(&key, 0).context("reading CIDRS")?;
            out.push(CidrMatch {
                prefix_len: key.prefix_len(),
                network: key.data().addr,
                port_set: value.port_set,
            });
        }
        // Stable: of two equal prefixes the `HOSTS` one, pushed first, stays.
        out.sort_by_key(|m| (m.network, m.prefix_len));
        out.dedup_by_key(|m| (m.network, m.prefix_len));
        Ok(out)
    }

    /// Every `NAMES` entry that allows something (a zone's apex stored only so that the
    /// zone's wildcard does not match it is left out), by name.
    pub fn name_entries(&self) -> anyhow::Result<Vec<NameEntry>> {
        let mut out = Vec::new();
        for key in self.names.keys() {
            let key = key.context("reading NAMES")?;
            let value = self.names.get(&key, 0).context("reading NAMES")?;
            if let Some(pattern) = pattern_of(&key.data(), key.prefix_len())
                && value.port_set != egress_common::NO_PORT_SET
            {
                out.push(NameEntry {
                    pattern,
                    port_set: value.port_set,
                });
            }
        }
        out.sort_by_key(|e| e.pattern.to_string());
        Ok(out)
    }

    /// The ports of every set in `PORTS`.
    pub fn port_sets(&self) -> anyhow::Result<BTreeMap<u32, Ports>> {
        let mut members: BTreeMap<u32, Vec<PortKey>> = BTreeMap::new();
        for key in self.ports.keys() {
            let key = key.context("reading PORTS")?;
            members.entry(key.port_set).or_default().push(key);
        }
        Ok(members
            .into_iter()
            .map(|(set, keys)| (set, ports_of(&keys)))
            .collect())
    }

    pub fn resolvers(&self) -> anyhow::Result<Vec<IpAddr>> {
        let set: BTreeSet<Addr> = self
            .resolvers
            .keys()
            .collect::<Result<_, _>>()
            .context("reading RESOLVERS")?;
        Ok(set.iter().map(display_addr).collect())
    }

    /// The learned addresses still live at `now`, by address.
    pub fn live_learned(&self, now: u64) -> Vec<(Addr, LearnedValue)> {
        let mut live: Vec<(Addr, LearnedValue)> = self
            .learned
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns > now)
            .collect();
        live.sort_by_key(|(a, _)| *a);
        live
    }

    /// The names each learned address was learned through, with their expiry, by name.
    pub fn learned_names(&self) -> BTreeMap<Addr, Vec<(String, u64)>> {
        let mut names: BTreeMap<Addr, Vec<(String, u64)>> = BTreeMap::new();
        for (key, value) in self.learned_names.iter().flat_map(|m| m.iter().flatten()) {
            names.entry(key.addr).or_default().push((
                String::from_utf8_lossy(value.name_bytes()).into_owned(),
                value.expires_ns,
            ));
        }
        for list in names.values_mut() {
            list.sort();
        }
        names
    }
}

impl View for PinnedMaps {
    fn cidr(&self, addr: &Addr) -> anyhow::Result<Option<CidrMatch>> {
        if let Some(hosts) = &self.hosts {
            match hosts.get(addr, 0) {
                Ok(v) => {
                    return Ok(Some(CidrMatch {
                        prefix_len: HOST_PREFIX,
                        network: *addr,
                        port_set: v.port_set,
                    }));
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("reading HOSTS"),
            }
        }
        // The trie answers with the value only: the longest matching key is found by walking
        // them (a command, not a packet).
        Ok(self
            .cidr_entries()?
            .into_iter()
            .filter(|m| {
                let bits = u128::from_be_bytes(*addr);
                let net = u128::from_be_bytes(m.network);
                m.prefix_len == 0 || (bits ^ net) >> (128 - m.prefix_len) == 0
            })
            .max_by_key(|m| m.prefix_len))
    }

    fn has_port(&self, set: u32, proto: u8, port: u16) -> anyhow::Result<bool> {
        match self.ports.get(&PortKey::new(set, proto, port), 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).context("reading PORTS"),
        }
    }

    fn learned(&self, addr: &Addr) -> anyhow::Result<Option<LearnedValue>> {
        match self.learned.get(addr, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading LEARNED"),
        }
    }

    fn is_resolver(&self, addr: &Addr) -> anyhow::Result<bool> {
        match self.resolvers.get(addr, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).context("reading RESOLVERS"),
        }
    }
}

/// A port set's `PORTS` keys as the policy writes ports (port 0: every port).
pub fn ports_of(keys: &[PortKey]) -> Ports {
    let ranges = keys
        .iter()
        .filter_map(|k| {
            let proto = match k.proto {
                proto::TCP => Proto::Tcp,
                proto::UDP => Proto::Udp,
                proto::ICMP => Proto::Icmp,
                _ => return None,
            };
            Some(match (proto, k.port) {
                (Proto::Icmp, _) => PortRange {
                    proto,
                    first: 0,
                    last: 0,
                },
                (_, 0) => PortRange {
                    proto,
                    first: 1,
                    last: u16::MAX,
                },
                (_, port) => PortRange {
                    proto,
                    first: port,
                    last: port,
                },
            })
        })
        .collect();
    Ports::Some(policy::merge(ranges))
}

/// The ports of set `id` in `sets` ([`ALL_PORTS`] is every port).
pub fn set_ports(sets: &BTreeMap<u32, Ports>, id: u32) -> Ports {
    if id == ALL_PORTS {
        return Ports::All;
    }
    sets.get(&id)
        .cloned()
        .unwrap_or_else(|| Ports::Some(Vec::new()))
}

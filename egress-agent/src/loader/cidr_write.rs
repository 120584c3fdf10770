//! Filling `CIDRS` and `HOSTS` with a compiled policy: every new entry first, then the
//! previous entries the policy lacks are deleted, found by a merge of two sorted lists.
//!
//! Entries go in by `BPF_MAP_UPDATE_BATCH` where the kernel takes it (see [`batch`]), else
//! one `BPF_MAP_UPDATE_ELEM` each. `CIDRS` by one thread: a second one, on a second fd,
//! gained nothing (a million entries in 2.9 s either way, measured on 6.18), as the inserts
//! run under the trie's lock. `HOSTS` by two, which halve its write where a second CPU is
//! free (BENCHMARKS.md). The keys written are kept as sorted vectors, 20 bytes a trie entry
//! and 16 a host, not hash sets (about 44).
//!
//! Releases before `HOSTS` kept single addresses in `CIDRS` as /128s, which their programs,
//! still attached while a new agent takes over, look for there. Such an entry whose host
//! the new policy has is rewritten in place with the new port set, and deleted only once
//! those programs are detached ([`Entries::drop_trie_hosts`]).
//!
//! `HOSTS` is sized at load for the policy the agent starts with
//! (`egress_common::hosts_capacity`). Single addresses beyond its size, which only a reload
//! can bring, go to `CIDRS` as /128s: the trie finds them after a `HOSTS` miss, at a trie
//! walk's cost, until a restart sizes `HOSTS` for them.

use std::{borrow::Cow, os::fd::AsFd as _};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, lpm_trie::Key};
use aya::sys::SyscallError;
use egress_common::{Addr, CidrKey, CidrValue};

use super::{LoadError, map_err, maps::remove_if_present};
use crate::compile::{CidrEntry, Compiled, HOST_PREFIX};

/// The `CIDRS` keys written, as (prefix length, address), sorted.
pub(super) type Keys = Vec<(u32, Addr)>;

/// What `CIDRS` and `HOSTS` hold, as written by this agent or read from its predecessor's.
#[derive(Default)]
pub(super) struct Entries {
    pub(super) cidrs: Keys,
    /// The `HOSTS` keys, sorted.
    pub(super) hosts: Vec<Addr>,
}

fn trie_data(map: &Map) -> Result<&MapData, LoadError> {
    match map {
        Map::LpmTrie(data) => Ok(data),
        _ => Err(LoadError::MissingMap(super::CIDRS)),
    }
}

fn hosts_data(map: &Map) -> Result<&MapData, LoadError> {
    match map {
        Map::HashMap(data) => Ok(data),
        _ => Err(LoadError::MissingMap(super::HOSTS)),
    }
}

mod batch;

/// A handle on its own fd.
fn own_fd(map: &MapData, name: &str) -> Result<MapData, LoadError> {
    let fd = map.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        map_err(format!("duplicating the {name} fd"))(MapError::SyscallError(SyscallError {
            call: "fcntl(F_DUPFD_CLOEXEC)",
            io_error,
        }))
    })?;
    MapData::from_fd(fd).map_err(map_err(format!("opening {name}")))
}

/// A trie handle on its own fd.
fn trie(map: &MapData) -> Result<LpmTrie<MapData, CidrKey, CidrValue>, LoadError> {
    LpmTrie::try_from(Map::LpmTrie(own_fd(map, super::CIDRS)?)).map_err(map_err(super::CIDRS))
}

/// A `HOSTS` handle on its own fd.
fn hosts(map: &MapData) -> Result<HashMap<MapData, Addr, CidrValue>, LoadError> {
    HashMap::try_from(Map::HashMap(own_fd(map, super::HOSTS)?)).map_err(map_err(super::HOSTS))
}

/// Writes `entries` into `map` by batch, and `Ok(false)` when the kernel has no batch
/// update for it (nothing was written then).
fn write_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    name: &str,
    entries: &[CidrEntry],
    kv: impl Fn(&CidrEntry) -> (K, V),
) -> Result<bool, LoadError> {
    match batch::write(map.fd().as_fd(), entries, kv) {
        Ok(()) => Ok(true),
        Err(batch::Refused::Failed(io_error)) => Err(map_err(format!("writing {name}"))(
            MapError::SyscallError(SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            }),
        )),
        Err(batch::Refused::Unsupported) => {
            log::debug!("{name}: this kernel has no batch update for it; writing entry by entry");
            Ok(false)
        }
    }
}

fn value(e: &CidrEntry) -> CidrValue {
    CidrValue {
        port_set: e.port_set,
    }
}

/// Writes `entries` into `CIDRS`.
fn write_trie(map: &MapData, entries: &[CidrEntry]) -> Result<(), LoadError> {
    if write_batch(map, super::CIDRS, entries, |e| {
        (Key::new(e.prefix_len, e.key), value(e))
    })? {
        return Ok(());
    }
    let mut trie = trie(map)?;
    for e in entries {
        trie.insert(&Key::new(e.prefix_len, e.key), value(e), 0)
            .map_err(map_err("writing CIDRS"))?;
    }
    Ok(())
}

/// Writes `entries` into `HOSTS`, by two threads: a hash insert locks only its bucket.
fn write_hosts(map: &MapData, entries: &[CidrEntry]) -> Result<(), LoadError> {
    let part = entries.len().div_ceil(2).max(1);
    let batched = std::thread::scope(|scope| {
        let writers: Vec<_> = entries
            .chunks(part)
            .map(|part| {
                scope
                    .spawn(move || write_batch(map, super::HOSTS, part, |e| (e.key.addr, value(e))))
            })
            .collect();
        writers
            .into_iter()
            .map(|w| w.join().expect("a HOSTS writer panicked"))
            .collect::<Result<Vec<bool>, _>>()
    })?;
    if batched.iter().all(|b| *b) {
        return Ok(());
    }
    let mut hosts = hosts(map)?;
    for e in entries {
        hosts
            .insert(e.key.addr, value(e), 0)
            .map_err(map_err("writing HOSTS"))?;
    }
    Ok(())
}

impl Entries {
    /// Writes `compiled`'s CIDR entries into `cidrs` (`CIDRS`) and `hosts` (`HOSTS`), then
    /// deletes the keys written before that are not among them: a destination both allow
    /// stays allowed throughout.
    pub(super) fn replace(
        &mut self,
        cidrs: &Map,
        hosts: &Map,
        compiled: &Compiled,
    ) -> Result<(), LoadError> {
        let (cidrs, hosts) = (trie_data(cidrs)?, hosts_data(hosts)?);
        let started = std::time::Instant::now();
        let room = hosts
            .info()
            .map_err(map_err("reading HOSTS' size"))?
            .max_entries() as usize;
        let (fit, beyond) = self.place_hosts(&compiled.hosts, room);
        let (fit, beyond) = (fit.as_ref(), beyond.as_slice());
        if !beyond.is_empty() {
            log::warn!(
                "{} single addresses do not fit HOSTS, sized for {room} at start: they are in \
                 CIDRS, where a packet finds them at a trie walk's cost; a restart sizes HOSTS \
                 for them",
                beyond.len()
            );
        }
        // A predecessor's /128s, or those beyond HOSTS' room before, for hosts the policy
        // keeps (see the module's doc).
        let in_trie: Vec<CidrEntry> = fit
            .iter()
            .filter(|e| self.cidrs.binary_search(&(HOST_PREFIX, e.key.addr)).is_ok())
            .chain(beyond)
            .copied()
            .collect();
        write_trie(cidrs, &compiled.cidrs)?;
        write_trie(cidrs, &in_trie)?;
        write_hosts(hosts, fit)?;
        log::debug!(
            "CIDRS and HOSTS: {} and {} entries written in {:?}",
            compiled.cidrs.len() + in_trie.len(),
            fit.len(),
            started.elapsed()
        );
        let mut now: Keys = compiled
            .cidrs
            .iter()
            .chain(&in_trie)
            .map(|e| (e.prefix_len, e.key.addr))
            .collect();
        now.sort_unstable();
        now.dedup();
        let mut trie = trie(cidrs)?;
        for key in stale(&self.cidrs, &now) {
            remove_if_present(trie.remove(&Key::new(key.0, CidrKey { addr: key.1 })))
                .map_err(map_err("deleting from CIDRS"))?;
        }
        self.cidrs = now;
        let mut now: Vec<Addr> = fit.iter().map(|e| e.key.addr).collect();
        now.sort_unstable();
        now.dedup();
        let mut map = self::hosts(hosts)?;
        for addr in stale(&self.hosts, &now) {
            remove_if_present(map.remove(addr)).map_err(map_err("deleting from HOSTS"))?;
        }
        self.hosts = now;
        Ok(())
    }

    /// Which of `hosts` go to `HOSTS`, of `room` entries, and which beyond it to `CIDRS`.
    /// New entries go in before stale ones are deleted, so the hosts it holds keep their
    /// place and new ones take what the old ones leave.
    fn place_hosts<'a>(
        &self,
        hosts: &'a [CidrEntry],
        room: usize,
    ) -> (Cow<'a, [CidrEntry]>, Vec<CidrEntry>) {
        if self.hosts.len() + hosts.len() <= room {
            return (Cow::Borrowed(hosts), Vec::new());
        }
        let mut free = room.saturating_sub(self.hosts.len());
        let (mut fit, mut beyond) = (Vec::new(), Vec::new());
        for e in hosts {
            if self.hosts.binary_search(&e.key.addr).is_ok() {
                fit.push(*e);
            } else if free > 0 {
                free -= 1;
                fit.push(*e);
            } else {
                beyond.push(*e);
            }
        }
        (Cow::Owned(fit), beyond)
    }

    /// Deletes the /128s a predecessor left in `CIDRS` (see the module's doc) whose hosts
    /// `HOSTS` holds now, once its programs are detached. Those beyond `HOSTS`' room stay.
    pub(super) fn drop_trie_hosts(&mut self, cidrs: &Map) -> Result<(), LoadError> {
        let first = self.cidrs.partition_point(|k| k.0 < HOST_PREFIX);
        let (doubled, kept): (Keys, Keys) = self.cidrs[first..]
            .iter()
            .partition(|(_, addr)| self.hosts.binary_search(addr).is_ok());
        if doubled.is_empty() {
            return Ok(());
        }
        let mut trie = trie(trie_data(cidrs)?)?;
        for (len, addr) in doubled {
            remove_if_present(trie.remove(&Key::new(len, CidrKey { addr })))
                .map_err(map_err("deleting from CIDRS"))?;
        }
        self.cidrs.truncate(first);
        self.cidrs.extend(kept);
        Ok(())
    }

    /// Reads what `CIDRS` and `HOSTS` hold (a previous agent's policy, when adopting).
    pub(super) fn read(cidrs: &Map, hosts: &Map) -> Result<Self, LoadError> {
        let mut keys = trie(trie_data(cidrs)?)?
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data().addr)))
            .collect::<Result<Keys, _>>()
            .map_err(map_err("reading CIDRS"))?;
        keys.sort_unstable();
        let mut addrs = self::hosts(hosts_data(hosts)?)?
            .keys()
            .collect::<Result<Vec<Addr>, _>>()
            .map_err(map_err("reading HOSTS"))?;
        addrs.sort_unstable();
        Ok(Self {
            cidrs: keys,
            hosts: addrs,
        })
    }

    /// Entries in both maps.
    pub(super) fn len(&self) -> usize {
        self.cidrs.len() + self.hosts.len()
    }
}

/// The keys of `previous` not in `now`, both sorted.
fn stale<'a, K: Ord>(previous: &'a [K], now: &'a [K]) -> impl Iterator<Item = &'a K> {
    let mut rest = now;
    previous.iter().filter(move |key| {
        let skip = rest.partition_point(|k| k < *key);
        rest = &rest[skip..];
        rest.first() != Some(*key)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_are_those_only_the_previous_list_has() {
        let key = |len: u32, last: u8| {
            let mut addr = [0; 16];
            addr[15] = last;
            (len, addr)
        };
        let previous = vec![key(120, 0), key(128, 1), key(128, 2), key(128, 9)];
        let now = vec![key(120, 0), key(128, 2), key(128, 3)];
        let gone: Vec<_> = stale(&previous, &now).copied().collect();
        assert_eq!(gone, vec![key(128, 1), key(128, 9)]);
        assert_eq!(stale(&previous, &previous).count(), 0);
        assert_eq!(stale(&Vec::new(), &now).count(), 0);
    }
}

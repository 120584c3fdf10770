//! Filling `CIDRS` with a compiled policy: every new entry first, then the previous entries
//! the policy lacks are deleted, found by a merge of two sorted lists.
//!
//! Entries go in by `BPF_MAP_UPDATE_BATCH` where the kernel takes it (see [`batch`]), else
//! one `BPF_MAP_UPDATE_ELEM` each. One thread: a second one, on a second fd, gained nothing
//! (a million entries in 2.9 s either way, measured on 6.18), as the inserts run under the
//! trie's lock. The keys written are kept as a sorted vector, 20 bytes an entry, not a hash
//! set (about 44).

use std::os::fd::AsFd as _;

use aya::maps::{LpmTrie, Map, MapData, MapError, lpm_trie::Key};
use aya::sys::SyscallError;
use egress_common::{Addr, CidrKey, CidrValue};

use super::{LoadError, map_err, maps::remove_if_present};
use crate::compile::CidrEntry;

/// The `CIDRS` keys written, as (prefix length, address), sorted.
pub(super) type Keys = Vec<(u32, Addr)>;

/// `CIDRS` as the object holds it.
fn data(map: &Map) -> Result<&MapData, LoadError> {
    match map {
        Map::LpmTrie(data) => Ok(data),
        _ => Err(LoadError::MissingMap(super::CIDRS)),
    }
}

mod batch;

/// A handle on its own fd.
fn own_fd(map: &MapData) -> Result<MapData, LoadError> {
    let fd = map.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        map_err("duplicating the CIDRS fd")(MapError::SyscallError(SyscallError {
            call: "fcntl(F_DUPFD_CLOEXEC)",
            io_error,
        }))
    })?;
    MapData::from_fd(fd).map_err(map_err("opening CIDRS"))
}

/// A trie handle on its own fd.
fn handle(map: &MapData) -> Result<LpmTrie<MapData, CidrKey, CidrValue>, LoadError> {
    LpmTrie::try_from(Map::LpmTrie(own_fd(map)?)).map_err(map_err("CIDRS"))
}

/// Writes `entries` through `map`, a handle of its own.
fn write(map: MapData, entries: &[CidrEntry]) -> Result<(), LoadError> {
    match batch::write(map.fd().as_fd(), entries) {
        Ok(()) => return Ok(()),
        Err(batch::Refused::Failed(io_error)) => {
            return Err(map_err("writing CIDRS")(MapError::SyscallError(
                SyscallError {
                    call: "bpf_map_update_batch",
                    io_error,
                },
            )));
        }
        Err(batch::Refused::Unsupported) => {
            log::debug!("CIDRS: this kernel has no batch update for it; writing entry by entry");
        }
    }
    let mut trie: LpmTrie<MapData, CidrKey, CidrValue> =
        LpmTrie::try_from(Map::LpmTrie(map)).map_err(map_err("CIDRS"))?;
    for e in entries {
        let value = CidrValue {
            port_set: e.port_set,
        };
        trie.insert(&Key::new(e.prefix_len, e.key), value, 0)
            .map_err(map_err("writing CIDRS"))?;
    }
    Ok(())
}

/// Writes `entries` into `map` (`CIDRS`), then deletes the keys of `previous` that are not
/// among them: a destination both allow stays allowed throughout. Returns the keys written.
pub(super) fn replace(
    map: &Map,
    entries: &[CidrEntry],
    previous: &Keys,
) -> Result<Keys, LoadError> {
    let map = data(map)?;
    let started = std::time::Instant::now();
    write(own_fd(map)?, entries)?;
    log::debug!(
        "CIDRS: {} entries written in {:?}",
        entries.len(),
        started.elapsed()
    );
    let mut now: Keys = entries.iter().map(|e| (e.prefix_len, e.key.addr)).collect();
    now.sort_unstable();
    now.dedup();
    let mut trie = handle(map)?;
    for key in stale(previous, &now) {
        remove_if_present(trie.remove(&Key::new(key.0, CidrKey { addr: key.1 })))
            .map_err(map_err("deleting from CIDRS"))?;
    }
    Ok(now)
}

/// The keys of `previous` not in `now`, both sorted.
fn stale<'a>(previous: &'a Keys, now: &'a Keys) -> impl Iterator<Item = &'a (u32, Addr)> {
    let mut rest = now.as_slice();
    previous.iter().filter(move |key| {
        let skip = rest.partition_point(|k| k < key);
        rest = &rest[skip..];
        rest.first() != Some(key)
    })
}

/// The keys `CIDRS` holds (a previous agent's policy, when adopting), sorted.
pub(super) fn read(map: &Map) -> Result<Keys, LoadError> {
    let trie = handle(data(map)?)?;
    let mut keys = trie
        .keys()
        .map(|k| k.map(|k| (k.prefix_len(), k.data().addr)))
        .collect::<Result<Keys, _>>()
        .map_err(map_err("reading CIDRS"))?;
    keys.sort_unstable();
    Ok(keys)
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

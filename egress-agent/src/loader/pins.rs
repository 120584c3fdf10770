//! The pin root's maps: which pinned maps fit this agent (the layout check), carrying
//! state over into replacements, `LEARNED_NAMES`, and handing the pins on or removing them.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData, MapInfo, MapType},
};
use egress_common::{FLOWS, FlowKey, FlowValue, LEARNED_NAMES, LearnedName, LearnedNameKey};

use super::{Enforcer, LoadError, NO_PREALLOC, map_err};
use crate::pin::{self, PinRoot};

/// Why a pinned map cannot serve this agent's programs, if it cannot.
pub(super) fn layout_difference(
    pinned: &MapInfo,
    def: &aya_obj::Map,
    max_entries: u32,
) -> Result<Option<String>, LoadError> {
    let wanted = aya_obj::generated::bpf_map_type::try_from(def.map_type())
        .ok()
        .and_then(|t| MapType::try_from(t).ok());
    let have = pinned
        .map_type()
        .map_err(map_err("reading a pinned map's type"))?;
    Ok(if wanted != Some(have) {
        Some(format!("type {have:?}, wanted {wanted:?}"))
    } else if (pinned.key_size(), pinned.value_size()) != (def.key_size(), def.value_size()) {
        Some(format!(
            "key/value {}/{} bytes, wanted {}/{}",
            pinned.key_size(),
            pinned.value_size(),
            def.key_size(),
            def.value_size()
        ))
    } else if pinned.max_entries() != max_entries {
        Some(format!(
            "{} entries, wanted {max_entries}",
            pinned.max_entries()
        ))
    } else if pinned.map_flags() != def.map_flags() {
        Some(format!(
            "flags {:#x}, wanted {:#x}",
            pinned.map_flags(),
            def.map_flags()
        ))
    } else {
        None
    })
}

/// Copies the entries of a replaced state map into its successor; an LRU successor that is
/// smaller keeps the most recently copied.
pub(super) fn carry_over<K: Pod, V: Pod>(
    from: MapData,
    to: &mut Map,
    name: &'static str,
) -> Result<usize, LoadError> {
    let info = from.info().map_err(map_err(name))?;
    if (info.key_size(), info.value_size()) != (size_of::<K>() as u32, size_of::<V>() as u32) {
        // Entries of another layout mean something else: start the replacement empty.
        log::warn!("{name}: pinned entries have another layout; not carried over");
        return Ok(0);
    }
    let old: HashMap<MapData, K, V> =
        HashMap::try_from(Map::HashMap(from)).map_err(map_err(name))?;
    let mut new: HashMap<&mut MapData, K, V> = HashMap::try_from(to).map_err(map_err(name))?;
    let mut copied = 0;
    for entry in old.iter() {
        let Ok((k, v)) = entry else { continue };
        new.insert(k, v, 0)
            .map_err(map_err(format!("carrying {name} over")))?;
        copied += 1;
    }
    Ok(copied)
}

/// `FLOWS` values before they had an owner: last seen (8 bytes), state, padding.
type FlowValueV0 = [u8; 16];

/// Carries `FLOWS` over, from this release's layout or from the one before owners (see
/// `FlowValueV0`): those flows keep their state with owner 0, any socket, as they had.
pub(super) fn carry_over_flows(from: MapData, to: &mut Map) -> Result<usize, LoadError> {
    let info = from.info().map_err(map_err(FLOWS))?;
    if info.value_size() as usize != size_of::<FlowValueV0>() {
        return carry_over::<FlowKey, FlowValue>(from, to, FLOWS);
    }
    let old: HashMap<MapData, FlowKey, FlowValueV0> =
        HashMap::try_from(Map::LruHashMap(from)).map_err(map_err(FLOWS))?;
    let mut new: HashMap<&mut MapData, FlowKey, FlowValue> =
        HashMap::try_from(to).map_err(map_err(FLOWS))?;
    let mut copied = 0;
    for entry in old.iter() {
        let Ok((key, v)) = entry else { continue };
        let mut last_seen = [0; 8];
        last_seen.copy_from_slice(&v[..8]);
        let value = FlowValue {
            last_seen_ns: u64::from_ne_bytes(last_seen),
            owner: 0,
            state: v[8],
            _pad: [0; 7],
        };
        new.insert(key, value, 0)
            .map_err(map_err("carrying FLOWS over"))?;
        copied += 1;
    }
    Ok(copied)
}

/// `LEARNED_NAMES`, pinned: the one a previous agent left if it has the size this one needs,
/// else a new one holding the old one's entries. Two records per learned address on average
/// (an address is usually learned through one or two names); entries are allocated as
/// written, so the size costs nothing until used.
pub(super) fn learned_names_map(
    pins: &PinRoot,
    max_learned: u32,
) -> Result<HashMap<MapData, LearnedNameKey, LearnedName>, LoadError> {
    let path = pins.map_path(LEARNED_NAMES);
    let max_entries = max_learned.saturating_mul(2);
    let old = match MapData::from_pin(&path) {
        Ok(data) => {
            let info = data.info().map_err(map_err("reading LEARNED_NAMES"))?;
            let fits = (info.key_size(), info.value_size(), info.max_entries())
                == (
                    size_of::<LearnedNameKey>() as u32,
                    size_of::<LearnedName>() as u32,
                    max_entries,
                );
            if fits {
                return HashMap::try_from(Map::HashMap(data)).map_err(map_err(LEARNED_NAMES));
            }
            Some(data)
        }
        Err(_) => None,
    };
    let mut new: HashMap<MapData, LearnedNameKey, LearnedName> =
        HashMap::create(max_entries, NO_PREALLOC).map_err(map_err("creating LEARNED_NAMES"))?;
    if let Some(old) = old {
        if let Ok(old) =
            HashMap::<MapData, LearnedNameKey, LearnedName>::try_from(Map::HashMap(old))
        {
            for (k, v) in old.iter().flatten() {
                new.insert(k, v, 0)
                    .map_err(map_err("carrying LEARNED_NAMES over"))?;
            }
        }
        pin::remove_file(&path)?;
    }
    new.pin(&path).map_err(|source| LoadError::Pin {
        what: path.display().to_string(),
        source,
    })?;
    let data = MapData::from_pin(&path).map_err(map_err("opening LEARNED_NAMES"))?;
    HashMap::try_from(Map::HashMap(data)).map_err(map_err(LEARNED_NAMES))
}

impl Enforcer {
    /// Once this enforcer's links are attached: removes every other link pin (detaching the
    /// predecessor's programs), other layout versions, and puts this enforcer's replacement
    /// maps where the old pins were. Returns the links and the version directories removed.
    pub fn retire_predecessors(&mut self) -> Result<(Vec<pin::LinkPin>, Vec<PathBuf>), LoadError> {
        let Some(pinned) = &mut self.pinned else {
            return Ok(Default::default());
        };
        let ours: HashSet<&Path> = pinned.links.iter().map(|(p, _)| p.as_path()).collect();
        let mut retired = Vec::new();
        for link in pinned.root.links()? {
            if !ours.contains(link.path.as_path()) {
                pin::remove_file(&link.path)?;
                retired.push(link);
            }
        }
        let versions = pinned.root.remove_other_versions()?;
        for name in std::mem::take(&mut pinned.replaced) {
            let path = pinned.root.map_path(name);
            pin::remove_file(&path)?;
            let pinning = |source| LoadError::Pin {
                what: path.display().to_string(),
                source,
            };
            match pinned.taken.iter().find(|(n, _)| *n == name) {
                Some((_, taken)) => taken.pin(&path).map_err(pinning)?,
                None => {
                    let map = self.ebpf.map(name).ok_or(LoadError::MissingMap(name))?;
                    map.pin(&path).map_err(pinning)?;
                }
            }
        }
        pinned.taken.clear();
        Ok((retired, versions))
    }

    /// Ends this enforcer. `keep` leaves every pin (and so every attachment) in place for the
    /// next agent; otherwise the links are unpinned, which detaches the programs, and the pin
    /// root is removed.
    pub fn release(mut self, keep: bool) -> Result<(), LoadError> {
        let Some(pinned) = self.pinned.take() else {
            return Ok(());
        };
        if keep {
            return Ok(());
        }
        for (path, link) in pinned.links {
            link.unpin()
                .map_err(|error| LoadError::PinRoot(pin::PinError::Io { path, error }))?;
        }
        pinned.root.remove_all().complete()?;
        Ok(())
    }
}

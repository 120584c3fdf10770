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
use egress_common::{CIDRS, FLOWS, FlowKey, FlowValue, LEARNED_NAMES, LearnedName, LearnedNameKey};

use super::{Enforcer, LoadError, NO_PREALLOC, map_err};
use crate::pin::{self, PinRoot};

/// Why a pinned map cannot serve this agent's programs, if it cannot.
pub(super) fn layout_difference(
    pinned: &MapInfo,
    def: &aya_obj::Map,
    max_entries: u32,
) -> Result<Option<String>, LoadError> {
    let wanted = map_type(def);
    let have = pinned
        .map_type()
        .map_err(map_err("reading a pinned map's type"))?;
    Ok(difference(
        (have, wanted),
        Layout {
            key_size: pinned.key_size(),
            value_size: pinned.value_size(),
            max_entries: pinned.max_entries(),
            flags: pinned.map_flags(),
        },
        Layout {
            key_size: def.key_size(),
            value_size: def.value_size(),
            max_entries,
            flags: def.map_flags(),
        },
    ))
}

/// The type of a map of the object; `None` for a type aya does not know.
fn map_type(def: &aya_obj::Map) -> Option<MapType> {
    aya_obj::generated::bpf_map_type::try_from(def.map_type())
        .ok()
        .and_then(|t| MapType::try_from(t).ok())
}

/// What besides its type a pinned map must share with the object's definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

/// The first way `have` (a pinned map of type `types.0`) differs from what is wanted (of
/// type `types.1`, `None` for a type aya does not know), if any.
fn difference(
    (have_type, wanted_type): (MapType, Option<MapType>),
    have: Layout,
    wanted: Layout,
) -> Option<String> {
    if wanted_type != Some(have_type) {
        Some(format!("type {have_type:?}, wanted {wanted_type:?}"))
    } else if (have.key_size, have.value_size) != (wanted.key_size, wanted.value_size) {
        Some(format!(
            "key/value {}/{} bytes, wanted {}/{}",
            have.key_size, have.value_size, wanted.key_size, wanted.value_size
        ))
    } else if have.max_entries != wanted.max_entries {
        Some(format!(
            "{} entries, wanted {}",
            have.max_entries, wanted.max_entries
        ))
    } else if have.flags != wanted.flags {
        Some(format!(
            "flags {:#x}, wanted {:#x}",
            have.flags, wanted.flags
        ))
    } else {
        None
    }
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
    /// predecessor's programs), other layout versions, the single addresses a release before
    /// `HOSTS` left in `CIDRS`, and puts this enforcer's replacement maps where the old pins
    /// were. Returns the links and the version directories removed.
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
        let cidrs = self.ebpf.map(CIDRS).ok_or(LoadError::MissingMap(CIDRS))?;
        self.written.cidrs.drop_trie_hosts(cidrs)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{PINNED_MAPS, load::OBJECT};

    const HASH: Layout = Layout {
        key_size: 16,
        value_size: 16,
        max_entries: 65536,
        flags: NO_PREALLOC,
    };

    #[test]
    fn a_pinned_map_of_the_wanted_layout_serves() {
        let same = (MapType::Hash, Some(MapType::Hash));
        assert_eq!(difference(same, HASH, HASH), None);
    }

    #[test]
    fn each_difference_is_named_the_type_first() {
        let same = (MapType::Hash, Some(MapType::Hash));
        let other = |f: fn(&mut Layout)| {
            let mut l = HASH;
            f(&mut l);
            l
        };
        assert_eq!(
            difference(
                (MapType::LruHash, Some(MapType::Hash)),
                other(|l| l.flags = 0),
                HASH
            )
            .as_deref(),
            Some("type LruHash, wanted Some(Hash)")
        );
        assert_eq!(
            difference((MapType::Hash, None), HASH, HASH).as_deref(),
            Some("type Hash, wanted None"),
            "a type aya does not know never matches"
        );
        assert_eq!(
            difference(same, other(|l| l.value_size = 24), HASH).as_deref(),
            Some("key/value 16/24 bytes, wanted 16/16")
        );
        assert_eq!(
            difference(same, other(|l| l.key_size = 20), HASH).as_deref(),
            Some("key/value 20/16 bytes, wanted 16/16")
        );
        assert_eq!(
            difference(same, other(|l| l.max_entries = 1024), HASH).as_deref(),
            Some("1024 entries, wanted 65536")
        );
        assert_eq!(
            difference(same, other(|l| l.flags = 0), HASH).as_deref(),
            Some("flags 0x0, wanted 0x1")
        );
    }

    /// The maps a pin root shares are all in the object, and each fits its own definition
    /// (what an agent of the same release finds pinned).
    #[test]
    fn every_shared_map_is_in_the_object_and_fits_itself() {
        let object = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        for name in PINNED_MAPS {
            let def = object.maps.get(name).expect(name);
            let wanted = map_type(def);
            let have = wanted.expect("a map type aya knows");
            let layout = Layout {
                key_size: def.key_size(),
                value_size: def.value_size(),
                max_entries: def.max_entries(),
                flags: def.map_flags(),
            };
            assert_eq!(difference((have, wanted), layout, layout), None, "{name}");
        }
    }
}

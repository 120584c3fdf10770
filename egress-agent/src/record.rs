//! The policy the maps were filled from, pinned beside them (`POLICY`, see egress-common):
//! where `status --rules` and `explain` find which policy entry each map entry comes from.
//!
//! Kept in bpffs, as a pinned map, because that is where the state it explains lives: it
//! survives the agent (and its container) exactly as long as the maps do, goes with them
//! on `uninstall` or a detaching exit, and bpffs holds no plain files. The file's bytes,
//! not per-entry origins: it costs what the file does, and attributing a map entry is a
//! recompile of the same policy by the same rules.
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData};
use egress_common::{POLICY, POLICY_CHUNK, PolicyChunk};

use crate::pin::{self, PinRoot};

/// The recorded policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub path: String,
    pub bytes: Vec<u8>,
}

/// The header chunk: file length, path length, path.
fn header(path: &str, len: usize) -> PolicyChunk {
    let mut chunk = PolicyChunk {
        bytes: [0; POLICY_CHUNK],
    };
    let mut path = path.as_bytes();
    path = &path[..path.len().min(POLICY_CHUNK - 10)];
    chunk.bytes[..8].copy_from_slice(&(len as u64).to_ne_bytes());
    chunk.bytes[8..10].copy_from_slice(&(path.len() as u16).to_ne_bytes());
    chunk.bytes[10..10 + path.len()].copy_from_slice(path);
    chunk
}

/// The chunks a file is stored as, the header first.
fn chunks(path: &str, bytes: &[u8]) -> Vec<PolicyChunk> {
    let mut out = vec![header(path, bytes.len())];
    for part in bytes.chunks(POLICY_CHUNK) {
        let mut chunk = PolicyChunk {
            bytes: [0; POLICY_CHUNK],
        };
        chunk.bytes[..part.len()].copy_from_slice(part);
        out.push(chunk);
    }
    out
}

/// The file back from its chunks; `None` if they do not hold one.
fn assemble(chunks: &[PolicyChunk]) -> Option<Record> {
    let head = &chunks.first()?.bytes;
    let len = usize::try_from(u64::from_ne_bytes(head[..8].try_into().ok()?)).ok()?;
    let path_len = usize::from(u16::from_ne_bytes(head[8..10].try_into().ok()?));
    let path = String::from_utf8_lossy(head.get(10..10 + path_len)?).into_owned();
    let mut bytes: Vec<u8> = chunks[1..].iter().flat_map(|c| c.bytes).collect();
    if bytes.len() < len {
        return None;
    }
    bytes.truncate(len);
    Some(Record { path, bytes })
}

/// Records `bytes`, read from `path`, as the policy the maps hold now.
pub fn write(pins: &PinRoot, path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let chunks = chunks(&path.display().to_string(), bytes);
    let entries = u32::try_from(chunks.len()).context("a policy too large to record")?;
    let mut array: Array<MapData, PolicyChunk> =
        Array::create(entries, 0).context("creating the policy record")?;
    for (i, chunk) in (0u32..).zip(&chunks) {
        array
            .set(i, chunk, 0)
            .context("writing the policy record")?;
    }
    let target = pins.map_path(POLICY);
    // bpffs refuses names with a dot.
    let fresh = pins.map_path(&format!("{POLICY}_NEW"));
    // A previous attempt's leftover, if any.
    if fresh.exists() {
        pin::remove_file(&fresh)?;
    }
    array
        .pin(&fresh)
        .with_context(|| format!("pinning {}", fresh.display()))?;
    std::fs::rename(&fresh, &target)
        .with_context(|| format!("renaming {} over {}", fresh.display(), target.display()))
}

/// The recorded policy, if an agent of this release recorded one.
pub fn read(pins: &PinRoot) -> anyhow::Result<Option<Record>> {
    let path = pins.map_path(POLICY);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let array: Array<MapData, PolicyChunk> = Array::try_from(Map::Array(data))?;
    let chunks = (0..array.len())
        .map(|i| array.get(&i, 0))
        .collect::<Result<Vec<_>, _>>()
        .context("reading the policy record")?;
    Ok(assemble(&chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_round_trips_through_its_chunks() {
        for len in [
            0,
            1,
            POLICY_CHUNK - 1,
            POLICY_CHUNK,
            POLICY_CHUNK + 1,
            3 * POLICY_CHUNK,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let chunks = chunks("/etc/egress/policy.yaml", &bytes);
            assert_eq!(chunks.len(), 1 + len.div_ceil(POLICY_CHUNK));
            assert_eq!(
                assemble(&chunks),
                Some(Record {
                    path: "/etc/egress/policy.yaml".into(),
                    bytes
                }),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn chunks_that_hold_less_than_the_header_says_are_no_record() {
        let mut chunks = chunks("p.yaml", &[7; 5000]);
        chunks.pop();
        assert_eq!(assemble(&chunks), None);
        assert_eq!(assemble(&[]), None);
    }
}

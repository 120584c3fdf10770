//! The policy the maps were filled from, pinned beside them (`POLICY`, see egress-common):
//! where `status --rules` and `explain` find which policy entry each map entry comes from.
//!
//! Kept in bpffs, as a pinned map, because that is where the state it explains lives: it
//! survives the agent (and its container) exactly as long as the maps do, goes with them
//! on `uninstall` or a detaching exit, and bpffs holds no plain files. The file's bytes,
//! not per-entry origins: it costs what the file does, and attributing a map entry is a
//! recompile of the same policy by the same rules.
//!
//! The list files a policy names (`cidrs_from`) can be large, so only their hashes are
//! recorded, as the policy's hash covers them (`policy::manifest`): a reader that finds a
//! list file changed since says so rather than name its prefixes by the file as it is now.
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
    /// Its lists' hashes and names (`policy::manifest`); `None` if recorded by a release
    /// that did not record them.
    pub lists: Option<Vec<u8>>,
}

/// What starts a record's content that holds the lists' hashes too; a policy file, being
/// text, never starts with a NUL byte.
const WITH_LISTS: &[u8] = b"\0lists\n";

/// What is recorded for the policy file `bytes` with its lists' `manifest`: [`WITH_LISTS`],
/// the file's length (u64, little-endian), the file, the manifest.
pub fn content(bytes: &[u8], manifest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(WITH_LISTS.len() + 8 + bytes.len() + manifest.len());
    out.extend_from_slice(WITH_LISTS);
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(manifest);
    out
}

/// The policy file and its lists' manifest back from a record's content; the content of an
/// earlier release's record is the file alone.
fn split(content: Vec<u8>) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let Some(rest) = content.strip_prefix(WITH_LISTS) else {
        return Some((content, None));
    };
    let (len, rest) = rest.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    let (bytes, manifest) = rest.split_at(len);
    Some((bytes.to_vec(), Some(manifest.to_vec())))
}

/// The header chunk: content length, path length, path.
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
    let (bytes, lists) = split(bytes)?;
    Some(Record { path, bytes, lists })
}

/// Records `content` (see [`content`]), the policy read from `path`, as the policy the maps
/// hold now.
pub fn write(pins: &PinRoot, path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let chunks = chunks(&path.display().to_string(), content);
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
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            let chunks = chunks("/etc/egress/policy.yaml", &bytes);
            assert_eq!(chunks.len(), 1 + len.div_ceil(POLICY_CHUNK));
            assert_eq!(
                assemble(&chunks),
                Some(Record {
                    path: "/etc/egress/policy.yaml".into(),
                    bytes,
                    lists: None,
                }),
                "{len} bytes, as an earlier release records them"
            );
        }
    }

    #[test]
    fn a_file_round_trips_with_its_lists() {
        let manifest = format!("{}  partners.txt\n", "ab".repeat(32)).into_bytes();
        for len in [0, POLICY_CHUNK - 17, POLICY_CHUNK, 2 * POLICY_CHUNK + 5] {
            let bytes = vec![b'a'; len];
            let chunks = chunks("p.yaml", &content(&bytes, &manifest));
            assert_eq!(
                assemble(&chunks),
                Some(Record {
                    path: "p.yaml".into(),
                    bytes,
                    lists: Some(manifest.clone()),
                }),
                "{len} bytes"
            );
        }
        let none = chunks("p.yaml", &content(b"allow: []\n", b""));
        assert_eq!(assemble(&none).and_then(|r| r.lists), Some(Vec::new()));
    }

    #[test]
    fn chunks_that_hold_less_than_the_header_says_are_no_record() {
        let mut chunks = chunks("p.yaml", &[7; 5000]);
        chunks.pop();
        assert_eq!(assemble(&chunks), None);
        assert_eq!(assemble(&[]), None);
    }
}

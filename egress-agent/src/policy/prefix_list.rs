//! `cidrs_from`: a plain list of prefixes, one a line, for allowlists too large for YAML.
//!
//! A million `- cidr:` entries cost the YAML parser seconds and hundreds of MiB; a list
//! file is read line by line into 17-byte prefixes. Each line is checked exactly as a
//! `cidr` value is ([`parse_cidr`]), so a list allows nothing an inline entry could not.
//! `#` starts a comment, to the end of the line; blank lines are skipped.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use egress_common::{CIDRS_MAX_ENTRIES, V4_MAPPED_PREFIX, v4_mapped};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::syntax::parse_cidr;
use super::types::Ports;

/// The largest list file read, in bytes: the kernel map's 2,097,152 entries as IPv6
/// prefixes with a comment each still fit.
pub const MAX_LIST_BYTES: u64 = 256 << 20;

/// The longest line read; a prefix is at most 43 characters, the rest is room for a comment.
const MAX_LINE: u64 = 4096;

/// Problems reported for one list at most; a file of a million bad lines gets a count.
const REPORTED: usize = 20;

/// A prefix as the kernel map holds it: IPv4 as its IPv4-mapped IPv6 form, with 96 added to
/// its length. The field order sorts by length first, as the compiler wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub len: u8,
    pub addr: [u8; 16],
}

impl Prefix {
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(n) => Prefix {
                len: V4_MAPPED_PREFIX as u8 + n.prefix_len(),
                addr: v4_mapped(n.network().octets()),
            },
            IpNet::V6(n) => Prefix {
                len: n.prefix_len(),
                addr: n.network().octets(),
            },
        }
    }

    /// The prefix as it was written: an IPv4 network for the IPv4-mapped range.
    pub fn net(&self) -> IpNet {
        let v6 = std::net::Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) if u32::from(self.len) >= V4_MAPPED_PREFIX => {
                IpNet::new_assert(IpAddr::V4(v4), self.len - V4_MAPPED_PREFIX as u8)
            }
            _ => IpNet::new_assert(IpAddr::V6(v6), self.len),
        }
    }

    /// This prefix cut to `len` bits.
    pub fn truncated(&self, len: u8) -> Self {
        let addr = u128::from_be_bytes(self.addr);
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        Prefix {
            len,
            addr: (addr & mask).to_be_bytes(),
        }
    }
}

/// The prefixes of one `cidrs_from` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixList {
    /// The index of the `allow` entry that names the file.
    pub entry: usize,
    /// The file's name as the policy gives it.
    pub name: String,
    /// The file read: `name`, relative to the policy file's directory.
    pub path: PathBuf,
    pub ports: Ports,
    /// Sorted, each once.
    pub prefixes: Vec<Prefix>,
    /// SHA-256 of the bytes read, so that the policy watcher sees a change of the list.
    pub digest: [u8; 32],
}

impl PrefixList {
    /// Whether the list holds exactly `prefix`.
    pub fn contains(&self, prefix: &Prefix) -> bool {
        self.prefixes.binary_search(prefix).is_ok()
    }
}

/// `name` (as written in the policy) relative to the directory of the policy file `source`.
pub fn resolve(source: &str, name: &str) -> PathBuf {
    match Path::new(source).parent() {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

/// The SHA-256 of a file's first [`MAX_LIST_BYTES`] bytes, as [`read`] computes it.
pub fn digest_of(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut file = File::open(path)?.take(MAX_LIST_BYTES + 1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(hasher.finalize().into()),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// The lists' line in the policy's hash, one a list in the policy's order: its SHA-256
/// and its name as the policy gives it, as `sha256sum NAME` prints them in the policy's
/// directory (`<64 hex digits>  <name>` and a newline).
pub fn manifest(lists: &[PrefixList]) -> Vec<u8> {
    let mut out = Vec::new();
    for list in lists {
        out.extend_from_slice(sha256_hex(&list.digest).as_bytes());
        out.extend_from_slice(b"  ");
        out.extend_from_slice(list.name.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The policy's hash: the SHA-256 of the file's bytes followed by its lists' [`manifest`],
/// so that an edited list changes it as an edited policy does. Without lists it is the
/// file's own, as `sha256sum policy.yaml` prints it.
pub fn policy_sha256(bytes: &[u8], manifest: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(bytes);
    hasher.update(manifest);
    hasher.finalize().into()
}

/// A hash as `sha256sum` prints it.
pub fn sha256_hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// A list as read: its prefixes (sorted, each once) and digest, or every problem found
/// (at most [`REPORTED`] of them, then a count), each as `path:line: what is wrong`.
pub fn read(path: &Path) -> Result<(Vec<Prefix>, [u8; 32]), Vec<String>> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| vec![format!("{shown}: cannot read: {e}")])?;
    let mut reader = BufReader::with_capacity(1 << 16, file.take(MAX_LIST_BYTES + 1));
    let mut hasher = Sha256::new();
    let mut read_bytes = 0u64;
    let mut found: Vec<(Prefix, u32)> = Vec::new();
    let mut problems = Vec::new();
    let mut more = 0usize;
    let mut problem = |problems: &mut Vec<String>, text: String| {
        if problems.len() < REPORTED {
            problems.push(text);
        } else {
            more += 1;
        }
    };
    let mut buf = Vec::with_capacity(128);
    for line in 1u32.. {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| vec![format!("{shown}:{line}: cannot read: {e}")])?;
        if n == 0 {
            break;
        }
        hasher.update(&buf);
        read_bytes += n as u64;
        if read_bytes > MAX_LIST_BYTES {
            return Err(vec![format!(
                "{shown}: larger than {} MiB, the most a list file may hold",
                MAX_LIST_BYTES >> 20
            )]);
        }
        if n as u64 > MAX_LINE && buf.last() != Some(&b'\n') {
            problem(
                &mut problems,
                format!("{shown}:{line}: longer than {MAX_LINE} bytes"),
            );
            break;
        }
        let Ok(text) = std::str::from_utf8(&buf) else {
            problem(&mut problems, format!("{shown}:{line}: not UTF-8"));
            continue;
        };
        let text = if line == 1 {
            text.strip_prefix('\u{feff}').unwrap_or(text)
        } else {
            text
        };
        let text = text
            .split_once('#')
            .map_or(text, |(before, _)| before)
            .trim();
        if text.is_empty() {
            continue;
        }
        match parse_cidr(text) {
            Ok(net) => found.push((Prefix::of(&net), line)),
            Err(e) => problem(&mut problems, format!("{shown}:{line}: `{text}`: {e}")),
        }
        if found.len() > CIDRS_MAX_ENTRIES as usize {
            return Err(vec![format!(
                "{shown}: more than {CIDRS_MAX_ENTRIES} prefixes, the most the kernel map holds"
            )]);
        }
    }
    found.sort_unstable();
    for pair in found.windows(2) {
        let ((a, first), (b, again)) = (pair[0], pair[1]);
        if a == b {
            problem(
                &mut problems,
                format!("{shown}:{again}: `{}` repeats line {first}", a.net()),
            );
        }
    }
    if found.is_empty() && problems.is_empty() {
        problem(
            &mut problems,
            format!(
                "{shown}: holds no prefix, so the entry would allow nothing; remove the entry or list a prefix"
            ),
        );
    }
    if more > 0 {
        problems.push(format!("{shown}: and {more} more problems"));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let prefixes = found.into_iter().map(|(prefix, _)| prefix).collect();
    Ok((prefixes, hasher.finalize().into()))
}

#[cfg(test)]
mod tests;

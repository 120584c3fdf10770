//! The policy file: which destinations the pods on this node may reach.
//!
//! The YAML is first read into loose `Raw*` structs and then validated by hand, so that every
//! mistake is reported with the file, the entry and what is wrong. Anything doubtful is an
//! error, never a warning: an allowlist that quietly admits more, or less, than its author
//! meant is worse than one that refuses to load.

use std::collections::HashSet;
use std::io::Read as _;
use std::path::Path;

use crate::kubeconfig::KubeletApiServer;

mod diagnose;
mod lists;
mod locate;
mod merge;
mod nesting;
mod prefix_list;
pub mod presets;
mod raw;
mod suffix;
mod syntax;
mod types;
mod validate;

pub use prefix_list::{
    MAX_LIST_BYTES, Prefix, PrefixList, digest_of, manifest, policy_sha256, sha256_hex,
};
pub use suffix::{Reach, reach};
pub use syntax::merge;
pub use types::{
    DnsSettings, Mode, NamePattern, Notice, Origin, Policy, PortRange, Ports, Proto, Rule, Target,
    rule_lines,
};

use diagnose::diagnose;
use locate::Lines;
use presets::Params;
use raw::{RawPolicy, RawPreset};
use validate::{Problems, invalid, validate};

/// The largest policy file read, in bytes. The largest policy the benchmarks run, a million
/// single-host IPv6 entries (`  - cidr: 2001:db8:f:423f::1`, 30 bytes a line), is 29 MB;
/// 64 MiB still takes a million entries with a short `ports` list each. Reading stops one
/// byte past it, so a file that never ends (a FIFO fed forever, `/dev/zero`) is refused
/// rather than read until memory runs out.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// How deeply a policy file may nest its collections. A policy needs four levels (the
/// file's mapping, `allow`, an entry, its `ports`); the bound is there because the YAML
/// parser's time grows with the square of the nesting, see [`nesting`].
pub const MAX_DEPTH: usize = 64;

/// Why a policy file was refused. Each message line starts with the file name; a file with
/// several problems gets a line for each.
///
/// Underlying errors are part of the message rather than `source()`, so they are printed once
/// in `{:#}` chains.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read (missing, unreadable or not UTF-8).
    #[error("{file}: cannot read: {error}")]
    Read { file: String, error: std::io::Error },
    /// The file holds more than [`MAX_FILE_BYTES`], or never ends.
    #[error(
        "{file}: larger than {} MiB, the most a policy file may hold",
        MAX_FILE_BYTES >> 20
    )]
    TooLarge { file: String },
    /// Bad YAML or an unknown key; serde's message has the line and column.
    #[error("{file}: {error}")]
    Yaml {
        file: String,
        error: serde_norway::Error,
    },
    /// A policy the enforcer will not accept, with every problem found in it.
    #[error("{}", Problem::lines(file, problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

/// One thing wrong in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where it starts in the file (from 1), when the file is at hand.
    pub line: Option<usize>,
    /// The part of the policy, e.g. `allow[2] (cidr 203.0.113.5/24)`.
    pub at: String,
    pub problem: String,
}

impl Problem {
    /// `file: line 4: allow[2] (…): problem`, one line for each of `problems`.
    fn lines(file: &str, problems: &[Problem]) -> String {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| match p.line {
                Some(line) => format!("{file}: line {line}: {}: {}", p.at, p.problem),
                None => format!("{file}: {}: {}", p.at, p.problem),
            })
            .collect();
        lines.join("\n")
    }
}

/// Reads and validates the policy file at `path`; `kubelet` is the API server name the
/// node's kubeconfig gives, if any.
pub fn load(path: &Path, kubelet: Option<&KubeletApiServer>) -> Result<Policy, PolicyError> {
    parse_bytes(&read(path)?, &path.display().to_string(), kubelet)
}

/// The policy file's bytes, at most [`MAX_FILE_BYTES`] of them.
pub fn read(path: &Path) -> Result<Vec<u8>, PolicyError> {
    let file = path.display().to_string();
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|error| PolicyError::Read {
            file: file.clone(),
            error,
        })?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(PolicyError::TooLarge { file });
    }
    Ok(bytes)
}

/// Parses and validates the bytes of a policy file; `source` names the file in error
/// messages.
pub fn parse_bytes(
    bytes: &[u8],
    source: &str,
    kubelet: Option<&KubeletApiServer>,
) -> Result<Policy, PolicyError> {
    let text = std::str::from_utf8(bytes).map_err(|e| PolicyError::Read {
        file: source.to_string(),
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    parse_with(text, source, kubelet)
}

/// Parses and validates policy YAML; `source` names the file in error messages.
pub fn parse(text: &str, source: &str) -> Result<Policy, PolicyError> {
    parse_with(text, source, None)
}

/// [`parse`], with the API server name the node's kubeconfig gives.
pub fn parse_with(
    text: &str,
    source: &str,
    kubelet: Option<&KubeletApiServer>,
) -> Result<Policy, PolicyError> {
    // Editors on Windows start UTF-8 files with a byte order mark, which the YAML parser
    // refuses ("more than one document").
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Some(line) = nesting::line_too_deep(text, MAX_DEPTH) {
        return Err(invalid(
            source,
            format!("line {line}"),
            format!("collections nested more than {MAX_DEPTH} levels deep; a policy needs four"),
        ));
    }
    let validated = match serde_norway::from_str::<RawPolicy>(text) {
        Ok(raw) => validate(raw, source, kubelet, Problems::default()),
        Err(error) => diagnose(text, source, error)
            .and_then(|(raw, problems)| validate(raw, source, kubelet, problems)),
    };
    validated.map_err(|error| with_lines(error, text))
}

/// The problems of `error` with the lines they start on in `text`, in the file's order.
fn with_lines(error: PolicyError, text: &str) -> PolicyError {
    let PolicyError::Invalid { file, mut problems } = error else {
        return error;
    };
    let wanted: HashSet<&str> = problems.iter().map(|p| locate::path(&p.at)).collect();
    let lines = Lines::of(text, |path| wanted.contains(path));
    for problem in &mut problems {
        problem.line = problem.line.or_else(|| lines.line(&problem.at));
    }
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    PolicyError::Invalid { file, problems }
}

/// The rules one preset adds to a policy (with `api_server` if given), built exactly as
/// `parse` builds them, so that `presets show` prints what a policy naming the preset would
/// get; its notices say what it did with the API server name.
pub fn preset_rules(
    name: &str,
    params: Params,
    api_server: Option<String>,
    kubelet: Option<&KubeletApiServer>,
) -> Result<Policy, PolicyError> {
    let raw = RawPolicy {
        presets: Some(vec![RawPreset {
            name: name.to_string(),
            location: params.location,
            reported: false,
        }]),
        api_server,
        ..RawPolicy::default()
    };
    validate(raw, "command line", kubelet, Problems::default())
}

/// Logs the notices of a policy just loaded from `source`.
pub fn log_notices(policy: &Policy, source: &str) {
    for notice in &policy.notices {
        if notice.warning {
            log::warn!("{source}: {notice}");
        } else {
            log::info!("{source}: {notice}");
        }
    }
}

#[cfg(test)]
mod tests;

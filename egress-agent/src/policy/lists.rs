//! Validating `cidrs_from` entries: the entry itself, then repeats between lists and the
//! inline `cidr` entries, refused as an inline entry that repeats another is.

use ipnet::IpNet;

use super::prefix_list::{self, Prefix, PrefixList};
use super::raw::RawEntry;
use super::syntax::parse_ports;
use super::types::{Origin, Ports, Rule, Target};
use super::validate::invalid;
use super::{PolicyError, Problem};

/// Repeats named for one list at most.
const NAMED: usize = 5;

/// `allow[2] (cidrs_from big.txt)`: where a list's problems are reported.
pub(super) fn at(entry: usize, name: &str) -> String {
    format!("allow[{entry}] (cidrs_from {name})")
}

/// Validates the `allow` entry `entry`, which names a list, and reads the list; `source` is
/// the policy file, whose directory a relative name starts from.
pub(super) fn list_entry(
    entry: usize,
    raw: RawEntry,
    name: String,
    source: &str,
) -> Result<PrefixList, PolicyError> {
    let at = at(entry, &name);
    if raw.cidr.is_some() || raw.fqdn.is_some() {
        return Err(invalid(
            source,
            at,
            "has `cidrs_from` and `cidr` or `fqdn`; split it into two entries",
        ));
    }
    if name.trim().is_empty() {
        return Err(invalid(source, at, "`cidrs_from` names no file"));
    }
    let ports = match raw.ports {
        None => Ports::All,
        Some(items) => {
            parse_ports(&items.unwrap_or_default()).map_err(|p| invalid(source, &at, p))?
        }
    };
    let path = prefix_list::resolve(source, &name);
    let (prefixes, digest) = prefix_list::read(&path).map_err(|found| PolicyError::Invalid {
        file: source.to_string(),
        problems: found
            .into_iter()
            .map(|problem| Problem {
                line: None,
                at: at.clone(),
                problem,
            })
            .collect(),
    })?;
    Ok(PrefixList {
        entry,
        name,
        path,
        ports,
        prefixes,
        digest,
    })
}

/// Refuses a prefix that a list shares with an inline `cidr` entry or an earlier list: as
/// for two inline entries, a repeat is a leftover or a mistake.
pub(super) fn refuse_repeats(
    lists: &[PrefixList],
    rules: &[Rule],
    source: &str,
) -> Result<(), PolicyError> {
    let mut problems = Vec::new();
    for (k, list) in lists.iter().enumerate() {
        let inline = rules
            .iter()
            .filter_map(|rule| match (&rule.target, rule.origins[0]) {
                (Target::Cidr(net), Origin::Allow(i)) => Some((*net, format!("allow[{i}]"))),
                _ => None,
            });
        let mut repeats: Vec<(IpNet, String)> = inline
            .filter(|(net, _)| list.contains(&Prefix::of(net)))
            .collect();
        for earlier in &lists[..k] {
            // Searching the shorter list in the longer one.
            let (few, many) = if earlier.prefixes.len() < list.prefixes.len() {
                (earlier, list)
            } else {
                (list, earlier)
            };
            repeats.extend(
                few.prefixes
                    .iter()
                    .filter(|p| many.contains(p))
                    .map(|p| (p.net(), at(earlier.entry, &earlier.name))),
            );
        }
        if repeats.is_empty() {
            continue;
        }
        let mut named: Vec<String> = repeats
            .iter()
            .take(NAMED)
            .map(|(net, other)| format!("{net} (also in {other})"))
            .collect();
        if repeats.len() > NAMED {
            named.push(format!("and {} more", repeats.len() - NAMED));
        }
        problems.push(Problem {
            line: None,
            at: at(list.entry, &list.name),
            problem: format!(
                "repeats prefixes given elsewhere: {}; give each prefix once",
                named.join(", ")
            ),
        });
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(PolicyError::Invalid {
        file: source.to_string(),
        problems,
    })
}

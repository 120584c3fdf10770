//! Reading a policy file the typed read refused, part by part: one run then reports every
//! mistake, not the first, and the mistakes people make in YAML get a message that says
//! how to fix them. Only a refused file is read this way; an accepted one is read once,
//! straight into [`RawPolicy`].

use serde::de::DeserializeOwned;
use serde_norway::Value;

use super::PolicyError;
use super::locate::{Lines, is_entry};
use super::raw::{Item, RawPolicy};
use super::validate::{Problems, invalid};

/// What the typed read could not take, read part by part: the parts that read well, with
/// the others marked `reported`, and a problem for each of those. A file that is not YAML
/// gets the parser's error, with a hint where one helps; one that is not a mapping `error`.
pub(super) fn diagnose(
    text: &str,
    source: &str,
    error: serde_norway::Error,
) -> Result<(RawPolicy, Problems), PolicyError> {
    let yaml = |error| PolicyError::Yaml {
        file: source.to_string(),
        error,
    };
    let top = match serde_norway::from_str::<Value>(text) {
        Ok(Value::Mapping(top)) => top,
        // The typed read's error says what the file should be: a mapping with `mode`, ….
        Ok(_) => return Err(yaml(error)),
        Err(syntax) => return Err(unquoted_star(text, source, &syntax).unwrap_or(yaml(syntax))),
    };
    let mut raw = RawPolicy::default();
    let mut problems = Problems::default();
    for (key, value) in top {
        let key = match key {
            Value::String(key) => key,
            other => format!("{other:?}"),
        };
        let problems = &mut problems;
        match key.as_str() {
            "mode" => raw.mode = field(value, source, &key, problems),
            "api_server" => raw.api_server = field(value, source, &key, problems),
            "cluster_cidrs" => raw.cluster_cidrs = field(value, source, &key, problems),
            "dns" => raw.dns = by_key(value, source, &key, problems),
            "allow" => raw.allow = items(value, &key, source, problems),
            "presets" => raw.presets = items(value, &key, source, problems),
            _ => {
                let unknown = invalid(
                    source,
                    key.as_str(),
                    "unknown key; expected `mode`, `allow`, `presets`, `api_server`, `cluster_cidrs` or `dns`",
                );
                problems.keep::<()>(Err(unknown));
            }
        }
    }
    Ok((raw, problems))
}

/// A top-level key's value, `None` when it is null (as when the key is left out) or does
/// not read, with a problem then.
fn field<T: DeserializeOwned>(
    value: Value,
    source: &str,
    at: &str,
    problems: &mut Problems,
) -> Option<T> {
    read::<Option<T>>(value, source, at, problems).flatten()
}

/// A section that is a mapping, each of whose keys is read on its own, so that a problem
/// names the key (`dns.min_ttl`) and the others are still checked: the section without the
/// keys that do not read, or `None` when nothing does.
fn by_key<T: DeserializeOwned>(
    value: Value,
    source: &str,
    at: &str,
    problems: &mut Problems,
) -> Option<T> {
    let Value::Mapping(section) = value else {
        return field(value, source, at, problems);
    };
    let mut good = serde_norway::Mapping::new();
    for (key, value) in section {
        let mut one = serde_norway::Mapping::new();
        one.insert(key.clone(), value.clone());
        let at = format!("{at}.{}", scalar(&key));
        if read::<T>(Value::Mapping(one), source, &at, problems).is_some() {
            good.insert(key, value);
        }
    }
    serde_norway::from_value(Value::Mapping(good)).ok()
}

/// `value` as a `T`, or `None` with a problem at `at`.
fn read<T: DeserializeOwned>(
    value: Value,
    source: &str,
    at: &str,
    problems: &mut Problems,
) -> Option<T> {
    problems.keep(serde_norway::from_value(value).map_err(|e| invalid(source, at, e.to_string())))
}

/// The items of the list `key`, each read on its own: one that does not read is marked
/// `reported`, so that the others' indices stay right.
fn items<T: Item>(
    value: Value,
    key: &str,
    source: &str,
    problems: &mut Problems,
) -> Option<Vec<T>> {
    let list: Vec<Value> = field(value, source, key, problems)?;
    let items =
        list.into_iter()
            .enumerate()
            .map(|(i, value)| {
                let at = label(key, i, &value);
                let read = match spaced_port(&value) {
                    Some(problem) => Err(invalid(source, &at, problem)),
                    None => serde_norway::from_value(value)
                        .map_err(|e| invalid(source, &at, e.to_string())),
                };
                problems.keep(read).unwrap_or_else(T::reported)
            })
            .collect();
    Some(items)
}

/// `allow[2] (cidr 203.0.113.5/24)`, `presets[0] (aks-global)`: the item as validation names
/// it, as far as it can be read.
fn label(key: &str, i: usize, value: &Value) -> String {
    let field = |name: &str| value.get(name).and_then(Value::as_str);
    let what = match (field("cidr"), field("fqdn"), field("name")) {
        (Some(cidr), _, _) => format!(" (cidr {cidr})"),
        (None, Some(fqdn), _) => format!(" (fqdn {fqdn})"),
        (None, None, Some(name)) => format!(" ({name})"),
        _ => String::new(),
    };
    format!("{key}[{i}]{what}")
}

/// A `ports` item that YAML read as a mapping: `[HTTPS: 443]`, the space after the colon
/// making it a key and a value.
fn spaced_port(entry: &Value) -> Option<String> {
    let ports = entry.get("ports")?.as_sequence()?;
    ports.iter().find_map(|port| {
        let (name, number) = port.as_mapping()?.iter().next()?;
        let written = format!("{}:{}", scalar(name), scalar(number));
        Some(format!(
            "ports item `{}: {}` is a mapping to YAML, because of the space after the colon; write `{written}`",
            scalar(name),
            scalar(number)
        ))
    })
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// A syntax error on a line whose value starts with `*`, as an unquoted `fqdn: *.zone`:
/// YAML reads `*` as an alias, and the parser's message ("while scanning an alias") says
/// nothing of the fix.
fn unquoted_star(text: &str, source: &str, error: &serde_norway::Error) -> Option<PolicyError> {
    let line = error.location()?.line();
    let written = text.lines().nth(line.checked_sub(1)?)?.trim();
    let value = written.trim_start_matches("- ");
    let (key, rest) = match value.split_once(": ") {
        Some((key, rest)) => (Some(key), rest.trim()),
        None => (None, value),
    };
    if !rest.starts_with('*') {
        return None;
    }
    let quoted = match key {
        Some(key) => format!("{key}: \"{rest}\""),
        None => format!("\"{rest}\""),
    };
    let lines = Lines::of(text, is_entry);
    let at = match lines.entry_before(line) {
        Some(entry) => format!("{entry} ({value})"),
        None => format!("`{written}`"),
    };
    Some(PolicyError::Invalid {
        file: source.to_string(),
        problems: vec![super::Problem {
            line: Some(line),
            at,
            problem: format!(
                "a value that starts with `*` must be quoted, or YAML reads it as an alias; write {quoted}"
            ),
        }],
    })
}

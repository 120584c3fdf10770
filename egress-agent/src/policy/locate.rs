//! Where each part of a policy file starts, so that every error names its line.
//!
//! serde_norway keeps no positions for values, so a refused file is read once more by an
//! event parser that has them. Only a refused file: an accepted one, up to a million
//! entries, never pays for it.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};

/// The line (from 1) on which each path starts: `allow`, `allow[2]`, `allow[2].ports[0]`,
/// `dns.max_ttl`. A mapping's value starts where its key does.
pub(super) struct Lines(HashMap<String, usize>);

/// An open collection and where the walk is in it.
enum Frame {
    Sequence {
        path: String,
        next: usize,
    },
    /// `key` is the key whose value comes next, or `None` when a key comes next.
    Mapping {
        path: String,
        key: Option<(String, usize)>,
    },
}

impl Lines {
    /// The paths of `text` for which `keep` holds, up to its end or to a syntax error. A
    /// refused file of a million entries keeps only the few paths its problems name.
    pub(super) fn of(text: &str, keep: impl Fn(&str) -> bool) -> Lines {
        let mut lines = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        while let Ok((event, mark)) = parser.next_token() {
            let starts_node = matches!(
                event,
                Event::Scalar(..)
                    | Event::Alias(_)
                    | Event::SequenceStart(..)
                    | Event::MappingStart(..)
            );
            if !starts_node {
                if matches!(event, Event::SequenceEnd | Event::MappingEnd) {
                    stack.pop();
                    end_value(&mut stack);
                }
                if event == Event::StreamEnd {
                    break;
                }
                continue;
            }
            // The node's path and line, or `None` for a mapping's key.
            let node = match stack.last_mut() {
                None => Some((String::new(), mark.line())),
                Some(Frame::Sequence { path, next }) => {
                    *next += 1;
                    Some((format!("{path}[{}]", *next - 1), mark.line()))
                }
                Some(Frame::Mapping { path, key }) => match key.take() {
                    Some((key, line)) => Some((join(path, &key), line)),
                    None => {
                        let name = match &event {
                            Event::Scalar(name, ..) => name.clone(),
                            _ => "?".to_string(),
                        };
                        *key = Some((name, mark.line()));
                        None
                    }
                },
            };
            let Some((path, line)) = node else {
                // A key that is a collection nests a frame of its own, never looked at.
                if let Event::SequenceStart(..) | Event::MappingStart(..) = event {
                    stack.push(Frame::Sequence {
                        path: "?".to_string(),
                        next: 0,
                    });
                }
                continue;
            };
            if keep(&path) {
                lines.entry(path.clone()).or_insert(line);
            }
            match event {
                Event::SequenceStart(..) => stack.push(Frame::Sequence { path, next: 0 }),
                Event::MappingStart(..) => stack.push(Frame::Mapping { path, key: None }),
                _ => end_value(&mut stack),
            }
        }
        Lines(lines)
    }

    /// The line on which `at` starts.
    pub(super) fn line(&self, at: &str) -> Option<usize> {
        self.0.get(path(at)).copied()
    }

    /// The last top-level entry (`allow[3]`, `presets[0]`) that starts on or before `line`:
    /// the one a syntax error there is in.
    pub(super) fn entry_before(&self, line: usize) -> Option<&str> {
        self.0
            .iter()
            .filter(|(path, start)| **start <= line && is_entry(path))
            .max_by_key(|(path, start)| (**start, path.len()))
            .map(|(path, _)| path.as_str())
    }
}

/// The path in `at`: what comes before the first space or parenthesis, as in
/// `allow[2] (cidr 203.0.113.5/24)`.
pub(super) fn path(at: &str) -> &str {
    at.split([' ', '(']).next().unwrap_or_default()
}

/// Whether `path` is an item of a top-level list: `allow[3]`, `presets[0]`.
pub(super) fn is_entry(path: &str) -> bool {
    path.ends_with(']') && path.matches('[').count() == 1
}

/// After a mapping's value ends, its next key comes; after a key's value is a collection
/// that closed, too.
fn end_value(stack: &mut [Frame]) {
    if let Some(Frame::Mapping { key, .. }) = stack.last_mut() {
        *key = None;
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "mode: audit
allow:
  - cidr: 203.0.113.0/24
    ports: [HTTPS:443, UDP:123]
  - {fqdn: example.com, ports: [TCP:443]}

  - fqdn: mcr.microsoft.com
    ports:
      - HTTPS:443
dns:
  resolvers: [10.0.0.10]
  max_ttl: 60
";

    #[test]
    fn every_path_has_its_line() {
        let lines = Lines::of(POLICY, |_| true);
        for (at, line) in [
            ("mode", 1),
            ("allow", 2),
            ("allow[0] (cidr 203.0.113.0/24)", 3),
            ("allow[0].ports[1]", 4),
            ("allow[1]", 5),
            ("allow[1].ports[0]", 5),
            ("allow[2]", 7),
            ("allow[2].ports[0]", 9),
            ("dns", 10),
            ("dns.resolvers[0] (10.0.0.10)", 11),
            ("dns.max_ttl", 12),
        ] {
            assert_eq!(lines.line(at), Some(line), "{at}");
        }
        assert_eq!(lines.line("allow[3]"), None);
        assert_eq!(lines.line("preset aks-global"), None);
    }

    #[test]
    fn a_syntax_error_keeps_what_came_before() {
        let text =
            "allow:\n  - cidr: 203.0.113.0/24\n  - fqdn: *.microsoft.com\n    ports: [HTTPS:443]\n";
        let lines = Lines::of(text, is_entry);
        assert_eq!(lines.line("allow[0]"), Some(2));
        assert_eq!(lines.entry_before(3), Some("allow[1]"));
        assert_eq!(lines.entry_before(2), Some("allow[0]"));
        assert_eq!(lines.entry_before(1), None);
    }
}

//! The agent's own moments (attached, took over, reloaded) as JSON lines on stdout, among
//! the deny lines: `{"event":"attached","time":…,…}`. Tools and tests wait on these rather
//! than on the log lines on stderr, whose wording is for operators and may change.
use std::io::Write as _;

use serde_json::{Value, json};

use crate::sys::now;

/// The line for `event` with `fields` (a JSON object) and the time.
fn line(event: &str, fields: Value) -> Value {
    let mut line = json!({"time": now(), "event": event});
    if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), fields) {
        line.extend(fields);
    }
    line
}

/// Prints `event` with `fields` (a JSON object) on stdout. A failed write is logged: the
/// event reader, writing to the same stdout, fails the agent then.
pub fn emit(event: &str, fields: Value) {
    let mut out = std::io::stdout().lock();
    let written = writeln!(out, "{}", line(event, fields)).and_then(|()| out.flush());
    if let Err(e) = written {
        log::warn!("writing the {event} event to stdout: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_the_event_its_fields_and_the_time() {
        let line = line("attached", json!({"mode": "enforce", "rules": 2}));
        assert_eq!(line["event"], "attached");
        assert_eq!(line["mode"], "enforce");
        assert_eq!(line["rules"], 2);
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }

    #[test]
    fn an_event_without_fields_has_its_name_and_the_time() {
        let line = line("policy_reloaded", json!({}));
        assert_eq!(
            line.as_object().map(serde_json::Map::len),
            Some(2),
            "{line}"
        );
        assert_eq!(line["event"], "policy_reloaded");
    }
}

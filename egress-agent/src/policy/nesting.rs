//! How deeply a YAML text nests its collections, found before the YAML parser sees it.
//!
//! The parser (libyaml) rechecks the possible keys of every open flow level at each token,
//! so its time grows with the square of the nesting: `[[[[…` 100,000 deep takes minutes, and a file of a few
//! MiB of brackets would never finish. This scan is linear, and stops at the first level
//! past the limit.
//!
//! It splits the text into tokens the way libyaml's scanner does, so that only real
//! collections count: brackets inside quoted, plain and block scalars and comments do not.
//! Flow collections nest by their brackets (and a flow sequence's single-pair mapping,
//! `[a: b]`, by its `:`); block collections by the columns of their `-` entries and keys,
//! closing when a token starts left of them, as libyaml's indentation stack does. Where libyaml would stop at a syntax error, the scan goes on, so it never
//! counts fewer levels than libyaml opens before that error.

/// The first line (counted from 1) on which `text` opens a collection nested deeper than
/// `limit`, or `None` if it never does.
pub(super) fn line_too_deep(text: &str, limit: usize) -> Option<usize> {
    Scan::new(text).first_line_deeper_than(limit)
}

/// Where the scan is in the text, and the collections open there.
struct Scan<'a> {
    text: &'a [u8],
    pos: usize,
    /// Counted from 1, for the error message.
    line: usize,
    /// Characters since the line's start, as libyaml counts columns.
    col: usize,
    /// The open block collections: each one's column, and whether it is a sequence. A
    /// sequence of a mapping's values may sit at the mapping's own column, one level
    /// deeper: the flag orders it after that mapping.
    blocks: Vec<(usize, bool)>,
    /// The open flow collections, innermost last.
    flows: Vec<Flow>,
    /// How many of `flows` hold a single-pair mapping now.
    pairs: usize,
    /// Where the token that may be the next block mapping key started (line, column): the
    /// first one since the last indicator, as libyaml's "simple key".
    key: Option<(usize, usize)>,
    /// The deepest flow nesting since `key` started: a key that is a flow collection is
    /// one level deeper than it looked, once the mapping it opens is there.
    key_flow: usize,
}

/// An open flow collection.
struct Flow {
    sequence: bool,
    /// The sequence's current entry is a single-pair mapping (`[a: b]`, `[? a]`), a level
    /// of its own.
    pair: bool,
    /// The deepest the text went in the current entry so far; a pair's key is one level
    /// deeper than it looked, once the pair is there.
    deepest: usize,
}

/// Whether the bytes at `at` are a line break: LF, CR, CR LF, or the Unicode NEL, LS and PS
/// that libyaml takes as breaks too. Returns the break's length, 0 if none.
fn break_len(text: &[u8], at: usize) -> usize {
    match text.get(at..).unwrap_or_default() {
        [b'\r', b'\n', ..] => 2,
        [b'\r' | b'\n', ..] => 1,
        [0xc2, 0x85, ..] => 2,
        [0xe2, 0x80, 0xa8 | 0xa9, ..] => 3,
        _ => 0,
    }
}

/// Whether the byte at `at` ends a token: a space, a tab, a line break, or the end.
fn blank_or_end(text: &[u8], at: usize) -> bool {
    matches!(text.get(at), None | Some(b' ' | b'\t')) || break_len(text, at) > 0
}

impl<'a> Scan<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text: text.as_bytes(),
            pos: 0,
            line: 1,
            col: 0,
            blocks: Vec::new(),
            flows: Vec::new(),
            pairs: 0,
            key: None,
            key_flow: 0,
        }
    }

    fn byte(&self, ahead: usize) -> Option<u8> {
        self.text.get(self.pos + ahead).copied()
    }

    fn at_break(&self) -> bool {
        break_len(self.text, self.pos) > 0
    }

    /// Steps over one character, or one line break.
    fn advance(&mut self) {
        let len = break_len(self.text, self.pos);
        if len > 0 {
            self.pos += len;
            self.line += 1;
            self.col = 0;
            return;
        }
        let Some(lead) = self.byte(0) else {
            return;
        };
        // The text is UTF-8: the lead byte says how long the character is.
        self.pos += match lead {
            0xf0.. => 4,
            0xe0.. => 3,
            0xc0.. => 2,
            _ => 1,
        };
        self.col += 1;
    }

    /// Steps to the end of the line, before its break.
    fn skip_line(&mut self) {
        while self.byte(0).is_some() && !self.at_break() {
            self.advance();
        }
    }

    /// `---` or `...` at the start of a line.
    fn at_document_marker(&self) -> bool {
        self.col == 0
            && (self.text[self.pos..].starts_with(b"---")
                || self.text[self.pos..].starts_with(b"..."))
            && blank_or_end(self.text, self.pos + 3)
    }

    fn flow_depth(&self) -> usize {
        self.flows.len() + self.pairs
    }

    fn depth(&self) -> usize {
        self.blocks.len() + self.flow_depth()
    }

    fn first_line_deeper_than(mut self, limit: usize) -> Option<usize> {
        loop {
            self.skip_to_token();
            // At the end, nothing went deeper than `limit`.
            let c = self.byte(0)?;
            let line = self.line;
            let block = self.flows.is_empty();
            if block {
                while self.blocks.last().is_some_and(|&(col, _)| col > self.col) {
                    self.blocks.pop();
                }
            }
            let indicator = !block || blank_or_end(self.text, self.pos + 1);
            // How deep a key turned out to be, once the collection it opens is there.
            let mut key_depth = 0;
            match c {
                b'-' | b'.' if self.at_document_marker() => {
                    self.blocks.clear();
                    self.key = None;
                    self.pos += 3;
                    self.col += 3;
                }
                b'%' if self.col == 0 => self.skip_line(),
                b'[' | b'{' => {
                    self.note_key();
                    self.advance();
                    self.flows.push(Flow {
                        sequence: c == b'[',
                        pair: false,
                        deepest: self.depth() + 1,
                    });
                }
                b']' | b'}' => {
                    self.advance();
                    self.end_entry(true);
                }
                b',' => {
                    self.advance();
                    self.end_entry(false);
                }
                b'-' if blank_or_end(self.text, self.pos + 1) => {
                    self.block_entry(self.col, true);
                }
                b'?' if indicator => {
                    key_depth = self.block_entry(self.col, false).max(self.open_pair());
                }
                b':' if indicator => {
                    let (col, key_flow) = match self.key {
                        Some((key_line, key_col)) if key_line == self.line => {
                            (key_col, self.key_flow)
                        }
                        _ => (self.col, 0),
                    };
                    key_depth = self.block_entry(col, false).max(self.open_pair());
                    if key_depth > 0 && block {
                        key_depth = self.blocks.len() + key_flow;
                    }
                }
                b'*' | b'&' => {
                    self.note_key();
                    self.advance();
                    while self
                        .byte(0)
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
                    {
                        self.advance();
                    }
                }
                b'!' => {
                    self.note_key();
                    while !blank_or_end(self.text, self.pos)
                        && (block || self.byte(0) != Some(b','))
                    {
                        self.advance();
                    }
                }
                b'|' | b'>' if block => self.block_scalar(),
                b'\'' | b'"' => {
                    self.note_key();
                    self.quoted(c);
                }
                _ => {
                    self.note_key();
                    self.plain();
                }
            }
            if self.depth().max(key_depth) > limit {
                return Some(line);
            }
            self.key_flow = self.key_flow.max(self.flow_depth());
        }
    }

    /// Skips spaces, tabs, comments and line breaks (and a byte order mark at a line's
    /// start, as libyaml does).
    fn skip_to_token(&mut self) {
        loop {
            match self.byte(0) {
                Some(b' ' | b'\t') => self.advance(),
                Some(b'#') => self.skip_line(),
                Some(0xef)
                    if self.col == 0 && self.text[self.pos..].starts_with(b"\xef\xbb\xbf") =>
                {
                    self.advance()
                }
                Some(_) if self.at_break() => self.advance(),
                _ => return,
            }
        }
    }

    /// A token that may be a block mapping's key starts here.
    fn note_key(&mut self) {
        let stale = self.key.is_none_or(|(line, _)| line != self.line);
        if self.flows.is_empty() && stale {
            self.key = Some((self.line, self.col));
            self.key_flow = 0;
        }
    }

    /// The end of the innermost flow collection's entry (`,`), or of the collection itself
    /// (`]`, `}`): its pair closes, and the entry of the collection around it went as deep.
    fn end_entry(&mut self, collection_ends: bool) {
        let Some(mut flow) = self.flows.pop() else {
            return;
        };
        if flow.pair {
            flow.pair = false;
            self.pairs -= 1;
        }
        if let Some(outer) = self.flows.last_mut() {
            outer.deepest = outer.deepest.max(flow.deepest);
        }
        if !collection_ends {
            flow.deepest = self.depth() + 1;
            self.flows.push(flow);
        }
    }

    /// `-`, `?` or `:` in block context: an entry of the sequence or mapping at `col`, which
    /// opens it unless it is open already. Returns the depth it opened, 0 if none.
    fn block_entry(&mut self, col: usize, sequence: bool) -> usize {
        let mut opened = 0;
        if self.flows.is_empty() {
            let block = (col, sequence);
            while self.blocks.last().is_some_and(|&top| top > block) {
                self.blocks.pop();
            }
            if self.blocks.last() != Some(&block) {
                self.blocks.push(block);
                opened = self.blocks.len();
            }
            self.key = None;
        }
        self.advance();
        opened
    }

    /// `?` or `:` in a flow sequence: the entry is a single-pair mapping. Returns the depth
    /// its key reaches inside it, 0 if no pair opened.
    fn open_pair(&mut self) -> usize {
        match self.flows.last_mut() {
            Some(flow) if flow.sequence && !flow.pair => {
                flow.pair = true;
                flow.deepest += 1;
                self.pairs += 1;
                flow.deepest
            }
            _ => 0,
        }
    }

    /// A single- or double-quoted scalar, which may span lines.
    fn quoted(&mut self, quote: u8) {
        self.advance();
        while let Some(c) = self.byte(0) {
            match c {
                b'\'' if quote == b'\'' && self.byte(1) == Some(b'\'') => {
                    self.advance();
                    self.advance();
                }
                b'\\' if quote == b'"' => {
                    self.advance();
                    self.advance();
                }
                _ if c == quote => {
                    self.advance();
                    return;
                }
                _ => self.advance(),
            }
        }
    }

    /// A plain scalar: words until `: `, a comment, or in flow context a flow indicator;
    /// in block context it goes on over the lines indented past its collection.
    fn plain(&mut self) {
        let block = self.flows.is_empty();
        let indent = self.blocks.last().map_or(0, |&(col, _)| col + 1);
        loop {
            if self.at_document_marker() || self.byte(0) == Some(b'#') {
                return;
            }
            while !blank_or_end(self.text, self.pos) {
                let c = self.byte(0);
                let next = self.byte(1);
                let ends_flow = matches!(c, Some(b',' | b'[' | b']' | b'{' | b'}'))
                    || (c == Some(b':')
                        && matches!(next, Some(b',' | b'?' | b'[' | b']' | b'{' | b'}')));
                if (c == Some(b':') && blank_or_end(self.text, self.pos + 1))
                    || (!block && ends_flow)
                {
                    return;
                }
                self.advance();
            }
            if self.byte(0).is_none() {
                return;
            }
            while matches!(self.byte(0), Some(b' ' | b'\t')) || self.at_break() {
                self.advance();
            }
            if block && self.col < indent {
                return;
            }
        }
    }

    /// A `|` or `>` scalar: its header line, then every line indented at least as far as
    /// its first non-empty one (or as its indentation indicator says), and the blank lines
    /// among them.
    fn block_scalar(&mut self) {
        let parent = self.blocks.last().map(|&(col, _)| col);
        self.advance();
        let mut increment = 0;
        while let Some(c @ (b'+' | b'-' | b'0'..=b'9')) = self.byte(0) {
            if c.is_ascii_digit() {
                increment = usize::from(c - b'0');
            }
            self.advance();
        }
        self.skip_line();
        self.advance();
        let mut indent = match (increment, parent) {
            (0, _) => 0,
            (n, Some(col)) => col + n,
            (n, None) => n,
        };
        let mut widest = 0;
        loop {
            while (indent == 0 || self.col < indent) && self.byte(0) == Some(b' ') {
                self.advance();
            }
            widest = widest.max(self.col);
            if !self.at_break() {
                break;
            }
            self.advance();
        }
        if indent == 0 {
            indent = widest.max(parent.map_or(1, |col| col + 1));
        }
        while self.col == indent && self.byte(0).is_some() {
            self.skip_line();
            loop {
                while self.col < indent && self.byte(0) == Some(b' ') {
                    self.advance();
                }
                if !self.at_break() {
                    break;
                }
                self.advance();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deepest the scan finds `text` nested.
    fn scanned(text: &str) -> usize {
        (0..)
            .find(|&limit| line_too_deep(text, limit).is_none())
            .unwrap()
    }

    /// The deepest the YAML parser nests `text`'s collections.
    fn parsed(text: &str) -> usize {
        fn depth(value: &serde_norway::Value) -> usize {
            use serde_norway::Value;
            match value {
                Value::Sequence(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
                Value::Mapping(map) => {
                    1 + map
                        .iter()
                        .map(|(k, v)| depth(k).max(depth(v)))
                        .max()
                        .unwrap_or(0)
                }
                Value::Tagged(tagged) => depth(&tagged.value),
                _ => 0,
            }
        }
        let value: serde_norway::Value = serde_norway::from_str(text)
            .unwrap_or_else(|e| panic!("not valid YAML ({e}):\n{text}"));
        depth(&value)
    }

    #[track_caller]
    fn assert_depth(text: &str, expected: usize) {
        assert_eq!(parsed(text), expected, "the parser's depth of:\n{text}");
        assert_eq!(scanned(text), expected, "the scan's depth of:\n{text}");
    }

    #[test]
    fn policies_nest_four_deep() {
        assert_depth(
            "mode: audit\nallow:\n  - cidr: 203.0.113.0/24\n    ports: [HTTPS:443, UDP:123]\n  - fqdn: mcr.microsoft.com\n    ports:\n      - HTTPS:443\ndns:\n  resolvers: [10.0.0.10]\n",
            4,
        );
        assert_depth(
            "presets: [{name: aks-global, location: eastus}]\ncluster_cidrs: [10.224.0.0/16]\n",
            3,
        );
        // The sequence of a key's values at the key's own column is a level of its own.
        assert_depth("allow:\n- cidr: 10.0.0.0/8\n  ports:\n  - TCP:1\n", 4);
    }

    #[test]
    fn flow_and_block_collections_add_up() {
        assert_depth("[[[[a]]]]", 4);
        assert_depth("{a: {b: [c, {d: e}]}}", 4);
        assert_depth("- - - - a\n", 4);
        assert_depth("a:\n  b:\n    c:\n      d: [[e]]\n", 6);
        assert_depth("? [a, [b]]\n: c\n", 3);
        assert_depth("[a]: b\n", 2);
        assert_depth("[[a]]: b\n", 3);
        assert_depth("&x a: !t [b, *x]\n", 2);
        assert_depth("a: [b,\n  [c,\n    [d]]]\ne: f\n", 4);
        assert_depth("- a\n- - b\n  - - c\n", 3);
        assert_depth("a:\n  - b\nc:\n  d: e\n", 2);
    }

    #[test]
    fn brackets_in_scalars_and_comments_do_not_count() {
        assert_depth("a: '[[[['\nb: \"{{[[\\\"[[\"\n", 1);
        assert_depth("a: 'it''s [[['\n", 1);
        assert_depth("a: \"two\n  [[[ lines\"\n", 1);
        assert_depth("a: b [[[ c # [[[\n# [[[\ne: x#[[\n", 1);
        assert_depth("a: |\n  [[[\n    {{{\n\n  - [\nb: >-\n   ]]\n", 1);
        assert_depth("- |2\n   [[[\n  [[\n- x\n", 1);
        assert_depth("[a'b, c\"d, [e]]\n", 2);
        assert_depth("a: b\n  'c [[\nd: e\n", 1);
    }

    /// Short texts made of YAML's syntax, from a fixed seed: wherever the parser accepts
    /// one, the scan finds it nested at least as deep.
    #[test]
    fn never_less_deep_than_the_parser() {
        const PIECES: [&str; 22] = [
            "[", "]", "{", "}", ",", ":", " ", "\n", "- ", "? ", "'", "\"", "#", "a", "|", ">",
            "  ", "&a ", "*a", "!t ", "\\", "\r",
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % bound as u64).unwrap()
        };
        let mut accepted = 0;
        for _ in 0..200_000 {
            let len = 1 + next(24);
            let text: String = (0..len).map(|_| PIECES[next(PIECES.len())]).collect();
            let Ok(value) = serde_norway::from_str::<serde_norway::Value>(&text) else {
                continue;
            };
            accepted += 1;
            let _ = value;
            assert!(scanned(&text) >= parsed(&text), "{text:?}");
        }
        assert!(accepted > 1000, "only {accepted} texts parsed");
    }

    #[test]
    fn every_line_break_counts() {
        assert_depth("a:\r\n  b: [c]\r\n", 3);
        assert_depth("a:\r  b: [c]\r", 3);
        assert_depth("a: 1\u{2028}b:\u{85}  - [c]\n", 3);
        assert_eq!(line_too_deep("a:\r\n  b:\r\n    c: [d]\r\n", 3), Some(3));
    }

    #[test]
    fn names_the_first_line_past_the_limit() {
        assert_eq!(line_too_deep("a: [[b]]\n", 3), None);
        assert_eq!(line_too_deep("a: [[b]]\n", 2), Some(1));
        assert_eq!(line_too_deep("a:\n  b:\n    - c\n", 2), Some(3));
        assert_eq!(line_too_deep("x: 1\n---\n[[[a]]]\n", 2), Some(3));
    }

    #[test]
    fn deep_nesting_is_found_without_reading_it_all() {
        let flow = format!(
            "allow: {}{}",
            "[".repeat(10_000_000),
            "]".repeat(10_000_000)
        );
        let started = std::time::Instant::now();
        assert_eq!(line_too_deep(&flow, 64), Some(1));
        let block: String = (0..100)
            .map(|i| format!("{}a{i}:\n", " ".repeat(i)))
            .collect();
        assert_eq!(line_too_deep(&block, 64), Some(65));
        let compact = format!("{}x\n", "- ".repeat(100));
        assert_eq!(line_too_deep(&compact, 64), Some(1));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}

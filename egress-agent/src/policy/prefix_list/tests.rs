use std::path::PathBuf;

use super::*;
use crate::compile::compile;
use crate::policy::{Policy, PolicyError, parse};

/// A directory of its own under the temp directory, removed on drop, holding a policy file
/// and its lists.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("prefix-list-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the directory");
        Dir(dir)
    }

    fn write(&self, name: &str, text: &str) -> &Self {
        std::fs::write(self.0.join(name), text).expect("write");
        self
    }

    /// `yaml` parsed as the file `policy.yaml` of this directory.
    fn parse(&self, yaml: &str) -> Result<Policy, PolicyError> {
        parse(yaml, &self.0.join("policy.yaml").display().to_string())
    }

    /// The error message of a refused `yaml`, with the directory written as `DIR`.
    fn refused(&self, yaml: &str) -> String {
        let error = self.parse(yaml).expect_err("refused").to_string();
        error.replace(&self.0.display().to_string(), "DIR")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn prefix(text: &str) -> Prefix {
    Prefix::of(&text.parse().expect("literal"))
}

#[test]
fn a_list_reads_ipv4_and_ipv6_with_comments_and_blank_lines() {
    let dir = Dir::new("read");
    dir.write(
        "ranges.txt",
        "\u{feff}# office ranges\n203.0.113.0/24\n\n  2001:db8::/48  # lab\r\n198.51.100.7\n",
    );
    let policy = dir
        .parse("allow:\n  - cidrs_from: ranges.txt\n    ports: [HTTPS:443]\n")
        .expect("valid");
    assert!(policy.rules.is_empty());
    let list = &policy.lists[0];
    assert_eq!(list.entry, 0);
    assert_eq!(list.name, "ranges.txt");
    assert_eq!(list.path, dir.0.join("ranges.txt"));
    assert_eq!(
        list.ports,
        crate::policy::syntax::parse_ports(&["HTTPS:443"]).expect("ports")
    );
    let mut expected = vec![
        prefix("203.0.113.0/24"),
        prefix("2001:db8::/48"),
        prefix("198.51.100.7/32"),
    ];
    expected.sort_unstable();
    assert_eq!(list.prefixes, expected);
    assert_eq!(
        list.prefixes
            .iter()
            .map(|p| p.net().to_string())
            .collect::<Vec<_>>(),
        ["2001:db8::/48", "203.0.113.0/24", "198.51.100.7/32"]
    );
}

#[test]
fn bad_lines_are_refused_with_the_file_the_line_and_the_entry() {
    let dir = Dir::new("bad");
    dir.write(
        "ranges.txt",
        "203.0.113.0/24\n203.0.113.5/24\n0.0.0.0/0\n::ffff:203.0.113.0/120\nnot-an-address\n",
    );
    assert_eq!(
        dir.refused("mode: enforce\nallow:\n  - cidr: 198.51.100.0/24\n  - cidrs_from: ranges.txt\n"),
        [
            "DIR/policy.yaml: line 4: allow[1] (cidrs_from ranges.txt): DIR/ranges.txt:2: `203.0.113.5/24`: host bits are set; did you mean 203.0.113.0/24?",
            "DIR/policy.yaml: line 4: allow[1] (cidrs_from ranges.txt): DIR/ranges.txt:3: `0.0.0.0/0`: allows every IPv4 destination; the enforcer would admit everything",
            "DIR/policy.yaml: line 4: allow[1] (cidrs_from ranges.txt): DIR/ranges.txt:4: `::ffff:203.0.113.0/120`: is an IPv4-mapped IPv6 range; write the IPv4 form instead: 203.0.113.0/24",
            "DIR/policy.yaml: line 4: allow[1] (cidrs_from ranges.txt): DIR/ranges.txt:5: `not-an-address`: not an IP address or CIDR",
        ]
        .join("\n")
    );
}

#[test]
fn a_missing_or_empty_list_is_refused() {
    let dir = Dir::new("missing");
    dir.write("empty.txt", "# nothing yet\n\n");
    let error = dir.refused("allow:\n  - cidrs_from: nowhere.txt\n");
    assert!(
        error.starts_with("DIR/policy.yaml: line 2: allow[0] (cidrs_from nowhere.txt): DIR/nowhere.txt: cannot read: No such file"),
        "{error}"
    );
    assert_eq!(
        dir.refused("allow:\n  - cidrs_from: empty.txt\n"),
        "DIR/policy.yaml: line 2: allow[0] (cidrs_from empty.txt): DIR/empty.txt: holds no prefix, so the entry would allow nothing; remove the entry or list a prefix"
    );
}

#[test]
fn repeats_within_a_list_across_lists_and_with_inline_entries_are_refused() {
    let dir = Dir::new("repeats");
    dir.write("a.txt", "203.0.113.0/24\n198.51.100.7\n203.0.113.0/24\n");
    assert_eq!(
        dir.refused("allow:\n  - cidrs_from: a.txt\n"),
        "DIR/policy.yaml: line 2: allow[0] (cidrs_from a.txt): DIR/a.txt:3: `203.0.113.0/24` repeats line 1"
    );
    dir.write("a.txt", "203.0.113.0/24\n198.51.100.7\n")
        .write("b.txt", "2001:db8::1\n198.51.100.7/32\n");
    assert_eq!(
        dir.refused(
            "allow:\n  - cidr: 203.0.113.0/24\n  - cidrs_from: a.txt\n  - cidrs_from: b.txt\n"
        ),
        [
            "DIR/policy.yaml: line 3: allow[1] (cidrs_from a.txt): repeats prefixes given elsewhere: 203.0.113.0/24 (also in allow[0]); give each prefix once",
            "DIR/policy.yaml: line 4: allow[2] (cidrs_from b.txt): repeats prefixes given elsewhere: 198.51.100.7/32 (also in allow[1] (cidrs_from a.txt)); give each prefix once",
        ]
        .join("\n")
    );
}

#[test]
fn an_entry_with_a_list_and_a_cidr_is_refused() {
    let dir = Dir::new("both");
    dir.write("a.txt", "203.0.113.0/24\n");
    assert_eq!(
        dir.refused("allow:\n  - cidrs_from: a.txt\n    cidr: 198.51.100.0/24\n"),
        "DIR/policy.yaml: line 2: allow[0] (cidrs_from a.txt): has `cidrs_from` and `cidr` or `fqdn`; split it into two entries"
    );
}

#[test]
fn lists_that_cover_a_whole_family_are_refused() {
    let dir = Dir::new("family");
    dir.write("halves.txt", "0.0.0.0/1\n128.0.0.0/1\n");
    assert_eq!(
        dir.refused("allow:\n  - cidrs_from: halves.txt\n"),
        "DIR/policy.yaml: line 2: allow[0] (cidrs_from halves.txt): together allow every IPv4 destination, as a /0 would; the enforcer would admit everything"
    );
}

#[test]
fn nested_prefixes_get_the_ports_of_their_containers_as_inline_ones_do() {
    let dir = Dir::new("nested");
    dir.write("hosts.txt", "203.0.113.7\n198.51.100.9\n");
    let listed = dir
        .parse("allow:\n  - cidr: 203.0.113.0/24\n    ports: [TCP:443]\n  - cidrs_from: hosts.txt\n    ports: [UDP:123]\n")
        .expect("valid");
    let inline = parse(
        "allow:\n  - cidr: 203.0.113.0/24\n    ports: [TCP:443]\n  - cidr: 203.0.113.7\n    ports: [UDP:123]\n  - cidr: 198.51.100.9\n    ports: [UDP:123]\n",
        "inline.yaml",
    )
    .expect("valid");
    let (listed, inline) = (
        compile(&listed).expect("compiles"),
        compile(&inline).expect("compiles"),
    );
    assert_eq!(listed.cidrs, inline.cidrs);
    assert_eq!(
        listed.port_sets.entries().collect::<Vec<_>>(),
        inline.port_sets.entries().collect::<Vec<_>>()
    );
}

#[test]
fn the_policy_hash_covers_each_list_by_name_in_the_policy_order() {
    let dir = Dir::new("hash");
    dir.write("a.txt", "203.0.113.0/24\n")
        .write("b.txt", "2001:db8::/48\n");
    let yaml = "allow:\n  - cidrs_from: b.txt\n  - cidrs_from: a.txt\n";
    let policy = dir.parse(yaml).expect("valid");
    // `{ cat policy.yaml; sha256sum b.txt a.txt; } | sha256sum`
    assert_eq!(
        sha256_hex(&policy_sha256(yaml.as_bytes(), &manifest(&policy.lists))),
        "37c934594a402fcfdac8ecba07e5f64e8d96aef81516ae80ba869d46f0c14a77"
    );
    // Without lists: `sha256sum policy.yaml`.
    assert_eq!(
        sha256_hex(&policy_sha256(yaml.as_bytes(), &manifest(&[]))),
        "2495070da5dcc02f1ce3425b2478162ece31f6f89499f653050b52c333b0ef2d"
    );
    dir.write("a.txt", "203.0.113.0/25\n");
    let edited = dir.parse(yaml).expect("valid");
    assert_ne!(manifest(&edited.lists), manifest(&policy.lists));
}

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv6Net;

use super::*;
use crate::kubeconfig::KubeletApiServer;

const EXAMPLE: &str = r#"
mode: audit
allow:
  - cidr: 203.0.113.0/24
    ports: [HTTPS:443, UDP:123]
  - cidr: 2001:db8::/32
  - fqdn: mcr.microsoft.com
    ports: [HTTPS:443]
  - fqdn: "*.hcp.eastus.azmk8s.io"
    ports: [HTTPS:443, TCP:9000, UDP:1194]
  - cidr: 198.51.100.7
    ports: [ICMP]
"#;

fn tcp(first: u16, last: u16) -> PortRange {
    PortRange {
        proto: Proto::Tcp,
        first,
        last,
    }
}

fn udp(first: u16, last: u16) -> PortRange {
    PortRange {
        proto: Proto::Udp,
        first,
        last,
    }
}

const ICMP: PortRange = PortRange {
    proto: Proto::Icmp,
    first: 0,
    last: 0,
};

/// Parses a policy with a single entry made of `entry` (YAML flow mapping content).
fn one(entry: &str) -> Result<Policy, PolicyError> {
    parse(&format!("allow:\n  - {{{entry}}}\n"), "policy.yaml")
}

fn ports_of(entry: &str) -> Ports {
    one(entry).expect("valid policy").rules[0].ports.clone()
}

/// Asserts that `result` failed with a message naming the file, `at` and `phrase`.
#[track_caller]
fn assert_error(result: Result<Policy, PolicyError>, at: &str, phrase: &str) {
    let message = result.expect_err("policy should be refused").to_string();
    assert!(message.starts_with("policy.yaml: "), "{message}");
    assert!(message.contains(at), "missing {at:?} in {message}");
    assert!(message.contains(phrase), "missing {phrase:?} in {message}");
    assert!(!message.contains('\n'), "not one line: {message}");
}

#[track_caller]
fn assert_entry_error(entry: &str, at: &str, phrase: &str) {
    assert_error(one(entry), at, phrase);
}

#[test]
fn example_parses() {
    let policy = parse(EXAMPLE, "policy.yaml").expect("valid policy");
    let net = |s: &str| Target::Cidr(s.parse().expect("valid net"));
    let name = |s: &str| Target::Name(NamePattern::Exact(s.to_string()));
    let zone = |s: &str| Target::Name(NamePattern::Wildcard(s.to_string()));
    let rule = |entry, target, ports| Rule {
        target,
        ports,
        origins: vec![Origin::Allow(entry)],
    };
    assert_eq!(
        policy,
        Policy {
            mode: Mode::Audit,
            rules: vec![
                rule(
                    0,
                    net("203.0.113.0/24"),
                    Ports::Some(vec![tcp(443, 443), udp(123, 123)])
                ),
                rule(1, net("2001:db8::/32"), Ports::All),
                rule(
                    2,
                    name("mcr.microsoft.com"),
                    Ports::Some(vec![tcp(443, 443)])
                ),
                rule(
                    3,
                    zone("hcp.eastus.azmk8s.io"),
                    Ports::Some(vec![tcp(443, 443), tcp(9000, 9000), udp(1194, 1194)])
                ),
                rule(4, net("198.51.100.7/32"), Ports::Some(vec![ICMP])),
            ],
            lists: vec![],
            notices: vec![],
            dns: DnsSettings::default(),
        }
    );
}

#[test]
fn rules_display_one_line_each() {
    let policy = parse(EXAMPLE, "policy.yaml").expect("valid policy");
    let lines: Vec<String> = policy.rules.iter().map(Rule::to_string).collect();
    assert_eq!(
        lines,
        [
            "203.0.113.0/24 TCP:443 UDP:123",
            "2001:db8::/32 any",
            "mcr.microsoft.com TCP:443",
            "*.hcp.eastus.azmk8s.io TCP:443 TCP:9000 UDP:1194",
            "198.51.100.7/32 ICMP",
        ]
    );
    let range = one("cidr: 10.0.0.0/8, ports: [TCP:30000-32767]").expect("valid policy");
    assert_eq!(range.rules[0].to_string(), "10.0.0.0/8 TCP:30000-32767");
}

#[test]
fn mode_defaults_to_audit_and_accepts_enforce() {
    let policy = parse("allow: [{cidr: 10.0.0.0/8}]", "policy.yaml").expect("valid policy");
    assert_eq!(policy.mode, Mode::Audit);
    let policy =
        parse("mode: enforce\nallow: [{cidr: 10.0.0.0/8}]", "policy.yaml").expect("valid policy");
    assert_eq!(policy.mode, Mode::Enforce);
}

#[test]
fn mode_from_str_and_display() {
    assert_eq!("audit".parse(), Ok(Mode::Audit));
    assert_eq!("enforce".parse(), Ok(Mode::Enforce));
    assert_eq!(Mode::Audit.to_string(), "audit");
    assert_eq!(Mode::Enforce.to_string(), "enforce");
    let message = "block".parse::<Mode>().expect_err("not a mode");
    assert!(message.contains("`audit` or `enforce`"), "{message}");
}

#[test]
fn ports_are_sorted_and_merged() {
    assert_eq!(
        ports_of("cidr: 10.0.0.0/8, ports: [UDP:53, TCP:81, ICMP, TCP:80, TCP:82-90, TCP:1-5]"),
        Ports::Some(vec![tcp(1, 5), tcp(80, 90), udp(53, 53), ICMP])
    );
}

#[test]
fn http_and_https_are_tcp() {
    assert_eq!(
        ports_of("cidr: 10.0.0.0/8, ports: [HTTP:80, HTTPS:8443]"),
        Ports::Some(vec![tcp(80, 80), tcp(8443, 8443)])
    );
}

#[test]
fn protocols_are_case_insensitive() {
    assert_eq!(
        ports_of("cidr: 10.0.0.0/8, ports: [https:443, Tcp:80, uDp:53, icmp]"),
        Ports::Some(vec![tcp(80, 80), tcp(443, 443), udp(53, 53), ICMP])
    );
}

#[test]
fn bare_addresses_are_single_hosts() {
    let policy = parse(
        "allow: [{cidr: 198.51.100.7}, {cidr: '2001:db8::1'}]",
        "policy.yaml",
    )
    .expect("valid policy");
    assert_eq!(policy.rules[0].target.to_string(), "198.51.100.7/32");
    assert_eq!(policy.rules[1].target.to_string(), "2001:db8::1/128");
}

#[test]
fn names_are_normalised() {
    let policy = parse(
        "allow: [{fqdn: MCR.Microsoft.COM.}, {fqdn: '*.Example.com'}, {fqdn: _sip._udp.example.com}]",
        "policy.yaml",
    )
    .expect("valid policy");
    let targets: Vec<String> = policy.rules.iter().map(|r| r.target.to_string()).collect();
    assert_eq!(
        targets,
        [
            "mcr.microsoft.com",
            "*.example.com",
            "_sip._udp.example.com"
        ]
    );
}

#[test]
fn name_pattern_matches() {
    let exact = NamePattern::Exact("mcr.microsoft.com".to_string());
    let zone = NamePattern::Wildcard("hcp.eastus.azmk8s.io".to_string());
    let table = [
        (&exact, "mcr.microsoft.com", true),
        (&exact, "MCR.Microsoft.Com", true),
        (&exact, "mcr.microsoft.com.", true),
        (&exact, "x.mcr.microsoft.com", false),
        (&exact, "microsoft.com", false),
        (&zone, "a.hcp.eastus.azmk8s.io", true),
        (&zone, "a.b.hcp.eastus.azmk8s.io", true),
        (&zone, "A.HCP.EastUS.azmk8s.io", true),
        (&zone, "a.hcp.eastus.azmk8s.io.", true),
        (&zone, "hcp.eastus.azmk8s.io", false),
        (&zone, "hcp.eastus.azmk8s.io.", false),
        (&zone, "xhcp.eastus.azmk8s.io", false),
        (&zone, ".hcp.eastus.azmk8s.io", false),
        (&zone, "a.hcp.eastus.azmk8s.io.evil", false),
        (&zone, "ä.hcp.eastus.azmk8s.io", true),
        (&zone, "", false),
    ];
    for (pattern, name, expected) in table {
        assert_eq!(pattern.matches(name), expected, "{pattern} vs {name:?}");
    }
}

#[test]
fn ports_union() {
    let a = Ports::Some(vec![tcp(80, 80), udp(53, 53)]);
    let b = Ports::Some(vec![tcp(81, 90), tcp(443, 443), ICMP]);
    assert_eq!(
        a.union(&b),
        Ports::Some(vec![tcp(80, 90), tcp(443, 443), udp(53, 53), ICMP])
    );
    assert_eq!(a.union(&a), a);
    assert_eq!(a.union(&Ports::All), Ports::All);
    assert_eq!(Ports::All.union(&b), Ports::All);
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let path = std::env::temp_dir().join(format!("policy-test-{}.yaml", std::process::id()));
    std::fs::write(&path, EXAMPLE).expect("write temp file");
    let loaded = load(&path, None);
    std::fs::remove_file(&path).expect("remove temp file");
    assert_eq!(loaded.expect("valid policy").rules.len(), 5);

    let message = load(&path, None).expect_err("file is gone").to_string();
    assert!(
        message.starts_with(&path.display().to_string()),
        "{message}"
    );
    assert!(message.contains("cannot read"), "{message}");
}

/// A file in the temp directory, removed on drop.
struct TempPath(std::path::PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!("policy-test-{}-{name}", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn read_takes_a_file_up_to_the_limit_and_no_more() {
    let file = TempPath::new("limit.yaml");
    let f = std::fs::File::create(&file.0).expect("create temp file");
    f.set_len(MAX_FILE_BYTES).expect("size it");
    assert_eq!(
        read(&file.0).expect("at the limit").len() as u64,
        MAX_FILE_BYTES
    );
    f.set_len(MAX_FILE_BYTES + 1).expect("size it");
    let message = read(&file.0).expect_err("past the limit").to_string();
    assert_eq!(
        message,
        format!(
            "{}: larger than 64 MiB, the most a policy file may hold",
            file.0.display()
        )
    );
}

#[test]
fn the_largest_benchmark_policy_fits_with_ports() {
    // As `benches/run.sh` writes it (`egress-bench addresses 1000000`), with a `ports`
    // list on every entry.
    let mut len = "mode: enforce\nallow:\n".len();
    for i in 0..1_000_000u32 {
        len += format!("  - cidr: 2001:db8:{:x}:{:x}::1\n", i >> 16, i & 0xffff).len();
        len += "    ports: [HTTPS:443]\n".len();
    }
    assert!(len as u64 <= MAX_FILE_BYTES, "{len} bytes");
}

#[test]
fn read_stops_at_the_limit_on_files_that_never_end() {
    let message = load(Path::new("/dev/zero"), None)
        .expect_err("endless")
        .to_string();
    assert!(
        message.starts_with("/dev/zero: larger than 64 MiB"),
        "{message}"
    );

    let fifo = TempPath::new("fifo.yaml");
    let c_path = std::ffi::CString::new(fifo.0.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let path = fifo.0.clone();
    // Writes until the reader closes its end (EPIPE; Rust ignores SIGPIPE).
    let writer = std::thread::spawn(move || {
        let mut pipe = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let line = b"# a policy that never ends\n".repeat(1024);
        while std::io::Write::write_all(&mut pipe, &line).is_ok() {}
    });
    let message = load(&fifo.0, None).expect_err("endless").to_string();
    assert!(message.contains("larger than 64 MiB"), "{message}");
    writer.join().unwrap();
}

#[test]
fn a_byte_order_mark_is_ignored() {
    let file = TempPath::new("bom.yaml");
    std::fs::write(&file.0, format!("\u{feff}{EXAMPLE}")).expect("write temp file");
    assert_eq!(
        load(&file.0, None).expect("valid policy"),
        parse(EXAMPLE, "x").unwrap()
    );
    assert_error(
        parse(
            "\u{feff}mode: audit\nallow: [{cidr: 10.0.0.1/8}]\n",
            "policy.yaml",
        ),
        "allow[0] (cidr 10.0.0.1/8)",
        "host bits are set",
    );
}

#[test]
fn text_that_is_not_utf8_is_refused() {
    assert_error(
        parse_bytes(
            b"allow:\n  - cidr: 10.0.0.0/8 # caf\xe9\n",
            "policy.yaml",
            None,
        ),
        "cannot read",
        "invalid utf-8",
    );
}

#[test]
fn deep_nesting_is_refused_before_the_yaml_parser_sees_it() {
    let started = std::time::Instant::now();
    let flow = format!(
        "mode: audit\nallow: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_error(
        parse(&flow, "policy.yaml"),
        "line 2",
        "collections nested more than 64 levels deep; a policy needs four",
    );
    let compact = format!("allow:\n{}x\n", "  - ".repeat(100_000));
    assert_error(
        parse(&compact, "policy.yaml"),
        "line 2",
        "more than 64 levels",
    );
    let indented: String = (0..100)
        .map(|i| format!("{}a{i}:\n", " ".repeat(i)))
        .collect();
    assert_error(
        parse(&indented, "policy.yaml"),
        "line 65",
        "more than 64 levels",
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // 64 levels are still parsed, and refused for what they hold.
    let deepest = format!("allow: {}{}\n", "[".repeat(63), "]".repeat(63));
    assert_error(parse(&deepest, "policy.yaml"), "allow[0]", "invalid type");
}

// Error paths: one test each.

#[test]
fn yaml_syntax_error_has_line_and_column() {
    assert_error(
        parse("mode: audit\nallow: [\n", "policy.yaml"),
        "line 3 column 1",
        "did not find expected node content",
    );
}

#[test]
fn unknown_top_level_key() {
    assert_error(
        parse("allow: [{cidr: 10.0.0.0/8}]\nallowed: []\n", "policy.yaml"),
        "policy.yaml: line 2: allowed: ",
        "unknown key; expected `mode`, `allow`, `presets`, `api_server`, `cluster_cidrs` or `dns`",
    );
}

#[test]
fn unknown_entry_key() {
    assert_error(
        parse(
            "allow:\n  - cidr: 10.0.0.0/8\n  - fqdn: example.com\n    port: [TCP:443]\n",
            "policy.yaml",
        ),
        "allow[1]",
        "unknown field `port`",
    );
}

#[test]
fn top_level_not_a_mapping() {
    assert_error(
        parse("- cidr: 10.0.0.0/8\n", "policy.yaml"),
        "policy.yaml",
        "expected a mapping with `mode`, `allow`, `presets`, `api_server`, `cluster_cidrs` and `dns`",
    );
}

#[test]
fn missing_allow() {
    assert_error(parse("mode: enforce\n", "policy.yaml"), "allow", "missing");
    assert_error(parse("", "policy.yaml"), "allow", "missing");
}

#[test]
fn empty_allow() {
    assert_error(
        parse("allow: []\n", "policy.yaml"),
        "allow",
        "all egress would be dropped",
    );
}

#[test]
fn unknown_mode() {
    assert_error(
        parse("mode: block\nallow: [{cidr: 10.0.0.0/8}]", "policy.yaml"),
        "mode",
        "unknown mode `block`; expected `audit` or `enforce`",
    );
}

#[test]
fn both_cidr_and_fqdn() {
    assert_entry_error(
        "cidr: 10.0.0.0/8, fqdn: example.com",
        "allow[0]",
        "has both `cidr` and `fqdn`",
    );
}

#[test]
fn neither_cidr_nor_fqdn() {
    assert_entry_error(
        "ports: [TCP:443]",
        "allow[0]",
        "needs a `cidr` or an `fqdn`",
    );
    assert_error(
        parse("allow:\n  -\n", "policy.yaml"),
        "allow[0]",
        "needs a `cidr` or an `fqdn`",
    );
}

#[test]
fn cidr_unparsable() {
    assert_entry_error(
        "cidr: example.com",
        "allow[0] (cidr example.com)",
        "not an IP address or CIDR",
    );
    assert_entry_error(
        "cidr: 10.0.0/8",
        "allow[0] (cidr 10.0.0/8)",
        "`10.0.0` is not an IP address",
    );
    assert_entry_error(
        "cidr: 10.0.0.0/x",
        "allow[0] (cidr 10.0.0.0/x)",
        "`/x` is not a prefix length",
    );
}

#[test]
fn cidr_prefix_too_long() {
    assert_entry_error(
        "cidr: 10.0.0.0/33",
        "allow[0] (cidr 10.0.0.0/33)",
        "prefix /33 is longer than the 32 bits",
    );
    assert_entry_error(
        "cidr: '2001:db8::/129'",
        "allow[0] (cidr 2001:db8::/129)",
        "prefix /129 is longer than the 128 bits",
    );
    assert_entry_error(
        "cidr: 10.0.0.0/300",
        "allow[0] (cidr 10.0.0.0/300)",
        "prefix /300 is longer",
    );
}

#[test]
fn cidr_host_bits_set() {
    assert_error(
        parse(
            "allow:\n  - fqdn: a.example\n  - fqdn: b.example\n  - cidr: 203.0.113.5/24\n",
            "policy.yaml",
        ),
        "allow[2] (cidr 203.0.113.5/24)",
        "host bits are set; did you mean 203.0.113.0/24?",
    );
    assert_entry_error(
        "cidr: '2001:db8::1/32'",
        "allow[0] (cidr 2001:db8::1/32)",
        "did you mean 2001:db8::/32?",
    );
}

#[test]
fn cidr_ipv4_mapped() {
    assert_entry_error(
        "cidr: '::ffff:0:0/96'",
        "allow[0] (cidr ::ffff:0:0/96)",
        "contains the IPv4-mapped range ::ffff:0.0.0.0/96, so it would also allow every IPv4 destination",
    );
    assert_entry_error(
        "cidr: '::ffff:192.0.2.0/120'",
        "allow[0] (cidr ::ffff:192.0.2.0/120)",
        "is an IPv4-mapped IPv6 range; write the IPv4 form instead: 192.0.2.0/24",
    );
    assert_entry_error(
        "cidr: '::ffff:192.0.2.7'",
        "allow[0] (cidr ::ffff:192.0.2.7)",
        "write the IPv4 form instead: 192.0.2.7/32",
    );
    assert_entry_error(
        "cidr: '::ffff:192.0.2.7/100'",
        "allow[0]",
        "write the IPv4 form instead: 192.0.0.0/4",
    );
}

#[test]
fn cidr_containing_ipv4_mapped_range() {
    for cidr in ["::/80", "::/8", "::ffff:0:0/88", "::1/64"] {
        assert_entry_error(
            &format!("cidr: '{cidr}'"),
            &format!("allow[0] (cidr {cidr})"),
            "so it would also allow every IPv4 destination",
        );
    }
    assert!(one("cidr: '::/97'").is_ok());
    assert!(one("cidr: '64:ff9b::/96'").is_ok());
}

#[test]
fn cidr_everything() {
    assert_entry_error(
        "cidr: 0.0.0.0/0",
        "allow[0] (cidr 0.0.0.0/0)",
        "allows every IPv4 destination; the enforcer would admit everything",
    );
    assert_entry_error(
        "cidr: 10.1.2.3/0",
        "allow[0] (cidr 10.1.2.3/0)",
        "allows every IPv4 destination",
    );
    assert_entry_error(
        "cidr: '::/0'",
        "allow[0] (cidr ::/0)",
        "allows every IPv6 destination; the enforcer would admit everything",
    );
}

/// A policy allowing each of `cidrs`, every port.
fn allowing(cidrs: &[String]) -> String {
    let entries: Vec<String> = cidrs.iter().map(|c| format!("  - cidr: '{c}'\n")).collect();
    format!("allow:\n{}", entries.concat())
}

/// Asserts that a policy allowing `cidrs` is refused with `at` and `phrase`, and that one
/// without the first of them, which leaves a gap, is not.
#[track_caller]
fn assert_covering(cidrs: &[String], at: &str, phrase: &str) {
    assert_error(parse(&allowing(cidrs), "policy.yaml"), at, phrase);
    parse(&allowing(&cidrs[1..]), "policy.yaml").expect("a gap where the first was");
}

#[test]
fn cidrs_that_together_allow_every_ipv4_destination() {
    // Ports do not matter, as for `0.0.0.0/0`.
    assert_error(
        parse(
            "allow:\n  - cidr: 0.0.0.0/1\n  - cidr: 128.0.0.0/1\n    ports: [HTTPS:443]\n",
            "policy.yaml",
        ),
        "allow[0] (0.0.0.0/1), allow[1] (128.0.0.0/1): ",
        "together allow every IPv4 destination, as a /0 would; the enforcer would admit everything",
    );
    // Only the widest rules are named, whatever part of the policy they come from.
    assert_error(
        parse(
            "allow:\n  - cidr: 10.0.0.0/8\n  - cidr: 128.0.0.0/1\n  - cidr: 0.0.0.0/1\ncluster_cidrs: [128.0.0.0/1, 10.0.0.0/16]\n",
            "policy.yaml",
        ),
        "policy.yaml: line 4: allow[2] (0.0.0.0/1), allow[1] and cluster_cidrs[0] (128.0.0.0/1): ",
        "every IPv4 destination",
    );
    let mut cidrs: Vec<String> = (0..255).map(|n| format!("{n}.0.0.0/8")).collect();
    parse(&allowing(&cidrs), "policy.yaml").expect("255.0.0.0/8 is left");
    cidrs.extend(["255.0.0.0/9".into(), "255.128.0.0/9".into()]);
    assert_covering(
        &cidrs,
        "allow[0] (0.0.0.0/8), allow[1] (1.0.0.0/8), allow[2] (2.0.0.0/8), allow[3] (3.0.0.0/8), allow[4] (4.0.0.0/8), allow[5] (5.0.0.0/8), allow[6] (6.0.0.0/8), allow[7] (7.0.0.0/8), and 249 more: ",
        "every IPv4 destination",
    );
}

#[test]
fn cidrs_that_together_allow_every_ipv6_destination() {
    // IPv6 rules cannot hold the IPv4-mapped range: all around it is all of IPv6.
    let mapped = u128::from(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped());
    let cidrs: Vec<String> = (0..96u8)
        .map(|bits| {
            let flipped = mapped ^ (1 << (127 - bits));
            let net = Ipv6Net::new_assert(flipped.into(), bits + 1).trunc();
            net.to_string()
        })
        .collect();
    assert_covering(
        &cidrs,
        "policy.yaml: line 82: allow[80] (::/81), allow[81] (::8000:0:0/82), ",
        "allow[87] (::fe00:0:0/88), and 88 more: together allow every IPv6 destination",
    );
}

#[test]
fn fqdn_empty() {
    assert_entry_error("fqdn: ''", "allow[0] (fqdn )", "the name is empty");
    assert_entry_error("fqdn: '.'", "allow[0] (fqdn .)", "the name is empty");
}

#[test]
fn fqdn_too_long() {
    let name = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(62),
    ]
    .join(".");
    assert_eq!(name.len(), 254);
    assert_entry_error(
        &format!("fqdn: {name}"),
        "allow[0] (fqdn aaa",
        "the name is 254 characters long; DNS allows at most 253",
    );
    let fits = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61),
    ]
    .join(".");
    assert!(one(&format!("fqdn: {fits}.")).is_ok());
}

#[test]
fn fqdn_empty_label() {
    assert_entry_error(
        "fqdn: a..example.com",
        "allow[0] (fqdn a..example.com)",
        "empty label",
    );
    assert_entry_error("fqdn: .example.com", "allow[0]", "empty label");
}

#[test]
fn fqdn_label_too_long() {
    let label = "x".repeat(64);
    assert_entry_error(
        &format!("fqdn: {label}.example.com"),
        "allow[0] (fqdn xxx",
        "is 64 characters long; DNS allows at most 63",
    );
}

#[test]
fn fqdn_bad_character() {
    assert_entry_error(
        "fqdn: 'exa mple.com'",
        "allow[0] (fqdn exa mple.com)",
        "character ` ` is not allowed",
    );
    assert_entry_error("fqdn: bücher.example", "allow[0]", "xn--");
    assert_entry_error(
        "fqdn: 'https://example.com'",
        "allow[0]",
        "character `:` is not allowed",
    );
}

#[test]
fn fqdn_hyphen_at_label_edge() {
    assert_entry_error(
        "fqdn: -a.example.com",
        "allow[0] (fqdn -a.example.com)",
        "label `-a` starts or ends with `-`",
    );
    assert_entry_error(
        "fqdn: a.example-.com",
        "allow[0]",
        "label `example-` starts or ends with `-`",
    );
}

#[test]
fn fqdn_misplaced_star() {
    for name in [
        "a.*.example.com",
        "*a.example.com",
        "**.example.com",
        "*.*.example.com",
        "example.*",
    ] {
        assert_entry_error(
            &format!("fqdn: '{name}'"),
            &format!("allow[0] (fqdn {name})"),
            "`*` is only allowed as the whole first label",
        );
    }
}

#[test]
fn fqdn_star_alone() {
    assert_entry_error(
        "fqdn: '*'",
        "allow[0] (fqdn *)",
        "`*` alone would match every name",
    );
    assert_entry_error(
        "fqdn: '*.'",
        "allow[0] (fqdn *.)",
        "`*` alone would match every name",
    );
}

#[test]
fn fqdn_star_without_zone() {
    assert_entry_error("fqdn: '*..'", "allow[0] (fqdn *..)", "`*.` needs a zone");
}

#[test]
fn fqdn_ip_literal() {
    assert_entry_error(
        "fqdn: 203.0.113.7",
        "allow[0] (fqdn 203.0.113.7)",
        "write it as `cidr: 203.0.113.7`",
    );
    assert_entry_error("fqdn: '2001:db8::1'", "allow[0]", "`cidr: 2001:db8::1`");
}

#[test]
fn ports_empty() {
    assert_entry_error(
        "cidr: 10.0.0.0/8, ports: []",
        "allow[0] (cidr 10.0.0.0/8)",
        "`ports` is empty; omit `ports` to allow every port",
    );
    assert_error(
        parse("allow:\n  - cidr: 10.0.0.0/8\n    ports:\n", "policy.yaml"),
        "allow[0] (cidr 10.0.0.0/8)",
        "`ports` is empty",
    );
}

#[test]
fn ports_unknown_protocol() {
    assert_entry_error(
        "fqdn: example.com, ports: [SCTP:9]",
        "allow[0] (fqdn example.com)",
        "unknown protocol in `SCTP:9`",
    );
}

#[test]
fn ports_without_protocol() {
    assert_entry_error(
        "fqdn: example.com, ports: [443]",
        "allow[0] (fqdn example.com)",
        "port `443` has no protocol; write TCP:443 or UDP:443",
    );
}

#[test]
fn ports_without_port() {
    assert_entry_error(
        "fqdn: example.com, ports: [TCP]",
        "allow[0] (fqdn example.com)",
        "`TCP` has no port",
    );
}

#[test]
fn ports_not_a_number() {
    assert_entry_error(
        "fqdn: example.com, ports: [TCP:https]",
        "allow[0] (fqdn example.com)",
        "`TCP:https`: `https` is not a port number",
    );
    assert_entry_error(
        "fqdn: example.com, ports: ['TCP:']",
        "allow[0]",
        "is not a port number",
    );
    assert_entry_error(
        "fqdn: example.com, ports: [TCP:+80]",
        "allow[0]",
        "is not a port number",
    );
}

#[test]
fn ports_zero() {
    assert_entry_error(
        "fqdn: example.com, ports: [UDP:0]",
        "allow[0] (fqdn example.com)",
        "port 0 is not a valid port",
    );
}

#[test]
fn ports_too_large() {
    assert_entry_error(
        "fqdn: example.com, ports: [TCP:65536]",
        "allow[0] (fqdn example.com)",
        "port 65536 is above 65535",
    );
    assert_entry_error(
        "fqdn: example.com, ports: [TCP:1-99999999999999999999999]",
        "allow[0]",
        "is above 65535",
    );
}

#[test]
fn ports_reversed_range() {
    assert_entry_error(
        "fqdn: example.com, ports: [TCP:2000-1000]",
        "allow[0] (fqdn example.com)",
        "`TCP:2000-1000`: the range starts after it ends",
    );
}

#[test]
fn ports_icmp_with_port() {
    assert_entry_error(
        "cidr: 10.0.0.0/8, ports: [ICMP:5]",
        "allow[0] (cidr 10.0.0.0/8)",
        "`ICMP:5`: ICMP has no ports",
    );
}

#[test]
fn ports_duplicate() {
    assert_entry_error(
        "fqdn: example.com, ports: [TCP:443, UDP:53, TCP:443]",
        "allow[0] (fqdn example.com)",
        "ports `TCP:443` and `TCP:443` overlap",
    );
    assert_entry_error(
        "fqdn: example.com, ports: [HTTPS:443, TCP:443]",
        "allow[0]",
        "ports `HTTPS:443` and `TCP:443` overlap",
    );
    assert_entry_error(
        "cidr: 10.0.0.0/8, ports: [ICMP, icmp]",
        "allow[0]",
        "ports `ICMP` and `icmp` overlap",
    );
}

#[test]
fn ports_overlapping_ranges() {
    assert_entry_error(
        "fqdn: example.com, ports: [TCP:30000-32767, UDP:31000, TCP:32000-40000]",
        "allow[0] (fqdn example.com)",
        "ports `TCP:30000-32767` and `TCP:32000-40000` overlap",
    );
    assert_entry_error(
        "fqdn: example.com, ports: [TCP:8080, TCP:8000-9000]",
        "allow[0]",
        "ports `TCP:8080` and `TCP:8000-9000` overlap",
    );
}

#[test]
fn duplicate_cidr() {
    assert_error(
        parse(
            "allow:\n  - cidr: 203.0.113.0/24\n  - fqdn: a.example\n  - cidr: 198.51.100.7\n  - cidr: 203.0.113.0/24\n",
            "policy.yaml",
        ),
        "allow[3] (cidr 203.0.113.0/24)",
        "repeats allow[0] (203.0.113.0/24); merge their ports into one entry",
    );
    assert_error(
        parse(
            "allow: [{cidr: 198.51.100.7}, {cidr: 198.51.100.7/32}]",
            "policy.yaml",
        ),
        "allow[1] (cidr 198.51.100.7/32)",
        "repeats allow[0]",
    );
}

#[test]
fn duplicate_name() {
    assert_error(
        parse(
            "allow: [{fqdn: mcr.microsoft.com}, {fqdn: MCR.microsoft.com.}]",
            "policy.yaml",
        ),
        "allow[1] (fqdn MCR.microsoft.com.)",
        "repeats allow[0] (mcr.microsoft.com)",
    );
    assert_error(
        parse(
            "allow: [{fqdn: '*.Example.com'}, {fqdn: '*.example.com.'}]",
            "policy.yaml",
        ),
        "allow[1] (fqdn *.example.com.)",
        "repeats allow[0] (*.example.com)",
    );
}

#[test]
fn contradictory_entries() {
    assert_error(
        parse(
            "allow:\n  - fqdn: example.com\n    ports: [TCP:443]\n  - fqdn: example.com\n",
            "policy.yaml",
        ),
        "allow[1] (fqdn example.com)",
        "repeats allow[0]",
    );
}

#[test]
fn exact_name_and_wildcard_of_it_are_distinct() {
    assert!(
        parse(
            "allow: [{fqdn: example.com}, {fqdn: '*.example.com'}]",
            "policy.yaml"
        )
        .is_ok()
    );
}

// The `dns` section.

/// Parses a policy with one allow entry and `dns` given as a YAML flow mapping's content.
fn with_dns(dns: &str) -> Result<Policy, PolicyError> {
    parse(
        &format!("allow: [{{cidr: 10.0.0.0/8}}]\ndns: {{{dns}}}\n"),
        "policy.yaml",
    )
}

#[test]
fn dns_defaults() {
    let policy = parse("allow: [{cidr: 10.0.0.0/8}]", "policy.yaml").expect("valid policy");
    let defaults = DnsSettings {
        resolvers: None,
        min_ttl: 30,
        max_ttl: 86_400,
        max_ips_per_name: 64,
        max_ips: 65_536,
    };
    assert_eq!(policy.dns, defaults);
    assert_eq!(with_dns("").expect("valid policy").dns, defaults);
    let bare = parse("allow: [{cidr: 10.0.0.0/8}]\ndns:\n", "policy.yaml");
    assert_eq!(bare.expect("valid policy").dns, defaults);
}

#[test]
fn dns_section_parses() {
    let policy = parse(
        "allow: [{cidr: 10.0.0.0/8}]\ndns:\n  resolvers: [10.0.0.10, 168.63.129.16, 'fd00::53']\n  min_ttl: 0\n  max_ttl: 3600\n  max_ips_per_name: 8\n  max_ips: 1024\n",
        "policy.yaml",
    )
    .expect("valid policy");
    let addr = |s: &str| s.parse::<IpAddr>().expect("literal");
    assert_eq!(
        policy.dns,
        DnsSettings {
            resolvers: Some(vec![
                addr("10.0.0.10"),
                addr("168.63.129.16"),
                addr("fd00::53")
            ]),
            min_ttl: 0,
            max_ttl: 3600,
            max_ips_per_name: 8,
            max_ips: 1024,
        }
    );
}

#[test]
fn dns_unknown_key() {
    assert_error(
        with_dns("resolver: [10.0.0.10]"),
        "dns",
        "unknown field `resolver`, expected one of `resolvers`",
    );
}

#[test]
fn dns_numbers_must_be_numbers() {
    assert_error(with_dns("min_ttl: -1"), "dns.min_ttl", "expected u32");
    assert_error(with_dns("max_ttl: 1d"), "dns.max_ttl", "expected u32");
    assert_error(
        parse(
            "allow: [{cidr: 10.0.0.0/8}]\ndns:\n  max_ips:\n",
            "policy.yaml",
        ),
        "dns.max_ips",
        "expected u32",
    );
}

#[test]
fn dns_resolvers_empty() {
    assert_error(
        with_dns("resolvers: []"),
        "dns.resolvers",
        "is empty, so no DNS answer would be trusted; omit it to use the node's nameservers",
    );
    assert_error(
        parse(
            "allow: [{cidr: 10.0.0.0/8}]\ndns:\n  resolvers:\n",
            "policy.yaml",
        ),
        "dns.resolvers",
        "is empty",
    );
}

#[test]
fn dns_resolver_unparsable() {
    assert_error(
        with_dns("resolvers: [10.0.0.10, 10.0.0.300]"),
        "dns.resolvers[1] (10.0.0.300)",
        "`10.0.0.300` is not an IP address",
    );
    assert_error(
        with_dns("resolvers: [10.0.0.0/8]"),
        "dns.resolvers[0]",
        "is not an IP address",
    );
}

#[test]
fn dns_resolver_duplicate() {
    assert_error(
        with_dns("resolvers: [10.0.0.10, 168.63.129.16, 10.0.0.10]"),
        "dns.resolvers[2] (10.0.0.10)",
        "repeats dns.resolvers[0]",
    );
    assert_error(
        with_dns("resolvers: ['fd00::53', 'FD00:0::53']"),
        "dns.resolvers[1]",
        "repeats dns.resolvers[0]",
    );
}

#[test]
fn dns_resolver_loopback_is_never_trusted() {
    for addr in ["127.0.0.53", "127.0.0.1", "127.255.0.1", "'::1'"] {
        assert_error(
            with_dns(&format!("resolvers: [{addr}]")),
            "dns.resolvers[0]",
            "is a loopback address, which can never be trusted: a pod can answer itself on its own loopback",
        );
    }
}

#[test]
fn dns_resolver_not_a_single_server() {
    let table = [
        ("0.0.0.0", "is the unspecified address"),
        ("'::'", "is the unspecified address"),
        ("224.0.0.251", "is a multicast or broadcast address"),
        ("'ff02::fb'", "is a multicast or broadcast address"),
        ("255.255.255.255", "is a multicast or broadcast address"),
        (
            "'::ffff:10.0.0.10'",
            "is an IPv4-mapped IPv6 address; write the IPv4 form instead: 10.0.0.10",
        ),
        ("'::ffff:127.0.0.53'", "write the IPv4 form instead"),
    ];
    for (addr, phrase) in table {
        assert_error(
            with_dns(&format!("resolvers: [{addr}]")),
            "dns.resolvers[0]",
            phrase,
        );
    }
}

#[test]
fn dns_ttl_bounds() {
    assert_error(
        with_dns("min_ttl: 600, max_ttl: 300"),
        "dns.min_ttl",
        "600 is above dns.max_ttl (300)",
    );
    assert_error(
        with_dns("max_ttl: 10"),
        "dns.min_ttl",
        "30 is above dns.max_ttl (10)",
    );
    assert_error(
        with_dns("min_ttl: 0, max_ttl: 0"),
        "dns.max_ttl",
        "is 0, so no learned address would stay allowed",
    );
    let equal = with_dns("min_ttl: 300, max_ttl: 300").expect("valid policy");
    assert_eq!((equal.dns.min_ttl, equal.dns.max_ttl), (300, 300));
}

#[test]
fn dns_ip_limits() {
    assert_error(
        with_dns("max_ips: 0"),
        "dns.max_ips",
        "is 0, so no address could be learned",
    );
    assert_error(
        with_dns("max_ips: 1048577"),
        "dns.max_ips",
        "1048577 is above 1048576, the most the kernel map of learned addresses is made for",
    );
    assert_error(
        with_dns("max_ips_per_name: 0"),
        "dns.max_ips_per_name",
        "is 0, so no name could get an address",
    );
    assert_error(
        with_dns("max_ips: 32"),
        "dns.max_ips_per_name",
        "64 is above dns.max_ips (32)",
    );
    let full = with_dns("max_ips: 1048576, max_ips_per_name: 65536").expect("valid policy");
    assert_eq!(full.dns.max_ips, 1 << 20);
}

// Presets, `api_server` and `cluster_cidrs`.

fn lines(policy: &Policy) -> Vec<String> {
    rule_lines(&policy.rules)
}

fn rule_for<'a>(policy: &'a Policy, target: &str) -> &'a Rule {
    policy
        .rules
        .iter()
        .find(|r| r.target.to_string() == target)
        .unwrap_or_else(|| panic!("no rule for {target}"))
}

#[test]
fn presets_alone_make_a_policy() {
    let policy = parse(
        "mode: enforce\npresets:\n  - name: aks-global\n    location: eastus\n",
        "policy.yaml",
    )
    .expect("valid policy");
    assert_eq!(policy.mode, Mode::Enforce);
    assert_eq!(policy.rules.len(), 12);
    let hcp = rule_for(&policy, "*.hcp.eastus.azmk8s.io");
    assert_eq!(
        hcp.ports,
        Ports::Some(vec![
            tcp(22, 22),
            tcp(443, 443),
            tcp(9000, 9000),
            udp(1194, 1194)
        ])
    );
    assert_eq!(hcp.origins, [Origin::Preset { name: "aks-global" }]);
    let wireserver = rule_for(&policy, "168.63.129.16/32");
    assert_eq!(wireserver.ports, Ports::All);
    assert_eq!(wireserver.origins, [Origin::Platform]);
    let imds = rule_for(&policy, "169.254.169.254/32");
    assert_eq!(imds.ports, Ports::Some(vec![tcp(80, 80)]));

    let empty_allow = parse(
        "allow: []\npresets: [{name: aks-global, location: eastus}]",
        "policy.yaml",
    )
    .expect("valid policy");
    assert_eq!(empty_allow.rules, policy.rules);
}

#[test]
fn every_cloud_preset_brings_the_platform_addresses_and_no_other_does() {
    for (preset, platform) in [
        ("{name: aks-china, location: chinaeast2}", true),
        ("{name: aks-government, location: usgovvirginia}", true),
        ("{name: ubuntu-updates}", false),
        ("{name: gpu}", false),
        ("{name: azure-monitor}", false),
        ("{name: azure-policy, location: eastus}", false),
        ("{name: windows}", false),
    ] {
        let policy = parse(&format!("presets: [{preset}]"), "policy.yaml").expect("valid policy");
        let found = policy
            .rules
            .iter()
            .filter(|r| r.origins == [Origin::Platform])
            .count();
        assert_eq!(found, if platform { 2 } else { 0 }, "{preset}");
    }
}

#[test]
fn preset_rules_are_what_a_policy_gets() {
    let params = Params {
        location: Some("westeurope".into()),
    };
    let policy = parse(
        "presets: [{name: aks-global, location: westeurope}]",
        "policy.yaml",
    )
    .expect("valid policy");
    assert_eq!(
        preset_rules("aks-global", params, None, None).expect("valid preset"),
        policy
    );
    let message = preset_rules("aks-global", Params::default(), None, None)
        .expect_err("no location")
        .to_string();
    assert_eq!(
        message,
        "command line: presets[0] (aks-global): `aks-global` needs `location`, the cluster's Azure region, e.g. `eastus`"
    );
}

#[test]
fn preset_errors_name_the_file_and_the_item() {
    assert_error(
        parse("presets: [{name: gpu}, {name: aks}]", "policy.yaml"),
        "presets[1] (aks)",
        "unknown preset `aks`; expected one of: aks-global, aks-china, aks-government, ubuntu-updates, gpu, azure-monitor, azure-policy, windows",
    );
    assert_error(
        parse("presets: [{name: aks-global}]", "policy.yaml"),
        "presets[0] (aks-global)",
        "`aks-global` needs `location`",
    );
    assert_error(
        parse("presets: [{name: gpu, location: eastus}]", "policy.yaml"),
        "presets[0] (gpu)",
        "`gpu` has no parameter `location`; it takes none",
    );
    assert_error(
        parse(
            "presets: [{name: aks-global, location: East US}]",
            "policy.yaml",
        ),
        "presets[0] (aks-global)",
        "did you mean `eastus`?",
    );
    assert_error(
        parse(
            "presets: [{name: aks-china, location: eastus}]",
            "policy.yaml",
        ),
        "presets[0] (aks-china)",
        "location `eastus` is a region of Azure (global), not of Azure China 21Vianet",
    );
    assert_error(
        parse("presets: [{name: dev-spaces}]", "policy.yaml"),
        "presets[0] (dev-spaces)",
        "preset `dev-spaces` is no longer offered",
    );
}

#[test]
fn preset_item_keys() {
    assert_error(
        parse(
            "presets: [{name: aks-global, locaton: eastus}]",
            "policy.yaml",
        ),
        "presets[0]",
        "unknown field `locaton`, expected `name` or `location`",
    );
    assert_error(
        parse("presets: [{location: eastus}]", "policy.yaml"),
        "presets[0]",
        "missing field `name`",
    );
    assert_error(
        parse("presets: [aks-global]", "policy.yaml"),
        "presets[0]",
        "expected a mapping with the preset's `name` and its parameters",
    );
}

#[test]
fn presets_empty() {
    assert_error(
        parse("presets: []", "policy.yaml"),
        "presets",
        "is empty; omit it, or name at least one preset",
    );
}

#[test]
fn preset_listed_twice() {
    assert_error(
        parse(
            "presets: [{name: gpu}, {name: windows}, {name: gpu}]",
            "policy.yaml",
        ),
        "presets[2] (gpu)",
        "repeats presets[0]",
    );
}

#[test]
fn one_cloud_only() {
    assert_error(
        parse(
            "presets:\n  - {name: aks-global, location: eastus}\n  - {name: gpu}\n  - {name: aks-china, location: chinaeast2}\n",
            "policy.yaml",
        ),
        "presets[2] (aks-china)",
        "`aks-global` is listed too, and a node runs in one cloud",
    );
}

#[test]
fn shared_preset_rows_are_merged() {
    let policy = parse(
        "presets: [{name: azure-monitor}, {name: azure-policy, location: eastus}]",
        "policy.yaml",
    )
    .expect("valid policy");
    assert_eq!(policy.rules.len(), 5 + 4 - 1);
    let shared = rule_for(&policy, "dc.services.visualstudio.com");
    assert_eq!(shared.ports, Ports::Some(vec![tcp(443, 443)]));
    assert_eq!(
        shared.origins,
        [
            Origin::Preset {
                name: "azure-monitor"
            },
            Origin::Preset {
                name: "azure-policy"
            }
        ]
    );
}

#[test]
fn explicit_entries_merge_with_preset_rows() {
    let policy = parse(
        "allow:\n  - fqdn: ntp.ubuntu.com\n    ports: [TCP:443]\n  - cidr: 168.63.129.16\n    ports: [UDP:53]\npresets: [{name: aks-global, location: eastus}]\n",
        "policy.yaml",
    )
    .expect("valid policy");
    assert_eq!(policy.rules.len(), 12);
    let ntp = &policy.rules[0];
    assert_eq!(ntp.target.to_string(), "ntp.ubuntu.com");
    assert_eq!(ntp.ports, Ports::Some(vec![tcp(443, 443), udp(123, 123)]));
    assert_eq!(
        ntp.origins,
        [Origin::Allow(0), Origin::Preset { name: "aks-global" }]
    );
    let wireserver = &policy.rules[1];
    assert_eq!(wireserver.ports, Ports::All);
    assert_eq!(wireserver.origins, [Origin::Allow(1), Origin::Platform]);
}

#[test]
fn api_server_gets_the_tunnel_ports() {
    let tunnel = Ports::Some(vec![
        tcp(22, 22),
        tcp(443, 443),
        tcp(9000, 9000),
        udp(1194, 1194),
    ]);
    let policy = parse("api_server: 203.0.113.5", "policy.yaml").expect("valid policy");
    assert_eq!(
        policy.rules,
        [Rule {
            target: Target::Cidr("203.0.113.5/32".parse().expect("literal")),
            ports: tunnel.clone(),
            origins: vec![Origin::ApiServer],
        }]
    );
    let range = parse("api_server: 10.240.0.0/28", "policy.yaml").expect("valid policy");
    assert_eq!(range.rules[0].target.to_string(), "10.240.0.0/28");
    assert_eq!(range.rules[0].ports, tunnel);
}

#[test]
fn api_server_invalid() {
    assert_error(
        parse("api_server: 203.0.113.5/24", "policy.yaml"),
        "api_server (203.0.113.5/24)",
        "host bits are set; did you mean 203.0.113.0/24?",
    );
    assert_error(
        parse("api_server: '*.hcp.eastus.azmk8s.io'", "policy.yaml"),
        "api_server (*.hcp.eastus.azmk8s.io)",
        "a wildcard is not one API server; give its name",
    );
    assert_error(
        parse("api_server: my_aks!.example", "policy.yaml"),
        "api_server (my_aks!.example)",
        "neither an address nor an API server name: character `!` is not allowed",
    );
    assert_error(
        parse(
            "presets: [{name: aks-global, location: eastus}]\napi_server: myaks.hcp.westus.azmk8s.io",
            "policy.yaml",
        ),
        "presets[0] (aks-global)",
        "API server `myaks.hcp.westus.azmk8s.io` is not a cluster's API server in eastus",
    );
    assert_error(
        parse("api_server: 0.0.0.0/0", "policy.yaml"),
        "api_server (0.0.0.0/0)",
        "the enforcer would admit everything",
    );
}

#[test]
fn cluster_cidrs_allow_everything_inside_the_cluster() {
    let policy = parse(
        "cluster_cidrs: [10.224.0.0/16, 10.244.0.0/16, 10.0.0.0/16, 'fd12:3456::/64']",
        "policy.yaml",
    )
    .expect("valid policy");
    assert_eq!(
        lines(&policy),
        [
            "10.224.0.0/16 any   # cluster_cidrs[0]",
            "10.244.0.0/16 any   # cluster_cidrs[1]",
            "10.0.0.0/16 any     # cluster_cidrs[2]",
            "fd12:3456::/64 any  # cluster_cidrs[3]",
        ]
    );
}

#[test]
fn cluster_cidrs_invalid() {
    assert_error(
        parse("cluster_cidrs: []", "policy.yaml"),
        "cluster_cidrs",
        "is empty; omit it, or list the node subnet, pod CIDR and service CIDR",
    );
    assert_error(
        parse(
            "cluster_cidrs: [10.224.0.0/16, 10.244.0.1/16]",
            "policy.yaml",
        ),
        "cluster_cidrs[1] (10.244.0.1/16)",
        "host bits are set; did you mean 10.244.0.0/16?",
    );
    assert_error(
        parse("cluster_cidrs: [0.0.0.0/0]", "policy.yaml"),
        "cluster_cidrs[0] (0.0.0.0/0)",
        "allows every IPv4 destination",
    );
    assert_error(
        parse(
            "cluster_cidrs: [10.224.0.0/16, 10.0.0.0/16, 10.224.0.0/16]",
            "policy.yaml",
        ),
        "cluster_cidrs[2] (10.224.0.0/16)",
        "repeats cluster_cidrs[0] (10.224.0.0/16)",
    );
}

#[test]
fn cluster_cidrs_and_api_server_merge_with_explicit_entries() {
    let policy = parse(
        "allow:\n  - cidr: 10.0.0.0/16\n    ports: [UDP:53]\napi_server: 10.0.0.1\ncluster_cidrs: [10.0.0.0/16]\n",
        "policy.yaml",
    )
    .expect("valid policy");
    assert_eq!(
        lines(&policy),
        [
            "10.0.0.0/16 any                               # allow[0], cluster_cidrs[0]",
            "10.0.0.1/32 TCP:22 TCP:443 TCP:9000 UDP:1194  # api_server",
        ]
    );
}

#[test]
fn no_rules_at_all() {
    assert_error(
        parse("mode: audit\ndns: {min_ttl: 60}\n", "policy.yaml"),
        "allow",
        "missing; list the destinations pods may reach, or use `presets`",
    );
    assert_error(
        parse("allow: []\nmode: enforce\n", "policy.yaml"),
        "allow",
        "is empty, so all egress would be dropped",
    );
}

#[test]
fn rule_lines_align_the_origins() {
    let policy = parse(
        "allow: [{fqdn: example.com, ports: [TCP:443]}]\npresets: [{name: gpu}]\ncluster_cidrs: [10.0.0.0/8]",
        "policy.yaml",
    )
    .expect("valid policy");
    assert_eq!(
        lines(&policy),
        [
            "example.com TCP:443             # allow[0]",
            "nvidia.github.io TCP:443        # preset gpu",
            "us.download.nvidia.com TCP:443  # preset gpu",
            "download.docker.com TCP:443     # preset gpu",
            "10.0.0.0/8 any                  # cluster_cidrs[0]",
        ]
    );
    assert_eq!(rule_lines(&[]), Vec::<String>::new());
}

const AKS: &str = "presets: [{name: aks-global, location: eastus}]\n";
const API_SERVER: &str = "myaks-dns-4f1e2d3c.hcp.eastus.azmk8s.io";

fn kubelet(name: &str) -> KubeletApiServer {
    KubeletApiServer {
        name: name.to_string(),
        file: "/var/lib/kubelet/kubeconfig".to_string(),
    }
}

#[test]
fn without_the_api_server_name_the_regional_wildcard_stays_with_a_warning() {
    let policy = parse(AKS, "policy.yaml").expect("valid policy");
    assert!(lines(&policy)[0].starts_with("*.hcp.eastus.azmk8s.io "));
    assert_eq!(
        policy.notices,
        [Notice {
            warning: true,
            at: "presets[0] (aks-global)".to_string(),
            text: "`*.hcp.eastus.azmk8s.io` admits every AKS API server in eastus, other customers' too; give `api_server` the cluster's API server name (`az aks show -g RG -n NAME --query fqdn`), or run where the kubelet's kubeconfig names it".to_string(),
        }]
    );
    let with_address =
        parse(&format!("{AKS}api_server: 203.0.113.5"), "policy.yaml").expect("valid policy");
    assert!(with_address.notices[0].warning);
    assert!(
        rule_for(&with_address, "*.hcp.eastus.azmk8s.io").origins
            == [Origin::Preset { name: "aks-global" }]
    );
}

#[test]
fn api_server_name_in_the_policy_narrows_the_cloud_preset() {
    let policy =
        parse(&format!("{AKS}api_server: {API_SERVER}"), "policy.yaml").expect("valid policy");
    assert!(!lines(&policy).iter().any(|l| l.starts_with("*.hcp.")));
    let rule = rule_for(&policy, API_SERVER);
    assert_eq!(rule.ports.to_string(), "TCP:22 TCP:443 TCP:9000 UDP:1194");
    assert_eq!(
        rule.origins,
        [Origin::Preset { name: "aks-global" }, Origin::ApiServer]
    );
    assert_eq!(
        policy.notices,
        [Notice {
            warning: false,
            at: "presets[0] (aks-global)".to_string(),
            text: format!(
                "allows the cluster's own API server `{API_SERVER}` (from `api_server`) in place of `*.hcp.eastus.azmk8s.io`"
            ),
        }]
    );
}

#[test]
fn api_server_name_from_the_kubeconfig_narrows_the_cloud_preset() {
    let policy = parse_with(AKS, "policy.yaml", Some(&kubelet(API_SERVER))).expect("valid policy");
    assert!(!lines(&policy).iter().any(|l| l.starts_with("*.hcp.")));
    assert_eq!(
        rule_for(&policy, API_SERVER).origins,
        [Origin::Preset { name: "aks-global" }]
    );
    assert!(!policy.notices[0].warning);
    assert!(
        policy.notices[0]
            .text
            .contains("(from the kubelet's kubeconfig /var/lib/kubelet/kubeconfig)")
    );
}

#[test]
fn the_policy_api_server_name_wins_over_the_kubeconfig() {
    let other = "other.hcp.eastus.azmk8s.io";
    let policy = parse_with(
        &format!("{AKS}api_server: {API_SERVER}"),
        "policy.yaml",
        Some(&kubelet(other)),
    )
    .expect("valid policy");
    rule_for(&policy, API_SERVER);
    assert!(!lines(&policy).iter().any(|l| l.starts_with(other)));
}

#[test]
fn a_kubeconfig_name_of_another_region_keeps_the_wildcard_with_a_warning() {
    let policy = parse_with(
        AKS,
        "policy.yaml",
        Some(&kubelet("myaks.hcp.westus.azmk8s.io")),
    )
    .expect("the policy is not wrong");
    rule_for(&policy, "*.hcp.eastus.azmk8s.io");
    let notice = &policy.notices[0];
    assert!(notice.warning);
    assert!(
        notice.text.starts_with(
            "API server `myaks.hcp.westus.azmk8s.io` is not a cluster's API server in eastus"
        ),
        "{notice}"
    );
    assert!(notice.text.contains("(from the kubelet's kubeconfig /var/lib/kubelet/kubeconfig); `*.hcp.eastus.azmk8s.io` admits every AKS API server"), "{notice}");
}

#[test]
fn api_server_name_without_a_cloud_preset_is_one_rule() {
    let policy = parse(&format!("api_server: {API_SERVER}"), "policy.yaml").expect("valid policy");
    assert_eq!(
        lines(&policy),
        [format!(
            "{API_SERVER} TCP:22 TCP:443 TCP:9000 UDP:1194  # api_server"
        )]
    );
    assert!(policy.notices.is_empty());
}

#[test]
fn a_wildcard_over_a_public_suffix_is_refused() {
    assert_entry_error(
        r#"fqdn: "*.com""#,
        "allow[0] (fqdn *.com)",
        "`*.com` admits every domain anyone registers under `com`, a public suffix; name the domains you need, e.g. `*.example.com` or `www.example.com`",
    );
    for (zone, at) in [
        ("*.co.uk", "allow[0] (fqdn *.co.uk)"),
        ("*.IO.", "allow[0] (fqdn *.IO.)"),
        ("*.internal", "allow[0] (fqdn *.internal)"),
    ] {
        assert_entry_error(
            &format!(r#"fqdn: "{zone}", ports: [TCP:443]"#),
            at,
            "a public suffix",
        );
    }
}

#[test]
fn a_wildcard_over_a_shared_provider_zone_is_a_warning() {
    for zone in ["blob.core.windows.net", "azurewebsites.net"] {
        let policy = one(&format!(r#"fqdn: "*.{zone}", ports: [HTTPS:443]"#)).expect("valid");
        assert_eq!(
            policy.notices,
            [Notice {
                warning: true,
                at: format!("allow[0] (fqdn *.{zone})"),
                text: format!(
                    "`*.{zone}` admits every name anyone creates under `{zone}`, a provider's shared zone (Public Suffix List, private section); name your own, e.g. `mine.{zone}`"
                ),
            }]
        );
    }
    let own = one(r#"fqdn: "*.mine.blob.core.windows.net""#).expect("valid");
    assert!(own.notices.is_empty());
}

#[test]
fn no_preset_row_reaches_past_one_owner() {
    for preset in presets::PRESETS {
        for region in preset.regions.regions() {
            let params = Params {
                location: (!preset.params.is_empty()).then(|| region.to_string()),
            };
            let rules = presets::expand(preset.name, &params, None).expect("valid");
            for (target, _) in rules {
                if let Target::Name(pattern) = &target {
                    assert_eq!(
                        suffix::reach(pattern),
                        suffix::Reach::Owned,
                        "{} {target}",
                        preset.name
                    );
                }
            }
        }
    }
}

#[test]
fn an_unquoted_star_says_to_quote_it() {
    let message = parse(
        "allow:\n  - cidr: 203.0.113.0/24\n  - fqdn: *.microsoft.com\n    ports: [HTTPS:443]\n",
        "policy.yaml",
    )
    .expect_err("refused")
    .to_string();
    assert_eq!(
        message,
        "policy.yaml: line 3: allow[1] (fqdn: *.microsoft.com): a value that starts with `*` must be quoted, or YAML reads it as an alias; write fqdn: \"*.microsoft.com\""
    );
    let in_a_list = parse("cluster_cidrs:\n  - *x\n", "policy.yaml")
        .expect_err("refused")
        .to_string();
    assert!(in_a_list.contains("write \"*x\""), "{in_a_list}");
}

#[test]
fn a_port_with_a_space_after_the_colon_says_to_remove_it() {
    assert_entry_error(
        "cidr: 203.0.113.0/24, ports: [HTTPS: 443]",
        "policy.yaml: line 2: allow[0] (cidr 203.0.113.0/24): ",
        "ports item `HTTPS: 443` is a mapping to YAML, because of the space after the colon; write `HTTPS:443`",
    );
}

#[test]
fn a_negative_port_is_named() {
    assert_entry_error(
        "cidr: 203.0.113.0/24, ports: [TCP:-1]",
        "allow[0] (cidr 203.0.113.0/24)",
        "`TCP:-1`: `-1` is not a port number; ports run from 1 to 65535",
    );
}

#[test]
fn every_error_has_its_line_and_all_are_reported() {
    let text = "\
mode: block
allow:
  - cidr: 203.0.113.0/24
    ports: [HTTPS: 443]
  - fqdn: \"*.com\"
  - cidr: 10.0.0.1/8
  - fqdn: a.example.com
    port: [TCP:1]
presets:
  - {name: aks-global, location: eastsu}
dns:
  min_ttl: -1
  max_ips: 0
bogus: 1
";
    let message = parse(text, "policy.yaml").expect_err("refused").to_string();
    let lines: Vec<&str> = message.lines().collect();
    let want = [
        "policy.yaml: line 1: mode: unknown mode `block`",
        "policy.yaml: line 3: allow[0] (cidr 203.0.113.0/24): ports item `HTTPS: 443`",
        "policy.yaml: line 5: allow[1] (fqdn *.com): `*.com` admits every domain",
        "policy.yaml: line 6: allow[2] (cidr 10.0.0.1/8): host bits are set",
        "policy.yaml: line 7: allow[3] (fqdn a.example.com): unknown field `port`",
        "policy.yaml: line 10: presets[0] (aks-global): location `eastsu` is not a region of Azure (global); did you mean `eastus`?",
        "policy.yaml: line 12: dns.min_ttl: invalid value: integer `-1`, expected u32",
        "policy.yaml: line 13: dns.max_ips: is 0",
        "policy.yaml: line 14: bogus: unknown key",
    ];
    assert_eq!(lines.len(), want.len(), "{message}");
    for (line, want) in lines.iter().zip(want) {
        assert!(
            line.starts_with(want),
            "{line:?} should start with {want:?}"
        );
    }
}

#[test]
fn errors_found_after_reading_have_their_lines_too() {
    assert_error(
        parse(
            "mode: audit\n\nallow:\n  - cidr: 10.0.0.0/8\n  - cidr: 10.0.0.0/8\n",
            "policy.yaml",
        ),
        "policy.yaml: line 5: allow[1] (cidr 10.0.0.0/8): ",
        "repeats allow[0]",
    );
    assert_error(
        parse("allow: []\n", "policy.yaml"),
        "policy.yaml: line 1: allow: ",
        "is empty",
    );
}

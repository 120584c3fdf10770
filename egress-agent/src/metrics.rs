//! What `/metrics` exposes (Prometheus text format 0.0.4, encoded by `prometheus-client`):
//! the build, policy reloads by result, and the counters of the latest [`Snapshot`].
//!
//! The control task publishes a [`Snapshot`] every second; a scrape only encodes the latest
//! one, so it never touches the kernel maps or waits for the control task.
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet, prometheus_text},
    metrics::{MetricType, counter::Counter, family::Family, info::Info},
    registry::Registry,
};
use tokio::sync::watch;

use crate::{
    dns::learner::LearnerCounters,
    loader::{PolicyEntries, Stats},
};

/// The agent's version and the commit it was built from (`build.rs`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EGRESS_COMMIT"),
    ")"
);

/// What `/metrics` reports; `None` until the programs are attached with the policy loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub stats: Stats,
    pub learner: LearnerCounters,
    /// Addresses the agent has learned (entries of the learned-address map it tracks).
    pub learned: usize,
    /// The learned-address map's size.
    pub learned_capacity: u32,
    /// Addresses whose asked names the agent remembers for events, and those it forgot to
    /// make room (`dns::seen`).
    pub names_seen: usize,
    pub names_evicted: u64,
    pub policy: PolicyEntries,
    /// The running policy: its hash and when it was applied.
    pub running: Running,
}

/// The policy in force: its hash (the file it was parsed from and its lists', see
/// `policy::policy_sha256`) and when it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    pub sha256: [u8; 32],
    pub applied: SystemTime,
}

impl Default for Running {
    fn default() -> Running {
        Running {
            sha256: [0; 32],
            applied: UNIX_EPOCH,
        }
    }
}

impl Running {
    /// The policy of hash `sha256` (`policy::policy_sha256`), applied now.
    pub fn now(sha256: [u8; 32]) -> Running {
        Running {
            sha256,
            applied: SystemTime::now(),
        }
    }
}

/// A label set of one label.
type Label = [(&'static str, &'static str); 1];

/// Policy reloads by result: `applied`, or `rejected` (the running policy stayed in force).
/// Cloned into the policy watcher (a file that does not parse) and the control task (a
/// policy that does not compile or could not be written): the clones count together.
#[derive(Debug, Clone)]
pub struct Reloads(Family<Label, Counter>);

impl Default for Reloads {
    /// Both results at zero, so that a rejection is a change of an existing series.
    fn default() -> Reloads {
        let family = Family::default();
        for result in ["applied", "rejected"] {
            drop(family.get_or_create(&[("result", result)]));
        }
        Reloads(family)
    }
}

impl Reloads {
    pub fn applied(&self) {
        self.0.get_or_create(&[("result", "applied")]).inc();
    }

    pub fn rejected(&self) {
        self.0.get_or_create(&[("result", "rejected")]).inc();
    }
}

/// The registry `/metrics` encodes.
#[derive(Debug)]
pub struct Exposition {
    registry: Registry,
}

/// The content type of [`Exposition::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

impl Exposition {
    pub fn new(snapshots: watch::Receiver<Option<Snapshot>>, reloads: &Reloads) -> Exposition {
        let mut registry = Registry::default();
        // `register` ends each help text with a period.
        registry.register(
            "egress_build",
            "The agent's version and the commit it was built from",
            Info::new([
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("EGRESS_COMMIT")),
            ]),
        );
        registry.register(
            "egress_policy_reloads",
            "Policy reloads by result: applied, or rejected (invalid, or not written; the running policy stays in force)",
            reloads.0.clone(),
        );
        registry.register_collector(Box::new(Latest(snapshots)));
        Exposition { registry }
    }

    /// The text exposition: every family is a `# HELP` and a `# TYPE` line followed by its
    /// samples.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)
            .expect("writing into a String cannot fail");
        out
    }
}

/// The families read from the latest snapshot, at each scrape.
#[derive(Debug)]
struct Latest(watch::Receiver<Option<Snapshot>>);

impl Collector for Latest {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let snapshot = *self.0.borrow();
        encode_snapshot(&mut encoder, snapshot.as_ref())
    }
}

/// One family of constant counters or gauges: `(labels, value)` samples.
fn family<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = ([(&'static str, &'static str); N], u64)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let mut sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
            _ => sample.encode_gauge(&value)?,
        }
    }
    Ok(())
}

/// One unlabelled sample.
fn single(value: u64) -> [([(&'static str, &'static str); 0], u64); 1] {
    [([], value)]
}

/// One sample per value, labelled `{label="name"}`.
fn labelled<const N: usize>(
    label: &'static str,
    values: [(&'static str, u64); N],
) -> impl Iterator<Item = (Label, u64)> {
    values
        .into_iter()
        .map(move |(name, value)| ([(label, name)], value))
}

fn encode_snapshot(
    encoder: &mut DescriptorEncoder,
    snapshot: Option<&Snapshot>,
) -> std::fmt::Result {
    use MetricType::{Counter, Gauge};
    family(
        encoder,
        "egress_ready",
        "1 once the programs are attached with the policy loaded.",
        Gauge,
        single(u64::from(snapshot.is_some())),
    )?;
    let Some(s) = snapshot else {
        return Ok(());
    };
    let (k, l) = (&s.stats, &s.learner);
    let mut packets = Vec::new();
    for (verdict, by_proto) in [
        ("allowed", &k.allowed),
        ("dropped", &k.dropped),
        ("audited", &k.audited),
    ] {
        for (proto, value) in by_proto.by_name() {
            packets.push(([("verdict", verdict), ("proto", proto)], value));
        }
    }
    family(
        encoder,
        "egress_packets",
        "Packets decided, by verdict (audited: passed in audit mode, would have been dropped) and protocol (icmp includes ICMPv6; other includes unreadable headers).",
        Counter,
        packets,
    )?;
    family(
        encoder,
        "egress_events_lost",
        "Deny/audit events not delivered (rate limit or full ring buffer).",
        Counter,
        single(k.events_lost),
    )?;
    family(
        encoder,
        "egress_dns_answers",
        "Trusted answers to queries seen leaving.",
        Counter,
        single(k.dns_answers),
    )?;
    family(
        encoder,
        "egress_dns_ignored",
        "DNS answers that taught nothing, by reason: refused by the kernel (untrusted, unsolicited, unmatched, malformed) or, after it learned from them, by the agent (agent_unmatched, agent_malformed; their addresses are taken back). off_chain counts A/AAAA records off the question's CNAME chain, not answers.",
        Counter,
        labelled(
            "reason",
            [
                ("untrusted", k.dns_untrusted),
                ("unsolicited", k.dns_unsolicited),
                ("unmatched", k.dns_unmatched),
                ("malformed", k.dns_malformed),
                ("agent_unmatched", l.unmatched),
                ("agent_malformed", l.malformed),
                ("off_chain", l.off_chain),
            ],
        ),
    )?;
    family(
        encoder,
        "egress_dns_learned",
        "Addresses learned from DNS answers, by the kernel (before delivery) and the agent.",
        Counter,
        labelled("by", [("kernel", k.dns_learned), ("agent", l.learned)]),
    )?;
    family(
        encoder,
        "egress_dns_removed",
        "Learned addresses removed, by reason.",
        Counter,
        labelled("reason", [("evicted", l.evicted), ("expired", l.expired)]),
    )?;
    family(
        encoder,
        "egress_dns_events_lost",
        "Learned-from answers the agent did not receive (full ring buffer).",
        Counter,
        single(k.dns_events_lost),
    )?;
    family(
        encoder,
        "egress_learned_addresses",
        "Addresses currently learned.",
        Gauge,
        single(s.learned as u64),
    )?;
    family(
        encoder,
        "egress_learned_addresses_capacity",
        "Size of the learned-address map.",
        Gauge,
        single(u64::from(s.learned_capacity)),
    )?;
    family(
        encoder,
        "egress_dns_names_addresses",
        "Addresses whose asked DNS names the agent remembers, to name them in events.",
        Gauge,
        single(s.names_seen as u64),
    )?;
    family(
        encoder,
        "egress_dns_names_evicted",
        "Addresses forgotten to keep that memory within its bound.",
        Counter,
        single(s.names_evicted),
    )?;
    family(
        encoder,
        "egress_policy_entries",
        "Entries the policy wrote into the kernel maps: CIDR prefixes, name-table entries, trusted resolvers.",
        Gauge,
        labelled(
            "map",
            [
                ("cidrs", s.policy.cidrs as u64),
                ("names", s.policy.names as u64),
                ("resolvers", s.policy.resolvers as u64),
            ],
        ),
    )?;
    let hash = crate::policy::sha256_hex(&s.running.sha256);
    let mut info = encoder.encode_descriptor(
        "egress_policy",
        "The running policy: the SHA-256 of its file and its list files' hashes (sha256sum policy.yaml without lists).",
        None,
        MetricType::Info,
    )?;
    info.encode_info(&[("sha256", hash.as_str())])?;
    family(
        encoder,
        "egress_policy_applied_timestamp_seconds",
        "When the running policy was applied (at start or by a reload), in seconds since the Unix epoch.",
        Gauge,
        single(
            s.running
                .applied
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::loader::ByProto;

    /// A sample's labels, sorted by name.
    type Labels = BTreeMap<String, String>;

    /// Parses an exposition strictly: every family is `# HELP`, `# TYPE` (counter or gauge),
    /// then at least one sample of that name; no family or series twice; integer values.
    fn parse(text: &str) -> BTreeMap<(String, Labels), u64> {
        let mut samples = BTreeMap::new();
        let mut families = Vec::<String>::new();
        let mut lines = text.lines().peekable();
        while let Some(help) = lines.next() {
            let (name, doc) = help
                .strip_prefix("# HELP ")
                .and_then(|h| h.split_once(' '))
                .unwrap_or_else(|| panic!("not a HELP line: {help:?}"));
            assert!(!doc.trim().is_empty(), "empty HELP for {name}");
            assert!(!families.contains(&name.to_owned()), "{name} twice");
            families.push(name.to_owned());
            let kind = lines
                .next()
                .and_then(|t| t.strip_prefix(&format!("# TYPE {name} ")))
                .unwrap_or_else(|| panic!("no TYPE line after the HELP of {name}"));
            assert!(matches!(kind, "counter" | "gauge"), "{name}: {kind}");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name}: counters, and only they, end in _total"
            );
            let mut count = 0;
            while let Some(line) = lines.next_if(|l| !l.starts_with('#')) {
                let (series, value) = line.rsplit_once(' ').expect("`series value`");
                let value: u64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
                let (sample_name, labels) = match series.split_once('{') {
                    None => (series, Labels::new()),
                    Some((n, rest)) => {
                        let body = rest.strip_suffix('}').expect("labels end with }");
                        let labels = body
                            .split(',')
                            .map(|pair| {
                                let (k, v) = pair.split_once('=').expect("label=value");
                                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                                (k.to_owned(), v.expect("quoted value").to_owned())
                            })
                            .collect();
                        (n, labels)
                    }
                };
                assert_eq!(sample_name, name, "sample outside its family: {line}");
                let key = (name.to_owned(), labels);
                assert!(samples.insert(key, value).is_none(), "{line} twice");
                count += 1;
            }
            assert!(count > 0, "{name} has no samples");
        }
        samples
    }

    fn get(samples: &BTreeMap<(String, Labels), u64>, name: &str, labels: &[(&str, &str)]) -> u64 {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        samples[&(name.to_owned(), labels)]
    }

    /// The exposition of `snapshot`, with `reloads`.
    fn render_with(snapshot: Option<Snapshot>, reloads: &Reloads) -> String {
        let (_tx, rx) = watch::channel(snapshot);
        Exposition::new(rx, reloads).encode()
    }

    fn render(snapshot: Option<&Snapshot>) -> String {
        render_with(snapshot.copied(), &Reloads::default())
    }

    #[test]
    fn not_ready_exposes_only_readiness() {
        let samples = parse(&render(None));
        assert_eq!(samples.len(), 4, "{samples:?}");
        assert_eq!(get(&samples, "egress_ready", &[]), 0);
        let build = [
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", env!("EGRESS_COMMIT")),
        ];
        assert_eq!(get(&samples, "egress_build_info", &build), 1);
        for result in ["applied", "rejected"] {
            let labels = [("result", result)];
            assert_eq!(get(&samples, "egress_policy_reloads_total", &labels), 0);
        }
    }

    #[test]
    fn packets_are_split_by_verdict_and_protocol() {
        let snapshot = Snapshot {
            stats: Stats {
                allowed: ByProto {
                    tcp: 1,
                    udp: 2,
                    icmp: 3,
                    other: 4,
                },
                dropped: ByProto {
                    tcp: 5,
                    udp: 6,
                    icmp: 7,
                    other: 8,
                },
                audited: ByProto {
                    tcp: 9,
                    udp: 10,
                    icmp: 11,
                    other: 12,
                },
                ..Stats::default()
            },
            ..Snapshot::default()
        };
        let text = render(Some(&snapshot));
        let block = "\
# HELP egress_packets_total Packets decided, by verdict (audited: passed in audit mode, would have been dropped) and protocol (icmp includes ICMPv6; other includes unreadable headers).
# TYPE egress_packets_total counter
egress_packets_total{verdict=\"allowed\",proto=\"tcp\"} 1
egress_packets_total{verdict=\"allowed\",proto=\"udp\"} 2
egress_packets_total{verdict=\"allowed\",proto=\"icmp\"} 3
egress_packets_total{verdict=\"allowed\",proto=\"other\"} 4
egress_packets_total{verdict=\"dropped\",proto=\"tcp\"} 5
egress_packets_total{verdict=\"dropped\",proto=\"udp\"} 6
egress_packets_total{verdict=\"dropped\",proto=\"icmp\"} 7
egress_packets_total{verdict=\"dropped\",proto=\"other\"} 8
egress_packets_total{verdict=\"audited\",proto=\"tcp\"} 9
egress_packets_total{verdict=\"audited\",proto=\"udp\"} 10
egress_packets_total{verdict=\"audited\",proto=\"icmp\"} 11
egress_packets_total{verdict=\"audited\",proto=\"other\"} 12
";
        assert!(text.contains(block), "{text}");
        let samples = parse(&text);
        let packets: Vec<_> = samples
            .iter()
            .filter(|((name, _), _)| name == "egress_packets_total")
            .collect();
        assert_eq!(packets.len(), 12);
        assert_eq!(
            packets.iter().map(|(_, v)| **v).sum::<u64>(),
            (1..=12).sum::<u64>()
        );
        assert_eq!(snapshot.stats.dropped.total(), 5 + 6 + 7 + 8);
    }

    #[test]
    fn every_family_has_help_type_and_samples() {
        let snapshot = Snapshot {
            stats: Stats {
                events_lost: 7,
                dns_answers: 4,
                dns_learned: 3,
                dns_untrusted: 2,
                dns_malformed: 1,
                ..Stats::default()
            },
            learner: LearnerCounters {
                learned: 3,
                malformed: 1,
                off_chain: 2,
                expired: 1,
                ..LearnerCounters::default()
            },
            learned: 2,
            learned_capacity: 10,
            names_seen: 4,
            names_evicted: 1,
            policy: PolicyEntries {
                cidrs: 5,
                names: 3,
                resolvers: 2,
            },
            running: Running {
                applied: UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
                ..Running::now(crate::policy::policy_sha256(b"allow: []\n", b""))
            },
        };
        let reloads = Reloads::default();
        reloads.applied();
        reloads.rejected();
        reloads.rejected();
        let samples = parse(&render_with(Some(snapshot), &reloads));
        let get = |name: &str, labels: &[(&str, &str)]| get(&samples, name, labels);
        assert_eq!(get("egress_ready", &[]), 1);
        assert_eq!(get("egress_events_lost_total", &[]), 7);
        assert_eq!(get("egress_dns_answers_total", &[]), 4);
        assert_eq!(get("egress_dns_learned_total", &[("by", "kernel")]), 3);
        assert_eq!(get("egress_dns_learned_total", &[("by", "agent")]), 3);
        for (reason, n) in [
            ("untrusted", 2),
            ("unsolicited", 0),
            ("unmatched", 0),
            ("malformed", 1),
            ("agent_unmatched", 0),
            ("agent_malformed", 1),
            ("off_chain", 2),
        ] {
            assert_eq!(get("egress_dns_ignored_total", &[("reason", reason)]), n);
        }
        assert_eq!(get("egress_dns_removed_total", &[("reason", "expired")]), 1);
        assert_eq!(get("egress_dns_events_lost_total", &[]), 0);
        assert_eq!(get("egress_learned_addresses", &[]), 2);
        assert_eq!(get("egress_learned_addresses_capacity", &[]), 10);
        assert_eq!(get("egress_dns_names_addresses", &[]), 4);
        assert_eq!(get("egress_dns_names_evicted_total", &[]), 1);
        assert_eq!(get("egress_policy_entries", &[("map", "cidrs")]), 5);
        assert_eq!(get("egress_policy_entries", &[("map", "names")]), 3);
        assert_eq!(get("egress_policy_entries", &[("map", "resolvers")]), 2);
        assert_eq!(
            get("egress_policy_reloads_total", &[("result", "applied")]),
            1
        );
        assert_eq!(
            get("egress_policy_reloads_total", &[("result", "rejected")]),
            2
        );
        // `printf 'allow: []\n' | sha256sum`
        let hash = "84d63e5fa77491fbac52ee63139f8ee653bf6decb9137985afd26c41499e4ebb";
        assert_eq!(get("egress_policy_info", &[("sha256", hash)]), 1);
        assert_eq!(
            get("egress_policy_applied_timestamp_seconds", &[]),
            1_800_000_000
        );
        for verdict in ["allowed", "dropped", "audited"] {
            for proto in ["tcp", "udp", "icmp", "other"] {
                let labels = [("verdict", verdict), ("proto", proto)];
                assert_eq!(get("egress_packets_total", &labels), 0);
            }
        }
    }

    #[test]
    fn by_proto_totals_and_log_form() {
        let p = ByProto {
            tcp: 10,
            udp: 1,
            icmp: 2,
            other: 0,
        };
        assert_eq!(p.total(), 13);
        assert_eq!(p.to_string(), "13 (tcp 10 udp 1 icmp 2 other 0)");
    }
}

//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` over plain HTTP.
//!
//! The control task publishes a [`Snapshot`] every second; this server only formats the
//! latest one, so a scrape never touches the kernel maps or waits for the control task.
use std::{fmt::Write as _, net::SocketAddr};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{
    dns::learner::LearnerCounters,
    loader::{PolicyEntries, Stats},
};

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
}

/// Serves until the listener fails.
pub async fn serve(
    listener: TcpListener,
    snapshots: watch::Receiver<Option<Snapshot>>,
) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let snapshot = *snapshots.borrow();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, snapshot).await {
                log::debug!("metrics request from {peer}: {e}");
            }
        });
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))
}

/// Bytes of a request head read at most; the rest is ignored.
const MAX_HEAD: usize = 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a request head, up to its blank line: a client may send it in several segments
/// (one `write` per piece, as `write!` on an unbuffered stream does), and answering and
/// closing before the rest has arrived would reset the connection under the client.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(MAX_HEAD);
    let mut buf = [0u8; MAX_HEAD];
    let read = async {
        while head.len() < MAX_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf[..MAX_HEAD - head.len()]).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(head)
}

async fn answer(mut stream: TcpStream, snapshot: Option<Snapshot>) -> std::io::Result<()> {
    let head = read_head(&mut stream).await?;
    let request = String::from_utf8_lossy(&head);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match (path, snapshot) {
        ("/healthz", _) => ("200 OK", "ok\n".to_owned()),
        ("/readyz", Some(_)) => ("200 OK", "ready\n".to_owned()),
        ("/readyz", None) => ("503 Service Unavailable", "not attached yet\n".to_owned()),
        ("/metrics", s) => ("200 OK", render(s.as_ref())),
        _ => ("404 Not Found", "not found\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// One sample: its labels (`{k="v",...}`, or empty) and value.
type Sample = (String, u64);

fn unlabelled(value: u64) -> Vec<Sample> {
    vec![(String::new(), value)]
}

/// One sample per value, labelled `{label="name"}`.
fn labelled<'a>(label: &str, values: impl IntoIterator<Item = (&'a str, u64)>) -> Vec<Sample> {
    values
        .into_iter()
        .map(|(name, value)| (format!("{{{label}=\"{name}\"}}"), value))
        .collect()
}

/// The Prometheus text exposition (format 0.0.4) of a snapshot: every family is a `# HELP`
/// and a `# TYPE` line followed by its samples.
pub fn render(snapshot: Option<&Snapshot>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<Sample>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "egress_ready",
        "gauge",
        "1 once the programs are attached with the policy loaded.",
        unlabelled(u64::from(snapshot.is_some())),
    );
    let Some(s) = snapshot else {
        return out;
    };
    let (k, l) = (&s.stats, &s.learner);
    let mut packets = Vec::new();
    for (verdict, by_proto) in [
        ("allowed", &k.allowed),
        ("dropped", &k.dropped),
        ("audited", &k.audited),
    ] {
        for (proto, value) in by_proto.by_name() {
            packets.push((
                format!("{{verdict=\"{verdict}\",proto=\"{proto}\"}}"),
                value,
            ));
        }
    }
    metric(
        "egress_packets_total",
        "counter",
        "Packets decided, by verdict (audited: passed in audit mode, would have been dropped) and protocol (icmp includes ICMPv6; other includes unreadable headers).",
        packets,
    );
    metric(
        "egress_events_lost_total",
        "counter",
        "Deny/audit events not delivered (rate limit or full ring buffer).",
        unlabelled(k.events_lost),
    );
    metric(
        "egress_dns_answers_total",
        "counter",
        "Trusted answers to queries seen leaving.",
        unlabelled(k.dns_answers),
    );
    metric(
        "egress_dns_ignored_total",
        "counter",
        "DNS answers that taught nothing, by reason: refused by the kernel (untrusted, unsolicited, unmatched, malformed) or, after it learned from them, by the agent (agent_unmatched, agent_malformed; their addresses are taken back). off_chain counts A/AAAA records off the question's CNAME chain, not answers.",
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
    );
    metric(
        "egress_dns_learned_total",
        "counter",
        "Addresses learned from DNS answers, by the kernel (before delivery) and the agent.",
        labelled("by", [("kernel", k.dns_learned), ("agent", l.learned)]),
    );
    metric(
        "egress_dns_removed_total",
        "counter",
        "Learned addresses removed, by reason.",
        labelled("reason", [("evicted", l.evicted), ("expired", l.expired)]),
    );
    metric(
        "egress_dns_events_lost_total",
        "counter",
        "Learned-from answers the agent did not receive (full ring buffer).",
        unlabelled(k.dns_events_lost),
    );
    metric(
        "egress_learned_addresses",
        "gauge",
        "Addresses currently learned.",
        unlabelled(s.learned as u64),
    );
    metric(
        "egress_learned_addresses_capacity",
        "gauge",
        "Size of the learned-address map.",
        unlabelled(u64::from(s.learned_capacity)),
    );
    metric(
        "egress_dns_names_addresses",
        "gauge",
        "Addresses whose asked DNS names the agent remembers, to name them in events.",
        unlabelled(s.names_seen as u64),
    );
    metric(
        "egress_dns_names_evicted_total",
        "counter",
        "Addresses forgotten to keep that memory within its bound.",
        unlabelled(s.names_evicted),
    );
    metric(
        "egress_policy_entries",
        "gauge",
        "Entries the policy wrote into the kernel maps: CIDR prefixes, name-table entries, trusted resolvers.",
        labelled(
            "map",
            [
                ("cidrs", s.policy.cidrs as u64),
                ("names", s.policy.names as u64),
                ("resolvers", s.policy.resolvers as u64),
            ],
        ),
    );
    out
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

    /// A head sent in pieces is read whole; reading stops at the blank line and at the
    /// size bound.
    #[tokio::test]
    async fn a_request_head_in_pieces_is_read_whole() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move { read_head(&mut server).await });
        for piece in ["GET ", "/metrics", " HTTP/1.1\r\nHost: x\r\n", "\r\n"] {
            client.write_all(piece.as_bytes()).await.expect("write");
            tokio::task::yield_now().await;
        }
        let head = reader.await.expect("join").expect("read");
        assert_eq!(head, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");

        let (mut client, mut server) = tokio::io::duplex(4 * MAX_HEAD);
        client
            .write_all(&[b'a'; 2 * MAX_HEAD])
            .await
            .expect("write");
        let head = read_head(&mut server).await.expect("read");
        assert_eq!(head.len(), MAX_HEAD);
    }

    #[test]
    fn not_ready_exposes_only_readiness() {
        let samples = parse(&render(None));
        assert_eq!(samples.len(), 1, "{samples:?}");
        assert_eq!(get(&samples, "egress_ready", &[]), 0);
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
        };
        let samples = parse(&render(Some(&snapshot)));
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

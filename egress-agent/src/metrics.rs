//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` over plain HTTP.
//!
//! The control task publishes a [`Snapshot`] every second; this server only formats the
//! latest one, so a scrape never touches the kernel maps or waits for the control task.
use std::{fmt::Write as _, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{dns::learner::LearnerCounters, loader::Stats};

/// What `/metrics` reports; `None` until the programs are attached with the policy loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub stats: Stats,
    pub learner: LearnerCounters,
    /// Addresses the agent has learned (entries of the learned-address map it tracks).
    pub learned: usize,
    /// The learned-address map's size.
    pub learned_capacity: u32,
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

async fn answer(mut stream: TcpStream, snapshot: Option<Snapshot>) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    let request = String::from_utf8_lossy(&buf[..n]);
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

/// The Prometheus text exposition of a snapshot.
pub fn render(snapshot: Option<&Snapshot>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "egress_ready",
        "gauge",
        "1 once the programs are attached with the policy loaded.",
        &[("", u64::from(snapshot.is_some()))],
    );
    let Some(s) = snapshot else {
        return out;
    };
    let (k, l) = (&s.stats, &s.learner);
    metric(
        "egress_packets_total",
        "counter",
        "Packets decided, by verdict.",
        &[
            ("{verdict=\"allowed\"}", k.allowed),
            ("{verdict=\"dropped\"}", k.dropped),
            ("{verdict=\"audited\"}", k.audited),
        ],
    );
    metric(
        "egress_events_lost_total",
        "counter",
        "Deny/audit events not delivered (rate limit or full ring buffer).",
        &[("", k.events_lost)],
    );
    metric(
        "egress_dns_answers_total",
        "counter",
        "Trusted answers to queries seen leaving.",
        &[("", k.dns_answers)],
    );
    metric(
        "egress_dns_ignored_total",
        "counter",
        "DNS answers that taught nothing, by reason.",
        &[
            ("{reason=\"untrusted\"}", k.dns_untrusted),
            ("{reason=\"unsolicited\"}", k.dns_unsolicited),
            ("{reason=\"unmatched\"}", k.dns_unmatched),
            ("{reason=\"malformed\"}", k.dns_malformed),
            ("{reason=\"off_chain\"}", l.off_chain),
        ],
    );
    metric(
        "egress_dns_learned_total",
        "counter",
        "Addresses learned from DNS answers, by the kernel (before delivery) and the agent.",
        &[
            ("{by=\"kernel\"}", k.dns_learned),
            ("{by=\"agent\"}", l.learned),
        ],
    );
    metric(
        "egress_dns_removed_total",
        "counter",
        "Learned addresses removed, by reason.",
        &[
            ("{reason=\"evicted\"}", l.evicted),
            ("{reason=\"expired\"}", l.expired),
        ],
    );
    metric(
        "egress_dns_events_lost_total",
        "counter",
        "Learned-from answers the agent did not receive (full ring buffer).",
        &[("", k.dns_events_lost)],
    );
    metric(
        "egress_learned_addresses",
        "gauge",
        "Addresses currently learned.",
        &[("", s.learned as u64)],
    );
    metric(
        "egress_learned_addresses_capacity",
        "gauge",
        "Size of the learned-address map.",
        &[("", u64::from(s.learned_capacity))],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_exposes_only_readiness() {
        let text = render(None);
        assert!(text.contains("egress_ready 0"));
        assert!(!text.contains("egress_packets_total"));
    }

    #[test]
    fn every_sample_line_parses_as_name_labels_value() {
        let snapshot = Snapshot {
            stats: Stats {
                allowed: 5,
                dropped: 2,
                ..Stats::default()
            },
            learned: 3,
            learned_capacity: 10,
            ..Snapshot::default()
        };
        let text = render(Some(&snapshot));
        assert!(text.contains("egress_ready 1"));
        assert!(text.contains("egress_packets_total{verdict=\"allowed\"} 5"));
        assert!(text.contains("egress_learned_addresses 3"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name and value");
            assert!(value.parse::<u64>().is_ok(), "{line}");
            assert!(name.starts_with("egress_"), "{line}");
        }
    }
}

//! Part 2: the kernel program's own cost per packet, through `BPF_PROG_TEST_RUN` on the real
//! object with the maps as the agent fills them, for policies of N CIDR entries.
//!
//! The egress program remembers allowed flows in an LRU map (`FLOWS`), so an allowed packet
//! takes one of two paths, measured separately:
//! - **flow-cache hit**: the flow is already in `FLOWS` (every packet of a connection after
//!   its first): one hash lookup;
//! - **first packet**: `FLOWS` has no live entry, so the policy maps decide (single hosts:
//!   `HOSTS`, one hash lookup; with `--entries prefixes`, /127s: a `CIDRS` trie walk after a
//!   `HOSTS` miss) and the flow is written to `FLOWS`. Measured two ways: with `repeat` after setting the TCP idle
//!   timeout to 0 (every run finds the remembered flow stale, decides afresh and rewrites
//!   it), and as the mean of single runs on distinct flows (distinct source ports, each a
//!   new `FLOWS` entry), which includes the test-run timer's own cost once per run; that
//!   cost is estimated as (single-run flow-cache hit) - (repeated flow-cache hit) and
//!   subtracted in the "corrected" column.
//!
//! A denied packet walks the whole path (flow lookup, `HOSTS`, trie, learned-address lookup,
//! counter); the first of a flow is reported, the later ones (a repeated run is a
//! retransmit) are counted in the flow's `FLOWS` entry instead.
//!
//! The kernel reports the mean duration of one run in whole nanoseconds (`duration` of
//! `BPF_PROG_TEST_RUN` is the total divided by `repeat`); each figure is the median of
//! `trials` such calls.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use egress_agent::{
    compile::{compile, settings},
    loader::{EGRESS_CGROUP, Enforcer},
    policy::{Mode, parse},
};

use crate::{
    addrs::{V4_MAX, V4_MISS, V6_MISS, V6_TARGET, v4_list, v6_list},
    frames::syn,
    harness,
};

const PASS: u32 = 1;
const DROP: u32 = 0;
const DPORT: u16 = 443;
const SPORT: u16 = 40000;

pub struct Options {
    pub sizes: Vec<usize>,
    pub repeat: u32,
    /// Distinct flows for the single-run first-packet figure.
    pub flows: u16,
    pub trials: usize,
    /// Policies of IPv6 /127s, which the `CIDRS` trie holds, instead of single addresses
    /// (`HOSTS`): what a policy of prefixes only costs.
    pub prefixes: bool,
}

/// A policy of `n` CIDR entries (single hosts): `min(n / 2, 500)` IPv4 addresses from the
/// documentation ranges, the rest IPv6; returns the YAML and the allowed IPv4 target. With
/// `prefixes`, IPv6 only, each address as the /127 that holds it.
pub fn policy_yaml(n: usize, ports: Option<&str>, prefixes: bool) -> (String, Option<Ipv4Addr>) {
    let v4 = if prefixes {
        Vec::new()
    } else {
        v4_list((n / 2).min(V4_MAX))
    };
    let v6 = v6_list(n - v4.len());
    let mut yaml = String::with_capacity(n * 48 + 64);
    yaml.push_str("mode: enforce\nallow:\n");
    let ports_line = ports.map(|p| format!("    ports: [{p}]\n"));
    let entries = v4
        .iter()
        .map(|a| IpAddr::V4(*a))
        .chain(v6.iter().map(|a| IpAddr::V6(*a)));
    for addr in entries {
        match addr {
            IpAddr::V6(a) if prefixes => {
                let net = std::net::Ipv6Addr::from(u128::from(a) & !1);
                let _ = writeln!(yaml, "  - cidr: {net}/127");
            }
            _ => {
                let _ = writeln!(yaml, "  - cidr: {addr}");
            }
        }
        if let Some(line) = &ports_line {
            yaml.push_str(line);
        }
    }
    (yaml, v4.last().copied())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Median over `trials` of the kernel's mean ns per run; checks the verdict.
fn timed(e: &Enforcer, frame: &[u8], repeat: u32, want: u32, trials: usize) -> Result<u128> {
    let mut v = Vec::with_capacity(trials);
    for _ in 0..trials.max(1) {
        let r = e.test_run(EGRESS_CGROUP, frame, repeat)?;
        if r.return_value != want {
            bail!("verdict {} where {want} was expected", r.return_value);
        }
        v.push(r.duration.as_nanos());
    }
    Ok(median(v))
}

/// Mean ns of single runs over `frames`, each checked.
fn single_runs(e: &Enforcer, frames: &[Vec<u8>], want: u32) -> Result<f64> {
    let mut total: u128 = 0;
    for f in frames {
        let r = e.test_run(EGRESS_CGROUP, f, 1)?;
        if r.return_value != want {
            bail!("verdict {} where {want} was expected", r.return_value);
        }
        total += r.duration.as_nanos();
    }
    Ok(total as f64 / frames.len().max(1) as f64)
}

struct Row {
    family: &'static str,
    cached: u128,
    first_repeat: u128,
    first_single: f64,
    timer: f64,
    denied: u128,
}

fn measure(
    e: &mut Enforcer,
    opts: &Options,
    family: &'static str,
    hit: IpAddr,
    miss: IpAddr,
) -> Result<Row> {
    let mode = Mode::Enforce;
    let dns = egress_agent::policy::DnsSettings::default();
    let normal = settings(mode, &dns);
    let mut stale = normal;
    stale.tcp_idle_ns = 0;

    // First packets on distinct flows (each a new FLOWS entry), one run each.
    let distinct: Vec<Vec<u8>> = (0..opts.flows).map(|k| syn(hit, 1024 + k, DPORT)).collect();
    let first_single = single_runs(e, &distinct, PASS)?;

    // The flow-cache path: the first run remembers the flow, the rest find it.
    let hit_frame = syn(hit, SPORT, DPORT);
    timed(e, &hit_frame, 1, PASS, 1)?;
    let cached = timed(e, &hit_frame, opts.repeat, PASS, opts.trials)?;
    let same: Vec<Vec<u8>> = (0..opts.flows).map(|_| hit_frame.clone()).collect();
    let cached_single = single_runs(e, &same, PASS)?;

    // The first-packet path, repeated: every run finds its flow stale and decides afresh.
    e.write_settings(&stale)?;
    let first_repeat = timed(e, &hit_frame, opts.repeat, PASS, opts.trials);
    e.write_settings(&normal)?;
    let first_repeat = first_repeat?;

    let denied = timed(e, &syn(miss, SPORT, DPORT), opts.repeat, DROP, opts.trials)?;
    Ok(Row {
        family,
        cached,
        first_repeat,
        first_single,
        timer: cached_single - cached as f64,
        denied,
    })
}

pub fn run(opts: &Options) -> Result<()> {
    let mut setup = String::new();
    let mut cost = String::new();
    let _ = writeln!(
        setup,
        "| N | ports | parse | compile | load | write maps | CIDR entries |\n|---:|---|---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        cost,
        "| N | ports | family | flow-cache hit | first packet (repeat, idle 0) | first packet (distinct flows, raw) | first packet (distinct flows, corrected) | denied |\n|---:|---|---|---:|---:|---:|---:|---:|"
    );
    for &n in &opts.sizes {
        for ports in [None, Some("TCP:443")] {
            let label = ports.unwrap_or("any");
            eprintln!("verdict: N={n} ports={label}");
            let (yaml, v4_hit) = policy_yaml(n, ports, opts.prefixes);
            let t = Instant::now();
            let policy = parse(&yaml, "bench policy").context("parsing the bench policy")?;
            let parse_t = t.elapsed();
            drop(yaml);
            let t = Instant::now();
            let compiled = match compile(&policy) {
                Ok(c) => c,
                Err(err) => {
                    let compile_t = t.elapsed();
                    let _ = writeln!(
                        setup,
                        "| {n} | {label} | {} | refused after {}: {err} | | | |",
                        ms(parse_t),
                        ms(compile_t)
                    );
                    let _ = writeln!(
                        cost,
                        "| {n} | {label} | both | refused by the policy compiler: {err} | | | | |"
                    );
                    continue;
                }
            };
            let compile_t = t.elapsed();
            let t = Instant::now();
            let mut e = Enforcer::load_for_test_run(
                &settings(Mode::Enforce, &policy.dns),
                policy.dns.max_ips,
            )
            .context("loading the kernel object")?;
            let load_t = t.elapsed();
            let t = Instant::now();
            e.write_policy(&compiled).context("writing the maps")?;
            let write_t = t.elapsed();
            let _ = writeln!(
                setup,
                "| {n} | {label} | {} | {} | {} | {} | {} |",
                ms(parse_t),
                ms(compile_t),
                ms(load_t),
                ms(write_t),
                compiled.cidrs.len() + compiled.hosts.len()
            );
            let mut rows = Vec::new();
            if let Some(v4) = v4_hit {
                rows.push(measure(
                    &mut e,
                    opts,
                    "IPv4",
                    IpAddr::V4(v4),
                    IpAddr::V4(V4_MISS),
                )?);
            }
            rows.push(measure(
                &mut e,
                opts,
                "IPv6",
                IpAddr::V6(V6_TARGET),
                IpAddr::V6(V6_MISS),
            )?);
            for r in rows {
                let _ = writeln!(
                    cost,
                    "| {n} | {label} | {} | {} | {} | {:.0} | {:.0} | {} |",
                    r.family,
                    r.cached,
                    r.first_repeat,
                    r.first_single,
                    r.first_single - r.timer,
                    r.denied
                );
            }
        }
    }
    let harness4 = harness::harness_ns(
        &syn(IpAddr::V4(V4_MISS), SPORT, DPORT),
        opts.repeat,
        opts.trials,
    )?;
    let harness6 = harness::harness_ns(
        &syn(IpAddr::V6(V6_MISS), SPORT, DPORT),
        opts.repeat,
        opts.trials,
    )?;
    println!(
        "Test-run harness (an empty cgroup_skb program, same frames and repeat): IPv4 {harness4} ns, IPv6 {harness6} ns per run\n"
    );
    println!(
        "Setup (ms): parsing and compiling the policy, loading the object, filling the maps\n"
    );
    println!("{setup}");
    println!(
        "Per-packet cost (ns per packet, egress_cgroup, TCP SYN to port {DPORT}; repeat {}, median of {} calls; {} distinct flows)\n",
        opts.repeat, opts.trials, opts.flows
    );
    println!("{cost}");
    Ok(())
}

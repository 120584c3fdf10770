//! The agent's share of DNS learning, without the network: the answers `dns-serve` gives,
//! through the real kernel program (`BPF_PROG_TEST_RUN` of the query and the answer, so the
//! kernel learns the addresses and hands the answer over the `DNS_EVENTS` ring), then the
//! agent's learner on the real maps, as its control task runs it.
//!
//! Round 1 asks every name once (each address is new to the agent); later rounds ask them
//! again (the kernel refreshes what it holds; the agent's bookkeeping sees the same
//! addresses again), which is what a busy node sees most. Reports the learner's CPU time
//! per answer (the thread's own CPU clock, so the kernel program's runs are not in it), and
//! the resident memory the bookkeeping added.
use std::{net::Ipv6Addr, time::Instant};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, RingBuf};
use egress_agent::{
    compile::{compile, settings},
    dns::{answer::decode_dns, learner::Learner},
    loader::{EGRESS_CGROUP, Enforcer, INGRESS_CGROUP},
    policy::{Mode, parse},
    sys::boot_time_ns,
};
use egress_test_support::frame;

use crate::dns::{RECORDS, answer, query};

const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
const RESOLVER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 2);
const CLIENT_PORT: u16 = 40000;
const PASS: u32 = 1;

pub struct Options {
    pub names: u32,
    pub zones: u32,
    pub rounds: u32,
}

/// The benchmark's policy: `zones` wildcard patterns on TCP 443, room for `addresses`.
fn policy_yaml(zones: u32, addresses: u32) -> String {
    let mut y = format!(
        "mode: enforce\ndns:\n  resolvers: [{RESOLVER}]\n  max_ips: {addresses}\n  max_ips_per_name: 65536\nallow:\n"
    );
    for z in 0..zones {
        y.push_str(&format!(
            "  - fqdn: \"*.z{z}.bench.test\"\n    ports: [HTTPS:443]\n"
        ));
    }
    y
}

/// CPU time of the calling thread, in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Hands every answer waiting in the ring to the learner; returns (answers, learner CPU ns).
fn drain(
    ring: &mut RingBuf<MapData>,
    learner: &mut Learner,
    enforcer: &mut Enforcer,
) -> Result<(u64, u64)> {
    let (mut n, mut cpu) = (0, 0);
    while let Some(item) = ring.next() {
        let answer = decode_dns(&item).context("a DNS_EVENTS record")?;
        let t0 = thread_cpu_ns();
        learner.answer(enforcer, &answer, boot_time_ns())?;
        cpu += thread_cpu_ns() - t0;
        n += 1;
    }
    learner.drained();
    Ok((n, cpu))
}

pub fn run(opts: &Options) -> Result<()> {
    if opts.names == 0 || opts.names > 65_536 || opts.zones == 0 || opts.rounds == 0 {
        bail!("--names must be 1..=65536, --zones and --rounds at least 1");
    }
    // At most 1,048,576: LEARNED_LIMIT.
    let addresses = opts.names * u32::from(RECORDS);
    let policy = parse(&policy_yaml(opts.zones, addresses), "learn.yaml")?;
    let compiled = compile(&policy)?;
    let mut enforcer =
        Enforcer::load_for_test_run(&settings(Mode::Enforce, &policy.dns), policy.dns.max_ips)?;
    enforcer.write_policy(&compiled)?;
    enforcer.write_resolvers(&[RESOLVER.into()])?;
    let mut ring = enforcer.take_dns_events()?;
    let mut learner = Learner::new(compiled.names, compiled.port_sets, policy.dns.clone());
    let rss0 = rss_kib();
    println!(
        "| round | answers | learned (agent, total) | learner CPU µs / answer | wall µs / answer (kernel runs included) |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for round in 1..=opts.rounds {
        let started = Instant::now();
        let (mut answers, mut cpu) = (0u64, 0u64);
        for k in 0..opts.names {
            let id = u16::try_from(k & 0xffff).unwrap_or(0);
            let q = query(id, k, k % opts.zones);
            let a = answer(&q).context("the server's answer")?;
            let out = frame::dns(CLIENT.into(), RESOLVER.into(), CLIENT_PORT, 53, false, &q);
            let back = frame::dns(RESOLVER.into(), CLIENT.into(), 53, CLIENT_PORT, false, &a);
            if enforcer.test_run(EGRESS_CGROUP, &out, 1)?.return_value != PASS
                || enforcer.test_run(INGRESS_CGROUP, &back, 1)?.return_value != PASS
            {
                bail!("the query or the answer did not pass");
            }
            // The control task reads the ring as answers arrive; so does this.
            let (n, c) = drain(&mut ring, &mut learner, &mut enforcer)?;
            answers += n;
            cpu += c;
        }
        let wall = started.elapsed();
        if answers != u64::from(opts.names) {
            bail!(
                "round {round}: {answers} answers reached the agent, not {}",
                opts.names
            );
        }
        println!(
            "| {round} | {answers} | {} | {:.1} | {:.1} |",
            learner.len(),
            cpu as f64 / 1e3 / answers as f64,
            wall.as_secs_f64() * 1e6 / answers as f64,
        );
    }
    println!(
        "\nResident memory the learner's bookkeeping added: {:.1} MiB ({} addresses); counters {:?}",
        (rss_kib().saturating_sub(rss0)) as f64 / 1024.0,
        learner.len(),
        learner.counters
    );
    Ok(())
}

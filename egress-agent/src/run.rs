//! `egress-agent run`: load, fill, attach, report, and detach on SIGTERM/SIGINT.
use std::path::PathBuf;

use anyhow::Context as _;
use egress_common::{MODE_AUDIT, MODE_ENFORCE, Settings};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cgroup::{CgroupNames, cgroup2_mount},
    compile::compile,
    events,
    loader::Enforcer,
    policy::{self, DnsSettings, Mode},
};

/// What `run` needs, resolved from the command line.
pub struct RunOptions {
    pub config: PathBuf,
    pub mode: Option<Mode>,
    pub cgroup: Option<PathBuf>,
    pub interfaces: Vec<String>,
}

/// Events each CPU may emit per second, and in a burst: enough to see every distinct
/// would-drop during a rollout, bounded so that a flood cannot starve the agent.
const EVENTS_PER_SEC: u32 = 200;
const EVENTS_BURST: u32 = 1000;
/// A TCP flow idle this long is decided afresh (like conntrack, but shorter: a decided
/// flow outlives the DNS answer that allowed it only while it is in use).
const TCP_IDLE_SECS: u64 = 3600;
const OTHER_IDLE_SECS: u64 = 120;

pub fn settings(mode: Mode, dns: &DnsSettings) -> Settings {
    Settings {
        mode: match mode {
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        },
        _pad: [0; 3],
        events_per_sec: EVENTS_PER_SEC,
        events_burst: EVENTS_BURST,
        _pad2: 0,
        tcp_idle_ns: TCP_IDLE_SECS * 1_000_000_000,
        other_idle_ns: OTHER_IDLE_SECS * 1_000_000_000,
        dns_min_ttl: dns.min_ttl,
        dns_max_ttl: dns.max_ttl,
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let policy = policy::load(&opts.config)?;
    let compiled = compile(&policy).with_context(|| format!("{}", opts.config.display()))?;
    let mode = opts.mode.unwrap_or(policy.mode);
    let root = cgroup2_mount().context("finding the cgroup2 mount")?;
    let cgroup = opts.cgroup.clone().unwrap_or_else(|| root.clone());

    let mut enforcer = Enforcer::load(&settings(mode, &policy.dns)).context("loading the kernel programs")?;
    enforcer
        .write_policy(&compiled)
        .context("writing the policy into the kernel maps")?;
    let ring = enforcer
        .take_events()
        .context("opening the event ring buffer")?;
    enforcer
        .attach_cgroup(&cgroup)
        .context("attaching to the cgroup")?;
    for interface in &opts.interfaces {
        enforcer
            .attach_interface(interface)
            .with_context(|| format!("attaching to interface {interface}"))?;
    }
    log::info!(
        "attached: mode {mode}, {} rules ({} CIDR entries), cgroup {}{}",
        policy.rules.len(),
        compiled.cidrs.len(),
        cgroup.display(),
        if opts.interfaces.is_empty() {
            String::new()
        } else {
            format!(", interfaces {}", opts.interfaces.join(","))
        }
    );

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let reader = tokio::spawn(events::forward(ring, CgroupNames::new(root)));
    let outcome = tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        _ = int.recv() => Ok("SIGINT"),
        r = reader => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("the event reader stopped")),
            Ok(Err(e)) => Err(e.context("reading events")),
            Err(e) => Err(anyhow::Error::from(e).context("the event reader panicked")),
        },
    };
    let stats = enforcer.stats().context("reading counters")?;
    drop(enforcer);
    let signal = outcome?;
    log::info!(
        "{signal}: detached; allowed {} dropped {} audited {} events lost {}",
        stats.allowed,
        stats.dropped,
        stats.audited,
        stats.events_lost
    );
    Ok(())
}

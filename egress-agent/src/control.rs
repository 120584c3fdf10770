//! The agent's control task: the one owner of the kernel state (the enforcer and its maps)
//! and of the DNS learner. It applies DNS answers, expires learned addresses once a second,
//! applies policy reloads, attaches to new links to workloads, keeps the pinned name
//! records and a previous agent's port sets up to date, publishes the counters for `/metrics` once a second, and on stop leaves the
//! pinned state in place or removes it (`--on-exit`) and reports the counters.
use std::{
    path::PathBuf,
    sync::{Arc, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use serde_json::json;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, watch},
};

use crate::{
    adopt::LegacySets,
    compile::{compile_with, settings},
    dns::{
        answer::decode_dns,
        learner::{Learner, LearnerCounters},
        resolvers, seen,
    },
    lifecycle,
    loader::{Enforcer, KernelState, LoadError, Stats},
    metrics::{Reloads, Running, Snapshot},
    pin::PinRoot,
    plural::counted,
    policy::{self, Mode},
    record,
    reload::Reloaded,
    sys::{boot_time_ns, give_back_freed_memory},
    workloads::WorkloadLinks,
};

const EXPIRY_PERIOD: Duration = Duration::from_secs(1);
/// After handling answers, the agent waits this long before reading the ring again.
const BATCH_PAUSE: Duration = Duration::from_millis(1);
/// Name records written per tick at most: a few milliseconds of map writes, so a burst of
/// new addresses never holds up the answers queued behind it.
const JOURNAL_BUDGET: usize = 2048;
/// Learned addresses read back per tick after lost answers: a few milliseconds of map
/// lookups, since answers are lost when the agent is already short of CPU (a pass over
/// 100,000 addresses takes 25 s).
const RECHECK_BUDGET: usize = 4096;

/// Byte records taken one at a time: a ring buffer of the kernel's, or a test's list.
pub trait Records {
    /// Hands the next record to `f` and returns what `f` returned; `None` when none is left.
    fn next_with<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Option<T>;
}

impl Records for RingBuf<MapData> {
    fn next_with<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Option<T> {
        self.next().map(|item| f(&item))
    }
}

/// The control task's state; `M`: the kernel state it owns (the enforcer, but for tests).
pub struct Control<M = Enforcer> {
    pub enforcer: M,
    pub learner: Learner,
    /// `--mode`, which wins over the policy's `mode` on every reload too.
    pub mode_override: Option<Mode>,
    /// The size `LEARNED` was created with; `dns.max_ips` cannot grow past it until a restart.
    pub learned_capacity: u32,
    /// `--on-exit keep`: leave the pinned programs enforcing when the agent stops.
    pub keep_on_exit: bool,
    /// A previous agent's port sets still in use (empty on a first start).
    pub legacy: LegacySets,
    /// The last flush left records for the next one (a burst of new addresses).
    pub journal_behind: bool,
    /// `DNS_EVENTS` records the kernel lost to a full ring, as of the last recheck's start.
    pub dns_events_lost: u64,
    /// Where the applied policy is recorded (see `record`), and the file it is read from.
    pub pins: PinRoot,
    pub config: PathBuf,
    /// The policy in force.
    pub running: Running,
    /// Reloads applied and rejected, for `/metrics`.
    pub reloads: Reloads,
    /// The names asked for addresses, for the events.
    pub names: seen::Shared,
}

/// What the agent did, for its last log lines.
pub struct Report {
    pub stats: Stats,
    pub learner: LearnerCounters,
}

impl<M: KernelState> Control<M> {
    /// Writes what changed in the learner's bookkeeping to the pinned name records.
    /// Returns whether everything is written (a burst takes several flushes).
    fn flush_journal(&mut self, budget: usize) -> anyhow::Result<bool> {
        let changes = self.learner.journal_changes(budget);
        self.enforcer
            .update_learned_names(&changes.delete, &changes.put)
            .context("writing the learned names' records")?;
        if changes.complete && self.journal_behind {
            // A burst is recorded: the tables that grew for it and the flushes' buffers
            // leave freed heap behind (~9 MiB after 100,000 new addresses).
            give_back_freed_memory();
        }
        self.journal_behind = !changes.complete;
        Ok(changes.complete)
    }

    /// Once a second: expiry, a recheck after lost answers (`stats`: this second's counters,
    /// if they could be read), a previous agent's port sets nothing refers to any more, the
    /// name records.
    fn tick(&mut self, stats: Option<&Stats>) -> anyhow::Result<()> {
        let now = boot_time_ns();
        self.learner.expire(&mut self.enforcer, now)?;
        let lost = stats.map_or(self.dns_events_lost, |s| s.dns_events_lost);
        // Losses during a pass start another once it is done.
        if lost != self.dns_events_lost && !self.learner.rechecking() {
            log::warn!(
                "{} DNS answers were lost to a full ring buffer; rechecking every learned address",
                lost.wrapping_sub(self.dns_events_lost)
            );
            self.dns_events_lost = lost;
            self.learner.start_recheck();
        }
        self.learner
            .recheck_some(&mut self.enforcer, now, RECHECK_BUDGET)?;
        let gone = self.legacy.expire(now);
        if !gone.is_empty() {
            self.enforcer.remove_ports(&gone)?;
            log::debug!("removed {} port entries of the previous agent", gone.len());
        }
        self.flush_journal(JOURNAL_BUDGET).map(drop)
    }

    /// The counters for `/metrics`; a failed read only skips this publication.
    fn publish(
        &self,
        stats: Result<Stats, LoadError>,
        snapshots: &watch::Sender<Option<Snapshot>>,
    ) {
        match stats {
            Ok(stats) => {
                let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = snapshots.send(Some(Snapshot {
                    stats,
                    learner: self.learner.counters,
                    learned: self.learner.len(),
                    learned_capacity: self.learned_capacity,
                    names_seen: names.len(),
                    names_evicted: names.evicted,
                    policy: self.enforcer.policy_entries(),
                    running: self.running,
                }));
            }
            Err(e) => log::warn!(
                "reading counters for /metrics: {:#}",
                anyhow::Error::from(e)
            ),
        }
    }

    /// Applies a reloaded policy; on error the running policy stays in force (a compile
    /// error changes nothing; a kernel map error mid-way is logged as such). Returns the
    /// applied policy's hash, which covers its lists as they were read.
    fn reload(&mut self, Reloaded { policy, bytes }: Reloaded) -> anyhow::Result<[u8; 32]> {
        let compiled = compile_with(&policy, self.learner.port_sets().clone())?;
        let resolvers = resolvers::for_policy(&policy.dns, !compiled.names.is_empty())?;
        let policy_sets = compiled.sets_in_use()?;
        let mode = self.mode_override.unwrap_or(policy.mode);
        let mut dns = policy.dns.clone();
        if dns.max_ips > self.learned_capacity {
            log::warn!(
                "dns.max_ips {} exceeds the learned-address map's size {}; it takes effect on restart",
                dns.max_ips,
                self.learned_capacity
            );
            dns.max_ips = self.learned_capacity;
        }
        self.enforcer
            .write_policy(&compiled)
            .context("writing the new policy")?;
        self.enforcer
            .write_resolvers(&resolvers)
            .context("writing the trusted resolvers")?;
        self.enforcer
            .write_settings(&settings(mode, &dns))
            .context("writing the settings")?;
        self.learner.reload(
            &mut self.enforcer,
            compiled.names,
            compiled.port_sets,
            dns,
            &policy_sets,
            boot_time_ns(),
        )?;
        let manifest = policy::manifest(&policy.lists);
        self.enforcer
            .record_policy(
                &self.pins,
                &self.config,
                &record::content(&bytes, &manifest),
            )
            .context("recording the policy")?;
        let rules = policy.rules.len() + policy.lists.len();
        let cidr_entries = compiled.cidrs.len() + compiled.hosts.len();
        log::info!(
            "policy reloaded: mode {mode}, {} ({})",
            counted(rules, "rule", "rules"),
            counted(cidr_entries, "CIDR entry", "CIDR entries")
        );
        lifecycle::emit(
            "policy_reloaded",
            json!({"mode": mode.to_string(), "rules": rules, "cidr_entries": cidr_entries}),
        );
        Ok(policy::policy_sha256(&bytes, &manifest))
    }

    /// Hands every answer queued in `ring` to the learner and the names asked for
    /// addresses; returns how many. A record that is no answer is logged and skipped.
    fn drain(&mut self, ring: &mut impl Records) -> anyhow::Result<usize> {
        let mut answers = 0;
        let names = Arc::clone(&self.names);
        let mut names = names.lock().unwrap_or_else(PoisonError::into_inner);
        let mut take = |item: &[u8]| -> anyhow::Result<usize> {
            let Some(answer) = decode_dns(item) else {
                log::warn!("ignoring a DNS event of {} bytes", item.len());
                return Ok(0);
            };
            names.answer(&answer);
            self.learner
                .answer(&mut self.enforcer, &answer, boot_time_ns())?;
            Ok(1)
        };
        while let Some(taken) = ring.next_with(&mut take) {
            answers += taken?;
        }
        Ok(answers)
    }
}

impl Control {
    /// Runs until `stop` turns true, then releases the enforcer (see `keep_on_exit`) and
    /// returns the counters. `old_dns_ring` is a predecessor's ring buffer that this agent
    /// replaced (another size: an upgrade); its programs are detached, so what it holds
    /// (the answers they learned from while no agent ran) is read once, first. A program
    /// that was still running when its link went may add a record after that: it is lost,
    /// like a record that finds the ring full.
    pub async fn run(
        mut self,
        mut workloads: Option<WorkloadLinks>,
        dns_ring: RingBuf<MapData>,
        old_dns_ring: Option<RingBuf<MapData>>,
        mut reloads: mpsc::Receiver<Reloaded>,
        snapshots: watch::Sender<Option<Snapshot>>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Report> {
        if let Some(mut old) = old_dns_ring {
            let answers = self.drain(&mut old)?;
            log::info!("read {answers} answers queued in the replaced DNS ring buffer");
            lifecycle::emit("replaced_dns_ring_read", json!({"answers": answers}));
        }
        self.publish(self.enforcer.stats(), &snapshots);
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd lives.
        let mut ring = unsafe { AsyncFd::register_with_interest(dns_ring, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        let mut tick = tokio::time::interval(EXPIRY_PERIOD);
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let answers = self.drain(guard.get_inner_mut())?;
                    self.learner.drained();
                    guard.clear_ready();
                    if answers > 0 {
                        // Lets answers gather: a wakeup per answer or two costs more than
                        // the answer under a flood. The kernel has learned them already,
                        // and the ring holds ~50 ms of a 50,000/s flood.
                        tokio::time::sleep(BATCH_PAUSE).await;
                    }
                }
                _ = tick.tick() => {
                    let stats = self.enforcer.stats();
                    self.tick(stats.as_ref().ok())?;
                    self.publish(stats, &snapshots);
                }
                followed = follow(&mut workloads, &mut self.enforcer) => followed?,
                Some(reloaded) = reloads.recv() => {
                    match self.reload(reloaded) {
                        Ok(sha256) => {
                            self.reloads.applied();
                            self.running = Running::now(sha256);
                        }
                        Err(e) => {
                            self.reloads.rejected();
                            log::error!("policy reload failed: {e:#}; the running policy stays in force");
                            lifecycle::emit("policy_reload_rejected", json!({"error": format!("{e:#}")}));
                        }
                    }
                    give_back_freed_memory();
                }
                _ = stop.changed() => break,
            }
        }
        let stats = self.enforcer.stats().context("reading counters")?;
        let _ = snapshots.send(None);
        if self.keep_on_exit {
            while !self.flush_journal(usize::MAX)? {}
        }
        self.enforcer
            .release(self.keep_on_exit)
            .context("releasing the kernel state")?;
        Ok(Report {
            stats,
            learner: self.learner.counters,
        })
    }
}

/// Follows the links to workloads, if there are any to follow.
async fn follow(links: &mut Option<WorkloadLinks>, enforcer: &mut Enforcer) -> anyhow::Result<()> {
    match links {
        Some(links) => links.follow(enforcer).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;

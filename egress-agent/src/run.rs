//! `egress-agent run`: load (taking over a previous agent's pinned state), fill, attach,
//! report, reload on change, and on SIGTERM/SIGINT leave the pinned state enforcing or
//! remove it (`--on-exit`).
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, RingBuf};
use egress_common::{FLOWS, hosts_capacity};
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    adopt::LegacySets,
    cgroup::{CgroupNames, cgroup2_mount, is_cgroup2_dir},
    compile::{OTHER_IDLE_NS, TCP_IDLE_NS, compile, compile_with, settings, single_addresses},
    control::Control,
    denials::Idle,
    dns::{
        learner::{LearnedStore as _, Learner},
        resolvers,
        seen::SeenNames,
    },
    events::{self, FlowsMap, Who},
    http, kubeconfig, lifecycle,
    loader::{Enforcer, LinkSide, Replacement},
    metrics::{Reloads, Running},
    pin::{Contents, LinkPin, PinRoot},
    plural::counted,
    podinfo::PodLogs,
    policy::{self, Mode, Policy},
    port_sets::PortSets,
    record, reload,
    sys::{boot_time_ns, give_back_freed_memory},
    workloads::{InterfacePatterns, WorkloadLinks, interface_index},
};

/// What `run` needs, resolved from the command line.
pub struct RunOptions {
    pub config: PathBuf,
    pub mode: Option<Mode>,
    pub cgroup: Option<PathBuf>,
    pub interfaces: Vec<String>,
    /// `--workload-interface`, as given (checked by `run`).
    pub workload_interfaces: Vec<String>,
    pub listen: SocketAddr,
    pub pin_root: PathBuf,
    pub on_exit: OnExit,
    /// The kubelet's kubeconfig, whose `server:` names the cluster's API server.
    pub kubeconfig: PathBuf,
    /// The root of the kubelet's log layout, which names the pods in events.
    pub pod_logs: PathBuf,
    /// Print each learned address as a `learned` event.
    pub learned_events: bool,
}

/// What happens to enforcement when the agent stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Programs, links and maps stay pinned and keep enforcing; the next agent takes over.
    Keep,
    /// Every attachment and pin is removed.
    Detach,
}

/// Why a task that runs for the agent's lifetime ended early.
fn task_failure(
    what: &str,
    joined: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Error {
    match joined {
        Ok(Ok(())) => anyhow::anyhow!("{what} stopped"),
        Ok(Err(e)) => e.context(format!("{what} failed")),
        Err(e) => anyhow::Error::from(e).context(format!("{what} panicked")),
    }
}

/// Checks what `run` was given before anything is attached: a bad input found later would
/// fail the start with part of it attached.
fn check_inputs(cgroup: &Path, root: &Path, interfaces: &[String]) -> anyhow::Result<()> {
    let is_cgroup =
        is_cgroup2_dir(cgroup).with_context(|| format!("--cgroup {}", cgroup.display()))?;
    anyhow::ensure!(
        is_cgroup,
        "--cgroup {}: not a cgroup v2 directory (the cgroup2 hierarchy is mounted on {})",
        cgroup.display(),
        root.display()
    );
    for interface in interfaces {
        anyhow::ensure!(
            interface_index(interface).is_some(),
            "--interface {interface}: no such network interface"
        );
    }
    Ok(())
}

/// What a successful start hands over to the tasks that run the agent.
struct Started {
    listener: TcpListener,
    enforcer: Enforcer,
    workloads: Option<WorkloadLinks>,
    learner: Learner,
    legacy: LegacySets,
    ring: RingBuf<MapData>,
    flows: FlowsMap,
    dns_ring: RingBuf<MapData>,
    old_dns_ring: Option<RingBuf<MapData>>,
    /// The `attached` log line and event, announced once the policy is recorded too.
    attached: (String, Value),
}

/// Binds the address, loads (taking over what a previous agent left pinned), fills the
/// maps, attaches and retires the predecessor's programs. On error the enforcer is dropped,
/// closing every fd of this start: unpinning what it pinned then detaches it.
async fn start(
    opts: &RunOptions,
    policy: &Policy,
    resolvers: &[IpAddr],
    mode: Mode,
    cgroup: &Path,
    workload_interfaces: InterfacePatterns,
    pins: &PinRoot,
) -> anyhow::Result<Started> {
    let listener = http::bind(opts.listen).await?;
    let addr = listener.local_addr()?;
    log::info!("serving /metrics, /healthz and /readyz on http://{addr}");
    lifecycle::emit("serving", json!({"addr": addr.to_string()}));
    pins.prepare()
        .with_context(|| format!("--pin-root {}", opts.pin_root.display()))?;
    let mut enforcer = Enforcer::load(
        &settings(mode, &policy.dns),
        policy.dns.max_ips,
        hosts_capacity(single_addresses(policy)),
        Some(pins),
    )
    .context("loading the kernel programs")?;
    let now = boot_time_ns();
    let (legacy, port_sets, unused_sets) = if enforcer.adopted() {
        let learned = enforcer
            .learned_entries()
            .context("reading the pinned learned addresses")?;
        LegacySets::new(
            enforcer
                .port_keys()
                .context("reading the pinned port sets")?,
            &learned,
            now,
        )
    } else {
        (LegacySets::default(), PortSets::default(), Vec::new())
    };
    let compiled =
        compile_with(policy, port_sets).with_context(|| format!("{}", opts.config.display()))?;
    enforcer
        .write_policy(&compiled)
        .context("writing the policy into the kernel maps")?;
    enforcer
        .write_resolvers(resolvers)
        .context("writing the trusted resolvers")?;
    let pinned_names = enforcer
        .learned_names()
        .context("reading the pinned learned names")?;
    let mut learner = Learner::new(compiled.names, compiled.port_sets, policy.dns.clone());
    learner.announce_learned(opts.learned_events);
    learner
        .restore(&mut enforcer, &pinned_names, now)
        .context("taking over the learned addresses")?;
    enforcer
        .remove_ports(&unused_sets)
        .context("removing the previous agent's unused port sets")?;
    let ring = enforcer
        .take_events()
        .context("opening the event ring buffer")?;
    let flows = open_flows(pins).context("opening the flow map for the deny lines")?;
    let dns_ring = enforcer
        .take_dns_events()
        .context("opening the DNS ring buffer")?;
    enforcer
        .attach_cgroup(cgroup)
        .context("attaching to the cgroup")?;
    for interface in &opts.interfaces {
        enforcer
            .attach_interface(interface, LinkSide::Uplink)
            .with_context(|| format!("attaching to interface {interface}"))?;
    }
    let mut workload_links = Vec::new();
    let workloads = if workload_interfaces.is_empty() {
        None
    } else {
        let links = WorkloadLinks::start(workload_interfaces.clone(), &mut enforcer)?;
        workload_links = links.attached().map(ToOwned::to_owned).collect();
        workload_links.sort_unstable();
        log::info!(
            "workload interfaces {workload_interfaces}: attached to {} present ({}); \
             watching for new ones",
            workload_links.len(),
            workload_links.join(",")
        );
        Some(links)
    };
    let (retired, versions) = enforcer
        .retire_predecessors()
        .context("detaching the previous agent's programs")?;
    let old_dns_ring = enforcer
        .take_old_dns_events()
        .context("opening the previous DNS ring buffer")?;
    if !versions.is_empty() {
        let versions: Vec<String> = versions.iter().map(|v| v.display().to_string()).collect();
        log::warn!(
            "replaced the pinned state of another layout version ({}): {} attachments \
             replaced; its learned addresses were not carried over",
            versions.join(", "),
            retired.len()
        );
        lifecycle::emit(
            "replaced_layout",
            json!({"versions": versions, "attachments_replaced": retired.len()}),
        );
    }
    if enforcer.adopted() {
        log::info!(
            "took over the pinned state in {}: {} learned addresses, {} of the previous agent's \
             port sets still in use, {} of its attachments replaced",
            pins.dir().display(),
            learner.len(),
            legacy.len(),
            retired.len()
        );
        lifecycle::emit(
            "took_over",
            took_over(
                &pins.dir(),
                learner.len(),
                legacy.len(),
                retired.len(),
                enforcer.replacements(),
            ),
        );
    }
    let attached = Attached {
        mode,
        rules: policy.rules.len() + policy.lists.len(),
        cidr_entries: compiled.cidrs.len() + compiled.hosts.len(),
        cgroup,
        interfaces: &opts.interfaces,
        workload_interfaces: &workload_links,
        on_exit: opts.on_exit,
    };
    let attached = (attached.line(), attached.event());
    Ok(Started {
        listener,
        enforcer,
        workloads,
        learner,
        legacy,
        ring,
        flows,
        dns_ring,
        old_dns_ring,
        attached,
    })
}

/// What a start attached, for its log line and its `attached` event.
struct Attached<'a> {
    mode: Mode,
    rules: usize,
    cidr_entries: usize,
    cgroup: &'a Path,
    interfaces: &'a [String],
    /// The links to workloads present at the start (sorted).
    workload_interfaces: &'a [String],
    on_exit: OnExit,
}

impl Attached<'_> {
    fn line(&self) -> String {
        format!(
            "attached: mode {}, {} ({}), cgroup {}{}; on exit: {}",
            self.mode,
            counted(self.rules, "rule", "rules"),
            counted(self.cidr_entries, "CIDR entry", "CIDR entries"),
            self.cgroup.display(),
            if self.interfaces.is_empty() {
                String::new()
            } else {
                format!(", interfaces {}", self.interfaces.join(","))
            },
            match self.on_exit {
                OnExit::Keep => "keep enforcing",
                OnExit::Detach => "detach",
            }
        )
    }

    fn event(&self) -> Value {
        json!({
            "mode": self.mode.to_string(),
            "rules": self.rules,
            "cidr_entries": self.cidr_entries,
            "cgroup": self.cgroup,
            "interfaces": self.interfaces,
            "workload_interfaces": self.workload_interfaces,
            "on_exit": match self.on_exit {
                OnExit::Keep => "keep",
                OnExit::Detach => "detach",
            },
        })
    }
}

/// The `took_over` event: what this agent took over from the one before it, and the pinned
/// maps of another layout it replaced, with the entries it carried over.
fn took_over(
    pin_dir: &Path,
    learned: usize,
    legacy_port_sets: usize,
    attachments_replaced: usize,
    replacements: &[Replacement],
) -> Value {
    let replaced: Vec<Value> = replacements
        .iter()
        .map(|r| json!({"map": r.map, "why": r.why, "carried": r.carried}))
        .collect();
    json!({
        "pin_dir": pin_dir,
        "learned": learned,
        "legacy_port_sets": legacy_port_sets,
        "attachments_replaced": attachments_replaced,
        "replaced_maps": replaced,
    })
}

/// A second handle on the pinned `FLOWS`, for the event reader.
fn open_flows(pins: &PinRoot) -> anyhow::Result<FlowsMap> {
    let data = MapData::from_pin(pins.map_path(FLOWS))?;
    Ok(FlowsMap::try_from(Map::LruHashMap(data))?)
}

/// After a failed start: with `--on-exit detach`, removes what this start pinned, which
/// detaches what it attached, and never what a predecessor left (its programs go on
/// enforcing, as they did before this start); with `keep`, leaves it. Says what is left.
fn undo_start(
    error: anyhow::Error,
    pins: &PinRoot,
    before: &Contents,
    on_exit: OnExit,
) -> anyhow::Error {
    let mut left = Vec::new();
    match on_exit {
        OnExit::Detach => {
            let removal = pins.remove_added(before);
            left.extend(removal.left.iter().map(|e| format!("{e}")));
        }
        OnExit::Keep => match pins.links() {
            Ok(links) => {
                let added: Vec<_> = links
                    .into_iter()
                    .filter(|link| !before.links.contains(link))
                    .collect();
                if !added.is_empty() {
                    left.push(format!(
                        "this agent's attachments, kept by --on-exit keep: {}",
                        points(&added)
                    ));
                }
            }
            Err(e) => left.push(format!("whatever this agent pinned ({e})")),
        },
    }
    if !before.links.is_empty() {
        left.push(format!(
            "the previous agent's pinned state in {}, enforcing through its attachments {}",
            pins.root().display(),
            points(&before.links)
        ));
    } else if !before.is_empty() {
        left.push(format!(
            "what a previous agent left pinned in {} (no attachments)",
            pins.root().display()
        ));
    }
    if left.is_empty() {
        error.context("the start failed; nothing of it is left attached or pinned")
    } else {
        error.context(format!("the start failed; left: {}", left.join("; ")))
    }
}

/// `cgroup-<inode>-egress, ...`: the attach points of `links`.
fn points(links: &[LinkPin]) -> String {
    links
        .iter()
        .map(|link| link.point.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // First of all: a SIGTERM that came before the handlers would kill the agent without
    // `--on-exit` taking effect. One that comes while loading is acted on once attached.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // aya probes the kernel's BPF features once, loading a few dozen test programs and maps
    // (~25 ms): done meanwhile, the policy's parse and compile hide it.
    std::thread::spawn(aya::features);
    // The bytes go to the policy watcher: a change made while the agent starts is one.
    let loaded = policy::read(&opts.config)?;
    let source = opts.config.display().to_string();
    let kubelet = kubeconfig::api_server(&opts.kubeconfig)
        .inspect_err(|e| log::warn!("{e}: its API server name is not used"))
        .ok()
        .flatten();
    let policy = policy::parse_bytes(&loaded, &source, kubelet.as_ref())?;
    policy::log_notices(&policy, &source);
    // Checked before anything in the kernel changes; compiled again below into the port set
    // registry that follows a previous agent's.
    let has_names = !compile(&policy)
        .with_context(|| format!("{}", opts.config.display()))?
        .names
        .is_empty();
    let mode = opts.mode.unwrap_or(policy.mode);
    let root = cgroup2_mount().context("finding the cgroup2 mount")?;
    let cgroup = opts.cgroup.clone().unwrap_or_else(|| root.clone());
    let resolvers = resolvers::for_policy(&policy.dns, has_names)?;
    check_inputs(&cgroup, &root, &opts.interfaces)?;
    let workload_interfaces = InterfacePatterns::parse(&opts.workload_interfaces)?;
    // The lock first: an agent started while its predecessor runs (an upgrade) waits here,
    // before binding the address its predecessor still serves, and looks at the pin root
    // only once its predecessor is done with it.
    let pins = PinRoot::new(&opts.pin_root);
    let _lock = pins
        .take()
        .with_context(|| format!("--pin-root {}", opts.pin_root.display()))?;
    let before = pins
        .contents()
        .with_context(|| format!("--pin-root {}", opts.pin_root.display()))?;
    // The lists' hashes, as read with the policy: the policy's hash covers them.
    let manifest = policy::manifest(&policy.lists);
    let started = start(
        &opts,
        &policy,
        &resolvers,
        mode,
        &cgroup,
        workload_interfaces,
        &pins,
    )
    .await
    .and_then(|started| {
        // What `status --rules` and `explain` name the maps' entries by.
        record::write(&pins, &opts.config, &record::content(&loaded, &manifest))
            .context("recording the policy")?;
        let (line, event) = &started.attached;
        log::info!("{line}");
        lifecycle::emit("attached", event.clone());
        Ok(started)
    })
    .map_err(|e| undo_start(e, &pins, &before, opts.on_exit))?;
    let learned_capacity = policy.dns.max_ips;
    let running = Running::now(policy::policy_sha256(&loaded, &manifest));
    let reloads = Reloads::default();
    let lists = reload::ListFiles::of(&policy);
    // Enforcing does not need the parsed policy (a reload reads the file again), and with
    // a large policy it is tens of MiB.
    drop(policy);
    give_back_freed_memory();

    let names = SeenNames::shared();
    let control = Control {
        enforcer: started.enforcer,
        learner: started.learner,
        mode_override: opts.mode,
        learned_capacity,
        keep_on_exit: opts.on_exit == OnExit::Keep,
        legacy: started.legacy,
        journal_behind: false,
        dns_events_lost: 0,
        pins: pins.clone(),
        config: opts.config.clone(),
        running,
        reloads: reloads.clone(),
        names: Arc::clone(&names),
    };
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (snapshot_tx, snapshot_rx) = watch::channel(None);
    let server = tokio::spawn(http::serve(
        started.listener,
        http::Endpoints::new(snapshot_rx.clone(), &reloads),
    ));
    let mut reader = tokio::spawn(events::forward(
        started.ring,
        Who {
            cgroups: CgroupNames::new(root),
            pods: PodLogs::new(opts.pod_logs.clone()),
            asked: names,
        },
        snapshot_rx,
        started.flows,
        stop_rx.clone(),
        Idle {
            tcp_ns: TCP_IDLE_NS,
            other_ns: OTHER_IDLE_NS,
        },
    ));
    let watcher = tokio::spawn(reload::watch(
        opts.config.clone(),
        loaded,
        lists,
        kubelet,
        reload_tx,
        reloads,
    ));
    let mut control = tokio::spawn(control.run(
        started.workloads,
        started.dns_ring,
        started.old_dns_ring,
        reload_rx,
        snapshot_tx,
        stop_rx,
    ));
    let outcome = tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        _ = int.recv() => Ok("SIGINT"),
        r = &mut reader => Err(task_failure("the event reader", r)),
        r = watcher => Err(task_failure("the policy watcher", r)),
        r = server => Err(task_failure("the metrics server", r)),
        r = &mut control => {
            return Err(match r {
                Ok(Ok(_)) => anyhow::anyhow!("the control task stopped"),
                Ok(Err(e)) => e.context("the control task failed"),
                Err(e) => anyhow::Error::from(e).context("the control task panicked"),
            });
        }
    };
    // The control task owns the enforcer: stopping it keeps or removes the pinned state.
    let _ = stop_tx.send(true);
    if !reader.is_finished() {
        // It prints the deny lines it holds, then ends.
        reader.await.context("the event reader panicked")??;
    }
    let report = control.await.context("the control task panicked")??;
    let signal = outcome?;
    let (stats, learned) = (report.stats, report.learner);
    log::info!(
        "{signal}: {}; allowed {} dropped {} audited {} events lost {}",
        match opts.on_exit {
            OnExit::Keep => "left the pinned programs enforcing",
            OnExit::Detach => "detached and removed the pinned state",
        },
        stats.allowed,
        stats.dropped,
        stats.audited,
        stats.events_lost
    );
    log::info!(
        "dns: answers {} learned {} (kernel: answers {} learned {} untrusted {} unsolicited {} unmatched {} malformed {} lost {}); agent: off-chain {} unmatched {} malformed {} evicted {} expired {}",
        learned.answers,
        learned.learned,
        stats.dns_answers,
        stats.dns_learned,
        stats.dns_untrusted,
        stats.dns_unsolicited,
        stats.dns_unmatched,
        stats.dns_malformed,
        stats.dns_events_lost,
        learned.off_chain,
        learned.unmatched,
        learned.malformed,
        learned.evicted,
        learned.expired
    );
    Ok(())
}

#[cfg(test)]
mod tests;

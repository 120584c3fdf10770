//! Loading the kernel object: its maps (pinned, taken over or replaced) and its cgroup
//! programs, verified in parallel; and loading it for `BPF_PROG_TEST_RUN`.
use std::{sync::OnceLock, time::Instant};

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions, TestRunResult,
    maps::MapData,
    programs::{CgroupSkb, Program, ProgramError, ProgramInfo},
};
use egress_common::{
    Addr, DNS_EVENTS, DNS_QUERIES, FLOWS, HOSTS, LEARNED, LearnedValue, QueryKey, QueryValue,
    Settings,
};

use super::{
    EGRESS_CGROUP, Enforcer, INGRESS_CGROUP, LoadError, PINNED_MAPS, Pinned, Replacement, Written,
    map_err, memlock,
    pins::{carry_over, carry_over_flows, layout_difference, learned_names_map},
    prog_err,
};
use crate::pin::PinRoot;

/// The kernel object built by `build.rs` from the `egress-ebpf` crate.
pub(super) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

impl Enforcer {
    /// Loads the object and its cgroup programs (so verifier errors surface before anything
    /// is attached) and writes the settings; nothing is attached yet. The TC programs are
    /// loaded by the first `attach_interface`: verifying them costs start-up time (about a
    /// second for the DNS parser) that a cgroup-only agent need not pay.
    /// `max_learned` sizes `LEARNED` (the policy's `dns.max_ips`), `max_hosts` `HOSTS`
    /// (`egress_common::hosts_capacity`). With `pins` (prepared and locked), the shared maps
    /// are pinned there or taken over from a previous agent (see the module's doc).
    pub fn load(
        settings: &Settings,
        max_learned: u32,
        max_hosts: u32,
        pins: Option<&PinRoot>,
    ) -> Result<Self, LoadError> {
        Self::load_object(settings, max_learned, Some(max_hosts), pins, false)
    }

    /// Loads the object for [`Enforcer::test_run`] (the kernel tests and the benchmarks),
    /// never to attach. `BPF_PROG_TEST_RUN` gives each run a dummy socket of its own, so the
    /// programs are told (`TEST_RUN`) to see every packet as socketless, as the TC programs
    /// see forwarded packets: a query and its answer, or a flow's two directions, are then
    /// the same "socket" across runs.
    pub fn load_for_test_run(settings: &Settings, max_learned: u32) -> Result<Self, LoadError> {
        Self::load_object(settings, max_learned, None, None, true)
    }

    fn load_object(
        settings: &Settings,
        max_learned: u32,
        max_hosts: Option<u32>,
        pins: Option<&PinRoot>,
        test_run: bool,
    ) -> Result<Self, LoadError> {
        memlock::lift_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(LEARNED, max_learned);
        if let Some(max_hosts) = max_hosts {
            loader.map_max_entries(HOSTS, max_hosts);
        }
        if test_run {
            loader.override_global(TEST_RUN, &1u8, true);
        }
        crate::kernel_log::configure(&mut loader);
        let mut replaced: Vec<(&'static str, String, MapData)> = Vec::new();
        let mut adopted = false;
        if let Some(pins) = pins {
            let object = aya_obj::Object::parse(OBJECT)?;
            for name in PINNED_MAPS {
                let def = object.maps.get(name).ok_or(LoadError::MissingMap(name))?;
                let max_entries = match (name, max_hosts) {
                    (LEARNED, _) => max_learned,
                    (HOSTS, Some(max_hosts)) => max_hosts,
                    _ => def.max_entries(),
                };
                let path = pins.map_path(name);
                if path.exists() {
                    adopted = true;
                    let data = MapData::from_pin(&path)
                        .map_err(map_err(format!("opening {}", path.display())))?;
                    let info = data.info().map_err(map_err(format!("reading {name}")))?;
                    if let Some(why) = layout_difference(&info, def, max_entries)? {
                        log::warn!("pinned map {name} differs ({why}): replacing it");
                        replaced.push((name, why, data));
                        continue;
                    }
                }
                loader.map_pin_path(name, path);
            }
        }
        let started = Instant::now();
        let mut ebpf = loader.load(OBJECT)?;
        log::debug!("maps created or opened in {:?}", started.elapsed());
        let mut replaced_names = Vec::new();
        let mut replacements = Vec::new();
        let mut old_dns_events = None;
        for (name, why, old) in replaced {
            replaced_names.push(name);
            let new = ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
            let copied = match name {
                LEARNED => carry_over::<Addr, LearnedValue>(old, new, name)?,
                FLOWS => carry_over_flows(old, new)?,
                DNS_QUERIES => carry_over::<QueryKey, QueryValue>(old, new, name)?,
                DNS_EVENTS => {
                    old_dns_events = Some(old);
                    0
                }
                _ => 0,
            };
            if copied > 0 {
                log::info!("carried {copied} entries of {name} over to its replacement");
            }
            replacements.push(Replacement {
                map: name,
                why,
                carried: copied,
            });
        }
        load_in_parallel(&mut ebpf, &[EGRESS_CGROUP, INGRESS_CGROUP])?;
        crate::kernel_log::start(&mut ebpf);
        let pinned = match pins {
            Some(pins) => Some(Pinned {
                root: pins.clone(),
                replaced: replaced_names,
                taken: Vec::new(),
                links: Vec::new(),
                netlink_filters: Vec::new(),
                learned_names: learned_names_map(pins, max_learned)?,
                adopted,
                replacements,
                old_dns_events,
            }),
            None => None,
        };
        let mut enforcer = Self {
            ebpf,
            written: Written::default(),
            pinned,
        };
        enforcer.read_written()?;
        enforcer.write_settings(settings)?;
        Ok(enforcer)
    }

    /// Runs a program once per `repeat` on a crafted packet (`BPF_PROG_TEST_RUN`): how the
    /// tests check the verdict and how the benchmarks measure its cost. `frame` starts with
    /// an Ethernet header even for the cgroup programs: the kernel strips it for them.
    pub fn test_run(
        &self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunResult, LoadError> {
        static CONTEXT: OnceLock<Option<Vec<u8>>> = OnceLock::new();
        // Built once: reading sysfs between runs would also evict what a run finds cached.
        let ctx = CONTEXT
            .get_or_init(test_run_context)
            .as_deref()
            .ok_or(LoadError::NoTestInterface)?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(ctx),
            repeat,
            ..Default::default()
        };
        match self.ebpf.program(name) {
            Some(Program::CgroupSkb(p)) => p.test_run(opts),
            Some(Program::SchedClassifier(p)) => p.test_run(opts),
            _ => return Err(LoadError::MissingProgram(name)),
        }
        .map_err(prog_err(format!("test run of {name}")))
    }
}

/// Logs (debug) a program's load time and how many instructions the verifier processed
/// (kernels >= 5.16 say): the figure to watch when changing the kernel side.
pub(super) fn log_loaded(name: &str, started: Instant, info: Result<ProgramInfo, ProgramError>) {
    let processed = info
        .ok()
        .and_then(|i| i.verified_instruction_count())
        .map_or_else(|| "unknown".into(), |n| n.to_string());
    log::debug!(
        "{name} verified and loaded in {:?} ({processed} instructions processed)",
        started.elapsed()
    );
}

/// Loads the named cgroup programs, each on a thread of its own: verification is most of
/// the agent's start-up time, and the kernel verifies programs independently.
fn load_in_parallel(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), LoadError> {
    let programs: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| names.contains(name))
        .collect();
    if let Some(missing) = names
        .iter()
        .find(|name| !programs.iter().any(|(n, _)| n == *name))
    {
        return Err(LoadError::MissingProgram(missing));
    }
    std::thread::scope(|scope| {
        let loads: Vec<_> = programs
            .into_iter()
            .map(|(name, program)| {
                scope.spawn(move || -> Result<(), LoadError> {
                    let started = Instant::now();
                    let prog: &mut CgroupSkb = program
                        .try_into()
                        .map_err(prog_err(format!("{name} is no cgroup_skb program")))?;
                    prog.load().map_err(prog_err(format!("loading {name}")))?;
                    log_loaded(name, started, prog.info());
                    Ok(())
                })
            })
            .collect();
        loads
            .into_iter()
            .try_for_each(|load| load.join().expect("a program load panicked"))
    })
}

/// The global that [`Enforcer::load_for_test_run`] sets (see `egress-ebpf/src/packet.rs`).
const TEST_RUN: &str = "TEST_RUN";

/// A `struct __sk_buff` for `BPF_PROG_TEST_RUN` that puts the packet on a real interface:
/// by default the kernel puts it on loopback, which the programs wave through. The first
/// non-loopback interface of this network namespace serves; nothing is sent on it.
fn test_run_context() -> Option<Vec<u8>> {
    let ifindex = std::fs::read_dir("/sys/class/net")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|dev| std::fs::read_to_string(dev.path().join("ifindex")).ok())
        .filter_map(|index| index.trim().parse::<u32>().ok())
        .filter(|index| *index > 1)
        .min()?;
    let mut ctx = vec![0; SK_BUFF_SIZE];
    ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    Some(ctx)
}

/// `struct __sk_buff` (UAPI, stable): its size in 6.x (a kernel with a smaller one takes a
/// zero tail) and the offset of `ifindex`, after len, pkt_type, mark, queue_mapping,
/// protocol, vlan_present, vlan_tci, vlan_proto, priority and ingress_ifindex.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_IFINDEX: usize = 40;

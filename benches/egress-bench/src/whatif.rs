//! Two measurements the agent's own API cannot make, both labelled as such in the output:
//!
//! - **the test-run harness's own cost**: an empty `cgroup_skb` program (`r0 = 1; exit`),
//!   loaded with the raw `bpf(2)` syscall and run like the real one, so that the per-packet
//!   figures can be read as (figure - harness);
//! - **what if `CIDRS` held more than 65,536 entries**: the same kernel object (the one
//!   `egress-agent/build.rs` built, read from its build directory) loaded with `CIDRS`'s
//!   `max_entries` raised at load time, filled with N single-host entries, so the trie's
//!   lookup cost at 100k and 1M entries can be seen although the agent refuses such policies
//!   today.
use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    EbpfLoader, TestRun as _, TestRunOptions,
    maps::{Array, LpmTrie, lpm_trie::Key},
    programs::CgroupSkb,
};
use egress_agent::{policy::DnsSettings, policy::Mode, run::settings};
use egress_common::{ALL_PORTS, CIDRS, CidrKey, CidrValue, SETTINGS};

use crate::{
    addrs::{V6_MISS, V6_TARGET, v6_list},
    frames::syn,
};

const EGRESS_CGROUP: &str = "egress_cgroup";

/// `bpf(2)` attribute buffer; every command's attributes fit.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_u32(&self, at: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_ne_bytes(b)
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    let size = std::mem::size_of::<Attr>();
    // SAFETY: `attr` is a live, writable buffer of `size` bytes for the whole call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_EGRESS: u32 = 1;

/// Mean ns per run (median of `trials` calls) of an empty `cgroup_skb` program on `frame`.
pub fn harness_ns(frame: &[u8], repeat: u32, trials: usize) -> Result<u128> {
    // r0 = 1; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    let mut load = Attr::new();
    load.u32(0, BPF_PROG_TYPE_CGROUP_SKB);
    load.u32(4, 2);
    load.u64(8, insns.as_ptr() as u64);
    load.u64(16, license.as_ptr() as u64);
    load.u32(68, BPF_CGROUP_INET_EGRESS);
    let fd = bpf(BPF_PROG_LOAD, &mut load).context("loading the empty program")?;
    let fd = i32::try_from(fd).context("program fd")?;
    // SAFETY: `fd` is the fresh program descriptor the kernel just returned.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut durations = Vec::new();
    for _ in 0..trials.max(1) {
        let mut run = Attr::new();
        run.u32(
            0,
            u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap_or(0),
        );
        run.u32(8, u32::try_from(frame.len()).unwrap_or(0));
        run.u64(16, frame.as_ptr() as u64);
        run.u32(32, repeat);
        bpf(BPF_PROG_TEST_RUN, &mut run).context("running the empty program")?;
        if run.get_u32(4) != 1 {
            bail!("the empty program returned {}", run.get_u32(4));
        }
        durations.push(u128::from(run.get_u32(36)));
    }
    durations.sort_unstable();
    Ok(durations[durations.len() / 2])
}

/// The kernel object `egress-agent/build.rs` built most recently, next to this binary
/// (`target/<profile>/build/egress-agent-*/out/egress`).
pub fn find_object() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let build = exe
        .parent()
        .map(|d| d.join("build"))
        .context("no build directory next to this binary")?;
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(&build).with_context(|| format!("reading {}", build.display()))? {
        let entry = entry?;
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with("egress-agent-")
        {
            continue;
        }
        let object = entry.path().join("out/egress");
        if let Ok(meta) = fs::metadata(&object) {
            let modified = meta.modified()?;
            if best.as_ref().is_none_or(|(t, _)| modified > *t) {
                best = Some((modified, object));
            }
        }
    }
    best.map(|(_, p)| p)
        .with_context(|| format!("no egress-agent-*/out/egress under {}", build.display()))
}

/// Reads the object into 8-byte-aligned memory, as `include_bytes_aligned!` would hold it.
fn read_aligned(path: &Path) -> Result<(Vec<u64>, usize)> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    Ok((words, bytes.len()))
}

pub struct WhatIf {
    pub n: usize,
    pub fill_ms: f64,
    pub cached: u128,
    pub first_repeat: u128,
    pub denied: u128,
}

/// Loads `object` with `CIDRS` sized for `n`, fills it with the IPv6 list of `n` single
/// hosts (every port), and measures the IPv6 paths as `verdict` does.
pub fn raised_cidrs(object: &Path, n: usize, repeat: u32, trials: usize) -> Result<WhatIf> {
    let (words, len) = read_aligned(object)?;
    // SAFETY: `words` holds `len` initialised bytes (and a zero tail) and outlives `data`.
    let data = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), len) };
    let max = u32::try_from(n.max(1)).context("size")?;
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(CIDRS, max)
        .load(data)
        .context("loading the object with a larger CIDRS")?;
    {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(EGRESS_CGROUP)
            .context("no egress_cgroup program")?
            .try_into()?;
        prog.load()?;
    }
    let normal = settings(Mode::Enforce, &DnsSettings::default());
    let mut stale = normal;
    stale.tcp_idle_ns = 0;
    let write_settings = |ebpf: &mut aya::Ebpf, s| -> Result<()> {
        let mut a: Array<_, egress_common::Settings> =
            Array::try_from(ebpf.map_mut(SETTINGS).context("no SETTINGS")?)?;
        a.set(0, s, 0)?;
        Ok(())
    };
    write_settings(&mut ebpf, normal)?;
    let started = Instant::now();
    {
        let mut trie: LpmTrie<_, CidrKey, CidrValue> =
            LpmTrie::try_from(ebpf.map_mut(CIDRS).context("no CIDRS")?)?;
        let value = CidrValue {
            port_set: ALL_PORTS,
        };
        for a in v6_list(n) {
            trie.insert(&Key::new(128, CidrKey { addr: a.octets() }), value, 0)?;
        }
    }
    let fill_ms = started.elapsed().as_secs_f64() * 1e3;
    let run = |ebpf: &aya::Ebpf, frame: &[u8], repeat: u32, want: u32| -> Result<u128> {
        let prog: &CgroupSkb = ebpf
            .program(EGRESS_CGROUP)
            .context("no egress_cgroup program")?
            .try_into()?;
        let mut v = Vec::new();
        for _ in 0..trials.max(1) {
            let r = prog.test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })?;
            if r.return_value != want {
                bail!("verdict {} where {want} was expected", r.return_value);
            }
            v.push(r.duration.as_nanos());
        }
        v.sort_unstable();
        Ok(v[v.len() / 2])
    };
    let hit = syn(IpAddr::V6(V6_TARGET), 40000, 443);
    run(&ebpf, &hit, 1, 1)?;
    let cached = run(&ebpf, &hit, repeat, 1)?;
    write_settings(&mut ebpf, stale)?;
    let first_repeat = run(&ebpf, &hit, repeat, 1);
    write_settings(&mut ebpf, normal)?;
    let first_repeat = first_repeat?;
    let denied = run(&ebpf, &syn(IpAddr::V6(V6_MISS), 40000, 443), repeat, 0)?;
    Ok(WhatIf {
        n,
        fill_ms,
        cached,
        first_repeat,
        denied,
    })
}

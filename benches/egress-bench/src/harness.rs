//! The test-run harness's own cost, which the agent's API cannot measure: an empty
//! `cgroup_skb` program (`r0 = 1; exit`), loaded with the raw `bpf(2)` syscall and run like
//! the real one, so that the per-packet figures can be read as (figure - harness).
use anyhow::{Context as _, Result, bail};

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

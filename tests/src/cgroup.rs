//! Test cgroups below the cgroup2 mount, and what is attached to them.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::unique_suffix;

/// How long a cgroup may take to empty after its processes were killed.
const CGROUP_EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// The cgroup2 mount point, from /proc/mounts (its location differs between hosts).
pub(crate) fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("cannot read /proc/mounts");
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .map(|fields| PathBuf::from(fields[1]))
        .expect("no cgroup2 filesystem is mounted (see /proc/mounts)")
}

/// A fresh child cgroup `egress-test-<pid>-<n>` directly below the cgroup2 mount. Drop
/// kills whatever still runs in it and removes it.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    /// Directories [`TestCgroup::nested`] created above `path`, deepest first: removed
    /// after it.
    above: Vec<PathBuf>,
    /// Kept open so children can reach the cgroup as `/proc/self/fd/N` from inside
    /// `ip netns exec`, where the cgroup2 mount is hidden (see [`Netns::exec`]).
    dir: File,
}

impl TestCgroup {
    /// Creates the cgroup; panics if it cannot.
    #[expect(
        clippy::new_without_default,
        reason = "creating a cgroup is not a default value"
    )]
    pub fn new() -> TestCgroup {
        let path = cgroup2_mount().join(format!("egress-test-{}", unique_suffix()));
        fs::create_dir(&path)
            .unwrap_or_else(|err| panic!("cannot create cgroup {}: {err}", path.display()));
        match File::open(&path) {
            Ok(dir) => TestCgroup {
                path,
                above: Vec::new(),
                dir,
            },
            Err(err) => {
                let _ = fs::remove_dir(&path);
                panic!("cannot open cgroup {}: {err}", path.display())
            }
        }
    }

    /// A new cgroup at `rel` below this one (e.g. `kubepods/burstable/pod<uid>/<id>`), with
    /// the directories that lead to it (which other nested cgroups may share); removed on
    /// drop with those left empty. Drop it before this one.
    pub fn nested(&self, rel: &str) -> TestCgroup {
        let mut above = Vec::new();
        let mut path = self.path.clone();
        for part in rel.split('/') {
            if !above.is_empty() || path != self.path {
                above.insert(0, path.clone());
            }
            path.push(part);
            if let Err(err) = fs::create_dir(&path)
                && err.kind() != std::io::ErrorKind::AlreadyExists
            {
                panic!("cannot create cgroup {}: {err}", path.display());
            }
        }
        let dir = File::open(&path)
            .unwrap_or_else(|err| panic!("cannot open cgroup {}: {err}", path.display()));
        TestCgroup { path, above, dir }
    }

    /// The cgroup's directory, e.g. to hand to the agent.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pids currently in the cgroup.
    pub fn procs(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|procs| procs.lines().filter_map(|pid| pid.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Makes the cgroup reachable by a child spawned from `cmd` and returns the path the
    /// child must use for it. Only valid while `self` lives, so spawn `cmd` right away.
    pub(crate) fn inherit_into(&self, cmd: &mut Command) -> String {
        let fd = self.dir.as_raw_fd();
        // SAFETY: the hook only calls fcntl, which is async-signal-safe, on the child's
        // copy of the fd; `self` (and so the fd) outlives the spawn, per the contract above.
        unsafe {
            cmd.pre_exec(move || clear_cloexec(fd));
        }
        format!("/proc/self/fd/{fd}")
    }

    /// Kills every member: `cgroup.kill` where the kernel has it (5.14+), else one by one.
    fn kill_members(&self) {
        if fs::write(self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.procs() {
            let Ok(pid) = libc::pid_t::try_from(pid) else {
                continue;
            };
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Waits until no process is left; exiting after SIGKILL is asynchronous.
    fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.procs().is_empty() {
            if Instant::now() >= deadline {
                return false;
            }
            self.kill_members();
            thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.kill_members();
        if !self.wait_empty(CGROUP_EMPTY_TIMEOUT) {
            eprintln!(
                "cgroup {} still has processes {:?}",
                self.path.display(),
                self.procs()
            );
        }
        // Even once cgroup.procs is empty, rmdir can report EBUSY until the kernel has
        // finished the exits, so retry for a moment.
        let deadline = Instant::now() + CGROUP_EMPTY_TIMEOUT;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => {
                    // A directory another nested cgroup still uses stays, for it to remove.
                    for dir in &self.above {
                        if fs::remove_dir(dir).is_err() {
                            break;
                        }
                    }
                    return;
                }
                Err(err)
                    if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(err) => {
                    eprintln!("cannot remove cgroup {}: {err}", self.path.display());
                    return;
                }
            }
        }
    }
}

/// The ids of the programs attached to the cgroup at `path`, sorted: the programs of the
/// BPF links `bpftool -j link show` lists on it (a cgroup link names its cgroup by id, the
/// directory's inode number). The agent attaches cgroup programs only through links. Not
/// `bpftool cgroup show`: Debian's bpftool 7.1 cannot list cgroup programs on kernels
/// before 6.0 (`BPF_PROG_QUERY` fails with EINVAL).
pub fn attached_programs(path: &Path) -> Vec<u64> {
    let cgroup_id = fs::metadata(path)
        .unwrap_or_else(|err| panic!("cannot stat {}: {err}", path.display()))
        .ino();
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .expect("cannot run bpftool");
    assert!(
        out.status.success(),
        "bpftool link show failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let links: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
        panic!(
            "bpftool printed no JSON ({err}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    // An empty list is `[]`; anything else is not an answer, and reading it as "no links"
    // would let a check that nothing is attached pass without checking.
    let links = links
        .as_array()
        .unwrap_or_else(|| panic!("bpftool -j link show printed no JSON array: {links}"));
    let mut ids: Vec<u64> = links
        .iter()
        .filter(|link| link["cgroup_id"].as_u64() == Some(cgroup_id))
        .filter_map(|link| link["prog_id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}

/// Clears `FD_CLOEXEC`, so `fd` survives exec into the child.
fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl F_GETFD/F_SETFD only read and write the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

//! Fixtures for the end-to-end tests: network namespaces, cgroups, probe clients and
//! servers, the agent process and checks on what it reported; DNS servers and clients
//! in [`dns`].
//!
//! Every fixture is a guard that removes what it created in `Drop`, also when a test
//! panics, and every kernel object gets a name unique to this process and fixture, so
//! tests can run in parallel and repeated runs never meet each other's leftovers.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod attack;
pub mod dns;

/// Client end of the veth pair.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Client end of the veth pair.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// Server end of the veth pair, and the client's default gateway.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Server end of the veth pair, and the client's default gateway.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// Off-link server addresses (on the server's `lo`), reached only through the client's
/// default route, like real egress destinations. Two per family so a test can allow one
/// and deny the other.
pub const REMOTE_V4_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// See [`REMOTE_V4_A`].
pub const REMOTE_V4_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// See [`REMOTE_V4_A`].
pub const REMOTE_V6_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
/// See [`REMOTE_V4_A`].
pub const REMOTE_V6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20);

/// How long a new veth pair may take to carry traffic.
const LINK_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a server may take to bind before the fixture gives up.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a cgroup may take to empty after its processes were killed.
const CGROUP_EMPTY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Agent::terminate`] waits after SIGTERM before calling it a hang.
const AGENT_TERM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Agent`]'s `Drop` waits after SIGTERM before SIGKILL.
const AGENT_DROP_GRACE: Duration = Duration::from_secs(3);
/// How long to wait for the agent's pipes to close after it exited, so that
/// [`Agent::terminate`] returns with its last output captured.
const AGENT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process, for names that must not collide.
fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// `<pid>-<n>`: unique across concurrently running test processes too.
fn unique_suffix() -> String {
    format!("{}-{}", std::process::id(), next_id())
}

/// Whether the tests can run here. Without root they cannot create namespaces or
/// cgroups: outside CI that prints a skip message and returns `false` (callers return
/// early); with `CI=true` it panics, because CI must never skip silently.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let reason = "end-to-end tests need root (network namespaces, cgroups, eBPF)";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{reason}, and CI=true forbids skipping them"
    );
    eprintln!("skipping: {reason}");
    false
}

/// Runs `cmd` to completion and returns its stdout. Panics with its stderr on failure:
/// a fixture that cannot set itself up makes every later assertion meaningless.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|err| panic!("cannot run {cmd:?}: {err}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cleanup step for `Drop`: reports failure instead of panicking, since a panic while
/// already unwinding would abort the whole test binary.
fn run_in_drop(cmd: &mut Command) {
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "cleanup {cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => eprintln!("cleanup {cmd:?} could not run: {err}"),
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `egt-<pid>-<n>` with `lo` up.
    #[expect(
        clippy::new_without_default,
        reason = "creating a namespace is not a default value"
    )]
    pub fn new() -> Netns {
        let name = format!("egt-{}", unique_suffix());
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Netns { name };
        netns.ip("link set lo up");
        netns
    }

    /// The name `ip netns` knows it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ARGS` and returns its stdout; panics if it fails. `args` is split
    /// on whitespace (no `ip` argument contains any), so calls read like the shell:
    /// `ns.ip("route add blackhole 203.0.113.99/32")`.
    pub fn ip(&self, args: &str) -> String {
        run(Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args.split_whitespace()))
    }

    /// `ip netns exec <ns> ARGV...`, ready to configure and spawn. Note that
    /// `ip netns exec` mounts a fresh sysfs over `/sys`, hiding cgroup mounts below it.
    pub fn exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(&self.name).args(argv);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        run_in_drop(Command::new("ip").args(["netns", "delete", &self.name]));
    }
}

/// Two namespaces joined by a veth pair: `client` reaches the `REMOTE_*` addresses on
/// `server` only through its default routes, as a pod reaches the outside world.
#[derive(Debug)]
pub struct Topology {
    /// Holds [`CLIENT_V4`] and [`CLIENT_V6`]; default routes point at the server.
    pub client: Netns,
    /// Holds [`SERVER_V4`], [`SERVER_V6`] and the `REMOTE_*` addresses.
    pub server: Netns,
    /// The veth end inside `client`.
    pub client_veth: String,
    /// The veth end inside `server`.
    pub server_veth: String,
}

impl Topology {
    /// Builds the namespaces, the veth pair, addresses and routes, and returns once both
    /// veth ends carry traffic. IPv6 addresses use `nodad`, so they are usable at once
    /// instead of after duplicate address detection.
    #[expect(
        clippy::new_without_default,
        reason = "creating namespaces is not a default value"
    )]
    pub fn new() -> Topology {
        let client = Netns::new();
        let server = Netns::new();
        // Both ends are created directly inside their namespaces and never exist in the
        // root namespace, so the short names cannot collide with other test processes.
        let id = next_id();
        let client_veth = format!("ev{id}a");
        let server_veth = format!("ev{id}b");
        let (client_ns, server_ns) = (client.name(), server.name());
        let veth = format!(
            "link add {client_veth} netns {client_ns} type veth peer name {server_veth} netns {server_ns}"
        );
        run(Command::new("ip").args(veth.split_whitespace()));
        client.ip(&format!("link set {client_veth} up"));
        server.ip(&format!("link set {server_veth} up"));
        add_link_addresses(&client, &client_veth, CLIENT_V4, CLIENT_V6);
        add_link_addresses(&server, &server_veth, SERVER_V4, SERVER_V6);
        for remote in [REMOTE_V4_A, REMOTE_V4_B] {
            server.ip(&format!("addr add {remote}/32 dev lo"));
        }
        for remote in [REMOTE_V6_A, REMOTE_V6_B] {
            server.ip(&format!("-6 addr add {remote}/128 dev lo nodad"));
        }
        client.ip(&format!("route add default via {SERVER_V4}"));
        client.ip(&format!("-6 route add default via {SERVER_V6}"));
        wait_link_ready(&client, &client_veth);
        wait_link_ready(&server, &server_veth);
        Topology {
            client,
            server,
            client_veth,
            server_veth,
        }
    }

    /// Adds another off-link destination address on the server's `lo`, like the
    /// `REMOTE_*` ones (IPv6 without duplicate address detection, usable at once).
    pub fn add_remote(&self, addr: impl Into<IpAddr>) {
        match addr.into() {
            IpAddr::V4(v4) => self.server.ip(&format!("addr add {v4}/32 dev lo")),
            IpAddr::V6(v6) => self
                .server
                .ip(&format!("-6 addr add {v6}/128 dev lo nodad")),
        };
    }
}

/// Puts the on-link addresses on one veth end. Adding them while the link is up also
/// installs its ff00::/8 route at once (see [`wait_link_ready`]).
fn add_link_addresses(netns: &Netns, veth: &str, v4: Ipv4Addr, v6: Ipv6Addr) {
    netns.ip(&format!("addr add {v4}/24 dev {veth}"));
    netns.ip(&format!("-6 addr add {v6}/64 dev {veth} nodad"));
}

/// Waits until `veth` can carry traffic. The kernel applies carrier changes
/// asynchronously (linkwatch, rate-limited to about once a second): until then the device
/// may keep the `noop` qdisc or lack its ff00::/8 route, so ARP or NDP packets vanish and
/// the first connection of a test stalls for a retransmit second.
fn wait_link_ready(netns: &Netns, veth: &str) {
    let deadline = Instant::now() + LINK_READY_TIMEOUT;
    while !link_ready(netns, veth) {
        assert!(
            Instant::now() < deadline,
            "{veth} in {} not ready after {LINK_READY_TIMEOUT:?}:\n{}",
            netns.name(),
            netns.ip(&format!("link show dev {veth}"))
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn link_ready(netns: &Netns, veth: &str) -> bool {
    let query = |args: String| -> Value {
        serde_json::from_str(&netns.ip(&args)).expect("`ip -j` prints JSON")
    };
    let link = query(format!("-j link show dev {veth}"));
    let multicast = query(format!(
        "-j -6 route show table local type multicast dev {veth}"
    ));
    link[0]["operstate"] == "UP"
        && link[0]["qdisc"] != "noop"
        && multicast
            .as_array()
            .is_some_and(|routes| !routes.is_empty())
}

/// The cgroup2 mount point, from /proc/mounts (its location differs between hosts).
fn cgroup2_mount() -> PathBuf {
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
    fn inherit_into(&self, cmd: &mut Command) -> String {
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
    let mut ids: Vec<u64> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|link| link["cgroup_id"].as_u64() == Some(cgroup_id))
        .filter_map(|link| link["prog_id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}

/// A pin root of one test's own, `<tmp>/egress-e2e-bpf-<pid>-<n>/egress-enforcer`: the agent
/// mounts bpffs on its parent, so tests running side by side never share pinned state, and
/// nothing lands under `/sys/fs/bpf`. Drop runs `egress-agent uninstall` (detaching whatever
/// a killed agent or `--on-exit keep` left), then unmounts and removes the directory.
#[derive(Debug)]
pub struct PinDir {
    mount: PathBuf,
}

impl PinDir {
    #[expect(
        clippy::new_without_default,
        reason = "creating a directory is not a default value"
    )]
    pub fn new() -> PinDir {
        let mount = std::env::temp_dir().join(format!("egress-e2e-bpf-{}", unique_suffix()));
        fs::create_dir(&mount)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", mount.display()));
        PinDir { mount }
    }

    /// What to pass as `--pin-root`.
    pub fn root(&self) -> PathBuf {
        self.mount.join("egress-enforcer")
    }

    /// The names of the link pins under the root (`<point>@<link id>`), of every version,
    /// sorted.
    pub fn link_pins(&self) -> Vec<String> {
        let Ok(versions) = fs::read_dir(self.root()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = versions
            .flatten()
            .filter_map(|version| fs::read_dir(version.path().join("links")).ok())
            .flat_map(|links| links.flatten())
            .map(|link| link.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `egress-agent status` on this root: its exit status and output.
    pub fn status(&self) -> (bool, String) {
        self.agent(&["status"])
    }

    /// `egress-agent uninstall` on this root: its exit status and output.
    pub fn uninstall(&self) -> (bool, String) {
        self.agent(&["uninstall"])
    }

    /// `egress-agent ARGS... --pin-root ROOT`, run to completion.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--pin-root")
            .arg(self.root())
            .output()
            .unwrap_or_else(|err| panic!("cannot run egress-agent {args:?}: {err}"))
    }

    /// `egress-agent ARGS... --pin-root ROOT`: its exit status and output.
    fn agent(&self, args: &[&str]) -> (bool, String) {
        let out = self.command(args);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.root().exists() {
            let (ok, out) = self.uninstall();
            if !ok {
                eprintln!("uninstall of {} failed: {out}", self.root().display());
            }
        }
        let path = CString::new(self.mount.as_os_str().as_bytes()).expect("no NUL in a temp path");
        // SAFETY: a NUL-terminated path; EINVAL (nothing mounted there) is expected when no
        // agent ran.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        if let Err(err) = fs::remove_dir(&self.mount) {
            eprintln!("cannot remove {}: {err}", self.mount.display());
        }
    }
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

/// The `egress-probe` binary.
///
/// `env!("CARGO_BIN_EXE_egress-probe")` only exists while compiling this crate's
/// integration tests, not this library, so the path is found at run time: from
/// `EGRESS_PROBE_BIN` if set, else in `target/<profile>/`, the parent of the `deps/`
/// directory holding the running test, which is where cargo puts the binaries it builds
/// for integration tests. `tests/fixtures.rs` checks that both agree.
pub fn egress_probe_bin() -> PathBuf {
    target_binary(
        "egress-probe",
        "EGRESS_PROBE_BIN",
        "`cargo test -p egress-tests` builds it",
    )
}

/// The `egress-agent` binary: `EGRESS_AGENT_BIN` if set, else `target/<profile>/egress-agent`
/// next to the running test's `deps/` directory. `cargo test -p egress-tests` does not
/// build it.
pub fn agent_bin() -> PathBuf {
    target_binary(
        "egress-agent",
        "EGRESS_AGENT_BIN",
        "run `cargo build -p egress-agent` first",
    )
}

/// Resolves a workspace binary from `env_var` or next to the running test executable,
/// and panics with `hint` if it is not there.
fn target_binary(name: &str, env_var: &str, hint: &str) -> PathBuf {
    let path = match std::env::var_os(env_var) {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().expect("cannot find the running test executable");
            let dir = exe
                .parent()
                .expect("the test executable has no parent directory");
            let profile_dir = if dir.ends_with("deps") {
                dir.parent().expect("deps/ has no parent directory")
            } else {
                dir
            };
            profile_dir.join(name)
        }
    };
    assert!(
        path.is_file(),
        "{name} not found at {}: {hint} (or set {env_var})",
        path.display()
    );
    path
}

/// `ip netns exec <ns> egress-probe [--cgroup /proc/self/fd/N] ARGS...`.
fn probe_command<S: AsRef<OsStr>>(
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    args: &[S],
) -> Command {
    let mut cmd = netns.exec(&[egress_probe_bin()]);
    if let Some(cgroup) = cgroup {
        let dir = cgroup.inherit_into(&mut cmd);
        cmd.arg("--cgroup").arg(dir);
    }
    cmd.args(args);
    cmd
}

/// An `egress-probe` echo server, ready (bound) once constructed; killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
}

impl Server {
    /// A TCP echo server on `addr:port` in `netns`, inside `cgroup` if given.
    pub fn tcp(
        netns: &Netns,
        cgroup: Option<&TestCgroup>,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Server {
        Server::spawn("serve-tcp", netns, cgroup, addr.into(), port)
    }

    /// A UDP echo server on `addr:port` in `netns`, inside `cgroup` if given.
    pub fn udp(
        netns: &Netns,
        cgroup: Option<&TestCgroup>,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Server {
        Server::spawn("serve-udp", netns, cgroup, addr.into(), port)
    }

    /// The server's pid (`ip netns exec` execs the probe in place, so it is the probe's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(
        mode: &str,
        netns: &Netns,
        cgroup: Option<&TestCgroup>,
        addr: IpAddr,
        port: u16,
    ) -> Server {
        let mut cmd = probe_command(netns, cgroup, &[mode, &addr.to_string(), &port.to_string()]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {cmd:?}: {err}"));
        let mut server = Server { child };
        if !server.wait_listening(SERVER_READY_TIMEOUT) {
            let _ = server.child.kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = server.child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!(
                "{mode} {addr} {port} in {} did not start: {}",
                netns.name(),
                stderr.trim()
            );
        }
        server
    }

    /// Waits for the `{"listening":true}` line; `false` if the server died or hung.
    fn wait_listening(&mut self, timeout: Duration) -> bool {
        let stdout = self.child.stdout.take().expect("server stdout is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        rx.recv_timeout(timeout)
            .ok()
            .and_then(|line| serde_json::from_str::<Value>(&line).ok())
            .is_some_and(|ready| ready["listening"] == true)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one `egress-probe` client run reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// The echo came back.
    pub ok: bool,
    /// On failure: the errno (ETIMEDOUT for silence, EPROTO for a wrong echo).
    pub errno: Option<i32>,
    /// On failure: a description, `"timeout"` when nothing answered.
    pub error: Option<String>,
}

impl ProbeResult {
    /// Runs a probe client command to the end (stdin closed) and returns its result and
    /// whole result line; see [`ProbeResult::parse`].
    fn run(cmd: &mut Command) -> (ProbeResult, Value) {
        let output = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run {cmd:?}: {err}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        ProbeResult::parse(output.status, &stdout, &stderr)
    }

    /// Parses a finished probe's result line; see [`ProbeResult::parse`].
    fn from_output(output: &Output) -> ProbeResult {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        ProbeResult::parse(output.status, &stdout, &stderr).0
    }

    /// Parses the probe's result line (its last JSON line) and returns it whole as well;
    /// panics if the probe itself broke (no JSON, exit status not matching `ok`), which
    /// is a harness bug rather than a result.
    fn parse(status: ExitStatus, stdout: &str, stderr: &str) -> (ProbeResult, Value) {
        let broken = |what: &str| -> ! {
            panic!(
                "egress-probe {what} ({status}); stdout: {:?}, stderr: {:?}",
                stdout.trim(),
                stderr.trim()
            )
        };
        let last = stdout.lines().last().unwrap_or_default();
        let Ok(value) = serde_json::from_str::<Value>(last.trim()) else {
            broken("printed no JSON result")
        };
        let Some(ok) = value["ok"].as_bool() else {
            broken("printed no \"ok\"")
        };
        if status.success() != ok {
            broken("exit status disagrees with its result");
        }
        let result = ProbeResult {
            ok,
            errno: value["errno"]
                .as_i64()
                .and_then(|errno| i32::try_from(errno).ok()),
            error: value["error"].as_str().map(str::to_owned),
        };
        (result, value)
    }
}

/// Connects from `netns` (inside `cgroup` if given) to `addr:port` over TCP, sends a
/// line and waits for its echo.
pub fn probe_tcp(
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    addr: impl Into<IpAddr>,
    port: u16,
) -> ProbeResult {
    run_probe("tcp-connect", netns, cgroup, addr.into(), port)
}

/// [`probe_tcp`] with a connect timeout of `timeout`: long enough, the kernel retransmits
/// a dropped SYN (after 1 s, and again 1 or 2 s later).
pub fn probe_tcp_for(
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    addr: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> ProbeResult {
    let args = [
        "tcp-connect".to_owned(),
        addr.into().to_string(),
        port.to_string(),
        "--timeout-ms".to_owned(),
        timeout.as_millis().to_string(),
    ];
    ProbeResult::from_output(
        &probe_command(netns, cgroup, &args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run egress-probe: {err}")),
    )
}

/// Sends a UDP datagram from `netns` (inside `cgroup` if given) to `addr:port` and waits
/// for its echo.
pub fn probe_udp(
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    addr: impl Into<IpAddr>,
    port: u16,
) -> ProbeResult {
    run_probe("udp-send", netns, cgroup, addr.into(), port)
}

fn run_probe(
    mode: &str,
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    addr: IpAddr,
    port: u16,
) -> ProbeResult {
    let mut cmd = probe_command(netns, cgroup, &[mode, &addr.to_string(), &port.to_string()]);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {cmd:?}: {err}"));
    ProbeResult::from_output(&output)
}

/// Lines read from a child's pipe by a background thread, with a way to wait for them.
#[derive(Default)]
struct Captured {
    state: Mutex<CapturedState>,
    changed: Condvar,
}

#[derive(Default)]
struct CapturedState {
    lines: Vec<String>,
    /// The pipe reached EOF (or failed): no more lines will come.
    closed: bool,
}

impl Captured {
    /// Starts a thread that appends every line of `pipe` until it closes.
    fn start(pipe: impl Read + Send + 'static) -> Arc<Captured> {
        let captured = Arc::new(Captured::default());
        let sink = Arc::clone(&captured);
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches('\n')
                    .to_owned();
                sink.lock().lines.push(line);
                sink.changed.notify_all();
                buf.clear();
            }
            sink.lock().closed = true;
            sink.changed.notify_all();
        });
        captured
    }

    /// Locks the state, ignoring poison: a test that panicked while waiting must still
    /// be able to print and clean up in `Drop`.
    fn lock(&self) -> MutexGuard<'_, CapturedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// Waits until `find` succeeds on the lines so far, the pipe closes, or `timeout`
    /// passes.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut find: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(found) = find(&state.lines) {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.closed || left.is_zero() {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits up to `timeout` for the pipe to close.
    fn wait_closed(&self, timeout: Duration) {
        let closed = |_: &[String]| None::<()>;
        self.wait_for(timeout, closed);
    }
}

/// Parses stdout lines as the agent's JSON events. Anything else on stdout breaks the
/// event stream contract, so it fails the test.
fn parse_events(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("agent stdout line is not JSON ({err}): {line:?}"))
        })
        .collect()
}

/// Starts `cmd` with no stdin and its stdout and stderr captured line by line; panics if it
/// cannot start.
fn spawn_captured(cmd: &mut Command) -> (Child, Arc<Captured>, Arc<Captured>) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {cmd:?}: {err}"));
    let stdout = Captured::start(child.stdout.take().expect("stdout is piped"));
    let stderr = Captured::start(child.stderr.take().expect("stderr is piped"));
    (child, stdout, stderr)
}

/// A running agent (or any process speaking its protocol: JSON events on stdout, logs on
/// stderr). Drop sends SIGTERM, then SIGKILL after a few seconds, and prints the captured
/// output if the test is failing.
pub struct Agent {
    child: Child,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
    /// The pin root of an agent started by [`start_agent`]: removed after the agent exits
    /// (fields drop after `Drop::drop` has stopped it).
    pins: Option<PinDir>,
}

impl Agent {
    /// Starts `bin ARGS...`; see [`agent_bin`] for the real agent.
    pub fn spawn<S: AsRef<OsStr>>(bin: &Path, args: &[S]) -> Agent {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Agent::spawn_command(cmd)
    }

    /// Starts a prepared command, e.g. with extra environment such as `RUST_LOG`, or
    /// wrapped in [`Netns::exec`]. Its stdin, stdout and stderr are taken over.
    pub fn spawn_command(mut cmd: Command) -> Agent {
        let (child, stdout, stderr) = spawn_captured(&mut cmd);
        Agent {
            child,
            stdout,
            stderr,
            pins: None,
        }
    }

    /// The pin root of an agent started with one of its own.
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `needle` and returns it; panics with the
    /// captured stderr on timeout or if the agent closed stderr (exited) first.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> String {
        let found = self.stderr.wait_for(timeout, |lines| {
            lines.iter().find(|line| line.contains(needle)).cloned()
        });
        found.unwrap_or_else(|| {
            panic!(
                "agent stderr had no line containing {needle:?} within {timeout:?}:\n{}",
                self.stderr.lines().join("\n")
            )
        })
    }

    /// All stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lines()
    }

    /// All events (stdout JSON lines) so far.
    pub fn events(&self) -> Vec<Value> {
        parse_events(&self.stdout.lines())
    }

    /// Waits for an event matching `pred` and returns it; panics with the events so far
    /// on timeout or if the agent closed stdout (exited) first.
    pub fn wait_for_event(&self, mut pred: impl FnMut(&Value) -> bool, timeout: Duration) -> Value {
        let found = self.stdout.wait_for(timeout, |lines| {
            parse_events(lines).into_iter().find(|event| pred(event))
        });
        found.unwrap_or_else(|| {
            panic!(
                "no matching agent event within {timeout:?}; events:\n{}\nstderr:\n{}",
                self.stdout.lines().join("\n"),
                self.stderr.lines().join("\n")
            )
        })
    }

    /// Sends SIGTERM and waits for the agent to exit with its output drained; panics
    /// (after SIGKILL) if it ignores SIGTERM for 10 s. Also fine after it already exited.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_for_exit(AGENT_TERM_TIMEOUT)
    }

    /// Waits for the agent to exit on its own (e.g. after rejecting its arguments), with
    /// its output drained; panics (after SIGKILL) if it is still running after `timeout`.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let Some(status) = self.poll_exit(timeout) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("agent still running after {timeout:?}; killed it");
        };
        self.stdout.wait_closed(AGENT_DRAIN_TIMEOUT);
        self.stderr.wait_closed(AGENT_DRAIN_TIMEOUT);
        status
    }

    /// Signals the agent unless it has been reaped already; until then its pid cannot be
    /// reused, so this never hits another process.
    fn signal(&mut self, signal: libc::c_int) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, signal) };
    }

    /// The exit status once the agent has exited, or `None` after `timeout`.
    fn poll_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        if self.poll_exit(AGENT_DROP_GRACE).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- agent stdout ---\n{}\n--- agent stderr ---\n{}",
                self.stdout.lines().join("\n"),
                self.stderr.lines().join("\n")
            );
        }
    }
}

/// Loading and attaching the programs; generous for a loaded 2-core machine.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an event may lag behind the packet that caused it.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's log filter: its own debug lines include one per learned address.
const AGENT_LOG: &str = "info,egress_agent=debug";

/// A file under the temp directory, unique to this process and call, removed on drop.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Writes `contents` to a fresh policy file.
    pub fn new(contents: &str) -> TempFile {
        let name = format!("egress-e2e-policy-{}.yaml", unique_suffix());
        let path = std::env::temp_dir().join(name);
        fs::write(&path, contents)
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
        TempFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_file(&self.path) {
            eprintln!("cannot remove {}: {err}", self.path.display());
        }
    }
}

/// Starts `egress-agent run` on `cgroup` (in the host namespace) with a pin root of its own
/// and waits until it reports that it enforces. `mode` overrides the policy's mode.
pub fn start_agent(policy: &TempFile, cgroup: &TestCgroup, mode: Option<&str>) -> Agent {
    start_agent_with(policy, cgroup, mode, &[])
}

/// [`start_agent`] with `extra` arguments for `run`.
pub fn start_agent_with(
    policy: &TempFile,
    cgroup: &TestCgroup,
    mode: Option<&str>,
    extra: &[&str],
) -> Agent {
    let pins = PinDir::new();
    let mut agent = start_pinned_agent(&agent_bin(), policy, cgroup, &pins, mode, extra);
    agent.pins = Some(pins);
    agent
}

/// Starts `bin run` on `cgroup` with the pin root `pins` (which the caller keeps, e.g. for
/// the next agent) and `extra` arguments, and waits until it reports that it enforces.
pub fn start_pinned_agent(
    bin: &Path,
    policy: &TempFile,
    cgroup: &TestCgroup,
    pins: &PinDir,
    mode: Option<&str>,
    extra: &[&str],
) -> Agent {
    let mut cmd = Command::new(bin);
    cmd.args(run_args(policy, cgroup, pins)).args(extra);
    start_agent_command(cmd, mode)
}

/// Starts a prepared `run` command of the agent (e.g. one that runs it in another
/// network namespace) with the tests' log filter, and waits until it reports that it
/// enforces. `mode` overrides the policy's mode.
fn start_agent_command(mut cmd: Command, mode: Option<&str>) -> Agent {
    cmd.env("RUST_LOG", AGENT_LOG);
    if let Some(mode) = mode {
        cmd.args(["--mode", mode]);
    }
    let agent = Agent::spawn_command(cmd);
    let line = agent.wait_for_stderr("attached: mode", ATTACH_TIMEOUT);
    let expected = format!("attached: mode {}", mode.unwrap_or("enforce"));
    assert!(
        line.contains(&expected),
        "expected {expected:?} in {line:?}"
    );
    agent
}

/// `run --config POLICY --cgroup CGROUP --pin-root PINS --listen 127.0.0.1:0` (a free
/// port and a pin root of its own: tests run agents side by side).
pub fn run_args(policy: &TempFile, cgroup: &TestCgroup, pins: &PinDir) -> Vec<OsString> {
    vec![
        "run".into(),
        "--config".into(),
        policy.path().into(),
        "--cgroup".into(),
        cgroup.path().into(),
        "--pin-root".into(),
        pins.root().into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ]
}

/// The cgroup's path as events name it: relative to the cgroup2 mount, which the test
/// cgroup sits directly below.
fn event_cgroup(cgroup: &TestCgroup) -> String {
    let name = cgroup
        .path()
        .file_name()
        .expect("the test cgroup has a name");
    format!("/{}", name.to_string_lossy())
}

/// What identifies an event: destination address, destination port, protocol.
pub type Flow = (String, u16, &'static str);

pub fn tcp(addr: impl Into<IpAddr>, port: u16) -> Flow {
    (addr.into().to_string(), port, "tcp")
}

pub fn udp(addr: impl Into<IpAddr>, port: u16) -> Flow {
    (addr.into().to_string(), port, "udp")
}

fn flow_of(event: &Value) -> Option<Flow> {
    let proto = match event["proto"].as_str()? {
        "tcp" => "tcp",
        "udp" => "udp",
        _ => "other",
    };
    let port = u16::try_from(event["dport"].as_u64()?).ok()?;
    Some((event["dst"].as_str()?.to_owned(), port, proto))
}

/// Waits until the agent has reported each of `flows`.
pub fn wait_for_flows(agent: &Agent, flows: &[Flow]) {
    for flow in flows {
        agent.wait_for_event(|event| flow_of(event).as_ref() == Some(flow), EVENT_TIMEOUT);
    }
}

/// Stops the agent (which drains its output), checks it exited cleanly, and returns how
/// often each flow was reported. Every event must carry `action` and the test cgroup.
pub fn stop_and_collect(
    agent: &mut Agent,
    action: &str,
    cgroup: &TestCgroup,
) -> BTreeMap<Flow, usize> {
    let status = agent.terminate();
    assert!(
        status.success(),
        "agent exited with {status}; stderr:\n{}",
        agent.stderr_lines().join("\n")
    );
    let expected_cgroup = event_cgroup(cgroup);
    let mut flows = BTreeMap::new();
    for event in agent.events() {
        assert_eq!(event["action"], action, "{event}");
        assert_eq!(event["cgroup"], expected_cgroup.as_str(), "{event}");
        assert!(
            event["cgroup_id"].as_u64().is_some_and(|id| id > 0),
            "{event}"
        );
        let flow = flow_of(&event).unwrap_or_else(|| panic!("event without a flow: {event}"));
        *flows.entry(flow).or_insert(0) += 1;
    }
    flows
}

/// Asserts that exactly `expected` were reported (each at least once).
pub fn assert_reported_exactly(reported: &BTreeMap<Flow, usize>, expected: &[Flow]) {
    let mut got: Vec<&Flow> = reported.keys().collect();
    let mut want: Vec<&Flow> = expected.iter().collect();
    got.sort();
    want.sort();
    want.dedup();
    assert_eq!(got, want, "reported flows (with counts: {reported:?})");
}

#[track_caller]
pub fn assert_ok(result: &ProbeResult, what: &str) {
    assert!(result.ok, "{what} should pass: {result:?}");
}

/// A dropped SYN is silence: the connect times out.
#[track_caller]
pub fn assert_timeout(result: &ProbeResult, what: &str) {
    assert!(!result.ok, "{what} should be dropped: {result:?}");
    assert_eq!(
        result.errno,
        Some(libc::ETIMEDOUT),
        "{what} should time out: {result:?}"
    );
}

/// A dropped datagram fails the `sendto` itself.
#[track_caller]
pub fn assert_eperm(result: &ProbeResult, what: &str) {
    assert!(!result.ok, "{what} should be dropped: {result:?}");
    assert_eq!(
        result.errno,
        Some(libc::EPERM),
        "{what} should fail with EPERM: {result:?}"
    );
}

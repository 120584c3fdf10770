//! The `egress-probe` binary: echo servers and one-shot clients.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::{Netns, TestCgroup};

/// How long a server may take to bind before the fixture gives up.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);

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
pub(crate) fn target_binary(name: &str, env_var: &str, hint: &str) -> PathBuf {
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
pub(crate) fn probe_command<S: AsRef<OsStr>>(
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
    pub(crate) fn run(cmd: &mut Command) -> (ProbeResult, Value) {
        let output = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run {cmd:?}: {err}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        ProbeResult::parse(output.status, &stdout, &stderr)
    }

    /// Parses a finished probe's result line; see [`ProbeResult::parse`].
    pub(crate) fn from_output(output: &Output) -> ProbeResult {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        ProbeResult::parse(output.status, &stdout, &stderr).0
    }

    /// Parses the probe's result line (its last JSON line) and returns it whole as well;
    /// panics if the probe itself broke (no JSON, exit status not matching `ok`), which
    /// is a harness bug rather than a result.
    pub(crate) fn parse(status: ExitStatus, stdout: &str, stderr: &str) -> (ProbeResult, Value) {
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

pub(crate) fn run_probe(
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

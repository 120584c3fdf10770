//! The agent process: started on a test cgroup, its JSON events on stdout and logs on
//! stderr captured line by line.

use std::ffi::{OsStr, OsString};
use std::fs::{self};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{PinDir, TestCgroup, agent_bin, unique_suffix};

/// How long [`Agent::terminate`] waits after SIGTERM before calling it a hang.
const AGENT_TERM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Agent`]'s `Drop` waits after SIGTERM before SIGKILL.
const AGENT_DROP_GRACE: Duration = Duration::from_secs(3);
/// How long to wait for the agent's pipes to close after it exited, so that
/// [`Agent::terminate`] returns with its last output captured.
const AGENT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Lines read from a child's pipe by a background thread, with a way to wait for them.
#[derive(Default)]
pub(crate) struct Captured {
    state: Mutex<CapturedState>,
    changed: Condvar,
}

#[derive(Default)]
pub(crate) struct CapturedState {
    lines: Vec<String>,
    /// The pipe reached EOF (or failed): no more lines will come.
    closed: bool,
}

impl Captured {
    /// Starts a thread that appends every line of `pipe` until it closes.
    pub(crate) fn start(pipe: impl Read + Send + 'static) -> Arc<Captured> {
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

    pub(crate) fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// Waits until `find` succeeds on the lines so far, the pipe closes, or `timeout`
    /// passes.
    pub(crate) fn wait_for<T>(
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
    pub(crate) fn wait_closed(&self, timeout: Duration) {
        let closed = |_: &[String]| None::<()>;
        self.wait_for(timeout, closed);
    }
}

/// Parses stdout lines as the agent's JSON events. Anything else on stdout breaks the
/// event stream contract, so it fails the test.
pub(crate) fn parse_events(lines: &[String]) -> Vec<Value> {
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
pub(crate) fn spawn_captured(cmd: &mut Command) -> (Child, Arc<Captured>, Arc<Captured>) {
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
    pub(crate) child: Child,
    pub(crate) stdout: Arc<Captured>,
    pub(crate) stderr: Arc<Captured>,
    /// The pin root of an agent started by [`start_agent`]: removed after the agent exits
    /// (fields drop after `Drop::drop` has stopped it).
    pub(crate) pins: Option<PinDir>,
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
    /// `learned` events are on (`EGRESS_LEARNED_EVENTS`): tests wait on them.
    pub fn spawn_command(mut cmd: Command) -> Agent {
        cmd.env("EGRESS_LEARNED_EVENTS", "true");
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

    /// The address the agent serves `/metrics` on, from its `serving` event.
    pub fn metrics_addr(&self) -> String {
        let serving = self.wait_for_named("serving", ATTACH_TIMEOUT);
        serving["addr"]
            .as_str()
            .unwrap_or_else(|| panic!("no address in {serving}"))
            .to_owned()
    }

    /// All stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lines()
    }

    /// All events (stdout JSON lines) so far.
    pub fn events(&self) -> Vec<Value> {
        parse_events(&self.stdout.lines())
    }

    /// The events so far but the agent's own (`attached`, `policy_reloaded`, ...): the deny
    /// and audit lines, and counts of lost ones.
    pub fn flow_events(&self) -> Vec<Value> {
        let mut events = self.events();
        events.retain(|event| event.get("event").is_none());
        events
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

    /// Waits for the agent's own event `name` (`{"event":"attached",...}`) and returns it;
    /// panics as [`Agent::wait_for_event`] does.
    pub fn wait_for_named(&self, name: &str, timeout: Duration) -> Value {
        self.wait_for_event(|event| event["event"] == name, timeout)
    }

    /// Whether the agent has printed its own event `name` so far.
    pub fn has_event(&self, name: &str) -> bool {
        self.events().iter().any(|event| event["event"] == name)
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
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent's log filter: its own debug lines include one per learned address.
pub(crate) const AGENT_LOG: &str = "info,egress_agent=debug";

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

/// `GET path` on the agent's metrics listener: (status line, body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a read timeout");
    // One write: `write!` on the unbuffered stream would send each piece as a segment.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
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
pub(crate) fn start_agent_command(mut cmd: Command, mode: Option<&str>) -> Agent {
    cmd.env("RUST_LOG", AGENT_LOG);
    if let Some(mode) = mode {
        cmd.args(["--mode", mode]);
    }
    let agent = Agent::spawn_command(cmd);
    let attached = agent.wait_for_named("attached", ATTACH_TIMEOUT);
    let expected = mode.unwrap_or("enforce");
    assert_eq!(attached["mode"], expected, "{attached}");
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

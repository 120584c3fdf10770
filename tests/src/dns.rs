//! Fixtures for DNS learning: a real DNS server (Debian's dnsmasq) in a namespace, the
//! probe's DNS clients and forger, and what the agent says about what it learned.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    Agent, Captured, Netns, ProbeResult, SERVER_V4, SERVER_V6, TestCgroup, probe_command,
    spawn_captured,
};

/// The dnsmasq binary (Debian's package puts it here).
const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// How long dnsmasq may take to bind its sockets.
const DNS_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long dnsmasq may take to exit after SIGTERM before SIGKILL.
const DNS_STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a background probe may take to print a progress line or finish.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to handle an answer the kernel passed on.
const LEARN_TIMEOUT: Duration = Duration::from_secs(10);

/// One record the DNS server holds.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    /// An A or AAAA record (`--host-record`); give a name several for several addresses.
    Host(&'a str, IpAddr),
    /// [`Record::Host`] with a TTL of its own instead of the server's.
    HostWithTtl(&'a str, IpAddr, u32),
    /// `alias` is a CNAME for `target` (`--cname`); aliases may chain.
    Cname(&'a str, &'a str),
    /// Names in `domain` are asked of the upstream server `upstream` (`--server`).
    Forward(&'a str, IpAddr),
}

impl Record<'_> {
    fn dnsmasq_arg(&self) -> String {
        match self {
            Record::Host(name, addr) => format!("--host-record={name},{addr}"),
            Record::HostWithTtl(name, addr, ttl) => format!("--host-record={name},{addr},{ttl}"),
            Record::Cname(alias, target) => format!("--cname={alias},{target}"),
            Record::Forward(domain, upstream) => format!("--server=/{domain}/{upstream}"),
        }
    }
}

/// dnsmasq serving only the given records on [`SERVER_V4`] and [`SERVER_V6`] port 53
/// (UDP and TCP), with no upstream, hosts file or cache, so every answer is the
/// configured one, fresh; other names are refused. Ready once constructed; stopped on
/// drop (its log is printed if the test is failing).
pub struct DnsServer {
    child: Child,
    log: Arc<Captured>,
}

impl DnsServer {
    /// Starts dnsmasq in `netns` (which must hold the `SERVER_*` addresses, as a
    /// [`super::Topology`]'s server does), answering with TTL `ttl`.
    pub fn start(netns: &Netns, ttl: u32, records: &[Record]) -> DnsServer {
        DnsServer::start_at(netns, &[SERVER_V4.into(), SERVER_V6.into()], ttl, records)
    }

    /// Like [`DnsServer::start`], listening on `addrs` (which `netns` must hold).
    pub fn start_at(netns: &Netns, addrs: &[IpAddr], ttl: u32, records: &[Record]) -> DnsServer {
        DnsServer::spawn(netns, None, addrs, ttl, records, &[])
    }

    /// A stub resolver, as systemd-resolved is on a host: dnsmasq on `listen` (a loopback
    /// address) in `netns`, running inside `cgroup`, asking `upstream` for every name.
    pub fn start_stub(
        netns: &Netns,
        cgroup: &TestCgroup,
        listen: IpAddr,
        upstream: IpAddr,
    ) -> DnsServer {
        let forward_all = format!("--server={upstream}");
        DnsServer::spawn(netns, Some(cgroup), &[listen], 0, &[], &[forward_all])
    }

    fn spawn(
        netns: &Netns,
        cgroup: Option<&TestCgroup>,
        addrs: &[IpAddr],
        ttl: u32,
        records: &[Record],
        extra: &[String],
    ) -> DnsServer {
        let mut args = vec![
            DNSMASQ.to_owned(),
            "--keep-in-foreground".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--conf-file=/dev/null".into(),
            // No pid file: concurrent tests would share the default one.
            "--pid-file".into(),
            "--bind-interfaces".into(),
            format!("--local-ttl={ttl}"),
            "--cache-size=0".into(),
            "--log-facility=-".into(),
            "--log-queries".into(),
        ];
        args.extend(addrs.iter().map(|addr| format!("--listen-address={addr}")));
        args.extend(records.iter().map(Record::dnsmasq_arg));
        args.extend_from_slice(extra);
        let mut cmd = match cgroup {
            Some(cgroup) => {
                // A shell joins the cgroup (through an inherited fd: `ip netns exec`
                // hides the cgroup mount), then becomes dnsmasq.
                let mut cmd =
                    netns.exec(&["sh", "-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#]);
                let dir = cgroup.inherit_into(&mut cmd);
                cmd.arg(dir);
                cmd
            }
            None => netns.exec::<&str>(&[]),
        };
        cmd.args(&args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {cmd:?}: {err}"));
        let log = Captured::start(child.stderr.take().expect("dnsmasq stderr is piped"));
        let server = DnsServer { child, log };
        // dnsmasq binds its sockets before it drops root and logs "started".
        let started = server.log.wait_for(DNS_READY_TIMEOUT, |lines| {
            lines
                .iter()
                .find(|l| l.contains("started, version"))
                .cloned()
        });
        assert!(
            started.is_some(),
            "dnsmasq in {} did not start:\n{}",
            netns.name(),
            server.log.lines().join("\n")
        );
        server
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: dnsmasq then also ends the children serving TCP.
        if let Ok(None) = self.child.try_wait()
            && let Ok(pid) = libc::pid_t::try_from(self.child.id())
        {
            // SAFETY: kill has no memory-safety preconditions; the child is not reaped
            // yet, so its pid is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + DNS_STOP_GRACE;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- dnsmasq log ---\n{}", self.log.lines().join("\n"));
        }
    }
}

/// How `resolve-connect` asks: which name, which server, A or AAAA, UDP or TCP.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    pub name: &'a str,
    pub server: IpAddr,
    pub aaaa: bool,
    pub tcp: bool,
}

impl<'a> Lookup<'a> {
    /// An A query over UDP.
    pub fn a(name: &'a str, server: impl Into<IpAddr>) -> Lookup<'a> {
        Lookup {
            name,
            server: server.into(),
            aaaa: false,
            tcp: false,
        }
    }

    /// An AAAA query over UDP.
    pub fn aaaa(name: &'a str, server: impl Into<IpAddr>) -> Lookup<'a> {
        Lookup {
            aaaa: true,
            ..Lookup::a(name, server)
        }
    }

    /// The same query over TCP.
    pub fn over_tcp(self) -> Lookup<'a> {
        Lookup { tcp: true, ..self }
    }
}

/// What one `resolve-connect` reported.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The echo came back from the first address of the answer.
    pub result: ProbeResult,
    /// That address; `None` when the lookup itself failed.
    pub addr: Option<IpAddr>,
    /// How long the `connect` took, in microseconds (≈1 s more when the first SYN was
    /// lost); `None` when it was not tried.
    pub connect_us: Option<u64>,
}

/// Resolves `lookup` from `netns` (inside `cgroup` if given), then at once connects to
/// the first address over TCP on `port` and waits for an echo.
pub fn resolve_connect(
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    lookup: Lookup,
    port: u16,
) -> Resolved {
    let mut args = vec![
        "resolve-connect".to_owned(),
        lookup.name.to_owned(),
        port.to_string(),
        "--server".into(),
        lookup.server.to_string(),
    ];
    if lookup.aaaa {
        args.extend(["--type".into(), "AAAA".into()]);
    }
    if lookup.tcp {
        args.push("--tcp-dns".into());
    }
    let (result, line) = ProbeResult::run(&mut probe_command(netns, cgroup, &args));
    Resolved {
        result,
        addr: line["addr"].as_str().map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("probe printed a bad address: {line}"))
        }),
        connect_us: line["connect_us"].as_u64(),
    }
}

/// A probe client that runs while the test goes on (`tcp-hold`, `query-wait`): its
/// progress lines can be awaited, and its result collected at the end. Killed on drop.
pub struct BackgroundProbe {
    child: Child,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
}

impl BackgroundProbe {
    fn spawn(netns: &Netns, cgroup: Option<&TestCgroup>, args: &[String]) -> BackgroundProbe {
        BackgroundProbe::spawn_command(&mut probe_command(netns, cgroup, args))
    }

    /// Starts a prepared probe command, e.g. one that runs in a user namespace.
    pub(crate) fn spawn_command(cmd: &mut Command) -> BackgroundProbe {
        let (child, stdout, stderr) = spawn_captured(cmd);
        BackgroundProbe {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for output line `n` (from 0) and returns it; panics if the probe printed its
    /// result or exited instead.
    pub fn line(&self, n: usize) -> Value {
        let line = self
            .stdout
            .wait_for(PROGRESS_TIMEOUT, |lines| lines.get(n).cloned())
            .unwrap_or_else(|| self.broken(&format!("printed no line {n}")));
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| self.broken(&format!("printed a non-JSON line {line:?}")));
        if value.get("ok").is_some() {
            self.broken(&format!("finished early: {value}"));
        }
        value
    }

    /// How many attempts a `connect-loop` has reported so far (a line each).
    pub fn attempts(&self) -> usize {
        let attempt = |l: &String| l.contains("\"attempt\"");
        self.stdout.lines().iter().filter(|l| attempt(l)).count()
    }

    /// Waits until a `connect-loop` has reported `n` attempts; panics if it finished or
    /// went quiet for [`PROGRESS_TIMEOUT`] per attempt still to come.
    pub fn wait_attempts(&self, n: usize) {
        let missing = n.saturating_sub(self.attempts());
        let timeout = PROGRESS_TIMEOUT * u32::try_from(missing).expect("a few attempts");
        let attempt = |l: &String| l.contains("\"attempt\"");
        let reached =
            |lines: &[String]| (lines.iter().filter(|l| attempt(l)).count() >= n).then_some(());
        if self.stdout.wait_for(timeout, reached).is_none() {
            self.broken(&format!("reported {} of {n} attempts", self.attempts()));
        }
    }

    /// Asks a `connect-loop` to stop after its current attempt (SIGTERM).
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
            // SAFETY: kill has no memory-safety preconditions; the child is not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    /// Whether the probe is still at work (has not printed its result).
    pub fn running(&self) -> bool {
        let done = |lines: &[String]| lines.iter().any(|l| l.contains("\"ok\"")).then_some(());
        self.stdout.wait_for(Duration::ZERO, done).is_none()
    }

    /// Waits for the probe to exit and returns its result.
    pub fn finish(&mut self) -> ProbeResult {
        self.finish_line().0
    }

    /// Waits for the probe to exit and returns its result with its whole result line.
    pub fn finish_line(&mut self) -> (ProbeResult, Value) {
        let deadline = Instant::now() + PROGRESS_TIMEOUT;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "probe still running after {PROGRESS_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        self.stdout.wait_closed(PROGRESS_TIMEOUT);
        self.stderr.wait_closed(PROGRESS_TIMEOUT);
        let stdout = self.stdout.lines().join("\n");
        ProbeResult::parse(status, &stdout, &self.stderr.lines().join("\n"))
    }

    /// Every stdout line so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.stdout.lines()
    }

    /// Waits until `find` succeeds on the stdout lines so far, or `timeout` passes.
    pub(crate) fn wait_for<T>(
        &self,
        timeout: Duration,
        find: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        self.stdout.wait_for(timeout, find)
    }

    fn broken(&self, what: &str) -> ! {
        panic!(
            "background probe {what}; stdout: {:?}, stderr: {:?}",
            self.stdout.lines(),
            self.stderr.lines()
        )
    }
}

impl Drop for BackgroundProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to `addr:port` and exchanges a line every `interval` for `duration`. Line 0
/// is `{"connected":true}`; the result counts the `exchanges`.
pub fn tcp_hold(
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    addr: impl Into<IpAddr>,
    port: u16,
    duration: Duration,
    interval: Duration,
) -> BackgroundProbe {
    let args = timed_args("tcp-hold", addr.into(), port, duration, interval);
    BackgroundProbe::spawn(netns, cgroup, &args)
}

/// New connections to `addr:port`, one every `interval` for `duration` or until
/// [`BackgroundProbe::stop`], each given `timeout`. Line 0 is `{"started":true}`; the result
/// counts `attempts` and `connected`, with the `first_error` of the others.
pub fn connect_loop(
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    addr: impl Into<IpAddr>,
    port: u16,
    duration: Duration,
    interval: Duration,
    timeout: Duration,
) -> BackgroundProbe {
    let mut args = timed_args("connect-loop", addr.into(), port, duration, interval);
    args.extend(["--timeout-ms".into(), timeout.as_millis().to_string()]);
    BackgroundProbe::spawn(netns, cgroup, &args)
}

/// `COMMAND ADDR PORT --seconds N --interval-ms M`, the probe's timed clients.
fn timed_args(
    command: &str,
    addr: IpAddr,
    port: u16,
    duration: Duration,
    interval: Duration,
) -> Vec<String> {
    vec![
        command.to_owned(),
        addr.to_string(),
        port.to_string(),
        "--seconds".into(),
        duration.as_secs().to_string(),
        "--interval-ms".into(),
        interval.as_millis().to_string(),
    ]
}

/// Sends an A query for `name` with id `id` to `server` from a fresh port, then waits for
/// `count` datagrams back. Line 0 is `{"sent":true,"port":P}`; each datagram is a line
/// `{"from":"ADDR:PORT","id":N,"addrs":[...]}`.
pub fn query_wait(
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    name: &str,
    server: impl Into<IpAddr>,
    id: u16,
    count: usize,
) -> BackgroundProbe {
    BackgroundProbe::spawn(
        netns,
        cgroup,
        &query_wait_args(name, server.into(), id, count),
    )
}

/// The arguments of [`query_wait`].
pub(crate) fn query_wait_args(name: &str, server: IpAddr, id: u16, count: usize) -> Vec<String> {
    vec![
        "query-wait".to_owned(),
        name.to_owned(),
        "--server".into(),
        server.to_string(),
        "--id".into(),
        id.to_string(),
        "--count".into(),
        count.to_string(),
    ]
}

/// A DNS answer to forge: from `src` port 53 to `dst:dport`, claiming `name` is at `a`.
#[derive(Debug, Clone, Copy)]
pub struct Forged<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub id: u16,
    pub name: &'a str,
    pub a: Ipv4Addr,
}

/// Sends `answer` from `netns` over a raw socket (any source address).
pub fn forge_answer(netns: &Netns, answer: Forged) {
    let args = [
        "raw-udp".to_owned(),
        "--src".into(),
        format!("{}:53", answer.src),
        "--dst".into(),
        format!("{}:{}", answer.dst, answer.dport),
        "--dns-answer".into(),
        answer.name.to_owned(),
        "--id".into(),
        answer.id.to_string(),
        "--a".into(),
        answer.a.to_string(),
    ];
    let mut cmd = probe_command(netns, None, &args);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {cmd:?}: {err}"));
    let result = ProbeResult::from_output(&output);
    assert!(result.ok, "forging {answer:?} failed: {result:?}");
}

/// The agent's DNS counters, from the line it logs on SIGTERM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DnsCounters {
    /// Answers the agent handled (for allowed names).
    pub answers: u64,
    /// (name, address) pairs the agent learned.
    pub learned: u64,
    /// Solicited answers from trusted resolvers, seen by the kernel.
    pub kernel_answers: u64,
    /// Addresses the kernel wrote.
    pub kernel_learned: u64,
    pub untrusted: u64,
    pub unsolicited: u64,
    /// Answers for names no rule allows.
    pub unmatched: u64,
    pub kernel_malformed: u64,
    /// Answers the kernel could not pass on to the agent.
    pub lost: u64,
    /// Addresses not on the question's CNAME chain.
    pub off_chain: u64,
    pub malformed: u64,
    pub evicted: u64,
    pub expired: u64,
}

impl DnsCounters {
    /// Parses `dns: answers N learned N (kernel: answers N ...); agent: off-chain N ...`.
    fn parse(line: &str) -> Option<DnsCounters> {
        let (_, rest) = line.split_once("dns: ")?;
        let (agent_head, rest) = rest.split_once("(kernel: ")?;
        let (kernel, agent_tail) = rest.split_once("); agent: ")?;
        let pairs = |text: &str| -> Option<Vec<(String, u64)>> {
            let words: Vec<&str> = text.split_whitespace().collect();
            words
                .chunks(2)
                .map(|pair| Some((pair.first()?.to_string(), pair.get(1)?.parse().ok()?)))
                .collect()
        };
        let (agent_head, kernel, agent_tail) =
            (pairs(agent_head)?, pairs(kernel)?, pairs(agent_tail)?);
        let get = |from: &[(String, u64)], key: &str| {
            from.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
        };
        Some(DnsCounters {
            answers: get(&agent_head, "answers")?,
            learned: get(&agent_head, "learned")?,
            kernel_answers: get(&kernel, "answers")?,
            kernel_learned: get(&kernel, "learned")?,
            untrusted: get(&kernel, "untrusted")?,
            unsolicited: get(&kernel, "unsolicited")?,
            unmatched: get(&kernel, "unmatched")?,
            kernel_malformed: get(&kernel, "malformed")?,
            lost: get(&kernel, "lost")?,
            off_chain: get(&agent_tail, "off-chain")?,
            malformed: get(&agent_tail, "malformed")?,
            evicted: get(&agent_tail, "evicted")?,
            expired: get(&agent_tail, "expired")?,
        })
    }
}

impl Agent {
    /// The DNS counters the agent logged when it stopped; call after [`Agent::terminate`].
    pub fn dns_counters(&self) -> DnsCounters {
        let lines = self.stderr_lines();
        lines
            .iter()
            .find(|l| l.contains("dns: answers"))
            .and_then(|l| DnsCounters::parse(l))
            .unwrap_or_else(|| {
                panic!(
                    "no parsable \"dns: answers ...\" line on the agent's stderr:\n{}",
                    lines.join("\n")
                )
            })
    }

    /// Waits until the agent has learned `addr` for `name` (its `learned` event, on since
    /// [`Agent::spawn_command`]) and returns the event.
    pub fn wait_learned(&self, name: &str, addr: impl Into<IpAddr>) -> Value {
        let addr = addr.into().to_string();
        self.wait_for_event(
            |e| e["event"] == "learned" && e["name"] == name && e["addr"] == addr.as_str(),
            LEARN_TIMEOUT,
        )
    }
}

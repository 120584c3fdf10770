//! Fixtures for the attack tests (`tests/attacks.rs`): what a process in the enforced
//! cgroup can build to get traffic out that the policy does not allow. An unprivileged
//! process with user namespaces makes an [`Island`] of network namespaces of its own; a
//! root one forges packets with the probe's `raw-*` modes; a [`Spur`] puts a third
//! namespace behind the server, so that the server routes; a [`Sniffer`] shows what
//! reached an interface, whatever the receiving kernel then does with it.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::dns::{BackgroundProbe, query_wait_args};
use super::{
    Agent, Netns, PinDir, ProbeResult, SERVER_V4, TempFile, TestCgroup, Topology, agent_bin,
    egress_probe_bin, next_id, probe_command, run, run_args, start_agent_command, wait_link_ready,
};

/// The unprivileged user the island's processes run as (`nobody`).
const NOBODY: &str = "65534";
/// How long a namespace holder may take to set its namespaces up.
const HOLDER_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a packet may take to show up at a sniffer.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a probe runs: a named namespace (in the cgroup if given), or an [`Island`].
pub trait Place {
    /// `egress-probe ARGS...` there, ready to spawn.
    fn probe(&self, args: &[&str]) -> Command;
}

/// A named namespace, and the cgroup a probe joins there (if any).
pub struct At<'a>(pub &'a Netns, pub Option<&'a TestCgroup>);

impl Place for At<'_> {
    fn probe(&self, args: &[&str]) -> Command {
        probe_command(self.0, self.1, args)
    }
}

/// Runs a probe client there to the end and returns its result and whole result line.
pub fn probe_at(place: &impl Place, args: &[&str]) -> (ProbeResult, Value) {
    ProbeResult::run(&mut place.probe(args))
}

/// Starts a probe there that goes on while the test does (a server, `udp-listen`,
/// `query-wait`), and waits for its first line, which it returns with the probe.
pub fn background_at(place: &impl Place, args: &[&str]) -> (BackgroundProbe, Value) {
    let probe = BackgroundProbe::spawn_command(&mut place.probe(args));
    let first = probe.line(0);
    (probe, first)
}

/// `serve-udp`, `serve-tcp` or `serve-dns` there, listening once returned.
pub fn serve_at(place: &impl Place, args: &[&str]) -> BackgroundProbe {
    let (server, first) = background_at(place, args);
    assert_eq!(first["listening"], true, "{args:?} printed {first}");
    server
}

/// `udp-listen ADDR PORT --count N [--reply ADDR:PORT]` there: returns the probe and the
/// port it bound.
pub fn udp_listen_at(
    place: &impl Place,
    bind: SocketAddr,
    count: usize,
    reply: Option<SocketAddr>,
) -> (BackgroundProbe, u16) {
    let (ip, port, count) = (
        bind.ip().to_string(),
        bind.port().to_string(),
        count.to_string(),
    );
    let reply = reply.map(|r| r.to_string());
    let mut args = vec!["udp-listen", &ip, &port, "--count", &count];
    if let Some(reply) = &reply {
        args.extend(["--reply", reply]);
    }
    let (probe, first) = background_at(place, &args);
    (probe, port_of(&first))
}

/// `query-wait` there: sends an A query for `name` with `id` to `server` and waits for
/// `count` datagrams. Returns the probe and the port the query left from.
pub fn query_wait_at(
    place: &impl Place,
    name: &str,
    server: IpAddr,
    id: u16,
    count: usize,
) -> (BackgroundProbe, u16) {
    let args = query_wait_args(name, server, id, count);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (probe, first) = background_at(place, &args);
    (probe, port_of(&first))
}

fn port_of(line: &Value) -> u16 {
    line["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("no port in {line}"))
}

/// A TCP connect (and echo of `size` bytes) from `bind`, e.g. a chosen local port.
pub fn tcp_from(place: &impl Place, bind: SocketAddr, dst: SocketAddr) -> ProbeResult {
    client_from(place, "tcp-connect", Some(bind), dst, None)
}

/// A UDP datagram (and its echo) from `bind`, e.g. a chosen local port.
pub fn udp_from(place: &impl Place, bind: SocketAddr, dst: SocketAddr) -> ProbeResult {
    client_from(place, "udp-send", Some(bind), dst, None)
}

/// `tcp-connect` or `udp-send` of `size` bytes (the probe's line if `None`), from `bind`
/// if given.
pub fn client_from(
    place: &impl Place,
    mode: &str,
    bind: Option<SocketAddr>,
    dst: SocketAddr,
    size: Option<usize>,
) -> ProbeResult {
    let (ip, port) = (dst.ip().to_string(), dst.port().to_string());
    let bind = bind.map(|b| b.to_string());
    let size = size.map(|s| s.to_string());
    let mut args = vec![mode, &ip, &port];
    if let Some(bind) = &bind {
        args.extend(["--bind", bind]);
    }
    if let Some(size) = &size {
        // A bulk transfer may wait for a retransmission timeout (path MTU discovery
        // with a rate-limited ICMP error): a bound for failure, not a measurement.
        args.extend(["--size", size, "--timeout-ms", BULK_TIMEOUT_MS]);
    }
    probe_at(place, &args).0
}

/// How long a bulk transfer of [`client_from`] may take before it counts as failed.
const BULK_TIMEOUT_MS: &str = "10000";

/// A UDP datagram from any address and port (`raw-udp`), sent by the kernel's routing or,
/// with `link`, as a frame to a MAC address out of an interface. `dns` makes it a DNS
/// message: a query, or with an address an answer; the rest of the arguments follow.
pub fn raw_udp(
    place: &impl Place,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    extra: &[&str],
) -> ProbeResult {
    let (src, dst) = (src.to_string(), dst.to_string());
    let mut args = vec!["raw-udp", "--src", &src, "--dst", &dst];
    args.extend(extra);
    probe_at(place, &args).0
}

/// A DNS query for `name` with `id`, from any address and port.
pub fn raw_dns_query(
    place: &impl Place,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    name: &str,
    id: u16,
) -> ProbeResult {
    raw_udp(
        place,
        src,
        dst,
        &["--dns-query", name, "--id", &id.to_string()],
    )
}

/// A TCP connection request from any address and port.
pub fn raw_syn(place: &impl Place, src: SocketAddrV4, dst: SocketAddrV4) -> ProbeResult {
    let (src, dst) = (src.to_string(), dst.to_string());
    probe_at(place, &["raw-tcp", "--src", &src, "--dst", &dst]).0
}

/// A TCP ACK with `size` bytes of data (0: a bare ACK) from any address and port.
pub fn raw_ack(
    place: &impl Place,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    size: usize,
) -> ProbeResult {
    let (src, dst, size) = (src.to_string(), dst.to_string(), size.to_string());
    probe_at(
        place,
        &[
            "raw-tcp", "--src", &src, "--dst", &dst, "--ack", "--size", &size,
        ],
    )
    .0
}

/// An ICMP or ICMPv6 message of type `icmp_type` to `dst`, quoting the UDP datagram
/// `quote` (source, destination) if given, with `extra` bytes after it.
pub fn raw_icmp(
    place: &impl Place,
    dst: IpAddr,
    icmp_type: u8,
    code: u8,
    quote: Option<(SocketAddrV4, SocketAddrV4)>,
    extra: usize,
) -> ProbeResult {
    let dst = dst.to_string();
    let (icmp_type, code, extra) = (icmp_type.to_string(), code.to_string(), extra.to_string());
    let quote = quote.map(|(s, d)| (s.to_string(), d.to_string()));
    let mut args = vec![
        "raw-icmp", "--dst", &dst, "--type", &icmp_type, "--code", &code,
    ];
    args.extend(["--extra", &extra]);
    if let Some((src, dst)) = &quote {
        args.extend(["--quote-src", src, "--quote-dst", dst]);
    }
    probe_at(place, &args).0
}

/// The last fragment, alone, of a UDP datagram: `len` bytes at `offset`.
pub fn raw_fragment(
    place: &impl Place,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    offset: u16,
    len: usize,
) -> ProbeResult {
    let (src, dst) = (src.to_string(), dst.to_string());
    let (offset, len) = (offset.to_string(), len.to_string());
    let args = [
        "raw-fragment",
        "--src",
        &src,
        "--dst",
        &dst,
        "--offset",
        &offset,
        "--len",
        &len,
    ];
    probe_at(place, &args).0
}

/// Moves a process spawned from `cmd` into the cgroup of `procs_path` (its `cgroup.procs`)
/// before it runs anything, while it still has the parent's privileges: an unprivileged
/// process cannot join a cgroup.
fn spawn_into(cmd: &mut Command, procs_path: &Path) {
    let procs = File::options()
        .write(true)
        .open(procs_path)
        .unwrap_or_else(|err| panic!("cannot open {}: {err}", procs_path.display()));
    // SAFETY: the hook only calls write(2), which is async-signal-safe, on a descriptor
    // the closure owns (so it is open in the child); "0" means the writing process.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Network namespaces that an unprivileged process (uid 65534, no capabilities in the
/// host's namespaces) made for itself with `unshare -Urn`, where it is root: it may put
/// any address on its own interfaces, run servers on port 53 and open raw sockets. A
/// `sleep` holds the namespaces; every process started here runs in the enforced cgroup
/// as that user. Drop kills the holder, and with it the namespaces and their links.
pub struct Island {
    holder: Child,
    /// The enforced cgroup's `cgroup.procs`.
    cgroup_procs: PathBuf,
}

impl Island {
    /// A user namespace with a network namespace of its own (`lo` up).
    pub fn new(cgroup: &TestCgroup) -> Island {
        let mut cmd = Command::new("setpriv");
        cmd.args(nobody())
            .args(["unshare", "-Urn", "sleep", "infinity"]);
        let island = Island::hold(cmd, cgroup);
        island.ip("link set lo up");
        island
    }

    /// Another network namespace in this island's user namespace (`lo` up).
    pub fn sibling(&self, cgroup: &TestCgroup) -> Island {
        let mut cmd = Command::new("setpriv");
        cmd.args(nobody())
            .args(["nsenter", "--preserve-credentials", "-U", "-t"])
            .arg(self.pid().to_string())
            .args(["unshare", "-n", "sleep", "infinity"]);
        let island = Island::hold(cmd, cgroup);
        island.ip("link set lo up");
        island
    }

    /// Starts the holder and waits until it has made its namespaces (it then runs `sleep`).
    fn hold(mut cmd: Command, cgroup: &TestCgroup) -> Island {
        let cgroup_procs = cgroup.path().join("cgroup.procs");
        spawn_into(&mut cmd, &cgroup_procs);
        cmd.stdin(Stdio::null());
        let holder = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {cmd:?}: {err}"));
        let island = Island {
            holder,
            cgroup_procs,
        };
        let comm = format!("/proc/{}/comm", island.pid());
        let deadline = Instant::now() + HOLDER_READY_TIMEOUT;
        while fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
            assert!(
                Instant::now() < deadline,
                "{cmd:?} did not set up its namespaces"
            );
            thread::sleep(Duration::from_millis(10));
        }
        island
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// `ARGV...` inside the island, as its unprivileged user, in the enforced cgroup.
    pub fn command<S: AsRef<OsStr>>(&self, argv: &[S]) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(nobody())
            .args(["nsenter", "--preserve-credentials", "-U", "-n", "-t"])
            .arg(self.pid().to_string())
            .arg("--")
            .args(argv);
        spawn_into(&mut cmd, &self.cgroup_procs);
        cmd
    }

    /// `ip ARGS` inside the island (split on whitespace); panics if it fails.
    pub fn ip(&self, args: &str) -> String {
        let mut argv = vec!["ip"];
        argv.extend(args.split_whitespace());
        run(&mut self.command(&argv))
    }

    /// Joins this island's namespace and `other`'s with a veth pair; returns the names
    /// of the ends, (here, there), both up.
    pub fn link(&self, other: &Island) -> (String, String) {
        let id = next_id();
        let (here, there) = (format!("iv{id}a"), format!("iv{id}b"));
        self.ip(&format!(
            "link add {here} type veth peer name {there} netns {}",
            other.pid()
        ));
        self.ip(&format!("link set {here} up"));
        other.ip(&format!("link set {there} up"));
        (here, there)
    }
}

impl Place for Island {
    fn probe(&self, args: &[&str]) -> Command {
        let mut argv = vec![egress_probe_bin().into_os_string()];
        argv.extend(args.iter().map(Into::into));
        self.command(&argv)
    }
}

impl Drop for Island {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// `setpriv` arguments that make the rest run as `nobody`, with no supplementary groups.
fn nobody() -> [&'static str; 5] {
    ["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"]
}

/// The MSS of a 1,500-byte Ethernet MTU.
const FULL_SIZE_MSS: u32 = 1460;

/// A third namespace behind the topology's server, which routes for it (forwarding on,
/// reverse path filtering off): the client reaches [`Spur::addr`] through the server, as
/// it would reach a host a few hops away.
pub struct Spur {
    pub netns: Netns,
    /// The one address of the spur, on its end of the link.
    pub addr: Ipv4Addr,
    /// The server's end of the link.
    pub server_veth: String,
    /// The spur's end of the link.
    pub spur_veth: String,
}

impl Spur {
    /// Builds the spur holding `addr`. With `link_mtu`, the server's end of the link has
    /// that MTU: what the server forwards there in larger packets with Don't Fragment set,
    /// it refuses with "fragmentation needed", as a router before a narrower link does.
    /// The spur still offers a full-size MSS, as a host behind such a router does, but
    /// sends no larger packets itself (its routes carry the MTU): a veth drops what exceeds
    /// its receiver's MTU without an error.
    pub fn new(topo: &Topology, addr: Ipv4Addr, link_mtu: Option<u32>) -> Spur {
        let netns = Netns::new();
        let id = next_id();
        let (server_veth, spur_veth) = (format!("sv{id}a"), format!("sv{id}b"));
        let (server_ns, spur_ns) = (topo.server.name(), netns.name());
        run(Command::new("ip").args(
            format!(
                "link add {server_veth} netns {server_ns} type veth peer name {spur_veth} netns {spur_ns}"
            )
            .split_whitespace(),
        ));
        let route_mtu = match link_mtu {
            Some(mtu) => {
                topo.server.ip(&format!("link set {server_veth} mtu {mtu}"));
                format!(" mtu lock {mtu} advmss {FULL_SIZE_MSS}")
            }
            None => String::new(),
        };
        topo.server.ip(&format!("link set {server_veth} up"));
        netns.ip(&format!("link set {spur_veth} up"));
        netns.ip(&format!("addr add {addr}/32 dev {spur_veth}"));
        netns.ip(&format!(
            "route add {SERVER_V4}/32 dev {spur_veth}{route_mtu}"
        ));
        netns.ip(&format!(
            "route add default via {SERVER_V4} dev {spur_veth}{route_mtu}"
        ));
        topo.server
            .ip(&format!("route add {addr}/32 dev {server_veth}"));
        for setting in [
            "net.ipv4.ip_forward=1".to_owned(),
            "net.ipv4.conf.all.rp_filter=0".to_owned(),
            format!("net.ipv4.conf.{}.rp_filter=0", topo.server_veth),
            format!("net.ipv4.conf.{server_veth}.rp_filter=0"),
        ] {
            run(&mut topo.server.exec(&["sysctl", "-q", "-w", &setting]));
        }
        wait_link_ready(&netns, &spur_veth);
        wait_link_ready(&topo.server, &server_veth);
        Spur {
            netns,
            addr,
            server_veth,
            spur_veth,
        }
    }
}

/// The MAC address of `iface` in `netns`.
pub fn mac_of(netns: &Netns, iface: &str) -> String {
    let link: Value = serde_json::from_str(&netns.ip(&format!("-j link show dev {iface}")))
        .expect("`ip -j` prints JSON");
    link[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("{iface} has no address: {link}"))
        .to_owned()
}

/// Every IP packet an interface receives or sends (the probe's `sniff`, a packet socket:
/// it sees packets before the receiving kernel reassembles, filters or delivers them).
/// Each is a JSON object with `src`, `dst`, `proto`, `len`, `frag_offset`, `out` (sent by
/// this side) and, as they apply, `sport`, `dport`, `tcp_flags`, `icmp_type`. Killed on
/// drop.
pub struct Sniffer {
    probe: BackgroundProbe,
}

impl Sniffer {
    /// Starts sniffing `iface` in `netns`; returns once the socket is bound.
    pub fn start(netns: &Netns, iface: &str) -> Sniffer {
        let probe = serve_at(&At(netns, None), &["sniff", iface]);
        Sniffer { probe }
    }

    /// The packets received (not sent) so far that match `pred`.
    pub fn received(&self, mut pred: impl FnMut(&Value) -> bool) -> Vec<Value> {
        received(&self.probe.lines()).filter(|p| pred(p)).collect()
    }

    /// Waits for a received packet matching `pred` and returns it; panics with
    /// everything received so far on timeout.
    pub fn wait_received(&self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let found = (self.probe).wait_for(SNIFF_TIMEOUT, |lines| received(lines).find(|p| pred(p)));
        found.unwrap_or_else(|| {
            panic!(
                "{what} did not arrive within {SNIFF_TIMEOUT:?}; received:\n{}",
                self.probe.lines().join("\n")
            )
        })
    }

    /// The negative check on the wire: waits for the marker (a packet sent after the
    /// attack on the same path, which must arrive), then asserts that no packet received
    /// matches `is_leak`, naming `leak` if one does.
    pub fn assert_none_before_marker(
        &self,
        is_marker: impl FnMut(&Value) -> bool,
        mut is_leak: impl FnMut(&Value) -> bool,
        leak: &str,
    ) {
        self.wait_received("the marker", is_marker);
        let leaked = self.received(|p| is_leak(p));
        assert!(leaked.is_empty(), "{leak}: {leaked:?}");
    }
}

/// The packets among sniffed lines that came in (the first line is the ready line).
fn received(lines: &[String]) -> impl Iterator<Item = Value> + '_ {
    lines
        .iter()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|p| p["out"] == false)
}

/// The agent, run inside `netns` (its network namespace only: the cgroup2 mount stays
/// visible) so that `--interface` and `--workload-interface`, among `args`, can name that
/// namespace's links, with its own pin root; returns once it enforces.
pub fn start_agent_in(
    netns: &Netns,
    policy: &TempFile,
    cgroup: &TestCgroup,
    args: &[&str],
) -> Agent {
    let pins = PinDir::new();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", netns.name()))
        .arg("--")
        .arg(agent_bin())
        .args(run_args(policy, cgroup, &pins))
        .args(args);
    let mut agent = start_agent_command(cmd, None);
    agent.pins = Some(pins);
    agent
}

/// A counter of `/proc/net/FILE` in `netns`: `snmp` or `netstat`, e.g. `TcpExt`
/// `ListenDrops` in `netstat`.
pub fn netstat(netns: &Netns, file: &str, group: &str, name: &str) -> u64 {
    let text = run(&mut netns.exec(&["cat", &format!("/proc/net/{file}")]));
    let prefix = format!("{group}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (rows.next(), rows.next());
    let (Some(names), Some(values)) = (names, values) else {
        panic!("no {group} rows in /proc/net/{file}:\n{text}")
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {group} {name} in /proc/net/{file}:\n{text}"))
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

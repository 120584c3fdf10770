//! Client, echo server, DNS client, DNS server, packet forger and packet sniffer that the
//! end-to-end tests run inside network namespaces.
//!
//! Clients print one JSON line with `"ok"` (`{"ok":true}` or
//! `{"ok":false,"errno":N,"error":"..."}`, plus fields of their own) as their last line and
//! exit 0 or 1 accordingly, so a test can tell "blocked" from "broken" without scraping
//! error text. `tcp-hold`, `connect-loop`, `query-wait` and `udp-listen` print progress
//! lines before it (each without `"ok"`; `connect-loop` one per attempt), so a test can act
//! while they run. The `raw-*`
//! modes send one packet built here, whatever its addresses say; `sniff` prints every IP
//! packet an interface sees until it is killed. Usage errors and a failure to join the
//! cgroup exit 2: those are harness bugs, not probe results.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use egress_test_support::packet::{self, Fragment};
use egress_test_support::proto;
use egress_test_support::raw::{
    ETH_HEADER, ETH_P_ALL, ETH_P_IP, ETH_P_IPV6, packet_socket, parse_mac, send_frame, send_routed,
};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::A};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};

const USAGE: &str = "\
usage: egress-probe [--cgroup DIR] tcp-connect|udp-send ADDR PORT [--timeout-ms N]
                    [--bind ADDR:PORT] [--size N]
       egress-probe [--cgroup DIR] serve-tcp|serve-udp ADDR PORT
       egress-probe [--cgroup DIR] resolve-connect NAME PORT --server ADDR
                    [--type A|AAAA] [--tcp-dns] [--timeout-ms N]
       egress-probe [--cgroup DIR] resolve-connect --names-file FILE PORT --server ADDR [...]
       egress-probe [--cgroup DIR] tcp-hold ADDR PORT --seconds N --interval-ms M
       egress-probe [--cgroup DIR] connect-loop ADDR PORT --seconds N --interval-ms M
                    [--timeout-ms N]
       egress-probe [--cgroup DIR] query-wait NAME --server ADDR --id ID [--count N]
                    [--timeout-ms N]
       egress-probe [--cgroup DIR] udp-listen ADDR PORT [--count N] [--reply ADDR:PORT]
                    [--timeout-ms N]
       egress-probe [--cgroup DIR] serve-dns ADDR PORT --a ADDR
       egress-probe [--cgroup DIR] raw-udp --src ADDR:PORT --dst ADDR:PORT
                    [--dns-query NAME | --dns-answer NAME --a ADDR] [--id ID]
                    [--link IFACE --dst-mac MAC]
       egress-probe [--cgroup DIR] raw-tcp --src ADDR:PORT --dst ADDR:PORT [--ack] [--size N]
       egress-probe [--cgroup DIR] raw-fragment --src ADDR --dst ADDR --offset N --len N
       egress-probe [--cgroup DIR] raw-icmp --dst ADDR --type T [--code C]
                    [--quote-src ADDR:PORT --quote-dst ADDR:PORT] [--extra N]
       egress-probe sniff IFACE";

const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Per step of `resolve-connect` (DNS, connect, echo): long enough that a first SYN lost to
/// the enforcer is retransmitted (after 1 s) and the connect's duration shows it.
const RESOLVE_TIMEOUT: Duration = Duration::from_millis(3000);
/// How long `query-wait` waits for its datagrams.
const QUERY_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect and per-echo timeout of `tcp-hold`.
const HOLD_TIMEOUT: Duration = Duration::from_secs(3);
const DNS_PORT: u16 = 53;
/// TTL of forged records: far beyond any test.
const FORGED_TTL: u32 = 300;

/// What the clients send and expect back; the newline makes it "a line".
const PAYLOAD: &[u8] = b"egress-probe ping\n";

enum Mode {
    TcpConnect(Client),
    UdpSend(Client),
    ServeTcp(SocketAddr),
    ServeUdp(SocketAddr),
    ResolveConnect(ResolveConnect),
    TcpHold(TcpHold),
    ConnectLoop(ConnectLoop),
    QueryWait(QueryWait),
    UdpListen(UdpListen),
    ServeDns(SocketAddr, Ipv4Addr),
    RawUdp(RawUdp),
    RawTcp(RawTcp),
    RawFragment(RawFragment),
    RawIcmp(RawIcmp),
    Sniff(String),
}

/// `tcp-connect` and `udp-send`: one exchange of `size` bytes with an echo server.
struct Client {
    addr: SocketAddr,
    timeout: Duration,
    /// The local address and port to send from (`SO_REUSEADDR`), instead of any.
    bind: Option<SocketAddr>,
    size: usize,
}

/// `resolve-connect`: one name, or each name of a file in turn.
struct ResolveConnect {
    names: Vec<String>,
    /// One result line per name and exit 0, instead of one result and its exit status.
    each: bool,
    port: u16,
    lookup: Lookup,
    timeout: Duration,
}

/// How to ask the DNS server.
struct Lookup {
    server: SocketAddr,
    rtype: RecordType,
    tcp: bool,
}

struct TcpHold {
    addr: SocketAddr,
    duration: Duration,
    interval: Duration,
}

/// New connections, one after another, each exchanging a line.
struct ConnectLoop {
    addr: SocketAddr,
    duration: Duration,
    interval: Duration,
    timeout: Duration,
}

struct QueryWait {
    name: String,
    server: SocketAddr,
    id: u16,
    count: usize,
    timeout: Duration,
}

/// A UDP socket that waits for `count` datagrams, then (with `reply`) sends to `reply` from
/// the same socket and waits for the echo.
struct UdpListen {
    addr: SocketAddr,
    count: usize,
    reply: Option<SocketAddr>,
    timeout: Duration,
}

/// A UDP datagram from any source address and port.
struct RawUdp {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    data: RawData,
    /// Sent as an Ethernet frame to `dst_mac` out of this interface (a packet socket),
    /// instead of routed by the kernel.
    link: Option<(String, [u8; 6])>,
}

/// A `raw-tcp` segment: a SYN, or with `ack` an ACK carrying `size` bytes.
struct RawTcp {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ack: bool,
    size: usize,
}

/// What a [`RawUdp`] carries.
enum RawData {
    Payload,
    DnsQuery { name: String, id: u16 },
    DnsAnswer { name: String, id: u16, a: Ipv4Addr },
}

/// A later fragment of a UDP datagram, alone.
struct RawFragment {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    offset: u16,
    len: usize,
}

/// An ICMP or ICMPv6 message of any type, through the kernel's raw ICMP socket.
struct RawIcmp {
    dst: IpAddr,
    icmp_type: u8,
    code: u8,
    /// For an ICMP error: the UDP datagram it is about (its source, its destination).
    quote: Option<(SocketAddrV4, SocketAddrV4)>,
    /// Bytes carried after the quote.
    extra: usize,
}

/// Why a client probe failed, in the shape it is reported.
struct Failure {
    errno: i32,
    error: String,
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        match err.kind() {
            // A dropped packet is only visible as silence: connect_timeout reports TimedOut,
            // a socket read timeout reports WouldBlock.
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => timeout(),
            _ => Failure {
                errno: err.raw_os_error().unwrap_or(libc::EIO),
                error: err.to_string(),
            },
        }
    }
}

impl Failure {
    /// The same failure, its description prefixed with the step that failed.
    fn during(self, step: &str) -> Failure {
        Failure {
            errno: self.errno,
            error: format!("{step}: {}", self.error),
        }
    }
}

fn timeout() -> Failure {
    Failure {
        errno: libc::ETIMEDOUT,
        error: "timeout".to_owned(),
    }
}

/// A peer that answered, but not with what was expected.
fn protocol_error(error: String) -> Failure {
    Failure {
        errno: libc::EPROTO,
        error,
    }
}

fn main() -> ExitCode {
    let mut args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => return usage_error(&msg),
    };
    let cgroup = args.take("--cgroup").map(PathBuf::from);
    let mode = match parse_mode(&mut args).and_then(|mode| args.finish().map(|()| mode)) {
        Ok(mode) => mode,
        Err(msg) => return usage_error(&msg),
    };
    if let Some(dir) = &cgroup
        && let Err(err) = join_cgroup(dir)
    {
        eprintln!("egress-probe: cannot join cgroup {}: {err}", dir.display());
        return ExitCode::from(2);
    }
    match mode {
        Mode::TcpConnect(client) => report(tcp_connect(&client).map(|()| json!({}))),
        Mode::UdpSend(client) => report(udp_send(&client).map(|()| json!({}))),
        Mode::ServeTcp(addr) => exit_on_error(serve_tcp(addr)),
        Mode::ServeUdp(addr) => exit_on_error(serve_udp(addr)),
        Mode::ResolveConnect(rc) => resolve_connect_all(&rc),
        Mode::TcpHold(hold) => report_with(tcp_hold(&hold)),
        Mode::ConnectLoop(cl) => report(Ok(connect_loop(&cl))),
        Mode::QueryWait(qw) => report_with(query_wait(&qw)),
        Mode::UdpListen(ul) => report_with(udp_listen(&ul)),
        Mode::ServeDns(addr, a) => exit_on_error(serve_dns(addr, a)),
        Mode::RawUdp(raw) => report(raw_udp(&raw).map(|()| json!({}))),
        Mode::RawTcp(segment) => report(raw_tcp(&segment).map(|()| json!({}))),
        Mode::RawFragment(f) => report(raw_fragment(&f).map(|()| json!({}))),
        Mode::RawIcmp(icmp) => report(raw_icmp(&icmp).map(|()| json!({}))),
        Mode::Sniff(iface) => exit_on_error(sniff(&iface)),
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("egress-probe: {msg}\n{USAGE}");
    ExitCode::from(2)
}

/// The command line: positional arguments, and `--option value` pairs (or bare flags).
struct Args {
    positional: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

/// Options that take no value.
const FLAGS: &[&str] = &["--tcp-dns", "--ack"];

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut positional = Vec::new();
        let mut options = Vec::new();
        let mut args = args;
        while let Some(arg) = args.next() {
            if !arg.starts_with("--") {
                positional.push(arg);
            } else if FLAGS.contains(&arg.as_str()) {
                options.push((arg, None));
            } else {
                let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
                options.push((arg, Some(value)));
            }
        }
        Ok(Args {
            positional,
            options,
        })
    }

    /// Removes and returns the value of `--name`, if given.
    fn take(&mut self, name: &str) -> Option<String> {
        let at = self.options.iter().position(|(n, _)| n == name)?;
        self.options.remove(at).1
    }

    fn flag(&mut self, name: &str) -> bool {
        let at = self.options.iter().position(|(n, _)| n == name);
        at.map(|at| self.options.remove(at)).is_some()
    }

    fn parsed<T: FromStr>(&mut self, name: &str) -> Result<Option<T>, String> {
        self.take(name)
            .map(|v| v.parse().map_err(|_| format!("bad {name} {v:?}")))
            .transpose()
    }

    fn required<T: FromStr>(&mut self, name: &str) -> Result<T, String> {
        self.parsed(name)?
            .ok_or_else(|| format!("{name} is required"))
    }

    fn timeout(&mut self, default: Duration) -> Result<Duration, String> {
        Ok(self
            .parsed("--timeout-ms")?
            .map_or(default, Duration::from_millis))
    }

    /// Fails on anything a subcommand did not take.
    fn finish(self) -> Result<(), String> {
        match self.options.first() {
            Some((name, _)) => Err(format!("unexpected option {name}")),
            None => Ok(()),
        }
    }
}

fn parse_mode(args: &mut Args) -> Result<Mode, String> {
    if args.positional.is_empty() {
        return Err("expected a subcommand".to_owned());
    }
    let mode = args.positional.remove(0);
    let positional = std::mem::take(&mut args.positional);
    let endpoint = |what: &str| -> Result<SocketAddr, String> {
        let [addr, port] = <[String; 2]>::try_from(positional.clone())
            .map_err(|_| format!("{what} takes ADDR and PORT"))?;
        Ok(SocketAddr::new(
            parse(&addr, "address")?,
            parse(&port, "port")?,
        ))
    };
    let parsed = match mode.as_str() {
        "tcp-connect" => Mode::TcpConnect(parse_client(args, endpoint(&mode)?)?),
        "udp-send" => Mode::UdpSend(parse_client(args, endpoint(&mode)?)?),
        "serve-tcp" => Mode::ServeTcp(endpoint(&mode)?),
        "serve-udp" => Mode::ServeUdp(endpoint(&mode)?),
        "resolve-connect" => Mode::ResolveConnect(parse_resolve_connect(args, positional)?),
        "tcp-hold" => Mode::TcpHold(TcpHold {
            addr: endpoint(&mode)?,
            duration: Duration::from_secs(args.required("--seconds")?),
            interval: Duration::from_millis(args.required("--interval-ms")?),
        }),
        "connect-loop" => Mode::ConnectLoop(ConnectLoop {
            addr: endpoint(&mode)?,
            duration: Duration::from_secs(args.required("--seconds")?),
            interval: Duration::from_millis(args.required("--interval-ms")?),
            timeout: args.timeout(DEFAULT_TIMEOUT)?,
        }),
        "query-wait" => {
            let [name] = <[String; 1]>::try_from(positional)
                .map_err(|_| "query-wait takes a NAME".to_owned())?;
            Mode::QueryWait(QueryWait {
                name,
                server: dns_server(args.required("--server")?),
                id: args.required("--id")?,
                count: args.parsed("--count")?.unwrap_or(1),
                timeout: args.timeout(QUERY_WAIT_TIMEOUT)?,
            })
        }
        "udp-listen" => Mode::UdpListen(UdpListen {
            addr: endpoint(&mode)?,
            count: args.parsed("--count")?.unwrap_or(1),
            reply: args.parsed("--reply")?,
            timeout: args.timeout(QUERY_WAIT_TIMEOUT)?,
        }),
        "serve-dns" => Mode::ServeDns(endpoint(&mode)?, args.required("--a")?),
        "sniff" => {
            let [iface] = <[String; 1]>::try_from(positional)
                .map_err(|_| "sniff takes an IFACE".to_owned())?;
            Mode::Sniff(iface)
        }
        raw if raw.starts_with("raw-") => {
            if !positional.is_empty() {
                return Err(format!("{raw} takes options only"));
            }
            parse_raw(raw, args)?
        }
        _ => return Err(format!("unknown subcommand {mode:?}")),
    };
    Ok(parsed)
}

fn parse_client(args: &mut Args, addr: SocketAddr) -> Result<Client, String> {
    Ok(Client {
        addr,
        timeout: args.timeout(DEFAULT_TIMEOUT)?,
        bind: args.parsed("--bind")?,
        size: args.parsed("--size")?.unwrap_or(PAYLOAD.len()),
    })
}

fn parse_raw(mode: &str, args: &mut Args) -> Result<Mode, String> {
    Ok(match mode {
        "raw-udp" => {
            let query = args.take("--dns-query");
            let answer = args.take("--dns-answer");
            let data = match (query, answer) {
                (None, None) => RawData::Payload,
                (Some(name), None) => RawData::DnsQuery {
                    name,
                    id: args.required("--id")?,
                },
                (None, Some(name)) => RawData::DnsAnswer {
                    name,
                    id: args.required("--id")?,
                    a: args.required("--a")?,
                },
                (Some(_), Some(_)) => return Err("--dns-query or --dns-answer, not both".into()),
            };
            let link = match args.take("--link") {
                Some(iface) => Some((iface, parse_mac(&args.required::<String>("--dst-mac")?)?)),
                None => None,
            };
            Mode::RawUdp(RawUdp {
                src: args.required("--src")?,
                dst: args.required("--dst")?,
                data,
                link,
            })
        }
        "raw-tcp" => Mode::RawTcp(RawTcp {
            src: args.required("--src")?,
            dst: args.required("--dst")?,
            ack: args.flag("--ack"),
            size: args.parsed("--size")?.unwrap_or(0),
        }),
        "raw-fragment" => Mode::RawFragment(RawFragment {
            src: args.required("--src")?,
            dst: args.required("--dst")?,
            offset: args.required("--offset")?,
            len: args.required("--len")?,
        }),
        "raw-icmp" => {
            let quote = match (args.parsed("--quote-src")?, args.parsed("--quote-dst")?) {
                (Some(src), Some(dst)) => Some((src, dst)),
                (None, None) => None,
                _ => return Err("--quote-src and --quote-dst go together".into()),
            };
            Mode::RawIcmp(RawIcmp {
                dst: args.required("--dst")?,
                icmp_type: args.required("--type")?,
                code: args.parsed("--code")?.unwrap_or(0),
                quote,
                extra: args.parsed("--extra")?.unwrap_or(0),
            })
        }
        _ => return Err(format!("unknown subcommand {mode:?}")),
    })
}

fn parse_resolve_connect(
    args: &mut Args,
    positional: Vec<String>,
) -> Result<ResolveConnect, String> {
    let file = args.take("--names-file");
    let each = file.is_some();
    let (names, port) = match (file, positional.as_slice()) {
        (None, [name, port]) => (vec![name.clone()], port),
        (Some(file), [port]) => {
            let text = fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
            (text.split_whitespace().map(str::to_owned).collect(), port)
        }
        _ => return Err("resolve-connect takes NAME PORT, or PORT with --names-file".to_owned()),
    };
    let rtype = match args.take("--type").as_deref() {
        None | Some("A") => RecordType::A,
        Some("AAAA") => RecordType::AAAA,
        Some(other) => return Err(format!("bad --type {other:?}")),
    };
    Ok(ResolveConnect {
        each,
        names,
        port: parse(port, "port")?,
        lookup: Lookup {
            server: dns_server(args.required("--server")?),
            rtype,
            tcp: args.flag("--tcp-dns"),
        },
        timeout: args.timeout(RESOLVE_TIMEOUT)?,
    })
}

fn parse<T: FromStr>(value: &str, what: &str) -> Result<T, String> {
    value.parse().map_err(|_| format!("bad {what} {value:?}"))
}

fn dns_server(addr: IpAddr) -> SocketAddr {
    SocketAddr::new(addr, DNS_PORT)
}

/// Moves this process (and so every socket it opens afterwards) into the cgroup.
fn join_cgroup(dir: &Path) -> io::Result<()> {
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
}

/// Prints one JSON line to stdout, at once (tests wait for it while the probe runs on).
fn emit(line: &Value) {
    let mut stdout = io::stdout().lock();
    // A test that stopped reading is gone; nothing useful is left to do with the error.
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// The result line: `fields` plus `"ok"`, and `"errno"`/`"error"` on failure.
fn result_line(result: Result<Value, (Failure, Value)>) -> (Value, bool) {
    let (mut line, ok) = match result {
        Ok(fields) => (fields, true),
        Err((f, mut fields)) => {
            fields["errno"] = f.errno.into();
            fields["error"] = f.error.into();
            (fields, false)
        }
    };
    line["ok"] = ok.into();
    (line, ok)
}

fn report(result: Result<Value, Failure>) -> ExitCode {
    report_with(result.map_err(|f| (f, json!({}))))
}

/// Like `report`, for failures that still carry fields (what was done before failing).
fn report_with(result: Result<Value, (Failure, Value)>) -> ExitCode {
    let (line, ok) = result_line(result);
    emit(&line);
    ExitCode::from(if ok { 0 } else { 1 })
}

fn exit_on_error(result: io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("egress-probe: {err}");
            ExitCode::from(2)
        }
    }
}

/// Time left before `deadline`, or a timeout failure once it has passed (a zero socket
/// timeout would mean "block forever").
fn remaining(deadline: Instant) -> Result<Duration, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(timeout())
    } else {
        Ok(left)
    }
}

fn tcp_connect(c: &Client) -> Result<(), Failure> {
    let deadline = Instant::now() + c.timeout;
    let mut stream = match c.bind {
        None => TcpStream::connect_timeout(&c.addr, c.timeout)?,
        Some(bind) => {
            let socket = bound_socket(bind, Type::STREAM)?;
            socket.connect_timeout(&c.addr.into(), c.timeout)?;
            socket.into()
        }
    };
    echo_bytes(&mut stream, &payload(c.size), deadline)
}

/// A socket of `bind`'s family bound to it with `SO_REUSEADDR`, so that it can take a
/// port a socket just gave up.
fn bound_socket(bind: SocketAddr, ty: Type) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(bind), ty, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&bind.into())?;
    Ok(socket)
}

/// [`PAYLOAD`], repeated to `size` bytes.
fn payload(size: usize) -> Vec<u8> {
    PAYLOAD.iter().copied().cycle().take(size).collect()
}

/// Sends the payload on `stream` and checks that it comes back before `deadline`.
fn echo(stream: &mut TcpStream, deadline: Instant) -> Result<(), Failure> {
    echo_bytes(stream, PAYLOAD, deadline)
}

/// Sends `data` on `stream` and checks that it comes back before `deadline`.
fn echo_bytes(stream: &mut TcpStream, data: &[u8], deadline: Instant) -> Result<(), Failure> {
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.write_all(data)?;
    stream.set_read_timeout(Some(remaining(deadline)?))?;
    let mut reply = vec![0; data.len()];
    read_exact(stream, &mut reply, "connection closed before the echo")?;
    check_echo(&reply, data)
}

/// `read_exact`, with an early end reported as a protocol error.
fn read_exact(stream: &mut TcpStream, buf: &mut [u8], eof: &str) -> Result<(), Failure> {
    stream.read_exact(buf).map_err(|err| {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            protocol_error(eof.to_owned())
        } else {
            Failure::from(err)
        }
    })
}

/// An unbound UDP socket of `addr`'s family.
fn udp_socket_for(addr: SocketAddr) -> io::Result<UdpSocket> {
    let unspecified = match addr {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    UdpSocket::bind((unspecified, 0))
}

/// Uses an unconnected socket and `sendto`, so a cgroup egress drop surfaces as the
/// `sendto` error (EPERM) and the reply is matched by its source address.
fn udp_send(c: &Client) -> Result<(), Failure> {
    let deadline = Instant::now() + c.timeout;
    let socket = match c.bind {
        None => udp_socket_for(c.addr)?,
        Some(bind) => bound_socket(bind, Type::DGRAM)?.into(),
    };
    udp_echo(&socket, c.addr, &payload(c.size), deadline)
}

/// Sends `data` to `addr` from `socket` and waits for it to come back from there.
fn udp_echo(
    socket: &UdpSocket,
    addr: SocketAddr,
    data: &[u8],
    deadline: Instant,
) -> Result<(), Failure> {
    socket.send_to(data, addr)?;
    let mut buf = vec![0; data.len() + 1];
    loop {
        socket.set_read_timeout(Some(remaining(deadline)?))?;
        let (len, from) = socket.recv_from(&mut buf)?;
        if from == addr {
            return check_echo(&buf[..len], data);
        }
    }
}

fn check_echo(echo: &[u8], sent: &[u8]) -> Result<(), Failure> {
    if echo == sent {
        Ok(())
    } else {
        Err(protocol_error(format!(
            "unexpected echo {:?}",
            String::from_utf8_lossy(echo)
        )))
    }
}

/// Tells the test that the socket is bound, so it never races the server.
fn announce_listening() {
    emit(&json!({ "listening": true }));
}

fn serve_tcp(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    announce_listening();
    // Per-connection failures (resets, a client that gives up) must not stop the server.
    for stream in listener.incoming().flatten() {
        thread::spawn(move || echo_tcp(stream));
    }
    Ok(())
}

fn echo_tcp(stream: TcpStream) -> io::Result<u64> {
    let mut reader = stream.try_clone()?;
    let mut writer = stream;
    io::copy(&mut reader, &mut writer)
}

fn serve_udp(addr: SocketAddr) -> io::Result<()> {
    let socket = UdpSocket::bind(addr)?;
    announce_listening();
    let mut buf = [0; 65536];
    loop {
        let (len, peer) = socket.recv_from(&mut buf)?;
        // A reply that cannot be sent is the client's timeout to report, not a server error.
        let _ = socket.send_to(&buf[..len], peer);
    }
}

/// Runs `resolve-connect` for each name. With one name, the exit status is its result;
/// with `--names-file`, every name gets a result line and the exit status is 0.
fn resolve_connect_all(rc: &ResolveConnect) -> ExitCode {
    let mut last = ExitCode::SUCCESS;
    for name in &rc.names {
        last = report_with(resolve_connect(rc, name));
    }
    if rc.each { ExitCode::SUCCESS } else { last }
}

/// Resolves `name`, then at once connects to its first address and checks an echo.
/// Reports `addr`, `resolve_us` (query sent to answer parsed) and `connect_us` (the
/// `connect` call alone).
fn resolve_connect(rc: &ResolveConnect, name: &str) -> Result<Value, (Failure, Value)> {
    let mut fields = json!({ "name": name, "addr": null });
    let started = Instant::now();
    let answer = lookup(name, &rc.lookup, rc.timeout);
    fields["resolve_us"] = micros(started.elapsed()).into();
    let addr = match answer.and_then(|msg| first_address(&msg, rc.lookup.rtype)) {
        Ok(addr) => addr,
        Err(f) => return Err((f.during("dns"), fields)),
    };
    fields["addr"] = addr.to_string().into();
    let target = SocketAddr::new(addr, rc.port);
    let started = Instant::now();
    let connected = TcpStream::connect_timeout(&target, rc.timeout);
    fields["connect_us"] = micros(started.elapsed()).into();
    let result = connected
        .map_err(|e| Failure::from(e).during("connect"))
        .and_then(|mut stream| {
            echo(&mut stream, Instant::now() + rc.timeout).map_err(|f| f.during("echo"))
        });
    match result {
        Ok(()) => Ok(fields),
        Err(f) => Err((f, fields)),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A random query id, as a stub resolver picks one.
fn random_id() -> u16 {
    let mut id = [0u8; 2];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n == 2 {
        u16::from_ne_bytes(id)
    } else {
        std::process::id() as u16
    }
}

/// A standard recursive query for `name` (its case kept as given).
fn query_message(name: &str, rtype: RecordType, id: u16) -> Result<Vec<u8>, Failure> {
    let name = Name::from_ascii(name).map_err(|e| protocol_error(format!("bad name: {e}")))?;
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name, rtype));
    msg.to_vec()
        .map_err(|e| protocol_error(format!("cannot encode the query: {e}")))
}

/// Sends one query and returns the matching answer.
fn lookup(name: &str, how: &Lookup, timeout: Duration) -> Result<Message, Failure> {
    let id = random_id();
    let query = query_message(name, how.rtype, id)?;
    let deadline = Instant::now() + timeout;
    let answer = if how.tcp {
        exchange_tcp(how.server, &query, deadline)?
    } else {
        exchange_udp(how.server, &query, id, deadline)?
    };
    let msg = parse_answer(&answer)?;
    if msg.metadata.id != id {
        return Err(protocol_error(format!(
            "answer id {} for query {id}",
            msg.metadata.id
        )));
    }
    Ok(msg)
}

fn parse_answer(bytes: &[u8]) -> Result<Message, Failure> {
    let msg = Message::from_vec(bytes).map_err(|e| protocol_error(format!("bad answer: {e}")))?;
    if msg.metadata.message_type != MessageType::Response {
        return Err(protocol_error("a query where an answer was due".to_owned()));
    }
    Ok(msg)
}

/// Over UDP: the first datagram from the server carrying our id.
fn exchange_udp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    deadline: Instant,
) -> Result<Vec<u8>, Failure> {
    let socket = udp_socket_for(server)?;
    socket.connect(server)?;
    socket.send(query)?;
    let mut buf = [0; 65535];
    loop {
        socket.set_read_timeout(Some(remaining(deadline)?))?;
        let len = socket.recv(&mut buf)?;
        if len >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            return Ok(buf[..len].to_vec());
        }
    }
}

/// Over TCP: each message behind its 2-byte length.
fn exchange_tcp(server: SocketAddr, query: &[u8], deadline: Instant) -> Result<Vec<u8>, Failure> {
    let mut stream = TcpStream::connect_timeout(&server, remaining(deadline)?)?;
    let len = u16::try_from(query.len()).map_err(|_| protocol_error("query too long".into()))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.write_all(&framed)?;
    stream.set_read_timeout(Some(remaining(deadline)?))?;
    let mut len = [0; 2];
    read_exact(&mut stream, &mut len, "connection closed before the answer")?;
    let mut answer = vec![0; usize::from(u16::from_be_bytes(len))];
    read_exact(
        &mut stream,
        &mut answer,
        "connection closed inside the answer",
    )?;
    Ok(answer)
}

/// The first address of the answer section (of the type asked for).
fn first_address(msg: &Message, rtype: RecordType) -> Result<IpAddr, Failure> {
    addresses(msg)
        .into_iter()
        .find(|a| a.is_ipv4() == (rtype == RecordType::A))
        .ok_or_else(|| {
            protocol_error(format!(
                "no {rtype} record in the answer (rcode {})",
                msg.metadata.response_code
            ))
        })
}

/// Every A and AAAA record of the answer section, in order.
fn addresses(msg: &Message) -> Vec<IpAddr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// Connects, prints `{"connected":true}`, then exchanges a line every `interval` until
/// `duration` has passed. Fails at the first echo that does not come back.
/// Reports how many exchanges succeeded, also on failure.
fn tcp_hold(hold: &TcpHold) -> Result<Value, (Failure, Value)> {
    let mut stream = TcpStream::connect_timeout(&hold.addr, HOLD_TIMEOUT).map_err(|e| {
        (
            Failure::from(e).during("connect"),
            json!({ "exchanges": 0 }),
        )
    })?;
    emit(&json!({ "connected": true }));
    let end = Instant::now() + hold.duration;
    let mut exchanges = 0u64;
    loop {
        if let Err(f) = echo(&mut stream, Instant::now() + HOLD_TIMEOUT) {
            return Err((f.during("echo"), json!({ "exchanges": exchanges })));
        }
        exchanges += 1;
        if Instant::now() + hold.interval > end {
            return Ok(json!({ "exchanges": exchanges }));
        }
        thread::sleep(hold.interval);
    }
}

/// Set by SIGTERM: `connect-loop` finishes its attempt and reports.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Prints `{"started":true}`, then opens a new connection and exchanges a line every
/// `interval` until `duration` has passed or SIGTERM comes, whatever each attempt's
/// outcome. Reports the number of attempts, of those that worked, and the first error of
/// those that did not.
fn connect_loop(cl: &ConnectLoop) -> Value {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            request_stop as *const () as libc::sighandler_t,
        )
    };
    emit(&json!({ "started": true }));
    let end = Instant::now() + cl.duration;
    let (mut attempts, mut connected) = (0u64, 0u64);
    let mut first_error: Option<String> = None;
    while Instant::now() < end && !STOP.load(Ordering::Relaxed) {
        attempts += 1;
        let outcome = TcpStream::connect_timeout(&cl.addr, cl.timeout)
            .map_err(Failure::from)
            .and_then(|mut stream| echo(&mut stream, Instant::now() + cl.timeout));
        let ok = outcome.is_ok();
        match outcome {
            Ok(()) => connected += 1,
            Err(f) => {
                first_error.get_or_insert(f.error);
            }
        }
        emit(&json!({ "attempt": attempts, "connected": ok }));
        thread::sleep(cl.interval);
    }
    json!({ "attempts": attempts, "connected": connected, "first_error": first_error })
}

/// Sends a query with a chosen id from a fresh port, prints `{"sent":true,"port":P}`, then
/// one line per datagram that comes back to that port (`from`, `id`, `addrs`), until
/// `count` have come. Reports how many came, also on failure.
fn query_wait(qw: &QueryWait) -> Result<Value, (Failure, Value)> {
    let received = |n: usize| move |f: Failure| (f, json!({ "received": n }));
    let socket = udp_socket_for(qw.server).map_err(|e| received(0)(e.into()))?;
    let port = send_query(&socket, qw).map_err(received(0))?;
    emit(&json!({ "sent": true, "port": port }));
    let deadline = Instant::now() + qw.timeout;
    print_datagrams(&socket, qw.count, deadline).map_err(|(n, f)| received(n)(f))?;
    Ok(json!({ "received": qw.count }))
}

/// Prints a line for each of the next `count` datagrams on `socket` (`from`, `len`, and
/// `id` and `addrs` when it is a DNS message); on failure, how many had come.
fn print_datagrams(
    socket: &UdpSocket,
    count: usize,
    deadline: Instant,
) -> Result<(), (usize, Failure)> {
    let mut buf = [0; 65535];
    for n in 0..count {
        let (len, from) = recv_until(socket, &mut buf, deadline).map_err(|f| (n, f))?;
        let mut line = json!({ "from": from.to_string(), "len": len });
        match Message::from_vec(&buf[..len]) {
            Ok(msg) => {
                line["id"] = msg.metadata.id.into();
                line["addrs"] = addresses(&msg).iter().map(ToString::to_string).collect();
            }
            Err(e) => line["malformed"] = e.to_string().into(),
        }
        emit(&line);
    }
    Ok(())
}

/// Binds, prints `{"listening":true,"port":P}`, prints each of `count` datagrams as
/// `query-wait` does, then with `--reply` sends a line to that address from the same socket
/// and waits for its echo.
fn udp_listen(ul: &UdpListen) -> Result<Value, (Failure, Value)> {
    let received = |n: usize| move |f: Failure| (f, json!({ "received": n }));
    let socket = UdpSocket::bind(ul.addr).map_err(|e| received(0)(e.into()))?;
    let port = socket
        .local_addr()
        .map_err(|e| received(0)(e.into()))?
        .port();
    emit(&json!({ "listening": true, "port": port }));
    let deadline = Instant::now() + ul.timeout;
    print_datagrams(&socket, ul.count, deadline).map_err(|(n, f)| received(n)(f))?;
    if let Some(reply) = ul.reply {
        udp_echo(&socket, reply, PAYLOAD, Instant::now() + DEFAULT_TIMEOUT)
            .map_err(|f| received(ul.count)(f.during("reply")))?;
    }
    Ok(json!({ "received": ul.count }))
}

/// Answers every A query with one record, `name` (the question's) at `a`.
fn serve_dns(addr: SocketAddr, a: Ipv4Addr) -> io::Result<()> {
    let socket = UdpSocket::bind(addr)?;
    announce_listening();
    let mut buf = [0; 65535];
    loop {
        let (len, peer) = socket.recv_from(&mut buf)?;
        let Some((id, name)) = Message::from_vec(&buf[..len])
            .ok()
            .and_then(|q| Some((q.metadata.id, q.queries.first()?.name().clone())))
        else {
            continue;
        };
        if let Ok(answer) = answer_message(id, name, a) {
            let _ = socket.send_to(&answer, peer);
        }
    }
}

/// An answer with id `id` saying that `name` is at `a`.
fn answer_message(id: u16, name: Name, a: Ipv4Addr) -> Result<Vec<u8>, Failure> {
    let mut msg = Message::new(id, MessageType::Response, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.metadata.recursion_available = true;
    msg.add_query(Query::query(name.clone(), RecordType::A));
    msg.add_answer(Record::from_rdata(name, FORGED_TTL, RData::A(A(a))));
    msg.to_vec()
        .map_err(|e| protocol_error(format!("cannot encode the answer: {e}")))
}

/// Sends `qw`'s query; returns the local port it left from.
fn send_query(socket: &UdpSocket, qw: &QueryWait) -> Result<u16, Failure> {
    let query = query_message(&qw.name, RecordType::A, qw.id)?;
    socket.send_to(&query, qw.server)?;
    Ok(socket.local_addr()?.port())
}

fn recv_until(
    socket: &UdpSocket,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(usize, SocketAddr), Failure> {
    socket.set_read_timeout(Some(remaining(deadline)?))?;
    Ok(socket.recv_from(buf)?)
}

/// Sends a UDP datagram from `raw.src`, whatever that is: the IP header is written here.
fn raw_udp(raw: &RawUdp) -> Result<(), Failure> {
    let name = |n: &str| Name::from_ascii(n).map_err(|e| protocol_error(format!("bad name: {e}")));
    let data = match &raw.data {
        RawData::Payload => PAYLOAD.to_vec(),
        RawData::DnsQuery { name: n, id } => query_message(n, RecordType::A, *id)?,
        RawData::DnsAnswer { name: n, id, a } => answer_message(*id, name(n)?, *a)?,
    };
    let (src, dst) = (raw.src, raw.dst);
    let packet = packet::ipv4_udp(*src.ip(), *dst.ip(), src.port(), dst.port(), &data);
    match &raw.link {
        None => send_routed(*dst.ip(), &packet)?,
        Some((iface, dst_mac)) => send_frame(iface, *dst_mac, &packet)?,
    }
    Ok(())
}

/// Sends a TCP segment from `src`, whatever that is: a connection request, or an ACK with
/// `size` bytes of data.
fn raw_tcp(t: &RawTcp) -> Result<(), Failure> {
    let seq = u32::from(random_id()) << 16;
    let flags = if t.ack {
        packet::TCP_ACK
    } else {
        packet::TCP_SYN
    };
    let ports = (t.src.port(), t.dst.port());
    let packet = packet::ipv4_tcp(
        *t.src.ip(),
        *t.dst.ip(),
        ports,
        seq,
        flags,
        &payload(t.size),
    );
    Ok(send_routed(*t.dst.ip(), &packet)?)
}

/// Sends the last fragment of a UDP datagram whose first fragment never comes.
fn raw_fragment(f: &RawFragment) -> Result<(), Failure> {
    let fragment = Fragment::At {
        offset: f.offset,
        more: false,
    };
    let data = payload(f.len);
    let packet = packet::ipv4(f.src, f.dst, proto::UDP, random_id(), fragment, &data);
    Ok(send_routed(f.dst, &packet)?)
}

/// Sends an ICMP message of any type from this host's address: an error quotes the UDP
/// datagram it is about; `extra` bytes follow.
fn raw_icmp(m: &RawIcmp) -> Result<(), Failure> {
    let mut body = match m.quote {
        Some((src, dst)) => packet::quoted_udp(*src.ip(), src.port(), *dst.ip(), dst.port()),
        None => Vec::new(),
    };
    body.extend(payload(m.extra));
    let (domain, protocol) = match m.dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    // ICMPv6 has the same layout; the kernel fills in its checksum (pseudo header).
    let message = packet::icmp(m.icmp_type, m.code, [0; 4], &body);
    let socket = Socket::new(domain, Type::RAW, Some(protocol))?;
    socket.send_to(&message, &SocketAddr::new(m.dst, 0).into())?;
    Ok(())
}

/// Prints `{"listening":true}`, then one line for every IP packet `iface` receives or sends
/// (see [`summary`]), until killed.
fn sniff(iface: &str) -> io::Result<()> {
    let (fd, _) = packet_socket(iface, ETH_P_ALL)?;
    announce_listening();
    let mut buf = vec![0u8; 65536 + ETH_HEADER];
    loop {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &raw mut from_len,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return Err(io::Error::last_os_error());
        };
        let ethertype = u16::from_be(from.sll_protocol);
        if let Some(mut line) = summary(ethertype, buf.get(ETH_HEADER..n).unwrap_or_default()) {
            line["out"] = (from.sll_pkttype == libc::PACKET_OUTGOING).into();
            emit(&line);
        }
    }
}

/// What a test asks of a sniffed packet: `src`, `dst`, `proto`, `len` (of the IP packet);
/// `frag_offset` (bytes) and `more_fragments` for IPv4; `sport` and `dport` for TCP and
/// UDP (not in later fragments), `tcp_flags`, and `icmp_type` for ICMP and ICMPv6 (the
/// first header only: no IPv6 extension headers are walked).
fn summary(ethertype: u16, ip: &[u8]) -> Option<Value> {
    let byte = |i: usize| ip.get(i).copied();
    let (src, dst, proto, l4, frag_offset, more) = match ethertype {
        ETH_P_IP => {
            let octets = |at: usize| -> Option<Ipv4Addr> {
                Some(<[u8; 4]>::try_from(ip.get(at..at + 4)?).ok()?.into())
            };
            let flags = u16::from_be_bytes([byte(6)?, byte(7)?]);
            let l4 = usize::from(byte(0)? & 0x0f) * 4;
            let (src, dst) = (IpAddr::V4(octets(12)?), IpAddr::V4(octets(16)?));
            (
                src,
                dst,
                byte(9)?,
                l4,
                (flags & 0x1fff) * 8,
                flags & 0x2000 != 0,
            )
        }
        ETH_P_IPV6 => {
            let octets = |at: usize| -> Option<Ipv6Addr> {
                Some(<[u8; 16]>::try_from(ip.get(at..at + 16)?).ok()?.into())
            };
            let (src, dst) = (IpAddr::V6(octets(8)?), IpAddr::V6(octets(24)?));
            (src, dst, byte(6)?, 40, 0, false)
        }
        _ => return None,
    };
    let mut line = json!({
        "src": src.to_string(), "dst": dst.to_string(), "proto": proto, "len": ip.len(),
        "frag_offset": frag_offset, "more_fragments": more,
    });
    let port = |at: usize| Some(u16::from_be_bytes([byte(l4 + at)?, byte(l4 + at + 1)?]));
    if frag_offset == 0 {
        match proto {
            6 | 17 => {
                line["sport"] = port(0).into();
                line["dport"] = port(2).into();
                if proto == 6 {
                    line["tcp_flags"] = byte(l4 + 13).into();
                }
            }
            1 | 58 => line["icmp_type"] = byte(l4).into(),
            _ => {}
        }
    }
    Some(line)
}

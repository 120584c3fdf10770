//! Client and echo server that the end-to-end tests run inside network namespaces.
//!
//! Clients print exactly one JSON line (`{"ok":true}` or
//! `{"ok":false,"errno":N,"error":"..."}`) and exit 0 or 1, so a test can tell "blocked"
//! from "broken" without scraping error text. Usage errors and a failure to join the
//! cgroup exit 2: those are harness bugs, not probe results.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: egress-probe [--cgroup DIR] tcp-connect|udp-send ADDR PORT [--timeout-ms N]
       egress-probe [--cgroup DIR] serve-tcp|serve-udp ADDR PORT";

const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1500);

/// What the clients send and expect back; the newline makes it "a line".
const PAYLOAD: &[u8] = b"egress-probe ping\n";

enum Mode {
    TcpConnect,
    UdpSend,
    ServeTcp,
    ServeUdp,
}

struct Args {
    cgroup: Option<PathBuf>,
    mode: Mode,
    addr: SocketAddr,
    timeout: Duration,
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

fn timeout() -> Failure {
    Failure {
        errno: libc::ETIMEDOUT,
        error: "timeout".to_owned(),
    }
}

/// A peer that answered, but not with our payload.
fn protocol_error(error: String) -> Failure {
    Failure {
        errno: libc::EPROTO,
        error,
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("egress-probe: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &args.cgroup
        && let Err(err) = join_cgroup(dir)
    {
        eprintln!("egress-probe: cannot join cgroup {}: {err}", dir.display());
        return ExitCode::from(2);
    }
    match args.mode {
        Mode::TcpConnect => report(tcp_connect(args.addr, args.timeout)),
        Mode::UdpSend => report(udp_send(args.addr, args.timeout)),
        Mode::ServeTcp => exit_on_error(serve_tcp(args.addr)),
        Mode::ServeUdp => exit_on_error(serve_udp(args.addr)),
    }
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut cgroup = None;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut positional = Vec::new();
    let mut args = args;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => cgroup = Some(PathBuf::from(args.next().ok_or("--cgroup needs a DIR")?)),
            "--timeout-ms" => {
                let ms = args.next().ok_or("--timeout-ms needs a number")?;
                let ms = ms.parse().map_err(|_| format!("bad --timeout-ms {ms:?}"))?;
                timeout = Duration::from_millis(ms);
            }
            _ => positional.push(arg),
        }
    }
    let [mode, addr, port] = <[String; 3]>::try_from(positional)
        .map_err(|_| "expected a subcommand, ADDR and PORT".to_owned())?;
    let mode = match mode.as_str() {
        "tcp-connect" => Mode::TcpConnect,
        "udp-send" => Mode::UdpSend,
        "serve-tcp" => Mode::ServeTcp,
        "serve-udp" => Mode::ServeUdp,
        _ => return Err(format!("unknown subcommand {mode:?}")),
    };
    let ip: IpAddr = addr.parse().map_err(|_| format!("bad address {addr:?}"))?;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    Ok(Args {
        cgroup,
        mode,
        addr: SocketAddr::new(ip, port),
        timeout,
    })
}

/// Moves this process (and so every socket it opens afterwards) into the cgroup.
fn join_cgroup(dir: &Path) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
}

fn report(result: Result<(), Failure>) -> ExitCode {
    let (line, code) = match result {
        Ok(()) => (serde_json::json!({ "ok": true }), 0),
        Err(f) => (
            serde_json::json!({ "ok": false, "errno": f.errno, "error": f.error }),
            1,
        ),
    };
    println!("{line}");
    ExitCode::from(code)
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

fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.write_all(PAYLOAD)?;
    stream.set_read_timeout(Some(remaining(deadline)?))?;
    let mut echo = [0; PAYLOAD.len()];
    stream.read_exact(&mut echo).map_err(|err| {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            protocol_error("connection closed before the echo".to_owned())
        } else {
            Failure::from(err)
        }
    })?;
    check_echo(&echo)
}

/// Uses an unconnected socket and `sendto`, so a cgroup egress drop surfaces as the
/// `sendto` error (EPERM) and the reply is matched by its source address.
fn udp_send(addr: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let unspecified = match addr {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = UdpSocket::bind((unspecified, 0))?;
    socket.send_to(PAYLOAD, addr)?;
    let mut buf = [0; 2 * PAYLOAD.len()];
    loop {
        socket.set_read_timeout(Some(remaining(deadline)?))?;
        let (len, from) = socket.recv_from(&mut buf)?;
        if from == addr {
            return check_echo(&buf[..len]);
        }
    }
}

fn check_echo(echo: &[u8]) -> Result<(), Failure> {
    if echo == PAYLOAD {
        Ok(())
    } else {
        Err(protocol_error(format!(
            "unexpected echo {:?}",
            String::from_utf8_lossy(echo)
        )))
    }
}

/// Tells the test that the socket is bound, so it never races the server.
fn announce_listening() -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{}", serde_json::json!({ "listening": true }))?;
    stdout.flush()
}

fn serve_tcp(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    announce_listening()?;
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
    announce_listening()?;
    let mut buf = [0; 65536];
    loop {
        let (len, peer) = socket.recv_from(&mut buf)?;
        // A reply that cannot be sent is the client's timeout to report, not a server error.
        let _ = socket.send_to(&buf[..len], peer);
    }
}

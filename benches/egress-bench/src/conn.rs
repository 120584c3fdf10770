//! Connection rate: a server that accepts and resets, and a client that opens TCP
//! connections as fast as it can for a while.
//!
//! Every connection of a run uses a (source port, destination port) pair not used before
//! in that run, so each one is a new flow for every filter: a new `FLOWS` entry for the
//! enforcer (whose flow key has no source address), a new conntrack entry for nftables and
//! iptables. Both ends close with a reset (`SO_LINGER` 0), so no TIME_WAIT piles up and
//! every source port can be bound again at once.
use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The lowest source port the client binds.
const FIRST_SPORT: u16 = 1024;

pub(crate) fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>()).unwrap_or(0);
    // SAFETY: `value` points to a live `T` of `len` bytes for the duration of the call.
    let rc = unsafe { libc::setsockopt(fd, level, name, std::ptr::from_ref(value).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Close with a reset instead of a FIN: no TIME_WAIT.
fn linger_zero(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

/// A `sockaddr_storage` for `addr`, and its length.
pub(crate) fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, libc::socklen_t::try_from(len).unwrap_or(0))
}

/// A fresh socket of `kind` (`SOCK_STREAM`, `SOCK_DGRAM`) in `addr`'s family.
pub(crate) fn new_socket(addr: SocketAddr, kind: libc::c_int) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

enum Outcome {
    Connected,
    /// The source port is taken by another socket: skipped, not a failure.
    PortBusy,
    Failed,
}

/// One connection from `sport` to `dst`, closed with a reset as soon as it is established.
fn connect_once(dst: SocketAddr, sport: u16, timeout: Duration) -> io::Result<Outcome> {
    let sock = new_socket(dst, libc::SOCK_STREAM)?;
    let fd = sock.as_raw_fd();
    linger_zero(fd)?;
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(1),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // connect(2) honours the send timeout.
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)?;
    let unspecified: IpAddr = match dst {
        SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
        SocketAddr::V6(_) => IpAddr::from([0u8; 16]),
    };
    let (local, local_len) = sockaddr(SocketAddr::new(unspecified, sport));
    // SAFETY: `local` is a valid sockaddr of `local_len` bytes.
    if unsafe { libc::bind(fd, std::ptr::from_ref(&local).cast(), local_len) } != 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::EADDRINUSE) {
            Ok(Outcome::PortBusy)
        } else {
            Err(err)
        };
    }
    let (remote, remote_len) = sockaddr(dst);
    // SAFETY: `remote` is a valid sockaddr of `remote_len` bytes.
    let rc = unsafe { libc::connect(fd, std::ptr::from_ref(&remote).cast(), remote_len) };
    let outcome = if rc == 0 {
        Outcome::Connected
    } else {
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE) => Outcome::PortBusy,
            _ => Outcome::Failed,
        }
    };
    drop(sock);
    Ok(outcome)
}

pub struct RateOptions {
    pub addr: IpAddr,
    pub first_port: u16,
    pub ports: u16,
    pub seconds: f64,
    pub threads: u16,
    pub timeout: Duration,
    pub cgroup: Option<PathBuf>,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    connected: u64,
    failed: u64,
    busy: u64,
    wrapped: bool,
}

/// Thread `t` of `threads`: source ports `FIRST_SPORT + t`, `+ threads`, ..., each to every
/// server port in turn, until `deadline` (or `stop`).
fn client_thread(
    opts: &RateOptions,
    t: u16,
    deadline: Instant,
    stop: &AtomicBool,
) -> io::Result<Counts> {
    let mut c = Counts::default();
    let sports: Vec<u16> = (FIRST_SPORT..=u16::MAX)
        .skip(usize::from(t))
        .step_by(usize::from(opts.threads.max(1)))
        .collect();
    // Bounded in count as well as in time: at most two passes over every pair.
    for pass in 0..2 {
        if pass == 1 {
            c.wrapped = true;
        }
        for &sport in &sports {
            for k in 0..opts.ports {
                if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                    return Ok(c);
                }
                let dst = SocketAddr::new(opts.addr, opts.first_port + k);
                match connect_once(dst, sport, opts.timeout)? {
                    Outcome::Connected => c.connected += 1,
                    Outcome::PortBusy => c.busy += 1,
                    Outcome::Failed => c.failed += 1,
                }
            }
        }
    }
    Ok(c)
}

/// Runs `work(t, stop)` on `threads` threads, `t` from 0; when one fails, `stop` is set
/// for the others to end early. Each thread's result, in order.
pub(crate) fn on_threads<T: Send>(
    threads: u16,
    work: impl Fn(u16, &AtomicBool) -> io::Result<T> + Sync,
) -> Vec<io::Result<T>> {
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (stop, work) = (&stop, &work);
                s.spawn(move || {
                    let r = work(t, stop);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("panicked")))
            })
            .collect()
    })
}

pub fn rate(opts: &RateOptions) -> Result<()> {
    if let Some(dir) = &opts.cgroup {
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", dir.display()))?;
    }
    let threads = opts.threads.max(1);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(opts.seconds);
    let results = on_threads(threads, |t, stop| client_thread(opts, t, deadline, stop));
    let elapsed = started.elapsed().as_secs_f64();
    let mut total = Counts::default();
    for r in results {
        let c = r.context("a client thread failed")?;
        total.connected += c.connected;
        total.failed += c.failed;
        total.busy += c.busy;
        total.wrapped |= c.wrapped;
    }
    println!(
        "{{\"connections\":{},\"failed\":{},\"port_busy\":{},\"pairs_reused\":{},\"seconds\":{elapsed:.3},\"per_sec\":{:.0}}}",
        total.connected,
        total.failed,
        total.busy,
        total.wrapped,
        total.connected as f64 / elapsed
    );
    Ok(())
}

/// Accepts on `ports` consecutive ports from `first_port` and resets every connection at
/// once. Runs until killed.
pub fn serve(addr: IpAddr, first_port: u16, ports: u16) -> Result<()> {
    let mut listeners = Vec::new();
    for k in 0..ports {
        let at = SocketAddr::new(addr, first_port + k);
        listeners.push(TcpListener::bind(at).with_context(|| format!("binding {at}"))?);
    }
    println!("{{\"listening\":true}}");
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || accept_loop(&l, &stop))
        })
        .collect();
    for h in handles {
        if h.join().is_err() {
            bail!("an accept thread panicked");
        }
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => reset(&stream),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                eprintln!("egress-bench serve: accept: {err}");
                // Out of descriptors or similar: back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn reset(stream: &TcpStream) {
    let _ = linger_zero(stream.as_raw_fd());
}

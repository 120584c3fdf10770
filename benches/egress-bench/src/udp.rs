//! Small packets: a UDP sender that sends fixed-size datagrams as fast as it can from one
//! thread per core, and a sink that receives and drops them.
//!
//! Each sender thread has its own connected socket (its own source port: a flow of its
//! own for every filter) and sends with `sendmmsg(2)` in batches, so the system call is
//! paid once per batch while every datagram still goes through the whole output path
//! (UDP has no GSO unless asked for). The figure a benchmark wants is what arrives: the
//! sink's namespace counts it (`Udp6InDatagrams`), so the sink itself reports nothing.
//! The sender also reports its threads' CPU time per datagram, which other load on the
//! machine moves far less than the rate.
use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::conn::{new_socket, on_threads, setsockopt, sockaddr};

/// Datagrams per `sendmmsg` / `recvmmsg` call.
const BATCH: usize = 64;
/// The largest datagram the sink expects (the sender's payload is at most this).
const MAX_PAYLOAD: usize = 1472;

pub struct FloodOptions {
    pub dst: SocketAddr,
    pub seconds: f64,
    pub threads: u16,
    pub payload: usize,
}

pub fn check_payload(payload: usize) -> Result<()> {
    if payload == 0 || payload > MAX_PAYLOAD {
        bail!("--payload must be 1..={MAX_PAYLOAD}");
    }
    Ok(())
}

#[derive(Default, Clone, Copy)]
struct Sent {
    datagrams: u64,
    /// Calls refused with an error (EPERM when a filter drops the first datagram).
    errors: u64,
    /// The thread's CPU time, which includes the softirq work (the veth's receive path)
    /// that ran in its context.
    cpu_ns: u64,
}

/// The calling thread's CPU time so far, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    // SAFETY: all-zero bytes are a valid timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a live timespec the call writes; the clock id is valid.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn sender(opts: &FloodOptions, deadline: Instant, stop: &AtomicBool) -> io::Result<Sent> {
    let local = match opts.dst {
        SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
        SocketAddr::V6(_) => IpAddr::from([0u8; 16]),
    };
    let sock = UdpSocket::bind(SocketAddr::new(local, 0))?;
    sock.connect(opts.dst)?;
    let payload = vec![0x5a_u8; opts.payload];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: all-zero bytes are a valid mmsghdr (null name, no control data).
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = Sent::default();
    let mut calls = 0u32;
    let cpu_start = thread_cpu_ns();
    loop {
        // The clock is read every 64 calls: 4096 datagrams.
        calls = calls.wrapping_add(1);
        if calls.is_multiple_of(64) && (Instant::now() >= deadline || stop.load(Ordering::Relaxed))
        {
            sent.cpu_ns = thread_cpu_ns() - cpu_start;
            return Ok(sent);
        }
        // SAFETY: `msgs` holds BATCH headers that point to `iov`, which points to
        // `payload`; all outlive the call, and the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
            )
        };
        match u64::try_from(n) {
            Ok(n) => sent.datagrams += n,
            Err(_) => {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EPERM | libc::ENOBUFS | libc::ECONNREFUSED | libc::EAGAIN) => {
                        sent.errors += 1;
                    }
                    _ => return Err(err),
                }
            }
        }
    }
}

/// Sends for `opts.seconds` from `opts.threads` threads; prints one JSON line.
pub fn flood(opts: &FloodOptions) -> Result<()> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(opts.seconds);
    let results = on_threads(opts.threads, |_, stop| sender(opts, deadline, stop));
    let elapsed = started.elapsed().as_secs_f64();
    let mut total = Sent::default();
    for r in results {
        let s = r.context("a sender thread failed")?;
        total.datagrams += s.datagrams;
        total.errors += s.errors;
        total.cpu_ns += s.cpu_ns;
    }
    println!(
        "{{\"sent\":{},\"errors\":{},\"threads\":{},\"payload\":{},\"seconds\":{elapsed:.3},\"per_sec\":{:.0},\"cpu_ns_per_datagram\":{:.0}}}",
        total.datagrams,
        total.errors,
        opts.threads,
        opts.payload,
        total.datagrams as f64 / elapsed,
        total.cpu_ns as f64 / total.datagrams.max(1) as f64
    );
    Ok(())
}

/// A UDP socket on `at` that shares the port with the sink's other sockets; the kernel
/// spreads the senders' flows over them.
fn reuseport_socket(at: SocketAddr) -> io::Result<OwnedFd> {
    let sock = new_socket(at, libc::SOCK_DGRAM)?;
    let fd = sock.as_raw_fd();
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, &1_i32)?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &(8_i32 << 20))?;
    let (addr, len) = sockaddr(at);
    // SAFETY: `addr` is a valid sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, std::ptr::from_ref(&addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn drain(sock: &OwnedFd) -> io::Result<()> {
    let mut bufs = vec![[0u8; MAX_PAYLOAD]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero bytes are a valid mmsghdr (null name, no control data).
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    loop {
        // SAFETY: every header points to its own iovec and buffer, which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Receives and drops datagrams on `at` with `threads` sockets, until killed.
pub fn sink(at: SocketAddr, threads: usize) -> Result<()> {
    let socks = (0..threads.max(1))
        .map(|_| reuseport_socket(at))
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("binding {at}"))?;
    println!("{{\"listening\":true}}");
    let handles: Vec<_> = socks
        .into_iter()
        .map(|s| thread::spawn(move || drain(&s)))
        .collect();
    for h in handles {
        match h.join() {
            Ok(r) => r.context("receiving")?,
            Err(_) => bail!("a sink thread panicked"),
        }
    }
    Ok(())
}

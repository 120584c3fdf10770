//! DNS learning under load: a resolver that answers every AAAA query with 16 addresses, and
//! a client that asks it, paced, for a fixed set of names.
//!
//! Names are `n<k>.z<k % zones>.bench.test` (RFC 2606 `.test`). The answer to `n<k>.…` is
//! always the same 16 addresses, `2001:db8:8:<k>:<r>::1` for r in 0..16, so asking every
//! name once teaches `16 × names` distinct addresses, and asking again only refreshes them.
use std::{
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Records per answer: the most the kernel reads from one answer.
pub const RECORDS: u16 = 16;
const TTL: u32 = 3600;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// The address the `r`th record of the answer for name `k` carries.
pub fn answer_addr(k: u16, r: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x8, k, r, 0, 0, 1)
}

/// A query for `n<k>.z<zone>.bench.test` AAAA with message id `id`.
pub fn query(id: u16, k: u32, zone: u32) -> Vec<u8> {
    let mut q = Vec::with_capacity(48);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in [
        format!("n{k}"),
        format!("z{zone}"),
        "bench".into(),
        "test".into(),
    ] {
        q.push(u8::try_from(label.len()).unwrap_or(63));
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&TYPE_AAAA.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// The answer to `msg`, if it is a query this server understands.
pub fn answer(msg: &[u8]) -> Option<Vec<u8>> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || msg[4..6] != [0, 1] {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut at = 12;
    let mut first_label: Option<&[u8]> = None;
    loop {
        let len = usize::from(*msg.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        let label = msg.get(at + 1..at + 1 + len)?;
        first_label.get_or_insert(label);
        at += 1 + len;
    }
    let question_end = at + 4;
    msg.get(at..question_end)?;
    let k: u16 = std::str::from_utf8(first_label?.strip_prefix(b"n")?)
        .ok()?
        .parse()
        .ok()?;
    let mut a = Vec::with_capacity(question_end + usize::from(RECORDS) * 28);
    a.extend_from_slice(&msg[0..2]);
    a.extend_from_slice(&[0x81, 0x80, 0, 1]);
    a.extend_from_slice(&RECORDS.to_be_bytes());
    a.extend_from_slice(&[0, 0, 0, 0]);
    a.extend_from_slice(&msg[12..question_end]);
    for r in 0..RECORDS {
        a.extend_from_slice(&[0xc0, 0x0c]);
        a.extend_from_slice(&TYPE_AAAA.to_be_bytes());
        a.extend_from_slice(&CLASS_IN.to_be_bytes());
        a.extend_from_slice(&TTL.to_be_bytes());
        a.extend_from_slice(&16u16.to_be_bytes());
        a.extend_from_slice(&answer_addr(k, r).octets());
    }
    Some(a)
}

fn set_buffer(sock: &UdpSocket, option: libc::c_int, bytes: libc::c_int) {
    // SAFETY: a valid int option value for the duration of the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(&bytes).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        );
    }
}

/// Answers queries on `addr:port` with two threads, until killed.
pub fn serve(addr: IpAddr, port: u16) -> Result<()> {
    let sock = UdpSocket::bind((addr, port)).with_context(|| format!("binding {addr}:{port}"))?;
    set_buffer(&sock, libc::SO_RCVBUFFORCE, 8 << 20);
    set_buffer(&sock, libc::SO_SNDBUFFORCE, 8 << 20);
    println!("{{\"listening\":true}}");
    let other = sock.try_clone()?;
    let worker = thread::spawn(move || serve_loop(&other));
    serve_loop(&sock);
    let _ = worker.join();
    Ok(())
}

fn serve_loop(sock: &UdpSocket) {
    let mut buf = [0u8; 1500];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((len, peer)) => {
                if let Some(a) = answer(&buf[..len]) {
                    let _ = sock.send_to(&a, peer);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("egress-bench dns-serve: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

pub struct FloodOptions {
    pub server: SocketAddr,
    pub names: u32,
    pub zones: u32,
    /// Queries per second; 0: as fast as the answers come back (`window` outstanding).
    pub rate: u32,
    /// Total queries; the run also ends after `seconds`.
    pub count: u64,
    pub seconds: f64,
    pub window: u64,
    pub cgroup: Option<PathBuf>,
}

/// Sends queries (name `i % names` for the `i`th) and counts the answers; prints one JSON
/// line.
pub fn flood(opts: &FloodOptions) -> Result<()> {
    if let Some(dir) = &opts.cgroup {
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", dir.display()))?;
    }
    if opts.names == 0 || opts.names > 65_536 || opts.zones == 0 {
        bail!("--names must be 1..=65536 and --zones at least 1");
    }
    let unspecified: IpAddr = match opts.server {
        SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
        SocketAddr::V6(_) => IpAddr::from([0u8; 16]),
    };
    let sock = UdpSocket::bind((unspecified, 0)).context("binding the client socket")?;
    set_buffer(&sock, libc::SO_RCVBUFFORCE, 16 << 20);
    set_buffer(&sock, libc::SO_SNDBUFFORCE, 16 << 20);
    sock.connect(opts.server)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let answers = AtomicU64::new(0);
    let sending = AtomicBool::new(true);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(opts.seconds);
    let mut sent: u64 = 0;
    let mut send_errors: u64 = 0;
    let mut send_secs = 0.0;
    thread::scope(|s| -> Result<()> {
        let receiver = s.spawn(|| {
            let mut buf = [0u8; 1500];
            let mut last = Instant::now();
            let mut stopped_at: Option<Instant> = None;
            loop {
                if let Ok(len) = sock.recv(&mut buf) {
                    if len >= 12 && buf[2] & 0x80 != 0 {
                        answers.fetch_add(1, Ordering::Relaxed);
                    }
                    last = Instant::now();
                }
                // After the sender stops, drain until the answers pause for a second.
                if !sending.load(Ordering::Relaxed) {
                    let stopped = *stopped_at.get_or_insert_with(Instant::now);
                    if last.max(stopped).elapsed() > Duration::from_secs(1) {
                        return;
                    }
                }
            }
        });
        while sent < opts.count {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let due = if opts.rate == 0 {
                answers.load(Ordering::Relaxed) + opts.window.max(1)
            } else {
                let elapsed = now.duration_since(started).as_secs_f64();
                (elapsed * f64::from(opts.rate)) as u64 + 1
            };
            let due = due.min(opts.count);
            if sent >= due {
                thread::sleep(Duration::from_micros(if opts.rate == 0 { 20 } else { 200 }));
                continue;
            }
            while sent < due {
                let k = u32::try_from(sent % u64::from(opts.names)).unwrap_or(0);
                let id = u16::try_from(sent & 0xffff).unwrap_or(0);
                match sock.send(&query(id, k, k % opts.zones)) {
                    Ok(_) => sent += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        send_errors += 1;
                        break;
                    }
                    Err(e) => return Err(e).context("sending a query"),
                }
            }
        }
        send_secs = started.elapsed().as_secs_f64();
        sending.store(false, Ordering::Relaxed);
        let _ = receiver.join();
        Ok(())
    })?;
    let got = answers.load(Ordering::Relaxed);
    println!(
        "{{\"sent\":{sent},\"answers\":{got},\"send_errors\":{send_errors},\"seconds\":{send_secs:.3},\"sent_per_sec\":{:.0},\"answers_per_sec\":{:.0}}}",
        sent as f64 / send_secs.max(1e-9),
        got as f64 / send_secs.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_carries_sixteen_addresses_for_the_name() {
        let q = query(7, 42, 42);
        let a = answer(&q).expect("an answer");
        assert_eq!(a[0..2], [0, 7]);
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), RECORDS);
        let last = &a[a.len() - 16..];
        assert_eq!(last, answer_addr(42, RECORDS - 1).octets());
    }
}

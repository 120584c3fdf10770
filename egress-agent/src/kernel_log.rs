//! The kernel programs' own diagnostics (aya-log): why a packet was denied, why a DNS
//! answer taught nothing. Off unless `EGRESS_KERNEL_LOG` asks for them, because the level
//! is fixed when the object is loaded: off, the verifier removes every log statement as
//! dead code and the per-packet path pays nothing; on, each denied packet and each answer
//! that teaches nothing writes a record to a ring that a thread of the agent reads into
//! its own log (target `egress::verdict` or `egress::dns`, level debug, so `RUST_LOG`
//! must let debug through for them, e.g. `RUST_LOG=info,egress=debug`).
use std::os::fd::AsRawFd as _;

use aya::{Ebpf, EbpfLoader};
use aya_log::{EbpfLogger, Level};

/// The variable that turns the kernel's diagnostics on: `debug` (or `1`); anything else
/// but unset, empty, `off` or `0` is refused with a warning and leaves them off.
pub const ENV: &str = "EGRESS_KERNEL_LOG";

const OFF: u8 = 0;
const DEBUG: u8 = Level::Debug as u8;

/// The level the kernel programs log at and below (`OFF`: nothing).
fn level() -> &'static u8 {
    match std::env::var(ENV).as_deref() {
        Ok("debug" | "1") => &DEBUG,
        Err(_) | Ok("" | "off" | "0") => &OFF,
        Ok(other) => {
            // Read at configure and at start: said once.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                log::warn!("{ENV}={other:?}: not debug, 1, off or 0; kernel diagnostics stay off");
            });
            &OFF
        }
    }
}

/// Sets the kernel programs' log level before the object is loaded.
pub fn configure(loader: &mut EbpfLoader<'_>) {
    loader.override_global(aya_log::LEVEL, level(), true);
}

/// When the diagnostics are on, starts a thread that forwards the kernel's records to the
/// agent's log for as long as the process runs.
pub fn start(ebpf: &mut Ebpf) {
    if *level() == OFF {
        return;
    }
    let mut logger = match EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(err) => {
            log::warn!("kernel diagnostics unavailable: {err}");
            return;
        }
    };
    log::info!("kernel diagnostics on ({ENV}): debug records of egress::verdict and egress::dns");
    let spawned = std::thread::Builder::new()
        .name("kernel-log".into())
        .spawn(move || {
            let mut pfd = libc::pollfd {
                fd: logger.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            loop {
                // SAFETY: one valid pollfd, for the fd the logger owns for this thread's life.
                let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
                if rc < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    log::warn!(
                        "kernel diagnostics stopped: {}",
                        std::io::Error::last_os_error()
                    );
                    return;
                }
                logger.flush();
            }
        });
    if let Err(err) = spawned {
        log::warn!("kernel diagnostics unavailable: {err}");
    }
}

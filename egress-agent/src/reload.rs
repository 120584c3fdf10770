//! Watching the policy file: SIGHUP, or a change of its content (an edit, a rename over it,
//! a ConfigMap's symlink swap) found by reading it every two seconds. A policy that fails
//! to parse is rejected with a logged error and nothing changes.
use std::{path::PathBuf, time::Duration};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::policy::{self, Policy};

const POLL_PERIOD: Duration = Duration::from_secs(2);

pub async fn watch(path: PathBuf, reloads: mpsc::Sender<Policy>) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(POLL_PERIOD);
    let mut last = std::fs::read(&path).ok();
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => "the policy file changed",
        };
        let now = std::fs::read(&path).ok();
        if why != "SIGHUP" && now == last {
            continue;
        }
        last = now;
        log::info!("{why}: reloading {}", path.display());
        match policy::load(&path) {
            Ok(p) => reloads.send(p).await?,
            Err(e) => log::error!("policy reload rejected: {e}; the running policy stays in force"),
        }
    }
}

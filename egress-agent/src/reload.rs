//! Watching the policy file: SIGHUP, or a change of its content (an edit, a rename over it,
//! a ConfigMap's symlink swap) or of a list file it names, found by reading it every two
//! seconds. A policy that fails
//! to parse is rejected with a logged error (and counted) and nothing changes.
use std::{path::PathBuf, time::Duration};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    kubeconfig::KubeletApiServer,
    lifecycle,
    metrics::Reloads,
    policy::{self, Policy},
};

mod lists;

pub use lists::ListFiles;

const POLL_PERIOD: Duration = Duration::from_secs(2);

/// A new policy, with the bytes it was parsed from (recorded once applied, see `record`).
#[derive(Debug)]
pub struct Reloaded {
    pub policy: Policy,
    pub bytes: Vec<u8>,
}

/// Sends each new policy to `reloads`; counts the ones that do not parse in `counters`. `loaded` is the content the running policy was
/// parsed from: the agent reads the file long before it starts watching (loading and
/// attaching come between), and a change made meanwhile must be applied, not taken for
/// the running policy.
/// `kubelet` is the API server name the node's kubeconfig gave at the start; `lists` the
/// list files of the running policy.
pub async fn watch(
    path: PathBuf,
    loaded: Vec<u8>,
    mut lists: ListFiles,
    kubelet: Option<KubeletApiServer>,
    reloads: mpsc::Sender<Reloaded>,
    counters: Reloads,
) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(POLL_PERIOD);
    let source = path.display().to_string();
    let mut last = Some(loaded);
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => "the policy file changed",
        };
        let now = policy::read(&path);
        let same = now.as_ref().ok() == last.as_ref();
        let why = match (why, lists.changed()) {
            ("SIGHUP", _) => why,
            (_, true) if same => "a list file changed",
            _ if same => continue,
            _ => why,
        };
        log::info!("{why}: reloading {}", path.display());
        // Parsed from the very bytes kept as `last`: a change after this read is a change.
        let parsed = now.as_ref().map_err(ToString::to_string).and_then(|bytes| {
            policy::parse_bytes(bytes, &source, kubelet.as_ref()).map_err(|e| e.to_string())
        });
        last = now.ok();
        match parsed {
            Ok(policy) => {
                policy::log_notices(&policy, &source);
                lists = ListFiles::of(&policy);
                let bytes = last.clone().unwrap_or_default();
                reloads.send(Reloaded { policy, bytes }).await?;
            }
            Err(e) => {
                counters.rejected();
                log::error!("policy reload rejected: {e}; the running policy stays in force");
                lifecycle::emit("policy_reload_rejected", serde_json::json!({"error": e}));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "allow:\n  - cidr: 203.0.113.10/32\n";
    const NEW: &str = "allow:\n  - cidr: 203.0.113.20/32\n";

    /// A policy file in the temp directory, removed on drop.
    struct TempPolicy(PathBuf);

    impl Drop for TempPolicy {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// The watcher on a file holding `now`, started as if the agent had loaded `loaded`.
    fn watching(
        name: &str,
        loaded: &str,
        now: &str,
    ) -> (
        TempPolicy,
        mpsc::Receiver<Reloaded>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let file = TempPolicy(
            std::env::temp_dir().join(format!("reload-test-{}-{name}.yaml", std::process::id())),
        );
        std::fs::write(&file.0, now).expect("write the policy");
        let (tx, rx) = mpsc::channel(4);
        let watcher = tokio::spawn(watch(
            file.0.clone(),
            loaded.as_bytes().to_vec(),
            ListFiles::default(),
            None,
            tx,
            Reloads::default(),
        ));
        (file, rx, watcher)
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_made_before_the_watcher_starts_is_applied() {
        let (file, mut reloads, watcher) = watching("before", OLD, NEW);
        let reloaded = tokio::time::timeout(POLL_PERIOD * 2, reloads.recv())
            .await
            .expect("the change is applied")
            .expect("the watcher runs");
        assert_eq!(reloaded.policy, policy::parse(NEW, "new").unwrap());
        assert_eq!(reloaded.bytes, NEW.as_bytes());
        // Applied once: the content now is the content applied.
        let again = tokio::time::timeout(POLL_PERIOD * 3, reloads.recv()).await;
        assert!(again.is_err(), "reloaded again: {again:?}");

        std::fs::write(&file.0, OLD).expect("write the policy");
        let reloaded = tokio::time::timeout(POLL_PERIOD * 2, reloads.recv())
            .await
            .expect("the change is applied")
            .expect("the watcher runs");
        assert_eq!(reloaded.policy, policy::parse(OLD, "old").unwrap());
        watcher.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_content_loaded_is_not_applied_again() {
        let (_file, mut reloads, watcher) = watching("same", OLD, OLD);
        let reload = tokio::time::timeout(POLL_PERIOD * 3, reloads.recv()).await;
        assert!(reload.is_err(), "reloaded: {reload:?}");
        watcher.abort();
    }
}

//! A pin root (bpffs) of one test's own.

use std::ffi::CString;
use std::fs::{self};
use std::os::unix::ffi::OsStrExt as _;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::{agent_bin, unique_suffix};

/// A pin root of one test's own, `<tmp>/egress-e2e-bpf-<pid>-<n>/egress-enforcer`: the agent
/// mounts bpffs on its parent, so tests running side by side never share pinned state, and
/// nothing lands under `/sys/fs/bpf`. Drop runs `egress-agent uninstall` (detaching whatever
/// a killed agent or `--on-exit keep` left), then unmounts and removes the directory.
#[derive(Debug)]
pub struct PinDir {
    mount: PathBuf,
}

impl PinDir {
    #[expect(
        clippy::new_without_default,
        reason = "creating a directory is not a default value"
    )]
    pub fn new() -> PinDir {
        let mount = std::env::temp_dir().join(format!("egress-e2e-bpf-{}", unique_suffix()));
        fs::create_dir(&mount)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", mount.display()));
        PinDir { mount }
    }

    /// What to pass as `--pin-root`.
    pub fn root(&self) -> PathBuf {
        self.mount.join("egress-enforcer")
    }

    /// The names of the link pins under the root (`<point>@<link id>`), of every version,
    /// sorted.
    pub fn link_pins(&self) -> Vec<String> {
        let Ok(versions) = fs::read_dir(self.root()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = versions
            .flatten()
            .filter_map(|version| fs::read_dir(version.path().join("links")).ok())
            .flat_map(|links| links.flatten())
            .map(|link| link.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `egress-agent status` on this root: its exit status and output.
    pub fn status(&self) -> (bool, String) {
        self.agent(&["status"])
    }

    /// `egress-agent uninstall` on this root: its exit status and output.
    pub fn uninstall(&self) -> (bool, String) {
        self.agent(&["uninstall"])
    }

    /// `egress-agent ARGS... --pin-root ROOT`, run to completion.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--pin-root")
            .arg(self.root())
            .output()
            .unwrap_or_else(|err| panic!("cannot run egress-agent {args:?}: {err}"))
    }

    /// `egress-agent ARGS... --pin-root ROOT`: its exit status and output.
    fn agent(&self, args: &[&str]) -> (bool, String) {
        let out = self.command(args);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.root().exists() {
            let (ok, out) = self.uninstall();
            if !ok {
                eprintln!("uninstall of {} failed: {out}", self.root().display());
            }
        }
        let path = CString::new(self.mount.as_os_str().as_bytes()).expect("no NUL in a temp path");
        // SAFETY: a NUL-terminated path; EINVAL (nothing mounted there) is expected when no
        // agent ran.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        if let Err(err) = fs::remove_dir(&self.mount) {
            eprintln!("cannot remove {}: {err}", self.mount.display());
        }
    }
}

//! cgroup v2 discovery: where the hierarchy is mounted, and which cgroup an id names.
use std::{
    collections::HashMap,
    fs,
    io::{self, BufRead as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::statfs::{CGROUP2_SUPER_MAGIC, filesystem_type};

/// The mount point of the cgroup2 hierarchy, from `/proc/self/mounts`.
///
/// Hosts differ (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones),
/// so it is never assumed.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = fs::File::open("/proc/self/mounts")?;
    for line in io::BufReader::new(mounts).lines() {
        let line = line?;
        let mut fields = line.split_whitespace();
        let (Some(_), Some(dir), Some(fstype)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if fstype == "cgroup2" {
            return Ok(PathBuf::from(unescape_mount_path(dir)));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no cgroup2 filesystem in /proc/self/mounts (cgroup v2 is required)",
    ))
}

/// Whether `path` is a directory of the cgroup v2 hierarchy: the only thing the programs
/// attach to. Checked before anything is attached, so that a typo fails the start cleanly.
pub fn is_cgroup2_dir(path: &Path) -> io::Result<bool> {
    Ok(fs::metadata(path)?.is_dir() && filesystem_type(path)? == CGROUP2_SUPER_MAGIC)
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(v) = octal_escape(&bytes[i..]) {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `\ooo` at the start of `b`, as a byte.
fn octal_escape(b: &[u8]) -> Option<u8> {
    let [b'\\', d @ ..] = b else { return None };
    let digits = d.get(..3)?;
    digits.iter().try_fold(0u8, |acc, c| match c {
        b'0'..=b'7' => acc.checked_mul(8)?.checked_add(c - b'0'),
        _ => None,
    })
}

/// Resolves cgroup ids (the inode number of a cgroup v2 directory, what
/// `bpf_skb_cgroup_id` returns) to paths, caching what it has seen.
pub struct CgroupNames {
    root: PathBuf,
    known: HashMap<u64, PathBuf>,
    /// When the hierarchy was last walked: an unknown id (a cgroup already gone, or 0 for
    /// forwarded traffic) re-walks it at most once per `REWALK_PERIOD`, so a flood of
    /// events cannot turn into a flood of directory walks.
    walked: Option<Instant>,
}

const REWALK_PERIOD: Duration = Duration::from_secs(1);

impl CgroupNames {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            known: HashMap::new(),
            walked: None,
        }
    }

    /// The cgroup's directory, or `None` when no cgroup has this id (any more).
    pub fn path_of(&mut self, id: u64) -> Option<&Path> {
        self.path_at(id, Instant::now())
    }

    /// [`Self::path_of`] at time `now`.
    fn path_at(&mut self, id: u64, now: Instant) -> Option<&Path> {
        let stale =
            (self.walked).is_none_or(|at| now.saturating_duration_since(at) >= REWALK_PERIOD);
        if !self.known.contains_key(&id) && stale {
            self.known.clear();
            walk(&self.root, &mut self.known);
            self.walked = Some(now);
        }
        self.known.get(&id).map(PathBuf::as_path)
    }

    /// The hierarchy root, to turn a relative path back into a directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn walk(dir: &Path, known: &mut HashMap<u64, PathBuf>) {
    let Ok(meta) = fs::metadata(dir) else {
        return;
    };
    known.insert(meta.ino(), dir.to_path_buf());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&entry.path(), known);
        }
    }
}

/// The first process in a cgroup and its command name, when the cgroup has one.
pub fn first_process(cgroup_dir: &Path) -> Option<(u32, String)> {
    let procs = fs::read_to_string(cgroup_dir.join("cgroup.procs")).ok()?;
    let pid: u32 = procs.lines().next()?.trim().parse().ok()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some((pid, comm.trim_end().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_to_directories_and_new_ones_after_the_rewalk_period() {
        let root = std::env::temp_dir().join(format!("egress-cgroup-names-{}", std::process::id()));
        let first = root.join("kubepods/pod-a");
        fs::create_dir_all(&first).expect("temp tree");
        let ino = |p: &Path| fs::metadata(p).expect("stat").ino();
        let mut names = CgroupNames::new(root.clone());
        let start = Instant::now();
        assert_eq!(names.path_at(ino(&first), start), Some(first.as_path()));
        let second = root.join("kubepods/pod-b");
        fs::create_dir_all(&second).expect("temp tree");
        let almost = start + REWALK_PERIOD - Duration::from_millis(1);
        assert_eq!(
            names.path_at(ino(&second), almost),
            None,
            "no re-walk within the period"
        );
        let after = start + REWALK_PERIOD;
        assert_eq!(names.path_at(ino(&second), after), Some(second.as_path()));
        fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/mnt/x\\"), "/mnt/x\\");
    }
}

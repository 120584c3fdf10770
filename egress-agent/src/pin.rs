//! Where kernel state outlives the agent: maps and links pinned in bpffs under
//! `<root>/v<LAYOUT_VERSION>/`, and the lock that lets one agent at a time own them.
//!
//! ```text
//! <root>/                      flock(2)ed by the running agent
//!   v1/maps/CIDRS, ...         every map programs share, plus LEARNED_NAMES
//!   v1/links/cgroup-<inode>-egress@<link id>, tc-<interface>-ingress@<link id>,
//!   workload-<interface>-ingress@<link id>, ...
//! ```
//!
//! A link pin keeps its program attached after the agent exits; removing the pin detaches
//! it. Link names carry the link id, so a new agent pins its links beside its predecessor's
//! and removes theirs only once its own are attached.
use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use egress_common::LAYOUT_VERSION;
use serde_json::json;

use crate::{
    lifecycle,
    statfs::{BPF_FS_MAGIC, c_path, filesystem_type},
};

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/egress-enforcer";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The OS error's text is part of the message, and so not also a source: `Left` lists
    /// these one per line, and a chain would print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{0} has no parent directory to mount bpffs on")]
    NoParent(PathBuf),
    #[error(
        "another egress-agent holds {0}; stop it first (its `--on-exit detach` removes the \
         pinned state itself)"
    )]
    Busy(PathBuf),
    #[error("{0}: not a link pin of egress-agent, so not removed")]
    Stray(PathBuf),
    #[error(
        "left in place: {}",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Left(Vec<PinError>),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |error| PinError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// What an attachment is, as its pin's file name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPin {
    pub path: PathBuf,
    /// `cgroup-<inode>-egress`, `tc-eth0-ingress`, ...: the attach point and direction.
    pub point: String,
}

/// What [`PinRoot::remove_all`] did.
#[derive(Debug, Default)]
pub struct Removal {
    /// The link pins removed, which detached their programs.
    pub detached: Vec<LinkPin>,
    /// What is still there, and why: entries that are not ours, and what could not be
    /// removed (the directories holding them among it).
    pub left: Vec<PinError>,
}

/// What a pin root held when a starting agent took its lock: its predecessor's state, which
/// a failed start leaves as it was.
#[derive(Debug)]
pub struct Contents {
    paths: HashSet<PathBuf>,
    /// The predecessor's link pins: attachments that go on enforcing.
    pub links: Vec<LinkPin>,
}

impl Contents {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// The pin root: the versioned directory inside it, and its lock.
#[derive(Debug, Clone)]
pub struct PinRoot {
    root: PathBuf,
}

/// Held while an agent owns the pinned state; released when dropped or when the process dies.
pub struct Lock {
    _dir: File,
}

impl PinRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This layout version's directory.
    pub fn dir(&self) -> PathBuf {
        self.root.join(format!("v{LAYOUT_VERSION}"))
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir().join("maps").join(name)
    }

    fn links_dir(&self) -> PathBuf {
        self.dir().join("links")
    }

    /// Where this agent pins a new link for `point`.
    pub fn link_path(&self, point: &str, link_id: u32) -> PathBuf {
        self.links_dir().join(format!("{point}@{link_id}"))
    }

    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    /// Makes sure the root's parent is on bpffs (mounting it there if not, as on hosts that
    /// do not mount `/sys/fs/bpf`), and that the root, which agents lock, exists.
    fn create(&self) -> Result<(), PinError> {
        let parent = self
            .root
            .parent()
            .ok_or_else(|| PinError::NoParent(self.root.clone()))?;
        if filesystem_type(parent).map_err(io_err(parent))? != BPF_FS_MAGIC {
            mount_bpffs(parent).map_err(io_err(parent))?;
            log::info!("mounted bpffs on {}", parent.display());
        }
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))
    }

    /// Creates this version's directories. Done holding the lock: created before it, they
    /// could be removed by the agent that held it on its way out.
    pub fn prepare(&self) -> Result<(), PinError> {
        for dir in [self.dir().join("maps"), self.links_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// Takes the lock for an agent about to load, creating the root, and waits for the agent
    /// that holds it to exit (an upgrade starts the new agent while the old one still runs).
    /// That one finishes with its pins before it lets go: with `--on-exit detach` it removes
    /// the root too, and the lock then taken is on a directory no path names any more, so the
    /// root is created and locked afresh.
    pub fn take(&self) -> Result<Lock, PinError> {
        loop {
            self.create()?;
            if let Some(lock) = self.lock(true)? {
                return Ok(lock);
            }
            log::info!(
                "the agent that held {} removed it on exit; starting afresh",
                self.root.display()
            );
            lifecycle::emit("starting_afresh", json!({"pin_root": self.root}));
        }
    }

    /// Takes the root's lock, waiting for another agent to exit if `wait`; without `wait`,
    /// fails with `Busy`. `None` when there is no root, or when it was removed or replaced
    /// while this waited: the lock is then on a directory that is no longer the root.
    pub fn lock(&self, wait: bool) -> Result<Option<Lock>, PinError> {
        let dir = match File::open(&self.root) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        let nonblocking = libc::LOCK_EX | libc::LOCK_NB;
        if flock(&dir, nonblocking).is_err() {
            if !wait {
                return Err(PinError::Busy(self.root.clone()));
            }
            log::info!(
                "waiting for the agent that holds {} to exit",
                self.root.display()
            );
            lifecycle::emit("waiting_for_pins", json!({"pin_root": self.root}));
            flock(&dir, libc::LOCK_EX).map_err(io_err(&self.root))?;
        }
        let locked = dir.metadata().map_err(io_err(&self.root))?;
        let current = match fs::metadata(&self.root) {
            Ok(now) => (now.dev(), now.ino()) == (locked.dev(), locked.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        Ok(current.then_some(Lock { _dir: dir }))
    }

    /// What the root holds now: taken by a starting agent once it holds the lock, to know
    /// what is its predecessor's.
    pub fn contents(&self) -> Result<Contents, PinError> {
        Ok(Contents {
            paths: entries_below(&self.root)?
                .into_iter()
                .map(|e| e.path())
                .collect(),
            links: self.links()?,
        })
    }

    /// Removes what the root holds beyond `before` (what a failed start added): link pins
    /// first, so its programs detach before its maps' pins go, then the rest, directories
    /// once empty, and the root too if nothing is left in it. What was there before stays.
    pub fn remove_added(&self, before: &Contents) -> Removal {
        let mut removal = Removal::default();
        let added: Vec<fs::DirEntry> = match entries_below(&self.root) {
            Ok(entries) => entries
                .into_iter()
                .filter(|e| !before.paths.contains(&e.path()))
                .collect(),
            Err(e) => {
                removal.left.push(e);
                return removal;
            }
        };
        let (links, rest): (Vec<_>, Vec<_>) = added.iter().partition(|e| link_pin(e).is_some());
        for link in links.into_iter().filter_map(link_pin) {
            match remove_file(&link.path) {
                Ok(()) => removal.detached.push(link),
                Err(e) => removal.left.push(e),
            }
        }
        for entry in rest {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                removal.left.extend(remove_dir_if_empty(&path).err());
            } else {
                removal.left.extend(remove_file(&path).err());
            }
        }
        removal.left.extend(remove_dir_if_empty(&self.root).err());
        removal
    }

    /// Whether an agent holds the lock now.
    pub fn held(&self) -> Result<bool, PinError> {
        let dir = File::open(&self.root).map_err(io_err(&self.root))?;
        Ok(flock(&dir, libc::LOCK_SH | libc::LOCK_NB).is_err())
    }

    /// Every link pinned under any layout version. Other entries in a `links` directory
    /// are not ours, and are left out.
    pub fn links(&self) -> Result<Vec<LinkPin>, PinError> {
        let mut links = Vec::new();
        for version in self.versions()? {
            let dir = version.join("links");
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let entry = entry.map_err(io_err(&dir))?;
                if let Some(link) = link_pin(&entry) {
                    links.push(link);
                }
            }
        }
        links.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(links)
    }

    /// The version directories, this one included if it exists.
    pub fn versions(&self) -> Result<Vec<PathBuf>, PinError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        let mut versions = Vec::new();
        for entry in entries {
            let path = entry.map_err(io_err(&self.root))?.path();
            if path.is_dir() {
                versions.push(path);
            }
        }
        versions.sort();
        Ok(versions)
    }

    /// Removes the version directories other than this one (after their links are gone).
    pub fn remove_other_versions(&self) -> Result<Vec<PathBuf>, PinError> {
        let mine = self.dir();
        let mut removed = Vec::new();
        for version in self.versions()? {
            if version != mine {
                remove_tree(&version)?;
                removed.push(version);
            }
        }
        Ok(removed)
    }

    /// Removes every pin: links first, so programs detach before their maps' pins go; the
    /// root itself last. An entry of a `links` directory that is not a link pin of ours is
    /// someone else's, and stays, with the directories holding it. Goes on past what it
    /// cannot remove, so that whatever is left is only what has to be.
    pub fn remove_all(&self) -> Removal {
        let mut removal = Removal::default();
        let versions = match self.versions() {
            Ok(versions) => versions,
            Err(e) => {
                removal.left.push(e);
                return removal;
            }
        };
        for version in &versions {
            let dir = version.join("links");
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    removal.left.push(io_err(&dir)(e));
                    continue;
                }
            };
            for entry in entries.flatten() {
                match link_pin(&entry) {
                    Some(link) => match remove_file(&link.path) {
                        Ok(()) => removal.detached.push(link),
                        Err(e) => removal.left.push(e),
                    },
                    None => removal.left.push(PinError::Stray(entry.path())),
                }
            }
        }
        removal.detached.sort_by(|a, b| a.path.cmp(&b.path));
        for version in &versions {
            // `links` is empty now, unless something is left in it; the rest (`maps`, and
            // whatever another release keeps) is all ours.
            match fs::read_dir(version) {
                Ok(entries) => {
                    for entry in entries.flatten() {
                        let path = entry.path();
                        let removed = if entry.file_name() == "links" {
                            remove_dir(&path)
                        } else {
                            remove_tree(&path)
                        };
                        removal.left.extend(removed.err());
                    }
                }
                Err(e) => removal.left.push(io_err(version)(e)),
            }
            removal.left.extend(remove_dir(version).err());
        }
        removal.left.extend(remove_dir(&self.root).err());
        removal
    }
}

impl Removal {
    /// The links removed if nothing is left, else what is left as one error.
    pub fn complete(self) -> Result<Vec<LinkPin>, PinError> {
        if self.left.is_empty() {
            Ok(self.detached)
        } else {
            Err(PinError::Left(self.left))
        }
    }
}

/// The link pin `entry` of a `links` directory is, if it is one: `<point>@<link id>`, as
/// [`PinRoot::link_path`] names them, and not a directory.
fn link_pin(entry: &fs::DirEntry) -> Option<LinkPin> {
    let path = entry.path();
    let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
    let point = link_point(&path).filter(|_| !is_dir)?.to_owned();
    Some(LinkPin { path, point })
}

/// The attach point a link pin's name holds (`<point>@<link id>`), if it is one.
pub fn link_point(path: &Path) -> Option<&str> {
    let (point, id) = path.file_name()?.to_str()?.rsplit_once('@')?;
    let valid = !point.is_empty() && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit());
    valid.then_some(point)
}

pub fn remove_file(path: &Path) -> Result<(), PinError> {
    unless_gone(path, fs::remove_file(path))
}

/// Removes an empty directory.
fn remove_dir(dir: &Path) -> Result<(), PinError> {
    unless_gone(dir, fs::remove_dir(dir))
}

/// Removes a directory unless something is still in it: what is, is someone else's, or was
/// named where it could not be removed.
fn remove_dir_if_empty(dir: &Path) -> Result<(), PinError> {
    match remove_dir(dir) {
        Err(PinError::Io { error, .. }) if error.kind() == io::ErrorKind::DirectoryNotEmpty => {
            Ok(())
        }
        other => other,
    }
}

/// Every entry below `dir` (none if it is gone), each directory after what it holds.
fn entries_below(dir: &Path) -> Result<Vec<fs::DirEntry>, PinError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut below = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            below.extend(entries_below(&entry.path())?);
        }
        below.push(entry);
    }
    Ok(below)
}

/// Removes a directory of pins; bpffs files are removed with `unlink`, like any file.
fn remove_tree(dir: &Path) -> Result<(), PinError> {
    unless_gone(dir, fs::remove_dir_all(dir))
}

/// The error of removing `path`, unless it was gone already.
fn unless_gone(path: &Path, removed: io::Result<()>) -> Result<(), PinError> {
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid open fd; flock has no memory arguments.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    let fs = c"bpf";
    let options = c"mode=0700";
    // SAFETY: NUL-terminated strings; bpffs takes a text option string.
    let rc = unsafe {
        libc::mount(
            fs.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A pin root for tests, here and in the modules that use one.
#[cfg(test)]
pub(crate) mod temp {
    use std::{fs, path::PathBuf};

    use super::PinRoot;

    /// A pin root in the temp directory (plain files stand in for pins), removed on drop.
    pub(crate) struct TempRoot(pub(crate) PinRoot);

    impl TempRoot {
        pub(crate) fn new(name: &str) -> Self {
            let root = std::env::temp_dir().join(format!("pin-test-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            Self(PinRoot::new(root))
        }

        /// Creates `path` below the root: a directory if it ends in `/`, else a file.
        pub(crate) fn add(&self, path: &str) -> PathBuf {
            let full = self.0.root().join(path);
            if path.ends_with('/') {
                fs::create_dir_all(&full).unwrap();
            } else {
                fs::create_dir_all(full.parent().unwrap()).unwrap();
                fs::write(&full, "").unwrap();
            }
            full
        }
    }

    impl Drop for TempRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(self.0.root());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{temp::TempRoot, *};

    #[test]
    fn paths_are_versioned_and_links_carry_their_id() {
        let pins = PinRoot::new("/sys/fs/bpf/egress-enforcer");
        let v = format!("/sys/fs/bpf/egress-enforcer/v{LAYOUT_VERSION}");
        assert_eq!(pins.dir(), PathBuf::from(&v));
        assert_eq!(
            pins.map_path("CIDRS"),
            PathBuf::from(format!("{v}/maps/CIDRS"))
        );
        assert_eq!(
            pins.link_path("cgroup-1-egress", 42),
            PathBuf::from(format!("{v}/links/cgroup-1-egress@42"))
        );
    }

    #[test]
    fn remove_all_removes_every_pin_of_ours_and_leaves_the_rest() {
        let root = TempRoot::new("strays");
        let v = format!("v{LAYOUT_VERSION}");
        let old_link = root.add("v0/links/cgroup-1-egress@3");
        root.add("v0/maps/CIDRS");
        let links = [
            root.add(&format!("{v}/links/cgroup-1-egress@5")),
            root.add(&format!("{v}/links/tc-eth0-ingress@6")),
        ];
        root.add(&format!("{v}/maps/CIDRS"));
        root.add(&format!("{v}/maps/PORTS"));
        let strays = [
            root.add(&format!("{v}/links/notes.txt")),
            root.add(&format!("{v}/links/cgroup-1-egress@7/")),
            root.add(&format!("{v}/links/other/")),
        ];
        let pins = &root.0;
        assert_eq!(
            pins.links()
                .unwrap()
                .iter()
                .map(|l| &l.path)
                .collect::<Vec<_>>(),
            [&old_link, &links[0], &links[1]],
            "strays are no links"
        );

        let removal = pins.remove_all();
        let detached: Vec<_> = removal.detached.iter().map(|l| l.point.as_str()).collect();
        assert_eq!(
            detached,
            ["cgroup-1-egress", "cgroup-1-egress", "tc-eth0-ingress"]
        );
        let mut left: Vec<String> = removal.left.iter().map(ToString::to_string).collect();
        left.sort();
        let dir = pins.dir().display().to_string();
        let not_empty = "Directory not empty (os error 39)";
        let stray = "not a link pin of egress-agent, so not removed";
        let mut expected = [
            format!("{}: {not_empty}", pins.root().display()),
            format!("{dir}/links/cgroup-1-egress@7: {stray}"),
            format!("{dir}/links/notes.txt: {stray}"),
            format!("{dir}/links/other: {stray}"),
            format!("{dir}/links: {not_empty}"),
            format!("{dir}: {not_empty}"),
        ];
        expected.sort();
        assert_eq!(left, expected);
        assert!(
            strays.iter().all(|s| s.exists()),
            "strays are left in place"
        );
        assert!(!pins.map_path("CIDRS").exists() && !pins.root().join("v0").exists());
        let error = removal.complete().unwrap_err().to_string();
        assert!(error.starts_with("left in place: "), "{error}");

        for stray in strays {
            fs::remove_file(&stray)
                .or_else(|_| fs::remove_dir(&stray))
                .unwrap();
        }
        let removal = pins.remove_all();
        assert!(removal.detached.is_empty());
        assert!(removal.complete().is_ok());
        assert!(!pins.exists());
    }

    #[test]
    fn a_lock_on_a_root_removed_while_waiting_is_no_lock() {
        let root = TempRoot::new("removed");
        root.add("v1/maps/");
        let pins = root.0.clone();
        let holder = pins.lock(false).unwrap().expect("the root exists");
        let waiter = std::thread::spawn(move || pins.lock(true).map(|lock| lock.is_some()));
        std::thread::sleep(std::time::Duration::from_millis(100));
        // What an exiting agent does with `--on-exit detach`, holding its lock.
        fs::remove_dir_all(root.0.root()).unwrap();
        drop(holder);
        assert!(!waiter.join().unwrap().unwrap(), "locked a removed root");
        fs::create_dir(root.0.root()).unwrap();
        assert!(root.0.lock(false).unwrap().is_some());
    }

    #[test]
    fn remove_added_leaves_what_was_there_before() {
        let root = TempRoot::new("added");
        let v = format!("v{LAYOUT_VERSION}");
        let theirs = [
            root.add(&format!("{v}/links/cgroup-1-egress@3")),
            root.add(&format!("{v}/maps/CIDRS")),
        ];
        let pins = &root.0;
        let before = pins.contents().unwrap();
        assert_eq!(before.links.len(), 1);
        root.add(&format!("{v}/links/cgroup-1-egress@9"));
        root.add(&format!("{v}/maps/LEARNED_NAMES"));
        root.add("v9/maps/CIDRS");
        let removal = pins.remove_added(&before);
        assert!(removal.left.is_empty(), "{:?}", removal.left);
        let detached: Vec<_> = removal.detached.iter().map(|l| l.path.clone()).collect();
        assert_eq!(detached, [pins.link_path("cgroup-1-egress", 9)]);
        assert!(theirs.iter().all(|p| p.exists()));
        assert!(!pins.map_path("LEARNED_NAMES").exists() && !pins.root().join("v9").exists());

        let empty = TempRoot::new("added-empty");
        fs::create_dir(empty.0.root()).unwrap();
        let before = empty.0.contents().unwrap();
        assert!(before.is_empty());
        empty.add(&format!("{v}/links/cgroup-1-egress@9"));
        empty.add(&format!("{v}/maps/CIDRS"));
        let removal = empty.0.remove_added(&before);
        assert!(removal.left.is_empty() && removal.detached.len() == 1);
        assert!(!empty.0.exists(), "the root is left");
    }

    #[test]
    fn a_missing_root_has_no_versions_and_no_links() {
        let pins = PinRoot::new("/nonexistent/egress-enforcer");
        assert!(pins.versions().unwrap().is_empty());
        assert!(pins.links().unwrap().is_empty());
        assert!(!pins.exists());
    }
}

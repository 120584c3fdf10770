//! The list files a policy names (`cidrs_from`), watched as the policy file is: a change of
//! their content reloads the policy. A file's content is hashed again only when its size,
//! modification time or inode changed, so a million-line list costs a `stat` a poll.
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use crate::policy::{Policy, digest_of};

/// What `stat` says of a file: a change of content changes one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ino: u64,
    dev: u64,
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        ino: meta.ino(),
        dev: meta.dev(),
    })
}

#[derive(Debug)]
struct ListFile {
    path: PathBuf,
    /// `None` until first looked at: the file may have changed since the policy read it.
    stamp: Option<Stamp>,
    /// `None` when it could not be read.
    digest: Option<[u8; 32]>,
}

/// The list files of the running policy, with the content it was parsed from.
#[derive(Debug, Default)]
pub struct ListFiles(Vec<ListFile>);

impl ListFiles {
    pub fn of(policy: &Policy) -> Self {
        Self(
            policy
                .lists
                .iter()
                .map(|list| ListFile {
                    path: list.path.clone(),
                    stamp: None,
                    digest: Some(list.digest),
                })
                .collect(),
        )
    }

    /// Whether a file's content differs from the last seen; what is seen now becomes the
    /// last seen, so a bad list is reported once, not at every poll.
    pub fn changed(&mut self) -> bool {
        let mut changed = false;
        for file in &mut self.0 {
            let now = stamp(&file.path);
            if now.is_some() && now == file.stamp {
                continue;
            }
            file.stamp = now;
            let digest = digest_of(&file.path).ok();
            changed |= digest != file.digest;
            file.digest = digest;
        }
        changed
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;

    #[test]
    fn a_list_counts_as_changed_once_per_change_of_its_content() {
        let dir = std::env::temp_dir().join(format!("reload-lists-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the directory");
        let list = dir.join("hosts.txt");
        std::fs::write(&list, "203.0.113.10\n").expect("write the list");
        let source = dir.join("policy.yaml").display().to_string();
        let parsed = policy::parse("allow:\n  - cidrs_from: hosts.txt\n", &source);
        let mut lists = ListFiles::of(&parsed.expect("valid"));
        assert!(!lists.changed(), "the content the policy was parsed from");
        std::fs::write(&list, "203.0.113.20\n").expect("write the list");
        assert!(lists.changed(), "an edit");
        assert!(!lists.changed(), "the same edit, seen already");
        std::fs::remove_file(&list).expect("remove the list");
        assert!(lists.changed(), "a list gone");
        assert!(!lists.changed(), "still gone");
        std::fs::remove_dir_all(&dir).expect("remove the directory");
    }
}

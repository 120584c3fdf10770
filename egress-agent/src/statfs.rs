//! Which filesystem a path is on: the agent checks its inputs (a cgroup v2 directory, a pin
//! root on bpffs) by it before anything in the kernel changes.
use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

/// `statfs(2)`'s `f_type` for bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `statfs(2)`'s `f_type` for the cgroup v2 hierarchy.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

pub fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// The `f_type` of the filesystem `path` is on.
pub fn filesystem_type(path: &Path) -> io::Result<i64> {
    let c = c_path(path)?;
    // SAFETY: statfs writes only into `buf`; `c` is a NUL-terminated path.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between C libraries"
    )]
    Ok(buf.f_type as i64)
}

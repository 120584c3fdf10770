//! `BPF_MAP_UPDATE_BATCH` on `CIDRS` and `HOSTS`, which aya does not offer: one syscall for
//! many entries. Kernel 6.18 takes it on an LPM trie (the generic batch op: each entry is
//! still one insert under the trie's lock, without a syscall of its own); 5.10 refuses it
//! there with ENOTSUPP (seen under `scripts/kernel-matrix.sh`), and the caller then writes
//! entry by entry. Hash maps have had it since 5.6.
use std::os::fd::{AsRawFd as _, BorrowedFd};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Entries per syscall: the key and value buffers stay at a few MiB.
const CHUNK: usize = 1 << 16;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch write stopped.
pub(super) enum Refused {
    /// The kernel has no batch update for the map: nothing was written.
    Unsupported,
    /// An entry could not be written.
    Failed(std::io::Error),
}

/// Writes `entries` into the map `fd` in batches, each as the (key, value) `kv` makes of
/// it; `K` and `V` must be the map's key and value types.
pub(super) fn write<E, K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    entries: &[E],
    kv: impl Fn(&E) -> (K, V),
) -> Result<(), Refused> {
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK.min(entries.len()));
    let mut values: Vec<V> = Vec::with_capacity(CHUNK.min(entries.len()));
    for chunk in entries.chunks(CHUNK) {
        keys.clear();
        values.clear();
        for (k, v) in chunk.iter().map(&kv) {
            keys.push(k);
            values.push(v);
        }
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at `count` keys and values of the map's sizes, alive for the
        // call; the kernel writes back only `attr.count`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if ret < 0 {
            let error = std::io::Error::last_os_error();
            // ENOTSUPP (524) or EOPNOTSUPP: the kernel has no batch update for this map type
            // (5.10 has none; it answers before it writes `count` back), EINVAL:
            // no batch command at all. The caller then writes every entry one by one, which
            // also rewrites any this call wrote: an insert of an existing key replaces it.
            let unsupported = matches!(
                error.raw_os_error(),
                Some(524 | libc::EOPNOTSUPP | libc::EINVAL)
            );
            return Err(if unsupported {
                Refused::Unsupported
            } else {
                Refused::Failed(error)
            });
        }
    }
    Ok(())
}

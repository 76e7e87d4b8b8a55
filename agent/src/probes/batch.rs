//! Whole-map reads with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+), which aya 0.14 does not expose:
//! a hash map of N entries in N / [`CHUNK`] + 1 syscalls, instead of one lookup per key.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};

/// `enum bpf_cmd`: `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per syscall. A hash map's batch stops at a hash bucket boundary and
/// fails with ENOSPC only if one bucket holds more entries than this, which is never.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
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

/// Every (key, value) of `map`, read in chunks. Entries added or removed meanwhile may be
/// missed or seen, as with any walk of a live map.
pub fn lookup_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut keys = vec![0u8; CHUNK * size_of::<K>()];
    let mut values = vec![0u8; CHUNK * size_of::<V>()];
    // The opaque position (a u32 bucket index for hash maps), in and out.
    let mut position = [0u64; 2];
    let mut next = [0u64; 2];
    let mut entries = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { position.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and values that outlive the call,
        // and at two 16-byte positions; the kernel writes only there and into `attr.count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let error = (rc < 0).then(io::Error::last_os_error);
        // ENOENT: the walk is over (the last chunk, possibly empty, came with it).
        let done = match error {
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Some(e) => return Err(e),
            None => false,
        };
        let count = (attr.count as usize).min(CHUNK);
        entries.extend((0..count).map(|i| {
            // SAFETY: the kernel wrote `count` keys and values; unaligned reads of Pod types.
            unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * size_of::<K>()).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * size_of::<V>()).cast::<V>()),
                )
            }
        }));
        if done {
            return Ok(entries);
        }
        position = next;
        first = false;
    }
}

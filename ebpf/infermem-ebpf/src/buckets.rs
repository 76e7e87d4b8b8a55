//! Maintains `FILE_BUCKETS`: which 2 MiB buckets of a process's address space belong to a
//! large file mapping. Loops run through `bpf_loop`, so their cost is checked once by the
//! verifier and bounded by `MAX_BUCKETS_PER_MAPPING` at run time.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_for_each_map_elem, bpf_loop, bpf_map_delete_elem},
};
use infermem_common::{BUCKET_SHIFT, BucketKey, FileBucket, MAX_BUCKETS_PER_MAPPING, ProcMemory};

use crate::{
    kernel::atomic_add,
    maps::{FILE_BUCKETS, bucket_key},
};

/// State shared with the loop callbacks (lives on the probe's stack).
///
/// The callbacks count buckets straight into the process's map value rather than into a
/// counter here: a counter that differs on every iteration would keep the verifier from
/// recognising the loop body's states as equal.
#[repr(C)]
struct RangeOp {
    tgid: u32,
    _pad: u32,
    /// The mapping being added, or the range being removed.
    start: u64,
    end: u64,
    first_bucket: u64,
    /// The process's accounting, whose `file_buckets` the callbacks update.
    memory: *mut ProcMemory,
    /// Set to 1 once any bucket was created (insert) or deleted (remove).
    changed: u64,
}

/// The buckets `[start, end)` spans, at most `MAX_BUCKETS_PER_MAPPING`.
pub fn bucket_count(start: u64, end: u64) -> u32 {
    if end <= start {
        return 0;
    }
    let buckets = ((end - 1) >> BUCKET_SHIFT) - (start >> BUCKET_SHIFT) + 1;
    if buckets > MAX_BUCKETS_PER_MAPPING as u64 {
        MAX_BUCKETS_PER_MAPPING
    } else {
        buckets as u32
    }
}

/// Records `[start, end)` as a large file mapping of `tgid`; returns whether any bucket is new.
#[inline(always)]
pub fn insert(tgid: u32, memory: &mut ProcMemory, start: u64, end: u64) -> bool {
    let mut op = RangeOp {
        tgid,
        _pad: 0,
        start,
        end,
        first_bucket: start >> BUCKET_SHIFT,
        memory,
        changed: 0,
    };
    // SAFETY: the callback only touches `op` through the pointer the helper hands back.
    unsafe {
        bpf_loop(
            bucket_count(start, end),
            insert_one as *mut c_void,
            &mut op as *mut RangeOp as *mut c_void,
            0,
        );
    }
    op.changed != 0
}

#[inline(never)]
unsafe extern "C" fn insert_one(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `RangeOp` passed to bpf_loop.
    let op = unsafe { &mut *(ctx as *mut RangeOp) };
    let key = BucketKey {
        tgid: op.tgid,
        _pad: 0,
        bucket: op.first_bucket + index,
    };
    if let Some(existing) = FILE_BUCKETS.get_ptr_mut(key) {
        // A new mapping over an old one (MAP_FIXED) or a neighbour sharing the bucket: the
        // newest mapping owns it, its fault count carries on.
        // SAFETY: a valid map value pointer.
        unsafe {
            (*existing).start = op.start;
            (*existing).end = op.end;
        }
        return 0;
    }
    let bucket = FileBucket {
        start: op.start,
        end: op.end,
        faults: 0,
    };
    match FILE_BUCKETS.insert(key, bucket, BPF_NOEXIST as u64) {
        Ok(()) => {
            // SAFETY: `memory` points into a live map value.
            unsafe { atomic_add(&mut (*op.memory).file_buckets, 1) };
            op.changed = 1;
            0
        }
        // Map full: stop; the caller counts what was recorded.
        Err(_) => 1,
    }
}

/// Forgets `[start, end)` of `tgid` after an munmap or the old side of an mremap; returns
/// whether any bucket was deleted.
#[inline(always)]
pub fn remove(tgid: u32, memory: &mut ProcMemory, start: u64, end: u64) -> bool {
    let mut op = RangeOp {
        tgid,
        _pad: 0,
        start,
        end,
        first_bucket: start >> BUCKET_SHIFT,
        memory,
        changed: 0,
    };
    // SAFETY: as for `insert`.
    unsafe {
        bpf_loop(
            bucket_count(start, end),
            remove_one as *mut c_void,
            &mut op as *mut RangeOp as *mut c_void,
            0,
        );
    }
    op.changed != 0
}

#[inline(never)]
unsafe extern "C" fn remove_one(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `RangeOp` passed to bpf_loop.
    let op = unsafe { &mut *(ctx as *mut RangeOp) };
    let bucket_start = (op.first_bucket + index) << BUCKET_SHIFT;
    let bucket_end = bucket_start + (1 << BUCKET_SHIFT);
    let key = BucketKey {
        tgid: op.tgid,
        _pad: 0,
        bucket: op.first_bucket + index,
    };
    let Some(value) = FILE_BUCKETS.get_ptr_mut(key) else {
        return 0;
    };
    // SAFETY: a valid map value pointer.
    let value = unsafe { &mut *value };
    // What is left of the mapping on each side of the hole, within this bucket.
    let left = (value.start, op.start.min(value.end));
    let right = (op.end.max(value.start), value.end);
    let in_bucket = |(s, e): (u64, u64)| s < e && s < bucket_end && e > bucket_start;
    if in_bucket(left) {
        value.end = left.1;
    } else if in_bucket(right) {
        value.start = right.0;
    } else if FILE_BUCKETS.remove(key).is_ok() {
        // SAFETY: `memory` points into a live map value.
        unsafe { atomic_add(&mut (*op.memory).file_buckets, 1u64.wrapping_neg()) };
        op.changed = 1;
    }
    0
}

/// Deletes every bucket of `tgid` (its address space is gone: exit or exec).
#[inline(always)]
pub fn remove_all(tgid: u32) {
    let mut target = tgid;
    // SAFETY: the map pointer is our static map; the callback reads `target` via the pointer.
    unsafe {
        bpf_for_each_map_elem(
            &FILE_BUCKETS as *const _ as *mut c_void,
            remove_if_owned as *mut c_void,
            &mut target as *mut u32 as *mut c_void,
            0,
        );
    }
}

#[inline(never)]
unsafe extern "C" fn remove_if_owned(
    map: *mut c_void,
    key: *mut BucketKey,
    _value: *mut FileBucket,
    ctx: *mut c_void,
) -> i64 {
    // SAFETY: the helper passes valid key and context pointers.
    unsafe {
        if (*key).tgid == *(ctx as *const u32) {
            bpf_map_delete_elem(map, key as *const c_void);
        }
    }
    0
}

/// Whether `addr` of `tgid` lies in a recorded file mapping; returns that mapping's range.
#[inline(always)]
pub fn mapping_at(tgid: u32, addr: u64) -> Option<(u64, u64)> {
    let value = FILE_BUCKETS.get_ptr(bucket_key(tgid, addr))?;
    // SAFETY: a valid map value pointer.
    let (start, end) = unsafe { ((*value).start, (*value).end) };
    (start <= addr && addr < end).then_some((start, end))
}

//! User page faults, counted per process and attributed to large file mappings (model files)
//! or to everything else (anonymous memory, in practice).
//!
//! The hot path touches only per-CPU and array maps, which the JIT inlines: the CPU's
//! [`FaultCache`] (counts of the process that faulted last here) and the bucket epoch. Hash
//! lookups happen only when another process starts faulting on the CPU (its counts are folded
//! into `FAULTS`), and, for processes with large file mappings, one lookup of the fault's
//! 2 MiB bucket.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use infermem_common::{FaultCache, FaultCounters, FaultEntry, FaultEntryCount, Probe};

use crate::{
    kernel::atomic_add,
    maps::{
        FAULT_CACHE, FAULTS, PROC_MEMORY, bucket_epoch, count_fault_entry, count_map_drop,
        file_bucket_at, stats,
    },
};

/// `page_fault_user(unsigned long address, struct pt_regs *regs, unsigned long error_code)`.
#[btf_tracepoint(function = "page_fault_user")]
pub fn page_fault_user(ctx: BtfTracePointContext) -> i32 {
    let address: u64 = ctx.arg(0);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(cache) = FAULT_CACHE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU storage of this CPU.
    let cache = unsafe { &mut *cache };
    if cache.tgid != tgid {
        switch_process(cache, tgid);
    }
    cache.pending.faults += 1;

    // Refresh the "has file buckets" gate only when some process's buckets changed.
    let epoch = bucket_epoch();
    if cache.seen_epoch != epoch {
        cache.seen_epoch = epoch;
        cache.has_file_buckets = PROC_MEMORY
            .get_ptr(tgid)
            // SAFETY: a valid map value pointer.
            .is_some_and(|m| unsafe { (*m).file_buckets } > 0)
            as u64;
    }
    if cache.has_file_buckets != 0
        && let Some(bucket) = file_bucket_at(tgid, address)
    {
        cache.pending.file_faults += 1;
        // SAFETY: a pointer into a valid map value, shared across CPUs.
        unsafe { atomic_add(&mut bucket.faults, 1) };
    }
    0
}

/// Folds the cached counts into their process's `FAULTS` entry and starts caching `tgid`.
#[inline(never)]
fn switch_process(cache: &mut FaultCache, tgid: u32) {
    flush(cache);
    // Create the new process's entry now, so that flushes only ever add to live processes
    // (exit deletes the entry; a late flush for a dead process then finds nothing).
    if FAULTS.get_ptr(tgid).is_none() {
        let entry = FaultEntry {
            counters: FaultCounters::default(),
            // SAFETY: a helper with no preconditions.
            created_ns: unsafe { bpf_ktime_get_ns() },
        };
        if FAULTS.insert(tgid, entry, BPF_NOEXIST as u64).is_ok() {
            count_fault_entry(FaultEntryCount::Created);
        } else if FAULTS.get_ptr(tgid).is_none() {
            count_map_drop(Probe::PageFault);
        }
    }
    cache.tgid = tgid;
    // Force a gate refresh for the new process.
    cache.seen_epoch = u64::MAX;
}

/// Adds the cache's pending counts to its process's `FAULTS` entry (if the process still has
/// one) and empties it.
#[inline(always)]
fn flush(cache: &mut FaultCache) {
    let pending = cache.pending;
    cache.pending = FaultCounters::default();
    if cache.tgid == 0 || pending.faults == 0 {
        return;
    }
    if let Some(entry) = FAULTS.get_ptr_mut(cache.tgid) {
        // SAFETY: a pointer into a valid map value, shared across CPUs.
        unsafe {
            atomic_add(&mut (*entry).counters.faults, pending.faults);
            atomic_add(&mut (*entry).counters.file_faults, pending.file_faults);
        }
    }
    if let Some(s) = stats(Probe::PageFault) {
        s.events += pending.faults;
    }
}

/// Forgets this CPU's cached counts if they belong to `tgid` (which is exiting).
#[inline(always)]
pub fn forget_cached(tgid: u32) {
    if let Some(cache) = FAULT_CACHE.get_ptr_mut(0) {
        // SAFETY: per-CPU storage of this CPU.
        let cache = unsafe { &mut *cache };
        if cache.tgid == tgid {
            *cache = FaultCache::default();
        }
    }
}

//! User page faults, counted per process and attributed to large file mappings (model files)
//! or to everything else (anonymous memory, in practice).
//!
//! Cost per fault: one per-CPU hash lookup, one inlined array read, and, only for processes
//! that have large file mappings, one hash lookup of the fault's 2 MiB bucket.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use infermem_common::{FaultCounters, Probe};

use crate::{
    kernel::atomic_add,
    maps::{FAULTS, PROC_MEMORY, bucket_epoch, count_event, count_map_drop, file_bucket_at},
};

/// `page_fault_user(unsigned long address, struct pt_regs *regs, unsigned long error_code)`.
#[btf_tracepoint(function = "page_fault_user")]
pub fn page_fault_user(ctx: BtfTracePointContext) -> i32 {
    let address: u64 = ctx.arg(0);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(counters) = counters(tgid) else {
        return 0;
    };
    counters.faults += 1;
    count_event(Probe::PageFault);

    // Refresh the "has file buckets" gate only when some process's buckets changed.
    let epoch = bucket_epoch();
    if counters.seen_epoch != epoch {
        counters.seen_epoch = epoch;
        counters.has_file_buckets = PROC_MEMORY
            .get_ptr(tgid)
            // SAFETY: a valid map value pointer.
            .is_some_and(|m| unsafe { (*m).file_buckets } > 0)
            as u64;
    }
    if counters.has_file_buckets != 0
        && let Some(bucket) = file_bucket_at(tgid, address)
    {
        counters.file_faults += 1;
        // SAFETY: a pointer into a valid map value, shared across CPUs.
        unsafe { atomic_add(&mut bucket.faults, 1) };
    }
    0
}

#[inline(always)]
fn counters(tgid: u32) -> Option<&'static mut FaultCounters> {
    if let Some(p) = FAULTS.get_ptr_mut(tgid) {
        // SAFETY: per-CPU storage of this CPU.
        return Some(unsafe { &mut *p });
    }
    if FAULTS
        .insert(tgid, FaultCounters::default(), BPF_NOEXIST as u64)
        .is_err()
    {
        count_map_drop(Probe::PageFault);
    }
    // SAFETY: per-CPU storage of this CPU.
    FAULTS.get_ptr_mut(tgid).map(|p| unsafe { &mut *p })
}

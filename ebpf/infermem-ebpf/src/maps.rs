//! The maps and globals shared by all probes, and small accessors over them.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, generated::bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use infermem_common::{
    BucketKey, BucketPolicy, Event, EventKind, FaultCache, FaultEntry, FaultEntryCount, FileBucket,
    KernelOffsets, Probe, ProbeStats, ProcMemory, SyscallArgs, SyscallNumbers,
};

/// Per-process fault counters, fed from [`FAULT_CACHE`]; LRU so that a fork storm evicts
/// instead of failing (see `FaultEntry::created_ns`).
#[map]
pub static FAULTS: LruHashMap<u32, FaultEntry> = LruHashMap::with_max_entries(16384, 0);

/// Entries of [`FAULTS`] created and removed (per CPU), from which the agent counts evictions.
#[map]
pub static FAULT_ENTRIES: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Per-CPU fault counts of the process that faulted last on each CPU.
#[map]
pub static FAULT_CACHE: PerCpuArray<FaultCache> = PerCpuArray::with_max_entries(1, 0);

/// Per-process syscall accounting; entries are removed when the process exits.
#[map]
pub static PROC_MEMORY: HashMap<u32, ProcMemory> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Large file mappings by 2 MiB bucket, for O(1) fault attribution.
#[map]
pub static FILE_BUCKETS: HashMap<BucketKey, FileBucket> =
    HashMap::with_max_entries(262144, BPF_F_NO_PREALLOC);

/// Syscall arguments between entry and exit, by thread id.
#[map]
pub static SYSCALL_ARGS: LruHashMap<u32, SyscallArgs> = LruHashMap::with_max_entries(8192, 0);

/// Bumped whenever any process gains or loses file buckets; see `FaultCache::seen_epoch`.
#[map]
pub static BUCKET_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// Health counters per probe.
#[map]
pub static PROBE_STATS: PerCpuArray<ProbeStats> =
    PerCpuArray::with_max_entries(Probe::ALL.len() as u32, 0);

/// Rare events for the agent. 1 MiB holds about 10 000 events: exec and exit of every
/// process (two per process lifetime) plus large mappings, between two reads of the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// OOM kills only: an mmap or fork storm filling [`EVENTS`] can never drop one. 64 KiB holds
/// about 680 kills.
#[map]
pub static OOM_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Set by the agent from the running kernel's BTF before loading.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets::UNKNOWN;

/// Set by the agent for the running architecture before loading.
#[unsafe(no_mangle)]
static SYSCALL_NUMBERS: SyscallNumbers = SyscallNumbers::X86_64;

/// Set by the agent before loading: who gets file buckets.
#[unsafe(no_mangle)]
static BUCKET_POLICY: BucketPolicy = BucketPolicy::HOST;

/// The bucket policy the agent set.
#[inline(always)]
pub fn bucket_policy() -> &'static BucketPolicy {
    // SAFETY: as for `offsets`.
    unsafe { &*core::ptr::read_volatile(&&BUCKET_POLICY) }
}

/// The kernel offsets the agent resolved (a constant to the verifier: `.rodata` is frozen).
#[inline(always)]
pub fn offsets() -> &'static KernelOffsets {
    // SAFETY: a volatile read keeps the compiler from folding the placeholder value; the
    // reference itself points at the global, which the loader has overwritten.
    unsafe { &*core::ptr::read_volatile(&&KERNEL_OFFSETS) }
}

/// The syscall numbers of the running architecture.
#[inline(always)]
pub fn syscall_numbers() -> &'static SyscallNumbers {
    // SAFETY: as for `offsets`.
    unsafe { &*core::ptr::read_volatile(&&SYSCALL_NUMBERS) }
}

/// The health counters of `probe` on this CPU.
#[inline(always)]
pub fn stats(probe: Probe) -> Option<&'static mut ProbeStats> {
    // SAFETY: per-CPU storage, only touched by programs running on this CPU.
    PROBE_STATS
        .get_ptr_mut(probe as u32)
        .map(|p| unsafe { &mut *p })
}

/// Counts one handled event for `probe`.
#[inline(always)]
pub fn count_event(probe: Probe) {
    if let Some(s) = stats(probe) {
        s.events += 1;
    }
}

/// Counts a [`FAULTS`] entry created or removed.
#[inline(always)]
pub fn count_fault_entry(which: FaultEntryCount) {
    if let Some(count) = FAULT_ENTRIES.get_ptr_mut(which as u32) {
        // SAFETY: per-CPU storage, only touched by programs running on this CPU.
        unsafe { *count += 1 };
    }
}

/// Counts a failed map update for `probe`.
#[inline(always)]
pub fn count_map_drop(probe: Probe) {
    if let Some(s) = stats(probe) {
        s.map_drops += 1;
    }
}

/// The current bucket epoch.
#[inline(always)]
pub fn bucket_epoch() -> u64 {
    BUCKET_EPOCH.get(0).copied().unwrap_or(0)
}

/// Announces that some process's file buckets changed, so fault probes re-check their gate.
#[inline(always)]
pub fn bump_bucket_epoch() {
    if let Some(epoch) = BUCKET_EPOCH.get_ptr_mut(0) {
        // SAFETY: a valid map value pointer; the update is atomic.
        unsafe { crate::kernel::atomic_add(epoch, 1) };
    }
}

/// The process's syscall accounting, created on first use.
#[inline(always)]
pub fn proc_memory(tgid: u32, probe: Probe) -> Option<&'static mut ProcMemory> {
    if let Some(p) = PROC_MEMORY.get_ptr_mut(tgid) {
        // SAFETY: a valid map value pointer; shared fields are updated atomically.
        return Some(unsafe { &mut *p });
    }
    if PROC_MEMORY
        .insert(tgid, ProcMemory::default(), BPF_NOEXIST as u64)
        .is_err()
    {
        // Either another CPU created it just now (fine), or the map is full.
        if PROC_MEMORY.get_ptr_mut(tgid).is_none() {
            count_map_drop(probe);
            return None;
        }
    }
    PROC_MEMORY.get_ptr_mut(tgid).map(|p| unsafe { &mut *p })
}

/// The current task's `comm`.
#[inline(always)]
pub fn current_comm() -> [u8; 16] {
    bpf_get_current_comm().unwrap_or([0; 16])
}

/// Sends a rare event to the agent on [`EVENTS`]; counts a drop if the ring buffer is full.
/// Not inlined, so that its branches do not multiply the verifier's paths through every caller.
#[inline(never)]
pub fn emit(probe: Probe, kind: EventKind, tgid: u32, args: [u64; 6], comm: [u8; 16]) {
    emit_to(&EVENTS, probe, kind, tgid, args, comm);
}

/// Sends an OOM kill to the agent on its own ring buffer, [`OOM_EVENTS`].
#[inline(never)]
pub fn emit_oom(tgid: u32, args: [u64; 6], comm: [u8; 16]) {
    emit_to(
        &OOM_EVENTS,
        Probe::OomVictim,
        EventKind::OomVictim,
        tgid,
        args,
        comm,
    );
}

#[inline(always)]
fn emit_to(
    ring: &RingBuf,
    probe: Probe,
    kind: EventKind,
    tgid: u32,
    args: [u64; 6],
    comm: [u8; 16],
) {
    let Some(mut entry) = ring.reserve::<Event>(0) else {
        if let Some(s) = stats(probe) {
            s.ringbuf_drops += 1;
        }
        return;
    };
    entry.write(Event {
        kind: kind as u32,
        tgid,
        // SAFETY: a helper with no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        args,
        comm,
    });
    entry.submit(0);
}

/// Removes per-process state when a process exits or execs a new image; returns whether it
/// had file buckets.
#[inline(always)]
pub fn forget_process_memory(tgid: u32) -> bool {
    let had_buckets = PROC_MEMORY
        .get_ptr(tgid)
        // SAFETY: a valid map value pointer.
        .is_some_and(|p| unsafe { (*p).file_buckets } > 0);
    if had_buckets {
        crate::buckets::remove_all(tgid);
        bump_bucket_epoch();
    }
    let _ = PROC_MEMORY.remove(tgid);
    had_buckets
}

/// The key of the bucket holding `addr` in process `tgid`.
#[inline(always)]
pub fn bucket_key(tgid: u32, addr: u64) -> BucketKey {
    BucketKey {
        tgid,
        _pad: 0,
        bucket: addr >> infermem_common::BUCKET_SHIFT,
    }
}

/// The file bucket holding `addr`, if `addr` lies inside a large file mapping.
#[inline(always)]
pub fn file_bucket_at(tgid: u32, addr: u64) -> Option<&'static mut FileBucket> {
    let bucket = FILE_BUCKETS.get_ptr_mut(bucket_key(tgid, addr))?;
    // SAFETY: a valid map value pointer; `faults` is updated atomically.
    let bucket = unsafe { &mut *bucket };
    (bucket.start <= addr && addr < bucket.end).then_some(bucket)
}

//! Types shared by infermem's kernel probes (`infermem-ebpf`) and the userspace agent.
//!
//! Everything here is `#[repr(C)]` plain data: the probes write it into BPF maps and the ring
//! buffer, and the agent reads the same bytes back. The kernel side aggregates; only rare
//! events (large mappings, exec, exit of a process with model mappings, OOM kills) travel on
//! the ring buffer.
#![no_std]

/// Fault attribution works on 2 MiB buckets of the address space: `addr >> BUCKET_SHIFT`.
pub const BUCKET_SHIFT: u32 = 21;

/// File mappings at least this large get per-bucket fault attribution and a ring-buffer event;
/// anonymous mappings and heap changes at least this large get an event.
pub const LARGE_MAPPING_BYTES: u64 = 1 << 20;

/// Who gets fault buckets: only file mappings large enough to be model files, and only up to
/// a quota per process, so that no process (a single sparse mmap of a huge file) can fill the
/// host-wide bucket map. Set by the agent before loading; mappings refused for the quota are
/// counted ([`ProbeStats::over_quota`], [`ProcMemory::mappings_over_quota`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketPolicy {
    /// File mappings smaller than this get no buckets (their faults count as "other").
    /// Mappings below [`LARGE_MAPPING_BYTES`] never do.
    pub min_mapping_bytes: u64,
    /// The most buckets one process may own; a mapping that would pass it gets none.
    pub max_per_process: u64,
}

impl BucketPolicy {
    /// For watching the whole host: model weights are files of tens of MiB at the very least
    /// (a 4-bit 100M-parameter model is about 60 MiB), while the libraries every process maps
    /// (ld.so reserves a library's whole span with one file mmap) are mostly smaller, so
    /// 64 MiB keeps buckets for models. 65 536 buckets (128 GiB of mapped files) per process
    /// fits the largest quantised models run on one host, and caps any one process at a
    /// quarter of the 256 Ki-bucket map.
    pub const HOST: BucketPolicy = BucketPolicy {
        min_mapping_bytes: 64 << 20,
        max_per_process: 1 << 16,
    };
}

/// The most buckets one mapping may claim (2^20 buckets = 2 TiB), bounding the insert loop.
pub const MAX_BUCKETS_PER_MAPPING: u32 = 1 << 20;

/// Names of the BPF maps, as the agent looks them up.
pub mod map_names {
    /// Per-process fault counters ([`crate::FaultEntry`]), keyed by tgid; an LRU map.
    pub const FAULTS: &str = "FAULTS";
    /// Per-CPU counts of [`map_names::FAULTS`] entries created and removed, indexed by
    /// [`crate::FaultEntryCount`]: with the live entries, they give the evictions.
    pub const FAULT_ENTRIES: &str = "FAULT_ENTRIES";
    /// Per-CPU [`crate::FaultCache`] (one entry).
    pub const FAULT_CACHE: &str = "FAULT_CACHE";
    /// Per-process syscall accounting ([`crate::ProcMemory`]), keyed by tgid.
    pub const PROC_MEMORY: &str = "PROC_MEMORY";
    /// Large file mappings by 2 MiB bucket ([`crate::BucketKey`] -> [`crate::FileBucket`]).
    pub const FILE_BUCKETS: &str = "FILE_BUCKETS";
    /// Syscall arguments saved on entry until the matching exit, keyed by thread id.
    pub const SYSCALL_ARGS: &str = "SYSCALL_ARGS";
    /// Per-CPU [`crate::ProbeStats`], indexed by [`crate::Probe`].
    pub const PROBE_STATS: &str = "PROBE_STATS";
    /// One `u64` that changes whenever any process gains or loses file buckets.
    pub const BUCKET_EPOCH: &str = "BUCKET_EPOCH";
    /// The ring buffer carrying [`crate::Event`]s other than OOM kills.
    pub const EVENTS: &str = "EVENTS";
    /// The ring buffer carrying only [`crate::EventKind::OomVictim`] events, so that a flood
    /// of other events can never drop an OOM kill.
    pub const OOM_EVENTS: &str = "OOM_EVENTS";
    /// The NVIDIA fds of every process ([`crate::NvidiaFdKey`] -> [`crate::nvidia_fd`] kind),
    /// learned from open and close by the probes and seeded by the agent from `/proc/*/fd`.
    pub const NVIDIA_FDS: &str = "NVIDIA_FDS";
    /// The ring buffer carrying [`crate::GpuIoctl`] records.
    pub const GPU_EVENTS: &str = "GPU_EVENTS";
    /// Per-CPU [`crate::GpuProbeStats`] (one entry).
    pub const GPU_STATS: &str = "GPU_STATS";
}

/// Names of the globals the agent sets before loading.
pub mod global_names {
    /// [`crate::KernelOffsets`] resolved from the running kernel's BTF.
    pub const KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
    /// [`crate::SyscallNumbers`] of the running architecture.
    pub const SYSCALL_NUMBERS: &str = "SYSCALL_NUMBERS";
    /// The [`crate::BucketPolicy`].
    pub const BUCKET_POLICY: &str = "BUCKET_POLICY";
}

/// Per-process fault counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    /// All user-mode page faults (`exceptions:page_fault_user`).
    pub faults: u64,
    /// Faults whose address lies in a large file mapping (a model file, typically).
    pub file_faults: u64,
}

/// A process's entry in [`map_names::FAULTS`]. The map is an LRU: an entry evicted (a full
/// map, a fork storm) is re-created from zero at the process's next fault, and its new
/// `created_ns` tells a reader that the counters restarted rather than went down.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultEntry {
    pub counters: FaultCounters,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the entry was created.
    pub created_ns: u64,
}

/// Indexes of [`map_names::FAULT_ENTRIES`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultEntryCount {
    /// Entries created (a process's first fault, or its first after an eviction).
    Created = 0,
    /// Entries removed when their process died.
    Removed = 1,
}

/// Each CPU's fault counts for the process that faulted last on it. Faults come in bursts
/// from one process, so the fault probe only touches this per-CPU array (an inlined lookup)
/// and folds the counts into [`map_names::FAULTS`] when another process faults on the CPU.
/// Userspace adds the caches that hold a process to its [`FaultCounters`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCache {
    /// The process whose faults are pending here (0 = none).
    pub tgid: u32,
    pub _pad: u32,
    /// Faults not yet folded into the process's [`FaultCounters`].
    pub pending: FaultCounters,
    /// The [`map_names::BUCKET_EPOCH`] value when `has_file_buckets` was last refreshed.
    pub seen_epoch: u64,
    /// Whether the process had file buckets at `seen_epoch` (0 or 1): gates the bucket lookup.
    pub has_file_buckets: u64,
}

/// Per-process memory syscall accounting, shared across CPUs (updated with atomics).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcMemory {
    /// Program break after the last successful `brk`, 0 until one is seen.
    pub brk_last: u64,
    /// Number of [`FileBucket`] entries this process owns.
    pub file_buckets: u64,
    pub mmap_calls: u64,
    pub munmap_calls: u64,
    pub mremap_calls: u64,
    pub brk_calls: u64,
    /// Bytes of successful anonymous (incl. shared anonymous) `mmap`s.
    pub mmap_anon_bytes: u64,
    /// Bytes of successful file-backed `mmap`s.
    pub mmap_file_bytes: u64,
    /// Bytes of successful `munmap`s.
    pub munmap_bytes: u64,
    /// Growth and shrinkage through `mremap`.
    pub mremap_grow_bytes: u64,
    pub mremap_shrink_bytes: u64,
    /// Growth and shrinkage of the heap through `brk`.
    pub brk_grow_bytes: u64,
    pub brk_shrink_bytes: u64,
    /// Memory syscalls that returned an error.
    pub failed_calls: u64,
    /// Large file mappings given no buckets because the process's quota was used up.
    pub mappings_over_quota: u64,
}

/// Key of [`map_names::FILE_BUCKETS`]: a process and a 2 MiB bucket of its address space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub tgid: u32,
    pub _pad: u32,
    /// `address >> BUCKET_SHIFT`.
    pub bucket: u64,
}

/// The large file mapping covering a bucket, and the faults taken inside it in this bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileBucket {
    /// Start and end (exclusive) of the file mapping this bucket belongs to.
    pub start: u64,
    pub end: u64,
    /// Faults in `[start, end)` within this bucket (updated atomically).
    pub faults: u64,
}

/// Syscall arguments saved at `sys_enter` for use at `sys_exit`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallArgs {
    pub nr: u64,
    pub args: [u64; 6],
}

/// The probes, as indexes of [`map_names::PROBE_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    SysEnter = 0,
    SysExit = 1,
    PageFault = 2,
    Exec = 3,
    Fork = 4,
    Exit = 5,
    OomVictim = 6,
}

impl Probe {
    /// Every probe, in index order.
    pub const ALL: [Probe; 7] = [
        Probe::SysEnter,
        Probe::SysExit,
        Probe::PageFault,
        Probe::Exec,
        Probe::Fork,
        Probe::Exit,
        Probe::OomVictim,
    ];

    /// The kernel tracepoint the probe attaches to (BTF-enabled raw tracepoint name).
    pub const fn tracepoint(self) -> &'static str {
        match self {
            Probe::SysEnter => "sys_enter",
            Probe::SysExit => "sys_exit",
            Probe::PageFault => "page_fault_user",
            Probe::Exec => "sched_process_exec",
            Probe::Fork => "sched_process_fork",
            Probe::Exit => "sched_process_exit",
            Probe::OomVictim => "mark_victim",
        }
    }

    /// The BPF program implementing the probe (for `mark_victim`, its `(task, uid)` form; see
    /// [`MARK_VICTIM_PID_PROGRAM`]).
    pub const fn program(self) -> &'static str {
        match self {
            Probe::SysEnter => "sys_enter",
            Probe::SysExit => "sys_exit",
            Probe::PageFault => "page_fault_user",
            Probe::Exec => "sched_process_exec",
            Probe::Fork => "sched_process_fork",
            Probe::Exit => "sched_process_exit",
            Probe::OomVictim => "mark_victim",
        }
    }
}

/// The program for `mark_victim(int pid)`, its prototype before Linux 6.8 (and 6.1.133).
pub const MARK_VICTIM_PID_PROGRAM: &str = "mark_victim_pid";

/// Per-probe health counters (per CPU; userspace sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeStats {
    /// Times the probe ran and handled an event of interest.
    pub events: u64,
    /// Ring-buffer events lost because the buffer was full.
    pub ringbuf_drops: u64,
    /// Map updates that failed (map full, or out of memory): state that was not recorded.
    pub map_drops: u64,
    /// Syscall exits with no saved entry (the probe attached mid-call, or the entry was evicted).
    pub unmatched: u64,
    /// File mappings refused fault buckets because their process would pass its quota
    /// ([`BucketPolicy::max_per_process`]).
    pub over_quota: u64,
}

/// Field offsets inside kernel structures, resolved by the agent from the running kernel's
/// BTF and handed to the probes as a global: the Rust eBPF toolchain has no CO-RE relocations.
/// An offset of [`KernelOffsets::MISSING`] means the field does not exist on this kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.tgid`.
    pub task_tgid: u32,
    /// `task_struct.comm`.
    pub task_comm: u32,
    /// `task_struct.mm`.
    pub task_mm: u32,
    /// `task_struct.signal`.
    pub task_signal: u32,
    /// `task_struct.cgroups`.
    pub task_cgroups: u32,
    /// `signal_struct.oom_score_adj`.
    pub signal_oom_score_adj: u32,
    /// Offsets inside `mm_struct` of the RSS counters (file, anon, swap entries, shmem),
    /// each a signed 64-bit page count.
    pub mm_rss: [u32; 4],
    /// Offset inside `css_set` of `subsys[memory_cgrp_id]`.
    pub css_set_memory_subsys: u32,
    /// `cgroup_subsys_state.cgroup`.
    pub css_cgroup: u32,
    /// `cgroup.kn`.
    pub cgroup_kn: u32,
    /// `kernfs_node.id`.
    pub kernfs_node_id: u32,
    /// 1 if `sched_process_exit` carries a `group_dead` argument (Linux 6.16+).
    pub exit_has_group_dead: u32,
    /// `task_struct.pid` (the thread id), which `mark_victim(int pid)` carries.
    pub task_pid: u32,
    /// `task_struct.group_leader`.
    pub task_group_leader: u32,
    /// `task_struct.start_boottime` (CLOCK_BOOTTIME ns at fork), which `/proc/<pid>/stat`
    /// field 22 shows in clock ticks.
    pub task_start_boottime: u32,
}

impl KernelOffsets {
    /// Marks a field the running kernel does not have.
    pub const MISSING: u32 = u32::MAX;

    /// Offsets with every field missing: the probes then report only what needs no offsets.
    pub const UNKNOWN: KernelOffsets = KernelOffsets {
        task_tgid: Self::MISSING,
        task_comm: Self::MISSING,
        task_mm: Self::MISSING,
        task_signal: Self::MISSING,
        task_cgroups: Self::MISSING,
        signal_oom_score_adj: Self::MISSING,
        mm_rss: [Self::MISSING; 4],
        css_set_memory_subsys: Self::MISSING,
        css_cgroup: Self::MISSING,
        cgroup_kn: Self::MISSING,
        kernfs_node_id: Self::MISSING,
        exit_has_group_dead: 0,
        task_pid: Self::MISSING,
        task_group_leader: Self::MISSING,
        task_start_boottime: Self::MISSING,
    };
}

/// Syscall numbers of the running architecture, set by the agent before loading.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallNumbers {
    pub mmap: u64,
    pub munmap: u64,
    pub mremap: u64,
    pub brk: u64,
    /// The NVIDIA probes: `ioctl` on NVIDIA fds, and the calls that create and drop those fds.
    pub ioctl: u64,
    pub openat: u64,
    /// [`SyscallNumbers::ABSENT`] where the architecture has no such call (aarch64).
    pub open: u64,
    pub close: u64,
    pub dup: u64,
    /// [`SyscallNumbers::ABSENT`] on aarch64.
    pub dup2: u64,
    pub dup3: u64,
}

impl SyscallNumbers {
    /// Marks a syscall the architecture does not have.
    pub const ABSENT: u64 = u64::MAX;

    /// x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl).
    pub const X86_64: SyscallNumbers = SyscallNumbers {
        mmap: 9,
        munmap: 11,
        mremap: 25,
        brk: 12,
        ioctl: 16,
        openat: 257,
        open: 2,
        close: 3,
        dup: 32,
        dup2: 33,
        dup3: 292,
    };
    /// aarch64 numbers (include/uapi/asm-generic/unistd.h).
    pub const AARCH64: SyscallNumbers = SyscallNumbers {
        mmap: 222,
        munmap: 215,
        mremap: 216,
        brk: 214,
        ioctl: 29,
        openat: 56,
        open: Self::ABSENT,
        close: 57,
        dup: 23,
        dup2: Self::ABSENT,
        dup3: 24,
    };
}

/// What an NVIDIA fd is open on, as [`map_names::NVIDIA_FDS`] stores it (a `u32`).
pub mod nvidia_fd {
    /// `/dev/nvidiactl`, where RM clients and most RM objects are made.
    pub const CTL: u32 = 1;
    /// `/dev/nvidia-uvm` (unified memory: its ioctls map address ranges and carry no sizes).
    pub const UVM: u32 = 2;
    /// `/dev/nvidiaN` is `DEVICE + N`.
    pub const DEVICE: u32 = 0x100;
    /// The highest `N` of `/dev/nvidiaN` the probes recognise.
    pub const MAX_DEVICE_MINOR: u32 = 254;
}

/// Key of [`map_names::NVIDIA_FDS`]: a process and one of its fds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NvidiaFdKey {
    pub tgid: u32,
    pub fd: u32,
}

/// The largest RM parameter block the probes copy: NVOS32 (`NV_ESC_RM_VID_HEAP_CONTROL`),
/// 184 bytes on x86_64 in every driver from 515 to 595.
pub const GPU_PARAMS_MAX: usize = 184;

/// The most bytes of an `NV_ESC_RM_ALLOC` call's allocation parameters (`pAllocParms`) the
/// probes copy: `NV_MEMORY_ALLOCATION_PARAMS` is 120 bytes up to 535 and 128 from 545.
pub const GPU_ALLOC_PARAMS_MAX: usize = 128;

/// One successful `ioctl` on an NVIDIA fd whose command is an RM escape the agent decodes
/// (alloc, free, dup, vid-heap control, alloc-memory), copied at syscall exit and sent on
/// [`map_names::GPU_EVENTS`]. The kernel side does not interpret the bytes: the agent decodes
/// them with the layout of the running driver version.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuIoctl {
    /// The calling process.
    pub tgid: u32,
    /// The fd's [`nvidia_fd`] kind.
    pub fd_kind: u32,
    /// The ioctl command (`_IOWR('F', nr, size)`); for `NV_ESC_IOCTL_XFER_CMD`, the command
    /// it carries, whose parameters are then those at the transfer's pointer.
    pub cmd: u32,
    /// The ioctl's return value (0 even when RM refused: RM's verdict is in the parameters).
    pub ret: i32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at syscall exit.
    pub time_ns: u64,
    /// Bytes of `params` copied (the command's size, at most [`GPU_PARAMS_MAX`]); 0 when
    /// the caller's memory could not be read.
    pub params_len: u32,
    /// Bytes of `alloc_params` copied, for `NV_ESC_RM_ALLOC` only (0 otherwise or when
    /// unreadable).
    pub alloc_params_len: u32,
    /// The parameter block as the driver left it in the caller's memory.
    pub params: [u8; GPU_PARAMS_MAX],
    /// The start of the allocation parameters `pAllocParms` points to, for `NV_ESC_RM_ALLOC`.
    pub alloc_params: [u8; GPU_ALLOC_PARAMS_MAX],
}

/// Health counters of the NVIDIA probes (per CPU; userspace sums), in
/// [`map_names::GPU_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuProbeStats {
    /// `ioctl`s seen on NVIDIA fds (any command).
    pub ioctls: u64,
    /// [`GpuIoctl`] records sent.
    pub sent: u64,
    /// Records lost because [`map_names::GPU_EVENTS`] was full: GPU figures are then
    /// incomplete, and the agent says so.
    pub ringbuf_drops: u64,
    /// Parameter blocks that could not be read from the caller's memory.
    pub read_failures: u64,
    /// NVIDIA fds learned from `open`/`openat`/`dup*`, and forgotten at `close`.
    pub fds_opened: u64,
    pub fds_closed: u64,
    /// [`map_names::NVIDIA_FDS`] updates that failed.
    pub map_drops: u64,
}

/// `mmap` flags the probes look at (identical on x86_64 and aarch64).
pub mod mmap_flags {
    pub const MAP_SHARED: u64 = 0x01;
    pub const MAP_ANONYMOUS: u64 = 0x20;
}

/// A rare event sent from the probes to the agent on the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened, an [`EventKind`] as `u32` (raw, so any bytes decode safely); selects
    /// the meaning of [`Event::args`].
    pub kind: u32,
    /// The process the event is about.
    pub tgid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when it happened.
    pub time_ns: u64,
    /// Kind-specific values, documented on each [`EventKind`] variant.
    pub args: [u64; 6],
    /// The task's `comm` (for `Exec`, `Exit` and `OomVictim`; zeroes otherwise).
    pub comm: [u8; 16],
}

/// The kinds of [`Event`]. Argument layout per kind is given as `args[0..]`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A large `mmap` succeeded: `[addr, len, prot, flags, fd, pgoff]`; fd is -1 (as u64) for
    /// anonymous memory.
    Mmap = 1,
    /// A large `munmap` succeeded: `[addr, len]`.
    Munmap = 2,
    /// An `mremap` moved or resized a large region: `[old_addr, old_len, new_addr, new_len]`.
    Mremap = 3,
    /// The heap grew or shrank by a large step through `brk`: `[old_brk, new_brk]`.
    Brk = 4,
    /// A process (any process) exec'd a new program: `[start_boottime_ns, memcg_kernfs_id]`.
    /// The start time is the thread group leader's `start_boottime`, unchanged by the exec.
    Exec = 5,
    /// A process with large file mappings forked: `[child_tgid]`.
    Fork = 6,
    /// A process (any process) exited, its whole thread group dead:
    /// `[start_boottime_ns, memcg_kernfs_id, had_file_buckets (0 or 1)]`.
    Exit = 7,
    /// The OOM killer chose this process (on its own ring buffer): `[memcg_kernfs_id, rss_file_pages, rss_anon_pages,
    /// swap_pages, rss_shmem_pages, oom_score_adj (i64 as u64)]`. Unknown values are u64::MAX.
    OomVictim = 8,
}

impl EventKind {
    /// Decodes a kind read from the ring buffer.
    pub const fn from_u32(raw: u32) -> Option<EventKind> {
        Some(match raw {
            1 => EventKind::Mmap,
            2 => EventKind::Munmap,
            3 => EventKind::Mremap,
            4 => EventKind::Brk,
            5 => EventKind::Exec,
            6 => EventKind::Fork,
            7 => EventKind::Exit,
            8 => EventKind::OomVictim,
            _ => return None,
        })
    }
}

/// Marks an unknown value in [`Event::args`].
pub const UNKNOWN_VALUE: u64 = u64::MAX;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] structs of plain integers with explicit padding.
    unsafe impl aya::Pod for FaultCounters {}
    unsafe impl aya::Pod for FaultCache {}
    unsafe impl aya::Pod for FaultEntry {}
    unsafe impl aya::Pod for ProcMemory {}
    unsafe impl aya::Pod for BucketKey {}
    unsafe impl aya::Pod for FileBucket {}
    unsafe impl aya::Pod for SyscallArgs {}
    unsafe impl aya::Pod for ProbeStats {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for SyscallNumbers {}
    unsafe impl aya::Pod for BucketPolicy {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for NvidiaFdKey {}
    unsafe impl aya::Pod for GpuIoctl {}
    unsafe impl aya::Pod for GpuProbeStats {}
}

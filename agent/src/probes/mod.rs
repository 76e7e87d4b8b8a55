//! The kernel probes, from userspace: load and attach them with aya, then read their maps.
//!
//! [`Probes::load`] checks what it needs first (privileges, BTF), so that a missing feature is
//! a clear [`ProbeError`] rather than a verifier log. Each probe then loads and attaches on its
//! own: a probe this kernel cannot run is listed in [`Probes::unavailable`] and turns off only
//! the features that depend on it ([`lost_features`]).

mod batch;
pub mod events;
pub mod nvidia;
pub mod offsets;

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{Array, HashMap, IterableMap as _, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use infermem_common::{
    BUCKET_SHIFT, BucketKey, BucketPolicy, FaultCache, FaultCounters, FaultEntry, FaultEntryCount,
    FileBucket, KernelOffsets, Probe, ProbeStats, ProcMemory, SyscallArgs, SyscallNumbers,
    global_names, map_names,
};

pub use events::{EventDetail, KernelEvent, OomVictim, ProcessInfo};
pub use offsets::MarkVictim;

/// The compiled probes, built by `build.rs` from `ebpf/infermem-ebpf`.
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/infermem-ebpf"));

/// Where the running kernel publishes its BTF.
pub const DEFAULT_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Why the probes could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "no kernel BTF at {path}: infermem's probes attach through BTF (CONFIG_DEBUG_INFO_BTF=y) ({reason})"
    )]
    NoBtf { path: PathBuf, reason: String },
    #[error("not permitted to load eBPF programs: {0}")]
    NotPermitted(String),
    #[error("unsupported architecture {0}: the probes know syscall numbers for x86_64 and aarch64")]
    Architecture(&'static str),
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("loading or attaching the {probe} probe (tracepoint {tracepoint}): {source}")]
    Program {
        probe: &'static str,
        tracepoint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the eBPF object has no usable map {0}")]
    Map(&'static str),
    #[error(
        "the kernel's {0} tracepoint is missing from its BTF or has a prototype the probes do not know"
    )]
    Prototype(&'static str),
    #[error("no probe could be attached: {0}")]
    NoneAttached(String),
}

/// Options for [`Probes::load`].
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Kernel BTF to resolve tracepoints and structure offsets with.
    pub btf_path: PathBuf,
    /// Which file mappings get fault buckets; [`BucketPolicy::HOST`] by default.
    pub buckets: BucketPolicy,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            btf_path: PathBuf::from(DEFAULT_BTF_PATH),
            buckets: BucketPolicy::HOST,
        }
    }
}

/// Counts of live entries in the per-process maps (to show nothing leaks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapOccupancy {
    pub fault_counters: usize,
    pub proc_memory: usize,
    pub file_buckets: usize,
    pub syscall_args: usize,
}

/// The loaded and attached probes, and typed handles on their maps.
pub struct Probes {
    /// Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
    faults: HashMap<MapData, u32, FaultEntry>,
    fault_entries: PerCpuArray<MapData, u64>,
    fault_cache: PerCpuArray<MapData, FaultCache>,
    memory: HashMap<MapData, u32, ProcMemory>,
    buckets: HashMap<MapData, BucketKey, FileBucket>,
    syscall_args: HashMap<MapData, u32, SyscallArgs>,
    epoch: Array<MapData, u64>,
    stats: PerCpuArray<MapData, ProbeStats>,
    events: Option<(RingBuf<MapData>, RingBuf<MapData>, RingBuf<MapData>)>,
    nvidia: nvidia::NvidiaMaps,
    offsets: KernelOffsets,
    mark_victim: Option<MarkVictim>,
    unavailable: Vec<(Probe, String)>,
}

/// What the running kernel's BTF says, for loading the probes.
struct KernelBtf {
    aya: Btf,
    offsets: KernelOffsets,
    mark_victim: Option<MarkVictim>,
}

impl Probes {
    /// Checks privileges and BTF, loads the probes and attaches each one the kernel can run;
    /// fails only if none can be.
    pub fn load(options: &ProbeOptions) -> Result<Probes, ProbeError> {
        check_privileges()?;
        let syscalls = syscall_numbers()?;
        let kernel = load_btf(&options.btf_path)?;

        let mut ebpf = EbpfLoader::new()
            .btf(Some(&kernel.aya))
            .override_global(global_names::KERNEL_OFFSETS, &kernel.offsets, true)
            .override_global(global_names::SYSCALL_NUMBERS, &syscalls, true)
            .override_global(global_names::BUCKET_POLICY, &options.buckets, true)
            .load(PROBES_OBJECT)
            .map_err(|e| ProbeError::Load(Box::new(e)))?;

        let unavailable: Vec<(Probe, String)> = Probe::ALL
            .into_iter()
            .filter_map(|probe| {
                let error = attach(&mut ebpf, &kernel, probe).err()?;
                Some((probe, error.to_string()))
            })
            .collect();
        if unavailable.len() == Probe::ALL.len() {
            let reasons: Vec<&str> = unavailable.iter().map(|(_, e)| e.as_str()).collect();
            return Err(ProbeError::NoneAttached(reasons.join("; ")));
        }

        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(ProbeError::Map(name));
        let faults = HashMap::try_from(take(map_names::FAULTS)?)
            .map_err(|_| ProbeError::Map(map_names::FAULTS))?;
        let fault_entries = PerCpuArray::try_from(take(map_names::FAULT_ENTRIES)?)
            .map_err(|_| ProbeError::Map(map_names::FAULT_ENTRIES))?;
        let fault_cache = PerCpuArray::try_from(take(map_names::FAULT_CACHE)?)
            .map_err(|_| ProbeError::Map(map_names::FAULT_CACHE))?;
        let memory = HashMap::try_from(take(map_names::PROC_MEMORY)?)
            .map_err(|_| ProbeError::Map(map_names::PROC_MEMORY))?;
        let buckets = HashMap::try_from(take(map_names::FILE_BUCKETS)?)
            .map_err(|_| ProbeError::Map(map_names::FILE_BUCKETS))?;
        let syscall_args = HashMap::try_from(take(map_names::SYSCALL_ARGS)?)
            .map_err(|_| ProbeError::Map(map_names::SYSCALL_ARGS))?;
        let epoch = Array::try_from(take(map_names::BUCKET_EPOCH)?)
            .map_err(|_| ProbeError::Map(map_names::BUCKET_EPOCH))?;
        let stats = PerCpuArray::try_from(take(map_names::PROBE_STATS)?)
            .map_err(|_| ProbeError::Map(map_names::PROBE_STATS))?;
        let events = RingBuf::try_from(take(map_names::EVENTS)?)
            .map_err(|_| ProbeError::Map(map_names::EVENTS))?;
        let oom_events = RingBuf::try_from(take(map_names::OOM_EVENTS)?)
            .map_err(|_| ProbeError::Map(map_names::OOM_EVENTS))?;
        let gpu_events = RingBuf::try_from(take(map_names::GPU_EVENTS)?)
            .map_err(|_| ProbeError::Map(map_names::GPU_EVENTS))?;
        let nvidia = nvidia::NvidiaMaps {
            fds: HashMap::try_from(take(map_names::NVIDIA_FDS)?)
                .map_err(|_| ProbeError::Map(map_names::NVIDIA_FDS))?,
            stats: PerCpuArray::try_from(take(map_names::GPU_STATS)?)
                .map_err(|_| ProbeError::Map(map_names::GPU_STATS))?,
        };
        Ok(Probes {
            _ebpf: ebpf,
            faults,
            fault_entries,
            fault_cache,
            memory,
            buckets,
            syscall_args,
            epoch,
            stats,
            events: Some((events, oom_events, gpu_events)),
            nvidia,
            offsets: kernel.offsets,
            mark_victim: kernel.mark_victim,
            unavailable,
        })
    }

    /// The probes this kernel could not load or attach, with the reason for each; the
    /// features they carry are off (see [`lost_features`]).
    pub fn unavailable(&self) -> &[(Probe, String)] {
        &self.unavailable
    }

    /// Whether `probe` is attached.
    pub fn attached(&self, probe: Probe) -> bool {
        !self.unavailable.iter().any(|(p, _)| *p == probe)
    }

    /// The `mark_victim` prototype of this kernel, which chose the OOM probe's program.
    pub fn mark_victim(&self) -> Option<MarkVictim> {
        self.mark_victim
    }

    /// The structure offsets the probes were given.
    pub fn kernel_offsets(&self) -> &KernelOffsets {
        &self.offsets
    }

    /// Fault counters of `tgid`, including counts still cached per CPU, and when they were
    /// created: two readings with different `created_ns` straddle an eviction (the counters
    /// restarted from zero then). None if the process has not faulted since the probes were
    /// attached, or its entry was evicted and it has not switched CPUs since.
    pub fn fault_counters(&self, tgid: u32) -> Option<FaultEntry> {
        let folded = self.faults.get(&tgid, 0).ok()?;
        let caches = self.fault_cache.get(&0, 0).ok();
        let pending = caches
            .iter()
            .flat_map(|per_cpu| per_cpu.iter())
            .filter(|cache| cache.tgid == tgid);
        let counters = pending.fold(folded.counters, |sum, cache| FaultCounters {
            faults: sum.faults + cache.pending.faults,
            file_faults: sum.file_faults + cache.pending.file_faults,
        });
        Some(FaultEntry { counters, ..folded })
    }

    /// Fault-counter entries evicted from the LRU map so far: created − removed (at exit) −
    /// live. A snapshot of three moving counts, so it may be off by the entries created or
    /// removed while it is read.
    pub fn fault_evictions(&self) -> u64 {
        let count = |which: FaultEntryCount| -> u64 {
            self.fault_entries
                .get(&(which as u32), 0)
                .map_or(0, |per_cpu| per_cpu.iter().sum())
        };
        let live = self.faults.keys().flatten().count() as u64;
        count(FaultEntryCount::Created)
            .saturating_sub(count(FaultEntryCount::Removed))
            .saturating_sub(live)
    }

    /// Memory-syscall accounting of `tgid`, if it made a memory syscall since attach.
    pub fn proc_memory(&self, tgid: u32) -> Option<ProcMemory> {
        self.memory.get(&tgid, 0).ok()
    }

    /// Faults recorded in the buckets of `tgid` that cover each file's address ranges (the
    /// areas of one mapped file), one total per file; a bucket counts once per file even if
    /// several of its ranges share it.
    ///
    /// The bucket map is read whole, once for all the files, with `BPF_MAP_LOOKUP_BATCH`: a
    /// few syscalls for the thousands of buckets model-sized mappings hold, where a lookup per
    /// 2 MiB bucket took 20 000 syscalls for a 40 GiB model. Without batch support (before
    /// Linux 5.6), one lookup per bucket of each file's ranges.
    pub fn mapping_faults(&self, tgid: u32, files: &[&[(u64, u64)]]) -> Vec<u64> {
        let requests: Vec<(u32, &[(u64, u64)])> = files.iter().map(|r| (tgid, *r)).collect();
        self.faults_in_ranges(&requests)
    }

    /// Like [`Probes::mapping_faults`], for address ranges of several processes at once: one
    /// read of the bucket map for all of them (the agent's per-tick read of every model
    /// process).
    pub fn faults_in_ranges(&self, requests: &[(u32, &[(u64, u64)])]) -> Vec<u64> {
        let all = batch::lookup_all::<BucketKey, FileBucket>(self.buckets.map()).ok();
        requests
            .iter()
            .map(|&(tgid, ranges)| {
                let covers = |b: &FileBucket| ranges.iter().any(|&(s, e)| b.start < e && b.end > s);
                match &all {
                    Some(all) => all
                        .iter()
                        .filter(|(key, bucket)| key.tgid == tgid && covers(bucket))
                        .map(|(_, bucket)| bucket.faults)
                        .sum(),
                    None => self
                        .buckets_of(tgid, ranges)
                        .iter()
                        .filter(|b| covers(b))
                        .map(|b| b.faults)
                        .sum(),
                }
            })
            .collect()
    }

    /// The buckets of `tgid` spanned by `ranges`, one lookup each.
    fn buckets_of(&self, tgid: u32, ranges: &[(u64, u64)]) -> Vec<FileBucket> {
        let buckets: std::collections::BTreeSet<u64> = ranges
            .iter()
            .flat_map(|&(start, end)| bucket_range(start, end))
            .collect();
        buckets
            .into_iter()
            .filter_map(|bucket| self.buckets.get(&bucket_key(tgid, bucket), 0).ok())
            .collect()
    }

    /// Records an existing large file mapping of `tgid` (found in /proc at start-up), so that
    /// faults in it are attributed like those of mappings the probes saw being created.
    pub fn track_file_mapping(&mut self, tgid: u32, start: u64, end: u64) -> io::Result<()> {
        let mut added = 0;
        for bucket in bucket_range(start, end) {
            let key = bucket_key(tgid, bucket);
            if self.buckets.get(&key, 0).is_err() {
                added += 1;
            }
            let value = FileBucket {
                start,
                end,
                faults: 0,
            };
            self.buckets
                .insert(key, value, 0)
                .map_err(io::Error::other)?;
        }
        if added == 0 {
            return Ok(());
        }
        // Read-modify-write of the per-process count: the probes update it atomically, so a
        // concurrent mmap of the same process at this instant could be lost; that would only
        // leave the fault gate on longer than needed.
        let mut memory = self.memory.get(&tgid, 0).unwrap_or_default();
        memory.file_buckets += added;
        self.memory
            .insert(tgid, memory, 0)
            .map_err(io::Error::other)?;
        let epoch = self.epoch.get(&0, 0).map_err(io::Error::other)?;
        self.epoch.set(0, epoch + 1, 0).map_err(io::Error::other)
    }

    /// Health counters of each probe, summed over CPUs. Page faults still cached per CPU
    /// count as events of the fault probe.
    pub fn probe_stats(&self) -> Vec<(Probe, ProbeStats)> {
        let cached_faults: u64 = self
            .fault_cache
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().map(|c| c.pending.faults).sum())
            .unwrap_or(0);
        Probe::ALL
            .into_iter()
            .map(|probe| {
                let mut sum = self
                    .stats
                    .get(&(probe as u32), 0)
                    .map(|per_cpu| {
                        per_cpu
                            .iter()
                            .fold(ProbeStats::default(), |s, c| ProbeStats {
                                events: s.events + c.events,
                                ringbuf_drops: s.ringbuf_drops + c.ringbuf_drops,
                                map_drops: s.map_drops + c.map_drops,
                                unmatched: s.unmatched + c.unmatched,
                                over_quota: s.over_quota + c.over_quota,
                            })
                    })
                    .unwrap_or_default();
                if probe == Probe::PageFault {
                    sum.events += cached_faults;
                }
                (probe, sum)
            })
            .collect()
    }

    /// Live entries in the per-process maps; with `tgid`, only that process's entries.
    pub fn occupancy(&self, tgid: Option<u32>) -> MapOccupancy {
        let matches = |t: u32| tgid.is_none_or(|want| want == t);
        MapOccupancy {
            fault_counters: self.faults.keys().flatten().filter(|t| matches(*t)).count(),
            proc_memory: self.memory.keys().flatten().filter(|t| matches(*t)).count(),
            file_buckets: self
                .buckets
                .keys()
                .flatten()
                .filter(|k| matches(k.tgid))
                .count(),
            // Keyed by thread id: for one process, the entry of its main thread.
            syscall_args: self
                .syscall_args
                .keys()
                .flatten()
                .filter(|t| matches(*t))
                .count(),
        }
    }

    /// Takes the event ring buffers (once) for an [`EventReader`]; None if already taken or
    /// if an epoll instance cannot be created.
    pub fn take_event_reader(&mut self) -> Option<EventReader> {
        let (events, oom, gpu) = self.events.take()?;
        EventReader::new(events, oom, gpu).ok()
    }

    /// The NVIDIA probes' maps.
    pub fn nvidia(&mut self) -> &mut nvidia::NvidiaMaps {
        &mut self.nvidia
    }
}

/// Reads the probes' three ring buffers: OOM kills, which have one of their own, the NVIDIA
/// RM ioctl records, and the rest.
pub struct EventReader {
    events: RingBuf<MapData>,
    oom: RingBuf<MapData>,
    gpu: RingBuf<MapData>,
    /// An epoll instance watching the rings: readable when any is.
    epoll: std::os::fd::OwnedFd,
}

impl EventReader {
    fn new(
        events: RingBuf<MapData>,
        oom: RingBuf<MapData>,
        gpu: RingBuf<MapData>,
    ) -> io::Result<EventReader> {
        use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _};
        // SAFETY: epoll_create1 has no preconditions; the fd is owned from here on.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let epoll = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        for ring in [events.as_fd(), oom.as_fd(), gpu.as_fd()] {
            let mut interest = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: ring.as_raw_fd() as u64,
            };
            // SAFETY: both fds are open; the kernel copies `interest`.
            let rc = unsafe {
                libc::epoll_ctl(raw, libc::EPOLL_CTL_ADD, ring.as_raw_fd(), &mut interest)
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(EventReader {
            events,
            oom,
            gpu,
            epoll,
        })
    }

    /// Takes every waiting NVIDIA RM ioctl record, and the count of records too short to
    /// decode. Drain it before [`EventReader::drain`]: a process's ioctls precede its exit.
    pub fn drain_gpu(&mut self) -> (Vec<infermem_common::GpuIoctl>, usize) {
        nvidia::drain(&mut self.gpu)
    }

    /// Decodes every event waiting in both buffers, OOM kills first; undecodable records are
    /// counted, not fatal.
    pub fn drain(&mut self) -> (Vec<KernelEvent>, usize) {
        let mut decoded = Vec::new();
        let mut undecodable = 0;
        for ring in [&mut self.oom, &mut self.events] {
            while let Some(item) = ring.next() {
                match KernelEvent::decode(&item) {
                    Ok(event) => decoded.push(event),
                    Err(_) => undecodable += 1,
                }
            }
        }
        (decoded, undecodable)
    }

    /// A file descriptor that is readable when any ring buffer has events (an epoll
    /// instance), to wait on with epoll (e.g. tokio's `AsyncFd`).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.epoll.as_fd()
    }
}

fn bucket_key(tgid: u32, bucket: u64) -> BucketKey {
    BucketKey {
        tgid,
        _pad: 0,
        bucket,
    }
}

fn bucket_range(start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
    if end <= start {
        #[allow(clippy::reversed_empty_ranges)]
        return 1..=0;
    }
    (start >> BUCKET_SHIFT)..=((end - 1) >> BUCKET_SHIFT)
}

fn syscall_numbers() -> Result<SyscallNumbers, ProbeError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(SyscallNumbers::X86_64),
        "aarch64" => Ok(SyscallNumbers::AARCH64),
        other => Err(ProbeError::Architecture(other)),
    }
}

fn load_btf(path: &Path) -> Result<KernelBtf, ProbeError> {
    let no_btf = |reason: String| ProbeError::NoBtf {
        path: path.to_owned(),
        reason,
    };
    if !path.exists() {
        return Err(no_btf("the file does not exist".into()));
    }
    let aya_btf =
        Btf::parse_file(path, Endianness::default()).map_err(|e| no_btf(e.to_string()))?;
    let btf = btf_rs::Btf::from_file(path).map_err(|e| no_btf(e.to_string()))?;
    Ok(KernelBtf {
        aya: aya_btf,
        offsets: offsets::resolve(&btf),
        mark_victim: MarkVictim::detect(&btf),
    })
}

/// The program implementing `probe` on this kernel: the OOM probe's follows the prototype of
/// `mark_victim` in the kernel's BTF.
fn program_name(probe: Probe, kernel: &KernelBtf) -> Result<&'static str, ProbeError> {
    match probe {
        Probe::OomVictim => kernel
            .mark_victim
            .map(MarkVictim::program)
            .ok_or(ProbeError::Prototype(probe.tracepoint())),
        _ => Ok(probe.program()),
    }
}

fn attach(ebpf: &mut Ebpf, kernel: &KernelBtf, probe: Probe) -> Result<(), ProbeError> {
    let name = program_name(probe, kernel)?;
    let fail = |source: aya::programs::ProgramError| ProbeError::Program {
        probe: name,
        tracepoint: probe.tracepoint(),
        source: Box::new(source),
    };
    let program: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(ProbeError::Map(name))?
        .try_into()
        .map_err(fail)?;
    program
        .load(probe.tracepoint(), &kernel.aya)
        .map_err(fail)?;
    program.attach().map_err(fail)?;
    Ok(())
}

/// What is off when `probe` is unavailable.
pub fn lost_features(probe: Probe) -> &'static str {
    match probe {
        Probe::SysEnter | Probe::SysExit => {
            "no mmap/munmap/mremap/brk accounting or allocation events, and no fault attribution \
             to file mappings made after the probes attached"
        }
        Probe::PageFault => {
            "no fault attribution without page_fault_user: fault totals come from procfs, \
             per-mapping faults and the file/anonymous split are unknown"
        }
        Probe::Exec | Probe::Exit => {
            "map entries of exited or re-executed processes are not reclaimed (the maps fill up)"
        }
        Probe::Fork => "no fork events of processes with large file mappings",
        Probe::OomVictim => "OOM kills are not captured (no victim pid, memcg or RSS)",
    }
}

/// Loading tracing programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN).
pub fn check_privileges() -> Result<(), ProbeError> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let caps = effective_capabilities()
        .map_err(|e| ProbeError::NotPermitted(format!("cannot read our capabilities: {e}")))?;
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    Err(ProbeError::NotPermitted(format!(
        "running as uid {uid} without CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN (run as root, or grant \
         them with `setcap cap_bpf,cap_perfmon+ep`)"
    )))
}

/// The effective capability set of this process (`CapEff` in /proc/self/status).
pub fn effective_capabilities() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Touches `pages` fresh anonymous pages (one fault each).
    fn fault_pages(pages: usize) {
        let len = pages * 4096;
        // SAFETY: a private anonymous mapping we unmap below.
        let block = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(block, libc::MAP_FAILED);
        // SAFETY: advice on, writes into, and unmapping of the mapping we own.
        unsafe {
            assert_eq!(libc::madvise(block, len, libc::MADV_NOHUGEPAGE), 0);
            for page in 0..pages {
                std::ptr::write_volatile((block as *mut u8).add(page * 4096), 1);
            }
            libc::munmap(block, len);
        }
    }

    /// The batch read returns every bucket (here: 5 000 of a made-up process, more than one
    /// chunk), which `mapping_faults` then filters.
    #[test]
    fn a_batch_read_returns_every_bucket() {
        let mut probes = Probes::load(&ProbeOptions::default()).expect("probes load as root");
        let tgid = u32::MAX - 7;
        let start = 1u64 << 40;
        let end = start + (5000u64 << BUCKET_SHIFT);
        probes.track_file_mapping(tgid, start, end).unwrap();
        let all = batch::lookup_all::<BucketKey, FileBucket>(probes.buckets.map()).unwrap();
        let ours: Vec<_> = all.iter().filter(|(k, _)| k.tgid == tgid).collect();
        assert_eq!(ours.len(), 5000);
        assert!(ours.iter().all(|(_, b)| (b.start, b.end) == (start, end)));
        assert_eq!(probes.mapping_faults(tgid, &[&[(start, end)]]), [0]);
        for bucket in bucket_range(start, end) {
            probes.buckets.remove(&bucket_key(tgid, bucket)).unwrap();
        }
        let _ = probes.memory.remove(&tgid);
    }

    /// An entry that leaves the LRU map (removed here as an eviction would) is re-created
    /// with a new creation time, and counted as evicted.
    #[test]
    fn an_evicted_fault_entry_comes_back_with_a_new_creation_time_and_is_counted() {
        let mut probes = Probes::load(&ProbeOptions::default()).expect("probes load as root");
        let me = std::process::id();
        // Stay on CPU 0, so that another process faulting there makes us switch back.
        // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this thread.
        unsafe {
            let mut cpus: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut cpus);
            assert_eq!(libc::sched_setaffinity(0, size_of_val(&cpus), &cpus), 0);
        }
        fault_pages(64);
        let before = probes.fault_counters(me).expect("we faulted");
        let evictions = probes.fault_evictions();
        probes.faults.remove(&me).expect("our entry exists");
        // Another process faults on CPU 0 (so it owns the CPU's cache), then we fault again.
        // (A child inherits this thread's affinity.)
        let status = std::process::Command::new("true")
            .status()
            .expect("run true");
        assert!(status.success());
        fault_pages(64);
        let after = probes.fault_counters(me).expect("re-created");
        assert!(after.created_ns > before.created_ns, "{before:?} {after:?}");
        assert!(probes.fault_evictions() > evictions);
    }

    /// Loads the real probes into the running kernel (needs root, as in CI) and checks that
    /// faults of this very process are counted.
    #[test]
    fn every_probe_loads_and_attaches_on_this_kernel() {
        // The syscall probes carry the memory syscalls and the NVIDIA ioctls: a program the
        // verifier refuses would otherwise only show as a feature turned off.
        let probes = Probes::load(&ProbeOptions::default()).expect("probes load as root");
        assert_eq!(probes.unavailable(), &[], "every probe attaches");
    }

    #[test]
    fn loads_attaches_and_counts_our_faults() {
        let probes = Probes::load(&ProbeOptions::default()).expect("probes load as root");
        let me = std::process::id();
        let before = probes.fault_counters(me).map_or(0, |c| c.counters.faults);
        // Fresh anonymous pages (not malloc, which may reuse pages already touched), one
        // fault per 4 KiB page even where transparent huge pages are on by default (Debian's
        // kernels: 2 MiB faults would count one per 512 pages).
        fault_pages(2048);
        let after = probes
            .fault_counters(me)
            .expect("we faulted")
            .counters
            .faults;
        assert!(after - before >= 2048, "counted {} faults", after - before);
        assert!(
            probes
                .probe_stats()
                .iter()
                .any(|(p, s)| *p == Probe::PageFault && s.events > 0)
        );
    }
}

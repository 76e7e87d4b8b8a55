//! The `inspect` report: a serde type whose JSON is a documented, stable contract (see the
//! README), reused as-is by the local API later. [`text`] renders it for people, and
//! [`model_text`] renders the model section and `infermem plan`.

pub mod api_text;
pub mod model_text;
pub mod text;

use serde::{Deserialize, Serialize};

use crate::{collect::cgroup::CgroupVersion, model::analysis::ModelReport, predict::Assessment};

/// Version of the JSON contract; bumped only on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything `infermem inspect <pid>` reports about one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InspectReport {
    pub schema_version: u32,
    pub pid: u32,
    pub comm: String,
    /// Arguments as the process sees them (`/proc/<pid>/cmdline`).
    pub cmdline: Vec<String>,
    /// Programs the process exec'd into while sampled (their comm), oldest first; comm,
    /// cmdline, mappings and model are those of the last.
    pub execs: Vec<String>,
    /// The memory cgroup; null when the host has no memory controller.
    pub cgroup: Option<CgroupReport>,
    pub memory: MemoryReport,
    /// Files mapped for at least 1 MiB in total, largest first.
    pub mappings: Vec<MappingReport>,
    pub faults: FaultReport,
    pub oom: OomReport,
    /// Large anonymous allocations the probes saw during sampling, newest first.
    pub allocations: Vec<AllocationReport>,
    /// The model runtime and model; null for a process that is neither a known runtime nor
    /// maps a model file.
    pub model: Option<ModelReport>,
    /// The predictor's verdict over the window: level, time to OOM, the domain that runs out,
    /// the OOM killer's victim, thrashing and the reasons (see docs/predictor.md).
    pub risk: Option<Assessment>,
    /// GPU memory per device: what the probes saw allocated through the NVIDIA driver's RM
    /// ioctls (through the agent only: a standalone run saw none of the history) and NVML's
    /// figure. Empty without an NVIDIA GPU or when the process holds no GPU memory.
    #[serde(default)]
    pub gpu: Vec<crate::gpu::ProcessGpu>,
    pub sources: SourcesReport,
}

/// The memory cgroup and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupReport {
    pub version: CgroupVersion,
    pub path: String,
    /// This cgroup's own hard limit; null = unlimited.
    pub limit_bytes: Option<u64>,
    pub usage_bytes: Option<u64>,
    /// The tightest hard limit of the cgroup and its ancestors; null = unlimited.
    pub effective_limit_bytes: Option<u64>,
    /// cgroup v2 `memory.high`; null = unlimited or v1.
    pub high_bytes: Option<u64>,
}

/// Resident memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    pub rss_bytes: u64,
    pub anon_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
    pub swap_bytes: u64,
    pub locked_bytes: u64,
}

/// One mapped file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MappingReport {
    pub path: String,
    /// Total size of the process's mappings of the file.
    pub size_bytes: u64,
    pub resident_bytes: u64,
    /// Page faults per second inside the mapping (eBPF only; null without it).
    pub faults_per_s: Option<f64>,
    /// Whether the file was deleted after being mapped.
    pub deleted: bool,
}

/// Page-fault rates over the sampling window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FaultReport {
    /// The sampling window, in seconds.
    pub window_s: f64,
    /// All page faults per second (eBPF user faults, or /proc minflt+majflt without eBPF).
    pub total_per_s: f64,
    /// Faults in large file mappings per second (eBPF only).
    pub file_per_s: Option<f64>,
    /// All other faults (anonymous memory, mostly) per second (eBPF only).
    pub anon_per_s: Option<f64>,
    /// Raw counts over the window.
    pub total: u64,
    pub file: Option<u64>,
    pub anon: Option<u64>,
    /// Major faults (read from disk) per second, from /proc.
    pub major_per_s: f64,
    /// The probes' fault counters of the process were evicted (LRU map full) during the
    /// window and restarted from zero: the eBPF counts and rates then cover only the last
    /// `window_s` since the restart, or, not restarted yet, come from /proc (file and anon
    /// null). A reset is never reported as a rate over the whole window.
    #[serde(default)]
    pub reset: bool,
}

/// The OOM killer's view of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomReport {
    pub score: u32,
    pub score_adj: i32,
}

/// A large anonymous allocation seen while sampling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationReport {
    /// `mmap`, `brk` or `mremap`.
    pub kind: String,
    pub bytes: u64,
    pub address: u64,
    /// Still mapped at the end of sampling.
    pub live: bool,
}

/// Where the numbers came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcesReport {
    /// Whether the eBPF probes were attached.
    pub ebpf: bool,
    /// Why eBPF is off, if it is.
    pub reason: Option<String>,
    /// Per-probe counters (events, drops) when eBPF is on.
    pub probes: Vec<ProbeReport>,
}

/// Health of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub name: String,
    pub tracepoint: String,
    /// Whether the probe runs on this kernel.
    pub attached: bool,
    /// Why it does not, and which features are off without it; null when attached.
    pub unavailable: Option<String>,
    pub events: u64,
    pub ringbuf_drops: u64,
    pub map_drops: u64,
    pub unmatched: u64,
    /// File mappings given no fault buckets because their process had used up its quota.
    #[serde(default)]
    pub over_quota: u64,
}

/// An OOM kill, as reported when the inspected process is killed during sampling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomKillReport {
    pub pid: u32,
    pub comm: String,
    /// The victim's memory cgroup path (null if it could not be resolved).
    pub memcg: Option<String>,
    pub rss_anon_bytes: Option<u64>,
    pub rss_file_bytes: Option<u64>,
    pub rss_shmem_bytes: Option<u64>,
    pub swap_bytes: Option<u64>,
    pub oom_score_adj: Option<i16>,
}

/// The JSON printed with `--json` when inspection fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub error: ErrorBody,
}

/// What went wrong, machine-readably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `no_such_process`, `exited_during_sampling`, `pid_reused`, `ebpf_unavailable`,
    /// `permission_denied` or `other`.
    pub kind: String,
    pub message: String,
    pub pid: Option<u32>,
    /// Set when the process was OOM-killed during sampling.
    pub oom_kill: Option<OomKillReport>,
}

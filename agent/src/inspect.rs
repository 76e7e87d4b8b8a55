//! `infermem inspect <pid>`: sample a process for a while, report.
//!
//! Standalone (no agent running), it loads the probes itself, seeds them with the process's
//! existing mappings from /proc, watches events for `duration`, then reads the counters,
//! procfs and cgroupfs once more. Through an agent ([`inspect_in_agent`]), the agent's state
//! and probes replace the seeding and the second copy of the probes. Both build the same
//! report ([`report`]).

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use infermem_common::{BucketPolicy, FaultEntry, LARGE_MAPPING_BYTES, Probe};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    collect::{
        CollectError,
        cgroup::{self, CgroupLayout},
        maps::{self, MappedFile},
        process::{self, ProcessCounters, ProcessIdentity},
    },
    probes::{EventReader, OomVictim, ProbeError, ProbeOptions, Probes},
    report::{ErrorBody, ErrorReport, InspectReport, OomKillReport},
    state::ProcessState,
};

mod report;
mod risk;
mod through_agent;

pub use through_agent::inspect_in_agent;

/// How often liveness is re-checked (and the host and cgroup sampled for the risk) while
/// sampling.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(200);

/// What to inspect and how.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    pub pid: u32,
    /// How long to sample fault rates and watch events.
    pub duration: Duration,
    pub probes: ProbeOptions,
    /// Fail instead of falling back to procfs when eBPF is unavailable.
    pub require_ebpf: bool,
}

/// Why inspection failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Collect(#[from] CollectError),
    #[error("{}", exited_message(*pid, comm, oom_kill.as_deref()))]
    ExitedDuringSampling {
        pid: u32,
        comm: String,
        oom_kill: Option<Box<OomKillReport>>,
    },
    #[error("eBPF is required (--require-ebpf) but unavailable: {0}")]
    EbpfRequired(ProbeError),
}

fn exited_message(pid: u32, comm: &str, oom: Option<&OomKillReport>) -> String {
    match oom {
        Some(kill) => format!(
            "pid {pid} ({comm}) was OOM-killed during sampling (memcg {}, anon {}, file {})",
            kill.memcg.as_deref().unwrap_or("unknown"),
            kill.rss_anon_bytes
                .map_or("unknown".into(), crate::units::format_bytes),
            kill.rss_file_bytes
                .map_or("unknown".into(), crate::units::format_bytes),
        ),
        None => format!("pid {pid} ({comm}) exited during sampling"),
    }
}

impl InspectError {
    /// The machine-readable form printed with `--json`.
    pub fn to_report(&self) -> ErrorReport {
        let (kind, pid, oom_kill) = match self {
            InspectError::Collect(CollectError::NoSuchProcess(pid)) => {
                ("no_such_process", Some(*pid), None)
            }
            InspectError::Collect(CollectError::Reused(pid)) => ("pid_reused", Some(*pid), None),
            InspectError::Collect(CollectError::PermissionDenied { pid, .. }) => {
                ("permission_denied", Some(*pid), None)
            }
            InspectError::Collect(CollectError::Other { pid, .. }) => ("other", Some(*pid), None),
            InspectError::ExitedDuringSampling { pid, oom_kill, .. } => (
                "exited_during_sampling",
                Some(*pid),
                oom_kill.as_deref().cloned(),
            ),
            InspectError::EbpfRequired(_) => ("ebpf_unavailable", None, None),
        };
        ErrorReport {
            error: ErrorBody {
                kind: kind.to_owned(),
                message: self.to_string(),
                pid,
                oom_kill,
            },
        }
    }
}

/// Counter readings at one instant.
struct Sample {
    at: Instant,
    /// CLOCK_MONOTONIC at `at`, the probes' clock.
    monotonic_ns: u64,
    procfs: ProcessCounters,
    /// eBPF: the process's fault counters (None: no entry); None without eBPF.
    ebpf: Option<Option<FaultEntry>>,
}

/// Inspects one process. Without eBPF (no privileges, no BTF) it falls back to procfs and
/// says why in `sources.reason`, unless `require_ebpf` is set.
pub async fn inspect(options: &InspectOptions) -> Result<InspectReport, InspectError> {
    let pid = options.pid;
    let identity = process::identity(pid)?;
    let (mut probes, reason) = match Probes::load(&inspect_probe_options(&options.probes)) {
        Ok(probes) => (Some(probes), None),
        Err(err) if options.require_ebpf => return Err(InspectError::EbpfRequired(err)),
        Err(err) => {
            tracing::warn!("eBPF unavailable, falling back to procfs only: {err}");
            (None, Some(err.to_string()))
        }
    };

    let mut state = ProcessState::new(identity.clone());
    let start_vmas = maps::vmas(pid, false)?;
    state.seed_from_vmas(&start_vmas);
    // Allocations from /proc are history; only those seen while sampling are reported.
    state.allocations.clear();
    if let Some(probes) = probes.as_mut() {
        for mapping in state.file_mappings.values() {
            if let Err(err) = probes.track_file_mapping(pid, mapping.start, mapping.end) {
                tracing::warn!("could not track mapping {:#x}: {err}", mapping.start);
            }
        }
    }
    let reader = probes.as_mut().and_then(Probes::take_event_reader);

    // Both baselines are read before sampling is announced: faults that follow the
    // announcement must land in the window, per mapping as well as in total.
    let start = sample(&identity, probes.as_ref())?;
    let mut start_mapping_faults = file_faults(
        probes.as_ref(),
        pid,
        &maps::mapped_files(&start_vmas, LARGE_MAPPING_BYTES),
    );
    tracing::info!(
        pid,
        ebpf = probes.is_some(),
        "sampling started for {:?}",
        options.duration
    );
    let mut risk = risk::RiskSampler::new(pid);
    watch(&mut state, reader, options.duration, &mut risk).await;
    if state.ended.is_some() || state.oom_kill.is_some() || process::still_alive(&identity).is_err()
    {
        return Err(exited(&state));
    }
    let end = sample(&identity, probes.as_ref()).map_err(|err| match err {
        err if err.is_gone() => exited(&state),
        err => InspectError::Collect(err),
    })?;
    if !state.execs.is_empty() {
        // The probes count the new program's mappings from zero.
        start_mapping_faults.clear();
    }

    let mut report = report::build_report(
        &state,
        probes.as_ref(),
        reason,
        (&start, &end),
        &start_mapping_faults,
        &risk,
    )?;
    report.gpu = crate::gpu::from_nvml(pid);
    Ok(report)
}

/// Drains events until `duration` has passed or the process is gone.
async fn watch(
    state: &mut ProcessState,
    reader: Option<EventReader>,
    duration: Duration,
    risk: &mut risk::RiskSampler,
) {
    let deadline = tokio::time::Instant::now() + duration;
    // SAFETY: the ring buffer's fd stays open, and the same, as long as the reader lives,
    // and the AsyncFd owns the reader.
    let mut events = reader.and_then(|r| {
        unsafe { AsyncFd::register_with_interest(RingFd(r), Interest::READABLE) }.ok()
    });
    let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            ready = async { events.as_mut()?.readable_mut().await.ok() }, if events.is_some() => {
                if let Some(mut guard) = ready {
                    for event in guard.get_inner_mut().0.drain().0 {
                        state.apply(&event);
                    }
                    guard.clear_ready();
                }
            }
            _ = liveness.tick() => {
                if state.ended.is_some() || process::still_alive(&state.identity).is_err() {
                    break;
                }
                risk.sample();
            }
        }
    }
    // Whatever arrived last (an OOM kill, the exit) still counts.
    if let Some(events) = events.as_mut() {
        for event in events.get_mut().0.drain().0 {
            state.apply(&event);
        }
    }
}

/// An [`EventReader`] as something tokio can poll.
struct RingFd(EventReader);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The probes, if they count faults on this kernel (without `page_fault_user`, fault counts
/// come from procfs and per-mapping faults are unknown).
fn fault_probes(probes: Option<&Probes>) -> Option<&Probes> {
    probes.filter(|p| p.attached(Probe::PageFault))
}

fn sample(identity: &ProcessIdentity, probes: Option<&Probes>) -> Result<Sample, CollectError> {
    let procfs = process::counters(identity)?;
    let ebpf = fault_probes(probes).map(|p| p.fault_counters(identity.pid));
    Ok(Sample {
        at: Instant::now(),
        monotonic_ns: crate::probes::events::monotonic_ns(),
        procfs,
        ebpf,
    })
}

/// Faults so far in each mapped file, by path.
fn file_faults(probes: Option<&Probes>, pid: u32, files: &[MappedFile]) -> HashMap<PathBuf, u64> {
    let Some(probes) = fault_probes(probes) else {
        return HashMap::new();
    };
    let ranges: Vec<&[(u64, u64)]> = files.iter().map(|f| f.ranges.as_slice()).collect();
    let faults = probes.mapping_faults(pid, &ranges);
    files.iter().map(|f| f.path.clone()).zip(faults).collect()
}

fn exited(state: &ProcessState) -> InspectError {
    let oom_kill = state
        .oom_kill
        .as_ref()
        .map(|victim| Box::new(oom_kill_report(state.identity.pid, victim)));
    InspectError::ExitedDuringSampling {
        pid: state.identity.pid,
        comm: state.identity.comm.clone(),
        oom_kill,
    }
}

/// An OOM kill in report form, with the memcg path resolved from its kernfs id.
pub fn oom_kill_report(pid: u32, victim: &OomVictim) -> OomKillReport {
    let layout = CgroupLayout::detect();
    OomKillReport {
        pid,
        comm: victim.comm.clone(),
        memcg: victim
            .memcg_id
            .and_then(|id| cgroup::path_by_id(&layout, id)),
        rss_anon_bytes: victim.rss_anon_bytes,
        rss_file_bytes: victim.rss_file_bytes,
        rss_shmem_bytes: victim.rss_shmem_bytes,
        swap_bytes: victim.swap_bytes,
        oom_score_adj: victim.oom_score_adj,
    }
}

/// One process is inspected for a few seconds: every file mapping of at least
/// [`LARGE_MAPPING_BYTES`] gets fault buckets (as the mappings seeded from /proc do), not only
/// the host-wide policy's model-sized ones.
fn inspect_probe_options(options: &ProbeOptions) -> ProbeOptions {
    ProbeOptions {
        buckets: BucketPolicy {
            min_mapping_bytes: LARGE_MAPPING_BYTES,
            ..options.buckets
        },
        ..options.clone()
    }
}

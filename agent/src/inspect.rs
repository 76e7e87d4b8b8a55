//! `infermem inspect <pid>`: attach the probes, sample the process for a while, report.
//!
//! Runs standalone (no daemon yet): it loads the probes itself, seeds them with the
//! process's existing mappings from /proc, watches events for `duration`, then reads the
//! counters, procfs and cgroupfs once more.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use infermem_common::{BucketPolicy, FaultCounters, FaultEntry, LARGE_MAPPING_BYTES, Probe};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    collect::{
        CollectError,
        cgroup::{self, CgroupLayout},
        maps::{self, MappedFile},
        memory,
        process::{self, ProcessCounters, ProcessIdentity},
    },
    daemon::{Agent, registry::ProcessKey},
    model::{self},
    probes::{self, EventReader, OomVictim, ProbeError, ProbeOptions, Probes},
    report::{
        AllocationReport, CgroupReport, ErrorBody, ErrorReport, FaultReport, InspectReport,
        MappingReport, MemoryReport, OomKillReport, OomReport, ProbeReport, SCHEMA_VERSION,
        SourcesReport,
    },
    state::{AllocationKind, Origin, ProcessState},
};

mod risk;

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

/// eBPF fault counts over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FaultWindow {
    total: u64,
    file: u64,
    window_s: f64,
    /// The counters restarted (evicted, then re-created) inside the window.
    reset: bool,
}

/// The eBPF fault counts between `start` and `end`, which are `window_s` apart and end at
/// `end_ns` (CLOCK_MONOTONIC). Counters re-created in between (an LRU eviction) restart the
/// window at their creation; counters gone at the end (evicted, not re-created) give None.
fn fault_window(
    (start, end): (Option<FaultEntry>, Option<FaultEntry>),
    window_s: f64,
    end_ns: u64,
) -> Option<FaultWindow> {
    let Some(end) = end else {
        return start.is_none().then_some(FaultWindow {
            total: 0,
            file: 0,
            window_s,
            reset: false,
        });
    };
    let (base, window_s, reset) = match start {
        Some(start) if start.created_ns == end.created_ns => (start.counters, window_s, false),
        Some(_) => {
            let since = end_ns.saturating_sub(end.created_ns) as f64 / 1e9;
            (FaultCounters::default(), since.clamp(1e-9, window_s), true)
        }
        // First fault since attach within the window: it all happened inside it.
        None => (FaultCounters::default(), window_s, false),
    };
    let total = end.counters.faults.saturating_sub(base.faults);
    let file = end.counters.file_faults.saturating_sub(base.file_faults);
    Some(FaultWindow {
        total,
        file: file.min(total),
        window_s,
        reset,
    })
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
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

    build_report(
        &state,
        probes.as_ref(),
        reason,
        (&start, &end),
        &start_mapping_faults,
        &risk,
    )
}

/// Inspects a process through a running agent: the agent's registry has what its probes saw
/// since it started (so a model loaded after the agent has its KV cache known exactly), and
/// its probes count the faults: no second copy of the probes is loaded.
pub async fn inspect_in_agent(
    agent: Arc<Agent>,
    pid: u32,
    duration: Duration,
) -> Result<InspectReport, InspectError> {
    let identity = blocking(move || Ok(process::identity(pid)?)).await?;
    let key = ProcessKey {
        pid,
        start_time: identity.start_time,
    };
    let shared = Arc::clone(&agent);
    let (start, start_faults) = blocking(move || {
        let probes = shared.probes();
        let start = sample(&identity, probes.as_deref())?;
        let files = maps::mapped_files(&maps::vmas(pid, false)?, LARGE_MAPPING_BYTES);
        Ok((start, file_faults(probes.as_deref(), pid, &files)))
    })
    .await?;
    let deadline = tokio::time::Instant::now() + duration;
    let mut risk = risk::RiskSampler::new(pid);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(LIVENESS_INTERVAL.min(deadline - tokio::time::Instant::now())).await;
        if let Some(state) = ended_in_agent(&agent, key) {
            return Err(exited(&state));
        }
        risk.sample();
    }
    blocking(move || {
        let state = tracked_state(&agent, key)?;
        let probes = agent.probes();
        let end = sample(&state.identity, probes.as_deref()).map_err(|err| match err {
            err if err.is_gone() => exited(&state),
            err => InspectError::Collect(err),
        })?;
        let reason = agent.ebpf_reason().map(str::to_owned);
        let window = (&start, &end);
        build_report(
            &state,
            probes.as_deref(),
            reason,
            window,
            &start_faults,
            &risk,
        )
    })
    .await
}

/// Runs blocking collection off the async runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, InspectError> + Send + 'static,
) -> Result<T, InspectError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))
}

/// The state of an ended process (with its OOM kill, if any), if it ended.
fn ended_in_agent(agent: &Agent, key: ProcessKey) -> Option<ProcessState> {
    let registry = agent.lock();
    let ended = registry.end_of(key)?;
    let mut state = ended.state.clone();
    state.oom_kill = ended.oom_kill.clone().or(state.oom_kill);
    state.ended = Some(crate::state::ProcessEnd::Exited);
    Some(state)
}

/// The agent's state of the process, or one seeded from /proc when the agent has not seen it
/// yet.
fn tracked_state(agent: &Agent, key: ProcessKey) -> Result<ProcessState, InspectError> {
    if let Some(state) = ended_in_agent(agent, key) {
        return Err(exited(&state));
    }
    if let Some(tracked) = agent.lock().process(key) {
        return Ok(tracked.state.clone());
    }
    let identity = process::identity(key.pid)?;
    let mut state = ProcessState::new(identity);
    state.seed_from_vmas(&maps::vmas(key.pid, false)?);
    Ok(state)
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
        monotonic_ns: monotonic_ns(),
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

/// Fault counts and rates over the window: from the probes when they count faults, from
/// /proc otherwise (and when the probes' counters were evicted and not re-created).
fn fault_report((start, end): (&Sample, &Sample), window: f64) -> FaultReport {
    let major = end
        .procfs
        .major_faults
        .saturating_sub(start.procfs.major_faults);
    let ebpf = start.ebpf.zip(end.ebpf);
    match ebpf.and_then(|counters| fault_window(counters, window, end.monotonic_ns)) {
        Some(w) => FaultReport {
            window_s: w.window_s,
            total_per_s: w.total as f64 / w.window_s,
            file_per_s: Some(w.file as f64 / w.window_s),
            anon_per_s: Some((w.total - w.file) as f64 / w.window_s),
            total: w.total,
            file: Some(w.file),
            anon: Some(w.total - w.file),
            major_per_s: major as f64 / window,
            reset: w.reset,
        },
        None => {
            let total = end.procfs.faults.saturating_sub(start.procfs.faults);
            FaultReport {
                window_s: window,
                total_per_s: total as f64 / window,
                file_per_s: None,
                anon_per_s: None,
                total,
                file: None,
                anon: None,
                major_per_s: major as f64 / window,
                reset: ebpf.is_some(),
            }
        }
    }
}

fn build_report(
    state: &ProcessState,
    probes: Option<&Probes>,
    reason: Option<String>,
    (start, end): (&Sample, &Sample),
    start_mapping_faults: &HashMap<PathBuf, u64>,
    risk: &risk::RiskSampler,
) -> Result<InspectReport, InspectError> {
    let pid = state.identity.pid;
    let identity = process::identity(pid)?;
    let window = end.at.duration_since(start.at).as_secs_f64().max(1e-9);

    let usage = memory::usage(pid)?;
    let vmas = maps::vmas(pid, true)?;
    let files = maps::mapped_files(&vmas, LARGE_MAPPING_BYTES);
    // One read of the probes' buckets for every file; none without fault attribution.
    let end_faults = fault_probes(probes).map(|_| file_faults(probes, pid, &files));
    let mappings: Vec<MappingReport> = files
        .iter()
        .map(|file| mapping_report(file, end_faults.as_ref(), start_mapping_faults, window))
        .collect();

    let faults = fault_report((start, end), window);

    let proc = crate::collect::open(pid)?;
    let oom = OomReport {
        score: proc
            .oom_score()
            .map_err(|e| CollectError::from_proc(pid, "oom_score", e))?
            .into(),
        score_adj: proc
            .oom_score_adj()
            .map_err(|e| CollectError::from_proc(pid, "oom_score_adj", e))?
            .into(),
    };
    let cgroup = cgroup::memory_cgroup(pid, &CgroupLayout::detect())?.map(|cg| CgroupReport {
        version: cg.version,
        path: cg.path,
        limit_bytes: cg.limit_bytes,
        usage_bytes: cg.usage_bytes,
        effective_limit_bytes: cg.effective_limit_bytes,
        high_bytes: cg.high_bytes,
    });

    let model = model::analysis::analyze(&model::facts::process_facts(state, &identity, &vmas));
    let risk = risk.assess(risk_facts(model.as_ref(), &mappings, window));

    Ok(InspectReport {
        schema_version: SCHEMA_VERSION,
        pid,
        comm: identity.comm,
        cmdline: model::redact::cmdline(&identity.cmdline),
        execs: state.execs.clone(),
        cgroup,
        memory: MemoryReport {
            rss_bytes: usage.rss,
            anon_bytes: usage.anon,
            file_bytes: usage.file,
            shmem_bytes: usage.shmem,
            swap_bytes: usage.swap,
            locked_bytes: usage.locked,
        },
        mappings,
        faults,
        oom,
        allocations: state
            .allocations
            .iter()
            .rev()
            .filter(|a| a.origin == Origin::Probe)
            .map(|a| AllocationReport {
                kind: match a.kind {
                    AllocationKind::Mmap => "mmap",
                    AllocationKind::Brk => "brk",
                    AllocationKind::Mremap => "mremap",
                }
                .to_owned(),
                bytes: a.bytes,
                address: a.addr,
                live: !a.freed,
            })
            .collect(),
        model,
        risk: Some(risk),
        sources: SourcesReport {
            ebpf: probes.is_some(),
            reason,
            probes: probes.map(probe_reports).unwrap_or_default(),
        },
    })
}

/// What the predictor needs from the model section: the predicted peak, the resident bytes
/// of the model files and the faults on their mappings in the window.
fn risk_facts(
    model: Option<&model::analysis::ModelReport>,
    mappings: &[MappingReport],
    window: f64,
) -> risk::ModelFacts {
    let Some(model) = model else {
        return risk::ModelFacts::default();
    };
    let is_model = |path: &str| model.files.iter().any(|f| f.file.path == Path::new(path));
    let model_mappings = mappings.iter().filter(|m| is_model(&m.path));
    risk::ModelFacts {
        predicted_peak_bytes: model.prediction.as_ref().and_then(|p| p.peak_ram_bytes),
        model_file_bytes: model.files.iter().map(|f| f.resident_bytes).sum(),
        model_file_faults: model_mappings
            .map(|m| m.faults_per_s.map(|rate| (rate * window).round() as u64))
            .sum(),
    }
}

fn mapping_report(
    file: &MappedFile,
    end_faults: Option<&HashMap<PathBuf, u64>>,
    start_faults: &HashMap<PathBuf, u64>,
    window: f64,
) -> MappingReport {
    let faults_per_s = end_faults.map(|end| {
        let now = end.get(&file.path).copied().unwrap_or(0);
        let before = start_faults.get(&file.path).copied().unwrap_or(0);
        now.saturating_sub(before) as f64 / window
    });
    MappingReport {
        path: file.path.display().to_string(),
        size_bytes: file.size,
        resident_bytes: file.resident,
        faults_per_s,
        deleted: file.deleted,
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

fn probe_reports(probes: &Probes) -> Vec<ProbeReport> {
    probes
        .probe_stats()
        .into_iter()
        .map(|(probe, stats)| ProbeReport {
            attached: probes.attached(probe),
            unavailable: probes
                .unavailable()
                .iter()
                .find(|(p, _)| *p == probe)
                .map(|(_, reason)| format!("{reason}; off: {}", probes::lost_features(probe))),
            name: probe.program().to_owned(),
            tracepoint: probe.tracepoint().to_owned(),
            events: stats.events,
            ringbuf_drops: stats.ringbuf_drops,
            map_drops: stats.map_drops,
            unmatched: stats.unmatched,
            over_quota: stats.over_quota,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(faults: u64, file_faults: u64, created_ns: u64) -> Option<FaultEntry> {
        Some(FaultEntry {
            counters: FaultCounters {
                faults,
                file_faults,
            },
            created_ns,
        })
    }

    #[test]
    fn counters_of_one_lifetime_give_the_difference_over_the_whole_window() {
        let w = fault_window((entry(10, 4, 1), entry(30, 9, 1)), 2.0, 5_000_000_000).unwrap();
        assert_eq!((w.total, w.file, w.window_s, w.reset), (20, 5, 2.0, false));
        // No entry at the start: every fault came inside the window.
        let w = fault_window((None, entry(7, 0, 4)), 2.0, 5_000_000_000).unwrap();
        assert_eq!((w.total, w.window_s, w.reset), (7, 2.0, false));
    }

    #[test]
    fn a_reset_restarts_the_window_at_the_new_entry_instead_of_a_negative_rate() {
        // Evicted with 1000 faults, re-created 0.5 s before the end, 40 faults since.
        let w = fault_window(
            (entry(1000, 0, 1), entry(40, 0, 4_500_000_000)),
            2.0,
            5_000_000_000,
        )
        .unwrap();
        assert_eq!((w.total, w.window_s, w.reset), (40, 0.5, true));
        // Evicted and not re-created yet: the counts are unknown.
        assert_eq!(fault_window((entry(1000, 0, 1), None), 2.0, 5), None);
    }
}

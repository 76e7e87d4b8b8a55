//! The inspect report, built from what was sampled: memory, mappings with their fault rates,
//! faults, OOM score, cgroup, allocations, the model section and the risk.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use infermem_common::{FaultCounters, FaultEntry, LARGE_MAPPING_BYTES};

use super::{InspectError, Sample, fault_probes, file_faults, risk};
use crate::{
    collect::{
        CollectError,
        cgroup::{self, CgroupLayout},
        maps::{self, MappedFile},
        memory, process,
    },
    model,
    probes::{self, Probes},
    report::{
        AllocationReport, CgroupReport, FaultReport, InspectReport, MappingReport, MemoryReport,
        OomReport, ProbeReport, SCHEMA_VERSION, SourcesReport,
    },
    state::{AllocationKind, Origin, ProcessState},
};

/// The report of `state`'s process over the window from `start` to `end`.
pub(super) fn build_report(
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
    let mappings = mapping_reports(probes, pid, &vmas, start_mapping_faults, window);
    let model = model::analysis::analyze(&model::facts::process_facts(state, &identity, &vmas));
    let risk = risk.assess(risk_facts(model.as_ref(), &mappings, window));
    Ok(InspectReport {
        schema_version: SCHEMA_VERSION,
        pid,
        comm: identity.comm,
        cmdline: model::redact::cmdline(&identity.cmdline),
        execs: state.execs.clone(),
        cgroup: cgroup_report(pid)?,
        memory: memory_report(&usage),
        mappings,
        faults: fault_report((start, end), window),
        oom: oom_report(pid)?,
        allocations: allocation_reports(state),
        model,
        risk: Some(risk),
        gpu: Vec::new(),
        sources: SourcesReport {
            ebpf: probes.is_some(),
            reason,
            probes: probes.map(probe_reports).unwrap_or_default(),
        },
    })
}

/// Every file mapped for at least [`LARGE_MAPPING_BYTES`], with its fault rate over the
/// window (one read of the probes' buckets for every file; none without fault attribution).
fn mapping_reports(
    probes: Option<&Probes>,
    pid: u32,
    vmas: &[maps::Vma],
    start_faults: &HashMap<PathBuf, u64>,
    window: f64,
) -> Vec<MappingReport> {
    let files = maps::mapped_files(vmas, LARGE_MAPPING_BYTES);
    let end_faults = fault_probes(probes).map(|_| file_faults(probes, pid, &files));
    files
        .iter()
        .map(|file| mapping_report(file, end_faults.as_ref(), start_faults, window))
        .collect()
}

fn memory_report(usage: &memory::MemoryUsage) -> MemoryReport {
    MemoryReport {
        rss_bytes: usage.rss,
        anon_bytes: usage.anon,
        file_bytes: usage.file,
        shmem_bytes: usage.shmem,
        swap_bytes: usage.swap,
        locked_bytes: usage.locked,
    }
}

fn oom_report(pid: u32) -> Result<OomReport, InspectError> {
    let proc = crate::collect::open(pid)?;
    Ok(OomReport {
        score: proc
            .oom_score()
            .map_err(|e| CollectError::from_proc(pid, "oom_score", e))?
            .into(),
        score_adj: proc
            .oom_score_adj()
            .map_err(|e| CollectError::from_proc(pid, "oom_score_adj", e))?
            .into(),
    })
}

fn cgroup_report(pid: u32) -> Result<Option<CgroupReport>, InspectError> {
    Ok(
        cgroup::memory_cgroup(pid, &CgroupLayout::detect())?.map(|cg| CgroupReport {
            version: cg.version,
            path: cg.path,
            limit_bytes: cg.limit_bytes,
            usage_bytes: cg.usage_bytes,
            effective_limit_bytes: cg.effective_limit_bytes,
            high_bytes: cg.high_bytes,
        }),
    )
}

/// The large anonymous allocations the probes saw, newest first.
fn allocation_reports(state: &ProcessState) -> Vec<AllocationReport> {
    state
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
        .collect()
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

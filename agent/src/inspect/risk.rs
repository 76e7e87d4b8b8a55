//! The `risk` section of `inspect`: the predictor ([`crate::predict`]) run over what was
//! sampled during the window: the host's memory, the process's memory cgroup, file refaults,
//! and the OOM killer's candidates in each domain.

use std::{path::Path, time::Instant};

use crate::{
    collect::{
        cgroup::{self, CgroupLayout, MemoryCgroup},
        host, open, pressure,
    },
    predict::{self, Assessment, DomainInput, DomainSample, ProcessInput, Sample},
};

/// Deepest cgroup subtree walked for the OOM killer's candidates.
const MAX_CGROUP_DEPTH: u32 = 16;

/// Samples taken while inspecting, oldest first.
pub struct RiskSampler {
    pid: u32,
    layout: CgroupLayout,
    started: Instant,
    host: Vec<(f64, host::HostMemory)>,
    cgroup: Vec<(f64, MemoryCgroup)>,
    refault_file: Vec<Sample>,
}

/// What the process itself contributes: its model's predicted peak and its model files.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelFacts {
    /// Peak RAM the memory model predicts (weights + KV at maximum context + compute).
    pub predicted_peak_bytes: Option<u64>,
    /// Resident bytes of its model files, which the kernel counts as reclaimable cache.
    pub model_file_bytes: u64,
    /// Page faults on its model-file mappings during the window (eBPF), if counted.
    pub model_file_faults: Option<u64>,
}

impl RiskSampler {
    /// A sampler for `pid`, with no samples yet.
    pub fn new(pid: u32) -> Self {
        RiskSampler {
            pid,
            layout: CgroupLayout::detect(),
            started: Instant::now(),
            host: Vec::new(),
            cgroup: Vec::new(),
            refault_file: Vec::new(),
        }
    }

    /// Takes one sample of the host and of the process's memory cgroup.
    pub fn sample(&mut self) {
        let t = self.started.elapsed().as_secs_f64();
        if let Some(memory) = host::read_meminfo() {
            self.host.push((t, memory));
        }
        if let Some(refaults) = host::read_vmstat().and_then(|v| v.workingset_refault_file) {
            self.refault_file.push(Sample {
                t,
                value: refaults as f64,
            });
        }
        if let Ok(Some(cg)) = cgroup::memory_cgroup(self.pid, &self.layout) {
            self.cgroup.push((t, cg));
        }
    }

    /// The predictor's assessment of the process from its domains (its memory cgroup, when
    /// limited, and the host), without hysteresis: one window, one verdict.
    pub fn assess(&self, model: ModelFacts) -> Assessment {
        // Every process is read once; a cgroup's candidates are a subset of the host's.
        let all = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok());
        let everyone = self.candidates(all, model);
        let mut domains = vec![self.host_domain(model, everyone.clone())];
        domains.extend(self.cgroup_domain(model, &everyone));
        let domains: Vec<&DomainInput> = domains.iter().collect();
        predict::assess(&domains, &predict::Config::default())
    }

    fn host_domain(&self, model: ModelFacts, processes: Vec<ProcessInput>) -> DomainInput {
        let samples = self
            .host
            .iter()
            .map(|(t, m)| DomainSample::host(*t, m, model.model_file_bytes))
            .collect();
        DomainInput {
            name: "host".to_owned(),
            limit_bytes: self
                .host
                .last()
                .map(|(_, m)| predict::domain::host_limit(m)),
            samples,
            pressure_some_avg10: pressure::read_host_memory_pressure().map(|p| p.some.avg10),
            refault_file: self.refault_file.clone(),
            processes,
        }
    }

    /// The process's memory cgroup, if it has a limit (its own or an ancestor's).
    fn cgroup_domain(&self, model: ModelFacts, everyone: &[ProcessInput]) -> Option<DomainInput> {
        let (_, last) = self.cgroup.last()?;
        last.effective_limit_bytes?;
        let (version, mount) = self.layout.memory_hierarchy()?;
        let samples = self
            .cgroup
            .iter()
            .filter_map(|(t, cg)| DomainSample::cgroup(*t, cg, model.model_file_bytes))
            .collect();
        let mut pids = Vec::new();
        cgroup_pids(&mount.join(last.path.trim_start_matches('/')), 0, &mut pids);
        Some(DomainInput {
            name: last.path.clone(),
            limit_bytes: last.effective_limit_bytes,
            samples,
            pressure_some_avg10: cgroup::read_memory_pressure(version, mount, &last.path)
                .map(|p| p.some.avg10),
            refault_file: Vec::new(),
            processes: everyone
                .iter()
                .filter(|p| pids.contains(&p.pid))
                .cloned()
                .collect(),
        })
    }

    /// The OOM killer's candidates among `pids`; the inspected process carries its model.
    fn candidates(&self, pids: impl Iterator<Item = u32>, model: ModelFacts) -> Vec<ProcessInput> {
        let window = self.started.elapsed().as_secs_f64();
        pids.filter_map(|pid| {
            let mut input = candidate(pid)?;
            if pid == self.pid {
                input.predicted_peak_bytes = model.predicted_peak_bytes;
                input.model_file_faults = model.model_file_faults.map_or_else(Vec::new, |n| {
                    vec![
                        Sample { t: 0.0, value: 0.0 },
                        Sample {
                            t: window,
                            value: n as f64,
                        },
                    ]
                });
            }
            Some(input)
        })
        .collect()
    }
}

/// A process as an OOM-kill candidate; None when it is gone or unreadable.
fn candidate(pid: u32) -> Option<ProcessInput> {
    let process = open(pid).ok()?;
    let rss_pages = process.stat().ok()?.rss;
    Some(ProcessInput {
        pid,
        oom_score: process.oom_score().ok()?.into(),
        oom_score_adj: process.oom_score_adj().ok()?.into(),
        rss_bytes: rss_pages.saturating_mul(crate::probes::events::page_size()),
        ..ProcessInput::default()
    })
}

/// The pids of the cgroup at `dir` and its descendants (`cgroup.procs`).
fn cgroup_pids(dir: &Path, depth: u32, pids: &mut Vec<u32>) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if depth >= MAX_CGROUP_DEPTH {
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            cgroup_pids(&entry.path(), depth + 1, pids);
        }
    }
}

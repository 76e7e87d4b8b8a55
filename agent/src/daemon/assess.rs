//! The predictor stage: after each round of collection, the host, every memory cgroup that
//! enforces a limit, and every model (or watched) process are assessed from the registry's
//! histories, each through its own hysteresis.

use std::time::Instant;

use crate::{
    gpu::state::GpuState,
    predict::{self, Assessment, DomainInput, Level, ProcessInput},
};

use super::{
    registry::{Registry, TrackedProcess},
    sample::is_under,
};

/// Assesses everything due, in place; model processes with a predicted VRAM peak also
/// against their GPU's headroom.
pub fn assess_all(registry: &mut Registry, cfg: &predict::Config, gpu: &GpuState) {
    let now = Instant::now();
    let gpu_verdicts = super::assess_gpu::gpu_verdicts(registry, gpu, cfg);
    let candidates: Vec<ProcessInput> = registry.processes.values().map(process_input).collect();
    let host = host_domain(registry, &candidates);
    let limited: Vec<DomainInput> = registry
        .cgroups
        .iter()
        .filter(|(_, c)| c.is_limit())
        .map(|(path, _)| cgroup_domain(registry, path, &candidates))
        .collect();

    let verdict = predict::assess(&[&host], cfg);
    log_change(&registry.host.assessment, &verdict, "host");
    registry.host.assessment = registry.host.tracker.apply(verdict, cfg);

    for domain in &limited {
        let Some(cgroup) = registry.cgroups.get_mut(&domain.name) else {
            continue;
        };
        let verdict = predict::assess(&[domain, &host], cfg);
        log_change(&cgroup.assessment, &verdict, &domain.name);
        cgroup.assessment = cgroup.tracker.apply(verdict, cfg);
    }

    for process in registry.processes.values_mut() {
        if !(process.sampled_often(now) || process.candidate) {
            continue;
        }
        let mut domains: Vec<&DomainInput> = process
            .memcg
            .as_deref()
            .and_then(|memcg| limiting_domain(&limited, memcg))
            .into_iter()
            .collect();
        domains.push(&host);
        let mut verdict = predict::assess(&domains, cfg);
        let pid = process.state.identity.pid;
        if let Some(gpu) = gpu_verdicts.get(&pid) {
            merge_gpu(&mut verdict, gpu);
        }
        let label = format!("pid {pid}");
        log_change(&process.assessment, &verdict, &label);
        process.assessment = process.tracker.apply(verdict, cfg);
    }
}

/// Adds the GPU's verdict: its reason when it is not ok, its level when worse.
fn merge_gpu(verdict: &mut Assessment, gpu: &predict::gpu::GpuVerdict) {
    if gpu.level == Level::Ok {
        return;
    }
    verdict.level = verdict.level.max(gpu.level);
    verdict.reasons.push(gpu.reason.clone());
}

/// The tightest limited cgroup a process lives under (the deepest one: its limit is the
/// effective one).
fn limiting_domain<'a>(limited: &'a [DomainInput], memcg: &str) -> Option<&'a DomainInput> {
    limited
        .iter()
        .filter(|d| is_under(memcg, &d.name))
        .max_by_key(|d| d.name.len())
}

fn process_input(p: &TrackedProcess) -> ProcessInput {
    let (oom_score, oom_score_adj) = p.oom_score.unwrap_or((0, 0));
    ProcessInput {
        pid: p.state.identity.pid,
        oom_score,
        oom_score_adj,
        rss_bytes: p.usage.map_or(0, |u| u.rss + u.swap),
        predicted_peak_bytes: p
            .model
            .report
            .as_ref()
            .and_then(|m| m.prediction.as_ref()?.peak_ram_bytes),
        model_file_faults: p.model_faults.to_vec(),
    }
}

fn host_domain(registry: &Registry, processes: &[ProcessInput]) -> DomainInput {
    let host = &registry.host;
    DomainInput {
        name: "host".to_owned(),
        limit_bytes: host.last.as_ref().map(predict::domain::host_limit),
        samples: host.samples.iter().copied().collect(),
        pressure_some_avg10: host.pressure.map(|p| p.some.avg10),
        refault_file: host.refault_file.to_vec(),
        processes: processes.to_vec(),
    }
}

fn cgroup_domain(registry: &Registry, path: &str, everyone: &[ProcessInput]) -> DomainInput {
    let cgroup = &registry.cgroups[path];
    let inside = |pid: u32| {
        registry
            .processes
            .get(&pid)
            .and_then(|p| p.memcg.as_deref())
            .is_some_and(|memcg| is_under(memcg, path))
    };
    DomainInput {
        name: path.to_owned(),
        limit_bytes: cgroup.last.effective_limit_bytes,
        samples: cgroup.samples.iter().copied().collect(),
        pressure_some_avg10: cgroup.pressure.map(|p| p.some.avg10),
        refault_file: Vec::new(),
        processes: everyone.iter().filter(|p| inside(p.pid)).cloned().collect(),
    }
}

/// Logs a target whose level (before hysteresis) changes.
fn log_change(before: &Assessment, after: &Assessment, target: &str) {
    if before.level == after.level {
        return;
    }
    let reasons = after.reasons.join("; ");
    match after.level {
        Level::Critical => tracing::warn!(target, eta = ?after.eta_seconds, %reasons, "critical"),
        level => tracing::info!(target, %level, eta = ?after.eta_seconds, %reasons, "level"),
    }
}

//! The collectors' schedule: each tick reads the host, the maps of processes that mapped
//! new files, the memory of processes (model processes and watched ones every tick, the rest
//! rarely: `smaps_rollup` takes the target's mmap lock), and the memory cgroups they live
//! in. /proc and cgroupfs are read with the registry unlocked; results are stored after.

use std::time::Instant;

use infermem_common::LARGE_MAPPING_BYTES;

use crate::{
    collect::{
        cgroup::{self, CgroupVersion, MemoryCgroup},
        host, maps, memory, open, pressure,
    },
    model::{
        discovery,
        runtime::{self, ProcessEvidence, Runtime},
    },
    predict::DomainSample,
};

use super::{
    Agent,
    registry::{ProcessKey, Rollup, TrackedCgroup, TrackedProcess, VmCounters, push_sample},
};

/// Most processes whose maps are re-read per tick (the rest wait for the next).
const MAPS_PER_TICK: usize = 64;

/// How often an unlimited cgroup (which cannot OOM on its own) is re-read, in seconds.
const UNLIMITED_CGROUP_S: f64 = 10.0;

/// One round of collection.
pub fn tick(agent: &Agent) {
    let t = agent.elapsed_s();
    sample_host(agent, t);
    refresh_maps(agent, MAPS_PER_TICK);
    sample_processes(agent, t);
    sample_cgroups(agent, t);
}

fn sample_host(agent: &Agent, t: f64) {
    let memory = host::read_meminfo();
    let refaults = host::read_vmstat().and_then(|v| v.workingset_refault_file);
    let psi = pressure::read_host_memory_pressure();
    let mut registry = agent.lock();
    let model_file_bytes = registry
        .processes
        .values()
        .map(TrackedProcess::model_file_bytes)
        .sum();
    let host = &mut registry.host;
    if let Some(memory) = memory {
        push_sample(
            &mut host.samples,
            DomainSample::host(t, &memory, model_file_bytes),
        );
        host.last = Some(memory);
    }
    if let Some(refaults) = refaults {
        host.refault_file.push(t, refaults as f64);
    }
    host.pressure = psi;
}

/// Reads the maps of (at most `max`) processes that mapped files since, names those files,
/// and decides which processes are model candidates.
pub fn refresh_maps(agent: &Agent, max: usize) {
    let stale: Vec<ProcessKey> = {
        let registry = agent.lock();
        registry
            .processes
            .values()
            .filter(|p| p.maps_stale)
            .map(TrackedProcess::key)
            .take(max)
            .collect()
    };
    let min_model_bytes = agent.settings().model_min_bytes;
    for key in stale {
        let vmas = maps::vmas(key.pid, false).unwrap_or_default();
        let mut registry = agent.lock();
        let Some(tracked) = registry.process_mut(key) else {
            continue;
        };
        tracked.maps_stale = false;
        if !tracked.seeded {
            tracked.state.seed_from_vmas(&vmas);
            tracked.seeded = true;
            agent.track_model_mappings(key.pid, &tracked.state, min_model_bytes);
        }
        tracked.state.resolve_paths(&vmas);
        if !tracked.candidate && is_candidate(tracked, &vmas, min_model_bytes) {
            tracked.candidate = true;
        }
        if tracked.candidate {
            tracked.model.dirty = true;
        }
    }
}

/// A process worth analysing as a model process: it maps a model-sized file or a file that
/// is a model, or its executable or command line name a runtime.
pub fn is_candidate(tracked: &TrackedProcess, vmas: &[maps::Vma], min_model_bytes: u64) -> bool {
    let files = maps::mapped_files(vmas, LARGE_MAPPING_BYTES);
    let maps_model = files.iter().any(|f| {
        (f.size >= min_model_bytes && !f.path.to_string_lossy().contains(".so"))
            || discovery::sniff(&f.path).is_some()
    });
    let identity = &tracked.state.identity;
    let evidence = ProcessEvidence {
        exe: identity.exe.as_ref().map(|e| e.display().to_string()),
        cmdline: identity.cmdline.clone(),
        ..ProcessEvidence::default()
    };
    maps_model || runtime::detect(&evidence).is_some_and(|d| d.runtime != Runtime::Unknown)
}

/// Memory, OOM score and model-file faults of the processes due for a read.
fn sample_processes(agent: &Agent, t: f64) {
    let now = Instant::now();
    let settings = agent.settings();
    let due: Vec<(ProcessKey, Vec<(u64, u64)>)> = {
        let registry = agent.lock();
        let limited: Vec<&str> = registry
            .cgroups
            .iter()
            .filter(|(_, c)| c.is_limit())
            .map(|(path, _)| path.as_str())
            .collect();
        // Processes under a limit are the OOM killer's candidates there: their scores must
        // be fresh when the limit comes close.
        let limited_member = |p: &TrackedProcess| {
            p.memcg
                .as_deref()
                .is_some_and(|m| limited.iter().any(|l| is_under(m, l)))
        };
        registry
            .processes
            .values()
            .filter(|p| {
                let every = if p.sampled_often(now) || p.candidate || limited_member(p) {
                    settings.model_interval
                } else {
                    settings.idle_interval
                };
                p.usage_at
                    .is_none_or(|at| now.duration_since(at) + settings.interval / 2 >= every)
            })
            .map(|p| (p.key(), model_ranges(p)))
            .collect()
    };
    let requests: Vec<(u32, &[(u64, u64)])> = due
        .iter()
        .filter(|(_, ranges)| !ranges.is_empty())
        .map(|(key, ranges)| (key.pid, ranges.as_slice()))
        .collect();
    let faults = (!requests.is_empty())
        .then(|| agent.model_file_faults(&requests))
        .flatten()
        .unwrap_or_default();
    let mut faults = requests.iter().map(|(pid, _)| *pid).zip(faults);
    for (key, ranges) in &due {
        let fault_count = if ranges.is_empty() {
            None
        } else {
            faults.next().map(|(_, n)| n)
        };
        read_process_memory(agent, *key, fault_count, t, now);
    }
}

/// Reads one process's memory, OOM score and memory cgroup (it may have moved) and stores
/// them with its fault count.
fn read_process_memory(agent: &Agent, key: ProcessKey, faults: Option<u64>, t: f64, now: Instant) {
    let previous = agent.lock().process(key).and_then(|p| p.rollup);
    let vm = vm_counters(key);
    let resident = vm.map(|(_, resident)| resident);
    let reused = previous.filter(|r| resident.is_some_and(|res| r.still_valid(res, now)));
    let usage = match reused {
        Some(rollup) => Some(rollup.usage),
        None => memory::usage(key.pid).ok(),
    };
    let oom = open(key.pid).ok().and_then(|p| {
        Some((
            u32::from(p.oom_score().ok()?),
            i32::from(p.oom_score_adj().ok()?),
        ))
    });
    let memcg = cgroup::memory_cgroup_path(key.pid, &agent.layout);
    let mut registry = agent.lock();
    let Some(tracked) = registry.process_mut(key) else {
        return;
    };
    tracked.usage_at = Some(now);
    if let Some(usage) = usage {
        tracked.usage = Some(usage);
        tracked.rss.push(t, (usage.rss + usage.swap) as f64);
        if let Some(resident) = resident {
            tracked.rollup = reused.or(Some(Rollup {
                usage,
                resident,
                at: now,
            }));
        }
    }
    tracked.vm = vm.map(|(vm, _)| vm).or(tracked.vm);
    tracked.oom_score = oom.or(tracked.oom_score);
    tracked.memcg = memcg.or(tracked.memcg.take());
    if let Some(faults) = faults {
        tracked.model_faults.push(t, faults as f64);
    }
}

/// The virtual size and fault counters of a process (`statm`, `stat`), with its resident
/// bytes: the kernel's counters, read without walking page tables or taking the mmap lock.
/// None when it is gone or its pid names another process now.
fn vm_counters(key: ProcessKey) -> Option<(VmCounters, u64)> {
    let process = open(key.pid).ok()?;
    let statm = process.statm().ok()?;
    let stat = process.stat().ok()?;
    (stat.starttime == key.start_time).then_some(())?;
    let page = crate::probes::events::page_size();
    let vm = VmCounters {
        virtual_bytes: statm.size * page,
        minor_faults: stat.minflt,
        major_faults: stat.majflt,
    };
    Some((vm, statm.resident * page))
}

/// The address ranges of a process's model files (for fault counts), empty for others.
fn model_ranges(p: &TrackedProcess) -> Vec<(u64, u64)> {
    let Some(report) = &p.model.report else {
        return Vec::new();
    };
    p.state
        .file_mappings
        .values()
        .filter(|m| {
            m.path
                .as_ref()
                .is_some_and(|path| report.files.iter().any(|f| &f.file.path == path))
        })
        .map(|m| (m.start, m.end))
        .collect()
}

/// The memory cgroups of tracked processes, and the ancestors whose limits they live under.
fn sample_cgroups(agent: &Agent, t: f64) {
    let Some((version, mount)) = agent.layout.memory_hierarchy() else {
        return;
    };
    let (paths, model_bytes) = cgroup_paths(agent);
    let due: Vec<String> = {
        let registry = agent.lock();
        paths
            .into_iter()
            .filter(|path| {
                registry.cgroups.get(path).is_none_or(|c| {
                    c.last.effective_limit_bytes.is_some()
                        || c.samples
                            .back()
                            .is_none_or(|s| t - s.t >= UNLIMITED_CGROUP_S)
                })
            })
            .collect()
    };
    let mut read = Vec::new();
    for path in due {
        let cg = cgroup::read_memory_cgroup(version, mount, &path);
        if cg.usage_bytes.is_none() {
            continue; // removed
        }
        let limiting = limiting_ancestor(version, mount, &cg);
        let events = cgroup::read_memory_events(version, mount, &path);
        let psi = cgroup::read_memory_pressure(version, mount, &path);
        read.push((cg, events, psi));
        read.extend(limiting.map(|a| {
            let events = cgroup::read_memory_events(version, mount, &a.path);
            let psi = cgroup::read_memory_pressure(version, mount, &a.path);
            (a, events, psi)
        }));
    }
    let mut registry = agent.lock();
    for (cg, events, pressure) in read {
        let bytes = model_bytes_under(&model_bytes, &cg.path);
        let Some(sample) = DomainSample::cgroup(t, &cg, bytes) else {
            continue;
        };
        let tracked = registry
            .cgroups
            .entry(cg.path.clone())
            .or_insert_with(|| TrackedCgroup::new(cg.clone()));
        push_sample(&mut tracked.samples, sample);
        tracked.last = cg;
        tracked.events = events;
        tracked.pressure = pressure;
    }
    let live: std::collections::HashSet<String> = registry
        .processes
        .values()
        .filter_map(|p| p.memcg.clone())
        .collect();
    registry
        .cgroups
        .retain(|path, _| live.iter().any(|l| is_under(l, path)));
}

/// The distinct memory cgroups of live processes, and each model process's model bytes.
fn cgroup_paths(agent: &Agent) -> (Vec<String>, Vec<(String, u64)>) {
    let registry = agent.lock();
    let mut paths: Vec<String> = registry
        .processes
        .values()
        .filter_map(|p| p.memcg.clone())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    let model_bytes = registry
        .processes
        .values()
        .filter_map(|p| Some((p.memcg.clone()?, p.model_file_bytes())))
        .filter(|(_, bytes)| *bytes > 0)
        .collect();
    (paths, model_bytes)
}

fn model_bytes_under(model_bytes: &[(String, u64)], path: &str) -> u64 {
    model_bytes
        .iter()
        .filter(|(memcg, _)| is_under(memcg, path))
        .map(|(_, bytes)| bytes)
        .sum()
}

/// Whether the cgroup `path` is `ancestor` or below it.
pub fn is_under(path: &str, ancestor: &str) -> bool {
    let ancestor = ancestor.trim_end_matches('/');
    path == ancestor
        || ancestor.is_empty()
        || path
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The ancestor whose own limit is the cgroup's effective limit, when that is not its own:
/// the domain whose usage the OOM killer compares with that limit.
fn limiting_ancestor(
    version: CgroupVersion,
    mount: &std::path::Path,
    cg: &MemoryCgroup,
) -> Option<MemoryCgroup> {
    let effective = cg.effective_limit_bytes?;
    if cg.limit_bytes == Some(effective) {
        return None;
    }
    let mut path = cg.path.as_str();
    while let Some((parent, _)) = path.rsplit_once('/') {
        let parent_path = if parent.is_empty() { "/" } else { parent };
        let ancestor = cgroup::read_memory_cgroup(version, mount, parent_path);
        if ancestor.limit_bytes == Some(effective) {
            return Some(ancestor);
        }
        if parent.is_empty() {
            return None;
        }
        path = parent;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::is_under;

    #[test]
    fn cgroup_paths_nest_by_component() {
        assert!(is_under("/a/b", "/a"));
        assert!(is_under("/a", "/a"));
        assert!(is_under("/a/b", "/"));
        assert!(!is_under("/ab", "/a"));
        assert!(!is_under("/a", "/a/b"));
    }
}

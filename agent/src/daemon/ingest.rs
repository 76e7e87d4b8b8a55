//! Kernel events into the registry: new programs (exec), exits, OOM kills, and the
//! mappings and allocations of tracked processes. Runs on the event thread, which blocks on
//! the probes' ring buffers; /proc is read only for a process first seen.

use std::time::Instant;

use crate::{
    collect::{
        cgroup::{self, CgroupLayout},
        process,
    },
    probes::{EventDetail, KernelEvent, OomVictim},
    state::ProcessState,
};

use super::registry::{OomKillRecord, ProcessKey, Registry, TrackedProcess};

/// Applies a batch of events, oldest first.
pub fn apply_events(registry: &mut Registry, events: &[KernelEvent], layout: &CgroupLayout) {
    let now = Instant::now();
    registry.events += events.len() as u64;
    for event in events {
        apply(registry, event, layout, now);
    }
}

fn apply(registry: &mut Registry, event: &KernelEvent, layout: &CgroupLayout, now: Instant) {
    match &event.detail {
        EventDetail::Exec(info) => {
            let known = registry
                .processes
                .get(&event.tgid)
                .is_some_and(|p| Some(p.state.identity.start_time) == info.start_time);
            if known {
                on_exec_of_known(registry, event, layout);
            } else if let Some(mut process) = read_process(event.tgid, layout) {
                // Every mapping of the new program is still to come, as events.
                process.seeded = true;
                registry.insert(process, now);
            }
        }
        EventDetail::Exit { process, .. } => {
            if let Some(start_time) = process.start_time {
                let key = ProcessKey {
                    pid: event.tgid,
                    start_time,
                };
                registry.remove(key, "exited", now);
            }
        }
        EventDetail::OomVictim(victim) => {
            on_oom_kill(registry, (event.tgid, event.time_ns), victim, layout)
        }
        EventDetail::Fork { child } => _ = track(registry, *child, layout, now),
        _ => on_memory_event(registry, event, layout, now),
    }
}

/// The process exec'd a new program: its address space, and what it runs, are new.
fn on_exec_of_known(registry: &mut Registry, event: &KernelEvent, layout: &CgroupLayout) {
    let Some(tracked) = registry.processes.get_mut(&event.tgid) else {
        return;
    };
    tracked.state.apply(event);
    if let Ok(identity) = process::identity(event.tgid)
        && identity.start_time == tracked.state.identity.start_time
    {
        tracked.state.identity = identity;
    }
    tracked.model = Default::default();
    tracked.candidate = false;
    tracked.maps_stale = true;
    // A shell moves itself into a cgroup between its fork and its exec.
    if let Some(memcg) = cgroup::memory_cgroup_path(event.tgid, layout) {
        tracked.memcg = Some(memcg);
    }
}

/// The tracked process `pid`, read from /proc first if the registry does not have it yet;
/// None when it is gone or is no process to track.
fn track<'r>(
    registry: &'r mut Registry,
    pid: u32,
    layout: &CgroupLayout,
    now: Instant,
) -> Option<&'r mut TrackedProcess> {
    if !registry.processes.contains_key(&pid) {
        registry.insert(read_process(pid, layout)?, now);
    }
    registry.processes.get_mut(&pid)
}

/// An mmap, munmap, mremap or brk: applied to the process, which is read from /proc first
/// if it is new (a fork the probes did not report, or a process older than the probes).
fn on_memory_event(
    registry: &mut Registry,
    event: &KernelEvent,
    layout: &CgroupLayout,
    now: Instant,
) {
    let Some(tracked) = track(registry, event.tgid, layout, now) else {
        return;
    };
    tracked.state.apply(event);
    match event.detail {
        // A file mapping: its path is unknown until /proc/<pid>/maps is read again.
        EventDetail::Mmap { fd: Some(_), .. } => tracked.maps_stale = true,
        _ if tracked.candidate => tracked.model.dirty = true,
        _ => {}
    }
}

/// The Unix time of a probe's timestamp (CLOCK_MONOTONIC ns): the kernel's moment, not the
/// moment the event was read.
fn unix_time_of(time_ns: u64) -> f64 {
    let now = super::unix_now();
    let age_ns = crate::probes::events::monotonic_ns().saturating_sub(time_ns);
    now - age_ns as f64 / 1e9
}

fn on_oom_kill(
    registry: &mut Registry,
    (pid, time_ns): (u32, u64),
    victim: &OomVictim,
    layout: &CgroupLayout,
) {
    let tracked = registry.processes.get_mut(&pid);
    let uid = tracked.as_ref().map(|p| p.uid);
    let memcg = victim
        .memcg_id
        .and_then(|id| cgroup::path_by_id(layout, id))
        .or_else(|| tracked.as_ref().and_then(|p| p.memcg.clone()));
    if let Some(tracked) = tracked {
        tracked.state.oom_kill = Some(victim.clone());
    }
    let ts_unix = unix_time_of(time_ns);
    tracing::warn!(pid, comm = %victim.comm, memcg = ?memcg, "OOM kill");
    registry.record_oom_kill(OomKillRecord {
        ts_unix,
        pid,
        uid,
        comm: victim.comm.clone(),
        memcg,
        rss_anon_bytes: victim.rss_anon_bytes,
        rss_file_bytes: victim.rss_file_bytes,
    });
}

/// A process read from /proc, with nothing sampled yet; None when it is gone or is a
/// kernel thread.
pub fn read_process(pid: u32, layout: &CgroupLayout) -> Option<TrackedProcess> {
    let identity = process::identity(pid).ok()?;
    let status = crate::collect::open(pid).ok()?.status().ok()?;
    // A kernel thread has no address space.
    status.vmsize?;
    let memcg = cgroup::memory_cgroup_path(pid, layout);
    let mut tracked = TrackedProcess::new(ProcessState::new(identity), status.ruid, memcg);
    tracked.maps_stale = true;
    Some(tracked)
}

//! The model-analysis stage: a process whose mappings or allocations changed is analysed
//! again (runtime, model files, profile, prediction) on the analysis thread, never on every
//! read. Parsed files are cached by inode ([`crate::model::profile_cache`]).

use std::{
    sync::mpsc::{Receiver, SyncSender, TrySendError},
    time::{Duration, Instant},
};

use crate::{
    collect::maps,
    model::{analysis, facts},
};

use super::{Agent, registry::ProcessKey};

/// Shortest time between two analyses of one process: a model load maps and allocates in
/// bursts; one analysis after the burst is enough.
const SETTLE: Duration = Duration::from_millis(500);

/// Most analyses waiting; past it, processes stay dirty and are queued at a later tick.
pub const QUEUE: usize = 64;

/// Queues the processes due for analysis.
pub fn dispatch(agent: &Agent, queue: &SyncSender<ProcessKey>) {
    let now = Instant::now();
    let mut registry = agent.lock();
    for tracked in registry.processes.values_mut().filter(|p| p.candidate) {
        let key = tracked.key();
        let model = &mut tracked.model;
        let settled = model
            .analysed_at
            .is_none_or(|at| now.duration_since(at) >= SETTLE);
        if !(model.dirty && !model.in_flight && settled) {
            continue;
        }
        match queue.try_send(key) {
            Ok(()) => {
                model.in_flight = true;
                model.dirty = false;
            }
            Err(TrySendError::Full(_)) => break,
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// The analysis thread: analyses each queued process until the queue closes.
pub fn worker(agent: &Agent, queue: Receiver<ProcessKey>) {
    for key in queue {
        analyse_and_store(agent, key);
    }
}

/// Analyses every process due, on the calling thread (standalone commands).
pub fn analyse_due_now(agent: &Agent) {
    let due: Vec<ProcessKey> = agent
        .lock()
        .processes
        .values()
        .filter(|p| p.candidate && p.model.dirty)
        .map(|p| p.key())
        .collect();
    for key in due {
        analyse_and_store(agent, key);
    }
}

fn analyse_and_store(agent: &Agent, key: ProcessKey) {
    let report = analyse(agent, key);
    let mut registry = agent.lock();
    if let Some(tracked) = registry.process_mut(key) {
        tracked.model.in_flight = false;
        tracked.model.dirty = false;
        tracked.model.analysed_at = Some(Instant::now());
        if let Some(report) = report {
            tracked.model.report = report;
        }
    }
}

/// The model report of a process from its tracked state and a fresh read of its smaps;
/// None when it is gone (Some(None): not a model process).
fn analyse(agent: &Agent, key: ProcessKey) -> Option<Option<analysis::ModelReport>> {
    let vmas = maps::vmas(key.pid, true).ok()?;
    let mut state = agent.lock().process(key)?.state.clone();
    state.resolve_paths(&vmas);
    let facts = facts::process_facts(&state, &state.identity, &vmas);
    Some(analysis::analyze(&facts))
}

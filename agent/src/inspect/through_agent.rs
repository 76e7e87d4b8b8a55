//! `inspect` through a running agent: the agent's registry has what its probes saw since it
//! started (so a model loaded after the agent has its KV cache known exactly), and its
//! probes count the faults: no second copy of the probes is loaded.

use std::{sync::Arc, time::Duration};

use infermem_common::LARGE_MAPPING_BYTES;

use super::{
    InspectError, LIVENESS_INTERVAL, exited, file_faults, report::build_report, risk, sample,
};
use crate::{
    collect::{maps, process},
    daemon::{Agent, registry::ProcessKey},
    report::InspectReport,
    state::ProcessState,
};

/// Inspects `pid` for `duration` with the agent's state and probes.
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
        risk = blocking(move || {
            risk.sample();
            Ok(risk)
        })
        .await?;
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
        let mut report = build_report(
            &state,
            probes.as_deref(),
            reason,
            window,
            &start_faults,
            &risk,
        )?;
        drop(probes);
        report.gpu = agent.gpu().process_gpu(pid);
        Ok(report)
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

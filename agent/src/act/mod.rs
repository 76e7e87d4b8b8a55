//! Actions: what infermem changes to keep a model serving, and how each change is checked,
//! applied, journalled and undone.
//!
//! - [`Action`]: the vocabulary (pin a file, write a cgroup file, set an `oom_score_adj`,
//!   unload a runtime's idle models);
//! - [`safety`]: who may never be acted on (pid 1, kernel threads, the agent, reused pids);
//! - [`apply`]: carrying an action out on the system, and undoing it;
//! - [`knobs`]: reading and writing cgroup files and `oom_score_adj`, with the value before;
//! - [`pin`]: mapping and mlocking model files within a budget;
//! - [`runtime`]: talking to runtimes (Ollama, llama.cpp server) behind one trait;
//! - [`journal`]: the append-only record of decisions and actions, and what is in force;
//! - [`engine`]: applies the policy's wishes by mode, rate-limits, reverts;
//! - [`hooks`]: alert commands and webhooks.

pub mod apply;
pub mod engine;
pub mod hooks;
pub mod journal;
pub mod knobs;
pub mod pin;
pub mod runtime;
pub mod safety;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A process an action is about: its pid and start time are its identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    /// Clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    pub comm: String,
}

/// One change infermem can make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Keep a model file resident: the agent maps it and mlocks it.
    Pin {
        file: PathBuf,
        dev: u64,
        ino: u64,
        bytes: u64,
        /// The process it is pinned for (None: a file pinned by hand).
        holder: Option<ProcessRef>,
        /// Pinned by hand (`infermem pin`): stays until unpinned or its process exits,
        /// whatever the policy wishes.
        #[serde(default)]
        manual: bool,
    },
    /// Write a memory cgroup file, e.g. `memory.low`.
    CgroupWrite {
        cgroup: String,
        file: String,
        /// Bytes; [`u64::MAX`] is written `max` (v2) or `-1` (v1).
        value: u64,
    },
    /// Set a process's `oom_score_adj`.
    OomScoreAdj { process: ProcessRef, value: i32 },
    /// Ask a runtime to unload the models it is not using (Ollama: `keep_alive: 0`).
    UnloadIdleModels {
        process: ProcessRef,
        runtime: String,
    },
}

impl Action {
    /// What the action changes: two actions with the same key cannot both be in force.
    pub fn key(&self) -> String {
        match self {
            Action::Pin {
                dev,
                ino,
                holder,
                manual,
                ..
            } => match (manual, holder) {
                (true, _) | (false, None) => format!("pin:{dev}:{ino}:manual"),
                (false, Some(h)) => format!("pin:{dev}:{ino}:{}:{}", h.pid, h.start_time),
            },
            Action::CgroupWrite { cgroup, file, .. } => format!("cgroup:{cgroup}:{file}"),
            Action::OomScoreAdj { process, .. } => {
                format!("oom_score_adj:{}:{}", process.pid, process.start_time)
            }
            Action::UnloadIdleModels { process, .. } => {
                format!("unload:{}:{}", process.pid, process.start_time)
            }
        }
    }

    /// The process the action is about, if it is about one.
    pub fn process(&self) -> Option<&ProcessRef> {
        match self {
            Action::Pin { holder, .. } => holder.as_ref(),
            Action::CgroupWrite { .. } => None,
            Action::OomScoreAdj { process, .. } | Action::UnloadIdleModels { process, .. } => {
                Some(process)
            }
        }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            Action::Pin { file, bytes, .. } => format!(
                "pin {} ({}) in RAM",
                file.display(),
                crate::units::format_bytes(*bytes)
            ),
            Action::CgroupWrite {
                cgroup,
                file,
                value,
            } => format!("{cgroup}/{file} = {}", knobs::render_bytes(*value)),
            Action::OomScoreAdj { process, value } => format!(
                "oom_score_adj of {} (pid {}) = {value}",
                process.comm, process.pid
            ),
            Action::UnloadIdleModels { process, runtime } => format!(
                "ask {runtime} (pid {}) to unload the models it is not using",
                process.pid
            ),
        }
    }
}

/// An action the policy wants, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Wish {
    pub action: Action,
    pub reason: String,
}

//! The policy: which processes infermem protects, how (a profile per workload), which ones
//! yield (neighbours), which are never touched, and whether actions are only logged
//! (`observe`), offered (`recommend`) or applied (`enforce`). It is the config's `[policy]`
//! section, or a file of the same form given to `infermem run --policy FILE`.
//!
//! [`decide`] turns the registry's view of the processes into the actions the policy wants
//! now; [`crate::act`] applies them (or not, by mode) and keeps the journal.

pub mod decide;
pub mod matcher;
pub mod profile;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Bytes;

pub use matcher::Matcher;
pub use profile::{OomScoreAdj, Profile, ProfileName, Protect, WorkloadRule};

/// Where the journal of decisions and actions is kept unless the policy says otherwise.
pub const DEFAULT_JOURNAL: &str = "/var/lib/infermem/journal.jsonl";

/// What the agent does with the actions the policy wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Journal and log each action it would take; change nothing.
    #[default]
    Observe,
    /// As observe, and offer them: `infermem actions` lists them, alert hooks receive them.
    Recommend,
    /// Apply them.
    Enforce,
}

impl std::fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyMode::Observe => "observe",
            PolicyMode::Recommend => "recommend",
            PolicyMode::Enforce => "enforce",
        })
    }
}

/// `[policy]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub mode: PolicyMode,
    /// The append-only journal of decisions and actions (before and after values).
    pub journal: PathBuf,
    /// Most actions applied per minute, agent-wide (reverts are never held back).
    pub max_actions_per_minute: u32,
    /// Least time between two changes of the same thing (a cgroup file, a process's score).
    pub min_change_interval: crate::config::Interval,
    /// Most bytes of model files pinned in RAM, all together.
    pub pin_budget: Bytes,
    /// A file is pinned only if this much memory stays available afterwards.
    pub pin_reserve: Bytes,
    /// The workloads to protect, first match wins.
    #[serde(rename = "workload")]
    pub workloads: Vec<WorkloadRule>,
    /// Processes that yield memory while a protected workload is at risk.
    #[serde(rename = "neighbour")]
    pub neighbours: Vec<NeighbourRule>,
    /// Processes never acted on, whatever else matches them.
    pub never: Vec<Matcher>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            mode: PolicyMode::Observe,
            journal: PathBuf::from(DEFAULT_JOURNAL),
            max_actions_per_minute: 30,
            min_change_interval: crate::config::Interval(std::time::Duration::from_secs(10)),
            pin_budget: Bytes(16 << 30),
            pin_reserve: Bytes(1 << 30),
            workloads: Vec::new(),
            neighbours: Vec::new(),
            never: Vec::new(),
        }
    }
}

/// `[[policy.neighbour]]`: processes that give way to protected workloads at risk.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeighbourRule {
    #[serde(rename = "match")]
    pub matcher: Matcher,
    /// Their `oom_score_adj` while a protected workload is at risk, so that the OOM killer
    /// picks them first.
    #[serde(default = "neighbour_oom_score_adj")]
    pub oom_score_adj: Option<OomScoreAdj>,
    /// Throttle their memory cgroup while a protected workload is at risk: `memory.high` at
    /// its current usage (v2), or the soft limit (v1).
    #[serde(default = "yes")]
    pub throttle: bool,
}

fn neighbour_oom_score_adj() -> Option<OomScoreAdj> {
    Some(OomScoreAdj(500))
}

fn yes() -> bool {
    true
}

/// Parses a policy file (`infermem run --policy FILE`): the form of the config's `[policy]`
/// section, without the section header. Errors name the line and the key.
pub fn parse_file(text: &str, origin: &std::path::Path) -> Result<PolicyConfig, String> {
    toml::from_str::<PolicyConfig>(text).map_err(|e| {
        let line = e.span().map_or(1, |s| {
            text[..s.start.min(text.len())].matches('\n').count() + 1
        });
        format!("{}:{line}: {}", origin.display(), e.message())
    })
}

#[cfg(test)]
mod tests;

//! From what the registry knows to what the policy wishes for: which files to pin, which
//! cgroup files and `oom_score_adj` to set, which runtime to ask to unload. Pure: it reads a
//! [`View`] and returns [`Wish`]es; [`crate::act::engine`] decides what to do with them.

use std::collections::{BTreeMap, HashMap};

use super::{NeighbourRule, PolicyConfig, Profile, Protect, matcher::Subject};
use crate::{
    act::{Action, ProcessRef, Wish},
    collect::cgroup::CgroupVersion,
    daemon::sample::is_under,
    predict::Level,
};

/// Protection is never set below this (a model process's cgroup is never that small).
const MIN_PROTECT_BYTES: u64 = 16 << 20;

/// A model file a process maps, with the identity of the file its mapping holds.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedModel {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub bytes: u64,
}

/// What the policy needs to know about a process.
#[derive(Debug, Clone, Default)]
pub struct ProcessView {
    pub process: Option<ProcessRef>,
    pub exe: Option<String>,
    pub uid: u32,
    pub cgroup: Option<String>,
    pub runtime: Option<String>,
    /// Model files it maps (only those whose mapping could be identified can be pinned).
    pub models: Vec<MappedModel>,
    /// Paths of its model files (for matchers).
    pub model_paths: Vec<String>,
    pub weights_bytes: u64,
    /// The KV cache at the context in effect (or at the maximum when that is unknown).
    pub kv_bytes: u64,
    pub rss_bytes: u64,
    pub level: Level,
}

impl ProcessView {
    /// The facts a matcher looks at.
    pub fn subject(&self) -> Subject<'_> {
        Subject {
            comm: self.process.as_ref().map_or("", |p| p.comm.as_str()),
            exe: self.exe.as_deref(),
            runtime: self.runtime.as_deref(),
            cgroup: self.cgroup.as_deref(),
            uid: self.uid,
            models: &self.model_paths,
        }
    }
}

/// The registry as the policy sees it.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub processes: Vec<ProcessView>,
    /// Current charge of each memory cgroup, by path.
    pub cgroup_usage: HashMap<String, u64>,
    pub version: Option<CgroupVersion>,
}

/// The wishes of `policy` for the processes of `view`.
pub fn decide(policy: &PolicyConfig, view: &View) -> Vec<Wish> {
    let never = |p: &ProcessView| policy.never.iter().any(|m| m.matches(&p.subject()));
    let protected: Vec<(&ProcessView, Profile)> = view
        .processes
        .iter()
        .filter(|p| p.process.is_some() && !never(p))
        .filter_map(|p| {
            let rule = policy
                .workloads
                .iter()
                .find(|r| r.matcher.matches(&p.subject()))?;
            Some((p, rule.profile()))
        })
        .collect();
    let mut wishes = Vec::new();
    for (process, profile) in &protected {
        wishes.extend(protect_process(process, profile, view.version));
    }
    wishes.extend(protect_cgroups(&protected, view.version));
    let at_risk: Vec<&(&ProcessView, Profile)> = protected
        .iter()
        .filter(|(p, profile)| profile.throttle_neighbours && p.level >= profile.act_at)
        .collect();
    if let Some((first, profile)) = at_risk.first() {
        let why = format!(
            "{} (pid {}) is {} ({} profile)",
            comm(first),
            first.process.as_ref().map_or(0, |p| p.pid),
            first.level,
            serde_json::to_value(profile.name)
                .unwrap_or_default()
                .as_str()
                .unwrap_or("")
        );
        let protected_cgroups: Vec<&str> = protected
            .iter()
            .filter_map(|(p, _)| p.cgroup.as_deref())
            .collect();
        let neighbours = view.processes.iter().filter(|p| {
            p.process.is_some()
                && !never(p)
                && !protected.iter().any(|(q, _)| q.process == p.process)
        });
        for neighbour in neighbours {
            if let Some(rule) = policy
                .neighbours
                .iter()
                .find(|r| r.matcher.matches(&neighbour.subject()))
            {
                wishes.extend(yield_memory(
                    neighbour,
                    rule,
                    &protected_cgroups,
                    view,
                    &why,
                ));
            }
        }
    }
    dedupe(wishes)
}

fn comm(p: &ProcessView) -> &str {
    p.process.as_ref().map_or("", |p| p.comm.as_str())
}

/// Pins, `oom_score_adj` and unloads for one protected process.
fn protect_process(
    p: &ProcessView,
    profile: &Profile,
    version: Option<CgroupVersion>,
) -> Vec<Wish> {
    let process = p
        .process
        .clone()
        .expect("protected processes have an identity");
    let who = format!(
        "{} (pid {}), {:?} profile",
        process.comm, process.pid, profile.name
    );
    let mut wishes = Vec::new();
    if profile.pin_weights {
        for model in &p.models {
            wishes.push(Wish {
                action: Action::Pin {
                    file: model.path.clone().into(),
                    dev: model.dev,
                    ino: model.ino,
                    bytes: model.bytes,
                    holder: Some(process.clone()),
                    manual: false,
                },
                reason: format!("keep the weights of {who} resident"),
            });
        }
    }
    if let Some(value) = profile.oom_score_adj {
        wishes.push(Wish {
            action: Action::OomScoreAdj {
                process: process.clone(),
                value,
            },
            reason: format!("make {who} the OOM killer's last choice"),
        });
    }
    if let (Some(swap), Some(cgroup), Some(CgroupVersion::V2)) =
        (profile.swap_max, &p.cgroup, version)
    {
        wishes.push(cgroup_write(
            cgroup,
            "memory.swap.max",
            swap,
            format!("keep {who} out of swap"),
        ));
    }
    let unloadable = p.runtime.as_deref() == Some("ollama");
    if profile.unload_idle_models && unloadable && p.level >= Level::Critical {
        wishes.push(Wish {
            action: Action::UnloadIdleModels {
                process,
                runtime: "ollama".to_owned(),
            },
            reason: format!("{who} is critical: free the memory of the models it is not using"),
        });
    }
    wishes
}

/// The protection of each protected workload's cgroup: the sum over its workloads.
fn protect_cgroups(
    protected: &[(&ProcessView, Profile)],
    version: Option<CgroupVersion>,
) -> Vec<Wish> {
    let mut sizes: BTreeMap<(&str, &'static str), (u64, Vec<String>)> = BTreeMap::new();
    for (p, profile) in protected {
        let (Some(cgroup), Some(file)) =
            (p.cgroup.as_deref(), protect_file(profile.protect, version))
        else {
            continue;
        };
        if cgroup.trim_matches('/').is_empty() {
            continue;
        }
        let entry = sizes.entry((cgroup, file)).or_default();
        entry.0 += protect_bytes(p, profile);
        entry.1.push(format!("{} ({:?})", comm(p), profile.name));
    }
    sizes
        .into_iter()
        .map(|((cgroup, file), (bytes, who))| {
            cgroup_write(
                cgroup,
                file,
                bytes.max(MIN_PROTECT_BYTES),
                format!("protect the memory of {}", who.join(", ")),
            )
        })
        .collect()
}

/// The file that protects a cgroup's memory: `memory.low`/`memory.min` on v2, the soft
/// limit on v1 (reclaim goes first to the cgroups furthest above theirs).
fn protect_file(protect: Protect, version: Option<CgroupVersion>) -> Option<&'static str> {
    match (protect, version?) {
        (Protect::None, _) => None,
        (Protect::Low, CgroupVersion::V2) => Some("memory.low"),
        (Protect::Min, CgroupVersion::V2) => Some("memory.min"),
        (_, CgroupVersion::V1) => Some("memory.soft_limit_in_bytes"),
    }
}

/// Weights + the KV allowance, plus the headroom; the RSS when nothing is known of a model.
fn protect_bytes(p: &ProcessView, profile: &Profile) -> u64 {
    let model = p.weights_bytes as f64 + profile.kv_allowance * p.kv_bytes as f64;
    let base = if model > 0.0 {
        model
    } else {
        p.rss_bytes as f64
    };
    (base * (1.0 + profile.protect_headroom)) as u64
}

/// What a neighbour gives up while a protected workload is at risk.
fn yield_memory(
    n: &ProcessView,
    rule: &NeighbourRule,
    protected_cgroups: &[&str],
    view: &View,
    why: &str,
) -> Vec<Wish> {
    let process = n.process.clone().expect("neighbours have an identity");
    let mut wishes = Vec::new();
    if let Some(adj) = rule.oom_score_adj {
        wishes.push(Wish {
            action: Action::OomScoreAdj {
                process: process.clone(),
                value: adj.0,
            },
            reason: format!(
                "{why}: make neighbour {} (pid {}) the OOM killer's first choice",
                process.comm, process.pid
            ),
        });
    }
    let cgroup = n
        .cgroup
        .as_deref()
        .filter(|c| !c.trim_matches('/').is_empty());
    // Throttling a cgroup that holds a protected workload would throttle it too.
    let shared = |c: &str| {
        protected_cgroups
            .iter()
            .any(|p| is_under(p, c) || is_under(c, p))
    };
    if let (true, Some(cgroup), Some(version)) = (rule.throttle, cgroup, view.version)
        && !shared(cgroup)
    {
        let usage = view.cgroup_usage.get(cgroup).copied().unwrap_or(0);
        let (file, value) = match version {
            CgroupVersion::V2 => ("memory.high", usage.max(MIN_PROTECT_BYTES)),
            // v1 soft limit 0: global reclaim takes from this cgroup first; no OOM kill.
            CgroupVersion::V1 => ("memory.soft_limit_in_bytes", 0),
        };
        wishes.push(cgroup_write(
            cgroup,
            file,
            value,
            format!("{why}: throttle neighbour cgroup {cgroup}"),
        ));
    }
    wishes
}

fn cgroup_write(cgroup: &str, file: &str, value: u64, reason: String) -> Wish {
    Wish {
        action: Action::CgroupWrite {
            cgroup: cgroup.to_owned(),
            file: file.to_owned(),
            value,
        },
        reason,
    }
}

/// One wish per key: a later wish about the same thing (another process in the same
/// cgroup) does not replace the first.
fn dedupe(wishes: Vec<Wish>) -> Vec<Wish> {
    let mut seen = std::collections::HashSet::new();
    wishes
        .into_iter()
        .filter(|w| seen.insert(w.action.key()))
        .collect()
}

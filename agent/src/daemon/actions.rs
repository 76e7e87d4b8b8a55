//! The policy and actions stage: after each assessment, the registry is turned into the
//! policy's view, the policy's wishes go to the actions thread (which owns the
//! [`Engine`]: pins, journal, cgroup writes), and alerts (critical, thrashing, OOM kills)
//! go to the hooks. The API reaches the engine through the same thread.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock, mpsc},
    time::Duration,
};

use super::{
    Agent,
    registry::{Registry, TrackedProcess},
    sample::is_under,
};
use crate::{
    act::{
        Action, ProcessRef, Wish,
        engine::{ActionsView, Engine, EngineOptions},
        hooks::{AlertEvent, AlertTap, Hooks, HooksConfig},
    },
    policy::{
        PolicyConfig,
        decide::{self, MappedModel, ProcessView, View},
        matcher::Subject,
    },
    predict::Level,
};

/// Wishes and commands waiting for the actions thread.
const QUEUE: usize = 16;

/// What the API asks of the engine.
pub enum Command {
    Revert(mpsc::Sender<Vec<String>>),
    Pin(Action, mpsc::Sender<Result<String, String>>),
    Unpin {
        dev: u64,
        ino: u64,
        reply: mpsc::Sender<Vec<String>>,
    },
    Reconfigure(EngineOptions),
    Hooks(Arc<Hooks>),
}

enum Message {
    Wishes(Vec<Wish>),
    Command(Command),
}

/// The way to the actions thread, and what it last published.
pub struct ActionsHandle {
    queue: mpsc::SyncSender<Message>,
    view: Arc<RwLock<ActionsView>>,
}

impl ActionsHandle {
    /// Starts the actions thread with `engine` (already restored from the journal).
    pub fn start(engine: Engine) -> (ActionsHandle, std::thread::JoinHandle<()>) {
        let (queue, inbox) = mpsc::sync_channel(QUEUE);
        let view = Arc::new(RwLock::new(engine.view()));
        let published = Arc::clone(&view);
        let thread = super::spawn("infermem-actions", move || work(engine, inbox, &published));
        (ActionsHandle { queue, view }, thread)
    }

    /// What `infermem actions` shows, as of the last round.
    pub fn view(&self) -> ActionsView {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Offers the policy's wishes; dropped when the thread is still busy with the last ones
    /// (the next round brings fresh ones).
    pub fn offer(&self, wishes: Vec<Wish>) {
        let _ = self.queue.try_send(Message::Wishes(wishes));
    }

    /// Sends a command (blocking while the queue is full).
    pub fn send(&self, command: Command) -> Result<(), String> {
        self.queue
            .send(Message::Command(command))
            .map_err(|_| "the actions thread has stopped".to_owned())
    }
}

/// The actions thread: runs until every sender is gone, then drops the engine (which
/// reverts what it applied).
fn work(mut engine: Engine, inbox: mpsc::Receiver<Message>, view: &RwLock<ActionsView>) {
    while let Ok(message) = inbox.recv() {
        match message {
            Message::Wishes(wishes) => engine.reconcile(wishes),
            Message::Command(Command::Revert(reply)) => {
                let _ = reply.send(engine.revert_and_observe());
            }
            Message::Command(Command::Pin(action, reply)) => {
                let _ = reply.send(engine.pin_by_hand(action));
            }
            Message::Command(Command::Unpin { dev, ino, reply }) => {
                let _ = reply.send(engine.unpin_by_hand(dev, ino));
            }
            Message::Command(Command::Reconfigure(options)) => engine.reconfigure(options),
            Message::Command(Command::Hooks(hooks)) => engine.set_hooks(hooks),
        }
        *view.write().unwrap_or_else(|p| p.into_inner()) = engine.view();
    }
}

/// The stage's state in the agent: the way to the actions thread (daemon mode), the hooks,
/// and what was alerted.
#[derive(Default)]
pub struct Stage {
    pub actions: Option<ActionsHandle>,
    pub hooks: Option<Arc<Hooks>>,
    /// What sees every alert besides the hooks (the OTLP log export), kept across reloads.
    pub tap: Option<Arc<dyn AlertTap>>,
    alerts: Alerts,
}

impl Stage {
    /// Passes a reloaded policy's mode and limits to the engine, and new hooks (when their
    /// config changed) to the stage and the engine.
    pub fn reconfigure(&mut self, policy: &PolicyConfig, hooks: Option<HooksConfig>) {
        if let Some(config) = hooks {
            let hooks = Arc::new(Hooks::start(config).with_tap(self.tap.clone()));
            self.hooks = Some(Arc::clone(&hooks));
            if let Some(actions) = &self.actions {
                let _ = actions.send(Command::Hooks(hooks));
            }
        }
        match &self.actions {
            Some(actions) => _ = actions.send(Command::Reconfigure(engine_options(policy))),
            None if !policy.workloads.is_empty() => {
                tracing::warn!(
                    "the policy's workload rules need the action journal: restart the agent"
                );
            }
            None => {}
        }
    }
}

/// The engine's options from the policy.
pub fn engine_options(policy: &PolicyConfig) -> EngineOptions {
    EngineOptions {
        mode: policy.mode,
        journal: policy.journal.clone(),
        max_actions_per_minute: policy.max_actions_per_minute,
        min_change_interval: policy.min_change_interval.0,
    }
}

/// The stage's part of a pipeline round: the policy's wishes to the actions thread, and
/// alerts to the hooks.
pub fn round(agent: &Agent, policy: &PolicyConfig) {
    let mut stage = agent.act();
    if let Some(actions) = &stage.actions {
        actions.offer(wishes(agent, policy));
    }
    if let Some(hooks) = stage.hooks.clone() {
        let registry = agent.lock();
        stage.alerts.fire(&registry, &hooks);
    }
}

/// The policy's wishes for the registry as it is now.
pub fn wishes(agent: &Agent, policy: &PolicyConfig) -> Vec<Wish> {
    if policy.workloads.is_empty() {
        return Vec::new();
    }
    let (candidates, cgroup_usage) = {
        let registry = agent.lock();
        (
            matched_processes(&registry, policy),
            cgroup_usage(&registry),
        )
    };
    let processes = candidates
        .into_iter()
        .map(|(mut view, mut ranges)| {
            if ranges.len() < view.model_paths.len() {
                ranges = ranges_from_maps(&view);
            }
            view.models = identify_models(&view, &ranges);
            view
        })
        .collect();
    let view = View {
        processes,
        cgroup_usage,
        version: agent.layout.memory_hierarchy().map(|(v, _)| v),
    };
    decide::decide(policy, &view)
}

/// A tracked process, and the model files it maps (identified through its mappings); the
/// file mappings from `model_mapping_min` up when no model file was recognised.
pub fn model_files_of(agent: &Agent, pid: u32) -> Option<(ProcessRef, Vec<MappedModel>)> {
    let min_bytes = agent.settings().model_min_bytes;
    let (view, ranges) = {
        let registry = agent.lock();
        let p = registry.processes.get(&pid)?;
        let view = process_view(p, &registry);
        let mut ranges = model_ranges(p, &view.model_paths);
        if ranges.is_empty() {
            ranges = p
                .state
                .file_mappings
                .values()
                .filter(|m| m.end - m.start >= min_bytes)
                .filter_map(|m| Some((m.path.as_ref()?.display().to_string(), m.start, m.end)))
                .collect();
        }
        (view, ranges)
    };
    let mut models = identify_models(&view, &ranges);
    models.dedup_by_key(|m| (m.dev, m.ino));
    Some((view.process?, models))
}

/// A model file's path and the address range of one mapping of it.
type ModelRange = (String, u64, u64);

/// The processes some rule of the policy matches, with their model mappings.
fn matched_processes(
    registry: &Registry,
    policy: &PolicyConfig,
) -> Vec<(ProcessView, Vec<ModelRange>)> {
    let matched = |s: &Subject| {
        policy.workloads.iter().any(|r| r.matcher.matches(s))
            || policy.neighbours.iter().any(|r| r.matcher.matches(s))
    };
    registry
        .processes
        .values()
        .filter_map(|p| {
            let view = process_view(p, registry);
            matched(&view.subject()).then(|| {
                let ranges = model_ranges(p, &view.model_paths);
                (view, ranges)
            })
        })
        .collect()
}

fn cgroup_usage(registry: &Registry) -> HashMap<String, u64> {
    registry
        .cgroups
        .iter()
        .filter_map(|(path, c)| Some((path.clone(), c.last.usage_bytes?)))
        .collect()
}

fn process_view(p: &TrackedProcess, registry: &Registry) -> ProcessView {
    let id = &p.state.identity;
    let report = p.model.report.as_ref();
    let prediction = report.and_then(|r| r.prediction.as_ref());
    ProcessView {
        process: Some(ProcessRef {
            pid: id.pid,
            start_time: id.start_time,
            comm: id.comm.clone(),
        }),
        exe: id.exe.as_ref().map(|e| e.display().to_string()),
        uid: p.uid,
        cgroup: p.memcg.clone(),
        runtime: report.map(|r| r.runtime.id()),
        models: Vec::new(),
        model_paths: report.map_or_else(Vec::new, |r| {
            r.files
                .iter()
                .map(|f| f.file.path.display().to_string())
                .collect()
        }),
        weights_bytes: prediction.map_or(0, |p| p.weights_bytes),
        kv_bytes: prediction
            .and_then(|p| p.kv_bytes_now.or(p.kv_bytes_at_max_ctx))
            .unwrap_or(0),
        rss_bytes: p.usage.map_or(0, |u| u.rss),
        level: risk_level(p, registry),
    }
}

/// How much a process is at risk: the worst of its own level, those of the limited cgroups
/// it lives under, and the host's (a process that is not a model is assessed only through
/// its domains).
fn risk_level(p: &TrackedProcess, registry: &Registry) -> Level {
    let cgroups = registry
        .cgroups
        .iter()
        .filter(|(path, c)| c.is_limit() && p.memcg.as_deref().is_some_and(|m| is_under(m, path)))
        .map(|(_, c)| c.assessment.level);
    cgroups
        .chain([p.assessment.level, registry.host.assessment.level])
        .max()
        .unwrap_or_default()
}

/// For each model file, the address range of one mapping of it.
fn model_ranges(p: &TrackedProcess, paths: &[String]) -> Vec<ModelRange> {
    paths
        .iter()
        .filter_map(|path| {
            let m = p.state.file_mappings.values().find(|m| {
                m.path
                    .as_ref()
                    .is_some_and(|mp| mp.as_os_str() == path.as_str())
            })?;
            Some((path.clone(), m.start, m.end))
        })
        .collect()
}

/// The mappings of a process's model files read from `/proc/<pid>/maps`, for those the
/// registry's mappings do not name (a mapping the probes saw has no path until the maps are
/// read again).
fn ranges_from_maps(view: &ProcessView) -> Vec<ModelRange> {
    let Some(pid) = view.process.as_ref().map(|p| p.pid) else {
        return Vec::new();
    };
    let vmas = crate::collect::maps::vmas(pid, false).unwrap_or_default();
    crate::collect::maps::mapped_files(&vmas, 0)
        .into_iter()
        .filter(|f| {
            view.model_paths
                .iter()
                .any(|p| f.path.as_os_str() == p.as_str())
        })
        .filter_map(|f| {
            let (start, end) = *f.ranges.first()?;
            Some((f.path.display().to_string(), start, end))
        })
        .collect()
}

/// The identity of the file each mapping holds, read through
/// `/proc/<pid>/map_files/<start>-<end>` (the file actually mapped, whatever its path names
/// now); a model that cannot be identified is left out (never pinned).
fn identify_models(view: &ProcessView, ranges: &[ModelRange]) -> Vec<MappedModel> {
    let Some(pid) = view.process.as_ref().map(|p| p.pid) else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|(path, start, end)| {
            let ((dev, ino), bytes) = crate::act::pin::mapped_file_id(pid, *start, *end)?;
            Some(MappedModel {
                path: path.clone(),
                dev,
                ino,
                bytes,
            })
        })
        .collect()
}

/// What was last alerted, so that each alert is sent when it starts, not every round.
#[derive(Default)]
pub struct Alerts {
    critical: HashMap<String, bool>,
    thrashing: HashMap<String, bool>,
    oom_kills_seen: Option<f64>,
}

impl Alerts {
    /// Fires the hooks for targets that turned critical or started thrashing, and for OOM
    /// kills since the last round.
    pub fn fire(&mut self, registry: &Registry, hooks: &Hooks) {
        let host = std::iter::once(("host".to_owned(), &registry.host.assessment));
        let cgroups = registry
            .cgroups
            .iter()
            .map(|(path, c)| (format!("cgroup:{path}"), &c.assessment));
        let processes = registry.processes.values().map(|p| {
            let id = &p.state.identity;
            (format!("pid:{}:{}", id.pid, id.start_time), &p.assessment)
        });
        // Rebuilt each round: targets that are gone are forgotten.
        let (mut critical, mut thrashing) = (HashMap::new(), HashMap::new());
        for (key, assessment) in host.chain(cgroups).chain(processes) {
            let is_critical = assessment.level == Level::Critical;
            if edge(&self.critical, &mut critical, &key, is_critical) {
                hooks.fire(alert("critical", &key, assessment));
            }
            if edge(&self.thrashing, &mut thrashing, &key, assessment.thrashing) {
                hooks.fire(alert("thrashing", &key, assessment));
            }
        }
        (self.critical, self.thrashing) = (critical, thrashing);
        let seen = self.oom_kills_seen.unwrap_or(0.0);
        for kill in registry.oom_kills.iter().filter(|k| k.ts_unix > seen) {
            hooks.fire(AlertEvent {
                kind: "oom_kill".into(),
                key: format!("pid:{}", kill.pid),
                body: serde_json::json!({
                    "pid": kill.pid, "comm": kill.comm, "uid": kill.uid, "cgroup": kill.memcg,
                    "rss_anon_bytes": kill.rss_anon_bytes, "rss_file_bytes": kill.rss_file_bytes,
                    "killed_at": kill.ts_unix,
                }),
            });
        }
        self.oom_kills_seen = registry
            .oom_kills
            .back()
            .map(|k| k.ts_unix)
            .or(self.oom_kills_seen);
    }
}

/// Records `now` for `key` (in `next`) and says whether it just turned true (from `last`).
fn edge(
    last: &HashMap<String, bool>,
    next: &mut HashMap<String, bool>,
    key: &str,
    now: bool,
) -> bool {
    next.insert(key.to_owned(), now);
    now && !last.get(key).copied().unwrap_or(false)
}

fn alert(kind: &str, key: &str, assessment: &crate::predict::Assessment) -> AlertEvent {
    AlertEvent {
        kind: kind.into(),
        key: key.to_owned(),
        body: serde_json::json!({
            "level": assessment.level,
            "eta_seconds": assessment.eta_seconds,
            "domain": assessment.domain,
            "victim_pid": assessment.victim_pid,
            "thrashing": assessment.thrashing,
            "reasons": assessment.reasons,
        }),
    }
}

/// How long an API call waits for the actions thread (a pin faults a whole file in).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

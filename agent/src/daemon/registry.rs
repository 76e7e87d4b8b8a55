//! The registry: everything the agent knows about every process, every memory cgroup and
//! the host, as the probes and collectors report it. Plain data with no I/O; the other
//! stages read and update it under one lock, for short moments.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use crate::{
    collect::{cgroup::MemoryCgroup, host::HostMemory, memory::MemoryUsage, pressure::Pressure},
    model::analysis::ModelReport,
    predict::{Assessment, DomainSample, LevelTracker, Sample},
    state::ProcessState,
};

/// Seconds of history kept per series: the predictor's window and some margin.
pub const HISTORY_S: f64 = 90.0;

/// How long an ended process is remembered (for `watch` to report how it ended).
pub const ENDED_RETENTION: Duration = Duration::from_secs(60);

/// How many OOM kills are remembered.
pub const MAX_OOM_KILLS: usize = 256;

/// A process's identity: a reused pid has another start time and is another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    pub pid: u32,
    /// Clock ticks after boot, `/proc/<pid>/stat` field 22.
    pub start_time: u64,
}

/// A series of timestamped values, trimmed to [`HISTORY_S`].
#[derive(Debug, Clone, Default)]
pub struct History(VecDeque<Sample>);

impl History {
    /// Appends a point and drops those older than the history.
    pub fn push(&mut self, t: f64, value: f64) {
        self.0.push_back(Sample { t, value });
        while self.0.front().is_some_and(|s| s.t < t - HISTORY_S) {
            self.0.pop_front();
        }
    }

    /// The latest value.
    pub fn last(&self) -> Option<f64> {
        self.0.back().map(|s| s.value)
    }

    /// The points, oldest first.
    pub fn to_vec(&self) -> Vec<Sample> {
        self.0.iter().copied().collect()
    }
}

/// How long a `smaps_rollup` read stands in for a process whose resident size has not moved.
pub const ROLLUP_REUSE: Duration = Duration::from_secs(10);

/// Within how many bytes the resident size counts as unmoved.
pub const ROLLUP_SLACK_BYTES: u64 = 1 << 20;

/// A `smaps_rollup` read (which walks the page tables under the mmap lock), with the cheap
/// resident figure of `statm` at that moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rollup {
    pub usage: MemoryUsage,
    /// `statm` resident bytes when it was read.
    pub resident: u64,
    pub at: Instant,
}

impl Rollup {
    /// Whether the read still describes the process: its resident size (from `statm`) moved
    /// less than [`ROLLUP_SLACK_BYTES`], within [`ROLLUP_REUSE`].
    pub fn still_valid(&self, resident: u64, now: Instant) -> bool {
        resident.abs_diff(self.resident) < ROLLUP_SLACK_BYTES
            && now.duration_since(self.at) < ROLLUP_REUSE
    }
}

/// A process's virtual size (`statm`) and page faults since it started (`stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmCounters {
    pub virtual_bytes: u64,
    pub minor_faults: u64,
    pub major_faults: u64,
}

/// What the model analysis concluded about a process, and when it must run again.
#[derive(Debug, Clone, Default)]
pub struct ModelKnowledge {
    /// None: not a model process (or not analysed yet).
    pub report: Option<ModelReport>,
    /// Its mappings or allocations changed since the last analysis.
    pub dirty: bool,
    /// An analysis is running.
    pub in_flight: bool,
    pub analysed_at: Option<Instant>,
}

/// A tracked process.
#[derive(Debug, Clone)]
pub struct TrackedProcess {
    pub state: ProcessState,
    pub uid: u32,
    /// Path of its memory cgroup, as `/proc/<pid>/cgroup` names it.
    pub memcg: Option<String>,
    pub model: ModelKnowledge,
    /// It maps a model-sized file or is a known runtime: sampled often, analysed on change.
    pub candidate: bool,
    /// A file was mapped since `/proc/<pid>/maps` was last read (its path is not known).
    pub maps_stale: bool,
    /// Its mappings from before the agent saw it are in `state` (read from /proc, or none
    /// because the agent saw its exec).
    pub seeded: bool,
    pub usage: Option<MemoryUsage>,
    pub usage_at: Option<Instant>,
    /// The last `smaps_rollup` read, reused while the process's resident size stays put.
    pub rollup: Option<Rollup>,
    /// Virtual size and fault counters at the last read.
    pub vm: Option<VmCounters>,
    /// `/proc/<pid>/oom_score` and `oom_score_adj` at the last read.
    pub oom_score: Option<(u32, i32)>,
    /// RSS + swap over time (model processes and watched ones).
    pub rss: History,
    /// Cumulative faults on its model-file mappings (eBPF).
    pub model_faults: History,
    /// Until when a `watch` wants it sampled every tick.
    pub watched_until: Option<Instant>,
    pub tracker: LevelTracker,
    pub assessment: Assessment,
}

impl TrackedProcess {
    /// A process with nothing sampled yet.
    pub fn new(state: ProcessState, uid: u32, memcg: Option<String>) -> Self {
        TrackedProcess {
            state,
            uid,
            memcg,
            model: ModelKnowledge::default(),
            candidate: false,
            maps_stale: false,
            seeded: false,
            usage: None,
            usage_at: None,
            rollup: None,
            vm: None,
            oom_score: None,
            rss: History::default(),
            model_faults: History::default(),
            watched_until: None,
            tracker: LevelTracker::default(),
            assessment: Assessment::default(),
        }
    }

    pub fn key(&self) -> ProcessKey {
        ProcessKey {
            pid: self.state.identity.pid,
            start_time: self.state.identity.start_time,
        }
    }

    /// Resident bytes of its model files, as far as the last analysis and the last usage
    /// read tell (the file pages resident now cap what the analysis saw).
    pub fn model_file_bytes(&self) -> u64 {
        let Some(report) = &self.model.report else {
            return 0;
        };
        let analysed: u64 = report.files.iter().map(|f| f.resident_bytes).sum();
        self.usage.map_or(analysed, |u| analysed.min(u.file))
    }

    /// Whether it is sampled every tick.
    pub fn sampled_often(&self, now: Instant) -> bool {
        self.model.report.is_some() || self.watched_until.is_some_and(|until| until > now)
    }
}

/// How a process left the registry.
#[derive(Debug, Clone)]
pub struct EndedProcess {
    pub key: ProcessKey,
    pub uid: u32,
    /// `exited` or `oom-killed`.
    pub reason: &'static str,
    pub at: Instant,
    /// What the OOM killer recorded, if it killed the process.
    pub oom_kill: Option<crate::probes::OomVictim>,
    /// Its state when it ended.
    pub state: ProcessState,
}

/// A memory cgroup with a history.
#[derive(Debug, Clone)]
pub struct TrackedCgroup {
    pub last: MemoryCgroup,
    pub pressure: Option<Pressure>,
    pub events: crate::collect::cgroup::MemoryEvents,
    pub samples: VecDeque<DomainSample>,
    pub tracker: LevelTracker,
    pub assessment: Assessment,
}

impl TrackedCgroup {
    /// A cgroup with only its first read.
    pub fn new(last: MemoryCgroup) -> Self {
        TrackedCgroup {
            last,
            pressure: None,
            events: Default::default(),
            samples: VecDeque::new(),
            tracker: LevelTracker::default(),
            assessment: Assessment::default(),
        }
    }

    /// Whether the OOM killer enforces a limit at this cgroup itself.
    pub fn is_limit(&self) -> bool {
        self.last.limit_bytes.is_some() && self.last.limit_bytes == self.last.effective_limit_bytes
    }
}

/// The host's memory with a history.
#[derive(Debug, Clone, Default)]
pub struct TrackedHost {
    pub last: Option<HostMemory>,
    pub pressure: Option<Pressure>,
    pub samples: VecDeque<DomainSample>,
    /// Cumulative `workingset_refault_file`.
    pub refault_file: History,
    pub tracker: LevelTracker,
    pub assessment: Assessment,
}

/// An OOM kill the probes saw.
#[derive(Debug, Clone)]
pub struct OomKillRecord {
    pub ts_unix: f64,
    pub pid: u32,
    pub uid: Option<u32>,
    pub comm: String,
    pub memcg: Option<String>,
    pub rss_anon_bytes: Option<u64>,
    pub rss_file_bytes: Option<u64>,
}

/// Everything the agent knows.
#[derive(Debug, Default)]
pub struct Registry {
    /// Live processes by pid (one process per pid at a time; its key tells reuse).
    pub processes: HashMap<u32, TrackedProcess>,
    pub ended: VecDeque<EndedProcess>,
    /// Pids of /proc that are no process to track (kernel threads), skipped by rescans
    /// while they live.
    pub not_processes: std::collections::HashSet<u32>,
    /// Memory cgroups by path.
    pub cgroups: HashMap<String, TrackedCgroup>,
    pub host: TrackedHost,
    pub oom_kills: VecDeque<OomKillRecord>,
    /// OOM kills seen since the agent started (`oom_kills` keeps the latest only).
    pub oom_kills_seen: u64,
    /// Events read from the probes, and records that could not be decoded.
    pub events: u64,
    pub undecodable: u64,
}

impl Registry {
    /// The live process with this identity.
    pub fn process(&self, key: ProcessKey) -> Option<&TrackedProcess> {
        self.processes.get(&key.pid).filter(|p| p.key() == key)
    }

    pub fn process_mut(&mut self, key: ProcessKey) -> Option<&mut TrackedProcess> {
        self.processes.get_mut(&key.pid).filter(|p| p.key() == key)
    }

    /// Adds a process, replacing an older one with the same pid (a reused pid).
    pub fn insert(&mut self, process: TrackedProcess, now: Instant) {
        let pid = process.state.identity.pid;
        if let Some(old) = self.processes.remove(&pid) {
            self.remember_end(&old, "exited", now);
        }
        self.processes.insert(pid, process);
    }

    /// Removes the process with this identity, remembering how it ended.
    pub fn remove(&mut self, key: ProcessKey, reason: &'static str, now: Instant) {
        if let Some(old) = self
            .process(key)
            .is_some()
            .then(|| self.processes.remove(&key.pid))
        {
            self.remember_end(&old.expect("checked above"), reason, now);
        }
    }

    fn remember_end(&mut self, process: &TrackedProcess, reason: &'static str, now: Instant) {
        let reason = if process.state.oom_kill.is_some() {
            "oom-killed"
        } else {
            reason
        };
        self.ended.push_back(EndedProcess {
            key: process.key(),
            uid: process.uid,
            reason,
            at: now,
            oom_kill: process.state.oom_kill.clone(),
            state: process.state.clone(),
        });
        while self
            .ended
            .front()
            .is_some_and(|e| now.duration_since(e.at) > ENDED_RETENTION)
        {
            self.ended.pop_front();
        }
    }

    /// How the process with this identity ended, if it did recently.
    pub fn end_of(&self, key: ProcessKey) -> Option<&EndedProcess> {
        self.ended.iter().rev().find(|e| e.key == key)
    }

    /// Whether the host or a limited memory cgroup is due to reach its limit within
    /// `horizon_s`, or a limited cgroup's need rose faster than `bytes_per_s` since the last
    /// sample (before a trend can be fitted).
    pub fn heading_for_a_limit(&self, horizon_s: f64, bytes_per_s: f64) -> bool {
        let soon = |a: &Assessment| a.eta_seconds.is_some_and(|eta| eta < horizon_s);
        let rising = |c: &TrackedCgroup| {
            let mut last = c.samples.iter().rev();
            match (last.next(), last.next()) {
                (Some(now), Some(before)) if now.t > before.t => {
                    let rise = now.needed_bytes() as f64 - before.needed_bytes() as f64;
                    rise / (now.t - before.t) > bytes_per_s
                }
                _ => false,
            }
        };
        soon(&self.host.assessment)
            || self
                .cgroups
                .values()
                .filter(|c| c.is_limit())
                .any(|c| soon(&c.assessment) || rising(c))
    }

    /// Records an OOM kill, forgetting the oldest past [`MAX_OOM_KILLS`].
    pub fn record_oom_kill(&mut self, kill: OomKillRecord) {
        if self.oom_kills.len() == MAX_OOM_KILLS {
            self.oom_kills.pop_front();
        }
        self.oom_kills.push_back(kill);
        self.oom_kills_seen += 1;
    }
}

/// Appends a domain sample and drops those older than the history.
pub fn push_sample(samples: &mut VecDeque<DomainSample>, sample: DomainSample) {
    samples.push_back(sample);
    while samples.front().is_some_and(|s| s.t < sample.t - HISTORY_S) {
        samples.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::process::ProcessIdentity;

    fn process(pid: u32, start_time: u64) -> TrackedProcess {
        let identity = ProcessIdentity {
            pid,
            start_time,
            comm: "x".into(),
            cmdline: Vec::new(),
            exe: None,
        };
        TrackedProcess::new(ProcessState::new(identity), 1000, None)
    }

    #[test]
    fn a_reused_pid_is_another_process() {
        let now = Instant::now();
        let mut registry = Registry::default();
        registry.insert(process(42, 100), now);
        let old = ProcessKey {
            pid: 42,
            start_time: 100,
        };
        let new = ProcessKey {
            pid: 42,
            start_time: 200,
        };
        registry.insert(process(42, 200), now);
        assert!(registry.process(old).is_none());
        assert!(registry.process(new).is_some());
        assert_eq!(registry.end_of(old).map(|e| e.reason), Some("exited"));
        // Removing the old identity leaves the new process alone.
        registry.remove(old, "exited", now);
        assert!(registry.process(new).is_some());
    }

    #[test]
    fn history_keeps_only_its_window() {
        let mut history = History::default();
        for t in 0..200 {
            history.push(t as f64, t as f64);
        }
        let points = history.to_vec();
        assert_eq!(points.first().unwrap().t, 199.0 - HISTORY_S);
        assert_eq!(points.len(), HISTORY_S as usize + 1);
    }
}

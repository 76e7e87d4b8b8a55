//! `infermem run`: the agent. One owner of the probes; data flows one way:
//!
//! 1. [`ingest`]: kernel events (exec, exit, OOM kills, mappings, allocations) into the
//!    registry, on the event thread;
//! 2. [`sample`]: the collectors on a schedule (host, maps, process memory, cgroups);
//! 3. [`registry`]: every process (pid + start time), memory cgroup and the host;
//! 4. [`analyse`]: model analysis of processes whose mappings changed, on its own thread;
//! 5. [`assess`]: the predictor over the registry's histories, with hysteresis;
//! 6. [`actions`]: the policy's wishes to the actions thread, alerts to the hooks;
//! 7. [`service`]: the local API's answers ([`crate::api::Service`]).
//!
//! [`lifecycle`] runs it all as a service (config, socket, signals, sd_notify); standalone
//! commands run the same pipeline in-process ([`Agent::standalone`]).

pub mod act_api;
pub mod actions;
pub mod analyse;
pub mod assess;
pub mod assess_gpu;
pub mod gpu;
pub mod gpu_api;
pub mod ingest;
pub mod lifecycle;
pub mod notify;

pub mod registry;
pub mod sample;
pub mod service;

use std::{
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use infermem_common::{LARGE_MAPPING_BYTES, Probe};

use crate::{
    collect::cgroup::CgroupLayout,
    predict,
    probes::{EventReader, ProbeOptions, Probes},
    state::ProcessState,
};

use registry::Registry;

/// How often the event thread wakes to check for shutdown when no event comes.
const EVENT_POLL: Duration = Duration::from_millis(200);

/// The tick while a domain heads for its limit.
const FAST_TICK: Duration = Duration::from_millis(250);

/// How often /proc is listed for processes the events did not announce (forks that never
/// exec'd, events lost) and for exits that were missed.
const RESCAN: Duration = Duration::from_secs(10);

/// What can change on a reload.
#[derive(Debug, Clone)]
pub struct Settings {
    pub predictor: predict::Config,
    /// The collection tick.
    pub interval: Duration,
    /// How often model (and watched) processes' memory is read.
    pub model_interval: Duration,
    /// How often other processes' memory is read.
    pub idle_interval: Duration,
    /// File mappings from this size up make a process a model candidate.
    pub model_min_bytes: u64,
    /// Most processes tracked.
    pub max_processes: usize,
    /// What to protect and how; whether to act.
    pub policy: crate::policy::PolicyConfig,
    /// Alert commands and webhooks.
    pub hooks: crate::act::hooks::HooksConfig,
    /// The NVIDIA driver and NVML (read at start; a reload does not change them).
    pub gpu: crate::gpu::GpuConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            predictor: predict::Config::default(),
            interval: Duration::from_secs(1),
            model_interval: Duration::from_secs(1),
            idle_interval: Duration::from_secs(30),
            model_min_bytes: infermem_common::BucketPolicy::HOST.min_mapping_bytes,
            max_processes: 65_536,
            policy: crate::policy::PolicyConfig::default(),
            hooks: crate::act::hooks::HooksConfig::default(),
            gpu: crate::gpu::GpuConfig::default(),
        }
    }
}

/// How the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `infermem run`, serving the API.
    Daemon,
    /// A command run without a daemon: the same pipeline, in-process.
    Standalone,
}

/// The agent's state, shared by its threads and the API.
pub struct Agent {
    registry: Mutex<Registry>,
    probes: Option<Mutex<Probes>>,
    /// Why the probes are not loaded.
    ebpf_reason: Option<String>,
    settings: RwLock<Settings>,
    pub(crate) layout: CgroupLayout,
    origin: Instant,
    started_unix: f64,
    mode: Mode,
    stop: AtomicBool,
    /// Seconds after `origin` at which the pipeline last finished a round (watchdog).
    heartbeat_ms: AtomicU64,
    /// The actions thread, the hooks and what was alerted (daemon mode).
    act: Mutex<actions::Stage>,
    /// The NVIDIA driver, the RM objects of every process, NVML.
    gpu: Mutex<crate::gpu::state::GpuState>,
}

impl Agent {
    /// An agent with its probes loaded (or the reason they are not) and an empty registry.
    pub fn new(probe_options: Option<&ProbeOptions>, settings: Settings, mode: Mode) -> Agent {
        let (probes, ebpf_reason) = match probe_options.map(Probes::load) {
            Some(Ok(probes)) => (Some(Mutex::new(probes)), None),
            Some(Err(err)) => (None, Some(err.to_string())),
            None => (None, Some("not requested".to_owned())),
        };
        Agent {
            registry: Mutex::new(Registry::default()),
            probes,
            ebpf_reason,
            layout: CgroupLayout::detect(),
            origin: Instant::now(),
            started_unix: unix_now(),
            mode,
            stop: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(0),
            act: Mutex::new(actions::Stage::default()),
            gpu: Mutex::new(crate::gpu::state::GpuState::new(&settings.gpu)),
            settings: RwLock::new(settings),
        }
    }

    /// The actions stage, locked (before the registry, if both are needed).
    pub fn act(&self) -> MutexGuard<'_, actions::Stage> {
        self.act
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The registry, locked. Hold it only to read or store, never across I/O.
    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The probes, locked (after the registry, if both are needed).
    pub fn probes(&self) -> Option<MutexGuard<'_, Probes>> {
        self.probes
            .as_ref()
            .map(|p| p.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Why eBPF is off, if it is.
    pub fn ebpf_reason(&self) -> Option<&str> {
        self.ebpf_reason.as_deref()
    }

    pub fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Applies reloaded settings from the next round on.
    pub fn reload(&self, settings: Settings) {
        let hooks = (self.settings().hooks != settings.hooks).then(|| settings.hooks.clone());
        self.act().reconfigure(&settings.policy, hooks);
        *self
            .settings
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = settings;
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn started_unix(&self) -> f64 {
        self.started_unix
    }

    /// Seconds since the agent started: the predictor's time axis.
    pub fn elapsed_s(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// Whether the memory cgroup at `path` exists.
    pub fn cgroup_exists(&self, path: &str) -> bool {
        let escapes = path.split('/').any(|c| c == "..");
        !escapes
            && self
                .layout
                .memory_hierarchy()
                .is_some_and(|(_, mount)| mount.join(path.trim_start_matches('/')).is_dir())
    }

    /// Asks every thread to stop.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// One line for `systemctl status`: what is tracked and the worst level.
    pub fn summary(&self) -> String {
        let registry = self.lock();
        let workloads = registry
            .processes
            .values()
            .filter(|p| p.model.report.is_some())
            .count();
        format!(
            "{} processes, {workloads} AI workloads; host {}",
            registry.processes.len(),
            registry.host.assessment.level
        )
    }

    /// How long ago the pipeline last finished a round.
    pub fn since_heartbeat(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Cumulative faults on the given address ranges of each process (eBPF), in one read of
    /// the probes' buckets; None without fault attribution.
    pub fn model_file_faults(&self, requests: &[(u32, &[(u64, u64)])]) -> Option<Vec<u64>> {
        let probes = self.probes()?;
        probes.attached(Probe::PageFault).then_some(())?;
        Some(probes.faults_in_ranges(requests))
    }

    /// Gives fault buckets to the model-sized file mappings of a process that existed before
    /// the probes (the probes give them to mappings made later).
    pub fn track_model_mappings(&self, pid: u32, state: &ProcessState, min_bytes: u64) {
        let Some(mut probes) = self.probes() else {
            return;
        };
        let min_bytes = min_bytes.max(LARGE_MAPPING_BYTES);
        for m in state.file_mappings.values() {
            if m.end - m.start >= min_bytes
                && let Err(err) = probes.track_file_mapping(pid, m.start, m.end)
            {
                tracing::debug!(pid, "could not track mapping {:#x}: {err}", m.start);
            }
        }
    }

    /// Reads every process in /proc into the registry (at start, and to catch up).
    pub fn seed(&self) {
        let max = self.settings().max_processes;
        let known: std::collections::HashSet<u32> = {
            let registry = self.lock();
            let tracked = registry.processes.keys();
            tracked.chain(&registry.not_processes).copied().collect()
        };
        let now = Instant::now();
        for pid in list_pids().into_iter().filter(|p| !known.contains(p)) {
            if self.lock().processes.len() >= max {
                tracing::warn!(max, "process registry full; raise collect.max_processes");
                break;
            }
            match ingest::read_process(pid, &self.layout) {
                Some(process) => self.lock().insert(process, now),
                // A kernel thread (or a process we may not read): not read again while its
                // pid lives.
                None => _ = self.lock().not_processes.insert(pid),
            }
        }
    }

    /// Reads every process in /proc with its mappings: the registry at start.
    pub fn seed_all(&self) {
        self.seed();
        sample::refresh_maps(self, usize::MAX);
    }

    /// Forgets processes that are gone without an exit event reaching us.
    fn reap(&self) {
        let live: std::collections::HashSet<u32> = list_pids().into_iter().collect();
        let gone: Vec<registry::ProcessKey> = self
            .lock()
            .processes
            .values()
            .filter(|p| !live.contains(&p.state.identity.pid))
            .map(|p| p.key())
            .collect();
        let now = Instant::now();
        let mut registry = self.lock();
        registry.not_processes.retain(|pid| live.contains(pid));
        for key in gone {
            registry.remove(key, "exited", now);
        }
    }

    /// One round of the pipeline: collect, analyse what changed (on the analysis thread),
    /// assess.
    pub fn round(&self, analysis: &mpsc::SyncSender<registry::ProcessKey>) {
        sample::tick(self);
        self.refresh_gpu();
        analyse::dispatch(self, analysis);
        let settings = self.settings();
        {
            let mut registry = self.lock();
            let gpu = self.gpu();
            assess::assess_all(&mut registry, &settings.predictor, &gpu);
        }
        actions::round(self, &settings.policy);
        let elapsed = self.origin.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(elapsed, Ordering::Relaxed);
    }

    /// The pipeline once, on the calling thread, for a standalone `ps` or `status`: the
    /// registry from /proc, one collection, every candidate analysed, one assessment
    /// (levels then come from headroom alone: one sample has no trend).
    pub fn snapshot(&self) {
        self.seed_all();
        sample::tick(self);
        self.refresh_gpu();
        analyse::analyse_due_now(self);
        // Model processes are now known: read their memory and cgroups with that knowledge.
        sample::tick(self);
        let cfg = self.settings().predictor;
        let mut registry = self.lock();
        let gpu = self.gpu();
        assess::assess_all(&mut registry, &cfg, &gpu);
    }

    /// Starts the event, pipeline and analysis threads; they run until [`Agent::request_stop`].
    pub fn start(self: &Arc<Self>) -> Vec<thread::JoinHandle<()>> {
        let mut threads = Vec::new();
        let reader = self.probes().and_then(|mut p| p.take_event_reader());
        if let Some(reader) = reader {
            let agent = Arc::clone(self);
            threads.push(spawn("infermem-events", move || agent.events(reader)));
        }
        let (queue, jobs) = mpsc::sync_channel(analyse::QUEUE);
        let agent = Arc::clone(self);
        threads.push(spawn("infermem-analysis", move || {
            analyse::worker(&agent, jobs)
        }));
        let agent = Arc::clone(self);
        threads.push(spawn("infermem-pipeline", move || agent.pipeline(queue)));
        threads
    }

    fn pipeline(&self, analysis: mpsc::SyncSender<registry::ProcessKey>) {
        let mut last_rescan = Instant::now();
        while !self.stopping() {
            let started = Instant::now();
            if last_rescan.elapsed() >= RESCAN {
                self.seed();
                self.reap();
                last_rescan = Instant::now();
            }
            self.round(&analysis);
            let interval = self.tick_interval();
            thread::sleep(interval.saturating_sub(started.elapsed()));
        }
    }

    /// The configured tick, shortened to [`FAST_TICK`] while some domain is due to reach its
    /// limit within the elevated horizon, or a limited cgroup grows: a fast allocator is then
    /// seen four times a second.
    fn tick_interval(&self) -> std::time::Duration {
        let settings = self.settings();
        let interval = settings.interval;
        let cfg = &settings.predictor;
        // Growth the predictor would not call flat over its window.
        let rise_per_s = cfg.flat_bytes as f64 / cfg.window_s;
        if self
            .lock()
            .heading_for_a_limit(cfg.elevated_eta_s, rise_per_s)
        {
            interval.min(FAST_TICK)
        } else {
            interval
        }
    }

    fn events(&self, mut reader: EventReader) {
        use std::os::fd::AsRawFd as _;
        let fd = reader.as_fd().as_raw_fd();
        while !self.stopping() {
            let mut pollfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the fd stays open while `reader` lives.
            unsafe { libc::poll(&mut pollfd, 1, EVENT_POLL.as_millis() as i32) };
            self.ingest_gpu(&mut reader);
            let (events, undecodable) = reader.drain();
            if events.is_empty() && undecodable == 0 {
                continue;
            }
            self.gpu_exits(&events);
            let mut registry = self.lock();
            registry.undecodable += undecodable as u64;
            ingest::apply_events(&mut registry, &events, &self.layout);
        }
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> thread::JoinHandle<()> {
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .expect("a thread can be spawned")
}

/// The pids in /proc.
fn list_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_tracks_this_process_by_pid_and_start_time_and_the_host() {
        let agent = Agent::new(None, Settings::default(), Mode::Standalone);
        agent.snapshot();
        let me = crate::collect::process::identity(std::process::id()).unwrap();
        let registry = agent.lock();
        let key = registry::ProcessKey {
            pid: me.pid,
            start_time: me.start_time,
        };
        let tracked = registry.process(key).expect("this process is tracked");
        assert!(tracked.seeded && tracked.usage.is_some());
        assert!(registry.host.last.is_some());
        assert_eq!(registry.host.samples.len(), 2);
        // No kernel threads: kthreadd (pid 2) has no address space.
        assert!(!registry.processes.contains_key(&2));
    }
}

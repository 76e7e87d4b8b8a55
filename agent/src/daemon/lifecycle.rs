//! `infermem run` as a service: starts the agent, serves the API on its socket, reloads on
//! SIGHUP, stops cleanly on SIGTERM or SIGINT (the probes are detached when the agent is
//! dropped), and talks to systemd (READY, RELOADING, STOPPING, WATCHDOG) when asked to.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    act::{apply::Target, engine::Engine, hooks::Hooks, pin::Pinner, safety::Guard},
    api::server::{self, ServerOptions},
    config::{self, AgentConfig},
    export::{
        AgentSource, ExportConfig, Source,
        otlp::{self, Otlp},
        prometheus,
    },
    policy::{self, PolicyConfig, PolicyMode},
    probes::ProbeOptions,
};

use super::{
    Agent, Mode, Settings,
    actions::{self, ActionsHandle},
    notify::Notifier,
    service::AgentService,
};

/// A watchdog ping is withheld when the pipeline has not finished a round for this long,
/// so that systemd restarts a stuck agent.
const STUCK: Duration = Duration::from_secs(30);

/// Everything `infermem run` needs, resolved from the config and the command line.
pub struct RunOptions {
    pub probes: ProbeOptions,
    pub settings: Settings,
    pub socket: PathBuf,
    pub socket_mode: u32,
    /// Group owning the socket (its members may connect).
    pub socket_gid: Option<u32>,
    /// Group whose members see every process.
    pub admin_gid: Option<u32>,
    /// The Prometheus endpoint and OTLP (restart-only).
    pub export: crate::export::ExportConfig,
    /// Re-reads the config for SIGHUP: the new settings, or why they were refused.
    pub reload: Box<dyn Fn() -> Result<Settings, String> + Send + Sync>,
}

/// What the command line overrides in the config's `[policy]`.
#[derive(Debug, Clone, Default)]
pub struct PolicyOverrides {
    /// `--mode`.
    pub mode: Option<PolicyMode>,
    /// `--policy FILE`: replaces the config's `[policy]` (re-read on SIGHUP too).
    pub file: Option<PathBuf>,
}

impl PolicyOverrides {
    /// The config's policy with the overrides applied.
    fn apply(&self, config: &mut AgentConfig) -> Result<(), String> {
        if let Some(path) = &self.file {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            config.policy = policy::parse_file(&text, path)?;
        }
        if let Some(mode) = self.mode {
            config.policy.mode = mode;
        }
        Ok(())
    }
}

impl RunOptions {
    /// The options from the config file at `path` (default [`config::DEFAULT_PATH`], all
    /// defaults when it does not exist); SIGHUP re-reads the same file.
    pub fn load(path: Option<&Path>, overrides: PolicyOverrides) -> Result<RunOptions, String> {
        let (mut config, source) = config::load(path).map_err(|e| e.to_string())?;
        overrides.apply(&mut config)?;
        let (socket_gid, admin_gid) = config.group_ids()?;
        let explicit = path.is_some();
        Ok(RunOptions {
            probes: config.probes.probe_options(),
            settings: settings(&config),
            socket: config.api.socket.clone(),
            socket_mode: config.api.socket_mode.0,
            socket_gid,
            admin_gid,
            export: config.export.clone(),
            reload: Box::new(move || {
                let path = explicit.then_some(source.as_path());
                let (mut config, _) = config::load(path).map_err(|e| e.to_string())?;
                overrides.apply(&mut config)?;
                Ok(settings(&config))
            }),
        })
    }
}

/// What a reload can change: the collectors' schedule and the predictor's thresholds.
fn settings(config: &AgentConfig) -> Settings {
    Settings {
        predictor: config.predictor.clone(),
        interval: config.collect.interval.0,
        model_interval: config.collect.model_process_interval.0,
        idle_interval: config.collect.idle_process_interval.0,
        model_min_bytes: config.probes.model_mapping_min.0,
        max_processes: config.collect.max_processes,
        policy: config.policy.clone(),
        hooks: config.hooks.clone(),
        gpu: config.gpu.clone(),
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(options: RunOptions) -> anyhow::Result<()> {
    let agent = Arc::new(Agent::new(
        Some(&options.probes),
        options.settings.clone(),
        Mode::Daemon,
    ));
    if let Some(reason) = agent.ebpf_reason() {
        tracing::warn!("eBPF is off ({reason}): running on procfs and cgroupfs alone");
    }
    let source: Arc<dyn Source> = Arc::new(AgentSource {
        agent: Arc::clone(&agent),
        command_line: options.export.command_line,
    });
    let otlp = start_otlp(&options.export, &source)?;
    let tap = otlp.as_ref().map(Otlp::alert_tap);
    agent.act().tap = tap.clone();
    let hooks = Hooks::start(options.settings.hooks.clone()).with_tap(tap);
    agent.act().hooks = Some(Arc::new(hooks));
    let actions_thread = start_actions(&agent, &options.settings.policy)?;
    agent.seed_all();
    agent.seed_nvidia_fds();
    // Loading the probes parsed the kernel's BTF (tens of MiB, freed since): give the freed
    // heap back to the system rather than keep it as the agent's resident memory.
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe { libc::malloc_trim(0) };
    tracing::info!(
        processes = agent.lock().processes.len(),
        "registry seeded from /proc"
    );
    let threads = agent.start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(serve(&agent, &options, source));
    agent.request_stop();
    for thread in threads {
        let _ = thread.join();
    }
    // The last sender gone, the actions thread reverts what it applied and ends.
    drop(agent.act().actions.take());
    if let Some(thread) = actions_thread {
        let _ = thread.join();
    }
    // A last export, then the exporter's threads end.
    drop(otlp);
    served
}

/// Starts the OTLP exporter when the config or the `OTEL_*` variables ask for it.
fn start_otlp(export: &ExportConfig, source: &Arc<dyn Source>) -> anyhow::Result<Option<Otlp>> {
    if !otlp::wanted(&export.otlp) {
        return Ok(None);
    }
    let otlp = Otlp::start(&export.otlp, Arc::clone(source)).map_err(anyhow::Error::msg)?;
    tracing::info!("exporting OpenTelemetry over OTLP");
    Ok(Some(otlp))
}

/// Opens the journal, reverts what an earlier run left in force, and starts the actions
/// thread. A policy with workload rules needs its journal (every action must be on record):
/// without one the agent does not start; with no rule, it runs without actions.
fn start_actions(
    agent: &Agent,
    policy: &PolicyConfig,
) -> anyhow::Result<Option<std::thread::JoinHandle<()>>> {
    let pinner = Pinner::new(policy.pin_budget.0, policy.pin_reserve.0);
    let started = Engine::start(
        actions::engine_options(policy),
        Guard::for_this_agent(&agent.layout),
        Target::new(&agent.layout, pinner),
        agent.act().hooks.clone(),
    );
    let journal = policy.journal.display();
    let engine = match started {
        Ok(engine) => engine,
        Err(err) if policy.workloads.is_empty() => {
            tracing::warn!("no action journal ({journal}: {err}): actions are off until a restart");
            return Ok(None);
        }
        Err(err) => anyhow::bail!("the action journal {journal}: {err}"),
    };
    tracing::info!(mode = %policy.mode, %journal, "policy engine ready");
    let (handle, thread) = ActionsHandle::start(engine);
    agent.act().actions = Some(handle);
    Ok(Some(thread))
}

async fn serve(
    agent: &Arc<Agent>,
    options: &RunOptions,
    source: Arc<dyn Source>,
) -> anyhow::Result<()> {
    let listener = server::bind(&options.socket, options.socket_gid, options.socket_mode)?;
    tracing::info!(socket = %options.socket.display(), "serving the local API");
    let (shutdown, stopped) = tokio::sync::watch::channel(false);
    if let Some(address) = options.export.prometheus {
        let metrics = prometheus::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("the Prometheus endpoint {address}: {e}"))?;
        tracing::info!(%address, "serving Prometheus metrics at /metrics");
        tokio::spawn(prometheus::serve(metrics, source, stopped.clone()));
    }
    let service = Arc::new(AgentService(Arc::clone(agent)));
    let server_options = ServerOptions {
        admin_gid: options.admin_gid,
    };
    let server = tokio::spawn(server::serve(listener, service, server_options, stopped));
    let notifier = Notifier::from_env();
    notifier.ready();
    let result = signals(agent, options, &notifier).await;
    notifier.stopping();
    let _ = shutdown.send(true);
    let _ = server.await;
    result
}

/// Handles signals (and the watchdog) until told to stop.
async fn signals(agent: &Agent, options: &RunOptions, notifier: &Notifier) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut watchdog = tokio::time::interval(
        notifier
            .watchdog_interval()
            .unwrap_or(Duration::from_secs(3600)),
    );
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                notifier.reloading();
                match (options.reload)() {
                    Ok(settings) => {
                        agent.reload(settings);
                        tracing::info!("configuration reloaded");
                    }
                    Err(why) => tracing::error!("configuration not reloaded: {why}"),
                }
                notifier.ready();
            }
            _ = watchdog.tick() => {
                if agent.since_heartbeat() < STUCK {
                    notifier.watchdog();
                    notifier.status(&agent.summary());
                } else {
                    tracing::error!("the pipeline has not finished a round for {STUCK:?}");
                }
            }
        }
    }
    tracing::info!("stopping: detaching the probes");
    Ok(())
}

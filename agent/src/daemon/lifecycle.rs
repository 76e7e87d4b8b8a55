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
    api::server::{self, ServerOptions},
    config::{self, AgentConfig},
    probes::ProbeOptions,
};

use super::{Agent, Mode, Settings, notify::Notifier, service::AgentService};

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
    /// Re-reads the config for SIGHUP: the new settings, or why they were refused.
    pub reload: Box<dyn Fn() -> Result<Settings, String> + Send + Sync>,
}

impl RunOptions {
    /// The options from the config file at `path` (default [`config::DEFAULT_PATH`], all
    /// defaults when it does not exist); SIGHUP re-reads the same file.
    pub fn load(path: Option<&Path>) -> Result<RunOptions, String> {
        let (config, source) = config::load(path).map_err(|e| e.to_string())?;
        let (socket_gid, admin_gid) = config.group_ids()?;
        let explicit = path.is_some();
        Ok(RunOptions {
            probes: config.probes.probe_options(),
            settings: settings(&config),
            socket: config.api.socket.clone(),
            socket_mode: config.api.socket_mode.0,
            socket_gid,
            admin_gid,
            reload: Box::new(move || {
                let path = explicit.then_some(source.as_path());
                let (config, _) = config::load(path).map_err(|e| e.to_string())?;
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
    agent.seed_all();
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
    let served = runtime.block_on(serve(&agent, &options));
    agent.request_stop();
    for thread in threads {
        let _ = thread.join();
    }
    served
}

async fn serve(agent: &Arc<Agent>, options: &RunOptions) -> anyhow::Result<()> {
    let listener = server::bind(&options.socket, options.socket_gid, options.socket_mode)?;
    tracing::info!(socket = %options.socket.display(), "serving the local API");
    let (shutdown, stopped) = tokio::sync::watch::channel(false);
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

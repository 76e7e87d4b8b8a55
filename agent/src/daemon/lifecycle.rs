//! `infermem run` as a service: starts the agent, serves the API on its socket, reloads on
//! SIGHUP, stops cleanly on SIGTERM or SIGINT (the probes are detached when the agent is
//! dropped), and talks to systemd (READY, RELOADING, STOPPING, WATCHDOG) when asked to.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api::server::{self, ServerOptions},
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
    /// The options from the config file at `path` (default: all defaults).
    pub fn load(path: Option<&std::path::Path>) -> Result<RunOptions, String> {
        if let Some(path) = path {
            return Err(format!("{}: config files are not read yet", path.display()));
        }
        Ok(RunOptions {
            probes: ProbeOptions::default(),
            settings: Settings::default(),
            socket: PathBuf::from(crate::api::DEFAULT_SOCKET),
            socket_mode: server::DEFAULT_SOCKET_MODE,
            socket_gid: None,
            admin_gid: None,
            reload: Box::new(|| Ok(Settings::default())),
        })
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
                } else {
                    tracing::error!("the pipeline has not finished a round for {STUCK:?}");
                }
            }
        }
    }
    tracing::info!("stopping: detaching the probes");
    Ok(())
}

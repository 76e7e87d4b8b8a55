//! The thin client commands (`ps`, `status`, `watch`, `inspect`, [`actions`]): each asks
//! the running agent over its socket, or, when none runs, runs the same pipeline in-process
//! and says so on stderr.

pub mod actions;
pub mod pin;
pub mod runtime;
pub mod top;

use std::{
    path::Path,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    api::{
        Peer, Service, WatchTarget,
        client::{Client, ClientError},
        proto,
    },
    daemon::{Agent, Mode, Settings, lifecycle, service::AgentService},
    doctor::AgentProbes,
    inspect::{self, InspectOptions},
    probes::ProbeOptions,
    report::{self, api_text},
};

/// Where the commands find the agent and how they run without it.
pub struct ClientOptions<'a> {
    pub socket: &'a Path,
    pub probes: ProbeOptions,
}

/// `infermem ps`.
pub fn ps(options: &ClientOptions, json: bool) -> ExitCode {
    let reply = match daemon(options) {
        Ok(Some(mut client)) => block_on(client.ps()),
        Ok(None) => Ok(standalone_snapshot().ps(&Peer::local())),
        Err(err) => Err(err),
    };
    print_reply(reply, json, api_text::render_ps)
}

/// `infermem status`.
pub fn status(options: &ClientOptions, json: bool) -> ExitCode {
    let reply = match daemon(options) {
        Ok(Some(mut client)) => block_on(client.status()),
        Ok(None) => Ok(standalone_snapshot().status(&Peer::local())),
        Err(err) => Err(err),
    };
    print_reply(reply, json, api_text::render_status)
}

/// `infermem watch`: a line per second until the target ends.
pub fn watch(options: &ClientOptions, target: WatchTarget, json: bool) -> ExitCode {
    let print = |update: &proto::WatchUpdate| {
        if json {
            println!("{}", api_text::watch_json_line(update));
        } else {
            println!("{}", api_text::render_watch_line(update));
        }
    };
    let result = match daemon(options) {
        Ok(Some(mut client)) => block_on(client.watch(&target, print)).map(|_| ()),
        Ok(None) => watch_standalone(options, target, print),
        Err(err) => Err(err),
    };
    exit_code(result.map(|_| ()))
}

/// `infermem inspect`: through the agent when one runs (its probes saw the process's
/// allocations), standalone otherwise.
pub fn inspect(
    options: &ClientOptions,
    pid: u32,
    duration: Duration,
    json: bool,
    require_ebpf: bool,
) -> ExitCode {
    match daemon(options) {
        Ok(Some(mut client)) => match block_on(client.inspect(pid, duration)) {
            Ok(reply) => print_inspect_json(&reply.report_json, json),
            Err(ClientError::Api(error)) => {
                if json && !error.report_json.is_empty() {
                    println!("{}", error.report_json);
                }
                eprintln!("error: {}", report::text::escape(&error.message));
                ExitCode::FAILURE
            }
            Err(err) => exit_code(Err(err)),
        },
        Ok(None) => inspect_standalone(options, (pid, duration), json, require_ebpf),
        Err(err) => exit_code(Err(err)),
    }
}

/// The probes of the running agent, for `doctor`; None when no agent runs.
pub fn agent_probes(options: &ClientOptions) -> Option<AgentProbes> {
    let mut client = block_on(Client::connect(options.socket)).ok()??;
    let info = block_on(client.status()).ok()?.daemon?;
    Some(AgentProbes {
        pid: info.pid,
        off: (!info.ebpf).then_some(info.ebpf_reason),
        unavailable: info.probes_unavailable,
    })
}

/// `infermem run`: the agent in the foreground with the config at `config` (or the default
/// path); `socket` overrides the config's.
pub fn run(
    config: Option<&Path>,
    socket: Option<&Path>,
    overrides: lifecycle::PolicyOverrides,
    prometheus: Option<std::net::SocketAddr>,
) -> ExitCode {
    let mut options = match lifecycle::RunOptions::load(config, overrides) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(socket) = socket {
        options.socket = socket.to_owned();
    }
    if prometheus.is_some() {
        options.export.prometheus = prometheus;
    }
    match lifecycle::run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The running agent, if any; a note on stderr when there is none.
fn daemon(options: &ClientOptions) -> Result<Option<Client>, ClientError> {
    let client = block_on(Client::connect(options.socket))?;
    if client.is_none() {
        eprintln!(
            "note: no infermem agent at {} (start it with `infermem run`); running standalone",
            options.socket.display()
        );
    }
    Ok(client)
}

/// The pipeline once, in-process, with procfs alone (probes loaded now would have seen
/// nothing).
fn standalone_snapshot() -> AgentService {
    let agent = Arc::new(Agent::new(None, Settings::default(), Mode::Standalone));
    agent.snapshot();
    AgentService(agent)
}

/// An agent for a command that follows the pipeline live without a daemon (`watch`, `top`),
/// with its probes loaded or the reason they are not on stderr.
pub(crate) fn live_standalone_agent(options: &ClientOptions) -> Arc<Agent> {
    let agent = Arc::new(Agent::new(
        Some(&options.probes),
        Settings::default(),
        Mode::Standalone,
    ));
    if let Some(reason) = agent.ebpf_reason() {
        eprintln!("note: eBPF is off ({reason}); OOM kills are not seen as they happen");
    }
    agent
}

fn watch_standalone(
    options: &ClientOptions,
    mut target: WatchTarget,
    mut print: impl FnMut(&proto::WatchUpdate),
) -> Result<(), ClientError> {
    let agent = live_standalone_agent(options);
    agent.seed_all();
    let threads = agent.start();
    let service = AgentService(Arc::clone(&agent));
    let peer = Peer::local();
    let result = loop {
        let started = Instant::now();
        match service.watch(&peer, &mut target) {
            Ok(update) => {
                print(&update);
                if update.ended {
                    break Ok(());
                }
            }
            Err(error) => break Err(ClientError::Api(error)),
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
    };
    agent.request_stop();
    for thread in threads {
        let _ = thread.join();
    }
    result
}

fn inspect_standalone(
    options: &ClientOptions,
    (pid, duration): (u32, Duration),
    json: bool,
    require_ebpf: bool,
) -> ExitCode {
    let options = InspectOptions {
        pid,
        duration,
        probes: options.probes.clone(),
        require_ebpf,
    };
    match block_on(async { inspect::inspect(&options).await }) {
        Ok(report) => {
            print_inspect(&report, json);
            ExitCode::SUCCESS
        }
        Err(err) => {
            if json {
                print_json(&err.to_report());
            }
            eprintln!("error: {}", report::text::escape(&err.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// Prints an inspect report received as JSON: as it is, or rendered as text.
fn print_inspect_json(report_json: &str, json: bool) -> ExitCode {
    match serde_json::from_str::<report::InspectReport>(report_json) {
        Ok(report) => {
            print_inspect(&report, json);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: the agent's inspect report does not parse: {err}");
            ExitCode::FAILURE
        }
    }
}

fn print_inspect(report: &report::InspectReport, json: bool) {
    if json {
        print_json(report);
        return;
    }
    print!("{}", report::text::render(report));
    if let Some(reason) = &report.sources.reason {
        eprintln!("note: eBPF is off ({reason}); fault split and mapping faults need it");
    }
}

fn print_reply<T: serde::Serialize>(
    reply: Result<T, ClientError>,
    json: bool,
    render: fn(&T) -> String,
) -> ExitCode {
    match reply {
        Ok(reply) if json => {
            print_json(&reply);
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            print!("{}", render(&reply));
            ExitCode::SUCCESS
        }
        Err(err) => exit_code(Err(err)),
    }
}

fn exit_code(result: Result<(), ClientError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", report::text::escape(&err.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports serialise")
    );
}

/// Runs a future on the command's runtime (one for the whole command: the client's socket
/// belongs to the runtime it was opened on).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
        })
        .block_on(future)
}

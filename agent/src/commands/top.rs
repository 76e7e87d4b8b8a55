//! `infermem top`: a live dashboard of the AI workloads in the terminal. Like `ps` and
//! `status`, a thin client of the agent's API: `ps`, `status` and `actions` at each refresh,
//! `inspect` when a process is opened. Without an agent, the same pipeline runs in this
//! process (its probes too, when it may load them) and the header says `standalone`. The
//! screen itself is [`crate::top`]; here are the terminal, the loop and the data source.

use std::{
    collections::VecDeque,
    io::{self, BufRead as _, BufReader, IsTerminal as _},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    process::ExitCode,
    sync::mpsc::{self, Receiver},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ratatui::{
    DefaultTerminal,
    crossterm::event::{self, Event},
};

use super::{ClientOptions, block_on, daemon, exit_code};
use crate::{
    api::{Peer, Service, client::Client, client::ClientError, proto},
    daemon::{service::AgentService, unix_now},
    report,
    top::{
        input::{Effect, handle_key},
        model::{Actions, Data, InspectBody, Model},
        render::render,
    },
    units,
};

/// The last lines logged while the dashboard is on screen that are written out afterwards,
/// and how long the log may take to drain.
const LOG_LINES_KEPT: usize = 50;
const LOG_DRAIN: Duration = Duration::from_secs(1);
/// How long the inspect view samples a process.
const INSPECT_SAMPLE: Duration = Duration::from_secs(1);
/// The shortest and longest refresh intervals `--interval` accepts.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// `--interval`: a duration (`1s`, `500ms`) from 100 ms to 1 h.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = units::parse_duration(text)?;
    if (MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
        Ok(interval)
    } else {
        Err(format!("{text:?} is not between 100ms and 1h"))
    }
}

/// `infermem top`: refreshes every `interval` until `q`.
pub fn top(options: &ClientOptions, interval: Duration) -> ExitCode {
    if !io::stdout().is_terminal() {
        eprintln!("error: infermem top draws on a terminal; `infermem ps` or `status` print text");
        return ExitCode::FAILURE;
    }
    let mut source = match Source::open(options) {
        Ok(source) => source,
        Err(err) => return exit_code(Err(err)),
    };
    let mut model = Model::new(Data::default(), interval);
    model.refresh(source.fetch());
    match on_terminal(&mut source, &mut model) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: the terminal: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Restores the terminal (raw mode off, the main screen back) when dropped: on return, on an
/// error and when a panic unwinds (ratatui's panic hook restores it before the message).
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the dashboard on the alternate screen in raw mode, then restores the terminal and
/// writes what was logged meanwhile.
fn on_terminal(source: &mut Source, model: &mut Model) -> io::Result<()> {
    let _stderr = StderrCapture::start()?;
    let _restore = RestoreTerminal;
    let mut terminal = ratatui::try_init()?;
    event_loop(&mut terminal, source, model)
}

/// Stderr sent to a pipe while the dashboard is on screen (log lines of the pipeline, or a
/// panic's message, would draw over it); its last lines go to the real stderr when dropped,
/// after the terminal is restored.
struct StderrCapture {
    saved: OwnedFd,
    lines: Receiver<String>,
}

impl StderrCapture {
    fn start() -> io::Result<StderrCapture> {
        let saved = io::stderr().as_fd().try_clone_to_owned()?;
        let (reader, writer) = io::pipe()?;
        let (sender, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("infermem-top-log".to_owned())
            .spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            })?;
        // SAFETY: dup2 of an open pipe end onto fd 2; fd 2 stays open all along.
        if unsafe { libc::dup2(writer.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(StderrCapture { saved, lines })
    }
}

impl Drop for StderrCapture {
    fn drop(&mut self) {
        // SAFETY: dup2 of the saved stderr back onto fd 2, which closes the pipe's write end.
        unsafe { libc::dup2(self.saved.as_raw_fd(), libc::STDERR_FILENO) };
        let deadline = Instant::now() + LOG_DRAIN;
        let mut kept = VecDeque::new();
        let mut dropped = 0;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if kept.len() == LOG_LINES_KEPT {
                kept.pop_front();
                dropped += 1;
            }
            kept.push_back(line);
        }
        if dropped > 0 {
            eprintln!("({dropped} earlier lines logged while top ran are not shown)");
        }
        for line in kept {
            eprintln!("{line}");
        }
    }
}

/// Draws, waits for a key until the next refresh is due, applies it; refreshes on time.
fn event_loop(
    terminal: &mut DefaultTerminal,
    source: &mut Source,
    model: &mut Model,
) -> io::Result<()> {
    let mut next_refresh = Instant::now() + model.interval;
    loop {
        terminal.draw(|frame| render(frame, model))?;
        let wait = next_refresh.saturating_duration_since(Instant::now());
        if event::poll(wait)?
            && let Event::Key(key) = event::read()?
        {
            match handle_key(model, key) {
                Effect::Quit => return Ok(()),
                Effect::Inspect(pid) => {
                    // Show the pane sampling while the report is made.
                    terminal.draw(|frame| render(frame, model))?;
                    model.show_inspect(pid, source.inspect(pid));
                }
                Effect::None => {}
            }
        }
        if Instant::now() >= next_refresh {
            model.refresh(source.fetch());
            next_refresh = Instant::now() + model.interval;
        }
    }
}

/// Where the data come from: the running agent, or the pipeline run here.
enum Source {
    Agent(Client),
    InProcess(InProcess),
}

impl Source {
    /// The agent on the socket, or (with a note on stderr) the pipeline in this process.
    fn open(options: &ClientOptions) -> Result<Source, ClientError> {
        Ok(match daemon(options)? {
            Some(client) => Source::Agent(client),
            None => Source::InProcess(InProcess::start(options)),
        })
    }

    /// The workloads, the host, the OOM kills and the actions in force now.
    fn fetch(&mut self) -> Result<Data, String> {
        match self {
            Source::Agent(client) => {
                let ps = block_on(client.ps()).map_err(|e| e.to_string())?;
                let status = block_on(client.status()).map_err(|e| e.to_string())?;
                let actions = actions_of(block_on(client.actions()));
                Ok(data(ps, status, actions))
            }
            Source::InProcess(in_process) => {
                let (service, peer) = (&in_process.service, Peer::local());
                // Only a running agent acts: the pipeline here has no actions thread.
                let actions = Actions::Unavailable("none: only a running agent acts".to_owned());
                Ok(data(service.ps(&peer), service.status(&peer), actions))
            }
        }
    }

    /// The text inspect report of `pid`, sampled for [`INSPECT_SAMPLE`].
    fn inspect(&mut self, pid: u32) -> InspectBody {
        let reply = match self {
            Source::Agent(client) => block_on(client.inspect(pid, INSPECT_SAMPLE)),
            Source::InProcess(in_process) => block_on(in_process.service.inspect(
                &Peer::local(),
                pid,
                INSPECT_SAMPLE,
            ))
            .map_err(ClientError::Api),
        };
        let report_json = match reply {
            Ok(reply) => reply.report_json,
            Err(err) => return InspectBody::Failed(err.to_string()),
        };
        match serde_json::from_str::<report::InspectReport>(&report_json) {
            Ok(report) => {
                let text = report::text::escape_lines(&report::text::render(&report));
                InspectBody::Report(text.lines().map(str::to_owned).collect())
            }
            Err(err) => InspectBody::Failed(format!("the inspect report does not parse: {err}")),
        }
    }
}

/// One refresh's data from the agent's replies.
fn data(ps: proto::PsReply, status: proto::StatusReply, actions: Actions) -> Data {
    Data {
        mode: ps.daemon.map(|d| d.mode).unwrap_or_default(),
        refreshed_unix: unix_now(),
        workloads: ps.workloads,
        host: status.host,
        oom_kills: status.oom_kills,
        actions,
        error: None,
    }
}

/// The actions pane from the agent's `actions` reply: refused to callers who are neither root
/// nor in its admin group.
fn actions_of(reply: Result<proto::ActionsReply, ClientError>) -> Actions {
    match reply {
        Ok(reply) => Actions::InForce(reply.in_force),
        Err(ClientError::Api(error)) if error.kind == "permission_denied" => Actions::NotVisible,
        Err(err) => Actions::Unavailable(err.to_string()),
    }
}

/// The agent's pipeline in this process, with its threads, as `watch` runs it standalone:
/// trends build up from refresh to refresh.
struct InProcess {
    service: AgentService,
    threads: Vec<JoinHandle<()>>,
}

impl InProcess {
    /// Loads the probes (or says why not on stderr), takes a first snapshot so that the first
    /// screen has the workloads, and starts the pipeline's threads.
    fn start(options: &ClientOptions) -> InProcess {
        let agent = super::live_standalone_agent(options);
        agent.snapshot();
        let threads = agent.start();
        InProcess {
            service: AgentService(agent),
            threads,
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.service.0.request_stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_bounded() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(
            parse_interval("10ms")
                .unwrap_err()
                .contains("between 100ms and 1h")
        );
        assert!(parse_interval("2h").is_err());
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn refused_actions_are_not_visible_and_other_failures_say_why() {
        let refused = proto::Error {
            kind: "permission_denied".into(),
            message: "root only".into(),
            report_json: String::new(),
        };
        assert_eq!(
            actions_of(Err(ClientError::Api(refused))),
            Actions::NotVisible
        );
        let entry = proto::ActionEntry {
            description: "x".into(),
            ..Default::default()
        };
        let reply = proto::ActionsReply {
            in_force: vec![entry.clone()],
            ..Default::default()
        };
        assert_eq!(actions_of(Ok(reply)), Actions::InForce(vec![entry]));
        assert_eq!(
            actions_of(Err(ClientError::Closed)),
            Actions::Unavailable("the agent closed the connection without answering".to_owned())
        );
    }
}

//! The command hook: an argv run with no shell, the event JSON on its stdin (an in-memory
//! file, so that writing it never blocks), its stdout and stderr captured (the first 64 KiB)
//! for the log, and killed with whatever it started in its process group when it runs past
//! the timeout.

use std::{
    fs::File,
    io::{self, PipeReader, PipeWriter, Read, Seek, Write},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, ExitStatus},
    sync::{Arc, Mutex, PoisonError, mpsc},
    time::{Duration, Instant},
};

use rustix::{
    fs::{MemfdFlags, memfd_create},
    process::{Pid, Signal, kill_process_group},
};
use tracing::warn;

use super::stop::Stop;

/// The most output kept for the log.
pub(super) const OUTPUT_LIMIT: usize = 64 << 10;
/// How often a running command is checked on.
const POLL: Duration = Duration::from_millis(10);
/// How long, after the command ended, its output may take to reach its end (a process it
/// left behind may hold the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Checks a command's argv: empty (no command), or an absolute path then arguments, none
/// with a NUL byte.
pub(super) fn check_argv(argv: &[String]) -> Result<(), String> {
    let Some(program) = argv.first() else {
        return Ok(());
    };
    if program.is_empty() {
        return Err(
            "command[0] is empty: it names the program, e.g. [\"/usr/local/bin/page\", \"--json\"]"
                .into(),
        );
    }
    if !Path::new(program).is_absolute() {
        return Err(format!(
            "command[0] = {program:?} is not an absolute path (the command runs with no shell \
             and no PATH search)"
        ));
    }
    match argv.iter().position(|arg| arg.contains('\0')) {
        Some(i) => Err(format!("command[{i}] contains a NUL byte")),
        None => Ok(()),
    }
}

/// How a command ended.
enum Ended {
    Exited(ExitStatus),
    TimedOut,
    Stopped,
}

/// Runs `argv` with `input` on its stdin. Ok when it exits 0 within `timeout`; the error
/// says how it ended, with what it wrote.
pub(super) fn run(
    argv: &[String],
    input: &[u8],
    timeout: Duration,
    stop: &Stop,
) -> Result<(), String> {
    let stdin = input_file(input).map_err(|e| format!("cannot hold the event: {e}"))?;
    let (reader, writer) = io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let output = Output::capture(reader)?;
    let mut child = spawn(argv, stdin, writer)?;
    let why = match wait(&mut child, timeout, stop) {
        Ok(Ended::Exited(status)) if status.success() => return Ok(()),
        Ok(Ended::Exited(status)) => format!("{} ended with {status}", argv[0]),
        Ok(Ended::TimedOut) => format!("{} killed after the {timeout:?} timeout", argv[0]),
        Ok(Ended::Stopped) => format!("{} killed: the hooks stopped", argv[0]),
        Err(e) => format!("cannot wait for {}: {e}", argv[0]),
    };
    match output.text() {
        text if text.is_empty() => Err(why),
        text => Err(format!("{why}; its output: {text:?}")),
    }
}

/// The event in an in-memory file, at its start, for the command's stdin.
fn input_file(input: &[u8]) -> io::Result<File> {
    let mut file = File::from(memfd_create("infermem-alert", MemfdFlags::CLOEXEC)?);
    file.write_all(input)?;
    file.rewind()?;
    Ok(file)
}

/// Starts the command in a process group of its own, its stdout and stderr into `out`.
fn spawn(argv: &[String], stdin: File, out: PipeWriter) -> Result<Child, String> {
    let err = out
        .try_clone()
        .map_err(|e| format!("cannot make a pipe: {e}"))?;
    // The Command, holding this side's copies of the pipe, is dropped at the end of the
    // statement: the pipe ends when the command (and what it started) closes it.
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(stdin)
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", argv[0]))
}

/// Waits for the command until `timeout` or until the hooks stop; then kills it.
fn wait(child: &mut Child, timeout: Duration, stop: &Stop) -> io::Result<Ended> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Ended::Exited(status)),
            Ok(None) => {}
            Err(e) => {
                kill(child);
                return Err(e);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            kill(child);
            return Ok(Ended::TimedOut);
        }
        if stop.wait(left.min(POLL)) {
            kill(child);
            return Ok(Ended::Stopped);
        }
    }
}

/// SIGKILLs the command's process group (the command, and what it started there), then
/// reaps the command. Unreaped, its pid (the group's id) cannot have been reused.
fn kill(child: &mut Child) {
    let group = i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .filter(|pid| !pid.is_init());
    let killed = match group {
        Some(group) => kill_process_group(group, Signal::KILL).map_err(io::Error::from),
        None => child.kill(),
    };
    if let Err(e) = killed {
        warn!("cannot kill the hook command {}: {e}", child.id());
    }
    if let Err(e) = child.wait() {
        warn!("cannot reap the hook command {}: {e}", child.id());
    }
}

/// What a command writes, read by a thread of its own so that the command never blocks on
/// a full pipe: the first [`OUTPUT_LIMIT`] bytes are kept, the rest read and dropped.
struct Output {
    captured: Arc<Mutex<Captured>>,
    /// Disconnected when the reading thread has reached the pipe's end.
    done: mpsc::Receiver<()>,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Output {
    fn capture(mut pipe: PipeReader) -> Result<Output, String> {
        let captured = Arc::new(Mutex::new(Captured::default()));
        let (done_tx, done) = mpsc::channel::<()>();
        let into = Arc::clone(&captured);
        std::thread::Builder::new()
            .name("infermem-hook-out".into())
            .spawn(move || {
                let _done = done_tx;
                drain(&mut pipe, &into);
            })
            .map_err(|e| format!("cannot start a thread for the command's output: {e}"))?;
        Ok(Output { captured, done })
    }

    /// The output as text, once the pipe has ended or after [`OUTPUT_GRACE`].
    fn text(&self) -> String {
        let _ = self.done.recv_timeout(OUTPUT_GRACE);
        let captured = self.captured.lock().unwrap_or_else(PoisonError::into_inner);
        let mut text = String::from_utf8_lossy(&captured.bytes).trim().to_owned();
        if captured.truncated {
            text.push_str(" [cut at 64 KiB]");
        }
        text
    }
}

/// Reads `pipe` to its end, keeping the first [`OUTPUT_LIMIT`] bytes.
fn drain(pipe: &mut impl Read, into: &Mutex<Captured>) {
    let mut buffer = [0u8; 8192];
    loop {
        let n = match pipe.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut captured = into.lock().unwrap_or_else(PoisonError::into_inner);
        let keep = n.min(OUTPUT_LIMIT - captured.bytes.len());
        captured.bytes.extend_from_slice(&buffer[..keep]);
        captured.truncated |= keep < n;
    }
}

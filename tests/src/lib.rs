//! Shared helpers for the end-to-end tests, which run against the real kernel.
//!
//! These tests need root (eBPF, memory cgroups). They never skip: without root they fail
//! with a message saying so, because CI runs them as root and a silent skip would hide a
//! broken probe.

pub mod act;
pub mod cgroup;
pub mod daemon;
pub mod dashboard;
pub mod llama;
pub mod nvidia;
pub mod otlp;
pub mod prometheus;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The bytes of a `Field:   N kB` line of a /proc file (`/proc/meminfo`,
/// `/proc/<pid>/status`), read now.
pub fn proc_kib_field(path: &str, field: &str) -> f64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}"));
    kib * 1024.0
}

/// Fails the test unless we run as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the end-to-end tests load eBPF programs and create memory cgroups: run them as root \
         (CI does; `sudo -E cargo xtask test` locally). They do not skip."
    );
}

/// `target/<profile>` of the build this test belongs to (tests run from `deps/` below it).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_owned()
}

/// A binary of the same build as this test.
fn sibling_bin(name: &str) -> PathBuf {
    let bin = profile_dir().join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --bins`, which `cargo xtask test` runs)",
        bin.display()
    );
    bin
}

/// The `infermem` binary of the same build as this test.
pub fn infermem_bin() -> PathBuf {
    sibling_bin("infermem")
}

/// The test workload binary.
pub fn workload_bin() -> PathBuf {
    sibling_bin("workload")
}

/// The workspace root (the tests crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

/// A scratch directory for this test, on the target dir's disk (not a tmpfs).
pub fn scratch_dir(name: &str) -> PathBuf {
    let target = profile_dir().parent().expect("target dir").to_owned();
    let dir = target
        .join("tmp")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Writes a file of `mib` MiB with non-zero content.
pub fn write_file(path: &Path, mib: usize) {
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let mut file = std::fs::File::create(path).expect("create file");
    for _ in 0..mib {
        file.write_all(&chunk).expect("write file");
    }
    file.sync_all().expect("sync file");
}

/// How long a test waits for a child's next event unless it says otherwise (the VM of the
/// kernel matrix runs CPU work ~6x slower than a host).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(180);

/// Lines a reader thread forwards from a child's pipe.
fn forward_lines(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Where a child's stderr goes, so that a failure can show it.
enum Stderr {
    /// Piped to the test: the lines so far.
    Piped(Receiver<String>, Vec<String>),
    /// Written to a log file the test reads.
    Logged(PathBuf),
}

impl Stderr {
    /// The last few KiB of what the child wrote.
    fn tail(&mut self) -> String {
        let text = match self {
            Stderr::Piped(rx, seen) => {
                seen.extend(rx.try_iter());
                seen.join("\n")
            }
            Stderr::Logged(path) => std::fs::read_to_string(path).unwrap_or_default(),
        };
        let start = text.len().saturating_sub(8 << 10);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }
}

/// A child process that speaks one JSON object per line on stdout. Every wait on it has a
/// timeout, and a failure shows the child's stderr.
pub struct Talker {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    stderr: Stderr,
}

impl Talker {
    /// Starts `cmd` with piped stdin, stdout and stderr.
    pub fn spawn(mut cmd: Command) -> Talker {
        cmd.stderr(Stdio::piped());
        let mut talker = Talker::start(cmd, None);
        let stderr = talker.child.stderr.take().expect("stderr");
        talker.stderr = Stderr::Piped(forward_lines(stderr), Vec::new());
        talker
    }

    /// Starts `cmd` with its stderr written to `log`.
    pub fn spawn_logging(mut cmd: Command, log: &Path) -> Talker {
        cmd.stderr(Stdio::from(
            std::fs::File::create(log).expect("create child log"),
        ));
        Talker::start(cmd, Some(log.to_owned()))
    }

    fn start(mut cmd: Command, log: Option<PathBuf>) -> Talker {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = forward_lines(child.stdout.take().expect("stdout"));
        let stderr = match log {
            Some(path) => Stderr::Logged(path),
            None => Stderr::Piped(std::sync::mpsc::channel().1, Vec::new()),
        };
        Talker {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads lines until one is a JSON object whose `event` is `event`, for at most
    /// [`EVENT_TIMEOUT`].
    pub fn expect_event(&mut self, event: &str) -> Value {
        self.expect_event_within(event, EVENT_TIMEOUT)
    }

    /// Reads lines until one is a JSON object whose `event` is `event`; fails with the
    /// child's stderr when it exits or `timeout` passes first.
    pub fn expect_event_within(&mut self, event: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(value) = serde_json::from_str::<Value>(&line)
                        && value["event"] == event
                    {
                        return value;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "child exited ({status:?}) before sending {event:?}; stderr:\n{}",
                        self.stderr.tail()
                    )
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "child sent no {event:?} within {timeout:?}; stderr:\n{}",
                    self.stderr.tail()
                ),
            }
        }
    }

    /// Sends one line on the child's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write child stdin");
        stdin.flush().expect("flush child stdin");
    }

    /// Closes stdin (the workloads' signal to finish) and waits for the exit.
    pub fn finish(mut self) -> ExitStatus {
        drop(self.stdin.take());
        self.wait()
    }

    /// Waits for the child to exit, for at most [`EVENT_TIMEOUT`].
    pub fn wait(&mut self) -> ExitStatus {
        match wait_with_timeout(&mut self.child, EVENT_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "child did not exit within {EVENT_TIMEOUT:?}; stderr:\n{}",
                self.stderr.tail()
            ),
        }
    }
}

impl Drop for Talker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` for at most `timeout`; kills it and returns `None` if it is still
/// running then.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with its output captured, for at most [`EVENT_TIMEOUT`]; a child
/// still running then is killed and the test fails with its stderr.
pub fn output_of(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let stdout = forward_lines(child.stdout.take().expect("stdout"));
    let stderr = forward_lines(child.stderr.take().expect("stderr"));
    let status = wait_with_timeout(&mut child, EVENT_TIMEOUT);
    let join = |rx: Receiver<String>| {
        let mut text = rx.iter().collect::<Vec<_>>().join("\n");
        text.push('\n');
        text.into_bytes()
    };
    let stderr = join(stderr);
    let Some(status) = status else {
        panic!(
            "{cmd:?} did not finish within {EVENT_TIMEOUT:?}; stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        );
    };
    std::process::Output {
        status,
        stdout: join(stdout),
        stderr,
    }
}

/// `infermem inspect` running in the background, with `INFERMEM_LOG=info` so that the test
/// can wait until the probes are attached before making the workload act.
pub struct Inspection {
    child: Child,
    stdout: Receiver<String>,
    stderr_lines: Receiver<String>,
    stderr_seen: Vec<String>,
    /// The sampling duration plus a margin: how long [`Inspection::finish`] waits.
    deadline: Instant,
}

impl Inspection {
    /// Starts `infermem inspect <pid> --json --duration <duration>` (`duration` in seconds,
    /// like `8s`).
    pub fn start(pid: u32, duration: &str, extra: &[&str]) -> Inspection {
        let mut child = Command::new(infermem_bin())
            .args([
                "inspect",
                &pid.to_string(),
                "--json",
                "--duration",
                duration,
            ])
            .args(extra)
            .env("INFERMEM_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn infermem");
        let seconds: u64 = duration.trim_end_matches('s').parse().unwrap_or(10);
        Inspection {
            stdout: forward_lines(child.stdout.take().expect("stdout")),
            stderr_lines: forward_lines(child.stderr.take().expect("stderr")),
            child,
            stderr_seen: Vec::new(),
            deadline: Instant::now() + Duration::from_secs(seconds) + EVENT_TIMEOUT,
        }
    }

    /// Waits until infermem logs that sampling started (probes attached and seeded).
    pub fn wait_until_sampling(&mut self) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while Instant::now() < deadline {
            match self.stderr_lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let started = line.contains("sampling started");
                    self.stderr_seen.push(line);
                    if started {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "infermem never started sampling; stderr: {:?}",
            self.stderr_seen
        );
    }

    /// Waits for infermem to finish (killing it past its deadline); returns its exit success
    /// and its JSON output.
    pub fn finish(mut self) -> (bool, Value) {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let status = wait_with_timeout(&mut self.child, left);
        self.stderr_seen.extend(self.stderr_lines.try_iter());
        let Some(status) = status else {
            panic!(
                "infermem did not finish in time; stderr: {:?}",
                self.stderr_seen
            );
        };
        let stdout: Vec<String> = self.stdout.iter().collect();
        let stdout = stdout.join("\n");
        let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "infermem printed no JSON ({e}): {stdout}\nstderr: {:?}",
                self.stderr_seen
            )
        });
        (status.success(), json)
    }
}

/// `value` as f64, or a panic naming `what`.
pub fn f64_of(value: &Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"))
}

/// Asserts `actual` is within `tolerance` (a fraction) of `expected`.
pub fn assert_close(what: &str, actual: f64, expected: f64, tolerance: f64) {
    let error = (actual - expected).abs() / expected;
    assert!(
        error <= tolerance,
        "{what}: {actual} is not within {:.0} % of {expected} (off by {:.1} %)",
        tolerance * 100.0,
        error * 100.0
    );
}

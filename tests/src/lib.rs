//! Shared helpers for the end-to-end tests, which run against the real kernel.
//!
//! These tests need root (eBPF, memory cgroups). They never skip: without root they fail
//! with a message saying so, because CI runs them as root and a silent skip would hide a
//! broken probe.

pub mod cgroup;
pub mod llama;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

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

/// A child process that speaks one JSON object per line on stdout.
pub struct Talker {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Talker {
    /// Starts `cmd` with piped stdin/stdout.
    pub fn spawn(mut cmd: Command) -> Talker {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Talker {
            child,
            stdin,
            stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads lines until one is a JSON object whose `event` is `event`.
    pub fn expect_event(&mut self, event: &str) -> Value {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).expect("read child stdout");
            assert!(n > 0, "child exited before sending {event:?}");
            if let Ok(value) = serde_json::from_str::<Value>(&line)
                && value["event"] == event
            {
                return value;
            }
        }
    }

    /// Sends one line on the child's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write child stdin");
        stdin.flush().expect("flush child stdin");
    }

    /// Closes stdin (the workloads' signal to finish) and waits.
    pub fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        self.child.wait().expect("wait child")
    }
}

impl Drop for Talker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `infermem inspect` running in the background, with `INFERMEM_LOG=info` so that the test
/// can wait until the probes are attached before making the workload act.
pub struct Inspection {
    child: Child,
    stderr_lines: std::sync::mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
}

impl Inspection {
    /// Starts `infermem inspect <pid> --json --duration <duration>`.
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
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Inspection {
            child,
            stderr_lines: rx,
            stderr_seen: Vec::new(),
        }
    }

    /// Waits until infermem logs that sampling started (probes attached and seeded).
    pub fn wait_until_sampling(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match self.stderr_lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let started = line.contains("sampling started");
                    self.stderr_seen.push(line);
                    if started {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "infermem never started sampling; stderr: {:?}",
            self.stderr_seen
        );
    }

    /// Waits for infermem to finish; returns its exit success and its JSON output.
    pub fn finish(mut self) -> (bool, Value) {
        let mut stdout = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().expect("stdout"), &mut stdout)
            .expect("read infermem stdout");
        let status = self.child.wait().expect("wait infermem");
        let rest: Vec<String> = self.stderr_lines.try_iter().collect();
        let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "infermem printed no JSON ({e}): {stdout}\nstderr: {:?} {rest:?}",
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

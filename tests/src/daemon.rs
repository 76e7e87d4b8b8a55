//! `infermem run` for the end-to-end tests: an agent on a private socket in a per-run scratch
//! directory, its readiness, its clean stop, and the thin clients (`ps`, `status`, `watch`,
//! `inspect`) talking to it. Every wait has a timeout, and a failure shows the agent's log.

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    os::unix::{fs::FileTypeExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Mutex, MutexGuard,
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{EVENT_TIMEOUT, cgroup::TestCgroup, infermem_bin, output_of, scratch_dir};

/// How long an agent may take to answer on its socket after it starts (loading the probes
/// parses the kernel's BTF; the kernel-matrix VM runs it ~10x slower than a host).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long an agent may take to stop after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The note a client prints on stderr when it found no agent and ran the pipeline itself.
pub const STANDALONE_NOTE: &str = "running standalone";

/// Serialises the tests of one binary that start agents and time workloads: the host runs a
/// binary's tests on parallel threads, and two agents or two ramps at once on a 2-core
/// machine would disturb each other's timing (and `ns_last_pid`).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `infermem run` in the foreground on a socket of its own, with its log in a file.
pub struct Daemon {
    /// The scratch directory holding the socket, the config and the logs.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// How many agents were started here (each gets its own log).
    starts: u32,
    /// Variables added to the agent's environment.
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts an agent whose config has only its socket, and waits until it answers.
    pub fn start(name: &str) -> Daemon {
        Daemon::start_with(name, "")
    }

    /// Starts an agent whose config's `[api]` section holds its socket and the lines
    /// `api_extra` (e.g. `socket_group = "x"`), and waits until it answers.
    pub fn start_with(name: &str, api_extra: &str) -> Daemon {
        Daemon::start_configured(name, api_extra, "")
    }

    /// Starts an agent whose `[policy]` holds a journal in its scratch directory and the
    /// lines `policy` (keys, then `[[policy.workload]]` tables…), and waits until it answers.
    pub fn start_with_policy(name: &str, policy: &str) -> Daemon {
        Daemon::start_configured(name, "", policy)
    }

    /// Starts an agent whose config ends with `sections` (e.g. an `[export]` table) and
    /// whose environment has `env` added (e.g. `OTEL_*`), and waits until it answers.
    pub fn start_with_sections(name: &str, sections: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_full(name, "", "", sections, env)
    }

    fn start_configured(name: &str, api_extra: &str, policy: &str) -> Daemon {
        Daemon::start_full(name, api_extra, policy, "", &[])
    }

    fn start_full(
        name: &str,
        api_extra: &str,
        policy: &str,
        sections: &str,
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = scratch_dir(name);
        // Other users' clients must reach the socket through this directory.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod scratch dir");
        let socket = dir.join("infermem.sock");
        assert!(
            socket.as_os_str().len() < 100,
            "socket path {} is too long for a unix socket",
            socket.display()
        );
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[api]\nsocket = \"{}\"\n{api_extra}\n[policy]\njournal = \"{}\"\n{policy}\n\
                 {sections}\n",
                socket.to_str().expect("a UTF-8 path"),
                dir.join("journal.jsonl").to_str().expect("a UTF-8 path"),
            ),
        )
        .expect("write the agent's config");
        let mut daemon = Daemon {
            dir,
            socket,
            config,
            child: None,
            log: PathBuf::new(),
            starts: 0,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        daemon.spawn();
        daemon.wait_ready();
        daemon
    }

    /// Starts another agent on the same socket and config (the previous one must be gone)
    /// and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the previous agent still runs");
        self.spawn();
        self.wait_ready();
    }

    fn spawn(&mut self) {
        self.starts += 1;
        self.log = self.dir.join(format!("agent-{}.log", self.starts));
        let log = std::fs::File::create(&self.log).expect("create the agent's log");
        let child = Command::new(infermem_bin())
            .arg("--socket")
            .arg(&self.socket)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("INFERMEM_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("dup log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn infermem run");
        self.child = Some(child);
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("an agent runs").id()
    }

    /// The last few KiB of the current agent's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(8 << 10);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// Polls `status --json` until this agent (by pid) answers on the socket as a daemon;
    /// fails if it exits or [`READY_TIMEOUT`] passes first.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        let pid = self.pid();
        let mut last = String::new();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("an agent runs")
                .try_wait()
                .expect("poll the agent")
            {
                self.child = None;
                panic!(
                    "infermem run exited ({status}) before it served; its log:\n{}",
                    self.log_tail()
                );
            }
            // Until the socket exists, a client would only run standalone.
            let is_socket = std::fs::metadata(&self.socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if is_socket {
                let out = output_of(self.client().args(["status", "--json"]));
                let json: Option<Value> = serde_json::from_slice(&out.stdout).ok();
                match json {
                    Some(json)
                        if out.status.success()
                            && json["daemon"]["mode"] == "daemon"
                            && json["daemon"]["pid"] == pid =>
                    {
                        eprintln!(
                            "agent {pid} ready on {} after {:.1} s",
                            self.socket.display(),
                            started.elapsed().as_secs_f64()
                        );
                        return;
                    }
                    _ => {
                        last = format!(
                            "{}: {}{}",
                            out.status,
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        )
                    }
                }
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "infermem run did not answer on {} within {READY_TIMEOUT:?}; last status: {last}\n\
                 its log:\n{}",
                self.socket.display(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `infermem --socket <this agent's socket>`, to which the test adds a command.
    pub fn client(&self) -> Command {
        let mut cmd = Command::new(infermem_bin());
        cmd.arg("--socket").arg(&self.socket);
        cmd
    }

    /// Runs a client command through the agent: it must succeed and talk to the agent (no
    /// standalone fallback); returns its stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = output_of(self.client().args(args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "infermem {args:?} failed ({}): {}{stderr}\nthe agent's log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            self.log_tail()
        );
        assert!(
            !stderr.contains(STANDALONE_NOTE),
            "infermem {args:?} did not reach the agent at {}: {stderr}",
            self.socket.display()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "infermem {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `ps --json` through the agent.
    pub fn ps(&self) -> Value {
        let ps = self.json(&["ps", "--json"]);
        assert_eq!(ps["daemon"]["mode"], "daemon", "{ps}");
        ps
    }

    /// `status --json` through the agent.
    pub fn status(&self) -> Value {
        let status = self.json(&["status", "--json"]);
        assert_eq!(status["daemon"]["mode"], "daemon", "{status}");
        status
    }

    /// Polls `ps --json` until `accept` finds what it wants in it, for at most `timeout`.
    pub fn ps_until<T>(&self, timeout: Duration, mut accept: impl FnMut(&Value) -> Option<T>) -> T {
        self.poll(timeout, "ps", || {
            let ps = self.ps();
            accept(&ps).ok_or(ps)
        })
    }

    /// Polls `status --json` until `accept` finds what it wants in it, for at most `timeout`.
    pub fn status_until<T>(
        &self,
        timeout: Duration,
        mut accept: impl FnMut(&Value) -> Option<T>,
    ) -> T {
        self.poll(timeout, "status", || {
            let status = self.status();
            accept(&status).ok_or(status)
        })
    }

    fn poll<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut once: impl FnMut() -> Result<T, Value>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            match once() {
                Ok(found) => return found,
                Err(last) if Instant::now() >= deadline => panic!(
                    "`{what}` did not show what the test waits for within {timeout:?}; last \
                     answer: {last}\nthe agent's log:\n{}",
                    self.log_tail()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// Sends SIGTERM and waits for the agent to exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("an agent runs");
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        crate::wait_with_timeout(&mut child, STOP_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "infermem run did not stop within {STOP_TIMEOUT:?} of SIGTERM; its log:\n{}",
                self.log_tail()
            )
        })
    }

    /// Kills the agent with SIGKILL (no clean-up of its own) and reaps it.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("an agent runs");
        child.kill().expect("kill -9 the agent");
        child.wait().expect("reap the agent")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Keep the logs of a failed test.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `infermem watch … --json` running against an agent: its lines as they come.
pub struct Watch {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every line so far, as JSON.
    pub lines: Vec<Value>,
}

impl Watch {
    /// Starts `infermem --socket S watch <target…> --json`.
    pub fn start(daemon: &Daemon, target: &[&str]) -> Watch {
        let mut child = daemon
            .client()
            .arg("watch")
            .args(target)
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn infermem watch");
        Watch {
            stdout: lines_of(child.stdout.take().expect("stdout")),
            stderr: lines_of(child.stderr.take().expect("stderr")),
            child,
            lines: Vec::new(),
        }
    }

    /// The next line, or None once the watch has ended its output; fails after `timeout`
    /// without a line, or on a line that is not JSON.
    pub fn next(&mut self, timeout: Duration) -> Option<Value> {
        match self.stdout.recv_timeout(timeout) {
            Ok(line) => {
                let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("watch printed a line that is not JSON ({e}): {line:?}")
                });
                self.lines.push(value.clone());
                Some(value)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!(
                "watch printed nothing for {timeout:?}; its stderr: {}",
                self.stderr_text()
            ),
        }
    }

    /// What the watch wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    /// Waits for the watch to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        crate::wait_with_timeout(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "watch did not exit within {timeout:?}; its stderr: {}",
                self.stderr_text()
            )
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines a reader thread forwards from a child's pipe.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
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

/// Makes `cmd`'s child join `cgroup` before it execs, so that the agent sees it start there
/// (its exec event carries its memory cgroup).
pub fn in_cgroup(cmd: &mut Command, cgroup: &TestCgroup) {
    let procs = CString::new(
        cgroup
            .dir
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("a path without NUL");
    // SAFETY: the closure only makes async-signal-safe syscalls (open, write, close).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writer itself, on v1 and v2.
            let written = libc::write(fd, c"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
}

/// A workload started inside `cgroup`.
pub fn workload_in(cgroup: &TestCgroup, args: &[&str]) -> crate::Talker {
    let mut cmd = Command::new(crate::workload_bin());
    cmd.args(args);
    in_cgroup(&mut cmd, cgroup);
    crate::Talker::spawn(cmd)
}

/// A process's start time (clock ticks after boot): with its pid, its identity.
pub fn start_time(pid: u32) -> u64 {
    infermem::collect::process::identity(pid)
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"))
        .start_time
}

/// The workload of `pid` in a `ps --json` answer.
pub fn workload_of(ps: &Value, pid: u32) -> Option<&Value> {
    ps["workloads"]
        .as_array()
        .expect("ps lists workloads")
        .iter()
        .find(|w| w["pid"] == pid)
}

/// Writes a small valid GGUF file (v3: a llama architecture key and one f32 tensor, 2 MiB in
/// all), which the agent recognises by its magic once a process maps it, readable by all.
pub fn write_gguf(path: &Path) {
    write_gguf_with(path, &[]);
}

/// A small llama GGUF with the attention shape the KV model needs (4 layers, 8 KV heads of
/// 32, a 4096-token training context): a process running it with a known context gets a KV
/// prediction.
pub fn write_llama_gguf(path: &Path) {
    write_gguf_with(
        path,
        &[
            ("llama.context_length", 4096),
            ("llama.block_count", 4),
            ("llama.embedding_length", 256),
            ("llama.attention.head_count", 8),
            ("llama.attention.head_count_kv", 8),
        ],
    );
}

/// [`write_gguf`] with extra u32 keys.
fn write_gguf_with(path: &Path, u32_keys: &[(&str, u32)]) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes()); // tensors
    bytes.extend_from_slice(&(1 + u32_keys.len() as u64).to_le_bytes()); // key-values
    string(&mut bytes, "general.architecture");
    bytes.extend_from_slice(&8u32.to_le_bytes()); // string
    string(&mut bytes, "llama");
    for (key, value) in u32_keys {
        string(&mut bytes, key);
        bytes.extend_from_slice(&4u32.to_le_bytes()); // u32
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    string(&mut bytes, "token_embd.weight");
    bytes.extend_from_slice(&1u32.to_le_bytes()); // dimensions
    bytes.extend_from_slice(&256u64.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes()); // F32
    bytes.extend_from_slice(&0u64.to_le_bytes()); // offset
    bytes.resize(2 << 20, 0);
    std::fs::write(path, bytes).expect("write the GGUF file");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod the GGUF file");
}

/// How long the tests wait for the agent to notice something (a new process analysed, an
/// exit, an OOM kill): a few of its 1-s rounds, with the VM's slowness.
pub const NOTICE_TIMEOUT: Duration = EVENT_TIMEOUT;

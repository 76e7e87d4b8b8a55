//! `infermem run` for the benchmarks: an agent on a private socket in a scratch directory,
//! its readiness, its clean stop, and the clients (`status`, `ps`, `watch`) that ask it.

use std::{
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{Bins, lines_of};

/// How long an agent may take to serve after it starts (it parses the kernel's BTF).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long an agent may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `infermem run`; dropping it kills it.
pub struct Agent {
    child: Option<Child>,
    infermem: PathBuf,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts an agent with the default config on a socket in `dir` (`--socket`), and waits
    /// until it answers `status` as a daemon.
    pub fn start(bins: &Bins, dir: &Path) -> Result<Agent> {
        Agent::start_with(bins, dir, &[])
    }

    /// As [`Agent::start`], with `run_args` after `run` (e.g. `--policy FILE --mode enforce`).
    pub fn start_with(bins: &Bins, dir: &Path, run_args: &[&std::ffi::OsStr]) -> Result<Agent> {
        let socket = dir.join("infermem.sock");
        let log = dir.join("agent.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&bins.infermem)
            .arg("--socket")
            .arg(&socket)
            .arg("run")
            .args(run_args)
            .env("INFERMEM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("starting infermem run")?;
        let mut agent = Agent {
            child: Some(child),
            infermem: bins.infermem.clone(),
            socket,
            log,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Polls `status --json` until this agent answers as a daemon.
    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().context("no agent")?.try_wait()? {
                self.child = None;
                bail!(
                    "infermem run exited ({status}) before it served; its log:\n{}",
                    self.log_tail()
                );
            }
            let is_socket =
                std::fs::metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket());
            if is_socket
                && let Ok(status) = self.json(&["status", "--json"])
                && status["daemon"]["mode"] == "daemon"
                && status["daemon"]["pid"] == self.pid()
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "infermem run did not serve within {READY_TIMEOUT:?}; its log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `infermem --socket <this agent's socket>`.
    pub fn client(&self) -> Command {
        let mut cmd = Command::new(&self.infermem);
        cmd.arg("--socket").arg(&self.socket);
        cmd
    }

    /// Runs a client command through the agent and parses its stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let out = self.client().args(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "infermem {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("infermem {args:?} printed no JSON"))
    }

    /// Polls `status --json` for up to `timeout` until `accept` finds something in it.
    pub fn status_until<T>(
        &self,
        timeout: Duration,
        mut accept: impl FnMut(&Value) -> Option<T>,
    ) -> Result<Option<T>> {
        self.poll(&["status", "--json"], timeout, &mut accept)
    }

    /// Polls `ps --json` for up to `timeout` until `accept` finds something in it.
    pub fn ps_until<T>(
        &self,
        timeout: Duration,
        mut accept: impl FnMut(&Value) -> Option<T>,
    ) -> Result<Option<T>> {
        self.poll(&["ps", "--json"], timeout, &mut accept)
    }

    /// Polls `actions --json` for up to `timeout` until `accept` finds something in it.
    pub fn actions_until<T>(
        &self,
        timeout: Duration,
        mut accept: impl FnMut(&Value) -> Option<T>,
    ) -> Result<Option<T>> {
        self.poll(&["actions", "--json"], timeout, &mut accept)
    }

    fn poll<T>(
        &self,
        args: &[&str],
        timeout: Duration,
        accept: &mut impl FnMut(&Value) -> Option<T>,
    ) -> Result<Option<T>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = accept(&self.json(args)?) {
                return Ok(Some(found));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The OOM kill of `pid` the agent reports in `status`, if it does within `timeout`.
    pub fn oom_kill_of(&self, pid: u32, timeout: Duration) -> Result<Option<Value>> {
        self.status_until(timeout, |s| {
            s["oom_kills"]
                .as_array()?
                .iter()
                .find(|k| k["pid"] == pid)
                .cloned()
        })
    }

    /// Starts `infermem watch <target…> --json`.
    pub fn watch(&self, target: &[&str]) -> Result<Watch> {
        let mut child = self
            .client()
            .arg("watch")
            .args(target)
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting infermem watch")?;
        let lines = lines_of(child.stdout.take().context("watch stdout")?);
        Ok(Watch { child, lines })
    }

    /// Sends SIGTERM and waits for the agent to exit.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        crate::cargo::run(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("infermem run did not stop within {STOP_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The last few KiB of the agent's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4 << 10);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `infermem watch … --json`: its lines as they come; dropping it ends it.
pub struct Watch {
    child: Child,
    lines: Receiver<String>,
}

impl Watch {
    /// The next line as JSON, None when the watch ended or printed nothing for `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Value> {
        loop {
            match self.lines.recv_timeout(timeout) {
                Ok(line) => match serde_json::from_str(&line) {
                    Ok(value) => return Some(value),
                    Err(_) => continue,
                },
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Every line printed so far and not yet taken.
    pub fn drain(&self) -> Vec<Value> {
        self.lines
            .try_iter()
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

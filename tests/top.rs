//! `infermem top` for real, in a terminal: a shell in a tmux pane (a private tmux server)
//! runs it against a running agent, or standalone, while two real model workloads map a GGUF
//! file; the test reads the screen with `capture-pane` and types with `send-keys`. Every
//! wait has a timeout and a failure shows the last screen. Host only: the kernel-matrix VM
//! has no tmux.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use infermem::{top::render::bar_text, units::format_bytes};
use infermem_tests::{
    Talker,
    daemon::{Daemon, NOTICE_TIMEOUT, serial, workload_of, write_gguf},
    output_of, require_root, scratch_dir, workload_bin,
};
use serde_json::Value;

/// How long the screen may take to show what a key or a refresh brings (top refreshes every
/// 500 ms here; standalone, it loads the probes first).
const SCREEN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the inspect pane may take to show the report (1 s of sampling).
const INSPECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `top` may take to exit after `q` (its in-process pipeline stops first).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the screen is read while waiting.
const POLL: Duration = Duration::from_millis(100);
/// The shell prompt in the pane.
const PROMPT: &str = "top-test$ ";
/// At most this many rows are stepped through to select one.
const MAX_ROWS: usize = 40;

/// A tmux server of its own (its socket in a scratch directory) with one 160x50 session
/// running `sh`.
struct Tmux {
    dir: PathBuf,
    socket: PathBuf,
}

impl Tmux {
    fn start(name: &str) -> Tmux {
        let dir = scratch_dir(&format!("{name}-tmux"));
        let socket = dir.join("tmux.sock");
        assert!(
            socket.as_os_str().len() < 100,
            "socket path {} is too long for a unix socket",
            socket.display()
        );
        let tmux = Tmux { dir, socket };
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "160",
            "-y",
            "50",
            "--",
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "TERM=xterm-256color",
            &format!("PS1={PROMPT}"),
            "sh",
        ]);
        // capture-pane drops the prompt's trailing space.
        tmux.wait_for("the shell's prompt", SCREEN_TIMEOUT, |s| {
            s.contains(PROMPT.trim_end()).then_some(())
        });
        tmux
    }

    /// Runs `tmux -L <socket> args…`; it must succeed. Returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        let out = output_of(Command::new("tmux").arg("-S").arg(&self.socket).args(args));
        assert!(
            out.status.success(),
            "tmux {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Presses keys (tmux names: `Enter`, `Down`, `Escape`, `s`…).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend(keys);
        self.run(&args);
    }

    /// Types `line` literally and presses Enter.
    fn type_line(&self, line: &str) {
        self.run(&["send-keys", "-t", "top", "-l", line]);
        self.keys(&["Enter"]);
    }

    /// The visible screen.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// A tmux format about the pane, e.g. `#{alternate_on}`.
    fn pane(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "top", format])
            .trim()
            .to_owned()
    }

    /// Reads the screen until `accept` finds `what` in it; fails after `timeout` with the
    /// last screen.
    fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut accept: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if let Some(found) = accept(&screen) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "the screen did not show {what} within {timeout:?}; it shows:\n{screen}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// The output of a shell command typed at the prompt, up to a marker line.
    fn shell(&self, command: &str, marker: &str) -> String {
        self.type_line(&format!("{command}; echo {marker}-end"));
        self.wait_for(&format!("the output of {command:?}"), SCREEN_TIMEOUT, |s| {
            let end = s.find(&format!("\n{marker}-end"))?;
            let start = s[..end].rfind(command)? + command.len();
            let output = &s[start..end];
            Some(output[output.find('\n')? + 1..].to_owned())
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The table row of `pid` (a `workload` mapping `model.gguf`): its line number and text.
fn row(screen: &str, pid: u32) -> Option<(usize, &str)> {
    let cell = format!(" {pid} ");
    screen
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains(&cell) && l.contains("workload") && l.contains("model.gguf"))
}

/// A model workload: `map-file` (a small footprint), or `map-and-alloc` of 64 MiB, which
/// reads the file (its weights resident) then writes 64 MiB of anonymous memory.
fn model_workload(model: &Path, big: bool) -> Talker {
    let model = model.to_str().expect("a UTF-8 path");
    let mut cmd = Command::new(workload_bin());
    if big {
        cmd.args(["map-and-alloc", model, "2", "64"]);
    } else {
        cmd.args(["map-file", model]);
    }
    let mut workload = Talker::spawn(cmd);
    workload.expect_event("mapped");
    if big {
        workload.send_line("go");
        workload.expect_event("touched");
    }
    workload
}

/// `infermem top` typed at the prompt after `env` (`NAME=value `, or nothing); returns the
/// shell's terminal settings before (`stty -g`).
fn start_top(tmux: &Tmux, socket: &Path, env: &str) -> String {
    let stty = tmux.shell("stty -g", "before");
    let bin = infermem_tests::infermem_bin();
    for path in [bin.as_path(), socket] {
        assert!(!path.to_string_lossy().contains('\''), "{}", path.display());
    }
    tmux.type_line(&format!(
        "{env}'{}' --socket '{}' top --interval 500ms",
        bin.display(),
        socket.display()
    ));
    stty
}

/// The row of `workload` (from `ps`) shows its weights bar with resident and total bytes,
/// its anonymous bytes, and no GPU memory.
fn assert_row_shows_memory(tmux: &Tmux, workload: &Value) {
    let pid = workload["pid"].as_u64().expect("a pid") as u32;
    let bytes = |key: &str| workload[key].as_u64().unwrap_or_else(|| panic!("{key}"));
    let (resident, size) = (bytes("weights_resident_bytes"), bytes("weights_bytes"));
    let weights = format!(
        "{} {}/{}",
        bar_text(resident, size),
        format_bytes(resident),
        format_bytes(size)
    );
    let anon = format!(" {} ", format_bytes(bytes("anon_bytes")));
    let row = tmux.wait_for("the workload's memory", SCREEN_TIMEOUT, |s| {
        let (_, row) = row(s, pid)?;
        (row.contains(&weights) && row.contains(&anon)).then(|| row.to_owned())
    });
    // The GPU column follows the anonymous memory: `-`, this process holds no GPU memory.
    let after_anon = row.split(anon.trim()).nth(1).unwrap_or_default();
    assert_eq!(
        after_anon.split_whitespace().next(),
        Some("-"),
        "no GPU memory: {row:?}"
    );
    assert!(
        bar_text(resident, size).starts_with('█'),
        "the weights read are resident: {workload}"
    );
}

/// Presses `s` until the header says `sort: {sort}`, at most 4 times (the cycle's length).
fn sort_by(tmux: &Tmux, sort: &str) {
    let header = format!("sort: {sort} ");
    for _ in 0..4 {
        if tmux.screen().contains(&header) {
            return;
        }
        let before = tmux.screen();
        tmux.keys(&["s"]);
        tmux.wait_for("the next sort", SCREEN_TIMEOUT, |s| {
            (sort_of(s) != sort_of(&before)).then_some(())
        });
    }
    assert!(tmux.screen().contains(&header), "no sort {sort}");
}

/// The header's refresh time.
fn refresh_time(screen: &str) -> Option<&str> {
    let start = screen.find("refreshed ")? + "refreshed ".len();
    screen[start..].split_whitespace().next()
}

/// The header's sort.
fn sort_of(screen: &str) -> Option<&str> {
    let start = screen.find("sort: ")? + "sort: ".len();
    screen[start..].split_whitespace().next()
}

/// The rows of `first` and `second` are in this order, after a refresh shows both.
fn assert_order(tmux: &Tmux, first: u32, second: u32) {
    tmux.wait_for(
        &format!("row {first} above row {second}"),
        SCREEN_TIMEOUT,
        |s| (row(s, first)?.0 < row(s, second)?.0).then_some(()),
    );
}

/// The line of the selected row (▶).
fn selected_line(screen: &str) -> Option<usize> {
    screen.lines().position(|l| l.contains("▶ "))
}

/// Selects the first row, then steps the selection down to the row of `pid`.
fn select(tmux: &Tmux, pid: u32) {
    tmux.keys(&["Home"]);
    tmux.wait_for("the first row selected", SCREEN_TIMEOUT, |s| {
        let header = s.lines().position(|l| l.contains("PID     NAME"))?;
        (selected_line(s)? == header + 1).then_some(())
    });
    for _ in 0..MAX_ROWS {
        let selected = tmux.wait_for("the selected row", SCREEN_TIMEOUT, |s| {
            selected_line(s).map(|at| (at, row(s, pid).is_some_and(|(r, _)| r == at)))
        });
        if selected.1 {
            return;
        }
        tmux.keys(&["Down"]);
        tmux.wait_for("the selection to move", SCREEN_TIMEOUT, |s| {
            (selected_line(s) != Some(selected.0)).then_some(())
        });
    }
    panic!(
        "pid {pid} not reached in {MAX_ROWS} rows:\n{}",
        tmux.screen()
    );
}

/// Enter on the selected `pid` opens its inspect report; Esc goes back to the table.
fn inspect_and_back(tmux: &Tmux, pid: u32, model: &Path) {
    tmux.keys(&["Enter"]);
    let title = format!("inspect pid {pid} (workload)");
    let first_line = format!("pid {pid} (workload)  ");
    let model_line = format!("model    {} (GGUF", model.display());
    tmux.wait_for("the inspect report", INSPECT_TIMEOUT, |s| {
        (s.contains(&title) && s.contains(&first_line) && s.contains(&model_line)).then_some(())
    });
    tmux.keys(&["Escape"]);
    tmux.wait_for("the table again", SCREEN_TIMEOUT, |s| {
        (!s.contains(&title) && row(s, pid).is_some()).then_some(())
    });
}

/// `q` ends top: the shell is in the foreground again, off the alternate screen, its exit
/// status 0, and the terminal's settings those it had before.
fn quit_and_check_the_terminal(tmux: &Tmux, stty_before: &str) {
    tmux.keys(&["q"]);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while tmux.pane("#{pane_current_command}") != "sh" {
        assert!(
            Instant::now() < deadline,
            "top did not exit within {EXIT_TIMEOUT:?} of q:\n{}",
            tmux.screen()
        );
        std::thread::sleep(POLL);
    }
    assert_eq!(
        tmux.pane("#{alternate_on}"),
        "0",
        "still on the alternate screen"
    );
    let status = tmux.shell("echo status=$?", "exit");
    assert_eq!(status.trim(), "status=0", "top's exit status");
    assert_eq!(
        tmux.shell("stty -g", "after"),
        stty_before,
        "terminal settings"
    );
    let modes = tmux.shell("stty -a", "modes");
    for mode in ["icanon", "echo", "isig"] {
        assert!(
            modes.split_whitespace().any(|m| m == mode),
            "{mode} off after top: {modes}"
        );
    }
    assert!(
        !tmux.screen().contains("infermem top"),
        "the dashboard is gone"
    );
}

/// Through a running agent: both workloads listed with their memory, `s` sorts by memory
/// then by pid, Enter inspects the big one, Esc goes back, `q` exits and restores the terminal.
#[test]
fn top_shows_the_agents_workloads_sorts_inspects_and_restores_the_terminal() {
    require_root();
    let _serial = serial();
    let agent = Daemon::start("top");
    let model = agent.dir.join("model.gguf");
    write_gguf(&model);
    let small = model_workload(&model, false);
    let big = model_workload(&model, true);
    let (small_pid, big_pid) = (small.pid(), big.pid());
    let listed = agent.ps_until(NOTICE_TIMEOUT, |ps| {
        workload_of(ps, small_pid)?;
        let big = workload_of(ps, big_pid)?;
        (big["anon_bytes"].as_u64()? >= 64 << 20 && big["weights_resident_bytes"] != 0)
            .then(|| big.clone())
    });

    let tmux = Tmux::start("top");
    let stty = start_top(&tmux, &agent.socket, "");
    tmux.wait_for("the agent's workloads", SCREEN_TIMEOUT, |s| {
        (s.contains("agent daemon") && row(s, small_pid).is_some() && row(s, big_pid).is_some())
            .then_some(())
    });
    assert_row_shows_memory(&tmux, &listed);
    assert!(tmux.screen().contains("host  used "), "{}", tmux.screen());

    sort_by(&tmux, "memory");
    assert_order(&tmux, big_pid, small_pid);
    sort_by(&tmux, "pid");
    assert_order(&tmux, small_pid.min(big_pid), small_pid.max(big_pid));
    select(&tmux, big_pid);
    inspect_and_back(&tmux, big_pid, &model);
    quit_and_check_the_terminal(&tmux, &stty);
    drop((small, big));
}

/// Without an agent: top runs the pipeline itself, says `standalone`, lists the workload.
/// The pipeline's log (debug here) does not draw over the dashboard: it comes after it.
#[test]
fn top_runs_standalone_without_an_agent() {
    require_root();
    let _serial = serial();
    let dir = scratch_dir("top-standalone");
    let model = dir.join("model.gguf");
    write_gguf(&model);
    let workload = model_workload(&model, false);
    let tmux = Tmux::start("top-standalone");
    let socket = dir.join("no-agent.sock");
    let stty = start_top(&tmux, &socket, "INFERMEM_LOG=debug ");
    let is_log = |line: &str| line.contains(" DEBUG ") || line.contains(" INFO ");
    let mut refreshes = std::collections::BTreeSet::new();
    tmux.wait_for("the workload over 3 refreshes", SCREEN_TIMEOUT, |s| {
        if !s.contains("agent standalone") || row(s, workload.pid()).is_none() {
            return None;
        }
        assert!(!s.lines().any(is_log), "log over the dashboard:\n{s}");
        refreshes.insert(refresh_time(s)?.to_owned());
        (refreshes.len() >= 3).then_some(())
    });
    let screen = tmux.screen();
    assert!(
        screen.contains("actions: none: only a running agent acts"),
        "{screen}"
    );
    quit_and_check_the_terminal(&tmux, &stty);
    assert!(
        tmux.screen().lines().any(is_log),
        "the log held back while top ran comes after it:\n{}",
        tmux.screen()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

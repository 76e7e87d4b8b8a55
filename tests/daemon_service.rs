//! `infermem run` as systemd runs it: a real `NOTIFY_SOCKET` (a datagram socket this test
//! binds, as systemd's would be) receives READY, WATCHDOG, RELOADING and STOPPING; WATCHDOG=1
//! comes at the interval systemd's contract asks for (`WATCHDOG_USEC`); SIGHUP re-reads the
//! config (a bad one is refused and the agent keeps serving); SIGTERM stops it cleanly and
//! removes the socket. `doctor` asks the running agent about its probes instead of loading a
//! second copy.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use infermem_tests::{infermem_bin, output_of, require_root, scratch_dir, wait_with_timeout};

/// How long to wait for one notification (the VM is slow; READY follows seeding /proc).
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(120);

/// `WatchdogSec=2`, as systemd passes it: the agent must ping more often than this.
const WATCHDOG_USEC: u64 = 2_000_000;

/// Reads notifications until one contains `wanted`; returns every message read.
fn expect_notification(socket: &UnixDatagram, wanted: &str) -> Vec<String> {
    let deadline = Instant::now() + NOTIFY_TIMEOUT;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(deadline - Instant::now()))
            .expect("set a timeout");
        let Ok(n) = socket.recv(&mut buffer) else {
            break;
        };
        let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
        let found = message.lines().any(|l| l == wanted);
        seen.push(message);
        if found {
            return seen;
        }
    }
    panic!("no {wanted} within {NOTIFY_TIMEOUT:?}; received: {seen:?}");
}

/// When each `WATCHDOG=1` arrived until `end` (other notifications are skipped).
fn watchdog_pings(socket: &UnixDatagram, end: Instant) -> Vec<Instant> {
    let mut pings = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left)).expect("set a timeout");
        let Ok(n) = socket.recv(&mut buffer) else {
            break;
        };
        if buffer[..n]
            .split(|b| *b == b'\n')
            .any(|l| l == b"WATCHDOG=1")
        {
            pings.push(Instant::now());
        }
    }
    pings
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `infermem run` as a `Type=notify` service with `WatchdogSec=2`; killed if the test ends
/// while it still runs.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(config: &Path, notify: &Path, log: PathBuf) -> Agent {
        let child = Command::new(infermem_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", notify)
            .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
            .env_remove("WATCHDOG_PID")
            .env("INFERMEM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn infermem run");
        Agent { child, log }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory with a bound notify socket and a config naming the API socket there.
fn service_dir(name: &str) -> (PathBuf, UnixDatagram, PathBuf, PathBuf) {
    let dir = scratch_dir(name);
    let notify = UnixDatagram::bind(dir.join("notify.sock")).expect("bind the notify socket");
    let socket = dir.join("infermem.sock");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("[api]\nsocket = \"{}\"\n", socket.display()),
    )
    .unwrap();
    (dir, notify, socket, config)
}

/// systemd's contract: with `WATCHDOG_USEC` set, a service must send WATCHDOG=1 before that
/// much time has passed since the last one (the agent pings at half of it). Over 8 s after
/// READY, no silence (from READY to the first ping, between pings, after the last) may reach
/// `WATCHDOG_USEC`, and no two pings may come less than a quarter of it apart (a busy loop).
#[test]
fn the_watchdog_is_pinged_at_half_the_interval_systemd_gives() {
    require_root();
    let (dir, notify, _socket, config) = service_dir("daemon-watchdog");
    let mut agent = Agent::start(&config, &dir.join("notify.sock"), dir.join("agent.log"));
    expect_notification(&notify, "READY=1");
    let ready = Instant::now();
    let window = Duration::from_secs(8);
    let end = ready + window;
    let pings = watchdog_pings(&notify, end);
    let timeout = Duration::from_micros(WATCHDOG_USEC);
    assert!(pings.len() >= 2, "{} pings in {window:?}", pings.len());
    let mut marks = vec![ready];
    marks.extend(&pings);
    marks.push(end);
    let silences: Vec<Duration> = marks.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        silences.iter().all(|s| *s < timeout),
        "a silence reached WATCHDOG_USEC ({timeout:?}): {silences:?}"
    );
    let gaps = &silences[1..silences.len() - 1];
    assert!(
        gaps.iter().all(|g| *g > timeout / 4),
        "pings closer than a quarter of WATCHDOG_USEC: {gaps:?}"
    );
    signal(&agent.child, libc::SIGTERM);
    let exit = wait_with_timeout(&mut agent.child, NOTIFY_TIMEOUT).expect("the agent stops");
    assert_eq!(exit.code(), Some(0), "{}", log_of(&agent.log));
}

#[test]
fn the_agent_speaks_systemd_and_reloads_on_sighup() {
    require_root();
    let (dir, notify, socket, config) = service_dir("daemon-service");
    let good = std::fs::read_to_string(&config).unwrap();
    let log = dir.join("agent.log");
    let mut agent = Agent::start(&config, &dir.join("notify.sock"), log.clone());

    // READY comes once the API serves: a client right after it reaches the agent.
    expect_notification(&notify, "READY=1");
    let out = output_of(
        Command::new(infermem_bin())
            .arg("--socket")
            .arg(&socket)
            .args(["status", "--json"]),
    );
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["daemon"]["mode"], "daemon");
    expect_notification(&notify, "WATCHDOG=1");

    // doctor asks the running agent instead of attaching a second copy of the probes.
    let out = output_of(
        Command::new(infermem_bin())
            .arg("--socket")
            .arg(&socket)
            .args(["doctor", "--json"]),
    );
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let load = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "probes load and attach")
        .expect("doctor checks the probes");
    let detail = load["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("running agent (pid {})", agent.child.id())),
        "{load}"
    );

    // A config with an unknown key is refused; the agent keeps its settings and serves.
    std::fs::write(&config, format!("{good}[collect]\nintervall = \"2s\"\n")).unwrap();
    signal(&agent.child, libc::SIGHUP);
    let reload = expect_notification(&notify, "RELOADING=1");
    assert!(
        reload.iter().any(|m| m.contains("MONOTONIC_USEC=")),
        "{reload:?}"
    );
    expect_notification(&notify, "READY=1");
    let text = log_of(&log);
    assert!(
        text.contains("configuration not reloaded") && text.contains(":4:"),
        "the refusal names the line: {text}"
    );
    let out = output_of(
        Command::new(infermem_bin())
            .arg("--socket")
            .arg(&socket)
            .arg("ps"),
    );
    assert!(
        out.status.success(),
        "still serving after a bad reload: {out:?}"
    );

    // A good one is applied.
    std::fs::write(&config, format!("{good}[collect]\ninterval = \"2s\"\n")).unwrap();
    signal(&agent.child, libc::SIGHUP);
    expect_notification(&notify, "RELOADING=1");
    expect_notification(&notify, "READY=1");
    assert!(
        log_of(&log).contains("configuration reloaded"),
        "{}",
        log_of(&log)
    );

    signal(&agent.child, libc::SIGTERM);
    expect_notification(&notify, "STOPPING=1");
    let exit = wait_with_timeout(&mut agent.child, NOTIFY_TIMEOUT).expect("the agent stops");
    assert_eq!(exit.code(), Some(0), "{}", log_of(&log));
    assert!(!socket.exists(), "the socket is removed on SIGTERM");
    assert!(log_of(&log).contains("detaching the probes"));
}

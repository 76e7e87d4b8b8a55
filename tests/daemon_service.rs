//! `infermem run` as systemd runs it: a real `NOTIFY_SOCKET` (a datagram socket this test
//! binds, as systemd's would be) receives READY, WATCHDOG, RELOADING and STOPPING; SIGHUP
//! re-reads the config (a bad one is refused and the agent keeps serving); SIGTERM stops it
//! cleanly and removes the socket. `doctor` asks the running agent about its probes instead
//! of loading a second copy.

use std::{
    os::unix::net::UnixDatagram,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use infermem_tests::{infermem_bin, output_of, require_root, scratch_dir, wait_with_timeout};

/// How long to wait for one notification (the VM is slow; READY follows seeding /proc).
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(120);

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

fn signal(child: &Child, signal: i32) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

fn log_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn the_agent_speaks_systemd_and_reloads_on_sighup() {
    require_root();
    let dir = scratch_dir("daemon-service");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    let socket = dir.join("infermem.sock");
    let config = dir.join("config.toml");
    let good = format!("[api]\nsocket = \"{}\"\n", socket.display());
    std::fs::write(&config, &good).unwrap();
    let log = dir.join("agent.log");
    let mut agent = Command::new(infermem_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        // WatchdogSec=2: pings every second.
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .env("INFERMEM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn infermem run");

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
        detail.contains(&format!("running agent (pid {})", agent.id())),
        "{load}"
    );

    // A config with an unknown key is refused; the agent keeps its settings and serves.
    std::fs::write(&config, format!("{good}[collect]\nintervall = \"2s\"\n")).unwrap();
    signal(&agent, libc::SIGHUP);
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
    signal(&agent, libc::SIGHUP);
    expect_notification(&notify, "RELOADING=1");
    expect_notification(&notify, "READY=1");
    assert!(
        log_of(&log).contains("configuration reloaded"),
        "{}",
        log_of(&log)
    );

    signal(&agent, libc::SIGTERM);
    expect_notification(&notify, "STOPPING=1");
    let exit = wait_with_timeout(&mut agent, NOTIFY_TIMEOUT).expect("the agent stops");
    assert_eq!(exit.code(), Some(0), "{}", log_of(&log));
    assert!(!socket.exists(), "the socket is removed on SIGTERM");
    assert!(log_of(&log).contains("detaching the probes"));
}

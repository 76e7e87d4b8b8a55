//! `infermem run`, the agent, against real processes, real memory cgroups and real OOM kills,
//! through its thin clients (`ps`, `status`, `watch`, `inspect`) on a private socket: on the
//! host's cgroup v1 and, in the kernel-matrix VM, on v2. Each test starts its own agent and
//! checks only its own processes and cgroups.

use std::{
    os::unix::process::ExitStatusExt as _,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use infermem::collect::cgroup::CgroupVersion;
use infermem_tests::{
    EVENT_TIMEOUT, Talker,
    cgroup::TestCgroup,
    daemon::{
        Daemon, NOTICE_TIMEOUT, Watch, serial, start_time, workload_in, workload_of, write_gguf,
    },
    output_of, require_root, workload_bin,
};
use serde_json::Value;

/// How long a `watch` may stay silent (it prints once a second; the VM is slow).
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

const MIB: u64 = 1 << 20;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// The entry of `path` in a `status --json` answer.
fn cgroup_entry<'a>(status: &'a Value, path: &str) -> Option<&'a Value> {
    status["cgroups"]
        .as_array()
        .expect("status lists cgroups")
        .iter()
        .find(|c| c["path"] == path)
}

/// 50 MiB/s into a 512 MiB memcg (the kernel-matrix VM has 4 GiB): the OOM kill comes ~10 s
/// into the ramp. `watch --cgroup` must say `critical` before it, and `status` must list the
/// kill with the victim's pid and the cgroup.
#[test]
fn a_ramp_in_a_child_memcg_is_critical_before_its_oom_kill() {
    require_root();
    let _serial = serial();
    let agent = Daemon::start("daemon-ramp");
    let cgroup = TestCgroup::create("infermem-daemon-ramp", 512 * MIB);

    // A bystander keeps the cgroup tracked after the kill, so that `status` still reports it
    // with its OOM kill count. Holding 1 MiB beside the ramp's ~500, it is never the victim
    // (exempting it with oom_score_adj -1000 would need CAP_SYS_RESOURCE, which the root of
    // some CI containers lacks).
    let mut bystander = workload_in(&cgroup, &["steady", "1"]);
    bystander.expect_event("steady");
    let mut ramp = workload_in(&cgroup, &["ramp", "50", "0"]);
    let pid = ramp.expect_event("waiting")["pid"].as_u64().unwrap() as u32;

    // The agent tracks the cgroup before the ramp starts.
    let entry = agent.status_until(NOTICE_TIMEOUT, |s| cgroup_entry(s, &cgroup.path).cloned());
    let version = match cgroup.version {
        CgroupVersion::V1 => "v1",
        CgroupVersion::V2 => "v2",
    };
    assert_eq!(entry["version"], version, "{entry}");
    assert_eq!(entry["limit_bytes"], 512 * MIB, "{entry}");
    assert_eq!(entry["effective_limit_bytes"], 512 * MIB, "{entry}");

    let mut watch = Watch::start(&agent, &["--cgroup", &cgroup.path]);
    let first = watch.next(LINE_TIMEOUT).expect("a first watch line");
    assert_eq!(
        first["target"],
        format!("cgroup {}", cgroup.path),
        "{first}"
    );
    assert_ne!(first["ended"], true, "{first}");
    let kills_before = cgroup.oom_kills();

    ramp.send_line("go");
    ramp.expect_event("ramping");
    let ramp_started = unix_now();
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut first_critical: Option<Value> = None;
    let status = loop {
        if let Some(status) = ramp.child.try_wait().expect("poll the ramp") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the ramp was not OOM-killed within {EVENT_TIMEOUT:?}; watch: {:?}",
            watch.lines
        );
        let line = watch
            .next(LINE_TIMEOUT)
            .expect("watch ended during the ramp");
        assert_ne!(line["ended"], true, "the cgroup's watch ended: {line}");
        if line["level"] == "critical" && first_critical.is_none() {
            eprintln!("first critical line: {line}");
            first_critical = Some(line);
        }
    };
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the ramp was not killed: {status:?}"
    );
    assert!(
        cgroup.oom_kills() > kills_before,
        "the memcg counted no OOM kill"
    );

    // The agent saw the kill (the probes' OOM event), with the victim's pid and memcg.
    let kill = agent.status_until(NOTICE_TIMEOUT, |s| {
        s["oom_kills"]
            .as_array()
            .expect("status lists OOM kills")
            .iter()
            .find(|k| k["pid"] == pid)
            .cloned()
    });
    assert_eq!(kill["memcg"], cgroup.path.as_str(), "{kill}");
    assert_eq!(kill["comm"], "workload", "{kill}");
    let anon = kill["rss_anon_bytes"].as_u64().unwrap_or(0);
    assert!(
        anon > 400 * MIB && anon <= 512 * MIB,
        "victim anon RSS: {kill}"
    );
    let kill_ts = kill["ts_unix"].as_f64().expect("kill ts_unix");
    assert!(
        kill_ts > ramp_started && kill_ts <= unix_now() + 1.0,
        "kill at {kill_ts}, ramp started at {ramp_started}: {kill}"
    );

    // The cgroup's own counters, from memory.events (v2) or memory.oom_control (v1), and its
    // pressure (memory.pressure, v2 only).
    let entry = agent.status_until(NOTICE_TIMEOUT, |s| {
        cgroup_entry(s, &cgroup.path)
            .filter(|c| c["oom_kills"].as_u64() >= Some(1))
            .cloned()
    });
    if cgroup.version == CgroupVersion::V2 {
        assert!(
            entry["psi_some_avg10"].is_number(),
            "memory.pressure of a v2 cgroup: {entry}"
        );
        assert!(entry["max_events"].as_u64() >= Some(1), "{entry}");
    }

    let critical = first_critical.unwrap_or_else(|| {
        panic!(
            "no critical line before the OOM kill at {kill_ts}; watch: {:#?}",
            watch.lines
        )
    });
    let critical_ts = critical["ts"].as_f64().expect("ts");
    let lead = kill_ts - critical_ts;
    eprintln!(
        "ramp 50 MiB/s into 512 MiB (cgroup {version}): critical {:.1} s after the ramp \
         started, {lead:.1} s before the OOM kill (ETA then {}, range {}..{}); kill {:.1} s \
         after the start",
        critical_ts - ramp_started,
        critical["eta_seconds"],
        critical["eta_low_seconds"],
        critical["eta_high_seconds"],
        kill_ts - ramp_started
    );
    assert!(
        lead > 0.0,
        "critical at {critical_ts} is not before the kill at {kill_ts}"
    );
    assert_eq!(critical["domain"], cgroup.path.as_str(), "{critical}");

    // The watch of a cgroup ends when the cgroup goes.
    assert!(bystander.finish().success());
    drop(ramp);
    drop(cgroup);
    let last = loop {
        let line = watch
            .next(LINE_TIMEOUT)
            .expect("watch ended without a last line");
        if line["ended"] == true {
            break line;
        }
    };
    eprintln!("last watch line: {last}");
    assert!(watch.wait(LINE_TIMEOUT).success());
    // The kernel killed the ramp: that is who the agent must have named.
    assert_eq!(
        critical["victim_pid"], pid,
        "the victim named before the kill is not the process the kernel killed: {critical}"
    );
}

/// A server at a constant 200 MiB in a 1 GiB memcg, watched for 40 s (more than the
/// predictor's 30-s window): never critical, and ok once the first samples are in.
#[test]
fn a_steady_process_is_never_critical() {
    require_root();
    let _serial = serial();
    let agent = Daemon::start("daemon-steady");
    let cgroup = TestCgroup::create("infermem-daemon-steady", 1024 * MIB);
    let mut steady = workload_in(&cgroup, &["steady", "200"]);
    let pid = steady.expect_event("steady")["pid"].as_u64().unwrap() as u32;

    let mut watch = Watch::start(&agent, &[&pid.to_string()]);
    let started = Instant::now();
    // The first lines may still see the 200 MiB being written (one step of growth; seconds
    // in the kernel-matrix VM), and a level raised by it is held for the predictor's 5 calm
    // evaluations (`calm_evaluations`) before it comes down.
    const WARM_UP: usize = 12;
    while started.elapsed() < Duration::from_secs(40) {
        let line = watch.next(LINE_TIMEOUT).expect("watch ended early");
        assert_eq!(line["target"], format!("pid {pid}"), "{line}");
        assert_ne!(line["ended"], true, "{line}");
        assert_ne!(
            line["level"], "critical",
            "a steady process is critical: {line}"
        );
        if watch.lines.len() > WARM_UP {
            assert_eq!(line["level"], "ok", "{line}");
            // The host may grow slowly (whatever else runs on it); the cgroup does not.
            if line["domain"] == cgroup.path.as_str() {
                assert!(line["eta_seconds"].is_null(), "{line}");
            }
            let rss = line["rss_bytes"].as_u64().unwrap_or(0);
            assert!(rss >= 200 * MIB, "rss of the steady process: {line}");
        }
    }
    assert!(
        watch.lines.len() >= 30,
        "{} lines in 40 s",
        watch.lines.len()
    );
    eprintln!(
        "steady 200 MiB in 1 GiB: {} lines, levels {:?}; last {}",
        watch.lines.len(),
        watch
            .lines
            .iter()
            .map(|l| l["level"].as_str().unwrap_or("?").to_owned())
            .collect::<Vec<_>>(),
        watch.lines.last().unwrap()
    );
    assert!(steady.finish().success());
    let last = watch.next(LINE_TIMEOUT).expect("a last line");
    let last = if last["ended"] == true {
        last
    } else {
        loop {
            let line = watch
                .next(LINE_TIMEOUT)
                .expect("watch ended without a last line");
            if line["ended"] == true {
                break line;
            }
        }
    };
    assert_eq!(last["end_reason"], "exited", "{last}");
    assert!(watch.wait(LINE_TIMEOUT).success());
}

/// Writes `pid - 1` to `ns_last_pid` and starts `args`, until the child gets `pid` (other
/// processes may take it first).
fn spawn_with_pid(pid: u32, args: &[&str]) -> Talker {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("write /proc/sys/kernel/ns_last_pid");
        let mut cmd = Command::new(workload_bin());
        cmd.args(args);
        let child = Talker::spawn(cmd);
        if child.pid() == pid {
            return child;
        }
        drop(child);
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("could not get pid {pid} reused in 50 tries");
}

/// A pid that names another process later is another process: a `watch` of the first ends
/// when it exits, and `ps` and `inspect` report the new one.
#[test]
fn a_reused_pid_is_a_new_process() {
    require_root();
    let _serial = serial();
    let agent = Daemon::start("daemon-reuse");
    let model = agent.dir.join("model.gguf");
    write_gguf(&model);
    let model = model.to_str().unwrap();

    let mut first = Talker::spawn({
        let mut cmd = Command::new(workload_bin());
        cmd.args(["map-file", model, "first"]);
        cmd
    });
    first.expect_event("mapped");
    let pid = first.pid();
    let first_start = start_time(pid);
    let listed = agent.ps_until(NOTICE_TIMEOUT, |ps| workload_of(ps, pid).cloned());
    assert_eq!(listed["start_time"], first_start, "{listed}");
    assert_eq!(listed["model"], model, "{listed}");

    let mut watch = Watch::start(&agent, &[&pid.to_string()]);
    let line = watch.next(LINE_TIMEOUT).expect("a first line");
    assert_ne!(line["ended"], true, "{line}");

    assert!(first.finish().success());
    let mut second = spawn_with_pid(pid, &["map-file", model, "second"]);
    second.expect_event("mapped");
    let second_start = start_time(pid);
    assert_ne!(second_start, first_start);

    let last = loop {
        let line = watch
            .next(LINE_TIMEOUT)
            .expect("watch stopped without an ended line");
        if line["ended"] == true {
            break line;
        }
    };
    assert_eq!(last["end_reason"], "exited", "{last}");
    assert_eq!(
        start_time(pid),
        second_start,
        "the pid still names the second process when the watch of the first ends"
    );
    assert!(watch.wait(LINE_TIMEOUT).success());
    eprintln!(
        "pid {pid} reused (start time {first_start} then {second_start}); the watch ended: {last}"
    );

    let listed = agent.ps_until(NOTICE_TIMEOUT, |ps| {
        workload_of(ps, pid)
            .filter(|w| w["start_time"] == second_start)
            .cloned()
    });
    assert_eq!(listed["model"], model, "{listed}");
    let report = agent.json(&["inspect", &pid.to_string(), "--json", "--duration", "1s"]);
    assert_eq!(report["pid"], pid);
    let cmdline: Vec<&str> = report["cmdline"]
        .as_array()
        .expect("cmdline")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(cmdline.contains(&"second"), "{cmdline:?}");
    assert!(second.finish().success());
}

/// kill -9 leaves a stale socket: the next agent replaces it and serves; SIGTERM then stops
/// it cleanly and removes its socket.
#[test]
fn the_agent_restarts_cleanly_after_kill_9() {
    require_root();
    let _serial = serial();
    let mut agent = Daemon::start("daemon-restart");
    let first_pid = agent.pid();
    let status = agent.kill9();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(
        agent.socket.exists(),
        "a killed agent cannot remove its socket"
    );
    let stale = std::fs::metadata(&agent.socket).unwrap();

    // With the stale socket only, a client finds no agent and says it runs standalone.
    let out = output_of(agent.client().args(["status", "--json"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr.contains(infermem_tests::daemon::STANDALONE_NOTE),
        "{stderr}"
    );

    agent.restart();
    let status = agent.status();
    assert_eq!(status["daemon"]["pid"], agent.pid());
    assert_ne!(agent.pid(), first_pid);
    // A new socket file (inode numbers are reused at once on some file systems: compare the
    // change times).
    let socket = std::fs::metadata(&agent.socket).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert!(
        (socket.ctime(), socket.ctime_nsec()) > (stale.ctime(), stale.ctime_nsec()),
        "the stale socket was not replaced"
    );
    let ps = agent.ps();
    assert!(ps["workloads"].is_array(), "{ps}");
    assert_eq!(ps["daemon"]["pid"], agent.pid());

    let status = agent.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM: {status:?}\n{}",
        agent.log_tail()
    );
    assert!(
        !agent.socket.exists(),
        "the socket outlived a clean stop:\n{}",
        agent.log_tail()
    );
}

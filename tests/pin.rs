//! Pinning model files in RAM, for real: `infermem pin` maps and mlocks a file, which then
//! stays resident (as mincore measures) under a page-cache flood inside the memory cgroup its
//! pages are charged to, while an unpinned control file is evicted; pins follow their
//! process, refuse what is not a regular file, and go through the agent when one runs.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use infermem::act::pin::file_resident_bytes;
use infermem_tests::{
    Talker,
    act::{ACT_TIMEOUT, in_force, wait_for},
    cgroup::TestCgroup,
    daemon::{Daemon, NOTICE_TIMEOUT, in_cgroup, serial, start_time, workload_of, write_gguf},
    infermem_bin, output_of, require_root, scratch_dir, workload_bin, write_file,
};

const MIB: u64 = 1 << 20;

fn workload(args: &[&str], cgroup: Option<&TestCgroup>) -> Talker {
    let mut cmd = Command::new(workload_bin());
    cmd.args(args);
    if let Some(cgroup) = cgroup {
        in_cgroup(&mut cmd, cgroup);
    }
    Talker::spawn(cmd)
}

/// `infermem pin TARGET --hold --json`, with no agent on its socket.
fn hold(target: &str, socket: &Path) -> Talker {
    let mut cmd = Command::new(infermem_bin());
    cmd.arg("--socket")
        .arg(socket)
        .args(["pin", target, "--hold", "--json"]);
    Talker::spawn(cmd)
}

/// The share of `path` resident in the page cache.
fn resident_share(path: &Path) -> f64 {
    let (resident, len) = file_resident_bytes(path).expect("map the file for mincore");
    resident as f64 / len as f64
}

fn interrupt(talker: &mut Talker) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(talker.pid() as i32, libc::SIGINT) };
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// A memcg of 96 MiB holds the page cache of two 32 MiB files, A and B. `infermem pin A`
/// (outside the memcg) mlocks A. A 256 MiB file is then read inside the memcg: its reclaim
/// must evict B, and must leave A whole.
#[test]
fn a_pinned_file_stays_resident_through_a_page_cache_flood_in_its_memcg() {
    require_root();
    let _serial = serial();
    let dir = scratch_dir("pin-flood");
    let (a, b, flood) = (dir.join("a.bin"), dir.join("b.bin"), dir.join("flood.bin"));
    write_file(&a, 32);
    write_file(&b, 32);
    write_file(&flood, 256);
    let cgroup = TestCgroup::create("infermem-pin-flood", 96 * MIB);
    let mut readers: Vec<Talker> = [&a, &b]
        .iter()
        .map(|file| workload(&["read", path_str(file)], Some(&cgroup)))
        .collect();
    for reader in &mut readers {
        reader.expect_event("read");
    }
    let (a_before, b_before) = (resident_share(&a), resident_share(&b));
    assert!(
        a_before > 0.9 && b_before > 0.9,
        "read in: A {a_before:.2}, B {b_before:.2}"
    );

    let mut pin = hold(path_str(&a), &dir.join("no-agent.sock"));
    let pinned = pin.expect_event("pinned");
    assert_eq!(pinned["bytes"], 32 * MIB, "{pinned}");
    assert_eq!(pinned["resident_bytes"], 32 * MIB, "{pinned}");
    pin.expect_event("holding");

    let mut flooder = workload(&["read", path_str(&flood)], Some(&cgroup));
    flooder.expect_event("read");
    let (a_after, b_after) = (resident_share(&a), resident_share(&b));
    eprintln!(
        "resident after a 256 MiB flood in a 96 MiB memcg: pinned A {:.1} %, unpinned B {:.1} %",
        a_after * 100.0,
        b_after * 100.0
    );
    assert_eq!(a_after, 1.0, "the pinned file lost pages");
    assert!(
        b_after < 0.5,
        "the control was not evicted ({b_after:.2}): no pressure?"
    );

    interrupt(&mut pin);
    assert!(pin.wait().success());
    drop((readers, flooder));
}

/// `pin <pid> --hold` pins the model file the process maps (the very file of its mapping)
/// and lets go when the process exits.
#[test]
fn a_held_pin_of_a_process_ends_with_the_process() {
    require_root();
    let dir = scratch_dir("pin-pid");
    let model = dir.join("model.gguf");
    write_gguf(&model);
    let mut server = workload(&["map-file", path_str(&model)], None);
    server.expect_event("mapped");
    let mut pin = hold(&server.pid().to_string(), &dir.join("no-agent.sock"));
    let pinned = pin.expect_event("pinned");
    assert_eq!(pinned["path"], path_str(&model), "{pinned}");
    pin.expect_event("holding");
    assert!(server.finish().success());
    let started = Instant::now();
    assert!(pin.wait().success());
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// What cannot be pinned is refused at once, with why.
#[test]
fn directories_fifos_and_pins_without_an_agent_or_hold_are_refused() {
    require_root();
    let dir = scratch_dir("pin-refused");
    let socket = dir.join("no-agent.sock");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(path_str(&fifo)).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let model = dir.join("model.gguf");
    write_gguf(&model);
    let cases: [(&[&str], &str); 3] = [
        (&["pin", path_str(&dir), "--hold"], "not a regular file"),
        (&["pin", path_str(&fifo), "--hold"], "not a regular file"),
        (&["pin", path_str(&model)], "--hold"),
    ];
    for (args, words) in cases {
        let started = Instant::now();
        let out = output_of(
            Command::new(infermem_bin())
                .arg("--socket")
                .arg(&socket)
                .args(args)
                .stdin(Stdio::null()),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "{args:?} hung");
    }
}

/// Through the agent: `pin <pid>` is kept by the agent (listed by `actions`), `unpin`
/// releases it, and a pin whose process exits is released by the agent.
#[test]
fn the_agent_keeps_a_pin_until_unpin_or_the_process_exits() {
    require_root();
    let _serial = serial();
    let agent = Daemon::start("pin-agent");
    let model: PathBuf = agent.dir.join("model.gguf");
    write_gguf(&model);
    let mut server = workload(&["map-file", path_str(&model)], None);
    server.expect_event("mapped");
    let pid = server.pid();
    agent.ps_until(NOTICE_TIMEOUT, |ps| workload_of(ps, pid).cloned());
    let pins = || agent.json(&["actions", "--json"])["pins"].clone();

    let out = output_of(agent.client().args(["pin", &pid.to_string()]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pin "));
    assert_eq!(pins()[0]["path"], path_str(&model), "{}", pins());
    assert_eq!(pins()[0]["resident_bytes"], 2 * MIB, "{}", pins());

    let out = output_of(agent.client().args(["unpin", &pid.to_string()]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unpinned"));
    assert_eq!(pins(), serde_json::json!([]));

    let out = output_of(agent.client().args(["pin", &pid.to_string()]));
    assert!(out.status.success());
    assert!(server.finish().success());
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    while pins() != serde_json::json!([]) {
        assert!(
            Instant::now() < deadline,
            "the pin outlived its process: {}",
            pins()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The policy pins a protected workload's model file (enforce mode) and unpins it when the
/// workload exits.
#[test]
fn the_policy_pins_a_workloads_model_and_unpins_it_at_exit() {
    require_root();
    let _serial = serial();
    let scratch = scratch_dir("pin-policy");
    let model = scratch.join("model.gguf");
    write_gguf(&model);
    let mut server = workload(&["map-file", path_str(&model)], None);
    server.expect_event("mapped");
    let pid = server.pid();
    let policy = format!(
        r#"mode = "enforce"
[[policy.workload]]
profile = "local_llm"
match = {{ model = ["{}"] }}
oom_score_adj = 0
protect = "none"
"#,
        path_str(&model)
    );
    let mut agent = Daemon::start_with_policy("pin-policy", &policy);
    let pin = in_force(&agent, "pin:");
    assert!(
        pin["id"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{pid}:{}", start_time(pid))),
        "{pin}"
    );
    let pins = agent.json(&["actions", "--json"])["pins"].clone();
    assert_eq!(pins[0]["path"], path_str(&model), "{pins}");
    assert_eq!(pins[0]["holders"][0], format!("pid {pid}"), "{pins}");
    assert!(server.finish().success());
    wait_for(
        "the pin released at the workload's exit",
        ACT_TIMEOUT,
        || agent.json(&["actions", "--json"])["pins"] == serde_json::json!([]),
    );
    assert!(agent.stop().success());
}

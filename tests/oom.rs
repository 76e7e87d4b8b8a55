//! A real OOM kill inside a child memory cgroup with a 64 MiB limit, seen by the probes.

use std::{os::unix::process::ExitStatusExt as _, process::Command};

use infermem_tests::{Inspection, Talker, cgroup::TestCgroup, require_root, workload_bin};

#[test]
fn an_oom_kill_in_a_64_mib_memcg_is_captured_with_the_right_pid() {
    require_root();
    let cgroup = TestCgroup::create("infermem-oom", 64 << 20);

    let mut cmd = Command::new(workload_bin());
    cmd.args(["hog", "4"]);
    let mut hog = Talker::spawn(cmd);
    let pid = hog.pid();
    hog.expect_event("waiting");
    cgroup.add(pid);

    let mut inspection = Inspection::start(pid, "60s", &[]);
    inspection.wait_until_sampling();
    hog.send_line("go");
    let (ok, error) = inspection.finish();
    let status = hog.wait();

    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the hog was not OOM-killed: {status:?}"
    );
    assert!(cgroup.oom_kills() >= 1, "the memcg counted no OOM kill");
    assert!(!ok);
    let kill = &error["error"]["oom_kill"];
    assert_eq!(error["error"]["kind"], "exited_during_sampling", "{error}");
    assert_eq!(kill["pid"], pid, "{error}");
    assert_eq!(kill["comm"], "workload");
    assert_eq!(kill["memcg"], cgroup.path.as_str(), "{error}");
    // The victim held about the limit in anonymous memory when it was chosen.
    let anon = kill["rss_anon_bytes"].as_u64().expect("anon rss known");
    assert!(
        anon > 40 << 20 && anon <= 64 << 20,
        "victim anon rss {anon}"
    );
    assert_eq!(kill["oom_score_adj"], 0);
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("OOM-killed"), "{message}");
}

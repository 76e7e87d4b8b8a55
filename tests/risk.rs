//! `inspect`'s `risk` section (the predictor over the sampled window) on real processes in
//! real memory cgroups: on the host's cgroup v1 and, in the kernel-matrix VM, on v2.

use std::process::Command;

use infermem_tests::{
    Inspection, Talker, cgroup::TestCgroup, require_root, scratch_dir, workload_bin, write_file,
};
use serde_json::Value;

/// Inspects a workload that holds `anon_mib` of anonymous memory in a fresh memcg limited to
/// `limit_mib`; returns the report and the workload's pid.
fn inspect_in_cgroup(name: &str, limit_mib: u64, anon_mib: u64) -> (Value, u32, String) {
    let dir = scratch_dir(name);
    let file = dir.join("weights.bin");
    write_file(&file, 1);
    let cgroup = TestCgroup::create(name, limit_mib << 20);
    let mut cmd = Command::new(workload_bin());
    cmd.args([
        "map-and-alloc",
        file.to_str().unwrap(),
        "1",
        &anon_mib.to_string(),
    ]);
    let mut workload = Talker::spawn(cmd);
    let pid = workload.expect_event("mapped")["pid"].as_u64().unwrap() as u32;
    cgroup.add(pid);
    // The anonymous block is allocated and written inside the cgroup, before sampling.
    workload.send_line("go");
    workload.expect_event("touched");
    let (ok, report) = Inspection::start(pid, "2s", &[]).finish();
    assert!(ok, "inspect failed: {report}");
    assert!(workload.finish().success());
    std::fs::remove_dir_all(dir).unwrap();
    (report, pid, cgroup.path.clone())
}

/// One test, so that the two workloads are not sampled at the same time: the tight one's
/// allocation would be a burst of growth on the host while the roomy one is inspected.
#[test]
fn the_cgroup_about_to_run_out_is_named_with_its_victim_and_a_roomy_one_is_not() {
    require_root();
    let (report, pid, path) = inspect_in_cgroup("infermem-risk-tight", 100, 92);
    let risk = &report["risk"];
    assert_eq!(report["cgroup"]["path"], path.as_str(), "{report}");
    assert_eq!(risk["level"], "elevated", "{risk}");
    assert_eq!(risk["domain"], path.as_str(), "{risk}");
    assert_eq!(risk["victim_pid"], pid, "{risk}");
    assert!(
        risk["eta_seconds"].is_null(),
        "a process that stopped growing has no ETA: {risk}"
    );
    assert!(!risk["reasons"].as_array().unwrap().is_empty(), "{risk}");

    // 8 MiB in 1 GiB: the cgroup is no risk. The host may be, if something beside the test
    // fills it; that is the host's business, so only the cgroup is checked.
    let (report, _, path) = inspect_in_cgroup("infermem-risk-roomy", 1024, 8);
    let risk = &report["risk"];
    assert!(
        risk["level"] == "ok" || risk["domain"] == "host",
        "a roomy cgroup flagged: {risk}"
    );
    assert_ne!(risk["domain"], path.as_str(), "{risk}");
}

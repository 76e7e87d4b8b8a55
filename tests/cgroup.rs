//! infermem's memory cgroup readings against the kernel's own cgroupfs, on whichever version
//! carries the memory controller: v1 on the host, v2 in the VM (`cargo xtask test --kernel`).

use std::process::Command;

use infermem::collect::cgroup::CgroupVersion;
use infermem_tests::{
    Talker, cgroup::TestCgroup, infermem_bin, require_root, scratch_dir, workload_bin, write_file,
};
use serde_json::Value;

const PARENT_LIMIT: u64 = 256 << 20;
const CHILD_LIMIT: u64 = 512 << 20;
const HIGH: u64 = 192 << 20;
const CAPPED_LIMIT: u64 = 128 << 20;
const ANON_MIB: u64 = 32;

/// A process in a cgroup without a limit of its own, below two limited ancestors: inspect
/// reports no own limit, the tightest ancestor's as the effective one, `memory.high` (v2) and
/// the usage the kernel charges. Moved to a sibling with a tighter limit of its own, it
/// reports that limit as both its own and the effective one.
#[test]
fn inspect_reports_a_nested_cgroups_limits_and_usage() {
    require_root();
    let parent = TestCgroup::create("infermem-cgroup", PARENT_LIMIT);
    let child = parent.child("service", Some(CHILD_LIMIT));
    let leaf = child.child("worker", None);
    let capped = child.child("capped", Some(CAPPED_LIMIT));
    if leaf.version == CgroupVersion::V2 {
        leaf.write("memory.high", &HIGH.to_string());
    }
    let dir = scratch_dir("cgroup");
    let model = dir.join("model.bin");
    write_file(&model, 4);

    let mut cmd = Command::new(workload_bin());
    cmd.args(["map-and-alloc", model.to_str().unwrap(), "4"])
        .arg(ANON_MIB.to_string());
    let mut workload = Talker::spawn(cmd);
    let pid = workload.pid();
    workload.expect_event("mapped");
    leaf.add(pid);
    workload.send_line("go");
    workload.expect_event("touched");

    let usage_file = match leaf.version {
        CgroupVersion::V1 => "memory.usage_in_bytes",
        CgroupVersion::V2 => "memory.current",
    };
    let before = leaf.read_u64(usage_file);
    let report = inspect(pid);
    let after = leaf.read_u64(usage_file);
    let cgroup = &report["cgroup"];

    assert_eq!(cgroup["version"], leaf.version.to_string(), "{cgroup}");
    assert_eq!(cgroup["path"], leaf.path.as_str(), "{cgroup}");
    assert_eq!(cgroup["limit_bytes"], Value::Null, "{cgroup}");
    assert_eq!(cgroup["effective_limit_bytes"], PARENT_LIMIT, "{cgroup}");
    let high = match leaf.version {
        CgroupVersion::V1 => Value::Null,
        CgroupVersion::V2 => HIGH.into(),
    };
    assert_eq!(cgroup["high_bytes"], high, "{cgroup}");
    let usage = cgroup["usage_bytes"].as_u64().expect("usage known");
    let slack = 4 << 20;
    assert!(
        usage >= ANON_MIB << 20
            && usage + slack >= before.min(after)
            && usage <= after.max(before) + slack,
        "usage {usage} vs the kernel's {before}..{after}"
    );

    capped.add(pid);
    let cgroup = &inspect(pid)["cgroup"];
    assert_eq!(cgroup["path"], capped.path.as_str(), "{cgroup}");
    assert_eq!(cgroup["limit_bytes"], CAPPED_LIMIT, "{cgroup}");
    assert_eq!(cgroup["effective_limit_bytes"], CAPPED_LIMIT, "{cgroup}");
    assert_eq!(cgroup["high_bytes"], Value::Null, "{cgroup}");
    workload.finish();
    std::fs::remove_dir_all(dir).unwrap();
}

/// `infermem inspect <pid> --json` over a short window.
fn inspect(pid: u32) -> Value {
    let output = Command::new(infermem_bin())
        .args(["inspect", &pid.to_string(), "--json", "--duration", "300ms"])
        .output()
        .expect("run infermem");
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("JSON report")
}

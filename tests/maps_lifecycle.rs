//! The probes' maps stay bounded: a fork-and-exit storm leaves no entries behind.
//!
//! Only the storm's own pids are checked: the maps are host-wide, and anything else running
//! beside the test (a build, another test) may add entries of its own at any time.

use std::{process::Command, time::Duration};

use infermem::probes::{ProbeOptions, Probes};
use infermem_common::Probe;
use infermem_tests::{Talker, require_root, scratch_dir, workload_bin, write_file};

const CHILDREN: usize = 400;

#[test]
fn a_fork_and_exit_storm_leaves_no_map_entries_behind() {
    require_root();
    let dir = scratch_dir("storm");
    let model = dir.join("weights.bin");
    write_file(&model, 4);

    let probes = Probes::load(&ProbeOptions::default()).expect("probes load");

    let mut cmd = Command::new(workload_bin());
    cmd.args(["storm", model.to_str().unwrap(), &CHILDREN.to_string()]);
    let mut storm = Talker::spawn(cmd);
    let stormed = storm.expect_event("stormed");
    let parent = storm.pid();
    assert!(storm.finish().success());
    let pids: Vec<u32> = stormed["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(pids.len(), CHILDREN);
    std::thread::sleep(Duration::from_millis(200));

    // Every child mapped a 4 MiB file (2-3 buckets), faulted, mmap'd and brk'd; all of that
    // state must be gone with it, and so must the parent's.
    for pid in pids.iter().copied().chain([parent]) {
        let left = probes.occupancy(Some(pid));
        assert_eq!(left.fault_counters, 0, "fault counters of {pid} left");
        assert_eq!(left.proc_memory, 0, "memory accounting of {pid} left");
        assert_eq!(left.file_buckets, 0, "file buckets of {pid} left");
        assert_eq!(left.syscall_args, 0, "syscall arguments of {pid} left");
    }
    // The probes saw the storm: every child exited with file mappings, and every fork came
    // from a parent with file mappings (other processes can only add to these counts).
    let stats = probes.probe_stats();
    let events = |probe: Probe| stats.iter().find(|(p, _)| *p == probe).unwrap().1;
    assert!(events(Probe::Exit).events >= CHILDREN as u64);
    assert!(events(Probe::Fork).events >= CHILDREN as u64);
    std::fs::remove_dir_all(dir).unwrap();
}

//! The probes' maps stay bounded (a fork-and-exit storm leaves no entries behind), and their
//! events hold up when watching the whole host.
//!
//! Only the storm's own pids are checked: the maps are host-wide, and anything else running
//! beside the test (a build, another test) may add entries of its own at any time.

use std::{
    os::unix::{fs::MetadataExt as _, process::ExitStatusExt as _},
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use infermem::probes::{EventDetail, EventReader, ProbeOptions, Probes};
use infermem_common::{BucketPolicy, LARGE_MAPPING_BYTES, Probe};
use infermem_tests::{
    Talker, cgroup::TestCgroup, require_root, scratch_dir, workload_bin, write_file,
};

const CHILDREN: usize = 400;

#[test]
fn a_fork_and_exit_storm_leaves_no_map_entries_behind() {
    require_root();
    let dir = scratch_dir("storm");
    let model = dir.join("weights.bin");
    write_file(&model, 4);

    // Buckets for the children's 4 MiB files, as inspect gives them.
    let probes = Probes::load(&small_mappings_with_quota(
        BucketPolicy::HOST.max_per_process,
    ))
    .expect("probes load");

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

/// Probes that give buckets to every file mapping of at least 1 MiB, up to `quota` per process.
fn small_mappings_with_quota(quota: u64) -> ProbeOptions {
    ProbeOptions {
        buckets: BucketPolicy {
            min_mapping_bytes: LARGE_MAPPING_BYTES,
            max_per_process: quota,
        },
        ..ProbeOptions::default()
    }
}

/// A mapping that would take a process past its bucket quota gets no buckets, and that is
/// counted, per process and per probe.
#[test]
fn a_mapping_over_the_bucket_quota_is_refused_and_counted() {
    require_root();
    let dir = scratch_dir("quota");
    let model = dir.join("weights.bin");
    write_file(&model, 64);
    let probes = Probes::load(&small_mappings_with_quota(16)).expect("probes load");

    let mut cmd = Command::new(workload_bin());
    cmd.args(["map-file", model.to_str().unwrap()]);
    let mut child = Talker::spawn(cmd);
    child.expect_event("mapped");
    let pid = child.pid();
    let memory = probes
        .proc_memory(pid)
        .expect("memory accounting of the workload");
    assert!(memory.mappings_over_quota >= 1, "{memory:?}");
    assert!(memory.file_buckets <= 16, "{memory:?}");
    assert!(probes.occupancy(Some(pid)).file_buckets <= 16);
    let stats = probes.probe_stats();
    let sys_exit = stats.iter().find(|(p, _)| *p == Probe::SysExit).unwrap().1;
    assert!(sys_exit.over_quota >= 1, "{sys_exit:?}");
    assert!(child.finish().success());
    std::fs::remove_dir_all(dir).unwrap();
}

/// The flood test fills the host-wide ring buffer for a moment, which would drop the events
/// another test waits for: the two take turns.
static RING_BUFFER: Mutex<()> = Mutex::new(());

/// Drains `reader` until some event about `pid` matches `found`, for at most 10 s; returns
/// every event about `pid` drained so far.
fn events_until(
    reader: &mut EventReader,
    pid: u32,
    found: impl Fn(&EventDetail) -> bool,
) -> Vec<EventDetail> {
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !events.iter().any(&found) {
        let drained = reader.drain().0.into_iter();
        events.extend(drained.filter(|e| e.tgid == pid).map(|e| e.detail));
        std::thread::sleep(Duration::from_millis(20));
    }
    events
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks after boot.
fn proc_start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    // Fields from 3 (state) on; the start time is field 22.
    after_comm.split(' ').nth(22 - 3).unwrap().parse().unwrap()
}

/// Every process, not only those with large file mappings, gets an exec and an exit event
/// carrying its start time (as /proc shows it) and its memory cgroup.
#[test]
fn exec_and_exit_of_any_process_carry_its_start_time_and_memcg() {
    require_root();
    let _turn = RING_BUFFER.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = TestCgroup::create("infermem-lifecycle", 256 << 20);
    let mut probes = Probes::load(&ProbeOptions::default()).expect("probes load");
    let mut reader = probes.take_event_reader().expect("an event reader");

    // The shell moves itself into the cgroup, then execs the workload (which waits).
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#"echo $$ > "$1/cgroup.procs" && exec "$0" hog 1"#])
        .arg(workload_bin())
        .arg(&cgroup.dir);
    let mut child = Talker::spawn(cmd);
    child.expect_event("waiting");
    let pid = child.pid();
    let start_time = proc_start_time(pid);
    let memcg = cgroup.dir.metadata().unwrap().ino();
    assert!(child.finish().success());

    let events = events_until(&mut reader, pid, |e| matches!(e, EventDetail::Exit { .. }));
    let exec = events.iter().find_map(|e| match e {
        EventDetail::Exec(p) if p.comm == "workload" => Some(p),
        _ => None,
    });
    let exec = exec.unwrap_or_else(|| panic!("no exec event of the workload: {events:?}"));
    assert_eq!(exec.start_time, Some(start_time), "exec: {exec:?}");
    assert_eq!(exec.memcg_id, Some(memcg), "exec: {exec:?}");
    let exit = events.iter().find_map(|e| match e {
        EventDetail::Exit { process, .. } => Some(process),
        _ => None,
    });
    let exit = exit.unwrap_or_else(|| panic!("no exit event of the workload: {events:?}"));
    assert_eq!(exit.comm, "workload");
    // Its libraries are far below the host-wide policy's model-sized threshold.
    assert!(events.iter().any(|e| matches!(
        e,
        EventDetail::Exit {
            had_file_mappings: false,
            ..
        }
    )));
    assert_eq!(exit.start_time, Some(start_time), "exit: {exit:?}");
    assert_eq!(exit.memcg_id, Some(memcg), "exit: {exit:?}");
}

/// OOM kills have a ring buffer of their own: with the main one flooded by mmap events (and
/// dropping them), the kill still arrives.
#[test]
fn an_oom_kill_arrives_while_the_main_ring_buffer_is_flooded() {
    require_root();
    let _turn = RING_BUFFER.lock().unwrap_or_else(|e| e.into_inner());
    let cgroup = TestCgroup::create("infermem-oom-flood", 64 << 20);
    let mut probes = Probes::load(&ProbeOptions::default()).expect("probes load");
    let mut reader = probes.take_event_reader().expect("an event reader");

    // 2 × 20 000 events of large mmaps and munmaps, undrained: far beyond the 1 MiB buffer.
    let len = 2 << 20;
    for _ in 0..20_000 {
        // SAFETY: a private anonymous mapping, unmapped at once and never touched.
        unsafe {
            let block = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(block, libc::MAP_FAILED);
            libc::munmap(block, len);
        }
    }
    let drops = |probes: &Probes| {
        let stats = probes.probe_stats();
        stats
            .iter()
            .find(|(p, _)| *p == Probe::SysExit)
            .unwrap()
            .1
            .ringbuf_drops
    };
    assert!(drops(&probes) > 0, "the main ring buffer was not flooded");

    let mut cmd = Command::new(workload_bin());
    cmd.args(["hog", "4"]);
    let mut hog = Talker::spawn(cmd);
    let pid = hog.pid();
    hog.expect_event("waiting");
    cgroup.add(pid);
    hog.send_line("go");
    let status = hog.wait();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "not OOM-killed: {status:?}"
    );

    let is_kill = |e: &EventDetail| matches!(e, EventDetail::OomVictim(_));
    let events = events_until(&mut reader, pid, is_kill);
    assert!(
        events.iter().any(is_kill),
        "the OOM kill of {pid} was dropped"
    );
}

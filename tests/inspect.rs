//! `infermem inspect` against real processes on the real kernel.

use std::process::Command;

use infermem_tests::{
    Inspection, Talker, assert_close, f64_of, infermem_bin, output_of, require_root, scratch_dir,
    workload_bin, write_file,
};
use serde_json::Value;

const FILE_MIB: u64 = 128;
const ANON_MIB: u64 = 96;
const PAGE: u64 = 4096;

/// A child maps a 128 MiB file and reads every page, then allocates 96 MiB and writes every
/// page, while `inspect` samples it with the probes attached.
#[test]
fn reports_file_and_anonymous_memory_and_counts_their_faults() {
    require_root();
    let dir = scratch_dir("inspect-split");
    let model = dir.join("model.gguf");
    write_file(&model, FILE_MIB as usize);

    let mut cmd = Command::new(workload_bin());
    cmd.args(["map-and-alloc", model.to_str().unwrap()])
        .args([FILE_MIB.to_string(), ANON_MIB.to_string()]);
    let mut workload = Talker::spawn(cmd);
    workload.expect_event("mapped");

    let mut inspection = Inspection::start(workload.pid(), "5s", &[]);
    inspection.wait_until_sampling();
    let kernel_faults_before = kernel_fault_count(workload.pid());
    workload.send_line("go");
    let touched = workload.expect_event("touched");
    let kernel_faults = kernel_fault_count(workload.pid()) - kernel_faults_before;
    let (ok, report) = inspection.finish();
    assert!(ok, "inspect failed: {report}");

    assert_eq!(report["pid"], workload.pid());
    assert_eq!(report["sources"]["ebpf"], true, "{}", report["sources"]);
    let probes = report["sources"]["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 7);
    for probe in probes {
        assert_eq!(probe["ringbuf_drops"], 0, "{probe}");
        assert_eq!(probe["map_drops"], 0, "{probe}");
    }

    // Memory split: the file is resident (every page was read), the anonymous block too.
    let mapping = report["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["path"] == model.to_str().unwrap())
        .unwrap_or_else(|| panic!("model file not among mappings: {}", report["mappings"]))
        .clone();
    assert_eq!(mapping["size_bytes"], FILE_MIB << 20);
    assert_close(
        "file resident",
        f64_of(&mapping["resident_bytes"], "resident"),
        (FILE_MIB << 20) as f64,
        0.10,
    );
    let memory = &report["memory"];
    assert_close(
        "anon",
        f64_of(&memory["anon_bytes"], "anon"),
        (ANON_MIB << 20) as f64,
        0.10,
    );
    assert!(f64_of(&memory["file_bytes"], "file") >= 0.9 * (FILE_MIB << 20) as f64);
    assert_eq!(
        f64_of(&memory["rss_bytes"], "rss"),
        f64_of(&memory["anon_bytes"], "a")
            + f64_of(&memory["file_bytes"], "f")
            + f64_of(&memory["shmem_bytes"], "s")
    );

    // Faults seen by eBPF match the pages touched: one write fault per anonymous page (THP is
    // off for that block). A file read fault maps many cached pages at once (fault-around, and
    // whole large folios), so file faults are at most one per page and at least one per 2 MiB.
    let anon_pages = touched["anon_pages"].as_u64().unwrap();
    let file_pages = touched["file_pages"].as_u64().unwrap();
    assert_eq!(anon_pages, (ANON_MIB << 20) / PAGE);
    let faults = &report["faults"];
    let anon_faults = faults["anon"].as_u64().unwrap();
    let file_faults = faults["file"].as_u64().unwrap();
    assert!(
        anon_faults >= anon_pages * 95 / 100 && anon_faults <= anon_pages * 110 / 100,
        "anon faults {anon_faults} vs {anon_pages} pages written"
    );
    assert!(
        file_faults >= file_pages / 512 && file_faults <= file_pages,
        "file faults {file_faults} vs {file_pages} pages read"
    );
    // File faults are the faults of the large mapped files, file by file: the model file's
    // own count is in the same range, and the per-file counts add up to the total (the
    // process may also fault in code of libc or of its own binary while it runs).
    let window = f64_of(&faults["window_s"], "window");
    let per_file =
        |m: &Value| (f64_of(&m["faults_per_s"], "mapping faults") * window).round() as u64;
    let model_faults = per_file(&mapping);
    assert!(
        model_faults >= file_pages / 512 && model_faults <= file_pages,
        "model file faults {model_faults} vs {file_pages} pages read"
    );
    let all_files: u64 = report["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(per_file)
        .sum();
    assert!(
        all_files.abs_diff(file_faults) <= 2,
        "per-file faults add up to {all_files}, file faults are {file_faults}"
    );
    assert_close(
        "total rate",
        f64_of(&faults["total_per_s"], "total") * window,
        (anon_faults + file_faults) as f64,
        0.01,
    );
    // And the total agrees with the kernel's own count of the process's faults while it
    // touched the pages (the window is wider, so a few more faults are allowed).
    let total = faults["total"].as_u64().unwrap();
    assert!(
        total >= kernel_faults * 97 / 100 && total <= kernel_faults * 103 / 100 + 200,
        "eBPF counted {total} faults, the kernel {kernel_faults}"
    );

    // The 96 MiB block was seen being allocated, by the probes.
    let allocations = report["allocations"].as_array().unwrap();
    assert!(
        allocations.iter().any(|a| a["kind"] == "mmap"
            && a["bytes"] == ANON_MIB << 20
            && a["live"] == true
            && a["address"] == touched["anon_addr"]),
        "allocations: {allocations:?}"
    );

    let cgroup = &report["cgroup"];
    assert!(cgroup["path"].as_str().unwrap().starts_with('/'));
    assert!(cgroup["usage_bytes"].as_u64().unwrap() > 0);
    assert_eq!(report["oom"]["score_adj"], 0);
    assert!(report["oom"]["score"].as_u64().is_some());

    workload.finish();
    std::fs::remove_dir_all(dir).unwrap();
}

/// minflt + majflt of a process, from /proc/<pid>/stat (fields 10 and 12).
fn kernel_fault_count(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[7].parse::<u64>().unwrap() + fields[9].parse::<u64>().unwrap()
}

fn inspect_error(args: &[&str]) -> Value {
    let output = output_of(
        Command::new(infermem_bin())
            .arg("inspect")
            .args(args)
            .arg("--json"),
    );
    assert!(!output.status.success(), "expected failure: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("error: "),
        "no error line on stderr: {stderr}"
    );
    serde_json::from_slice(&output.stdout).expect("error JSON")
}

#[test]
fn a_missing_pid_is_a_clear_error() {
    let error = inspect_error(&["4194999"]);
    assert_eq!(error["error"]["kind"], "no_such_process");
    assert_eq!(error["error"]["pid"], 4194999);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no such process")
    );
}

#[test]
fn a_pid_that_exits_during_sampling_is_a_clear_error() {
    require_root();
    let dir = scratch_dir("inspect-exit");
    let model = dir.join("model.bin");
    write_file(&model, 2);
    let mut cmd = Command::new(workload_bin());
    cmd.args(["map-and-alloc", model.to_str().unwrap(), "2", "1"]);
    let mut workload = Talker::spawn(cmd);
    workload.expect_event("mapped");
    let pid = workload.pid();
    let mut inspection = Inspection::start(pid, "30s", &[]);
    inspection.wait_until_sampling();
    // Closing stdin before "go" makes the workload exit.
    assert!(workload.finish().success());
    let (ok, error) = inspection.finish();
    assert!(!ok);
    assert_eq!(error["error"]["kind"], "exited_during_sampling", "{error}");
    assert_eq!(error["error"]["pid"], pid);
    assert!(error["error"]["oom_kill"].is_null());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_btf_inspect_says_so_and_falls_back_unless_ebpf_is_required() {
    require_root();
    let me = std::process::id().to_string();
    let error = inspect_error(&[&me, "--btf", "/nonexistent/vmlinux", "--require-ebpf"]);
    assert_eq!(error["error"]["kind"], "ebpf_unavailable");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no kernel BTF at /nonexistent/vmlinux"),
        "{message}"
    );

    let output = output_of(Command::new(infermem_bin()).args([
        "inspect",
        &me,
        "--json",
        "--duration",
        "300ms",
        "--btf",
        "/nonexistent/vmlinux",
    ]));
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["sources"]["ebpf"], false);
    assert!(
        report["sources"]["reason"]
            .as_str()
            .unwrap()
            .contains("no kernel BTF")
    );
}

/// Without root or CAP_BPF, inspect still reports what procfs knows and says why eBPF is off.
#[test]
fn without_privileges_inspect_falls_back_to_procfs() {
    require_root();
    let dir = scratch_dir("inspect-unprivileged");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let model = dir.join("model.bin");
    write_file(&model, 4);
    let as_nobody = |program: &std::path::Path| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(program);
        cmd
    };
    let mut cmd = as_nobody(&workload_bin());
    cmd.args(["map-and-alloc", model.to_str().unwrap(), "4", "8"]);
    let mut workload = Talker::spawn(cmd);
    let pid = workload.expect_event("mapped")["pid"].as_u64().unwrap();
    workload.send_line("go");
    workload.expect_event("touched");

    let output = output_of(as_nobody(&infermem_bin()).args([
        "inspect",
        &pid.to_string(),
        "--json",
        "--duration",
        "300ms",
    ]));
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["sources"]["ebpf"], false);
    let reason = report["sources"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("not permitted") && reason.contains("uid 65534"),
        "{reason}"
    );
    assert!(report["faults"]["file_per_s"].is_null());
    assert!(report["memory"]["anon_bytes"].as_u64().unwrap() >= 8 << 20);
    assert!(
        report["mappings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["path"] == model.to_str().unwrap())
    );
    workload.finish();
    std::fs::remove_dir_all(dir).unwrap();
}

/// A launcher script that execs into the real program while `inspect` samples it (as service
/// wrappers do): the process lives on with the same pid and start time, so inspect follows it
/// into its new program and says an exec happened, instead of calling it an exit.
#[test]
fn an_exec_during_sampling_is_followed_not_reported_as_an_exit() {
    require_root();
    let dir = scratch_dir("inspect-exec");
    let model = dir.join("model.gguf");
    write_file(&model, 8);
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"echo '{"event": "waiting"}'; read -r go; exec "$0" map-and-alloc "$1" 8 4"#,
    ])
    .arg(workload_bin())
    .arg(&model);
    let mut launcher = Talker::spawn(cmd);
    launcher.expect_event("waiting");
    let pid = launcher.pid();
    let mut inspection = Inspection::start(pid, "3s", &["--require-ebpf"]);
    inspection.wait_until_sampling();
    launcher.send_line("exec");
    assert_eq!(launcher.expect_event("mapped")["pid"], pid);
    launcher.send_line("go");
    launcher.expect_event("touched");
    let (ok, report) = inspection.finish();
    assert!(ok, "an exec is not an exit: {report}");
    assert_eq!(report["pid"], pid);
    assert_eq!(report["execs"], serde_json::json!(["workload"]), "{report}");
    assert_eq!(report["comm"], "workload");
    assert_eq!(report["cmdline"][1], "map-and-alloc");
    assert!(
        report["mappings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["path"] == model.to_str().unwrap()),
        "the new program's mappings are read: {}",
        report["mappings"]
    );
    // The new program's anonymous block was seen allocated after the exec.
    assert!(
        report["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["bytes"].as_u64().unwrap() >= 4 << 20),
        "{}",
        report["allocations"]
    );
    launcher.finish();
    std::fs::remove_dir_all(dir).unwrap();
}

//! Hostile input, end to end: a corpus the tests make themselves (FIFOs, sparse files with
//! huge counts, symlinks to /dev/zero and /dev/urandom, a file swapped after it was listed,
//! deleted files, secrets, a process posing as Ollama). `infermem plan` must reject each file
//! with a clear error within 5 s and 256 MiB of peak RSS; `infermem inspect` must not hang,
//! reveal secrets or connect where the inspected process says. Each case prints its error,
//! time and peak RSS (`cargo test --test hostile -- --nocapture`).

use std::{
    ffi::CString,
    fs::File,
    io::{Read as _, Write as _},
    net::TcpListener,
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use infermem::model::{
    discovery::{self, FoundBy},
    open, profile, redact,
};
use infermem_tests::{Talker, infermem_bin, require_root, scratch_dir, workload_bin};
use serde_json::Value;

/// What plan may take on any hostile file.
const PLAN_TIME: Duration = Duration::from_secs(5);
const PEAK_RSS_BYTES: u64 = 256 << 20;
const SPARSE_BYTES: u64 = 12 << 30;

/// How a bounded run of infermem ended.
struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    peak_rss_bytes: u64,
}

/// Runs infermem with `args`, killing it after `timeout`; the peak RSS is the child's own
/// (wait4's rusage).
fn run_infermem(args: &[&str], timeout: Duration) -> Outcome {
    // One directory per run: the tests of this file run in parallel threads of one process.
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let dir = scratch_dir(&format!(
        "hostile-run-{}",
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let started = Instant::now();
    #[expect(
        clippy::zombie_processes,
        reason = "wait4_within reaps it, which also gives its own rusage"
    )]
    let child = Command::new(infermem_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn infermem");
    let pid = child.id() as libc::pid_t;
    let (status, usage) = wait4_within(pid, timeout);
    let elapsed = started.elapsed();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let outcome = Outcome {
        success: status.is_some_and(|s| libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0),
        stdout: read(&out_path),
        stderr: read(&err_path),
        elapsed,
        peak_rss_bytes: usage.ru_maxrss as u64 * 1024,
    };
    std::fs::remove_dir_all(dir).unwrap();
    assert!(
        status.is_some(),
        "infermem {args:?} ran past {timeout:?} and was killed; stderr:\n{}",
        outcome.stderr
    );
    outcome
}

/// Waits for `pid` for at most `timeout`, then kills it; the exit status (`None` when it
/// had to be killed) and its resource usage.
fn wait4_within(pid: libc::pid_t, timeout: Duration) -> (Option<i32>, libc::rusage) {
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    // SAFETY: rusage is plain data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child, writing into locals.
        let done = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if done == pid {
            return (Some(status), usage);
        }
        assert_eq!(done, 0, "wait4: {}", std::io::Error::last_os_error());
        if Instant::now() >= deadline {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::wait4(pid, &mut status, 0, &mut usage);
            }
            return (None, usage);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that `plan` rejects `model` with an error containing `expected`, in time and
/// memory, and prints the case.
fn plan_rejects(case: &str, model: &Path, expected: &str) {
    let outcome = run_infermem(&["plan", model.to_str().unwrap()], PLAN_TIME * 2);
    let error = outcome.stderr.trim();
    eprintln!(
        "hostile case | {case} | {error} | {:.3} s | {:.1} MiB peak RSS",
        outcome.elapsed.as_secs_f64(),
        outcome.peak_rss_bytes as f64 / (1 << 20) as f64
    );
    assert!(
        !outcome.success,
        "{case}: plan accepted it:\n{}",
        outcome.stdout
    );
    assert!(
        error.contains(expected),
        "{case}: {error:?} lacks {expected:?}"
    );
    assert!(outcome.elapsed < PLAN_TIME, "{case}: {:?}", outcome.elapsed);
    assert!(
        outcome.peak_rss_bytes < PEAK_RSS_BYTES,
        "{case}: {} bytes",
        outcome.peak_rss_bytes
    );
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// A sparse file of `size` bytes starting with `head` (ftruncate leaves the rest a hole).
fn sparse(path: &Path, head: &[u8], size: u64) {
    let mut file = File::create(path).unwrap();
    file.write_all(head).unwrap();
    file.set_len(size).unwrap();
}

/// A GGUF v3 header claiming `tensors` tensors and `kvs` key-values, then `rest`.
fn gguf_claiming(tensors: u64, kvs: u64, rest: &[u8]) -> Vec<u8> {
    let mut head = b"GGUF".to_vec();
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&tensors.to_le_bytes());
    head.extend_from_slice(&kvs.to_le_bytes());
    head.extend_from_slice(rest);
    head
}

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A valid 2 MiB GGUF file: a llama architecture key and one f32 tensor.
fn valid_gguf(path: &Path) {
    let mut kv = Vec::new();
    gguf_string(&mut kv, "general.architecture");
    kv.extend_from_slice(&8u32.to_le_bytes());
    gguf_string(&mut kv, "llama");
    gguf_string(&mut kv, "token_embd.weight");
    kv.extend_from_slice(&1u32.to_le_bytes());
    kv.extend_from_slice(&256u64.to_le_bytes());
    kv.extend_from_slice(&0u32.to_le_bytes()); // F32
    kv.extend_from_slice(&0u64.to_le_bytes());
    let mut bytes = gguf_claiming(1, 1, &kv);
    bytes.resize(2 << 20, 0);
    std::fs::write(path, bytes).unwrap();
}

/// A valid safetensors file of one 1 MiB f32 tensor.
fn valid_safetensors(path: &Path) {
    let json = br#"{"w":{"dtype":"F32","shape":[262144],"data_offsets":[0,1048576]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json);
    bytes.resize(bytes.len() + (1 << 20), 1);
    std::fs::write(path, bytes).unwrap();
}

/// A fresh directory for one case.
fn case_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn plan_rejects_the_hostile_corpus_quickly_and_in_bounded_memory() {
    require_root();
    let root = scratch_dir("hostile-corpus");
    let fifo = case_dir(&root, "fifo").join("model.gguf");
    mkfifo(&fifo);
    plan_rejects("FIFO named model.gguf", &fifo, "a FIFO, not a regular file");

    let escapes = case_dir(&root, "escapes").join("model\x1b]0;pwned\x07.gguf");
    mkfifo(&escapes);
    plan_rejects(
        "FIFO named with terminal escapes",
        &escapes,
        "model\\x1b]0;pwned\\x07.gguf: a FIFO",
    );

    let zero = case_dir(&root, "zero").join("model.gguf");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    plan_rejects("model.gguf -> /dev/zero", &zero, "a character device");

    let keys = case_dir(&root, "keys").join("model.gguf");
    sparse(&keys, &gguf_claiming(0, 600_000_000, &[]), SPARSE_BYTES);
    plan_rejects(
        "sparse 12 GiB GGUF, 600 M key-values",
        &keys,
        "600000000 metadata key-values: more than the 65536 accepted",
    );

    let tensors = case_dir(&root, "tensors").join("model.gguf");
    sparse(&tensors, &gguf_claiming(300_000_000, 0, &[]), SPARSE_BYTES);
    plan_rejects(
        "sparse 12 GiB GGUF, 300 M tensors",
        &tensors,
        "300000000 tensors: more than the 1048576 accepted",
    );

    let array = case_dir(&root, "array").join("model.gguf");
    let mut kv = Vec::new();
    gguf_string(&mut kv, "tokenizer.ggml.tokens");
    kv.extend_from_slice(&9u32.to_le_bytes());
    kv.extend_from_slice(&0u32.to_le_bytes());
    kv.extend_from_slice(&(1u64 << 33).to_le_bytes());
    sparse(&array, &gguf_claiming(0, 1, &kv), SPARSE_BYTES);
    plan_rejects(
        "sparse 12 GiB GGUF, 2^33-element array",
        &array,
        "array element count 8589934592",
    );

    let header = case_dir(&root, "st-header").join("model.safetensors");
    let mut head = (11u64 << 30).to_le_bytes().to_vec();
    head.push(b'{');
    sparse(&header, &head, SPARSE_BYTES);
    plan_rejects(
        "sparse 12 GiB safetensors, 11 GiB header",
        &header,
        "header length 11811160064 is larger than",
    );

    for (name, target) in [("zero", "/dev/zero"), ("urandom", "/dev/urandom")] {
        let dir = case_dir(&root, &format!("config-{name}"));
        valid_safetensors(&dir.join("model.safetensors"));
        std::os::unix::fs::symlink(target, dir.join("config.json")).unwrap();
        plan_rejects(
            &format!("safetensors, config.json -> {target}"),
            &dir.join("model.safetensors"),
            "config.json: a character device, not a regular file",
        );
    }

    let dir = case_dir(&root, "config-fifo");
    valid_safetensors(&dir.join("model.safetensors"));
    mkfifo(&dir.join("config.json"));
    plan_rejects(
        "safetensors, FIFO config.json",
        &dir.join("model.safetensors"),
        "config.json: a FIFO, not a regular file",
    );

    let dir = case_dir(&root, "config-large");
    valid_safetensors(&dir.join("model.safetensors"));
    sparse(&dir.join("config.json"), b"{", 2 << 20);
    plan_rejects(
        "safetensors, 2 MiB config.json",
        &dir.join("model.safetensors"),
        "more than the 1048576 bytes accepted",
    );

    let deleted = case_dir(&root, "deleted").join("model.gguf");
    valid_gguf(&deleted);
    std::fs::remove_file(&deleted).unwrap();
    plan_rejects("deleted model file", &deleted, "No such file or directory");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_file_swapped_after_it_was_listed_is_parsed_as_it_was_checked() {
    require_root();
    let dir = scratch_dir("hostile-swap");
    let model = dir.join("model.gguf");
    valid_gguf(&model);
    // Discovery lists and opens it; then a FIFO is renamed over it before the parse.
    let found = discovery::recognise([(model.clone(), FoundBy::Mapped)], open::open_regular);
    assert_eq!(found.len(), 1);
    let fifo = dir.join("swap.fifo");
    mkfifo(&fifo);
    std::fs::rename(&fifo, &model).unwrap();
    let started = Instant::now();
    let parsed =
        profile::profile_opened(&found[0].opened, found[0].file.format, &open::open_regular)
            .expect("the descriptor discovery checked is the one parsed")
            .expect("a profile");
    assert_eq!(parsed.architecture.as_deref(), Some("llama"));
    assert!(started.elapsed() < Duration::from_secs(1));
    // Planned by path now, the FIFO in its place is refused.
    plan_rejects(
        "model.gguf swapped for a FIFO after listing",
        &model,
        "a FIFO",
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A workload process (optionally a copy named `name`) that maps `file`, with `args` after
/// it and `env` added.
fn mapper(name: Option<&str>, file: &Path, args: &[&str], env: &[(&str, &str)]) -> Talker {
    let bin = match name {
        Some(name) => {
            let dir = scratch_dir(&format!("hostile-bin-{name}"));
            let bin = dir.join(name);
            std::fs::copy(workload_bin(), &bin).unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
            bin
        }
        None => workload_bin(),
    };
    let mut cmd = Command::new(bin);
    cmd.arg("map-file").arg(file).args(args);
    cmd.envs(env.iter().copied());
    let mut talker = Talker::spawn(cmd);
    talker.expect_event("mapped");
    talker
}

/// Inspects `pid` for 1 s, as JSON or text; it must end within the duration plus 5 s.
fn inspect(pid: u32, json: bool) -> Outcome {
    let pid = pid.to_string();
    let mut args = vec!["inspect", &pid, "--duration", "1s"];
    if json {
        args.push("--json");
    }
    let outcome = run_infermem(&args, Duration::from_secs(30));
    eprintln!(
        "inspect {} | {:.3} s | {:.1} MiB peak RSS",
        if json { "--json" } else { "(text)" },
        outcome.elapsed.as_secs_f64(),
        outcome.peak_rss_bytes as f64 / (1 << 20) as f64
    );
    assert!(outcome.success, "inspect failed:\n{}", outcome.stderr);
    assert!(
        outcome.elapsed < Duration::from_secs(6),
        "inspect took {:?}",
        outcome.elapsed
    );
    assert!(outcome.peak_rss_bytes < PEAK_RSS_BYTES);
    outcome
}

fn model_files(report: &Value) -> &Vec<Value> {
    report["model"]["files"].as_array().expect("model files")
}

#[test]
fn inspect_of_a_process_mapping_safetensors_beside_dev_zero_finishes() {
    require_root();
    let dir = scratch_dir("hostile-inspect-zero");
    let model = dir.join("model.safetensors");
    valid_safetensors(&model);
    std::os::unix::fs::symlink("/dev/zero", dir.join("config.json")).unwrap();
    let workload = mapper(None, &model, &[], &[]);
    let outcome = inspect(workload.pid(), true);
    let report: Value = serde_json::from_str(&outcome.stdout).unwrap();
    let file = &model_files(&report)[0];
    let error = file["error"].as_str().unwrap_or_default();
    eprintln!("hostile case | inspect: safetensors, config.json -> /dev/zero | {error}");
    assert!(error.contains("config.json: a character device"), "{file}");
    assert!(workload.finish().success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn inspect_reads_a_deleted_mapped_model_through_map_files() {
    require_root();
    let dir = scratch_dir("hostile-inspect-deleted");
    let model = dir.join("model.gguf");
    valid_gguf(&model);
    let workload = mapper(None, &model, &[], &[]);
    // Deleted, and a FIFO in its place: reopening the path would block, or read another file.
    std::fs::remove_file(&model).unwrap();
    mkfifo(&model);
    let outcome = inspect(workload.pid(), true);
    let report: Value = serde_json::from_str(&outcome.stdout).unwrap();
    let file = &model_files(&report)[0];
    assert_eq!(file["path"], model.to_str().unwrap());
    assert_eq!(file["error"], Value::Null, "{file}");
    assert_eq!(file["profile"]["architecture"], "llama", "{file}");
    eprintln!(
        "hostile case | inspect: deleted mapped GGUF, FIFO in its place | read via map_files"
    );
    assert!(workload.finish().success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn secrets_on_the_command_line_and_in_the_environment_never_appear() {
    require_root();
    let dir = scratch_dir("hostile-secrets");
    let model = dir.join("model.gguf");
    valid_gguf(&model);
    let (flag_secret, env_secret) = ("sk-flag-6f1c2a", "hf_env_93b7d4");
    let workload = mapper(
        Some("llama-server"),
        &model,
        &[
            "--api-key",
            flag_secret,
            "--hf-token=hf_inline_55e0",
            "-c",
            "2048",
            "--title=\x1b]0;pwned\x07\x1b[2J",
        ],
        &[("HF_TOKEN", env_secret), ("MY_DB_PASSWORD", "pw_0a9c")],
    );
    for json in [true, false] {
        let outcome = inspect(workload.pid(), json);
        let all = format!("{}{}", outcome.stdout, outcome.stderr);
        for secret in [flag_secret, env_secret, "hf_inline_55e0", "pw_0a9c"] {
            assert!(!all.contains(secret), "{secret} leaked:\n{all}");
        }
        assert!(all.contains(redact::REDACTED), "{all}");
        // The terminal escapes in an argument are written out, never sent.
        assert!(!all.contains(['\x1b', '\x07']), "{all}");
        if !json {
            assert!(all.contains("--title=\\x1b]0;pwned\\x07\\x1b[2J"), "{all}");
        }
        assert!(
            all.contains("2048"),
            "the recognised -c is still read:\n{all}"
        );
    }
    assert!(workload.finish().success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_fake_ollama_pointing_at_a_port_it_does_not_own_is_never_contacted() {
    require_root();
    let dir = scratch_dir("hostile-ollama");
    let model = dir.join("blob");
    valid_gguf(&model);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let workload = mapper(Some("ollama"), &model, &[], &[("OLLAMA_HOST", &host)]);
    let outcome = inspect(workload.pid(), true);
    let report: Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(report["model"]["runtime"], "ollama");
    let notes = report["model"]["notes"].to_string();
    assert!(notes.contains("was not asked"), "{notes}");
    // Anything infermem sent would be queued on the listener by now.
    std::thread::sleep(Duration::from_millis(200));
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((mut stream, from)) => {
            let mut request = String::new();
            let _ = stream.read_to_string(&mut request);
            panic!("infermem connected from {from}: {request:?}")
        }
        Err(e) => panic!("accept: {e}"),
    }
    eprintln!("hostile case | fake ollama, OLLAMA_HOST={host} (the test's port) | {notes}");
    assert!(workload.finish().success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn paths_of_a_process_in_another_root_resolve_in_that_root() {
    require_root();
    let root = scratch_dir("hostile-root");
    std::fs::create_dir_all(root.join("models")).unwrap();
    std::fs::create_dir_all(root.join("real")).unwrap();
    std::fs::write(root.join("real/config.json"), b"inside").unwrap();
    // Absolute symlinks, as a container's own files have them.
    std::os::unix::fs::symlink("/real/config.json", root.join("models/config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", root.join("models/zero.json")).unwrap();
    let mut cmd = Command::new(workload_bin());
    cmd.arg("chroot").arg(&root);
    let mut rooted = Talker::spawn(cmd);
    rooted.expect_event("rooted");
    let open = |path: &str| open::open_in_root(rooted.pid(), Path::new(path));
    let config = open("/models/config.json").expect("the root's own /real/config.json");
    assert_eq!(config.read_capped(100).unwrap(), b"inside");
    // The root's /dev/zero (absent), not the host's; and `..` does not climb out.
    assert!(open("/models/zero.json").unwrap_err().is_not_found());
    assert!(open("/../../../../etc/passwd").unwrap_err().is_not_found());
    eprintln!(
        "hostile case | a process in another root | its paths and symlinks resolve in its root"
    );
    assert!(rooted.finish().success());
    std::fs::remove_dir_all(root).unwrap();
}

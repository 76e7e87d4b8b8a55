//! The benchmarks' workloads: the tests' `workload` binary (and a Python model process) driven
//! over its JSON-lines protocol, and GGUF model files written by hand.

use std::{
    io::Write as _,
    path::Path,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::lines_of;

/// A process speaking the workload protocol: JSON lines out, a line in to go on; dropping it
/// kills it.
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Proc {
    /// Spawns `cmd` with piped stdin and stdout.
    pub fn spawn(mut cmd: Command) -> Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stdin = child.stdin.take();
        let lines = lines_of(child.stdout.take().context("stdout")?);
        Ok(Proc {
            child,
            stdin,
            lines,
        })
    }

    /// The process's pid (for a program a cgroup's shell starts, the shell's: the program
    /// says its own).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the line `{"event": <event>, …}` and returns it.
    pub fn expect_event(&mut self, event: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .with_context(|| format!("the workload said no {event:?} within {timeout:?}"))?;
            if let Ok(value) = serde_json::from_str::<Value>(&line)
                && value["event"] == event
            {
                return Ok(value);
            }
        }
    }

    /// The lines `{"event": <event>, …}` printed so far and not yet taken (others are
    /// dropped); does not wait.
    pub fn take_events(&mut self, event: &str) -> Vec<Value> {
        self.lines
            .try_iter()
            .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
            .filter(|value| value["event"] == event)
            .collect()
    }

    /// Sends a line (the workloads go on at each line).
    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}")?;
        Ok(stdin.flush()?)
    }

    /// The exit status, if it exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Closes stdin (the workloads then exit), waits a little, then kills it.
    pub fn finish(mut self) {
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `oom_score_adj` of `pid` (-1000: the OOM killer never picks it).
pub fn set_oom_score_adj(pid: u32, value: i32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), value.to_string())
        .with_context(|| format!("setting oom_score_adj of {pid}"))
}

/// A model process in Python (no agent-specific code): maps the GGUF file argv[1] read-only,
/// drops it from the page cache so that its pages are charged where it runs, says `waiting`,
/// and at a line reads every page of it (the load), says `loaded`, then writes anonymous
/// memory at argv[2] MiB/s in 1 MiB blocks (its KV cache growing) until the OOM killer ends it.
pub const MODEL_PY: &str = r#"
import json, mmap, os, sys, time
path, rate = sys.argv[1], float(sys.argv[2])
def say(**event):
    print(json.dumps(event), flush=True)
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
size = os.fstat(fd).st_size
weights = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
say(event="waiting", pid=os.getpid())
if not sys.stdin.readline():
    sys.exit(0)
checksum = sum(weights[offset] for offset in range(0, size, 4096))
say(event="loaded", checksum=checksum)
blocks, start, n = [], time.monotonic(), 0
while True:
    wait = start + n / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    block = mmap.mmap(-1, 1 << 20)
    block.madvise(mmap.MADV_NOHUGEPAGE)
    for offset in range(0, 1 << 20, 4096):
        block[offset] = 1
    blocks.append(block)
    n += 1
"#;

/// The shape of the hand-written GGUF models: a 7B-like llama (32 layers, 4096 wide, 8 of 32
/// heads carry KV: 128 KiB of f16 KV cache per token), trained for `context` tokens, whose
/// tensor data is one f16 embedding of `weights_mib` MiB.
pub struct ModelShape {
    pub weights_mib: u64,
    pub context: u32,
}

/// Writes the GGUF model `path` (skipped when a file of the right size is there), readable by
/// all, flushed to disk.
pub fn write_gguf(path: &Path, shape: &ModelShape) -> Result<()> {
    let header = gguf_header(shape);
    let size = header.len() as u64 + (shape.weights_mib << 20);
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let mut file = std::fs::File::create(path)?;
    file.write_all(&header)?;
    // Non-zero weights, so that no filesystem can keep them sparse.
    let chunk = vec![0x3cu8; 1 << 20];
    for _ in 0..shape.weights_mib {
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    Ok(())
}

/// The GGUF v3 header of `shape`, padded to the 32-byte alignment of its tensor data.
fn gguf_header(shape: &ModelShape) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn key_u32(out: &mut Vec<u8>, key: &str, value: u32) {
        string(out, key);
        out.extend_from_slice(&4u32.to_le_bytes()); // uint32
        out.extend_from_slice(&value.to_le_bytes());
    }
    const EMBD: u64 = 4096;
    let u32_keys = [
        ("llama.context_length", shape.context),
        ("llama.embedding_length", EMBD as u32),
        ("llama.block_count", 32),
        ("llama.feed_forward_length", 11008),
        ("llama.attention.head_count", 32),
        ("llama.attention.head_count_kv", 8),
        ("general.file_type", 1), // mostly f16
    ];
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&1u64.to_le_bytes()); // tensors
    out.extend_from_slice(&(u32_keys.len() as u64 + 1).to_le_bytes()); // key-values
    string(&mut out, "general.architecture");
    out.extend_from_slice(&8u32.to_le_bytes()); // string
    string(&mut out, "llama");
    for (key, value) in u32_keys {
        key_u32(&mut out, key, value);
    }
    // token_embd.weight: EMBD x rows of f16.
    let rows = (shape.weights_mib << 20) / (EMBD * 2);
    string(&mut out, "token_embd.weight");
    out.extend_from_slice(&2u32.to_le_bytes()); // dimensions
    out.extend_from_slice(&EMBD.to_le_bytes());
    out.extend_from_slice(&rows.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // F16
    out.extend_from_slice(&0u64.to_le_bytes()); // offset
    out.resize(out.len().next_multiple_of(32), 0);
    out
}

/// Fails with the workload's exit status unless it was killed by SIGKILL (the OOM killer's
/// signal), itself or as the child of a cgroup's shell (which then exits with 128 + 9).
pub fn killed_by_sigkill(status: ExitStatus) -> Result<()> {
    use std::os::unix::process::ExitStatusExt as _;
    if status.signal() == Some(9) || status.code() == Some(128 + 9) {
        Ok(())
    } else {
        bail!("the workload ended with {status}, not an OOM kill")
    }
}

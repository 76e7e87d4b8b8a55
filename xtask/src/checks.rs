//! What the file checks (`check-service`, `check-dashboards`) share: running a tool with a
//! time limit, and pinned Python tools in a venv of their own.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cargo::profile_dir;

/// The limit of one checking tool's run (a venv's first install included).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `command`, which must exit 0 within [`COMMAND_TIMEOUT`]; prints its output, or fails
/// with it.
pub fn checked(command: &mut Command) -> Result<()> {
    let output = output_within(command, COMMAND_TIMEOUT)?;
    let said = text(&output);
    ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{said}",
        output.status
    );
    print!("{said}");
    Ok(())
}

/// stdout then stderr, as text.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `command` with its output captured (both pipes drained as it runs, so a full pipe
/// cannot block it); kills it after `timeout`.
pub fn output_within(command: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{command:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let joined = |h: std::thread::JoinHandle<Vec<u8>>| h.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: joined(stdout),
        stderr: joined(stderr),
    })
}

/// A venv `target/<name>` holding `packages` (pinned `name==version`, the tool first),
/// installed once; returns its `bin/`.
pub fn pinned_venv(name: &str, packages: &[&str]) -> Result<PathBuf> {
    let target = profile_dir(false)
        .parent()
        .context("the target dir")?
        .to_owned();
    let venv = target.join(name);
    let bin = venv.join("bin");
    // A new pin (of the tool or of a dependency) makes a new stamp, and a fresh install.
    let mut pins = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(packages, &mut pins);
    let stamp = venv.join(format!(
        ".infermem-{:016x}",
        std::hash::Hasher::finish(&pins)
    ));
    if stamp.exists() {
        return Ok(bin);
    }
    checked(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    checked(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages),
    )?;
    std::fs::write(&stamp, "")?;
    Ok(bin)
}

/// The JSON that `script` (Python, run by the venv's `python` with `path` as its argument)
/// prints for the YAML file at `path`: how the checks read YAML with the validator's own
/// parser.
pub fn yaml_as_json(python: &Path, script: &str, path: &Path) -> Result<serde_json::Value> {
    let output = output_within(
        Command::new(python).args(["-c", script]).arg(path),
        COMMAND_TIMEOUT,
    )?;
    ensure!(
        output.status.success(),
        "{} is not YAML: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

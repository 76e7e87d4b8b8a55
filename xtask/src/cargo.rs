//! Running cargo and the built binaries from the workspace root.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// `target/<profile>` of this workspace.
pub fn profile_dir(release: bool) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join(if release { "release" } else { "debug" })
}

/// Runs `cargo <args>` in the workspace root with extra environment `env`, inheriting stdio.
pub fn cargo(args: &[&str], env: &[(&str, &OsStr)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    ensure!(
        status.success(),
        "`cargo {}` failed: {status}",
        args.join(" ")
    );
    Ok(())
}

/// Runs `command`, failing with its name if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}

/// Whether we run as root (uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `cargo xtask run`: builds infermem and runs it.
pub fn run_infermem(release: bool, args: &[String]) -> Result<()> {
    let mut build = vec!["build", "--package", "infermem", "--bins"];
    if release {
        build.push("--release");
    }
    cargo(&build, &[])?;
    let bin = profile_dir(release).join("infermem");
    let status = Command::new(&bin)
        .args(args)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// `cargo xtask test`: the whole suite, end-to-end tests included, then `check-service` and
/// `check-dashboards`. The tests need root and never skip, so without root this fails up
/// front with the reason.
pub fn test(forwarded: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the test suite loads eBPF programs and creates memory cgroups, so it needs root \
             (CI runs it as root); try `sudo -E cargo xtask test`"
        );
    }
    xtask::toolchain::ensure()?;
    let target = profile_dir(false).parent().expect("target dir").to_owned();
    let python = crate::python::ensure_llama_env(&target)?;
    cargo(&["build", "--bins"], &[])?;
    let mut args = vec!["test", "--no-fail-fast"];
    args.extend(forwarded.iter().map(String::as_str));
    // The llama.cpp tests run their scripts with this interpreter.
    let tests = cargo(&args, &[("INFERMEM_TEST_PYTHON", python.as_os_str())]);
    // The files the tests do not run: the unit and the DaemonSet, the alert rules, the
    // dashboard and the Collector's config. Checked even when a test failed.
    let service = crate::service::check();
    let dashboards = crate::dashboards::check();
    tests.and(service).and(dashboards)
}

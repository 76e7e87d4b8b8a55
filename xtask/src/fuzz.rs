//! `cargo xtask fuzz`: runs the cargo-fuzz targets of the model file parsers and the GPU ioctl
//! decoder (agent/fuzz) for a bounded time each, starting from the committed seeds, and prints
//! libFuzzer's totals.

use std::{
    ffi::OsString,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cargo::{profile_dir, workspace_root};

/// The targets, each named after the parser it exercises.
const TARGETS: &[&str] = &["gguf", "safetensors", "gpu_decode"];
const CARGO_FUZZ_VERSION: &str = "0.13.1";

/// Options of `cargo xtask fuzz`.
pub struct Options {
    pub seconds: u64,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options { seconds: 60 };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--seconds" => {
                    options.seconds = args
                        .next()
                        .context("--seconds needs a value")?
                        .parse()
                        .context("--seconds")?
                }
                other => bail!("unknown fuzz option {other:?}"),
            }
        }
        ensure!(options.seconds > 0, "--seconds must be positive");
        Ok(options)
    }
}

/// Runs every target for `options.seconds`; fails on any crash, leak or timeout.
pub fn fuzz(options: &Options) -> Result<()> {
    let toolchain = xtask::toolchain::ensure()?;
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    let target = profile_dir(false)
        .parent()
        .expect("target dir")
        .join("fuzz");
    for name in TARGETS {
        let corpus = target.join("corpus").join(name);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root.join("agent/fuzz/seeds").join(name);
        let log = target.join(format!("{name}.log"));
        eprintln!(
            "fuzzing {name} for {} s (log: {})",
            options.seconds,
            log.display()
        );
        let status = Command::new("cargo")
            .arg(format!("+{}", toolchain.nightly))
            .args(["fuzz", "run", "--fuzz-dir", "agent/fuzz", "--target-dir"])
            .arg(&target)
            .arg(name)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", options.seconds))
            .args(["-max_len=1048576", "-rss_limit_mb=2048", "-timeout=10"])
            .current_dir(&root)
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .status()
            .context("running cargo fuzz")?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let summary: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("Done ")
                    || l.contains("stat::number_of_executed_units")
                    || l.contains("ERROR")
            })
            .collect();
        let corpus_files = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        println!(
            "{name}: {} (corpus: {corpus_files} inputs)",
            summary.join("; ")
        );
        ensure!(
            status.success(),
            "fuzz target {name} failed ({status}); see {}",
            log.display()
        );
    }
    Ok(())
}

/// Installs cargo-fuzz if `cargo fuzz` is missing.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    let status = Command::new("cargo")
        .args([
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .args(
            std::env::var_os("CARGO_INSTALL_ROOT")
                .map(|r| [OsString::from("--root"), r])
                .into_iter()
                .flatten(),
        )
        .status()
        .context("installing cargo-fuzz")?;
    ensure!(
        status.success(),
        "cargo install cargo-fuzz failed: {status}"
    );
    Ok(())
}

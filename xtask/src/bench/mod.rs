//! `cargo xtask bench <predictor|footprint|overhead|protect>`: infermem's benchmarks, on the
//! real kernel, with the release build of `infermem` and of the tests' `workload` binary.
//!
//! - `predictor`: real workloads in child memory cgroups, watched by one agent: how early it
//!   says `critical` before a real OOM kill, how right its ETA is then, and how often it says
//!   `critical` for workloads that never run out.
//! - `footprint`: the agent's own CPU and RSS, idle, with 500 idle processes and with five
//!   mapped models.
//! - `overhead`: what the agent's probes cost a fault-heavy workload (against no tracing and
//!   an equivalent bpftrace program), and a real llama.cpp's tokens per second.
//! - `protect`: a model server and a real llama.cpp sharing a memory cgroup with a neighbour
//!   that fills it: the throughput they keep without infermem and with it enforcing a policy.
//!
//! Benchmarks measure: a missed target prints `MISS` with the figure and still exits 0; a
//! broken set-up (no root, an agent that does not start, a cgroup that cannot be made) fails.
//! `docs/benchmarks.md` describes each and records the figures.

mod agent;
mod cgroup;
mod footprint;
mod llama;
mod overhead;
mod predictor;
mod protect;
mod workload;

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    sync::mpsc::Receiver,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, bail, ensure};

use crate::cargo::{cargo, is_root, profile_dir};

/// The benchmarks' names, for the help and errors.
pub const NAMES: &str = "predictor, footprint, overhead, protect";

/// Runs the benchmark `which` with its options `args`.
pub fn run(which: &str, args: &[String]) -> Result<()> {
    match which {
        "predictor" => predictor::run(&predictor::Options::parse(args)?),
        "footprint" => footprint::run(&footprint::Options::parse(args)?),
        "overhead" => overhead::run(&overhead::Options::parse(args)?),
        "protect" => protect::run(&protect::Options::parse(args)?),
        other => bail!("unknown benchmark {other:?}; available: {NAMES}"),
    }
}

/// The release binaries the benchmarks run.
pub struct Bins {
    pub infermem: PathBuf,
    pub workload: PathBuf,
}

/// Checks for root, builds the release `infermem` and `workload` and returns their paths.
/// With `INFERMEM_BENCH_NO_BUILD=1` the binaries already built are used as they are (to
/// measure one build while the tree changes).
pub fn build_release() -> Result<Bins> {
    ensure!(
        is_root(),
        "the benchmarks load eBPF programs and create memory cgroups: run them as root"
    );
    if std::env::var_os("INFERMEM_BENCH_NO_BUILD").is_none_or(|v| v != "1") {
        build()?;
    }
    let dir = profile_dir(true);
    let bins = Bins {
        infermem: dir.join("infermem"),
        workload: dir.join("workload"),
    };
    for bin in [&bins.infermem, &bins.workload] {
        ensure!(bin.exists(), "{} was not built", bin.display());
    }
    Ok(bins)
}

fn build() -> Result<()> {
    cargo(
        &[
            "build",
            "--release",
            "--package",
            "infermem",
            "--package",
            "infermem-tests",
            "--bins",
        ],
        &[],
    )
}

/// A fresh scratch directory `target/tmp/bench-<name>-<pid>` (on disk, not a tmpfs).
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = target_dir()
        .join("tmp")
        .join(format!("bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    profile_dir(true)
        .parent()
        .expect("target/release has a parent")
        .to_owned()
}

/// The median of `values` (the upper one of an even count); None when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `PASS` or `MISS`.
pub fn verdict(met: bool) -> &'static str {
    if met { "PASS" } else { "MISS" }
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` writes them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints the machine and its load, so that every run's figures say where they come from.
pub fn print_machine() {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "machine: {cores} cores, kernel {}, load average {}",
        kernel.trim(),
        load_average()
    );
}

/// The lines a reader thread forwards from a child's pipe.
pub fn lines_of(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Formats an optional figure with `decimals`, or `-`.
pub fn figure(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

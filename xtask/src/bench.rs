//! `cargo xtask bench overhead`: what infermem's probes cost a fault-heavy workload.
//!
//! One run times the same workload (map, touch every page, unmap; repeated) three ways, in
//! interleaved rounds so that drift affects all three alike: with no tracing, with infermem
//! inspecting the workload (all probes attached, its mappings tracked), and with an
//! equivalent bpftrace program (per-pid fault and memory-syscall counting). It prints the
//! median time of each and the ratios to the untraced run.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cargo::{cargo, is_root, profile_dir};

/// The bpftrace baseline: what infermem's probes count, the bpftrace way.
const BPFTRACE_PROGRAM: &str = "\
tracepoint:exceptions:page_fault_user { @faults[pid] = count(); }
tracepoint:syscalls:sys_enter_mmap, tracepoint:syscalls:sys_enter_munmap,
tracepoint:syscalls:sys_enter_mremap, tracepoint:syscalls:sys_enter_brk
{ @calls[pid, probe] = count(); }
tracepoint:syscalls:sys_exit_mmap, tracepoint:syscalls:sys_exit_munmap,
tracepoint:syscalls:sys_exit_mremap, tracepoint:syscalls:sys_exit_brk
{ @returns[pid, probe] = count(); }
";

/// Benchmark options.
pub struct Options {
    /// Size of the block mapped, touched and unmapped per iteration.
    mib: usize,
    iterations: usize,
    rounds: usize,
}

impl Options {
    /// Parses `--mib N --iterations N --rounds N`.
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options {
            mib: 512,
            iterations: 8,
            rounds: 7,
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let value: usize = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?
                .parse()
                .with_context(|| format!("{flag} takes a whole number"))?;
            match flag.as_str() {
                "--mib" => options.mib = value,
                "--iterations" => options.iterations = value,
                "--rounds" => options.rounds = value,
                other => bail!("unknown option {other}"),
            }
        }
        ensure!(
            options.mib > 0 && options.iterations > 0 && options.rounds > 0,
            "options must be positive"
        );
        Ok(options)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Untraced,
    Infermem,
    Bpftrace,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "no tracing",
            Mode::Infermem => "infermem probes",
            Mode::Bpftrace => "bpftrace equivalent",
        }
    }
}

pub fn overhead(options: &Options) -> Result<()> {
    ensure!(
        is_root(),
        "the benchmark attaches eBPF programs: run it as root"
    );
    ensure!(
        Command::new("bpftrace")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "bpftrace is needed as the baseline (Debian: apt-get install bpftrace)"
    );
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
    )?;
    let bins = profile_dir(true);
    // bpftrace (not infermem) needs tracefs for its tracepoints.
    let mounted_tracefs = mount_tracefs_for_bpftrace()?;

    let modes = [Mode::Untraced, Mode::Infermem, Mode::Bpftrace];
    let mut times: Vec<(Mode, Vec<f64>)> = modes.iter().map(|&m| (m, Vec::new())).collect();
    let faults = (options.mib << 20) / 4096 * options.iterations;
    println!(
        "workload: {} x (mmap {} MiB, write every page, munmap) = {faults} faults per run; {} rounds",
        options.iterations, options.mib, options.rounds
    );
    let outcome = (|| -> Result<()> {
        for round in 0..options.rounds {
            // Rotate the order so no mode always runs first (cold) or last.
            for i in 0..modes.len() {
                let mode = modes[(i + round) % modes.len()];
                let seconds = run_once(mode, options, &bins)?;
                times
                    .iter_mut()
                    .find(|(m, _)| *m == mode)
                    .expect("mode")
                    .1
                    .push(seconds);
            }
            print!(".");
            std::io::stdout().flush()?;
        }
        println!();
        Ok(())
    })();
    if mounted_tracefs {
        let _ = Command::new("umount").arg("/sys/kernel/tracing").status();
    }
    outcome?;

    let median = |v: &[f64]| {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let untraced = median(&times[0].1);
    println!(
        "{:<22} {:>10} {:>10} {:>8}",
        "mode", "median s", "min s", "ratio"
    );
    for (mode, samples) in &times {
        let m = median(samples);
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "{:<22} {m:>10.3} {min:>10.3} {:>8.3}",
            mode.name(),
            m / untraced
        );
    }
    let infermem = median(&times[1].1) / untraced;
    let bpftrace = median(&times[2].1) / untraced;
    println!(
        "infermem overhead: {:+.1} % (target <= +3 %); bpftrace: {:+.1} %; infermem/bpftrace: {:.3}",
        (infermem - 1.0) * 100.0,
        (bpftrace - 1.0) * 100.0,
        infermem / bpftrace
    );
    Ok(())
}

/// Runs the workload once under `mode`; returns its elapsed seconds.
fn run_once(mode: Mode, options: &Options, bins: &Path) -> Result<f64> {
    let mut workload = Command::new(bins.join("workload"))
        .args([
            "churn",
            &options.mib.to_string(),
            &options.iterations.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the workload")?;
    let mut out = BufReader::new(workload.stdout.take().context("stdout")?);
    let waiting = read_line(&mut out)?;
    let pid = json_number(&waiting, "pid").context("workload pid")?;

    let observer = match mode {
        Mode::Untraced => None,
        Mode::Infermem => Some(start_infermem(bins, pid)?),
        Mode::Bpftrace => Some(start_bpftrace()?),
    };
    let mut stdin = workload.stdin.take().context("stdin")?;
    writeln!(stdin, "go")?;
    let done = read_line(&mut out)?;
    let ns = json_number(&done, "ns").context("elapsed time")?;
    if let Some(mut observer) = observer {
        let _ = observer.kill();
        let _ = observer.wait();
    }
    drop(stdin);
    workload.wait()?;
    Ok(ns as f64 / 1e9)
}

fn start_infermem(bins: &Path, pid: u64) -> Result<Child> {
    let mut child = Command::new(bins.join("infermem"))
        .args(["inspect", &pid.to_string(), "--duration", "1h"])
        .env("INFERMEM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting infermem")?;
    let mut err = BufReader::new(child.stderr.take().context("stderr")?);
    wait_for(&mut err, "sampling started")?;
    // Keep draining so infermem never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    Ok(child)
}

fn start_bpftrace() -> Result<Child> {
    let mut child = Command::new("bpftrace")
        .args(["-e", BPFTRACE_PROGRAM])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    wait_for(&mut out, "Attaching")?;
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    // bpftrace prints "Attaching" before the last probe is attached.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

fn wait_for(reader: &mut impl std::io::BufRead, needle: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("the observer exited before printing {needle:?}");
        }
        if line.contains(needle) {
            return Ok(());
        }
    }
    bail!("timed out waiting for {needle:?}")
}

fn read_line(reader: &mut BufReader<ChildStdout>) -> Result<String> {
    let mut line = String::new();
    ensure!(
        reader.read_line(&mut line)? > 0,
        "the workload exited early"
    );
    Ok(line)
}

/// Extracts `"key":<number>` from a one-line JSON object.
fn json_number(line: &str, key: &str) -> Option<u64> {
    let start = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Mounts tracefs if it is not mounted; returns whether we mounted it.
fn mount_tracefs_for_bpftrace() -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tracefs"))
    {
        return Ok(false);
    }
    let status = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()?;
    ensure!(status.success(), "mounting tracefs for bpftrace failed");
    Ok(true)
}

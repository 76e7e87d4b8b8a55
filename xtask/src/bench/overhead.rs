//! `cargo xtask bench overhead`: what the agent's probes cost a fault-heavy workload, and a
//! real llama.cpp.
//!
//! One run times the same workload (map, touch every page, unmap; repeated) three ways, in
//! interleaved rounds so that drift affects all three alike: with no tracing, with the agent
//! (`infermem run`, all probes attached, started before the workload's go and past its
//! start-up), and with an equivalent bpftrace program (per-pid fault and memory-syscall
//! counting). It prints the median time of each and the ratios to the untraced run. A second
//! workload (open, ioctl, close of `/dev/null`, repeated: the syscalls the NVIDIA probes
//! look at, on a file that is not NVIDIA's) is timed with no tracing and with the agent. Then
//! a real llama.cpp generates tokens with the agent on and off (see `llama.rs`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    Bins, agent::Agent, build_release, llama, median, print_machine, scratch_dir, verdict,
};

/// Targets: the agent's overhead on the fault-heavy workload, and on llama.cpp's tokens/s.
const TARGET_OVERHEAD_PCT: f64 = 3.0;
const TARGET_LLAMA_LOSS_PCT: f64 = 1.0;

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
    /// Pairs of llama.cpp rounds (agent on, agent off); 0 skips llama.cpp.
    llama_rounds: usize,
    /// Tokens generated per llama.cpp round.
    tokens: usize,
    /// Iterations of the open/ioctl/close workload; 0 skips it.
    opens: usize,
}

impl Options {
    /// Parses `--mib N --iterations N --rounds N --llama-rounds N --tokens N --opens N`.
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options {
            mib: 512,
            iterations: 8,
            rounds: 7,
            llama_rounds: 8,
            tokens: 256,
            opens: 200_000,
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
                "--llama-rounds" => options.llama_rounds = value,
                "--tokens" => options.tokens = value,
                "--opens" => options.opens = value,
                other => bail!("unknown option {other}"),
            }
        }
        ensure!(
            options.mib > 0 && options.iterations > 0 && options.rounds > 0 && options.tokens > 1,
            "options must be positive (--tokens at least 2)"
        );
        Ok(options)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Untraced,
    Agent,
    Bpftrace,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "no tracing",
            Mode::Agent => "infermem run (agent)",
            Mode::Bpftrace => "bpftrace equivalent",
        }
    }
}

pub fn run(options: &Options) -> Result<()> {
    ensure!(
        Command::new("bpftrace")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "bpftrace is needed as the baseline (Debian: apt-get install bpftrace)"
    );
    let bins = build_release()?;
    print_machine();
    let times = fault_workload(options, &bins)?;
    let opens = if options.opens > 0 {
        Some(open_workload(options, &bins)?)
    } else {
        None
    };
    let llama = if options.llama_rounds > 0 {
        println!(
            "llama.cpp: {} pairs of rounds of {} tokens, agent on and off",
            options.llama_rounds, options.tokens
        );
        Some(llama::tokens_per_second(
            &bins,
            options.llama_rounds,
            options.tokens,
        )?)
    } else {
        None
    };
    print_fault_table(&times);
    if let Some(opens) = &opens {
        print_open_table(options.opens, opens);
    }
    if let Some(figures) = &llama {
        print_llama(figures);
    }
    Ok(())
}

/// The fault-heavy workload's times, per mode, over interleaved rounds.
fn fault_workload(options: &Options, bins: &Bins) -> Result<Vec<(Mode, Vec<f64>)>> {
    // bpftrace (not infermem) needs tracefs for its tracepoints.
    let mounted_tracefs = mount_tracefs_for_bpftrace()?;
    let dir = scratch_dir("overhead")?;
    let modes = [Mode::Untraced, Mode::Agent, Mode::Bpftrace];
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
                let churn = [
                    "churn".to_owned(),
                    options.mib.to_string(),
                    options.iterations.to_string(),
                ];
                let seconds = run_once(mode, &churn, bins, &dir)?;
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
    Ok(times)
}

fn print_fault_table(times: &[(Mode, Vec<f64>)]) {
    let of = |mode: Mode| {
        times
            .iter()
            .find(|(m, _)| *m == mode)
            .and_then(|(_, v)| median(v))
            .unwrap_or(f64::NAN)
    };
    let untraced = of(Mode::Untraced);
    println!(
        "\n{:<22} {:>10} {:>10} {:>8}",
        "mode", "median s", "min s", "ratio"
    );
    for (mode, samples) in times {
        let m = median(samples).unwrap_or(f64::NAN);
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "{:<22} {m:>10.3} {min:>10.3} {:>8.3}",
            mode.name(),
            m / untraced
        );
    }
    let agent = of(Mode::Agent) / untraced;
    let bpftrace = of(Mode::Bpftrace) / untraced;
    println!("\ntargets");
    println!(
        "  agent overhead <= +{TARGET_OVERHEAD_PCT} %: {:+.1} %  {}",
        (agent - 1.0) * 100.0,
        verdict((agent - 1.0) * 100.0 <= TARGET_OVERHEAD_PCT)
    );
    println!(
        "  never slower than bpftrace ({:+.1} %): agent/bpftrace {:.3}  {}",
        (bpftrace - 1.0) * 100.0,
        agent / bpftrace,
        verdict(agent <= bpftrace)
    );
}

fn print_llama(figures: &llama::Figures) {
    let list = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "\nllama.cpp ({:.0} MB model), decode tokens/s per round:",
        figures.model_bytes as f64 / 1e6
    );
    println!("  agent off: {}", list(&figures.rounds_off));
    println!("  agent on:  {}", list(&figures.rounds_on));
    let loss = (1.0 - figures.on / figures.off) * 100.0;
    println!(
        "  median off {:.2} tok/s, on {:.2} tok/s: {loss:+.2} % fewer with the agent",
        figures.off, figures.on
    );
    println!(
        "  target <= {TARGET_LLAMA_LOSS_PCT} % fewer tokens/s: {loss:.2} %  {}",
        verdict(loss <= TARGET_LLAMA_LOSS_PCT)
    );
}

/// The open/ioctl/close workload's times, untraced and with the agent, interleaved.
fn open_workload(options: &Options, bins: &Bins) -> Result<[Vec<f64>; 2]> {
    let dir = scratch_dir("overhead-opens")?;
    let args = ["opens".to_owned(), options.opens.to_string()];
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..options.rounds {
        for i in 0..2 {
            let slot = (i + round) % 2;
            let mode = [Mode::Untraced, Mode::Agent][slot];
            times[slot].push(run_once(mode, &args, bins, &dir)?);
        }
    }
    Ok(times)
}

fn print_open_table(iterations: usize, [untraced, agent]: &[Vec<f64>; 2]) {
    let (u, a) = (
        median(untraced).unwrap_or(f64::NAN),
        median(agent).unwrap_or(f64::NAN),
    );
    println!(
        "
open + ioctl + close of /dev/null, {iterations} times:"
    );
    println!("  no tracing {u:.3} s, agent {a:.3} s: ratio {:.3}", a / u);
    println!(
        "  per iteration: {:.0} ns more with the agent",
        (a - u) / iterations as f64 * 1e9
    );
}

/// Runs the workload (`args`) once under `mode`; returns its elapsed seconds.
fn run_once(mode: Mode, args: &[String], bins: &Bins, dir: &Path) -> Result<f64> {
    let mut workload = Command::new(&bins.workload)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the workload")?;
    let mut out = BufReader::new(workload.stdout.take().context("stdout")?);
    let waiting = read_line(&mut out)?;
    json_number(&waiting, "pid").context("workload pid")?;

    let (mut agent, mut bpftrace) = (None, None);
    match mode {
        Mode::Untraced => {}
        Mode::Agent => {
            agent = Some(Agent::start(bins, dir)?);
            // Past its start-up (seeding from /proc, first analyses), as an always-on agent.
            std::thread::sleep(Duration::from_secs(2));
        }
        Mode::Bpftrace => bpftrace = Some(start_bpftrace()?),
    }
    let mut stdin = workload.stdin.take().context("stdin")?;
    writeln!(stdin, "go")?;
    let done = read_line(&mut out)?;
    let ns = json_number(&done, "ns").context("elapsed time")?;
    if let Some(mut agent) = agent {
        agent.stop()?;
    }
    if let Some(mut observer) = bpftrace {
        let _ = observer.kill();
        let _ = observer.wait();
    }
    drop(stdin);
    workload.wait()?;
    Ok(ns as f64 / 1e9)
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

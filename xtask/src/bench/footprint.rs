//! `cargo xtask bench footprint`: the agent's own CPU and memory.
//!
//! One agent runs through three phases, each measured over the same window (60 s): idle (the
//! machine's own processes only), with 500 idle processes (`sleep 3600`) in its registry, and
//! with five model processes (`workload map-and-alloc` on five GGUF files of 200 MiB each,
//! weights read in and 64 MiB of anonymous memory each), which it samples every second. CPU is
//! utime + stime of `/proc/<agent>/stat` over the window, as a percentage of one core; memory
//! is `VmRSS` (its maximum over the window, sampled every second) and `Pss` of `smaps_rollup`.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    agent::Agent,
    build_release, load_average, print_machine, scratch_dir, target_dir, verdict,
    workload::{ModelShape, Proc, write_gguf},
};

const TARGET_CPU_PCT: f64 = 1.0;
const TARGET_RSS_MIB: f64 = 40.0;
const IDLE_PROCESSES: usize = 500;
const MODELS: usize = 5;
const MODEL: ModelShape = ModelShape {
    weights_mib: 200,
    context: 4096,
};
const MODEL_ANON_MIB: u64 = 64;
/// How long the agent may take to take in a phase's processes.
const NOTICE: Duration = Duration::from_secs(60);
/// A pause after a phase's processes are in, so its first analyses are not in the window.
const SETTLE: Duration = Duration::from_secs(5);

/// Benchmark options.
pub struct Options {
    /// Seconds of each measured window.
    window_s: u64,
}

impl Options {
    /// Parses `[--quick] [--seconds N]` (`--quick`: 20 s windows instead of 60 s).
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options { window_s: 60 };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            match flag.as_str() {
                "--quick" => options.window_s = 20,
                "--seconds" => {
                    options.window_s = args
                        .next()
                        .context("--seconds needs a value")?
                        .parse()
                        .context("--seconds takes whole seconds")?
                }
                other => bail!("unknown option {other}"),
            }
        }
        ensure!(options.window_s > 0, "--seconds must be positive");
        Ok(options)
    }
}

/// One phase's figures.
struct Phase {
    name: String,
    cpu_pct: f64,
    rss_max_mib: f64,
    pss_mib: f64,
    /// The agent's registry (processes) and workloads (`ps`) at the end.
    processes: u64,
    workloads: usize,
    load: String,
}

pub fn run(options: &Options) -> Result<()> {
    let bins = build_release()?;
    print_machine();
    let dir = scratch_dir("footprint")?;
    let models = model_files()?;
    let mut agent = Agent::start(&bins, &dir)?;
    println!(
        "agent {} ready; {} s windows",
        agent.pid(),
        options.window_s
    );
    std::thread::sleep(SETTLE);
    let window = Duration::from_secs(options.window_s);
    let mut phases = vec![measure(&agent, "idle agent", window)?];

    let before = registry_size(&agent)?;
    let sleepers = spawn_sleepers(IDLE_PROCESSES)?;
    wait_until(&agent, |s| {
        s["daemon"]["processes"].as_u64() >= Some(before + IDLE_PROCESSES as u64)
    })
    .context("the agent's registry did not take in the 500 processes")?;
    std::thread::sleep(SETTLE);
    phases.push(measure(&agent, "500 idle processes", window)?);
    stop_all(sleepers);

    let mut procs = Vec::new();
    for model in &models {
        procs.push(start_model(&bins.workload, model)?);
    }
    let pids: Vec<u32> = procs.iter().map(Proc::pid).collect();
    let seen = agent.ps_until(NOTICE, |ps| {
        let listed = ps["workloads"].as_array()?;
        pids.iter()
            .all(|pid| listed.iter().any(|w| w["pid"] == *pid))
            .then_some(())
    })?;
    if seen.is_none() {
        println!("note: `ps` did not list all five model processes within {NOTICE:?}");
    }
    std::thread::sleep(SETTLE);
    phases.push(measure(&agent, "5 mapped models", window)?);
    for proc in procs {
        proc.finish();
    }
    agent.stop()?;
    print_table(&phases);
    Ok(())
}

/// Five distinct GGUF models of 200 MiB, kept in `target/tmp/bench-models` between runs.
fn model_files() -> Result<Vec<PathBuf>> {
    let dir = target_dir().join("tmp/bench-models");
    std::fs::create_dir_all(&dir)?;
    (0..MODELS)
        .map(|i| {
            let path = dir.join(format!("footprint-{i}.gguf"));
            write_gguf(&path, &MODEL)?;
            Ok(path)
        })
        .collect()
}

/// `workload map-and-alloc`: maps the model, reads it in and writes its anonymous memory.
fn start_model(workload: &std::path::Path, model: &std::path::Path) -> Result<Proc> {
    let mut cmd = Command::new(workload);
    cmd.arg("map-and-alloc")
        .arg(model)
        .args([MODEL.weights_mib.to_string(), MODEL_ANON_MIB.to_string()]);
    let mut proc = Proc::spawn(cmd)?;
    proc.expect_event("mapped", NOTICE)?;
    proc.send("go")?;
    proc.expect_event("touched", NOTICE)?;
    Ok(proc)
}

fn spawn_sleepers(count: usize) -> Result<Vec<Child>> {
    (0..count)
        .map(|_| {
            Command::new("sleep")
                .arg("3600")
                .stdin(Stdio::null())
                .spawn()
                .context("starting sleep")
        })
        .collect()
}

fn stop_all(children: Vec<Child>) {
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn registry_size(agent: &Agent) -> Result<u64> {
    agent.json(&["status", "--json"])?["daemon"]["processes"]
        .as_u64()
        .context("status has no daemon.processes")
}

fn wait_until(agent: &Agent, accept: impl Fn(&serde_json::Value) -> bool) -> Result<()> {
    agent
        .status_until(NOTICE, |s| accept(s).then_some(()))?
        .context("timed out")
}

/// Measures the agent over `window`: CPU from its stat ticks, RSS every second.
fn measure(agent: &Agent, name: &str, window: Duration) -> Result<Phase> {
    let pid = agent.pid();
    let ticks_per_s = clock_ticks();
    let load_before = load_average();
    let start = Instant::now();
    let ticks_start = cpu_ticks(pid)?;
    let mut rss_max_kib = 0u64;
    while start.elapsed() < window {
        rss_max_kib = rss_max_kib.max(status_kib(pid, "VmRSS:")?);
        std::thread::sleep(Duration::from_secs(1).min(window.saturating_sub(start.elapsed())));
    }
    let ticks = cpu_ticks(pid)? - ticks_start;
    let elapsed = start.elapsed().as_secs_f64();
    rss_max_kib = rss_max_kib.max(status_kib(pid, "VmRSS:")?);
    let status = agent.json(&["status", "--json"])?;
    let ps = agent.json(&["ps", "--json"])?;
    let phase = Phase {
        name: name.to_owned(),
        cpu_pct: ticks as f64 / ticks_per_s / elapsed * 100.0,
        rss_max_mib: rss_max_kib as f64 / 1024.0,
        pss_mib: rollup_kib(pid, "Pss:")? as f64 / 1024.0,
        processes: status["daemon"]["processes"].as_u64().unwrap_or(0),
        workloads: ps["workloads"].as_array().map_or(0, Vec::len),
        load: format!("{load_before} -> {}", load_average()),
    };
    println!(
        "  {name}: CPU {:.2} % of a core, VmRSS max {:.1} MiB, Pss {:.1} MiB",
        phase.cpu_pct, phase.rss_max_mib, phase.pss_mib
    );
    Ok(phase)
}

/// utime + stime of `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: state is the first.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short stat")?
            .parse()
            .context("stat field")
    };
    Ok(field(11)? + field(12)?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    kib_field(&format!("/proc/{pid}/status"), key)
}

fn rollup_kib(pid: u32, key: &str) -> Result<u64> {
    kib_field(&format!("/proc/{pid}/smaps_rollup"), key)
}

/// The `KEY   N kB` line of a procfs file.
fn kib_field(path: &str, key: &str) -> Result<u64> {
    std::fs::read_to_string(path)?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}

fn print_table(phases: &[Phase]) {
    println!(
        "\n{:<20} {:>11} {:>13} {:>9} {:>10} {:>10}  load average (1/5/15 min, before -> after)",
        "phase", "CPU % core", "VmRSS max MiB", "Pss MiB", "processes", "workloads"
    );
    for p in phases {
        println!(
            "{:<20} {:>11.2} {:>13.1} {:>9.1} {:>10} {:>10}  {}",
            p.name, p.cpu_pct, p.rss_max_mib, p.pss_mib, p.processes, p.workloads, p.load
        );
    }
    println!("\ntargets");
    for p in phases {
        println!(
            "  {}: CPU <= {TARGET_CPU_PCT} % of a core: {:.2} %  {}; RSS <= {TARGET_RSS_MIB} MiB: \
             {:.1} MiB  {}",
            p.name,
            p.cpu_pct,
            verdict(p.cpu_pct <= TARGET_CPU_PCT),
            p.rss_max_mib,
            verdict(p.rss_max_mib <= TARGET_RSS_MIB)
        );
    }
}

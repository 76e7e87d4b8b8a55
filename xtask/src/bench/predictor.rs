//! `cargo xtask bench predictor`: the predictor against real workloads and real OOM kills.
//!
//! One agent runs; each scenario's workload runs in a memory cgroup of its own (1 GiB, no
//! swap) and `infermem watch --cgroup PATH --json` follows that cgroup. OOM scenarios run one
//! after another (their timing matters): for each, the lead time from the first `critical`
//! line to the kill (timed by the agent's eBPF OOM event, `status --json` `oom_kills[].ts_unix`)
//! and the ETA error then, |eta − actual| / actual. The scenarios that never run out run
//! together, each in its own cgroup, for `--hold` seconds: every `critical` line there is a
//! false alarm.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    Bins,
    agent::{Agent, Watch},
    build_release,
    cgroup::Cgroup,
    figure, print_machine, scratch_dir, target_dir, unix_now, verdict,
    workload::{MODEL_PY, ModelShape, Proc, killed_by_sigkill, set_oom_score_adj, write_gguf},
};

/// Every scenario's cgroup limit.
const LIMIT_MIB: u64 = 1024;
/// How long a workload may take to say it is ready, and the agent to notice it.
const NOTICE: Duration = Duration::from_secs(30);
/// Targets: lead before the kill of a 50 MiB/s ramp, ETA error at the first critical.
const TARGET_LEAD_S: f64 = 10.0;
const TARGET_ETA_ERROR: f64 = 0.25;
/// The model scenario: 300 MiB of weights, trained for 8192 tokens (1 GiB of KV cache at
/// 128 KiB per token: its predicted peak does not fit in the limit), KV growing at 25 MiB/s.
const MODEL: ModelShape = ModelShape {
    weights_mib: 300,
    context: 8192,
};
const MODEL_KV_MIB_PER_S: u64 = 25;

/// Benchmark options.
pub struct Options {
    /// Seconds the never-OOM scenarios run (together).
    hold_s: u64,
}

impl Options {
    /// Parses `[--quick] [--hold SECONDS]` (`--quick`: 60 s instead of 300 s).
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options { hold_s: 300 };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            match flag.as_str() {
                "--quick" => options.hold_s = 60,
                "--hold" => {
                    options.hold_s = args
                        .next()
                        .context("--hold needs a value")?
                        .parse()
                        .context("--hold takes whole seconds")?
                }
                other => bail!("unknown option {other}"),
            }
        }
        Ok(options)
    }
}

/// What runs into the limit.
#[derive(Clone, Copy)]
enum Grower {
    /// `workload ramp RATE 0`.
    Ramp(u64),
    /// A Python process mapping and loading a GGUF model, then growing anonymous memory (its
    /// KV cache) at this rate.
    Model(u64),
}

impl Grower {
    fn name(self) -> String {
        match self {
            Grower::Ramp(rate) => format!("ramp {rate} MiB/s"),
            Grower::Model(rate) => format!("model {} MiB + KV {rate} MiB/s", MODEL.weights_mib),
        }
    }
}

/// One OOM scenario's figures.
struct OomResult {
    name: String,
    /// Seconds from the start (the `go`) to the kill.
    to_kill_s: Option<f64>,
    lead_critical_s: Option<f64>,
    eta_at_critical_s: Option<f64>,
    eta_error: Option<f64>,
    lead_elevated_s: Option<f64>,
    note: String,
}

/// One never-OOM scenario's figures.
struct CalmResult {
    name: String,
    lines: usize,
    critical: usize,
    elevated: usize,
    note: String,
}

pub fn run(options: &Options) -> Result<()> {
    let bins = build_release()?;
    print_machine();
    let dir = scratch_dir("predictor")?;
    let model = model_file()?;
    let mut agent = Agent::start(&bins, &dir)?;
    println!(
        "agent {} on {}; watch lines kept in {}",
        agent.pid(),
        agent.socket.display(),
        dir.display()
    );
    let mut results = Vec::new();
    for grower in [
        Grower::Ramp(25),
        Grower::Ramp(50),
        Grower::Ramp(100),
        Grower::Ramp(200),
        Grower::Model(MODEL_KV_MIB_PER_S),
    ] {
        println!("running {} into {LIMIT_MIB} MiB…", grower.name());
        results.extend(oom_scenario(&agent, &bins, grower, &model, &dir)?);
    }
    println!(
        "running the never-OOM scenarios together for {} s…",
        options.hold_s
    );
    let calm = calm_scenarios(&agent, &bins, options.hold_s, &dir)?;
    let log = agent.log_tail();
    agent.stop()?;
    print_oom_table(&results);
    print_calm_table(&calm, options.hold_s);
    print_targets(&results, &calm);
    if log.contains("ERROR") || log.contains("WARN") {
        println!("agent log (tail):\n{log}");
    }
    Ok(())
}

/// The model scenario's GGUF file, kept in `target/tmp/bench-models` between runs.
fn model_file() -> Result<PathBuf> {
    let dir = target_dir().join("tmp/bench-models");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("predictor-7b-like.gguf");
    write_gguf(&path, &MODEL)?;
    Ok(path)
}

/// Runs `grower` into a 1 GiB cgroup until the OOM killer ends it; returns its row (and for
/// the model a second row, timed from the end of its load).
fn oom_scenario(
    agent: &Agent,
    bins: &Bins,
    grower: Grower,
    model: &Path,
    dir: &Path,
) -> Result<Vec<OomResult>> {
    let slug = grower.name().replace([' ', '/', '+'], "-");
    let cgroup = Cgroup::create(&slug, LIMIT_MIB << 20)?;
    println!("  cgroup {} ({})", cgroup.path, cgroup.version.name());
    // A bystander the OOM killer never picks keeps the cgroup tracked after the kill.
    let mut bystander = Proc::spawn(cgroup.command(&bins.workload, &["steady", "1"]))?;
    let bystander_pid = event_pid(&bystander.expect_event("steady", NOTICE)?)?;
    // Lowering it needs CAP_SYS_RESOURCE, which some containers drop even for root; the
    // bystander's 1 MiB is then simply never the largest.
    let _ = set_oom_score_adj(bystander_pid, -1000);
    let mut proc = match grower {
        Grower::Ramp(rate) => {
            Proc::spawn(cgroup.command(&bins.workload, &["ramp", &rate.to_string(), "0"]))?
        }
        Grower::Model(rate) => Proc::spawn(cgroup.command(
            "python3",
            &["-c", MODEL_PY, path_str(model)?, &rate.to_string()],
        ))?,
    };
    let pid = event_pid(&proc.expect_event("waiting", NOTICE)?)?;
    let mut note = String::new();
    wait_for_cgroup(agent, &cgroup)?;
    if matches!(grower, Grower::Model(_)) && !recognised_as_model(agent, pid)? {
        note.push_str("not in `ps` as a model; ");
    }
    let watch = agent.watch(&["--cgroup", &cgroup.path])?;
    watch
        .next(NOTICE)
        .context("watch --cgroup printed no first line")?;
    let kills_before = cgroup.oom_kills();

    proc.send("go")?;
    let started = unix_now();
    let loaded = match grower {
        Grower::Model(_) => Some({
            proc.expect_event("loaded", Duration::from_secs(120))?;
            unix_now()
        }),
        Grower::Ramp(_) => None,
    };
    let timeout = Duration::from_secs(LIMIT_MIB * 3 / rate_of(grower) + 60);
    let (exit, mut lines) = follow_until_exit(&mut proc, &watch, timeout)?;
    let exited_at = unix_now();
    match exit {
        None => note.push_str(&format!("no OOM kill within {timeout:?}; ")),
        Some(status) => {
            if let Err(e) = killed_by_sigkill(status) {
                note.push_str(&format!("{e}; "));
            }
        }
    }
    if cgroup.oom_kills() <= kills_before && exit.is_some() {
        note.push_str("the memcg counted no OOM kill; ");
    }
    let kill_ts = match agent.oom_kill_of(pid, NOTICE)? {
        Some(kill) => kill["ts_unix"].as_f64(),
        None if exit.is_some() => {
            note.push_str("the agent reported no OOM kill (timed by the exit instead); ");
            Some(exited_at)
        }
        None => None,
    };
    // Lines printed up to the kill may still be in the pipe.
    std::thread::sleep(Duration::from_millis(1500));
    lines.extend(watch.drain());
    save_lines(&dir.join(format!("{slug}.jsonl")), &lines)?;
    drop(watch);
    bystander.finish();
    drop(proc);
    drop(cgroup);

    if let Some(loaded) = loaded {
        note.push_str(&format!("load took {:.1} s; ", loaded - started));
    }
    let mut rows = vec![figures(
        grower.name(),
        &lines,
        started,
        kill_ts,
        note.clone(),
    )];
    // A load long enough to be a ramp of its own: also time from its end.
    if let Some(loaded) = loaded.filter(|l| l - started >= 2.0) {
        let after_load: Vec<Value> = lines
            .iter()
            .filter(|l| l["ts"].as_f64() >= Some(loaded))
            .cloned()
            .collect();
        let mut row = figures(
            format!("  (from the end of its load, {:.1} s)", loaded - started),
            &after_load,
            loaded,
            kill_ts,
            note,
        );
        row.note.push_str("first critical after the load");
        rows.push(row);
    }
    Ok(rows)
}

/// The `pid` a workload's event names.
fn event_pid(event: &Value) -> Result<u32> {
    event["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .with_context(|| format!("no pid in {event}"))
}

fn rate_of(grower: Grower) -> u64 {
    match grower {
        Grower::Ramp(rate) | Grower::Model(rate) => rate.max(1),
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("a UTF-8 path")
}

/// Waits until the agent lists `cgroup` in `status` (it then assesses it every second).
fn wait_for_cgroup(agent: &Agent, cgroup: &Cgroup) -> Result<()> {
    agent
        .status_until(NOTICE, |s| {
            s["cgroups"]
                .as_array()?
                .iter()
                .find(|c| c["path"] == cgroup.path.as_str())
                .cloned()
        })?
        .with_context(|| format!("the agent does not list the cgroup {}", cgroup.path))?;
    Ok(())
}

/// Whether `ps` lists `pid` as a workload within [`NOTICE`].
fn recognised_as_model(agent: &Agent, pid: u32) -> Result<bool> {
    let found = agent.ps_until(NOTICE, |ps| {
        ps["workloads"]
            .as_array()?
            .iter()
            .find(|w| w["pid"] == pid)
            .cloned()
    })?;
    if let Some(workload) = &found {
        println!(
            "  ps: runtime {}, weights {} B, KV max {}, predicted peak {}, risk {}",
            workload["runtime"],
            workload["weights_bytes"],
            workload["kv_bytes_max"],
            workload["predicted_peak_bytes"],
            workload["risk"]["level"]
        );
    }
    Ok(found.is_some())
}

/// Collects watch lines until the workload exits or `timeout` passes; returns the exit status
/// (None on time-out) and the lines.
fn follow_until_exit(
    proc: &mut Proc,
    watch: &Watch,
    timeout: Duration,
) -> Result<(Option<std::process::ExitStatus>, Vec<Value>)> {
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    loop {
        if let Some(status) = proc.exited()? {
            return Ok((Some(status), lines));
        }
        if Instant::now() > deadline {
            return Ok((None, lines));
        }
        if let Some(line) = watch.next(Duration::from_millis(100)) {
            lines.push(line);
        }
    }
}

/// The lead times and ETA error of one scenario's watch `lines` against the kill at `kill_ts`.
fn figures(
    name: String,
    lines: &[Value],
    started: f64,
    kill_ts: Option<f64>,
    note: String,
) -> OomResult {
    let before_kill = |level: &str| {
        lines.iter().find(|l| {
            l["level"] == level
                && l["ended"] != true
                && kill_ts.is_some_and(|k| l["ts"].as_f64().is_some_and(|t| t < k))
        })
    };
    let ts = |line: &Value| line["ts"].as_f64().unwrap_or(f64::NAN);
    let critical = before_kill("critical");
    let elevated = before_kill("elevated").or(critical);
    let lead_critical_s = critical.zip(kill_ts).map(|(l, k)| k - ts(l));
    let eta_at_critical_s = critical.and_then(|l| l["eta_seconds"].as_f64());
    let eta_error = eta_at_critical_s
        .zip(lead_critical_s)
        .map(|(eta, actual)| (eta - actual).abs() / actual);
    OomResult {
        name,
        to_kill_s: kill_ts.map(|k| k - started),
        lead_critical_s,
        eta_at_critical_s,
        eta_error,
        lead_elevated_s: elevated.zip(kill_ts).map(|(l, k)| k - ts(l)),
        note,
    }
}

/// Writes the watch lines, one JSON object a line.
fn save_lines(path: &Path, lines: &[Value]) -> Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for line in lines {
        writeln!(file, "{line}")?;
    }
    Ok(file.flush()?)
}

/// A never-OOM scenario: its name and the workload arguments.
const CALM: [(&str, &[&str]); 3] = [
    ("ramp 50 MiB/s to 700 MiB, hold", &["ramp", "50", "700"]),
    (
        "bursty 50 MiB/s, 64 MiB bursts, to 640 MiB",
        &["bursty", "50", "64", "640"],
    ),
    ("steady 300 MiB", &["steady", "300"]),
];

/// Runs the never-OOM scenarios together, each in a 1 GiB cgroup of its own, for `hold_s`
/// seconds from their start, and counts their `critical` and `elevated` lines.
fn calm_scenarios(agent: &Agent, bins: &Bins, hold_s: u64, dir: &Path) -> Result<Vec<CalmResult>> {
    let mut running = Vec::new();
    for (i, (name, args)) in CALM.iter().enumerate() {
        let cgroup = Cgroup::create(&format!("calm{i}"), LIMIT_MIB << 20)?;
        let mut proc = Proc::spawn(cgroup.command(&bins.workload, args))?;
        let ready = if args[0] == "steady" {
            "steady"
        } else {
            "waiting"
        };
        proc.expect_event(ready, NOTICE)?;
        running.push((*name, cgroup, proc));
    }
    let mut watches = Vec::new();
    for (_, cgroup, _) in &running {
        wait_for_cgroup(agent, cgroup)?;
        let watch = agent.watch(&["--cgroup", &cgroup.path])?;
        watch
            .next(NOTICE)
            .context("watch --cgroup printed no first line")?;
        watches.push(watch);
    }
    for (_, _, proc) in &mut running {
        // `steady` ignores the line; the ramps start.
        proc.send("go")?;
    }
    std::thread::sleep(Duration::from_secs(hold_s));
    let mut results = Vec::new();
    for (i, ((name, cgroup, mut proc), watch)) in running.into_iter().zip(watches).enumerate() {
        let lines = watch.drain();
        save_lines(&dir.join(format!("calm{i}.jsonl")), &lines)?;
        let count = |level: &str| lines.iter().filter(|l| l["level"] == level).count();
        let note = match proc.exited()? {
            Some(status) => format!("the workload ended: {status}"),
            None => String::new(),
        };
        results.push(CalmResult {
            name: name.to_owned(),
            lines: lines.len(),
            critical: count("critical"),
            elevated: count("elevated"),
            note,
        });
        proc.finish();
        drop(cgroup);
    }
    Ok(results)
}

fn print_oom_table(results: &[OomResult]) {
    println!(
        "\nOOM scenarios ({LIMIT_MIB} MiB cgroup, no swap; times in seconds, kill = the agent's \
         eBPF OOM event)"
    );
    println!(
        "{:<40} {:>8} {:>13} {:>9} {:>10} {:>14}  note",
        "scenario", "kill at", "critical lead", "ETA then", "ETA error", "elevated lead"
    );
    for r in results {
        println!(
            "{:<40} {:>8} {:>13} {:>9} {:>10} {:>14}  {}",
            r.name,
            figure(r.to_kill_s, 1),
            figure(r.lead_critical_s, 1),
            figure(r.eta_at_critical_s, 1),
            r.eta_error
                .map_or("-".to_owned(), |e| format!("{:.1} %", e * 100.0)),
            figure(r.lead_elevated_s, 1),
            r.note.trim_end_matches("; ")
        );
    }
}

fn print_calm_table(results: &[CalmResult], hold_s: u64) {
    println!("\nnever-OOM scenarios (together, {hold_s} s, {LIMIT_MIB} MiB cgroups)");
    println!(
        "{:<44} {:>6} {:>9} {:>9}  note",
        "scenario", "lines", "critical", "elevated"
    );
    for r in results {
        println!(
            "{:<44} {:>6} {:>9} {:>9}  {}",
            r.name, r.lines, r.critical, r.elevated, r.note
        );
    }
}

fn print_targets(results: &[OomResult], calm: &[CalmResult]) {
    println!("\ntargets");
    let ramp50 = results.iter().find(|r| r.name == "ramp 50 MiB/s");
    let lead = ramp50.and_then(|r| r.lead_critical_s);
    println!(
        "  lead >= {TARGET_LEAD_S} s for 50 MiB/s into 1 GiB: {} s  {}",
        figure(lead, 1),
        verdict(lead.is_some_and(|l| l >= TARGET_LEAD_S))
    );
    for r in results {
        println!(
            "  ETA error <= {:.0} % ({}): {}  {}",
            TARGET_ETA_ERROR * 100.0,
            r.name.trim(),
            r.eta_error
                .map_or("no ETA".to_owned(), |e| format!("{:.1} %", e * 100.0)),
            verdict(r.eta_error.is_some_and(|e| e <= TARGET_ETA_ERROR))
        );
    }
    let false_criticals: usize = calm.iter().map(|c| c.critical).sum();
    println!(
        "  zero false criticals: {false_criticals} critical lines  {}",
        verdict(false_criticals == 0)
    );
}

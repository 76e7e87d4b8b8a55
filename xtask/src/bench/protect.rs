//! `cargo xtask bench protect`: does a model keep serving while a noisy neighbour fills the
//! memory cgroup it shares, without infermem and with infermem enforcing a policy?
//!
//! Two model processes read their weights from the mapped 192 MB GGUF file of `bench
//! overhead` (`llama.rs`), each a proxy for tokens per second, and say what they did each
//! second:
//! - a model server: the tests' `workload serve FILE`, one byte of every page, pass after pass
//!   (pages/s);
//! - a real llama.cpp: llama-cpp-python from the tests' venv (`use_mmap=True`, one thread
//!   fewer than cores: see [`llama_threads`]), generating 256 tokens greedily, again and again
//!   (tokens/s).
//!
//! Each runs in three scenarios, each in a fresh memory cgroup limited to the model file +
//! [`HEADROOM_MIB`] (no swap), the model's weights read into it first (charged to it):
//! 1. no pressure;
//! 2. a neighbour in the same cgroup (`workload ramp 50 …`) growing at 50 MiB/s until the OOM
//!    killer ends it, started again a second after each kill (a crash-looping job), without
//!    infermem;
//! 3. the same with `infermem run --policy FILE --mode enforce`: the model's process is a
//!    `local_llm` workload (its weights pinned by the agent), the ramp a neighbour (its
//!    `oom_score_adj` raised while the model is at risk).
//!
//! The pressure phase lasts `--seconds` (40; `--quick`: 20) after the neighbour first starts
//! (the same span, with no neighbour, in scenario 1), after 5 s of warm-up. The figures: the
//! throughput over the first [`WINDOW_S`] s of that phase and over all of it, each relative to
//! the no-pressure run over the same span, the slowest second, and what the OOM killer killed.
//! Target: at least 90 % of the no-pressure throughput with infermem, and no kill of the
//! model.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::{
    Bins,
    agent::Agent,
    build_release,
    cgroup::Cgroup,
    figure, llama, load_average, print_machine, scratch_dir, target_dir, unix_now, verdict,
    workload::{Proc, killed_by_sigkill},
};

/// The cgroup's limit above the model file: what the model's own memory and the neighbour
/// share.
const HEADROOM_MIB: u64 = 256;
/// How fast the neighbour grows, and how long after its kill it starts again.
const NEIGHBOUR_MIB_PER_S: u64 = 50;
const RESPAWN_AFTER: Duration = Duration::from_secs(1);
/// Warm-up before the pressure phase (the "before" column).
const SETTLE: Duration = Duration::from_secs(5);
/// The first part of the pressure phase, reported on its own.
const WINDOW_S: f64 = 20.0;
/// How long a model may take to load, and the agent to pin its weights.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const PIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Target: the share of the no-pressure throughput kept with infermem.
const TARGET_RETAINED_PCT: f64 = 90.0;
/// Tokens llama.cpp generates before it starts again from the prompt.
const TOKENS_PER_ROUND: &str = "256";

/// llama.cpp as a model server: drops argv[1] from the page cache (so that its pages are
/// charged to this cgroup), loads it to run on argv[3] threads, says `waiting`; at a line,
/// generates argv[2] tokens greedily again and again, saying `rate` each second (`work`:
/// tokens since the last), until stdin closes.
const LLAMA_PY: &str = r#"
import json, os, sys, threading, time
import llama_cpp
model, n_tokens, n_threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def say(**event):
    print(json.dumps(event), flush=True)
fd = os.open(model, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_threads=n_threads,
                      n_gpu_layers=0, use_mmap=True, seed=1, verbose=False)
prompt = llm.tokenize(b"hello the model memory", add_bos=True)
say(event="waiting", pid=os.getpid())
if not sys.stdin.readline():
    sys.exit(0)
stop = threading.Event()
def watch_stdin():
    sys.stdin.read()
    stop.set()
threading.Thread(target=watch_stdin, daemon=True).start()
last, tokens = time.monotonic(), 0
while not stop.is_set():
    for n, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 1):
        tokens += 1
        now = time.monotonic()
        if now - last >= 1.0:
            say(event="rate", t=time.time(), seconds=now - last, work=tokens)
            last, tokens = now, 0
        if n == n_tokens or stop.is_set():
            break
"#;

/// Benchmark options.
pub struct Options {
    /// Seconds of the pressure phase.
    seconds: u64,
    /// The model processes to run.
    proxies: Vec<Proxy>,
}

impl Options {
    /// Parses `[--quick] [--seconds N] [--model serve|llama]` (`--quick`: 20 s instead of
    /// 40 s; `--model`: only that model process).
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut options = Options {
            seconds: 40,
            proxies: vec![Proxy::Serve, Proxy::Llama],
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            match flag.as_str() {
                "--quick" => options.seconds = 20,
                "--model" => {
                    options.proxies = match args.next().map(String::as_str) {
                        Some("serve") => vec![Proxy::Serve],
                        Some("llama") => vec![Proxy::Llama],
                        _ => bail!("--model takes serve or llama"),
                    }
                }
                "--seconds" => {
                    options.seconds = args
                        .next()
                        .context("--seconds needs a value")?
                        .parse()
                        .context("--seconds takes whole seconds")?
                }
                other => bail!("unknown option {other}"),
            }
        }
        ensure!(options.seconds >= 5, "--seconds must be at least 5");
        Ok(options)
    }
}

/// The model process.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Serve,
    Llama,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Serve => "model server",
            Proxy::Llama => "llama.cpp",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Proxy::Serve => "pages/s",
            Proxy::Llama => "tokens/s",
        }
    }

    /// The model process, started in `cgroup`.
    fn command(self, bench: &Bench, cgroup: &Cgroup) -> std::process::Command {
        let model = bench.model.to_str().expect("the model's path is UTF-8");
        match self {
            Proxy::Serve => cgroup.command(&bench.bins.workload, &["serve", model]),
            Proxy::Llama => {
                let threads = llama_threads().to_string();
                let args = ["-c", LLAMA_PY, model, TOKENS_PER_ROUND, &threads];
                cgroup.command(&bench.python, &args)
            }
        }
    }
}

/// llama.cpp's threads: one core fewer than the machine has (at least one). With a thread on
/// every core, each of its barriers waits for a thread that any other runnable process (the
/// neighbour, the agent, the kernel's reclaim) took off its core, and its tokens/s fall
/// 10–100 fold: that would measure CPU contention, not memory.
fn llama_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

/// What shares the model's cgroup.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Calm,
    Neighbour,
    Enforce,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Calm => "no pressure",
            Scenario::Neighbour => "neighbour, no infermem",
            Scenario::Enforce => "neighbour, infermem enforce",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Scenario::Calm => "calm",
            Scenario::Neighbour => "neighbour",
            Scenario::Enforce => "enforce",
        }
    }
}

/// What every scenario uses.
struct Bench {
    bins: Bins,
    python: PathBuf,
    /// The model file, canonical (as the agent reads it from the process's mappings).
    model: PathBuf,
    limit_bytes: u64,
    dir: PathBuf,
    seconds: f64,
}

/// One report of the model: `work` done in the `seconds` up to `end` (Unix time).
struct Sample {
    end: f64,
    seconds: f64,
    work: f64,
}

/// How many neighbours ran, were OOM-killed, and had their score raised before their kill.
#[derive(Default)]
struct NeighbourCount {
    started: u32,
    killed: u32,
    raised: u32,
}

/// One scenario's run.
struct Outcome {
    samples: Vec<Sample>,
    /// Unix times of the pressure phase (the neighbour's first start) and its end.
    start: f64,
    end: f64,
    /// When the model process was found killed.
    model_killed: Option<f64>,
    neighbours: NeighbourCount,
    /// `oom_kill` of the cgroup at the end.
    memcg_kills: u64,
    /// Bytes of the model file the agent had pinned (and resident) before the pressure.
    pinned: Option<u64>,
    /// The agent's journal: events by kind of action.
    journal: Option<String>,
}

impl Outcome {
    /// Work per second over `from..to` seconds after the start (a report's work spread evenly
    /// over its span).
    fn rate(&self, from: f64, to: f64) -> f64 {
        let (from, to) = (self.start + from, self.start + to);
        let work: f64 = self
            .samples
            .iter()
            .filter(|s| s.seconds > 0.0)
            .map(|s| {
                let overlap = s.end.min(to) - (s.end - s.seconds).max(from);
                s.work * overlap.max(0.0) / s.seconds
            })
            .sum();
        work / (to - from)
    }

    /// The slowest report's rate over `from..to` seconds after the start; 0 when the model
    /// stopped reporting (killed, or stalled for 2 s) before the end.
    fn slowest(&self, from: f64, to: f64) -> f64 {
        let (from, to) = (self.start + from, self.start + to);
        let last = self.samples.last().map_or(0.0, |s| s.end);
        if last < to.min(self.end) - 2.0 {
            return 0.0;
        }
        self.samples
            .iter()
            .filter(|s| s.end > from && s.end - s.seconds < to && s.seconds > 0.0)
            .map(|s| s.work / s.seconds)
            .min_by(f64::total_cmp)
            .unwrap_or(0.0)
    }
}

/// Runs the benchmark.
pub fn run(options: &Options) -> Result<()> {
    let bins = build_release()?;
    print_machine();
    let python = crate::python::ensure_llama_env(&target_dir())?;
    let model = llama::model_file(&python)?.canonicalize()?;
    let model_bytes = std::fs::metadata(&model)?.len();
    let bench = Bench {
        bins,
        python,
        model,
        limit_bytes: (model_bytes >> 20 << 20) + (HEADROOM_MIB << 20),
        dir: scratch_dir("protect")?,
        seconds: options.seconds as f64,
    };
    println!(
        "model {} ({} MiB); cgroup limit {} MiB, no swap; neighbour {NEIGHBOUR_MIB_PER_S} MiB/s, \
         again {RESPAWN_AFTER:?} after each kill; {} s of pressure after {SETTLE:?} of warm-up",
        bench.model.display(),
        model_bytes >> 20,
        bench.limit_bytes >> 20,
        options.seconds
    );
    let mut results = Vec::new();
    for &proxy in &options.proxies {
        for scenario in [Scenario::Calm, Scenario::Neighbour, Scenario::Enforce] {
            println!(
                "{}: {}… (load average {})",
                proxy.name(),
                scenario.name(),
                load_average()
            );
            results.push((proxy, scenario, run_scenario(&bench, proxy, scenario)?));
        }
    }
    print_table(&bench, &results);
    print_targets(&bench, &results);
    println!(
        "scratch files (policy, journal, agent log): {}",
        bench.dir.display()
    );
    Ok(())
}

/// One scenario in a cgroup of its own.
fn run_scenario(bench: &Bench, proxy: Proxy, scenario: Scenario) -> Result<Outcome> {
    let cgroup = Cgroup::create(&format!("protect-{}", scenario.key()), bench.limit_bytes)?;
    let dir = bench.dir.join(format!(
        "{}-{}",
        proxy.name().replace(' ', "-").replace('.', ""),
        scenario.key()
    ));
    std::fs::create_dir_all(&dir)?;
    let mut agent = match scenario {
        Scenario::Enforce => Some(start_agent(bench, &cgroup, &dir)?),
        _ => None,
    };
    let mut model = Model::start(bench, proxy, &cgroup)?;
    let pinned = match &agent {
        Some(agent) => wait_for_pin(agent, &bench.model)?,
        None => None,
    };
    model.follow(SETTLE, None)?;
    let start = unix_now();
    let mut neighbour = (scenario != Scenario::Calm).then(|| Neighbour::new(bench, &cgroup));
    model.follow(Duration::from_secs_f64(bench.seconds), neighbour.as_mut())?;
    let end = unix_now();
    let neighbours = neighbour.map(Neighbour::finish).unwrap_or_default();
    let (samples, model_killed) = model.finish();
    if let Some(agent) = agent.as_mut() {
        agent.stop()?;
    }
    save_samples(&dir.join("reports.jsonl"), &samples, start)?;
    Ok(Outcome {
        samples,
        start,
        end,
        model_killed,
        neighbours,
        memcg_kills: cgroup.oom_kills(),
        pinned,
        journal: agent.map(|_| journal_summary(&dir.join("journal.jsonl"))),
    })
}

/// The policy of the enforce scenario: the process in `cgroup` that maps the model file is a
/// `local_llm` workload; the `workload` processes there (the ramps) are its neighbours.
fn policy_toml(journal: &Path, cgroup: &str, model: &Path) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("a string serialises");
    format!(
        r#"mode = "enforce"
journal = {journal}
pin_budget = "4GiB"
pin_reserve = "256MiB"

[[workload]]
profile = "local_llm"
match = {{ cgroup = [{cgroup}], model = [{model}] }}
# Lowering a score below 0 needs CAP_SYS_RESOURCE, which root lacks in this container.
oom_score_adj = 0

[[neighbour]]
match = {{ cgroup = [{cgroup}], comm = ["workload"] }}
oom_score_adj = 800
"#,
        journal = quote(&journal.to_string_lossy()),
        cgroup = quote(cgroup),
        model = quote(&model.to_string_lossy()),
    )
}

/// `infermem run --policy <policy_toml> --mode enforce`, its socket and journal in `dir`.
fn start_agent(bench: &Bench, cgroup: &Cgroup, dir: &Path) -> Result<Agent> {
    let policy = dir.join("policy.toml");
    let journal = dir.join("journal.jsonl");
    std::fs::write(&policy, policy_toml(&journal, &cgroup.path, &bench.model))?;
    let args: [&OsStr; 4] = [
        "--policy".as_ref(),
        policy.as_os_str(),
        "--mode".as_ref(),
        "enforce".as_ref(),
    ];
    Agent::start_with(&bench.bins, dir, &args)
}

/// The resident bytes of the model file's pin once `infermem actions --json` shows it; None
/// when no pin came within [`PIN_TIMEOUT`].
fn wait_for_pin(agent: &Agent, model: &Path) -> Result<Option<u64>> {
    let path = model.to_string_lossy();
    let pinned = agent.actions_until(PIN_TIMEOUT, |actions| {
        actions["pins"]
            .as_array()?
            .iter()
            .find(|pin| pin["path"] == *path)?["resident_bytes"]
            .as_u64()
            .filter(|&bytes| bytes > 0)
    })?;
    if pinned.is_none() {
        println!("  no pin of the model within {PIN_TIMEOUT:?}");
    }
    Ok(pinned)
}

/// The journal's records counted by event and kind of action, e.g. `apply pin 1`.
fn journal_summary(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for record in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let event = record["event"].as_str().unwrap_or("?");
        let kind = record["action"]["kind"].as_str().unwrap_or("?");
        *counts.entry(format!("{event} {kind}")).or_default() += 1;
    }
    if counts.is_empty() {
        return "empty".to_owned();
    }
    counts
        .iter()
        .map(|(what, n)| format!("{what} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The model process and what it reported.
struct Model {
    proc: Option<Proc>,
    samples: Vec<Sample>,
    killed: Option<f64>,
}

impl Model {
    /// Starts it in `cgroup`, waits until it has loaded, and lets it go.
    fn start(bench: &Bench, proxy: Proxy, cgroup: &Cgroup) -> Result<Model> {
        let mut proc = Proc::spawn(proxy.command(bench, cgroup))?;
        proc.expect_event("waiting", READY_TIMEOUT)?;
        proc.send("go")?;
        Ok(Model {
            proc: Some(proc),
            samples: Vec::new(),
            killed: None,
        })
    }

    /// Takes its reports for `span`, every 100 ms, keeping `neighbour` going meanwhile.
    fn follow(&mut self, span: Duration, mut neighbour: Option<&mut Neighbour>) -> Result<()> {
        let deadline = Instant::now() + span;
        while Instant::now() < deadline {
            self.poll()?;
            if let Some(neighbour) = neighbour.as_deref_mut() {
                neighbour.poll()?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.poll()
    }

    /// Takes the reports printed so far; notes its death (it must be a SIGKILL).
    fn poll(&mut self) -> Result<()> {
        let Some(proc) = self.proc.as_mut() else {
            return Ok(());
        };
        let exited = proc.exited()?;
        for report in proc.take_events("rate") {
            self.samples.push(sample(&report)?);
        }
        if let Some(status) = exited {
            killed_by_sigkill(status).context("the model process")?;
            self.killed = Some(unix_now());
            self.proc = None;
        }
        Ok(())
    }

    /// Stops it (stdin closed); its reports and when it was killed, if it was.
    fn finish(mut self) -> (Vec<Sample>, Option<f64>) {
        if let Some(proc) = self.proc.take() {
            proc.finish();
        }
        (self.samples, self.killed)
    }
}

/// Keeps the model's reports as JSON lines, their times relative to the pressure's start.
fn save_samples(path: &Path, samples: &[Sample], start: f64) -> Result<()> {
    let lines: String = samples
        .iter()
        .map(|s| {
            let line =
                serde_json::json!({"t": s.end - start, "seconds": s.seconds, "work": s.work});
            format!("{line}\n")
        })
        .collect();
    Ok(std::fs::write(path, lines)?)
}

fn sample(report: &Value) -> Result<Sample> {
    let field = |name: &str| {
        report[name]
            .as_f64()
            .with_context(|| format!("no {name} in the model's report {report}"))
    };
    Ok(Sample {
        end: field("t")?,
        seconds: field("seconds")?,
        work: field("work")?,
    })
}

/// The noisy neighbour: `workload ramp` in the model's cgroup, started again after each kill.
struct Neighbour<'a> {
    bench: &'a Bench,
    cgroup: &'a Cgroup,
    /// The running ramp: its process, its pid, its score at start, whether it was raised.
    current: Option<(Proc, u32, i32, bool)>,
    respawn_at: Instant,
    count: NeighbourCount,
}

impl<'a> Neighbour<'a> {
    fn new(bench: &'a Bench, cgroup: &'a Cgroup) -> Neighbour<'a> {
        Neighbour {
            bench,
            cgroup,
            current: None,
            respawn_at: Instant::now(),
            count: NeighbourCount::default(),
        }
    }

    /// Notes a kill (it must be a SIGKILL) or a raised score; starts the next one when due.
    fn poll(&mut self) -> Result<()> {
        let Some((proc, pid, initial, raised)) = self.current.as_mut() else {
            if Instant::now() >= self.respawn_at {
                self.spawn()?;
            }
            return Ok(());
        };
        if let Some(status) = proc.exited()? {
            killed_by_sigkill(status).context("the neighbour")?;
            self.count.killed += 1;
            self.count.raised += u32::from(*raised);
            self.current = None;
            self.respawn_at = Instant::now() + RESPAWN_AFTER;
        } else if oom_score_adj(*pid).is_some_and(|score| score > *initial) {
            *raised = true;
        }
        Ok(())
    }

    /// `workload ramp RATE 2×LIMIT` (it never stops before the OOM killer ends it).
    fn spawn(&mut self) -> Result<()> {
        let rate = NEIGHBOUR_MIB_PER_S.to_string();
        let stop = (2 * (self.bench.limit_bytes >> 20)).to_string();
        let mut cmd = self
            .cgroup
            .command(&self.bench.bins.workload, &["ramp", &rate, &stop]);
        // Its shell's "Killed" at each OOM kill is counted, not printed.
        cmd.stderr(std::process::Stdio::null());
        let mut proc = Proc::spawn(cmd)?;
        let waiting = proc.expect_event("waiting", Duration::from_secs(30))?;
        let pid = waiting["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .context("the ramp said no pid")?;
        let initial = oom_score_adj(pid).context("the ramp's oom_score_adj")?;
        proc.send("go")?;
        self.current = Some((proc, pid, initial, false));
        self.count.started += 1;
        Ok(())
    }

    fn finish(self) -> NeighbourCount {
        self.count
    }
}

/// `/proc/<pid>/oom_score_adj`.
fn oom_score_adj(pid: u32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The spans reported: the first [`WINDOW_S`] s of pressure, and all of it.
fn spans(bench: &Bench) -> [(String, f64, f64); 2] {
    let window = WINDOW_S.min(bench.seconds);
    [
        (format!("first {window:.0} s"), 0.0, window),
        (format!("all {:.0} s", bench.seconds), 0.0, bench.seconds),
    ]
}

/// The no-pressure run of `proxy`.
fn calm_of(results: &[(Proxy, Scenario, Outcome)], proxy: Proxy) -> &Outcome {
    results
        .iter()
        .find(|(p, s, _)| *p == proxy && *s == Scenario::Calm)
        .map(|(_, _, o)| o)
        .expect("every proxy has a no-pressure run")
}

/// The share of the no-pressure throughput over a span, in %.
fn retained(outcome: &Outcome, calm: &Outcome, from: f64, to: f64) -> Option<f64> {
    let reference = calm.rate(from, to);
    (reference > 0.0).then(|| 100.0 * outcome.rate(from, to) / reference)
}

fn print_table(bench: &Bench, results: &[(Proxy, Scenario, Outcome)]) {
    let [first, all] = spans(bench);
    println!(
        "\n{:<13} {:<28} {:>10} {:>18} {:>18} {:>9} {:>11} {:>8} {:>7}",
        "model", "scenario", "before", first.0, all.0, "slowest s", "neighbours", "model", "pinned"
    );
    for (proxy, scenario, outcome) in results {
        let calm = calm_of(results, *proxy);
        let span = |(_, from, to): &(String, f64, f64)| {
            format!(
                "{:.0} ({} %)",
                outcome.rate(*from, *to),
                figure(retained(outcome, calm, *from, *to), 1)
            )
        };
        let n = &outcome.neighbours;
        println!(
            "{:<13} {:<28} {:>10.0} {:>18} {:>18} {:>9.0} {:>11} {:>8} {:>7}",
            proxy.name(),
            scenario.name(),
            outcome.rate(1.0 - SETTLE.as_secs_f64(), 0.0),
            span(&first),
            span(&all),
            outcome.slowest(0.0, bench.seconds),
            format!("{}/{}/{}", n.raised, n.killed, n.started),
            outcome.model_killed.map_or("alive".to_owned(), |t| format!(
                "killed {:.0}s",
                t - outcome.start
            )),
            outcome
                .pinned
                .map_or("-".to_owned(), |b| format!("{}M", b >> 20)),
        );
    }
    println!(
        "(throughput in the model's unit: {} and {}; before: the {} s before the pressure; \
         (%): of the no-pressure run over the same span; neighbours: raised/killed/started; \
         pinned: MiB the agent pinned)",
        Proxy::Serve.unit(),
        Proxy::Llama.unit(),
        SETTLE.as_secs() - 1
    );
    for (proxy, scenario, outcome) in results {
        println!(
            "{} / {}: OOM kills in the cgroup {}{}",
            proxy.name(),
            scenario.name(),
            outcome.memcg_kills,
            outcome
                .journal
                .as_ref()
                .map_or(String::new(), |j| format!("; journal: {j}"))
        );
    }
}

fn print_targets(bench: &Bench, results: &[(Proxy, Scenario, Outcome)]) {
    println!("\ntargets (with infermem enforce)");
    for (proxy, scenario, outcome) in results {
        if *scenario != Scenario::Enforce {
            continue;
        }
        let calm = calm_of(results, *proxy);
        let kept: Vec<Option<f64>> = spans(bench)
            .iter()
            .map(|(_, from, to)| retained(outcome, calm, *from, *to))
            .collect();
        let met = kept
            .iter()
            .all(|k| k.is_some_and(|k| k >= TARGET_RETAINED_PCT));
        println!(
            "  {} {} >= {TARGET_RETAINED_PCT:.0} % of no pressure: first {:.0} s {} %, all {} %  {}",
            proxy.name(),
            proxy.unit(),
            WINDOW_S.min(bench.seconds),
            figure(kept[0], 1),
            figure(kept[1], 1),
            verdict(met)
        );
        println!(
            "  {} not OOM-killed: {}  {}",
            proxy.name(),
            outcome.model_killed.map_or("alive".to_owned(), |t| format!(
                "killed after {:.1} s",
                t - outcome.start
            )),
            verdict(outcome.model_killed.is_none())
        );
    }
}

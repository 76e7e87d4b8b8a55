//! A real llama.cpp generating tokens with the agent on and off (part of `bench overhead`).
//!
//! llama-cpp-python from the tests' venv (`target/llama-venv`, provisioned as `cargo xtask
//! test` does) loads a random-weight llama model written by `tests/llama/make_model.py` (a
//! larger shape than the tests', registered from here), once, with as many threads as cores.
//! Each round generates the same tokens greedily and reports decode tokens per second; rounds
//! alternate between the agent running and not (the order flips every pair), after a warm-up
//! round, and the medians are compared.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use super::{Bins, agent::Agent, median, scratch_dir, target_dir, unix_now, workload::Proc};
use crate::cargo::{run, workspace_root};

/// The model: 16 layers, 1024 wide, 16 heads (4 carry KV), a 2816-wide feed-forward; q8_0
/// weights (180 M parameters, 192 MB), about 125 tokens/s on 2 cores.
const SHAPE: &str = "dict(layers=16, embd=1024, heads=16, kv_heads=4, ff=2816)";
const WEIGHT_TYPE: &str = "q8_0";

/// Registers the benchmark's shape in make_model.py and runs it: argv[1] is its directory,
/// argv[2] the output file.
const MAKE_MODEL_PY: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import make_model
make_model.SHAPES["bench"] = @SHAPE@
sys.argv = ["make_model.py", sys.argv[2], "--shape", "bench", "--weight-type", "@WEIGHT_TYPE@"]
make_model.main()
"#;

/// Loads argv[1], says `ready`; then for every line read, generates argv[2] tokens (greedy,
/// without stopping at end-of-sequence) and says how many per second it decoded.
const GENERATE_PY: &str = r#"
import json, os, sys, time
import llama_cpp
model, n_tokens = sys.argv[1], int(sys.argv[2])
def say(**event):
    print(json.dumps(event), flush=True)
llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_threads=os.cpu_count(),
                      n_gpu_layers=0, use_mmap=True, seed=1, verbose=False)
prompt = llm.tokenize(b"hello the model memory", add_bos=True)
say(event="ready", pid=os.getpid())
while sys.stdin.readline():
    n, first = 0, None
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == n_tokens:
            break
    seconds = time.perf_counter() - first
    say(event="round", tokens=n - 1, seconds=seconds, tps=(n - 1) / seconds)
"#;

/// The figures: tokens per second with the agent off and on (medians), and every round's.
pub struct Figures {
    pub off: f64,
    pub on: f64,
    pub rounds_off: Vec<f64>,
    pub rounds_on: Vec<f64>,
    pub model_bytes: u64,
}

/// Runs `rounds` pairs of rounds of `tokens` tokens each.
pub fn tokens_per_second(bins: &Bins, rounds: usize, tokens: usize) -> Result<Figures> {
    let python = crate::python::ensure_llama_env(&target_dir())?;
    let model = model_file(&python)?;
    let dir = scratch_dir("llama")?;
    let mut cmd = Command::new(&python);
    cmd.arg("-c")
        .arg(GENERATE_PY)
        .arg(&model)
        .arg(tokens.to_string());
    let mut llama = Proc::spawn(cmd)?;
    llama.expect_event("ready", Duration::from_secs(120))?;
    // Warm-up: page the weights in, size the buffers.
    round(&mut llama)?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for pair in 0..rounds {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for agent_on in order {
            if agent_on {
                let mut agent = Agent::start(bins, &dir)?;
                // Past its start-up (seeding, first analyses), as an always-on agent is.
                std::thread::sleep(Duration::from_secs(3));
                on.push(round(&mut llama)?);
                agent.stop()?;
            } else {
                off.push(round(&mut llama)?);
            }
        }
        print!(".");
        std::io::Write::flush(&mut std::io::stdout())?;
    }
    println!();
    llama.finish();
    Ok(Figures {
        off: median(&off).context("no rounds")?,
        on: median(&on).context("no rounds")?,
        rounds_off: off,
        rounds_on: on,
        model_bytes: std::fs::metadata(&model)?.len(),
    })
}

/// One round: the tokens per second llama.cpp decoded.
fn round(llama: &mut Proc) -> Result<f64> {
    let started = unix_now();
    llama.send("go")?;
    let done = llama.expect_event("round", Duration::from_secs(600))?;
    done["tps"]
        .as_f64()
        .with_context(|| format!("round after {:.1} s: {done}", unix_now() - started))
}

/// The benchmark's model, written once into `target/tmp/bench-models` (`bench protect`
/// uses it too).
pub fn model_file(python: &Path) -> Result<PathBuf> {
    let dir = target_dir().join("tmp/bench-models");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("llama-bench-{WEIGHT_TYPE}.gguf"));
    if path.exists() {
        return Ok(path);
    }
    let script = MAKE_MODEL_PY
        .replace("@SHAPE@", SHAPE)
        .replace("@WEIGHT_TYPE@", WEIGHT_TYPE);
    let partial = path.with_extension("partial");
    run(Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(workspace_root().join("tests/llama"))
        .arg(&partial))?;
    std::fs::rename(&partial, &path)?;
    ensure!(path.exists(), "make_model.py wrote no {}", path.display());
    Ok(path)
}

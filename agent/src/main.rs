//! The `infermem` command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use infermem::{
    api::DEFAULT_SOCKET,
    api::WatchTarget,
    commands::{self, ClientOptions, pin::PinTarget, print_json},
    daemon::lifecycle::PolicyOverrides,
    doctor,
    model::{
        ggml::GgmlType,
        plan::{self, PlanRequest, Strategy},
    },
    policy::PolicyMode,
    probes::{DEFAULT_BTF_PATH, ProbeOptions},
    report, units,
};

/// Keeps local and served AI models from being swapped out or OOM-killed.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Kernel BTF used to attach the probes and resolve kernel structures.
    #[arg(long, global = true, default_value = DEFAULT_BTF_PATH, value_name = "PATH")]
    btf: PathBuf,
    /// The agent's socket (default: the config's `api.socket`, /run/infermem/infermem.sock).
    #[arg(long, global = true, env = "INFERMEM_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent in the foreground: probes, registry, predictor and the local API.
    Run {
        /// The config file (default /etc/infermem/config.toml; every key has a default).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Overrides the policy's mode: observe (log only), recommend, enforce (act).
        #[arg(long, value_enum)]
        mode: Option<PolicyMode>,
        /// A policy file replacing the config's [policy] section (docs/policy.md).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464); overrides
        /// `[export] prometheus`.
        #[arg(long, value_name = "ADDR")]
        prometheus: Option<std::net::SocketAddr>,
    },
    /// List the AI workloads: runtime, model, weights resident, KV cache, risk.
    Ps {
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The host's and memory cgroups' memory, risk and recent OOM kills.
    Status {
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a line per second about a process, a cgroup or the host until it ends.
    Watch(WatchArgs),
    /// A live dashboard: the AI workloads with memory bars, risk and ETA, OOM kills and
    /// actions; keys sort the list and open a process's inspect report.
    Top {
        /// How often to refresh, e.g. 1s, 500ms (100ms to 1h).
        #[arg(long, default_value = "1s", value_parser = commands::top::parse_interval)]
        interval: Duration,
    },
    /// Report one process's memory: RSS split, model mappings, fault rates, cgroup, OOM score.
    Inspect {
        /// The process to inspect.
        pid: u32,
        /// How long to sample fault rates and watch allocations, e.g. 2s, 500ms.
        #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
        duration: Duration,
        /// Print the JSON contract documented in the README instead of text.
        #[arg(long)]
        json: bool,
        /// Fail instead of falling back to procfs when eBPF is unavailable (standalone).
        #[arg(long)]
        require_ebpf: bool,
    },
    /// Advise how to run a model file: GPU layers, context, expected RAM and VRAM.
    Plan(PlanArgs),
    /// The policy's mode, the actions in force, what the policy wishes now, the pins.
    Actions {
        /// The config (for its journal when no agent runs).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep a process's model files (or one file) resident in RAM (through the agent, or in
    /// this command with --hold).
    Pin {
        /// A pid, or the path of a model file.
        target: String,
        /// Hold the pin until Ctrl-C (without an agent, the pin lasts only while this runs).
        #[arg(long)]
        hold: bool,
        /// Print what was pinned as JSON lines (without an agent).
        #[arg(long)]
        json: bool,
    },
    /// Release a pin made by hand through the agent.
    Unpin {
        /// A pid, or the path of a model file.
        target: String,
    },
    /// What a model server says through its own API: Ollama's loaded models, a llama.cpp
    /// server's model, slots and metrics.
    Runtime {
        /// The server's pid.
        pid: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Undo every action in force (the agent's, or those a crashed agent left behind).
    Revert {
        /// The config (for its journal when no agent runs).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check the kernel features infermem needs or can use.
    Doctor {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct WatchArgs {
    #[command(flatten)]
    target: WatchTargetArgs,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct WatchTargetArgs {
    /// The process to watch.
    pid: Option<u32>,
    /// A memory cgroup, by its path in the hierarchy (e.g. /system.slice/ollama.service).
    #[arg(long, value_name = "PATH")]
    cgroup: Option<String>,
    /// The host.
    #[arg(long)]
    host: bool,
}

impl WatchTargetArgs {
    fn target(&self) -> WatchTarget {
        match (self.pid, &self.cgroup) {
            (Some(pid), _) => WatchTarget::Pid {
                pid,
                start_time: None,
            },
            (None, Some(path)) => WatchTarget::Cgroup(path.clone()),
            (None, None) => WatchTarget::Host,
        }
    }
}

#[derive(Debug, Args)]
struct PlanArgs {
    /// The model file (GGUF, or safetensors with its config.json beside it).
    model: PathBuf,
    /// Context to plan for, in tokens (default: the model's trained context).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 26))]
    ctx: Option<u64>,
    /// Parallel sequences (llama.cpp -np).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    parallel: u64,
    /// KV cache element type (f16, q8_0, q4_0, ...).
    #[arg(long, default_value = "f16", value_parser = parse_cache_type)]
    cache_type: GgmlType,
    /// Plan without flash attention (llama.cpp then stores V transposed and needs an f16 V).
    #[arg(long)]
    no_flash_attn: bool,
    /// GPU memory to plan for: bytes (24G, 8GiB...) or `auto` (from NVML, the free memory of
    /// the NVIDIA GPU with the most; none without an NVIDIA GPU and driver).
    #[arg(long, default_value = "auto")]
    vram: String,
    /// RAM to plan for: bytes or `auto` (MemAvailable).
    #[arg(long, default_value = "auto")]
    ram: String,
    #[arg(long, value_enum, default_value_t = Strategy::Balanced)]
    strategy: Strategy,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_cache_type(text: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(text).ok_or_else(|| {
        format!(
            "{text:?} is not a ggml type (f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl)"
        )
    })
}

/// Reads `--ram`/`--vram`: bytes, or `auto` measured by `measure`, which says where the bytes
/// were found (a note says what happened).
fn budget(
    text: &str,
    what: &str,
    measure: fn() -> Result<(u64, String), String>,
    notes: &mut Vec<String>,
) -> Result<u64, String> {
    if text != "auto" {
        return units::parse_bytes(text);
    }
    match measure() {
        Ok((bytes, source)) => {
            notes.push(format!(
                "{what} budget: {} available now ({source})",
                units::format_bytes(bytes)
            ));
            Ok(bytes)
        }
        Err(why) => {
            notes.push(format!("{what} budget: 0 ({why})"));
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INFERMEM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let probes = ProbeOptions {
        btf_path: cli.btf.clone(),
        ..ProbeOptions::default()
    };
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let client = ClientOptions {
        socket: &socket,
        probes,
    };
    match cli.command {
        Command::Run {
            config,
            mode,
            policy,
            prometheus,
        } => commands::run(
            config.as_deref(),
            cli.socket.as_deref(),
            PolicyOverrides { mode, file: policy },
            prometheus,
        ),
        Command::Ps { json } => commands::ps(&client, json),
        Command::Status { json } => commands::status(&client, json),
        Command::Watch(args) => commands::watch(&client, args.target.target(), args.json),
        Command::Top { interval } => commands::top::top(&client, interval),
        Command::Inspect {
            pid,
            duration,
            json,
            require_ebpf,
        } => commands::inspect(&client, pid, duration, json, require_ebpf),
        Command::Plan(args) => run_plan(args),
        Command::Actions { config, json } => {
            commands::actions::actions(&client, config.as_deref(), json)
        }
        Command::Pin { target, hold, json } => {
            commands::pin::pin(&client, &PinTarget::parse(&target), hold, json)
        }
        Command::Unpin { target } => commands::pin::unpin(&client, &PinTarget::parse(&target)),
        Command::Runtime { pid, json } => commands::runtime::runtime(pid, json),
        Command::Revert { config } => commands::actions::revert(&client, config.as_deref()),
        Command::Doctor { json } => {
            let checks = doctor::run(&client.probes, commands::agent_probes(&client).as_ref());
            if json {
                print_json(&checks);
            } else {
                print!("{}", doctor::render(&checks));
            }
            if checks.iter().any(|c| c.required && !c.pass) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

fn run_plan(args: PlanArgs) -> ExitCode {
    let mut notes = Vec::new();
    let measure_ram = || plan::available_ram().map(|bytes| (bytes, "MemAvailable".to_owned()));
    let budgets = budget(&args.ram, "RAM", measure_ram, &mut notes).and_then(|ram| {
        Ok((
            ram,
            budget(&args.vram, "VRAM", plan::available_vram, &mut notes)?,
        ))
    });
    let (ram_bytes, vram_bytes) = match budgets {
        Ok(budgets) => budgets,
        Err(err) => {
            eprintln!("error: {}", report::text::escape(&err.to_string()));
            return ExitCode::FAILURE;
        }
    };
    let request = PlanRequest {
        model: args.model,
        ctx: args.ctx,
        parallel: args.parallel,
        cache_type: args.cache_type,
        flash_attn: !args.no_flash_attn,
        ram_bytes,
        vram_bytes,
        strategy: args.strategy,
        cpu_backend: infermem::model::cpu_backend::release_build_on_host(),
    };
    match plan::plan(&request) {
        Ok(mut report) => {
            report.notes.splice(0..0, notes);
            if args.json {
                print_json(&report);
            } else {
                print!("{}", report::model_text::render_plan(&report));
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}", report::text::escape(&err.to_string()));
            ExitCode::FAILURE
        }
    }
}

//! The `infermem` command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use infermem::{
    doctor,
    inspect::{self, InspectOptions},
    model::{
        ggml::GgmlType,
        plan::{self, PlanRequest, Strategy},
    },
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report one process's memory: RSS split, model mappings, fault rates, cgroup, OOM score.
    Inspect {
        /// The process to inspect.
        pid: u32,
        /// How long to sample fault rates and watch allocations, e.g. 2s, 500ms.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        duration: Duration,
        /// Print the JSON contract documented in the README instead of text.
        #[arg(long)]
        json: bool,
        /// Fail instead of falling back to procfs when eBPF is unavailable.
        #[arg(long)]
        require_ebpf: bool,
    },
    /// Advise how to run a model file: GPU layers, context, expected RAM and VRAM.
    Plan {
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
        /// GPU memory to plan for: bytes (24G, 8GiB...) or `auto` (free memory of the first
        /// NVIDIA GPU; none without one).
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
    },
    /// Check the kernel features infermem needs or can use.
    Doctor {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else if let Some(m) = text.strip_suffix('m') {
        (m, 60.0)
    } else if let Some(h) = text.strip_suffix('h') {
        (h, 3600.0)
    } else {
        (text, 1.0)
    };
    let seconds: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (examples: 2s, 500ms, 1m, 1h)"))?;
    if !(seconds * scale).is_finite() || seconds <= 0.0 {
        return Err(format!("{text:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds * scale))
}

fn parse_cache_type(text: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(text).ok_or_else(|| {
        format!(
            "{text:?} is not a ggml type (f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl)"
        )
    })
}

/// Reads `--ram`/`--vram`: bytes, or `auto` measured by `measure` (a note says what happened).
fn budget(
    text: &str,
    what: &str,
    measure: fn() -> Result<u64, String>,
    notes: &mut Vec<String>,
) -> Result<u64, String> {
    if text != "auto" {
        return units::parse_bytes(text);
    }
    match measure() {
        Ok(bytes) => {
            notes.push(format!(
                "{what} budget: {} available now",
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

/// Prints a report as pretty JSON on stdout.
fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports serialise")
    );
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
        btf_path: cli.btf,
        ..ProbeOptions::default()
    };
    match cli.command {
        Command::Inspect {
            pid,
            duration,
            json,
            require_ebpf,
        } => run_inspect(
            InspectOptions {
                pid,
                duration,
                probes,
                require_ebpf,
            },
            json,
        ),
        Command::Plan {
            model,
            ctx,
            parallel,
            cache_type,
            no_flash_attn,
            vram,
            ram,
            strategy,
            json,
        } => {
            let mut notes = Vec::new();
            let budgets = budget(&ram, "RAM", plan::available_ram, &mut notes).and_then(|ram| {
                Ok((
                    ram,
                    budget(&vram, "VRAM", plan::available_vram, &mut notes)?,
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
                model,
                ctx,
                parallel,
                cache_type,
                flash_attn: !no_flash_attn,
                ram_bytes,
                vram_bytes,
                strategy,
                cpu_backend: infermem::model::cpu_backend::release_build_on_host(),
            };
            match plan::plan(&request) {
                Ok(mut report) => {
                    report.notes.splice(0..0, notes);
                    if json {
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
        Command::Doctor { json } => {
            let checks = doctor::run(&probes);
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

fn run_inspect(options: InspectOptions, json: bool) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(inspect::inspect(&options)) {
        Ok(report) => {
            if json {
                print_json(&report);
            } else {
                print!("{}", report::text::render(&report));
                if let Some(reason) = &report.sources.reason {
                    eprintln!(
                        "note: eBPF is off ({reason}); fault split and mapping faults need it"
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            if json {
                print_json(&err.to_report());
            }
            eprintln!("error: {}", report::text::escape(&err.to_string()));
            ExitCode::FAILURE
        }
    }
}

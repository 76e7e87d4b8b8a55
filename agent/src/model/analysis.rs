//! The `model` section of `inspect`: which runtime a process is, which model files it uses,
//! how it is configured, and what its model will cost in memory, with the n_ctx in effect
//! read from its configuration or inferred from the KV cache allocation the kernel saw.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    config::{self, RuntimeConfig, Setting, SettingSource, llama_defaults},
    cpu_backend::{self, CpuBackend, CpuFeatures},
    discovery::{self, FoundBy, ModelFile, ModelFormat, Recognised},
    ggml::GgmlType,
    memory::{self, ContextShape, Footprint, KvModel, Placement},
    ollama,
    open::ProcessFiles,
    profile::{self, ModelProfile},
    redact,
    runtime::{self, Evidence, EvidenceSource, ProcessEvidence, Runtime},
};
use crate::{collect::pagemap, units::format_bytes};

/// What `inspect` knows about a process, gathered from /proc and the probes.
#[derive(Debug, Clone, Default)]
pub struct ProcessFacts {
    pub pid: u32,
    pub exe: Option<PathBuf>,
    pub cmdline: Vec<String>,
    pub environ: Vec<(String, String)>,
    /// Every mapped file with its resident bytes.
    pub mapped_files: Vec<(PathBuf, u64)>,
    /// Files the probes saw being mapped while sampling.
    pub mmap_event_files: Vec<PathBuf>,
    pub open_files: Vec<PathBuf>,
    /// Large anonymous memory: allocations the probes saw and areas in /proc/<pid>/maps.
    pub anon_blocks: Vec<AnonBlock>,
}

/// A large block of anonymous memory, a candidate KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnonBlock {
    pub address: u64,
    pub bytes: u64,
    pub source: BlockSource,
    /// Bytes of it in memory or swapped out (written at some point), from pagemap; read only
    /// for a block whose size fits a KV cache, null otherwise or when unknown.
    pub resident_bytes: Option<u64>,
}

/// How a block was seen. Exactness differs: an mmap'd malloc chunk is the request plus at
/// most a page of header and alignment; heap growth (brk) is the request give or take the
/// heap's free top; /proc areas may be merged with neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockSource {
    ProbeMmap,
    ProbeBrk,
    ProbeMremap,
    ProcMaps,
}

impl AnonBlock {
    /// How far the block may be from the bytes it was requested for.
    fn tolerance(&self) -> (u64, u64) {
        match self.source {
            // (below, above) the request.
            // posix_memalign's chunk: a page of rounding, 64 bytes of alignment, a header. An
            // area of /proc is believed only as such a chunk (merged areas are not).
            BlockSource::ProbeMmap | BlockSource::ProbeMremap | BlockSource::ProcMaps => {
                (0, 8 << 10)
            }
            BlockSource::ProbeBrk => (1 << 20, 1 << 20),
        }
    }
}

/// The `model` section of the inspect report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    /// Runtime id, e.g. `llama-cpp`; `unknown` when only model-file mappings point at one.
    pub runtime: Runtime,
    /// The runtime's name for people, e.g. `llama.cpp`.
    pub runtime_label: String,
    pub runtime_evidence: Vec<Evidence>,
    /// GPU device nodes the process has open.
    pub gpu_devices: Vec<String>,
    pub files: Vec<ModelFileReport>,
    pub config: RuntimeConfig,
    /// Memory prediction for the main model file; null when no file could be profiled.
    pub prediction: Option<Prediction>,
    /// What could not be worked out, and why.
    pub notes: Vec<String>,
}

/// A model file and what it says about the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFileReport {
    #[serde(flatten)]
    pub file: ModelFile,
    /// Bytes of the file resident in the process's mappings.
    pub resident_bytes: u64,
    /// Null for formats infermem does not parse (PyTorch, ONNX) or when parsing failed.
    pub profile: Option<ModelProfile>,
    pub error: Option<String>,
}

/// Predicted memory of the main model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub model_file: PathBuf,
    /// The context in effect, and whether it was read or inferred.
    pub n_ctx: Option<Setting<u64>>,
    /// The model's trained (maximum) context.
    pub n_ctx_train: Option<u64>,
    pub cache_type_k: String,
    pub cache_type_v: String,
    pub n_parallel: u64,
    pub n_gpu_layers: i64,
    pub flash_attn: bool,
    /// Bytes of tensor data (all shards together).
    pub weights_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// KV cache allocated for the context in effect.
    pub kv_bytes_now: Option<u64>,
    /// KV cache at the trained context.
    pub kv_bytes_at_max_ctx: Option<u64>,
    pub peak_ram_bytes: Option<u64>,
    pub peak_vram_bytes: Option<u64>,
    /// The anonymous allocation identified as the KV cache, when one was.
    pub kv_allocation: Option<AnonBlock>,
    /// The ggml CPU backend the process runs, which decides the repacked weights; null for
    /// other runtimes and model formats.
    pub cpu_backend: Option<CpuBackend>,
    pub footprint: Option<Footprint>,
}

/// Why n_ctx (and the KV cache, peak RAM and VRAM that follow from it) is null.
const NCTX_UNKNOWN: &str = "n_ctx unknown: it is not configured where infermem can read it, the KV cache was not seen being allocated (infermem started after the model loaded), and no area of /proc/<pid>/maps is unambiguously the cache; start infermem before the model loads to know n_ctx and the KV cache exactly";

/// How long to wait for Ollama's API.
const OLLAMA_TIMEOUT: Duration = Duration::from_millis(500);

/// Builds the model section; `None` when the process is no model runtime and maps no model.
pub fn analyze(facts: &ProcessFacts) -> Option<ModelReport> {
    let candidates = facts
        .mapped_files
        .iter()
        .map(|(p, _)| (p.clone(), FoundBy::Mapped))
        .chain(
            facts
                .mmap_event_files
                .iter()
                .map(|p| (p.clone(), FoundBy::MmapEvent)),
        )
        .chain(
            facts
                .open_files
                .iter()
                .map(|p| (p.clone(), FoundBy::OpenFd)),
        );
    let process_files = ProcessFiles::new(facts.pid);
    let files = discovery::recognise(candidates, |p| process_files.open(p));
    let to_string = |p: &PathBuf| p.to_string_lossy().into_owned();
    let evidence = ProcessEvidence {
        exe: facts.exe.as_ref().map(to_string),
        cmdline: redact::cmdline(&facts.cmdline),
        environ: facts.environ.clone(),
        mapped_files: facts
            .mapped_files
            .iter()
            .map(|(p, _)| to_string(p))
            .collect(),
        open_files: facts.open_files.iter().map(to_string).collect(),
        has_model_mappings: files
            .iter()
            .any(|f| f.file.found_by.contains(&FoundBy::Mapped)),
    };
    let detection = runtime::detect(&evidence)?;
    let mut notes = Vec::new();

    let llama_program = is_llama_program(&detection.evidence);
    let mut config = match detection.runtime {
        Runtime::Vllm => config::parse_vllm(&facts.cmdline),
        Runtime::Ollama => {
            let mut config = config::parse_ollama_env(&facts.environ);
            match ollama::ask_own_server(facts.pid, &facts.environ, OLLAMA_TIMEOUT) {
                Ok(loaded) => config.ollama_loaded = Some(loaded),
                Err(err) => notes.push(err),
            }
            config
        }
        // llama.cpp's flags mean something only to its own programs: a Python program
        // embedding libllama has flags of its own (`-c` may well be a config file).
        _ if llama_program => config::parse_llama(&facts.cmdline, &facts.environ),
        _ => RuntimeConfig::default(),
    };

    let files: Vec<ModelFileReport> = files
        .into_iter()
        .map(|f| file_report(f, facts, &process_files))
        .collect();
    let cpu_backend = runs_on_ggml(detection.runtime, &files)
        .then(|| {
            let mapped: Vec<&Path> = facts
                .mapped_files
                .iter()
                .map(|(p, _)| p.as_path())
                .collect();
            cpu_backend::detect(&PathBuf::from(format!("/proc/{}/root", facts.pid)), &mapped)
        })
        .flatten();
    let cpu = cpu_backend.as_ref().map(|b| b.features);
    let mut prediction = predict(llama_program, &files, &mut config, facts, cpu, &mut notes);
    if let Some(p) = prediction.as_mut() {
        p.cpu_backend = cpu_backend;
    }
    Some(ModelReport {
        runtime: detection.runtime,
        runtime_label: detection.runtime.label().to_owned(),
        runtime_evidence: detection.evidence,
        gpu_devices: detection.gpu_devices,
        files,
        config,
        prediction,
        notes,
    })
}

fn file_report(
    Recognised { file, opened }: Recognised,
    facts: &ProcessFacts,
    process_files: &ProcessFiles,
) -> ModelFileReport {
    let open = |p: &std::path::Path| process_files.open(p);
    let (profile, error) = match profile::profile_opened(&opened, file.format, &open) {
        Ok(profile) => (profile, None),
        Err(err) => (None, Some(err)),
    };
    let resident_bytes = facts
        .mapped_files
        .iter()
        .filter(|(p, _)| *p == file.path)
        .map(|(_, r)| r)
        .sum();
    ModelFileReport {
        file,
        resident_bytes,
        profile,
        error,
    }
}

/// The cache types tried, most likely first, when inferring the context from the KV cache
/// allocation (sizes alone cannot tell f16 from bf16, so the first that fits is reported).
const INFERENCE_TYPES: &[(&str, &str)] = &[
    ("f16", "f16"),
    ("q8_0", "q8_0"),
    ("q4_0", "q4_0"),
    ("f16", "q8_0"),
    ("q8_0", "f16"),
    ("f32", "f32"),
    ("q4_1", "q4_1"),
    ("q5_0", "q5_0"),
    ("q5_1", "q5_1"),
    ("iq4_nl", "iq4_nl"),
    ("f16", "q4_0"),
];

/// Whether the process is one of llama.cpp's programs (llama-server, llama-cli…) or Ollama's
/// runner, which take llama.cpp's flags, rather than a program embedding libllama.
/// Whether the main model is a GGUF file run by ggml (llama.cpp, Ollama and the like, not
/// vLLM), so that ggml's CPU backend decides where its CPU weights live.
fn runs_on_ggml(runtime: Runtime, files: &[ModelFileReport]) -> bool {
    runtime != Runtime::Vllm
        && files
            .iter()
            .find(|f| f.profile.is_some())
            .is_some_and(|f| f.file.format == ModelFormat::Gguf)
}

fn is_llama_program(evidence: &[Evidence]) -> bool {
    evidence.iter().any(|e| {
        e.source == EvidenceSource::Exe
            && matches!(e.runtime, Runtime::LlamaCpp | Runtime::OllamaRunner)
    })
}

fn predict(
    llama_program: bool,
    files: &[ModelFileReport],
    config: &mut RuntimeConfig,
    facts: &ProcessFacts,
    cpu: Option<CpuFeatures>,
    notes: &mut Vec<String>,
) -> Option<Prediction> {
    // The main model: the largest profiled file (its other shards are summed in).
    let main = files.iter().find(|f| f.profile.is_some())?;
    let profile = main.profile.as_ref()?;
    let weights_bytes = match main.file.shard {
        Some(_) => files
            .iter()
            .filter(|f| f.file.format == main.file.format && f.file.shard.is_some())
            .filter_map(|f| f.profile.as_ref().map(|p| p.weight_bytes))
            .sum(),
        None => profile.weight_bytes,
    };
    let cache_type = |s: &Option<Setting<String>>| s.as_ref().map(|s| s.value.clone());
    // Flash attention: as configured; llama.cpp's programs default to `auto`, which turns it
    // on wherever the backend supports it (the CPU does); embedders such as llama-cpp-python
    // default to off. It changes the compute buffers, and V's layout.
    let mut flash_attn = match &config.flash_attn {
        Some(s) => matches!(s.value.as_str(), "on" | "1" | "true" | "auto"),
        None => llama_program,
    };
    let n_parallel = config
        .n_parallel
        .as_ref()
        .map_or(llama_defaults::N_PARALLEL, |s| s.value);
    let n_gpu_layers = config.n_gpu_layers.as_ref().map_or(0, |s| s.value);
    let n_ubatch = config
        .n_ubatch
        .as_ref()
        .map_or(llama_defaults::N_UBATCH, |s| s.value);
    let unified = config.kv_unified.as_ref().is_some_and(|s| s.value);
    let configured_k = cache_type(&config.cache_type_k)
        .or_else(|| cache_type(&config.kv_cache_dtype).filter(|t| t != "auto"));
    let configured_v = cache_type(&config.cache_type_v).or_else(|| configured_k.clone());
    let mut type_k = configured_k
        .clone()
        .unwrap_or_else(|| llama_defaults::CACHE_TYPE.to_owned());
    let mut type_v = configured_v
        .clone()
        .unwrap_or_else(|| llama_defaults::CACHE_TYPE.to_owned());

    // n_ctx: read from the configuration, else inferred from the KV allocation, else the
    // runtime's default.
    let mut kv_allocation = None;
    let read_ctx = config
        .n_ctx
        .clone()
        .or_else(|| config.max_model_len.clone());
    let inferred = if main.file.format == ModelFormat::Gguf {
        let types: Vec<(String, String)> = match (&configured_k, &configured_v) {
            (Some(k), Some(v)) => vec![(k.clone(), v.clone())],
            _ => INFERENCE_TYPES
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let populated = |b: &AnonBlock| {
            pagemap::populated_share(facts.pid, b.address, b.bytes)
                .map(|share| (share * b.bytes as f64) as u64)
        };
        infer_ctx(
            profile,
            &facts.anon_blocks,
            &types,
            n_parallel,
            flash_attn,
            &populated,
        )
    } else {
        None
    };
    let n_ctx = match (read_ctx, inferred) {
        (Some(read), inferred) => {
            if let Some(inf) = inferred
                && read.value != 0
                && memory::kv_cells(ContextShape::with_ctx(read.value), None, None).full
                    != inf.n_ctx
            {
                notes.push(format!(
                    "n_ctx {} was read ({}) but the KV allocation suggests {}",
                    read.value, read.detail, inf.n_ctx
                ));
            }
            Some(read)
        }
        (None, Some(inf)) => {
            kv_allocation = Some(inf.block);
            type_k = inf.type_k.clone();
            type_v = inf.type_v.clone();
            if config.flash_attn.is_none() && !matches!(type_v.as_str(), "f16" | "bf16" | "f32") {
                // llama.cpp refuses a quantized V cache without flash attention.
                flash_attn = true;
            }
            Some(Setting {
                value: inf.n_ctx,
                source: SettingSource::Inferred,
                detail: format!(
                    "{} anonymous block of {} at {:#x} = {} cells x {} per cell ({}/{} cache)",
                    block_source_name(inf.block.source),
                    format_bytes(inf.block.bytes),
                    inf.block.address,
                    inf.n_ctx,
                    format_bytes(inf.per_cell),
                    inf.type_k,
                    inf.type_v
                ),
            })
        }
        (None, None) if llama_program => Some(Setting {
            value: 0,
            source: SettingSource::Default,
            detail: "llama.cpp's default -c 0: the trained context".to_owned(),
        }),
        (None, None) => {
            notes.push(NCTX_UNKNOWN.to_owned());
            None
        }
    };
    if let Some(setting) = &n_ctx
        && config.n_ctx.is_none()
        && matches!(
            setting.source,
            SettingSource::Inferred | SettingSource::Default
        )
    {
        config.n_ctx = Some(setting.clone());
    }

    let mut prediction = Prediction {
        model_file: main.file.path.clone(),
        n_ctx: n_ctx.clone(),
        n_ctx_train: profile.n_ctx_train,
        cache_type_k: type_k.clone(),
        cache_type_v: type_v.clone(),
        n_parallel,
        n_gpu_layers,
        flash_attn,
        weights_bytes,
        kv_bytes_per_token: 0,
        kv_bytes_now: None,
        kv_bytes_at_max_ctx: None,
        peak_ram_bytes: None,
        peak_vram_bytes: None,
        kv_allocation,
        cpu_backend: None,
        footprint: None,
    };
    let (Some(tk), Some(tv)) = (GgmlType::from_name(&type_k), GgmlType::from_name(&type_v)) else {
        notes.push(format!("unknown KV cache type {type_k}/{type_v}"));
        return Some(prediction);
    };
    let kv = match KvModel::new(profile, tk, tv, flash_attn) {
        Ok(kv) => kv,
        Err(err) => {
            notes.push(format!("no KV prediction: {err}"));
            return Some(prediction);
        }
    };
    if profile.kv_lora_rank.is_some() {
        notes.push(
            "multi-head latent attention: KV sized as llama.cpp caches it (compressed rows, no V)"
                .to_owned(),
        );
    }
    prediction.kv_bytes_per_token = kv.bytes_per_token();
    let shape = |n_ctx: u64| ContextShape {
        n_ctx,
        n_seq: n_parallel,
        n_ubatch,
        unified,
    };
    let at_max = profile.n_ctx_train.map(|train| {
        kv.bytes(memory::kv_cells(
            shape(train),
            Some(train),
            kv.sliding_window,
        ))
    });
    prediction.kv_bytes_at_max_ctx = at_max;
    if let Some(n_ctx) = &n_ctx {
        let placement = Placement {
            n_gpu_layers,
            shape: shape(n_ctx.value),
            type_k: tk,
            type_v: tv,
            flash_attn,
            cpu,
        };
        let mut f = memory::footprint(profile, &kv, &placement);
        // Shards beyond the main file add weights on the CPU side of the estimate.
        let extra = weights_bytes.saturating_sub(profile.weight_bytes);
        f.weights_cpu_bytes += extra;
        f.ram_bytes += extra;
        prediction.kv_bytes_now = Some(f.kv_gpu_bytes + f.kv_cpu_bytes);
        prediction.peak_ram_bytes = Some(f.ram_bytes);
        prediction.peak_vram_bytes = Some(f.vram_bytes);
        prediction.footprint = Some(f);
    }
    Some(prediction)
}

fn block_source_name(source: BlockSource) -> &'static str {
    match source {
        BlockSource::ProbeMmap => "mmap'd",
        BlockSource::ProbeBrk => "heap (brk)",
        BlockSource::ProbeMremap => "mremap'd",
        BlockSource::ProcMaps => "/proc/<pid>/maps",
    }
}

/// A context recognised from a KV cache allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferredCtx {
    pub n_ctx: u64,
    pub type_k: String,
    pub type_v: String,
    pub per_cell: u64,
    pub block: AnonBlock,
}

/// Finds the KV cache among `blocks`: llama.cpp allocates the cache of its full-attention
/// layers as one buffer of `cells × bytes per cell`, cells a multiple of 256 (× sequences),
/// and clears it whole as it allocates it.
///
/// Blocks the probes saw allocated are believed first: every cache type pair in `types` is
/// tried, the earlier (likelier) pair then the closest fit wins, and a block less than half
/// written (pagemap, through `populated`) is passed over: that tells the cache from
/// same-sized blocks such as 8 MiB + guard page thread stacks.
///
/// Areas of `/proc/<pid>/maps` (infermem started after the load) are only believed when the
/// evidence is unambiguous, because the kernel merges neighbouring areas and unrelated
/// buffers can have a fitting size: only the first type pair is tried (a cache type cannot
/// be told from a size alone: the caller passes the configured pair first, else llama.cpp's
/// default f16), the area must be a malloc'd mapping of the cache (at most 8 KiB of header
/// and alignment above it), written whole (≥ 99 %, pagemap readable), and the only one that
/// fits. Otherwise nothing is inferred: a wrong figure stated as fact is worse than none.
pub fn infer_ctx(
    profile: &ModelProfile,
    blocks: &[AnonBlock],
    types: &[(String, String)],
    n_seq: u64,
    flash_attn: bool,
    populated: &dyn Fn(&AnonBlock) -> Option<u64>,
) -> Option<InferredCtx> {
    let (listed, seen): (Vec<AnonBlock>, Vec<AnonBlock>) = blocks
        .iter()
        .partition(|b| b.source == BlockSource::ProcMaps);
    let fit = |blocks: &[AnonBlock], types: &[(String, String)]| {
        fitting_blocks(profile, blocks, types, n_seq, flash_attn)
    };
    if let Some(found) = fit(&seen, types)
        .into_iter()
        .find_map(|c| written(c, populated, 0.5, true))
    {
        return Some(found);
    }
    let after_the_fact: Vec<InferredCtx> = fit(&listed, &types[..types.len().min(1)])
        .into_iter()
        .filter_map(|c| written(c, populated, 0.99, false))
        .collect();
    match <[InferredCtx; 1]>::try_from(after_the_fact) {
        Ok([only]) => Some(only),
        Err(_) => None,
    }
}

/// Every (block, type pair) whose size fits a KV cache, the likeliest first: earlier type
/// pairs, then closer fits.
fn fitting_blocks(
    profile: &ModelProfile,
    blocks: &[AnonBlock],
    types: &[(String, String)],
    n_seq: u64,
    flash_attn: bool,
) -> Vec<InferredCtx> {
    // No context beyond 16 × the trained one (or 16M tokens) is believable.
    let max_cells = profile
        .n_ctx_train
        .map_or(1 << 24, |t| t.saturating_mul(16).max(1 << 16));
    let mut found: Vec<((usize, u64), InferredCtx)> = Vec::new();
    for (rank, (k, v)) in types.iter().enumerate() {
        let (Some(tk), Some(tv)) = (GgmlType::from_name(k), GgmlType::from_name(v)) else {
            continue;
        };
        let Ok(kv) = KvModel::new(profile, tk, tv, flash_attn) else {
            continue;
        };
        let per_cell = kv.full_bytes_per_cell();
        if per_cell == 0 {
            continue;
        }
        for block in blocks {
            let Some(cells) = cells_fitting(block, per_cell, max_cells, n_seq) else {
                continue;
            };
            let key = (rank, block.bytes.abs_diff(cells * per_cell));
            found.push((
                key,
                InferredCtx {
                    n_ctx: cells,
                    type_k: k.clone(),
                    type_v: v.clone(),
                    per_cell,
                    block: *block,
                },
            ));
        }
    }
    found.sort_by_key(|(key, _)| *key);
    found.into_iter().map(|(_, c)| c).collect()
}

/// The cells of a cache of `per_cell` bytes per cell that `block` holds, if its size fits one
/// within the block's tolerance.
fn cells_fitting(block: &AnonBlock, per_cell: u64, max_cells: u64, n_seq: u64) -> Option<u64> {
    let step = per_cell * memory::KV_PAD;
    let (below, above) = block.tolerance();
    // Tolerances narrower than half a step keep the match unique.
    let (below, above) = (below.min(step / 2 - 1), above.min(step / 2 - 1));
    let cells = (block.bytes + below) / step * memory::KV_PAD;
    let expected = cells * per_cell;
    let fits = cells > 0
        && cells <= max_cells
        && cells.is_multiple_of(memory::KV_PAD * n_seq.max(1))
        && block.bytes + below >= expected
        && block.bytes <= expected + above
        // A malloc'd mapping always carries its header: never exactly the request.
        && (block.bytes != expected || block.source == BlockSource::ProbeBrk);
    fits.then_some(cells)
}

/// `found` with its block's written bytes, if at least `min_share` of it was written (or
/// residency is unknown and `unknown_ok`).
fn written(
    found: InferredCtx,
    populated: &dyn Fn(&AnonBlock) -> Option<u64>,
    min_share: f64,
    unknown_ok: bool,
) -> Option<InferredCtx> {
    let resident_bytes = populated(&found.block);
    let ok = match resident_bytes {
        Some(r) => r as f64 >= found.block.bytes as f64 * min_share,
        None => unknown_ok,
    };
    ok.then_some(InferredCtx {
        block: AnonBlock {
            resident_bytes,
            ..found.block
        },
        ..found
    })
}

#[cfg(test)]
mod tests;

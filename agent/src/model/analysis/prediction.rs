//! The memory prediction of a process's main model: its settings (as configured, else the
//! runtime's defaults), the context in effect (read, inferred from the KV cache allocation,
//! or defaulted), and the KV cache and footprint that follow from them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    AnonBlock, BlockSource, ModelFileReport, ProcessFacts,
    kv_inference::{self, InferredCtx},
};
use crate::{
    collect::pagemap,
    model::{
        config::{RuntimeConfig, Setting, SettingSource, llama_defaults},
        cpu_backend::CpuBackend,
        discovery::ModelFormat,
        ggml::GgmlType,
        memory::{self, ContextShape, Footprint, KvModel, Placement},
        profile::ModelProfile,
    },
    units::format_bytes,
};

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

/// Predicts the memory of the main model among `files`; `None` when no file was profiled.
/// A context inferred or defaulted is recorded in `config`; what cannot be worked out is
/// explained in `notes`.
pub(super) fn predict(
    llama_program: bool,
    files: &[ModelFileReport],
    config: &mut RuntimeConfig,
    facts: &ProcessFacts,
    cpu_backend: Option<CpuBackend>,
    notes: &mut Vec<String>,
) -> Option<Prediction> {
    let main = MainModel::choose(files)?;
    let mut settings = CacheSettings::resolve(config, llama_program);
    let inferred = infer_from_allocation(&main, facts, &settings);
    let context = resolve_ctx(config, inferred, llama_program, &mut settings, notes);
    record_ctx(config, &context.n_ctx);
    let mut prediction = Prediction::before_memory(&main, &settings, context, cpu_backend);
    predict_memory(&mut prediction, &main, &settings, notes);
    Some(prediction)
}

/// The main model: the largest profiled file, with the weights of all its shards.
struct MainModel<'a> {
    file: &'a ModelFileReport,
    profile: &'a ModelProfile,
    /// Bytes of tensor data of the main file and its other shards.
    weights_bytes: u64,
}

impl<'a> MainModel<'a> {
    fn choose(files: &'a [ModelFileReport]) -> Option<MainModel<'a>> {
        let file = files.iter().find(|f| f.profile.is_some())?;
        let profile = file.profile.as_ref()?;
        let weights_bytes = match file.file.shard {
            Some(_) => files
                .iter()
                .filter(|f| f.file.format == file.file.format && f.file.shard.is_some())
                .filter_map(|f| f.profile.as_ref().map(|p| p.weight_bytes))
                .sum(),
            None => profile.weight_bytes,
        };
        Some(MainModel {
            file,
            profile,
            weights_bytes,
        })
    }
}

/// The settings that shape the KV cache and the buffers: as configured, else the defaults.
struct CacheSettings {
    n_parallel: u64,
    n_gpu_layers: i64,
    n_ubatch: u64,
    /// One KV buffer shared by all sequences.
    unified: bool,
    flash_attn: bool,
    /// Whether flash attention was configured rather than defaulted.
    flash_attn_configured: bool,
    /// The cache types configured, when they were (V defaults to K's).
    configured_k: Option<String>,
    configured_v: Option<String>,
    /// The cache types in effect.
    type_k: String,
    type_v: String,
}

impl CacheSettings {
    fn resolve(config: &RuntimeConfig, llama_program: bool) -> CacheSettings {
        // Flash attention: as configured; llama.cpp's programs default to `auto`, which turns
        // it on wherever the backend supports it (the CPU does); embedders such as
        // llama-cpp-python default to off. It changes the compute buffers, and V's layout.
        let flash_attn = match &config.flash_attn {
            Some(s) => matches!(s.value.as_str(), "on" | "1" | "true" | "auto"),
            None => llama_program,
        };
        let cache_type = |s: &Option<Setting<String>>| s.as_ref().map(|s| s.value.clone());
        let configured_k = cache_type(&config.cache_type_k)
            .or_else(|| cache_type(&config.kv_cache_dtype).filter(|t| t != "auto"));
        let configured_v = cache_type(&config.cache_type_v).or_else(|| configured_k.clone());
        let in_effect = |configured: &Option<String>| {
            configured
                .clone()
                .unwrap_or_else(|| llama_defaults::CACHE_TYPE.to_owned())
        };
        CacheSettings {
            n_parallel: config
                .n_parallel
                .as_ref()
                .map_or(llama_defaults::N_PARALLEL, |s| s.value),
            n_gpu_layers: config.n_gpu_layers.as_ref().map_or(0, |s| s.value),
            n_ubatch: config
                .n_ubatch
                .as_ref()
                .map_or(llama_defaults::N_UBATCH, |s| s.value),
            unified: config.kv_unified.as_ref().is_some_and(|s| s.value),
            flash_attn,
            flash_attn_configured: config.flash_attn.is_some(),
            type_k: in_effect(&configured_k),
            type_v: in_effect(&configured_v),
            configured_k,
            configured_v,
        }
    }

    /// The cache type pairs to try on the KV cache allocation: the configured pair, else
    /// every likely one.
    fn inference_types(&self) -> Vec<(String, String)> {
        match (&self.configured_k, &self.configured_v) {
            (Some(k), Some(v)) => vec![(k.clone(), v.clone())],
            _ => kv_inference::likely_cache_types(),
        }
    }

    /// Takes the cache types the allocation showed. llama.cpp refuses a quantized V cache
    /// without flash attention, so unless configured it is on with one.
    fn adopt_inferred_types(&mut self, inferred: &InferredCtx) {
        self.type_k = inferred.type_k.clone();
        self.type_v = inferred.type_v.clone();
        if !self.flash_attn_configured && !matches!(self.type_v.as_str(), "f16" | "bf16" | "f32") {
            self.flash_attn = true;
        }
    }

    fn shape(&self, n_ctx: u64) -> ContextShape {
        ContextShape {
            n_ctx,
            n_seq: self.n_parallel,
            n_ubatch: self.n_ubatch,
            unified: self.unified,
        }
    }
}

/// The context the KV cache allocation holds; only for GGUF models, whose runtime (ggml)
/// allocates the cache as one block.
fn infer_from_allocation(
    main: &MainModel,
    facts: &ProcessFacts,
    settings: &CacheSettings,
) -> Option<InferredCtx> {
    if main.file.file.format != ModelFormat::Gguf {
        return None;
    }
    let populated = |b: &AnonBlock| {
        pagemap::populated_share(facts.pid, b.address, b.bytes)
            .map(|share| (share * b.bytes as f64) as u64)
    };
    kv_inference::infer_ctx(
        main.profile,
        &facts.anon_blocks,
        &settings.inference_types(),
        settings.n_parallel,
        settings.flash_attn,
        &populated,
    )
}

/// The context in effect, and the allocation it was inferred from when it was.
struct ContextInEffect {
    n_ctx: Option<Setting<u64>>,
    kv_allocation: Option<AnonBlock>,
}

/// n_ctx: read from the configuration, else inferred from the KV allocation (whose cache
/// types are then adopted), else the runtime's default.
fn resolve_ctx(
    config: &RuntimeConfig,
    inferred: Option<InferredCtx>,
    llama_program: bool,
    settings: &mut CacheSettings,
    notes: &mut Vec<String>,
) -> ContextInEffect {
    let read = config
        .n_ctx
        .clone()
        .or_else(|| config.max_model_len.clone());
    let (n_ctx, kv_allocation) = match (read, inferred) {
        (Some(read), inferred) => {
            if let Some(inferred) = inferred {
                note_disagreement(&read, &inferred, notes);
            }
            (Some(read), None)
        }
        (None, Some(inferred)) => {
            settings.adopt_inferred_types(&inferred);
            (Some(inferred_setting(&inferred)), Some(inferred.block))
        }
        (None, None) if llama_program => (Some(llama_default_ctx()), None),
        (None, None) => {
            notes.push(NCTX_UNKNOWN.to_owned());
            (None, None)
        }
    };
    ContextInEffect {
        n_ctx,
        kv_allocation,
    }
}

/// Notes a read context whose cells differ from those the KV allocation holds.
fn note_disagreement(read: &Setting<u64>, inferred: &InferredCtx, notes: &mut Vec<String>) {
    if read.value != 0
        && memory::kv_cells(ContextShape::with_ctx(read.value), None, None).full != inferred.n_ctx
    {
        notes.push(format!(
            "n_ctx {} was read ({}) but the KV allocation suggests {}",
            read.value, read.detail, inferred.n_ctx
        ));
    }
}

/// The context inferred from an allocation, with how it was worked out.
fn inferred_setting(inferred: &InferredCtx) -> Setting<u64> {
    Setting {
        value: inferred.n_ctx,
        source: SettingSource::Inferred,
        detail: format!(
            "{} anonymous block of {} at {:#x} = {} cells x {} per cell ({}/{} cache)",
            block_source_name(inferred.block.source),
            format_bytes(inferred.block.bytes),
            inferred.block.address,
            inferred.n_ctx,
            format_bytes(inferred.per_cell),
            inferred.type_k,
            inferred.type_v
        ),
    }
}

fn llama_default_ctx() -> Setting<u64> {
    Setting {
        value: 0,
        source: SettingSource::Default,
        detail: "llama.cpp's default -c 0: the trained context".to_owned(),
    }
}

fn block_source_name(source: BlockSource) -> &'static str {
    match source {
        BlockSource::ProbeMmap => "mmap'd",
        BlockSource::ProbeBrk => "heap (brk)",
        BlockSource::ProbeMremap => "mremap'd",
        BlockSource::ProcMaps => "/proc/<pid>/maps",
    }
}

/// Records an inferred or defaulted context in the configuration, where none was read.
fn record_ctx(config: &mut RuntimeConfig, n_ctx: &Option<Setting<u64>>) {
    if let Some(setting) = n_ctx
        && config.n_ctx.is_none()
        && matches!(
            setting.source,
            SettingSource::Inferred | SettingSource::Default
        )
    {
        config.n_ctx = Some(setting.clone());
    }
}

impl Prediction {
    /// The prediction's settings, its memory figures still unknown.
    fn before_memory(
        main: &MainModel,
        settings: &CacheSettings,
        context: ContextInEffect,
        cpu_backend: Option<CpuBackend>,
    ) -> Prediction {
        Prediction {
            model_file: main.file.file.path.clone(),
            n_ctx: context.n_ctx,
            n_ctx_train: main.profile.n_ctx_train,
            cache_type_k: settings.type_k.clone(),
            cache_type_v: settings.type_v.clone(),
            n_parallel: settings.n_parallel,
            n_gpu_layers: settings.n_gpu_layers,
            flash_attn: settings.flash_attn,
            weights_bytes: main.weights_bytes,
            kv_bytes_per_token: 0,
            kv_bytes_now: None,
            kv_bytes_at_max_ctx: None,
            peak_ram_bytes: None,
            peak_vram_bytes: None,
            kv_allocation: context.kv_allocation,
            cpu_backend,
            footprint: None,
        }
    }
}

/// Fills in the KV cache and, when the context is known, the footprint; the figures stay
/// unknown, with a note, when the KV cache cannot be modelled.
fn predict_memory(
    prediction: &mut Prediction,
    main: &MainModel,
    settings: &CacheSettings,
    notes: &mut Vec<String>,
) {
    let Some((kv, type_k, type_v)) = kv_model(main.profile, settings, notes) else {
        return;
    };
    prediction.kv_bytes_per_token = kv.bytes_per_token();
    prediction.kv_bytes_at_max_ctx = main.profile.n_ctx_train.map(|train| {
        kv.bytes(memory::kv_cells(
            settings.shape(train),
            Some(train),
            kv.sliding_window,
        ))
    });
    let Some(n_ctx) = &prediction.n_ctx else {
        return;
    };
    let placement = Placement {
        n_gpu_layers: settings.n_gpu_layers,
        shape: settings.shape(n_ctx.value),
        type_k,
        type_v,
        flash_attn: settings.flash_attn,
        cpu: prediction.cpu_backend.as_ref().map(|b| b.features),
    };
    let footprint = footprint_with_shards(main, &kv, &placement);
    prediction.kv_bytes_now = Some(footprint.kv_gpu_bytes + footprint.kv_cpu_bytes);
    prediction.peak_ram_bytes = Some(footprint.ram_bytes);
    prediction.peak_vram_bytes = Some(footprint.vram_bytes);
    prediction.footprint = Some(footprint);
}

/// The KV cache of the cache types in effect, with their ggml types; `None`, with a note,
/// when a type is unknown or the model lacks what the cache's size needs.
fn kv_model(
    profile: &ModelProfile,
    settings: &CacheSettings,
    notes: &mut Vec<String>,
) -> Option<(KvModel, GgmlType, GgmlType)> {
    let (type_k, type_v) = (&settings.type_k, &settings.type_v);
    let (Some(tk), Some(tv)) = (GgmlType::from_name(type_k), GgmlType::from_name(type_v)) else {
        notes.push(format!("unknown KV cache type {type_k}/{type_v}"));
        return None;
    };
    let kv = KvModel::new(profile, tk, tv, settings.flash_attn)
        .map_err(|err| notes.push(format!("no KV prediction: {err}")))
        .ok()?;
    if profile.kv_lora_rank.is_some() {
        notes.push(
            "multi-head latent attention: KV sized as llama.cpp caches it (compressed rows, no V)"
                .to_owned(),
        );
    }
    Some((kv, tk, tv))
}

/// The main file's footprint, with the weights of its other shards on the CPU side.
fn footprint_with_shards(main: &MainModel, kv: &KvModel, placement: &Placement) -> Footprint {
    let mut footprint = memory::footprint(main.profile, kv, placement);
    let extra = main.weights_bytes.saturating_sub(main.profile.weight_bytes);
    footprint.weights_cpu_bytes += extra;
    footprint.ram_bytes += extra;
    footprint
}

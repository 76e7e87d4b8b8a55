//! `infermem plan`: where to put a model (GPU layers) and how large a context it can have,
//! given the RAM and VRAM there is, under one of four strategies.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::gpu::nvml::{Nvml, NvmlSnapshot};

use super::{
    cpu_backend::CpuBackend,
    discovery::ModelFormat,
    ggml::GgmlType,
    memory::{self, ContextShape, Footprint, KvModel, Placement},
    profile::{self, ModelProfile},
};

/// What the plan optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// As many layers on the GPU as fit with the requested context; all memory may be used.
    MaxPerformance,
    /// Everything on the GPU; the context shrinks until it fits in VRAM.
    FitVram,
    /// As many GPU layers as fit while keeping 10 % of RAM and VRAM free for the rest of the
    /// machine.
    Balanced,
    /// The placement that allows the longest context.
    MaxContext,
}

/// What to plan for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRequest {
    pub model: PathBuf,
    /// Requested context; `None` = the trained context.
    pub ctx: Option<u64>,
    pub parallel: u64,
    pub cache_type: GgmlType,
    pub flash_attn: bool,
    pub ram_bytes: u64,
    pub vram_bytes: u64,
    pub strategy: Strategy,
    /// The CPU backend assumed to run a GGUF model (see [`crate::model::cpu_backend`]); `None`:
    /// no extra weight buffers are predicted.
    pub cpu_backend: Option<CpuBackend>,
}

/// The plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    pub model: PathBuf,
    pub format: ModelFormat,
    pub profile: ModelProfile,
    pub strategy: Strategy,
    pub ram_budget_bytes: u64,
    pub vram_budget_bytes: u64,
    pub cache_type: String,
    pub flash_attn: bool,
    pub parallel: u64,
    /// The CPU backend assumed, which decides the repacked weights; null when not modelled.
    pub cpu_backend: Option<CpuBackend>,
    pub kv_bytes_per_token: u64,
    /// The context asked for (the trained context when none was).
    pub requested_ctx: u64,
    /// Whether the advice below fits the budgets.
    pub fits: bool,
    /// Advice: `-ngl` (layers on the GPU; `n_layer + 1` includes the output head).
    pub n_gpu_layers: u32,
    /// Advice: the context to run with.
    pub n_ctx: u64,
    /// The largest context that fits with that placement.
    pub max_ctx: Option<u64>,
    /// Expected memory at the advised placement and context.
    pub footprint: Footprint,
    pub notes: Vec<String>,
}

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}: not a model file infermem can read (GGUF or safetensors)")]
    Unrecognised(PathBuf),
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
}

/// Share of the budgets the balanced strategy leaves free.
const BALANCED_HEADROOM: f64 = 0.10;

/// Profiles the model file, opened once and safely (a FIFO, a device or a file swapped in
/// after the check is never read), and plans its placement.
pub fn plan(request: &PlanRequest) -> Result<PlanReport, PlanError> {
    let path = &request.model;
    let (format, profile) = profile::profile_path(path)
        .map_err(|message| PlanError::Parse {
            path: path.clone(),
            message,
        })?
        .ok_or_else(|| PlanError::Unrecognised(path.clone()))?;
    plan_profile(request, format, profile)
}

/// Plans the placement of an already profiled model.
pub fn plan_profile(
    request: &PlanRequest,
    format: ModelFormat,
    profile: ModelProfile,
) -> Result<PlanReport, PlanError> {
    let model_error = |message: String| PlanError::Model {
        path: request.model.clone(),
        message,
    };
    let kv = KvModel::new(
        &profile,
        request.cache_type,
        request.cache_type,
        request.flash_attn,
    )
    .map_err(|e| model_error(e.to_string()))?;
    let mut notes = Vec::new();
    if !request.flash_attn && !matches!(request.cache_type.name(), "F16" | "F32" | "BF16") {
        notes.push("llama.cpp needs flash attention for a quantized V cache".to_owned());
    }
    let n_layer = profile.n_layer.unwrap_or(0);
    let requested_ctx = request.ctx.or(profile.n_ctx_train).unwrap_or(4096);
    if let Some(train) = profile.n_ctx_train
        && requested_ctx > train
    {
        notes.push(format!("the requested context {requested_ctx} is beyond the {train} tokens the model was trained for"));
    }
    let cpu_backend = request
        .cpu_backend
        .clone()
        .filter(|_| format == ModelFormat::Gguf);
    if let Some(backend) = &cpu_backend {
        notes.push(format!("assumed: {}", backend.detail));
    }
    let shape = ContextShape {
        n_ctx: requested_ctx,
        n_seq: request.parallel.max(1),
        n_ubatch: 512,
        unified: false,
    };
    let placement = |ngl: u32, n_ctx: u64| Placement {
        n_gpu_layers: i64::from(ngl),
        shape: ContextShape { n_ctx, ..shape },
        type_k: request.cache_type,
        type_v: request.cache_type,
        flash_attn: request.flash_attn,
        cpu: cpu_backend.as_ref().map(|b| b.features),
    };
    let (ram, vram) = match request.strategy {
        Strategy::Balanced => (
            (request.ram_bytes as f64 * (1.0 - BALANCED_HEADROOM)) as u64,
            (request.vram_bytes as f64 * (1.0 - BALANCED_HEADROOM)) as u64,
        ),
        _ => (request.ram_bytes, request.vram_bytes),
    };
    let fits = |f: &Footprint| f.ram_bytes <= ram && f.vram_bytes <= vram;
    let all_layers = n_layer + 1;
    let ctx_limit = requested_ctx.max(profile.n_ctx_train.unwrap_or(0));
    let largest = |ngl: u32, limit: u64| {
        memory::largest_ctx(&profile, &kv, &placement(ngl, limit), ram, vram, limit)
    };

    let (ngl, n_ctx) = match request.strategy {
        Strategy::MaxPerformance | Strategy::Balanced => {
            // The most GPU layers with which the requested context fits.
            let ngl = (0..=all_layers)
                .rev()
                .find(|&ngl| {
                    fits(&memory::footprint(
                        &profile,
                        &kv,
                        &placement(ngl, requested_ctx),
                    ))
                })
                .unwrap_or(0);
            (ngl, requested_ctx)
        }
        Strategy::FitVram => {
            let ctx = largest(all_layers, requested_ctx);
            if ctx.is_none() {
                notes.push(
                    "the weights do not fit in VRAM even with a 256-token context".to_owned(),
                );
            }
            (all_layers, ctx.unwrap_or(memory::KV_PAD))
        }
        Strategy::MaxContext => {
            // The placement with the longest context; more GPU layers break ties.
            let best = (0..=all_layers)
                .filter_map(|ngl| largest(ngl, ctx_limit).map(|ctx| (ctx, ngl)))
                .max();
            match best {
                Some((ctx, ngl)) => (ngl, ctx),
                None => (0, memory::KV_PAD),
            }
        }
    };
    let footprint = memory::footprint(&profile, &kv, &placement(ngl, n_ctx));
    let max_ctx = largest(ngl, ctx_limit);
    let fits_now = fits(&footprint);
    if !fits_now {
        notes.push(format!(
            "does not fit: needs {} of RAM and {} of VRAM",
            crate::units::format_bytes(footprint.ram_bytes),
            crate::units::format_bytes(footprint.vram_bytes)
        ));
    }
    Ok(PlanReport {
        model: request.model.clone(),
        format,
        kv_bytes_per_token: kv.bytes_per_token(),
        profile,
        strategy: request.strategy,
        ram_budget_bytes: request.ram_bytes,
        vram_budget_bytes: request.vram_bytes,
        cache_type: request.cache_type.name().to_ascii_lowercase(),
        flash_attn: request.flash_attn,
        parallel: shape.n_seq,
        cpu_backend,
        requested_ctx,
        fits: fits_now,
        n_gpu_layers: ngl,
        n_ctx: footprint.n_ctx,
        max_ctx,
        footprint,
        notes,
    })
}

/// The RAM a model could use now: `MemAvailable` from /proc/meminfo.
pub fn available_ram() -> Result<u64, String> {
    use procfs::Current as _;
    let meminfo =
        procfs::Meminfo::current().map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
    meminfo
        .mem_available
        .ok_or_else(|| "/proc/meminfo has no MemAvailable".to_owned())
}

/// The free memory of the NVIDIA GPU with the most free memory, from NVML, and which GPU
/// that is; an error says why there is no figure (no NVIDIA GPU or driver, most often).
pub fn available_vram() -> Result<(u64, String), String> {
    let nvml = Nvml::open().map_err(|e| e.to_string())?;
    let snapshot = nvml.snapshot().map_err(|e| e.to_string())?;
    vram_budget(&snapshot)
}

/// The budget one NVML reading gives: the free memory of the device with the most.
fn vram_budget(snapshot: &NvmlSnapshot) -> Result<(u64, String), String> {
    let unreadable: Vec<String> = snapshot
        .device_errors
        .iter()
        .map(|(index, e)| format!("NVML device {index}: {e}"))
        .collect();
    let Some(best) = snapshot.most_free() else {
        return Err(if unreadable.is_empty() {
            "NVML lists no GPU".to_owned()
        } else {
            unreadable.join("; ")
        });
    };
    let mut source = format!("GPU {} ({})", best.key(), best.name);
    if snapshot.devices.len() > 1 {
        source += &format!(", the most free of {} GPUs", snapshot.devices.len());
    }
    if !unreadable.is_empty() {
        source += &format!("; {}", unreadable.join("; "));
    }
    Ok((best.free_bytes, source))
}

#[cfg(test)]
mod tests;

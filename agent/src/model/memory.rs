//! The memory model: how many bytes a model needs for its KV cache, weights and compute
//! buffers in llama.cpp, and where (RAM or VRAM) for a given number of GPU layers.
//!
//! KV cache (llama.cpp `llama_kv_cache`): every layer with KV heads stores, per cell,
//! `ggml_row_size(type_k, head_dim_k × n_head_kv(layer))` bytes of K and the same for V.
//! The cache has `n_ctx` cells (padded, see [`kv_cells`]) shared by all sequences; layers with
//! sliding-window attention only keep `min(n_ctx, n_swa × n_seq + n_ubatch)` cells (padded).
//! K and V of all layers live in one backend buffer per device, allocated and cleared when
//! the context is created: one anonymous allocation on the CPU.
//!
//! Not modelled: recurrent/SSM state (Mamba, RWKV, hybrid models), multi-head latent
//! attention's compressed cache (DeepSeek-V2/V3 are sized as if uncompressed and flagged),
//! cross-attention caches (encoder-decoder models), vision/audio projector files loaded beside
//! the model, and backend-specific padding on GPUs. Compute buffers are an estimate.

use serde::{Deserialize, Serialize};

use super::{
    cpu_backend::{self, CpuFeatures},
    ggml::GgmlType,
    profile::{self, ModelProfile},
};

/// llama.cpp pads the context to a multiple of this many cells.
pub const KV_PAD: u64 = 256;

/// KV bytes per cell of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerKv {
    pub k_bytes: u64,
    pub v_bytes: u64,
    /// Whether the layer uses sliding-window attention (its cache is capped).
    pub sliding: bool,
}

impl LayerKv {
    /// K and V bytes of one cell.
    pub fn per_cell(&self) -> u64 {
        self.k_bytes.saturating_add(self.v_bytes)
    }
}

/// The KV cache layout of a model for given cache types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvModel {
    pub layers: Vec<LayerKv>,
    pub sliding_window: Option<u64>,
    pub type_k: String,
    pub type_v: String,
}

/// Cells of the two kinds of KV cache llama.cpp allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCells {
    /// Cells of full-attention layers (the padded context).
    pub full: u64,
    /// Cells of sliding-window layers.
    pub sliding: u64,
}

/// Why a memory prediction cannot be made from a profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("the model file does not give {0}")]
    Missing(&'static str),
    #[error("KV row of {elements} elements is not a whole number of {dtype} blocks")]
    Row { elements: u64, dtype: &'static str },
}

impl KvModel {
    /// The KV layout of `profile` with cache element types `type_k` and `type_v`. Without
    /// flash attention llama.cpp stores V transposed, every layer as wide as the widest.
    /// Multi-head latent attention (a `kv_lora_rank`) caches one compressed K row per token
    /// and no V.
    pub fn new(
        profile: &ModelProfile,
        type_k: GgmlType,
        type_v: GgmlType,
        flash_attn: bool,
    ) -> Result<KvModel, ModelError> {
        let n_layer = profile
            .n_layer
            .ok_or(ModelError::Missing("the layer count"))? as usize;
        if profile.n_head_kv.len() != n_layer {
            return Err(ModelError::Missing("the KV head count of every layer"));
        }
        let row = |dtype: GgmlType, elements: u64| {
            dtype.row_bytes(elements).ok_or(ModelError::Row {
                elements,
                dtype: dtype.name(),
            })
        };
        let sliding = |il: usize| profile.swa_layers.contains(&(il as u32));
        let layers = if let Some(rank) = profile.kv_lora_rank.filter(|&r| r > 0) {
            let k_bytes = row(
                type_k,
                u64::from(rank).saturating_add(u64::from(profile.rope_dim.unwrap_or(0))),
            )?;
            (0..n_layer)
                .map(|il| {
                    Ok(LayerKv {
                        k_bytes,
                        v_bytes: 0,
                        sliding: sliding(il),
                    })
                })
                .collect::<Result<Vec<_>, ModelError>>()?
        } else {
            let head_k = u64::from(
                profile
                    .head_dim_k
                    .ok_or(ModelError::Missing("the key head size"))?,
            );
            let head_v = u64::from(
                profile
                    .head_dim_v
                    .ok_or(ModelError::Missing("the value head size"))?,
            );
            let widest_v = profile
                .n_head_kv
                .iter()
                .map(|&h| u64::from(h).saturating_mul(head_v))
                .max()
                .unwrap_or(0);
            profile
                .n_head_kv
                .iter()
                .enumerate()
                .map(|(il, &kv_heads)| {
                    let kv_heads = u64::from(kv_heads);
                    let v_width = if flash_attn || kv_heads == 0 {
                        head_v.saturating_mul(kv_heads)
                    } else {
                        widest_v
                    };
                    Ok(LayerKv {
                        k_bytes: row(type_k, head_k.saturating_mul(kv_heads))?,
                        v_bytes: row(type_v, v_width)?,
                        sliding: sliding(il),
                    })
                })
                .collect::<Result<Vec<_>, ModelError>>()?
        };
        Ok(KvModel {
            layers,
            sliding_window: profile.sliding_window.map(u64::from),
            type_k: type_k.name().to_ascii_lowercase(),
            type_v: type_v.name().to_ascii_lowercase(),
        })
    }

    /// Bytes one more token costs in every layer (sliding layers included, until their window
    /// is full).
    pub fn bytes_per_token(&self) -> u64 {
        self.layers
            .iter()
            .fold(0u64, |acc, l| acc.saturating_add(l.per_cell()))
    }

    /// Bytes per cell of the full-attention layers only.
    pub fn full_bytes_per_cell(&self) -> u64 {
        self.layers
            .iter()
            .filter(|l| !l.sliding)
            .fold(0u64, |acc, l| acc.saturating_add(l.per_cell()))
    }

    /// Bytes per cell of the sliding-window layers only.
    pub fn sliding_bytes_per_cell(&self) -> u64 {
        self.layers
            .iter()
            .filter(|l| l.sliding)
            .fold(0u64, |acc, l| acc.saturating_add(l.per_cell()))
    }

    /// KV bytes of a cache with `cells`.
    pub fn bytes(&self, cells: KvCells) -> u64 {
        self.full_bytes_per_cell()
            .saturating_mul(cells.full)
            .saturating_add(self.sliding_bytes_per_cell().saturating_mul(cells.sliding))
    }

    /// KV bytes of the layers placed on the GPU (the last `gpu_layers` of the model), and of
    /// those on the CPU.
    pub fn split(&self, cells: KvCells, gpu_layers: u32) -> (u64, u64) {
        let first_gpu = self.layers.len().saturating_sub(gpu_layers as usize);
        let mut gpu = 0u64;
        let mut cpu = 0u64;
        for (il, layer) in self.layers.iter().enumerate() {
            let per_cell = layer.per_cell();
            let bytes = per_cell.saturating_mul(if layer.sliding {
                cells.sliding
            } else {
                cells.full
            });
            if il >= first_gpu {
                gpu = gpu.saturating_add(bytes);
            } else {
                cpu = cpu.saturating_add(bytes);
            }
        }
        (gpu, cpu)
    }
}

/// How a llama.cpp context is shaped (llama_context_params).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextShape {
    /// Requested context in tokens; 0 = the trained context.
    pub n_ctx: u64,
    /// Parallel sequences (`-np`, n_seq_max).
    pub n_seq: u64,
    pub n_ubatch: u64,
    /// One cache shared by all sequences (`--kv-unified`) instead of one stream per sequence.
    pub unified: bool,
}

impl ContextShape {
    /// llama.cpp's defaults with a context of `n_ctx`.
    pub fn with_ctx(n_ctx: u64) -> ContextShape {
        ContextShape {
            n_ctx,
            n_seq: 1,
            n_ubatch: 512,
            unified: false,
        }
    }
}

/// The cells llama.cpp allocates for a context (llama_context and llama_kv_cache_iswa): the
/// context is padded to 256 cells, split into one stream per sequence unless unified (each
/// stream padded again), and sliding-window layers keep `n_swa (× n_seq when unified) +
/// n_ubatch` cells per stream, padded to 256, at most the full size.
pub fn kv_cells(
    shape: ContextShape,
    n_ctx_train: Option<u64>,
    sliding_window: Option<u64>,
) -> KvCells {
    let requested = if shape.n_ctx == 0 {
        n_ctx_train.unwrap_or(4096)
    } else {
        shape.n_ctx
    };
    let n_seq = shape.n_seq.max(1);
    let n_ctx = pad(requested.max(1), KV_PAD);
    let (per_stream, streams) = if shape.unified {
        (n_ctx, 1)
    } else {
        (pad(n_ctx / n_seq, KV_PAD).max(KV_PAD), n_seq)
    };
    let sliding_per_stream = match sliding_window {
        Some(window) if window > 0 => {
            let window_cells = window
                .saturating_mul(if shape.unified { n_seq } else { 1 })
                .saturating_add(shape.n_ubatch);
            pad(per_stream.min(window_cells), KV_PAD)
        }
        _ => per_stream,
    };
    KvCells {
        full: per_stream.saturating_mul(streams),
        sliding: sliding_per_stream.saturating_mul(streams),
    }
}

fn pad(value: u64, to: u64) -> u64 {
    value.div_ceil(to).saturating_mul(to)
}

/// Where the weights go for a given `n_gpu_layers` (llama.cpp: the last `n` repeating layers
/// go to the GPU; the output head too once `n` exceeds the layer count; the token embeddings
/// stay on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightSplit {
    /// Repeating layers on the GPU.
    pub gpu_layers: u32,
    /// Whether the output head is on the GPU too.
    pub output_on_gpu: bool,
    pub gpu_bytes: u64,
    pub cpu_bytes: u64,
}

/// Splits the weights of `profile` for `n_gpu_layers` (negative = all).
pub fn weight_split(profile: &ModelProfile, n_gpu_layers: i64) -> WeightSplit {
    let n_layer = profile.layer_bytes.len() as i64;
    let requested = if n_gpu_layers < 0 {
        n_layer + 1
    } else {
        n_gpu_layers
    };
    let gpu_layers = requested.clamp(0, n_layer) as usize;
    let first_gpu = profile.layer_bytes.len() - gpu_layers;
    let mut gpu: u64 = profile.layer_bytes[first_gpu..]
        .iter()
        .fold(0u64, |acc, b| acc.saturating_add(*b));
    if requested > n_layer {
        gpu = gpu.saturating_add(profile.output_bytes);
    }
    WeightSplit {
        gpu_layers: gpu_layers as u32,
        output_on_gpu: requested > n_layer,
        gpu_bytes: gpu,
        cpu_bytes: profile.weight_bytes.saturating_sub(gpu),
    }
}

/// Estimated compute (scratch) buffer of one device: the largest intermediate tensors of one
/// micro-batch. Without flash attention the attention scores (`n_ctx × n_ubatch × n_head`
/// floats) dominate; with it, the logits (`n_vocab × n_ubatch`) or the FFN activations do.
pub fn compute_bytes(profile: &ModelProfile, n_ctx: u64, n_ubatch: u64, flash_attn: bool) -> u64 {
    const F32: u64 = 4;
    let n_embd = profile.n_embd.unwrap_or(0);
    let n_head = u64::from(profile.n_head.unwrap_or(0));
    let n_vocab = profile.n_vocab.unwrap_or(0);
    let n_ff = profile.n_ff.unwrap_or(n_embd.saturating_mul(4));
    let scores = if flash_attn {
        0
    } else {
        n_ctx
            .saturating_mul(n_ubatch)
            .saturating_mul(n_head)
            .saturating_mul(F32)
    };
    let logits = n_vocab.saturating_mul(n_ubatch).saturating_mul(F32);
    let ffn = n_ff.saturating_mul(n_ubatch).saturating_mul(2 * F32);
    let residual = n_embd.saturating_mul(n_ubatch).saturating_mul(4 * F32);
    let mask = n_ctx.saturating_mul(n_ubatch).saturating_mul(F32);
    scores
        .max(logits)
        .max(ffn)
        .saturating_add(residual)
        .saturating_add(mask)
}

/// How a model is run: the knobs that decide its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Layers on the GPU (llama.cpp `-ngl`; negative = all, output head included).
    pub n_gpu_layers: i64,
    pub shape: ContextShape,
    pub type_k: GgmlType,
    pub type_v: GgmlType,
    pub flash_attn: bool,
    /// The instruction sets of the ggml CPU backend that runs it; `None` for runtimes other
    /// than ggml's, or where its extra weight buffers are not modelled.
    pub cpu: Option<CpuFeatures>,
}

/// Predicted memory of a model under a [`Placement`], in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// The context in effect (padded), all sequences together.
    pub n_ctx: u64,
    pub kv_cells: KvCells,
    pub gpu_layers: u32,
    pub weights_gpu_bytes: u64,
    pub weights_cpu_bytes: u64,
    /// Anonymous copies of CPU weights in the CPU backend's extra buffers (AMX, CPU_REPACK),
    /// held besides the mapped file; see [`cpu_backend`].
    pub weights_cpu_repacked_bytes: u64,
    pub kv_gpu_bytes: u64,
    pub kv_cpu_bytes: u64,
    /// Estimated compute buffers (on the GPU when any layer is there, plus a CPU one).
    pub compute_gpu_bytes: u64,
    pub compute_cpu_bytes: u64,
    /// Everything in RAM (mapped weights count: they must stay resident to run fast).
    pub ram_bytes: u64,
    pub vram_bytes: u64,
}

/// Predicts the memory of `profile` run as `placement`.
pub fn footprint(profile: &ModelProfile, kv: &KvModel, placement: &Placement) -> Footprint {
    let cells = kv_cells(placement.shape, profile.n_ctx_train, kv.sliding_window);
    let weights = weight_split(profile, placement.n_gpu_layers);
    let repacked = placement
        .cpu
        .map_or(0, |cpu| repacked_bytes(profile, cpu, &weights));
    let (kv_gpu, kv_cpu) = kv.split(cells, weights.gpu_layers);
    let ubatch = placement.shape.n_ubatch.max(1);
    let compute = compute_bytes(profile, cells.full, ubatch, placement.flash_attn);
    let (compute_gpu, compute_cpu) = if weights.gpu_layers > 0 {
        // The CPU keeps a smaller buffer for what stays there (inputs, embeddings).
        (
            compute,
            profile
                .n_embd
                .unwrap_or(0)
                .saturating_mul(ubatch)
                .saturating_mul(8),
        )
    } else {
        (0, compute)
    };
    Footprint {
        n_ctx: cells.full,
        kv_cells: cells,
        gpu_layers: weights.gpu_layers,
        weights_gpu_bytes: weights.gpu_bytes,
        weights_cpu_bytes: weights.cpu_bytes,
        weights_cpu_repacked_bytes: repacked,
        kv_gpu_bytes: kv_gpu,
        kv_cpu_bytes: kv_cpu,
        compute_gpu_bytes: compute_gpu,
        compute_cpu_bytes: compute_cpu,
        ram_bytes: weights
            .cpu_bytes
            .saturating_add(repacked)
            .saturating_add(kv_cpu)
            .saturating_add(compute_cpu),
        vram_bytes: weights
            .gpu_bytes
            .saturating_add(kv_gpu)
            .saturating_add(compute_gpu),
    }
}

/// Bytes of the weights `split` leaves on the CPU that the backend with `cpu` features
/// copies into its extra buffers. A model without an output head reuses its token embeddings
/// as one (llama.cpp duplicates the tensor), so those may be copied too.
pub fn repacked_bytes(profile: &ModelProfile, cpu: CpuFeatures, split: &WeightSplit) -> u64 {
    let first_gpu_layer = profile
        .layer_bytes
        .len()
        .saturating_sub(split.gpu_layers as usize);
    let tied_output = !profile.tensors.iter().any(|t| t.name == "output.weight");
    let on_cpu = |name: &str| match profile::layer_of(name) {
        Some(layer) => layer < first_gpu_layer,
        None => !split.output_on_gpu,
    };
    profile
        .tensors
        .iter()
        .filter(|t| on_cpu(&t.name))
        .filter_map(|t| {
            let usage = if tied_output && t.name == "token_embd.weight" {
                cpu_backend::WeightUse::MulMat
            } else {
                cpu_backend::weight_use(&t.name, t.shape.len())
            };
            let dtype = GgmlType::from_name(&t.dtype)?;
            cpu_backend::extra_buffer(cpu, dtype, &t.shape, usage).map(|(_, bytes)| bytes)
        })
        .fold(0u64, u64::saturating_add)
}

/// The largest context (a multiple of 256, at most `limit`) whose footprint under `placement`
/// fits in `ram` and `vram` bytes; `None` if not even 256 tokens fit.
pub fn largest_ctx(
    profile: &ModelProfile,
    kv: &KvModel,
    placement: &Placement,
    ram: u64,
    vram: u64,
    limit: u64,
) -> Option<u64> {
    let fits = |n_ctx: u64| {
        let shape = ContextShape {
            n_ctx,
            ..placement.shape
        };
        let f = footprint(
            profile,
            kv,
            &Placement {
                shape,
                ..*placement
            },
        );
        f.ram_bytes <= ram && f.vram_bytes <= vram
    };
    let (mut lo, mut hi) = (1u64, (limit / KV_PAD).max(1));
    if !fits(KV_PAD) {
        return None;
    }
    // Footprints grow with the context: binary search on units of 256 tokens.
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid * KV_PAD) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo * KV_PAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers and an output head of 4096 x 4096 Q4_0 matrices (9 MiB each) plus a Q4_0
    /// token embedding: what AVX2 repacks depends on where each tensor is.
    #[test]
    fn repacking_counts_only_the_matrices_left_on_the_cpu() {
        let q4 = |name: &str| profile::TensorSummary {
            name: name.to_owned(),
            dtype: "Q4_0".to_owned(),
            shape: vec![4096, 4096],
            bytes: 4096 / 32 * 18 * 4096,
        };
        let matrix = 4096 / 32 * 18 * 4096;
        let p = ModelProfile {
            layer_bytes: vec![matrix, matrix],
            tensors: vec![
                q4("token_embd.weight"),
                q4("blk.0.attn_q.weight"),
                q4("blk.1.attn_q.weight"),
                q4("output.weight"),
            ],
            ..Default::default()
        };
        let avx2 = CpuFeatures {
            avx2: true,
            avx512: false,
            amx: false,
        };
        let repacked = |ngl| repacked_bytes(&p, avx2, &weight_split(&p, ngl));
        // Embeddings are row lookups, never repacked.
        assert_eq!(repacked(0), 3 * matrix);
        assert_eq!(repacked(1), 2 * matrix, "layer 1 on the GPU");
        assert_eq!(repacked(2), matrix, "only the output head left");
        assert_eq!(repacked(3), 0, "the output head on the GPU too");
        assert_eq!(
            repacked_bytes(&p, CpuFeatures::default(), &weight_split(&p, 0)),
            0
        );
    }

    fn profile(n_head_kv: Vec<u32>) -> ModelProfile {
        ModelProfile {
            n_layer: Some(n_head_kv.len() as u32),
            n_head_kv,
            head_dim_k: Some(128),
            head_dim_v: Some(128),
            ..Default::default()
        }
    }

    #[test]
    fn contexts_are_padded_and_split_into_streams() {
        let cells = |n_ctx, n_seq, unified, window| {
            let shape = ContextShape {
                n_ctx,
                n_seq,
                n_ubatch: 512,
                unified,
            };
            kv_cells(shape, Some(8192), window)
        };
        assert_eq!(
            cells(1100, 1, false, None),
            KvCells {
                full: 1280,
                sliding: 1280
            }
        );
        assert_eq!(
            cells(0, 1, false, None).full,
            8192,
            "0 = the trained context"
        );
        // 4 streams of pad(4096 / 4) cells; unified: one stream of 4096.
        assert_eq!(cells(4096, 4, false, None).full, 4096);
        assert_eq!(
            cells(1000, 3, false, None).full,
            3 * 512,
            "each stream padded"
        );
        // Sliding layers: min(n_ctx_seq, n_swa + n_ubatch) per stream, padded.
        assert_eq!(cells(32768, 1, false, Some(4096)).sliding, 4608);
        assert_eq!(cells(32768, 2, false, Some(4096)).sliding, 2 * 4608);
        assert_eq!(cells(32768, 2, true, Some(4096)).sliding, 8704);
        assert_eq!(
            cells(1024, 1, false, Some(4096)).sliding,
            1024,
            "never more than the full cache"
        );
    }

    #[test]
    fn per_layer_heads_sliding_layers_and_latent_attention() {
        let mut p = profile(vec![8, 8, 0, 4]);
        p.swa_layers = vec![0, 1];
        p.sliding_window = Some(1024);
        let f16 = GgmlType::F16;
        let fa = KvModel::new(&p, f16, f16, true).unwrap();
        // K and V of 8 heads × 128 × 2 bytes, none for the layer without KV heads.
        assert_eq!(
            fa.layers.iter().map(LayerKv::per_cell).collect::<Vec<_>>(),
            [4096, 4096, 0, 2048]
        );
        assert_eq!(
            (fa.full_bytes_per_cell(), fa.sliding_bytes_per_cell()),
            (2048, 8192)
        );
        let cells = KvCells {
            full: 4096,
            sliding: 1536,
        };
        assert_eq!(fa.bytes(cells), 2048 * 4096 + 8192 * 1536);
        // Without flash attention V is as wide as the widest layer.
        let no_fa = KvModel::new(&p, f16, f16, false).unwrap();
        assert_eq!(no_fa.layers[3].v_bytes, 8 * 128 * 2);
        // The last 2 layers on the GPU.
        assert_eq!(fa.split(cells, 2), (2048 * 4096, 8192 * 1536));

        let mut mla = profile(vec![128; 2]);
        mla.kv_lora_rank = Some(512);
        mla.rope_dim = Some(64);
        let kv = KvModel::new(&mla, f16, f16, true).unwrap();
        assert_eq!(
            kv.bytes_per_token(),
            2 * 576 * 2,
            "one compressed row per layer, no V"
        );
        let q8 = GgmlType::from_name("q8_0").unwrap();
        assert!(KvModel::new(&profile(vec![1]), q8, q8, true).is_ok());
        let mut odd = profile(vec![1]);
        odd.head_dim_k = Some(100);
        assert!(matches!(
            KvModel::new(&odd, q8, f16, true),
            Err(ModelError::Row { .. })
        ));
    }

    #[test]
    fn weights_split_by_gpu_layers() {
        let p = ModelProfile {
            layer_bytes: vec![10, 20, 30],
            output_bytes: 5,
            token_embd_bytes: 7,
            weight_bytes: 72,
            ..Default::default()
        };
        assert_eq!(
            weight_split(&p, 0),
            WeightSplit {
                gpu_layers: 0,
                output_on_gpu: false,
                gpu_bytes: 0,
                cpu_bytes: 72
            }
        );
        assert_eq!(
            weight_split(&p, 2),
            WeightSplit {
                gpu_layers: 2,
                output_on_gpu: false,
                gpu_bytes: 50,
                cpu_bytes: 22
            }
        );
        assert_eq!(
            weight_split(&p, 3).gpu_bytes,
            60,
            "the output head stays on the CPU"
        );
        assert!(!weight_split(&p, 3).output_on_gpu);
        assert_eq!(weight_split(&p, 4).gpu_bytes, 65);
        assert!(weight_split(&p, 4).output_on_gpu);
        assert_eq!(weight_split(&p, -1).gpu_bytes, 65, "-1 = all");
        assert!(weight_split(&p, -1).output_on_gpu);
    }
}

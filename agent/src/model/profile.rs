//! What a model file says about the model: architecture, size, attention shape and how its
//! bytes are spent. Built from a GGUF header, or from a safetensors header plus the Hugging
//! Face `config.json` beside it.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

use super::{
    discovery::{self, ModelFormat},
    gguf::{Gguf, Value},
    open::{self, OpenError, OpenedFile},
    safetensors::SafetensorsHeader,
};

/// Largest `config.json` read (real ones are a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Opens a file beside a model file (its `config.json`), safely and in the right view.
pub type Opener<'a> = &'a dyn Fn(&Path) -> Result<OpenedFile, OpenError>;

/// Largest values believed from a model file; beyond them a value is treated as absent, so
/// that a hostile header cannot make infermem allocate or compute without bound.
pub mod limits {
    /// Transformer blocks (the largest models have ~130).
    pub const LAYERS: u32 = 4096;
    /// Heads per layer.
    pub const HEADS: u32 = 1 << 14;
    /// Embedding, feed-forward and head widths.
    pub const WIDTH: u64 = 1 << 20;
    /// Vocabulary entries.
    pub const VOCAB: u64 = 1 << 24;
    /// Context lengths (trained context, sliding window), in tokens.
    pub const CONTEXT: u64 = 1 << 26;
}

/// The model as the file describes it. Unknown values stay null; nothing is guessed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelProfile {
    /// `general.architecture` (GGUF) or `model_type` (config.json), e.g. `llama`, `qwen2`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// The quantisation the file is sold as (`general.file_type`), e.g. `Q4_K_M`.
    pub file_type: Option<String>,
    /// Elements in all tensors.
    pub parameter_count: u64,
    /// Bytes of tensor data in the file.
    pub weight_bytes: u64,
    /// Transformer blocks.
    pub n_layer: Option<u32>,
    /// Context length the model was trained for.
    pub n_ctx_train: Option<u64>,
    pub n_embd: Option<u64>,
    /// Feed-forward width (the largest, when it varies by layer).
    pub n_ff: Option<u64>,
    /// Attention heads (the first layer's, when they vary).
    pub n_head: Option<u32>,
    /// KV heads per layer (grouped-query attention when fewer than `n_head`); 0 = a layer
    /// without KV cache.
    pub n_head_kv: Vec<u32>,
    /// Dimension of one key head and of one value head.
    pub head_dim_k: Option<u32>,
    pub head_dim_v: Option<u32>,
    /// Sliding-window attention: window size and which layers use it.
    pub sliding_window: Option<u32>,
    pub swa_layers: Vec<u32>,
    pub n_vocab: Option<u64>,
    /// Experts per MoE layer.
    pub n_expert: Option<u32>,
    /// Multi-head latent attention (DeepSeek-V2/V3): compressed KV rank and rope dimension.
    pub kv_lora_rank: Option<u32>,
    pub rope_dim: Option<u32>,
    /// Bytes and tensor counts per element type, largest first.
    pub types: Vec<TypeShare>,
    /// Bytes of each transformer block's tensors (`blk.N.*` in GGUF).
    pub layer_bytes: Vec<u64>,
    /// Token embedding bytes (stays on the CPU in llama.cpp).
    pub token_embd_bytes: u64,
    /// Output head and final norm bytes (offloaded last).
    pub output_bytes: u64,
    /// Every tensor: name, type, shape, bytes.
    pub tensors: Vec<TensorSummary>,
}

/// Bytes spent on one element type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeShare {
    pub dtype: String,
    pub tensors: u32,
    pub bytes: u64,
}

/// One tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub bytes: u64,
}

/// Builds the profile of a GGUF file.
pub fn from_gguf(g: &Gguf) -> ModelProfile {
    let arch = ArchKeys::of(g);
    let n_layer = arch.u32("block_count").filter(|&n| n <= limits::LAYERS);
    let layers = n_layer.unwrap_or(0) as usize;
    let sliding_window = arch
        .u32("attention.sliding_window")
        .filter(|&w| u64::from(w) <= limits::CONTEXT);
    let mut profile = ModelProfile {
        architecture: arch.name.map(str::to_owned),
        name: g.get_str("general.name").map(str::to_owned),
        file_type: g.file_type().map(file_type_label),
        n_layer,
        n_ctx_train: arch.u64("context_length").filter(|&n| n <= limits::CONTEXT),
        n_embd: arch.u64("embedding_length").filter(|&n| n <= limits::WIDTH),
        n_ff: arch.largest("feed_forward_length"),
        sliding_window,
        swa_layers: swa_layers(
            g,
            &arch.key("attention.sliding_window_pattern"),
            sliding_window,
            layers,
        ),
        n_vocab: arch
            .u64("vocab_size")
            .or_else(|| g.get_array("tokenizer.ggml.tokens").map(|a| a.len))
            .filter(|&n| n <= limits::VOCAB),
        n_expert: arch.u32("expert_count"),
        kv_lora_rank: width(arch.u32("attention.kv_lora_rank")),
        rope_dim: width(arch.u32("rope.dimension_count")),
        ..Default::default()
    };
    read_gguf_attention(&mut profile, &arch, layers);
    add_gguf_tensors(&mut profile, g, layers);
    profile
}

/// The `<architecture>.*` keys of a GGUF file, e.g. `llama.block_count`.
struct ArchKeys<'a> {
    g: &'a Gguf,
    /// `general.architecture`.
    name: Option<&'a str>,
}

impl<'a> ArchKeys<'a> {
    fn of(g: &'a Gguf) -> ArchKeys<'a> {
        ArchKeys {
            g,
            name: g.architecture(),
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.name.unwrap_or(""))
    }

    fn get(&self, k: &str) -> Option<&'a Value> {
        self.g.get(&self.key(k))
    }

    fn u64(&self, k: &str) -> Option<u64> {
        self.g.get_u64(&self.key(k))
    }

    fn u32(&self, k: &str) -> Option<u32> {
        self.u64(k).and_then(|v| u32::try_from(v).ok())
    }

    /// A number, or the largest of an array of them (a value that varies by layer).
    fn largest(&self, k: &str) -> Option<u64> {
        let v = self.get(k)?;
        match v.as_array() {
            Some(a) => a.values.as_ref()?.iter().filter_map(|x| x.as_u64()).max(),
            None => v.as_u64(),
        }
    }

    /// Head counts, one per layer: a number (the same for all `layers`) or an array.
    fn heads_per_layer(&self, k: &str, layers: usize) -> Vec<u32> {
        let heads = |x: &Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n <= limits::HEADS)
        };
        match self.get(k) {
            Some(v) if v.as_array().is_some() => v
                .as_array()
                .and_then(|a| a.values.as_ref())
                .map(|vals| vals.iter().map(|x| heads(x).unwrap_or(0)).collect())
                .unwrap_or_default(),
            Some(v) => heads(v).map(|n| vec![n; layers]).unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

/// `general.file_type` by its name, e.g. `Q4_K_M`.
fn file_type_label(file_type: u64) -> String {
    super::ggml::file_type_name(file_type)
        .map_or_else(|| format!("unknown ({file_type})"), str::to_owned)
}

/// A width believed, or none.
fn width(v: Option<u32>) -> Option<u32> {
    v.filter(|&w| u64::from(w) <= limits::WIDTH)
}

/// Heads, KV heads and head dimensions. No KV head count means multi-head attention (as
/// many KV heads as heads); no head dimension means the embedding split across the heads.
fn read_gguf_attention(profile: &mut ModelProfile, arch: &ArchKeys, layers: usize) {
    let heads = arch.heads_per_layer("attention.head_count", layers);
    let mut heads_kv = arch.heads_per_layer("attention.head_count_kv", layers);
    if heads_kv.is_empty() {
        heads_kv = heads.clone();
    }
    profile.n_head = heads.iter().copied().find(|&h| h > 0);
    profile.n_head_kv = heads_kv;
    let default_head_dim = default_head_dim(profile.n_embd, profile.n_head);
    profile.head_dim_k = width(arch.u32("attention.key_length").or(default_head_dim));
    profile.head_dim_v = width(arch.u32("attention.value_length").or(default_head_dim));
}

/// The head dimension of a model that does not state it: the embedding split across heads.
fn default_head_dim(n_embd: Option<u64>, n_head: Option<u32>) -> Option<u32> {
    match (n_embd, n_head) {
        (Some(e), Some(h)) if h > 0 => u32::try_from(e / u64::from(h)).ok(),
        _ => None,
    }
}

/// Every tensor, its bytes counted by layer (`blk.N.*`), token embedding and output head.
fn add_gguf_tensors(profile: &mut ModelProfile, g: &Gguf, layers: usize) {
    profile.layer_bytes = vec![0u64; layers];
    for t in &g.tensors {
        let bytes = t.n_bytes();
        match layer_of(&t.name) {
            Some(i) if i < layers => profile.layer_bytes[i] += bytes,
            _ if t.name.starts_with("token_embd") => profile.token_embd_bytes += bytes,
            _ if t.name.starts_with("output") => profile.output_bytes += bytes,
            _ => {}
        }
        profile.add_tensor(
            TensorSummary {
                name: t.name.clone(),
                dtype: t.ggml_type.name().to_owned(),
                shape: t.dims.clone(),
                bytes,
            },
            t.n_elements(),
        );
    }
    profile.types = type_shares(&profile.tensors);
}

impl ModelProfile {
    /// Lists a tensor of `n_elements` and counts it in the totals.
    fn add_tensor(&mut self, tensor: TensorSummary, n_elements: u64) {
        self.parameter_count = self.parameter_count.saturating_add(n_elements);
        self.weight_bytes = self.weight_bytes.saturating_add(tensor.bytes);
        self.tensors.push(tensor);
    }
}

/// Which layers use the sliding window. GGUF says it with
/// `<arch>.attention.sliding_window_pattern`: either one boolean per layer, or a period N
/// meaning "every Nth layer is global, the others slide" (llama.cpp `set_swa_pattern`).
fn swa_layers(g: &Gguf, key: &str, window: Option<u32>, layers: usize) -> Vec<u32> {
    if window.is_none_or(|w| w == 0) {
        return Vec::new();
    }
    let flags: Vec<bool> = match g.get(key) {
        Some(v) => match v.as_array().and_then(|a| a.values.as_ref()) {
            Some(values) => values
                .iter()
                .map(|x| x.as_bool().unwrap_or(false))
                .collect(),
            None => match v.as_u64() {
                Some(0) | None => vec![true; layers],
                Some(period) => (0..layers as u64)
                    .map(|il| il % period < period - 1)
                    .collect(),
            },
        },
        // A window but no pattern: every layer slides (e.g. Mistral 7B v0.1).
        None => vec![true; layers],
    };
    flags
        .iter()
        .enumerate()
        .filter(|(_, swa)| **swa)
        .map(|(i, _)| i as u32)
        .collect()
}

/// `blk.12.attn_q.weight` → 12.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

fn type_shares(tensors: &[TensorSummary]) -> Vec<TypeShare> {
    let mut by_type: BTreeMap<&str, (u32, u64)> = BTreeMap::new();
    for t in tensors {
        let entry = by_type.entry(&t.dtype).or_default();
        entry.0 += 1;
        entry.1 += t.bytes;
    }
    let mut shares: Vec<TypeShare> = by_type
        .into_iter()
        .map(|(dtype, (tensors, bytes))| TypeShare {
            dtype: dtype.to_owned(),
            tensors,
            bytes,
        })
        .collect();
    shares.sort_by_key(|s| std::cmp::Reverse(s.bytes));
    shares
}

/// The subset of a Hugging Face `config.json` that decides memory.
#[derive(Debug, Default, Deserialize)]
pub struct HfConfig {
    model_type: Option<String>,
    num_hidden_layers: Option<u32>,
    hidden_size: Option<u64>,
    intermediate_size: Option<u64>,
    num_attention_heads: Option<u32>,
    num_key_value_heads: Option<u32>,
    head_dim: Option<u32>,
    max_position_embeddings: Option<u64>,
    sliding_window: Option<u32>,
    vocab_size: Option<u64>,
    num_local_experts: Option<u32>,
    n_routed_experts: Option<u32>,
    kv_lora_rank: Option<u32>,
    qk_rope_head_dim: Option<u32>,
    /// Multimodal configs nest the language model here.
    text_config: Option<Box<HfConfig>>,
}

/// Builds the profile of one safetensors file; `config` (the Hugging Face `config.json`
/// beside it, when present and well-formed) supplies the architecture.
pub fn from_safetensors(header: &SafetensorsHeader, config: Option<&HfConfig>) -> ModelProfile {
    let mut profile = ModelProfile::default();
    for t in &header.tensors {
        profile.add_tensor(
            TensorSummary {
                name: t.name.clone(),
                dtype: t.dtype.clone(),
                shape: t.shape.clone(),
                bytes: t.n_bytes(),
            },
            t.n_elements(),
        );
    }
    profile.types = type_shares(&profile.tensors);
    profile.name = header.metadata.get("name").cloned();
    if let Some(config) = config {
        apply_hf_config(&mut profile, config);
    }
    profile
}

/// Reads the `config.json` beside `model`, opened with `open`: none when there is none or it
/// is not well-formed JSON; an error when it is no regular file, is larger than
/// [`MAX_CONFIG_BYTES`] or cannot be read.
pub fn read_hf_config(model: &Path, open: Opener) -> Result<Option<HfConfig>, OpenError> {
    let Some(dir) = model.parent() else {
        return Ok(None);
    };
    let file = match open(&dir.join("config.json")) {
        Err(e) if e.is_not_found() => return Ok(None),
        other => other?,
    };
    let Ok(config) = serde_json::from_slice::<HfConfig>(&file.read_capped(MAX_CONFIG_BYTES)?)
    else {
        return Ok(None);
    };
    Ok(Some(match config.text_config {
        Some(text) if config.num_hidden_layers.is_none() => HfConfig {
            model_type: config.model_type.or(text.model_type.clone()),
            ..*text
        },
        _ => config,
    }))
}

fn apply_hf_config(profile: &mut ModelProfile, c: &HfConfig) {
    let width = |v: Option<u64>| v.filter(|&w| w <= limits::WIDTH);
    let heads = |v: Option<u32>| v.filter(|&h| h <= limits::HEADS);
    let n_layer = c.num_hidden_layers.filter(|&n| n <= limits::LAYERS);
    let layers = n_layer.unwrap_or(0) as usize;
    profile.architecture = c.model_type.clone();
    profile.n_layer = n_layer;
    profile.n_embd = width(c.hidden_size);
    profile.n_ff = width(c.intermediate_size);
    profile.n_head = heads(c.num_attention_heads);
    let kv = heads(c.num_key_value_heads).or(profile.n_head);
    profile.n_head_kv = kv.map(|kv| vec![kv; layers]).unwrap_or_default();
    let head_dim = c
        .head_dim
        .or(default_head_dim(profile.n_embd, profile.n_head))
        .filter(|&d| u64::from(d) <= limits::WIDTH);
    profile.head_dim_k = head_dim;
    profile.head_dim_v = head_dim;
    profile.n_ctx_train = c.max_position_embeddings.filter(|&n| n <= limits::CONTEXT);
    profile.sliding_window = c
        .sliding_window
        .filter(|&w| u64::from(w) <= limits::CONTEXT);
    profile.n_vocab = c.vocab_size.filter(|&n| n <= limits::VOCAB);
    profile.n_expert = c.num_local_experts.or(c.n_routed_experts);
    profile.kv_lora_rank = c.kv_lora_rank.filter(|&r| u64::from(r) <= limits::WIDTH);
    profile.rope_dim = c
        .qk_rope_head_dim
        .filter(|&r| u64::from(r) <= limits::WIDTH);
    // Where the bytes are, by Hugging Face tensor names (`model.layers.N.`, `lm_head`).
    profile.layer_bytes = vec![0; layers];
    for t in &profile.tensors {
        match hf_layer_of(&t.name) {
            Some(i) if i < layers => profile.layer_bytes[i] += t.bytes,
            _ if t.name.contains("embed_tokens") || t.name.ends_with("wte.weight") => {
                profile.token_embd_bytes += t.bytes
            }
            _ if t.name.starts_with("lm_head") || t.name.ends_with("model.norm.weight") => {
                profile.output_bytes += t.bytes
            }
            _ => {}
        }
    }
}

/// `model.layers.12.self_attn.q_proj.weight` (or `transformer.h.12.…`) → 12.
fn hf_layer_of(name: &str) -> Option<usize> {
    let rest = name
        .split_once("layers.")
        .or_else(|| name.split_once(".h."))
        .map(|(_, rest)| rest)?;
    rest.split('.').next()?.parse().ok()
}

/// Opens the file at `path` once, recognises and profiles it: `None` when it is no model
/// file infermem parses; an error when it cannot be opened, is no regular file or does not
/// parse.
pub fn profile_path(path: &Path) -> Result<Option<(ModelFormat, ModelProfile)>, String> {
    // The caller names the path: the error is only why.
    let file = open::open_regular(path).map_err(|e| e.reason.to_string())?;
    let Some(format) = discovery::sniff_file(&file) else {
        return Ok(None);
    };
    Ok(profile_opened(&file, format, &open::open_regular)?.map(|p| (format, p)))
}

/// Profiles an open model file. GGUF and safetensors are parsed (`open` opens the
/// `config.json` beside a safetensors file); PyTorch and ONNX files are only sized. Parsed
/// files are cached ([`super::profile_cache`]).
pub fn profile_opened(
    file: &OpenedFile,
    format: ModelFormat,
    open: Opener,
) -> Result<Option<ModelProfile>, String> {
    super::profile_cache::profile(file, || parse_opened(file, format, open))
}

fn parse_opened(
    file: &OpenedFile,
    format: ModelFormat,
    open: Opener,
) -> Result<Option<ModelProfile>, String> {
    match format {
        ModelFormat::Gguf => super::gguf::parse_file(file)
            .map(|g| Some(from_gguf(&g)))
            .map_err(|e| e.to_string()),
        ModelFormat::Safetensors => {
            let header = super::safetensors::parse_file(file).map_err(|e| e.to_string())?;
            let config = read_hf_config(&file.path, open)
                .map_err(|e| format!("its config.json cannot be read: {e}"))?;
            Ok(Some(from_safetensors(&header, config.as_ref())))
        }
        ModelFormat::Pytorch | ModelFormat::Onnx => Ok(None),
    }
}

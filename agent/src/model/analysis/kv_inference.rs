//! Recognising the KV cache among a process's anonymous blocks, and the context it holds.

use super::{AnonBlock, BlockSource};
use crate::model::{
    ggml::GgmlType,
    memory::{self, KvModel},
    profile::ModelProfile,
};

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

/// The likely cache type pairs, most likely first, as [`infer_ctx`] takes them.
pub(super) fn likely_cache_types() -> Vec<(String, String)> {
    INFERENCE_TYPES
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
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

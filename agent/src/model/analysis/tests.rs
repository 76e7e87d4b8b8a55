use super::{kv_inference::likely_cache_types, *};
use crate::model::config::SettingSource;

/// A GQA model: 16 layers, 8 heads of 64, 2 KV heads: f16 KV is 16 × 2 × 2 × 64 × 2 = 8 KiB
/// per token.
fn gqa() -> ModelProfile {
    ModelProfile {
        n_layer: Some(16),
        n_ctx_train: Some(8192),
        n_embd: Some(512),
        n_head: Some(8),
        n_head_kv: vec![2; 16],
        head_dim_k: Some(64),
        head_dim_v: Some(64),
        ..Default::default()
    }
}

fn block(bytes: u64, source: BlockSource) -> AnonBlock {
    AnonBlock {
        address: 0x7f00_0000_0000,
        bytes,
        source,
        resident_bytes: None,
    }
}

/// Residency not known (pagemap unreadable): no block is passed over for it.
fn unknown(_: &AnonBlock) -> Option<u64> {
    None
}

fn types() -> Vec<(String, String)> {
    likely_cache_types()
}

#[test]
fn infers_the_context_from_an_mmapped_kv_cache() {
    let blocks = [
        block(3 << 20, BlockSource::ProbeMmap),
        block(512 * 8192 + 4096, BlockSource::ProbeMmap),
    ];
    let found = infer_ctx(&gqa(), &blocks, &types(), 1, false, &unknown).unwrap();
    assert_eq!(
        (found.n_ctx, found.type_k.as_str(), found.per_cell),
        (512, "f16", 8192)
    );
    assert_eq!(found.block.bytes, 512 * 8192 + 4096);
}

#[test]
fn infers_a_quantized_cache_and_heap_growth() {
    // q8_0: 16 layers × 2 × (128 / 32 × 34) bytes = 4352 per cell; 1024 cells are 544 f16
    // cells, not a multiple of 256, so f16 does not match first.
    let q8 = infer_ctx(
        &gqa(),
        &[block(1024 * 4352 + 4096, BlockSource::ProbeMmap)],
        &types(),
        1,
        true,
        &unknown,
    )
    .unwrap();
    assert_eq!(
        (q8.n_ctx, q8.type_k.as_str(), q8.type_v.as_str()),
        (1024, "q8_0", "q8_0")
    );
    // The heap grew by a little less than the cache (the top chunk had free space).
    let brk = infer_ctx(
        &gqa(),
        &[block(2048 * 8192 - (100 << 10), BlockSource::ProbeBrk)],
        &types(),
        1,
        false,
        &unknown,
    )
    .unwrap();
    assert_eq!(brk.n_ctx, 2048);
}

#[test]
fn blocks_mostly_not_written_are_not_the_cache_and_only_fitting_blocks_are_read() {
    let stack = block(1024 * 8192 + 4096, BlockSource::ProbeMmap);
    let cache = block(1280 * 8192 + 4096, BlockSource::ProbeMmap);
    let other = block(3 << 20, BlockSource::ProcMaps);
    let asked = std::cell::RefCell::new(Vec::new());
    let populated = |b: &AnonBlock| {
        asked.borrow_mut().push(b.bytes);
        // The thread stack has 64 KiB written; the cache was cleared whole.
        Some(if b.bytes == stack.bytes {
            64 << 10
        } else {
            b.bytes
        })
    };
    let found = infer_ctx(
        &gqa(),
        &[stack, other, cache],
        &types(),
        1,
        false,
        &populated,
    )
    .unwrap();
    assert_eq!(found.n_ctx, 1280);
    assert_eq!(found.block.resident_bytes, Some(cache.bytes));
    assert_eq!(
        *asked.borrow(),
        [stack.bytes, cache.bytes],
        "pagemap read only for blocks that fit"
    );
}

#[test]
fn unrelated_blocks_infer_nothing() {
    let blocks = [
        block(512 * 8192 + (300 << 10), BlockSource::ProbeMmap),
        block(100 << 10, BlockSource::ProcMaps),
    ];
    assert_eq!(
        infer_ctx(&gqa(), &blocks, &types(), 1, false, &unknown),
        None
    );
    // Two sequences need a multiple of 512 cells.
    assert_eq!(
        infer_ctx(
            &gqa(),
            &[block(768 * 8192, BlockSource::ProbeMmap)],
            &types(),
            2,
            false,
            &unknown
        ),
        None
    );
}

#[test]
fn a_process_without_model_or_runtime_has_no_model_section() {
    let facts = ProcessFacts {
        cmdline: vec!["/bin/sleep".into(), "10".into()],
        ..Default::default()
    };
    assert_eq!(analyze(&facts), None);
}

#[test]
fn llama_flags_are_read_only_from_llama_programs() {
    let python = ProcessFacts {
        exe: Some("/usr/bin/python3.11".into()),
        cmdline: vec![
            "python3".into(),
            "app.py".into(),
            "-c".into(),
            "config.yaml".into(),
            "-fa".into(),
        ],
        mapped_files: vec![(
            "/venv/lib/python3.11/site-packages/llama_cpp/lib/libllama.so".into(),
            0,
        )],
        ..Default::default()
    };
    let report = analyze(&python).unwrap();
    assert_eq!(report.runtime, Runtime::LlamaCpp);
    assert_eq!(
        report.config,
        RuntimeConfig::default(),
        "the script's -c is not llama.cpp's"
    );

    let server = ProcessFacts {
        exe: Some("/usr/local/bin/llama-server".into()),
        cmdline: vec![
            "llama-server".into(),
            "-m".into(),
            "m.gguf".into(),
            "-c".into(),
            "8192".into(),
        ],
        ..Default::default()
    };
    let report = analyze(&server).unwrap();
    let n_ctx = report.config.n_ctx.unwrap();
    assert_eq!((n_ctx.value, n_ctx.source), (8192, SettingSource::Cmdline));
}

/// Written whole (pagemap: every page present).
fn whole(b: &AnonBlock) -> Option<u64> {
    Some(b.bytes)
}

#[test]
fn after_the_fact_a_lone_written_f16_area_is_believed() {
    let cache = block(1280 * 8192 + 4096, BlockSource::ProcMaps);
    let found = infer_ctx(&gqa(), &[cache], &types(), 1, false, &whole).unwrap();
    assert_eq!((found.n_ctx, found.type_k.as_str()), (1280, "f16"));
    assert_eq!(found.block.resident_bytes, Some(cache.bytes));
}

#[test]
fn after_the_fact_anything_ambiguous_infers_nothing() {
    let cache = block(1280 * 8192 + 4096, BlockSource::ProcMaps);
    let none = |blocks: &[AnonBlock], populated: &dyn Fn(&AnonBlock) -> Option<u64>| {
        infer_ctx(&gqa(), blocks, &types(), 1, false, populated)
    };
    // Two areas that fit: which one is the cache?
    let other = AnonBlock {
        address: 0x7f10_0000_0000,
        ..block(2048 * 8192 + 4096, BlockSource::ProcMaps)
    };
    assert_eq!(none(&[cache, other], &whole), None);
    // Not written whole, or residency unknown.
    assert_eq!(none(&[cache], &|b| Some(b.bytes / 2)), None);
    assert_eq!(none(&[cache], &unknown), None);
    // Merged with a 64 KiB neighbour: too far from any malloc'd chunk of a cache.
    assert_eq!(
        none(
            &[block(1280 * 8192 + (64 << 10), BlockSource::ProcMaps)],
            &whole
        ),
        None
    );
    // Exactly the size of a cache: no malloc'd chunk is (an 8 MiB thread stack is).
    assert_eq!(
        none(&[block(1024 * 8192, BlockSource::ProcMaps)], &whole),
        None
    );
    // A size that fits only a q8_0 cache: the cache type cannot be told from a size alone.
    assert_eq!(
        none(&[block(1024 * 4352 + 4096, BlockSource::ProcMaps)], &whole),
        None
    );
}

#[test]
fn after_the_fact_a_configured_cache_type_is_tried() {
    let q8 = vec![("q8_0".to_owned(), "q8_0".to_owned())];
    let found = infer_ctx(
        &gqa(),
        &[block(1024 * 4352 + 4096, BlockSource::ProcMaps)],
        &q8,
        1,
        true,
        &whole,
    )
    .unwrap();
    assert_eq!((found.n_ctx, found.type_k.as_str()), (1024, "q8_0"));
}

use super::*;

fn t(name: &str) -> GgmlType {
    GgmlType::from_name(name).unwrap()
}

/// A 4096 × 4096 matrix of `dtype`, used as a matrix multiplication.
fn square(cpu: CpuFeatures, dtype: &str) -> Option<(ExtraBuffer, u64)> {
    extra_buffer(cpu, t(dtype), &[4096, 4096], WeightUse::MulMat)
}

#[test]
fn avx2_repacks_q4_0_q4_k_iq4_nl_and_mxfp4_but_not_q8_0_or_f16() {
    for dtype in ["Q4_0", "Q4_K", "IQ4_NL", "MXFP4"] {
        let bytes = t(dtype).row_bytes(4096).unwrap() * 4096;
        assert_eq!(
            square(AVX2, dtype),
            Some((ExtraBuffer::CpuRepack, bytes)),
            "{dtype}"
        );
    }
    for dtype in ["Q8_0", "F16", "F32", "Q6_K", "Q5_K", "Q2_K", "BF16"] {
        assert_eq!(square(AVX2, dtype), None, "{dtype}");
    }
}

#[test]
fn avx512_also_repacks_q2_k() {
    let bytes = t("Q2_K").row_bytes(4096).unwrap() * 4096;
    assert_eq!(
        square(AVX512, "Q2_K"),
        Some((ExtraBuffer::CpuRepack, bytes))
    );
    assert_eq!(square(AVX512, "Q4_0").unwrap().0, ExtraBuffer::CpuRepack);
    assert_eq!(square(AVX512, "Q8_0"), None);
    assert_eq!(square(AVX512, "F16"), None);
}

#[test]
fn nothing_is_repacked_without_avx2() {
    for dtype in ["Q4_0", "Q4_K", "Q2_K", "F16", "Q8_0"] {
        assert_eq!(square(NONE, dtype), None, "{dtype}");
    }
}

#[test]
fn amx_takes_its_types_in_vnni_layout_and_leaves_the_rest_to_repack() {
    // F16 is not packed: as many bytes as the file holds.
    assert_eq!(
        square(AMX, "F16"),
        Some((ExtraBuffer::Amx, 4096 * 4096 * 2))
    );
    // Q8_0 gains a 4-byte compensation per block; Q4_K/Q5_K 4 bytes per super-block;
    // IQ4_XS 2; Q4_0 and Q6_K none.
    let blocks = |bs: u64| 4096 / bs * 4096;
    assert_eq!(
        square(AMX, "Q8_0"),
        Some((ExtraBuffer::Amx, blocks(32) * (34 + 4)))
    );
    assert_eq!(
        square(AMX, "Q4_K"),
        Some((ExtraBuffer::Amx, blocks(256) * (144 + 4)))
    );
    assert_eq!(
        square(AMX, "IQ4_XS"),
        Some((ExtraBuffer::Amx, blocks(256) * (136 + 2)))
    );
    assert_eq!(
        square(AMX, "Q4_0"),
        Some((ExtraBuffer::Amx, blocks(32) * 18))
    );
    assert_eq!(
        square(AMX, "Q6_K"),
        Some((ExtraBuffer::Amx, blocks(256) * 210))
    );
    // Q2_K has no AMX kernel: the AVX-512 repack takes it.
    assert_eq!(square(AMX, "Q2_K").unwrap().0, ExtraBuffer::CpuRepack);
    // BF16 has neither.
    assert_eq!(square(AMX, "BF16"), None);
}

#[test]
fn shapes_decide_too() {
    // Out features not a multiple of 8: no repack; of 8 but not 32: no AMX.
    assert_eq!(
        extra_buffer(AVX2, t("Q4_0"), &[4096, 4100], WeightUse::MulMat),
        None
    );
    assert_eq!(
        extra_buffer(AMX, t("F16"), &[4096, 264], WeightUse::MulMat),
        None
    );
    assert_eq!(
        extra_buffer(AMX, t("Q4_0"), &[4096, 264], WeightUse::MulMat)
            .unwrap()
            .0,
        ExtraBuffer::CpuRepack
    );
    // In features not a multiple of 256: no AMX for K-quants.
    assert_eq!(
        extra_buffer(AMX, t("Q6_K"), &[4352, 4096], WeightUse::MulMat),
        Some((ExtraBuffer::Amx, 4352 / 256 * 4096 * 210))
    );
    assert_eq!(
        extra_buffer(AMX, t("Q8_0"), &[4112, 4096], WeightUse::MulMat),
        None
    );
    // Expert stacks are repacked (not by AMX); embeddings and norms never.
    let experts = extra_buffer(AMX, t("Q4_K"), &[4096, 1024, 8], WeightUse::MulMatId);
    assert_eq!(experts.unwrap().0, ExtraBuffer::CpuRepack);
    assert_eq!(
        extra_buffer(AMX, t("Q4_0"), &[4096, 32000], WeightUse::Other),
        None
    );
}

#[test]
fn weight_use_follows_llama_cpp_tensor_names() {
    assert_eq!(weight_use("blk.3.attn_q.weight", 2), WeightUse::MulMat);
    assert_eq!(weight_use("blk.3.ffn_down.weight", 2), WeightUse::MulMat);
    assert_eq!(weight_use("output.weight", 2), WeightUse::MulMat);
    assert_eq!(
        weight_use("blk.0.ffn_up_exps.weight", 3),
        WeightUse::MulMatId
    );
    assert_eq!(weight_use("token_embd.weight", 2), WeightUse::Other);
    assert_eq!(weight_use("blk.0.attn_norm.weight", 1), WeightUse::Other);
    assert_eq!(weight_use("blk.0.ssm_conv1d.weight", 2), WeightUse::Other);
    assert_eq!(weight_use("blk.0.attn_q.bias", 1), WeightUse::Other);
}

#[test]
fn variants_name_their_features() {
    assert_eq!(
        variant_features("libggml-cpu-haswell.so"),
        Some(("haswell", AVX2))
    );
    assert_eq!(
        variant_features("libggml-cpu-icelake.so"),
        Some(("icelake", AVX512))
    );
    assert_eq!(
        variant_features("libggml-cpu-sapphirerapids.so.0"),
        Some(("sapphirerapids", AMX))
    );
    assert_eq!(variant_features("libggml-cpu-x64.so").unwrap().1, NONE);
    assert_eq!(variant_features("libggml-cpu.so"), None);
    assert_eq!(variant_features("libggml-cpu-future.so"), None);
}

fn flags(list: &str) -> Vec<String> {
    list.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn a_release_build_loads_the_best_variant_the_host_runs() {
    let avx512 = flags("sse4_2 avx f16c fma avx2 bmi2 avx512f avx512_vnni");
    assert_eq!(best_variant(&avx512).0, "cascadelake");
    let amx = flags(
        "sse4_2 avx f16c fma avx2 bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16 amx_tile amx_int8",
    );
    assert_eq!(best_variant(&amx).0, "sapphirerapids");
    assert_eq!(best_variant(&flags("sse4_2 avx")).0, "sandybridge");
    assert_eq!(best_variant(&[]).0, "x64");
    // A native build uses everything the host advertises.
    assert_eq!(native_features(&amx), AMX);
    assert_eq!(native_features(&avx512), AVX512);
}

#[test]
fn constant_functions_decode() {
    // gcc -O2: mov eax, 1; ret
    assert_eq!(
        decode_return_constant(&[0xb8, 1, 0, 0, 0, 0xc3]),
        Some(true)
    );
    // xor eax, eax; ret, after endbr64
    assert_eq!(
        decode_return_constant(&[0xf3, 0x0f, 0x1e, 0xfa, 0x31, 0xc0, 0xc3]),
        Some(false)
    );
    // -O0: push rbp; mov rbp, rsp; mov eax, 0; pop rbp; ret
    assert_eq!(
        decode_return_constant(&[0x55, 0x48, 0x89, 0xe5, 0xb8, 0, 0, 0, 0, 0x5d, 0xc3]),
        Some(false)
    );
    // Anything else is not guessed.
    assert_eq!(decode_return_constant(&[0xe9, 0, 0, 0, 0]), None);
    assert_eq!(decode_return_constant(&[0xb8, 1, 0, 0, 0, 0x90]), None);
    assert_eq!(decode_return_constant(&[]), None);
}

#[test]
fn libraries_that_are_not_elf_or_not_files_give_nothing() {
    assert_eq!(library_features(Path::new("/dev/zero")), None);
    assert_eq!(library_features(Path::new("/proc/self/status")), None);
    assert_eq!(
        library_features(Path::new("/nonexistent/libggml-cpu.so")),
        None
    );
}

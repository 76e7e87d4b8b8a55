//! Any bytes given to the GGUF header reader: an error or a header, never a panic, a hang or
//! an unbounded allocation; a header that parses is profiled and planned for, which must not
//! panic or allocate without bound either (arithmetic on untrusted sizes saturates), repacked
//! weights included.
#![no_main]

use infermem::model::{
    cpu_backend::CpuFeatures,
    ggml::GgmlType,
    gguf,
    memory::{self, ContextShape, KvModel, Placement},
    profile,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = gguf::parse_bytes(data) else {
        return;
    };
    let profile = profile::from_gguf(&header);
    for (k, v) in [
        (GgmlType::F16, GgmlType::F16),
        (GgmlType::from_name("q8_0").unwrap(), GgmlType::F16),
    ] {
        let Ok(kv) = KvModel::new(&profile, k, v, false) else {
            continue;
        };
        let placement = Placement {
            n_gpu_layers: 3,
            shape: ContextShape::with_ctx(0),
            type_k: k,
            type_v: v,
            flash_attn: false,
            // Every extra buffer rule (AMX, AVX-512 and AVX2 repacking) sees the tensors.
            cpu: Some(CpuFeatures {
                avx2: true,
                avx512: true,
                amx: true,
            }),
        };
        let _ = memory::footprint(&profile, &kv, &placement);
        let _ = memory::largest_ctx(&profile, &kv, &placement, 1 << 30, 1 << 30, 1 << 20);
    }
});

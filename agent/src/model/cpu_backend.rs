//! ggml's CPU backend: which instruction sets a process's build uses, and the extra weight
//! buffers that follow from them.
//!
//! llama.cpp does not always run weights from the mapped model file. Its CPU backend offers
//! "extra" buffer types ahead of the plain CPU buffer (ggml-cpu.cpp
//! `ggml_backend_cpu_get_extra_buffer_types`): `AMX` (Intel AMX tiles) and `CPU_REPACK`
//! (weights interleaved for AVX2/AVX-512 kernels). A weight that one of them takes is copied
//! out of the file into anonymous memory in a new layout, while the file stays mapped: the
//! process holds it twice. Which weights move depends on the instruction sets the build was
//! compiled for, not on the host alone, so this module first finds out what the process runs
//! ([`detect`]), then applies llama.cpp's own rules ([`extra_buffer`]).
//!
//! The rules are those of llama.cpp as vendored by llama-cpp-python 0.3.36
//! (`ggml/src/ggml-cpu/repack.cpp` `ggml_repack_get_optimal_repack_type`,
//! `ggml/src/ggml-cpu/amx/amx.cpp` `supports_op`, `amx/mmq.cpp` `get_row_size`), x86-64 only:
//! ARM's repacking (NEON dot product, i8mm, SVE) is not modelled.

use std::{fs::File, os::unix::fs::OpenOptionsExt as _, path::Path};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, read::ReadCache};
use serde::{Deserialize, Serialize};

use super::ggml::GgmlType;

/// The instruction sets of a ggml CPU build that decide its extra weight buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub avx512: bool,
    /// AMX int8 tiles with AVX512-VNNI: what ggml's AMX buffer needs.
    pub amx: bool,
}

/// How the features of a process's CPU backend were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureSource {
    /// A release build's variant library (`libggml-cpu-<variant>.so`) is mapped.
    Variant,
    /// Read from the mapped library's own `ggml_cpu_has_*` functions.
    Library,
    /// A native build is assumed: the host's CPU flags.
    HostCpu,
    /// `plan`: the variant a release build would load on this host.
    ReleaseBuildOnHost,
}

/// A process's (or a plan's) CPU backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuBackend {
    pub features: CpuFeatures,
    pub source: FeatureSource,
    /// The library or variant it was read from, in words.
    pub detail: String,
}

/// An extra buffer type of ggml's CPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExtraBuffer {
    Amx,
    CpuRepack,
}

/// How llama.cpp uses a weight, which decides whether an extra buffer may take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightUse {
    /// A 2-D matrix multiplied with activations (`GGML_OP_MUL_MAT`).
    MulMat,
    /// A 3-D stack of experts (`GGML_OP_MUL_MAT_ID`).
    MulMatId,
    /// Anything else: embeddings (row lookups), norms, biases, convolutions.
    Other,
}

/// How a tensor named `name` with `dims` dimensions is used, following llama.cpp's tensor
/// table (`LLM_TENSOR_INFOS`) for the tensors that matter: every 2-D weight is a matrix
/// multiplication except the embedding tables and SSM convolutions, and 3-D `_exps` weights
/// are expert stacks.
pub fn weight_use(name: &str, dims: usize) -> WeightUse {
    const NOT_MATMUL: &[&str] = &[
        "token_embd.",
        "per_layer_token_embd.",
        "position_embd.",
        "token_types.",
        "ssm_conv1d.",
        "ssm_a",
        "ssm_d",
    ];
    let last = name.rsplit_once("blk.").map_or(name, |(_, rest)| {
        rest.split_once('.').map_or(rest, |(_, tail)| tail)
    });
    match dims {
        2 if !NOT_MATMUL.iter().any(|p| last.starts_with(p)) => WeightUse::MulMat,
        3 if last.contains("_exps") => WeightUse::MulMatId,
        _ => WeightUse::Other,
    }
}

/// The extra buffer that takes a weight of type `dtype` and shape `ne` used as `usage`, and
/// the bytes it allocates there; `None` when the weight stays in the plain (mapped) buffer.
pub fn extra_buffer(
    cpu: CpuFeatures,
    dtype: GgmlType,
    ne: &[u64],
    usage: WeightUse,
) -> Option<(ExtraBuffer, u64)> {
    let (k, n) = (*ne.first()?, *ne.get(1)?);
    let nbytes = ne
        .iter()
        .skip(1)
        .try_fold(dtype.row_bytes(k)?, |acc, d| acc.checked_mul(*d))?;
    if cpu.amx
        && usage == WeightUse::MulMat
        && ne.len() == 2
        && let Some(bytes) = amx_bytes(dtype, k, n, nbytes)
    {
        return Some((ExtraBuffer::Amx, bytes));
    }
    let repacks = match dtype.name() {
        "Q4_0" | "Q4_K" | "IQ4_NL" | "MXFP4" => cpu.avx2,
        "Q2_K" => cpu.avx512,
        _ => false,
    };
    let shape_ok = match usage {
        WeightUse::MulMat => ne.len() == 2,
        WeightUse::MulMatId => ne.len() == 3,
        WeightUse::Other => false,
    };
    (repacks && shape_ok && n.is_multiple_of(8)).then_some((ExtraBuffer::CpuRepack, nbytes))
}

/// AMX (`amx.cpp` `supports_op`): out features a multiple of 32 (two tiles), in features a
/// multiple of the type's block; quantized types are stored in VNNI layout with per-block
/// extras (`mmq.cpp` `get_row_size`), F16 as it is.
fn amx_bytes(dtype: GgmlType, k: u64, n: u64, nbytes: u64) -> Option<u64> {
    // (type, in-feature alignment, extra bytes per block)
    const AMX_TYPES: &[(&str, u64, u64)] = &[
        ("Q4_0", 32, 0),
        ("Q4_1", 32, 0),
        ("Q8_0", 32, 4),
        ("Q4_K", 256, 4),
        ("Q5_K", 256, 4),
        ("Q6_K", 256, 0),
        ("IQ4_XS", 256, 2),
        ("F16", 16, 0),
    ];
    let &(name, align, extra) = AMX_TYPES.iter().find(|(t, ..)| *t == dtype.name())?;
    if !n.is_multiple_of(32) || !k.is_multiple_of(align) {
        return None;
    }
    if name == "F16" {
        return Some(nbytes);
    }
    let blocks = k / u64::from(dtype.block_size());
    let row = blocks.checked_mul(u64::from(dtype.type_size()) + extra)?;
    n.checked_mul(row)
}

/// The x86-64 release variants of the CPU backend (ggml/src/CMakeLists.txt,
/// `GGML_CPU_ALL_VARIANTS`), from the least to the most capable as ggml's loader scores them:
/// the name, the host flags (`/proc/cpuinfo`) each needs beyond SSE4.2 and what it enables.
const VARIANTS: &[(&str, &str, CpuFeatures)] = &[
    ("x64", "", NONE),
    ("sse42", "sse4_2", NONE),
    ("sandybridge", "avx", NONE),
    ("ivybridge", "avx f16c", NONE),
    ("piledriver", "avx f16c fma", NONE),
    ("haswell", "avx f16c fma avx2 bmi2", AVX2),
    ("alderlake", "avx f16c fma avx2 bmi2 avx_vnni", AVX2),
    ("skylakex", "avx f16c fma avx2 bmi2 avx512f", AVX512),
    (
        "cannonlake",
        "avx f16c fma avx2 bmi2 avx512f avx512vbmi",
        AVX512,
    ),
    (
        "cascadelake",
        "avx f16c fma avx2 bmi2 avx512f avx512_vnni",
        AVX512,
    ),
    (
        "icelake",
        "avx f16c fma avx2 bmi2 avx512f avx512vbmi avx512_vnni",
        AVX512,
    ),
    (
        "cooperlake",
        "avx f16c fma avx2 bmi2 avx512f avx512_vnni avx512_bf16",
        AVX512,
    ),
    (
        "zen4",
        "avx f16c fma avx2 bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16",
        AVX512,
    ),
    (
        "sapphirerapids",
        "avx f16c fma avx2 bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16 amx_tile amx_int8",
        AMX,
    ),
];

const NONE: CpuFeatures = CpuFeatures {
    avx2: false,
    avx512: false,
    amx: false,
};
const AVX2: CpuFeatures = CpuFeatures { avx2: true, ..NONE };
const AVX512: CpuFeatures = CpuFeatures {
    avx512: true,
    ..AVX2
};
const AMX: CpuFeatures = CpuFeatures {
    amx: true,
    ..AVX512
};

/// The features of a variant library named like `libggml-cpu-haswell.so`.
pub fn variant_features(file_name: &str) -> Option<(&'static str, CpuFeatures)> {
    let tag = file_name
        .strip_prefix("libggml-cpu-")?
        .split(".so")
        .next()?;
    VARIANTS
        .iter()
        .find(|(name, ..)| *name == tag)
        .map(|&(name, _, features)| (name, features))
}

/// The variant ggml's loader picks on a host with CPU `flags` (its name and features): the
/// most capable one whose needs the host meets.
fn best_variant(flags: &[String]) -> (&'static str, CpuFeatures) {
    let has = |f: &str| flags.iter().any(|x| x == f);
    VARIANTS
        .iter()
        .rev()
        .find(|(_, needs, _)| needs.split_whitespace().all(has))
        .map_or(("x64", NONE), |&(name, _, features)| (name, features))
}

/// The features a native build compiled on a host with CPU `flags` has.
fn native_features(flags: &[String]) -> CpuFeatures {
    let has = |f: &str| flags.iter().any(|x| x == f);
    CpuFeatures {
        avx2: has("avx2"),
        avx512: has("avx512f"),
        amx: has("amx_int8") && has("avx512_vnni"),
    }
}

/// The CPU flags of this host (`/proc/cpuinfo`, first processor).
pub fn host_flags() -> Vec<String> {
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return Vec::new();
    };
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags").and_then(|r| r.split_once(':')))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// What `plan` assumes: a release build of llama.cpp on this host's CPU.
pub fn release_build_on_host() -> Option<CpuBackend> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let (name, features) = best_variant(&host_flags());
    Some(CpuBackend {
        features,
        source: FeatureSource::ReleaseBuildOnHost,
        detail: format!(
            "a release build of llama.cpp on this host would load its {name} CPU backend"
        ),
    })
}

/// The CPU backend of a process whose mapped files are `mapped` (paths as the process sees
/// them; `root` is `/proc/<pid>/root`, through which they are opened). In order: a mapped
/// release variant, the `ggml_cpu_has_*` functions of a mapped ggml library, else a native
/// build on the host's CPU. `None` off x86-64, where the rules are not modelled.
pub fn detect(root: &Path, mapped: &[&Path]) -> Option<CpuBackend> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    if let Some((path, (variant, features))) = mapped
        .iter()
        .find_map(|p| Some((p, variant_features(&name(p)?)?)))
    {
        return Some(CpuBackend {
            features,
            source: FeatureSource::Variant,
            detail: format!("{} ({variant} variant)", path.display()),
        });
    }
    let ggml_libraries = mapped
        .iter()
        .filter(|p| name(p).is_some_and(|n| n.starts_with("libggml") || n.starts_with("libllama")));
    for path in ggml_libraries {
        let inside = root.join(path.strip_prefix("/").unwrap_or(path));
        if let Some(features) = library_features(&inside) {
            return Some(CpuBackend {
                features,
                source: FeatureSource::Library,
                detail: format!("{} (its ggml_cpu_has_* functions)", path.display()),
            });
        }
    }
    Some(CpuBackend {
        features: native_features(&host_flags()),
        source: FeatureSource::HostCpu,
        detail: "no release variant mapped: a native build for this host's CPU is assumed"
            .to_owned(),
    })
}

/// Reads what a ggml CPU library was compiled for from its own exported functions
/// `ggml_cpu_has_avx2`, `_avx512`, `_avx512_vnni` and `_amx_int8`, each of which returns a
/// compile-time constant. `None` unless all four decode.
pub fn library_features(path: &Path) -> Option<CpuFeatures> {
    // Never block on a FIFO or a device; only regular files are read, and lazily.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let has = |symbol: &str| constant_function(&elf, &cache, symbol);
    Some(CpuFeatures {
        avx2: has("ggml_cpu_has_avx2")?,
        avx512: has("ggml_cpu_has_avx512")?,
        amx: has("ggml_cpu_has_amx_int8")? && has("ggml_cpu_has_avx512_vnni")?,
    })
}

/// The constant the exported function `symbol` returns, read from its machine code.
fn constant_function<'a>(
    elf: &object::File<'a, &'a ReadCache<File>>,
    cache: &'a ReadCache<File>,
    symbol: &str,
) -> Option<bool> {
    let sym = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .find(|s| s.is_definition() && s.name() == Ok(symbol))?;
    let section = elf.section_by_index(sym.section_index()?).ok()?;
    let (offset, size) = section.file_range()?;
    let within = sym.address().checked_sub(section.address())?;
    let length = 16.min(size.checked_sub(within)?);
    let code = object::ReadRef::read_bytes_at(cache, offset + within, length).ok()?;
    decode_return_constant(code)
}

/// Decodes an x86-64 function that returns a constant: `mov eax, imm32; ret` or
/// `xor eax, eax; ret`, after an optional `endbr64`, and with or without a frame pointer
/// (`push rbp; mov rbp, rsp` … `pop rbp`).
pub fn decode_return_constant(code: &[u8]) -> Option<bool> {
    let code = code.strip_prefix(&[0xf3, 0x0f, 0x1e, 0xfa]).unwrap_or(code);
    let (framed, code) = match code.strip_prefix(&[0x55, 0x48, 0x89, 0xe5]) {
        Some(rest) => (true, rest),
        None => (false, code),
    };
    let (value, rest) = match code {
        [0xb8, a, b, c, d, rest @ ..] => (u32::from_le_bytes([*a, *b, *c, *d]), rest),
        [0x31 | 0x33, 0xc0, rest @ ..] => (0, rest),
        _ => return None,
    };
    let rest = if framed {
        rest.strip_prefix(&[0x5d])?
    } else {
        rest
    };
    (rest.first() == Some(&0xc3)).then_some(value != 0)
}

#[cfg(test)]
mod tests;

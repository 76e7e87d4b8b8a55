//! A runtime's memory-relevant configuration, read from its command line and environment,
//! with the provenance of every value (so that `inspect` can say whether a number was read,
//! defaulted or inferred).

use serde::{Deserialize, Serialize};

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettingSource {
    /// A command-line flag.
    Cmdline,
    /// An environment variable of the process.
    Environment,
    /// The runtime's own API (Ollama's `/api/ps`).
    Api,
    /// Deduced from what the kernel saw (e.g. n_ctx from the KV cache allocation).
    Inferred,
    /// The runtime's documented default (nothing overrode it).
    Default,
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setting<T> {
    pub value: T,
    pub source: SettingSource,
    /// The flag, variable or reasoning, e.g. `-c 8192` or `LLAMA_ARG_CTX_SIZE=8192`.
    pub detail: String,
}

impl<T> Setting<T> {
    fn new(value: T, source: SettingSource, detail: impl Into<String>) -> Self {
        Setting {
            value,
            source,
            detail: detail.into(),
        }
    }
}

/// llama.cpp's defaults (common/common.h): what applies when no flag says otherwise.
pub mod llama_defaults {
    pub const N_BATCH: u64 = 2048;
    pub const N_UBATCH: u64 = 512;
    pub const N_PARALLEL: u64 = 1;
    pub const CACHE_TYPE: &str = "f16";
}

/// Memory-relevant configuration of a runtime. Fields a runtime does not have stay null.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// The model the runtime was told to load.
    pub model: Option<Setting<String>>,
    /// Context size in tokens (llama.cpp `-c`; 0 means "the model's trained context").
    pub n_ctx: Option<Setting<u64>>,
    /// Layers offloaded to the GPU (llama.cpp `-ngl`; -1 = all).
    pub n_gpu_layers: Option<Setting<i64>>,
    /// Parallel sequences (slots).
    pub n_parallel: Option<Setting<u64>>,
    pub n_batch: Option<Setting<u64>>,
    pub n_ubatch: Option<Setting<u64>>,
    /// KV cache element types (`f16`, `q8_0`, …).
    pub cache_type_k: Option<Setting<String>>,
    pub cache_type_v: Option<Setting<String>>,
    pub mlock: Option<Setting<bool>>,
    /// Whether the weights are read into anonymous memory instead of mapped.
    pub no_mmap: Option<Setting<bool>>,
    /// Flash attention: `on`, `off` or `auto`.
    pub flash_attn: Option<Setting<String>>,
    /// One KV buffer shared by all sequences (llama.cpp `--kv-unified`).
    pub kv_unified: Option<Setting<bool>>,
    /// vLLM: longest sequence, share of GPU memory it may take, KV dtype, GPUs.
    pub max_model_len: Option<Setting<u64>>,
    pub gpu_memory_utilization: Option<Setting<f64>>,
    pub kv_cache_dtype: Option<Setting<String>>,
    pub tensor_parallel_size: Option<Setting<u64>>,
    pub max_num_seqs: Option<Setting<u64>>,
    /// Ollama: its `OLLAMA_*` environment (secret-looking values redacted).
    pub ollama_env: Vec<(String, String)>,
    /// Ollama: the models `/api/ps` says are loaded, when its API answered.
    pub ollama_loaded: Option<Vec<super::ollama::LoadedModel>>,
}

/// Which flag spellings mean which setting.
#[derive(Clone, Copy)]
enum Key {
    Model,
    Ctx,
    GpuLayers,
    Parallel,
    Batch,
    Ubatch,
    CacheK,
    CacheV,
    CacheKv,
    Mlock,
    NoMmap,
    FlashAttn,
    KvUnified,
    MaxModelLen,
    GpuMemUtil,
    KvCacheDtype,
    TensorParallel,
    MaxNumSeqs,
}

/// Flags of llama.cpp's tools (common/arg.cpp) and of Ollama's runner, which takes the same
/// names for the ones here.
const LLAMA_FLAGS: &[(&str, Key)] = &[
    ("-m", Key::Model),
    ("--model", Key::Model),
    ("-c", Key::Ctx),
    ("--ctx-size", Key::Ctx),
    ("-ngl", Key::GpuLayers),
    ("--gpu-layers", Key::GpuLayers),
    ("--n-gpu-layers", Key::GpuLayers),
    ("-np", Key::Parallel),
    ("--parallel", Key::Parallel),
    ("-b", Key::Batch),
    ("--batch-size", Key::Batch),
    ("-ub", Key::Ubatch),
    ("--ubatch-size", Key::Ubatch),
    ("-ctk", Key::CacheK),
    ("--cache-type-k", Key::CacheK),
    ("-ctv", Key::CacheV),
    ("--cache-type-v", Key::CacheV),
    ("--kv-cache-type", Key::CacheKv),
    ("--mlock", Key::Mlock),
    ("--no-mmap", Key::NoMmap),
    ("-fa", Key::FlashAttn),
    ("--flash-attn", Key::FlashAttn),
    ("-kvu", Key::KvUnified),
    ("--kv-unified", Key::KvUnified),
];

/// llama-server's environment spellings (`LLAMA_ARG_*`, common/arg.cpp `set_env`).
const LLAMA_ENV: &[(&str, Key)] = &[
    ("LLAMA_ARG_MODEL", Key::Model),
    ("LLAMA_ARG_CTX_SIZE", Key::Ctx),
    ("LLAMA_ARG_N_GPU_LAYERS", Key::GpuLayers),
    ("LLAMA_ARG_N_PARALLEL", Key::Parallel),
    ("LLAMA_ARG_BATCH", Key::Batch),
    ("LLAMA_ARG_UBATCH", Key::Ubatch),
    ("LLAMA_ARG_CACHE_TYPE_K", Key::CacheK),
    ("LLAMA_ARG_CACHE_TYPE_V", Key::CacheV),
    ("LLAMA_ARG_MLOCK", Key::Mlock),
    ("LLAMA_ARG_NO_MMAP", Key::NoMmap),
    ("LLAMA_ARG_FLASH_ATTN", Key::FlashAttn),
    ("LLAMA_ARG_KV_UNIFIED", Key::KvUnified),
];

const VLLM_FLAGS: &[(&str, Key)] = &[
    ("--model", Key::Model),
    ("--max-model-len", Key::MaxModelLen),
    ("--gpu-memory-utilization", Key::GpuMemUtil),
    ("--kv-cache-dtype", Key::KvCacheDtype),
    ("--tensor-parallel-size", Key::TensorParallel),
    ("-tp", Key::TensorParallel),
    ("--max-num-seqs", Key::MaxNumSeqs),
];

/// Flags that take no value.
fn is_switch(key: Key) -> bool {
    matches!(key, Key::Mlock | Key::NoMmap | Key::KvUnified)
}

/// Reads llama.cpp (and Ollama runner) settings from the command line, then from
/// `LLAMA_ARG_*` variables for anything the command line did not set (the command line wins,
/// as in llama.cpp).
pub fn parse_llama(cmdline: &[String], environ: &[(String, String)]) -> RuntimeConfig {
    let mut config = RuntimeConfig::default();
    for_each_flag(cmdline, LLAMA_FLAGS, |key, value, detail| {
        apply(&mut config, key, value, SettingSource::Cmdline, detail);
    });
    for (name, value) in environ {
        if let Some(&(_, key)) = LLAMA_ENV.iter().find(|(n, _)| n == name)
            && !is_set(&config, key)
        {
            let value = if is_switch(key) {
                truthy(value).then_some("")
            } else {
                Some(value.as_str())
            };
            if let Some(value) = value {
                apply(
                    &mut config,
                    key,
                    value,
                    SettingSource::Environment,
                    &format!("{name}={value}"),
                );
            }
        }
    }
    config
}

/// Reads vLLM settings (`vllm serve MODEL …` or `… api_server --model MODEL …`).
pub fn parse_vllm(cmdline: &[String]) -> RuntimeConfig {
    let mut config = RuntimeConfig::default();
    for_each_flag(cmdline, VLLM_FLAGS, |key, value, detail| {
        apply(&mut config, key, value, SettingSource::Cmdline, detail);
    });
    if config.model.is_none()
        && let Some(serve) = cmdline.iter().position(|a| a == "serve")
        && let Some(model) = cmdline.get(serve + 1).filter(|m| !m.starts_with('-'))
    {
        config.model = Some(Setting::new(
            model.clone(),
            SettingSource::Cmdline,
            format!("serve {model}"),
        ));
    }
    config
}

/// Keeps the process's `OLLAMA_*` variables (they set context length, parallelism, KV type,
/// flash attention and how many models stay loaded).
pub fn parse_ollama_env(environ: &[(String, String)]) -> RuntimeConfig {
    let mut config = RuntimeConfig {
        ollama_env: super::redact::environ(environ)
            .into_iter()
            .filter(|(k, _)| k.starts_with("OLLAMA_"))
            .collect(),
        ..Default::default()
    };
    let get = |name: &str| {
        environ
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if let Some(v) = get("OLLAMA_CONTEXT_LENGTH").and_then(|v| v.parse().ok()) {
        config.n_ctx = Some(Setting::new(
            v,
            SettingSource::Environment,
            format!("OLLAMA_CONTEXT_LENGTH={v}"),
        ));
    }
    if let Some(v) = get("OLLAMA_NUM_PARALLEL").and_then(|v| v.parse().ok()) {
        config.n_parallel = Some(Setting::new(
            v,
            SettingSource::Environment,
            format!("OLLAMA_NUM_PARALLEL={v}"),
        ));
    }
    if let Some(v) = get("OLLAMA_KV_CACHE_TYPE") {
        let detail = format!("OLLAMA_KV_CACHE_TYPE={v}");
        config.cache_type_k = Some(Setting::new(
            v.clone(),
            SettingSource::Environment,
            detail.clone(),
        ));
        config.cache_type_v = Some(Setting::new(v, SettingSource::Environment, detail));
    }
    if let Some(v) = get("OLLAMA_FLASH_ATTENTION") {
        let on = if truthy(&v) { "on" } else { "off" };
        config.flash_attn = Some(Setting::new(
            on.to_owned(),
            SettingSource::Environment,
            format!("OLLAMA_FLASH_ATTENTION={v}"),
        ));
    }
    config
}

/// Calls `f(key, value, detail)` for each recognised flag, in order (a later flag overrides).
fn for_each_flag(cmdline: &[String], flags: &[(&str, Key)], mut f: impl FnMut(Key, &str, &str)) {
    let mut args = cmdline.iter().skip(1).peekable();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with('-') => (name, Some(value)),
            _ => (arg.as_str(), None),
        };
        let Some(&(_, key)) = flags.iter().find(|(flag, _)| *flag == name) else {
            continue;
        };
        if let Some(value) = inline {
            f(key, value, arg);
        } else if is_switch(key) {
            f(key, "", arg);
        } else if matches!(key, Key::FlashAttn) {
            // `-fa` was a switch before it took on/off/auto.
            match args.peek().map(|v| v.as_str()) {
                Some(v @ ("on" | "off" | "auto" | "1" | "0" | "true" | "false")) => {
                    let detail = format!("{arg} {v}");
                    f(key, v, &detail);
                    args.next();
                }
                _ => f(key, "on", arg),
            }
        } else if let Some(value) = args.next() {
            f(key, value, &format!("{arg} {value}"));
        }
    }
}

fn is_set(config: &RuntimeConfig, key: Key) -> bool {
    match key {
        Key::Model => config.model.is_some(),
        Key::Ctx => config.n_ctx.is_some(),
        Key::GpuLayers => config.n_gpu_layers.is_some(),
        Key::Parallel => config.n_parallel.is_some(),
        Key::Batch => config.n_batch.is_some(),
        Key::Ubatch => config.n_ubatch.is_some(),
        Key::CacheK | Key::CacheKv => config.cache_type_k.is_some(),
        Key::CacheV => config.cache_type_v.is_some(),
        Key::Mlock => config.mlock.is_some(),
        Key::NoMmap => config.no_mmap.is_some(),
        Key::FlashAttn => config.flash_attn.is_some(),
        Key::KvUnified => config.kv_unified.is_some(),
        Key::MaxModelLen => config.max_model_len.is_some(),
        Key::GpuMemUtil => config.gpu_memory_utilization.is_some(),
        Key::KvCacheDtype => config.kv_cache_dtype.is_some(),
        Key::TensorParallel => config.tensor_parallel_size.is_some(),
        Key::MaxNumSeqs => config.max_num_seqs.is_some(),
    }
}

fn apply(config: &mut RuntimeConfig, key: Key, value: &str, source: SettingSource, detail: &str) {
    let text = || Some(Setting::new(value.to_owned(), source, detail));
    let number = || {
        value
            .trim()
            .parse::<u64>()
            .ok()
            .map(|v| Setting::new(v, source, detail))
    };
    let switch = || Some(Setting::new(true, source, detail));
    match key {
        Key::Model => config.model = text(),
        Key::Ctx => config.n_ctx = number().or(config.n_ctx.take()),
        Key::GpuLayers => {
            // `-ngl all`/`auto` in newer builds; -1 and large numbers mean every layer.
            let layers = match value.trim() {
                "all" => Some(-1),
                "auto" => None,
                v => v.parse::<i64>().ok(),
            };
            config.n_gpu_layers = layers
                .map(|v| Setting::new(v, source, detail))
                .or(config.n_gpu_layers.take());
        }
        Key::Parallel => config.n_parallel = number().or(config.n_parallel.take()),
        Key::Batch => config.n_batch = number().or(config.n_batch.take()),
        Key::Ubatch => config.n_ubatch = number().or(config.n_ubatch.take()),
        Key::CacheK => config.cache_type_k = text(),
        Key::CacheV => config.cache_type_v = text(),
        Key::CacheKv => {
            config.cache_type_k = text();
            config.cache_type_v = text();
        }
        Key::Mlock => config.mlock = switch(),
        Key::NoMmap => config.no_mmap = switch(),
        Key::FlashAttn => {
            let v = match value {
                "1" | "true" => "on",
                "0" | "false" => "off",
                other => other,
            };
            config.flash_attn = Some(Setting::new(v.to_owned(), source, detail));
        }
        Key::KvUnified => config.kv_unified = switch(),
        Key::MaxModelLen => config.max_model_len = number().or(config.max_model_len.take()),
        Key::GpuMemUtil => {
            config.gpu_memory_utilization = value
                .parse::<f64>()
                .ok()
                .map(|v| Setting::new(v, source, detail))
                .or(config.gpu_memory_utilization.take())
        }
        Key::KvCacheDtype => config.kv_cache_dtype = text(),
        Key::TensorParallel => {
            config.tensor_parallel_size = number().or(config.tensor_parallel_size.take())
        }
        Key::MaxNumSeqs => config.max_num_seqs = number().or(config.max_num_seqs.take()),
    }
}

fn truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "on" | "yes" | "enabled"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn llama_server_flags_in_every_spelling() {
        let c = parse_llama(
            &args(
                "llama-server -m /m/q.gguf -c 32768 -ngl 28 --parallel=4 -b 1024 -ub 256 -ctk q8_0 --cache-type-v q8_0 --mlock --no-mmap -fa on --kv-unified",
            ),
            &[],
        );
        assert_eq!(c.model.unwrap().value, "/m/q.gguf");
        let ctx = c.n_ctx.unwrap();
        assert_eq!(
            (ctx.value, ctx.source, ctx.detail.as_str()),
            (32768, SettingSource::Cmdline, "-c 32768")
        );
        assert_eq!(c.n_gpu_layers.unwrap().value, 28);
        assert_eq!(c.n_parallel.unwrap().detail, "--parallel=4");
        assert_eq!(c.n_batch.unwrap().value, 1024);
        assert_eq!(c.n_ubatch.unwrap().value, 256);
        assert_eq!(c.cache_type_k.unwrap().value, "q8_0");
        assert_eq!(c.cache_type_v.unwrap().value, "q8_0");
        assert!(c.mlock.unwrap().value && c.no_mmap.unwrap().value && c.kv_unified.unwrap().value);
        assert_eq!(c.flash_attn.unwrap().value, "on");
    }

    #[test]
    fn old_style_flash_attn_switch_and_ngl_all() {
        let c = parse_llama(&args("llama-cli -fa -m x.gguf -ngl all"), &[]);
        assert_eq!(c.flash_attn.unwrap().value, "on");
        assert_eq!(c.model.unwrap().value, "x.gguf");
        assert_eq!(c.n_gpu_layers.unwrap().value, -1);
    }

    #[test]
    fn environment_fills_in_what_the_cmdline_does_not_set() {
        let env = vec![
            ("LLAMA_ARG_CTX_SIZE".to_owned(), "8192".to_owned()),
            ("LLAMA_ARG_N_PARALLEL".to_owned(), "2".to_owned()),
            ("LLAMA_ARG_MLOCK".to_owned(), "1".to_owned()),
        ];
        let c = parse_llama(&args("llama-server -c 4096"), &env);
        assert_eq!(c.n_ctx.unwrap().value, 4096, "the command line wins");
        let parallel = c.n_parallel.unwrap();
        assert_eq!(
            (parallel.value, parallel.source),
            (2, SettingSource::Environment)
        );
        assert!(c.mlock.unwrap().value);
    }

    #[test]
    fn vllm_serve_and_api_server_forms() {
        let c = parse_vllm(&args(
            "vllm serve meta-llama/Llama-3.1-8B --max-model-len 16384 --gpu-memory-utilization 0.85 --kv-cache-dtype fp8 -tp 2 --max-num-seqs 64",
        ));
        assert_eq!(c.model.unwrap().value, "meta-llama/Llama-3.1-8B");
        assert_eq!(c.max_model_len.unwrap().value, 16384);
        assert_eq!(c.gpu_memory_utilization.unwrap().value, 0.85);
        assert_eq!(c.kv_cache_dtype.unwrap().value, "fp8");
        assert_eq!(c.tensor_parallel_size.unwrap().value, 2);
        assert_eq!(c.max_num_seqs.unwrap().value, 64);
        let c = parse_vllm(&args(
            "python3 -m vllm.entrypoints.openai.api_server --model /m/qwen",
        ));
        assert_eq!(c.model.unwrap().value, "/m/qwen");
    }

    #[test]
    fn ollama_environment() {
        let env: Vec<(String, String)> = [
            ("OLLAMA_CONTEXT_LENGTH", "8192"),
            ("OLLAMA_NUM_PARALLEL", "4"),
            ("OLLAMA_KV_CACHE_TYPE", "q8_0"),
            ("OLLAMA_FLASH_ATTENTION", "1"),
            ("OLLAMA_AUTH_TOKEN", "s3cret"),
            ("HOME", "/root"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = parse_ollama_env(&env);
        assert_eq!(c.n_ctx.unwrap().value, 8192);
        assert_eq!(c.n_parallel.unwrap().value, 4);
        assert_eq!(c.cache_type_v.unwrap().value, "q8_0");
        assert_eq!(c.flash_attn.unwrap().value, "on");
        assert_eq!(c.ollama_env.len(), 5);
        assert_eq!(c.ollama_env[4].1, super::super::redact::REDACTED);
    }

    #[test]
    fn malformed_values_are_ignored_not_fatal() {
        let c = parse_llama(&args("llama-server -c lots -ngl -m"), &[]);
        assert!(c.n_ctx.is_none());
        assert!(c.n_gpu_layers.is_none());
    }
}

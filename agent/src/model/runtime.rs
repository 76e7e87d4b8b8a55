//! Which model runtime a process is, from evidence the process cannot hide: its executable,
//! command line, environment, mapped libraries and open devices. No cooperation needed.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The runtimes infermem knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    LlamaCpp,
    Ollama,
    OllamaRunner,
    Vllm,
    Pytorch,
    Transformers,
    OnnxRuntime,
    TextGenerationWebui,
    LmStudio,
    Comfyui,
    StableDiffusionWebui,
    WhisperCpp,
    /// Large model-file mappings, but no rule matched.
    Unknown,
}

impl Runtime {
    /// A name for people.
    pub fn label(self) -> &'static str {
        match self {
            Runtime::LlamaCpp => "llama.cpp",
            Runtime::Ollama => "Ollama server",
            Runtime::OllamaRunner => "Ollama runner",
            Runtime::Vllm => "vLLM",
            Runtime::Pytorch => "PyTorch",
            Runtime::Transformers => "transformers",
            Runtime::OnnxRuntime => "ONNX Runtime",
            Runtime::TextGenerationWebui => "text-generation-webui",
            Runtime::LmStudio => "LM Studio",
            Runtime::Comfyui => "ComfyUI",
            Runtime::StableDiffusionWebui => "stable-diffusion-webui",
            Runtime::WhisperCpp => "whisper.cpp",
            Runtime::Unknown => "unknown",
        }
    }
}

/// What a process shows about itself, gathered by the caller from /proc.
#[derive(Debug, Clone, Default)]
pub struct ProcessEvidence {
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    /// `KEY=value` pairs (empty when /proc/<pid>/environ is unreadable).
    pub environ: Vec<(String, String)>,
    /// Paths of mapped files (libraries and data).
    pub mapped_files: Vec<String>,
    /// Targets of open file descriptors (files and device nodes).
    pub open_files: Vec<String>,
    /// Whether the process maps a file that looks like a model (for the unknown fallback).
    pub has_model_mappings: bool,
}

/// Where a rule found its evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceSource {
    Exe,
    Cmdline,
    Environ,
    MappedLibrary,
    OpenFile,
    ModelMapping,
}

/// One rule that matched, and on what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub runtime: Runtime,
    /// The rule's name, e.g. `libllama-mapped`.
    pub rule: String,
    pub source: EvidenceSource,
    /// The value it matched, e.g. `/usr/lib/libllama.so`.
    pub matched: String,
}

/// The detected runtime and everything that points at it (or at another runtime underneath:
/// text-generation-webui running llama.cpp shows both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detection {
    pub runtime: Runtime,
    pub evidence: Vec<Evidence>,
    /// GPU device nodes the process has open (`/dev/nvidia0`, `/dev/dri/renderD128`, …).
    pub gpu_devices: Vec<String>,
}

/// Detects the runtime; `None` if nothing matched and no model file is mapped.
pub fn detect(p: &ProcessEvidence) -> Option<Detection> {
    let mut evidence = Vec::new();
    let exe_name = p.exe.as_deref().map(file_name).unwrap_or_default();
    let argv0 = p.cmdline.first().map(|a| file_name(a)).unwrap_or_default();
    let args_text = p.cmdline.join(" ");

    // Executables.
    for name in [exe_name, argv0] {
        match name {
            "llama-server" | "llama-cli" | "llama-run" | "llama-bench" | "llama-simple"
            | "llama-mtmd-cli" => push(
                &mut evidence,
                Runtime::LlamaCpp,
                "llama-executable",
                EvidenceSource::Exe,
                name,
            ),
            "ollama_llama_server" => push(
                &mut evidence,
                Runtime::OllamaRunner,
                "ollama-llama-server-executable",
                EvidenceSource::Exe,
                name,
            ),
            "whisper-cli" | "whisper-server" | "whisper-stream" => push(
                &mut evidence,
                Runtime::WhisperCpp,
                "whisper-executable",
                EvidenceSource::Exe,
                name,
            ),
            "lm-studio" | "LM Studio" | "lms" => push(
                &mut evidence,
                Runtime::LmStudio,
                "lmstudio-executable",
                EvidenceSource::Exe,
                name,
            ),
            _ => {}
        }
    }
    if exe_name == "ollama" || argv0 == "ollama" {
        if p.cmdline.iter().skip(1).any(|a| a == "runner") {
            push(
                &mut evidence,
                Runtime::OllamaRunner,
                "ollama-runner-subcommand",
                EvidenceSource::Cmdline,
                &args_text,
            );
        } else {
            push(
                &mut evidence,
                Runtime::Ollama,
                "ollama-executable",
                EvidenceSource::Exe,
                "ollama",
            );
        }
    }

    // Command lines (Python programs are all `python`; their script or module names them).
    let lower = args_text.to_ascii_lowercase();
    let cmdline_rules: [(&str, Runtime, &str); 9] = [
        ("vllm", Runtime::Vllm, "vllm-in-cmdline"),
        (
            "text-generation-webui",
            Runtime::TextGenerationWebui,
            "tgwebui-in-cmdline",
        ),
        ("comfyui", Runtime::Comfyui, "comfyui-in-cmdline"),
        (
            "stable-diffusion-webui",
            Runtime::StableDiffusionWebui,
            "sdwebui-in-cmdline",
        ),
        ("lm studio", Runtime::LmStudio, "lmstudio-in-cmdline"),
        ("lmstudio", Runtime::LmStudio, "lmstudio-in-cmdline"),
        ("whisper.cpp", Runtime::WhisperCpp, "whisper-cpp-in-cmdline"),
        ("llama.cpp", Runtime::LlamaCpp, "llama-cpp-in-cmdline"),
        (
            "llama_cpp",
            Runtime::LlamaCpp,
            "llama-cpp-python-in-cmdline",
        ),
    ];
    for (needle, runtime, rule) in cmdline_rules {
        if lower.contains(needle) {
            push(
                &mut evidence,
                runtime,
                rule,
                EvidenceSource::Cmdline,
                &args_text,
            );
        }
    }
    if let Some(exe) = &p.exe
        && (exe.contains("LM Studio") || exe.contains("LM-Studio") || exe.contains(".lmstudio"))
    {
        push(
            &mut evidence,
            Runtime::LmStudio,
            "lmstudio-exe-path",
            EvidenceSource::Exe,
            exe,
        );
    }

    // Environment: vLLM reads many VLLM_* variables; their presence names it.
    if let Some((key, _)) = p.environ.iter().find(|(key, _)| key.starts_with("VLLM_")) {
        push(
            &mut evidence,
            Runtime::Vllm,
            "vllm-env",
            EvidenceSource::Environ,
            key,
        );
    }

    // Mapped libraries.
    for path in &p.mapped_files {
        let name = file_name(path);
        let lib_rules: [(&str, Runtime, &str); 7] = [
            ("libllama", Runtime::LlamaCpp, "libllama-mapped"),
            ("libwhisper", Runtime::WhisperCpp, "libwhisper-mapped"),
            ("libtorch", Runtime::Pytorch, "libtorch-mapped"),
            (
                "libonnxruntime",
                Runtime::OnnxRuntime,
                "libonnxruntime-mapped",
            ),
            (
                "onnxruntime_pybind11_state",
                Runtime::OnnxRuntime,
                "onnxruntime-python-mapped",
            ),
            ("tokenizers.", Runtime::Transformers, "hf-tokenizers-mapped"),
            ("_vllm_c", Runtime::Vllm, "vllm-extension-mapped"),
        ];
        for (prefix, runtime, rule) in lib_rules {
            if name.starts_with(prefix) && name.contains(".so") {
                push(
                    &mut evidence,
                    runtime,
                    rule,
                    EvidenceSource::MappedLibrary,
                    path,
                );
            }
        }
        if path.contains("/site-packages/transformers/")
            || path.contains("/site-packages/safetensors/")
        {
            push(
                &mut evidence,
                Runtime::Transformers,
                "hf-python-extension-mapped",
                EvidenceSource::MappedLibrary,
                path,
            );
        }
    }

    let gpu_devices: Vec<String> = p
        .open_files
        .iter()
        .filter(|f| is_gpu_device(f))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();

    let runtime = PRIORITY
        .iter()
        .copied()
        .find(|r| evidence.iter().any(|e| e.runtime == *r));
    let runtime = match runtime {
        Some(runtime) => runtime,
        None if p.has_model_mappings => {
            push(
                &mut evidence,
                Runtime::Unknown,
                "model-file-mapped",
                EvidenceSource::ModelMapping,
                "large model file mapping, no runtime rule matched",
            );
            Runtime::Unknown
        }
        None => return None,
    };
    dedup(&mut evidence);
    Some(Detection {
        runtime,
        evidence,
        gpu_devices,
    })
}

fn push(
    evidence: &mut Vec<Evidence>,
    runtime: Runtime,
    rule: &str,
    source: EvidenceSource,
    matched: &str,
) {
    evidence.push(Evidence {
        runtime,
        rule: rule.to_owned(),
        source,
        matched: matched.to_owned(),
    });
}

/// When several rules match, the most specific runtime names the process: an application
/// (text-generation-webui, ComfyUI) before the engine it embeds (llama.cpp, PyTorch).
const PRIORITY: [Runtime; 12] = [
    Runtime::OllamaRunner,
    Runtime::Ollama,
    Runtime::LmStudio,
    Runtime::TextGenerationWebui,
    Runtime::Comfyui,
    Runtime::StableDiffusionWebui,
    Runtime::Vllm,
    Runtime::WhisperCpp,
    Runtime::LlamaCpp,
    Runtime::OnnxRuntime,
    Runtime::Transformers,
    Runtime::Pytorch,
];

fn dedup(evidence: &mut Vec<Evidence>) {
    let mut seen = std::collections::HashSet::new();
    evidence.retain(|e| seen.insert((e.runtime, e.rule.clone(), e.matched.clone())));
}

fn file_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

fn is_gpu_device(path: &str) -> bool {
    path.starts_with("/dev/nvidia") || path.starts_with("/dev/dri/") || path == "/dev/kfd"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(exe: &str, cmdline: &[&str], mapped: &[&str]) -> ProcessEvidence {
        ProcessEvidence {
            exe: Some(exe.to_owned()),
            cmdline: cmdline.iter().map(|s| s.to_string()).collect(),
            mapped_files: mapped.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn llama_server_by_executable() {
        let d = detect(&evidence(
            "/opt/llama/llama-server",
            &["./llama-server", "-m", "x.gguf"],
            &[],
        ))
        .unwrap();
        assert_eq!(d.runtime, Runtime::LlamaCpp);
        assert_eq!(d.evidence[0].rule, "llama-executable");
    }

    #[test]
    fn llama_cpp_python_by_mapped_library() {
        let d = detect(&evidence(
            "/usr/bin/python3.11",
            &["python3", "serve.py"],
            &["/venv/lib/python3.11/site-packages/llama_cpp/lib/libllama.so"],
        ))
        .unwrap();
        assert_eq!(d.runtime, Runtime::LlamaCpp);
        assert_eq!(d.evidence[0].source, EvidenceSource::MappedLibrary);
    }

    #[test]
    fn ollama_server_and_runner() {
        let server = detect(&evidence(
            "/usr/local/bin/ollama",
            &["/usr/local/bin/ollama", "serve"],
            &[],
        ))
        .unwrap();
        assert_eq!(server.runtime, Runtime::Ollama);
        let runner = detect(&evidence(
            "/usr/local/bin/ollama",
            &[
                "/usr/local/bin/ollama",
                "runner",
                "--model",
                "/root/.ollama/models/blobs/sha256-ab",
                "--ctx-size",
                "8192",
            ],
            &[],
        ))
        .unwrap();
        assert_eq!(runner.runtime, Runtime::OllamaRunner);
    }

    #[test]
    fn applications_win_over_the_engine_they_embed() {
        let d = detect(&evidence(
            "/usr/bin/python3",
            &[
                "python",
                "/home/u/text-generation-webui/server.py",
                "--listen",
            ],
            &[
                "/x/site-packages/llama_cpp_cuda/lib/libllama.so",
                "/x/torch/lib/libtorch_cpu.so",
            ],
        ))
        .unwrap();
        assert_eq!(d.runtime, Runtime::TextGenerationWebui);
        let engines: Vec<Runtime> = d.evidence.iter().map(|e| e.runtime).collect();
        assert!(engines.contains(&Runtime::LlamaCpp) && engines.contains(&Runtime::Pytorch));
    }

    #[test]
    fn vllm_pytorch_onnx_comfyui_whisper() {
        let cases = [
            (
                evidence(
                    "/usr/bin/python3",
                    &["python3", "-m", "vllm.entrypoints.openai.api_server"],
                    &[],
                ),
                Runtime::Vllm,
            ),
            (
                evidence(
                    "/usr/bin/python3",
                    &["python", "train.py"],
                    &["/x/torch/lib/libtorch_cuda.so"],
                ),
                Runtime::Pytorch,
            ),
            (
                evidence(
                    "/usr/bin/python3",
                    &["python", "infer.py"],
                    &["/x/onnxruntime/capi/libonnxruntime_providers_shared.so"],
                ),
                Runtime::OnnxRuntime,
            ),
            (
                evidence("/usr/bin/python3", &["python", "/srv/ComfyUI/main.py"], &[]),
                Runtime::Comfyui,
            ),
            (
                evidence(
                    "/opt/whisper.cpp/build/bin/whisper-server",
                    &["whisper-server"],
                    &[],
                ),
                Runtime::WhisperCpp,
            ),
            (
                evidence(
                    "/usr/bin/python3",
                    &["python", "launch.py"],
                    &[
                        "/x/stable-diffusion-webui/venv/lib/python3.10/site-packages/torch/lib/libtorch.so",
                    ],
                ),
                Runtime::Pytorch,
            ),
        ];
        for (evidence, expected) in cases {
            assert_eq!(detect(&evidence).unwrap().runtime, expected, "{evidence:?}");
        }
    }

    #[test]
    fn unknown_runtime_with_model_mappings_and_nothing_without() {
        let mut p = evidence("/usr/local/bin/myengine", &["myengine"], &[]);
        assert!(detect(&p).is_none());
        p.has_model_mappings = true;
        let d = detect(&p).unwrap();
        assert_eq!(d.runtime, Runtime::Unknown);
        assert_eq!(d.evidence[0].rule, "model-file-mapped");
    }

    #[test]
    fn gpu_devices_are_listed() {
        let mut p = evidence("/usr/bin/llama-server", &["llama-server"], &[]);
        p.open_files = vec![
            "/dev/nvidia0".into(),
            "/dev/nvidiactl".into(),
            "/dev/null".into(),
            "/dev/nvidia0".into(),
        ];
        assert_eq!(
            detect(&p).unwrap().gpu_devices,
            vec!["/dev/nvidia0", "/dev/nvidiactl"]
        );
    }
}

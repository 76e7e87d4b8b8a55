//! Which model runtime a process is, from evidence the process cannot hide: its executable,
//! command line, environment, mapped libraries and open devices. No cooperation needed.

use std::{
    collections::{BTreeSet, HashSet},
    path::Path,
};

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
    /// Its id, as the JSON and the policy's matchers spell it (`llama-cpp`, `ollama`…).
    pub fn id(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

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
    let mut evidence = [
        by_executable_name(p),
        by_command_line(p),
        by_executable_path(p),
        by_environment(p),
        by_mapped_libraries(p),
    ]
    .concat();
    let runtime = decide(&mut evidence, p.has_model_mappings)?;
    dedup(&mut evidence);
    Some(Detection {
        runtime,
        evidence,
        gpu_devices: gpu_devices(&p.open_files),
    })
}

/// A rule: the text it looks for, the runtime that text names, and the rule's name.
struct Rule {
    pattern: &'static str,
    runtime: Runtime,
    name: &'static str,
}

const fn rule(pattern: &'static str, runtime: Runtime, name: &'static str) -> Rule {
    Rule {
        pattern,
        runtime,
        name,
    }
}

impl Rule {
    fn evidence(&self, source: EvidenceSource, matched: &str) -> Evidence {
        evidence(self.runtime, self.name, source, matched)
    }
}

fn evidence(runtime: Runtime, rule: &str, source: EvidenceSource, matched: &str) -> Evidence {
    Evidence {
        runtime,
        rule: rule.to_owned(),
        source,
        matched: matched.to_owned(),
    }
}

/// Executable names (of the exe or of argv[0]) that name a runtime.
const EXECUTABLES: &[Rule] = &[
    rule("llama-server", Runtime::LlamaCpp, "llama-executable"),
    rule("llama-cli", Runtime::LlamaCpp, "llama-executable"),
    rule("llama-run", Runtime::LlamaCpp, "llama-executable"),
    rule("llama-bench", Runtime::LlamaCpp, "llama-executable"),
    rule("llama-simple", Runtime::LlamaCpp, "llama-executable"),
    rule("llama-mtmd-cli", Runtime::LlamaCpp, "llama-executable"),
    rule(
        "ollama_llama_server",
        Runtime::OllamaRunner,
        "ollama-llama-server-executable",
    ),
    rule("whisper-cli", Runtime::WhisperCpp, "whisper-executable"),
    rule("whisper-server", Runtime::WhisperCpp, "whisper-executable"),
    rule("whisper-stream", Runtime::WhisperCpp, "whisper-executable"),
    rule("lm-studio", Runtime::LmStudio, "lmstudio-executable"),
    rule("LM Studio", Runtime::LmStudio, "lmstudio-executable"),
    rule("lms", Runtime::LmStudio, "lmstudio-executable"),
];

/// The exe's and argv[0]'s names; `ollama` is its server, or a runner with `runner` among
/// its arguments.
fn by_executable_name(p: &ProcessEvidence) -> Vec<Evidence> {
    let exe_name = p.exe.as_deref().map(file_name).unwrap_or_default();
    let argv0 = p.cmdline.first().map(|a| file_name(a)).unwrap_or_default();
    let mut found: Vec<Evidence> = [exe_name, argv0]
        .into_iter()
        .filter_map(|name| {
            let rule = EXECUTABLES.iter().find(|r| r.pattern == name)?;
            Some(rule.evidence(EvidenceSource::Exe, name))
        })
        .collect();
    if exe_name == "ollama" || argv0 == "ollama" {
        found.push(if p.cmdline.iter().skip(1).any(|a| a == "runner") {
            evidence(
                Runtime::OllamaRunner,
                "ollama-runner-subcommand",
                EvidenceSource::Cmdline,
                &p.cmdline.join(" "),
            )
        } else {
            evidence(
                Runtime::Ollama,
                "ollama-executable",
                EvidenceSource::Exe,
                "ollama",
            )
        });
    }
    found
}

/// Words in a command line (lower-cased) that name a runtime: Python programs are all
/// `python`; their script or module names them.
const COMMAND_LINE_WORDS: &[Rule] = &[
    rule("vllm", Runtime::Vllm, "vllm-in-cmdline"),
    rule(
        "text-generation-webui",
        Runtime::TextGenerationWebui,
        "tgwebui-in-cmdline",
    ),
    rule("comfyui", Runtime::Comfyui, "comfyui-in-cmdline"),
    rule(
        "stable-diffusion-webui",
        Runtime::StableDiffusionWebui,
        "sdwebui-in-cmdline",
    ),
    rule("lm studio", Runtime::LmStudio, "lmstudio-in-cmdline"),
    rule("lmstudio", Runtime::LmStudio, "lmstudio-in-cmdline"),
    rule("whisper.cpp", Runtime::WhisperCpp, "whisper-cpp-in-cmdline"),
    rule("llama.cpp", Runtime::LlamaCpp, "llama-cpp-in-cmdline"),
    rule(
        "llama_cpp",
        Runtime::LlamaCpp,
        "llama-cpp-python-in-cmdline",
    ),
];

fn by_command_line(p: &ProcessEvidence) -> Vec<Evidence> {
    let args_text = p.cmdline.join(" ");
    let lower = args_text.to_ascii_lowercase();
    COMMAND_LINE_WORDS
        .iter()
        .filter(|r| lower.contains(r.pattern))
        .map(|r| r.evidence(EvidenceSource::Cmdline, &args_text))
        .collect()
}

/// LM Studio's install directory in the exe's path.
fn by_executable_path(p: &ProcessEvidence) -> Vec<Evidence> {
    p.exe
        .iter()
        .filter(|exe| {
            exe.contains("LM Studio") || exe.contains("LM-Studio") || exe.contains(".lmstudio")
        })
        .map(|exe| {
            evidence(
                Runtime::LmStudio,
                "lmstudio-exe-path",
                EvidenceSource::Exe,
                exe,
            )
        })
        .collect()
}

/// vLLM reads many VLLM_* variables; their presence names it.
fn by_environment(p: &ProcessEvidence) -> Vec<Evidence> {
    p.environ
        .iter()
        .find(|(key, _)| key.starts_with("VLLM_"))
        .map(|(key, _)| evidence(Runtime::Vllm, "vllm-env", EvidenceSource::Environ, key))
        .into_iter()
        .collect()
}

/// Shared libraries (file name prefixes of `.so` files) that name a runtime.
const LIBRARIES: &[Rule] = &[
    rule("libllama", Runtime::LlamaCpp, "libllama-mapped"),
    rule("libwhisper", Runtime::WhisperCpp, "libwhisper-mapped"),
    rule("libtorch", Runtime::Pytorch, "libtorch-mapped"),
    rule(
        "libonnxruntime",
        Runtime::OnnxRuntime,
        "libonnxruntime-mapped",
    ),
    rule(
        "onnxruntime_pybind11_state",
        Runtime::OnnxRuntime,
        "onnxruntime-python-mapped",
    ),
    rule("tokenizers.", Runtime::Transformers, "hf-tokenizers-mapped"),
    rule("_vllm_c", Runtime::Vllm, "vllm-extension-mapped"),
];

/// Mapped libraries, and the native extensions of Hugging Face's Python packages.
fn by_mapped_libraries(p: &ProcessEvidence) -> Vec<Evidence> {
    let mut found = Vec::new();
    for path in &p.mapped_files {
        let name = file_name(path);
        found.extend(
            LIBRARIES
                .iter()
                .filter(|r| name.starts_with(r.pattern) && name.contains(".so"))
                .map(|r| r.evidence(EvidenceSource::MappedLibrary, path)),
        );
        if path.contains("/site-packages/transformers/")
            || path.contains("/site-packages/safetensors/")
        {
            found.push(evidence(
                Runtime::Transformers,
                "hf-python-extension-mapped",
                EvidenceSource::MappedLibrary,
                path,
            ));
        }
    }
    found
}

/// The runtime the evidence names, the first in [`PRIORITY`]; else `Unknown`, with evidence
/// saying why, for a process that maps a model file; else `None`.
fn decide(found: &mut Vec<Evidence>, has_model_mappings: bool) -> Option<Runtime> {
    let named = PRIORITY
        .iter()
        .copied()
        .find(|r| found.iter().any(|e| e.runtime == *r));
    if named.is_some() || !has_model_mappings {
        return named;
    }
    found.push(evidence(
        Runtime::Unknown,
        "model-file-mapped",
        EvidenceSource::ModelMapping,
        "large model file mapping, no runtime rule matched",
    ));
    Some(Runtime::Unknown)
}

/// GPU device nodes among the open files, sorted, each once.
fn gpu_devices(open_files: &[String]) -> Vec<String> {
    open_files
        .iter()
        .filter(|f| is_gpu_device(f))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
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
    let mut seen = HashSet::new();
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

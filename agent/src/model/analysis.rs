//! The `model` section of `inspect`: which runtime a process is, which model files it uses,
//! how it is configured, and what its model will cost in memory, with the n_ctx in effect
//! read from its configuration or inferred from the KV cache allocation the kernel saw.
//! The memory prediction is worked out in `prediction`, the KV cache recognised among the
//! process's anonymous blocks in `kv_inference`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    config::{self, RuntimeConfig},
    cpu_backend::{self, CpuBackend},
    discovery::{self, FoundBy, ModelFile, ModelFormat, Recognised},
    ollama,
    open::ProcessFiles,
    profile::{self, ModelProfile},
    redact,
    runtime::{self, Evidence, EvidenceSource, ProcessEvidence, Runtime},
};

mod kv_inference;
mod prediction;

pub use kv_inference::{InferredCtx, infer_ctx};
pub use prediction::Prediction;

/// What `inspect` knows about a process, gathered from /proc and the probes.
#[derive(Debug, Clone, Default)]
pub struct ProcessFacts {
    pub pid: u32,
    pub exe: Option<PathBuf>,
    pub cmdline: Vec<String>,
    pub environ: Vec<(String, String)>,
    /// Every mapped file with its resident bytes.
    pub mapped_files: Vec<(PathBuf, u64)>,
    /// Files the probes saw being mapped while sampling.
    pub mmap_event_files: Vec<PathBuf>,
    pub open_files: Vec<PathBuf>,
    /// Large anonymous memory: allocations the probes saw and areas in /proc/<pid>/maps.
    pub anon_blocks: Vec<AnonBlock>,
}

/// A large block of anonymous memory, a candidate KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnonBlock {
    pub address: u64,
    pub bytes: u64,
    pub source: BlockSource,
    /// Bytes of it in memory or swapped out (written at some point), from pagemap; read only
    /// for a block whose size fits a KV cache, null otherwise or when unknown.
    pub resident_bytes: Option<u64>,
}

/// How a block was seen. Exactness differs: an mmap'd malloc chunk is the request plus at
/// most a page of header and alignment; heap growth (brk) is the request give or take the
/// heap's free top; /proc areas may be merged with neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockSource {
    ProbeMmap,
    ProbeBrk,
    ProbeMremap,
    ProcMaps,
}

/// The `model` section of the inspect report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    /// Runtime id, e.g. `llama-cpp`; `unknown` when only model-file mappings point at one.
    pub runtime: Runtime,
    /// The runtime's name for people, e.g. `llama.cpp`.
    pub runtime_label: String,
    pub runtime_evidence: Vec<Evidence>,
    /// GPU device nodes the process has open.
    pub gpu_devices: Vec<String>,
    pub files: Vec<ModelFileReport>,
    pub config: RuntimeConfig,
    /// Memory prediction for the main model file; null when no file could be profiled.
    pub prediction: Option<Prediction>,
    /// What could not be worked out, and why.
    pub notes: Vec<String>,
}

/// A model file and what it says about the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFileReport {
    #[serde(flatten)]
    pub file: ModelFile,
    /// Bytes of the file resident in the process's mappings.
    pub resident_bytes: u64,
    /// Null for formats infermem does not parse (PyTorch, ONNX) or when parsing failed.
    pub profile: Option<ModelProfile>,
    pub error: Option<String>,
}

/// How long to wait for Ollama's API.
const OLLAMA_TIMEOUT: Duration = Duration::from_millis(500);

/// Builds the model section; `None` when the process is no model runtime and maps no model.
pub fn analyze(facts: &ProcessFacts) -> Option<ModelReport> {
    let process_files = ProcessFiles::new(facts.pid);
    let recognised = discovery::recognise(candidate_files(facts), |p| process_files.open(p));
    let detection = runtime::detect(&process_evidence(facts, &recognised))?;
    let mut notes = Vec::new();
    let llama_program = is_llama_program(&detection.evidence);
    let mut config = read_config(detection.runtime, llama_program, facts, &mut notes);
    let files: Vec<ModelFileReport> = recognised
        .into_iter()
        .map(|f| file_report(f, facts, &process_files))
        .collect();
    let cpu_backend = runs_on_ggml(detection.runtime, &files)
        .then(|| detect_cpu_backend(facts))
        .flatten();
    let prediction = prediction::predict(
        llama_program,
        &files,
        &mut config,
        facts,
        cpu_backend,
        &mut notes,
    );
    Some(ModelReport {
        runtime: detection.runtime,
        runtime_label: detection.runtime.label().to_owned(),
        runtime_evidence: detection.evidence,
        gpu_devices: detection.gpu_devices,
        files,
        config,
        prediction,
        notes,
    })
}

/// Every file the process maps, was seen mapping or has open, with how it was found.
fn candidate_files(facts: &ProcessFacts) -> impl Iterator<Item = (PathBuf, FoundBy)> + '_ {
    let mapped = facts
        .mapped_files
        .iter()
        .map(|(p, _)| (p.clone(), FoundBy::Mapped));
    let mmap_events = facts
        .mmap_event_files
        .iter()
        .map(|p| (p.clone(), FoundBy::MmapEvent));
    let open = facts
        .open_files
        .iter()
        .map(|p| (p.clone(), FoundBy::OpenFd));
    mapped.chain(mmap_events).chain(open)
}

/// What runtime detection looks at, its command line redacted.
fn process_evidence(facts: &ProcessFacts, recognised: &[Recognised]) -> ProcessEvidence {
    let to_string = |p: &PathBuf| p.to_string_lossy().into_owned();
    ProcessEvidence {
        exe: facts.exe.as_ref().map(to_string),
        cmdline: redact::cmdline(&facts.cmdline),
        environ: facts.environ.clone(),
        mapped_files: facts
            .mapped_files
            .iter()
            .map(|(p, _)| to_string(p))
            .collect(),
        open_files: facts.open_files.iter().map(to_string).collect(),
        has_model_mappings: recognised
            .iter()
            .any(|f| f.file.found_by.contains(&FoundBy::Mapped)),
    }
}

/// The runtime's configuration, from wherever that runtime keeps it; Ollama's server is asked
/// which models it has loaded (a note says why not when it does not answer).
fn read_config(
    runtime: Runtime,
    llama_program: bool,
    facts: &ProcessFacts,
    notes: &mut Vec<String>,
) -> RuntimeConfig {
    match runtime {
        Runtime::Vllm => config::parse_vllm(&facts.cmdline),
        Runtime::Ollama => {
            let mut config = config::parse_ollama_env(&facts.environ);
            match ollama::ask_own_server(facts.pid, &facts.environ, OLLAMA_TIMEOUT) {
                Ok(loaded) => config.ollama_loaded = Some(loaded),
                Err(err) => notes.push(err),
            }
            config
        }
        // llama.cpp's flags mean something only to its own programs: a Python program
        // embedding libllama has flags of its own (`-c` may well be a config file).
        _ if llama_program => config::parse_llama(&facts.cmdline, &facts.environ),
        _ => RuntimeConfig::default(),
    }
}

/// The ggml CPU backend among the process's mapped libraries, read in its own root.
fn detect_cpu_backend(facts: &ProcessFacts) -> Option<CpuBackend> {
    let mapped: Vec<&Path> = facts
        .mapped_files
        .iter()
        .map(|(p, _)| p.as_path())
        .collect();
    cpu_backend::detect(&PathBuf::from(format!("/proc/{}/root", facts.pid)), &mapped)
}

/// A recognised file's report: its profile (or why it has none) and its resident bytes.
fn file_report(
    Recognised { file, opened }: Recognised,
    facts: &ProcessFacts,
    process_files: &ProcessFiles,
) -> ModelFileReport {
    let open = |p: &Path| process_files.open(p);
    let (profile, error) = match profile::profile_opened(&opened, file.format, &open) {
        Ok(profile) => (profile, None),
        Err(err) => (None, Some(err)),
    };
    let resident_bytes = facts
        .mapped_files
        .iter()
        .filter(|(p, _)| *p == file.path)
        .map(|(_, r)| r)
        .sum();
    ModelFileReport {
        file,
        resident_bytes,
        profile,
        error,
    }
}

/// Whether the main model is a GGUF file run by ggml (llama.cpp, Ollama and the like, not
/// vLLM), so that ggml's CPU backend decides where its CPU weights live.
fn runs_on_ggml(runtime: Runtime, files: &[ModelFileReport]) -> bool {
    runtime != Runtime::Vllm
        && files
            .iter()
            .find(|f| f.profile.is_some())
            .is_some_and(|f| f.file.format == ModelFormat::Gguf)
}

/// Whether the process is one of llama.cpp's programs (llama-server, llama-cli…) or Ollama's
/// runner, which take llama.cpp's flags, rather than a program embedding libllama.
fn is_llama_program(evidence: &[Evidence]) -> bool {
    evidence.iter().any(|e| {
        e.source == EvidenceSource::Exe
            && matches!(e.runtime, Runtime::LlamaCpp | Runtime::OllamaRunner)
    })
}

#[cfg(test)]
mod tests;

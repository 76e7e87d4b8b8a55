//! Model understanding: which runtime a process is, which model files it uses, what those
//! files say about the model, and how much memory the model needs.
//!
//! - [`runtime`]: runtime detection from exe, cmdline, environment, libraries and devices;
//! - [`discovery`]: finding model files among mapped and open files;
//! - [`open`]: opening untrusted files without blocking, through the process's own view;
//! - [`ggml`], [`gguf`], [`safetensors`]: bounded parsers of model file headers;
//! - [`profile`]: the model as a file describes it; [`profile_cache`]: parsed files by inode;
//! - [`facts`]: what the analysis needs to know about a process;
//! - [`config`], [`ollama`]: the runtime's configuration (cmdline, env, Ollama's API);
//! - [`redact`]: secrets in command lines and environments, redacted before output;
//! - [`cpu_backend`]: the instruction sets of a process's ggml CPU backend and the weights it
//!   copies into extra buffers (AMX, CPU_REPACK);
//! - [`memory`]: KV cache, weights split, compute buffers, footprints;
//! - [`analysis`]: the `model` section of `inspect`;
//! - [`plan`]: placement advice for `infermem plan`.

pub mod analysis;
pub mod config;
pub mod cpu_backend;
pub mod discovery;
pub mod facts;
pub mod ggml;
pub mod gguf;
pub mod memory;
pub mod ollama;
pub mod open;
pub mod plan;
pub mod profile;
pub mod profile_cache;
pub mod redact;
pub mod runtime;
pub mod safetensors;

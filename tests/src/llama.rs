//! Driving a real llama.cpp (llama-cpp-python, built from source by `cargo xtask test`) and
//! reading what it says about its own memory.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::Talker;

/// The Python of the tests' venv (`cargo xtask test` provisions it and passes its path).
pub fn python() -> PathBuf {
    let python = std::env::var_os("INFERMEM_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/llama-venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run the suite with `cargo xtask test`, which installs llama-cpp-python \
         and the gguf package in a venv (these tests do not skip)",
        python.display()
    );
    python
}

fn script(name: &str) -> PathBuf {
    crate::workspace_root().join("tests/llama").join(name)
}

/// Writes a test model with the `gguf` package (see tests/llama/make_model.py for shapes).
pub fn make_model(out: &Path, shape: &str, weight_type: &str) {
    let output = crate::output_of(
        Command::new(python())
            .arg(script("make_model.py"))
            .arg(out)
            .args(["--shape", shape, "--weight-type", weight_type]),
    );
    assert!(
        output.status.success(),
        "make_model.py {shape} {weight_type} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// KV cache settings of one llama.cpp run.
#[derive(Debug, Clone, Copy)]
pub struct KvSettings {
    pub n_ctx: u64,
    pub type_k: &'static str,
    pub type_v: &'static str,
    pub flash_attn: bool,
}

/// llama.cpp (through run_llama.py) waiting to load `model` until it is sent a line; its
/// log goes to `log`.
pub fn start(model: &Path, kv: KvSettings, log: &Path) -> Talker {
    let mut cmd = command(model, kv);
    cmd.arg("--wait-before-load");
    Talker::spawn_logging(cmd, log)
}

/// llama.cpp (through run_llama.py) loading `model` at once; its log goes to `log`.
pub fn start_loaded(model: &Path, kv: KvSettings, log: &Path) -> Talker {
    Talker::spawn_logging(command(model, kv), log)
}

fn command(model: &Path, kv: KvSettings) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(script("run_llama.py")).arg(model).args([
        "--n-ctx",
        &kv.n_ctx.to_string(),
        "--type-k",
        kv.type_k,
        "--type-v",
        kv.type_v,
    ]);
    if kv.flash_attn {
        cmd.arg("--flash-attn");
    }
    cmd
}

/// What llama.cpp logged about its memory.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaLog {
    /// `llama_kv_cache: size = X MiB (N cells, ...)`.
    pub kv_mib: f64,
    pub kv_cells: u64,
    /// Sum of every `<buffer> model buffer size = X MiB`.
    pub model_buffers_mib: f64,
    /// Sum of the CPU backend's extra buffers (`CPU_REPACK`, `AMX`): the repacked weights.
    pub repacked_mib: Option<f64>,
    /// `CPU compute buffer size = X MiB`.
    pub compute_mib: Option<f64>,
}

/// Parses llama.cpp's log.
pub fn parse_log(log: &str) -> LlamaLog {
    let mib_after = |line: &str, marker: &str| -> Option<f64> {
        let rest = &line[line.find(marker)? + marker.len()..];
        rest.trim_start_matches([' ', '='])
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let kv_line = log
        .lines()
        .find(|l| l.contains("llama_kv_cache: size ="))
        .unwrap_or_else(|| panic!("llama.cpp logged no KV cache size:\n{log}"));
    let kv_mib = mib_after(kv_line, "size").expect("KV size");
    let kv_cells = kv_line
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("KV cells");
    let model_buffers_mib = log
        .lines()
        .filter(|l| l.contains("model buffer size"))
        .filter_map(|l| mib_after(l, "model buffer size"))
        .sum();
    let repacked: Vec<f64> = log
        .lines()
        .filter(|l| {
            l.contains("CPU_REPACK model buffer size") || l.contains("AMX model buffer size")
        })
        .filter_map(|l| mib_after(l, "model buffer size"))
        .collect();
    let repacked_mib = (!repacked.is_empty()).then(|| repacked.iter().sum());
    let compute_mib = log
        .lines()
        .find(|l| l.contains("CPU compute buffer size ="))
        .and_then(|l| mib_after(l, "compute buffer size"));
    LlamaLog {
        kv_mib,
        kv_cells,
        model_buffers_mib,
        repacked_mib,
        compute_mib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama_cpp_log_lines() {
        let log = "load_tensors:   CPU_Mapped model buffer size =    44.58 MiB\n\
                   load_tensors:   CPU_REPACK model buffer size =     2.25 MiB\n\
                   llama_kv_cache: size =   10.00 MiB (  1280 cells,  16 layers,  1/1 seqs), K (f16):    5.00 MiB, V (f16):    5.00 MiB\n\
                   sched_reserve:        CPU compute buffer size =     9.04 MiB\n";
        let parsed = parse_log(log);
        assert_eq!(parsed.kv_mib, 10.0);
        assert_eq!(parsed.kv_cells, 1280);
        assert_eq!(parsed.model_buffers_mib, 44.58 + 2.25);
        assert_eq!(parsed.repacked_mib, Some(2.25));
        assert_eq!(parsed.compute_mib, Some(9.04));
    }
}

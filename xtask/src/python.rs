//! The Python environment of the llama.cpp end-to-end tests: a venv under `target/` with the
//! `gguf` package (writes the test models) and llama-cpp-python, which builds llama.cpp from
//! source. That build takes minutes, so its wheel is cached in `~/.cache/infermem/wheels`, keyed
//! by the version and the build configuration, and built once per machine.
//!
//! The build is portable, not native: llama.cpp's own x86-64 "haswell" level (AVX2, FMA, F16C,
//! BMI2; no AVX-512, no AMX). A native build follows the CPU flags the host advertises, and on
//! virtual machines that advertise AMX without being able to run it, the AMX int8 kernels die
//! with SIGILL. The haswell level runs on every x86-64 CI host of the last decade, and it still
//! repacks Q4_0 weights into llama.cpp's `CPU_REPACK` buffer (AVX2), which the tests check.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use crate::cargo::run;

/// llama-cpp-python's version; its vendored llama.cpp is what the tests check against.
pub const LLAMA_CPP_PYTHON: &str = "0.3.36";

/// CMake options of the llama.cpp build: the haswell level, with weight repacking.
pub const LLAMA_CMAKE_ARGS: &str = "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON \
     -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF \
     -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF \
     -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CPU_REPACK=ON -DGGML_BACKEND_DL=OFF";

/// Names the wheel's build: the version and a hash of the CMake options, so that a change of
/// either builds a new wheel instead of reusing one built differently.
fn build_key() -> String {
    let hash = LLAMA_CMAKE_ARGS
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    format!("{LLAMA_CPP_PYTHON}-haswell-{:08x}", hash as u32)
}

/// Pinned pure-Python/binary dependencies of the tests' scripts.
const PACKAGES: &[&str] = &[
    "gguf==0.19.0",
    "numpy==2.4.6",
    "PyYAML==6.0.4",
    "tqdm==4.70.1",
    "requests==2.34.2",
    "diskcache==5.6.3",
    "Jinja2==3.1.6",
    "MarkupSafe==3.0.4",
    "typing_extensions==4.16.0",
];

/// Makes sure the venv exists with everything installed; returns its python.
pub fn ensure_llama_env(target_dir: &Path) -> Result<PathBuf> {
    let venv = target_dir.join("llama-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(format!(".infermem-llama-cpp-python-{}", build_key()));
    if stamp.exists() {
        return Ok(python);
    }
    let wheel = cached_wheel()?;
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let pip = venv.join("bin/pip");
    run(Command::new(&pip)
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PACKAGES))?;
    run(Command::new(&pip)
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--force-reinstall",
        ])
        .arg(&wheel))?;
    std::fs::write(&stamp, "")?;
    Ok(python)
}

/// The llama-cpp-python wheel, built from its PyPI source distribution on first use.
fn cached_wheel() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let cache = PathBuf::from(home)
        .join(".cache/infermem/wheels")
        .join(build_key());
    let name = format!("llama_cpp_python-{LLAMA_CPP_PYTHON}-py3-none-linux_x86_64.whl");
    let wheel = cache.join(&name);
    if wheel.exists() {
        return Ok(wheel);
    }
    std::fs::create_dir_all(&cache)?;
    eprintln!(
        "building llama-cpp-python {LLAMA_CPP_PYTHON} (llama.cpp from source, CPU only, x86-64 \
         haswell level): a few minutes, once"
    );
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
        ])
        .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON}"))
        .arg("--wheel-dir")
        .arg(&cache)
        .env("CMAKE_BUILD_PARALLEL_LEVEL", cores.to_string())
        .env("CMAKE_ARGS", LLAMA_CMAKE_ARGS)
        .env("FORCE_CMAKE", "1"))?;
    ensure!(wheel.exists(), "pip built no {name} in {}", cache.display());
    Ok(wheel)
}

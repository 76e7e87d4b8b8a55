//! infermem against a real llama.cpp (llama-cpp-python, built from source): its KV and
//! weight predictions must match what llama.cpp itself reports, and `inspect` must recognise
//! the runtime, the model file and the n_ctx in effect, inferred from the KV cache allocation
//! the probes see (llama-cpp-python takes n_ctx through its API, not its command line).
//!
//! Models are written by the `gguf` package in three shapes (GQA: 2 of 8 heads carry KV; MHA:
//! all 8 do; a narrow 6-layer one), run at several contexts, with an f16 and a quantized (q8_0)
//! KV cache. Weights are f16, q8_0 or q4_0: the test build of llama.cpp is x86-64 "haswell"
//! level (AVX2, see xtask/src/python.rs), whose CPU backend copies q4_0 matrices into its
//! `CPU_REPACK` buffer and leaves f16 and q8_0 in the mapped file; both cases are checked
//! against llama.cpp's own buffer sizes.

use std::path::Path;

use infermem::model::{
    ggml::GgmlType,
    gguf,
    memory::{ContextShape, KvModel, kv_cells},
    profile,
};
use infermem_tests::{
    Inspection, assert_close,
    daemon::{Daemon, NOTICE_TIMEOUT, workload_of},
    f64_of,
    llama::{self, KvSettings, LlamaLog},
    output_of, require_root, scratch_dir,
};
use serde_json::Value;

const MIB: f64 = 1024.0 * 1024.0;

/// The runs of one model: contexts that are and are not multiples of 256, f16 and q8_0 caches.
/// Flash attention is off, llama-cpp-python's default, except for the quantized cache, which
/// needs it (infermem cannot read it from a Python program, so that is what it assumes).
fn runs() -> [KvSettings; 3] {
    [
        KvSettings {
            n_ctx: 512,
            type_k: "f16",
            type_v: "f16",
            flash_attn: false,
        },
        KvSettings {
            n_ctx: 1100,
            type_k: "f16",
            type_v: "f16",
            flash_attn: false,
        },
        KvSettings {
            n_ctx: 3000,
            type_k: "q8_0",
            type_v: "q8_0",
            flash_attn: true,
        },
    ]
}

#[test]
fn gqa_model_with_f16_weights() {
    check_model("gqa", "f16");
}

#[test]
fn mha_model_with_q8_0_weights() {
    check_model("mha", "q8_0");
}

#[test]
fn narrow_model_with_q4_0_weights_that_are_repacked() {
    check_model("narrow", "q4_0");
}

fn check_model(shape: &str, weight_type: &str) {
    require_root();
    let dir = scratch_dir(&format!("llama-{shape}"));
    let model = dir.join(format!("{shape}-{weight_type}.gguf"));
    llama::make_model(&model, shape, weight_type);
    for kv in runs() {
        check_run(&model, kv, &dir);
    }
    std::fs::remove_dir_all(&dir).expect("clean scratch dir");
}

fn check_run(model: &Path, kv: KvSettings, dir: &Path) {
    let what = format!(
        "{} n_ctx {} KV {}/{}",
        model.display(),
        kv.n_ctx,
        kv.type_k,
        kv.type_v
    );
    let log_path = dir.join(format!("llama-{}-{}.log", kv.n_ctx, kv.type_k));
    let mut llama = llama::start(model, kv, &log_path);
    llama.expect_event("waiting");
    // Start inspecting before the model loads, so the probes see the KV cache allocated.
    let mut inspection = Inspection::start(llama.pid(), "8s", &["--require-ebpf"]);
    inspection.wait_until_sampling();
    llama.send_line("load");
    let ready = llama.expect_event("ready");
    let (ok, report) = inspection.finish();
    let log = std::fs::read_to_string(&log_path).expect("read llama log");
    assert!(ok, "{what}: inspect failed: {report}");
    let logged = llama::parse_log(&log);

    // The prediction from the file alone, for the n_ctx asked for.
    let header = gguf::parse_path(model).expect("parse the test model");
    let prof = profile::from_gguf(&header);
    let (tk, tv) = (
        GgmlType::from_name(kv.type_k).unwrap(),
        GgmlType::from_name(kv.type_v).unwrap(),
    );
    let kv_model = KvModel::new(&prof, tk, tv, kv.flash_attn).expect("KV model");
    let cells = kv_cells(ContextShape::with_ctx(kv.n_ctx), prof.n_ctx_train, None);
    assert_eq!(cells.full, logged.kv_cells, "{what}: cells");
    assert_close(
        &format!("{what}: KV bytes vs llama.cpp"),
        kv_model.bytes(cells) as f64,
        logged.kv_mib * MIB,
        0.01,
    );
    assert_eq!(
        prof.weight_bytes,
        ready["model_size"].as_u64().unwrap(),
        "{what}: weights vs llama_model_size"
    );

    // What inspect saw in the running process.
    let m = &report["model"];
    assert_eq!(m["runtime"], "llama-cpp", "{what}: {m}");
    assert!(
        m["runtime_evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["rule"] == "libllama-mapped"),
        "{what}: {m}"
    );
    let files = m["files"].as_array().unwrap();
    let file = files
        .iter()
        .find(|f| Path::new(f["path"].as_str().unwrap()) == model)
        .unwrap_or_else(|| panic!("{what}: model file not named: {m}"));
    assert_eq!(file["format"], "gguf");
    assert_eq!(
        file["profile"]["n_layer"],
        Value::from(prof.n_layer.unwrap())
    );
    let p = &m["prediction"];
    assert_eq!(p["n_ctx"]["source"], "inferred", "{what}: {p}");
    assert_eq!(
        p["n_ctx"]["value"].as_u64(),
        Some(logged.kv_cells),
        "{what}: n_ctx in effect: {p}"
    );
    assert_eq!(
        ready["n_ctx"].as_u64(),
        Some(logged.kv_cells),
        "{what}: llama.cpp's own n_ctx"
    );
    assert_eq!(
        (p["cache_type_k"].as_str(), p["cache_type_v"].as_str()),
        (Some(kv.type_k), Some(kv.type_v)),
        "{what}"
    );
    assert_eq!(
        p["flash_attn"].as_bool(),
        Some(kv.flash_attn),
        "{what}: {p}"
    );
    assert!(
        m["config"]["n_ctx"]["source"] == "inferred",
        "{what}: no flag of the Python program is read as llama.cpp's: {m}"
    );
    assert_close(
        &format!("{what}: inspect kv_bytes_now"),
        f64_of(&p["kv_bytes_now"], "kv_bytes_now"),
        logged.kv_mib * MIB,
        0.01,
    );
    assert_eq!(
        p["weights_bytes"].as_u64(),
        Some(prof.weight_bytes),
        "{what}"
    );
    assert_eq!(
        p["kv_bytes_per_token"].as_u64(),
        Some(kv_model.bytes_per_token()),
        "{what}"
    );
    let at_max = kv_model.bytes(kv_cells(ContextShape::with_ctx(0), prof.n_ctx_train, None));
    assert_eq!(p["kv_bytes_at_max_ctx"].as_u64(), Some(at_max), "{what}");
    check_repacked_weights(&what, &prof, p, &logged);
    // Peak RAM: weights + KV + the compute buffer estimate, which must be in llama.cpp's range.
    let compute = f64_of(&p["footprint"]["compute_cpu_bytes"], "compute");
    let logged_compute = logged.compute_mib.expect("compute buffer logged") * MIB;
    assert!(
        compute >= logged_compute * 0.5 && compute <= logged_compute * 2.0,
        "{what}: compute estimate {compute} is not within 2x of llama.cpp's {logged_compute}"
    );
    eprintln!(
        "{what}: KV {} B predicted, llama.cpp {:.2} MiB; compute estimate {:.2} MiB, llama.cpp {:.2} MiB",
        kv_model.bytes(cells),
        logged.kv_mib,
        compute / MIB,
        logged_compute / MIB
    );
    llama.finish();
}

/// The CPU weights inspect predicts, mapped plus repacked, are llama.cpp's model buffers; the
/// backend's features come from the test build's own library (AVX2, no AVX-512, no AMX), and
/// only a type the AVX2 backend repacks is repacked.
fn check_repacked_weights(what: &str, prof: &profile::ModelProfile, p: &Value, logged: &LlamaLog) {
    let backend = &p["cpu_backend"];
    assert_eq!(backend["source"], "library", "{what}: {backend}");
    assert_eq!(
        backend["features"],
        serde_json::json!({"avx2": true, "avx512": false, "amx": false}),
        "{what}: the test build is x86-64 haswell level"
    );
    let f = &p["footprint"];
    let mapped = f64_of(&f["weights_cpu_bytes"], "weights_cpu_bytes");
    let repacked = f64_of(&f["weights_cpu_repacked_bytes"], "repacked");
    assert_eq!(
        mapped as u64, prof.weight_bytes,
        "{what}: all weights on the CPU"
    );
    assert_close(
        &format!("{what}: CPU weights (mapped + repacked) vs llama.cpp's model buffers"),
        mapped + repacked,
        logged.model_buffers_mib * MIB,
        0.01,
    );
    let q4_0 = prof.types.iter().any(|t| t.dtype == "Q4_0");
    match logged.repacked_mib {
        Some(mib) => {
            assert!(q4_0, "{what}: llama.cpp repacked a model without q4_0");
            assert_close(&format!("{what}: repacked"), repacked, mib * MIB, 0.01);
        }
        None => assert_eq!(repacked, 0.0, "{what}: llama.cpp repacked nothing"),
    }
    assert_eq!(
        q4_0,
        logged.repacked_mib.is_some(),
        "{what}: q4_0 is repacked on AVX2"
    );
    let ram = f64_of(&p["peak_ram_bytes"], "peak_ram_bytes");
    assert!(
        ram >= mapped + repacked,
        "{what}: peak RAM counts the repacked copy"
    );
    eprintln!(
        "{what}: CPU weights {:.2} MiB mapped + {:.2} MiB repacked = {:.2} MiB; llama.cpp's model buffers {:.2} MiB (repack buffer {:?} MiB)",
        mapped / MIB,
        repacked / MIB,
        (mapped + repacked) / MIB,
        logged.model_buffers_mib,
        logged.repacked_mib
    );
}

/// `infermem plan` on a model file agrees with the same memory model (no root needed).
#[test]
fn plan_advises_from_the_model_file() {
    let dir = scratch_dir("llama-plan");
    let model = dir.join("gqa.gguf");
    llama::make_model(&model, "gqa", "f16");
    let out = output_of(
        std::process::Command::new(infermem_tests::infermem_bin())
            .arg("plan")
            .arg(&model)
            .args(["--ctx", "2048", "--ram", "1G", "--vram", "0", "--json"]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).expect("plan JSON");
    assert_eq!(plan["n_gpu_layers"], 0, "no VRAM, no GPU layers");
    assert_eq!(plan["n_ctx"], 2048);
    assert_eq!(plan["fits"], true);
    // GQA: 16 layers x (K + V) x 2 KV heads x 64 x 2 bytes.
    assert_eq!(plan["kv_bytes_per_token"], 16 * 2 * 2 * 64 * 2);
    assert_eq!(plan["footprint"]["kv_cpu_bytes"], 2048 * 8192);
    assert_eq!(plan["max_ctx"], 8192, "the trained context bounds it");
    // Room for the weights (twice over where this host's release build would repack them,
    // e.g. F16 matrices on AMX hosts) and 16 MiB: a context between 256 and 8192 fits.
    let f = &plan["footprint"];
    let weights = f["weights_cpu_bytes"].as_u64().unwrap()
        + f["weights_cpu_repacked_bytes"].as_u64().unwrap();
    let budget = weights + (16 << 20);
    let tight = output_of(
        std::process::Command::new(infermem_tests::infermem_bin())
            .arg("plan")
            .arg(&model)
            .args([
                "--ram",
                &budget.to_string(),
                "--vram",
                "0",
                "--strategy",
                "max-context",
                "--json",
            ]),
    );
    let tight: Value = serde_json::from_slice(&tight.stdout).expect("plan JSON");
    let ctx = tight["n_ctx"].as_u64().unwrap();
    assert!(
        (256..8192).contains(&ctx) && ctx.is_multiple_of(256),
        "{tight}"
    );
    assert!(
        tight["footprint"]["ram_bytes"].as_u64().unwrap() <= budget,
        "{tight}"
    );
    let bad = output_of(
        std::process::Command::new(infermem_tests::infermem_bin())
            .arg("plan")
            .arg(dir.join("missing.gguf")),
    );
    assert!(!bad.status.success());
    std::fs::remove_dir_all(&dir).expect("clean scratch dir");
}

/// `inspect` started after llama.cpp loaded its model (n_ctx given through the Python API,
/// which infermem cannot read): the KV cache was not seen being allocated, so every run must
/// give either the exact n_ctx and KV figure, or null with a note saying why, never a wrong
/// figure. Shapes, weight types and contexts vary; some contexts are not powers of two.
#[test]
fn inspect_after_the_load_is_exact_or_says_it_does_not_know() {
    require_root();
    let dir = scratch_dir("llama-after-load");
    let kv = |n_ctx, cache: &'static str| KvSettings {
        n_ctx,
        type_k: cache,
        type_v: cache,
        flash_attn: cache != "f16",
    };
    let runs = [
        ("gqa", "f16", kv(3000, "f16")),
        ("narrow", "q4_0", kv(3072, "f16")),
        ("narrow", "q4_0", kv(700, "f16")),
        ("mha", "q8_0", kv(1100, "f16")),
        ("mha", "q8_0", kv(2000, "q8_0")),
    ];
    for (shape, weights, kv) in runs {
        let model = dir.join(format!("{shape}-{weights}.gguf"));
        if !model.exists() {
            llama::make_model(&model, shape, weights);
        }
        let what = format!("{shape} {weights} n_ctx {} KV {}", kv.n_ctx, kv.type_k);
        let log_path = dir.join(format!("{shape}-{}-{}.log", kv.n_ctx, kv.type_k));
        let mut llama = llama::start_loaded(&model, kv, &log_path);
        llama.expect_event("ready");
        let (ok, report) = Inspection::start(llama.pid(), "1s", &["--require-ebpf"]).finish();
        assert!(ok, "{what}: inspect failed: {report}");
        let logged = llama::parse_log(&std::fs::read_to_string(&log_path).unwrap());
        let m = &report["model"];
        let p = &m["prediction"];
        let outcome = match p["n_ctx"]["value"].as_u64() {
            Some(n_ctx) => {
                assert_eq!(n_ctx, logged.kv_cells, "{what}: a wrong n_ctx: {p}");
                assert_close(
                    &format!("{what}: kv_bytes_now"),
                    f64_of(&p["kv_bytes_now"], "kv_bytes_now"),
                    logged.kv_mib * MIB,
                    0.01,
                );
                assert_eq!(p["cache_type_k"], kv.type_k, "{what}: {p}");
                "exact"
            }
            None => {
                for field in [
                    "kv_bytes_now",
                    "peak_ram_bytes",
                    "peak_vram_bytes",
                    "footprint",
                ] {
                    assert!(p[field].is_null(), "{what}: {field} without n_ctx: {p}");
                }
                let notes = m["notes"].as_array().unwrap();
                assert!(
                    notes.iter().any(|n| n
                        .as_str()
                        .unwrap()
                        .contains("start infermem before the model loads")),
                    "{what}: no note says why n_ctx is unknown: {m}"
                );
                "unknown"
            }
        };
        eprintln!(
            "{what}: after the load, n_ctx {outcome} (llama.cpp: {} cells, {:.2} MiB)",
            logged.kv_cells, logged.kv_mib
        );
        llama.finish();
    }
    std::fs::remove_dir_all(&dir).expect("clean scratch dir");
}

/// An agent (`infermem run`) started before llama.cpp loads its model saw the KV cache
/// allocated: `inspect` through the agent gives the exact n_ctx and KV cache, from that
/// allocation, and `ps` lists the model with its runtime and KV cache.
#[test]
fn a_llama_model_loaded_after_the_agent_is_inspected_exactly() {
    require_root();
    let agent = Daemon::start("llama-agent");
    let dir = scratch_dir("llama-agent-model");
    let model = dir.join("gqa-f16.gguf");
    llama::make_model(&model, "gqa", "f16");
    let kv = KvSettings {
        n_ctx: 1100,
        type_k: "f16",
        type_v: "f16",
        flash_attn: false,
    };
    let log_path = dir.join("llama.log");
    let mut llama = llama::start_loaded(&model, kv, &log_path);
    llama.expect_event("ready");
    let pid = llama.pid();
    let logged = llama::parse_log(&std::fs::read_to_string(&log_path).expect("read llama log"));

    // inspect through the agent (Daemon::json fails on the standalone fallback).
    let report = agent.json(&["inspect", &pid.to_string(), "--json", "--duration", "2s"]);
    let m = &report["model"];
    assert_eq!(m["runtime"], "llama-cpp", "{m}");
    let p = &m["prediction"];
    assert_eq!(p["n_ctx"]["source"], "inferred", "{p}");
    assert_eq!(
        p["n_ctx"]["value"].as_u64(),
        Some(logged.kv_cells),
        "n_ctx in effect: {p}"
    );
    let allocation = &p["kv_allocation"];
    assert!(
        allocation["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("probe_")),
        "the KV cache must be the allocation the agent's probes saw, not a guess from \
         /proc/<pid>/maps: {allocation}"
    );
    let kv_now = f64_of(&p["kv_bytes_now"], "kv_bytes_now");
    assert_close(
        "kv_bytes_now through the agent vs llama.cpp",
        kv_now,
        logged.kv_mib * MIB,
        0.01,
    );
    assert_eq!(p["cache_type_k"], "f16", "{p}");
    assert!(report["sources"]["ebpf"] == true, "{}", report["sources"]);

    // ps lists it, with the same figures.
    let listed = agent.ps_until(NOTICE_TIMEOUT, |ps| {
        workload_of(ps, pid)
            .filter(|w| w["kv_bytes_now"].is_u64())
            .cloned()
    });
    assert_eq!(listed["runtime"], "llama-cpp", "{listed}");
    assert_eq!(listed["model"], model.to_str().unwrap(), "{listed}");
    assert_eq!(listed["n_ctx"].as_u64(), Some(logged.kv_cells), "{listed}");
    assert_eq!(listed["kv_bytes_now"].as_f64(), Some(kv_now), "{listed}");
    assert!(listed["weights_bytes"].as_u64() > Some(0), "{listed}");
    eprintln!(
        "through the agent: n_ctx {} ({}), KV {kv_now} B; llama.cpp {} cells, {:.2} MiB; ps: {listed}",
        p["n_ctx"]["value"], allocation["source"], logged.kv_cells, logged.kv_mib
    );
    llama.finish();
    std::fs::remove_dir_all(&dir).expect("clean scratch dir");
}

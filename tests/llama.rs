//! infermem against a real llama.cpp (llama-cpp-python, built from source): its KV and
//! weight predictions must match what llama.cpp itself reports, and `inspect` must recognise
//! the runtime, the model file and the n_ctx in effect, inferred from the KV cache allocation
//! the probes see (llama-cpp-python takes n_ctx through its API, not its command line).
//!
//! Models are written by the `gguf` package in two shapes (GQA: 2 of 8 heads carry KV; MHA:
//! all 8 do), run at several contexts, with an f16 and a quantized (q8_0) KV cache.

use std::path::Path;

use infermem::model::{
    ggml::GgmlType,
    gguf,
    memory::{ContextShape, KvModel, kv_cells},
    profile,
};
use infermem_tests::{
    Inspection, assert_close, f64_of,
    llama::{self, KvSettings},
    require_root, scratch_dir,
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
    assert_close(
        &format!("{what}: weights vs llama.cpp's model buffers"),
        prof.weight_bytes as f64,
        logged.model_buffers_mib * MIB,
        0.01,
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

/// `infermem plan` on a model file agrees with the same memory model (no root needed).
#[test]
fn plan_advises_from_the_model_file() {
    let dir = scratch_dir("llama-plan");
    let model = dir.join("gqa.gguf");
    llama::make_model(&model, "gqa", "f16");
    let out = std::process::Command::new(infermem_tests::infermem_bin())
        .arg("plan")
        .arg(&model)
        .args(["--ctx", "2048", "--ram", "1G", "--vram", "0", "--json"])
        .output()
        .expect("run infermem plan");
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
    let tight = std::process::Command::new(infermem_tests::infermem_bin())
        .arg("plan")
        .arg(&model)
        .args([
            "--ram",
            "60M",
            "--vram",
            "0",
            "--strategy",
            "max-context",
            "--json",
        ])
        .output()
        .expect("run infermem plan");
    let tight: Value = serde_json::from_slice(&tight.stdout).expect("plan JSON");
    let ctx = tight["n_ctx"].as_u64().unwrap();
    assert!(
        (256..8192).contains(&ctx) && ctx.is_multiple_of(256),
        "{tight}"
    );
    assert!(
        tight["footprint"]["ram_bytes"].as_u64().unwrap() <= 60 << 20,
        "{tight}"
    );
    let bad = std::process::Command::new(infermem_tests::infermem_bin())
        .arg("plan")
        .arg(dir.join("missing.gguf"))
        .output()
        .expect("run infermem plan");
    assert!(!bad.status.success());
    std::fs::remove_dir_all(&dir).expect("clean scratch dir");
}

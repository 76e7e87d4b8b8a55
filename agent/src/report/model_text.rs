//! Text rendering of the model section of `inspect` and of `infermem plan`.

use std::fmt::Write as _;

use clap::ValueEnum as _;

use crate::{
    model::{
        analysis::ModelReport,
        config::{Setting, SettingSource},
        discovery::ModelFormat,
        memory::Footprint,
        plan::PlanReport,
        profile::ModelProfile,
    },
    units::format_bytes,
};

use super::text::{escape, escape_lines};

/// Appends the model section of an inspect report.
pub fn render_model(w: &mut String, m: &ModelReport) {
    let rules: Vec<&str> = m.runtime_evidence.iter().map(|e| e.rule.as_str()).collect();
    let _ = writeln!(
        w,
        "runtime  {} (evidence: {})",
        m.runtime_label,
        rules.join(", ")
    );
    if !m.gpu_devices.is_empty() {
        let _ = writeln!(w, "         GPU devices open: {}", m.gpu_devices.join(", "));
    }
    for f in &m.files {
        let _ = writeln!(
            w,
            "model    {} ({}, {}, {} resident)",
            escape(&f.file.path.to_string_lossy()),
            format_name(f.file.format),
            format_bytes(f.file.size_bytes),
            format_bytes(f.resident_bytes)
        );
        match (&f.profile, &f.error) {
            (Some(p), _) => {
                let _ = writeln!(w, "         {}", escape(&profile_line(p)));
            }
            (None, Some(err)) => {
                let _ = writeln!(w, "         unreadable: {}", escape(err));
            }
            (None, None) => {}
        }
    }
    if let Some(p) = &m.prediction {
        let ctx = p.n_ctx.as_ref().map_or("unknown".to_owned(), |s| {
            format!("{} ({})", s.value, provenance(s))
        });
        let _ = writeln!(
            w,
            "config   n_ctx {ctx}; KV {}/{}; {} sequence(s); {} GPU layers; flash attention {}",
            p.cache_type_k,
            p.cache_type_v,
            p.n_parallel,
            p.n_gpu_layers,
            if p.flash_attn { "on" } else { "off" }
        );
        let or_unknown = |b: Option<u64>| b.map_or("?".to_owned(), format_bytes);
        let _ = writeln!(
            w,
            "predict  weights {}; KV {}/token, {} now, {} at the trained context{}",
            format_bytes(p.weights_bytes),
            format_bytes(p.kv_bytes_per_token),
            or_unknown(p.kv_bytes_now),
            or_unknown(p.kv_bytes_at_max_ctx),
            p.n_ctx_train.map_or(String::new(), |t| format!(" ({t})")),
        );
        let _ = writeln!(
            w,
            "         peak RAM {}, peak VRAM {}{}",
            or_unknown(p.peak_ram_bytes),
            or_unknown(p.peak_vram_bytes),
            p.footprint
                .as_ref()
                .filter(|f| f.weights_cpu_repacked_bytes > 0)
                .map_or(String::new(), |f| format!(
                    " (RAM includes {} of weights repacked by the CPU backend)",
                    format_bytes(f.weights_cpu_repacked_bytes)
                ))
        );
        if let Some(backend) = &p.cpu_backend {
            let _ = writeln!(w, "         CPU backend: {}", backend.detail);
        }
    }
    for note in &m.notes {
        let _ = writeln!(w, "note     {}", escape(note));
    }
}

/// Renders a plan.
pub fn render_plan(p: &PlanReport) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "model     {} ({})",
        escape(&p.model.to_string_lossy()),
        format_name(p.format)
    );
    let _ = writeln!(w, "          {}", escape(&profile_line(&p.profile)));
    let _ = writeln!(
        w,
        "budget    RAM {}, VRAM {}; strategy {}; KV {} ({}/token); {} sequence(s)",
        format_bytes(p.ram_budget_bytes),
        format_bytes(p.vram_budget_bytes),
        p.strategy
            .to_possible_value()
            .map_or(String::new(), |v| v.get_name().to_owned()),
        p.cache_type,
        format_bytes(p.kv_bytes_per_token),
        p.parallel
    );
    let _ = writeln!(
        w,
        "advice    -ngl {} -c {}{}{}",
        p.n_gpu_layers,
        p.n_ctx,
        if p.flash_attn { " -fa on" } else { "" },
        if p.fits { "" } else { "   (DOES NOT FIT)" }
    );
    let _ = writeln!(
        w,
        "          largest context that fits this placement: {}",
        p.max_ctx.map_or("none".to_owned(), |c| c.to_string())
    );
    footprint_lines(w, &p.footprint);
    for note in &p.notes {
        let _ = writeln!(w, "note      {}", escape(note));
    }
    escape_lines(&out)
}

fn footprint_lines(w: &mut String, f: &Footprint) {
    let _ = writeln!(
        w,
        "RAM       {} = weights {} + repacked weights {} + KV {} + compute {}",
        format_bytes(f.ram_bytes),
        format_bytes(f.weights_cpu_bytes),
        format_bytes(f.weights_cpu_repacked_bytes),
        format_bytes(f.kv_cpu_bytes),
        format_bytes(f.compute_cpu_bytes)
    );
    let _ = writeln!(
        w,
        "VRAM      {} = weights {} + KV {} + compute {}",
        format_bytes(f.vram_bytes),
        format_bytes(f.weights_gpu_bytes),
        format_bytes(f.kv_gpu_bytes),
        format_bytes(f.compute_gpu_bytes)
    );
}

fn profile_line(p: &ModelProfile) -> String {
    let mut parts = vec![
        p.architecture
            .clone()
            .unwrap_or_else(|| "unknown architecture".to_owned()),
    ];
    let params = p.parameter_count as f64;
    parts.push(if params >= 1e9 {
        format!("{:.1}B params", params / 1e9)
    } else {
        format!("{:.1}M params", params / 1e6)
    });
    if let Some(ft) = &p.file_type {
        parts.push(ft.clone());
    }
    if let Some(layers) = p.n_layer {
        parts.push(format!("{layers} layers"));
    }
    if let (Some(heads), Some(kv)) = (p.n_head, p.n_head_kv.first()) {
        let dim = p.head_dim_k.map_or(String::new(), |d| format!(" x {d}"));
        parts.push(format!("{heads} heads / {kv} KV heads{dim}"));
    }
    if let Some(window) = p.sliding_window {
        parts.push(format!(
            "sliding window {window} on {} layers",
            p.swa_layers.len()
        ));
    }
    if let Some(ctx) = p.n_ctx_train {
        parts.push(format!("trained context {ctx}"));
    }
    parts.push(format!("weights {}", format_bytes(p.weight_bytes)));
    parts.join(", ")
}

fn format_name(format: ModelFormat) -> &'static str {
    match format {
        ModelFormat::Gguf => "GGUF",
        ModelFormat::Safetensors => "safetensors",
        ModelFormat::Pytorch => "PyTorch",
        ModelFormat::Onnx => "ONNX",
    }
}

fn provenance<T>(s: &Setting<T>) -> String {
    let source = match s.source {
        SettingSource::Cmdline => "read from the command line",
        SettingSource::Environment => "read from the environment",
        SettingSource::Api => "read from the runtime's API",
        SettingSource::Inferred => "inferred",
        SettingSource::Default => "default",
    };
    format!("{source}: {}", s.detail)
}

//! `infermem runtime <pid>`: what a model server says about itself through its own API
//! (Ollama: the loaded models; llama.cpp server: its model, slots and metrics), asked only on
//! a loopback socket the process itself listens on.

use std::process::ExitCode;

use super::print_json;
use crate::{
    act::runtime::{ServerStats, connect_any},
    collect::process,
    report::text::escape,
    units::format_bytes,
};

/// `infermem runtime`.
pub fn runtime(pid: u32, json: bool) -> ExitCode {
    let stats = process::identity(pid)
        .map_err(|e| e.to_string())
        .and_then(|id| connect_any(pid, id.start_time).map_err(|e| e.to_string()))
        .and_then(|control| {
            let stats = control.server_stats().map_err(|e| e.to_string())?;
            Ok((control.runtime(), control.endpoint(), stats))
        });
    match stats {
        Ok((runtime, endpoint, stats)) if json => {
            print_json(&serde_json::json!({
                "pid": pid, "runtime": runtime, "endpoint": endpoint.to_string(), "stats": stats,
            }));
            ExitCode::SUCCESS
        }
        Ok((runtime, endpoint, stats)) => {
            print!("{}", render(pid, runtime, &endpoint.to_string(), &stats));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}", escape(&err));
            ExitCode::FAILURE
        }
    }
}

fn render(pid: u32, runtime: &str, endpoint: &str, stats: &ServerStats) -> String {
    let mut out = format!("pid {pid}: {runtime} at {endpoint}\n");
    for model in &stats.models {
        out += &format!("  model {}", escape(&model.name));
        if model.size > 0 {
            out += &format!(
                " ({}, {} in VRAM)",
                format_bytes(model.size),
                format_bytes(model.size_vram)
            );
        }
        if let Some(expires) = &model.expires_at {
            out += &format!(", expires {}", escape(expires));
        }
        out += "\n";
    }
    if let Some(slots) = &stats.slots {
        let busy = slots.iter().filter(|s| s.busy).count();
        out += &format!("  slots: {} ({busy} busy)\n", slots.len());
    }
    for (name, value) in &stats.metrics {
        out += &format!("  {name} {value}\n");
    }
    out
}

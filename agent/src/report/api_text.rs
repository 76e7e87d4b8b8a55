//! The local API's replies for people (`ps`, `status`, `watch`) and `watch --json`'s lines.
//! Strings from processes, files and the kernel (comm, paths, reasons) go through
//! [`escape`] in text output.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use super::text::escape;
use crate::{
    api::proto::{
        Assessment, CgroupStatus, DaemonInfo, GpuDevice, GpuStatus, HostStatus, OomKill, PsReply,
        StatusReply, UnknownClass, WatchUpdate, Workload,
    },
    units::format_bytes,
};

/// The column headers of `ps`.
const PS_HEADER: [&str; 9] = [
    "PID", "RUNTIME", "MODEL", "WEIGHTS", "KV", "RSS", "GPU", "LEVEL", "ETA",
];

/// The indentation of a section's continuation lines.
const INDENT: &str = "          ";

/// `ps`: one line per workload (pid, runtime, model file, weights resident/size, KV cache
/// now/max, RSS, GPU memory, risk level and time to OOM), or a line saying there are none.
pub fn render_ps(reply: &PsReply) -> String {
    if reply.workloads.is_empty() {
        return "no AI workloads are tracked\n".to_owned();
    }
    let rows: Vec<Vec<String>> = reply.workloads.iter().map(ps_row).collect();
    table(&PS_HEADER, &rows)
}

/// One workload's cells, in [`PS_HEADER`]'s order.
fn ps_row(w: &Workload) -> Vec<String> {
    let model = Path::new(&w.model).file_name().map_or_else(
        || "-".to_owned(),
        |name| escape(&name.to_string_lossy()).into_owned(),
    );
    let weights = if w.weights_bytes == 0 {
        "-".to_owned()
    } else {
        format!(
            "{}/{}",
            format_bytes(w.weights_resident_bytes),
            format_bytes(w.weights_bytes)
        )
    };
    let kv = format!(
        "{}/{}",
        maybe_bytes(w.kv_bytes_now),
        maybe_bytes(w.kv_bytes_max)
    );
    vec![
        w.pid.to_string(),
        escape(&w.runtime).into_owned(),
        model,
        weights,
        kv,
        format_bytes(w.rss_bytes),
        workload_vram(w).map_or_else(|| "-".to_owned(), |vram| vram.to_string()),
        level(w.risk.as_ref()),
        eta(w.risk.as_ref()),
    ]
}

/// A workload's video memory over all its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vram {
    pub bytes: u64,
    /// An ioctl figure in the sum misses allocations made before the agent started.
    pub at_least: bool,
}

impl std::fmt::Display for Vram {
    /// `6.00 GiB`, or `≥6.00 GiB` when it is a lower bound.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bound = if self.at_least { "≥" } else { "" };
        write!(f, "{bound}{}", format_bytes(self.bytes))
    }
}

/// A workload's video memory over all its GPUs: on each device the ioctl figure, else
/// NVML's; `None` when no device has either.
pub fn workload_vram(w: &Workload) -> Option<Vram> {
    w.gpu
        .iter()
        .filter_map(|g| match (g.vram_bytes_ioctl, g.vram_bytes_nvml) {
            (Some(bytes), _) => Some(Vram {
                bytes,
                at_least: g.ioctl_partial,
            }),
            (None, nvml) => nvml.map(|bytes| Vram {
                bytes,
                at_least: false,
            }),
        })
        .reduce(|a, b| Vram {
            bytes: a.bytes.saturating_add(b.bytes),
            at_least: a.at_least || b.at_least,
        })
}

/// Left-aligned columns two spaces apart, the header first.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let line: String = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}  "))
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `status`: the host, each memory cgroup, recent OOM kills, the GPUs and the agent itself.
pub fn render_status(reply: &StatusReply) -> String {
    let mut out = String::new();
    match &reply.host {
        Some(host) => host_section(&mut out, host),
        None => out.push_str("host      unknown\n"),
    }
    cgroups_section(&mut out, &reply.cgroups);
    oom_section(&mut out, &reply.oom_kills);
    if let Some(gpu) = &reply.gpu {
        gpu_section(&mut out, gpu);
    }
    if let Some(daemon) = &reply.daemon {
        daemon_section(&mut out, daemon);
    }
    out
}

/// The host's memory, swap, model files, pressure and risk.
fn host_section(out: &mut String, host: &HostStatus) {
    let _ = writeln!(
        out,
        "host      memory {} total, {} available, {} free; used {}{}",
        format_bytes(host.mem_total_bytes),
        format_bytes(host.mem_available_bytes),
        format_bytes(host.mem_free_bytes),
        format_bytes(host.used_bytes),
        if host.limit_bytes == 0 {
            String::new()
        } else {
            format!(" of {} it can hold", format_bytes(host.limit_bytes))
        },
    );
    let _ = writeln!(
        out,
        "{INDENT}swap {} total, {} free; model files {} resident{}",
        format_bytes(host.swap_total_bytes),
        format_bytes(host.swap_free_bytes),
        format_bytes(host.model_file_bytes),
        pressure(host.psi_some_avg10, host.psi_full_avg10),
    );
    risk_lines(out, host.risk.as_ref());
}

/// The memory cgroups holding tracked processes.
fn cgroups_section(out: &mut String, cgroups: &[CgroupStatus]) {
    if cgroups.is_empty() {
        out.push_str("cgroups   none holds a tracked process\n");
        return;
    }
    out.push_str("cgroups\n");
    for c in cgroups {
        let limit = match (c.limit_bytes, c.effective_limit_bytes) {
            (Some(own), Some(eff)) if eff < own => {
                format!("{} (effective {})", format_bytes(own), format_bytes(eff))
            }
            (None, Some(eff)) => format!("unlimited (effective {})", format_bytes(eff)),
            (own, _) => maybe_limit(own),
        };
        let _ = writeln!(
            out,
            "  {} ({}): usage {} of {}; {} processes; oom kills {}, high events {}, max events {}{}",
            escape(&c.path),
            escape(&c.version),
            format_bytes(c.usage_bytes),
            limit,
            c.processes,
            c.oom_kills,
            c.high_events,
            c.max_events,
            pressure(c.psi_some_avg10, None),
        );
        risk_lines(out, c.risk.as_ref());
    }
}

/// The OOM kills the probes saw, oldest first.
fn oom_section(out: &mut String, kills: &[OomKill]) {
    if kills.is_empty() {
        out.push_str("oom kills none since the agent started\n");
        return;
    }
    out.push_str("oom kills\n");
    for k in kills {
        let memcg = if k.memcg.is_empty() {
            String::new()
        } else {
            format!(" in {}", escape(&k.memcg))
        };
        let _ = writeln!(
            out,
            "  {}  pid {} ({}){memcg}: anon {}, file {}{}",
            date_time(k.ts_unix),
            k.pid,
            escape(&k.comm),
            maybe_bytes(k.rss_anon_bytes),
            maybe_bytes(k.rss_file_bytes),
            k.uid.map(|uid| format!(", uid {uid}")).unwrap_or_default(),
        );
    }
}

/// The GPUs: what the probes do and why, the driver and layout, the probes' counters, each
/// device, and NVML's absence.
fn gpu_section(out: &mut String, gpu: &GpuStatus) {
    let mut line = format!("gpu       {}", escape(&gpu.state));
    if !gpu.message.is_empty() {
        let _ = write!(line, ": {}", escape(&gpu.message));
    }
    let _ = writeln!(out, "{line}");
    if !gpu.driver_version.is_empty() || !gpu.layout.is_empty() {
        let _ = writeln!(
            out,
            "{INDENT}driver {}, layout {}",
            or_unknown(&gpu.driver_version),
            or_unknown(&gpu.layout),
        );
    }
    if let Some(counts) = ioctl_counts(gpu) {
        let _ = writeln!(out, "{INDENT}{counts}");
    }
    if !gpu.unknown_classes.is_empty() {
        let _ = writeln!(
            out,
            "{INDENT}unknown classes (not sized): {}",
            unknown_classes(&gpu.unknown_classes)
        );
    }
    if !gpu.nvml_error.is_empty() {
        let _ = writeln!(out, "{INDENT}NVML not used: {}", escape(&gpu.nvml_error));
    }
    for device in &gpu.devices {
        device_lines(out, device);
    }
}

/// `ioctls N decoded` and the refused, undecodable and dropped ones that are not 0; nothing
/// when no ioctl was seen at all.
fn ioctl_counts(gpu: &GpuStatus) -> Option<String> {
    let others = [
        (gpu.ioctls_refused, "refused by RM"),
        (gpu.ioctls_undecodable, "undecodable"),
        (gpu.ringbuf_drops, "dropped (figures incomplete)"),
    ];
    if gpu.ioctls_decoded == 0 && others.iter().all(|(n, _)| *n == 0) {
        return None;
    }
    let mut line = format!("ioctls {} decoded", gpu.ioctls_decoded);
    for (n, what) in others.into_iter().filter(|(n, _)| *n != 0) {
        let _ = write!(line, ", {n} {what}");
    }
    Some(line)
}

/// `0x0000c86f (3 objects), ...`.
fn unknown_classes(classes: &[UnknownClass]) -> String {
    let parts: Vec<String> = classes
        .iter()
        .map(|c| format!("{:#010x} ({} objects)", c.class_id, c.objects))
        .collect();
    parts.join(", ")
}

/// One GPU: its name and uuid, NVML's memory and utilization, then the ioctl sum and how far
/// NVML is from it.
fn device_lines(out: &mut String, d: &GpuDevice) {
    let nvml = match (d.total_bytes, d.used_bytes, d.free_bytes) {
        (None, None, None) => "memory unknown to NVML".to_owned(),
        (total, used, free) => format!(
            "memory {} total, {} used, {} free",
            maybe_bytes(total),
            maybe_bytes(used),
            maybe_bytes(free)
        ),
    };
    let utilization = d
        .utilization_percent
        .map(|p| format!("; utilization {p}%"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  gpu {} {} ({}): {nvml}{utilization}",
        d.device,
        or_unknown(&d.name),
        or_unknown(&d.uuid),
    );
    let mut line = format!("{INDENT}ioctls {} live", format_bytes(d.vram_bytes_ioctl));
    if let Some(processes) = d.vram_bytes_nvml_processes {
        let _ = write!(line, "; NVML per process {}", format_bytes(processes));
    }
    if let Some(difference) = d.nvml_minus_ioctl_bytes {
        let _ = write!(line, "; NVML used - ioctls {}", signed_bytes(difference));
    }
    let _ = writeln!(out, "{line}");
}

/// `+512 MiB`, `-1.00 GiB`, `0 B`.
fn signed_bytes(bytes: i64) -> String {
    let sign = match bytes.signum() {
        1 => "+",
        -1 => "-",
        _ => "",
    };
    format!("{sign}{}", format_bytes(bytes.unsigned_abs()))
}

/// `text` escaped, `?` when empty.
fn or_unknown(text: &str) -> String {
    if text.is_empty() {
        "?".to_owned()
    } else {
        escape(text).into_owned()
    }
}

/// The agent: pid, version, mode, eBPF and its counters.
fn daemon_section(out: &mut String, d: &DaemonInfo) {
    let ebpf = if d.ebpf {
        format!("eBPF on ({} events, {} dropped)", d.events, d.ringbuf_drops)
    } else if d.ebpf_reason.is_empty() {
        "eBPF off".to_owned()
    } else {
        format!("eBPF off ({})", escape(&d.ebpf_reason))
    };
    let _ = writeln!(
        out,
        "agent     pid {}, version {}, mode {}, {ebpf}, {} processes tracked",
        d.pid,
        escape(&d.version),
        escape(&d.mode),
        d.processes,
    );
    for probe in &d.probes_unavailable {
        let _ = writeln!(out, "{INDENT}probe unavailable: {}", escape(probe));
    }
}

/// The level and time to OOM, then the domain, victim, thrashing and each reason.
fn risk_lines(out: &mut String, risk: Option<&Assessment>) {
    let Some(r) = risk else {
        return;
    };
    let mut line = format!("{INDENT}risk {}", escape(&r.level));
    if let Some(secs) = r.eta_seconds {
        let _ = write!(line, ", OOM in {}", format_eta(secs));
        if let (Some(low), Some(high)) = (r.eta_low_seconds, r.eta_high_seconds) {
            let _ = write!(line, " ({}..{})", format_eta(low), format_eta(high));
        }
    }
    if let Some(domain) = &r.domain {
        let _ = write!(line, " in {}", escape(domain));
    }
    if let Some(victim) = r.victim_pid {
        let _ = write!(line, ", victim pid {victim}");
    }
    if r.thrashing {
        line.push_str(", model weights thrashing");
    }
    let _ = writeln!(out, "{line}");
    for reason in &r.reasons {
        let _ = writeln!(out, "{INDENT}  {}", escape(reason));
    }
}

/// `watch`: one line per update: time, target, level, time to OOM, resident bytes against
/// the limit, thrashing, the first reason, and how the target ended on the last line.
pub fn render_watch_line(update: &WatchUpdate) -> String {
    let risk = update.risk.as_ref();
    let mut line = format!(
        "{}  {}  {:<8}  eta {:<6}  rss {}/{}",
        clock(update.ts),
        escape(&update.target),
        level(risk),
        eta(risk),
        maybe_bytes(update.rss_bytes),
        update
            .limit_bytes
            .map_or_else(|| "-".to_owned(), format_bytes),
    );
    if risk.is_some_and(|r| r.thrashing) {
        line.push_str("  thrashing");
    }
    if let Some(reason) = risk.and_then(|r| r.reasons.first()) {
        let _ = write!(line, "  {}", escape(reason));
    }
    if update.ended {
        let _ = write!(line, "  ended: {}", escape(&update.end_reason));
    }
    line
}

/// One `watch --json` line, without its newline.
#[derive(Serialize)]
struct WatchJson<'a> {
    ts: f64,
    target: &'a str,
    level: &'a str,
    eta_seconds: Option<f64>,
    domain: Option<&'a str>,
    victim_pid: Option<u32>,
    thrashing: bool,
    reasons: &'a [String],
    rss_bytes: Option<u64>,
    limit_bytes: Option<u64>,
    #[serde(skip_serializing_if = "is_false")]
    ended: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    end_reason: &'a str,
}

/// Whether `b` is false (for serde's `skip_serializing_if`).
fn is_false(b: &bool) -> bool {
    !b
}

/// `watch --json`: the update as one JSON object, without a newline: `ts` (unix seconds),
/// `target`, `level` (`unknown` without an assessment), `eta_seconds`, `domain`,
/// `victim_pid`, `thrashing`, `reasons`, `rss_bytes`, `limit_bytes`, in that order, null when
/// unknown; then, on the last update only, `"ended": true` and its `end_reason` (left out
/// when the agent gives none).
pub fn watch_json_line(update: &WatchUpdate) -> String {
    let risk = update.risk.as_ref();
    let line = WatchJson {
        ts: update.ts,
        target: &update.target,
        level: risk.map_or("unknown", |r| r.level.as_str()),
        eta_seconds: risk.and_then(|r| r.eta_seconds),
        domain: risk.and_then(|r| r.domain.as_deref()),
        victim_pid: risk.and_then(|r| r.victim_pid),
        thrashing: risk.is_some_and(|r| r.thrashing),
        reasons: risk.map_or(&[], |r| r.reasons.as_slice()),
        rss_bytes: update.rss_bytes,
        limit_bytes: update.limit_bytes,
        ended: update.ended,
        end_reason: &update.end_reason,
    };
    serde_json::to_string(&line).expect("a watch line serialises")
}

/// The risk level, `?` without an assessment.
fn level(risk: Option<&Assessment>) -> String {
    risk.map_or_else(|| "?".to_owned(), |r| escape(&r.level).into_owned())
}

/// The time to OOM, `-` when there is none.
fn eta(risk: Option<&Assessment>) -> String {
    risk.and_then(|r| r.eta_seconds)
        .map_or_else(|| "-".to_owned(), format_eta)
}

/// A duration for people: `<1s`, `42s`, `3m10s`, `2h05m`; `-` when not a duration.
pub fn format_eta(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_owned();
    }
    let s = seconds.round() as u64;
    match s {
        0 => "<1s".to_owned(),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Bytes, `?` when unknown.
fn maybe_bytes(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "?".to_owned(), format_bytes)
}

/// A limit, `unlimited` when there is none.
fn maybe_limit(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "unlimited".to_owned(), format_bytes)
}

/// `; pressure some X% full Y% (avg10)` with what is known, or nothing.
fn pressure(some: Option<f64>, full: Option<f64>) -> String {
    let parts: Vec<String> = [("some", some), ("full", full)]
        .into_iter()
        .filter_map(|(name, v)| Some(format!("{name} {:.2}%", v?)))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("; pressure {} (avg10)", parts.join(" "))
    }
}

/// `unix` as local `HH:MM:SS`, or the number when it is not a time.
fn clock(unix: f64) -> String {
    local_time(unix).map_or_else(
        || format!("{unix:.0}"),
        |tm| format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec),
    )
}

/// `unix` as local `YYYY-MM-DD HH:MM:SS`, or the number when it is not a time.
fn date_time(unix: f64) -> String {
    local_time(unix).map_or_else(
        || format!("{unix:.0}"),
        |tm| {
            format!(
                "{}-{:02}-{:02} {:02}:{:02}:{:02}",
                tm.tm_year + 1900,
                tm.tm_mon + 1,
                tm.tm_mday,
                tm.tm_hour,
                tm.tm_min,
                tm.tm_sec
            )
        },
    )
}

/// `unix` in the local time zone (libc's `localtime_r`).
fn local_time(unix: f64) -> Option<libc::tm> {
    if !unix.is_finite() || unix < 0.0 {
        return None;
    }
    let time = unix.floor() as libc::time_t;
    // SAFETY: `tm` is plain data (a null `tm_zone` is valid), and localtime_r only reads
    // `time` and writes `tm`, both live for the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let converted = unsafe { libc::localtime_r(&time, &mut tm) };
    (!converted.is_null()).then_some(tm)
}

#[cfg(test)]
mod tests;

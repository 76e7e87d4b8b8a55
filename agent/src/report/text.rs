//! The human-readable rendering of an [`InspectReport`].

use std::{borrow::Cow, fmt::Write as _};

use super::InspectReport;
use crate::units::format_bytes;

/// Renders the report as a few aligned sections.
pub fn render(report: &InspectReport) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "pid {} ({})  {}",
        report.pid,
        escape(&report.comm),
        report
            .cmdline
            .iter()
            .map(|a| escape(a))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if !report.execs.is_empty() {
        let _ = writeln!(
            w,
            "exec     exec'd while sampled into: {} (the report is of the last program)",
            escape(&report.execs.join(" -> "))
        );
    }

    let m = &report.memory;
    let _ = writeln!(
        w,
        "memory   rss {} = anon {} + file {} + shmem {}; swap {}; locked {}",
        format_bytes(m.rss_bytes),
        format_bytes(m.anon_bytes),
        format_bytes(m.file_bytes),
        format_bytes(m.shmem_bytes),
        format_bytes(m.swap_bytes),
        format_bytes(m.locked_bytes),
    );

    match &report.cgroup {
        Some(cg) => {
            let limit = |l: Option<u64>| l.map_or("unlimited".to_owned(), format_bytes);
            let _ = writeln!(
                w,
                "cgroup   {} {}: usage {} of limit {} (effective {}{})",
                cg.version,
                cg.path,
                cg.usage_bytes.map_or("?".into(), format_bytes),
                limit(cg.limit_bytes),
                limit(cg.effective_limit_bytes),
                cg.high_bytes
                    .map(|h| format!(", high {}", format_bytes(h)))
                    .unwrap_or_default(),
            );
        }
        None => {
            let _ = writeln!(w, "cgroup   no memory controller on this host");
        }
    }

    let _ = writeln!(
        w,
        "oom      score {}, score_adj {}",
        report.oom.score, report.oom.score_adj
    );

    let f = &report.faults;
    match (f.file_per_s, f.anon_per_s) {
        (Some(file), Some(anon)) => {
            let _ = writeln!(
                w,
                "faults   {:.1}/s over {:.1} s = {file:.1}/s in file mappings + {anon:.1}/s other; \
                 major {:.1}/s",
                f.total_per_s, f.window_s, f.major_per_s
            );
        }
        _ => {
            let _ = writeln!(
                w,
                "faults   {:.1}/s over {:.1} s (procfs; no file/anon split without eBPF); major {:.1}/s",
                f.total_per_s, f.window_s, f.major_per_s
            );
        }
    }

    if report.mappings.is_empty() {
        let _ = writeln!(w, "mapped files >= 1 MiB: none");
    } else {
        let _ = writeln!(w, "mapped files >= 1 MiB:");
        let _ = writeln!(
            w,
            "  {:>10}  {:>10}  {:>9}  PATH",
            "SIZE", "RESIDENT", "FAULTS/S"
        );
        for mapping in &report.mappings {
            let _ = writeln!(
                w,
                "  {:>10}  {:>10}  {:>9}  {}{}",
                format_bytes(mapping.size_bytes),
                format_bytes(mapping.resident_bytes),
                mapping
                    .faults_per_s
                    .map_or("-".to_owned(), |r| format!("{r:.1}")),
                escape(&mapping.path),
                if mapping.deleted { " (deleted)" } else { "" },
            );
        }
    }

    if !report.allocations.is_empty() {
        let _ = writeln!(w, "large anonymous allocations seen while sampling:");
        for a in &report.allocations {
            let _ = writeln!(
                w,
                "  {:>10}  {:<6} at {:#x}{}",
                format_bytes(a.bytes),
                a.kind,
                a.address,
                if a.live { "" } else { " (freed)" }
            );
        }
    }

    if let Some(model) = &report.model {
        super::model_text::render_model(w, model);
    }
    if let Some(risk) = &report.risk {
        risk_lines(w, risk);
    }

    gpu_lines(w, &report.gpu);
    let s = &report.sources;
    if s.ebpf {
        let drops: u64 = s.probes.iter().map(|p| p.ringbuf_drops + p.map_drops).sum();
        let _ = writeln!(
            w,
            "sources  eBPF ({} probes attached, {drops} drops) + procfs",
            s.probes.len()
        );
    } else {
        let _ = writeln!(
            w,
            "sources  procfs only: {}",
            s.reason.as_deref().unwrap_or("eBPF off")
        );
    }
    escape_lines(&out)
}

/// One line per GPU the process holds memory on.
fn gpu_lines(w: &mut String, gpus: &[crate::gpu::ProcessGpu]) {
    let bytes = |b: Option<u64>| b.map_or("-".to_owned(), format_bytes);
    for g in gpus {
        let device = if g.device == crate::gpu::UNKNOWN_DEVICE {
            "?".to_owned()
        } else {
            g.device.to_string()
        };
        let _ = writeln!(
            w,
            "gpu {device}    VRAM {} (RM ioctls{}), {} (NVML); host pinned {}",
            bytes(g.vram_bytes_ioctl),
            if g.ioctl_partial {
                ", since the agent started"
            } else {
                ""
            },
            bytes(g.vram_bytes_nvml),
            format_bytes(g.host_pinned_bytes)
        );
    }
}

/// The predictor's verdict: level, time to OOM with its range, domain, victim, reasons.
fn risk_lines(w: &mut String, r: &crate::predict::Assessment) {
    let seconds = |s: f64| format!("{s:.0} s");
    let eta = r
        .eta_seconds
        .map_or("no time to OOM at this trend".to_owned(), |eta| {
            let high = r.eta_high_seconds.map_or("∞".to_owned(), seconds);
            let low = r.eta_low_seconds.map_or("?".to_owned(), seconds);
            format!("OOM in {} ({low} to {high})", seconds(eta))
        });
    let _ = writeln!(
        w,
        "risk     {}: {eta}; domain {}; the OOM killer would pick {}{}",
        r.level,
        r.domain.as_deref().unwrap_or("unknown"),
        r.victim_pid
            .map_or("nobody".to_owned(), |p| format!("pid {p}")),
        if r.thrashing {
            "; model weights thrash"
        } else {
            ""
        }
    );
    for reason in &r.reasons {
        let _ = writeln!(w, "         {reason}");
    }
}

/// Whether `c` is a control character: C0 (below 0x20), DEL or C1 (0x80 to 0x9f).
fn is_control(c: char) -> bool {
    matches!(c, '\0'..='\x1f' | '\x7f'..='\u{9f}')
}

/// `s` with its control characters written as escapes (`\n`, `\x1b`, `\u{9b}`), so that
/// text from a process or a file (comm, cmdline, paths, GGUF strings) cannot drive the
/// terminal or forge lines.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < '\u{80}' && is_control(c) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Rendered text with the control characters of each line escaped, its line breaks kept: the
/// last line of defence for any field not escaped where it was written.
pub fn escape_lines(text: &str) -> String {
    text.split('\n').map(escape).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("llama-server"), "llama-server");
        assert_eq!(
            escape("a\x1b]0;pwned\x07b\nc\x7fd\u{9b}2Je\u{a0}é"),
            "a\\x1b]0;pwned\\x07b\\nc\\x7fd\\u{9b}2Je\u{a0}é"
        );
        assert_eq!(escape_lines("one\x1b[2J\ntwo\r\n"), "one\\x1b[2J\ntwo\\r\n");
    }
}

//! One memory domain (the host, or a memory cgroup with its effective limit): what it needs,
//! its trend, how long until it runs out, and the level that follows.

use crate::{
    collect::{cgroup::MemoryCgroup, host::HostMemory},
    units::format_bytes,
};

use super::{Config, DomainInput, DomainSample, Eta, Level, Sample, trend};

impl DomainSample {
    /// Bytes the domain cannot give back: what is charged less what can really be reclaimed.
    /// Resident model-file pages count as needed, although the kernel counts them as
    /// reclaimable cache: dropping them makes the model re-read its weights from disk.
    pub fn needed_bytes(&self) -> u64 {
        let reclaimable = self.reclaimable_bytes.saturating_sub(self.model_file_bytes);
        self.used_bytes.saturating_sub(reclaimable)
    }

    /// The host from `/proc/meminfo`: used = MemTotal − MemFree + swap in use; reclaimable =
    /// MemAvailable − MemFree (0 without MemAvailable: nothing is assumed reclaimable).
    pub fn host(t: f64, m: &HostMemory, model_file_bytes: u64) -> Self {
        let swap_used = m.swap_total_bytes.saturating_sub(m.swap_free_bytes);
        DomainSample {
            t,
            used_bytes: m.total_bytes.saturating_sub(m.free_bytes) + swap_used,
            reclaimable_bytes: m.available_bytes.unwrap_or(0).saturating_sub(m.free_bytes),
            model_file_bytes,
        }
    }

    /// A memory cgroup: its whole charge (`memory.current` / `memory.usage_in_bytes`) is
    /// counted as needed, page cache included; None without a usage figure.
    pub fn cgroup(t: f64, cg: &MemoryCgroup, model_file_bytes: u64) -> Option<Self> {
        Some(DomainSample {
            t,
            used_bytes: cg.usage_bytes?,
            reclaimable_bytes: 0,
            model_file_bytes,
        })
    }
}

/// What the host can hold before the OOM killer runs: RAM plus swap (RAM alone without swap).
pub fn host_limit(m: &HostMemory) -> u64 {
    m.total_bytes + m.swap_total_bytes
}

/// The outlook of one domain at its last sample.
#[derive(Debug, Clone)]
pub struct Outlook {
    pub level: Level,
    pub eta: Option<Eta>,
    /// Free share of the limit at the last sample (0 when over it).
    pub headroom_fraction: f64,
    pub reasons: Vec<String>,
}

/// How the domain's need moves: its trend, and whether it grows (not flat, not stopped).
struct Growth {
    trend: Option<trend::Trend>,
    growing: bool,
    confident: bool,
}

/// The domain's outlook; None for an unlimited domain or one without samples.
pub fn outlook(d: &DomainInput, cfg: &Config) -> Option<Outlook> {
    let limit = d.limit_bytes? as f64;
    let needed_now = d.samples.last()?.needed_bytes();
    let growth = growth(d, limit, cfg);
    let pending = pending_growth(d);
    let peak_over = pending > 0 && (needed_now + pending) as f64 > limit;
    let ceiling = peaks_bound_growth(d)
        && ((needed_now + pending) as f64) < limit * (1.0 - cfg.critical_headroom);
    let mut o = Outlook {
        level: Level::Ok,
        eta: growth
            .trend
            .filter(|_| growth.growing && !ceiling)
            .map(|t| eta(&t, limit)),
        headroom_fraction: ((limit - needed_now as f64) / limit).max(0.0),
        reasons: Vec::new(),
    };
    o.judge_growth(&d.name, &growth, peak_over, cfg);
    o.judge_state(d, cfg);
    if peak_over {
        o.raise(Level::Elevated, format!(
            "the models' predicted peak does not fit in {}: {} needed now + {} still to grow > {} limit",
            d.name, format_bytes(needed_now), format_bytes(pending), format_bytes(limit as u64)
        ));
    }
    if ceiling && growth.growing {
        o.reasons.push(format!(
            "growth bounded: the models' predicted peaks fit in {} ({} needed at most)",
            d.name,
            format_bytes(needed_now + pending)
        ));
    }
    if growth.trend.is_some() && !growth.growing && o.level == Level::Ok {
        o.reasons.push(format!("{} is flat: no ETA", d.name));
    }
    Some(o)
}

impl Outlook {
    fn raise(&mut self, level: Level, reason: String) {
        self.level = self.level.max(level);
        self.reasons.push(reason);
    }

    /// Levels from the trend: critical when the ETA is short and confident (or the models'
    /// peak says the growth will go on), or when the limit is close and the need grows.
    fn judge_growth(&mut self, name: &str, growth: &Growth, peak_over: bool, cfg: &Config) {
        let (eta, headroom) = (self.eta.map(|e| e.seconds), self.headroom_fraction * 100.0);
        let trusted = growth.confident || peak_over;
        if let Some(eta) = eta.filter(|&e| e < cfg.critical_eta_s && trusted) {
            self.raise(
                Level::Critical,
                format!("{name} runs out in {eta:.0} s at the current growth"),
            );
        }
        if self.headroom_fraction < cfg.critical_headroom && growth.confident {
            self.raise(
                Level::Critical,
                format!("{name} is {headroom:.1} % from its limit and growing"),
            );
        }
        if let Some(eta) = eta.filter(|&e| e < cfg.elevated_eta_s && growth.confident) {
            self.raise(
                Level::Elevated,
                format!("{name} runs out in {eta:.0} s if growth continues"),
            );
        }
    }

    /// Levels from the state now: little headroom left, or memory pressure (PSI).
    fn judge_state(&mut self, d: &DomainInput, cfg: &Config) {
        let headroom = self.headroom_fraction * 100.0;
        if self.headroom_fraction < cfg.elevated_headroom {
            self.raise(
                Level::Elevated,
                format!(
                    "{} has {headroom:.1} % of its limit left (model weights counted as needed)",
                    d.name
                ),
            );
        }
        if let Some(psi) = d
            .pressure_some_avg10
            .filter(|&p| p >= cfg.psi_some_elevated)
        {
            self.raise(
                Level::Elevated,
                format!(
                    "{} memory pressure: tasks stalled {psi:.1} % of the last 10 s",
                    d.name
                ),
            );
        }
    }
}

/// The trend over the window, and whether the growth is real: above the flat threshold over
/// the whole window, not stopped in the recent window, and (confident) agreed on by three
/// quarters of the pairwise slopes.
fn growth(d: &DomainInput, limit: f64, cfg: &Config) -> Growth {
    let series: Vec<Sample> = d
        .samples
        .iter()
        .map(|s| Sample {
            t: s.t,
            value: s.needed_bytes() as f64,
        })
        .collect();
    let fit = |window| trend::fit(&series, window, cfg.min_samples, cfg.min_span_s);
    let trend = fit(cfg.window_s);
    let flat_rate = (cfg.flat_bytes as f64).max(limit * cfg.flat_fraction) / cfg.window_s;
    let stopped = fit(cfg.recent_window_s).is_some_and(|r| {
        r.slope < flat_rate || trend.is_some_and(|t| r.slope < t.slope * cfg.stopped_ratio)
    });
    let growing =
        trend.is_some_and(|t| t.slope >= flat_rate && t.significant(cfg.noise_factor)) && !stopped;
    Growth {
        trend,
        growing,
        confident: growing && trend.is_some_and(|t| t.slope_low > 0.0),
    }
}

/// Time for the fitted need to reach the limit, the slope's quartiles giving the range.
fn eta(t: &trend::Trend, limit: f64) -> Eta {
    let headroom = (limit - t.level).max(0.0);
    Eta {
        seconds: headroom / t.slope,
        low_seconds: headroom / t.slope_high.max(t.slope),
        high_seconds: (t.slope_low > 0.0).then(|| headroom / t.slope_low),
    }
}

/// Whether the predicted peaks bound the domain's growth: every process has one and none is
/// above it (a process past its peak shows the prediction wrong, and the ceiling is dropped).
fn peaks_bound_growth(d: &DomainInput) -> bool {
    !d.processes.is_empty()
        && d.processes.iter().all(|p| {
            p.predicted_peak_bytes
                .is_some_and(|peak| p.rss_bytes <= peak)
        })
}

/// Bytes the domain's model processes will still grow by to reach their predicted peaks.
fn pending_growth(d: &DomainInput) -> u64 {
    d.processes
        .iter()
        .filter_map(|p| {
            p.predicted_peak_bytes
                .map(|peak| peak.saturating_sub(p.rss_bytes))
        })
        .sum()
}

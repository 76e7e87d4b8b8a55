//! The predictor: from timestamped samples of the host, memory cgroups and processes, how close
//! each target is to an OOM kill, how soon, who would die, and whether model weights thrash.
//!
//! Pure logic, no I/O: the daemon feeds it what the collectors read ([`DomainSample::host`],
//! [`DomainSample::cgroup`], oom scores, eBPF fault counts on model mappings, the memory
//! model's predicted peak) and keeps one [`LevelTracker`] per target. The method, each
//! threshold and what it cannot see are in `docs/predictor.md`.
//!
//! - [`trend`]: the robust slope (Theil–Sen) of a series;
//! - [`domain`]: one domain's need, ETA and level;
//! - [`victim`]: the process the OOM killer would pick;
//! - [`thrash`]: fault and refault rates;
//! - [`hysteresis`]: levels that do not flip on one burst.

pub mod domain;
pub mod gpu;
pub mod hysteresis;
pub mod thrash;
pub mod trend;
pub mod victim;

#[cfg(test)]
mod scenarios;

use serde::{Deserialize, Serialize};

pub use hysteresis::LevelTracker;

/// One point of a series: seconds (any monotonic origin) and a value (bytes or a counter).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub t: f64,
    pub value: f64,
}

/// A series sampled once a second from t = 0 (for tests).
#[cfg(test)]
fn series(values: &[f64]) -> Vec<Sample> {
    values
        .iter()
        .enumerate()
        .map(|(i, &value)| Sample { t: i as f64, value })
        .collect()
}

/// How close a target is to an OOM kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Ok,
    Elevated,
    Critical,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Elevated => "elevated",
            Level::Critical => "critical",
        })
    }
}

/// Time to OOM at the current trend, with its range from the slope's quartiles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Eta {
    pub seconds: f64,
    /// At the faster (third-quartile) slope.
    pub low_seconds: f64,
    /// At the slower (first-quartile) slope; None when that slope is not positive.
    pub high_seconds: Option<f64>,
}

/// What a domain (host or memory cgroup) looked like at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DomainSample {
    pub t: f64,
    /// Bytes charged (host: MemTotal − MemFree + swap used; cgroup: its usage).
    pub used_bytes: u64,
    /// Of those, bytes the kernel counts as reclaimable (host: MemAvailable − MemFree).
    pub reclaimable_bytes: u64,
    /// Resident bytes of model files mapped in the domain (counted as reclaimable by the
    /// kernel, as needed here).
    pub model_file_bytes: u64,
}

/// A process of a domain, as the predictor needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessInput {
    pub pid: u32,
    /// `/proc/<pid>/oom_score`.
    pub oom_score: u32,
    /// `/proc/<pid>/oom_score_adj` (-1000: never killed).
    pub oom_score_adj: i32,
    /// Resident (plus swapped) bytes now.
    pub rss_bytes: u64,
    /// The memory model's peak RAM (weights + KV at maximum context + compute), if a model.
    pub predicted_peak_bytes: Option<u64>,
    /// Cumulative page faults on the process's model-file mappings (eBPF), over time.
    pub model_file_faults: Vec<Sample>,
}

/// A memory domain: the host, or a memory cgroup with its effective limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainInput {
    /// `host`, or the cgroup's path.
    pub name: String,
    /// What the domain can hold (host: [`domain::host_limit`]; cgroup: effective limit);
    /// None = unlimited.
    pub limit_bytes: Option<u64>,
    /// Samples in time order; the last is now.
    pub samples: Vec<DomainSample>,
    /// PSI `some` avg10 (percent) of the domain, if known.
    pub pressure_some_avg10: Option<f64>,
    /// Cumulative file refaults (`workingset_refault_file`, pages), over time.
    pub refault_file: Vec<Sample>,
    /// The processes the domain's OOM killer chooses from.
    pub processes: Vec<ProcessInput>,
}

/// The thresholds; every default is explained in `docs/predictor.md`. The agent's config
/// sets them in its `[predictor]` section under these names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seconds of history the slope is fitted on.
    pub window_s: f64,
    /// Seconds of the recent window that tells a stopped ramp (plateau) apart.
    pub recent_window_s: f64,
    /// Fewest samples, and shortest span, for a trend.
    pub min_samples: usize,
    pub min_span_s: f64,
    /// Growth over `window_s` below max(`flat_bytes`, `flat_fraction` × limit) is flat.
    pub flat_bytes: u64,
    pub flat_fraction: f64,
    /// Growth counts only when the fitted rise over the span exceeds this many times the
    /// series' noise (median absolute residual).
    pub noise_factor: f64,
    /// The ramp stopped when the recent slope is below this share of the window's slope.
    pub stopped_ratio: f64,
    /// Critical when the confident ETA is below this.
    pub critical_eta_s: f64,
    /// Critical when less than this share of the limit is left and the need grows.
    pub critical_headroom: f64,
    /// Elevated when the confident ETA is below this.
    pub elevated_eta_s: f64,
    /// Elevated when less than this share of the limit is left.
    pub elevated_headroom: f64,
    /// Elevated when PSI `some` avg10 reaches this (percent).
    pub psi_some_elevated: f64,
    /// Thrashing when a process's model mappings fault this often (per second).
    pub model_fault_rate: f64,
    /// Thrashing when file refaults reach this many pages per second with weights resident.
    pub refault_pages_per_s: f64,
    /// Consecutive critical evaluations before a target is critical.
    pub confirm_critical: u32,
    /// Consecutive lower evaluations before a target's level comes down.
    pub calm_evaluations: u32,
}

impl Config {
    /// The first rule the thresholds break, as `(field, why)`; None when they make sense.
    pub fn check(&self) -> Option<(&'static str, &'static str)> {
        let fraction = |v: f64| (0.0..=1.0).contains(&v);
        let rules = [
            (
                "window_s",
                self.window_s >= self.recent_window_s,
                "must be at least recent_window_s",
            ),
            (
                "recent_window_s",
                self.recent_window_s > 0.0,
                "must be positive",
            ),
            ("min_samples", self.min_samples >= 3, "must be at least 3"),
            ("min_span_s", self.min_span_s > 0.0, "must be positive"),
            (
                "flat_fraction",
                fraction(self.flat_fraction),
                "must be within 0..=1",
            ),
            (
                "stopped_ratio",
                fraction(self.stopped_ratio),
                "must be within 0..=1",
            ),
            (
                "critical_headroom",
                fraction(self.critical_headroom),
                "must be within 0..=1",
            ),
            (
                "elevated_headroom",
                fraction(self.elevated_headroom),
                "must be within 0..=1",
            ),
            (
                "critical_eta_s",
                self.critical_eta_s > 0.0,
                "must be positive",
            ),
            (
                "elevated_eta_s",
                self.elevated_eta_s >= self.critical_eta_s,
                "must be at least critical_eta_s",
            ),
            (
                "confirm_critical",
                self.confirm_critical >= 1,
                "must be at least 1",
            ),
        ];
        rules
            .into_iter()
            .find(|(_, ok, _)| !ok)
            .map(|(field, _, why)| (field, why))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window_s: 30.0,
            recent_window_s: 5.0,
            min_samples: 5,
            min_span_s: 2.0,
            flat_bytes: 4 << 20,
            flat_fraction: 0.005,
            noise_factor: 4.0,
            stopped_ratio: 0.25,
            critical_eta_s: 20.0,
            critical_headroom: 0.05,
            elevated_eta_s: 300.0,
            elevated_headroom: 0.10,
            psi_some_elevated: 10.0,
            model_fault_rate: 100.0,
            refault_pages_per_s: 2560.0,
            confirm_critical: 2,
            calm_evaluations: 5,
        }
    }
}

/// The prediction for one target (host, cgroup or process): what `watch --json` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    pub level: Level,
    /// Seconds to OOM at the current trend; None when flat, falling or unknown.
    pub eta_seconds: Option<f64>,
    pub eta_low_seconds: Option<f64>,
    pub eta_high_seconds: Option<f64>,
    /// The domain that will run out first: `host` or a cgroup path.
    pub domain: Option<String>,
    /// The process the OOM killer would pick in that domain.
    pub victim_pid: Option<u32>,
    /// Model weights are being faulted back in.
    pub thrashing: bool,
    pub reasons: Vec<String>,
}

/// Assesses a target from the domains it lives in (a process or cgroup: its tightest cgroup
/// and the host; the host: itself), before hysteresis.
pub fn assess(domains: &[&DomainInput], cfg: &Config) -> Assessment {
    let worst = domains
        .iter()
        .filter_map(|d| Some((d, domain::outlook(d, cfg)?)))
        .min_by(|(_, a), (_, b)| worse_first(a, b));
    let mut out = Assessment::default();
    if let Some((d, o)) = worst {
        out.level = o.level;
        out.eta_seconds = o.eta.map(|e| e.seconds);
        out.eta_low_seconds = o.eta.map(|e| e.low_seconds);
        out.eta_high_seconds = o.eta.and_then(|e| e.high_seconds);
        out.domain = Some(d.name.clone());
        out.victim_pid = victim::victim(&d.processes);
        out.reasons = o.reasons;
    }
    for reason in domains.iter().flat_map(|d| thrash_reasons(d, cfg)) {
        out.thrashing = true;
        out.level = out.level.max(Level::Elevated);
        out.reasons.push(reason);
    }
    out
}

/// Orders outlooks worst first: higher level, then sooner ETA, then less headroom.
fn worse_first(a: &domain::Outlook, b: &domain::Outlook) -> std::cmp::Ordering {
    let eta = |o: &domain::Outlook| o.eta.map_or(f64::INFINITY, |e| e.seconds);
    b.level
        .cmp(&a.level)
        .then(eta(a).total_cmp(&eta(b)))
        .then(a.headroom_fraction.total_cmp(&b.headroom_fraction))
}

/// Why the domain's model weights thrash, if they do.
fn thrash_reasons(d: &DomainInput, cfg: &Config) -> Vec<String> {
    let mut reasons: Vec<String> = d
        .processes
        .iter()
        .filter_map(|p| {
            let rate = thrash::counter_rate(&p.model_file_faults, cfg.window_s)?;
            (rate >= cfg.model_fault_rate).then(|| {
                format!(
                    "pid {}: model weights faulted back in at {rate:.0}/s",
                    p.pid
                )
            })
        })
        .collect();
    let weights_resident = d.samples.last().is_some_and(|s| s.model_file_bytes > 0);
    // Refaults are host-wide, whoever's files they are: a fallback for when the probes do
    // not count faults on the model files themselves.
    let faults_counted = d.processes.iter().any(|p| !p.model_file_faults.is_empty());
    if let Some(rate) = thrash::counter_rate(&d.refault_file, cfg.window_s)
        .filter(|&r| weights_resident && !faults_counted && r >= cfg.refault_pages_per_s)
    {
        reasons.push(format!(
            "{}: file pages refaulted at {rate:.0} pages/s with model weights resident",
            d.name
        ));
    }
    reasons
}

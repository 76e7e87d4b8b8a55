//! The predictor on synthetic series at 1 Hz (4 Hz where said): ramps into a limit, plateaus,
//! bursts, a steady server, a model growing its KV cache toward a known peak, the host with and
//! without swap. Lead times and ETA errors are printed (`--nocapture`).

use super::*;
use crate::collect::host::HostMemory;

const MB: f64 = 1e6;
const GIB: u64 = 1 << 30;
const CGROUP: &str = "/bench";

/// Deterministic noise in [-1, 1).
fn noise(i: u64) -> f64 {
    let x = i
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    (x >> 33) as f64 / (1u64 << 30) as f64 - 1.0
}

/// Feeds `usage(t)` (bytes) of one cgroup with `limit` at `hz` for `seconds`, or until it
/// reaches the limit (the OOM kill); returns each evaluation after hysteresis.
fn simulate(
    hz: f64,
    seconds: f64,
    limit: u64,
    usage: impl Fn(f64) -> f64,
    processes: impl Fn(f64) -> Vec<ProcessInput>,
) -> Vec<(f64, Assessment)> {
    let cfg = Config::default();
    let mut tracker = LevelTracker::default();
    let mut domain = DomainInput {
        name: CGROUP.into(),
        limit_bytes: Some(limit),
        ..Default::default()
    };
    let mut out = Vec::new();
    for i in 0..=(seconds * hz) as u64 {
        let t = i as f64 / hz;
        let used = usage(t).max(0.0);
        if used >= limit as f64 {
            break;
        }
        domain.samples.push(DomainSample {
            t,
            used_bytes: used as u64,
            ..Default::default()
        });
        domain.samples.retain(|s| s.t >= t - cfg.window_s - 1.0);
        domain.processes = processes(t);
        out.push((t, tracker.apply(assess(&[&domain], &cfg), &cfg)));
    }
    out
}

fn no_processes(_: f64) -> Vec<ProcessInput> {
    Vec::new()
}

/// Lead time and ETA error at the first critical evaluation of a ramp that OOMs at `t_oom`.
fn first_critical(run: &[(f64, Assessment)], t_oom: f64) -> Option<(f64, f64)> {
    let (t, a) = run.iter().find(|(_, a)| a.level == Level::Critical)?;
    let lead = t_oom - t;
    Some((lead, (a.eta_seconds? - lead).abs() / lead))
}

fn ramp(base: f64, rate: f64) -> impl Fn(f64) -> f64 {
    move |t| base + rate * t + 2.0 * MB * noise((t * 1000.0) as u64)
}

#[test]
fn ramps_into_a_limit_are_critical_early_with_accurate_eta() {
    let base = 50.0 * MB;
    for (rate_mb, hz, min_lead) in [
        (5.0, 1.0, 10.0),
        (20.0, 1.0, 10.0),
        (50.0, 1.0, 10.0),
        (100.0, 1.0, 5.0),
        (200.0, 4.0, 2.0),
    ] {
        let rate = rate_mb * MB;
        let t_oom = (GIB as f64 - base) / rate;
        let run = simulate(hz, t_oom + 5.0, GIB, ramp(base, rate), no_processes);
        let (lead, error) = first_critical(&run, t_oom).expect("critical before the OOM");
        eprintln!(
            "ramp {rate_mb} MB/s into 1 GiB at {hz} Hz: OOM at {t_oom:.1} s, critical {lead:.1} s before, ETA error {:.1} %",
            error * 100.0
        );
        assert!(lead >= min_lead, "{rate_mb} MB/s: lead {lead:.1} s");
        assert!(error <= 0.25, "{rate_mb} MB/s: ETA error {error:.2}");
        assert_eq!(run.last().unwrap().1.domain.as_deref(), Some(CGROUP));
    }
}

#[test]
fn a_noisy_ramp_with_bursts_keeps_its_lead_and_eta() {
    // 50 MB/s with ±20 MB of noise and a 200 MB burst every 7 s, into 1 GiB.
    let usage = |t: f64| {
        let burst = if (t as u64) % 7 == 6 { 200.0 * MB } else { 0.0 };
        50.0 * MB + 50.0 * MB * t + burst + 20.0 * MB * noise(t as u64)
    };
    let ramp_oom = (GIB as f64 - 50.0 * MB) / (50.0 * MB);
    let run = simulate(1.0, ramp_oom + 5.0, GIB, usage, no_processes);
    // A burst may reach the limit before the ramp does: the first sample over it.
    let t_oom = ramp_oom.min(run.last().unwrap().0 + 1.0);
    let (lead, error) = first_critical(&run, t_oom).expect("critical before the OOM");
    eprintln!(
        "noisy bursty 50 MB/s into 1 GiB: critical {lead:.1} s before a {t_oom:.1}-s OOM, ETA error {:.1} %",
        error * 100.0
    );
    assert!(lead >= 10.0 && error <= 0.25);
}

#[test]
fn a_stepping_allocator_is_a_ramp() {
    // 100 MB every 2 s (50 MB/s on average) into 1 GiB: the pauses are not plateaus.
    let usage = |t: f64| 50.0 * MB + 100.0 * MB * (t / 2.0).floor();
    let t_oom = 2.0 * ((GIB as f64 - 50.0 * MB) / (100.0 * MB)).ceil();
    let run = simulate(1.0, t_oom + 5.0, GIB, usage, no_processes);
    let (lead, error) = first_critical(&run, t_oom).expect("critical before the OOM");
    eprintln!(
        "100 MB every 2 s into 1 GiB: OOM at {t_oom:.0} s, critical {lead:.1} s before, ETA error {:.1} %",
        error * 100.0
    );
    assert!(lead >= 10.0 && error <= 0.25);
}

#[test]
fn a_ramp_that_plateaus_below_the_limit_is_never_critical() {
    let usage = |t: f64| (50.0 * MB + 20.0 * MB * t.min(20.0)) + 2.0 * MB * noise(t as u64);
    let run = simulate(1.0, 300.0, GIB, usage, no_processes);
    assert!(run.iter().all(|(_, a)| a.level != Level::Critical));
    let last = &run.last().unwrap().1;
    assert_eq!(
        (last.level, last.eta_seconds),
        (Level::Ok, None),
        "{last:?}"
    );
}

#[test]
fn a_bursty_but_bounded_allocator_is_never_critical() {
    // 400 MB, with bursts to 950 MB (88 % of the limit) for 2 s every 10 s.
    let usage = |t: f64| {
        let burst = if (t as u64) % 10 < 2 { 550.0 * MB } else { 0.0 };
        400.0 * MB + burst + 3.0 * MB * noise(t as u64)
    };
    let run = simulate(1.0, 300.0, GIB, usage, no_processes);
    let worst = run.iter().map(|(_, a)| a.level).max().unwrap();
    eprintln!("bursty allocator: worst level {worst}");
    assert!(worst < Level::Critical);
}

#[test]
fn a_steady_server_is_ok() {
    let run = simulate(
        1.0,
        300.0,
        GIB,
        |t| 600.0 * MB + 3.0 * MB * noise(t as u64),
        no_processes,
    );
    let bad: Vec<_> = run
        .iter()
        .filter(|(_, a)| a.level != Level::Ok || a.eta_seconds.is_some())
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}

#[test]
fn a_model_growing_toward_a_peak_over_the_limit_is_flagged_early() {
    // Weights (400 MB) mapped in 2 s, then the KV cache grows 10 MB/s toward a 1.3 GB peak.
    let usage = |t: f64| 20.0 * MB + 200.0 * MB * t.min(2.0) + 10.0 * MB * (t - 2.0).max(0.0);
    let model = move |t: f64| {
        vec![ProcessInput {
            pid: 42,
            oom_score: 800,
            rss_bytes: usage(t) as u64,
            predicted_peak_bytes: Some(1_300_000_000),
            ..Default::default()
        }]
    };
    let run = simulate(1.0, 200.0, GIB, usage, model);
    let first = &run[0].1;
    assert_eq!(first.level, Level::Elevated);
    assert!(
        first.reasons.iter().any(|r| r.contains("predicted peak")),
        "{:?}",
        first.reasons
    );
    assert_eq!(first.victim_pid, Some(42));
    let t_oom = 2.0 + (GIB as f64 - 420.0 * MB) / (10.0 * MB);
    // The 200 MB/s weight load itself looks like a ramp into the limit and, the peak not
    // fitting, is critical (with an ETA that is too short); the KV growth is critical again
    // before the OOM. Measured from the start of the last critical episode.
    let (load_lead, _) = first_critical(&run, t_oom).unwrap();
    let episode = run
        .iter()
        .rposition(|(_, a)| a.level != Level::Critical)
        .map_or(0, |i| i + 1);
    let (lead, error) = first_critical(&run[episode..], t_oom).unwrap();
    eprintln!(
        "model KV growth 10 MB/s toward a peak over 1 GiB: critical during the load ({load_lead:.1} s before OOM), then {lead:.1} s before OOM with ETA error {:.1} %",
        error * 100.0
    );
    assert!(lead >= 10.0 && error <= 0.25);
}

#[test]
fn a_model_whose_peak_fits_is_bounded_by_it_until_it_passes_it() {
    // KV growing 50 MB/s from 300 MB toward a 900 MB peak in 1 GiB: a plain ramp would be
    // critical; the peak bounds it. The same growth past a wrong (600 MB) peak is critical.
    let usage = |t: f64| 300.0 * MB + 50.0 * MB * t.min(12.0);
    let model = |peak: u64| {
        move |t: f64| {
            let rss_bytes = usage(t) as u64;
            vec![ProcessInput {
                pid: 9,
                rss_bytes,
                predicted_peak_bytes: Some(peak),
                ..Default::default()
            }]
        }
    };
    let run = simulate(1.0, 60.0, GIB, usage, model(900_000_000));
    assert!(
        run.iter().all(|(_, a)| a.level < Level::Critical),
        "{run:?}"
    );
    assert!(
        run[6]
            .1
            .reasons
            .iter()
            .any(|r| r.contains("growth bounded")),
        "{:?}",
        run[6].1
    );
    let run = simulate(1.0, 60.0, GIB, usage, model(600_000_000));
    assert!(run.iter().any(|(_, a)| a.level == Level::Critical));
}

fn host_memory(available: u64, swap_total: u64) -> HostMemory {
    HostMemory {
        total_bytes: 16 * GIB,
        available_bytes: Some(available),
        free_bytes: available / 2,
        swap_total_bytes: swap_total,
        swap_free_bytes: swap_total,
        ..HostMemory::default()
    }
}

/// A host whose MemAvailable falls 100 MB/s from 3 GB, with `swap` bytes of free swap.
fn host_ramp(swap: u64) -> Assessment {
    let cfg = Config::default();
    let mut host = DomainInput {
        name: "host".into(),
        limit_bytes: Some(domain::host_limit(&host_memory(0, swap))),
        ..Default::default()
    };
    for i in 0..10 {
        let available = 3_000_000_000 - i * 100_000_000;
        host.samples.push(DomainSample::host(
            i as f64,
            &host_memory(available, swap),
            0,
        ));
    }
    assess(&[&host], &cfg)
}

#[test]
fn the_host_without_swap_runs_out_when_available_memory_does() {
    let a = host_ramp(0);
    let eta = a.eta_seconds.unwrap();
    eprintln!("host without swap, 100 MB/s: ETA {eta:.1} s (truth 21.0 s)");
    assert!((eta - 21.0).abs() / 21.0 <= 0.25, "{a:?}");
    assert_eq!(a.domain.as_deref(), Some("host"));
    // Swap adds to what the host can hold before the OOM killer runs.
    assert!(host_ramp(4 * GIB).eta_seconds.unwrap() > eta + 30.0);
}

#[test]
fn mapped_weights_are_not_counted_as_available() {
    let m = host_memory(6 * GIB, 0);
    let without = DomainSample::host(0.0, &m, 0).needed_bytes();
    // MemTotal 16 − MemFree 3 = 13 GiB used, of which MemAvailable − MemFree = 3 GiB
    // reclaimable; 2 GiB of those are weights, so 12 GiB are needed, not 10.
    let with_weights = DomainSample::host(0.0, &m, 2 * GIB).needed_bytes();
    assert_eq!(without, 10 * GIB);
    assert_eq!(with_weights, 12 * GIB);
    // Weights beyond what the kernel calls reclaimable are already counted as used.
    assert_eq!(
        DomainSample::host(0.0, &m, 4 * GIB).needed_bytes(),
        13 * GIB
    );
    let host = DomainInput {
        name: "host".into(),
        limit_bytes: Some(16 * GIB),
        samples: vec![DomainSample::host(0.0, &m, 4 * GIB)],
        ..Default::default()
    };
    let a = assess(&[&host], &Config::default());
    assert_eq!(a.level, Level::Ok);
    let tight = host_memory(2 * GIB, 0);
    let host = DomainInput {
        name: "host".into(),
        limit_bytes: Some(16 * GIB),
        samples: vec![DomainSample::host(0.0, &tight, GIB)],
        ..Default::default()
    };
    let a = assess(&[&host], &Config::default());
    assert_eq!(
        a.level,
        Level::Elevated,
        "1 GiB left of 16 once the weights count"
    );
}

#[test]
fn the_tightest_domain_and_its_victim_are_named() {
    let ramp: Vec<DomainSample> = (0..10)
        .map(|i| DomainSample {
            t: i as f64,
            used_bytes: 500_000_000 + i * 50_000_000,
            ..Default::default()
        })
        .collect();
    let process = |pid, oom_score| ProcessInput {
        pid,
        oom_score,
        ..Default::default()
    };
    let cgroup = DomainInput {
        name: CGROUP.into(),
        limit_bytes: Some(GIB),
        samples: ramp.clone(),
        processes: vec![process(7, 500), process(8, 900)],
        ..Default::default()
    };
    let host = DomainInput {
        name: "host".into(),
        limit_bytes: Some(64 * GIB),
        samples: ramp,
        processes: vec![process(1, 999)],
        ..Default::default()
    };
    let a = assess(&[&host, &cgroup], &Config::default());
    assert_eq!(
        (a.domain.as_deref(), a.victim_pid, a.level),
        (Some(CGROUP), Some(8), Level::Critical)
    );
    let json = serde_json::to_value(&a).unwrap();
    for key in [
        "level",
        "eta_seconds",
        "domain",
        "victim_pid",
        "thrashing",
        "reasons",
    ] {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
    assert_eq!(json["level"], "critical");
}

fn counter(per_s: f64) -> Vec<Sample> {
    (0..10)
        .map(|i| Sample {
            t: i as f64,
            value: per_s * i as f64,
        })
        .collect()
}

#[test]
fn weights_faulted_back_in_are_thrashing() {
    let cfg = Config::default();
    let mut d = DomainInput {
        name: "host".into(),
        limit_bytes: Some(16 * GIB),
        ..Default::default()
    };
    d.samples.push(DomainSample {
        t: 9.0,
        used_bytes: GIB,
        model_file_bytes: GIB,
        ..Default::default()
    });
    d.processes = vec![ProcessInput {
        pid: 5,
        model_file_faults: counter(1.0),
        ..Default::default()
    }];
    assert!(!assess(&[&d], &cfg).thrashing);
    // Host-wide refaults while the model's own faults are counted and low: someone else's
    // files (a build, a backup), not the weights.
    d.refault_file = counter(5000.0);
    assert!(!assess(&[&d], &cfg).thrashing);
    // Without fault attribution, the refaults are all there is to go by.
    d.processes[0].model_file_faults.clear();
    let a = assess(&[&d], &cfg);
    assert!(a.thrashing && a.level == Level::Elevated, "{a:?}");
    d.refault_file.clear();
    d.processes[0].model_file_faults = counter(500.0);
    let a = assess(&[&d], &cfg);
    assert!(
        a.thrashing && a.reasons.iter().any(|r| r.contains("pid 5")),
        "{a:?}"
    );
}

#[test]
fn a_cgroup_counts_its_whole_charge_against_its_effective_limit() {
    use crate::collect::cgroup::{CgroupVersion, MemoryCgroup};
    for version in [CgroupVersion::V1, CgroupVersion::V2] {
        let mut cg = MemoryCgroup {
            version,
            path: CGROUP.into(),
            limit_bytes: None,
            usage_bytes: Some(1_000_000_000),
            effective_limit_bytes: Some(GIB),
            high_bytes: None,
        };
        let sample = DomainSample::cgroup(0.0, &cg, 300_000_000).unwrap();
        assert_eq!(sample.needed_bytes(), 1_000_000_000);
        let d = DomainInput {
            name: cg.path.clone(),
            limit_bytes: cg.effective_limit_bytes,
            samples: vec![sample],
            ..Default::default()
        };
        let a = assess(&[&d], &Config::default());
        assert_eq!(
            (a.level, a.domain.as_deref()),
            (Level::Elevated, Some(CGROUP))
        );
        cg.usage_bytes = None;
        assert_eq!(DomainSample::cgroup(0.0, &cg, 0), None);
    }
}

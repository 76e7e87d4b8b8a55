//! Pressure stall information: `/proc/pressure/memory` for the host and `memory.pressure` of a
//! v2 cgroup (same format). Lines are parsed by `procfs`'s `parse_pressure_record`; a missing
//! `full` line (the host's `cpu` file before 5.13) is None rather than an error.

use std::path::Path;

use procfs::{PressureRecord, parse_pressure_record};
use serde::Serialize;

use super::read_small;

/// One PSI line: the share of wall time (percent) that tasks stalled on memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stall {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total stall time in microseconds.
    pub total_us: u64,
}

/// `some` (at least one task stalled) and `full` (all non-idle tasks stalled).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Pressure {
    pub some: Stall,
    pub full: Option<Stall>,
}

impl From<PressureRecord> for Stall {
    fn from(r: PressureRecord) -> Self {
        Stall {
            avg10: f64::from(r.avg10),
            avg60: f64::from(r.avg60),
            avg300: f64::from(r.avg300),
            total_us: r.total,
        }
    }
}

/// Parses a PSI file; None without a valid `some` line.
pub fn parse_pressure(text: &str) -> Option<Pressure> {
    let record = |kind: &str| {
        let line = text.lines().find(|l| l.starts_with(kind))?;
        parse_pressure_record(line).ok().map(Stall::from)
    };
    Some(Pressure {
        some: record("some ")?,
        full: record("full "),
    })
}

/// Reads a PSI file (`/proc/pressure/memory`, or `memory.pressure` in a v2 cgroup).
pub fn read_pressure(path: &Path) -> Option<Pressure> {
    parse_pressure(&read_small(path)?)
}

/// The host's memory pressure; None without PSI (kernel < 4.20, or `psi=0`).
pub fn read_host_memory_pressure() -> Option<Pressure> {
    read_pressure(Path::new("/proc/pressure/memory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_pressure() {
        let text = "some avg10=4.50 avg60=0.91 avg300=0.00 total=681245\n\
                    full avg10=2.10 avg60=0.12 avg300=0.00 total=391926\n";
        let p = parse_pressure(text).unwrap();
        assert!((p.some.avg10 - 4.5).abs() < 1e-6);
        assert_eq!(p.some.total_us, 681_245);
        let full = p.full.unwrap();
        assert!((full.avg10 - 2.1).abs() < 1e-6 && (full.avg60 - 0.12).abs() < 1e-6);
        assert_eq!(full.total_us, 391_926);
    }

    #[test]
    fn missing_or_broken_lines() {
        let only_some = parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=1490\n");
        assert_eq!(only_some.unwrap().full, None);
        assert_eq!(parse_pressure(""), None);
        assert_eq!(
            parse_pressure("some avg10=x avg60=0 avg300=0 total=1\n"),
            None
        );
    }

    #[test]
    fn reads_this_host_when_psi_exists() {
        if Path::new("/proc/pressure/memory").exists() {
            assert!(read_host_memory_pressure().is_some());
        }
    }
}

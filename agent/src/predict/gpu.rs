//! GPU headroom against the models' predicted VRAM peaks: will a device's free memory hold
//! what its model processes still have to allocate (weights offloaded, KV cache, compute
//! buffers) to reach their predicted peaks?
//!
//! Pure: the daemon passes NVML's free memory of the device and, per model process on it,
//! the memory model's peak and what the process holds now (the ioctl figure, else NVML's).
//! The growth of processes with no prediction is not foreseen.

use crate::units::format_bytes;

use super::{Config, Level};

/// A device's memory now, from NVML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuHeadroom {
    /// The device key (`N` of `/dev/nvidiaN`).
    pub device: u32,
    pub total_bytes: u64,
    /// NVML's free memory (not total − used: NVML's v2 `used` leaves out the driver's
    /// reserved memory, which is not free either).
    pub free_bytes: u64,
}

/// A model process on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuNeed {
    pub pid: u32,
    /// The memory model's VRAM peak for the process.
    pub predicted_peak_bytes: u64,
    /// What it holds on the device now.
    pub vram_now_bytes: u64,
}

impl GpuNeed {
    /// Bytes still to allocate to reach the peak (0 past it: the prediction was low).
    pub fn still_needed(&self) -> u64 {
        self.predicted_peak_bytes
            .saturating_sub(self.vram_now_bytes)
    }
}

/// How a device's headroom compares with the growth its model processes still have ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuVerdict {
    /// Critical when the growth does not fit in the free memory; elevated when it fits but
    /// leaves less than `elevated_headroom` of the device free; ok otherwise.
    pub level: Level,
    /// The device and the figures (worded for the assessment's reasons whatever the level;
    /// the caller adds it when the level is not ok).
    pub reason: String,
    /// Free memory left once the peaks are reached (0 when they do not fit).
    pub headroom_bytes: u64,
    /// Bytes the processes still have to allocate, together.
    pub needed_bytes: u64,
}

/// Assesses `device` against `needs`, the model processes on it. The elevated margin is
/// the predictor's `elevated_headroom` share of the device's total memory.
pub fn assess_gpu(needs: &[GpuNeed], device: &GpuHeadroom, cfg: &Config) -> GpuVerdict {
    let needed = needs
        .iter()
        .fold(0u64, |sum, n| sum.saturating_add(n.still_needed()));
    let free = device.free_bytes;
    let margin = (device.total_bytes as f64 * cfg.elevated_headroom) as u64;
    let (level, outcome) = if needed > free {
        (Level::Critical, "more than is free".to_owned())
    } else if needed > free.saturating_sub(margin) {
        let percent = cfg.elevated_headroom * 100.0;
        let left = format_bytes(free - needed);
        (
            Level::Elevated,
            format!("{left} would be left, under the {percent:.0} % margin"),
        )
    } else {
        (Level::Ok, "it fits".to_owned())
    };
    GpuVerdict {
        level,
        reason: format!(
            "GPU {}: {}; {} free: needs {} more, {outcome}",
            device.device,
            figures(needs),
            format_bytes(free),
            format_bytes(needed),
        ),
        headroom_bytes: free.saturating_sub(needed),
        needed_bytes: needed,
    }
}

/// Each process's peak and holding: `pid 42 predicted VRAM peak 21.3 GiB, holds 18.0 GiB`.
fn figures(needs: &[GpuNeed]) -> String {
    if needs.is_empty() {
        return "no model process with a predicted VRAM peak".to_owned();
    }
    needs
        .iter()
        .map(|n| {
            format!(
                "pid {} predicted VRAM peak {}, holds {}",
                n.pid,
                format_bytes(n.predicted_peak_bytes),
                format_bytes(n.vram_now_bytes)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A 24 GiB device with `free` bytes free.
    fn device(free: u64) -> GpuHeadroom {
        GpuHeadroom {
            device: 0,
            total_bytes: 24 * GIB,
            free_bytes: free,
        }
    }

    fn need(pid: u32, peak: u64, now: u64) -> GpuNeed {
        GpuNeed {
            pid,
            predicted_peak_bytes: peak,
            vram_now_bytes: now,
        }
    }

    #[test]
    fn a_peak_beyond_the_free_memory_is_critical() {
        // 21.3 GiB peak, 18 GiB held: 3.3 GiB to go, 2.1 GiB free.
        let peak = 21 * GIB + 300 * MIB;
        let free = 2 * GIB + 100 * MIB;
        let v = assess_gpu(
            &[need(42, peak, 18 * GIB)],
            &device(free),
            &Config::default(),
        );
        assert_eq!(v.level, Level::Critical);
        assert_eq!(v.needed_bytes, 3 * GIB + 300 * MIB);
        assert_eq!(v.headroom_bytes, 0);
        assert_eq!(
            v.reason,
            "GPU 0: pid 42 predicted VRAM peak 21.3 GiB, holds 18.0 GiB; 2.10 GiB free: \
             needs 3.29 GiB more, more than is free"
        );
    }

    #[test]
    fn a_peak_that_fits_within_the_margin_is_elevated() {
        // 4 GiB to go in 5 GiB free leaves 1 GiB, under 10 % of 24 GiB (2.4 GiB).
        let v = assess_gpu(
            &[need(7, 12 * GIB, 8 * GIB)],
            &device(5 * GIB),
            &Config::default(),
        );
        assert_eq!(v.level, Level::Elevated);
        assert_eq!((v.needed_bytes, v.headroom_bytes), (4 * GIB, GIB));
        assert_eq!(
            v.reason,
            "GPU 0: pid 7 predicted VRAM peak 12.0 GiB, holds 8.00 GiB; 5.00 GiB free: \
             needs 4.00 GiB more, 1.00 GiB would be left, under the 10 % margin"
        );
    }

    #[test]
    fn a_peak_that_fits_with_the_margin_is_ok() {
        // 4 GiB to go in 7 GiB free leaves 3 GiB, over the 2.4 GiB margin.
        let v = assess_gpu(
            &[need(7, 12 * GIB, 8 * GIB)],
            &device(7 * GIB),
            &Config::default(),
        );
        assert_eq!(v.level, Level::Ok);
        assert_eq!((v.needed_bytes, v.headroom_bytes), (4 * GIB, 3 * GIB));
        assert!(
            v.reason.ends_with("needs 4.00 GiB more, it fits"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn the_boundaries_are_exact() {
        let cfg = Config::default();
        let margin = (24 * GIB) / 10;
        let at = |free| assess_gpu(&[need(1, 4 * GIB, 0)], &device(free), &cfg).level;
        assert_eq!(at(4 * GIB), Level::Elevated, "fits exactly, nothing left");
        assert_eq!(at(4 * GIB - 1), Level::Critical);
        assert_eq!(at(4 * GIB + margin), Level::Ok, "exactly the margin left");
        assert_eq!(at(4 * GIB + margin - 1), Level::Elevated);
    }

    #[test]
    fn the_processes_on_a_device_grow_together() {
        // Each fits in 3 GiB on its own; together they need 4 GiB.
        let v = assess_gpu(
            &[need(1, 6 * GIB, 4 * GIB), need(2, 3 * GIB, GIB)],
            &device(3 * GIB),
            &Config::default(),
        );
        assert_eq!((v.level, v.needed_bytes), (Level::Critical, 4 * GIB));
        assert_eq!(
            v.reason,
            "GPU 0: pid 1 predicted VRAM peak 6.00 GiB, holds 4.00 GiB; pid 2 predicted VRAM \
             peak 3.00 GiB, holds 1.00 GiB; 3.00 GiB free: needs 4.00 GiB more, more than is free"
        );
    }

    #[test]
    fn a_process_past_its_peak_needs_nothing_more() {
        let v = assess_gpu(&[need(1, 6 * GIB, 7 * GIB)], &device(0), &Config::default());
        assert_eq!(
            (v.level, v.needed_bytes, v.headroom_bytes),
            (Level::Ok, 0, 0)
        );
    }

    #[test]
    fn the_margin_follows_the_predictor_config() {
        let cfg = Config {
            elevated_headroom: 0.25,
            ..Config::default()
        };
        // 4 GiB to go in 9 GiB free leaves 5 GiB: over 10 % of 24 GiB, under 25 % (6 GiB).
        let v = assess_gpu(&[need(1, 4 * GIB, 0)], &device(9 * GIB), &cfg);
        assert_eq!(v.level, Level::Elevated);
        assert!(
            v.reason
                .ends_with("5.00 GiB would be left, under the 25 % margin"),
            "{}",
            v.reason
        );
    }
}

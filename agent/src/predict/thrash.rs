//! Thrashing of model weights: pages of a model file faulted back in after the kernel dropped
//! them. Once a model is loaded and resident its mappings stop faulting, so a sustained fault
//! rate on them (the eBPF per-mapping counts) or a high host file-refault rate
//! (`workingset_refault_file`) means weights are being read from disk again.

use super::{Sample, trend::window};

/// The rate per second of a cumulative counter over its last `window_s` seconds; a counter
/// that went down was reset (process restarted, LRU eviction), so only what follows counts.
pub fn counter_rate(counter: &[Sample], window_s: f64) -> Option<f64> {
    let recent = window(counter, window_s);
    let reset = recent.windows(2).rposition(|w| w[1].value < w[0].value);
    let since = &recent[reset.map_or(0, |i| i + 1)..];
    let (first, last) = (since.first()?, since.last()?);
    let dt = last.t - first.t;
    (dt > 0.0).then(|| (last.value - first.value) / dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::series;

    #[test]
    fn rate_over_the_window_after_the_last_reset() {
        assert_eq!(
            counter_rate(&series(&[0.0, 100.0, 200.0, 300.0]), 30.0),
            Some(100.0)
        );
        assert_eq!(
            counter_rate(&series(&[0.0, 5000.0, 10.0, 30.0]), 30.0),
            Some(20.0)
        );
        assert_eq!(
            counter_rate(&series(&[0.0, 100.0, 200.0, 300.0]), 1.0),
            Some(100.0)
        );
        assert_eq!(counter_rate(&series(&[7.0]), 30.0), None);
    }
}

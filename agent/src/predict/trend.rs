//! A robust linear trend: the Theil–Sen slope (median of the slopes between every pair of
//! samples) with its quartiles as the uncertainty. Up to 29 % of the samples can be bursts
//! without moving the median, unlike least squares.

use super::Sample;

/// At most this many samples enter the pairwise slopes (evenly thinned): 7 140 pairs.
const MAX_POINTS: usize = 120;

/// The trend of a series over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trend {
    /// Median pairwise slope, in units per second.
    pub slope: f64,
    /// First quartile of the pairwise slopes: above 0 when three quarters of them agree
    /// that the series grows.
    pub slope_low: f64,
    /// Third quartile of the pairwise slopes.
    pub slope_high: f64,
    /// The fitted value at the last sample's time (median of the residual offsets).
    pub level: f64,
    /// Median absolute residual around the fitted line: the series' noise.
    pub spread: f64,
    /// Seconds between the first and the last sample fitted.
    pub span_s: f64,
}

impl Trend {
    /// Whether the fitted growth over the span stands `factor` times above the noise.
    pub fn significant(&self, factor: f64) -> bool {
        self.slope * self.span_s > factor * self.spread
    }
}

/// Fits the samples of the last `window_s` seconds (samples in time order); None with fewer
/// than `min_samples` of them or a span under `min_span_s`.
pub fn fit(
    samples: &[Sample],
    window_s: f64,
    min_samples: usize,
    min_span_s: f64,
) -> Option<Trend> {
    let recent = window(samples, window_s);
    let (first, last) = (recent.first()?, recent.last()?);
    if recent.len() < min_samples.max(2) || last.t - first.t < min_span_s {
        return None;
    }
    let points = thin(recent);
    let mut slopes = pairwise_slopes(&points);
    if slopes.is_empty() {
        return None;
    }
    slopes.sort_by(f64::total_cmp);
    let slope = quantile(&slopes, 0.5);
    let mut offsets: Vec<f64> = points
        .iter()
        .map(|p| p.value - slope * (p.t - last.t))
        .collect();
    offsets.sort_by(f64::total_cmp);
    let level = quantile(&offsets, 0.5);
    let mut residuals: Vec<f64> = offsets.iter().map(|o| (o - level).abs()).collect();
    residuals.sort_by(f64::total_cmp);
    Some(Trend {
        slope,
        slope_low: quantile(&slopes, 0.25),
        slope_high: quantile(&slopes, 0.75),
        level,
        spread: quantile(&residuals, 0.5),
        span_s: last.t - first.t,
    })
}

/// The samples within `window_s` seconds of the last one.
pub fn window(samples: &[Sample], window_s: f64) -> &[Sample] {
    let Some(last) = samples.last() else {
        return samples;
    };
    &samples[samples.partition_point(|s| s.t < last.t - window_s)..]
}

/// At most `MAX_POINTS` samples, evenly spaced, the last one always kept.
fn thin(samples: &[Sample]) -> Vec<Sample> {
    let step = samples.len().div_ceil(MAX_POINTS).max(1);
    let skip = (samples.len() - 1) % step;
    samples.iter().skip(skip).step_by(step).copied().collect()
}

fn pairwise_slopes(points: &[Sample]) -> Vec<f64> {
    let mut slopes = Vec::with_capacity(points.len() * points.len() / 2);
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            let dt = b.t - a.t;
            if dt > 0.0 {
                slopes.push((b.value - a.value) / dt);
            }
        }
    }
    slopes
}

/// Nearest-rank quantile of sorted, non-empty values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[rank]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::series;

    #[test]
    fn exact_line() {
        let s = series(&[10.0, 12.0, 14.0, 16.0, 18.0]);
        let t = fit(&s, 30.0, 3, 2.0).unwrap();
        assert_eq!(
            (t.slope, t.slope_low, t.slope_high, t.level),
            (2.0, 2.0, 2.0, 18.0)
        );
    }

    #[test]
    fn a_burst_does_not_move_the_slope() {
        let s = series(&[100.0, 100.0, 100.0, 900.0, 100.0, 100.0, 100.0, 100.0]);
        let t = fit(&s, 30.0, 3, 2.0).unwrap();
        assert_eq!((t.slope, t.level, t.spread), (0.0, 100.0, 0.0));
        assert!(!t.significant(4.0));
    }

    #[test]
    fn too_few_or_too_short() {
        assert_eq!(fit(&series(&[1.0, 2.0]), 30.0, 3, 1.0), None);
        assert_eq!(fit(&series(&[1.0, 2.0, 3.0]), 30.0, 3, 5.0), None);
        assert_eq!(fit(&[], 30.0, 3, 1.0), None);
    }

    #[test]
    fn window_and_thinning_keep_the_last_sample() {
        let s: Vec<Sample> = (0..1000)
            .map(|i| Sample {
                t: i as f64 / 10.0,
                value: i as f64,
            })
            .collect();
        assert_eq!(window(&s, 5.0).len(), 51);
        let thinned = thin(&s);
        assert!(thinned.len() <= MAX_POINTS);
        assert_eq!(thinned.last(), s.last());
        let t = fit(&s, 200.0, 3, 1.0).unwrap();
        assert!((t.slope - 10.0).abs() < 1e-9 && (t.level - 999.0).abs() < 1e-6);
    }
}

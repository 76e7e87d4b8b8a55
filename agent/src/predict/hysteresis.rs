//! Hysteresis on levels: a target rises to `critical` only after `confirm_critical`
//! consecutive critical evaluations (one burst does not flip it), rises to `elevated` at once,
//! and comes down only after `calm_evaluations` consecutive evaluations below its level.

use super::{Assessment, Config, Level};

/// The level of one target across evaluations; the daemon keeps one per target.
#[derive(Debug, Clone, Default)]
pub struct LevelTracker {
    level: Level,
    /// Consecutive evaluations at critical while below it.
    rising: u32,
    /// Consecutive evaluations below the current level.
    calming: u32,
}

impl LevelTracker {
    /// Replaces the assessment's instantaneous level with the level after hysteresis.
    pub fn apply(&mut self, mut assessment: Assessment, cfg: &Config) -> Assessment {
        let raw = assessment.level;
        self.rising = if raw == Level::Critical {
            self.rising + 1
        } else {
            0
        };
        self.calming = if raw < self.level {
            self.calming + 1
        } else {
            0
        };
        let next = self.next_level(raw, cfg);
        if next > raw {
            assessment.reasons.push(format!(
                "held at {next} until {} calm evaluations",
                cfg.calm_evaluations
            ));
        }
        self.level = next;
        assessment.level = next;
        assessment
    }

    fn next_level(&self, raw: Level, cfg: &Config) -> Level {
        if raw == Level::Critical && self.rising < cfg.confirm_critical {
            return self.level.max(Level::Elevated);
        }
        if raw >= self.level || self.calming >= cfg.calm_evaluations {
            return raw;
        }
        self.level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(levels: &[Level]) -> Vec<Level> {
        let cfg = Config::default();
        let mut tracker = LevelTracker::default();
        levels
            .iter()
            .map(|&level| {
                tracker
                    .apply(
                        Assessment {
                            level,
                            ..Assessment::default()
                        },
                        &cfg,
                    )
                    .level
            })
            .collect()
    }

    #[test]
    fn one_critical_burst_is_only_elevated() {
        use Level::*;
        let out = run(&[Ok, Critical, Ok, Ok, Ok, Ok, Ok, Ok]);
        assert!(!out.contains(&Critical));
        assert_eq!(out[1], Elevated);
        assert_eq!(*out.last().unwrap(), Ok);
    }

    #[test]
    fn confirmed_critical_holds_then_calms_down() {
        use Level::*;
        let cfg = Config::default();
        let mut input = vec![Critical; cfg.confirm_critical as usize];
        input.extend([Ok; 3]);
        let out = run(&input);
        assert_eq!(out[cfg.confirm_critical as usize - 1], Critical);
        assert!(
            out[cfg.confirm_critical as usize..]
                .iter()
                .all(|&l| l == Critical)
        );
        input.extend(vec![Ok; cfg.calm_evaluations as usize]);
        assert_eq!(*run(&input).last().unwrap(), Ok);
        assert_eq!(run(&[Elevated]), [Elevated]);
    }
}

//! The process the kernel's OOM killer would pick in a domain: the highest `oom_score`
//! (`/proc/<pid>/oom_score`, which already folds in `oom_score_adj`), the larger RSS on a tie;
//! `oom_score_adj = -1000` makes a process unkillable (the kernel skips it).

use super::ProcessInput;

/// The pid the OOM killer would pick among `processes`, if any is killable.
pub fn victim(processes: &[ProcessInput]) -> Option<u32> {
    processes
        .iter()
        .filter(|p| p.oom_score_adj > -1000)
        .max_by_key(|p| (p.oom_score, p.rss_bytes))
        .map(|p| p.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, oom_score: u32, oom_score_adj: i32, rss_bytes: u64) -> ProcessInput {
        ProcessInput {
            pid,
            oom_score,
            oom_score_adj,
            rss_bytes,
            ..ProcessInput::default()
        }
    }

    #[test]
    fn highest_score_then_largest_rss_and_never_unkillable() {
        let ps = [
            process(1, 300, 0, 10),
            process(2, 900, -1000, 1 << 40),
            process(3, 700, 0, 5),
            process(4, 700, 0, 50),
        ];
        assert_eq!(victim(&ps), Some(4));
        assert_eq!(victim(&ps[1..2]), None);
        assert_eq!(victim(&[]), None);
    }
}

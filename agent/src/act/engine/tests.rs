//! The engine against a directory standing in for a cgroup hierarchy (the real hierarchy is
//! exercised by the end-to-end tests in `tests/actions.rs`).

use std::path::{Path, PathBuf};

use super::*;
use crate::{act::pin::Pinner, collect::cgroup::CgroupVersion, policy::PolicyMode};

struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("infermem-engine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cgroups/srv/llama")).unwrap();
        std::fs::create_dir_all(dir.join("cgroups/agent")).unwrap();
        std::fs::write(dir.join("cgroups/srv/llama/memory.low"), "0\n").unwrap();
        Scratch { dir }
    }

    fn engine(&self, mode: PolicyMode, per_minute: u32) -> Engine {
        let options = EngineOptions {
            mode,
            journal: self.dir.join("journal.jsonl"),
            max_actions_per_minute: per_minute,
            min_change_interval: Duration::ZERO,
        };
        let guard = Guard {
            agent_pid: std::process::id(),
            agent_cgroup: Some("/agent".into()),
            init_cgroup: None,
        };
        let hierarchy = Some((CgroupVersion::V2, self.dir.join("cgroups")));
        let target = Target::with_hierarchy(hierarchy, Pinner::new(0, 0));
        Engine::start(options, guard, target, None).unwrap()
    }

    fn low(&self) -> String {
        read(&self.dir.join("cgroups/srv/llama/memory.low"))
    }

    fn journal(&self) -> Vec<Record> {
        read(&self.dir.join("journal.jsonl"))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

fn protect(value: u64) -> Wish {
    Wish {
        action: Action::CgroupWrite {
            cgroup: "/srv/llama".into(),
            file: "memory.low".into(),
            value,
        },
        reason: "test".into(),
    }
}

fn events(records: &[Record]) -> Vec<Event> {
    records.iter().map(|r| r.event).collect()
}

#[test]
fn observe_journals_each_new_decision_once_and_changes_nothing() {
    let s = Scratch::new("observe");
    let mut engine = s.engine(PolicyMode::Observe, 30);
    engine.reconcile(vec![protect(1 << 30)]);
    engine.reconcile(vec![protect(1 << 30)]);
    assert_eq!(s.low(), "0");
    assert_eq!(events(&s.journal()), [Event::Decision]);
    assert_eq!(engine.view().wished.len(), 1);
    assert!(engine.view().in_force.is_empty());
}

#[test]
fn enforce_applies_keeps_close_values_and_reverts_what_is_no_longer_wished() {
    let s = Scratch::new("enforce");
    let mut engine = s.engine(PolicyMode::Enforce, 30);
    engine.reconcile(vec![protect(1 << 30)]);
    assert_eq!(s.low(), (1u64 << 30).to_string());
    // Within 5 %: not rewritten.
    engine.reconcile(vec![protect((1 << 30) + (1 << 20))]);
    assert_eq!(s.low(), (1u64 << 30).to_string());
    // A real change keeps the value from before the first write.
    engine.reconcile(vec![protect(2 << 30)]);
    assert_eq!(engine.view().in_force[0].before.as_deref(), Some("0"));
    engine.reconcile(Vec::new());
    assert_eq!(s.low(), "0");
    assert_eq!(
        events(&s.journal()),
        [Event::Apply, Event::Apply, Event::Revert]
    );
}

#[test]
fn a_crashed_engine_is_reverted_by_the_next_one_from_its_journal() {
    let s = Scratch::new("crash");
    let mut engine = s.engine(PolicyMode::Enforce, 30);
    engine.reconcile(vec![protect(1 << 30)]);
    // A crash: no drop, no revert.
    std::mem::forget(engine);
    assert_eq!(s.low(), (1u64 << 30).to_string());
    let mut next = s.engine(PolicyMode::Observe, 30);
    assert_eq!(s.low(), "0");
    let restored = next.take_restored();
    assert_eq!(restored.len(), 1);
    assert!(restored[0].contains("restored"), "{restored:?}");
    assert_eq!(events(&s.journal()), [Event::Apply, Event::Restore]);
}

#[test]
fn someone_elses_value_is_left_alone_on_revert() {
    let s = Scratch::new("theirs");
    let mut engine = s.engine(PolicyMode::Enforce, 30);
    engine.reconcile(vec![protect(1 << 30)]);
    std::fs::write(s.dir.join("cgroups/srv/llama/memory.low"), "12345").unwrap();
    let lines = engine.revert_all("test");
    assert!(lines[0].contains("left alone"), "{lines:?}");
    assert_eq!(s.low(), "12345");
}

#[test]
fn the_rate_limit_holds_actions_back_and_refusals_are_journalled_once() {
    let s = Scratch::new("limits");
    std::fs::write(s.dir.join("cgroups/agent/memory.low"), "0").unwrap();
    let mut engine = s.engine(PolicyMode::Enforce, 1);
    let agent_cgroup = Wish {
        action: Action::CgroupWrite {
            cgroup: "/agent".into(),
            file: "memory.low".into(),
            value: 1 << 30,
        },
        reason: "test".into(),
    };
    let mut neighbour = protect(1 << 30);
    if let Action::CgroupWrite { cgroup, .. } = &mut neighbour.action {
        "/srv".clone_into(cgroup);
    }
    std::fs::write(s.dir.join("cgroups/srv/memory.low"), "0").unwrap();
    for _ in 0..3 {
        engine.reconcile(vec![
            protect(1 << 30),
            neighbour.clone(),
            agent_cgroup.clone(),
        ]);
    }
    assert_eq!(engine.view().in_force.len(), 1, "one action a minute");
    assert!(engine.view().rate_limited >= 1);
    assert_eq!(read(&s.dir.join("cgroups/agent/memory.low")), "0");
    let refused: Vec<Record> = s
        .journal()
        .into_iter()
        .filter(|r| r.event == Event::Refused)
        .collect();
    assert_eq!(refused.len(), 1, "journalled once: {refused:?}");
    assert!(refused[0].reason.contains("holds the agent"));
}

#[test]
fn leaving_enforce_mode_reverts_the_policys_actions() {
    let s = Scratch::new("mode");
    let mut engine = s.engine(PolicyMode::Enforce, 30);
    engine.reconcile(vec![protect(1 << 30)]);
    let options = EngineOptions {
        mode: PolicyMode::Recommend,
        journal: s.dir.join("journal.jsonl"),
        max_actions_per_minute: 30,
        min_change_interval: Duration::ZERO,
    };
    engine.reconfigure(options);
    engine.reconcile(vec![protect(1 << 30)]);
    assert_eq!(s.low(), "0");
    assert_eq!(
        events(&s.journal()),
        [Event::Apply, Event::Revert, Event::Decision]
    );
}

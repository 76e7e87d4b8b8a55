//! Helpers of the tests of actions under a policy: what the agent says is in force, and its
//! journal.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::Daemon;

/// How long the agent may take to act on what it sees (a tick, an analysis, the VM's pace).
pub const ACT_TIMEOUT: Duration = Duration::from_secs(60);

/// `infermem actions --json`.
pub fn actions(agent: &Daemon) -> Value {
    agent.json(&["actions", "--json"])
}

/// Waits until an action whose id starts with `prefix` is in force; returns it.
pub fn in_force(agent: &Daemon, prefix: &str) -> Value {
    let deadline = Instant::now() + ACT_TIMEOUT;
    loop {
        let view = actions(agent);
        let found = view["in_force"]
            .as_array()
            .expect("in_force is a list")
            .iter()
            .find(|a| a["id"].as_str().is_some_and(|id| id.starts_with(prefix)))
            .cloned();
        if let Some(found) = found {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no action {prefix}… in force within {ACT_TIMEOUT:?}: {view:#}\n{}",
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The journal's records, in order.
pub fn journal(agent: &Daemon) -> Vec<Value> {
    std::fs::read_to_string(agent.dir.join("journal.jsonl"))
        .expect("the journal exists")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a journal line is JSON"))
        .collect()
}

pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

//! Actions under a policy, for real: the agent writes the memory cgroup files and the
//! `oom_score_adj` of this test's own processes in this test's own cgroups (v1 on the host,
//! v2 in the kernel-matrix VM), journals each change, and puts everything back when it stops,
//! when the policy no longer wishes it, on `infermem revert`, and, after a `kill -9`, when it
//! starts again.

use std::time::Duration;

use infermem::collect::cgroup::CgroupVersion;
use infermem_tests::{
    Talker,
    act::{ACT_TIMEOUT, actions, in_force, journal, wait_for},
    cgroup::TestCgroup,
    daemon::{Daemon, NOTICE_TIMEOUT, serial, workload_in},
    output_of, require_root,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A policy protecting the processes of `protected` (local_llm, but no pins: the pinning
/// test is `tests/pin.rs`) and making those of `neighbour` yield.
fn policy(mode: &str, protected: &TestCgroup, neighbour: &TestCgroup) -> String {
    format!(
        r#"mode = "{mode}"
min_change_interval = "1s"

[[policy.workload]]
profile = "local_llm"
match = {{ cgroup = ["{}"] }}
pin_weights = false
oom_score_adj = 100

[[policy.neighbour]]
match = {{ cgroup = ["{}"] }}
oom_score_adj = 600
"#,
        protected.path, neighbour.path
    )
}

/// The file that protects a cgroup, and the one that throttles a neighbour.
fn files(version: CgroupVersion) -> (&'static str, &'static str) {
    match version {
        CgroupVersion::V1 => ("memory.soft_limit_in_bytes", "memory.soft_limit_in_bytes"),
        CgroupVersion::V2 => ("memory.low", "memory.high"),
    }
}

fn read(cgroup: &TestCgroup, file: &str) -> String {
    std::fs::read_to_string(cgroup.dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", cgroup.path))
        .trim()
        .to_owned()
}

fn oom_score_adj(pid: u32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .expect("read oom_score_adj")
        .trim()
        .parse()
        .expect("a number")
}

fn set_oom_score_adj(pid: u32, value: i32) {
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), value.to_string())
        .expect("raise oom_score_adj");
}

/// A protected cgroup holding a steady server (its score raised to 300 first: lowering a
/// score below 0 needs CAP_SYS_RESOURCE, which some CI roots lack, so the policy's 100 is a
/// lowering any root may make), and an empty neighbour cgroup.
struct Scene {
    protected: TestCgroup,
    neighbour: TestCgroup,
    protect_file: &'static str,
    /// The protect file's value before the agent.
    before: String,
    server: Talker,
    pid: u32,
}

impl Scene {
    fn steady(name: &str) -> Scene {
        let protected = TestCgroup::create(name, 512 * MIB);
        let neighbour = TestCgroup::create(&format!("{name}-n"), 512 * MIB);
        let (protect_file, _) = files(protected.version);
        let before = read(&protected, protect_file);
        let mut server = workload_in(&protected, &["steady", "8"]);
        let pid = server.expect_event("steady")["pid"].as_u64().unwrap() as u32;
        set_oom_score_adj(pid, 300);
        Scene {
            protected,
            neighbour,
            protect_file,
            before,
            server,
            pid,
        }
    }
}

/// In enforce mode: the protected workload's cgroup is protected and its score set at once;
/// its neighbours yield (score raised, cgroup throttled) once it ramps towards its limit, and
/// get their values back once it stops; everything is restored when the agent stops.
#[test]
fn enforce_protects_makes_neighbours_yield_at_risk_and_restores_on_stop() {
    require_root();
    let _serial = serial();
    let protected = TestCgroup::create("infermem-act-protected", 512 * MIB);
    let neighbour = TestCgroup::create("infermem-act-neighbour", 512 * MIB);
    let (protect_file, throttle_file) = files(protected.version);
    let protect_before = read(&protected, protect_file);
    let throttle_before = read(&neighbour, throttle_file);

    let mut other = workload_in(&neighbour, &["steady", "8"]);
    let other_pid = other.expect_event("steady")["pid"].as_u64().unwrap() as u32;
    let mut ramp = workload_in(&protected, &["ramp", "25", "300"]);
    let pid = ramp.expect_event("waiting")["pid"].as_u64().unwrap() as u32;
    // Lowering a score below 0 needs CAP_SYS_RESOURCE (some CI roots lack it): start at 300,
    // so that the policy's 100 is a lowering any root may make.
    set_oom_score_adj(pid, 300);
    let other_before = oom_score_adj(other_pid);

    // Alert hooks: a real command appends each event (one JSON line) to a file.
    let alerts =
        std::env::temp_dir().join(format!("infermem-act-alerts-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&alerts);
    let hooks = format!(
        "\n[hooks]\ncommand = [\"/bin/sh\", \"-c\", \"cat >> {}\"]\n",
        alerts.display()
    );
    let config = policy("enforce", &protected, &neighbour) + &hooks;
    let mut agent = Daemon::start_with_policy("act-enforce", &config);
    let protection = in_force(&agent, &format!("cgroup:{}:{protect_file}", protected.path));
    assert_eq!(
        protection["before"],
        protect_before.as_str(),
        "{protection}"
    );
    assert_eq!(
        read(&protected, protect_file),
        protection["after"].as_str().unwrap()
    );
    assert_ne!(read(&protected, protect_file), protect_before);
    in_force(&agent, &format!("oom_score_adj:{pid}:"));
    assert_eq!(oom_score_adj(pid), 100);
    assert_eq!(
        oom_score_adj(other_pid),
        other_before,
        "calm: neighbours untouched"
    );

    // The ramp heads for the limit: the protected workload is at risk, neighbours yield.
    ramp.send_line("go");
    in_force(&agent, &format!("oom_score_adj:{other_pid}:"));
    assert_eq!(oom_score_adj(other_pid), 600);
    let throttle = in_force(
        &agent,
        &format!("cgroup:{}:{throttle_file}", neighbour.path),
    );
    assert_eq!(
        read(&neighbour, throttle_file),
        throttle["after"].as_str().unwrap()
    );
    ramp.expect_event("plateau");

    // Growth over, the risk calms: the neighbours get their values back.
    wait_for(
        "the neighbour's score restored",
        Duration::from_secs(120),
        || oom_score_adj(other_pid) == other_before,
    );
    wait_for(
        "the neighbour's cgroup restored",
        Duration::from_secs(30),
        || read(&neighbour, throttle_file) == throttle_before,
    );

    assert!(agent.stop().success());
    assert_eq!(read(&protected, protect_file), protect_before);
    assert_eq!(oom_score_adj(pid), 300);
    let records = journal(&agent);
    let events: Vec<&str> = records
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    let count = |e: &str| events.iter().filter(|x| **x == e).count();
    assert!(count("apply") >= 4 && count("revert") >= 4, "{events:?}");
    // The hooks heard of the cgroup turning critical and of the actions.
    let heard = std::fs::read_to_string(&alerts).unwrap_or_default();
    let events: Vec<Value> = heard
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let critical_key = format!("cgroup:{}", protected.path);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "critical" && e["key"] == critical_key.as_str()),
        "{heard}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "action" && e["event"] == "apply"),
        "{heard}"
    );
    let _ = std::fs::remove_file(&alerts);
    drop((ramp, other));
}

/// After `kill -9` the changes stay (the agent had no chance to undo them); the journal says
/// what is in force, and the next agent restores them as it starts.
#[test]
fn after_kill_9_the_next_agent_restores_from_the_journal() {
    require_root();
    let _serial = serial();
    let Scene {
        protected,
        neighbour,
        protect_file,
        before,
        server,
        pid,
    } = Scene::steady("infermem-act-crash");

    let mut agent =
        Daemon::start_with_policy("act-crash", &policy("enforce", &protected, &neighbour));
    in_force(&agent, &format!("cgroup:{}:{protect_file}", protected.path));
    in_force(&agent, &format!("oom_score_adj:{pid}:"));
    let applied = actions(&agent)["in_force"].as_array().unwrap().len();
    agent.kill9();
    assert_ne!(read(&protected, protect_file), before, "nothing undid it");
    assert_eq!(oom_score_adj(pid), 100);

    // Without an agent, `actions` reads the journal.
    let listing = output_of(
        agent
            .client()
            .args(["actions", "--config"])
            .arg(&agent.config),
    );
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(
        text.contains("in force") && text.contains(&protected.path),
        "{text}"
    );

    // The next agent observes only: it restores and applies nothing.
    let config = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        config.replace("mode = \"enforce\"", "mode = \"observe\""),
    )
    .unwrap();
    agent.restart();
    assert_eq!(read(&protected, protect_file), before);
    assert_eq!(oom_score_adj(pid), 300);
    let restored = journal(&agent)
        .iter()
        .filter(|r| r["event"] == "restore")
        .count();
    assert_eq!(
        restored, applied,
        "what was in force (the cgroup files and the score)"
    );
    assert_eq!(actions(&agent)["in_force"], Value::Array(Vec::new()));
    assert!(agent.stop().success());
    drop(server);
}

/// Observe (the default) changes nothing: it journals what it would do and lists it.
/// `infermem revert` in enforce mode undoes everything and leaves the policy observing.
#[test]
fn observe_changes_nothing_and_revert_undoes_enforce() {
    require_root();
    let _serial = serial();
    let Scene {
        protected,
        neighbour,
        protect_file,
        before,
        server,
        pid,
    } = Scene::steady("infermem-act-observe");

    let policy_text = policy("observe", &protected, &neighbour);
    let mut agent = Daemon::start_with_policy("act-observe", &policy_text);
    let key = format!("cgroup:{}:{protect_file}", protected.path);
    agent_until_wished(&agent, &key);
    assert_eq!(read(&protected, protect_file), before);
    assert_eq!(oom_score_adj(pid), 300);
    assert!(
        journal(&agent)
            .iter()
            .any(|r| r["event"] == "decision" && r["id"] == key.as_str())
    );
    assert!(agent.stop().success());

    let mut agent =
        Daemon::start_with_policy("act-revert", &policy("enforce", &protected, &neighbour));
    in_force(&agent, &key);
    in_force(&agent, &format!("oom_score_adj:{pid}:"));
    let out = output_of(agent.client().arg("revert"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("restored") && text.contains("observes"),
        "{text}"
    );
    assert_eq!(read(&protected, protect_file), before);
    assert_eq!(oom_score_adj(pid), 300);
    let view = actions(&agent);
    assert_eq!(view["mode"], "observe", "{view}");
    assert_eq!(view["in_force"], Value::Array(Vec::new()));
    assert!(agent.stop().success());
    drop(server);
}

/// Waits until the policy wishes for the action `key`.
fn agent_until_wished(agent: &Daemon, key: &str) {
    wait_for(
        &format!("{key} wished"),
        NOTICE_TIMEOUT.max(ACT_TIMEOUT),
        || {
            actions(agent)["wished"]
                .as_array()
                .is_some_and(|w| w.iter().any(|a| a["id"] == key))
        },
    );
}

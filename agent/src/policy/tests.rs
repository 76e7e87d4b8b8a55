use std::path::Path;

use super::{
    decide::{MappedModel, ProcessView, View, decide},
    matcher::glob,
    *,
};
use crate::{
    act::{Action, ProcessRef},
    collect::cgroup::CgroupVersion,
    predict::Level,
};

const POLICY: &str = r#"
mode = "enforce"
pin_budget = "8GiB"

[[workload]]
profile = "local_llm"
match = { comm = ["llama-server", "ollama*"] }

[[workload]]
profile = "batch_inference"
match = { cgroup = ["/batch/*"] }
oom_score_adj = -200
kv_allowance = 2.0

[[neighbour]]
match = { comm = ["make", "cc1*"] }

[[neighbour]]
match = { cgroup = ["/user.slice/*"] }
throttle = false
oom_score_adj = 300

[[never]]
comm = ["sshd"]
"#;

fn policy() -> PolicyConfig {
    parse_file(POLICY, Path::new("policy.toml")).unwrap()
}

fn process(pid: u32, comm: &str, cgroup: &str) -> ProcessView {
    ProcessView {
        process: Some(ProcessRef {
            pid,
            start_time: 100 + pid as u64,
            comm: comm.into(),
        }),
        cgroup: Some(cgroup.into()),
        rss_bytes: 64 << 20,
        ..ProcessView::default()
    }
}

fn model_process(level: Level) -> ProcessView {
    ProcessView {
        runtime: Some("llama-cpp".into()),
        models: vec![MappedModel {
            path: "/models/m.gguf".into(),
            dev: 8,
            ino: 42,
            bytes: 4 << 30,
        }],
        model_paths: vec!["/models/m.gguf".into()],
        weights_bytes: 4 << 30,
        kv_bytes: 1 << 30,
        level,
        ..process(10, "llama-server", "/srv/llama")
    }
}

fn view(version: CgroupVersion, processes: Vec<ProcessView>) -> View {
    View {
        processes,
        cgroup_usage: [("/build".to_owned(), 900 << 20)].into(),
        version: Some(version),
    }
}

fn keys(wishes: &[crate::act::Wish]) -> Vec<String> {
    wishes.iter().map(|w| w.action.key()).collect()
}

#[test]
fn globs_match_like_a_shell() {
    assert!(glob("llama-*", "llama-server"));
    assert!(glob(
        "/user.slice/*",
        "/user.slice/user-1000.slice/session-2.scope"
    ));
    assert!(glob("cc?", "cc1"));
    assert!(!glob("cc?", "cc12"));
    assert!(!glob("ollama", "ollama2"));
    assert!(glob("*", ""));
}

#[test]
fn a_policy_file_parses_with_profiles_and_overrides() {
    let p = policy();
    assert_eq!(p.mode, PolicyMode::Enforce);
    assert_eq!(p.pin_budget.0, 8 << 30);
    let batch = p.workloads[1].profile();
    assert_eq!(batch.name, ProfileName::BatchInference);
    assert_eq!((batch.oom_score_adj, batch.kv_allowance), (Some(-200), 2.0));
    assert!(batch.pin_weights && batch.throttle_neighbours);
    assert_eq!(p.neighbours[0].oom_score_adj.map(|a| a.0), Some(500));
    assert!(!p.neighbours[1].throttle);
    let default = PolicyConfig::default();
    assert_eq!(
        default.mode,
        PolicyMode::Observe,
        "observe unless told otherwise"
    );
}

#[test]
fn a_malformed_policy_names_its_line() {
    let cases = [
        ("mode = \"yolo\"\n", 1, "unknown variant"),
        (
            "[[workload]]\nprofile = \"local_llm\"\nmatch = {}\n",
            3,
            "at least one",
        ),
        (
            "[[workload]]\nprofile = \"gaming\"\nmatch = { comm = [\"x\"] }\n",
            2,
            "unknown variant",
        ),
        (
            "[[neighbour]]\nmatch = { comm = [\"x\"] }\noom_score_adj = 5000\n",
            3,
            "outside",
        ),
        ("[[never]]\nuser = [\"no-such-user-here\"]\n", 1, "no user"),
        ("\n\nmax_actions = 3\n", 3, "unknown field"),
    ];
    for (text, line, words) in cases {
        let err = parse_file(text, Path::new("p.toml")).unwrap_err();
        assert!(
            err.starts_with(&format!("p.toml:{line}:")),
            "{text:?}: {err}"
        );
        assert!(err.contains(words), "{text:?}: {err}");
    }
}

#[test]
fn a_protected_model_is_pinned_scored_and_its_cgroup_protected_on_v2() {
    let wishes = decide(
        &policy(),
        &view(CgroupVersion::V2, vec![model_process(Level::Ok)]),
    );
    assert_eq!(
        keys(&wishes),
        [
            "pin:8:42:10:110",
            "oom_score_adj:10:110",
            "cgroup:/srv/llama:memory.swap.max",
            "cgroup:/srv/llama:memory.low",
        ]
    );
    let low = &wishes[3].action;
    // (4 GiB weights + 1 GiB KV) × 1.10 headroom.
    let expected = ((5u64 << 30) as f64 * 1.10) as u64;
    assert!(
        matches!(low, Action::CgroupWrite { value, .. } if *value == expected),
        "{low:?}"
    );
    assert!(matches!(
        wishes[1].action,
        Action::OomScoreAdj { value: -900, .. }
    ));
}

#[test]
fn v1_protects_with_the_soft_limit_and_sets_no_swap_limit() {
    let wishes = decide(
        &policy(),
        &view(CgroupVersion::V1, vec![model_process(Level::Ok)]),
    );
    assert!(keys(&wishes).contains(&"cgroup:/srv/llama:memory.soft_limit_in_bytes".to_owned()));
    assert!(!keys(&wishes).iter().any(|k| k.contains("swap")));
}

#[test]
fn neighbours_yield_only_while_a_protected_workload_is_at_risk() {
    let everyone = |level| {
        vec![
            model_process(level),
            process(20, "make", "/build"),
            process(21, "bash", "/user.slice/user-1000.slice"),
            process(22, "sshd", "/user.slice/user-1000.slice"),
        ]
    };
    let calm = decide(&policy(), &view(CgroupVersion::V2, everyone(Level::Ok)));
    assert!(
        !keys(&calm)
            .iter()
            .any(|k| k.contains(":20:") || k.contains(":21:"))
    );
    let risky = decide(
        &policy(),
        &view(CgroupVersion::V2, everyone(Level::Elevated)),
    );
    let k = keys(&risky);
    assert!(k.contains(&"oom_score_adj:20:120".to_owned()));
    assert!(k.contains(&"cgroup:/build:memory.high".to_owned()));
    // Matched by the second neighbour rule: its score, no throttle.
    assert!(k.contains(&"oom_score_adj:21:121".to_owned()));
    assert!(!k.iter().any(|k| k.starts_with("cgroup:/user.slice")));
    // sshd is never acted on.
    assert!(!k.iter().any(|k| k.contains(":22:")));
    let high = risky
        .iter()
        .find(|w| w.action.key() == "cgroup:/build:memory.high")
        .unwrap();
    assert!(matches!(high.action, Action::CgroupWrite { value, .. } if value == 900 << 20));
}

#[test]
fn a_neighbour_sharing_the_protected_cgroup_is_not_throttled() {
    let mut neighbour = process(20, "make", "/srv/llama");
    neighbour.cgroup = Some("/srv/llama".into());
    let wishes = decide(
        &policy(),
        &view(
            CgroupVersion::V2,
            vec![model_process(Level::Critical), neighbour],
        ),
    );
    assert!(keys(&wishes).contains(&"oom_score_adj:20:120".to_owned()));
    assert!(!keys(&wishes).iter().any(|k| k.ends_with("memory.high")));
}

#[test]
fn ollama_is_asked_to_unload_idle_models_only_when_critical() {
    let ollama = |level| ProcessView {
        runtime: Some("ollama".into()),
        level,
        ..process(30, "ollama", "/system.slice/ollama.service")
    };
    let unload = |level| {
        keys(&decide(
            &policy(),
            &view(CgroupVersion::V2, vec![ollama(level)]),
        ))
        .contains(&"unload:30:130".to_owned())
    };
    assert!(!unload(Level::Elevated));
    assert!(unload(Level::Critical));
}

#[test]
fn processes_outside_the_policy_get_nothing() {
    let wishes = decide(
        &policy(),
        &view(
            CgroupVersion::V2,
            vec![process(40, "postgres", "/system.slice/pg.service")],
        ),
    );
    assert!(wishes.is_empty(), "{wishes:?}");
    assert!(
        decide(
            &PolicyConfig::default(),
            &view(CgroupVersion::V2, vec![model_process(Level::Critical)])
        )
        .is_empty()
    );
}

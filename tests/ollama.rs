//! Runtime reconfiguration through the agent: Ollama, asked over its own API to unload its
//! idle models when its memory cgroup turns critical. Host only (it needs Python, which the
//! kernel-matrix VM does not carry).

use std::process::Command;

use infermem_tests::{
    Talker,
    act::{ACT_TIMEOUT, in_force, journal, wait_for},
    cgroup::TestCgroup,
    daemon::{Daemon, in_cgroup, serial, start_time, workload_in},
    output_of, require_root,
};

const MIB: u64 = 1 << 20;

/// Ollama at critical: the agent asks its API to unload every model but the one used last.
/// No Ollama binary can be installed on these machines: `tests/ollama/fake_ollama.py` plays
/// the server (argv[0] `ollama`, as the real one is detected), following Ollama's documented
/// API; a ramp beside it in its memory cgroup makes the cgroup critical.
#[test]
fn ollama_is_asked_to_unload_its_idle_model_when_critical() {
    require_root();
    let _serial = serial();
    let cgroup = TestCgroup::create("infermem-act-ollama", 256 * MIB);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let script = infermem_tests::workspace_root().join("tests/ollama/fake_ollama.py");
    // The interpreter itself, not a launcher script (pyenv's re-executes python3 and loses
    // argv[0]).
    let python =
        output_of(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]));
    let python = String::from_utf8(python.stdout)
        .expect("a path")
        .trim()
        .to_owned();
    let mut cmd = Command::new(python);
    std::os::unix::process::CommandExt::arg0(&mut cmd, "ollama");
    cmd.arg(&script)
        .args(["llama3:8b", "qwen3:4b"])
        .env("OLLAMA_HOST", format!("127.0.0.1:{port}"));
    in_cgroup(&mut cmd, &cgroup);
    let mut ollama = Talker::spawn(cmd);
    let pid = ollama.expect_event("listening")["pid"].as_u64().unwrap() as u32;
    let policy = format!(
        r#"mode = "enforce"
[[policy.workload]]
profile = "local_llm"
match = {{ runtime = ["ollama"], cgroup = ["{}"] }}
pin_weights = false
oom_score_adj = 0
"#,
        cgroup.path
    );
    let mut agent = Daemon::start_with_policy("act-ollama", &policy);
    in_force(&agent, &format!("oom_score_adj:{pid}:"));

    let mut ramp = workload_in(&cgroup, &["ramp", "50", "220"]);
    ramp.expect_event("waiting");
    ramp.send_line("go");
    let request = ollama.expect_event_within("request", ACT_TIMEOUT);
    assert_eq!(request["path"], "/api/generate", "{request}");
    assert_eq!(
        request["body"]["model"], "llama3:8b",
        "the one that expires first"
    );
    assert_eq!(request["body"]["keep_alive"], 0, "{request}");
    let id = format!("unload:{pid}:{}", start_time(pid));
    let journalled = || {
        journal(&agent)
            .into_iter()
            .find(|r| r["id"] == id.as_str() && r["event"] == "apply")
    };
    wait_for("the unload journalled", ACT_TIMEOUT, || {
        journalled().is_some()
    });
    let unload = journalled().expect("journalled");
    assert_eq!(unload["before"], "llama3:8b, qwen3:4b", "{unload}");
    assert_eq!(unload["after"], "qwen3:4b", "{unload}");
    // `infermem runtime` asks the same API what is loaded now.
    let out = output_of(agent.client().args(["runtime", &pid.to_string(), "--json"]));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["runtime"], "ollama", "{answer}");
    assert_eq!(answer["endpoint"], format!("127.0.0.1:{port}"));
    let models = answer["stats"]["models"].as_array().expect("models");
    assert_eq!(models.len(), 1, "{answer}");
    assert_eq!(models[0]["name"], "qwen3:4b");
    assert!(agent.stop().success());
    drop(ramp);
}

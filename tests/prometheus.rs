//! The Prometheus endpoint, end to end: a real agent serves `--prometheus`, `promtool check
//! metrics` accepts what it serves, and a real Prometheus server (Debian's package) scrapes it;
//! the test reads a known workload's series back through Prometheus's HTTP API, then runs
//! every query of the Grafana dashboard against that Prometheus: each must parse, and return
//! data.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use infermem_tests::{
    cgroup::TestCgroup,
    daemon::{Daemon, NOTICE_TIMEOUT, serial, workload_in, workload_of, write_gguf},
    prometheus::{Prometheus, free_port, get_text, sample_value},
    require_root,
};

const MIB: u64 = 1 << 20;

/// How long a series may take to reach Prometheus: the agent's round, a 1-s scrape, slack.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(60);

/// `promtool check metrics` on a scrape of the endpoint.
fn promtool_check_metrics(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian's `prometheus` package; .ci/run installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool ends");
    assert!(
        output.status.success(),
        "promtool check metrics refused the exposition: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Resident bytes of `pid` from `/proc/<pid>/status`.
fn vm_rss(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024.0
}

#[test]
fn prometheus_scrapes_the_endpoint_and_answers_for_a_known_workload() {
    require_root();
    let _serial = serial();
    let address = format!("127.0.0.1:{}", free_port());
    let agent = Daemon::start_with_sections(
        "infermem-prometheus",
        &format!("[export]\nprometheus = \"{address}\"\n"),
        &[],
    );
    let cgroup = TestCgroup::create("infermem-prometheus", 256 * MIB);
    let model = agent.dir.join("model.gguf");
    write_gguf(&model);
    let mut workload = workload_in(&cgroup, &["map-file", model.to_str().unwrap(), "prom"]);
    workload.expect_event("mapped");
    let pid = workload.pid();
    agent.ps_until(NOTICE_TIMEOUT, |ps| workload_of(ps, pid).cloned());

    let exposition = get_text(&format!("http://{address}/metrics"));
    assert!(
        exposition.contains(&format!("pid=\"{pid}\"")),
        "{exposition}"
    );
    promtool_check_metrics(&exposition);

    let prometheus = Prometheus::start(&agent.dir, &address);
    let selector = format!("{{job=\"infermem\",pid=\"{pid}\"}}");
    let size = prometheus.query_until(
        &format!("infermem_model_file_size_bytes{selector}"),
        SCRAPE_TIMEOUT,
        |result| result.first().map(sample_value),
    );
    assert_eq!(size, (2 * MIB) as f64, "the GGUF file is 2 MiB");
    let rss = prometheus.query_until(
        &format!("infermem_process_memory_usage_bytes{selector}"),
        SCRAPE_TIMEOUT,
        |result| result.first().cloned(),
    );
    let labels = &rss["metric"];
    assert_eq!(labels["executable"], "workload", "{rss}");
    assert_eq!(labels["model"], model.to_str().unwrap(), "{rss}");
    assert_eq!(labels["cgroup"], cgroup.path.as_str(), "{rss}");
    let (exported, actual) = (sample_value(&rss), vm_rss(pid));
    assert!(
        (exported - actual).abs() <= 4.0 * MIB as f64,
        "exported RSS {exported} against VmRSS {actual}"
    );
    drop((workload, prometheus, agent));
}

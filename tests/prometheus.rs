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
    Talker,
    cgroup::TestCgroup,
    daemon::{
        Daemon, NOTICE_TIMEOUT, in_cgroup, serial, workload_in, workload_of, write_gguf,
        write_llama_gguf,
    },
    dashboard::{self, DashboardQuery},
    proc_kib_field,
    prometheus::{Prometheus, free_port, get_text, sample_value},
    require_root, workload_bin,
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
    let actual = proc_kib_field(&format!("/proc/{pid}/status"), "VmRSS");
    let exported = sample_value(&rss);
    assert!(
        (exported - actual).abs() <= 4.0 * MIB as f64,
        "exported RSS {exported} against VmRSS {actual}"
    );
    drop((workload, prometheus, agent));
}

/// A llama.cpp stand-in: the workload program copied as `llama-server`, mapping a llama GGUF
/// with `-c 512`, in `cgroup`. The agent recognises llama.cpp by the executable's name and
/// predicts its KV cache (2 MiB now, 16 MiB at the 4096-token training context).
fn llama_stand_in(dir: &std::path::Path, cgroup: &TestCgroup) -> Talker {
    let model = dir.join("llama.gguf");
    write_llama_gguf(&model);
    let bin = dir.join("llama-server");
    std::fs::copy(workload_bin(), &bin).expect("copy the workload program");
    let mut cmd = Command::new(&bin);
    cmd.arg("map-file").arg(&model).args(["dash", "-c", "512"]);
    in_cgroup(&mut cmd, cgroup);
    let mut talker = Talker::spawn(cmd);
    talker.expect_event("mapped");
    talker
}

/// A ramp in `cgroup`, started.
fn ramp(cgroup: &TestCgroup, mib_per_s: &str, stop_mib: &str) -> Talker {
    let mut ramp = workload_in(cgroup, &["ramp", mib_per_s, stop_mib]);
    ramp.expect_event("waiting");
    ramp.send_line("go");
    ramp
}

/// The dashboard, built in: the kernel-matrix VM has the test binaries, not the sources.
const DASHBOARD: &str = include_str!("../dashboards/infermem.json");

/// How long a query that parses may take to return data: series that come and go with the
/// growth (the ETAs) get a few scrapes.
const DATA_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs one dashboard query until it returns data (or may be empty); the failure, if it does
/// not parse or returns nothing within [`DATA_TIMEOUT`].
fn check(prometheus: &Prometheus, query: &DashboardQuery) -> Result<(), String> {
    let deadline = std::time::Instant::now() + DATA_TIMEOUT;
    loop {
        let result = prometheus
            .query(&query.expr)
            .map_err(|error| format!("does not parse: {error}"))?;
        if !result.is_empty() || dashboard::may_be_empty(query).is_some() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("returned no data within {DATA_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every query of `dashboards/infermem.json`, with its variables filled, against a real
/// Prometheus scraping an agent that watches a llama.cpp stand-in whose cgroup heads for its
/// limit while the host's memory grows: every query parses and returns data (the GPU panel
/// excepted: no GPU here, see `dashboard::may_be_empty`).
#[test]
fn every_dashboard_query_parses_and_returns_data() {
    require_root();
    let _serial = serial();
    let address = format!("127.0.0.1:{}", free_port());
    let agent = Daemon::start_with_sections(
        "infermem-dashboard",
        &format!("[export]\nprometheus = \"{address}\"\n"),
        &[],
    );
    let cgroup = TestCgroup::create("infermem-dashboard", 256 * MIB);
    let host_growth = TestCgroup::create("infermem-dashboard-host", 2048 * MIB);
    let llama = llama_stand_in(&agent.dir, &cgroup);
    let pid = llama.pid();
    let listed = agent.ps_until(NOTICE_TIMEOUT, |ps| {
        workload_of(ps, pid)
            .filter(|w| w["kv_bytes_now"].is_u64())
            .cloned()
    });
    assert_eq!(listed["kv_bytes_now"], 2 * MIB, "{listed}");
    let prometheus = Prometheus::start(&agent.dir, &address);
    // Growth: the stand-in's cgroup heads for its limit (no OOM kill: 230 MiB of 256), the
    // host's memory grows, both for about 45 s.
    let ramps = [ramp(&cgroup, "5", "230"), ramp(&host_growth, "25", "1200")];
    let vars = [("instance", address.as_str()), ("pid", &pid.to_string())];
    let queries = dashboard::queries(DASHBOARD, &vars);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    // Wait until the slowest series exist (the ETAs need a trend), then run every query.
    for slow in [
        "infermem_process_risk_eta_seconds",
        "infermem_host_risk_eta_seconds",
    ] {
        prometheus.query_until(slow, SCRAPE_TIMEOUT, |r| (!r.is_empty()).then_some(()));
    }
    let failures: Vec<String> = queries
        .iter()
        .filter_map(|q| {
            let verdict = check(&prometheus, q).err()?;
            Some(format!("{} [{}] {}: {verdict}", q.panel, q.ref_id, q.expr))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "dashboard queries failed:\n{}",
        failures.join("\n")
    );
    drop((ramps, llama, prometheus, agent));
}

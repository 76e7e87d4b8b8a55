//! OpenTelemetry export, end to end: a real agent (real eBPF, real memory cgroups) exports
//! over OTLP to a receiver built from the official protos (`tests/src/otlp.rs`), over gRPC
//! and over HTTP/protobuf. The tests assert the metric names, units, instruments, attribute
//! keys and values that arrive for a known workload (a process mapping a GGUF file), the
//! resource, and the log records of alerts (a prediction turned critical, an OOM kill) when
//! a ramp in the workload's 256 MiB memory cgroup is OOM-killed.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use infermem_tests::{
    Talker,
    cgroup::TestCgroup,
    daemon::{Daemon, NOTICE_TIMEOUT, serial, workload_in, workload_of, write_gguf},
    otlp::{ReceivedPoint, Receiver, TEST_HEADER},
    proc_kib_field, require_root,
};

const MIB: u64 = 1 << 20;

/// How long the receiver may wait for an export: a few 1-s intervals, and the VM's slowness.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a process series of a model workload must carry, with its unit and kind.
const PROCESS_METRICS: &[(&str, &str, &str)] = &[
    ("process.memory.usage", "By", "updown"),
    ("process.memory.virtual", "By", "updown"),
    ("process.paging.faults", "{fault}", "sum"),
    ("infermem.process.memory.anonymous", "By", "updown"),
    ("infermem.process.memory.swap", "By", "updown"),
    ("infermem.model.file.size", "By", "updown"),
    ("infermem.model.file.resident", "By", "updown"),
    ("infermem.process.risk.level", "1", "gauge"),
    ("infermem.process.thrashing", "1", "gauge"),
];

/// Host and agent series, with unit and kind.
const HOST_METRICS: &[(&str, &str, &str)] = &[
    ("system.memory.limit", "By", "updown"),
    ("system.memory.usage", "By", "updown"),
    ("system.memory.linux.available", "By", "updown"),
    ("system.paging.usage", "By", "updown"),
    ("infermem.host.model_file.resident", "By", "updown"),
    ("infermem.host.risk.level", "1", "gauge"),
    ("infermem.oom_kills", "{kill}", "sum"),
    ("infermem.agent.events", "{event}", "sum"),
    ("infermem.cgroup.memory.usage", "By", "updown"),
    ("infermem.cgroup.risk.level", "1", "gauge"),
];

/// A model workload: a process mapping a 2 MiB GGUF file, in `cgroup`.
fn model_workload(cgroup: &TestCgroup, dir: &std::path::Path) -> (Talker, String) {
    let model = dir.join("model.gguf");
    write_gguf(&model);
    let model = model.to_str().expect("a UTF-8 path").to_owned();
    let mut workload = workload_in(cgroup, &["map-file", &model, "export"]);
    workload.expect_event("mapped");
    (workload, model)
}

/// The latest point of `metric` whose attributes include `pid`, if any arrived.
fn latest_for_pid(points: &[ReceivedPoint], metric: &str, pid: u32) -> Option<ReceivedPoint> {
    points
        .iter()
        .rev()
        .find(|p| p.metric == metric && p.attributes.get("process.pid") == Some(&pid.to_string()))
        .cloned()
}

fn assert_described(points: &[ReceivedPoint], expected: &[(&str, &str, &str)]) {
    for (name, unit, kind) in expected {
        let point = points
            .iter()
            .rev()
            .find(|p| p.metric == *name)
            .unwrap_or_else(|| panic!("{name} never arrived"));
        assert_eq!((point.unit.as_str(), point.kind), (*unit, *kind), "{name}");
    }
}

/// The process series of the workload: names, units, attributes and values.
fn assert_process_series(points: &[ReceivedPoint], pid: u32, model: &str, cgroup: &str) {
    let usage = latest_for_pid(points, "process.memory.usage", pid).expect("arrived");
    let attributes: BTreeMap<&str, &str> = usage
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        attributes["process.executable.name"], "workload",
        "{usage:?}"
    );
    assert_eq!(attributes["infermem.model"], model);
    assert_eq!(attributes["infermem.cgroup"], cgroup);
    assert_eq!(attributes["infermem.runtime"], "unknown");
    assert!(
        attributes["process.command_line"].contains("map-file"),
        "{usage:?}"
    );
    assert!(usage.value > 0.0, "{usage:?}");
    let size = latest_for_pid(points, "infermem.model.file.size", pid).expect("model size");
    assert_eq!(size.value, (2 * MIB) as f64, "the GGUF file is 2 MiB");
    let faults: BTreeSet<String> = points
        .iter()
        .filter(|p| p.metric == "process.paging.faults")
        .filter(|p| p.attributes.get("process.pid") == Some(&pid.to_string()))
        .filter_map(|p| p.attributes.get("system.paging.fault.type").cloned())
        .collect();
    assert_eq!(faults, BTreeSet::from(["major".into(), "minor".into()]));
    for (name, _, _) in PROCESS_METRICS {
        assert!(
            latest_for_pid(points, name, pid).is_some(),
            "{name} for pid {pid} never arrived"
        );
    }
}

fn assert_resource(point: &ReceivedPoint, extra: (&str, &str)) {
    let resource = &point.resource;
    assert_eq!(resource["service.name"], "infermem", "{resource:?}");
    assert_eq!(resource["service.version"], env!("CARGO_PKG_VERSION"));
    assert!(resource.contains_key("service.instance.id"), "{resource:?}");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(resource["host.name"], hostname.trim());
    assert!(resource.contains_key("host.arch"), "{resource:?}");
    assert_eq!(
        resource.get(extra.0).map(String::as_str),
        Some(extra.1),
        "{resource:?}"
    );
}

/// Starts a ramp in `cgroup` that heads for its limit and is OOM-killed; checks the
/// `critical` and `oom_kill` log records and the kill counters that reach `receiver`.
fn ramp_to_an_oom_kill(receiver: &Receiver, cgroup: &TestCgroup) -> Talker {
    let mut ramp = workload_in(cgroup, &["ramp", "25", "400"]);
    let ramp_pid = ramp.expect_event("waiting")["pid"].as_u64().unwrap() as u32;
    ramp.send_line("go");
    let key = format!("cgroup:{}", cgroup.path);
    let critical = receiver.wait_for("a critical alert", EXPORT_TIMEOUT, |r| {
        r.logs()
            .into_iter()
            .find(|l| l.event_name == "infermem.critical" && l.attributes["infermem.key"] == key)
    });
    assert_eq!(critical.severity, "WARN");
    assert!(
        critical.body.contains("\"level\":\"critical\""),
        "{critical:?}"
    );
    let kill = receiver.wait_for("an OOM-kill record", EXPORT_TIMEOUT, |r| {
        r.logs().into_iter().find(|l| {
            l.event_name == "infermem.oom_kill"
                && l.attributes.get("process.pid") == Some(&ramp_pid.to_string())
        })
    });
    assert_eq!(kill.severity, "ERROR");
    assert_eq!(kill.resource["service.name"], "infermem");
    receiver.wait_for("the OOM kill counted", EXPORT_TIMEOUT, |r| {
        let points = r.points();
        let counted = |metric: &str, cgroup: Option<&str>| {
            points.iter().rev().any(|p| {
                p.metric == metric
                    && p.value >= 1.0
                    && cgroup.is_none_or(|c| {
                        p.attributes.get("infermem.cgroup").map(String::as_str) == Some(c)
                    })
            })
        };
        (counted("infermem.oom_kills", None)
            && counted("infermem.cgroup.oom_kills", Some(&cgroup.path)))
        .then_some(())
    });
    ramp
}

#[test]
fn otlp_over_grpc_carries_the_catalogue_and_the_alerts() {
    require_root();
    let _serial = serial();
    let receiver = Receiver::grpc();
    let agent = Daemon::start_with_sections(
        "infermem-export-grpc",
        "[export]\ncommand_line = true\n",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-infermem-test=from-env"),
        ],
    );
    let cgroup = TestCgroup::create("infermem-export-grpc", 256 * MIB);
    let (workload, model) = model_workload(&cgroup, &agent.dir);
    let pid = workload.pid();
    agent.ps_until(NOTICE_TIMEOUT, |ps| workload_of(ps, pid).cloned());
    receiver.wait_for("the workload's series", EXPORT_TIMEOUT, |r| {
        latest_for_pid(&r.points(), "infermem.model.file.size", pid)
    });
    let points = receiver.points();
    // The metric list that arrives, for the record (`--nocapture`).
    let arrived: BTreeSet<(String, String, &str)> = points
        .iter()
        .map(|p| (p.metric.clone(), p.unit.clone(), p.kind))
        .collect();
    eprintln!("metrics received over gRPC:");
    for (name, unit, kind) in &arrived {
        eprintln!("  {name} [{unit}] {kind}");
    }
    assert_described(&points, PROCESS_METRICS);
    assert_described(&points, HOST_METRICS);
    assert_process_series(&points, pid, &model, &cgroup.path);
    let limit = points
        .iter()
        .rev()
        .find(|p| p.metric == "system.memory.limit");
    assert_eq!(
        limit.expect("arrived").value,
        proc_kib_field("/proc/meminfo", "MemTotal")
    );
    assert_resource(&points[0], ("deployment.environment.name", "ci"));
    assert!(receiver.test_headers().iter().all(|h| h == "from-env"));
    assert!(
        !receiver.test_headers().is_empty(),
        "the headers' metadata arrives"
    );

    // A ramp in the same cgroup heads for its limit and is OOM-killed: both are log records.
    let ramp = ramp_to_an_oom_kill(&receiver, &cgroup);
    drop((workload, ramp, agent));
}

#[test]
fn otlp_over_http_protobuf_from_the_config() {
    require_root();
    let _serial = serial();
    let receiver = Receiver::http();
    let sections = format!(
        "[export.otlp]\nendpoint = \"{}\"\nprotocol = \"http/protobuf\"\ninterval = \"1s\"\n\
         resource = {{ \"infermem.site\" = \"lab\" }}\n\
         headers = {{ \"{TEST_HEADER}\" = \"from-config\" }}\n",
        receiver.endpoint
    );
    let agent = Daemon::start_with_sections("infermem-export-http", &sections, &[]);
    let cgroup = TestCgroup::create("infermem-export-http", 256 * MIB);
    let (workload, model) = model_workload(&cgroup, &agent.dir);
    let pid = workload.pid();
    receiver.wait_for("the workload's series", EXPORT_TIMEOUT, |r| {
        latest_for_pid(&r.points(), "infermem.model.file.size", pid)
    });
    let points = receiver.points();
    assert_described(&points, PROCESS_METRICS);
    let usage = latest_for_pid(&points, "process.memory.usage", pid).expect("arrived");
    assert_eq!(usage.attributes["infermem.model"], model);
    assert!(
        !usage.attributes.contains_key("process.command_line"),
        "the command line is opt-in: {usage:?}"
    );
    assert_resource(&usage, ("infermem.site", "lab"));
    let headers = receiver.test_headers();
    assert!(
        !headers.is_empty() && headers.iter().all(|h| h == "from-config"),
        "{headers:?}"
    );
    drop((workload, agent));
}

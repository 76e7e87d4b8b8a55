//! The catalogue built from a known view, and its Prometheus rendering.

use std::sync::Arc;

use super::{
    Source, View,
    catalogue::{self, Attr, Family},
    prometheus,
};
use crate::api::proto;

/// A fixed view.
#[derive(Debug)]
struct Fixed(View);

impl Source for Fixed {
    fn view(&self) -> View {
        self.0.clone()
    }
}

fn risk(level: &str, eta: Option<f64>) -> Option<proto::Assessment> {
    Some(proto::Assessment {
        level: level.into(),
        eta_seconds: eta,
        ..proto::Assessment::default()
    })
}

/// One critical llama.cpp workload in `/srv/llm`, the host, and two cgroups: the workload's
/// and an unlimited one holding no workload.
fn view(command_line: bool) -> View {
    let workload = proto::Workload {
        pid: 42,
        comm: "llama-server".into(),
        executable: "llama-server".into(),
        runtime: "llama-cpp".into(),
        model: "/models/q4.gguf".into(),
        cgroup: "/srv/llm".into(),
        container_id: String::new(),
        command_line: "llama-server -m /models/q4.gguf --api-key <redacted>".into(),
        rss_bytes: 3 << 30,
        swap_bytes: 1 << 30,
        anon_bytes: 1 << 30,
        virtual_bytes: 8 << 30,
        minor_faults: 1000,
        major_faults: 7,
        model_file_bytes: 4 << 30,
        weights_resident_bytes: 2 << 30,
        kv_bytes_now: Some(10 << 20),
        kv_bytes_max: None,
        risk: risk("critical", Some(12.5)),
        ..proto::Workload::default()
    };
    let cgroup = |path: &str, limit: Option<u64>| proto::CgroupStatus {
        path: path.into(),
        usage_bytes: 5 << 30,
        limit_bytes: limit,
        effective_limit_bytes: limit,
        oom_kills: 1,
        risk: risk("critical", Some(12.5)),
        ..proto::CgroupStatus::default()
    };
    View {
        ps: proto::PsReply {
            workloads: vec![workload],
            daemon: Some(proto::DaemonInfo {
                oom_kills_seen: 3,
                ..proto::DaemonInfo::default()
            }),
        },
        status: proto::StatusReply {
            host: Some(proto::HostStatus {
                mem_total_bytes: 16 << 30,
                mem_available_bytes: 6 << 30,
                mem_free_bytes: 1 << 30,
                psi_some_avg10: Some(12.0),
                risk: risk("ok", None),
                ..proto::HostStatus::default()
            }),
            cgroups: vec![
                cgroup("/srv/llm", Some(6 << 30)),
                cgroup("/user.slice", None),
            ],
            ..proto::StatusReply::default()
        },
        actions_in_force: None,
        command_line,
    }
}

fn family<'a>(families: &'a [Family], name: &str) -> &'a Family {
    families
        .iter()
        .find(|f| f.metric.name == name)
        .unwrap_or_else(|| panic!("{name} is in the catalogue"))
}

fn value(families: &[Family], name: &str) -> Vec<f64> {
    family(families, name)
        .points
        .iter()
        .map(|p| p.value)
        .collect()
}

#[test]
fn a_view_becomes_points_with_semantic_names_and_attributes() {
    let families = catalogue::families(&view(false));
    assert_eq!(families.len(), catalogue::METRICS.len());
    let usage = &family(&families, "process.memory.usage").points[0];
    let attr = |a: Attr| {
        usage
            .attributes
            .iter()
            .find(|(k, _)| *k == a)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(attr(Attr::Pid), Some("42"));
    assert_eq!(attr(Attr::Executable), Some("llama-server"));
    assert_eq!(attr(Attr::Model), Some("/models/q4.gguf"));
    assert_eq!(attr(Attr::ContainerId), None, "outside containers");
    assert_eq!(attr(Attr::CommandLine), None, "opt-in");
    // rss_bytes carries RSS + swap: the resident set is 2 GiB.
    assert_eq!(usage.value, (2u64 << 30) as f64);
    assert_eq!(value(&families, "process.paging.faults"), [7.0, 1000.0]);
    assert_eq!(value(&families, "infermem.process.risk.level"), [2.0]);
    assert_eq!(value(&families, "infermem.process.risk.eta"), [12.5]);
    assert_eq!(
        value(&families, "infermem.kv_cache.usage"),
        [(10 << 20) as f64]
    );
    assert!(
        value(&families, "infermem.kv_cache.limit").is_empty(),
        "unknown: no point"
    );
    assert_eq!(value(&families, "infermem.host.memory.pressure"), [0.12]);
    assert_eq!(
        value(&families, "system.memory.usage"),
        [(1u64 << 30) as f64, (10u64 << 30) as f64]
    );
    assert!(value(&families, "infermem.host.risk.eta").is_empty());
    assert_eq!(value(&families, "infermem.oom_kills"), [3.0]);
    // The unlimited cgroup without a workload is not exported.
    let cgroups: Vec<&str> = family(&families, "infermem.cgroup.memory.usage")
        .points
        .iter()
        .map(|p| p.attributes[0].1.as_str())
        .collect();
    assert_eq!(cgroups, ["/srv/llm"]);
}

#[test]
fn the_command_line_is_exported_only_when_asked() {
    let families = catalogue::families(&view(true));
    let usage = &family(&families, "process.memory.usage").points[0];
    assert!(usage.attributes.contains(&(
        Attr::CommandLine,
        "llama-server -m /models/q4.gguf --api-key <redacted>".to_owned()
    )));
}

#[test]
fn prometheus_renders_openmetrics_with_infermem_names() {
    let text = prometheus::render(Arc::new(Fixed(view(false)))).unwrap();
    for metric in catalogue::METRICS {
        let name = prometheus::prometheus_name(metric.name);
        assert!(
            text.contains(&format!("# HELP infermem_{name}")),
            "{name}:\n{text}"
        );
    }
    let sample = text
        .lines()
        .find(|l| l.starts_with("infermem_process_memory_usage_bytes{"))
        .expect("a sample");
    assert!(
        sample.contains("pid=\"42\"") && sample.contains("runtime=\"llama-cpp\""),
        "{sample}"
    );
    assert!(sample.ends_with(" 2147483648.0"), "{sample}");
    assert!(
        text.contains("infermem_process_paging_faults_total{"),
        "{text}"
    );
    assert!(text.contains(",type=\"major\"} 7"), "{text}");
    assert!(
        text.contains("infermem_process_risk_eta_seconds{"),
        "{text}"
    );
    assert!(
        text.contains("infermem_system_memory_usage_bytes{state=\"used\"}"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn the_classic_text_format_names_counters_after_their_samples() {
    let open = prometheus::render(Arc::new(Fixed(view(false)))).unwrap();
    let text = prometheus::to_text_format(&open);
    assert!(
        text.contains("# TYPE infermem_process_paging_faults_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# HELP infermem_process_paging_faults_total Page faults"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE infermem_process_memory_usage_bytes gauge\n"),
        "{text}"
    );
    assert!(
        !text.contains("# UNIT") && !text.contains("# EOF"),
        "{text}"
    );
    let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(samples(&text), samples(&open));
}

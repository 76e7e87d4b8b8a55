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

/// [`view`] on a GPU host: the workload holds 6 GiB on GPU 0 by the ioctls (NVML says 6.5),
/// NVML alone sees its 1 GiB on GPU 1, and an allocation on an unresolved device; GPU 0 is
/// known to NVML, GPU 1 is not.
fn gpu_view(state: &str) -> View {
    let mut view = view(false);
    let on = |device, ioctl, nvml, pinned| proto::ProcessGpu {
        device,
        vram_bytes_ioctl: ioctl,
        vram_bytes_nvml: nvml,
        host_pinned_bytes: pinned,
        ioctl_partial: false,
    };
    view.ps.workloads[0].gpu = vec![
        on(0, Some(6 << 30), Some(13 << 29), 256 << 20),
        on(1, None, Some(1 << 30), 0),
        on(crate::gpu::UNKNOWN_DEVICE, Some(2 << 20), None, 0),
    ];
    let device = |device, name: &str| proto::GpuDevice {
        device,
        name: name.into(),
        vram_bytes_ioctl: 6 << 30,
        ..proto::GpuDevice::default()
    };
    view.status.gpu = Some(proto::GpuStatus {
        state: state.into(),
        driver_version: "550.54.14".into(),
        devices: vec![
            proto::GpuDevice {
                total_bytes: Some(80 << 30),
                used_bytes: Some(7 << 30),
                free_bytes: Some(73 << 30),
                utilization_percent: Some(37),
                vram_bytes_nvml_processes: Some(13 << 29),
                nvml_minus_ioctl_bytes: Some(-(1 << 20)),
                ..device(0, "NVIDIA A100")
            },
            device(1, "NVIDIA L4"),
        ],
        ioctls_decoded: 1234,
        ioctls_refused: 2,
        ringbuf_drops: 3,
        ioctls_undecodable: 4,
        unknown_classes: vec![proto::UnknownClass {
            class_id: 0xc86f,
            objects: 5,
        }],
        ..proto::GpuStatus::default()
    });
    view
}

/// The points of `name` as (label of `attr`, value).
fn by(families: &[Family], name: &str, attr: Attr) -> Vec<(String, f64)> {
    family(families, name)
        .points
        .iter()
        .map(|p| {
            let label = p.attributes.iter().find(|(k, _)| *k == attr);
            (label.map(|(_, v)| v.clone()).unwrap_or_default(), p.value)
        })
        .collect()
}

fn owned(points: &[(&str, f64)]) -> Vec<(String, f64)> {
    points.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[test]
fn gpu_memory_becomes_process_and_device_points() {
    let families = catalogue::families(&gpu_view("tracking"));
    let gib = |n: f64| n * f64::from(1u32 << 30);
    let ioctl = &family(&families, "infermem.process.gpu.memory.usage").points;
    assert_eq!(
        ioctl[0].attributes[..2],
        [
            (Attr::Pid, "42".to_owned()),
            (Attr::Executable, "llama-server".to_owned())
        ],
        "a process series"
    );
    let process = |name| by(&families, name, Attr::GpuId);
    assert_eq!(
        process("infermem.process.gpu.memory.usage"),
        owned(&[("nvidia0", gib(6.0)), ("unknown", f64::from(2u32 << 20))])
    );
    assert_eq!(
        process("infermem.process.gpu.memory.nvml.usage"),
        owned(&[("nvidia0", gib(6.5)), ("nvidia1", gib(1.0))])
    );
    assert_eq!(
        process("infermem.process.gpu.host_pinned")[0],
        ("nvidia0".to_owned(), f64::from(256u32 << 20))
    );
    let device = |name| by(&families, name, Attr::GpuId);
    assert_eq!(
        device("hw.gpu.memory.usage"),
        owned(&[("nvidia0", gib(7.0))])
    );
    assert_eq!(
        device("hw.gpu.memory.limit"),
        owned(&[("nvidia0", gib(80.0))])
    );
    assert_eq!(device("hw.gpu.utilization"), owned(&[("nvidia0", 0.37)]));
    assert_eq!(
        device("infermem.gpu.memory.ioctl.usage"),
        owned(&[("nvidia0", gib(6.0)), ("nvidia1", gib(6.0))])
    );
    assert_eq!(
        device("infermem.gpu.memory.nvml_minus_ioctl"),
        owned(&[("nvidia0", -f64::from(1u32 << 20))])
    );
    assert_eq!(
        by(&families, "hw.gpu.memory.limit", Attr::GpuModel),
        owned(&[("NVIDIA A100", gib(80.0))])
    );
    assert_eq!(
        by(&families, "infermem.gpu.ioctls", Attr::IoctlResult),
        owned(&[
            ("decoded", 1234.0),
            ("refused", 2.0),
            ("undecodable", 4.0),
            ("dropped", 3.0)
        ])
    );
    assert_eq!(
        by(
            &families,
            "infermem.gpu.unknown_class.objects",
            Attr::GpuClass
        ),
        owned(&[("0x0000c86f", 5.0)])
    );
    assert_eq!(
        by(&families, "infermem.gpu.status", Attr::GpuState),
        owned(&[("tracking", 1.0)])
    );
}

#[test]
fn without_decoding_or_a_gpu_only_what_is_known_is_exported() {
    let off = catalogue::families(&gpu_view("probes_off"));
    for name in [
        "infermem.gpu.memory.ioctl.usage",
        "infermem.gpu.ioctls",
        "infermem.gpu.unknown_class.objects",
    ] {
        assert!(value(&off, name).is_empty(), "{name} with the probes off");
    }
    assert_eq!(
        value(&off, "hw.gpu.memory.limit"),
        [f64::from(80u32) * f64::from(1u32 << 30)]
    );
    let unknown = catalogue::families(&gpu_view("unknown_driver"));
    assert!(value(&unknown, "infermem.gpu.memory.ioctl.usage").is_empty());
    assert_eq!(
        value(&unknown, "infermem.gpu.ioctls").len(),
        4,
        "the probes run"
    );
    let mut none = view(false);
    none.status.gpu = Some(proto::GpuStatus {
        state: "no_gpu".into(),
        ..proto::GpuStatus::default()
    });
    let families = catalogue::families(&none);
    let gpu_points: Vec<&str> = families
        .iter()
        .filter(|f| f.metric.name.contains("gpu") && !f.points.is_empty())
        .map(|f| f.metric.name)
        .collect();
    assert_eq!(gpu_points, ["infermem.gpu.status"]);
    assert_eq!(
        by(&families, "infermem.gpu.status", Attr::GpuState),
        owned(&[("no_gpu", 1.0)])
    );
}

#[test]
fn prometheus_names_the_gpu_series_with_their_labels() {
    let text = prometheus::render(Arc::new(Fixed(gpu_view("tracking")))).unwrap();
    let sample = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix}:\n{text}"))
            .to_owned()
    };
    let process = sample("infermem_process_gpu_memory_usage_bytes{");
    assert!(process.contains("pid=\"42\""), "{process}");
    assert!(
        process.contains(",gpu=\"nvidia0\"} 6442450944"),
        "{process}"
    );
    for prefix in [
        "infermem_process_gpu_memory_nvml_usage_bytes{",
        "infermem_process_gpu_host_pinned_bytes{",
        "infermem_hw_gpu_memory_usage_bytes{gpu=\"nvidia0\",gpu_model=\"NVIDIA A100\"} ",
        "infermem_hw_gpu_memory_limit_bytes{gpu=\"nvidia0\",",
        "infermem_hw_gpu_utilization{gpu=\"nvidia0\",",
        "infermem_gpu_memory_ioctl_usage_bytes{gpu=\"nvidia1\",",
        "infermem_gpu_memory_nvml_minus_ioctl_bytes{gpu=\"nvidia0\",gpu_model=\"NVIDIA A100\"} -1048576",
        "infermem_gpu_ioctls_total{result=\"refused\"} 2",
        "infermem_gpu_unknown_class_objects_total{class=\"0x0000c86f\"} 5",
        "infermem_gpu_status{state=\"tracking\",driver_version=\"550.54.14\"} 1",
    ] {
        sample(prefix);
    }
}

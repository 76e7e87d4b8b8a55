//! The catalogue of exported metrics: each metric's name (OpenTelemetry's, semantic
//! conventions first), unit, instrument and help, and the points it has now, built from the
//! API's answers. The Prometheus endpoint and the OTLP exporter both publish this and only
//! this; `docs/metrics.md` documents it.

use crate::api::proto;

/// How a metric behaves, as OpenTelemetry names its instruments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value sampled now (may go up or down, not additive).
    Gauge,
    /// An additive value that goes up and down (bytes in use).
    UpDownCounter,
    /// A count that only grows while its subject lives.
    Counter,
}

/// One metric of the catalogue.
#[derive(Debug, PartialEq, Eq)]
pub struct Metric {
    /// The OpenTelemetry name, e.g. `process.memory.usage`.
    pub name: &'static str,
    /// UCUM unit: `By`, `s`, `1`, or an annotation such as `{fault}`.
    pub unit: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

impl Metric {
    const fn new(name: &'static str, unit: &'static str, kind: Kind, help: &'static str) -> Self {
        Metric {
            name,
            unit,
            kind,
            help,
        }
    }
}

/// An attribute of a point: its OpenTelemetry key and its Prometheus label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attr {
    Pid,
    Executable,
    ContainerId,
    Runtime,
    Model,
    Cgroup,
    CommandLine,
    FaultType,
    MemoryState,
    PagingState,
    PressureKind,
    GpuId,
    GpuModel,
    IoctlResult,
    GpuClass,
    GpuState,
    DriverVersion,
}

impl Attr {
    /// The OpenTelemetry attribute key.
    pub fn otel_key(self) -> &'static str {
        match self {
            Attr::Pid => "process.pid",
            Attr::Executable => "process.executable.name",
            Attr::ContainerId => "container.id",
            Attr::Runtime => "infermem.runtime",
            Attr::Model => "infermem.model",
            Attr::Cgroup => "infermem.cgroup",
            Attr::CommandLine => "process.command_line",
            Attr::FaultType => "system.paging.fault.type",
            Attr::MemoryState => "system.memory.state",
            Attr::PagingState => "system.paging.state",
            Attr::PressureKind => "infermem.pressure",
            Attr::GpuId => "hw.id",
            Attr::GpuModel => "hw.model",
            Attr::IoctlResult => "infermem.gpu.ioctl.result",
            Attr::GpuClass => "infermem.gpu.class",
            Attr::GpuState => "infermem.gpu.state",
            Attr::DriverVersion => "hw.driver_version",
        }
    }

    /// The Prometheus label name.
    pub fn prometheus_label(self) -> &'static str {
        match self {
            Attr::Pid => "pid",
            Attr::Executable => "executable",
            Attr::ContainerId => "container_id",
            Attr::Runtime => "runtime",
            Attr::Model => "model",
            Attr::Cgroup => "cgroup",
            Attr::CommandLine => "command_line",
            Attr::FaultType => "type",
            Attr::MemoryState | Attr::PagingState => "state",
            Attr::PressureKind => "kind",
            Attr::GpuId => "gpu",
            Attr::GpuModel => "gpu_model",
            Attr::IoctlResult => "result",
            Attr::GpuClass => "class",
            Attr::GpuState => "state",
            Attr::DriverVersion => "driver_version",
        }
    }
}

/// One value of a metric, with its attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub attributes: Vec<(Attr, String)>,
    pub value: f64,
}

/// A metric and its points now (none is a valid state: no workload, no cgroup).
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub metric: &'static Metric,
    pub points: Vec<Point>,
}

use Kind::{Counter, Gauge, UpDownCounter};

pub const PROCESS_MEMORY_USAGE: Metric = Metric::new(
    "process.memory.usage",
    "By",
    UpDownCounter,
    "Resident set size of the process.",
);
pub const PROCESS_MEMORY_VIRTUAL: Metric = Metric::new(
    "process.memory.virtual",
    "By",
    UpDownCounter,
    "Virtual memory size of the process.",
);
pub const PROCESS_PAGING_FAULTS: Metric = Metric::new(
    "process.paging.faults",
    "{fault}",
    Counter,
    "Page faults of the process since it started, major and minor.",
);
pub const PROCESS_MEMORY_ANONYMOUS: Metric = Metric::new(
    "infermem.process.memory.anonymous",
    "By",
    UpDownCounter,
    "Resident anonymous memory of the process (KV cache and activations on the CPU).",
);
pub const PROCESS_MEMORY_SWAP: Metric = Metric::new(
    "infermem.process.memory.swap",
    "By",
    UpDownCounter,
    "Bytes of the process in swap.",
);
pub const MODEL_FILE_SIZE: Metric = Metric::new(
    "infermem.model.file.size",
    "By",
    UpDownCounter,
    "Bytes of the model files the process maps.",
);
pub const MODEL_FILE_RESIDENT: Metric = Metric::new(
    "infermem.model.file.resident",
    "By",
    UpDownCounter,
    "Bytes of the process's model files in the page cache.",
);
pub const MODEL_FILE_FAULTS: Metric = Metric::new(
    "infermem.model.file.faults",
    "{fault}",
    Counter,
    "Page faults on the process's model-file mappings (eBPF).",
);
pub const KV_CACHE_USAGE: Metric = Metric::new(
    "infermem.kv_cache.usage",
    "By",
    UpDownCounter,
    "KV cache of the process now.",
);
pub const KV_CACHE_LIMIT: Metric = Metric::new(
    "infermem.kv_cache.limit",
    "By",
    UpDownCounter,
    "KV cache of the process predicted at its maximum context.",
);
pub const PREDICTED_PEAK: Metric = Metric::new(
    "infermem.memory.predicted_peak",
    "By",
    Gauge,
    "Predicted peak RAM of the process.",
);
pub const PROCESS_RISK_LEVEL: Metric = Metric::new(
    "infermem.process.risk.level",
    "1",
    Gauge,
    "OOM risk of the process: 0 ok, 1 elevated, 2 critical.",
);
pub const PROCESS_RISK_ETA: Metric = Metric::new(
    "infermem.process.risk.eta",
    "s",
    Gauge,
    "Predicted time until the process's memory domain runs out.",
);
pub const PROCESS_THRASHING: Metric = Metric::new(
    "infermem.process.thrashing",
    "1",
    Gauge,
    "1 while the process's model weights are being faulted back in.",
);
pub const PROCESS_GPU_MEMORY_USAGE: Metric = Metric::new(
    "infermem.process.gpu.memory.usage",
    "By",
    UpDownCounter,
    "Video memory the process holds on the GPU, from the NVIDIA driver's ioctls (eBPF).",
);
pub const PROCESS_GPU_MEMORY_NVML_USAGE: Metric = Metric::new(
    "infermem.process.gpu.memory.nvml.usage",
    "By",
    UpDownCounter,
    "Video memory of the process on the GPU as NVML reports it.",
);
pub const PROCESS_GPU_HOST_PINNED: Metric = Metric::new(
    "infermem.process.gpu.host_pinned",
    "By",
    UpDownCounter,
    "Host memory the process allocated or pinned through the NVIDIA driver (eBPF).",
);
pub const SYSTEM_MEMORY_LIMIT: Metric = Metric::new(
    "system.memory.limit",
    "By",
    UpDownCounter,
    "Total memory of the host (MemTotal).",
);
pub const SYSTEM_MEMORY_USAGE: Metric = Metric::new(
    "system.memory.usage",
    "By",
    UpDownCounter,
    "Host memory by state: free (MemFree), used (MemTotal - MemAvailable).",
);
pub const SYSTEM_MEMORY_AVAILABLE: Metric = Metric::new(
    "system.memory.linux.available",
    "By",
    UpDownCounter,
    "Memory available to new work without swapping (MemAvailable).",
);
pub const SYSTEM_PAGING_USAGE: Metric = Metric::new(
    "system.paging.usage",
    "By",
    UpDownCounter,
    "Swap by state: used, free.",
);
pub const HOST_MODEL_FILE_RESIDENT: Metric = Metric::new(
    "infermem.host.model_file.resident",
    "By",
    UpDownCounter,
    "Resident bytes of the model files of every tracked workload.",
);
pub const HOST_MEMORY_PRESSURE: Metric = Metric::new(
    "infermem.host.memory.pressure",
    "1",
    Gauge,
    "Memory pressure stall (PSI avg10) as a fraction of time, some and full.",
);
pub const HOST_RISK_LEVEL: Metric = Metric::new(
    "infermem.host.risk.level",
    "1",
    Gauge,
    "OOM risk of the host: 0 ok, 1 elevated, 2 critical.",
);
pub const HOST_RISK_ETA: Metric = Metric::new(
    "infermem.host.risk.eta",
    "s",
    Gauge,
    "Predicted time until the host runs out of memory.",
);
pub const GPU_STATUS: Metric = Metric::new(
    "infermem.gpu.status",
    "1",
    Gauge,
    "1, with what the NVIDIA probes do: no_gpu, tracking, unknown_driver or probes_off, \
     and the driver version.",
);
pub const GPU_MEMORY_USAGE: Metric = Metric::new(
    "hw.gpu.memory.usage",
    "By",
    UpDownCounter,
    "Memory used on the GPU (NVML).",
);
pub const GPU_MEMORY_LIMIT: Metric = Metric::new(
    "hw.gpu.memory.limit",
    "By",
    UpDownCounter,
    "Memory of the GPU (NVML).",
);
pub const GPU_UTILIZATION: Metric = Metric::new(
    "hw.gpu.utilization",
    "1",
    Gauge,
    "Fraction of time the GPU was busy over NVML's last sample period.",
);
pub const GPU_MEMORY_IOCTL_USAGE: Metric = Metric::new(
    "infermem.gpu.memory.ioctl.usage",
    "By",
    UpDownCounter,
    "Video memory on the GPU of every process, from the NVIDIA driver's ioctls (eBPF).",
);
pub const GPU_MEMORY_NVML_MINUS_IOCTL: Metric = Metric::new(
    "infermem.gpu.memory.nvml_minus_ioctl",
    "By",
    Gauge,
    "NVML's used memory on the GPU minus the ioctl figure (driver reservations, contexts, \
     allocations from before the agent started).",
);
pub const GPU_IOCTLS: Metric = Metric::new(
    "infermem.gpu.ioctls",
    "{ioctl}",
    Counter,
    "NVIDIA RM ioctls the probes saw, by result: decoded, refused (by RM), undecodable, \
     dropped (not queued).",
);
pub const GPU_UNKNOWN_CLASS_OBJECTS: Metric = Metric::new(
    "infermem.gpu.unknown_class.objects",
    "{object}",
    Counter,
    "RM objects of classes the decoder does not size, by class id.",
);
pub const CGROUP_MEMORY_USAGE: Metric = Metric::new(
    "infermem.cgroup.memory.usage",
    "By",
    UpDownCounter,
    "Memory charged to the cgroup.",
);
pub const CGROUP_MEMORY_LIMIT: Metric = Metric::new(
    "infermem.cgroup.memory.limit",
    "By",
    UpDownCounter,
    "The cgroup's effective memory limit (its own or an ancestor's).",
);
pub const CGROUP_OOM_KILLS: Metric = Metric::new(
    "infermem.cgroup.oom_kills",
    "{kill}",
    Counter,
    "OOM kills in the cgroup, as its memory.events (v2) or oom_control (v1) count them.",
);
pub const CGROUP_RISK_LEVEL: Metric = Metric::new(
    "infermem.cgroup.risk.level",
    "1",
    Gauge,
    "OOM risk of the cgroup: 0 ok, 1 elevated, 2 critical.",
);
pub const CGROUP_RISK_ETA: Metric = Metric::new(
    "infermem.cgroup.risk.eta",
    "s",
    Gauge,
    "Predicted time until the cgroup reaches its limit.",
);
pub const OOM_KILLS: Metric = Metric::new(
    "infermem.oom_kills",
    "{kill}",
    Counter,
    "OOM kills the probes saw since the agent started, host-wide.",
);
pub const AGENT_EVENTS: Metric = Metric::new(
    "infermem.agent.events",
    "{event}",
    Counter,
    "Events the agent read from its probes.",
);
pub const AGENT_RINGBUF_DROPS: Metric = Metric::new(
    "infermem.agent.ringbuf.drops",
    "{event}",
    Counter,
    "Events the kernel could not queue for the agent.",
);
pub const ACTIONS_IN_FORCE: Metric = Metric::new(
    "infermem.actions.in_force",
    "{action}",
    UpDownCounter,
    "Actions the policy has in force.",
);

/// Every metric, in the order they are published.
pub const METRICS: &[&Metric] = &[
    &PROCESS_MEMORY_USAGE,
    &PROCESS_MEMORY_VIRTUAL,
    &PROCESS_PAGING_FAULTS,
    &PROCESS_MEMORY_ANONYMOUS,
    &PROCESS_MEMORY_SWAP,
    &MODEL_FILE_SIZE,
    &MODEL_FILE_RESIDENT,
    &MODEL_FILE_FAULTS,
    &KV_CACHE_USAGE,
    &KV_CACHE_LIMIT,
    &PREDICTED_PEAK,
    &PROCESS_RISK_LEVEL,
    &PROCESS_RISK_ETA,
    &PROCESS_THRASHING,
    &PROCESS_GPU_MEMORY_USAGE,
    &PROCESS_GPU_MEMORY_NVML_USAGE,
    &PROCESS_GPU_HOST_PINNED,
    &SYSTEM_MEMORY_LIMIT,
    &SYSTEM_MEMORY_USAGE,
    &SYSTEM_MEMORY_AVAILABLE,
    &SYSTEM_PAGING_USAGE,
    &HOST_MODEL_FILE_RESIDENT,
    &HOST_MEMORY_PRESSURE,
    &HOST_RISK_LEVEL,
    &HOST_RISK_ETA,
    &GPU_STATUS,
    &GPU_MEMORY_USAGE,
    &GPU_MEMORY_LIMIT,
    &GPU_UTILIZATION,
    &GPU_MEMORY_IOCTL_USAGE,
    &GPU_MEMORY_NVML_MINUS_IOCTL,
    &GPU_IOCTLS,
    &GPU_UNKNOWN_CLASS_OBJECTS,
    &CGROUP_MEMORY_USAGE,
    &CGROUP_MEMORY_LIMIT,
    &CGROUP_OOM_KILLS,
    &CGROUP_RISK_LEVEL,
    &CGROUP_RISK_ETA,
    &OOM_KILLS,
    &AGENT_EVENTS,
    &AGENT_RINGBUF_DROPS,
    &ACTIONS_IN_FORCE,
];

/// What the catalogue is built from: the API's answers to a caller who sees everything.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub ps: proto::PsReply,
    pub status: proto::StatusReply,
    /// Actions in force, when the agent runs a policy engine.
    pub actions_in_force: Option<u64>,
    /// Whether process points carry their command line.
    pub command_line: bool,
}

/// Every metric of [`METRICS`] with its points in `view`.
pub fn families(view: &View) -> Vec<Family> {
    let mut points = Points::default();
    for workload in &view.ps.workloads {
        process_points(&mut points, workload, view.command_line);
    }
    if let Some(host) = &view.status.host {
        host_points(&mut points, host);
    }
    if let Some(gpu) = &view.status.gpu {
        gpu_points(&mut points, gpu);
    }
    for cgroup in view.status.cgroups.iter().filter(|c| exported(c, &view.ps)) {
        cgroup_points(&mut points, cgroup);
    }
    agent_points(&mut points, view);
    METRICS
        .iter()
        .map(|&metric| Family {
            metric,
            points: points.take(metric),
        })
        .collect()
}

/// Whether a cgroup gets series: it holds a workload (or is an ancestor of one that does),
/// or it has a limit of its own. The thousands of unlimited service and session cgroups of a
/// busy host do not.
fn exported(cgroup: &proto::CgroupStatus, ps: &proto::PsReply) -> bool {
    let holds = |workload: &proto::Workload| {
        crate::daemon::sample::is_under(&workload.cgroup, &cgroup.path)
    };
    cgroup.limit_bytes.is_some() || ps.workloads.iter().any(holds)
}

/// Points gathered per metric.
#[derive(Default)]
struct Points(Vec<(&'static str, Point)>);

impl Points {
    fn add(&mut self, metric: &'static Metric, attributes: &[(Attr, String)], value: f64) {
        let point = Point {
            attributes: attributes.to_vec(),
            value,
        };
        self.0.push((metric.name, point));
    }

    fn take(&mut self, metric: &Metric) -> Vec<Point> {
        let (mine, rest) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|(name, _)| *name == metric.name);
        self.0 = rest;
        mine.into_iter().map(|(_, point)| point).collect()
    }
}

/// The attributes that name a process series.
fn process_attributes(w: &proto::Workload, command_line: bool) -> Vec<(Attr, String)> {
    let mut attributes = vec![
        (Attr::Pid, w.pid.to_string()),
        (Attr::Executable, w.executable.clone()),
        (Attr::Runtime, w.runtime.clone()),
        (Attr::Model, w.model.clone()),
        (Attr::Cgroup, w.cgroup.clone()),
    ];
    if !w.container_id.is_empty() {
        attributes.push((Attr::ContainerId, w.container_id.clone()));
    }
    if command_line {
        attributes.push((Attr::CommandLine, w.command_line.clone()));
    }
    attributes
}

fn process_points(points: &mut Points, w: &proto::Workload, command_line: bool) {
    let attrs = process_attributes(w, command_line);
    let bytes = |v: u64| v as f64;
    points.add(
        &PROCESS_MEMORY_USAGE,
        &attrs,
        bytes(w.rss_bytes - w.swap_bytes.min(w.rss_bytes)),
    );
    points.add(&PROCESS_MEMORY_VIRTUAL, &attrs, bytes(w.virtual_bytes));
    for (kind, count) in [("major", w.major_faults), ("minor", w.minor_faults)] {
        let with_type = with(&attrs, Attr::FaultType, kind);
        points.add(&PROCESS_PAGING_FAULTS, &with_type, count as f64);
    }
    points.add(&PROCESS_MEMORY_ANONYMOUS, &attrs, bytes(w.anon_bytes));
    points.add(&PROCESS_MEMORY_SWAP, &attrs, bytes(w.swap_bytes));
    points.add(&MODEL_FILE_SIZE, &attrs, bytes(w.model_file_bytes));
    points.add(
        &MODEL_FILE_RESIDENT,
        &attrs,
        bytes(w.weights_resident_bytes),
    );
    let optional = [
        (&MODEL_FILE_FAULTS, w.model_file_faults),
        (&KV_CACHE_USAGE, w.kv_bytes_now),
        (&KV_CACHE_LIMIT, w.kv_bytes_max),
        (&PREDICTED_PEAK, w.predicted_peak_bytes),
    ];
    for (metric, value) in optional {
        if let Some(value) = value {
            points.add(metric, &attrs, value as f64);
        }
    }
    if let Some(risk) = &w.risk {
        risk_points(
            points,
            [&PROCESS_RISK_LEVEL, &PROCESS_RISK_ETA],
            &attrs,
            risk,
        );
        points.add(
            &PROCESS_THRASHING,
            &attrs,
            f64::from(u8::from(risk.thrashing)),
        );
    }
    for gpu in &w.gpu {
        process_gpu_points(points, &attrs, gpu);
    }
}

/// One process's memory on one GPU: the ioctl and NVML figures that are known, and the
/// host memory it pinned.
fn process_gpu_points(points: &mut Points, process: &[(Attr, String)], gpu: &proto::ProcessGpu) {
    let attrs = with(process, Attr::GpuId, &gpu_id(gpu.device));
    let known = [
        (&PROCESS_GPU_MEMORY_USAGE, gpu.vram_bytes_ioctl),
        (&PROCESS_GPU_MEMORY_NVML_USAGE, gpu.vram_bytes_nvml),
        (&PROCESS_GPU_HOST_PINNED, Some(gpu.host_pinned_bytes)),
    ];
    for (metric, value) in known {
        if let Some(value) = value {
            points.add(metric, &attrs, value as f64);
        }
    }
}

/// The `hw.id` of an RM device instance: `nvidia<N>`, as its device node is named;
/// `unknown` for an allocation whose device was not resolved.
pub fn gpu_id(device: u32) -> String {
    if device == crate::gpu::UNKNOWN_DEVICE {
        "unknown".to_owned()
    } else {
        format!("nvidia{device}")
    }
}

/// `attributes` and one more.
fn with(attributes: &[(Attr, String)], attr: Attr, value: &str) -> Vec<(Attr, String)> {
    let mut all = attributes.to_vec();
    all.push((attr, value.to_owned()));
    all
}

/// The level as a number: 0 ok, 1 elevated, 2 critical.
pub fn level_value(level: &str) -> f64 {
    match level {
        "critical" => 2.0,
        "elevated" => 1.0,
        _ => 0.0,
    }
}

fn risk_points(
    points: &mut Points,
    [level, eta]: [&'static Metric; 2],
    attributes: &[(Attr, String)],
    risk: &proto::Assessment,
) {
    points.add(level, attributes, level_value(&risk.level));
    if let Some(seconds) = risk.eta_seconds {
        points.add(eta, attributes, seconds);
    }
}

fn host_points(points: &mut Points, host: &proto::HostStatus) {
    let total = host.mem_total_bytes as f64;
    points.add(&SYSTEM_MEMORY_LIMIT, &[], total);
    let used = host
        .mem_total_bytes
        .saturating_sub(host.mem_available_bytes);
    for (state, value) in [("free", host.mem_free_bytes), ("used", used)] {
        let attrs = [(Attr::MemoryState, state.to_owned())];
        points.add(&SYSTEM_MEMORY_USAGE, &attrs, value as f64);
    }
    points.add(
        &SYSTEM_MEMORY_AVAILABLE,
        &[],
        host.mem_available_bytes as f64,
    );
    let swap_used = host.swap_total_bytes.saturating_sub(host.swap_free_bytes);
    for (state, value) in [("used", swap_used), ("free", host.swap_free_bytes)] {
        let attrs = [(Attr::PagingState, state.to_owned())];
        points.add(&SYSTEM_PAGING_USAGE, &attrs, value as f64);
    }
    points.add(&HOST_MODEL_FILE_RESIDENT, &[], host.model_file_bytes as f64);
    for (kind, avg10) in [("some", host.psi_some_avg10), ("full", host.psi_full_avg10)] {
        if let Some(percent) = avg10 {
            let attrs = [(Attr::PressureKind, kind.to_owned())];
            points.add(&HOST_MEMORY_PRESSURE, &attrs, percent / 100.0);
        }
    }
    if let Some(risk) = &host.risk {
        risk_points(points, [&HOST_RISK_LEVEL, &HOST_RISK_ETA], &[], risk);
    }
}

/// What the probes do, each GPU (NVML's figures, and the ioctl sum while the ioctls are
/// decoded), and the probes' counters while they run.
fn gpu_points(points: &mut Points, gpu: &proto::GpuStatus) {
    let status = [
        (Attr::GpuState, gpu.state.clone()),
        (Attr::DriverVersion, gpu.driver_version.clone()),
    ];
    points.add(&GPU_STATUS, &status, 1.0);
    let decoded = gpu.state == "tracking";
    for device in &gpu.devices {
        device_points(points, device, decoded);
    }
    if gpu.state == "no_gpu" || gpu.state == "probes_off" {
        return;
    }
    let results = [
        ("decoded", gpu.ioctls_decoded),
        ("refused", gpu.ioctls_refused),
        ("undecodable", gpu.ioctls_undecodable),
        ("dropped", gpu.ringbuf_drops),
    ];
    for (result, count) in results {
        let attrs = [(Attr::IoctlResult, result.to_owned())];
        points.add(&GPU_IOCTLS, &attrs, count as f64);
    }
    for class in &gpu.unknown_classes {
        let attrs = [(Attr::GpuClass, format!("{:#010x}", class.class_id))];
        points.add(&GPU_UNKNOWN_CLASS_OBJECTS, &attrs, class.objects as f64);
    }
}

/// One GPU's points; the ioctl sum only when `decoded` (it is 0, not unknown, in the reply).
fn device_points(points: &mut Points, d: &proto::GpuDevice, decoded: bool) {
    let attrs = [
        (Attr::GpuId, gpu_id(d.device)),
        (Attr::GpuModel, d.name.clone()),
    ];
    let bytes = |v: Option<u64>| v.map(|v| v as f64);
    let known = [
        (&GPU_MEMORY_USAGE, bytes(d.used_bytes)),
        (&GPU_MEMORY_LIMIT, bytes(d.total_bytes)),
        (
            &GPU_UTILIZATION,
            d.utilization_percent.map(|p| f64::from(p) / 100.0),
        ),
        (
            &GPU_MEMORY_IOCTL_USAGE,
            decoded.then_some(d.vram_bytes_ioctl as f64),
        ),
        (
            &GPU_MEMORY_NVML_MINUS_IOCTL,
            d.nvml_minus_ioctl_bytes.map(|v| v as f64),
        ),
    ];
    for (metric, value) in known {
        if let Some(value) = value {
            points.add(metric, &attrs, value);
        }
    }
}

fn cgroup_points(points: &mut Points, cgroup: &proto::CgroupStatus) {
    let attrs = [(Attr::Cgroup, cgroup.path.clone())];
    points.add(&CGROUP_MEMORY_USAGE, &attrs, cgroup.usage_bytes as f64);
    if let Some(limit) = cgroup.effective_limit_bytes {
        points.add(&CGROUP_MEMORY_LIMIT, &attrs, limit as f64);
    }
    points.add(&CGROUP_OOM_KILLS, &attrs, cgroup.oom_kills as f64);
    if let Some(risk) = &cgroup.risk {
        risk_points(points, [&CGROUP_RISK_LEVEL, &CGROUP_RISK_ETA], &attrs, risk);
    }
}

fn agent_points(points: &mut Points, view: &View) {
    if let Some(daemon) = view.ps.daemon.as_ref().or(view.status.daemon.as_ref()) {
        points.add(&OOM_KILLS, &[], daemon.oom_kills_seen as f64);
        points.add(&AGENT_EVENTS, &[], daemon.events as f64);
        points.add(&AGENT_RINGBUF_DROPS, &[], daemon.ringbuf_drops as f64);
    }
    if let Some(count) = view.actions_in_force {
        points.add(&ACTIONS_IN_FORCE, &[], count as f64);
    }
}

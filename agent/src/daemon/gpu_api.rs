//! The GPU part of the local API's answers: each workload's GPU memory, and the GPUs and the
//! NVIDIA probes for `status`.

use crate::{
    api::proto,
    gpu::{
        ProcessGpu,
        nvml::{self, NvmlDevice},
        objects::DeviceUsage,
        state::{Driver, GpuState},
    },
};

use super::Agent;

/// One process's GPU memory per device, for `ps`.
pub fn process_gpu(gpu: &GpuState, pid: u32) -> Vec<proto::ProcessGpu> {
    gpu.process_gpu(pid).into_iter().map(to_proto).collect()
}

fn to_proto(p: ProcessGpu) -> proto::ProcessGpu {
    proto::ProcessGpu {
        device: p.device,
        vram_bytes_ioctl: p.vram_bytes_ioctl,
        vram_bytes_nvml: p.vram_bytes_nvml,
        host_pinned_bytes: p.host_pinned_bytes,
        ioctl_partial: p.ioctl_partial,
    }
}

/// The GPUs and the probes, for `status`.
pub fn gpu_status(agent: &Agent) -> proto::GpuStatus {
    let probe_stats = agent.probes().map(|mut p| p.nvidia().stats());
    let probes_on = agent.ebpf_reason().is_none();
    let gpu = agent.gpu();
    let health = gpu.health(probe_stats);
    let (state, message, version, layout) = describe(&gpu.driver, probes_on);
    let totals = gpu.device_totals();
    proto::GpuStatus {
        state: state.to_owned(),
        message,
        driver_version: version,
        layout,
        devices: devices(&gpu, &totals),
        ioctls_decoded: health.decoded,
        ioctls_refused: health.refused,
        ringbuf_drops: health.ringbuf_drops,
        unknown_classes: health
            .unknown_classes
            .iter()
            .map(|(&class_id, &objects)| proto::UnknownClass { class_id, objects })
            .collect(),
        nvml_error: gpu.nvml_error().unwrap_or_default().to_owned(),
        ioctls_undecodable: health.undecodable,
    }
}

/// The state's name, its sentence, the driver version and the layout's description.
fn describe(driver: &Driver, probes_on: bool) -> (&'static str, String, String, String) {
    match driver {
        Driver::Absent => (
            "no_gpu",
            "no NVIDIA driver is loaded (no /sys/module/nvidia/version): no GPU memory to track"
                .to_owned(),
            String::new(),
            String::new(),
        ),
        Driver::Unknown { version, why } => (
            "unknown_driver",
            format!(
                "NVIDIA driver {version}: its ioctls are not decoded ({why}); NVML figures only"
            ),
            version.clone(),
            String::new(),
        ),
        Driver::Decoding { version, layout } => {
            let layout = format!(
                "{} (checked against {})",
                layout.name,
                layout.checked_against.join(", ")
            );
            if probes_on {
                (
                    "tracking",
                    format!("NVIDIA driver {version}: RM ioctls decoded per process"),
                    version.to_string(),
                    layout,
                )
            } else {
                (
                    "probes_off",
                    "eBPF is off: NVML figures only".to_owned(),
                    version.to_string(),
                    layout,
                )
            }
        }
    }
}

/// Every device NVML or the ioctls know of, by device key.
fn devices(gpu: &GpuState, totals: &[DeviceUsage]) -> Vec<proto::GpuDevice> {
    let mut keys: Vec<u32> = totals.iter().map(|t| t.device).collect();
    if let Some(snapshot) = &gpu.snapshot {
        keys.extend(snapshot.devices.iter().map(NvmlDevice::key));
    }
    keys.sort_unstable();
    keys.dedup();
    keys.into_iter()
        .map(|key| {
            let ioctl = totals
                .iter()
                .find(|t| t.device == key)
                .map_or(0, |t| t.vram_bytes);
            let nvml = gpu.snapshot.as_ref().and_then(|s| s.device(key));
            device(key, ioctl, nvml)
        })
        .collect()
}

fn device(key: u32, ioctl_bytes: u64, nvml: Option<&NvmlDevice>) -> proto::GpuDevice {
    let check = nvml.map(|d| nvml::device_difference(d, ioctl_bytes));
    proto::GpuDevice {
        device: key,
        name: nvml.map(|d| d.name.clone()).unwrap_or_default(),
        uuid: nvml.map(|d| d.uuid.clone()).unwrap_or_default(),
        total_bytes: nvml.map(|d| d.total_bytes),
        used_bytes: nvml.map(|d| d.used_bytes),
        free_bytes: nvml.map(|d| d.free_bytes),
        utilization_percent: nvml.and_then(|d| d.utilization_percent),
        vram_bytes_ioctl: ioctl_bytes,
        vram_bytes_nvml_processes: check.and_then(|c| c.nvml_processes_bytes),
        nvml_minus_ioctl_bytes: check.map(|c| c.nvml_minus_ioctl_bytes),
    }
}

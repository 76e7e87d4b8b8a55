//! The predictor's GPU check: per device, NVML's free memory against the growth its model
//! processes still have ahead to their predicted VRAM peaks; merged into those processes'
//! verdicts.

use std::collections::{BTreeMap, HashMap};

use crate::{
    gpu::{ProcessGpu, state::GpuState},
    predict::{
        self,
        gpu::{GpuHeadroom, GpuNeed, GpuVerdict, assess_gpu},
    },
};

use super::registry::{Registry, TrackedProcess};

/// The GPU verdict of every model process with a predicted VRAM peak on a device NVML knows.
pub fn gpu_verdicts(
    registry: &Registry,
    gpu: &GpuState,
    cfg: &predict::Config,
) -> HashMap<u32, GpuVerdict> {
    let Some(snapshot) = &gpu.snapshot else {
        return HashMap::new();
    };
    let single = (snapshot.devices.len() == 1).then(|| snapshot.devices[0].key());
    let mut by_device: BTreeMap<u32, Vec<GpuNeed>> = BTreeMap::new();
    for p in registry.processes.values() {
        let Some(peak) = vram_peak(p) else { continue };
        let pid = p.state.identity.pid;
        let held = gpu.process_gpu(pid);
        let Some((device, now)) = main_device(&held).or(single.map(|d| (d, 0))) else {
            continue;
        };
        by_device.entry(device).or_default().push(GpuNeed {
            pid,
            predicted_peak_bytes: peak,
            vram_now_bytes: now,
        });
    }
    let mut verdicts = HashMap::new();
    for (device, needs) in by_device {
        let Some(d) = snapshot.device(device) else {
            continue;
        };
        let headroom = GpuHeadroom {
            device,
            total_bytes: d.total_bytes,
            free_bytes: d.free_bytes,
        };
        let verdict = assess_gpu(&needs, &headroom, cfg);
        for need in &needs {
            verdicts.insert(need.pid, verdict.clone());
        }
    }
    verdicts
}

/// The model's predicted VRAM peak, when it has one.
fn vram_peak(p: &TrackedProcess) -> Option<u64> {
    let peak = p
        .model
        .report
        .as_ref()?
        .prediction
        .as_ref()?
        .peak_vram_bytes?;
    (peak > 0).then_some(peak)
}

/// The device the process holds most VRAM on, with what it holds there: the ioctl figure
/// when complete, else NVML's.
fn main_device(held: &[ProcessGpu]) -> Option<(u32, u64)> {
    held.iter()
        .map(|g| {
            let ioctl = g.vram_bytes_ioctl.filter(|_| !g.ioctl_partial);
            (g.device, ioctl.or(g.vram_bytes_nvml).unwrap_or(0))
        })
        .max_by_key(|&(_, bytes)| bytes)
}

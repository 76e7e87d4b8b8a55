//! GPU memory per process, without the runtime's help: the NVIDIA driver's RM ioctls seen by
//! the kernel probes, decoded with the running driver's layout, paired into live objects, and
//! cross-checked with NVML.
//!
//! - [`layout`]: which byte offsets each driver version uses (tables keyed by
//!   `/sys/module/nvidia/version`, each naming the versions it was checked against).
//! - [`decode`]: one [`infermem_common::GpuIoctl`] record into an [`decode::RmCall`].
//! - [`objects`]: the live RM objects, paired by (client, handle), and each process's bytes.
//! - [`fds`]: which fds are NVIDIA fds, learned from `/proc/*/fd` at start.
//! - [`nvml`]: what NVML says (devices, per-process memory), when libnvidia-ml is present.
//! - [`state`]: the agent's GPU view, joining the above per process and per device.

pub mod decode;
pub mod fds;
pub mod layout;
pub mod nvml;
pub mod objects;
pub mod state;

use fds::FdCheck;

/// `[gpu]` in the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// The NVIDIA driver version whose layouts decode the ioctls: "auto" reads
    /// `/sys/module/nvidia/version`; a version ("550.54.14") overrides it, for hosts where the
    /// module's version file is hidden (some containers) and for tests.
    pub driver_version: String,
    /// How fds found in `/proc` at start are recognised as NVIDIA fds.
    pub fd_check: FdCheck,
    /// Read NVML (libnvidia-ml) when it is present.
    pub nvml: bool,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            driver_version: "auto".to_owned(),
            fd_check: FdCheck::Device,
            nvml: true,
        }
    }
}

/// Marks an allocation whose device could not be resolved (its parent object was never seen).
pub const UNKNOWN_DEVICE: u32 = u32::MAX;

/// GPU memory of one process on one device, as `inspect` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessGpu {
    /// The device: its RM device instance, which is `N` of `/dev/nvidiaN` and NVML's minor
    /// number ([`UNKNOWN_DEVICE`] when unresolved).
    pub device: u32,
    /// Live video memory the process allocated through RM ioctls; None when the probes do
    /// not decode this driver (or are off).
    pub vram_bytes_ioctl: Option<u64>,
    /// What NVML reports for the process on this device; None without NVML or when NVML
    /// cannot say (containers, MIG, "N/A").
    pub vram_bytes_nvml: Option<u64>,
    /// Live host memory registered with or allocated by the driver (system memory and OS
    /// descriptors: pinned pages).
    pub host_pinned_bytes: u64,
    /// The process held NVIDIA fds before the agent started: allocations made then were not
    /// seen, so the ioctl figure can be short of the truth (NVML's is not).
    pub ioctl_partial: bool,
}

/// A process's GPU memory from NVML alone, for standalone commands, which have no ioctl
/// history (`vram_bytes_ioctl` stays None). Empty without NVML.
pub fn from_nvml(pid: u32) -> Vec<ProcessGpu> {
    let Ok(snapshot) = nvml::Nvml::open().and_then(|nvml| nvml.snapshot()) else {
        return Vec::new();
    };
    nvml::process_vram(&snapshot, pid)
        .into_iter()
        .map(|(device, bytes)| ProcessGpu {
            device,
            vram_bytes_ioctl: None,
            vram_bytes_nvml: bytes,
            host_pinned_bytes: 0,
            ioctl_partial: false,
        })
        .collect()
}

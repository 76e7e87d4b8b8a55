//! What NVML says about the NVIDIA GPUs: per device, memory and utilization; per process,
//! used memory; and how that compares with the ioctl figures.
//!
//! NVML is libnvidia-ml, which nvml-wrapper loads at run time (libloading): the agent does not
//! link against it, and a host without it (no NVIDIA GPU or driver) is a normal state,
//! reported as [`NvmlError::NoLibrary`]. The NVML calls are thin ([`Nvml::snapshot`]); what
//! follows from their values (merging the process lists, the device key, the cross-check) is
//! plain code over plain values.

use std::{collections::BTreeMap, ffi::OsStr};

use nvml_wrapper::{
    Device, enums::device::UsedGpuMemory, error::NvmlError as Raw,
    struct_wrappers::device::ProcessInfo,
};

/// The library nvml-wrapper loads on Linux.
const LIBRARY: &str = "libnvidia-ml.so.1";
/// Devices read per snapshot, at most.
pub const MAX_DEVICES: u32 = 64;
/// Processes kept per device, at most (the lowest pids).
pub const MAX_PROCESSES: usize = 4096;

/// One NVML reading of every device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NvmlSnapshot {
    /// The driver version NVML reports (e.g. `550.54.15`); None when it cannot say.
    pub driver_version: Option<String>,
    /// The devices NVML could read, in NVML's index order.
    pub devices: Vec<NvmlDevice>,
    /// The devices NVML lists but could not read (by NVML index), and why.
    pub device_errors: Vec<(u32, NvmlError)>,
}

/// One device as NVML sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlDevice {
    /// NVML's index (PCI bus order, not necessarily `/dev/nvidiaN`'s N).
    pub index: u32,
    /// The minor number: `N` of `/dev/nvidiaN`, which is the RM device instance the ioctl
    /// figures are keyed by; None when NVML cannot say.
    pub minor: Option<u32>,
    pub name: String,
    pub uuid: String,
    pub total_bytes: u64,
    /// Allocated memory (NVML's v2 `used`: the driver's reserved memory is not in it, so
    /// `used + free` may be less than `total`).
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// Share of the last sample period a kernel ran; None when the device cannot say.
    pub utilization_percent: Option<u32>,
    /// The processes with a compute or graphics context on the device, by pid.
    pub processes: Vec<NvmlProcess>,
}

/// One process on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvmlProcess {
    pub pid: u32,
    /// Its memory on the device; None when NVML says "not available" (as under some
    /// containers and MIG setups).
    pub used_bytes: Option<u64>,
}

/// Why there is no NVML figure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvmlError {
    /// libnvidia-ml cannot be loaded: the normal state of a host without an NVIDIA GPU.
    #[error("no NVIDIA GPU or driver: libnvidia-ml cannot be loaded ({0})")]
    NoLibrary(String),
    #[error("libnvidia-ml is installed but the NVIDIA kernel driver is not loaded")]
    DriverNotLoaded,
    #[error(
        "the NVIDIA kernel driver and libnvidia-ml are different versions (driver upgraded \
         without a reload or reboot)"
    )]
    VersionMismatch,
    #[error("no permission to query the NVIDIA driver through NVML ({0})")]
    NoPermission(&'static str),
    #[error("libnvidia-ml has no {call} (older than the NVML API infermem uses): {detail}")]
    MissingFunction { call: &'static str, detail: String },
    #[error("NVML {call}: {message}")]
    Call { call: &'static str, message: String },
}

impl NvmlError {
    /// The error of NVML call `call`, with a clear message for the states a host can be in.
    fn from_raw(call: &'static str, raw: Raw) -> NvmlError {
        match raw {
            Raw::LibloadingError(e) => NvmlError::NoLibrary(e.to_string()),
            Raw::LibraryNotFound => NvmlError::NoLibrary(format!("{call}: {}", raw)),
            Raw::DriverNotLoaded => NvmlError::DriverNotLoaded,
            Raw::LibRmVersionMismatch => NvmlError::VersionMismatch,
            Raw::NoPermission => NvmlError::NoPermission(call),
            Raw::FailedToLoadSymbol(detail) => NvmlError::MissingFunction { call, detail },
            Raw::FunctionNotFound => NvmlError::MissingFunction {
                call,
                detail: raw.to_string(),
            },
            other => NvmlError::Call {
                call,
                message: other.to_string(),
            },
        }
    }
}

/// Maps an nvml-wrapper error of call `call`.
fn call(call: &'static str) -> impl Fn(Raw) -> NvmlError {
    move |raw| NvmlError::from_raw(call, raw)
}

/// An initialised NVML (initialisation is expensive: open once, read many snapshots).
pub struct Nvml {
    lib: nvml_wrapper::Nvml,
}

impl Nvml {
    /// Loads libnvidia-ml and initialises NVML.
    pub fn open() -> Result<Nvml, NvmlError> {
        Nvml::open_library(LIBRARY)
    }

    /// [`Nvml::open`] with the library at `path` (a name the dynamic loader looks up, or a path).
    fn open_library(path: &str) -> Result<Nvml, NvmlError> {
        nvml_wrapper::Nvml::builder()
            .lib_path(OsStr::new(path))
            .init()
            .map(|lib| Nvml { lib })
            .map_err(call("nvmlInit_v2"))
    }

    /// Reads every device (at most [`MAX_DEVICES`]); a device that cannot be read is listed in
    /// [`NvmlSnapshot::device_errors`] and the others are still read.
    pub fn snapshot(&self) -> Result<NvmlSnapshot, NvmlError> {
        let count = self
            .lib
            .device_count()
            .map_err(call("nvmlDeviceGetCount_v2"))?;
        let mut snapshot = NvmlSnapshot {
            driver_version: self.lib.sys_driver_version().ok(),
            ..NvmlSnapshot::default()
        };
        for index in 0..count.min(MAX_DEVICES) {
            match self.device(index) {
                Ok(device) => snapshot.devices.push(device),
                Err(e) => snapshot.device_errors.push((index, e)),
            }
        }
        Ok(snapshot)
    }

    /// One device's figures; the minor number and utilization are optional, the rest required.
    fn device(&self, index: u32) -> Result<NvmlDevice, NvmlError> {
        let device = self
            .lib
            .device_by_index(index)
            .map_err(call("nvmlDeviceGetHandleByIndex_v2"))?;
        let memory = device
            .memory_info()
            .map_err(call("nvmlDeviceGetMemoryInfo_v2"))?;
        Ok(NvmlDevice {
            index,
            minor: device.minor_number().ok(),
            name: device.name().map_err(call("nvmlDeviceGetName"))?,
            uuid: device.uuid().map_err(call("nvmlDeviceGetUUID"))?,
            total_bytes: memory.total,
            used_bytes: memory.used,
            free_bytes: memory.free,
            utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
            processes: processes(&device)?,
        })
    }
}

/// The processes with a compute or a graphics context on `device`.
fn processes(device: &Device<'_>) -> Result<Vec<NvmlProcess>, NvmlError> {
    // A device that cannot list one kind (compute-only boards and graphics) lists none of it.
    let list = |result: Result<Vec<ProcessInfo>, Raw>, name| match result {
        Err(Raw::NotSupported) => Ok(Vec::new()),
        other => other.map_err(call(name)),
    };
    let compute = list(
        device.running_compute_processes(),
        "nvmlDeviceGetComputeRunningProcesses_v3",
    )?;
    let graphics = list(
        device.running_graphics_processes(),
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
    )?;
    Ok(merge_processes(compute.into_iter().chain(graphics)))
}

/// One entry per pid (a process with both a compute and a graphics context is listed twice,
/// with the same figure: the larger is kept), at most [`MAX_PROCESSES`], by pid.
fn merge_processes(infos: impl IntoIterator<Item = ProcessInfo>) -> Vec<NvmlProcess> {
    let mut by_pid: BTreeMap<u32, Option<u64>> = BTreeMap::new();
    for info in infos {
        let used = match info.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        };
        let slot = by_pid.entry(info.pid).or_default();
        *slot = (*slot).max(used);
    }
    by_pid
        .into_iter()
        .take(MAX_PROCESSES)
        .map(|(pid, used_bytes)| NvmlProcess { pid, used_bytes })
        .collect()
}

impl NvmlDevice {
    /// The key the ioctl figures use for this device: its minor number (`N` of
    /// `/dev/nvidiaN`), or NVML's index when the minor number is unknown (which then may
    /// not match the ioctl figures' device).
    pub fn key(&self) -> u32 {
        self.minor.unwrap_or(self.index)
    }

    /// The sum of the per-process figures; None when NVML cannot say for one of them (a
    /// partial sum would look like a real difference).
    pub fn processes_bytes(&self) -> Option<u64> {
        self.processes
            .iter()
            .try_fold(0u64, |sum, p| Some(sum.saturating_add(p.used_bytes?)))
    }
}

impl NvmlSnapshot {
    /// The device with key `key` (see [`NvmlDevice::key`]).
    pub fn device(&self, key: u32) -> Option<&NvmlDevice> {
        self.devices.iter().find(|d| d.key() == key)
    }

    /// The device with the most free memory (the first of equals).
    pub fn most_free(&self) -> Option<&NvmlDevice> {
        self.devices.iter().rev().max_by_key(|d| d.free_bytes)
    }
}

/// What NVML says `pid` holds, per device it is listed on: (device key, bytes; None when
/// NVML cannot say).
pub fn process_vram(snapshot: &NvmlSnapshot, pid: u32) -> Vec<(u32, Option<u64>)> {
    snapshot
        .devices
        .iter()
        .filter_map(|d| {
            let process = d.processes.iter().find(|p| p.pid == pid)?;
            Some((d.key(), process.used_bytes))
        })
        .collect()
}

/// One device's NVML figures against the ioctl figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCrossCheck {
    /// The sum of NVML's per-process figures (see [`NvmlDevice::processes_bytes`]).
    pub nvml_processes_bytes: Option<u64>,
    /// NVML's device `used` minus the ioctl figures' sum for the device: memory the probes
    /// did not see allocated (the driver's own, other paths), or negative when they count
    /// more than NVML.
    pub nvml_minus_ioctl_bytes: i64,
    /// NVML's per-process sum minus the ioctl sum; None without the per-process sum.
    pub nvml_processes_minus_ioctl_bytes: Option<i64>,
}

/// Cross-checks `device` against `ioctl_bytes`, the live VRAM the ioctl figures give all
/// processes on that device.
pub fn device_difference(device: &NvmlDevice, ioctl_bytes: u64) -> DeviceCrossCheck {
    let nvml_processes_bytes = device.processes_bytes();
    DeviceCrossCheck {
        nvml_processes_bytes,
        nvml_minus_ioctl_bytes: difference(device.used_bytes, ioctl_bytes),
        nvml_processes_minus_ioctl_bytes: nvml_processes_bytes
            .map(|nvml| difference(nvml, ioctl_bytes)),
    }
}

/// `nvml − ioctl`, signed (clamped to the range of i64); also the per-process cross-check.
pub fn difference(nvml: u64, ioctl: u64) -> i64 {
    let d = i128::from(nvml) - i128::from(ioctl);
    d.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn info(pid: u32, used: Option<u64>) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory: used.map_or(UsedGpuMemory::Unavailable, UsedGpuMemory::Used),
            gpu_instance_id: None,
            compute_instance_id: None,
        }
    }

    fn device(
        index: u32,
        minor: Option<u32>,
        free: u64,
        processes: &[(u32, Option<u64>)],
    ) -> NvmlDevice {
        NvmlDevice {
            index,
            minor,
            name: format!("GPU {index}"),
            uuid: format!("GPU-{index}"),
            total_bytes: 24 * GIB,
            used_bytes: 24 * GIB - free,
            free_bytes: free,
            utilization_percent: Some(50),
            processes: processes
                .iter()
                .map(|&(pid, used_bytes)| NvmlProcess { pid, used_bytes })
                .collect(),
        }
    }

    fn snapshot(devices: Vec<NvmlDevice>) -> NvmlSnapshot {
        NvmlSnapshot {
            driver_version: Some("550.54.15".into()),
            devices,
            device_errors: Vec::new(),
        }
    }

    #[test]
    fn compute_and_graphics_lists_merge_by_pid() {
        let compute = [info(10, Some(100)), info(20, None)];
        let graphics = [
            info(10, Some(100)),
            info(5, Some(7)),
            info(20, Some(3)),
            info(30, None),
        ];
        let merged = merge_processes(compute.into_iter().chain(graphics));
        let pairs: Vec<(u32, Option<u64>)> = merged.iter().map(|p| (p.pid, p.used_bytes)).collect();
        assert_eq!(
            pairs,
            [(5, Some(7)), (10, Some(100)), (20, Some(3)), (30, None)]
        );
    }

    #[test]
    fn process_lists_are_bounded_to_the_lowest_pids() {
        let merged = merge_processes((0..5000).rev().map(|pid| info(pid, Some(1))));
        assert_eq!(merged.len(), MAX_PROCESSES);
        assert_eq!(merged.first().map(|p| p.pid), Some(0));
        assert_eq!(merged.last().map(|p| p.pid), Some(MAX_PROCESSES as u32 - 1));
    }

    #[test]
    fn devices_are_keyed_by_minor_number_else_index() {
        let s = snapshot(vec![
            device(0, Some(3), GIB, &[]),
            device(1, None, GIB, &[]),
        ]);
        assert_eq!(s.devices[0].key(), 3);
        assert_eq!(s.devices[1].key(), 1);
        assert_eq!(s.device(3).map(|d| d.index), Some(0));
        assert_eq!(s.device(0), None, "index 0 has minor 3");
    }

    #[test]
    fn a_process_figure_per_device_it_is_on() {
        let s = snapshot(vec![
            device(0, Some(0), GIB, &[(42, Some(5 * GIB)), (43, Some(GIB))]),
            device(1, Some(1), GIB, &[(43, None)]),
        ]);
        assert_eq!(process_vram(&s, 42), [(0, Some(5 * GIB))]);
        assert_eq!(process_vram(&s, 43), [(0, Some(GIB)), (1, None)]);
        assert_eq!(process_vram(&s, 44), []);
    }

    #[test]
    fn device_cross_check_against_the_ioctl_sum() {
        // 24 GiB total, 2 GiB free: 22 GiB used; processes 5 + 1 GiB.
        let d = device(0, Some(0), 2 * GIB, &[(42, Some(5 * GIB)), (43, Some(GIB))]);
        let check = device_difference(&d, 7 * GIB);
        assert_eq!(
            check,
            DeviceCrossCheck {
                nvml_processes_bytes: Some(6 * GIB),
                nvml_minus_ioctl_bytes: 15 * GIB as i64,
                nvml_processes_minus_ioctl_bytes: Some(-(GIB as i64)),
            }
        );
        let unknown = device(0, Some(0), 2 * GIB, &[(42, Some(5 * GIB)), (43, None)]);
        let check = device_difference(&unknown, 5 * GIB);
        assert_eq!(check.nvml_processes_bytes, None, "no partial sums");
        assert_eq!(check.nvml_processes_minus_ioctl_bytes, None);
        assert_eq!(check.nvml_minus_ioctl_bytes, 17 * GIB as i64);
        assert_eq!(device(0, None, GIB, &[]).processes_bytes(), Some(0));
    }

    #[test]
    fn differences_are_signed_and_clamped() {
        assert_eq!(difference(3, 5), -2);
        assert_eq!(difference(u64::MAX, 0), i64::MAX);
        assert_eq!(difference(0, u64::MAX), i64::MIN);
    }

    #[test]
    fn the_device_with_the_most_free_memory_first_of_equals() {
        let s = snapshot(vec![
            device(0, Some(0), GIB, &[]),
            device(1, Some(1), 3 * GIB, &[]),
            device(2, Some(2), 3 * GIB, &[]),
        ]);
        assert_eq!(s.most_free().map(|d| d.index), Some(1));
        assert_eq!(snapshot(Vec::new()).most_free(), None);
    }

    #[test]
    fn host_states_get_clear_messages() {
        let message = |raw| NvmlError::from_raw("nvmlInit_v2", raw).to_string();
        assert_eq!(
            message(Raw::DriverNotLoaded),
            "libnvidia-ml is installed but the NVIDIA kernel driver is not loaded"
        );
        assert!(message(Raw::LibRmVersionMismatch).contains("different versions"));
        assert_eq!(
            message(Raw::NoPermission),
            "no permission to query the NVIDIA driver through NVML (nvmlInit_v2)"
        );
        assert_eq!(
            message(Raw::FailedToLoadSymbol("undefined symbol".into())),
            "libnvidia-ml has no nvmlInit_v2 (older than the NVML API infermem uses): undefined symbol"
        );
        assert_eq!(
            message(Raw::GpuLost),
            "NVML nvmlInit_v2: device fell off the bus or has otherwise become inacessible"
        );
    }

    /// Real: the loader is asked for a library that does not exist.
    #[test]
    fn a_missing_library_is_no_nvidia_gpu_or_driver() {
        let err = Nvml::open_library("/nonexistent/libnvidia-ml.so.1").err();
        let Some(NvmlError::NoLibrary(detail)) = &err else {
            panic!("expected NoLibrary, got {err:?}");
        };
        assert!(
            detail.contains("/nonexistent/libnvidia-ml.so.1"),
            "{detail}"
        );
        let message = err.unwrap().to_string();
        assert!(
            message.starts_with("no NVIDIA GPU or driver: libnvidia-ml cannot be loaded ("),
            "{message}"
        );
    }

    /// Real: `Nvml::open` on this host says "no library" exactly when the dynamic loader
    /// cannot load libnvidia-ml (the case on hosts without an NVIDIA driver, as in CI).
    #[test]
    fn open_reports_the_state_of_this_host() {
        // SAFETY: dlopen with a NUL-terminated name; the handle, if any, is closed at once.
        let loadable = unsafe {
            let handle = libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_LAZY);
            !handle.is_null() && libc::dlclose(handle) == 0
        };
        match Nvml::open() {
            Err(NvmlError::NoLibrary(detail)) => {
                assert!(
                    !loadable,
                    "the loader finds libnvidia-ml, NVML says {detail}"
                );
                assert!(detail.contains("libnvidia-ml.so.1"), "{detail}");
            }
            Err(other) => assert!(loadable, "{other}"),
            Ok(nvml) => {
                assert!(loadable);
                nvml.snapshot().expect("a snapshot once NVML is open");
            }
        }
    }
}

//! The agent's GPU view: the driver found, the RM objects decoded from the probes' records,
//! and the latest NVML reading; what `inspect`, `ps`, `status` and the export show.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::PathBuf,
};

use infermem_common::{GpuIoctl, GpuProbeStats};

use super::{
    GpuConfig, ProcessGpu, decode,
    layout::{self, DriverVersion, Layout},
    nvml::{self, Nvml, NvmlSnapshot},
    objects::{GpuCounters, GpuObjects},
};

/// What the agent knows about the NVIDIA driver.
#[derive(Debug, Clone)]
pub enum Driver {
    /// No NVIDIA driver is loaded: a normal state on most hosts.
    Absent,
    /// A driver version with a layout table: its ioctls are decoded.
    Decoding {
        version: DriverVersion,
        layout: &'static Layout,
    },
    /// A version with no table, or one that could not be read: reported, never guessed.
    Unknown { version: String, why: String },
}

impl Driver {
    /// The driver as configured: an explicit version, or the loaded module's.
    pub fn detect(config: &GpuConfig) -> Driver {
        let version = if config.driver_version == "auto" {
            match layout::read_driver_version(&PathBuf::from(layout::DRIVER_VERSION_PATH)) {
                Ok(Some(v)) => v,
                Ok(None) => return Driver::Absent,
                Err(e) => return unknown(layout::DRIVER_VERSION_PATH, e),
            }
        } else {
            match DriverVersion::parse(&config.driver_version) {
                Ok(v) => v,
                Err(e) => return unknown(&config.driver_version, e),
            }
        };
        match layout::layout_for(&version) {
            Ok(layout) => Driver::Decoding { version, layout },
            Err(e) => unknown(&version.to_string(), e),
        }
    }
}

fn unknown(version: &str, why: impl std::fmt::Display) -> Driver {
    Driver::Unknown {
        version: version.to_owned(),
        why: why.to_string(),
    }
}

/// Exits remembered so that records of a process read after its exit are ignored.
const REMEMBERED_EXITS: usize = 4096;

/// The agent's GPU state.
pub struct GpuState {
    pub driver: Driver,
    objects: GpuObjects,
    /// Processes whose NVIDIA fds were open before the agent started: their earlier
    /// allocations were not seen.
    partial: HashSet<u32>,
    /// Exit times (CLOCK_MONOTONIC ns) of recently exited processes.
    exits: HashMap<u32, u64>,
    /// The processes of `exits`, oldest first (the first forgotten when it is full).
    exit_order: VecDeque<u32>,
    nvml: Result<Nvml, String>,
    pub snapshot: Option<NvmlSnapshot>,
    /// Records too short to decode, from the ring buffer.
    pub short_records: u64,
}

impl GpuState {
    /// The GPU state for `config`; NVML is opened once here.
    pub fn new(config: &GpuConfig) -> GpuState {
        let nvml = if config.nvml {
            Nvml::open().map_err(|e| e.to_string())
        } else {
            Err("NVML disabled in the configuration ([gpu] nvml = false)".to_owned())
        };
        GpuState {
            driver: Driver::detect(config),
            objects: GpuObjects::new(),
            partial: HashSet::new(),
            exits: HashMap::new(),
            exit_order: VecDeque::new(),
            nvml,
            snapshot: None,
            short_records: 0,
        }
    }

    /// Applies the probes' records, in order; records of a process that already exited (read
    /// late) are ignored.
    pub fn ingest(&mut self, records: &[GpuIoctl]) {
        let Driver::Decoding { layout, .. } = &self.driver else {
            return;
        };
        for record in records {
            if self
                .exits
                .get(&record.tgid)
                .is_some_and(|&t| record.time_ns <= t)
            {
                continue;
            }
            let call = decode::decode(layout, record);
            self.objects.apply(record.tgid, record.fd_kind, &call);
        }
    }

    /// The process exited at `time_ns`: its RM clients are gone. Called for every exit on
    /// the host, so it is O(1), and does nothing while no driver is decoded.
    pub fn process_exited(&mut self, tgid: u32, time_ns: u64) {
        if !matches!(self.driver, Driver::Decoding { .. }) {
            return;
        }
        self.objects.process_exited(tgid);
        self.partial.remove(&tgid);
        if self.exit_order.len() >= REMEMBERED_EXITS
            && let Some(oldest) = self.exit_order.pop_front()
        {
            self.exits.remove(&oldest);
        }
        if self.exits.insert(tgid, time_ns).is_none() {
            self.exit_order.push_back(tgid);
        }
    }

    /// Marks a process found holding NVIDIA fds at start.
    pub fn opened_before_start(&mut self, tgid: u32) {
        self.partial.insert(tgid);
    }

    /// Whether the process's ioctl figures miss allocations made before the agent started.
    pub fn is_partial(&self, tgid: u32) -> bool {
        self.partial.contains(&tgid)
    }

    /// Reads NVML again (when it is there).
    pub fn refresh_nvml(&mut self) {
        if let Ok(nvml) = &self.nvml {
            self.snapshot = nvml.snapshot().ok();
        }
    }

    /// Why NVML is not used, if it is not.
    pub fn nvml_error(&self) -> Option<&str> {
        self.nvml.as_ref().err().map(String::as_str)
    }

    /// The decoder's counters.
    pub fn counters(&self) -> &GpuCounters {
        self.objects.counters()
    }

    /// Live bytes per device over all processes, from the ioctls.
    pub fn device_totals(&self) -> Vec<super::objects::DeviceUsage> {
        self.objects.device_totals()
    }

    /// One process's GPU memory per device: the ioctl figures (when decoding) joined with
    /// NVML's (when present). Empty when neither knows of any.
    pub fn process_gpu(&self, pid: u32) -> Vec<ProcessGpu> {
        let decoding = matches!(self.driver, Driver::Decoding { .. });
        let mut by_device: std::collections::BTreeMap<u32, ProcessGpu> = Default::default();
        if decoding {
            for usage in self.objects.usage(pid) {
                let entry = by_device
                    .entry(usage.device)
                    .or_insert_with(|| empty(usage.device));
                entry.vram_bytes_ioctl = Some(usage.vram_bytes);
                entry.host_pinned_bytes = usage.host_pinned_bytes;
                entry.ioctl_partial = self.is_partial(pid);
            }
        }
        if let Some(snapshot) = &self.snapshot {
            for (device, bytes) in nvml::process_vram(snapshot, pid) {
                let entry = by_device.entry(device).or_insert_with(|| empty(device));
                entry.vram_bytes_nvml = bytes;
                if decoding && entry.vram_bytes_ioctl.is_none() {
                    entry.vram_bytes_ioctl = Some(0);
                    entry.ioctl_partial = self.is_partial(pid);
                }
            }
        }
        by_device.into_values().collect()
    }

    /// The probes' counters joined with the decoder's, for `status`.
    pub fn health(&self, probes: Option<GpuProbeStats>) -> GpuHealth {
        let counters = self.counters();
        GpuHealth {
            decoded: counters.decoded,
            refused: counters.refused,
            undecodable: counters.undecodable + self.short_records,
            ringbuf_drops: probes.map_or(0, |p| p.ringbuf_drops),
            unknown_classes: counters.unknown_classes.clone(),
        }
    }
}

fn empty(device: u32) -> ProcessGpu {
    ProcessGpu {
        device,
        vram_bytes_ioctl: None,
        vram_bytes_nvml: None,
        host_pinned_bytes: 0,
        ioctl_partial: false,
    }
}

/// How complete the ioctl figures are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuHealth {
    pub decoded: u64,
    pub refused: u64,
    pub undecodable: u64,
    pub ringbuf_drops: u64,
    pub unknown_classes: std::collections::BTreeMap<u32, u64>,
}

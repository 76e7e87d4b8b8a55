//! The agent's GPU stage: the probes' RM ioctl records and the exits of their processes into
//! [`GpuState`], the NVIDIA fds opened before the agent started, and NVML once a round.

use std::{collections::HashSet, path::Path, sync::MutexGuard};

use crate::{
    gpu::{fds, state::Driver, state::GpuState},
    probes::{EventDetail, EventReader, KernelEvent},
};

use super::Agent;

impl Agent {
    /// The GPU state, locked (after the registry, if both are needed; never hold it while
    /// taking the registry).
    pub fn gpu(&self) -> MutexGuard<'_, GpuState> {
        self.gpu
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Finds the NVIDIA fds opened before the probes were attached and hands them to the
    /// probes; their processes' earlier allocations were not seen, which their figures say.
    /// Nothing to do without an NVIDIA driver.
    pub fn seed_nvidia_fds(&self) {
        if matches!(self.gpu().driver, Driver::Absent) {
            return;
        }
        let Some(mut probes) = self.probes() else {
            return;
        };
        let check = self.settings().gpu.fd_check;
        let found = fds::scan(Path::new("/proc"), check);
        let mut gpu = self.gpu();
        for fd in &found {
            match probes.nvidia().add_fd(fd.tgid, fd.fd, fd.kind) {
                Ok(()) => gpu.opened_before_start(fd.tgid),
                Err(err) => tracing::warn!("NVIDIA fd {} of pid {}: {err}", fd.fd, fd.tgid),
            }
        }
        tracing::info!("{} NVIDIA fds open before the agent started", found.len());
    }

    /// Applies the waiting RM ioctl records; call before the other events are drained (a
    /// process's ioctls come before its exit).
    pub(super) fn ingest_gpu(&self, reader: &mut EventReader) {
        let (records, short) = reader.drain_gpu();
        if records.is_empty() && short == 0 {
            return;
        }
        let mut gpu = self.gpu();
        gpu.short_records += short as u64;
        gpu.ingest(&records);
    }

    /// Releases the GPU memory of the processes that exited, and their NVIDIA fds in the
    /// probes' map.
    pub(super) fn gpu_exits(&self, events: &[KernelEvent]) {
        let exits: Vec<&KernelEvent> = events
            .iter()
            .filter(|e| matches!(e.detail, EventDetail::Exit { .. }))
            .collect();
        if exits.is_empty() {
            return;
        }
        {
            let mut gpu = self.gpu();
            for exit in &exits {
                gpu.process_exited(exit.tgid, exit.time_ns);
            }
        }
        let exited: HashSet<u32> = exits.iter().map(|e| e.tgid).collect();
        if let Some(mut probes) = self.probes() {
            probes.nvidia().forget_processes(&exited);
        }
    }

    /// Reads NVML again, when it is there.
    pub fn refresh_gpu(&self) {
        self.gpu().refresh_nvml();
    }
}

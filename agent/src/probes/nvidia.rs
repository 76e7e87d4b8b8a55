//! The NVIDIA probes' maps, from userspace: the NVIDIA fds of every process, the RM ioctl
//! records, and the probes' health counters.

use std::io;

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use infermem_common::{GpuIoctl, GpuProbeStats, NvidiaFdKey};

/// Typed handles on the NVIDIA probes' maps.
pub struct NvidiaMaps {
    pub(super) fds: HashMap<MapData, NvidiaFdKey, u32>,
    pub(super) stats: PerCpuArray<MapData, GpuProbeStats>,
}

impl NvidiaMaps {
    /// Records that `tgid` holds NVIDIA fd `fd` of [`infermem_common::nvidia_fd`] kind `kind`
    /// (for fds opened before the probes were attached, found in `/proc`).
    pub fn add_fd(&mut self, tgid: u32, fd: u32, kind: u32) -> io::Result<()> {
        self.fds
            .insert(NvidiaFdKey { tgid, fd }, kind, 0)
            .map_err(io::Error::other)
    }

    /// Drops every NVIDIA fd of the processes in `tgids` (they exited); returns how many
    /// there were. One pass over the map, which holds only NVIDIA fds.
    pub fn forget_processes(&mut self, tgids: &std::collections::HashSet<u32>) -> usize {
        let keys: Vec<NvidiaFdKey> = self
            .fds
            .keys()
            .flatten()
            .filter(|k| tgids.contains(&k.tgid))
            .collect();
        keys.iter().filter(|k| self.fds.remove(k).is_ok()).count()
    }

    /// The NVIDIA fds of `tgid`, with their kinds.
    pub fn fds_of(&self, tgid: u32) -> Vec<(u32, u32)> {
        self.fds
            .iter()
            .flatten()
            .filter(|(k, _)| k.tgid == tgid)
            .map(|(k, kind)| (k.fd, kind))
            .collect()
    }

    /// The probes' health counters, summed over CPUs.
    pub fn stats(&self) -> GpuProbeStats {
        let Ok(per_cpu) = self.stats.get(&0, 0) else {
            return GpuProbeStats::default();
        };
        per_cpu
            .iter()
            .fold(GpuProbeStats::default(), |s, c| GpuProbeStats {
                ioctls: s.ioctls + c.ioctls,
                sent: s.sent + c.sent,
                ringbuf_drops: s.ringbuf_drops + c.ringbuf_drops,
                read_failures: s.read_failures + c.read_failures,
                fds_opened: s.fds_opened + c.fds_opened,
                fds_closed: s.fds_closed + c.fds_closed,
                map_drops: s.map_drops + c.map_drops,
            })
    }
}

/// Decodes one [`GpuIoctl`] record read from the ring buffer; None if it is too short.
pub fn decode_record(bytes: &[u8]) -> Option<GpuIoctl> {
    if bytes.len() < std::mem::size_of::<GpuIoctl>() {
        return None;
    }
    // SAFETY: the length is checked; GpuIoctl is plain integers and byte arrays, valid for any
    // bit pattern; read_unaligned makes no alignment assumption.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<GpuIoctl>()) })
}

/// Takes every waiting record off the GPU ring buffer; too-short records are counted.
pub fn drain(ring: &mut RingBuf<MapData>) -> (Vec<GpuIoctl>, usize) {
    let mut records = Vec::new();
    let mut bad = 0;
    while let Some(item) = ring.next() {
        match decode_record(&item) {
            Some(record) => records.push(record),
            None => bad += 1,
        }
    }
    (records, bad)
}

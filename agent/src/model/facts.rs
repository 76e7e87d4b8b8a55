//! What the model analysis needs to know about a process ([`ProcessFacts`]), gathered from
//! its tracked state (what the probes saw) and from /proc.

use infermem_common::LARGE_MAPPING_BYTES;

use super::{
    analysis::{AnonBlock, BlockSource, ProcessFacts},
    discovery,
};
use crate::{
    collect::{
        maps::{self, Vma, VmaKind},
        process::{self, ProcessIdentity},
    },
    state::{AllocationKind, Origin, ProcessState},
};

/// What the model analysis needs: every mapped file (libraries name runtimes), the files the
/// probes saw mapped, open files, and the large anonymous blocks (candidate KV caches).
pub fn process_facts(
    state: &ProcessState,
    identity: &ProcessIdentity,
    vmas: &[Vma],
) -> ProcessFacts {
    let probe_blocks = state
        .live_allocations()
        .filter(|a| a.origin == Origin::Probe)
        .map(|a| AnonBlock {
            address: a.addr,
            bytes: a.bytes,
            source: match a.kind {
                AllocationKind::Mmap => BlockSource::ProbeMmap,
                AllocationKind::Brk => BlockSource::ProbeBrk,
                AllocationKind::Mremap => BlockSource::ProbeMremap,
            },
            resident_bytes: None,
        });
    let proc_blocks = vmas
        .iter()
        .filter(|v| {
            matches!(v.kind, VmaKind::Anonymous | VmaKind::Heap) && v.size() >= LARGE_MAPPING_BYTES
        })
        .map(|v| AnonBlock {
            address: v.start,
            bytes: v.size(),
            source: BlockSource::ProcMaps,
            resident_bytes: None,
        });
    ProcessFacts {
        pid: identity.pid,
        exe: identity.exe.clone(),
        cmdline: identity.cmdline.clone(),
        environ: process::environ(identity.pid),
        mapped_files: maps::mapped_files(vmas, 0)
            .into_iter()
            .map(|f| (f.path, f.resident))
            .collect(),
        mmap_event_files: state
            .file_mappings
            .values()
            .filter(|m| m.origin == Origin::Probe)
            .filter_map(|m| m.path.clone())
            .collect(),
        open_files: discovery::open_files(identity.pid),
        anon_blocks: probe_blocks.chain(proc_blocks).collect(),
    }
}

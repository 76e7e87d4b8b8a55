//! What infermem knows about one process, built from procfs and updated from kernel events.
//!
//! [`ProcessState`] is a plain library type: `inspect` builds one for a few seconds, and the
//! daemon will keep one per tracked process, feeding it every event the probes send.

use std::{collections::BTreeMap, collections::VecDeque, path::PathBuf};

use infermem_common::LARGE_MAPPING_BYTES;

use crate::{
    collect::{
        maps::{Vma, VmaKind},
        process::ProcessIdentity,
    },
    probes::{EventDetail, KernelEvent, OomVictim},
};

/// How many recent large anonymous allocations a process keeps (oldest are dropped).
pub const MAX_RECENT_ALLOCATIONS: usize = 256;

/// Where a piece of state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from /proc.
    Procfs,
    /// Seen by the kernel probes as it happened.
    Probe,
}

/// A large file mapping (a candidate model file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMapping {
    pub start: u64,
    pub end: u64,
    /// The file; None until resolved (the probes see an fd, not a path).
    pub path: Option<PathBuf>,
    /// Offset into the file, in bytes.
    pub offset: u64,
    pub origin: Origin,
}

/// How a large anonymous allocation was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocationKind {
    Mmap,
    Brk,
    Mremap,
}

/// A large anonymous allocation (a candidate KV cache or compute buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub kind: AllocationKind,
    pub addr: u64,
    /// Bytes added to the address space.
    pub bytes: u64,
    pub time_ns: u64,
    /// Whether it has since been unmapped.
    pub freed: bool,
    pub origin: Origin,
}

/// Everything known about one process.
#[derive(Debug, Clone)]
pub struct ProcessState {
    pub identity: ProcessIdentity,
    /// Large file mappings by start address.
    pub file_mappings: BTreeMap<u64, FileMapping>,
    /// Recent large anonymous allocations, oldest first.
    pub allocations: VecDeque<Allocation>,
    /// Set when the OOM killer chose this process.
    pub oom_kill: Option<OomVictim>,
    /// Programs (their comm) the process exec'd into while tracked, oldest first. An exec
    /// keeps the process (same pid and start time) but replaces its address space.
    pub execs: Vec<String>,
    /// Set when the process exited.
    pub ended: Option<ProcessEnd>,
}

/// How a tracked process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEnd {
    Exited,
}

impl ProcessState {
    /// A state with nothing known beyond the identity.
    pub fn new(identity: ProcessIdentity) -> Self {
        ProcessState {
            identity,
            file_mappings: BTreeMap::new(),
            allocations: VecDeque::new(),
            oom_kill: None,
            execs: Vec::new(),
            ended: None,
        }
    }

    /// Records the large file mappings and large anonymous areas listed in `/proc/<pid>/maps`.
    /// Anonymous areas are only a lower bound on allocations: the kernel merges neighbours.
    pub fn seed_from_vmas(&mut self, vmas: &[Vma]) {
        for vma in vmas.iter().filter(|v| v.size() >= LARGE_MAPPING_BYTES) {
            match &vma.kind {
                VmaKind::File { path, .. } => {
                    self.file_mappings.insert(
                        vma.start,
                        FileMapping {
                            start: vma.start,
                            end: vma.end,
                            path: Some(path.clone()),
                            offset: vma.offset,
                            origin: Origin::Procfs,
                        },
                    );
                }
                VmaKind::Anonymous | VmaKind::Heap => self.push_allocation(Allocation {
                    kind: if vma.kind == VmaKind::Heap {
                        AllocationKind::Brk
                    } else {
                        AllocationKind::Mmap
                    },
                    addr: vma.start,
                    bytes: vma.size(),
                    time_ns: 0,
                    freed: false,
                    origin: Origin::Procfs,
                }),
                _ => {}
            }
        }
    }

    /// Applies one kernel event about this process.
    pub fn apply(&mut self, event: &KernelEvent) {
        if event.tgid != self.identity.pid || !self.same_start(event) {
            return;
        }
        match &event.detail {
            EventDetail::Mmap {
                addr,
                len,
                fd,
                pgoff,
                ..
            } => match fd {
                Some(_) => {
                    self.remove_file_range(*addr, addr + len);
                    self.file_mappings.insert(
                        *addr,
                        FileMapping {
                            start: *addr,
                            end: addr + len,
                            path: None,
                            offset: pgoff.saturating_mul(crate::probes::events::page_size()),
                            origin: Origin::Probe,
                        },
                    );
                }
                None => self.push_allocation(Allocation {
                    kind: AllocationKind::Mmap,
                    addr: *addr,
                    bytes: *len,
                    time_ns: event.time_ns,
                    freed: false,
                    origin: Origin::Probe,
                }),
            },
            EventDetail::Munmap { addr, len } => {
                self.remove_file_range(*addr, addr + len);
                for allocation in &mut self.allocations {
                    if allocation.addr >= *addr && allocation.addr < addr + len {
                        allocation.freed = true;
                    }
                }
            }
            EventDetail::Mremap {
                old_addr,
                old_len,
                new_addr,
                new_len,
            } => {
                if let Some(mut mapping) = self.file_mappings.remove(old_addr) {
                    mapping.start = *new_addr;
                    mapping.end = new_addr + new_len;
                    self.file_mappings.insert(*new_addr, mapping);
                } else if new_len > old_len {
                    self.push_allocation(Allocation {
                        kind: AllocationKind::Mremap,
                        addr: *new_addr,
                        bytes: new_len - old_len,
                        time_ns: event.time_ns,
                        freed: false,
                        origin: Origin::Probe,
                    });
                }
            }
            EventDetail::Brk { old_brk, new_brk } if new_brk > old_brk => {
                self.push_allocation(Allocation {
                    kind: AllocationKind::Brk,
                    addr: *old_brk,
                    bytes: new_brk - old_brk,
                    time_ns: event.time_ns,
                    freed: false,
                    origin: Origin::Probe,
                })
            }
            EventDetail::Brk { .. } | EventDetail::Fork { .. } => {}
            EventDetail::Exec(process) => {
                // The old program's mappings and allocations are gone with its address space.
                self.file_mappings.clear();
                self.allocations.clear();
                self.execs.push(process.comm.clone());
            }
            EventDetail::Exit { .. } => self.ended = Some(ProcessEnd::Exited),
            EventDetail::OomVictim(victim) => self.oom_kill = Some(victim.clone()),
        }
    }

    /// Fills in paths of mappings the probes saw, from a fresh read of `/proc/<pid>/maps`.
    pub fn resolve_paths(&mut self, vmas: &[Vma]) {
        for mapping in self.file_mappings.values_mut().filter(|m| m.path.is_none()) {
            mapping.path = vmas
                .iter()
                .find(|v| v.start <= mapping.start && mapping.start < v.end)
                .and_then(|v| v.file().map(PathBuf::from));
        }
    }

    /// Allocations still mapped, newest first.
    pub fn live_allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.iter().rev().filter(|a| !a.freed)
    }

    fn push_allocation(&mut self, allocation: Allocation) {
        if self.allocations.len() == MAX_RECENT_ALLOCATIONS {
            self.allocations.pop_front();
        }
        self.allocations.push_back(allocation);
    }

    /// False for an exec or exit of another process that reuses the pid (its start time
    /// differs); events without a start time are taken as ours.
    fn same_start(&self, event: &KernelEvent) -> bool {
        let start = match &event.detail {
            EventDetail::Exec(process) | EventDetail::Exit { process, .. } => process.start_time,
            _ => None,
        };
        start.is_none_or(|start| start == self.identity.start_time)
    }

    fn remove_file_range(&mut self, start: u64, end: u64) {
        self.file_mappings
            .retain(|_, m| m.end <= start || m.start >= end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::ProcessInfo;

    fn state() -> ProcessState {
        ProcessState::new(ProcessIdentity {
            pid: 10,
            start_time: 1,
            comm: "llama-server".into(),
            cmdline: vec![],
            exe: None,
        })
    }

    fn process_info(start_time: Option<u64>) -> ProcessInfo {
        ProcessInfo {
            comm: "llama-server".into(),
            start_time,
            memcg_id: None,
        }
    }

    fn exit(start_time: Option<u64>) -> KernelEvent {
        event(EventDetail::Exit {
            process: process_info(start_time),
            had_file_mappings: false,
        })
    }

    fn event(detail: EventDetail) -> KernelEvent {
        KernelEvent {
            tgid: 10,
            time_ns: 5,
            detail,
        }
    }

    /// A read-only private mapping of a file.
    fn file_mmap(addr: u64, len: u64) -> KernelEvent {
        event(EventDetail::Mmap {
            addr,
            len,
            prot: 1,
            flags: 2,
            fd: Some(3),
            pgoff: 0,
        })
    }

    #[test]
    fn tracks_mappings_and_allocations_through_events() {
        let mut s = state();
        s.apply(&file_mmap(0x1000_0000, 64 << 20));
        s.apply(&event(EventDetail::Mmap {
            addr: 0x8000_0000,
            len: 32 << 20,
            prot: 3,
            flags: 0x22,
            fd: None,
            pgoff: 0,
        }));
        assert_eq!(s.file_mappings.len(), 1);
        assert_eq!(s.live_allocations().count(), 1);

        s.apply(&event(EventDetail::Munmap {
            addr: 0x8000_0000,
            len: 32 << 20,
        }));
        assert_eq!(s.live_allocations().count(), 0);
        s.apply(&event(EventDetail::Munmap {
            addr: 0x1000_0000,
            len: 64 << 20,
        }));
        assert!(s.file_mappings.is_empty());

        // Events about other processes are ignored, a reused pid (other start time) too.
        let mut other = exit(Some(1));
        other.tgid = 11;
        s.apply(&other);
        s.apply(&exit(Some(2)));
        assert_eq!(s.ended, None);
        s.apply(&exit(Some(1)));
        assert_eq!(s.ended, Some(ProcessEnd::Exited));
    }

    #[test]
    fn an_exec_is_not_an_exit_and_forgets_the_old_address_space() {
        let mut s = state();
        s.apply(&file_mmap(0x1000_0000, 64 << 20));
        s.apply(&event(EventDetail::Brk {
            old_brk: 0,
            new_brk: 4 << 20,
        }));
        s.apply(&event(EventDetail::Exec(process_info(Some(1)))));
        assert_eq!(s.ended, None);
        assert_eq!(s.execs, ["llama-server"]);
        assert!(s.file_mappings.is_empty());
        assert_eq!(s.allocations.len(), 0);
        // The new program's mappings are tracked as usual.
        s.apply(&file_mmap(0x2000_0000, 8 << 20));
        assert_eq!(s.file_mappings.len(), 1);
    }

    #[test]
    fn keeps_a_bounded_history() {
        let mut s = state();
        for i in 0..(MAX_RECENT_ALLOCATIONS as u64 + 10) {
            s.apply(&event(EventDetail::Brk {
                old_brk: i << 21,
                new_brk: (i + 1) << 21,
            }));
        }
        assert_eq!(s.allocations.len(), MAX_RECENT_ALLOCATIONS);
        assert_eq!(s.allocations[0].addr, 10 << 21);
    }
}

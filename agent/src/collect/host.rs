//! Host-wide memory: `/proc/meminfo` (through `procfs::Meminfo`) and the paging and OOM
//! counters of `/proc/vmstat` (which the `procfs` crate only reads as a whole map from the
//! live file, so it is parsed here).

use std::path::Path;

use procfs::FromBufRead as _;
use serde::Serialize;

use super::{keyed_u64, read_small};

/// What `/proc/meminfo` says, in bytes; a field this kernel lacks is None.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostMemory {
    pub total_bytes: u64,
    /// The kernel's estimate of what can be allocated without swapping. It counts clean file
    /// pages, mmapped model weights included, as reclaimable.
    pub available_bytes: Option<u64>,
    pub free_bytes: u64,
    pub cached_bytes: u64,
    pub buffers_bytes: u64,
    pub active_file_bytes: Option<u64>,
    pub inactive_file_bytes: Option<u64>,
    pub shmem_bytes: Option<u64>,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    pub mlocked_bytes: Option<u64>,
    pub unevictable_bytes: Option<u64>,
}

/// Parses the text of `/proc/meminfo`; None if a field every kernel has is missing.
pub fn parse_meminfo(text: &str) -> Option<HostMemory> {
    let m = procfs::Meminfo::from_buf_read(text.as_bytes()).ok()?;
    Some(HostMemory {
        total_bytes: m.mem_total,
        available_bytes: m.mem_available,
        free_bytes: m.mem_free,
        cached_bytes: m.cached,
        buffers_bytes: m.buffers,
        active_file_bytes: m.active_file,
        inactive_file_bytes: m.inactive_file,
        shmem_bytes: m.shmem,
        swap_total_bytes: m.swap_total,
        swap_free_bytes: m.swap_free,
        mlocked_bytes: m.mlocked,
        unevictable_bytes: m.unevictable,
    })
}

/// Reads `/proc/meminfo`.
pub fn read_meminfo() -> Option<HostMemory> {
    parse_meminfo(&read_small(Path::new("/proc/meminfo"))?)
}

/// Cumulative counters of `/proc/vmstat` (pages or events since boot); None if absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VmCounters {
    /// Pages swapped in and out.
    pub pswpin: Option<u64>,
    pub pswpout: Option<u64>,
    /// Pages faulted back in soon after being reclaimed (Linux 5.9+; `workingset_refault`
    /// alone before, which is read as the file count).
    pub workingset_refault_anon: Option<u64>,
    pub workingset_refault_file: Option<u64>,
    /// Major page faults (the page had to be read from disk or swap).
    pub pgmajfault: Option<u64>,
    /// OOM kills (Linux 4.13+).
    pub oom_kill: Option<u64>,
}

/// Parses the text of `/proc/vmstat`.
pub fn parse_vmstat(text: &str) -> VmCounters {
    let field = |key| keyed_u64(text, key);
    VmCounters {
        pswpin: field("pswpin"),
        pswpout: field("pswpout"),
        workingset_refault_anon: field("workingset_refault_anon"),
        workingset_refault_file: field("workingset_refault_file")
            .or_else(|| field("workingset_refault")),
        pgmajfault: field("pgmajfault"),
        oom_kill: field("oom_kill"),
    }
}

/// Reads `/proc/vmstat`; None if it cannot be read.
pub fn read_vmstat() -> Option<VmCounters> {
    Some(parse_vmstat(&read_small(Path::new("/proc/vmstat"))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This project's machine's `/proc/meminfo` (Linux 6.x, no swap).
    const MEMINFO: &str = "MemTotal:       24684084 kB
MemFree:        22401324 kB
MemAvailable:   23580940 kB
Buffers:            8556 kB
Cached:          1823732 kB
SwapCached:            0 kB
Active:           780520 kB
Inactive:        1056300 kB
Active(anon):       1524 kB
Inactive(anon):    11880 kB
Active(file):     382368 kB
Inactive(file):   895008 kB
Unevictable:        1024 kB
Mlocked:               0 kB
SwapTotal:             0 kB
SwapFree:              0 kB
Zswap:                 0 kB
Zswapped:              0 kB
Dirty:            115596 kB
Writeback:             0 kB
AnonPages:         17476 kB
Mapped:            15772 kB
Shmem:             15588 kB
KReclaimable:     228524 kB
Slab:             282352 kB
SReclaimable:     228524 kB
SUnreclaim:        53828 kB
KernelStack:        1452 kB
PageTables:         1428 kB
SecPageTables:         0 kB
NFS_Unstable:          0 kB
Bounce:                0 kB
WritebackTmp:          0 kB
CommitLimit:    12342040 kB
Committed_AS:      68584 kB
VmallocTotal:   34359738367 kB
VmallocUsed:       14236 kB
VmallocChunk:          0 kB
Percpu:              712 kB
AnonHugePages:         0 kB
ShmemHugePages:        0 kB
ShmemPmdMapped:        0 kB
FileHugePages:     12288 kB
FilePmdMapped:         0 kB
Balloon:               0 kB
HugePages_Total:       0
HugePages_Free:        0
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
DirectMap4k:       30720 kB
DirectMap2M:     2066432 kB
DirectMap1G:    25165824 kB
";

    #[test]
    fn meminfo_fields_in_bytes() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.total_bytes, 24_684_084 * 1024);
        assert_eq!(m.available_bytes, Some(23_580_940 * 1024));
        assert_eq!(m.active_file_bytes, Some(382_368 * 1024));
        assert_eq!(m.inactive_file_bytes, Some(895_008 * 1024));
        assert_eq!(m.unevictable_bytes, Some(1024 * 1024));
        assert_eq!(m.mlocked_bytes, Some(0));
        assert_eq!(m.shmem_bytes, Some(15_588 * 1024));
        assert_eq!((m.swap_total_bytes, m.swap_free_bytes), (0, 0));
    }

    #[test]
    fn meminfo_without_required_fields_is_none() {
        assert_eq!(parse_meminfo("MemAvailable: 1 kB\n"), None);
        assert_eq!(parse_meminfo("garbage"), None);
        assert_eq!(parse_meminfo(""), None);
    }

    #[test]
    fn vmstat_counters_and_old_refault_name() {
        let new = "nr_free_pages 5600331\npgmajfault 2187\npswpin 3\npswpout 7\n\
                   workingset_refault_anon 11\nworkingset_refault_file 4242\noom_kill 1\n";
        let c = parse_vmstat(new);
        assert_eq!(c.pgmajfault, Some(2187));
        assert_eq!((c.pswpin, c.pswpout), (Some(3), Some(7)));
        assert_eq!(c.workingset_refault_anon, Some(11));
        assert_eq!(c.workingset_refault_file, Some(4242));
        assert_eq!(c.oom_kill, Some(1));
        // Before 5.9 there is one `workingset_refault` (file pages), and no oom_kill before 4.13.
        let old = parse_vmstat("workingset_refault 99\npgmajfault x\n");
        assert_eq!(old.workingset_refault_file, Some(99));
        assert_eq!(
            (old.pgmajfault, old.oom_kill, old.workingset_refault_anon),
            (None, None, None)
        );
    }

    #[test]
    fn reads_this_host() {
        let m = read_meminfo().expect("/proc/meminfo");
        assert!(m.total_bytes > 0 && m.available_bytes.is_some());
        assert!(read_vmstat().expect("/proc/vmstat").pgmajfault.is_some());
    }
}

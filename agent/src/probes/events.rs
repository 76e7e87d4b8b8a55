//! Decoding the rare events the probes send on the ring buffer.

use infermem_common::{Event, EventKind, UNKNOWN_VALUE};

/// An event from the kernel probes, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEvent {
    /// The process the event is about.
    pub tgid: u32,
    /// CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
    pub detail: EventDetail,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventDetail {
    /// A mapping of at least 1 MiB was created; `fd` is None for anonymous memory.
    Mmap {
        addr: u64,
        len: u64,
        prot: u32,
        flags: u32,
        fd: Option<i32>,
        pgoff: u64,
    },
    /// At least 1 MiB was unmapped.
    Munmap { addr: u64, len: u64 },
    /// A region of at least 1 MiB was moved or resized.
    Mremap {
        old_addr: u64,
        old_len: u64,
        new_addr: u64,
        new_len: u64,
    },
    /// The heap moved by at least 1 MiB.
    Brk { old_brk: u64, new_brk: u64 },
    /// The process exec'd (sent for every process); `comm` is the new program's.
    Exec(ProcessInfo),
    /// A process with large file mappings forked `child`.
    Fork { child: u32 },
    /// The process exited, its whole thread group dead (sent for every process).
    Exit {
        process: ProcessInfo,
        /// Whether it had large file mappings (fault buckets) when it died.
        had_file_mappings: bool,
    },
    /// The OOM killer chose this process.
    OomVictim(OomVictim),
}

/// Who a process is, as the exec and exit probes saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub comm: String,
    /// Start time in clock ticks after boot, as `/proc/<pid>/stat` field 22 shows it (the
    /// probes send the thread group leader's `start_boottime` in ns; see [`ns_to_clock_ticks`]).
    /// With the pid, it names the process: a reused pid has another start time.
    pub start_time: Option<u64>,
    /// Kernfs id (directory inode) of the process's memory cgroup.
    pub memcg_id: Option<u64>,
}

/// An OOM kill as the kernel recorded it at the moment it chose the victim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomVictim {
    pub comm: String,
    /// Kernfs id (directory inode) of the victim's memory cgroup.
    pub memcg_id: Option<u64>,
    pub rss_file_bytes: Option<u64>,
    pub rss_anon_bytes: Option<u64>,
    pub rss_shmem_bytes: Option<u64>,
    pub swap_bytes: Option<u64>,
    pub oom_score_adj: Option<i16>,
}

/// Why a ring-buffer record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring-buffer record of {0} bytes, expected {size}", size = size_of::<Event>())]
    Size(usize),
    #[error("ring-buffer record of unknown kind {0}")]
    Kind(u32),
}

impl KernelEvent {
    /// Decodes one ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
        if bytes.len() < size_of::<Event>() {
            return Err(DecodeError::Size(bytes.len()));
        }
        // SAFETY: the length is checked and `Event` is plain integers; an unaligned read
        // copes with any buffer alignment.
        let raw: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = EventKind::from_u32(raw.kind).ok_or(DecodeError::Kind(raw.kind))?;
        let a = raw.args;
        let page_bytes = page_size();
        let pages = |v: u64| (v != UNKNOWN_VALUE).then(|| v.saturating_mul(page_bytes));
        let process = || ProcessInfo {
            comm: comm_string(&raw.comm),
            start_time: (a[0] != UNKNOWN_VALUE).then(|| ns_to_clock_ticks(a[0])),
            memcg_id: (a[1] != UNKNOWN_VALUE).then_some(a[1]),
        };
        let detail = match kind {
            EventKind::Mmap => EventDetail::Mmap {
                addr: a[0],
                len: a[1],
                prot: a[2] as u32,
                flags: a[3] as u32,
                fd: (a[4] != UNKNOWN_VALUE).then_some(a[4] as i32),
                pgoff: a[5],
            },
            EventKind::Munmap => EventDetail::Munmap {
                addr: a[0],
                len: a[1],
            },
            EventKind::Mremap => EventDetail::Mremap {
                old_addr: a[0],
                old_len: a[1],
                new_addr: a[2],
                new_len: a[3],
            },
            EventKind::Brk => EventDetail::Brk {
                old_brk: a[0],
                new_brk: a[1],
            },
            EventKind::Exec => EventDetail::Exec(process()),
            EventKind::Fork => EventDetail::Fork { child: a[0] as u32 },
            EventKind::Exit => EventDetail::Exit {
                process: process(),
                had_file_mappings: a[2] != 0,
            },
            EventKind::OomVictim => EventDetail::OomVictim(OomVictim {
                comm: comm_string(&raw.comm),
                memcg_id: (a[0] != UNKNOWN_VALUE).then_some(a[0]),
                rss_file_bytes: pages(a[1]),
                rss_anon_bytes: pages(a[2]),
                swap_bytes: pages(a[3]),
                rss_shmem_bytes: pages(a[4]),
                oom_score_adj: (a[5] != UNKNOWN_VALUE).then_some(a[5] as i64 as i16),
            }),
        };
        Ok(KernelEvent {
            tgid: raw.tgid,
            time_ns: raw.time_ns,
            detail,
        })
    }
}

/// A NUL-padded kernel `comm` as text.
pub fn comm_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// CLOCK_BOOTTIME nanoseconds as clock ticks (`USER_HZ`), the unit and rounding of
/// `/proc/<pid>/stat`'s start time: `ns / (NSEC_PER_SEC / USER_HZ)`.
pub fn ns_to_clock_ticks(ns: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100);
    ns / (1_000_000_000 / hz)
}

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event: &Event) -> Vec<u8> {
        // SAFETY: viewing a plain-data struct as bytes.
        unsafe {
            std::slice::from_raw_parts((event as *const Event).cast::<u8>(), size_of::<Event>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_an_oom_victim() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"hog\0");
        let event = Event {
            kind: EventKind::OomVictim as u32,
            tgid: 4242,
            time_ns: 9,
            args: [77, 1, 16384, UNKNOWN_VALUE, 0, (-500i64) as u64],
            comm,
        };
        let decoded = KernelEvent::decode(&record(&event)).unwrap();
        assert_eq!(decoded.tgid, 4242);
        let EventDetail::OomVictim(victim) = decoded.detail else {
            panic!("wrong kind");
        };
        assert_eq!(victim.comm, "hog");
        assert_eq!(victim.memcg_id, Some(77));
        assert_eq!(victim.rss_anon_bytes, Some(16384 * page_size()));
        assert_eq!(victim.swap_bytes, None);
        assert_eq!(victim.oom_score_adj, Some(-500));
    }

    #[test]
    fn decodes_an_exit_with_start_time_in_clock_ticks_and_memcg() {
        let event = Event {
            kind: EventKind::Exit as u32,
            tgid: 7,
            time_ns: 0,
            args: [12_345_678_901, 99, 1, 0, 0, 0],
            comm: *b"sh\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let EventDetail::Exit {
            process,
            had_file_mappings,
        } = KernelEvent::decode(&record(&event)).unwrap().detail
        else {
            panic!("wrong kind");
        };
        assert_eq!(process.comm, "sh");
        assert_eq!(process.start_time, Some(ns_to_clock_ticks(12_345_678_901)));
        assert_eq!(process.memcg_id, Some(99));
        assert!(had_file_mappings);
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(KernelEvent::decode(&[0; 8]), Err(DecodeError::Size(8)));
        let event = Event {
            kind: 99,
            tgid: 1,
            time_ns: 0,
            args: [0; 6],
            comm: [0; 16],
        };
        assert_eq!(
            KernelEvent::decode(&record(&event)),
            Err(DecodeError::Kind(99))
        );
    }
}

//! Collectors: what procfs and cgroupfs say about a process, a memory cgroup and the host,
//! read through the `procfs` crate where it covers the file. Each collector is a plain
//! function of a pid or a path; the inspection and, later, the daemon decide when to call
//! them. Host- and cgroup-wide files are parsed by pure functions over their text (unit-tested
//! on real samples) behind thin, bounded readers: a missing file or field is `None`.

pub mod cgroup;
pub mod host;
pub mod http;
pub mod maps;
pub mod memory;
pub mod pagemap;
pub mod pressure;
pub mod process;

use std::{
    fs::File,
    io::{self, Read as _},
    path::Path,
};

/// The most a host- or cgroup-wide counter file is read for (`/proc/vmstat` is ~5 KiB).
const MAX_COUNTER_FILE: u64 = 64 * 1024;

/// Reads at most 64 KiB of a small kernel file; None if it cannot be read or is not UTF-8.
pub(crate) fn read_small(path: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(MAX_COUNTER_FILE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The value of `key` in a flat-keyed file (`key value` per line: `/proc/vmstat`,
/// `memory.events`, `memory.oom_control`).
pub(crate) fn keyed_u64(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(key)).then(|| words.next()?.parse().ok())?
    })
}

/// Why a collector could not read a process.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The pid does not exist (or is a thread id, not a process).
    #[error("no such process: pid {0}")]
    NoSuchProcess(u32),
    /// The process exists but we may not read this file (need root or the same user).
    #[error("permission denied reading {what} of pid {pid} (run as root or as the process's user)")]
    PermissionDenied { pid: u32, what: String },
    /// The pid now belongs to a different process than the one first seen.
    #[error("pid {0} was reused by another process")]
    Reused(u32),
    /// Anything else procfs or a file read reported.
    #[error("reading {what} of pid {pid}: {message}")]
    Other {
        pid: u32,
        what: String,
        message: String,
    },
}

impl CollectError {
    /// Maps a `procfs` error for `what` of `pid` to a collector error.
    pub fn from_proc(pid: u32, what: &str, err: procfs::ProcError) -> Self {
        match err {
            procfs::ProcError::NotFound(_) => CollectError::NoSuchProcess(pid),
            procfs::ProcError::PermissionDenied(_) => CollectError::PermissionDenied {
                pid,
                what: what.to_owned(),
            },
            procfs::ProcError::Io(e, _) if e.kind() == io::ErrorKind::NotFound => {
                CollectError::NoSuchProcess(pid)
            }
            // A process that exits while we read it makes procfs return ESRCH.
            procfs::ProcError::Io(e, _) if e.raw_os_error() == Some(libc::ESRCH) => {
                CollectError::NoSuchProcess(pid)
            }
            other => CollectError::Other {
                pid,
                what: what.to_owned(),
                message: other.to_string(),
            },
        }
    }

    /// Whether the error means the process is gone.
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            CollectError::NoSuchProcess(_) | CollectError::Reused(_)
        )
    }
}

/// Opens `/proc/<pid>`.
pub(crate) fn open(pid: u32) -> Result<procfs::process::Process, CollectError> {
    let raw = i32::try_from(pid).map_err(|_| CollectError::NoSuchProcess(pid))?;
    procfs::process::Process::new(raw).map_err(|e| CollectError::from_proc(pid, "/proc entry", e))
}

//! Pinning model files in RAM: the agent maps the file read-only and shared, and mlocks the
//! mapping. The file's page-cache pages are then unevictable for as long as the pin lasts,
//! so the inference process that maps the same file stops major-faulting on its weights
//! whatever the pressure around it.
//!
//! The mapping is never read from userspace (a file truncated meanwhile would raise SIGBUS):
//! mlock faults the pages in from the kernel side, and `mincore` tells what is resident.
//! Pins are made within a budget (all pins together) and only when enough memory stays
//! available; several holders (processes, or a person) may want the same file, which stays
//! pinned until the last one lets go.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    fs::File,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    ptr::NonNull,
};

use serde::Serialize;

use crate::units::format_bytes;

/// Who wants a file pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Holder {
    /// A process (the policy pins a workload's files for as long as it runs).
    Process { pid: u32, start_time: u64 },
    /// A person (`infermem pin`).
    Manual,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Process { pid, .. } => write!(f, "pid {pid}"),
            Holder::Manual => f.write_str("manual"),
        }
    }
}

/// A file's identity: device and inode.
pub type FileId = (u64, u64);

/// Why a file was not pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not a regular file")]
    NotRegular(String),
    #[error("{path} is not the file the process maps (device {}, inode {} expected; found {}, {}): it was replaced", .expected.0, .expected.1, .found.0, .found.1)]
    Changed {
        path: String,
        expected: FileId,
        found: FileId,
    },
    #[error("{0}: an empty file")]
    Empty(String),
    #[error("pinning {} would pass the pin budget ({} pinned of {})", format_bytes(*.bytes), format_bytes(*.pinned), format_bytes(*.budget))]
    OverBudget {
        bytes: u64,
        pinned: u64,
        budget: u64,
    },
    #[error("pinning would leave {} available, under the reserve of {} ({} of the file still to read in)", format_bytes(*.left), format_bytes(*.reserve), format_bytes(*.missing))]
    NotEnoughMemory {
        left: u64,
        reserve: u64,
        missing: u64,
    },
    #[error("mmap of {path}: {source}")]
    Map {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "mlock of {path}: {source} (pinning needs CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK, `ulimit -l`)"
    )]
    Lock {
        path: String,
        source: std::io::Error,
    },
}

/// A file mapped and mlocked by this process; unlocked and unmapped when dropped.
pub struct PinnedFile {
    path: PathBuf,
    id: FileId,
    len: usize,
    addr: NonNull<libc::c_void>,
}

// SAFETY: the mapping is owned by this value alone and never dereferenced; only its address
// is passed to munlock, munmap and mincore.
unsafe impl Send for PinnedFile {}

impl PinnedFile {
    /// Maps and mlocks the file at `path`; with `expected`, only if it is that very file.
    pub fn pin(path: &Path, expected: Option<FileId>) -> Result<PinnedFile, PinError> {
        let (file, id, len) = open_checked(path, expected)?;
        map_and_lock(&file, path, id, len)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> FileId {
        self.id
    }

    pub fn bytes(&self) -> u64 {
        self.len as u64
    }

    /// Bytes of the mapping resident now.
    pub fn resident_bytes(&self) -> u64 {
        // SAFETY: addr..addr+len is this value's own live mapping.
        unsafe { resident(self.addr.as_ptr(), self.len) }
    }
}

impl Drop for PinnedFile {
    fn drop(&mut self) {
        // SAFETY: addr..addr+len is this value's own mapping, unmapped exactly once here.
        unsafe {
            libc::munlock(self.addr.as_ptr(), self.len);
            libc::munmap(self.addr.as_ptr(), self.len);
        }
    }
}

/// Opens `path` read-only, without following a symlink in its last component, and checks it
/// is a non-empty regular file (and the expected one).
fn open_checked(path: &Path, expected: Option<FileId>) -> Result<(File, FileId, usize), PinError> {
    let shown = || path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| PinError::Open {
            path: shown(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| PinError::Open {
        path: shown(),
        source,
    })?;
    if !meta.is_file() {
        return Err(PinError::NotRegular(shown()));
    }
    let found = (meta.dev(), meta.ino());
    if let Some(expected) = expected.filter(|e| *e != found) {
        return Err(PinError::Changed {
            path: shown(),
            expected,
            found,
        });
    }
    match usize::try_from(meta.len()) {
        Ok(0) => Err(PinError::Empty(shown())),
        Ok(len) => Ok((file, found, len)),
        Err(_) => Err(PinError::NotRegular(shown())),
    }
}

/// Maps all of `file` shared and read-only; the kernel picks the address.
fn map_shared(file: &File, len: usize) -> std::io::Result<*mut libc::c_void> {
    // SAFETY: a fresh mapping of an open file; nothing else refers to it yet.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(addr)
    }
}

fn map_and_lock(file: &File, path: &Path, id: FileId, len: usize) -> Result<PinnedFile, PinError> {
    let addr = map_shared(file, len).map_err(|source| PinError::Map {
        path: path.display().to_string(),
        source,
    })?;
    let pinned = PinnedFile {
        path: path.to_owned(),
        id,
        len,
        addr: NonNull::new(addr).expect("mmap does not return NULL on success"),
    };
    // SAFETY: the mapping just made; mlock faults its pages in from the kernel side.
    if unsafe { libc::mlock(addr, len) } != 0 {
        return Err(PinError::Lock {
            path: path.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(pinned)
}

/// Bytes of `addr..addr+len` resident in memory, from mincore.
///
/// # Safety
/// `addr..addr+len` must be a live mapping of the calling process.
pub unsafe fn resident(addr: *mut libc::c_void, len: usize) -> u64 {
    let page = page_size();
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: the caller vouches for the mapping; `vec` has one byte per page.
    if unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) } != 0 {
        return 0;
    }
    let count = vec.iter().filter(|b| **b & 1 == 1).count();
    (count * page).min(len) as u64
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Bytes of the file at `path` resident in the page cache now, by mapping it for a moment
/// (never reading it); None when it cannot be opened or mapped.
pub fn file_resident_bytes(path: &Path) -> Option<(u64, u64)> {
    let (file, _, len) = open_checked(path, None).ok()?;
    let addr = map_shared(&file, len).ok()?;
    // SAFETY: the mapping just made, unmapped right after mincore looked at it.
    unsafe {
        let bytes = resident(addr, len);
        libc::munmap(addr, len);
        Some((bytes, len as u64))
    }
}

/// The identity and size of the file that a process maps at `start..end`, read through
/// `/proc/<pid>/map_files` (the very file mapped, whatever its path names now).
pub fn mapped_file_id(pid: u32, start: u64, end: u64) -> Option<(FileId, u64)> {
    let link = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
    let meta = std::fs::metadata(link).ok().filter(|m| m.is_file())?;
    Some(((meta.dev(), meta.ino()), meta.len()))
}

/// A pin and who holds it.
#[derive(Debug, Clone, Serialize)]
pub struct PinStatus {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub bytes: u64,
    pub resident_bytes: u64,
    pub holders: Vec<Holder>,
}

/// What a pin did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinOutcome {
    /// Bytes of the file resident before the pin read the rest in.
    pub resident_before: u64,
    pub resident_bytes: u64,
    pub bytes: u64,
}

/// The pins of this process, within a budget and a reserve of available memory.
pub struct Pinner {
    budget: u64,
    reserve: u64,
    pins: HashMap<FileId, (PinnedFile, BTreeSet<Holder>)>,
}

impl Pinner {
    /// A pinner that pins at most `budget` bytes in all, and only while `reserve` bytes stay
    /// available (MemAvailable) after a pin.
    pub fn new(budget: u64, reserve: u64) -> Pinner {
        Pinner {
            budget,
            reserve,
            pins: HashMap::new(),
        }
    }

    /// Pins the file at `path` for `holder` (a file pinned already gains a holder).
    pub fn pin(
        &mut self,
        path: &Path,
        expected: Option<FileId>,
        holder: Holder,
    ) -> Result<PinOutcome, PinError> {
        if let Some((pinned, holders)) = expected.and_then(|id| self.pins.get_mut(&id)) {
            holders.insert(holder);
            let resident = pinned.resident_bytes();
            return Ok(PinOutcome {
                resident_before: resident,
                resident_bytes: resident,
                bytes: pinned.bytes(),
            });
        }
        let (file, id, len) = open_checked(path, expected)?;
        if let Some((pinned, holders)) = self.pins.get_mut(&id) {
            holders.insert(holder);
            let resident = pinned.resident_bytes();
            return Ok(PinOutcome {
                resident_before: resident,
                resident_bytes: resident,
                bytes: pinned.bytes(),
            });
        }
        let resident_before = file_resident_bytes(path).map_or(0, |(r, _)| r);
        self.check_room(len as u64, resident_before)?;
        let pinned = map_and_lock(&file, path, id, len)?;
        let outcome = PinOutcome {
            resident_before,
            resident_bytes: pinned.resident_bytes(),
            bytes: pinned.bytes(),
        };
        self.pins.insert(id, (pinned, BTreeSet::from([holder])));
        Ok(outcome)
    }

    /// Lets `holder` go of the file `id`: true when it held it. The file is unpinned when
    /// its last holder goes.
    pub fn unpin(&mut self, id: FileId, holder: Holder) -> bool {
        let Some((_, holders)) = self.pins.get_mut(&id) else {
            return false;
        };
        let held = holders.remove(&holder);
        if holders.is_empty() {
            self.pins.remove(&id);
        }
        held
    }

    /// The pins, with what is resident of each now.
    pub fn in_force(&self) -> Vec<PinStatus> {
        let mut pins: Vec<PinStatus> = self
            .pins
            .values()
            .map(|(pinned, holders)| PinStatus {
                path: pinned.path().to_owned(),
                dev: pinned.id().0,
                ino: pinned.id().1,
                bytes: pinned.bytes(),
                resident_bytes: pinned.resident_bytes(),
                holders: holders.iter().copied().collect(),
            })
            .collect();
        pins.sort_by(|a, b| a.path.cmp(&b.path));
        pins
    }

    /// Bytes pinned, all files together.
    pub fn pinned_bytes(&self) -> u64 {
        self.pins.values().map(|(p, _)| p.bytes()).sum()
    }

    /// Refuses a pin of `bytes` (of which `resident` are in memory already) that would pass
    /// the budget or eat into the reserve.
    fn check_room(&self, bytes: u64, resident: u64) -> Result<(), PinError> {
        let pinned = self.pinned_bytes();
        if pinned + bytes > self.budget {
            return Err(PinError::OverBudget {
                bytes,
                pinned,
                budget: self.budget,
            });
        }
        let missing = bytes.saturating_sub(resident);
        let available = mem_available().unwrap_or(0);
        let left = available.saturating_sub(missing);
        if left < self.reserve {
            return Err(PinError::NotEnoughMemory {
                left,
                reserve: self.reserve,
                missing,
            });
        }
        Ok(())
    }
}

/// MemAvailable, in bytes.
fn mem_available() -> Option<u64> {
    crate::collect::host::read_meminfo()?.available_bytes
}

#[cfg(test)]
mod tests;
